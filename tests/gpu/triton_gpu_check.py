#!/usr/bin/env python3
"""The Triton backend on a CUDA GPU (the H200), one script, about 2-3 minutes:

    python tests/gpu/triton_gpu_check.py          (from the repository root, or anywhere)

Sections (each prints its own result; an error is printed and the next section runs):

 1. environment and implementation status
 2. edge cases at the Qwen3.5 head sizes (H=16, HV=32, K=V=128; also G=3, odd and 256 head
    dims, fp32 / fp16) against the float64 reference (gdn.tolerances bars)
 3. one compilation per kernel for two batches of different lengths (Triton's JIT cache)
 4. CUDA-graph capture and replay of a varlen prefill with a prebuilt plan, against eager, also
    after new data is copied into the captured inputs (capture fails on any device-to-host sync)
 5. sync detector: 50 ms of queued matmuls, the prefill must return to the host long before
 6. against FLA (fla-core 0.6.0, FLA_FLASH_QLA=0), vLLM's bar (gdn.tolerances.VS_FLA)
 7. timings at H=16, HV=32, K=V=128, bf16, fp32 state: 1x32768, 4x8192, 8x4096, 128x256;
    triton.testing.do_bench medians, host time per call with a prebuilt plan, vs FLA; the
    opt-in fused-output variant (state.FUSE_OUTPUT); and the time of each of our kernels
 8. a 300k-token batch (int64 offsets: h alone holds 2.5e9 elements) against the same batch
    split in two calls chained through the state (last: a fault there cannot hide the rest)

Optional (only when named: ``python tests/gpu/triton_gpu_check.py tuning_sweep``, ~2 min):
 9. tuning_sweep: each kernel's time under the SWEEP tile / warp / stage / precision
    configurations (the TILES overrides of intra.py, wu.py, state.py, output.py) at 1x32768,
    4x8192 and 128x256, then the chain with each kernel's fastest one, against FLA

10. exact_split: the two-pass split against float64 and against the unsplit call, timed at
    1x32768 / 28672+4096 with 4, 8 and 32 v heads beside FLA (~2 min)

Exit status: the number of failed sections. Arguments: only the sections named (e.g. timings).
GDN_GPU_CHECK_SMOKE=1 runs the script's own logic on the CPU in Triton's interpreter at tiny
sizes (the CUDA-only sections skip): a check of this script, not of the GPU.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

os.environ.setdefault("FLA_FLASH_QLA", "0")  # FLA 0.6.0 would switch to FlashQLA if importable
SMOKE = os.environ.get("GDN_GPU_CHECK_SMOKE") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gdn  # noqa: E402
from gdn import reference as R  # noqa: E402
from gdn.inputs import make_inputs, round_to_dtype  # noqa: E402
from gdn.tolerances import RMS_BETWEEN, RMS_VS_F64, VS_FLA  # noqa: E402

if SMOKE:
    DEV = torch.device("cpu")
    H, HV, K, V = 2, 4, 32, 32
else:
    DEV = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    H, HV, K, V = 16, 32, 128, 128
RESULTS: list[tuple[str, str]] = []
SECTIONS: list = []
OPTIONAL: list = []


def section(fn):
    """Register a section (run in the order of definition by main)."""
    SECTIONS.append(fn)
    return fn


def optional_section(fn):
    """A section run only when named on the command line."""
    OPTIONAL.append(fn)
    return fn


def run_section(fn):
    """Run one section; record PASS / FAIL / SKIP and keep going whatever happens."""
    name = fn.__name__
    print(f"\n=== {name} " + "=" * max(0, 70 - len(name)), flush=True)
    t0 = time.perf_counter()
    try:
        status = fn() or "PASS"
    except Exception:  # noqa: BLE001 - a section must never hide the next ones
        traceback.print_exc()
        status = "FAIL"
    if DEV is not None and DEV.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:  # a sticky CUDA error: later sections will report it too
            traceback.print_exc()
            status = "FAIL"
    print(f"--- {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    RESULTS.append((name, status))


def case(lens, *, h=H, hv=HV, k=K, v=V, dtype="bfloat16", initial_state=False, l2=False,
         pad=0, gates="qwen", seed=0):
    """(tensors on the GPU, prefill kwargs, float64 reference (o, final))."""
    x = make_inputs(lens, h=h, hv=hv, k=k, v=v, gates=gates, initial_state=initial_state,
                    l2norm_qk=not l2, pad_tokens=pad, seed=seed)
    qkv = [round_to_dtype(a, dtype) for a in (x.q, x.k, x.v)]
    tdt = getattr(torch, dtype)
    tens = [torch.from_numpy(a).to(DEV, tdt) for a in qkv]
    tens += [torch.from_numpy(a).to(DEV) for a in (x.g, x.beta)]
    h0 = None if x.initial_state is None else torch.from_numpy(x.initial_state).to(DEV)
    kw = dict(cu_seqlens=x.cu_seqlens, initial_state=h0, use_qk_l2norm=l2)
    ref = R.chunked(*qkv, x.g, x.beta, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                    use_qk_l2norm=l2)
    return tens, kw, ref


def qwen_batch(lens, *, h=H, hv=HV, k=K, v=V, seed=0, l2=False):
    """Qwen3.5-like bf16 inputs generated on the GPU (large batches): L2-normalized q, k
    (unless ``l2``), realistic gates (DESIGN.md §3), fp32 initial state."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    t = int(sum(lens))
    rn = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    q, kk = rn(1, t, h, k), rn(1, t, h, k)
    if not l2:
        q, kk = (torch.nn.functional.normalize(x, dim=-1) for x in (q, kk))
    vv = rn(1, t, hv, v)
    a_log = torch.log(torch.rand(hv, device=DEV, generator=gen) * 16 + 1e-6)
    dt = torch.exp(torch.rand(hv, device=DEV, generator=gen) * np.log(100) + np.log(1e-3))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    g = -torch.exp(a_log) * torch.nn.functional.softplus(rn(1, t, hv) + dt_bias)
    beta = torch.sigmoid(rn(1, t, hv))
    h0 = 0.1 * rn(len(lens), hv, k, v)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return [q.bfloat16(), kk.bfloat16(), vv.bfloat16(), g, beta], h0, cu


def bar_check(o, f, ro, rf, dtype, label):
    bar = RMS_VS_F64[dtype]
    eo, ef = R.rms_ratio(o, ro), R.rms_ratio(f, rf)
    ok = eo < bar and ef < bar
    print(f"  {label:48s} o {eo:.2e}  final {ef:.2e}  (bar {bar:.0e})  {'ok' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------
@section
def environment():
    import triton

    from gdn.triton_backend import impl_status

    name = torch.cuda.get_device_name() if DEV is not None and DEV.type == "cuda" else DEV
    print(f"  device {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"impl_status {impl_status()}, smoke {SMOKE}")
    if DEV is None:
        raise RuntimeError("no CUDA device: this script checks the GPU kernels")


@section
def correctness_vs_float64():
    ok = True
    both, bf16 = ("bfloat16", "float32"), ("bfloat16",)  # each new variant compiles (seconds)
    specs = [
        ("Qwen G=2 edges + empty middle, h0", both, dict(lens=[100, 0, 1, 63, 64, 65],
                                                        initial_state=True)),
        ("Qwen G=2 l2norm in kernel, padded tokens", bf16, dict(lens=[300, 7, 129], l2=True,
                                                                pad=29)),
        ("Qwen G=2 strong gates", bf16, dict(lens=[130, 64], gates="strong", initial_state=True)),
        ("G=3 (H=8, HV=24)", bf16, dict(lens=[200, 65, 1], h=8, hv=24, initial_state=True)),
        ("odd heads K=100 V=60, G=3, l2norm", both, dict(lens=[130, 1, 64], h=2, hv=6, k=100,
                                                         v=60, initial_state=True, l2=True,
                                                         pad=7)),
        ("K=V=256, G=1", bf16, dict(lens=[130, 5], h=2, hv=2, k=256, v=256, initial_state=True)),
    ]
    for label, dtypes, spec in specs:
        for dtype in dtypes:
            tens, kw, (ro, rf) = case(**spec, dtype=dtype, seed=len(label))
            o, f = gdn.prefill(*tens, backend="triton", **kw)
            ok &= bar_check(o, f, ro, rf, dtype, f"{label} [{dtype}]")
            if spec.get("pad"):
                n = int(kw["cu_seqlens"][-1])
                zero = bool(torch.all(o[:, n:] == 0))
                print(f"    padded tokens give zero output: {zero}")
                ok &= zero
    tens, kw, (ro, rf) = case([70, 70, 3], dtype="float16", initial_state=True, seed=3)
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    ok &= bar_check(o, f, ro, rf, "float16", "Qwen G=2 [float16]")
    if not ok:
        raise AssertionError("some case misses its bar")


@section
def one_compilation_per_call_pattern():
    if SMOKE:
        return "SKIP"
    from gdn.triton_backend import intra, output, state, wu

    kernels = [intra._intra_kernel, wu._wu_kernel, state._state_kernel, output._output_kernel]
    for kern in kernels:
        kern.device_caches[DEV.index][0].clear()
    for i, lens in enumerate(([100, 20], [31, 64, 1, 7, 0, 1290])):
        batch, h0, cu = qwen_batch(lens, seed=i, l2=True)
        gdn.prefill(*batch, cu_seqlens=cu, initial_state=h0, use_qk_l2norm=True,
                    backend="triton")
    counts = [len(kern.device_caches[DEV.index][0]) for kern in kernels]
    print(f"  JIT cache entries after two batches (intra, wu, state, output): {counts}")
    if counts != [1, 1, 1, 1]:
        raise AssertionError("a kernel compiled more than once")


@section
def cuda_graph_capture_and_replay():
    if SMOKE:
        return "SKIP"
    lens = [1000, 0, 63, 4096, 1, 777]
    batch, h0, cu = qwen_batch(lens, seed=1)
    plan = gdn.plan(cu)  # prebuilt: its device copy is made (and memoized) by the eager call
    o_eager, f_eager = gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, f = gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(o, o_eager) and torch.equal(f, f_eager)
    print(f"  captured (no sync on the path); replay == eager bitwise: {same}")
    new, h0_new, _ = qwen_batch(lens, seed=2)
    for dst, src in zip(batch + [h0], new + [h0_new]):
        dst.copy_(src)
    graph.replay()
    o_e2, f_e2 = gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")
    torch.cuda.synchronize()
    same2 = torch.equal(o, o_e2) and torch.equal(f, f_e2)
    print(f"  new inputs copied in, replay == eager bitwise: {same2}")
    if not (same and same2):
        raise AssertionError("graph replay differs from eager")


@section
def sync_detector():
    """About 50 ms of bf16 8192^3 matmuls (~1.4 ms each) queued, then the prefill: the host
    must get control back long before the queue drains (a sync would wait it out)."""
    if SMOKE:
        return "SKIP"
    lens = [256, 2048, 8192, 8192]
    batch, h0, cu = qwen_batch(lens, seed=3)
    plan = gdn.plan(cu)
    run = lambda: gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")  # noqa
    run()
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS warm-up, then the time of one matmul
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 10
    n = min(400, max(20, int(0.05 / per) + 1))
    worst = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            a @ a
        t_queued = time.perf_counter()
        run()
        t_back = time.perf_counter()
        torch.cuda.synchronize()
        queue_ms = (time.perf_counter() - t0) * 1e3
        host_ms = (t_back - t_queued) * 1e3
        worst = max(worst, host_ms / queue_ms)
        print(f"  {n} matmuls ({per * 1e3:.2f} ms each): {queue_ms:.1f} ms of GPU work queued; "
              f"the prefill returned after {host_ms:.2f} ms")
    if worst > 0.2:
        raise AssertionError("the prefill waited for the GPU: a device-to-host sync")


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.utils import prepare_chunk_indices
    except Exception as e:  # noqa: BLE001
        print(f"  fla-core not importable ({type(e).__name__}: {e}): skipped")
        return None
    return chunk_gated_delta_rule, prepare_chunk_indices


def _fla_call(fla, batch, h0, cu, l2=False):
    chunk_gdr, prep_ci = fla
    cu_cpu = torch.as_tensor(cu, dtype=torch.long)
    cu_dev = cu_cpu.to(DEV)
    ci = prep_ci(cu_dev, 64, cu_seqlens_cpu=cu_cpu)
    return lambda: chunk_gdr(*batch, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu_dev, chunk_indices=ci, use_qk_l2norm_in_kernel=l2)


@section
def against_fla():
    fla = _fla()
    if fla is None:
        return "SKIP"
    ok = True
    for l2 in (False, True):
        batch, h0, cu = qwen_batch([2048, 1000, 64, 1, 4000, 0, 333], seed=4, l2=l2)
        o_f, f_f = _fla_call(fla, batch, h0, cu, l2)()
        o, f = gdn.prefill(*batch, cu_seqlens=cu, initial_state=h0, use_qk_l2norm=l2,
                           backend="triton")
        d_o, d_f = (o.float() - o_f.float()).abs(), (f - f_f.float()).abs()
        vals = dict(o_max=d_o.max().item(), o_mean=d_o.mean().item(),
                    state_max=d_f.max().item(), state_mean=d_f.mean().item())
        good = all(vals[key] < VS_FLA[key] for key in VS_FLA)
        ok &= good
        print(f"  use_qk_l2norm={l2}: " + ", ".join(f"{key} {val:.2e} (<{VS_FLA[key]:.0e})"
                                                  for key, val in vals.items())
              + f"  {'ok' if good else 'FAIL'}")
    if not ok:
        raise AssertionError("outside vLLM's bar against FLA")


def _host_us(fn, n=30):
    if SMOKE:
        n = 1
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / n * 1e6


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _do_bench():
    """triton.testing.do_bench, or under SMOKE one timed call (the script's logic, not a timing)."""
    if not SMOKE:
        from triton.testing import do_bench
        return do_bench

    def once(fn, return_mode=None):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


@section
def timings():
    do_bench = _do_bench()
    from gdn.triton_backend import state

    fla = _fla()
    layouts = [(1, 200), (3, 70)] if SMOKE else [(1, 32768), (4, 8192), (8, 4096), (128, 256)]
    rows, stages = [], []
    for n, t in layouts:
        batch, h0, cu = qwen_batch([t] * n, seed=5)
        plan = gdn.plan(cu)
        ours = lambda: gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")  # noqa
        ms = do_bench(ours, return_mode="median")
        host = _host_us(ours)
        state.FUSE_OUTPUT = True  # the opt-in variant: o computed inside the state pass
        try:
            ms_fused = do_bench(ours, return_mode="median")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ms_fused = float("nan")
        finally:
            state.FUSE_OUTPUT = False
        ms_f = host_f = float("nan")
        if fla is not None:
            try:
                call = _fla_call(fla, batch, h0, cu)
                ms_f = do_bench(call, return_mode="median")
                host_f = _host_us(call)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        rows.append((f"{n}x{t}", ms, ms_fused, ms_f, host, host_f))
        # our kernels one by one (the chain's own arguments)
        calls = stage_calls(batch, h0, plan)
        stages.append((f"{n}x{t}",) + tuple(do_bench(fn, return_mode="median")
                                            for fn in calls.values()))
    print(f"\n  H={H} HV={HV} K={K} V={V}, bf16 inputs, fp32 initial and final state")
    print("  | layout   | gdn triton ms | fused-output variant ms | FLA ms | FLA / gdn | "
          "gdn host us/call | FLA host us/call |")
    print("  |----------|---------------|-------------------------|--------|-----------|"
          "------------------|------------------|")
    for name, ms, ms_fused, ms_f, host, host_f in rows:
        print(f"  | {name:8s} | {ms:13.3f} | {ms_fused:23.3f} | {ms_f:6.3f} | {ms_f / ms:8.2f}x | "
              f"{host:16.0f} | {host_f:16.0f} |")
    print("\n  our kernels, do_bench median ms")
    print("  | layout   | intra | wu    | state | output |")
    print("  |----------|-------|-------|-------|--------|")
    for name, a, b, c, d in stages:
        print(f"  | {name:8s} | {a:5.3f} | {b:5.3f} | {c:5.3f} | {d:6.3f} |")


def stage_calls(batch, h0, plan) -> dict:
    """Each kernel of the chain alone on the chain's own intermediates: name -> callable."""
    from gdn.api import validate
    from gdn.triton_backend._common import device_plan
    from gdn.triton_backend.intra import launch_intra
    from gdn.triton_backend.output import launch_output
    from gdn.triton_backend.state import launch_state
    from gdn.triton_backend.wu import launch_wu

    _, args = validate(*batch, plan=plan, initial_state=h0, backend="triton")
    q, k, v, g, beta = (x[0] for x in batch)
    p = device_plan(plan, q.device)
    gc, ai, _ = launch_intra(k, g, beta, p, from_g=True, ai_dtype=k.dtype, l2norm=False)
    w, u = launch_wu(k, v, beta, gc, ai, p, None)
    hs, v_new, _ = launch_state(k, w, u, gc, p, h0, True, None)
    return {
        "intra": lambda: launch_intra(k, g, beta, p, from_g=True, ai_dtype=k.dtype,
                                      l2norm=False),
        "wu": lambda: launch_wu(k, v, beta, gc, ai, p, None),
        "state": lambda: launch_state(k, w, u, gc, p, h0, True, None),
        "output": lambda: launch_output(q, k, v_new, hs, gc, p, args.scale, None, None),
    }


@section
def long_batch_chained_in_two_calls():
    """300k tokens in two sequences vs the same sequences cut in two calls (cut points not on a
    chunk boundary), the second starting from the first call's final states."""
    lens = [170, 129] if SMOKE else [170_001, 129_999]
    cut = [85, 60] if SMOKE else [85_003, 60_017]
    batch, h0, cu = qwen_batch(lens, seed=6)
    o_full, f_full = gdn.prefill(*batch, cu_seqlens=cu, initial_state=h0, backend="triton")
    starts = cu[:-1]
    idx1 = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, cut)]).to(DEV)
    idx2 = torch.cat([torch.arange(s + c, s + n) for s, c, n in zip(starts, cut, lens)]).to(DEV)
    if SMOKE:
        idx1, idx2 = idx1.long(), idx2.long()
    part = lambda idx: [x[:, idx].contiguous() for x in batch]  # noqa: E731
    cu1 = np.concatenate([[0], np.cumsum(cut)])
    cu2 = np.concatenate([[0], np.cumsum(np.subtract(lens, cut))])
    o1, f1 = gdn.prefill(*part(idx1), cu_seqlens=cu1, initial_state=h0, backend="triton")
    o2, f2 = gdn.prefill(*part(idx2), cu_seqlens=cu2, initial_state=f1, backend="triton")
    o_chain = torch.empty_like(o_full)
    o_chain[:, idx1], o_chain[:, idx2] = o1, o2
    finite = bool(torch.isfinite(o_full).all() and torch.isfinite(f_full).all())
    eo, ef = R.rms_ratio(o_chain, o_full), R.rms_ratio(f2, f_full)
    bar = RMS_BETWEEN["bfloat16"]
    tail = R.rms_ratio(o_chain[:, -4096:], o_full[:, -4096:])
    print(f"  {sum(lens)} tokens, h holds {plan_rows(cu) * HV * K * V / 1e9:.2f}e9 elements; "
          f"finite {finite}; chained vs one call: o {eo:.2e} (last 4096 tokens {tail:.2e}), "
          f"final {ef:.2e} (bar {bar:.0e})")
    if not (finite and eo < bar and ef < bar and tail < bar):
        raise AssertionError("the long batch disagrees with itself")


def plan_rows(cu) -> int:
    return gdn.plan(cu).num_chunks


#: the configurations the sweep times, per kernel (module TILES overrides on top of the defaults,
#: {} = the default). The 2026-11-28 H200 sweep chose the defaults (gdn/triton_backend/README.md).
SWEEP = {
    "intra": [{}, {"num_warps": 2}, {"num_warps": 4}, {"SPREC": "ieee"}, {"num_stages": 1},
              {"INV": 0}],
    "wu": [{}, {"NP": 2}, {"BK": 128, "BV": 128}, {"BK": 128, "BV": 128, "num_warps": 8}],
    "state": [{}, {"BV": 32, "num_stages": 4}, {"BV": 64, "num_stages": 2},
              {"BV": 32, "num_stages": 3}, {"BV": 16, "num_stages": 3}],
    "output": [{}, {"HILO": True}, {"BV": 64, "num_warps": 4}, {"num_stages": 3},
               {"BK": 128}],
}


@optional_section
def tuning_sweep():
    """Each kernel alone under the SWEEP configurations, then the whole chain with each
    kernel's fastest configuration of that layout, against FLA (same inputs)."""
    from gdn.triton_backend import intra, output, state, wu

    mods = {"intra": intra, "wu": wu, "state": state, "output": output}
    if SMOKE:
        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        layouts = [(1, 130)]
    else:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, return_mode="median")
        layouts = [(1, 32768), (4, 8192), (128, 256)]
    fla = _fla()
    summary = []
    for n, t in layouts:
        batch, h0, cu = qwen_batch([t] * n, seed=7)
        plan = gdn.plan(cu)
        best = {}
        for name, configs in SWEEP.items():
            mod = mods[name]
            times = []
            for cfg in configs:
                mod.TILES.clear()
                mod.TILES.update(cfg)
                try:
                    ms = bench(stage_calls(batch, h0, plan)[name])
                    times.append((ms, cfg))
                    txt = f"{ms:8.3f} ms"
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    txt = f"failed: {type(e).__name__}: {str(e)[:80]}"
                finally:
                    mod.TILES.clear()
                print(f"  {n}x{t:<6d} {name:7s} {str(cfg or 'default'):48s} {txt}", flush=True)
            best[name] = min(times, key=lambda x: x[0]) if times else (float("nan"), {})
        chain = lambda: gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton")  # noqa
        ms_default = bench(chain)
        for name, (_, cfg) in best.items():
            mods[name].TILES.update(cfg)
        try:
            ms_best = bench(chain)
        finally:
            for mod in mods.values():
                mod.TILES.clear()
        ms_f = bench(_fla_call(fla, batch, h0, cu)) if fla is not None else float("nan")
        summary.append((f"{n}x{t}", ms_default, ms_best, ms_f,
                        {k: v[1] for k, v in best.items()}))
    print("\n  | layout   | chain default ms | chain per-kernel best ms | FLA ms | best configs")
    for name, a, b, c, cfgs in summary:
        print(f"  | {name:8s} | {a:16.3f} | {b:24.3f} | {c:6.3f} | {cfgs}")


@optional_section
def exact_split():
    """The exact two-pass split (gdn/triton_backend/split.py): the float64 bar on a varlen batch
    with gates without decay, then 1x32768 (and 28672+4096) at the tensor-parallel head counts
    H/HV = 2/4 and 2/8 and at 16/32: unsplit, the policy's pick and fixed piece sizes, FLA, the
    split's distance to the unsplit output, and what the model predicted."""
    from gdn.triton_backend.split import pick_piece_chunks, state_us

    do_bench = _do_bench()
    lens = [3000, 0, 130, 64, 700] if not SMOKE else [150, 0, 40]
    tens, kw, (ro, rf) = case(lens, h=2, hv=4, initial_state=True, seed=31)
    o, f = gdn.prefill(*tens, split=2, backend="triton", **kw)
    if not bar_check(o, f, ro, rf, "bfloat16", "split, pieces of 2 chunks"):
        raise AssertionError("the split misses the float64 bar")
    tens, kw, _ = case(lens, h=2, hv=4, initial_state=True, gates="none", seed=32)  # no decay: exactness
    (o_u, f_u), (o_s, f_s) = (gdn.prefill(*tens, split=sp, backend="triton", **kw) for sp in (None, 2))
    d_o, d_f = R.rms_ratio(o_s.float(), o_u.float()), R.rms_ratio(f_s, f_u)
    print(f"  gates without decay, split vs unsplit: o {d_o:.2e}, final {d_f:.2e} (bar {RMS_BETWEEN['bfloat16']:.0e})")
    if max(d_o, d_f) > RMS_BETWEEN["bfloat16"]:
        raise AssertionError("the split is far from the unsplit call without decay")
    fla = _fla()
    rows = []
    shapes = [((2, 4), [32768]), ((2, 4), [28672, 4096]), ((2, 8), [32768]), ((16, 32), [32768])]
    if SMOKE:
        shapes = [((2, 4), [300])]
    for (h, hv), lens in shapes:
        batch, h0, cu = qwen_batch(lens, h=h, hv=hv, seed=7)
        plan = gdn.plan(cu)
        run = lambda split=None: gdn.prefill(*batch, plan=plan, initial_state=h0, backend="triton",  # noqa: E731
                                             split=split)
        o_u, _ = run()
        pick = pick_piece_chunks(lens, hv, K, V)
        row = dict(layout=f"{h}/{hv} {'+'.join(map(str, lens))}", pick=pick, unsplit=do_bench(run, return_mode="median"))
        nc = -(-np.asarray(lens) // 64)
        row["model_unsplit_us"] = state_us(nc, hv, V, 132)
        for pc in sorted({64, 128, pick or 64} if not SMOKE else {2}):
            o_s, _ = run(pc)
            row[f"split{pc}"] = do_bench(lambda pc=pc: run(pc), return_mode="median")
            row[f"split{pc}_rms_vs_unsplit"] = R.rms_ratio(o_s.float(), o_u.float())
        if fla is not None and not SMOKE:
            try:
                row["fla"] = do_bench(_fla_call(fla, batch, h0, cu), return_mode="median")
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    bad = [r for r in rows for k, v in r.items() if k.endswith("_rms_vs_unsplit") and v > RMS_BETWEEN["bfloat16"]]
    if bad:
        raise AssertionError(f"split far from unsplit: {bad}")


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    for fn in SECTIONS + OPTIONAL:
        named = fn.__name__ in argv or fn.__name__ == "environment"
        if named or (not argv and fn in SECTIONS):
            run_section(fn)
    print(f"\n=== summary ({time.perf_counter() - t0:.0f} s)")
    for name, status in RESULTS:
        print(f"  {status:4s}  {name}")
    return sum(status == "FAIL" for _, status in RESULTS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
