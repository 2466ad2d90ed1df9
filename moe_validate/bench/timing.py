"""The GPU side of the bench: measured ceilings (bandwidth, matmul rates), the weights and routing
sets, CUDA-graph timing (``_Timed``) and the per-kernel profile.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, List, Optional

from moe_validate.bench.models import ModelShape
from moe_validate.bench.roofline import _ceil_div


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
