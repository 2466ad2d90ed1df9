"""The case matrix: ids, validity rules, suites, pairwise coverage, filters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_validate.matrix import (
    AXES,
    INTERPRETER_COST_LIMIT,
    SUITES,
    Case,
    case_pairs,
    default_suite,
    feasible_pairs,
    filter_cases,
    interpreter_cost,
    suite_cases,
)
from moe_validate.contract.spec import Activation, QuantScheme

BASE = dict(M=8, N=64, K=64, E=4, topk=2)


# --- ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_case_id_round_trips_and_is_valid(suite):
    cases = suite_cases(suite)
    assert cases, suite
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "suite ids must be unique"
    for c in cases:
        assert Case.from_id(c.id) == c
        assert c.is_valid() == (True, ""), c.id


def test_id_is_readable_with_extra_tokens_only_for_non_defaults():
    assert Case(**BASE).id == "bf16-none-silu-M8N64K64E4k2-s0"
    c = Case(M=33, N=256, K=128, E=8, topk=1, scheme="int4_w4a16", lora="dual", config="inv",
             expert_map="half", router_on_input=True, bias=True, clamp=7.0, routing="skewed",
             data="outliers", group_size=64, seed=7)
    assert c.id == ("bf16-int4_w4a16-silu-lora_dual-M33N256K128E8k1-cfg_inv-map_half-rwin-bias-clamp7"
                    "-rt_skewed-d_outliers-g64-s7")
    assert Case.from_id(c.id) == c


case_strategy = st.builds(
    Case,
    M=st.integers(0, 5000), N=st.integers(1, 9000), K=st.integers(1, 9000), E=st.integers(1, 300),
    topk=st.integers(1, 16), dtype=st.sampled_from(AXES["dtype"]), scheme=st.sampled_from(AXES["scheme"]),
    activation=st.sampled_from(AXES["activation"]), lora=st.sampled_from(AXES["lora"]),
    config=st.sampled_from(AXES["config"]), expert_map=st.sampled_from(AXES["expert_map"]),
    router_on_input=st.booleans(), bias=st.booleans(),
    clamp=st.one_of(st.none(), st.sampled_from([0.5, 7.0, 10.25, 1000.0])),
    routing=st.sampled_from(AXES["routing"]), group_size=st.sampled_from(AXES["group_size"]),
    seed=st.integers(0, 10**9), data=st.sampled_from(AXES["data"]),
)


@settings(max_examples=300, deadline=None)
@given(case_strategy)
def test_any_case_id_round_trips(case):
    # valid or not, every combination of axis values spells an id that parses back to itself
    assert Case.from_id(case.id) == case


@pytest.mark.parametrize("bad, match", [
    ("", "non-empty"),
    ("bf16-none-silu", "must look like"),
    ("bf17-none-silu-M1N2K3E4k1-s0", "dtype token"),
    ("bf16-fp9-silu-M1N2K3E4k1-s0", "scheme token"),
    ("bf16-none-swish-M1N2K3E4k1-s0", "activation token"),
    ("bf16-none-silu-M1N2K3E4-s0", "shape token"),
    ("bf16-none-silu-M1N2K3E4k1-x", "seed token"),
    ("bf16-none-silu-M1N2K3E4k1-wat-s0", "unknown token 'wat'"),
    ("bf16-none-silu-M1N2K3E4k1-clampx-s0", "clamp token"),
    ("bf16-none-silu-M1N2K3E4k1-bias-rwin-s0", "not canonical"),
])
def test_from_id_rejects_malformed_ids_with_a_clear_message(bad, match):
    with pytest.raises(ValueError, match=match):
        Case.from_id(bad)


# --- validity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, reason", [
    (dict(router_on_input=True), "router_on_input needs topk=1"),
    (dict(clamp=7.0, activation="gelu"), "clamp applies to silu only"),
    (dict(scheme="int4_w4a16"), "int4_w4a16 needs group_size"),
    (dict(scheme="int4_w4a16", group_size=128), "must divide K=64 and I=32"),
    (dict(group_size=32), "group_size applies to int4_w4a16 only"),
    (dict(dtype="fp32", scheme="fp8_block128"), "fp32 storage is specified for scheme none only"),
    (dict(dtype="fp32", scheme="int8_w8a16"), "fp32 storage"),
    (dict(N=63), "needs an even N"),
    (dict(N=63, activation="swigluoai"), "needs an even N"),
    (dict(topk=5), "topk must be <= E"),
    (dict(scheme="fp8_block128", config="BM16BN32BK256GM1W4S2"), "BLOCK_K dividing 128"),
    (dict(config="BM12BN32BK32GM1W4S2"), "power of two"),
    (dict(scheme="int4_w4a16", group_size=32, config="BM64BN64BK64GM8W4S3"), "BLOCK_K dividing group_size 32"),
    (dict(config="fast"), "config must be auto, inv"),
    (dict(expert_map="half", E=3, topk=1), "even E"),
    (dict(routing="empty_experts", E=3), "E >= 2*topk"),
    (dict(routing="sideways"), "routing must be one of"),
    (dict(M=-1), "M must be >= 0"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(scheme="fp4"), "quant.scheme must be one of"),
])
def test_invalid_combinations_have_reasons(kw, reason):
    ok, why = Case(**{**BASE, **kw}).is_valid()
    assert not ok and reason in why, why


@pytest.mark.parametrize("kw", [
    dict(N=63, activation="silu_no_mul"),  # no_mul: N = I, any parity
    dict(router_on_input=True, topk=1),
    dict(clamp=7.0),
    dict(scheme="int4_w4a16", group_size=32),
    dict(dtype="fp32"),
    dict(M=0),
    dict(E=1, topk=1),
    dict(lora="dual", scheme="fp8_block128"),  # LoRA uses the unquantized activations: any scheme
])
def test_valid_combinations(kw):
    assert Case(**{**BASE, **kw}).is_valid() == (True, "")


def test_device_skips_carry_reasons():
    fp8 = Case(**BASE, scheme="fp8_block128")
    assert "sm89" in fp8.device_skip_reason((8, 0), interpreting=False)
    assert fp8.device_skip_reason((9, 0), interpreting=False) is None
    assert fp8.device_skip_reason(None, interpreting=True) is None  # interpreter: exact fp8 casts
    i8 = Case(**BASE, scheme="int8_channel_token")
    assert "sm75" in i8.device_skip_reason((7, 0), interpreting=False)
    assert i8.device_skip_reason((7, 5), interpreting=False) is None
    assert "CUDA GPU" in Case(**BASE).device_skip_reason(None, interpreting=False)
    huge = Case(M=8192, N=1024, K=1024, E=8, topk=2)
    assert "interpreter" in huge.device_skip_reason(None, interpreting=True)
    small_k = Case(**BASE, scheme="fp8_channel_token", config="BM16BN32BK16GM1W4S2")
    assert "BLOCK_K >= 32" in small_k.device_skip_reason((9, 0), interpreting=False)


# --- suites ------------------------------------------------------------------------------------
def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(ValueError, match="smoke, premerge, nightly, bringup"):
        suite_cases("weekly")


def test_default_suite():
    assert default_suite(False) == "smoke" and default_suite(True) == "premerge"


def _values_covered(cases, axis):
    return {getattr(c, axis) for c in cases}


@pytest.mark.parametrize("suite", ["smoke", "premerge", "nightly", "bringup"])
def test_every_axis_value_appears_in_every_suite(suite):
    cases = suite_cases(suite)
    for axis, values in AXES.items():
        assert set(values) <= _values_covered(cases, axis), (suite, axis, set(values) - _values_covered(cases, axis))


def test_smoke_is_tiny_and_cheap_for_the_interpreter():
    cases = suite_cases("smoke")
    assert 60 <= len(cases) <= 120
    big = [c.id for c in cases if not (c.M <= 9 and c.N <= 64 and c.K <= 64 and c.E <= 4)]
    # the exceptions: int4 with group 128 needs K and I of 128; fp8 block scales need more than one
    # 128-block per expert along N and K for a wrong block-scale index to read a different scale;
    # the tiny-M naive path with topk 3 (and after dropping a token) needs E >= 4 * M * topk;
    # fp8 gate and up rows in different 128-row scale blocks need I = 128; GROUP_M's partial group
    # of real tiles needs the naive path (E >= 4 * M * topk)
    assert sorted(big) == sorted(["bf16-int4_w4a16-gelu_no_mul-M3N128K128E2k1-g128-s102",
                                  "bf16-fp8_block128-silu-M5N320K256E4k2-s4",
                                  "fp32-none-silu-M3N32K32E40k3-invar_perm+sub-s191",
                                  "bf16-fp8_block128-gelu-M3N256K64E2k1-s202",
                                  "bf16-none-silu-M3N64K64E16k1-cfg_BM16BN32BK32GM4W4S2-s203"]), big
    assert all(c.device_skip_reason(None, interpreting=True) is None for c in cases)
    # Time proxy: total MACs over the suite. ~7e6 MACs take well under a minute of interpreter
    # time on one core at the kernels' tile sizes; the 4-minute CI budget allows ~10x that.
    total = sum(interpreter_cost(c) for c in cases)
    assert total < 2e7, total
    assert max(interpreter_cost(c) for c in cases) < INTERPRETER_COST_LIMIT / 10


def test_premerge_and_nightly_sizes():
    assert 40 <= len(suite_cases("premerge")) <= 100
    assert 100 <= len(suite_cases("nightly")) <= 400
    ids = {c.id for c in suite_cases("nightly")}
    assert {c.id for c in suite_cases("premerge")} <= ids
    assert ids <= {c.id for c in suite_cases("bringup")}


def test_bringup_has_the_edge_shapes():
    shapes = {(c.M, c.N, c.K, c.E, c.topk) for c in suite_cases("bringup")}
    ks = {s[2] for s in shapes}
    es = {s[3] for s in shapes}
    assert 511 in ks  # odd K
    assert 1 in es and any(e % 32 and e > 32 for e in es)  # E=1, E not a multiple of 32
    assert any(s[4] == s[3] and s[3] > 1 for s in shapes)  # topk = E
    assert {0, 1} <= {s[0] for s in shapes} and max(s[0] for s in shapes) >= 8192  # M=0, 1, huge


def test_nightly_covers_every_feasible_pair_of_axis_values():
    nightly = suite_cases("nightly")
    base = Case(M=80, N=512, K=384, E=16, topk=2)
    feasible, impossible = feasible_pairs(base, AXES)
    covered = set().union(*(case_pairs(c, AXES) for c in nightly))
    missing = feasible - covered
    assert not missing, sorted(missing, key=str)[:10]
    # every pair left out is impossible for a stated rule, and no rule-free pair is left out
    assert impossible and all(isinstance(r, str) and r for r in impossible.values())
    for (a, va), (b, vb) in impossible:
        assert Case(**{**BASE, a: va, b: vb}).is_valid()[0] is False or a == "group_size" or b == "group_size"
    total = sum(len(AXES[a]) * len(AXES[b]) for i, a in enumerate(AXES) for b in list(AXES)[i + 1:])
    assert len(feasible) + len(impossible) == total


def test_pairwise_generator_is_much_smaller_than_the_cross_product():
    from moe_validate.matrix import pairwise_cases

    base = Case(M=80, N=512, K=384, E=16, topk=2)
    cases = pairwise_cases(base, AXES, seed0=0)
    assert len(cases) < 150  # the largest pair table alone has 9 x 9 = 81 cells
    assert pairwise_cases(base, AXES, seed0=0) == cases  # deterministic


# --- filters -----------------------------------------------------------------------------------
def test_filter_by_axis_glob_and_id():
    cases = suite_cases("smoke")
    fp8 = filter_cases(cases, "scheme=fp8_block128")
    assert fp8 and all(c.scheme == "fp8_block128" for c in fp8)
    assert filter_cases(cases, "scheme=fp8_*,activation=silu") == [
        c for c in cases if c.scheme.startswith("fp8_") and c.activation == "silu"]
    assert all("lora_dual" in c.id for c in filter_cases(cases, "*lora_dual*"))
    assert filter_cases(cases, "lora_dual") == filter_cases(cases, "*lora_dual*")
    assert all(c.bias for c in filter_cases(cases, "bias=true"))
    assert all(c.M == 0 for c in filter_cases(cases, "M=0"))
    assert all(c.clamp is None for c in filter_cases(cases, "clamp=none"))
    assert filter_cases(cases, "") == cases


def test_filter_rejects_unknown_axis():
    with pytest.raises(ValueError, match="filter axis must be one of .*'precision'"):
        filter_cases(suite_cases("smoke"), "precision=fp8")


def test_filter_with_or_not_and_parentheses():
    cases = suite_cases("smoke")
    fp8_or_not_fp32 = filter_cases(cases, "scheme=fp8_block128 or not dtype=fp32")
    assert fp8_or_not_fp32 == [c for c in cases if c.scheme == "fp8_block128" or c.dtype != "fp32"]
    assert filter_cases(cases, "dtype!=fp32") == filter_cases(cases, "not dtype=fp32") == [
        c for c in cases if c.dtype != "fp32"]
    grouped = filter_cases(cases, "(scheme=fp8_block128 or scheme=int4_w4a16) and not bias=true")
    assert grouped and grouped == [c for c in cases if c.scheme in ("fp8_block128", "int4_w4a16") and not c.bias]
    # precedence: not > and > or > comma
    assert filter_cases(cases, "dtype=fp32 or dtype=fp16 and bias=true") == [
        c for c in cases if c.dtype == "fp32" or (c.dtype == "fp16" and c.bias)]
    assert filter_cases(cases, "activation=silu, dtype=fp32 or dtype=fp16") == [
        c for c in cases if c.activation == "silu" and c.dtype in ("fp32", "fp16")]
    assert filter_cases(cases, "scheme = fp8_block128, ") == filter_cases(cases, "scheme=fp8_block128")  # old spellings
    assert filter_cases(cases, "NOT (lora_dual)") == [c for c in cases if "lora_dual" not in c.id]


@pytest.mark.parametrize("expr, needle", [
    ("scheme=fp8_block128 or", "malformed filter 'scheme=fp8_block128 or': expected a term at the end"),
    ("(dtype=fp32", "expected ')' at the end"),
    ("dtype=fp32)", "unexpected term at ')'"),
    ("not", "expected a term at the end"),
    ("dtype=fp32 bias=true", "unexpected term at 'bias=true'"),
    ("1x=2", "a term with '=' must be axis=value"),
    ("precision=fp8 or dtype=fp32", "filter axis must be one of M, N, K, E, topk, dtype, scheme"),
    ("scheme=fp9", "filter value for scheme must be one of none, fp8_block128, fp8_channel_token"),
    ("scheme=fp9_*", "got 'fp9_*' in filter term 'scheme=fp9_*'"),
    ("dtype=fp64", "filter value for dtype must be one of fp32, fp16, bf16"),
    ("M=many", "filter value for M must be an integer; got 'many'"),
    ("group_size=big", "filter value for group_size must be an integer or none"),
    ("bias=maybe", "filter value for bias must be one of true, false"),
    ("clamp=high", "filter value for clamp must be a number or none"),
])
def test_malformed_filters_say_what_is_valid(expr, needle):
    with pytest.raises(ValueError) as err:
        filter_cases([], expr)
    assert needle in str(err.value)
    if str(err.value).startswith("malformed"):
        assert "axes: M, N, K, E" in str(err.value)


def test_params_are_json_scalars():
    import json

    for c in suite_cases("smoke")[:20]:
        p = c.params()
        assert json.loads(json.dumps(p)) == p
        assert Case(**p) == c


def test_enums_and_strings_agree():
    assert set(AXES["scheme"]) == {s.value for s in QuantScheme}
    assert set(AXES["activation"]) == {a.value for a in Activation}
