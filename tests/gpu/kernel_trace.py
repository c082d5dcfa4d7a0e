"""The GPU's own view of a jitted call: kernel durations over ``calls`` calls (a CUPTI trace through
jax.profiler), for tests/gpu/dispatch_probe.py and tests/gpu/l2norm_trace.py."""
from __future__ import annotations

import collections
import glob
import tempfile

import jax


def kernel_times(fn, args, calls: int = 20) -> list[tuple[str, dict[str, list[int]], float]]:
    """[(GPU plane name, {kernel name: durations in ns}, busy span in ns)] of ``calls`` calls of
    ``fn(*args)`` after one warm call."""
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    prof = jax.profiler.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    planes = []
    for plane in prof.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        per, lo, hi = collections.defaultdict(list), None, None
        for line in plane.lines:
            for ev in line.events:
                per[ev.name].append(ev.duration_ns)
                s, e = ev.start_ns, ev.start_ns + ev.duration_ns
                lo = s if lo is None else min(lo, s)
                hi = e if hi is None else max(hi, e)
        planes.append((plane.name, dict(per), float(hi - lo) if lo is not None else 0.0))
    return planes


def print_kernel_times(label: str, fn, args, calls: int = 20, top: int = 14) -> None:
    """:func:`kernel_times` printed per call: the span, the sum of events and the ``top`` kernels."""
    for name, per, span in kernel_times(fn, args, calls):
        busy = sum(sum(v) for v in per.values()) / (calls * 1e3)
        print(f"trace {label} {name}: span {span / (calls * 1e3):.1f} us/call, sum of events {busy:.1f} us/call")
        for kname, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:top]:
            print(f"   {sum(v) / (calls * 1e3):8.1f} us/call  n={len(v):4d}  {kname[:110]}")
