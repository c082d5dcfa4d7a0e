"""The "wide" chunk loop (``chunk_variant="wide"``, gdn issue 5): one CTA per (sequence, v head) owning all V columns.

Same inputs, outputs and numerics as :func:`.chunk_loop.chunk_loop`; grid ``(HV, N_pad + 1)`` instead
of ``(V / 64, HV, N_pad + 1)``. Warpgroups (``nsw = V / 64`` state warpgroups, V in {64, 128}):

* the producer (40 registers): TMA loads of q, k (head ``j // G``), the ``nsw`` 64-column v blocks,
  the intra kernel's ``Ag`` and ``gc`` into ``stages`` ring slots shared by every state warpgroup,
  so q, k and Ag are read once per CTA instead of once per 64-column V tile.
* state warpgroup ``w`` (V columns ``[64 w, 64 w + 64)``) keeps its ``S^T`` ([64, K] fp32) in
  registers for the whole sequence and forms its own output columns, so nothing is published to
  another warpgroup (the default loop publishes S^T and Vnew to its output warpgroup every tile).
  Per tile, with ``Sl = S^T`` rounded to the input dtype:
      P      = mask((Q K^T) exp(gc_r - gc_s))        -> own SMEM, input dtype (read as P^T below)
      W^T    = mask(V^T - (Sl K^T) diag(exp(gc)))
      Vnew^T = mask(W^T Ag^T)
      o^T    = scale ((Sl Q^T) diag(exp(gc)) + Vnew^T P^T)       (= (Q S + P Vnew)^T)
      S^T   <- exp(gc_last) S^T + (Vnew^T diag(mask exp(gc_last - gc))) K
  the same products, dtypes and masks as the default loop (there ``o`` is formed untransposed by the
  output warpgroup from the published ``Sl`` and ``Vnew``); ``o^T`` leaves through a transposed
  SMEM store and one TMA store (row stores on a partial tile). Two chains run side by side on an SM.

NaN / inf of a neighbouring sequence in a shared tile (docs/RELIABILITY.md §2): the selects of the
default loop (W^T, Vnew^T, P), and on a boundary tile the k rows of other sequences zeroed in SMEM by
state warpgroup 0 (the update contracts over tokens, where a 0 factor does not remove a NaN); the
other state warpgroups read that tile's k only after ``k_ready`` (a hop on boundary tiles only).

The initial / final state of each state warpgroup is staged ([K, 64] fp32) in SMEM aliasing the ring:
the producer starts only after every initial state was read, the final states are staged only after
every state warpgroup left its loop. The last grid row writes zeros to the tokens past ``cu[N]``.
Every warpgroup waits for the others before exiting.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, ROWS, WG, WGT, cols, compiler_params, finish_together,
                     for_tail_tiles, interpret_params, iota, masked_decay, masked_exp, mm, produce,
                     rows, store_final_state, store_rows, tile, tracing_for_interpreter,
                     zero_rows_outside)

BV = 64  # V columns per state warpgroup
VALUE_DIMS = (64, 128)  # one or two state warpgroups; more would be 4+ warpgroups (ptxas caps them at 128 registers)
SMEM_BUDGET = 227 * 1024 - 4 * 1024  # leave room for barriers and the reduction scratch


def smem_bytes(dk: int, dv: int, itemsize: int, out_itemsize: int, stages: int) -> int:
    nsw = dv // BV
    per_stage = (2 * C * dk + C * dv + C * C) * itemsize + 2 * C * 4
    ring = max(stages * per_stage, nsw * dk * BV * 4)  # the state staging aliases the ring
    per_wg = C * C * itemsize + C * BV * out_itemsize  # P, the output tile
    return ring + nsw * per_wg


def pick_stages(dk: int, dv: int, itemsize: int, out_itemsize: int) -> int:
    for stages in (4, 3, 2):
        if smem_bytes(dk, dv, itemsize, out_itemsize, stages) <= SMEM_BUDGET:
            return stages
    raise NotImplementedError(f"wide chunk loop needs {smem_bytes(dk, dv, itemsize, out_itemsize, 2)} bytes of SMEM")


def chunk_loop_wide(q, k, v, ag, gc, cu, h0, *, scale: float, group: int, n_out: int | None, t_valid: int,
                    stages: int | None = None, regs: tuple[int, int] | None = None, interpret=None):
    """``(o [T_pad, HV, V] in q's dtype, final [n_out, HV, K, V] fp32 or None)``.

    Arguments as :func:`.chunk_loop.chunk_loop` (q, k: [T_pad, H, K]; v: [T_pad, HV, V] with V in
    {64, 128}; ag: [HV, T_pad, 64]; gc: [HV, T_pad] fp32; cu: int32 [N_pad + 1]; h0: None or fp32
    [N_h0, HV, K, V]); ``regs``: (producer, state) register counts for setmaxnreg.
    """
    t_pad, _, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    if dv not in VALUE_DIMS:
        raise NotImplementedError(f"the wide chunk loop runs V in {VALUE_DIMS} (one state warpgroup per 64 "
                                  f"columns), got V={dv}")
    nsw = dv // BV
    ns = cu.shape[0]  # N_pad + 1 grid rows: the sequences, then the zero writer of the tail
    dtype = q.dtype
    out_dtype = q.dtype
    isz, osz = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    if stages is None:
        stages = pick_stages(dk, dv, isz, osz)
    r_mem, r_state = regs if regs is not None else (40, 232)
    has_h0 = h0 is not None
    n_h0 = h0.shape[0] if has_h0 else 0
    out_final = n_out is not None
    interp = bool(interpret)
    wg_mem = nsw

    out_type = [jax.ShapeDtypeStruct((t_pad, hv, dv), out_dtype)]
    if out_final:
        out_type.append(jax.ShapeDtypeStruct((n_out, hv, dk, dv), F32))
    vec = plgpu.SMEM((stages, C), F32)
    ring = (tile((stages, C, dk), dtype), tile((stages, C, dk), dtype), tile((stages, nsw, C, BV), dtype),
            tile((stages, C, C), dtype), vec, vec)
    scratch = dict(
        # the ring (q, k, v blocks, Ag, gc rows, gc cols) or, before the first and after the last tile,
        # the fp32 [K, 64] staging of each state warpgroup's initial / final state
        ring=plgpu.RefUnion(ring, tuple(plgpu.SMEM((dk, BV), F32) for _ in range(nsw))),
        p_s=tuple(tile((C, C), dtype) for _ in range(nsw)),  # each state warpgroup's own P
        # per state warpgroup: the swizzled output tile or the plain one of the row stores
        # (one union per warpgroup: the groups of ONE RefUnion share their bytes)
        o_st=tuple(plgpu.RefUnion(tile((C, BV), out_dtype), plgpu.SMEM((C, BV), out_dtype)) for _ in range(nsw)),
        in_bar=plgpu.Barrier(num_arrivals=3 + nsw + 2, num_barriers=stages),  # one arrival per TMA copy of a slot
        in_free=plgpu.Barrier(num_arrivals=nsw, num_barriers=stages),
        k_ready=plgpu.Barrier(num_barriers=stages),
        h0_bar=plgpu.Barrier(num_barriers=nsw),
        h0_done=plgpu.Barrier(num_arrivals=nsw),
        loop_done=plgpu.Barrier(num_arrivals=nsw),
        done=plgpu.Barrier(num_arrivals=nsw + 1),
    )

    def body(*refs, ring, p_s, o_st, in_bar, in_free, k_ready, h0_bar, h0_done, loop_done, done):
        (q_s, k_s, v_s, a_s, gc_rows, gc_cols), st_s = ring
        p_s, o_st = tuple(p_s), tuple(o_st)
        refs = list(refs)
        q_ref, k_ref, v_ref, ag_ref, gc_ref, cu_ref = (refs.pop(0) for _ in range(6))
        h0_ref = refs.pop(0) if has_h0 else None
        o_ref = refs.pop(0)
        ht_ref = refs.pop(0) if out_final else None
        j, n = lax.axis_index("h"), lax.axis_index("n")
        hk = lax.div(j, group)
        wg = lax.axis_index("wg")
        is_seq = n < ns - 1
        nidx = jnp.minimum(n, ns - 2)
        a = cu_ref[nidx]
        b = jnp.where(is_seq, cu_ref[nidx + 1], a)  # the tail row walks no tiles
        m0 = lax.div(a, C)
        nt = jnp.where(b > a, lax.div(b - 1, C) - m0 + 1, 0)

        def rows_of(i):  # (first token, token slice of tile i, first valid row, end of valid rows)
            t0 = (m0 + i) * C
            return t0, pl.ds(pl.multiple_of(t0, C), C), jnp.maximum(a - t0, 0), jnp.minimum(b - t0, C)

        @pl.when(wg == wg_mem)
        def _memory():
            if nsw > 1:
                plgpu.set_max_registers(r_mem, action="decrease")
            if has_h0:  # the ring aliases the initial-state staging: wait until it was read
                plgpu.barrier_wait(h0_done)

            def issue(i, slot):
                _, tok, _, _ = rows_of(i)
                bar = in_bar.at[slot]
                plgpu.copy_gmem_to_smem(q_ref.at[tok, hk], q_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(k_ref.at[tok, hk], k_s.at[slot], bar)
                for w in range(nsw):
                    plgpu.copy_gmem_to_smem(v_ref.at[tok, j, pl.ds(w * BV, BV)], v_s.at[slot, w], bar)
                plgpu.copy_gmem_to_smem(ag_ref.at[j, tok], a_s.at[slot], bar)
                for buf in (gc_rows, gc_cols):
                    plgpu.copy_gmem_to_smem(gc_ref.at[j, tok], buf.at[slot], bar)

            produce(nt, stages, issue, in_free)

        def state(w: int):
            if nsw > 1:  # at V = 64 (two warpgroups, 256 threads) every thread may have 255 already
                plgpu.set_max_registers(r_state, action="increase")
            v0 = w * BV
            o_tile, o_part = o_st[w]
            p_w = p_s[w]
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
            sq = (C, C)
            r, c = iota(sq, 0), iota(sq, 1)
            tvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)  # token of each column

            def store(o_lo_t, tok, lo, hi, t0):
                """o^T [64, C] -> rows [lo, min(hi, t_valid - t0)) of the tile (one TMA store when whole)."""
                full = (lo == 0) & (hi == C) & (t0 + C <= t_valid)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store read o_st[w]

                @pl.when(full)
                def _():
                    o_tile.T[...] = o_lo_t
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_tile, o_ref.at[tok, j, pl.ds(v0, BV)])

                @pl.when(jnp.logical_not(full))
                def _():
                    o_part.T[...] = plgpu.layout_cast(o_lo_t, WGT)
                    plgpu.commit_smem()
                    store_rows(o_part, lambda r: o_ref.at[pl.ds(t0 + r, 1), j, pl.ds(v0, BV)], lo,
                               jnp.minimum(hi, t_valid - t0))

            def step(i, s_t):
                slot = lax.rem(i, stages)
                t0, tok, lo, hi = rows_of(i)
                plgpu.barrier_wait(in_bar.at[slot])
                partial = (lo > 0) | (hi < C)

                # A boundary tile (at most two per sequence): the update Vnew^T K contracts k's token
                # rows, so rows of other sequences must be 0 in k itself (a 0 in Vnew^T does not remove
                # a NaN row of k). State warpgroup 0 zeroes them in the shared slot; the others read
                # that tile's k only after k_ready (per slot: a slot's barrier completes at most once
                # before every state warpgroup released the slot). Inner tiles pay nothing.
                if w == 0:
                    @pl.when(partial)
                    def _():
                        zero_rows_outside(k_s.at[slot], lo, hi)
                        if nsw > 1:
                            plgpu.barrier_arrive(k_ready.at[slot])
                else:
                    pl.when(partial)(lambda: plgpu.barrier_wait(k_ready.at[slot]))

                valid = (tvec >= lo) & (tvec < hi)  # the sequence's tokens of this tile
                g_r = plgpu.load(gc_rows.at[slot], layout=ROWS)
                g_vec = plgpu.load(gc_cols.at[slot], layout=COLS)
                g_last = gc_cols[slot, hi - 1]  # the gate of the last valid token closes the tile
                # P (not on the state chain); its columns of other sequences selected to 0 (k of another
                # sequence's token may be NaN)
                p = mm(q_s.at[slot], k_s.at[slot].T, sq)
                mask = (r >= c) & (c >= lo) & (c < hi)
                p_w[...] = masked_decay(mask, p, rows(g_r, sq) - cols(g_vec, sq)).astype(dtype)
                plgpu.commit_smem()
                # ordered for few live registers: the state update before S^T Q^T (same products)
                s_lo = s_t.astype(dtype)
                ks = mm(s_lo, k_s.at[slot].T, sh)  # S^T K^T
                e_g = cols(jnp.exp(g_vec), sh)
                v_t = plgpu.load(v_s.at[slot, w].T, layout=WG).astype(F32)
                w_t = jnp.where(cols(valid, sh), v_t - ks * e_g, 0.0).astype(dtype)
                # Vnew^T = W^T Ag^T; columns of other sequences selected to 0: their Ag rows may be NaN
                # (0 * NaN through the zeros of W^T), and both Vnew^T P^T and the state update contract them
                vn_t = jnp.where(cols(valid, sh), mm(w_t, a_s.at[slot].T, sh), 0.0)
                vn_lo = vn_t.astype(dtype)
                vd_t = (vn_t * cols(masked_exp(valid, g_last - g_vec), sh)).astype(dtype)
                s_new = mm(vd_t, k_s.at[slot], (BV, dk), init=s_t * jnp.exp(g_last))
                qs = mm(s_lo, q_s.at[slot].T, sh)  # S^T Q^T = (Q S)^T
                o_t = mm(vn_lo, p_w.T, sh, init=qs * e_g)  # + Vnew^T P^T
                plgpu.barrier_arrive(in_free.at[slot])
                store((o_t * scale).astype(out_dtype), tok, lo, hi, t0)
                return s_new

            s_t = lax.fori_loop(0, nt, step, s0)

            @pl.when(jnp.logical_not(is_seq))
            def _tail():  # zeros for the tokens past the last sequence, up to t_valid
                zero = plgpu.layout_cast(jnp.zeros((BV, C), out_dtype), WG)
                for_tail_tiles(cu_ref[ns - 1], t_valid,
                               lambda t0, lo: store(zero, pl.ds(pl.multiple_of(t0, C), C), lo, C, t0))

            plgpu.wait_smem_to_gmem(0)
            if out_final:
                store_final_state(loop_done, st_s[w], s_t, ht_ref.at[n, j, :, pl.ds(v0, BV)], n < n_out)

        for w in range(nsw):
            pl.when(wg == w)(lambda w=w: state(w))

        finish_together(done)

    args = [q, k, v, ag, gc, cu] + ([h0] if has_h0 else [])
    with tracing_for_interpreter(interp):
        outs = plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=scratch, grid=(hv, ns), grid_names=("h", "n"),
            num_threads=nsw + 1, thread_name="wg", compiler_params=compiler_params(),
            interpret=interpret_params(interpret), kernel_name="gdn_chunk_loop_wide",
        )(*args)
    return outs[0], (outs[1] if out_final else None)
