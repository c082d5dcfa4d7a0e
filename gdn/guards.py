"""Checks and short-cuts every backend goes through (called by gdn.api; see docs/RELIABILITY.md).

- :func:`check_devices`: all arrays of one call on one device (torch) or one device set (jax),
  the plan's device arrays included. Reads array *metadata* only (``.device``, ``.devices()``),
  never a value: no device-to-host sync. A ValueError names the argument, before any launch.
- :func:`empty_result`: a call with no token to compute (T = 0, B = 0, or every sequence
  empty) is answered here without a kernel launch: zero output, final state = initial state.
"""
from __future__ import annotations

from typing import Any

__all__ = ["check_devices", "empty_result", "is_empty"]


def _torch_device(x: Any):
    return getattr(x, "device", None)


def _jax_devices(x: Any) -> frozenset | None:
    """The device set of a concrete, committed jax array; None for NumPy arrays, tracers and
    uncommitted arrays (those follow the others: jax moves them)."""
    if not type(x).__module__.startswith(("jax", "jaxlib")):
        return None
    try:
        if not x.committed:
            return None
        return frozenset(x.devices())
    except Exception:  # a tracer: placed by the caller's jit, nothing to compare
        return None


def _names(devs: frozenset) -> str:
    return ", ".join(sorted(str(d) for d in devs))


def check_devices(kind: str, arrays: dict[str, Any], plan: Any = None) -> None:
    """ValueError naming the first array that is not where the others are.

    ``arrays``: name -> array in argument order (q first; None entries are skipped). ``kind``:
    'torch' or 'jax' (NumPy arrays, allowed for the jax backend, live nowhere in particular).
    A plan holding device arrays is checked too (a host plan is copied where q is).
    """
    items = [(n, x) for n, x in arrays.items() if x is not None]
    if plan is not None and not plan.is_host:
        items.append(("plan", plan.cu_seqlens))
    if kind == "torch":
        ref_name, ref = items[0]
        dev = _torch_device(ref)
        for name, x in items[1:]:
            d = _torch_device(x)
            if d is not None and d != dev:
                what = "the plan's arrays are" if name == "plan" else f"{name} is"
                raise ValueError(f"{what} on {d} but {ref_name} is on {dev}: every tensor of a "
                                 f"call (initial_state and the plan included) must be on one "
                                 f"device")
        return
    first = None
    for name, x in items:
        devs = _jax_devices(x)
        if devs is None:
            continue
        if first is None:
            first = (name, devs)
        elif devs != first[1]:
            what = "the plan's arrays are" if name == "plan" else f"{name} is"
            raise ValueError(f"{what} on {_names(devs)} but {first[0]} is on {_names(first[1])}: "
                             f"every jax array of a call (initial_state and the plan included) "
                             f"must be on the same device(s); jax.device_put them together")


def is_empty(args) -> bool:
    """True when the call has no token to compute: T = 0 or B = 0 (static shapes, known even
    under jax.jit), or a host plan whose sequences are all empty."""
    if args.batch * args.seqlen == 0:
        return True
    return args.plan.num_tokens == 0


def empty_result(args, kind: str):
    """(o, final) of a call with no token to compute (:func:`is_empty`), without any launch.

    o is zeros [B, T, HV, V] in q's dtype (tokens past cu_seqlens[-1] read zero); the final
    state is the initial state in fp32 (a copy, never the caller's array) or zeros, with the
    plan's N rows (N_pad when N is unknown under jax.jit), or None without output_final_state.
    """
    _, hv, dk, dv = args.dims
    b, t = args.batch, args.seqlen
    n = args.plan.num_seqs if args.plan.num_seqs is not None else args.plan.padded_seqs
    h0 = args.initial_state
    if kind == "torch":
        import torch

        o = torch.zeros(b, t, hv, dv, dtype=args.q.dtype, device=args.q.device)
        if not args.output_final_state:
            return o, None
        final = torch.zeros(n, hv, dk, dv, dtype=torch.float32, device=args.q.device)
        if h0 is not None:
            rows = min(n, h0.shape[0])
            final[:rows] = h0[:rows].to(device=final.device, dtype=torch.float32)
        return o, final

    import jax.numpy as jnp

    o = jnp.zeros((b, t, hv, dv), dtype=args.q.dtype)
    devs = _jax_devices(args.q)
    if devs is not None and len(devs) == 1:
        import jax

        o = jax.device_put(o, next(iter(devs)))
    if not args.output_final_state:
        return o, None
    if h0 is None:
        final = jnp.zeros((n, hv, dk, dv), jnp.float32)
    else:
        final = jnp.asarray(h0).astype(jnp.float32)[:n]
        if final.shape[0] < n:
            final = jnp.pad(final, ((0, n - final.shape[0]), (0, 0), (0, 0), (0, 0)))
    return o, final
