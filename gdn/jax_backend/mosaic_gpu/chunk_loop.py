"""The fused, warp-specialized chunk loop: state on chip for the whole sequence, output written once.

One CTA per (V tile of ``bv`` columns, v head ``j``, sequence ``n``), grid ``(nv, HV, N_pad + 1)``.
The CTA walks the aligned tiles its sequence touches (``cu[n] // 64 .. (cu[n+1] - 1) // 64``, read
on the device from the plan's ``cu_seqlens``) and masks the rows outside ``[lo, hi)`` of each.
Three warpgroups:

* WG2 (memory, 40 registers): TMA loads of q, k (head ``j // G``), the v tile, the intra kernel's
  ``Ag`` and ``gc`` into ``stages`` ring buffers, refilled as both consumers release a slot.
* WG0 (state): keeps ``S^T`` (``[bv, K]`` fp32) in registers for the whole sequence:
      W^T     = mask(V^T - (S^T K^T) diag(exp(gc)))            (rows of other sequences zeroed)
      Vnew^T  = W^T Ag^T                                       (= (U - W S)^T of DESIGN.md §1)
      S^T    <- exp(gc_last) S^T + (Vnew^T diag(mask exp(gc_last - gc))) K
  all three products with the left operand in registers; per tile it publishes ``S^T`` (before the
  update) and ``Vnew`` in the input dtype to double-buffered SMEM for WG1.
* WG1 (output): ``P = mask((Q K^T) exp(gc_r - gc_s))`` while WG0 works, then
  ``o = scale (diag(exp(gc)) Q S + P Vnew)``; a tile wholly inside the sequence leaves by one TMA
  store, a partial tile row by row (rows of neighbouring sequences are never written).

NaN / inf in a neighbouring sequence of a shared tile (docs/RELIABILITY.md §2) is removed by selects
before it meets this sequence's values: rows / columns of other tokens in W^T, Vnew^T and P (a select
on fp32 registers, cheap), and, on a boundary tile only, the k rows of other sequences zeroed in SMEM
by WG0 (the state update contracts over tokens, where a zero factor does not remove a NaN); WG1 then
reads that tile's k after ``s_ready``. The intra kernel's ``Ag`` is exactly 0 across sequences.

The last grid row ``n = N_pad`` writes zeros to the tokens past ``cu[N]`` (they must read zero). The
initial state row ``n`` (zeros past ``N_h0``) enters, the final state leaves as ``[K, V]`` fp32
directly (no transposition outside). No per-tile state touches HBM. Every warpgroup waits for the
others before exiting.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, ROWS, WG, WGT, check_token_rows, cols, column_select, compiler_params,
                     finish_together, has_row_scales, interpret_params, iota, k_scaled, load_state, masked_decay,
                     masked_exp, mm, produce, qk_scaled, rows, seq_tiles, store_rows, store_state, tile,
                     tracing_for_interpreter, zero_rows_outside)

SMEM_BUDGET = 227 * 1024 - 4 * 1024  # leave room for barriers and the reduction scratch


#: diagnostics only (``chunk_loop(..., _ablate=...)``): work that can be dropped to time its share on
#: the state chain or in the output warpgroup; the results are then WRONG. "xw": Vnew = V (no product
#: with the state before the update); "w": Vnew = W (no ``W^T Ag^T``); "update": no state update
#: product; "publish": no publication of ``S^T`` / ``Vnew`` to SMEM (the hand-over barrier stays); "out":
#: the output warpgroup only waits and releases (no P, no output products, no store); "store": no
#: output store; "store_tma": a whole tile staged in SMEM and fenced, but no TMA store and no wait for
#: an earlier one; "store_wait": no wait for the earlier TMA store's read (a race: a diagnostic); "p":
#: no ``Q K^T`` product and its decay (P = 0); "o_mm": no ``Q S^T`` / ``P Vnew`` products (o = P, stored);
#: "p_half": P computed on odd tiles only, passed through SMEM (``o_part``) and read back on every tile
#: (what a pair of CTAs sharing each head's P would pay; only where no tile is partial).
#: The WG0 ones run the chain without ``overlap``. tests/gpu/mosaic_gpu_check.py --only ablate
#: --ablate-loop narrow times each.
ABLATIONS = ("xw", "w", "update", "publish", "out", "store", "store_tma", "store_wait", "p", "o_mm", "p_half")


def smem_bytes(dk: int, bv: int, itemsize: int, out_itemsize: int, stages: int, l2: bool = False,
               p_in: bool = False) -> int:
    per_stage = (2 * C * dk + C * bv + (1 + p_in) * C * C) * itemsize + (3 + 2 * l2) * C * 4
    fixed = max(2 * bv * dk * itemsize, dk * bv * 4) + 2 * C * bv * itemsize + 3 * C * bv * out_itemsize
    return stages * per_stage + fixed


def pick_stages(dk: int, bv: int, itemsize: int, out_itemsize: int, l2: bool = False, p_in: bool = False) -> int:
    for stages in (4, 3, 2):
        if smem_bytes(dk, bv, itemsize, out_itemsize, stages, l2, p_in) <= SMEM_BUDGET:
            return stages
    raise NotImplementedError(f"chunk loop needs {smem_bytes(dk, bv, itemsize, out_itemsize, 2)} bytes of SMEM")


def new_values_t(s_lo, v_tile, k_tile, a_tile, g_vec, valid, lean: bool, v_keep=None, shadows=None):
    """``Vnew^T = W^T Ag^T`` [bv, 64] fp32 of one tile, ``W^T = V^T - (S^T K^T) diag(exp(gc))``.

    s_lo: ``S^T`` [bv, K] in the input dtype (registers); v_tile, k_tile, a_tile: SMEM [64, bv],
    [64, K], [64, 64]; g_vec: ``gc`` (COLS); valid: the sequence's tokens (COLS); v_keep: None, or
    a [bv, 64] bool (WG layout) where False reads V as 0 (a select: the value there may be NaN).
    Columns of other sequences come out 0 (their Ag rows may be NaN, and every later product
    contracts them): selected, or with ``lean`` 0 already (the caller zeroed their v, k and Ag
    rows, and exp(gc) is masked).
    ``shadows``: None, or two functions run while the two products compute (``overlap``); V's load
    and ``exp(gc)`` then also happen in the first product's shadow, and the result is
    ``(Vnew^T, first(), second())``.
    """
    sh = (s_lo.shape[0], C)
    sel = column_select(not lean)

    def x_factor():
        return masked_exp(valid, g_vec) if lean else jnp.exp(g_vec)

    def v_values():
        v_t = plgpu.load(v_tile.T, layout=WG).astype(F32)
        return v_t if v_keep is None else jnp.where(v_keep, v_t, 0.0)

    # named scopes: regions of Mosaic's in-kernel profiler (benchmarks/loop_profile.py; no code without it)
    with jax.named_scope("s_x"):
        if shadows is None:
            e_vec = x_factor()
            ks = mm(s_lo, k_tile.T, sh)  # S^T K^T
            v_t = v_values()
        else:
            ks, (e_vec, v_t, first) = mm(s_lo, k_tile.T, sh, during=lambda: (x_factor(), v_values(), shadows[0]()))
    w_t = sel(cols(valid, sh), v_t - ks * cols(e_vec, sh)).astype(s_lo.dtype)
    with jax.named_scope("s_w"):
        if shadows is None:
            return sel(cols(valid, sh), mm(w_t, a_tile.T, sh))
        vn_t, second = mm(w_t, a_tile.T, sh, during=shadows[1])
    return sel(cols(valid, sh), vn_t), first, second


def state_update_t(s_t, vn_t, k_tile, g_vec, g_last, valid, dtype, factors=None, during=None):
    """``S^T <- exp(gc_last) S^T + (Vnew^T diag(mask exp(gc_last - gc))) K`` ([bv, K] fp32).
    ``factors``: None, or ``(exp(gc_last) S^T, mask exp(gc_last - gc))`` computed by the caller
    (:func:`decay_factors`, in an earlier product's shadow); ``during``: run while the product
    computes."""
    s_dec, f_vec = decay_factors(s_t, g_vec, g_last, valid) if factors is None else factors
    vd_t = (vn_t * cols(f_vec, vn_t.shape)).astype(dtype)
    with jax.named_scope("s_update"):
        if during is None:
            return mm(vd_t, k_tile, s_t.shape, init=s_dec)
        return mm(vd_t, k_tile, s_t.shape, init=s_dec, during=during)[0]


def decay_factors(s_t, g_vec, g_last, valid):
    """The state update's fp32 factors: ``(exp(gc_last) S^T, mask exp(gc_last - gc))``."""
    return s_t * jnp.exp(g_last), masked_exp(valid, g_last - g_vec)


def state_step(s_t, s_lo, v_tile, k_tile, a_tile, g_vec, g_last, valid, lean: bool, dtype, *, v_keep=None,
               overlap: bool = False, before=lambda: None, between=None, lk=None):
    """One tile of the state chain -> the new ``S^T``: :func:`new_values_t` then
    :func:`state_update_t`, with the caller's side work ``before`` (run before ``Vnew``'s products)
    and ``between(Vnew^T)`` (None: nothing; run before the update). With ``overlap`` the side work
    and the update's factors run in the products' shadows instead: ``before`` during ``S^T K^T``,
    the decay during ``W^T Ag^T``, ``between`` during the update (the same values).
    ``lk`` (use_qk_l2norm): ``ln rstd(k)`` of the tile's tokens (COLS): both products that contract
    k's rows (``S^T K^T`` and the update) take k's row scale in their column factors' exponents,
    ``exp(gc + lk)`` and ``exp(gc_last - gc + lk)``, so k itself stays the caller's."""
    g_vec, g_d = k_scaled(g_vec, lk)
    if not overlap:
        before()
        vn_t = new_values_t(s_lo, v_tile, k_tile, a_tile, g_vec, valid, lean, v_keep)
        if between is not None:
            between(vn_t)
        return state_update_t(s_t, vn_t, k_tile, g_d, g_last, valid, dtype)
    vn_t, _, factors = new_values_t(s_lo, v_tile, k_tile, a_tile, g_vec, valid, lean, v_keep,
                                    shadows=(before, lambda: decay_factors(s_t, g_d, g_last, valid)))
    return state_update_t(s_t, vn_t, k_tile, g_d, g_last, valid, dtype, factors=factors,
                                during=None if between is None else (lambda: between(vn_t)))


def chunk_loop(q, k, v, ag, gc, cu, h0, *, scale: float, group: int, n_out: int | None, t_valid: int,
               bv: int = 64, stages: int | None = None, lean: bool = True, bare: bool = True,
               direct_io: bool = False, overlap: bool = False, lrq=None, lrk=None, pm=None, interpret=None,
               _ablate: frozenset = frozenset(), program: bool = False):
    """``(o [T_q, HV, V] in q's dtype, final [n_out, HV, K, V] fp32 or None)``.

    q, k: [T_q, H, K]; v: [T_q, HV, V]; ag: [HV, T_pad, 64]; gc: [HV, T_pad] fp32 (from
    :func:`gdn.jax_backend.mosaic_gpu.intra.intra`; T_pad - 64 < T_q <= T_pad: a tile's rows past
    T_q are read as zeros, TMA fills them); cu: int32 [N_pad + 1] (the plan's cu_seqlens);
    h0: None or fp32 [N_h0, HV, K, V]; n_out: rows of the final state (None: no final state);
    t_valid <= T_q: tokens the caller's arrays hold (o's rows past it are not written).
    ``lean`` (default; False is the loop before 2026-12-04 s5): the state warpgroup's two
    [64, 64] NaN-isolation selects go (on a boundary tile it also zeroes v's and ``Ag``'s rows of
    other sequences, and ``X``'s columns take a masked ``exp(gc)``), and the output warpgroup's
    ``o * scale`` goes into its row exponents (``exp(gc_r + ln scale)``), as
    :func:`.chunk_loop_wide.chunk_loop_wide`'s ``lean``.
    ``bare`` (default; measured with ``lean`` on the H200, see the driver): compiled without
    Pallas's automatic warpgroup barriers (:func:`.common.compiler_params`); every SMEM write here is ordered explicitly (the ring's
    mbarriers; ``S^T`` / ``Vnew`` published with ``commit_smem`` before ``s_ready`` and rewritten
    after ``s_free``; the output tiles after the wait on their earlier TMA store; k's rows zeroed
    by the threads that loaded them; the state staging before the first publication and after the
    last release; with an explicit warpgroup barrier between reading the initial state's staging
    and the first publication, which reuses its bytes).
    ``direct_io`` (UNTIMED, off by default): the initial and final state go between global memory
    and the state warpgroup's registers without the SMEM staging (:func:`.common.load_state`,
    :func:`.common.store_state`), and the warpgroups' last waits on their TMA stores are for the
    SMEM reads only, as :func:`.chunk_loop_wide.chunk_loop_wide`'s ``direct_io``.
    ``overlap`` (UNTIMED, off): the state warpgroup's work that is off its chain runs while the
    chain's products compute: the publication of ``S^T``, V's load and ``exp(gc)`` during
    ``S^T K^T``; the state's decay and the factor ``exp(gc_last - gc)`` during ``W^T Ag^T``; the
    publication of ``Vnew`` (its store, fence and ``s_ready``) during the state update, where it
    used to wait in front of it. The same products and bits.
    ``lrq``, ``lrk`` (use_qk_l2norm, both or neither): fp32 [H, T_pad], ``ln rstd`` of each k head's q
    and k rows; q and k stay the caller's and the scales join the exponents of the factors on q's
    and k's rows (:func:`.chunk_loop_wide.chunk_loop_wide`'s).
    ``pm`` (with ``lean``; timed only inside the co-resident kernel, session 28): [HV, T_pad, 64] in q's dtype, each tile's P with o's scale in it,
    as the output warpgroup would form it (:func:`.intra.intra`'s ``p_scale``: the co-resident
    kernel's workers write it). The memory warpgroup loads it into the ring and the output
    warpgroup takes ``P Vnew``'s left operand from SMEM: no ``Q K^T`` and no decay here.
    """
    bad = set(_ablate) - set(ABLATIONS)
    if bad:
        raise ValueError(f"_ablate: unknown {sorted(bad)}; known {ABLATIONS}")
    if ("o_mm" in _ablate or "p_half" in _ablate) and bv != C:
        raise ValueError(f"_ablate: 'o_mm' and 'p_half' keep P in o's place and need bv == {C}, got {bv}")
    ab = frozenset(_ablate).__contains__
    chain_ab = any(ab(n) for n in ("xw", "w", "update", "publish"))
    t_rows, _, dk = q.shape  # the caller's tokens: the last tile may run past them (read as zeros)
    check_token_rows("q", t_rows)
    hv, dv = v.shape[1], v.shape[2]
    ns = cu.shape[0]  # N_pad + 1 grid rows: the sequences, then the zero writer of the tail
    nv = dv // bv
    dtype = q.dtype
    out_dtype = q.dtype
    isz, osz = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    l2 = has_row_scales(lrq, lrk)
    p_in = pm is not None
    if p_in:
        if not lean:
            raise ValueError("pm (P from the intra workers) holds o's scale: it needs lean=True")
        if pm.shape != (hv, ag.shape[1], C) or pm.dtype != dtype:
            raise ValueError(f"pm must be {(hv, ag.shape[1], C)} {dtype}, got {pm.shape} {pm.dtype}")
        if set(_ablate) & {"p", "p_half", "out"}:
            raise ValueError("_ablate: 'p', 'p_half' and 'out' are about the P formed here: not with pm")
    if stages is None:
        stages = pick_stages(dk, bv, isz, osz, l2, p_in)
    has_h0 = h0 is not None
    n_h0 = h0.shape[0] if has_h0 else 0
    out_final = n_out is not None
    interp = bool(interpret)

    out_type = [jax.ShapeDtypeStruct((t_rows, hv, dv), out_dtype)]
    if out_final:
        out_type.append(jax.ShapeDtypeStruct((n_out, hv, dk, dv), F32))
    vecs = plgpu.SMEM((stages, C), F32)
    scratch = dict(
        q_s=tile((stages, C, dk), dtype),
        k_s=tile((stages, C, dk), dtype),
        v_s=tile((stages, C, bv), dtype),
        a_s=tile((stages, C, C), dtype),
        gc_state=vecs,  # WG0: column view + the closing gate
        gc_rows=vecs,  # WG1: row view
        gc_cols=vecs,  # WG1: column view
        # S^T published for WG1 (16-bit), sharing its bytes with the fp32 [K, V] staging of the initial
        # and final state: WG0 alone touches both, the staging only before its first publication
        # and after WG1 released the last one.
        pub=(tile((2, bv, dk), dtype) if direct_io  # (no staging with direct_io)
             else plgpu.RefUnion(tile((2, bv, dk), dtype), plgpu.SMEM((dk, bv), F32))),
        vn_pub=tile((2, C, bv), dtype),
        o_out=tile((2, C, bv), out_dtype),
        o_part=plgpu.SMEM((C, bv), out_dtype),  # plain rows for the partial-tile row stores
        in_bar=plgpu.Barrier(num_arrivals=7 + 2 * l2 + p_in, num_barriers=stages),
        in_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        s_ready=plgpu.Barrier(num_barriers=2),
        s_free=plgpu.Barrier(num_barriers=2),
        st_bar=plgpu.Barrier(),
        done=plgpu.Barrier(num_arrivals=3),
    )
    if l2:  # q's row scales for WG1 (row view), k's for both (column view, read only)
        scratch.update(lq_rows=vecs, lk_cols=vecs)
    if p_in:  # P of each tile, for WG1
        scratch["p_s"] = tile((stages, C, C), dtype)

    def body(*refs, q_s, k_s, v_s, a_s, gc_state, gc_rows, gc_cols, pub, vn_pub, o_out, o_part,
             in_bar, in_free, s_ready, s_free, st_bar, done, lq_rows=None, lk_cols=None, p_s=None, cta=None,
             gate_wait=None):
        s_pub, st_s = (pub, None) if direct_io else pub
        refs = list(refs)
        q_ref, k_ref, v_ref, ag_ref, gc_ref, cu_ref = (refs.pop(0) for _ in range(6))
        pm_ref = refs.pop(0) if p_in else None
        lrq_ref, lrk_ref = (refs.pop(0), refs.pop(0)) if l2 else (None, None)
        h0_ref = refs.pop(0) if has_h0 else None
        o_ref = refs.pop(0)
        ht_ref = refs.pop(0) if out_final else None
        iv, j, n = (lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("n")) if cta is None else cta
        hk = lax.div(j, group)
        v0 = iv * bv
        wg = lax.axis_index("wg")
        is_seq = n < ns - 1
        nidx = jnp.minimum(n, ns - 2)
        a = cu_ref[nidx]
        b = jnp.where(is_seq, cu_ref[nidx + 1], a)  # the tail row walks no tiles
        nt, rows_of = seq_tiles(a, b)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(i, slot):
                t0, tok, _, _ = rows_of(i)
                bar = in_bar.at[slot]
                plgpu.copy_gmem_to_smem(q_ref.at[tok, hk], q_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(k_ref.at[tok, hk], k_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(v_ref.at[tok, j, pl.ds(v0, bv)], v_s.at[slot], bar)
                if gate_wait is not None:  # the co-resident kernel: the intra results of tile i are out
                    gate_wait(t0, hk)
                plgpu.copy_gmem_to_smem(ag_ref.at[j, tok], a_s.at[slot], bar)
                if p_in:
                    plgpu.copy_gmem_to_smem(pm_ref.at[j, tok], p_s.at[slot], bar)
                for buf in (gc_state, gc_rows, gc_cols):
                    plgpu.copy_gmem_to_smem(gc_ref.at[j, tok], buf.at[slot], bar)
                if l2:
                    plgpu.copy_gmem_to_smem(lrq_ref.at[hk, tok], lq_rows.at[slot], bar)
                    plgpu.copy_gmem_to_smem(lrk_ref.at[hk, tok], lk_cols.at[slot], bar)

            produce(nt, stages, issue, in_free)

        @pl.when(wg == 0)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            if has_h0:
                h0_blk = h0_ref.at[jnp.minimum(n, n_h0 - 1), j, :, pl.ds(v0, bv)]
                if direct_io:
                    s0 = load_state(h0_blk)
                else:
                    plgpu.copy_gmem_to_smem(h0_blk, st_s, st_bar)
                    plgpu.barrier_wait(st_bar)
                    s0 = plgpu.layout_cast(plgpu.load(st_s.T, layout=WGT), WG)  # [bv, K]
                # rows past N_h0 start from zero: a select (the clamped row read may hold NaN), its
                # predicate a full array (Mosaic's warpgroup select does not broadcast a scalar)
                live = plgpu.broadcasted_iota(jnp.int32, s0.shape, 0, layout=WG) < jnp.where(n < n_h0, bv, 0)
                s0 = jnp.where(live, s0, 0.0)
                if bare and not direct_io:  # the staging shares its bytes with s_pub: read by all before any write
                    plgpu.commit_smem()
            else:
                s0 = plgpu.layout_cast(jnp.zeros((bv, dk), F32), WG)
            tvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)  # token of each column

            def step(i, s_t):  # named scopes: regions of Mosaic's in-kernel profiler (no code without it)
                slot = lax.rem(i, stages)
                half = lax.rem(i, 2)
                _, _, lo, hi = rows_of(i)
                with jax.named_scope("s_wait"):
                    plgpu.barrier_wait(in_bar.at[slot])

                    @pl.when(i >= 2)
                    def _():  # WG1 is done with the tiles published two steps ago
                        plgpu.barrier_wait(s_free.at[half])

                # A boundary tile (at most two per sequence): the update Vnew^T K below contracts k's
                # token rows, so rows of other sequences must be 0 in k itself (a 0 in Vnew^T does not
                # remove a NaN row of k). One load / select / store of the SMEM tile, done here and not
                # on every tile: a tile wholly inside the sequence has no foreign rows and pays nothing.
                @pl.when((lo > 0) | (hi < C))
                def _():
                    zero_rows_outside(k_s.at[slot], lo, hi)
                    if lean:  # and v's and Ag's: W^T's and Vnew^T's columns of other tokens come out 0
                        zero_rows_outside(v_s.at[slot], lo, hi)
                        zero_rows_outside(a_s.at[slot], lo, hi)

                s_lo = s_t.astype(dtype)
                valid = (tvec >= lo) & (tvec < hi)  # the sequence's tokens of this tile
                g_vec = plgpu.load(gc_state.at[slot], layout=COLS)
                g_last = gc_state[slot, hi - 1]  # the gate of the last valid token closes the tile

                def publish_s():
                    s_pub.at[half][...] = s_lo

                def publish_vn(vn_t):  # S^T (written above) and Vnew for WG1
                    with jax.named_scope("s_publish"):
                        vn_pub.at[half].T[...] = vn_t.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(s_ready.at[half])

                lk = plgpu.load(lk_cols.at[slot], layout=COLS) if l2 else None
                if chain_ab:
                    s_new = ablated_step(s_t, s_lo, slot, half, g_vec, g_last, valid, lk, publish_s, publish_vn)
                else:
                    s_new = state_step(s_t, s_lo, v_s.at[slot], k_s.at[slot], a_s.at[slot], g_vec, g_last, valid,
                                       lean, dtype, overlap=overlap, before=publish_s, between=publish_vn, lk=lk)
                plgpu.barrier_arrive(in_free.at[slot])
                return s_new

            def ablated_step(s_t, s_lo, slot, half, g_vec, g_last, valid, lk, publish_s, publish_vn):
                """The state chain with the ``_ablate`` pieces dropped (a diagnostic: wrong results)."""
                g_x, g_d = k_scaled(g_vec, lk)
                if not ab("publish"):
                    publish_s()
                sh = (bv, C)
                if ab("xw"):
                    vn_t = plgpu.load(v_s.at[slot].T, layout=WG).astype(F32)
                elif ab("w"):
                    x_t = mm(s_lo, k_s.at[slot].T, sh)
                    vn_t = plgpu.load(v_s.at[slot].T, layout=WG).astype(F32) - x_t * cols(masked_exp(valid, g_x), sh)
                else:
                    vn_t = new_values_t(s_lo, v_s.at[slot], k_s.at[slot], a_s.at[slot], g_x, valid, lean)
                if ab("publish"):
                    plgpu.barrier_arrive(s_ready.at[half])
                else:
                    publish_vn(vn_t)
                if ab("update"):
                    return s_t * jnp.exp(g_last)
                return state_update_t(s_t, vn_t, k_s.at[slot], g_d, g_last, valid, dtype)

            s_t = lax.fori_loop(0, nt, step, s0)

            @pl.loop(jnp.maximum(nt - 2, 0), nt)
            def _drain(i):
                plgpu.barrier_wait(s_free.at[lax.rem(i, 2)])

            if out_final:
                @pl.when(n < n_out)
                def _():
                    if direct_io:
                        store_state(s_t, ht_ref.at[n, j, :, pl.ds(v0, bv)])
                        return
                    st_s.T[...] = plgpu.layout_cast(s_t, WGT)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(st_s, ht_ref.at[n, j, :, pl.ds(v0, bv)])
                    plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _output():
            plgpu.set_max_registers(232, action="increase")
            sq = (C, C)
            r, c = iota(sq, 0), iota(sq, 1)

            def store(o_lo, tok, lo, hi, half, t0):
                full = (lo == 0) & (hi == C) & (t0 + C <= t_valid)

                @pl.when(full)
                def _():
                    dst = o_ref.at[tok, j, pl.ds(v0, bv)]
                    if not (ab("store_wait") or ab("store_tma")):
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # o_out[half] of two tiles ago was sent
                    o_out.at[half][...] = o_lo
                    plgpu.commit_smem()
                    if not ab("store_tma"):
                        plgpu.copy_smem_to_gmem(o_out.at[half], dst)

                @pl.when(jnp.logical_not(full))
                def _():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_part of an earlier tile was sent
                    o_part[...] = o_lo
                    plgpu.commit_smem()
                    store_rows(o_part, lambda r: o_ref.at[pl.ds(t0 + r, 1), j, pl.ds(v0, bv)], lo,
                               jnp.minimum(hi, t_valid - t0))

            def step(i, carry):
                slot = lax.rem(i, stages)
                half = lax.rem(i, 2)
                t0, tok, lo, hi = rows_of(i)
                with jax.named_scope("o_wait"):
                    plgpu.barrier_wait(in_bar.at[slot])
                g_r = plgpu.load(gc_rows.at[slot], layout=ROWS)
                if lean:  # o's scale folded into both row exponents: exp(gc_r + ln scale)
                    g_r = g_r + math.log(scale)
                # with l2norm: P = (Q K^T) rstd(q_r) rstd(k_s) exp(gc_r - gc_s); o's rows (Q S) * rstd(q_r)
                g_r, g_c = qk_scaled(g_r, plgpu.load(gc_cols.at[slot], layout=COLS), lq_rows, lk_cols, slot)
                mask = (r >= c) & (c >= lo) & (c < hi)
                # On a boundary tile WG0 zeroes k_s rows of other sequences in place before s_ready:
                # read k_s only after it (no SMEM race; P loses its overlap with WG0 there only).
                # The select keeps P's NaN columns (k of another sequence) out either way.
                if ab("out"):  # a diagnostic: the hand-overs only
                    plgpu.barrier_wait(s_ready.at[half])
                    plgpu.barrier_arrive(s_free.at[half])
                    plgpu.barrier_arrive(in_free.at[slot])
                    return carry
                partial = (lo > 0) | (hi < C)
                if not p_in:
                    pl.when(partial)(lambda: plgpu.barrier_wait(s_ready.at[half]))
                with jax.named_scope("o_p"):
                    if p_in:  # the workers' P, the left operand of P Vnew straight from SMEM
                        p_lo = p_s.at[slot]
                    elif ab("p"):
                        p_lo = plgpu.layout_cast(jnp.zeros(sq, dtype), WG)
                    elif ab("p_half"):
                        @pl.when(lax.rem(i, 2) == 1)
                        def _():
                            p = mm(q_s.at[slot], k_s.at[slot].T, sq)
                            o_part[...] = masked_decay(mask, p, rows(g_r, sq) - cols(g_c, sq)).astype(dtype)
                        plgpu.commit_smem()
                        p_lo = plgpu.load(o_part, layout=WG)
                    else:
                        p = mm(q_s.at[slot], k_s.at[slot].T, sq)
                        p_lo = masked_decay(mask, p, rows(g_r, sq) - cols(g_c, sq)).astype(dtype)
                with jax.named_scope("o_wait_s"):
                    if p_in:
                        plgpu.barrier_wait(s_ready.at[half])
                    else:
                        pl.when(jnp.logical_not(partial))(lambda: plgpu.barrier_wait(s_ready.at[half]))
                with jax.named_scope("o_mm"):
                    if ab("o_mm"):
                        o = p_lo.astype(F32)  # P's product stays live (bv == C)
                    else:
                        o = mm(q_s.at[slot], s_pub.at[half].T, (C, bv))
                        o = mm(p_lo, vn_pub.at[half], (C, bv), init=o * rows(jnp.exp(g_r), (C, bv)))
                    plgpu.barrier_arrive(s_free.at[half])
                    plgpu.barrier_arrive(in_free.at[slot])
                with jax.named_scope("o_store"):
                    o_lo = (o if lean else o * scale).astype(out_dtype)
                    if not ab("store"):
                        store(o_lo, tok, lo, hi, half, t0)
                return carry

            lax.fori_loop(0, nt, step, None)

            # the tail row: zeros for the tokens past the last sequence, up to t_valid
            @pl.when(jnp.logical_not(is_seq))
            def _tail():
                z0 = cu_ref[ns - 1]
                zm0 = lax.div(z0, C)
                zt = jnp.where(t_valid > z0, lax.div(t_valid - 1, C) - zm0 + 1, 0)
                zero = plgpu.layout_cast(jnp.zeros((C, bv), out_dtype), WG)

                @pl.loop(0, zt)
                def _z(i):
                    t0 = (zm0 + i) * C
                    tok = pl.ds(pl.multiple_of(t0, C), C)
                    store(zero, tok, jnp.maximum(z0 - t0, 0), C, lax.rem(i, 2), t0)

            plgpu.wait_smem_to_gmem(0, wait_read_only=direct_io)

        finish_together(done)

    args = [q, k, v, ag, gc, cu] + ([pm] if p_in else []) + ([lrq, lrk] if l2 else []) + ([h0] if has_h0 else [])
    if program:
        names = (("q", "k", "v", "ag", "gc", "cu") + (("p",) if p_in else ()) + (("lrq", "lrk") if l2 else ())
                 + (("h0",) if has_h0 else ()))
        return LoopProgram(tuple(out_type), scratch, tuple(args), body, (nv, hv, ns), names)
    with tracing_for_interpreter(interp):
        outs = plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=scratch, grid=(nv, hv, ns), grid_names=("v", "h", "n"),
            num_threads=3, thread_name="wg", compiler_params=compiler_params(no_auto_barriers=bare),
            interpret=interpret_params(interpret), kernel_name="gdn_chunk_loop",
        )(*args)
    return outs[0], (outs[1] if out_final else None)


class LoopProgram(NamedTuple):
    """:func:`chunk_loop`'s kernel unlaunched (``program=True``), for a kernel that runs it beside
    other work (:mod:`.coresident`): its outputs' types, scratch, inputs, ``body(*inputs_and_outputs,
    cta=(iv, j, n), gate_wait=, **scratch)`` (``gate_wait(t0, hk)``: called by the memory
    warpgroup before it loads the ``Ag`` / ``gc`` of the tile whose first token is t0), its
    CTAs' grid and its inputs' names (``input_names``: "q", "k", "v", "ag", "gc", "cu", then "p",
    "lrq", "lrk", "h0" where present)."""
    out_type: tuple
    scratch: dict
    inputs: tuple
    body: Callable
    grid: tuple
    input_names: tuple
