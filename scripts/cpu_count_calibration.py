"""Probe (CPU): the gate's count test against correct backends on cases large enough to flip.

Runs ``--cases`` fresh M64 N256 K256 unquantized cases per storage dtype (cycling through eight
activations, one 64x64x64 tile config) on a backend (``triton`` under the interpreter, or an
``ordered-*`` calibration backend), prints each case's differing elements against the model's
expected and allowed counts, then the calibration table (its ``differ`` and ``/model`` columns
are the pooled count and ratio that ``calibrate --strict`` judges).

Run from the repository root: TRITON_INTERPRET=1 python scripts/cpu_count_calibration.py triton
--dtypes bf16,fp16 --cases 16 (docs/BOUNDS.md, "Calibration of the count", has the numbers).
"""

import argparse

from moe_validate import runner
from moe_validate.calibration import calibrate
from moe_validate.matrix import Case

ACTIVATIONS = ("silu", "gelu", "swigluoai", "silu_no_mul", "relu2_no_mul", "gelu_tanh", "swiglustep", "gelu_no_mul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--cases", type=int, default=16)
    args = parser.parse_args()
    ids = [f"{dt}-none-{ACTIVATIONS[s % len(ACTIVATIONS)]}-M64N256K256E4k2-cfg_BM64BN64BK64GM8W4S3-s{100 + s}"
           for dt in args.dtypes.split(",") for s in range(args.cases)]
    records = []
    for cid in ids:
        rec = runner.run_case_inprocess(Case.from_id(cid), args.backend, device="cpu").record
        records.append(rec)
        gate = (rec.get("tolerance") or {}).get("gate") or {}
        differing = ((rec.get("metrics") or {}).get("mirror") or {}).get("differing") or {}
        print(f"{cid}: {rec['outcome']}; differing {differing.get('value')} of {differing.get('of')}, "
              f"expected {gate.get('differing_expected', float('nan')):.3g}, allowed {gate.get('count_allowed')}",
              flush=True)
    print(calibrate(records).format())


if __name__ == "__main__":
    main()
