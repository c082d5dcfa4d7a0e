"""Where use_qk_l2norm's cost goes on the mosaic_gpu path: the GPU's kernel durations (CUPTI trace,
20 calls) of the prefill with and without it, at the Qwen3.5 shape 4x8192 and at HV = 16."""
import sys

sys.path.insert(0, ".")

from tests.gpu.kernel_trace import print_kernel_times  # noqa: E402
from tests.gpu.mosaic_gpu_check import _jitted  # noqa: E402

for lens, hv in (([8192] * 4, 32), ([8192] * 4, 16)):
    for l2 in (None, "fold"):
        fn, args, _ = _jitted(lens, 16, hv, 128, seed=1, _l2norm=l2)
        print_kernel_times(f"{len(lens)}x{lens[0]} HV{hv} l2norm={l2}", fn, args, top=10)
