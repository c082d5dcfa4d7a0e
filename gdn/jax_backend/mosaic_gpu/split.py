"""The exact sequence split on the Mosaic GPU path: two passes in one jitted call (gdn issue 6).

A long sequence on a per-(sequence, v head) chunk loop leaves most SMs idle (1x32768 at HV = 32:
32 wide CTAs on 132 SMs). Its pieces (host-planned, :func:`gdn.planner.split_pieces`) run as the
sequences of a finer plan:

1. the intra kernel once on the piece plan (its ``Ag`` and ``gc`` serve both passes);
2. pass 1, :func:`.piece_states.piece_states`: every piece's end state ``E`` and map ``M``
   (``S_end = M S_start + E``), states only;
3. the scan over each sequence's pieces: one Pallas-Triton kernel (tf32x3, the default of
   :func:`run_split`) or XLA, one step per piece position (fp32, HIGHEST);
4. pass 2, the chunk loop on the piece plan from the scanned starts: the output and the pieces'
   final states exactly as an unsplit call computes them (no correction of the output).

Exact for any gates (no decay threshold). The host tables are :func:`gdn.split.two_pass_tables`;
they and the plans travel as device arrays of bucketed shapes, so a new batch in the same bucket
does not recompile, and nothing is read back from the device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ...api import PrefillArgs
from ...planner import SPLIT_MIN_GAIN
from ..common import _pad_rows, _take_rows, _tracing, count_trace
from . import _driver
from .piece_states import piece_states


@functools.partial(jax.jit, static_argnames=(
    "scale", "use_qk_l2norm", "output_final_state", "return_stages", "interpret", "chunk_variant",
    "stages1", "loop_direct_io", "loop_overlap", "scan", "_stop"))
def core_split(q, k, v, g, beta, plan, h0, tables, *, scale: float, use_qk_l2norm: bool,
               output_final_state: bool, return_stages: bool = False, interpret=None,
               chunk_variant: str = "default", stages1: int = 2, loop_direct_io: bool = False,
               loop_overlap: bool = False, scan: str = "xla", _stop: str | None = None):
    """q, k [B, T, H, K], v [B, T, HV, V], g, beta [B, T, HV]; plan: the PIECE plan (pytree);
    h0 None or [N_pad, HV, K, V] (the sequences' rows); tables: :func:`gdn.split.two_pass_tables`
    as device int32 arrays -> (o [B, T, HV, V], final [N_pad, HV, K, V] fp32 or None, None).
    ``scan``: "xla" (:func:`scan_starts`) or "kernel" (one Pallas-Triton kernel,
    :func:`gdn.jax_backend.pallas_triton.scan.scan_starts`: tf32x3 products, fp32 accuracy).
    ``_stop`` (a diagnostic: the check script times the passes by differences): "intra", "pass1"
    or "scan" returns (that stage's output, None, None) instead."""
    del return_stages
    if _stop not in (None, "intra", "pass1", "scan"):
        raise ValueError(f"_stop must be None, 'intra', 'pass1' or 'scan', got {_stop!r}")
    count_trace("mosaic_gpu_split")
    x = _driver.prepare(q, k, v, g, beta, plan, h0, use_qk_l2norm)
    _, hv, dv = x.v.shape
    dk = x.k.shape[2]
    p_pad = x.cu.shape[0] - 1
    f32 = jnp.float32
    ag, gc, x = _driver.run_intra(x, use_qk_l2norm, interpret=interpret)
    if _stop == "intra":
        return (ag, gc), None, None

    # pass 1: [E | M] of every piece, E of a first piece from its sequence's initial state
    h0_rows = tables["h0_row"]
    hp = None
    if x.h0 is not None:
        hp = jnp.where((h0_rows >= 0)[:, None, None, None], x.h0[jnp.maximum(h0_rows, 0)], 0.0)
    em = piece_states(x.k, x.v, ag, gc, x.cu, tables["mode"], hp, group=x.group, stages=stages1,
                      overlap=loop_overlap is True, lrk=x.lrk, interpret=interpret)
    if _stop == "pass1":
        return em, None, None
    if scan == "kernel":
        from ..pallas_triton.scan import scan_starts_packed
        start0 = jnp.zeros(em.shape[:3] + (dv,), f32) if hp is None else hp
        start = scan_starts_packed(em, tables["by_step"], start0, interpret=bool(interpret))
    else:
        start = scan_starts(em[..., :dv], em[..., dv:], tables["by_step"], hp)
    if _stop == "scan":
        return start, None, None

    # pass 2: the pieces from their true starts
    o, fin = _driver.loop(x, ag, gc, start, p_pad, chunk_variant=chunk_variant, scale=scale,
                          direct_io=loop_direct_io, overlap=loop_overlap, interpret=interpret)
    final = None
    if output_final_state:
        last = tables["last_piece"]
        empty = jnp.zeros((last.shape[0], hv, dk, dv), f32) if x.h0 is None else x.h0
        final = jnp.where((last >= 0)[:, None, None, None], fin[jnp.maximum(last, 0)], empty)
    return x.unpad(o), final, None


def scan_starts(e_map, m_map, by_step, hp):
    """Every piece's true start state fp32 [P_pad, HV, K, V] from pass 1's ``e_map`` [P_pad, HV,
    K, V] and ``m_map`` [P_pad, HV, K, K] (``S_end = M S_start + E``), ``by_step`` [S, R] int32
    (:func:`gdn.split.two_pass_tables`) and ``hp`` None or [P_pad, HV, K, V] (a first piece's
    start: its sequence's initial state). A first piece starts from ``hp`` and ends in its E (its
    M is 0); each later piece from the end of the one before: S - 1 steps of [K, K] x [K, V] over
    the R sequences of several pieces (fp32, HIGHEST), the starts written by one scatter."""
    p_pad, hv, dk, dv = e_map.shape
    steps = by_step.shape[0]
    start = jnp.zeros((p_pad, hv, dk, dv), jnp.float32) if hp is None else hp
    if steps < 2:
        return start
    s = e_map[jnp.maximum(by_step[0], 0)]
    ends = []  # ends[i - 1]: the start of piece by_step[i]
    for i in range(1, steps):
        ends.append(s)
        if i + 1 < steps:
            ids = by_step[i]
            idx = jnp.maximum(ids, 0)
            s_new = jnp.einsum("nhij,nhjv->nhiv", m_map[idx], s,
                               precision=jax.lax.Precision.HIGHEST) + e_map[idx]
            s = jnp.where((ids >= 0)[:, None, None, None], s_new, s)
    ids = by_step[1:].reshape(-1)
    return start.at[jnp.where(ids >= 0, ids, p_pad)].set(
        jnp.stack(ends).reshape((-1, hv, dk, dv)), mode="drop")


SCANS = ("xla", "kernel")


def run_split(args: PrefillArgs, split, *, interpret=None, chunk_variant: str = "auto", stages1: int = 2,
              loop_direct_io: bool = False, loop_overlap: bool | str = "auto", scan: str = "kernel",
              _stop: str | None = None):
    """The two-pass split of validated ``args`` (packed batch) cut by ``split`` -> (o, final or
    None), like :func:`gdn.jax_backend.mosaic_gpu.run`. With a host plan ``split`` is the host's
    :class:`gdn.planner.Split`; with a plan traced under the caller's jit it is the piece size in
    chunks (an int), and the pieces and tables come from the traced ``cu_seqlens`` on the device
    (:func:`traced_pieces`): one compilation serves the plan's bucket, nothing is read back.
    ``chunk_variant``: pass 2's loop ("auto": :func:`._driver.pick_chunk_variant` on the pieces);
    ``stages1``: pass 1's ring depth; ``loop_direct_io``: pass 2's chunk loop ``direct_io`` (each
    piece's start state read straight into registers, :func:`._driver.prefill_arrays`);
    ``loop_overlap``: both passes' ``overlap`` ("auto": on where pass 2 runs the narrow loop,
    :func:`._driver.resolve_loop_overlap`); ``scan``: "kernel" (the default: the whole scan in one
    Pallas-Triton kernel) or "xla" (a few XLA kernels per step). H200, 2026-12-05 (call j1): at
    1x32768 with H/HV 2/4, pieces of 32 chunks, 0.259 ms with the XLA scan, 0.244 with the kernel,
    0.240 with the kernel and overlap (FLA 0.816); at 4/8, pieces of 64, 0.385 vs 0.358 (FLA
    0.959); the same bits as the unsplit call at these piece sizes."""
    from ...planner import Split
    from . import check_runnable

    interpret = check_runnable(args, interpret)
    p = args.plan
    if args.batch != 1:
        raise ValueError("the split needs a packed batch (cu_seqlens or plan, B == 1)")
    if not isinstance(split, Split if p.is_host else int) or isinstance(split, bool):
        raise TypeError(f"split must be a gdn.planner.Split with a host plan, the piece size in chunks "
                        f"(an int) with a traced one; got {type(split).__name__}")
    if stages1 not in (2, 3, 4):
        raise ValueError(f"stages1 must be 2, 3 or 4, got {stages1!r}")
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if not isinstance(loop_direct_io, bool):
        raise TypeError(f"loop_direct_io must be a bool, got {loop_direct_io!r}")
    _driver.check_loop_overlap(loop_overlap)
    if p.is_host:
        piece_plan, call_plan, tables = host_pieces(p, split, args.q.shape[1])
    else:
        piece_plan, tables = traced_pieces(p, split, args.q.shape[1])
        call_plan = piece_plan
        if chunk_variant == "auto":
            chunk_variant = traced_pass2_variant(p, split, args.q.shape[1], args.dims[1], args.dims[3])
    chunk_variant = _driver.resolve_chunk_variant(chunk_variant, piece_plan, args.dims[1], args.dims[3])
    loop_overlap = _driver.resolve_loop_overlap(loop_overlap, chunk_variant)
    h0 = args.initial_state
    if h0 is not None and h0.shape[0] != p.padded_seqs:
        h0 = _pad_rows(h0, p.padded_seqs)
    o, final, _ = core_split(args.q, args.k, args.v, args.g, args.beta, call_plan, h0, tables,
                             scale=args.scale, use_qk_l2norm=args.use_qk_l2norm,
                             output_final_state=args.output_final_state, interpret=interpret,
                             chunk_variant=chunk_variant, stages1=stages1, loop_direct_io=loop_direct_io,
                             loop_overlap=loop_overlap, scan=scan, _stop=_stop)
    if _stop is not None:
        return o, None
    if final is not None and p.num_seqs is not None and final.shape[0] != p.num_seqs:
        final = _take_rows(final, p.num_seqs)
    return o, final


def host_pieces(p, split, num_tokens: int):
    """(host piece plan, its copy for :func:`core_split`, tables) of a host plan ``p`` cut as
    ``split``. The copies are device arrays memoized on ``p`` (:meth:`gdn.planner.Plan.memo`), so
    a model's layers calling eagerly with one plan build and copy them once (rebuilt per call with
    8 host-to-device copies, they cost ~2.3 ms of host time per eager call at 1x8192 and H/HV 2/4
    against ~0.12 ms of GPU time; H100, 2026-12-06); under jit they are the NumPy arrays
    (constants of the trace) and nothing traced is memoized."""
    from ...planner import plan as make_plan
    from ...split import two_pass_tables

    # the pieces and tables are functions of these (a Split from split_pieces)
    key = ("mosaic_gpu_split", np.asarray(split.cu_seqlens).tobytes(), split.piece_chunks, split.chunk_size,
           num_tokens)

    def build():
        piece_plan = make_plan(split.piece_cu_seqlens, p.chunk_size, num_tokens=num_tokens)
        return piece_plan, two_pass_tables(split, p.padded_seqs, piece_plan.padded_seqs)

    piece_plan, tables = p.memo(key, build)
    if _tracing():
        return piece_plan, piece_plan, tables
    return (piece_plan,) + p.memo(key + ("jax",), lambda: (
        piece_plan.to_jax(), {name: jax.device_put(a) for name, a in tables.items()}))


def bucket_piece_counts(plan, piece_chunks: int, num_tokens: int) -> list[int]:
    """The piece counts pass 2 sees for the batches a traced plan's bucket is meant for: ``n``
    sequences sharing the ``num_tokens`` token rows equally, for every count ``n`` of the bucket
    (the batches :func:`gdn.split.pick_piece_chunks_for_bucket` chose the piece size for).
    ``n * ceil(ceil(T / n) / step)`` pieces each, ``step = piece_chunks * chunk_size``."""
    rng = _driver._seq_range(plan)
    lo, hi = (1, plan.padded_seqs) if rng is None else (max(rng[0], 1), max(rng[1], 1))
    step = piece_chunks * plan.chunk_size

    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    return sorted({n * ceil_div(ceil_div(num_tokens, n), step) for n in range(lo, hi + 1)})


def traced_pass2_variant(plan, piece_chunks: int, num_tokens: int, hv: int, dv: int) -> str:
    """Pass 2's loop for a traced plan: :func:`._driver.pick_chunk_variant_for` on
    :func:`bucket_piece_counts`, not on the piece plan's row bound (``T / step + N_pad``, which is
    no bucket: at 1x32768 and 2/4 in pieces of 32 chunks its 18 rows read as the counts 17..18 and
    picked the wide loop, where the 16 pieces of the batch want the narrow one; H100, 2026-12-06,
    calls z2s / s1: 0.310 vs the host plan's 0.236 ms at 2/4, 0.447 vs 0.334 at 4/8)."""
    return _driver.pick_chunk_variant_for(bucket_piece_counts(plan, piece_chunks, num_tokens), hv, dv,
                                          _driver._sm_count())


def traced_pieces(plan, piece_chunks: int, num_tokens: int):
    """(piece plan, tables) of a plan traced under jit (its ``cu_seqlens`` a tracer) cut into
    pieces of ``piece_chunks`` chunks, computed on the device (:func:`gdn.split.split_tables`).
    The static bounds hold for every batch of the plan's bucket of ``num_tokens`` token rows: at
    most ``T / step + N_pad`` pieces (a sequence adds at most one partial piece), ``ceil(T /
    step)`` of one sequence, ``min(N_pad, T / (step + 1))`` sequences of several (rounded up to
    powers of two, as the host's, for the scan kernel's block loads). The piece plan carries only
    ``cu_seqlens``: the Mosaic kernels walk every sequence from it (its chunk tables are None)."""
    from ...planner import Plan
    from ...split import pow2_at_least, split_tables

    step = piece_chunks * plan.chunk_size
    pieces_pad = num_tokens // step + plan.padded_seqs
    tb = split_tables(jnp, plan.cu_seqlens, piece_chunks, chunk_size=plan.chunk_size, pieces_pad=pieces_pad,
                      steps=pow2_at_least(-(-num_tokens // step)),
                      cols=pow2_at_least(min(plan.padded_seqs, num_tokens // (step + 1))))
    piece_plan = Plan(cu_seqlens=tb.pop("piece_cu_seqlens"), chunk_indices=None, chunk_offsets=None,
                      num_seqs=None, num_chunks=None, num_tokens=None, padded_seqs=pieces_pad,
                      padded_chunks=plan.padded_chunks + pieces_pad, padded_tokens=plan.padded_tokens,
                      chunk_size=plan.chunk_size)
    return piece_plan, tb


#: Pass 1's time per tile of one CTA with ``MAP_CTAS_PER_SM`` of them per SM (its SMEM allows
#: two): taken as the narrow loop's measured tile time (the same state chain, there beside an
#: output warpgroup), a CTA sharing its SM being assumed no faster; the scan's time per step.
#: Measured on the H200 (call j1, 2026-12-05): pass 1 64 us at 1x32768, H/HV 2/4, pieces of 32
#: chunks (modelled 62), 120 at 4/8, pieces of 64 (modelled 124); the scan kernel's 15 steps ~59
#: us and 7 steps ~30 us (the XLA scan: 74 and 57), hence ~4.5 us a step (15 before that call).
MAP_TILE_US, MAP_CTAS_PER_SM, SCAN_STEP_US = _driver.DEFAULT_TILE_US, 2, 4.5


def loop_us(chunks, hv: int, dv: int, sms: int) -> float:
    """Modelled time of the chunk loop :func:`._driver.pick_chunk_variant` picks for sequences
    of ``chunks`` chunks each (list scheduling of its CTAs, :func:`gdn.planner.makespan`, times
    the loop's tile time)."""
    from ...planner import makespan

    chunks = np.asarray(chunks, np.int64)
    if _driver.pick_chunk_variant(int(np.sum(chunks > 0)), hv, dv, sms) == "wide":
        return makespan(np.repeat(chunks, hv), sms) * _driver.WIDE_TILE_US
    return makespan(np.repeat(chunks, hv * (dv // 64)), sms) * _driver.DEFAULT_TILE_US


def map_us(first, later, hv: int, dk: int, dv: int, sms: int) -> float:
    """Modelled time of pass 1 (:func:`.piece_states.piece_states`): a first piece's V / 64 E
    blocks and a later piece's (V + K) / 64 E and M blocks per v head, of its chunks each."""
    from ...planner import makespan

    tiles = np.concatenate([np.repeat(np.asarray(first, np.int64), hv * (dv // 64)),
                            np.repeat(np.asarray(later, np.int64), hv * ((dv + dk) // 64))])
    return makespan(tiles, MAP_CTAS_PER_SM * sms) * MAP_TILE_US


def _costs(hv: int, dk: int, dv: int, sms: int | None) -> dict:
    sms = sms or _driver._sm_count()
    return dict(loop_us=lambda c: loop_us(c, hv, dv, sms), map_us=lambda f, l: map_us(f, l, hv, dk, dv, sms),
                scan_step_us=SCAN_STEP_US)


def pick_piece_chunks(seq_lens, hv: int, dk: int, dv: int, sms: int | None = None) -> int | None:
    """Chunks per piece of the two-pass split, or None when it does not pay
    (:func:`gdn.planner.two_pass_policy` with this path's costs). Remembered per chunk counts: a
    model's forward asks it once per linear-attention layer with the same batch."""
    nc = -(-np.asarray(seq_lens, np.int64).ravel() // 64)
    model = (MAP_TILE_US, MAP_CTAS_PER_SM, SCAN_STEP_US, _driver.WIDE_TILE_US, _driver.DEFAULT_TILE_US)
    return _pick_piece_chunks(tuple(nc[nc > 0].tolist()), hv, dk, dv, sms or _driver._sm_count(), model)


@functools.lru_cache(maxsize=256)
def _pick_piece_chunks(chunks: tuple[int, ...], hv: int, dk: int, dv: int, sms: int, model: tuple) -> int | None:
    """``model``: the cost constants in force (part of the key: a changed constant is a new model)."""
    from ...planner import two_pass_policy

    return two_pass_policy(np.asarray(chunks, np.int64) * 64, **_costs(hv, dk, dv, sms))


#: A traced plan's pieces may cost at most this much more than unsplit (in the model) on any
#: batch of equal sequences its bucket holds.
BUCKET_SLACK = 1.05
#: the piece sizes a traced plan's bucket chooses from. Not 8: the model underrates its cost. H100,
#: 2026-12-06 (session 17, s1): at H/HV 2/4, 1x8192 under jit the bucket's pick of 8 ran 0.351 ms
#: against 0.115 for the host plan's 16 (FLA 0.495); session 11 (H100): pieces of 8 at 4x2048 0.519
#: ms against 0.329 for 16. Without 8 (s17, s2): 0.153 ms under jit (the host plan 0.111, FLA 0.418).
BUCKET_PIECES = (16, 32, 64, 128, 256)


def pick_piece_chunks_for_bucket(num_tokens: int, counts: tuple[int, int], hv: int, dk: int, dv: int,
                                 sms: int | None = None) -> int | None:
    """Chunks per piece for a plan traced under jit (its lengths unknown): of the piece sizes
    whose modelled time is within ``BUCKET_SLACK`` of the unsplit one for every batch of ``n``
    equal sequences of ``num_tokens`` tokens in all (``n`` over ``counts``, the bucket's range),
    the one whose worst ratio to that batch's best option is smallest; None (unsplit) when none
    beats running unsplit."""
    return _pick_for_bucket(int(num_tokens), (max(int(counts[0]), 1), int(counts[1])), hv, dk, dv,
                            sms or _driver._sm_count())


@functools.lru_cache(maxsize=256)
def _pick_for_bucket(num_tokens: int, counts: tuple[int, int], hv: int, dk: int, dv: int,
                     sms: int) -> int | None:
    layouts = [[num_tokens // n] * n for n in range(counts[0], counts[1] + 1) if num_tokens // n]
    if not layouts:
        return None
    cost = {pc: [sum(model_us(lens, pc, hv, dk, dv, sms).values()) for lens in layouts]
            for pc in (None,) + BUCKET_PIECES}
    best = [min(c[i] for c in cost.values()) for i in range(len(layouts))]

    def regret(pc):
        return max(c / b for c, b in zip(cost[pc], best))

    # as the host plan's pick (two_pass_policy): a piece size must beat unsplit by SPLIT_MIN_GAIN
    # on some batch of the bucket, not only tie with it (a bucket of one prompt at HV = 32 would
    # otherwise split, modelled 1.07x, where the unsplit co-resident kernel is faster)
    ok = [pc for pc in cost if pc is None
          or (all(c <= BUCKET_SLACK * u for c, u in zip(cost[pc], cost[None]))
              and any(c * SPLIT_MIN_GAIN <= u for c, u in zip(cost[pc], cost[None])))]
    return min(ok, key=lambda pc: (regret(pc), pc is not None))


def model_us(seq_lens, piece_chunks: int | None, hv: int, dk: int, dv: int, sms: int | None = None) -> dict:
    """This path's modelled times in us (what :func:`pick_piece_chunks` compares): ``unsplit``,
    or ``pass1`` / ``scan`` / ``pass2`` at ``piece_chunks`` (the check script prints them beside
    the measured ones)."""
    from ...planner import two_pass_cost

    costs = _costs(hv, dk, dv, sms)
    nc = -(-np.asarray(seq_lens, np.int64) // 64)
    if not piece_chunks:
        return dict(unsplit=float(costs["loop_us"](nc[nc > 0])))
    return dict(zip(("pass1", "scan", "pass2"), two_pass_cost(nc, piece_chunks, **costs)))
