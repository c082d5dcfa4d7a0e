"""gdn: Gated DeltaNet chunked prefill for GPUs (Qwen3-Next / Qwen3.5 linear attention).

    import gdn
    p = gdn.plan(cu_seqlens_host)                      # NumPy, on the host, once per batch
    o, state = gdn.prefill(q, k, v, g, beta, plan=p)   # jax arrays -> JAX backend, torch -> Triton

``import gdn`` needs NumPy only; the backends import jax or torch/triton when first used.
"""
from .api import prefill
from .planner import Plan, bucket, padded_sizes, plan
from .registry import implementations

__all__ = ["prefill", "plan", "Plan", "bucket", "padded_sizes", "implementations"]
__version__ = "0.1.0"
