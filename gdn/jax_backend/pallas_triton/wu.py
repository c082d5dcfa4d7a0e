"""Stage 3: w = Ai diag(beta exp(gc)) K and u = Ai diag(beta) V (FLA's recompute_w_u), and
``prepare``, the chain's stages 1-3 as two kernels like the Triton backend: intra.py's
``intra_inverse`` (gc and Ai, stored in the input dtype), then :func:`recompute_wu`.

One program per (chunk row, v head, part), launched like the Triton backend's ``_wu_kernel``
(:func:`wu_tiles`). Ai is read once per program as a [64, 64] tile (the lower triangle and the
valid rows masked), rounded to the input dtype; the row-scaled K / V tiles ([64, BK] / [64, BV]
columns at a time) are rounded to the input dtype and multiplied on tensor cores with 64-row
tiles and fp32 accumulation (IEEE when the inputs are fp32); w and u are stored in the input
dtype. ``NP=1`` (default): w and u in one program; 2: in separate programs. With
use_qk_l2norm, 1/||k|| joins beta exp(gc) in the row scale of K.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .intra import intra_inverse
from .kernel_utils import (BT, chunk_bounds, compiler_params, dim_tile, dims, grid_of, iota, load,
                           mdot, pl, program_ids, store, tile_loop, tiles)

#: launch overrides of :func:`recompute_wu` over :func:`wu_tiles` (keys BK, BV, NP, num_warps,
#: num_stages, order, loop), for sweeps; empty by default. Read at trace time (see kernel_utils).
TILES: dict = {}


def wu_tiles(d) -> dict:
    """Launch meta of :func:`recompute_wu` for kernel_utils.Dims ``d``, the Triton backend's
    ``wu_tiles`` defaults (2026-11-28, H200, H=16 HV=32 K=V=128 bf16, this kernel 0.408 ms
    against the Triton one's 0.305 at every layout): K / V tiles of 64 columns (the whole padded
    dim when smaller) in pipelined loops, Triton's default 3 stages, w and u in one program
    (NP = 1; Triton backend 0.31 ms against 0.33 in two), 4 warps; fp32 inputs (IEEE dots in
    registers): tiles of 32 and 8 warps; the Triton program order (kernel_utils.ORDERS)."""
    meta = tiles(dict(BK=32 if d.fp32 else 64, BV=32 if d.fp32 else 64, NP=1,
                      num_warps=8 if d.fp32 else 4, num_stages=3, order="triton", loop=True),
                 TILES, "wu")
    meta["BK"] = min(meta["BK"], d.kp)
    meta["BV"] = min(meta["BV"], d.vp)
    return meta


def _out_shapes(d):
    return [jax.ShapeDtypeStruct((d.tokens, d.hv, d.k), d.dtype),
            jax.ShapeDtypeStruct((d.tokens, d.hv, d.v), d.dtype)]


def recompute_wu(k, v, beta, gc, ai, k_rstd, plan, *, interpret: bool):
    """Stage 3: k [T, H, K], v [T, HV, V] (input dtype); beta, gc [T, HV] fp32; Ai [T, HV, BT]
    (any float dtype); k_rstd [T, H] or None -> w [T, HV, K], u [T, HV, V] (input dtype)."""
    d = dims(k, v)
    l2 = k_rstd is not None
    meta = wu_tiles(d)
    parts = meta["NP"]
    if parts not in (1, 2):
        raise ValueError(f"wu TILES: NP {parts}, 1 or 2")

    def kernel(ci_ref, cu_ref, k_ref, v_ref, b_ref, gc_ref, ai_ref, *rest):
        rk_ref, w_ref, u_ref = rest if l2 else (None, *rest)
        row, head, part = program_ids(3, meta["order"])
        n, t0, length = chunk_bounds(ci_ref, cu_ref, row)

        @pl.when(n >= 0)
        def _():
            hk = head // d.grp
            rows = pl.ds(t0, BT)
            r = iota(BT)
            m = r < length
            a = load(ai_ref.at[rows, head, pl.ds(0, BT)], m[:, None] & (r[None, :] <= r[:, None]),
                     0.0).astype(d.dtype)
            b = load(b_ref.at[rows, head], m, 0.0)

            def product(src, dst, h_src, width, blk, scale):
                def tile(c, carry):
                    c0 = c * blk
                    cols = pl.ds(c0, blk)
                    mc = m[:, None] & (c0 + iota(blk) < width)[None, :]
                    z = (load(src.at[rows, h_src, cols], mc).astype(jnp.float32)
                         * scale[:, None]).astype(d.dtype)
                    store(dst.at[rows, head, cols], mdot(a, z, d.fp32), mc)
                    return carry

                tile_loop(dim_tile(width) // blk, tile, jnp.int32(0), meta["loop"])

            def w_part():
                e = b * jnp.exp(load(gc_ref.at[rows, head], m, 0.0))
                if l2:
                    e = e * load(rk_ref.at[rows, hk], m, 0.0)
                product(k_ref, w_ref, hk, d.k, meta["BK"], e)

            def u_part():
                product(v_ref, u_ref, head, d.v, meta["BV"], b)

            if parts == 1:
                w_part()
                u_part()
            else:
                pl.when(part == 0)(w_part)
                pl.when(part == 1)(u_part)

    ins = [plan.chunk_indices, plan.cu_seqlens, k, v, beta, gc, ai] + ([k_rstd] if l2 else [])
    return pl.pallas_call(
        kernel, out_shape=tuple(_out_shapes(d)),
        grid=grid_of((plan.padded_chunks, d.hv, parts), meta["order"]), interpret=interpret,
        compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]), name="gdn_wu",
    )(*ins)


def prepare(k, v, g, beta, k_rstd, plan, *, store_ai_stage: bool, interpret: bool):
    """Stages 1-3. k [T, H, K], v [T, HV, V] (input dtype); g, beta [T, HV] fp32; k_rstd
    [T, H] fp32 or None -> gc [T, HV] fp32, w [T, HV, K], u [T, HV, V] (input dtype) and, with
    ``store_ai_stage``, Ai [T, HV, BT] fp32 (else None: it travels in the input dtype)."""
    ai_dtype = jnp.float32 if store_ai_stage else k.dtype
    gc, ai = intra_inverse(k, g, beta, k_rstd, plan, num_v_heads=v.shape[1], interpret=interpret,
                           from_g=True, ai_dtype=ai_dtype)
    w, u = recompute_wu(k, v, beta, gc, ai, k_rstd, plan, interpret=interpret)
    return gc, w, u, (ai if store_ai_stage else None)
