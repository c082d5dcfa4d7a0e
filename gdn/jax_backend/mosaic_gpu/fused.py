"""One fused kernel per (v head, sequence): intra-tile inverse, state chain and output, no HBM intermediates.

Grid ``(HV, N_pad + 1)``. A CTA owns all ``V`` columns of its head and walks the aligned tiles of its
sequence (``cu[n] // 64 .. (cu[n+1] - 1) // 64``, read on the device), masking the rows outside
``[lo, hi)``; the last grid row writes zeros past ``cu[N]``. Warpgroups (``nsw = V / 64``):

* ``nsw`` state warpgroups, one per 64 V columns, each holding its ``S^T`` [64, K] fp32 in
  registers for the whole sequence. Per tile, with the aux products of that tile:
      [S^T K^T | S^T Q^T]       from S^T rounded to the input dtype (registers) once
      W^T    = mask(V^T - (S^T K^T) diag(exp(gc)))
      Vnew^T = W^T Ag^T
      o^T    = scale (S^T Q^T diag(exp(gc)) + Vnew^T P^T)      -> SMEM (transposed store) -> TMA
      S^T   <- exp(gc_last) S^T + (Vnew^T diag(mask exp(gc_last - gc))) K
  every product with its left operand in registers; two chains run side by side on the SM.
* the aux warpgroup, up to two tiles ahead: the masked gate cumsum ``gc``, ``A`` (decayed, strictly
  lower), ``Ai = (I + A)^-1`` (16x16 fp32 substitution + 16-bit merges, :mod:`.solve`),
  ``Ag = Ai diag(beta)`` and ``P = mask((Q K^T) exp(gc_r - gc_s))``, published in double-buffered
  SMEM (``Ag``/``P`` in the input dtype, ``gc`` fp32).
* the producer warpgroup: TMA loads of q, k, the v column blocks, g and beta into ``stages`` ring
  slots, refilled when every consumer released a slot.

NaN / inf of a neighbouring sequence in a shared tile never meets this sequence's values: its g and
beta are selected away at load, A and P by selects, and on a boundary tile the aux warpgroup zeroes
k's rows of other sequences in SMEM (the state update contracts them); the state warpgroups then
read that tile's k after ``aux_ready`` (docs/RELIABILITY.md §2).

The initial state enters, and the final state leaves, through SMEM that aliases the ring slots (the
producer starts only after the initial state was read; the final state is staged after every
warpgroup finished its loop). Every warpgroup waits for the others before it exits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, ROWS, WG, WGT, cols, compiler_params, finish_together,
                     for_tail_tiles, interpret_params, iota, masked_decay, masked_exp, mm, produce,
                     rows, seq_tiles, store_final_state, store_rows, tile, tracing_for_interpreter,
                     zero_rows_outside)
from .solve import BLOCK, diag_block_inverse, merge, same_block

BV = 64  # V columns per state warpgroup
SMEM_LIMIT = 227 * 1024 - 3 * 1024  # leave room for barriers and the reduction scratch


def smem_bytes(dk: int, dv: int, itemsize: int, stages: int) -> int:
    nsw = dv // BV
    per_stage = (2 * C * dk + C * dv) * itemsize + 4 * C * 4
    pubs = 2 * 2 * C * C * itemsize + 2 * C * 4  # Ag and P (aliased by the solve input) + gc
    scratch = C * C * 4  # the solve's output
    out = nsw * C * BV * itemsize
    return stages * per_stage + pubs + scratch + out


def pick_stages(dk: int, dv: int, itemsize: int) -> int:
    for stages in (3, 2):
        if smem_bytes(dk, dv, itemsize, stages) <= SMEM_LIMIT:
            return stages
    raise NotImplementedError(f"fused kernel needs {smem_bytes(dk, dv, itemsize, 2)} bytes of SMEM")


def fused(q, k, v, g_hm, beta_hm, cu, h0, *, scale: float, group: int, n_out: int | None,
          stages: int | None = None, regs: tuple[int, int, int] | None = None, interpret=None):
    """``(o [T_pad, HV, V] in q's dtype, final [n_out, HV, K, V] fp32 or None)``.

    q, k: [T_pad, H, K]; v: [T_pad, HV, V]; g_hm, beta_hm: [HV, T_pad] fp32; cu: int32 [N_pad + 1]
    (the plan's cu_seqlens); h0: None or fp32 [N_h0, HV, K, V]; n_out: rows of the final state (None:
    no final state). ``regs``: (producer, aux, state) register counts for setmaxnreg.
    """
    t_pad, _, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    ns = cu.shape[0]
    nsw = dv // BV
    dtype = q.dtype
    isz = jnp.dtype(dtype).itemsize
    if stages is None:
        stages = pick_stages(dk, dv, isz)
    if regs is None:
        regs = (24, 152, 168) if nsw == 2 else (24, 232, 232)
    r_mem, r_aux, r_state = regs
    has_h0 = h0 is not None
    n_h0 = h0.shape[0] if has_h0 else 0
    out_final = n_out is not None
    interp = bool(interpret)
    wg_aux, wg_mem = nsw, nsw + 1

    out_type = [jax.ShapeDtypeStruct((t_pad, hv, dv), dtype)]
    if out_final:
        out_type.append(jax.ShapeDtypeStruct((n_out, hv, dk, dv), F32))
    vec = plgpu.SMEM((stages, C), F32)
    ring = (tile((stages, C, dk), dtype), tile((stages, C, dk), dtype), tile((stages, nsw, C, BV), dtype),
            vec, vec, vec, vec)
    scratch = dict(
        # the ring (q, k, v blocks, g rows, g cols, beta rows, beta cols) or, before the first and after
        # the last tile, the fp32 [K, 64] staging of each state warpgroup's initial / final state
        ring=plgpu.RefUnion(ring, tuple(plgpu.SMEM((dk, BV), F32) for _ in range(nsw))),
        # per publication slot: Ag and P (16-bit) or, while the aux warpgroup solves, -A^T in fp32
        agp=plgpu.RefUnion(tile((4, C, C), dtype), plgpu.SMEM((2, C, C), F32)),  # [2 pb + (0: Ag, 1: P)]
        gc_pub=plgpu.SMEM((2, C), F32),
        x_s=plgpu.SMEM((C, C), F32),
        # per state warpgroup: the swizzled output tile or the plain one of the row stores
        # (one union per warpgroup: the groups of ONE RefUnion share their bytes)
        o_st=tuple(plgpu.RefUnion(tile((C, BV), dtype), plgpu.SMEM((C, BV), dtype)) for _ in range(nsw)),
        in_bar=plgpu.Barrier(num_arrivals=2 + nsw + 4, num_barriers=stages),
        in_free=plgpu.Barrier(num_arrivals=nsw + 1, num_barriers=stages),
        aux_ready=plgpu.Barrier(num_barriers=2),
        aux_free=plgpu.Barrier(num_arrivals=nsw, num_barriers=2),
        h0_bar=plgpu.Barrier(num_barriers=nsw),
        h0_done=plgpu.Barrier(num_arrivals=nsw),
        loop_done=plgpu.Barrier(num_arrivals=nsw + 1),
        done=plgpu.Barrier(num_arrivals=nsw + 2),
    )

    def body(*refs, ring, agp, gc_pub, x_s, o_st, in_bar, in_free, aux_ready, aux_free, h0_bar, h0_done,
             loop_done, done):
        (q_s, k_s, v_s, g_r, g_c, b_r, b_c), st_s = ring
        (agp_lo, na_s) = agp
        o_st = tuple(o_st)
        refs = list(refs)
        q_ref, k_ref, v_ref, g_ref, b_ref, cu_ref = (refs.pop(0) for _ in range(6))
        h0_ref = refs.pop(0) if has_h0 else None
        o_ref = refs.pop(0)
        ht_ref = refs.pop(0) if out_final else None
        j, n = lax.axis_index("h"), lax.axis_index("n")
        hk = lax.div(j, group)
        wg = lax.axis_index("wg")
        is_seq = n < ns - 1
        nidx = jnp.minimum(n, ns - 2)
        a = cu_ref[nidx]
        b = jnp.where(is_seq, cu_ref[nidx + 1], a)
        nt, tile_rows = seq_tiles(a, b)

        # ---------------------------------------------------------------- producer
        @pl.when(wg == wg_mem)
        def _producer():
            plgpu.set_max_registers(r_mem, action="decrease")
            if has_h0:  # the ring aliases the initial-state staging: wait until it was read
                plgpu.barrier_wait(h0_done)

            def issue(i, slot):
                _, tok, _, _ = tile_rows(i)
                bar = in_bar.at[slot]
                plgpu.copy_gmem_to_smem(q_ref.at[tok, hk], q_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(k_ref.at[tok, hk], k_s.at[slot], bar)
                for w in range(nsw):
                    plgpu.copy_gmem_to_smem(v_ref.at[tok, j, pl.ds(w * BV, BV)], v_s.at[slot, w], bar)
                for src, dst in ((g_ref, g_r), (g_ref, g_c), (b_ref, b_r), (b_ref, b_c)):
                    plgpu.copy_gmem_to_smem(src.at[j, tok], dst.at[slot], bar)

            produce(nt, stages, issue, in_free)

        # ---------------------------------------------------------------- aux: inverse, P, gc
        @pl.when(wg == wg_aux)
        def _aux():
            plgpu.set_max_registers(r_aux, action="increase")
            sq = (C, C)
            r, c = iota(sq, 0), iota(sq, 1)
            rvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROWS)
            cvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)

            def step(i, carry):
                slot = lax.rem(i, stages)
                pb = lax.rem(i, 2)
                _, _, lo, hi = tile_rows(i)
                plgpu.barrier_wait(in_bar.at[slot])

                @pl.when(i >= 2)
                def _():  # both state warpgroups are done with the products of tile i - 2
                    plgpu.barrier_wait(aux_free.at[pb])

                partial = (lo > 0) | (hi < C)

                # a boundary tile: zero k's rows of other sequences in SMEM (the state warpgroups'
                # update contracts them: a 0 factor does not remove a NaN row); they read this tile's
                # k only after aux_ready then. Tiles wholly inside the sequence skip it.
                @pl.when(partial)
                def _():
                    zero_rows_outside(k_s.at[slot], lo, hi)

                vr = (rvec >= lo) & (rvec < hi)
                vc = (cvec >= lo) & (cvec < hi)
                g_row = jnp.where(vr, plgpu.load(g_r.at[slot], layout=ROWS), 0.0)
                g_col = jnp.where(vc, plgpu.load(g_c.at[slot], layout=COLS), 0.0)
                gam_r = jnp.where(c <= r, cols(g_col, sq), 0.0).sum(axis=1)  # inclusive cumsum
                gam_c = jnp.where(r <= c, rows(g_row, sq), 0.0).sum(axis=0)
                beta_row = jnp.where(vr, plgpu.load(b_r.at[slot], layout=ROWS), 0.0)
                beta_col = jnp.where(vc, plgpu.load(b_c.at[slot], layout=COLS), 0.0)
                valid = rows(vr, sq) & cols(vc, sq)
                gr, gcc = rows(gam_r, sq), cols(gam_c, sq)
                dec = masked_exp((r >= c) & valid, gr - gcc)  # exp(gc_r - gc_s), r >= s

                kk = mm(k_s.at[slot], k_s.at[slot].T, sq)  # symmetric: serves A and A^T
                # a select (not the 0 of dec: kk of another sequence's token may be NaN): A, and so the
                # inverse, Ag and Vnew, are finite when this CTA's sequence is; the solve needs no seg
                a_low = jnp.where((r > c) & valid, kk * rows(beta_row, sq) * dec, 0.0)
                if interp:
                    na_t = None
                else:  # -A^T on the diagonal blocks: (j, i) = -beta_i (k_i . k_j) exp(gc_i - gc_j), i > j
                    up = (c > r) & valid & same_block(BLOCK)
                    na_t = -masked_decay(up, kk * cols(beta_col, sq), gcc - gr)
                x = diag_block_inverse(a_low, na_t, na_s.at[pb], x_s, interpret=interp)
                x = merge(x, a_low, agp_lo.at[2 * pb], dtype)
                agp_lo.at[2 * pb][...] = (x * cols(beta_col, sq)).astype(dtype)
                p = mm(q_s.at[slot], k_s.at[slot].T, sq)
                agp_lo.at[2 * pb + 1][...] = jnp.where((r >= c) & valid, p * dec, 0.0).astype(dtype)
                gc_pub.at[pb][...] = gam_r
                plgpu.commit_smem()
                plgpu.barrier_arrive(aux_ready.at[pb])
                plgpu.barrier_arrive(in_free.at[slot])
                return carry

            lax.fori_loop(0, nt, step, None)

            @pl.loop(jnp.maximum(nt - 2, 0), nt)
            def _drain(i):
                plgpu.barrier_wait(aux_free.at[lax.rem(i, 2)])

            if out_final:
                plgpu.barrier_arrive(loop_done)

        # ---------------------------------------------------------------- state warpgroups
        def state(w: int):
            plgpu.set_max_registers(r_state, action="increase")
            v0 = w * BV
            o_tile, o_part = o_st[w]
            if has_h0:
                plgpu.copy_gmem_to_smem(h0_ref.at[jnp.minimum(n, n_h0 - 1), j, :, pl.ds(v0, BV)], st_s[w],
                                        h0_bar.at[w])
                plgpu.barrier_wait(h0_bar.at[w])
                s0 = plgpu.layout_cast(plgpu.load(st_s[w].T, layout=WGT), WG)  # [64, K]
                # rows past N_h0 start from zero: a select (the clamped row read may hold NaN), its
                # predicate a full array (Mosaic's warpgroup select does not broadcast a scalar)
                live = plgpu.broadcasted_iota(jnp.int32, s0.shape, 0, layout=WG) < jnp.where(n < n_h0, BV, 0)
                s0 = jnp.where(live, s0, 0.0)
                plgpu.barrier_arrive(h0_done)
            else:
                s0 = plgpu.layout_cast(jnp.zeros((BV, dk), F32), WG)
            sh = (BV, C)
            tvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)

            def store(o_lo_t, tok, lo, hi, t0):
                """o^T [64, C] -> rows [lo, hi) of the tile (one TMA store when whole)."""
                full = (lo == 0) & (hi == C)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store read SMEM

                @pl.when(full)
                def _():
                    o_tile.T[...] = o_lo_t
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_tile, o_ref.at[tok, j, pl.ds(v0, BV)])

                @pl.when(jnp.logical_not(full))
                def _():
                    o_part.T[...] = plgpu.layout_cast(o_lo_t, WGT)
                    plgpu.commit_smem()
                    store_rows(o_part, lambda r: o_ref.at[pl.ds(t0 + r, 1), j, pl.ds(v0, BV)], lo, hi)

            def step(i, s_t):
                slot = lax.rem(i, stages)
                pb = lax.rem(i, 2)
                t0, tok, lo, hi = tile_rows(i)
                plgpu.barrier_wait(in_bar.at[slot])
                partial = (lo > 0) | (hi < C)  # the aux warpgroup rewrites k_s: wait for it first
                pl.when(partial)(lambda: plgpu.barrier_wait(aux_ready.at[pb]))
                s_lo = s_t.astype(dtype)
                ks = mm(s_lo, k_s.at[slot].T, sh)  # S^T K^T
                qs = mm(s_lo, q_s.at[slot].T, sh)  # S^T Q^T = (Q S)^T
                v_t = plgpu.load(v_s.at[slot, w].T, layout=WG).astype(F32)
                pl.when(jnp.logical_not(partial))(lambda: plgpu.barrier_wait(aux_ready.at[pb]))
                valid = (tvec >= lo) & (tvec < hi)
                g_vec = plgpu.load(gc_pub.at[pb], layout=COLS)
                g_last = gc_pub[pb, hi - 1]  # the gate of the last valid token closes the tile
                e_g = cols(jnp.exp(g_vec), sh)
                w_t = jnp.where(cols(valid, sh), v_t - ks * e_g, 0.0).astype(dtype)
                vn_t = mm(w_t, agp_lo.at[2 * pb].T, sh)  # Vnew^T = W^T Ag^T
                vn_lo = vn_t.astype(dtype)
                o_t = mm(vn_lo, agp_lo.at[2 * pb + 1].T, sh, init=qs * e_g)  # + Vnew^T P^T
                plgpu.barrier_arrive(aux_free.at[pb])
                vd_t = (vn_t * cols(masked_exp(valid, g_last - g_vec), sh)).astype(dtype)
                s_new = mm(vd_t, k_s.at[slot], (BV, dk), init=s_t * jnp.exp(g_last))
                plgpu.barrier_arrive(in_free.at[slot])
                store((o_t * scale).astype(dtype), tok, lo, hi, t0)
                return s_new

            s_t = lax.fori_loop(0, nt, step, s0)

            @pl.when(jnp.logical_not(is_seq))
            def _tail():  # zeros for the tokens past the last sequence
                zero = plgpu.layout_cast(jnp.zeros((BV, C), dtype), WG)
                for_tail_tiles(cu_ref[ns - 1], t_pad,
                               lambda t0, lo: store(zero, pl.ds(pl.multiple_of(t0, C), C), lo, C, t0))

            plgpu.wait_smem_to_gmem(0)
            if out_final:
                store_final_state(loop_done, st_s[w], s_t, ht_ref.at[n, j, :, pl.ds(v0, BV)], n < n_out)

        for w in range(nsw):
            pl.when(wg == w)(lambda w=w: state(w))

        finish_together(done)

    args = [q, k, v, g_hm, beta_hm, cu] + ([h0] if has_h0 else [])
    with tracing_for_interpreter(interp):
        outs = plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=scratch, grid=(hv, ns), grid_names=("h", "n"),
            num_threads=nsw + 2, thread_name="wg", compiler_params=compiler_params(),
            interpret=interpret_params(interpret), kernel_name="gdn_fused",
        )(*args)
    return outs[0], (outs[1] if out_final else None)
