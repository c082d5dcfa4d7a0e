"""Multi-device prefill on JAX's own sharding: heads across devices, and tokens across devices.

Head parallelism (``head_axis``): q/k heads and v heads are split into contiguous blocks, so each
device keeps whole GVA groups (v head j reads q/k head j // G), and each shard runs the
single-device prefill with no communication.

Sequence parallelism (``seq_axis``): the packed tokens are split into equal slices, one per
device. Each device runs the pieces of sequences that fall in its slice from the state [0 | I]
with values [v | 0] (gdn/split.py: one pass yields the piece's end state E, its state map M and the
output's dependence on the start state), the (M, E) of all pieces are all-gathered, every device
runs the same small scan over pieces (S <- M S + E per sequence, in order) and corrects its own
outputs: o = o0 + oM @ S_start. Exact for any gates.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..planner import SENTINEL, Plan, plan as make_plan

__all__ = ["run_sharded", "seq_slices"]


def _axis_size(mesh, axis: str, name: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"{name}={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(mesh.shape[axis])


def _repad(p: Plan, n_pad: int, nt_pad: int) -> Plan:
    """The same plan with more padding rows (so every device's plan has one shape)."""
    def grow(a, rows, fill):
        out = np.full((rows,) + a.shape[1:], fill, np.int32)
        out[: a.shape[0]] = a
        return out

    n, nt = p.num_seqs, p.num_chunks
    cu = grow(p.cu_seqlens, n_pad + 1, p.cu_seqlens[n])
    co = grow(p.chunk_offsets, n_pad + 1, nt)
    ci = grow(p.chunk_indices, nt_pad, SENTINEL)
    return dataclasses.replace(p, cu_seqlens=cu, chunk_indices=ci, chunk_offsets=co,
                               padded_seqs=n_pad, padded_chunks=nt_pad, _cache={})


@dataclasses.dataclass(frozen=True)
class SeqSlices:
    """Host tables of a sequence-parallel run over ``n`` devices of ``width`` tokens each."""

    local_plans: list  # per device: Plan of its pieces, all with the same padded sizes
    by_step: np.ndarray  # [max_pieces, N] global piece slot (device * P_loc + j) or -1
    start_sel: np.ndarray  # [n, P_loc, 2] (step, seq) of each local piece (0, 0 for padding)
    token_idx: np.ndarray  # [n, P_loc, L] local token ids of each local piece
    token_ok: np.ndarray  # [n, P_loc, L]
    piece_slots: int  # P_loc


def seq_slices(cu_seqlens: np.ndarray, num_tokens: int, n: int, chunk_size: int = 64) -> SeqSlices:
    """Cut a packed batch into ``n`` equal token slices; pieces = sequences clipped to slices."""
    cu = np.asarray(cu_seqlens, np.int64)
    width = num_tokens // n
    bounds = np.arange(n + 1) * width
    # piece boundaries: every sequence boundary and every slice boundary inside the real tokens
    cuts = np.union1d(cu, bounds[(bounds > 0) & (bounds < cu[-1])])
    cuts = cuts[cuts <= cu[-1]]
    lens = np.diff(cuts)
    keep = lens > 0
    starts, ends = cuts[:-1][keep], cuts[1:][keep]
    seq = np.searchsorted(cu, starts, side="right") - 1
    dev = starts // width
    # position of each piece inside its sequence
    first = np.r_[True, seq[1:] != seq[:-1]]
    grp = np.cumsum(first) - 1
    index = np.arange(starts.size) - np.flatnonzero(first)[grp]
    p_loc = max(1, int(np.bincount(dev, minlength=n).max()) if starts.size else 1)
    local_plans, start_sel = [], np.zeros((n, p_loc, 2), np.int64)
    slot = np.zeros(starts.size, np.int64)
    lmax = max(1, int((ends - starts).max()) if starts.size else 1)
    token_idx = np.zeros((n, p_loc, lmax), np.int64)
    token_ok = np.zeros((n, p_loc, lmax), bool)
    for d in range(n):  # n devices: a short host loop
        mine = np.flatnonzero(dev == d)
        loc_cu = np.r_[0, np.cumsum(ends[mine] - starts[mine])]
        local_plans.append(make_plan(loc_cu, chunk_size, num_tokens=width))
        slot[mine] = d * p_loc + np.arange(mine.size)
        start_sel[d, : mine.size, 0] = index[mine]
        start_sel[d, : mine.size, 1] = seq[mine]
        offs = np.arange(lmax)[None, :]
        sizes = (ends[mine] - starts[mine])[:, None]
        token_ok[d, : mine.size] = offs < sizes
        token_idx[d, : mine.size] = np.where(offs < sizes, (starts[mine] - d * width)[:, None] + offs, 0)
    n_seq = cu.size - 1
    max_pieces = int(index.max()) + 1 if starts.size else 1
    by_step = np.full((max_pieces, n_seq), -1, np.int64)
    by_step[index, seq] = slot
    n_pad = max(p.padded_seqs for p in local_plans)
    nt_pad = max(p.padded_chunks for p in local_plans)
    local_plans = [_repad(p, n_pad, nt_pad) for p in local_plans]
    return SeqSlices(local_plans, by_step, start_sel, token_idx, token_ok, p_loc)


def _local_prefill(q, k, v, g, beta, plan, h0, scale, l2, impl):
    from . import run
    from ..api import validate

    _, args = validate(q, k, v, g, beta, plan=plan, initial_state=h0, scale=scale,
                       use_qk_l2norm=l2, backend="jax", impl=impl)
    return run(args)


def run_sharded(args, mesh, head_axis: str | None, seq_axis: str | None):
    """Prefill of validated ``args`` over ``mesh``; see the module docstring."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    h, hv, dk, dv = args.dims
    if head_axis is None and seq_axis is None:
        raise ValueError("mesh given without head_axis or seq_axis: name the axis to shard over")
    if head_axis is not None:
        nh = _axis_size(mesh, head_axis, "head_axis")
        if h % nh or hv % nh:
            raise ValueError(f"head_axis {head_axis!r} has {nh} devices, which must divide both the "
                             f"q/k heads H = {h} and the v heads HV = {hv}")
    if seq_axis is not None:
        if args.batch != 1:
            raise ValueError("seq_axis shards packed tokens: q must be [1, T, H, K] (pass cu_seqlens)")
        if not args.plan.is_host:
            raise ValueError("seq_axis needs the host plan (gdn.plan(...)), not a traced or device plan")
    hs = head_axis  # None: replicated along heads
    p = args.plan
    n = p.num_seqs if p.num_seqs is not None else p.padded_seqs
    h0 = args.initial_state
    if h0 is None:
        h0 = jnp.zeros((n, hv, dk, dv), jnp.float32)
    h0 = jnp.asarray(h0, jnp.float32)[:n]
    q, k, v, g, beta = (jnp.asarray(a) for a in (args.q, args.k, args.v, args.g, args.beta))
    if args.batch != 1:  # fixed-length batch: packed view
        q, k, v, g, beta = (a.reshape(1, args.batch * args.seqlen, *a.shape[2:])
                            for a in (q, k, v, g, beta))
    local = functools.partial(_local_prefill, scale=args.scale, l2=args.use_qk_l2norm,
                              impl=args.impl)

    if seq_axis is None:
        host_plan = p

        def body(q, k, v, g, beta, h0):
            o, f = local(q, k, v, g, beta, host_plan, h0)
            return o, f[: h0.shape[0]]

        spec4, spec3 = P(None, None, hs, None), P(None, None, hs)
        fn = jax.shard_map(body, mesh=mesh, in_specs=(spec4, spec4, spec4, spec3, spec3,
                                                      P(None, hs)),
                           out_specs=(spec4, P(None, hs)), check_vma=False)
        o, f = fn(q, k, v, g, beta, h0)
    else:
        o, f = _seq_parallel(q, k, v, g, beta, h0, p, mesh, seq_axis, hs, local)
    o = o.reshape(args.batch, args.seqlen, hv, dv)
    return o, (f if args.output_final_state else None)


def _seq_parallel(q, k, v, g, beta, h0, p, mesh, seq_axis, hs, local):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    n = _axis_size(mesh, seq_axis, "seq_axis")
    t = q.shape[1]
    if t % n:
        raise ValueError(f"seq_axis {seq_axis!r} has {n} devices, which must divide the token count "
                         f"T = {t} (pad the batch, e.g. gdn.plan(cu, num_tokens=...))")
    hv, dk, dv = v.shape[2], k.shape[3], v.shape[3]
    sl = seq_slices(np.asarray(p.cu_seqlens[: p.num_seqs + 1]), t, n, p.chunk_size)
    leaves0, treedef = jax.tree_util.tree_flatten(sl.local_plans[0])
    stacked = [np.stack([jax.tree_util.tree_leaves(lp)[i] for lp in sl.local_plans])
               for i in range(len(leaves0))]
    p_loc = sl.piece_slots
    n_loc_pad = sl.local_plans[0].padded_seqs
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (n_loc_pad, hv, dk, dk))
    by_step = jnp.asarray(sl.by_step)

    def body(q, k, v, g, beta, h0, start_sel, token_idx, token_ok, *plan_leaves):
        lp = jax.tree_util.tree_unflatten(treedef, [a[0] for a in plan_leaves])
        hv_loc = v.shape[2]
        v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (dk,), v.dtype)], -1)
        h0_aug = jnp.concatenate([jnp.zeros((n_loc_pad, hv_loc, dk, dv), jnp.float32),
                                  eye[:, :hv_loc]], -1)
        o_aug, f_aug = local(q, k, v_aug, g, beta, lp, h0_aug)
        maps = jax.lax.all_gather(f_aug[:p_loc], seq_axis, tiled=True)  # [n * p_loc, HV, K, V+K]
        e_map, m_map = maps[..., :dv], maps[..., dv:]
        s, starts = h0, []
        for i in range(by_step.shape[0]):  # static: the most pieces of one sequence
            ids = by_step[i]
            starts.append(s)
            idx = jnp.maximum(ids, 0)
            s_new = jnp.einsum("nhij,nhjv->nhiv", m_map[idx], s) + e_map[idx]
            s = jnp.where((ids >= 0)[:, None, None, None], s_new, s)
        sel = start_sel[0]
        s_start = jnp.stack(starts)[sel[:, 0], sel[:, 1]]  # [p_loc, HV, K, V]
        tok, ok = token_idx[0], token_ok[0]
        om = o_aug[0, :, :, dv:][tok].astype(jnp.float32)  # [p_loc, L, HV, K]
        corr = jnp.einsum("plhk,phkv->plhv", om, s_start)
        corr = jnp.where(ok[:, :, None, None], corr, 0.0).reshape(-1, hv_loc, dv)
        add = jnp.zeros((q.shape[1], hv_loc, dv), jnp.float32).at[tok.reshape(-1)].add(corr)
        o = (o_aug[0, :, :, :dv].astype(jnp.float32) + add).astype(v.dtype)
        return o[None], s

    spec4, spec3 = P(None, seq_axis, hs, None), P(None, seq_axis, hs)
    dev_spec = P(seq_axis)
    in_specs = (spec4, spec4, spec4, spec3, spec3, P(None, hs), dev_spec, dev_spec, dev_spec) + \
        tuple(dev_spec for _ in stacked)
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                       out_specs=(spec4, P(None, hs)), check_vma=False)
    return fn(q, k, v, g, beta, h0, jnp.asarray(sl.start_sel), jnp.asarray(sl.token_idx),
              jnp.asarray(sl.token_ok), *[jnp.asarray(a) for a in stacked])
