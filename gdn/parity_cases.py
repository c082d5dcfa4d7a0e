"""The cases of the parity suite (``python -m gdn parity``, tests/test_parity.py).

Two sizes of one matrix:

- :data:`QUICK`: CI size, run on the CPU (Triton interpreter, Pallas interpret mode): tiny shapes
  (HV <= 4, K = V <= 40 but one 64 case, T of a few hundred). Cases marked ``core`` are the
  subset an implementation running in interpret mode gets by default (``--all-cases`` for all):
  together they cover every edge case of the brief (lengths 0, 1, 63, 64, 65, an empty sequence
  in the middle, T % 64 != 0, padded tokens, G = 1, 2, 3, K = V = 32 and 40, an initial state and
  none, l2norm on and off, bf16, fp16 and fp32, the fixed [B, T] layout, every metamorphic check).
- :data:`FULL`: the same questions at the Qwen3.5 shape (H = 16, HV = 32, K = V = 128) on a GPU,
  plus thousands of short documents and one long sequence.

A case names its inputs (``gdn.inputs.make_inputs`` arguments), the dtype of q, k, v and the
extra checks it runs (``checks``: "determinism", "chain", "permute", "pad", "causal", "split").
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Case", "QUICK", "FULL", "CHECKS", "cases"]

#: The metamorphic and determinism checks a case can ask for (gdn.parity runs them).
CHECKS = ("determinism", "chain", "permute", "pad", "causal", "split")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lens: tuple[int, ...]
    h: int = 2
    hv: int = 4
    k: int = 32
    v: int = 32
    dtype: str = "bfloat16"
    gates: str = "qwen"
    beta: str | None = None
    initial_state: bool = False
    #: the kernel's use_qk_l2norm; when off, q and k are normalized on the host (as the model does)
    use_qk_l2norm: bool = False
    pad_tokens: int = 0
    #: fixed [B, T] layout without cu_seqlens (all lens equal), instead of packed varlen
    batch: bool = False
    checks: tuple[str, ...] = ()
    stages: bool = True
    #: part of the subset an interpret-mode (CPU) implementation runs by default
    core: bool = False
    seed: int = 0
    note: str = ""

    def __post_init__(self):
        bad = set(self.checks) - set(CHECKS)
        if bad:
            raise ValueError(f"case {self.name}: unknown checks {sorted(bad)}")
        if self.batch and (len(set(self.lens)) != 1 or self.pad_tokens):
            raise ValueError(f"case {self.name}: a [B, T] layout needs equal lengths and no padding")

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lens)) + self.pad_tokens

    def describe(self) -> str:
        lens = self.lens if len(self.lens) <= 8 else f"{len(self.lens)} docs"
        parts = [f"lens={lens}", f"H/HV={self.h}/{self.hv}", f"K=V={self.k}" if self.k == self.v
                 else f"K={self.k} V={self.v}", self.dtype, f"gates={self.gates}"]
        if self.beta:
            parts.append(f"beta={self.beta}")
        if self.initial_state:
            parts.append("h0")
        if self.use_qk_l2norm:
            parts.append("l2norm")
        if self.pad_tokens:
            parts.append(f"+{self.pad_tokens} pad")
        if self.batch:
            parts.append("[B,T]")
        return " ".join(parts)


def _short_docs(n: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    """n document lengths in [lo, hi] (a few zeros included when lo == 0)."""
    return tuple(int(x) for x in np.random.default_rng(seed).integers(lo, hi + 1, n))


QUICK: tuple[Case, ...] = (
    # --- core: what interpret-mode implementations run on the CPU -------------------------------
    Case("edges-G3", (65, 0, 1, 63, 64), h=1, hv=3, initial_state=True, pad_tokens=23, core=True,
         checks=("determinism",), seed=1,
         note="lengths 65 0 1 63 64, empty sequence in the middle, T % 64 != 0, padded tokens"),
    Case("fp32-K40-l2norm", (100, 37), h=2, hv=4, k=40, v=40, dtype="float32",
         use_qk_l2norm=True, core=True, seed=2, note="fp32 bar 1e-4, odd head size, G = 2"),
    Case("fp16-G1", (130, 0, 20), h=2, hv=2, dtype="float16", initial_state=True, core=True,
         seed=3),
    Case("metamorphic", (90, 45, 70), h=1, hv=2, initial_state=True, core=True,
         checks=("chain", "permute", "pad", "causal", "split"), seed=4),
    Case("batch-2x96", (96, 96), h=2, hv=4, batch=True, core=True, seed=5,
         note="fixed [B, T] layout, no cu_seqlens"),
    # --- the rest of the matrix -----------------------------------------------------------------
    Case("empty-middle-pad", (70, 0, 0, 45, 1), h=2, hv=2, pad_tokens=20, use_qk_l2norm=True,
         seed=6),
    Case("many-short", _short_docs(48, 0, 12, 7), h=2, hv=4, initial_state=True, seed=7,
         note="48 short documents (some empty)"),
    Case("long-1x453", (453,), h=1, hv=2, initial_state=True, seed=8),
    Case("strong-decay", (150, 30), gates="strong", seed=9, note="g near -20 per token"),
    Case("no-decay", (200,), gates="none", initial_state=True, seed=10,
         note="g = 0 on half the tokens"),
    Case("beta-low", (120, 50), beta="low", use_qk_l2norm=True, seed=11),
    # beta near 1 on every token is the hardest case for bf16 intermediates (FLA's rounding
    # points, w, u, h, v_new in bf16): 2.9-4.6e-3 measured here (xla, triton; seeds 12-14, l2norm
    # on or off alike) against the 5e-3 bar. An implementation that also rounds the normalized
    # q, k to bf16 (FLA) reached 5.4e-3 with l2norm on: the l2norm is left to the other cases.
    Case("beta-high", (120, 50), beta="high", seed=12),
    Case("K64", (130,), h=1, hv=2, k=64, v=64, initial_state=True, seed=13),
    Case("fp32-uniform-h0", (70, 0, 90), dtype="float32", gates="uniform", initial_state=True,
         seed=14),
    Case("G3-K24", (80, 17), h=1, hv=3, k=24, v=24, use_qk_l2norm=True, seed=15),
)

_Q = dict(h=16, hv=32, k=128, v=128)  # Qwen3.5 linear attention

FULL: tuple[Case, ...] = (  # most telling first: a run cut short by a time budget keeps them
    Case("qwen-4x1024", (1024,) * 4, **_Q, initial_state=True, seed=22,
         note="DESIGN.md §3 anchor: FLA o 3.9e-3, state 3.2e-3"),
    Case("edges", (65, 0, 1, 63, 64, 1000, 0, 2047), **_Q, initial_state=True, pad_tokens=100,
         checks=("determinism",), seed=21),
    Case("metamorphic", (3000, 1500, 700, 64, 1), **_Q, initial_state=True,
         checks=("determinism", "chain", "permute", "pad", "causal", "split"), seed=35),
    # no initial state: 3000 random ones would be 6 GB to draw and hold (the final states are
    # still 3000 x 2 MiB; the other cases cover initial states)
    Case("thousands-of-docs", _short_docs(3000, 0, 16, 27), **_Q, seed=27),
    Case("long-1x16411", (16411,), **_Q, initial_state=True, seed=28),
    Case("G3", (3000, 77, 1), h=16, hv=48, k=128, v=128, use_qk_l2norm=True, seed=24),
    Case("G1", (4096, 513), h=16, hv=16, k=128, v=128, initial_state=True, seed=23),
    Case("fp32", (2048, 100, 0, 7), **_Q, dtype="float32", initial_state=True,
         use_qk_l2norm=True, seed=33),
    Case("K64", (4096, 130), h=16, hv=32, k=64, v=64, initial_state=True, seed=25),
    Case("K96", (2000, 65), h=16, hv=32, k=96, v=96, seed=26, note="head size not a power of two"),
    Case("strong-decay", (4096, 1000), **_Q, gates="strong", seed=29),
    Case("no-decay", (4096, 1000), **_Q, gates="none", initial_state=True, seed=30),
    Case("beta-low", (2048, 300), **_Q, beta="low", use_qk_l2norm=True, seed=31),
    Case("beta-high", (2048, 300), **_Q, beta="high", seed=32),
    Case("fp16", (2048, 300), **_Q, dtype="float16", initial_state=True, seed=34),
    Case("batch-4x2048", (2048,) * 4, **_Q, batch=True, initial_state=True, seed=36),
)


def cases(quick: bool) -> tuple[Case, ...]:
    return QUICK if quick else FULL
