#!/usr/bin/env bash
# Several GPUs, one host (issue 11): the suite with one worker per GPU while nvidia-smi samples
# both GPUs, the same suite on GPU 0 alone, a case-for-case comparison of the two result sets,
# then the pytest plugin under `-n auto` (one xdist worker per GPU, each pinned to its own).
# Logs and results under $OUT; a summary prints last. Budget: under 9 minutes on 2 H200s.
#
# Usage: bash scripts/gpu_multi.sh [--suite nightly|premerge|smoke|bringup] [--filter EXPR] [--no-pytest]
# Needs torch, triton, pytest, pytest-xdist, jinja2; the package need not be installed.
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out=${OUT:-/tmp/moe-multi-out}; mkdir -p "$out"
suite=nightly
filter=()
with_pytest=1
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=${2:?--suite needs a value}; shift 2 ;;
    --suite=*) suite=${1#*=}; shift ;;
    --filter) filter=(--filter "${2:?--filter needs a value}"); shift 2 ;;
    --no-pytest) with_pytest=0; shift ;;
    *) echo "usage: $0 [--suite NAME] [--filter EXPR] [--no-pytest]" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
budget_s=510  # 8.5 min for the steps below; the rest is start-up and the summary
remaining() { echo $(( budget_s - ($(date +%s) - start) )); }
cap() { local r; r=$(remaining); [ "$r" -lt 10 ] && r=10; [ "$r" -lt "$1" ] && echo "$r" || echo "$1"; }
summary=()

nvidia-smi | tee "$out/nvidia-smi.txt"
nvidia-smi -L | tee -a "$out/nvidia-smi.txt"
python3 -m moe_validate.cli env > "$out/env.txt" 2>&1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "visible GPUs: $ngpu (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}); suite: $suite"
[ "$ngpu" -ge 2 ] || echo "WARNING: fewer than 2 GPUs; the multi-GPU run is a single-GPU run"

# Each run compiles its kernels from a cold Triton cache of its own, so the two timings compare.
run_suite() {  # name, limit_s, [env assignments...]
  local name=$1 limit=$2; shift 2
  local t0 t1 rc
  t0=$(date +%s.%N)
  # SIGINT: the runner stops its workers and keeps every finished case (a partial result set).
  env "$@" TRITON_CACHE_DIR="/tmp/triton-cache-$name" \
    timeout -s INT -k 30 "$limit" python3 -m moe_validate.cli run --suite "$suite" "${filter[@]}" --out "$out/$name" \
    > "$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local wall; wall=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  echo "$wall" > "$out/$name.wall_s"
  summary+=("run $name (limit ${limit}s): rc=$rc, wall ${wall} s: $(tail -n 1 "$out/$name.log")")
  [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] && summary+=("  $name was cut at its time limit: the comparison covers its finished cases only")
  return 0
}

# 1. One worker per GPU (the runner's default), GPUs sampled every second.
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv -l 1 > "$out/gpu_util.csv" 2>&1 &
smi_pid=$!
run_suite multi "$(cap 220)"
kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null

# 2. The same suite on GPU 0 alone (one worker).
run_suite single "$(cap 270)" CUDA_VISIBLE_DEVICES=0

# 3. Case for case: the same cases, outcomes, parameters, configs, tolerances and metrics.
python3 -m moe_validate.cli compare "$out/single/results.jsonl" "$out/multi/results.jsonl" > "$out/compare.txt" 2>&1
summary+=("moe-validate compare single multi: rc=$? ($out/compare.txt)")
python3 - "$out" > "$out/agreement.txt" 2>&1 <<'PY'
import csv, json, math, sys
from pathlib import Path
from moe_validate.results import load_results

out = Path(sys.argv[1])
multi = load_results([out / "multi" / "results.jsonl"])
single = load_results([out / "single" / "results.jsonl"])
m, s = multi.by_id(), single.by_id()
print(f"multi: {len(m)} cases, workers={multi.headers[0].get('workers')}, gpus={multi.headers[0].get('gpus')}, "
      f"footer duration {multi.footers[0]['duration_s'] if multi.footers else 'none (cut)'} s")
print(f"single: {len(s)} cases, workers={single.headers[0].get('workers')}, gpus={single.headers[0].get('gpus')}, "
      f"footer duration {single.footers[0]['duration_s'] if single.footers else 'none (cut)'} s")
both = sorted(set(m) & set(s))
only = sorted(set(m) ^ set(s))
# Compared exactly: the same kernels, configs and seeded inputs on the same GPU model give the
# same bits. duration_s (wall time) is the only field left out.
FIELDS = ("params", "outcome", "reason", "config", "tolerance", "metrics", "worst_margin")
def same(a, b):
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
differ = {cid: [f for f in FIELDS if not same(m[cid].get(f), s[cid].get(f))] for cid in both}
differ = {cid: fs for cid, fs in differ.items() if fs}
print(f"compared {len(both)} cases: {len(both) - len(differ)} identical in {', '.join(FIELDS)}; {len(differ)} differ")
for cid, fs in list(differ.items())[:20]:
    print(f"  DIFFER {cid}: {', '.join(fs)} (outcome multi={m[cid]['outcome']} single={s[cid]['outcome']})")
if only:
    print(f"{len(only)} cases in one run only (a run cut at its limit?): {only[:10]}")
# Both GPUs busy: samples of the multi run with utilization > 0 per GPU.
busy, seen = {}, {}
with open(out / "gpu_util.csv", newline="") as fh:
    for row in csv.reader(fh):
        if len(row) < 3 or not row[0].strip().isdigit():
            continue
        idx = int(row[0]); util = float(row[1].strip().split()[0])
        seen[idx] = seen.get(idx, 0) + 1
        busy[idx] = busy.get(idx, 0) + (util > 0)
print("gpu_util.csv, samples with utilization > 0 per GPU during the multi run: "
      + ", ".join(f"GPU {i}: {busy.get(i, 0)}/{n}" for i, n in sorted(seen.items())))
outcomes_differ = sum(1 for cid in both if m[cid]["outcome"] != s[cid]["outcome"])
print(f"AGREEMENT: {'OK' if not differ and not only else 'NOT OK'} "
      f"({outcomes_differ} outcome differences, {len(differ)} field differences, {len(only)} unmatched)")
sys.exit(0 if not differ and not only else 1)
PY
summary+=("agreement check: rc=$? ($(tail -n 1 "$out/agreement.txt"))")
cat "$out/agreement.txt"

# 4. The pytest plugin: -n auto = one xdist worker per GPU, each pinned (CUDA_VISIBLE_DEVICES in
# every worker's results header). Premerge fp8_block128 cases, on the multi run's warm cache.
if [ "$with_pytest" -eq 1 ] && [ "$(remaining)" -gt 30 ]; then
  t0=$(date +%s)
  # -p loads the plugin where the package is not installed (an installed one registers itself).
  plugin=(-p moe_validate.pytest_plugin)
  python3 -c "import importlib.metadata as m, sys; sys.exit(0 if any(e.value == 'moe_validate.pytest_plugin'
      for e in m.entry_points(group='pytest11')) else 1)" 2>/dev/null && plugin=()
  TRITON_CACHE_DIR="/tmp/triton-cache-multi" timeout -s INT -k 20 "$(cap 90)" \
    python3 -m pytest tests/test_validation_suite.py "${plugin[@]}" -p no:cacheprovider -q \
    -n auto --moe-suite premerge --moe-filter scheme=fp8_block128 --moe-results "$out/pytest-results" \
    > "$out/pytest.log" 2>&1
  rc=$?
  pins=$(python3 - "$out/pytest-results" <<'PY'
import sys
from pathlib import Path
from moe_validate.results import load_results
files = sorted(Path(sys.argv[1]).glob("results-*.jsonl"))
rs = load_results(files) if files else None
print("; ".join(f"{h.get('worker')}: CUDA_VISIBLE_DEVICES={h['env'].get('cuda_visible_devices')} "
                f"gpu_count={h['env'].get('gpu_count')}" for h in (rs.headers if rs else [])))
PY
)
  summary+=("pytest -n auto (premerge fp8_block128): rc=$rc, $(( $(date +%s) - t0 )) s: $(tail -n 1 "$out/pytest.log")")
  summary+=("  workers: $pins")
fi

rm -rf "$out"/triton-cache-*  # compiled kernels: large and not evidence
echo
echo "=== summary (suite $suite, $ngpu GPUs, $(( $(date +%s) - start )) s in all) ==="
printf '%s\n' "${summary[@]}"
echo "wall: multi $(cat "$out/multi.wall_s" 2>/dev/null) s, single $(cat "$out/single.wall_s" 2>/dev/null) s"
