"""Stage localization (moe_validate/stages.py) on the built-in triton backend and on hand-made stages.

The triton backend hands back what TritonExperts materializes on the path it takes, and every
exposed stage of a correct kernel is within its bound on smoke cases that cover each path: the
fused activation (c1 never written), LoRA (every stage written), the fused silu + fp8 group
quantization (c2 never stored in S), int8 requantization, the tiny-M fused top-k sum (c3 never
written). Stages built from the mirror itself with one expert's c3 perturbed are localized to c3
and that expert; a stage that is not materialized is carried, not faked.
"""

from __future__ import annotations

import pytest
import torch

from moe_validate.backends import get_backend
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case
from moe_validate.runner import default_device
from moe_validate.stages import STAGES, compare_stages

reference = pytest.importorskip("reference", reason="stages are compared against the float64 reference")

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
    record = compare_stages(inputs, exposed, _mirror(inputs), native_gpu=inputs.hidden_states.is_cuda)
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
    clean = compare_stages(inputs, exposed, mirror, native_gpu=False)
    assert clean["first_diverging"] is None
    assert all(clean["stages"][n]["max_normalized"] == 0 for n in ("c1", "c2", "c3", "out"))
    expert = 2
    routes = (mirror["route_expert"].reshape(-1) == expert) & mirror["route_valid"].reshape(-1)
    assert routes.any()
    c3 = exposed["c3"].clone()
    c3[routes] = (c3[routes].float() * 1.02).bfloat16()
    record = compare_stages(inputs, {**exposed, "c3": c3}, mirror, native_gpu=False)
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
    record = compare_stages(inputs, exposed, mirror, native_gpu=False)
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


def test_a_declared_profile_other_than_specs_is_said_in_the_localization():
    """The stage functions are SPEC's: under another declared profile the check says so, rather than
    presenting that profile's own roundings as a divergence without a word."""
    import dataclasses

    from moe_validate.backends import ReferenceBackend
    from moe_validate.contract.profile import SPEC_PROFILE
    from moe_validate.run.case import run_case_inprocess

    class WrongWithStagesAndAProfile(ReferenceBackend):
        name = "profiled-stages"
        numerics_profile = dataclasses.replace(SPEC_PROFILE, name="mine")

        def run(self, inputs, case=None):
            return super().run(inputs, case) * 1.5

        def run_stages(self, inputs, case=None):
            return {"out": self.run(inputs, case)}

    record = run_case_inprocess(Case(M=7, N=64, K=64, E=4, topk=2, dtype="bf16", seed=0),
                                WrongWithStagesAndAProfile(), backend_name="profiled").record
    assert record.outcome == "FAIL"
    assert "profile 'mine'" in record.stages["profile_note"]
    assert "NOTE stages compared with SPEC's stage functions" in record.reason
