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

from .planner import Plan, Split, plan as make_plan

__all__ = ["split_prefill", "piece_tables"]


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


def _ops(xp):
    if xp.__name__ == "torch":
        return (lambda a, ax: xp.cat(a, dim=ax)), (lambda a: xp.as_tensor(a))
    return (lambda a, ax: xp.concatenate(a, axis=ax)), (lambda a: xp.asarray(a))


def split_prefill(xp, run_pieces: Callable[..., tuple[Any, Any]], q, k, v, g, beta, *,
                  plan: Plan, split: Split, initial_state=None, scale: float,
                  use_qk_l2norm: bool, device_put: Callable[[np.ndarray], Any] | None = None):
    """Prefill of a packed batch (B = 1) through ``split``'s pieces, exact.

    ``run_pieces(q, k, v_aug, g, beta, plan=piece_plan, initial_state=h0_aug, scale=...,
    use_qk_l2norm=...)`` must return (o_aug [1, T, HV, V + K], final_aug fp32 [P, HV, K, V + K]).
    Returns (o [1, T, HV, V] in v's dtype, final fp32 [N, HV, K, V]).
    """
    cat, asarray = _ops(xp)
    put = device_put or asarray
    n = plan.num_seqs
    _, t, hv, dv = v.shape
    dk = k.shape[-1]
    p = split.num_pieces
    f32 = xp.float32

    piece_plan = make_plan(split.piece_cu_seqlens, plan.chunk_size, num_tokens=t)
    v_aug = cat([v, xp.zeros((1, t, hv, dk), dtype=v.dtype)], -1)
    eye = put(np.broadcast_to(np.eye(dk, dtype=np.float32), (p, hv, dk, dk)).copy())
    h0_aug = cat([xp.zeros((p, hv, dk, dv), dtype=f32), eye], -1)
    o_aug, f_aug = run_pieces(q, k, v_aug, g, beta, plan=piece_plan, initial_state=h0_aug,
                              scale=scale, use_qk_l2norm=use_qk_l2norm)
    e_map, m_map = f_aug[..., :dv], f_aug[..., dv:]

    by_step, token_idx, token_ok = piece_tables(split, n)
    if initial_state is None:
        s = xp.zeros((n, hv, dk, dv), dtype=f32)
    else:
        s = initial_state[:n].to(f32) if xp.__name__ == "torch" else initial_state[:n].astype(f32)
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
    corr = xp.einsum("plhk,phkv->plhv", om[tok].to(f32) if xp.__name__ == "torch"
                     else om[tok].astype(f32), start_of_piece)  # [P, L, HV, V]
    ok = put(token_ok)[:, :, None, None]
    corr = xp.where(ok, corr, 0)
    flat = corr.reshape(-1, hv, dv)
    ids = put(token_idx.reshape(-1))
    if xp.__name__ == "torch":
        add = xp.zeros((t, hv, dv), dtype=f32, device=flat.device).index_add_(0, ids, flat)
        o = (o0.to(f32) + add).to(v.dtype)
    elif xp.__name__ == "numpy":
        add = np.zeros((t, hv, dv), np.float32)
        np.add.at(add, ids, flat)
        o = (o0.astype(np.float32) + add).astype(v.dtype)
    else:
        add = xp.zeros((t, hv, dv), dtype=f32).at[ids].add(flat)
        o = (o0.astype(f32) + add).astype(v.dtype)
    return o[None], s
