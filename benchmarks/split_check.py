"""The exact sequence split on the GPU: split vs unsplit, accuracy and time, one table.

    PYTHONPATH=. python3 benchmarks/split_check.py [LAYOUT ...] [--impls triton,jax:mosaic_gpu]

For each implementation that runs here (triton, jax:mosaic_gpu, jax:pallas_triton), at H=16,
HV=32, K=V=128, bf16: 1x32768, 28672+4096, 1x8192, 4x2048, with the split off and with a few
piece sizes; the split result against the unsplit one (rms ratio), and ms per call.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from gdn import reference as R  # noqa: E402
from gdn.api import load_backend, validate  # noqa: E402
from gdn.arrays import convert, sync  # noqa: E402
from gdn.inputs import make_inputs  # noqa: E402
from gdn.planner import split_policy  # noqa: E402
from gdn.split import run_split  # noqa: E402

LAYOUTS = {"1x32768": [32768], "28672+4096": [28672, 4096], "1x8192": [8192], "4x2048": [2048] * 4}
IMPLS = [("triton", None), ("jax", "mosaic_gpu"), ("jax", "pallas_triton")]


def timed(fn, reps=20):
    sync(fn())
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        sync(out)
        best.append((time.perf_counter() - t0) / reps * 1e3)
    return float(np.median(best))


def main(argv: list[str]) -> int:
    """argv: layout names to run (default all) and optionally --impls backend:impl,... ."""
    impls = IMPLS
    if "--impls" in argv:
        i = argv.index("--impls")
        wanted = argv[i + 1].split(",")
        impls = [bi for bi in IMPLS if f"{bi[0]}:{bi[1]}" in wanted or bi[0] in wanted]
        argv = argv[:i] + argv[i + 2:]
    layouts = {n: LAYOUTS[n] for n in argv} if argv else LAYOUTS
    rows = []
    for name, lens in layouts.items():
        x = make_inputs(lens, 16, 32, 128, 128, initial_state=True, seed=1)
        policy = split_policy(lens, 32)
        for backend, impl in impls:
            try:
                arrs = [convert(a, backend, "bfloat16") for a in x.arrays[:3]] + \
                       [convert(a, backend, "float32") for a in x.arrays[3:]]
                h0 = convert(x.initial_state, backend, "float32")
                _, args = validate(*arrs, cu_seqlens=x.cu_seqlens, initial_state=h0,
                                   backend=backend, impl=impl)
                mod = load_backend(backend)
                o_u, f_u = sync(mod.run(args))
                t_u = timed(lambda: mod.run(args))
                rows.append((name, f"{backend}:{impl}", "off", t_u, 0.0, 0.0))
                for pc in sorted({c for c in (policy, 32, 64, 128) if c}):
                    if pc * 64 >= max(lens):
                        continue
                    o_s, f_s = sync(run_split(backend, args, pc))
                    t_s = timed(lambda: run_split(backend, args, pc))
                    rows.append((name, f"{backend}:{impl}", f"{pc} chunks", t_s,
                                 R.rms_ratio(o_s, o_u), R.rms_ratio(f_s, f_u)))
            except Exception as e:  # one failure must not hide the rest
                rows.append((name, f"{backend}:{impl}", f"error {type(e).__name__}: {str(e)[:80]}",
                             float("nan"), float("nan"), float("nan")))
            print(rows[-1], flush=True)
    print("\n| layout | impl | split | ms | o vs unsplit | state vs unsplit |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.1e} | {r[5]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
