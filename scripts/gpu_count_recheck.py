"""For results a GPU wrote: re-derive each case's count-test allowance on the CPU (native_gpu=True, the count test
forced on; the allowance depends only on the inputs and the mirror) and print observed differing vs allowed and expected.
   python scripts/gpu_count_recheck.py GPU_RESULTS.jsonl ... (no kernel runs here)"""
import json, sys, math
import torch
import reference
from moe_validate import tolerance as tol
from moe_validate.contract.profile import Fp8Accumulation
from moe_validate.matrix import Case
from moe_validate.inputs import make_inputs
tol.COUNT_TEST_ON_GPU = True
rows = []
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") != "case" or r.get("outcome") != "PASS" or not r.get("metrics"):
            continue
        case = Case.from_id(r["case_id"])
        if case.M * case.K * case.topk > 3e6:
            continue
        inputs = make_inputs(case, device="cpu")
        mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
        # the fp8 accumulator the run was modelled with: the record's fp8_accumulation (since session 11),
        # else its u_acc (2^-24: the backend reported fp32)
        unit = r["tolerance"]["gate"].get("fp8_accumulation")
        if unit is None:
            unit = "fp32" if case.quant.is_fp8 and r["tolerance"]["gate"].get("u_acc") == tol.U32 else "unreported"
        b = tol.derive(case, inputs, mirror, native_gpu=True,
                       fp8_accumulation=None if unit == "unreported" else Fp8Accumulation(unit))
        d = r["metrics"]["mirror"]["differing"]
        rows.append((d["value"] / max(b["gate"].count_allowed, 1), int(d["value"]), b["gate"].count_allowed,
                     r["tolerance"]["gate"].get("differing_expected"), d["of"], r["case_id"]))
rows = [x for x in rows if x[2] < x[4]]
rows.sort(key=lambda x: -(x[1] / max(x[3] or 1e-9, 1e-9)))
for x in rows:
    print("%.3f %7d %7d %9.1f %8d %s" % x)
print(len(rows), "cases; over allowance:", sum(1 for x in rows if x[0] > 1))
