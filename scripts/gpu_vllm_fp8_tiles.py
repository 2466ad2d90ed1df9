"""Which accumulator vLLM's fp8 dots use, per launch tile (issue 23; docs/VLLM.md). For the fp8 cases of
premerge and nightly, each run on vLLM with explicit tiles (its override_config; VLLM_TILE_CONFIGS, by
default BLOCK_SIZE_M 16, 32, 64 x BLOCK_SIZE_N 64 x BLOCK_SIZE_K 128) at fresh seeds, count the output
elements that differ from the mirror (VLLM_PROFILE) beside the gate's count model under each
accumulator: fp32 (the mma.sync tiles of our kernels) and the fp8 MMA; with VLLM_TILE_MARGINS=1 also the
worst element under each one's per-element gate and budget. One JSON line per run into
$OUT/vllm_fp8_tiles.jsonl (or ./vllm_fp8_tiles.jsonl), then a summary per (dtype, scheme, tiles):
observed / expected and the worst observed / allowed under each model.

    VLLM_PROBE=scripts/gpu_vllm_fp8_tiles.py bash scripts/gpu_vllm.sh none      (with .gpu_vllm carried)
    python scripts/gpu_vllm_fp8_tiles.py --summary vllm_fp8_tiles.jsonl
"""
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

import torch

# the explicit tiles each case runs with (VLLM_TILE_CONFIGS: case-id config tokens, space-separated)
TILES = tuple(os.environ.get("VLLM_TILE_CONFIGS",
                             "BM16BN64BK128GM1W4S3 BM32BN64BK128GM1W4S3 BM64BN64BK128GM1W4S3").split())
REPS = tuple(int(r) for r in os.environ.get("VLLM_TILE_REPS", "70 71").split())
LIMIT = float(os.environ.get("VLLM_TILE_LIMIT", "300"))
SUITES = tuple(os.environ.get("VLLM_TILE_SUITES", "premerge nightly").split())
# the fp8 schemes to run (default every one); e.g. "fp8_block128" for more runs of one scheme
SCHEMES = tuple(os.environ.get("VLLM_TILE_SCHEMES", "").split())
# VLLM_TILE_MARGINS=1: also each run's worst element under each unit's gate and budget (tolerance.derive)
MARGINS = os.environ.get("VLLM_TILE_MARGINS", "") == "1"


def measure(backend, case, device):
    import reference
    from moe_validate import tolerance as tol
    from moe_validate.contract.profile import VLLM_PROFILE, Fp8Accumulation
    from moe_validate.inputs import make_inputs

    inputs = make_inputs(case, device=device)
    out = backend.run(inputs, case).to(torch.float64)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror", profile=VLLM_PROFILE)
    ref = mirror["out"].to(torch.float64)
    keep = torch.isfinite(ref)
    rec = {"case_id": case.id, "dtype": case.dtype, "scheme": case.scheme, "tiles": case.config,
           "observed": int(((out != ref) & keep).sum()), "n": int(keep.sum()),
           "launched": backend.last_config.get("launched")}
    exact = (reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact", profile=VLLM_PROFILE)
             if MARGINS else None)
    for unit in (Fp8Accumulation.FP32, Fp8Accumulation.FP8_MMA):
        per_stage = {}
        tol.flip_aware_sigma(inputs, mirror, native_gpu=device == "cuda", per_stage=per_stage, profile=VLLM_PROFILE,
                             fp8_accumulation=unit)
        allowed, expected, _, _ = tol.count_allowance(inputs, mirror, per_stage, profile=VLLM_PROFILE)
        rec[unit.value] = {"allowed": int(allowed), "expected": round(float(expected), 3)}
        if MARGINS:  # the per-element gate (vs the mirror) and budget (vs exact) under this unit
            bounds = tol.derive(case, inputs, mirror, native_gpu=device == "cuda", profile=VLLM_PROFILE,
                                exact=exact, fp8_accumulation=unit)
            for name, oracle in (("gate", ref), ("budget", exact["out"].to(torch.float64))):
                m = ((out - oracle).abs() / bounds[name].allowed.clamp_min(1e-300))[keep]
                rec[unit.value][name + "_margin"] = round(float(m.max()) if m.numel() else 0.0, 4)
    return rec


def collect(path):
    from moe_validate.matrix import suite_cases
    from moe_validate.run.shards import fresh_seed
    from moe_validate.vllm_backend import VllmBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = VllmBackend()
    bases = {c.id: c for s in SUITES for c in suite_cases(s)
             if c.scheme.startswith("fp8_") and (not SCHEMES or c.scheme in SCHEMES)
             and c.config == "auto" and c.lora == "none"}
    t0, done = time.time(), 0
    with open(path, "a") as fh:
        for rep in REPS:
            for base in bases.values():
                for tiles in TILES:
                    if time.time() - t0 > LIMIT:
                        print(f"time limit: {done} runs", file=sys.stderr)
                        return
                    case = dataclasses.replace(base, seed=fresh_seed(base.seed, rep), config=tiles)
                    ok, why = backend.supports(case)
                    if not ok:
                        continue
                    try:
                        rec = measure(backend, case, device)
                    except Exception as exc:  # a crashing case is recorded, not fatal
                        rec = {"case_id": case.id, "error": f"{type(exc).__name__}: {exc}"[:300]}
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    done += 1
    print(f"done: {done} runs in {time.time() - t0:.0f} s", file=sys.stderr)


def summary(paths):
    rows = defaultdict(lambda: {"runs": 0, "observed": 0, "fp32": 0.0, "fp8 mma": 0.0, "worst fp32": 0.0,
                                "worst fp8 mma": 0.0})
    errors = 0
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            if "error" in rec:
                errors += 1
                print("error:", rec["case_id"], rec["error"])
                continue
            row = rows[(rec["dtype"], rec["scheme"], rec["tiles"])]
            row["runs"] += 1
            row["observed"] += rec["observed"]
            for unit in ("fp32", "fp8 mma"):
                row[unit] += rec[unit]["expected"]
                for name in ("gate_margin", "budget_margin"):  # VLLM_TILE_MARGINS=1 runs only
                    if name in rec[unit]:
                        row[f"{unit} {name}"] = max(row.get(f"{unit} {name}", 0.0), rec[unit][name])
                if rec[unit]["allowed"] < rec["n"]:
                    row["worst " + unit] = max(row["worst " + unit], rec["observed"] / max(rec[unit]["allowed"], 1))
    print(f"{'dtype':5} {'scheme':20} {'tiles':20} {'runs':>4} {'observed':>9} | {'/fp32 model':>11} {'worst/allowed':>13} | "
          f"{'/fp8-mma model':>14} {'worst/allowed':>13}")
    for key in sorted(rows):
        r = rows[key]
        print(f"{key[0]:5} {key[1]:20} {key[2]:20} {r['runs']:4d} {r['observed']:9d} | "
              f"{r['observed'] / max(r['fp32'], 1e-9):11.3g} {r['worst fp32']:13.3g} | "
              f"{r['observed'] / max(r['fp8 mma'], 1e-9):14.3g} {r['worst fp8 mma']:13.3g}")
    for key in sorted(rows):
        r = rows[key]
        if "fp32 gate_margin" in r:
            print(f"{key[0]:5} {key[1]:20} {key[2]:20} worst element / allowed: gate fp32 {r['fp32 gate_margin']:.3g}, "
                  f"fp8 mma {r['fp8 mma gate_margin']:.3g}; budget fp32 {r['fp32 budget_margin']:.3g}, "
                  f"fp8 mma {r['fp8 mma budget_margin']:.3g}")
    print(f"{errors} error(s)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2:])
    else:
        path = os.path.join(os.environ.get("OUT", "."), "vllm_fp8_tiles.jsonl")
        collect(path)
        summary([path])
