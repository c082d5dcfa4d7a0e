"""Intra-tile kernel: the decayed inverse with beta folded in, and the segmented gate cumsum.

For every aligned 64-token tile ``m`` and v head ``j`` (grid ``(HV, tiles)``), with ``same(r, s)``
true when tokens r and s of the tile belong to one sequence (``seg`` ids from the plan):

    gam_r  = sum_{s <= r, same(r, s)} g_s                          (segmented cumsum, fp32)
    A_rs   = beta_r (k_r . k_s) exp(gam_r - gam_s)   r > s, same(r, s), else 0
    Ai     = (I + A)^-1                                            (block diagonal per sequence)
    Ag_rs  = Ai_rs beta_s                                          (stored in the input dtype)

so the chunk loop forms ``v_new = Ag (v - diag(exp(gam)) K S)`` of the sequence's rows (DESIGN.md §1:
``U - W S0 = Ai diag(beta) (V - diag(exp(gam)) K S0)``). Every exponent used is <= 0. Entries
across two sequences are exactly 0 by selects (never by a 0 factor), so NaN / inf in one sequence's
k, g or beta leave the other sequences' rows of ``Ag`` and ``gc`` bitwise unchanged. ``gam`` is
written as fp32 ``gc [HV, T_pad]`` for the chunk loop. The triangular solve is in
:mod:`gdn.jax_backend.mosaic_gpu.solve`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from .common import (C, COLS, F32, ROWS, cols, compiler_params, interpret_params, iota, mm, rows, tile,
                     tracing_for_interpreter)
from .solve import decayed_a, diag_block_inverse, merge


def intra(k, g_hm, beta_hm, seg, *, group: int, interpret=None, debug_inverse: bool = False):
    """``(Ag [HV, T_pad, 64] in k's dtype, gc [HV, T_pad] fp32)`` (+ ``Ai`` fp32 with debug_inverse).

    k: [T_pad, H, K] (T_pad a multiple of 64); g_hm, beta_hm: [HV, T_pad] fp32; seg: [T_pad] int32
    sequence id of each token (tokens past the last sequence get an id of their own).
    """
    t_pad, _, dk = k.shape
    hv = g_hm.shape[0]
    n_tiles = t_pad // C
    dtype = k.dtype
    vec = plgpu.SMEM((C,), F32)
    ivec = plgpu.SMEM((C,), jnp.int32)
    out_type = [jax.ShapeDtypeStruct((hv, t_pad, C), dtype), jax.ShapeDtypeStruct((hv, t_pad), F32)]
    if debug_inverse:
        out_type.append(jax.ShapeDtypeStruct((hv, t_pad, C), F32))
    scratch = dict(
        k_s=tile((C, dk), dtype),
        g_r=vec, g_c=vec, b_r=vec, b_c=vec, s_r=ivec, s_c=ivec,
        lo_s=tile((C, C), dtype),
        ag_s=tile((C, C), dtype),
        gc_s=vec,
        na_s=plgpu.SMEM((C, C), F32),
        x_s=plgpu.SMEM((C, C), F32),
        bar=plgpu.Barrier(num_arrivals=7),
    )
    interp = bool(interpret)

    def body(k_ref, g_ref, b_ref, seg_ref, ag_ref, gc_ref, *rest, k_s, g_r, g_c, b_r, b_c, s_r, s_c,
             lo_s, ag_s, gc_s, na_s, x_s, bar):
        ai_ref = rest[0] if debug_inverse else None
        j, m = lax.axis_index("h"), lax.axis_index("m")
        tok = pl.ds(pl.multiple_of(m * C, C), C)
        plgpu.copy_gmem_to_smem(k_ref.at[tok, lax.div(j, group)], k_s, bar)
        for src, dst in ((g_ref, g_r), (g_ref, g_c), (b_ref, b_r), (b_ref, b_c)):
            plgpu.copy_gmem_to_smem(src.at[j, tok], dst, bar)
        plgpu.copy_gmem_to_smem(seg_ref.at[tok], s_r, bar)
        plgpu.copy_gmem_to_smem(seg_ref.at[tok], s_c, bar)
        plgpu.barrier_wait(bar)

        sq = (C, C)
        r, c = iota(sq, 0), iota(sq, 1)
        same = rows(plgpu.load(s_r, layout=ROWS), sq) == cols(plgpu.load(s_c, layout=COLS), sq)
        g_row = plgpu.load(g_r, layout=ROWS)
        g_col = plgpu.load(g_c, layout=COLS)
        # segmented inclusive cumsum, once per layout (exact fp32 sums of <= 64 terms)
        gam_r = jnp.where((c <= r) & same, cols(g_col, sq), 0.0).sum(axis=1)
        gam_c = jnp.where((r <= c) & same, rows(g_row, sq), 0.0).sum(axis=0)
        beta_row = plgpu.load(b_r, layout=ROWS)
        beta_col = plgpu.load(b_c, layout=COLS)

        kk = mm(k_s, k_s.T, sq)  # symmetric: serves A and A^T
        gr, gcc = rows(gam_r, sq), cols(gam_c, sq)
        a_low, na_t = decayed_a(kk, gr, gcc, beta_row, beta_col, same, r, c, sq, interp)
        # NaN isolation (solve.py): A, the inverse and Ag are exactly 0 across two sequences by
        # selects, so a clean sequence's rows do not depend on a poisoned neighbour in the tile
        x = diag_block_inverse(a_low, na_t, na_s, x_s, interpret=interp, same=same, seg_ref=s_r)
        x = merge(x, a_low, lo_s, dtype, same=same)
        ag = jnp.where(same, x * cols(beta_col, sq), 0.0)  # beta of another sequence may be NaN
        ag_s[...] = ag.astype(dtype)
        gc_s[...] = gam_r
        if debug_inverse:
            x_s[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ag_s, ag_ref.at[j, tok])
        plgpu.copy_smem_to_gmem(gc_s, gc_ref.at[j, tok])
        if debug_inverse:
            plgpu.copy_smem_to_gmem(x_s, ai_ref.at[j, tok])
        plgpu.wait_smem_to_gmem(0)

    with tracing_for_interpreter(interp):
        return plgpu.kernel(
            body, out_type=tuple(out_type), scratch_types=scratch, grid=(hv, n_tiles), grid_names=("h", "m"),
            compiler_params=compiler_params(), interpret=interpret_params(interpret), kernel_name="gdn_intra",
        )(k, g_hm, beta_hm, seg)
