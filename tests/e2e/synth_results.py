"""Synthetic result sets in the exact JSONL schema of moe_validate/results.py, for report tests.

Deterministic from a seed. Realistic axis values (SPEC.md vocabulary) and case ids; outcomes are
assigned by rate so a test can ask for, say, 10,000 cases with ~2% failures. Also usable by hand:

    python tests/e2e/synth_results.py out.jsonl --cases 10000 --fail-rate 0.02
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

DTYPES = ("fp32", "fp16", "bf16")
SCHEMES = ("none", "fp8_block128", "fp8_channel_token", "fp8_tensor_token", "fp8_tensor_static",
           "fp8_tensor_dynamic", "int8_channel_token", "int8_w8a16", "int4_w4a16")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai", "swiglustep", "silu_no_mul", "gelu_no_mul",
               "gelu_tanh_no_mul", "relu2_no_mul")
LORAS = ("none", "single", "dual")
SHAPES = ((33, 256, 128, 8, 2), (1, 128, 64, 4, 1), (64, 512, 256, 16, 4), (7, 96, 160, 6, 2),
          (128, 256, 512, 32, 8), (5, 64, 32, 3, 3))
BAD_KINDS = ("CRASH", "COMPILE_ERROR", "OOM", "TIMEOUT")

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "driver": "560.35.03", "cuda": "12.6",
       "torch": "2.11.0", "triton": "3.6.0", "interpreter": False, "commit": "9736542",
       "host": "gpu-node-3", "python": "3.11.9"}


def case_id(dtype: str, scheme: str, activation: str, lora: str, shape: Sequence[int], seed: int) -> str:
    m, n, k, e, topk = shape
    return f"{dtype}-{scheme}-{activation}-lora_{lora}-M{m}N{n}K{k}E{e}k{topk}-s{seed}"


def _axes() -> Iterator[tuple]:
    """Every (dtype, scheme, activation, lora, shape, seed), seeds last so small sets stay varied."""
    for seed in itertools.count(0):
        for shape in SHAPES:
            for combo in itertools.product(DTYPES, SCHEMES, ACTIVATIONS, LORAS):
                yield combo + (shape, seed)


def _bound(rng: random.Random, name: str, k: int) -> Dict[str, Any]:
    u = 2.0 ** -8
    atol = round(4 * u * math.sqrt(k) * rng.uniform(0.5, 2.0), 8)
    return {"atol": atol, "rtol": 0.0, "u_out": u, "k": k, "stages": 3 if name == "gate" else 5,
            "derivation": [f"{name}: output format bf16, unit roundoff u = 2^-8",
                           f"accumulation over K = {k}: sqrt(K) * u growth for fp32 partial sums rounded once",
                           f"atol = 4 * u * sqrt(K) * scale = {atol:.3g}"]}


def _panel(rng: random.Random, margin: float, n_out: int, failing: bool) -> Dict[str, Any]:
    panel: Dict[str, Any] = {}
    for name, allowed in (("max_abs", 0.02), ("rel_frobenius", 0.004), ("zscore_max", 6.0), ("ulp_max", 4.0)):
        m = margin * rng.uniform(0.3, 1.0) if name != "max_abs" else margin
        panel[name] = {"value": m * allowed, "allowed": allowed, "margin": m}
    panel["cosine"] = {"value": 1.0 - 1e-6 * margin, "allowed": None, "margin": None}
    exceed = max(1, int(n_out * 0.01 * margin)) if failing else 0
    panel["exceed_count"] = exceed
    panel["exceed_fraction"] = exceed / n_out
    panel["nan_inf"] = {"kernel_nan": 0, "kernel_inf": 0, "ref_nan": 0, "ref_inf": 0}
    panel["worst"] = [{"token": rng.randrange(64), "column": rng.randrange(512), "expert": rng.randrange(8),
                       "tile": [rng.randrange(4), rng.randrange(8)],
                       "kernel": 1.00390625 + j, "reference": 1.0019531249999998 + j,
                       "diff": 0.0019531250000002, "allowed": 0.02 / (j + 1)} for j in range(5 if failing else 0)]
    return panel


def make_case(idx_axes: tuple, outcome: str, rng: random.Random, margin: Optional[float] = None) -> Dict[str, Any]:
    dtype, scheme, activation, lora, shape, seed = idx_axes
    cid = case_id(dtype, scheme, activation, lora, shape, seed)
    m, n, k, e, topk = shape
    rec: Dict[str, Any] = {
        "kind": "case", "case_id": cid,
        "params": {"dtype": dtype, "scheme": scheme, "activation": activation, "lora": lora,
                   "M": m, "N": n, "K": k, "E": e, "topk": topk, "seed": seed},
        "outcome": outcome, "reason": None, "duration_s": round(rng.uniform(0.01, 2.0), 4),
        "backend": "triton", "config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8,
                                        "num_warps": 4, "num_stages": 3},
        "repro": f"moe-validate repro --backend triton {cid}",
        "tolerance": None, "metrics": None, "detail": None, "error": None, "worst_margin": None,
    }
    if outcome == "SKIP":
        rec["reason"] = f"{scheme} needs an fp8-capable GPU (sm89+); device is sm80"
        return rec
    if outcome in BAD_KINDS:
        rec["reason"] = {"CRASH": "RuntimeError: CUDA error: an illegal memory access was encountered",
                         "COMPILE_ERROR": "CompilationError: at 12:8: tl.dot operands must be 2D",
                         "OOM": "torch.OutOfMemoryError: tried to allocate 2.00 GiB",
                         "TIMEOUT": "case exceeded 120 s"}[outcome]
        rec["error"] = ("Traceback (most recent call last):\n  File \"moe_validate/runner.py\", line 88, in run_case\n"
                        "    out = backend.run(inputs)\n" + rec["reason"] + "\n")
        return rec
    failing = outcome == "FAIL"
    if margin is None:
        margin = rng.uniform(1.2, 40.0) if failing else rng.uniform(0.01, 0.9)
    n_out = m * k
    rec["tolerance"] = {"gate": _bound(rng, "gate", k), "budget": _bound(rng, "budget", k)}
    rec["metrics"] = {"mirror": _panel(rng, margin, n_out, failing), "exact": _panel(rng, margin * 0.5, n_out, failing)}
    rec["worst_margin"] = margin
    if failing:
        rec["reason"] = f"mirror max_abs {margin * 0.02:.4g} > allowed 0.02 (margin {margin:.3g})"
        row_tiles, col_tiles = max(1, math.ceil(m / 16)), max(1, math.ceil(k / 32))
        rec["detail"] = {
            "heatmap": {"row_tile": 16, "col_tile": 32,
                        "values": [[abs(rng.gauss(0, 0.005)) for _ in range(col_tiles)] for _ in range(row_tiles)]},
            "per_expert": [abs(rng.gauss(0, 0.01)) for _ in range(e)],
            "histograms": {"normalized_error": {"edges": [-4 + 0.5 * i for i in range(17)],
                                                "counts": [rng.randrange(200) for _ in range(16)]},
                           "ulp_distance": {"edges": list(range(0, 9)), "counts": [rng.randrange(500) for _ in range(8)]}},
        }
        rec["detail"]["heatmap"]["values"][0][0] = 0.02 * margin  # the hot tile
    return rec


def make_records(n_cases: int, *, fail_rate: float = 0.02, bad_rate: float = 0.002, skip_rate: float = 0.05,
                 seed: int = 0, shards: int = 1, env: Optional[Dict[str, Any]] = None,
                 complete: bool = True) -> List[List[Dict[str, Any]]]:
    """Records per shard file: [header, case..., footer?]. Outcomes are drawn by rate."""
    if n_cases < 0 or shards < 1:
        raise ValueError(f"n_cases must be >= 0 and shards >= 1; got {n_cases}, {shards}")
    rng = random.Random(seed)
    cases = []
    for axes in itertools.islice(_axes(), n_cases):
        r = rng.random()
        if r < fail_rate:
            outcome = "FAIL"
        elif r < fail_rate + bad_rate:
            outcome = BAD_KINDS[rng.randrange(len(BAD_KINDS))]
        elif r < fail_rate + bad_rate + skip_rate:
            outcome = "SKIP"
        else:
            outcome = "PASS"
        cases.append(make_case(axes, outcome, rng))
    files = []
    for s in range(shards):
        mine = cases[s::shards]
        header = {"kind": "header", "run_id": f"run-{seed}-{s}", "started": f"2026-11-24T05:0{s % 10}:00Z",
                  "suite": "nightly", "backend": "triton", "shard": f"{s + 1}/{shards}" if shards > 1 else None,
                  "argv": ["moe-validate", "run", "--suite", "nightly"], "env": dict(env or ENV)}
        records = [header] + mine
        if complete:
            counts: Dict[str, int] = {}
            for c in mine:
                counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
            records.append({"kind": "footer", "run_id": header["run_id"], "finished": "2026-11-24T06:00:00Z",
                            "duration_s": round(sum(c["duration_s"] for c in mine), 3), "counts": counts})
        files.append(records)
    return files


def _json_safe(value: Any) -> Any:
    # Same encoding as ResultsWriter (NaN/Inf as strings); written here without the per-line fsync,
    # which would make a 10,000-case file take seconds.
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _line(rec: Dict[str, Any]) -> str:
    try:  # the common case, every float finite: _json_safe would copy the record unchanged
        return json.dumps(rec, sort_keys=True, allow_nan=False)
    except ValueError:
        return json.dumps(_json_safe(rec), sort_keys=True)


def write_jsonl(path: Path, records: Sequence[Dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(_line(rec) + "\n")
    return path


def write_run(directory: Path, n_cases: int, **kwargs) -> List[Path]:
    """Writes make_records(...) as one JSONL file per shard; returns the paths."""
    directory = Path(directory)
    return [write_jsonl(directory / f"results-{i}.jsonl", recs)
            for i, recs in enumerate(make_records(n_cases, **kwargs))]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_jsonl(args.out, make_records(args.cases, fail_rate=args.fail_rate, seed=args.seed)[0])
    print(args.out)
