"""The intra-tile stage of impl="mosaic_gpu": per aligned 64-token tile and v head, the decayed inverse
with beta folded in, ``Ag = (I + A)^-1 diag(beta)`` (k's dtype), for the chunk loop.

``A[r, s] = beta_r (k_r . k_s) exp(gc_r - gc_s)`` for ``r > s`` in one sequence, 0 otherwise, with
``gc`` the chunk-local, sequence-segmented gate cumsum, which this kernel also computes (a masked
[64, 64] row sum; an XLA scan instead cost 0.062 ms at 4x8192 on the H200, 2026-12-04, about twice
what it costs in here) and writes for the chunk loop. Organised for latency (the kernel is latency
bound: few warps per SM, a serial inverse):

* grid ``(H, ceil(tiles / tiles_per_cta))``: one CTA (one warpgroup) per q/k head and run of
  ``tiles_per_cta`` consecutive tiles. The k tile is loaded once and ``K K^T`` formed once per tile,
  then the ``G = HV / H`` v heads of the group (which differ only in g and beta) are done from it.
* the next tile's loads are in flight while the current one computes: g / beta / sequence ids are
  double-buffered (issued at the start of a tile), the single k buffer is refilled as soon as this
  tile's ``K K^T`` has been read out of it.
* output stores are waited for only before their SMEM is rewritten (``wait_read_only``), fully once
  at the end of the CTA.
* ``head_loop="loop"`` (the default) walks the group's heads in a loop instead of unrolling them.
  H200, 2026-12-04, 4x8192: with the cumsum outside the kernel (call 2) 237 registers instead of
  248 and 0.377 vs 0.403 ms alone; with it inside (today's kernel, call 3) 0.406 ms both ways, its
  register count not read (benchmarks/mosaic_notes.md).
* two v heads at a time, their merges' three product groups each issued for both before one wait,
  was built (``head_loop="pair"``, session 23, commit 84517f4) and measured SLOWER on the H200
  (alone 0.324 vs 0.221 ms at 4x8192, 0.308 vs 0.239 at 128x256; 255 registers and 592 B of spills);
  removed in session 24 (benchmarks/mosaic_notes.md).
* the inverse (:mod:`.solve`): the 16x16 diagonal blocks by substitution from padded fp32 SMEM
  (``solve_pad``), reading ``-A`` by columns so ``A``'s decay is exponentiated once
  (``solve_columns``), then merged in three dependent product groups (``merge_variant="chain"``).
  H200, 2026-12-04 (session 2, calls 2 and 4), against the same kernel without the three: intra
  alone at 4x8192 0.371 ms with the padding vs 0.400 without (bit-identical output); whole prefill,
  timed interleaved, 0.819 / 1.031 / 0.278 ms at 4x8192 / 128x256 / 4x2048 against 0.853 / 1.089 /
  0.302. ptxas: 253-255 registers, so still 2 CTAs per SM.

Sequences sharing a tile split it into independent blocks; every entry across two sequences is made
exactly 0 by a select (solve.py's docstring), so a NaN / inf in one sequence never reaches another's
rows. Only such shared tiles pay for it (``isolate="boundary"``): a tile of one sequence (its first
and last sequence ids agree) runs the same code without the selects and the sequence-id compares
(the cumsum's, the substitution's), the same bits. H200, 2026-12-04 (session 3, call e2): intra
alone 0.222 vs 0.337 ms at 4x8192, 0.221 vs 0.341 at 128x256; whole prefill 0.680 vs 0.796 ms at
4x8192 (interleaved). SMEM per CTA at K = 128, 16-bit inputs: ~70 KB.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, MAX_GRID_YZ, ROWS, check_token_rows, cols, compiler_params, interpret_params,
                     iota, masked_decay, mm, products_then, rows, tile, tracing_for_interpreter)
from .solve import decayed_a, diag_block_inverse, merge, merge_chain

#: tiles per CTA unless the caller says otherwise (4x8192, H = 16: 2048 CTAs of 4 tiles x 2 v heads;
#: 2, 4 and 8 timed within 3% of each other on the H200, 2026-12-03)
TILES_PER_CTA = 4
HEAD_LOOPS = ("unroll", "loop")
MERGES = ("levels", "chain")
#: fp32 words of padding per row of the substitution's SMEM buffers: the WGMMA register layout stores
#: 8 rows per warp instruction, which at the unpadded 256-byte row stride all hit the same banks
#: (8-way conflicts; jax-linear-attention's kkt kernel measured them at 30% of its time on an H100).
SOLVE_PAD = 8

#: which tiles keep their tokens' sequences apart by selects (docs/RELIABILITY.md §2): "boundary",
#: only tiles that hold tokens of another sequence (a tile inside one sequence has nothing to keep
#: apart and runs the same arithmetic without the selects: the same bits); "all", every tile. The
#: chunk loops select on every tile: the same branch there (a ``lax.cond`` around the state chain's
#: Vnew step) was slower on the H200 (2026-12-04, call e3: 0.718 vs 0.689 ms at 4x8192, 1.330 vs
#: 1.136 at 1x32768).
ISOLATE = ("boundary", "all")
OUT_BUFFERS = (1, 2)
#: how the 16x16 diagonal blocks are inverted: "smem" (the substitution through padded fp32 SMEM, one
#: thread per column) or "warp" (each warp its block in registers by shuffles,
#: :func:`solve.warp_solve_steps`; needs ``solve_columns``). H100, 2026-12-06 (session 16, calls
#: w1 / w2): the same bits as "smem" on the GPU, alone 0.198 vs 0.200 ms at 4x8192, 0.199 vs 0.201 at
#: 128x256, 0.061 vs 0.062 at 4x2048 (within noise); not yet on the H200, so not the default yet
SOLVES = ("smem", "warp")
#: warpgroups per CTA: 1, or 3 independent ones (each its own run of tiles, scratch and barriers):
#: 384 threads make ptxas fit 168 registers, so 3 warpgroups share an SM instead of 2 (245
#: registers). Needs ``solve="warp"`` (SMEM: 3 x ~67 KB) and keeps ``K K^T`` in SMEM. SLOWER: whole
#: prefill 0.614 vs 0.589 ms at 4x8192, 0.894 vs 0.873 at 128x256 (H100, 2026-12-06, same bits).
#: 2: the same two-way (for the co-resident kernel, :mod:`.coresident`, where q's tile for
#: use_qk_l2norm's norms does not fit three copies); UNTIMED alone.
WARPGROUPS = (1, 2, 3)


def check_options(head_loop: str, merge_variant: str, solve_pad: int, solve_columns: bool, isolate: str,
                  out_buffers: int = 2, solve: str = "smem", warpgroups: int = 1,
                  names: tuple[str, ...] = ("merge_variant", "solve_pad", "solve_columns", "isolate",
                                            "out_buffers", "solve", "warpgroups")) -> None:
    """ValueError / TypeError for a bad option of :func:`intra`; ``names``: what the caller calls the
    last seven."""
    if head_loop not in HEAD_LOOPS:
        raise ValueError(f"head_loop must be one of {HEAD_LOOPS}, got {head_loop!r}")
    if merge_variant not in MERGES:
        raise ValueError(f"{names[0]} must be one of {MERGES}, got {merge_variant!r}")
    if not isinstance(solve_pad, int) or isinstance(solve_pad, bool) or solve_pad < 0 or solve_pad % 4:
        raise ValueError(f"{names[1]} must be a non-negative multiple of 4 (16-byte rows), got {solve_pad!r}")
    if not isinstance(solve_columns, bool):
        raise TypeError(f"{names[2]} must be a bool, got {solve_columns!r}")
    if isolate not in ISOLATE:
        raise ValueError(f"{names[3]} must be one of {ISOLATE}, got {isolate!r}")
    if out_buffers not in OUT_BUFFERS or isinstance(out_buffers, bool):
        raise ValueError(f"{names[4]} must be one of {OUT_BUFFERS}, got {out_buffers!r}")
    if solve not in SOLVES:
        raise ValueError(f"{names[5]} must be one of {SOLVES}, got {solve!r}")
    if solve == "warp" and not solve_columns:
        raise ValueError(f"{names[5]}='warp' reads -A by columns: it needs {names[2]}=True")
    if warpgroups not in WARPGROUPS or isinstance(warpgroups, bool):
        raise ValueError(f"{names[6]} must be one of {WARPGROUPS}, got {warpgroups!r}")
    if warpgroups > 1 and solve != "warp":
        raise ValueError(f"{names[6]}={warpgroups} needs {names[5]}='warp' (three copies of the SMEM "
                         f"substitution's buffers do not fit one SM)")


def intra(k, g_hm, beta_hm, seg, *, group: int, tiles_per_cta: int | None = None, head_loop: str = "loop",
          solve_pad: int = SOLVE_PAD, merge_variant: str = "chain", solve_columns: bool = True,
          isolate: str = "boundary", out_buffers: int = 2, solve: str = "smem", warpgroups: int = 1,
          interpret=None,
          debug_inverse: bool = False, lrk=None, q=None, norms: bool = True, p_scale: float | None = None,
          p_together: bool = False, program: bool = False):
    """``(Ag [HV, T_pad, 64] in k's dtype, gc [HV, T_pad] fp32)`` (+ ``Ai [HV, T_pad, 64]`` fp32 with
    ``debug_inverse``) (+ ``lrq, lrk`` [H, T_pad] fp32 with ``q`` and ``norms``) (+ ``P`` [HV, T_pad, 64] in
    k's dtype with ``p_scale``).

    k: [T_k, H, K] with T_pad - 64 < T_k <= T_pad (the rows of the last tile past T_k are read as
    zeros: TMA fills them); g_hm, beta_hm: [HV, T_pad] fp32 (T_pad a multiple of 64), HV = H * group;
    seg: [T_pad] int32 sequence ids, non-decreasing (tokens past the last sequence: one more id).
    Row ``t`` of ``Ag[j]`` holds the columns of t's tile: ``Ag[j, t, s - 64 (t // 64)]``; ``gc`` is
    the chunk-local gate cumsum, segmented by sequence. ``solve_pad``: row padding of the
    substitution's fp32 buffers (:data:`SOLVE_PAD`); ``merge_variant``: "levels" (:func:`solve.merge`,
    16 -> 32 -> 64) or "chain" (:func:`solve.merge_chain`, three dependent product groups);
    ``solve_columns``: the substitution reads ``-A`` a column at a time (one masked exponential per
    element instead of two; :func:`solve._diag_solve_body`); ``isolate``: :data:`ISOLATE`
    (here a tile of one sequence also skips the sequence-id compares of the cumsum and the
    substitution; "all" is the kernel before 2026-12-04, session 3). ``out_buffers``: 1 or 2 SMEM
    stagings of a head's outputs (``Ag``, ``gc``): with 2 (the default), a head waits for the stores
    of the head two before it, not the one just issued (H200, 2026-12-04: alone 0.207 vs 0.214 ms at
    4x8192, 0.206 vs 0.221 at 128x256, same bits). Compiled with Pallas's automatic warpgroup
    barriers: without them (tried 2026-12-04 s5, call g1) it measured 0.225 vs 0.208 ms alone at
    4x8192, 0.206 vs 0.211 at 128x256, so unlike the chunk loops it keeps them.
    ``solve``: :data:`SOLVES` (the interpreter runs the same jnp substitution for both).
    ``warpgroups``: :data:`WARPGROUPS`.
    ``lrk`` (use_qk_l2norm): fp32 [H, T_pad], ``ln rstd(k_t)`` per k head and token: k is the caller's,
    not normalized, and ``K K^T`` is scaled by ``rstd(k_r) rstd(k_s)`` once per tile (in fp32, so
    the normalized k is never rounded to the input dtype).
    ``q`` (use_qk_l2norm with the norms in here; ``lrk`` must then be None): q [T_k, H, K], k's
    dtype. The kernel also loads q's tile and returns ``ln rstd`` of q's and k's rows (``rstd =
    1 / sqrt(sum x^2 + 1e-6)``), for the chunk loops, and scales ``K K^T`` by them: the sums of
    squares are the diagonals of ``Q Q^T`` and of ``K K^T`` (fp32 accumulation), so no separate
    reduction reads q and k (H200, 2026-12-05: XLA's two reductions took 0.075 ms of a 0.66 ms
    prefill at 4x8192). Tokens past T_k read as zeros: their factor is 1e3, on zero rows.
    ``norms`` (with ``q``; default True): compute and return q's and k's norms as above; False: q's
    tile is loaded for ``p_scale``'s P only (no use_qk_l2norm).
    ``p_scale`` (with ``q``; timed only inside the co-resident kernel, session 28): also return
    ``P`` [HV, T_pad, 64] in k's dtype, each tile's ``mask(Q K^T exp(gc_r + ln p_scale - gc_s))``
    (with the norms, times ``rstd(q_r) rstd(k_s)``), the mask keeping ``s <= r`` of one sequence:
    what the narrow chunk loop's output warpgroup forms for its ``P Vnew``, in the same arithmetic
    (its ``pm``). ``p_together`` (UNTIMED, off: the kernel timed in session 29): ``Q K^T`` and
    ``K K^T`` issued as one group, ``Q K^T`` stored to SMEM while ``K K^T`` is on the tensor cores.
    ``program``: return the kernel unlaunched (:class:`IntraProgram`; ``warpgroups`` > 1).
    """
    t_k, h, dk = k.shape
    hv, t_pad = g_hm.shape
    if hv != h * group:
        raise ValueError(f"HV ({hv}) must be H ({h}) x group ({group})")
    has_rk = lrk is not None
    has_q = q is not None
    do_norms = has_q and norms
    p_out = p_scale is not None
    if p_out and not has_q:
        raise ValueError("p_scale (P for the chunk loop) needs q")
    if has_q and (has_rk or q.shape != k.shape or q.dtype != k.dtype):
        raise ValueError(f"q must match k ({k.shape}, {k.dtype}) and lrk be None, got q {q.shape} "
                         f"{q.dtype}, lrk {None if lrk is None else lrk.shape}")
    if has_rk and lrk.shape != (h, t_pad):
        raise ValueError(f"lrk must have shape {(h, t_pad)} (H, T_pad), got {lrk.shape}")
    if t_pad % C or not t_pad - C < t_k <= t_pad:
        raise ValueError(f"g_hm's tokens ({t_pad}) must be whole tiles of {C} and k's ({t_k}) end in the last")
    check_token_rows("k", t_k)
    check_options(head_loop, merge_variant, solve_pad, solve_columns, isolate, out_buffers, solve, warpgroups)
    warp = solve == "warp"
    nwg = warpgroups
    if nwg > 2 and has_q:  # q's tile per warpgroup: 247,880 B of SMEM (norms), over the SM's 232,448
        raise ValueError("warpgroups=3 does not fit SMEM with q's tile (q's norms computed here, use_qk_l2norm "
                         "with qk_norms='intra', or P for the chunk loop): use 2, or qk_norms='xla'")
    if nwg > 1 and debug_inverse:  # its fp32 staging three times over: 293,960 B (H100, 2026-12-06)
        raise ValueError("warpgroups=3 does not fit SMEM with debug_inverse (an fp32 copy of the inverse "
                         "per warpgroup): check its stages with one warpgroup")
    nb = out_buffers
    n_tiles = t_pad // C
    tpc = max(1, min(int(tiles_per_cta or TILES_PER_CTA), n_tiles))
    n_cta = -(-n_tiles // tpc)
    if h > MAX_GRID_YZ:
        raise NotImplementedError("too many heads for one launch")
    dtype = k.dtype
    out_type = [jax.ShapeDtypeStruct((hv, t_pad, C), dtype), jax.ShapeDtypeStruct((hv, t_pad), F32)]
    if debug_inverse:
        out_type.append(jax.ShapeDtypeStruct((hv, t_pad, C), F32))
    if do_norms:
        out_type += [jax.ShapeDtypeStruct((h, t_pad), F32)] * 2
    if p_out:
        out_type.append(jax.ShapeDtypeStruct((hv, t_pad, C), dtype))
    lead = (nwg,) if nwg > 1 else ()  # one copy of every buffer per warpgroup

    def smem(shape, dt, tiled=False):
        return tile(lead + shape, dt) if tiled else plgpu.SMEM(lead + shape, dt)

    vec = smem((2, group, C), F32)
    scratch = dict(
        k_s=smem((C, dk), dtype, True),
        g_s=vec, b_r=vec, b_c=vec,  # beta: one copy per layout it is read in
        s_r=smem((2, C), jnp.int32),
        s_c=smem((2, C), jnp.int32),
        lo_s=smem((C, C), dtype, True),
        ag_s=smem((2, C, C) if nb == 2 else (C, C), dtype, True),
        gc_s=smem((2, C) if nb == 2 else (C,), F32),
        bar_k=plgpu.Barrier(num_arrivals=1 + has_q, num_barriers=nwg),
        bar_s=plgpu.Barrier(num_arrivals=5 + 2 * has_rk, num_barriers=2 * nwg),
    )
    if not warp:  # the substitution's operand and result
        scratch.update(na_s=smem((C, C + solve_pad), F32), x_s=smem((C, C + solve_pad), F32))
    if nwg > 1:  # K K^T across the head loop (in registers it would not fit the 168-register cap)
        scratch["kk_s"] = smem((C, C + SOLVE_PAD), F32)
    if has_rk:  # k's row scales, one copy per layout they are read in
        scratch.update(rk_r=smem((2, C), F32), rk_c=smem((2, C), F32))
    if has_q:  # q's tile (refilled like k's)
        scratch["q_s"] = smem((C, dk), dtype, True)
    if do_norms:  # the tile's ln rstd of q and k for their TMA stores
        scratch["nrm_s"] = smem((2, 2, C), F32)
    if p_out:  # Q K^T across the head loop (fp32, unpadded: SMEM), and each head's P for its TMA store
        scratch.update(qk_s=smem((C, C), F32), p_s=smem((2, C, C) if nb == 2 else (C, C), dtype, True))
    if debug_inverse:
        scratch["ai_s"] = smem((2, C, C) if nb == 2 else (C, C), F32)
    interp = bool(interpret)
    sq = (C, C)

    def body(*refs, k_s, g_s, b_r, b_c, s_r, s_c, lo_s, ag_s, gc_s, bar_k, bar_s, na_s=None, x_s=None, ai_s=None,
             rk_r=None, rk_c=None, q_s=None, nrm_s=None, kk_s=None, qk_s=None, p_s=None, cta=None, bar_s_base=0,
             sched=None, after_tile=None):
        refs = list(refs)
        k_ref, g_ref, b_ref, seg_ref = (refs.pop(0) for _ in range(4))
        lrk_ref = refs.pop(0) if has_rk else None
        q_ref = refs.pop(0) if has_q else None
        ag_ref, gc_ref = refs.pop(0), refs.pop(0)
        ai_ref = refs.pop(0) if debug_inverse else None
        lrq_out, lrk_out = (refs.pop(0), refs.pop(0)) if do_norms else (None, None)
        p_ref = refs.pop(0) if p_out else None
        if sched is None:  # the CTA's run of consecutive tiles of one k head
            hk0 = lax.axis_index("h")
            cta = lax.axis_index("m") if cta is None else cta
            first = cta * tpc
            count = jnp.minimum(tpc, n_tiles - first)

            def where(i):
                return first + i, hk0
        else:  # the caller's (count, where(i) -> (tile, k head)): the co-resident kernel's workers
            count, where = sched

        def tok_of(i):
            return pl.ds(pl.multiple_of(where(i)[0] * C, C), C)

        def hk_of(i):
            return where(i)[1]

        def issue_k(i):
            plgpu.copy_gmem_to_smem(k_ref.at[tok_of(i), hk_of(i)], k_s, bar_k)
            if has_q:
                plgpu.copy_gmem_to_smem(q_ref.at[tok_of(i), hk_of(i)], q_s, bar_k)

        def issue_small(i, slot):
            tok, hk = tok_of(i), hk_of(i)
            heads = pl.ds(hk * group, group)
            pairs = [(g_ref.at[heads, tok], g_s), (b_ref.at[heads, tok], b_r), (b_ref.at[heads, tok], b_c),
                     (seg_ref.at[tok], s_r), (seg_ref.at[tok], s_c)]
            if has_rk:
                pairs += [(lrk_ref.at[hk, tok], rk_r), (lrk_ref.at[hk, tok], rk_c)]
            for src, dst in pairs:
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bar_s.at[bar_s_base + slot])

        def first_loads():
            issue_k(0)
            issue_small(0, 0)

        # a warpgroup past the last tile has nothing to load (one warpgroup per CTA always has a tile)
        pl.when(count > 0)(first_loads) if nwg > 1 else first_loads()

        def same_seq(slot):
            """[64, 64] bool, tokens r and s of one sequence; re-read from SMEM at each use, so the mask
            is not one more array kept in registers across the whole tile."""
            return (rows(plgpu.load(s_r.at[slot], layout=ROWS), sq)
                    == cols(plgpu.load(s_c.at[slot], layout=COLS), sq))

        def one_head(e, kk, slot, tok, hk, apart: bool, nth):
            """v head ``hk * group + e`` of the tile; ``apart``: the tile holds tokens of several
            sequences, kept apart by selects (static: the caller branches on the tile). The named
            scopes are regions of Mosaic's in-kernel profiler (tests/gpu/mosaic_gpu_check.py --only
            profile); no code without it."""
            j = hk * group + e
            r, c = iota(sq, 0), iota(sq, 1)
            same = (lambda: same_seq(slot)) if apart else (lambda: None)
            if nb == 2:  # this head's output staging: the two alternate from head to head
                buf = lax.rem(nth, 2)
                ag_s_, gc_s_, ai_s_ = ag_s.at[buf], gc_s.at[buf], ai_s.at[buf] if debug_inverse else None
                p_s_ = p_s.at[buf] if p_out else None
            else:
                ag_s_, gc_s_, ai_s_, p_s_ = ag_s, gc_s, ai_s, p_s
            with jax.named_scope("cumsum"):  # segmented, chunk-local: a masked [64, 64] row sum
                g_col = plgpu.load(g_s.at[slot, e], layout=COLS)
                upto = (c <= r) & same() if apart else c <= r
                gam_r = jnp.where(upto, cols(g_col, sq), 0.0).sum(axis=1)
                # the stores that last read this staging (the previous head's, or with two stagings the
                # head's before it: one commit group per head) must be done before it is rewritten
                plgpu.wait_smem_to_gmem(nb - 1, wait_read_only=True)
                gc_s_[...] = gam_r
                plgpu.commit_smem()
                gam_c = plgpu.load(gc_s_, layout=COLS)  # the same fp32 values, column layout
            with jax.named_scope("decay_a"):
                if kk_s is not None:
                    kk = plgpu.load(kk_s.at[:, :C], layout=plgpu.Layout.WGMMA, optimized=False)
                beta_row = plgpu.load(b_r.at[slot, e], layout=ROWS)
                beta_col = plgpu.load(b_c.at[slot, e], layout=COLS)
                a_low, na_t = decayed_a(kk, rows(gam_r, sq), cols(gam_c, sq), beta_row, beta_col, same(),
                                        r, c, sq, interp, from_columns=solve_columns)
                a_lo16 = a_low.astype(dtype)  # what the merges use (they round A to the input dtype)
            with jax.named_scope("diag_solve"):
                x = diag_block_inverse(a_low, na_t, None if warp else na_s.at[:, :C],
                                       None if warp else x_s.at[:, :C], interpret=interp,
                                       same=same() if interp else None, seg_ref=s_r.at[slot] if apart else None,
                                       from_columns=solve_columns, warp=warp)
            with jax.named_scope("merge"):
                if merge_variant == "chain":  # ag_s is free here: the wait before gc_s's rewrite covers it
                    x = merge_chain(x, a_lo16, lo_s, ag_s_, dtype, same=same())
                else:
                    x = merge(x, a_lo16, lo_s, dtype, same=same())
            with jax.named_scope("store"):
                ag = x * cols(plgpu.load(b_c.at[slot, e], layout=COLS), sq)
                ag_s_[...] = (jnp.where(same(), ag, 0.0) if apart else ag).astype(dtype)
                if debug_inverse:
                    ai_s_[...] = x
                if p_out:
                    p_s_[...] = p_tile(gam_r, gam_c, slot, apart)
                plgpu.commit_smem()
                grouped = dict(commit_group=False) if nb == 2 else {}
                plgpu.copy_smem_to_gmem(ag_s_, ag_ref.at[j, tok], **grouped)
                plgpu.copy_smem_to_gmem(gc_s_, gc_ref.at[j, tok], **grouped)
                if debug_inverse:
                    plgpu.copy_smem_to_gmem(ai_s_, ai_ref.at[j, tok], **grouped)
                if p_out:
                    plgpu.copy_smem_to_gmem(p_s_, p_ref.at[j, tok], **grouped)
                if nb == 2:
                    plgpu.commit_smem_to_gmem_group()

        def p_tile(gam_r, gam_c, slot, apart: bool):
            """The head's P in k's dtype, as the narrow chunk loop's output warpgroup forms it: its
            row exponents ``gc_r + ln p_scale (+ ln rstd(q_r))``, its column ones ``gc_s (- ln
            rstd(k_s))``, the select on ``s <= r`` of one sequence (the loop's ``[lo, hi)`` columns
            for the rows of its sequence)."""
            r, c = iota(sq, 0), iota(sq, 1)
            g_r = gam_r + math.log(p_scale)
            if do_norms:
                g_r = g_r + plgpu.load(nrm_s.at[slot, 0], layout=ROWS)
                g_c = gam_c - plgpu.load(nrm_s.at[slot, 1], layout=COLS)
            else:
                g_c = gam_c
            mask = (r >= c) & same_seq(slot) if apart else r >= c
            qk = plgpu.load(qk_s, layout=plgpu.Layout.WGMMA, optimized=False)
            return masked_decay(mask, qk, rows(g_r, sq) - cols(g_c, sq)).astype(dtype)

        def group_heads(kk, slot, tok, hk, apart: bool, i):
            if head_loop == "loop" and group > 1:
                @pl.loop(0, group)
                def _head(e):
                    one_head(e, kk, slot, tok, hk, apart, i * group + e)
            else:
                for e in range(group):
                    one_head(e, kk, slot, tok, hk, apart, i * group + e)

        def ln_rstd(gram):
            """ln rstd of the rows whose [64, 64] Gram matrix is ``gram``: from its diagonal."""
            eye = iota(sq, 0) == iota(sq, 1)
            return -0.5 * jnp.log(jnp.where(eye, gram, 0.0).sum(axis=1) + 1e-6)

        def q_norms(slot):
            """The tile's ln rstd of q's rows into ``nrm_s[slot, 0]``."""
            lq = ln_rstd(mm(q_s, q_s.T, sq))
            # this slot's last stores (tile i - 2's) were grouped with tile i - 2's first head: every
            # group but the newest (tile i - 1's last head's) done covers them
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            nrm_s.at[slot, 0][...] = lq

        def scale_by_norms(kk, slot, tok, hk):
            """K K^T scaled by rstd(k_r) rstd(k_s) (from its diagonal); the tile's ln rstd of q
            and k stored (they join the next commit group of the outputs)."""
            lk = ln_rstd(kk)
            nrm_s.at[slot, 1][...] = lk
            plgpu.commit_smem()
            kk = kk * rows(jnp.exp(lk), sq) * cols(jnp.exp(plgpu.load(nrm_s.at[slot, 1], layout=COLS)), sq)
            plgpu.copy_smem_to_gmem(nrm_s.at[slot, 0], lrq_out.at[hk, tok], commit_group=False)
            plgpu.copy_smem_to_gmem(nrm_s.at[slot, 1], lrk_out.at[hk, tok], commit_group=False)
            return kk

        @pl.loop(0, count)
        def _tile(i):
            slot = lax.rem(i, 2)
            tok, hk = tok_of(i), hk_of(i)

            # the other slot was last read by tile i - 1, which ended with a warpgroup barrier
            @pl.when(i + 1 < count)
            def _():
                issue_small(i + 1, 1 - slot)

            with jax.named_scope("wait_in"):
                plgpu.barrier_wait(bar_k)
                plgpu.barrier_wait(bar_s.at[bar_s_base + slot])
            with jax.named_scope("kk"):
                if do_norms:  # q's norms first: Q Q^T's registers are free before K K^T takes its own
                    q_norms(slot)
                if p_out and p_together:  # Q K^T stored for every head's P while K K^T computes
                    def keep(qk):
                        qk_s[...] = qk
                    (kk,) = products_then([(sq, None, [(q_s, k_s.T)])], [(sq, None, [(k_s, k_s.T)])], keep)
                else:
                    if p_out:  # Q K^T for every head's P, kept in SMEM across the head loop
                        qk_s[...] = mm(q_s, k_s.T, sq)
                    kk = mm(k_s, k_s.T, sq)  # symmetric: serves A and A^T; shared by the group's v heads
                plgpu.commit_smem()  # every warp is past its read of k_s (and q_s)
                if do_norms:
                    kk = scale_by_norms(kk, slot, tok, hk)
                elif has_rk:  # the normalized keys' products, in fp32
                    kk = (kk * rows(jnp.exp(plgpu.load(rk_r.at[slot], layout=ROWS)), sq)
                          * cols(jnp.exp(plgpu.load(rk_c.at[slot], layout=COLS)), sq))

            @pl.when(i + 1 < count)
            def _():
                issue_k(i + 1)

            if kk_s is not None:  # read back by other threads: Pallas's automatic barriers order the store
                kk_s.at[:, :C][...] = kk
                plgpu.commit_smem()
                kk = None  # each head reloads it: not live across the head loop
            if isolate == "all":
                group_heads(kk, slot, tok, hk, True, i)
            else:  # ids are non-decreasing: the tile is one sequence's iff its first and last agree
                single = s_r[slot, 0] == s_r[slot, C - 1]
                pl.when(single)(lambda: group_heads(kk, slot, tok, hk, False, i))
                pl.when(jnp.logical_not(single))(lambda: group_heads(kk, slot, tok, hk, True, i))
            if after_tile is not None:  # the co-resident kernel: tell the chunk loop this tile is out
                after_tile(i)

        plgpu.wait_smem_to_gmem(0)

    def body_per_warpgroup(*refs, bar_k, bar_s, sched_of=None, after_tile_of=None, **bufs):
        """``warpgroups`` > 1: warpgroup ``wg`` is CTA ``m * warpgroups + wg`` of the one-warpgroup
        kernel, on its own copy of every buffer and barrier. ``sched_of(wg)`` / ``after_tile_of(wg)``
        (the co-resident kernel, :mod:`.coresident`): the warpgroup's ``(count, where)`` of tiles
        and what it does after each instead."""
        wg = lax.axis_index("wg")
        mine = {name: ref.at[wg] for name, ref in bufs.items()}
        extra = {} if sched_of is None else dict(sched=sched_of(wg), after_tile=after_tile_of(wg))
        body(*refs, bar_k=bar_k.at[wg], bar_s=bar_s, bar_s_base=2 * wg,
             cta=lax.axis_index("m") * nwg + wg if sched_of is None else None, **mine, **extra)

    inputs = (k, g_hm, beta_hm, seg, *([lrk] if has_rk else []), *([q] if has_q else []))
    if program:
        if nwg == 1:
            raise ValueError("program=True needs warpgroups > 1 (each warpgroup its own run of tiles)")
        out_names = (("ag", "gc") + (("ai",) if debug_inverse else ()) + (("lrq", "lrk") if do_norms else ())
                     + (("p",) if p_out else ()))
        return IntraProgram(tuple(out_type), scratch, inputs, body_per_warpgroup, nwg, out_names,
                            group if nb == 2 else None)
    with tracing_for_interpreter(interp):
        threads = dict(num_threads=nwg, thread_name="wg") if nwg > 1 else {}
        outs = plgpu.kernel(
            body if nwg == 1 else body_per_warpgroup, out_type=tuple(out_type), scratch_types=scratch,
            grid=(h, -(-n_cta // nwg)), grid_names=("h", "m"), compiler_params=compiler_params(),
            interpret=interpret_params(interpret), kernel_name="gdn_intra", **threads,
        )(*inputs)
    return tuple(outs)


class IntraProgram(NamedTuple):
    """:func:`intra`'s kernel unlaunched (``program=True``), for a kernel that runs it beside other
    work (:mod:`.coresident`): its outputs' types, SMEM scratch (a copy per warpgroup), inputs, and
    ``body(*inputs_and_outputs, sched_of=, after_tile_of=, **scratch)``, one run of tiles per
    warpgroup; ``out_names``: each output's name ("ag", "gc", "ai", "lrq", "lrk", "p"), as
    :class:`.chunk_loop.LoopProgram` names its inputs; ``groups_per_item``: the TMA store commit
    groups a (tile, k head) item issues (one per v head with two output stagings; None with one)."""
    out_type: tuple
    scratch: dict
    inputs: tuple
    body: Callable
    warpgroups: int
    out_names: tuple
    groups_per_item: int | None = None
