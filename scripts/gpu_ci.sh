#!/usr/bin/env bash
# GPU evidence in one call (device tool, one H100): the test suite natively, then the premerge and
# nightly validation suites through the CLI. Logs and results under $OUT; a summary prints last.
# Usage: bash scripts/gpu_ci.sh [pytest -n workers] ; needs torch, triton, pytest-xdist, hypothesis, jinja2.
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out=${OUT:-/tmp/moe-gpu-out}; mkdir -p "$out"
workers=${1:-8}
summary=()
python3 -m moe_validate.cli env | tee "$out/env.txt"

t0=$(date +%s)
# selftest runs every mutant in its own process (compiles each kernel again): run on demand, not here;
# e2e needs Chromium, which the GPU image lacks (those tests skip with that reason)
python3 -m pytest tests -q -n "$workers" -p no:cacheprovider --ignore=tests/moe_validate/test_selftest.py \
    -rs --junitxml="$out/junit.xml" > "$out/pytest.log" 2>&1
rc=$?
summary+=("pytest tests (-n $workers): rc=$rc, $(( $(date +%s) - t0 )) s: $(tail -n 1 "$out/pytest.log")")

for suite in premerge nightly; do
  t0=$(date +%s)
  python3 -m moe_validate.cli run --suite "$suite" --out "$out/$suite" > "$out/$suite.log" 2>&1
  rc=$?
  summary+=("run --suite $suite: rc=$rc, $(( $(date +%s) - t0 )) s: $(grep -E 'PASS|FAIL' "$out/$suite.log" | tail -n 2 | tr '\n' ' ')")
done
grep -E "FAILED|ERROR" "$out/pytest.log" | head -n 30
printf '%s\n' "${summary[@]}"
