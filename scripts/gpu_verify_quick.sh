#!/usr/bin/env bash
# One device call of GPU evidence for a tree (one H200): the premerge and nightly suites, the native
# tests of the newest modules, then the vllm backend through the carried bundle (.gpu_vllm) if it
# is there. Each step has its own time limit; logs and results under $OUT.
#   run(command="bash scripts/gpu_verify_quick.sh", carry=[".gpu_vllm"])
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
o=${OUT:-/tmp/gpu-verify}; mkdir -p "$o"; t0=$(date +%s)
step() { echo "$1 rc=$2 $(( $(date +%s) - t0 ))s: $3"; }
for s in premerge nightly; do
  timeout 200 python3 -m moe_validate.cli run --suite $s --out "$o/$s" > "$o/$s.log" 2>&1
  step "$s" $? "$(tail -n 3 "$o/$s.log" | tr '\n' ' ')"
done
timeout 170 python3 -m pytest -q -n 16 -p no:cacheprovider tests/kernels tests/contract \
  tests/moe_validate/test_call_contract.py tests/moe_validate/test_stages.py tests/moe_validate/test_routing_contract.py \
  tests/moe_validate/test_backends_doc.py tests/moe_validate/test_golden.py tests/moe_validate/test_verdicts.py \
  > "$o/pytest.log" 2>&1
step pytest $? "$(tail -n 1 "$o/pytest.log")"; grep -E "^(FAILED|ERROR)" "$o/pytest.log" | head -n 20
if [ -d .gpu_vllm ]; then
  left=$(( 560 - ($(date +%s) - t0) ))
  [ $left -gt 30 ] && { OUT="$o" timeout $left bash scripts/gpu_vllm.sh smoke > "$o/vllm.log" 2>&1; step vllm $? "$(tail -n 4 "$o/vllm.log" | tr '\n' ' ')"; }
fi
rm -f "$o"/*/.moe-validate.lock; rm -rf "$o"/*/logs
