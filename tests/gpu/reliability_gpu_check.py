#!/usr/bin/env python3
"""Reliability on the H200 (gdn issue 10), one script, about 3 minutes:

    PYTHONPATH=. python3 tests/gpu/reliability_gpu_check.py          (from the repository root)

Sections (each in its own try/except: PASS / FAIL / SKIP, then the next one runs):

 1. environment: versions, device, the implementations usable here
 2. device_mismatch: CPU and CUDA tensors mixed in one triton call (q, k, initial_state, the
    plan), CPU tensors for the CUDA kernels, a CUDA cu_seqlens; jax arrays on the GPU and on the
    CPU device mixed; each a ValueError / TypeError naming the argument, with no kernel launched
 3. empty_calls: T = 0, B = 0, every sequence empty: zero output, final state = initial state,
    no launch (both backends)
 4. nan_isolation: NaN / inf in one sequence's q, k, v, g, beta or initial state, NaN garbage
    past cu_seqlens[-1] and in the padded state rows: every other sequence bitwise equal to the
    clean run, padded tokens exactly 0 (every GPU implementation; the lengths put poisoned and
    clean sequences in one 64-token tile, which Mosaic GPU loads once per sequence)
 5. extreme_values: g = 0, g = -1e4, g alternating 0 / -1e4, beta 0 and 1, zero q / k (with and
    without the kernel's l2norm), v * 1e4, against the float64 token loop (every implementation;
    bf16, and fp32 where the implementation takes it)
 6. grids_past_65535: 70 000 one-token sequences (> 65535 sequences and chunk rows) against their
    float64 closed form, and one sequence of 65 600 chunks against two chained calls
 7. memory: the peak extra GPU memory of one prefill (4 x 8192 tokens, Qwen3.5 shape, bf16)
    against the statement of docs/RELIABILITY.md (stated_bytes below): torch.cuda
    max_memory_allocated for triton; for each jax impl, in a subprocess of its own, the device's
    memory_stats peak and XLA's compiled memory_analysis
 8. one_million_tokens: one sequence of 2^20 tokens at the Qwen3.5 shape (T * HV * V = 2^32:
    64-bit offsets) against 8 chained calls of 2^17 tokens (each below 2^31 elements in every
    tensor), for triton; each jax GPU impl against triton's output; and a packed batch whose last
    sequences lie past 2^31 elements against each sequence alone (last: the largest)

Exit status: the number of failed sections. Arguments: only the sections named (e.g.
``memory nan_isolation``). GDN_GPU_CHECK_SMOKE=1 runs the script's logic on a CPU at toy sizes
(Triton interpreter, impl xla): a check of this script, not of the GPU.
"""
from __future__ import annotations

import os
import sys

SMOKE = os.environ.get("GDN_GPU_CHECK_SMOKE") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax share the GPU
if "--jax-memory" not in sys.argv:
    # jax's default (BFC) pool never returns memory: after the jax sections it held ~89 GiB and
    # the 1M-token triton call ran out of memory (H200, 2026-11-28). The platform allocator frees
    # on delete. The memory section's subprocesses keep the default pool (its peak statistics).
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gdn  # noqa: E402
from gdn import reference as R  # noqa: E402
from gdn.inputs import make_inputs, round_to_dtype  # noqa: E402
from gdn.tolerances import RMS_BETWEEN, RMS_VS_F64  # noqa: E402

if SMOKE:
    DEV = torch.device("cpu")
    QWEN = dict(h=2, hv=4, k=32, v=32)
else:
    DEV = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    QWEN = dict(h=16, hv=32, k=128, v=128)
RESULTS: dict[str, str] = {}
SECTIONS: list = []


class Checks:
    """The checks of one section: ``ok(name, cond, detail)`` prints one line and records it."""

    def __init__(self):
        self.failed: list[str] = []
        self.count = 0

    def ok(self, name, cond, detail=""):
        self.count += 1
        print(f"  {'ok  ' if cond else 'FAIL'}  {name}  {detail}", flush=True)
        if not cond:
            self.failed.append(name)
        return cond


def section(fn):
    """A section ``fn(checks)``: registered in order; run by :func:`run` under a guard."""
    SECTIONS.append(fn)
    return fn


def run(fn) -> None:
    """One section: an exception or a sticky CUDA error is a failed check, never the end."""
    c, t0 = Checks(), time.perf_counter()
    print(f"\n=== {fn.__name__}", flush=True)
    for step in (lambda: fn(c), _drain):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a section must never hide the next ones
            traceback.print_exc()
            c.ok("no exception", False, f"{type(e).__name__}")
    status = "FAIL" if c.failed else ("PASS" if c.count else "SKIP")
    print(f"--- {fn.__name__}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    RESULTS[fn.__name__] = status


def _drain():
    if DEV is not None and DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def jax_impls() -> list[str]:
    """The jax implementations that run on this machine (interpreted ones only in smoke mode)."""
    from gdn import jax_backend

    st = jax_backend.impl_status()
    if SMOKE:
        return ["xla"]
    return [i for i in jax_backend.IMPLS if st.get(i) is None]


def impls() -> list[tuple[str, str | None]]:
    """(backend, impl) of every GPU implementation: triton first, then the jax ones."""
    return [("triton", None)] + [("jax", i) for i in jax_impls()]


def label(backend, impl):
    return impl or backend


def to_backend(x, backend, dtype=None):
    """NumPy -> a CUDA tensor (triton) or a jax array on the default device."""
    if x is None:
        return None
    if backend == "triton":
        t = torch.from_numpy(np.ascontiguousarray(x)).to(DEV)
        return t.to(getattr(torch, dtype)) if dtype else t
    _, jnp = _jax()
    return jnp.asarray(x, dtype=dtype)


def call(backend, impl, arrays, dtype, **kw):
    """gdn.prefill on NumPy inputs moved to the backend; returns float64 NumPy (o, final)."""
    dev = [to_backend(a, backend, dtype) for a in arrays[:3]]
    dev += [to_backend(a, backend) for a in arrays[3:]]
    if kw.get("initial_state") is not None:
        kw["initial_state"] = to_backend(kw["initial_state"], backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o, f = gdn.prefill(*dev, backend=backend, impl=impl, **kw)
    return R.to_numpy64(o), R.to_numpy64(f)


def takes(impl, dtype, k=64, v=64):
    """Whether ``impl`` supports the dtype and head dims (mosaic_gpu: bf16/fp16, K, V in 64, 128)."""
    if impl == "mosaic_gpu":
        return dtype in ("bfloat16", "float16") and k in (64, 128) and v in (64, 128)
    return True


# ------------------------------------------------------------------------------------------
@section
def environment(c):
    import triton

    line = f"torch {torch.__version__}, triton {triton.__version__}, device {DEV}"
    if DEV is not None and DEV.type == "cuda":
        line += f" ({torch.cuda.get_device_name(DEV)})"
    print("  " + line)
    try:
        jax, _ = _jax()
        print(f"  jax {jax.__version__}, devices {jax.devices()}")
    except Exception as e:  # noqa: BLE001
        print(f"  jax unusable: {e}")
    for i in gdn.implementations():
        print(f"  {i.backend:7s} {i.impl:14s} {'usable' if i.available else i.reason}")
    c.ok("a CUDA device (or the CPU smoke mode)", DEV is not None, str(DEV))


@section
def device_mismatch(c):
    from gdn.triton_backend import _common

    launched = []

    def hook(kernel, grid, args, kwargs):
        launched.append(kernel)
        return False

    rng = np.random.default_rng(0)
    base = dict(q=rng.standard_normal((1, 16, 2, 16), np.float32),
                k=rng.standard_normal((1, 16, 2, 16), np.float32),
                v=rng.standard_normal((1, 16, 4, 16), np.float32),
                g=-np.abs(rng.standard_normal((1, 16, 4), np.float32)),
                beta=np.abs(rng.standard_normal((1, 16, 4), np.float32)))
    h0 = np.zeros((1, 4, 16, 16), np.float32)
    cuda = {n: torch.from_numpy(a).to(DEV) for n, a in base.items()}
    cpu = {n: torch.from_numpy(a) for n, a in base.items()}

    def expect(name, fn, exc, words):
        launched.clear()
        try:
            fn()
        except exc as e:
            c.ok(name, re.search(words, str(e)) is not None and not launched,
                 f"{type(e).__name__}: {str(e)[:110]}")
            return
        except Exception as e:  # noqa: BLE001
            c.ok(name, False, f"wrong error {type(e).__name__}: {e}")
            return
        c.ok(name, False, "no error")

    prev = _common.set_launch_hook(hook)
    try:
        if DEV.type == "cuda":
            expect("torch: k on the CPU, q on CUDA",
                   lambda: gdn.prefill(**{**cuda, "k": cpu["k"]}), ValueError, r"k is on cpu")
            expect("torch: q on the CPU, the rest on CUDA",
                   lambda: gdn.prefill(**{**cuda, "q": cpu["q"]}), ValueError, r"is on")
            expect("torch: every tensor on the CPU (no interpreter)",
                   lambda: gdn.prefill(**cpu, backend="triton"), ValueError, r"CPU tensor")
            expect("torch: initial_state on the CPU",
                   lambda: gdn.prefill(**cuda, initial_state=torch.from_numpy(h0)), ValueError,
                   r"initial_state is on cpu")
            expect("torch: plan on the CPU for CUDA tensors",
                   lambda: gdn.prefill(**cuda, plan=gdn.plan([0, 16]).to_torch("cpu")),
                   ValueError, r"plan's arrays are on cpu")
            expect("torch: cu_seqlens on CUDA",
                   lambda: gdn.prefill(**cuda, cu_seqlens=torch.tensor([0, 16], device=DEV)),
                   ValueError, r"host integers")
            if torch.cuda.device_count() > 1:
                expect("torch: k on another GPU",
                       lambda: gdn.prefill(**{**cuda, "k": cuda["k"].to("cuda:1")}), ValueError,
                       r"k is on cuda:1")
    finally:
        _common.set_launch_hook(prev)

    jax, jnp = _jax()
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if gpus:
        cpu_dev = jax.devices("cpu")[0]
        on = lambda d: {n: jax.device_put(a, d) for n, a in base.items()}  # noqa: E731
        expect("jax: k on the CPU device, q on the GPU",
               lambda: gdn.prefill(**{**on(gpus[0]), "k": jax.device_put(base["k"], cpu_dev)}),
               ValueError, r"k is on")
        expect("jax: initial_state on the CPU device",
               lambda: gdn.prefill(**on(gpus[0]), initial_state=jax.device_put(h0, cpu_dev)),
               ValueError, r"initial_state is on")
        expect("jax: plan on the CPU device",
               lambda: gdn.prefill(**on(gpus[0]), plan=gdn.plan([0, 16]).to_jax(cpu_dev)),
               ValueError, r"plan's arrays are on")
        expect("jax: cu_seqlens a GPU array",
               lambda: gdn.prefill(**on(gpus[0]), cu_seqlens=jnp.array([0, 16])), ValueError,
               r"host integers")
        o, _ = gdn.prefill(**on(gpus[0]))
        c.ok("jax: all on the GPU runs there", o.devices() == {gpus[0]}, str(o.devices()))
    elif not SMOKE:
        c.ok("jax sees a GPU", False, str(jax.devices()))


@section
def empty_calls(c):
    from gdn.triton_backend import _common

    launched = []
    prev = _common.set_launch_hook(lambda *a: launched.append(a[0]) or False)
    try:
        for backend in ("triton", "jax"):
            for name, (b, t), cu in [("T=0, N=2", (1, 0), [0, 0, 0]), ("B=0", (0, 8), None),
                                     ("all empty, 20 padded tokens", (1, 20), [0, 0, 0])]:
                n = 2 if cu is not None else b
                rng = np.random.default_rng(1)
                arrays = [rng.standard_normal(s).astype(np.float32) for s in
                          [(b, t, 2, 64), (b, t, 2, 64), (b, t, 4, 64), (b, t, 4), (b, t, 4)]]
                h0 = rng.standard_normal((n, 4, 64, 64)).astype(np.float32)
                launched.clear()
                o, f = call(backend, None, arrays, "bfloat16", cu_seqlens=cu, initial_state=h0)
                c.ok(f"{backend}: {name}", o.shape == (b, t, 4, 64) and not np.any(o)
                     and np.array_equal(f, h0) and not launched, f"o {o.shape}, final {f.shape}")
    finally:
        _common.set_launch_hook(prev)


@section
def nan_isolation(c):
    from test_reliability import NAN_LENS, POISON, TAIL, _poisoned

    x = make_inputs(NAN_LENS, h=2, hv=4, k=64, v=64, initial_state=True, pad_tokens=TAIL, seed=6)
    plan = gdn.plan(x.cu_seqlens, num_tokens=x.q.shape[1])
    (clean, h_clean), (dirty, h_dirty) = _poisoned(x, plan)
    cu = x.cu_seqlens
    for backend, impl in impls():
        for dtype in ("bfloat16", "float32"):
            if not takes(impl, dtype):
                continue
            try:
                o_c, f_c = call(backend, impl, clean, dtype, plan=plan, initial_state=h_clean)
                with np.errstate(all="ignore"):
                    o_p, f_p = call(backend, impl, dirty, dtype, plan=plan, initial_state=h_dirty)
            except Exception as e:  # noqa: BLE001
                c.ok(f"{label(backend, impl)} {dtype}", False, f"{type(e).__name__}: {e}")
                continue
            bad = [n for n in range(len(NAN_LENS)) if n not in POISON and not (
                np.array_equal(o_p[0, cu[n]:cu[n + 1]], o_c[0, cu[n]:cu[n + 1]])
                and np.array_equal(f_p[n], f_c[n]))]
            tail = bool(np.all(o_p[0, cu[-1]:] == 0))
            finite = bool(np.all(np.isfinite(o_c)) and np.all(np.isfinite(f_c)))
            c.ok(f"{label(backend, impl)} {dtype}", not bad and tail and finite,
                 f"changed clean sequences {bad}, tail zero {tail}, clean run finite {finite}")


@section
def extreme_values(c):
    from test_reliability import EXTREME, _extreme

    x = make_inputs([70, 1, 64, 0, 130], h=2, hv=4, k=64, v=64, initial_state=True, seed=5)
    for name in EXTREME:
        arrays32, l2 = _extreme(name, x)
        for dtype in ("bfloat16", "float32"):
            arrays = [round_to_dtype(a, dtype) for a in arrays32[:3]] + arrays32[3:]
            ro, rf = R.recurrent(*arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                                 use_qk_l2norm=l2)
            bar = RMS_VS_F64[dtype]
            for backend, impl in impls():
                if not takes(impl, dtype):
                    continue
                try:
                    o, f = call(backend, impl, arrays, dtype, cu_seqlens=x.cu_seqlens,
                                initial_state=x.initial_state, use_qk_l2norm=l2)
                except Exception as e:  # noqa: BLE001
                    c.ok(f"{name} {dtype} {label(backend, impl)}", False, f"{type(e).__name__}: {e}")
                    continue
                eo, ef = R.rms_ratio(o, ro), R.rms_ratio(f, rf)
                c.ok(f"{name:16s} {dtype:8s} {label(backend, impl):13s}",
                     eo < bar and ef < bar and np.array_equal(f[3], x.initial_state[3]),
                     f"o {eo:.1e} final {ef:.1e} (bar {bar:.0e})")


@section
def grids_past_65535(c):
    from test_reliability import _one_token_truth

    n = 20 if SMOKE else 70_000
    x = make_inputs([1] * n, h=1, hv=2, k=64, v=64, initial_state=True, seed=9)
    dtype = "bfloat16"
    arrays = [round_to_dtype(a, dtype) for a in x.arrays[:3]] + list(x.arrays[3:])
    sq = [np.repeat(a[0], 2, axis=1) if i < 2 else a[0] for i, a in enumerate(arrays)]
    ro, rf = _one_token_truth(*[a.astype(np.float64) for a in sq],
                              x.initial_state.astype(np.float64), 64 ** -0.5)
    for backend, impl in impls():
        try:
            o, f = call(backend, impl, arrays, dtype, cu_seqlens=x.cu_seqlens,
                        initial_state=x.initial_state)
            eo, ef = R.rms_ratio(o[0], ro), R.rms_ratio(f, rf)
            c.ok(f"{n} one-token sequences, {label(backend, impl)}",
                 eo < RMS_VS_F64[dtype] and ef < RMS_VS_F64[dtype], f"o {eo:.1e} final {ef:.1e}")
        except Exception as e:  # noqa: BLE001
            c.ok(f"{n} one-token sequences, {label(backend, impl)}", False,
                 f"{type(e).__name__}: {e}")
    # one sequence of more than 65535 chunks against two calls chained through the state
    t = 64 * (6 if SMOKE else 65_600)
    cut = 64 * (2 if SMOKE else 30_000)
    gen = torch.Generator(device=DEV).manual_seed(3)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    q = torch.nn.functional.normalize(rn(1, t, 1, 64), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(rn(1, t, 1, 64), dim=-1).bfloat16()
    v = rn(1, t, 2, 64).bfloat16()
    g = -torch.nn.functional.softplus(rn(1, t, 2)) * 0.1
    beta = torch.sigmoid(rn(1, t, 2))
    arrays = (q, k, v, g, beta)
    for backend, impl in impls():
        if impl == "xla":
            continue  # a 65 600-step scan: minutes, and the same code path as the 70 000 rows
        try:
            one = _prefill(backend, impl, arrays, [0, t])
            first = _prefill(backend, impl, [a[:, :cut] for a in arrays], [0, cut])
            second = _prefill(backend, impl, [a[:, cut:] for a in arrays], [0, t - cut],
                              initial_state=first[1])
            eo = max(_rms_torch(one[0][:, :cut], first[0]), _rms_torch(one[0][:, cut:], second[0]))
            ef = _rms_torch(one[1], second[1])
            c.ok(f"one sequence of {t // 64} chunks vs chained, {label(backend, impl)}",
                 eo < RMS_BETWEEN[dtype] and ef < RMS_BETWEEN[dtype], f"o {eo:.1e} final {ef:.1e}")
        except Exception as e:  # noqa: BLE001
            c.ok(f"one sequence of {t // 64} chunks, {label(backend, impl)}", False,
                 f"{type(e).__name__}: {e}")


# -- large inputs stay on the GPU: torch tensors in, jax impls through dlpack ----------------
def _as_jax(x):
    if x is None:
        return None
    _, jnp = _jax()
    if SMOKE:
        return jnp.asarray(x.float().numpy()).astype(str(x.dtype).replace("torch.", ""))
    return jnp.from_dlpack(x.contiguous())


def _as_torch(x):
    if x is None or isinstance(x, torch.Tensor):
        return x
    if SMOKE:
        return torch.from_numpy(np.asarray(x.astype("float32")))
    return torch.from_dlpack(x)


def _prefill(backend, impl, arrays, cu, initial_state=None):
    """gdn.prefill on torch tensors (moved to jax zero-copy for the jax backend): (o, final) as
    torch tensors on the GPU."""
    if backend == "jax":
        o, f = gdn.prefill(*map(_as_jax, arrays), cu_seqlens=cu, impl=impl,
                           initial_state=_as_jax(initial_state))
        o.block_until_ready()
        return _as_torch(o), _as_torch(f)
    return gdn.prefill(*arrays, cu_seqlens=cu, initial_state=initial_state)


def _rms_torch(a, b, rows: int = 1 << 16) -> float:
    """rms(a - b) / rms(b) on the device, in float64 chunks of ``rows`` tokens (inf for NaN)."""
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    num = den = 0.0
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].double(), b[i:i + rows].double()
        if not bool(torch.isfinite(x).all()):
            return float("inf")
        num += float(((x - y) ** 2).sum())
        den += float((y * y).sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


# ------------------------------------------------------------------------------------------
# memory: the statement of docs/RELIABILITY.md
# ------------------------------------------------------------------------------------------
def stated_bytes(impl, *, t, n, nt, nt_pad, n_pad, h, hv, k, v, itemsize, l2=False):
    """(peak extra device bytes of one prefill: scratch + outputs, what 'scratch' counts).

    The intermediates each implementation allocates (docs/RELIABILITY.md, "Memory"): t tokens
    in the arrays, n sequences, nt chunk rows (nt_pad padded), q/k/v of ``itemsize`` bytes,
    g / beta already fp32, no initial state conversion, and the outputs o [t, HV, V] and the
    fp32 final state [n, HV, K, V]. For "xla" the value is an upper bound (every intermediate
    at once, no fusion); for the others the expected peak.
    """
    s, f4 = itemsize, 4
    out = t * hv * v * s + n * hv * k * v * f4
    if impl == "triton":
        # prepare: gc fp32, w, u (+ k_rstd); state: h (nt rows), v_new; all live until return
        scratch = t * hv * f4 + t * hv * (k + 2 * v) * s + nt * hv * k * v * s
        scratch += t * h * f4 if l2 else 0
    elif impl == "pallas_triton":
        # state phase (the largest): gc, w, u, h (nt_pad rows), v_new; the padded final state
        # (n_pad rows) before it is cut to n; Ai (input dtype) lives only in the prepare phase
        state_phase = t * hv * f4 + t * hv * (k + 2 * v) * s + nt_pad * hv * k * v * s
        prepare_phase = t * hv * f4 + t * hv * 64 * s + t * hv * (k + v) * s
        scratch = max(state_phase, prepare_phase) + n_pad * hv * k * v * f4
        scratch += 2 * t * h * f4 if l2 else 0
    elif impl == "mosaic_gpu":
        tp = -(-t // 64) * 64
        # Ag [HV, T_pad, 64] input dtype, gc + g, beta head-major fp32, sequence ids int32
        scratch = tp * hv * 64 * s + 3 * tp * hv * f4 + tp * 4
        scratch += n_pad * hv * k * v * f4  # the jitted core's N_pad-row final state before the cut
        scratch += 2 * t * h * k * s if l2 else 0  # normalized q, k
        if tp != t:  # padded copies of q, k, v, g, beta and of o before the slice
            scratch += tp * (2 * h * k + hv * v) * s + 2 * tp * hv * f4 + tp * hv * v * s
    elif impl == "xla":
        slots = nt_pad * 64  # every chunk row is gathered into 64 token slots
        per_slot = (2 * h * k * s + hv * v * s  # gathered q, k, v
                    + 4 * hv * 64 * f4 + h * 64 * f4  # A, I + A, I, Ai; k k^T
                    + hv * k * (f4 + s) + hv * v * (f4 + s)  # beta exp(g) K, w; beta V, u
                    + hv * v * s + 2 * hv * v * f4 + hv * v * s  # v_new; q h, intra o; o
                    + h * 64 * f4 + 2 * hv * 64 * f4 + 8 * hv * f4)  # q k^T, decay, att; gates
        scratch = slots * per_slot + nt_pad * hv * k * v * s + 2 * n_pad * hv * k * v * f4
    else:
        raise ValueError(impl)
    return scratch + out, scratch


def _memory_shape():
    lens = [64, 64] if SMOKE else [8192] * 4
    p = gdn.plan(np.concatenate([[0], np.cumsum(lens)]))
    return lens, p


def _stated(impl, p, itemsize=2):
    return stated_bytes(impl, t=p.num_tokens, n=p.num_seqs, nt=p.num_chunks,
                        nt_pad=p.padded_chunks, n_pad=p.padded_seqs, itemsize=itemsize, **QWEN)


def _jax_memory(impl: str) -> dict:
    """In this (fresh) process: one prefill of the memory shape with ``impl``; device peaks."""
    jax, jnp = _jax()
    lens, p = _memory_shape()
    t = p.num_tokens
    h, hv, k, v = QWEN["h"], QWEN["hv"], QWEN["k"], QWEN["v"]
    # Inputs made on the HOST and copied in: device-side generation leaves freed fp32 temporaries
    # in jax's BFC pool, and BFC places a later allocation in a free chunk of up to twice its size
    # without splitting it (when the rest is under 128 MiB), counting the whole chunk as in use.
    # mosaic_gpu's 148 MiB temp landed in such a chunk on the H200 (2026-11-28 and 2026-12-03:
    # run peak 88 MiB over XLA's plan, nothing left allocated after the call).
    rng = np.random.default_rng(0)
    rn = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    q, kk = (jnp.asarray(rn(1, t, h, k), jnp.bfloat16) for _ in range(2))
    vv = jnp.asarray(rn(1, t, hv, v), jnp.bfloat16)
    g = jnp.asarray(-np.logaddexp(0.0, rn(1, t, hv)))
    beta = jnp.asarray(1.0 / (1.0 + np.exp(-rn(1, t, hv))))
    dev = jax.devices()[0]
    # the host plan closed over: the real N is known, the final state has N rows
    fn = jax.jit(lambda *a: gdn.prefill(*a, plan=p, impl=impl))
    compiled = fn.lower(q, kk, vv, g, beta).compile()
    ma = compiled.memory_analysis()
    for x in (q, kk, vv, g, beta):
        x.block_until_ready()
    stats = dev.memory_stats() or {}
    base, peak0 = stats.get("bytes_in_use", 0), stats.get("peak_bytes_in_use", 0)
    o, f = compiled(q, kk, vv, g, beta)
    o.block_until_ready()
    stats = dev.memory_stats() or {}
    peak1 = stats.get("peak_bytes_in_use", 0)
    # where a run peak above XLA's plan comes from (mosaic_gpu, 2026-11-28: ~88 MiB unexplained):
    # what stays allocated with the outputs alive (a persistent runtime allocation shows here) and
    # after they are freed
    in_use_with_out = stats.get("bytes_in_use", 0)
    del o, f
    in_use_after_del = (dev.memory_stats() or {}).get("bytes_in_use", 0)
    return dict(impl=impl, base=base, peak_before=peak0, peak_after=peak1,
                in_use_with_out=in_use_with_out, in_use_after_del=in_use_after_del,
                temp=getattr(ma, "temp_size_in_bytes", None),
                output=getattr(ma, "output_size_in_bytes", None),
                alias=getattr(ma, "alias_size_in_bytes", None), largest_alloc=stats.get("largest_alloc_size"))


@section
def memory(c):
    lens, p = _memory_shape()
    gen = torch.Generator(device=DEV).manual_seed(0)
    t = p.num_tokens
    rn = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    h, hv, k, v = QWEN["h"], QWEN["hv"], QWEN["k"], QWEN["v"]
    arrays = [rn(1, t, h, k).bfloat16(), rn(1, t, h, k).bfloat16(), rn(1, t, hv, v).bfloat16(),
              -torch.nn.functional.softplus(rn(1, t, hv)), torch.sigmoid(rn(1, t, hv))]
    dp = p.to_torch(DEV)
    gdn.prefill(*arrays, plan=dp)  # compile first
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o, f = gdn.prefill(*arrays, plan=dp)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        stated, scratch = _stated("triton", p)
        c.ok("triton: peak extra memory within 5% of the statement",
             abs(peak / stated - 1) < 0.05,
             f"measured {peak / 2**20:.1f} MiB, stated {stated / 2**20:.1f} MiB "
             f"({scratch / t:.0f} B/token scratch + outputs)")
        del o, f
    del arrays
    for impl in jax_impls():
        stated, scratch = _stated(impl, p)
        try:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
            env.pop("XLA_PYTHON_CLIENT_ALLOCATOR", None)  # the BFC pool: it keeps peak statistics
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--jax-memory", impl],
                                 capture_output=True, text=True, env=env, timeout=300)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not line:
                c.ok(f"{impl}: memory run", False, res.stdout[-800:] + res.stderr[-1500:])
                continue
            m = json.loads(line[-1])
        except Exception as e:  # noqa: BLE001
            c.ok(f"{impl}: memory run", False, f"{type(e).__name__}: {e}")
            continue
        planned = (m["temp"] or 0) + (m["output"] or 0)
        run_peak = m["peak_after"] - m["base"] if m["peak_after"] > m["peak_before"] else None
        mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
        detail = (f"XLA plan {mib(planned)} MiB (temp {mib(m['temp'] or 0)}), "
                  f"run peak {'hidden by compile' if run_peak is None else f'{mib(run_peak)} MiB'}, "
                  f"stated {mib(stated)} MiB; in use with the outputs {mib(m['in_use_with_out'] - m['base'])}, "
                  f"after freeing them {mib(m['in_use_after_del'] - m['base'])}, "
                  f"largest allocation {mib(m.get('largest_alloc') or 0)} MiB")
        if impl == "xla":  # an upper bound
            ok = planned <= stated and (run_peak is None or run_peak <= stated * 1.05)
        else:
            meas = run_peak if run_peak is not None else planned
            ok = 0.6 * stated <= meas <= 1.15 * stated
        c.ok(f"{impl}: peak extra memory vs statement", ok, detail)


# ------------------------------------------------------------------------------------------
@section
def one_million_tokens(c):
    t = 1 << (9 if SMOKE else 20)
    piece = t // 8
    h, hv, k, v = QWEN["h"], QWEN["hv"], QWEN["k"], QWEN["v"]
    print(f"  T = {t}, T * HV * V = {t * hv * v:.3e} (2^31 = {2**31:.3e}); h holds "
          f"{t // 64 * hv * k * v:.3e} elements")
    gen = torch.Generator(device=DEV).manual_seed(1)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    q = torch.nn.functional.normalize(rn(1, t, h, k), dim=-1).bfloat16()
    kk = torch.nn.functional.normalize(rn(1, t, h, k), dim=-1).bfloat16()
    vv = rn(1, t, hv, v).bfloat16()
    g = -torch.exp(torch.rand(hv, device=DEV, generator=gen) * 2.7) * \
        torch.nn.functional.softplus(rn(1, t, hv) - 4)
    beta = torch.sigmoid(rn(1, t, hv))
    arrays = (q, kk, vv, g, beta)
    o, f = _prefill("triton", None, arrays, [0, t])
    state = None
    eo = 0.0
    for i in range(0, t, piece):
        oi, state = _prefill("triton", None, [a[:, i:i + piece] for a in arrays], [0, piece],
                             initial_state=state)
        eo = max(eo, _rms_torch(o[:, i:i + piece], oi))
        del oi
    ef = _rms_torch(f, state)
    c.ok(f"triton: one call of {t} tokens vs 8 chained calls", eo < RMS_BETWEEN["bfloat16"]
         and ef < RMS_BETWEEN["bfloat16"], f"o {eo:.1e}, final {ef:.1e} (bar {RMS_BETWEEN['bfloat16']:.0e})")
    for impl in jax_impls():
        if impl == "xla" and not SMOKE:
            continue  # a 16 384-step scan at the Qwen3.5 shape: too slow to be useful here
        try:
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            oj, fj = _prefill("jax", impl, arrays, [0, t])
            eo, ef = _rms_torch(oj, o), _rms_torch(fj, f)
            c.ok(f"{impl}: {t} tokens vs triton", eo < RMS_BETWEEN["bfloat16"]
                 and ef < RMS_BETWEEN["bfloat16"], f"o {eo:.1e}, final {ef:.1e}")
            del oj, fj
        except Exception as e:  # noqa: BLE001
            c.ok(f"{impl}: {t} tokens", False, f"{type(e).__name__}: {e}")
    # a packed batch whose later sequences start past 2^31 elements of v / o, vs each alone
    cu = [0, t * 9 // 16, t * 7 // 8, t - 5, t]
    o, f = _prefill("triton", None, arrays, cu)
    worst = 0.0
    for n in range(len(cu) - 1):
        a, b = cu[n], cu[n + 1]
        on, fn = _prefill("triton", None, [x[:, a:b] for x in arrays], [0, b - a])
        worst = max(worst, _rms_torch(o[:, a:b], on), _rms_torch(f[n:n + 1], fn))
    c.ok("triton: packed [9/16, 5/16, 1/8 - 5, 5] of T vs each sequence alone",
         worst < RMS_BETWEEN["bfloat16"], f"worst {worst:.1e} (starts {cu[1:-1]})")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--jax-memory"]:
        print(json.dumps(_jax_memory(argv[1])), flush=True)
        return 0
    t0 = time.perf_counter()
    for fn in SECTIONS:
        if not argv or fn.__name__ in argv or fn.__name__ == "environment":
            run(fn)
    print(f"\n=== summary ({time.perf_counter() - t0:.0f} s)")
    for name, status in RESULTS.items():
        print(f"  {status:4s}  {name}")
    return sum(status == "FAIL" for status in RESULTS.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
