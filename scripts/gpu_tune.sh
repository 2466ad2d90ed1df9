#!/usr/bin/env bash
# Tune launch configs on one GPU for the bench shapes and pack the tables for the trip back.
#
#   OUT=/tmp/out MODELS=mixtral-8x7b,qwen3-30b-a3b SCHEMES=bf16,fp8_tensor,fp8_block \
#       BUDGET=540 bash scripts/gpu_tune.sh
#
# Each (model, scheme) table is written as soon as it is tuned, so a run stopped by BUDGET keeps
# the finished ones. The tables' real names (E=..,N=..,device_name=..) have characters a file
# transfer may refuse: they travel inside $OUT/tuned.tar; unpack into kernels/configs/.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/reports/gpu-tune}"
mkdir -p "$OUT/tuned"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
MODELS="${MODELS:-mixtral-8x7b,qwen3-30b-a3b,deepseek-v3,deepseek-v3-tp8,gpt-oss-120b}"
SCHEMES="${SCHEMES:-bf16,fp8_tensor,fp8_block}"
start=$(date +%s)
timeout "${BUDGET:-540}" "$PY" -m moe_validate.cli tune --model "$MODELS" --scheme "$SCHEMES" \
    ${M_LIST:+--m "$M_LIST"} --out "$OUT/tuned" > "$OUT/tune_stdout.txt" 2> "$OUT/tune.log"
echo "tune exit status $? after $(( $(date +%s) - start )) s"
cat "$OUT/tune_stdout.txt"
grep -E "REJECTED|failed \(" "$OUT/tune.log" | head -n 20
(cd "$OUT/tuned" && tar -cf "$OUT/tuned.tar" ./*.json 2>/dev/null) && tar -tf "$OUT/tuned.tar"
rm -rf "$OUT/tuned"
