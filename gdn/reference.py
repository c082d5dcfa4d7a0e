"""Float64 NumPy references of the gated delta rule (DESIGN.md §1).

Two independent implementations of the same function:

- :func:`recurrent`: the token loop, the ground truth.
- :func:`chunked`: the chunked WY/UT form driven by a :class:`gdn.Plan`, stage by stage, with
  the intermediates of the kernel chains (``stages=True``) so each kernel stage can be checked.

Layout (FLA's): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; with ``cu_seqlens``
B == 1 and the sequences are packed along T. v head j reads q/k head ``j // G`` (G = HV / H).
States are [N, HV, K, V]. Everything is computed in float64 whatever the input dtype.

Stage contract shared by the backends (packed, T tokens, NT chunk rows of the plan):
  gc     [T, HV]          chunk-local inclusive cumsum of g (fp32 in kernels)
  Ai     [T, HV, BT]      row r of (I + A)^-1 for the token at local position r of its chunk
  w      [T, HV, K]       Ai diag(beta exp(gc)) K
  u      [T, HV, V]       Ai diag(beta) V
  h      [NT, HV, K, V]   state at the start of each chunk (row order of chunk_indices)
  v_new  [T, HV, V]       u - w h
  o      [T, HV, V], final [N, HV, K, V]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .planner import Plan, plan as make_plan

__all__ = ["recurrent", "chunked", "l2norm", "to_numpy64", "rms_ratio"]


def to_numpy64(x: Any) -> np.ndarray | None:
    """Any array (NumPy, torch on any device, jax) -> float64 NumPy (a copy). None stays None."""
    if x is None:
        return None
    if type(x).__module__.startswith("torch"):
        x = x.detach().to("cpu").double().numpy()
    return np.array(x, dtype=np.float64)


def rms_ratio(out: Any, ref: Any) -> float:
    """FLA's accuracy metric: rms(out - ref) / rms(ref) (NaN anywhere gives inf)."""
    a, b = to_numpy64(out), to_numpy64(ref)
    if a.shape != b.shape:
        raise ValueError(f"rms_ratio: shapes differ, {a.shape} vs {b.shape}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = np.sqrt(np.mean(b * b)) if b.size else 0.0
    num = np.sqrt(np.mean((a - b) ** 2)) if b.size else 0.0
    return float(num / den) if den > 0 else float(num)


def l2norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(sum(x^2) + eps) over the last axis (DESIGN.md §1)."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta, cu_seqlens, initial_state, scale, use_qk_l2norm):
    """Packed float64 copies: q, k [T, HV, K] (heads expanded), v [T, HV, V], g, beta [T, HV]."""
    q, k, v, g, beta = (to_numpy64(a) for a in (q, k, v, g, beta))
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    cu = np.arange(b + 1) * t if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    q, k = q.reshape(b * t, h, dk), k.reshape(b * t, h, dk)
    v, g, beta = v.reshape(b * t, hv, dv), g.reshape(b * t, hv), beta.reshape(b * t, hv)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    grp = hv // h
    q, k = np.repeat(q, grp, axis=1), np.repeat(k, grp, axis=1)
    scale = dk ** -0.5 if scale is None else float(scale)
    n = cu.size - 1
    h0 = np.zeros((n, hv, dk, dv)) if initial_state is None else to_numpy64(initial_state)[:n]
    return q, k, v, g, beta, cu, h0, scale, (b, t)


def recurrent(q, k, v, g, beta, *, cu_seqlens=None, initial_state=None, scale=None,
              use_qk_l2norm=False):
    """Token-loop ground truth. Returns (o [B, T, HV, V], final_state [N, HV, K, V]), float64.

    Tokens past ``cu_seqlens[-1]`` get zero output.
    """
    q, k, v, g, beta, cu, h0, scale, (b, t) = _prepare(
        q, k, v, g, beta, cu_seqlens, initial_state, scale, use_qk_l2norm)
    o = np.zeros_like(v)
    final = h0.copy()
    for n in range(cu.size - 1):
        s = h0[n].copy()  # [HV, K, V]
        for i in range(cu[n], cu[n + 1]):
            s *= np.exp(g[i])[:, None, None]
            u = beta[i][:, None] * (v[i] - np.einsum("hkv,hk->hv", s, k[i]))
            s += k[i][:, :, None] * u[:, None, :]
            o[i] = scale * np.einsum("hkv,hk->hv", s, q[i])
        final[n] = s
    return o.reshape(b, t, *o.shape[1:]), final


def chunked(q, k, v, g, beta, *, plan: Plan | None = None, cu_seqlens=None, initial_state=None,
            scale=None, use_qk_l2norm=False, stages: bool = False):
    """Chunked WY form in float64, walking the plan's chunk rows in order.

    Returns (o [B, T, HV, V], final [N, HV, K, V]) and, with ``stages=True``, a dict of the
    stage tensors of the module docstring (packed layout, float64).
    """
    bsz, t_in = np.shape(q)[:2]
    if plan is not None:
        cu_seqlens = np.asarray(plan.cu_seqlens)[: plan.num_seqs + 1]
    elif cu_seqlens is None:
        cu_seqlens = np.arange(bsz + 1) * t_in
    if plan is None:
        plan = make_plan(cu_seqlens, num_tokens=bsz * t_in)
    q, k, v, g, beta, _, h0, scale, (b, t) = _prepare(
        q, k, v, g, beta, cu_seqlens, initial_state, scale, use_qk_l2norm)
    cu = np.asarray(plan.cu_seqlens, np.int64)
    bt = plan.chunk_size
    n_tok, hv, dk = k.shape
    dv = v.shape[2]
    gc = np.zeros((n_tok, hv))
    ai = np.zeros((n_tok, hv, bt))
    w = np.zeros((n_tok, hv, dk))
    u = np.zeros((n_tok, hv, dv))
    v_new = np.zeros((n_tok, hv, dv))
    o = np.zeros((n_tok, hv, dv))
    hs = np.zeros((plan.num_chunks, hv, dk, dv))
    final = h0.copy()
    state = None
    for row in range(plan.num_chunks):
        n, c = (int(x) for x in plan.chunk_indices[row])
        if c == 0:
            state = h0[n].copy()
        s0 = cu[n] + c * bt
        s1 = min(s0 + bt, cu[n + 1])
        sl = slice(s0, s1)
        L = s1 - s0
        gam = np.cumsum(g[sl], axis=0)  # [L, HV]
        gc[sl] = gam
        # head-major [HV, L, ...] so that every product below is a batched BLAS matmul
        # (contiguous copies: NumPy's matmul takes BLAS only for contiguous operands)
        kc, qc, vc = (np.ascontiguousarray(x[sl].transpose(1, 0, 2)) for x in (k, q, v))
        kt = np.ascontiguousarray(kc.transpose(0, 2, 1))  # [HV, K, L]
        bc, gh = beta[sl].T, gam.T  # [HV, L]
        # decay matrix exp(gam_r - gam_s) for r >= s (upper triangle selected away first)
        diff = gh[:, :, None] - gh[:, None, :]  # [HV, L, L]
        tril = np.tril(np.ones((L, L), bool))
        dec = np.where(tril, np.exp(np.where(tril, diff, 0.0)), 0.0)
        kk = kc @ kt
        strict = np.tril(np.ones((L, L), bool), -1)
        a = np.where(strict, bc[:, :, None] * kk * dec, 0.0)  # [HV, L, L]
        inv = np.linalg.inv(np.eye(L) + a)
        ai[sl, :, :L] = inv.transpose(1, 0, 2)
        wh = inv @ ((bc * np.exp(gh))[:, :, None] * kc)  # [HV, L, K]
        uh = inv @ (bc[:, :, None] * vc)  # [HV, L, V]
        w[sl], u[sl] = wh.transpose(1, 0, 2), uh.transpose(1, 0, 2)
        hs[row] = state
        vn = uh - wh @ state
        v_new[sl] = vn.transpose(1, 0, 2)
        qk = (qc @ kt) * dec
        o[sl] = (scale * (np.exp(gh)[:, :, None] * (qc @ state) + qk @ vn)).transpose(1, 0, 2)
        last = gam[L - 1]  # [HV]: the gate of the last valid token closes the chunk
        state = (np.exp(last)[:, None, None] * state
                 + (kt * np.exp(last[:, None] - gh)[:, None, :]) @ vn)
        if s1 == cu[n + 1]:
            final[n] = state
    o_out = o.reshape(b, t, hv, dv)
    if not stages:
        return o_out, final
    return o_out, final, {"gc": gc, "Ai": ai, "w": w, "u": u, "h": hs, "v_new": v_new}

