#!/usr/bin/env bash
# One-H100 benchmark run for the lead (~6 minutes wall): `moe-validate bench` on every model at a
# reduced M list and the three schemes with both peers (tuning: scripts/gpu_tune.sh). Everything
# lands under $OUT; the compact table is printed last.
#
#   OUT=/tmp/out bash scripts/gpu_bench.sh
#   BENCH_ARGS=--profile OUT=/tmp/out bash scripts/gpu_bench.sh   (per-kernel breakdown per row)
#
# Each step is guarded: a failing step is reported and the script goes on (rows that fail
# inside bench are recorded in bench.json, not fatal).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/reports/gpu-bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -m moe_validate.cli env > "$OUT/env.txt" 2>&1 || echo "env failed (see $OUT/env.txt)"

echo "== bench (budget 270 s; progress in $OUT/bench.log)"
timeout 330 "$PY" -m moe_validate.cli bench --quick \
    --models mixtral-8x7b,qwen3-30b-a3b,deepseek-v3,deepseek-v3-tp8,gpt-oss-120b \
    --schemes bf16,fp8_tensor,fp8_block --m 1,16,128,1024,4096,16384 \
    --peers reference,torch-grouped --time-budget 270 --out "$OUT" ${BENCH_ARGS:-} \
    > "$OUT/bench_stdout.txt" 2> "$OUT/bench.log"
echo "bench exit status $?"
tail -n 5 "$OUT/bench.log"

echo "== table"
if [ -f "$OUT/bench.json" ]; then
    "$PY" -c "import json,sys; from moe_validate.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$OUT/bench.json"
else
    echo "no bench.json: see $OUT/bench.log"; tail -n 30 "$OUT/bench.log"
fi
