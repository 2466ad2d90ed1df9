"""What the chained fp8 MMA's |c| part costs the gate's per-element bound (issue 23; docs/BOUNDS.md).

For the fp8 cases of the chosen suites whose dots chain the accumulator (tolerance.fp8_mma_chained)
at fresh seeds, on this machine's device: our kernel's output, the mirror, and the gate derived twice,
with the term (the code) and without it (fp8_mma_truncation_sigma patched to zero, the gate before
session 13). Per case: the median and largest ratio of the two allowances over the elements, and the
kernel's worst margin max |kernel - mirror| / allowed under each. One JSON line per run into
$OUT/gate_chained_cost.jsonl (or ./), then a summary per (dtype, scheme).

    PYTHONPATH=. python3 scripts/gpu_gate_chained_cost.py [--suite premerge --suite nightly] [--reps 80 81]
"""
import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from unittest import mock

import torch

F64 = torch.float64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", default=None)
    parser.add_argument("--reps", type=int, nargs="*", default=[80])
    parser.add_argument("--limit", type=float, default=240.0, help="seconds")
    args = parser.parse_args()
    import reference
    from moe_validate import tolerance as tol
    from moe_validate.backends import declared, get_backend
    from moe_validate.contract.spec import QuantScheme
    from moe_validate.inputs import make_inputs
    from moe_validate.matrix import suite_cases
    from moe_validate.run.shards import fresh_seed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    native = device == "cuda"
    backend = get_backend("triton")
    suites = args.suite or ["premerge", "nightly"]
    bases = {c.id: c for s in suites for c in suite_cases(s)
             if c.scheme and c.scheme.startswith("fp8_") and tol.fp8_mma_chained(QuantScheme.parse(c.scheme), True)}
    path = os.path.join(os.environ.get("OUT", "."), "gate_chained_cost.jsonl")
    t0 = time.time()
    rows = defaultdict(list)
    with open(path, "a") as fh:
        for rep in args.reps:
            for base in bases.values():
                if time.time() - t0 > args.limit:
                    break
                case = dataclasses.replace(base, seed=fresh_seed(base.seed, rep))
                ok, _ = backend.supports(case)
                if not ok:
                    continue
                inputs = make_inputs(case, device=device)
                out = backend.run(inputs, case).to(F64)
                acc = declared(backend, "last_fp8_accumulation")
                mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
                with_term = tol.derive(case, inputs, mirror, native_gpu=native, fp8_accumulation=acc)["gate"].allowed
                with mock.patch.object(tol, "fp8_mma_truncation_sigma", lambda n, size: torch.zeros_like(size)):
                    without = tol.derive(case, inputs, mirror, native_gpu=native, fp8_accumulation=acc)["gate"].allowed
                d = (out - mirror["out"].to(F64)).abs()
                keep = torch.isfinite(d) & (without > 0)
                if not bool(keep.any()):
                    continue
                ratio = (with_term[keep] / without[keep])
                rec = {"case_id": case.id, "dtype": case.dtype, "scheme": case.scheme,
                       "ratio_median": float(ratio.median()), "ratio_max": float(ratio.max()),
                       "margin_with": float((d[keep] / with_term[keep]).max()),
                       "margin_without": float((d[keep] / without[keep]).max())}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                rows[(case.dtype, case.scheme)].append(rec)
    print(f"{'dtype':5} {'scheme':20} {'runs':>4} {'ratio med':>9} {'ratio max':>9} {'margin with':>11} {'without':>8}")
    for key in sorted(rows):
        r = rows[key]
        print(f"{key[0]:5} {key[1]:20} {len(r):4d} {statistics.median(x['ratio_median'] for x in r):9.3f} "
              f"{max(x['ratio_max'] for x in r):9.3f} {max(x['margin_with'] for x in r):11.3f} "
              f"{max(x['margin_without'] for x in r):8.3f}")
    print(f"{sum(len(r) for r in rows.values())} runs in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
