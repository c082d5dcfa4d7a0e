"""Stage 5: the output, one program per (chunk row, v head, V tile):

    o = scale * ( exp(gc) * (Q h) + ((Q K^T) * exp(gc_r - gc_s) * [r >= s]) v_new )

Q h and Q K^T accumulate over K tiles in fp32 (input-dtype tensor-core dots; IEEE fp32 for
fp32 inputs). The causal, gated Q K^T (fp32) is rounded to the input dtype for its product with
v_new, like FLA (``HILO``, off by default: it enters as two 16-bit operands, its rounding and
the rounding's error, which removes about a tenth of the bf16 output error but doubled the
kernel's time on the H200 at V tiles of 128). With use_qk_l2norm, ||q||^2 comes from the
diagonal of Q Q^T (the q tile feeds dots only: see intra.py). Exponents are selected to the
causal part before exp. Rows of tokens past a sequence's end are never stored;
sentinel chunk rows exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BT, check_device, chunk_program, device_fn, device_plan, dot_precision,
                      dummy, interpreted, launch, mma, packed, pow2, tiles, to_dt)

__all__ = ["output", "output_tiles", "chunk_output", "new_output"]


@triton.jit
def _output_kernel(q, k, v_new, h, gc, o, k_rstd, cu_seqlens, chunk_indices, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                   PREC: tl.constexpr, NORM: tl.constexpr, HILO: tl.constexpr):
    iv, head, row, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, NV, BT)
    if seq < 0:
        return
    kh = head // (HV // H)
    dt = v_new.dtype.element_ty
    rt = tl.arange(0, BT)
    rv = iv * BV + tl.arange(0, BV)
    m_t = rt < n_valid
    tok = tok0 + rt
    h_row = h + (row.to(tl.int64) * HV + head) * (K * V)

    acc = tl.zeros([BT, BV], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qq = tl.zeros([BT, BT], dtype=tl.float32)
    for k_lo in range(0, K, BK):
        rk = k_lo + tl.arange(0, BK)
        m_k = rk < K
        b_q = tl.load(q + (tok * H + kh)[:, None] * K + rk[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kt = tl.load(k + (tok * H + kh)[None, :] * K + rk[:, None],
                       mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(h_row + rk[:, None] * V + rv[None, :],
                      mask=m_k[:, None] & (rv < V)[None, :], other=0.0)
        acc = mma(b_q, b_h, acc, PREC)
        qk = mma(b_q, b_kt, qk, PREC)
        if NORM:  # ||q||^2 on the diagonal of Q Q^T: the q tile feeds dots only (intra.py)
            qq = mma(b_q, tl.trans(b_q), qq, PREC)

    b_g = tl.load(gc + tok * HV + head, mask=m_t, other=0.0)
    k_r = tl.full([BT], 1.0, dtype=tl.float32)
    if NORM:  # 1 / ||k|| from the prepare kernel
        k_r = tl.load(k_rstd + tok * H + kh, mask=m_t, other=0.0)
    p_v = (tok * HV + head)[:, None] * V + rv[None, :]
    m_tv = m_t[:, None] & (rv < V)[None, :]
    b_v = tl.load(v_new + p_v, mask=m_tv, other=0.0)
    out = chunk_output(acc, qk, gram_diag(qq, BT), b_g, k_r, b_v, m_t, scale, dt, BT, PREC, NORM,
                       HILO)
    tl.store(o + p_v, to_dt(out, o.dtype.element_ty), mask=m_tv)


@device_fn
def gram_diag(a, BT: tl.constexpr):
    """The diagonal of a [BT, BT] Gram matrix (sum x^2 of each row of x for a = x x^T)."""
    rt = tl.arange(0, BT)
    return tl.sum(tl.where(rt[:, None] == rt[None, :], a, 0.0), 1)


@device_fn
def chunk_output(qh, qk, q_sq, b_g, k_r, v_dt, m_t, scale, dt: tl.constexpr, BT: tl.constexpr,
                 PREC: tl.constexpr, NORM: tl.constexpr, HILO: tl.constexpr):
    """One chunk's o tile (fp32) from Q h and Q K^T (raw fp32 accumulations), sum q^2 (NORM),
    the chunk's gc, 1 / ||k|| (ones unless NORM) and v_new (the 16-bit values stored):

        scale * ( exp(gc) r_q (Q h) + ((Q K^T) r_q r_k^T exp(gc_r - gc_s) [r >= s]) v_new )

    ``HILO``: the gated Q K^T enters as a hi + lo pair of 16-bit operands (else rounded once,
    like FLA). Shared by the output kernel and the state pass's fused-output mode.
    """
    rt = tl.arange(0, BT)
    row_scale = tl.exp(b_g)
    if NORM:  # use_qk_l2norm: 1 / ||q|| from the q tiles the caller loaded
        q_r = 1.0 / tl.sqrt_rn(q_sq + 1e-6)
        row_scale = row_scale * q_r
        qk = qk * q_r[:, None]
    acc = qh * row_scale[:, None]
    causal = (rt[:, None] >= rt[None, :]) & m_t[:, None]
    decay = tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.0)) * k_r[None, :]
    qk = tl.where(causal, qk * decay, 0.0)
    qk_hi = to_dt(qk, dt)
    acc = mma(qk_hi, v_dt, acc, PREC)
    if HILO and dt != tl.float32:  # qk's rounding error as a second 16-bit operand
        acc = mma(to_dt(qk - qk_hi.to(tl.float32), dt), v_dt, acc, PREC)
    return acc * scale


def output_tiles(dk: int, dv: int, dtype: torch.dtype) -> dict:
    """16-bit inputs: K tiles of 64, the whole V (up to 128) in one tile, so Q K^T is
    computed once per chunk and head, 8 warps, 2 pipeline stages, the gated Q K^T rounded once
    (H200, Qwen3.5 shape: 0.47 ms; 0.56 with V tiles of 64 and 4 warps; the hi + lo split costs
    0.89 ms in this configuration). fp32 inputs (IEEE dots hold their operands in registers):
    V tiles of 64, 8 warps."""
    fp32 = dtype == torch.float32
    meta = tiles(dict(BK=min(64, pow2(dk)), BV=64 if fp32 else 128, NV=0, HILO=False,
                      num_warps=8, num_stages=2), TILES, dv)
    meta["BK"] = min(meta["BK"], pow2(dk))
    return meta


#: tuning override of :func:`output_tiles` (e.g. {"BV": 128, "num_warps": 8}); empty by default
TILES: dict = {}


def output(q, k, v_new, h, gc, plan, scale: float, *, out: torch.Tensor | None = None,
           k_rstd=None):
    """o [T, HV, V] in q's dtype from packed q, k [T, H, K], v_new [T, HV, V], h [NT, HV, K, V]
    and gc [T, HV] (a leading 1 is allowed). Rows past cu_seqlens[N] are 0.

    ``out``: a [T, HV, V] tensor to write into (its rows past cu_seqlens[N] are zeroed here).
    ``k_rstd`` [T, H] (use_qk_l2norm, from :func:`wu.prepare`): q and k are raw; q is
    normalized with the diagonal of Q Q^T, k with k_rstd, both as fp32 scales after the dots.
    """
    check_device(q, interpreted(_output_kernel), k=k, v_new=v_new, h=h, gc=gc, k_rstd=k_rstd)
    q, k, v_new, gc = packed(q, 2), packed(k, 2), packed(v_new, 2), packed(gc, 1)
    h = h if h.is_contiguous() else h.contiguous()
    return launch_output(q, k, v_new, h, gc, device_plan(plan, q.device), float(scale), out,
                         k_rstd)


def zero_tail(o: torch.Tensor, p) -> torch.Tensor:
    """Zero the rows of tokens past cu_seqlens[N] (no kernel writes them)."""
    if p.num_tokens is None:
        o.zero_()
    elif p.num_tokens < o.shape[0]:
        o[p.num_tokens:].zero_()
    return o


def new_output(q: torch.Tensor, t: int, hv: int, dv: int, p) -> torch.Tensor:
    """o [T, HV, V] in q's dtype, rows past cu_seqlens[N] zeroed."""
    return zero_tail(torch.empty(t, hv, dv, dtype=q.dtype, device=q.device), p)


def launch_output(q, k, v_new, h, gc, p, scale: float, out, k_rstd):
    """:func:`output` on packed contiguous tensors and a device plan (no checks)."""
    t, h_heads, dk = q.shape
    hv, dv = v_new.shape[1:]
    dev = q.device
    o = new_output(q, t, hv, dv, p) if out is None else zero_tail(out, p)
    meta = output_tiles(dk, dv, q.dtype)
    norm = k_rstd is not None
    launch(_output_kernel, (p.padded_chunks * hv * meta["NV"],), q, k, v_new, h, gc, o,
           k_rstd if norm else dummy(dev), p.cu_seqlens, p.chunk_indices, scale, H=h_heads,
           HV=hv, K=dk, V=dv, BT=BT, PREC=dot_precision(q.dtype), NORM=norm, **meta)
    return o
