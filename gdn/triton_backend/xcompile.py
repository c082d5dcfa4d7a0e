"""Compile keys and cross-compilation of the backend's kernels, without a GPU.

- :func:`record` runs a function with every kernel launch recorded (and, for a dry run,
  skipped): the exact arguments Triton's JIT would see.
- :func:`cache_key` is the key of Triton's JIT cache for a recorded launch, computed the way
  ``JITFunction.run`` computes it for a CUDA device (also for interpreted kernels). Two
  launches with one key share a compilation.
- :func:`cross_compile` compiles a recorded launch for a CUDA target (default sm_90, the H200)
  with Triton's own pipeline down to a cubin (bundled ptxas), and reports shared memory,
  registers, spills and pipeline hazards. It needs a process without TRITON_INTERPRET (the
  kernels must be JITFunctions): ``python -m gdn.triton_backend.xcompile`` prints a report.
- :func:`pipeline_hazards` reads the sm_90 TTGIR for the race that broke use_qk_l2norm on the
  H200 (Triton 3.6): a tile loaded in a pipelined loop and used both by a dot and by other
  arithmetic gets ONE shared-memory buffer, which the next iteration's asynchronous copy
  overwrites while the asynchronous wgmma of this iteration may still read it. The
  interpreter cannot see it; the compiled IR can.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common

__all__ = ["Launch", "record", "cache_key", "cross_compile", "pipeline_hazards", "main"]

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

    prev = _common.set_launch_hook(hook, host_tensors=dry)
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
    hazards: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        cx = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return (f"{self.name:16s} smem {self.shared / 1024:6.1f} KiB  regs {self.registers}  "
                f"spills {self.spill_bytes} B  warps {self.num_warps} "
                f"stages {self.num_stages}  {cx}")


_ALLOC = re.compile(r"(%[\w.#]+) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x")
_VIEW = re.compile(r"(%[\w.#]+) = ttg\.memdesc_index (%[\w.#]+)\[")
_COPY = re.compile(r"ttg\.async_copy_global_to_local %[\w.#]+, (%[\w.#]+)")
_WGMMA = re.compile(r"ttng\.warp_group_dot (%[\w.#]+), (%[\w.#]+),[^\n]*isAsync = true")


def pipeline_hazards(ttgir: str) -> list[str]:
    """Pipeline buffers that an asynchronous copy refills and an asynchronous wgmma reads
    with fewer slots than their peers (a dot-only operand gets num_stages slots; the mixed-use
    tile of the Triton 3.6 race gets one less, so the copy of iteration i lands in the slot
    that iteration i's wgmma may still read), or with one slot. IR names of the buffers."""
    slots = {m.group(1): int(m.group(2)) for m in _ALLOC.finditer(ttgir)}
    owner = {m.group(1): m.group(2) for m in _VIEW.finditer(ttgir)}
    base = lambda v: owner.get(v, v)  # noqa: E731
    refilled = {base(m.group(1)) for m in _COPY.finditer(ttgir)}
    read_async = {base(v) for m in _WGMMA.finditer(ttgir) for v in m.groups()}
    ring = {b: slots[b] for b in refilled & read_async if b in slots}
    most = max(ring.values(), default=0)
    return sorted(b for b, n in ring.items() if n == 1 or n < most)


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
                    ck.metadata.num_stages, cx, pipeline_hazards(ck.asm["ttgir"]))


def chain_launches(h: int, hv: int, dk: int, dv: int, dtype: str, *, lens=(100, 30),
                   initial_state: bool = True, l2norm: bool = True,
                   split: int | None = None) -> list[Launch]:
    """The launches of one prefill (dry run on small CPU tensors) for a model shape; with ``split``
    the exact two-pass split in pieces of that many chunks (:mod:`.split`)."""
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
    if split:
        from gdn.planner import split_pieces

        from .split import run_split

        return record(lambda: run_split(args, split_pieces(np.cumsum([0, *lens]), split)), dry=True)[1]
    return record(lambda: run(args), dry=True)[1]


def _hazard_repro_kernel(q, h, o, K: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """The output kernel's old pattern in miniature: with NORM the q tile also feeds a sum."""
    r = tl.arange(0, 64)
    acc = tl.zeros([64, 64], dtype=tl.float32)
    sq = tl.zeros([64], dtype=tl.float32)
    for lo in range(0, K, BK):
        c = lo + tl.arange(0, BK)
        b_q = tl.load(q + r[:, None] * K + c[None, :])
        if NORM:
            sq += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
        acc = tl.dot(b_q, tl.load(h + c[:, None] * 64 + r[None, :]), acc)
    tl.store(o + r[:, None] * 64 + r[None, :], acc * sq[:, None])


def hazard_selftest(arch: int = 90) -> tuple[list, ...]:
    """Hazards of the repro kernel with NORM (2 and 3 pipeline stages), then without: Triton
    3.6 has the race in the first two only, which shows that :func:`pipeline_hazards` sees it
    (tests/test_triton_backend.py)."""
    import torch

    kern = triton.jit(_hazard_repro_kernel)
    q = torch.empty(64, 128, dtype=torch.bfloat16)
    h = torch.empty(128, 64, dtype=torch.bfloat16)
    o = torch.empty(64, 64)
    return tuple(cross_compile(Launch(kern, (1,), (q, h, o), dict(K=256, BK=64, NORM=norm,
                                                                 num_stages=stages)),
                               arch).hazards for norm in (True, False) for stages in (2, 3))


def main(argv: list[str] | None = None) -> int:
    """Cross-compile the chain for a few shapes and print shared memory / registers / spills."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["selftest"]:
        res = hazard_selftest()
        print(f"pipeline hazards of the repro kernel: with the extra use {res[:2]} "
              f"(2 and 3 stages), without {res[2:]}")
        return 0 if all(res[:2]) and not any(res[2:]) else 1
    if _common.interpreted(__import__("gdn.triton_backend.wu", fromlist=["x"])._wu_kernel):
        print("unset TRITON_INTERPRET to cross-compile", file=sys.stderr)
        return 2
    shapes = [(16, 32, 128, 128, "bfloat16"), (16, 32, 128, 128, "float32"),
              (2, 6, 256, 100, "bfloat16"), (2, 6, 256, 256, "float32"), (1, 3, 24, 40, "float16")]
    if argv:
        shapes = [tuple(int(x) for x in a.split(",")[:4]) + (a.split(",")[4],) for a in argv]
    bad = 0
    from . import state

    for shape, mode in [(s, "") for s in shapes] + [(shapes[0], "fuse"), (shapes[0], "split")]:
        print(f"H, HV, K, V, dtype = {shape}" + {"": "", "fuse": ", state.FUSE_OUTPUT",
                                                 "split": ", the split's pass 1 (state MAPS mode) and scan"}[mode])
        state.FUSE_OUTPUT = mode == "fuse"
        try:
            if mode == "split":  # the other launches of the split are the chain's own compilations
                launches = [lc for lc in chain_launches(*shape, lens=(300, 30), split=2)
                            if lc.kwargs.get("MAPS") or lc.name == "_scan_kernel"]
            else:
                launches = chain_launches(*shape)
        finally:
            state.FUSE_OUTPUT = False
        for launch in launches:
            c = cross_compile(launch)
            flag = ""
            if c.shared > SM90_SHARED_BYTES:
                flag, bad = "  <-- too much shared memory", bad + 1
            elif c.hazards:
                flag, bad = f"  <-- single-buffered async wgmma operand {c.hazards}", bad + 1
            elif c.spill_bytes:
                flag = "  <-- spills"
            print("  " + c.line() + flag)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
