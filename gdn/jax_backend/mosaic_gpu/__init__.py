"""impl="mosaic_gpu": the JAX backend's Hopper fast path (Pallas Mosaic GPU kernels).

Two kernels per call, no per-chunk state in HBM:

1. :func:`intra.intra`, grid (H, tile runs): per aligned 64-token tile and v head, the segmented
   gate cumsum (``gc``, fp32) and the decayed inverse with beta folded in (``Ag = (I + A)^-1
   diag(beta)``, input dtype), one CTA per k head and run of tiles doing the G v heads from one
   ``K K^T``. Sequence boundaries inside a tile split it into independent blocks.
2. the chunk loop, which walks each sequence's tiles with the fp32 state in registers and writes the
   output once and the final state once:
   ``chunk_variant="auto"`` (the default) picks one of two per call (``_driver.pick_chunk_variant``;
   with a plan traced under the caller's jit, for every sequence count of its bucket:
   ``_driver.resolve_chunk_variant``):
   :func:`chunk_loop.chunk_loop` (``chunk_variant="default"``), grid (V / 64, HV, N_pad + 1): one CTA
   per sequence, v head and 64-column V tile (TMA producer, state chain, output warpgroups); or
   :func:`chunk_loop_wide.chunk_loop_wide` (``chunk_variant="wide"``, V in {64, 128}), grid
   (HV, N_pad + 1): one CTA per sequence and v head, a prep warpgroup doing each tile's
   V-independent work once and a state warpgroup per 64 V columns forming its own output.

Where the narrow loop leaves at least half the SMs idle (one long prompt: 64 CTAs at HV = 32),
``variant="auto"`` (the default, ``_driver.pick_variant``) runs both in ONE launch instead
(:mod:`.coresident`): worker CTAs do the intra work on the idle SMs, tile by tile, and raise a flag
in global memory per item that the loop's memory warpgroup waits for before loading it. The two
kernels' bits; 0.847-0.873 vs 0.980-1.003 ms at 1x32768 (H100, 2026-12-07, session 27). With a
host plan of two prompts whose narrow loop fills the GPU, it runs them with workers sized for the
longest, whose CTAs come first, where :func:`.coresident.long_first`'s model says it pays
(28672+4096: 0.752 vs 0.908 ms, H100, session 28).

Opt-in, slower: ``variant="fused_wide"`` runs one kernel, the wide loop whose prep warpgroup
also does the intra kernel's work (no ``Ag`` / ``gc`` in HBM; the two kernels' bits, on an H100 too).
As built it does not fit the register file: ptxas spills ~500 B and serializes the state
warpgroups' products, and it ran 1.69x slower at 4x8192 (H100, 2026-12-06; benchmarks/mosaic_notes.md,
session 16).
``variant="fused_wide_mma"`` does that work on 16-column slabs by warp-level MMA (:mod:`.slabs`):
it fits the registers (140 B of spills), gives the same bits, and is still 1.74x slower at
4x8192 (H100, 2026-12-06, session 20): one warpgroup takes ~10 us a tile for the intra work, the
state chain ~3.

XLA around them reshapes, moves g and beta to head-major fp32 and builds the per-token sequence id
from the plan's ``cu_seqlens`` (all on the device: no host sync; grids come from static shapes).

Supported: q/k/v bf16 or fp16 (fp32 inputs need IEEE fp32 products, which the tensor cores do not
have: NotImplementedError, so ``impl=None`` falls back), K in {64, 128}, V in {64, 128, 192, 256},
any G = HV / H, varlen plans, initial and final states, ``use_qk_l2norm`` (the intra kernel reduces
q's and k's rows to their scales and the kernels fold them into their factors: q and k are never
rewritten; the fused variant normalizes copies in XLA).

Split-ready (gdn issue 6): a CTA walks any token range ``[cu[n], cu[n+1])`` from any state row, so
the exact split (gdn.split) runs its pieces as the sequences of a finer plan, with the values
augmented to ``[v | 0]`` and the initial states to ``[0 | I]``: one call returns every piece's
``E`` and its K x K map ``M`` (S_end = M S_start + E) and the output's dependence on S_start;
tests/test_mosaic_gpu.py checks that path end to end under the interpreter.
"""
from __future__ import annotations

import functools
import os

from ...api import PrefillArgs

__all__ = ["IMPLS", "status", "impl_status", "run", "unsupported_reason", "prefill_arrays"]

IMPLS = ("mosaic_gpu",)
HEAD_DIMS = (64, 128)
#: V: any multiple of 64 up to 256 (one 64-column CTA each), so the exact split's augmented values
#: [v | 0] (V + K columns, gdn.split) run in one call at K = V = 128.
VALUE_DIMS = (64, 128, 192, 256)
DTYPES = ("bfloat16", "float16")


@functools.cache
def status() -> str | None:
    """None if the kernels can run here (a Hopper GPU through jax, or GDN_MOSAIC_INTERPRET=1: the
    Mosaic GPU interpreter on any machine), else the reason."""
    if os.environ.get("GDN_MOSAIC_INTERPRET") == "1":
        return None
    try:
        import jax

        devs = jax.devices()
    except Exception as e:  # pragma: no cover - no jax runtime at all
        return f"jax is not usable: {e}"
    if not devs or devs[0].platform != "gpu":
        return "impl 'mosaic_gpu' needs an NVIDIA Hopper GPU (sm_90); jax sees " + (devs[0].platform if devs else "none")
    cc = getattr(devs[0], "compute_capability", None)
    if cc != "9.0":
        return f"impl 'mosaic_gpu' needs a Hopper GPU (compute capability 9.0), got {cc}"
    return None


def impl_status() -> dict[str, str | None]:
    return {"mosaic_gpu": status()}


def unsupported_reason(args: PrefillArgs) -> str | None:
    """Why these arguments cannot run on the Mosaic GPU kernels (None if they can)."""
    from ...api import dtype_name

    h, hv, dk, dv = args.dims
    dt = dtype_name(args.q)
    if dt not in DTYPES:
        return (f"mosaic_gpu runs bf16/fp16 inputs only (got {dt}: fp32 needs IEEE fp32 products, "
                f"which Hopper tensor cores lack)")
    if dk not in HEAD_DIMS or dv not in VALUE_DIMS:
        return f"mosaic_gpu supports K in {HEAD_DIMS} and V in {VALUE_DIMS}, got K={dk}, V={dv}"
    if args.plan.chunk_size != 64:
        return f"mosaic_gpu needs chunk_size 64, got {args.plan.chunk_size}"
    if args.plan.padded_seqs + 1 > 65535 * 1024:
        return "too many sequences for one launch"
    return None


def run(args: PrefillArgs, return_stages: bool = False, *, interpret=None, **options):
    """gdn's backend entry for impl="mosaic_gpu" (see the module docstring).

    ``interpret=True`` (or GDN_MOSAIC_INTERPRET=1) runs the kernels under the Mosaic GPU interpreter
    on any machine (tests). ``options`` are tuning knobs passed to the kernels (bv, stages, the
    variants: see :func:`._driver.prefill_arrays`).
    """
    if return_stages:
        raise NotImplementedError("mosaic_gpu fuses the chunk loop: it has no per-chunk stage tensors "
                                  "(use impl='xla' or the triton backend for stages)")
    interpret = check_runnable(args, interpret)
    if options.get("variant") in ("fused", "fused_wide", "fused_wide_mma") and args.dims[3] > 128:
        raise NotImplementedError(f"mosaic_gpu variant {options['variant']!r} runs V <= 128 (one state "
                                  "warpgroup per 64 columns)")
    from ._driver import prefill_arrays

    return prefill_arrays(args, interpret=interpret, **options)


def check_runnable(args: PrefillArgs, interpret=None):
    """NotImplementedError unless these arguments can run here; returns the interpret flag
    (GDN_MOSAIC_INTERPRET=1 turns it on)."""
    if not interpret and os.environ.get("GDN_MOSAIC_INTERPRET") == "1":
        interpret = True
    if not interpret:
        why = status()
        if why is not None:
            raise NotImplementedError(why)
    why = unsupported_reason(args)
    if why is not None:
        raise NotImplementedError(why)
    return interpret


def prefill_arrays(args: PrefillArgs, **kw):
    from ._driver import prefill_arrays as _p

    return _p(args, **kw)
