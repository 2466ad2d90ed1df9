"""Seeded inputs: determinism, routing construction, scales, LoRA, distributions."""

from __future__ import annotations

import math

import pytest
import torch

from moe_validate.matrix import AXES, Case, suite_cases
from moe_validate.contract.spec import FP8_MAX, MoEInputs, QuantScheme

pytest.importorskip("reference", reason="quantized inputs use reference.quantize_weights")

from moe_validate.inputs import HUGE_EXPERT_ID, STATIC_SCALE_HEADROOM, make_inputs  # noqa: E402

BASE = dict(M=9, N=64, K=64, E=4, topk=2)


def _tensors(inputs: MoEInputs):
    """Every tensor of an inputs object, by a stable name (quant and lora included)."""
    out = {}

    def add(name, v):
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                add(f"{name}[{i}]", x)

    for f in ("hidden_states", "w1", "w2", "topk_weights", "topk_ids", "expert_map"):
        add(f, getattr(inputs, f))
    for obj, prefix in ((inputs.quant, "quant"), (inputs.lora, "lora")):
        if obj is not None:
            for k, v in vars(obj).items():
                add(f"{prefix}.{k}", v)
    return out


def _same(a: MoEInputs, b: MoEInputs) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and torch.equal(ta[k].view(torch.uint8) if ta[k].dtype.itemsize == 1 else ta[k], tb[k].view(torch.uint8) if tb[k].dtype.itemsize == 1 else tb[k])
        for k in ta)


SCHEME_CASES = [Case(**BASE, scheme=s, group_size=32 if s == "int4_w4a16" else None, seed=i)
                for i, s in enumerate(AXES["scheme"])]


@pytest.mark.parametrize("case", SCHEME_CASES + [Case(**BASE, lora="dual", bias=True, clamp=7.0, seed=3),
                                                 Case(**BASE, expert_map="half", routing="invalid_ids", seed=4)],
                         ids=lambda c: c.id)
def test_deterministic_per_seed_and_different_across_seeds(case):
    a, b = make_inputs(case), make_inputs(case)
    assert _same(a, b)
    other = make_inputs(Case(**{**case.params(), "seed": case.seed + 1000}))
    assert not torch.equal(a.hidden_states, other.hidden_states)
    assert not torch.equal(a.topk_ids, other.topk_ids) or not torch.equal(a.topk_weights, other.topk_weights)


@pytest.mark.parametrize("case", SCHEME_CASES, ids=lambda c: c.id)
def test_shapes_dtypes_and_scales_follow_the_spec(case):
    x = make_inputs(case)
    scheme = case.quant
    E, N, K, I = case.local_experts, case.N, case.K, case.I
    assert x.hidden_states.shape == (case.M, K) and x.hidden_states.dtype == torch.bfloat16
    assert x.topk_weights.dtype == torch.float32 and x.topk_ids.dtype == torch.int32
    if scheme is QuantScheme.NONE:
        assert x.w1.shape == (E, N, K) and x.w1.dtype == torch.bfloat16 and x.quant is None
        return
    q = x.quant
    assert q.scheme is scheme and x.w1.dtype == scheme.weight_dtype
    if scheme is QuantScheme.INT4_W4A16:
        assert x.w1.shape == (E, N, K // 2) and q.w1_scale.shape == (E, N, K // 32)
        assert q.w2_scale.shape == (E, K, I // 32) and q.group_size == 32
    elif scheme is QuantScheme.FP8_BLOCK128:
        assert q.w1_scale.shape == (E, 1, 1) and q.w2_scale.shape == (E, 1, 1)
    elif scheme.weight_granularity == "channel":
        assert q.w1_scale.shape == (E, N) and q.w2_scale.shape == (E, K)
    else:
        assert q.w1_scale.numel() == E
    if scheme.needs_static_act_scales:
        amax = float(x.hidden_states.float().abs().max())
        assert float(q.a1_scale) == pytest.approx(amax * STATIC_SCALE_HEADROOM / FP8_MAX, rel=1e-6)
        assert q.a2_scale.numel() == 1 and float(q.a2_scale) > 0
    else:
        assert q.a1_scale is None and q.a2_scale is None


def test_outputs_are_order_one():
    # w1 ~ 1/sqrt(K), w2 ~ 1/sqrt(I): GEMM outputs of unit variance, whatever the shape
    import reference

    for K, N in ((64, 64), (1024, 512)):
        case = Case(M=64, N=N, K=K, E=4, topk=2, seed=1)
        x = make_inputs(case)
        st = reference.run_stages(*x.args(), **x.kwargs(), precision="exact")
        c1 = st["c1"][st["route_valid"]]
        assert 0.7 < float(c1.std()) < 1.4, (K, float(c1.std()))
        assert 0.05 < float(st["out"].abs().mean()) < 2.0


@pytest.mark.parametrize("routing", ["uniform", "skewed", "one_expert", "empty_experts", "invalid_ids"])
def test_no_topk_ties_unless_asked(routing):
    case = Case(M=64, N=64, K=64, E=8, topk=3, routing=routing, seed=11)
    x = make_inputs(case)
    w, ids = x.topk_weights, x.topk_ids
    # weights strictly decreasing along the slots, so no two slots tie
    assert bool((w[:, :-1] > w[:, 1:]).all())
    assert bool((w > 0).all()) and bool((w.sum(1) < 1).all())  # softmax over all E, not renormalized
    ok = (ids >= 0) & (ids < case.E)
    for row, okr in zip(ids.tolist(), ok.tolist()):
        valid = [e for e, o in zip(row, okr) if o]
        assert len(valid) == len(set(valid)), row  # distinct experts per token


def test_ties_routing_has_ties():
    x = make_inputs(Case(M=16, N=64, K=64, E=8, topk=3, routing="ties", seed=2))
    assert torch.equal(x.topk_weights[:, 0:1].expand(-1, 3), x.topk_weights)


def test_routing_distributions():
    E = 16
    counts = lambda x: torch.bincount(x.topk_ids.long().view(-1), minlength=E)  # noqa: E731
    uni = counts(make_inputs(Case(M=400, N=64, K=64, E=E, topk=2, seed=1)))
    skew = counts(make_inputs(Case(M=400, N=64, K=64, E=E, topk=2, routing="skewed", seed=1)))
    assert skew.max() > 2 * uni.max()  # hot experts
    one = make_inputs(Case(M=50, N=64, K=64, E=E, topk=2, routing="one_expert", seed=1))
    assert len(set(one.topk_ids[:, 0].tolist())) == 1
    empty = counts(make_inputs(Case(M=400, N=64, K=64, E=E, topk=2, routing="empty_experts", seed=1)))
    assert int((empty == 0).sum()) == E // 2
    bad = make_inputs(Case(M=40, N=64, K=64, E=E, topk=2, routing="invalid_ids", seed=1)).topk_ids
    assert {-1, E, HUGE_EXPERT_ID} <= set(bad.view(-1).tolist())
    assert bool(((bad < 0) | (bad >= E)).all(1).any())  # some token has no valid route at all


def test_expert_map_half():
    case = Case(M=16, N=64, K=64, E=8, topk=2, expert_map="half", seed=5)
    x = make_inputs(case)
    emap = x.expert_map
    assert x.w1.shape[0] == 4 and x.global_num_experts == 8 and emap.shape == (8,)
    assert sorted(emap[emap >= 0].tolist()) == [0, 1, 2, 3] and int((emap == -1).sum()) == 4


def test_router_on_input_weights_are_not_one():
    x = make_inputs(Case(M=16, N=64, K=64, E=8, topk=1, router_on_input=True, seed=5))
    assert x.apply_router_weight_on_input and bool((x.topk_weights < 0.95).all())


def test_lora_adapters():
    x = make_inputs(Case(M=9, N=64, K=64, E=4, topk=2, lora="dual", seed=2))
    lora = x.lora
    assert lora.stream == "dual" and len(lora.w13_slices) == 2  # gated, even seed: gate/up slices
    assert lora.enabled.tolist() == [True, False, True]
    ids = lora.token_lora_ids
    assert ids.dtype == torch.int32 and -1 in ids.tolist() and 0 in ids.tolist()
    r = lora.w2_a.shape[2]
    assert r & (r - 1), "rank is deliberately not a power of two"
    single = make_inputs(Case(M=9, N=64, K=64, E=4, topk=2, lora="single", seed=3)).lora
    assert single.stream == "single" and len(single.w13_slices) == 1


def test_data_distributions():
    out = make_inputs(Case(M=32, N=64, K=64, E=4, topk=2, data="outliers", seed=1)).hidden_states.float()
    base = make_inputs(Case(M=32, N=64, K=64, E=4, topk=2, seed=1)).hidden_states.float()
    assert float(out.abs().max()) > 10 * float(base.abs().max()) / 2
    z = make_inputs(Case(M=32, N=64, K=64, E=4, topk=2, data="zero_blocks", seed=1)).hidden_states
    assert bool((z == 0).all(1).any()) and bool((z == 0).all(0).any())
    pos = make_inputs(Case(M=32, N=64, K=64, E=4, topk=2, data="positive", seed=1)).hidden_states
    assert bool((pos >= 0).all())


def test_bias_clamp_and_dtypes():
    x = make_inputs(Case(M=4, N=64, K=64, E=4, topk=2, bias=True, clamp=7.0, dtype="fp16", seed=1))
    assert x.quant.w1_bias.shape == (4, 64) and x.quant.w2_bias.shape == (4, 64)
    assert x.quant.gemm1_clamp_limit == 7.0 and x.hidden_states.dtype == torch.float16
    assert make_inputs(Case(M=4, N=64, K=64, E=4, topk=2, dtype="fp32")).w1.dtype == torch.float32


def test_empty_batch():
    x = make_inputs(Case(M=0, N=64, K=64, E=4, topk=2))
    assert x.hidden_states.shape == (0, 64) and x.topk_ids.shape == (0, 2)


def test_every_smoke_case_builds():
    for case in suite_cases("smoke"):
        x = make_inputs(case)
        assert x.hidden_states.shape == (case.M, case.K)


def test_bad_arguments():
    with pytest.raises(TypeError, match="case must be"):
        make_inputs("bf16-none-silu-M1N2K2E1k1-s0")
    with pytest.raises(ValueError, match="invalid: router_on_input needs topk=1"):
        make_inputs(Case(M=1, N=64, K=64, E=4, topk=2, router_on_input=True))


def test_value_scale_is_documented():
    import moe_validate.inputs as mod

    assert "O(1)" in mod.__doc__ and "1/K" in mod.__doc__ and math.isfinite(STATIC_SCALE_HEADROOM)
