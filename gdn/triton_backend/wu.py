"""Stage 3: the WY representation ``w = Ai diag(beta exp(gc)) K`` and ``u = Ai diag(beta) V``.

w [T, HV, K] and u [T, HV, V] are stored in the input dtype (like FLA); the products take
Ai and the scaled K / V in the input dtype on tensor cores with fp32 accumulation (fp32 inputs:
IEEE fp32 dots).

Two entry points share the device code:

- :func:`wu` (the stage on its own) reads Ai from memory;
- :func:`prepare` (the chain's first kernel) fuses stages 1 to 3: it computes gc, keeps Ai in
  registers and writes only gc, w and u (and Ai when asked, for the stage comparison). Nothing
  of size [T, HV, BT] travels through memory on the fast path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BC, BT, check_device, chunk_program, device_fn, device_plan, dot_precision,
                      dummy, interpreted, launch, load_rows4, mma, packed, pow2, store_rows4,
                      to_dt)
from .cumsum import gate_cumsum, load_token_blocks, store_token_blocks
from .intra import intra_inverse, k_tile, load_ai, store_ai

__all__ = ["wu", "prepare"]


@device_fn
def _lower_times(y00, y10, y11, y20, y21, y22, y30, y31, y32, y33, z0, z1, z2, z3,
                 PREC: tl.constexpr):
    """The block-lower-triangular Y (4 x 4 blocks of 16) times Z given as four row blocks."""
    r0 = mma(y00, z0, tl.zeros([z0.shape[0], z0.shape[1]], dtype=tl.float32), PREC)
    r1 = mma(y11, z1, mma(y10, z0, tl.zeros_like(r0), PREC), PREC)
    r2 = mma(y22, z2, mma(y21, z1, mma(y20, z0, tl.zeros_like(r0), PREC), PREC), PREC)
    r3 = mma(y33, z3, mma(y32, z2, mma(y31, z1, mma(y30, z0, tl.zeros_like(r0), PREC), PREC),
                          PREC), PREC)
    return r0, r1, r2, r3


@device_fn
def wu_from_blocks(x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, k, v, w, u, tok0, n_valid,
                   head, c0, c1, c2, c3, b0, b1, b2, b3, r0, r1, r2, r3, H: tl.constexpr,
                   HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """w and u of one chunk and v head from the ten blocks of its Ai (fp32, in registers).

    r*: 1 / ||k|| of the chunk's tokens (ones without use_qk_l2norm), folded into the row
    scale of K with beta and exp(gc) before the rounding to the input dtype.
    """
    dt = w.dtype.element_ty
    y00 = to_dt(x00, dt)
    y10 = to_dt(x10, dt)
    y11 = to_dt(x11, dt)
    y20 = to_dt(x20, dt)
    y21 = to_dt(x21, dt)
    y22 = to_dt(x22, dt)
    y30 = to_dt(x30, dt)
    y31 = to_dt(x31, dt)
    y32 = to_dt(x32, dt)
    y33 = to_dt(x33, dt)
    kh = head // (HV // H)
    e0 = (b0 * tl.exp(c0) * r0)[:, None]
    e1 = (b1 * tl.exp(c1) * r1)[:, None]
    e2 = (b2 * tl.exp(c2) * r2)[:, None]
    e3 = (b3 * tl.exp(c3) * r3)[:, None]
    for k_lo in range(0, K, BK):
        k0, k1, k2, k3 = load_rows4(k, tok0, n_valid, kh, H, K, k_lo, BK, BC)
        w0, w1, w2, w3 = _lower_times(
            y00, y10, y11, y20, y21, y22, y30, y31, y32, y33, to_dt(k0 * e0, dt),
            to_dt(k1 * e1, dt), to_dt(k2 * e2, dt), to_dt(k3 * e3, dt), PREC)
        store_rows4(w, tok0, n_valid, head, w0, w1, w2, w3, HV, K, k_lo, BK, BC)
    for v_lo in range(0, V, BV):
        v0, v1, v2, v3 = load_rows4(v, tok0, n_valid, head, HV, V, v_lo, BV, BC)
        u0, u1, u2, u3 = _lower_times(
            y00, y10, y11, y20, y21, y22, y30, y31, y32, y33, to_dt(v0 * b0[:, None], dt),
            to_dt(v1 * b1[:, None], dt), to_dt(v2 * b2[:, None], dt), to_dt(v3 * b3[:, None], dt),
            PREC)
        store_rows4(u, tok0, n_valid, head, u0, u1, u2, u3, HV, V, v_lo, BV, BC)


@triton.jit
def _wu_kernel(k, v, beta, gc, ai, w, u, cu_seqlens, chunk_indices, H: tl.constexpr,
               HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    _, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, 1, BT)
    if seq < 0:
        return
    c0, c1, c2, c3 = load_token_blocks(gc, tok0, n_valid, head, HV, BC)
    b0, b1, b2, b3 = load_token_blocks(beta, tok0, n_valid, head, HV, BC)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33 = load_ai(ai, tok0, n_valid, head, HV, BT, BC)
    one = tl.full([BC], 1.0, dtype=tl.float32)
    wu_from_blocks(x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, k, v, w, u, tok0, n_valid,
                   head, c0, c1, c2, c3, b0, b1, b2, b3, one, one, one, one, H, HV, K, V, BK, BV,
                   BC, PREC)


@triton.jit
def _prepare_kernel(k, v, g, beta, gc, ai, w, u, k_rstd, cu_seqlens, chunk_indices,
                    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr, STORE_AI: tl.constexpr, NORM: tl.constexpr):
    """Stages 1-3 fused, one program per (chunk row, v head): gc, Ai (registers), w, u; with
    ``NORM`` (use_qk_l2norm) also 1 / ||k|| [T, H] for the later kernels (the first v head of
    each k head writes it)."""
    _, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, 1, BT)
    if seq < 0:
        return
    c0, c1, c2, c3 = gate_cumsum(g, gc, tok0, n_valid, head, HV, BC)
    b0, b1, b2, b3 = load_token_blocks(beta, tok0, n_valid, head, HV, BC)
    kh = head // (HV // H)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, r0, r1, r2, r3 = intra_inverse(
        k, tok0, n_valid, kh, c0, c1, c2, c3, b0, b1, b2, b3, H, K, BK, BC, PREC, NORM)
    if NORM:
        if head % (HV // H) == 0:
            store_token_blocks(k_rstd, tok0, n_valid, kh, r0, r1, r2, r3, H, BC)
    if STORE_AI:
        store_ai(ai, tok0, n_valid, head, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33,
                 HV, BT, BC)
    wu_from_blocks(x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, k, v, w, u, tok0, n_valid,
                   head, c0, c1, c2, c3, b0, b1, b2, b3, r0, r1, r2, r3, H, HV, K, V, BK, BV, BC,
                   PREC)


def _meta(k: torch.Tensor, v: torch.Tensor) -> dict:
    """K / V tiles of 64 for the w / u products, 4 warps (the TILES override for sweeps)."""
    dv = v.shape[-1]
    meta = {**dict(BT=BT, BC=BC, BK=k_tile(k.shape[-1]), BV=64, PREC=dot_precision(k.dtype),
                   num_warps=4), **TILES}
    meta["BV"] = min(meta["BV"], pow2(dv))
    return meta


#: tuning override of the prepare / wu launch (e.g. {"num_warps": 8}); empty by default
TILES: dict = {}


def wu(k, v, beta, gc, ai, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [T, HV, K], u [T, HV, V]) in k's dtype from k [T, H, K], v [T, HV, V], beta, gc [T, HV]
    and Ai [T, HV, BT] (a leading 1 is allowed). Rows past cu_seqlens[N] are 0."""
    check_device(k, interpreted(_wu_kernel), v=v, beta=beta, gc=gc, Ai=ai)
    k, v, beta, gc, ai = packed(k, 2), packed(v, 2), packed(beta, 1), packed(gc, 1), packed(ai, 2)
    t, h, dk = k.shape
    hv, dv = v.shape[1:]
    p = device_plan(plan, k.device)
    w = torch.zeros(t, hv, dk, dtype=k.dtype, device=k.device)
    u = torch.zeros(t, hv, dv, dtype=k.dtype, device=k.device)
    launch(_wu_kernel, (p.padded_chunks * hv,), k, v, beta, gc, ai, w, u, p.cu_seqlens,
           p.chunk_indices, H=h, HV=hv, K=dk, V=dv, **_meta(k, v))
    return w, u


def prepare(k, v, g, beta, plan, *, store_ai: bool = False, l2norm: bool = False):
    """Stages 1-3 in one launch: (gc fp32 [T, HV], Ai fp32 [T, HV, BT] or None, w, u,
    k_rstd fp32 [T, H] or None).

    Packed tensors (a leading 1 is allowed). Ai is written only with ``store_ai`` (a separate
    compilation, for the stage comparison). ``l2norm``: k is raw, normalized in the kernel
    (w, u are those of the normalized k) and 1 / ||k|| is returned for the later stages.
    Rows of tokens past cu_seqlens[N] are not written.
    """
    check_device(k, interpreted(_prepare_kernel), v=v, g=g, beta=beta)
    k, v, g, beta = packed(k, 2), packed(v, 2), packed(g, 1), packed(beta, 1)
    return launch_prepare(k, v, g, beta, device_plan(plan, k.device), bool(store_ai),
                          bool(l2norm))


def launch_prepare(k, v, g, beta, p, store_ai: bool, l2norm: bool):
    """:func:`prepare` on packed contiguous tensors and a device plan (no checks: the chain's)."""
    t, h, dk = k.shape
    hv, dv = v.shape[1:]
    dev = k.device
    gc = torch.empty(t, hv, dtype=torch.float32, device=dev)
    ai = torch.zeros(t, hv, BT, dtype=torch.float32, device=dev) if store_ai else dummy(dev)
    w = torch.empty(t, hv, dk, dtype=k.dtype, device=dev)
    u = torch.empty(t, hv, dv, dtype=k.dtype, device=dev)
    k_rstd = torch.empty(t, h, dtype=torch.float32, device=dev) if l2norm else dummy(dev)
    launch(_prepare_kernel, (p.padded_chunks * hv,), k, v, g, beta, gc, ai, w, u, k_rstd,
           p.cu_seqlens, p.chunk_indices, H=h, HV=hv, K=dk, V=dv, STORE_AI=store_ai,
           NORM=l2norm, **_meta(k, v))
    return gc, (ai if store_ai else None), w, u, (k_rstd if l2norm else None)
