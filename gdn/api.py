"""The public entry ``gdn.prefill``: validation in one place, then lazy dispatch to a backend."""
from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Any

import numpy as np

from .guards import check_devices, empty_result, is_empty
from .planner import Plan, plan as make_plan

__all__ = ["prefill", "PrefillArgs", "BACKENDS", "MAX_HEAD_DIM", "array_kind", "dtype_name"]

#: backend name -> module implementing ``run(args: PrefillArgs)`` and ``IMPLS``.
BACKENDS = {"jax": "gdn.jax_backend", "triton": "gdn.triton_backend"}
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = ("bfloat16", "float16", "float32")


class UnknownImplError(ValueError, NotImplementedError):
    """An impl name the backend does not have: a ValueError (bad input, named before any
    launch); also a NotImplementedError, what the triton backend raised for it before."""


@dataclasses.dataclass(frozen=True)
class PrefillArgs:
    """Validated arguments handed to a backend.

    Arrays are the caller's own objects (never modified). ``plan`` always exists: for a
    [B, T] batch without cu_seqlens it describes B sequences of T tokens packed as B * T, and the
    backend reshapes [B, T, ...] to [1, B * T, ...] (a view) before its kernels.
    """

    q: Any
    k: Any
    v: Any
    g: Any
    beta: Any
    plan: Plan
    initial_state: Any
    output_final_state: bool
    scale: float
    use_qk_l2norm: bool
    impl: str | None
    batch: int  # B of the caller's layout
    seqlen: int  # T of the caller's layout

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(H, HV, K, V)."""
        return self.q.shape[2], self.v.shape[2], self.q.shape[3], self.v.shape[3]


def array_kind(x: Any) -> str:
    """'torch', 'jax' or 'numpy' (TypeError for anything else)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return "jax"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"expected a torch tensor, a jax array or a NumPy array, got {type(x).__name__}")


def dtype_name(x: Any) -> str:
    """Framework-neutral dtype name: 'bfloat16', 'float32', 'int32', ..."""
    dt = x.dtype
    name = str(dt)
    return name[len("torch."):] if name.startswith("torch.") else name


def _is_float(name: str) -> bool:
    return name in ("bfloat16", "float16", "float32", "float64")


def _check_array(name: str, x: Any, ndim: int, kind: str | None) -> str:
    if x is None:
        raise TypeError(f"{name} is required, got None")
    try:
        k = array_kind(x)
    except TypeError:
        raise TypeError(f"{name} must be an array (torch tensor or jax array), got "
                        f"{type(x).__name__}") from None
    if kind is not None and k != kind and {k, kind} != {"jax", "numpy"}:  # jax takes NumPy
        raise TypeError(f"{name} is a {k} array but q is a {kind} array: pass one framework's arrays")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    return k


def validate(q, k, v, g, beta, *, cu_seqlens=None, plan=None, initial_state=None,
             output_final_state=True, scale=None, use_qk_l2norm=False, backend=None,
             impl=None) -> tuple[str, PrefillArgs]:
    """All argument checks of ``prefill``, for every backend. Returns (backend, args)."""
    kind = _check_array("q", q, 4, None)
    for name, x, nd in (("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
        _check_array(name, x, nd, kind)
    if backend is None:
        backend = "triton" if kind == "torch" else "jax"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    want = "torch" if backend == "triton" else "jax"
    if kind != want and not (want == "jax" and kind == "numpy"):
        raise TypeError(f"backend={backend!r} takes {want} arrays, got {kind} arrays for q")

    b, t, h, dk = (int(s) for s in q.shape)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (b, t):
        raise ValueError(f"v must be [B, T, HV, V] with B, T = {b}, {t} (q's), got {tuple(v.shape)}")
    hv, dv = int(v.shape[2]), int(v.shape[3])
    if h < 1 or hv < 1:
        raise ValueError(f"q.shape[2] (H) and v.shape[2] (HV) must be >= 1, got H = {h}, HV = {hv}")
    if hv % h:
        raise ValueError(f"the v heads HV = {hv} (v.shape[2]) must be a multiple of the q/k heads "
                         f"H = {h} (q.shape[2])")
    for name, d in (("q.shape[3] (K)", dk), ("v.shape[3] (V)", dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {d}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (b, t, hv):
            raise ValueError(f"{name} must be [B, T, HV] = {(b, t, hv)}, got {tuple(x.shape)}")
    dts = {n: dtype_name(x) for n, x in (("q", q), ("k", k), ("v", v))}
    for n, d in dts.items():
        if d not in _KERNEL_DTYPES:
            raise TypeError(f"{n} must be bfloat16, float16 or float32, got {d}")
    if len(set(dts.values())) != 1:
        raise TypeError(f"q, k and v must share one dtype, got {dts}")
    for n, x in (("g", g), ("beta", beta)):
        if not _is_float(dtype_name(x)):
            raise TypeError(f"{n} must be a floating dtype (used in float32), got {dtype_name(x)}")

    if cu_seqlens is not None and plan is not None:
        raise ValueError("pass cu_seqlens or plan, not both (the plan already holds cu_seqlens)")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a gdn.Plan (from gdn.plan(cu_seqlens)), got "
                            f"{type(plan).__name__}")
        if b != 1:
            raise ValueError(f"with plan (varlen), q must have B == 1 (packed), got B = {b}")
        if not plan.is_host:
            pk = _plan_kind(plan)
            if pk != ("torch" if backend == "triton" else "jax"):
                raise TypeError(f"plan holds {pk} arrays but backend={backend!r}: pass the host "
                                f"plan (gdn.plan(cu_seqlens)); each backend copies it to its device")
        if plan.num_tokens is not None and plan.num_tokens > t:
            raise ValueError(f"plan was built for {plan.num_tokens} tokens but the arrays hold "
                             f"T = {t} (q.shape[1]); build the plan from this batch's cu_seqlens")
        the_plan = plan
    elif cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"with cu_seqlens (varlen), q must have B == 1 (packed), got B = {b}")
        the_plan = make_plan(cu_seqlens, num_tokens=t)
    else:
        the_plan = make_plan(np.arange(b + 1, dtype=np.int64) * t, num_tokens=b * t)

    n_real, n_pad = the_plan.num_seqs, the_plan.padded_seqs
    if initial_state is not None:
        if array_kind(initial_state) not in ((kind,) if kind == "torch" else ("jax", "numpy")):
            raise TypeError(f"initial_state must be a {kind} array like q, got "
                            f"{array_kind(initial_state)}")
        shp = tuple(int(s) for s in initial_state.shape)
        ok_n = {n_pad} | ({n_real} if n_real is not None else set())
        if len(shp) != 4 or shp[0] not in ok_n or shp[1:] != (hv, dk, dv):
            want_n = n_real if n_real is not None else n_pad
            raise ValueError(f"initial_state must be [N, HV, K, V] = {(want_n, hv, dk, dv)}, got {shp}")
        if not _is_float(dtype_name(initial_state)):
            raise TypeError(f"initial_state must be a floating dtype, got {dtype_name(initial_state)}")
    check_devices(kind, {"q": q, "k": k, "v": v, "g": g, "beta": beta,
                         "initial_state": initial_state}, the_plan)
    if scale is None:
        scale = dk ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(use_qk_l2norm, (bool, np.bool_)):
        raise TypeError(f"use_qk_l2norm must be a bool, got {type(use_qk_l2norm).__name__}")
    if not isinstance(output_final_state, (bool, np.bool_)):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"impl must be a string or None, got {type(impl).__name__}")
    if impl is not None:
        impls = tuple(getattr(load_backend(backend), "IMPLS", ()))
        if impl not in impls:
            raise UnknownImplError(f"impl must be one of {list(impls)} for the {backend} backend "
                                   f"(or None), got {impl!r} (unknown impl)")
    return backend, PrefillArgs(q, k, v, g, beta, the_plan, initial_state, bool(output_final_state),
                                float(scale), bool(use_qk_l2norm), impl, b, t)


def _plan_kind(plan: Plan) -> str:
    """'torch', 'jax' or 'numpy': the framework of a plan's arrays (a traced plan is 'jax')."""
    mod = type(plan.cu_seqlens).__module__
    return "torch" if mod.startswith("torch") else "jax" if mod.startswith("jax") else "numpy"


def load_backend(name: str):
    """Import a backend module lazily; NotImplementedError if it is missing or unusable here."""
    try:
        return importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"gdn backend {name!r} is not available: {e}") from e


def prefill(q, k, v, g, beta, *, cu_seqlens=None, plan: Plan | None = None, initial_state=None,
            output_final_state: bool = True, scale: float | None = None,
            use_qk_l2norm: bool = False, backend: str | None = None, impl: str | None = None,
            mesh=None, head_axis: str | None = None, seq_axis: str | None = None,
            seq_collective: str = "all_gather", split: bool | int | None = None):
    """Gated DeltaNet chunked prefill.

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V] (bf16, fp16 or fp32, one dtype); g (log decay, <= 0,
        per token, not cumsummed), beta: [B, T, HV], any float dtype, used in fp32.
      cu_seqlens: [N + 1] HOST integers for packed varlen (B == 1). A device array raises.
      plan: a prebuilt ``gdn.plan(cu_seqlens)`` instead of cu_seqlens (reuse it across layers).
      initial_state: [N, HV, K, V], any float dtype, never modified.
      output_final_state: return the fp32 final states [N, HV, K, V] (else None).
      scale: default K ** -0.5. use_qk_l2norm: L2-normalize q and k (fp32) first.
      backend: "jax" (jax arrays) or "triton" (torch tensors); default from q's type.
      impl: a backend implementation name, or None for the best one that supports the call.
      mesh, head_axis, seq_axis: JAX only. Shard the heads over mesh axis ``head_axis`` (each
        device keeps whole GVA groups, no communication) and/or the packed tokens over
        ``seq_axis`` (exact: pieces' affine state maps are combined across devices).
      seq_collective: how ``seq_axis`` combines them: "all_gather" (every piece's map to every
        device, then one scan) or "ppermute" (a chain of sends to the right neighbour).
      split: the exact sequence split on one device (gdn/split.py): True lets
        ``gdn.planner.split_policy`` decide, an int sets the piece size in chunks, False is off.
        None (the default) is True on jax's mosaic_gpu path with a packed batch
        (``gdn.split.auto_split_applies``: its model splits one or two long prompts at few v
        heads, as in tensor-parallel serving, and keeps the rest unsplit) and off elsewhere.
        Needs a packed batch, and a host plan except on mosaic_gpu: there a plan traced under
        ``jax.jit`` is cut on the device, in pieces chosen for every batch of equal sequences the
        bucket holds. On jax's mosaic_gpu impl the pieces run in two
        passes on its kernels (gdn/jax_backend/mosaic_gpu/split.py: the pieces' state maps, a
        scan, the pieces from their true starts); elsewhere through the backend with K extra value
        columns and a correction of o (a correctness tool: 38.8 ms against 1.28 unsplit at 1x32768
        on the H200, 2026-12-03). benchmarks/RESULTS.md has the measured times.

    Returns (o [B, T, HV, V] in q's dtype, final_state fp32 [N, HV, K, V] or None). Tokens past
    ``cu_seqlens[-1]`` get zero output. Under ``jax.jit`` with the plan passed as an argument the
    real sequence count is unknown and final_state has the plan's padded count N_pad of rows.
    """
    backend, args = validate(q, k, v, g, beta, cu_seqlens=cu_seqlens, plan=plan,
                             initial_state=initial_state, output_final_state=output_final_state,
                             scale=scale, use_qk_l2norm=use_qk_l2norm, backend=backend, impl=impl)
    if mesh is not None and backend != "jax":
        raise ValueError(f"mesh is a JAX sharding: it needs backend='jax', got {backend!r}")
    if mesh is None and (head_axis is not None or seq_axis is not None):
        raise ValueError("head_axis/seq_axis need mesh=jax.sharding.Mesh(...)")
    from .jax_backend.sharded import check_seq_collective  # light: numpy and the planner

    check_seq_collective(seq_collective)  # a bad value raises with or without a mesh
    if is_empty(args):  # no token to compute: no backend, no launch (docs/RELIABILITY.md)
        return empty_result(args, "torch" if backend == "triton" else "jax")
    if mesh is not None:
        if split:
            raise ValueError("split and mesh do not combine: seq_axis already splits the tokens")
        from .jax_backend.sharded import run_sharded

        return run_sharded(args, mesh, head_axis, seq_axis, seq_collective)
    if split is None:
        from .split import auto_split_applies

        split = auto_split_applies(backend, args)
    if split:
        if isinstance(split, bool):
            piece_chunks = None
        elif isinstance(split, numbers.Integral) and split > 0:
            piece_chunks = int(split)
        else:
            raise ValueError(f"split must be True, False, None or a positive int, got {split!r}")
        from .split import run_split

        return run_split(backend, args, piece_chunks)
    return load_backend(backend).run(args)
