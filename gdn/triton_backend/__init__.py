"""The Triton backend of gdn: the chunked gated delta rule as a chain of our Triton kernels.

    prepare   stages 1-3 fused (wu.py): gc = chunk-local cumsum(g) (cumsum.py),
              Ai = (I + A)^-1 in registers (intra.py), w and u (wu.py)
    state     the serial state pass (state.py): h at every chunk start, v_new, final state
    output    o (output.py)

use_qk_l2norm never rewrites q or k: the prepare kernel computes 1 / ||k|| from the k tiles it
loads anyway (stored [T, H] fp32 for the later kernels), the output kernel 1 / ||q|| from its q
tiles, and both enter as fp32 row / column scales next to the gates. The normalized q and k are
never rounded to the input dtype (more accurate than normalizing first, and two passes over q
and k fewer).

Each stage module can also be called on its own (``cumsum.chunk_cumsum``,
``intra.chunk_inverse``, ``wu.wu``, ``state.state_pass``, ``output.output``) on the packed
tensors of the stage contract (gdn/reference.py), so the parity suite compares stage by stage.

Numerics: gc, Ai, the state and every accumulation in fp32; w, u, h, v_new in the input dtype
(rounded between kernels like FLA); o in q's dtype; the final state fp32. fp32 inputs use
IEEE fp32 dots everywhere; the triangular solve always does.

No device-to-host sync: grids come from the plan's host ints (padded_chunks for per-chunk
kernels, the sequence count for the state pass) and every kernel reads cu_seqlens /
chunk_indices / chunk_offsets on the device. Compile keys depend on the model shape (H, HV, K,
V), the dtypes and the None-ness of initial_state / output_final_state only: never on T, N
or the batch's lengths.

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
