"""``python -m gdn bench``: time every gdn implementation and the importable peers (FLA,
FlashInfer, jax-linear-attention) over a matrix of head configurations and batch layouts.

    python -m gdn bench                          # the whole matrix on a GPU (--quick: a subset)
    python -m gdn bench --heads 16/32 --layouts 1x32768,4x8192 --out out/bench
    python -m gdn bench --impl fla --impl jax:mosaic_gpu --impl jax:mosaic_gpu:split  # and the split
    python -m gdn bench --impl jax:mosaic_gpu --impl jax:mosaic_gpu:host  # jitted: device vs host plan
    python -m gdn bench --heads 2/4 --heads 2/8 --impl fla --impl triton:triton --impl triton:triton:split
    python -m gdn bench --cpu-smoke --out /tmp/b  # tiny shapes in interpret mode (automatic
                                                  # without a GPU): checks the harness, not speed
    python -m gdn bench --from-json a/bench.json b/bench.json --out out/all   # merge and render

Per row: device time per call (ms), the speedup over FLA from the same run, real TFLOP/s
(gdn.roofline: 6KV + 10CK + 2C^2/3 per token per v head) and FlashInfer's nominal 4KV TFLOP/s,
the fraction of the roofline floor reached, host time per call with a prebuilt plan, the first
call's time (compilation included), the peak GPU memory a call adds, and a correctness check
(rms ratio of the output against FLA's, or against the first implementation of the row).

Timing (DESIGN.md, GPU.md): inputs random and realistic (gdn.inputs, Qwen3.5 gates), never zeros,
an initial state per sequence; several input sets rotated when one set fits in L2. Torch calls:
triton.testing.do_bench (CUDA events, L2 flushed between calls, warm-up, median). JAX calls: a
jitted function called in a loop with one block_until_ready at the end, median of several loops;
cross-checked once against a profiler trace (GPU kernel busy time per call). Host time: median
of calls made with an empty queue (the call returning, not its work). Outputs go to ``--out``:
bench.json, bench.md (the table for benchmarks/RESULTS.md) and bench.png (time per layout per
implementation, the floor as a line).

Layout names follow the issue: ``AxB`` is sequences of the larger number of tokens, as many as
the smaller number (``4x8192`` and ``2048x4`` are both 4 sequences; ``16384x2`` is 2 of 16384),
``a+b`` lists lengths, ``mix`` is a realistic serving mix.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import math
import os
import site
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np

from . import reference, roofline
from .api import prefill
from .arrays import convert, on_gpu, sync
from .inputs import make_inputs, round_to_dtype
from .parity import environment, print_table, write_json
from .planner import plan as make_plan
from .registry import implementations

__all__ = ["main", "LAYOUTS", "HEADS", "layout_lens", "serving_mix", "gpu_busy_ms", "render"]

HEADS = ((16, 32), (16, 48), (16, 16), (8, 32), (2, 8))
HEAD_DIM = 128
DTYPE = "bfloat16"


def serving_mix(total: int = 32768, seed: int = 0) -> tuple[int, ...]:
    """A realistic prefill batch of a serving engine: prompt lengths log-normal around 600
    tokens (16 to 8192), as many as fill ``total`` tokens (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(int(np.clip(rng.lognormal(np.log(600), 1.1), 16, 8192)))
    lens[-1] = total - sum(lens[:-1])
    return tuple(lens)


def layout_lens(name: str) -> tuple[int, ...]:
    """'4x8192' / '2048x4' (the larger number is the length), '28672+4096', 'mix'."""
    if name == "mix":
        return serving_mix()
    try:
        if "+" in name:
            lens = tuple(int(x) for x in name.split("+"))
        else:
            a, b = (int(x) for x in name.split("x"))
            lens = (max(a, b),) * min(a, b)
    except ValueError:
        lens = ()
    if not lens or min(lens) < 1:
        raise ValueError(f"a layout is AxB (e.g. 4x8192), a+b+... (e.g. 28672+4096) or 'mix', "
                         f"got {name!r}")
    return lens


LAYOUTS = ("1x32768", "28672+4096", "16384x2", "4x8192", "8x4096", "128x256", "mix", "1x8192",
           "2048x4", "1024x8")
QUICK_HEADS = ((16, 32),)
QUICK_LAYOUTS = ("1x32768", "4x8192", "128x256", "mix", "1x8192")
#: --cpu-smoke: tiny shapes in one bucket of the planner (one compilation per implementation)
SMOKE_HEADS = ((1, 2),)
SMOKE_DIM = 32
SMOKE_LAYOUTS = {"1x128": (128,), "3+61+64": (3, 61, 64)}


# ---------------------------------------------------------------------------------------------
# a workload: one head configuration and one layout, its inputs in each framework
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    h: int
    hv: int
    k: int
    v: int
    layout: str
    lens: tuple[int, ...]
    base: Any  # gdn.inputs.Inputs with at least sum(lens) tokens (fp32 NumPy)
    n_sets: int = 1
    seed: int = 0
    _sets: dict = dataclasses.field(default_factory=dict)
    device: roofline.Device = roofline.H200  # the roofline model of the GPU that runs it

    def __post_init__(self):
        self.tokens = int(sum(self.lens))
        self.cu = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)
        self.plan = make_plan(self.cu, num_tokens=self.tokens)
        rng = np.random.default_rng(self.seed)
        self.h0 = (0.1 * rng.standard_normal((len(self.lens), self.hv, self.k, self.v))
                   ).astype(np.float32)
        self.cost = roofline.cost(self.tokens, len(self.lens), self.h, self.hv, self.k, self.v,
                                  DTYPE, self.device)

    @property
    def heads(self) -> str:
        return f"{self.h}/{self.hv}"

    @property
    def arrays(self) -> list[np.ndarray]:
        """q, k, v, g, beta: the first ``tokens`` tokens of the base inputs (views)."""
        return [a[:, : self.tokens] for a in self.base.arrays]

    def sets(self, backend: str) -> list[tuple]:
        """``n_sets`` copies of (q, k, v, g, beta, h0) in the backend's arrays (cached)."""
        if backend not in self._sets:
            first = tuple([convert(a, backend, DTYPE) for a in self.arrays[:3]]
                          + [convert(a, backend, "float32") for a in self.arrays[3:]]
                          + [convert(self.h0, backend, "float32")])
            copies = [first]
            for _ in range(self.n_sets - 1):
                copies.append(tuple(_copy(a) for a in first))
            self._sets[backend] = copies
        return self._sets[backend]

    def release(self) -> None:
        self._sets.clear()


def _copy(x):
    if type(x).__module__.startswith("torch"):
        return x.clone()
    import jax.numpy as jnp

    return jnp.array(x, copy=True)


def _n_sets(n_bytes: float, gpu: bool) -> int:
    """Input sets to rotate so that the ones timed are not L2-resident (3x the L2 in all)."""
    if not gpu:
        return 1
    return int(min(8, max(1, math.ceil(3 * roofline.H200.l2_bytes / max(n_bytes, 1)))))


# ---------------------------------------------------------------------------------------------
# runners: gdn implementations, peers, and (CPU smoke) the float64 reference
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """A prepared call on one workload."""

    run: Callable[[int], Any]  # run(i): one call on input set i, outputs not waited for
    o_of: Callable[[Any], Any]  # outputs -> o as [T, HV, V]
    host: Callable[[], Any]  # the user-facing call, for the host time
    jitted: tuple | None = None  # (jax jitted fn, example args): memory analysis
    note: str = ""


class Runner:
    key = ""  # the --impl name
    name = ""  # the column / row label
    framework = "torch"
    #: --qk-l2norm: q and k L2-normalized by the call (the serving configuration of Qwen3-Next /
    #: Qwen3.5: vLLM's use_qk_l2norm_in_kernel=True); each runner does it its own way
    qk_l2norm = False

    def unavailable(self) -> str | None:
        return None

    def skip(self, wl: Workload, opts) -> str | None:
        return None

    def prepare(self, wl: Workload) -> Call:
        raise NotImplementedError


class GdnRunner(Runner):
    def __init__(self, backend: str, impl: str):
        self.backend, self.impl = backend, impl
        self.key = f"{backend}:{impl}"
        self.name = f"gdn {self.key}"
        self.framework = "torch" if backend == "triton" else "jax"

    def skip(self, wl, opts):
        if self.impl == "xla" and opts.gpu and wl.tokens > opts.xla_max_tokens:
            return (f"xla (a lax.scan over chunks, the portable path) only up to "
                    f"{opts.xla_max_tokens} tokens (--xla-max-tokens)")
        return None

    def _kw(self) -> dict:
        """gdn.prefill's options of this row."""
        return dict(backend=self.backend, impl=self.impl, use_qk_l2norm=self.qk_l2norm)

    def _eager(self, wl):
        """The user-facing call on input set i: eager gdn.prefill with the prebuilt host plan."""
        sets, p, kw = wl.sets(self.backend), wl.plan, self._kw()

        def eager(i=0):
            s = sets[i]
            return prefill(*s[:5], plan=p, initial_state=s[5], **kw)

        return eager

    def prepare(self, wl):
        sets, p = wl.sets(self.backend), wl.plan
        eager = self._eager(wl)
        if self.framework == "torch":
            return Call(eager, lambda out: out[0][0], eager)
        import jax.numpy as jnp

        fn = self._jitted()
        pj = p.to_jax()
        pad = p.padded_seqs - len(wl.lens)  # under jit the plan's real N is unknown: N_pad rows
        jsets = [s[:5] + (jnp.pad(s[5], ((0, pad), (0, 0), (0, 0), (0, 0))),) for s in sets]
        return Call(lambda i: fn(pj, *jsets[i]), lambda out: out[0][0], eager,
                    jitted=(fn, (pj,) + jsets[0]), note="jitted, plan as an argument")

    def _jitted(self):
        """One jitted wrapper per implementation: layouts in one bucket share its compilation."""
        if getattr(self, "_fn", None) is None:
            import jax

            kw = self._kw()

            @jax.jit
            def fn(pl, q, k, v, g, beta, h0):
                return prefill(q, k, v, g, beta, plan=pl, initial_state=h0, **kw)

            self._fn = fn
        return self._fn


class HostPlanRunner(GdnRunner):
    """gdn jitted with the host plan as a constant of the call (``--impl jax:mosaic_gpu:host``): what
    an eager ``gdn.prefill`` or a jit closing over the plan runs. The loop and grid are picked for
    the batch's own sequence count, and ``split=None`` applies its default. Each layout compiles
    once (the first call's time shows it)."""

    suffix = ":host"

    def __init__(self, backend: str, impl: str):
        super().__init__(backend, impl)
        self.key += self.suffix
        self.name = f"gdn {self.key}"

    def _note(self, wl) -> str:
        return "host plan" if self.framework == "torch" else "host plan, a constant of the jitted call"

    def prepare(self, wl):
        sets, p, kw, eager = wl.sets(self.backend), wl.plan, self._kw(), self._eager(wl)
        note = self._note(wl)
        if self.framework == "torch":  # the triton backend's calls are eager with the host plan anyway
            return Call(eager, lambda out: out[0][0], eager, note=note)
        import jax

        fn = jax.jit(lambda q, k, v, g, beta, h0: prefill(q, k, v, g, beta, plan=p, initial_state=h0, **kw))
        return Call(lambda i: fn(*sets[i]), lambda out: out[0][0], eager, jitted=(fn, sets[0]), note=note)


class SplitRunner(HostPlanRunner):
    """gdn's exact sequence split on one device (``gdn.prefill(split=...)``): ``split=True`` lets
    the path's cost model pick the pieces or none (then the row is the unsplit call), an int sets
    the chunks per piece. The split is planned on the host, so the plan is a constant of the
    jitted call: each layout compiles once (the first call's time shows it)."""

    def __init__(self, backend: str, impl: str, split: bool | int = True):
        self.split = split
        self.suffix = ":split" if split is True else f":split{int(split)}"
        super().__init__(backend, impl)

    def _kw(self) -> dict:
        return dict(super()._kw(), split=self.split)

    def _note(self, wl) -> str:
        note = "split=True: the path's cost model" if self.split is True else f"pieces of {self.split} chunks"
        if self.split is True and self.impl in ("mosaic_gpu", "triton"):
            if self.impl == "mosaic_gpu":
                from .jax_backend.mosaic_gpu.split import pick_piece_chunks
            else:
                from .triton_backend.split import pick_piece_chunks
            pc = pick_piece_chunks(wl.lens, wl.hv, wl.k, wl.v)
            note += f" ({'unsplit' if not pc else f'pieces of {pc} chunks'})"
        return note + "; " + super()._note(wl)


class ReferenceRunner(Runner):
    """The float64 NumPy reference (CPU smoke only): a row that always exists."""

    key, name, framework = "reference", "reference f64", "numpy"

    def prepare(self, wl):
        q, k, v = (round_to_dtype(a, DTYPE) for a in wl.arrays[:3])

        def run(i=0):
            return reference.chunked(q, k, v, *wl.arrays[3:], cu_seqlens=wl.cu,
                                     initial_state=wl.h0)

        return Call(run, lambda out: out[0][0], run, note="float64 NumPy")


class FlaRunner(Runner):
    key, name, framework = "fla", "FLA", "torch"

    def unavailable(self):
        if not on_gpu("triton"):
            return "needs a CUDA GPU"
        os.environ.setdefault("FLA_FLASH_QLA", "0")
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
            import fla

            self.name = f"FLA {getattr(fla, '__version__', '')}".strip()
        except Exception as e:
            return f"fla-core not importable: {type(e).__name__}: {e}"
        return None

    def prepare(self, wl):
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.utils import prepare_chunk_indices

        sets = wl.sets("triton")
        cu_cpu = torch.as_tensor(wl.cu, dtype=torch.long)
        cu = cu_cpu.to(sets[0][0].device)
        ci = prepare_chunk_indices(cu, 64, cu_seqlens_cpu=cu_cpu)

        def run(i=0):
            q, k, v, g, beta, h0 = sets[i]
            return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                          output_final_state=True, cu_seqlens=cu,
                                          chunk_indices=ci, use_qk_l2norm_in_kernel=self.qk_l2norm)

        mode = os.environ.get("FLA_FLASH_QLA")
        return Call(run, lambda out: out[0][0], run,
                    note=f"FLA_FLASH_QLA={mode}, cu_seqlens + prebuilt chunk_indices"
                    + ("; use_qk_l2norm_in_kernel" if self.qk_l2norm else ""))


class FlashInferRunner(Runner):
    key, name, framework = "flashinfer", "FlashInfer", "torch"

    def unavailable(self):
        if not on_gpu("triton"):
            return "needs a CUDA GPU"
        try:
            from flashinfer.gdn_prefill import chunk_gated_delta_rule  # noqa: F401
            import flashinfer

            self.name = f"FlashInfer {getattr(flashinfer, '__version__', '')}".strip()
        except Exception as e:
            return (f"flashinfer not importable ({type(e).__name__}: {e}); see "
                    f"shared/tools/flashinfer-bundle, then --site /tmp/fisite")
        return None

    def skip(self, wl, opts):
        return None if wl.k == wl.v == 128 else "FlashInfer's GDN prefill takes head size 128"

    def prepare(self, wl):
        import torch
        from flashinfer.gdn_prefill import chunk_gated_delta_rule

        prepared = []
        for q, k, v, g, beta, h0 in wl.sets("triton"):
            h0t = h0.transpose(-1, -2).contiguous()  # FlashInfer's states are [N, HV, V, K]
            prepared.append((q[0], k[0], v[0], torch.exp(g[0].float()).contiguous(),
                             beta[0].float().contiguous(), h0t, torch.empty_like(h0t)))
        cu = torch.as_tensor(wl.cu, dtype=torch.int32).to(prepared[0][0].device)
        max_len = int(max(wl.lens))

        l2 = self.qk_l2norm
        normalize, how = _fused_l2norm() if l2 else (None, "")

        def run(i=0):
            q, k, v, alpha, beta, h0t, out_state = prepared[i]
            if l2:  # its SM90 path does not normalize (use_qk_l2norm_in_kernel is not passed on)
                q, k = normalize(q), normalize(k)
            return chunk_gated_delta_rule(q, k, v, g=alpha, beta=beta, initial_state=h0t,
                                          output_final_state=True, cu_seqlens=cu,
                                          output_state=out_state, max_seqlen=max_len)

        return Call(run, lambda out: out[0], run,
                    note="packed [T, heads, 128], alpha = exp(g), states [N, HV, V, K]"
                    + (f"; q, k normalized by {how} first (timed)" if l2 else ""))


def _fused_l2norm():
    """(x -> x / sqrt(sum x^2 + 1e-6) in x's dtype, its description) for a peer that does not
    normalize q and k itself: FLA's one-pass Triton kernel when FLA is installed (the
    H200 run of 2026-12-05 normalized with torch's unfused ops instead: ~1.2 ms of the FlashInfer
    row's 1.62 at 4x8192, a cost no serving stack pays), else torch."""
    try:
        from fla.modules.norm.l2norm import l2norm_fwd

        return (lambda x: l2norm_fwd(x, eps=1e-6)[0]), "FLA's Triton l2norm_fwd"
    except Exception:  # noqa: BLE001 - any import failure: the torch fallback, named in the row
        import torch

        def normalize(x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + 1e-6)).to(x.dtype)

        return normalize, "torch (unfused)"


class JlaRunner(Runner):
    key, name, framework = "jla", "jax-linear-attention", "jax"

    def unavailable(self):
        if not on_gpu("jax"):
            return "needs a CUDA GPU"
        try:
            from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule  # noqa: F401
        except Exception as e:
            return f"jax-linear-attention not importable: {type(e).__name__}: {e}"
        return None

    def prepare(self, wl):
        import jax
        import jax.numpy as jnp
        from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule

        n, t = len(wl.lens), wl.tokens
        equal = len(set(wl.lens)) == 1
        args = []
        for q, k, v, g, beta, h0 in wl.sets("jax"):
            if equal:  # a [B, L] batch: one state per sequence
                args.append(tuple(a.reshape((n, t // n) + a.shape[2:]) for a in (q, k, v, g, beta))
                            + (h0, None))
            else:  # packed documents: segment ids, one state for the whole row
                seg = jnp.asarray(np.repeat(np.arange(n, dtype=np.int32), wl.lens)[None])
                args.append((q, k, v, g, beta, h0[:1], seg))

        from .jax_backend.common import l2normalize as normalize  # --qk-l2norm: in the jitted call

        if getattr(self, "_fn", None) is None:
            l2 = self.qk_l2norm
            self._fn = jax.jit(lambda q, k, v, g, beta, h0, seg: gated_delta_rule(
                normalize(q) if l2 else q, normalize(k) if l2 else k, v, g, beta, initial_state=h0,
                output_final_state=True, segment_ids=seg))
        fn = self._fn
        note = ("[B, L] batch" if equal else
                "packed documents via segment_ids: ONE state per row, not per document")
        if self.qk_l2norm:
            note += "; q, k normalized by XLA first (timed)"
        return Call(lambda i: fn(*args[i]), lambda out: out[0].reshape(t, wl.hv, wl.v),
                    lambda: fn(*args[0]), jitted=(fn, args[0]), note=note)


def runners(opts) -> tuple[list[Runner], list[tuple[str, str]]]:
    """(usable runners, [(key, why not)]), peers first (FLA is the yardstick of each row)."""
    cands: list[Runner] = []
    if opts.smoke:
        cands.append(ReferenceRunner())
    if not opts.no_peers:
        cands += [FlaRunner(), FlashInferRunner(), JlaRunner()]
    for im in implementations():
        if im.impl == "-":
            continue
        rs = [GdnRunner(im.backend, im.impl)]
        # the split's two passes run on mosaic_gpu's kernels (each layout compiles them anew) or
        # the triton backend's; a row only when asked for by name (--impl jax:mosaic_gpu:split)
        if (im.backend, im.impl) in (("jax", "mosaic_gpu"), ("triton", "triton")) and any(
                "split" in pat for pat in opts.impl or ()):
            rs.append(SplitRunner(im.backend, im.impl))
        # and the host plan's row (--impl jax:mosaic_gpu:host): the eager caller's picks
        if im.backend == "jax" and any(pat.endswith(":host") for pat in opts.impl or ()):
            rs.append(HostPlanRunner(im.backend, im.impl))
        for r in rs:
            if not im.available:
                r.unavailable = lambda why=im.reason: why
            cands.append(r)
    if opts.impl:
        import fnmatch

        cands = [r for r in cands if any(fnmatch.fnmatch(r.key, pat) or fnmatch.fnmatch(
            r.key, pat + ":*") for pat in opts.impl)]
    ok, missing = [], []
    for r in cands:
        r.qk_l2norm = opts.qk_l2norm
        why = r.unavailable()
        (missing.append((r.key, why)) if why else ok.append(r))
    return ok, missing


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _median_wall(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def device_ms(runner: Runner, call: Call, n_sets: int, opts) -> tuple[float, str]:
    """Device time per call in ms, and how it was measured."""
    counter = iter(range(1 << 62))
    nxt = lambda: call.run(next(counter) % n_sets)
    if not opts.gpu or runner.framework == "numpy":
        return _median_wall(nxt, opts.reps), f"wall clock, median of {max(1, opts.reps)}"
    if runner.framework == "torch":
        from triton.testing import do_bench

        return float(do_bench(nxt, warmup=25, rep=100, return_mode="median")), "do_bench median"
    import jax

    one = _median_wall(nxt, 3)  # calibrate: each loop lasts >= ~25 ms
    n = int(min(200, max(5, math.ceil(25.0 / max(one, 1e-3)))))
    loops = []
    for _ in range(max(1, opts.reps)):
        t0 = time.perf_counter()
        for _ in range(n):
            out = nxt()
        jax.block_until_ready(out)
        loops.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(loops), f"jitted loop of {n}, median of {len(loops)}"


def host_us(fn: Callable[[], Any], reps: int) -> float:
    """Median time for a call to return (not its work), each made with an empty queue."""
    times = []
    out = None
    for _ in range(max(1, reps)):
        sync(out)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    sync(out)
    return statistics.median(times) * 1e6


_MEM_CACHE: dict = {}


def peak_mem_mb(runner: Runner, call: Call) -> float | None:
    """GPU memory one call adds at its peak (outputs + workspace), MB."""
    try:
        if runner.framework == "torch":
            import torch

            if not torch.cuda.is_available():
                return None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sync(call.run(0))
            return (torch.cuda.max_memory_allocated() - base) / 1e6
        if runner.framework == "jax" and call.jitted is not None:
            import jax

            fn, args = call.jitted
            # lower().compile() compiles again: once per runner and argument shapes (a bucket)
            key = (id(fn), str(jax.tree_util.tree_structure(args)),
                   tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args)))
            if key not in _MEM_CACHE:
                ma = fn.lower(*args).compile().memory_analysis()
                _MEM_CACHE[key] = None if ma is None else (
                    ma.temp_size_in_bytes + ma.output_size_in_bytes) / 1e6
            return _MEM_CACHE[key]
    except Exception:
        return None
    return None


def gpu_stream_events(trace) -> list[dict]:
    """The complete ("X") events of a perfetto/chrome trace (jax.profiler) on the GPU device's
    stream threads (all its threads if none is named 'Stream...')."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    streams = {(e["pid"], e.get("tid")) for e in events if e.get("ph") == "M"
               and e.get("name") == "thread_name" and e.get("pid") in gpu_pids
               and str(e.get("args", {}).get("name", "")).startswith("Stream")}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids
            and (not streams or (e["pid"], e.get("tid")) in streams)]


def gpu_busy_ms(trace: dict, n_calls: int) -> float | None:
    """GPU busy time per call from a perfetto/chrome trace (jax.profiler): the union of the
    intervals of :func:`gpu_stream_events`, divided by the calls. None when the trace holds no GPU
    events."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in gpu_stream_events(trace))
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo, hi = busy + hi - lo, a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    return busy / 1e3 / max(1, n_calls)  # trace times are in microseconds


def trace_calls(run: Callable[[int], Any], n_calls: int) -> dict | None:
    """The jax.profiler (perfetto) trace of ``run(0) .. run(n_calls - 1)``, waited for, as a dict;
    None when no trace file was written."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            out = None
            for i in range(n_calls):
                out = run(i)
            jax.block_until_ready(out)
        files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not files:
            return None
        with gzip.open(files[0]) as fh:
            return json.load(fh)


def profile_crosscheck(call: Call, n_sets: int, n_calls: int = 20) -> dict:
    """The JAX loop timing against a profiler trace of the same calls."""
    trace = trace_calls(lambda i: call.run(i % n_sets), n_calls)
    if trace is None:
        return {"error": "no perfetto trace written"}
    return {"trace_gpu_busy_ms": gpu_busy_ms(trace, n_calls), "calls": n_calls}


@dataclasses.dataclass
class Options:
    gpu: bool
    smoke: bool
    reps: int
    host_reps: int
    xla_max_tokens: int
    profile: bool
    no_peers: bool = False
    impl: list | None = None
    qk_l2norm: bool = False
    device: roofline.Device = roofline.H200  # the floor's model (roofline.device_for the GPU's name)
    profile_calls: int = 20
    checkpoint: Callable[[list], None] | None = None  # called with the rows after each workload


def measure(runner: Runner, wl: Workload, opts: Options) -> dict:
    """One row: everything measured for one runner on one workload."""
    call = runner.prepare(wl)
    t0 = time.perf_counter()
    out = call.run(0)
    sync(out)
    first = time.perf_counter() - t0
    n_check = min(wl.tokens, 8192)
    o = reference.to_numpy64(call.o_of(out)[:n_check]).astype(np.float32)
    del out
    ms, how = device_ms(runner, call, wl.n_sets, opts)
    row = dict(status="ok", ms=ms, timing=how, first_call_s=first,
               # the user-facing call (eager gdn.prefill with the prebuilt plan); in a CPU smoke
               # run the timed call itself, sparing interpret mode a second compilation
               host_us=host_us((lambda: call.run(0)) if opts.smoke else call.host, opts.host_reps),
               mem_mb=peak_mem_mb(runner, call),
               note=call.note, _o=o)
    if opts.profile and isinstance(runner, GdnRunner) and runner.framework == "jax" and opts.gpu:
        opts.profile = False  # once per run
        row["profile"] = dict(profile_crosscheck(call, wl.n_sets, opts.profile_calls), loop_ms=ms)
    return row


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------
def _row_base(wl: Workload, r: Runner) -> dict:
    c = wl.cost
    n = len(wl.lens)
    desc = (f"{n} x {wl.lens[0]}" if len(set(wl.lens)) == 1 else
            f"{n} seqs ({min(wl.lens)}-{max(wl.lens)})")
    return dict(heads=wl.heads, h=wl.h, hv=wl.hv, k=wl.k, v=wl.v, layout=wl.layout, seqs=n,
                shape_desc=desc, tokens=wl.tokens, runner=r.name, key=r.key,
                framework=r.framework, floor_ms=c.floor_ms, bound=c.bound, gflop=c.flops / 1e9,
                gbytes=c.bytes / 1e9, floor_device=wl.device.name)


def _finish(rows: list[dict]) -> None:
    """Speedups against FLA, TFLOP/s, floor fractions and the correctness check, per workload."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["heads"], r["k"], r["layout"]), []).append(r)
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        fla = next((r for r in ok if r["key"] == "fla"), None)
        yard = fla or next((r for r in ok if "_o" in r), None)
        for r in ok:
            s = r["ms"] / 1e3
            r["tflops"] = r["gflop"] / 1e3 / s
            nominal = roofline.nominal_flops(r["tokens"], r["hv"], r["k"], r["v"])
            r["tflops_nominal"] = nominal / s / 1e12
            r["floor_frac"] = r["floor_ms"] / r["ms"]
            r["speedup_vs_fla"] = fla["ms"] / r["ms"] if fla else None
            if yard is not None and r is not yard and "_o" in r and "_o" in yard:
                r["check_rms"] = reference.rms_ratio(r["_o"], yard["_o"])
                r["check_vs"] = yard["runner"]
                if r["check_rms"] > 1e-2 and "ONE state per row" not in r.get("note", ""):
                    r["note"] = (r.get("note", "") + "; OUTPUT MISMATCH").lstrip("; ")
        for r in group:
            r.pop("_o", None)


def _jax_device_kind() -> str | None:
    """The first JAX device's kind where JAX runs on a GPU (no torch there), else None."""
    try:
        import jax

        dev = jax.devices()[0]
        return dev.device_kind if dev.platform == "gpu" else None
    except Exception:
        return None


def run_matrix(shapes, layouts: dict[str, tuple[int, ...]], rlist: list[Runner], opts: Options,
               progress, rows: list[dict] | None = None) -> list[dict]:
    """Measure the matrix, appending to ``rows`` (so an interrupted run keeps its rows)."""
    rows = [] if rows is None else rows
    for h, hv, dim in shapes:
        max_tokens = max(sum(v) for v in layouts.values())
        base = make_inputs([max_tokens], h, hv, dim, dim, gates="qwen", seed=h * 1000 + hv)
        for name, lens in layouts.items():
            wl = Workload(h, hv, dim, dim, name, lens, base, seed=len(lens), device=opts.device)
            wl.n_sets = _n_sets(wl.cost.bytes, opts.gpu)
            for r in rlist:
                row = _row_base(wl, r)
                progress.step(f"{wl.heads} {name} {r.name}")
                why = r.skip(wl, opts)
                if why:
                    rows.append(dict(row, status="skip", note=why))
                    continue
                t_row = time.perf_counter()
                try:
                    row.update(measure(r, wl, opts))
                except Exception as e:
                    progress.log(f"{r.name} on {wl.heads} {name}: {type(e).__name__}: {e}\n"
                                 + traceback.format_exc(limit=4))
                    row.update(status="error", note=f"{type(e).__name__}: {str(e)[:160]}")
                row["wall_s"] = time.perf_counter() - t_row  # what the row cost the run's budget
                rows.append(row)
            wl.release()
            _free_gpu()
            if opts.checkpoint is not None:
                opts.checkpoint(rows)
    _finish(rows)
    return rows


def _free_gpu() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Progress:
    """A rich progress bar over the matrix on a terminal, plain lines otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        self.t0 = time.perf_counter()
        if sys.stderr.isatty():
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP,
                                           TextColumn, TimeElapsedColumn)

                self.bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), transient=True)
                self.task = self.bar.add_task("bench", total=total)
                self.bar.start()
            except ImportError:
                self.bar = None

    def step(self, what: str) -> None:
        if self.done and self.bar is not None:
            self.bar.advance(self.task)
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, description=what)
        else:
            print(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.1f} s] {what}",
                  file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        (self.bar.console.print if self.bar is not None else
         lambda m: print(m, file=sys.stderr))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# output: terminal table, JSON, Markdown, PNG
# ---------------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


COLUMNS = [  # (header, row -> cell, align)
    ("heads", lambda r: r["heads"], "l"),
    ("layout", lambda r: r["layout"], "l"),
    ("implementation", lambda r: r["runner"], "l"),
    ("ms", lambda r: _f(r.get("ms"), ".4g"), "r"),
    ("vs FLA", lambda r: _f(r.get("speedup_vs_fla"), ".2f") + ("x" if r.get("speedup_vs_fla")
                                                              else ""), "r"),
    ("TFLOP/s", lambda r: _f(r.get("tflops"), ".3g"), "r"),
    ("nominal 4KV TFLOP/s", lambda r: _f(r.get("tflops_nominal"), ".3g"), "r"),
    ("% of floor", lambda r: _f(100 * r["floor_frac"] if r.get("floor_frac") else None, ".2g"), "r"),
    ("floor ms", lambda r: _f(r.get("floor_ms"), ".3g"), "r"),
    ("host us", lambda r: _f(r.get("host_us"), ".0f"), "r"),
    ("first call s", lambda r: _f(r.get("first_call_s"), ".1f"), "r"),
    ("peak MB", lambda r: _f(r.get("mem_mb"), ".0f"), "r"),
    ("check", lambda r: _f(r.get("check_rms"), ".1e"), "r"),
    ("status / note", lambda r: ("" if r["status"] == "ok" else r["status"] + ": ")
     + r.get("note", ""), "l"),
]


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]], str]:
    return ([c[0] for c in COLUMNS], [[c[1](r) for c in COLUMNS] for r in rows],
            "".join(c[2] for c in COLUMNS))


def render_markdown(record: dict) -> str:
    env, rows = record["environment"], record["rows"]
    runners = list(dict.fromkeys(r["runner"] for r in rows))
    # (records written before the rows named their model: the H200's, then the only one)
    dev = roofline.device_for(rows[0].get("floor_device", "H200") if rows else env.get("gpu"))
    lines = [f"# gdn prefill benchmark ({record['mode']})", "",
             f"- date: {env.get('date')}; device: {env.get('gpu', 'CPU (interpret mode)')}",
             "- versions: " + ", ".join(f"{k} {env[k]}" for k in
                                        ("jax", "torch", "triton", "fla", "flashinfer") if k in env),
             f"- {DTYPE} q/k/v, fp32 g/beta and states (an initial state per sequence), K = V = "
             f"{rows[0]['k'] if rows else '-'}, realistic Qwen3.5 gates",
             "- ms: device time per call (torch: do_bench median with L2 flush; JAX: a jitted loop "
             "with one block_until_ready, median); vs FLA: FLA's ms / this ms, same run",
             "- TFLOP/s counts 6KV + 10CK + 2C^2/3 per token per v head (gdn/roofline.py); "
             "nominal: FlashInfer's 4KV count; floor: max(FLOPs / {:.0f} TFLOP/s, bytes / {:.2g} TB/s), "
             "the {} model".format(dev.flops_per_s / 1e12, dev.bytes_per_s / 1e12, dev.name),
             "- check: rms(o - o_FLA) / rms(o_FLA) on the first 8192 tokens (else against the row's "
             "first implementation)"]
    for note in record.get("notes", []):
        lines.append(f"- {note}")
    prof = record.get("profiler_crosscheck")
    if prof:
        lines.append(f"- profiler cross-check ({prof.get('runner')}, {prof.get('heads')} "
                     f"{prof.get('layout')}): loop {_f(prof.get('loop_ms'), '.4g')} ms/call, trace "
                     f"GPU busy {_f(prof.get('trace_gpu_busy_ms'), '.4g')} ms/call")
    for heads in dict.fromkeys(r["heads"] for r in rows):
        sub = [r for r in rows if r["heads"] == heads]
        lines += ["", f"## H/HV = {heads}: ms per call (speedup vs FLA)", "",
                  "| layout | sequences | floor ms | " + " | ".join(runners) + " |",
                  "|---|---|---:|" + "---:|" * len(runners)]
        for layout in dict.fromkeys(r["layout"] for r in sub):
            cells = []
            for name in runners:
                r = next((x for x in sub if x["layout"] == layout and x["runner"] == name), None)
                if r is None or r["status"] != "ok":
                    cells.append("-" if r is None else r["status"])
                else:
                    sp = r.get("speedup_vs_fla")
                    cells.append(f"{r['ms']:.4g}" + (f" ({sp:.2f}x)" if sp else ""))
            r0 = next(x for x in sub if x["layout"] == layout)
            lines.append(f"| {layout} | {r0['shape_desc']} | {r0['floor_ms']:.3g} | "
                         + " | ".join(cells) + " |")
    headers, cells, align = _table(rows)
    lines += ["", "## All rows", "", "| " + " | ".join(headers) + " |",
              "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def render_plot(record: dict, path: str) -> str | None:
    """The PNG plot; returns a note when it cannot be drawn (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    rows = record["rows"]
    heads = list(dict.fromkeys(r["heads"] for r in rows))
    fig, axes = plt.subplots(len(heads), 1, figsize=(11, 3.6 * len(heads)), squeeze=False)
    for ax, hd in zip(axes[:, 0], heads):
        sub = [r for r in rows if r["heads"] == hd]
        layouts = list(dict.fromkeys(r["layout"] for r in sub))
        x = np.arange(len(layouts))
        floor = [next(r["floor_ms"] for r in sub if r["layout"] == lay) for lay in layouts]
        ax.plot(x, floor, "k--", label="roofline floor")
        for name in dict.fromkeys(r["runner"] for r in sub):
            ys = []
            for lay in layouts:
                r = next((r for r in sub if r["layout"] == lay and r["runner"] == name), None)
                ys.append(r["ms"] if r is not None and r["status"] == "ok" else np.nan)
            if not all(np.isnan(ys)):
                ax.plot(x, ys, "o-", label=name)
        ax.set_xticks(x, layouts, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call")
        ax.set_title(f"H/HV = {hd}, K = V = {sub[0]['k']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def render(record: dict, out_dir: str, *, quiet: bool = False) -> dict[str, str]:
    """Write bench.json, bench.md and bench.png into ``out_dir``; print the table."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"bench.{k}") for k in ("json", "md", "png")}
    note = render_plot(record, paths["png"])
    if note:
        record.setdefault("notes", []).append(note)
        paths.pop("png")
    write_json(paths["json"], record)
    with open(paths["md"], "w") as fh:
        fh.write(render_markdown(record))
    if not quiet:
        headers, cells, align = _table(record["rows"])
        model = record["rows"][0].get("floor_device", "H200") if record["rows"] else "H200"
        print_table(f"gdn bench ({record['mode']}): {DTYPE}, ms per call; floor = roofline ({model} model)",
                    headers, cells, align=align)
        for n in record.get("notes", []):
            print(f"note: {n}")
        print("wrote " + ", ".join(paths.values()))
    return paths


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gdn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"heads {QUICK_HEADS[0][0]}/{QUICK_HEADS[0][1]}, layouts "
                        f"{','.join(QUICK_LAYOUTS)}")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes in interpret mode (automatic without a GPU)")
    p.add_argument("--heads", action="append", metavar="H/HV", help="e.g. 16/32 (repeatable)")
    p.add_argument("--layouts", action="append", metavar="L1,L2",
                   help=f"among {','.join(LAYOUTS)} (or any AxB / a+b)")
    p.add_argument("--impl", action="append", metavar="KEY",
                   help="only these (repeatable): fla, flashinfer, jla, reference, "
                        "triton:triton, jax:*")
    p.add_argument("--no-peers", action="store_true", help="gdn implementations only")
    p.add_argument("--qk-l2norm", action="store_true",
                   help="the serving configuration: q and k L2-normalized by every call (gdn "
                        "use_qk_l2norm, FLA use_qk_l2norm_in_kernel; FlashInfer and "
                        "jax-linear-attention rows normalize first, timed)")
    p.add_argument("--site", action="append", metavar="DIR",
                   help="site dir to add for peers (default /tmp/fisite when it exists)")
    p.add_argument("--xla-max-tokens", type=int, default=8192,
                   help="the jax xla implementation runs only layouts up to this many tokens on a GPU")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (default 10; smoke 1)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler cross-check")
    p.add_argument("--out", default="out/bench", help="output directory (default out/bench)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="no timing: merge these bench.json files and render them into --out")
    return p


def _heads(text: str, dim: int) -> tuple[int, int, int]:
    try:
        h, hv = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--heads takes H/HV like 16/32, got {text!r}") from None
    if h < 1 or hv % h:
        raise ValueError(f"--heads {text}: HV must be a positive multiple of H")
    return h, hv, dim


def _split(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.from_json:
        recs = [json.load(open(f)) for f in opts.from_json]
        merged = dict(recs[0], rows=[r for rec in recs for r in rec["rows"]],
                      notes=list(dict.fromkeys(n for rec in recs for n in rec.get("notes", []))))
        render(merged, opts.out)
        return 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    for d in opts.site or (["/tmp/fisite"] if os.path.isdir("/tmp/fisite") else []):
        site.addsitedir(d)
    gpu = on_gpu("triton") or on_gpu("jax")
    smoke = opts.cpu_smoke or not gpu
    o = Options(gpu=gpu and not smoke, smoke=smoke,
                reps=opts.reps or (1 if smoke else 10), host_reps=1 if smoke else 20,
                xla_max_tokens=opts.xla_max_tokens, profile=not opts.no_profile,
                no_peers=opts.no_peers, impl=_split(opts.impl) or None, qk_l2norm=opts.qk_l2norm,
                device=roofline.device_for(environment().get("gpu") or _jax_device_kind()))
    if smoke:
        shapes = [(h, hv, SMOKE_DIM) for h, hv in SMOKE_HEADS]
        layouts = dict(SMOKE_LAYOUTS)
    else:
        shapes = [(h, hv, HEAD_DIM) for h, hv in (QUICK_HEADS if opts.quick else HEADS)]
        layouts = {n: layout_lens(n) for n in (QUICK_LAYOUTS if opts.quick else LAYOUTS)}
    try:
        if opts.heads:
            shapes = [_heads(x, shapes[0][2]) for x in _split(opts.heads)]
        if opts.layouts:
            layouts = {n: SMOKE_LAYOUTS.get(n) or layout_lens(n) for n in _split(opts.layouts)}
    except ValueError as e:
        print(f"gdn bench: {e}", file=sys.stderr)
        return 2
    rlist, missing = runners(o)
    notes = [f"{key}: not run ({why})" for key, why in missing]
    if smoke:
        notes.insert(0, "CPU smoke run: tiny shapes in interpret mode; the times say nothing "
                        "about GPU speed")
    if opts.qk_l2norm:
        notes.insert(0, "--qk-l2norm: every call L2-normalizes q and k (the serving configuration); "
                        "each row's note says how")
    print(f"gdn bench: {'CPU smoke' if smoke else 'GPU'}, {len(shapes)} head configs x "
          f"{len(layouts)} layouts x {len(rlist)} implementations "
          f"({', '.join(r.name for r in rlist) or 'none'})", flush=True)
    mode = "cpu-smoke" if smoke else ("quick" if opts.quick else "full")
    os.makedirs(opts.out, exist_ok=True)

    def checkpoint(rows: list[dict]) -> None:
        """bench.json after every workload: a run cut short keeps its rows (--from-json)."""
        done = [dict(r) for r in rows]
        _finish(done)
        write_json(os.path.join(opts.out, "bench.json"), {
            "environment": environment(), "mode": mode, "complete": False, "notes": notes,
            "rows": done})

    o.checkpoint = checkpoint
    progress = Progress(len(shapes) * len(layouts) * len(rlist))
    rows: list[dict] = []
    complete = True
    try:
        run_matrix(shapes, layouts, rlist, o, progress, rows)
    except KeyboardInterrupt:  # timeout --signal=INT: keep and render what was measured
        complete = False
        notes.insert(0, f"INTERRUPTED after {len(rows)} of "
                        f"{len(shapes) * len(layouts) * len(rlist)} rows")
        _finish(rows)
    finally:
        progress.close()
    record = {"environment": environment(), "mode": mode, "complete": complete, "notes": notes,
              "rows": rows}
    prof = next((dict(r["profile"], runner=r["runner"], heads=r["heads"], layout=r["layout"])
                 for r in rows if "profile" in r), None)
    if prof:
        record["profiler_crosscheck"] = prof
    render(record, opts.out)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
