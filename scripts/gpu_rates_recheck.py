"""Re-derive, on the CPU, the count model of GPU runs that scripts/gpu_stage_rates.py measured: the model
depends only on the inputs and the mirror, so each record's observed counts (the GPU's) can be set against
the current tolerance.py's expected counts and allowance under ``native_gpu=True``, without a GPU.

    python scripts/gpu_rates_recheck.py [--reps 0 3] [--jobs 2] RATES.jsonl ... > recheck.tsv
Prints per run: observed / expected and observed / allowed of the out-level count, then per (dtype, scheme)
the pooled ratio and the worst run, and the stage rows (c1 own, c3 own) pooled against the model."""
import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling measurement script
from gpu_stage_rates import expected_count  # noqa: E402


def rederive(rec):
    import torch

    torch.set_num_threads(1)
    from moe_validate import tolerance as tol
    from moe_validate.inputs import make_inputs
    from moe_validate.matrix import Case
    from reference.pipeline import stage_functions

    case = Case.from_id(rec["case_id"])
    inputs = make_inputs(case, device="cpu")
    fns = stage_functions(*inputs.args(), **inputs.kwargs(), precision="mirror")
    mirror = fns.run()
    per_stage = {}
    from moe_validate.contract.profile import Fp8Accumulation

    unit = rec.get("fp8_accumulation")  # what the GPU run's backend reported (absent in older rates files)
    tol.flip_aware_sigma(inputs, mirror, native_gpu=True, per_stage=per_stage,
                         fp8_accumulation=None if unit is None else Fp8Accumulation(unit))
    allowed, expected, _, _ = tol.count_allowance(inputs, mirror, per_stage)
    valid = fns.valid.to(torch.bool)

    def model(key, stage):  # the measurement's own sum of p (gpu_stage_rates.expected_count)
        return float(expected_count(per_stage[key], valid, mirror[stage])) if key in per_stage else 0.0

    return {"case_id": rec["case_id"], "dtype": rec["dtype"], "scheme": rec["scheme"], "activation": rec["activation"],
            "observed": rec["stages"]["out"]["total"]["observed"], "n": rec["stages"]["out"]["total"]["n"],
            "expected": expected, "allowed": allowed,
            "c1": (rec["stages"].get("c1", {}).get("own", {}).get("observed"), model("p_c1", "c1")),
            "c3": (rec["stages"].get("c3", {}).get("own", {}).get("observed"), model("p_c3_direct", "c3"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--reps", type=int, nargs="*")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    recs, seen = [], set()
    for path in a.paths:
        for line in open(path):
            r = json.loads(line)
            if "stages" not in r or r["dtype"] == "fp32" or r["case_id"] in seen:
                continue
            if a.reps is not None and r["repetition"] not in a.reps:
                continue
            if a.filter and a.filter not in r["case_id"]:
                continue
            seen.add(r["case_id"])
            recs.append(r)
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(rederive, recs, chunksize=4))
    pooled = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0, 0.0, 0, 0.0])
    for x in rows:
        ok = x["allowed"] < x["n"]
        print(f"{x['observed'] / max(x['expected'], 1e-9):8.2f} {x['observed'] / max(x['allowed'], 1):6.2f} "
              f"{x['observed']:7d} {x['expected']:9.1f} {x['allowed']:7d} {x['n']:7d} {'' if ok else 'no-test'} "
              f"{x['case_id']}")
        k = (x["dtype"], x["scheme"])
        p = pooled[k]
        p[0] += x["observed"]
        p[1] += x["expected"]
        if ok:
            p[2] = max(p[2], x["observed"] / max(x["allowed"], 1))
        if x["expected"] >= 5:
            p[3] = max(p[3], x["observed"] / x["expected"])
        for i, st in ((4, "c1"), (6, "c3")):
            if x[st][0] is not None:
                p[i] += x[st][0]
                p[i + 1] += x[st][1]
    print("# dtype scheme: out observed/expected pooled, worst run (expected >= 5); worst observed/allowed; "
          "c1 own, c3 own observed/model", file=sys.stderr)
    for k in sorted(pooled):
        p = pooled[k]
        print(f"# {k[0]} {k[1]:20} out {p[0] / max(p[1], 1e-9):6.2f} worst {p[3]:6.2f}  used {p[2]:5.2f}  "
              f"c1 {p[4] / max(p[5], 1e-9):5.2f}  c3 {p[6] / max(p[7], 1e-9):5.2f}", file=sys.stderr)
    print(f"# {len(rows)} runs; over the allowance: {sum(1 for x in rows if x['observed'] > x['allowed'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
