"""Stage 4: the serial state pass. One program per (sequence, v head, V tile) walks that
sequence's chunks, rows ``chunk_offsets[n] .. chunk_offsets[n + 1]`` of the plan, with the state
``S [K, BV]`` in registers in fp32:

    h[row]  = S                                      (state at the chunk start, input dtype)
    v_new   = u - w S                                (stored in the input dtype)
    S       = exp(gc_last) S + K^T (exp(gc_last - gc) * v_new)

``gc_last`` is the gate of the last *valid* token of the chunk (a partial last chunk closes
there). The whole K extent of the state is one register tile (K padded to a power of two and
masked), so each chunk costs two dots: ``w @ S`` and ``K^T @ v_new``, in the input dtype on
tensor cores for 16-bit inputs (S and the scaled v_new rounded to it, like FLA), IEEE fp32
for fp32 inputs. An empty sequence runs no iteration: its final state is its initial state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BT, INTERPRET, check_device, device_fn, device_plan, dot_precision, dummy,
                      interpreted, launch, mma, packed, pow2, tiles, to_dt)
from .output import chunk_output, gram_diag, new_output, output_tiles

__all__ = ["state_pass", "state_tiles", "launch_maps"]


@device_fn
def _chunk_step(s, row, tok0, n_valid, k, w, u, gc, h, v_new, k_rstd, q, o, scale, head, kh,
                iv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                NORM: tl.constexpr, FUSE: tl.constexpr, STORE_HV: tl.constexpr,
                HILO: tl.constexpr):
    """One chunk of the state pass: h and v_new (stored unless fused without STORE_HV), the
    chunk's o with FUSE, and the next state.

    ``NORM``: k (and q) are raw; 1 / ||k|| (k_rstd [T, H]) joins the row scale of v_new.
    """
    dt = w.dtype.element_ty
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    m_k = rk < K
    m_v = rv < V
    m_t = rt < n_valid
    tok = tok0 + rt  # int64 token indices of the chunk
    s_dt = to_dt(s, dt)
    if STORE_HV:  # the state at the chunk start, for the output stage
        p_h = h + (row.to(tl.int64) * HV + head) * (K * V) + rk[:, None] * V + rv[None, :]
        tl.store(p_h, s_dt, mask=m_k[:, None] & m_v[None, :])
    # v_new = u - w S
    b_w = tl.load(w + (tok * HV + head)[:, None] * K + rk[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.0)
    p_u = (tok * HV + head)[:, None] * V + rv[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_u = tl.load(u + p_u, mask=m_tv, other=0.0).to(tl.float32)
    b_v = b_u - mma(b_w, s_dt, tl.zeros_like(b_u), PREC)
    v_dt = to_dt(b_v, dt)
    if STORE_HV:
        tl.store(v_new + p_u, v_dt, mask=m_tv)
    b_g = tl.load(gc + tok * HV + head, mask=m_t, other=0.0)
    k_r = tl.full([BT], 1.0, dtype=tl.float32)
    if NORM:
        k_r = tl.load(k_rstd + tok * H + kh, mask=m_t, other=0.0)
    b_kt = tl.load(k + (tok * H + kh)[None, :] * K + rk[:, None],  # K^T tile [BK, BT]
                   mask=m_k[:, None] & m_t[None, :], other=0.0)
    if FUSE:  # the output stage on the state in registers: h and v_new never go to memory
        b_q = tl.load(q + (tok * H + kh)[:, None] * K + rk[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        zero_tt = tl.zeros([BT, BT], dtype=tl.float32)
        q_sq = tl.zeros([BT], dtype=tl.float32)
        if NORM:  # from Q Q^T: the q tile feeds dots only (a pipelined loop, see intra.py)
            q_sq = gram_diag(mma(b_q, tl.trans(b_q), zero_tt, PREC), BT)
        out = chunk_output(mma(b_q, s_dt, tl.zeros_like(b_u), PREC), mma(b_q, b_kt, zero_tt, PREC),
                           q_sq, b_g, k_r, v_dt, m_t, scale, dt, BT, PREC, NORM, HILO)
        tl.store(o + p_u, to_dt(out, o.dtype.element_ty), mask=m_tv)
    # decay to the chunk end (gate of its last valid token), then add the chunk's keys
    g_last = tl.load(gc + (tok0 + n_valid - 1) * HV + head)
    b_v = b_v * (tl.where(m_t, tl.exp(g_last - b_g), 0.0) * k_r)[:, None]
    s = s * tl.exp(g_last)
    return mma(b_kt, to_dt(b_v, dt), s, PREC)


@triton.jit
def _state_kernel(k, w, u, gc, h, v_new, h0, ht, k_rstd, q, o, cu_seqlens, chunk_offsets, mode, scale,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                  PREC: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                  NORM: tl.constexpr, FUSE: tl.constexpr, STORE_HV: tl.constexpr,
                  HILO: tl.constexpr, MAPS: tl.constexpr):
    """One program per (sequence, v head, V tile). ``MAPS`` (pass 1 of the exact split, with
    STORE_HV and FUSE off): the "sequences" are pieces and the state has V + K columns, the last K
    starting from the identity with zero values, so the final state is ``[E | M]`` with
    ``S_end = M S_start + E``; ``mode[piece]`` (gdn.split.two_pass_tables) says which programs run:
    0 none (nobody needs the map), 1 the E columns (a first piece, from h0 = its sequence's initial
    state), 2 all (a later piece, from [0 | I])."""
    pid = tl.program_id(0)
    iv = pid % NV
    head = (pid // NV) % HV
    seq = pid // (NV * HV)
    kh = head // (HV // H)

    bos = tl.load(cu_seqlens + seq).to(tl.int64)
    eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    row0 = tl.load(chunk_offsets + seq)
    row1 = tl.load(chunk_offsets + seq + 1)

    VS: tl.constexpr = V + K if MAPS else V  # state columns: [E | M] in MAPS mode
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    m_kv = (rk < K)[:, None] & (rv < V)[None, :]
    kv_off = rk[:, None] * V + rv[None, :]  # offset of S[rk, rv] in one [K, V] state
    state_idx = seq.to(tl.int64) * HV + head  # which [K, V] state of [N, HV, K, V]

    s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        s = tl.load(h0 + state_idx * (K * V) + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    if MAPS:
        m = tl.load(mode + seq)
        live = (m == 2) | ((m == 1) & (iv * BV < V))
        s = tl.where((rv[None, :] - V == rk[:, None]) & (m == 2), 1.0, s)  # M's columns from I
        row1 = tl.where(live, row1, row0)  # a program with nothing to compute walks no chunk

    if INTERPRET:
        # Triton's interpreter (3.6, NumPy 2.5) cannot take range() bounds loaded from memory
        row = row0
        while row < row1:
            tok0 = bos + (row - row0).to(tl.int64) * BT
            s = _chunk_step(s, row, tok0, tl.minimum(eos - tok0, BT), k, w, u, gc, h, v_new,
                            k_rstd, q, o, scale, head, kh, iv, H, HV, K, V, BT, BK, BV, PREC,
                            NORM, FUSE, STORE_HV, HILO)
            row += 1
    else:
        for row in range(row0, row1):  # a counted loop: the compiler pipelines its loads
            tok0 = bos + (row - row0).to(tl.int64) * BT
            s = _chunk_step(s, row, tok0, tl.minimum(eos - tok0, BT), k, w, u, gc, h, v_new,
                            k_rstd, q, o, scale, head, kh, iv, H, HV, K, V, BT, BK, BV, PREC,
                            NORM, FUSE, STORE_HV, HILO)

    if STORE_FINAL:
        m_out = (rk < K)[:, None] & (rv < VS)[None, :]
        if MAPS:
            m_out = m_out & live
        tl.store(ht + state_idx * (K * VS) + rk[:, None] * VS + rv[None, :], s, mask=m_out)


def state_tiles(dk: int, dv: int, dtype: torch.dtype, fuse: bool = False,
                programs_per_v32: int | None = None, sms: int = 132) -> dict:
    """Tile sizes and launch options of the state pass for head dims (K, V) and an input dtype.

    The state tile is [K_pad, BV] fp32 in registers: BV = 64 up to K = 128, 32 beyond (the
    register budget of 4 warps), two pipeline stages for 16-bit inputs. When the whole pass
    with BV = 32 fits in one wave (``programs_per_v32`` = sequences x HV x ceil(V / 32) <= the
    ``sms``; 1x32768 at HV = 32: 128 programs), each program is latency-bound on its chunk
    loop: BV = 32 and 4 stages (the next three chunks' w, u, k in flight) take it from 0.97 to
    0.66 ms on the H200; with more sequences the 64-wide default is faster (4x8192: 0.42 ms
    against 0.67). fp32 inputs (IEEE fp32 dots on CUDA cores, operands in registers) get 8
    warps and one stage, as does the fused output mode (its q tile and output accumulators).
    """
    bk = pow2(dk)
    fp32 = dtype == torch.float32
    stages = 1 if fp32 or (fuse and bk > 128) else 2
    bv = 64 if bk <= 128 else 32
    few = (programs_per_v32 is not None and programs_per_v32 <= sms and not (fp32 or fuse)
           and bk <= 128)
    if few:
        bv, stages = 32, 4
    return tiles(dict(BK=bk, BV=bv, NV=0, num_warps=8 if fp32 or fuse else 4,
                      num_stages=stages), TILES, dv)


_SMS: dict = {}


def sm_count(dev: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (host query, memoized; 132 elsewhere)."""
    if dev.type != "cuda":
        return 132
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


#: tuning override of :func:`state_tiles` (e.g. {"BV": 32, "num_stages": 3}); empty by default
TILES: dict = {}

#: the chain computes o inside the state pass (h and v_new never reach memory: about a quarter
#: of the traffic at the Qwen3.5 shape) instead of in the output kernel. Off by default until
#: measured on the H200 (tests/gpu/triton_gpu_check.py tuning_sweep times both).
FUSE_OUTPUT: bool = False


def state_pass(k, w, u, gc, plan, *, initial_state=None, output_final_state: bool = True,
               k_rstd=None):
    """(h [NT, HV, K, V], v_new [T, HV, V]) in w's dtype and the fp32 final state [N, HV, K, V]
    (None unless ``output_final_state``), from packed k, w, u, gc (a leading 1 is allowed).

    ``initial_state`` [N or N_pad, HV, K, V], any float dtype, is read, never written. h rows
    follow chunk_indices (row r = chunk_indices[r]); N = plan.num_seqs (padded_seqs when None).
    ``k_rstd`` [T, H] (from :func:`wu.prepare` with l2norm): k is raw, normalized on the fly.
    """
    check_device(k, interpreted(_state_kernel), w=w, u=u, gc=gc, initial_state=initial_state,
                 k_rstd=k_rstd)
    k, w, u, gc = packed(k, 2), packed(w, 2), packed(u, 2), packed(gc, 1)
    return launch_state(k, w, u, gc, device_plan(plan, k.device), initial_state,
                        bool(output_final_state), k_rstd)


def launch_state(k, w, u, gc, p, initial_state, output_final_state: bool, k_rstd, *,
                 q=None, scale: float = 1.0, store_hv: bool = True):
    """:func:`state_pass` on packed contiguous tensors and a device plan (no checks).

    With ``q`` the output is fused in (``FUSE_OUTPUT`` mode): returns (h, v_new, final, o),
    h and v_new only with ``store_hv`` (else None: they never reach memory).
    """
    t, h_heads, dk = k.shape
    hv, dv = u.shape[1:]
    dev = k.device
    fuse = q is not None
    store_hv = store_hv or not fuse
    n_seq = p.num_seqs if p.num_seqs is not None else p.padded_seqs
    n_rows = p.num_chunks if p.num_chunks is not None else p.padded_chunks
    h0 = dummy(dev)
    if initial_state is not None:
        h0 = initial_state if initial_state.is_contiguous() else initial_state.contiguous()
        if h0.shape[0] < n_seq:  # padded sequences read zeros (only when N is unknown)
            h0 = torch.cat([h0, h0.new_zeros(n_seq - h0.shape[0], *h0.shape[1:])])
    hs = torch.empty(n_rows, hv, dk, dv, dtype=w.dtype, device=dev) if store_hv else dummy(dev)
    v_new = torch.empty(t, hv, dv, dtype=w.dtype, device=dev) if store_hv else dummy(dev)
    final = (torch.empty(n_seq, hv, dk, dv, dtype=torch.float32, device=dev)
             if output_final_state else dummy(dev))
    o = new_output(q, t, hv, dv, p) if fuse else dummy(dev)
    meta = state_tiles(dk, dv, w.dtype, fuse, n_seq * hv * -(-dv // 32), sm_count(dev))
    norm = k_rstd is not None
    launch(_state_kernel, (n_seq * hv * meta["NV"],), k, w, u, gc, hs, v_new, h0, final,
           k_rstd if norm else dummy(dev), q if fuse else dummy(dev), o, p.cu_seqlens,
           p.chunk_offsets, dummy(dev), float(scale), H=h_heads, HV=hv, K=dk, V=dv, BT=BT,
           PREC=dot_precision(w.dtype), HAS_H0=initial_state is not None,
           STORE_FINAL=output_final_state, NORM=norm, FUSE=fuse, STORE_HV=store_hv,
           HILO=fuse and output_tiles(dk, dv, w.dtype)["HILO"], MAPS=False, **meta)
    out = (hs if store_hv else None, v_new if store_hv else None,
           final if output_final_state else None)
    return out + (o,) if fuse else out


def launch_maps(k, w, u, gc, p, mode, initial_state, k_rstd):
    """Pass 1 of the exact split (:mod:`.split`): ``[E | M]`` fp32 [P, HV, K, V + K] of every piece
    (the "sequences" of the device plan ``p``), ``S_end = M S_start + E``, from packed contiguous k,
    w, u, gc. ``mode``: int [P] on the device (:func:`gdn.split.two_pass_tables`); the rows of the
    programs it skips are left unwritten (a last piece's map, a first piece's M: nobody reads them).
    ``initial_state``: None or fp32 [P, HV, K, V], a first piece's E start (its sequence's h0)."""
    t, h_heads, dk = k.shape
    hv, dv = u.shape[1:]
    dev = k.device
    n_seq = p.num_seqs
    vs = dv + dk
    em = torch.empty(n_seq, hv, dk, vs, dtype=torch.float32, device=dev)
    meta = state_tiles(dk, vs, w.dtype, False, n_seq * hv * -(-vs // 32), sm_count(dev))
    norm = k_rstd is not None
    h0 = dummy(dev) if initial_state is None else initial_state
    launch(_state_kernel, (n_seq * hv * meta["NV"],), k, w, u, gc, dummy(dev), dummy(dev), h0, em,
           k_rstd if norm else dummy(dev), dummy(dev), dummy(dev), p.cu_seqlens, p.chunk_offsets, mode,
           1.0, H=h_heads, HV=hv, K=dk, V=dv, BT=BT, PREC=dot_precision(w.dtype),
           HAS_H0=initial_state is not None, STORE_FINAL=True, NORM=norm, FUSE=False, STORE_HV=False,
           HILO=False, MAPS=True, **meta)
    return em
