#!/usr/bin/env bash
# SASS of a Mosaic GPU kernel without the GPU: assemble the PTX that
# `tests/gpu/mosaic_gpu_check.py --only ptxas --dump` brought back (<variant>-<kernel>.ptx.gz) with
# ptxas from NVIDIA's nvidia-cuda-nvcc wheel, disassemble with the nvdisasm that ships in triton's
# wheel, and print ptxas's resource report and an instruction histogram per loop body.
#
#   benchmarks/sass.sh results/default-gdn_chunk_loop_wide_1.ptx.gz [out_dir]
#
# The device machine has ptxas (jax's CUDA wheels) but no nvdisasm. Mosaic emits PTX ISA 9.0; a
# CUDA 12.x ptxas reads it after the version line is lowered to 8.8 (what this does when the
# ptxas it finds is older), which is fine for the instructions Mosaic uses on sm_90a.
set -euo pipefail
ptx_in=${1:?usage: benchmarks/sass.sh KERNEL.ptx[.gz] [OUT_DIR]}
out=${2:-/tmp/gdn_sass}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out"
cache=${GDN_NVCC_CACHE:-$HOME/.cache/gdn-nvcc}
ptxas=$(ls "$cache"/nvidia/cu*/bin/ptxas "$cache"/nvidia/cuda_nvcc/bin/ptxas 2>/dev/null | head -1 || true)
if [ -z "$ptxas" ]; then
  mkdir -p "$cache"
  "$py" -m pip download -q --no-deps -d "$cache/whl" nvidia-cuda-nvcc-cu12
  (cd "$cache" && "$py" -m zipfile -e whl/nvidia_cuda_nvcc_cu12-*.whl .)
  ptxas=$(ls "$cache"/nvidia/cuda_nvcc/bin/ptxas)
  chmod +x "$ptxas"
fi
nvdisasm=$("$py" -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/nvdisasm'))")
name=$(basename "$ptx_in" .gz); name=${name%.ptx}
if [[ $ptx_in == *.gz ]]; then gzip -dc "$ptx_in" > "$out/$name.ptx"; else cp "$ptx_in" "$out/$name.ptx"; fi
supported=$("$ptxas" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
if [ "${supported:-0}" -lt 130 ]; then sed -i 's/^\.version 9\.[0-9]*/.version 8.8/' "$out/$name.ptx"; fi
"$ptxas" -arch=sm_90a -O3 -v "$out/$name.ptx" -o "$out/$name.cubin" 2>&1 | grep -v "^$"
"$nvdisasm" -c "$out/$name.cubin" > "$out/$name.sass"
echo "SASS: $out/$name.sass ($(grep -c '/\*[0-9a-f]*\*/' "$out/$name.sass") instructions)"
# instruction histogram of each backward branch's body (a loop), the biggest first
"$py" - "$out/$name.sass" <<'PYEOF'
import collections, re, sys
lines = open(sys.argv[1]).read().splitlines()
labels, instrs = {}, []
for ln in lines:
    m = re.match(r"^(\.L_x_\d+):", ln.strip())
    if m:
        labels[m.group(1)] = len(instrs)
        continue
    m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
    if m:
        instrs.append(m.group(2))
# the out-of-line retry stubs of barrier waits sit after the last EXIT and branch back: not loops
end = max((i for i, s in enumerate(instrs) if s.split()[-1:] == ["EXIT"] or s.endswith("EXIT")), default=len(instrs))
loops = []
for i, ins in enumerate(instrs[:end]):
    m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
    if m and m.group(1) in labels and labels[m.group(1)] < i:
        loops.append((labels[m.group(1)], i))
for lo, hi in sorted(loops, key=lambda r: r[0] - r[1])[:4]:
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", s).split()[0] for s in instrs[lo:hi + 1])
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
    print(f"loop {lo}..{hi}: {hi - lo + 1} instructions; {top}")
PYEOF
