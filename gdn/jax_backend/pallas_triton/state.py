"""Stage 4: the inter-chunk recurrence (FLA's chunk_gated_delta_rule_fwd_h).

One program walks the chunks of one sequence for one v head and one V tile of BV columns, the
fp32 state tile [K, BV] in registers. Per chunk (row = chunk_offsets[n] + c):

    h[row]  = S                            (stored in the input dtype)
    v_new   = u - w S                      (dot operands in the input dtype; stored in it)
    S       = exp(gc_last) S + K^T (exp(gc_last - gc) * v_new)

``gc_last`` is the cumsum at the last VALID token: it closes a partial chunk. With
use_qk_l2norm, 1/||k|| joins the row scale of v_new in the K^T product. Padded sequences
and empty ones run zero iterations; the final state (fp32) is then the initial state (or zero).
Pointer offsets into h ([NT_pad, HV, K, V], > 2^31 elements past about 262k tokens at HV = 32,
K = V = 128) are 64-bit: the Pallas-Triton lowering widens them for arrays over 4 GiB.

Tile choice (:func:`state_tiles`, the Triton backend's ``state_tiles``): BV = 64 up to K = 128,
and BV = 32 when the whole pass with 32-column tiles fits in one wave of programs (sequences x HV
x ceil(V / 32) <= the SMs: each program is then latency-bound on its chunk loop and more, thinner
programs finish sooner). The Triton backend decides on the host from the sequence count; here the
plan's real counts are unknown while tracing (one compilation per bucket: 1x32768 and 8x4096
share one), so when the padded sizes leave both possible the kernel holds both walks and picks at
run time, from a flag computed on the device (the number of non-empty sequences): its grid has
ceil(V / 32) programs per (sequence, head), and with the wide tiles only every other one works.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .kernel_utils import (BT, compiler_params, dims, grid_of, iota, load, mdot, mdot_t, pl,
                           program_ids, sm_count, store, tiles)

#: launch overrides of :func:`state_recurrence` over :func:`state_tiles` (keys BV, few_BV,
#: num_warps, num_stages, order; few_BV None: no run-time choice, always BV), for sweeps; empty
#: by default. Read at trace time (see kernel_utils).
TILES: dict = {}


def state_tiles(d, n_pad: int, sms: int) -> dict:
    """Launch meta of the state pass for kernel_utils.Dims ``d``, ``n_pad`` padded sequences and
    ``sms`` streaming multiprocessors, the Triton backend's ``state_tiles`` defaults.

    16-bit inputs: BV = 64 up to K = 128 (32 beyond: the register budget of 4 warps), 4 warps,
    2 stages; few_BV = 32 with 4 stages (the next three chunks' w, u, k in flight) for when the
    pass fits in one wave (see the module docstring: on the Triton backend this took the 1x32768
    state pass from 0.97 to 0.66 ms on the H200, and the 64-wide tile is faster from 4 sequences
    on: 0.42 ms at 4x8192 against 0.67). fp32 inputs (IEEE fp32 dots on CUDA cores, operands in
    registers): BV = 64, 8 warps, one stage, no few_BV. num_stages is per kernel, so a kernel
    holding both walks (``dynamic``) cannot give the thin walk its 4 stages: it keeps the wide
    walk's 2 (sm_90 cross-compile at the Qwen3.5 shape: 98 KiB of shared memory, two programs
    per SM, so 4x8192's 256 wide programs fit one wave; 181 KiB, one per SM, at 4 stages).
    Measured 2026-11-28 (H200, H=16 HV=32 K=V=128 bf16): this kernel 1.469 ms at
    1x32768 and 0.670 at 128x256 with BV = 64 and 2 stages only, in the row-fastest program
    order; the Triton backend's 0.660 / 0.420 (4x8192) / 0.575.

    Returns the merged meta plus ``unit`` (the V columns per program of the grid), ``wide`` and
    ``thin`` (the two walks' widths) and ``mode``: "wide", "thin" (decided from the padded sizes)
    or "dynamic".
    """
    fp32 = d.fp32
    meta = tiles(dict(BV=64 if d.kp <= 128 else 32,
                      few_BV=None if fp32 or d.kp > 128 else 32,
                      num_warps=8 if fp32 else 4, num_stages=None, order="triton"),
                 TILES, "state")
    wide = min(meta["BV"], d.vp)
    thin = wide if meta["few_BV"] is None else min(meta["few_BV"], d.vp)
    per_seq = d.hv * pl.cdiv(d.v, thin)  # programs of one sequence with the thin tiles
    if thin == wide or per_seq > sms:
        mode = "wide"
    elif n_pad * per_seq <= sms:
        mode = "thin"
    else:
        mode = "dynamic"
    if meta["num_stages"] is None:
        # dynamic: 3 stages, from the H200 sweep of 2026-11-28 (benchmarks/pallas_sweep.py; this
        # kernel 0.623 / 0.438 / 0.581 ms at 1x32768 / 4x8192 / 128x256 against 1.058 / 0.438 /
        # 0.575 with 2: the thin walk gains a stage, the wide one loses nothing)
        meta["num_stages"] = 1 if fp32 else {"thin": 4, "dynamic": 3}.get(mode, 2)
    unit = min(wide, thin) if mode == "dynamic" else (wide if mode == "wide" else thin)
    return dict(meta, unit=unit, wide=wide, thin=thin, mode=mode, per_seq=per_seq)


def state_recurrence(k, w, u, gc, h0, k_rstd, plan, *, output_final_state: bool,
                     interpret: bool):
    """k [T, H, K]; w [T, HV, K]; u [T, HV, V] (input dtype); gc [T, HV] fp32; h0 None or
    [N_pad, HV, K, V] fp32; k_rstd [T, H] fp32 or None -> (h [NT_pad, HV, K, V],
    v_new [T, HV, V]) in the input dtype and the final state [N_pad, HV, K, V] fp32 (or None)."""
    d = dims(k, u)
    n_tok, hv, kdim, vdim, grp, fp32, dt = d.tokens, d.hv, d.k, d.v, d.grp, d.fp32, d.dtype
    kp = d.kp
    n_pad = plan.padded_seqs
    sms = sm_count()
    meta = state_tiles(d, n_pad, sms)
    unit, mode = meta["unit"], meta["mode"]
    has_h0, l2 = h0 is not None, k_rstd is not None
    dynamic = mode == "dynamic"

    def kernel(*refs):
        refs = list(refs)
        few_ref = refs.pop(0) if dynamic else None
        cu_ref, co_ref, k_ref, w_ref, u_ref, gc_ref = refs[:6]
        refs = refs[6:]
        h0_ref = refs.pop(0) if has_h0 else None
        rk_ref = refs.pop(0) if l2 else None
        h_ref, vn_ref = refs[:2]
        fin_ref = refs[2] if output_final_state else None
        n, head, vb = program_ids(3, meta["order"])
        hk = head // grp
        bos, eos = cu_ref[n], cu_ref[n + 1]
        c0 = co_ref[n]
        n_chunks = co_ref[n + 1] - c0
        kmask = iota(kp) < kdim

        def walk(col0, bv):
            """The chunk loop of this program's V columns col0 .. col0 + bv."""
            vcols = pl.ds(col0, bv)
            vmask = col0 + iota(bv) < vdim
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

            s = lax.fori_loop(0, n_chunks, body, s)
            if output_final_state:
                store(fin_ref.at[n, head, pl.ds(0, kp), vcols], s, hmask)

        def tiles_of(bv):
            """Walk bv columns; with bv wider than the grid's unit only every (bv / unit)-th
            program works (the others exit)."""
            r = bv // unit
            if r == 1:
                walk(vb * unit, bv)
            else:
                pl.when(vb % r == 0)(lambda: walk(vb * unit, bv))

        if dynamic:
            few = few_ref[0] != 0
            pl.when(few)(lambda: tiles_of(meta["thin"]))
            pl.when(jnp.logical_not(few))(lambda: tiles_of(meta["wide"]))
        else:
            tiles_of(meta["wide"] if mode == "wide" else meta["thin"])

    out_shape = [jax.ShapeDtypeStruct((plan.padded_chunks, hv, kdim, vdim), dt),
                 jax.ShapeDtypeStruct((n_tok, hv, vdim), dt)]
    if output_final_state:
        out_shape.append(jax.ShapeDtypeStruct((n_pad, hv, kdim, vdim), jnp.float32))
    ins = [plan.cu_seqlens, plan.chunk_offsets, k, w, u, gc] + ([h0] if has_h0 else [])
    ins += [k_rstd] if l2 else []
    if dynamic:  # the thin tiles when the non-empty sequences' thin programs fit in one wave
        co = plan.chunk_offsets
        busy = jnp.sum((co[1:] > co[:-1]).astype(jnp.int32))
        ins.insert(0, (busy * meta["per_seq"] <= sms).astype(jnp.int32).reshape(1))
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape),
        grid=grid_of((n_pad, hv, pl.cdiv(vdim, unit)), meta["order"]), interpret=interpret,
        compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]),
        name="gdn_state",
    )(*ins)
    return outs[0], outs[1], (outs[2] if output_final_state else None)
