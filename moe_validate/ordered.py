"""A correct pipeline in a different fp32 order: the calibration backend that flips on a CPU.

The reference's ``mirror`` stages (routing, input preparation, LoRA, activation, requantization,
combine) with both grouped GEMMs replaced by fp32 GEMMs in another accumulation order: exactly
the freedom SPEC.md leaves a kernel. It differs from the mirror only by rounding flips, so its
outputs give the gate's flip model real flips to measure where the interpreted kernels have few
(``moe-validate calibrate --backend ordered-sequential``). Orders:

- ``reversed``: K tiles of ``BLOCK_K`` accumulated last tile first (one fp32 matmul per tile);
- ``sequential``: one product at a time, a running fp32 sum (every add rounds: the sequential
  worst case of ``tolerance._acc_growth``);
- ``split_k``: the two halves of K accumulated apart, then added.

As a backend it runs scheme ``none`` only: its GEMMs multiply the dequantized operands in fp32,
so for quantized weights or activations its products carry 24 bits where the kernels multiply
codes exactly (``tolerance.product_bits``), and the model's rates would not describe it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from moe_validate.matrix import Case
    from moe_validate.contract.spec import MoEInputs

__all__ = ["ORDERS", "BLOCK_K", "fp32_gemm", "ordered_pipeline", "OrderedBackend"]

F64 = torch.float64
ORDERS = ("reversed", "sequential", "split_k")
BLOCK_K = 32


def fp32_gemm(a: torch.Tensor, w: torch.Tensor, order: str) -> torch.Tensor:
    """a [R, Kin] @ w [N, Kin].T accumulated in fp32 in ``order`` (float64 out)."""
    a32, w32 = a.float(), w.float()
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=a.device)
    n = a.shape[1]
    if order == "reversed":
        for k0 in reversed(range(0, n, BLOCK_K)):
            acc += a32[:, k0:k0 + BLOCK_K] @ w32[:, k0:k0 + BLOCK_K].T
    elif order == "sequential":
        for k in range(n):
            acc += a32[:, k:k + 1] * w32[:, k][None, :]
    elif order == "split_k":
        half = n // 2
        acc = (a32[:, :half] @ w32[:, :half].T) + (a32[:, half:] @ w32[:, half:].T)
    else:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    return acc.to(F64)


def _grouped(a_rows_of: Callable, w, bias, valid, local, round_S, order, scale_rows=None):
    M, topk = valid.shape
    out = torch.zeros(M * topk, w.shape[1], dtype=F64, device=w.device)
    for e in range(w.shape[0]):
        routes = torch.nonzero((valid & (local == e)).reshape(-1)).reshape(-1)
        if routes.numel() == 0:
            continue
        acc = fp32_gemm(a_rows_of(routes), w[e], order)
        if bias is not None:
            acc = acc + bias[e]
        if scale_rows is not None:
            acc = acc * scale_rows[routes].unsqueeze(1)
        out[routes] = round_S(acc)
    return out.reshape(M, topk, w.shape[1])


def ordered_pipeline(inputs: "MoEInputs", order: str = "reversed", store_c1_unrounded: bool = False) -> torch.Tensor:
    """The SPEC pipeline with fp32 GEMMs in ``order``: [M, K] in the storage dtype S.

    ``store_c1_unrounded`` plants a subtle bug for the tests: c1 kept in fp32 instead of rounded
    to S (SPEC step 6)."""
    import reference
    from reference import pipeline as ref

    from moe_validate.contract.checks import validate_call
    from moe_validate.contract.rules import fused_silu_fp8_group

    kw = inputs.kwargs()
    shape = validate_call(*inputs.args(), **kw)
    q = shape.quant
    S = shape.storage_dtype
    round_S = ref.storage_rounder(S, "mirror")
    valid, local = ref.route(inputs.topk_ids, shape.E, shape.global_num_experts, inputs.expert_map)
    x, x_unq = ref.prepare_input(inputs.hidden_states, inputs.topk_weights, shape,
                                 apply_router_weight_on_input=inputs.apply_router_weight_on_input,
                                 a1q_scale=None, precision="mirror")
    w1_f = reference.dequantize_weights(inputs.w1, q.w1_scale, shape.scheme, zp=q.w1_zp, group_size=q.group_size)
    w2_f = reference.dequantize_weights(inputs.w2, q.w2_scale, shape.scheme, zp=q.w2_zp, group_size=q.group_size)

    def bias(b):
        return None if b is None else b.to(torch.float32).to(F64)

    topk = valid.shape[1]
    round_c1 = (lambda t: t.float().double()) if store_c1_unrounded else round_S
    c1 = _grouped(lambda r: x[r // topk], w1_f, bias(q.w1_bias), valid, local, round_c1, order)
    c1 = ref.lora_w13(c1, x_unq, inputs.lora, valid, local, shape.activation, round_S)
    fused = fused_silu_fp8_group(shape.activation, shape.scheme, q.gemm1_clamp_limit, inputs.lora is not None)
    c2 = ref.activation_stage(c1, valid, shape.activation, q.gemm1_clamp_limit, round_S,
                              precision="mirror", fused=fused)
    c2_in = ref.requantize(c2, valid, shape.scheme, q.a2_scale)
    flat_in = c2_in.reshape(-1, c2_in.shape[-1])
    w = None if inputs.apply_router_weight_on_input else inputs.topk_weights.to(F64).reshape(-1)
    c3 = _grouped(lambda r: flat_in[r], w2_f, bias(q.w2_bias), valid, local, round_S, order, scale_rows=w)
    c3 = ref.lora_w2(c3, c2, inputs.lora, inputs.topk_weights, valid, local, round_S,
                     apply_router_weight_on_input=inputs.apply_router_weight_on_input)
    return ref.combine(c3, valid, S, precision="mirror").to(S)


class OrderedBackend:
    """``ordered_pipeline`` as a backend (scheme ``none`` only: see the module docstring)."""

    def __init__(self, order: str = "reversed") -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
        self.order = order
        self.name = f"ordered-{order.replace('_', '-')}"
        self.last_config: Optional[dict] = None

    def supports(self, case: "Case") -> Tuple[bool, str]:
        if case.scheme != "none":
            return False, ("the ordered calibration backend multiplies dequantized operands in fp32 (24-bit "
                           f"products) where the kernels multiply {case.scheme} codes exactly: the flip model "
                           "would not describe it")
        return True, ""

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]:
        if name == "rerun":
            return True, ""
        return False, "a calibration backend: only its outputs against the oracles are measured"

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> torch.Tensor:
        return ordered_pipeline(inputs, self.order)
