export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
unset TRITON_INTERPRET
echo "== timing probe"
timeout 90 python .lead/timing_probe.py 2>&1 | tail -5
echo "== gpu kernel tests"
timeout 240 python -m pytest -q -x -n 8 tests/kernels -p no:cacheprovider > $OUT/tests_kernels.txt 2>&1; echo "rc $?"; tail -4 $OUT/tests_kernels.txt
echo "== bench decode"
timeout 170 python -m moe_validate.cli bench --quick --m 1,16 --schemes bf16,fp8_tensor,fp8_block --peers torch-grouped --profile --time-budget 150 --out $OUT/b1 > $OUT/b1.txt 2> $OUT/b1.log; echo "rc $?"
grep -B100 "kernel breakdown" $OUT/b1.txt | head -60; grep -A3 "^geomean" $OUT/b1.txt
echo "== bench prefill"
timeout 100 python -m moe_validate.cli bench --quick --models mixtral-8x7b,qwen3-30b-a3b --m 16384 --schemes fp8_block,fp8_tensor --peers none --profile --time-budget 80 --out $OUT/b2 > $OUT/b2.txt 2> $OUT/b2.log; echo "rc $?"
grep -A30 "^model" $OUT/b2.txt
cd $OUT && tar czf res.tgz b1 b2 *.txt *.log && rm -rf b1 b2
