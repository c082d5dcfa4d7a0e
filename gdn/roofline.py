"""What a GDN prefill costs at least: FLOPs, bytes and the roofline floor (DESIGN.md §5).

FLOPs of the chunked algorithm, per token per v head, chunk size C (64):

    6 K V + 10 C K + 2 C^2 / 3        (K = V = 128, C = 64: 182,955, the "183k" of DESIGN.md §5)

and FlashInfer's nominal count, ``4 K V`` per token per v head (65,536 at K = V = 128), reported
separately and labelled as nominal: it counts only the state read and write of the recurrent
form, so "TFLOP/s" figures on that basis are 2.8x smaller than real ones.

Minimal bytes: every input read once and the output written once, per token
``2 H K d + 2 HV V d + 2 HV 4`` (q, k; v, o; g, beta in fp32; d = bytes of the input dtype:
24,832 B = 24.8 KB at H = 16, HV = 32, K = V = 128, bf16), plus each sequence's fp32 state read
and written once, ``2 HV K V 4`` (4 MiB per sequence at HV = 32).

Floor = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), with the H200's dense bf16 tensor-core
rate (~790 TFLOP/s: 814 measured by a jax 8192^3 matmul, GPU.md) and its HBM bandwidth (4.3 TB/s:
4.25 measured device-to-device, GPU.md). :data:`H100` (the SXM part, the H200's chip with HBM3):
the same tensor-core rate, and the bandwidth scaled by the two parts' HBM specs (3.35 / 4.8 TB/s:
3.0 TB/s; a jitted copy read at 3.01 TB/s on an H100 in session 24, benchmarks/RESULTS.md).
:func:`device_for` picks the model from a device name.
"""
from __future__ import annotations

import dataclasses

__all__ = ["H200", "H100", "Device", "device_for", "flops_per_token_head", "flops", "nominal_flops", "bytes_moved",
           "floor_seconds", "Cost", "cost"]

CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    flops_per_s: float  # dense bf16 tensor-core peak used for the floor
    bytes_per_s: float  # HBM bandwidth
    l2_bytes: int


H200 = Device("H200", 790e12, 4.3e12, 50 * 2**20)
H100 = Device("H100", 790e12, 4.3e12 * 3.35 / 4.8, 50 * 2**20)


def device_for(name: str | None) -> Device:
    """The roofline model of a GPU named ``name`` (``torch.cuda.get_device_name()`` or a jax
    device's ``device_kind``): :data:`H100` for an H100, else :data:`H200` (also without a GPU)."""
    return H100 if name and "H100" in name else H200

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def flops_per_token_head(k: int, v: int, chunk: int = CHUNK) -> float:
    """6KV + 10CK + 2C^2/3: the chunked algorithm's FLOPs per token per v head."""
    return 6 * k * v + 10 * chunk * k + 2 * chunk * chunk / 3


def flops(tokens: int, hv: int, k: int, v: int, chunk: int = CHUNK) -> float:
    return tokens * hv * flops_per_token_head(k, v, chunk)


def nominal_flops(tokens: int, hv: int, k: int, v: int) -> float:
    """FlashInfer's nominal count, 4KV per token per v head (not the work actually done)."""
    return 4.0 * tokens * hv * k * v


def bytes_moved(tokens: int, seqs: int, h: int, hv: int, k: int, v: int,
                dtype: str = "bfloat16", state: bool = True) -> float:
    """Minimal HBM traffic: inputs read and output written once, fp32 states read and written."""
    d = _DTYPE_BYTES[dtype]
    per_token = 2 * h * k * d + 2 * hv * v * d + 2 * hv * 4
    per_seq = 2 * hv * k * v * 4 if state else 0
    return float(tokens * per_token + seqs * per_seq)


def floor_seconds(n_flops: float, n_bytes: float, device: Device = H200) -> float:
    return max(n_flops / device.flops_per_s, n_bytes / device.bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    nominal_flops: float
    bytes: float
    floor_ms: float
    bound: str  # "compute" or "memory"


def cost(tokens: int, seqs: int, h: int, hv: int, k: int, v: int, dtype: str = "bfloat16",
         device: Device = H200) -> Cost:
    f = flops(tokens, hv, k, v)
    b = bytes_moved(tokens, seqs, h, hv, k, v, dtype)
    bound = "compute" if f / device.flops_per_s >= b / device.bytes_per_s else "memory"
    return Cost(f, nominal_flops(tokens, hv, k, v), b, floor_seconds(f, b, device) * 1e3, bound)
