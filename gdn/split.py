"""Exact sequence split: long sequences run as independent pieces, then one small scan.

The gated delta rule is linear in (state, values) jointly, and every column of the state evolves
on its own (w and the decays depend only on k, g, beta). So a piece started from the state
``[0 | I]`` with values ``[v | 0]`` (K extra value columns) returns, in one pass of ANY prefill
implementation:

  final columns [:V]  E      the piece's end state from a zero start
  final columns [V:]  M      its state map: S_end = M @ S_start + E          (K x K per head)
  output columns [:V]  o0    the output from a zero start
  output columns [V:]  oM    scale * q_t^T M_{<=t}: the output's dependence on S_start

A scan over each sequence's pieces gives the true start states (S <- M S + E), then
``o = o0 + oM @ S_start``. Exact for any gates: no decay threshold, no warm-up approximation.
The policy that decides when and how to cut is :func:`gdn.planner.split_policy` (host, pure).

Backend-neutral: ``xp`` is numpy, jax.numpy or torch; ``run_pieces`` is the backend's prefill.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .planner import Plan, Split, plan as make_plan, seq_bucket_range

__all__ = ["split_prefill", "piece_tables", "two_pass_tables", "split_tables", "scan_columns"]


def piece_tables(split: Split, num_seqs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host index tables for the combine step.

    Returns (by_step [max_pieces, N] piece id or -1, token_idx [P, L] token ids of each piece
    padded with the piece's first token, token_ok [P, L] bool), L = the longest piece.
    """
    p = split.num_pieces
    by_step = np.full((max(split.max_pieces, 1), num_seqs), -1, np.int64)
    by_step[split.piece_index, split.piece_seq] = np.arange(p)
    pcu = split.piece_cu_seqlens.astype(np.int64)
    sizes = np.diff(pcu)
    width = int(sizes.max()) if p else 1
    offs = np.arange(width)[None, :]
    token_ok = offs < sizes[:, None]
    token_idx = np.where(token_ok, pcu[:-1, None] + offs, pcu[:-1, None])
    return by_step, token_idx, token_ok


def two_pass_tables(split: Split, seqs_pad: int, pieces_pad: int) -> dict[str, np.ndarray]:
    """Host int32 tables of a two-pass split (pass 1: every piece's [E | M]; a scan; pass 2: the
    pieces from their true starts), padded to static shapes: ``seqs_pad`` sequence rows (the
    caller's plan's N_pad) and ``pieces_pad`` piece rows (the piece plan's N_pad).

    ``mode`` [pieces_pad]: 0 the piece's map is not needed (the last piece of its sequence, and
    padding), 1 a first piece (E from the sequence's initial state, M = 0), 2 a later piece (E from
    0, M from I). ``h0_row`` [pieces_pad]: the sequence whose initial state starts the piece (a
    first piece), or -1 (zero, or the scan's). ``by_step`` [S, R]: column r lists the pieces of the
    r-th sequence of more than one piece in order, -1 past its last; S and R are those counts
    rounded up to powers of two (fewer compilations; sequences of one piece need no scan).
    ``last_piece`` [seqs_pad]: each sequence's last piece or -1 (empty sequence).
    :func:`split_tables` computes them (here with NumPy, from the split's ``cu_seqlens``).
    """
    p, n = split.num_pieces, int(np.max(split.piece_seq, initial=-1)) + 1
    if pieces_pad < p or seqs_pad < n:
        raise ValueError(f"tables of {p} pieces of {n} sequences do not fit {pieces_pad} / {seqs_pad} rows")
    if split.cu_seqlens is None:
        raise ValueError("two_pass_tables needs a Split from gdn.planner.split_pieces (it keeps cu_seqlens)")
    cu = np.asarray(split.cu_seqlens, np.int64)
    cu = np.concatenate([cu, np.full(seqs_pad + 1 - cu.size, cu[-1], np.int64)])
    multi = int(np.count_nonzero(np.bincount(split.piece_seq, minlength=1) > 1))
    tb = split_tables(np, cu, split.piece_chunks, chunk_size=split.chunk_size, pieces_pad=pieces_pad,
                      steps=pow2_at_least(split.max_pieces), cols=pow2_at_least(multi))
    del tb["piece_cu_seqlens"]
    return tb


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): the tables' step and column counts (fewer
    compilations; the scan kernels' block loads need powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def split_tables(xp, cu, piece_chunks: int, *, chunk_size: int, pieces_pad: int, steps: int,
                 cols: int) -> dict[str, Any]:
    """The pieces of :func:`gdn.planner.split_pieces` and the tables of :func:`two_pass_tables`
    from the sequences' ``cu`` [N_pad + 1] (padded: empty sequences repeat the last offset), by
    gathers only, so that ``xp`` = jax.numpy computes them from a plan traced under jit (nothing
    read back to the host) and ``xp`` = numpy on the host. Static: ``piece_chunks``, the row
    counts ``pieces_pad`` (>= the pieces), ``steps`` (>= the most pieces of one sequence) and
    ``cols`` (>= the sequences of more than one piece); what does not fit is dropped, so the
    caller's bounds must hold. Returns int32 ``piece_cu_seqlens`` [pieces_pad + 1] (padding pieces
    empty at the end), ``mode``, ``h0_row``, ``by_step`` [steps, cols] and ``last_piece``."""
    i32 = xp.int32
    cu = xp.asarray(cu).astype(i32)
    n_pad = cu.shape[0] - 1
    step = piece_chunks * chunk_size
    npieces = (cu[1:] - cu[:-1] + step - 1) // step
    first = xp.concatenate([xp.zeros(1, i32), _inclusive_sum(xp, npieces).astype(i32)])
    j = xp.arange(pieces_pad, dtype=i32)
    valid = j < first[-1]
    seq = xp.minimum(_count_le(xp, first[1:], j), n_pad - 1).astype(i32)
    idx = j - first[seq]
    last = valid & (idx == npieces[seq] - 1)
    starts = xp.where(valid, cu[seq] + idx * step, cu[-1])
    multi = _inclusive_sum(xp, (npieces > 1).astype(i32))
    r = xp.arange(cols, dtype=i32)
    col_seq = xp.minimum(_count_le(xp, multi, r), n_pad - 1).astype(i32)
    s = xp.arange(steps, dtype=i32)[:, None]
    by_step = xp.where((r < multi[-1])[None, :] & (s < npieces[col_seq][None, :]),
                       first[col_seq][None, :] + s, -1)
    return dict(piece_cu_seqlens=xp.concatenate([starts, cu[-1:]]).astype(i32),
                mode=xp.where(valid & ~last, xp.where(idx == 0, 1, 2), 0).astype(i32),
                h0_row=xp.where(valid & (idx == 0), seq, -1).astype(i32),
                by_step=by_step.astype(i32),
                last_piece=xp.where(npieces > 0, first[1:] - 1, -1).astype(i32))


def _inclusive_sum(xp, x):
    """``cumsum(x)`` of a short 1-D array; on the device as one masked row sum ([n, n], one fused
    kernel), where XLA's cumsum and searchsorted were separate small kernels and while loops (~25
    kernels for the traced tables; H100 trace of 2026-12-06: 52 vs 19 us of glue, jitted vs host)."""
    if xp is np:
        return np.cumsum(x)
    idx = xp.arange(x.shape[0])
    return xp.sum(xp.where(idx[None, :] <= idx[:, None], x[None, :], 0), axis=1)


def _count_le(xp, a, v):
    """``searchsorted(a, v, side="right")`` of a sorted short ``a``: how many entries of ``a`` are
    <= each of ``v`` (one fused compare and sum on the device, see :func:`_inclusive_sum`)."""
    if xp is np:
        return np.searchsorted(a, v, side="right")
    return xp.sum((a[None, :] <= v[:, None]).astype(xp.int32), axis=1)


def scan_columns(rows: int, hv: int, v: int, sms: int) -> int:
    """V columns per program of both backends' scan kernels (gdn/triton_backend/scan.py and
    gdn/jax_backend/pallas_triton/scan.py), before clamping to V's tile: 32, or 16 where 32 would
    leave fewer programs than SMs (each step is K x K x columns products; more, thinner walks
    finish sooner when the GPU has room)."""
    return 32 if rows * hv * -(-v // 32) >= sms else 16


def _ops(xp, like):
    """(concatenate, host->device array, zeros) for numpy, jax.numpy or torch (on like's device)."""
    if xp.__name__ == "torch":
        return ((lambda a, ax: xp.cat(a, dim=ax)),
                (lambda a: xp.as_tensor(np.array(a), device=like.device)),
                (lambda shape, dtype: xp.zeros(shape, dtype=dtype, device=like.device)))
    return ((lambda a, ax: xp.concatenate(a, axis=ax)), (lambda a: xp.asarray(a)),
            (lambda shape, dtype: xp.zeros(shape, dtype=dtype)))


def _astype(xp, x, dtype):
    return x.to(dtype) if xp.__name__ == "torch" else x.astype(dtype)


def split_prefill(xp, run_pieces: Callable[..., tuple[Any, Any]], q, k, v, g, beta, *,
                  plan: Plan, split: Split, initial_state=None, scale: float,
                  use_qk_l2norm: bool, device_put: Callable[[np.ndarray], Any] | None = None):
    """Prefill of a packed batch (B = 1) through ``split``'s pieces, exact.

    ``run_pieces(q, k, v_aug, g, beta, plan=piece_plan, initial_state=h0_aug, scale=...,
    use_qk_l2norm=...)`` must return (o_aug [1, T, HV, V + K], final_aug fp32 [P, HV, K, V + K]).
    Returns (o [1, T, HV, V] in v's dtype, final fp32 [N, HV, K, V]).
    """
    cat, asarray, zeros = _ops(xp, v)
    put = device_put or asarray
    n = plan.num_seqs
    _, t, hv, dv = v.shape
    dk = k.shape[-1]
    p = split.num_pieces
    f32 = xp.float32

    piece_plan = make_plan(split.piece_cu_seqlens, plan.chunk_size, num_tokens=t)
    v_aug = cat([v, zeros((1, t, hv, dk), v.dtype)], -1)
    eye = put(np.broadcast_to(np.eye(dk, dtype=np.float32), (p, hv, dk, dk)).copy())
    h0_aug = cat([zeros((p, hv, dk, dv), f32), eye], -1)
    kw = dict(plan=piece_plan, scale=scale, use_qk_l2norm=use_qk_l2norm)
    try:
        o_aug, f_aug = run_pieces(q, k, v_aug, g, beta, initial_state=h0_aug, **kw)
    except NotImplementedError:  # V + K value columns unsupported: the two halves in two calls
        o_e, f_e = run_pieces(q, k, v, g, beta, initial_state=h0_aug[..., :dv], **kw)
        o_m, f_m = run_pieces(q, k, v_aug[..., dv:], g, beta, initial_state=eye, **kw)
        o_aug, f_aug = cat([o_e, o_m], -1), cat([f_e, f_m], -1)
    e_map, m_map = f_aug[..., :dv], f_aug[..., dv:]

    by_step, token_idx, token_ok = piece_tables(split, n)
    s = zeros((n, hv, dk, dv), f32) if initial_state is None else _astype(xp, initial_state[:n], f32)
    starts = []
    for i in range(by_step.shape[0]):  # static: the most pieces of one sequence
        ids = by_step[i]
        starts.append(s)
        has = put(ids >= 0)[:, None, None, None]
        idx = put(np.maximum(ids, 0))
        s_new = xp.einsum("nhij,nhjv->nhiv", m_map[idx], s) + e_map[idx]
        s = xp.where(has, s_new, s)
    start_of_piece = xp.stack(starts)[put(split.piece_index), put(split.piece_seq)]  # [P, HV, K, V]

    tok = put(token_idx)
    o0 = o_aug[0, :, :, :dv]
    om = o_aug[0, :, :, dv:]
    corr = xp.einsum("plhk,phkv->plhv", _astype(xp, om[tok], f32), start_of_piece)  # [P, L, HV, V]
    ok = put(token_ok)[:, :, None, None]
    corr = xp.where(ok, corr, 0)
    flat = corr.reshape(-1, hv, dv)
    ids = put(token_idx.reshape(-1))
    if xp.__name__ == "torch":
        add = zeros((t, hv, dv), f32).index_add_(0, ids, flat)
    elif xp.__name__ == "numpy":
        add = np.zeros((t, hv, dv), np.float32)
        np.add.at(add, ids, flat)
    else:
        add = zeros((t, hv, dv), f32).at[ids].add(flat)
    o = _astype(xp, _astype(xp, o0, f32) + add, v.dtype)
    return o[None], s


def _on_mosaic_gpu(backend: str, args) -> bool:
    """Whether ``args`` run on the jax backend's mosaic_gpu path: asked for, or what impl=None
    picks here."""
    if backend != "jax" or args.impl not in (None, "mosaic_gpu"):
        return False
    from .jax_backend import mosaic_gpu as M

    return args.impl == "mosaic_gpu" or (M.status() is None and M.unsupported_reason(args) is None)


def auto_split_applies(backend: str, args) -> bool:
    """Whether ``gdn.prefill``'s default (``split=None``) asks the split's cost model: a packed batch
    with a host plan on the jax backend's mosaic_gpu path (asked for, or what impl=None picks
    here), whose two passes were timed on the H200 (3.5x / 2.4x the unsplit call at 1x32768 with
    4 / 8 v heads, the same bits, 2026-12-05) and whose model keeps every layout it did not win
    unsplit. Elsewhere the split stays opt-in (the triton two passes are untimed; the K-column
    correction is a correctness tool). The model is asked only where the unsplit narrow loop's CTAs
    (sequences x v heads x 64-column value tiles) are fewer than the SMs: it never splits
    otherwise, and for many sequences it costs milliseconds of host time (its list scheduling),
    which a prefill called eagerly layer after layer must not pay. With a plan traced under jit
    (mosaic_gpu only) the same test holds for the largest count of the plan's bucket, and
    :func:`run_split` asks the model about the batches of equal sequences the bucket holds."""
    if args.batch != 1:
        return False
    try:
        if not _on_mosaic_gpu(backend, args):
            return False
        from .jax_backend.mosaic_gpu._driver import _sm_count
    except ImportError:  # no jax here: loading the backend says so, with the reason
        return False
    _, hv, _, dv = args.dims
    if args.plan.is_host:
        seqs = int(np.count_nonzero(args.plan.seq_lens))
    else:  # traced under jit: every count of the plan's bucket must leave SMs idle
        rng = seq_bucket_range(args.plan.padded_seqs)
        if rng is None:
            return False
        seqs = rng[1]
    return seqs * hv * -(-dv // 64) < _sm_count()


def run_split(backend: str, args, piece_chunks: int | None = None):
    """``gdn.prefill`` of validated ``args`` through the exact split (packed batch, host plan).

    ``piece_chunks`` None: :func:`gdn.planner.split_policy` decides (unsplit when it does not
    pay). On the jax backend's mosaic_gpu impl (asked for, or what impl=None picks here) the
    pieces run in two passes on its kernels (:mod:`gdn.jax_backend.mosaic_gpu.split`) and ``None``
    asks that path's cost model. On the triton backend they run in two passes of its state kernel
    (:mod:`gdn.triton_backend.split`), ``None`` asking its state-pass model. Elsewhere (the jax
    backend's xla and pallas_triton impls) they run through the same backend and impl with K extra
    value columns (the implementation must accept V + K value columns, <= 256) and a correction
    of the output.
    """
    from .api import load_backend, validate
    from .planner import split_pieces, split_policy

    p = args.plan
    if args.batch != 1:
        raise ValueError("split needs a packed batch (cu_seqlens or plan, B == 1)")
    _, hv, dk, dv = args.dims
    if not p.is_host:  # a plan traced under jit: the mosaic_gpu two passes, pieces cut on the device
        if not _on_mosaic_gpu(backend, args):
            raise ValueError("split with a plan traced under jax.jit runs on jax's mosaic_gpu impl only; "
                             "elsewhere pass a host plan (gdn.plan(...) closed over, or call eagerly)")
        from .jax_backend import mosaic_gpu as M
        from .jax_backend.mosaic_gpu import split as S

        if piece_chunks is None:  # the model asked about every batch of equal sequences the bucket holds
            rng = seq_bucket_range(p.padded_seqs) or (1, p.padded_seqs)
            piece_chunks = S.pick_piece_chunks_for_bucket(args.q.shape[1], rng, hv, dk, dv)
        return S.run_split(args, piece_chunks) if piece_chunks else M.run(args)

    def pieces(chunks: int) -> Split:
        return split_pieces(np.asarray(p.cu_seqlens)[: p.num_seqs + 1], chunks, p.chunk_size)

    two_pass = None  # a path with its own two passes: (its cost model, its unsplit call, the split)
    if _on_mosaic_gpu(backend, args):
        from .jax_backend import mosaic_gpu as M
        from .jax_backend.mosaic_gpu import split as S

        two_pass = (S.pick_piece_chunks, M.run, S.run_split)
    elif backend == "triton" and args.impl in (None, "triton"):  # two passes of its state kernel
        from .triton_backend import split as S

        two_pass = (S.pick_piece_chunks, load_backend(backend).run, S.run_split)
    if two_pass is not None:
        pick, unsplit, split_run = two_pass
        if piece_chunks is None:
            piece_chunks = pick(p.seq_lens, hv, dk, dv)
        return split_run(args, pieces(piece_chunks)) if piece_chunks else unsplit(args)
    if piece_chunks is None:
        piece_chunks = split_policy(p.seq_lens, hv * -(-dv // 128), chunk_size=p.chunk_size)
    mod = load_backend(backend)
    if not piece_chunks:
        return mod.run(args)
    sp = pieces(piece_chunks)

    def run_pieces(q, k, v, g, beta, *, plan, initial_state, scale, use_qk_l2norm):
        _, a = validate(q, k, v, g, beta, plan=plan, initial_state=initial_state, scale=scale,
                        use_qk_l2norm=use_qk_l2norm, backend=backend, impl=args.impl)
        return mod.run(a)

    if backend == "triton":
        import torch as xp
    else:
        import jax.numpy as xp
    o, f = split_prefill(xp, run_pieces, args.q, args.k, args.v, args.g, args.beta, plan=p,
                         split=sp, initial_state=args.initial_state, scale=args.scale,
                         use_qk_l2norm=args.use_qk_l2norm)
    return o, (f if args.output_final_state else None)
