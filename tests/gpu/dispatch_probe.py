"""Is a small prefill host-bound? For each batch: the jitted mosaic_gpu prefill's time per call
with 20 calls in flight (what _bench reports), the host's dispatch time for those calls (until the
last call returns, before the block), and one call's latency (dispatch + run + block)."""
import statistics
import sys
import time

sys.path.insert(0, ".")
import jax  # noqa: E402

from tests.gpu.mosaic_gpu_check import _jitted  # noqa: E402

FNS = {}
for lens in ([2048] * 4, [8192]):
    fn, args, _ = FNS[len(lens)] = _jitted(lens, 16, 32, 128, seed=1)
    for _ in range(5):
        jax.block_until_ready(fn(*args))
    rows = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        rows.append(((t2 - t0) / 20e-3, (t1 - t0) / 20e-3))
    lat = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        lat.append((time.perf_counter() - t0) * 1e3)
    print(f"probe {len(lens)}x{lens[0]}: in flight {statistics.median(r[0] for r in rows):.3f} ms/call, "
          f"dispatch {statistics.median(r[1] for r in rows):.3f} ms/call, one call {statistics.median(lat):.3f} ms",
          flush=True)

# the GPU's own view: kernel durations and the busy span of 20 calls at 4x2048 and 1x8192 (CUPTI trace)
import collections  # noqa: E402
import glob  # noqa: E402
import tempfile  # noqa: E402

for lens in ([2048] * 4, [8192]):
    try:
        fn, args, _ = FNS[len(lens)]
        jax.block_until_ready(fn(*args))
        d = tempfile.mkdtemp()
        with jax.profiler.trace(d):
            for _ in range(20):
                out = fn(*args)
            jax.block_until_ready(out)
        path = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
        prof = jax.profiler.ProfileData.from_file(path)
        for plane in prof.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            per = collections.defaultdict(list)
            lo, hi = None, None
            for line in plane.lines:
                for ev in line.events:
                    per[ev.name].append(ev.duration_ns)
                    s, e = ev.start_ns, ev.start_ns + ev.duration_ns
                    lo = s if lo is None else min(lo, s)
                    hi = e if hi is None else max(hi, e)
            busy = sum(sum(v) for v in per.values()) / 20e3
            print(f"trace {len(lens)}x{lens[0]} {plane.name}: span {(hi - lo) / 20e3 if lo else 0:.1f} us/call, "
                  f"sum of events {busy:.1f} us/call")
            for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:14]:
                print(f"   {sum(v) / 20e3:8.1f} us/call  n={len(v):4d}  {name[:110]}")
    except Exception as e:  # noqa: BLE001
        print(f"trace {lens}: ERROR {type(e).__name__}: {str(e)[:300]}")
