"""Helpers shared by the Pallas-Triton stage kernels (traced inside kernels unless noted).

Conventions of every kernel here: packed token-major arrays (q, k [T, H, K]; v, w, u, v_new, o
[T, HV, *]; g, gc, beta [T, HV]; Ai [T, HV, BT]; h [NT_pad, HV, K, V]); no BlockSpecs, so every
ref is a whole array (a pointer in the Triton lowering) and each kernel computes its own offsets
from the plan's int32 metadata, read inside the kernel (Pallas-Triton has no scalar prefetch).
Grids are static, sized by the plan's padded counts; sentinel chunk rows exit early. Every read
and write of a chunk is masked to the rows of its sequence (a chunk may end mid-block and the
next rows belong to the next sequence) and to the real K / V columns (tiles are padded to powers
of two, at least 16 for the dots). Interpret mode would not catch a missing mask: it clamps.

Launch configuration: each stage module has a ``<stage>_tiles`` function giving its defaults (the
Triton backend's chosen ones, gdn/triton_backend) and a module-level ``TILES`` override dict,
empty in normal use, merged over them by :func:`tiles` when a kernel is traced. jax caches
traces (the chain's ``core`` is a module-level ``jax.jit``), so after changing a ``TILES`` call
``jax.clear_caches()`` before the next call (benchmarks/pallas_sweep.py does).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..common import next_pow2  # (importing common also pins jax's trace context: see there)

__all__ = ["chunk_bounds", "iota", "mdot", "mdot_t", "sdot", "solve_precision", "load", "store",
           "dim_tile",
           "compiler_params", "pl", "plgpu", "BT", "BC", "NB", "Dims", "dims", "sub_masks",
           "load_sub", "on_chunk_row", "ORDERS", "grid_of", "program_ids", "tiles", "tile_loop",
           "sm_count"]

BT = 64  # chunk size of the plan (gdn plans use 64; the kernels assume it)
BC = 16  # rows of a sub-block: chunks are handled as NB sub-blocks where the inverse needs it
NB = BT // BC


def dim_tile(d: int) -> int:
    """Tile width of a head dim d: the next power of two, at least 16 (Triton dot minimum)."""
    return next_pow2(d, 16)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call: tokens, heads, head dims and their power-of-two tiles."""

    tokens: int
    h: int  # q/k heads
    hv: int  # v heads
    k: int
    v: int
    dtype: jnp.dtype  # the input dtype (w, u, h, v_new, o are stored in it)

    @property
    def grp(self) -> int:  # G: v head j reads q/k head j // G
        return self.hv // self.h

    @property
    def fp32(self) -> bool:  # fp32 inputs: IEEE fp32 dots everywhere
        return self.dtype == jnp.float32

    @property
    def kp(self) -> int:
        return dim_tile(self.k)

    @property
    def vp(self) -> int:
        return dim_tile(self.v)


def dims(qk, v) -> Dims:
    """Dims from a packed q or k [T, H, K] and any packed [T, HV, V] array."""
    t, h, k = qk.shape
    return Dims(t, h, v.shape[1], k, v.shape[2], jnp.dtype(qk.dtype))


def iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def chunk_bounds(ci_ref, cu_ref, row):
    """(seq n, first token t0, valid length L <= BT) of chunk row ``row``; n < 0: sentinel."""
    n = ci_ref[row, 0]
    ns = jnp.maximum(n, 0)
    t0 = cu_ref[ns] + ci_ref[row, 1] * BT
    length = jnp.minimum(cu_ref[ns + 1] - t0, BT)
    return n, t0, length


#: program orders of the grids (the ``order`` key of every TILES). "triton": the Triton backend's
#: (chunk_program in gdn/triton_backend/_common.py): the V tile (or part) varies fastest between
#: consecutive programs, then the v head, the chunk row (or sequence) slowest, so the G v heads
#: that read one chunk's q / k rows, and the V tiles that read one (sequence, head)'s w / k, run
#: side by side (the second read hits L2). "rows": chunk rows (sequences) fastest, the order of
#: these kernels before 2026-11-28, kept for the sweep.
ORDERS = ("triton", "rows")


def grid_of(sizes: tuple[int, ...], order: str) -> tuple[int, ...]:
    """(host) The pallas_call grid of logical axes ``sizes`` = (chunk rows or sequences, v heads
    [, V tiles or parts]) in ``order``. Pallas-Triton launches grid axis 0 as CUDA's x, the
    fastest-varying block index, so the Triton order reverses the axes."""
    if order not in ORDERS:
        raise ValueError(f"grid order {order!r}: one of {ORDERS}")
    return tuple(reversed(sizes)) if order == "triton" else tuple(sizes)


def program_ids(n: int, order: str) -> tuple:
    """The logical program ids (as :func:`grid_of`'s ``sizes``) of a kernel on a grid of ``n``
    axes. Read them outside ``pl.when`` (interpret mode cannot discharge program_id there)."""
    ids = tuple(pl.program_id(i) for i in range(n))
    return tuple(reversed(ids)) if order == "triton" else ids


def on_chunk_row(ci_ref, cu_ref, body, order: str):
    """In a kernel on a ``grid_of((NT_pad, HV), order)`` grid: ``body(t0, head, masks)`` for a
    real chunk row (the sentinel rows exit), masks being the row masks of its NB sub-blocks."""
    row, head = program_ids(2, order)
    n, t0, length = chunk_bounds(ci_ref, cu_ref, row)
    pl.when(n >= 0)(lambda: body(t0, head, sub_masks(length)))


def sub_masks(length):
    """Row masks [BC] of the NB sub-blocks of a chunk with ``length`` valid rows."""
    return [i * BC + iota(BC) < length for i in range(NB)]


def load_sub(ref, t0, head, masks, other=0.0):
    """A per-token vector (gates, beta, 1/norm) of [T, heads] as NB sub-block vectors [BC]."""
    return [load(ref.at[pl.ds(t0 + i * BC, BC), head], m, other) for i, m in enumerate(masks)]


def mdot(a, b, fp32: bool):
    """a @ b with fp32 accumulation; IEEE fp32 (HIGHEST, not TF32) when ``fp32``."""
    prec = lax.Precision.HIGHEST if fp32 else None
    return jnp.dot(a, b, precision=prec, preferred_element_type=jnp.float32)


def solve_precision(fp32: bool, interpret: bool):
    """Dots of the triangular solve (fp32 operands): IEEE fp32 (HIGHEST) for fp32 inputs and in
    interpret mode; else tf32x3 (three TF32 tensor-core products, fp32-accurate), since the
    solve's result is rounded to the 16-bit input dtype for the w / u products anyway."""
    if fp32 or interpret:
        return lax.Precision.HIGHEST
    return lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def sdot(a, b, precision):
    """a @ b of fp32 operands at a :func:`solve_precision`."""
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def mdot_t(a, b, fp32: bool, contract: int):
    """a^T @ b (contract=0) or a @ b^T (contract=1) without materializing the transpose."""
    prec = lax.Precision.HIGHEST if fp32 else None
    dims = (((0,), (0,)), ((), ())) if contract == 0 else (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def load(ref, mask, other=0):
    return plgpu.load(ref, mask=mask, other=other)


def store(ref, val, mask):
    plgpu.store(ref, val.astype(ref.dtype), mask=mask)


def compiler_params(num_warps: int = 4, num_stages: int | None = None):
    """num_stages None: Triton's default, 3 on CUDA."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tiles(defaults: dict, override: dict, stage: str) -> dict:
    """(host, trace time) A kernel's launch meta: ``defaults`` updated by its module's ``TILES``
    override (tuning sweeps; empty in normal use). Keys outside the defaults are an error (a
    misspelled sweep key would otherwise time the default). See the module docstring on caches."""
    unknown = set(override) - set(defaults)
    if unknown:
        raise ValueError(f"{stage} TILES: unknown keys {sorted(unknown)}; known: "
                         f"{sorted(defaults)}")
    meta = {**defaults, **override}
    if meta.get("order", "triton") not in ORDERS:
        raise ValueError(f"{stage} TILES: order {meta['order']!r}, one of {ORDERS}")
    return meta


def tile_loop(n: int, body, carry, loop: bool):
    """``carry = body(i, carry)`` for the K / V tiles i = 0 .. n - 1 of a kernel. ``loop``: an
    scf.for, which Triton software-pipelines over the kernel's num_stages (the loads of the next
    tiles in flight during this tile's dots), like the Triton backend's ``for`` over tiles; else
    unrolled in Python (straight-line code: num_stages does nothing there)."""
    if loop and n > 1:
        return lax.fori_loop(0, n, body, carry)
    for i in range(n):  # a traced index, as in the loop: jax rejects a static slice start whose
        # tile overruns the dim (a partial last tile, masked), a traced one it leaves alone
        carry = body(lax.convert_element_type(i, jnp.int32), carry)
    return carry


@functools.cache
def sm_count() -> int:
    """(host) Streaming multiprocessors of the default device when it is a GPU (132 on the
    H200), else 132 (interpret mode; the CPU cross-lowering tests target an H200)."""
    try:
        dev = jax.devices()[0]
        n = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
        return int(n) if n else 132
    except Exception:  # noqa: BLE001 - no device query: the H200's count
        return 132
