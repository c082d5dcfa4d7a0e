"""ptxas's report (registers, spills, serialized WGMMA warnings) of gdn's Mosaic GPU kernels, on a host
without a GPU (benchmarks/ptx_local/setup.sh first). Each variant's prefill (H = 16, HV = 32,
K = V = 128, bf16, an initial state, ``--lens``) is lowered for an H200; every Mosaic kernel module in
it goes through ``MosaicGpuCompile`` with a stand-in driver, which writes the PTX and the ptxas
report under ``--out/<variant>/`` before failing the load. SASS and an instruction histogram per loop
body: benchmarks/sass.sh on that PTX with this ptxas.

    .venv/bin/python benchmarks/ptx_local/report.py --variants default,wide_overlap --lens 256,256
    GDN_NVCC_CACHE=~/.cache/gdn-ptx-local/site bash benchmarks/sass.sh /tmp/gdn_ptx_local/wide/<kernel>.ptx

Variants are tests/gpu/mosaic_gpu_check.py's VARIANTS (the options of mosaic_gpu.run). Checked
against the H200 (2026-12-05): the intra kernel's 245 registers and the wide loop's 168 are what
the device's ptxas reported for the same code (calls f1 / c2 of 2026-12-04).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("GDN_PTX_CACHE", os.path.expanduser("~/.cache/gdn-ptx-local"))
PLUGIN = os.path.join(CACHE, "site", "jax_plugins", "xla_cuda13", "xla_cuda_plugin.so")


def _reexec_with_driver():
    """The stand-in libcuda must be found by the plugin's dlopen: set the loader path and re-run."""
    fake = os.path.join(CACHE, "fakecuda")
    if os.environ.get("_GDN_PTX_LOCAL") == "1":
        return
    if not os.path.exists(PLUGIN):
        sys.exit(f"no {PLUGIN}: run benchmarks/ptx_local/setup.sh first")
    env = dict(os.environ, _GDN_PTX_LOCAL="1", JAX_PLATFORMS="cpu",
               LD_LIBRARY_PATH=fake + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""),
               MOSAIC_GPU_CUDA_ROOT=os.path.join(CACHE, "site", "nvidia", "cu13"),
               MOSAIC_GPU_RUNTIME_LIB_PATH=os.path.join(CACHE, "site", "jax_cuda13_plugin",
                                                        "libmosaic_gpu_runtime.so"))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def lower_modules(options: dict, lens: list[int]) -> list[bytes]:
    """The serialized Mosaic GPU modules of the prefill with ``options`` at ``lens``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import core

    sys.path.insert(0, ROOT)
    from gdn import api, plan as make_plan
    from gdn.jax_backend.common import l2normalize as normalize
    from gdn.jax_backend.mosaic_gpu._driver import prefill_arrays
    from tests.test_mosaic_gpu import _lower_for_cuda

    opts = dict(options)
    l2 = opts.pop("_l2norm", None)  # "fold": use_qk_l2norm; "xla": q and k normalized before the kernels
    t = sum(lens)
    p = make_plan(np.concatenate([[0], np.cumsum(lens)]), num_tokens=t)
    sds = jax.ShapeDtypeStruct
    q = sds((1, t, 16, 128), jnp.bfloat16)
    v = sds((1, t, 32, 128), jnp.bfloat16)
    g = sds((1, t, 32), jnp.float32)
    h0 = sds((p.padded_seqs, 32, 128, 128), jnp.float32)

    def fn(q, k, v, g, beta, h0, plan):
        if l2 == "xla":
            q, k = normalize(q), normalize(k)
        _, args = api.validate(q, k, v, g, beta, plan=plan, initial_state=h0, backend="jax",
                               use_qk_l2norm=l2 == "fold")
        return prefill_arrays(args, **opts)

    core.KNOWN_KERNELS.clear()
    _lower_for_cuda(fn, q, q, v, g, g, h0, p.to_jax())
    return list(core.KNOWN_KERNELS.values())


def compile_modules(mods: list[bytes], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_TO=out, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    dll = ctypes.CDLL(PLUGIN)
    fn = dll.MosaicGpuCompile
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.POINTER(ctypes.c_void_p)
    for m in mods:
        fn(ctypes.c_char_p(m), ctypes.c_int(len(m)))  # returns null: the stand-in refuses the load
    os.environ.pop("MOSAIC_GPU_DUMP_TO")  # the next variant's lowering must not dump here
    for f in glob.glob(os.path.join(out, "*.mlir-passes.log")):  # ~100 MB each, not needed here
        os.remove(f)


def summarize(out: str) -> list[str]:
    lines = []
    for rep in sorted(glob.glob(os.path.join(out, "*.ptxas"))):
        text = open(rep).read()
        kern = os.path.basename(rep)[: -len(".ptxas")]
        regs = re.findall(r"Used (\d+) registers", text)
        spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        warn = sorted({m for m in re.findall(r"\((C\d{4})\)", text)})
        lines.append(f"{kern:28s} regs {','.join(regs):7s} spills {spill[-1] if spill else '-'}  "
                     f"{' '.join(warn) if warn else 'no ptxas warnings'}")
    return lines


def main():
    _reexec_with_driver()
    sys.path.insert(0, ROOT)
    from tests.gpu.mosaic_gpu_check import VARIANTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default")
    ap.add_argument("--lens", default="256,256")
    ap.add_argument("--out", default="/tmp/gdn_ptx_local")
    a = ap.parse_args()
    lens = [int(x) for x in a.lens.split(",")]
    for name in a.variants.split(","):
        out = os.path.join(a.out, name)
        for f in glob.glob(os.path.join(out, "*")):
            os.remove(f)
        compile_modules(lower_modules(VARIANTS[name], lens), out)
        for ln in summarize(out):
            print(f"{name:16s} {ln}", flush=True)


if __name__ == "__main__":
    main()
