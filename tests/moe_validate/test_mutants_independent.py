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
