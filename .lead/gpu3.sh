export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
unset TRITON_INTERPRET
t0=$(date +%s)
echo "== pytest tests/kernels -n 4"
timeout 280 python -m pytest -q -n 4 tests/kernels -p no:cacheprovider -rs > $OUT/pytest_kernels.txt 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -E "FAILED|ERROR" $OUT/pytest_kernels.txt | head -20; tail -1 $OUT/pytest_kernels.txt
t0=$(date +%s)
echo "== pytest tests (rest) -n 6"
timeout 200 python -m pytest -q -n 6 tests --ignore=tests/kernels --ignore=tests/moe_validate/test_selftest.py -p no:cacheprovider -rs > $OUT/pytest_rest.txt 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -E "FAILED|ERROR" $OUT/pytest_rest.txt | head -20; tail -1 $OUT/pytest_rest.txt
t0=$(date +%s)
echo "== premerge suite"
timeout 120 python -m moe_validate.cli run --suite premerge --workers 3 --out $OUT/premerge > $OUT/premerge.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -3 $OUT/premerge.log
t0=$(date +%s)
echo "== selftest premerge mutants + block-scale + fused group quant mutants"
timeout 150 bash scripts/gpu_selftest.sh block_scale_index_transposed block_scale_expert0 fused_fp8_group_absmax_unrounded > $OUT/selftest.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -12 $OUT/selftest.log
cd $OUT && tar czf res.tgz premerge selftest-premerge *.txt *.log 2>/dev/null; rm -rf premerge selftest-premerge
