"""The 64x64 unit-lower-triangular inverse of one tile, ``X = (I + A)^-1``, for the intra kernel.

Blocked like FLA's solve_tril: the four 16x16 diagonal blocks are inverted in IEEE fp32 on the CUDA
cores (forward substitution, one column per thread, :func:`diag_block_inverse`); the blocks are then
merged 16 -> 32 -> 64 on the tensor cores with ``X <- X - X (L X)``, ``L`` the strictly lower
off-diagonal block of ``A`` at that level (:func:`merge`). The merges take 16-bit operands (FLA
merges in its input dtype too); everything else is fp32.

Under the Mosaic GPU interpreter (which cannot run the raw MLIR of the substitution) the diagonal
blocks are inverted with ``jax.scipy.linalg.solve_triangular`` instead; the merges are the same code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector
from jaxlib.mlir.dialects import math as mlir_math

from .common import C, F32, WG, cols, iota, masked_exp, mm, rows

BLOCK = 16


@plgpu.inline_mgpu(
    arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
    return_type=plgpu.ShapeDtypeStruct((C, C), F32, layout=plgpu.Layout.WGMMA),
)
def _diag_solve_mgpu(ctx, na_t, na_ref, x_ref):
    """Thread t < 64 of the warpgroup solves column t of its 16x16 diagonal block.

    ``na_t`` holds ``-A^T`` on the diagonal blocks (zero elsewhere), so row j of ``na_ref`` is column
    j of ``-A``: right-looking substitution ``r = e_c; x_j = r_j; r_i += (-A_ij) x_j (i > j)`` reads
    one row segment per step, the same address for the 16 threads of a block (a broadcast). Steps
    above the thread's column run on zeros (``x_j = 0`` there), so all threads run the same
    unrolled code. Only the diagonal blocks of ``x_ref`` are written; the caller masks the rest.
    """
    del ctx
    na_t.store_untiled(na_ref, optimized=False)
    f32 = ir.F32Type.get()
    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    vec4 = ir.VectorType.get([4], f32)
    c = mu.c
    mu.warpgroup_barrier()
    tid = arith.remui(mu.thread_idx(), c(128, i32))
    base_i = arith.muli(arith.divui(tid, c(BLOCK, i32)), c(BLOCK, i32))
    within = arith.remui(tid, c(BLOCK, i32))
    col = arith.index_cast(index, tid)
    base = arith.index_cast(index, base_i)
    one, zero = c(1.0, f32), c(0.0, f32)
    with mu.when(arith.cmpi(arith.CmpIPredicate.ult, tid, c(C, i32))):
        r = [arith.select(arith.cmpi(arith.CmpIPredicate.eq, within, c(i, i32)), one, zero)
             for i in range(BLOCK)]
        for j in range(BLOCK):
            x_j = r[j]
            memref.store(x_j, x_ref, [arith.addi(base, c(j, index)), col])
            row = arith.addi(base, c(j, index))
            for i0 in range((j + 1) // 4 * 4, BLOCK, 4):
                seg = vector.load(vec4, na_ref, [row, arith.addi(base, c(i0, index))])
                for d in range(4):
                    i = i0 + d
                    if i > j:
                        a = vector.extract(seg, dynamic_position=[],
                                           static_position=ir.DenseI64ArrayAttr.get([d]))
                        r[i] = mlir_math.fma(a, x_j, r[i])
    mu.warpgroup_barrier()
    return mgpu.FragmentedArray.load_untiled(x_ref, layout=mgpu.WGMMA_LAYOUT, optimized=False)


def same_block(size: int):
    r, c = iota((C, C), 0), iota((C, C), 1)
    return (r // size) == (c // size)


def diag_block_inverse(a_lower, na_t, na_ref, x_ref, *, interpret):
    """Inverse of ``I + A`` on each 16x16 diagonal block (zero elsewhere), fp32 WGMMA layout.

    ``a_lower``: strictly lower ``A`` (only used by the interpreter path); ``na_t``: ``-A^T`` on the
    diagonal blocks (the GPU path). ``na_ref``, ``x_ref``: [64, 64] fp32 SMEM scratch.
    """
    blk = same_block(BLOCK)
    if interpret:
        eye = jnp.where(iota((C, C), 0) == iota((C, C), 1), 1.0, 0.0)
        m = eye + jnp.where(blk, a_lower, 0.0)
        x = jax.scipy.linalg.solve_triangular(m, eye, lower=True)
    else:
        x = _diag_solve_mgpu(na_t, na_ref, x_ref)
    return jnp.where(blk & (iota((C, C), 0) >= iota((C, C), 1)), x, 0.0)


def merge(x, a_lower, lo_smem, dtype):
    """``(I + A)^-1`` from its 16x16 diagonal-block inverse ``x`` (fp32), merging 16 -> 32 -> 64.

    ``lo_smem``: a [64, 64] 16-bit tile (swizzled) for the right-hand operands.
    """
    r, c = iota((C, C), 0), iota((C, C), 1)
    for size in (2 * BLOCK, 4 * BLOCK):
        half = size // 2
        off = ((r // size) == (c // size)) & (r % size >= half) & (c % size < half)
        link = jnp.where(off, a_lower, 0.0).astype(dtype)
        lo_smem[...] = x.astype(dtype)
        plgpu.commit_smem()
        lx = mm(link, lo_smem, (C, C))  # L X
        lo_smem[...] = lx.astype(dtype)
        plgpu.commit_smem()
        x = x - mm(x.astype(dtype), lo_smem, (C, C))  # X - X (L X)
    return x


def decayed_a(kk, gr, gcc, beta_row, beta_col, same, r, c, sq, interp: bool):
    """(a_low, na_t): the decayed strictly lower A of one tile and what diag_block_inverse needs.

    a_low[i, j] = beta_i (k_i . k_j) exp(gam_i - gam_j) for i > j in one sequence; na_t holds
    -A^T on the 16x16 diagonal blocks (None under the interpreter, which solves from a_low).
    ``kk`` = K K^T (symmetric), ``gr`` / ``gcc`` the cumsum broadcast along rows / columns.
    """
    a_low = kk * rows(beta_row, sq) * masked_exp((r > c) & same, gr - gcc)
    if interp:
        return a_low, None
    up = (c > r) & same & same_block(BLOCK)
    return a_low, -(kk * cols(beta_col, sq) * masked_exp(up, gcc - gr))
