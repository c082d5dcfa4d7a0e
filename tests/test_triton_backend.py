"""The Triton backend against the float64 reference, stage by stage, plus its contracts.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, as ``./run test``
sets it) on CPU tensors; on a GPU machine the same tests run on CUDA. Tests marked ``gpu`` need
CUDA (Qwen3.5 head sizes, real JIT cache, CUDA graphs) and skip here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import gdn  # noqa: E402
from gdn import reference as R  # noqa: E402
from gdn.api import validate  # noqa: E402
from gdn.arrays import torch_device  # noqa: E402
from gdn.inputs import make_inputs, round_to_dtype  # noqa: E402
from gdn.tolerances import RMS_STAGE, RMS_VS_F64  # noqa: E402

tb = pytest.importorskip("gdn.triton_backend")
from gdn.triton_backend import cumsum, intra, output, state, wu, xcompile  # noqa: E402
from gdn.triton_backend._common import check_device  # noqa: E402

_STATUS = tb.impl_status()["triton"]
pytestmark = pytest.mark.skipif(_STATUS is not None, reason=f"triton backend unusable: {_STATUS}")

DEV = torch_device()
ON_GPU = DEV == "cuda"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _inputs(lens, *, h=1, hv=2, k=32, v=32, dtype="bfloat16", initial_state=False, l2=False,
            pad=0, gates="qwen", beta=None, seed=0, batch=None):
    """(torch tensors on DEV, kwargs for prefill, the float64 reference inputs).

    q, k, v are rounded to ``dtype`` first so the reference sees what the kernels see.
    ``batch=(B, T)``: the fixed [B, T] layout instead of cu_seqlens.
    """
    x = make_inputs(lens, h=h, hv=hv, k=k, v=v, gates=gates, beta=beta,
                    initial_state=initial_state, l2norm_qk=not l2, pad_tokens=pad, seed=seed)
    qkv = [round_to_dtype(a, dtype) for a in (x.q, x.k, x.v)]
    arrays = [*qkv, x.g, x.beta]
    if batch is not None:
        arrays = [a.reshape(*batch, *a.shape[2:]) for a in arrays]
    tdt = getattr(torch, dtype)
    tens = [torch.from_numpy(a).to(DEV, tdt) for a in arrays[:3]]
    tens += [torch.from_numpy(a).to(DEV) for a in arrays[3:]]
    h0 = None if x.initial_state is None else torch.from_numpy(x.initial_state).to(DEV)
    kw = dict(initial_state=h0, use_qk_l2norm=l2)
    if batch is None:
        kw["cu_seqlens"] = x.cu_seqlens
    ref_kw = dict(initial_state=x.initial_state, use_qk_l2norm=l2,
                  cu_seqlens=None if batch is not None else x.cu_seqlens)
    return tens, kw, (arrays, ref_kw)


def _reference(ref, stages=False, plan=None):
    arrays, kw = ref
    if plan is not None:
        kw = {**kw, "cu_seqlens": None, "plan": plan}
    return R.chunked(*arrays, stages=stages, **kw)


def _check(o, f, ro, rf, dtype, what=""):
    bar = RMS_VS_F64[dtype]
    eo, ef = R.rms_ratio(o, ro), R.rms_ratio(f, rf)
    assert eo < bar and ef < bar, f"{what} {dtype}: o {eo:.2e}, final state {ef:.2e} (bar {bar})"
    return eo, ef


# ------------------------------------------------------------------------------------------
# end to end against float64
# ------------------------------------------------------------------------------------------
CASES = {
    # every short length, an empty sequence in the middle, G = 3
    "edges_G3": dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=3),
    # G = 2, odd head dims, initial state, in-kernel l2norm, padded tokens past cu_seqlens[-1]
    "odd_dims_h0_l2_pad": dict(lens=[70, 5, 0], h=2, hv=4, k=24, v=40, initial_state=True, l2=True,
                               pad=20),
    # G = 1, the state wiped at every token, a 2-chunk sequence
    "strong_gates_G1": dict(lens=[130], h=2, hv=2, gates="strong", initial_state=True),
    # no decay on half the tokens, beta near 1
    "no_decay_beta_high": dict(lens=[64, 65], h=1, hv=2, k=40, v=24, gates="none", beta="high"),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_matches_float64(name, dtype):
    tens, kw, ref = _inputs(**CASES[name], dtype=dtype, seed=len(name))
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    ro, rf = _reference(ref)
    assert o.dtype == tens[0].dtype and o.shape == tens[2].shape and f.dtype == torch.float32
    _check(o, f, ro, rf, dtype, name)


def test_fp16_and_fixed_batch_layout():
    """fp16 once; the [B, T] layout without cu_seqlens (B sequences), an fp16 initial state."""
    tens, kw, ref = _inputs([70, 70], h=2, hv=2, dtype="float16", initial_state=True, seed=5,
                            batch=(2, 70))
    kw["initial_state"] = kw["initial_state"].half()
    ref[1]["initial_state"] = kw["initial_state"].float().cpu().numpy()
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    assert o.shape == (2, 70, 2, 32) and f.shape == (2, 2, 32, 32)
    ro, rf = _reference(ref)
    _check(o, f, ro, rf, "float16")


def test_scale_output_final_state_off_and_empty_batch():
    tens, kw, ref = _inputs([3, 40], dtype="float32", seed=7)
    o, f = gdn.prefill(*tens, backend="triton", scale=0.3, output_final_state=False, **kw)
    assert f is None
    ro, _ = R.chunked(*ref[0], scale=0.3, **ref[1])
    assert R.rms_ratio(o, ro) < RMS_VS_F64["float32"]
    # every sequence empty: no output rows, the final state is the initial state
    tens, kw, _ = _inputs([0, 0], dtype="float32", initial_state=True, seed=8)
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    assert o.shape[1] == 0 and torch.equal(f, kw["initial_state"])


def test_padded_tokens_get_zero_output_and_plan_padding_is_skipped():
    """Tokens past cu_seqlens[-1] hold garbage and give exactly zero; the plan's padded
    sequences and sentinel chunk rows do not disturb anything; initial_state with N_pad rows."""
    tens, kw, ref = _inputs([50, 0, 77], hv=2, dtype="float32", initial_state=True, pad=45, seed=9)
    cu = kw.pop("cu_seqlens")
    plan = gdn.plan(cu, num_tokens=tens[0].shape[1])
    assert plan.padded_seqs > plan.num_seqs and plan.padded_chunks > plan.num_chunks
    h0 = kw.pop("initial_state")
    h0_pad = torch.cat([h0, 100 * torch.ones(plan.padded_seqs - 3, *h0.shape[1:], device=DEV)])
    o, f = gdn.prefill(*tens, plan=plan, initial_state=h0_pad, backend="triton", **kw)
    assert torch.all(o[:, 127:] == 0) and torch.any(o[:, 126] != 0)
    assert f.shape[0] == 3
    ro, rf = _reference(ref)
    _check(o, f, ro, rf, "float32")
    assert torch.equal(f[1], h0[1])  # the empty middle sequence keeps its state


def test_caller_tensors_are_never_modified():
    """Non-contiguous views and a bf16 initial state go in; nothing the caller owns changes."""
    tens, kw, ref = _inputs([90, 20], h=2, hv=4, dtype="bfloat16", initial_state=True, l2=True,
                            seed=11)
    q, k, v, g, beta = tens
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    g_nc = torch.stack([g, g], -1)[..., 0]
    assert not q_nc.is_contiguous() and not g_nc.is_contiguous()
    h0 = kw.pop("initial_state").to(torch.bfloat16)
    args = [q_nc, k, v, g_nc, beta, h0]
    before = [a.clone() for a in args]
    o, f = gdn.prefill(q_nc, k, v, g_nc, beta, initial_state=h0, backend="triton", **kw)
    for a, b in zip(args, before):
        assert torch.equal(a, b)
    ref[1]["initial_state"] = h0.float().cpu().numpy()
    ro, rf = _reference(ref)
    _check(o, f, ro, rf, "bfloat16")


# ------------------------------------------------------------------------------------------
# stage by stage
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stages_match_the_chunked_reference(dtype):
    """Each stage tensor of the chain (return_stages) against gdn.reference.chunked's."""
    tens, kw, ref = _inputs([100, 0, 1, 65], h=1, hv=3, k=24, v=40, dtype=dtype,
                            initial_state=True, pad=10, seed=13)
    _, args = validate(*tens, backend="triton", **kw)
    o, f, st = tb.run(args, return_stages=True)
    ro, rf, rst = _reference(ref, stages=True, plan=args.plan)
    assert set(st) == set(rst)
    for name in rst:
        assert tuple(st[name].shape) == rst[name].shape, name
        bar = RMS_STAGE.get(name, RMS_VS_F64[dtype])
        err = R.rms_ratio(st[name], rst[name])
        assert err < bar, f"stage {name}: {err:.2e} (bar {bar})"
    want = {"gc": torch.float32, "Ai": torch.float32}
    for name in ("w", "u", "h", "v_new"):
        assert st[name].dtype == getattr(torch, dtype), name
    for name, dt in want.items():
        assert st[name].dtype == dt
    _check(o, f, ro, rf, dtype)


def test_each_stage_runs_on_its_own():
    """The stage entry points, each fed the reference's own inputs (fp32): what the parity
    suite does to compare stage by stage with the JAX port."""
    tens, kw, ref = _inputs([100, 0, 1, 65], h=2, hv=4, k=40, v=24, dtype="float32",
                            initial_state=True, seed=17)
    plan = gdn.plan(kw["cu_seqlens"])
    ro, rf, rst = _reference(ref, stages=True, plan=plan)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(DEV)
    q, k, v, g, beta = (x[0] for x in tens)
    bar = 1e-5

    gc = cumsum.chunk_cumsum(g, plan)
    assert R.rms_ratio(gc, rst["gc"]) < bar
    ai = intra.chunk_inverse(k, beta, t(rst["gc"]), plan)
    assert R.rms_ratio(ai, rst["Ai"]) < bar
    w, u = wu.wu(k, v, beta, t(rst["gc"]), t(rst["Ai"]), plan)
    assert R.rms_ratio(w, rst["w"]) < bar and R.rms_ratio(u, rst["u"]) < bar
    # the fused first kernel computes what the standalone stages compute
    gc2, ai2, w2, u2, _ = wu.prepare(k, v, g, beta, plan, store_ai=True)
    ai_k = intra.chunk_inverse(k, beta, gc, plan)
    w_k, u_k = wu.wu(k, v, beta, gc, ai_k, plan)
    for a, b in ((gc2, gc), (ai2, ai_k), (w2, w_k), (u2, u_k)):
        assert R.rms_ratio(a, b) < 1e-6
    h, v_new, final = state.state_pass(k, t(rst["w"]), t(rst["u"]), t(rst["gc"]), plan,
                                       initial_state=kw["initial_state"])
    assert R.rms_ratio(h, rst["h"]) < bar and R.rms_ratio(v_new, rst["v_new"]) < bar
    assert R.rms_ratio(final, rf) < bar
    o = output.output(q, k, t(rst["v_new"]), t(rst["h"]), t(rst["gc"]), plan, k.shape[-1] ** -0.5)
    assert R.rms_ratio(o, ro[0]) < bar


def test_triangular_solve_is_exact_on_a_hard_case():
    """All keys equal, beta = 1, no decay: I + A is the lower all-ones matrix, whose inverse is
    bidiagonal; products of A grow to C(63, 31) ~ 1e18, which a series / doubling solve would
    not survive. Forward substitution gets it to rounding."""
    n = 64
    k = torch.zeros(n, 1, 16, device=DEV)
    k[:, 0, 0] = 1.0
    beta = torch.ones(n, 1, device=DEV)
    gc = torch.zeros(n, 1, device=DEV)
    ai = intra.chunk_inverse(k, beta, gc, gdn.plan([0, n]))[:, 0].cpu().double().numpy()
    want = np.eye(n) - np.eye(n, k=-1)
    assert np.abs(ai - want).max() < 1e-6


# ------------------------------------------------------------------------------------------
# contracts: compile keys, devices
# ------------------------------------------------------------------------------------------
def _launch_keys(lens, *, dtype="bfloat16", initial_state=True, seed=0):
    tens, kw, _ = _inputs(lens, h=2, hv=4, dtype=dtype, initial_state=initial_state, l2=True,
                          seed=seed)
    _, launches = xcompile.record(lambda: gdn.prefill(*tens, backend="triton", **kw), dry=True)
    return {lc.name: xcompile.cache_key(lc) for lc in launches}


def test_one_compilation_per_call_pattern():
    """Two batches of different lengths, sequence counts and token counts, one call pattern:
    every kernel has the same JIT cache key (Triton's own key for an sm_90 device: dtypes,
    int/pointer specializations, constexprs, options), so nothing compiles twice."""
    a = _launch_keys([100, 20], seed=1)
    b = _launch_keys([31, 64, 1, 7, 0, 129], seed=2)
    assert set(a) == {"_intra_kernel", "_wu_kernel", "_state_kernel", "_output_kernel"}
    assert a == b
    # the key does see what must differ: the dtype, the None-ness of the initial state
    c = _launch_keys([100, 20], dtype="float32", seed=1)
    d = _launch_keys([100, 20], initial_state=False, seed=1)
    assert all(c[n] != a[n] for n in a)
    assert d["_state_kernel"] != a["_state_kernel"]
    assert d["_intra_kernel"] == a["_intra_kernel"] and d["_wu_kernel"] == a["_wu_kernel"]


def test_state_pass_tiles_by_occupancy_regime():
    """The state pass has two configurations per model shape: when the whole pass fits in one
    wave of the GPU at BV = 32 (one long sequence), BV = 32 and a deeper pipeline; else the
    64-wide default. So it compiles at most twice per call pattern, never per batch."""
    few = state.state_tiles(128, 128, torch.bfloat16, programs_per_v32=1 * 32 * 4, sms=132)
    many = state.state_tiles(128, 128, torch.bfloat16, programs_per_v32=4 * 32 * 4, sms=132)
    assert (few["BV"], few["num_stages"]) == (32, 4) and (many["BV"], many["num_stages"]) == (64, 2)
    assert state.state_tiles(128, 128, torch.float32, programs_per_v32=1)["BV"] == 64
    a = _launch_keys([100])
    b = _launch_keys([3] * 40)  # 40 sequences x 4 heads x 1 tile > 132: the default
    assert a["_state_kernel"] != b["_state_kernel"]
    assert all(a[n] == b[n] for n in a if n != "_state_kernel")


def test_device_errors_name_the_argument():
    q = torch.zeros(1, 4, 1, 16, device=DEV)
    meta = torch.zeros(1, 1, 16, 16, device="meta")
    with pytest.raises(ValueError, match="initial_state is on meta"):
        check_device(q, not ON_GPU, k=q, initial_state=meta)
    if not ON_GPU:
        with pytest.raises(ValueError, match="q is a CPU tensor"):
            check_device(q, False)
    with pytest.raises(ValueError, match="q is on meta"):
        check_device(meta, False)
    tens, kw, _ = _inputs([10], dtype="float32")
    tens[2] = tens[2].to("meta")
    with pytest.raises(ValueError, match="v is on meta"):
        gdn.prefill(*tens, backend="triton", **kw)


def test_cpu_tensors_without_interpreter_rejected_while_a_launch_hook_records(monkeypatch):
    """A hook that only records launches (the reliability check's "no launch" probe) must not
    switch the CPU-tensor check off; only a dry-run hook (host_tensors=True) does. Found on the
    H200: with a recording hook, CPU tensors reached Triton's own 'cannot be accessed' error."""
    from gdn.triton_backend import _chain, _common

    monkeypatch.setattr(_chain, "interpreted", lambda kernel: False)  # as on a GPU machine
    launched = []
    prev = _common.set_launch_hook(lambda *a: launched.append(a[0]) or False)
    try:
        tens, kw, _ = _inputs([10], dtype="float32")
        with pytest.raises(ValueError, match="q is a CPU tensor"):
            gdn.prefill(*[t.cpu() for t in tens], backend="triton", **kw)
        assert not launched
    finally:
        _common.set_launch_hook(prev)


def test_registry_and_impl_errors():
    impls = [i for i in gdn.implementations() if i.backend == "triton"]
    assert [i.impl for i in impls] == ["triton"] and impls[0].available
    tens, kw, _ = _inputs([10], dtype="float32")
    with pytest.raises(NotImplementedError, match="unknown impl"):
        gdn.prefill(*tens, backend="triton", impl="nope", **kw)
    with pytest.raises(NotImplementedError, match="chunk_size"):
        gdn.prefill(*tens, backend="triton", plan=gdn.plan(kw.pop("cu_seqlens"), chunk_size=32),
                    **kw)


def _run_compiled(argv: list[str]) -> subprocess.CompletedProcess:
    """``python argv`` from the repository root in a process WITHOUT TRITON_INTERPRET, so the
    kernels are JITFunctions that Triton's real compiler takes (cross-compilation needs it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=root,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the GPU tests compile for real")
def test_kernels_cross_compile_for_sm90():
    """Every kernel of the chain (and the fused-output state pass, and the split's pass 1 and scan) compiles down to an sm_90
    cubin (Triton's own pipeline and bundled ptxas, no GPU needed) at the Qwen3.5 shape and an
    odd one, within the H200's shared memory and free of the pipeline race of
    test_pipeline_hazard_detector_sees_the_l2norm_race (use_qk_l2norm on): the interpreter
    catches neither compile errors nor that race."""
    res = _run_compiled(["-m", "gdn.triton_backend.xcompile", "16,32,128,128,bfloat16", "2,6,256,100,float32"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("_state_kernel") == 4 and "NORM=True" in res.stdout, res.stdout
    assert res.stdout.count("MAPS=True") == 1, res.stdout  # the exact split's pass 1
    assert res.stdout.count("_scan_kernel") == 1, res.stdout  # and its scan


@pytest.mark.parametrize("mod, cfg", [("intra", {"INV": 0, "num_warps": 1}),
                                      ("wu", {"NP": 1}), ("output", {"HILO": False}),
                                      ("state", {"BV": 16})])
def test_tuning_variants_stay_correct(mod, cfg, monkeypatch):
    """The non-default TILES variants the GPU sweep times compute the same function."""
    monkeypatch.setattr(globals()[mod], "TILES", dict(cfg))
    tens, kw, ref = _inputs([100, 0, 1, 65], h=1, hv=2, k=40, v=24, l2=True, initial_state=True,
                            seed=21)
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    _check(o, f, *_reference(ref), "bfloat16", f"{mod} {cfg}")


def test_pipeline_hazard_detector_sees_the_l2norm_race():
    """The bug behind the H200's wrong use_qk_l2norm output (o 3e-2 to 7e-2, interpreter
    fine): Triton 3.6's pipeliner gives a tile that feeds a dot AND other arithmetic in a
    pipelined loop one slot fewer than its peers, so the next copy overwrites it while the
    asynchronous wgmma still reads it. The detector finds it in the sm_90 TTGIR of a repro
    kernel (2 and 3 stages) and not without the extra use; the chain's kernels are checked
    by test_kernels_cross_compile_for_sm90 (xcompile fails on a hazard). In a process of its
    own without TRITON_INTERPRET: with it set, a compile that misses Triton's cache fails in the
    code generator (seen on a fresh machine, 2026-12-03), so the in-process test passed only when
    an earlier compile had filled the cache."""
    code = "import json; from gdn.triton_backend import xcompile; print(json.dumps(xcompile.hazard_selftest()))"
    proc = _run_compiled(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res[0] and res[1] and not res[2] and not res[3], res


# ------------------------------------------------------------------------------------------
# on the GPU (skipped on CPU machines)
# ------------------------------------------------------------------------------------------
GPU_CASES = [
    dict(lens=[100, 0, 1, 63, 64, 65], initial_state=True),
    dict(lens=[300, 7], l2=True, pad=29),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_qwen_heads_match_float64(case, dtype):
    tens, kw, ref = _inputs(**GPU_CASES[case], h=16, hv=32, k=128, v=128, dtype=dtype, seed=case)
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    ro, rf = _reference(ref)
    _check(o, f, ro, rf, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hv, dk, dv", [(6, 100, 60), (3, 256, 256)])
def test_gpu_odd_and_large_heads(hv, dk, dv):
    tens, kw, ref = _inputs([130, 1, 64], h=3 if hv % 3 == 0 else 2, hv=hv, k=dk, v=dv,
                            initial_state=True, seed=3)
    o, f = gdn.prefill(*tens, backend="triton", **kw)
    ro, rf = _reference(ref)
    _check(o, f, ro, rf, "bfloat16")


@pytest.mark.gpu
def test_gpu_jit_cache_holds_one_entry_per_kernel_for_two_batches():
    kernels = [intra._intra_kernel, wu._wu_kernel, state._state_kernel, output._output_kernel]
    dev = torch.cuda.current_device()
    for k in kernels:
        k.device_caches[dev][0].clear()
    for lens in ([100, 20], [31, 64, 1, 7, 0, 129]):
        tens, kw, _ = _inputs(lens, h=2, hv=4, initial_state=True, l2=True)
        gdn.prefill(*tens, backend="triton", **kw)
    assert [len(k.device_caches[dev][0]) for k in kernels] == [1, 1, 1, 1]


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_like_eager():
    """A sync anywhere on the path (.item(), .tolist(), a host copy) fails the capture."""
    tens, kw, _ = _inputs([200, 0, 63, 1000], h=4, hv=8, k=128, v=128, initial_state=True)
    plan = gdn.plan(kw.pop("cu_seqlens"))
    o_ref, f_ref = gdn.prefill(*tens, plan=plan, backend="triton", **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, f = gdn.prefill(*tens, plan=plan, backend="triton", **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, o_ref) and torch.equal(f, f_ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_output_mode(monkeypatch, dtype):
    """state.FUSE_OUTPUT: o computed inside the state pass (h and v_new never stored) equals the
    separate output kernel up to summation order, and meets the float64 bar; with
    return_stages it still stores h and v_new."""
    tens, kw, ref = _inputs([100, 0, 1, 65], h=1, hv=3, k=24, v=40, dtype=dtype, l2=True,
                            initial_state=True, pad=10, seed=19)
    o1, f1 = gdn.prefill(*tens, backend="triton", **kw)
    monkeypatch.setattr(state, "FUSE_OUTPUT", True)
    _, launches = xcompile.record(lambda: gdn.prefill(*tens, backend="triton", **kw))
    o2, f2 = gdn.prefill(*tens, backend="triton", **kw)
    assert [lc.name for lc in launches] == ["_intra_kernel", "_wu_kernel", "_state_kernel"]
    # up to summation order, the final state too: the interpreter's dots are NumPy matmuls whose
    # kernel (and rounding) can follow the tile shapes and the machine's CPU (bitwise equal on one
    # CI machine, 9e-8 apart on another)
    assert R.rms_ratio(f2, f1) < 1e-6 and R.rms_ratio(o2, o1) < 1e-6
    assert torch.all(o2[:, 167:] == 0)
    ro, rf = _reference(ref)
    _check(o2, f2, ro, rf, dtype)
    _, args = validate(*tens, backend="triton", **kw)
    o3, f3, st = tb.run(args, return_stages=True)
    assert torch.equal(o3, o2) and st["h"].shape[0] == args.plan.num_chunks
