"""impl="xla": the chunked gated delta rule in plain JAX. Runs on every platform; the CPU
fallback and the JAX-side reference of the Pallas kernels (same stages, same rounding points).

Layout. Every chunk row r of the plan (``chunk_indices[r] = (n, c)``) gathers its <= 64 tokens
``cu[n] + 64 c + i`` into a dense ``[NT_pad, 64, ...]`` block (rows past the sequence end and
sentinel rows masked to zero). The v heads are viewed as ``HV = H x G`` (q/k head ``j // G``),
so q and k are never repeated G times.

Stages (the stage contract of gdn.reference; FLA's rounding points):
  gc     chunk-local cumsum of g, fp32
  Ai     (I + A)^-1 by a batched unit-lower triangular solve, fp32 (IEEE on every platform)
  w, u   Ai diag(beta exp(gc)) K and Ai diag(beta) V, dot operands in the input dtype, stored in it
  h      the state at the start of each chunk row, stored in the input dtype
  v_new  u - w h, stored in the input dtype
  o      scale (exp(gc) q h + (causal(q k^T) * decay) v_new), in q's dtype
With use_qk_l2norm, q and k are not rewritten: their fp32 row scales 1/||x|| multiply the fp32
accumulators (k k^T, q k^T, q h) and join the row scales of K in w and in the state update,
exactly as in the Pallas kernels.

Inter-chunk recurrence: ONE ``lax.scan`` over the chunk rows in ``chunk_indices`` order
(``NT_pad`` steps, all heads of a chunk per step). The rows are seq-major, so a single fp32
state is carried: it restarts from ``h0[n]`` at every row with ``c == 0`` and, at the last row of
a sequence, is written into the ``[N_pad, HV, K, V]`` final-state buffer (also carried;
``dynamic_update_slice`` in a loop is in place). Why this design: the work is linear in the real
chunk count whatever the mix of lengths (a scan over "chunk position" with every sequence in
parallel costs ``max_chunks x N_pad`` steps of work: quadratic for one long sequence among many
short ones), the carry is one state and not all of them, and the scan needs no static bound
but ``padded_chunks``. Its cost is ``NT_pad`` sequential steps: cheap on a CPU, launch-bound on
a GPU, where the Pallas implementations are the fast path. Everything else (intra-chunk work,
outputs) is batched over all chunk rows at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .common import count_trace, dot, pack, run_core

__all__ = ["run", "status", "core"]

BT = 64


def status() -> str | None:
    return None  # plain JAX: runs wherever jax does


def run(args, return_stages: bool = False):
    return run_core(core, args, return_stages)


def _chunk_tokens(plan, bt: int):
    """Token index [NT_pad, BT] of every chunk row slot, its validity, and the row's (n, c)."""
    ci = plan.chunk_indices
    n, c = ci[:, 0], ci[:, 1]
    real = n >= 0
    ns = jnp.where(real, n, 0)
    bos = plan.cu_seqlens[ns] + c * bt
    eos = plan.cu_seqlens[ns + 1]
    tok = bos[:, None] + jnp.arange(bt, dtype=jnp.int32)[None, :]
    valid = real[:, None] & (tok < eos[:, None])
    return jnp.where(valid, tok, 0), valid, ns, c, real


def _gather(x, tok, valid):
    """[T, ...] -> [NT_pad, BT, ...], invalid slots zero."""
    y = jnp.take(x, tok, axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))


def _scatter(y, tok, valid, num_tokens: int):
    """[NT_pad, BT, ...] -> [T, ...]: each valid slot to its token, everything else zero."""
    idx = jnp.where(valid, tok, num_tokens).reshape(-1)  # out of range: dropped
    out = jnp.zeros((num_tokens,) + y.shape[2:], y.dtype)
    return out.at[idx].set(y.reshape((-1,) + y.shape[2:]), mode="drop", unique_indices=True)


def intra(kc, rkc, gcc, bc, valid, dt):
    """A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s) (r > s) and Ai = (I + A)^-1, fp32.

    kc [NT, BT, H, K]; rkc [NT, BT, H] (1/||k||) or None; gcc, bc [NT, BT, H, G].
    Returns Ai [NT, BT(r), H, G, BT(s)].
    """
    bt = kc.shape[1]
    kk = dot("nrhk,nshk->nhrs", kc, kc, dt)  # [NT, H, BT, BT]
    if rkc is not None:
        rk = jnp.moveaxis(rkc, 1, -1)  # [NT, H, BT]
        kk = kk * rk[..., :, None] * rk[..., None, :]
    g_ = jnp.moveaxis(gcc, 1, -1)  # [NT, H, G, BT]
    strict = jnp.tril(jnp.ones((bt, bt), bool), -1)
    keep = strict & valid[:, None, None, :, None] & valid[:, None, None, None, :]
    diff = jnp.where(keep, g_[..., :, None] - g_[..., None, :], 0.0)  # select before exp
    beta_r = jnp.moveaxis(bc, 1, -1)[..., :, None]
    a = jnp.where(keep, kk[:, :, None] * beta_r * jnp.exp(diff), 0.0)  # [NT, H, G, BT, BT]
    eye = jnp.eye(bt, dtype=jnp.float32)
    ai = lax.linalg.triangular_solve(eye + a, jnp.broadcast_to(eye, a.shape), left_side=True,
                                     lower=True, unit_diagonal=True)
    return jnp.moveaxis(ai, 3, 1)  # [NT, BT(r), H, G, BT(s)]


def _state_scan(wc, uc, kc, rkc, gcc, valid, ns, c, real, h0, n_pad: int, dt,
                want_final: bool):
    """The inter-chunk recurrence (see the module docstring).

    Returns h [NT, H, G, K, V] (dt), v_new [NT, BT, H, G, V] (dt), final [N_pad, H, G, K, V]."""
    _, _, hh, gg, kdim = wc.shape
    vdim = uc.shape[-1]
    last = jnp.sum(valid, axis=1) - 1  # index of the last valid slot of each row
    g_last = gcc[jnp.arange(gcc.shape[0]), jnp.maximum(last, 0)]  # [NT, H, G]
    is_last = real & (jnp.roll(c, -1) <= 0)  # next row starts a sequence or is a sentinel
    if h0 is None:
        h0 = jnp.zeros((n_pad, hh, gg, kdim, vdim), jnp.float32)

    def step(carry, xs):
        s, final = carry
        w, u, k, rk, gcr, ok, n, cc, gl, lst = xs
        s0 = jnp.where(cc == 0, lax.dynamic_index_in_dim(h0, n, keepdims=False), s)
        h = s0.astype(dt)
        vn = u.astype(jnp.float32) - dot("rhgk,hgkv->rhgv", w, h, dt)
        vn = jnp.where(ok[:, None, None, None], vn, 0.0)
        decay = jnp.where(ok[:, None, None], jnp.exp(gl[None] - gcr) * rk[:, :, None], 0.0)
        s1 = s0 * jnp.exp(gl)[..., None, None] + dot("rhk,rhgv->hgkv", k,
                                                     vn * decay[..., None], dt)
        if want_final:
            old = lax.dynamic_index_in_dim(final, n, keepdims=False)
            final = lax.dynamic_update_index_in_dim(final, jnp.where(lst, s1, old), n, 0)
        return (s1, final), (h, vn.astype(dt))

    s_init = jnp.zeros((hh, gg, kdim, vdim), jnp.float32)
    f_init = h0 if want_final else jnp.zeros((), jnp.float32)
    (_, final), (h, v_new) = lax.scan(
        step, (s_init, f_init), (wc, uc, kc, rkc, gcc, valid, ns, c, g_last, is_last))
    return h, v_new, (final if want_final else None)


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm", "output_final_state",
                                             "return_stages"))
def core(q, k, v, g, beta, plan, h0, *, scale: float, use_qk_l2norm: bool,
         output_final_state: bool, return_stages: bool):
    count_trace("xla")
    bsz, t_in, hh, kdim = q.shape
    hv, vdim = v.shape[2], v.shape[3]
    gg = hv // hh
    dt = q.dtype
    bt = plan.chunk_size
    n_tok = bsz * t_in
    q, k, v, g, beta, rq, rk = pack(q, k, v, g, beta, use_qk_l2norm)
    tok, valid, ns, c, real = _chunk_tokens(plan, bt)
    nt = tok.shape[0]
    qc, kc = _gather(q, tok, valid), _gather(k, tok, valid)  # [NT, BT, H, K]
    vc = _gather(v, tok, valid).reshape(nt, bt, hh, gg, vdim)
    gch = _gather(g, tok, valid).reshape(nt, bt, hh, gg)
    bc = _gather(beta, tok, valid).reshape(nt, bt, hh, gg)

    # with use_qk_l2norm: the 1/||q||, 1/||k|| row scales (q, k are not rewritten); else ones
    rqc, rkc = ((_gather(rq, tok, valid), _gather(rk, tok, valid)) if use_qk_l2norm
                else (jnp.ones((nt, bt, hh), jnp.float32),) * 2)

    gcc = jnp.cumsum(gch, axis=1)  # [NT, BT, H, G] fp32
    ai = intra(kc, rkc if use_qk_l2norm else None, gcc, bc, valid, dt)  # [NT, BT, H, G, BT]
    kw = kc.astype(jnp.float32)[:, :, :, None] * (bc * jnp.exp(gcc) * rkc[..., None])[..., None]
    wc = dot("nrhgs,nshgk->nrhgk", ai, kw, dt).astype(dt)
    uc = dot("nrhgs,nshgv->nrhgv", ai, vc.astype(jnp.float32) * bc[..., None], dt).astype(dt)
    if h0 is not None:
        h0 = h0.astype(jnp.float32).reshape(h0.shape[0], hh, gg, kdim, vdim)
    h, v_new, final = _state_scan(wc, uc, kc, rkc, gcc, valid, ns, c, real, h0, plan.padded_seqs,
                                  dt, output_final_state)

    # outputs, batched over all chunk rows
    inter = dot("nrhk,nhgkv->nrhgv", qc, h, dt) * (jnp.exp(gcc) * rqc[..., None])[..., None]
    rq_, rk_ = jnp.moveaxis(rqc, 1, -1), jnp.moveaxis(rkc, 1, -1)  # [NT, H, BT]
    qk = dot("nrhk,nshk->nhrs", qc, kc, dt) * rq_[..., :, None] * rk_[..., None, :]
    g_ = jnp.moveaxis(gcc, 1, -1)  # [NT, H, G, BT]
    causal = jnp.tril(jnp.ones((bt, bt), bool))
    diff = jnp.where(causal, g_[..., :, None] - g_[..., None, :], 0.0)
    att = jnp.where(causal, qk[:, :, None] * jnp.exp(diff), 0.0)  # [NT, H, G, BT, BT]
    intra_o = dot("nhgrs,nshgv->nrhgv", att, v_new, dt)
    oc = (scale * (inter + intra_o)).astype(dt)
    o = _scatter(oc.reshape(nt, bt, hv, vdim), tok, valid, n_tok).reshape(bsz, t_in, hv, vdim)
    if final is not None:
        final = final.reshape(final.shape[0], hv, kdim, vdim)
    stages = None
    if return_stages:
        sc = lambda y: _scatter(y.reshape(nt, bt, hv, *y.shape[4:]), tok, valid, n_tok)
        stages = {"gc": sc(gcc[..., None])[..., 0], "Ai": sc(ai), "w": sc(wc), "u": sc(uc),
                  "h": jnp.where(real[:, None, None, None], h.reshape(nt, hv, kdim, vdim), 0),
                  "v_new": sc(v_new)}
    return o, final, stages
