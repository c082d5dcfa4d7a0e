"""Probe (session 19, for issue 5's low-register intra work): warp-level ``mma.sync`` through
``plgpu.mma`` with the ``MMA_LHS`` / ``MMA_RHS`` / ``MMA_ACC`` layouts (jax 0.11.2), compiled for
sm_90 on this host by ptxas (benchmarks/ptx_local/setup.sh first). Two kernels of one warpgroup:

- ``slab``: a [64, 64] x [64, 16] bf16 product (A from a plain or, with ``--swizzled``, a 128-byte
  swizzled SMEM tile; B from a plain one), fp32 accumulator;
- ``kkt``: ``K K^T`` of a swizzled [64, 128] k tile as four [64, 16] column slabs, the right
  operand a transposed row slice of the same tile (what the WGMMA path could not lower with mixed
  swizzles, mosaic_notes session 16).

    .venv/bin/python benchmarks/ptx_local/mma_probe.py [--swizzled]

Prints ptxas's registers / spills and the PTX's mma.sync / ldmatrix counts. The Mosaic GPU
interpreter of jax 0.11.2 has no rule for ``plgpu.mma`` (NotImplementedError on the CPU): a kernel
built on it needs an interpreter fallback (a ``jnp.dot`` of the same operands) to be tested in CI.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import report  # noqa: E402

report._reexec_with_driver()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.mosaic.gpu import core  # noqa: E402

from gdn.jax_backend.mosaic_gpu.common import tile  # noqa: E402
from tests.test_mosaic_gpu import _lower_for_cuda  # noqa: E402

BF = jnp.bfloat16


def _zero_acc(n):
    return plgpu.layout_cast(jnp.zeros((64, n), jnp.float32), plgpu.Layout.MMA_ACC(BF))


def slab(swizzled: bool):
    def body(a_g, b_g, o_g, a_s, b_s, bar):
        plgpu.copy_gmem_to_smem(a_g, a_s, bar)
        plgpu.copy_gmem_to_smem(b_g, b_s, bar)
        plgpu.barrier_wait(bar)
        a = plgpu.load(a_s, (), layout=plgpu.Layout.MMA_LHS(BF))
        b = plgpu.load(b_s, (), layout=plgpu.Layout.MMA_RHS(BF))
        o_g[...] = plgpu.mma(_zero_acc(16), a, b)

    a_s = tile((64, 64), BF) if swizzled else plgpu.SMEM((64, 64), BF)
    fn = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 16), jnp.float32), kernel_name="mma_slab",
                      scratch_types=dict(a_s=a_s, b_s=plgpu.SMEM((64, 16), BF), bar=plgpu.Barrier(num_arrivals=2)))
    return fn, (jax.ShapeDtypeStruct((64, 64), BF), jax.ShapeDtypeStruct((64, 16), BF))


def kkt():
    def body(k_g, o_g, k_s, bar):
        plgpu.copy_gmem_to_smem(k_g, k_s, bar)
        plgpu.barrier_wait(bar)
        a = plgpu.load(k_s, (), layout=plgpu.Layout.MMA_LHS(BF))
        for s in range(4):
            b = plgpu.load(k_s.at[pl.ds(16 * s, 16)].T, (), layout=plgpu.Layout.MMA_RHS(BF))
            o_g[:, pl.ds(16 * s, 16)] = plgpu.mma(_zero_acc(16), a, b)

    fn = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), kernel_name="mma_kkt",
                      scratch_types=dict(k_s=tile((64, 128), BF), bar=plgpu.Barrier()))
    return fn, (jax.ShapeDtypeStruct((64, 128), BF),)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--swizzled", action="store_true", help="slab: A from a 128-byte swizzled tile")
    ap.add_argument("--out", default="/tmp/gdn_mma_probe")
    a = ap.parse_args()
    for name, (fn, args) in (("slab", slab(a.swizzled)), ("kkt", kkt())):
        out = os.path.join(a.out, name)
        for f in glob.glob(os.path.join(out, "*")):
            os.remove(f)
        core.KNOWN_KERNELS.clear()
        _lower_for_cuda(fn, *args)
        report.compile_modules(list(core.KNOWN_KERNELS.values()), out)
        ptx = "".join(open(p).read() for p in glob.glob(os.path.join(out, "*.ptx")))
        for line in report.summarize(out):
            print(f"{name:5s} {line}  mma.sync {ptx.count('mma.sync')}  ldmatrix {ptx.count('ldmatrix')}")


if __name__ == "__main__":
    main()
