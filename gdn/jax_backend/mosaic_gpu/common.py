"""Small shared pieces of the Mosaic GPU (Hopper) kernels of gdn.

Conventions of every kernel in this package:

* ``C = 64`` tokens per tile. Tiles are aligned to the PACKED token axis (tile ``m`` holds tokens
  ``[64 m, 64 m + 64)``), not to sequence starts: a sequence touches the tiles
  ``cu[n] // 64 .. (cu[n+1] - 1) // 64`` and owns the rows ``[lo, hi)`` of each. All TMA loads are
  therefore 64-aligned (Mosaic's tiled TMA wants the token index divisible by 8), and a tile that
  holds the end of one sequence and the start of the next is loaded once per sequence and masked.
  The chunked algorithm is exact for any chunking, so the output does not depend on this choice.
* per-token scalars (g, beta, the chunk-local cumsum) are head-major fp32 ``[HV, T_pad]`` so a tile
  is one contiguous 256-byte row for a 1-D TMA copy.
* 16-bit tiles live in swizzled SMEM (:func:`tile`); fp32 scratch is plain row-major SMEM.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

C = 64  # tokens per tile (the chunk size BT of the plan)
#: TMA reads a swizzled [64, K] tile of q, k or v as 8-row groups of the whole array: its token
#: count must be a multiple of 8 (Mosaic GPU refuses another at lowering; the interpreter does not)
TMA_ROWS = 8
F32 = jnp.float32
WG = plgpu.Layout.WGMMA
WGT = plgpu.Layout.WGMMA_TRANSPOSED
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column

#: CUDA caps grid y and z at 65535; Pallas maps the grid (g0, g1, g2) to CUDA (z, y, x).
MAX_GRID_YZ = 65535


def check_token_rows(name: str, rows: int) -> None:
    """ValueError unless an operand read by TMA in [64, K] tiles has a row count TMA can tile."""
    if rows % TMA_ROWS:
        raise ValueError(f"{name}'s tokens ({rows}) must be a multiple of {TMA_ROWS} (TMA_ROWS): pad them")


def tile(shape, dtype) -> plgpu.SMEM:
    """SMEM buffer tiled and swizzled for TMA and WGMMA (minor dim = last dim)."""
    dtype = jnp.dtype(dtype)
    swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle)))


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WG)


def rows(vec, shape):
    """``vec[i]`` along row i (``vec`` in the ROWS layout)."""
    return lax.broadcast_in_dim(vec, shape, [0])


def cols(vec, shape):
    """``vec[j]`` along column j (``vec`` in the COLS layout)."""
    return lax.broadcast_in_dim(vec, shape, [1])


_INTERPRET = contextvars.ContextVar("gdn_mosaic_interpret", default=False)


@contextlib.contextmanager
def tracing_for_interpreter(flag: bool):
    """Kernels traced inside run under the Mosaic GPU interpreter (see :func:`mm`)."""
    token = _INTERPRET.set(bool(flag))
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _is_ref(x) -> bool:
    from jax._src.state import types as state_types
    return isinstance(x, state_types.TransformedRef) or isinstance(jax.typeof(x), state_types.AbstractRef)


def mm(a, b, shape, init=None, during=None):
    """``init + a @ b`` on the tensor cores, fp32 accumulator (``a``: SMEM ref or 16-bit registers);
    ``during``: as :func:`products`' (with it the result is ``(product, during())``).

    The result passes an optimization barrier: reading a WGMMA accumulator lowers to a wait that
    carries no data dependency, so without it LLVM may move arithmetic on the result above the wait.
    The Mosaic GPU interpreter has no WGMMA with a register operand, nor (jax 0.11.2) one into an
    initialized accumulator: there the product is a plain fp32-accumulated dot of the same 16-bit values.
    """
    if during is not None:
        (out,), extra = products((shape, init, [(a, b)]), during=during)
        return out, extra
    if _INTERPRET.get() and (not _is_ref(a) or init is not None):  # (nor one into an initialized accumulator)
        av = plgpu.load(a, layout=WG) if _is_ref(a) else a
        out = jnp.dot(av, plgpu.load(b, layout=WG), preferred_element_type=F32)
        return out if init is None else init + out
    if init is None:
        def scoped(acc):
            plgpu.wgmma(acc, a, b)
            return acc[...]
        out = pl.run_scoped(scoped, plgpu.ACC(shape, F32))
    else:
        def body(acc):
            plgpu.wgmma(acc, a, b)
        out = pl.run_state(body)(plgpu.ACC.init(init))
    return lax.optimization_barrier(out)


def products(*accs, during=None):
    """Several tensor-core products issued back to back with ONE wait: each entry of ``accs`` is
    ``(shape, init, pairs)`` and gives the fp32 ``init + sum(a @ b for a, b in pairs)`` (``init``
    None: zero). ``a``: SMEM ref or 16-bit registers; ``b``: SMEM ref. Independent products overlap
    on the tensor cores instead of each paying its own latency (:func:`mm` waits per product).
    ``during``: a function run after the products were issued and before the wait (work that
    touches none of their operands or accumulators, done while the tensor cores compute); with it
    the result is ``(products, during())``.

    The results pass one optimization barrier (see :func:`mm`). Under the Mosaic GPU interpreter the
    products are plain fp32-accumulated dots of the same 16-bit values.
    """
    if _INTERPRET.get():
        extra = during() if during is not None else None
        outs = []
        for shape, init, pairs in accs:
            out = init
            for a, b in pairs:
                av = plgpu.load(a, layout=WG) if _is_ref(a) else a
                part = jnp.dot(av, plgpu.load(b, layout=WG), preferred_element_type=F32)
                out = part if out is None else out + part
            outs.append(out)
        return tuple(outs) if during is None else (tuple(outs), extra)

    def scoped(*refs):
        _issue(refs, accs)
        extra = during() if during is not None else None
        return tuple(ref[...] for ref in refs), extra

    outs, extra = pl.run_scoped(scoped, *(plgpu.ACC(shape, F32) for shape, _, _ in accs))
    outs = lax.optimization_barrier(tuple(outs))
    return outs if during is None else (outs, extra)


def _issue(refs, accs) -> None:
    """Each accumulator ref of ``refs`` set to its entry's ``init`` (if any), then every product
    issued, one WGMMA group each, in order (:func:`products`' entries)."""
    for ref, (_, init, _) in zip(refs, accs):
        if init is not None:
            ref[...] = init
    for ref, (_, _, pairs) in zip(refs, accs):
        for a, b in pairs:
            plgpu.wgmma(ref, a, b)


def products_then(first, last, between):
    """The products ``first``, then ``last`` (entries as :func:`products`'), issued back to back;
    ``between(*first's results)`` runs as soon as ``first`` completed, while ``last`` may still be
    on the tensor cores (WGMMA groups retire in order: a wait that leaves ``last``'s groups in
    flight) -> ``last``'s results after one more wait. The wide loop stores a tile's output this way
    in the shadow of its state update. Under the interpreter: ``first``, ``between``, then ``last``."""
    if _INTERPRET.get():
        outs = products(*first)
        between(*outs)
        return products(*last)

    def scoped(*refs):
        _issue(refs, first + last)
        in_flight = sum(len(pairs) for _, _, pairs in last)
        done = tuple(plgpu.wgmma_accumulator_load(ref, wait_n=in_flight) for ref in refs[:len(first)])
        between(*lax.optimization_barrier(done))
        return tuple(ref[...] for ref in refs[len(first):])

    outs = pl.run_scoped(scoped, *(plgpu.ACC(shape, F32) for shape, _, _ in first + last))
    return lax.optimization_barrier(tuple(outs))


def has_row_scales(lrq, lrk) -> bool:
    """Whether a kernel got use_qk_l2norm's row scales (``lrq``, ``lrk``: fp32 [H, T_pad], ``ln rstd``
    of q's and k's rows); ValueError for one without the other."""
    if (lrq is None) != (lrk is None):
        raise ValueError("lrq and lrk come together (use_qk_l2norm) or not at all")
    return lrk is not None


def qk_scaled(g_r, g_c, lq_rows, lk_cols, slot):
    """P's row and column exponents (``exp(g_r - g_c)`` on ``Q K^T``; the rows' also on Q's) with
    q's and k's row scales from the ring slot ``slot`` of ``lq_rows`` / ``lk_cols`` (None: none)."""
    if lq_rows is None:
        return g_r, g_c
    return (g_r + plgpu.load(lq_rows.at[slot], layout=ROWS), g_c - plgpu.load(lk_cols.at[slot], layout=COLS))


def k_scaled(g, lk):
    """The exponents of a tile's k rows in the state chain: (X = S K^T's column factor ``exp(.)``,
    the gate subtracted in the update's ``exp(gc_last - .)``); with k's row scale ``lk`` (``ln
    rstd(k)``, COLS, or None) it joins both, as both products contract k's rows."""
    return (g, g) if lk is None else (g + lk, g - lk)


def masked_exp(mask, x):
    """``exp(x)`` where ``mask``, else exactly 0.

    A masked ``x`` is exponentiated too (it may give inf or NaN): the select discards it, so a
    second select guarding the exponent's input would only cost instructions (one per element).
    """
    return jnp.where(mask, jnp.exp(x), 0.0)


def masked_decay(mask, p, x, zero=0.0):
    """``p * exp(x)`` where ``mask``, else ``zero`` (exactly 0).

    A select, not a product with a 0/1 factor: a tile holds tokens of neighbouring sequences, and a
    NaN / inf of theirs in ``p`` or ``x`` (or an ``exp`` overflow of a masked ``x``) must not survive
    outside ``mask`` (``NaN * 0 = NaN``); the select alone removes it. ``zero``: a runtime 0 (see
    :func:`opaque_zero`) where the result is cast to 16 bits next.
    """
    return jnp.where(mask, p * jnp.exp(x), zero)


def opaque_zero(cu_ref):
    """fp32 0 that LLVM cannot prove to be 0: ``min(cu[0], 0)`` of the plan's ``cu_seqlens``
    (0 by the planner's validation). A select with a constant 0 arm followed by a cast to bf16 is
    turned by LLVM into the cast, then a 16-bit select per element (``selp.b16``), which ptxas
    expands to PRMT / SEL / PRMT per packed pair; with this arm the select stays one FSEL per
    element before the pack."""
    return jnp.minimum(cu_ref[0], 0).astype(F32)


def causal_mask(lo, hi, sq=(C, C)):
    """[64, 64] bool (WG layout): ``r >= c`` and ``lo <= c < hi`` (P's mask in the wide loop's prep).

    One unsigned compare per element, ``(c - lo) <u max(min(r + 1, hi) - lo, 0)``: a column left of
    ``lo`` wraps to a huge unsigned value, and the row bound is non-negative. In the wide loop's
    prep warpgroup ptxas turned the three-compare form into three ISETP and three SEL per element
    (this: one each; 1,276 -> 1,170 SASS instructions per tile, ptx_local). The wide loop alone, H100,
    2026-12-06 (session 17, m1; same bits): 0.370 vs 0.375 ms at 4x8192, 0.674 vs 0.679 at 128x256. In the
    narrow loop's output warpgroup it had merged them already (ISETP with a predicate operand), and
    this form there is 18 instructions longer, so that loop keeps the three compares.
    """
    rvec = plgpu.broadcasted_iota(jnp.int32, (sq[0],), 0, layout=ROWS)
    cvec = plgpu.broadcasted_iota(jnp.int32, (sq[1],), 0, layout=COLS)
    bound = jnp.maximum(jnp.minimum(rvec + 1, hi) - lo, 0).astype(jnp.uint32)
    return cols((cvec - lo).astype(jnp.uint32), sq) < rows(bound, sq)


def seq_cumsum(g_ref, out_ref, lo, hi):
    """The inclusive cumsum of a tile's gates over its tokens ``[lo, hi)`` (one sequence; another's g
    may be NaN and is selected away), written to ``out_ref`` (fp32 [64] SMEM) and committed (a
    warpgroup barrier too: the caller may read it back in another layout). ``g_ref``: fp32 [64] SMEM.
    -> the cumsum in the ROWS layout. The mask is :func:`causal_mask` (``c <= r``, ``lo <= c < hi``):
    built from lo / hi, so LLVM cannot hoist a whole-array mask out of a tile loop."""
    sq = (C, C)
    gam_r = jnp.where(causal_mask(lo, hi, sq), cols(plgpu.load(g_ref, layout=COLS), sq), 0.0).sum(axis=1)
    out_ref[...] = gam_r
    plgpu.commit_smem()
    return gam_r


def column_select(on: bool):
    """``sel(mask, x)``: ``x`` with the entries outside ``mask`` selected to 0 when ``on``, else ``x``
    as it is (a chunk loop whose other tokens' columns are already exactly 0 skips the select)."""
    if on:
        return lambda mask, x: jnp.where(mask, x, 0.0)
    return lambda mask, x: x


def zero_rows_outside(ref, lo, hi) -> None:
    """Zero the rows outside ``[lo, hi)`` of a ``[64, D]`` 16-bit SMEM tile in place, then commit.

    For an operand whose token rows are CONTRACTED by a WGMMA (``k`` in the state update
    ``S += Vnew^T K``): a zero factor on the other side does not remove a NaN row (``0 * NaN``), so
    the rows of other sequences must be zero in the operand itself. Load, select and store of the
    whole tile (each thread rewrites the elements it read, so no barrier between them), meant for
    the boundary tiles of a sequence only: a tile wholly inside it skips this.
    """
    t = plgpu.load(ref, layout=WG)
    rvec = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROWS)
    ref[...] = jnp.where(rows((rvec >= lo) & (rvec < hi), t.shape), t, jnp.zeros_like(t))
    plgpu.commit_smem()


def finish_together(done) -> None:
    """Every warpgroup arrives at ``done`` and waits for the others (warp-specialized kernels must
    not let one warpgroup exit while another still issues WGMMAs)."""
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def store_rows(src, dst_rows, lo, end) -> None:
    """TMA-store rows [lo, end) of the SMEM tile ``src`` one row at a time (a partial tile: a whole
    tile would overwrite a neighbour sequence's rows), ``dst_rows(r)`` being the global ref of row
    r; one commit group for all of them."""
    @pl.loop(lo, jnp.maximum(end, lo))
    def _row(rr):
        plgpu.copy_smem_to_gmem(src.at[pl.ds(rr, 1)], dst_rows(rr), commit_group=False)
    plgpu.commit_smem_to_gmem_group()


def seq_tiles(a, b):
    """The 64-token tiles that hold the packed tokens [a, b) of one sequence: ``(count, rows_of)``,
    ``rows_of(i)`` -> (first token of tile i, its token slice, first valid row, end of the valid
    rows); tiles may start inside another sequence (chunk starts need not align with tiles)."""
    m0 = lax.div(a, C)
    count = jnp.where(b > a, lax.div(b - 1, C) - m0 + 1, 0)

    def rows_of(i):
        t0 = (m0 + i) * C
        return t0, pl.ds(pl.multiple_of(t0, C), C), jnp.maximum(a - t0, 0), jnp.minimum(b - t0, C)

    return count, rows_of


def for_tail_tiles(z0, t_end, emit) -> None:
    """``emit(t0, lo)`` for each 64-token tile t0 holding tokens of [z0, t_end) (the tokens past
    the last sequence, zeroed by the tail program); ``lo``: the first such row of the tile."""
    zm0 = lax.div(z0, C)
    zt = jnp.where(t_end > z0, lax.div(t_end - 1, C) - zm0 + 1, 0)

    @pl.loop(0, zt)
    def _z(i):
        t0 = (zm0 + i) * C
        emit(t0, jnp.maximum(z0 - t0, 0))


def load_state(src):
    """An fp32 [K, 64] block of a state in global memory (``src``: a GMEM ref view) as ``S^T``
    [64, K] in WGMMA registers, read straight from global memory: 8-byte loads in the transposed
    WGMMA layout (each warp's load covers whole 32-byte sectors), then register shuffles. No SMEM
    staging, no barrier: the loads overlap whatever the CTA's other warpgroups issue meanwhile."""
    return plgpu.layout_cast(plgpu.load(src.T, layout=WGT, optimized=False), WG)


def store_state(s_t, dst) -> None:
    """``S^T`` [64, K] fp32 (WGMMA registers) to the fp32 [K, 64] global block ``dst``: register
    shuffles into the transposed layout, then 8-byte stores (fire and forget: nothing waits)."""
    dst.T[...] = plgpu.layout_cast(s_t, WGT)


def store_final_state(loop_done, stage, s_t, dst, write) -> None:
    """End of a state warpgroup's walk: wait until every state warpgroup has left the input ring
    (``stage``, the SMEM staging buffer, shares its bytes), then, when ``write``, send the fp32
    state ``s_t`` (S^T in WGMMA registers) through ``stage`` to ``dst`` by TMA."""
    plgpu.barrier_arrive(loop_done)
    plgpu.barrier_wait(loop_done)

    @pl.when(write)
    def _():
        stage.T[...] = plgpu.layout_cast(s_t, WGT)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, dst)
        plgpu.wait_smem_to_gmem(0)


def compiler_params(no_auto_barriers: bool = False):
    """approx_math; with GDN_MOSAIC_PROFILE_DIR set (a diagnostic: tests/gpu/mosaic_gpu_check.py
    --only profile), Mosaic's in-kernel profiler records the kernels' named scopes per warpgroup
    (GDN_MOSAIC_PROFILE_SPACE ranges each, default 512; it costs 16 bytes of SMEM per range and
    warpgroup) and writes one trace per kernel launch there. Read at trace time: set it in a fresh
    process.

    ``no_auto_barriers``: Pallas's ``unsafe_no_auto_barriers``: no warpgroup barrier around each
    SMEM store and before each TMA load. Only for a kernel whose every SMEM region written by a
    warpgroup's threads is either rewritten element by element by the thread that read it, or
    synchronised explicitly (``commit_smem``, an mbarrier, a wait on the async copies) before
    another thread or the async proxy touches it."""
    extra = dict(unsafe_no_auto_barriers=True) if no_auto_barriers else {}
    prof = os.environ.get("GDN_MOSAIC_PROFILE_DIR")
    if prof:
        return plgpu.CompilerParams(approx_math=True, profile_dir=prof,
                                    profile_space=int(os.environ.get("GDN_MOSAIC_PROFILE_SPACE", "512")), **extra)
    return plgpu.CompilerParams(approx_math=True, **extra)


def interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


def is_interpret(interpret) -> bool:
    return bool(interpret)


def produce(nt, stages: int, issue, in_free) -> None:
    """The producer warpgroup's ring: ``issue(i, slot)`` loads tile i once its slot was released.

    The first ``stages`` tiles go out at once; tile i >= stages waits for the release of tile
    i - stages; the releases nobody refills are observed at the end (a barrier's waiter must see
    every phase).
    """
    for i in range(stages):
        @pl.when(i < nt)
        def _():
            issue(i, i)

    @pl.loop(stages, jnp.maximum(nt, stages))
    def _refill(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(in_free.at[slot])
        issue(i, slot)

    drain_releases(nt, stages, in_free)


def drain_releases(nt, stages: int, in_free) -> None:
    """Observe the slot releases of the last ``stages`` tiles, which no refill waited for (a
    barrier's waiter must see every phase)."""
    @pl.loop(jnp.maximum(nt - stages, 0), nt)
    def _drain(i):
        plgpu.barrier_wait(in_free.at[lax.rem(i, stages)])
