"""Numerics profiles: where an experts implementation rounds and how it quantizes (issue 17).

SPEC.md leaves an implementation free in one thing only, the fp32 accumulation order. Real
implementations also differ in *where* they round and *how* their quantizers compute: a choice
that changes bits without changing accuracy. A ``NumericsProfile`` names those choices, one typed
field each; a backend declares its own (``numerics_profile``), the reference's ``mirror`` mode
rounds where that profile says (``reference.run_stages(..., profile=...)``), and the gate's flip
model counts the roundings it adds (``moe_validate/tolerance.py``). ``exact`` follows no profile:
it is SPEC's scheme in float64, the yardstick for accuracy whatever an implementation does.

Built in: ``SPEC_PROFILE`` (ours: a machine-readable summary of docs/SPEC.md, which stays the
definition) and ``VLLM_PROFILE`` (vLLM 0.32's ``TritonExperts``, read from its source; each value
cites the file). docs/PROFILES.md describes the fields and the two verdicts.

Torch-free at import: the CLI, the pytest plugin and the backends may read a profile cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Tuple

__all__ = [
    "ActivationRounding",
    "WeightPrecision",
    "GemmOutputDtype",
    "DotPrecision",
    "TopkSum",
    "ScaleFormula",
    "CodeRounding",
    "Division",
    "Fp8Accumulation",
    "Quantizer",
    "NumericsProfile",
    "SPEC_PROFILE",
    "VLLM_PROFILE",
    "BUILTIN_PROFILES",
    "QUANT_FLOOR",
]

# SPEC.md, "Quantization schemes": the floor of a dynamic scale's absmax
QUANT_FLOOR = 1e-10


def _check_enum(obj, name: str, kind) -> None:
    value = getattr(obj, name)
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}; got {value!r}")


class ActivationRounding(str, Enum):
    """How c2 = act(g) * u of a gated activation is stored (the profile's
    ``double_rounded_activations`` name which activations DOUBLE applies to)."""

    SINGLE = "single"  # round_S(act(g) * u), the product in fp32 (SPEC step 8)
    DOUBLE = "double"  # round_S(round_S(act(g)) * u): act(g) stored to S first, the product rounded again


class WeightPrecision(str, Enum):
    """In which precision a weight enters a product (the router weight; a dequantized weight)."""

    FP32 = "fp32"  # as given (fp32), or dequantized in fp32
    STORAGE = "storage"  # rounded to S first


class GemmOutputDtype(str, Enum):
    """Where a GEMM with quantized (fp8 / int8) activations stores its output (c1, c3)."""

    STORAGE = "storage"  # round_S once after dequantization, bias and router weight (SPEC steps 6, 9)
    BF16 = "bf16"  # rounded to bf16 whatever S (then held in S: exact unless out of fp16's range)
    FP32 = "fp32"  # kept in fp32 (rounded to fp32 only)


class DotPrecision(str, Enum):
    """How an fp32 x fp32 dot reads its operands."""

    IEEE = "ieee"  # full fp32 operands (SPEC: input_precision="ieee")
    TF32 = "tf32"  # operands truncated to TF32's 10 mantissa bits (sm_80+ tensor cores' default)


class TopkSum(str, Enum):
    """How out[m] = sum over valid slots j of c3[m, j] accumulates."""

    FP32 = "fp32"  # in fp32, slot order, one rounding to S (SPEC step 10)
    STORAGE_UP_TO_4 = "storage_up_to_4"  # in S (rounded after each add) for topk 2..4; as FP32 for topk > 4


class ScaleFormula(str, Enum):
    """A dynamic scale s from absmax (fp32), QMAX (448 fp8, 127 int8) and the profile's floor."""

    FLOOR_THEN_DIVIDE = "max(absmax, floor) / QMAX"
    FLOOR_THEN_RECIPROCAL = "max(absmax, floor) * (1 / QMAX)"  # 1 / QMAX rounded to fp32 first
    DIVIDE_THEN_FLOOR = "max(absmax / QMAX, floor)"


class CodeRounding(str, Enum):
    """A code q from x (fp32) and the scale s; every form saturates to +-QMAX."""

    DIVIDE_RNE = "rne(x / s)"
    RECIPROCAL_RNE = "rne(x * (1 / s))"  # 1 / s rounded to fp32 first
    QMAX_OVER_ABSMAX_HALF_AWAY = "round_half_away(x * (QMAX / max(absmax, floor)))"


class Division(str, Enum):
    """How a quantizer's fp32 divisions (``x / s``, ``absmax / QMAX``, ``QMAX / absmax``) round."""

    CORRECTLY_ROUNDED = "correctly rounded"  # IEEE (tl.div_rn, torch's tensor / tensor, CUDA C's float /)
    # Triton's plain fp32 `/`: correctly rounded in the interpreter, an approximation up to 2 ulp off
    # on NVIDIA GPUs (docs/TRITON_FACTS.md); the mirror cannot follow it bit for bit, so the gate
    # counts the codes it may flip there (tolerance.division_ties)
    TRITON = "triton"


class Fp8Accumulation(str, Enum):
    """How a launch's fp8 x fp8 dots accumulated on the GPU: a fact of the launch (its tiles pick the
    instruction), not of the profile, so a backend reports it per run (``last_fp8_accumulation``)."""

    # Hopper's warpgroup fp8 MMA (wgmma): its accumulator keeps fewer bits than fp32 (relF 7e-5 at
    # K = 64, docs/TRITON_FACTS.md); what the gate assumes on a GPU when a backend does not say
    FP8_MMA = "fp8 mma"
    # a full fp32 accumulation, as the mma.sync path of tiles narrower than a warpgroup's M = 64
    FP32 = "fp32"


@dataclass(frozen=True)
class Quantizer:
    """One activation quantizer: the scale formula (dynamic scales only) with its floor, the
    rounding of the codes, and how its divisions round."""

    scale: ScaleFormula = ScaleFormula.FLOOR_THEN_DIVIDE
    floor: float = QUANT_FLOOR
    codes: CodeRounding = CodeRounding.DIVIDE_RNE
    division: Division = Division.CORRECTLY_ROUNDED

    def __post_init__(self) -> None:
        _check_enum(self, "scale", ScaleFormula)
        _check_enum(self, "codes", CodeRounding)
        _check_enum(self, "division", Division)
        if not isinstance(self.floor, (int, float)) or self.floor < 0:
            raise ValueError(f"floor must be a number >= 0; got {self.floor!r}")

    def describe(self) -> str:
        scale = self.scale.value.replace("floor", f"{self.floor:g}")
        division = "" if self.division is Division.CORRECTLY_ROUNDED else \
            ", / is Triton's fp32 division (approximate on NVIDIA GPUs)"
        return f"s = {scale}, q = sat({self.codes.value}){division}"


SPEC_QUANTIZER = Quantizer()  # SPEC.md: s = max(absmax, 1e-10) / QMAX, q = sat(rne(x / s))


@dataclass(frozen=True)
class NumericsProfile:
    """Where an implementation rounds and how it quantizes; every default is SPEC.md's choice.

    The quantizers are per activation granularity (``QuantScheme.act_granularity``): fp8 per
    token per 128 columns, fp8 per token, fp8 per tensor (dynamic, and static with a given scale:
    only its code rounding applies) and int8 per token.
    """

    name: str
    activation_rounding: ActivationRounding = ActivationRounding.SINGLE
    # the gated activations (Activation values) that DOUBLE applies to; "silu" is silu without a
    # GEMM1 clamp, "silu_clamped" silu with one. Every other activation rounds once.
    double_rounded_activations: Tuple[str, ...] = ()
    router_weight_gemm2: WeightPrecision = WeightPrecision.FP32  # c3 = round_S(acc * w) in GEMM2's epilogue
    router_weight_input: WeightPrecision = WeightPrecision.FP32  # x = round_S(x * w) before GEMM1
    quantized_gemm_output: GemmOutputDtype = GemmOutputDtype.STORAGE
    # weight-only schemes (int8_w8a16, int4_w4a16): (q - zp) * s as the dot reads it
    weight_only_dequantized: WeightPrecision = WeightPrecision.FP32
    fp32_dot: DotPrecision = DotPrecision.IEEE
    topk_sum: TopkSum = TopkSum.FP32
    # LoRA's shrink result x . A^T (and c2 . A2^T) as the expand dot reads it
    lora_rank_intermediate: WeightPrecision = WeightPrecision.FP32
    fp8_token_group: Quantizer = SPEC_QUANTIZER
    fp8_token: Quantizer = SPEC_QUANTIZER
    fp8_tensor_dynamic: Quantizer = SPEC_QUANTIZER
    fp8_tensor_static: Quantizer = SPEC_QUANTIZER
    int8_token: Quantizer = SPEC_QUANTIZER
    # the fused silu + fp8 1x128 path (SPEC step 8: the fp32 activation quantized directly)
    fp8_token_group_fused: Quantizer = SPEC_QUANTIZER

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string; got {self.name!r}")
        if not isinstance(self.double_rounded_activations, tuple) or not all(
                isinstance(a, str) for a in self.double_rounded_activations):
            raise TypeError("double_rounded_activations must be a tuple of activation names; got "
                            f"{self.double_rounded_activations!r}")
        for f in fields(self):
            kind = _FIELD_TYPES.get(f.name)
            if kind is not None:
                _check_enum(self, f.name, kind)

    def rounds_activation_twice(self, activation, clamp_limit) -> bool:
        """Whether c2 of ``activation`` (an Activation or its value) is stored as
        round_S(round_S(act(g)) * u) under this profile."""
        if self.activation_rounding is not ActivationRounding.DOUBLE:
            return False
        name = getattr(activation, "value", activation)
        key = "silu_clamped" if name == "silu" and clamp_limit is not None else name
        return key in self.double_rounded_activations

    def quantizer(self, act_dtype_name: str, granularity: str, fused: bool = False) -> Quantizer:
        """The quantizer of an activation key: ``act_dtype_name`` "fp8" or "int8", ``granularity``
        as ``QuantScheme.act_granularity`` spells it ("token", "token_group", "tensor_dynamic",
        "tensor_static"); ``fused``: the fused silu + fp8 1x128 path's (``rules.fused_silu_fp8_group``)."""
        if fused:
            return self.fp8_token_group_fused
        key = {("fp8", "token_group"): "fp8_token_group", ("fp8", "token"): "fp8_token",
               ("fp8", "tensor_dynamic"): "fp8_tensor_dynamic", ("fp8", "tensor_static"): "fp8_tensor_static",
               ("int8", "token"): "int8_token"}.get((act_dtype_name, granularity))
        if key is None:
            raise ValueError(f"no quantizer for {act_dtype_name} activations per {granularity!r}")
        return getattr(self, key)

    def differences(self, other: "NumericsProfile" = None) -> list:
        """``["field: ours -> theirs", ...]`` for every field where this profile differs from
        ``other`` (default SPEC_PROFILE); the name is not compared."""
        other = other or SPEC_PROFILE
        out = []
        for f in fields(self):
            if f.name == "name" or (f.name == "double_rounded_activations"
                                    and self.activation_rounding is ActivationRounding.SINGLE
                                    and other.activation_rounding is ActivationRounding.SINGLE):
                continue
            mine, theirs = getattr(other, f.name), getattr(self, f.name)
            if mine != theirs:
                out.append(f"{f.name}: {_show(mine)} -> {_show(theirs)}")
        return out

    def to_dict(self) -> dict:
        """JSON-friendly: enums by value, quantizers as their formula."""
        return {f.name: _show(getattr(self, f.name)) for f in fields(self)}


def _show(value) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    if isinstance(value, Quantizer):
        return value.describe()
    return value.value if isinstance(value, Enum) else str(value)


_FIELD_TYPES = {
    "activation_rounding": ActivationRounding,
    "router_weight_gemm2": WeightPrecision,
    "router_weight_input": WeightPrecision,
    "quantized_gemm_output": GemmOutputDtype,
    "weight_only_dequantized": WeightPrecision,
    "fp32_dot": DotPrecision,
    "topk_sum": TopkSum,
    "lora_rank_intermediate": WeightPrecision,
    "fp8_token_group": Quantizer,
    "fp8_token": Quantizer,
    "fp8_tensor_dynamic": Quantizer,
    "fp8_tensor_static": Quantizer,
    "int8_token": Quantizer,
    "fp8_token_group_fused": Quantizer,
}


SPEC_PROFILE = NumericsProfile(name="spec")

# vLLM 0.32's TritonExperts (sources under vllm/model_executor/layers/, fused_moe/ unless said;
# tests/moe_validate/test_profile.py reads them where vLLM is installed).
VLLM_PROFILE = NumericsProfile(
    name="vllm-0.32",
    # experts/triton_moe.py TritonExperts.activation -> activation.py apply_moe_activation ->
    # torch.ops._C.silu_and_mul & co (csrc/activation_kernels.cu act_and_mul_kernel: ACT(x) computed
    # in fp32 and rounded to S, then * up in S: two roundings). swigluoai_and_mul and the *_no_mul
    # activations (F.silu / F.gelu on S tensors) round once; the fused silu + fp8_block128 path
    # (ops.silu_and_mul_per_block_quant) quantizes the fp32 activation, as SPEC's fused path does.
    activation_rounding=ActivationRounding.DOUBLE,
    # silu with a clamp: experts/triton_moe.py TritonExperts.activation -> utils.py swiglu_limit_func,
    # which on CUDA (without topk_ids) calls torch.ops._C.silu_and_mul_with_clamp: the clamped
    # silu(g) stored to S, then the product (csrc's act_and_mul pattern; vllm_cpu_ops stands in for
    # it); off CUDA its torch fallback stores once. The backend validates the CUDA path.
    # swiglustep: swiglustep_and_mul_triton (one store)
    double_rounded_activations=("silu", "gelu", "gelu_tanh", "silu_clamped"),
    # fused_moe.py fused_moe_kernel: `accumulator *= moe_weight[:, None]` in fp32 before the one cast
    router_weight_gemm2=WeightPrecision.FP32,
    # prepare_finalize/no_dp_ep.py prepare: `a1 * topk_weights.to(a1.dtype)` (w rounded to S, then
    # the product rounded to S)
    router_weight_input=WeightPrecision.STORAGE,
    # fused_moe.py fused_moe_kernel: `accumulator.to(compute_type)`, one cast; experts/triton_moe.py
    # TritonExperts.apply picks compute_type from the hidden states it is given, which with fp8 / int8
    # activations are the quantized ones (prepare quantizes first): `compute_type = tl.bfloat16` for
    # float8_e4m3fn / int8, so an fp16 call's c1 and c3 are rounded to bf16 (stored in fp16 workspaces)
    quantized_gemm_output=GemmOutputDtype.BF16,
    # fused_moe.py fused_moe_kernel_gptq_awq (TritonWNA16Experts): `b = ((b.to(tl.float32) - b_zp) *
    # b_scale).to(compute_type)` before `tl.dot(a, b, acc=accumulator)`: the dequantized weight in S
    weight_only_dequantized=WeightPrecision.STORAGE,
    # fused_moe.py fused_moe_kernel: `tl.dot(a, b)` without input_precision: TF32 for fp32 operands on
    # sm_80+ (the interpreter emulates it: contract/interpreter.py, fp32_dot="tf32")
    fp32_dot=DotPrecision.TF32,
    # experts/triton_moe.py TritonExperts.moe_sum -> ops.moe_sum (csrc/moe/moe_align_sum_kernels.cu
    # moe_sum_kernel: `scalar_t x = 0; x += input[...]` for topk 2..4, at::sum_out (fp32) above)
    topk_sum=TopkSum.STORAGE_UP_TO_4,
    # lora/ops/triton_ops/fused_moe_lora_op.py: the shrink's fp32 accumulator is stored to the
    # output dtype (`tmp_typed = tmp.to(out_ptr.dtype.element_ty)`) before `acc = tl.dot(tmp_typed, b)`
    lora_rank_intermediate=WeightPrecision.STORAGE,
    # quantization/utils/fp8_utils.py _per_token_group_quant_fp8 (the Triton path, taken on a CPU):
    # `_absmax = tl.maximum(tl.max(tl.abs(y)), eps)`, `scale_raw = _absmax * (1.0 / fp8_max)`,
    # `y_q = tl.clamp(y / y_s, ...)`. On CUDA per_token_group_quant_fp8 calls the compiled
    # torch.ops._C.per_token_group_fp8_quant instead, whose source is not in the wheel: not read here.
    # Its `y / y_s` is Triton's plain fp32 `/`; on the GPU bundle (scripts/gpu_vllm.sh) this Triton
    # path runs there too, in place of the compiled op.
    fp8_token_group=Quantizer(ScaleFormula.FLOOR_THEN_RECIPROCAL, QUANT_FLOOR, CodeRounding.DIVIDE_RNE,
                              Division.TRITON),
    # ops.scaled_fp8_quant(use_per_token_if_dynamic=True) -> csrc/quantization/w8a8/fp8/common.cu
    # dynamic_per_token_scaled_fp8_quant_kernel: s = max(absmax / 448, min_scaling_factor =
    # 1 / (448 * 512)), q = sat(x / s) (scaled_fp8_conversion<false>); vllm_cpu_ops.py stands in for it
    fp8_token=Quantizer(ScaleFormula.DIVIDE_THEN_FLOOR, 1.0 / (448.0 * 512.0), CodeRounding.DIVIDE_RNE),
    # ops.scaled_fp8_quant (dynamic, per tensor) -> common.cu dynamic_scaled_fp8_quant: s = absmax / 448
    # (segmented_max_reduction, no floor), then scaled_fp8_quant_kernel: q = sat(x * (1 / s))
    fp8_tensor_dynamic=Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 0.0, CodeRounding.RECIPROCAL_RNE),
    # common.cu scaled_fp8_quant_kernel with the given scale: q = sat(x * (1 / s)) (scaled_fp8_conversion<true>)
    fp8_tensor_static=Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, QUANT_FLOOR, CodeRounding.RECIPROCAL_RNE),
    # quantization/utils/int8_utils.py _per_token_quant_int8: `absmax = tl.maximum(tl.max(tl.abs(x)),
    # 1e-10)`, `scale_x = absmax / 127`, `x_q = round_int8(x * (127 / absmax))` with round_int8 =
    # libdevice.round (half away from zero); both `/` are Triton's plain fp32 division (on an H200 28%
    # of its 127 / absmax came out an ulp off: scripts/gpu_vllm_int8_probe.py)
    int8_token=Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, QUANT_FLOOR, CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY,
                         Division.TRITON),
    # experts/triton_moe.py apply (silu + fp8 block [128, 128], no clamp, no LoRA) ->
    # ops.silu_and_mul_per_block_quant (csrc/quantization/fused_kernels/fused_silu_mul_block_quant.cu;
    # vllm_cpu_ops.py stands in for it): s = max(absmax / 448, 1 / (448 * 512)), q = sat(r / s)
    fp8_token_group_fused=Quantizer(ScaleFormula.DIVIDE_THEN_FLOOR, 1.0 / (448.0 * 512.0), CodeRounding.DIVIDE_RNE),
)

BUILTIN_PROFILES = {p.name: p for p in (SPEC_PROFILE, VLLM_PROFILE)}
