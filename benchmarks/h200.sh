#!/usr/bin/env bash
# gdn on the H200 in one call: the full parity suite, then the benchmark matrix one head
# configuration at a time, inside a time budget. Everything lands in $OUT (default out/h200);
# a step cut short by the budget keeps what it finished (its JSON is rewritten as it goes).
#
#   bash benchmarks/h200.sh             # parity + bench (budget GDN_BUDGET_S, default 560 s)
#   bash benchmarks/h200.sh parity      # only the parity suite
#   bash benchmarks/h200.sh bench 16/32 8/32   # only the benchmark, these head configurations
#   GDN_BENCH_IMPLS="fla flashinfer jla jax:mosaic_gpu" bash benchmarks/h200.sh bench   # these only
#   GDN_BENCH_ARGS="--qk-l2norm --layouts 4x8192,mix" bash benchmarks/h200.sh bench 16/32   # more bench flags
#   (all seven implementations at 16/32 take ~330 s, 2026-12-04; the peers + mosaic_gpu ~170 s)
#
# Peers: wheels in .whl/ (fla-core, jax-linear-attention; pip download --no-deps, see GPU.md) are
# installed into /tmp/peers; FlashInfer unpacked in /tmp/fisite (shared/tools/flashinfer-bundle)
# is picked up by the benchmark. Render the plot afterwards where matplotlib is installed:
#   python -m gdn bench --from-json out/h200/bench-*/bench.json --out out/h200/bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/h200}
mkdir -p "$OUT"
BUDGET=${GDN_BUDGET_S:-560}
left() { echo $(( BUDGET - SECONDS )); }
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_FLASH_QLA=0
unset TRITON_INTERPRET JAX_PLATFORMS
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv; "$PY" -c \
  "import jax, torch, triton; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name()); print('triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1

what=${1:-all}
[ $# -gt 0 ] && shift
status=0

if [ "$what" = all ] || [ "$what" = parity ]; then
  if [ "$what" = all ]; then share=$(( $(left) * 45 / 100 )); else share=$(( $(left) - 5 )); fi
  echo "== parity (up to ${share} s)"
  timeout --signal=INT --kill-after=10 "$share" "$PY" -m gdn parity --json "$OUT/parity.json" \
    > "$OUT/parity.txt" 2> "$OUT/parity.log"
  rc=$?; [ $rc -ne 0 ] && status=$rc
  tail -n 3 "$OUT/parity.txt"; echo "parity exit code $rc (124: cut by the budget)"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  heads=("$@"); [ ${#heads[@]} -eq 0 ] && heads=(16/32 16/48 16/16 8/32 2/8)
  for hd in "${heads[@]}"; do
    t=$(( $(left) - 15 ))
    if [ "$t" -lt 30 ]; then echo "== bench $hd: skipped, the budget is spent"; continue; fi
    echo "== bench $hd (up to ${t} s)"
    dir="$OUT/bench-${hd/\//-}"
    impl_args=(); for im in ${GDN_BENCH_IMPLS:-}; do impl_args+=(--impl "$im"); done
    for a in ${GDN_BENCH_ARGS:-}; do impl_args+=("$a"); done
    timeout --signal=INT --kill-after=10 "$t" "$PY" -m gdn bench --heads "$hd" --out "$dir" "${impl_args[@]}" \
      > "$dir.txt" 2> "$dir.log"
    echo "bench $hd exit code $? (124: cut by the budget)"
  done
  if compgen -G "$OUT/bench-*/bench.json" > /dev/null; then
    "$PY" -m gdn bench --from-json "$OUT"/bench-*/bench.json --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
    echo "merged: $OUT/bench/bench.md"
  fi
fi
exit $status
