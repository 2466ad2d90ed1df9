#!/usr/bin/env bash
# The GPU part of the selftest (issue 8): the mutants the CPU smoke suite cannot kill, on the
# premerge suite plus their extra cases (int32_offsets' M*topk*N > 2^31 case), one mutant
# process at a time (the extra case takes ~9 GB). Kill matrix under $OUT/selftest-premerge.
#   OUT=/tmp/out bash scripts/gpu_selftest.sh [more mutant names]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT="${OUT:-$PWD/reports/gpu-selftest}"
mutants=$(python3 -c "from moe_validate.mutants import MUTANTS; print(' '.join(m.name for m in MUTANTS if m.catch == 'premerge'))")
python3 -m moe_validate.cli selftest --suite premerge --mutant $mutants "$@" --workers 1 --first-kill \
    --out "$OUT/selftest-premerge"
