"""impl="mosaic_gpu" (gdn/jax_backend/mosaic_gpu) on a CPU-only machine.

Two kinds of checks:

* the kernels run under the Mosaic GPU interpreter on small shapes (K, V in {64, 128}, a few
  hundred tokens, HV 2-3) against the float64 token loop on the dtype-rounded inputs. The interpreter
  runs every warpgroup of a CTA as a thread whose barrier waits block XLA CPU callback threads; with
  the default single CPU device a 2-core machine has too few of them and a warp-specialized kernel
  deadlocks. So the interpreter cases run in ONE subprocess with ``JAX_NUM_CPU_DEVICES=4`` (this
  file run as a script), under a timeout.
* NaN / inf in one sequence of a tile shared with clean ones, under the interpreter (the default,
  fused and chunk_variant="wide" prefills; the intra kernel's Ag and gc with its heads unrolled): the clean sequences' results bitwise those of a clean call.
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
    # one prompt (a plan of one sequence row) end to end (its sequence ids come from one compare; with
    # one sequence the kernels do not depend on them: the lowering test guards the compare)
    ("one_prompt_G2_h0_pad", dict(lens=[150], h=1, hv=2, k=64, v=64, initial_state=True, pad_tokens=20,
                                  seed=26), dict(), "bfloat16", "packed"),
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
    # the intra kernel with 2 tiles per CTA (7 tiles -> CTAs of 2, 2, 2, 1), its heads unrolled
    ("intra_t2_varlen_G3_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=3, k=64, v=64, initial_state=True,
                                       pad_tokens=20, seed=6), dict(), "bfloat16", "packed:t2"),
    ("intra_unroll_jit_G2_K128_fp16", dict(lens=[130, 0, 70], h=2, hv=4, k=128, v=64, initial_state=True, seed=7),
     dict(output_final_state=False), "float16", "jit:unroll"),
    # chunk_variant="wide" (chunk_loop_wide.py): one CTA per sequence and v head: a prep warpgroup
    # and one or two state warpgroups
    ("wide_varlen_G2_K64_V128_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=2, k=64, v=128,
                                            initial_state=True, pad_tokens=20, seed=10), dict(), "bfloat16",
     "packed:wide"),
    ("wide_jit_G2_K128_fp16", dict(lens=[130, 70], h=1, hv=2, k=128, v=128, initial_state=True, seed=11),
     dict(output_final_state=False), "float16", "jit:wide"),
    # the chunk loops with their selects, o's scale after the products and Pallas's automatic
    # barriers (loop_lean=False, loop_bare=False: the loops before 2026-12-04 s5; the cases above
    # run the defaults, lean and bare, which the GPU check's `small` section runs compiled)
    ("wide_plain_varlen_G2_K128_V128_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=2, k=128, v=128,
                                                   initial_state=True, pad_tokens=20, seed=12), dict(), "bfloat16",
     "packed:wide_plain"),
    ("narrow_plain_varlen_G3_V64_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=3, k=64, v=64,
                                               initial_state=True, pad_tokens=20, seed=15), dict(), "bfloat16",
     "packed:narrow_plain"),
    # the chunk loops with the initial / final state between global memory and registers
    # (loop_direct_io=True, not staged in SMEM); grid rows past the 6 sequences read no state
    ("wide_direct_varlen_G2_K128_V128_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=2, k=128, v=128,
                                                    initial_state=True, pad_tokens=20, seed=18), dict(),
     "bfloat16", "packed:wide_direct"),
    ("narrow_direct_varlen_G3_V128_h0_pad", dict(lens=[100, 0, 1, 63, 64, 65], h=1, hv=3, k=64, v=128,
                                                 initial_state=True, pad_tokens=20, seed=19), dict(),
     "bfloat16", "packed:narrow_direct"),
    # the wide loop on a persistent grid of 3 CTAs (loop_ctas=3) walking the 2 x 9 (row, head) items
    # of a traced plan: empty sequences, a 5-token one, the tail row inside the CTAs' streams, the
    # final states of the N_pad rows (what the jitted default runs for buckets of many sequences)
    ("wide_persist_jit_G2_K128_V128", dict(lens=[130, 0, 70, 5, 64], h=1, hv=2, k=128, v=128,
                                           initial_state=True, seed=20), dict(),
     "bfloat16", "jit:wide_persist"),
    # the exact split's two passes on these kernels (mosaic_gpu/split.py) in pieces of 2 chunks:
    # sequences starting inside a tile, an empty one, a piece of 2 tokens, the initial state of a
    # first piece, a middle piece's map; the narrow loop as pass 2 ...
    ("two_pass_varlen_G2_h0_pad", dict(lens=[300, 0, 130, 64], h=1, hv=2, k=64, v=64, initial_state=True,
                                       pad_tokens=20, seed=16), dict(), "bfloat16", "two_pass"),
    # ... and the wide one, at K = V = 128 (two M blocks), on gates with no decay on half the tokens
    # (where a split that drops the early pieces' influence fails), no initial state
    ("two_pass_wide_nodecay_K128_V128", dict(lens=[330, 70], h=1, hv=2, k=128, v=128, gates="none", seed=17),
     dict(), "bfloat16", "two_pass:wide"),
    # the scan as one Pallas-Triton kernel (scan="kernel"): 3 and 2 pieces, an initial state; both
    # passes with loop_overlap (their off-chain work in the products' shadows)
    ("two_pass_scan_kernel_G2_h0", dict(lens=[300, 200], h=1, hv=2, k=64, v=64, initial_state=True, seed=18),
     dict(), "bfloat16", "two_pass:scan_kernel"),
    # ... and under jit with the plan traced: the pieces and tables cut on the device (split_tables)
    ("two_pass_jit_varlen_G2_h0_pad", dict(lens=[300, 0, 130, 64], h=1, hv=2, k=64, v=64, initial_state=True,
                                           pad_tokens=20, seed=19), dict(), "bfloat16", "jit_split"),
    # use_qk_l2norm folded into the kernels (q and k not rewritten: ln rstd of their rows joins the
    # gates' exponents) in each loop and in the split's pass 1 (piece_states), on unnormalized q, k
    ("wide_l2norm_varlen_G2_K128_V128_h0", dict(lens=[100, 0, 1, 63, 65], h=1, hv=2, k=128, v=128, l2norm_qk=False,
                                                initial_state=True, seed=21), dict(use_qk_l2norm=True),
     "bfloat16", "packed:wide"),
    ("narrow_l2norm_varlen_G2_h0", dict(lens=[100, 1, 64, 65], h=1, hv=2, k=64, v=64, l2norm_qk=False,
                                        initial_state=True, seed=22), dict(use_qk_l2norm=True), "bfloat16",
     "packed:narrow"),
    ("two_pass_l2norm_G2_h0", dict(lens=[300, 70], h=1, hv=2, k=64, v=64, l2norm_qk=False, initial_state=True,
                                   seed=23), dict(use_qk_l2norm=True), "bfloat16", "two_pass"),
    # the cases above take the row norms from the intra kernel (qk_norms="intra", the default since
    # s13); these two from XLA's reductions (qk_norms="xla"): G = 1 and the wide loop at G = 2 with fp16
    ("narrow_l2norm_xla_norms_G1_h0", dict(lens=[100, 1, 64, 200], h=2, hv=2, k=64, v=64, l2norm_qk=False,
                                     initial_state=True, seed=24), dict(use_qk_l2norm=True), "bfloat16",
     "packed:narrow_xla_norms"),
    ("wide_l2norm_xla_norms_G2_K128_fp16", dict(lens=[130, 0, 70], h=1, hv=2, k=128, v=128, l2norm_qk=False, seed=25),
     dict(use_qk_l2norm=True, scale=0.2), "float16", "packed:wide_xla_norms"),
]

#: compiled on the GPU only (tests/gpu/mosaic_gpu_check.py's small section, with CASES): opt-in variants
#: whose interpreter runs are covered elsewhere (test_fused_wide_same_bits_as_two_kernels: the two
#: kernels' bits and the float64 bar), kept out of the interpreter subprocess's time budget
GPU_CASES = [
    # the wide loop doing the intra work on 16-column slabs (warp-level MMA on the GPU)
    ("fused_wide_mma_G2_strong", dict(lens=[130, 1, 0, 64, 77], h=1, hv=2, k=128, v=128, initial_state=True,
                                      gates="strong", seed=12), dict(), "bfloat16", "packed:fused_wide_mma"),
]

#: layout suffix -> options of M.run
VARIANT_OPTS = {"": {}, "fused": dict(variant="fused"), "t2": dict(intra_tiles=2),
                "unroll": dict(head_loop="unroll", intra_tiles=2), "wide": dict(chunk_variant="wide"),
                "fused_wide_mma": dict(variant="fused_wide_mma"),
                "narrow": dict(chunk_variant="default"),
                "coresident": dict(variant="coresident", coresident_sms=40),
                "wide_plain": dict(chunk_variant="wide", loop_lean=False, loop_bare=False),
                "narrow_plain": dict(chunk_variant="default", loop_lean=False, loop_bare=False),
                "wide_direct": dict(chunk_variant="wide", loop_direct_io=True),
                "narrow_direct": dict(chunk_variant="default", loop_direct_io=True),
                "wide_persist": dict(chunk_variant="wide", loop_ctas=3),
                "scan_kernel": dict(scan="kernel", loop_overlap=True),
                "narrow_xla_norms": dict(chunk_variant="default", qk_norms="xla"),
                "wide_xla_norms": dict(chunk_variant="wide", qk_norms="xla")}


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
    opts = VARIANT_OPTS[variant]
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
    elif layout == "two_pass":
        from gdn.jax_backend.mosaic_gpu.split import run_split
        from gdn.planner import split_pieces

        _, args = api.validate(q, k, v, g, beta, cu_seqlens=x.cu_seqlens, initial_state=h0, backend="jax", **kw)
        o, f = run_split(args, split_pieces(x.cu_seqlens, 2), interpret=interpret, **opts)
    elif layout == "jit_split":  # the two passes under jit, the plan traced: pieces of 2 chunks
        from gdn.jax_backend.mosaic_gpu.split import run_split

        p = make_plan(x.cu_seqlens, num_tokens=q.shape[1]).to_jax()
        h0 = jnp.pad(h0, ((0, p.padded_seqs - h0.shape[0]), (0, 0), (0, 0), (0, 0)))

        @jax.jit
        def fn(q, k, v, g, beta, h0, p):
            _, args = api.validate(q, k, v, g, beta, plan=p, initial_state=h0, backend="jax", **kw)
            return run_split(args, 2, interpret=interpret, **opts)

        o, f = fn(q, k, v, g, beta, h0, p)
        f = f[:len(mk["lens"])]
    elif layout == "jit":
        p = make_plan(x.cu_seqlens, num_tokens=q.shape[1]).to_jax()
        if h0 is not None:  # under jit the plan's real count is unknown: states have N_pad rows
            h0 = jnp.pad(h0, ((0, p.padded_seqs - h0.shape[0]), (0, 0), (0, 0), (0, 0)))

        @jax.jit
        def fn(q, k, v, g, beta, h0, p):
            _, args = api.validate(q, k, v, g, beta, plan=p, initial_state=h0, backend="jax", **kw)
            return M.run(args, interpret=interpret, **opts)

        o, f = fn(q, k, v, g, beta, h0, p)
        if f is not None:  # N_pad rows under jit: the real sequences' come first
            f = f[:len(mk["lens"])]
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


def _intra_stage_errors(head_loop="unroll", interpret=True, lens=(100, 0, 1, 63, 64, 65), h=1, hv=3, dk=64,
                        tiles_per_cta=2, seed=8, **intra_kw):
    """The intra kernel (gc, Ai, Ag) against the float64 stage tensors of
    gdn.reference.chunked.

    The kernels tile the PACKED token axis; the reference chunks each sequence from its start. Both
    agree on the plan whose sequences are also cut at every multiple of 64 (each piece then lies in one
    kernel tile and is one reference chunk). Tokens past the last sequence (one extra tile here) form
    their own block: Ai = I there, Ag = gc = 0 (g = beta = 0).
    """
    import jax.numpy as jnp

    from gdn import reference as R
    from gdn.inputs import make_inputs, round_to_dtype
    from gdn.jax_backend.mosaic_gpu.intra import intra

    x = make_inputs(list(lens), h=h, hv=hv, k=dk, v=32, seed=seed)
    cu = x.cu_seqlens
    t = int(cu[-1])
    tp = -(-t // 64) * 64 + 64
    k16 = round_to_dtype(x.k, "bfloat16")
    g32, b32 = x.g.astype(np.float32), x.beta.astype(np.float32)
    cuts = np.unique(np.concatenate([cu, np.arange(0, t, 64), [t]]))
    *_, st = R.chunked(x.q, k16, x.v, g32, b32, cu_seqlens=cuts, stages=True)
    ai_ref = np.zeros((hv, tp, 64))
    gc_ref = np.zeros((hv, tp))
    for s0, s1 in zip(cuts[:-1], cuts[1:]):
        off = s0 % 64
        ai_ref[:, s0:s1, off:off + s1 - s0] = st["Ai"][s0:s1, :, : s1 - s0].transpose(1, 0, 2)
        gc_ref[:, s0:s1] = st["gc"][s0:s1].T
    for r in range(t, tp):
        ai_ref[:, r, r % 64] = 1.0
    beta_hm = np.zeros((hv, tp), np.float32)
    beta_hm[:, :t] = b32[0, :t].T
    ag_ref = ai_ref * np.stack([beta_hm[:, (r // 64) * 64:(r // 64) * 64 + 64] for r in range(tp)], 1)
    kp = np.zeros((tp, h, dk), np.float32)
    kp[:t] = k16[0, :t]
    g_hm = np.zeros((hv, tp), np.float32)
    g_hm[:, :t] = g32[0, :t].T
    seg = jnp.asarray(np.searchsorted(cu[1:], np.arange(tp), side="right").astype(np.int32))
    ag, gc, ai = intra(jnp.asarray(kp, jnp.bfloat16), jnp.asarray(g_hm), jnp.asarray(beta_hm), seg, group=hv // h,
                       tiles_per_cta=tiles_per_cta, head_loop=head_loop, interpret=interpret, debug_inverse=True,
                       **intra_kw)
    ag, gc, ai = (np.asarray(a, np.float64) for a in (ag, gc, ai))
    return dict(ai=R.rms_ratio(ai, ai_ref), ag=R.rms_ratio(ag, ag_ref), gc=R.rms_ratio(gc, gc_ref),
                ai_max=float(np.abs(ai - ai_ref).max()), ag_max=float(np.abs(ag - ag_ref).max()),
                gc_max=float(np.abs(gc - gc_ref).max()))


# NaN / inf isolation (docs/RELIABILITY.md §2) in tiles shared by several sequences: 4 tiles of 64,
# each poisoned sequence between clean ones in a shared tile, sequence 0 with a whole tile of its own.
# Poisons that reach other sequences by different paths (k, v, g, beta) have a sequence each; q and
# the initial state, read by their own rows / CTA only, share one (few sequences: the interpreter's
# time grows with the CTAs).
NAN_LENS = [94, 12, 30, 9, 20, 14, 25, 6, 30]  # + 16 NaN tokens past cu[-1]: 256 in all
NAN_POISON = {1: (("k", np.nan), ("q", np.nan)), 3: (("v", np.inf), ("h0", np.nan)),
              5: (("g", np.nan), ("g", -np.inf)), 7: (("beta", np.nan),)}


def _nan_inputs(poison: bool, dv: int = 64):
    """(inputs of NAN_LENS, q/k/v/g/beta arrays, initial state), with NAN_POISON applied (the first
    poison of a sequence at its middle token, the second at its first) and NaN past cu[-1] when
    ``poison``; V = ``dv``."""
    from gdn.inputs import make_inputs

    x = make_inputs(NAN_LENS, h=1, hv=2, k=64, v=dv, initial_state=True, pad_tokens=16, seed=9)
    cu = x.cu_seqlens
    arrs = [a.copy() for a in x.arrays]
    h0 = x.initial_state.copy()
    if poison:
        for n, poisons in NAN_POISON.items():
            for (what, val), t in zip(poisons, ((cu[n] + cu[n + 1]) // 2, cu[n])):
                if what == "h0":
                    h0[n, 1, 2, 3] = val
                else:
                    arrs[("q", "k", "v", "g", "beta").index(what)][0, t] = val
        for a in arrs:
            a[0, cu[-1]:] = np.nan
    return x, arrs, h0


def _nan_isolation(variant="", interpret=True, dv=64):
    """A clean call and a poisoned one (:func:`_nan_inputs`, V = ``dv``): which clean sequences' o or
    final state changed in any bit, which are not finite, whether the poisoned ones did turn non-finite."""
    import warnings

    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M

    runs, clean_args = [], None
    for poison in (False, True):
        x, arrs, h0 = _nan_inputs(poison, dv)
        cu = x.cu_seqlens
        p = make_plan(cu, num_tokens=x.q.shape[1])
        q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in arrs[:3])
        _, args = api.validate(q, k, v, jnp.asarray(arrs[3]), jnp.asarray(arrs[4]), plan=p,
                               initial_state=jnp.asarray(h0), backend="jax")
        if not poison:
            clean_args = args
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            o, f = M.run(args, interpret=interpret, **VARIANT_OPTS[variant])
            runs.append((np.asarray(o, np.float32)[0], np.asarray(f)))
    (o_c, f_c), (o_p, f_p) = runs
    seqs = range(len(NAN_LENS))
    same_bits = None
    if variant != "fused":  # the intra kernel's selects on every tile: the same bits on the clean inputs
        o_a, f_a = M.run(clean_args, interpret=interpret, intra_isolate="all", **VARIANT_OPTS[variant])
        same_bits = bool(np.array_equal(np.asarray(o_a, np.float32)[0], o_c) and np.array_equal(np.asarray(f_a), f_c))
    return dict(
        isolate_all_same_bits=same_bits,
        changed=[n for n in seqs if n not in NAN_POISON and not (
            np.array_equal(o_p[cu[n]:cu[n + 1]], o_c[cu[n]:cu[n + 1]]) and np.array_equal(f_p[n], f_c[n]))],
        clean_finite=bool(np.isfinite(o_c).all() and np.isfinite(f_c).all()),
        dirty_finite=[n for n in seqs if n not in NAN_POISON and not (
            np.isfinite(o_p[cu[n]:cu[n + 1]]).all() and np.isfinite(f_p[n]).all())],
        poisoned_nonfinite=[n for n in NAN_POISON if not (
            np.isfinite(o_p[cu[n]:cu[n + 1]]).all() and np.isfinite(f_p[n]).all())],
        tail_zero=bool(np.all(o_p[cu[-1]:] == 0)))


def _nan_intra_args(poison: bool):
    """(cu_seqlens, (k, g_hm, beta_hm, seg)): the intra kernel's arguments from :func:`_nan_inputs`."""
    import jax.numpy as jnp

    x, arrs, _ = _nan_inputs(poison)
    cu = x.cu_seqlens
    k = jnp.asarray(arrs[1][0], jnp.bfloat16)
    g_hm, b_hm = (jnp.asarray(a[0].T, jnp.float32) for a in arrs[3:5])
    seg = jnp.asarray(np.searchsorted(cu[1:], np.arange(x.q.shape[1]), side="right"), jnp.int32)
    return cu, (k, g_hm, b_hm, seg)


def _intra_nan_isolation(head_loop="unroll", interpret=True, **intra_kw):
    """The intra kernel on the clean and the poisoned k / g / beta of
    :func:`_nan_inputs`: the clean sequences' rows of Ag and gc must be bitwise equal (and finite).
    The chunk loop behind them is the one the whole-prefill checks run."""
    from gdn.jax_backend.mosaic_gpu.intra import intra

    outs = []
    for poison in (False, True):
        cu, args = _nan_intra_args(poison)
        ag, gc = intra(*args, group=2, tiles_per_cta=2, head_loop=head_loop, interpret=interpret, **intra_kw)
        outs.append([np.asarray(a, np.float32) for a in (ag, gc)])
    (ag_c, gc_c), (ag_p, gc_p) = outs
    clean = [n for n in range(len(NAN_LENS)) if n not in NAN_POISON]
    rows = np.concatenate([np.arange(cu[n], cu[n + 1]) for n in clean])
    return dict(rows_changed=int(np.sum(~(np.all(ag_p[:, rows] == ag_c[:, rows], axis=(0, 2))
                                          & np.all(gc_p[:, rows] == gc_c[:, rows], axis=0)))),
                clean_finite=bool(np.isfinite(ag_c).all() and np.isfinite(gc_c).all()),
                dirty_finite=bool(np.isfinite(ag_p[:, rows]).all() and np.isfinite(gc_p[:, rows]).all()))


def _loop_io_bits(loop, interpret=True, dv=128, l2=False, **options):
    """The chunk loop ``loop`` ("wide" / "narrow") with ``options`` (``loop_direct_io=True``, the wide
    loop's persistent ``loop_ctas``) against the plain loop (those options off) on the clean and the poisoned inputs of
    :func:`_nan_inputs` (an initial state with a NaN in one sequence's, 9 sequences in 16 grid rows):
    o and the final state must be the same bits (NaN where NaN): only the way the state enters and
    leaves, or which CTA walks which (sequence, head), changes. ``l2``: with use_qk_l2norm."""
    import warnings

    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M

    out = {}
    for poison in (False, True):
        x, arrs, h0 = _nan_inputs(poison, dv)
        p = make_plan(x.cu_seqlens, num_tokens=x.q.shape[1])
        q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in arrs[:3])
        _, args = api.validate(q, k, v, jnp.asarray(arrs[3]), jnp.asarray(arrs[4]), plan=p,
                               initial_state=jnp.asarray(h0), backend="jax", use_qk_l2norm=l2)
        runs = []
        # the baseline is the plain loop, not the defaults (which turn some of these options on)
        base = dict(loop_direct_io=False, loop_prefetch=False, loop_overlap=False, loop_schedule="order")
        for opts in (base, dict(base, **options)):
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                o, f = M.run(args, interpret=interpret, chunk_variant="wide" if loop == "wide" else "default",
                             **opts)
            runs.append((np.asarray(o, np.float32), np.asarray(f)))
        (o_s, f_s), (o_d, f_d) = runs
        tag = "poisoned" if poison else "clean"
        out[tag + "_same_bits"] = bool(np.array_equal(o_s, o_d, equal_nan=True)
                                       and np.array_equal(f_s, f_d, equal_nan=True))
        out[tag + "_nonfinite"] = int((~np.isfinite(f_d)).any(axis=(1, 2, 3)).sum())
    return out


def _intra_isolate_bits(interpret=True):
    """The intra kernel with isolate="boundary" (a tile of one sequence runs without selects) and
    "all" on the clean inputs of :func:`_nan_inputs` (tile 0 is sequence 0's alone, the others are
    shared): the outputs must be the same bits."""
    from gdn.jax_backend.mosaic_gpu.intra import intra

    _, args = _nan_intra_args(False)
    outs = [[np.asarray(a, np.float32) for a in intra(*args, group=2, tiles_per_cta=2, isolate=iso,
                                                       interpret=interpret)]
            for iso in ("boundary", "all")]
    seg = np.asarray(args[3]).reshape(-1, 64)
    single = seg[:, 0] == seg[:, -1]
    (ag_b, gc_b), (ag_a, gc_a) = outs
    return dict(single_tiles=int(single.sum()), shared_tiles=int((~single).sum()),
                ag_diff=float(np.abs(ag_b - ag_a).max()), gc_diff=float(np.abs(gc_b - gc_a).max()),
                finite=bool(np.isfinite(ag_b).all()))


def _timed(results, name, fn):
    """results[name] = fn() (or the error it raised), with its seconds; printed as it goes."""
    t0 = time.time()
    try:
        res = fn()
    except Exception as e:  # reported to the test, which fails with the message
        res = dict(name=name, error=f"{type(e).__name__}: {e}"[:2000])
    res["seconds"] = round(time.time() - t0, 1)
    results[name] = res
    print(json.dumps(res), flush=True)


def _main_interpret_cases(path):
    import jax

    results = {}
    _timed(results, "intra_stage", _intra_stage_errors)
    _timed(results, "intra_stage_levels", lambda: _intra_stage_errors(merge_variant="levels"))
    _timed(results, "intra_stage_all", lambda: _intra_stage_errors(isolate="all"))
    _timed(results, "intra_stage_buf1", lambda: _intra_stage_errors(out_buffers=1))
    _timed(results, "intra_isolate_bits", _intra_isolate_bits)
    for case in CASES:
        _timed(results, case[0], lambda case=case: _run_case(*case))
    _timed(results, "nan_isolation_default", lambda: _nan_isolation(""))
    _timed(results, "nan_isolation_fused", lambda: _nan_isolation("fused"))
    # V = 128: two state warpgroups sharing the boundary tiles' zeroed k (the k_ready hop)
    _timed(results, "nan_isolation_wide", lambda: _nan_isolation("wide", dv=128))
    _timed(results, "nan_isolation_wide_plain", lambda: _nan_isolation("wide_plain", dv=128))
    _timed(results, "nan_isolation_narrow_plain", lambda: _nan_isolation("narrow_plain", dv=128))
    _timed(results, "narrow_ablations", _narrow_ablations_change_output)
    _timed(results, "direct_io_bits_wide", lambda: _loop_io_bits("wide", loop_direct_io=True))
    _timed(results, "direct_io_bits_narrow", lambda: _loop_io_bits("narrow", loop_direct_io=True))
    # 34 (sequence row, head) items on 3 persistent CTAs: empty sequences and the tail row in the stream
    # (with its items read from the per-CTA table, the L2 prefetch of each item's initial state, a
    # hint, and the output store deferred into the next tile, across items too: none may change a
    # bit; the float64 case wide_persist_jit runs the grid without them, its items by the ranking)
    _timed(results, "persistent_bits_wide", lambda: _loop_io_bits("wide", loop_ctas=3, loop_prefetch=True,
                                                                  loop_overlap=True, loop_schedule="table"))
    # each item's initial state loaded into the state warpgroups' own SMEM staging an item ahead
    _timed(results, "persistent_h0smem_bits_wide", lambda: _loop_io_bits("wide", loop_ctas=3, loop_prefetch="smem",
                                                                        loop_schedule="table"))
    _timed(results, "overlap_bits_wide", lambda: _loop_io_bits("wide", loop_overlap=True))
    _timed(results, "overlap_bits_narrow", lambda: _loop_io_bits("narrow", loop_overlap=True))
    # the wide loop's output store issued in the next tile's shadow (loop_overlap="store"); on the
    # persistent grid the staged tile must leave before the tail row's zeros reuse its SMEM
    _timed(results, "store_bits_wide", lambda: _loop_io_bits("wide", loop_overlap="store"))
    _timed(results, "persistent_store_bits_wide", lambda: _loop_io_bits("wide", loop_ctas=3, loop_prefetch=True,
                                                                        loop_overlap="store",
                                                                        loop_schedule="table"))
    # the whole-prefill cases above walk the intra kernel's heads in a loop and merge its inverse in a
    # chain (the defaults); this one unrolls them and merges by levels
    _timed(results, "nan_isolation_intra_unroll", lambda: _intra_nan_isolation("unroll", merge_variant="levels"))
    with open(path, "w") as fh:
        json.dump(results, fh)
    assert jax.device_count() >= 3


def _coresident_bits(l2: bool, intra_warpgroups: int, sms: int, p: bool = False, together: bool = False,
                     lag: int = 0):
    """variant="coresident" (:mod:`gdn.jax_backend.mosaic_gpu.coresident`: intra workers and the
    narrow loop in one launch) against the narrow loop after the intra kernel on :func:`_loop_io_bits`'
    clean and poisoned inputs (V = 64): the same bits. ``l2``: use_qk_l2norm, the row norms from the
    workers (2 a CTA); ``sms``: the SMs the kernel sizes its workers for (few here: the interpreter
    runs each CTA in turn); ``p``: the workers also form P for the loop (``coresident_p``);
    ``together``: their Q K^T and K K^T as one group (``coresident_p_together``); ``lag``:
    ``coresident_flag_lag`` (the interpreter has no flags, but runs the lag's waits)."""
    return _loop_io_bits("narrow", dv=64, l2=l2, variant="coresident", intra_warpgroups=intra_warpgroups,
                         intra_solve="warp", coresident_sms=sms, coresident_p=p, coresident_p_together=together,
                         coresident_flag_lag=lag)


CORESIDENT_CASES = {  # name -> _coresident_bits' arguments (9 sequences pad to 16 rows: 32 loop CTAs)
    "coresident_bits": dict(l2=False, intra_warpgroups=3, sms=72),
    "coresident_w2_l2_bits": dict(l2=True, intra_warpgroups=2, sms=66),
    # P from the workers (2 a CTA: q's tile), read by the loop's output warpgroup from SMEM
    "coresident_p_bits": dict(l2=False, intra_warpgroups=2, sms=70, p=True),
    "coresident_p_l2_bits": dict(l2=True, intra_warpgroups=2, sms=66, p=True),
    "coresident_p_together_lag_l2_bits": dict(l2=True, intra_warpgroups=2, sms=66, p=True, together=True, lag=1),
}


def _coresident_order_bits():
    """The co-resident kernel with its loop CTAs walking the sequences in a permuted order (what
    :func:`gdn.jax_backend.mosaic_gpu.coresident.long_first` picks for a host plan) against two kernels
    on :func:`_nan_inputs`' clean and poisoned inputs (9 sequences in 16 rows): the same bits, so
    every sequence row is walked once, by the CTAs of its own row's heads and V halves."""
    import warnings

    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.jax_backend.common import run_core
    from gdn.jax_backend.mosaic_gpu._driver import core

    out = {}
    for poison in (False, True):
        x, arrs, h0 = _nan_inputs(poison, 64)
        p = make_plan(x.cu_seqlens, num_tokens=x.q.shape[1])
        q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in arrs[:3])
        _, args = api.validate(q, k, v, jnp.asarray(arrs[3]), jnp.asarray(arrs[4]), plan=p,
                               initial_state=jnp.asarray(h0), backend="jax")
        order = tuple(range(p.padded_seqs))[::-1]  # every row moves, the empty and padding rows too
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = M.run(args, interpret=True, chunk_variant="default", loop_overlap=True)
            got = run_core(core, args, interpret=True, variant="coresident", chunk_variant="default",
                           loop_overlap=True, loop_schedule="order", intra_warpgroups=3, intra_solve="warp",
                           coresident_sms=40, coresident_seqs=1, coresident_order=order)[:2]
        tag = "poisoned" if poison else "clean"
        out[tag + "_same_bits"] = all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                     equal_nan=True) for a, b in zip(ref, got))
        out[tag + "_nonfinite"] = int((~np.isfinite(np.asarray(got[1]))).any(axis=(1, 2, 3)).sum())
    return out


def _main_coresident_cases(path):
    results = {}
    for name, kw in CORESIDENT_CASES.items():
        _timed(results, name, lambda kw=kw: _coresident_bits(**kw))
    _timed(results, "coresident_order_bits", _coresident_order_bits)
    # a whole float64 case (G = 3, K = 128, fp16, use_qk_l2norm with the norms from the workers)
    case = next(c for c in CASES if c[0] == "G3_K128_fp16_l2norm")
    _timed(results, "coresident_G3_K128_fp16_l2norm", lambda: _run_case(case[0], case[1], case[2], case[3],
                                                                       "packed:coresident"))
    with open(path, "w") as fh:
        json.dump(results, fh)


def _interp_subprocess(tmp_path_factory, flag: str, devices: int):
    """Runs this file with ``flag`` in a fresh interpreter process on ``devices`` CPU devices (Mosaic's
    interpreter runs a CTA's warpgroups as threads whose callbacks need free devices: the co-resident
    kernel with use_qk_l2norm stalled on 4) and returns the JSON it wrote."""
    path = tmp_path_factory.mktemp("mosaic") / "results.json"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), flag, str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def coresident_results(tmp_path_factory):
    return _interp_subprocess(tmp_path_factory, "--coresident-cases", 8)


@pytest.mark.parametrize("name", list(CORESIDENT_CASES) + ["coresident_order_bits"])
def test_coresident_same_bits_as_two_kernels(coresident_results, name):
    """The co-resident kernel's o and final state are the two-kernel path's bits, clean and poisoned
    (NaN stays in its sequence there too). The interpreter runs its CTAs one after another, workers
    first, without the flags; the flags themselves are checked compiled (tests/gpu/mosaic_gpu_check.py
    --only coresident, which also runs the loop without waiting and must then see other bits)."""
    res = coresident_results[name]
    assert "error" not in res, res.get("error")
    assert res["clean_same_bits"] and res["poisoned_same_bits"], res
    assert res["clean_nonfinite"] == 0 and res["poisoned_nonfinite"] >= 1, res


def test_coresident_matches_float64(coresident_results):
    from gdn.tolerances import vs_f64
    res = coresident_results["coresident_G3_K128_fp16_l2norm"]
    assert "error" not in res, res.get("error")
    assert res["o"] < vs_f64(res["dtype"]) and res["tail"] == 0 and res.get("final", 0) < vs_f64(res["dtype"]), res


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return _interp_subprocess(tmp_path_factory, "--interpret-cases", 4)


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


@pytest.mark.parametrize("case", ["intra_stage", "intra_stage_levels", "intra_stage_all", "intra_stage_buf1"])
def test_intra_matches_float64_stages(interp_results, case):
    """The intra kernel (interpreter, 4 tiles in 2-tile CTAs, G = 3, varlen
    100/0/1/63/64/65 (a tile of one sequence, tiles of several), a padding tile; the default chain
    merge, the levels one, the selects on every tile, one output staging) against
    gdn.reference.chunked(stages=True): Ai and Ag at the bf16 bar, gc to fp32 rounding."""
    from gdn.tolerances import vs_f64

    res = interp_results[case]
    assert "error" not in res, res.get("error")
    assert res["ai"] < vs_f64("bfloat16") and res["ag"] < vs_f64("bfloat16"), res
    assert res["gc"] < 1e-6 and res["gc_max"] < 1e-5, res


def test_intra_isolate_boundary_same_bits(interp_results):
    """Tiles of one sequence skip the NaN-isolation selects (isolate="boundary"): the same bits as
    with the selects on every tile, on inputs with both kinds of tiles."""
    res = interp_results["intra_isolate_bits"]
    assert "error" not in res, res.get("error")
    assert res["single_tiles"] >= 1 and res["shared_tiles"] >= 1, res
    assert res["ag_diff"] == 0.0 and res["gc_diff"] == 0.0 and res["finite"], res


@pytest.mark.parametrize("variant", ["default", "fused", "wide", "wide_plain", "narrow_plain"])
def test_interpreter_nan_stays_in_its_sequence(interp_results, variant):
    """NaN / inf in one sequence's q, k, v, g, beta or initial state (NAN_POISON), NaN past cu[-1]:
    every other sequence's o and final state bitwise those of the clean call, the tail zero; the
    tiles mix poisoned and clean sequences (gdn issue 10, nan_isolation on the H200). The GPU-only
    code (the inline-MLIR substitution's select) is covered by tests/gpu/reliability_gpu_check.py.
    Sequence 0 has a tile of its own, which the intra kernel runs without its selects
    (intra_isolate="boundary"): the clean call gives the same bits with them on every tile ("all")."""
    res = interp_results["nan_isolation_" + variant]
    assert "error" not in res, res.get("error")
    assert res["isolate_all_same_bits"] is (None if variant == "fused" else True), res
    assert res["clean_finite"], res
    assert res["changed"] == [] and res["dirty_finite"] == [], res
    assert res["tail_zero"], res
    assert res["poisoned_nonfinite"] == sorted(NAN_POISON), res  # the poison did go in


@pytest.mark.parametrize("name", ["direct_io_bits_wide", "direct_io_bits_narrow", "persistent_bits_wide",
                                  "persistent_h0smem_bits_wide", "overlap_bits_wide", "overlap_bits_narrow",
                                  "store_bits_wide", "persistent_store_bits_wide"])
def test_interpreter_state_io_and_persistent_grid_same_bits(interp_results, name):
    """loop_direct_io=True (the initial / final state straight between global memory and registers)
    and the wide loop's persistent grid (loop_ctas: 3 CTAs walking 34 (row, head) items as one
    stream of tiles, with loop_prefetch and loop_overlap; with loop_prefetch="smem", each item's
    initial state staged in SMEM an item ahead) and loop_overlap alone (both loops) give
    the default loop's bits, on clean inputs and on inputs whose one
    sequence's initial state holds a NaN (which must stay in that sequence's final state only)."""
    res = interp_results[name]
    assert "error" not in res, res.get("error")
    assert res["clean_same_bits"] and res["poisoned_same_bits"], res
    assert res["clean_nonfinite"] == 0, res
    assert res["poisoned_nonfinite"] >= 1, res  # the poison did reach a final state


def test_interpreter_intra_unroll_nan_stays_in_its_sequence(interp_results):
    """The intra kernel with head_loop="unroll" and merge_variant="levels" (the whole-prefill cases
    above loop over the heads and merge in a chain) on the same poisoned k / g / beta: the clean sequences' rows of Ag and gc bitwise those of the
    clean call (what the chunk loop needs)."""
    res = interp_results["nan_isolation_intra_unroll"]
    assert "error" not in res, res.get("error")
    assert res["rows_changed"] == 0 and res["clean_finite"] and res["dirty_finite"], res


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
    with pytest.raises(NotImplementedError, match="wide"):
        M.run(args_for(jnp.bfloat16, v=256), interpret=True, chunk_variant="wide")
    with pytest.raises(ValueError, match="chunk_variant"):
        M.run(args_for(jnp.bfloat16), interpret=True, chunk_variant="narrow")
    with pytest.raises(ValueError, match="chunk_variant"):
        M.run(args_for(jnp.bfloat16), interpret=True, variant="coresident", chunk_variant="wide")
    with pytest.raises(ValueError, match="co-resident"):  # the loop would take most SMs: no room for workers
        M.run(args_for(jnp.bfloat16), interpret=True, variant="coresident", coresident_sms=4)
    for bad, exc in ((dict(intra_pad=6), ValueError), (dict(intra_pad=-8), ValueError),
                     (dict(intra_merge="tree"), ValueError), (dict(intra_columns="False"), TypeError),
                     (dict(intra_isolate="none"), ValueError), (dict(intra_out_buffers=3), ValueError),
                     (dict(loop_lean=1), TypeError), (dict(loop_bare="yes"), TypeError),
                     (dict(loop_direct_io=None), TypeError), (dict(loop_ctas=0), ValueError),
                     (dict(loop_ctas=True), ValueError), (dict(loop_ctas="many"), ValueError),
                     (dict(loop_prefetch=1), TypeError), (dict(loop_overlap="no"), TypeError),
                     (dict(loop_schedule="lookup"), ValueError), (dict(intra_solve="regs"), ValueError),
                     (dict(intra_solve="warp", intra_columns=False), ValueError),
                     (dict(intra_warpgroups=2), ValueError), (dict(intra_warpgroups=3), ValueError),
                     (dict(intra_warpgroups=4, intra_solve="warp"), ValueError),
                     (dict(coresident_sms=1, variant="coresident"), ValueError),
                     (dict(coresident_seqs=0, variant="coresident"), ValueError),
                     (dict(coresident_seqs=True, variant="coresident"), ValueError),
                     (dict(coresident_p=1), TypeError), (dict(coresident_p="on"), TypeError),
                     (dict(coresident_flag_lag=2), ValueError), (dict(coresident_flag_lag=True), ValueError),
                     (dict(coresident_p_together=1), TypeError)):
        with pytest.raises(exc, match=next(iter(bad))):
            M.run(args_for(jnp.bfloat16), interpret=True, **bad)
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


@pytest.mark.parametrize("hv,tiles", [(2, None), (1, 1)])
def test_intra_kernel_computes_the_qk_norms(hv, tiles):
    """use_qk_l2norm's row norms from the intra kernel (the diagonals of Q Q^T and K K^T) equal
    XLA's reductions (qk_norms="xla") to fp32 rounding, and the inverse it writes is the same;
    four tiles per CTA reuse the norms' SMEM slots (G = 2), one tile per CTA with G = 1."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver as D

    rng = np.random.default_rng(hv)
    lens = [100, 1, 64, 67]  # 232 tokens: the last tile's 24 rows past the arrays read as zeros
    t, cu = sum(lens), np.concatenate([[0], np.cumsum(lens)])
    row_scale = np.exp(rng.uniform(-2.0, 2.0, (2, 1, t, 1, 1)))  # norms that differ row to row
    q = jnp.asarray(rng.standard_normal((1, t, 1, 64)) * row_scale[0], jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, t, 1, 64)) * row_scale[1], jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, t, hv, 64)), jnp.bfloat16)
    g = jnp.asarray(-rng.uniform(0.01, 0.3, (1, t, hv)), jnp.float32)
    b = jnp.asarray(rng.uniform(0.1, 0.9, (1, t, hv)), jnp.float32)
    p = make_plan(cu, num_tokens=t)
    _, a = api.validate(q, k, v, g, b, plan=p, use_qk_l2norm=True, backend="jax")
    ref, mine = (D.prepare(a.q, a.k, a.v, a.g, a.beta, p.to_jax(), None, True, qk_norms=n) for n in ("xla", "intra"))
    assert mine.lrq is None and mine.lrk is None and ref.lrk is not None
    ag0, gc0, _ = D.run_intra(ref, True, tiles_per_cta=tiles, interpret=True)
    ag1, gc1, out = D.run_intra(mine, True, tiles_per_cta=tiles, interpret=True)
    for name in ("lrq", "lrk"):
        want, got = np.asarray(getattr(ref, name))[:, :t], np.asarray(getattr(out, name))[:, :t]
        assert np.abs(got - want).max() < 1e-5, name
        assert np.ptp(want) > 1.0, name  # the rows' norms differ: a constant could not pass
    assert np.abs(np.asarray(ag0, np.float32) - np.asarray(ag1, np.float32)).max() < 1e-3
    assert np.array_equal(np.asarray(gc0), np.asarray(gc1))
    with pytest.raises(ValueError, match="qk_norms"):
        D.prepare(a.q, a.k, a.v, a.g, a.beta, p.to_jax(), None, True, qk_norms="host")


def test_loop_out_store_is_checked_by_name():
    """A misspelled ``loop_out_store`` and one the wide loop's plain order cannot take are refused by
    name before anything compiles."""
    import jax.numpy as jnp
    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver as D
    t, hv = 70, 2
    z = lambda *shape: jnp.zeros(shape, jnp.bfloat16)  # noqa: E731
    g, b = jnp.zeros((1, t, hv), jnp.float32), jnp.ones((1, t, hv), jnp.float32)
    _, a = api.validate(z(1, t, 1, 64), z(1, t, 1, 64), z(1, t, hv, 64), g, b, plan=make_plan([0, t], num_tokens=t),
                        backend="jax")
    with pytest.raises(ValueError, match="loop_out_store"):
        D.prefill_arrays(a, interpret=True, loop_out_store="smem")
    with pytest.raises(ValueError, match="loop_out_store='warp' runs with loop_overlap"):
        D.prefill_arrays(a, interpret=True, chunk_variant="wide", loop_out_store="warp", loop_overlap=True)


def test_loop_option_defaults_resolve_per_loop(monkeypatch):
    """loop_overlap="auto" is on for the narrow loop and off for the wide one (the H200's verdict,
    session 12); an explicit bool wins; the persistent grid's table and prefetch are on by default;
    the split resolves "auto" on its pass-2 loop the same way."""
    import jax.numpy as jnp

    from gdn import api
    from gdn.jax_backend.mosaic_gpu import _driver

    seen = []
    monkeypatch.setattr(_driver, "run_core", lambda core, args, **kw: seen.append(kw))
    q = jnp.zeros((1, 70, 1, 64), jnp.bfloat16)
    g = jnp.zeros((1, 70, 2), jnp.float32)
    args = api.validate(q, q, jnp.zeros((1, 70, 2, 64), jnp.bfloat16), g, g, cu_seqlens=[0, 30, 70],
                        backend="jax")[1]
    for opts in (dict(chunk_variant="default"), dict(chunk_variant="wide"),
                 dict(chunk_variant="default", loop_overlap=False), dict(chunk_variant="wide", loop_overlap=True)):
        _driver.prefill_arrays(args, interpret=True, **opts)
    assert [kw["loop_overlap"] for kw in seen] == [True, False, False, True]
    assert all(kw["loop_schedule"] == "table" and kw["loop_prefetch"] for kw in seen)
    assert _driver.resolve_loop_overlap("auto", "default") and not _driver.resolve_loop_overlap("auto", "wide")
    # "store" is the wide loop's own option; the narrow loop takes "auto"'s choice
    assert _driver.resolve_loop_overlap("store", "wide") == "store"
    assert _driver.resolve_loop_overlap("store", "default") is True


def test_kernels_check_their_token_and_scale_operands():
    """The kernels' operands that the driver derives (a partial last tile of q, k, v; use_qk_l2norm's
    row scales) are checked before anything is traced: a wrong pairing raises, naming the operand."""
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.chunk_loop import chunk_loop
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide
    from gdn.jax_backend.mosaic_gpu.intra import intra

    t, t_pad, h, hv, d = 72, 128, 1, 2, 64
    k = jnp.zeros((t, h, d), jnp.bfloat16)
    g = jnp.zeros((hv, t_pad), jnp.float32)
    seg = jnp.zeros((t_pad,), jnp.int32)
    with pytest.raises(ValueError, match="lrk must have shape"):
        intra(k, g, g, seg, group=2, lrk=jnp.zeros((h, t), jnp.float32), interpret=True)
    for rows in (t_pad + 1, t_pad - 64):  # k must end inside g's last tile
        with pytest.raises(ValueError, match="whole tiles"):
            intra(jnp.zeros((rows, h, d), jnp.bfloat16), g, g, seg, group=2, interpret=True)
    with pytest.raises(ValueError, match="whole tiles"):
        intra(k, g[:, :100], g[:, :100], seg[:100], group=2, interpret=True)
    with pytest.raises(ValueError, match="multiple of 8"):  # TMA tiles the rows in groups of 8
        intra(k[:70], g, g, seg, group=2, interpret=True)
    v = jnp.zeros((t, hv, d), jnp.bfloat16)
    ag = jnp.zeros((hv, t_pad, 64), jnp.bfloat16)
    cu = jnp.asarray([0, t], jnp.int32)
    lr = jnp.zeros((h, t_pad), jnp.float32)
    for loop in (chunk_loop, chunk_loop_wide):
        with pytest.raises(ValueError, match="multiple of 8"):
            loop(k[:70], k[:70], v[:70], ag, g, cu, None, scale=0.1, group=2, n_out=None, t_valid=70, interpret=True)
        for one in (dict(lrq=lr), dict(lrk=lr)):
            with pytest.raises(ValueError, match="lrq and lrk"):
                loop(k, k, v, ag, g, cu, None, scale=0.1, group=2, n_out=None, t_valid=t, interpret=True, **one)


def _lower_for_cuda(fn, *args):
    import jax
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_one_prompt_default_lowers_with_p_from_workers(monkeypatch):
    """One prompt at the Qwen3.5 head counts, jitted with a device plan (what a server runs) and with
    a host plan: the default route is the co-resident kernel with P from the workers
    (``coresident_p="auto"``), and it lowers for an H200 without an XLA while loop; with
    use_qk_l2norm, without P."""
    import jax
    import jax.numpy as jnp

    import gdn
    from gdn import api
    from gdn.jax_backend.mosaic_gpu import _driver as D

    seen = []
    real = D.coresident

    def spy(*a, **kw):
        seen.append(kw["p_from_workers"])
        return real(*a, **kw)

    monkeypatch.setattr(D, "coresident", spy)
    t = 2112
    sds = jax.ShapeDtypeStruct
    q, v, g = sds((1, t, 16, 128), jnp.bfloat16), sds((1, t, 32, 128), jnp.bfloat16), sds((1, t, 32), jnp.float32)
    host = gdn.plan([0, t], num_tokens=t)

    def fn(q, k, v, g, b, plan, l2):  # gdn.prefill's route on a GPU (it refuses a CPU-only host first)
        return D.prefill_arrays(api.validate(q, k, v, g, b, plan=plan, use_qk_l2norm=l2, backend="jax")[1])

    for traced, l2 in ((True, False), (False, False), (False, True)):
        seen.clear()
        jax.clear_caches()  # the jitted core would not trace again for a plan of the same avals
        text = _lower_for_cuda(lambda *a, pl=host.to_jax() if traced else host, l2=l2: fn(*a, pl, l2),
                               q, q, v, g, g).as_text()
        assert "gdn_coresident" in text and seen == [not l2], (traced, l2, seen)
        # no XLA while loop before the kernel: the sequence ids over one boundary (jax's unrolled
        # binary search still loops there) are one compare
        assert "stablehlo.while" not in text, (traced, l2)


def test_long_first_cross_lowers_to_cuda():
    """A short prompt, then a long one (a host plan, and a device plan as an argument of the jitted
    call): variant="auto" picks the co-resident kernel with the long prompt's CTAs first
    (:func:`gdn.jax_backend.mosaic_gpu._driver.pick_long_first`), and it lowers for an H200."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu._driver import pick_long_first, prefill_arrays

    t = 2112
    p = make_plan([0, 64, t], num_tokens=t)
    sds = jax.ShapeDtypeStruct
    q, v, g = sds((1, t, 16, 128), jnp.bfloat16), sds((1, t, 32, 128), jnp.bfloat16), sds((1, t, 32), jnp.float32)

    def fn(q, k, v, g, beta, plan):
        _, args = api.validate(q, k, v, g, beta, plan=plan, backend="jax")
        assert pick_long_first(args, "auto", 64, False, True, None, None) == (1, 0)
        return prefill_arrays(args)

    text = _lower_for_cuda(lambda *a: fn(*a, p), q, q, v, g, g).as_text()
    assert "gdn_coresident" in text and "gdn_intra" not in text
    # jitted with the plan an argument (a device plan: its dominant sequence is static)
    dp = p.to_jax()
    jax.clear_caches()
    text = _lower_for_cuda(fn, q, q, v, g, g, dp).as_text()
    assert "gdn_coresident" in text and "gdn_intra" not in text


@pytest.mark.parametrize("dk,dv,h,hv,dtype,with_h0,final,variant", [
    (128, 128, 16, 32, "bfloat16", True, True, "two_kernels"),   # the Qwen3.5 head shape
    (64, 128, 1, 3, "float16", False, False, "two_kernels"),
    (128, 128, 16, 32, "bfloat16", True, True, "fused"),
    (128, 128, 16, 32, "bfloat16", True, True, "wide"),          # chunk_variant="wide"
    (64, 64, 1, 3, "float16", False, False, "wide"),             # one state warpgroup
    (128, 128, 16, 32, "bfloat16", True, True, "wide_plain"),    # with its selects and automatic barriers
    (128, 128, 16, 32, "bfloat16", True, True, "wide_direct"),   # state I/O without SMEM staging
    (128, 128, 16, 32, "bfloat16", True, True, "narrow_direct"),
    (128, 128, 16, 32, "bfloat16", True, True, "wide_persist"),  # a persistent grid (loop_ctas)
    (128, 128, 16, 32, "bfloat16", True, False, "wide_persist_pf"),  # its L2 prefetch of h0, the item table
    (128, 128, 16, 32, "bfloat16", True, True, "wide_overlap"),  # the output store during the next products
    (128, 128, 16, 32, "bfloat16", True, True, "narrow_overlap"),  # the publications during the products
    (128, 128, 16, 32, "bfloat16", True, True, "wide_store"),  # only the output store's issue deferred
    # loop_halves: a traced plan whose bucket wants both loops (HV = 32, 3..8 sequences)
    (128, 128, 16, 32, "bfloat16", True, True, "wide_halves"),
    (64, 128, 16, 32, "float16", False, True, "wide_halves"),
    # one kernel: the wide loop's prep warpgroup doing the intra work
    (128, 128, 16, 32, "bfloat16", True, True, "fused_wide"),
    (64, 64, 1, 3, "float16", False, False, "fused_wide"),
    (128, 128, 16, 32, "bfloat16", True, True, "fused_wide_mma"),  # its intra work by warp-level MMA
    (64, 64, 1, 3, "float16", False, False, "fused_wide_mma"),
    # the intra workers and the narrow loop in one launch (one sequence's worth of loop CTAs)
    (128, 128, 16, 32, "bfloat16", True, True, "coresident"),
    (64, 128, 16, 32, "float16", False, False, "coresident_l2"),  # the row norms from the workers
    (128, 128, 16, 32, "bfloat16", True, True, "coresident_p"),  # and P for the loop's output warpgroup
    (128, 128, 16, 32, "bfloat16", True, True, "coresident_p_l2"),
    # each item's flag an item late, the workers' Q K^T and K K^T as one group
    (64, 128, 16, 32, "bfloat16", True, True, "coresident_p_tog_lag_l2"),
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
                               backend="jax", use_qk_l2norm=variant.endswith("_l2"))
        if variant.startswith("coresident"):
            return prefill_arrays(args, variant="coresident", coresident_seqs=1,
                                  coresident_p=variant.startswith("coresident_p"),
                                  coresident_flag_lag=int("_lag" in variant),
                                  coresident_p_together="_tog" in variant)
        if variant == "wide_store":
            return prefill_arrays(args, chunk_variant="wide", loop_overlap="store")
        if variant.endswith("_overlap"):
            return prefill_arrays(args, chunk_variant="wide" if variant.startswith("wide") else "default",
                                  loop_overlap=True)
        if variant == "wide_halves":
            return prefill_arrays(args, loop_halves=True)
        if variant.startswith("wide_persist"):
            pf = variant.endswith("_pf")  # with the L2 prefetch and the item table
            return prefill_arrays(args, chunk_variant="wide", loop_ctas=132, loop_prefetch=pf,
                                  loop_schedule="table" if pf else "order")
        if variant.endswith("_direct"):
            return prefill_arrays(args, chunk_variant="wide" if variant.startswith("wide") else "default",
                                  loop_direct_io=True)
        if variant.startswith("wide"):
            plain = variant == "wide_plain"
            return prefill_arrays(args, chunk_variant="wide", loop_lean=not plain, loop_bare=not plain)
        return prefill_arrays(args, variant=variant)

    lowered = _lower_for_cuda(fn, q, q, v, g, g, h0, p.to_jax())
    text = lowered.as_text()
    assert "mosaic_gpu" in text or "custom_call" in text
    # no XLA while loop around the kernels (the sequence ids' binary search ran as one on the H200:
    # ~16 small kernels and copies per call)
    assert "stablehlo.while" not in text
    if variant.startswith("wide"):
        assert "gdn_chunk_loop_wide" in text
    if variant.startswith(("fused", "coresident")):
        assert "gdn_intra" not in text
    else:
        assert "gdn_intra" in text
    if variant.startswith("coresident"):
        assert "gdn_coresident" in text and "gdn_chunk_loop" not in text
    if variant.startswith("fused_wide"):
        assert "gdn_chunk_loop_wide" in text


@pytest.mark.parametrize("chunk_variant,split,l2norm,t", [
    ("wide", False, False, 200), ("default", False, False, 200), ("default", True, False, 200),
    ("wide", False, True, 200), ("default", False, True, 200), ("wide", True, True, 200),
    ("wide", False, True, 100), ("default", True, False, 100)])
def test_unaligned_tokens_and_l2norm_cost_no_copy(chunk_variant, split, l2norm, t):
    """A batch whose token count is not a multiple of 64 reaches the kernels without a padded copy
    of q, k or v, and o leaves them without a slice: the lowered prefill (H200 target, the Qwen3.5
    head shape, 200 tokens) holds no pad or slice of a 16-bit array (the gates' padding is fp32 and
    rides in their transpose). A count TMA cannot tile (100: not a multiple of 8, which Mosaic GPU
    refuses at lowering and the interpreter does not) lowers, padded to 104 rows and sliced back. With use_qk_l2norm, no normalized copy of q or k either (no convert
    to a 16-bit array: the kernels fold the row scales into their factors). The interpreter cases
    check the values of such batches (TMA reads a partial last tile as zeros past the array, the
    interpreter models it) and of the folded scales."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu._driver import prefill_arrays
    from gdn.jax_backend.mosaic_gpu.split import core_split

    h, hv, dk, dv = 16, 32, 128, 128
    sds = jax.ShapeDtypeStruct
    q = sds((1, t, h, dk), jnp.bfloat16)
    v = sds((1, t, hv, dv), jnp.bfloat16)
    g = sds((1, t, hv), jnp.float32)
    cu = [0, t * 3 // 4, t]
    p = make_plan(cu, num_tokens=t)
    if split:
        from gdn.planner import split_pieces
        from gdn.split import two_pass_tables

        sp = split_pieces(cu, 1)
        pp = make_plan(sp.piece_cu_seqlens, num_tokens=t)
        tables = two_pass_tables(sp, p.padded_seqs, pp.padded_seqs)

        def fn(q, k, v, g, beta, plan):
            tabs = {name: jnp.asarray(a) for name, a in tables.items()}
            return core_split(q, k, v, g, beta, plan, None, tabs, scale=dk ** -0.5, use_qk_l2norm=l2norm,
                              output_final_state=True, chunk_variant=chunk_variant)[:2]
        text = _lower_for_cuda(fn, q, q, v, g, g, pp.to_jax()).as_text()
    else:

        def fn(q, k, v, g, beta, plan):
            _, args = api.validate(q, k, v, g, beta, plan=plan, use_qk_l2norm=l2norm, backend="jax")
            return prefill_arrays(args, chunk_variant=chunk_variant)
        text = _lower_for_cuda(fn, q, q, v, g, g, p.to_jax()).as_text()
    assert "custom_call" in text
    copies = [line.strip() for line in text.splitlines()  # (a scalar convert: a pad's zero)
              if any(f"stablehlo.{op}" in line for op in ("pad", "slice", "convert"))
              and "xbf16>" in line.split("->")[-1]]
    if t % 8:  # q, k, v padded to 104 rows, o sliced back to 100: nothing else
        assert copies and all(line.split("->")[-1].strip().startswith(("tensor<104x", "tensor<100x"))
                              for line in copies), copies
    else:
        assert not copies, copies


@pytest.mark.parametrize("chunk_variant,with_h0,direct,scan,overlap", [
    ("wide", True, False, "xla", False), ("default", False, False, "xla", False), ("wide", True, True, "xla", False),
    ("default", True, True, "xla", False), ("wide", True, False, "kernel", False),
    ("default", False, False, "kernel", False), ("default", True, False, "kernel", True)])
def test_two_pass_split_cross_lowers_to_cuda(chunk_variant, with_h0, direct, scan, overlap):
    """The exact split's two passes (intra on the piece plan, pass 1 piece_states, the scan, pass 2
    chunk loop) lower for an H200 at the Qwen3.5 head shape: the interpreter cases do not compile
    pass 1's kernel for the GPU."""
    import jax
    import jax.numpy as jnp

    from gdn import plan as make_plan
    from gdn.jax_backend.mosaic_gpu.split import core_split
    from gdn.planner import split_pieces
    from gdn.split import two_pass_tables

    t, h, hv, d = 512, 16, 32, 128
    cu = [0, 300, 300, 512]
    p = make_plan(cu, num_tokens=t)
    sp = split_pieces(cu, 2)
    pp = make_plan(sp.piece_cu_seqlens, num_tokens=t)
    tables = two_pass_tables(sp, p.padded_seqs, pp.padded_seqs)
    assert int((tables["mode"] > 0).sum()) >= 2  # pass 1 has work: a first and a later piece
    sds = jax.ShapeDtypeStruct
    q, v = sds((1, t, h, d), jnp.bfloat16), sds((1, t, hv, d), jnp.bfloat16)
    g = sds((1, t, hv), jnp.float32)
    h0 = sds((p.padded_seqs, hv, d, d), jnp.float32) if with_h0 else None

    def fn(q, k, v, g, beta, h0, plan):
        tabs = {name: jnp.asarray(a) for name, a in tables.items()}
        return core_split(q, k, v, g, beta, plan, h0, tabs, scale=d ** -0.5, use_qk_l2norm=True,
                          output_final_state=True, chunk_variant=chunk_variant, loop_direct_io=direct,
                          loop_overlap=overlap, scan=scan)[:2]

    text = _lower_for_cuda(fn, q, q, v, g, g, h0, pp.to_jax()).as_text()
    for kernel in ("gdn_intra", "gdn_piece_states",
                   "gdn_chunk_loop_wide" if chunk_variant == "wide" else "gdn_chunk_loop") + (
                       ("gdn_split_scan",) if scan == "kernel" else ()):
        assert kernel in text, kernel


def test_traced_plan_split_cross_lowers_to_cuda(monkeypatch):
    """The two passes with the pieces cut on the device from a traced plan (TP8 heads, the default
    scan kernel, an initial state) lower for an H200: every kernel of the split is in the module."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.jax_backend.mosaic_gpu.split import run_split

    monkeypatch.setattr(M, "check_runnable", lambda args, interpret=None: False)  # (compiled, not run)

    t, h, hv, d = 1024, 2, 4, 128
    p = make_plan([0, 700, 700, 1024], num_tokens=t)
    sds = jax.ShapeDtypeStruct
    q, v = sds((1, t, h, d), jnp.bfloat16), sds((1, t, hv, d), jnp.bfloat16)
    g = sds((1, t, hv), jnp.float32)
    h0 = sds((p.padded_seqs, hv, d, d), jnp.float32)

    def fn(q, k, v, g, beta, h0, plan):
        _, args = api.validate(q, k, v, g, beta, plan=plan, initial_state=h0, backend="jax")
        return run_split(args, 2)

    text = _lower_for_cuda(fn, q, q, v, g, g, h0, p.to_jax()).as_text()
    for kernel in ("gdn_intra", "gdn_piece_states", "gdn_chunk_loop", "gdn_split_scan"):
        assert kernel in text, kernel


_LOOP_T = 256  # tokens of the chunk loops' lowering-only tests


def _loop_arg_shapes():
    """Abstract (q, k, v, Ag, gc, cu) of a chunk loop: 256 tokens, H = 1, HV = 2, K = V = 128, two
    sequences."""
    import jax
    import jax.numpy as jnp

    sds, t, h, hv, d = jax.ShapeDtypeStruct, _LOOP_T, 1, 2, 128
    return (sds((t, h, d), jnp.bfloat16), sds((t, h, d), jnp.bfloat16), sds((t, hv, d), jnp.bfloat16),
            sds((hv, t, 64), jnp.bfloat16), sds((hv, t), jnp.float32), sds((3,), jnp.int32))


@pytest.mark.parametrize("ablate", ["store", "o", "w", "xw", "prep", "selects"])
def test_wide_loop_ablations_cross_lower(ablate):
    """The wide loop's diagnostic ablations (chunk_loop_wide._ablate, timed by
    tests/gpu/mosaic_gpu_check.py --only ablate) lower for an H200; an unknown name is refused."""
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import ABLATIONS, chunk_loop_wide

    assert ablate in ABLATIONS
    t, shapes = _LOOP_T, _loop_arg_shapes()

    def fn(q, k, v, ag, gc, cu, ablate=frozenset({ablate})):
        return chunk_loop_wide(q, k, v, ag, gc, cu, None, scale=0.1, group=2, n_out=2, t_valid=t, _ablate=ablate)

    assert "gdn_chunk_loop_wide" in _lower_for_cuda(fn, *shapes).as_text()
    with pytest.raises(ValueError, match="_ablate"):
        _lower_for_cuda(lambda *a: fn(*a, ablate=frozenset({"bogus"})), *shapes)


@pytest.mark.parametrize("ablate", ["xw", "w", "update", "publish", "out", "store", "store_tma", "store_wait", "p",
                                    "o_mm", "p_half"])
def test_narrow_loop_ablations_cross_lower(ablate):
    """The narrow loop's diagnostic ablations (chunk_loop._ablate, session 25, timed by
    tests/gpu/mosaic_gpu_check.py --only ablate --ablate-loop narrow) lower for an H200; an unknown
    name is refused."""
    from gdn.jax_backend.mosaic_gpu.chunk_loop import ABLATIONS, chunk_loop

    assert ablate in ABLATIONS
    t, shapes = _LOOP_T, _loop_arg_shapes()

    def fn(q, k, v, ag, gc, cu, ablate=frozenset({ablate})):
        return chunk_loop(q, k, v, ag, gc, cu, None, scale=0.1, group=2, n_out=2, t_valid=t, overlap=True,
                          _ablate=ablate)

    assert "gdn_chunk_loop" in _lower_for_cuda(fn, *shapes).as_text()
    with pytest.raises(ValueError, match="_ablate"):
        _lower_for_cuda(lambda *a: fn(*a, ablate=frozenset({"bogus"})), *shapes)


def _narrow_ablations_change_output(interpret=True):
    """The narrow loop's ablations (chunk_loop.ABLATIONS) each run to the end under the interpreter (their
    barriers still pair up: a hand-over left waiting would hang) -> {name: whether its output differs from
    the default loop's}. Its three warpgroups need the subprocess's several CPU devices."""
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.chunk_loop import ABLATIONS, chunk_loop
    from gdn.jax_backend.mosaic_gpu.intra import intra

    rng = np.random.default_rng(0)
    t, hv, d = 192, 2, 64
    cu = jnp.asarray([0, 130, t, t], jnp.int32)  # a boundary tile, a whole one, the tail row
    k = jnp.asarray(rng.standard_normal((t, 1, d)) * 0.1, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((t, hv, d)), jnp.bfloat16)
    g = jnp.asarray(-rng.random((hv, t)) * 0.1, jnp.float32)
    seg = jnp.searchsorted(cu[1:], jnp.arange(t), side="right").astype(jnp.int32)
    ag, gc = intra(k, g, jnp.asarray(rng.random((hv, t)), jnp.float32), seg, group=hv, interpret=interpret)
    h0 = jnp.asarray(rng.standard_normal((2, hv, d, d)), jnp.float32)

    def run(ablate=frozenset()):
        o, f = chunk_loop(k, k, v, ag, gc, cu, h0, scale=0.125, group=hv, n_out=2, t_valid=t, overlap=True,
                          _ablate=ablate, interpret=interpret)
        return np.asarray(o, np.float32), np.asarray(f)

    ref = run()
    out = {}
    for name in ABLATIONS:
        o, f = run(frozenset({name}))
        out[name] = not (np.array_equal(o, ref[0]) and np.array_equal(f, ref[1]))
    return out


def test_narrow_loop_ablations_run_and_drop_work(interp_results):
    """Each of the narrow loop's ablations runs to the end under the interpreter and changes the output,
    so each one does drop the work it names (the default loop's output is the reference); but
    "store_wait", which only drops a wait (a race on the GPU, none in the interpreter), the same bits."""
    from gdn.jax_backend.mosaic_gpu.chunk_loop import ABLATIONS

    res = interp_results["narrow_ablations"]
    assert "error" not in res, res.get("error")
    assert set(res) == set(ABLATIONS) | {"seconds"}, res
    assert all(res[name] is (name != "store_wait") for name in ABLATIONS), res


def _mosaic_module_texts(fn, *shapes) -> list[str]:
    """The Mosaic GPU modules (MLIR text, before serialization into the custom call) of ``fn``
    lowered for an H200; hooks jax 0.11.2's private ``_run_serde_pass`` (pinned)."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    seen, orig = [], mosaic_core._run_serde_pass

    def spy(module, *, serialize, ir_version=None):
        if serialize:
            seen.append(str(module))
        return orig(module, serialize=serialize, ir_version=ir_version)

    mosaic_core._run_serde_pass = spy
    try:
        _lower_for_cuda(fn, *shapes)
    finally:
        mosaic_core._run_serde_pass = orig
    assert seen, "no Mosaic module seen: the hook no longer matches jax's lowering"
    return seen


def _smem_bytes(fn, *shapes) -> list[int]:
    """The dynamic SMEM size of each Mosaic kernel of ``fn`` lowered for an H200 (``fn`` must not
    have been lowered before: a cached lowering shows no module)."""
    import re

    texts = _mosaic_module_texts(fn, *shapes)
    return [int(m) for text in texts for m in re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", text)]


@pytest.mark.parametrize("loop", ["wide", "narrow"])
def test_loop_bare_drops_the_automatic_barriers(loop):
    """The chunk loops with bare=True compile without Pallas's automatic warpgroup barriers: far
    fewer bar.sync in the kernel (the wide loop: 82 -> 22 at the time of writing), the explicit
    ones kept."""
    from gdn.jax_backend.mosaic_gpu.chunk_loop import chunk_loop
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide

    fn_loop = chunk_loop_wide if loop == "wide" else chunk_loop
    t, shapes = _LOOP_T, _loop_arg_shapes()
    counts = {}
    for bare in (False, True):
        fn = lambda q, k, v, ag, gc, cu, bare=bare: fn_loop(  # noqa: E731
            q, k, v, ag, gc, cu, None, scale=0.1, group=2, n_out=2, t_valid=t, bare=bare)
        [text] = _mosaic_module_texts(fn, *shapes)
        counts[bare] = text.count("bar.sync")
    assert 0 < counts[True] < counts[False] // 2, counts


def test_persistent_loop_prefetch_takes_effect():
    """prefetch_h0=True puts TMA L2 prefetches (of each item's initial state) into the persistent wide
    loop and nothing else does: none without it, none without an initial state."""
    import jax
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import chunk_loop_wide

    t, shapes = _LOOP_T, _loop_arg_shapes()
    h0 = jax.ShapeDtypeStruct((2, 2, 128, 128), jnp.float32)
    counts = {}
    for pf, with_h0 in ((False, True), (True, True), (True, False)):
        def fn(q, k, v, ag, gc, cu, h0, pf=pf, with_h0=with_h0):
            return chunk_loop_wide(q, k, v, ag, gc, cu, h0 if with_h0 else None, scale=0.1, group=2, n_out=2,
                                   t_valid=t, ctas=3, prefetch_h0=pf)
        [text] = _mosaic_module_texts(fn, *shapes, h0)
        counts[pf, with_h0] = text.count("cp.async.bulk.prefetch")  # not the tensormaps' prefetches
    assert counts[False, True] == 0 and counts[True, False] == 0 and counts[True, True] >= 1, counts


@pytest.mark.parametrize("t,h,group,dk,dtype,tiles,head_loop,merge,isolate,buffers", [
    (512, 16, 2, 128, "bfloat16", None, "loop", "levels", "boundary", 1),  # Qwen3.5 heads, default tiles per CTA
    (512, 16, 2, 128, "bfloat16", None, "unroll", "chain", "all", 1),  # the substitution reading -A by columns
    (320, 1, 3, 64, "float16", 2, "unroll", "levels", "boundary", 1),  # G = 3, a short last CTA, the debug output
    (320, 1, 3, 64, "float16", 2, "loop", "chain", "boundary", 2),  # two output stagings (the debug output too)
    (512, 16, 2, 128, "bfloat16", None, "loop", "warp", "boundary", 2),  # the diagonal blocks in registers
    (512, 16, 2, 128, "bfloat16", None, "loop", "wg3", "boundary", 2),  # ... and three warpgroups per CTA
])
def test_intra_cross_lowers_to_cuda(t, h, group, dk, dtype, tiles, head_loop, merge, isolate, buffers):
    """The intra kernel through Mosaic layout inference and lowering for an H200 (debug output too)."""
    import jax
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.intra import intra

    sds = jax.ShapeDtypeStruct
    dt = getattr(jnp, dtype)
    hv = h * group
    wgs = 3 if merge == "wg3" else 1
    solve = "warp" if merge in ("warp", "wg3") else "smem"
    merge = "chain" if merge in ("warp", "wg3") else merge
    shapes = (sds((t, h, dk), dt), sds((hv, t), jnp.float32), sds((hv, t), jnp.float32), sds((t,), jnp.int32))

    def make(**kw):  # a new function each time: each is lowered anew
        return lambda k, g, b, s: intra(k, g, b, s, group=group, tiles_per_cta=tiles, head_loop=head_loop,
                                        merge_variant=merge, solve_columns=merge == "chain", isolate=isolate,
                                        out_buffers=buffers, debug_inverse=tiles is not None, **kw)

    text = _lower_for_cuda(make(solve=solve, warpgroups=wgs), *shapes).as_text()
    assert "gdn_intra" in text
    if solve == "warp":
        [smem] = _smem_bytes(make(solve=solve, warpgroups=wgs), *shapes)
        if wgs == 3:  # three copies of the kernel's buffers (and K K^T's) fit one SM's 227 KB
            assert smem <= 227 * 1024, smem
        else:  # the substitution's SMEM buffers are gone: the kernel is ~36 KB smaller
            [smem_default] = _smem_bytes(make(), *shapes)
            assert smem_default - smem >= 2 * 64 * 64 * 4, (smem_default, smem)


@pytest.mark.parametrize("tiles", [1, 2])
def test_intra_three_warpgroups_same_outputs(tiles):
    """warpgroups=3 (solve="warp"): each warpgroup a CTA of the one-warpgroup kernel on its own
    buffers and barriers; under the interpreter (the jnp substitution for both solves) the outputs
    equal the default kernel's, with CTA counts that leave the last CTA's warpgroups idle."""
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.intra import intra

    rng = np.random.default_rng(3)
    t, h, group, dk = 64 * 7 + 8, 1, 2, 64
    tp = -(-t // 64) * 64
    k = jnp.asarray(rng.normal(size=(t, h, dk)) / 8, jnp.bfloat16)
    g = jnp.asarray(-rng.uniform(0.01, 0.5, (h * group, tp)), jnp.float32)
    b = jnp.asarray(rng.uniform(0.1, 1.0, (h * group, tp)), jnp.float32)
    seg = jnp.asarray(np.searchsorted([0, 70, 71, 200, t], np.arange(tp), side="right") - 1, jnp.int32)
    one = intra(k, g, b, seg, group=group, tiles_per_cta=tiles, interpret=True)
    three = intra(k, g, b, seg, group=group, tiles_per_cta=tiles, solve="warp", warpgroups=3, interpret=True)
    for x, y in zip(one, three):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    with pytest.raises(ValueError, match="qk_norms"):  # q's tile three times over does not fit SMEM
        intra(k, g, b, seg, group=group, q=k, solve="warp", warpgroups=3, interpret=True)
    with pytest.raises(ValueError, match="debug_inverse"):  # nor the inverse's fp32 copy three times over
        intra(k, g, b, seg, group=group, solve="warp", warpgroups=3, debug_inverse=True, interpret=True)


class _NumpyLanes:
    """The 128 threads of a warpgroup as NumPy vectors, for :func:`solve.warp_solve_steps`'s lane
    arithmetic (float64 values; ``shfl`` reads lane ``src`` of the reader's own warp)."""

    def __init__(self):
        tid = np.arange(128)
        self.lane, self.warp = tid % 32, tid // 32

    def f32(self, v):
        return np.full(128, float(v))

    idiv = staticmethod(lambda a, b: a // b)
    irem = staticmethod(lambda a, b: a % b)
    iadd = staticmethod(lambda a, b: a + b)
    imul = staticmethod(lambda a, b: a * b)
    ieq = staticmethod(lambda a, b: a == b)
    select = staticmethod(np.where)
    fma = staticmethod(lambda a, b, c: a * b + c)

    def shfl(self, v, src):
        return v[self.warp * 32 + src]


def _warp_solve_emulated(a: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
    """(I + A)^-1 on the 16x16 diagonal blocks of a strictly lower [64, 64] ``a``, by
    warp_solve_steps on emulated lanes: each thread's entries in and out in the WGMMA layout."""
    from gdn.jax_backend.mosaic_gpu.solve import warp_solve_steps

    ops = _NumpyLanes()
    w, q, p = ops.warp, ops.lane // 4, ops.lane % 4
    row = lambda h: 16 * w + 8 * h + q  # noqa: E731
    col = lambda jb, e: 16 * w + 8 * jb + 2 * p + e  # noqa: E731
    na = [[[-a[row(h), col(jb, e)] for e in range(2)] for jb in range(2)] for h in range(2)]
    seg_rows = seg_of = seg_cols = None
    if seg is not None:
        seg_rows = [seg[row(h)] for h in range(2)]
        seg_of = lambda j: seg[16 * w + j]  # noqa: E731
        seg_cols = [[seg[col(jb, e)] for e in range(2)] for jb in range(2)]
    x = warp_solve_steps(ops, na, seg_rows, seg_of, seg_cols)
    out = np.zeros((64, 64))
    for h in range(2):
        for jb in range(2):
            for e in range(2):
                out[row(h), col(jb, e)] = x[h][jb][e]
    return out


def _block_lower(rng, seg=None):
    r, c = np.indices((64, 64))
    keep = (r > c) & (r // 16 == c // 16)
    if seg is not None:
        keep &= seg[r] == seg[c]
    return np.where(keep, rng.normal(0.0, 0.4, (64, 64)), 0.0)


def test_warp_solve_lane_arithmetic_inverts_each_diagonal_block():
    """solve="warp": the shuffles' lanes and register slots, emulated on the CPU (the interpreter
    cannot run the kernel's MLIR), give each 16x16 diagonal block's inverse of I + A."""
    rng = np.random.default_rng(0)
    a = _block_lower(rng)
    x = _warp_solve_emulated(a)
    want = np.zeros((64, 64))
    for b in range(4):
        blk = slice(16 * b, 16 * b + 16)
        want[blk, blk] = np.linalg.inv(np.eye(16) + a[blk, blk])
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-12)


def test_warp_out_lane_map_transposes_the_tile_without_bank_conflicts():
    """out_store="warp": each warp's four ``stmatrix.x4.trans`` (lane ``8 m + k`` gives row ``k`` of
    matrix ``m``, which receives column ``k`` of the lane-fragment matrix) and four 16-byte reads of
    its slab, emulated on the CPU with the kernel's offsets (the interpreter stores the tile
    directly), put o^T's [64, 64] tile in global memory as o; every slab byte is written once, and
    each 8-row phase of a store or a quarter-warp's 16-byte reads hits 8 distinct 16-byte bank groups."""
    from gdn.jax_backend.mosaic_gpu import warp_out as W
    rng = np.random.default_rng(0)
    o_t = rng.integers(0, 2 ** 16, size=(64, 64), dtype=np.uint16)  # [V columns, tokens]
    out = np.zeros((64, 64), np.uint16)  # [tokens, V columns]
    lanes = np.arange(32)
    for w in range(4):
        mine = o_t[16 * w:16 * w + 16]  # the warp's rows of the WGMMA layout
        slab = np.zeros(W.SLAB_BYTES // 2, np.uint16)
        written = np.zeros(W.SLAB_BYTES // 2, int)
        for s in range(4):
            off = W.stmatrix_offset(lanes, s)
            for m in range(4):
                n, h = 2 * s + m // 2, m % 2
                frag = mine[8 * h:8 * h + 8, 8 * n:8 * n + 8]  # lane l: row l // 4, columns 2 (l % 4) + e
                rows = off[8 * m:8 * m + 8]
                assert len(set(rows % 128 // 16)) == 8, (s, m)
                for k in range(8):
                    slab[rows[k] // 2:rows[k] // 2 + 8] = frag[:, k]
                    written[rows[k] // 2:rows[k] // 2 + 8] += 1
        assert np.all(written == 1)
        for i in range(4):
            off = W.read_offset(lanes, i)
            tok, half = W.read_row(lanes, i)
            for quarter in range(4):
                assert len(set(off[8 * quarter:8 * quarter + 8] % 128 // 16)) == 8, (i, quarter)
            for lane in range(32):
                col = 16 * w + 8 * half[lane]
                out[tok[lane], col:col + 8] = slab[off[lane] // 2:off[lane] // 2 + 8]
    np.testing.assert_array_equal(out, o_t.T)


def test_warp_solve_keeps_a_poisoned_sequence_apart():
    """With the tile's sequence ids, a NaN sequence sharing a block leaves its neighbours' entries
    as they are without it, and every entry across two sequences exactly 0."""
    rng = np.random.default_rng(1)
    seg = np.repeat(np.arange(6), [5, 20, 3, 17, 11, 8])  # boundaries inside blocks
    a = _block_lower(rng, seg)
    clean = _warp_solve_emulated(a, seg)
    dirty_a = np.where((seg[:, None] == 3) & (np.indices((64, 64))[0] > np.indices((64, 64))[1]), np.nan, a)
    dirty = _warp_solve_emulated(dirty_a, seg)
    r, c = np.indices((64, 64))
    same_block = r // 16 == c // 16
    other = (seg[r] != 3) & (seg[c] != 3)
    np.testing.assert_array_equal(dirty[other], clean[other])
    assert np.all(dirty[(seg[r] != seg[c]) & same_block] == 0.0)
    want = np.zeros((64, 64))
    for b in range(4):
        blk = slice(16 * b, 16 * b + 16)
        want[blk, blk] = np.linalg.inv(np.eye(16) + a[blk, blk])
    np.testing.assert_allclose(clean, want, rtol=0, atol=1e-12)


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
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--coresident-cases":
    sys.path.insert(0, ROOT)
    _main_coresident_cases(sys.argv[2])


def test_chunk_variant_policy():
    """The wide chunk loop where its one-CTA-per-(sequence, head) grid fills the waves better (the
    H200's picks of 2026-12-04), the default elsewhere and whenever the sequence count is unknown."""
    from gdn.jax_backend.mosaic_gpu._driver import pick_chunk_variant

    picks = {(n, hv): pick_chunk_variant(n, hv, 128, 132)
             for n, hv in ((4, 32), (8, 32), (128, 32), (1, 32), (4, 16), (4, 48), (2, 32))}
    assert picks == {(4, 32): "wide", (8, 32): "wide", (128, 32): "wide", (1, 32): "default",
                     (4, 16): "default", (4, 48): "default", (2, 32): "default"}
    assert pick_chunk_variant(None, 32, 128, 132) == "default"  # a plan traced under jit
    assert pick_chunk_variant(4, 32, 64, 132) == "default"      # measured at V = 128 only
    assert pick_chunk_variant(0, 32, 128, 132) == "default"


def test_variant_policy_coresident_where_the_loop_leaves_half_the_sms():
    """variant="auto": the co-resident kernel where the narrow loop's CTAs for the most sequences a
    compilation may see leave at least half of the SMs (one prompt at HV = 32 with a host plan, or
    under jit, whose bucket of 0..1 holds one; a traced plan's bucket of 2 at HV = 16), two kernels
    elsewhere, under the interpreter and with non-default intra options."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu._driver import pick_variant

    import jax

    def args_for(lens, hv, traced=False):
        t = sum(lens)
        q = jnp.zeros((1, t, 16, 128), jnp.bfloat16)
        v = jnp.zeros((1, t, hv, 128), jnp.bfloat16)
        g = jnp.zeros((1, t, hv), jnp.float32)
        p = make_plan(np.concatenate([[0], np.cumsum(lens)]), num_tokens=t)
        if traced:  # as a jitted call sees it: the counts are gone, the bucket stays
            p = jax.tree_util.tree_map(lambda x: x, p.to_jax())
            assert p.num_seqs is None
        return api.validate(q, q, v, g, g, plan=p, backend="jax")[1]

    def pick(a, chunk_variant="auto", seqs=None, interpret=False, intra_default=True, sms=132):
        return pick_variant(a, chunk_variant, 64, False, intra_default, seqs, sms, interpret)

    one, two = args_for([256], 32), args_for([128, 128], 32)
    assert pick(one) == "coresident"                          # 64 loop CTAs on 132 SMs
    assert pick(args_for([0, 256], 32)) == "coresident"        # an empty sequence adds no CTA that works
    assert pick(two) == "two_kernels"                         # 128
    assert pick(one, sms=127) == "two_kernels"                # 64 > half of 127
    assert pick(args_for([256], 48)) == "two_kernels"         # 96
    assert pick(args_for([256], 32, traced=True)) == "coresident"  # the bucket 0..1
    assert pick(args_for([0], 32, traced=True)) == "coresident"
    assert pick(args_for([128, 128], 32, traced=True)) == "two_kernels"  # the bucket of 2
    assert pick(args_for([128, 128], 32, traced=True), seqs=1) == "coresident"  # the caller's promise
    assert pick(args_for([128, 128], 16, traced=True)) == "coresident"
    assert pick(one, interpret=True) == "two_kernels"
    assert pick(one, intra_default=False) == "two_kernels"
    assert pick(one, chunk_variant="wide") == "two_kernels"
    assert pick(one, chunk_variant="default") == "coresident"


def _small_policy_args(lens, l2=False, traced=False):
    """Validated arguments of the policy tests' small GPU (1 q/k head of 64, 2 v heads of V = 128: 4
    narrow-loop CTAs a sequence; the tests give it 8 SMs). ``traced``: the plan as a jitted call sees
    it (its counts gone, its bucket and ``dominant`` kept)."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan

    t = sum(lens)
    q = jnp.zeros((1, t, 1, 64), jnp.bfloat16)
    v = jnp.zeros((1, t, 2, 128), jnp.bfloat16)
    g = jnp.zeros((1, t, 2), jnp.float32)
    p = make_plan(np.concatenate([[0], np.cumsum(lens)]), num_tokens=t)
    if traced:
        p = jax.tree_util.tree_map(lambda x: x, p.to_jax())
        assert p.num_seqs is None
    return api.validate(q, q, v, g, g, plan=p, use_qk_l2norm=l2, backend="jax")[1]


def test_long_first_policy():
    """Two prompts whose narrow loop fills the GPU: the co-resident kernel with workers sized for
    the longest, its CTAs first, where the model says it beats two kernels by 1.1x (one long and
    one short prompt, either order, with a host plan or a traced one whose bucket has a dominant
    sequence), not for two equal ones, a traced plan without a dominant sequence, the interpreter or
    non-default intra options; and the kernel then runs in that order."""
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.jax_backend.mosaic_gpu.coresident import long_first

    assert long_first([448, 64], 32, 2, 132) == (0, 1)      # 28672+4096: s28p 0.752 vs 0.908 ms
    assert long_first([64, 448], 32, 2, 132) == (1, 0)
    assert long_first([0, 448, 0, 64], 32, 2, 132) == (1, 0, 2, 3)
    assert long_first([256, 256], 32, 2, 132) is None       # 2x16384: s28p 0.886 vs 0.625
    assert long_first([512], 32, 2, 132) is None            # one prompt: plain co-resident
    assert long_first([448, 64, 64], 32, 2, 132) is None    # 192 CTAs: no single wave

    args_for = _small_policy_args

    def pick(a, interpret=False, intra_default=True):
        return D.pick_long_first(a, "auto", 64, False, intra_default, 8, interpret)

    long_short = args_for([28 * 64, 4 * 64])
    assert pick(long_short) == (0, 1) and pick(args_for([4 * 64, 28 * 64])) == (1, 0)
    assert pick(args_for([16 * 64, 16 * 64])) is None
    # a traced plan: only its bucket's dominant sequence (Plan.dominant), a 3:1 skew at least
    assert pick(args_for([28 * 64, 4 * 64], traced=True)) == (0, 1)
    assert pick(args_for([4 * 64, 28 * 64], traced=True)) == (1, 0)
    assert pick(args_for([16 * 64, 16 * 64], traced=True)) is None
    assert pick(args_for([20 * 64, 12 * 64], traced=True)) is None  # 5:3, no dominant sequence
    assert pick(long_short, interpret=True) is None and pick(long_short, intra_default=False) is None

    seen = {}

    def spy(*a, **kw):
        seen.update(kw)
        raise StopIteration

    import gdn.jax_backend.mosaic_gpu._driver as drv
    real = drv.run_core
    drv.run_core = spy
    try:
        with pytest.raises(StopIteration):
            D.prefill_arrays(long_short, coresident_sms=8)
    finally:
        drv.run_core = real
    assert seen["variant"] == "coresident" and seen["coresident_order"] == (0, 1) and seen["coresident_seqs"] == 1
    assert seen["coresident_p"] is False  # P from the workers: untimed beside a long-first order
    # the route a check script names (resolve_variant, prefill_arrays' own decision)
    assert D.resolve_variant(long_short, coresident_sms=8) == ("coresident", (0, 1))
    assert D.resolve_variant(args_for([16 * 64, 16 * 64]), coresident_sms=8) == ("two_kernels", None)
    assert D.resolve_variant(long_short, "two_kernels", coresident_sms=8) == ("two_kernels", None)
    assert D.resolve_variant(long_short, coresident_sms=8, intra_default=False) == ("two_kernels", None)


def test_coresident_p_policy(monkeypatch):
    """P from the workers ("auto"): on where the co-resident kernel serves one prompt, off beside a
    long-first order or workers sized for one of several prompts, with use_qk_l2norm, without lean,
    for two kernels; a bool as given (only where the co-resident kernel runs); and prefill_arrays
    hands the resolved value to the kernel."""
    from gdn.jax_backend.mosaic_gpu import _driver as D

    r = D.resolve_coresident_p
    assert r("auto", "coresident", True, False) is True
    assert r("auto", "coresident", False, False) is False
    assert r("auto", "coresident", True, True) is False
    assert r("auto", "coresident", True, False, lean=False) is False
    assert r("auto", "two_kernels", True, False) is False
    assert r(True, "coresident", False, True) is True and r(False, "coresident", True, False) is False
    assert r(True, "two_kernels", True, False) is False

    args_for = _small_policy_args

    seen = {}

    class Stop(Exception):
        pass

    def spy(*a, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(D, "run_core", spy)
    for a, kw, variant, p in ((args_for([256]), {}, "coresident", True),
                              (args_for([256], traced=True), {}, "coresident", True),
                              (args_for([256], l2=True), {}, "coresident", False),
                              (args_for([256]), dict(coresident_p=False), "coresident", False),
                              (args_for([256]), dict(loop_lean=False), "coresident", False),
                              (args_for([128, 128]), {}, "two_kernels", False),
                              # workers sized for one prompt of two (the second waits for them): P untimed
                              (args_for([128, 128], traced=True), dict(variant="coresident", coresident_seqs=1),
                               "coresident", False),
                              (args_for([0, 256]), {}, "coresident", True),  # one prompt with tokens
                              (args_for([128, 128]), dict(variant="coresident", coresident_p=True), "coresident",
                               True)):
        seen.clear()
        with pytest.raises(Stop):
            D.prefill_arrays(a, coresident_sms=8, **kw)
        assert (seen["variant"], seen["coresident_p"]) == (variant, p), (kw, seen["variant"], seen["coresident_p"])


def test_variant_policy_sees_the_intra_options(monkeypatch):
    """prefill_arrays tells pick_variant whether every intra option is at its default (read from
    its own signature): the defaults say so, any one option changed does not."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver as D

    seen = []

    class Stop(Exception):
        pass

    def spy(args, chunk_variant, bv, loop_halves, intra_default, *rest):
        seen.append(intra_default)
        raise Stop

    monkeypatch.setattr(D, "pick_variant", spy)
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    g = jnp.zeros((1, 256, 4), jnp.float32)
    v = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    args = api.validate(q, q, v, g, g, plan=make_plan([0, 256], num_tokens=256), backend="jax")[1]
    changed = dict(intra_tiles=2, head_loop="unroll", intra_pad=0, intra_merge="levels", intra_columns=False,
                   intra_isolate="all", intra_out_buffers=1, intra_solve="warp", intra_warpgroups=3)
    assert set(changed) == set(D.INTRA_OPTIONS)
    for kw in [{}] + [{n: val} for n, val in changed.items()]:
        if kw.get("intra_warpgroups"):  # (needs the warp solve)
            kw["intra_solve"] = "warp"
        with pytest.raises(Stop):
            D.prefill_arrays(args, **kw)
    assert seen == [True] + [False] * len(changed)


def test_chunk_variant_policy_for_a_bucket():
    """One loop for a traced plan's bucket: the common pick where every count agrees, else the loop
    whose worst slowdown (the wave model) over the bucket is smaller, checked against a brute
    force over buckets, head counts and SM counts; V != 128 keeps the default loop."""
    from gdn.jax_backend.mosaic_gpu._driver import loop_wave_us, pick_chunk_variant, pick_chunk_variant_for
    from gdn.planner import seq_bucket_range

    assert pick_chunk_variant_for(range(3, 9), 32, 128, 132) == "wide"
    assert pick_chunk_variant_for(range(0, 3), 32, 128, 132) == "default"
    assert pick_chunk_variant_for(range(3, 9), 32, 64, 132) == "default"
    for sms in (4, 78, 132):
        for hv in (1, 2, 4, 8, 16, 32, 48, 64):
            for n_pad in (1, 2, 8, 9, 16, 18, 64, 120):
                lo, hi = seq_bucket_range(n_pad)
                counts = range(lo, hi + 1)
                pick = pick_chunk_variant_for(counts, hv, 128, sms)
                own = {pick_chunk_variant(max(n, 1), hv, 128, sms) for n in counts}
                if len(own) == 1:
                    assert pick == own.pop()
                    continue
                worst = {v: max(loop_wave_us(n, hv, sms)[v] / min(loop_wave_us(n, hv, sms).values())
                                for n in counts) for v in ("wide", "default")}
                other = "default" if pick == "wide" else "wide"
                assert worst[pick] <= worst[other], (sms, hv, n_pad, worst)


def test_loop_ctas_policy():
    """The wide loop runs on a persistent grid of one CTA per SM where its (sequence, v head) items
    outnumber the SMs (the serving mix, 42 x 32 items: 8% faster on the H200), one CTA per item
    otherwise, and never for the default loop or an unknown sequence count."""
    from gdn.jax_backend.mosaic_gpu._driver import pick_chunk_variant, pick_loop_ctas

    assert pick_loop_ctas(42, 32, "wide", 132) == 132
    assert pick_loop_ctas(128, 32, "wide", 132) == 132
    assert pick_loop_ctas(4, 32, "wide", 132) is None       # 128 items: a CTA each already
    assert pick_loop_ctas(42, 32, "default", 132) is None
    assert pick_loop_ctas(None, 32, "wide", 132) is None
    for n, hv in ((42, 32), (4, 32), (1, 32), (4, 48), (128, 16)):
        variant = pick_chunk_variant(n, hv, 128, 132)
        ctas = pick_loop_ctas(n, hv, variant, 132)
        assert ctas is None or (variant == "wide" and n * hv > 132), (n, hv)


def test_persistent_grid_h0_prefetch_policy():
    """On the persistent grid each item's initial state is staged in SMEM where the sequences are
    short on average (128x256: the loop alone 0.566 vs 0.673 ms on an H100) and prefetched into L2
    where they are longer (the serving mix, ~780 tokens: 0.515 vs 0.529); without the persistent grid
    the choice does not matter (True); a traced plan decides for the longest mean of its bucket."""
    import jax

    from gdn import plan as make_plan
    from gdn.jax_backend.mosaic_gpu._driver import H0_SMEM_MAX_MEAN_TOKENS, pick_loop_prefetch

    short = make_plan(np.arange(0, 128 * 256 + 1, 256))
    assert pick_loop_prefetch(short, 128 * 256, 132) == "smem"
    assert pick_loop_prefetch(short, 128 * 256, None) is True
    mix = make_plan(np.linspace(0, 32768, 43).astype(np.int64))  # 42 sequences of ~780 tokens
    assert pick_loop_prefetch(mix, 32768, 132) is True
    edge = make_plan(np.arange(0, 64 * H0_SMEM_MAX_MEAN_TOKENS + 1, H0_SMEM_MAX_MEAN_TOKENS))
    assert pick_loop_prefetch(edge, 64 * H0_SMEM_MAX_MEAN_TOKENS, 132) == "smem"
    assert pick_loop_prefetch(edge, 64 * H0_SMEM_MAX_MEAN_TOKENS + 64, 132) is True
    seen = []
    jax.jit(lambda p: seen.append(pick_loop_prefetch(p, 128 * 256, 132)) or 0)(short.to_jax())
    # the bucket of 128 sequences reaches down to 121: 271 tokens at most, still short
    assert seen == ["smem"]
    # where the staging does not fit the loop's SMEM (the slab intra work's tiles), the L2 prefetch
    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import h0_staging_fits

    assert pick_loop_prefetch(short, 128 * 256, 132, staging_fits=False) is True
    assert h0_staging_fits(128, 128, 2, 2) and h0_staging_fits(128, 128, 2, 2, l2=True)
    assert h0_staging_fits(128, 128, 2, 2, fused=True)
    assert not h0_staging_fits(128, 128, 2, 2, fused=True, slabs=True)


def test_traced_plan_grid_policy(monkeypatch):
    """With a plan traced under the caller's jit (its sequence count unknown), the loop and its grid
    are picked for every count of the plan's bucket, so one compilation serves the bucket: the wide
    loop on a persistent grid for buckets of many sequences (128x256, the serving mix), the default
    loop where every count wants it (1 or 2 sequences at HV = 32, 3..8 at HV = 4), the loop with the
    smaller worst case where they disagree (3..8 at HV = 32: the wide one), and a persistent grid
    only where every count wants one; a host plan decides on its own count."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver as D

    seen = []
    monkeypatch.setattr(D, "run_core", lambda core, args, **kw: (
        seen.append((kw["chunk_variant"], kw["loop_ctas"])), (jnp.zeros(1), None))[1])
    monkeypatch.setattr(D, "_sm_count", lambda: 132)

    def picks(lens, hv, traced, **opts):
        t = sum(lens)
        p = make_plan(np.cumsum([0] + list(lens)), num_tokens=t)
        q = jnp.zeros((1, t, min(16, hv), 128), jnp.bfloat16)
        v = jnp.zeros((1, t, hv, 128), jnp.bfloat16)
        g = jnp.zeros((1, t, hv), jnp.float32)

        def fn(pl, q, v, g):
            _, args = api.validate(q, q, v, g, g, plan=pl, backend="jax")
            return D.prefill_arrays(args, **opts)[0]

        (jax.jit(fn)(p.to_jax(), q, v, g) if traced else fn(p, q, v, g))
        return seen.pop()

    assert picks([256] * 128, 32, True) == ("wide", 132)
    assert picks([256] * 125, 32, True) == ("wide", 132)  # the same bucket, the same kernels
    assert picks([100 + 70 * i for i in range(42)], 32, True) == ("wide", 132)
    assert picks([8192] * 4, 32, True) == ("wide", None)  # 3..8 disagree: the wide loop's worst is 1.12x
    assert picks([4096] * 6, 32, True) == ("wide", None)  # the same bucket
    assert picks([32768], 32, True) == ("default", None)  # 0..1 both want the narrow loop
    assert picks([16384] * 2, 32, True) == ("default", None)
    assert picks([8192] * 4, 4, True) == ("default", None)  # 3..8 sequences all want it
    assert picks([8192] * 4, 32, True, chunk_variant="wide") == ("wide", None)  # 3..8: not all persistent
    assert picks([8192] * 4, 32, False) == ("wide", None)  # a host plan: its own count
    assert picks([256] * 128, 32, False) == ("wide", 132)
    assert picks([32768], 32, False) == ("default", None)


def test_traced_plan_split_routing(monkeypatch):
    """gdn.prefill under jit with the plan traced (mosaic_gpu): the default asks the split's model
    about the bucket's longest chain (one sequence of all the token rows) where every count of the
    bucket leaves SMs idle, and cuts on the device in the pieces it picks (an int reaches
    run_split); it stays unsplit where the model says so or the bucket can fill the GPU; an
    explicit piece size is used as given; other impls refuse a traced split by name."""
    import jax
    import jax.numpy as jnp

    import gdn
    from gdn import plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.jax_backend.mosaic_gpu import _driver as D, split as S

    seen = []

    def fake(tag):
        def run(args, *rest, **kw):
            seen.append((tag, rest[0] if tag == "split" else None))
            return jnp.zeros(args.q.shape[:3] + (args.v.shape[-1],), args.q.dtype), None
        return run

    import gdn.jax_backend as JB

    monkeypatch.setattr(S, "run_split", fake("split"))
    monkeypatch.setattr(M, "run", fake("unsplit"))
    monkeypatch.setattr(JB, "_status", lambda impl: None)  # (no GPU here: the calls never run)
    monkeypatch.setattr(D, "_sm_count", lambda: 132)

    def route(lens, h, hv, **kw):
        t = sum(lens)
        p = make_plan(np.cumsum([0] + lens), num_tokens=t)
        sds = jax.ShapeDtypeStruct
        q, v, g = sds((1, t, h, 128), jnp.bfloat16), sds((1, t, hv, 128), jnp.bfloat16), sds((1, t, hv), jnp.float32)
        jax.eval_shape(lambda pl, q, v, g: gdn.prefill(q, q, v, g, g, plan=pl, impl="mosaic_gpu",
                                                       output_final_state=False, **kw)[0], p.to_jax(), q, v, g)
        return seen.pop()

    want = S.pick_piece_chunks_for_bucket(32768, (0, 1), 4, 128, 128, 132)
    assert want == S.pick_piece_chunks([32768], 4, 128, 128, 132) == 32  # TP8: j1's 3.5x unsplit
    assert route([32768], 2, 4) == ("split", want)
    want2 = S.pick_piece_chunks_for_bucket(32768, (2, 2), 4, 128, 128, 132)
    assert want2 == S.pick_piece_chunks([16384, 16384], 4, 128, 128, 132) == 32
    assert route([16384, 16384], 2, 4) == ("split", want2)  # the bucket of 2
    assert route([32768], 16, 32) == ("unsplit", None)  # the model keeps HV = 32 unsplit
    want8 = S.pick_piece_chunks_for_bucket(32768, (3, 8), 4, 128, 128, 132)
    assert want8
    assert route([8192] * 4, 2, 4, split=True) == ("split", want8)
    assert route([8192] * 4, 2, 4) == ("split", want8)  # 3..8 x 4 heads x 2 tiles < 132 SMs
    assert route([2048] * 20, 2, 4) == ("unsplit", None)  # 17..20 ... x 4 x 2 >= 132: not asked
    assert route([8192] * 4, 16, 32) == ("unsplit", None)
    assert route([32768], 2, 4, split=3) == ("split", 3)
    with pytest.raises(ValueError, match="mosaic_gpu"):
        p = make_plan([0, 256], num_tokens=256).to_jax()
        x = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
        jax.jit(lambda pl: gdn.prefill(x, x, x, x[..., 0].astype(jnp.float32), x[..., 0].astype(jnp.float32),
                                       plan=pl, impl="xla", split=2))(p)


def test_traced_split_pick_holds_for_the_bucket():
    """The piece size a traced plan gets costs, in the split's model, at most BUCKET_SLACK more
    than running unsplit for every batch of equal sequences its bucket holds, and splits one or
    two long prompts at TP head counts (as the host plan's pick does) but not at HV = 32."""
    from gdn.jax_backend.mosaic_gpu import split as S
    from gdn.planner import seq_bucket_range

    assert S.pick_piece_chunks_for_bucket(32768, (0, 2), 4, 128, 128, 132) == 32
    assert S.pick_piece_chunks_for_bucket(32768, (0, 2), 8, 128, 128, 132) == 64
    assert S.pick_piece_chunks_for_bucket(32768, (0, 2), 32, 128, 128, 132) is None
    # one prompt at HV = 32: pieces of 128 model 1.07x, short of the host pick's 1.1x: unsplit
    assert S.pick_piece_chunks_for_bucket(32768, (0, 1), 32, 128, 128, 132) is None
    assert S.pick_piece_chunks([32768], 32, 128, 128, 132) is None
    # not pieces of 8 (slower than modelled: 0.351 ms under jit against 0.115 at 16, H100 s17)
    assert S.pick_piece_chunks_for_bucket(8192, (0, 2), 4, 128, 128, 132) == 16
    for hv in (2, 4, 8, 16, 32):
        for t in (8192, 32768, 131072):
            for n_pad in (1, 2, 8):
                lo, hi = seq_bucket_range(n_pad)
                pc = S.pick_piece_chunks_for_bucket(t, (lo, hi), hv, 128, 128, 132)
                assert pc is None or pc in S.BUCKET_PIECES, pc
                for n in range(max(lo, 1), hi + 1):
                    lens = [t // n] * n
                    unsplit = S.model_us(lens, None, hv, 128, 128, 132)["unsplit"]
                    split = sum(S.model_us(lens, pc, hv, 128, 128, 132).values()) if pc else unsplit
                    assert split <= S.BUCKET_SLACK * unsplit, (hv, t, n, pc, split, unsplit)


@pytest.mark.parametrize("lens, mode", [([130, 0, 70], 1), ([130, 0, 70, 9, 5, 3], 0)])
def test_wide_loop_halves_mode_same_bits(monkeypatch, lens, mode):
    """loop_halves=True under jit (a traced plan in the floor bucket of 3..8 sequences, where with
    16 SMs and 2 v heads up to 4 sequences want the narrow loop and 5 or more the wide one): the wide
    loop reads its mode on the device from the count of sequences with tokens. Mode 1 (two non-empty
    sequences) gives each state warpgroup its own CTA, mode 0 (five) runs the wide loop. Both give
    the wide loop's bits and meet the float64 bar, final states included."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan, reference as R
    from gdn.inputs import make_inputs, round_to_dtype
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.tolerances import vs_f64

    monkeypatch.setattr(D, "_sm_count", lambda: 16)
    x = make_inputs(lens=lens, h=1, hv=2, k=128, v=128, initial_state=True, seed=31)
    qkv = [round_to_dtype(a, "bfloat16") for a in (x.q, x.k, x.v)]
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv)
    p = make_plan(x.cu_seqlens, num_tokens=q.shape[1])
    table = D.halves_table(dataclasses_replace_traced(p), 2, 128)
    assert table is not None and table[2] == 1 and table[5] == 0, table
    h0 = jnp.pad(jnp.asarray(x.initial_state), ((0, p.padded_seqs - len(lens)), (0, 0), (0, 0), (0, 0)))
    seen = []
    real_loop = D.loop
    monkeypatch.setattr(D, "loop", lambda *a, **kw: (seen.append((kw["chunk_variant"], kw["halves"])),
                                                      real_loop(*a, **kw))[1])

    def run(**opts):
        @jax.jit
        def fn(q, k, v, g, beta, h0, pl):
            _, args = api.validate(q, k, v, g, beta, plan=pl, initial_state=h0, backend="jax",
                                   output_final_state=True)
            return D.prefill_arrays(args, interpret=True, **opts)

        o, f = fn(q, k, v, jnp.asarray(x.g), jnp.asarray(x.beta), h0, p.to_jax())
        return np.asarray(o, np.float64), np.asarray(f)[:len(lens)]

    o_h, f_h = run(loop_halves=True)
    o_w, f_w = run(chunk_variant="wide")
    assert seen[0] == ("wide", table) and seen[1] == ("wide", None), seen
    np.testing.assert_array_equal(o_h, o_w)
    np.testing.assert_array_equal(f_h, f_w)
    ref_o, ref_f = R.recurrent(*qkv, x.g, x.beta, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    t = int(x.cu_seqlens[-1])
    assert R.rms_ratio(o_h[:, :t], ref_o[:, :t]) < vs_f64("bfloat16")
    assert R.rms_ratio(f_h, ref_f) < vs_f64("bfloat16")
    assert table[sum(n > 0 for n in lens)] == mode


def dataclasses_replace_traced(p):
    """``p`` as the Plan pytree's unflatten leaves it under jit (its counts unknown)."""
    import dataclasses

    return dataclasses.replace(p, num_seqs=None, num_chunks=None, num_tokens=None, nonempty_seqs=None)


@pytest.mark.parametrize("ctas", [1, 3, 7, 64])
def test_persistent_schedule_table(ctas):
    """The persistent grid's per-CTA item table: every (row, v head) item exactly once, longest rows
    first in the snake's rounds (round kk: CTAs 0..ctas-1 when even, reversed when odd), a row's
    heads adjacent, (first, end) token the row's cu entries, the tail row and the padding entries
    without tokens; the in-kernel ranking ("order") is the same row order."""
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.chunk_loop_wide import _persistent_schedule

    cu = np.array([0, 130, 130, 200, 205, 269, 269, 269], np.int32)  # 7 rows incl. empty ones; the tail row
    hv, ns = 3, 8
    order = np.asarray(_persistent_schedule(jnp.asarray(cu), hv, ctas, "order"))
    lens = np.diff(cu)
    assert list(order) == list(np.argsort(-lens, kind="stable")) + [ns - 1]
    tab = np.asarray(_persistent_schedule(jnp.asarray(cu), hv, ctas, "table"))
    n_items = ns * hv
    assert tab.shape == (ctas, -(-n_items // ctas), 4)
    seen = []
    for kk in range(tab.shape[1]):
        for i, c in enumerate(range(ctas) if kk % 2 == 0 else reversed(range(ctas))):
            u = kk * ctas + i
            row, j, a, b = tab[c, kk]
            if u >= n_items:
                assert (row, j, a, b) == (ns - 1, 0, 0, 0)
                continue
            assert (row, j) == (order[u // hv], u % hv), (c, kk)
            assert (a, b) == ((cu[row], cu[row + 1]) if row < ns - 1 else (0, 0))
            seen.append((row, j))
    assert sorted(seen) == [(r, j) for r in range(ns) for j in range(hv)]


def test_auto_chunk_variant_ignores_empty_sequences(monkeypatch):
    """chunk_variant="auto" counts the sequences that have tokens: 5 sequences and the same 5 with 3
    empty ones appended (the parity suite's "pad" check) run the same loop, so bitwise the same."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver

    seen = []
    monkeypatch.setattr(_driver, "run_core", lambda core, args, **kw: seen.append(kw["chunk_variant"]))
    monkeypatch.setattr(_driver, "_sm_count", lambda: 132)
    t = 5 * 64
    for cu in ([0, 64, 128, 192, 256, 320], [0, 64, 128, 192, 256, 320, 320, 320, 320]):
        q = jnp.zeros((1, t, 16, 128), jnp.bfloat16)
        v = jnp.zeros((1, t, 32, 128), jnp.bfloat16)
        g = jnp.zeros((1, t, 32), jnp.float32)
        _, args = api.validate(q, q, v, g, g, plan=make_plan(cu, num_tokens=t), backend="jax")
        _driver.prefill_arrays(args)
    assert seen == ["default", "default"], seen  # 8 counted sequences would pick "wide"


def test_auto_loop_ctas_reaches_the_kernel(monkeypatch):
    """prefill_arrays' loop_ctas="auto" resolves on the host plan's sequences with tokens: 42
    sequences (x 32 v heads) get the persistent wide loop, and 8 more empty ones change nothing; an
    explicit None keeps one CTA per item."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend.mosaic_gpu import _driver

    seen = []
    monkeypatch.setattr(_driver, "run_core",
                        lambda core, args, **kw: seen.append((kw["chunk_variant"], kw["loop_ctas"])))
    monkeypatch.setattr(_driver, "_sm_count", lambda: 132)
    t = 42 * 64
    q = jnp.zeros((1, t, 16, 128), jnp.bfloat16)
    v = jnp.zeros((1, t, 32, 128), jnp.bfloat16)
    g = jnp.zeros((1, t, 32), jnp.float32)
    cu = list(range(0, t + 1, 64))
    for c, kw in ((cu, {}), (cu + [t] * 8, {}), (cu, dict(loop_ctas=None))):
        _, args = api.validate(q, q, v, g, g, plan=make_plan(c, num_tokens=t), backend="jax")
        _driver.prefill_arrays(args, **kw)
    assert seen == [("wide", 132), ("wide", 132), ("wide", None)], seen


@pytest.mark.parametrize("variant", ["fused_wide", "fused_wide_mma", "fused_wide_mma_persistent"])
@pytest.mark.parametrize("hv,dv,poison", [(2, 128, True), (3, 64, False)])
def test_fused_wide_same_bits_as_two_kernels(hv, dv, poison, variant):
    """variant="fused_wide" (the wide loop's prep warpgroup doing the intra kernel's work; "_mma": on
    16-column slabs, :mod:`gdn.jax_backend.mosaic_gpu.slabs`, its products dots here; "_persistent": on
    3 CTAs walking the items) against
    the two kernels with the wide loop: the same bits under the interpreter (both invert with the
    same jnp substitution), outputs and final states, with tiles shared by sequences (one of 1
    token, one empty), an initial state, and a neighbour whose q, k, v, g and beta are NaN (its
    own rows are not compared); both meet the float64 bar on the clean sequences."""
    import jax.numpy as jnp

    from gdn import api, plan as make_plan, reference as R
    from gdn.inputs import make_inputs, round_to_dtype
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.tolerances import vs_f64

    lens = [70, 1, 129, 0, 50]
    x = make_inputs(lens=lens, h=1, hv=hv, k=64, v=dv, initial_state=True, seed=41)
    qkv = [round_to_dtype(a, "bfloat16") for a in (x.q, x.k, x.v)]
    g, beta = np.array(x.g), np.array(x.beta)
    cu = np.asarray(x.cu_seqlens)
    bad = slice(int(cu[2]), int(cu[3]))  # the 129-token sequence shares a tile with each neighbour
    if poison:
        for a in qkv + [g, beta]:
            a[:, bad] = np.nan
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv)
    p = make_plan(cu, num_tokens=q.shape[1])

    def run(**opts):
        _, args = api.validate(q, k, v, jnp.asarray(g), jnp.asarray(beta), plan=p, backend="jax",
                               initial_state=jnp.asarray(x.initial_state), output_final_state=True)
        o, f = D.prefill_arrays(args, interpret=True, **opts)
        return np.asarray(o, np.float64), np.asarray(f)[:len(lens)]

    o_w, f_w = run(chunk_variant="wide")
    persist = variant.endswith("_persistent")
    o_f, f_f = run(variant=variant.removesuffix("_persistent"),
                   **(dict(loop_ctas=3, loop_prefetch=True, loop_schedule="table") if persist else {}))
    clean = np.ones(q.shape[1], bool)
    if poison:
        clean[bad] = False
    keep = [n for n in range(len(lens)) if not (poison and n == 2)]
    np.testing.assert_array_equal(o_f[:, clean], o_w[:, clean])
    np.testing.assert_array_equal(f_f[keep], f_w[keep])
    assert np.isfinite(o_f[:, clean]).all() and np.isfinite(f_f[keep]).all()
    ref_o, ref_f = R.recurrent(*[np.nan_to_num(a) for a in qkv], np.nan_to_num(g), np.nan_to_num(beta),
                               cu_seqlens=cu, initial_state=x.initial_state)
    t_clean = clean.copy()
    t_clean[int(cu[-1]):] = False
    assert R.rms_ratio(o_f[:, t_clean], ref_o[:, t_clean]) < vs_f64("bfloat16")
    assert R.rms_ratio(f_f[keep], ref_f[keep]) < vs_f64("bfloat16")


@pytest.mark.parametrize("t,h,hv,piece_chunks,want_counts", [
    (32768, 2, 4, 32, [16]),   # one or two 32K prompts at TP8 heads: 16 pieces
    (32768, 4, 8, 64, [8]),
    (8192, 4, 8, 16, [8]),
])
def test_traced_split_pass2_loop_is_the_host_plans(monkeypatch, t, h, hv, piece_chunks, want_counts):
    """Under jit the split's pass 2 picks its loop from the piece counts of the batches the bucket
    is meant for (n sequences sharing the token rows), as the host plan picks from its pieces:
    the narrow loop at these TP head counts. The piece plan's row bound (T / step + N_pad) is no
    bucket: read as one it gave the counts 17..18 (wide) for 16 pieces, and the jitted split ran
    1.3x slower than the host plan's on an H100 (2026-12-06)."""
    import jax
    import jax.numpy as jnp

    from gdn import api, plan as make_plan
    from gdn.jax_backend import mosaic_gpu as M
    from gdn.jax_backend.mosaic_gpu import _driver as D
    from gdn.jax_backend.mosaic_gpu import split as S

    monkeypatch.setattr(D, "_sm_count", lambda: 132)
    monkeypatch.setattr(M, "check_runnable", lambda args, interpret=None: False)  # (lowered, not run)
    p = make_plan([0, t], num_tokens=t)
    assert S.bucket_piece_counts(p.to_jax(), piece_chunks, t) == want_counts
    host_pieces = -(-t // (piece_chunks * 64))
    assert S.traced_pass2_variant(p.to_jax(), piece_chunks, t, hv, 128) == D.pick_chunk_variant(
        host_pieces, hv, 128, 132) == "default"
    seen = []
    real = D.loop
    monkeypatch.setattr(D, "loop", lambda *a, **kw: (seen.append(kw["chunk_variant"]), real(*a, **kw))[1])
    sds = jax.ShapeDtypeStruct
    q, v = sds((1, t, h, 128), jnp.bfloat16), sds((1, t, hv, 128), jnp.bfloat16)
    g = sds((1, t, hv), jnp.float32)

    def fn(q, k, v, g, beta, plan):
        _, args = api.validate(q, k, v, g, beta, plan=plan, backend="jax")
        return S.run_split(args, piece_chunks)

    _lower_for_cuda(fn, q, q, v, g, g, p.to_jax())
    assert seen == ["default"], seen


@pytest.mark.parametrize("out", [dict(loop_overlap="update"), dict(loop_out_store="registers"),
                                 dict(loop_out_store="warp")], ids=["update", "registers", "warp"])
@pytest.mark.parametrize("options", [dict(), dict(loop_ctas=3, loop_prefetch="smem", loop_schedule="table")],
                         ids=["per_item", "persistent_h0smem"])
def test_wide_loop_output_under_update_same_bits(options, out):
    """loop_overlap="update" (the wide loop's output products issued before the state update, the
    output stored while the update computes: common.products_then) and loop_out_store "registers" /
    "warp" (whole output tiles without the SMEM tile's TMA store, partial ones through it; the
    interpreter runs "warp"'s whole tiles as "registers", its lanes are emulated above; the partial
    tiles' waits are its own) against the plain wide loop:
    the same bits, outputs and final states, on clean and poisoned inputs (9 sequences in 16 grid
    rows sharing tiles, an initial state with a NaN in one sequence's), on one CTA per item and on
    3 persistent CTAs."""
    res = _loop_io_bits("wide", **out, **options)
    assert res["clean_same_bits"] and res["poisoned_same_bits"], res
