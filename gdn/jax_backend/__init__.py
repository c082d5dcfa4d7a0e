"""The JAX backend of gdn: jax arrays in and out, callable inside the caller's ``jax.jit``.

Implementations, best first (``IMPLS``); each is a module with ``run(args, return_stages=False)``
(raises NotImplementedError for calls it does not support) and ``status() -> str | None``
(None when usable on this machine, else why not):

  mosaic_gpu     Pallas Mosaic GPU kernels, the Hopper fast path (gdn/jax_backend/mosaic_gpu)
  pallas_triton  Pallas kernels with the Triton lowering, one per stage like the Triton backend
                 (on a CPU they run in Pallas interpret mode, when asked for by name)
  xla            plain JAX: runs anywhere, the CPU fallback and the JAX reference

``impl=None`` takes, in order, the implementations of ``_AUTO[platform]`` that are usable here and
falls back to the next one when one raises NotImplementedError.
"""
from __future__ import annotations

import importlib

__all__ = ["IMPLS", "impl_status", "run"]

#: impl name -> module, best first. Adding an implementation is one line here.
_MODULES = {
    "mosaic_gpu": "gdn.jax_backend.mosaic_gpu",
    "pallas_triton": "gdn.jax_backend.pallas_triton",
    "xla": "gdn.jax_backend.xla",
}
IMPLS: tuple[str, ...] = tuple(_MODULES)

#: what impl=None tries, by platform (jax.default_backend()), in order.
_GPU_ORDER = ("mosaic_gpu", "pallas_triton", "xla")
_AUTO = {"gpu": _GPU_ORDER, "cuda": _GPU_ORDER}
_AUTO_DEFAULT = ("xla",)


def _load(impl: str):
    """(module, None) or (None, reason). A module that is missing or fails to import is a reason."""
    try:
        return importlib.import_module(_MODULES[impl]), None
    except Exception as e:  # ImportError, or anything its import raised
        return None, f"{_MODULES[impl]} is not available: {type(e).__name__}: {e}"


def _status(impl: str) -> str | None:
    mod, why = _load(impl)
    if mod is None:
        return why
    try:
        return mod.status()
    except Exception as e:
        return f"{impl}.status() failed: {type(e).__name__}: {e}"


def _platform() -> str | None:
    try:
        import jax

        return jax.default_backend()
    except Exception:  # no jax here: every impl's status says why
        return None


def impl_status() -> dict[str, str | None]:
    """impl -> None if usable on this machine, else the reason."""
    return {impl: _status(impl) for impl in IMPLS}


def run(args, return_stages: bool = False):
    """Run a validated gdn.api.PrefillArgs; see gdn.prefill for what is returned."""
    if args.impl is not None:
        if args.impl not in _MODULES:
            raise ValueError(f"impl must be one of {list(IMPLS)} for the jax backend (or None), "
                             f"got {args.impl!r}")
        why = _status(args.impl)
        if why is not None:
            raise NotImplementedError(f"jax impl {args.impl!r} is not usable here: {why}")
        return _load(args.impl)[0].run(args, return_stages)

    reasons = []
    for impl in _AUTO.get(_platform(), _AUTO_DEFAULT):
        why = _status(impl)
        if why is not None:
            reasons.append(f"{impl}: {why}")
            continue
        try:
            return _load(impl)[0].run(args, return_stages)
        except NotImplementedError as e:
            reasons.append(f"{impl}: {e}")
    raise NotImplementedError("no jax implementation supports this call: " + "; ".join(reasons))
