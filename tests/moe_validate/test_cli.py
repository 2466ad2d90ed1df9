"""moe-validate: each subcommand, and bad input as one line on stderr with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.cli import main
from moe_validate.matrix import filter_cases, suite_cases

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CASES = [c for c in suite_cases("smoke") if c.seed in (0, 1, 2)]
SEED1 = next(c.id for c in CASES if c.seed == 1)


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the same cases: all passing, then with a planted crash on seed 1."""
    base = tmp_path_factory.mktemp("runs")
    good = runner.run_cases(CASES, "fake_backends:Pass", base / "good", workers=0, progress=None)
    bad = runner.run_cases(CASES, "fake_backends:Raise", base / "bad", workers=0, progress=None)
    return good.results_path, bad.results_path


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-validate: error: "), err
    assert "Traceback" not in err and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["list", "--suite", "weekly"], "suite must be one of smoke, premerge, nightly, bringup"),
    (["list", "--filter", "flavour=spicy"], "filter axis must be one of"),
    (["run", "--suite", "smoke", "--filter", "dtype=fp32 and not dtype=fp32"], "matches no case of suite"),
    (["run", "--suite", "smoke", "--filter", "scheme=no_such_scheme"], "filter value for scheme must be one of none,"),
    (["list", "--filter", "invariance=foo"], "filter value for invariance must be none or a '+'-joined subset of rerun"),
    (["list", "--filter", "config=zzz"], "filter value for config must be one of auto, inv or a launch config"),
    (["list", "--filter", "group_size=7"], "filter value for group_size must be one of 32, 64, 128 or none"),
    (["run", "--shard", "3/2"], "shard must be 'i/n'"),
    (["run", "--suite", "smoke", "--workers", "-1", "--filter", "seed=0"], "--workers must be >= 0"),
    (["run", "--workers", "two"], "invalid int value: 'two'"),
    (["run", "--suite", "smoke", "--backend", "no_such_module_xyz:B", "--filter", "seed=0"], "cannot import module"),
    (["repro", "not-a-case-id"], "case id 'not-a-case-id'"),
    (["repro", "bf16-none-silu-M7N64K64E4k9-s0"], "is not a valid case"),
    (["report", "/nonexistent/results.jsonl"], "does not exist"),
    (["compare", "/nonexistent/a.jsonl", "/nonexistent/b.jsonl"], "does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    _one_line_error(capsys, argv, needle)


def test_unreadable_results_files(tmp_path, capsys, runs):
    good, _ = runs
    lines = good.read_text().splitlines(keepends=True)
    torn_middle = tmp_path / "torn.jsonl"
    torn_middle.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + "\n" + "".join(lines[2:]))
    _one_line_error(capsys, ["report", str(torn_middle)], "torn.jsonl:2: not a JSON record")
    _one_line_error(capsys, ["report", str(tmp_path)], "is a directory")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(capsys, ["report", str(binary)], "cannot read results file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(capsys, ["report", str(empty)], "no records")


def test_list_prints_ids_and_a_count(capsys):
    assert main(["list", "--suite", "smoke", "--filter", "scheme=fp8_block128"]) == 0
    captured = capsys.readouterr()
    expected = [c.id for c in filter_cases(suite_cases("smoke"), "scheme=fp8_block128")]
    assert captured.out.split() == expected and expected
    assert captured.err.strip() == f"{len(expected)} cases in suite smoke matching 'scheme=fp8_block128'"


def test_list_default_suite_is_the_machines(capsys):
    import torch

    from moe_validate.matrix import default_suite

    name = default_suite(torch.cuda.is_available())  # smoke on CPU, premerge on a GPU
    assert main(["list"]) == 0
    assert capsys.readouterr().err.startswith(f"{len(suite_cases(name))} cases in suite {name}")


def test_repro_pass_and_fail(capsys):
    assert main(["repro", CASES[0].id, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{CASES[0].id}: PASS") and "PASS in" in out
    assert main(["repro", CASES[0].id, "--backend", "fake_backends:Wrong"]) == 1
    out = capsys.readouterr().out
    assert f"{CASES[0].id}: FAIL" in out and "Mismatched elements" in out


def test_report_renders_with_a_baseline(tmp_path, capsys, runs):
    good, bad = runs
    out = tmp_path / "report.html"
    assert main(["report", str(bad), "--out", str(out), "--baseline", str(good)]) == 1  # a case crashed
    stdout = capsys.readouterr().out
    assert f"report: {out}" in stdout and out.stat().st_size > 0
    assert "3 cases: 2 PASS, 1 CRASH" in stdout


def test_report_refuses_two_runs_of_the_same_cases(tmp_path, capsys, runs):
    # Same three case ids in both files, two backends: never merged (issue 19).
    good, bad = runs
    _one_line_error(capsys, ["report", str(good), str(bad), "--out", str(tmp_path / "r.html")], "results mix backends")


def test_compare_reports_regressions_with_exit_1(capsys, runs):
    good, bad = runs
    assert main(["compare", str(good), str(bad)]) == 1
    assert SEED1 in capsys.readouterr().out
    assert main(["compare", str(bad), str(good)]) == 0  # a fix is not a regression
    assert SEED1 in capsys.readouterr().out


def test_env_json(capsys):
    import json

    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert {"gpu", "capability", "torch", "triton", "interpreter", "commit"} <= set(env) and env["torch"]


def test_run_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--suite", "smoke", "--filter", "seed=1", "--backend", "reference", "--workers", "0", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert f"results: {out / 'results.jsonl'}" in stdout and f"report:  {out / 'report.html'}" in stdout
    assert "1 cases in" in stdout and "1 PASS" in stdout
    assert (out / "report.html").stat().st_size > 0


def test_run_exit_code_on_failure(tmp_path, capsys):
    code = main(["run", "--suite", "smoke", "--filter", "seed=1", "--backend", "fake_backends:Wrong", "--workers", "0",
                 "--out", str(tmp_path), "--no-report"])
    stdout = capsys.readouterr().out
    assert code == 1 and f"not passing: {SEED1}" in stdout
    assert not (tmp_path / "report.html").exists()


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, a shard of a filtered suite, through one spawned worker."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), TRITON_INTERPRET="1")
    exe = Path(sys.executable).with_name("moe-validate")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moe_validate.cli"]
    done = subprocess.run(cmd + ["run", "--suite", "smoke", "--filter", "*-M7N64K64E4k2-s[0-2]", "--shard", "1/2",
                                 "--backend", "reference", "--out", str(tmp_path), "--no-report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 cases in" in done.stdout and "2 PASS" in done.stdout
    assert "[2/2] PASS" in done.stderr  # plain progress lines when stderr is not a TTY


def test_selftest_is_delegated(capsys):
    from moe_validate.mutants import MUTANTS

    assert main(["selftest", "--list-mutants"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [m.name for m in MUTANTS]


def test_repro_lists_the_checks_after_the_comparison(capsys):
    # The reference backend declares run-to-run only: perm and sub are shown as SKIP, not hidden; so
    # is fp32's count test, which cannot fail (its model lets every element differ)
    case_id = "fp32-none-silu-M7N64K64E4k3-invar_rerun+perm+sub-s190"
    assert main(["repro", case_id, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert ("checks: alignment_contract SKIP, invariance:rerun PASS, invariance:perm SKIP, invariance:sub SKIP, "
            "conformance_count SKIP, contract PASS") in out
    assert "SKIPPED invariance perm" in out


# --- issue 25: the diagnosis first, coverage said, a contract a user can read --------------------
def test_repro_leads_with_the_diagnosis(capsys):
    assert main(["repro", CASES[0].id, "--backend", "fake_backends:Wrong"]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    # the planted x1.5 everywhere: where, the pattern, the verdicts, on the first line
    assert first.startswith(f"{CASES[0].id}: FAIL: everywhere (") and "constant ratio 1.5 (a scale bug?)" in first, first


def test_run_says_its_coverage_up_front_and_at_the_end(tmp_path, capsys):
    # fp32 (seed 2) is unsupported by the planted backend: 1 of 2 cases skipped
    argv = ["run", "--suite", "smoke", "--filter", "*-M7N64K64E4k2-s[23]", "--backend", "fake_backends:Unsupported",
            "--workers", "0", "--no-report"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first == ("run: suite smoke, backend fake_backends:Unsupported, Triton interpreter (CPU), 2 cases, "
                     "no time estimate for this backend and device"), first
    assert captured.out.splitlines()[-1] == "ran 1 of 2 (1 skipped: planted: fp32 not supported by this backend)"
    # --max-skip: half the cases skipped is more than 0.25 allows: incomplete (exit 3)
    assert main(argv + ["--out", str(tmp_path / "b"), "--max-skip", "0.25"]) == 3
    assert "50% of the cases skipped, more than --max-skip 0.25 allows: exit 3" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "c"), "--max-skip", "0.5"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, argv + ["--out", str(tmp_path / "d"), "--max-skip", "1.5"], "--max-skip must be a fraction")


def test_the_first_line_estimates_an_interpreter_run_from_the_cost_model():
    from moe_validate.coverage import INTERPRETER_CASE_OVERHEAD_S, INTERPRETER_MACS_PER_S, plan_line
    from moe_validate.matrix import interpreter_cost

    cases = suite_cases("premerge")
    slow = [c for c in cases if c.device_skip_reason(None, True)]
    line = plan_line("premerge", "triton", cases, interpreting=True)
    seconds = sum(INTERPRETER_CASE_OVERHEAD_S + interpreter_cost(c) / INTERPRETER_MACS_PER_S
                  for c in cases if c not in slow)
    assert line.startswith(f"run: suite premerge, backend triton, Triton interpreter (CPU), {len(cases)} cases "
                           f"({len(slow)} will skip: too slow under the interpreter, run them on a GPU), estimate ~"), line
    assert slow and f"~{round(seconds / 60)} min" in line or f"~{round(seconds)} s" in line, (line, seconds)


def test_run_end_lists_each_failure_with_its_diagnosis(tmp_path, capsys):
    assert main(["run", "--suite", "smoke", "--filter", "seed=1", "--backend", "fake_backends:Wrong", "--workers", "0",
                 "--out", str(tmp_path), "--no-report"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(f"  {SEED1}: FAIL: "))
    assert "constant ratio 1.5 (a scale bug?)" in line, line


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("moe-validate 0.1.0 (commit ") and out.endswith(")"), out


def _actions(parser, path=("moe-validate",)):
    import argparse

    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))


def test_every_argument_of_every_subcommand_has_help():
    from moe_validate.cli import build_parser

    walked = list(_actions(build_parser()))
    # the top level and each subcommand (selftest's own options: moe_validate/selftest.py, below)
    assert len({p for p, _ in walked}) >= 10
    import argparse

    from moe_validate.selftest import add_selftest_parser

    holder = argparse.ArgumentParser().add_subparsers()
    walked += list(_actions(add_selftest_parser(holder), ("moe-validate", "selftest")))
    lacking = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in walked if not (a.help and a.help.strip())]
    assert not lacking, lacking


@pytest.mark.parametrize("command, needles", [
    ("repro", ["CASE_ID", "a case id as run, list and the report print it", "--backend"]),
    ("env", ["--json", "one JSON object"]),
])
def test_repro_and_env_help_describe_their_arguments(capsys, command, needles):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, out


def test_bench_refuses_at_once_without_a_gpu(capsys):
    # the tests run under TRITON_INTERPRET=1 (conftest): no native Triton, so bench must refuse
    assert main(["bench", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no row, not even a header, before the refusal
    assert captured.err.count("\n") == 1 and "bench needs a CUDA GPU" in captured.err, captured.err


def test_list_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from moe_validate.cli import main; "
            "rc = main(['list']) + main(['list', '--suite', 'premerge', '--filter', 'scheme=fp8_block128']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc, round(time.perf_counter() - t, 3), "
            "file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    verdict = done.stderr.strip().splitlines()[-1].split()
    assert verdict[:2] == ["NO-TORCH", "0"], done.stderr
    print(f"list twice, torch-free: {verdict[2]} s")
