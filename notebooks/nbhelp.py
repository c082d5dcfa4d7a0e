"""What the gdn notebooks share: where they run, which implementations exist here, inputs per
backend, a float64 truth, a timer. Kept small so each notebook reads on its own.

Every notebook starts with ``SIZE = nbhelp.setup()``: "gpu" when a CUDA device is present, else
"cpu" (tiny shapes, Triton and Pallas kernels in interpret mode). ``setup("cpu")`` (or the
environment variable GDN_NOTEBOOK_SIZE=cpu) forces the small shapes on a GPU machine.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_present() -> bool:
    try:
        import torch  # does not import triton: TRITON_INTERPRET can still be set after this

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def setup(size: str | None = None) -> str:
    """Set the environment for this machine (before jax / triton are imported); return SIZE."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    gpu = cuda_present()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax share the GPU
    os.environ.setdefault("FLA_FLASH_QLA", "0")  # FLA's own Triton path, not FlashQLA
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    size = size or os.environ.get("GDN_NOTEBOOK_SIZE") or ("gpu" if gpu else "cpu")
    if size not in ("cpu", "gpu"):
        raise ValueError(f"SIZE must be 'cpu' or 'gpu', got {size!r}")
    try:  # inline PNG figures in Jupyter / nbclient
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None:
            ip.run_line_magic("matplotlib", "inline")
            ip.run_line_magic("config", "InlineBackend.figure_format = 'png'")
    except Exception:
        pass
    return size


def machine() -> str:
    """One line: date, devices, versions."""
    import jax

    parts = [datetime.date.today().isoformat(), f"python {platform.python_version()}",
             f"jax {jax.__version__} on {', '.join(sorted({str(d.device_kind) for d in jax.devices()}))}"]
    try:
        import torch
        import triton

        dev = torch.cuda.get_device_name() if cuda_present() else "CPU"
        parts.append(f"torch {torch.__version__} / triton {triton.__version__} on {dev}")
    except Exception as e:
        parts.append(f"torch/triton unavailable ({type(e).__name__})")
    parts.append(f"{os.cpu_count()} CPU cores")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parts.append("TRITON_INTERPRET=1")
    return "; ".join(parts)


def label(im) -> str:
    return f"{im.backend}:{im.impl}"


def available(quiet: bool = False) -> list:
    """The implementations usable here (gdn.implementations()); a printed note for the others."""
    import gdn

    out = []
    for im in gdn.implementations():
        if im.available:
            out.append(im)
        elif not quiet:
            print(f"  (skipping {label(im)}: {im.reason})")
    return out


def interpreted(im) -> bool:
    """True where ``im`` runs in an interpreter here (Triton / Pallas kernels without a GPU):
    correct, but seconds per call, so the notebooks give it tiny inputs and never time it."""
    from gdn.arrays import on_gpu

    return im.impl != "xla" and not on_gpu(im.backend)


def backend_arrays(x, backend: str, dtype: str = "bfloat16"):
    """(q, k, v, g, beta, initial_state) of gdn.inputs.Inputs ``x`` as the backend's arrays:
    q/k/v in ``dtype``, g/beta/state in fp32 (torch on CUDA if present, jax on its default device)."""
    from gdn.arrays import convert

    qkv = [convert(a, backend, dtype) for a in (x.q, x.k, x.v)]
    gb = [convert(a, backend, "float32") for a in (x.g, x.beta)]
    return (*qkv, *gb, convert(x.initial_state, backend, "float32"))


def run(im, x, dtype: str = "bfloat16", plan=None, **kw):
    """gdn.prefill of inputs ``x`` with implementation ``im``: (o, final) as float64 NumPy, or
    None (with a printed note) when the implementation does not support the call."""
    import gdn
    from gdn.reference import to_numpy64

    q, k, v, g, beta, h0 = backend_arrays(x, im.backend, dtype)
    if plan is None:
        plan = gdn.plan(x.cu_seqlens, num_tokens=x.q.shape[1])
    try:
        o, s = gdn.prefill(q, k, v, g, beta, plan=plan, initial_state=h0, backend=im.backend,
                           impl=im.impl, **kw)
    except NotImplementedError as e:
        print(f"  ({label(im)} does not support this call: {e})")
        return None
    return to_numpy64(o), to_numpy64(s)


def rounded(x, dtype: str):
    """A copy of Inputs ``x`` with q, k, v rounded to ``dtype``: what a kernel sees after the cast."""
    import dataclasses

    from gdn.inputs import round_to_dtype

    return dataclasses.replace(x, q=round_to_dtype(x.q, dtype), k=round_to_dtype(x.k, dtype),
                               v=round_to_dtype(x.v, dtype))


def truth(x, dtype: str = "bfloat16", **kw):
    """float64 reference (o, final) on the dtype-rounded inputs (token loop; chunked form for
    long batches, where the Python token loop would be slow)."""
    from gdn import reference

    r = rounded(x, dtype)
    fn = reference.recurrent if r.q.shape[1] <= 4096 else reference.chunked
    return fn(r.q, r.k, r.v, r.g, r.beta, cu_seqlens=r.cu_seqlens, initial_state=r.initial_state,
              **kw)


def median_time(fn, reps: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (fn must block on its own result if it should)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]
