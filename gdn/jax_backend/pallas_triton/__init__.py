"""impl="pallas_triton": Pallas kernels with the Triton lowering, mirroring the Triton backend
(gdn/triton_backend) one to one: the same stages, intermediate tensors and dtypes (the stage
contract in gdn/reference.py) and the same four-kernel chain:

  intra     (intra.py) gc [T, HV] fp32 (cumsum.py) and Ai = (I + A)^-1 by blockwise forward
            substitution in fp32 (merges at tf32x3 for 16-bit inputs, IEEE for fp32), stored in
            the input dtype ([T, HV, BT] fp32 when the stage tensors are asked for)
  wu        (wu.py) w [T, HV, K] and u [T, HV, V] in the input dtype, 64-row tensor-core tiles
  state     (state.py) h [NT_pad, HV, K, V] and v_new [T, HV, V] in the input dtype (sentinel
            rows of h are not written), the final state [N_pad, HV, K, V] fp32
  output    (output.py) o [T, HV, V] in q's dtype, zero past cu_seqlens[-1]

Each stage also exists as its own kernel (chunk_cumsum, intra_inverse, recompute_wu) for the
stage-by-stage comparisons. With use_qk_l2norm q and k are not rewritten: one XLA reduction
each gives their fp32 row scales 1/||x||, which the kernels apply next to the gates (so no tile
feeds both a dot and other arithmetic in a pipelined loop: Triton 3.6 races there on sm_90, see
gdn/triton_backend/xcompile.py). Every grid is static, from the plan's padded counts; the plan's
int32 arrays are read inside the kernels. K and V up to 256 of any size (tiles padded to powers of
two, masked).

Launch configurations (grid order, tiles, warps, pipeline stages) mirror the Triton backend's
chosen defaults (each stage's ``*_tiles`` function); each stage module's ``TILES`` dict overrides
them for tuning sweeps (benchmarks/pallas_sweep.py; see kernel_utils on jax's trace caches).

On a GPU the kernels are compiled by Triton; on a CPU they run in Pallas interpret mode (only
when this impl is asked for by name: ``impl=None`` takes "xla" there). Pallas-Triton is
deprecated in jax 0.11 (it still works in the pinned 0.11.2): our calls silence exactly that
warning (gdn.jax_backend.common.pallas_triton_warnings).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..common import count_trace, pack, run_core, token_valid
from .cumsum import chunk_cumsum
from .intra import intra_inverse
from .output import chunk_output
from .state import state_recurrence
from .wu import prepare, recompute_wu

__all__ = ["run", "status", "core", "default_interpret", "prepare", "chunk_cumsum",
           "intra_inverse", "recompute_wu", "state_recurrence", "chunk_output"]

_GPU = ("gpu", "cuda", "rocm")


def default_interpret() -> bool:
    """Interpret mode unless the default jax platform is a GPU."""
    return jax.default_backend() not in _GPU


def status() -> str | None:
    plat = jax.default_backend()
    if plat in _GPU or plat == "cpu":
        return None  # compiled on a GPU; Pallas interpret mode on a CPU
    return f"Pallas-Triton needs a GPU (or a CPU, for interpret mode), the platform is {plat}"


def run(args, return_stages: bool = False):
    if args.plan.chunk_size != 64:
        raise NotImplementedError("pallas_triton kernels use 64-token chunks, the plan has "
                                  f"chunk_size={args.plan.chunk_size}")
    return run_core(core, args, return_stages, interpret=default_interpret())


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm", "output_final_state",
                                             "return_stages", "interpret"))
def core(q, k, v, g, beta, plan, h0, *, scale: float, use_qk_l2norm: bool,
         output_final_state: bool, return_stages: bool, interpret: bool):
    """The kernel chain; see gdn.jax_backend.common for the signature."""
    count_trace("pallas_triton")
    bsz, t_in = q.shape[:2]
    hv, vdim = v.shape[2], v.shape[3]
    q, k, v, g, beta, rq, rk = pack(q, k, v, g, beta, use_qk_l2norm)
    if h0 is not None:
        h0 = h0.astype(jnp.float32)
    gc, w, u, ai = prepare(k, v, g, beta, rk, plan, store_ai_stage=return_stages,
                           interpret=interpret)
    h, v_new, final = state_recurrence(k, w, u, gc, h0, rk, plan,
                                       output_final_state=output_final_state, interpret=interpret)
    o = chunk_output(q, k, v_new, h, gc, rq, rk, plan, scale=scale, interpret=interpret)
    o = o.reshape(bsz, t_in, hv, vdim)
    stages = None
    if return_stages:  # buffers the kernels do not write (past the end, sentinel rows) -> 0
        ok = token_valid(plan, bsz * t_in)
        tok = lambda x: jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        real = (plan.chunk_indices[:, 0] >= 0)[:, None, None, None]
        stages = {"gc": tok(gc), "Ai": tok(ai), "w": tok(w), "u": tok(u),
                  "h": jnp.where(real, h, 0), "v_new": tok(v_new)}
    return o, final, stages
