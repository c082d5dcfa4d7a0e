"""Stage 3: the WY representation ``w = Ai diag(beta exp(gc)) K`` and ``u = Ai diag(beta) V``
(``_wu_kernel``), and :func:`prepare`, the chain's stages 1-3 (two launches: ``_intra_kernel``
of intra.py, then this one).

One program per (chunk row, v head, part): Ai is read once as a [64, 64] tile (lower triangle
masked; rounded to the input dtype), the row-scaled K and V tiles ([64, BK] / [64, BV]) are
rounded to the input dtype and multiplied on tensor cores (64-row tiles: wgmma on sm_90) with
fp32 accumulation; fp32 inputs use IEEE fp32 dots. ``NP = 1`` (default): w and u in one
program; ``NP = 2``: in separate programs (twice the programs, Ai read twice). w [T, HV, K] and
u [T, HV, V] are stored in the input dtype (like FLA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BT, check_device, chunk_program, device_fn, device_plan, dot_precision,
                      dummy, interpreted, launch, mma, packed, pow2, to_dt)
from .intra import launch_intra

__all__ = ["wu", "prepare", "launch_prepare", "wu_tiles"]


@device_fn
def _scaled_product(a_dt, src, dst, tok, m_t, hsrc, hdst, scale, NSRC: tl.constexpr,
                    HV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                    PREC: tl.constexpr):
    """dst[tok, hdst, :] = Ai (scale * src[tok, hsrc, :]) over D in tiles of BD columns."""
    dt = dst.dtype.element_ty
    for lo in range(0, D, BD):
        col = lo + tl.arange(0, BD)
        m = m_t[:, None] & (col < D)[None, :]
        x = tl.load(src + (tok * NSRC + hsrc)[:, None] * D + col[None, :], mask=m, other=0.0)
        y = mma(a_dt, to_dt(x * scale[:, None], dt), tl.zeros([BT, BD], dtype=tl.float32), PREC)
        tl.store(dst + (tok * HV + hdst)[:, None] * D + col[None, :], to_dt(y, dt), mask=m)


@triton.jit
def _wu_kernel(k, v, beta, gc, ai, w, u, k_rstd, cu_seqlens, chunk_indices, H: tl.constexpr,
               HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
               NORM: tl.constexpr):
    part, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, NP, BT)
    if seq < 0:
        return
    dt = w.dtype.element_ty
    rt = tl.arange(0, BT)
    m_t = rt < n_valid
    tok = tok0 + rt
    b_ai = tl.load(ai + (tok * HV + head)[:, None] * BT + rt[None, :],
                   mask=m_t[:, None] & (rt[None, :] <= rt[:, None]), other=0.0)
    a_dt = to_dt(b_ai, dt)
    b_b = tl.load(beta + tok * HV + head, mask=m_t, other=0.0)
    kh = head // (HV // H)
    if part == 0:
        e = b_b * tl.exp(tl.load(gc + tok * HV + head, mask=m_t, other=0.0))
        if NORM:
            e = e * tl.load(k_rstd + tok * H + kh, mask=m_t, other=0.0)
        _scaled_product(a_dt, k, w, tok, m_t, kh, head, e, H, HV, K, BK, BT, PREC)
    if NP == 1 or part == 1:
        _scaled_product(a_dt, v, u, tok, m_t, head, head, b_b, HV, HV, V, BV, BT, PREC)


def wu_tiles(dk: int, dv: int, dtype: torch.dtype) -> dict:
    """Launch meta of ``_wu_kernel``: K / V tiles of 64 columns (the whole padded dim when
    smaller), w and u in one program (H200: 0.31 ms against 0.33 in two), 4 warps; fp32
    inputs (IEEE dots in registers): tiles of 32 and 8 warps. The TILES override for sweeps."""
    fp32 = dtype == torch.float32
    meta = {**dict(BK=32 if fp32 else 64, BV=32 if fp32 else 64, NP=1,
                   num_warps=8 if fp32 else 4), **TILES}
    meta["BK"] = min(meta["BK"], pow2(dk))
    meta["BV"] = min(meta["BV"], pow2(dv))
    return meta


#: tuning override of :func:`wu_tiles` (e.g. {"NP": 1, "BK": 128}); empty by default
TILES: dict = {}


def launch_wu(k, v, beta, gc, ai, p, k_rstd, alloc=torch.empty):
    """(w, u) on packed contiguous tensors and a device plan (no checks). Rows past
    cu_seqlens[N] are not written (``alloc=torch.zeros``: they are 0)."""
    t, h, dk = k.shape
    hv, dv = v.shape[1:]
    dev = k.device
    w = alloc(t, hv, dk, dtype=k.dtype, device=dev)
    u = alloc(t, hv, dv, dtype=k.dtype, device=dev)
    meta = wu_tiles(dk, dv, k.dtype)
    norm = k_rstd is not None
    launch(_wu_kernel, (p.padded_chunks * hv * meta["NP"],), k, v, beta, gc, ai, w, u,
           k_rstd if norm else dummy(dev), p.cu_seqlens, p.chunk_indices, H=h, HV=hv, K=dk,
           V=dv, BT=BT, PREC=dot_precision(k.dtype), NORM=norm, **meta)
    return w, u


def wu(k, v, beta, gc, ai, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [T, HV, K], u [T, HV, V]) in k's dtype from k [T, H, K], v [T, HV, V], beta, gc [T, HV]
    and Ai [T, HV, BT] (any float dtype; a leading 1 is allowed). Rows past cu_seqlens[N] are
    0."""
    check_device(k, interpreted(_wu_kernel), v=v, beta=beta, gc=gc, Ai=ai)
    k, v, beta, gc, ai = packed(k, 2), packed(v, 2), packed(beta, 1), packed(gc, 1), packed(ai, 2)
    p = device_plan(plan, k.device)
    return launch_wu(k, v, beta, gc, ai, p, None, torch.zeros)


def prepare(k, v, g, beta, plan, *, store_ai: bool = False, l2norm: bool = False):
    """Stages 1-3: (gc fp32 [T, HV], Ai fp32 [T, HV, BT] or None, w, u, k_rstd fp32 [T, H] or
    None).

    Packed tensors (a leading 1 is allowed). Ai is returned only with ``store_ai`` (then kept in
    fp32, the stage contract; else it travels in the input dtype between the two launches).
    ``l2norm``: k is raw, normalized in the kernels (w, u are those of the normalized k) and
    1 / ||k|| is returned for the later stages. Rows of tokens past cu_seqlens[N] are not
    written.
    """
    check_device(k, interpreted(_wu_kernel), v=v, g=g, beta=beta)
    k, v, g, beta = packed(k, 2), packed(v, 2), packed(g, 1), packed(beta, 1)
    return launch_prepare(k, v, g, beta, device_plan(plan, k.device), bool(store_ai),
                          bool(l2norm))


def launch_prepare(k, v, g, beta, p, store_ai: bool, l2norm: bool):
    """:func:`prepare` on packed contiguous tensors and a device plan (no checks: the chain's)."""
    ai_dtype = torch.float32 if store_ai else k.dtype
    gc, ai, k_rstd = launch_intra(k, g, beta, p, from_g=True, ai_dtype=ai_dtype, l2norm=l2norm,
                                  zero_ai=store_ai)
    w, u = launch_wu(k, v, beta, gc, ai, p, k_rstd)
    return gc, (ai if store_ai else None), w, u, k_rstd
