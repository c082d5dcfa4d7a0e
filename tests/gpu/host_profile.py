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
import pstats
import statistics
import sys
import time

sys.path.insert(0, ".")


def _median_us(fn, reps: int) -> float:
    import jax

    out, times = None, []
    for _ in range(reps):
        if out is not None:
            jax.block_until_ready(out)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    jax.block_until_ready(out)
    return statistics.median(times) * 1e6


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
    import numpy as np

    import gdn
    from gdn import api

    h, hv = (int(x) for x in a.heads.split("/"))
    rng = np.random.default_rng(0)
    for layout in a.layouts.split(","):
        x_, y_ = layout.split("x")
        n, t = (int(y_), int(x_)) if int(x_) > int(y_) else (int(x_), int(y_))  # "4x8192" or "2048x4"
        lens = [t] * n
        total = sum(lens)
        q = jnp.asarray(rng.standard_normal((1, total, h, 128)) * 0.1, jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((1, total, h, 128)) * 0.1, jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((1, total, hv, 128)) * 0.1, jnp.bfloat16)
        g = jnp.asarray(-rng.uniform(0.01, 0.1, (1, total, hv)), jnp.float32)
        beta = jnp.asarray(rng.uniform(0.2, 0.9, (1, total, hv)), jnp.float32)
        h0 = jnp.zeros((n, hv, 128, 128), jnp.float32)
        p = gdn.plan(np.cumsum([0] + lens))

        def call():
            return gdn.prefill(q, k, v, g, beta, plan=p, initial_state=h0, impl=a.impl)

        for _ in range(3):
            jax.block_until_ready(call())
        whole = _median_us(call, 50)
        val = _median_us(lambda: api.validate(q, k, v, g, beta, plan=p, initial_state=h0, backend="jax"), 50)
        pj = p.to_jax()
        h0p = jnp.pad(h0, ((0, p.padded_seqs - n), (0, 0), (0, 0), (0, 0)))
        jitted = jax.jit(lambda pl, *xs: gdn.prefill(*xs[:5], plan=pl, initial_state=xs[5], impl=a.impl))
        jax.block_until_ready(jitted(pj, q, k, v, g, beta, h0p))
        jit_dispatch = _median_us(lambda: jitted(pj, q, k, v, g, beta, h0p), 50)
        print(f"host {a.heads} {layout} {a.impl}: eager call {whole:.0f} us, validate {val:.0f} us, "
              f"a jitted call (plan as an argument) {jit_dispatch:.0f} us", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            out = call()
        pr.disable()
        jax.block_until_ready(out)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.top)
        print(s.getvalue(), flush=True)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(a.top)
        print(s.getvalue(), flush=True)


if __name__ == "__main__":
    main()
