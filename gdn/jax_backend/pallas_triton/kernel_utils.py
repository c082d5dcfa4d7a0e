"""Helpers shared by the Pallas-Triton stage kernels (traced inside kernels unless noted).

Conventions of every kernel here: packed token-major arrays (q, k [T, H, K]; v, w, u, v_new, o
[T, HV, *]; g, gc, beta [T, HV]; Ai [T, HV, BT]; h [NT_pad, HV, K, V]); no BlockSpecs, so every
ref is a whole array (a pointer in the Triton lowering) and each kernel computes its own offsets
from the plan's int32 metadata, read inside the kernel (Pallas-Triton has no scalar prefetch).
Grids are static, sized by the plan's padded counts; sentinel chunk rows exit early. Every read
and write of a chunk is masked to the rows of its sequence (a chunk may end mid-block and the
next rows belong to the next sequence) and to the real K / V columns (tiles are padded to powers
of two, at least 16 for the dots). Interpret mode would not catch a missing mask: it clamps.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..common import next_pow2  # (importing common also pins jax's trace context: see there)

__all__ = ["chunk_bounds", "iota", "mdot", "mdot_t", "sdot", "solve_precision", "load", "store",
           "dim_tile",
           "compiler_params", "pl", "plgpu", "BT", "BC", "NB", "Dims", "dims", "sub_masks",
           "load_sub", "on_chunk_row"]

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


def on_chunk_row(ci_ref, cu_ref, body):
    """In a kernel on a (NT_pad, HV) grid: ``body(t0, head, masks)`` for a real chunk row (the
    sentinel rows exit), masks being the row masks of its NB sub-blocks."""
    row, head = pl.program_id(0), pl.program_id(1)
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
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
