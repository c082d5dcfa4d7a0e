"""Do two Mosaic GPU kernels of one jitted call run at the same time on two streams? (issue 6 probe)

At 1x32768 (H = 16, HV = 32) the narrow chunk loop fills 64 of 132 SMs for ~0.75 ms, and the intra
kernel (~0.2 ms on every SM) runs before it. If XLA's explicit stream annotation
(``compute_on("gpu_stream:1")`` with ``--xla_gpu_experimental_stream_annotation``) lets an intra call
run on the idle SMs while the loop runs, a prefill of long sequences could run the intra kernel of
the next token segment under the loop of the current one. This measures, on one jitted call:

* the loop alone and the intra kernel alone (on a quarter of the tokens and on all of them);
* both in one call, independent of each other, without and with the annotation;
* the compiled HLO's async start / done pairs (whether the annotation took, and what the scheduler
  put between them).

Usage (GPU): ``python benchmarks/stream_probe.py [--lens 32768] [--only NAMES] [--out DIR]``. Timings
are medians of interleaved rounds (tests/gpu/mosaic_gpu_check.py's ``_interleaved``). H100, session 25
(benchmarks/RESULTS.md): the annotation takes, but in every form timed the scheduler left the other
kernel outside the async call's start / done pair, so nothing overlapped; the ``ctrl:*`` forms (a
control edge from the intra kernel to the loop's call-done) fail on the GPU (session 26): jax 0.11.2
registers no CUDA handler for ``control_dep``.
"""
from __future__ import annotations

import os

FLAG = "--xla_gpu_experimental_stream_annotation=true"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768")
    ap.add_argument("--heads", default="16/32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="names of the timed variants (default: all)")
    a = ap.parse_args()
    import jax
    from jax.experimental.compute_on import compute_on
    from jax._src.core import MemorySpace
    import mosaic_gpu_check as M
    from gdn.jax_backend.mosaic_gpu.chunk_loop import chunk_loop
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide
    from gdn.jax_backend.mosaic_gpu.intra import intra

    lens = [int(s) for s in a.lens.split(",")]
    h, hv = (int(s) for s in a.heads.split("/"))
    x = M._kernel_inputs(lens, h, hv)
    t, n, grp = x["t"], x["n"], hv // h
    quarter = (t // 4) // 64 * 64

    def run_intra(k, g, b, s):
        return intra(k, g, b, s, group=grp)

    def run_loop(q, k, v, ag, gc, cu, h0, wide=False):
        f = chunk_loop_wide if wide else chunk_loop
        return f(q, k, v, ag, gc, cu, h0, scale=128 ** -0.5, group=grp, n_out=n, t_valid=t)

    def on_stream1(fn):  # fn's computation as an async call on XLA's stream 1
        return compute_on(compute_type="gpu_stream:1", out_memory_spaces=MemorySpace.Device)(fn)

    def intra_part(k, g, b, s, stream):
        kk, gg, bb, ss = k[:quarter], g[:, :quarter], b[:, :quarter], s[:quarter]
        return (on_stream1(run_intra) if stream else run_intra)(kk, gg, bb, ss)

    args = (x["q"], x["k"], x["v"], x["ag"], x["gc"], x["cu"], x["h0"], x["g_hm"], x["b_hm"], x["seg"])

    def loop_stream1(q, k, v, ag, gc, cu, h0, wide, one_out=False):
        # one_out: o only (no final state), so the async call returns one array, not a tuple (a tuple's
        # elements came out through further async calls, and the loop's own call-done sat right after its start)
        body = (lambda *xs: run_loop(*xs, wide)[0]) if one_out else (lambda *xs: run_loop(*xs, wide))
        return on_stream1(body)(q, k, v, ag, gc, cu, h0)

    def make(loop_on: bool | str, intra_on: str | None, stream: bool, wide: bool = False):
        def f(q, k, v, ag, gc, cu, h0, g, b, s):
            outs = []
            if loop_on == "stream1":  # the loop launched first (async on stream 1), intra on the main stream
                outs.append(loop_stream1(q, k, v, ag, gc, cu, h0, wide))
            elif loop_on:
                outs.append(run_loop(q, k, v, ag, gc, cu, h0, wide))
            if intra_on == "quarter":
                outs.append(intra_part(k, g, b, s, stream))
            elif intra_on == "all":
                outs.append(run_intra(k, g, b, s))
            return outs
        return jax.jit(f)

    def grouped(how: str, intra_on: str, one_out: bool = False):
        # the same scheduling group for the loop's async call and the intra kernel, so that XLA's scheduler
        # puts the intra kernel between the loop's call-start and call-done (session 25's first probe:
        # without a group the call-done came right after its start)
        from jax.experimental.xla_metadata import set_xla_metadata
        from jax.experimental.scheduling_groups import scheduling_group

        def both(q, k, v, ag, gc, cu, h0, g, b, s):
            lo = loop_stream1(q, k, v, ag, gc, cu, h0, False, one_out)
            it = intra_part(k, g, b, s, False) if intra_on == "quarter" else run_intra(k, g, b, s)
            return [lo, it]

        if how == "none":
            f = both
        elif how == "ctrl":
            # a control edge from the intra kernel to the loop's call-done (jax.experimental.overlap):
            # the loop's call-start, then the intra kernel, then its call-done
            from jax.experimental.overlap import control_dep

            def f(*xs):
                lo, it = both(*xs)
                control_dep(it[0], lo)
                return [lo, it]
        elif how == "metadata":
            def f(*xs):
                with set_xla_metadata(_scheduling_group_id=1):
                    return both(*xs)
        else:
            f = scheduling_group("1")(both)
        return jax.jit(f)

    fns = {
        "loop": make(True, None, False),
        "intra_quarter": make(False, "quarter", False),
        "intra_all": make(False, "all", False),
        "loop+intra_quarter": make(True, "quarter", False),
        "loop+intra_quarter_stream1": make(True, "quarter", True),
        "loop_stream1+intra_quarter": make("stream1", "quarter", False),
        "loop_stream1+intra_all": make("stream1", "all", False),
        "loop+intra_all": make(True, "all", False),
        "group_meta:loop_stream1+intra_quarter": grouped("metadata", "quarter"),
        "group_meta:loop_stream1+intra_all": grouped("metadata", "all"),
        "group_call:loop_stream1+intra_all": grouped("call", "all"),
        "group_meta:loop_o_stream1+intra_all": grouped("metadata", "all", True),
        "loop_o_stream1+intra_all": grouped("none", "all", True),
        "ctrl:loop_o_stream1+intra_all": grouped("ctrl", "all", True),
        "ctrl:loop_o_stream1+intra_quarter": grouped("ctrl", "quarter", True),
        "wide_loop": make(True, None, False, wide=True),
        "wide_loop+intra_quarter_stream1": make(True, "quarter", True, wide=True),
    }
    res = {"lens": lens, "heads": a.heads, "xla_flags": os.environ.get("XLA_FLAGS"),
           "device": str(jax.devices()[0].device_kind)}
    hlo = {}
    only = set(filter(None, a.only.split(",")))
    for name in (n for n in fns if "stream1" in n and (not only or n in only)):  # the annotated forms' schedules
        try:
            txt = fns[name].lower(*args).compile().as_text()
            # an async call prints as call-start / call-done (session 25's first probe counted only
            # "async-start" and so could not tell)
            hlo[name] = {"starts": sorted({w for w in txt.replace("(", " ").split() if w.endswith("-start")}),
                         "n_start": txt.count("-start("), "n_done": txt.count("-done("),
                         "stream_attr": txt.count("_xla_stream_annotation")}
            if a.out:
                os.makedirs(a.out, exist_ok=True)
                with open(os.path.join(a.out, f"hlo_{name.replace('+', '_').replace(':', '_')}.txt"), "w") as fh:
                    fh.write("\n".join(line[:400] for line in txt.splitlines()
                                        if any(w in line for w in ("-start", "-done", "call(", "custom-call",
                                                                   "ENTRY", "computation"))))
        except Exception as e:  # the probe reports what it can
            hlo[name] = f"{type(e).__name__}: {e}"[:600]
    res["hlo"] = hlo
    print(json.dumps(hlo, indent=1), flush=True)
    ok = {}
    for name, fn in fns.items():
        if only and name not in only:
            continue
        try:
            M._bench(fn, args, iters=2, reps=1)
            ok[name] = fn
        except Exception as e:
            res[name] = f"{type(e).__name__}: {e}"[:600]
            print(name, res[name], flush=True)
    times = M._interleaved(ok, args, a.rounds)
    res["ms"] = {k: v[0] for k, v in times.items()}
    res["best_ms"] = {k: v[1] for k, v in times.items()}
    print(json.dumps(res, indent=1), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "stream_probe.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
