"""The split's scan kernel alone (gdn/jax_backend/pallas_triton/scan.py) over its launch options,
on the piece tables of real layouts, GPU time per call from a profiler trace.

    python benchmarks/scan_sweep.py --cases 2/4:32768,4/8:8192 \
        --variants default,stages2,stages3,w4_stages2,bv32_stages2

Each case is ``H/HV:T`` (one sequence of T tokens, cut as :func:`gdn.split.pick_piece_chunks`
would, or ``H/HV:T:pieces`` to force a piece size in chunks). Every variant's starts are checked
against the XLA scan at HIGHEST precision (relative rms and max) before its time counts. Needs a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

VARIANTS = {  # name -> pallas_triton.scan.TILES override
    "default": {},  # (the walk on S^T since s19, 1 stage)
    "s": {"transposed": False},  # s18's default: the walk on S
    "stages2": {"num_stages": 2},
    "stages3": {"num_stages": 3},
    "w4_stages1": {"num_warps": 4},
    "w4_stages2": {"num_warps": 4, "num_stages": 2},
    "bv32_stages1": {"BV": 32},
    "bv32_stages2": {"BV": 32, "num_stages": 2},
    "bv64_stages2": {"BV": 64, "num_stages": 2},
    "tf32": {"precision": "tf32"},
    "bf16x3": {"precision": "bf16x3"},
    "bf16x6": {"precision": "bf16x6"},
    "tf32_bv32": {"precision": "tf32", "BV": 32},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2/4:32768,4/8:8192")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--interpret", action="store_true", help="a dry run on the CPU (no times)")
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from split_trace import kernel_times

    from gdn.bench import trace_calls
    from gdn.jax_backend.mosaic_gpu.split import pick_piece_chunks, scan_starts as xla_scan
    from gdn.jax_backend.pallas_triton import scan as scan_mod
    from gdn.planner import plan as make_plan, split_pieces
    from gdn.split import two_pass_tables

    warm = jax.jit(lambda x: x * 2)
    trace_calls(lambda i: warm(jnp.ones(8)), 1)  # the process's first trace comes back without GPU events

    for case in a.cases.split(","):
        parts = case.split(":")
        h, hv = (int(x) for x in parts[0].split("/"))
        t = int(parts[1])
        pc = int(parts[2]) if len(parts) > 2 else pick_piece_chunks([t], hv, 128, 128)
        if pc is None:
            print(f"== {case}: the policy keeps it unsplit; pass H/HV:T:pieces")
            continue
        cu = np.array([0, t], np.int32)
        p, sp = make_plan(cu), split_pieces(cu, pc)
        pp = make_plan(sp.piece_cu_seqlens, num_tokens=t).padded_seqs
        tb = two_pass_tables(sp, p.padded_seqs, pp)
        rng = np.random.default_rng(0)
        em = rng.normal(size=(pp, hv, 128, 256)).astype(np.float32)
        em[..., 128:] /= np.sqrt(128.0)
        em, by_step = jnp.asarray(em), jnp.asarray(tb["by_step"])
        start0 = jnp.zeros((pp, hv, 128, 128), jnp.float32)
        ref = np.asarray(jax.jit(lambda e, b, s: xla_scan(e[..., :128], e[..., 128:], b, s))(em, by_step, start0))
        print(f"== {case}: pieces of {pc} chunks, {sp.num_pieces} pieces, by_step {tuple(by_step.shape)}")
        for name in a.variants.split(","):
            scan_mod.TILES.clear()
            scan_mod.TILES.update(VARIANTS[name])
            fn = jax.jit(lambda e, b, s: scan_mod.scan_starts_packed(e, b, s, interpret=a.interpret))
            try:
                got = np.asarray(fn(em, by_step, start0))
            except Exception as exc:  # a launch option that does not compile is a result too
                print(f"  {name:14s} FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rel = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))
            times = kernel_times(trace_calls(lambda i: fn(em, by_step, start0), a.calls), a.calls)
            scan_us = sum(us for k, us in times.items() if "scan" in k)
            print(f"  {name:14s} scan {scan_us:7.1f} us  all kernels {sum(times.values()):7.1f} us  "
                  f"rel rms {rel:.1e} max {np.abs(got - ref).max():.1e}")
        scan_mod.TILES.clear()


if __name__ == "__main__":
    main()
