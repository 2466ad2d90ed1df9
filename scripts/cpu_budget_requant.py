"""Probe (CPU): how much of the accuracy budget correct pipelines use on requantized schemes.

For each case id and ``--seeds`` fresh seeds: the budget (kernel vs ``exact``) of the case, its
allowed / |out| at the median element, and the worst-element margin max |y - exact| / allowed
of correct pipelines y: the triton kernel (interpreted), the mirror itself, and
``ordered.ordered_pipeline`` in its three fp32 orders (run directly: as a backend it refuses
quantized schemes for the *gate's* model, but it is an accurate implementation, so the budget must
hold for it). Also the requantization codes that differ between mirror and exact (the SPEC's own
roundings' flips), of all valid codes.

Run from the repository root: TRITON_INTERPRET=1 python scripts/cpu_budget_requant.py --seeds 3
bf16-fp8_tensor_static-silu-M7N64K64E4k2-s7 ... (docs/BOUNDS.md, "The budget's requantization").
"""

import argparse
import dataclasses
import statistics

import torch

import reference
from moe_validate import runner
from moe_validate import tolerance as tol
from moe_validate.backends import get_backend
from moe_validate.contract.spec import storage_dtype
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case, suite_cases
from moe_validate.ordered import ORDERS, ordered_pipeline

F64 = torch.float64


def code_flips(inputs, mirror, exact, ev):
    """(codes where mirror and exact differ, valid codes, of those differing codes the ones the
    budget's flip model says cannot flip that way or that far: must be 0)."""
    from reference.quant import quantize_activation_codes
    from moe_validate.contract.spec import QuantScheme

    scheme = QuantScheme.parse(inputs.quant.scheme)
    v = mirror["route_valid"]
    a2 = inputs.quant.a2_scale if scheme.act_granularity == "tensor_static" else None
    qm, _ = quantize_activation_codes(mirror["c2"][v], scheme, static_scale=a2)
    qe, _ = quantize_activation_codes(exact["c2"][v], scheme, static_scale=a2)
    # some rho cell must reach the mirror's code: its reference code or a flip it allows
    bad = tol.codes_outside_flip_model(ev, qm.to(F64), v)
    return int((qm != qe).sum()), int(qm.numel()), int(bad.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_ids", nargs="*", help="default: smoke's cases with requantized activations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-triton", action="store_true", help="skip the interpreted kernel (slow)")
    args = parser.parse_args()
    ids = args.case_ids or [c.id for c in suite_cases("smoke")
                            if c.scheme not in ("none", "int8_w8a16", "int4_w4a16")]
    backend = None if args.no_triton else get_backend("triton")
    for cid in ids:
        base = Case.from_id(cid)
        med, worst, codes = [], {}, []
        for rep in range(1, args.seeds + 1):
            case = dataclasses.replace(base, seed=runner.fresh_seed(base.seed, rep))
            inputs = make_inputs(case, device="cpu")
            S = storage_dtype(inputs.hidden_states.dtype)
            mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
            exact = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
            detail = {}
            budget = tol.derive(case, inputs, mirror, native_gpu=False, exact=exact, budget_detail=detail)["budget"]
            ex, allowed = exact["out"].to(F64), budget.allowed
            nz = ex != 0
            med.append(float((allowed[nz] / ex[nz].abs()).median()))
            ys = {"mirror": mirror["out"]}
            ys.update({f"ordered-{o}": ordered_pipeline(inputs, o) for o in ORDERS})
            if backend is not None:
                ys["triton"] = backend.run(inputs, case)
            for name, y in ys.items():
                m = float(((y.to(F64) - ex).abs() / allowed.clamp_min(1e-300)).max())
                worst.setdefault(name, []).append(m)
            codes.append(code_flips(inputs, mirror, exact, detail) + (budget.terms.get("requant_flips_expected", float("nan")),))
        print(f"{cid}: allowed/|out| median element {statistics.median(med):.3g} "
              f"[{min(med):.3g}, {max(med):.3g}]; worst-element margin "
              + ", ".join(f"{k} {max(v):.3g}" for k, v in worst.items())
              + f"; mirror!=exact codes {sum(c[0] for c in codes)}/{sum(c[1] for c in codes)}, model expects "
              f"{sum(c[3] for c in codes):.4g}, outside the model {sum(c[2] for c in codes)}", flush=True)


if __name__ == "__main__":
    main()
