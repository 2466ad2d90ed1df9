"""The comparison engine: metric panel pinned with hand-made tensors, and sensitivity.

Sensitivity: the correct pipeline emulated with fp32 accumulation (a kernel stand-in that
differs from the mirror only by accumulation precision/order) PASSES the gate for every scheme
and activation on small shapes; planted bugs FAIL.

The kernel emulation reuses the reference's own stage functions (routing, input preparation,
LoRA, activation, requantization, combine) and replaces only its float64 GEMMs by fp32 GEMMs
accumulated per K tile in reverse order: exactly the freedom SPEC.md leaves a kernel.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_validate.matrix import Case
from moe_validate.contract.spec import Activation, QuantScheme

F64 = torch.float64


# =================================================================================================
# The kernel emulation: the reference's own stages with fp32, K-blocked GEMMs
# =================================================================================================
reference = pytest.importorskip("reference", reason="the comparison engine needs the float64 reference")
from reference import pipeline as ref_pipeline  # noqa: E402
from moe_validate.contract.checks import validate_call  # noqa: E402
from moe_validate.contract.rules import fused_silu_fp8_group  # noqa: E402

EMULATED_BLOCK_K = 32  # K tile of the emulated kernel; tiles are summed last-to-first


def _gemm_fp32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [R, Kin] @ w[N, Kin].T accumulated in fp32 per K tile, in reverse tile order: the same
    values as the reference's float64 GEMM up to fp32 accumulation precision and order."""
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32)
    for k0 in reversed(range(0, a.shape[1], EMULATED_BLOCK_K)):
        acc += a[:, k0:k0 + EMULATED_BLOCK_K].float() @ w[:, k0:k0 + EMULATED_BLOCK_K].float().T
    return acc.to(F64)


def _grouped(a_rows_of, w, bias, valid, local, round_S, scale_rows=None):
    M, topk = valid.shape
    out = torch.zeros(M * topk, w.shape[1], dtype=F64)
    for e in range(w.shape[0]):
        routes = torch.nonzero((valid & (local == e)).reshape(-1)).reshape(-1)
        if routes.numel() == 0:
            continue
        acc = _gemm_fp32(a_rows_of(routes), w[e])
        if bias is not None:
            acc = acc + bias[e]
        if scale_rows is not None:
            acc = acc * scale_rows[routes].unsqueeze(1)
        out[routes] = round_S(acc)
    return out.reshape(M, topk, w.shape[1])


def kernel_emulation(inputs, store_c1_unrounded=False):
    """The SPEC pipeline as a correct kernel computes it: the reference's mirror stages, except
    that both grouped GEMMs accumulate in fp32 over K tiles in a different order. Returns [M, K]
    in the storage dtype S. ``store_c1_unrounded`` plants a subtle bug: c1 kept in fp32 instead of
    rounded to S (SPEC step 6)."""
    kw = inputs.kwargs()
    shape = validate_call(*inputs.args(), **kw)
    q = shape.quant
    S = shape.storage_dtype
    round_S = ref_pipeline.storage_rounder(S, "mirror")
    valid, local = ref_pipeline.route(inputs.topk_ids, shape.E, shape.global_num_experts, inputs.expert_map)
    x, x_unq = ref_pipeline.prepare_input(inputs.hidden_states, inputs.topk_weights, shape,
                                          apply_router_weight_on_input=inputs.apply_router_weight_on_input,
                                          a1q_scale=None, precision="mirror")
    w1_f = reference.dequantize_weights(inputs.w1, q.w1_scale, shape.scheme, zp=q.w1_zp, group_size=q.group_size)
    w2_f = reference.dequantize_weights(inputs.w2, q.w2_scale, shape.scheme, zp=q.w2_zp, group_size=q.group_size)
    bias = lambda b: None if b is None else b.to(torch.float32).to(F64)  # noqa: E731
    topk = valid.shape[1]
    round_c1 = (lambda t: t.float().double()) if store_c1_unrounded else round_S  # noqa: E731
    c1 = _grouped(lambda r: x[r // topk], w1_f, bias(q.w1_bias), valid, local, round_c1)
    c1 = ref_pipeline.lora_w13(c1, x_unq, inputs.lora, valid, local, shape.activation, round_S)
    fused = fused_silu_fp8_group(shape.activation, shape.scheme, q.gemm1_clamp_limit, inputs.lora is not None)
    c2 = ref_pipeline.activation_stage(c1, valid, shape.activation, q.gemm1_clamp_limit, round_S,
                                       precision="mirror", fused=fused)
    c2_in = ref_pipeline.requantize(c2, valid, shape.scheme, q.a2_scale)
    flat_in = c2_in.reshape(-1, c2_in.shape[-1])
    w = None if inputs.apply_router_weight_on_input else inputs.topk_weights.to(F64).reshape(-1)
    c3 = _grouped(lambda r: flat_in[r], w2_f, bias(q.w2_bias), valid, local, round_S, scale_rows=w)
    c3 = ref_pipeline.lora_w2(c3, c2, inputs.lora, inputs.topk_weights, valid, local, round_S,
                              apply_router_weight_on_input=inputs.apply_router_weight_on_input)
    return ref_pipeline.combine(c3, valid, S, precision="mirror").to(S)


# =================================================================================================
# Tests
# =================================================================================================
from moe_validate.compare import Evaluation, evaluate, metric_panel, passes  # noqa: E402
from moe_validate.inputs import make_inputs  # noqa: E402


def _small(scheme, activation="silu", **kw):
    g = 32 if scheme == "int4_w4a16" else None
    base = dict(M=6, N=64, K=64, E=3, topk=2, scheme=scheme, activation=activation, group_size=g, seed=3)
    base.update(kw)
    return Case(**base)


SENSITIVITY_CASES = (
    [_small(s) for s in QuantScheme._value2member_map_]
    + [_small("none", a.value, seed=10 + i) for i, a in enumerate(Activation)]
    + [_small("fp8_block128", a.value, seed=20 + i) for i, a in enumerate(Activation)]
    + [_small("none", dtype="fp16", bias=True, lora="single", seed=31),
       _small("none", dtype="fp32", seed=32),
       _small("int8_channel_token", bias=True, clamp=7.0, seed=33),
       _small("fp8_tensor_dynamic", routing="invalid_ids", seed=34),
       _small("none", topk=1, router_on_input=True, expert_map="half", E=4, seed=35)]
)

@pytest.mark.parametrize("case", SENSITIVITY_CASES, ids=lambda c: c.id)
def test_correct_fp32_pipeline_passes(case):
    inputs = make_inputs(case)
    ev = evaluate(case, inputs, kernel_emulation(inputs))
    assert ev.passed, ev.message()
    assert ev.worst_margin is not None and ev.worst_margin < 1.0
    print(f"{case.id}: worst gate margin {ev.worst_margin:.3f}; budget margin {ev.metrics['exact']['max_normalized']['margin']:.3f}")


def _plant(case, bug):
    inputs = make_inputs(case)
    q = inputs.quant
    if bug == "dropped_router_weight":
        inputs_bug = replace(inputs, topk_weights=torch.ones_like(inputs.topk_weights))
        return inputs, kernel_emulation(inputs_bug)
    if bug == "skipped_bias":
        q2 = replace(q, w1_bias=torch.zeros_like(q.w1_bias))
        return inputs, kernel_emulation(replace(inputs, quant=q2))
    if bug == "swapped_gate_up":
        N = inputs.w1.shape[1]
        w1 = torch.cat((inputs.w1[:, N // 2:], inputs.w1[:, : N // 2]), 1)
        return inputs, kernel_emulation(replace(inputs, w1=w1))
    if bug == "k_mask_off_by_one":
        x = inputs.hidden_states.clone()
        x[:, -1] = 0  # the last K column masked out
        return inputs, kernel_emulation(replace(inputs, hidden_states=x))
    if bug == "wrong_block_scale_index":
        q2 = replace(q, w1_scale=q.w1_scale.roll(1, dims=1))  # N-block index off by one
        return inputs, kernel_emulation(replace(inputs, quant=q2))
    if bug == "unwritten_tile":
        out = kernel_emulation(inputs).clone()
        out[0:4, 0:16] = float("nan")
        return inputs, out
    raise AssertionError(bug)


PLANTED = [
    ("dropped_router_weight", _small("none", seed=40)),
    ("dropped_router_weight", _small("fp8_block128", seed=41)),
    ("skipped_bias", _small("none", bias=True, seed=42)),
    ("skipped_bias", _small("int8_w8a16", bias=True, seed=43)),
    ("swapped_gate_up", _small("none", seed=44)),
    ("swapped_gate_up", _small("fp8_channel_token", "gelu", seed=45)),
    ("k_mask_off_by_one", _small("none", seed=46)),
    ("k_mask_off_by_one", _small("fp8_tensor_token", seed=47)),
    ("wrong_block_scale_index", _small("fp8_block128", N=512, K=128, seed=48)),
    ("unwritten_tile", _small("none", seed=49)),
]


@pytest.mark.parametrize("bug,case", PLANTED, ids=[f"{b}-{c.id}" for b, c in PLANTED])
def test_planted_bug_fails(bug, case):
    inputs, out = _plant(case, bug)
    ev = evaluate(case, inputs, out)
    assert not ev.passed, f"planted bug {bug} passed: {ev.worst_margin}"
    assert ev.reason and ("max_normalized" in ev.reason or "NaN/Inf" in ev.reason), ev.reason
    assert ev.detail is not None and "heatmap" in ev.detail and "per_expert" in ev.detail
    msg = ev.message()
    assert msg.startswith(f"{case.id}:"), msg


# --- the engine on hand-made tensors ---------------------------------------------------------------
def _panel(kernel, ref, allowed, sigma=None, **kw):
    kernel = torch.tensor(kernel, dtype=torch.float32)
    ref = torch.tensor(ref, dtype=F64)
    allowed = torch.tensor(allowed, dtype=F64).expand_as(ref)
    sigma = allowed / 4 if sigma is None else torch.tensor(sigma, dtype=F64).expand_as(ref)
    return metric_panel(kernel, ref, allowed, sigma, storage=torch.float32, **kw)


def test_panel_exact_match_has_zero_errors_and_passes():
    p = _panel([[1.0, 2.0], [3.0, -4.0]], [[1.0, 2.0], [3.0, -4.0]], 1e-3)
    assert p["max_abs"]["value"] == 0 and p["exceed_count"] == 0
    assert p["cosine"]["value"] == pytest.approx(1.0)
    assert p["norm_ratio"]["value"] == pytest.approx(1.0)
    assert passes(p)[0]


def test_panel_counts_exceeds_and_names_worst_element():
    k = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]
    r = [[1.0, 2.0, 3.0], [4.0, 5.1, 6.0]]
    p = _panel(k, r, 0.2, token_expert=torch.tensor([7, 9]))
    assert p["exceed_count"] == 1 and p["exceed_fraction"] == pytest.approx(1 / 6)
    w = p["worst"][0]
    assert (w["token"], w["column"], w["expert"]) == (1, 2, 9)
    assert w["kernel"] == 6.5 and w["reference"] == 6.0 and w["diff"] == pytest.approx(0.5)
    assert p["max_abs"]["value"] == pytest.approx(0.5)
    assert p["max_normalized"]["margin"] == pytest.approx(2.5)
    ok, why = passes(p)
    assert not ok and "max_normalized" in why and "0.5" in why


def test_panel_nan_census_and_nan_where_reference_finite_fails():
    k = [[float("nan"), 1.0], [float("inf"), 2.0]]
    r = [[0.0, 1.0], [1.0, 2.0]]
    p = _panel(k, r, 1.0)
    assert p["nan_inf"] == {"kernel_nan": 1, "kernel_inf": 1, "ref_nan": 0, "ref_inf": 0}
    ok, why = passes(p)
    assert not ok and "NaN" in why


def test_message_anatomy():
    case = Case(M=2, N=4, K=3, E=1, topk=1)
    k = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 9.0]])
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    allowed = torch.full((2, 3), 0.1, dtype=F64)
    ev = Evaluation.from_arrays(case, k, {"mirror": (r, allowed, allowed / 4), "exact": (r, allowed, allowed / 4)})
    msg = ev.message()
    lines = msg.splitlines()
    assert lines[0].startswith(case.id) and "FAIL" in lines[0]
    assert "Mismatched elements: 2 / 6 (33.3%)" in msg
    assert "Greatest absolute difference: 3 at index (1, 2) (up to 0.1 allowed)" in msg
    assert "Greatest relative difference: 0.5 at index (1, 2)" in msg
    assert "NaN/Inf: kernel NaN at 1 element(s) where the reference is finite" in msg
    assert "(0, 2): kernel nan, reference 3" in msg


def test_evaluate_refuses_wrong_output_shape():
    case = _small("none")
    inputs = make_inputs(case)
    with pytest.raises(ValueError, match="out must be"):
        evaluate(case, inputs, torch.zeros(case.M + 1, case.K))


def test_evaluation_record_is_json_ready():
    import json

    case = _small("fp8_block128", seed=5)
    inputs = make_inputs(case)
    ev = evaluate(case, inputs, kernel_emulation(inputs))
    rec = ev.record()
    from moe_validate.results import make_json_safe

    text = json.dumps(make_json_safe(rec), allow_nan=False)
    assert "derivation" in text and "gate" in rec["tolerance"] and "mirror" in rec["metrics"]
    for name in ("max_abs", "rel_frobenius", "cosine", "norm_ratio", "max_normalized", "ulp"):
        assert name in rec["metrics"]["mirror"], name
