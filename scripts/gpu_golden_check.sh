# Golden outputs and --against on a GPU (issue 22), for the device tool: run from the repo root with
# $OUT set. Native Triton: premerge twice with --save-outputs (the two stores must be bitwise-equal:
# the same kernels on the same GPU), then premerge --against reference (every case within 2 x gate).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
o=$OUT; t0=$(date +%s)
for r in a b; do
  timeout 200 python3 -m moe_validate.cli run --suite premerge --out $o/run-$r --save-outputs $o/outputs-$r --no-report \
    > $o/run-$r.log 2>&1; echo "run $r rc=$? $(( $(date +%s)-t0 ))s: $(tail -n 1 $o/run-$r.log)"
done
python3 -m moe_validate.cli compare --outputs $o/outputs-a $o/outputs-b > $o/compare.log 2>&1
echo "compare --outputs rc=$?: $(tail -n 1 $o/compare.log)"; grep -v bitwise-equal $o/compare.log | head -n 20
timeout 240 python3 -m moe_validate.cli run --suite premerge --against reference --out $o/against --no-report \
  > $o/against.log 2>&1; echo "against rc=$? $(( $(date +%s)-t0 ))s: $(tail -n 1 $o/against.log)"
python3 - "$o/against/results.jsonl" <<'PY'
import json, sys
checks = [c for line in open(sys.argv[1]) for rec in [json.loads(line)] if rec.get("kind") == "case"
          for c in rec.get("checks") or () if c["name"].startswith("against:")]
worst = max((c.get("margin") or 0 for c in checks), default=None)
print(f"against checks: {len(checks)}, outcomes {sorted({c['outcome'] for c in checks})}, worst margin {worst}")
PY
du -sh $o/outputs-a; rm -rf $o/outputs-b $o/*/logs; rm -f $o/*/.moe-validate.lock
