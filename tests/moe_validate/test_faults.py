"""Fault injection into the results pipeline (issue 19): each way a run used to report green while
results were missing or failures hidden, reproduced and asserted against the new behaviour.

Killed runs and compare are in test_runner.py (``test_sigkilled_run_keeps_every_finished_case``)
and test_report.py (``test_missing_cases_and_unfinished_runs_make_the_comparison_incomplete``).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.cli import main
from moe_validate.exit_codes import EXIT_CODES
from moe_validate.matrix import suite_cases
from moe_validate.results import TEXT_CAPS, ResultsWriter, load_results
from moe_validate.run import outdir
from moe_validate.run.outdir import OutDirError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CASES = [c for c in suite_cases("smoke") if c.seed in (0, 1, 2)]
SEED1 = next(c.id for c in CASES if c.seed == 1)
# A cheap CLI selection (the smoke cases of one shape) for subprocess runs.
CLI_FILTER = "M7N64K64E4k2"


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), TRITON_INTERPRET="1")


def _cli(*argv):
    return [sys.executable, "-m", "moe_validate.cli", *argv]


def _one_line_error(capsys, argv, code, needle):
    assert main(argv) == code
    # a run that started announced itself first ("run: suite ..., N cases"): the error is the one line after
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("run: suite "))
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def _case_lines(path: Path) -> int:
    return path.read_text().count('"kind": "case"') if path.exists() else 0


# --- run identity: one run per --out, locked while it writes ------------------------------------
def test_every_record_carries_the_run_identity(tmp_path):
    summary = runner.run_cases(CASES, "fake_backends:Pass", tmp_path, workers=0, suite="smoke", progress=None)
    rs = load_results([summary.results_path])
    (run,) = rs.runs
    header = run.headers[0]
    assert header.run_id == summary.run_id and header.backend == "fake_backends:Pass" and header.suite == "smoke"
    assert header.expected_cases == [c.id for c in CASES] and header.case_count == 3 and header.expected_digest
    assert all(c.run_id == summary.run_id for c in rs.cases) and run.footers[0].run_id == summary.run_id
    assert rs.completeness_line() == "3 of 3 expected cases present"


def test_a_second_run_into_the_same_out_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    first = runner.run_cases(CASES, "fake_backends:Raise", tmp_path, workers=0, progress=None)
    before = first.results_path.read_bytes()
    with pytest.raises(OutDirError, match="already holds results.jsonl .*fake_backends:Raise.*--resume.*--overwrite"):
        runner.run_cases(CASES, "fake_backends:Pass", tmp_path, workers=0, progress=None)
    assert first.results_path.read_bytes() == before, "a refused run must not touch the file"
    argv = ["run", "--suite", "smoke", "--filter", "seed=0", "--backend", "fake_backends:Pass", "--workers", "0",
            "--out", str(tmp_path), "--no-report"]
    _one_line_error(capsys, argv, 2, "already holds results.jsonl")
    # --overwrite starts over: one run, the new backend's, and the FAIL of the old run is gone with it.
    assert main(argv + ["--overwrite"]) == 0
    rs = load_results([first.results_path])
    assert len(rs.runs) == 1 and rs.runs[0].backend == "fake_backends:Pass"
    capsys.readouterr()


def test_a_directory_in_use_is_refused(tmp_path):
    with outdir.locked(tmp_path):
        with pytest.raises(OutDirError, match=f"in use by another moe-validate run \\(pid {os.getpid()}\\)"):
            # Another process holds the lock in real life; flock locks are per open file, so
            # a second open here contends the same way.
            runner.run_cases(CASES, "fake_backends:Pass", tmp_path, workers=0, progress=None)


def test_interleaved_runs_in_one_file_are_grouped_never_last_wins(tmp_path):
    # Two runs appending to one file (an old harness, or a hand-made concatenation): a FAIL of one
    # run must not be overwritten by a PASS of the other.
    a = runner.run_cases(CASES, "fake_backends:Raise", tmp_path / "a", workers=0, progress=None)
    b = runner.run_cases(CASES, "fake_backends:Raise", tmp_path / "b", workers=0, progress=None)
    mixed = tmp_path / "mixed.jsonl"
    la, lb = a.results_path.read_text().splitlines(True), b.results_path.read_text().splitlines(True)
    mixed.write_text("".join(x for pair in zip(la, lb) for x in pair))
    with pytest.raises(Exception, match="recorded by two runs"):
        load_results([mixed])
    one = load_results([mixed], run=a.run_id[:8])
    assert one.by_id()[SEED1].outcome == "CRASH" and len(one.cases) == 3 and one.complete


# --- resume: a torn tail repaired, only the missing cases run ------------------------------------
def test_torn_tail_then_resume_runs_only_the_missing_cases(tmp_path, capsys):
    argv = ["run", "--suite", "smoke", "--filter", CLI_FILTER, "--backend", "fake_backends:Pass", "--workers", "0",
            "--out", str(tmp_path), "--no-report"]
    assert main(argv) == 0
    capsys.readouterr()
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(True)
    expected = json.loads(lines[0])["expected_cases"]
    assert len(expected) >= 4
    # Killed while writing its third case: two whole cases and half a line, no footer.
    path.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 3  # incomplete, still readable
    capsys.readouterr()
    assert main(argv) == 2  # refused without --resume
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    capsys.readouterr()
    rs = load_results([path])
    assert rs.problems == [] and rs.complete and len(rs.runs) == 1
    assert sorted(c.case_id for c in rs.cases) == sorted(expected)
    (run,) = rs.runs
    assert [h.segment for h in run.headers] == [0, 1]
    assert "repaired a torn last line" in run.headers[1].extra["resume_notes"][0]
    # Only the missing cases ran in the resumed segment.
    resumed = path.read_text().splitlines()[3:]
    assert sum('"kind": "case"' in line for line in resumed) == len(expected) - 2
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 0
    assert f"{len(expected)} of {len(expected)} expected cases present" in capsys.readouterr().out


def test_resume_refuses_another_selection_or_backend(tmp_path):
    runner.run_cases(CASES, "fake_backends:Pass", tmp_path, workers=0, progress=None)
    with pytest.raises(OutDirError, match="selection \\(2 cases\\) is not the one"):
        runner.run_cases(CASES[:2], "fake_backends:Pass", tmp_path, workers=0, progress=None, resume=True)
    with pytest.raises(OutDirError, match="is a run of backend 'fake_backends:Pass'"):
        runner.run_cases(CASES, "reference", tmp_path, workers=0, progress=None, resume=True)
    with pytest.raises(OutDirError, match="holds no results.jsonl"):
        runner.run_cases(CASES, "reference", tmp_path / "empty", workers=0, progress=None, resume=True)


# --- the parent never dies on a record --------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_an_unserializable_config_is_stored_with_a_note(tmp_path, workers):
    summary = runner.run_cases(CASES[:1], "fake_backends:Unserializable", tmp_path, workers=workers, timeout_s=120,
                               progress=None)
    assert summary.exit_code == 0
    (rec,) = load_results([summary.results_path]).cases
    assert rec.outcome == "PASS"
    config = rec.config
    assert config["fine"] == 64 and config["scale"] == [0.5, 2.0]
    assert "{16, 32}" in config["tiles"] and "lambda" in config["pick"] and "('BLOCK_M', 1)" in config
    assert any("config.tiles: set is not JSON-serializable" in n for n in rec.notes), rec.notes


def test_an_exception_whose_str_raises_is_a_crash_record(tmp_path):
    summary = runner.run_cases(CASES[:1], "fake_backends:HostileError", tmp_path, workers=0, progress=None)
    (rec,) = load_results([summary.results_path]).cases
    assert rec.outcome == "CRASH" and "_Hostile" in rec.reason and summary.exit_code == 1


def test_huge_messages_are_capped_head_and_tail(tmp_path):
    summary = runner.run_cases(CASES[:1], "fake_backends:HugeError", tmp_path, workers=0, progress=None)
    assert summary.results_path.stat().st_size < 100_000
    (rec,) = load_results([summary.results_path]).cases
    assert rec.outcome == "CRASH" and len(rec.reason) <= 300
    assert len(rec.error) < TEXT_CAPS["error"] + 200
    assert "Traceback" in rec.error and "tail-of-message" in rec.error and "characters omitted" in rec.error
    assert any("error:" in n and "capped" in n for n in rec.notes)


# --- harness errors: one line, a documented status, a readable file ---------------------------
class _FullDisk:
    """Writes succeed until ``budget`` bytes, then fail with ENOSPC (part of a line may land first)."""

    def __init__(self, fh, budget):
        self.fh, self.budget = fh, budget

    def write(self, data):
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.budget)
        self.budget -= n
        return self.fh.write(bytes(data[:n]))

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_a_full_disk_is_a_one_line_harness_error_and_the_file_stays_readable(tmp_path, capsys, monkeypatch):
    original_init = ResultsWriter.__init__

    def init(self, path):
        original_init(self, path)
        self._fh = _FullDisk(self._fh, budget=self._good_size + 9_000)  # the header and a case or two

    monkeypatch.setattr(ResultsWriter, "__init__", init)
    argv = ["run", "--suite", "smoke", "--filter", CLI_FILTER, "--backend", "fake_backends:Pass", "--workers", "0",
            "--out", str(tmp_path)]
    err = _one_line_error(capsys, argv, 4, "harness error: cannot write ")
    assert "results.jsonl: No space left on device" in err and "--resume" in err
    rs = load_results([tmp_path / "results.jsonl"])  # no torn line: cut back to the last whole record
    assert rs.problems == [] and not rs.complete
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(HERE))
    assert main(argv + ["--resume", "--no-report"]) == 0  # space again: the run finishes
    assert load_results([tmp_path / "results.jsonl"]).complete


def test_an_unwritable_out_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    base = ["run", "--suite", "smoke", "--filter", "seed=0", "--backend", "fake_backends:Pass", "--workers", "0"]
    _one_line_error(capsys, base + ["--out", str(not_a_dir / "sub")], 2, "cannot be created")
    # A read-only file system (root ignores chmod, so the refusal is faked at the write probe).
    real_write_bytes = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".moe-validate-probe"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    _one_line_error(capsys, base + ["--out", str(tmp_path / "ro")], 2, "is not writable: Read-only file system")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_non_finite_or_non_positive_timeouts_are_usage_errors(capsys, value):
    _one_line_error(capsys, ["run", "--suite", "smoke", "--filter", "seed=0", "--timeout", value], 2,
                    "--timeout must be a positive finite number of seconds")


# --- hangs: a cap per run, and workers that die with their parent ------------------------------
def test_consecutive_timeouts_stop_the_backend_and_the_rest_is_not_run(tmp_path):
    cases = [c for c in suite_cases("smoke") if c.seed in (0, 1, 2, 3)][:4]
    t0 = time.monotonic()
    summary = runner.run_cases(cases, "fake_backends:HangAll", tmp_path, workers=1, timeout_s=1.0,
                               max_consecutive_timeouts=2, progress=None)
    elapsed = time.monotonic() - t0
    rs = load_results([summary.results_path])
    outcomes = sorted(c.outcome for c in rs.cases)
    assert outcomes == ["NOT_RUN", "NOT_RUN", "TIMEOUT", "TIMEOUT"]
    assert all("not run: 2 cases timed out in a row" in c.reason for c in rs.cases if c.outcome == "NOT_RUN")
    assert summary.stopped and "the backend looks hung" in summary.stopped
    assert summary.exit_code == 3 and summary.present == 2 and summary.expected == 4
    assert rs.runs[0].footers[0].stopped == summary.stopped and not rs.complete
    assert "2 of 4 expected cases present" in rs.completeness_line()
    # Two hangs and two worker starts; no third spawn for the cases not run.
    assert len(list((tmp_path / "logs").glob("worker-0-*.log"))) == 2
    assert elapsed < 60


def test_a_hung_worker_dies_with_its_sigkilled_parent(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", "--suite", "smoke", "--filter", "seed=1", "--backend", "fake_backends:Hang",
                                 "--workers", "1", "--timeout", "300", "--out", str(out), "--no-report"),
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def worker_pid():
            for log in (out / "logs").glob("worker-*.log") if (out / "logs").exists() else ():
                text = log.read_text()
                if "=== moe-validate case" in text:
                    return int(text.split("moe-validate worker pid ", 1)[1].split(":", 1)[0])
            return None

        _wait_for(lambda: worker_pid() is not None, 120, "the worker to start its hanging case")
        pid = worker_pid()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie waiting for its (new) parent to reap it is dead too.
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
        except (OSError, IndexError):
            return True

    _wait_for(gone, 10, f"worker {pid} to die with its parent")


# --- Ctrl-C: what finished is kept and reported --------------------------------------------------
def _as_from_a_terminal():
    """In the child before exec: SIGINT delivered and at its default, as a shell starts a command. A
    child inherits its parent thread's signal mask and ignored signals, and the test process's are
    whatever ran in it before (multiprocessing, for one, blocks SIGINT while it spawns a helper). With
    SIGINT blocked the run never sees the Ctrl-C and finishes every case with exit 0: what CI saw twice,
    and what blocking it before Popen reproduces."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    try:
        return " ".join(line.strip() for line in open(f"/proc/{pid}/status") if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError:
        return "unknown"


def test_ctrl_c_writes_the_report_of_what_finished_and_prints_its_path(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", "--suite", "smoke", "--filter", CLI_FILTER, "--backend", "fake_backends:Slow",
                                 "--workers", "0", "--out", str(out)),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    _wait_for(lambda: _case_lines(out / "results.jsonl") >= 2, 120, "two finished cases")
    state = _signal_state(proc.pid)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"the run's signal state when sent SIGINT: {state}\n{stderr}"
    assert f"report:  {out / 'report.html'}" in stdout and (out / "report.html").stat().st_size > 0
    assert f"results: {out / 'results.jsonl'}" in stdout and "Traceback" not in stderr
    rs = load_results([out / "results.jsonl"])
    assert rs.runs[0].footers[-1].interrupted and not rs.complete and rs.problems == []
    assert "interrupted" in (out / "report.html").read_text()


# --- the exit-code table ------------------------------------------------------------------------
def test_the_readme_exit_code_table_matches_the_cli(capsys):
    readme = (REPO / "README.md").read_text()
    for code, text in EXIT_CODES:
        assert f"| {code} | {text} |" in readme, f"README must table exit status {code}: {text}"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for code, text in EXIT_CODES:
        assert f"{code:<4} {text}" in help_text
