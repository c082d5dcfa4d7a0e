"""The JAX backend on a GPU (H200): correctness, no host sync, compile time and timings, one run.

    cd <repo> && PYTHONPATH=. python3 tests/gpu/jax_gpu_check.py [--quick] [--json PATH]

(``--smoke`` runs every section at toy sizes, to check the script itself on a CPU.)

Sections (each in its own try/except, so one failure does not hide the rest):
  1. edge cases at the Qwen3.5 shape (H=16, HV=32, K=V=128; one G=3 case at HV=48) against the
     float64 token loop, for every usable implementation (xla, pallas_triton, mosaic_gpu if present)
  2. a 300k-token sequence: one call against three calls chained through the final state (the
     state array h passes 2^31 elements there: 64-bit offsets), and the start of the third piece
     against float64 from the chained state
  3. no device-to-host transfer in a jitted prefill (jax.transfer_guard("disallow")), and the
     sync detector: the host gets control back long before 50 ms of queued GPU work drains; on
     five sequences and on one prompt (mosaic_gpu's co-resident kernel at HV = 32)
  4. first-call (trace + compile + run) time of each implementation
  5. timings at 1x32768, 4x8192, 8x4096, 128x256 (packed, Qwen3.5 shape, bf16): a loop of calls
     of the jitted prefill with one block_until_ready, median of several rounds; one table
     (xla, ~17 ms per call, is checked above but not timed)
  6. pallas_triton per-kernel times (intra, wu, state, output) at 1x32768 and 128x256
Sections 2 and 6 run last (5, 6, 2 order after 1, 3); --impls / --skip narrow a run.
Prints PASS / FAIL per check and a summary; exit status 1 if anything failed. About 3 minutes.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gdn  # noqa: E402
from gdn import jax_backend, reference as R  # noqa: E402
from gdn.inputs import make_inputs, round_to_dtype  # noqa: E402
from gdn.tolerances import RMS_BETWEEN, RMS_VS_F64  # noqa: E402

QWEN = dict(h=16, hv=32, k=128, v=128)
#: DESIGN.md §5, FLA 0.6.0 on the H200 (ms), for scale
FLA_MS = {"1x32768": 1.95, "4x8192": 1.97, "8x4096": 1.99, "128x256": 2.43}
RESULTS: dict = {"checks": [], "timings": {}, "compile_s": {}, "stages_ms": {}}
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    RESULTS["checks"].append(dict(name=name, ok=bool(ok), detail=detail))
    if not ok:
        FAILED.append(name)
    return ok


def section(title: str):
    def deco(fn):
        def run(*a, **kw):
            print(f"\n== {title} ==", flush=True)
            t0 = time.perf_counter()
            try:
                fn(*a, **kw)
            except Exception as e:  # keep going: one failure must not hide the rest
                traceback.print_exc()
                check(f"{title}: ran without an exception", False, f"{type(e).__name__}: {e}")
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        return run
    return deco


def usable_impls() -> list[str]:
    st = jax_backend.impl_status()
    for impl, why in st.items():
        if why is not None:
            print(f"  {impl}: not usable here: {why}")
    return [i for i in ("xla", "pallas_triton", "mosaic_gpu") if st.get(i) is None]


def device_args(x, dtype: str):
    arrs = [jnp.asarray(a, dtype) for a in x.arrays[:3]] + [jnp.asarray(a) for a in x.arrays[3:]]
    h0 = None if x.initial_state is None else jnp.asarray(x.initial_state)
    return arrs, h0


def rounded(x, dtype: str):
    return [round_to_dtype(a, dtype) for a in x.arrays[:3]] + list(x.arrays[3:])


# ---------------------------------------------------------------------------------------------
EDGE_CASES = [
    ("edges-bf16", dict(lens=[100, 0, 1, 63, 64, 65, 130], pad_tokens=29), "bfloat16", False),
    ("G3-HV48-h0-l2norm-bf16", dict(lens=[300, 7, 0, 1], initial_state=True, hv=48), "bfloat16",
     True),
    ("fp32-h0", dict(lens=[129, 0, 64, 5], initial_state=True), "float32", False),
    ("fp16-strong", dict(lens=[200, 1], initial_state=True, gates="strong"), "float16", False),
]


@section("1. edge cases at the Qwen3.5 shape vs float64")
def edge_cases(impls):
    for ci, (name, case, dtype, l2) in enumerate(EDGE_CASES):
        c = dict(QWEN, **case)
        x = make_inputs(c.pop("lens"), seed=ci, l2norm_qk=not l2, **c)
        o_ref, f_ref = R.recurrent(*rounded(x, dtype), cu_seqlens=x.cu_seqlens,
                                   initial_state=x.initial_state, use_qk_l2norm=l2)
        end = int(x.cu_seqlens[-1])
        arrs, h0 = device_args(x, dtype)
        for impl in impls:
            try:
                o, f = gdn.prefill(*arrs, cu_seqlens=x.cu_seqlens, initial_state=h0,
                                   use_qk_l2norm=l2, impl=impl)
                o = R.to_numpy64(o)
                eo = R.rms_ratio(o[:, :end], o_ref[:, :end])
                ef = R.rms_ratio(f, f_ref)
                zero = not np.any(o[:, end:])
                bar = RMS_VS_F64[dtype]
                check(f"{impl} {name}", eo < bar and ef < bar and zero,
                      f"o {eo:.2e} state {ef:.2e} (bar {bar:g}) padded-zero={zero}")
            except NotImplementedError as e:
                print(f"  skip  {impl} {name}: unsupported: {e}")


@section("2. 300k tokens: one call vs three chained calls (64-bit offsets)")
def long_chain(impls, quick: bool):
    piece = PIECE if not quick else min(PIECE, 20_032)
    n_pieces = 3
    total = piece * n_pieces
    x = make_inputs([total], seed=7, **QWEN)
    dtype = "bfloat16"
    arrs, _ = device_args(x, dtype)
    for impl in [i for i in impls if i != "xla" or len(impls) == 1]:  # xla: slow, checked above
        try:
            t0 = time.perf_counter()
            o_all, f_all = gdn.prefill(*arrs, cu_seqlens=[0, total], impl=impl)
            o_all.block_until_ready()
            t_all = time.perf_counter() - t0
            state, outs, starts = None, [], []
            for p in range(n_pieces):
                sl = slice(p * piece, (p + 1) * piece)
                starts.append(state)
                o_p, state = gdn.prefill(*(a[:, sl] for a in arrs), cu_seqlens=[0, piece],
                                         initial_state=state, impl=impl)
                outs.append(o_p)
            o_chain = jnp.concatenate(outs, axis=1)
            eo = R.rms_ratio(o_chain, o_all)
            ef = R.rms_ratio(state, f_all)
            tail = slice(total - piece, total)
            et = R.rms_ratio(o_chain[:, tail], o_all[:, tail])
            bar = RMS_BETWEEN[dtype]
            check(f"{impl} {total} tokens: one call == chained", eo < bar and ef < bar and et < bar,
                  f"o {eo:.2e} (last piece {et:.2e}) state {ef:.2e} (bar {bar:g}); "
                  f"first call {t_all:.1f} s")
            # the start of the last piece against float64, from the chained start state
            n_ref = min(1024, piece)
            s0 = (total - piece, total - piece + n_ref)
            sub = [a[:, s0[0]:s0[1]] for a in rounded(x, dtype)]
            h0 = np.asarray(starts[-1], np.float64)
            o_ref, _ = R.recurrent(*sub, cu_seqlens=[0, n_ref], initial_state=h0)
            er = R.rms_ratio(R.to_numpy64(o_all[:, s0[0]:s0[1]]), o_ref)
            check(f"{impl} tokens {s0[0]}..{s0[1]} of the one call vs float64",
                  er < RMS_VS_F64[dtype], f"o {er:.2e}")
            del o_all, f_all, o_chain, outs
        except NotImplementedError as e:
            print(f"  skip  {impl}: unsupported: {e}")


#: the batches of section 3: several sequences, and one prompt (on mosaic_gpu at HV = 32 the
#: co-resident kernel, whose loop waits on flags in GPU memory)
NO_SYNC_BATCHES = (("5 sequences", [4096, 2048, 256, 0, 77]), ("1 prompt", [8192]))


def _mosaic_variant(arrs, dp, h0) -> str:
    """The mosaic_gpu variant ``variant="auto"`` runs for these arguments (device plan)."""
    from gdn import api
    from gdn.jax_backend.mosaic_gpu import _driver as D

    _, args = api.validate(*arrs, plan=dp, initial_state=h0, backend="jax")
    variant, order = D.resolve_variant(args, interpret=False)
    return variant if order is None else f"{variant}, order {order}"


@section("3. no host transfer and no sync inside a jitted prefill")
def no_sync(impls):
    # ~50 ms of queued GPU work: a chain of 8192^2 bf16 matmuls
    @jax.jit
    def busy(a):
        return jax.lax.fori_loop(0, 40, lambda i, m: (m @ a) * 1e-4, a)

    a = jnp.ones((BUSY, BUSY), jnp.bfloat16)
    busy(a).block_until_ready()
    t0 = time.perf_counter()
    busy(a).block_until_ready()
    busy_ms = (time.perf_counter() - t0) * 1e3
    for label, lens in NO_SYNC_BATCHES:
        _no_sync_batch(impls, label, lens, busy, a, busy_ms)


def _no_sync_batch(impls, label, lens, busy, a, busy_ms):
    x = make_inputs(lens, seed=3, initial_state=True, **QWEN)
    arrs, _ = device_args(x, "bfloat16")
    p = gdn.plan(x.cu_seqlens)
    h0 = np.zeros((p.padded_seqs,) + x.initial_state.shape[1:], np.float32)
    h0[: p.num_seqs] = x.initial_state
    h0 = jnp.asarray(h0)
    dp = p.to_jax()
    for impl in impls:
        if impl == "mosaic_gpu":
            try:
                label_i = f"{impl} ({label}, {_mosaic_variant(arrs, dp, h0)})"
            except Exception as e:  # the name only; the checks below still run
                label_i = f"{impl} ({label}, variant unknown: {type(e).__name__})"
        else:
            label_i = f"{impl} ({label})"
        try:
            f = jax.jit(lambda q, k, v, g, b, plan, h: gdn.prefill(
                q, k, v, g, b, plan=plan, initial_state=h, impl=impl))
            with jax.transfer_guard("disallow"):  # tracing, compiling and running
                out = f(*arrs, dp, h0)
                jax.block_until_ready(out)
            check(f"{label_i} transfer_guard('disallow') around a jitted prefill", True)
            with jax.transfer_guard("disallow"):  # an eager call with a device plan, too
                jax.block_until_ready(gdn.prefill(*arrs, plan=dp, initial_state=h0, impl=impl))
            check(f"{label_i} transfer_guard('disallow') around an eager prefill", True)
            q = busy(a)
            t0 = time.perf_counter()
            out = f(*arrs, dp, h0)
            host_ms = (time.perf_counter() - t0) * 1e3
            jax.block_until_ready((q, out))
            check(f"{label_i} returns before the queue drains", host_ms < 0.3 * busy_ms,
                  f"host {host_ms:.2f} ms behind {busy_ms:.1f} ms of queued work")
        except Exception as e:
            check(f"{label_i} no-sync checks", False, f"{type(e).__name__}: {e}")


def _bench(fn, args, target_s: float = 0.25, rounds: int = 5) -> float:
    """Median ms per call: rounds of a loop of async calls with one block_until_ready."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    reps = int(min(200, max(3, target_s / max(one, 1e-5))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e3


CONFIGS = [("1x32768", [32768]), ("4x8192", [8192] * 4), ("8x4096", [4096] * 8),
           ("128x256", [256] * 128)]


@section("4+5. first-call compile time and timings (Qwen3.5 shape, bf16, fp32 state)")
def timings(impls, quick: bool):
    configs = CONFIGS[:2] if quick else CONFIGS
    if "xla" in impls and len(impls) > 1:  # ~17 ms per call at 32k tokens: checked, not timed
        print("  (xla left out: a reference path, 10x slower)")
        impls = [i for i in impls if i != "xla"]
    # one jitted function per impl for all configs: the first three share a bucket (T = 32768,
    # N_pad = 8, NT_pad = 512), so only their first call compiles
    fns = {impl: jax.jit(lambda q, k, v, g, b, plan, h, impl=impl: gdn.prefill(
        q, k, v, g, b, plan=plan, initial_state=h, impl=impl)) for impl in impls}
    print("  (first call: trace + compile + run; a config in an already compiled bucket only runs)")
    for cname, lens in configs:
        x = make_inputs(lens, seed=11, initial_state=True, **QWEN)
        arrs, h0 = device_args(x, "bfloat16")
        dp = gdn.plan(x.cu_seqlens).to_jax()
        for impl in impls:
            fn = fns[impl]
            try:
                hp = jnp.zeros((dp.padded_seqs,) + h0.shape[1:], jnp.float32)
                hp = hp.at[: len(lens)].set(h0)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*arrs, dp, hp))
                first = time.perf_counter() - t0
                RESULTS["compile_s"][f"{impl} {cname}"] = first
                ms = _bench(fn, (*arrs, dp, hp))
                RESULTS["timings"].setdefault(cname, {})[impl] = ms
                print(f"  {impl:14} {cname:8} first call {first:6.1f} s   {ms:8.3f} ms/call",
                      flush=True)
            except NotImplementedError as e:
                print(f"  skip  {impl} {cname}: unsupported: {e}")
            except Exception as e:
                traceback.print_exc()
                check(f"{impl} {cname} timing", False, f"{type(e).__name__}: {e}")
    cols = [i for i in impls]
    print("\n  ms per call (median)   " + " ".join(f"{c:>14}" for c in cols)
          + f" {'FLA (DESIGN §5)':>16}")
    for cname, _ in configs:
        row = RESULTS["timings"].get(cname, {})
        cells = " ".join(f"{row[c]:14.3f}" if c in row else f"{'-':>14}" for c in cols)
        print(f"  {cname:22} {cells} {FLA_MS[cname]:16.2f}")


@section("6. pallas_triton kernel by kernel")
def stage_times(impls, quick: bool, all_stages: bool):
    if "pallas_triton" not in impls:
        print("  pallas_triton not usable here")
        return
    from gdn.jax_backend import pallas_triton as PT
    from gdn.jax_backend.common import pack, pallas_triton_warnings

    interp = PT.default_interpret()  # False on the GPU
    for cname, lens in (CONFIGS[:1] if quick else [CONFIGS[0], CONFIGS[3]]):
        x = make_inputs(lens, seed=12, initial_state=True, **QWEN)
        arrs, _ = device_args(x, "bfloat16")
        dp = gdn.plan(x.cu_seqlens).to_jax()
        q, k, v, g, beta, _, _ = jax.jit(lambda *a: pack(*a, False))(*arrs)
        hv = v.shape[1]
        st = {}
        with pallas_triton_warnings():
            f_in = jax.jit(lambda k, g, b, p: PT.intra_inverse(
                k, g, b, None, p, num_v_heads=hv, interpret=interp, from_g=True,
                ai_dtype=k.dtype))
            gc, ai = f_in(k, g, beta, dp)
            st["intra"] = _bench(f_in, (k, g, beta, dp))
            f_wu = jax.jit(lambda k, v, b, gc, ai, p: PT.recompute_wu(
                k, v, b, gc, ai, None, p, interpret=interp))
            w, u = f_wu(k, v, beta, gc, ai, dp)
            st["wu"] = _bench(f_wu, (k, v, beta, gc, ai, dp))
            f_st = jax.jit(lambda k, w, u, gc, p: PT.state_recurrence(
                k, w, u, gc, None, None, p, output_final_state=True, interpret=interp))
            h, vn, _ = f_st(k, w, u, gc, dp)
            st["state"] = _bench(f_st, (k, w, u, gc, dp))
            f_o = jax.jit(lambda q, k, vn, h, gc, p: PT.chunk_output(
                q, k, vn, h, gc, None, None, p, scale=0.088, interpret=interp))
            st["output"] = _bench(f_o, (q, k, vn, h, gc, dp))
            if all_stages:  # the cumsum stage kernel alone (not on the fast path)
                f_cs = jax.jit(lambda g, p: PT.chunk_cumsum(g, p, interpret=interp))
                st["(cumsum)"] = _bench(f_cs, (g, dp))
        report_stages(cname, st)


def report_stages(cname, st):
    RESULTS["stages_ms"][cname] = st
    chain = st["intra"] + st["wu"] + st["state"] + st["output"]
    print(f"  {cname:8} " + "  ".join(f"{n} {t:.3f}" for n, t in st.items())
          + f"  (chain {chain:.3f} ms)", flush=True)


def _smoke() -> None:
    """Toy sizes for every section (checking this script on a CPU, interpret mode)."""
    global QWEN, EDGE_CASES, CONFIGS, PIECE, BUSY, NO_SYNC_BATCHES
    QWEN = dict(h=2, hv=4, k=32, v=32)
    EDGE_CASES = [(n, {**c, "hv": 6} if "hv" in c else c, d, l2) for n, c, d, l2 in EDGE_CASES]
    CONFIGS = [("1x32768", [200]), ("4x8192", [64] * 4), ("8x4096", [30] * 8),
               ("128x256", [5] * 24)]
    PIECE, BUSY = 192, 512
    NO_SYNC_BATCHES = (("5 sequences", [40, 20, 3, 0, 7]), ("1 prompt", [100]))


PIECE = 100_032  # tokens per piece of the long chain: a multiple of 64, chunk boundaries line up
BUSY = 8192


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller long-sequence and timing runs")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: check the script on a CPU")
    ap.add_argument("--stages", action="store_true",
                    help="section 6 also times the cumsum stage kernel alone")
    ap.add_argument("--impls", default="",
                    help="comma-separated implementations to check (default: every usable one)")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: edges,nosync,timings,long,stages")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."),
                                                   "jax_gpu_check.json"))
    a = ap.parse_args()
    if a.smoke:
        _smoke()
    t0 = time.perf_counter()
    devs = jax.devices()
    print(f"jax {jax.__version__} on {devs[0].platform}: {[d.device_kind for d in devs]}")
    if devs[0].platform != "gpu":
        print("no GPU: this script is meant for the H200 machine (see its docstring)")
    impls = usable_impls()
    if a.impls:
        impls = [i for i in impls if i in a.impls.split(",")]
    skip = set(a.skip.split(","))
    print(f"implementations: {impls}")
    # the most telling sections first: a run cut short by a time limit still reports them
    if "edges" not in skip:
        edge_cases(impls)
    if "nosync" not in skip:
        no_sync(impls)
    if "timings" not in skip:
        timings(impls, a.quick)
    if "stages" not in skip:
        stage_times(impls, a.quick, a.stages)
    if "long" not in skip:
        long_chain(impls, a.quick)
    RESULTS["failed"] = FAILED
    RESULTS["wall_s"] = time.perf_counter() - t0
    try:
        with open(a.json, "w") as fh:
            json.dump(RESULTS, fh, indent=1)
        print(f"\nresults written to {a.json}")
    except OSError as e:
        print(f"\ncould not write {a.json}: {e}")
    print(f"\n{'ALL PASSED' if not FAILED else 'FAILED: ' + ', '.join(FAILED)} "
          f"({RESULTS['wall_s']:.0f} s)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
