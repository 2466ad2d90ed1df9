"""Whole-pipeline properties of the reference (SPEC.md, Pipeline, LoRA, Invariances, Tolerances)."""

import math

import pytest
import torch

import reference
from moe_validate.contract.spec import LoRASpec, QuantConfig, QuantScheme
from reference.pipeline import STAGE_KEYS

FP32_U = 2.0 ** -24


def _problem(seed, M=6, K=32, I=16, E=4, topk=2, dtype=torch.bfloat16, gated=True):
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    x = torch.randn(M, K, generator=g).to(dtype)
    w1 = (torch.randn(E, N, K, generator=g) / math.sqrt(K)).to(dtype)
    w2 = (torch.randn(E, K, I, generator=g) / math.sqrt(I)).to(dtype)
    topk_weights = torch.rand(M, topk, generator=g)
    topk_ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(M)])
    return x, w1, w2, topk_weights, topk_ids


def _quantized_problem(scheme, seed=0, M=6, K=128, I=64, E=3, topk=2):
    x, w1, w2, tw, ids = _problem(seed, M=M, K=K, I=I, E=E, topk=topk)
    scheme = QuantScheme(scheme)
    if scheme is QuantScheme.NONE:
        return x, w1, w2, tw, ids, QuantConfig()
    group = 32 if scheme is QuantScheme.INT4_W4A16 else None
    w1_q, s1, z1 = reference.quantize_weights(w1, scheme, group_size=group)
    w2_q, s2, z2 = reference.quantize_weights(w2, scheme, group_size=group)
    extra = {}
    if scheme.needs_static_act_scales:
        extra = dict(a1_scale=torch.tensor(4.0 / 448), a2_scale=torch.tensor([1.0 / 448]))
    return x, w1_q, w2_q, tw, ids, QuantConfig(scheme, w1_scale=s1, w2_scale=s2, group_size=group, **extra)


def test_stage_keys_shapes_and_dtypes():
    x, w1, w2, tw, ids = _problem(0, M=5, K=32, I=16, E=4, topk=3)
    ids[1, 2] = -1
    stages = reference.run_stages(x, w1, w2, tw, ids)
    assert tuple(stages) == STAGE_KEYS
    shapes = {"x": (5, 32), "route_valid": (5, 3), "route_expert": (5, 3), "w1": (4, 32, 32), "w2": (4, 32, 16),
              "c1": (5, 3, 32), "c2": (5, 3, 16), "c2_in": (5, 3, 16), "c3": (5, 3, 32), "out": (5, 32)}
    for key, shape in shapes.items():
        assert tuple(stages[key].shape) == shape, key
    assert stages["route_valid"].dtype == torch.bool and stages["route_expert"].dtype == torch.int64
    assert all(stages[k].dtype == torch.float64 for k in shapes if not k.startswith("route"))
    assert stages["route_expert"][1, 2] == -1 and not stages["route_valid"][1, 2]
    for key in ("c1", "c2", "c2_in", "c3"):
        assert not stages[key][1, 2].any(), key
    assert torch.equal(reference.fused_experts(x, w1, w2, tw, ids, out_dtype=torch.float32),
                       stages["out"].to(torch.float32))


def test_dense_mlp_identity_computed_independently():
    """topk = 1 and one expert: the layer is a dense gated MLP; recompute it token by token."""
    x, w1, w2, tw, ids = _problem(1, M=4, K=16, I=8, E=1, topk=1, dtype=torch.float32)
    b1, b2 = torch.randn(1, 16), torch.randn(1, 16).to(torch.bfloat16)
    out = reference.fused_experts(x, w1, w2, tw, ids, quant=QuantConfig(w1_bias=b1, w2_bias=b2))
    X, W1, W2 = x.double().tolist(), w1[0].double().tolist(), w2[0].double().tolist()
    for m in range(4):
        h = [sum(W1[n][k] * X[m][k] for k in range(16)) + b1[0, n].item() for n in range(16)]
        a = [h[i] / (1.0 + math.exp(-h[i])) * h[8 + i] for i in range(8)]
        y = [(sum(W2[k][i] * a[i] for i in range(8)) + float(b2[0, k])) * tw[m, 0].item() for k in range(16)]
        # 16-term float64 dots in two orders: |diff| <= 2 * 16 * 2^-53 * sum|terms|; 1e-12 abs covers it
        torch.testing.assert_close(out[m], torch.tensor(y, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_linear_in_router_weights():
    x, w1, w2, tw, ids = _problem(2)
    quant = QuantConfig(w2_bias=torch.randn(4, 32))
    # Weights on a 2^-10 grid in [0, 1): their fp32 sums are exact, so only float64 rounding remains.
    tw = torch.floor(tw * 1024) / 1024
    other = torch.floor(torch.rand_like(tw) * 1024) / 1024
    base = reference.fused_experts(x, w1, w2, tw, ids, quant=quant)
    # Scaling by a power of two is exact in float64: bitwise.
    assert torch.equal(reference.fused_experts(x, w1, w2, 4.0 * tw, ids, quant=quant), 4.0 * base)
    summed = reference.fused_experts(x, w1, w2, tw + other, ids, quant=quant)
    separate = base + reference.fused_experts(x, w1, w2, other, ids, quant=quant)
    # Per slot c3 = unit_j * w_j (one float64 rounding each), then two or three float64 adds:
    # |diff| <= 8 * 2^-53 * sum_j w_j |unit_j| with unit_j the slot's output at weight 1.
    unit = reference.run_stages(x, w1, w2, torch.ones_like(tw), ids, quant=quant)["c3"]
    magnitude = ((tw + other).double().unsqueeze(2) * unit.abs()).sum(1)
    assert bool(((summed - separate).abs() <= 8 * 2.0 ** -53 * magnitude).all())
    assert not torch.equal(summed, base)


@pytest.mark.parametrize("precision", ["exact", "mirror"])
def test_expert_map_split_sums_to_full(precision):
    """Two ranks holding experts {0, 1} and {2, 3}: with topk 2 each token's sum has at most two
    terms, so the per-rank outputs add up to the full output bit for bit in exact mode."""
    x, w1, w2, tw, ids = _problem(3, E=4, topk=2, dtype=torch.float32)
    full = reference.fused_experts(x, w1, w2, tw, ids, precision=precision)
    maps = [torch.tensor([0, 1, -1, -1]), torch.tensor([-1, -1, 0, 1])]
    parts = [reference.fused_experts(x, w1[2 * r:2 * r + 2], w2[2 * r:2 * r + 2], tw, ids, expert_map=maps[r],
                                     global_num_experts=4, precision=precision) for r in range(2)]
    if precision == "exact":
        assert torch.equal(parts[0] + parts[1], full)
    else:  # the full output adds the two terms in fp32 and rounds once; the split adds fp32-rounded parts
        torch.testing.assert_close(parts[0] + parts[1], full, rtol=2 * FP32_U, atol=0)


def test_invalid_routes_give_exact_zeros():
    x, w1, w2, tw, ids = _problem(4, E=4, topk=2)
    quant = QuantConfig(w1_bias=torch.ones(4, 32), w2_bias=torch.ones(4, 32))
    emap = torch.tensor([0, 1, -1, 2, 3, -1])  # global ids 2 and 5 are not local
    ids[0] = torch.tensor([-1, -7])
    ids[1] = torch.tensor([6, 2**31 - 1])  # >= global_num_experts
    ids[2] = torch.tensor([2, 5])  # not local
    ids[3] = torch.tensor([2, 0])  # one valid route
    for precision in ("exact", "mirror"):
        stages = reference.run_stages(x, w1, w2, tw, ids.to(torch.int32), quant=quant, expert_map=emap,
                                      global_num_experts=6, precision=precision)
        assert torch.equal(stages["out"][:3], torch.zeros(3, 32, dtype=torch.float64))
        assert stages["route_valid"][3].tolist() == [False, True]
        assert torch.equal(stages["out"][3], stages["c3"][3, 1])  # a single term passes through unchanged


def test_huge_ids_are_bound_checked():
    x, w1, w2, tw, ids = _problem(5, E=4, topk=2)
    ids = ids.to(torch.int64)
    huge = ids.clone()
    huge[:, 1] = torch.tensor([2**62, 2**40, 4, 2**31, -2**62, 10**15])
    reference_ids = ids.clone()
    reference_ids[:, 1] = -1
    assert torch.equal(reference.fused_experts(x, w1, w2, tw, huge), reference.fused_experts(x, w1, w2, tw, reference_ids))


@pytest.mark.parametrize("scheme", [s.value for s in QuantScheme])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_do_not_leak_into_other_tokens(scheme, bad):
    """Token 0 poisoned with NaN / Inf; all other tokens bit-identical to token 0 being zeros.

    Zeros (not a clean copy) because a per-tensor dynamic scale must ignore the bad token's
    values: only then is any other token unaffected.
    """
    if scheme == "fp8_tensor_dynamic" and math.isinf(bad):
        pytest.skip("Inf saturates to the largest fp8 code (SPEC: conversion saturates), so the bad token "
                    "becomes a large finite activation that legitimately sets the batch-wide GEMM2 scale; "
                    "reported as a SPEC conflict. NaN is checked for this scheme.")
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    clean = x.clone()
    clean[0] = 0
    for precision in ("exact", "mirror"):
        expected = reference.fused_experts(clean, w1, w2, tw, ids, quant=quant, precision=precision)
        poisoned = clean.clone()
        poisoned[0, ::3] = bad
        got = reference.fused_experts(poisoned, w1, w2, tw, ids, quant=quant, precision=precision)
        assert torch.equal(got[1:], expected[1:]), precision
        if math.isnan(bad):
            assert torch.isnan(got[0]).any()  # the bad token itself stays visibly bad


def test_inputs_are_not_mutated():
    x, w1, w2, tw, ids, quant = _quantized_problem("fp8_block128")
    lora = _lora(x.shape[0], K=128, N=128, I=64, E=3, L=2, seed=0)
    before = [t.clone() for t in (x, w1, w2, tw, ids, quant.w1_scale, quant.w2_scale, lora.w13_a, lora.w2_b)]
    reference.run_stages(x, w1, w2, tw, ids, quant=quant, lora=lora, precision="mirror")
    after = (x, w1, w2, tw, ids, quant.w1_scale, quant.w2_scale, lora.w13_a, lora.w2_b)
    for b, a in zip(before, after):
        assert torch.equal(b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
                           a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a)


def test_router_weight_on_input_matches_prescaled_input():
    """x = round_S(x * w) before quantization, then no weight in GEMM2 (mirror: product in fp32)."""
    x, w1, w2, tw, ids = _problem(6, topk=1)
    on_input = reference.fused_experts(x, w1, w2, tw, ids, apply_router_weight_on_input=True, precision="mirror")
    prescaled = (x.float() * tw).to(torch.bfloat16)
    ones = torch.ones_like(tw)
    assert torch.equal(on_input, reference.fused_experts(prescaled, w1, w2, ones, ids, precision="mirror"))
    exact = reference.run_stages(x, w1, w2, tw, ids, apply_router_weight_on_input=True)
    assert torch.equal(exact["x"], x.double() * tw.double())


@pytest.mark.parametrize("dtype, u", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)], ids=["bf16", "fp16"])
def test_mirror_within_budget_of_exact(dtype, u):
    """Mirror vs exact, silu, scheme none: a first-order bound, elementwise.

    Mirror rounds c1, c2, c3 and out to S (relative unit roundoff u: bf16 2^-8, fp16 2^-11; the
    values here stay far from fp16's subnormal and overflow ranges) and evaluates silu in fp32.
      e1 = |c1_m - c1_e| <= u |c1_e|                         (one rounding, asserted exactly)
      e2 <= |d act/d gate| e1_g + |d act/d up| e1_u + u |c2_m| + 8 * 2^-24 |c2_e|
            with |d(silu(g) u)/dg| <= 1.1 |u| and |d/du| = |silu(g)|, plus the e1_g e1_u term
      e3 <= |w| * sum_i |w2_ki| e2_i + u |c3_m|
      e_out <= sum_j e3_j + topk 2^-24 sum_j |c3_j| + u |out_m|
    The test asserts the observed error is inside the bound and that the bound is not vacuous
    (median bound below 4u in units of the magnitude sum |w||w2||c2|, the scale s_ij of SPEC.md's
    Tolerances: the budget measures real format units, not a blanket).
    """
    x, w1, w2, tw, ids = _problem(7, M=16, K=64, I=32, E=4, topk=2, dtype=dtype)
    ex = reference.run_stages(x, w1, w2, tw, ids, precision="exact")
    mi = reference.run_stages(x, w1, w2, tw, ids, precision="mirror")
    e1 = (mi["c1"] - ex["c1"]).abs()
    assert bool((e1 <= u * ex["c1"].abs()).all())
    I = 32
    gate, up = ex["c1"][..., :I], ex["c1"][..., I:]
    eg, eu = e1[..., :I], e1[..., I:]
    silu_g = gate * torch.sigmoid(gate)
    e2 = 1.1 * up.abs() * eg + silu_g.abs() * eu + 1.1 * eg * eu + u * mi["c2"].abs() + 8 * FP32_U * ex["c2"].abs()
    assert bool(((mi["c2"] - ex["c2"]).abs() <= e2).all())
    valid = ex["route_valid"]
    local = ex["route_expert"].clamp_min(0)
    w2_abs = ex["w2"].abs()[local]  # [M, topk, K, I]
    e3 = tw.double().abs().unsqueeze(2) * torch.einsum("mjki,mji->mjk", w2_abs, e2) + u * mi["c3"].abs()
    e3 = torch.where(valid.unsqueeze(2), e3, torch.zeros_like(e3))
    assert bool(((mi["c3"] - ex["c3"]).abs() <= e3).all())
    e_out = e3.sum(1) + 2 * FP32_U * mi["c3"].abs().sum(1) + u * mi["out"].abs()
    err = (mi["out"] - ex["out"]).abs()
    assert bool((err <= e_out).all())
    assert err.max() > 0
    # Not vacuous: in units of the magnitude sum_j |w_j| sum_i |w2_ki| |c2_ji| the bound is a few u.
    magnitude = (tw.double().abs().unsqueeze(2) * torch.einsum("mjki,mji->mjk", w2_abs, ex["c2"].abs())).sum(1)
    assert (e_out / magnitude).median() < 4 * u


def test_fused_silu_fp8_block_path_skips_the_bf16_rounding_of_c2():
    x, w1, w2, tw, ids, quant = _quantized_problem("fp8_block128")
    mi = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")
    assert not torch.equal(mi["c2"], mi["c2"].to(torch.bfloat16).double())  # fp32 activation kept
    quant.gemm1_clamp_limit = 100.0  # a clamp disables the fused path
    clamped = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")
    assert torch.equal(clamped["c2"], clamped["c2"].to(torch.bfloat16).double())


def test_tensor_dynamic_gemm2_scale_spans_all_valid_routes():
    """The per-tensor GEMM2 scale is one scale over all valid routes of all experts, never per
    expert: every valid row of c2_in lies on the fp8 grid of that one scale, and the largest
    |c2| anywhere maps to code 448."""
    x, w1, w2, tw, ids, quant = _quantized_problem("fp8_tensor_dynamic")
    ids[0, 1] = -1  # an invalid route must not take part
    stages = reference.run_stages(x, w1, w2, tw, ids, quant=quant)
    valid = stages["route_valid"]
    c2 = stages["c2"][valid]
    s = (torch.tensor(c2.abs().max().item(), dtype=torch.float32) / torch.tensor(448.0)).item()
    codes = stages["c2_in"][valid] / s
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).double())
    assert codes.abs().max() == 448
    assert len(set(stages["route_expert"][valid].tolist())) == 3  # the rows span every expert


# --- LoRA ----------------------------------------------------------------------------------------
def _lora(M, K, N, I, E, L, seed, rank=3, two_slices=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (0.3 * torch.randn(*s, generator=g)).to(torch.bfloat16)
    if two_slices:
        w13_a, w13_b = (rnd(L, E, rank, K), rnd(L, E, rank, K)), (rnd(L, E, N // 2, rank), rnd(L, E, N // 2, rank))
    else:
        w13_a, w13_b = rnd(L, E, rank, K), rnd(L, E, N, rank)
    ids = torch.arange(M, dtype=torch.int32) % (L + 1) - 1  # -1, 0, 1, ..., L-1, -1, ...
    return LoRASpec(w13_a, w13_b, rnd(L, E, rank, I), rnd(L, E, K, rank), ids)


def test_lora_hand_case_rank_one():
    """One token, one expert, rank 1: d13 = (x . a) b and d2 = (c2 . a2) b2 * w, exact mode."""
    x = torch.tensor([[1.0, 2.0]])
    w1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # c1 = x, relu2_no_mul: N = I = 2
    w2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    lora = LoRASpec(w13_a=torch.tensor([[[[0.5, 0.25]]]]), w13_b=torch.tensor([[[[2.0], [-4.0]]]]),
                    w2_a=torch.tensor([[[[1.0, 1.0]]]]), w2_b=torch.tensor([[[[0.5], [0.0]]]]),
                    token_lora_ids=torch.tensor([0], dtype=torch.int32))
    stages = reference.run_stages(x, w1, w2, torch.tensor([[0.5]]), torch.tensor([[0]]),
                                  activation="relu2_no_mul", lora=lora)
    # x . a = 0.5 + 0.5 = 1; d13 = [2, -4]; c1 = [1 + 2, 2 - 4] = [3, -2]; c2 = [9, 0]
    assert stages["c1"][0, 0].tolist() == [3.0, -2.0] and stages["c2"][0, 0].tolist() == [9.0, 0.0]
    # c3 base = 0.5 * [9, 0]; d2 = (9 + 0) * [0.5, 0] * 0.5 = [2.25, 0]; c3 = [6.75, 0]
    assert stages["out"][0].tolist() == [6.75, 0.0]
    on_input = reference.run_stages(x, w1, w2, torch.tensor([[0.5]]), torch.tensor([[0]]), activation="relu2_no_mul",
                                    lora=lora, apply_router_weight_on_input=True)
    # x = [0.5, 1]; x . a = 0.5; d13 = [1, -2]; c1 = [1.5, -1]; c2 = [2.25, 0]; no weight in GEMM2 / d2:
    # c3 = [2.25, 0] + 2.25 * [0.5, 0] = [3.375, 0]
    assert on_input["out"][0].tolist() == [3.375, 0.0]


def test_lora_two_slices_swigluoai_interleave():
    """Slice 0 lands on even rows of c1 and slice 1 on odd rows for swigluoai; halves otherwise."""
    M, K, I, E, L = 3, 8, 4, 2, 2
    x, w1, w2, tw, ids = _problem(8, M=M, K=K, I=I, E=E, topk=1)
    lora = _lora(M, K, 2 * I, I, E, L, seed=1, two_slices=True)
    lora.token_lora_ids = torch.tensor([0, 1, 0], dtype=torch.int32)
    for activation, place in (("swigluoai", lambda d: (slice(0, None, 2), slice(1, None, 2))),
                              ("silu", lambda d: (slice(0, I), slice(I, 2 * I)))):
        base = reference.run_stages(x, w1, w2, tw, ids, activation=activation)["c1"]
        with_lora = reference.run_stages(x, w1, w2, tw, ids, activation=activation, lora=lora)["c1"]
        rows0, rows1 = place(None)
        for m in range(M):
            l, e = int(lora.token_lora_ids[m]), int(ids[m, 0])
            xm = x[m].double()
            d0 = (xm @ lora.w13_a[0][l, e].double().T) @ lora.w13_b[0][l, e].double().T
            d1 = (xm @ lora.w13_a[1][l, e].double().T) @ lora.w13_b[1][l, e].double().T
            delta = with_lora[m, 0] - base[m, 0]
            torch.testing.assert_close(delta[rows0], d0, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(delta[rows1], d1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["exact", "mirror"])
@pytest.mark.parametrize("scheme", ["none", "int8_w8a16", "fp8_channel_token", "fp8_block128"])
@pytest.mark.parametrize("how", ["all_ids_minus_one", "all_disabled"])
def test_lora_disabled_equals_no_lora_bitwise(scheme, how, precision):
    if scheme == "fp8_block128" and precision == "mirror":
        pytest.skip("SPEC conflict, reported: with silu + fp8_block128 the fused path (c2 not rounded to S) "
                    "is specified for 'no LoRA' only, so a LoRA object with every adapter off takes the "
                    "unfused path and differs from lora=None by the bf16 rounding of c2")
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    lora = _lora(x.shape[0], K=128, N=128, I=64, E=3, L=2, seed=2)
    if how == "all_ids_minus_one":
        lora.token_lora_ids = torch.full_like(lora.token_lora_ids, -1)
    else:
        lora.enabled = torch.zeros(2, dtype=torch.bool)
    plain = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision=precision)
    with_lora = reference.run_stages(x, w1, w2, tw, ids, quant=quant, lora=lora, precision=precision)
    for key in STAGE_KEYS:
        assert torch.equal(plain[key], with_lora[key]), key


@pytest.mark.parametrize("scheme", [s.value for s in QuantScheme])
def test_mirror_values_are_storage_representable(scheme):
    """Mirror rounds where the pipeline stores: c1, c2 (not on the fused path), c3 and out are
    bf16 values; exact mode is not (it would be a useless accuracy reference otherwise)."""
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    mi = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="mirror")
    keys = ["c1", "c3", "out"] + ([] if scheme == "fp8_block128" else ["c2"])
    for key in keys:
        assert torch.equal(mi[key], mi[key].to(torch.bfloat16).double()), key
    ex = reference.run_stages(x, w1, w2, tw, ids, quant=quant, precision="exact")
    assert not torch.equal(ex["out"], ex["out"].to(torch.bfloat16).double())
    assert torch.equal(reference.fused_experts(x, w1, w2, tw, ids, quant=quant, precision="mirror",
                                               out_dtype=torch.bfloat16).double(), mi["out"])


def test_lora_stream_mode_does_not_change_the_reference():
    x, w1, w2, tw, ids = _problem(9, K=32, I=16, E=4)
    lora = _lora(x.shape[0], K=32, N=32, I=16, E=4, L=2, seed=3)
    single = reference.fused_experts(x, w1, w2, tw, ids, lora=lora, precision="mirror")
    lora.stream = "dual"
    assert torch.equal(single, reference.fused_experts(x, w1, w2, tw, ids, lora=lora, precision="mirror"))
    assert not torch.equal(single, reference.fused_experts(x, w1, w2, tw, ids, precision="mirror"))


def test_lora_ids_out_of_range_are_refused():
    x, w1, w2, tw, ids = _problem(10, K=32, I=16, E=4)
    lora = _lora(x.shape[0], K=32, N=32, I=16, E=4, L=2, seed=4)
    lora.token_lora_ids[0] = 2
    with pytest.raises(ValueError, match="lora.token_lora_ids"):
        reference.fused_experts(x, w1, w2, tw, ids, lora=lora)


def test_expert_map_values_out_of_range_are_refused():
    x, w1, w2, tw, ids = _problem(11, E=2, topk=1)
    with pytest.raises(ValueError, match="expert_map"):
        reference.fused_experts(x, w1, w2, tw, ids, expert_map=torch.tensor([0, 2, -1]), global_num_experts=3)


def test_unknown_precision_is_refused():
    x, w1, w2, tw, ids = _problem(12)
    with pytest.raises(ValueError, match="precision"):
        reference.fused_experts(x, w1, w2, tw, ids, precision="fast")


def test_lora_per_token_ids_disabled_adapters_and_mirror_rounding():
    """Tokens at -1 or on a disabled adapter keep the base c1 bit for bit; the others get
    c1 = round_S(c1 + round_S(d13)) exactly as SPEC.md writes it (mirror, bf16)."""
    M, K, I, E, L = 6, 32, 16, 4, 2
    x, w1, w2, tw, ids = _problem(13, M=M, K=K, I=I, E=E, topk=2)
    lora = _lora(M, K, 2 * I, I, E, L, seed=5)
    lora.token_lora_ids = torch.tensor([0, 1, -1, 0, 1, -1], dtype=torch.int32)
    lora.enabled = torch.tensor([True, False])
    base = reference.run_stages(x, w1, w2, tw, ids, precision="mirror")
    got = reference.run_stages(x, w1, w2, tw, ids, lora=lora, precision="mirror")
    bf16 = lambda t: t.to(torch.bfloat16).double()
    for m in range(M):
        if int(lora.token_lora_ids[m]) != 0:
            assert torch.equal(got["c1"][m], base["c1"][m]), m
            continue
        for j in range(2):
            e = int(ids[m, j])
            d13 = (x[m].double() @ lora.w13_a[0, e].double().T) @ lora.w13_b[0, e].double().T
            assert torch.equal(got["c1"][m, j], bf16(base["c1"][m, j] + bf16(d13)))


@pytest.mark.parametrize("scheme", ["none", "fp8_tensor_dynamic", "fp8_block128"])
def test_empty_batch(scheme):
    x, w1, w2, tw, ids, quant = _quantized_problem(scheme)
    for precision in ("exact", "mirror"):
        out = reference.fused_experts(x[:0], w1, w2, tw[:0], ids[:0], quant=quant, precision=precision)
        assert out.shape == (0, 128)
