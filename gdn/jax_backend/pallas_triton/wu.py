"""Stage 3: w = Ai diag(beta exp(gc)) K and u = Ai diag(beta) V (FLA's recompute_w_u).

Grid (NT_pad, HV). Ai (fp32) and the scaled k / v tiles are rounded to the input dtype for the
dots (fp32 accumulation, IEEE when the inputs are fp32), and w, u are stored in the input dtype.
K and V are walked in tiles of at most 64 columns.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kernel_utils import (BT, chunk_bounds, compiler_params, dim_tile, dims, iota, load, mdot,
                           pl, store)


def recompute_wu(k, v, beta, gc, ai, plan, *, interpret: bool):
    """k [T, H, K], v [T, HV, V] (input dtype); beta, gc [T, HV]; Ai [T, HV, BT] fp32
    -> w [T, HV, K], u [T, HV, V] in the input dtype."""
    d = dims(k, v)
    n_tok, hv, kdim, vdim, grp, fp32, dt = d.tokens, d.hv, d.k, d.v, d.grp, d.fp32, d.dtype
    bk, bv = min(d.kp, 64), min(d.vp, 64)

    def kernel(ci_ref, cu_ref, k_ref, v_ref, b_ref, gc_ref, ai_ref, w_ref, u_ref):
        row, head = pl.program_id(0), pl.program_id(1)
        n, t0, length = chunk_bounds(ci_ref, cu_ref, row)

        @pl.when(n >= 0)
        def _():
            rows = pl.ds(t0, BT)
            m = iota(BT) < length
            a = load(ai_ref.at[rows, head, pl.ds(0, BT)], m[:, None], 0.0).astype(dt)
            b = load(b_ref.at[rows, head], m, 0.0)
            bg = b * jnp.exp(load(gc_ref.at[rows, head], m, 0.0))
            for src, dst, h_src, width, blk, scl in ((k_ref, w_ref, head // grp, kdim, bk, bg),
                                                     (v_ref, u_ref, head, vdim, bv, b)):
                for c0 in range(0, dim_tile(width), blk):
                    cols = pl.ds(c0, blk)
                    mm = m[:, None] & (c0 + iota(blk)[None, :] < width)
                    x = load(src.at[rows, h_src, cols], mm)
                    x = (x.astype(jnp.float32) * scl[:, None]).astype(dt)
                    store(dst.at[rows, head, cols], mdot(a, x, fp32), mm)

    return pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((n_tok, hv, kdim), dt),
                           jax.ShapeDtypeStruct((n_tok, hv, vdim), dt)),
        grid=(plan.padded_chunks, hv), interpret=interpret,
        compiler_params=compiler_params(num_warps=4), name="gdn_wu",
    )(plan.chunk_indices, plan.cu_seqlens, k, v, beta, gc, ai)
