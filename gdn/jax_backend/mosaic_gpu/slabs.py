"""The intra kernel's per-tile work on [64, 16] column slabs with warp-level MMA, for a warpgroup short
of registers (the wide loop's prep warpgroup, 88 registers a thread beside two state warpgroups).

Session 16 (benchmarks/mosaic_notes.md) found that the intra work written on whole [64, 64] fp32
arrays (32 registers a thread each; ``K K^T``, ``A``, the inverse, the merges' accumulators) spills
at any register split that leaves the state warpgroups the 208 they need. Here every product is
``mma.sync`` (``plgpu.mma``, m16n8k16, warp ``w`` owns rows ``16 w .. 16 w + 15``) on one 16-column
slab of its result at a time (8 fp32 registers), with its 16-bit operands loaded from SMEM by
``ldmatrix``; the slabs meet in plain (untiled) [64, 64] SMEM tiles. The accumulator layout of
``plgpu.mma`` is the WGMMA layout (``MMA_ACC == WGMMA`` in jax 0.11.2), so the elementwise work
(masks, exponentials, selects) is the same code as on whole tiles, and warp ``w``'s registers of
slab ``w`` are exactly its 16x16 diagonal block of ``A``: the warp solve
(:func:`.solve.warp_solve_steps`) takes it with no selects.

Per tile (``X = (I + A)^-1`` as :func:`.solve.merge_chain_lean`: the same products and roundings):
    gc  = the sequence's chunk-local gate cumsum                      (whole rows, nothing else live)
    for each slab s:  K K^T[:, s] -> A[:, s] -> Ao[:, s] (16-bit SMEM), -A's diagonal block s
    X0  = the diagonal blocks' inverses (one warp each, registers)    -> 16-bit SMEM (block diagonal)
    M   = Ao X0         (slab s: Ao[:, block s] X0[s, s], K = 16)     -> 16-bit SMEM
    Z   = X0 - X0 M     (slabs kept in fp32, 32 registers)
    M^2 = M M                                                       -> 16-bit SMEM (Ao's tile)
    X   = Z + Z M^2;  Ag = X diag(beta)                              -> 16-bit SMEM (M's tile) -> ``ag_ref``

Under the Mosaic GPU interpreter (no rule for ``mma``) the products are fp32-accumulated dots of the
same 16-bit operands, and the diagonal blocks are inverted by the same substitution written with jnp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, vector

from .common import C, COLS, F32, ROWS, WG, cols, masked_decay, rows, seq_cumsum
from .solve import BLOCK, _MlirLanes, _diag_solve_interpret, same_block, vec_elem, warp_solve_steps

SLAB = BLOCK  # columns per slab: one 16x16 block column, one warp's diagonal block
NSLAB = C // SLAB


def slab_mma(acc, a_ref, b_ref, dtype, interpret: bool):
    """``acc + a @ b`` by warp-level MMA: ``a_ref`` [64, k], ``b_ref`` [k, n] 16-bit SMEM (views);
    ``acc`` fp32 [64, n] in the WGMMA (= MMA accumulator) layout."""
    if interpret:
        return acc + jnp.dot(a_ref[...], b_ref[...], preferred_element_type=F32)
    a = plgpu.load(a_ref, (), layout=plgpu.Layout.MMA_LHS(dtype))
    b = plgpu.load(b_ref, (), layout=plgpu.Layout.MMA_RHS(dtype))
    return plgpu.mma(acc, a, b)


def _zeros(n: int = SLAB):
    return plgpu.layout_cast(jnp.zeros((C, n), F32), WG)


def _slab_solve_body(ctx, na):
    """:func:`.solve.warp_solve_steps` on a [64, 16] slab holding ``-A``'s diagonal blocks (warp ``w``'s
    rows are block ``w``): each warp solves its own registers."""
    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    lane = arith.remui(mu.thread_idx(), mu.c(32, i32))
    regs = na.registers
    assert regs.shape == (1, 2, 1, 1, 2, 1, 1, 1, 1), regs.shape  # [8-column group jb][h]

    nav = [[[vec_elem(regs[0, jb, 0, 0, h, 0, 0, 0, 0], e) for e in range(2)] for jb in range(2)] for h in range(2)]
    x = warp_solve_steps(_MlirLanes(lane), nav)
    out = np.empty_like(regs)
    vec2 = ir.VectorType.get([2], f32)
    for jb in range(2):
        for h in range(2):
            out[0, jb, 0, 0, h, 0, 0, 0, 0] = vector.from_elements(vec2, [x[h][jb][e] for e in range(2)])
    return mgpu.FragmentedArray(_registers=out, _layout=na.layout, _is_signed=None)


_SLAB_SOLVE = plgpu.inline_mgpu(
    arg_types=(plgpu.Layout.WGMMA,),
    return_type=plgpu.ShapeDtypeStruct((C, SLAB), F32, layout=plgpu.Layout.WGMMA),
)(_slab_solve_body)


def _slab_solve_interpret(na):
    """Under the interpreter: the slab's blocks put on the diagonal of a [64, 64] tile, inverted by
    :func:`.solve._diag_solve_interpret` (the whole-tile path's own substitution, so the same bits), and
    taken back (each row's one nonzero block: a sum with exact zeros)."""
    x = _diag_solve_interpret(jnp.where(same_block(BLOCK), -jnp.tile(na, (1, NSLAB)), 0.0), None)
    return x.reshape(C, NSLAB, SLAB).sum(axis=1)


def slab_solve(na, interpret: bool):
    """``na`` fp32 [64, 16], finite: row block ``w`` holds ``-A``'s diagonal block ``w`` (strictly lower,
    zero on and above the diagonal) -> ``(I + A)``'s inverse on the same blocks. Exactly 0 above the
    diagonal without a mask: the substitution adds only ``0 * x_j`` there (x_j finite)."""
    return _slab_solve_interpret(na) if interpret else _SLAB_SOLVE(na)


STEPS = ("a", "solve", "merge", "store")  # each with the cumsum first


def intra_tile_slabs(k_ref, g_ref, gc_ref, beta_rows, beta_cols, ag_ref, bufs, lo, hi, dtype, interpret: bool,
                     zero=0.0, _upto: str = "store"):
    """One tile's ``gc`` and ``Ag`` for the tokens ``[lo, hi)`` (one sequence) of the tile.

    ``k_ref``: [64, K] 16-bit (swizzled) SMEM; ``g_ref``, ``beta_rows``, ``beta_cols``: fp32 [64] SMEM
    (the raw gates, beta twice); ``gc_ref``: fp32 [64] SMEM, receives the cumsum; ``ag_ref``: [64, 64]
    16-bit (swizzled) SMEM, receives ``Ag = (I + A)^-1 diag(beta)``, exactly 0 outside the sequence's
    rows and columns; ``bufs``: three plain [64, 64] 16-bit SMEM tiles (scratch). Returns the cumsum
    in the row and the column layout. Values of other sequences' tokens (possibly NaN) never meet this
    sequence's: they are selected away before any arithmetic that reaches it. ``zero``: the zero arm
    of the selects cast to 16 bits next (:func:`.common.opaque_zero`: one FSEL per element instead of
    LLVM's 16-bit select after the cast). ``_upto`` (a diagnostic: WRONG results otherwise): stop
    after that step of :data:`STEPS` (benchmarks/slab_micro.py times the prefixes).
    """
    if _upto not in STEPS:
        raise ValueError(f"_upto must be one of {STEPS}, got {_upto!r}")
    upto = STEPS.index(_upto)
    sl = (C, SLAB)
    buf_a, buf_x, buf_m = bufs
    # Every mask below is built from per-row and per-column vectors and, where it can be, from lo / hi:
    # whole-array iota masks are loop-invariant, and LLVM hoists them out of the tile loop, where the
    # prep warpgroup's 88 registers cannot hold them (ptx_local: hundreds of bytes of spills).
    rvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROWS)
    vr = (rvec >= lo) & (rvec < hi)
    blk = rvec // SLAB  # the row's 16-row block (its warp)
    with jax.named_scope("i_cumsum"):
        gam_r = seq_cumsum(g_ref, gc_ref, lo, hi)
    beta_r = rows(plgpu.load(beta_rows, layout=ROWS), sl)
    # A's mask, lo <= c < r < hi: (c - lo) <u bound(r), the bound 0 on rows outside [lo, hi)
    a_bound = rows(jnp.where(vr, rvec - lo, 0).astype(jnp.uint32), sl)

    def col_slab(ref, s):  # columns [16 s, 16 s + 16) of an fp32 [64] vector, in the column layout
        return plgpu.load(ref.at[pl.ds(s * SLAB, SLAB)], layout=COLS)

    def col_index(s):  # the slab's column (token) indices
        return plgpu.broadcasted_iota(jnp.int32, (SLAB,), 0, layout=COLS) + s * SLAB

    def on_block(s):  # rows of block s: warp s's rows (slab s holds its diagonal block)
        return rows(blk == s, sl)

    with jax.named_scope("i_a"):
        na = _zeros()
        for s in range(NSLAB):
            cs = pl.ds(s * SLAB, SLAB)
            kk = slab_mma(_zeros(), k_ref, k_ref.at[cs].T, dtype, interpret)  # K K^T's slab s
            mask = cols((col_index(s) - lo).astype(jnp.uint32), sl) < a_bound
            a = masked_decay(mask, kk * beta_r, rows(gam_r, sl) - cols(col_slab(gc_ref, s), sl))
            buf_a[:, cs] = jnp.where(rows(blk > s, sl), a, zero).astype(dtype)  # Ao: below the diagonal blocks
            na = jnp.where(on_block(s), -a, na)
    if upto == 0:
        buf_x[:, pl.ds(0, SLAB)] = na.astype(dtype)
        return gam_r, None
    with jax.named_scope("i_solve"):
        x0 = slab_solve(na, interpret)
        for s in range(NSLAB):
            buf_x[:, pl.ds(s * SLAB, SLAB)] = jnp.where(on_block(s), x0, zero).astype(dtype)
        plgpu.commit_smem()
    if upto == 1:
        return gam_r, None
    with jax.named_scope("i_merge"):
        for s in range(NSLAB):  # M = Ao X0: X0 is block diagonal, slab s is Ao[:, block s] X0[s, s]
            cs = pl.ds(s * SLAB, SLAB)
            m = slab_mma(_zeros(), buf_a.at[:, cs], buf_x.at[cs, cs], dtype, interpret)
            buf_m[:, cs] = m.astype(dtype)
        plgpu.commit_smem()
        z = [jnp.where(on_block(s), x0, 0.0) - slab_mma(_zeros(), buf_x, buf_m.at[:, pl.ds(s * SLAB, SLAB)],
                                                     dtype, interpret) for s in range(NSLAB)]
        for s in range(NSLAB):  # M^2 into Ao's tile (Ao was read by M, behind the barrier)
            cs = pl.ds(s * SLAB, SLAB)
            buf_a[:, cs] = slab_mma(_zeros(), buf_m, buf_m.at[:, cs], dtype, interpret).astype(dtype)
        plgpu.commit_smem()  # X0's tile and M's were read: Z into X0's
        for s in range(NSLAB):
            buf_x[:, pl.ds(s * SLAB, SLAB)] = z[s].astype(dtype)
        plgpu.commit_smem()
    if upto == 2:
        return gam_r, None
    with jax.named_scope("i_store"):
        for s in range(NSLAB):
            cs = pl.ds(s * SLAB, SLAB)
            x = z[s] + slab_mma(_zeros(), buf_x, buf_a.at[:, cs], dtype, interpret)
            cv = col_index(s)
            same = rows(vr, sl) & cols((cv >= lo) & (cv < hi), sl)
            buf_m[:, cs] = jnp.where(same, x * cols(col_slab(beta_cols, s), sl), zero).astype(dtype)
        plgpu.commit_smem()
        ag_ref[...] = plgpu.load(buf_m, layout=WG)  # into the swizzled tile the state warpgroups read
    return gam_r, plgpu.load(gc_ref, layout=COLS)
