"""Probe (H100): what one launch of each small pipeline kernel costs at decode shapes.

Each kernel is captured 50 times back to back in one CUDA graph; the median replay time over 50
is the cost of one launch in a chain, as the experts call sees it. Rows are decode shapes of the
bench models (R rows of C columns: x at M=1, or c2 at topk routes); a plain ``x.clone()`` is the
floor of a launch that reads and writes that much.

  token    quantize_activation(x, "fp8_tensor_token"): per-row absmax, scale, fp8 codes
  token+rv the same with route experts as the row mask (as the pipeline calls it for c2)
  group    quantize_activation(x, "fp8_block128"): per (row, 128 columns)
  route    route_experts of R routes;  moe_sum  R routes of one token

Run from the repository root on the GPU: python scripts/gpu_probe_decode_launches.py
(``MOE_KERNELS_PDL=0`` for launches without programmatic dependent launch.)

Measured on the H100 (2026-11-24, Triton 3.6, MOE_KERNELS_PDL=0), us per launch:
  before: token 4.2-6.8 (2.7 only where the tile had no padding: R=1 C=4096, R=8 C=2048),
          group 5.9-6.5, route 1.2, moe_sum 1.4-2.6, clone 1.2-1.4
  skipping the division of zeros (kernels/quantize.py ``_div_rn``): token 2.7-3.3 (4.3 at R=2
          C=14336), group 2.6-3.0
The padding loads as zeros, and div.rn's fast path rejects a zero dividend: every zero took the
slow subroutine. Skipping the division for zeros (x / d = x there) keeps every bit, but its selects
made full prefill tiles 25-60% slower (16384x4096 per token: 69 -> 111 us), so the launchers
skip only in launches of a few programs or with a quarter of the tile elements padding
(``_skip_zero_divisions``).
"""
import torch

from kernels.align import route_experts
from kernels.moe_sum import moe_sum
from kernels.quantize import quantize_activation

SHAPES = [(1, 2048), (8, 768), (1, 7168), (8, 2048), (1, 2880), (4, 2880), (1, 4096), (2, 14336)]


def us_per_launch(fn, launches=50, replays=50):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / launches)
    return sorted(times)[len(times) // 2]


def main():
    for R, C in SHAPES:
        x = torch.randn(R, C, device="cuda", dtype=torch.bfloat16)
        route_expert = torch.zeros(R, dtype=torch.int32, device="cuda")
        topk_ids = torch.zeros(1, R, dtype=torch.int32, device="cuda")
        c3 = torch.randn(1, R, C, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, C, device="cuda", dtype=torch.bfloat16)
        kernels = [("token", lambda: quantize_activation(x, "fp8_tensor_token")),
                   ("token+rv", lambda: quantize_activation(x, "fp8_tensor_token", row_valid=route_expert)),
                   ("group", lambda: quantize_activation(x, "fp8_block128")),
                   ("route", lambda: route_experts(topk_ids, 8, 8)),
                   ("moe_sum", lambda: moe_sum(c3, route_expert.view(1, R), out)),
                   ("clone", lambda: x.clone())]
        print(f"R={R:2d} C={C:5d}  " + "  ".join(f"{name} {us_per_launch(fn):5.2f}" for name, fn in kernels), flush=True)


if __name__ == "__main__":
    main()
