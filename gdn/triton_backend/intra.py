"""Stage 2: the intra-chunk matrix and its inverse, ``Ai = (I + A)^-1`` (fp32 [T, HV, BT]).

    A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s)   for r > s (strictly lower), else 0

Computed per (chunk, v head) in registers as 4 x 4 blocks of 16 x 16 (the ten lower ones):

1. ``K K^T`` blocks accumulate over K tiles (tensor-core dots in the input dtype; IEEE fp32
   for fp32 inputs), then the gate and beta scale them. The upper triangle of a diagonal block
   is selected away before the exponential (its exponent is positive).
2. The four diagonal blocks are inverted together by forward substitution, row by row in
   fp32: row r of X = (I + a)^-1 is e_r - sum_{s<r} a_rs X_s (rows s < r are final already),
   the sum taken as row r of the IEEE fp32 product a X.
3. The off-diagonal blocks follow from X_ij = -X_ii sum_{j<=m<i} A_im X_mj with IEEE fp32 dots
   (never TF32: the solve is where the fp32 error would grow).

``intra_inverse`` returns the ten blocks to a caller that keeps them in registers (the fused
``prepare`` kernel); the standalone stage stores them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BC, BT, check_device, chunk_program, device_fn, device_plan, dot_precision,
                      interpreted, launch, load_rows4, mma, packed, pow2)
from .cumsum import load_token_blocks

__all__ = ["intra_inverse", "store_ai", "load_ai", "chunk_inverse"]


@device_fn
def kkt_blocks(k, tok0, n_valid, kh, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
               BC: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr):
    """The ten lower 16 x 16 blocks of K K^T of one chunk (fp32), summed over K tiles, and the
    four [BC] blocks of 1 / ||k|| (``NORM``, use_qk_l2norm: sqrt(sum k^2 + 1e-6), from the
    same loads; else ones)."""
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
    s0 = tl.zeros([BC], dtype=tl.float32)
    s1 = tl.zeros([BC], dtype=tl.float32)
    s2 = tl.zeros([BC], dtype=tl.float32)
    s3 = tl.zeros([BC], dtype=tl.float32)
    for k_lo in range(0, K, BK):
        k0, k1, k2, k3 = load_rows4(k, tok0, n_valid, kh, H, K, k_lo, BK, BC)
        if NORM:
            s0 += tl.sum(k0.to(tl.float32) * k0.to(tl.float32), 1)
            s1 += tl.sum(k1.to(tl.float32) * k1.to(tl.float32), 1)
            s2 += tl.sum(k2.to(tl.float32) * k2.to(tl.float32), 1)
            s3 += tl.sum(k3.to(tl.float32) * k3.to(tl.float32), 1)
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
    return (a00, a10, a11, a20, a21, a22, a30, a31, a32, a33, rstd(s0, NORM), rstd(s1, NORM),
            rstd(s2, NORM), rstd(s3, NORM))


@device_fn
def rstd(sum_sq, NORM: tl.constexpr):
    """1 / sqrt(sum x^2 + 1e-6), the l2norm factor of gdn.reference.l2norm (ones if not NORM)."""
    if NORM:
        return 1.0 / tl.sqrt_rn(sum_sq + 1e-6)
    else:
        return sum_sq * 0.0 + 1.0


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
def _mm(a, b, acc):
    return tl.dot(a, b, acc, input_precision="ieee")


@device_fn
def _invert_diagonal(a0, a1, a2, a3, BC: tl.constexpr):
    """(I + a)^-1 of four strictly lower 16 x 16 blocks, by forward substitution in fp32.

    Step r sets row r of X to e_r - sum_{s<r} a_rs X_s, which is row r of X - a X: rows s < r
    of X are final and a_rs = 0 for s >= r, so the IEEE fp32 product a X gives exactly the
    substitution sum. The four independent substitutions share one loop.
    """
    i = tl.arange(0, BC)
    eye = (i[:, None] == i[None, :]).to(tl.float32)
    x0 = eye
    x1 = eye
    x2 = eye
    x3 = eye
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for r in range(1, BC):
        sel = i[:, None] == r
        x0 = tl.where(sel, x0 - _mm(a0, x0, zero), x0)
        x1 = tl.where(sel, x1 - _mm(a1, x1, zero), x1)
        x2 = tl.where(sel, x2 - _mm(a2, x2, zero), x2)
        x3 = tl.where(sel, x3 - _mm(a3, x3, zero), x3)
    return x0, x1, x2, x3


@device_fn
def intra_inverse(k, tok0, n_valid, kh, c0, c1, c2, c3, b0, b1, b2, b3, H: tl.constexpr,
                  K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
                  NORM: tl.constexpr):
    """The ten lower 16 x 16 blocks X_ij (fp32) of (I + A)^-1 of one chunk and v head, and the
    chunk's 1 / ||k|| in four [BC] blocks (``NORM``: k is normalized on the fly, in fp32, as
    row and column scales of K K^T; else ones).

    c*, b*: the chunk's gc and beta in four [BC] blocks (0 past the end of the sequence).
    """
    a00, a10, a11, a20, a21, a22, a30, a31, a32, a33, r0, r1, r2, r3 = kkt_blocks(
        k, tok0, n_valid, kh, H, K, BK, BC, PREC, NORM)
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
    x00, x11, x22, x33 = _invert_diagonal(a00, a11, a22, a33, BC)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    # X_ij = -X_ii (sum_{m=j}^{i-1} A_im X_mj), first diagonal, then the next ones
    x10 = -_mm(x11, _mm(a10, x00, zero), zero)
    x21 = -_mm(x22, _mm(a21, x11, zero), zero)
    x32 = -_mm(x33, _mm(a32, x22, zero), zero)
    x20 = -_mm(x22, _mm(a21, x10, _mm(a20, x00, zero)), zero)
    x31 = -_mm(x33, _mm(a32, x21, _mm(a31, x11, zero)), zero)
    x30 = -_mm(x33, _mm(a32, x20, _mm(a31, x10, _mm(a30, x00, zero))), zero)
    return x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, r0, r1, r2, r3


@device_fn
def store_ai(ai, tok0, n_valid, head, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33,
             HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The ten lower blocks into Ai [T, HV, BT] (valid rows; the upper blocks stay as they are)."""
    i = tl.arange(0, BC)
    p = ai + ((tok0 + i) * HV + head)[:, None] * BT + i[None, :]
    step = BC * HV * BT  # 16 rows further
    m0 = (i < n_valid)[:, None]
    m1 = (i + BC < n_valid)[:, None]
    m2 = (i + 2 * BC < n_valid)[:, None]
    m3 = (i + 3 * BC < n_valid)[:, None]
    tl.store(p, x00, mask=m0)
    tl.store(p + step, x10, mask=m1)
    tl.store(p + step + BC, x11, mask=m1)
    tl.store(p + 2 * step, x20, mask=m2)
    tl.store(p + 2 * step + BC, x21, mask=m2)
    tl.store(p + 2 * step + 2 * BC, x22, mask=m2)
    tl.store(p + 3 * step, x30, mask=m3)
    tl.store(p + 3 * step + BC, x31, mask=m3)
    tl.store(p + 3 * step + 2 * BC, x32, mask=m3)
    tl.store(p + 3 * step + 3 * BC, x33, mask=m3)


@device_fn
def load_ai(ai, tok0, n_valid, head, HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The ten lower blocks of one chunk's Ai (fp32; rows past the end read as 0)."""
    i = tl.arange(0, BC)
    p = ai + ((tok0 + i) * HV + head)[:, None] * BT + i[None, :]
    step = BC * HV * BT
    m0 = (i < n_valid)[:, None]
    m1 = (i + BC < n_valid)[:, None]
    m2 = (i + 2 * BC < n_valid)[:, None]
    m3 = (i + 3 * BC < n_valid)[:, None]
    x00 = tl.load(p, mask=m0, other=0.0).to(tl.float32)
    x10 = tl.load(p + step, mask=m1, other=0.0).to(tl.float32)
    x11 = tl.load(p + step + BC, mask=m1, other=0.0).to(tl.float32)
    x20 = tl.load(p + 2 * step, mask=m2, other=0.0).to(tl.float32)
    x21 = tl.load(p + 2 * step + BC, mask=m2, other=0.0).to(tl.float32)
    x22 = tl.load(p + 2 * step + 2 * BC, mask=m2, other=0.0).to(tl.float32)
    x30 = tl.load(p + 3 * step, mask=m3, other=0.0).to(tl.float32)
    x31 = tl.load(p + 3 * step + BC, mask=m3, other=0.0).to(tl.float32)
    x32 = tl.load(p + 3 * step + 2 * BC, mask=m3, other=0.0).to(tl.float32)
    x33 = tl.load(p + 3 * step + 3 * BC, mask=m3, other=0.0).to(tl.float32)
    return x00, x10, x11, x20, x21, x22, x30, x31, x32, x33


@triton.jit
def _intra_kernel(k, beta, gc, ai, cu_seqlens, chunk_indices, H: tl.constexpr,
                  HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  BK: tl.constexpr, PREC: tl.constexpr):
    _, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, 1, BT)
    if seq < 0:
        return
    c0, c1, c2, c3 = load_token_blocks(gc, tok0, n_valid, head, HV, BC)
    b0, b1, b2, b3 = load_token_blocks(beta, tok0, n_valid, head, HV, BC)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, _, _, _, _ = intra_inverse(
        k, tok0, n_valid, head // (HV // H), c0, c1, c2, c3, b0, b1, b2, b3, H, K, BK, BC, PREC,
        False)
    store_ai(ai, tok0, n_valid, head, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, HV, BT, BC)


def k_tile(k_dim: int) -> int:
    """K tile of the intra/wu loops: 64, or the whole (padded) dim when it is smaller."""
    return min(64, pow2(k_dim))


def chunk_inverse(k: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor, plan) -> torch.Tensor:
    """Ai [T, HV, BT] fp32 from k [T, H, K], beta and gc [T, HV] (a leading 1 is allowed).

    Row t holds row r of its chunk's (I + A)^-1 (r = the token's position in its chunk); columns
    past the chunk's length and rows past cu_seqlens[N] are 0.
    """
    check_device(k, interpreted(_intra_kernel), beta=beta, gc=gc)
    k, beta, gc = packed(k, 2), packed(beta, 1), packed(gc, 1)
    t, h, dk = k.shape
    hv = beta.shape[1]
    p = device_plan(plan, k.device)
    ai = torch.zeros(t, hv, BT, dtype=torch.float32, device=k.device)
    launch(_intra_kernel, (p.padded_chunks * hv,), k, beta, gc, ai, p.cu_seqlens,
           p.chunk_indices, H=h, HV=hv, K=dk, BT=BT, BC=BC, BK=k_tile(dk),
           PREC=dot_precision(k.dtype), num_warps=4)
    return ai
