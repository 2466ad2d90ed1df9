export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
unset TRITON_INTERPRET
t0=$(date +%s)
echo "== selftest: block-scale mutants + the premerge mutants"
timeout 150 bash scripts/gpu_selftest.sh block_scale_index_transposed block_scale_expert0 channel_scale_wrong_axis tensor_scale_expert0 > $OUT/selftest.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -A12 "^mutant " $OUT/selftest.log | head -14
t0=$(date +%s)
echo "== premerge + nightly suites (new weight magnitudes)"
timeout 60 python -m moe_validate.cli run --suite premerge --workers 3 --out $OUT/premerge > $OUT/premerge.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -1 $OUT/premerge.log
t0=$(date +%s)
timeout 300 python -m moe_validate.cli run --suite nightly --workers 3 --out $OUT/nightly > $OUT/nightly.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; tail -2 $OUT/nightly.log; grep -E "FAIL|ERROR" $OUT/nightly.log | head
cd $OUT && tar czf res.tgz premerge nightly selftest-premerge *.log 2>/dev/null; rm -rf premerge nightly selftest-premerge
