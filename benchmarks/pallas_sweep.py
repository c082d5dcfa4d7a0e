"""impl="pallas_triton" launch-configuration sweep on the GPU, one run (gdn issue 4).

    cd <repo> && PYTHONPATH=. python3 benchmarks/pallas_sweep.py [--budget 90] [--json PATH]
    TRITON_INTERPRET=1 JAX_PLATFORMS=cpu python3 benchmarks/pallas_sweep.py --smoke   # CPU check

At H=16 HV=32 K=V=128, bf16 (one set of 32768 packed tokens, generated on the device):

1. the baseline: the jitted pallas_triton chain (gdn.prefill inside jax.jit, plan and fp32
   initial state as arguments, as tests/gpu/jax_gpu_check.py section 5) with the default launch
   configuration, and the Triton backend's chain (gdn.prefill backend="triton", same inputs),
   at 1x32768, 4x8192, 8x4096, 128x256;
2. each pallas_triton kernel alone (intra, wu, state, output; called as section 6 of that
   script) under the configurations of SWEEP (module TILES overrides; {} = the defaults) at
   1x32768, 4x8192, 128x256. Every (configuration, bucket) is lowered first, one after the
   other (TILES are read while tracing), then compiled in a pool of threads (layouts with the
   same padded sizes share a compilation: 1x32768, 4x8192 and 8x4096 do); then timed round by
   round (every kernel's defaults, then every kernel's first variant, ...), so a run cut short
   by the budget has tried each kernel;
3. the chain again with each kernel's fastest configuration of that layout (8x4096 takes
   4x8192's), and with the configuration fastest over all three layouts together (what a new
   default would be), against the Triton chain: ms and the ratio pallas / triton.

Times: a loop of asynchronous calls with one sync, median of rounds (like jax_gpu_check's
_bench, shorter), the same for both backends. Every configuration is in its own try/except (one
that fails to lower or compile prints its error and the run goes on). TILES are read at trace
time: after each change the script calls jax.clear_caches() and builds fresh jitted functions.
``--budget`` (seconds, default 90) bounds the run: the sweep stops early to leave time for
phase 3 (it prints what it skipped), and the elapsed time is printed on every line. Results:
a table on stdout and JSON at ``--json`` (default $OUT/pallas_sweep.json, OUT default /tmp).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gdn  # noqa: E402
from gdn.jax_backend import pallas_triton as PT  # noqa: E402
from gdn.jax_backend.common import pack, pallas_triton_warnings  # noqa: E402
from gdn.jax_backend.pallas_triton import intra, kernel_utils, output, state, wu  # noqa: E402

SHAPE = dict(h=16, hv=32, k=128, v=128)
TOKENS = 32768
CHAIN_LAYOUTS = {"1x32768": [32768], "4x8192": [8192] * 4, "8x4096": [4096] * 8,
                 "128x256": [256] * 128}
SWEEP_LAYOUTS = ["1x32768", "4x8192", "128x256"]
#: the layout whose best configurations stand in for a layout the sweep does not time
STAND_IN = {"8x4096": "4x8192"}
MODS = {"intra": intra, "wu": wu, "state": state, "output": output}
#: per kernel: {} (the defaults) first, then the variants (TILES overrides over the defaults;
#: kernel_utils.tile_loop for "loop", kernel_utils.ORDERS for "order", state.state_tiles for
#: few_BV). Ordered by what we expect to matter most, since the budget may cut the tail.
SWEEP = {
    "intra": [{}, {"loop": False}, {"BK": 128}, {"order": "rows"}, {"num_warps": 2},
              {"num_stages": 1}],
    "wu": [{}, {"loop": False}, {"BK": 128, "BV": 128}, {"order": "rows"}, {"num_warps": 8},
           {"NP": 2}],
    "state": [{}, {"BV": 32, "few_BV": None, "num_stages": 4}, {"few_BV": None},
              {"num_stages": 4}, {"order": "rows"}, {"num_stages": 3}],
    "output": [{}, {"loop": False}, {"num_stages": 3}, {"order": "rows"},
               {"BV": 64, "num_warps": 4}, {"BK": 128}],
}
#: seconds kept for phase 3 (chains lowered one by one, compiled side by side) when the sweep
#: stops early
RESERVE_S = 20.0
#: threads compiling side by side (XLA compiling the Triton kernels down to cubins)
WORKERS = min(8, os.cpu_count() or 1)
BENCH = dict(target_s=0.05, rounds=3)
RESULTS: dict = {"sweep": [], "chains": {}, "best": {}, "skipped": []}
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


def set_tiles(cfgs: dict) -> None:
    """Every module's TILES to ``cfgs[name]`` (absent: empty), then drop jax's caches (TILES
    are read at trace time)."""
    for name, mod in MODS.items():
        mod.TILES.clear()
        mod.TILES.update(cfgs.get(name, {}))
    jax.clear_caches()


def _sync(x):
    if type(x).__module__.startswith("torch") or (
            isinstance(x, (tuple, list)) and x and type(x[0]).__module__.startswith("torch")):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return x
    return jax.block_until_ready(x)


def bench(fn, args, target_s: float, rounds: int) -> tuple[float, float]:
    """(ms per call, first call s): median of rounds of a loop of async calls, one sync each."""
    t0 = time.perf_counter()
    _sync(fn(*args))
    first = time.perf_counter() - t0
    reps = 1
    if target_s > 0:
        t0 = time.perf_counter()
        _sync(fn(*args))
        one = time.perf_counter() - t0
        reps = int(min(200, max(2, target_s / max(one, 1e-5))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        _sync(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e3, first


def make_batch(tokens: int, seed: int = 0):
    """q, k (l2-normalized), v bf16 [1, T, H|HV, K|V]; g (log decay < 0), beta fp32 [1, T, HV],
    on the default device (host generation of 32k tokens takes seconds)."""
    h, hv, kd, vd = SHAPE["h"], SHAPE["hv"], SHAPE["k"], SHAPE["v"]
    kq, kk, kv, kg, kb = jax.random.split(jax.random.key(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(kq, (1, tokens, h, kd))).astype(jnp.bfloat16)
    k = unit(jax.random.normal(kk, (1, tokens, h, kd))).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (1, tokens, hv, vd)).astype(jnp.bfloat16)
    g = -jax.nn.softplus(jax.random.normal(kg, (1, tokens, hv)) - 4.0)  # ~ the Qwen gates
    beta = jax.nn.sigmoid(jax.random.normal(kb, (1, tokens, hv)))
    return jax.block_until_ready((q, k, v, g, beta))


def to_torch(x):
    import torch

    try:
        return torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - a jax without dlpack export for this array
        return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(
            "cuda" if torch.cuda.is_available() else "cpu").to(
            torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32)


# -- compiling: lowered in order (TILES are read while tracing), compiled side by side ---------
def bucket_of(lay: dict) -> tuple:
    """Layouts with the same padded sizes share one compilation (1x32768, 4x8192 and 8x4096)."""
    p = lay["dplan"]
    return p.padded_seqs, p.padded_chunks, p.padded_tokens


def compile_all(jobs: list[dict], deadline: float) -> None:
    """Each job's ``lower()`` (a thunk that sets TILES and lowers a fresh jitted function) runs
    here, one after the other; then XLA compiles them (the Triton kernels down to cubins) in a
    pool of threads. Sets job["exe"] (a jax Compiled) or job["error"]. Jobs past ``deadline``
    are skipped (a compile already running is abandoned, not awaited)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    lowered = []
    for job in jobs:
        if elapsed() > deadline:
            job["error"] = "skipped: over the budget before lowering"
            continue
        try:
            with pallas_triton_warnings():
                lowered.append((job, job["lower"]()))
        except Exception as e:  # noqa: BLE001 - a configuration that does not trace/lower
            job["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            say(f"lowering {job['label']} failed: {job['error']}")
    set_tiles({})
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = [(job, pool.submit(low.compile)) for job, low in lowered]
    for job, fut in futures:
        try:
            job["exe"] = fut.result(timeout=max(deadline - elapsed(), 0.01))
        except FutureTimeout:
            fut.cancel()
            job["error"] = "skipped: over the budget while compiling"
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory, a Triton error
            job["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            say(f"compiling {job['label']} failed: {job['error']}")
    pool.shutdown(wait=False, cancel_futures=True)
    n_ok = sum("exe" in j for j in jobs)
    say(f"compiled {n_ok} of {len(jobs)} ({WORKERS} threads)")


# -- chains -------------------------------------------------------------------------------------
def pallas_chain():
    """A fresh jitted prefill (impl="pallas_triton"), plan and initial state as arguments."""
    return jax.jit(lambda q, k, v, g, b, plan, h0: gdn.prefill(
        q, k, v, g, b, plan=plan, initial_state=h0, impl="pallas_triton"))


def chain_args(batch, lay) -> tuple:
    return (*batch, lay["dplan"], lay["h0_pad"])


def chain_jobs(cfgs: dict, batch, layouts: dict, label: str) -> dict:
    """{bucket: job} lowering the chain under ``cfgs`` (kernel -> TILES) for the buckets of
    ``layouts``."""
    jobs = {}
    for lay in layouts.values():
        b = bucket_of(lay)
        if b not in jobs:
            def lower(lay=lay):
                set_tiles(cfgs)
                return pallas_chain().lower(*chain_args(batch, lay))
            jobs[b] = dict(lower=lower, label=f"chain {label} {lay['name']}")
    return jobs


def time_pallas_chain(job: dict, batch, lay, label: str) -> float | None:
    if "exe" not in job:
        say(f"chain pallas_triton {label:10s} {lay['name']:8s} not run: {job.get('error')}")
        return None
    try:
        ms, first = bench(job["exe"], chain_args(batch, lay), **BENCH)
        say(f"chain pallas_triton {label:10s} {lay['name']:8s} {ms:8.3f} ms")
        return ms
    except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        say(f"chain pallas_triton {label} {lay['name']} failed: {type(e).__name__}: {e}")
        return None


def time_triton_chain(tbatch, lay) -> float | None:
    try:
        fn = lambda: gdn.prefill(*tbatch, plan=lay["plan"], initial_state=lay["h0_t"],  # noqa
                                 backend="triton")
        ms, first = bench(fn, (), **BENCH)
        say(f"chain triton     {'':13s} {lay['name']:8s} {ms:8.3f} ms (first call {first:.1f} s)")
        return ms
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        say(f"chain triton {lay['name']} failed: {type(e).__name__}: {e}")
        return None


# -- kernels alone ------------------------------------------------------------------------------
def kernel_fns(hv: int, interp: bool) -> dict:
    """Fresh jitted single-kernel calls (as tests/gpu/jax_gpu_check.py section 6)."""
    return {
        "intra": jax.jit(lambda k, g, b, p: PT.intra_inverse(
            k, g, b, None, p, num_v_heads=hv, interpret=interp, from_g=True, ai_dtype=k.dtype)),
        "wu": jax.jit(lambda k, v, b, gc, ai, p: PT.recompute_wu(
            k, v, b, gc, ai, None, p, interpret=interp)),
        "state": jax.jit(lambda k, w, u, gc, p: PT.state_recurrence(
            k, w, u, gc, None, None, p, output_final_state=True, interpret=interp)),
        "output": jax.jit(lambda q, k, vn, h, gc, p: PT.chunk_output(
            q, k, vn, h, gc, None, None, p, scale=0.088, interpret=interp)),
    }


def kernel_args(name: str, lay: dict) -> tuple:
    s = lay["stage"]
    return {"intra": lambda: (s["k"], s["g"], s["beta"], lay["dplan"]),
            "wu": lambda: (s["k"], s["v"], s["beta"], s["gc"], s["ai"], lay["dplan"]),
            "state": lambda: (s["k"], s["w"], s["u"], s["gc"], lay["dplan"]),
            "output": lambda: (s["q"], s["k"], s["vn"], s["h"], s["gc"], lay["dplan"])}[name]()


def keep_outputs(name: str, lay: dict, out) -> None:
    """A kernel's outputs (abstract, then the defaults' arrays) feed the next kernels."""
    s = lay["stage"]
    if name == "intra":
        s["gc"], s["ai"] = out
    elif name == "wu":
        s["w"], s["u"] = out
    elif name == "state":
        s["h"], s["vn"], _ = out


def sweep(layouts: dict, hv: int, interp: bool, deadline: float) -> None:
    """Phase 2: lower every (round, kernel, bucket), compile them side by side, then time them
    round by round; round 0 (the defaults) runs in chain order and keeps its outputs as the next
    kernels' inputs."""
    set_tiles({})
    fns = kernel_fns(hv, interp)
    for lname in SWEEP_LAYOUTS:  # abstract intermediates, to lower before anything runs
        for name in MODS:
            keep_outputs(name, layouts[lname], jax.eval_shape(
                fns[name], *kernel_args(name, layouts[lname])))
    jobs = {}
    for i in range(max(len(c) for c in SWEEP.values())):
        for name, configs in SWEEP.items():
            if i >= len(configs):
                continue
            for lname in SWEEP_LAYOUTS:
                b = bucket_of(layouts[lname])
                if (i, name, b) in jobs:
                    continue

                def lower(name=name, cfg=configs[i], lay=layouts[lname]):
                    set_tiles({name: cfg})
                    return kernel_fns(hv, interp)[name].lower(*kernel_args(name, lay))
                jobs[i, name, b] = dict(lower=lower, label=f"{name} {json.dumps(configs[i])}")
    compile_all(list(jobs.values()), deadline)
    for i in range(max(len(c) for c in SWEEP.values())):
        for name, configs in SWEEP.items():
            if i >= len(configs):
                continue
            cfg = configs[i]
            for lname in SWEEP_LAYOUTS:
                lay = layouts[lname]
                job = jobs[i, name, bucket_of(lay)]
                row = dict(layout=lname, kernel=name, config=cfg)
                if "exe" not in job:
                    row["error"] = job.get("error")
                elif elapsed() > deadline:
                    row["error"] = "skipped: over the budget before timing"
                else:
                    try:
                        args = kernel_args(name, lay)
                        ms, _ = bench(job["exe"], args, **BENCH)
                        row["ms"] = ms
                        if i == 0:
                            keep_outputs(name, lay, job["exe"](*args))
                    except Exception as e:  # noqa: BLE001 - report, go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if "ms" in row:
                    say(f"{lname:8s} {name:6s} {json.dumps(cfg):48s} {row['ms']:8.3f} ms")
                else:
                    say(f"{lname:8s} {name:6s} {json.dumps(cfg):48s} {row['error']}")
                    if i == 0:  # the defaults' outputs feed the other kernels
                        raise RuntimeError(f"the default {name} kernel did not run: "
                                           f"{row['error']}")
                    if row["error"].startswith("skipped"):
                        RESULTS["skipped"].append(row)
                RESULTS["sweep"].append(row)


def best_configs() -> tuple[dict, dict]:
    """({layout: {kernel: config}} fastest per layout, {kernel: config} fastest over all three
    sweep layouts together (configs timed at all of them))."""
    per, total = {}, {}
    for r in RESULTS["sweep"]:
        if "ms" not in r:
            continue
        key = json.dumps(r["config"], sort_keys=True)
        cur = per.setdefault(r["layout"], {}).get(r["kernel"])
        if cur is None or r["ms"] < cur[0]:
            per[r["layout"]][r["kernel"]] = (r["ms"], r["config"])
        total.setdefault(r["kernel"], {}).setdefault(key, []).append(r["ms"])
    per_cfg = {lay: {k: v[1] for k, v in d.items()} for lay, d in per.items()}
    overall = {}
    for kern, d in total.items():
        full = {key: sum(v) for key, v in d.items() if len(v) == len(SWEEP_LAYOUTS)}
        if full:
            overall[kern] = json.loads(min(full, key=full.get))
    return per_cfg, overall


def table() -> None:
    print("\n  ms      config" + " " * 43 + "".join(f"{n:>10s}" for n in SWEEP_LAYOUTS))
    seen = []
    for r in RESULTS["sweep"]:
        key = (r["kernel"], json.dumps(r["config"]))
        if key not in seen:
            seen.append(key)
    for kern, cfg in seen:
        cells = []
        for lname in SWEEP_LAYOUTS:
            r = [x for x in RESULTS["sweep"] if x["layout"] == lname and x["kernel"] == kern
                 and json.dumps(x["config"]) == cfg]
            if r and "ms" in r[0]:
                cells.append(f"{r[0]['ms']:10.3f}")
            else:
                cells.append(f"{'fail' if r else '-':>10s}")
        print(f"  {kern:7s} {(cfg if cfg != '{}' else 'default'):48s}" + "".join(cells))


def write_json(path: str) -> None:
    RESULTS["wall_s"] = elapsed()
    try:
        with open(path, "w") as fh:
            json.dump(RESULTS, fh, indent=1, default=str)
    except OSError as e:
        print(f"could not write {path}: {e}")


def _smoke() -> None:
    """Tiny shapes, interpret mode, two configurations per kernel: checks this script on a CPU."""
    global SHAPE, TOKENS, CHAIN_LAYOUTS, SWEEP_LAYOUTS, SWEEP, RESERVE_S, BENCH
    SHAPE = dict(h=2, hv=4, k=32, v=64)
    TOKENS = 128
    CHAIN_LAYOUTS = {"1x32768": [128], "4x8192": [32] * 4, "8x4096": [16] * 8,
                     "128x256": [8] * 16}
    SWEEP = {name: cfgs[:2] for name, cfgs in SWEEP.items()}
    RESERVE_S = 5.0
    BENCH = dict(target_s=0.0, rounds=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 90; 900 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on a CPU")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"),
                                                   "pallas_sweep.json"))
    a = ap.parse_args()
    if a.smoke:
        _smoke()
    if a.budget is None:
        a.budget = 900.0 if a.smoke else 90.0
    dev = jax.devices()[0]
    interp = PT.default_interpret()
    RESULTS["meta"] = dict(jax=jax.__version__, device=str(dev.device_kind), shape=SHAPE,
                           tokens=TOKENS, budget_s=a.budget, smoke=a.smoke, interpret=interp,
                           sweep=SWEEP)
    say(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), interpret={interp}, "
        f"budget {a.budget:.0f} s")

    batch = make_batch(TOKENS)
    q, k, v, g, beta, _, _ = jax.jit(lambda *x: pack(*x, False))(*batch)
    try:
        tbatch = [to_torch(x) for x in batch]
    except Exception as e:  # noqa: BLE001 - no torch: the Triton chain is left out
        say(f"no Triton backend here ({type(e).__name__}: {e}): its chain is left out")
        tbatch = None
    layouts = {}
    for name, lens in CHAIN_LAYOUTS.items():
        cu = np.concatenate([[0], np.cumsum(lens)])
        plan = gdn.plan(cu)
        dp = plan.to_jax()
        h0 = 0.1 * jax.random.normal(jax.random.key(len(lens)),
                                     (len(lens), SHAPE["hv"], SHAPE["k"], SHAPE["v"]))
        h0_pad = jnp.zeros((dp.padded_seqs,) + h0.shape[1:], jnp.float32).at[:len(lens)].set(h0)
        layouts[name] = dict(name=name, plan=plan, dplan=dp, h0_pad=h0_pad,
                             h0_t=to_torch(h0) if tbatch is not None else None,
                             stage=dict(q=q, k=k, v=v, g=g, beta=beta))
    d = kernel_utils.dims(k, v)
    RESULTS["defaults"] = {
        "intra": intra.intra_tiles(d.k, d.fp32), "wu": wu.wu_tiles(d),
        "output": output.output_tiles(d),
        "state": {n: state.state_tiles(d, lay["dplan"].padded_seqs, kernel_utils.sm_count())
                  for n, lay in layouts.items()}}
    for kern, meta in RESULTS["defaults"].items():
        say(f"defaults {kern}: {meta}")

    # 1. baseline chains
    say("== 1. chains with the default configuration, and the Triton backend's ==")
    base = chain_jobs({}, batch, layouts, "default")
    compile_all(list(base.values()), a.budget)
    for name, lay in layouts.items():
        c = RESULTS["chains"].setdefault(name, {})
        c["pallas_default"] = time_pallas_chain(base[bucket_of(lay)], batch, lay, "default")
        c["triton"] = time_triton_chain(tbatch, lay) if tbatch is not None else None
    write_json(a.json)

    # 2. kernels alone
    say("== 2. each kernel alone, configuration by configuration ==")
    try:
        sweep(layouts, SHAPE["hv"], interp, a.budget - RESERVE_S)
    except Exception as e:  # noqa: BLE001 - the defaults failed: no sweep, go to phase 3
        traceback.print_exc()
        say(f"sweep stopped: {type(e).__name__}: {e}")
        RESULTS["skipped"].append(dict(sweep_stopped=f"{type(e).__name__}: {e}"))
    set_tiles({})
    write_json(a.json)
    table()
    per, overall = best_configs()
    RESULTS["best"] = dict(per_layout=per, overall=overall)
    say(f"fastest over all three layouts: {overall}")

    # 3. chains with the fastest configurations
    say("== 3. chains with the fastest configurations ==")
    plans = {}  # (label, layout) -> non-default configs; configs -> {bucket: job}
    for name in layouts:
        for label, cf in (("best", per.get(STAND_IN.get(name, name), {})),
                          ("overall", overall)):
            cf = {kk: vv for kk, vv in cf.items() if vv}
            plans[label, name] = cf
    need: dict = {}  # config -> the layouts that run it (each of their buckets compiles once)
    for (label, name), cf in plans.items():
        if cf:
            key = json.dumps(cf, sort_keys=True)
            need.setdefault(key, (cf, label, {}))[2][name] = layouts[name]
    jobs = {key: chain_jobs(cf, batch, lays, label) for key, (cf, label, lays) in need.items()}
    compile_all([j for d in jobs.values() for j in d.values()], a.budget)
    for (label, name), cf in plans.items():
        c, lay = RESULTS["chains"][name], layouts[name]
        if not cf:
            c[f"pallas_{label}"] = c["pallas_default"]
            continue
        c[f"pallas_{label}_configs"] = cf
        job = jobs[json.dumps(cf, sort_keys=True)][bucket_of(lay)]
        c[f"pallas_{label}"] = time_pallas_chain(job, batch, lay, label)
    set_tiles({})
    write_json(a.json)

    print("\n  ms per call    triton  pallas default  ratio  pallas best  ratio  "
          "pallas overall  ratio   (ratio = pallas / triton; 1.2 is the issue-4 bar)")
    for name, c in RESULTS["chains"].items():
        tr = c.get("triton")
        cells = [f"{tr:8.3f}" if tr else f"{'-':>8s}"]
        for key in ("pallas_default", "pallas_best", "pallas_overall"):
            ms = c.get(key)
            ratio = ms / tr if ms and tr else None
            c[f"ratio_{key[7:]}"] = ratio
            cells.append(f"{ms:14.3f}" if ms else f"{'-':>14s}")
            cells.append(f"{ratio:6.2f}" if ratio else f"{'-':>6s}")
        print(f"  {name:9s} " + " ".join(cells))
    for name in CHAIN_LAYOUTS:
        cf = RESULTS["chains"][name].get("pallas_best_configs")
        if cf:
            print(f"  best configs {name}: {cf}")
    write_json(a.json)
    say(f"results written to {a.json}; {len(RESULTS['skipped'])} items skipped for the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
