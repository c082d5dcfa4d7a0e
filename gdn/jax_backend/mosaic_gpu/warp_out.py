"""An output tile from a state warpgroup's registers to global memory, each warp on its own.

``o^T`` [64 (V columns), 64 (tokens)], 16-bit, in the WGMMA layout: warp ``w`` holds V columns
``16 w .. 16 w + 15``, so the warp owns a [64 tokens, 16 columns] slab of ``o`` (32 bytes a token
row). The warp writes its slab transposed into its own 2 KiB of SMEM (four ``stmatrix.x4.trans``),
then reads it back 16 bytes a lane and stores 16 bytes a lane to global memory: each store
instruction writes 16 token rows x 32 bytes, whole 32-byte sectors. Only the warp synchronises
(``bar.warp.sync``): no proxy fence, no warpgroup barrier, no TMA issue or read wait on the state
chain, which the TMA store of the whole tile needs. The same bits as the TMA store on an H100,
and slower (the loop alone at 4x8192 0.377 vs 0.364 ms, benchmarks/mosaic_notes.md session 22).

SMEM slab layout, per warp: token ``t`` at byte ``32 t``; its 8-column half ``h`` in 16-byte chunk
``h ^ ((t >> 2) & 1)``, so the 8 rows of one ``stmatrix`` matrix (and the 16 rows of one read)
hit distinct banks.
"""
from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, nvvm

from .common import C

WARP_COLS = 16  # V columns of one warp in the WGMMA layout
SLAB_BYTES = C * WARP_COLS * 2  # one warp's [64, 16] 16-bit slab


def slab_offset(tok, half):
    """Byte offset of (token, 8-column half) in a warp's slab (the swizzle above)."""
    return tok * 32 + (half ^ ((tok >> 2) & 1)) * 16


def stmatrix_row(lane, s: int):
    """(token, half) of the slab row whose address ``lane`` gives to ``stmatrix.x4.trans`` number
    ``s``: that instruction stores the 8x8 fragment matrices ``m`` = 0..3 of (n = 2 s + m // 2,
    h = m % 2) (o^T's rows 8 h .. 8 h + 7 of the warp, columns 8 n .. 8 n + 7), and lanes
    ``8 m + k`` address row ``k`` of matrix ``m`` transposed: token ``8 n + k``, columns of ``h``."""
    m = lane // 8
    return (m // 2) * 8 + lane % 8 + 16 * s, m % 2


def read_row(lane, i: int):
    """(token, half) that ``lane`` reads from the slab (and stores to global memory) in read ``i``:
    tokens ``16 i .. 16 i + 15``, two lanes a token."""
    return lane // 2 + 16 * i, lane % 2


STEP = 16 * 32  # the 16 tokens between two instructions, in slab bytes (the swizzle bit is a lane's)


def stmatrix_offset(lane, s: int):
    """:func:`slab_offset` of :func:`stmatrix_row`, as the kernel computes it: a lane's offset of
    instruction 0 plus a constant (tokens 16 apart share the swizzle bit)."""
    return slab_offset(*stmatrix_row(lane, 0)) + STEP * s


def read_offset(lane, i: int):
    """:func:`slab_offset` of :func:`read_row` as the kernel computes it (as :func:`stmatrix_offset`)."""
    return slab_offset(*read_row(lane, 0)) + STEP * i


class _I32:
    """An i32 MLIR value with the integer operators the index functions above use (unsigned), so
    the kernel and the NumPy emulation in the tests run the same index code."""

    def __init__(self, v):
        self.v = v


def _binary(f):
    def op(self, o):
        return _I32(f(self.v, o.v if isinstance(o, _I32) else mu.c(o, ir.IntegerType.get_signless(32))))
    return op


for _name, _f in (("add", arith.addi), ("mul", arith.muli), ("floordiv", arith.divui), ("mod", arith.remui),
                  ("rshift", arith.shrui), ("and", arith.andi), ("xor", arith.xori)):
    setattr(_I32, f"__{_name}__", _binary(_f))
_I32.__radd__, _I32.__rmul__ = _I32.__add__, _I32.__mul__


def _warp_out_body(ctx, o_t, stage_ref, dst_ref):
    """``o_t``: o^T [64, 64] 16-bit WGMMA layout; ``stage_ref``: >= 8 KiB of SMEM (warp ``w`` uses
    bytes ``[2048 w, 2048 (w + 1))``); ``dst_ref``: the [64 tokens, 64 columns] global window."""
    del ctx
    i32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
    regs = o_t.registers
    if regs.shape != (1, 8, 1, 1, 2, 1, 1, 1, 1) or o_t.shape != (64, C):
        raise NotImplementedError(f"warp_out needs a [64, 64] WGMMA array, got {o_t.shape} {regs.shape}")
    strides, _ = ir.MemRefType(dst_ref.type).get_strides_and_offset()
    if strides[-1] != 1 or strides[0] == ir.ShapedType.get_dynamic_stride_or_offset():
        raise NotImplementedError(f"warp_out needs a static row stride and unit columns, got {strides}")
    tid = _I32(mu.thread_idx()) % 128
    warp, lane = tid // 32, tid % 32
    slab = warp * SLAB_BYTES
    smem = mu.memref_ptr(stage_ref)

    def at(lane_off, const: int):  # the constant last: an immediate of the instruction
        return mu.getelementptr(mu.getelementptr(smem, [(slab + lane_off).v], i8), [const], i8)

    mu.warp_barrier()  # the warp's reads of the previous tile are done (they fed its stores)
    st_off = stmatrix_offset(lane, 0)
    for s in range(4):
        vals = [mu.bitcast(regs[0, 2 * s + m // 2, 0, 0, m % 2, 0, 0, 0, 0], i32) for m in range(4)]
        nvvm.stmatrix(at(st_off, STEP * s), vals, nvvm.MMALayout.col,
                      ir.Attribute.parse("#nvvm.ld_st_matrix_shape<m=8, n=8>"), nvvm.LdStMatrixEltType.B16)
    mu.warp_barrier()  # the slab written by all lanes -> readable by all lanes
    row_bytes = strides[0] * 2
    tok, half = read_row(lane, 0)
    gmem = llvm.addrspacecast(llvm.PointerType.get(1), mu.memref_ptr(dst_ref))
    g_lane = mu.getelementptr(gmem, [(tok * row_bytes + warp * (2 * WARP_COLS) + half * 16).v], i8)
    rd_off = read_offset(lane, 0)
    v4 = ir.VectorType.get([4], i32)
    for i in range(4):
        val = llvm.load(v4, at(rd_off, STEP * i), alignment=16)
        llvm.store(val, mu.getelementptr(g_lane, [16 * i * row_bytes], i8), alignment=16)
    return None


warp_out = plgpu.inline_mgpu(
    arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
)(_warp_out_body)
"""``warp_out(o_t, stage_ref, dst_ref)``: see :func:`_warp_out_body` (GPU only; the interpreter
stores ``dst_ref.T[...] = o_t`` instead)."""
