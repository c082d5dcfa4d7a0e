"""The intra kernel's work on the SMs the narrow chunk loop leaves idle: both in one launch.

On one long prompt the narrow loop (:func:`.chunk_loop.chunk_loop`) runs a CTA per (V half, v head):
64 CTAs at HV = 32, on an SM each, and 68 of an H100's or H200's 132 SMs idle for the whole loop
(~0.8 ms at 1x32768), while the intra kernel runs before it on every SM (~0.2 ms). XLA 0.11.2 would
not run the two kernels at once on two streams (benchmarks/mosaic_notes.md, sessions 25 and 26), so
this kernel does it inside one launch:

* CTAs ``0 .. workers - 1`` are intra workers: each of their ``intra_warpgroups`` warpgroups walks
  the (tile, k head) items ``w, w + W, w + 2W, ...`` (W warpgroups in all, tile-major: the order
  the loop needs them) with the intra kernel's code (:func:`.intra.intra`, ``program=True``), and
  after each item waits for its stores to land and raises the item's flag (a global semaphore,
  ``red.release.gpu``).
* the other CTAs are the narrow loop's, in its grid order (sequence-major). The memory warpgroup
  waits for tile i's flag (``ld.relaxed`` spin, ``fence.acquire.gpu``) before it loads tile i's
  ``Ag``, ``gc`` (and the row norms, with use_qk_l2norm), then a proxy fence, then the TMA loads.

The intra CTAs come first in the grid and never wait for anything, so a loop CTA only waits for
workers dispatched before it: GPUs dispatch a grid's CTAs in index order in practice (not a
documented CUDA guarantee), and a co-tenant kernel on the same GPU can then only delay the loop,
not deadlock it. The flags are zeroed before each call (Pallas's GMEM scratch is zero-initialized
in jax 0.11.2, the version gdn pins). The two roles' SMEM is one union (each CTA uses one side); the
loop runs with ``direct_io`` (its state staging would be a union inside the union) and Pallas's
automatic barriers (the intra code relies on them).

The interpreter runs the grid's CTAs one after another in index order, so it runs this kernel
without the flags (its semaphores are not interpreted): the intra workers finish before the
first loop CTA starts.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from .chunk_loop import chunk_loop
from .common import C, compiler_params, interpret_params, tracing_for_interpreter
from .intra import intra

#: the loop CTAs may fill at most this share of the SMs, or the workers would fall behind the loop
#: (intra alone ~0.2 ms on all 132 SMs at 1x32768, 16/32; the loop ~0.8 ms on 64)
MAX_LOOP_SHARE = 0.5
#: registers of each of two worker warpgroups and of the idle third (3 x 128 threads share 64K):
#: at 168 (the kernel's cap for 384 threads) the workers spill (ptxas 12.9: 532 / 800 B with P,
#: 160 / 208 B at 232). H100, session 28: 2 workers a CTA 0.867 / 0.247 ms against 3 at 168 0.861 /
#: 0.262 (1x32768 / 1x8192), one command: 3 stays the default
WORKER_REGS, WORKER_IDLE_REGS = 232, 40


def _fence_proxy_async_global():
    """Orders this thread's global memory accesses of the generic proxy with those of the async
    proxy (TMA): after a flag is seen and before the TMA loads that read what it guards, and
    between a worker's completed TMA stores and the flag it raises."""
    @plgpu.inline_mgpu()
    def _fence(ctx):
        del ctx
        mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)
    _fence()


def workers_for(loop_ctas: int, sms: int) -> int:
    """Intra worker CTAs beside ``loop_ctas`` loop CTAs on ``sms`` SMs (one CTA an SM); ValueError
    where the loop would leave fewer than half of them (:data:`MAX_LOOP_SHARE`)."""
    if not applies(loop_ctas, sms):
        raise ValueError(f"the co-resident kernel needs the chunk loop on at most {MAX_LOOP_SHARE:.0%} of the "
                         f"{sms} SMs; its grid has {loop_ctas} CTAs")
    return sms - loop_ctas


def check_flag_lag(flag_lag, name: str = "flag_lag") -> None:
    """ValueError naming ``name`` unless ``flag_lag`` (:func:`coresident`'s) is the int 0 or 1."""
    if flag_lag not in (0, 1) or isinstance(flag_lag, bool):
        raise ValueError(f"{name} must be 0 or 1, got {flag_lag!r}")


def applies(loop_ctas: int, sms: int) -> bool:
    """Whether :func:`workers_for` accepts this grid."""
    return loop_ctas <= MAX_LOOP_SHARE * sms


#: the cost model of :func:`long_first`, H100 (sessions 25-26): the narrow loop's time a tile
#: (0.78-0.81 ms alone over 512 tiles at 1x32768), and the intra kernel's SM-time a (tile, v head)
#: (0.20-0.21 ms alone on 132 SMs for 512 tiles x 32 v heads). Not ``_driver.DEFAULT_TILE_US``
#: (1.93): that is a CTA's tile time with two CTAs an SM's worth of work in waves at 4x8192 (H200),
#: the wave model's; this one is a lone CTA's chain on one long prompt.
LOOP_TILE_US, INTRA_ITEM_SM_US = 1.55, 1.6
#: how much faster than two kernels :func:`long_first` must model the co-resident order to pick it
LONG_FIRST_GAIN = 1.1


def long_first(tiles, hv: int, nv: int, sms: int) -> tuple[int, ...] | None:
    """For a host plan whose narrow loop fits one wave (``sum(CTAs) <= sms``) but not beside workers:
    the sequence order (the longest first, then the rest as they come) in which the co-resident
    kernel with workers sized for ONE sequence beats two kernels by :data:`LONG_FIRST_GAIN` in the
    model, else None. ``tiles``: each sequence's 64-token tiles (0 for an empty one). The longest
    sequence's loop CTAs run beside the workers from the start; the others' wait for SMs until
    the workers are done (a grid's CTAs start in index order). Model: two kernels = the intra work
    on every SM + the longest loop; co-resident = max(the longest loop, the intra work on the
    workers' SMs + the next longest loop). H100, 2026-12-07 (session 28, s28p, the same bits): at
    28672+4096 0.752 ms against 0.908 (modelled 0.69 / 0.89), at 2x16384 0.886 against 0.625
    (modelled 0.78 / 0.60: not picked)."""
    tiles = [int(t) for t in tiles]
    busy = [t for t in tiles if t > 0]
    if len(busy) < 2 or len(busy) * nv * hv > sms or not applies(nv * hv, sms):
        return None
    intra_all = sum(busy) * hv * INTRA_ITEM_SM_US / sms
    order = sorted(busy, reverse=True)
    two = intra_all + order[0] * LOOP_TILE_US
    one = max(order[0] * LOOP_TILE_US, intra_all * sms / workers_for(nv * hv, sms) + order[1] * LOOP_TILE_US)
    if one * LONG_FIRST_GAIN > two:
        return None
    first = tiles.index(order[0])
    return (first,) + tuple(n for n in range(len(tiles)) if n != first)


def coresident(q, k, v, g_hm, beta_hm, seg, cu, h0, *, scale: float, group: int, n_out: int | None,
               t_valid: int, sms: int, lrq=None, lrk=None, norms_in_intra: bool = False, bv: int = 64,
               stages: int | None = None, lean: bool = True, overlap: bool = True, intra_warpgroups: int = 3,
               active_seqs: int | None = None, p_from_workers: bool = False, seq_order: tuple | None = None,
               flag_lag: int = 0, p_together: bool = False, interpret=None, _no_wait: bool = False):
    """``(o, final or None, ag, gc, lrq, lrk)``: :func:`.intra.intra` and :func:`.chunk_loop.chunk_loop`
    (its ``direct_io``, not ``bare``) in one launch of ``sms`` CTAs' worth of intra workers and the
    loop's grid (module docstring). Operands as theirs: q, k [T_q, H, K], v [T_q, HV, V], g_hm,
    beta_hm [HV, T_pad] fp32, seg [T_pad], cu [N_pad + 1], h0 None or [N_h0, HV, K, V] fp32.
    ``norms_in_intra`` (use_qk_l2norm with the norms from the intra kernel): lrq / lrk are None and
    the workers compute them (2 intra warpgroups a CTA: q's tile does not fit 3); else lrq / lrk are
    use_qk_l2norm's precomputed row scales or None. ``intra_warpgroups``: 2 or 3 workers a CTA.
    ``active_seqs``: at most this many sequences have tokens (default: cu's N_pad; a host plan
    knows its count): the loop CTAs that walk tiles, which the workers must leave SMs to.
    ``p_from_workers`` (off here; the driver's ``coresident_p="auto"`` turns it on for one prompt:
    H200, session 29, whole prefill 0.815 vs 0.855 ms at 1x32768, 0.231 vs 0.254 at 1x8192; H100,
    session 28, 0.866 vs 0.861 and 0.240 vs 0.262; the same bits): the workers also form each
    tile's P (:func:`.intra.intra`'s ``p_scale``; 2 a CTA: q's tile) and the loop's output
    warpgroup reads it (``chunk_loop``'s ``pm``) instead of forming ``Q K^T`` and its decay on the
    chain's SM (session 26: the loop alone without P was 0.58-0.61 ms against 0.78-0.81 at 1x32768).
    Needs ``lean``; with use_qk_l2norm only with ``norms_in_intra``.
    ``seq_order`` (a host plan's, :func:`long_first`): the loop's CTAs walk the sequences in this order
    (a permutation of ``range(N_pad)``; the tail row stays last), so that the first ``active_seqs``
    of it run beside the workers and the rest start when the workers are done.
    ``flag_lag`` (UNTIMED at 1): 0, a worker waits for an item's stores to land before its next item
    and raises the item's flag; 1, it raises each item's flag after its next item (whose stores may
    still be in flight; the last item's after its run), so the stores' latency is off the workers'
    path and each flag comes one item later. ``p_together`` (UNTIMED): :func:`.intra.intra`'s, with P.
    ``_no_wait`` (a diagnostic, WRONG results): the loop does not wait for the flags (the GPU check
    shows that its comparison then fails: tests/gpu/mosaic_gpu_check.py --only coresident)."""
    if norms_in_intra and (lrq is not None or lrk is not None):
        raise ValueError("norms_in_intra computes lrq / lrk: pass neither")
    check_flag_lag(flag_lag)
    if intra_warpgroups not in (2, 3):
        raise ValueError(f"intra_warpgroups must be 2 or 3, got {intra_warpgroups!r}")
    if p_from_workers and (lrq is not None or not lean):
        raise ValueError("p_from_workers needs lean=True and, with use_qk_l2norm, norms_in_intra")
    nwg_i = 2 if norms_in_intra or p_from_workers else intra_warpgroups
    interp = bool(interpret)
    h = k.shape[1]
    n_tiles = g_hm.shape[1] // C
    n_items = n_tiles * h
    ip = intra(k, g_hm, beta_hm, seg, group=group, solve="warp", warpgroups=nwg_i, lrk=lrk,
               q=q if norms_in_intra or p_from_workers else None, norms=norms_in_intra,
               p_scale=scale if p_from_workers else None, p_together=p_together, interpret=interpret,
               program=True)
    if flag_lag and ip.groups_per_item is None:
        raise ValueError("flag_lag=1 needs the intra kernel's two output stagings")
    named = dict(zip(ip.out_names, ip.out_type))
    n_iout = len(ip.out_type)  # ag, gc (+ lrq, lrk)
    # the loop's operands that the workers produce: placeholders here, their output refs in the body
    lq_t, lk_t = (named["lrq"], named["lrk"]) if norms_in_intra else (lrq, lrk)
    lp = chunk_loop(q, k, v, named["ag"], named["gc"], cu, h0, scale=scale, group=group, n_out=n_out,
                    t_valid=t_valid, bv=bv, stages=stages, lean=lean, bare=False, direct_io=True, overlap=overlap,
                    lrq=lq_t, lrk=lk_t, pm=named.get("p"), interpret=interpret, program=True)
    nv, hv, ns = lp.grid
    loop_ctas = nv * hv * ns
    if seq_order is not None and sorted(seq_order) != list(range(ns - 1)):
        raise ValueError(f"seq_order must be a permutation of range({ns - 1}), got {seq_order!r}")
    # (the CTAs of empty sequences and of the tail row exit at once)
    n_work = workers_for(nv * hv * (ns - 1 if active_seqs is None else max(int(active_seqs), 1)), sms)
    n_w = n_work * nwg_i
    # the loop's inputs that the workers produce (by name): loop input position -> intra output index
    produced = ("ag", "gc") + (("lrq", "lrk") if norms_in_intra else ()) + (("p",) if p_from_workers else ())
    from_intra = {lp.input_names.index(n): ip.out_names.index(n) for n in produced}
    loop_in = [a for i, a in enumerate(lp.inputs) if i not in from_intra]
    n_iin, n_lin = len(ip.inputs), len(loop_in)

    def is_bar(x):
        return isinstance(x, plgpu.Barrier)

    smem = plgpu.RefUnion({n: s for n, s in lp.scratch.items() if not is_bar(s)},
                          {n: s for n, s in ip.scratch.items() if not is_bar(s)})
    scratch = dict(smem=smem, **{"l_" + n: s for n, s in lp.scratch.items() if is_bar(s)},
                   **{"i_" + n: s for n, s in ip.scratch.items() if is_bar(s)})

    def body(*refs, smem, **bars):
        refs = list(refs)
        i_in, l_in = refs[:n_iin], refs[n_iin:n_iin + n_lin]
        i_out = refs[n_iin + n_lin:n_iin + n_lin + n_iout]
        l_out = refs[n_iin + n_lin + n_iout:]
        l_bufs, i_bufs = smem
        l_bars = {n[2:]: b for n, b in bars.items() if n.startswith("l_")}
        i_bars = {n[2:]: b for n, b in bars.items() if n.startswith("i_")}
        c = lax.axis_index("c")
        flags = None if interp else pl.get_global(plgpu.SemaphoreType.REGULAR((n_items,)))

        @pl.when(c < n_work)
        def _intra():
            def sched_of(wg):
                w = c * nwg_i + wg
                count = jnp.maximum(n_items - w + n_w - 1, 0) // n_w

                def where(i):
                    item = w + i * n_w
                    return lax.div(item, h), lax.rem(item, h)
                return count, where

            def signal(wg, i):
                """Item i's Ag / gc (/ norms, P) are in global memory: raise its flag."""
                if not interp:
                    _fence_proxy_async_global()
                    plgpu.semaphore_signal(flags.at[c * nwg_i + wg + i * n_w], 1, memory_scope="gpu")

            def after_tile_of(wg):
                def after(i):
                    if flag_lag == 0:
                        plgpu.wait_smem_to_gmem(0)
                        signal(wg, i)
                    else:  # all but item i's own commit groups have landed: item i - 1's flag
                        @pl.when(i > 0)
                        def _():
                            plgpu.wait_smem_to_gmem(ip.groups_per_item)
                            signal(wg, i - 1)
                return after

            wg = lax.axis_index("wg")
            if nwg_i == 2:  # the third warpgroup idles: its registers go to the two workers (232 each)
                @pl.when(wg == 2)
                def _():
                    plgpu.set_max_registers(WORKER_IDLE_REGS, action="decrease")

            @pl.when(wg < nwg_i)
            def _():
                if nwg_i == 2:
                    plgpu.set_max_registers(WORKER_REGS, action="increase")
                ip.body(*i_in, *i_out, sched_of=sched_of, after_tile_of=after_tile_of, **i_bufs, **i_bars)
                if flag_lag:  # the run ends with every store landed: the last item's flag
                    count = sched_of(wg)[0]
                    pl.when(count > 0)(lambda: signal(wg, count - 1))

        @pl.when(c >= n_work)
        def _loop():
            cl = c - n_work
            row = lax.div(cl, nv * hv)
            if seq_order is not None:  # a static permutation: a chain of selects (few rows)
                n = row
                for pos, seq in enumerate(seq_order):
                    n = jnp.where(row == pos, seq, n)
                row = n
            cta = (lax.rem(cl, nv), lax.rem(lax.div(cl, nv), hv), row)
            ins = list(l_in)
            for pos in sorted(from_intra):
                ins.insert(pos, i_out[from_intra[pos]])

            def gate_wait(t0, hk):
                if not (interp or _no_wait):
                    plgpu.semaphore_wait(flags.at[lax.div(t0, C) * h + hk], 1, decrement=False,
                                         memory_scope="gpu")
                    _fence_proxy_async_global()
            lp.body(*ins, *l_out, cta=cta, gate_wait=gate_wait, **l_bufs, **l_bars)

    with tracing_for_interpreter(interp):
        outs = plgpu.kernel(
            body, out_type=tuple(ip.out_type) + tuple(lp.out_type), scratch_types=scratch,
            grid=(n_work + loop_ctas,), grid_names=("c",), num_threads=3, thread_name="wg",
            compiler_params=compiler_params(), interpret=interpret_params(interpret),
            kernel_name="gdn_coresident",
        )(*ip.inputs, *loop_in)
    i_res, l_res = outs[:n_iout], outs[n_iout:]
    o, final = l_res[0], (l_res[1] if n_out is not None else None)
    res = dict(zip(ip.out_names, i_res))
    lq, lk = (res["lrq"], res["lrk"]) if norms_in_intra else (lrq, lrk)
    return o, final, res["ag"], res["gc"], lq, lk
