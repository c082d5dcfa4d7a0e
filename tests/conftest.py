"""Shared pytest set-up: GPU tests skip on CPU-only machines."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (./run gpu on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def abstract_h200():
    """A context-manager factory: what JAX lowers inside it targets an abstract H200 (132 SMs),
    so GPU kernels lower for CUDA on a CPU-only machine (DESIGN.md §6)."""
    import jax

    def make():
        dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
            (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=dev))

    return make


@pytest.fixture
def pallas_triton_ttir(monkeypatch):
    """The Triton IR of every Pallas-Triton kernel lowered during the test, in order (a list of
    str, filled as kernels lower): compile them with :func:`compile_ttir_sm90`."""
    from jax._src.pallas.triton import lowering

    ttir: list[str] = []
    orig = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        res = orig(*a, **kw)
        ttir.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
    return ttir


def compile_ttir_sm90(src: str, path, num_warps: int, num_stages: int):
    """Triton's compile of one kernel's TTIR for sm_90 (no GPU needed): the compiled kernel."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    path.write_text(src)
    return triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
