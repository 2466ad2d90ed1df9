"""moe_validate.rerun: ``run --rerun-failed`` picks the cases whose last outcome was not PASS/SKIP."""

import json
import sys
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.matrix import filter_cases, suite_cases
from moe_validate.rerun import failed_cases

HERE = Path(__file__).resolve().parent
# Under fake_backends:Mixed: bf16 s0 PASS, fp16 s1 CRASH, fp32 s2 SKIP, bf16 s3 FAIL.
CASES = filter_cases(suite_cases("smoke"), "*-none-silu-M7N64K64E4k2-s[0-3]")
BY_SEED = {c.seed: c for c in CASES}


@pytest.fixture()
def mixed_results(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        return runner.run_cases(CASES, "fake_backends:Mixed", tmp_path / "run", workers=0, progress=None,
                                suite="smoke").results_path
    finally:
        sys.path.remove(str(HERE))


def test_the_crash_and_the_failure_are_rerun_not_the_pass_or_skip(mixed_results):
    suite, cases = failed_cases(mixed_results)
    assert suite == "smoke"
    assert sorted(c.id for c in cases) == sorted([BY_SEED[1].id, BY_SEED[3].id])
    assert [c for c in cases if c.id == BY_SEED[1].id] == [BY_SEED[1]]  # rebuilt from params, equal to the suite's
    assert [c.id for c in failed_cases(mixed_results, "dtype=fp16")[1]] == [BY_SEED[1].id]


def test_the_last_record_of_a_case_decides_and_a_torn_line_is_skipped(mixed_results):
    lines = Path(mixed_results).read_text().splitlines()
    crash = next(json.loads(line) for line in lines if BY_SEED[1].id in line and '"kind": "case"' in line)
    with open(mixed_results, "a") as f:  # a later resume passed it
        f.write(json.dumps({**crash, "outcome": "PASS", "reason": None, "error": None}) + "\n")
        f.write('{"kind": "case", "case_id": "torn')
    assert [c.id for c in failed_cases(mixed_results)[1]] == [BY_SEED[3].id]


def test_unusable_files_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="--rerun-failed: .*missing.jsonl does not exist"):
        failed_cases(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"kind": "footer"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a JSON record"):
        failed_cases(bad)
    bad.write_text('{"kind": "case", "case_id": "x", "outcome": "MAYBE"}\n{"kind": "footer"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: outcome must be one of PASS, FAIL"):
        failed_cases(bad)


def test_cli_rerun_failed_runs_only_those_and_writes_junit(mixed_results, tmp_path, monkeypatch, capsys):
    """``run --rerun-failed FILE --junitxml X``: the two non-passing cases run again (here with a
    backend that passes them) and the XML lists exactly those."""
    import xml.etree.ElementTree as ET

    from moe_validate.cli import main

    monkeypatch.syspath_prepend(str(HERE))
    junit = tmp_path / "rerun.xml"
    code = main(["run", "--rerun-failed", str(mixed_results), "--backend", "fake_backends:Pass", "--workers", "0",
                 "--out", str(tmp_path / "again"), "--no-report", "--junitxml", str(junit)])
    assert code == 0, capsys.readouterr()
    testcases = list(ET.parse(junit).getroot().iter("testcase"))
    assert sorted(tc.get("name") for tc in testcases) == sorted([BY_SEED[1].id, BY_SEED[3].id])
    # passed: no outcome element (only the verdicts' properties)
    assert all(tc.get("classname").startswith("moe_validate.smoke.") and [c.tag for c in tc] in ([], ["properties"])
               for tc in testcases)
    assert f"junit:   {junit}" in capsys.readouterr().out


def test_cli_rerun_failed_of_a_missing_file_is_a_usage_error(tmp_path, capsys):
    from moe_validate.cli import main

    assert main(["run", "--rerun-failed", str(tmp_path / "nope.jsonl"), "--workers", "0"]) == 2
    assert "--rerun-failed: " in capsys.readouterr().err
