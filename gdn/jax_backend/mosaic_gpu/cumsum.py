"""The gate cumsum stage of impl="mosaic_gpu", in XLA: chunk-local and segmented by sequence.

``gc[j, t] = sum of g[j, u]`` over the tokens ``u <= t`` of token t's 64-token tile (tiles aligned
to the packed token axis, gdn.jax_backend.mosaic_gpu.common) that belong to t's sequence. Both
kernels read it: the intra kernel (the decayed A) and the chunk loop (the gates of the state walk).

One associative scan per tile (a sum that restarts at a tile's first token and at every sequence
start), so a NaN / inf in one sequence's g never reaches a neighbour's sum: the restart is a select,
not a product with 0 (docs/RELIABILITY.md §2). It used to be a masked [64, 64] reduction inside the
intra kernel (10% of that kernel's time on the H200, 2026-12-03 profile); here it is a few
memory-bound XLA ops over [HV, T] fp32.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .common import C


def _add_unless_restart(left, right):
    (va, ra), (vb, rb) = left, right
    return jnp.where(rb, vb, va + vb), ra | rb


def chunk_cumsum(g_hm, seg):
    """``gc [HV, T_pad]`` fp32 from ``g_hm [HV, T_pad]`` fp32 (head-major gates, T_pad a multiple of
    64) and ``seg [T_pad]`` int32 (each token's sequence id; tokens past the last sequence form one
    more segment of their own)."""
    hv, t_pad = g_hm.shape
    if t_pad % C:
        raise ValueError(f"T_pad ({t_pad}) must be a multiple of {C}")
    tiles = seg.reshape(t_pad // C, C)
    restart = jnp.concatenate([jnp.ones((t_pad // C, 1), bool), tiles[:, 1:] != tiles[:, :-1]], axis=1)
    x = g_hm.astype(jnp.float32).reshape(hv, t_pad // C, C)
    restart = jnp.broadcast_to(restart[None], x.shape)
    gc, _ = lax.associative_scan(_add_unless_restart, (x, restart), axis=2)
    return gc.reshape(hv, t_pad)
