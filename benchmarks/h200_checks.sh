#!/usr/bin/env bash
# The open issues' GPU checks in ONE H200 call, inside a time budget (default 570 s, under the
# 10-minute cap of one command). Timings first, alone on the GPU; then the correctness runs side by
# side (they share the GPU, which changes no result): the full parity suite in the background,
# the reliability sections and the split check in the foreground.
#
#   bash benchmarks/h200_checks.sh            # from the repository root on the H200 machine
#   GDN_PARITY_ARGS="--case fp16 --case K64" bash benchmarks/h200_checks.sh   # a part of the parity matrix
#   GDN_TIME_S=0 ...                          # skip the timings (and the profile)
#   GDN_REL_SECTIONS="memory" GDN_SPLIT=0 ... # only these reliability sections; no split check
#
# Peers: wheels in .whl/ (fla-core, einops, jax-linear-attention), installed into /tmp/peers.
# Everything lands in $OUT (default out/h200-checks); the end of the output is a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/h200-checks}
mkdir -p "$OUT"
BUDGET=${GDN_BUDGET_S:-570}
left() { echo $(( BUDGET - SECONDS )); }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET JAX_PLATFORMS
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
# (at most 8 files come back from a call: the machine goes to stdout, parity's progress into its table file)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>&1

# 1. mosaic_gpu timings (FLA in the same process) and the in-kernel profile: alone on the GPU
[ "${GDN_TIME_S:-200}" -gt 0 ] && timeout --signal=INT --kill-after=10 "${GDN_TIME_S:-200}" "$PY" tests/gpu/mosaic_gpu_check.py --only env,time,profile \
  --variants default --shapes "${GDN_SHAPES:-4x8192,128x256,4x2048,1x32768,4x8192_HV48,4x8192_HV16}" \
  --fla-shapes 4x8192,1x32768 --out "$OUT" > "$OUT/mosaic.log" 2>&1
echo "mosaic check exit $? at ${SECONDS}s"

# 2. the full parity suite (every implementation here, FLA included) in the background
timeout --signal=INT --kill-after=10 $(( $(left) - 15 )) "$PY" -m gdn parity ${GDN_PARITY_ARGS:-} --json "$OUT/parity.json" \
  > "$OUT/parity.txt" 2>&1 &
parity=$!

# 3. reliability (issue 10) and the exact split (issue 6) beside it
timeout --signal=INT --kill-after=10 "${GDN_REL_S:-240}" "$PY" tests/gpu/reliability_gpu_check.py \
  ${GDN_REL_SECTIONS:-memory one_million_tokens grids_past_65535} > "$OUT/reliability.txt" 2>&1
echo "reliability exit $? at ${SECONDS}s"
if [ "${GDN_SPLIT:-1}" != 0 ]; then
  timeout --signal=INT --kill-after=10 $(( $(left) - 25 )) "$PY" benchmarks/split_check.py 1x32768 \
    --impls jax:mosaic_gpu > "$OUT/split.txt" 2>&1
  echo "split check exit $? at ${SECONDS}s (its times overlap the parity run: not for the record)"
fi

wait $parity
echo "parity exit $? at ${SECONDS}s (124: cut by the budget)"
echo "== mosaic"; sed -n '/SUMMARY/,$p' "$OUT/mosaic.log"
echo "== reliability"; sed -n '/=== summary/,$p' "$OUT/reliability.txt"; grep -E "FAIL|memory" "$OUT/reliability.txt" | head -12
echo "== split"; grep "^|" "$OUT/split.txt" | tail -8
echo "== parity"; tail -n 3 "$OUT/parity.txt"; grep -c " ok" "$OUT/parity.txt"; grep -E "FAIL" "$OUT/parity.txt" | head -10
