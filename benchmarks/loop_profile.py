"""Mosaic's in-kernel profile of a chunk loop alone, plain and with diagnostic ablations (GPU only).

Where does a tile's time go when a piece of the work is dropped? Session 26 (mosaic_notes) found that
dropping the narrow loop's P (``_ablate={"p"}``) takes ~25% off at 1x32768 while every variant that
shortens the output warpgroup's own path was slower or equal; this profiles each named scope of both
warpgroups (the state warpgroup's waits and products, the output warpgroup's) with and without an
ablation, so a slower product shows where the two warpgroups meet.

    python benchmarks/loop_profile.py --lens 2048 --ablate none,p,o_mm --out out/profile

Each case runs in a fresh process (the profiler is switched on at trace time by
``GDN_MOSAIC_PROFILE_DIR``, see gdn/jax_backend/mosaic_gpu/common.py's ``compiler_params``) at 2
ring stages (SMEM for the trace buffers). A warpgroup records at most ``--space`` ranges (16 bytes
of SMEM each); a run that overruns them fails, so keep ``lens`` short (1x2048: 32 tiles a CTA).
Prints, per case, the mean ns of each region a tile and its share; writes ``loop_profile.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys; sys.path.insert(0, {root!r})
import jax
from tests.gpu.mosaic_gpu_check import _kernel_inputs, _loop_alone
x = _kernel_inputs({lens!r}, 16, 32)
_, fn, kw = _loop_alone({loop!r})
out = fn(x["q"], x["k"], x["v"], x["ag"], x["gc"], x["cu"], x["h0"], scale=128 ** -0.5, group=2,
         n_out=x["n"], t_valid=x["t"], stages=2, _ablate=frozenset({ablate!r}), **kw)
jax.block_until_ready(out)
"""


def profile_case(lens: list[int], loop: str, ablate: tuple[str, ...], space: int) -> dict:
    """One run of the loop (``ablate`` dropped) under the profiler -> the chunk loop's trace summary
    (tests/gpu/mosaic_gpu_check.py's ``summarize_trace``)."""
    from tests.gpu.mosaic_gpu_check import summarize_trace
    prof = tempfile.mkdtemp(prefix="gdn_loop_prof_")
    env = dict(os.environ, GDN_MOSAIC_PROFILE_DIR=prof, GDN_MOSAIC_PROFILE_SPACE=str(space))
    code = _CHILD.format(root=ROOT, lens=lens, loop=loop, ablate=tuple(ablate))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        return dict(error=proc.stderr[-3000:])
    kernel = "gdn_chunk_loop_wide" if loop == "wide" else "gdn_chunk_loop"
    traces = [p for p in sorted(glob.glob(os.path.join(prof, "*-trace.json")))
              if kernel in os.path.basename(p) and (loop == "wide" or "wide" not in os.path.basename(p))]
    if not traces:
        return dict(error="no chunk loop trace written; files: " + ", ".join(os.listdir(prof)))
    return summarize_trace(traces[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="2048", help="sequence lengths, comma-separated")
    ap.add_argument("--loop", default="narrow", choices=("narrow", "wide"))
    ap.add_argument("--ablate", default="none,p", help="cases: 'none' or '+'-joined ablation names, comma-separated")
    ap.add_argument("--space", type=int, default=256, help="profiler ranges a warpgroup")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    lens = [int(x) for x in a.lens.split(",")]
    res = {}
    for case in a.ablate.split(","):
        names = () if case == "none" else tuple(case.split("+"))
        res[case] = summ = profile_case(lens, a.loop, names, a.space)
        if "error" in summ:
            print(f"{case}: ERROR {summ['error'][-800:]}", flush=True)
            continue
        tiles = max(r["count"] for r in summ["regions"].values())
        print(f"{case} ({a.loop}, lens {a.lens}, {summ['traces']} warpgroup traces, {tiles} region counts): "
              + ", ".join(f"{n} {r['mean_ns']:.0f} ns ({100 * r['share']:.0f}%)" for n, r in summ["regions"].items()),
              flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "loop_profile.json"), "w") as fh:
        json.dump(dict(lens=lens, loop=a.loop, cases=res), fh, indent=1)


if __name__ == "__main__":
    main()
