"""Stage 5 (FLA's chunk_fwd_o): o = scale (exp(gc) (q h) + (causal(q k^T) * decay) v_new),
decay_rs = exp(gc_r - gc_s).

One program per (chunk row, v head, V tile of BV columns), launched like the Triton backend's
``_output_kernel`` (:func:`output_tiles`: BV = 128 for 16-bit inputs, 64 for fp32). q h and
q k^T accumulate over K tiles of BK (at most 64) columns; the intra-chunk attention is rounded
to the input dtype for its dot with v_new (IEEE fp32 dots for fp32 inputs). With
use_qk_l2norm, 1/||q|| scales the rows and 1/||k|| the columns of the fp32 accumulators. Only
the valid rows of a chunk are written; the tokens past cu_seqlens[-1], which no chunk row
covers, are zeroed by a small kernel first (its buffer is aliased into the output kernel), so
the output is never memset as a whole.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kernel_utils import (BT, chunk_bounds, compiler_params, dims, grid_of, iota, load, mdot,
                           mdot_t, pl, program_ids, store, tile_loop, tiles)

_ZERO_COLS = 256  # columns of [T, HV * V] per program of the tail-zeroing kernel

#: launch overrides of :func:`chunk_output` over :func:`output_tiles` (keys BK, BV, num_warps,
#: num_stages, order, loop), for sweeps; empty by default. Read at trace time (see kernel_utils).
TILES: dict = {}


def output_tiles(d) -> dict:
    """Launch meta of :func:`chunk_output` for kernel_utils.Dims ``d``, the Triton backend's
    ``output_tiles`` defaults: K tiles of 64 in a pipelined loop, 8 warps (stages: below); 16-bit
    inputs: the whole V (up to 128) in one tile, so q k^T is computed once per chunk and head
    (Triton backend on the H200: 0.47 ms; 0.56 with V tiles of 64 and 4 warps); fp32 inputs
    (IEEE dots hold their operands in registers): V tiles of 64; the Triton program order
    (kernel_utils.ORDERS). 2026-11-28 (H200, H=16 HV=32 K=V=128 bf16): this kernel 0.913 ms at
    every layout with the same tiles and warps but Triton's default 3 stages (no loop: nothing
    to pipeline) and the row-fastest order, against the Triton backend's 0.470. With the loop and
    this order: 0.455 ms at 2 stages, 0.430 at 3 (H200 sweep, same day): 3 stages."""
    meta = tiles(dict(BK=64, BV=64 if d.fp32 else 128, num_warps=8, num_stages=3,
                      order="triton", loop=True), TILES, "output")
    meta["BK"] = min(meta["BK"], d.kp)
    meta["BV"] = min(meta["BV"], d.vp)
    return meta


def zero_tail(plan, n_tok: int, width: int, dtype, *, interpret: bool):
    """[T, width] buffer with rows >= cu_seqlens[-1] zero and the others not written."""
    def kernel(cu_ref, o_ref):
        t0, c0 = pl.program_id(0) * BT, pl.program_id(1) * _ZERO_COLS  # (not inside pl.when:
        end = cu_ref[plan.padded_seqs]  # interpret mode cannot discharge program_id there)

        @pl.when(t0 + BT > end)
        def _():
            rows = t0 + iota(BT)
            m = ((rows >= end) & (rows < n_tok))[:, None] & (c0 + iota(_ZERO_COLS) < width)[None, :]
            store(o_ref.at[pl.ds(t0, BT), pl.ds(c0, _ZERO_COLS)],
                  jnp.zeros((BT, _ZERO_COLS), jnp.float32), m)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tok, width), dtype),
        grid=(pl.cdiv(n_tok, BT), pl.cdiv(width, _ZERO_COLS)), interpret=interpret,
        compiler_params=compiler_params(num_warps=4), name="gdn_zero_tail",
    )(plan.cu_seqlens)


def chunk_output(q, k, v_new, h, gc, q_rstd, k_rstd, plan, *, scale: float, interpret: bool):
    """q, k [T, H, K]; v_new [T, HV, V]; h [NT_pad, HV, K, V] (input dtype); gc [T, HV] fp32;
    q_rstd, k_rstd [T, H] fp32 or None -> o [T, HV, V] in q's dtype, zero past the last token."""
    d = dims(q, v_new)
    n_tok, hv, kdim, vdim, grp, fp32, kp = d.tokens, d.hv, d.k, d.v, d.grp, d.fp32, d.kp
    dt = d.dtype
    meta = output_tiles(d)
    bk, bv = meta["BK"], meta["BV"]
    l2 = q_rstd is not None

    def kernel(ci_ref, cu_ref, q_ref, k_ref, vn_ref, h_ref, gc_ref, *rest):
        rq_ref, rk_ref, _, o_ref = rest if l2 else (None, None, *rest)  # _: aliased to o_ref
        row, head, vb = program_ids(3, meta["order"])
        n, t0, length = chunk_bounds(ci_ref, cu_ref, row)

        @pl.when(n >= 0)
        def _():
            hk = head // grp
            rows = pl.ds(t0, BT)
            m = iota(BT) < length
            vcols = pl.ds(vb * bv, bv)
            vmask = vb * bv + iota(bv) < vdim

            def k_tile(c, acc):
                c0 = c * bk
                kcols = pl.ds(c0, bk)
                kmask = c0 + iota(bk) < kdim
                mk = m[:, None] & kmask[None, :]
                qt = load(q_ref.at[rows, hk, kcols], mk)
                kt = load(k_ref.at[rows, hk, kcols], mk)
                ht = load(h_ref.at[row, head, kcols, vcols], kmask[:, None] & vmask[None, :])
                return acc[0] + mdot(qt, ht, fp32), acc[1] + mdot_t(qt, kt, fp32, contract=1)

            acc_o, acc_a = tile_loop(kp // bk, k_tile, (jnp.zeros((BT, bv), jnp.float32),
                                                        jnp.zeros((BT, BT), jnp.float32)),
                                     meta["loop"])
            g = load(gc_ref.at[rows, head], m, 0.0)
            row_scale = jnp.exp(g)
            if l2:
                rq = load(rq_ref.at[rows, hk], m, 0.0)
                row_scale = row_scale * rq
                acc_a = acc_a * rq[:, None] * load(rk_ref.at[rows, hk], m, 0.0)[None, :]
            keep = (iota(BT)[:, None] >= iota(BT)[None, :]) & m[:, None]
            diff = jnp.where(keep, g[:, None] - g[None, :], 0.0)
            att = jnp.where(keep, acc_a * jnp.exp(diff), 0.0).astype(dt)
            mv = m[:, None] & vmask[None, :]
            vn = load(vn_ref.at[rows, head, vcols], mv)
            o = (acc_o * row_scale[:, None] + mdot(att, vn, fp32)) * scale
            store(o_ref.at[rows, head, vcols], o, mv)

    o = zero_tail(plan, n_tok, hv * vdim, dt, interpret=interpret).reshape(n_tok, hv, vdim)
    ins = [plan.chunk_indices, plan.cu_seqlens, q, k, v_new, h, gc]
    ins += ([q_rstd, k_rstd] if l2 else []) + [o]
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tok, hv, vdim), dt),
        grid=grid_of((plan.padded_chunks, hv, pl.cdiv(vdim, bv)), meta["order"]),
        input_output_aliases={len(ins) - 1: 0}, interpret=interpret,
        compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]), name="gdn_output",
    )(*ins)
