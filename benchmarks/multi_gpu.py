"""Multi-GPU prefill (gdn issue 11): sequence and head parallelism against one GPU, one table.

    PYTHONPATH=. python3 benchmarks/multi_gpu.py [--only seq4,seq2,heads2] [--impl NAME]
                                                 [--reps N] [--json PATH]
    PYTHONPATH=. python3 benchmarks/multi_gpu.py --smoke     # tiny shapes, 4 CPU virtual devices

Workloads, at H/HV = 16/32, K = V = 128, bf16 (each one runs when enough devices are visible):

  seq4    one 1M-token sequence, ``seq_axis`` over 4 devices, both ``seq_collective``s, vs 1 device
  seq2    one 128K-token sequence over 2 devices, the same
  heads2  4 x 32768 tokens (packed), ``head_axis`` over 2 devices, vs 1 device

Every call is jitted (the plan is a host constant, so one compile per row) and timed as the
median of 3 runs of ``--reps`` calls. ``impl`` is the same on 1 and n devices: ``--impl``, else
mosaic_gpu when usable, else pallas_triton, else xla (a sharded call the impl refuses is retried
with impl=None, noted in the row). Columns: ms per call, speedup vs 1 device, the collective,
the combine step alone (the collective and its scan or chain, timed as a separate jitted
shard_map on the same tables, maps random) and its share of the call, one device's local work
alone (its slice with the [v | 0] values from [0 | I]: the floor of the sharded call), and rms of
the outputs and final states against the 1-device result.
"""
from __future__ import annotations

import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before jax is imported: the device count is fixed at start
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import gdn  # noqa: E402
from gdn.inputs import qwen_gates  # noqa: E402
from gdn.jax_backend import impl_status  # noqa: E402
from gdn.jax_backend.sharded import SEQ_COLLECTIVES, combine_step, seq_slices  # noqa: E402

FULL = {"h": 16, "hv": 32, "k": 128, "v": 128, "dtype": "bfloat16",
        "seq4": 1 << 20, "seq2": 1 << 17, "heads2": (4, 32768)}
TINY = {"h": 2, "hv": 4, "k": 32, "v": 32, "dtype": "float32",
        "seq4": 1024, "seq2": 512, "heads2": (4, 256)}


def timed(fn, *args, reps: int) -> tuple[float, float]:
    """(ms of the first call, compile included; median ms per call over 3 runs of reps)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = (time.perf_counter() - t0) * 1e3
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / reps * 1e3)
    return first, float(np.median(runs))


def make_inputs(lens, cfg, device, seed=0):
    """q, k (l2-normalized), v, g, beta (Qwen3.5-like gates), h0 on ``device``; host plan."""
    t, h, hv, dk, dv = int(sum(lens)), cfg["h"], cfg["hv"], cfg["k"], cfg["v"]
    dt = getattr(jnp, cfg["dtype"])

    @jax.jit
    def draw(key):  # on the device: 1M-token inputs drawn on the host would take minutes
        kq, kk, kv, ks = jax.random.split(key, 4)
        unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
        q = unit(jax.random.normal(kq, (1, t, h, dk), jnp.float32)).astype(dt)
        k = unit(jax.random.normal(kk, (1, t, h, dk), jnp.float32)).astype(dt)
        v = jax.random.normal(kv, (1, t, hv, dv), jnp.float32).astype(dt)
        h0 = 0.1 * jax.random.normal(ks, (len(lens), hv, dk, dv), jnp.float32)
        return q, k, v, h0

    with jax.default_device(device):
        q, k, v, h0 = draw(jax.random.key(seed))
    g, beta = qwen_gates(np.random.default_rng(seed), t, hv)
    g, beta = (jax.device_put(a[None], device) for a in (g, beta))
    cu = np.r_[0, np.cumsum(lens)].astype(np.int64)
    return (q, k, v, g, beta, h0), gdn.plan(cu, num_tokens=t)


def rms(a, b) -> float:
    """rms(a - b) / rms(b), on b's device (a is gathered there first)."""
    a = jax.device_put(a, next(iter(b.devices())))
    def ratio(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return jnp.sqrt(jnp.mean(jnp.square(a - b)) / jnp.mean(jnp.square(b)))

    return float(jax.jit(ratio)(a, b))


def prefill_fn(plan, impl, **kw):
    """A jitted gdn.prefill of (q, k, v, g, beta, h0) with the host plan as a constant."""
    return jax.jit(lambda q, k, v, g, beta, h0: gdn.prefill(
        q, k, v, g, beta, plan=plan, initial_state=h0, backend="jax", impl=impl, **kw))


def combine_alone(plan, t, mesh, collective, cfg, reps):
    """ms of the combine step alone: the same tables and collective, random maps."""
    n = mesh.shape["sp"]
    sl = seq_slices(np.asarray(plan.cu_seqlens[: plan.num_seqs + 1]), t, n, plan.chunk_size)
    combine, tables = combine_step(sl, "sp", collective)
    hv, dk, dv = cfg["hv"], cfg["k"], cfg["v"]
    maps = 0.01 * jax.random.normal(jax.random.key(1), (n * sl.piece_slots, hv, dk, dv + dk))
    maps = jax.device_put(maps, NamedSharding(mesh, P("sp")))
    h0 = jax.device_put(jnp.zeros((plan.num_seqs, hv, dk, dv)), NamedSharding(mesh, P()))
    tables = tuple(jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("sp"))) for a in tables)

    def body(maps, h0, tables):
        return combine(maps, h0, *(a[0] for a in tables))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("sp"), P(), tuple(P("sp") for _ in
                                                                                tables)),
                               out_specs=(P("sp"), P()), check_vma=False))
    return timed(fn, maps, h0, tables, reps=reps)[1]


def local_alone(t_loc, cfg, impl, device, reps):
    """ms of one device's local work in a sequence-parallel call: its slice as one piece, values
    [v | 0] (V + K columns) from the state [0 | I]."""
    (q, k, v, g, beta, _), plan = make_inputs([t_loc], cfg, device, seed=2)
    v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (cfg["k"],), v.dtype)], -1)
    h0 = jnp.concatenate([jnp.zeros((1, cfg["hv"], cfg["k"], cfg["v"])),
                          jnp.broadcast_to(jnp.eye(cfg["k"]), (1, cfg["hv"], cfg["k"], cfg["k"]))],
                         -1)
    h0 = jax.device_put(h0, device)
    return timed(prefill_fn(plan, impl), q, k, v_aug, g, beta, h0, reps=reps)[1]


def run_sharded_row(fn_of_impl, impl, args):
    """(impl used, fn, first ms, ms): impl as asked, else impl=None if the impl refuses the call."""
    for use in (impl, None):
        fn = fn_of_impl(use)
        try:
            return (use, fn) + timed(fn, *args, reps=REPS)
        except NotImplementedError as e:
            if use is None:
                raise
            print(f"  impl={impl!r} refused the sharded call ({str(e)[:120]}); retrying impl=None",
                  flush=True)
    raise AssertionError("unreachable")


def workload(name, cfg, devices, impl):
    """Rows of one workload: the 1-device call, then the sharded ones."""
    dev0 = devices[0]
    if name.startswith("seq"):
        n = int(name[3:])
        lens, axis = [cfg[name]], "sp"
    else:
        n = int(name[5:])
        b, t_one = cfg[name]
        lens, axis = [t_one] * b, "tp"
    if len(devices) < n:
        return [dict(workload=name, note=f"needs {n} devices, {len(devices)} visible")]
    args, plan = make_inputs(lens, cfg, dev0)
    t = int(sum(lens))
    print(f"{name}: {len(lens)} x {lens[0]} tokens, {n} devices, impl {impl}", flush=True)
    base = prefill_fn(plan, impl)
    first, ms1 = timed(base, *args, reps=REPS)
    o1, f1 = base(*args)
    rows = [dict(workload=name, mesh="1 device", collective="-", impl=impl, ms=ms1, speedup=1.0,
                 first_ms=first)]
    print(f"  1 device: {ms1:.2f} ms (first call {first:.0f} ms)", flush=True)
    mesh = Mesh(np.array(devices[:n]), (axis,))
    spec4 = P(None, "sp", None, None) if axis == "sp" else P(None, None, "tp", None)
    spec3 = P(*spec4[:3])
    h0_spec = P() if axis == "sp" else P(None, "tp")
    shard = [NamedSharding(mesh, s) for s in (spec4, spec4, spec4, spec3, spec3, h0_spec)]
    sargs = [jax.device_put(a, s) for a, s in zip(args, shard)]
    local_ms = local_alone(t // n, cfg, impl, dev0, REPS) if axis == "sp" else None
    for coll in (SEQ_COLLECTIVES if axis == "sp" else ("none",)):
        kw = dict(mesh=mesh, seq_axis="sp", seq_collective=coll) if axis == "sp" else \
            dict(mesh=mesh, head_axis="tp")
        used, fn, first, ms = run_sharded_row(lambda use: prefill_fn(plan, use, **kw), impl, sargs)
        o, f = fn(*sargs)
        row = dict(workload=name, mesh=f"{n} x {axis}", collective=coll, impl=str(used), ms=ms,
                   speedup=ms1 / ms, first_ms=first, o_rms=rms(o, o1), state_rms=rms(f, f1))
        if axis == "sp":
            row["combine_ms"] = combine_alone(plan, t, mesh, coll, cfg, REPS)
            row["combine_share"] = row["combine_ms"] / ms
            row["local_ms"] = local_ms
        rows.append(row)
        print(f"  {row}", flush=True)
        del o, f
    return rows


def table(rows) -> str:
    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    out = ["| workload | mesh | collective | impl | ms | speedup | combine ms | combine share | "
           "local ms | o rms vs 1 | state rms vs 1 |", "|---" * 11 + "|"]
    for r in rows:
        if "note" in r:
            out.append(f"| {r['workload']} | {r['note']} |" + " |" * 9)
            continue
        out.append(f"| {r['workload']} | {r['mesh']} | {r['collective']} | {r['impl']} | "
                   f"{r['ms']:.2f} | {r['speedup']:.2f}x | {f(r.get('combine_ms'), '{:.3f}')} | "
                   f"{f(r.get('combine_share'), '{:.1%}')} | {f(r.get('local_ms'), '{:.2f}')} | "
                   f"{f(r.get('o_rms'), '{:.1e}')} | {f(r.get('state_rms'), '{:.1e}')} |")
    return "\n".join(out)


def pick_impl() -> str:
    st = impl_status()
    return next((i for i in ("mosaic_gpu", "pallas_triton") if st.get(i) is None), "xla")


def main(argv: list[str]) -> int:
    global REPS
    argv = [a for a in argv if a != "--smoke"]
    opts = dict(zip(argv[::2], argv[1::2]))
    bad = set(opts) - {"--only", "--impl", "--reps", "--json"}
    if len(argv) % 2 or bad:
        print(__doc__)
        return 2
    cfg = TINY if SMOKE else FULL
    REPS = int(opts.get("--reps", 2 if SMOKE else 5))
    impl = opts.get("--impl", "xla" if SMOKE else pick_impl())
    names = opts.get("--only", "seq4,seq2,heads2").split(",")
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}, impl {impl}, "
          f"H/HV = {cfg['h']}/{cfg['hv']}, K = V = {cfg['k']}, {cfg['dtype']}", flush=True)
    if len(devices) < 2:
        print("one device visible: nothing to compare (run on 2 or 4 GPUs, or --smoke)")
        return 1
    rows = []
    for name in names:
        try:
            rows += workload(name, cfg, devices, impl)
        except Exception as e:  # one failure must not hide the other workloads
            rows.append(dict(workload=name, note=f"error {type(e).__name__}: {str(e)[:160]}"))
            print(f"  {rows[-1]['note']}", flush=True)
    print()
    print(table(rows))
    if "--json" in opts:
        with open(opts["--json"], "w") as fh:
            json.dump(dict(jax=jax.__version__, devices=[str(d) for d in devices], impl=impl,
                           config={k: v for k, v in cfg.items()}, rows=rows), fh, indent=1)
    if SMOKE:  # the script's logic: every row ran and the sharded results match one device
        assert all("note" not in r for r in rows), rows
        assert all(r.get("o_rms", 0) < 1e-4 and r.get("state_rms", 0) < 1e-4 for r in rows), rows
        print("smoke OK")
    return 0


REPS = 5
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
