"""The reference's mirror follows a numerics profile (reference.pipeline, reference.quant), one
rounding choice per function; ``exact`` and SPEC_PROFILE stay what they were."""

import dataclasses

import pytest
import torch

import reference
from moe_validate.contract.profile import (
    SPEC_PROFILE,
    VLLM_PROFILE,
    ActivationRounding,
    CodeRounding,
    DotPrecision,
    GemmOutputDtype,
    NumericsProfile,
    Quantizer,
    ScaleFormula,
    TopkSum,
    WeightPrecision,
)
from reference.pipeline import STAGE_KEYS, activation_rounded_twice, combine, router_weight
from reference.quant import quantize_activation_codes

from test_ref_pipeline import _problem, _quantized_problem  # noqa: E402  (the same problems)

BF16 = torch.bfloat16
F64 = torch.float64


def _bf16(t):
    return t.to(BF16).to(F64)


@pytest.mark.parametrize("scheme", ["none", "fp8_block128", "fp8_tensor_token", "fp8_tensor_dynamic",
                                    "int8_channel_token", "int8_w8a16", "int4_w4a16"])
def test_the_default_profile_is_spec_and_changes_nothing(scheme):
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    default = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")
    spec = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror", profile=SPEC_PROFILE)
    for key in STAGE_KEYS:
        assert torch.equal(default[key], spec[key]), key


@pytest.mark.parametrize("scheme", ["none", "fp8_block128", "int8_channel_token", "int4_w4a16"])
def test_exact_ignores_the_profile(scheme):
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    spec = reference.fused_experts(x, w1, w2, tw, ids, quant=quant, precision="exact")
    vllm = reference.fused_experts(x, w1, w2, tw, ids, quant=quant, precision="exact", profile=VLLM_PROFILE)
    assert torch.equal(spec, vllm)


def test_a_profile_must_be_a_numerics_profile():
    x, w1, w2, tw, ids = _problem(0)
    with pytest.raises(TypeError, match="profile must be a NumericsProfile; got str"):
        reference.run_stages(x, w1, w2, tw, ids, precision="mirror", profile="vllm")


# ---------------------------------------------------------------------------------------------
# one rounding choice at a time
# ---------------------------------------------------------------------------------------------
def _one_change(**fields):
    return dataclasses.replace(SPEC_PROFILE, name="one-change", **fields)


def test_double_activation_rounding_stores_act_g_before_the_product():
    x, w1, w2, tw, ids = _problem(3)
    twice = _one_change(activation_rounding=ActivationRounding.DOUBLE, double_rounded_activations=("silu",))
    single = reference.run_stages(x, w1, w2, tw, ids, precision="mirror")
    double = reference.run_stages(x, w1, w2, tw, ids, precision="mirror", profile=twice)
    c1 = single["c1"]
    gate, up = c1[..., :16].float(), c1[..., 16:].float()
    expected = _bf16((_bf16(gate * torch.sigmoid(gate)).float() * up).to(F64))
    valid = single["route_valid"][..., None]
    assert torch.equal(double["c2"], torch.where(valid, expected, torch.zeros_like(expected)))
    assert not torch.equal(double["c2"], single["c2"])  # the two roundings differ somewhere here
    assert torch.equal(double["c1"], c1)


def test_activation_rounded_twice_of_gelu_by_hand():
    c1 = torch.tensor([[[1.37, -0.61, 2.9, 0.77]]], dtype=F64).to(BF16).to(F64)  # gate 2, up 2
    g, u = c1[..., :2].float(), c1[..., 2:].float()
    gelu = 0.5 * g * (1.0 + torch.erf(g / torch.full_like(g, 2.0 ** 0.5)))
    assert torch.equal(activation_rounded_twice(c1, "gelu", None, _bf16), _bf16((_bf16(gelu).float() * u).to(F64)))


def test_router_weight_in_storage_rounds_the_weight_first():
    w = torch.tensor([[0.3, 0.7001]])
    assert torch.equal(router_weight(w, BF16, WeightPrecision.STORAGE), _bf16(w))
    assert torch.equal(router_weight(w, BF16, WeightPrecision.FP32), w.to(F64))
    x, w1, w2, tw, ids = _problem(4, topk=1)
    on_input = _one_change(router_weight_input=WeightPrecision.STORAGE)
    st = reference.run_stages(x, w1, w2, tw, ids, precision="mirror", apply_router_weight_on_input=True,
                              profile=on_input)
    assert torch.equal(st["x"], _bf16((x.float() * tw[:, :1].to(BF16).float()).to(F64)))


def test_topk_sum_in_storage_rounds_after_every_add():
    c3 = torch.tensor([[[256.0], [1.0], [1.0]]], dtype=F64)  # bf16: 256 + 1 rounds back to 256
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert combine(c3, valid, BF16, precision="mirror").item() == 258.0
    assert combine(c3, valid, BF16, precision="mirror", topk_sum=TopkSum.STORAGE_UP_TO_4).item() == 256.0
    five = torch.cat([c3, torch.zeros(1, 2, 1, dtype=F64)], 1)  # topk > 4: the fp32 sum
    assert combine(five, torch.ones(1, 5, dtype=torch.bool), BF16, precision="mirror",
                   topk_sum=TopkSum.STORAGE_UP_TO_4).item() == 258.0
    assert combine(c3, valid, BF16, precision="exact", topk_sum=TopkSum.STORAGE_UP_TO_4).item() == 258.0


def test_tf32_dots_truncate_fp32_operands():
    x, w1, w2, tw, ids = _problem(5, dtype=torch.float32)
    tf32 = _one_change(fp32_dot=DotPrecision.TF32)
    st = reference.run_stages(x, w1, w2, tw, ids, precision="mirror", profile=tf32)
    ieee = reference.run_stages(x, w1, w2, tw, ids, precision="mirror")
    truncate = lambda t: (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32).to(F64)  # noqa: E731
    valid, local = ieee["route_valid"], ieee["route_expert"]
    m, j = 0, 0
    e = int(local[m, j])
    expected = (truncate(x[m:m + 1]) @ truncate(w1[e]).T).float().to(F64)
    assert valid[m, j] and torch.equal(st["c1"][m, j], expected[0])
    assert not torch.equal(st["out"], ieee["out"])
    bf16 = reference.run_stages(*_problem(5), precision="mirror", profile=tf32)  # no fp32 operands: no change
    assert torch.equal(bf16["out"], reference.run_stages(*_problem(5), precision="mirror")["out"])


def test_gemm_outputs_in_fp32_skip_the_storage_rounding_of_quantized_schemes():
    x, w1, w2, tw, ids, quant = _quantized_problem("fp8_tensor_token")
    fp32_out = _one_change(quantized_gemm_output=GemmOutputDtype.FP32)
    st = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror", profile=fp32_out)
    assert torch.equal(st["c1"], st["c1"].float().to(F64))
    assert not torch.equal(st["c1"], _bf16(st["c1"]))  # not on the bf16 grid


def test_weight_only_dequantization_in_storage():
    x, w1, w2, tw, ids, quant = _quantized_problem("int4_w4a16")
    in_s = _one_change(weight_only_dequantized=WeightPrecision.STORAGE)
    st = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror", profile=in_s)
    spec = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")
    assert torch.equal(st["w1"], _bf16(spec["w1"].float().to(F64)))
    # fp8 weights are not weight-only: untouched
    x, w1, w2, tw, ids, quant = _quantized_problem("fp8_block128")
    assert torch.equal(reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror", profile=in_s)["w1"],
                       reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")["w1"])


# ---------------------------------------------------------------------------------------------
# the quantizer formulas
# ---------------------------------------------------------------------------------------------
def test_int8_half_away_from_zero_codes():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, 2.5, -2.5]])
    spec_codes, scale = quantize_activation_codes(x, "int8_channel_token")
    assert scale.item() == 1.0 and spec_codes.tolist() == [[127, 0, -0, 2, 2, -2]]  # ties to even
    away = Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 1e-10, CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY)
    codes, scale = quantize_activation_codes(x, "int8_channel_token", quantizer=away)
    assert scale.item() == 1.0 and codes.tolist() == [[127, 1, -1, 2, 3, -3]]


def test_fp8_scale_formulas():
    absmax = torch.tensor([0.7, 1.3, 3.1, 5.9, 0.011, 17.0, 2.2, 9.7])
    x = torch.zeros(8, 128)
    x[:, 0] = absmax
    _, spec = quantize_activation_codes(x, "fp8_block128")
    assert torch.equal(spec[:, 0], absmax / torch.full_like(absmax, 448.0))
    reciprocal = Quantizer(ScaleFormula.FLOOR_THEN_RECIPROCAL, 1e-10, CodeRounding.DIVIDE_RNE)
    _, s = quantize_activation_codes(x, "fp8_block128", quantizer=reciprocal)
    assert torch.equal(s[:, 0], absmax * torch.tensor(1.0 / 448.0))
    assert not torch.equal(s, spec)  # the two formulas differ in the last bit here
    floor = Quantizer(ScaleFormula.DIVIDE_THEN_FLOOR, 1.0 / (448 * 512), CodeRounding.DIVIDE_RNE)
    _, s = quantize_activation_codes(torch.full((1, 4), 1e-6), "fp8_channel_token", quantizer=floor)
    assert s.item() == pytest.approx(1.0 / (448 * 512), rel=1e-7)


def test_fp8_static_codes_by_the_reciprocal():
    x = torch.linspace(-3, 3, 97).reshape(1, -1)
    s = torch.tensor(0.3)
    inverse = Quantizer(codes=CodeRounding.RECIPROCAL_RNE)
    codes, _ = quantize_activation_codes(x, "fp8_tensor_static", static_scale=s, quantizer=inverse)
    expected = (x * torch.reciprocal(s.reshape(1))).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes, expected)


def test_half_away_codes_need_a_dynamic_int8_scale():
    away = Quantizer(codes=CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY)
    with pytest.raises(ValueError, match="dynamic int8 scales only"):
        quantize_activation_codes(torch.ones(1, 4), "fp8_channel_token", quantizer=away)


def test_vllm_profile_mirror_runs_every_scheme_it_names():
    for scheme in ("none", "fp8_block128", "fp8_channel_token", "fp8_tensor_static", "fp8_tensor_dynamic",
                   "int8_channel_token", "int8_w8a16", "int4_w4a16"):
        x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
        out = reference.fused_experts(x, w1, w2, tw, ids, quant=quant, precision="mirror", profile=VLLM_PROFILE)
        assert torch.isfinite(out).all(), scheme


def test_no_profile_field_is_left_without_a_mirror_rule():
    """Every field of NumericsProfile changes the mirror somewhere (else the mirror ignores it)."""
    x, w1, w2, tw, ids = _problem(7, topk=3)
    xq, w1q, w2q, twq, idsq, quant = _quantized_problem("int4_w4a16")
    probes = {
        "activation_rounding": (dict(activation_rounding=ActivationRounding.DOUBLE,
                                     double_rounded_activations=("silu",)), (x, w1, w2, tw, ids), {}),
        "topk_sum": (dict(topk_sum=TopkSum.STORAGE_UP_TO_4), (x, w1, w2, tw, ids), {}),
        "router_weight_gemm2": (dict(router_weight_gemm2=WeightPrecision.STORAGE), (x, w1, w2, tw, ids), {}),
        "weight_only_dequantized": (dict(weight_only_dequantized=WeightPrecision.STORAGE),
                                    (xq, w1q, w2q, twq, idsq), dict(quant=quant)),
    }
    for name, (change, args, kwargs) in probes.items():
        base = reference.fused_experts(*args, **kwargs, precision="mirror")
        changed = reference.fused_experts(*args, **kwargs, precision="mirror", profile=_one_change(**change))
        assert not torch.equal(base, changed), name
    # the rest have their own tests above
    covered = set(probes) | {"name", "double_rounded_activations", "router_weight_input", "quantized_gemm_output",
                             "lora_rank_intermediate",
                             "fp32_dot", "fp8_token_group", "fp8_token", "fp8_tensor_dynamic", "fp8_tensor_static",
                             "int8_token", "fp8_token_group_fused"}
    assert covered == {f.name for f in dataclasses.fields(NumericsProfile)}



def test_the_lora_rank_intermediate_is_stored_to_s_under_its_profile():
    # LoRA's shrink result rounded to S before the expand dot (vLLM's fused_moe_lora kernels): the
    # mirror's output moves, exact's does not, and without LoRA the field changes nothing
    from moe_validate.inputs import make_inputs
    from moe_validate.matrix import Case

    inputs = make_inputs(Case.from_id("bf16-none-silu-lora_single-M7N64K64E4k2-s22"))
    stored = _one_change(lora_rank_intermediate=WeightPrecision.STORAGE)
    run = lambda precision, profile: reference.fused_experts(*inputs.args(), **inputs.kwargs(),  # noqa: E731
                                                             precision=precision, profile=profile)
    assert not torch.equal(run("mirror", stored), run("mirror", SPEC_PROFILE))
    assert torch.equal(run("exact", stored), run("exact", SPEC_PROFILE))
    plain = make_inputs(Case.from_id("bf16-none-silu-M7N64K64E4k2-s0"))
    assert torch.equal(reference.fused_experts(*plain.args(), **plain.kwargs(), precision="mirror", profile=stored),
                       reference.fused_experts(*plain.args(), **plain.kwargs(), precision="mirror"))
