"""Where an eager ``gdn.prefill`` spends its host time on the GPU machine (the bench's "host us"
column: 0.45-0.56 ms a call for mosaic_gpu on the H200 in session 13, FlashInfer's 0.06-0.07).

For each layout: the median time for a call to return with an empty queue (as gdn.bench's
``host_us``), the same for the pieces a call makes (validate; the jitted core's dispatch alone),
then a cProfile of ``--calls`` calls sorted by own time.

    python tests/gpu/host_profile.py --layouts 4x8192,2048x4 --heads 16/32
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="4x8192,2048x4")
    ap.add_argument("--heads", default="16/32")
    ap.add_argument("--impl", default="mosaic_gpu")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import gdn
    from gdn import api
    from gdn.bench import host_us, layout_lens
    from tests.gpu.mosaic_gpu_check import _qwen_inputs

    h, hv = (int(x) for x in a.heads.split("/"))
    for layout in a.layouts.split(","):
        lens = list(layout_lens(layout))
        q, k, v, g, beta, h0, cu = _qwen_inputs(lens, h, hv, 128, seed=0)
        p = gdn.plan(cu)

        def call():
            return gdn.prefill(q, k, v, g, beta, plan=p, initial_state=h0, impl=a.impl)

        for _ in range(3):
            jax.block_until_ready(call())
        whole = host_us(call, 50)
        val = host_us(lambda: api.validate(q, k, v, g, beta, plan=p, initial_state=h0, backend="jax"), 50)
        pj = p.to_jax()
        h0p = jnp.pad(h0, ((0, p.padded_seqs - len(lens)), (0, 0), (0, 0), (0, 0)))
        jitted = jax.jit(lambda pl, *xs: gdn.prefill(*xs[:5], plan=pl, initial_state=xs[5], impl=a.impl))
        jax.block_until_ready(jitted(pj, q, k, v, g, beta, h0p))
        jit_dispatch = host_us(lambda: jitted(pj, q, k, v, g, beta, h0p), 50)
        print(f"host {a.heads} {layout} {a.impl}: eager call {whole:.0f} us, validate {val:.0f} us, "
              f"a jitted call (plan as an argument) {jit_dispatch:.0f} us", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            out = call()
        pr.disable()
        jax.block_until_ready(out)
        for order in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(order).print_stats(a.top)
            print(s.getvalue(), flush=True)


if __name__ == "__main__":
    main()
