export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
unset TRITON_INTERPRET
t0=$(date +%s)
echo "== pytest tests/kernels -n 4"
timeout 200 python -m pytest -q -n 4 tests/kernels -p no:cacheprovider -rs > $OUT/pytest_kernels.txt 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -E "FAILED|ERROR" $OUT/pytest_kernels.txt | head -20; tail -1 $OUT/pytest_kernels.txt
t0=$(date +%s)
echo "== pytest tests (rest) -n 6"
timeout 150 python -m pytest -q -n 6 tests --ignore=tests/kernels --ignore=tests/moe_validate/test_selftest.py -p no:cacheprovider -rs > $OUT/pytest_rest.txt 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -E "FAILED|ERROR" $OUT/pytest_rest.txt | head -20; tail -1 $OUT/pytest_rest.txt
t0=$(date +%s)
echo "== premerge + nightly suites"
timeout 60 python -m moe_validate.cli run --suite premerge --workers 3 --out $OUT/premerge > $OUT/premerge.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -1 $OUT/premerge.log
t0=$(date +%s)
timeout 150 python -m moe_validate.cli run --suite nightly --workers 3 --out $OUT/nightly > $OUT/nightly.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -1 $OUT/nightly.log; grep -E "FAIL|ERROR" $OUT/nightly.log | head
cd $OUT && tar czf res.tgz premerge nightly *.txt *.log 2>/dev/null; rm -rf premerge nightly
