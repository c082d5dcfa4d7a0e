"""Stages 1-2: the gate cumsum and the intra-chunk inverse ``Ai = (I + A)^-1`` (the chain's
first kernel, ``_intra_kernel``; one program per chunk row and v head).

    A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s)   for r > s (strictly lower), else 0

Computed in registers as 4 x 4 blocks of 16 x 16 (the ten lower ones):

1. ``K K^T`` blocks accumulate over K tiles (tensor-core dots in the input dtype; IEEE fp32
   for fp32 inputs). With use_qk_l2norm, ``||k_r||^2`` is the diagonal of the diagonal blocks
   (the same fp32 sums, no second pass over k and no elementwise use of the k tiles: a tile used
   both by a dot and by other arithmetic inside a pipelined loop is single-buffered by Triton
   3.6's software pipeliner on sm_90 and overwritten while the asynchronous wgmma still reads
   it). Gate, beta and the norms scale the blocks; the upper triangle of a diagonal block is
   selected away before the exponential (its exponent is positive).
2. The four diagonal blocks are inverted together by forward substitution in fp32 (exact
   arithmetic order of a triangular solve: a series or doubling form loses the fp32 bar on
   correlated keys). ``INV=1``: row r of X is e_r - sum_{s<r} a_rs X_s from two fp32 reductions
   (elementwise, IEEE); ``INV=0``: the same row taken from the product a X (``SPREC`` dots).
3. The off-diagonal blocks follow from ``X_ij = -X_ii sum_{j<=m<i} A_im X_mj`` with ``SPREC``
   dots: tf32x3 (three TF32 tensor-core products, fp32-accurate) for 16-bit inputs, IEEE fp32
   for fp32 inputs.

Ai is stored in the buffer's dtype: the input dtype on the fast path (the w / u products round
it to that dtype anyway, like FLA), fp32 for the stage contract and for fp32 inputs. Only the
ten lower blocks and the valid rows are written; readers mask the upper triangle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BC, BT, check_device, chunk_program, device_fn, device_plan, dot_precision,
                      dummy, interpreted, launch, load_rows4, mma, packed, pow2, to_dt)
from .cumsum import gate_cumsum, load_token_blocks, store_token_blocks

__all__ = ["intra_inverse", "store_ai", "chunk_inverse", "launch_intra", "intra_tiles",
           "solve_precision"]


@device_fn
def kkt_blocks(k, tok0, n_valid, kh, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
               BC: tl.constexpr, PREC: tl.constexpr):
    """The ten lower 16 x 16 blocks of K K^T of one chunk (fp32), summed over K tiles. The k
    tiles feed dots only (see the module docstring)."""
    a00 = tl.zeros([BC, BC], dtype=tl.float32)
    a10 = tl.zeros([BC, BC], dtype=tl.float32)
    a11 = tl.zeros([BC, BC], dtype=tl.float32)
    a20 = tl.zeros([BC, BC], dtype=tl.float32)
    a21 = tl.zeros([BC, BC], dtype=tl.float32)
    a22 = tl.zeros([BC, BC], dtype=tl.float32)
    a30 = tl.zeros([BC, BC], dtype=tl.float32)
    a31 = tl.zeros([BC, BC], dtype=tl.float32)
    a32 = tl.zeros([BC, BC], dtype=tl.float32)
    a33 = tl.zeros([BC, BC], dtype=tl.float32)
    for k_lo in range(0, K, BK):
        k0, k1, k2, k3 = load_rows4(k, tok0, n_valid, kh, H, K, k_lo, BK, BC)
        t0 = tl.trans(k0)
        t1 = tl.trans(k1)
        t2 = tl.trans(k2)
        a00 = mma(k0, t0, a00, PREC)
        a10 = mma(k1, t0, a10, PREC)
        a11 = mma(k1, t1, a11, PREC)
        a20 = mma(k2, t0, a20, PREC)
        a21 = mma(k2, t1, a21, PREC)
        a22 = mma(k2, t2, a22, PREC)
        a30 = mma(k3, t0, a30, PREC)
        a31 = mma(k3, t1, a31, PREC)
        a32 = mma(k3, t2, a32, PREC)
        a33 = mma(k3, tl.trans(k3), a33, PREC)
    return a00, a10, a11, a20, a21, a22, a30, a31, a32, a33


@device_fn
def gram_rstd(a_ii, BC: tl.constexpr, NORM: tl.constexpr):
    """1 / sqrt(||k_r||^2 + 1e-6) (gdn.reference.l2norm) of the 16 tokens of a diagonal block
    of K K^T, read off its diagonal; ones without ``NORM``."""
    i = tl.arange(0, BC)
    d = tl.sum(tl.where(i[:, None] == i[None, :], a_ii, 0.0), 1)
    if NORM:
        return 1.0 / tl.sqrt_rn(d + 1e-6)
    else:
        return d * 0.0 + 1.0


@device_fn
def _gate_diag(a, c, b, r, BC: tl.constexpr):
    """beta_r r_r a_rs r_s exp(c_r - c_s) on the strict lower triangle of a diagonal block, else
    0 (r: 1 / ||k|| or ones)."""
    i = tl.arange(0, BC)
    low = i[:, None] > i[None, :]
    e = tl.exp(tl.where(low, c[:, None] - c[None, :], 0.0))
    return tl.where(low, a * e * (b * r)[:, None] * r[None, :], 0.0)


@device_fn
def _gate_off(a, c_row, c_col, b_row, r_row, r_col):
    """beta_r r_r a_rs r_s exp(c_r - c_s) for a block below the diagonal (exponents <= 0)."""
    return a * tl.exp(c_row[:, None] - c_col[None, :]) * (b_row * r_row)[:, None] * r_col[None, :]


@device_fn
def _fs_row(a_t, x, r, i):
    """Forward-substitution step r on one block, elementwise: row r of x becomes
    e_r - sum_s a_rs x_s (a_t = a transposed, so row r of a is a column of a_t: both sums are
    fp32 reductions, no layout change of x)."""
    a_r = tl.sum(tl.where(i[None, :] == r, a_t, 0.0), 1)  # a_rs over s
    return tl.where(i[:, None] == r, x - tl.sum(a_r[:, None] * x, 0)[None, :], x)


@device_fn
def _invert_diagonal(a0, a1, a2, a3, BC: tl.constexpr, SPREC: tl.constexpr,
                     INV: tl.constexpr):
    """(I + a)^-1 of four strictly lower 16 x 16 blocks, by forward substitution in fp32.

    Step r sets row r of X to e_r - sum_{s<r} a_rs X_s: rows s < r are final and a_rs = 0 for
    s >= r. ``INV=1``: two fp32 reductions per step (:func:`_fs_row`); ``INV=0``: row r of
    X - a X from a ``SPREC`` dot. The four independent substitutions share one loop.
    """
    i = tl.arange(0, BC)
    eye = (i[:, None] == i[None, :]).to(tl.float32)
    x0 = eye
    x1 = eye
    x2 = eye
    x3 = eye
    if INV == 1:
        t0 = tl.trans(a0)
        t1 = tl.trans(a1)
        t2 = tl.trans(a2)
        t3 = tl.trans(a3)
        for r in range(1, BC):
            x0 = _fs_row(t0, x0, r, i)
            x1 = _fs_row(t1, x1, r, i)
            x2 = _fs_row(t2, x2, r, i)
            x3 = _fs_row(t3, x3, r, i)
    else:
        zero = tl.zeros([BC, BC], dtype=tl.float32)
        for r in range(1, BC):
            sel = i[:, None] == r
            x0 = tl.where(sel, x0 - mma(a0, x0, zero, SPREC), x0)
            x1 = tl.where(sel, x1 - mma(a1, x1, zero, SPREC), x1)
            x2 = tl.where(sel, x2 - mma(a2, x2, zero, SPREC), x2)
            x3 = tl.where(sel, x3 - mma(a3, x3, zero, SPREC), x3)
    return x0, x1, x2, x3


@device_fn
def intra_inverse(k, tok0, n_valid, kh, c0, c1, c2, c3, b0, b1, b2, b3, H: tl.constexpr,
                  K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
                  SPREC: tl.constexpr, NORM: tl.constexpr, INV: tl.constexpr):
    """The ten lower 16 x 16 blocks X_ij (fp32) of (I + A)^-1 of one chunk and v head, and the
    chunk's 1 / ||k|| in four [BC] blocks (``NORM``: k is normalized on the fly as row and
    column scales of K K^T; else ones).

    c*, b*: the chunk's gc and beta in four [BC] blocks (0 past the end of the sequence).
    """
    a00, a10, a11, a20, a21, a22, a30, a31, a32, a33 = kkt_blocks(
        k, tok0, n_valid, kh, H, K, BK, BC, PREC)
    r0 = gram_rstd(a00, BC, NORM)
    r1 = gram_rstd(a11, BC, NORM)
    r2 = gram_rstd(a22, BC, NORM)
    r3 = gram_rstd(a33, BC, NORM)
    a00 = _gate_diag(a00, c0, b0, r0, BC)
    a11 = _gate_diag(a11, c1, b1, r1, BC)
    a22 = _gate_diag(a22, c2, b2, r2, BC)
    a33 = _gate_diag(a33, c3, b3, r3, BC)
    a10 = _gate_off(a10, c1, c0, b1, r1, r0)
    a20 = _gate_off(a20, c2, c0, b2, r2, r0)
    a21 = _gate_off(a21, c2, c1, b2, r2, r1)
    a30 = _gate_off(a30, c3, c0, b3, r3, r0)
    a31 = _gate_off(a31, c3, c1, b3, r3, r1)
    a32 = _gate_off(a32, c3, c2, b3, r3, r2)
    x00, x11, x22, x33 = _invert_diagonal(a00, a11, a22, a33, BC, SPREC, INV)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    # X_ij = -X_ii (sum_{m=j}^{i-1} A_im X_mj), first diagonal, then the next ones
    x10 = -mma(x11, mma(a10, x00, zero, SPREC), zero, SPREC)
    x21 = -mma(x22, mma(a21, x11, zero, SPREC), zero, SPREC)
    x32 = -mma(x33, mma(a32, x22, zero, SPREC), zero, SPREC)
    x20 = -mma(x22, mma(a21, x10, mma(a20, x00, zero, SPREC), SPREC), zero, SPREC)
    x31 = -mma(x33, mma(a32, x21, mma(a31, x11, zero, SPREC), SPREC), zero, SPREC)
    x30 = -mma(x33, mma(a32, x20, mma(a31, x10, mma(a30, x00, zero, SPREC), SPREC), SPREC),
               zero, SPREC)
    return x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, r0, r1, r2, r3


@device_fn
def store_ai(ai, tok0, n_valid, head, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33,
             HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The ten lower blocks into Ai [T, HV, BT] in its dtype (valid rows; the upper blocks are
    not written)."""
    dt = ai.dtype.element_ty
    i = tl.arange(0, BC)
    p = ai + ((tok0 + i) * HV + head)[:, None] * BT + i[None, :]
    step = BC * HV * BT  # 16 rows further
    m0 = (i < n_valid)[:, None]
    m1 = (i + BC < n_valid)[:, None]
    m2 = (i + 2 * BC < n_valid)[:, None]
    m3 = (i + 3 * BC < n_valid)[:, None]
    tl.store(p, to_dt(x00, dt), mask=m0)
    tl.store(p + step, to_dt(x10, dt), mask=m1)
    tl.store(p + step + BC, to_dt(x11, dt), mask=m1)
    tl.store(p + 2 * step, to_dt(x20, dt), mask=m2)
    tl.store(p + 2 * step + BC, to_dt(x21, dt), mask=m2)
    tl.store(p + 2 * step + 2 * BC, to_dt(x22, dt), mask=m2)
    tl.store(p + 3 * step, to_dt(x30, dt), mask=m3)
    tl.store(p + 3 * step + BC, to_dt(x31, dt), mask=m3)
    tl.store(p + 3 * step + 2 * BC, to_dt(x32, dt), mask=m3)
    tl.store(p + 3 * step + 3 * BC, to_dt(x33, dt), mask=m3)


@triton.jit
def _intra_kernel(k, g, beta, gc, ai, k_rstd, cu_seqlens, chunk_indices, H: tl.constexpr,
                  HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  BK: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                  FROM_G: tl.constexpr, NORM: tl.constexpr, INV: tl.constexpr):
    """One (chunk row, v head): gc (from g with ``FROM_G``, else read), Ai, and with ``NORM``
    1 / ||k|| [T, H] (written by the first v head of each k head)."""
    _, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, 1, BT)
    if seq < 0:
        return
    if FROM_G:
        c0, c1, c2, c3 = gate_cumsum(g, gc, tok0, n_valid, head, HV, BC)
    else:
        c0, c1, c2, c3 = load_token_blocks(gc, tok0, n_valid, head, HV, BC)
    b0, b1, b2, b3 = load_token_blocks(beta, tok0, n_valid, head, HV, BC)
    kh = head // (HV // H)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, r0, r1, r2, r3 = intra_inverse(
        k, tok0, n_valid, kh, c0, c1, c2, c3, b0, b1, b2, b3, H, K, BK, BC, PREC, SPREC, NORM,
        INV)
    if NORM:
        if head % (HV // H) == 0:
            store_token_blocks(k_rstd, tok0, n_valid, kh, r0, r1, r2, r3, H, BC)
    store_ai(ai, tok0, n_valid, head, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, HV, BT,
             BC)


def k_tile(k_dim: int) -> int:
    """K tile of the K K^T loop: 64, or the whole (padded) dim when it is smaller."""
    return min(64, pow2(k_dim))


def solve_precision(dtype: torch.dtype) -> str:
    """Dots of the triangular solve: IEEE fp32 for fp32 inputs, tf32x3 (fp32-accurate on tensor
    cores) for 16-bit inputs, whose Ai is rounded to 16 bits after the solve anyway."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def intra_tiles(dk: int, dtype: torch.dtype) -> dict:
    """Launch meta of ``_intra_kernel`` (the TILES override for sweeps). One warp per program
    for 16-bit inputs: the 16 x 16 blocks then live in one warp, nothing is replicated across
    warps and every reduction stays in the warp (H200, Qwen3.5 shape: 0.25 ms against 0.46 with
    2 warps and 0.95 with 4); fp32 inputs (IEEE dots in registers) keep 4 warps."""
    fp32 = dtype == torch.float32
    return {**dict(BK=k_tile(dk), INV=1, SPREC=solve_precision(dtype),
                   num_warps=4 if fp32 else 1), **TILES}


#: tuning override of :func:`intra_tiles` (e.g. {"INV": 0, "num_warps": 2}); empty by default
TILES: dict = {}


def launch_intra(k, g_or_gc, beta, p, *, from_g: bool, ai_dtype: torch.dtype, l2norm: bool,
                 zero_ai: bool = False):
    """(gc fp32 [T, HV], Ai [T, HV, BT] in ``ai_dtype``, k_rstd fp32 [T, H] or None) on packed
    contiguous tensors and a device plan (no checks). ``from_g``: g_or_gc is g and gc is
    computed (else it is gc, read). Rows past cu_seqlens[N] and the upper blocks of Ai are
    not written (``zero_ai``: Ai starts as zeros, for the stage contract)."""
    t, h, dk = k.shape
    hv = beta.shape[1]
    dev = k.device
    gc = torch.empty(t, hv, dtype=torch.float32, device=dev) if from_g else g_or_gc
    ai = (torch.zeros if zero_ai else torch.empty)(t, hv, BT, dtype=ai_dtype, device=dev)
    k_rstd = torch.empty(t, h, dtype=torch.float32, device=dev) if l2norm else dummy(dev)
    launch(_intra_kernel, (p.padded_chunks * hv,), k, g_or_gc, beta, gc, ai, k_rstd,
           p.cu_seqlens, p.chunk_indices, H=h, HV=hv, K=dk, BT=BT, BC=BC,
           PREC=dot_precision(k.dtype), FROM_G=from_g,
           NORM=l2norm, **intra_tiles(dk, k.dtype))
    return gc, ai, (k_rstd if l2norm else None)


def chunk_inverse(k: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor, plan) -> torch.Tensor:
    """Ai [T, HV, BT] fp32 from k [T, H, K], beta and gc [T, HV] (a leading 1 is allowed).

    Row t holds row r of its chunk's (I + A)^-1 (r = the token's position in its chunk); columns
    past the chunk's length and rows past cu_seqlens[N] are 0.
    """
    check_device(k, interpreted(_intra_kernel), beta=beta, gc=gc)
    k, beta, gc = packed(k, 2), packed(beta, 1), packed(gc, 1)
    p = device_plan(plan, k.device)
    return launch_intra(k, gc, beta, p, from_g=False, ai_dtype=torch.float32, l2norm=False,
                        zero_ai=True)[1]
