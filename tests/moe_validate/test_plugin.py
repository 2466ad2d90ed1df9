"""The pytest plugin, driven through pytester: items, markers, -k, skips, failures, results files,
the merged report, junitxml, xdist, and runs that never touch it."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# pytester's in-process runs drop the modules a run imported when it ends; a native extension
# (triton's) imported afresh by a later run hangs. Imported here, they outlive every run.
import kernels  # noqa: F401
import moe_validate.compare  # noqa: F401
import moe_validate.report  # noqa: F401
import moe_validate.runner  # noqa: F401
import reference  # noqa: F401
import triton  # noqa: F401
from moe_validate.matrix import filter_cases, suite_cases
from moe_validate.results import load_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITE_TEST = """
def test_case(moe_case, moe_run):
    moe_run(moe_case)
"""
SMOKE = ("--moe-suite", "smoke")  # pinned: the default is smoke on CPU but premerge on a GPU
THREE = "*-M7N64K64E4k2-s[0-2]"  # seeds 0 (bf16), 1 (fp16), 2 (fp32): cheap smoke cases
THREE_IDS = sorted(c.id for c in filter_cases(suite_cases("smoke"), THREE))


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # fake_backends, for in-process runs
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(HERE)]))  # and for subprocesses
    pytester.makepyfile(test_suite=SUITE_TEST)
    # loads the plugin where the package is not installed (PYTHONPATH only, as on the GPU image)
    pytester.makeconftest('pytest_plugins = ["moe_validate.pytest_plugin"]')
    return pytester


def _collected_ids(result):
    return sorted(line.split("[", 1)[1].rstrip("]") for line in result.outlines if "::test_case[" in line)


def test_items_are_the_suites_case_ids(suite):
    result = suite.runpytest(*SMOKE, "--collect-only", "-q", "--moe-filter", "scheme=fp8_block128")
    expected = sorted(c.id for c in filter_cases(suite_cases("smoke"), "scheme=fp8_block128"))
    assert expected and _collected_ids(result) == expected


def test_k_selects_on_case_ids(suite):
    result = suite.runpytest(*SMOKE, "--collect-only", "-q", "-k", "lora_dual and fp8_block128")
    got = _collected_ids(result)
    assert got and all("lora_dual" in i and "fp8_block128" in i for i in got)
    assert got == sorted(c.id for c in suite_cases("smoke") if c.lora == "dual" and c.scheme == "fp8_block128")


@pytest.mark.parametrize("marker, predicate", [
    ("lora_dual", lambda c: c.lora == "dual"),
    ("scheme_int4_w4a16 and act_silu", lambda c: c.scheme == "int4_w4a16" and c.activation == "silu"),
    ("dtype_fp16 and bias", lambda c: c.dtype == "fp16" and c.bias),
    ("config_inv", lambda c: c.config == "inv"),
    ("invar_sub and dtype_fp32", lambda c: "sub" in c.invariances and c.dtype == "fp32"),
])
def test_markers_per_axis_value(suite, marker, predicate):
    result = suite.runpytest(*SMOKE, "--collect-only", "-q", "--strict-markers", "-m", marker)
    expected = sorted(c.id for c in suite_cases("smoke") if predicate(c))
    assert expected and _collected_ids(result) == expected


def test_skips_carry_the_reason_and_results_are_written(suite, tmp_path):
    results_dir = tmp_path / "res"
    junit = tmp_path / "junit.xml"
    result = suite.runpytest(*SMOKE, "--moe-filter", THREE, "--moe-backend", "fake_backends:Unsupported", "-rs",
                             "--moe-results", str(results_dir), f"--junitxml={junit}")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines([f"moe-validate results: {results_dir}", "moe-validate report:*report.html",
                                 "*SKIPPED*planted: fp32 not supported by this backend*"])
    rs = load_results([results_dir / "results-main.jsonl"])
    assert rs.complete and sorted(rs.by_id()) == THREE_IDS
    assert rs.counts()["PASS"] == 2 and rs.counts()["SKIP"] == 1
    assert rs.headers[0]["backend"] == "fake_backends:Unsupported" and rs.headers[0]["suite"] == "smoke"
    assert (results_dir / "report.html").stat().st_size > 0
    cases = ET.parse(junit).getroot().iter("testcase")
    outcomes = {tc.get("name"): {p.get("name"): p.get("value") for p in tc.iter("property")} for tc in cases}
    assert sorted(outcomes) == [f"test_case[{i}]" for i in THREE_IDS]
    assert sorted(p["moe_outcome"] for p in outcomes.values()) == ["PASS", "PASS", "SKIP"]


def test_failure_message_is_the_evaluation(suite):
    result = suite.runpytest(*SMOKE, "--moe-filter", "*-M7N64K64E4k2-s0", "--moe-backend", "fake_backends:Wrong")
    result.assert_outcomes(failed=1)
    # the diagnosis leads (issue 25): where and the planted x1.5's pattern, then the deciding reason
    result.stdout.fnmatch_lines(["*bf16-none-silu-M7N64K64E4k2-s0: FAIL: everywhere (*constant ratio 1.5 (a scale bug?)*",
                                 "reason: accuracy (budget vs exact)*",
                                 "*Mismatched elements*",
                                 "*repro: *moe-validate repro bf16-none-silu-M7N64K64E4k2-s0 "
                                 "--backend fake_backends:Wrong"])


def test_report_option_alone_keeps_results_beside_it(suite, tmp_path):
    report = tmp_path / "out" / "moe.html"
    result = suite.runpytest(*SMOKE, "--moe-filter", "*-M7N64K64E4k2-s0", "--moe-backend", "reference",
                             "--moe-report", str(report))
    result.assert_outcomes(passed=1)
    assert report.stat().st_size > 0
    assert (tmp_path / "out" / "moe.results" / "results-main.jsonl").exists()


def test_xdist_workers_write_their_own_files_and_one_report_is_merged(suite, tmp_path):
    results_dir = tmp_path / "res"
    (results_dir).mkdir()
    (results_dir / "results-gw9.jsonl").write_text("stale file from an earlier session\n")
    # -p: a subprocess parses its options before the test folder's conftest is read, and pytest 8
    # (GPU image) then takes option values for paths and never loads that conftest; naming the plugin
    # works whether or not the package is installed (the entry point has the same name)
    result = suite.runpytest_subprocess("-p", "moe_validate.pytest_plugin", *SMOKE, "-n", "2", "--moe-filter", THREE,
                                        "--moe-backend", "reference", "--moe-results", str(results_dir))
    result.assert_outcomes(passed=3)
    files = sorted(p.name for p in results_dir.glob("results-*.jsonl"))
    assert set(files) <= {"results-gw0.jsonl", "results-gw1.jsonl"} and files, files
    rs = load_results(sorted(results_dir.glob("results-*.jsonl")))
    assert sorted(rs.by_id()) == THREE_IDS and rs.complete
    assert {h["worker"] for h in rs.headers} == {f[len("results-"):-len(".jsonl")] for f in files}
    assert (results_dir / "report.html").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--moe-suite", "weekly"], "moe-validate: suite must be one of smoke, premerge, nightly, bringup*"),
    (["--moe-filter", "flavour=spicy"], "moe-validate: filter axis must be one of*"),
    (["--moe-backend", "no_such_module_xyz:B"], "moe-validate: --moe-backend: *cannot import module*"),
    (["--moe-workers-per-gpu", "-1"], "moe-validate: --moe-workers-per-gpu must be an integer >= 0*"),
])
def test_bad_options_are_usage_errors(suite, args, message):
    result = suite.runpytest(*SMOKE, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_runs_without_moe_case_are_untouched(pytester):
    pytester.makepyfile(test_plain="def test_one():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=1)
    assert not any("moe-validate" in line for line in result.outlines)


def test_plugin_import_is_light():
    code = ("import sys, moe_validate.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'triton', 'moe_validate.matrix', 'kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_a_conformance_only_failure_is_a_warned_pass_unless_moe_gate_both(suite):
    args = (*SMOKE, "--moe-filter", "*-M7N64K64E4k2-s0", "--moe-backend", "independent_experts:declared_as_spec")
    result = suite.runpytest(*args)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*ConformanceWarning: bf16-none-silu-M7N64K64E4k2-s0: conformance FAIL (not gating): "
                                 "rounds differently from its declared profile spec*"])
    gated = suite.runpytest(*args, "--moe-gate", "both")
    gated.assert_outcomes(failed=1)
    gated.stdout.fnmatch_lines(["*bf16-none-silu-M7N64K64E4k2-s0: FAIL: *conformance FAIL, accuracy PASS*",
                                "*--backend independent_experts:declared_as_spec --gate both"])
