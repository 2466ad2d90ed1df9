"""The diagnosis names each planted bug: where it lives and its pattern, in its one-line summary.

Each planted backend wraps the float64 reference (``ReferenceBackend``, which passes every case)
and breaks its answer in one known way; the case runs through the real runner path
(``run_case_inprocess``: comparison, checks, record), so the summary tested is the one
results.jsonl carries. Records lacking fields another part of the harness fills (verdicts,
stages) are read as well as records carrying them (synthesized here).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from moe_validate.backends import ReferenceBackend
from moe_validate.diagnosis import diagnose, diagnosis_of, summary_of
from moe_validate.matrix import Case
from moe_validate.results import CaseRecord, storable
from moe_validate.run.case import CaseOptions, CaseResult, run_case_inprocess

pytest.importorskip("reference", reason="the planted backends wrap the float64 reference")


class Planted:
    """The reference's answer, broken by ``plant(inputs, case, out) -> out``."""

    last_config = None

    def __init__(self, name, plant):
        self.name, self.plant = name, plant

    def supports(self, case):
        return True, ""

    def run(self, inputs, case=None):
        out = ReferenceBackend().run(inputs, case).clone()
        return self.plant(inputs, case, out)


def expert1_times_1_01(inputs, case, out):
    """Expert 1's contribution x1.01: the reference again with only expert 1's router weights."""
    only_e1 = torch.where(inputs.topk_ids == 1, inputs.topk_weights, torch.zeros_like(inputs.topk_weights))
    e1 = ReferenceBackend().run(replace(inputs, topk_weights=only_e1), case)
    return (out.double() + 0.01 * e1.double()).to(out.dtype)


def token3_noise(inputs, case, out):
    g = torch.Generator().manual_seed(1)
    out[3] += 0.5 * out.abs().mean() * torch.randn(out.shape[1], generator=g).to(out.dtype)
    return out


def tile_edge_halved(inputs, case, out):
    out[:, 31::32] *= 0.5  # the last column of every 32-wide column tile
    return out


def noise_everywhere(inputs, case, out):
    g = torch.Generator().manual_seed(2)
    return out + (0.05 * out.abs().mean() * torch.randn(out.shape, generator=g)).to(out.dtype)


def token2_negated(inputs, case, out):
    out[2] = -out[2]
    return out


def nan_in_expert2(inputs, case, out):
    out[(inputs.topk_ids == 2).any(1)] = float("nan")
    return out


def experts_1_to_3_rescaled(inputs, case, out):
    """Every expert but 0 off by its own factor (a per-tensor weight scale read from the wrong
    expert: the mutant tensor_scale_expert0's shape)."""
    acc = out.double()
    for e, extra in ((1, 0.2), (2, -0.1), (3, 0.15)):
        w = torch.where(inputs.topk_ids == e, inputs.topk_weights, torch.zeros_like(inputs.topk_weights))
        acc = acc + extra * ReferenceBackend().run(replace(inputs, topk_weights=w), case).double()
    return acc.to(out.dtype)


def one_ulp_up(inputs, case, out):
    return torch.nextafter(out, torch.full_like(out, float("inf")))


def _run(plant, case):
    # --gate both: the planted few-ulp bugs are conformance failures, which gate for our own kernels
    result = run_case_inprocess(case, Planted(plant.__name__, plant), backend_name=plant.__name__,
                                options=CaseOptions(gate="both"))
    rec = result.record
    assert rec.outcome == "FAIL", (rec.outcome, rec.reason)
    assert rec.diagnosis is not None and rec.diagnosis["summary"], rec
    return result


# topk=1 in fp32: every token has one expert, so expert 1's tokens show the ratio itself.
def test_expert_scale_bug_reads_expert_and_constant_ratio():
    result = _run(expert1_times_1_01, Case(M=12, N=64, K=64, E=4, topk=1, dtype="fp32", seed=7))
    d = result.record.diagnosis
    assert d["summary"].startswith("expert 1 "), d["summary"]
    assert "constant ratio 1.01 (a scale bug?)" in d["summary"], d["summary"]
    assert d["where"]["kind"] == "expert" and d["pattern"]["kind"] == "scale"
    assert d["pattern"]["ratio"] == pytest.approx(1.01, rel=1e-5)
    # the message every output shows leads with it
    assert result.message().splitlines()[0] == f"{result.record.case_id}: FAIL: {d['summary']}"


def test_expert_scale_bug_inside_the_tolerance_is_located_by_the_count_test():
    # The issue's own case: bf16, top-2, every element inside its bound, too many differing.
    d = _run(expert1_times_1_01, Case(M=7, N=64, K=64, E=4, topk=2, seed=0)).record.diagnosis
    assert d["summary"].startswith("expert 1 "), d["summary"]
    assert "(a scale bug?) inside the tolerance" in d["summary"] and d["pattern"]["kind"] == "scale", d["summary"]
    assert d["verdict"]["failed"] == ["conformance"]


def test_one_token():
    d = _run(token3_noise, Case(M=8, N=64, K=64, E=4, topk=2, seed=7)).record.diagnosis
    assert d["summary"].startswith("token 3 only: "), d["summary"]
    assert d["where"]["kind"] == "token" and d["where"]["tokens"] == [3]
    assert d["pattern"]["kind"] == "random", d["pattern"]


def test_tile_edge():
    d = _run(tile_edge_halved, Case(M=8, N=64, K=64, E=4, topk=2, seed=7)).record.diagnosis
    assert d["summary"].startswith("tile edge: columns 31, 63, the last column of 32-wide tiles"), d["summary"]
    assert d["where"]["kind"] == "tile_edge"
    assert d["pattern"]["kind"] == "scale" and d["pattern"]["ratio"] == pytest.approx(0.5, abs=0.01)


def test_everywhere_random():
    d = _run(noise_everywhere, Case(M=8, N=64, K=64, E=4, topk=2, seed=7)).record.diagnosis
    assert d["summary"].startswith("everywhere ("), d["summary"]
    assert "random-looking: mixed signs" in d["summary"], d["summary"]


def test_sign_flip():
    d = _run(token2_negated, Case(M=8, N=64, K=64, E=4, topk=2, seed=7)).record.diagnosis
    assert d["summary"].startswith("token 2 only: sign flip: kernel = -reference"), d["summary"]


def test_nan_in_one_expert():
    d = _run(nan_in_expert2, Case(M=12, N=64, K=64, E=4, topk=1, seed=7)).record.diagnosis
    assert d["summary"].startswith("expert 2 "), d["summary"]
    assert d["pattern"]["kind"] == "nan_inf" and "NaN at " in d["pattern"]["text"]


def test_one_ulp_systematic_bias():
    d = _run(one_ulp_up, Case(M=8, N=64, K=64, E=4, topk=2, seed=7)).record.diagnosis
    assert d["summary"].startswith("everywhere ("), d["summary"]
    assert "systematic 1-ulp bias" in d["summary"] and "all above it" in d["summary"], d["summary"]
    assert d["pattern"]["kind"] == "ulp_bias" and d["pattern"]["side"] == "above"
    assert "conformance" in d["verdict"]["failed"]


def test_every_expert_but_one_each_with_its_own_ratio():
    d = _run(experts_1_to_3_rescaled, Case(M=12, N=64, K=64, E=4, topk=1, seed=3)).record.diagnosis
    assert d["summary"].startswith("every expert but 0: a constant ratio per expert (expert 1: 1.2"), d["summary"]
    assert d["where"]["kind"] == "experts_but" and d["pattern"]["kind"] == "scale_per_expert"


# --- records: stored, old, and carrying the fields other parts fill ---------------------------
@pytest.fixture(scope="module")
def scale_record():
    rec = run_case_inprocess(Case(M=12, N=64, K=64, E=4, topk=1, dtype="fp32", seed=7),
                             Planted("scale", expert1_times_1_01), backend_name="scale").record
    return json.loads(json.dumps(storable(rec)))


def test_an_old_record_without_a_diagnosis_gets_the_same_one(scale_record):
    old = dict(scale_record, diagnosis=None)
    assert summary_of(old) == scale_record["diagnosis"]["summary"]
    assert diagnosis_of(CaseRecord.from_json(old))["summary"] == scale_record["diagnosis"]["summary"]


def test_verdicts_and_stages_when_present(scale_record):
    rec = copy.deepcopy(scale_record)
    rec["diagnosis"] = None
    rec["verdicts"] = {"accuracy": {"outcome": "PASS", "reason": None, "margin": 0.4},
                       "conformance": {"outcome": "FAIL", "reason": "planted", "margin": 2.0}}
    rec["gating"] = ["accuracy"]
    rec["profile"] = "vllm-fp32-epilogue"
    rec["stages"] = {"exposed": True, "first_diverging": "gemm2",
                     "stages": {"gemm2": {"max_normalized": 9.0, "worst": {"token": 10, "column": 3, "expert": 1}}}}
    d = diagnose(rec)
    assert d["verdict"]["failed"] == ["conformance"]
    assert "conformance FAIL, accuracy PASS" in d["summary"]
    assert any("not gating" in line and "profile (vllm-fp32-epilogue)" in line for line in d["verdict"]["meaning"])
    assert d["summary"].endswith("first diverging stage: gemm2 (worst at token 10, column 3, expert 1)"), d["summary"]
    assert d["panel"] == "mirror"  # the failing verdict's oracle is the one read


def test_other_outcomes_and_a_failed_check():
    assert diagnose({"outcome": "PASS"}) is None
    crash = diagnose({"outcome": "CRASH", "reason": "RuntimeError: planted\nmore"})
    assert crash["summary"] == "crashed: RuntimeError: planted"
    assert diagnose({"outcome": "SKIP", "reason": "planted skip"})["summary"] == "skipped: planted skip"
    check = diagnose({"outcome": "FAIL", "verdicts": {"accuracy": {"outcome": "PASS"}, "conformance": {"outcome": "PASS"}},
                      "checks": [{"name": "invariance rerun", "outcome": "FAIL", "reason": "2 bits differ"}]})
    assert check["summary"] == "check invariance rerun failed: 2 bits differ"


def test_junit_and_summary_lead_with_the_diagnosis_of_a_record_without_one(scale_record):
    rec = CaseRecord.from_json(dict(scale_record, diagnosis=None))
    first = CaseResult(rec).message().splitlines()[0]
    assert first == f"{rec.case_id}: FAIL: {scale_record['diagnosis']['summary']}"
