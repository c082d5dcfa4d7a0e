"""The prefill chain of the Triton backend (see the package docstring)."""
from __future__ import annotations

import contextlib

import torch

from ._common import check_device, device_plan, interpreted, packed
from .output import launch_output
from . import state
from .state import launch_state
from .wu import _wu_kernel, launch_prepare


def _device_guard(dev: torch.device):
    """Launch on the tensors' GPU when it is not the current one (else no context at all)."""
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def chain_inputs(args):
    """(device, packed q, k, v, g, beta) of validated ``args``: every tensor on q's device (CUDA, or
    CPU under the interpreter), packed to [T_total, ...] (views when contiguous)."""
    q, k, v, g, beta, h0 = args.q, args.k, args.v, args.g, args.beta, args.initial_state
    dev = check_device(q, interpreted(_wu_kernel), k=k, v=v, g=g, beta=beta,
                       initial_state=h0)
    return dev, packed(q, 2), packed(k, 2), packed(v, 2), packed(g, 1), packed(beta, 1)


def state_and_output(q, k, w, u, gc, p, h0, args, k_rstd, store_hv: bool = False):
    """The state pass and the output stage on packed tensors and a device plan (``h0``: the
    initial states, ``args``: output_final_state and scale) -> (h, v_new, final, o); h and
    v_new are None when the output is fused into the state pass (``state.FUSE_OUTPUT``) without
    ``store_hv``."""
    if state.FUSE_OUTPUT:
        return launch_state(k, w, u, gc, p, h0, args.output_final_state, k_rstd, q=q, scale=args.scale,
                            store_hv=store_hv)
    hs, v_new, final = launch_state(k, w, u, gc, p, h0, args.output_final_state, k_rstd)
    return hs, v_new, final, launch_output(q, k, v_new, hs, gc, p, args.scale, None, k_rstd)


def run_chain(args, return_stages: bool = False):
    dev, q, k, v, g, beta = chain_inputs(args)
    p = device_plan(args.plan, dev)
    hv, dv = v.shape[1], v.shape[2]
    with _device_guard(dev):
        gc, ai, w, u, k_rstd = launch_prepare(k, v, g, beta, p, bool(return_stages),
                                              args.use_qk_l2norm)
        hs, v_new, final, o = state_and_output(q, k, w, u, gc, p, args.initial_state, args, k_rstd,
                                               store_hv=bool(return_stages))
    o = o.reshape(args.batch, args.seqlen, hv, dv)
    if not return_stages:
        return o, final
    n_tok = p.num_tokens
    for x in (gc, w, u, v_new):  # rows past cu_seqlens[N] are not written by the kernels
        x[n_tok:].zero_()
    return o, final, {"gc": gc, "Ai": ai, "w": w, "u": u, "h": hs, "v_new": v_new}
