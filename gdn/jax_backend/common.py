"""Pieces every JAX implementation of gdn shares: the entry around a jitted core, layouts, dots.

An implementation module provides a *core*: a ``jax.jit``-ed function

    core(q, k, v, g, beta, plan, h0, *, scale, use_qk_l2norm, output_final_state,
         return_stages, **impl_static) -> (o [B, T, HV, V], final [N_pad, HV, K, V] | None,
                                            stages dict | None)

with the Plan as a pytree argument (its padded sizes are static aux data) and ``h0`` None or
``[N_pad, HV, K, V]``. :func:`run_core` adapts a validated :class:`gdn.api.PrefillArgs` to it:
the plan goes to the device once (memoized on the plan) unless we are inside a trace, an
initial state with ``N`` rows is padded to ``N_pad`` and the final state is cut back to ``N``
by tiny separately-jitted ops, so the core compiles once per bucket and not once per ``N``.
Nothing here reads a device value on the host.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from .. import planner
from ..split import pow2_at_least

__all__ = ["run_core", "pack", "rstd", "l2normalize", "dot", "token_valid", "pallas_triton_warnings",
           "TRACE_COUNTS", "count_trace", "next_pow2"]

planner._maybe_register()  # the Plan is a pytree from here on (jax is imported)

try:  # Importing Pallas' fuser defines a config that is part of jax's trace context. When that
    # import first happens inside a call (Mosaic GPU's lowering does it), every jit cache entry made
    # before it misses once more: a second compilation of the same bucket. Import it up front.
    import jax.experimental.pallas.fuser  # noqa: F401
except ImportError:  # pragma: no cover - a jax without it has no such config either
    pass

#: core name -> number of times it was traced (tests check that a bucket compiles once)
TRACE_COUNTS: dict[str, int] = {}


def count_trace(name: str) -> None:
    TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


def next_pow2(n: int, floor: int = 1) -> int:
    return max(int(floor), pow2_at_least(n))


@contextlib.contextmanager
def pallas_triton_warnings():
    """Silence exactly jax's 'Pallas Triton backend is deprecated' warning (jax 0.11 emits it
    each time a Pallas-Triton kernel is lowered; we pin jax, so it is not news to our users).

    It is raised at lowering time: around an eager call of our jitted core that is inside this
    context; under the caller's own ``jax.jit`` the lowering happens in the caller's compile,
    outside our reach, and the warning may show once there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated",
                                category=DeprecationWarning)
        yield


def _tracing() -> bool:
    """True inside a jax trace (jit, vmap...), where a memoized device copy would leak."""
    try:
        from jax._src import core as _core

        return not _core.trace_state_clean()
    except Exception:  # private API moved: be safe, never memoize
        return True


@functools.partial(jax.jit, static_argnums=1)
def _pad_rows(x, rows: int):
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, rows - x.shape[0], 0)] + [(0, 0, 0)] * 3)


@functools.partial(jax.jit, static_argnums=1)
def _take_rows(x, rows: int):
    return lax.slice_in_dim(x, 0, rows)


def run_core(core: Callable, args: Any, return_stages: bool = False, **impl_static):
    """Call ``core`` on validated PrefillArgs; returns what the backend's ``run`` returns."""
    plan = args.plan
    if plan.is_host and not _tracing():
        plan = plan.to_jax()  # memoized: a plan reused by every layer is copied once
    h0 = args.initial_state
    if h0 is not None and h0.shape[0] != plan.padded_seqs:
        h0 = _pad_rows(h0, plan.padded_seqs)
    with pallas_triton_warnings():
        o, final, stages = core(args.q, args.k, args.v, args.g, args.beta, plan, h0,
                                scale=args.scale, use_qk_l2norm=args.use_qk_l2norm,
                                output_final_state=args.output_final_state,
                                return_stages=return_stages, **impl_static)
    n = args.plan.num_seqs
    if final is not None and n is not None and n != final.shape[0]:
        final = _take_rows(final, n)
    return (o, final, stages) if return_stages else (o, final)


def rstd(x):
    """1 / sqrt(sum(x^2) + 1e-6) over the last axis, fp32: the use_qk_l2norm scale of each row."""
    xf = x.astype(jnp.float32)
    return lax.rsqrt(jnp.sum(xf * xf, axis=-1) + 1e-6)


def l2normalize(x):
    """``x`` scaled by :func:`rstd` of its rows, in ``x``'s dtype (a normalized copy)."""
    return (x.astype(jnp.float32) * rstd(x)[..., None]).astype(x.dtype)


def pack(q, k, v, g, beta, use_qk_l2norm: bool):
    """[B, T, ...] -> packed [B*T, ...]; g, beta to fp32.

    Returns (q, k, v, g, beta, q_rstd, k_rstd). With use_qk_l2norm, q and k are NOT rewritten:
    their row scales q_rstd, k_rstd [T, H] (fp32, one reduction each) enter the kernels next to
    the gates, so the normalized q and k are never rounded to the input dtype (like the Triton
    backend); without it both are None.
    """
    b, t = q.shape[:2]
    q, k, v = (x.reshape(b * t, *x.shape[2:]) for x in (q, k, v))
    g, beta = (x.reshape(b * t, x.shape[2]).astype(jnp.float32) for x in (g, beta))
    rq, rk = (rstd(q), rstd(k)) if use_qk_l2norm else (None, None)
    return q, k, v, g, beta, rq, rk


def token_valid(plan, num_tokens: int):
    """[T] bool: token t lies inside a sequence (t < cu_seqlens[-1]), computed on device."""
    return jnp.arange(num_tokens, dtype=jnp.int32) < plan.cu_seqlens[-1]


def dot(spec: str, a, b, dtype):
    """einsum with the numerics of the kernels: operands rounded to the input dtype ``dtype``,
    fp32 accumulation; fp32 inputs use IEEE fp32 (HIGHEST), never TF32.

    On a CPU the rounded operands are multiplied in fp32 (XLA:CPU lacks some bf16 x bf16 -> f32
    dots, and the product of two bf16/fp16 values is exact in fp32, so the result is the same).
    """
    a, b = a.astype(dtype), b.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32 or jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
