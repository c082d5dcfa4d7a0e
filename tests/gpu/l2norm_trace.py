"""Where use_qk_l2norm's cost goes on the mosaic_gpu path: the GPU's kernel durations (CUPTI trace,
20 calls) of the prefill with and without it, at the Qwen3.5 shape 4x8192 and at HV = 16."""
import collections
import glob
import sys
import tempfile

sys.path.insert(0, ".")
import jax  # noqa: E402

from tests.gpu.mosaic_gpu_check import _jitted  # noqa: E402

for lens, hv in (([8192] * 4, 32), ([8192] * 4, 16)):
    for l2 in (None, "fold"):
        fn, args, _ = _jitted(lens, 16, hv, 128, seed=1, _l2norm=l2)
        for _ in range(3):
            jax.block_until_ready(fn(*args))
        d = tempfile.mkdtemp()
        with jax.profiler.trace(d):
            for _ in range(20):
                out = fn(*args)
            jax.block_until_ready(out)
        prof = jax.profiler.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
        for plane in prof.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            per = collections.defaultdict(list)
            for line in plane.lines:
                for ev in line.events:
                    per[ev.name].append(ev.duration_ns)
            print(f"trace {len(lens)}x{lens[0]} HV{hv} l2norm={l2}: sum {sum(map(sum, per.values())) / 20e3:.1f} us/call")
            for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:10]:
                print(f"   {sum(v) / 20e3:8.1f} us/call  n={len(v):4d}  {name[:100]}")
