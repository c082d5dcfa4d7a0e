"""Multi-device prefill on JAX's own sharding: heads across devices, and tokens across devices.

Head parallelism (``head_axis``): q/k heads and v heads are split into contiguous blocks, so each
device keeps whole GVA groups (v head j reads q/k head j // G), and each shard runs the
single-device prefill with no communication.

Sequence parallelism (``seq_axis``): the packed tokens are split into equal slices, one per
device. Each device runs the pieces of sequences that fall in its slice from the state [0 | I]
with values [v | 0] (gdn/split.py: one pass yields the piece's end state E, its state map M and the
output's dependence on the start state); the pieces' start states come from one of two combine
steps (``seq_collective``), then each device corrects its own outputs: o = o0 + oM @ S_start.
Exact for any gates.

  all_gather  the (M, E) of all pieces are all-gathered and every device runs the same small
              scan over pieces (S <- M S + E per sequence, in order); the final states fall out
              of the scan, replicated.
  ppermute    a chain: only a device's first piece can continue a sequence from the left, so each
              device sends the end state of its last piece to its right neighbour, rounds = the
              most devices one sequence spans, minus 1 (a device holding one piece of a longer
              sequence passes the carry through: M carry + E). The final states come from the
              devices holding each sequence's last piece, replicated by one psum.

The all-gather moves every piece's [K, V + K] map per head to every device in one collective;
the chain moves one [K, V] state per head per round but its rounds are sequential.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..planner import SENTINEL, Plan, plan as make_plan

__all__ = ["run_sharded", "seq_slices", "combine_step", "SEQ_COLLECTIVES",
           "check_seq_collective"]

#: how sequence parallelism combines the pieces' state maps across devices (module docstring).
SEQ_COLLECTIVES = ("all_gather", "ppermute")


def check_seq_collective(seq_collective) -> str:
    """``seq_collective`` itself, or ValueError naming the argument."""
    if not isinstance(seq_collective, str) or seq_collective not in SEQ_COLLECTIVES:
        raise ValueError(f"seq_collective must be one of {list(SEQ_COLLECTIVES)}, got "
                         f"{seq_collective!r}")
    return seq_collective


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
    piece_count: np.ndarray  # [n] real pieces on each device
    last_seq: np.ndarray  # [n, P_loc] the sequence a piece ends (its last piece), else N


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
    piece_count = np.bincount(dev, minlength=n).astype(np.int64)
    last_seq = np.full((n, p_loc), n_seq, np.int64)
    last = np.r_[seq[1:] != seq[:-1], True] if starts.size else np.zeros(0, bool)
    last_seq[dev[last], slot[last] - dev[last] * p_loc] = seq[last]
    n_pad = max(p.padded_seqs for p in local_plans)
    nt_pad = max(p.padded_chunks for p in local_plans)
    local_plans = [_repad(p, n_pad, nt_pad) for p in local_plans]
    return SeqSlices(local_plans, by_step, start_sel, token_idx, token_ok, p_loc, piece_count,
                     last_seq)


def _local_prefill(q, k, v, g, beta, plan, h0, scale, l2, impl):
    from . import run
    from ..api import validate

    _, args = validate(q, k, v, g, beta, plan=plan, initial_state=h0, scale=scale,
                       use_qk_l2norm=l2, backend="jax", impl=impl)
    return run(args)


def run_sharded(args, mesh, head_axis: str | None, seq_axis: str | None,
                seq_collective: str = "all_gather"):
    """Prefill of validated ``args`` over ``mesh``; see the module docstring.

    seq_collective: "all_gather" or "ppermute", how ``seq_axis`` combines the pieces' maps.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    h, hv, dk, dv = args.dims
    check_seq_collective(seq_collective)
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
        o, f = _seq_parallel(q, k, v, g, beta, h0, p, mesh, seq_axis, hs, local,
                             seq_collective, args.output_final_state)
    o = o.reshape(args.batch, args.seqlen, hv, dv)
    return o, (f if args.output_final_state else None)


def _apply(m, s):
    """S -> M @ S per head: m [..., HV, K, K], s [..., HV, K, V] (fp32)."""
    import jax.numpy as jnp

    return jnp.einsum("...hij,...hjv->...hiv", m, s)


def _combine_all_gather(maps, h0, sel, *, by_step, axis):
    """Start states of this device's pieces from an all-gather of every piece's (M, E) and the
    same scan on every device (S <- M S + E per sequence, one step per piece index).

    maps: [P_loc, HV, K, V + K] this device's (E | M); h0: [N, HV, K, V]; sel: [P_loc, 2].
    Returns (s_start [P_loc, HV, K, V], final [N, HV, K, V]), fp32.
    """
    import jax
    import jax.numpy as jnp

    dv = h0.shape[-1]
    maps = jax.lax.all_gather(maps, axis, tiled=True)  # [n * P_loc, HV, K, V + K]
    e_map, m_map = maps[..., :dv], maps[..., dv:]
    s, starts = h0, []
    for i in range(by_step.shape[0]):  # static: the most pieces of one sequence
        ids = by_step[i]
        starts.append(s)
        idx = jnp.maximum(ids, 0)
        s = jnp.where((ids >= 0)[:, None, None, None], _apply(m_map[idx], s) + e_map[idx], s)
    return jnp.stack(starts)[sel[:, 0], sel[:, 1]], s


def _combine_ppermute(maps, h0, sel, count, last_seq, *, has_piece, axis, n, rounds, want_final):
    """Start states of this device's pieces from a chain of neighbour-to-neighbour sends.

    Only a device's first piece can continue a sequence from the left (every other piece starts
    at a sequence start, from h0); a device's last piece ends either a sequence that started here
    (its end state is known locally) or, when it is also the first piece, the crossing sequence
    (end = M S_in + E: the carry passes through). Each round every device sends that end state to
    its right neighbour; after ``rounds`` (the most devices one sequence spans, minus 1) every
    carry is exact. The final state of each sequence comes from the device holding its last
    piece: one psum (the other devices add zeros) replicates them along ``axis``.

    maps: [P_loc, HV, K, V + K]; h0: [N, HV, K, V]; sel: [P_loc, 2] (piece index, sequence);
    count: [] real pieces here; last_seq: [P_loc] the sequence a piece ends, N if none.
    Returns (s_start [P_loc, HV, K, V], final [N, HV, K, V] or None), fp32.
    """
    import jax
    import jax.numpy as jnp

    dv = h0.shape[-1]
    e_loc, m_loc = maps[..., :dv], maps[..., dv:]
    s0 = h0[sel[:, 1]]  # every piece from its sequence's initial state ...
    end0 = _apply(m_loc, s0) + e_loc  # ... exact for the pieces that start their sequence
    cont = sel[0, 0] > 0  # the first piece continues a sequence from the left (padding: index 0)
    through = cont & (count == 1)  # and it is the last piece too: the carry passes through
    fixed = end0[jnp.maximum(count - 1, 0)]  # end of a last piece that started here
    perm = [(i, i + 1) for i in range(n - 1)]
    carry = jnp.zeros_like(s0[0])  # device 0 receives nothing: zeros
    for _ in range(rounds):
        out = jnp.where(through, _apply(m_loc[0], carry) + e_loc[0], fixed)
        carry = jax.lax.ppermute(out, axis, perm)
    s_start = s0.at[0].set(jnp.where(cont, carry, s0[0]))
    if not want_final:
        return s_start, None
    end = end0.at[0].set(_apply(m_loc[0], s_start[0]) + e_loc[0])
    f = jnp.zeros(h0.shape, jnp.float32).at[last_seq].set(end, mode="drop")
    f = jax.lax.psum(f, axis)
    return s_start, jnp.where(has_piece[:, None, None, None], f, h0)  # empty sequence: h0


def _correct(o_aug, s_start, tok, ok, dv, dtype):
    """o = o0 + oM @ S_start on this device's tokens. o_aug: [1, T_loc, HV, V + K];
    s_start: [P_loc, HV, K, V]; tok, ok: [P_loc, L] local token ids and validity.
    Returns [1, T_loc, HV, V] in ``dtype``."""
    import jax.numpy as jnp

    t_loc, hv_loc = o_aug.shape[1], o_aug.shape[2]
    om = o_aug[0, :, :, dv:][tok].astype(jnp.float32)  # [P_loc, L, HV, K]
    corr = jnp.einsum("plhk,phkv->plhv", om, s_start)
    corr = jnp.where(ok[:, :, None, None], corr, 0.0).reshape(-1, hv_loc, dv)
    add = jnp.zeros((t_loc, hv_loc, dv), jnp.float32).at[tok.reshape(-1)].add(corr)
    return (o_aug[0, :, :, :dv].astype(jnp.float32) + add).astype(dtype)[None]


def combine_step(sl: SeqSlices, seq_axis: str, collective: str, want_final: bool = True):
    """(combine, tables) of a sequence-parallel run (also timed alone by benchmarks/multi_gpu.py).

    ``tables``: host arrays with one row per device (shard them along ``seq_axis``);
    ``combine(maps, h0, *rows)``, inside ``shard_map`` with this device's row of each table:
    maps [P_loc, HV, K, V + K] (E | M of its pieces), h0 [N, HV, K, V] ->
    (s_start [P_loc, HV, K, V], final [N, HV, K, V], or None when not ``want_final`` and the
    collective has no use for it), fp32.
    """
    import jax.numpy as jnp

    n = sl.start_sel.shape[0]
    if check_seq_collective(collective) == "all_gather":
        return (functools.partial(_combine_all_gather, by_step=jnp.asarray(sl.by_step),
                                  axis=seq_axis), (sl.start_sel,))
    return (functools.partial(_combine_ppermute, has_piece=jnp.asarray(sl.by_step[0] >= 0),
                              axis=seq_axis, n=n, rounds=sl.by_step.shape[0] - 1,
                              want_final=want_final),
            (sl.start_sel, sl.piece_count, sl.last_seq))


def _seq_parallel(q, k, v, g, beta, h0, p, mesh, seq_axis, hs, local, collective, want_final):
    """Tokens over ``seq_axis`` (heads over ``hs`` unless None). Returns (o, final or None)."""
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
    combine, tables = combine_step(sl, seq_axis, collective, want_final)

    def body(q, k, v, g, beta, h0, token_idx, token_ok, tables, plan_leaves):
        lp = jax.tree_util.tree_unflatten(treedef, [a[0] for a in plan_leaves])
        hv_loc = v.shape[2]
        # the same local work for both collectives: pieces from [0 | I] with values [v | 0]
        v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (dk,), v.dtype)], -1)
        h0_aug = jnp.concatenate([jnp.zeros((n_loc_pad, hv_loc, dk, dv), jnp.float32),
                                  eye[:, :hv_loc]], -1)
        o_aug, f_aug = local(q, k, v_aug, g, beta, lp, h0_aug)
        s_start, f = combine(f_aug[:p_loc], h0, *(a[0] for a in tables))
        o = _correct(o_aug, s_start, token_idx[0], token_ok[0], dv, v.dtype)
        return (o, f) if want_final else o

    spec4, spec3 = P(None, seq_axis, hs, None), P(None, seq_axis, hs)
    dev_spec = P(seq_axis)
    in_specs = (spec4, spec4, spec4, spec3, spec3, P(None, hs), dev_spec, dev_spec,
                tuple(dev_spec for _ in tables), tuple(dev_spec for _ in stacked))
    out_specs = (spec4, P(None, hs)) if want_final else spec4
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    out = fn(q, k, v, g, beta, h0, jnp.asarray(sl.token_idx), jnp.asarray(sl.token_ok),
             tuple(jnp.asarray(a) for a in tables), tuple(jnp.asarray(a) for a in stacked))
    return out if want_final else (out, None)
