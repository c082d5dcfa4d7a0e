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
from tests.gpu.kernel_trace import print_kernel_times  # noqa: E402

for lens in ([2048] * 4, [8192]):
    try:
        fn, args, _ = FNS[len(lens)]
        print_kernel_times(f"{len(lens)}x{lens[0]}", fn, args)
    except Exception as e:  # noqa: BLE001
        print(f"trace {lens}: ERROR {type(e).__name__}: {str(e)[:300]}")
