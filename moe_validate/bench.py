"""``moe-validate bench``: our fused experts against peers, on model shapes, against the roofline.

For each (model, scheme, M) row and each backend (``triton`` = ours, ``torch-grouped``,
``reference``):

- timing: the call is captured in one CUDA graph per pre-generated routing set (``_Timed``) and
  the graphs are replayed in rotation, so that consecutive replays hit different experts and a
  small footprint is not served from L2. Warm-up replays first, then per-replay
  CUDA events; the median and p10/p90 are reported. Backends of one row are interleaved in
  rounds (ours, peers, ours, peers, ...) so that clock or thermal drift hits all alike. The
  reference cannot be captured (it synchronises with the host); it is timed eagerly with events
  at small M only (``REFERENCE_MAX_M``) and where its float64 weights fit in memory.
- floor: ``max(bytes / bandwidth, flops / rate)`` where bytes are the weights of the experts the
  routing actually hits (unique experts x bytes per expert, including scales) plus activations
  in and out plus the routing tensors, and flops are ``2 * M * topk * (N*K + K*I)``. Bandwidth
  and rates are measured at the start (``measure_ceilings``): a device-to-device copy counting
  read + write, and torch.matmul (bf16) / torch._scaled_mm (fp8) on large square matrices.
- reported: median ms, TFLOP/s, GB/s (floor bytes / time), fraction of the floor reached
  (floor / median), and for peers the ratio ``peer median / our median`` (> 1: ours is faster).
  Geometric means of the ratios and of our floor fractions per regime (decode M <= 64, middle,
  prefill M >= 4096).

"fp8_tensor" means ``fp8_tensor_token`` (per-expert weight scales, dynamic per-token activation
scales): the per-tensor scheme that ``torch._scaled_grouped_mm`` can run (row-wise scales), so
the peer comparison is like for like. Any ``QuantScheme`` value is accepted too.

Everything that does not touch a GPU (shapes, floor and roofline arithmetic, regimes, geometric
means, argument parsing, JSON layout) is a plain function tested on CPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "ModelShape",
    "MODELS",
    "DEFAULT_M",
    "QUICK_M",
    "SCHEME_ALIASES",
    "parse_models",
    "parse_schemes",
    "parse_m_list",
    "parse_peers",
    "expert_weight_bytes",
    "floor_bytes",
    "call_flops",
    "floor_seconds",
    "regime",
    "geomean",
    "summarize",
    "percentile",
    "measure_ceilings",
    "run_bench",
    "write_bench",
    "format_table",
    "BENCH_SCHEMA_VERSION",
]

BENCH_SCHEMA_VERSION = 1
BENCH_KIND = "moe-validate-bench"


@dataclass(frozen=True)
class ModelShape:
    """One MoE layer's expert shape: E experts, top-k, hidden K, intermediate I."""

    name: str
    E: int
    topk: int
    K: int
    I: int  # noqa: E741 - the SPEC's name
    activation: str = "silu"
    schemes: Tuple[str, ...] = ("none", "fp8_tensor_token", "fp8_block128")  # what the model is benchmarked in
    note: str = ""

    @property
    def N(self) -> int:
        from moe_validate.contract.spec import Activation

        return 2 * self.I if Activation.parse(self.activation).is_gated else self.I

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["N"] = self.N
        d["schemes"] = list(self.schemes)
        return d


_FP8_ONLY = ("fp8_tensor_token", "fp8_block128", "fp8_tensor_static", "fp8_tensor_dynamic", "fp8_channel_token")
MODELS: Dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("mixtral-8x7b", E=8, topk=2, K=4096, I=14336),
        ModelShape("qwen3-30b-a3b", E=128, topk=8, K=2048, I=768),
        # DeepSeek-V3 ships fp8 (128x128 blocks); its bf16 experts would be 22.5 GB, so it is
        # benchmarked in fp8 only. "-tp8" is one rank of an 8-way tensor-parallel split of I.
        ModelShape("deepseek-v3", E=256, topk=8, K=7168, I=2048, schemes=_FP8_ONLY,
                   note="fp8 only (as deployed)"),
        ModelShape("deepseek-v3-tp8", E=256, topk=8, K=7168, I=256, schemes=_FP8_ONLY,
                   note="one rank of an 8-way split of I; fp8 only"),
        ModelShape("gpt-oss-120b", E=128, topk=4, K=2880, I=2880, activation="swigluoai",
                   note="bf16/fp8 instead of its shipped mxfp4; no biases"),
    )
}

DEFAULT_M: Tuple[int, ...] = tuple(2 ** i for i in range(15))  # 1 .. 16384
QUICK_M: Tuple[int, ...] = (1, 16, 128, 1024, 4096, 16384)
SCHEME_ALIASES = {"bf16": "none", "fp8_tensor": "fp8_tensor_token", "fp8_block": "fp8_block128"}
DEFAULT_SCHEMES = ("bf16", "fp8_tensor", "fp8_block")
PEERS = ("reference", "torch-grouped")
OURS = "triton"

# The reference computes in float64 with a Python loop over experts: seconds per call at large
# M. It is a correctness anchor, shown for scale only at small M.
REFERENCE_MAX_M = 16
DECODE_MAX_M = 64
PREFILL_MIN_M = 4096
REGIMES = ("decode", "middle", "prefill")


# ---------------------------------------------------------------------------------------------
# argument parsing (ValueError naming the option and the expectation)
# ---------------------------------------------------------------------------------------------
def _split(text: str, option: str) -> List[str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{option} must be a non-empty comma-separated list; got {text!r}")
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ValueError(f"{option} has an empty item: {text!r}")
    return items


def parse_model_spec(text: str) -> ModelShape:
    """A model name from ``MODELS`` or a custom ``E=8,topk=2,K=4096,I=14336[,act=silu]`` shape."""
    if text in MODELS:
        return MODELS[text]
    if "=" not in text:
        raise ValueError(f"--model must be one of {', '.join(MODELS)} or 'E=..,topk=..,K=..,I=..[,act=..]'; "
                         f"got {text!r}")
    fields: Dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--model custom shape item {part!r} must be key=value")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"E", "topk", "K", "I", "act", "name"}
    missing = {"E", "topk", "K", "I"} - set(fields)
    if unknown or missing:
        raise ValueError(f"--model custom shape needs E, topk, K, I (optional act, name); "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)} in {text!r}")
    try:
        E, topk, K, I = (int(fields[k]) for k in ("E", "topk", "K", "I"))
    except ValueError:
        raise ValueError(f"--model custom shape E, topk, K, I must be integers; got {text!r}") from None
    if min(E, topk, K, I) < 1 or topk > E:
        raise ValueError(f"--model custom shape needs positive sizes and topk <= E; got {text!r}")
    act = fields.get("act", "silu")
    from moe_validate.contract.spec import Activation

    Activation.parse(act, name="--model act")
    name = fields.get("name") or f"E{E}k{topk}K{K}I{I}" + ("" if act == "silu" else f"-{act}")
    return ModelShape(name, E=E, topk=topk, K=K, I=I, activation=act, schemes=tuple(s.value for s in _schemes()))


def _schemes():
    from moe_validate.contract.spec import QuantScheme

    return list(QuantScheme)


def parse_models(text: Optional[str]) -> List[ModelShape]:
    if text is None:
        return list(MODELS.values())
    return [parse_model_spec(t) for t in _split(text, "--models")]


def parse_schemes(text: Optional[str]) -> List[str]:
    """Scheme values (``QuantScheme`` strings) from aliases (bf16, fp8_tensor, fp8_block) or values."""
    from moe_validate.contract.spec import QuantScheme

    items = list(DEFAULT_SCHEMES) if text is None else _split(text, "--schemes")
    out = []
    for item in items:
        value = SCHEME_ALIASES.get(item, item)
        try:
            scheme = QuantScheme.parse(value, name="--schemes item")
        except ValueError:
            raise ValueError(f"--schemes items must be bf16, fp8_tensor, fp8_block or a scheme value "
                             f"({', '.join(s.value for s in QuantScheme)}); got {item!r}") from None
        if scheme in (QuantScheme.INT4_W4A16, QuantScheme.INT8_W8A16, QuantScheme.INT8_CHANNEL_TOKEN):
            raise ValueError(f"--schemes: bench covers bf16 and fp8 schemes; got {item!r}")
        if scheme.value not in out:
            out.append(scheme.value)
    return out


def parse_m_list(text: Optional[str], quick: bool = False) -> List[int]:
    if text is None:
        return list(QUICK_M if quick else DEFAULT_M)
    out = []
    for item in _split(text, "--m"):
        try:
            m = int(item)
        except ValueError:
            raise ValueError(f"--m items must be positive integers; got {item!r}") from None
        if m < 1:
            raise ValueError(f"--m items must be positive integers; got {item!r}")
        out.append(m)
    return sorted(set(out))


def parse_peers(text: Optional[str]) -> List[str]:
    if text is None:
        return list(PEERS)
    if text.strip() in ("", "none"):
        return []
    out = []
    for item in _split(text, "--peers"):
        if item not in PEERS:
            raise ValueError(f"--peers items must be among {', '.join(PEERS)}; got {item!r}")
        if item not in out:
            out.append(item)
    return out


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


# ---------------------------------------------------------------------------------------------
# GPU parts: ceilings, inputs, timing
# ---------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _cuda_time_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> List[float]:
    import torch

    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def measure_ceilings(device: str = "cuda", *, copy_bytes: int = 1 << 30, matmul_n: int = 8192,
                     reps: int = 20) -> Dict[str, Any]:
    """Memory bandwidth and bf16 / fp8 matrix rates measured on ``device`` (median of ``reps``)."""
    import torch

    out: Dict[str, Any] = {"method": {}, "errors": {}}
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        out["errors"]["all"] = "no CUDA device: ceilings not measured"
        return out
    try:
        src = torch.randn(copy_bytes // 2, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        t = statistics.median(_cuda_time_ms(lambda: dst.copy_(src), reps))
        out["bandwidth_GBps"] = 2 * copy_bytes / (t * 1e-3) / 1e9
        out["method"]["bandwidth"] = f"device-to-device copy of {copy_bytes / 2**30:.1f} GiB, read + write counted, median of {reps}"
        del src, dst
    except Exception as exc:
        out["errors"]["bandwidth"] = _first_line(exc)
    n = matmul_n
    try:
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        t = statistics.median(_cuda_time_ms(lambda: torch.matmul(a, b), reps))
        out["bf16_tflops"] = 2 * n ** 3 / (t * 1e-3) / 1e12
        out["method"]["bf16"] = f"torch.matmul bf16 {n}x{n}x{n}, median of {reps}"
        try:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
            one = torch.ones((), dtype=torch.float32, device=device)
            t8 = statistics.median(_cuda_time_ms(
                lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), reps))
            out["fp8_tflops"] = 2 * n ** 3 / (t8 * 1e-3) / 1e12
            out["method"]["fp8"] = f"torch._scaled_mm e4m3 {n}x{n}x{n} tensor scales, bf16 out, median of {reps}"
        except Exception as exc:
            out["errors"]["fp8"] = _first_line(exc)
        del a, b
    except Exception as exc:
        out["errors"]["bf16"] = _first_line(exc)
    torch.cuda.empty_cache()
    return out


def make_bench_weights(model: ModelShape, scheme: str, device: str, seed: int = 0):
    """(w1, w2, QuantConfig) with random, non-zero data of the scheme's formats.

    fp8 codes are generated expert by expert (a float32 copy of DeepSeek-V3's w1 alone would be
    30 GB), from randn * 64 clamped to +-448, with scales 1/(64 sqrt(K)) (w1) and 1/(64 sqrt(I))
    (w2) so that the dequantized weights have variance ~1/K and the activations stay O(1).
    """
    import torch

    from moe_validate.contract.spec import FP8_BLOCK, FP8_MAX, QuantConfig, QuantScheme

    s = QuantScheme.parse(scheme)
    E, N, K, I = model.E, model.N, model.K, model.I
    gen = torch.Generator(device=device).manual_seed(seed)
    if not s.is_fp8:
        w1 = torch.empty(E, N, K, dtype=torch.bfloat16, device=device)
        w2 = torch.empty(E, K, I, dtype=torch.bfloat16, device=device)
        for e in range(E):
            w1[e] = torch.randn(N, K, generator=gen, device=device, dtype=torch.bfloat16) * (K ** -0.5)
            w2[e] = torch.randn(K, I, generator=gen, device=device, dtype=torch.bfloat16) * (I ** -0.5)
        return w1, w2, None
    w1 = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=device)
    w2 = torch.empty(E, K, I, dtype=torch.float8_e4m3fn, device=device)
    for e in range(E):
        w1[e] = torch.clamp(torch.randn(N, K, generator=gen, device=device, dtype=torch.bfloat16) * 64,
                            -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        w2[e] = torch.clamp(torch.randn(K, I, generator=gen, device=device, dtype=torch.bfloat16) * 64,
                            -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    c1, c2 = 1.0 / (64 * math.sqrt(K)), 1.0 / (64 * math.sqrt(I))
    g = s.weight_granularity

    def scales(shape, base):
        return base * (0.75 + 0.5 * torch.rand(shape, generator=gen, device=device, dtype=torch.float32))

    if g == "block":
        s1 = scales((E, _ceil_div(N, FP8_BLOCK), _ceil_div(K, FP8_BLOCK)), c1)
        s2 = scales((E, _ceil_div(K, FP8_BLOCK), _ceil_div(I, FP8_BLOCK)), c2)
    elif g == "channel":
        s1, s2 = scales((E, N), c1), scales((E, K), c2)
    else:
        s1, s2 = scales((E,), c1), scales((E,), c2)
    quant = QuantConfig(scheme=s, w1_scale=s1, w2_scale=s2)
    if s.needs_static_act_scales:
        # x ~ N(0, 1): |x| < 6 with overwhelming probability; c2 = silu(g) * u with g, u ~ N(0, 1):
        # |c2| < 12. Static scales sized to those ranges.
        quant.a1_scale = torch.tensor([6.0 / FP8_MAX], device=device)
        quant.a2_scale = torch.tensor([12.0 / FP8_MAX], device=device)
    return w1, w2, quant


def make_routing_sets(M: int, model: ModelShape, count: int, device: str, seed: int = 0):
    """``count`` (topk_ids int32 [M, topk], topk_weights fp32 [M, topk]) sets: distinct uniform
    experts per token (top-k of random scores), softmax-normalised weights."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed + 1000003)
    sets = []
    for _ in range(count):
        scores = torch.rand(M, model.E, generator=gen, device=device)
        vals, ids = scores.topk(model.topk, dim=1)
        sets.append((ids.to(torch.int32).contiguous(), torch.softmax(vals * 4, dim=1).float().contiguous()))
    return sets


def unique_experts(topk_ids) -> int:
    import torch

    return int(torch.unique(topk_ids).numel())


class _Timed:
    """One backend of one row, over rotated routing sets: one CUDA graph per set (sharing one
    memory pool), or an eager callable where capture fails or is not wanted.

    ``call(ids, w)`` runs the backend on one set. ``load_next`` selects the next set on the host
    (no device copies) and ``run_once`` runs the selected one, so a timed replay has nothing but
    the replay between its events. (An earlier version copied each set into static buffers
    before every replay; on the H100 that measured the same at decode, Qwen3 M=1 40.6 vs 39.3 us,
    so the copies were not what the timings showed, but they no longer sit between replays.)"""

    def __init__(self, name: str, call: Callable[[Any, Any], Any], sets, use_graph: bool):
        self.name, self.call, self.sets = name, call, sets
        self.graphs: List[Any] = []
        self.outputs: List[Any] = []
        self.method = "eager+events"
        self.times: List[float] = []
        self.error: Optional[str] = None
        self.output = None
        self._index = 0
        if use_graph:
            self._capture()

    def _capture(self) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and allocate outside the capture
                self.call(*self.sets[0])
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            pool = torch.cuda.graph_pool_handle()
            graphs, outputs = [], []
            for ids, w in self.sets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    outputs.append(self.call(ids, w))
                graphs.append(graph)
            self.graphs, self.outputs = graphs, outputs
            self.method = f"cuda_graph+events ({len(graphs)} graphs, one per routing set)"
        except Exception as exc:
            torch.cuda.synchronize()
            self.graphs, self.outputs = [], []
            self.method = f"eager+events (graph capture failed: {_first_line(exc)})"

    def load_next(self) -> None:
        self._index = (self._index + 1) % len(self.sets)

    def run_once(self):
        if self.graphs:
            self.graphs[self._index].replay()
            self.output = self.outputs[self._index]
            return self.output
        self.output = self.call(*self.sets[self._index])
        return self.output

    def timed(self, reps: int) -> None:
        import torch

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.load_next()  # host only: selects the next routing set's graph
            starts[i].record()
            self.run_once()
            ends[i].record()
        torch.cuda.synchronize()
        self.times.extend(s.elapsed_time(e) for s, e in zip(starts, ends))


def _short_kernel_name(name: str) -> str:
    """``void at::native::foo<...>(...)`` -> ``at::native::foo``; Triton names pass unchanged."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    for stop in ("<", "("):
        if stop in name:
            name = name[: name.index(stop)]
    return name[:80]


def profile_kernels(t: "_Timed", reps: int = 20) -> Dict[str, Any]:
    """Per-kernel device time of one backend's call: torch.profiler (CUPTI) over ``reps`` runs
    (graph replays when captured; CUPTI traces the kernels inside a graph). Returns the kernels
    by total time with microseconds and launches per call, and their sum: against the row's timed
    median that shows the gap (launch latency, tails, idle SMs between kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        t.run_once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            t.run_once()
        torch.cuda.synchronize()
    per: Dict[str, List[float]] = {}
    for ev in prof.events():
        device_type = getattr(ev, "device_type", None)
        if device_type is not None and "CUDA" not in str(device_type):
            continue
        us = getattr(ev, "device_time", None)
        if us is None:
            us = getattr(ev, "cuda_time", 0.0)
        if not us or ev.name.startswith(("cudaGraph", "cudaLaunch", "cudaStream", "cudaEvent", "Memcpy", "Memset")):
            continue
        per.setdefault(_short_kernel_name(ev.name), []).append(float(us))
    kernels = sorted(({"name": name, "us_per_call": sum(v) / reps, "launches_per_call": len(v) / reps}
                      for name, v in per.items()), key=lambda k: -k["us_per_call"])
    return {"method": f"torch.profiler CUDA activity over {reps} {'graph replays' if t.graphs else 'eager calls'}",
            "kernels": kernels, "kernel_sum_us": sum(k["us_per_call"] for k in kernels)}


def _rel_fro(a, b) -> float:
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _reference_fits(model: ModelShape, scheme: str) -> Tuple[bool, str]:
    """The reference dequantizes all weights to float64 (about 3 copies of 8 bytes/element at
    the peak for block scales, 2 otherwise): refuse when that exceeds 80% of free memory."""
    import torch

    from moe_validate.contract.spec import QuantScheme

    elems = model.E * (model.N * model.K + model.K * model.I)
    need = elems * 8 * (3 if QuantScheme.parse(scheme).block_shape else 2)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        return False, (f"the float64 reference needs ~{need / 2**30:.0f} GiB for this model's weights; "
                       f"{free / 2**30:.0f} GiB free")
    return True, ""


def _base_row(model: ModelShape, scheme: str, M: int, backend: str) -> Dict[str, Any]:
    from moe_validate.contract.spec import QuantScheme

    label = {v: k for k, v in SCHEME_ALIASES.items()}.get(scheme, scheme)
    return {"model": model.name, "scheme": scheme, "scheme_label": label,
            "dtype": "bfloat16", "weight_dtype": "float8_e4m3fn" if QuantScheme.parse(scheme).is_fp8 else "bfloat16",
            "M": M, "E": model.E, "topk": model.topk, "K": model.K, "I": model.I, "N": model.N,
            "activation": model.activation, "regime": regime(M), "backend": backend,
            "status": "ok", "reason": None, "timing": None, "config": None, "check": None,
            "bytes": None, "flops": call_flops(M, model), "unique_experts": None, "routing_sets": 0,
            "intensity": None, "floor_ms": None, "floor_bound": None, "tflops": None, "gbps": None,
            "fraction_of_floor": None, "ratio_vs_ours": None}


def _bench_row_group(model, scheme, M, backends, weights, ceilings, args, log) -> List[Dict[str, Any]]:
    """All backends of one (model, scheme, M): capture, check, interleaved timing, metrics."""
    import torch

    import kernels
    from moe_validate.peers import peer_scheme_support, torch_grouped_experts
    from moe_validate.contract.spec import QuantScheme

    device = args.get("device", "cuda")  # "cpu" only in the plumbing test (fake CUDA timing)
    w1, w2, quant = weights
    sets = make_routing_sets(M, model, args["routing_sets"], device, seed=M)
    uniq = [unique_experts(ids) for ids, _ in sets]
    mean_unique = sum(uniq) / len(uniq)
    x = torch.randn(M, model.K, dtype=torch.bfloat16, device=device)
    rows: Dict[str, Dict[str, Any]] = {}
    timed: Dict[str, _Timed] = {}
    nbytes = floor_bytes(M, model, scheme, mean_unique)
    flops = call_flops(M, model)
    for b in backends:
        row = _base_row(model, scheme, M, b)
        row.update(bytes=nbytes, flops=flops, unique_experts=mean_unique, routing_sets=len(sets))
        rows[b] = row
        try:
            if b == OURS:
                experts = kernels.TritonExperts(quant)
                if not experts.supports_quant_scheme(*QuantScheme.parse(scheme).quant_keys):
                    raise _Unsupported(f"TritonExperts does not support {scheme} on this device")

                def call(ids, w):
                    return kernels.fused_experts(x, w1, w2, w, ids, activation=model.activation, quant=quant)

                from kernels.configs import lookup_config

                config, source = lookup_config(M, model.E, model.N, model.K, model.topk, torch.bfloat16, scheme)
                row["config"], row["config_source"] = config.to_dict(), source.to_dict()
                timed[b] = _Timed(b, call, sets, use_graph=True)
            elif b == "torch-grouped":
                ok, why = peer_scheme_support(scheme, device)
                if not ok:
                    raise _Unsupported(why)

                def call(ids, w):
                    return torch_grouped_experts(x, w1, w2, w, ids, activation=model.activation, quant=quant)

                timed[b] = _Timed(b, call, sets, use_graph=True)
            elif b == "reference":
                if M > args["reference_max_m"]:
                    raise _Skipped(f"reference rows are capped at M <= {args['reference_max_m']} (float64, slow)")
                ok, why = _reference_fits(model, scheme)
                if not ok:
                    raise _Unsupported(why)
                import reference

                def call(ids, w):
                    return reference.fused_experts(x, w1, w2, w, ids, activation=model.activation,
                                                   quant=quant, precision="mirror", out_dtype=torch.bfloat16)

                timed[b] = _Timed(b, call, sets, use_graph=False)
                timed[b].method = "eager+events (host-synchronising float64 reference, no graph)"
        except _Unsupported as exc:
            row["status"], row["reason"] = "unsupported", str(exc)
        except _Skipped as exc:
            row["status"], row["reason"] = "skipped", str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            row["status"], row["reason"] = "error", "OOM: " + _first_line(exc)
            torch.cuda.empty_cache()
        except Exception as exc:
            row["status"], row["reason"] = "error", _first_line(exc)
            log(traceback.format_exc())
            torch.cuda.synchronize()

    # Correctness cross-check on one routing set: every live backend against ours (or the
    # reference, when ours is not live). A fast wrong result must not look like a win.
    try:
        outs = {}
        for b, t in timed.items():
            t.load_next()
            outs[b] = t.run_once().clone()
        torch.cuda.synchronize()
        anchor = "reference" if "reference" in outs else (OURS if OURS in outs else None)
        for b, out in outs.items():
            nan = bool(torch.isnan(out).any())
            check = {"nan": nan}
            if anchor is not None and b != anchor:
                check[f"rel_fro_vs_{anchor}"] = _rel_fro(out, outs[anchor])
            if OURS in outs and b not in (OURS, anchor):
                check[f"rel_fro_vs_{OURS}"] = _rel_fro(out, outs[OURS])
            rows[b]["check"] = check
    except Exception as exc:
        log(f"cross-check failed for {model.name} {scheme} M={M}: {_first_line(exc)}")

    # Interleaved timing: estimate each backend's time, then rounds over all backends.
    live = dict(timed)
    reps: Dict[str, int] = {}
    for b, t in list(live.items()):
        try:
            probe = []
            for _ in range(2 if b != "reference" else 1):
                t.load_next()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t.run_once()
                end.record()
                torch.cuda.synchronize()
                probe.append(start.elapsed_time(end))
            est = max(min(probe), 1e-3)
            if b == "reference":
                reps[b] = max(1, min(args["reference_reps"], int(args["target_ms"] / est)))
            else:
                reps[b] = int(max(args["min_reps"], min(args["max_reps"], args["target_ms"] / est)))
        except Exception as exc:
            rows[b]["status"], rows[b]["reason"] = "error", _first_line(exc)
            live.pop(b)
            torch.cuda.synchronize()
    rounds = args["rounds"]
    for r in range(rounds):
        for b, t in list(live.items()):
            n = max(1, reps[b] // rounds + (1 if r < reps[b] % rounds else 0))
            try:
                t.timed(n)
            except Exception as exc:
                rows[b]["status"], rows[b]["reason"] = "error", _first_line(exc)
                live.pop(b)
                torch.cuda.synchronize()
    for b, t in timed.items():
        if rows[b]["status"] == "ok" and t.times:
            rows[b]["timing"] = {**timing_stats(t.times), "method": t.method, "rounds": rounds}
            if args.get("profile") and b == OURS:
                try:
                    rows[b]["profile"] = profile_kernels(t)
                except Exception as exc:  # a profiler failure costs the breakdown, not the row
                    rows[b]["profile"] = {"error": _first_line(exc)}
                    torch.cuda.synchronize()
        elif rows[b]["status"] == "ok":
            rows[b]["status"], rows[b]["reason"] = "error", "no timings recorded"
    for row in rows.values():
        derive_metrics(row, ceilings)
    del timed
    return list(rows.values())


class _Unsupported(Exception):
    pass


class _Skipped(Exception):
    pass


def _gpu_ready() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        return False, f"torch unavailable: {exc}"
    if not torch.cuda.is_available():
        return False, "bench needs a CUDA GPU (Triton timings under the CPU interpreter are meaningless)"
    from moe_validate.contract.rules import interpreting

    if interpreting():
        return False, "TRITON_INTERPRET=1 is set: bench times native kernels only; unset it on a GPU machine"
    return True, ""


def run_bench(models: Sequence[ModelShape], schemes: Sequence[str], m_list: Sequence[int],
              peers: Sequence[str], *, argv: Optional[List[str]] = None, time_budget_s: float = float("inf"),
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              settings: Optional[Dict[str, Any]] = None, ceilings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the benchmark and return the bench document (see ``write_bench`` for the files)."""
    from moe_validate.env import capture_env

    args = {"routing_sets": 8, "target_ms": 150.0, "min_reps": 10, "max_reps": 200, "rounds": 3,
            "reference_max_m": REFERENCE_MAX_M, "reference_reps": 3}
    args.update(settings or {})
    started = time.monotonic()
    doc: Dict[str, Any] = {
        "kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv or []), "env": capture_env(),
        "settings": {**args, "models": [m.to_dict() for m in models], "schemes": list(schemes),
                     "m_list": list(m_list), "peers": list(peers), "time_budget_s": time_budget_s,
                     "fp8_tensor_means": "fp8_tensor_token",
                     "regimes": {"decode_max_m": DECODE_MAX_M, "prefill_min_m": PREFILL_MIN_M}},
        "ceilings": {}, "rows": [], "notes": [
            "floor = max(bytes/bandwidth, flops/rate); bytes = unique experts hit (mean over routing sets) x "
            "bytes per expert (incl. scales) + x in + out + routing tensors",
            f"reference rows only at M <= {args['reference_max_m']} (float64, host-synchronising, slow)",
            "ratio_vs_ours = peer median / our median on the same row (> 1: ours is faster)",
        ],
    }
    ok, why = _gpu_ready()
    if not ok:
        doc["error"] = why
        for model in models:
            for scheme in schemes:
                for M in m_list:
                    for b in [OURS, *peers]:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="unsupported", reason=why, bytes=None, flops=call_flops(M, model),
                                   intensity=None, floor_ms=None, floor_bound=None, tflops=None, gbps=None,
                                   fraction_of_floor=None, unique_experts=None, routing_sets=0)
                        doc["rows"].append(row)
        attach_ratios(doc["rows"])
        doc["summary"] = summarize(doc["rows"])
        return doc

    import torch

    log("measuring ceilings ...")
    doc["ceilings"] = ceilings if ceilings is not None else measure_ceilings("cuda")
    log(f"ceilings: {json.dumps({k: v for k, v in doc['ceilings'].items() if k != 'method'})}")
    backends = [OURS, *peers]
    for model in models:
        for scheme in schemes:
            rows_of_pair = []
            if scheme not in model.schemes:
                for M in m_list:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="skipped", reason=f"{model.name} is benchmarked in {', '.join(model.schemes)} only"
                                   + (f" ({model.note})" if model.note else ""), bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        rows_of_pair.append(row)
                doc["rows"].extend(rows_of_pair)
                continue
            weights = None
            try:
                log(f"{model.name} {scheme}: generating weights ...")
                weights = make_bench_weights(model, scheme, args.get("device", "cuda"))
            except Exception as exc:
                reason = ("OOM: " if isinstance(exc, torch.cuda.OutOfMemoryError) else "") + _first_line(exc)
                for M in m_list:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="error", reason=f"weights: {reason}", bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        doc["rows"].append(row)
                torch.cuda.empty_cache()
                continue
            for M in m_list:
                if time.monotonic() - started > time_budget_s:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="skipped", reason=f"time budget of {time_budget_s:.0f}s spent",
                                   bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        doc["rows"].append(row)
                    continue
                t0 = time.monotonic()
                try:
                    rows = _bench_row_group(model, scheme, M, backends, weights, doc["ceilings"], args, log)
                except Exception as exc:  # a failure of one row group is a recorded outcome
                    log(traceback.format_exc())
                    rows = []
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="error", reason=_first_line(exc), bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        rows.append(row)
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception:
                        pass
                doc["rows"].extend(rows)
                brief = ", ".join(f"{r['backend']}={_fmt_ms(r)}" for r in rows)
                log(f"{model.name} {scheme} M={M}: {brief} ({time.monotonic() - t0:.1f}s)")
            del weights
            torch.cuda.empty_cache()
    attach_ratios(doc["rows"])
    doc["summary"] = summarize(doc["rows"])
    doc["duration_s"] = time.monotonic() - started
    return doc


def derive_metrics_safe(row: Dict[str, Any], ceilings: Dict[str, Any]) -> None:
    """Metrics for a row without a measurement (bytes unknown): every derived field None."""
    for key in ("intensity", "floor_ms", "floor_bound", "tflops", "gbps", "fraction_of_floor"):
        row.setdefault(key, None)
    row.setdefault("unique_experts", None)
    row.setdefault("routing_sets", 0)


def _fmt_ms(row: Dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['timing']['median_ms']:.3f}ms"


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_bench(doc: Dict[str, Any], out_dir) -> Tuple[Path, Optional[Path]]:
    """Write ``bench.json`` and the standalone ``bench.html`` into ``out_dir``; return both paths
    (the HTML path is None, with a note on stderr, if rendering failed: the JSON always lands)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False))
    html_path: Optional[Path] = out / "bench.html"
    try:
        from moe_validate.report.bench_section import render_bench_html

        html_path.write_text(render_bench_html(doc))
    except Exception as exc:
        print(f"bench.html not written: {_first_line(exc)}", file=sys.stderr)
        html_path = None
    return json_path, html_path


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _config_sources(rows) -> Dict[str, int]:
    """Row counts per table that served our config: "tuned <device>", "sibling <device>", "default"."""
    counts: Dict[str, int] = {}
    for r in rows:
        src = r.get("config_source") or {}
        label = " ".join(v for v in (src.get("kind"), src.get("device")) if v) or "unrecorded"
        counts[label] = counts.get(label, 0) + 1
    return counts


def format_table(doc: Dict[str, Any]) -> str:
    """A compact text table: one line per measured (model, scheme, M): our median and p10-p90,
    TFLOP/s, GB/s, % of the floor, and per peer its time / ours (> 1: ours faster). Rows skipped
    by the model's scheme list are counted, not listed."""
    rows = doc.get("rows", [])
    peers = list(doc.get("settings", {}).get("peers", []))
    head = f"{'model':<15} {'scheme':<10} {'M':>5} {'ours ms':>8} {'p10-p90 ms':>15} {'TF/s':>5} {'GB/s':>5} {'fl%':>4}"
    for p in peers:
        head += f" {p[:9] + '/us':>12}"
    lines = [head]
    keys: List[Tuple[str, str, int]] = []
    for r in rows:
        k = (r["model"], r["scheme"], r["M"])
        if k not in keys:
            keys.append(k)
    by = {(r["model"], r["scheme"], r["M"], r["backend"]): r for r in rows}
    skipped: Dict[str, int] = {}
    for k in keys:
        ours = by.get((*k, OURS))
        if ours is None:
            continue
        label = ours.get("scheme_label") or k[1]
        if ours["status"] == "skipped" and "benchmarked in" in (ours.get("reason") or ""):
            skipped[f"{k[0]} {label}"] = skipped.get(f"{k[0]} {label}", 0) + 1
            continue
        if ours["status"] == "ok":
            t = ours["timing"]
            frac = ours.get("fraction_of_floor")
            line = (f"{k[0][:15]:<15} {label[:10]:<10} {k[2]:>5} {t['median_ms']:>8.3f} "
                    f"{t['p10_ms']:>7.3f}-{t['p90_ms']:<7.3f} {_f(ours['tflops'], '.0f'):>5} {_f(ours['gbps'], '.0f'):>5} "
                    f"{_f(None if frac is None else 100 * frac, '.0f'):>4}")
        else:
            line = f"{k[0][:15]:<15} {label[:10]:<10} {k[2]:>5} {ours['status'][:8]:>8} {'':>15} {'':>5} {'':>5} {'':>4}"
        for p in peers:
            pr = by.get((*k, p))
            if pr is None:
                cell = "-"
            elif pr.get("ratio_vs_ours"):
                cell = f"{pr['ratio_vs_ours']:.2f}"
            elif pr["status"] == "ok":
                cell = f"{pr['timing']['median_ms']:.2f}ms"
            else:
                cell = pr["status"][:11]
            line += f" {cell:>12}"
        # A fast wrong result must not read as a win: flag our rows whose cross-check is off.
        # 0.05 relative Frobenius is far above the kernel's own error (a few bf16 ulps, fp8
        # requantization flips: <= 1e-2) and far below a real bug (O(0.1 .. 1)).
        chk = ours.get("check") or {}
        if chk.get("nan") or any(isinstance(v, float) and v > 0.05 for k, v in chk.items() if k.startswith("rel_fro")):
            line += f"  !check {chk}"
        lines.append(line)
    profiled = [by[(*k, OURS)] for k in keys if (by.get((*k, OURS)) or {}).get("profile")]
    if profiled:
        lines.append("kernel breakdown of ours (us per call: kernels by time; sum of kernels vs median):")
        for r in profiled:
            prof = r["profile"]
            head = f"  {r['model'][:15]} {(r.get('scheme_label') or r['scheme'])[:10]} M={r['M']}:"
            if prof.get("error"):
                lines.append(f"{head} profiler failed: {prof['error']}")
                continue
            parts = ", ".join(f"{k['name'].split('::')[-1][:28]} {k['us_per_call']:.1f}"
                              + (f" x{k['launches_per_call']:.0f}" if k["launches_per_call"] > 1.5 else "")
                              for k in prof["kernels"])
            med_us = 1e3 * r["timing"]["median_ms"]
            lines.append(f"{head} sum {prof['kernel_sum_us']:.1f} of {med_us:.1f} | {parts}")
    served = _config_sources(by[(*k, OURS)] for k in keys if (by.get((*k, OURS)) or {}).get("status") == "ok")
    if served:
        lines.append("configs served by: " + "; ".join(f"{src} x{n}" for src, n in served.items()))
    if skipped:
        lines.append("not run (model benchmarked in other schemes): " + ", ".join(f"{k} x{n}" for k, n in skipped.items()))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines.append(f"{len(errors)} error rows, first: {errors[0]['backend']} {errors[0]['model']} "
                     f"{errors[0]['scheme']} M={errors[0]['M']}: {(errors[0]['reason'] or '')[:150]}")
    summ = doc.get("summary") or {}
    for p, per in (summ.get("ratio_geomean") or {}).items():
        parts = ", ".join(f"{reg} {_f(v['geomean'], '.2f')} (n={v['n']})" for reg, v in per.items())
        lines.append(f"geomean {p} / ours: {parts}")
        best = (summ.get("ratio_at_floor_geomean") or {}).get(p)
        if best and any(v["n"] for v in best.values()):
            parts = ", ".join(f"{reg} {_f(v['geomean'], '.2f')}" for reg, v in best.items())
            lines.append(f"  best possible (at the floor) {p} / floor: {parts}")
    ff = summ.get("ours_fraction_of_floor_geomean") or {}
    if ff:
        lines.append("geomean ours floor fraction: " + ", ".join(
            f"{reg} {_f(v['geomean'], '.2f')} (n={v['n']})" for reg, v in ff.items()))
    c = doc.get("ceilings") or {}
    lines.append(f"ceilings: {_f(c.get('bandwidth_GBps'), '.0f')} GB/s, bf16 {_f(c.get('bf16_tflops'), '.0f')} TF/s, "
                 f"fp8 {_f(c.get('fp8_tflops'), '.0f')} TF/s; peer columns: peer time / ours (> 1: ours faster)")
    return "\n".join(lines)
