"""The 64x64 unit-lower-triangular inverse of one tile, ``X = (I + A)^-1``, for the intra kernel.

Blocked like FLA's solve_tril: the four 16x16 diagonal blocks are inverted in IEEE fp32 on the CUDA
cores (forward substitution, one column per thread through SMEM, :func:`diag_block_inverse`, or one
warp per block in registers, :func:`warp_solve_steps`); the blocks are then
merged on the tensor cores, either 16 -> 32 -> 64 with ``X <- X - X (L X)``, ``L`` the strictly
lower off-diagonal block of ``A`` at that level (:func:`merge`, four dependent products), or all at
once as ``X0 (I - M)(I + M^2)`` with ``M = Ao X0`` (:func:`merge_chain`, three dependent product
groups; the intra kernel's default). The merges take 16-bit operands (FLA merges in its input dtype
too); everything else is fp32.

Under the Mosaic GPU interpreter (which cannot run the raw MLIR of the substitution) the diagonal
blocks are inverted by the same substitution written with jnp; the merges are the same code.

Sequences sharing a tile (the intra kernels' ``same`` / ``seg``): ``A`` is block diagonal per
sequence, and so is its inverse, but a NaN / inf in one sequence's block would still reach its
neighbours through the zeros of the other blocks (``0 * NaN = NaN`` inside the substitution and the
merge products). So every value that is exactly zero in exact arithmetic because two tokens belong
to different sequences is made zero by a SELECT: the substitution's ``x_j`` of a row of another
sequence than the column, and every merge product (``L X``, ``X - X (L X)``; ``M``, ``M^2``,
``X0 M``, ``Z M^2``). A clean sequence's
rows then see the same operands, bit for bit, whatever its neighbours hold (docs/RELIABILITY.md §2).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, nvvm, vector
from jaxlib.mlir.dialects import math as mlir_math

from .common import C, F32, cols, iota, masked_decay, mm, products, rows

BLOCK = 16


def _diag_solve_mgpu(with_seg: bool, from_columns: bool):
    """The inline-MLIR substitution (see :func:`_diag_solve_body`); ``with_seg`` adds the seg ref;
    ``from_columns``: the operand is ``-A`` (not ``-A^T``), read a column at a time."""
    refs = (plgpu.RefType(), plgpu.RefType()) + ((plgpu.RefType(),) if with_seg else ())
    body = _diag_solve_body
    if from_columns:
        def body(ctx, *args):
            return _diag_solve_body(ctx, *args, from_columns=True)
    return plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,) + refs,
        return_type=plgpu.ShapeDtypeStruct((C, C), F32, layout=plgpu.Layout.WGMMA),
    )(body)


def _diag_solve_body(ctx, na_t, na_ref, x_ref, seg_ref=None, from_columns: bool = False):
    """Thread t < 64 of the warpgroup solves column t of its 16x16 diagonal block.

    ``na_t`` holds ``-A^T`` on the diagonal blocks (zero elsewhere), so row j of ``na_ref`` is column
    j of ``-A``: right-looking substitution ``r = e_c; x_j = r_j; r_i += (-A_ij) x_j (i > j)`` reads
    one row segment per step, the same address for the 16 threads of a block (a broadcast). Steps
    above the thread's column run on zeros (``x_j = 0`` there), so all threads run the same
    unrolled code. Only the diagonal blocks of ``x_ref`` are written; the caller masks the rest.
    With ``seg_ref`` (int32 [64] sequence ids of the tile's tokens) ``x_j`` is selected to 0 where
    token j is of another sequence than column t: ``-A_ij`` is 0 there, but a NaN ``r_j`` (a
    poisoned neighbour's block times this column's zeros) would make ``0 * NaN``. 16 selects a
    thread; the ids are read once. ``from_columns``: ``na_t`` holds ``-A`` itself (lower diagonal
    blocks), and step j reads column j of the block with scalar loads (the same address for a block's
    16 threads, conflict-free across blocks with padded rows) instead of a row of ``-A^T``: the caller
    then needs no second, transposed decay ``exp(gc_c - gc_r)``.
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
        if seg_ref is not None:
            seg_col = memref.load(seg_ref, [col])
        for j in range(BLOCK):
            row = arith.addi(base, c(j, index))
            x_j = r[j]
            if seg_ref is not None:
                same = arith.cmpi(arith.CmpIPredicate.eq, memref.load(seg_ref, [row]), seg_col)
                x_j = arith.select(same, x_j, zero)
            memref.store(x_j, x_ref, [row, col])
            if from_columns:
                for i in range(j + 1, BLOCK):
                    a = memref.load(na_ref, [arith.addi(base, c(i, index)), row])
                    r[i] = mlir_math.fma(a, x_j, r[i])
                continue
            for i0 in range((j + 1) // 4 * 4, BLOCK, 4):
                part = vector.load(vec4, na_ref, [row, arith.addi(base, c(i0, index))])
                for d in range(4):
                    i = i0 + d
                    if i > j:
                        a = vector.extract(part, dynamic_position=[],
                                           static_position=ir.DenseI64ArrayAttr.get([d]))
                        r[i] = mlir_math.fma(a, x_j, r[i])
    mu.warpgroup_barrier()
    return mgpu.FragmentedArray.load_untiled(x_ref, layout=mgpu.WGMMA_LAYOUT, optimized=False)


_DIAG_SOLVE = {(seg, cols_): _diag_solve_mgpu(seg, cols_) for seg in (False, True) for cols_ in (False, True)}


def warp_solve_steps(ops, na, seg_rows=None, seg_of=None, seg_cols=None):
    """Forward substitution of one warp's 16x16 diagonal block, in registers (``solve="warp"``).

    In the WGMMA layout warp ``w`` holds rows ``16 w .. 16 w + 15`` of a [64, 64] array: lane ``l``
    has rows ``q = l // 4`` and ``8 + q`` of the block (``h`` = 0, 1) and, in each of the block's
    two 8-column groups ``jb``, columns ``8 jb + 2 (l % 4) + e`` (``e`` = 0, 1), the m16n8
    accumulator fragment of ``mma.sync``. ``na[h][jb][e]``: this lane's entries of ``-A``'s
    diagonal block (strictly lower; zero on and above the diagonal). Returns ``x[h][jb][e]``, the
    same entries of ``(I + A)^-1``. Step ``j``: rows ``i > j`` take ``x_i += (-A_ij) x_j``, in the
    order and with the fma of :func:`_diag_solve_body` (the same bits expected; not yet run on a
    GPU). Row ``j`` comes from its quad by four shuffles, ``-A_ij`` from this lane's quad by two;
    no SMEM, no barrier.
    ``seg_rows`` (``[h]``, the sequence ids of this lane's rows), ``seg_of(j)`` (block row
    ``j``'s) and ``seg_cols`` (``[jb][e]``, its columns'): a tile shared by sequences keeps
    ``x_i`` where row ``j`` is of another sequence (``-A_ij`` is 0 there, but ``x_j`` may be NaN:
    module docstring), and returns exact zeros across sequences (a NaN row times a zero column
    is NaN; the SMEM substitution stores its selected ``x_j`` for the same reason).

    ``ops`` builds the arithmetic: :class:`_MlirLanes` (the kernel) or a NumPy emulation of the
    128 lanes (tests/test_mosaic_gpu.py, which checks the lane arithmetic on the CPU).
    """
    lane = ops.lane
    q, p = ops.idiv(lane, 4), ops.irem(lane, 4)
    one, zero = ops.f32(1.0), ops.f32(0.0)
    x = [[[ops.select(ops.ieq(ops.iadd(q, 8 * h), ops.iadd(ops.imul(p, 2), 8 * jb + e)), one, zero)
           for e in range(2)] for jb in range(2)] for h in range(2)]
    for j in range(BLOCK):
        half = j // 8  # row j's h, and column j's jb
        src_x = ops.iadd(p, 4 * (j % 8))  # the lane of row j's quad with this lane's columns
        xj = [[ops.shfl(x[half][jb][e], src_x) for e in range(2)] for jb in range(2)]
        src_a = ops.iadd(ops.imul(q, 4), (j % 8) // 2)  # the lane of this quad that holds column j
        for h in range(2):
            a = ops.shfl(na[h][half][j % 2], src_a)
            keep = None if seg_rows is None else ops.ieq(seg_rows[h], seg_of(j))
            for jb in range(2):
                for e in range(2):
                    upd = ops.fma(a, xj[jb][e], x[h][jb][e])
                    x[h][jb][e] = upd if keep is None else ops.select(keep, upd, x[h][jb][e])
    if seg_rows is not None:
        x = [[[ops.select(ops.ieq(seg_rows[h], seg_cols[jb][e]), x[h][jb][e], zero) for e in range(2)]
              for jb in range(2)] for h in range(2)]
    return x


def vec_elem(vec, e: int):
    """Element ``e`` of one register vector of a FragmentedArray (MLIR)."""
    return vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e]))


class _MlirLanes:
    """:func:`warp_solve_steps`'s operations as MLIR (i32 lane arithmetic, f32 values)."""

    def __init__(self, lane):
        self.lane = lane
        self.i32 = ir.IntegerType.get_signless(32)
        self.f32t = ir.F32Type.get()

    def _c(self, v):
        return v if isinstance(v, ir.Value) else mu.c(v, self.i32)

    def f32(self, v):
        return mu.c(v, self.f32t)

    def idiv(self, a, b):
        return arith.divui(self._c(a), self._c(b))

    def irem(self, a, b):
        return arith.remui(self._c(a), self._c(b))

    def iadd(self, a, b):
        return arith.addi(self._c(a), self._c(b))

    def imul(self, a, b):
        return arith.muli(self._c(a), self._c(b))

    def ieq(self, a, b):
        return arith.cmpi(arith.CmpIPredicate.eq, self._c(a), self._c(b))

    def select(self, c, a, b):
        return arith.select(c, a, b)

    def fma(self, a, b, c):
        return mlir_math.fma(a, b, c)

    def shfl(self, v, src):
        return nvvm.shfl_sync(self._c(0xFFFFFFFF), v, self._c(src), self._c(0x1F), nvvm.ShflKind.idx)


def _warp_solve_body(ctx, na_t, seg_ref=None):
    """:func:`warp_solve_steps` on ``na_t`` (``-A`` on the diagonal blocks, WGMMA layout, fp32):
    each warp takes its block's registers (selected by the warp index), solves, and puts ``X``
    back on the diagonal blocks (zero elsewhere)."""
    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    index = ir.IndexType.get()
    tid = arith.remui(mu.thread_idx(), mu.c(128, i32))
    lane, warp = arith.remui(tid, mu.c(32, i32)), arith.divui(tid, mu.c(32, i32))
    regs = na_t.registers
    assert regs.shape == (1, 8, 1, 1, 2, 1, 1, 1, 1), regs.shape  # [n-group of 8 columns][h]

    def reg(n, h):
        return regs[0, n, 0, 0, h, 0, 0, 0, 0]

    is_warp = [arith.cmpi(arith.CmpIPredicate.eq, warp, mu.c(k, i32)) for k in range(4)]
    na = []
    for h in range(2):
        row = []
        for jb in range(2):
            v = reg(jb, h)
            for k in range(1, 4):
                v = arith.select(is_warp[k], reg(2 * k + jb, h), v)
            row.append([vec_elem(v, e) for e in range(2)])
        na.append(row)
    ops = _MlirLanes(lane)
    seg_rows = seg_of = seg_cols = None
    if seg_ref is not None:
        base = arith.muli(warp, mu.c(BLOCK, i32))
        q, p2 = arith.divui(lane, mu.c(4, i32)), arith.muli(arith.remui(lane, mu.c(4, i32)), mu.c(2, i32))

        def seg_at(off):  # the sequence id of the block's token ``off`` (an i32 value)
            return memref.load(seg_ref, [arith.index_cast(index, arith.addi(base, off))])

        seg_rows = [seg_at(arith.addi(q, mu.c(8 * h, i32))) for h in range(2)]
        seg_cols = [[seg_at(arith.addi(p2, mu.c(8 * jb + e, i32))) for e in range(2)] for jb in range(2)]

        def seg_of(j):
            return seg_at(mu.c(j, i32))
    x = warp_solve_steps(ops, na, seg_rows, seg_of, seg_cols)
    vec2 = ir.VectorType.get([2], f32)
    zero = mu.c(0.0, f32)
    out = np.empty_like(regs)
    for n in range(8):
        for h in range(2):
            vals = [arith.select(is_warp[n // 2], x[h][n % 2][e], zero) for e in range(2)]
            out[0, n, 0, 0, h, 0, 0, 0, 0] = vector.from_elements(vec2, vals)
    return mgpu.FragmentedArray(_registers=out, _layout=na_t.layout, _is_signed=None)


def _warp_solve_mgpu(with_seg: bool):
    refs = (plgpu.RefType(),) if with_seg else ()
    return plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,) + refs,
        return_type=plgpu.ShapeDtypeStruct((C, C), F32, layout=plgpu.Layout.WGMMA),
    )(_warp_solve_body)


_WARP_SOLVE = {seg: _warp_solve_mgpu(seg) for seg in (False, True)}


def _diag_solve_interpret(a_lower, same):
    """The substitution of :func:`_diag_solve_body` in jnp, all 64 columns at once (interpreter).

    Step j: ``x_j`` of column c is row ``base(c) + j`` of the right-hand sides (selected to 0 where
    that token is not of column c's sequence), and ``r_i -= A[i, base(i) + j] x_j`` for the rows
    i > j of the same 16-block (``base(i) = base(c)`` there, so the factor is one value per row).
    Row ``base(c) + j`` is final once step j read it, so ``x`` is the result, selected, at the end.
    """
    r, c = iota((C, C), 0), iota((C, C), 1)
    keep = same_block(BLOCK) if same is None else same_block(BLOCK) & same
    res = jnp.where(r == c, 1.0, 0.0)
    for j in range(BLOCK):
        x_j = jnp.where(keep & (r % BLOCK == j), res, 0.0).sum(axis=0)  # one term per column: exact
        a_j = jnp.where(c == (r // BLOCK) * BLOCK + j, a_lower, 0.0).sum(axis=1)  # A[i, base(i) + j]
        below = same_block(BLOCK) & (r % BLOCK > j)
        res = res - jnp.where(below, rows(a_j, (C, C)) * cols(x_j, (C, C)), 0.0)
    return jnp.where(keep, res, 0.0)


def same_block(size: int):
    r, c = iota((C, C), 0), iota((C, C), 1)
    return (r // size) == (c // size)


def diag_block_inverse(a_lower, na_t, na_ref, x_ref, *, interpret, same=None, seg_ref=None,
                       from_columns: bool = False, warp: bool = False):
    """Inverse of ``I + A`` on each 16x16 diagonal block (zero elsewhere), fp32 WGMMA layout.

    ``a_lower``: strictly lower ``A`` (only used by the interpreter path); ``na_t``: ``-A^T`` on the
    diagonal blocks (the GPU path). ``na_ref``, ``x_ref``: [64, 64] fp32 SMEM scratch. For a tile
    shared by several sequences (some possibly NaN), ``same`` ([64, 64] bool, interpreter) and
    ``seg_ref`` (SMEM int32 [64] sequence ids, GPU) keep every entry across two sequences exactly 0
    (module docstring); without them the tile must be finite wherever it is read.
    ``from_columns``: ``na_t`` is ``-A`` on the diagonal blocks instead (:func:`_diag_solve_body`).
    ``warp`` (needs ``from_columns``): each warp solves its block in registers
    (:func:`warp_solve_steps`); ``na_ref`` / ``x_ref`` are not used and may be None.
    """
    blk = same_block(BLOCK)
    if warp and not from_columns:
        raise ValueError("the warp solve reads -A (from_columns=True)")
    if interpret:
        x = _diag_solve_interpret(a_lower, same)
    elif warp:
        x = _WARP_SOLVE[seg_ref is not None](na_t, *(() if seg_ref is None else (seg_ref,)))
    else:
        refs = (na_ref, x_ref) if seg_ref is None else (na_ref, x_ref, seg_ref)
        x = _DIAG_SOLVE[seg_ref is not None, from_columns](na_t, *refs)
    return jnp.where(blk & (iota((C, C), 0) >= iota((C, C), 1)), x, 0.0)


def merge_chain(x0, a_lower, buf_a, buf_b, dtype, same=None):
    """``(I + A)^-1`` from its 16x16 diagonal-block inverse ``x0`` (fp32) in three dependent product
    groups instead of :func:`merge`'s four.

    With ``A = Ad + Ao`` (16x16 diagonal blocks, strictly block-lower rest) and ``X0 = (I + Ad)^-1``:
    ``I + A = (I + M)(I + Ad)`` with ``M = Ao X0``, strictly block-lower over 4 block rows, so
    ``M^4 = 0`` and ``(I + A)^-1 = X0 (I - M)(I + M^2)``: ``M = Ao X0``; then ``M^2`` and ``X0 M``
    together (both read ``M`` from SMEM, one wait); ``Z = X0 - X0 M``; ``X = Z + Z M^2``. Operands are
    rounded to ``dtype`` as in :func:`merge`. ``buf_a``, ``buf_b``: [64, 64] 16-bit swizzled tiles.
    ``same``: every product selected by it (the NaN isolation of the module docstring).
    """
    keep = (lambda y: y) if same is None else (lambda y: jnp.where(same, y, 0.0))
    ao = block_lower(a_lower, dtype)
    x16 = x0.astype(dtype)
    buf_a[...] = x16
    plgpu.commit_smem()
    m = keep(mm(ao, buf_a, (C, C)))  # M = Ao X0
    m16 = m.astype(dtype)
    buf_b[...] = m16
    plgpu.commit_smem()
    m2, xm = products(((C, C), None, ((m16, buf_b),)), ((C, C), None, ((x16, buf_b),)))
    z = keep(x0 - keep(xm))  # X0 (I - M)
    buf_a[...] = keep(m2).astype(dtype)  # buf_a's X0 was read by the first product, which was waited for
    plgpu.commit_smem()
    return keep(z + mm(z.astype(dtype), buf_a, (C, C)))  # Z (I + M^2)


def block_lower(a_lower, dtype):
    """``A``'s strictly block-lower part (below the 16x16 diagonal blocks) in ``dtype``: the ``Ao`` of
    :func:`merge_chain` / :func:`merge_chain_lean`."""
    r, c = iota((C, C), 0), iota((C, C), 1)
    return jnp.where((r // BLOCK) > (c // BLOCK), a_lower, 0.0).astype(dtype)


def merge_chain_lean(x0, ao_ref, x_ref, dtype):
    """:func:`merge_chain` for a warpgroup short of registers: the same products, roundings and bits,
    one at a time, every 16-bit operand in SMEM, so at most two fp32 [64, 64] arrays are live (``X0``
    and one accumulator) instead of four. ``ao_ref`` holds :func:`block_lower` on entry (then ``M``,
    then it is free); ``x_ref`` is scratch; both [64, 64] 16-bit swizzled tiles. No ``same``: the
    caller's ``A`` is 0 across sequences and finite (one sequence per CTA)."""
    x_ref[...] = x0.astype(dtype)
    plgpu.commit_smem()
    m16 = mm(ao_ref, x_ref, (C, C)).astype(dtype)  # M = Ao X0 (waited: ao_ref is free)
    ao_ref[...] = m16
    plgpu.commit_smem()
    z = x0 - mm(x_ref, ao_ref, (C, C))  # X0 (I - M)
    # M^2: its left operand reloaded to registers (Mosaic lays out no product of one SMEM tile by itself)
    m2 = mm(plgpu.load(ao_ref, layout=plgpu.Layout.WGMMA), ao_ref, (C, C))
    x_ref[...] = m2.astype(dtype)  # X0's copy was read by the product before
    plgpu.commit_smem()
    return z + mm(z.astype(dtype), x_ref, (C, C))  # Z (I + M^2)


def merge(x, a_lower, lo_smem, dtype, same=None):
    """``(I + A)^-1`` from its 16x16 diagonal-block inverse ``x`` (fp32), merging 16 -> 32 -> 64.

    ``lo_smem``: a [64, 64] 16-bit tile (swizzled) for the right-hand operands. ``same`` ([64, 64]
    bool, tokens of one sequence): both products are selected by it, so a NaN block of one sequence
    never reaches another through the zeros of the block structure (module docstring; a select on
    fp32 registers, 32 per thread, twice per level).
    """
    r, c = iota((C, C), 0), iota((C, C), 1)
    keep = (lambda y: y) if same is None else (lambda y: jnp.where(same, y, 0.0))
    for size in (2 * BLOCK, 4 * BLOCK):
        half = size // 2
        off = ((r // size) == (c // size)) & (r % size >= half) & (c % size < half)
        link = jnp.where(off, a_lower, 0.0).astype(dtype)
        lo_smem[...] = x.astype(dtype)
        plgpu.commit_smem()
        lx = keep(mm(link, lo_smem, (C, C)))  # L X
        lo_smem[...] = lx.astype(dtype)
        plgpu.commit_smem()
        x = keep(x - mm(x.astype(dtype), lo_smem, (C, C)))  # X - X (L X)
    return x


def decayed_a(kk, gr, gcc, beta_row, beta_col, same, r, c, sq, interp: bool, from_columns: bool = False):
    """(a_low, na_t): the decayed strictly lower A of one tile and what diag_block_inverse needs.

    a_low[i, j] = beta_i (k_i . k_j) exp(gam_i - gam_j) for i > j in one sequence; na_t holds
    -A^T on the 16x16 diagonal blocks (None under the interpreter, which solves from a_low), or
    with ``from_columns`` -A there (a select of a_low: no second exponential).
    ``kk`` = K K^T (symmetric), ``gr`` / ``gcc`` the cumsum broadcast along rows / columns;
    ``same``: [64, 64] bool, tokens of one sequence, or None for a tile of one sequence.
    """
    # selects, not products with a mask: kk, beta or the cumsum of another sequence may be NaN / inf
    a_low = masked_decay(r > c if same is None else (r > c) & same, kk * rows(beta_row, sq), gr - gcc)
    if interp:
        return a_low, None
    if from_columns:
        return a_low, jnp.where(same_block(BLOCK), -a_low, 0.0)
    up = (c > r) & same_block(BLOCK) if same is None else (c > r) & same & same_block(BLOCK)
    return a_low, -masked_decay(up, kk * cols(beta_col, sq), gcc - gr)
