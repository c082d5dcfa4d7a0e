"""Stages 1-2: gc and Ai = (I + A)^-1 per chunk and v head (FLA's cumsum + scaled_dot_kkt +
solve_tril in one kernel, like the Triton backend's ``_intra_kernel``).

    A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s)   for s < r < L, else 0   (strictly lower)

(with use_qk_l2norm, k_r . k_s is scaled by 1/||k_r|| 1/||k_s||: q and k are never rewritten).
The 64 x 64 chunk is handled as 4 x 4 blocks of 16 rows, all in registers: the 10 lower blocks of
A come from 16-row tiles of k (dots in the input dtype, fp32 accumulation over K tiles of BK
columns); each 16 x 16 diagonal block is inverted by forward substitution in fp32 (elementwise
reductions: exact order of a triangular solve); the off-diagonal blocks of the inverse follow from
X_ij = -X_ii sum_{j<=m<i} A_im X_mj with dots at the solve precision (kernel_utils.
solve_precision: IEEE for fp32 inputs, tf32x3 for 16-bit ones). The exponent is selected to 0
outside the kept entries before exp (exp(+big) * 0 is NaN). Rows r >= L of a partial chunk are
zero in A, so the inverse is the identity there and never mixes into valid rows; only rows r < L
are stored.

:func:`intra_inverse`, one program per (chunk row, v head), launched like the Triton backend's
``_intra_kernel`` (:func:`intra_tiles`): the chain's first kernel (``from_g``: computes gc from
g and stores it too; Ai stored in the input dtype, which the w / u products round it to anyway)
and the stage on its own (reads gc; Ai fp32, the stage contract).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .cumsum import gate_blocks, store_sub
from .kernel_utils import (BC, BT, NB, compiler_params, dim_tile, grid_of, iota, load, load_sub,
                           mdot_t, on_chunk_row, pl, sdot, solve_precision, store, tile_loop, tiles)

#: launch overrides of :func:`intra_inverse` over :func:`intra_tiles` (keys BK, num_warps,
#: num_stages, order, loop), for sweeps; empty by default. Read at trace time (see kernel_utils).
TILES: dict = {}


def intra_tiles(kdim: int, fp32: bool) -> dict:
    """Launch meta of :func:`intra_inverse`, the Triton backend's ``intra_tiles`` defaults
    (2026-11-28, H200, H=16 HV=32 K=V=128 bf16, this kernel 0.358 ms against the Triton one's
    0.252 at every layout): K K^T over K tiles of BK = 64 columns (halves the live k tiles next
    to the ten A blocks) in a pipelined loop, Triton's default 3 stages; one warp for 16-bit
    inputs (the 16 x 16 blocks live in one warp: nothing replicated across warps, every reduction
    inside the warp; Triton backend 0.25 ms against 0.46 with 2 warps and 0.95 with 4), 4 for
    fp32 inputs (IEEE dots in registers); the Triton program order (kernel_utils.ORDERS)."""
    meta = tiles(dict(BK=64, num_warps=4 if fp32 else 1, num_stages=3, order="triton",
                      loop=True), TILES, "intra")
    meta["BK"] = min(meta["BK"], dim_tile(kdim))
    return meta


def kkt_blocks(k_ref, t0, hk, masks, kdim: int, fp32: bool, bk: int, loop: bool):
    """The ten lower [BC, BC] blocks of K K^T (fp32) of one chunk, {(i, j): block} for j <= i,
    summed over K tiles of ``bk`` columns (kernel_utils.tile_loop; the k tiles feed dots only)."""
    kp = dim_tile(kdim)
    keys = [(i, j) for i in range(NB) for j in range(i + 1)]

    def tile(c, acc):
        c0 = c * bk
        kmask = c0 + iota(bk) < kdim
        ks = [load(k_ref.at[pl.ds(t0 + i * BC, BC), hk, pl.ds(c0, bk)], m[:, None] & kmask[None, :])
              for i, m in enumerate(masks)]
        return tuple(a + mdot_t(ks[i], ks[j], fp32, contract=1) for a, (i, j) in zip(acc, keys))

    zero = jnp.zeros((BC, BC), jnp.float32)
    return dict(zip(keys, tile_loop(kp // bk, tile, tuple(zero for _ in keys), loop)))


def a_blocks(kk, masks, gs, bs, rks):
    """{(i, j): A block} for j <= i, fp32 [BC, BC], from the K K^T blocks ``kk``. gs, bs, rks:
    sub-block vectors (rks None without l2norm)."""
    lower = iota(BC)[:, None] > iota(BC)[None, :]
    a = {}
    for (i, j), kij in kk.items():
        keep = masks[i][:, None] & masks[j][None, :]
        if i == j:
            keep = keep & lower
        if rks is not None:
            kij = kij * rks[i][:, None] * rks[j][None, :]
        diff = jnp.where(keep, gs[i][:, None] - gs[j][None, :], 0.0)
        a[i, j] = jnp.where(keep, kij * bs[i][:, None] * jnp.exp(diff), 0.0)
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
                  from_g: bool = False, ai_dtype=jnp.float32):
    """k [T, H, K] (input dtype); gc (or g with ``from_g``), beta [T, HV] fp32; k_rstd [T, H]
    fp32 or None -> Ai [T, HV, BT] in ``ai_dtype`` (with ``from_g``: (gc fp32, Ai))."""
    n_tok, hh, kdim = k.shape
    hv = num_v_heads
    grp = hv // hh
    fp32 = k.dtype == jnp.float32
    meta = intra_tiles(kdim, fp32)
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
            kk = kkt_blocks(k_ref, t0, hk, masks, kdim, fp32, meta["BK"], meta["loop"])
            a = a_blocks(kk, masks, gs, bs, rks)
            store_ai(ai_ref, t0, head, masks, inverse_blocks(a, prec))

        on_chunk_row(ci_ref, cu_ref, body, meta["order"])

    ins = [plan.chunk_indices, plan.cu_seqlens, k, gc, beta] + ([k_rstd] if l2 else [])
    out_shape = [jax.ShapeDtypeStruct((n_tok, hv, BT), ai_dtype)]
    if from_g:
        out_shape.insert(0, jax.ShapeDtypeStruct((n_tok, hv), jnp.float32))
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=grid_of((plan.padded_chunks, hv), meta["order"]),
        interpret=interpret, compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]),
        name="gdn_intra_inverse",
    )(*ins)
    return tuple(outs) if from_g else outs[0]
