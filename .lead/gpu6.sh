export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
unset TRITON_INTERPRET
t0=$(date +%s)
echo "== selftest: premerge mutants + new kernel-path mutants"
timeout 200 bash scripts/gpu_selftest.sh folded_token_scale_half_k fused_fp8_group_absmax_unrounded block_scale_expert0 > $OUT/selftest.log 2>&1; echo "rc $? $(( $(date +%s) - t0 ))s"; grep -A8 "^mutant " $OUT/selftest.log | head -9
echo "== bench decode (profile)"
timeout 200 python -m moe_validate.cli bench --quick --m 1,16 --schemes bf16,fp8_tensor,fp8_block --peers torch-grouped --profile --time-budget 180 --out $OUT/b1 > $OUT/b1.txt 2> $OUT/b1.log; echo "rc $?"
grep -v "^  " $OUT/b1.txt | grep -A40 "^model"; grep -E "M=1:" $OUT/b1.txt | cut -c1-250
cd $OUT && tar czf res.tgz b1 selftest-premerge *.txt *.log 2>/dev/null; rm -rf b1 selftest-premerge
