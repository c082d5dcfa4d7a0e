"""Stage 5 (FLA's chunk_fwd_o): o = scale (exp(gc) (q h) + (causal(q k^T) * decay) v_new),
decay_rs = exp(gc_r - gc_s).

Grid (NT_pad, HV, ceil(V / BV)). q h and q k^T accumulate over K tiles of at most 64 columns;
the intra-chunk attention is rounded to the input dtype for its dot with v_new (IEEE fp32 dots
for fp32 inputs). The output buffer is a zeros array aliased in and out: tokens past
cu_seqlens[-1], which no chunk row covers, stay zero; only the valid rows of a chunk are written.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kernel_utils import (BT, chunk_bounds, compiler_params, dims, iota, load, mdot, mdot_t,
                           pl, store)


def chunk_output(q, k, v_new, h, gc, plan, *, scale: float, interpret: bool):
    """q, k [T, H, K]; v_new [T, HV, V]; h [NT_pad, HV, K, V] (input dtype); gc [T, HV] fp32
    -> o [T, HV, V] in q's dtype, zero outside the plan's chunk rows."""
    d = dims(q, v_new)
    n_tok, hv, kdim, vdim, grp, fp32, kp = d.tokens, d.hv, d.k, d.v, d.grp, d.fp32, d.kp
    dt = d.dtype
    bk, bv = min(kp, 64), min(d.vp, 64)

    def kernel(ci_ref, cu_ref, q_ref, k_ref, vn_ref, h_ref, gc_ref, o_in_ref, o_ref):
        del o_in_ref  # the same buffer as o_ref (aliased)
        row, head, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        n, t0, length = chunk_bounds(ci_ref, cu_ref, row)

        @pl.when(n >= 0)
        def _():
            hk = head // grp
            rows = pl.ds(t0, BT)
            m = iota(BT) < length
            vcols = pl.ds(vb * bv, bv)
            vmask = vb * bv + iota(bv) < vdim
            acc_o = jnp.zeros((BT, bv), jnp.float32)
            acc_a = jnp.zeros((BT, BT), jnp.float32)
            for c0 in range(0, kp, bk):
                kcols = pl.ds(c0, bk)
                kmask = c0 + iota(bk) < kdim
                mk = m[:, None] & kmask[None, :]
                qt = load(q_ref.at[rows, hk, kcols], mk)
                kt = load(k_ref.at[rows, hk, kcols], mk)
                ht = load(h_ref.at[row, head, kcols, vcols], kmask[:, None] & vmask[None, :])
                acc_o = acc_o + mdot(qt, ht, fp32)
                acc_a = acc_a + mdot_t(qt, kt, fp32, contract=1)
            g = load(gc_ref.at[rows, head], m, 0.0)
            keep = (iota(BT)[:, None] >= iota(BT)[None, :]) & m[:, None]
            diff = jnp.where(keep, g[:, None] - g[None, :], 0.0)
            att = jnp.where(keep, acc_a * jnp.exp(diff), 0.0).astype(dt)
            mv = m[:, None] & vmask[None, :]
            vn = load(vn_ref.at[rows, head, vcols], mv)
            o = (acc_o * jnp.exp(g)[:, None] + mdot(att, vn, fp32)) * scale
            store(o_ref.at[rows, head, vcols], o, mv)

    zeros = jnp.zeros((n_tok, hv, vdim), dt)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tok, hv, vdim), dt),
        grid=(plan.padded_chunks, hv, pl.cdiv(vdim, bv)), input_output_aliases={7: 0},
        interpret=interpret, compiler_params=compiler_params(num_warps=4), name="gdn_output",
    )(plan.chunk_indices, plan.cu_seqlens, q, k, v_new, h, gc, zeros)
