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

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .kernel_utils import (compiler_params, dim_tile, grid_of, iota, load, pl, program_ids, sdot,
                           sm_count, solve_precision, store, tiles)

#: launch overrides of :func:`scan_starts` over :func:`scan_tiles` (its keys; a sweep's).
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
    the product's arithmetic. ``pairs_from_steps``: the two-level walk (:func:`scan_starts_packed`)
    from this many table rows S on (8: a column of up to 4 pieces keeps the one walk, whose 2
    serial products beat three launches)."""
    from ...split import scan_columns

    return tiles(dict(BV=min(scan_columns(rows, hv, v, sms), dim_tile(v)), num_warps=8, num_stages=1,
                      precision="tf32x3", transposed=True, pairs_from_steps=8,
                      order="triton"), TILES, "scan")


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
    kernels read E's and M's columns in place (slicing them in XLA copied both, ~8 MB at 1x32768
    and H/HV 2/4 in pieces of 32 chunks).

    With ``S >= pairs_from_steps`` (8 by default) the walk is two-level, in three launches:
    consecutive pieces' maps composed in pairs, all at once (:func:`_compose_kernel`); the walk
    over the pairs, half the serial steps (:func:`_walk_kernel` with stride 2); the other half of
    the starts, all at once, from the one before (:func:`_odd_kernel`). For n pieces the serial
    chain is ~n/2 + 2 products instead of n - 2."""
    p_pad, hv, kdim, vdim = start0.shape
    steps, rows = by_step.shape
    if em.shape != (p_pad, hv, kdim, vdim + kdim):
        raise ValueError(f"scan_starts_packed: em {em.shape}, start0 {start0.shape} (em needs V + K columns)")
    if steps < 2:
        return start0
    meta = scan_tiles(rows, hv, vdim, sm_count())
    precisions = {"tf32x3": solve_precision(False, interpret),  # IEEE fp32 in the interpreter
                  "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32, "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
                  "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6}
    if meta["precision"] not in precisions:
        raise ValueError(f"scan TILES: precision {meta['precision']!r}, one of {sorted(precisions)}")
    bv, kp = meta["BV"], dim_tile(kdim)
    g = _Geo(kdim, vdim, kp, bv, pl.cdiv(vdim, bv), pl.cdiv(kdim, bv), precisions[meta["precision"]],
             meta, interpret)
    # every block in bounds (K, V not powers of two): M's columns at [V, V + kp) and its tiles of
    # the pair products at [V, V + nm * bv), E's tiles at [0, ne * bv)
    width = max(vdim + max(kp, g.nm * bv), g.ne * bv)
    em = em.astype(jnp.float32)
    if width > em.shape[-1]:
        em = jnp.pad(em, ((0, 0),) * 3 + ((0, width - em.shape[-1]),))
    by_step, start0 = by_step.astype(jnp.int32), start0.astype(jnp.float32)
    if steps < meta["pairs_from_steps"]:
        return _walk(g, em, by_step, start0, stride=1)
    pairs = _call(g, _compose_kernel(g, steps), jax.ShapeDtypeStruct(em.shape, jnp.float32),
                  (rows * (steps // 2), hv, g.ne + g.nm), (by_step, em), {}, "gdn_split_scan_pairs")
    start = _walk(g, pairs, by_step, start0, stride=2)
    return _call(g, _odd_kernel(g, steps), jax.ShapeDtypeStruct(start0.shape, jnp.float32),
                 (rows * (steps // 2), hv, g.ne), (by_step, em, start), {2: 0}, "gdn_split_scan_odd")


@dataclasses.dataclass(frozen=True)
class _Geo:
    """Static sizes of one scan: K, V, K's tile, the V columns of a program, the E and M column
    tiles of the pair products, the products' algorithm, the launch meta."""

    kdim: int
    vdim: int
    kp: int
    bv: int
    ne: int
    nm: int
    prec: object
    meta: dict
    interpret: bool

    def smask(self, col0):
        """[kp, bv] mask of E's (or a state's) columns col0 .. col0 + bv."""
        return (iota(self.kp) < self.kdim)[:, None] & (col0 + iota(self.bv) < self.vdim)[None, :]

    def load_m(self, ref, p, head):
        """Piece p's map M fp32 [kp, kp] (zeros off K)."""
        kin = iota(self.kp) < self.kdim
        return load(ref.at[p, head, pl.ds(0, self.kp), pl.ds(self.vdim, self.kp)],
                    kin[:, None] & kin[None, :], 0.0)


def _call(g: _Geo, kernel, out_shape, sizes, args, aliases, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid_of(sizes, g.meta["order"]), input_output_aliases=aliases,
        interpret=g.interpret, compiler_params=compiler_params(g.meta["num_warps"], g.meta["num_stages"]),
        name=name)(*args)


def _count(ids_ref, steps, r):
    """The pieces of table column r."""
    return jnp.sum((ids_ref[pl.ds(0, steps), r] >= 0).astype(jnp.int32))


def _walk(g: _Geo, maps, by_step, start0, *, stride: int):
    """The serial walk over every ``stride``-th piece of each column of ``by_step`` with the maps
    ``maps`` [P_pad, HV, K, width] (pass 1's, or the pair products at stride 2): the start of each
    later walked piece, written over ``start0``."""
    steps, rows = by_step.shape

    def kernel(ids_ref, em_ref, start0_ref, out_ref):
        del start0_ref  # aliased to out_ref: the rows no step writes keep it
        r, head, vb = program_ids(3, g.meta["order"])
        vcols = pl.ds(vb * g.bv, g.bv)
        smask = g.smask(vb * g.bv)
        n = (_count(ids_ref, steps, r) + stride - 1) // stride
        transposed = g.meta["transposed"]

        def piece_id(i):
            return ids_ref[i * stride, r]

        def walk():
            def body(i, s):  # s: S, or S^T when transposed (S^T M^T + E^T, S^T the left operand)
                p = piece_id(i)
                store(out_ref.at[p, head, pl.ds(0, g.kp), vcols], s.T if transposed else s, smask)
                m = g.load_m(em_ref, p, head)
                e = load(em_ref.at[p, head, pl.ds(0, g.kp), vcols], smask, 0.0)
                if transposed:
                    return lax.dot_general(s, m, (((1,), (1,)), ((), ())), precision=g.prec,
                                           preferred_element_type=jnp.float32) + e.T
                return sdot(m, s, g.prec) + e

            s = load(em_ref.at[piece_id(0), head, pl.ds(0, g.kp), vcols], smask, 0.0)
            if transposed:
                s = lax.fori_loop(1, n - 1, body, s.T).T
            else:
                s = lax.fori_loop(1, n - 1, body, s)
            store(out_ref.at[piece_id(n - 1), head, pl.ds(0, g.kp), vcols], s, smask)

        pl.when(n >= 2)(walk)

    return _call(g, kernel, jax.ShapeDtypeStruct(start0.shape, jnp.float32), (rows, start0.shape[1], g.ne),
                 (by_step, maps, start0), {2: 0}, "gdn_split_scan")


def _compose_kernel(g: _Geo, steps: int):
    """Program (column r and pair j, v head, column tile c) of the pair products: for the pieces
    a = p_2j, b = p_2j+1 of column r with b not its last, ``[E_a | M_a]`` tile c becomes
    ``M_b [E_a | M_a] + [E_b | 0]`` at row a (b's map after a's). A first piece (j = 0) has no map
    (its M is not computed): only its E tiles, which make the walk's first state, p_2's start."""
    half = steps // 2

    def kernel(ids_ref, em_ref, out_ref):
        rj, head, c = program_ids(3, g.meta["order"])
        r, j = rj // half, rj % half
        n = _count(ids_ref, steps, r)
        on_e = c < g.ne
        on_m = (c >= g.ne).astype(jnp.int32)  # (arithmetic: a scalar select of two constants
        col0 = c * g.bv + on_m * (g.vdim - g.ne * g.bv)  # does not lower to Triton in jax 0.11.2)
        cols = pl.ds(col0, g.bv)
        kin = iota(g.kp) < g.kdim
        mask = kin[:, None] & (col0 + iota(g.bv) < g.vdim + on_m * g.kdim)[None, :]

        def pair():
            a, b = ids_ref[2 * j, r], ids_ref[2 * j + 1, r]
            x = load(em_ref.at[a, head, pl.ds(0, g.kp), cols], mask, 0.0)
            e = load(em_ref.at[b, head, pl.ds(0, g.kp), cols], mask & on_e, 0.0)
            store(out_ref.at[a, head, pl.ds(0, g.kp), cols], sdot(g.load_m(em_ref, b, head), x, g.prec) + e,
                  mask)

        pl.when((2 * j + 3 <= n) & ((j > 0) | on_e))(pair)

    return kernel


def _odd_kernel(g: _Geo, steps: int):
    """Program (column r and pair j, v head, V tile) of the starts the pair walk skips: piece
    p_2j+1 of column r starts from p_2j's start through p_2j's map (j > 0), or at p_0's E, its
    end state from the sequence's initial state (j = 0)."""
    half = steps // 2

    def kernel(ids_ref, em_ref, start_ref, out_ref):
        del start_ref  # aliased to out_ref: read the walk's starts there
        rj, head, vb = program_ids(3, g.meta["order"])
        r, j = rj // half, rj % half
        n = _count(ids_ref, steps, r)
        vcols = pl.ds(vb * g.bv, g.bv)
        smask = g.smask(vb * g.bv)

        def odd():
            a, b = ids_ref[2 * j, r], ids_ref[2 * j + 1, r]
            e = load(em_ref.at[a, head, pl.ds(0, g.kp), vcols], smask, 0.0)
            s = load(out_ref.at[a, head, pl.ds(0, g.kp), vcols], smask & (j > 0), 0.0)
            m = jnp.where(j > 0, g.load_m(em_ref, a, head), 0.0)  # (a first piece's map: not computed)
            store(out_ref.at[b, head, pl.ds(0, g.kp), vcols], sdot(m, s, g.prec) + e, smask)

        pl.when(2 * j + 2 <= n)(odd)

    return kernel
