"""Shared pieces of the Triton backend: chunk geometry, dtypes, devices, launches, jit helpers.

Host side (Python, per call): everything here is O(1) work on host ints and tensor metadata;
nothing reads a device value (no ``.item()``, ``.tolist()``, ``int(tensor)``).

Device side (helpers shared by the stage kernels): where a program's chunk starts
(:func:`chunk_program`: every per-chunk kernel finds its sequence and chunk the same way, from
the plan's int32 device arrays ``cu_seqlens`` and ``chunk_indices``; sentinel rows, seq id < 0,
exit), loads and stores of a chunk as four 16-token blocks, and the dot / cast helpers
:func:`mma` and :func:`to_dt` that keep the CPU interpreter faithful to the tensor cores.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import triton
import triton.language as tl

__all__ = ["BT", "BC", "INTERPRET", "interpreted", "check_device", "device_plan", "packed",
           "dot_precision", "tiles", "pow2", "launch", "chunk_program", "dummy", "set_launch_hook",
           "mma", "to_dt", "load_rows4", "store_rows4", "device_fn"]

#: chunk size of every kernel (the plan's chunk_size must match)
BT = 64
#: sub-chunk size of the triangular solve: a chunk is 4 x 4 blocks of 16 x 16
BC = 16
#: kernels of this process run in Triton's interpreter (fixed when the modules are imported,
#: like the @triton.jit decorators themselves)
INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


def device_fn(fn):
    """``@triton.jit`` for a device helper called from the kernels. Under the interpreter the
    plain function is used instead: the interpreter re-patches triton.language on every call of
    a nested jit function (milliseconds each), which made the CPU tests several times slower."""
    return fn if INTERPRET else triton.jit(fn)


def interpreted(kernel: Any) -> bool:
    """True when ``kernel`` runs in Triton's interpreter (TRITON_INTERPRET=1 at import time)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(ref: torch.Tensor, interp: bool, **tensors: Any) -> torch.device:
    """All tensors on q's device: CUDA, or CPU under the interpreter (ValueError naming it)."""
    dev = ref.device
    if dev.type == "cpu":
        if not interp and not _HOOK_TAKES_HOST:
            raise ValueError(
                "q is a CPU tensor: the triton backend runs on CUDA tensors (CPU tensors only "
                "under Triton's interpreter: TRITON_INTERPRET=1 set before gdn.triton_backend "
                "is imported)")
    elif dev.type != "cuda":
        raise ValueError(f"q is on {dev}: the triton backend runs on CUDA tensors")
    elif interp:
        raise ValueError("q is a CUDA tensor but Triton's interpreter is on (TRITON_INTERPRET=1): "
                         "pass CPU tensors, or unset TRITON_INTERPRET")
    for name, x in tensors.items():
        if x is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but q is on {dev}: every tensor (and "
                             f"initial_state) must be on q's device")
    return dev


def device_plan(plan, device: torch.device):
    """The plan's int32 metadata on ``device`` (memoized by the plan: pinned, non-blocking)."""
    if plan.chunk_size != BT:
        raise NotImplementedError(f"the triton kernels use chunk_size {BT}, the plan has "
                                  f"{plan.chunk_size}: build it with gdn.plan(cu_seqlens)")
    if not plan.is_host:
        dev = getattr(plan.cu_seqlens, "device", None)
        if not isinstance(dev, torch.device) or dev != device:
            raise ValueError(f"plan: pass the host plan (gdn.plan(cu_seqlens)); this one holds "
                             f"{type(plan.cu_seqlens).__name__} arrays on {dev}, q is on {device}")
        return plan
    return plan.to_torch(device)


def packed(x: torch.Tensor, tail: int) -> torch.Tensor:
    """[..., T, *tail dims] -> [T_total, *tail dims], a view when contiguous (else a copy: the
    caller's tensor is never written)."""
    if not x.is_contiguous():
        x = x.contiguous()
    return x.reshape(-1, *x.shape[x.dim() - tail:])


def tiles(defaults: dict, override: dict, dv: int) -> dict:
    """Launch meta of a kernel: its defaults updated by a module's ``TILES`` override (for
    tuning sweeps; empty in normal use), with the V-tile count NV recomputed from BV."""
    meta = {**defaults, **override}
    if "NV" in meta:
        meta["BV"] = min(meta["BV"], pow2(dv))
        meta["NV"] = cdiv(dv, meta["BV"])
    return meta


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (the 1e-4 bar fails with TF32); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    """Tile width for a head dim: next power of two, at least ``lo`` (tl.dot needs >= 16)."""
    return max(lo, 1 << (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_DUMMIES: dict = {}


def dummy(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor standing in for an absent optional pointer (a constexpr flag
    says it is absent), so the pointer's None-ness never changes the compilation key."""
    d = _DUMMIES.get(device)
    if d is None:
        d = _DUMMIES[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return d


_HOOK: Callable | None = None
_HOOK_TAKES_HOST = False  # the hook dry-runs CPU tensors: check_device lets them through


def set_launch_hook(hook: Callable | None, *, host_tensors: bool = False) -> Callable | None:
    """Install ``hook(kernel, grid, args, kwargs) -> bool`` called before every launch (tests:
    recording launches for the compile-key check; returning True skips the launch). With
    ``host_tensors=True`` the hook promises a dry run, so CPU tensors pass the device check without
    the interpreter (cross-compiling to sm_90, grid checks); a hook that only records launches
    leaves the check as it is. Returns the previous hook (restoring it resets ``host_tensors``)."""
    global _HOOK, _HOOK_TAKES_HOST
    prev, _HOOK = _HOOK, hook
    _HOOK_TAKES_HOST = bool(host_tensors) and hook is not None
    return prev


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, skipping empty grids (host ints only)."""
    if _HOOK is not None and _HOOK(kernel, grid, args, kwargs):
        return
    for g in grid:
        if g <= 0:
            return
    kernel[grid](*args, **kwargs)


# ------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------
@device_fn
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b: operands in the input dtype (cast with :func:`to_dt`), fp32 accumulation.

    Under Triton 3.6's interpreter a bf16 dot multiplies the raw 16-bit patterns: there the
    operands go through fp32, which is exact (products of bf16 or fp16 values are exact in fp32),
    so the interpreter computes what the tensor cores do up to the summation order.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@device_fn
def to_dt(x, dt: tl.constexpr):
    """``x`` rounded to ``dt`` (nearest even): a dot operand or a value to store.

    Under the interpreter, fp32 -> bf16 truncates instead: there the value is rounded to the
    nearest bf16 with Veltkamp's split (c = x (2^16 + 1); x_hi = c - (c - x): x kept to 8
    significant bits, the same as the GPU's rounding but for some exact ties) and kept as fp32
    (exactly representable, so a later store is exact).
    """
    if INTERPRET:
        if dt == tl.bfloat16:
            c = x.to(tl.float32) * 65537.0
            return c - (c - x)
        else:
            return x.to(dt)
    else:
        return x.to(dt)


@device_fn
def chunk_program(cu_seqlens, chunk_indices, HV: tl.constexpr, NV: tl.constexpr,
                  BT: tl.constexpr):
    """Where the program of a per-chunk kernel works: (V tile, v head, chunk row, seq id, first
    token (int64), valid tokens). Programs are ordered V tile fastest, then v head, then chunk
    row, so the programs sharing a chunk's q / k run together.

    seq id < 0 marks a sentinel (padding) row: the caller returns at once.
    """
    pid = tl.program_id(0)
    iv = pid % NV
    head = (pid // NV) % HV
    row = pid // (NV * HV)
    seq = tl.load(chunk_indices + row * 2)
    s = tl.maximum(seq, 0)  # a sentinel row reads sequence 0's bounds (in range) and is skipped
    c = tl.maximum(tl.load(chunk_indices + row * 2 + 1), 0).to(tl.int64)
    bos = tl.load(cu_seqlens + s).to(tl.int64)
    eos = tl.load(cu_seqlens + s + 1).to(tl.int64)
    tok0 = bos + c * BT
    return iv, head, row, seq, tok0, tl.minimum(eos - tok0, BT)


@device_fn
def load_rows4(ptr, tok0, n_valid, hidx, NH: tl.constexpr, D: tl.constexpr, lo,
               BD: tl.constexpr, BC: tl.constexpr):
    """One chunk of a [T, NH, D] tensor (head ``hidx``, columns lo .. lo + BD) as four [BC, BD]
    row blocks of 16 tokens, in the tensor's dtype; tokens past the end and columns >= D are 0."""
    i = tl.arange(0, BC)
    col = lo + tl.arange(0, BD)
    p = ptr + ((tok0 + i) * NH + hidx)[:, None] * D + col[None, :]
    step = BC * NH * D  # 16 tokens further
    in_d = (col < D)[None, :]
    x0 = tl.load(p, mask=(i < n_valid)[:, None] & in_d, other=0.0)
    x1 = tl.load(p + step, mask=(i + BC < n_valid)[:, None] & in_d, other=0.0)
    x2 = tl.load(p + 2 * step, mask=(i + 2 * BC < n_valid)[:, None] & in_d, other=0.0)
    x3 = tl.load(p + 3 * step, mask=(i + 3 * BC < n_valid)[:, None] & in_d, other=0.0)
    return x0, x1, x2, x3


@device_fn
def store_rows4(ptr, tok0, n_valid, hidx, x0, x1, x2, x3, NH: tl.constexpr, D: tl.constexpr,
                lo, BD: tl.constexpr, BC: tl.constexpr):
    """Inverse of :func:`load_rows4`: valid tokens and columns only, cast to the tensor's dtype."""
    i = tl.arange(0, BC)
    col = lo + tl.arange(0, BD)
    p = ptr + ((tok0 + i) * NH + hidx)[:, None] * D + col[None, :]
    step = BC * NH * D
    in_d = (col < D)[None, :]
    dt = ptr.dtype.element_ty
    tl.store(p, to_dt(x0, dt), mask=(i < n_valid)[:, None] & in_d)
    tl.store(p + step, to_dt(x1, dt), mask=(i + BC < n_valid)[:, None] & in_d)
    tl.store(p + 2 * step, to_dt(x2, dt), mask=(i + 2 * BC < n_valid)[:, None] & in_d)
    tl.store(p + 3 * step, to_dt(x3, dt), mask=(i + 3 * BC < n_valid)[:, None] & in_d)
