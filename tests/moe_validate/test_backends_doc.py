"""docs/BACKENDS.md's worked example, run as written, so that the page cannot rot.

The ``python`` block of the page is executed as a module: its backend loads through
``get_backend`` (the load-time contract), passes the smoke cases it supports, SKIPs the others
with its reason, and a bug planted in its activation for one expert (a source hunk, as the
selftest's mutants are planted) is localized to stage c2 and that expert.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from moe_validate.backends import get_backend
from moe_validate.matrix import Case
from moe_validate.run.case import run_case_inprocess

pytest.importorskip("reference", reason="the example is judged against the float64 reference")

DOC = Path(__file__).resolve().parents[2] / "docs" / "BACKENDS.md"
# One hunk: the activation of expert 1 scaled by 1.05 (a per-expert bug a kernel could have).
ACTIVATION_LINE = "        c2[routes] = (torch.nn.functional.silu(gate) * up).to(S)\n"
PLANTED_LINE = "        c2[routes] = (torch.nn.functional.silu(gate) * up * (1.05 if e == 1 else 1.0)).to(S)\n"
CASES = [Case(M=7, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3),
         Case(M=33, N=64, K=64, E=4, topk=3, dtype="fp16", seed=4),
         Case(M=5, N=64, K=64, E=4, topk=2, dtype="fp32", seed=5)]


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/BACKENDS.md must hold exactly one python block: the worked example"
    return blocks[0]


def _load(monkeypatch, source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{DOC.name}>", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_the_example_loads_and_passes_what_it_supports(monkeypatch):
    _load(monkeypatch, _example_source(), "my_experts")
    backend = get_backend("my_experts:PlainTorchBackend")
    for case in CASES:
        record = run_case_inprocess(case, backend, backend_name="my_experts:PlainTorchBackend").record
        assert record.outcome == "PASS", (case.id, record.reason)
        skips = [c["name"] for c in record.checks if c["outcome"] == "SKIP"]
        # the count test is a skipped check where the model lets every element differ: fp32 always
        # (its flips are too common to count), on a GPU where the fp8 MMA's or other rates allow it
        assert set(skips) - {"conformance_count"} == {"alignment_contract"}, (case.id, skips)
        assert ("conformance_count" in skips) >= (case.dtype == "fp32"), (case.id, skips)
        assert record.reason.startswith(f"PASS with {len(skips)} check(s) skipped: SKIPPED alignment contract")
        assert record.stages["exposed"] is True
    skipped = run_case_inprocess(Case(M=7, N=64, K=64, E=4, topk=2, scheme="int8_w8a16", seed=3), backend).record
    assert skipped.outcome == "SKIP" and "unquantized silu" in skipped.reason


def test_a_bug_planted_in_one_experts_activation_is_localized_to_c2_and_that_expert(monkeypatch):
    source = _example_source()
    assert source.count(ACTIVATION_LINE) == 1, "the planted hunk no longer matches the example"
    _load(monkeypatch, source.replace(ACTIVATION_LINE, PLANTED_LINE), "my_experts_planted")
    backend = get_backend("my_experts_planted:PlainTorchBackend")
    record = run_case_inprocess(CASES[0], backend).record
    assert record.outcome == "FAIL"
    stages = record.stages
    assert stages["first_diverging"] == "c2"
    assert stages["stages"]["c1"]["max_normalized"] <= 1
    assert stages["stages"]["c2"]["worst"]["expert"] == 1
    assert "unavailable" in stages["stages"]["c2_in"]  # no requantization in scheme none
    check = next(c for c in record.checks if c["name"] == "stage_localization")
    assert check["outcome"] == "FAIL"
    assert "first diverging stage c2 (expert 1, tile e1r0c" in check["reason"]
    assert "earlier stages within their bounds: c1" in check["reason"]
    assert "stage localization: first diverging stage c2" in record.reason
