"""The "wide" chunk loop (``chunk_variant="wide"``): one CTA per (sequence, v head) owning all V columns,
two state chains per SM, each tile's V-independent work done once by a prep warpgroup.

Same inputs, outputs and numerics contract as :func:`.chunk_loop.chunk_loop`; grid ``(HV, N_pad + 1)``
instead of ``(V / 64, HV, N_pad + 1)``: at 4x8192 with 32 v heads, 128 CTAs in one wave on 132 SMs
(or, with ``ctas``, a persistent grid whose CTAs each walk several of those (sequence, head) items
as one stream of tiles).
Warpgroups (``nsw = V / 64`` state warpgroups, V in {64, 128}):

* the prep warpgroup (``nsw``): TMA loads of q, k (head ``j // G``), the ``nsw`` 64-column v blocks,
  the intra kernel's ``Ag`` and ``gc`` into a ``stages``-deep ring; then, per tile and once for all
  state warpgroups, what does not depend on the state:
      P  = mask((Q K^T) exp(gc_r - gc_s))                  -> SMEM (input dtype)
      Q <- diag(exp(gc)) Q                                  (in place, input dtype)
      k, v rows of other sequences <- 0                     (boundary tiles only)
  and signals ``ready``. It refills a slot once both state warpgroups released it.
* state warpgroup ``w`` (V columns ``[64 w, 64 w + 64)``) keeps ``S^T`` ([64, K] fp32) in registers
  for the whole sequence and forms its own output columns (nothing is published to another
  warpgroup). Per tile, with ``Sl = S^T`` in the input dtype, three dependent groups of products,
  each issued back to back and waited for once (:func:`.common.products`):
      1.  U^T = V^T Ag^T  (both from SMEM: needs no state)   and   X = Sl K^T
      2.  Vnew^T = U^T - mask(X diag(exp(gc))) Ag^T          (= ((I+A)^-1 diag(beta) (V - diag(e) K S))^T)
      3.  S^T <- exp(gc_last) S^T + (Vnew^T diag(mask exp(gc_last - gc))) K
          o^T  = Sl (diag(exp(gc)) Q)^T + Vnew^T P^T          (= (diag(e) Q S + P Vnew)^T)
  ``o^T`` leaves through a transposed SMEM store and one TMA store (row stores on a partial tile).
  The two state warpgroups' chains interleave on the SM's tensor cores.

The products and their operand dtypes are the default loop's, except two roundings that move:
``diag(exp(gc)) Q`` is rounded to the input dtype once (the default loop scales ``Q S`` in fp32), and
``V`` enters the product ``U = Ag V`` unrounded (the default loop rounds ``V - diag(e) K S``).

NaN / inf of a neighbouring sequence in a shared tile (docs/RELIABILITY.md §2): the prep warpgroup
zeroes the k and v rows of other sequences in SMEM on a boundary tile before any product contracts
them, P's columns of other tokens are selected to 0, and the state warpgroups select the columns of
other tokens away in ``X`` and ``Vnew^T``; the intra kernel's ``Ag`` is exactly 0 across sequences.

The initial / final state of each state warpgroup is staged ([K, 64] fp32) in SMEM aliasing the ring:
the prep warpgroup starts loading only after every initial state was read, the final states are staged
only after every state warpgroup left its loop (with ``direct_io`` neither is staged: registers to and from
global memory). The last grid row writes zeros to the tokens past
``cu[N]``. Every warpgroup waits for the others before exiting.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, ROWS, WG, WGT, causal_mask, check_token_rows, cols, column_select,
                     compiler_params, drain_releases, finish_together, for_tail_tiles, has_row_scales,
                     interpret_params, iota,
                     k_scaled, load_state, masked_decay, masked_exp, opaque_zero, mm, products, products_then, qk_scaled, rows, seq_cumsum, seq_tiles,
                     store_final_state, store_rows, store_state, tile, tracing_for_interpreter, zero_rows_outside)
from .slabs import intra_tile_slabs
from .solve import block_lower, decayed_a, diag_block_inverse, merge_chain_lean
from .warp_out import warp_out

BV = 64  # V columns per state warpgroup
VALUE_DIMS = (64, 128)  # one or two state warpgroups
SMEM_BUDGET = 227 * 1024 - 4 * 1024  # leave room for barriers
#: (prep, state) registers per thread at V = 128 (three warpgroups share 3 x 168 = 504 per thread).
#: (104, 200) until 2026-12-05: ptxas 13.0 then serialized every WGMMA of the state warpgroups
#: (C7512, a wait after each HGMMA in the SASS) and spilled; at (88, 208) it does neither, the PTX is
#: the same but for the setmaxnreg lines, and the prefill ran 3-4% faster at 4x8192 (0.627 vs 0.648,
#: 0.610 vs 0.636 ms best of rounds) and 2.6% at 128x256 on an H100 (benchmarks/RESULTS.md, session 11)
REGS = (88, 208)
#: the same with the intra work in the prep warpgroup (``gates``; 1.69x slower, below). ptxas 13 on the CPU host
#: (benchmarks/ptx_local, 2026-12-06, 256-token lens), with the merges one product at a time from
#: SMEM (:func:`.solve.merge_chain_lean`): every split spills: (152, 176) 496 / 524 B of spill
#: stores / loads, (136, 184) 420 / 452, (168, 168) 544 / 568, all three with the state warpgroups'
#: WGMMAs serialized (C7512); (88, 208) 944 / 1268 without. With :func:`.solve.merge_chain` (two
#: accumulators at once) it was 588 / 616, 548 / 612, 708 / 736 and 696 / 796. The state warpgroups
#: need 208; the intra work, as written on whole [64, 64] fp32 arrays, far more than the 88 left.
FUSED_REGS = (152, 176)

OUT_STORES = ("tma", "registers", "warp")  # how a whole output tile leaves (``out_store``)


def check_out_store(out_store, overlap, names=("out_store", "overlap")) -> None:
    """``out_store`` is one of :data:`OUT_STORES`, and one other than "tma" runs with ``overlap``
    False or "update" (it takes "update"'s order of the last group); ``names``: the caller's."""
    if out_store not in OUT_STORES:
        raise ValueError(f"{names[0]} must be one of {OUT_STORES}, got {out_store!r}")
    if out_store != "tma" and overlap not in (False, "update"):
        raise ValueError(f"{names[0]}={out_store!r} runs with {names[1]} False or 'update', got {overlap!r}")


#: diagnostics only (``chunk_loop_wide(..., _ablate=...)``): work that can be dropped to time its share;
#: the results are then WRONG. tests/gpu/mosaic_gpu_check.py --only ablate times each.
ABLATIONS = ("store", "o", "w", "xw", "prep", "selects", "q")  # q: the prep's Q scaling alone


def smem_bytes(dk: int, dv: int, itemsize: int, out_itemsize: int, stages: int, l2: bool = False,
               fused: bool = False, h0_smem: bool = False, slabs: bool = False) -> int:
    nsw = dv // BV
    # q, k, v, Ag, P, gc x2 (+ q's and k's row scales) (+ beta x2 with the intra work fused in)
    per_stage = (2 * C * dk + C * dv + 2 * C * C) * itemsize + (2 + 2 * l2 + 2 * fused) * C * 4
    ring = max(stages * per_stage, nsw * dk * BV * 4)  # the state staging aliases the ring
    # + each state warpgroup's output tile (+ its own h0 staging beside the ring: prefetch_h0="smem")
    # (+ the slab intra work's three plain [64, 64] 16-bit tiles: ``intra_slabs``)
    return ring + nsw * C * BV * out_itemsize + h0_smem * nsw * dk * BV * 4 + slabs * 3 * C * C * itemsize


def pick_stages(dk: int, dv: int, itemsize: int, out_itemsize: int, l2: bool = False, fused: bool = False,
                h0_smem: bool = False, slabs: bool = False) -> int:
    for stages in (4, 3, 2):
        if smem_bytes(dk, dv, itemsize, out_itemsize, stages, l2, fused, h0_smem, slabs) <= SMEM_BUDGET:
            return stages
    raise NotImplementedError(f"wide chunk loop needs {smem_bytes(dk, dv, itemsize, out_itemsize, 2)} "
                              "bytes of SMEM")


def h0_staging_fits(dk: int, dv: int, itemsize: int, out_itemsize: int, l2: bool = False,
                    fused: bool = False, slabs: bool = False) -> bool:
    """Whether ``prefetch_h0="smem"`` (each state warpgroup's [K, 64] fp32 h0 staging beside a
    2-stage ring) fits the SMEM budget (the slab intra work's tiles leave no room for it at K = 128)."""
    return smem_bytes(dk, dv, itemsize, out_itemsize, 2, l2, fused, True, slabs) <= SMEM_BUDGET


SCHEDULES = ("order", "table")  # the persistent grid's item lookups (chunk_loop_wide's ``schedule``)


def _persistent_schedule(cu, hv: int, ctas: int, schedule: str):
    """The persistent grid's item list (XLA, on the device: no host read, a traced plan works).

    ``order``: int32 [ns], the grid rows longest first (a stable sort: ties keep their order), the
    tail row last. ``table``: int32 [ctas, ceil(ns * hv / ctas), 4], CTA c's kk-th item as (row,
    v head, first token, end token): the ranked items u = row rank * hv + head dealt in a snake
    (round kk: CTAs 0..ctas-1 when kk is even, ctas-1..0 when odd); the tail row and the entries past
    the last item are (ns - 1, 0, 0, 0), no tiles."""
    ns = cu.shape[0]
    lens = cu[1:] - cu[:-1]
    order = jnp.concatenate([jnp.argsort(-lens, stable=True), jnp.array([ns - 1])]).astype(jnp.int32)
    if schedule == "order":
        return order
    n_items = ns * hv
    kk = jnp.arange(-(-n_items // ctas), dtype=jnp.int32)[None, :]
    c = jnp.arange(ctas, dtype=jnp.int32)[:, None]
    u = kk * ctas + jnp.where(kk % 2 == 0, c, ctas - 1 - c)
    row = jnp.where(u < n_items, order[jnp.minimum(u // hv, ns - 1)], ns - 1)
    is_seq = row < ns - 1
    a = jnp.where(is_seq, cu[jnp.minimum(row, ns - 2)], 0)
    b = jnp.where(is_seq, cu[jnp.minimum(row + 1, ns - 1)], 0)
    return jnp.stack([row, jnp.where(u < n_items, u % hv, 0), a, b], axis=-1).astype(jnp.int32)


def chunk_loop_wide(q, k, v, ag, gc, cu, h0, *, scale: float, group: int, n_out: int | None, t_valid: int,
                    stages: int | None = None, regs: tuple[int, int] | None = None, lean: bool = True,
                    bare: bool = True, direct_io: bool = False, ctas: int | None = None,
                    prefetch_h0: bool | str = False, overlap: bool | str = False, interpret=None,
                    schedule: str = "order", lrq=None, lrk=None, halves: tuple[int, ...] | None = None,
                    gates=None, intra_slabs: bool = False, out_store: str = "tma", _ablate: frozenset = frozenset(),
                    _shadow: bool = True, _prep_shadow: bool = True, _p_mask: str = "one"):
    """``(o [T_q, HV, V] in q's dtype, final [n_out, HV, K, V] fp32 or None)``.

    Arguments as :func:`.chunk_loop.chunk_loop` (q, k: [T_q, H, K]; v: [T_q, HV, V] with V in
    {64, 128}; ag: [HV, T_pad, 64]; gc: [HV, T_pad] fp32; cu: int32 [N_pad + 1]; h0: None or fp32
    [N_h0, HV, K, V]); ``regs``: (prep, state) register counts for setmaxnreg at V = 128.
    ``lean`` (default since 2026-12-04 s5, with ``bare``: 0.665 vs 0.684 ms at 4x8192): fewer
    instructions per tile in the state warpgroups, the critical path (2026-12-04 s4: each runs ~950 SASS instructions per tile next to
    the prep warpgroup's ~1150 on the same schedulers). Their two [64, 64] NaN-isolation selects go:
    the prep warpgroup also zeroes ``Ag``'s rows of other sequences on a boundary tile (so ``Vnew^T``'s
    columns of other tokens come out exactly 0), and ``X``'s columns are scaled by a masked
    ``exp(gc)`` (exactly 0 there; ``X``'s columns of other tokens are 0 already, their ``k`` rows
    being zeroed). The output's ``scale`` moves into the prep warpgroup's exponents
    (``exp(gc_r + ln scale)`` for ``Q`` and ``P``), which drops the state warpgroups' multiply of
    ``o^T``. Same products; ``scale`` is applied before the rounding to the input dtype instead
    of after the products.
    ``bare`` (default, see ``lean``): compiled without Pallas's automatic warpgroup
    barriers (:func:`.common.compiler_params`): per tile ~13 fewer ``bar.sync`` in the prep
    warpgroup (one before each of its 7 TMA loads, two around each SMEM store of P and Q) and 2
    in each state warpgroup's output store. Safe here because every SMEM write is ordered
    explicitly: the ring's reuse by ``in_free`` / ``in_bar``, P and Q by ``commit_smem`` before
    ``ready``, Q and the zeroed rows rewritten by the threads that loaded them, the output tile by
    the wait on the previous TMA store and ``commit_smem``, the state staging by ``h0_done`` /
    ``loop_done``.
    ``direct_io`` (UNTIMED, off by default): the initial state goes from global memory straight into
    the state warpgroups' registers (:func:`.common.load_state`) and the final state straight back
    (:func:`.common.store_state`), with no SMEM staging: the prep warpgroup issues the first tiles'
    loads at once instead of after the initial state was staged and read (the staging shares the
    ring's bytes), the state warpgroups do not wait for each other before the final state, and the
    last wait on the output's TMA stores is for their SMEM reads only (what a CTA must wait for
    before it exits). Aimed at short sequences (128x256: 4 tiles per CTA, 31 waves of CTAs each
    loading and storing 64 KB of fp32 state), where that start and end are a third of a CTA's life.
    ``ctas`` (UNTIMED, None by default): a persistent grid of ``ctas`` CTAs (at most one per
    (sequence, v head) item) instead of one CTA per item: the items, longest sequence first, are
    dealt to the CTAs in a snake (0..ctas-1, ctas-1..0, ...), and each CTA walks its items
    as ONE stream of tiles, so its prep warpgroup loads the next item's first tiles while the state
    warpgroups finish the current one, and a CTA's launch, barrier set-up and ring fill are paid
    once per CTA instead of once per item. The state enters and leaves as with ``direct_io`` (the
    SMEM staging would stall the stream). For many short sequences (128x256: 4128 items of 4 tiles).
    ``prefetch_h0`` (with ``ctas`` and an initial state; UNTIMED): when the prep warpgroup's look-ahead
    cursor reaches an item's first tile (``stages`` tiles before the state warpgroups need it) it asks
    the TMA unit to prefetch that item's initial state [K, V] into L2, so the state warpgroups' direct
    loads at the item's start find it there instead of in HBM (one HBM round trip on the chain per
    item: 4 tiles per item at 128x256).
    ``prefetch_h0="smem"`` (with ``ctas`` and an initial state): each state warpgroup keeps its own
    fp32 [K, 64] SMEM staging beside the ring (64 KB at V = 128, so 2 ring stages instead of 3) and,
    as soon as it has read an item's initial state from there, has the TMA unit load its next
    item's into it: the load runs during the item's tiles, and the item's start reads SMEM instead
    of waiting on global loads (an in-kernel profile at 8x256 put 8.2 us per item, 17% of a state
    warpgroup's life, in those loads; mostly cold there, two items per CTA). The loop alone on an
    H100 (2026-12-06, session 19, ms, against ``True``): 256x128 0.761 vs 0.943, 128x256 0.566 vs
    0.673, 64x512 0.494 vs 0.509, 32x1024 0.455 vs 0.435, the serving mix (~780 tokens a sequence)
    0.529 vs 0.515; the same bits. The driver picks it for short sequences
    (:func:`._driver.pick_loop_prefetch`).
    ``overlap`` (UNTIMED, off): each state warpgroup stores tile i's output while the tensor cores
    compute tile i + 1's first product group (U and X) instead of before issuing it: the store
    (the wait for the previous TMA read, the transposed SMEM write, the fence, the TMA issue;
    dropping it took 15% off the loop at 4x8192, session 4) leaves the state chain. The output tile
    rides in registers (input dtype) from one tile to the next; the last one is stored after the
    loop. With it (unless ``_shadow=False``, a diagnostic to tell the two apart) the other work off
    the chain moves into the product groups' shadows too: the two column factors' exponentials
    (``exp(gc)`` for ``X``, ``exp(gc_last - gc)`` for ``Vnew``) are taken while the first group runs,
    the state's decay ``exp(gc_last) S^T`` while the second does; and in the prep warpgroup (unless
    ``_prep_shadow=False``) P's decay ``exp(gc_r - gc_s)`` and Q's row factors are taken while
    ``Q K^T`` computes. The same products and bits.
    ``overlap="store"`` (off, SLOWER): only the output store's second half leaves the chain. Each
    state warpgroup still writes tile i's output to its SMEM tile at once (after the wait for the
    previous TMA read), but the fence, the warpgroup barrier and the TMA issue run while tile
    i + 1's first product group computes. Nothing extra rides in registers (the wide loop's
    ``overlap=True`` spills 68 B), only the tile's head and rows (five scalars). The same bits, but
    ptxas spills 16 B and each state warpgroup's loop grows by ~80 instructions (the per-column
    predicates live across the deferred branches), and the loop alone is slower: H100, 2026-12-06
    (session 17, m1): 0.381 vs 0.370 ms at 4x8192, 0.680 vs 0.674 at 128x256 (persistent).
    ``overlap="update"`` (off: within noise): the output products are issued before the state update in the
    tile's last group, and the output is stored as soon as they completed, while the update still
    runs on the tensor cores (:func:`.common.products_then`); nothing rides into the next tile. With
    it, as with ``overlap=True``, the column factors, the state's decay and the prep's exponentials
    are computed in the product groups' shadows (``_shadow=False`` / ``_prep_shadow=False`` turn
    that off, diagnostics). The same bits. H100, 2026-12-06 (session 21, u1 / u2), the loop alone, ms:
    4x8192 0.358 / 0.361 vs 0.366 / 0.365 (without the shadows 0.357), 8x4096 0.370 vs 0.370,
    128x256 (persistent, h0 staged) 0.575 vs 0.575; whole prefill at 4x8192 0.580 vs 0.588 (FLA
    2.132). The update's ~0.2 us of tensor work hides little of the store.
    ``out_store``: how a whole output tile leaves the state warpgroup. "tma" (default): o^T into the
    SMEM tile, a proxy fence, a warpgroup barrier and one TMA store, after a wait for the previous
    store's read; those synchronisations sit on the state chain (the ablation: 20% of the loop alone
    at 4x8192, session 21). "registers": a register transpose (32 shuffles) and 16 4-byte stores a
    thread straight to global memory; slower on an H100 (session 22, d1: loop alone 4x8192 0.412 vs
    0.373 ms, 8x4096 0.418 vs 0.384; half-used sectors). "warp": each warp writes its [64 tokens,
    16 columns] slab through its own 2 KiB of the SMEM tile with only ``bar.warp.sync``, whole
    32-byte sectors (:mod:`.warp_out`; the interpreter stores as "registers"); the same bits, also
    slower (H100, s22, e1: loop alone 4x8192 0.377 vs 0.364 ms, 8x4096 0.379 vs 0.369): the store's
    cost is o's HBM bytes, not its synchronisation (mosaic_notes session 22). A partial tile
    (shared with a neighbour, or past ``t_valid``) keeps the SMEM path and its row stores. "registers"
    and "warp" imply "update"'s order of the last group (in the plain order ptxas serialized the
    WGMMAs, C7512); not with ``overlap="store"`` or True. ptx_local ("registers"): 168 registers, no
    spills.
    ``halves`` (UNTIMED, None by default; not with ``ctas``): one compilation that also runs as the
    narrow loop. The grid gets a leading axis of 2, and the kernel reads a mode on the device:
    ``halves[count]`` for the count of sequences with tokens in ``cu`` (0 or 1; N_pad + 1 entries).
    Mode 0 is the wide loop: the second CTA of each pair exits at once. Mode 1 is the narrow loop's
    grid: CTA x of the pair runs only state warpgroup x (the V columns [64 x, 64 x + 64)). Its other
    state warpgroup only takes part in the barriers (each tile's ``ready`` and ``in_free``, the
    state staging's). The prep warpgroup's work is the same in both modes, and so are the bits.
    For a plan traced under jit whose bucket holds counts that want different loops
    (:func:`._driver.halves_table`).
    ``_ablate``: names of :data:`ABLATIONS` to drop (a diagnostic: wrong results). ``_p_mask``
    (a diagnostic, the same bits): "one", P's mask by :func:`.common.causal_mask` and its zero arm
    :func:`.common.opaque_zero`; "one_const", the same mask with a constant zero arm (before
    session 19); "three", by three compares per element (before 2026-12-06): to time them in one call.
    ``lrq``, ``lrk`` (use_qk_l2norm, both or neither): fp32 [H, T_pad], ``ln rstd`` of each k head's q
    and k rows: q and k are the caller's, not normalized; the scales join the exponents of the
    factors that already multiply q's rows and k's rows in the products (P's rows and columns, Q's
    rewrite, the columns of ``X`` and of the decayed ``Vnew``), so the normalized q and k are never
    rounded to the input dtype and cost no instruction on the products.
    ``schedule`` (persistent grid): how a CTA looks its items up, the same items in the same order
    either way. "order" (default; what the H200 timed in session 8) derives them in the kernel from
    the ranking and ``cu``: two dependent global loads per lookup, which both cursors of the prep
    warpgroup and the state warpgroups repeat. "table" (UNTIMED) reads each item's (row, head,
    first token, end) from a per-CTA table XLA builds before the kernel: independent loads, a CTA's
    items adjacent in memory.
    ``gates`` (``ag`` and ``gc`` then None): ``(g_hm, beta_hm)``, fp32 [HV, T_pad] (the intra
    kernel's inputs), and the prep warpgroup does the intra kernel's work itself, per tile and v head
    and before P: the chunk-local gate cumsum of the sequence's tokens (written to the ring's ``gc``
    for the state warpgroups), ``K K^T``, ``A``, its 16x16 diagonal blocks inverted in registers
    (:func:`.solve.warp_solve_steps`) and merged (:func:`.solve.merge_chain_lean`, through the slot's
    ``Ag`` and ``P`` tiles), ``Ag`` into the ring. No intra kernel, no ``Ag`` / ``gc`` in HBM, one
    launch: FlashInfer's structure (benchmarks/fi_study.md §4, change 3). A CTA holds one sequence, so
    the tokens of others are masked by ``[lo, hi)`` (selects: ``A`` and ``Ag`` are exactly 0 outside,
    the inverse needs no sequence ids) and the bits equal the two-kernel path's (under the
    interpreter, and on an H100). Not with ``ctas`` (unless ``intra_slabs``), ``halves`` or the row
    scales (use_qk_l2norm normalizes in XLA first). H100, 2026-12-06: 0.996 vs 0.589 ms at 4x8192,
    1.198 vs 0.873 at 128x256: the registers (:data:`FUSED_REGS`) do not fit.
    ``intra_slabs`` (with ``gates``; ``variant="fused_wide_mma"``): that intra work on [64, 16] column
    slabs by warp-level MMA (:func:`.slabs.intra_tile_slabs`), at the default loop's (88, 208)
    registers, with three plain [64, 64] 16-bit SMEM tiles (2 ring stages); also on the persistent
    grid (``ctas``, the L2 prefetch of h0: no SMEM is left for its staging). The two kernels' bits
    under the interpreter and on an H100, ptxas 140 / 176 B of spills, but 1.74x slower at 4x8192
    (1.021 vs 0.587 ms) and 1.60x at 128x256 (H100, 2026-12-06, session 20): the prep warpgroup
    spends ~10 us a tile on the intra work (in-kernel profile) against the state chain's ~3.
    """
    t_rows, _, dk = q.shape  # the caller's tokens: the last tile may run past them (read as zeros)
    check_token_rows("q", t_rows)
    hv, dv = v.shape[1], v.shape[2]
    if dv not in VALUE_DIMS:
        raise NotImplementedError(f"the wide chunk loop runs V in {VALUE_DIMS} (one state warpgroup per 64 "
                                  f"columns), got V={dv}")
    nsw = dv // BV
    ns = cu.shape[0]  # N_pad + 1 grid rows: the sequences, then the zero writer of the tail
    dtype = q.dtype
    out_dtype = q.dtype
    isz, osz = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    l2 = has_row_scales(lrq, lrk)
    if not (isinstance(prefetch_h0, bool) or prefetch_h0 == "smem"):
        raise ValueError(f"prefetch_h0 must be False, True or 'smem', got {prefetch_h0!r}")
    h0_smem = prefetch_h0 == "smem" and h0 is not None and ctas is not None  # (like True: the persistent grid's)
    if stages is None:
        stages = pick_stages(dk, dv, isz, osz, l2, gates is not None, h0_smem, intra_slabs)
    if overlap not in (True, False, "store", "update"):
        raise ValueError(f"overlap must be True, False, 'store' or 'update', got {overlap!r}")
    store_shadow = overlap == "store"  # the output's fence and TMA issue in the next tile's shadow
    check_out_store(out_store, overlap)
    direct_out = out_store != "tma"
    # the output stored while the state update computes (direct_out too: in the plain order ptxas
    # serialized the state warpgroups' WGMMAs, C7512, ptx_local 2026-12-06)
    under_update = overlap == "update" or direct_out
    overlap = overlap is True
    bad = set(_ablate) - set(ABLATIONS)
    if bad:
        raise ValueError(f"_ablate: unknown {sorted(bad)}; known {ABLATIONS}")
    ab = frozenset(_ablate).__contains__
    persistent = ctas is not None
    if halves is not None and (persistent or len(halves) != ns or nsw != 2):
        raise ValueError(f"halves: a table of {ns} modes for the grid of one CTA per item at V = 128, "
                         f"got {len(halves)} with ctas={ctas}, V={dv}")
    n_items = hv * ns
    if persistent:
        if isinstance(ctas, bool) or not isinstance(ctas, int) or ctas < 1:
            raise ValueError(f"ctas must be a positive int or None, got {ctas!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        ctas = min(ctas, n_items)
        max_items = -(-n_items // ctas)
    fused = gates is not None
    if fused and (ag is not None or gc is not None or (persistent and not intra_slabs) or halves is not None
                  or l2):
        raise ValueError("gates (the intra work in the prep warpgroup) replaces ag and gc, on the grid of "
                         "one CTA per item (or a persistent one with intra_slabs), without halves or row scales")
    if intra_slabs and not fused:
        raise ValueError("intra_slabs is the intra work of gates (the fused loop)")
    r_prep, r_state = regs if regs is not None else (FUSED_REGS if fused and not intra_slabs else REGS)
    has_h0 = h0 is not None
    n_h0 = h0.shape[0] if has_h0 else 0
    out_final = n_out is not None
    interp = bool(interpret)
    wg_prep = nsw

    out_type = [jax.ShapeDtypeStruct((t_rows, hv, dv), out_dtype)]
    if out_final:
        out_type.append(jax.ShapeDtypeStruct((n_out, hv, dk, dv), F32))
    vec = plgpu.SMEM((stages, C), F32)
    ring = (tile((stages, C, dk), dtype), tile((stages, C, dk), dtype), tile((stages, nsw, C, BV), dtype),
            tile((stages, C, C), dtype), tile((stages, C, C), dtype), vec, vec) + ((vec, vec) if l2 or fused else ())
    scratch = dict(
        # the ring (q, k, v blocks, Ag, P, gc rows, gc cols (+ q's and k's row scales)) or, before the
        # first and after the last tile, the fp32 [K, 64] staging of each state warpgroup's initial /
        # final state. With ``gates``: g in place of gc's rows, the prep's gc in gc's cols, beta x2
        ring=plgpu.RefUnion(ring, tuple(plgpu.SMEM((dk, BV), F32) for _ in range(nsw))),
        # per state warpgroup: the swizzled output tile or the plain one of the row stores
        # (one union per warpgroup: the groups of ONE RefUnion share their bytes)
        o_st=tuple(plgpu.RefUnion(tile((C, BV), out_dtype), plgpu.SMEM((C, BV), out_dtype)) for _ in range(nsw)),
        **(dict(h0_st=tuple(plgpu.SMEM((dk, BV), F32) for _ in range(nsw))) if h0_smem else {}),
        **(dict(slab_bufs=tuple(plgpu.SMEM((C, C), dtype) for _ in range(3))) if intra_slabs else {}),
        in_bar=plgpu.Barrier(num_arrivals=5 + nsw + 2 * l2, num_barriers=stages),  # one per TMA copy of a slot
        ready=plgpu.Barrier(num_barriers=stages),
        in_free=plgpu.Barrier(num_arrivals=nsw, num_barriers=stages),
        h0_bar=plgpu.Barrier(num_barriers=nsw),
        h0_done=plgpu.Barrier(num_arrivals=nsw),
        loop_done=plgpu.Barrier(num_arrivals=nsw),
        done=plgpu.Barrier(num_arrivals=nsw + 1),
    )

    def body(*refs, ring, o_st, in_bar, ready, in_free, h0_bar, h0_done, loop_done, done, h0_st=None,
             slab_bufs=None):
        (q_s, k_s, v_s, a_s, p_s, gc_rows, gc_cols, *more), st_s = ring
        lq_rows, lk_cols = more if l2 else (None, None)
        b_rows, b_cols = more if fused else (None, None)
        o_st = tuple(o_st)
        refs = list(refs)
        # with ``gates``: g and beta in place of Ag and gc
        q_ref, k_ref, v_ref, ag_ref, gc_ref, cu_ref = (refs.pop(0) for _ in range(6))
        lrq_ref, lrk_ref = (refs.pop(0), refs.pop(0)) if l2 else (None, None)
        h0_ref = refs.pop(0) if has_h0 else None
        sched_ref = refs.pop(0) if persistent else None  # the ranking, or the per-CTA item table
        mode_ref = refs.pop(0) if halves is not None else None  # int32 [1]: 1 = a state warpgroup per CTA
        o_ref = refs.pop(0)
        ht_ref = refs.pop(0) if out_final else None
        wg = lax.axis_index("wg")

        def row_tiles(n):
            """Grid row ``n`` (a sequence, or the tail row ns - 1, which walks no tiles) ->
            (is_seq, tile count, rows_of) (:func:`.common.seq_tiles`)."""
            is_seq = n < ns - 1
            nidx = jnp.minimum(n, ns - 2)
            a = cu_ref[nidx]
            return (is_seq,) + seq_tiles(a, jnp.where(is_seq, cu_ref[nidx + 1], a))

        if persistent:
            cta = lax.axis_index("c")

            def rank(kk):  # round kk of the snake: CTAs 0..ctas-1, then ctas-1..0, then 0..ctas-1, ...
                return kk * ctas + jnp.where(lax.rem(kk, 2) == 0, cta, ctas - 1 - cta)

            full = n_items // ctas
            n_mine = full + jnp.where(rank(full) < n_items, 1, 0)  # this CTA's items

            def item(kk):
                """This CTA's kk-th item -> (grid row, v head, is_seq, tile count, rows_of): the items
                ranked by their row's length (longest first; heads of a row adjacent, so the CTAs
                running side by side share q and k in L2), dealt to the CTAs in a snake: the longest
                items go first and each round evens out the one before. Past this CTA's items (a
                cursor's look-ahead): the tail row, no tiles."""
                if schedule == "table":
                    e = sched_ref.at[cta, jnp.minimum(kk, max_items - 1)]
                    n = e[0]
                    return (n, e[1], n < ns - 1) + seq_tiles(e[2], e[3])
                u = rank(kk)
                n = sched_ref[jnp.minimum(lax.div(u, hv), ns - 1)]
                return (n, lax.rem(u, hv)) + row_tiles(n)
        else:
            j_grid, n_grid = lax.axis_index("h"), lax.axis_index("n")
        if halves is not None:
            # read where used (the state warpgroups, the CTA's exit): a value live across the prep
            # warpgroup's loop spilled there (ptxas, 88 registers)
            x_half = lax.axis_index("x")

        def issue(j, tok, slot):
            hk = lax.div(j, group)
            bar = in_bar.at[slot]
            plgpu.copy_gmem_to_smem(q_ref.at[tok, hk], q_s.at[slot], bar)
            plgpu.copy_gmem_to_smem(k_ref.at[tok, hk], k_s.at[slot], bar)
            for w in range(nsw):
                plgpu.copy_gmem_to_smem(v_ref.at[tok, j, pl.ds(w * BV, BV)], v_s.at[slot, w], bar)
            if fused:  # g (its cumsum is the prep's), beta in both layouts
                for src, buf in ((ag_ref, gc_rows), (gc_ref, b_rows), (gc_ref, b_cols)):
                    plgpu.copy_gmem_to_smem(src.at[j, tok], buf.at[slot], bar)
            else:
                plgpu.copy_gmem_to_smem(ag_ref.at[j, tok], a_s.at[slot], bar)
                for buf in (gc_rows, gc_cols):
                    plgpu.copy_gmem_to_smem(gc_ref.at[j, tok], buf.at[slot], bar)
            if l2:
                plgpu.copy_gmem_to_smem(lrq_ref.at[hk, tok], lq_rows.at[slot], bar)
                plgpu.copy_gmem_to_smem(lrk_ref.at[hk, tok], lk_cols.at[slot], bar)

        def intra_tile(slot, lo, hi):
            """(``gates``) The intra kernel's work for the tile in ``slot``, of this CTA's sequence
            (rows [lo, hi)): ``gc`` into ``gc_cols[slot]``, ``Ag`` into ``a_s[slot]`` (exactly 0
            outside the sequence's rows and columns); ``p_s[slot]`` is scratch of the merges. ->
            the cumsum in the row and the column layout (for P and Q)."""
            sq = (C, C)
            r, c = iota(sq, 0), iota(sq, 1)
            rvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROWS)
            cvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)
            vr, vc = (rvec >= lo) & (rvec < hi), (cvec >= lo) & (cvec < hi)
            with jax.named_scope("i_cumsum"):
                gam_r = seq_cumsum(gc_rows.at[slot], gc_cols.at[slot], lo, hi)
                gam_c = plgpu.load(gc_cols.at[slot], layout=COLS)
            with jax.named_scope("i_kk"):
                kk = mm(k_s.at[slot], k_s.at[slot].T, sq)
            with jax.named_scope("i_a"):
                same = rows(vr, sq) & cols(vc, sq)
                beta_row = plgpu.load(b_rows.at[slot], layout=ROWS)
                a_low, na = decayed_a(kk, rows(gam_r, sq), cols(gam_c, sq), beta_row, None, same, r, c, sq,
                                      interp, from_columns=True)
                a_s.at[slot][...] = block_lower(a_low, dtype)  # the merges' Ao: A is dead after the solve's input
                plgpu.commit_smem()
            with jax.named_scope("i_solve"):  # A is 0 outside the sequence: no sequence ids needed
                x = diag_block_inverse(a_low, na, None, None, interpret=interp, from_columns=True, warp=True)
            with jax.named_scope("i_merge"):
                x = merge_chain_lean(x, a_s.at[slot], p_s.at[slot], dtype)
            with jax.named_scope("i_store"):  # the merge's last product was waited for: a_s is free
                beta_col = plgpu.load(b_cols.at[slot], layout=COLS)
                a_s.at[slot][...] = jnp.where(same, x * cols(beta_col, sq), 0.0).astype(dtype)
            return gam_r, gam_c

        def prep_tile(slot, lo, hi):
            """The prep warpgroup's work on the tile in ``slot`` (valid rows [lo, hi)), then ``ready``."""
            sq = (C, C)
            with jax.named_scope("p_wait"):
                plgpu.barrier_wait(in_bar.at[slot])
            if not ab("prep"):
                if intra_slabs:
                    gam = intra_tile_slabs(k_s.at[slot], gc_rows.at[slot], gc_cols.at[slot], b_rows.at[slot],
                                           b_cols.at[slot], a_s.at[slot], slab_bufs, lo, hi, dtype, interp,
                                           zero=opaque_zero(cu_ref))
                else:
                    gam = intra_tile(slot, lo, hi) if fused else None
                with jax.named_scope("p_qk"):
                    g_r = plgpu.load(gc_rows.at[slot], layout=ROWS) if gam is None else gam[0]
                    if lean:  # o's scale folded into both exponents of the rows: exp(gc_r + ln scale)
                        g_r = g_r + math.log(scale)
                    # with l2norm: P = (Q K^T) rstd(q_r) rstd(k_s) exp(gc_r - gc_s), and Q's rows * rstd(q)
                    g_r, g_c = qk_scaled(g_r, plgpu.load(gc_cols.at[slot], layout=COLS) if gam is None else gam[1],
                                         lq_rows, lk_cols, slot)
                    # columns of other sequences' tokens selected to 0 (their k may be NaN); rows of
                    # other tokens give output rows nobody stores
                    if _p_mask in ("one", "one_const"):
                        mask = causal_mask(lo, hi, sq)  # r >= c, lo <= c < hi
                    else:
                        r, c = iota(sq, 0), iota(sq, 1)
                        mask = (r >= c) & (c >= lo) & (c < hi)
                    if (overlap or under_update) and _prep_shadow:  # the exponentials while Q K^T computes (same values)
                        p, (dec, e_r) = mm(q_s.at[slot], k_s.at[slot].T, sq,
                                           during=lambda: (jnp.exp(rows(g_r, sq) - cols(g_c, sq)), jnp.exp(g_r)))
                        p_s.at[slot][...] = jnp.where(mask, p * dec, 0.0).astype(dtype)
                    else:
                        p = mm(q_s.at[slot], k_s.at[slot].T, sq)
                        zero = opaque_zero(cu_ref) if _p_mask == "one" else 0.0
                        p_s.at[slot][...] = masked_decay(mask, p, rows(g_r, sq) - cols(g_c, sq), zero).astype(dtype)
                        e_r = jnp.exp(g_r)
                with jax.named_scope("p_q"):  # Q <- diag(exp(gc)) Q, after P read q (mm waited)
                    for h0_ in range(dk // BV * (not ab("q"))):
                        qh = q_s.at[slot, :, pl.ds(h0_ * BV, BV)]
                        qh[...] = (plgpu.load(qh, layout=WG).astype(F32) * rows(e_r, (C, BV))).astype(dtype)

            @pl.when((lo > 0) | (hi < C))
            def _():  # a boundary tile: k and v rows of other sequences must be 0 where contracted
                zero_rows_outside(k_s.at[slot], lo, hi)
                for w in range(nsw):
                    zero_rows_outside(v_s.at[slot, w], lo, hi)
                if lean and not fused:  # and Ag's: Vnew^T's columns of other tokens are then exactly 0
                    zero_rows_outside(a_s.at[slot], lo, hi)

            plgpu.commit_smem()
            plgpu.barrier_arrive(ready.at[slot])

        def _prep():
            if nsw > 1:
                plgpu.set_max_registers(r_prep, action="decrease")
            if not persistent:
                if has_h0 and not direct_io:  # the ring aliases the initial-state staging: wait until it was read
                    plgpu.barrier_wait(h0_done)
                _, nt, rows_of = row_tiles(n_grid)
                for i0 in range(stages):
                    pl.when(i0 < nt)(lambda i0=i0: issue(j_grid, rows_of(i0)[1], i0))

                def step(i, carry):
                    _, _, lo, hi = rows_of(i)
                    prep_tile(lax.rem(i, stages), lo, hi)

                    # the slot of tile i - 1 takes tile i - 1 + stages once both state warpgroups released it
                    @pl.when((i >= 1) & (i - 1 + stages < nt))
                    def _():
                        prev = lax.rem(i - 1, stages)
                        plgpu.barrier_wait(in_free.at[prev])
                        issue(j_grid, rows_of(i - 1 + stages)[1], prev)
                    return carry

                lax.fori_loop(0, nt, step, None)
                drain_releases(nt, stages, in_free)
                return

            # persistent: one stream of tiles over this CTA's items (an item without tiles is
            # skipped); a cursor (item kk, tile ii) for the tile in hand and one `stages` ahead
            def tiles_of(kk):
                return item(kk)[3]

            def first_with_tiles(kk):  # n_mine or beyond when none is left
                return lax.while_loop(lambda x: (x < n_mine) & (tiles_of(x) == 0), lambda x: x + 1, kk)

            def after(kk, ii, nt):  # (item kk has nt tiles) the search for the next item only at its last tile
                return lax.cond(ii + 1 < nt, lambda: (kk, ii + 1), lambda: (first_with_tiles(kk + 1), jnp.int32(0)))

            def issue_at(kk, ii, slot):
                n, j, _, _, rows_of = item(kk)
                issue(j, rows_of(ii)[1], slot)
                if prefetch_h0 is True and has_h0:  # the item's initial state into L2 ahead of its first tile
                    plgpu.async_prefetch(h0_ref.at[jnp.minimum(n, n_h0 - 1), j], predicate=(ii == 0) & (n < n_h0))

            k0 = first_with_tiles(jnp.int32(0))
            ahead = (k0, jnp.int32(0))
            for s0_ in range(stages):
                pl.when(ahead[0] < n_mine)(lambda a=ahead, s0_=s0_: issue_at(a[0], a[1], s0_))
                ahead = after(*ahead, tiles_of(ahead[0]))

            def p_step(carry):
                g, kc, ic, ka, ia = carry
                with jax.named_scope("p_sched"):
                    _, _, _, nt_c, rows_c = item(kc)
                    _, _, lo, hi = rows_c(ic)
                prep_tile(lax.rem(g, stages), lo, hi)
                refill = (g >= 1) & (ka < n_mine)

                @pl.when(refill)
                def _():  # the slot of stream tile g - 1 takes tile g - 1 + stages, the cursor's
                    prev = lax.rem(g - 1, stages)
                    plgpu.barrier_wait(in_free.at[prev])
                    issue_at(ka, ia, prev)
                nka, nia = after(ka, ia, tiles_of(ka))
                return (g + 1,) + after(kc, ic, nt_c) + (jnp.where(refill, nka, ka), jnp.where(refill, nia, ia))

            g_end = lax.while_loop(lambda c: c[1] < n_mine, p_step, (jnp.int32(0), k0, jnp.int32(0)) + ahead)[0]
            drain_releases(g_end, stages, in_free)

        def state(w: int):
            if nsw > 1:
                plgpu.set_max_registers(r_state, action="increase")
            if halves is None:
                return state_walk(w)
            active = (mode_ref[0] == 0) | (x_half == w)
            pl.when(active)(lambda: state_walk(w))
            pl.when(jnp.logical_not(active))(idle)

        def idle():
            """A state warpgroup whose columns the pair's other CTA owns (``halves``, mode 1): every
            barrier phase it would have taken part in, nothing else."""
            _, nt, _ = row_tiles(n_grid)
            if has_h0 and not direct_io:
                plgpu.barrier_arrive(h0_done)

            @pl.loop(0, nt)
            def _tile(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(ready.at[slot])
                plgpu.barrier_arrive(in_free.at[slot])

            if out_final and not direct_io:
                plgpu.barrier_arrive(loop_done)
                plgpu.barrier_wait(loop_done)

        def state_walk(w: int):
            v0 = w * BV
            o_tile, o_part = o_st[w]
            sh = (BV, C)
            tvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COLS)  # token of each column

            def initial(n, j):
                """S^T [64, K] fp32 at the start of grid row n, head j."""
                if not has_h0:
                    return plgpu.layout_cast(jnp.zeros((BV, dk), F32), WG)
                h0_blk = h0_ref.at[jnp.minimum(n, n_h0 - 1), j, :, pl.ds(v0, BV)]
                if h0_smem:  # staged by the TMA load that issue_h0 started one item earlier
                    plgpu.barrier_wait(h0_bar.at[w])
                    s0 = plgpu.layout_cast(plgpu.load(h0_st[w].T, layout=WGT), WG)
                elif direct_io or persistent:
                    s0 = load_state(h0_blk)
                else:
                    plgpu.copy_gmem_to_smem(h0_blk, st_s[w], h0_bar.at[w])
                    plgpu.barrier_wait(h0_bar.at[w])
                    s0 = plgpu.layout_cast(plgpu.load(st_s[w].T, layout=WGT), WG)  # [64, K]
                # rows past N_h0 start from zero: a select (the clamped row read may hold NaN), its
                # predicate a full array (Mosaic's warpgroup select does not broadcast a scalar)
                live = plgpu.broadcasted_iota(jnp.int32, s0.shape, 0, layout=WG) < jnp.where(n < n_h0, BV, 0)
                s0 = jnp.where(live, s0, 0.0)
                if not (direct_io or persistent):
                    plgpu.barrier_arrive(h0_done)
                return s0

            def whole(lo, hi, t0):  # the tile is all this sequence's and inside the output
                return (lo == 0) & (hi == C) & (t0 + C <= t_valid)

            def issue_whole(j, tok):  # the staged whole tile -> the output, one TMA store
                plgpu.copy_smem_to_gmem(o_tile, o_ref.at[tok, j, pl.ds(v0, BV)])

            def issue_rows(j, lo, hi, t0):  # the staged partial tile -> its rows, one TMA store each
                store_rows(o_part, lambda r: o_ref.at[pl.ds(t0 + r, 1), j, pl.ds(v0, BV)], lo,
                           jnp.minimum(hi, t_valid - t0))

            def stage(o_lo_t, j, tok, lo, hi, t0, then_issue: bool):
                """o^T [64, C] into this warpgroup's SMEM output tile (swizzled when whole, else plain),
                and with ``then_issue`` on to rows [lo, min(hi, t_valid - t0)) of the output in the
                same branch; with ``out_store`` "registers" / "warp" a whole tile goes to the output
                without the warpgroup's SMEM tile protocol (nothing to issue) (as a separate :func:`issue`
                ptxas serialized the state warpgroups' WGMMAs, C7512, ptx_local 2026-12-06)."""
                full = whole(lo, hi, t0)
                if direct_out:  # a whole tile: registers -> global memory, nothing waits for it
                    @pl.when(full)
                    def _():
                        dst = o_ref.at[tok, j, pl.ds(v0, BV)]
                        if out_store == "warp" and not interp:  # each warp through its own SMEM slab
                            warp_out(o_lo_t, o_part, dst)
                        else:
                            dst.T[...] = plgpu.layout_cast(o_lo_t, WGT)
                else:
                    with jax.named_scope("s_st_wait"):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store read o_st[w]

                    @pl.when(full)
                    def _():
                        o_tile.T[...] = o_lo_t
                        if then_issue:
                            plgpu.commit_smem()
                            issue_whole(j, tok)

                @pl.when(jnp.logical_not(full))
                def _():
                    if direct_out:  # only this path issues TMA stores of the SMEM tile (its barrier:
                        # "warp"'s slabs of the last whole tile are read by every warp)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_part.T[...] = plgpu.layout_cast(o_lo_t, WGT)
                    if then_issue:
                        plgpu.commit_smem()
                        issue_rows(j, lo, hi, t0)
                        if out_store == "warp":  # the next whole tile's slabs overwrite o_part
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            def issue(j, tok, lo, hi, t0):
                """The tile :func:`stage` left in SMEM -> the output (``store_shadow``)."""
                plgpu.commit_smem()
                full = whole(lo, hi, t0)
                pl.when(full)(lambda: issue_whole(j, tok))
                pl.when(jnp.logical_not(full))(lambda: issue_rows(j, lo, hi, t0))

            def store(o_lo_t, j, tok, lo, hi, t0):
                """o^T [64, C] -> rows [lo, min(hi, t_valid - t0)) of the tile (one TMA store when whole)."""
                stage(o_lo_t, j, tok, lo, hi, t0, then_issue=True)

            def zero_tail(j):  # zeros for the tokens past the last sequence, up to t_valid
                zero = plgpu.layout_cast(jnp.zeros((BV, C), out_dtype), WG)
                for_tail_tiles(cu_ref[ns - 1], t_valid,
                               lambda t0, lo: store(zero, j, pl.ds(pl.multiple_of(t0, C), C), lo, C, t0))

            def pending0():
                """No tile's output waiting: overlap's carry (o^T, head, t0, lo, hi, live), or with
                ``store_shadow`` the same without o^T (it waits in SMEM)."""
                scalars = (jnp.int32(0),) * 5
                if store_shadow:
                    return ((),) + scalars
                return (plgpu.layout_cast(jnp.zeros((BV, C), out_dtype), WG),) + scalars

            def flush(pend):  # store the output tile that ``pend`` holds, if any
                o_p, j_p, t0_p, lo_p, hi_p, live = pend
                tok_p = pl.ds(pl.multiple_of(t0_p, C), C)
                if not ab("store"):
                    if store_shadow:
                        pl.when(live != 0)(lambda: issue(j_p, tok_p, lo_p, hi_p, t0_p))
                    else:
                        pl.when(live != 0)(lambda: store(o_p, j_p, tok_p, lo_p, hi_p, t0_p))

            def step(g, j, tile_rows, s_t, pend):
                """Stream tile g (ring slot g % stages) of head j, rows ``tile_rows`` -> (the new state,
                the output pending: with ``overlap`` this tile's, stored while the next tile's first
                product group runs as ``pend``, the previous tile's, is here; else None)."""
                slot = lax.rem(g, stages)
                t0, tok, lo, hi = tile_rows
                with jax.named_scope("s_wait"):
                    plgpu.barrier_wait(ready.at[slot])
                with jax.named_scope("s_pre"):
                    # the sequence's tokens of this tile; with store_shadow built where used, after
                    # the first group's shadow: its 16 predicates live across the deferred store's
                    # branches made ptxas keep them as bits of a register (+127 instructions a tile;
                    # built late, +81)
                    valid = (lambda: (tvec >= lo) & (tvec < hi)) if store_shadow else (tvec >= lo) & (tvec < hi)
                    g_vec = plgpu.load(gc_cols.at[slot], layout=COLS)
                    g_x, g_d = k_scaled(g_vec, plgpu.load(lk_cols.at[slot], layout=COLS) if l2 else None)
                    g_last = gc_cols[slot, hi - 1]  # the gate of the last valid token closes the tile
                    s_lo = s_t.astype(dtype)
                vn_lo, vd_t, s_dec = three_groups(slot, s_t, s_lo, valid, g_x, g_d, g_last, pend)
                update = ((BV, dk), s_dec, [(vd_t, k_s.at[slot])])
                o_prods = ((BV, C), None, [(s_lo, q_s.at[slot].T), (vn_lo, p_s.at[slot].T)])  # o^T = Sl Q'^T + Vnew^T P^T
                def out_tile(o_t):  # o^T in the output dtype (lean: the scale is in the exponents)
                    return (o_t if lean else o_t * scale).astype(out_dtype)

                if under_update:  # o^T's products first; its store in the update's shadow
                    def store_o(o_t):
                        if not ab("store"):
                            with jax.named_scope("s_store"):
                                store(out_tile(o_t), j, tok, lo, hi, t0)
                    with jax.named_scope("s_update"):
                        s_new, = products_then([o_prods], [update], store_o)
                        plgpu.barrier_arrive(in_free.at[slot])
                    return s_new, None
                with jax.named_scope("s_update"):
                    if ab("o"):
                        s_new, = products(update)
                        o_t = vn_lo.astype(F32)
                    else:  # Q' = diag(exp(gc)) Q
                        s_new, o_t = products(update, o_prods)
                    plgpu.barrier_arrive(in_free.at[slot])
                o_lo_t = out_tile(o_t)
                if store_shadow:
                    if not ab("store"):
                        with jax.named_scope("s_store"):
                            stage(o_lo_t, j, tok, lo, hi, t0, then_issue=False)
                    return s_new, ((), j, t0, lo, hi, jnp.int32(1))
                if pend is not None:
                    return s_new, (o_lo_t, j, t0, lo, hi, jnp.int32(1))
                if not ab("store"):
                    with jax.named_scope("s_store"):
                        store(o_lo_t, j, tok, lo, hi, t0)
                return s_new, None

            def three_groups(slot, s_t, s_lo, valid, g_x, g_d, g_last, pend):
                """(Vnew^T, its decayed copy, both in the input dtype; the decayed state exp(gc_last) S^T)
                from U^T and X = Sl K^T (one group), then W^T Ag^T (a second). With ``pend``
                (``overlap``) the previous tile's output is stored while the first group runs, and
                with ``_shadow`` the column factors and the state's decay are computed in the groups'
                shadows (the same values)."""
                sel = column_select(not (ab("selects") or lean))
                shadow = (overlap or under_update) and _shadow
                mask = valid if callable(valid) else (lambda: valid)

                def x_factor():  # exp(gc) of X's columns; with lean 0 on other sequences' columns
                    return masked_exp(mask(), g_x) if lean else jnp.exp(g_x)

                def vd_factor():
                    return masked_exp(mask(), g_last - g_d)

                def first():  # nothing without ``pend``: the same module as with no ``during``
                    if pend is not None:
                        flush(pend)
                    return (x_factor(), vd_factor()) if shadow else None

                s_dec = None
                if ab("xw"):  # Vnew = U: no product with the state
                    (u_t,), fac = products(((BV, C), None, [(v_s.at[slot, w].T, a_s.at[slot].T)]), during=first)
                    vn_t = u_t
                else:
                    with jax.named_scope("s_ux"):
                        (u_t, x_t), fac = products(((BV, C), None, [(v_s.at[slot, w].T, a_s.at[slot].T)]),
                                                   ((BV, C), None, [(s_lo, k_s.at[slot].T)]), during=first)
                    if ab("w"):  # Vnew = U + X: no second product
                        vn_t = u_t + x_t
                    else:
                        with jax.named_scope("s_wneg"):
                            # -(S^T K^T) diag(exp(gc)); columns of other sequences 0 (their Ag rows may be
                            # NaN): selected, or with lean X's are 0 already (their k rows are) and so is
                            # the masked factor
                            e_vec = fac[0] if shadow else x_factor()
                            w_neg = sel(cols(mask(), sh), x_t * cols(-e_vec, sh)).astype(dtype)
                        with jax.named_scope("s_vnew"):
                            if shadow:
                                (vn_t,), s_dec = products(((BV, C), u_t, [(w_neg, a_s.at[slot].T)]),
                                                          during=lambda: s_t * jnp.exp(g_last))
                            else:
                                vn_t, = products(((BV, C), u_t, [(w_neg, a_s.at[slot].T)]))
                with jax.named_scope("s_vd"):
                    vn_t = sel(cols(mask(), sh), vn_t)
                    vn_lo = vn_t.astype(dtype)
                    vd_t = (vn_t * cols(fac[1] if shadow else vd_factor(), sh)).astype(dtype)
                if s_dec is None:
                    s_dec = s_t * jnp.exp(g_last)
                return vn_lo, vd_t, s_dec

            if persistent:
                def issue_h0(kk):  # item kk's initial-state block -> this warpgroup's SMEM staging (TMA)
                    n, j = item(kk)[:2]
                    plgpu.copy_gmem_to_smem(h0_ref.at[jnp.minimum(n, n_h0 - 1), j, :, pl.ds(v0, BV)], h0_st[w],
                                            h0_bar.at[w])

                def run_item(kk, carry):
                    g, pend = carry
                    n, j, is_seq, nt, rows_of = item(kk)
                    with jax.named_scope("s_h0"):  # issue only: the loads are waited for in the first s_pre
                        s0 = initial(n, j)
                        if h0_smem:  # every thread has read the staging: the next item's may come in
                            plgpu.commit_smem()
                            pl.when(kk + 1 < n_mine)(lambda: issue_h0(kk + 1))
                    # with overlap the item's last output tile stays pending into the next item
                    s_t, pend = lax.fori_loop(0, nt, lambda i, c: step(g + i, j, rows_of(i), *c), (s0, pend))
                    if store_shadow:  # the staged tile leaves before the tail's zeros take its SMEM
                        def tail():
                            flush(pend)
                            zero_tail(j)
                        pl.when(jnp.logical_not(is_seq))(tail)
                        pend = pend[:-1] + (jnp.where(is_seq, pend[-1], 0),)
                    else:
                        pl.when(jnp.logical_not(is_seq))(lambda: zero_tail(j))
                    if out_final:
                        with jax.named_scope("s_fin"):
                            pl.when(n < n_out)(lambda: store_state(s_t, ht_ref.at[n, j, :, pl.ds(v0, BV)]))
                    return g + nt, pend

                pend0 = pending0() if overlap or store_shadow else None
                if h0_smem:
                    pl.when(n_mine > 0)(lambda: issue_h0(jnp.int32(0)))
                _, pend = lax.fori_loop(0, n_mine, run_item, (jnp.int32(0), pend0))
                if pend is not None:
                    flush(pend)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_st[w] must be read before the CTA exits
                return

            is_seq, nt, rows_of = row_tiles(n_grid)
            s_t, pend = lax.fori_loop(0, nt, lambda i, c: step(i, j_grid, rows_of(i), *c),
                                      (initial(n_grid, j_grid), pending0() if overlap or store_shadow else None))
            if pend is not None:
                flush(pend)
            pl.when(jnp.logical_not(is_seq))(lambda: zero_tail(j_grid))
            if direct_io:
                if out_final:
                    pl.when(n_grid < n_out)(lambda: store_state(s_t, ht_ref.at[n_grid, j_grid, :, pl.ds(v0, BV)]))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_st[w] must be read before the CTA exits
            else:
                plgpu.wait_smem_to_gmem(0)
                if out_final:
                    store_final_state(loop_done, st_s[w], s_t, ht_ref.at[n_grid, j_grid, :, pl.ds(v0, BV)],
                                      n_grid < n_out)

        def run_cta():
            pl.when(wg == wg_prep)(_prep)
            for w in range(nsw):
                pl.when(wg == w)(lambda w=w: state(w))
            finish_together(done)

        if halves is None:
            run_cta()
        else:  # mode 0: the pair's second CTA has nothing to do
            pl.when((mode_ref[0] != 0) | (x_half == 0))(run_cta)

    args = [q, k, v, *(gates if fused else (ag, gc)), cu] + ([lrq, lrk] if l2 else []) + ([h0] if has_h0 else [])
    if persistent:
        args.append(_persistent_schedule(cu, hv, ctas, schedule))
    grid, grid_names = ((ctas,), ("c",)) if persistent else ((hv, ns), ("h", "n"))
    if halves is not None:  # the mode from the count of sequences with tokens, on the device
        nonempty = jnp.sum((cu[1:] > cu[:-1]).astype(jnp.int32))
        args.append(jnp.asarray(halves, jnp.int32)[nonempty][None])
        grid, grid_names = (2,) + grid, ("x",) + grid_names
    with tracing_for_interpreter(interp):
        outs = plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=scratch, grid=grid, grid_names=grid_names,
            num_threads=nsw + 1, thread_name="wg", compiler_params=compiler_params(no_auto_barriers=bare),
            interpret=interpret_params(interpret), kernel_name="gdn_chunk_loop_wide",
        )(*args)
    return outs[0], (outs[1] if out_final else None)
