# The backend contract on a GPU (issue 17 parts 3-5): the call contract, the routing layouts and
# the triton backend's stages natively (their bounds were derived and checked on the CPU
# interpreter only), then premerge with the contract on every call.
# Run with the device tool from the repository root; $OUT receives the logs.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
o=$OUT; t0=$(date +%s)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/moe_validate/test_stages.py tests/moe_validate/test_call_contract.py \
  tests/moe_validate/test_routing_contract.py tests/moe_validate/test_backends_doc.py 2>&1 | tail -n 15
timeout $(( 560 - ($(date +%s)-t0) )) python3 -m moe_validate.cli run --suite premerge --out $o/premerge > $o/premerge.log 2>&1
echo "premerge rc=$? $(( $(date +%s)-t0 ))s: $(tail -n 2 $o/premerge.log | tr '\n' ' ')"
grep -h '"contract:\|stage_localization' $o/premerge/results.jsonl | head -c 4000
rm -f $o/*/.moe-validate.lock; rm -rf $o/*/logs
