"""Compile keys and cross-compilation of the backend's kernels, without a GPU.

- :func:`record` runs a function with every kernel launch recorded (and, for a dry run,
  skipped): the exact arguments Triton's JIT would see.
- :func:`cache_key` is the key of Triton's JIT cache for a recorded launch, computed the way
  ``JITFunction.run`` computes it for a CUDA device (also for interpreted kernels). Two
  launches with one key share a compilation.
- :func:`cross_compile` compiles a recorded launch for a CUDA target (default sm_90, the H200)
  with Triton's own pipeline down to a cubin (bundled ptxas), and reports shared memory,
  registers and spills. It needs a process without TRITON_INTERPRET (the kernels must be
  JITFunctions): ``python -m gdn.triton_backend.xcompile`` prints a report.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common

__all__ = ["Launch", "record", "cache_key", "cross_compile", "main"]

#: H200 / H100: 227 KiB of shared memory per block (opt-in maximum)
SM90_SHARED_BYTES = 232448


@dataclasses.dataclass
class Launch:
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


def record(fn: Callable[[], Any], *, dry: bool = False) -> tuple[Any, list[Launch]]:
    """(fn(), the launches it made). ``dry``: skip the launches (CPU tensors without the
    interpreter are then accepted; outputs are left unwritten)."""
    launches: list[Launch] = []

    def hook(kernel, grid, args, kwargs):
        launches.append(Launch(kernel, tuple(grid), tuple(args), dict(kwargs)))
        return dry

    prev = _common.set_launch_hook(hook)
    try:
        out = fn()
    finally:
        _common.set_launch_hook(prev)
    return out, launches


def _jit(kernel) -> JITFunction:
    if isinstance(kernel, JITFunction):
        return kernel
    kw = {k: v for k, v in getattr(kernel, "kwargs", {}).items() if k != "repr" or v is not None}
    return JITFunction(kernel.fn, **kw)  # an interpreted kernel: the same function, compiled


def _bind(launch: Launch, arch: int):
    from triton.compiler import make_backend

    jf = _jit(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return jf, backend, bound, specialization, options


def cache_key(launch: Launch, arch: int = 90) -> str:
    """The key of Triton's JIT cache for this launch on a CUDA device of compute capability
    ``arch``: argument dtypes, the specialization of ints and pointers (divisibility by 16,
    == 1), constexpr values and launch options."""
    from triton.runtime.jit import compute_cache_key

    _, _, _, specialization, options = _bind(launch, arch)
    return compute_cache_key({}, specialization, options)


@dataclasses.dataclass
class Compiled:
    name: str
    shared: int
    registers: int | None
    spill_bytes: int | None
    num_warps: int
    num_stages: int
    constexprs: dict

    def line(self) -> str:
        cx = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return (f"{self.name:16s} smem {self.shared / 1024:6.1f} KiB  regs {self.registers}  "
                f"spills {self.spill_bytes} B  warps {self.num_warps} "
                f"stages {self.num_stages}  {cx}")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name,
                              "-o", "/dev/null"], capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None), (int(spills[-1]) if spills else None)


def cross_compile(launch: Launch, arch: int = 90) -> Compiled:
    """Compile one recorded launch for sm_``arch`` down to a cubin (raises on a compile error)."""
    from triton.compiler import ASTSource

    jf, backend, bound, specialization, options = _bind(launch, arch)
    options, signature, constexprs, attrs = jf._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    src = ASTSource(jf, signature, constexprs, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    regs, spills = _ptxas_usage(ck.asm["ptx"], arch)
    names = [p.name for p in jf.params]
    cx = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    return Compiled(launch.name, ck.metadata.shared, regs, spills, ck.metadata.num_warps,
                    ck.metadata.num_stages, cx)


def chain_launches(h: int, hv: int, dk: int, dv: int, dtype: str, *, lens=(100, 30),
                   initial_state: bool = True, l2norm: bool = True) -> list[Launch]:
    """The launches of one prefill (dry run on small CPU tensors) for a model shape."""
    import numpy as np
    import torch

    import gdn
    from gdn.api import validate

    from . import run

    t = int(sum(lens))
    rng = np.random.default_rng(0)
    dt = getattr(torch, dtype)
    q = torch.from_numpy(rng.standard_normal((1, t, h, dk), dtype=np.float32)).to(dt)
    k = torch.from_numpy(rng.standard_normal((1, t, h, dk), dtype=np.float32)).to(dt)
    v = torch.from_numpy(rng.standard_normal((1, t, hv, dv), dtype=np.float32)).to(dt)
    g = -torch.rand(1, t, hv)
    b = torch.rand(1, t, hv)
    h0 = torch.zeros(len(lens), hv, dk, dv) if initial_state else None
    _, args = validate(q, k, v, g, b, plan=gdn.plan(np.cumsum([0, *lens])), initial_state=h0,
                       use_qk_l2norm=l2norm, backend="triton")
    return record(lambda: run(args), dry=True)[1]


def main(argv: list[str] | None = None) -> int:
    """Cross-compile the chain for a few shapes and print shared memory / registers / spills."""
    argv = sys.argv[1:] if argv is None else argv
    if _common.interpreted(__import__("gdn.triton_backend.wu", fromlist=["x"])._prepare_kernel):
        print("unset TRITON_INTERPRET to cross-compile", file=sys.stderr)
        return 2
    shapes = [(16, 32, 128, 128, "bfloat16"), (16, 32, 128, 128, "float32"),
              (2, 6, 256, 100, "bfloat16"), (2, 6, 256, 256, "float32"), (1, 3, 24, 40, "float16")]
    if argv:
        shapes = [tuple(int(x) for x in a.split(",")[:4]) + (a.split(",")[4],) for a in argv]
    bad = 0
    for shape in shapes:
        print(f"H, HV, K, V, dtype = {shape}")
        for launch in chain_launches(*shape):
            c = cross_compile(launch)
            flag = ""
            if c.shared > SM90_SHARED_BYTES:
                flag, bad = "  <-- too much shared memory", bad + 1
            elif c.spill_bytes:
                flag = "  <-- spills"
            print("  " + c.line() + flag)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
