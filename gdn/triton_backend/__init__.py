"""The Triton backend of gdn: the chunked gated delta rule as a chain of our Triton kernels.

    intra     stages 1-2 (intra.py): gc = chunk-local cumsum(g) (cumsum.py) and
              Ai = (I + A)^-1 (stored in the input dtype; fp32 for return_stages)
    wu        stage 3 (wu.py): w and u from Ai, 64-row tensor-core tiles
    state     the serial state pass (state.py): h at every chunk start, v_new, final state
    output    o (output.py)

use_qk_l2norm never rewrites q or k: the intra kernel reads ||k||^2 off the diagonal of the
K K^T blocks it computes anyway (1 / ||k|| stored [T, H] fp32 for the later kernels), the
output kernel ||q||^2 off the diagonal of Q Q^T, and both enter as fp32 row / column scales
next to the gates. The normalized q and k are never rounded to the input dtype (more accurate
than normalizing first, and two passes over q and k fewer). No loaded tile feeds both a dot
and other arithmetic inside a pipelined loop: Triton 3.6 races there on sm_90 (xcompile.py).

Each stage module can also be called on its own (``cumsum.chunk_cumsum``,
``intra.chunk_inverse``, ``wu.wu``, ``state.state_pass``, ``output.output``) on the packed
tensors of the stage contract (gdn/reference.py), so the parity suite compares stage by stage.

Numerics: gc, Ai, the state and every accumulation in fp32; Ai, w, u, h, v_new stored in the
input dtype (rounded between kernels like FLA); o in q's dtype; the final state fp32. fp32
inputs use IEEE fp32 dots everywhere; the triangular solve's dots are IEEE for fp32 inputs and
tf32x3 (fp32-accurate, tensor cores) for 16-bit ones.

No device-to-host sync: grids come from the plan's host ints (padded_chunks for per-chunk
kernels, the sequence count for the state pass) and every kernel reads cu_seqlens /
chunk_indices / chunk_offsets on the device. Compile keys depend on the model shape (H, HV, K,
V), the dtypes and the None-ness of initial_state / output_final_state, plus one occupancy
regime of the state pass (a single wave of programs or more: state.state_tiles), never on T,
N or the batch's lengths.

Tensors: CUDA; CPU tensors run under Triton's interpreter (TRITON_INTERPRET=1 set before this
package is imported).
"""
from __future__ import annotations

IMPLS: tuple[str, ...] = ("triton",)

__all__ = ["IMPLS", "impl_status", "run"]


def impl_status() -> dict[str, str | None]:
    """{"triton": None} when the kernels can run here, else the reason."""
    try:
        import torch
        import triton  # noqa: F401

        from . import _common, wu
    except Exception as e:  # torch / triton missing or broken
        return {"triton": f"torch/triton not importable: {e}"}
    if _common.interpreted(wu._wu_kernel):
        return {"triton": None}  # Triton's interpreter on CPU tensors
    if not torch.cuda.is_available():
        return {"triton": "no CUDA GPU (CPU tensors need TRITON_INTERPRET=1 set before import)"}
    return {"triton": None}


def run(args, return_stages: bool = False):
    """gdn.prefill for torch tensors: (o [B, T, HV, V] in q's dtype, final_state fp32 [N, HV, K, V]
    or None), plus the stage tensors (packed [T, ...]; h [NT, HV, K, V]) with ``return_stages``."""
    from ._chain import run_chain

    if args.impl not in (None, "triton"):
        raise NotImplementedError(f"triton backend: unknown impl {args.impl!r} (have {IMPLS})")
    return run_chain(args, return_stages)
