"""``python -m gdn demo``: plan a Qwen3.5-shaped varlen batch, run every implementation present,
print each one's error against the float64 reference and its time per call."""
from __future__ import annotations

import time

import numpy as np

from . import reference, tolerances
from .api import prefill
from .arrays import convert, on_gpu, sync
from .inputs import make_inputs, round_to_dtype
from .planner import plan
from .registry import implementations


def _shape(gpu: bool) -> dict:
    if gpu:  # Qwen3.5 linear-attention layer, a realistic serving mix of lengths
        return dict(lens=[4096, 2048, 1000, 513, 64, 1, 0, 300, 77], h=16, hv=32, k=128, v=128,
                    ref_seqs=[4, 5, 6, 8])
    return dict(lens=[100, 0, 1, 64, 37], h=2, hv=6, k=32, v=32, ref_seqs=None)


def main(argv: list[str] | None = None) -> int:
    dtype = "bfloat16"
    impls = implementations()
    gpu = any(on_gpu(i.backend) for i in impls if i.available)
    cfg = _shape(gpu)
    x = make_inputs(cfg["lens"], cfg["h"], cfg["hv"], cfg["k"], cfg["v"], initial_state=True, seed=0)
    p = plan(x.cu_seqlens)
    print(f"gdn demo on {'GPU' if gpu else 'CPU'}: H={cfg['h']} HV={cfg['hv']} K={cfg['k']} "
          f"V={cfg['v']} {dtype}, lengths {cfg['lens']}")
    print(p.summary())
    print(f"chunk_indices[:6] = {p.chunk_indices[:6].tolist()}  chunk_offsets = "
          f"{p.chunk_offsets[: p.num_seqs + 1].tolist()}")

    # float64 truth: on a GPU only for a few short sequences (each sequence is independent)
    seqs = cfg["ref_seqs"] or list(range(p.num_seqs))
    cu = x.cu_seqlens
    toks = np.concatenate([np.arange(cu[n], cu[n + 1]) for n in seqs]).astype(np.int64)
    sub_cu = np.concatenate([[0], np.cumsum([cu[n + 1] - cu[n] for n in seqs])])
    rounded = [round_to_dtype(a, dtype) for a in x.arrays[:3]] + list(x.arrays[3:])
    o_ref, s_ref = reference.recurrent(*(a[:, toks] for a in rounded[:3]),
                                       *(a[:, toks] for a in rounded[3:]), cu_seqlens=sub_cu,
                                       initial_state=x.initial_state[seqs])
    bar = tolerances.vs_f64(dtype)
    print(f"\n{'backend':8} {'impl':14} {'o err':>9} {'state err':>9} {'ms/call':>9}  status")
    worst = 0.0
    for im in impls:
        if not im.available:
            print(f"{im.backend:8} {im.impl:14} {'-':>9} {'-':>9} {'-':>9}  not available: {im.reason}")
            continue
        args = [convert(a, im.backend, dtype) for a in x.arrays[:3]]
        args += [convert(a, im.backend, "float32") for a in x.arrays[3:]]
        h0 = convert(x.initial_state, im.backend, "float32")
        run = lambda: prefill(*args, plan=p, initial_state=h0, backend=im.backend, impl=im.impl)
        try:
            o, s = sync(run())
            t0 = time.perf_counter()
            reps = 20 if gpu else 2
            for _ in range(reps):
                out = run()
            sync(out)
            ms = (time.perf_counter() - t0) / reps * 1e3
        except NotImplementedError as e:
            print(f"{im.backend:8} {im.impl:14} {'-':>9} {'-':>9} {'-':>9}  unsupported here: {e}")
            continue
        eo = reference.rms_ratio(reference.to_numpy64(o)[:, toks], o_ref)
        es = reference.rms_ratio(reference.to_numpy64(s)[seqs], s_ref)
        worst = max(worst, eo, es)
        ok = "ok" if max(eo, es) < bar else f"FAIL (bar {bar:g})"
        print(f"{im.backend:8} {im.impl:14} {eo:9.2e} {es:9.2e} {ms:9.3f}  {ok}")
    print(f"\nerrors are rms(out - ref) / rms(ref) against the float64 token loop; bar {bar:g}")
    return 0 if worst < bar else 1
