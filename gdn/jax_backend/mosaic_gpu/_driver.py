"""XLA glue around the two Mosaic GPU kernels (reshapes, head-major gates, sequence ids)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ...api import PrefillArgs
from .chunk_loop import chunk_loop
from .fused import fused
from .common import C
from .intra import intra
from .intra_grouped import intra_grouped


def _l2norm(x):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def _plan_arrays(plan):
    cu = plan.cu_seqlens
    if isinstance(cu, np.ndarray):
        cu = plan.to_jax().cu_seqlens
    return jnp.asarray(cu, jnp.int32)


def prefill_arrays(args: PrefillArgs, *, interpret=None, variant: str = "two_kernels", bv: int = 64,
                   stages: int | None = None, regs=None, intra_variant: str = "default",
                   intra_tiles: int | None = None):
    """The Mosaic GPU prefill. ``variant``: "two_kernels" (default, the faster one measured on the H200:
    the intra kernel, then the chunk loop of 64 V columns per CTA) or "fused" (one kernel per head and
    sequence; see benchmarks/mosaic_notes.md for why it is slower today). ``intra_variant`` (two_kernels
    only): "default" (:func:`intra.intra`) or "grouped" (:func:`intra_grouped.intra_grouped`, one CTA per
    k head and ``intra_tiles`` tiles; not yet timed on the GPU)."""
    plan = args.plan
    h, hv, dk, dv = args.dims
    t_arr = args.batch * args.seqlen
    group = hv // h
    dtype = jnp.dtype(args.q.dtype)
    q = jnp.asarray(args.q).reshape(t_arr, h, dk)
    k = jnp.asarray(args.k).reshape(t_arr, h, dk)
    v = jnp.asarray(args.v, dtype).reshape(t_arr, hv, dv)
    if args.use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    t_pad = max(C, -(-t_arr // C) * C)
    pad = t_pad - t_arr
    g = jnp.asarray(args.g).reshape(t_arr, hv).astype(jnp.float32)
    beta = jnp.asarray(args.beta).reshape(t_arr, hv).astype(jnp.float32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        g, beta = (jnp.pad(x, ((0, pad), (0, 0))) for x in (g, beta))
    g_hm, beta_hm = g.T, beta.T
    cu = _plan_arrays(plan)
    h0 = args.initial_state
    if h0 is not None:
        h0 = jnp.asarray(h0, jnp.float32)
    n_out = None
    if args.output_final_state:
        n_out = plan.num_seqs if plan.num_seqs is not None else plan.padded_seqs
    if variant == "fused":
        o, final = fused(q, k, v, g_hm, beta_hm, cu, h0, scale=args.scale, group=group, n_out=n_out,
                         stages=stages, regs=regs, interpret=interpret)
    elif variant == "two_kernels":
        seg = jnp.searchsorted(cu[1:], jnp.arange(t_pad, dtype=jnp.int32), side="right").astype(jnp.int32)
        if intra_variant == "grouped":
            ag, gc = intra_grouped(k, g_hm, beta_hm, seg, group=group, tiles_per_cta=intra_tiles,
                                   interpret=interpret)[:2]
        elif intra_variant == "default":
            ag, gc = intra(k, g_hm, beta_hm, seg, group=group, interpret=interpret)[:2]
        else:
            raise ValueError(f"intra_variant must be 'default' or 'grouped', got {intra_variant!r}")
        o, final = chunk_loop(q, k, v, ag, gc, cu, h0, scale=args.scale, group=group, n_out=n_out,
                              t_valid=t_pad, bv=bv, stages=stages, interpret=interpret)
    else:
        raise ValueError(f"variant must be 'fused' or 'two_kernels', got {variant!r}")
    if pad:
        o = o[:t_arr]
    o = o.reshape(args.batch, args.seqlen, hv, dv)
    return o, final
