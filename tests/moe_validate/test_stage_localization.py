"""Stage localization (moe_validate/stages.py) on the built-in triton backend, on hand-made stages
and on an independent implementation that declares its own numerics profile.

The triton backend hands back what TritonExperts materializes on the path it takes, and every
exposed stage of a correct kernel is within its bound on smoke cases that cover each path: the
fused activation (c1 never written), LoRA (every stage written), the fused silu + fp8 group
quantization (c2 never stored in S), int8 requantization, the tiny-M fused top-k sum (c3 never
written). Stages built from the mirror itself with one expert's c3 perturbed are localized to c3
and that expert; a stage that is not materialized is carried, not faked.

Under a declared profile the stage functions are the mirror's under that profile
(reference.pipeline.StageFunctions): the mirror's own stages are then exact at every stage, where
SPEC's stage functions would name the stage the profile's rounding acts on; the independent
implementation (tests/moe_validate/independent_experts.py, plain torch) has no diverging stage
under its profile, and one bug planted in one of its stages is localized to that stage.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from moe_validate.backends import get_backend
from moe_validate.contract.profile import (SPEC_PROFILE, VLLM_PROFILE, ActivationRounding, DotPrecision,
                                           GemmOutputDtype, TopkSum, WeightPrecision)
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case
from moe_validate.runner import default_device
from moe_validate.stages import STAGES, compare_stages, localize
from moe_validate.tolerance import ulp

reference = pytest.importorskip("reference", reason="stages are compared against the float64 reference")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from independent_experts import INDEPENDENT_PROFILE, IndependentExperts  # noqa: E402

SMOKE = [
    "bf16-none-silu-M7N64K64E4k2-s0",                      # activation fused into GEMM1: no c1
    "bf16-none-silu-lora_single-M7N64K64E4k2-s22",          # LoRA: every stage materialized
    "bf16-fp8_block128-silu-M7N64K64E4k2-s4",               # silu + fp8 group quantization: no c2 in S
    "fp16-int8_channel_token-silu-M9N64K64E4k2-bias-s116",  # int8 requantization, bias
    "bf16-none-silu-M1N64K64E4k2-s171",                     # tiny M: the top-k sum fused into GEMM2, no c3
]


def _mirror(inputs):
    return reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")


@pytest.mark.parametrize("case_id", SMOKE)
def test_triton_stages_are_within_their_bounds(case_id):
    case = Case.from_id(case_id)
    inputs = make_inputs(case, device=default_device())  # natively on a GPU, interpreted on a CPU
    backend = get_backend("triton")
    exposed = backend.run_stages(inputs, case)
    record = compare_stages(inputs, exposed, native_gpu=inputs.hidden_states.is_cuda)
    compared = {n: s["max_normalized"] for n, s in record["stages"].items() if "max_normalized" in s}
    assert record["first_diverging"] is None, record
    assert all(v <= 1 for v in compared.values()), compared
    assert "out" in compared and len(compared) >= 3, record  # most stages are really compared
    paths = backend.last_paths
    unavailable = {n for n, s in record["stages"].items() if "unavailable" in s}
    assert ("c1" in unavailable) == paths["fused_activation"]
    assert ("c3" in unavailable) == paths["fused_topk_sum"]


def test_a_perturbed_stage_is_localized_to_it_and_its_expert():
    case = Case(M=16, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3)
    inputs = make_inputs(case)
    mirror = _mirror(inputs)
    M, topk = inputs.topk_ids.shape
    exposed = {name: mirror[name].reshape(M * topk, -1).to(torch.bfloat16) for name in ("c1", "c2", "c3")}
    exposed["out"] = mirror["out"].to(torch.bfloat16)
    clean = compare_stages(inputs, exposed)
    assert clean["first_diverging"] is None
    assert all(clean["stages"][n]["max_normalized"] == 0 for n in ("c1", "c2", "c3", "out"))
    expert = 2
    routes = (mirror["route_expert"].reshape(-1) == expert) & mirror["route_valid"].reshape(-1)
    assert routes.any()
    c3 = exposed["c3"].clone()
    c3[routes] = (c3[routes].float() * 1.02).bfloat16()
    record = compare_stages(inputs, {**exposed, "c3": c3})
    assert record["first_diverging"] == "c3"
    assert record["stages"]["c3"]["worst"]["expert"] == expert
    assert record["stages"]["c3"]["worst"]["tile"].startswith(f"e{expert}r")


def test_a_missing_stage_is_carried_from_the_mirror_and_said():
    case = Case(M=16, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3)
    inputs = make_inputs(case)
    mirror = _mirror(inputs)
    M, topk = inputs.topk_ids.shape
    exposed = {"out": mirror["out"].to(torch.bfloat16), "c1": "fused into GEMM1 (planted)",
               "c2": mirror["c2"].reshape(M * topk, -1).to(torch.bfloat16)}
    record = compare_stages(inputs, exposed)
    assert record["stages"]["c1"] == {"unavailable": "fused into GEMM1 (planted)"}
    assert record["stages"]["c3"] == {"unavailable": "not exposed by the backend"}
    assert record["first_diverging"] is None and set(record["stages"]) == set(STAGES)


def test_a_localization_that_cannot_run_is_skipped_and_the_case_still_fails():
    from moe_validate.backends import ReferenceBackend
    from moe_validate.run.case import run_case_inprocess

    class WrongWithBrokenStages(ReferenceBackend):
        name = "broken-stages"

        def run(self, inputs, case=None):
            return super().run(inputs, case) * 1.5

        def run_stages(self, inputs, case=None):
            raise RuntimeError("planted: no stages today")

    record = run_case_inprocess(Case(M=7, N=64, K=64, E=4, topk=2, seed=3), WrongWithBrokenStages()).record
    assert record.outcome == "FAIL"
    check = next(c for c in record.checks if c["name"] == "stage_localization")
    assert check["outcome"] == "SKIP" and "planted: no stages today" in check["reason"]
    assert record.stages["exposed"] is True and "planted" in record.stages["error"]


# ---------------------------------------------------------------------------------------------
# a declared profile: the stage functions follow it
# ---------------------------------------------------------------------------------------------
def _only(**fields):
    """SPEC's profile but for ``fields``."""
    return dataclasses.replace(SPEC_PROFILE, name="only-" + "-".join(fields), **fields)


@pytest.mark.parametrize("profile, case_id, stage", [
    (_only(router_weight_input=WeightPrecision.STORAGE), "bf16-none-silu-M7N64K64E4k1-rwin-s31", "c1"),
    (_only(quantized_gemm_output=GemmOutputDtype.BF16), "fp16-int8_channel_token-silu-M9N64K64E4k2-bias-s116", "c1"),
    (_only(fp32_dot=DotPrecision.TF32), "fp32-none-silu-M7N64K64E4k2-s0", "c1"),
    (_only(weight_only_dequantized=WeightPrecision.STORAGE), "bf16-int8_w8a16-silu-M16N64K128E4k2-s3", "c1"),
    (_only(int8_token=VLLM_PROFILE.int8_token), "bf16-int8_channel_token-silu-M5N64K64E4k2-s150", "c1"),
    (_only(fp8_token_group=VLLM_PROFILE.fp8_token_group), "bf16-fp8_block128-gelu-M32N256K256E4k2-s3", "c1"),
    (_only(topk_sum=TopkSum.STORAGE_UP_TO_4), "bf16-none-gelu-M16N64K64E4k3-s5", "out"),
    (VLLM_PROFILE, "fp16-int8_channel_token-silu-M9N64K64E4k2-bias-s116", "c1"),
])
def test_under_a_declared_profile_its_own_mirror_is_exact_at_every_stage(profile, case_id, stage):
    """The mirror's stages under ``profile``, handed back as a backend's: the stage functions under
    the same profile recompute each stage from the previous one bit for bit (every stage at 0),
    where SPEC's stage functions name the stage that profile's rounding acts on."""
    case = Case.from_id(case_id)
    inputs = make_inputs(case)
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror", profile=profile)
    exposed = {name: mirror[name] for name in STAGES}
    own = compare_stages(inputs, exposed, profile=profile)
    compared = {n: s["max_normalized"] for n, s in own["stages"].items() if "max_normalized" in s}
    assert own["first_diverging"] is None and own["profile"] == profile.name
    assert set(compared) >= {"c1", "c2", "c3", "out"} and set(compared.values()) == {0.0}, compared
    as_spec = compare_stages(inputs, exposed)
    assert as_spec["first_diverging"] == stage, as_spec["stages"]
    assert as_spec["profile"] == "spec"


def test_a_flip_of_the_first_of_two_activation_roundings_is_within_c2s_bound():
    """Under a double activation rounding, an implementation whose fp32 act(g) is 3 fp32 ulps from
    ours (another libm; ACT_FP32_ULPS allows 4) stores round_S(a) one S ulp apart where a lies near
    a rounding midpoint, and u' carries that into c2: 2 ulps of c2, more than the single rounding's
    one ulp, and within the bound (the flip term)."""
    from reference.activations import gated_factors

    profile = _only(activation_rounding=ActivationRounding.DOUBLE, double_rounded_activations=("silu",))
    case = Case.from_id("fp16-none-silu-M16N256K64E4k2-s3")
    inputs = make_inputs(case)
    S = inputs.hidden_states.dtype
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror", profile=profile)
    a, up = gated_factors(mirror["c1"].to(torch.float32), inputs.activation, None)
    for _ in range(3):
        a = torch.nextafter(a, torch.full_like(a, float("inf")))
    c2 = (a.to(S).to(torch.float32) * up).to(S).to(torch.float64)
    c2 = torch.where(mirror["route_valid"][..., None], c2, torch.zeros_like(c2))
    diff = (c2 - mirror["c2"]).abs()
    assert (diff > ulp(mirror["c2"], S)).any()  # a flip of the first rounding, carried by u'
    record = compare_stages(inputs, {"c1": mirror["c1"], "c2": c2, "out": mirror["out"]}, profile=profile)
    assert 0 < record["stages"]["c2"]["max_normalized"] <= 1 and record["first_diverging"] is None, record


INDEPENDENT_CASES = [  # (case, the stage SPEC's stage functions would wrongly name, if any)
    ("bf16-none-silu-M7N64K64E4k2-s0", None),
    ("bf16-none-gelu_no_mul-M7N64K64E4k2-s18", None),
    ("bf16-int8_channel_token-silu-M5N64K64E4k2-s150", "c1"),     # int8 codes round half away
    ("bf16-fp8_block128-gelu-M5N64K64E4k2-s151", None),
    ("bf16-fp8_block128-silu-M7N64K64E4k2-s4", None),             # the fused silu + fp8 path
    ("bf16-none-silu-M7N64K64E4k1-rwin-s31", "c1"),               # router weight in S on the input
    ("bf16-fp8_channel_token-silu-M6N48K40E3k2-s175", None),
    ("fp16-none-silu-M9N64K64E4k2-bias-s110", None),
    ("bf16-none-gelu-M16N64K64E4k3-s5", "out"),                  # the top-k sum in S
    ("fp16-fp8_block128-gelu_tanh-M9N64K64E4k4-s7", "out"),
]


@pytest.mark.parametrize("case_id, misread_as_spec", INDEPENDENT_CASES)
def test_the_independent_implementation_has_no_diverging_stage_under_its_profile(case_id, misread_as_spec):
    case = Case.from_id(case_id)
    inputs = make_inputs(case)
    backend = IndependentExperts()
    record, check = localize(case, inputs, backend, backend.run(inputs, case))
    assert record["first_diverging"] is None, check["reason"]
    assert record["profile"] == INDEPENDENT_PROFILE.name and "rerun_differs" not in record
    assert check["outcome"] == "PASS"
    assert check["reason"].endswith("; the stage functions follow the declared profile 'independent-test'")
    compared = [n for n, s in record["stages"].items() if "max_normalized" in s]
    assert {"c1", "c2", "c3", "out"} <= set(compared)
    assert ("c2_in" in compared) == (case.scheme != "none")
    if misread_as_spec is not None:  # SPEC's stage functions would name a stage the profile rounds in
        as_spec = compare_stages(inputs, backend.run_stages(inputs, case))
        assert as_spec["first_diverging"] == misread_as_spec, as_spec["stages"]


@pytest.mark.parametrize("case_id, plant, stage, expert", [
    ("bf16-int8_channel_token-silu-M5N64K64E4k2-s150", "ignore_expert_scale", "c3", 1),
    ("bf16-fp8_block128-gelu-M5N64K64E4k2-s151", "ignore_expert_scale", "c3", 1),
    ("fp16-fp8_block128-gelu_tanh-M9N64K64E4k4-s7", "ignore_expert_scale", "c3", 1),
    ("bf16-none-gelu-M16N64K64E4k3-s5", "accumulate_in_storage", "c1", None),
    ("bf16-none-silu-M7N64K64E4k2-s0", "accumulate_in_storage", "c1", None),
])
def test_a_bug_planted_in_one_stage_of_the_independent_implementation_is_localized_to_it(case_id, plant, stage,
                                                                                        expert):
    """Through the runner: the planted accuracy loss fails the case, and the localization, under
    the declared profile, names the planted stage (GEMM2 of expert 1; every floating dot, so GEMM1
    first) with every stage before it within its bound."""
    from moe_validate.run.case import run_case_inprocess

    record = run_case_inprocess(Case.from_id(case_id), IndependentExperts(plant=plant),
                                backend_name="independent_experts:IndependentExperts").record
    assert record.outcome == "FAIL" and record.verdicts["accuracy"]["outcome"] == "FAIL"
    assert record.stages["first_diverging"] == stage and record.stages["profile"] == INDEPENDENT_PROFILE.name
    stages = record.stages["stages"]
    before = [n for n in STAGES[:STAGES.index(stage)] if "max_normalized" in stages[n]]
    assert all(stages[n]["max_normalized"] <= 1 for n in before), stages
    if expert is not None:
        assert stages[stage]["worst"]["expert"] == expert
    check = next(c for c in record.checks if c["name"] == "stage_localization")
    assert check["outcome"] == "FAIL" and f"first diverging stage {stage} " in check["reason"]
    assert "the stage functions follow the declared profile 'independent-test'" in check["reason"]


def test_a_sequential_fp32_c1_whose_partial_sums_drift_stays_inside_its_stage_bound():
    # Products of one sign make the partial sums drift to |c| >> s; a sequential fp32 sum then errs by
    # ~u sqrt(n) |c| / 3, beyond the random-walk u (1 + sqrt(n/6)) s (with it alone this c1 read 3.7-9.5x its
    # bound at K = 1024-4096). The stage bound takes the budget's drift model (tolerance._acc_sigma_drifting),
    # so this correct c1 is not a diverging stage (0.31-0.41).
    from moe_validate.ordered import fp32_gemm

    case = Case(M=6, N=32, K=1024, E=2, topk=1, dtype="fp32", seed=4)
    inputs = make_inputs(case)
    inputs.hidden_states.abs_()
    inputs.w1.abs_()
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
    x, w1, rexp = inputs.hidden_states, inputs.w1, mirror["route_expert"].long()
    c1 = torch.zeros_like(mirror["c1"])
    for m in range(case.M):
        e = int(rexp[m, 0])
        c1[m, 0] = fp32_gemm(x[m:m + 1], w1[e], "sequential")[0].float().double()
    assert bool((c1 != mirror["c1"]).any())  # the order shows
    record = compare_stages(inputs, {"c1": c1})
    assert record["stages"]["c1"]["max_normalized"] <= 1.0, record["stages"]["c1"]
