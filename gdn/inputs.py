"""Random GDN prefill inputs for tests, the parity suite, benchmarks and the demo (NumPy, fp32).

Gates (``gates=``):
  "qwen"    realistic Qwen3.5 gates, the generator of vLLM's CuteDSL-vs-FLA test (DESIGN.md §3):
            per v head A ~ U(0, 16), A_log = log A, dt = exp(U(ln 1e-3, ln 1e-1)) clamped >= 1e-4,
            dt_bias = dt + log(-expm1(-dt)); per token a, b ~ N(0, 1);
            g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b).
  "uniform" g ~ U(-0.1, 0) per token, beta ~ U(0, 1): FLA's unit-test style.
  "strong"  g near -20 per token (state wiped every token).
  "none"    g = 0 on half the tokens (no decay at all there), -0.01 elsewhere.
Betas can be forced with ``beta="low"`` (near 0) or ``beta="high"`` (near 1).
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Inputs", "make_inputs", "qwen_gates", "softplus"]


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x), linear above 20 like torch's softplus."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def qwen_gates(rng: np.random.Generator, t: int, hv: int) -> tuple[np.ndarray, np.ndarray]:
    """(g, beta) [t, hv] float32 drawn as Qwen3.5 checkpoints produce them."""
    a_param = rng.uniform(0, 16, size=hv)
    a_log = np.log(np.maximum(a_param, 1e-30))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=hv))
    dt = np.maximum(dt, 1e-4)
    dt_bias = dt + np.log(-np.expm1(-dt))
    a = rng.standard_normal((t, hv))
    b = rng.standard_normal((t, hv))
    g = -np.exp(a_log)[None, :] * softplus(a + dt_bias[None, :])
    beta = 1.0 / (1.0 + np.exp(-b))
    return g.astype(np.float32), beta.astype(np.float32)


@dataclasses.dataclass
class Inputs:
    """A packed batch (B = 1) in fp32 NumPy: q, k [1, T, H, K]; v [1, T, HV, V]; g, beta [1, T, HV];
    cu_seqlens [N + 1]; initial_state [N, HV, K, V] or None."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    g: np.ndarray
    beta: np.ndarray
    cu_seqlens: np.ndarray
    initial_state: np.ndarray | None

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.q, self.k, self.v, self.g, self.beta


def make_inputs(lens, h: int = 2, hv: int = 4, k: int = 32, v: int = 32, *, gates: str = "qwen",
                beta: str | None = None, initial_state: bool = False, l2norm_qk: bool = True,
                pad_tokens: int = 0, seed: int = 0) -> Inputs:
    """Random packed inputs for sequence lengths ``lens`` (zeros allowed).

    ``l2norm_qk`` normalizes q and k on the host, as the model does before the kernel (then the
    kernel's ``use_qk_l2norm`` is off); otherwise q and k are N(0, 1) and need ``use_qk_l2norm``
    or a small ``scale``. ``pad_tokens`` appends tokens past cu_seqlens[-1] (random values).
    """
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, dtype=np.int64)
    cu = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    t = int(cu[-1]) + int(pad_tokens)
    q = rng.standard_normal((1, t, h, k)).astype(np.float32)
    kk = rng.standard_normal((1, t, h, k)).astype(np.float32)
    if l2norm_qk:
        q /= np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6
        kk /= np.linalg.norm(kk, axis=-1, keepdims=True) + 1e-6
    vv = rng.standard_normal((1, t, hv, v)).astype(np.float32)
    if gates == "qwen":
        g, b = qwen_gates(rng, t, hv)
    elif gates == "uniform":
        g = rng.uniform(-0.1, 0, (t, hv)).astype(np.float32)
        b = rng.uniform(0, 1, (t, hv)).astype(np.float32)
    elif gates == "strong":
        g = rng.uniform(-21, -19, (t, hv)).astype(np.float32)
        b = rng.uniform(0, 1, (t, hv)).astype(np.float32)
    elif gates == "none":
        g = np.where(rng.uniform(size=(t, hv)) < 0.5, 0.0, -0.01).astype(np.float32)
        b = rng.uniform(0, 1, (t, hv)).astype(np.float32)
    else:
        raise ValueError(f"gates must be 'qwen', 'uniform', 'strong' or 'none', got {gates!r}")
    if beta == "low":
        b = rng.uniform(0, 1e-3, (t, hv)).astype(np.float32)
    elif beta == "high":
        b = (1 - rng.uniform(0, 1e-3, (t, hv))).astype(np.float32)
    elif beta is not None:
        raise ValueError(f"beta must be None, 'low' or 'high', got {beta!r}")
    h0 = None
    if initial_state:
        h0 = (0.1 * rng.standard_normal((lens.size, hv, k, v))).astype(np.float32)
    return Inputs(q, kk, vv, g[None], b[None], cu, h0)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded (nearest even) to ``dtype`` and returned as float32: the values a kernel
    sees after the cast, so the float64 reference measures the kernel and not the input cast."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(x), out, x)
    raise ValueError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {dtype!r}")
