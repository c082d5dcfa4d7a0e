"""Stage 1: gc = chunk-local inclusive cumsum of the log gates g (fp32), per chunk row.

Grid (NT_pad, ceil(HV / BH)); one program loads the [BT, BH] gate tile of its chunk (rows past
the sequence end masked to 0), scans it down the rows and stores the valid rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kernel_utils import BT, chunk_bounds, compiler_params, iota, load, pl, store
from ..common import next_pow2


def chunk_cumsum(g, plan, *, interpret: bool):
    """g [T, HV] fp32 -> gc [T, HV] fp32 (tokens outside every chunk row are not written)."""
    n_tok, hv = g.shape
    bh = min(next_pow2(hv), 64)

    def kernel(ci_ref, cu_ref, g_ref, gc_ref):
        row, hb = pl.program_id(0), pl.program_id(1)
        n, t0, length = chunk_bounds(ci_ref, cu_ref, row)

        @pl.when(n >= 0)
        def _():
            cols = hb * bh + iota(bh)
            m = (iota(BT)[:, None] < length) & (cols[None, :] < hv)
            at = (pl.ds(t0, BT), pl.ds(hb * bh, bh))
            x = load(g_ref.at[at], m, 0.0)
            store(gc_ref.at[at], jnp.cumsum(x, axis=0), m)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tok, hv), jnp.float32),
        grid=(plan.padded_chunks, pl.cdiv(hv, bh)), interpret=interpret,
        compiler_params=compiler_params(num_warps=4), name="gdn_chunk_cumsum",
    )(plan.chunk_indices, plan.cu_seqlens, g)
