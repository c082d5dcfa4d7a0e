"""Stages 1-2: gc and Ai = (I + A)^-1 per chunk and v head (FLA's cumsum + scaled_dot_kkt +
solve_tril in one kernel, like the Triton backend's ``_intra_kernel``).

    A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s)   for s < r < L, else 0   (strictly lower)

(with use_qk_l2norm, k_r . k_s is scaled by 1/||k_r|| 1/||k_s||: q and k are never rewritten).
The 64 x 64 chunk is handled as 4 x 4 blocks of 16 rows, all in registers: the 10 lower blocks of
A come from 16-row tiles of k (dots in the input dtype, fp32 accumulation); each 16 x 16 diagonal
block is inverted by forward substitution in fp32 (elementwise reductions: exact order of a
triangular solve); the off-diagonal blocks of the inverse follow from
X_ij = -X_ii sum_{j<=m<i} A_im X_mj with dots at the solve precision (kernel_utils.
solve_precision: IEEE for fp32 inputs, tf32x3 for 16-bit ones). The exponent is selected to 0
outside the kept entries before exp (exp(+big) * 0 is NaN). Rows r >= L of a partial chunk are
zero in A, so the inverse is the identity there and never mixes into valid rows; only rows r < L
are stored.

:func:`intra_inverse`, grid (NT_pad, HV): the chain's first kernel (``from_g``: computes gc from
g and stores it too; Ai stored in the input dtype, which the w / u products round it to anyway)
and the stage on its own (reads gc; Ai fp32, the stage contract).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .cumsum import gate_blocks, store_sub
from .kernel_utils import (BC, BT, NB, compiler_params, dim_tile, iota, load, load_sub, mdot_t,
                           on_chunk_row, pl, sdot, solve_precision, store)


def a_blocks(k_ref, t0, hk, masks, gs, bs, rks, kdim: int, fp32: bool):
    """{(i, j): A block} for j <= i, fp32 [BC, BC]. gs, bs, rks: sub-block vectors (rks None
    without l2norm)."""
    kp = dim_tile(kdim)
    kmask = iota(kp)[None, :] < kdim
    ks = [load(k_ref.at[pl.ds(t0 + i * BC, BC), hk, pl.ds(0, kp)], m[:, None] & kmask)
          for i, m in enumerate(masks)]
    lower = iota(BC)[:, None] > iota(BC)[None, :]
    a = {}
    for i in range(NB):
        for j in range(i + 1):
            keep = masks[i][:, None] & masks[j][None, :]
            if i == j:
                keep = keep & lower
            kk = mdot_t(ks[i], ks[j], fp32, contract=1)
            if rks is not None:
                kk = kk * rks[i][:, None] * rks[j][None, :]
            diff = jnp.where(keep, gs[i][:, None] - gs[j][None, :], 0.0)
            a[i, j] = jnp.where(keep, kk * bs[i][:, None] * jnp.exp(diff), 0.0)
    return a


def _unit_lower_inverses(blocks):
    """(I + a)^-1 of strictly lower [BC, BC] fp32 tiles, by forward substitution (rows in order).

    Row i of X = e_i - sum_{j<i} a_ij X_j; rows j < i are final when row i is computed.
    """
    r = iota(BC)
    eye = (r[:, None] == r[None, :]).astype(jnp.float32)

    def body(i, xs):
        sel = r[:, None] == i
        out = []
        for a, x in zip(blocks, xs):
            ai = jnp.sum(jnp.where(sel, a, 0.0), axis=0)  # row i of a
            xi = jnp.sum(ai[:, None] * x, axis=0)  # sum_j a_ij X_j
            out.append(jnp.where(sel, x - xi[None, :], x))
        return tuple(out)

    return lax.fori_loop(1, BC, body, tuple(eye for _ in blocks))


def inverse_blocks(a, precision):
    """{(i, j): block of (I + A)^-1} for j <= i, fp32, from the blocks of :func:`a_blocks`;
    the off-diagonal merges at ``precision`` (kernel_utils.solve_precision)."""
    x = dict(zip([(i, i) for i in range(NB)], _unit_lower_inverses([a[i, i] for i in range(NB)])))
    for i in range(1, NB):
        for j in range(i - 1, -1, -1):
            acc = sdot(a[i, j], x[j, j], precision)
            for m in range(j + 1, i):
                acc = acc + sdot(a[i, m], x[m, j], precision)
            x[i, j] = -sdot(x[i, i], acc, precision)
    return x


def store_ai(ai_ref, t0, head, masks, x):
    zero = jnp.zeros((BC, BC), jnp.float32)
    for i in range(NB):
        for j in range(NB):
            store(ai_ref.at[pl.ds(t0 + i * BC, BC), head, pl.ds(j * BC, BC)],
                  x[i, j] if j <= i else zero, masks[i][:, None])


def intra_inverse(k, gc, beta, k_rstd, plan, *, num_v_heads: int, interpret: bool,
                  from_g: bool = False, ai_dtype=jnp.float32, num_warps: int | None = None):
    """k [T, H, K] (input dtype); gc (or g with ``from_g``), beta [T, HV] fp32; k_rstd [T, H]
    fp32 or None -> Ai [T, HV, BT] in ``ai_dtype`` (with ``from_g``: (gc fp32, Ai)).

    ``num_warps`` default: 1 for 16-bit inputs (the 16 x 16 blocks live in one warp: nothing
    replicated across warps, every reduction inside the warp; the Triton backend's kernel runs
    4x faster so on the H200), 4 for fp32 inputs (IEEE dots in registers)."""
    n_tok, hh, kdim = k.shape
    hv = num_v_heads
    grp = hv // hh
    fp32 = k.dtype == jnp.float32
    if num_warps is None:
        num_warps = 4 if fp32 else 1
    prec = solve_precision(fp32, interpret)
    l2 = k_rstd is not None

    def kernel(ci_ref, cu_ref, k_ref, g_ref, b_ref, *rest):
        rest = list(rest)
        rk_ref = rest.pop(0) if l2 else None
        gc_ref = rest.pop(0) if from_g else None
        ai_ref = rest[0]

        def body(t0, head, masks):
            hk = head // grp
            if from_g:
                gs = gate_blocks(g_ref, t0, head, masks)
                store_sub(gc_ref, t0, head, masks, gs)
            else:
                gs = load_sub(g_ref, t0, head, masks)
            bs = load_sub(b_ref, t0, head, masks)
            rks = load_sub(rk_ref, t0, hk, masks) if l2 else None
            a = a_blocks(k_ref, t0, hk, masks, gs, bs, rks, kdim, fp32)
            store_ai(ai_ref, t0, head, masks, inverse_blocks(a, prec))

        on_chunk_row(ci_ref, cu_ref, body)

    ins = [plan.chunk_indices, plan.cu_seqlens, k, gc, beta] + ([k_rstd] if l2 else [])
    out_shape = [jax.ShapeDtypeStruct((n_tok, hv, BT), ai_dtype)]
    if from_g:
        out_shape.insert(0, jax.ShapeDtypeStruct((n_tok, hv), jnp.float32))
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(plan.padded_chunks, hv), interpret=interpret,
        compiler_params=compiler_params(num_warps=num_warps), name="gdn_intra_inverse",
    )(*ins)
    return tuple(outs) if from_g else outs[0]
