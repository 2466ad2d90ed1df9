set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
o=$OUT; t0=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_pdl.py tests/contract/test_interpreter.py 2>&1 | tail -n 3
for s in premerge nightly; do
  timeout 250 python3 -m moe_validate.cli run --suite $s --out $o/$s > $o/$s.log 2>&1; echo "$s rc=$? $(( $(date +%s)-t0 ))s: $(tail -n 2 $o/$s.log | tr '\n' ' ')"
done
timeout $(( 480 - ($(date +%s)-t0) )) python3 -m moe_validate.cli calibrate --suite premerge --seeds 2 --out $o/cal > $o/cal.log 2>&1; echo "cal rc=$? $(( $(date +%s)-t0 ))s"; tail -n 40 $o/cal.log
rm -f $o/*/.moe-validate.lock; rm -rf $o/*/logs
