"""Stage 1: gc = chunk-local inclusive cumsum of the log gates g (fp32).

:func:`gate_blocks` computes it in registers for one chunk and v head, as NB sub-block vectors
(a scan of each 16-row block plus the running total of the blocks before it): the fused prepare
kernel (wu.py) uses it and stores gc. :func:`chunk_cumsum` is the stage on its own, for the
stage-by-stage comparisons: one program per (chunk row, v head), the same device code, launched
like the Triton backend's ``_cumsum_kernel`` (1 warp, its program order: :func:`cumsum_tiles`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kernel_utils import (BC, compiler_params, grid_of, load_sub, on_chunk_row, pl, store,
                           tiles)

#: launch overrides of :func:`chunk_cumsum` over :func:`cumsum_tiles` (keys num_warps,
#: num_stages, order), for sweeps; empty by default. Read at trace time (see kernel_utils).
TILES: dict = {}


def cumsum_tiles() -> dict:
    """The Triton backend's cumsum launch: 1 warp (a 16-wide scan per sub-block), Triton's
    default 3 stages (no loop to pipeline), the Triton program order (kernel_utils.ORDERS)."""
    return tiles(dict(num_warps=1, num_stages=3, order="triton"), TILES, "cumsum")


def gate_blocks(g_ref, t0, head, masks):
    """[gc of sub-block i] (fp32 [BC] each, 0 on rows past the sequence end)."""
    out, carry = [], jnp.float32(0.0)
    for gi in load_sub(g_ref, t0, head, masks):
        out.append(jnp.cumsum(gi) + carry)
        carry = carry + jnp.sum(gi)
    return out


def store_sub(ref, t0, head, masks, vals):
    for i, (m, x) in enumerate(zip(masks, vals)):
        store(ref.at[pl.ds(t0 + i * BC, BC), head], x, m)


def chunk_cumsum(g, plan, *, interpret: bool):
    """g [T, HV] fp32 -> gc [T, HV] fp32 (tokens outside every chunk row are not written)."""
    n_tok, hv = g.shape
    meta = cumsum_tiles()

    def kernel(ci_ref, cu_ref, g_ref, gc_ref):
        on_chunk_row(ci_ref, cu_ref, lambda t0, head, masks: store_sub(
            gc_ref, t0, head, masks, gate_blocks(g_ref, t0, head, masks)), meta["order"])

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tok, hv), jnp.float32),
        grid=grid_of((plan.padded_chunks, hv), meta["order"]), interpret=interpret,
        compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]),
        name="gdn_chunk_cumsum",
    )(plan.chunk_indices, plan.cu_seqlens, g)
