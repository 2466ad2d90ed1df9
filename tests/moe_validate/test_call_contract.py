"""The call contract (moe_validate/call_contract.py) on every call, and the backend contract at load.

Planted backends built on the reference's answer, each breaking one clause: a mutating backend
(hidden_states zeroed before computing; w1 zeroed after a correct computation), a float32 output,
an output on another device, the wrong shape, an output aliasing an input, a column-major output.
Each gets its named ``contract:*`` failure, and the comparison uses the untouched inputs. A
backend whose optional capability has the wrong form is refused at load, naming what is expected.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from moe_validate import call_contract
from moe_validate.backends import ReferenceBackend, capability_summary, check_backend, get_backend
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case
from moe_validate.run.case import run_case_inprocess

pytest.importorskip("reference", reason="the planted backends answer with the float64 reference")

CASE = Case(M=7, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3)


def _checks(record):
    return {c["name"]: c for c in record.checks or ()}


class ZeroesHiddenStates(ReferenceBackend):
    name = "zeroes-hidden"

    def run(self, inputs, case=None):
        inputs.hidden_states.zero_()
        return super().run(inputs, case)


class ZeroesW1After(ReferenceBackend):
    """A correct answer, then w1 zeroed: only the contract can see it."""

    name = "zeroes-w1"

    def run(self, inputs, case=None):
        out = super().run(inputs, case)
        inputs.w1.zero_()
        return out


class Float32Output(ReferenceBackend):
    name = "float32-output"

    def run(self, inputs, case=None):
        return super().run(inputs, case).float()


class MetaOutput(ReferenceBackend):
    name = "meta-output"

    def run(self, inputs, case=None):
        return super().run(inputs, case).to("meta")


class ShortOutput(ReferenceBackend):
    name = "short-output"

    def run(self, inputs, case=None):
        return super().run(inputs, case)[:-1]


class InPlace(ReferenceBackend):
    name = "in-place"

    def run(self, inputs, case=None):
        out = super().run(inputs, case)
        return inputs.hidden_states.copy_(out)


class ColumnMajor(ReferenceBackend):
    name = "column-major"

    def run(self, inputs, case=None):
        return super().run(inputs, case).t().contiguous().t()


def test_a_correct_backend_passes_the_contract_on_every_call():
    record = run_case_inprocess(Case(M=7, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3, invariance="rerun"),
                                ReferenceBackend()).record
    assert record.outcome == "PASS"
    contract = _checks(record)["contract"]
    assert contract["outcome"] == "PASS" and contract["reason"].startswith("2 call(s)")


def test_zeroing_hidden_states_is_a_named_failure_and_the_comparison_uses_the_untouched_inputs():
    record = run_case_inprocess(CASE, ZeroesHiddenStates()).record
    assert record.outcome == "FAIL"
    check = _checks(record)[call_contract.INPUTS_UNCHANGED]
    assert check["outcome"] == "FAIL" and "hidden_states (7, 64) torch.bfloat16 was written to" in check["reason"]
    assert record.reason.startswith("contract:inputs_unchanged: the backend changed its inputs: hidden_states")
    # judged against the original hidden_states: the zero output is far outside the gate
    assert record.metrics["mirror"]["max_normalized"]["value"] > 1


def test_zeroing_w1_after_a_correct_answer_fails_on_the_contract_alone():
    record = run_case_inprocess(CASE, ZeroesW1After()).record
    assert record.outcome == "FAIL"
    assert "w1 (4, 64, 64) torch.bfloat16 was written to" in _checks(record)[call_contract.INPUTS_UNCHANGED]["reason"]
    # the comparison ran on the untouched inputs, so the correct answer passes it
    assert record.metrics["mirror"]["max_normalized"]["value"] <= 1
    assert record.metrics["exact"]["max_normalized"]["value"] <= 1


def test_a_float32_output_is_a_named_failure_not_a_pass():
    record = run_case_inprocess(CASE, Float32Output()).record
    assert record.outcome == "FAIL"
    reason = _checks(record)[call_contract.OUTPUT_DTYPE]["reason"]
    assert "storage dtype S = torch.bfloat16" in reason and "got torch.float32" in reason
    assert record.reason.startswith("contract:output_dtype")


def test_an_output_on_another_device_is_a_named_failure_never_moved():
    record = run_case_inprocess(CASE, MetaOutput()).record
    assert record.outcome == "FAIL"
    assert "; got meta (the harness does not move it)" in _checks(record)[call_contract.OUTPUT_DEVICE]["reason"]
    assert record.metrics is None  # a meta tensor has no values: nothing was compared
    # and a CPU output for inputs on another device (meta here: the honest other device on a CPU)
    inputs = make_inputs(CASE)
    out = ReferenceBackend().run(inputs, CASE)
    problems = dict(call_contract.output_problems(out, inputs.to("meta")))
    assert "inputs' device meta; got cpu" in problems[call_contract.OUTPUT_DEVICE]


def test_the_wrong_shape_is_a_named_failure_without_a_crash():
    record = run_case_inprocess(CASE, ShortOutput()).record
    assert record.outcome == "FAIL"
    assert record.reason == "contract:output_shape: output must be [M, K] = [7, 64]; got [6, 64]"


def test_an_in_place_output_breaks_aliasing_and_inputs_unchanged():
    record = run_case_inprocess(CASE, InPlace()).record
    checks = _checks(record)
    assert record.outcome == "FAIL"
    assert "shares memory with the input hidden_states" in checks[call_contract.OUTPUT_ALIASING]["reason"]
    assert checks[call_contract.INPUTS_UNCHANGED]["outcome"] == "FAIL"


def test_a_column_major_output_breaks_the_layout():
    record = run_case_inprocess(CASE, ColumnMajor()).record
    assert "got strides (1, 7)" in _checks(record)[call_contract.OUTPUT_LAYOUT]["reason"]


def test_the_digest_sees_one_changed_byte_anywhere_and_any_strides(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 33, generator=g).bfloat16()[:, 1:]  # a strided view
    base = call_contract.digest(t)
    assert call_contract.digest(t.clone()) == base
    for index in [(0, 0), (4, 31), (2, 17)]:
        u = t.clone()
        u.view(torch.int16)[index] ^= 1  # the lowest mantissa bit
        assert call_contract.digest(u) != base, index
    # one flipped bit of a byte tensor, past the cached weights and across slices (rows split too),
    # with both limits made small so that the test stays fast
    monkeypatch.setattr(call_contract, "_SLICE_BYTES", 64)
    monkeypatch.setattr(call_contract, "_CACHED_BYTES", 100)
    monkeypatch.setattr(call_contract, "_WEIGHTS", {})
    b = torch.zeros(3, 71, dtype=torch.uint8)
    assert call_contract.digest(b) == call_contract.digest(b.reshape(-1)) == (0, 0)
    for index in [(0, 0), (1, 5), (2, b.shape[1] - 1)]:
        c = b.clone()
        c[index] = 1
        assert call_contract.digest(c) != (0, 0), index


# --- the backend contract at load ---------------------------------------------------------------
class _Base:
    name = "planted"

    def supports(self, case):
        return True, ""

    def run(self, inputs, case=None):
        return ReferenceBackend().run(inputs, case)


class RoutingTakesNoArguments(_Base):
    def routing_stages(self):
        return None


class InvarianceNotCallable(_Base):
    supports_invariance = 3


class GatingAString(_Base):
    gating = "accuracy"


class RunTakesOneArgumentTooMany(_Base):
    def run(self, inputs, case, extra):
        return None


class DeclaresAbsence(_Base):
    routing_stages = None  # None declares the capability absent: accepted


@pytest.fixture()
def planted_module(monkeypatch):
    module = types.ModuleType("planted_backends")
    for cls in (RoutingTakesNoArguments, InvarianceNotCallable, GatingAString, RunTakesOneArgumentTooMany,
                DeclaresAbsence):
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "planted_backends", module)
    return module


@pytest.mark.parametrize("attr, needles", [
    ("RoutingTakesNoArguments", ["backend 'planted_backends:RoutingTakesNoArguments'", "capability ExposesRouting",
                                 "routing_stages has signature ()", "expected a method routing_stages(inputs, case)"]),
    ("InvarianceNotCallable", ["capability SupportsInvariance", "supports_invariance is not callable (a int)"]),
    ("GatingAString", ["capability DeclaresNumerics", "gating must be a non-empty tuple of verdict names"]),
    ("RunTakesOneArgumentTooMany", ["required method run has signature (inputs, case, extra)", "expected run(inputs, case)"]),
])
def test_a_bad_capability_is_refused_at_load_naming_what_was_expected(planted_module, attr, needles):
    with pytest.raises(TypeError) as info:
        get_backend(f"planted_backends:{attr}")
    for needle in needles:
        assert needle in str(info.value)


def test_a_capability_set_to_none_is_declared_absent_and_the_header_says_so(planted_module):
    backend = get_backend("planted_backends:DeclaresAbsence")
    summary = capability_summary(backend)
    assert "routing_stages" in summary["lacking"] and "run_stages" in summary["lacking"]
    assert summary["declared"] == []
    check_backend(get_backend("triton"), "triton")  # the built-ins honour their own contract
    assert {"supports_invariance", "routing_stages", "run_paths", "run_stages"} <= set(
        capability_summary(get_backend("triton"))["declared"])


def test_the_run_header_records_what_the_backend_declares(tmp_path):
    import json

    from moe_validate.run.session import run_cases

    run_cases([CASE], "reference", tmp_path / "run", workers=0, progress=None)
    header = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    capabilities = header["capabilities"]
    assert "supports_invariance" in capabilities["declared"]
    assert {"routing_stages", "run_paths", "run_stages"} <= set(capabilities["lacking"])


def test_a_reported_fp8_accumulation_reaches_the_gate_and_a_wrong_one_is_said():
    # ReportsAccumulation: the triton backend declares it; the runner hands the value to the
    # comparison, which refuses anything but the enum with the member's name
    from moe_validate.contract.profile import Fp8Accumulation

    assert "last_fp8_accumulation" in capability_summary(get_backend("triton"))["declared"]

    class Reports(ReferenceBackend):
        name = "reports-accumulation"
        last_fp8_accumulation = "fp32"  # a string, not contract.profile.Fp8Accumulation

    case = Case.from_id("bf16-fp8_tensor_token-silu-M4N64K64E3k2-s1")
    record = run_case_inprocess(case, Reports(), device="cpu").record
    assert record.outcome in ("ERROR", "CRASH") and "last_fp8_accumulation" in record.reason, record.reason
    Reports.last_fp8_accumulation = Fp8Accumulation.FP32
    assert run_case_inprocess(case, Reports(), device="cpu").record.outcome == "PASS"
