"""The floor and roofline arithmetic of a bench row, and the statistics over rows (pure: tested on
CPU): bytes and flops of a call, the floor, regimes, geometric means, per-row metrics, the summary.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from moe_validate.bench.models import OURS, ModelShape


DECODE_MAX_M = 64
PREFILL_MIN_M = 4096
REGIMES = ("decode", "middle", "prefill")


# ---------------------------------------------------------------------------------------------
# floor and roofline arithmetic (pure)
# ---------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expert_weight_bytes(model: ModelShape, scheme: str, weight_elem_bytes: int = 2) -> int:
    """Bytes of one expert's weights as the kernel reads them: w1 [N, K] + w2 [K, I] + scales.

    Unquantized: ``weight_elem_bytes`` per element (2 for bf16). fp8: 1 byte per element plus
    fp32 scales: 128x128 blocks ``ceil(N/128)*ceil(K/128) + ceil(K/128)*ceil(I/128)``, per
    channel ``N + K``, per expert 1 each for w1 and w2.
    """
    from moe_validate.contract.spec import FP8_BLOCK, QuantScheme

    s = QuantScheme.parse(scheme)
    N, K, I = model.N, model.K, model.I
    elems = N * K + K * I
    if not s.is_fp8:
        return elems * weight_elem_bytes
    g = s.weight_granularity
    if g == "block":
        scales = _ceil_div(N, FP8_BLOCK) * _ceil_div(K, FP8_BLOCK) + _ceil_div(K, FP8_BLOCK) * _ceil_div(I, FP8_BLOCK)
    elif g == "channel":
        scales = N + K
    else:
        scales = 2
    return elems + 4 * scales


def activation_bytes(M: int, model: ModelShape, act_elem_bytes: int = 2) -> int:
    """Bytes that must cross memory besides the weights: x in [M, K], out [M, K] (both in S),
    topk_ids (int32) and topk_weights (fp32) [M, topk]."""
    return 2 * M * model.K * act_elem_bytes + M * model.topk * (4 + 4)


def floor_bytes(M: int, model: ModelShape, scheme: str, unique_experts: float) -> float:
    """The fewest bytes one call must move: hit experts' weights plus activations in/out."""
    return unique_experts * expert_weight_bytes(model, scheme) + activation_bytes(M, model)


def call_flops(M: int, model: ModelShape) -> int:
    """``2 * routes * (N*K + K*I)``: GEMM1 [R, K] x [K, N] and GEMM2 [R, I] x [I, K]."""
    return 2 * M * model.topk * (model.N * model.K + model.K * model.I)


def floor_seconds(nbytes: float, flops: float, bandwidth_Bps: float, flops_per_s: float) -> Tuple[float, str]:
    """(floor in seconds, "memory" or "compute"): the larger of bytes/bandwidth and flops/rate."""
    if bandwidth_Bps <= 0 or flops_per_s <= 0:
        raise ValueError(f"bandwidth and rate must be positive; got {bandwidth_Bps}, {flops_per_s}")
    t_mem, t_cmp = nbytes / bandwidth_Bps, flops / flops_per_s
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")


def expected_unique_experts(E: int, topk: int, M: int) -> float:
    """Expected distinct experts hit by M tokens each choosing topk distinct experts uniformly:
    ``E * (1 - (1 - topk/E)^M)`` (each expert is missed by one token with probability 1 - topk/E)."""
    return E * (1.0 - (1.0 - topk / E) ** M)


def regime(M: int) -> str:
    if M <= DECODE_MAX_M:
        return "decode"
    if M >= PREFILL_MIN_M:
        return "prefill"
    return "middle"


def geomean(values: Iterable[float]) -> Optional[float]:
    """Geometric mean of positive finite values (None for none); ValueError on a non-positive one."""
    vals = list(values)
    if not vals:
        return None
    for v in vals:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"geomean needs positive finite values; got {v!r}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100]; got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timing_stats(times_ms: Sequence[float]) -> Dict[str, float]:
    t = sorted(times_ms)
    return {"median_ms": statistics.median(t), "p10_ms": percentile(t, 10), "p90_ms": percentile(t, 90),
            "min_ms": t[0], "reps": len(t)}


def derive_metrics(row: Dict[str, Any], ceilings: Dict[str, Any]) -> None:
    """Fill floor / rate fields of an ``ok`` row from its bytes, flops, median and the ceilings."""
    from moe_validate.contract.spec import QuantScheme

    rate_key = "fp8_tflops" if QuantScheme.parse(row["scheme"]).is_fp8 else "bf16_tflops"
    bw = ceilings.get("bandwidth_GBps")
    rate = ceilings.get(rate_key)
    row["intensity"] = row["flops"] / row["bytes"] if row["bytes"] else None
    if bw and rate:
        floor_s, bound = floor_seconds(row["bytes"], row["flops"], bw * 1e9, rate * 1e12)
        row["floor_ms"], row["floor_bound"] = floor_s * 1e3, bound
    else:
        row["floor_ms"], row["floor_bound"] = None, None
    med = (row.get("timing") or {}).get("median_ms")
    if row.get("status") == "ok" and med:
        sec = med * 1e-3
        row["tflops"] = row["flops"] / sec / 1e12
        row["gbps"] = row["bytes"] / sec / 1e9
        row["fraction_of_floor"] = row["floor_ms"] / med if row["floor_ms"] else None
    else:
        row["tflops"] = row["gbps"] = row["fraction_of_floor"] = None


def attach_ratios(rows: List[Dict[str, Any]]) -> None:
    """``ratio_vs_ours`` = peer median / our median on the same (model, scheme, M) (> 1: ours faster)."""
    ours = {(r["model"], r["scheme"], r["M"]): r for r in rows if r["backend"] == OURS and r["status"] == "ok"}
    for r in rows:
        r["ratio_vs_ours"] = None
        if r["backend"] == OURS or r["status"] != "ok":
            continue
        mine = ours.get((r["model"], r["scheme"], r["M"]))
        if mine is not None:
            r["ratio_vs_ours"] = r["timing"]["median_ms"] / mine["timing"]["median_ms"]


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per regime: geometric mean of each peer's ratio and of our floor fraction, with counts."""
    out: Dict[str, Any] = {"regimes": {"decode": f"M <= {DECODE_MAX_M}", "middle": f"{DECODE_MAX_M} < M < {PREFILL_MIN_M}",
                                       "prefill": f"M >= {PREFILL_MIN_M}"},
                           "ratio_geomean": {}, "ours_fraction_of_floor_geomean": {}, "status_counts": {}}
    backends = sorted({r["backend"] for r in rows})
    for b in backends:
        counts: Dict[str, int] = {}
        for r in rows:
            if r["backend"] == b:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
        out["status_counts"][b] = counts
    for b in backends:
        if b == OURS:
            continue
        # Beside each ratio, the most any implementation could beat this peer by: peer median /
        # the row's floor, on the same rows. A target ratio above it is out of reach even at the floor.
        per, best = {}, {}
        for reg in REGIMES:
            peer_rows = [r for r in rows if r["backend"] == b and r.get("ratio_vs_ours") and regime(r["M"]) == reg]
            ratios = [r["ratio_vs_ours"] for r in peer_rows]
            at_floor = [r["timing"]["median_ms"] / r["floor_ms"] for r in peer_rows if r.get("floor_ms")]
            per[reg] = {"geomean": geomean(ratios), "n": len(ratios)}
            best[reg] = {"geomean": geomean(at_floor), "n": len(at_floor)}
        out["ratio_geomean"][b] = per
        out.setdefault("ratio_at_floor_geomean", {})[b] = best
    for reg in REGIMES:
        vals = [r["fraction_of_floor"] for r in rows if r["backend"] == OURS and r.get("fraction_of_floor") and regime(r["M"]) == reg]
        out["ours_fraction_of_floor_geomean"][reg] = {"geomean": geomean(vals), "n": len(vals)}
    return out
