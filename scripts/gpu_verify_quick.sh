#!/usr/bin/env bash
# One device call of GPU evidence for a tree (one H200). Steps, each under its own time limit:
#   smoke                   the triton backend on the CPU suite's cases ($SMOKE_FILTER)
#   premerge, nightly       the triton backend on the GPU suites
#   pytest                  the native tests of the kernels, the contract and the newest harness modules
#                           ($PYTEST_FILES overrides the list)
#   independent             tests/moe_validate/independent_experts.py as a third-party backend on
#                           $INDEPENDENT_SUITE (default premerge; it declares its own numerics profile;
#                           issue 17: no false FAIL)
#   vllm                    the vllm backend on smoke and premerge through the carried bundle (.gpu_vllm)
#   nightly-fresh           nightly with fresh seeds (issue 23: no false alarm), then calibrate --strict --from
#                           its records; FRESH_SAVE=REGEX also returns the outputs of the cases it matches
#                           (outputs.tar.*, for re-deriving z-scores on the CPU)
#   selftest                independent mutants ($MUTANTS; default the GPU-only ones) against premerge
#   planted                 the planted skipped-rounding / one-ulp mutants the count test kills
#                           ($PLANTED), against premerge (issue 23: the count test on a GPU)
# STEPS (default "premerge nightly pytest independent vllm") picks them, in that order; the call
# ends inside LIMIT seconds (default 560). Everything lands in one tarball, $OUT/gpu.tar.gz (a
# device machine returns few files), with a summary in $OUT/summary.log.
#   run(command="bash scripts/gpu_verify_quick.sh", carry=[".gpu_vllm"])
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
o=${OUT:-/tmp/gpu-verify}; mkdir -p "$o/r"; t0=$(date +%s)
limit=${LIMIT:-560}; steps=${STEPS:-premerge nightly pytest independent vllm}
left() { echo $(( limit - ($(date +%s) - t0) )); }
step() { echo "$1 rc=$2 $(( $(date +%s) - t0 ))s: $3" | tee -a "$o/summary.log"; }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$o/summary.log" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$o/summary.log" 2>&1
for s in $steps; do
  [ "$(left)" -gt 20 ] || { step "$s" skip "no time left"; continue; }
  case $s in
    smoke)  # the CPU suite's cases natively ($SMOKE_FILTER narrows them)
      timeout "$(cap 150)" python3 -m moe_validate.cli run --suite smoke ${SMOKE_FILTER:+--filter "$SMOKE_FILTER"} \
        --out "$o/r/smoke" --no-report > "$o/r/smoke.log" 2>&1
      step smoke $? "$(tail -n 3 "$o/r/smoke.log" | tr '\n' ' ')";;
    premerge|nightly)
      timeout "$(cap 200)" python3 -m moe_validate.cli run --suite $s --out "$o/r/$s" --no-report > "$o/r/$s.log" 2>&1
      step $s $? "$(tail -n 3 "$o/r/$s.log" | tr '\n' ' ')";;
    nightly-fresh)
      timeout "$(cap ${FRESH_LIMIT:-200})" python3 -m moe_validate.cli run --suite nightly --repeat ${FRESH_REPEAT:-1} --fresh-seeds --first-repetition ${FRESH_REP:-7} --workers ${FRESH_WORKERS:-1} \
        --out "$o/r/$s" --no-report ${FRESH_SAVE:+--save-outputs "$o/outs"} > "$o/r/$s.log" 2>&1
      step $s $? "$(tail -n 3 "$o/r/$s.log" | tr '\n' ' ')"
      if [ -n "${FRESH_SAVE:-}" ]; then  # the outputs of the cases matching $FRESH_SAVE, in parts of 15 MB (the device's file limit)
        for f in "$o/outs"/*.npz; do basename "$f" | grep -qE "$FRESH_SAVE" || rm -f "$f"; done
        step outputs 0 "$(ls "$o/outs" | grep -c npz) outputs in outputs.tar.*"
        tar cf - -C "$o" outs | split -b 15M - "$o/outputs.tar." && rm -rf "$o/outs"
      fi
      # the calibration table of those records (issue 23: calibrate --strict on a GPU nightly)
      python3 -m moe_validate.cli calibrate --strict --from "$o/r/$s/results.jsonl" > "$o/r/$s-calibrate.txt" 2>&1
      step calibrate $? "$(grep -cE '(HIGH|LOW)' "$o/r/$s-calibrate.txt") flagged row(s), table in r/$s-calibrate.txt";;
    pytest)
      timeout "$(cap 170)" python3 -m pytest -q -n 16 -p no:cacheprovider ${PYTEST_FILES:-tests/kernels tests/contract \
        tests/moe_validate/test_call_contract.py tests/moe_validate/test_stage_localization.py \
        tests/moe_validate/test_routing_contract.py tests/moe_validate/test_backends_doc.py \
        tests/moe_validate/test_golden.py tests/moe_validate/test_verdicts.py} > "$o/r/pytest.log" 2>&1
      step pytest $? "$(tail -n 1 "$o/r/pytest.log")"; grep -E "^(FAILED|ERROR)" "$o/r/pytest.log" | head -n 20 | tee -a "$o/summary.log";;
    independent)
      PYTHONPATH=$PWD:$PWD/tests/moe_validate timeout "$(cap ${INDEPENDENT_LIMIT:-120})" python3 -m moe_validate.cli run --suite ${INDEPENDENT_SUITE:-premerge} --workers ${INDEPENDENT_WORKERS:-1} \
        --backend independent_experts:IndependentExperts --out "$o/r/independent" --no-report > "$o/r/independent.log" 2>&1
      step independent $? "$(tail -n 3 "$o/r/independent.log" | tr '\n' ' ')";;
    vllm)
      if [ -d .gpu_vllm ]; then
        OUT="$o/r" timeout "$(cap ${VLLM_LIMIT:-400})" bash scripts/gpu_vllm.sh ${VLLM_SUITES:-smoke premerge} > "$o/r/vllm.log" 2>&1
        step vllm $? "$(tail -n 4 "$o/r/vllm.log" | tr '\n' ' ')"
      else step vllm skip "no .gpu_vllm carried"; fi;;
    selftest)  # the independent set's GPU-only mutants and smoke's survivors against premerge (issue 26)
      timeout "$(cap 200)" python3 -m moe_validate.cli selftest --suite premerge --catalogue independent --all-cases \
        --first-kill --workers 4 --mutant ${MUTANTS:-ind_gemm_topk_sum_contractible_add ind_shim_fp32_dot_default_precision} \
        --out "$o/r/selftest" > "$o/r/selftest.log" 2>&1
      step selftest $? "$(tail -n 4 "$o/r/selftest.log" | tr '\n' ' ')";;
    planted)  # the mutants the count test exists for (docs/BOUNDS.md), against premerge natively
      timeout "$(cap 200)" python3 -m moe_validate.cli selftest --suite premerge --first-kill --workers 4 --cap 8 \
        --mutant ${PLANTED:-c1_kept_in_fp32 c2_kept_in_fp32 c3_kept_in_fp32 acc_rounded_to_bf16_per_k_tile output_one_ulp_high} \
        --out "$o/r/planted" > "$o/r/planted.log" 2>&1
      step planted $? "$(tail -n 8 "$o/r/planted.log" | tr '\n' ' ')";;
    *) step "$s" skip "unknown step";;
  esac
done
find "$o/r" -name .moe-validate.lock -delete; find "$o/r" -type d -name logs -prune -exec rm -rf {} +
tar czf "$o/gpu.tar.gz" -C "$o" r && rm -rf "$o/r"
echo "total $(( $(date +%s) - t0 ))s" | tee -a "$o/summary.log"
