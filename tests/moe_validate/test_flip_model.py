"""The gate's flip-aware sigma (``tolerance.flip_aware_sigma``) against measurements.

Three levels, cheapest first: the rounding rule (``round_both``) against a Monte-Carlo of two
roundings of nearby values; the typical fp32 accumulation constants against a blocked fp32 dot
in numpy (the interpreter's ``tl.dot`` is ``np.matmul`` per tile); the whole model, stage by stage,
against the interpreted kernel; and the calibration itself: the pooled gate z RMS of correct
kernels over enough cases to expect hundreds of flips.
"""

import math

import numpy as np
import pytest
import torch

from moe_validate import runner
from moe_validate import tolerance as tol
from moe_validate.calibration import DEFAULT_BAND, MIN_FLIP_EVENTS, calibrate
from moe_validate.matrix import Case
from moe_validate.contract.spec import QuantScheme
from moe_validate.tolerance import U32, acc_error_typical, product_bits, round_both, ulp

GATE_BAND = (0.5, 2.0)  # the "RMS near 1": a factor 2 either way (4x in variance)


# ---------------------------------------------------------------------------------------------
# round_both: two roundings of values a difference D apart
# ---------------------------------------------------------------------------------------------
def _monte_carlo_rounding(D: torch.Tensor, q: float, seed: int = 0):
    """(E[d^2], E|d|, P(d != 0)) of d = round(x + D) - round(x) on the grid q, x uniform in its cell."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(D.shape, generator=g, dtype=torch.float64) + 1000.0) * q
    d = torch.round((x + D) / q) * q - torch.round(x / q) * q
    return float((d ** 2).mean()), float(d.abs().mean()), float((d != 0).double().mean())


@pytest.mark.parametrize("kind, size", [
    ("continuous", 0.05),  # sigma << q: a flip of one step with probability 0.8 sigma / q
    ("continuous", 3.0),  # sigma >> q: the difference survives, plus two rounding errors (q^2 / 6)
    ("jump", 0.3),  # a rare jump smaller than a step: a flip with probability J / q when it happens
    ("jump", 2.5),  # a rare jump of several steps: floor or ceil of 2.5 steps
])
def test_round_both_matches_monte_carlo(kind, size):
    n, q = 2_000_000, 1.0
    g = torch.Generator().manual_seed(1)
    if kind == "continuous":
        sigma = size * q
        D = torch.randn(n, generator=g, dtype=torch.float64) * sigma
        V, A_c, A_d, p_d = sigma ** 2, math.sqrt(2 / math.pi) * sigma, 0.0, 0.0
    else:
        p, J = 0.02, size * q
        hit = torch.rand(n, generator=g, dtype=torch.float64) < p
        sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
        D = torch.where(hit, sign * J, torch.zeros(n, dtype=torch.float64))
        V, A_c, A_d, p_d = p * J ** 2, 0.0, p * J, p
    mc_V, mc_A, mc_p = _monte_carlo_rounding(D, q)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    V2, A2, p2 = (float(v) for v in round_both(t(V), t(A_c), t(A_d), t(p_d), t(q)))
    # E|d| is kept exactly by a rounding (piecewise-linear interpolation of |t| at the integers)
    assert A2 == pytest.approx(mc_A, rel=0.03)
    # h = min(1/6, ...) replaces the exact f (1 - f): within 15% of the Monte-Carlo variance
    assert V2 == pytest.approx(mc_V, rel=0.15)
    assert p2 == pytest.approx(mc_p, rel=0.15) or p2 >= mc_p  # p is never undercounted


# ---------------------------------------------------------------------------------------------
# Typical accumulation error of a blocked fp32 dot (what the interpreter's tl.dot loop computes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, scheme", [(torch.bfloat16, "none"), (torch.float16, "none"),
                                           (torch.float16, "int8_w8a16"), (torch.float16, "int4_w4a16")])
def test_accumulation_constants_match_a_blocked_fp32_dot(dtype, scheme):
    rows, cols, n, block_k = 2048, 2048, 256, 32  # 4M elements: ~40 bf16 flips expected at |c| >= s/4
    g = torch.Generator().manual_seed(2)
    a = torch.randn(rows, n, generator=g).to(dtype).float().numpy()
    if scheme == "none":
        b = (torch.randn(n, cols, generator=g) / math.sqrt(n)).to(dtype).float().numpy()
    else:  # integer weights (their scale is applied after the K loop): int8 codes, int4 minus zero point
        hi = 128 if scheme == "int8_w8a16" else 8
        b = torch.randint(-hi + 1, hi, (n, cols), generator=g).float().numpy()
    acc = np.zeros((rows, cols), np.float32)
    for k0 in range(0, n, block_k):  # acc += dot(tile) in fp32, as the kernel's K loop
        acc = np.matmul(a[:, k0:k0 + block_k], b[k0:k0 + block_k], dtype=np.float32) + acc
    exact = torch.from_numpy(a.astype(np.float64) @ b.astype(np.float64))
    s = torch.from_numpy(np.sqrt((a.astype(np.float64) ** 2) @ (b.astype(np.float64) ** 2)))
    acc64 = torch.from_numpy(acc).double()
    sigma, flip_a = acc_error_typical(n, product_bits(QuantScheme.parse(scheme), dtype))
    if scheme == "none":  # sigma is measured for these two classes (taken as ~2.5 A for the others)
        measured_sigma = float(((acc64 - exact) / s).pow(2).mean().sqrt())
        assert measured_sigma / sigma == pytest.approx(1.0, abs=0.5), (measured_sigma / U32, sigma / U32)
    # flips where |c| >= s / 4 (the variance-carrying elements; tinier results flip less, with tiny steps)
    q = ulp(exact, dtype)
    big = exact.abs() >= s / 4
    flips = int((acc64.to(dtype) != exact.to(dtype))[big].sum())
    expected = float((flip_a * s / q)[big].sum())
    assert expected >= 15, "too few expected flips for a meaningful check"
    assert 0.5 <= flips / expected <= 2.0, (flips, expected)


def test_product_bits_and_accumulation_classes():
    bits = lambda scheme, S: product_bits(QuantScheme.parse(scheme), S)  # noqa: E731
    assert bits("int8_channel_token", torch.bfloat16) is None  # int32 accumulation
    assert acc_error_typical(4096, None) == (0.0, 0.0)
    assert (bits("none", torch.float32), bits("none", torch.float16), bits("none", torch.bfloat16)) == (48, 22, 16)
    assert (bits("fp8_block128", torch.bfloat16), bits("int8_w8a16", torch.float16),
            bits("int4_w4a16", torch.bfloat16)) == (8, 18, 12)
    flip = [acc_error_typical(256, b)[1] for b in (8, 12, 15, 16, 22, 48)]
    assert flip == sorted(flip) and flip[-2] == flip[-1]  # fewer product bits, fewer adds that round
    native = acc_error_typical(64, 8, native_fp8=True)
    assert native[1] == pytest.approx(tol.U_ACC_FP8_NATIVE_TYPICAL * (1 + math.sqrt(64 / 6)))


# ---------------------------------------------------------------------------------------------
# The model against the interpreted kernel, stage by stage
# ---------------------------------------------------------------------------------------------
def _kernel_stages(inputs):
    """(out, c2, c3) of the Triton pipeline, read from its workspaces (TritonExperts.workspace_shapes:
    c3 [R, K] at the start of workspace13 after GEMM2, c2 [R, I] in workspace2)."""
    from kernels.experts import TritonExperts
    from reference.pipeline import validate_call

    kw = inputs.kwargs()
    shape = validate_call(*inputs.args(), **kw)
    experts = TritonExperts(kw.get("quant"))
    ws13, ws2, out_shape = experts.workspace_shapes(shape.M, shape.N, shape.K, shape.topk, shape.global_num_experts,
                                                   shape.E, None, shape.activation)
    S = shape.storage_dtype
    out, w13, w2 = (torch.empty(s, dtype=S) for s in (out_shape, ws13, ws2))
    hidden_states, w1, w2_weights, topk_weights, topk_ids = inputs.args()
    experts.apply(out, hidden_states, w1, w2_weights, topk_weights, topk_ids, shape.activation,
                  shape.global_num_experts, kw.get("expert_map"), kw.get("a1q_scale"), None, w13, w2, None,
                  kw.get("apply_router_weight_on_input", False), lora=kw.get("lora"))
    R = shape.M * shape.topk
    c3 = w13.reshape(-1)[:R * shape.K].reshape(shape.M, shape.topk, shape.K)
    return out, w2.reshape(shape.M, shape.topk, -1), c3


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the interpreter's stages; the GPU's flip rates differ")
def test_flip_counts_per_stage_match_the_interpreted_kernel():
    import reference
    from moe_validate.inputs import make_inputs

    observed = {"c2": 0, "c3": 0}
    expected = {"c2": 0.0, "c3": 0.0}
    var_obs = var_model = 0.0
    for seed in (1, 2, 3):
        case = Case.from_id(f"fp16-none-silu_no_mul-M64N256K256E4k2-cfg_BM64BN64BK64GM8W4S3-s{seed}")
        inputs = make_inputs(case)
        out, c2, c3 = _kernel_stages(inputs)
        mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
        stages = {}
        sigma, _, _ = tol.flip_aware_sigma(inputs, mirror, native_gpu=False, per_stage=stages)
        valid = mirror["route_valid"].bool()
        for name, kernel_value in (("c2", c2), ("c3", c3)):
            observed[name] += int((kernel_value.double() - mirror[name])[valid].ne(0).sum())
            expected[name] += float(stages["p_" + name][valid].sum())
        var_obs += float(((out.double() - mirror["out"]) ** 2).sum())
        var_model += float((sigma ** 2).sum())
    for name in observed:
        assert expected[name] >= 30, f"{name}: too few expected flips for a meaningful check"
        assert 1 / 2.5 <= observed[name] / expected[name] <= 2.5, (name, observed[name], expected[name])
    assert GATE_BAND[0] ** 2 <= var_obs / var_model <= GATE_BAND[1] ** 2, (var_obs, var_model)


# ---------------------------------------------------------------------------------------------
# Calibration: pooled z RMS of correct kernels, gate and budget
# ---------------------------------------------------------------------------------------------
# Unquantized cases in the three storage dtypes, M64 N256 K256 with one 64x64x64 tile config (the
# interpreter runs few, large tiles: ~1 s a case). Expected differing outputs per case (the model's
# flip_events_expected): fp32 all (continuous regime), fp16 ~200, bf16 ~10: the bf16 row pools
# 14 cases over five activations for ~140 expected flips. The gate's RMS is a sum over rare events
# of skewed sizes (a flip at a large value dominates), so the band is the issue's [0.5, 2]. In 16-bit
# storage most differing outputs come in clusters (one c2 flip moves ~25-100 c3 elements), so these
# rows stand on ~10 (fp16) and ~2 (bf16) independent events: calibrate calls them "few flips" and
# does not judge them; the band here is a coarse regression check on fixed seeds, and the fp32 row
# (continuous regime, ~70 events) is the one calibrate judges.
_CFG = "M64N256K256E4k2-cfg_BM64BN64BK64GM8W4S3"
CALIBRATION_CASES = (
    [f"fp32-none-silu-{_CFG}-s{s}" for s in (1, 2)]
    + [f"fp16-none-{act}-{_CFG}-s{s}" for s, act in enumerate(("silu", "gelu", "silu_no_mul", "swigluoai"), 1)]
    + [f"bf16-none-{act}-{_CFG}-s{s}" for s, act in enumerate(
        ("silu", "gelu", "swigluoai", "silu_no_mul", "relu2_no_mul", "gelu_tanh", "swiglustep") * 2, 1)]
)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU interpreter calibration; on a GPU run `moe-validate calibrate` (its flip rates differ)")
def test_gate_and_budget_z_rms_are_calibrated_on_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the derivations are small; threads only fight the xdist workers
    try:
        records = [runner.run_case_inprocess(Case.from_id(cid), "triton", device="cpu").record
                   for cid in CALIBRATION_CASES]
    finally:
        torch.set_num_threads(threads)
    assert [r["outcome"] for r in records] == ["PASS"] * len(records), [r["reason"] for r in records]
    table = calibrate(records)
    assert [(r.scheme, r.dtype) for r in table.rows] == [("none", "fp32"), ("none", "fp16"), ("none", "bf16")]
    for row in table.rows:
        gate, budget = row.oracles["gate"], row.oracles["budget"]
        assert gate.events >= MIN_FLIP_EVENTS, table.format()
        assert gate.few_events is (gate.independent_events < MIN_FLIP_EVENTS), table.format()
        assert GATE_BAND[0] <= gate.z_rms <= GATE_BAND[1], table.format()
        assert DEFAULT_BAND[0] <= budget.z_rms <= DEFAULT_BAND[1], table.format()
    fp32 = table.rows[0].oracles["gate"]
    assert not fp32.few_events and fp32.flag(table.band) is None and fp32.count_flag() is None, table.format()


def test_the_gate_records_its_flip_model_and_runs_under_inference_mode():
    import reference
    from moe_validate.inputs import make_inputs

    case = Case.from_id("bf16-none-gelu-M7N64K64E4k2-s13")
    with torch.inference_mode():  # a caller's inference mode must not break the activation's autograd
        inputs = make_inputs(case)
        mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
        bounds = tol.derive(case, inputs, mirror, native_gpu=False)
    gate = bounds["gate"].to_dict()
    assert any(line.startswith("sigma (z-scores): flip-aware") for line in gate["derivation"])
    assert gate["flip_events_expected"] > 0 and gate["sigma_cont_max"] > 0
    # the z-score sigma is not the bound: flips are far larger than the continuous part it kept
    assert float(bounds["gate"].sigma.max()) > 10 * gate["sigma_cont_max"]  # ~50x here (bf16, K=64)
    valid_tokens = mirror["route_valid"].bool().any(1)
    assert (bounds["gate"].sigma[valid_tokens] > 1e-200).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter calibration")
@pytest.mark.parametrize("case_id", ["fp16-fp8_tensor_dynamic-silu-M64N256K256E4k1-rwin-s5",
                                     "fp16-fp8_tensor_token-gelu-M64N256K256E4k1-rwin-s6",
                                     "fp16-int8_channel_token-silu-M64N256K256E4k1-rwin-s8"])
def test_the_budget_z_rms_of_router_weight_on_input_cases_is_in_the_band(case_id):
    # their budget counts the requantization flips from a c1 box that holds the input codes x * w's
    # rounding moved (tolerance.router_weighted_input_c1_box); under the uncounted rule of sessions 10-12
    # the nightly's fp16 LoRA rwin fp8 cases read 0.06-0.13 on the H200 and the CPU
    record = runner.run_case_inprocess(Case.from_id(case_id), "triton", device="cpu").record
    assert record["outcome"] == "PASS", record.get("reason")
    z_rms = record["metrics"]["exact"]["z_rms"]["value"]
    assert DEFAULT_BAND[0] <= z_rms <= DEFAULT_BAND[1], z_rms
