"""GPU probe: how far vLLM's per-token int8 quantizer (a Triton kernel with plain fp32 `/`) is from
the formula the vllm profile declares for it (correctly rounded `absmax / 127` and `127 / absmax`).

Run after scripts/gpu_vllm.sh has unpacked the bundle (it puts vLLM on PYTHONPATH):
    VLLM_PROBE=scripts/gpu_vllm_int8_probe.py bash scripts/gpu_vllm.sh
Prints, per row width and data: the share of rows whose scale (absmax / 127) and whose multiplier
(127 / absmax, seen through the codes) differ from the correctly rounded ones, the share of codes
that differ, and the ulp distance of Triton's fp32 `/` from the correctly rounded quotient.
"""

from __future__ import annotations

import collections
import json
import sys

import torch
import triton
import triton.language as tl

from moe_validate import vllm_backend
from moe_validate.contract.profile import VLLM_PROFILE
from reference.quant import quantize_activation_codes


@triton.jit
def _divide(a_ptr, b_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(q_ptr + offs, a / b, mask=mask)


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|bits(x) - bits(y)| for positive fp32 values."""
    return (x.view(torch.int32).long() - y.view(torch.int32).long()).abs()


def division_ulps(numerator: torch.Tensor, denominator: torch.Tensor) -> dict:
    q = torch.empty_like(numerator)
    n = numerator.numel()
    _divide[(triton.cdiv(n, 1024),)](numerator, denominator, q, n, BLOCK=1024)
    exact = (numerator.double().cpu() / denominator.double().cpu()).float()
    d = ulp_distance(q.cpu().abs(), exact.abs())
    return dict(collections.Counter(d.tolist()))


def main() -> int:
    vllm_backend.load_vllm()
    from vllm.model_executor.layers.quantization.utils.int8_utils import per_token_quant_int8
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, to check the script
    report = {"division": {}, "quantizer": []}
    a = torch.rand(1 << 20, device=dev) * 4 + 0.01
    report["division"]["127 / absmax"] = division_ulps(torch.full_like(a, 127.0), a)
    report["division"]["absmax / 127"] = division_ulps(a, torch.full_like(a, 127.0))
    report["division"]["random / random"] = division_ulps(torch.rand_like(a) + 0.5, a)
    quantizer = VLLM_PROFILE.int8_token
    for width in (128, 256, 512, 1024):
        for data in ("normal", "uniform", "heavy"):
            rows = 8192
            if data == "normal":
                x = torch.randn(rows, width, device=dev)
            elif data == "uniform":
                x = torch.rand(rows, width, device=dev) * 2 - 1
            else:
                x = torch.randn(rows, width, device=dev) ** 3
            x = x.to(torch.bfloat16)
            q, s = per_token_quant_int8(x)
            codes_m, scale_m = quantize_activation_codes(x.cpu(), "int8_channel_token", quantizer=quantizer)
            q = q.cpu().float()
            s = s.cpu().float().reshape(-1)
            scale_m = scale_m.reshape(-1)
            code_diff = q != codes_m
            rows_with_code_diff = code_diff.any(dim=1)
            report["quantizer"].append({
                "width": width, "data": data, "rows": rows,
                "scale_rows_differ": int((s != scale_m).sum()),
                "scale_ulps": dict(collections.Counter(ulp_distance(s, scale_m).tolist())),
                "codes_differ": int(code_diff.sum()), "codes": rows * width,
                "rows_with_code_diff": int(rows_with_code_diff.sum()),
                "code_step_max": float((q - codes_m).abs().max()),
            })
            print(json.dumps(report["quantizer"][-1]), flush=True)
    try:  # the fp8 1x128 quantizer: vLLM's Triton per_token_group_quant_fp8 (`y / y_s`)
        from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
        group = VLLM_PROFILE.fp8_token_group
        for data in ("normal", "uniform"):
            x = (torch.randn(8192, 512, device=dev) if data == "normal"
                 else torch.rand(8192, 512, device=dev) * 2 - 1).to(torch.bfloat16)
            q, s = per_token_group_quant_fp8(x, 128)
            codes_m, scale_m = quantize_activation_codes(x.cpu(), "fp8_block128", quantizer=group)
            q = q.cpu().float()
            report["quantizer"].append({"fp8_token_group": data, "codes": q.numel(),
                                        "codes_differ": int((q != codes_m).sum()),
                                        "scales_differ": int((s.cpu().float().reshape(-1) != scale_m.reshape(-1)).sum())})
            print(json.dumps(report["quantizer"][-1]), flush=True)
    except Exception as e:  # report, do not hide: the int8 part above stands
        print(f"fp8_token_group probe failed: {type(e).__name__}: {e}", flush=True)
    print(json.dumps(report["division"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
