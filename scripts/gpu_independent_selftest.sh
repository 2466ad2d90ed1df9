#!/usr/bin/env bash
# The independent mutant set (issue 26) against the GPU suites: what premerge (and nightly) kill
# that the CPU smoke suite cannot. Run on a CUDA machine from the repository root; writes the kill
# matrices under reports/. Each suite runs every one of its cases on each mutant (--all-cases),
# stopping a mutant at its first kill (--first-kill).
# Exit status 1 (a survivor) does not stop the next suite; the last line says which failed.
set -uo pipefail
unset TRITON_INTERPRET
failed=""
for suite in premerge ${NIGHTLY:+nightly}; do
  python -m moe_validate.cli selftest --suite "$suite" --catalogue independent --all-cases --first-kill \
    --workers 2 --out "reports/selftest-independent-$suite" || failed="$failed $suite"
done
echo "independent selftest: ${failed:+survivors or errors in:$failed}${failed:-every expected mutant killed}"
