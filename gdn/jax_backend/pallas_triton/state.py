"""Stage 4: the inter-chunk recurrence (FLA's chunk_gated_delta_rule_fwd_h).

Grid (N_pad, HV, ceil(V / BV)): one program walks the chunks of one sequence for one v head and
one V tile, the fp32 state tile [K, BV] in registers. Per chunk (row = chunk_offsets[n] + c):

    h[row]  = S                            (stored in the input dtype)
    v_new   = u - w S                      (dot operands in the input dtype; stored in it)
    S       = exp(gc_last) S + K^T (exp(gc_last - gc) * v_new)

``gc_last`` is the cumsum at the last VALID token: it closes a partial chunk. With
use_qk_l2norm, 1/||k|| joins the row scale of v_new in the K^T product. Padded sequences
and empty ones run zero iterations; the final state (fp32) is then the initial state (or zero).
Pointer offsets into h ([NT_pad, HV, K, V], > 2^31 elements past about 262k tokens at HV = 32,
K = V = 128) are 64-bit: the Pallas-Triton lowering widens them for arrays over 4 GiB.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .kernel_utils import BT, compiler_params, dims, iota, load, mdot, mdot_t, pl, store


def state_recurrence(k, w, u, gc, h0, k_rstd, plan, *, output_final_state: bool,
                     interpret: bool):
    """k [T, H, K]; w [T, HV, K]; u [T, HV, V] (input dtype); gc [T, HV] fp32; h0 None or
    [N_pad, HV, K, V] fp32; k_rstd [T, H] fp32 or None -> (h [NT_pad, HV, K, V],
    v_new [T, HV, V]) in the input dtype and the final state [N_pad, HV, K, V] fp32 (or None)."""
    d = dims(k, u)
    n_tok, hv, kdim, vdim, grp, fp32, dt = d.tokens, d.hv, d.k, d.v, d.grp, d.fp32, d.dtype
    kp = d.kp
    # 64 up to K = 128 for 16-bit inputs (the Triton backend's default: on the H200 as fast as 32
    # at one sequence with two stages, and faster from four sequences on); 32 beyond and for fp32
    # inputs (registers)
    bv = min(d.vp, 32 if kp > 128 or fp32 else 64)
    has_h0, l2 = h0 is not None, k_rstd is not None

    def kernel(*refs):
        cu_ref, co_ref, k_ref, w_ref, u_ref, gc_ref = refs[:6]
        refs = list(refs[6:])
        h0_ref = refs.pop(0) if has_h0 else None
        rk_ref = refs.pop(0) if l2 else None
        h_ref, vn_ref = refs[:2]
        fin_ref = refs[2] if output_final_state else None
        n, head, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        hk = head // grp
        bos, eos = cu_ref[n], cu_ref[n + 1]
        c0 = co_ref[n]
        kmask = iota(kp) < kdim
        vcols = pl.ds(vb * bv, bv)
        vmask = vb * bv + iota(bv) < vdim
        hmask = kmask[:, None] & vmask[None, :]
        if has_h0:
            s = load(h0_ref.at[n, head, pl.ds(0, kp), vcols], hmask, 0.0)
        else:
            s = jnp.zeros((kp, bv), jnp.float32)

        def body(c, s):
            t0 = bos + c * BT
            length = jnp.minimum(eos - t0, BT)
            rows = pl.ds(t0, BT)
            m = iota(BT) < length
            store(h_ref.at[c0 + c, head, pl.ds(0, kp), vcols], s, hmask)
            sd = s.astype(dt)
            wt = load(w_ref.at[rows, head, pl.ds(0, kp)], m[:, None] & kmask[None, :])
            ut = load(u_ref.at[rows, head, vcols], m[:, None] & vmask[None, :])
            vn = ut.astype(jnp.float32) - mdot(wt, sd, fp32)
            store(vn_ref.at[rows, head, vcols], vn, m[:, None] & vmask[None, :])
            g = load(gc_ref.at[rows, head], m, 0.0)
            g_last = gc_ref[t0 + length - 1, head]
            scale = jnp.exp(g_last - g)
            if l2:
                scale = scale * load(rk_ref.at[rows, hk], m, 0.0)
            vs = jnp.where(m[:, None], vn * scale[:, None], 0.0).astype(dt)
            kt = load(k_ref.at[rows, hk, pl.ds(0, kp)], m[:, None] & kmask[None, :])
            return s * jnp.exp(g_last) + mdot_t(kt, vs, fp32, contract=0)

        s = lax.fori_loop(0, co_ref[n + 1] - c0, body, s)
        if output_final_state:
            store(fin_ref.at[n, head, pl.ds(0, kp), vcols], s, hmask)

    n_pad = plan.padded_seqs
    out_shape = [jax.ShapeDtypeStruct((plan.padded_chunks, hv, kdim, vdim), dt),
                 jax.ShapeDtypeStruct((n_tok, hv, vdim), dt)]
    if output_final_state:
        out_shape.append(jax.ShapeDtypeStruct((n_pad, hv, kdim, vdim), jnp.float32))
    ins = [plan.cu_seqlens, plan.chunk_offsets, k, w, u, gc] + ([h0] if has_h0 else [])
    ins += [k_rstd] if l2 else []
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(n_pad, hv, pl.cdiv(vdim, bv)),
        interpret=interpret, compiler_params=compiler_params(num_warps=4, num_stages=2),
        name="gdn_state",
    )(*ins)
    return outs[0], outs[1], (outs[2] if output_final_state else None)
