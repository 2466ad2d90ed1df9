"""The curated input kinds (matrix.CURATED_ROUTINGS / CURATED_DATAS): each has the one property it
exists for, checked against the reference's own formulas, not against the kernels; and the
comparison that nan_token needs (compare.evaluate leaves the non-finite token's row out)."""

from __future__ import annotations

import pytest
import torch

from moe_validate.contract.profile import CodeRounding, Quantizer
from moe_validate.contract.spec import QUANT_EPS, QuantScheme
from moe_validate.matrix import AXES, CURATED_DATAS, CURATED_ROUTINGS, Case, suite_cases

reference_quant = pytest.importorskip("reference.quant", reason="the quantizer's formula is the reference's")

from moe_validate.inputs import TINY_ROW_FACTOR, make_inputs, tie_scale  # noqa: E402

SHAPE = dict(M=6, N=64, K=64, E=4, topk=2)


# --- strided topk_ids ---------------------------------------------------------------------------
def _devices():
    devices = ["cpu", "meta"]  # meta: the move to another device, without one
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _devices())
def test_strided_ids_are_a_strided_view_of_the_uniform_routing(device):
    case = Case(**SHAPE, routing="strided_ids", seed=213)
    ids = make_inputs(case, device=device).topk_ids
    assert ids.device.type == device and ids.dtype == torch.int32
    assert tuple(ids.shape) == (6, 2) and ids.stride() == (4, 1) and not ids.is_contiguous()
    if device == "meta":
        return
    uniform = make_inputs(Case(**SHAPE, seed=213)).topk_ids
    assert torch.equal(ids.cpu(), uniform)  # the same routing, only its layout differs
    # the columns between the rows hold other valid ids: a flat read is a wrong routing, in range
    wide = torch.as_strided(ids, (6, 4), (4, 1)).cpu()
    assert torch.equal(wide[:, 2:], (uniform + 1) % case.E)
    flat = wide.reshape(-1)[:12].view(6, 2)
    assert not torch.equal(flat, uniform) and int(flat.min()) >= 0 and int(flat.max()) < case.E


def test_tensor_to_would_densify_the_view():
    """Why make_inputs builds the view after the move: Tensor.to copies a non-dense view densely."""
    view = torch.arange(12, dtype=torch.int32).view(6, 2)[:, :1]
    assert view.to("meta").stride() == (1, 1)


# --- tiny_row -----------------------------------------------------------------------------------
def test_tiny_row_is_one_row_between_the_floor_and_a_larger_epsilon():
    case = Case(**SHAPE, scheme="int8_channel_token", activation="silu_no_mul", data="tiny_row", seed=214)
    x = make_inputs(case).hidden_states.float()
    absmax = x.abs().amax(1)
    tiny = absmax < 1e-3
    assert int(tiny.sum()) == 1 and bool((absmax[~tiny] > 0.5).all())
    row_max = float(absmax[tiny])
    assert 100 * QUANT_EPS < row_max < 1e-7 and row_max < 8 * TINY_ROW_FACTOR
    # the reference's quantizer with a floor of 1e-6 instead of 1e-10 gives other codes for that row
    codes, scale = reference_quant.quantize_activation_codes(x, case.quant)
    coarse, coarse_scale = reference_quant.quantize_activation_codes(x, case.quant, quantizer=Quantizer(floor=1e-6))
    assert torch.equal(codes[~tiny], coarse[~tiny]) and not torch.equal(codes[tiny], coarse[tiny])
    assert float(scale[tiny]) == pytest.approx(row_max / 127, rel=1e-6)


# --- quant_ties ---------------------------------------------------------------------------------
TIE_CASES = [
    Case(**SHAPE, scheme="fp8_channel_token", data="quant_ties", seed=215),
    Case(**SHAPE, dtype="fp16", scheme="int8_channel_token", data="quant_ties", seed=216),
    Case(M=3, N=64, K=256, E=4, topk=2, scheme="fp8_block128", data="quant_ties", seed=1),
    Case(**SHAPE, scheme="fp8_tensor_dynamic", data="quant_ties", seed=2),
    Case(**SHAPE, dtype="fp16", scheme="fp8_tensor_token", data="quant_ties", seed=3),
]


def _codes_grid(scheme: QuantScheme) -> torch.Tensor:
    if scheme.act_dtype == torch.int8:
        return torch.arange(128, dtype=torch.float64)
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)


@pytest.mark.parametrize("case", TIE_CASES, ids=lambda c: c.id)
def test_tie_rows_are_exact_ties_of_their_own_dynamic_scale(case):
    scheme = case.quant
    x = make_inputs(case).hidden_states
    codes, scale = reference_quant.quantize_activation_codes(x, scheme)
    s = tie_scale(scheme.act_qmax)
    assert bool((scale == s).all()), scale.unique()  # per token, group or tensor: the same s
    assert float(x.abs().max()) == scheme.act_qmax * s and abs(float(x.float().std()) - 1.0) < 0.5
    grid = _codes_grid(scheme)
    ties = (grid[:-1] + grid[1:]) / 2
    t = x.to(torch.float64).abs() / s  # exact: x and s have few significant bits
    on_tie = torch.isin(t, ties)
    absmax = t == scheme.act_qmax
    assert bool((on_tie | absmax).all()) and int(absmax.sum()) == x.shape[0] * -(-x.shape[1] // 128)
    # SPEC's rne(x / s) breaks every tie to the code with the even last bit
    lower = torch.bucketize(t[on_tie], grid) - 1
    upper = lower + 1
    even = torch.where(upper % 2 == 0, upper, lower)
    assert torch.equal(codes.abs().to(torch.float64)[on_tie], grid[even])
    # and the reciprocal form x * (1 / s) lands on the other code for some of them
    reciprocal, _ = reference_quant.quantize_activation_codes(x, scheme,
                                                              quantizer=Quantizer(codes=CodeRounding.RECIPROCAL_RNE))
    moved = int((reciprocal != codes).sum())
    assert 0 < moved < int(on_tie.sum()), moved


# --- nan_token ----------------------------------------------------------------------------------
NAN_CASE = Case(M=6, N=64, K=63, E=4, topk=2, data="nan_token", seed=218)


def test_nan_token_is_one_later_token_with_nan_and_inf():
    from moe_validate.compare import nonfinite_tokens

    x = make_inputs(NAN_CASE).hidden_states
    bad = nonfinite_tokens(make_inputs(NAN_CASE))
    assert len(bad) == 1 and bad[0] >= 1
    m = bad[0]
    assert bool(torch.isnan(x[m, 0])) and bool(torch.isposinf(x[m, -1])) and bool(torch.isfinite(x[m, 1:-1]).all())
    others = torch.cat([x[:m], x[m + 1:]])
    assert bool(torch.isfinite(others).all())
    assert nonfinite_tokens(make_inputs(Case(M=6, N=64, K=63, E=4, topk=2, seed=218))) == []


def test_static_scales_are_calibrated_on_the_finite_entries():
    q = make_inputs(Case(**SHAPE, scheme="fp8_tensor_static", data="nan_token", seed=5)).quant
    assert torch.isfinite(q.a1_scale).all() and torch.isfinite(q.a2_scale).all() and float(q.a1_scale) > 0


def test_the_comparison_leaves_the_nonfinite_token_out_and_sees_a_leak():
    """The reference's output (the NaN token's own row NaN) with that row overwritten passes, compared
    on the other rows; one NaN in another token's row fails as a leak."""
    from moe_validate.backends import ReferenceBackend
    from moe_validate.compare import evaluate, nonfinite_tokens

    inputs = make_inputs(NAN_CASE)
    (m,) = nonfinite_tokens(inputs)
    out = ReferenceBackend().run(inputs, NAN_CASE)
    assert not torch.isfinite(out[m]).all() and torch.isfinite(torch.cat([out[:m], out[m + 1:]])).all()
    out[m] = 12345.0  # unspecified: anything may be there
    ev = evaluate(NAN_CASE, inputs, out)
    assert ev.passed, ev.reason
    assert ev.compared_rows["rows"] == [r for r in range(6) if r != m] and ev.compared_rows["of"] == 6
    assert f"token(s) [{m}] hold NaN/Inf" in ev.reason
    leaked = out.clone()
    leaked[m - 1, 3] = float("nan")
    bad = evaluate(NAN_CASE, inputs, leaked)
    assert not bad.passed and "kernel NaN/Inf where the reference is finite at 1 element" in bad.reason


@pytest.mark.parametrize("case, rule", [
    (Case(**SHAPE, dtype="fp16", data="tiny_row"), "tiny_row needs bf16 or fp32"),
    (Case(M=1, N=64, K=64, E=4, topk=2, data="nan_token"), "nan_token needs M >= 2"),
    (Case(**SHAPE, scheme="fp8_tensor_dynamic", data="nan_token"), "batch-wide dynamic scale"),
    (Case(**SHAPE, data="quant_ties"), "quant_ties needs a dynamic activation scale"),
    (Case(**SHAPE, scheme="fp8_tensor_static", data="quant_ties"), "quant_ties needs a dynamic activation scale"),
    (Case(**SHAPE, scheme="int8_channel_token", data="quant_ties"), "int8 activations needs fp16 storage"),
    (Case(M=6, N=64, K=64, E=4, topk=1, scheme="fp8_channel_token", router_on_input=True, data="quant_ties"),
     "excludes router_on_input"),
], ids=lambda v: v.id if isinstance(v, Case) else "")
def test_curated_kinds_name_the_rule_a_combination_breaks(case, rule):
    ok, why = case.is_valid()
    assert not ok and rule in why, why


# --- in the matrix ------------------------------------------------------------------------------
def test_curated_values_are_in_smoke_but_not_crossed_by_the_generators():
    smoke = suite_cases("smoke")
    assert set(CURATED_ROUTINGS) <= {c.routing for c in smoke}
    assert set(CURATED_DATAS) <= {c.data for c in smoke}
    assert not set(CURATED_ROUTINGS) & set(AXES["routing"]) and not set(CURATED_DATAS) & set(AXES["data"])
    for case in smoke:
        if case.routing in CURATED_ROUTINGS or case.data in CURATED_DATAS:
            assert Case.from_id(case.id) == case
