"""``plan_grouped_gemm``: what one grouped-GEMM launch will do, checked without launching it
(CPU tensors, no interpreter needed): the modes a scheme maps to, the grid of each variant, and
the argument errors, which name the argument."""

import pytest
import torch

from kernels.configs import KernelConfig
from kernels.grouped_gemm import plan_grouped_gemm
from moe_validate.contract.spec import QuantScheme

CFG = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)
BN256 = KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)
M, K, N, E, TOPK = 3, 128, 192, 4, 2
R = M * TOPK


def _routing(naive: bool, block_m: int = 16):
    route_expert = torch.zeros(R, dtype=torch.int32)
    if naive:
        return dict(sorted_route_ids=None, expert_ids=None, num_post_padded=None, route_expert=route_expert,
                    naive=True, num_routes=R)
    padded = 4 * block_m  # any multiple of BLOCK_M: the plan only counts its tiles
    return dict(sorted_route_ids=torch.zeros(padded, dtype=torch.int32), expert_ids=torch.zeros(4, dtype=torch.int32),
                num_post_padded=torch.zeros(1, dtype=torch.int32), route_expert=route_expert, naive=False,
                num_routes=R)


def _gemm1(scheme=QuantScheme.NONE, *, naive=False, config=CFG, c=None, **kw):
    a = torch.zeros(M, K, dtype=torch.bfloat16)
    b = torch.zeros(E, N, K, dtype=torch.bfloat16)
    c = torch.zeros(R, N, dtype=torch.bfloat16) if c is None else c
    return plan_grouped_gemm(a, b, c, scheme=scheme, config=config, top_k_div=TOPK, **_routing(naive), **kw)


def test_plain_gemm1_aligned():
    plan = _gemm1()
    assert plan.launches and (plan.N, plan.K, plan.num_routes) == (N, K, R)
    assert plan.grid == (4 * 3,)  # 4 route tiles x cdiv(192, 64) column tiles
    cx = plan.constexprs
    assert (cx["WEIGHT_FORMAT"], cx["A_SCALE"], cx["B_SCALE"]) == ("float", "none", "none")
    assert (cx["NAIVE"], cx["TOPK_SUM"], cx["TOP_K"], cx["ACTIVATION"], cx["GATE_UP"]) == (False, False, 1, "", "none")
    assert cx["BLOCK_N"] == 64 and cx["C1_DTYPE"] is not None


def test_naive_grid_is_one_tile_per_route():
    assert _gemm1(naive=True).grid == (R * 3,)


def test_fused_gated_activation_halves_the_columns():
    c2 = torch.zeros(R, N // 2, dtype=torch.bfloat16)
    plan = _gemm1(activation="silu", c=c2)
    assert plan.N == N // 2 and plan.constexprs["GATE_UP"] == "split" and plan.constexprs["ACTIVATION"] == "silu"
    assert plan.grid == (4 * 3,)  # 96 c2 columns in tiles of BLOCK_N // 2 = 32
    interleaved = _gemm1(activation="swigluoai", c=c2)
    assert interleaved.constexprs["GATE_UP"] == "interleaved"


def test_clamp_is_a_runtime_value_behind_a_constexpr_switch():
    c2 = torch.zeros(R, N // 2, dtype=torch.bfloat16)
    plan = _gemm1(activation="silu", c=c2, clamp_limit=7.0)
    assert plan.clamp_limit == 7.0 and plan.constexprs["HAS_CLAMP"] is True
    assert _gemm1().clamp_limit == 0.0 and _gemm1().constexprs["HAS_CLAMP"] is False


@pytest.mark.parametrize("scheme, a_mode, b_mode, flat", [
    (QuantScheme.FP8_BLOCK128, "row_group", "block", False),
    (QuantScheme.FP8_CHANNEL_TOKEN, "row", "channel", False),
    (QuantScheme.FP8_TENSOR_STATIC, "tensor", "tensor", True),
])
def test_scale_modes_follow_the_scheme(scheme, a_mode, b_mode, flat):
    a = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    b = torch.zeros(E, N, K, dtype=torch.float8_e4m3fn)
    c = torch.zeros(R, N, dtype=torch.bfloat16)
    plan = plan_grouped_gemm(a, b, c, scheme=scheme, config=CFG, top_k_div=TOPK, a_scale=torch.ones(1),
                             b_scale=torch.ones(1), **_routing(False))
    assert (plan.constexprs["WEIGHT_FORMAT"], plan.constexprs["A_SCALE"], plan.constexprs["B_SCALE"]) == (
        "fp8", a_mode, b_mode)
    assert plan.flat_b_scale is flat


def test_int4_groups():
    a = torch.zeros(M, K, dtype=torch.bfloat16)
    b = torch.zeros(E, N, K // 2, dtype=torch.uint8)
    c = torch.zeros(R, N, dtype=torch.bfloat16)
    plan = plan_grouped_gemm(a, b, c, scheme=QuantScheme.INT4_W4A16, config=CFG, top_k_div=TOPK, group_size=64,
                             b_scale=torch.ones(1), **_routing(False))
    assert (plan.constexprs["WEIGHT_FORMAT"], plan.constexprs["B_SCALE"], plan.constexprs["GROUP_K"]) == (
        "int4", "group", 64)


def test_fused_fp8_group_quantization_needs_block_n_256():
    codes = torch.zeros(R, N // 2, dtype=torch.float8_e4m3fn)
    scales = torch.zeros(R, 1, dtype=torch.float32)
    plan = _gemm1(activation="silu", c=codes, c_scale=scales, c1_dtype=torch.bfloat16, config=BN256)
    assert plan.constexprs["FP8_GROUP_QUANT"] is True and plan.constexprs["QUANT_GROUPS"] == 1
    with pytest.raises(ValueError, match="c_scale .*BLOCK_N"):
        _gemm1(activation="silu", c=codes, c_scale=scales, c1_dtype=torch.bfloat16)


def test_topk_sum_grid_is_one_program_per_token_and_column_tile():
    a = torch.zeros(R, K, dtype=torch.bfloat16)
    b = torch.zeros(E, N, K, dtype=torch.bfloat16)
    out = torch.zeros(M, N, dtype=torch.bfloat16)
    plan = plan_grouped_gemm(a, b, out, scheme=QuantScheme.NONE, config=CFG, top_k_div=1, topk_sum=TOPK,
                             route_weight=torch.ones(R), **_routing(True))
    assert plan.grid == (M * 3,)
    assert (plan.constexprs["TOPK_SUM"], plan.constexprs["TOP_K"], plan.constexprs["MUL_ROUTE_WEIGHT"]) == (
        True, TOPK, True)
    with pytest.raises(ValueError, match="naive path"):
        plan_grouped_gemm(a, b, out, scheme=QuantScheme.NONE, config=CFG, top_k_div=1, topk_sum=TOPK,
                          **_routing(False))


def test_nothing_to_launch_without_routes_or_columns():
    a = torch.zeros(0, K, dtype=torch.bfloat16)
    b = torch.zeros(E, N, K, dtype=torch.bfloat16)
    c = torch.zeros(0, N, dtype=torch.bfloat16)
    plan = plan_grouped_gemm(a, b, c, scheme=QuantScheme.NONE, config=CFG, top_k_div=TOPK, sorted_route_ids=None,
                             expert_ids=None, num_post_padded=None, route_expert=torch.zeros(0, dtype=torch.int32),
                             naive=True, num_routes=0)
    assert not plan.launches


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="c must have 192 columns"):
        _gemm1(c=torch.zeros(R, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="route_weight"):
        _gemm1(activation="silu", c=torch.zeros(R, N // 2, dtype=torch.bfloat16), route_weight=torch.ones(R))
    with pytest.raises(ValueError, match="clamp_limit"):
        _gemm1(clamp_limit=1.0)
