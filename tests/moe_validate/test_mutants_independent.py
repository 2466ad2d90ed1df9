"""The independent mutant set (issue 26) stays applicable to the current kernels.

Every hunk's old snippet must occur exactly once in its kernel file (else the mutant is stale:
update the snippet, keeping the bug), and each mutant's patched files must still parse.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from moe_validate.mutants import MUTANTS
from moe_validate.mutants_independent import INDEPENDENT_AREAS, INDEPENDENT_MUTANTS

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"


@pytest.mark.parametrize("mutant", INDEPENDENT_MUTANTS, ids=lambda m: m.name)
def test_every_hunk_applies_exactly_once(mutant):
    patched = {}
    for hunk in mutant.hunks:
        source = patched.get(hunk.file) or (KERNELS / hunk.file).read_text()
        count = source.count(hunk.old)
        assert count == 1, f"{mutant.name}: the old snippet of its {hunk.file} hunk occurs {count} times (stale)"
        assert hunk.new != hunk.old, f"{mutant.name}: a hunk that changes nothing"
        patched[hunk.file] = source.replace(hunk.old, hunk.new)
    for file, source in patched.items():
        ast.parse(source, filename=f"kernels/{file} ({mutant.name})")


def test_the_set_is_large_and_covers_every_area():
    assert len(INDEPENDENT_MUTANTS) >= 45
    assert {m.area for m in INDEPENDENT_MUTANTS} == set(INDEPENDENT_AREAS)
    names = [m.name for m in INDEPENDENT_MUTANTS]
    assert len(set(names)) == len(names)
    assert not set(names) & {m.name for m in MUTANTS}, "independent names must not shadow the catalogue's"


def test_equivalents_say_why_and_are_not_expected_to_be_caught():
    for m in INDEPENDENT_MUTANTS:
        if m.equivalent_reason:
            assert m.catch == "none" and len(m.equivalent_reason) > 40, m.name
        else:
            assert m.catch in ("smoke", "premerge"), m.name


def test_reach_predicates_read_every_smoke_case():
    from moe_validate import matrix
    from moe_validate.mutants_independent import case_facts

    cases = matrix.suite_cases("smoke")
    for case in cases:
        facts = case_facts(case)
        assert facts.E == case.local_experts and facts.I == case.I
    for m in INDEPENDENT_MUTANTS:
        assert any(m.reaches(c) for c in cases), f"{m.name}: no smoke case reaches it ({m.reach_doc})"


def test_selftest_all_cases_ignores_reach_and_cap():
    from moe_validate import matrix, selftest
    from moe_validate.mutants_independent import independent_mutant_by_name

    narrow = independent_mutant_by_name("ind_lora_swigluoai_slices_swapped")
    reached = selftest.select_cases(narrow, "smoke", cap=3, on_gpu=False)
    everything = selftest.select_cases(narrow, "smoke", cap=3, on_gpu=False, all_cases=True)
    assert 1 <= len(reached) <= 3 and all(narrow.reaches(c) for c in reached)
    cheap = [c for c in matrix.suite_cases("smoke") if matrix.interpreter_cost(c) <= matrix.INTERPRETER_COST_LIMIT]
    assert sorted(c.id for c in everything) == sorted(c.id for c in cheap)


def test_selftest_cli_lists_the_independent_catalogue(capsys):
    import argparse

    from moe_validate import selftest

    parser = argparse.ArgumentParser(prog="moe-validate")
    selftest.add_selftest_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["selftest", "--catalogue", "independent", "--list-mutants"])
    assert selftest.run_selftest_command(args) == 0
    out = capsys.readouterr().out
    assert all(m.name in out for m in INDEPENDENT_MUTANTS)
    bad = parser.parse_args(["selftest", "--catalogue", "independent", "--mutant", "router_weight_dropped"])
    assert selftest.run_selftest_command(bad) == 2
