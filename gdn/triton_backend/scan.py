"""The exact split's scan as one Triton kernel: every piece's true start state from pass 1's maps.

Pass 1 (:func:`.state.launch_maps`) gives each piece its end state from a zero start, ``E`` [K, V],
and its map ``M`` [K, K] (``S_end = M S_start + E``; a first piece has its sequence's initial
state in ``E`` and no map). Each sequence's pieces are walked in order::

    s = E[first piece]
    for each later piece p:  start[p] = s;  s = M[p] s + E[p]

One program per (sequence of several pieces, v head, V tile of ``BV`` columns) keeps ``s`` fp32
in registers for the whole walk, as ``S^T`` [BV, K] (``S^T M^T + E^T``, the JAX twin's
``transposed``: 18% faster there than the walk on S on an H100, 43.6 vs 53.4 us at H/HV 2/4
1x32768; here UNTIMED): one launch, where a step of batched torch products costs several launches
(the scan is launch-bound at tensor-parallel head counts, which are what the split is for). The
products are tf32x3 (three TF32 tensor-core products: fp32 accuracy; IEEE in the interpreter)
with 8 warps: compiled for sm_90 at K = 128 (BV = 16) the walk on S^T takes 226 registers, no
spills, 32 KiB of SMEM (``python -m gdn.triton_backend.xcompile``, 2026-12-06); on S it spilled
84 B per thread, an IEEE fp32 dot 3 KB, and K halves in four [64, 64] blocks did not help (332 to
1216 B). The JAX backend's twin is gdn/jax_backend/pallas_triton/scan.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, launch, mma, pow2

__all__ = ["scan_starts", "scan_tiles"]


@triton.jit
def _scan_kernel(ids, e_map, m_map, start, R,
                 se_p, se_h, se_k, sm_p, sm_h, sm_k, ss_p, ss_h, ss_k,
                 K: tl.constexpr, V: tl.constexpr, STEPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    vb, head, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kk = tl.arange(0, BK)
    col = vb * BV + tl.arange(0, BV)
    km = kk < K
    smask = km[:, None] & (col < V)[None, :]
    mmask = km[:, None] & km[None, :]
    n = 0  # the pieces of sequence r (a scalar loop: the interpreter cannot take a range from tl.sum)
    for i in range(0, STEPS):
        n += (tl.load(ids + i * R + r) >= 0).to(tl.int32)
    if n >= 2:
        e0 = e_map + head * se_h + kk[:, None] * se_k + col[None, :]
        m0 = m_map + head * sm_h + kk[:, None] * sm_k + kk[None, :]
        s0 = start + head * ss_h + kk[:, None] * ss_k + col[None, :]
        # the walk on S^T (S^T M^T + E^T): S^T is the dot's left operand, which Triton keeps in
        # registers (mma.sync) instead of staging it through SMEM for wgmma
        s = tl.trans(tl.load(e0 + tl.load(ids + r).to(tl.int64) * se_p, mask=smask, other=0.0))
        i = 1
        while i < n - 1:  # (not range(): Triton 3.6's interpreter cannot take bounds from memory)
            p = tl.load(ids + i * R + r).to(tl.int64)
            tl.store(s0 + p * ss_p, tl.trans(s), mask=smask)
            m = tl.load(m0 + p * sm_p, mask=mmask, other=0.0)
            s = mma(s, tl.trans(m), tl.trans(tl.load(e0 + p * se_p, mask=smask, other=0.0)), "tf32x3")
            i += 1
        tl.store(s0 + tl.load(ids + (n - 1) * R + r).to(tl.int64) * ss_p, tl.trans(s), mask=smask)


def scan_tiles(rows: int, hv: int, v: int, sms: int) -> int:
    """V columns per program: :func:`gdn.split.scan_columns`, clamped to V's tile."""
    from ..split import scan_columns

    return min(scan_columns(rows, hv, v, sms), pow2(v))


def scan_starts(e_map: torch.Tensor, m_map: torch.Tensor, by_step: torch.Tensor, start: torch.Tensor,
                sms: int) -> torch.Tensor:
    """Every piece's start written into ``start`` fp32 [P, HV, K, V] (contiguous; the rows no step
    reaches keep their value: zeros, or a first piece's initial state) and returned.

    e_map: fp32 [P, HV, K, V], m_map: fp32 [P, HV, K, K] (last dim contiguous; views of pass 1's
    [E | M] are fine); by_step: device int [S, R] (:func:`gdn.split.two_pass_tables`, S a power
    of two: column r the pieces of one sequence in order, -1 past its last).
    """
    p, hv, k, v = start.shape
    steps, rows = by_step.shape
    if e_map.shape != start.shape or m_map.shape != (p, hv, k, k) or not start.is_contiguous():
        raise ValueError(f"scan_starts: e_map {tuple(e_map.shape)}, m_map {tuple(m_map.shape)}, start "
                         f"{tuple(start.shape)} (contiguous: {start.is_contiguous()})")
    if e_map.stride(-1) != 1 or m_map.stride(-1) != 1:
        raise ValueError("scan_starts: e_map and m_map need a contiguous last dim")
    if steps < 2:
        return start
    bv = scan_tiles(rows, hv, v, sms)
    launch(_scan_kernel, (cdiv(v, bv), hv, rows), by_step.contiguous(), e_map, m_map, start, rows,
           *e_map.stride()[:3], *m_map.stride()[:3], *start.stride()[:3],
           K=k, V=v, STEPS=steps, BK=pow2(k), BV=bv, num_warps=8, num_stages=1)
    return start
