"""Peer backends for benchmarks: the ``torch-grouped`` pipeline built on ``torch._grouped_mm``.

The pipeline is the common "sort, grouped GEMM, scatter" MoE recipe written with PyTorch ops
only, so that ``moe-validate bench`` can put our Triton kernels next to what a team would get
without writing kernels:

  1. valid routes sorted by local expert (stable), per-expert counts, int32 end offsets;
  2. the routed rows of x gathered in that order;
  3. GEMM1 ``c1 = x_sorted @ w1[e]^T`` per expert group (``torch._grouped_mm``, or for fp8
     schemes with row-wise scales ``torch._scaled_grouped_mm``), output in the storage dtype S;
  4. the activation in fp32, rounded to S (then requantized for fp8 schemes);
  5. GEMM2 ``c3 = c2 @ w2[e]^T`` likewise;
  6. ``out[m] += w[r] * c3[r]`` (fp32 index_add over the routes, one rounding to S).

Every step is a device op without host synchronisation, so the whole call can be captured in a
CUDA graph. Differences from SPEC.md that a peer may have (it is a speed comparison, not the
implementation under validation): c3 is rounded to S before the router weight is applied
(SPEC rounds once after), and the top-k sum is an fp32 index_add (order not fixed).

Feature detection: ``grouped_mm_available(device)`` / ``scaled_grouped_mm_available(device)``
run a tiny call and report (bool, reason). Where ``torch._grouped_mm`` is missing the pipeline
can fall back to a per-expert loop (``allow_fallback=True``, CPU tests only: it synchronises
with the host and is not a fair peer for timing). fp8 schemes on a device without
``torch._scaled_grouped_mm`` (the CPU) use an emulation (dequantize to fp32, grouped fp32 GEMM,
round to S) so that the peer's quantization logic can be tested on CPU.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from moe_validate.matrix import Case
    from moe_validate.contract.spec import MoEInputs

__all__ = [
    "TorchGroupedBackend",
    "torch_grouped_experts",
    "grouped_mm_available",
    "scaled_grouped_mm_available",
    "peer_scheme_support",
    "PEER_SCHEMES",
]

# Schemes the peer runs. fp8 schemes need row-wise (per token / per output channel) or tensor
# scales: that is what torch._scaled_grouped_mm accepts on sm90 (torch 2.9-2.11). 1x128 /
# 128x128 block scales have no grouped cuBLAS/CUTLASS path there, so fp8_block128 is reported
# as unsupported rather than emulated (an emulation would not be a speed peer).
PEER_SCHEMES = ("none", "fp8_tensor_token", "fp8_tensor_static", "fp8_tensor_dynamic", "fp8_channel_token")


def _tiny_probe(device: str, scaled: bool) -> Tuple[bool, str]:
    import torch

    fn_name = "_scaled_grouped_mm" if scaled else "_grouped_mm"
    fn = getattr(torch, fn_name, None)
    if fn is None:
        return False, f"torch {torch.__version__} has no torch.{fn_name}"
    try:
        # Sizes: multiples of 16 so that every row stride is 16-byte aligned (a kernel requirement).
        a = torch.randn(32, 32, device=device)
        w = torch.randn(2, 16, 32, device=device)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
        if scaled:
            out = fn(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).transpose(1, 2),
                     torch.ones(32, device=device), torch.ones(2, 16, device=device), offs=offs,
                     out_dtype=torch.bfloat16)
        else:
            out = fn(a.to(torch.bfloat16), w.to(torch.bfloat16).transpose(1, 2), offs=offs)
        if tuple(out.shape) != (32, 16):
            return False, f"torch.{fn_name} returned shape {tuple(out.shape)} for a [32, 32] x [2, 32, 16] probe"
    except Exception as exc:  # any failure means "not usable here"; the reason goes into the row
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"torch.{fn_name} fails on {device}: {type(exc).__name__}: {first_line[:200]}"
    return True, ""


@functools.lru_cache(maxsize=8)
def grouped_mm_available(device: str = "cpu") -> Tuple[bool, str]:
    """(True, "") when ``torch._grouped_mm`` runs a tiny bf16 call on ``device``, else (False, why)."""
    return _tiny_probe(device, scaled=False)


@functools.lru_cache(maxsize=8)
def scaled_grouped_mm_available(device: str = "cpu") -> Tuple[bool, str]:
    """(True, "") when ``torch._scaled_grouped_mm`` runs a tiny row-wise fp8 call on ``device``."""
    return _tiny_probe(device, scaled=True)


def peer_scheme_support(scheme, device: str) -> Tuple[bool, str]:
    """Whether the peer can run ``scheme`` on ``device`` natively (for timing); (ok, reason)."""
    from moe_validate.contract.spec import QuantScheme

    scheme = QuantScheme.parse(scheme)
    if scheme.value not in PEER_SCHEMES:
        if scheme is QuantScheme.FP8_BLOCK128:
            return False, ("torch._scaled_grouped_mm has no 1x128/128x128 block-scaled fp8 path on sm90 "
                           "(row-wise and tensor-wise scales only)")
        return False, f"the torch-grouped peer does not implement scheme {scheme.value}"
    ok, why = grouped_mm_available(device)
    if not ok:
        return False, why
    if scheme.is_fp8:
        return scaled_grouped_mm_available(device)
    return True, ""


# ---------------------------------------------------------------------------------------------
# grouped GEMM helpers
# ---------------------------------------------------------------------------------------------
def _loop_grouped_mm(a, w_t, offs, out_dtype):
    """Per-expert loop with the semantics of ``torch._grouped_mm`` (host-synchronising)."""
    import torch

    out = torch.zeros(a.shape[0], w_t.shape[2], dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = (a[start:end].float() @ w_t[e].float()).to(out_dtype)
        start = end
    return out


def _grouped(a, w, offs, allow_fallback: bool):
    """``a @ w[e]^T`` per group: a [R, K] (sorted), w [E, N, K] -> [R, N] in a's dtype."""
    import torch

    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        try:
            return fn(a, w.transpose(1, 2), offs=offs)
        except RuntimeError:
            if not allow_fallback:
                raise
    elif not allow_fallback:
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    return _loop_grouped_mm(a, w.transpose(1, 2), offs, a.dtype)


def _scaled_grouped(a_q, a_scale, w_q, w_scale_rows, offs, out_dtype, allow_fallback: bool):
    """Row-wise scaled fp8 grouped GEMM: ``(a_q * a_scale[r]) @ (w_q[e] * w_scale_rows[e, n])^T``.

    a_q [R, K] fp8, a_scale [R] fp32, w_q [E, N, K] fp8, w_scale_rows [E, N] fp32 -> [R, N].
    On a CUDA device this is ``torch._scaled_grouped_mm``; on the CPU (no kernel) an emulation
    in fp32 with the same single rounding to ``out_dtype``.
    """
    import torch

    if a_q.device.type == "cuda":
        return torch._scaled_grouped_mm(a_q, w_q.transpose(1, 2), a_scale, w_scale_rows, offs=offs,
                                        out_dtype=out_dtype)
    # As the fp8 kernel does: products of codes accumulated in fp32 (each product of two e4m3
    # codes is exact in fp32), then the row and column scales applied to the fp32 sum.
    a_f, w_f = a_q.float(), w_q.float()
    fn = getattr(torch, "_grouped_mm", None)
    acc = None
    if fn is not None:
        try:
            acc = fn(a_f, w_f.transpose(1, 2), offs=offs)
        except RuntimeError:
            if not allow_fallback:
                raise
    elif not allow_fallback:
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    if acc is None:
        acc = _loop_grouped_mm(a_f, w_f.transpose(1, 2), offs, torch.float32)
    rows = torch.arange(a_q.shape[0], device=a_q.device)
    row_expert = torch.bucketize(rows, offs.to(torch.int64), right=True).clamp_max(w_q.shape[0] - 1)
    return (acc * a_scale.unsqueeze(1) * w_scale_rows[row_expert]).to(out_dtype)


def _quantize_rows(x, scheme, static_scale, row_valid):
    """(codes fp8 [R, C], scale fp32 [R]) per the scheme's activation granularity (SPEC quantizer)."""
    import torch

    from moe_validate.contract.spec import FP8_MAX, QUANT_EPS

    x32 = x.float()
    g = scheme.act_granularity
    if g == "token":
        scale = torch.clamp_min(x32.abs().amax(dim=1), QUANT_EPS) / FP8_MAX
    elif g == "tensor_static":
        scale = static_scale.float().reshape(1).expand(x32.shape[0])
    elif g == "tensor_dynamic":
        # SPEC: a dynamic per-tensor scale spans the valid routes only.
        absmax = torch.where(row_valid.unsqueeze(1), x32.abs(), torch.zeros_like(x32)).amax()
        scale = (torch.clamp_min(absmax, QUANT_EPS) / FP8_MAX).reshape(1).expand(x32.shape[0])
    else:
        raise ValueError(f"the torch-grouped peer cannot quantize activations per {g!r}")
    codes = torch.clamp(x32 / scale.unsqueeze(1), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale.contiguous()


def _weight_row_scales(scale, E: int, rows: int):
    """Per-expert [E] (or [E,1,1]) or per-channel [E, rows] weight scales as [E, rows] fp32."""
    s = scale.float()
    if s.numel() == E:
        return s.reshape(E, 1).expand(E, rows).contiguous()
    return s.reshape(E, rows).contiguous()


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def torch_grouped_experts(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu",
                          quant=None, global_num_experts: int = -1, allow_fallback: bool = False):
    """The [M, K] MoE experts output computed with ``torch._grouped_mm`` (see the module doc).

    Supports every activation, the schemes of ``PEER_SCHEMES``, and invalid expert ids (they
    contribute zeros). No expert map, bias, clamp, LoRA or router weight on the input.
    """
    import torch

    from moe_validate.contract.spec import Activation, QuantConfig, QuantScheme, storage_dtype

    from reference.activations import apply_activation

    quant = quant if quant is not None else QuantConfig()
    scheme = QuantScheme.parse(quant.scheme)
    act = Activation.parse(activation)
    if scheme.value not in PEER_SCHEMES:
        raise ValueError(f"quant.scheme must be one of {', '.join(PEER_SCHEMES)} for the torch-grouped peer; "
                         f"got {scheme.value}")
    M, K = hidden_states.shape
    E, N, _ = w1.shape
    topk = topk_ids.shape[1]
    gne = global_num_experts if global_num_experts > 0 else E
    S = storage_dtype(hidden_states.dtype)
    device = hidden_states.device

    # 1. routing: invalid routes get key E so that they sort after every group and fall outside
    #    offs[-1]; their rows are zeroed before the combine.
    ids = topk_ids.reshape(-1).to(torch.int64)
    valid = (ids >= 0) & (ids < gne) & (ids < E)
    key = torch.where(valid, ids, torch.full_like(ids, E))
    order = torch.sort(key, stable=True).indices
    sorted_valid = valid[order]
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).index_add_(
        0, key, torch.ones_like(key))[:E]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    token = order // topk

    # 2-3. gather, GEMM1
    x_sorted = hidden_states[token]
    if scheme.is_fp8:
        a1, s1 = _quantize_rows(x_sorted, scheme, quant.a1_scale, sorted_valid)
        c1 = _scaled_grouped(a1, s1, w1, _weight_row_scales(quant.w1_scale, E, N), offs, S, allow_fallback)
    else:
        c1 = _grouped(x_sorted, w1, offs, allow_fallback)

    # 4. activation in fp32, one rounding to S
    c2 = apply_activation(c1.float(), act).to(S)

    # 5. GEMM2
    if scheme.is_fp8:
        a2, s2 = _quantize_rows(c2, scheme, quant.a2_scale, sorted_valid)
        c3 = _scaled_grouped(a2, s2, w2, _weight_row_scales(quant.w2_scale, E, K), offs, S, allow_fallback)
    else:
        c3 = _grouped(c2, w2, offs, allow_fallback)

    # 6. weighted combine (rows past offs[-1] are unwritten by the grouped GEMM: never read them)
    weight = topk_weights.reshape(-1).float()[order]
    contrib = torch.where(sorted_valid.unsqueeze(1), c3.float() * weight.unsqueeze(1),
                          torch.zeros((), dtype=torch.float32, device=device))
    out = torch.zeros(M, K, dtype=torch.float32, device=device).index_add_(0, token, contrib)
    return out.to(S)


class TorchGroupedBackend:
    """The ``torch-grouped`` peer as a harness backend (``moe_validate.backends``)."""

    name = "torch-grouped"

    def __init__(self, allow_fallback: bool = False) -> None:
        self.allow_fallback = allow_fallback
        self.last_config = None

    def _device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def supports(self, case: "Case") -> Tuple[bool, str]:
        unsupported = [(case.expert_map != "none", "an expert map"), (case.lora != "none", "LoRA"),
                       (case.bias, "biases"), (case.clamp is not None, "a gemm1 clamp"),
                       (case.router_on_input, "the router weight on the input")]
        for flag, what in unsupported:
            if flag:
                return False, f"the torch-grouped peer does not implement {what}"
        if case.quant.value not in PEER_SCHEMES:
            return peer_scheme_support(case.quant, self._device())
        ok, why = grouped_mm_available(self._device())
        if not ok and not self.allow_fallback:
            return False, why
        return True, ""

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> "torch.Tensor":
        if inputs.expert_map is not None or inputs.lora is not None or inputs.apply_router_weight_on_input:
            raise ValueError("the torch-grouped peer takes no expert_map, lora or apply_router_weight_on_input")
        q = inputs.quant
        if q is not None and (q.w1_bias is not None or q.w2_bias is not None or q.gemm1_clamp_limit is not None):
            raise ValueError("the torch-grouped peer takes no biases and no gemm1_clamp_limit")
        return torch_grouped_experts(*inputs.args(), activation=inputs.activation, quant=q,
                                     global_num_experts=inputs.global_num_experts,
                                     allow_fallback=self.allow_fallback)


def make_peer_callable(name: str) -> Callable:
    """The raw experts function of a peer by name (bench interleaves these with ours)."""
    if name == "torch-grouped":
        return torch_grouped_experts
    raise ValueError(f"peer must be 'torch-grouped'; got {name!r}")
