"""GPU probe: how often vLLM's Triton-division quantizers take another code than the mirror at the
near ties the budget models (tolerance.division_ties), and whether they ever do elsewhere.

The budget gives each code whose x / s lies within _TRITON_DIVISION_FUZZ u32 |x / s| of a midpoint
a flip with probability TRITON_DIVISION_P, and no flip anywhere else. That p was measured for the
int8 per-token quantizer (session 9: 0.17 of near ties flipped); this measures it per quantizer,
the fp8 1x128 one included, with the model's own near-tie rule (tolerance._tie_jumps):

    VLLM_PROBE=scripts/gpu_vllm_division_ties.py bash scripts/gpu_vllm.sh none   (carry .gpu_vllm)

Prints one JSON line per (quantizer, data): codes, near ties, codes differing at a near tie
(their share: the measured p), codes differing elsewhere (must be 0) and rows whose scale differs.
On a CPU (TRITON_INTERPRET=1) the division is exact, so every count of differences reads 0.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from moe_validate import tolerance as tol
from moe_validate import vllm_backend
from moe_validate.inputs import quant_tie_rows
from moe_validate.contract.profile import VLLM_PROFILE
from moe_validate.contract.spec import QuantScheme
from reference.quant import quantize_activation_codes

ROWS = int(os.environ.get("PROBE_ROWS", "4096"))  # per data set; small to check the script on a CPU


def data(kind: str, rows: int, width: int, dev: str, scheme: str) -> torch.Tensor:
    """[rows, width]: the shapes quantizers meet (hidden states; an activation's output), bf16; and
    ``ties``, the test data's exact rounding ties of every row's scale (inputs.quant_tie_rows; fp16
    for int8, whose ties need 11 bits)."""
    x = torch.randn(rows, width, device=dev)
    if kind == "ties":
        q = QuantScheme.parse(scheme)
        return quant_tie_rows(x.cpu(), q).to(torch.float16 if q.act_dtype == torch.int8 else torch.bfloat16).to(dev)
    if kind == "uniform":
        x = torch.rand(rows, width, device=dev) * 2 - 1
    elif kind == "heavy":
        x = x ** 3
    elif kind == "silu_mul":  # what the requantization sees: silu(g) * u
        x = torch.nn.functional.silu(x) * torch.randn(rows, width, device=dev)
    return x.to(torch.bfloat16)


def measure(name: str, scheme: str, quantizer, quantize, x: torch.Tensor) -> dict:
    q, s = quantize(x)
    codes_m, scale_m = quantize_activation_codes(x.cpu(), scheme, quantizer=quantizer)
    jumps, n_near = tol._tie_jumps(x.cpu().double(), QuantScheme.parse(scheme), quantizer,
                                   tol._TRITON_DIVISION_FUZZ, None)
    near = jumps > 0
    differ = q.cpu().float() != codes_m
    return {"quantizer": name, "codes": differ.numel(), "near_ties": n_near,
            "differ_at_near_tie": int((differ & near).sum()), "differ_elsewhere": int((differ & ~near).sum()),
            "p_measured": round(float((differ & near).sum()) / max(n_near, 1), 4),
            "p_model": tol.TRITON_DIVISION_P,
            "scale_rows_differ": int((s.cpu().float().reshape(-1) != scale_m.reshape(-1)).sum()),
            "scale_rows": scale_m.numel()}


def quantizers():
    """(name, scheme, the profile's Quantizer, vLLM's function) of each Division.TRITON quantizer."""
    from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
    from vllm.model_executor.layers.quantization.utils.int8_utils import per_token_quant_int8

    return [
        ("int8_token", "int8_channel_token", VLLM_PROFILE.int8_token, per_token_quant_int8),
        ("fp8_token_group", "fp8_block128", VLLM_PROFILE.fp8_token_group,
         lambda x: per_token_group_quant_fp8(x, 128)),
    ]


def main() -> int:
    vllm_backend.load_vllm()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, to check the script
    torch.manual_seed(0)
    total = {}
    for name, scheme, quantizer, quantize in quantizers():
        for kind in ("normal", "uniform", "heavy", "silu_mul", "ties"):
            for width in (256, 2048):
                row = measure(name, scheme, quantizer, quantize, data(kind, ROWS, width, dev, scheme))
                row.update(data=kind, width=width)
                print(json.dumps(row), flush=True)
                t = total.setdefault((name, "ties" if kind == "ties" else "ordinary"),
                                     dict.fromkeys(("near_ties", "differ_at_near_tie", "differ_elsewhere"), 0))
                for k in t:
                    t[k] += row[k]
    for (name, kinds), t in total.items():  # the test data's exact ties apart from ordinary data
        t["p_measured"] = round(t["differ_at_near_tie"] / max(t["near_ties"], 1), 4)
        print(json.dumps({"total": name, "data": kinds, **t, "p_model": tol.TRITON_DIVISION_P}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
