"""impl="mosaic_gpu" on an H200: correctness vs float64, vs FLA, and timings, in ONE process.

Run on the GPU machine from the repository root (no install needed):

    PYTHONPATH=. python3 tests/gpu/mosaic_gpu_check.py            # everything (~5 min)
    PYTHONPATH=. python3 tests/gpu/mosaic_gpu_check.py --only small,qwen

FLA (for the same-run yardstick) is used when importable: carry the wheels (``.whl``) and
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` first, PYTHONPATH=/tmp/site:.
Results: a table at the end, and JSON under $OUT (or --out).

Sections: env, intra (the gate cumsum and the inverse kernel vs float64), small (the CPU test cases,
compiled), qwen (2x1024 at H=16, HV=32, K=V=128 vs float64 and vs FLA, every --variants entry), sync
(no host sync), kernels (each stage alone at 4x8192), time (the anchor shapes, jitted loop + one
block_until_ready, median of reps; FLA in the same run), ptxas (register and spill report of the
kernels at K=V=128 and --ptxas-lens, from a subprocess with MOSAIC_GPU_DUMP_PTXAS=1, once per
--variants entry; --dump also brings back each kernel's PTX for benchmarks/sass.sh),
ablate (the wide chunk loop alone at 4x8192, whole and with each diagnostic ablation of
chunk_loop_wide.ABLATIONS: what each piece of a tile costs),
intra_cmp (the intra kernel's configurations vs the float64 stages, then timed alone, interleaved),
nan (NaN / inf isolation of the default prefill and of each chunk loop, compiled),
oob (TMA's out-of-bounds fill at full size: exact token counts against the same arrays zero-padded),
profile (Mosaic's in-kernel profiler at --profile-lens, default 4x2048: the time of each named scope
per warpgroup, in a subprocess with GDN_MOSAIC_PROFILE_DIR; --profile-variant picks the variant).

Under a time limit, stop it with SIGINT (``timeout -s INT``): it then prints the summary of what
it measured; SIGTERM loses it.

The default (the chunk loop picked per call) against each chunk loop forced, in one call:

    PYTHONPATH=. python3 tests/gpu/mosaic_gpu_check.py --only env,intra,small,qwen,kernels,time,ptxas \
        --variants default,narrow,wide --shapes 4x8192,128x256,4x2048 --fla-shapes 4x8192
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("FLA_FLASH_QLA", "0")
# under the Mosaic GPU interpreter (GDN_MOSAIC_INTERPRET=1 on a CPU host) every warpgroup is a thread
# whose barrier waits hold an XLA CPU callback thread: one CPU device on a 2-core host deadlocks
# (tests/test_mosaic_gpu.py runs its cases with 4 for the same reason); no effect on the GPU
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

RESULTS: dict = {}
TABLE: list[str] = []


def log(*a):
    print(*a, flush=True)


def section(name):
    def deco(fn):
        def run(*a, **kw):
            t0 = time.time()
            log(f"\n=== {name} ===")
            try:
                fn(*a, **kw)
            except Exception as e:  # keep going: one broken section must not hide the others
                RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:3000]
                traceback.print_exc()
                TABLE.append(f"{name}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
            log(f"--- {name}: {time.time() - t0:.1f} s")
        return run
    return deco


def _fla():
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.utils import prepare_chunk_indices
        return torch, chunk_gated_delta_rule, prepare_chunk_indices
    except Exception as e:
        log("FLA not available:", e)
        return None


@section("env")
def sec_env():
    import jax
    d = jax.devices()[0]
    from gdn.jax_backend import mosaic_gpu as M
    RESULTS["env"] = dict(jax=jax.__version__, device=str(d), kind=d.device_kind,
                          cc=getattr(d, "compute_capability", None), cores=getattr(d, "core_count", None),
                          status=M.status(), date=time.strftime("%Y-%m-%d %H:%M"))
    log(RESULTS["env"])


@section("intra")
def sec_intra():
    """The intra kernel (segmented cumsum, inline-MLIR fp32 substitution + merges) vs float64."""
    import jax.numpy as jnp
    from gdn.inputs import make_inputs
    from gdn.jax_backend.mosaic_gpu.intra import intra
    lens = [100, 0, 1, 63, 64, 65, 300]
    x = make_inputs(lens, h=2, hv=4, k=128, v=128, seed=5)
    cu = x.cu_seqlens
    t = int(cu[-1])
    tp = -(-t // 64) * 64
    k = np.zeros((tp, 2, 128), np.float32)
    k[:t] = x.k[0]
    g = np.zeros((4, tp), np.float32)
    g[:, :t] = x.g[0].T
    b = np.zeros((4, tp), np.float32)
    b[:, :t] = x.beta[0].T
    seg = np.searchsorted(cu[1:], np.arange(tp), side="right").astype(np.int32)
    kb = jnp.asarray(k, jnp.bfloat16)
    ag, gc, ai = intra(kb, jnp.asarray(g), jnp.asarray(b), jnp.asarray(seg), group=2, debug_inverse=True)
    ag, gc, ai = (np.asarray(a, np.float64) for a in (ag, gc, ai))
    kf = np.asarray(kb, np.float64)
    worst = dict(ai=0.0, ag=0.0, gc=0.0)
    for j in range(4):
        for m in range(tp // 64):
            sl = slice(m * 64, m * 64 + 64)
            s = seg[sl]
            same = s[:, None] == s[None, :]
            gg = g[j, sl].astype(np.float64)
            gam = np.array([gg[: r + 1][s[: r + 1] == s[r]].sum() for r in range(64)])
            kk = kf[sl, j // 2] @ kf[sl, j // 2].T
            low = np.tril(np.ones((64, 64), bool), -1) & same
            a = np.where(low, b[j, sl, None] * kk * np.exp(np.where(low, gam[:, None] - gam[None, :], 0)), 0)
            inv = np.linalg.inv(np.eye(64) + a)
            worst["ai"] = max(worst["ai"], np.abs(ai[j, sl] - inv).max())
            worst["ag"] = max(worst["ag"], np.abs(ag[j, sl] - inv * b[j, sl][None, :]).max())
            worst["gc"] = max(worst["gc"], np.abs(gc[j, sl] - gam).max())
    RESULTS["intra"] = worst
    TABLE.append(f"intra kernel max abs err: Ai {worst['ai']:.2e}  Ag {worst['ag']:.2e}  gc {worst['gc']:.2e}")
    log(worst)


@section("small")
def sec_small(names=()):
    """test_mosaic_gpu's CASES and GPU_CASES compiled against float64; ``names``: only cases whose
    name contains one of these."""
    spec = importlib.util.spec_from_file_location("tmg", os.path.join(ROOT, "tests", "test_mosaic_gpu.py"))
    tmg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tmg)
    from gdn.tolerances import vs_f64
    out = {}
    for case in tmg.CASES + tmg.GPU_CASES:
        if names and not any(n in case[0] for n in names):
            continue
        res = tmg._run_case(*case, interpret=False)
        ok = res["o"] < vs_f64(res["dtype"]) and res["tail"] == 0 and res.get("final", 0) < vs_f64(res["dtype"])
        res["ok"] = bool(ok)
        out[case[0]] = res
        log(json.dumps(res))
        TABLE.append(f"small {case[0]:28s} o {res['o']:.2e} final {res.get('final', float('nan')):.2e} "
                     f"{'OK' if ok else 'FAIL'}")
    RESULTS["small"] = out


@section("nan")
def sec_nan(names=()):
    """NaN / inf isolation compiled (tests/test_mosaic_gpu.py's poisoned batch): the default prefill
    and each chunk loop forced (the wide one at V = 128, its two state warpgroups), also as they were
    before lean and bare became their defaults; each loop with loop_direct_io and the wide loop on a
    persistent grid of 3 CTAs (also with its L2 prefetch of h0) against the default loop (the same
    bits). ``names``: only these checks (default: all)."""
    tmg = _test_module()
    out = {}
    for variant, dv in (("", 64), ("narrow", 128), ("wide", 128), ("wide_plain", 128), ("narrow_plain", 128)):
        name = variant or "default"
        if names and name not in names:
            continue
        res = tmg._nan_isolation(variant, interpret=False, dv=dv)
        ok = (not res["changed"] and not res["dirty_finite"] and res["clean_finite"] and res["tail_zero"]
              and res["poisoned_nonfinite"] == sorted(tmg.NAN_POISON))
        out[name] = dict(res, ok=bool(ok))
        log(name, res)
        TABLE.append(f"nan {name:8s} V={dv}: {'PASS' if ok else 'FAIL'} {res}")
    for name, loop, opts in (("direct_io_wide", "wide", dict(loop_direct_io=True)),
                             ("direct_io_narrow", "narrow", dict(loop_direct_io=True)),
                             ("persistent_wide", "wide", dict(loop_ctas=3)),
                             ("persistent_prefetch_wide", "wide", dict(loop_ctas=3, loop_prefetch=True,
                                                                       loop_schedule="table")),
                             ("overlap_wide", "wide", dict(loop_overlap=True)),
                             ("persistent_overlap_wide", "wide", dict(loop_ctas=3, loop_overlap=True)),
                             ("persistent_h0smem_wide", "wide", dict(loop_ctas=3, loop_prefetch="smem",
                                                                     loop_schedule="table")),
                             ("overlap_narrow", "narrow", dict(loop_overlap=True)),
                             ("update_wide", "wide", dict(loop_overlap="update")),  # s21
                             ("direct_out_wide", "wide", dict(loop_out_store="registers")),
                             ("persistent_direct_out_wide", "wide", dict(loop_ctas=3, loop_prefetch="smem",
                                                                         loop_schedule="table", loop_out_store="registers")),
                             ("coresident", "narrow", dict(variant="coresident", coresident_p=False)),  # s27
                             ("coresident_w2", "narrow", dict(variant="coresident", intra_warpgroups=2, intra_solve="warp",
                                                               coresident_p=False)),
                             ("coresident_p", "narrow", dict(variant="coresident", coresident_p=True)),  # s28
                             ("warp_out_wide", "wide", dict(loop_out_store="warp")),
                             ("persistent_warp_out_wide", "wide", dict(loop_ctas=3, loop_prefetch="smem",
                                                                       loop_schedule="table", loop_out_store="warp"))):
        if names and name not in names:
            continue
        res = tmg._loop_io_bits(loop, interpret=False, **opts)  # the default loop's bits, clean and poisoned
        ok = res["clean_same_bits"] and res["poisoned_same_bits"] and res["clean_nonfinite"] == 0
        out[name] = dict(res, ok=bool(ok))
        TABLE.append(f"nan {name}: {'PASS' if ok else 'FAIL'} {res}")
    RESULTS["nan"] = out


@section("coresident")
def sec_coresident(layouts=("1x32768", "1x8192", "1x1000"), reps=4, ps=(False, True)):
    """The co-resident kernel (variant="coresident") against the narrow loop after the intra kernel,
    compiled, on two input sets taken in turns (a missed flag would read the Ag / gc buffer of the
    call before, which holds the other set's values): every call's o and final state must be the
    same bits. Also with ``_no_wait`` (the loop ignores the flags): that comparison must then FAIL
    (the check can fail). With use_qk_l2norm too (the norms from the workers, 2 a CTA), and with P
    from the workers (``ps``: ``p_from_workers``; the same bits as two kernels under the interpreter)."""
    import jax
    from gdn import plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.jax_backend.mosaic_gpu.coresident import coresident
    sms = D._sm_count()
    scale = 128 ** -0.5
    out = {}

    def two_kernels(q, k, v, g, beta, h0, plan, l2):
        x = D.prepare(q, k, v, g, beta, plan, h0, l2)
        ag, gc, x = D.run_intra(x, l2)
        o, f = D.loop(x, ag, gc, x.h0, plan.padded_seqs, chunk_variant="default", scale=scale, overlap=True)
        return o, f

    def one_launch(q, k, v, g, beta, h0, plan, l2, no_wait, p, lag):
        x = D.prepare(q, k, v, g, beta, plan, h0, l2)
        o, f, *_ = coresident(x.q, x.k, x.v, x.g_hm, x.beta_hm, x.seg, x.cu, x.h0, scale=scale, group=x.group,
                              n_out=plan.padded_seqs, t_valid=x.q.shape[0], sms=sms, lrq=x.lrq, lrk=x.lrk,
                              norms_in_intra=l2, overlap=True, active_seqs=len(lens), p_from_workers=p,
                              flag_lag=lag, p_together=p and lag == 1, _no_wait=no_wait)
        return o, f

    for label in layouts:
        n, t = (int(s) for s in label.split("x"))
        lens = [t] * n
        for l2 in (False, True):
            sets = []
            for seed in (1, 2):
                q, k, v, g, beta, h0, cu = _qwen_inputs(lens, 16, 32, 128, seed=seed)
                sets.append((q, k, v, g, beta, h0, make_plan(cu, num_tokens=q.shape[1]).to_jax()))
            f_ref = jax.jit(lambda *a, l2=l2: two_kernels(*a, l2))
            refs = [jax.device_get(f_ref(*s)) for s in sets]
            # (s30: flag_lag=1, each item's flag raised after the worker's next item; with P also
            # p_together, the workers' Q K^T and K K^T as one group)
            for no_wait, p, lag in [(nw, p, lag) for p in ps for nw, lag in ((False, 0), (True, 0), (False, 1))]:
                f = jax.jit(lambda *a, l2=l2, nw=no_wait, p=p, lag=lag: one_launch(*a, l2, nw, p, lag))
                same = []
                for r in range(reps):
                    for si, s in enumerate(sets):
                        o, fin = jax.device_get(f(*s))
                        same.append(bool(np.array_equal(o, refs[si][0]) and np.array_equal(fin, refs[si][1])))
                name = f"{label}{' l2' * l2}{' p' * p}{' lag' * lag}{' tog' * (p and lag == 1)}{' no_wait' * no_wait}"
                ok = all(same) if not no_wait else not all(same)
                out[name] = dict(same=same, ok=ok)
                log(name, same)
                TABLE.append(f"coresident {name:22s} same bits as two kernels in {sum(same)}/{len(same)} calls: "
                             f"{'PASS' if ok else 'FAIL'}{' (expected to differ)' * no_wait}")
    RESULTS["coresident"] = out


def _qwen_inputs(lens, h, hv, dk, seed, initial_state=True):
    """Realistic Qwen3.5 inputs generated on the device (q, k L2-normalized), bf16."""
    import jax
    import jax.numpy as jnp
    from gdn.inputs import qwen_gates
    t = int(sum(lens))
    rng = np.random.default_rng(seed)
    g, beta = qwen_gates(rng, t, hv)
    key = jax.random.PRNGKey(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    def nrm(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = nrm(jax.random.normal(k1, (1, t, h, dk), jnp.float32)).astype(jnp.bfloat16)
    k = nrm(jax.random.normal(k2, (1, t, h, dk), jnp.float32)).astype(jnp.bfloat16)
    v = jax.random.normal(k3, (1, t, hv, dk), jnp.float32).astype(jnp.bfloat16)
    h0 = (0.1 * jax.random.normal(k4, (len(lens), hv, dk, dk), jnp.float32)) if initial_state else None
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return q, k, v, jnp.asarray(g[None]), jnp.asarray(beta[None]), h0, cu


OOB_LAYOUTS = (  # token counts that are multiples of 8 and not of 64: the last tile is read past the end
    ("1x32760", [32760]),
    ("3 docs, 32760", [8000, 4093, 20667]),  # boundary tiles shared by two sequences too
    ("4x8184", [8184] * 4),
)


@section("oob")
def sec_oob(layouts=OOB_LAYOUTS, heads=(16, 32, 128), **run_kw):
    """TMA's out-of-bounds fill at full size (2026-12-05 s10: q, k, v keep the caller's token count,
    the last tile is read past the arrays' end and its output store is clipped). Each layout at the
    Qwen3.5 shape, with and without use_qk_l2norm: the prefill on the exact arrays against the same
    arrays padded with zero tokens to whole tiles (the old copy; the padding is past cu[-1]). Must be
    the same bits: o over the caller's tokens and the final states. The fill's values do not reach
    the result (the kernels isolate tokens past cu[-1]: in the interpreter, padding of 1.0 or NaN
    gives the same bits too), so this checks the compiled path end to end at full size: partial last
    tiles loaded and stored through TMA without a fault or a write outside the array."""
    import jax
    import jax.numpy as jnp
    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    out = {}
    for label, lens in layouts:
        q, k, v, g, beta, h0, cu = _qwen_inputs(lens, *heads, seed=5)
        t = q.shape[1]
        tp = -(-t // 64) * 64
        pad = lambda a: jnp.pad(a, ((0, 0), (0, tp - t)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        for l2 in (False, True):
            res = []
            for arrs, n in (((q, k, v, g, beta), t), (tuple(pad(a) for a in (q, k, v, g, beta)), tp)):
                _, args = api.validate(*arrs, plan=make_plan(cu, num_tokens=n), initial_state=h0,
                                       use_qk_l2norm=l2, backend="jax")
                o, f = jax.block_until_ready(M.run(args, **run_kw))
                res.append((np.asarray(o[:, :t]), np.asarray(f[: len(lens)])))
            (o1, f1), (o2, f2) = res
            same_o = bool(np.array_equal(o1.view(np.uint16), o2.view(np.uint16)))
            same_f = bool(np.array_equal(f1, f2))
            finite = bool(np.isfinite(o1.astype(np.float32)).all() and np.isfinite(f1).all())
            name = f"{label}{' l2norm' if l2 else ''}"
            diff = float(np.abs(o1.astype(np.float32) - o2.astype(np.float32)).max())
            out[name] = dict(same_o=same_o, same_final=same_f, finite=finite, max_diff_o=diff)
            ok = same_o and same_f and finite
            log(name, out[name])
            TABLE.append(f"oob {name:22s} exact vs padded: {'PASS' if ok else 'FAIL'} (o max diff {diff:.1e}, "
                         f"final same {same_f})")
    RESULTS["oob"] = out


@section("qwen")
def sec_qwen(variants=(("default", {}),)):
    """2x1024 at the Qwen3.5 shape vs the float64 token loop, and vs FLA (vLLM's absolute bar), per variant."""
    from gdn import api, reference as R
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.tolerances import VS_FLA
    lens = [1024, 1024]
    q, k, v, g, beta, h0, cu = _qwen_inputs(lens, 16, 32, 128, seed=11)
    _, args = api.validate(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0, backend="jax")
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ro, rf = R.recurrent(f64(q), f64(k), f64(v), f64(g), f64(beta), cu_seqlens=cu, initial_state=f64(h0))
    fo = ff = None
    fla = _fla()
    if fla is not None:
        torch, fla_fn, prep = fla
        from torch.utils import dlpack
        tt = lambda a: dlpack.from_dlpack(a)  # noqa: E731
        cu_t = torch.tensor(cu, dtype=torch.long, device="cuda")
        fo, ff = fla_fn(tt(q), tt(k), tt(v), tt(g), tt(beta), initial_state=tt(h0).contiguous(),
                        output_final_state=True, cu_seqlens=cu_t, chunk_indices=prep(cu_t, 64))
        fo = fo.float().cpu().numpy().astype(np.float64)
        ff = ff.float().cpu().numpy().astype(np.float64)
    out = {}
    for vname, kw in variants:
        o, f = M.run(args, **kw)
        o, f = np.asarray(o, np.float64), np.asarray(f, np.float64)
        res = dict(o=R.rms_ratio(o, ro), final=R.rms_ratio(f, rf), finite=bool(np.isfinite(o).all()))
        if fo is not None:
            res.update(fla_o=R.rms_ratio(fo, ro), fla_final=R.rms_ratio(ff, rf),
                       vs_fla_o_max=float(np.abs(o - fo).max()), vs_fla_o_mean=float(np.abs(o - fo).mean()),
                       vs_fla_state_max=float(np.abs(f - ff).max()), vs_fla_state_mean=float(np.abs(f - ff).mean()))
            res["vs_fla_ok"] = bool(res["vs_fla_o_max"] < VS_FLA["o_max"] and res["vs_fla_o_mean"] < VS_FLA["o_mean"]
                                    and res["vs_fla_state_max"] < VS_FLA["state_max"]
                                    and res["vs_fla_state_mean"] < VS_FLA["state_mean"])
        out[vname] = res
        log(vname, res)
        TABLE.append(f"qwen 2x1024 {vname} vs f64: o {res['o']:.2e} final {res['final']:.2e}"
                     + (f" | FLA o {res['fla_o']:.2e} final {res['fla_final']:.2e} | vs FLA o max "
                        f"{res['vs_fla_o_max']:.1e} mean {res['vs_fla_o_mean']:.1e} state max "
                        f"{res['vs_fla_state_max']:.1e} mean {res['vs_fla_state_mean']:.1e} "
                        f"{'OK' if res['vs_fla_ok'] else 'FAIL'}" if "fla_o" in res else ""))
    RESULTS["qwen"] = out


def _jitted(lens, h, hv, dk, seed, piece_chunks=None, _l2norm=None, _traced=False, **kw):
    """(jitted prefill on the host plan of ``lens``, its device inputs, cu_seqlens): the mosaic_gpu
    run with options ``kw``, or with ``piece_chunks`` the two-pass split
    (gdn.jax_backend.mosaic_gpu.split) in pieces of that many chunks; the host plan (and the
    split's tables) become constants of the jitted call. ``_l2norm``: None (no use_qk_l2norm),
    "fold" (use_qk_l2norm=True: the kernels fold the row scales, 2026-12-05 s10) or "xla" (q and k
    normalized by XLA first, then no use_qk_l2norm: what use_qk_l2norm cost before s10).
    ``_traced``: the plan is an argument of the jitted call instead (a device plan, its sequence
    count unknown at trace time, the initial states padded to N_pad rows: what `gdn bench` times)."""
    import jax
    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.jax_backend.mosaic_gpu.split import run_split
    from gdn.planner import split_pieces
    q, k, v, g, beta, h0, cu = _qwen_inputs(lens, h, hv, dk, seed)
    p = make_plan(cu, num_tokens=q.shape[1])
    sp = split_pieces(cu, piece_chunks) if piece_chunks else None

    def body(q, k, v, g, beta, h0, pl):
        if _l2norm == "xla":  # the normalized copies the kernels read before s10 (the fused variant's)
            from gdn.jax_backend.common import l2normalize as normalize
            q, k = normalize(q), normalize(k)
        _, args = api.validate(q, k, v, g, beta, plan=pl, initial_state=h0, use_qk_l2norm=_l2norm == "fold",
                               backend="jax")
        return run_split(args, sp, **kw) if sp is not None else M.run(args, **kw)

    if _traced:  # (the split plans on the host: not with a traced plan)
        import jax.numpy as jnp

        h0p = jnp.pad(h0, ((0, p.padded_seqs - h0.shape[0]), (0, 0), (0, 0), (0, 0)))
        return jax.jit(body), (q, k, v, g, beta, h0p, p.to_jax()), cu
    return jax.jit(lambda *a: body(*a, p)), (q, k, v, g, beta, h0), cu


SPLIT_SHAPES = [  # (label, lens, H, HV, issue 6's target ms, piece sizes in chunks to time)
    # "64s4": pass 1 at 4 ring stages; "64d": pass 2 with loop_direct_io (the pieces' starts read into registers);
    # "32k": the scan as one Pallas-Triton kernel (scan="kernel"); "32ko": and both passes with loop_overlap
    ("1x32768", [32768], 16, 32, 0.60, (32, "32k", 128, "64d")),
    ("28672+4096", [28672, 4096], 16, 32, 0.60, (32, 64, 128)),
    ("1x8192", [8192], 16, 32, 0.15, (16, 32, 64)),
    ("4x2048", [2048] * 4, 16, 32, 0.08, (8, 16)),
    ("1x32768_HV64", [32768], 16, 64, 0.90, (64, 128)),
    # HV = 16 (Qwen3.5 at TP2): 32 narrow CTAs unsplit (H200 s13: 0.925 ms jitted, FlashInfer 0.438);
    # the policy picks pieces of 64 chunks
    ("1x32768_HV16", [32768], 16, 16, None, ("64k", "32k", 128)),
    # tensor-parallel head counts (Qwen3.5 at TP8 / TP4): the unsplit loop keeps 8 / 16 SMs busy
    ("1x32768_tp8", [32768], 2, 4, None, (32, "32k", "32ko", 16, "16k", 64)),
    ("1x32768_tp4", [32768], 4, 8, None, (64, "64k", 32, "32k")),
    ("1x8192_tp8", [8192], 2, 4, None, (16, "16k", 8)),
    ("1x8192_tp4", [8192], 4, 8, None, (16, "16k", 32, 8)),
]


def _split_size(pc) -> tuple[int, dict]:
    """A SPLIT_SHAPES piece size, ``<chunks>[s<stages>][d][k][o]`` -> (chunks, run_split options):
    pass 1's ring stages, direct I/O, the scan kernel, the loops' overlap."""
    chunks, st, direct, kscan, ov = re.fullmatch(r"(\d+)(?:s(\d))?(d?)(k?)(o?)", str(pc)).groups()
    return int(chunks), {**(dict(stages1=int(st)) if st else {}), **(dict(loop_direct_io=True) if direct else {}),
                         **(dict(scan="kernel") if kscan else {}), **(dict(loop_overlap=True) if ov else {})}


@section("split")
def sec_split(shapes, rounds=3, f64_lens=(3000, 0, 130, 64, 700), f64_heads=(2, 4), f64_pieces=(2, 8), dk=128):
    """The two-pass exact split (issue 6): compiled against the float64 truth on a small varlen
    batch (an empty sequence, a piece of 2 tokens, an initial state), split vs unsplit on each
    timed shape (max |difference| of o and of the final states), then unsplit and split at several
    piece sizes timed interleaved, with FLA."""
    import jax.numpy as jnp
    from gdn import api, reference as R
    from gdn.jax_backend.mosaic_gpu.split import model_us, pick_piece_chunks, run_split
    from gdn.planner import split_pieces
    out = {}
    lens = list(f64_lens)
    q, k, v, g, beta, h0, cu = _qwen_inputs(lens, *f64_heads, dk, seed=21)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ro, rf = R.recurrent(f64(q), f64(k), f64(v), f64(g), f64(beta), cu_seqlens=cu, initial_state=f64(h0))
    _, args = api.validate(q, k, v, g, beta, cu_seqlens=cu, initial_state=h0, backend="jax")
    for pc in f64_pieces:
        o, f = run_split(args, split_pieces(cu, pc))
        res = dict(o=R.rms_ratio(f64(o), ro), final=R.rms_ratio(f64(f), rf), finite=bool(np.isfinite(f64(o)).all()))
        res["ok"] = bool(res["o"] < 5e-3 and res["final"] < 5e-3 and res["finite"])
        out[f"f64_pc{pc}"] = res
        TABLE.append(f"split f64 {lens} pieces of {pc} chunks: o {res['o']:.2e} final {res['final']:.2e} "
                     f"{'OK' if res['ok'] else 'FAIL'}")
    for label, lens, h, hv, target, sizes in shapes:
        row = dict(target=target)
        fns, a0 = {}, None
        fns["unsplit"], a0, _ = _jitted(lens, h, hv, dk, seed=1)
        for pc in sizes:
            try:
                chunks, kw = _split_size(pc)
                fns[f"split{pc}"], _, _ = _jitted(lens, h, hv, dk, 1, chunks, **kw)
            except Exception as e:
                row[f"split{pc}"] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        ref_o, ref_f = fns["unsplit"](*a0)
        for name, fn in list(fns.items())[1:]:
            try:
                o, f = fn(*a0)
                row[name + "_vs_unsplit"] = dict(o=float(jnp.abs(o.astype(jnp.float32) - ref_o.astype(jnp.float32)).max()),
                                                 final=float(jnp.abs(f - ref_f).max()))
            except Exception as e:
                row[name] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
                fns.pop(name)
                traceback.print_exc()
        # the stages by differences of prefixes (core_split's _stop) at the first piece size
        pc0 = str(sizes[0])
        if f"split{pc0}" in fns:
            chunks, kw = _split_size(pc0)  # (s28: int("64k") failed here, after the compiles)
            for stop in ("intra", "pass1", "scan"):
                fns[f"to_{stop}"], _, _ = _jitted(lens, h, hv, dk, 1, chunks, _stop=stop, **kw)
        for name, (med, best) in _interleaved(fns, a0, rounds).items():
            row[name], row[name + "_best"] = med, best
        if "to_scan" in row and isinstance(row.get(f"split{pc0}"), float):
            prev, parts = 0.0, {}
            for stop, part in (("to_intra", "prep+intra"), ("to_pass1", "pass1"), ("to_scan", "scan"),
                               (f"split{pc0}", "pass2")):
                parts[part], prev = row[stop] - prev, row[stop]
            row["parts"] = dict(pieces=pc0, **parts)
        try:
            row["fla"] = _bench_fla(lens, h, hv, dk, seed=1)
        except Exception as e:
            row["fla"] = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        out[label] = row
        log(label, row)
        cells = [f"{n} {row[n]:.3f}" if isinstance(row[n], float) else f"{n} {str(row[n])[:60]}"
                 for n in ["unsplit"] + [f"split{pc}" for pc in sizes]]
        diffs = ", ".join(f"{n} o {d['o']:.1e} f {d['final']:.1e}" for n, d in
                          ((n[: -len("_vs_unsplit")], row[n]) for n in row if n.endswith("_vs_unsplit")))
        fla = row.get("fla")
        try:
            row["policy"] = pick_piece_chunks(lens, hv, dk, dk)
            row["model_us"] = {"unsplit": model_us(lens, None, hv, dk, dk)["unsplit"],
                               **{f"split{pc}": model_us(lens, int(re.match(r"\d+", str(pc)).group()), hv, dk, dk)
                                  for pc in sizes}}
            TABLE.append(f"split {label:12s} model (us, loop only, no intra): " + "; ".join(
                f"{n} " + (f"{m:.0f}" if isinstance(m, float) else " + ".join(f"{k} {x:.0f}" for k, x in m.items()))
                for n, m in row["model_us"].items()))
        except Exception as e:
            row["policy"] = f"ERROR {type(e).__name__}"
        TABLE.append(f"split {label:12s} policy {row['policy']}: " + " | ".join(cells)
                     + (f" | FLA {fla:.3f}" if isinstance(fla, float) else "") + f" ms  target {target}"
                     + f"  [max diff to unsplit: {diffs}]")
        if "parts" in row:
            TABLE.append(f"split {label:12s} stages at {row['parts']['pieces']} chunks per piece (ms, by prefix "
                         "differences): " + ", ".join(f"{n} {t:.3f}" for n, t in row["parts"].items()
                                                      if n != "pieces"))
    RESULTS["split"] = out


def _bench(fn, args, iters=10, reps=3):
    import jax
    jax.block_until_ready(fn(*args))
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(ts), min(ts)


def _bench_fla(lens, h, hv, dk, seed, iters=10, reps=3):
    fla = _fla()
    if fla is None:
        return None
    torch, fla_fn, prep = fla
    from torch.utils import dlpack
    q, k, v, g, beta, h0, cu = _qwen_inputs(lens, h, hv, dk, seed)
    tt = lambda a: dlpack.from_dlpack(a)  # noqa: E731
    q, k, v, g, beta, h0 = (tt(a) for a in (q, k, v, g, beta, h0))
    h0 = h0.contiguous()
    cu_t = torch.tensor(cu, dtype=torch.long, device="cuda")
    ci = prep(cu_t, 64)

    def call():
        return fla_fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_t, chunk_indices=ci)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            call()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    return statistics.median(ts)


VARIANTS = {  # name -> options of gdn.jax_backend.mosaic_gpu.run
    "default": {},  # chunk_variant="auto" (_driver.pick_chunk_variant), intra heads in a loop
    "fused": dict(variant="fused"),
    "narrow": dict(chunk_variant="default"),  # chunk_loop.py: one CTA per 64 V columns
    # s27: the intra work on the SMs the narrow loop leaves idle, one launch (coresident.py)
    # (coresident_seqs=1: a traced plan's bucket holds up to 2 sequences, which the kernel refuses at HV = 32)
    "coresident": dict(variant="coresident", coresident_seqs=1, coresident_p=False),  # (s29: P is "auto"'s pick)
    "coresident_auto": dict(variant="coresident", coresident_seqs=1),
    "coresident_w2": dict(variant="coresident", intra_warpgroups=2, intra_solve="warp", coresident_seqs=1,
                          coresident_p=False),
    "coresident_p": dict(variant="coresident", coresident_seqs=1, coresident_p=True),  # s28: P from the workers
    "narrow_nobare_direct": dict(chunk_variant="default", loop_bare=False, loop_direct_io=True),
    "two_kernels": dict(variant="two_kernels"),  # s28: against the default's co-resident picks (long_first)
    # the plan an argument of the jitted call (what gdn bench times): two kernels / the co-resident
    # kernel sized for one prompt whatever the bucket holds (two prompts then share the SMs with it)
    "traced": dict(_traced=True),
    "coresident_traced1": dict(variant="coresident", coresident_seqs=1, coresident_p=False, _traced=True),
    "wide": dict(chunk_variant="wide"),  # chunk_loop_wide.py: one CTA per (sequence, v head), prep + 2 state WGs
    "unroll": dict(head_loop="unroll"),  # the intra kernel unrolls a group's v heads
    "t2": dict(intra_tiles=2),
    "t8": dict(intra_tiles=8),
    "wide_r96": dict(chunk_variant="wide", regs=(96, 208)),
    "wide_r120": dict(chunk_variant="wide", regs=(120, 192)),
    # register splits of the wide loop ("wide" / "persist" are the default (88, 208) since 2026-12-05
    # s11, timed there as wide_r88 / persist_r88); at (104, 200), the default before, ptxas 13.0
    # serializes the state warpgroups' WGMMAs (C7512) and spills (benchmarks/ptx_local)
    "wide_r104": dict(chunk_variant="wide", regs=(104, 200)),
    "persist_r104": dict(chunk_variant="wide", loop_ctas=132, regs=(104, 200)),
    "wide_r72": dict(chunk_variant="wide", regs=(72, 216)),
    "wide_r56": dict(chunk_variant="wide", regs=(56, 224)),
    "levels": dict(intra_merge="levels"),  # the intra kernel's merges by levels 16 -> 32 -> 64 (solve.merge)
    "pad0": dict(intra_pad=0),  # the intra substitution's fp32 buffers unpadded (bank conflicts)
    "rows": dict(intra_columns=False),  # the substitution reads -A^T by rows (a second, transposed exp pass)
    "isolate_all": dict(intra_isolate="all"),  # intra: the NaN-isolation selects on every tile (before 12-04 s3)
    "wide_s2": dict(chunk_variant="wide", stages=2),  # the wide loop at 2 ring stages (3 at K = V = 128)
    # the chunk loops before 2026-12-04 s5: their selects, o's scale after the products, Pallas's
    # automatic barriers (loop_lean=False, loop_bare=False; each alone below)
    "plain": dict(loop_lean=False, loop_bare=False),
    "wide_plain": dict(chunk_variant="wide", loop_lean=False, loop_bare=False),
    "narrow_plain": dict(chunk_variant="default", loop_lean=False, loop_bare=False),
    "no_lean": dict(loop_lean=False),
    "no_bare": dict(loop_bare=False),
    "buf1": dict(intra_out_buffers=1),  # intra: one output staging (the default before 2026-12-04 s4)
    "levels_rows": dict(intra_merge="levels", intra_columns=False, intra_pad=0),  # the intra kernel of 12-04 c3
    # the initial / final state straight between global memory and registers (loop_direct_io, UNTIMED)
    "direct": dict(loop_direct_io=True),
    "wide_direct": dict(chunk_variant="wide", loop_direct_io=True),
    "narrow_direct": dict(chunk_variant="default", loop_direct_io=True),
    # the wide loop on a persistent grid (loop_ctas, UNTIMED): one CTA per SM (132 on the H200) or two
    # per SM's worth of CTAs in two waves, each walking its (sequence, head) items as one tile stream
    "persist": dict(chunk_variant="wide", loop_ctas=132),
    "persist264": dict(chunk_variant="wide", loop_ctas=264),
    # ... with each item's initial state prefetched into L2 by the look-ahead cursor (UNTIMED)
    "persist_pf": dict(chunk_variant="wide", loop_ctas=132, loop_prefetch=True),
    "persist_table_pf": dict(chunk_variant="wide", loop_ctas=132, loop_schedule="table", loop_prefetch=True),
    # s19: each item's initial state into the state warpgroups' own SMEM an item ahead (2 stages; since
    # s19 the driver's pick where sequences are short: _driver.pick_loop_prefetch)
    "persist_h0smem": dict(chunk_variant="wide", loop_ctas=132, loop_schedule="table", loop_prefetch="smem"),
    # use_qk_l2norm: folded into the kernels (s10; H200 s12: 0.681 vs 0.714 ms at 4x8192) vs q and k normalized by XLA first
    "l2norm": dict(_l2norm="fold"),
    "l2norm_xla": dict(_l2norm="xla"),
    # use_qk_l2norm folded, the row norms from the intra kernel (s12; the default since s13: 0.642 vs
    # 0.699 ms at 4x8192 on the H200) or from two XLA reductions
    "l2norm_intra_norms": dict(_l2norm="fold", qk_norms="intra"),
    "l2norm_xla_norms": dict(_l2norm="fold", qk_norms="xla"),
    # s29: use_qk_l2norm on one prompt, the co-resident kernel without / with P from the workers
    "l2norm_coresident": dict(_l2norm="fold", variant="coresident", coresident_seqs=1, coresident_p=False),
    "l2norm_coresident_p": dict(_l2norm="fold", variant="coresident", coresident_seqs=1, coresident_p=True),
    # s30: each worker item's flag raised after the worker's next item (coresident's flag_lag=1)
    "coresident_lag": dict(variant="coresident", coresident_seqs=1, coresident_p=False, coresident_flag_lag=1),
    "coresident_p_lag": dict(variant="coresident", coresident_seqs=1, coresident_p=True, coresident_flag_lag=1),
    # ... and the workers' Q K^T and K K^T as one group (intra's p_together)
    "coresident_p_tog": dict(variant="coresident", coresident_seqs=1, coresident_p=True, coresident_p_together=True),
    "coresident_p_tog_lag": dict(variant="coresident", coresident_seqs=1, coresident_p=True,
                                 coresident_p_together=True, coresident_flag_lag=1),
    "l2norm_coresident_lag": dict(_l2norm="fold", variant="coresident", coresident_seqs=1, coresident_p=False,
                                  coresident_flag_lag=1),
    "l2norm_coresident_p_lag": dict(_l2norm="fold", variant="coresident", coresident_seqs=1, coresident_p=True,
                                    coresident_flag_lag=1),
    # s13, UNTIMED: a traced plan in a bucket whose counts want different loops (the floor bucket at
    # HV = 32) runs the wide loop with a runtime mode (one state warpgroup per CTA for 1-2 sequences)
    # s15, UNTIMED: the intra kernel's 16x16 diagonal inverses in registers, one warp per block
    "intra_warp": dict(intra_solve="warp"),
    # ... and three independent warpgroups per intra CTA (168 registers: 3 per SM instead of 2)
    "intra_wg3": dict(intra_solve="warp", intra_warpgroups=3),
    # s16, UNTIMED: one kernel, the wide loop's prep warpgroup doing the intra work (FUSED_REGS), and
    # two other register splits (prep, state)
    "fused_wide": dict(variant="fused_wide"),
    "fused_wide_r136": dict(variant="fused_wide", regs=(136, 184)),
    "fused_wide_r168": dict(variant="fused_wide", regs=(168, 168)),
    "fused_wide_r88": dict(variant="fused_wide", regs=(88, 208)),
    "fused_wide_mma": dict(variant="fused_wide_mma"),
    "fused_wide_mma_persist": dict(variant="fused_wide_mma", loop_ctas=132, loop_prefetch=True, loop_schedule="table"),
    "halves": dict(loop_halves=True),  # (a host plan knows its count: as "default" there)
    "jit": dict(_traced=True),  # the plan an argument of the jitted call (what gdn bench times)
    "jit_halves": dict(_traced=True, loop_halves=True),
    "jit_wide": dict(_traced=True, chunk_variant="wide"),
    "one_per_item": dict(loop_ctas=None),  # the grid of one CTA per item (before 2026-12-05 s8)
    "overlap": dict(loop_overlap=True),  # off-chain work in the products' shadows (on by default for the narrow loop, s12)
    "wide_overlap": dict(chunk_variant="wide", loop_overlap=True),
    "narrow_overlap": dict(chunk_variant="default", loop_overlap=True),
    # s17 (slower, m1): the wide loop's output store issued in the next tile's shadow (o staged in SMEM)
    "wide_store": dict(chunk_variant="wide", loop_overlap="store"),
    "store": dict(loop_overlap="store"),  # the same where the pick is the wide loop, else "auto"
    # s21: the wide loop's output stored while the tile's state update computes (products_then)
    "update": dict(loop_overlap="update"),  # (the narrow loop: "auto"'s choice)
    # s21: whole output tiles from the state warpgroups' registers straight to global memory
    "direct_out": dict(loop_out_store="registers"),
    "warp_out": dict(loop_out_store="warp"),
}

SHAPES = [  # (label, lens, H, HV, target ms)
    ("4x8192", [8192] * 4, 16, 32, 0.35),
    ("8x4096", [4096] * 8, 16, 32, 0.35),
    ("128x256", [256] * 128, 16, 32, 0.45),
    ("4x2048", [2048] * 4, 16, 32, 0.09),
    ("1x32768", [32768], 16, 32, None),
    ("4x8192_HV48", [8192] * 4, 16, 48, 0.60),
    ("4x8192_HV16", [8192] * 4, 16, 16, 0.20),
]
NAMED_SHAPES = [  # timed only when --shapes names them
    # token counts that are not a multiple of 64 (s10, UNTIMED): multiples of 8 reach the kernels
    # without a padded copy of q, k, v and o; 4x8191 (32764 tokens) is still padded to 32768
    ("4x8184", [8184] * 4, 16, 32, None),
    ("1x32760", [32760], 16, 32, None),
    ("4x8191", [8191] * 4, 16, 32, None),
    ("1x8192", [8192], 16, 32, 0.15),  # issue 6's target (the floor bucket's narrow pick under jit)
    ("1x32768_HV16", [32768], 16, 16, None),  # s27: the co-resident kernel where the loop leaves 100 SMs
    ("28672+4096", [28672, 4096], 16, 32, 0.60),
    ("4096+28672", [4096, 28672], 16, 32, None),  # s28: the long prompt second (long_first reorders)
    ("2x16384", [16384] * 2, 16, 32, None),
    # s19: the persistent grid's h0 staged in SMEM (short items) or prefetched into L2 (long ones)
    ("256x128", [128] * 256, 16, 32, None),
    ("64x512", [512] * 64, 16, 32, None),
    ("32x1024", [1024] * 32, 16, 32, None),
]


def _add_mix():
    """SHAPES += "mix": gdn.bench.serving_mix(), the benchmark's serving batch of 32768 tokens (log-normal
    prompt lengths; only with --shapes naming it)."""
    from gdn.bench import serving_mix
    SHAPES.append(("mix", list(serving_mix()), 16, 32, None))


def _interleaved(fns, args, rounds):
    """{name: (median, best) ms}: ``rounds`` rounds, each timing every function once in turn (one
    jitted loop of 10 calls each), so a drift of the clock or the machine hits all of them alike."""
    ts = {name: [] for name in fns}
    for name, fn in fns.items():
        _bench(fn, args, reps=1)  # compile and warm
    for _ in range(rounds):
        for name, fn in fns.items():
            ts[name].append(_bench(fn, args, reps=1)[0])
    return {name: (statistics.median(v), min(v)) for name, v in ts.items()}


def _agreement(fns) -> dict:
    """{name: "rms vs the first variant's o (relative), all finite"} for each function's output: a
    variant timed beside the default that computes something else shows here (the time section has
    no float64 check of its own)."""
    import jax.numpy as jnp

    out, ref = {}, None
    for name, fn in fns.items():
        o = jnp.asarray(fn()[0], jnp.float32)
        if ref is None:
            ref = o
        rel = jnp.sqrt(jnp.mean((o - ref) ** 2)) / jnp.sqrt(jnp.mean(ref ** 2))
        out[name] = f"{float(rel):.2e}{'' if bool(jnp.isfinite(o).all()) else ' NON-FINITE'}"
        del o
    return out


@section("time")
def sec_time(shapes, variants, fla_shapes, rounds=3):
    """Each shape: the variants built first, then timed interleaved (:func:`_interleaved`), then each
    variant's output against the first's (:func:`_agreement`)."""
    out = {}
    for label, lens, h, hv, target in shapes:
        row = dict(target=target)
        fns, args = {}, ()
        for vname, kw in variants:
            try:  # each variant bound to its own arguments (a traced plan's call takes the plan too)
                fn, a, _ = _jitted(lens, h, hv, 128, seed=1, **kw)
                fns[vname] = functools.partial(fn, *a)
            except Exception as e:
                row[vname] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        try:
            for vname, (med, best) in _interleaved(fns, args, rounds).items():
                row[vname], row[vname + "_best"] = med, best
        except Exception as e:
            for vname in fns:
                row[vname] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        try:
            row["agree"] = _agreement(fns) if len(fns) > 1 else None
        except Exception as e:
            row["agree"] = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        try:
            row["fla"] = _bench_fla(lens, h, hv, 128, seed=1) if label in fla_shapes else None
        except Exception as e:
            row["fla"] = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        out[label] = row
        log(label, row)
        cells = []
        for vname, _ in variants:
            val = row[vname]
            cells.append(f"{vname} {val:.3f}" if isinstance(val, float) else f"{vname} {str(val)[:60]}")
        fla = row.get("fla")
        ratio = (f" ({fla / row[variants[0][0]]:.1f}x faster than FLA)"
                 if isinstance(fla, float) and isinstance(row[variants[0][0]], float) else "")
        TABLE.append(f"time {label:12s} " + " | ".join(cells) + (f" | FLA {fla:.3f}" if isinstance(fla, float) else "")
                     + f" ms{ratio}  target {target}")
        if row.get("agree"):
            TABLE.append(f"time {label:12s} o vs {variants[0][0]}: {row['agree']}")
    RESULTS["time"] = out


def _kernel_inputs(lens, h, hv, seed=2, with_intra=True):
    """Device inputs of the kernels alone (what _driver.core hands them) at the Qwen3.5 head size;
    ``with_intra=False``: without the intra kernel's ag / gc (no kernel runs)."""
    import jax.numpy as jnp
    from gdn.jax_backend.mosaic_gpu.intra import intra
    q, k, v, g, beta, h0, cu = _qwen_inputs(lens, h, hv, 128, seed=seed)
    t = q.shape[1]
    q3, k3, v3 = q.reshape(t, h, 128), k.reshape(t, h, 128), v.reshape(t, hv, 128)
    g_hm, b_hm = g[0].T, beta[0].T
    cu_j = jnp.asarray(np.concatenate([cu, np.full(4, cu[-1])]), jnp.int32)  # 4 padding sequences
    seg = jnp.searchsorted(cu_j[1:], jnp.arange(t, dtype=jnp.int32), side="right").astype(jnp.int32)
    ag, gc = intra(k3, g_hm, b_hm, seg, group=hv // h) if with_intra else (None, None)
    return dict(ag=ag, q=q3, k=k3, v=v3, g_hm=g_hm, b_hm=b_hm, cu=cu_j, seg=seg, gc=gc, h0=h0, t=t, n=len(lens))


@section("kernels")
def sec_kernels():
    """Each stage timed alone at 4x8192 (where the time goes): the intra kernel (heads in a loop /
    unrolled), the default and the wide chunk loop."""
    import jax
    from gdn.jax_backend.mosaic_gpu.chunk_loop import chunk_loop
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide
    from gdn.jax_backend.mosaic_gpu.intra import intra
    x = _kernel_inputs([8192] * 4, 16, 32)
    res = {}
    for hl in ("loop", "unroll"):
        f_intra = jax.jit(lambda k, g, b, s, hl=hl: intra(k, g, b, s, group=2, head_loop=hl))
        res["intra_" + hl] = _bench(f_intra, (x["k"], x["g_hm"], x["b_hm"], x["seg"]))[0]
    ag = x["ag"]
    loops = dict(chunk_loop=chunk_loop, chunk_loop_wide=chunk_loop_wide)
    for name, loop in loops.items():
        f = jax.jit(lambda q, k, v, ag, gc, cu, h0, loop=loop: loop(q, k, v, ag, gc, cu, h0, scale=128 ** -0.5,
                                                                   group=2, n_out=4, t_valid=x["t"]))
        try:  # one failing loop must not hide the other's number
            res[name] = _bench(f, (x["q"], x["k"], x["v"], ag, x["gc"], x["cu"], x["h0"]))[0]
        except Exception as e:
            res[name] = f"{type(e).__name__}: {e}"[:500]
    # the HBM bytes each stage must move at least (every operand read once, outputs written once):
    # against the copy probe (--only hbm) they say how far a stage is from its bandwidth bound
    nb = {name: x[name].nbytes for name in ("q", "k", "v", "ag", "gc", "g_hm", "b_hm", "seg", "h0")}
    o_bytes, final_bytes = x["v"].nbytes, x["h0"].nbytes
    res["bytes_intra"] = nb["k"] + nb["g_hm"] + nb["b_hm"] + nb["seg"] + nb["ag"] + nb["gc"]
    res["bytes_loop"] = nb["q"] + nb["k"] + nb["v"] + nb["ag"] + nb["gc"] + nb["h0"] + o_bytes + final_bytes
    for stage, names in (("intra", ("intra_loop", "intra_unroll")), ("loop", ("chunk_loop", "chunk_loop_wide"))):
        for name in names:
            if isinstance(res.get(name), float):
                res[f"tbps_{name}"] = res[f"bytes_{stage}"] / (res[name] * 1e-3) / 1e12
    RESULTS["kernels"] = res
    log(res)
    TABLE.append("kernels alone at 4x8192: " + ", ".join(
        f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} FAILED ({v[:80]})" for k, v in res.items()
        if not k.startswith(("bytes_", "tbps_"))))
    TABLE.append("kernels' minimum HBM traffic (GB) and its rate (TB/s): " + ", ".join(
        f"{k} {v / 1e9:.3f}" if k.startswith("bytes_") else f"{k} {v:.2f}" for k, v in res.items()
        if k.startswith(("bytes_", "tbps_"))))


@section("hbm")
def sec_hbm():
    """What HBM bandwidth a plain copy reaches here (the yardstick of ``kernels``' rates): a jitted
    bf16 ``x * 2`` over 512 MiB (read + write) and a sum over 1 GiB (read only)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((1 << 28,), jnp.bfloat16)
    y = jnp.ones((1 << 29,), jnp.bfloat16)
    copy_ms = _bench(jax.jit(lambda a: a * 2), (x,))[0]
    read_ms = _bench(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (y,))[0]
    res = dict(copy_ms=copy_ms, copy_tbps=2 * x.nbytes / (copy_ms * 1e-3) / 1e12,
               read_ms=read_ms, read_tbps=y.nbytes / (read_ms * 1e-3) / 1e12)
    RESULTS["hbm"] = res
    log(res)
    TABLE.append(f"hbm: copy {res['copy_tbps']:.2f} TB/s ({copy_ms:.3f} ms for 2 x 512 MiB), "
                 f"read {res['read_tbps']:.2f} TB/s ({read_ms:.3f} ms for 1 GiB)")


LOOP_VARIANTS = {  # name -> chunk_loop_wide options (the loop alone, --only loops)
    "one_per_item": dict(),
    # each output tile stored during the next tile's first products, the column factors' exps and the
    # state's decay in the groups' shadows too; _shadow=False: the store alone
    "overlap": dict(overlap=True),
    "overlap_store_only": dict(overlap=True, _shadow=False, _prep_shadow=False),
    "overlap_no_prep": dict(overlap=True, _prep_shadow=False),
    "order": dict(ctas=132),  # persistent, item lookups derived in the kernel (session 8's default)
    "table": dict(ctas=132, schedule="table"),  # persistent, items read from the per-CTA table
    "table_pf": dict(ctas=132, schedule="table", prefetch_h0=True),  # ... and each item's h0 prefetched into L2
    # s19: ... into each state warpgroup's own SMEM staging an item ahead (2 stages), and its control
    "table_h0smem": dict(ctas=132, schedule="table", prefetch_h0="smem"),
    "table_pf_s2": dict(ctas=132, schedule="table", prefetch_h0=True, stages=2),
    "order_overlap": dict(ctas=132, overlap=True),
    "table_pf_overlap": dict(ctas=132, schedule="table", prefetch_h0=True, overlap=True),
    # s17: P's mask by three compares per element, as before causal_mask (the same bits)
    "mask3": dict(_p_mask="three"),
    "table_pf_mask3": dict(ctas=132, schedule="table", prefetch_h0=True, _p_mask="three"),
    # s19: P's select with a constant zero arm (LLVM sinks it past the bf16 cast: selp.b16)
    "zero_const": dict(_p_mask="one_const"),
    "table_pf_zero_const": dict(ctas=132, schedule="table", prefetch_h0=True, _p_mask="one_const"),
    # s17 (slower, m1): the output's fence, barrier and TMA issue in the next tile's first group's shadow
    "store": dict(overlap="store"),
    "table_pf_store": dict(ctas=132, schedule="table", prefetch_h0=True, overlap="store"),
    # s21: the output stored in the state update's shadow
    "update": dict(overlap="update"),
    "table_pf_update": dict(ctas=132, schedule="table", prefetch_h0=True, overlap="update"),
    "table_h0smem_update": dict(ctas=132, schedule="table", prefetch_h0="smem", overlap="update"),
    "update_noshadow": dict(overlap="update", _shadow=False, _prep_shadow=False),  # the store alone
    "direct_out": dict(out_store="registers"),  # whole output tiles from registers (s21)
    "table_h0smem_direct_out": dict(ctas=132, schedule="table", prefetch_h0="smem", out_store="registers"),
    "warp_out": dict(out_store="warp"),  # each warp's slab through its own SMEM, bar.warp.sync only (s22)
    "table_h0smem_warp_out": dict(ctas=132, schedule="table", prefetch_h0="smem", out_store="warp"),
}


@section("loops")
def sec_loops(shapes=("128x256", "mix"), names=("one_per_item", "order", "table", "table_pf"), rounds=5):
    """The wide chunk loop alone, interleaved, with the options ``names`` of :data:`LOOP_VARIANTS`
    (their outputs checked bitwise against the first one's before anything is timed: none of them
    changes the arithmetic)."""
    import jax
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide
    if "mix" in shapes and not any(s[0] == "mix" for s in SHAPES):
        _add_mix()
    out = {}
    for label in shapes:
        lens = next(s[1] for s in SHAPES + NAMED_SHAPES if s[0] == label)
        x = _kernel_inputs(lens, 16, 32)
        args = (x["q"], x["k"], x["v"], x["ag"], x["gc"], x["cu"], x["h0"])
        fns = {name: jax.jit(lambda q, k, v, ag, gc, cu, h0, kw=LOOP_VARIANTS[name]: chunk_loop_wide(
            q, k, v, ag, gc, cu, h0, scale=128 ** -0.5, group=2, n_out=x["n"], t_valid=x["t"], **kw))
            for name in names}
        ref = jax.block_until_ready(fns[names[0]](*args))
        bits = {}
        for name, fn in fns.items():
            try:
                got = jax.block_until_ready(fn(*args))
                bits[name] = all(bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
                                 for a, b in zip(ref, got))
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
                bits[name] = f"{type(e).__name__}: {str(e)[:300]}"
                log(name, bits[name])
        fns = {n: f for n, f in fns.items() if bits[n] is True}
        ts = _interleaved(fns, args, rounds)
        out[label] = dict(same_bits=bits, ms={n: t[0] for n, t in ts.items()})
        log(label, out[label])
        TABLE.append(f"loops {label} (wide loop alone, median of {rounds}): " + ", ".join(
            f"{n} {t[0]:.3f}" for n, t in ts.items()) + "".join(
            f"; {n} FAILED ({str(b)[:60]})" for n, b in bits.items() if b is not True))
    RESULTS.setdefault("loops", {}).update(out)


def _loop_alone(loop: str):
    """``loop`` ("wide" / "narrow") -> (its module's ABLATIONS, the kernel function, the options it runs
    with by default here: the narrow loop's ``overlap``, on in the prefill)."""
    if loop == "wide":
        from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import ABLATIONS, chunk_loop_wide
        return ABLATIONS, chunk_loop_wide, {}
    from gdn.jax_backend.mosaic_gpu.chunk_loop import ABLATIONS, chunk_loop
    return ABLATIONS, chunk_loop, dict(overlap=True)


@section("ablate")
def sec_ablate(lens=(8192,) * 4, rounds=5, loop="wide"):
    """The chunk loop ``loop`` ("wide", or "narrow": what few long sequences run) alone at ``lens``, whole
    and with each diagnostic ablation (the loop module's ABLATIONS: WRONG results, the time of what is
    left), interleaved: what each piece of a tile costs on the critical path. The narrow loop's state-chain
    ablations run without ``overlap`` (its default): "plain" is that reference."""
    import jax
    ABLATIONS, fn, extra = _loop_alone(loop)
    x = _kernel_inputs(list(lens), 16, 32)
    fns = {}
    refs = {"plain": dict(overlap=False)} if loop != "wide" else {}
    names = ("none",) + tuple(refs) + ABLATIONS
    for name in names:
        ab = frozenset() if name == "none" or name in refs else frozenset({name})
        kw = dict(extra, **refs.get(name, {}))
        fns[name] = jax.jit(lambda q, k, v, ag, gc, cu, h0, ab=ab, kw=kw: fn(
            q, k, v, ag, gc, cu, h0, scale=128 ** -0.5, group=2, n_out=len(lens), t_valid=x["t"], _ablate=ab, **kw))
    args = (x["q"], x["k"], x["v"], x["ag"], x["gc"], x["cu"], x["h0"])
    res = {}
    for name, (med, best) in _interleaved(fns, args, rounds).items():
        res[name] = dict(median=med, best=best)
    RESULTS["ablate" if loop == "wide" else "ablate_" + loop] = res
    log(res)
    base = res["none"]["median"]
    TABLE.append(f"ablate {loop} loop alone {len(lens)}x{lens[0]}: whole {base:.3f} ms; without " + ", ".join(
        f"{n} {r['median']:.3f} ({r['median'] - base:+.3f})" for n, r in res.items() if n != "none"))


@section("loop_pm")
def sec_loop_pm(lens=(32768,), rounds=5):
    """P from the intra workers (``coresident_p``) taken apart: the narrow loop alone with and without
    ``pm`` (P in the ring, 2 stages) and without it at 2 stages (what the ring's size costs), and the
    intra kernel alone with and without ``p_scale`` (what forming P costs the workers), interleaved;
    the loop's o and final state must be the same bits with ``pm``."""
    import jax
    from gdn.jax_backend.mosaic_gpu.chunk_loop import chunk_loop
    from gdn.jax_backend.mosaic_gpu.intra import intra
    x = _kernel_inputs(list(lens), 16, 32)
    scale = 128 ** -0.5
    ag, gc, pm = intra(x["k"], x["g_hm"], x["b_hm"], x["seg"], group=2, q=x["q"], norms=False, p_scale=scale)
    args = (x["q"], x["k"], x["v"], ag, gc, x["cu"], x["h0"], pm)

    def loop_fn(with_pm=False, **kw):
        return jax.jit(lambda q, k, v, ag, gc, cu, h0, pm: chunk_loop(
            q, k, v, ag, gc, cu, h0, scale=scale, group=2, n_out=len(lens), t_valid=x["t"], overlap=True,
            pm=pm if with_pm else None, **kw))
    loops = {"loop": loop_fn(), "loop_s2": loop_fn(stages=2), "loop_pm": loop_fn(with_pm=True)}
    same = [bool(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)))
            for a, b in zip(jax.device_get(loops["loop"](*args)), jax.device_get(loops["loop_pm"](*args)))]
    ia = (x["k"], x["g_hm"], x["b_hm"], x["seg"], x["q"])
    intras = {"intra": jax.jit(lambda k, g, b, s, q: intra(k, g, b, s, group=2)),
              "intra_p": jax.jit(lambda k, g, b, s, q: intra(k, g, b, s, group=2, q=q, norms=False, p_scale=scale)),
              "intra_w2": jax.jit(lambda k, g, b, s, q: intra(k, g, b, s, group=2, solve="warp", warpgroups=2)),
              "intra_p_w2": jax.jit(lambda k, g, b, s, q: intra(k, g, b, s, group=2, q=q, norms=False, p_scale=scale,
                                                                solve="warp", warpgroups=2)),
              # s30: Q K^T and K K^T as one group, Q K^T stored while K K^T computes (p_together)
              "intra_p_w2_tog": jax.jit(lambda k, g, b, s, q: intra(k, g, b, s, group=2, q=q, norms=False,
                                                                    p_scale=scale, solve="warp", warpgroups=2,
                                                                    p_together=True))}
    res = {n: dict(median=m, best=b) for n, (m, b) in _interleaved(loops, args, rounds).items()}
    res.update({n: dict(median=m, best=b) for n, (m, b) in _interleaved(intras, ia, rounds).items()})
    # s29: the co-resident kernel with and without P, waiting for the workers' flags and not (_no_wait:
    # WRONG results, the loop's pace with the workers beside it but not gating it)
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.jax_backend.mosaic_gpu.coresident import coresident
    ca = (x["q"], x["k"], x["v"], x["g_hm"], x["b_hm"], x["seg"], x["cu"], x["h0"])

    def cr_fn(p, nw, lag=0, together=False):
        return jax.jit(lambda *a: coresident(*a, scale=scale, group=2, n_out=len(lens), t_valid=x["t"],
                                             sms=D._sm_count(), overlap=True, active_seqs=len(lens),
                                             p_from_workers=p, flag_lag=lag, p_together=together,
                                             _no_wait=nw)[:2])
    crs = {f"cr{'_p' * p}{'_nowait' * nw}": cr_fn(p, nw) for p in (False, True) for nw in (False, True)}
    crs.update(cr_lag=cr_fn(False, False, 1), cr_p_lag=cr_fn(True, False, 1),  # s30: flags one item late
               cr_p_tog=cr_fn(True, False, 0, True), cr_p_tog_lag=cr_fn(True, False, 1, True))  # and p_together
    res.update({n: dict(median=m, best=b) for n, (m, b) in _interleaved(crs, ca, rounds).items()})
    res["loop_pm_same_bits"] = same
    RESULTS["loop_pm"] = res
    log(res)
    TABLE.append(f"loop_pm {len(lens)}x{lens[0]}: " + ", ".join(
        f"{n} {r['median']:.3f}" for n, r in res.items() if isinstance(r, dict))
        + f"; o / final with pm the same bits: {same}")


def _test_module():
    spec = importlib.util.spec_from_file_location("tmg", os.path.join(ROOT, "tests", "test_mosaic_gpu.py"))
    tmg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tmg)
    return tmg


INTRA_CMP_SHAPES = [("4x8192", [8192] * 4, 16), ("128x256", [256] * 128, 16), ("4x2048", [2048] * 4, 16)]
INTRA_CMP = [("default", dict()), ("isolate_all", dict(isolate="all")), ("levels", dict(merge_variant="levels")),
             ("pad0", dict(solve_pad=0)), ("rows", dict(solve_columns=False)), ("buf1", dict(out_buffers=1)),
             ("warp", dict(solve="warp")), ("wg3", dict(solve="warp", warpgroups=3))]  # s15: the diagonal blocks in registers


@section("intra_cmp")
def sec_intra_cmp(names=None):
    """The intra kernel's configurations (INTRA_CMP) vs the float64 stages and (the first and the
    "levels" one) its NaN isolation compiled, then each timed alone."""
    import jax
    from gdn.jax_backend.mosaic_gpu.intra import intra
    cmp = [(n, kw) for n, kw in INTRA_CMP if not names or n in names]
    tmg = _test_module()
    out = {}
    for name, kw in cmp:
        kw = dict(kw)
        hl = kw.pop("head_loop", "loop")
        err = tmg._intra_stage_errors(hl, interpret=False, lens=(100, 0, 1, 63, 64, 65, 300), h=2, hv=4, dk=128,
                                      **kw)
        out["check_" + name] = err
        TABLE.append(f"intra {name:12s} vs f64 stages: rms Ai {err['ai']:.2e} Ag {err['ag']:.2e} gc {err['gc']:.2e}"
                     f" | max Ai {err['ai_max']:.2e} Ag {err['ag_max']:.2e} gc {err['gc_max']:.2e}")
        log(name, err)
        if name in (cmp[0][0], "levels", "warp"):
            nan = tmg._intra_nan_isolation(hl, interpret=False, **kw)
            out["nan_" + name] = nan
            ok = nan["rows_changed"] == 0 and nan["clean_finite"] and nan["dirty_finite"]
            TABLE.append(f"intra {name:12s} NaN isolation: {'PASS' if ok else 'FAIL'} {nan}")
            log(name, nan)
    for label, lens, h in INTRA_CMP_SHAPES:
        x = _kernel_inputs(lens, h, 2 * h)
        args = (x["k"], x["g_hm"], x["b_hm"], x["seg"])
        row = {}
        ref = None
        fns = {}
        for name, kw in cmp:
            fns[name] = f = jax.jit(lambda k, g, b, s, kw=kw: intra(k, g, b, s, group=2, **kw)[0])
            ag = np.asarray(f(*args), np.float32)
            if ref is None:
                ref = ag
            else:  # same math: the outputs agree to a bf16 ulp
                row[name + "_maxdiff"] = float(np.abs(ag - ref).max())
        for name, (med, best) in _interleaved(fns, args, 5).items():
            row[name], row[name + "_best"] = med, best
        out[label] = row
        log(label, row)
        TABLE.append(f"intra alone {label:8s} " + " | ".join(f"{n} {row[n]:.3f}" for n, _ in cmp) + " ms; max diff to "
                     + cmp[0][0] + ": " + ", ".join(f"{n} {row[n + '_maxdiff']:.1e}" for n, _ in cmp[1:]))
    RESULTS["intra_cmp"] = out


@section("sync")
def sec_sync():
    """The jitted prefill returns to the host long before queued GPU work drains (no host sync)."""
    import jax
    import jax.numpy as jnp
    fn, args, _ = _jitted([2048] * 4, 16, 32, 128, seed=3)
    jax.block_until_ready(fn(*args))
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a))
    one = time.perf_counter() - t0
    n = max(1, int(0.05 / max(one, 1e-4)))
    for _ in range(n):
        b = mm(a)
    t0 = time.perf_counter()
    out = fn(*args)
    host = time.perf_counter() - t0
    jax.block_until_ready((b, out))
    total = time.perf_counter() - t0
    RESULTS["sync"] = dict(queued_ms=n * one * 1e3, host_return_ms=host * 1e3, drain_ms=total * 1e3)
    TABLE.append(f"sync: prefill returned after {host * 1e3:.2f} ms with {n * one * 1e3:.0f} ms queued "
                 f"({'no sync' if host < 0.5 * n * one else 'SYNCS'})")


@section("ptxas")
def sec_ptxas(out_dir, variants=(("default", {}),), lens=(256, 256), dump=False):
    """ptxas's register / spill report of each variant's kernels at ``lens`` (the chunk loop the
    plan picks there); ``dump``: also each kernel's PTX, gzipped, as ``out_dir/<variant>-<kernel>.ptx.gz``
    (the device has no nvdisasm: benchmarks/sass.sh assembles and disassembles it on any host)."""
    for vname, kw in variants:
        code = (
            "import sys; sys.path.insert(0, '.');"
            "from tests.gpu.mosaic_gpu_check import _jitted;"
            f"fn, args, _ = _jitted({list(lens)!r}, 16, 32, 128, seed=4, **{kw!r});"
            "import jax; jax.block_until_ready(fn(*args))"
        )
        env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if dump:  # Mosaic writes every stage's dump there (hundreds of MB); only the PTX is kept
            import tempfile
            dump_dir = tempfile.mkdtemp(prefix="gdn_dump_")
            env.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump_dir)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        text = proc.stdout + proc.stderr
        if dump:
            import glob
            import gzip
            import shutil
            for rep in sorted(glob.glob(os.path.join(dump_dir, "*.ptxas"))):  # with DUMP_TO, the report is there
                with open(rep) as fh:
                    text += fh.read()
            for ptx in glob.glob(os.path.join(dump_dir, "*.ptx")):
                with open(ptx, "rb") as src, gzip.open(
                        os.path.join(out_dir, f"{vname}-{os.path.basename(ptx)}.gz"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            shutil.rmtree(dump_dir, ignore_errors=True)
        with open(os.path.join(out_dir, f"ptxas_{vname}.txt"), "w") as fh:
            fh.write(text)
        keep = [ln.strip() for ln in text.splitlines()
                if any(s in ln for s in ("registers", "spill", "stack frame", "Compiling entry", "smem", "warning"))]
        RESULTS.setdefault("ptxas", {})[vname] = keep[:40]
        for ln in keep[:20]:
            log(ln)
        TABLE.append(f"ptxas {vname}: " + " ; ".join(ln for ln in keep if "registers" in ln or "spill" in ln)[:400])
        warns = sorted({ln[:160] for ln in keep if "warning" in ln.lower()})  # e.g. wgmma serialized (C7510/C7511)
        if warns:
            TABLE.append(f"ptxas {vname} WARNINGS: " + " | ".join(warns)[:600])


def summarize_trace(path: str) -> dict:
    """One Mosaic in-kernel profiler trace (Chrome JSON of B/E events, one ``tid`` per CTA and
    warpgroup) -> per region: count, mean and total ns, share of the warpgroups' lifetime; and the
    warpgroups' mean lifetime (first to last event)."""
    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    regions: dict = {}
    spans: dict = {}
    stacks: dict = {}
    for ev in events:
        tid, ts = ev["tid"], ev["ts"] * 1e3  # ns
        lo, hi = spans.get(tid, (ts, ts))
        spans[tid] = (min(lo, ts), max(hi, ts))
        st = stacks.setdefault(tid, [])
        if ev["ph"] == "B":
            st.append((ev["name"], ts))
        elif st:
            name, t0 = st.pop()
            r = regions.setdefault(name, [0, 0.0])
            r[0] += 1
            r[1] += ts - t0
    life = sum(hi - lo for lo, hi in spans.values())
    out = {name: dict(count=n, mean_ns=tot / n, total_ms=tot / 1e6, share=tot / life if life else 0.0)
           for name, (n, tot) in sorted(regions.items(), key=lambda kv: -kv[1][1])}
    return dict(regions=out, traces=len(spans), mean_life_us=life / max(len(spans), 1) / 1e3)


def _profiled(code: str, prefix: str):
    """``code`` run in a fresh Python process under Mosaic's in-kernel profiler (each kernel writes a
    trace of GDN_MOSAIC_PROFILE_SPACE ranges a warpgroup) -> (the process, its trace paths, sorted)."""
    import glob
    import tempfile
    prof = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ, GDN_MOSAIC_PROFILE_DIR=prof, GDN_MOSAIC_PROFILE_SPACE="256",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, sorted(glob.glob(os.path.join(prof, "*-trace.json")))


def _profile_line(label: str, summ: dict, lens) -> str:
    """The summary table's line for one trace summary (:func:`summarize_trace`): its top regions."""
    top = ", ".join(f"{n} {r['mean_ns']:.0f} ns x{r['count']} ({100 * r['share']:.0f}%)"
                    for n, r in list(summ["regions"].items())[:9])
    return (f"{label} ({len(lens)}x{lens[0]}, {summ['traces']} WG traces, life {summ['mean_life_us']:.1f} us): "
            f"{top}")


@section("profile")
def sec_profile(out_dir, variant="default", lens=(2048,) * 4):
    """Mosaic's in-kernel profiler at ``lens`` (default 4x2048; chunk loop at 2 stages to leave SMEM
    for the trace buffers): where each warpgroup's time goes, per named scope of the kernels."""
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.gpu.mosaic_gpu_check import _jitted;"
        f"fn, args, _ = _jitted({list(lens)!r}, 16, 32, 128, seed=5, stages=2, **{VARIANTS[variant]!r});"
        "import jax; jax.block_until_ready(fn(*args))"
    )
    proc, paths = _profiled(code, "gdn_prof_")
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    res = {}
    for path in paths:
        kern = "chunk_loop" if "chunk_loop" in os.path.basename(path) else (
            "intra" if "intra" in os.path.basename(path) else os.path.basename(path))
        summ = summarize_trace(path)
        res[kern] = summ
        log(kern, json.dumps(summ)[:3000])
        TABLE.append(_profile_line(f"profile {kern}", summ, lens))
    if not res:
        raise RuntimeError("no trace written; stderr: " + proc.stderr[-1500:])
    RESULTS["profile"] = res
    with open(os.path.join(out_dir, "profile_summary.json"), "w") as fh:
        json.dump(res, fh, indent=1)


INTRA_PROFILES = {  # name -> intra() options: the co-resident workers' code (2 warpgroups a CTA), alone
    "w2": dict(solve="warp", warpgroups=2),
    "w2_p": dict(solve="warp", warpgroups=2, norms=False, p=True),
    "w2_p_tog": dict(solve="warp", warpgroups=2, norms=False, p=True, p_together=True),
}


@section("profile_intra")
def sec_profile_intra(out_dir, lens=(2048,), names=None):
    """s30: Mosaic's in-kernel profiler on the intra kernel alone as the co-resident workers run it
    (2 warpgroups a CTA, the warp solve), without and with P (``p_scale``): which of its named scopes
    (cumsum, decay_a, diag_solve, merge, store; kk holds Q K^T) takes P's extra 30% (session 29:
    0.301 against 0.232 ms at 1x32768). Each in a fresh process; ``lens`` short (the trace holds
    GDN_MOSAIC_PROFILE_SPACE ranges a warpgroup: 1x2048 gives each warpgroup ~2 items)."""
    res = {}
    for name in names or INTRA_PROFILES:
        code = (
            "import sys; sys.path.insert(0, '.');"
            "import jax;"
            "from tests.gpu.mosaic_gpu_check import _kernel_inputs, INTRA_PROFILES;"
            "from gdn.jax_backend.mosaic_gpu.intra import intra;"
            f"x = _kernel_inputs({list(lens)!r}, 16, 32, with_intra=False);"
            f"kw = dict(INTRA_PROFILES[{name!r}]); p = kw.pop('p', False);"
            "extra = dict(q=x['q'], p_scale=128 ** -0.5) if p else {};"
            "f = jax.jit(lambda k, g, b, s: intra(k, g, b, s, group=2, **kw, **extra));"
            "jax.block_until_ready(f(x['k'], x['g_hm'], x['b_hm'], x['seg']))"
        )
        proc, paths = _profiled(code, f"gdn_prof_intra_{name}_")
        if proc.returncode or not paths:
            res[name] = {"error": (proc.stderr or "no trace written")[-1500:]}
            TABLE.append(f"profile_intra {name}: ERROR {res[name]['error'][-200:]}")
            continue
        summ = summarize_trace(paths[-1])
        res[name] = summ
        log(name, json.dumps(summ)[:3000])
        TABLE.append(_profile_line(f"profile_intra {name}", summ, lens))
    RESULTS["profile_intra"] = res
    with open(os.path.join(out_dir, "profile_intra_summary.json"), "w") as fh:
        json.dump(res, fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="env,intra,small,nan,qwen,sync,kernels,time,ptxas,intra_cmp,profile")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--fla-shapes", default="4x8192,128x256,4x2048")
    ap.add_argument("--tag", default="all")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--profile-variant", default="default")
    ap.add_argument("--intra-cmp", default="", help="names of INTRA_CMP to compare (default: all)")
    ap.add_argument("--ptxas-lens", default="256,256", help="sequence lengths of the ptxas compile")
    ap.add_argument("--dump", action="store_true", help="ptxas: also bring back each kernel's PTX (gzipped)")
    ap.add_argument("--profile-lens", default="2048,2048,2048,2048")
    ap.add_argument("--ablate-lens", default="8192,8192,8192,8192", help="ablate: the sequence lengths")
    ap.add_argument("--ablate-loop", default="wide", choices=("wide", "narrow"), help="ablate: which chunk loop")
    ap.add_argument("--loop-shapes", default="128x256,mix", help="loops: the shapes")
    ap.add_argument("--loop-variants", default="one_per_item,order,table,table_pf",
                    help="loops: names of LOOP_VARIANTS (the first is the bitwise reference)")
    ap.add_argument("--nan-names", default="", help="nan: only these checks (default: all)")
    ap.add_argument("--coresident-layouts", default="", help="coresident: NxT layouts (default 1x32768,1x8192,1x1000)")
    ap.add_argument("--small-names", default="", help="small: only cases whose names contain one of these")
    ap.add_argument("--split-shapes", default="", help="labels of SPLIT_SHAPES to time (default: all)")
    ap.add_argument("--split-no-f64", action="store_true",
                    help="split: skip the float64 bar (its compilations took a short call's budget)")
    a = ap.parse_args()
    lens = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    os.makedirs(a.out, exist_ok=True)
    if "mix" in a.shapes.split(","):
        _add_mix()
    shapes = SHAPES if not a.shapes else [s for s in SHAPES + NAMED_SHAPES if s[0] in a.shapes.split(",")]
    variants = [(name, VARIANTS[name]) for name in a.variants.split(",")]
    unknown = set(filter(None, a.split_shapes.split(","))) - {s[0] for s in SPLIT_SHAPES}
    if unknown:  # a misspelled label would time nothing and say nothing (a device call lost)
        ap.error(f"--split-shapes: unknown {sorted(unknown)}; known: {[s[0] for s in SPLIT_SHAPES]}")
    sections = {"env": (sec_env, ()), "intra": (sec_intra, ()), "small": (sec_small, ([n for n in a.small_names.split(",") if n],)), "oob": (sec_oob, ()),
                "qwen": (sec_qwen, (variants,)), "sync": (sec_sync, ()), "kernels": (sec_kernels, ()), "hbm": (sec_hbm, ()),
                "time": (sec_time, (shapes, variants, set(a.fla_shapes.split(",")))),
                "intra_cmp": (sec_intra_cmp, ([n for n in a.intra_cmp.split(",") if n],)), "nan": (sec_nan, ([n for n in a.nan_names.split(",") if n],)),
                "ptxas": (sec_ptxas, (a.out, variants, lens(a.ptxas_lens), a.dump)),
                "ablate": (sec_ablate, (lens(a.ablate_lens), 5, a.ablate_loop)), "loops": (sec_loops, (a.loop_shapes.split(","), a.loop_variants.split(","))),
                "split": (sec_split, ([s for s in SPLIT_SHAPES
                                       if not a.split_shapes or s[0] in a.split_shapes.split(",")],)
                          + ((3, (3000, 0, 130, 64, 700), (2, 4), ()) if a.split_no_f64 else ())),
                "profile": (sec_profile, (a.out, a.profile_variant, lens(a.profile_lens))),
                "profile_intra": (sec_profile_intra, (a.out, [2048])),
                "loop_pm": (sec_loop_pm, (lens(a.ablate_lens),)),
                "coresident": (sec_coresident, ((a.coresident_layouts.split(","),) if a.coresident_layouts else ()))}
    try:  # in the order --only names them; a timeout's SIGINT still prints what was measured
        for name in a.only.split(","):
            fn, args = sections[name]
            fn(*args)
            with open(os.path.join(a.out, f"mosaic_{a.tag}.json"), "w") as fh:
                json.dump(RESULTS, fh, indent=1, default=str)
    except KeyboardInterrupt:
        TABLE.append("INTERRUPTED (time budget): the sections after this point did not run")
    log("\n==================== SUMMARY ====================")
    for line in TABLE:
        log(line)


if __name__ == "__main__":
    main()
