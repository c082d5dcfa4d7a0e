"""The exact split's scan as one kernel: every piece's true start state from pass 1's affine maps.

Pass 1 of the two-pass split gives each piece its end state from a zero start, ``E`` [K, V], and
its map ``M`` [K, K] (``S_end = M S_start + E``; a sequence's first piece has its initial state in
``E``). The scan walks each sequence's pieces in order::

    s = E[first piece]
    for each later piece p:  start[p] = s;  s = M[p] s + E[p]

In XLA (:func:`gdn.jax_backend.mosaic_gpu.split.scan_starts`, the reference) every step is a few
kernels (gathers, a batched fp32 GEMM, a select) over all sequences at once: ~13 us a step on the
H200 at HV = 32 (call h1: 0.203 ms for 15 steps), launch-bound at tensor-parallel head counts.
Here one program per (sequence with several pieces, v head, V tile of ``BV`` columns) keeps ``s``
[K, BV] fp32 in registers for the whole walk and reads each ``M`` once per tile (the V tiles of a
head run side by side and share it in L2): one launch, no HBM round trip of ``s`` between steps.
Products in tf32x3 (three TF32 tensor-core products, fp32 accuracy; IEEE fp32 in the interpreter)
with 8 warps: the Triton backend's twin (gdn/triton_backend/scan.py) compiled for sm_90 so with
84 B of register spills per thread at K = 128, an IEEE fp32 dot with 3 KB. The pieces that no
scan step reaches (first pieces, sequences of one piece, padding) keep ``start0``'s rows (aliased
to the output).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .kernel_utils import (compiler_params, dim_tile, grid_of, iota, load, pl, program_ids, sdot,
                           sm_count, solve_precision, store, tiles)

#: launch overrides of :func:`scan_starts` over :func:`scan_tiles` (keys BV, num_warps, order).
TILES: dict = {}


def scan_tiles(rows: int, hv: int, v: int, sms: int) -> dict:
    """Launch meta: BV = :func:`gdn.split.scan_columns` V columns per program (clamped to V's
    tile), 8 warps, Triton's software pipelining off (num_stages 1), the walk on ``S^T``
    (``transposed``: ``S^T M^T + E^T``, S^T the left operand, so Triton emits mma.sync instead of
    wgmma), the Triton program order. Swept on an H100 (benchmarks/scan_sweep.py, 2/4 1x32768 in
    16 pieces, 2026-12-06): the walk on S 53 us, on S^T 43.6 us (same values: 1.7e-6 relative rms
    from the XLA scan at HIGHEST either way; 4/8 1x8192: 24.3 -> 20.0 us); on S^T with 4 warps 52.7,
    BV 32 62.8. On S: num_stages 2 or 3 73 us; 4 warps 132 us; BV 32 59 us; IEEE fp32 dots 474 us
    (spills); the next piece's M and E loaded into registers during this piece's product 52.7 us
    (not kept). ``precision`` (the products' algorithm, a sweep key): "tf32x3" (default), "bf16x3"
    46.5 us on S (9.4e-6), "bf16x6" 72.8 us (6.7e-7), "tf32" 32.5 us on S^T (6.3e-4: too coarse for
    the exact split). One TF32 product still leaves ~2 us a step: most of a step is latency, not
    the product's arithmetic. A two-level walk (pairs of maps composed in parallel, then a walk
    over the pairs) was built and timed in session 19 and dropped: at 16 pieces 38.0 us against
    43.7, at 8 pieces 25.4 against 20.0; the parallel launches are bound by HBM (the pair products
    read and write [E | M], 16 MB at 2/4 1x32768) and cost what the shorter chain saves
    (benchmarks/mosaic_notes.md, session 19)."""
    from ...split import scan_columns

    return tiles(dict(BV=min(scan_columns(rows, hv, v, sms), dim_tile(v)), num_warps=8, num_stages=1,
                      precision="tf32x3", transposed=True, order="triton"), TILES, "scan")


def scan_starts(e_map, m_map, by_step, start0, *, interpret: bool = False):
    """Every piece's start state fp32 [P_pad, HV, K, V].

    e_map: fp32 [P_pad, HV, K, V] and m_map: fp32 [P_pad, HV, K, K] (pass 1); by_step: int32 [S, R]
    (:func:`gdn.split.two_pass_tables`: column r the pieces of one sequence in order, -1 past its
    last; S a power of two); start0: fp32 [P_pad, HV, K, V], the starts of the pieces no step
    reaches (a sequence's initial state for its first piece, or zeros). Concatenates the two maps
    for :func:`scan_starts_packed` (pass 1's own output is already packed).
    """
    if m_map.shape != e_map.shape[:3] + (e_map.shape[2],):
        raise ValueError(f"scan_starts: e_map {e_map.shape}, m_map {m_map.shape}, start0 {start0.shape}")
    return scan_starts_packed(jnp.concatenate([e_map, m_map], axis=-1), by_step, start0, interpret=interpret)


def scan_starts_packed(em, by_step, start0, *, interpret: bool = False):
    """:func:`scan_starts` from pass 1's ``[E | M]`` fp32 [P_pad, HV, K, V + K] as it is: the
    kernel reads E's and M's columns in place (slicing them in XLA copied both, ~8 MB at 1x32768
    and H/HV 2/4 in pieces of 32 chunks)."""
    p_pad, hv, kdim, vdim = start0.shape
    steps, rows = by_step.shape
    if em.shape != (p_pad, hv, kdim, vdim + kdim):
        raise ValueError(f"scan_starts_packed: em {em.shape}, start0 {start0.shape} (em needs V + K columns)")
    if steps < 2:
        return start0
    meta = scan_tiles(rows, hv, vdim, sm_count())
    bv, kp = meta["BV"], dim_tile(kdim)
    precisions = {"tf32x3": solve_precision(False, interpret),  # IEEE fp32 in the interpreter
                  "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32, "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
                  "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6}
    if meta["precision"] not in precisions:
        raise ValueError(f"scan TILES: precision {meta['precision']!r}, one of {sorted(precisions)}")
    prec = precisions[meta["precision"]]
    width = max(vdim + kp, pl.cdiv(vdim, bv) * bv)  # every block in bounds (K, V not powers of two)
    em = em.astype(jnp.float32)
    if width > em.shape[-1]:
        em = jnp.pad(em, ((0, 0),) * 3 + ((0, width - em.shape[-1]),))

    def kernel(ids_ref, em_ref, start0_ref, out_ref):
        del start0_ref  # aliased to out_ref: the rows no step writes keep it
        r, head, vb = program_ids(3, meta["order"])
        col0 = vb * bv
        kin = iota(kp) < kdim
        vin = col0 + iota(bv) < vdim
        smask = kin[:, None] & vin[None, :]
        mmask = kin[:, None] & kin[None, :]
        vcols, mcols = pl.ds(col0, bv), pl.ds(vdim, kp)
        ids = ids_ref[pl.ds(0, steps), r]
        n = jnp.sum((ids >= 0).astype(jnp.int32))

        def piece_id(i):
            return ids_ref[i, r]

        def walk():
            transposed = meta["transposed"]

            def body(i, s):  # s: S, or S^T when transposed (S^T M^T + E^T, S^T the left operand)
                p = piece_id(i)
                store(out_ref.at[p, head, pl.ds(0, kp), vcols], s.T if transposed else s, smask)
                m = load(em_ref.at[p, head, pl.ds(0, kp), mcols], mmask, 0.0)
                e = load(em_ref.at[p, head, pl.ds(0, kp), vcols], smask, 0.0)
                if transposed:
                    return lax.dot_general(s, m, (((1,), (1,)), ((), ())), precision=prec,
                                           preferred_element_type=jnp.float32) + e.T
                return sdot(m, s, prec) + e

            s = load(em_ref.at[piece_id(0), head, pl.ds(0, kp), vcols], smask, 0.0)
            if transposed:
                s = lax.fori_loop(1, n - 1, body, s.T).T
            else:
                s = lax.fori_loop(1, n - 1, body, s)
            store(out_ref.at[piece_id(n - 1), head, pl.ds(0, kp), vcols], s, smask)

        pl.when(n >= 2)(walk)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(start0.shape, jnp.float32),
        grid=grid_of((rows, hv, pl.cdiv(vdim, bv)), meta["order"]),
        input_output_aliases={2: 0}, interpret=interpret,
        compiler_params=compiler_params(meta["num_warps"], meta["num_stages"]),
        name="gdn_split_scan",
    )(by_step.astype(jnp.int32), em, start0.astype(jnp.float32))
