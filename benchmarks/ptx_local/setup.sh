#!/usr/bin/env bash
# PTX, ptxas's register / spill report and SASS of gdn's Mosaic GPU kernels on a host WITHOUT a GPU.
#
# Mosaic GPU compiles a kernel's MLIR to PTX and runs ptxas inside `MosaicGpuCompile` of the CUDA
# PJRT plugin (`xla_cuda_plugin.so`); the driver is needed only to ask the device's compute
# capability and, after the dumps, to load the cubin. A stand-in `libcuda.so.1` (fakecuda.c) answers
# the first as an sm_90 device and fails the load, so MOSAIC_GPU_DUMP_* write every stage here.
#
#   bash benchmarks/ptx_local/setup.sh        # once: ~0.55 GB of wheels into $GDN_PTX_CACHE
#   .venv/bin/python benchmarks/ptx_local/report.py --variants default,wide,narrow
#
# Downloads (pip, no install): jax-cuda13-pjrt and jax-cuda13-plugin 0.11.2 (the pinned jax's),
# nvidia-cuda-nvcc 13.0 (ptxas); nvdisasm comes from triton's wheel in .venv. Needs gcc.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
cache=${GDN_PTX_CACHE:-$HOME/.cache/gdn-ptx-local}
mkdir -p "$cache/whl" "$cache/site" "$cache/fakecuda"
plat=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64)
for spec in jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2 "nvidia-cuda-nvcc==13.0.*"; do
  "$py" -m pip download -q --no-deps "${plat[@]}" -d "$cache/whl" "$spec" 2>&1 | grep -v '^WARNING' || true
done
for w in "$cache"/whl/*.whl; do (cd "$cache/site" && "$py" -m zipfile -e "$w" .); done
chmod +x "$cache"/site/nvidia/cu13/bin/*
gcc -shared -fPIC -O1 -o "$cache/fakecuda/libcuda.so.1" "$root/benchmarks/ptx_local/fakecuda.c"
# MOSAIC_GPU_DUMP_SASS wants nvdisasm beside ptxas; benchmarks/sass.sh finds triton's itself
echo "ready: $cache"
