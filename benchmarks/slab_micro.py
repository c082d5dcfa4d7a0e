"""The slab intra work (:func:`gdn.jax_backend.mosaic_gpu.slabs.intra_tile_slabs`) alone on the GPU: one
warpgroup per CTA repeats one tile's work ``--iters`` times from SMEM, ``--ctas-per-sm`` CTAs an SM.
Per-tile time = kernel time / iters. In the wide loop's prep warpgroup (``fused_wide_mma``) the
in-kernel profile put ~10.4 us a tile on this work (session 20); this tells whether that is the work
itself (one warpgroup's dependent steps) or the company of the two state warpgroups.

    PYTHONPATH=. python3 benchmarks/slab_micro.py --iters 256 --ctas-per-sm 1,2
    PYTHONPATH=. python3 benchmarks/slab_micro.py --iters 256 --ctas-per-sm 1 --regs 88,208
    .venv/bin/python benchmarks/slab_micro.py --lower   # CPU host: lower for sm_90 only (ptx_local)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import jax.experimental.pallas as pl  # noqa: E402
import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: E402

from gdn.jax_backend.mosaic_gpu.common import C, F32, compiler_params, opaque_zero, tile  # noqa: E402
from gdn.jax_backend.mosaic_gpu.slabs import intra_tile_slabs  # noqa: E402

BF = jnp.bfloat16


def build(ctas: int, iters: int, dk: int = 128, regs: tuple[int, int] | None = None, upto: str = "store"):
    """``regs``: None, one warpgroup per CTA (ptxas picks its registers); or (work, idle): three
    warpgroups, the first doing the work at ``work`` registers (setmaxnreg), two idle at ``idle``: the
    wide loop's budget, (88, 208)."""

    def work(k_g, g_g, b_g, lohi, ag_out, k_s, g_s, br_s, bc_s, gc_s, ag_s, b0, b1, b2, bar):
        plgpu.copy_gmem_to_smem(k_g, k_s, bar)
        plgpu.copy_gmem_to_smem(g_g, g_s, bar)
        plgpu.copy_gmem_to_smem(b_g, br_s, bar)
        plgpu.copy_gmem_to_smem(b_g, bc_s, bar)
        plgpu.barrier_wait(bar)

        @pl.loop(0, iters)
        def _(i):
            # lo / hi read per tile (0 and 64): masks built from them cannot leave the loop, as in the
            # wide loop where they change from tile to tile
            par = jax.lax.rem(i, 2)
            intra_tile_slabs(k_s, g_s, gc_s, br_s, bc_s, ag_s, (b0, b1, b2), lohi[par], lohi[2 + par], BF,
                             False, zero=opaque_zero(lohi), _upto=upto)

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ag_s, ag_out.at[jax.lax.axis_index("c")])
        plgpu.wait_smem_to_gmem(0)

    def body(*refs, done=None, **scratch):
        if regs is None:
            return work(*refs, **scratch)
        wg = jax.lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            plgpu.set_max_registers(regs[0], action="decrease")
            work(*refs, **scratch)
            plgpu.barrier_arrive(done)

        @pl.when(wg > 0)
        def _():
            plgpu.set_max_registers(regs[1], action="increase")
            plgpu.barrier_wait(done)

    vec = plgpu.SMEM((C,), F32)
    scratch = dict(k_s=tile((C, dk), BF), g_s=vec, br_s=vec, bc_s=vec, gc_s=vec, ag_s=tile((C, C), BF),
                   b0=plgpu.SMEM((C, C), BF), b1=plgpu.SMEM((C, C), BF), b2=plgpu.SMEM((C, C), BF),
                   bar=plgpu.Barrier(num_arrivals=4))
    threads = {}
    if regs is not None:
        scratch["done"] = plgpu.Barrier(num_arrivals=1)
        threads = dict(num_threads=3, thread_name="wg")
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ctas, C, C), BF), grid=(ctas,), grid_names=("c",),
        compiler_params=compiler_params(), kernel_name="slab_micro", scratch_types=scratch, **threads)


def inputs(dk: int = 128):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((C, dk)) / np.sqrt(dk)
    g = -np.abs(rng.standard_normal(C)) * 0.05
    b = rng.uniform(0.2, 0.9, C)
    return (jnp.asarray(k, BF), jnp.asarray(g, F32), jnp.asarray(b, F32), jnp.asarray([0, 0, C, C], jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=256)
    ap.add_argument("--ctas-per-sm", default="1,2,4")
    ap.add_argument("--lower", action="store_true")
    ap.add_argument("--regs", default="", help="work,idle registers: three warpgroups (e.g. 88,208)")
    ap.add_argument("--upto", default="store", help="comma list of intra_tile_slabs' STEPS: each prefix timed")
    a = ap.parse_args()
    args = inputs()
    regs = tuple(int(x) for x in a.regs.split(",")) if a.regs else None
    if a.lower:
        from tests.test_mosaic_gpu import _lower_for_cuda
        _lower_for_cuda(build(132, a.iters, regs=regs), *args)
        print("lowered")
        return
    sms = jax.devices()[0].core_count
    for per, upto in ((int(x), u) for x in a.ctas_per_sm.split(",") for u in a.upto.split(",")):
        fn = jax.jit(build(sms * per, a.iters, regs=regs, upto=upto))
        out = jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        t = min(ts)
        print(f"regs {a.regs or 'free'} ctas/SM {per} up to {upto:6s}: {t * 1e3:.3f} ms for {a.iters} tiles a CTA -> {t / a.iters * 1e6:.2f} us a tile "
              f"per warpgroup, {t / a.iters / per * 1e6:.2f} us a tile per SM; finite {bool(jnp.isfinite(out).all())}",
              flush=True)


if __name__ == "__main__":
    main()
