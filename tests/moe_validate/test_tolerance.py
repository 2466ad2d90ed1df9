"""Tolerance derivation: format units, ulps, per-element bounds and their recorded derivations."""

from __future__ import annotations

import math

import pytest
import torch

from moe_validate.matrix import AXES, Case
from moe_validate import tolerance as tol
from moe_validate.contract.spec import FP8_DTYPE, storage_dtype
from moe_validate.tolerance import Bound, derive, ulp, unit_roundoff

reference = pytest.importorskip("reference", reason="bounds are derived from the reference's stages")

from moe_validate.inputs import make_inputs  # noqa: E402

F64 = torch.float64


def test_unit_roundoffs_match_spec():
    # SPEC "Tolerances": bf16 u = 2^-8, fp16 2^-11, fp8 e4m3 2^-4 (and fp32 2^-24)
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8
    assert unit_roundoff(torch.float16) == 2.0 ** -11
    assert unit_roundoff(FP8_DTYPE) == 2.0 ** -4
    assert unit_roundoff(torch.float32) == 2.0 ** -24
    with pytest.raises(ValueError, match="dtype must be one of"):
        unit_roundoff(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, FP8_DTYPE])
def test_ulp_is_the_spacing_of_the_format(dtype):
    vals = torch.tensor([1.0, 1.5, 3.0, 0.3, 200.0, -7.0], dtype=F64).to(dtype).to(F64)
    u = ulp(vals, dtype)
    if dtype is FP8_DTYPE:
        # next representable value above |v| by a cast of the midpoint-plus
        up = (vals.abs() + u).to(dtype).to(F64)
        assert torch.equal(up, vals.abs() + u)
        assert torch.equal((vals.abs() + 0.49 * u).to(dtype).to(F64), vals.abs())
    else:
        assert torch.equal(torch.nextafter(vals.abs().to(dtype).float(), torch.tensor(float("inf"))).to(dtype).to(F64)
                           if dtype is torch.float32 else (vals.abs() + u).to(dtype).to(F64), vals.abs() + u)
    assert float(ulp(torch.tensor([1.0]), dtype)) == 2.0 * unit_roundoff(dtype)


def test_ulp_subnormal_floor():
    assert float(ulp(torch.tensor([0.0]), FP8_DTYPE)) == 2.0 ** -9
    assert float(ulp(torch.tensor([1e-30]), torch.float16)) == 2.0 ** -24
    assert float(ulp(torch.tensor([0.0]), torch.bfloat16)) == 2.0 ** -133


def _bounds(case, native_gpu=False):
    x = make_inputs(case)
    st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")
    return x, st, derive(case, x, st, native_gpu=native_gpu)


@pytest.mark.parametrize("scheme", AXES["scheme"])
def test_every_scheme_records_a_derivation(scheme):
    case = Case(M=5, N=64, K=64, E=3, topk=2, scheme=scheme, group_size=32 if scheme == "int4_w4a16" else None)
    x, st, b = _bounds(case)
    assert set(b) == {"gate", "budget"}
    for name, bound in b.items():
        assert isinstance(bound, Bound)
        d = bound.to_dict()
        for key in ("atol", "rtol", "derivation", "allowed_max", "u_S", "u_acc"):
            assert key in d, (name, key)
        assert len(d["derivation"]) >= 4 and all(isinstance(s, str) and s for s in d["derivation"])
        assert bound.allowed.shape == (case.M, case.K) and bool((bound.allowed >= 0).all())
    text = "\n".join(b["gate"].derivation)
    assert "flip" in text and "Z=" in text
    btext = "\n".join(b["budget"].derivation)
    assert "sqrt(sum_i w2^2" in btext  # the s_ij scale, not |ref|
    if case.quant.act_granularity is not None:
        assert "requantization step" in text and "requantization" in btext


def test_tokens_without_a_valid_route_must_be_exact_zeros():
    case = Case(M=12, N=64, K=64, E=4, topk=2, routing="invalid_ids", seed=3)
    x, st, b = _bounds(case)
    dead = ~st["route_valid"].any(1)
    assert dead.any()
    assert float(b["gate"].allowed[dead].abs().max()) == 0.0
    assert float(b["budget"].allowed[dead].abs().max()) == 0.0


def test_bound_uses_the_gemm_scale_not_the_reference_magnitude():
    # Under cancellation |ref| can be ~0 while the arithmetic error is not: the allowed error at
    # the smallest outputs stays comparable to the median (it is not proportional to |ref|).
    case = Case(M=64, N=128, K=128, E=4, topk=2, seed=9)
    x, st, b = _bounds(case)
    out = st["out"].abs()
    small = out < out.median() / 100
    assert small.any()
    allowed = b["budget"].allowed
    assert float(allowed[small].median()) > 0.1 * float(allowed.median())


def test_gate_is_tighter_than_budget():
    for scheme in ("none", "fp8_block128", "int8_channel_token"):
        case = Case(M=32, N=128, K=128, E=4, topk=2, scheme=scheme, seed=4)
        _, _, b = _bounds(case)
        assert float(b["gate"].allowed.median()) < float(b["budget"].allowed.median()), scheme


def test_hopper_fp8_accumulation_widens_only_native_fp8():
    fp8 = Case(M=16, N=128, K=128, E=4, topk=2, scheme="fp8_channel_token", seed=2)
    _, _, interp = _bounds(fp8, native_gpu=False)
    _, _, native = _bounds(fp8, native_gpu=True)
    assert interp["gate"].terms["u_acc"] == 2.0 ** -24 and native["gate"].terms["u_acc"] == 2.0 ** -14
    assert bool((native["gate"].allowed >= interp["gate"].allowed).all())
    bf16 = Case(M=16, N=128, K=128, E=4, topk=2, seed=2)
    _, _, a = _bounds(bf16, native_gpu=False)
    _, _, c = _bounds(bf16, native_gpu=True)
    assert torch.equal(a["gate"].allowed, c["gate"].allowed)  # no CPU/GPU difference without fp8 MMA
    i8 = Case(M=16, N=128, K=128, E=4, topk=2, scheme="int8_channel_token", seed=2)
    _, _, i = _bounds(i8, native_gpu=True)
    assert i["gate"].terms["growth_gemm1"] == 1.0  # int8 dots are exact in int32


def test_a_reported_fp32_accumulation_models_gpu_fp8_dots_as_fp32():
    # The kernels' mma.sync tiles (BLOCK_M 16) accumulate fp8 dots in full fp32 on an H200: a backend
    # that reports it (ReportsAccumulation) gets the fp32 unit; unreported stays the fp8 MMA's.
    from moe_validate.contract.profile import Fp8Accumulation

    case = Case(M=16, N=128, K=128, E=4, topk=2, scheme="fp8_tensor_token", seed=2)
    x = make_inputs(case)
    st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")
    unreported = derive(case, x, st, native_gpu=True)
    fp8_unit = derive(case, x, st, native_gpu=True, fp8_accumulation=Fp8Accumulation.FP8_MMA)
    fp32_unit = derive(case, x, st, native_gpu=True, fp8_accumulation=Fp8Accumulation.FP32)
    interp = derive(case, x, st, native_gpu=False, fp8_accumulation=Fp8Accumulation.FP32)
    assert torch.equal(unreported["gate"].allowed, fp8_unit["gate"].allowed)
    assert unreported["gate"].terms["u_acc"] == 2.0 ** -14 and fp32_unit["gate"].terms["u_acc"] == 2.0 ** -24
    for name in ("gate", "budget"):
        assert bool((fp32_unit[name].allowed <= unreported[name].allowed).all()), name
    assert fp32_unit["gate"].terms["differing_expected"] < unreported["gate"].terms["differing_expected"] / 10
    assert "as the backend reported for this launch (mma.sync" in "\n".join(fp32_unit["gate"].derivation)
    assert "did not report its accumulator" in "\n".join(unreported["gate"].derivation)
    assert interp["gate"].terms["u_acc"] == 2.0 ** -24  # the interpreter's fp8 dots are exact anyway
    bf16 = Case(M=16, N=128, K=128, E=4, topk=2, seed=2)
    xb = make_inputs(bf16)
    sb = reference.run_stages(*xb.args(), **xb.kwargs(), precision="mirror")
    assert torch.equal(derive(bf16, xb, sb, native_gpu=True)["gate"].allowed,
                       derive(bf16, xb, sb, native_gpu=True, fp8_accumulation=Fp8Accumulation.FP32)["gate"].allowed)


def test_the_chained_fp8_mma_flips_level_off_where_the_dot_is_large_and_block_scaled_dots_fade():
    # Measured on an H200 (tolerance.FP8_MMA_TRUNCATION): where the MMA's accumulator carries the running
    # sum over K, c1's own flips stop fading at |c| >> s (an error relative to |c|); a block-scaled dot
    # restarts it every scale block, so its flips keep falling as s / |c|.
    from moe_validate import tolerance as tol
    from moe_validate.contract.profile import Fp8Accumulation

    def p_c1_by_size(scheme):
        case = Case(M=64, N=128, K=256, E=4, topk=2, scheme=scheme, seed=3)
        x = make_inputs(case)
        st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")
        per_stage = {}
        tol.flip_aware_sigma(x, st, native_gpu=True, per_stage=per_stage, fp8_accumulation=Fp8Accumulation.FP8_MMA)
        valid = st["route_valid"].bool()
        xr = st["x"].double()[:, None, :].expand(*valid.shape, st["x"].shape[1])
        s1 = tol._per_expert_gemm_scales(xr, st["w1"].double(), st["route_expert"].long(), valid)[0].sqrt()
        r = st["c1"].double().abs() / s1.clamp_min(1e-300)
        keep = valid[..., None].expand_as(r)
        p = per_stage["p_c1"]
        big, mid = keep & (r >= 1.0), keep & (r >= 0.125) & (r < 0.25)
        floor = tol.FP8_MMA_TRUNCATION * tol.U32 * 256 * (st["c1"].double().abs() / ulp(st["c1"].double(), torch.bfloat16))
        return float(p[big].mean()), float(p[mid].mean()), float((p - floor)[big].min())

    big, mid, over_floor = p_c1_by_size("fp8_tensor_token")
    assert over_floor >= -1e-12  # the |c| part alone: tau u32 n |c| / ulp
    big_b, mid_b, _ = p_c1_by_size("fp8_block128")
    assert big_b < mid_b / 4 and big_b < big / 2
    assert big / mid > 1.5 * big_b / mid_b


def test_the_gate_bound_takes_the_chained_fp8_mma_part_where_its_flip_model_does():
    # one sigma for gate and budget: hypot(u_acc growth s, fp8_mma_truncation_sigma) on a GPU's chained fp8
    # MMA; without the |c| part the gate's own bound was narrower than the flips its model counts
    from unittest import mock

    from moe_validate import tolerance as tol
    from moe_validate.contract.profile import Fp8Accumulation

    def gates(scheme, native_gpu):
        case = Case(M=16, N=128, K=256, E=4, topk=2, scheme=scheme, seed=5)
        x = make_inputs(case)
        st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")
        acc = Fp8Accumulation.FP8_MMA if native_gpu else None
        with_term = tol.derive(case, x, st, native_gpu=native_gpu, fp8_accumulation=acc)["gate"]
        with mock.patch.object(tol, "fp8_mma_truncation_sigma", lambda n, size: torch.zeros_like(size)):
            without = tol.derive(case, x, st, native_gpu=native_gpu, fp8_accumulation=acc)["gate"]
        return with_term, without

    with_term, without = gates("fp8_tensor_token", True)
    assert torch.all(with_term.allowed >= without.allowed * (1 - 1e-12))
    assert float((with_term.allowed / without.allowed).max()) > 1.01
    assert any("chained fp8 MMA's sigma(K, |c1|)" in line for line in with_term.derivation)
    for scheme, native in (("fp8_block128", True), ("fp8_tensor_token", False)):  # restarted dots; the CPU
        with_term, without = gates(scheme, native)
        assert torch.equal(with_term.allowed, without.allowed), scheme


def test_the_gate_allows_each_lora_store_a_flip_at_its_own_magnitude():
    # c3 = round_S(base + round_S(d)) with LoRA (SPEC): where base and delta cancel, each rounds at
    # its own magnitude. The H200 nightly (session 14, rep 93) failed this case's conformance on our
    # own kernel: at (token 14, column 105) base -0.254, delta 0.241, c3 -0.0127; the kernel's out was
    # one ulp of the base (0.00195, 32 ulps of c3) off the mirror's, over a gate of 3 ulp_S(|c3|) = 0.00174
    from moe_validate import tolerance as tol
    from moe_validate.tolerance import ulp

    case = Case.from_id("bf16-int4_w4a16-gelu_no_mul-lora_dual-M80N512K384E16k1-rwin-bias-rt_skewed-d_zero_blocks-g32"
                        "-s93002017")
    inputs = make_inputs(case)
    st = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    base1, d13, base3, d2 = tol.lora_store_parts(inputs, st)
    c3 = st["c3"].double()
    assert torch.allclose(base3 + d2, c3) and torch.allclose(base1 + d13, st["c1"].double())
    assert float(base3[14, 0, 105]) == pytest.approx(-0.2536, abs=1e-3)
    gate = tol.derive(case, inputs, st, native_gpu=True)["gate"]
    # the kernel's out moved by one ulp of the larger LoRA operand, where it exceeds c3's (k = 1: out = c3)
    big = torch.maximum(base3.abs(), d2.abs())[:, 0]
    S = torch.bfloat16
    cancel = big > 8 * c3.abs()[:, 0]
    assert int(cancel.sum()) > 100
    flipped = ulp(big, S) * cancel
    assert float(flipped[14, 105]) == pytest.approx(0.001953125)
    assert float((flipped / gate.allowed).max()) <= 1.0
    assert any("base and delta may cancel" in line for line in gate.derivation)


def test_evaluate_refuses_an_accumulation_that_is_not_the_enum():
    from moe_validate.compare import evaluate

    case = Case(M=4, N=64, K=64, E=3, topk=2, scheme="fp8_tensor_token", seed=1)
    x = make_inputs(case)
    out = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")["out"]
    with pytest.raises(TypeError, match="last_fp8_accumulation\\) must be a contract.profile.Fp8Accumulation"):
        evaluate(case, x, out, fp8_accumulation="fp32")


def test_bound_grows_with_reduction_length():
    small = Case(M=32, N=64, K=64, E=2, topk=1, dtype="fp32", seed=1)
    large = Case(M=32, N=64, K=1024, E=2, topk=1, dtype="fp32", seed=1)
    _, _, bs = _bounds(small)
    _, _, bl = _bounds(large)
    assert bl["gate"].terms["growth_gemm1"] > bs["gate"].terms["growth_gemm1"]


def test_mirror_itself_passes_with_zero_margin():
    # the reference backend's output (mirror cast to S) is what the gate is centred on
    from moe_validate.compare import evaluate

    for scheme in ("none", "fp8_tensor_dynamic", "int4_w4a16"):
        case = Case(M=7, N=64, K=64, E=3, topk=2, scheme=scheme, group_size=32 if scheme == "int4_w4a16" else None)
        x = make_inputs(case)
        out = reference.fused_experts(*x.args(), **x.kwargs(), precision="mirror").to(storage_dtype(x.hidden_states.dtype))
        ev = evaluate(case, x, out)
        assert ev.passed and ev.worst_margin == 0.0, ev.message()


def test_budget_z_scores_are_calibrated_on_unquantized_cases():
    # Calibration (SPEC "Tolerances"): d / sigma of the mirror against exact over many seeds has
    # a spread near 1. The model is deliberately a little conservative (worst-case ulp per
    # binade, sqrt(n/6) sequential growth): observed 0.4 - 0.8. A drift outside [0.2, 1.5]
    # means the model or the reference changed.
    zs = []
    for seed in range(4):
        case = Case(M=32, N=128, K=128, E=4, topk=2, seed=seed)
        x = make_inputs(case)
        mirror = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror")
        exact = reference.run_stages(*x.args(), **x.kwargs(), precision="exact")
        b = derive(case, x, mirror, native_gpu=False)["budget"]
        live = b.sigma > 1e-200
        zs.append(((mirror["out"] - exact["out"])[live] / b.sigma[live]))
    z = torch.cat(zs)
    rms = float(z.pow(2).mean().sqrt())
    assert 0.2 < rms < 1.5, rms


# --- the gate's count test ------------------------------------------------------------------
def test_chernoff_count_quantile_covers_the_poisson_tail():
    """Pure direct flips (no clusters): C ~ Binomial ~ Poisson(lam); the Chernoff quantile c* must
    be at or above the exact Poisson quantile at alpha, and not far above it (within 2x + 3)."""
    def poisson_isf(alpha, lam):  # smallest c with P(C > c) <= alpha
        c, term, cdf = 0, math.exp(-lam), math.exp(-lam)
        while 1.0 - cdf > alpha:
            c += 1
            term *= lam / c
            cdf += term
        return c

    for lam, n in ((0.05, 400), (2.0, 400), (30.0, 3000)):
        p = torch.full((n,), lam / n, dtype=torch.float64)
        c_star = tol.chernoff_count_quantile(p, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
        exact = poisson_isf(tol.COUNT_ALPHA, lam)  # P(C > exact) <= alpha
        assert exact <= c_star <= 2 * exact + 3, (lam, exact, c_star)


def test_chernoff_count_quantile_counts_clusters_by_their_size():
    """One rare event that moves 50 elements: allowing it costs 50 elements, not one."""
    none = torch.zeros(0, dtype=torch.float64)
    rare = tol.chernoff_count_quantile(none, torch.tensor([1e-3], dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64))
    single = tol.chernoff_count_quantile(none, torch.tensor([1e-3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    assert rare > 10 * single and rare >= 50


def test_count_test_flags_a_one_ulp_systematic_error_the_per_element_gate_allows():
    import reference
    from moe_validate.compare import Evaluation

    case = Case.from_id("bf16-none-silu-M7N64K64E4k2-s0")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    gate = tol.derive(case, inputs, mirror, native_gpu=False)["gate"]
    out = mirror["out"]
    assert 0 < gate.count_allowed < out.numel(), gate.derivation
    shifted = (out + torch.sign(out) * tol.ulp(out, torch.bfloat16)).to(torch.bfloat16)
    for count, passed in ((None, True), (gate.count_allowed, False)):
        ev = Evaluation.from_arrays(case, shifted, {"mirror": (out, gate.allowed, gate.sigma, count)},
                                    storage=torch.bfloat16)
        assert ev.passed is passed, ev.reason
    assert "count:" in ev.reason and f"{out.numel()} of {out.numel()}" in ev.reason
    d = gate.to_dict()
    assert d["count_allowed"] == gate.count_allowed and d["differing_expected"] >= 0
    assert any(line.startswith("count: allowed") for line in d["derivation"])


def test_a_gpu_derivation_applies_the_count_test_with_the_tensor_cores_bias():
    import reference

    case = Case.from_id("bf16-none-silu-M7N64K64E4k2-s0")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    gpu = tol.derive(case, inputs, mirror, native_gpu=True)["gate"]
    cpu = tol.derive(case, inputs, mirror, native_gpu=False)["gate"]
    assert tol.COUNT_TEST_ON_GPU is True
    assert gpu.count_allowed is not None and gpu.count_not_applied is None
    assert any(line.startswith("compiled tensor-core dots") for line in gpu.derivation)
    assert not any(line.startswith("compiled tensor-core dots") for line in cpu.derivation)
    # the bias only adds flips: more expected, a wider allowance, never a narrower one
    assert gpu.terms["differing_expected"] > cpu.terms["differing_expected"] > 0
    assert gpu.count_allowed >= cpu.count_allowed


def test_the_tensor_core_bias_grows_with_the_dot_length_and_reaches_large_elements():
    s = torch.ones(3, dtype=torch.float64)
    size = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    short, long_ = tol._mma_truncation(128, 16, size, s), tol._mma_truncation(512, 16, size, s)
    assert torch.allclose(long_, 4 * short)  # linear in n: a bias added at every accumulation step
    assert bool((short[1:] > short[0]).all())  # unlike an s-proportional error, it grows with |c|
    assert torch.allclose(tol._mma_truncation(128, 12, size, s) / short,
                          torch.tensor(tol.GPU_MMA_TRUNCATION_SHORT / tol.GPU_MMA_TRUNCATION, dtype=torch.float64))


@pytest.mark.parametrize("case_id", ["bf16-fp8_tensor_token-silu-M7N64K64E4k2-s0",
                                     "bf16-int8_channel_token-silu-M7N64K64E4k2-s0"])
def test_the_tensor_core_bias_is_not_added_to_the_fp8_unit_or_to_exact_int8_dots(case_id):
    import reference

    case = Case.from_id(case_id)
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    _, lines, _ = tol.flip_aware_sigma(inputs, mirror, native_gpu=True)
    assert not any(line.startswith("compiled tensor-core dots") for line in lines)


def test_with_the_gpu_switch_off_the_count_is_recorded_but_not_applied(monkeypatch):
    import reference

    monkeypatch.setattr(tol, "COUNT_TEST_ON_GPU", False)
    case = Case.from_id("bf16-none-silu-M7N64K64E4k2-s0")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    gate = tol.derive(case, inputs, mirror, native_gpu=True)["gate"]
    assert gate.count_allowed is None and not {"count_allowed", "differing_allowed"} & set(gate.to_dict())
    assert gate.terms["differing_expected"] > 0  # calibrate on a GPU pools it
    assert any("not applied on a GPU" in line for line in gate.derivation)


# --- quantizers that divide with Triton's fp32 `/` (Division.TRITON), on a GPU ---------------------
# vLLM's per-token int8 quantizer computes 127 / absmax with Triton's `/`, which a compiled kernel
# evaluates approximately: on an H200 28% of those quotients came out an ulp off (0.06% two) and
# 4.7% of absmax / 127 (scripts/gpu_vllm_int8_probe.py). The emulation below gives the CPU that
# behaviour: per row, the multiplier one ulp off with p = 0.28 and the scale with p = 0.047. On the
# GPU premerge case s1009 it reproduced the H200's count (1569-1823 differing elements emulated,
# 1936 on the GPU, against the 724 the model allowed before it knew of these codes).
TIE_CASE = "bf16-int8_channel_token-silu-M32N256K128E4k2-s7"  # 13 input and 20 requantization near ties


def _triton_division_emulated(monkeypatch, seed):
    """reference.quant with vLLM's int8 quantizer as a compiled Triton kernel divides (see above)."""
    import reference.quant as rq

    gen = torch.Generator().manual_seed(seed)
    codes, scale = rq._codes, rq._dynamic_scale

    def one_ulp_off(t, p):
        r = torch.rand(t.shape, generator=gen)
        up = torch.nextafter(t, torch.full_like(t, math.inf))
        down = torch.nextafter(t, torch.zeros_like(t))
        return torch.where(r < p / 2, up, torch.where(r < p, down, t))

    def emulated_codes(x32, s, absmax, code_dtype, quantizer):
        if quantizer.codes is not rq.CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY:
            return codes(x32, s, absmax, code_dtype, quantizer)
        inverse = one_ulp_off(torch.full_like(absmax, 127.0) / torch.clamp_min(absmax, quantizer.floor), 0.28)
        return rq._round_half_away(x32 * inverse).clamp(-127, 127)

    def emulated_scale(absmax, qmax, quantizer):
        s = scale(absmax, qmax, quantizer)
        return one_ulp_off(s, 0.047) if quantizer.codes is rq.CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY else s

    monkeypatch.setattr(rq, "_codes", emulated_codes)
    monkeypatch.setattr(rq, "_dynamic_scale", emulated_scale)


def _vllm_gate(case_id, native_gpu):
    from moe_validate.contract.profile import VLLM_PROFILE

    case = Case.from_id(case_id)
    x = make_inputs(case)
    st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror", profile=VLLM_PROFILE)
    return x, st, derive(case, x, st, native_gpu=native_gpu, profile=VLLM_PROFILE)["gate"]


def test_triton_division_ties_count_on_a_gpu_only_and_only_where_a_profile_declares_them():
    _, _, gpu = _vllm_gate(TIE_CASE, native_gpu=True)
    _, _, cpu = _vllm_gate(TIE_CASE, native_gpu=False)
    spec_gpu = _bounds(Case.from_id(TIE_CASE), native_gpu=True)[2]["gate"]
    assert gpu.terms["division_ties_input"] == 13 and gpu.terms["division_ties_requant"] == 20
    assert any(line.startswith("Triton fp32 division in the quantizer") for line in gpu.derivation)
    assert any("near-tie input codes" in line for line in gpu.derivation)
    for other in (cpu, spec_gpu):  # the interpreter divides correctly; SPEC's quantizer is IEEE
        assert "division_ties_input" not in other.terms
        assert not any("Triton fp32 division" in line for line in other.derivation)
    # the ties only add events: wider where they are, never narrower anywhere
    assert gpu.count_allowed > cpu.count_allowed and bool((gpu.allowed >= cpu.allowed).all())


def test_a_kernel_dividing_the_triton_way_passes_the_gpu_gate_the_old_model_failed(monkeypatch):
    x, mirror, gate = _vllm_gate(TIE_CASE, native_gpu=True)
    with monkeypatch.context() as m:  # the model before it knew of these codes
        m.setattr(tol, "division_ties", lambda *args, **kwargs: None)
        _, _, old = _vllm_gate(TIE_CASE, native_gpu=True)
    from moe_validate.contract.profile import VLLM_PROFILE

    counts, old_alarms = [], 0
    for seed in range(6):
        with monkeypatch.context() as m:
            _triton_division_emulated(m, seed)
            kernel = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror", profile=VLLM_PROFILE)["out"]
        d = (kernel - mirror["out"]).abs()
        count = int((d > 0).sum())
        assert count <= gate.count_allowed and bool((d <= gate.allowed).all()), (seed, count, gate.count_allowed)
        old_alarms += count > old.count_allowed or bool((d > old.allowed).any())
        counts.append(count)
    assert max(counts) > 0 and old_alarms >= 1, (counts, old.count_allowed)
    # still a test: a uniform one-ulp error (every element differs) exceeds the allowance
    assert gate.count_allowed < mirror["out"].numel()


# --- a numerics profile's roundings in the gate (issue 17) ------------------------------------------
def _profile_gate(case_id, profile):
    case = Case.from_id(case_id)
    x = make_inputs(case)
    st = reference.run_stages(*x.args(), **x.kwargs(), precision="mirror", profile=profile)
    return derive(case, x, st, native_gpu=False, profile=profile)["gate"]


def _one_change(**fields):
    import dataclasses

    from moe_validate.contract.profile import SPEC_PROFILE

    return dataclasses.replace(SPEC_PROFILE, name="one-change", **fields)


def test_spec_profile_adds_nothing_to_the_gate():
    from moe_validate.contract.profile import SPEC_PROFILE

    case_id = "bf16-none-silu-M7N64K64E4k2-s0"
    default, spec = _profile_gate(case_id, SPEC_PROFILE), _bounds(Case.from_id(case_id))[2]["gate"]
    assert torch.equal(default.allowed, spec.allowed) and default.count_allowed == spec.count_allowed
    assert not [line for line in default.derivation if line.startswith("profile ")]


def test_double_activation_rounding_adds_a_rounding_of_act_g():
    from moe_validate.contract.profile import SPEC_PROFILE, ActivationRounding

    twice = _one_change(activation_rounding=ActivationRounding.DOUBLE, double_rounded_activations=("silu",))
    case_id = "bf16-none-silu-M7N64K64E4k2-s0"
    spec, double = _profile_gate(case_id, SPEC_PROFILE), _profile_gate(case_id, twice)
    assert any(line.startswith("double activation rounding: c2 = round_S(round_S(a) u')") for line in double.derivation)
    # one more rounding between c1 and c2: more expected flips, a larger count allowance, wider per-element bounds
    assert double.terms["flip_events_expected"] > spec.terms["flip_events_expected"]
    assert double.count_allowed > spec.count_allowed
    assert float(double.allowed.median()) > float(spec.allowed.median())


def test_topk_sum_in_storage_counts_every_partial_rounding():
    from moe_validate.contract.profile import SPEC_PROFILE, TopkSum

    in_s = _one_change(topk_sum=TopkSum.STORAGE_UP_TO_4)
    case_id = "bf16-none-silu-M5N32K32E3k3-s173"  # topk 3: two partial sums
    spec, summed = _profile_gate(case_id, SPEC_PROFILE), _profile_gate(case_id, in_s)
    assert any(line.startswith("top-k sum in S: topk - 1 partial sums round to S") for line in summed.derivation)
    # each partial rounding may flip: a larger modelled spread and a wider hard out term
    assert summed.terms["sigma_flip_median"] > spec.terms["sigma_flip_median"]
    assert float(summed.allowed.median()) > float(spec.allowed.median())


@pytest.mark.parametrize("change, words", [
    (dict(router_weight_input="storage"), "router weight rounded to S: the same function of an input"),
    (dict(weight_only_dequantized="storage"), "weight-only weights dequantized to S before the dot"),
    (dict(fp32_dot="tf32"), "TF32 dots: both sides read TF32 operands"),
    (dict(quantized_gemm_output="fp32"), "GEMM outputs in float32 (quantized activations)"),
    (dict(quantized_gemm_output="bf16"), "GEMM outputs in bfloat16 (quantized activations)"),
])
def test_every_other_profile_rounding_says_what_it_adds(change, words):
    from moe_validate.contract import profile as p

    kinds = {"router_weight_input": p.WeightPrecision, "weight_only_dequantized": p.WeightPrecision,
             "fp32_dot": p.DotPrecision, "quantized_gemm_output": p.GemmOutputDtype}
    typed = {k: kinds[k](v) for k, v in change.items()}
    case_id = {"router_weight_input": "bf16-none-silu-M7N64K64E4k1-rwin-s31",
               "weight_only_dequantized": "bf16-int4_w4a16-silu-M5N64K64E4k2-g32-s100",
               "fp32_dot": "fp32-none-silu-M7N64K64E4k2-s2",
               "quantized_gemm_output": "fp16-int8_channel_token-silu-M9N64K64E4k2-bias-s116"}[next(iter(change))]
    gate = _profile_gate(case_id, _one_change(**typed))
    assert any(line.startswith(words) for line in gate.derivation), gate.derivation


@pytest.mark.parametrize("case_id", ["bf16-int8_channel_token-silu-M8N64K64E4k2-map_half-s5",
                                     "fp16-fp8_tensor_token-silu-M8N64K64E4k2-map_half-s6"])
def test_the_gate_sigma_is_finite_where_a_token_scale_group_is_all_zero(case_id):
    # map_half: routes to experts outside the local map are invalid, their c2 rows all zero; the
    # group's scale shift was 0 x inf = NaN there, which made the whole case's z_rms NaN and
    # calibrate drop the record (46 of 788 H200 nightly records, session 11)
    import reference

    case = Case.from_id(case_id)
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    assert not mirror["route_valid"].all(), "the case must have invalid routes"
    for native_gpu in (False, True):
        sigma, _, _ = tol.flip_aware_sigma(inputs, mirror, native_gpu=native_gpu)
        assert torch.isfinite(sigma).all(), (case_id, native_gpu)


def test_router_weight_on_input_cases_count_their_requantization_flips():
    # the input codes that x * w's rounding to S moves are in the c1 box (router_weighted_input_c1_box):
    # the budget counts the requantization flips there too, where it allowed one jump per element
    import reference

    case = Case.from_id("bf16-fp8_tensor_token-silu-M8N64K64E4k1-rwin-s7")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    exact = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
    detail = {}
    budget = tol.derive(case, inputs, mirror, native_gpu=False, exact=exact, budget_detail=detail)["budget"]
    assert any("Chernoff" in line for line in budget.derivation)
    assert budget.terms["requant_codes"] > 0
    # the rounding moved input codes: the box holds their c1 move (> 0), and the mirror stays inside
    w1 = mirror["w1"].double()
    box, _, spec = tol.router_weighted_input_c1_box(inputs, w1, mirror["route_expert"].long(), mirror["route_valid"].bool())
    assert float(box.max()) > 0 and torch.all(spec.abs() <= box)
    assert torch.all(detail["b_c1"] >= box * mirror["route_valid"][..., None] - 1e-300)
    d = (mirror["out"].double() - exact["out"].double()).abs()
    assert float((d / budget.allowed).max()) <= 1.0


def test_the_count_records_its_second_moment_for_calibration():
    import reference

    case = Case.from_id("bf16-fp8_tensor_dynamic-silu-M7N64K64E4k2-s0")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    terms = tol.derive(case, inputs, mirror, native_gpu=True)["gate"].terms
    # E[C^2]-type sum >= E[C] (integer counts), and a requantized code's flip is a cluster, so > E[C] here
    assert terms["differing_second_moment"] > terms["differing_expected"] > 0


def test_a_gpu_derivation_records_how_it_modelled_the_fp8_dots():
    import reference
    from moe_validate.contract.profile import Fp8Accumulation

    case = Case.from_id("bf16-fp8_tensor_token-silu-M7N64K64E4k2-s6")
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    for native_gpu, acc, unit in ((True, Fp8Accumulation.FP32, "fp32"), (True, None, "unreported"),
                                  (True, Fp8Accumulation.FP8_MMA, "fp8 mma"), (False, None, None)):
        bounds = tol.derive(case, inputs, mirror, native_gpu=native_gpu, fp8_accumulation=acc)
        assert bounds["gate"].fp8_accumulation == bounds["budget"].fp8_accumulation == unit
        assert bounds["gate"].to_dict().get("fp8_accumulation") == unit
    none = Case.from_id("bf16-none-silu-M7N64K64E4k2-s0")
    inputs = make_inputs(none)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    assert tol.derive(none, inputs, mirror, native_gpu=True)["gate"].fp8_accumulation is None


def test_the_count_model_leaves_out_the_elements_an_fp16_overflow_made_non_finite():
    # an H200 nightly's fp16 d_outliers case (session 14, rep 96): gelu_tanh overflows c2 to inf on 8
    # elements, so 384 outputs are inf on the mirror. compare counts finite elements only; the count
    # model's NaN there had made its expected count n (30720), which calibrate then read as LOW
    from moe_validate import tolerance as tol

    case = Case.from_id("fp16-int8_w8a16-gelu_tanh-lora_dual-M80N512K384E16k2-cfg_BM64BN64BK64GM8W4S3-d_outliers"
                        "-s96002028")
    inputs = make_inputs(case)
    st = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    assert int((~torch.isfinite(st["out"])).sum()) > 0
    terms = tol.derive(case, inputs, st, native_gpu=True)["gate"].terms
    n = st["out"].numel()
    assert math.isfinite(terms["differing_second_moment"]) and math.isfinite(terms["differing_direct_expected"])
    assert 0 < terms["differing_expected"] < 0.1 * n
