"""XLA glue around the Mosaic GPU kernels (reshapes, head-major gates, sequence ids), jitted.

:func:`core` is one ``jax.jit``-ed function per bucket and option set, like the other
implementations' cores (gdn.jax_backend.common): an eager ``gdn.prefill`` call then costs one
cached dispatch instead of a chain of eager ops (each eager op is a host round trip, and
scalar operands of eager ops are host-to-device transfers).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...api import PrefillArgs
from ...planner import DOMINANT_RATIO, seq_bucket_range
from ..common import count_trace, l2normalize, rstd, run_core
from .chunk_loop import chunk_loop
from .coresident import applies as coresident_applies, check_flag_lag, coresident, long_first
from .chunk_loop_wide import SCHEDULES, check_out_store, VALUE_DIMS as WIDE_VALUE_DIMS, chunk_loop_wide, h0_staging_fits
from .common import C, TMA_ROWS
from .fused import fused
from .intra import SOLVE_PAD, check_options as check_intra_options, intra

#: "fused_wide": the wide chunk loop doing the intra work in its prep warpgroup (chunk_loop_wide's
#: ``gates``; H100, 2026-12-06: the same bits, 1.69x slower at 4x8192: it spills); "fused_wide_mma": the
#: same with that work on [64, 16] column slabs by warp-level MMA (``intra_slabs``, :mod:`.slabs`)
#: "coresident": the intra work and the narrow loop in one launch, the intra on the SMs the loop leaves
#: idle (:mod:`.coresident`; one long prompt)
VARIANTS = ("two_kernels", "fused", "fused_wide", "fused_wide_mma", "coresident")
FUSED_WIDE = ("fused_wide", "fused_wide_mma")
CHUNK_VARIANTS = ("auto", "default", "wide")
#: where use_qk_l2norm's row norms are computed (prefill_arrays' ``qk_norms``)
QK_NORMS = ("intra", "xla")
#: Per-tile time of one CTA (H200, 2026-12-04, H = 16, HV = 32, K = V = 128, each loop alone at
#: 4x8192): the wide loop 0.416 ms for one wave of 128 tiles, the default 0.494 ms for two waves.
WIDE_TILE_US, DEFAULT_TILE_US = 3.25, 1.93


def loop_wave_us(num_seqs: int, hv: int, sms: int) -> dict[str, float]:
    """The wave model of the two chunk loops, per chunk of the sequences (us): ``"wide"`` runs a
    CTA per (sequence, v head), ``"default"`` two (a V half each), one CTA per SM, every sequence
    taken as equally long. A model for choosing, not a promise."""
    ctas = max(num_seqs, 1) * hv
    return {"wide": -(-ctas // sms) * WIDE_TILE_US, "default": -(-2 * ctas // sms) * DEFAULT_TILE_US}


def pick_chunk_variant(num_seqs: int | None, hv: int, dv: int, sms: int) -> str:
    """"wide" where its CTAs (one per sequence and v head, one per SM) fill the GPU's waves better
    than the default's (twice as many, a V half each), else "default". ``num_seqs``: the sequences
    with tokens (an empty one's CTAs exit at once). "default" when the
    sequence count is unknown or V != 128 (the wide loop is
    measured at V = 128 only). :func:`loop_wave_us`'s model.

    On the H200 (2026-12-04) it picks what measured faster at 4x8192, 8x4096, 128x256 and 4x2048
    (wide) and at 1x32768 and 4x8192 with HV = 16 or 48 (default).
    """
    if num_seqs is None or dv != 128 or num_seqs <= 0:
        return "default"
    t = loop_wave_us(num_seqs, hv, sms)
    return "wide" if t["wide"] < t["default"] else "default"


def pick_chunk_variant_for(counts, hv: int, dv: int, sms: int) -> str:
    """One loop for every sequence count of ``counts`` (a traced plan's bucket, which one
    compilation serves): :func:`pick_chunk_variant`'s pick where all counts agree, else the loop
    whose worst slowdown against the count's own pick (:func:`loop_wave_us`) is smaller, ties to
    "default". At HV = 32 the bucket of 3..8 sequences gets the wide loop (at most 1.12x the
    narrow one, at 5 and 6 sequences, against 1.19x the other way, at 3, 4, 7 and 8); 0..1 and 2
    sequences get the narrow one (the wide loop would be 1.68x)."""
    counts = [max(int(n), 1) for n in counts]
    picks = {pick_chunk_variant(n, hv, dv, sms) for n in counts}
    if len(picks) == 1:
        return picks.pop()
    worst = {v: 1.0 for v in ("default", "wide")}
    for n in counts:
        t = loop_wave_us(n, hv, sms)
        for v in worst:
            worst[v] = max(worst[v], t[v] / min(t.values()))
    return "wide" if worst["wide"] < worst["default"] else "default"


@functools.cache
def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0) or 132)
    except Exception:  # pragma: no cover - no backend
        return 132


@functools.partial(jax.jit, static_argnames=(
    "scale", "use_qk_l2norm", "output_final_state", "return_stages", "interpret", "variant", "bv",
    "stages", "regs", "intra_tiles", "head_loop", "intra_pad", "intra_merge", "intra_columns",
    "intra_isolate", "intra_out_buffers", "intra_solve", "intra_warpgroups", "chunk_variant", "loop_lean", "loop_bare", "loop_direct_io",
    "loop_ctas", "loop_prefetch", "loop_overlap", "loop_schedule", "qk_norms", "loop_halves", "loop_out_store",
    "coresident_sms", "coresident_seqs", "coresident_p", "coresident_order", "coresident_flag_lag",
    "coresident_p_together"))
def core(q, k, v, g, beta, plan, h0, *, scale: float, use_qk_l2norm: bool,
         output_final_state: bool, return_stages: bool = False, interpret=None,
         variant: str = "two_kernels", bv: int = 64, stages: int | None = None, regs=None,
         intra_tiles: int | None = None, head_loop: str = "loop", intra_pad: int = SOLVE_PAD,
         intra_merge: str = "chain", intra_columns: bool = True, intra_isolate: str = "boundary",
         intra_out_buffers: int = 2, intra_solve: str = "smem", intra_warpgroups: int = 1,
         chunk_variant: str = "default", loop_lean: bool = True,
         loop_bare: bool = True, loop_direct_io: bool = False, loop_ctas: int | None = None,
         loop_prefetch: bool | str = False, loop_overlap: bool = False, loop_schedule: str = "order",
         qk_norms: str = "intra", loop_halves: tuple[int, ...] | None = None, loop_out_store: str = "tma",
         coresident_sms: int | None = None, coresident_seqs: int | None = None, coresident_p: bool = False,
         coresident_order: tuple[int, ...] | None = None, coresident_flag_lag: int = 0,
         coresident_p_together: bool = False):
    """q, k [B, T, H, K], v [B, T, HV, V] (bf16/fp16), g, beta [B, T, HV], plan (pytree),
    h0 None or [N_pad, HV, K, V] -> (o [B, T, HV, V], final [N_pad, HV, K, V] fp32 or None, None)."""
    del return_stages  # rejected by the caller: the chunk loop keeps no per-chunk state
    count_trace("mosaic_gpu")
    x = prepare(q, k, v, g, beta, plan, h0, use_qk_l2norm, fold_l2norm=variant in ("two_kernels", "coresident"), qk_norms=qk_norms)
    n_out = plan.padded_seqs if output_final_state else None
    if variant == "fused":
        xp = x.padded()
        o, final = fused(xp.q, xp.k, xp.v, x.g_hm, x.beta_hm, x.cu, x.h0, scale=scale, group=x.group,
                         n_out=n_out, stages=stages, regs=regs, interpret=interpret)
    elif variant == "coresident":
        o, final, *_ = coresident(x.q, x.k, x.v, x.g_hm, x.beta_hm, x.seg, x.cu, x.h0, scale=scale, group=x.group,
                                  n_out=n_out, t_valid=x.q.shape[0], sms=coresident_sms or _sm_count(),
                                  lrq=x.lrq, lrk=x.lrk, norms_in_intra=use_qk_l2norm and x.lrk is None, bv=bv,
                                  stages=stages, lean=loop_lean, overlap=loop_overlap,
                                  intra_warpgroups=intra_warpgroups if intra_warpgroups > 1 else 3,
                                  active_seqs=coresident_seqs, p_from_workers=coresident_p,
                                  seq_order=coresident_order, flag_lag=coresident_flag_lag,
                                  p_together=coresident_p_together, interpret=interpret)
    elif variant in FUSED_WIDE:
        o, final = chunk_loop_wide(x.q, x.k, x.v, None, None, x.cu, x.h0, scale=scale, group=x.group, n_out=n_out,
                                   t_valid=x.q.shape[0], stages=stages, regs=regs, lean=loop_lean, bare=loop_bare,
                                   overlap=loop_overlap, gates=(x.g_hm, x.beta_hm),
                                   intra_slabs=variant == "fused_wide_mma", ctas=loop_ctas,
                                   prefetch_h0=loop_prefetch, schedule=loop_schedule, interpret=interpret)
    else:
        ag, gc, x = run_intra(x, use_qk_l2norm, tiles_per_cta=intra_tiles, head_loop=head_loop,
                              solve_pad=intra_pad, merge_variant=intra_merge, solve_columns=intra_columns,
                              isolate=intra_isolate, out_buffers=intra_out_buffers, solve=intra_solve,
                              warpgroups=intra_warpgroups, interpret=interpret)
        o, final = loop(x, ag, gc, x.h0, n_out, chunk_variant=chunk_variant, scale=scale, bv=bv,
                        stages=stages, regs=regs, lean=loop_lean, bare=loop_bare, direct_io=loop_direct_io,
                        ctas=loop_ctas, prefetch_h0=loop_prefetch, overlap=loop_overlap,
                        schedule=loop_schedule, halves=loop_halves, out_store=loop_out_store,
                        interpret=interpret)
    return x.unpad(o), final, None


class Prepared(NamedTuple):
    """The kernels' operands: q, k [T_q, H, K], v [T_q, HV, V] (q's dtype; T_q the caller's token
    count B * T rounded up to a multiple of TMA_ROWS = 8, or 64 when that is less), g_hm, beta_hm
    [HV, T_pad] fp32 (T_pad: whole tiles, T_pad - 64 < T_q <= T_pad), cu int32 [N_pad + 1], seg
    int32 [T_pad] (sequence id per token), h0 None or fp32, group = HV / H; lrq, lrk: None, or with
    use_qk_l2norm fp32 [H, T_pad], ``ln rstd`` of q's and k's rows (q and k not normalized: the
    kernels fold the scales into their factors); ``unpad`` maps the kernels' o [T_q, HV, V] to the
    caller's shape (no copy unless T_q was padded); :meth:`padded`: q, k, v padded to T_pad rows."""
    q: Any
    k: Any
    v: Any
    g_hm: Any
    beta_hm: Any
    cu: Any
    seg: Any
    h0: Any
    group: int
    shape: tuple
    lrq: Any = None
    lrk: Any = None

    def unpad(self, o):
        bsz, t_in, hv, dv = self.shape
        return o[: bsz * t_in].reshape(bsz, t_in, hv, dv)

    def padded(self) -> "Prepared":
        """q, k, v padded with zero rows to T_pad (for a kernel that reads only whole tiles in
        bounds: the fused variant)."""
        pad = self.g_hm.shape[1] - self.q.shape[0]
        if not pad:
            return self
        q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0))) for a in (self.q, self.k, self.v))
        return self._replace(q=q, k=k, v=v)


def prepare(q, k, v, g, beta, plan, h0, use_qk_l2norm: bool, fold_l2norm: bool = True,
            qk_norms: str = "intra") -> Prepared:
    """The XLA glue before the kernels (inside the caller's jit): packing, l2norm, head-major fp32
    gates padded to whole tiles, sequence ids from the plan (on the device).

    q, k and v are NOT padded to whole tiles: the kernels read the last, partial tile past the
    arrays' end, which TMA fills with zeros, and write the output rows the caller has only. Padding
    them cost a copy of q, k and v before the kernels and of o after (~48 KB a token at H = 16,
    HV = 32, K = V = 128 in bf16, read and written: ~0.3 ms of HBM time at 32K tokens) on every
    batch whose token count is not a multiple of 64. The copy remains where TMA needs it: a token
    count that is not a multiple of 8 (TMA_ROWS; padded to the next one) or under one tile.

    ``use_qk_l2norm`` with ``fold_l2norm`` (every kernel but the fused variant's): q and k are not
    rewritten; one reduction each gives ``ln rstd`` of their rows (``lrq``, ``lrk``), which the
    kernels fold into the exponents of the factors already on q's and k's rows. That saves writing
    a normalized copy of q and k (and the kernels reading it): 8 KB a token at H = 16, K = 128 in
    bf16, and the normalized q and k are never rounded to the input dtype (as the Triton backend and
    the other JAX implementations do). Without ``fold_l2norm``: the normalized copies.
    ``qk_norms`` (with ``fold_l2norm``): "intra" (the default) leaves ``lrq`` / ``lrk`` None for the
    intra kernel to compute (:func:`run_intra`); "xla": two XLA reductions compute them here."""
    if qk_norms not in QK_NORMS:
        raise ValueError(f"qk_norms must be one of {QK_NORMS}, got {qk_norms!r}")
    bsz, t_in, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    t_arr = bsz * t_in
    q = q.reshape(t_arr, h, dk)
    k = k.reshape(t_arr, h, dk)
    v = v.astype(q.dtype).reshape(t_arr, hv, dv)
    if use_qk_l2norm and not fold_l2norm:
        q, k = l2normalize(q), l2normalize(k)
    t_pad = max(C, -(-t_arr // C) * C)
    pad = t_pad - t_arr
    g = g.reshape(t_arr, hv).astype(jnp.float32)
    beta = beta.reshape(t_arr, hv).astype(jnp.float32)
    if pad:
        # the gates are transposed to head-major anyway: their padding rides in that copy
        g, beta = (jnp.pad(x, ((0, pad), (0, 0))) for x in (g, beta))
    t_q = C if t_arr < C else -(-t_arr // TMA_ROWS) * TMA_ROWS
    if t_q != t_arr:
        # q, k and v keep the caller's token count where TMA can (a partial last tile is read past
        # the array's end: TMA fills those rows with zeros, the values padding gave them). A copy
        # is left for a count that is not a multiple of TMA_ROWS (up to 7 rows added) and for a
        # batch shorter than one tile (no TMA box larger than its array)
        q, k, v = (jnp.pad(x, ((0, t_q - t_arr), (0, 0), (0, 0))) for x in (q, k, v))
    cu = plan.cu_seqlens.astype(jnp.int32)
    # unrolled: the default method is an XLA while loop, which on the GPU ran as ~16 small kernels and
    # copies per call (H200 trace of 2026-12-05: 10 device copies, 4 adds, 4 selects at 4x2048, in a
    # prefill whose host dispatch, 0.22 ms, already matched its GPU time). jax 0.11.2 still emits a
    # one-step while loop for "scan_unrolled" over ONE boundary (a plan of one sequence row: its
    # unroll factor is then 1), so that case compares instead
    method = "scan_unrolled" if cu.shape[0] > 2 else "compare_all"
    seg = jnp.searchsorted(cu[1:], jnp.arange(t_pad, dtype=jnp.int32), side="right",
                           method=method).astype(jnp.int32)
    if h0 is not None:
        h0 = h0.astype(jnp.float32)
    lrq = lrk = None
    if use_qk_l2norm and fold_l2norm and qk_norms == "xla":  # [H, T_pad]; 0 (a factor of 1) past the tokens
        lrq, lrk = (jnp.pad(jnp.log(rstd(x)).T, ((0, 0), (0, t_pad - x.shape[0]))) for x in (q, k))
    return Prepared(q, k, v, g.T, beta.T, cu, seg, h0, hv // h, (bsz, t_in, hv, dv), lrq, lrk)


def run_intra(x: Prepared, use_qk_l2norm: bool, **options) -> tuple[Any, Any, Prepared]:
    """The intra kernel on prepared operands -> (ag, gc, x); with use_qk_l2norm and no ``lrq`` /
    ``lrk`` yet (:func:`prepare`'s ``qk_norms="intra"``) the kernel also computes them, returned in
    ``x``. ``options``: :func:`.intra.intra`'s."""
    if use_qk_l2norm and x.lrk is None:
        ag, gc, lrq, lrk = intra(x.k, x.g_hm, x.beta_hm, x.seg, group=x.group, q=x.q, **options)
        return ag, gc, x._replace(lrq=lrq, lrk=lrk)
    ag, gc = intra(x.k, x.g_hm, x.beta_hm, x.seg, group=x.group, lrk=x.lrk, **options)[:2]
    return ag, gc, x


def loop(x: Prepared, ag, gc, h0, n_out, *, chunk_variant: str, scale: float, bv: int = 64, stages=None,
         regs=None, lean: bool = True, bare: bool = True, direct_io: bool = False, ctas: int | None = None,
         prefetch_h0: bool | str = False, overlap: bool = False, schedule: str = "order", halves=None,
         out_store: str = "tma", interpret=None):
    """The chunk loop ``chunk_variant`` ("wide" or "default") on prepared operands and the intra
    kernel's ``ag``, ``gc``, from ``h0`` -> (o [T_pad, HV, V], final [n_out, HV, K, V] or None);
    ``ctas`` / ``prefetch_h0`` / ``schedule``: the wide loop's persistent grid, its L2 prefetch of each
    item's initial state and how its CTAs look their items up (the default loop has none of them
    and ignores them); ``halves``: the wide loop's runtime mode table; ``out_store``: the wide loop's
    (how whole output tiles leave); ``overlap``: either loop's."""
    t_valid = x.q.shape[0]
    if chunk_variant == "wide":
        return chunk_loop_wide(x.q, x.k, x.v, ag, gc, x.cu, h0, scale=scale, group=x.group, n_out=n_out,
                               t_valid=t_valid, stages=stages, regs=regs, lean=lean, bare=bare,
                               direct_io=direct_io, ctas=ctas, prefetch_h0=prefetch_h0, overlap=overlap,
                               schedule=schedule, lrq=x.lrq, lrk=x.lrk, halves=halves, out_store=out_store,
                               interpret=interpret)
    return chunk_loop(x.q, x.k, x.v, ag, gc, x.cu, h0, scale=scale, group=x.group, n_out=n_out,
                      t_valid=t_valid, bv=bv, stages=stages, lean=lean, bare=bare, direct_io=direct_io,
                      overlap=overlap, lrq=x.lrq, lrk=x.lrk, interpret=interpret)


def pick_loop_ctas(num_seqs: int | None, hv: int, chunk_variant: str, sms: int) -> int | None:
    """The wide loop's grid: ``sms`` persistent CTAs walking the (sequence, v head) items longest
    first (:func:`.chunk_loop_wide.chunk_loop_wide`'s ``ctas``) where there are more items than
    SMs, else None (one CTA per item). ``num_seqs``: the sequences with tokens (None: unknown; a
    traced plan passes its bucket's smallest count).

    H200, 2026-12-05 (calls i3 / i4, whole prefill, ms): the serving mix (42 sequences of 46 to
    3101 tokens, 1344 items) 0.924 / 0.919 against 1.021 / 0.997 one CTA per item: the longest
    items start first instead of in grid order; 128x256 (4096 items of equal length, the waves in
    step) 0.897 against 0.887; 4x8192 (128 items, each its own CTA either way) 0.664 against 0.671.
    Decided on the host sequence count alone, as the chunk variant is (the lengths would flip it
    between batches far more often): a bucket whose batches straddle ``sms / hv`` sequences
    compiles both grids once each.
    """
    if chunk_variant != "wide" or num_seqs is None or num_seqs * hv <= sms:
        return None
    return sms


#: the persistent grid stages each item's initial state in SMEM (``prefetch_h0="smem"``, 2 ring stages)
#: where the batch's sequences hold at most this many tokens on average, else prefetches it into L2
#: (3 stages). The wide loop alone on an H100, 2026-12-06 (session 19, q12 / q13, ms, staged vs L2):
#: 256x128 0.761 vs 0.943, 128x256 0.566 vs 0.673 (0.605 for the L2 prefetch at 2 stages), 64x512
#: 0.494 vs 0.509; 32x1024 0.455 vs 0.435, the serving mix (~780 tokens a sequence) 0.529 vs 0.515.
#: The whole prefill at 128x256 with it: 0.767 ms (FLA 2.402 in the same call; 0.865 in session 16).
H0_SMEM_MAX_MEAN_TOKENS = 512


def pick_loop_prefetch(plan, tokens: int, loop_ctas, staging_fits: bool = True) -> bool | str:
    """``loop_prefetch="auto"``: "smem" on the persistent grid when the sequences are short on
    average (:data:`H0_SMEM_MAX_MEAN_TOKENS`; for a traced plan, with its bucket's smallest count, the
    longest mean it can have) and the staging fits the loop's SMEM (``staging_fits``:
    :func:`.chunk_loop_wide.h0_staging_fits`), else True (the L2 prefetch)."""
    rng = _seq_range(plan)
    if loop_ctas is None or rng is None or not staging_fits:
        return True
    return "smem" if tokens <= H0_SMEM_MAX_MEAN_TOKENS * max(rng[0], 1) else True


def _counted_seqs(plan) -> int | None:
    """The sequences the grid policies count: those with tokens (an empty one's CTAs exit at once,
    and padding a batch with empty sequences must not change the kernels), None under a jit."""
    return plan.nonempty_seqs if plan.nonempty_seqs is not None else plan.num_seqs


def _seq_range(plan) -> tuple[int, int] | None:
    """The sequence counts the grid policies decide for: ``(n, n)`` with a host plan's non-empty
    count ``n``; for a plan traced under the caller's jit (its count unknown) every count its
    bucket holds (:func:`gdn.planner.seq_bucket_range`: within 1/8 of ``N_pad`` above the floor
    buckets of 0..1, 2 and 3..8), so one compilation serves the bucket; None if unknown."""
    n = _counted_seqs(plan)
    return (n, n) if n is not None else seq_bucket_range(plan.padded_seqs)


def _picks(counts, hv: int, dv: int) -> list[str]:
    """:func:`pick_chunk_variant` for each sequence count of ``counts`` (0 taken as 1)."""
    return [pick_chunk_variant(max(n, 1), hv, dv, _sm_count()) for n in counts]


def _auto_chunk_variant(plan, hv: int, dv: int) -> str:
    """:func:`pick_chunk_variant_for` over :func:`_seq_range` ("default" if the range is
    unknown)."""
    rng = _seq_range(plan)
    if rng is None:
        return "default"
    return pick_chunk_variant_for(range(rng[0], rng[1] + 1), hv, dv, _sm_count())


def halves_table(plan, hv: int, dv: int) -> tuple[int, ...] | None:
    """For ``loop_halves``: where a traced plan's bucket holds counts that want different loops
    (:func:`_auto_chunk_variant` then runs the one with the smaller worst case), the wide loop's mode per count of
    sequences with tokens (``halves[n]`` = 1 where :func:`pick_chunk_variant` picks the narrow
    loop for n sequences; :func:`.chunk_loop_wide.chunk_loop_wide`'s ``halves``), else None."""
    rng = _seq_range(plan)
    if rng is None or rng[0] == rng[1]:  # (n, n): a host plan, or a bucket of one count
        return None
    picks = _picks(range(plan.padded_seqs + 1), hv, dv)
    if len(set(picks[rng[0]:])) == 1:
        return None
    return tuple(int(p == "default") for p in picks)


def resolve_chunk_variant(chunk_variant: str, plan, hv: int, dv: int) -> str:
    """``chunk_variant`` checked ("auto" resolved by :func:`pick_chunk_variant` on ``plan``'s
    non-empty sequences: an empty one's CTAs exit at once, and padding a batch with empty
    sequences must not change which loop runs it; with a traced plan, on its bucket's counts,
    :func:`_auto_chunk_variant`) -> "default" or "wide"."""
    if chunk_variant not in CHUNK_VARIANTS:
        raise ValueError(f"chunk_variant must be one of {CHUNK_VARIANTS}, got {chunk_variant!r}")
    if chunk_variant == "auto":
        chunk_variant = _auto_chunk_variant(plan, hv, dv)
    if chunk_variant == "wide" and dv not in WIDE_VALUE_DIMS:
        raise NotImplementedError(f"mosaic_gpu chunk_variant 'wide' runs V in {WIDE_VALUE_DIMS}")
    return chunk_variant


#: the intra kernel's options of :func:`prefill_arrays` (their defaults: :func:`intra_defaults`)
INTRA_OPTIONS = ("intra_tiles", "head_loop", "intra_pad", "intra_merge", "intra_columns", "intra_isolate",
                 "intra_out_buffers", "intra_solve", "intra_warpgroups")


@functools.cache  # (prefill_arrays asks on every call; the signature does not change)
def intra_defaults() -> tuple:
    """:data:`INTRA_OPTIONS`' defaults, read from :func:`prefill_arrays`' signature (one copy)."""
    params = inspect.signature(prefill_arrays).parameters
    return tuple(params[n].default for n in INTRA_OPTIONS)


def _coresident_can_run(args: PrefillArgs, chunk_variant: str, bv: int, loop_halves: bool, intra_default: bool,
                        interpret) -> bool:
    """What both co-resident picks ask first: not under the interpreter, no ``loop_halves``, the
    intra options at their defaults, V in tiles of 64, and the narrow loop (``chunk_variant``
    "default", or "auto" picking it for the plan)."""
    h, hv, dk, dv = args.dims
    if interpret or loop_halves or not intra_default or bv != 64 or dv % bv:
        return False
    if chunk_variant == "auto":
        chunk_variant = resolve_chunk_variant(chunk_variant, args.plan, hv, dv)
    return chunk_variant == "default"


def pick_variant(args: PrefillArgs, chunk_variant: str, bv: int, loop_halves: bool, intra_default: bool,
                 coresident_seqs: int | None, coresident_sms: int | None, interpret) -> str:
    """``variant="auto"``: "coresident" where the narrow chunk loop runs (``chunk_variant`` "default",
    or "auto" picking it) and its CTAs for the most sequences with tokens this compilation may see
    (``coresident_seqs``, else a host plan's count or a traced plan's bucket's largest) leave at least
    half the SMs to the intra workers (:func:`.coresident.applies`), the intra kernel's options at
    their defaults and V in tiles of 64; else "two_kernels". H100, 2026-12-07 (session 27, the same
    bits): whole prefill 0.847-0.873 vs 0.980-1.003 ms at 1x32768, 0.250-0.256 vs 0.282 at 1x8192,
    0.835 vs 0.909 at 1x32768 with HV = 16. Under the interpreter (``interpret``) "two_kernels": it
    runs a grid's CTAs one after another, and the workers' ~70 CTAs would dominate a small test's
    time (the co-resident kernel has its own interpreter tests)."""
    if not _coresident_can_run(args, chunk_variant, bv, loop_halves, intra_default, interpret):
        return "two_kernels"
    h, hv, dk, dv = args.dims
    if coresident_seqs is None:
        rng = _seq_range(args.plan)
        if rng is None:
            return "two_kernels"
        coresident_seqs = rng[1]
    ctas = (dv // bv) * hv * max(int(coresident_seqs), 1)
    return "coresident" if coresident_applies(ctas, coresident_sms or _sm_count()) else "two_kernels"


#: host plans of at most this many sequence rows are asked :func:`pick_long_first` (its order is a
#: chain of selects in the kernel)
LONG_FIRST_MAX_SEQS = 8


def pick_long_first(args: PrefillArgs, chunk_variant: str, bv: int, loop_halves: bool, intra_default: bool,
                    coresident_sms: int | None, interpret) -> tuple[int, ...] | None:
    """``variant="auto"`` where :func:`pick_variant` said "two_kernels": with a host plan of a few
    sequences whose narrow loop fills one wave, the co-resident kernel with workers sized for the
    longest sequence alone, its loop CTAs first (:func:`.coresident.long_first`'s order), or None.
    A traced plan knows no lengths, only its bucket: in the bucket of two with a dominant sequence
    (:attr:`gdn.planner.Plan.dominant`), the model is asked for the least skewed batch the bucket
    holds (``DOMINANT_RATIO`` to 1, ``padded_tokens`` in all), so every batch there has at least
    that skew. H100, 2026-12-07, the same bits: 28672+4096 at 16/32 0.752 ms against 0.908 (s28p,
    jitted, a device plan, the long prompt first), 0.767 against 0.913 (s29, a host plan);
    4096+28672 0.837 against 0.917 (s29, a host plan)."""
    h, hv, dk, dv = args.dims
    plan = args.plan
    if (plan.padded_seqs > LONG_FIRST_MAX_SEQS
            or not _coresident_can_run(args, chunk_variant, bv, loop_halves, intra_default, interpret)):
        return None
    if plan.is_host:
        tiles = (-(-np.asarray(plan.seq_lens, np.int64) // C)).tolist()
    elif plan.dominant is not None and plan.padded_seqs == 2:
        unit = max(plan.padded_tokens // (C * (DOMINANT_RATIO + 1)), 1)
        tiles = [unit, unit]
        tiles[plan.dominant] = DOMINANT_RATIO * unit
    else:
        return None
    return long_first(tiles + [0] * (plan.padded_seqs - len(tiles)), hv, dv // bv, coresident_sms or _sm_count())


def resolve_variant(args: PrefillArgs, variant: str = "auto", *, chunk_variant: str = "auto", bv: int = 64,
                    loop_halves: bool = False, intra_default: bool = True, coresident_seqs: int | None = None,
                    coresident_sms: int | None = None, interpret=None) -> tuple[str, tuple[int, ...] | None]:
    """The kernel route :func:`prefill_arrays` takes: (variant, the co-resident kernel's sequence order
    or None). A ``variant`` other than "auto" is returned as given; "auto" asks :func:`pick_variant`,
    then (``coresident_seqs`` not given) :func:`pick_long_first`. The keywords default to
    :func:`prefill_arrays`' own defaults, so a check script names the route a plain call takes."""
    if variant != "auto":
        return variant, None
    variant = pick_variant(args, chunk_variant, bv, loop_halves, intra_default, coresident_seqs, coresident_sms,
                           interpret)
    if variant == "two_kernels" and coresident_seqs is None:
        order = pick_long_first(args, chunk_variant, bv, loop_halves, intra_default, coresident_sms, interpret)
        if order is not None:
            return "coresident", order
    return variant, None


def resolve_coresident_p(coresident_p: bool | str, variant: str, one_prompt: bool, use_qk_l2norm: bool,
                         lean: bool = True) -> bool:
    """Whether the intra workers form P for the loop (:mod:`.coresident`'s ``p_from_workers``): only
    where the co-resident kernel runs; a bool as given; "auto" on for ``one_prompt`` (the plan, or
    every plan of its bucket, has at most one sequence with tokens, and no long-first order), without
    use_qk_l2norm and with ``lean``. Measured on that case only (whole prefill, the same bits, H/HV
    16/32): H200, 2026-12-07 (s29c) 0.815 vs 0.855 ms at 1x32768, 0.231 vs 0.254 at 1x8192; H100
    (s28a) 0.866 vs 0.861 and 0.240 vs 0.262. Untimed with use_qk_l2norm (the workers are 2 a CTA
    there already) and where later prompts wait for the workers (a long-first order, or
    ``coresident_seqs=1`` on a plan of more): P makes the workers slower."""
    if variant != "coresident":
        return False
    if coresident_p == "auto":
        return one_prompt and not use_qk_l2norm and lean
    return coresident_p


def check_loop_overlap(loop_overlap) -> None:
    """TypeError unless ``loop_overlap`` is a bool, "auto", "store" or "update"."""
    if not isinstance(loop_overlap, bool) and loop_overlap not in ("auto", "store", "update"):
        raise TypeError(f"loop_overlap must be a bool, 'auto', 'store' or 'update', got {loop_overlap!r}")


def resolve_loop_overlap(loop_overlap: bool | str, chunk_variant: str) -> bool:
    """``loop_overlap`` for the resolved ``chunk_variant``: "auto" is on for the narrow loop
    ("default"), whose overlap ptxas compiles without spills, and off for the wide one (its state
    warpgroups spill with it; slower on the H200, 2026-12-05). "store" (the wide loop's output
    store alone in the next tile's shadow, :func:`.chunk_loop_wide.chunk_loop_wide`) and "update"
    (the output stored in the state update's shadow) stay as they are for the wide loop and are
    "auto"'s choice for the narrow one."""
    if loop_overlap == "auto" or (loop_overlap in ("store", "update") and chunk_variant != "wide"):
        return chunk_variant == "default"
    return loop_overlap


def prefill_arrays(args: PrefillArgs, *, interpret=None, variant: str = "auto", bv: int = 64,
                   stages: int | None = None, regs=None, intra_tiles: int | None = None,
                   head_loop: str = "loop", intra_pad: int = SOLVE_PAD, intra_merge: str = "chain",
                   intra_columns: bool = True, intra_isolate: str = "boundary", intra_out_buffers: int = 2,
                   intra_solve: str = "smem", intra_warpgroups: int = 1, chunk_variant: str = "auto", loop_lean: bool = True, loop_bare: bool = True,
                   loop_direct_io: bool = False, loop_ctas: int | str | None = "auto",
                   loop_prefetch: bool | str = "auto", loop_overlap: bool | str = "auto",
                   loop_schedule: str = "table", qk_norms: str = "intra", loop_halves: bool = False,
                   loop_out_store: str = "tma", coresident_sms: int | None = None,
                   coresident_seqs: int | None = None, coresident_p: bool | str = "auto",
                   coresident_flag_lag: int = 0, coresident_p_together: bool = False):
    """The Mosaic GPU prefill on validated arguments -> (o, final or None).

    ``variant``: "auto" (the default: :func:`pick_variant`), "two_kernels" (the intra kernel, then
    the chunk loop), "coresident" (the two in one launch, the intra work on the SMs the narrow loop
    leaves idle: :mod:`.coresident`; ``coresident_seqs``: the most sequences with tokens a call of
    this compilation may have, default the plan's count or its bucket's largest; ``coresident_sms``:
    the SMs it sizes its workers for, default the device's; ``coresident_p``: the workers also form
    each tile's P for the loop's output warpgroup, :mod:`.coresident`'s ``p_from_workers``, where the
    co-resident kernel runs; "auto" (:func:`resolve_coresident_p`) on for one prompt without
    use_qk_l2norm; ``coresident_flag_lag`` / ``coresident_p_together``: :mod:`.coresident`'s
    ``flag_lag`` (0 or 1) / ``p_together``, both UNTIMED and off), "fused" (one
    kernel per head and sequence; benchmarks/mosaic_notes.md says why it is slower) or "fused_wide"
    (one kernel, the wide chunk loop whose prep warpgroup also does the intra kernel's work,
    :func:`chunk_loop_wide.chunk_loop_wide`'s ``gates``; V in {64, 128}; one CTA per item;
    use_qk_l2norm normalizes q and k in XLA first; H100, 2026-12-06: the default's bits, 0.996 vs
    0.589 ms at 4x8192 and 1.198 vs 0.873 at 128x256, its spills as ptxas predicted).

    two_kernels only: ``intra_tiles`` / ``head_loop`` / ``intra_pad`` / ``intra_merge`` /
    ``intra_columns`` / ``intra_isolate`` are the intra kernel's ``tiles_per_cta`` / ``head_loop``
    / ``solve_pad`` / ``merge_variant`` / ``solve_columns`` / ``isolate`` (:func:`intra.intra`;
    pads 0 and 8 are what ran on the H200); ``intra_out_buffers``: its ``out_buffers`` (2, the default,
    measured 3-7% faster alone than 1 on the H200, 2026-12-04); ``intra_solve``: its ``solve``,
    "smem" (the default) or "warp" (the diagonal blocks in registers by shuffles: session 15; on an
    H100 in session 16 the same bits, within 1%: :data:`.intra.SOLVES`); ``intra_warpgroups``: its
    ``warpgroups`` (1, or 3 with "warp": three per CTA under 168 registers, three per SM; 4%
    slower on the H100: :data:`.intra.WARPGROUPS`).
    ``chunk_variant``: "auto" (the default: :func:`pick_chunk_variant`), "default"
    (:func:`chunk_loop.chunk_loop`, one CTA per 64 V columns, ``bv``) or "wide"
    (:func:`chunk_loop_wide.chunk_loop_wide`, one CTA per sequence and v head: a prep warpgroup and
    a state warpgroup per 64 V columns; V in {64, 128}; ``regs`` = (prep, state) registers;
    ``loop_lean`` / ``loop_bare``: the chunk loop's (either one's) ``lean`` / ``bare``, both on by
    default since the H200 call g2/g3 of 2026-12-04 s5: together 0.665 vs 0.684 ms at 4x8192, 1.066
    vs 1.111 at 1x32768 and 1.001 vs 1.031 at HV = 48 (these two with the since-removed bare intra
    kernel too), within 1% elsewhere; False is the fallback if a
    change ever makes ``bare``'s explicit ordering suspect); ``loop_direct_io``: the chunk loop's
    ``direct_io`` (UNTIMED, off: the initial / final state between global memory and registers
    without the SMEM staging, for short sequences; H200 2026-12-05: the same bits, 0.905 vs 0.887
    ms at 128x256, 1.017 vs 1.021 on the serving mix, so off); ``loop_ctas``: the wide loop's
    persistent grid of that many CTAs walking the (sequence, v head) items
    (:func:`chunk_loop_wide.chunk_loop_wide`'s ``ctas``; the default loop ignores it), None for
    one CTA per item, "auto" (the default) :func:`pick_loop_ctas`; ``loop_prefetch``: on that grid,
    each item's initial state prefetched into L2 ``stages`` tiles ahead (True) or loaded into each
    state warpgroup's own SMEM staging an item ahead ("smem", 2 ring stages)
    (:func:`chunk_loop_wide.chunk_loop_wide`'s ``prefetch_h0``); "auto" (the default):
    :func:`pick_loop_prefetch`; ``loop_overlap``: the work that is
    off the state chain (the output store, exponentials, the state's decay, the narrow loop's
    publications) done while the chain's products run (either loop's ``overlap``); "auto" (the
    default) turns it on for the narrow loop only (:func:`resolve_loop_overlap`); "store" (slower, 3%
    on the wide loop alone at 4x8192, H100 s17): on the wide loop only the output store's fence and
    TMA issue, in the next tile's shadow; "update" (within noise, 0-2% on the wide loop alone on an
    H100, s21): on the wide loop the output stored while the tile's state update computes, and the
    exponentials in the products' shadows;
    ``loop_out_store``: how the wide loop's whole output tiles leave (:func:`chunk_loop_wide.chunk_loop_wide`'s
    ``out_store``): "tma" (the default), "registers" or "warp" (both the same bits and slower on an H100, s22);
    the last two with ``loop_overlap`` False or "update"; the narrow loop ignores it (its whole tiles from
    registers, session 26, measured 1.02-1.08 vs 0.78-0.80 ms alone at 1x32768 on an H100; commit 8bf6841);
    ``loop_schedule`` (the persistent grid's item lookups): "table" (the default,
    :func:`chunk_loop_wide.chunk_loop_wide`'s ``schedule``) or "order" (the ranking, session 8).
    ``loop_halves`` (off): with a plan traced under jit whose bucket holds sequence counts
    that want different loops (at HV = 32 the bucket of 3..8: 5 and 6 sequences the narrow
    loop, the others the wide one), the wide loop compiled with a runtime mode (:func:`halves_table`) picks
    per batch on the device instead of one loop for all. Its narrow mode does not keep the narrow
    loop's pace (H100, 2026-12-05, session 14, call h1, jitted, ms: 1x32768 1.232 vs 0.999, 1x8192
    0.351 vs 0.293; its wide mode at 4x8192 0.601 vs the wide loop's 0.595).
    ``qk_norms`` (use_qk_l2norm): where ``ln rstd`` of q's and k's rows is computed: "intra" (the
    default: in the intra kernel, from the diagonals of ``Q Q^T`` and ``K K^T``) or "xla" (two
    reductions before the kernels, :func:`prepare`; 0.075 ms of 0.681 at 4x8192 in an H200 trace of
    2026-12-05). H200, 2026-12-05 (session 13, call n1, whole prefill with use_qk_l2norm, median of
    interleaved rounds): 0.642 vs 0.699 ms at 4x8192, 0.818 vs 0.867 at 128x256 (no l2norm: 0.589 /
    0.778); its float64 cases compiled there pass.
    The three defaults are from the H200 calls k1 / k2 / m2 of 2026-12-05 (session 12): the wide
    loop alone at 128x256 on the persistent grid 0.591 ms with the table and the prefetch vs 0.607
    with neither (the same bits); ``loop_overlap`` loses on the wide loop (0.674 vs 0.591 ms at
    4x8192, ptxas spills 68 B) and wins or ties on the narrow one (1.004 vs 1.042 at 1x32768, 0.939
    vs 0.948 at 4x8192 with HV = 48, 0.365 vs 0.369 at HV = 16; 1.054 vs 1.047 at 1x32760)."""
    if variant != "auto" and variant not in VARIANTS:
        raise ValueError(f"variant must be 'auto' or one of {VARIANTS}, got {variant!r}")
    check_intra_options(head_loop, intra_merge, intra_pad, intra_columns, intra_isolate, intra_out_buffers,
                        intra_solve, intra_warpgroups,
                        names=("intra_merge", "intra_pad", "intra_columns", "intra_isolate", "intra_out_buffers",
                               "intra_solve", "intra_warpgroups"))
    if not (isinstance(loop_prefetch, bool) or loop_prefetch in ("smem", "auto")):
        raise TypeError(f"loop_prefetch must be a bool, 'smem' or 'auto', got {loop_prefetch!r}")
    for name, val in (("loop_lean", loop_lean), ("loop_bare", loop_bare), ("loop_direct_io", loop_direct_io),
                      ("loop_halves", loop_halves), ("coresident_p_together", coresident_p_together)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool, got {val!r}")
    if not isinstance(coresident_p, bool) and coresident_p != "auto":
        raise TypeError(f"coresident_p must be a bool or 'auto', got {coresident_p!r}")
    check_flag_lag(coresident_flag_lag, "coresident_flag_lag")
    check_loop_overlap(loop_overlap)
    check_out_store(loop_out_store, False, names=("loop_out_store", "loop_overlap"))
    if loop_schedule not in SCHEDULES:
        raise ValueError(f"loop_schedule must be one of {SCHEDULES}, got {loop_schedule!r}")
    if qk_norms not in QK_NORMS:
        raise ValueError(f"qk_norms must be one of {QK_NORMS}, got {qk_norms!r}")
    if loop_ctas not in (None, "auto") and (isinstance(loop_ctas, bool) or not isinstance(loop_ctas, int)
                                            or loop_ctas < 1):
        raise ValueError(f"loop_ctas must be a positive int, None or 'auto', got {loop_ctas!r}")
    for name, val, least in (("coresident_sms", coresident_sms, 2), ("coresident_seqs", coresident_seqs, 1)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < least):
            raise ValueError(f"{name} must be an int >= {least} or None, got {val!r}")
    halves = None
    given = locals()
    variant, order = resolve_variant(args, variant, chunk_variant=chunk_variant, bv=bv, loop_halves=loop_halves,
                                     intra_default=tuple(given[n] for n in INTRA_OPTIONS) == intra_defaults(),
                                     coresident_seqs=coresident_seqs, coresident_sms=coresident_sms,
                                     interpret=interpret)
    if variant == "coresident":  # the narrow loop beside the intra workers (its own intra options: solve "warp")
        if chunk_variant not in ("auto", "default") or loop_halves:
            raise ValueError(f"variant 'coresident' runs the narrow chunk loop: no chunk_variant other than "
                             f"'default', no loop_halves; got {chunk_variant!r}")
        chunk_variant = "default"
        rng = _seq_range(args.plan)  # the most sequences with tokens this compilation may see
        n_max = rng[1] if rng is not None else None
        if coresident_seqs is not None and n_max is not None and _counted_seqs(args.plan) is not None \
                and n_max > coresident_seqs:
            raise ValueError(f"coresident_seqs={coresident_seqs} but the plan has {n_max} sequences with tokens")
        coresident_seqs = coresident_seqs if coresident_seqs is not None else n_max
        one_prompt = n_max is not None and n_max <= 1 and order is None
        if order is not None:  # workers sized for the longest sequence, whose CTAs come first
            coresident_seqs = 1
    else:
        coresident_seqs = order = None
        one_prompt = False
    if variant in FUSED_WIDE:  # the wide loop (fused_wide: on its grid of one CTA per item)
        per_item = variant == "fused_wide"
        if chunk_variant not in ("auto", "wide") or loop_halves or (per_item and loop_ctas not in (None, "auto")):
            raise ValueError(f"variant {variant!r} is the wide chunk loop{' on one CTA per item' * per_item}: "
                             f"no chunk_variant other than 'wide'{', loop_ctas' * per_item} or loop_halves")
        chunk_variant = "wide"
        if per_item:
            loop_ctas = None
    if loop_halves and chunk_variant == "auto":
        halves = halves_table(args.plan, args.dims[1], args.dims[3])
    chunk_variant = "wide" if halves else resolve_chunk_variant(chunk_variant, args.plan, args.dims[1], args.dims[3])
    loop_overlap = resolve_loop_overlap(loop_overlap, chunk_variant)
    if chunk_variant == "wide":  # before anything traces
        check_out_store(loop_out_store, loop_overlap, names=("loop_out_store", "loop_overlap"))
    if halves:  # one CTA (pair) per item
        loop_ctas = None
    elif loop_ctas == "auto":  # a traced plan: persistent where every count of its bucket wants it
        rng = _seq_range(args.plan)  # (one CTA per item otherwise, what a host plan of 4 x 32 items runs)
        loop_ctas = pick_loop_ctas(None if rng is None else max(rng[0], 1), args.dims[1], chunk_variant,
                                   _sm_count())
    if loop_prefetch == "auto":
        fused = variant in FUSED_WIDE  # (use_qk_l2norm's row scales: in the loop only without the fusion)
        fits = h0_staging_fits(args.dims[2], args.dims[3], args.q.dtype.itemsize, args.q.dtype.itemsize,
                               l2=args.use_qk_l2norm and not fused, fused=fused,
                               slabs=variant == "fused_wide_mma")
        loop_prefetch = pick_loop_prefetch(args.plan, args.batch * args.seqlen, loop_ctas, fits)
    return run_core(core, args, interpret=interpret, variant=variant, bv=bv, stages=stages,
                    regs=regs, intra_tiles=intra_tiles, head_loop=head_loop, intra_pad=intra_pad,
                    intra_merge=intra_merge, intra_columns=intra_columns, intra_isolate=intra_isolate,
                    intra_out_buffers=intra_out_buffers, intra_solve=intra_solve,
                    intra_warpgroups=intra_warpgroups, chunk_variant=chunk_variant,
                    loop_lean=loop_lean, loop_bare=loop_bare, loop_direct_io=loop_direct_io,
                    loop_ctas=loop_ctas, loop_prefetch=loop_prefetch, loop_overlap=loop_overlap,
                    loop_schedule=loop_schedule, qk_norms=qk_norms, loop_halves=halves,
                    loop_out_store=loop_out_store, coresident_sms=coresident_sms,
                    coresident_seqs=coresident_seqs, coresident_p=resolve_coresident_p(
                        coresident_p, variant, one_prompt, args.use_qk_l2norm, loop_lean),
                    coresident_order=order, coresident_flag_lag=coresident_flag_lag,
                    coresident_p_together=coresident_p_together)
