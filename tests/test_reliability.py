"""Reliability (gdn issue 10): bad input, extreme input and scale never give a silent wrong
answer, a crash or a hang. The policy is written down in docs/RELIABILITY.md.

Everything goes through ``gdn.prefill`` itself, on real torch tensors (backend="triton": the
Triton interpreter on CPU tensors) and real jax arrays (backend="jax", impl="xla" on a CPU).
The GPU-only items (1M tokens, 2^31 offsets, device mismatches between CPU and CUDA, the memory
statement, real launches past 65535 sequences) are in tests/gpu/reliability_gpu_check.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gdn  # noqa: E402
import gdn.api as api  # noqa: E402
from gdn import reference as R  # noqa: E402
from gdn.inputs import make_inputs, round_to_dtype  # noqa: E402
from gdn.tolerances import RMS_VS_F64  # noqa: E402

from gdn import triton_backend as tb  # noqa: E402
from gdn.triton_backend import _common as tcommon  # noqa: E402

_TB_STATUS = tb.impl_status()["triton"]
needs_triton = pytest.mark.skipif(_TB_STATUS is not None, reason=f"triton unusable: {_TB_STATUS}")
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
BACKENDS = [pytest.param("triton", marks=needs_triton), "jax"]


# ------------------------------------------------------------------------------------------
# helpers: one framework-neutral way to build calls
# ------------------------------------------------------------------------------------------
class Fw:
    """Arrays of one backend: ``arr`` turns NumPy into the backend's array (torch CPU tensor or
    jax array), ``cast`` changes a dtype, ``kw`` completes the prefill keywords."""

    def __init__(self, backend: str):
        self.backend = backend
        self.torch = backend == "triton"

    def arr(self, x, dtype=None):
        if x is None:
            return None
        if self.torch:
            t = torch.from_numpy(np.ascontiguousarray(x))
            return t.to(getattr(torch, dtype)) if dtype else t
        return jnp.asarray(x, dtype=dtype)

    def cast(self, x, dtype: str):
        if self.torch:
            return x.to(getattr(torch, dtype))
        if dtype == "float64":  # jax without x64 would silently give float32: use NumPy
            return np.asarray(x, np.float64)
        return x.astype(dtype)

    def foreign(self, x):
        """The same values as an array of another framework."""
        return np.asarray(x) if self.torch else torch.from_numpy(np.asarray(x))

    def np(self, x):
        return R.to_numpy64(x)

    def kw(self, **kw):
        kw.setdefault("backend", self.backend)
        if not self.torch:
            kw.setdefault("impl", "xla")
        return kw


def _base(b=1, t=16, h=2, hv=4, k=8, v=8, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(q=f(b, t, h, k), k=f(b, t, h, k), v=f(b, t, hv, v), g=-np.abs(f(b, t, hv)),
                beta=np.abs(f(b, t, hv)))


@pytest.fixture
def launches(monkeypatch):
    """Every backend ``run`` and every Triton kernel launch of the test, recorded (they still
    run): a bad argument must be refused before either happens."""
    calls = []
    real = api.load_backend

    def load(name):
        mod = real(name)

        def run(args, return_stages=False):
            calls.append(("run", name))
            return mod.run(args, return_stages)

        return types.SimpleNamespace(IMPLS=mod.IMPLS, run=run)

    def hook(kernel, grid, args, kwargs):
        calls.append(("launch", getattr(kernel, "__name__", str(kernel))))
        return False

    monkeypatch.setattr(api, "load_backend", load)
    prev = tcommon.set_launch_hook(hook)
    yield calls
    tcommon.set_launch_hook(prev)


def _snapshot(values):
    """Copies of the caller's arrays (meta tensors have no values: skipped)."""
    out = []
    for x in values:
        if isinstance(x, torch.Tensor):
            out.append((x, None if x.is_meta else x.detach().clone(), x.stride(), x.dtype))
        elif isinstance(x, (np.ndarray, jax.Array)):
            out.append((x, np.array(x, copy=True), None, x.dtype))
    return out


def _untouched(snap):
    for x, copy, stride, dtype in snap:
        assert x.dtype == dtype
        if isinstance(x, torch.Tensor):
            assert x.stride() == stride
            if copy is not None:  # equal values, NaN at the same places
                a = x.detach()
                assert torch.equal(a, copy) or (a.is_floating_point() and np.array_equal(
                    a.float().numpy(), copy.float().numpy(), equal_nan=True)), \
                    "a caller's tensor was modified"
        else:
            if isinstance(x, jax.Array):
                assert not x.is_deleted(), "a caller's jax array was donated"
            assert np.array_equal(np.asarray(x), copy, equal_nan=True)


# ------------------------------------------------------------------------------------------
# bad input: a table, on real torch tensors and jax arrays, through gdn.prefill
# ------------------------------------------------------------------------------------------
def _meta_plan():
    return gdn.plan([0, 16]).to_torch("meta")


# (id, fn(F, A) -> changes (None: not applicable to this backend), exception, message regex).
# A holds the backend's arrays of _base(); changes name arrays (q..beta) or prefill keywords.
BAD = [
    ("q-rank3", lambda F, A: dict(q=A["q"][0]), ValueError, r"q must have rank 4"),
    ("k-rank5", lambda F, A: dict(k=A["k"][None]), ValueError, r"k must have rank 4"),
    ("k-shape", lambda F, A: dict(k=A["k"][:, :, :1]), ValueError, r"k must have q's shape"),
    ("v-T", lambda F, A: dict(v=A["v"][:, :8]), ValueError, r"v must be \[B, T, HV, V\]"),
    ("g-HV", lambda F, A: dict(g=A["g"][..., :2]), ValueError, r"g must be \[B, T, HV\]"),
    ("beta-T", lambda F, A: dict(beta=A["beta"][:, :3]), ValueError, r"beta must be"),
    ("H-not-dividing-HV", lambda F, A: dict(v=A["v"][:, :, :3], g=A["g"][..., :3],
                                            beta=A["beta"][..., :3]),
     ValueError, r"multiple of the q/k heads"),
    ("HV-0", lambda F, A: dict(v=A["v"][:, :, :0], g=A["g"][..., :0], beta=A["beta"][..., :0]),
     ValueError, r"HV\) must be >= 1"),
    ("H-0", lambda F, A: dict(q=A["q"][:, :, :0], k=A["k"][:, :, :0]), ValueError,
     r"\(H\) and .* must be >= 1"),
    ("K-300", lambda F, A: dict(q=F.arr(np.zeros((1, 16, 2, 300), np.float32)),
                                k=F.arr(np.zeros((1, 16, 2, 300), np.float32))),
     ValueError, r"K\) must be in \[1, 256\]"),
    ("V-257", lambda F, A: dict(v=F.arr(np.zeros((1, 16, 4, 257), np.float32))),
     ValueError, r"V\) must be in \[1, 256\]"),
    ("qkv-float64", lambda F, A: {n: F.cast(A[n], "float64") for n in "qkv"}, TypeError,
     r"q must be bfloat16, float16 or float32"),
    ("q-int32", lambda F, A: dict(q=F.cast(A["q"], "int32")), TypeError, r"q must be bfloat16"),
    ("v-other-dtype", lambda F, A: dict(v=F.cast(A["v"], "float16")), TypeError,
     r"share one dtype"),
    ("g-int", lambda F, A: dict(g=F.cast(A["g"], "int32")), TypeError, r"g must be a floating"),
    ("beta-bool", lambda F, A: dict(beta=F.cast(A["beta"], "bool")), TypeError,
     r"beta must be a floating"),
    ("g-complex", lambda F, A: dict(g=F.cast(A["g"], "complex64")), TypeError,
     r"g must be a floating"),
    ("q-list", lambda F, A: dict(q=[[1.0]]), TypeError, r"q must be an array"),
    ("k-other-framework", lambda F, A: dict(k=F.foreign(A["k"])) if F.torch else
     dict(k=torch.from_numpy(np.array(A["k"]))), TypeError, r"one framework"),
    ("backend-mismatch", lambda F, A: dict(backend="jax" if F.torch else "triton", impl=None),
     TypeError, r"takes (jax|torch) arrays"),
    ("cu-on-device", lambda F, A: dict(cu_seqlens=torch.tensor([0, 16], device="meta")),
     ValueError, r"cu_seqlens must be host integers .* sync"),
    ("cu-2d", lambda F, A: dict(cu_seqlens=[[0, 16]]), ValueError, r"cu_seqlens must be 1-D"),
    ("cu-not-0", lambda F, A: dict(cu_seqlens=[1, 16]), ValueError, r"start at 0"),
    ("cu-decreasing", lambda F, A: dict(cu_seqlens=[0, 9, 5, 16]), ValueError,
     r"non-decreasing"),
    ("cu-past-T", lambda F, A: dict(cu_seqlens=[0, 5, 30]), ValueError,
     r"cu_seqlens\[-1\] = 30"),
    ("cu-float", lambda F, A: dict(cu_seqlens=[0.0, 16.0]), TypeError, r"integers"),
    ("cu-bool", lambda F, A: dict(cu_seqlens=[False, True]), TypeError, r"integers"),
    ("cu-empty", lambda F, A: dict(cu_seqlens=[]), ValueError, r"at least one"),
    ("cu-uint64-huge", lambda F, A: dict(cu_seqlens=np.array([0, 2**63 + 5], np.uint64)),
     ValueError, r"past any token count"),
    ("cu-past-int32", lambda F, A: dict(cu_seqlens=[0, 2**31]), ValueError, r"int32"),
    ("cu-and-plan", lambda F, A: dict(cu_seqlens=[0, 16], plan=gdn.plan([0, 16])), ValueError,
     r"not both"),
    ("plan-not-a-plan", lambda F, A: dict(plan="plan"), TypeError, r"gdn.Plan"),
    ("plan-other-sizes", lambda F, A: dict(plan=gdn.plan([0, 40])), ValueError,
     r"plan was built for 40 tokens"),
    ("plan-other-framework", lambda F, A: dict(
        plan=gdn.plan([0, 16]).to_jax() if F.torch else gdn.plan([0, 16]).to_torch("cpu")),
     TypeError, r"plan holds (jax|torch) arrays"),
    ("plan-other-device", lambda F, A: dict(plan=_meta_plan()) if F.torch else None,
     ValueError, r"plan's arrays are on meta"),
    ("B2-with-cu", lambda F, A: dict(cu_seqlens=[0, 8]), ValueError, r"B == 1"),
    ("B2-with-plan", lambda F, A: dict(plan=gdn.plan([0, 8])), ValueError, r"B == 1"),
    ("h0-N", lambda F, A: dict(initial_state=F.arr(np.zeros((3, 4, 8, 8), np.float32))),
     ValueError, r"initial_state must be \[N, HV, K, V\] = \(1, 4, 8, 8\)"),
    ("h0-HV", lambda F, A: dict(initial_state=F.arr(np.zeros((1, 2, 8, 8), np.float32))),
     ValueError, r"initial_state must be \[N, HV, K, V\]"),
    ("h0-K", lambda F, A: dict(initial_state=F.arr(np.zeros((1, 4, 9, 8), np.float32))),
     ValueError, r"initial_state must be \[N, HV, K, V\]"),
    ("h0-V", lambda F, A: dict(initial_state=F.arr(np.zeros((1, 4, 8, 7), np.float32))),
     ValueError, r"initial_state must be \[N, HV, K, V\]"),
    ("h0-rank3", lambda F, A: dict(initial_state=F.arr(np.zeros((4, 8, 8), np.float32))),
     ValueError, r"initial_state must be"),
    ("h0-int", lambda F, A: dict(initial_state=F.arr(np.zeros((1, 4, 8, 8), np.int32))),
     TypeError, r"initial_state must be a floating"),
    ("h0-other-framework", lambda F, A: dict(
        initial_state=np.zeros((1, 4, 8, 8), np.float32) if F.torch
        else torch.zeros(1, 4, 8, 8)), TypeError, r"initial_state must be a (torch|jax) array"),
    ("h0-other-device", lambda F, A: dict(initial_state=torch.zeros(1, 4, 8, 8, device="meta"))
     if F.torch else None, ValueError, r"initial_state is on meta"),
    ("k-other-device", lambda F, A: dict(k=A["k"].to("meta")) if F.torch else None,
     ValueError, r"k is on meta"),
    ("scale-nan", lambda F, A: dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("scale-str", lambda F, A: dict(scale="0.1"), TypeError, r"scale must be a real number"),
    ("scale-array", lambda F, A: dict(scale=F.arr(np.float32(0.1))), TypeError,
     r"scale must be a real number"),
    ("l2norm-int", lambda F, A: dict(use_qk_l2norm=1), TypeError, r"use_qk_l2norm"),
    ("final-None", lambda F, A: dict(output_final_state=None), TypeError, r"output_final_state"),
    ("backend-name", lambda F, A: dict(backend="cuda"), ValueError, r"backend must be one of"),
    ("impl-type", lambda F, A: dict(impl=3), TypeError, r"impl must be a string"),
    ("impl-name", lambda F, A: dict(impl="nope"), ValueError, r"unknown impl"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_named_before_any_launch(case, backend, launches):
    name, make, exc, words = case
    F = Fw(backend)
    b = 2 if name.startswith("B2") else 1
    base = {n: F.arr(x) for n, x in _base(b=b, t=16 // b).items()}
    changes = make(F, base)
    if changes is None:
        pytest.skip("not applicable to this backend")
    arrays = {n: changes.pop(n, base[n]) for n in list(base)}
    kw = F.kw(**changes)
    snap = _snapshot(list(arrays.values()) + [kw.get("initial_state")])
    with pytest.raises(exc, match=words):
        gdn.prefill(*arrays.values(), **kw)
    assert launches == [], f"{name}: something ran before the error: {launches}"
    _untouched(snap)


def test_unknown_impl_is_also_a_not_implemented_error():
    """The triton backend raised NotImplementedError for an unknown impl before validate() named
    it: the error is both, so code written against either keeps working."""
    a = _base()
    with pytest.raises(NotImplementedError, match="unknown impl"):
        gdn.prefill(*(torch.from_numpy(x) for x in a.values()), backend="triton", impl="nope")


# -- odd but valid input: handled correctly, the caller's arrays untouched --------------------
def _odd_torch(x):
    """Strided / non-contiguous / expanded / grad-tracking / other-dtype variants of x's arrays
    with the same values (where the values change, the reference is given them too)."""
    q, k, v, g, beta = (torch.from_numpy(a) for a in x.arrays)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    v_wide = torch.zeros(*v.shape[:3], 2 * v.shape[3])
    v_wide[..., ::2] = v
    v_s = v_wide[..., ::2]  # strided last dim
    g_e = g.double()[:, :1].expand(g.shape)  # float64, stride 0 along T: one gate for all
    k_g = k.clone().requires_grad_()
    beta_b = beta.to(torch.bfloat16)
    h0 = torch.from_numpy(x.initial_state).to(torch.float64)
    ref = [x.q, x.k, x.v, np.broadcast_to(x.g[:, :1], x.g.shape), beta_b.float().numpy()]
    return [q_t, k_g, v_s, g_e, beta_b], h0, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_layouts_and_dtypes_are_handled_correctly(backend):
    x = make_inputs([40, 0, 30], h=2, hv=4, k=16, v=16, initial_state=True, pad_tokens=6, seed=1)
    if backend == "triton":
        arrays, h0, ref = _odd_torch(x)
        assert not arrays[0].is_contiguous() and not arrays[2].is_contiguous()
        assert arrays[3].stride()[1] == 0
        cu = torch.tensor(x.cu_seqlens, dtype=torch.int32)  # a CPU tensor of int32
    else:
        # NumPy inputs, fp16 gates, a fp16 initial state, cu_seqlens as a jax array on the CPU
        arrays = [x.q, jnp.asarray(x.k), jnp.asarray(x.v).T.T, x.g.astype(np.float16),
                  jnp.asarray(x.beta)]
        h0 = jnp.asarray(x.initial_state, jnp.float16)
        ref = [x.q, x.k, x.v, x.g.astype(np.float16).astype(np.float32), x.beta]
        cu = jnp.asarray(x.cu_seqlens)
    snap = _snapshot(arrays + [h0])
    o, f = gdn.prefill(*arrays, **Fw(backend).kw(cu_seqlens=cu, initial_state=h0))
    _untouched(snap)
    ro, rf = R.recurrent(*ref, cu_seqlens=x.cu_seqlens, initial_state=R.to_numpy64(h0))
    bar = RMS_VS_F64["float32"]
    assert R.rms_ratio(o, ro) < bar and R.rms_ratio(f, rf) < bar
    assert np.all(R.to_numpy64(o)[:, 70:] == 0)


def test_jax_arrays_on_different_devices_are_named():
    """Two virtual CPU devices (a subprocess: the device count is fixed when jax starts)."""
    code = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import numpy as np, jax, jax.numpy as jnp, gdn, pytest
d0, d1 = jax.devices()[:2]
rng = np.random.default_rng(0)
a = dict(q=rng.standard_normal((1, 16, 2, 8), np.float32), v=rng.standard_normal((1, 16, 4, 8), np.float32))
a["k"] = a["q"] * 0.5
a["g"] = -np.abs(rng.standard_normal((1, 16, 4), np.float32))
a["beta"] = np.abs(rng.standard_normal((1, 16, 4), np.float32))
on = lambda d: {n: jax.device_put(a[n], d) for n in ("q", "k", "v", "g", "beta")}
h0 = np.zeros((1, 4, 8, 8), np.float32)
for name in ("k", "beta"):
    with pytest.raises(ValueError, match=f"{name} is on .*1 but q is on .*0"):
        gdn.prefill(**{**on(d0), name: jax.device_put(a[name], d1)}, impl="xla")
with pytest.raises(ValueError, match="initial_state is on"):
    gdn.prefill(**on(d0), initial_state=jax.device_put(h0, d1), impl="xla")
with pytest.raises(ValueError, match="plan's arrays are on"):
    gdn.prefill(**on(d0), plan=gdn.plan([0, 16]).to_jax(d1), impl="xla")
# all on d1: runs there; uncommitted arrays follow the committed ones; empty calls too
o, f = gdn.prefill(**on(d1), initial_state=jnp.asarray(h0), impl="xla")
assert o.devices() == {d1}, o.devices()
o, f = gdn.prefill(**on(d1), cu_seqlens=[0, 0], initial_state=jax.device_put(h0, d1))
assert o.devices() == {d1} and f.devices() == {d1} and not np.any(np.asarray(o))
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------
# extreme values against the float64 truth
# ------------------------------------------------------------------------------------------
def _extreme(name: str, x):
    """x's arrays with the extreme values of case ``name`` (in place on copies)."""
    q, k, v, g, beta = (a.copy() for a in x.arrays)
    l2 = False
    if name == "no-decay":  # g = 0 everywhere: the state only accumulates
        g[:] = 0
    elif name == "wipe":  # g = -1e4: the state is wiped at every token
        g[:] = -1e4
    elif name == "wipe-alternating":  # exp(+1e4) lurks above the diagonal: must be selected away
        g[:] = 0
        g[:, ::2] = -1e4
    elif name == "beta-0":  # no write at all: o reads the (decayed) initial state
        beta[:] = 0
    elif name == "beta-1":
        beta[:] = 1
    elif name == "zero-qk-l2norm":  # 0 / sqrt(0 + eps) = 0: no NaN from the norm
        q[:, ::3] = 0
        k[:, 1::3] = 0
        l2 = True
    elif name == "zero-qk":
        q[:] = 0
        k[:] = 0
    elif name == "huge-v":
        v *= 1e4
    else:
        raise ValueError(name)
    return [q, k, v, g, beta], l2


EXTREME = ["no-decay", "wipe", "wipe-alternating", "beta-0", "beta-1", "zero-qk-l2norm",
           "zero-qk", "huge-v"]


# every case in fp32; bf16 for the cases where its rounding matters
EXTREME_DTYPES = [(n, "float32") for n in EXTREME] + [
    (n, "bfloat16") for n in ("no-decay", "wipe-alternating", "huge-v")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, dtype", EXTREME_DTYPES, ids=[f"{n}-{d}" for n, d in EXTREME_DTYPES])
def test_extreme_values_match_float64(name, dtype, backend):
    x = make_inputs([70, 1, 64, 0, 30], h=1, hv=2, k=16, v=16, initial_state=True, seed=5)
    arrays, l2 = _extreme(name, x)
    arrays[:3] = [round_to_dtype(a, dtype) for a in arrays[:3]]
    F = Fw(backend)
    dev = [F.arr(a, dtype) for a in arrays[:3]] + [F.arr(a) for a in arrays[3:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's exp(+big) * 0
        o, f = gdn.prefill(*dev, **F.kw(cu_seqlens=x.cu_seqlens, use_qk_l2norm=l2,
                                         initial_state=F.arr(x.initial_state)))
    ro, rf = R.recurrent(*arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                         use_qk_l2norm=l2)
    bar = RMS_VS_F64[dtype]
    on, fn = F.np(o), F.np(f)
    assert np.all(np.isfinite(on)) and np.all(np.isfinite(fn))
    eo, ef = R.rms_ratio(on, ro), R.rms_ratio(fn, rf)
    assert eo < bar and ef < bar, f"{name} {dtype} {backend}: o {eo:.2e}, state {ef:.2e}"
    assert np.array_equal(fn[3], x.initial_state[3])  # the empty sequence


# the ends of the shape ranges: K = V = 1, odd dims with G = 8, K = 256 with V = 1
DIM_EXTREMES = [dict(h=1, hv=1, k=1, v=1, lens=[1]), dict(h=1, hv=8, k=3, v=5, lens=[2, 0, 65]),
                dict(h=1, hv=2, k=256, v=1, lens=[64, 1])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIM_EXTREMES, ids=lambda d: f"H{d['h']}-HV{d['hv']}-K{d['k']}-V{d['v']}")
def test_extreme_shapes_match_float64(dims, backend):
    dims = dict(dims)
    x = make_inputs(dims.pop("lens"), initial_state=True, seed=1, **dims)
    F = Fw(backend)
    o, f = gdn.prefill(*(F.arr(a) for a in x.arrays),
                       **F.kw(cu_seqlens=x.cu_seqlens, initial_state=F.arr(x.initial_state)))
    ro, rf = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    bar = RMS_VS_F64["float32"]
    assert R.rms_ratio(o, ro) < bar and R.rms_ratio(f, rf) < bar


# ------------------------------------------------------------------------------------------
# NaN / inf in one sequence never leaks into another (docs/RELIABILITY.md, "Non-finite input")
# ------------------------------------------------------------------------------------------
# sequences: clean ones between poisoned ones, each poisoned in another input; lengths chosen so
# the poisoned ones share 64-token tiles of the packed axis with clean neighbours
NAN_LENS = [70, 30, 64, 5, 40, 20, 10, 66, 3, 9, 1, 12, 64, 7, 64, 2, 50]  # N_pad = 18
POISON = {1: ("k", np.nan), 3: ("v", np.inf), 5: ("g", np.nan), 7: ("beta", np.nan),
          9: ("q", np.nan), 11: ("h0", np.nan), 12: ("g", -np.inf)}
TAIL = 23  # garbage tokens past cu_seqlens[-1]


def _poisoned(x, plan):
    arrays = [a.copy() for a in x.arrays]
    h0 = np.zeros((plan.padded_seqs,) + x.initial_state.shape[1:], np.float32)
    h0[: x.initial_state.shape[0]] = x.initial_state
    clean = [a.copy() for a in arrays], h0.copy()
    idx = dict(q=0, k=1, v=2, g=3, beta=4)
    cu = x.cu_seqlens
    for n, (what, val) in POISON.items():
        if what == "h0":
            h0[n, 0, 1, 2] = val
        else:
            t = (cu[n] + cu[n + 1]) // 2
            arrays[idx[what]][0, t, ...] = val
    for a in arrays:  # tokens past the last sequence: NaN garbage
        a[0, cu[-1]:] = np.nan
    h0[len(NAN_LENS):] = np.nan  # the plan's padded sequences' rows
    return clean, (arrays, h0)


@pytest.mark.parametrize("backend, impl", [pytest.param("triton", None, marks=needs_triton),
                                           ("jax", "xla"), ("jax", "pallas_triton")])
def test_non_finite_input_stays_in_its_sequence(backend, impl):
    """(pallas_triton runs in Pallas interpret mode here; every GPU implementation, Mosaic GPU
    included, runs this on the H200: tests/gpu/reliability_gpu_check.py nan_isolation)"""
    x = make_inputs(NAN_LENS, h=1, hv=2, k=16, v=16, initial_state=True, pad_tokens=TAIL, seed=6)
    plan = gdn.plan(x.cu_seqlens, num_tokens=x.q.shape[1])
    assert plan.padded_seqs > plan.num_seqs
    F = Fw(backend)
    runs = []
    for arrays, h0 in _poisoned(x, plan):
        dev = [F.arr(a) for a in arrays] + [F.arr(h0)]
        snap = _snapshot(dev)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            o, f = gdn.prefill(*dev[:5], **F.kw(plan=plan, initial_state=dev[5], impl=impl))
        _untouched(snap)
        runs.append((F.np(o)[0], F.np(f)))
    (o_c, f_c), (o_p, f_p) = runs
    cu = x.cu_seqlens
    assert np.all(np.isfinite(o_c)) and np.all(np.isfinite(f_c))
    for n in range(len(NAN_LENS)):
        if n in POISON:
            continue
        sl = slice(cu[n], cu[n + 1])
        assert np.array_equal(o_p[sl], o_c[sl]), f"sequence {n}: output changed"
        assert np.array_equal(f_p[n], f_c[n]), f"sequence {n}: final state changed"
    assert np.all(o_p[cu[-1]:] == 0), "tokens past cu_seqlens[-1] must read exactly zero"
    assert f_p.shape[0] == len(NAN_LENS)
    # the poison did reach its own sequence (the test is not vacuous)
    assert not np.all(np.isfinite(o_p[cu[1]:cu[2]]))


# ------------------------------------------------------------------------------------------
# scale: nothing to compute, many sequences, grids past 65535
# ------------------------------------------------------------------------------------------
EMPTY = {
    "T0-N0": dict(shape=(1, 0), cu=[0]),
    "T0-all-empty": dict(shape=(1, 0), cu=[0, 0, 0]),
    "B0": dict(shape=(0, 16), cu=None),
    "B2-T0": dict(shape=(2, 0), cu=None),
    "all-empty-padded": dict(shape=(1, 20), cu=[0, 0, 0, 0]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EMPTY))
def test_nothing_to_compute_needs_no_launch(name, backend, launches):
    case = EMPTY[name]
    b, t = case["shape"]
    n = (len(case["cu"]) - 1) if case["cu"] is not None else b
    rng = np.random.default_rng(0)
    F = Fw(backend)
    arrays = [F.arr(rng.standard_normal(s).astype(np.float32)) for s in
              [(b, t, 1, 8), (b, t, 1, 8), (b, t, 2, 8), (b, t, 2), (b, t, 2)]]
    h0 = F.arr(rng.standard_normal((n, 2, 8, 8)).astype(np.float32))
    kw = F.kw(cu_seqlens=case["cu"])
    o, f = gdn.prefill(*arrays, initial_state=h0, **kw)
    assert launches == []
    assert tuple(o.shape) == (b, t, 2, 8) and o.dtype == arrays[0].dtype
    assert not np.any(F.np(o))
    assert f.dtype == (torch.float32 if F.torch else jnp.float32)
    assert np.array_equal(F.np(f), F.np(h0))
    if F.torch:
        assert f.data_ptr() != h0.data_ptr() or n == 0  # a copy, never the caller's tensor
    o, f = gdn.prefill(*arrays, initial_state=None, output_final_state=False, **kw)
    assert f is None and launches == []
    o, f = gdn.prefill(*arrays, **kw)
    assert f.shape == (n, 2, 8, 8) and not np.any(F.np(f))


def test_nothing_to_compute_with_a_mesh():
    """The sharded path (a one-device mesh here) takes the same shortcut (it raised IndexError)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    z = [jnp.zeros(s, jnp.float32) for s in [(1, 0, 1, 8), (1, 0, 1, 8), (1, 0, 2, 8), (1, 0, 2),
                                              (1, 0, 2)]]
    h0 = jnp.ones((2, 2, 8, 8))
    for axes in (dict(head_axis="x"), dict(seq_axis="x")):
        o, f = gdn.prefill(*z, cu_seqlens=[0, 0, 0], initial_state=h0, mesh=mesh, **axes)
        assert o.shape == (1, 0, 2, 8) and np.array_equal(np.asarray(f), np.asarray(h0))


def test_nothing_to_compute_under_jit_with_a_traced_plan():
    """Inside the caller's jit the plan's real sizes are unknown: T = 0 is still known (a
    static shape) and the final state has the plan's N_pad rows (h0 must have them too)."""
    plan = gdn.plan([0, 0, 0])
    h0 = np.arange(plan.padded_seqs * 2 * 8 * 8, dtype=np.float32).reshape(-1, 2, 8, 8)

    @jax.jit
    def f(q, k, v, g, beta, p, h):
        return gdn.prefill(q, k, v, g, beta, plan=p, initial_state=h)

    z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    o, fin = f(z(1, 0, 1, 8), z(1, 0, 1, 8), z(1, 0, 2, 8), z(1, 0, 2), z(1, 0, 2), plan, h0)
    assert o.shape == (1, 0, 2, 8) and fin.shape == (plan.padded_seqs, 2, 8, 8)
    assert np.array_equal(np.asarray(fin), h0)
    o, fin = f(z(1, 0, 1, 8), z(1, 0, 1, 8), z(1, 0, 2, 8), z(1, 0, 2), z(1, 0, 2), plan, None)
    assert fin.shape == (plan.padded_seqs, 2, 8, 8) and not np.any(np.asarray(fin))


def _one_token_truth(q, k, v, g, beta, h0, scale):
    """Float64 closed form of N one-token sequences (vectorized over N): decay, delta write,
    read. Arrays [N, ...] with the heads already expanded (H == HV here)."""
    s = h0 * np.exp(g)[..., None, None]
    u = beta[..., None] * (v - np.einsum("nhkv,nhk->nhv", s, k))
    s = s + k[..., :, None] * u[..., None, :]
    return scale * np.einsum("nhkv,nhk->nhv", s, q), s


def test_8192_one_token_sequences():
    n = 8192
    x = make_inputs([1] * n, h=1, hv=1, k=16, v=16, initial_state=True, seed=7)
    arrs = [jnp.asarray(a) for a in x.arrays]
    o, f = gdn.prefill(*arrs, cu_seqlens=x.cu_seqlens, initial_state=jnp.asarray(x.initial_state),
                       impl="xla")
    sq = [a[0].astype(np.float64) for a in x.arrays]
    ro, rf = _one_token_truth(*sq, x.initial_state.astype(np.float64), 16 ** -0.5)
    bar = RMS_VS_F64["float32"]
    assert R.rms_ratio(o[0], ro) < bar and R.rms_ratio(f, rf) < bar
    assert f.shape[0] == n


@needs_triton
def test_one_token_sequences_triton():
    """The same closed form through the Triton chain (few sequences: the interpreter runs each
    program in Python, about 40 ms each)."""
    n = 12
    x = make_inputs([1] * n, h=2, hv=2, k=16, v=16, initial_state=True, seed=8)
    t = [torch.from_numpy(a) for a in x.arrays]
    o, f = gdn.prefill(*t, cu_seqlens=x.cu_seqlens, initial_state=torch.from_numpy(x.initial_state))
    sq = [a[0].astype(np.float64) for a in x.arrays]
    ro, rf = _one_token_truth(*sq, x.initial_state.astype(np.float64), 16 ** -0.5)
    bar = RMS_VS_F64["float32"]
    assert R.rms_ratio(o[0], ro) < bar and R.rms_ratio(f, rf) < bar


# -- grid axes: nothing past 65535 lands on CUDA's y or z axis --------------------------------
#: CUDA's limits: x < 2^31, y and z <= 65535 (DESIGN.md §6)
GRID_X, GRID_YZ = 2**31 - 1, 65535
BIG_N = 70_000  # sequences of one token: > 65535 sequences AND > 65535 chunk rows


def _check_grid(grid, what):
    x, *yz = (tuple(grid) + (1, 1))[:3]
    assert 1 <= x <= GRID_X and all(1 <= d <= GRID_YZ for d in yz), f"{what}: grid {grid}"


@needs_triton
def test_triton_grids_past_65535_sequences_and_chunks():
    """Every Triton kernel of the chain is launched on a 1-D grid (CUDA x): the chunk rows and
    the sequences ride on x. A dry run: the launch hook records the grids and skips the kernels."""
    grids = []

    def hook(kernel, grid, args, kwargs):
        grids.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), grid))
        return True

    x = dict(q=np.zeros((1, BIG_N, 1, 16), np.float32), v=np.zeros((1, BIG_N, 2, 16), np.float32),
             g=np.zeros((1, BIG_N, 2), np.float32))  # values are never read: a dry run
    t = [torch.from_numpy(a) for a in (x["q"], x["q"], x["v"], x["g"], x["g"])]
    plan = gdn.plan(np.arange(BIG_N + 1))
    prev = tcommon.set_launch_hook(hook, host_tensors=True)
    try:
        gdn.prefill(*t, plan=plan, backend="triton")
    finally:
        tcommon.set_launch_hook(prev)
    assert len(grids) >= 2
    for name, grid in grids:
        assert len(grid) == 1, f"{name}: a {len(grid)}-D grid {grid}"
        _check_grid(grid, name)
    assert max(g[0] for _, g in grids) >= BIG_N  # the big dimension is there, on x


def _sds(h, hv, k, v, t=BIG_N):
    s = jax.ShapeDtypeStruct
    return (s((1, t, h, k), jnp.bfloat16), s((1, t, h, k), jnp.bfloat16),
            s((1, t, hv, v), jnp.bfloat16), s((1, t, hv), jnp.float32), s((1, t, hv), jnp.float32))


def test_pallas_triton_grids_past_65535_lowered_for_cuda(abstract_h200):
    """The Pallas-Triton kernels lowered for an abstract H200 (no GPU): the launch grids that
    reach CUDA keep y and z within 65535 for a plan of > 65535 sequences and chunk rows."""
    from gdn.jax_backend import common
    from gdn.jax_backend import pallas_triton as PT

    plan = gdn.plan(np.arange(BIG_N + 1))
    with abstract_h200(), common.pallas_triton_warnings():
        low = PT.core.trace(*_sds(1, 2, 16, 16), plan, None, scale=0.1, use_qk_l2norm=False,
                            output_final_state=True, return_stages=False,
                            interpret=False).lower(lowering_platforms=("cuda",))
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32",
                       low.as_text())
    assert len(grids) >= 3
    for g in grids:
        _check_grid(tuple(int(d) for d in g), "pallas_triton")
    assert max(int(g[0]) for g in grids) >= BIG_N


def test_mosaic_gpu_grids_past_65535_lowered_for_cuda(monkeypatch, abstract_h200):
    """The Mosaic GPU kernels lowered for an abstract H200 (no GPU): Pallas reverses the grid
    onto CUDA (x = the last axis); the grids it launches keep y and z within 65535."""
    try:
        from gdn.jax_backend.mosaic_gpu import _driver
        from jax._src.pallas.mosaic_gpu import lowering as mlow
    except Exception as e:  # noqa: BLE001 - the impl is optional
        pytest.skip(f"mosaic_gpu not importable: {e}")
    grids = []
    orig = mlow.mgpu_core._lower_as_gpu_kernel

    def capture(*a, **kw):
        grids.append(tuple(kw["grid"]))
        return orig(*a, **kw)

    monkeypatch.setattr(mlow.mgpu_core, "_lower_as_gpu_kernel", capture)
    plan = gdn.plan(np.arange(BIG_N + 1))

    def f(q, k, v, g, beta):
        _, args = api.validate(q, k, v, g, beta, plan=plan)
        return _driver.prefill_arrays(args, interpret=False)

    with abstract_h200():
        jax.jit(f).trace(*_sds(1, 2, 64, 64)).lower(lowering_platforms=("cuda",))
    assert len(grids) >= 2, grids
    for g in grids:
        _check_grid(g, "mosaic_gpu")
    assert max(g[0] for g in grids) >= BIG_N
