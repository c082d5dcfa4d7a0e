"""Stage 1: the chunk-local inclusive cumsum of the log gate, ``gc [T, HV]`` (fp32).

A chunk is handled as four 16-token sub-blocks (the layout of the triangular solve in
``intra``), so the cumsum is four 16-wide scans plus a running carry. The fused ``prepare``
kernel (``wu.py``) calls the same helpers, so the standalone stage and the fused chain compute
identical bits. Tokens past a sequence's end load g = 0: their gc repeats the last valid value
and no exponent of theirs is ever used unmasked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BC, BT, check_device, chunk_program, device_fn, device_plan, interpreted,
                      launch, packed)

__all__ = ["chunk_cumsum", "load_token_blocks", "store_token_blocks", "cumsum_blocks",
           "gate_cumsum"]


@device_fn
def load_token_blocks(ptr, tok0, n_valid, head, HV: tl.constexpr, BC: tl.constexpr):
    """A per-token, per-head [T, HV] vector of one chunk as four fp32 [BC] blocks (0 past its
    end)."""
    i = tl.arange(0, BC)
    p = ptr + (tok0 + i) * HV + head
    x0 = tl.load(p, mask=i < n_valid, other=0.0).to(tl.float32)
    x1 = tl.load(p + BC * HV, mask=i + BC < n_valid, other=0.0).to(tl.float32)
    x2 = tl.load(p + 2 * BC * HV, mask=i + 2 * BC < n_valid, other=0.0).to(tl.float32)
    x3 = tl.load(p + 3 * BC * HV, mask=i + 3 * BC < n_valid, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@device_fn
def store_token_blocks(ptr, tok0, n_valid, head, x0, x1, x2, x3, HV: tl.constexpr,
                       BC: tl.constexpr):
    """Inverse of :func:`load_token_blocks` (valid tokens only)."""
    i = tl.arange(0, BC)
    p = ptr + (tok0 + i) * HV + head
    tl.store(p, x0, mask=i < n_valid)
    tl.store(p + BC * HV, x1, mask=i + BC < n_valid)
    tl.store(p + 2 * BC * HV, x2, mask=i + 2 * BC < n_valid)
    tl.store(p + 3 * BC * HV, x3, mask=i + 3 * BC < n_valid)


@device_fn
def cumsum_blocks(g0, g1, g2, g3):
    """Inclusive cumsum over the 64 tokens held as four blocks: a scan per block plus a carry."""
    c0 = tl.cumsum(g0, 0)
    s1 = tl.sum(g0, 0)
    c1 = tl.cumsum(g1, 0) + s1
    s2 = s1 + tl.sum(g1, 0)
    c2 = tl.cumsum(g2, 0) + s2
    s3 = s2 + tl.sum(g2, 0)
    c3 = tl.cumsum(g3, 0) + s3
    return c0, c1, c2, c3


@device_fn
def gate_cumsum(g, gc, tok0, n_valid, head, HV: tl.constexpr, BC: tl.constexpr):
    """Load one chunk's gates, store and return their chunk-local cumsum (four [BC] blocks)."""
    g0, g1, g2, g3 = load_token_blocks(g, tok0, n_valid, head, HV, BC)
    c0, c1, c2, c3 = cumsum_blocks(g0, g1, g2, g3)
    store_token_blocks(gc, tok0, n_valid, head, c0, c1, c2, c3, HV, BC)
    return c0, c1, c2, c3


@triton.jit
def _cumsum_kernel(g, gc, cu_seqlens, chunk_indices, HV: tl.constexpr, BT: tl.constexpr,
                   BC: tl.constexpr):
    _, head, _, seq, tok0, n_valid = chunk_program(cu_seqlens, chunk_indices, HV, 1, BT)
    if seq < 0:
        return
    gate_cumsum(g, gc, tok0, n_valid, head, HV, BC)


def chunk_cumsum(g: torch.Tensor, plan) -> torch.Tensor:
    """gc [T, HV] fp32 from g ([T, HV] or [1, T, HV], any float dtype), chunk-local per the plan.

    Rows of tokens past cu_seqlens[N] are left unwritten (zeros here).
    """
    check_device(g, interpreted(_cumsum_kernel))
    g = packed(g, 1)
    t, hv = g.shape
    p = device_plan(plan, g.device)
    gc = torch.zeros(t, hv, dtype=torch.float32, device=g.device)
    launch(_cumsum_kernel, (p.padded_chunks * hv,), g, gc, p.cu_seqlens, p.chunk_indices,
           HV=hv, BT=BT, BC=BC, num_warps=1)
    return gc
