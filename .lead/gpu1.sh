export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
echo "== probe"
timeout 240 python scripts/gpu_probe_fp8_block.py 8192 14336 4096 > $OUT/probe.txt 2>&1; echo "probe rc $?"
cat $OUT/probe.txt | tail -40
echo "== bench decode profile"
timeout 200 python -m moe_validate.cli bench --quick --m 1,16 --schemes bf16,fp8_tensor,fp8_block --peers torch-grouped --profile --time-budget 170 --out $OUT/b1 > $OUT/b1.txt 2> $OUT/b1.log; echo "rc $?"
grep -A200 "^model" $OUT/b1.txt | tail -60
echo "== bench prefill profile"
timeout 150 python -m moe_validate.cli bench --quick --models mixtral-8x7b,qwen3-30b-a3b --m 1024,16384 --schemes bf16,fp8_tensor,fp8_block --peers none --profile --time-budget 120 --out $OUT/b2 > $OUT/b2.txt 2> $OUT/b2.log; echo "rc $?"
grep -A200 "^model" $OUT/b2.txt | tail -30
cd $OUT && tar czf res.tgz b1 b2 *.txt *.log && rm -rf b1 b2
