"""impl="mosaic_gpu" (gdn/jax_backend/mosaic_gpu) on a CPU-only machine.

Two kinds of checks:

* the kernels run under the Mosaic GPU interpreter on small shapes (K, V in {64, 128}, a few
  hundred tokens, HV 2-3) against the float64 token loop on the dtype-rounded inputs. The interpreter
  runs every warpgroup of a CTA as a thread whose barrier waits block XLA CPU callback threads; with
  the default single CPU device a 2-core machine has too few of them and a warp-specialized kernel
  deadlocks. So the interpreter cases run in ONE subprocess with ``JAX_NUM_CPU_DEVICES=4`` (this
  file run as a script), under a timeout.
* the whole prefill (both kernels and the XLA around them) is lowered for CUDA on this host
  (``.trace(...).lower(lowering_platforms=("cuda",))`` inside an abstract H200 mesh), so a kernel
  that Mosaic GPU cannot lower fails CI. (PTX assembly happens on the GPU only.)

The GPU itself is exercised by tests/gpu/mosaic_gpu_check.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, make_inputs kwargs, prefill kwargs, dtype, layout)
CASES = [
    ("varlen_G2_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=2, k=64, v=64, initial_state=True,
                              pad_tokens=20, seed=0), dict(), "bfloat16", "packed"),
    ("G3_K128_fp16_l2norm", dict(lens=[130, 70], h=1, hv=3, k=128, v=64, l2norm_qk=False, seed=1),
     dict(use_qk_l2norm=True, scale=0.2), "float16", "packed"),
    ("batch_G1_V128_strong", dict(lens=[96, 96], h=2, hv=2, k=64, v=128, gates="strong", seed=2),
     dict(), "bfloat16", "batch"),
    ("jit_traced_plan_no_final", dict(lens=[40, 150], h=1, hv=2, k=64, v=64, initial_state=True, seed=3),
     dict(output_final_state=False), "bfloat16", "jit"),
    ("fused_varlen_V128", dict(lens=[70, 0, 65], h=1, hv=2, k=64, v=128, initial_state=True, seed=4),
     dict(), "bfloat16", "packed:fused"),
    # the exact split (gdn.split) with its pieces run by this impl: values [v | 0], states [0 | I]
    ("split_pieces", dict(lens=[300, 40], h=1, hv=2, k=64, v=64, initial_state=True, seed=5),
     dict(), "bfloat16", "split"),
]


def _run_case(name, mk, kw, dtype, layout, interpret=True):
    """One case (interpreter by default; the GPU check runs them compiled); a dict of measured errors."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan, reference as R
    from gdn.inputs import make_inputs, round_to_dtype
    from gdn.jax_backend import mosaic_gpu as M

    x = make_inputs(**mk)
    qkv = [round_to_dtype(a, dtype) for a in (x.q, x.k, x.v)]
    q, k, v = (jnp.asarray(a, getattr(jnp, dtype)) for a in qkv)
    g, beta = jnp.asarray(x.g), jnp.asarray(x.beta)
    h0 = None if x.initial_state is None else jnp.asarray(x.initial_state)
    t_real = int(x.cu_seqlens[-1])
    ref_o, ref_f = R.recurrent(*qkv, x.g, x.beta, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                               scale=kw.get("scale"), use_qk_l2norm=kw.get("use_qk_l2norm", False))
    q_before = np.asarray(q).copy()
    layout, _, variant = layout.partition(":")
    opts = dict(variant=variant) if variant else {}
    if layout == "batch":
        nb = len(mk["lens"])
        resh = lambda a: a.reshape(nb, a.shape[1] // nb, *a.shape[2:])  # noqa: E731
        _, args = api.validate(resh(q), resh(k), resh(v), resh(g), resh(beta), initial_state=h0,
                               backend="jax", **kw)
        o, f = M.run(args, interpret=interpret, **opts)
        o = o.reshape(1, -1, *o.shape[2:])
    elif layout == "split":
        from gdn.planner import split_pieces
        from gdn.split import split_prefill

        def run_pieces(q, k, v, g, beta, *, plan, initial_state, scale, use_qk_l2norm):
            _, a = api.validate(q, k, v, g, beta, plan=plan, initial_state=initial_state, scale=scale,
                                use_qk_l2norm=use_qk_l2norm, backend="jax")
            return M.run(a, interpret=interpret, **opts)

        p = make_plan(x.cu_seqlens, num_tokens=q.shape[1])
        o, f = split_prefill(jnp, run_pieces, q, k, v, g, beta, plan=p, split=split_pieces(x.cu_seqlens, 2),
                             initial_state=h0, scale=mk["k"] ** -0.5, use_qk_l2norm=False)
    elif layout == "jit":
        p = make_plan(x.cu_seqlens, num_tokens=q.shape[1]).to_jax()
        if h0 is not None:  # under jit the plan's real count is unknown: states have N_pad rows
            h0 = jnp.pad(h0, ((0, p.padded_seqs - h0.shape[0]), (0, 0), (0, 0), (0, 0)))

        @jax.jit
        def fn(q, k, v, g, beta, h0, p):
            _, args = api.validate(q, k, v, g, beta, plan=p, initial_state=h0, backend="jax", **kw)
            return M.run(args, interpret=interpret, **opts)

        o, f = fn(q, k, v, g, beta, h0, p)
    else:
        _, args = api.validate(q, k, v, g, beta, cu_seqlens=x.cu_seqlens, initial_state=h0, backend="jax", **kw)
        o, f = M.run(args, interpret=interpret, **opts)
    o = np.asarray(o, np.float64)
    out = dict(name=name, dtype=dtype, o=R.rms_ratio(o[:, :t_real], ref_o[:, :t_real]),
               tail=float(np.abs(o[:, t_real:]).max()) if o.shape[1] > t_real else 0.0,
               unchanged=bool(np.array_equal(np.asarray(q), q_before)), o_shape=list(o.shape))
    if kw.get("output_final_state", True):
        f = np.asarray(f)
        out["final_rows"] = int(f.shape[0])
        out["final"] = R.rms_ratio(f, ref_f)
        out["per_seq_final"] = [R.rms_ratio(f[i], ref_f[i]) for i in range(len(mk["lens"]))]
    else:
        out["final_is_none"] = f is None
    return out


def _main_interpret_cases(path):
    import jax

    results = {}
    for case in CASES:
        t0 = time.time()
        try:
            res = _run_case(*case)
        except Exception as e:  # reported to the test, which fails with the message
            res = dict(name=case[0], error=f"{type(e).__name__}: {e}"[:2000])
        res["seconds"] = round(time.time() - t0, 1)
        results[case[0]] = res
        print(json.dumps(res), flush=True)
    with open(path, "w") as fh:
        json.dump(results, fh)
    assert jax.device_count() >= 3


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("mosaic") / "results.json"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret-cases", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreter_matches_float64(interp_results, case):
    from gdn.tolerances import vs_f64

    res = interp_results[case]
    assert "error" not in res, res.get("error")
    bar = vs_f64(res["dtype"])
    assert res["o"] < bar, res
    assert res["tail"] == 0.0, "tokens past cu_seqlens[-1] must read zero"
    assert res["unchanged"]
    if "final" in res:
        assert res["final"] < bar and max(res["per_seq_final"]) < bar, res
    else:
        assert res["final_is_none"]
    if case.startswith("jit"):
        assert res["final_is_none"]
    if case.startswith("varlen"):
        assert res["final_rows"] == 6  # the real sequence count (host plan)


def test_unsupported_calls_raise_not_implemented():
    import jax.numpy as jnp

    from gdn import api
    from gdn.jax_backend import mosaic_gpu as M

    def args_for(dtype, k=64, v=64):
        q = jnp.zeros((1, 70, 1, k), dtype)
        vv = jnp.zeros((1, 70, 2, v), dtype)
        g = jnp.zeros((1, 70, 2), jnp.float32)
        return api.validate(q, q, vv, g, g, cu_seqlens=[0, 30, 70], backend="jax")[1]

    assert M.unsupported_reason(args_for(jnp.bfloat16)) is None
    assert "fp32" in M.unsupported_reason(args_for(jnp.float32))
    assert "K in" in M.unsupported_reason(args_for(jnp.bfloat16, k=40))
    assert M.unsupported_reason(args_for(jnp.bfloat16, v=256)) is None  # the split's V + K columns
    with pytest.raises(NotImplementedError, match="fused"):
        M.run(args_for(jnp.bfloat16, v=256), interpret=True, variant="fused")
    with pytest.raises(NotImplementedError):
        M.run(args_for(jnp.float32), interpret=True)
    with pytest.raises(NotImplementedError):
        M.run(args_for(jnp.bfloat16, v=24), interpret=True)
    with pytest.raises(NotImplementedError):
        M.run(args_for(jnp.bfloat16), return_stages=True, interpret=True)
    if M.status() is not None:  # CPU-only machine: a plain call says why
        with pytest.raises(NotImplementedError, match="Hopper"):
            M.run(args_for(jnp.bfloat16))
    assert M.impl_status() == {"mosaic_gpu": M.status()}


def _lower_for_cuda(fn, *args):
    import jax
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dk,dv,h,hv,dtype,with_h0,final,variant", [
    (128, 128, 16, 32, "bfloat16", True, True, "two_kernels"),   # the Qwen3.5 head shape
    (64, 128, 1, 3, "float16", False, False, "two_kernels"),
    (128, 128, 16, 32, "bfloat16", True, True, "fused"),
])
def test_cross_lowers_to_cuda(dk, dv, h, hv, dtype, with_h0, final, variant):
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu._driver import prefill_arrays

    t = 256
    p = make_plan([0, 100, 100, 256], num_tokens=t)
    dt = getattr(jnp, dtype)
    sds = jax.ShapeDtypeStruct
    q = sds((1, t, h, dk), dt)
    v = sds((1, t, hv, dv), dt)
    g = sds((1, t, hv), jnp.float32)
    h0 = sds((p.padded_seqs, hv, dk, dv), jnp.float32) if with_h0 else None

    def fn(q, k, v, g, beta, h0, plan):
        _, args = api.validate(q, k, v, g, beta, plan=plan, initial_state=h0, output_final_state=final,
                               backend="jax")
        return prefill_arrays(args, variant=variant)

    lowered = _lower_for_cuda(fn, q, q, v, g, g, h0, p.to_jax())
    text = lowered.as_text()
    assert "mosaic_gpu" in text or "custom_call" in text


@pytest.mark.gpu
def test_prefill_picks_mosaic_gpu_on_hopper():
    """On an H200: gdn.prefill(impl=None) runs this implementation and matches float64."""
    import jax.numpy as jnp

    import gdn
    from gdn import reference as R
    from gdn.inputs import make_inputs, round_to_dtype
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.tolerances import vs_f64

    if M.status() is not None:
        pytest.skip(M.status())
    x = make_inputs([300, 0, 65, 1], h=2, hv=4, k=128, v=128, initial_state=True, seed=7)
    qkv = [round_to_dtype(a, "bfloat16") for a in (x.q, x.k, x.v)]
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv)
    args = (q, k, v, jnp.asarray(x.g), jnp.asarray(x.beta))
    kw = dict(cu_seqlens=x.cu_seqlens, initial_state=jnp.asarray(x.initial_state), backend="jax")
    o, f = gdn.prefill(*args, impl="mosaic_gpu", **kw)
    o2, f2 = gdn.prefill(*args, **kw)  # impl=None on Hopper: the same kernels
    ro, rf = R.recurrent(*qkv, x.g, x.beta, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    assert R.rms_ratio(o, ro) < vs_f64("bfloat16") and R.rms_ratio(f, rf) < vs_f64("bfloat16")
    assert np.array_equal(np.asarray(o, np.float32), np.asarray(o2, np.float32))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--interpret-cases":
    sys.path.insert(0, ROOT)
    _main_interpret_cases(sys.argv[2])
