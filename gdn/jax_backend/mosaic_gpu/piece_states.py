"""Pass 1 of the exact sequence split on the Mosaic GPU path: every piece's end state and state map.

The identity of gdn/split.py: a piece started from ``[S0 | I]`` with values ``[v | 0]`` (K extra
value columns) ends in ``[E | M]``, with ``S_end = M S_start + E`` for any other start. Only the
states matter here, so this is the narrow chunk loop's state warpgroup alone: no q, no output, no
output warpgroup. One CTA per (64-column block of the V + K augmented columns, v head, piece),
grid ``(nv, HV, P_pad)``; a block of the last K columns ("M block") reads V as 0 (a select on a
loaded v block: nothing extra in HBM) and starts from its 64 columns of the identity.

``mode[p]`` (int32, host-planned, :func:`gdn.split.two_pass_tables`):

* 0: skip (the last piece of its sequence, whose map nobody needs, and padding rows);
* 1: a sequence's first piece: its E blocks start from ``h0[p]`` (the sequence's initial state),
  its M blocks are left 0, so ``S_end = M S + E`` still holds with ``M = 0``;
* 2: a later piece: E from 0 (``h0[p]`` is 0 there), M from the identity.

Two warpgroups: WG0 keeps ``S^T`` [64, K] fp32 in registers (the products of
:func:`.chunk_loop.state_step`, the same code as the chunk loop's), WG1 loads k, the v block,
``Ag`` and ``gc`` (and with use_qk_l2norm k's row scales) by TMA into ``stages`` ring slots.
NaN isolation as in the chunk loop: on a boundary tile WG0 zeroes k's (and with ``lean``, v's and
Ag's) rows of other sequences before the products.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .chunk_loop import state_step
from .common import (C, COLS, F32, WG, WGT, check_token_rows, compiler_params, finish_together, interpret_params,
                     iota, produce, seq_tiles, tile, tracing_for_interpreter, zero_rows_outside)

BV = 64  # columns per CTA
SMEM_BUDGET = 227 * 1024 - 4 * 1024


def smem_bytes(dk: int, itemsize: int, stages: int, l2: bool = False) -> int:
    return stages * ((C * dk + C * BV + C * C) * itemsize + (1 + l2) * C * 4) + dk * BV * 4


def piece_states(k, v, ag, gc, cu, mode, h0, *, group: int, stages: int = 2, state_regs: int = 232,
                 lean: bool = True, bare: bool = True, overlap: bool = False, lrk=None, interpret=None):
    """``[E | M]`` fp32 [P_pad, HV, K, V + K] of every piece (rows of mode-0 pieces: no meaning).

    k: [T_q, H, K]; v: [T_q, HV, V] (V and K multiples of 64; T_q as :func:`.chunk_loop.chunk_loop`'s);
    ag: [HV, T_pad, 64], gc: [HV, T_pad] fp32 (the intra kernel's, on the piece plan); cu: int32
    [P_pad + 1] (the pieces' cu_seqlens); mode: int32 [P_pad]; h0: None or fp32 [P_pad, HV, K, V]
    (each piece's E start).
    ``stages``: ring depth (2 leaves SMEM for two CTAs per SM); ``lean`` / ``bare``: as
    :func:`.chunk_loop.chunk_loop`'s (``bare``: the state staging is read before the first
    product and rewritten after the last, with a warpgroup barrier between when it was read);
    ``overlap`` (UNTIMED, off): V's load and the exponentials during ``S^T K^T``, the state's decay
    during ``W^T Ag^T`` (:func:`.chunk_loop.chunk_loop`'s ``overlap``; same bits).
    ``lrk`` (use_qk_l2norm): fp32 [H, T_pad], ``ln rstd(k)`` of each k head's rows; k stays the
    caller's (:func:`.chunk_loop.state_step`'s ``lk``).
    """
    t_rows, _, dk = k.shape
    check_token_rows("k", t_rows)
    hv, dv = v.shape[1], v.shape[2]
    if dv % BV or dk % BV:
        raise NotImplementedError(f"piece_states needs K and V multiples of {BV}, got K={dk}, V={dv}")
    ns = cu.shape[0] - 1
    if mode.shape != (ns,):
        raise ValueError(f"mode must have shape ({ns},) (one per piece of cu), got {mode.shape}")
    nv_v, nv = dv // BV, (dv + dk) // BV
    dtype = k.dtype
    l2 = lrk is not None
    if smem_bytes(dk, jnp.dtype(dtype).itemsize, stages, l2) > SMEM_BUDGET:
        raise NotImplementedError(f"piece_states at {stages} stages exceeds the SMEM budget")
    has_h0 = h0 is not None
    interp = bool(interpret)

    scratch = dict(
        k_s=tile((stages, C, dk), dtype),
        v_s=tile((stages, C, BV), dtype),
        a_s=tile((stages, C, C), dtype),
        gc_s=plgpu.SMEM((stages, C), F32),
        st_s=plgpu.SMEM((dk, BV), F32),  # the initial and the final state of the CTA's columns
        in_bar=plgpu.Barrier(num_arrivals=4 + l2, num_barriers=stages),
        in_free=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        st_bar=plgpu.Barrier(),
        done=plgpu.Barrier(num_arrivals=2),
    )
    if l2:
        scratch["lk_s"] = plgpu.SMEM((stages, C), F32)

    def body(*refs, k_s, v_s, a_s, gc_s, st_s, in_bar, in_free, st_bar, done, lk_s=None):
        refs = list(refs)
        k_ref, v_ref, ag_ref, gc_ref, cu_ref, mode_ref = (refs.pop(0) for _ in range(6))
        lrk_ref = refs.pop(0) if l2 else None
        h0_ref = refs.pop(0) if has_h0 else None
        out_ref = refs.pop(0)
        iv, j, n = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("n")
        hk = lax.div(j, group)
        wg = lax.axis_index("wg")
        is_m = iv >= nv_v
        md = mode_ref[n]
        a, b = cu_ref[n], cu_ref[n + 1]
        active = (md == 2) | ((md == 1) & jnp.logical_not(is_m))
        nt, rows_of = seq_tiles(a, b)
        nt = jnp.where(active, nt, 0)
        vb = jnp.minimum(iv, nv_v - 1) * BV  # the v block an M block loads (and reads as 0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(i, slot):
                _, tok, _, _ = rows_of(i)
                bar = in_bar.at[slot]
                plgpu.copy_gmem_to_smem(k_ref.at[tok, hk], k_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(v_ref.at[tok, j, pl.ds(vb, BV)], v_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(ag_ref.at[j, tok], a_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(gc_ref.at[j, tok], gc_s.at[slot], bar)
                if l2:
                    plgpu.copy_gmem_to_smem(lrk_ref.at[hk, tok], lk_s.at[slot], bar)

            produce(nt, stages, issue, in_free)

        @pl.when(wg == 0)
        def _state():
            plgpu.set_max_registers(state_regs, action="increase")
            r, c = iota((BV, dk), 0), iota((BV, dk), 1)
            # S^T's rows are the CTA's columns: an M block's row r is column (iv - nv_v) * 64 + r of I
            eye = jnp.where((c == r + (iv - nv_v) * BV) & (r < jnp.where(is_m & (md == 2), BV, 0)), 1.0, 0.0)
            if has_h0:
                plgpu.copy_gmem_to_smem(h0_ref.at[n, j, :, pl.ds(vb, BV)], st_s, st_bar)
                plgpu.barrier_wait(st_bar)
                s0 = plgpu.layout_cast(plgpu.load(st_s.T, layout=WGT), WG)
                # a predicate array (Mosaic's warpgroup select does not broadcast a scalar)
                s0 = jnp.where(r < jnp.where(is_m, 0, BV), s0, eye)
                if bare:  # st_s is rewritten at the end: every thread has read it first
                    plgpu.commit_smem()
            else:
                s0 = eye
            tvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)
            v_keep = iota((BV, C), 0) < jnp.where(is_m, 0, BV)

            def step(i, s_t):
                slot = lax.rem(i, stages)
                _, _, lo, hi = rows_of(i)
                plgpu.barrier_wait(in_bar.at[slot])

                @pl.when((lo > 0) | (hi < C))
                def _():  # a boundary tile: rows of other sequences 0 in the contracted operands
                    zero_rows_outside(k_s.at[slot], lo, hi)
                    if lean:
                        zero_rows_outside(v_s.at[slot], lo, hi)
                        zero_rows_outside(a_s.at[slot], lo, hi)

                valid = (tvec >= lo) & (tvec < hi)
                g_vec = plgpu.load(gc_s.at[slot], layout=COLS)
                g_last = gc_s[slot, hi - 1]
                s_new = state_step(s_t, s_t.astype(dtype), v_s.at[slot], k_s.at[slot], a_s.at[slot], g_vec,
                                   g_last, valid, lean, dtype, v_keep=v_keep, overlap=overlap,
                                   lk=plgpu.load(lk_s.at[slot], layout=COLS) if l2 else None)
                plgpu.barrier_arrive(in_free.at[slot])
                return s_new

            s_t = lax.fori_loop(0, nt, step, s0)
            st_s.T[...] = plgpu.layout_cast(s_t, WGT)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_s, out_ref.at[n, j, :, pl.ds(iv * BV, BV)])
            plgpu.wait_smem_to_gmem(0)

        finish_together(done)

    args = [k, v, ag, gc, cu, mode] + ([lrk] if l2 else []) + ([h0] if has_h0 else [])
    with tracing_for_interpreter(interp):
        out = plgpu.kernel(
            body, out_type=jax.ShapeDtypeStruct((ns, hv, dk, dv + dk), F32), scratch_types=scratch,
            grid=(nv, hv, ns), grid_names=("v", "h", "n"), num_threads=2, thread_name="wg",
            compiler_params=compiler_params(no_auto_barriers=bare), interpret=interpret_params(interpret),
            kernel_name="gdn_piece_states",
        )(*args)
    return out
