"""Probe (CPU interpreter): the smallest systematic error the gate flags, with and without its count test.

For each case id (and ``--seeds`` fresh seeds of it): run the triton backend once, then move its
output by x ulps of S away from zero on every element and re-judge it (gate and budget, in
process) with the count test and without it (the per-element bounds alone, as before issue 23).
Prints, per case, the smallest flagged x of each (and of the budget alone), and the per-element allowance of one element
(the smaller of gate and budget, in ulps: median and minimum over the nonzero elements; and the
budget's alone, the accuracy verdict a third-party kernel is judged by).

Run from the repository root: TRITON_INTERPRET=1 python scripts/cpu_detection_thresholds.py
--seeds 5 bf16-none-silu-M7N64K64E4k2-s0 ... (docs/BOUNDS.md, "Detection thresholds", has the
numbers for the smoke cases it lists).
"""

import argparse
import dataclasses
import statistics

import torch

import reference
from moe_validate import runner
from moe_validate import tolerance as tol
from moe_validate.backends import get_backend
from moe_validate.compare import Evaluation
from moe_validate.contract.spec import storage_dtype
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case

F64 = torch.float64
SHIFTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256)  # ulps of S


def smallest_flagged(case, inputs, out, with_count: bool, budget_only: bool = False):
    S = storage_dtype(inputs.hidden_states.dtype)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    exact = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
    bounds = tol.derive(case, inputs, mirror, native_gpu=False)
    gate, budget = bounds["gate"], bounds["budget"]
    oracles = {"mirror": (mirror["out"], gate.allowed, gate.sigma, gate.count_allowed if with_count else None),
               "exact": (exact["out"], budget.allowed, budget.sigma)}
    if budget_only:  # a third-party kernel's default verdict: accuracy (the budget) alone
        oracles["mirror"] = (mirror["out"], torch.full_like(gate.allowed, float("inf")), gate.sigma, None)
    u = tol.ulp(out, S)
    away = torch.where(out.to(F64) >= 0, 1.0, -1.0)
    for x in SHIFTS:
        if not Evaluation.from_arrays(case, (out.to(F64) + away * x * u).to(S), oracles, storage=S).passed:
            return x, gate, budget, u
    return None, gate, budget, u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_ids", nargs="+")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    backend = get_backend("triton")
    for cid in args.case_ids:
        base = Case.from_id(cid)
        rows = []
        for rep in range(1, args.seeds + 1):
            case = dataclasses.replace(base, seed=runner.fresh_seed(base.seed, rep))
            inputs = make_inputs(case, device="cpu")
            out = backend.run(inputs, case)
            before, _, _, _ = smallest_flagged(case, inputs, out, with_count=False)
            after, gate, budget, u = smallest_flagged(case, inputs, out, with_count=True)
            by_budget, _, _, _ = smallest_flagged(case, inputs, out, with_count=False, budget_only=True)
            nonzero = out.to(F64) != 0
            one = (torch.minimum(gate.allowed, budget.allowed) / u)[nonzero]
            alone = (budget.allowed / u)[nonzero]
            rows.append((before, after, float(one.median()), float(one.min()), gate.count_allowed, out.numel(),
                         float(alone.median()), by_budget))
        print(f"{cid}: all elements flagged at x ulps (per element only, with count) "
              f"{[(r[0], r[1]) for r in rows]}; one element allowed median {statistics.median(r[2] for r in rows):.1f}"
              f" ulps, min {min(r[3] for r in rows):.1f} (budget alone: median {statistics.median(r[6] for r in rows):.1f}"
              f", all elements flagged at {[r[7] for r in rows]})"
              f"; count allowed {[f'{r[4]}/{r[5]}' for r in rows]}", flush=True)


if __name__ == "__main__":
    main()
