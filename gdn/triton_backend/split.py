"""The exact sequence split on the Triton backend: two passes of the state kernel (gdn issue 6).

The state pass is the chain's only serial stage: one program per (sequence, v head, V tile) walks
its sequence's chunks. A long prompt with few v heads (tensor-parallel serving: 4-16 v heads per
GPU) leaves most SMs idle there. Its pieces (host-planned, :func:`gdn.planner.split_pieces`: cut
at multiples of the chunk size) run as the sequences of a finer plan:

1. the intra and w / u stages on the piece plan (chunk-local: the unsplit call's numbers);
2. pass 1: every piece's ``[E | M]`` (``S_end = M S_start + E``) by the state kernel in its MAPS
   mode: V + K state columns, the last K from the identity with zero values (:func:`.state.launch_maps`);
3. the scan over each sequence's pieces (:func:`.scan.scan_starts`, one kernel, fp32), the true
   start of every piece;
4. pass 2: the state pass and the output stage on the piece plan from those starts, exactly as the
   unsplit chain computes them (no correction of the output).

Exact for any gates (no decay threshold). The host tables are :func:`gdn.split.two_pass_tables`;
they reach the GPU in one non-blocking copy from pinned memory per table set, and nothing is read
back from the device.
"""
from __future__ import annotations

import numpy as np
import torch

from ._chain import _device_guard, chain_inputs, state_and_output
from ._common import device_plan
from .scan import scan_starts
from .state import launch_maps, sm_count
from .wu import launch_prepare

__all__ = ["run_split", "pick_piece_chunks"]


def _to_device(arrays: dict, dev: torch.device) -> dict:
    """Host int arrays -> int64 tensors on ``dev`` in ONE copy from pinned memory, non-blocking (a
    copy from pageable memory would first wait for everything queued on the GPU)."""
    flat = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays.values()] + [np.zeros(0, np.int64)])
    t = torch.from_numpy(flat)
    if dev.type == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    out, at = {}, 0
    for name, a in arrays.items():
        a = np.asarray(a)
        out[name] = t[at:at + a.size].view(a.shape)
        at += a.size
    return out


def run_split(args, split):
    """``gdn.prefill`` of validated ``args`` (packed batch, host plan) through ``split``
    (:class:`gdn.planner.Split`) in two passes -> (o [B, T, HV, V], final fp32 [N, HV, K, V] or None)."""
    from ..planner import plan as make_plan
    from ..split import two_pass_tables

    h0 = args.initial_state
    dev, q, k, v, g, beta = chain_inputs(args)
    p = args.plan
    if args.batch != 1 or not p.is_host:
        raise ValueError("the split needs a packed batch (cu_seqlens or plan, B == 1) and a host plan")
    n, pieces = p.num_seqs, split.num_pieces
    _, hv, dk, dv = args.dims
    pp = device_plan(make_plan(split.piece_cu_seqlens, p.chunk_size, num_tokens=args.seqlen), dev)
    tabs = two_pass_tables(split, n, pieces)
    first = np.flatnonzero(split.piece_index == 0)
    last = tabs["last_piece"][:n]
    has_last = np.flatnonzero(last >= 0)
    by_step = tabs["by_step"][:, tabs["by_step"][0] >= 0]  # the power-of-two padding columns: no sequence
    d = _to_device(dict(mode=tabs["mode"], first=first, first_seq=split.piece_seq[first], has_last=has_last,
                        last=last[has_last], by_step=by_step), dev)
    f32 = torch.float32
    with _device_guard(dev):
        gc, _, w, u, k_rstd = launch_prepare(k, v, g, beta, pp, False, args.use_qk_l2norm)
        start = torch.zeros(pieces, hv, dk, dv, dtype=f32, device=dev)
        if h0 is not None:  # a first piece starts from its sequence's initial state
            start[d["first"]] = h0[d["first_seq"]].to(f32)
        em = launch_maps(k, w, u, gc, pp, d["mode"], start if h0 is not None else None, k_rstd)
        start = scan_starts(em[..., :dv], em[..., dv:], d["by_step"], start.clone(), sm_count(dev))
        _, _, fin, o = state_and_output(q, k, w, u, gc, pp, start, args, k_rstd)
    final = None
    if args.output_final_state:  # a sequence's final state is its last piece's; an empty one's its h0
        final = (torch.zeros(n, hv, dk, dv, dtype=f32, device=dev) if h0 is None
                 else h0[:n].to(f32).clone())
        final[d["has_last"]] = fin[d["last"]]
    return o.reshape(args.batch, args.seqlen, hv, dv), final


#: The state pass's time per chunk of one program (H200, K = V = 128, bf16): ``FEW`` with 32-column
#: programs when they fit one wave (1x32768 at HV = 32: 128 programs, 0.66 ms over 512 chunks,
#: 2026-11-28), ``MANY`` with the 64-column default at two programs per SM (4x8192: 256 programs,
#: 0.42 ms over 128 chunks), ``ALONE`` with 64-column programs one per SM (an estimate: 28672+4096's
#: whole chain took 0.23 ms more than 1x32768's in the 2026-12-04 e4 benchmark, over its 448-chunk
#: sequence). The scan's time per step: an estimate made for the loop of torch products that
#: preceded the scan kernel (.scan, 2026-12-05), kept until the kernel is timed on the H200.
FEW_CHUNK_US, MANY_CHUNK_US, ALONE_CHUNK_US, SCAN_STEP_US = 1.29, 3.28, 2.0, 30.0


def _programs_us(tiles, few: bool, sms: int) -> float:
    """Modelled time of one state-pass launch whose programs walk ``tiles`` chunks each."""
    from ..planner import makespan

    tiles = np.asarray(tiles, np.int64)
    tiles = tiles[tiles > 0]
    if tiles.size == 0:
        return 0.0
    if few:
        return float(tiles.max()) * FEW_CHUNK_US
    if tiles.size <= sms:
        return float(tiles.max()) * ALONE_CHUNK_US
    return makespan(tiles, 2 * sms) * MANY_CHUNK_US


def state_us(chunks, hv: int, dv: int, sms: int) -> float:
    """Modelled time of the state pass over sequences of ``chunks`` chunks each with ``dv`` state
    columns (in the regime :func:`.state.state_tiles` picks)."""
    chunks = np.asarray(chunks, np.int64)
    chunks = chunks[chunks > 0]
    few = chunks.size * hv * -(-dv // 32) <= sms
    return _programs_us(np.repeat(chunks, hv * -(-dv // (32 if few else 64))), few, sms)


def pick_piece_chunks(seq_lens, hv: int, dk: int, dv: int, sms: int | None = None) -> int | None:
    """Chunks per piece of the two-pass split, or None when it does not pay
    (:func:`gdn.planner.two_pass_policy` on the state pass alone: the other stages do the same
    work split or not). Pass 1 is the state pass with V + K columns over every piece but a
    sequence's last (a first piece's V only)."""
    from ..planner import two_pass_policy

    sms = sms or (sm_count(torch.device("cuda")) if torch.cuda.is_available() else 132)

    def map_us(first, later):
        """Pass 1, one launch: a first piece's V / BV programs, a later piece's (V + K) / BV."""
        first, later = np.asarray(first, np.int64), np.asarray(later, np.int64)
        few = (first.size * -(-dv // 32) + later.size * -(-(dv + dk) // 32)) * hv <= sms
        bv = 32 if few else 64
        tiles = np.concatenate([np.repeat(first, hv * -(-dv // bv)), np.repeat(later, hv * -(-(dv + dk) // bv))])
        return _programs_us(tiles, few, sms)

    return two_pass_policy(seq_lens, loop_us=lambda c: state_us(c, hv, dv, sms), map_us=map_us,
                           scan_step_us=SCAN_STEP_US)
