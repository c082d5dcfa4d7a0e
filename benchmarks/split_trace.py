"""Where a prefill's GPU time goes, kernel by kernel: the jitted call with the plan as an argument
(traced plan) against the same call with the host plan closed over, from a jax.profiler trace.

    python benchmarks/split_trace.py --heads 4/8 --lens 8192 [--calls 20]

Prints, per call, the GPU time of each kernel name (summed over its launches) for both, and the
busy time. Needs a GPU. A diagnostic for the split under jit (RESULTS.md, session 17).
"""
from __future__ import annotations

import argparse
import collections


def kernel_times(trace: dict | None, n_calls: int) -> dict[str, float]:
    """us per call of each kernel name on the GPU's stream threads (:func:`gdn.bench.gpu_stream_events`)
    of a :func:`gdn.bench.trace_calls` trace."""
    from gdn.bench import gpu_stream_events

    if trace is None:
        raise RuntimeError("jax.profiler wrote no perfetto trace")
    out = collections.Counter()
    for e in gpu_stream_events(trace):
        out[e.get("name", "?")[:90]] += float(e.get("dur", 0)) / n_calls
    return dict(out.most_common())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="4/8")
    ap.add_argument("--lens", default="8192")
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import gdn
    from gdn.bench import trace_calls
    from gdn.inputs import make_inputs

    h, hv = (int(x) for x in a.heads.split("/"))
    lens = [int(x) for x in a.lens.split(",")]
    x = make_inputs(lens, h=h, hv=hv, k=128, v=128, initial_state=True, seed=0)
    q, k, v, g, beta = (jnp.asarray(t, jnp.bfloat16 if i < 3 else jnp.float32) for i, t in enumerate(x.arrays))
    h0 = jnp.asarray(x.initial_state)
    p = gdn.plan(x.cu_seqlens, num_tokens=q.shape[1])
    kw = dict(backend="jax", impl="mosaic_gpu")
    traced = jax.jit(lambda pl, q, k, v, g, beta, h0: gdn.prefill(q, k, v, g, beta, plan=pl, initial_state=h0, **kw))
    host = jax.jit(lambda q, k, v, g, beta, h0: gdn.prefill(q, k, v, g, beta, plan=p, initial_state=h0, **kw))
    h0p = jnp.pad(h0, ((0, p.padded_seqs - h0.shape[0]), (0, 0), (0, 0), (0, 0)))
    calls = {"traced": lambda: traced(p.to_jax(), q, k, v, g, beta, h0p), "host": lambda: host(q, k, v, g, beta, h0)}
    # the process's first profiler trace comes back without GPU events: one round before the two
    for name, fn in [("warm-up", calls["host"])] + list(calls.items()):
        jax.block_until_ready(fn())
        times = kernel_times(trace_calls(lambda i: fn(), a.calls), a.calls)
        if name == "warm-up":
            continue
        print(f"== {name} ({a.heads}, {a.lens}): {sum(times.values()):.1f} us of kernels per call")
        for kname, us in times.items():
            print(f"  {us:8.1f} us  {kname}")


if __name__ == "__main__":
    main()
