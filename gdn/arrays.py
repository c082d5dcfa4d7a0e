"""Moving NumPy test inputs into a backend's arrays, and knowing where we run.

Shared by the demo, the parity suite, the benchmarks and the tests, so no backend-specific
conversion code is written twice.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

__all__ = ["convert", "on_gpu", "torch_device", "sync"]


@functools.cache
def on_gpu(backend: str) -> bool:
    """True when ``backend`` runs on a CUDA GPU here (False on CPU-only machines)."""
    try:
        if backend == "triton":
            import torch

            return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


def torch_device() -> str:
    return "cuda" if on_gpu("triton") else "cpu"


def convert(x: np.ndarray | None, backend: str, dtype: str | None = None) -> Any:
    """NumPy -> torch tensor (CUDA if present) or jax array (default device), as ``dtype``."""
    if x is None:
        return None
    if backend == "triton":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.to(device=torch_device(), dtype=getattr(torch, dtype) if dtype else t.dtype)
    import jax.numpy as jnp

    return jnp.asarray(x, dtype=getattr(jnp, dtype) if dtype else None)


def sync(x: Any) -> Any:
    """Block until ``x`` (a tensor, jax array, tuple of them or None) is computed."""
    if isinstance(x, (tuple, list)):
        for y in x:
            sync(y)
        return x
    if x is None:
        return x
    if type(x).__module__.startswith("torch"):
        import torch

        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    elif hasattr(x, "block_until_ready"):
        x.block_until_ready()
    return x
