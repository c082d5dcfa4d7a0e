"""Stage 3: w = Ai diag(beta exp(gc)) K and u = Ai diag(beta) V (FLA's recompute_w_u), and the
fused ``prepare`` kernel that the chain runs: stages 1 to 3 in one pass (like the Triton
backend's prepare), gc, Ai and w, u of a chunk computed in registers, only gc, w and u written
(Ai too when the caller asks for the stage tensors). Nothing of size [T, HV, BT] goes through
memory on the fast path.

Grid (NT_pad, HV). Ai (fp32, ten 16 x 16 blocks) and the row-scaled k / v tiles are rounded to
the input dtype for the dots (fp32 accumulation, IEEE when the inputs are fp32), block row by
block row; w and u are stored in the input dtype. K and V are walked in tiles of at most 64
columns. With use_qk_l2norm, 1/||k|| joins beta exp(gc) in the row scale of K.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .cumsum import gate_blocks, store_sub
from .intra import a_blocks, inverse_blocks, load_ai, store_ai
from .kernel_utils import (BC, BT, NB, compiler_params, dim_tile, dims, iota, load, load_sub,
                           mdot, on_chunk_row, pl, store)


def wu_from_blocks(x, k_ref, v_ref, w_ref, u_ref, t0, head, hk, masks, gs, bs, rks, d):
    """Write w and u of one chunk and v head from the blocks ``x`` of its Ai (fp32)."""
    xd = {key: val.astype(d.dtype) for key, val in x.items()}
    ek = [b * jnp.exp(g) for b, g in zip(bs, gs)]
    if rks is not None:
        ek = [e * r for e, r in zip(ek, rks)]
    for src, dst, h_src, width, scales in ((k_ref, w_ref, hk, d.k, ek),
                                           (v_ref, u_ref, head, d.v, bs)):
        blk = min(dim_tile(width), 64)
        for c0 in range(0, dim_tile(width), blk):
            cols = pl.ds(c0, blk)
            cmask = (c0 + iota(blk) < width)[None, :]
            rows = [pl.ds(t0 + i * BC, BC) for i in range(NB)]
            z = [(load(src.at[rows[i], h_src, cols], masks[i][:, None] & cmask)
                  .astype(jnp.float32) * scales[i][:, None]).astype(d.dtype) for i in range(NB)]
            for i in range(NB):
                acc = mdot(xd[i, 0], z[0], d.fp32)
                for j in range(1, i + 1):
                    acc = acc + mdot(xd[i, j], z[j], d.fp32)
                store(dst.at[rows[i], head, cols], acc, masks[i][:, None] & cmask)


def _out_shapes(d):
    return [jax.ShapeDtypeStruct((d.tokens, d.hv, d.k), d.dtype),
            jax.ShapeDtypeStruct((d.tokens, d.hv, d.v), d.dtype)]


def prepare(k, v, g, beta, k_rstd, plan, *, store_ai_stage: bool, interpret: bool):
    """Stages 1-3 fused. k [T, H, K], v [T, HV, V] (input dtype); g, beta [T, HV] fp32; k_rstd
    [T, H] fp32 or None -> gc [T, HV] fp32, w [T, HV, K], u [T, HV, V] (input dtype) and, with
    ``store_ai_stage``, Ai [T, HV, BT] fp32 (else None)."""
    d = dims(k, v)
    l2 = k_rstd is not None

    def kernel(*refs):
        ci_ref, cu_ref, k_ref, v_ref, g_ref, b_ref = refs[:6]
        rk_ref = refs[6] if l2 else None
        gc_ref, w_ref, u_ref = refs[6 + l2: 9 + l2]
        ai_ref = refs[9 + l2] if store_ai_stage else None

        def body(t0, head, masks):
            hk = head // d.grp
            gs = gate_blocks(g_ref, t0, head, masks)
            store_sub(gc_ref, t0, head, masks, gs)
            bs = load_sub(b_ref, t0, head, masks)
            rks = load_sub(rk_ref, t0, hk, masks) if l2 else None
            x = inverse_blocks(a_blocks(k_ref, t0, hk, masks, gs, bs, rks, d.k, d.fp32))
            if store_ai_stage:
                store_ai(ai_ref, t0, head, masks, x)
            wu_from_blocks(x, k_ref, v_ref, w_ref, u_ref, t0, head, hk, masks, gs, bs, rks, d)

        on_chunk_row(ci_ref, cu_ref, body)

    out_shape = [jax.ShapeDtypeStruct((d.tokens, d.hv), jnp.float32)] + _out_shapes(d)
    if store_ai_stage:
        out_shape.append(jax.ShapeDtypeStruct((d.tokens, d.hv, BT), jnp.float32))
    ins = [plan.chunk_indices, plan.cu_seqlens, k, v, g, beta] + ([k_rstd] if l2 else [])
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(plan.padded_chunks, d.hv), interpret=interpret,
        compiler_params=compiler_params(num_warps=4), name="gdn_prepare",
    )(*ins)
    return outs[0], outs[1], outs[2], (outs[3] if store_ai_stage else None)


def recompute_wu(k, v, beta, gc, ai, k_rstd, plan, *, interpret: bool):
    """Stage 3 on its own: k [T, H, K], v [T, HV, V] (input dtype); beta, gc [T, HV] fp32;
    Ai [T, HV, BT] fp32; k_rstd [T, H] or None -> w [T, HV, K], u [T, HV, V] (input dtype)."""
    d = dims(k, v)
    l2 = k_rstd is not None

    def kernel(ci_ref, cu_ref, k_ref, v_ref, b_ref, gc_ref, ai_ref, *rest):
        rk_ref, w_ref, u_ref = rest if l2 else (None, *rest)
        def body(t0, head, masks):
            hk = head // d.grp
            gs = load_sub(gc_ref, t0, head, masks)
            bs = load_sub(b_ref, t0, head, masks)
            rks = load_sub(rk_ref, t0, hk, masks) if l2 else None
            x = load_ai(ai_ref, t0, head, masks)
            wu_from_blocks(x, k_ref, v_ref, w_ref, u_ref, t0, head, hk, masks, gs, bs, rks, d)

        on_chunk_row(ci_ref, cu_ref, body)

    ins = [plan.chunk_indices, plan.cu_seqlens, k, v, beta, gc, ai] + ([k_rstd] if l2 else [])
    return pl.pallas_call(
        kernel, out_shape=tuple(_out_shapes(d)), grid=(plan.padded_chunks, d.hv),
        interpret=interpret, compiler_params=compiler_params(num_warps=4), name="gdn_wu",
    )(*ins)
