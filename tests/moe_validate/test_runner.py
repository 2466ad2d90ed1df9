"""The runner: outcomes, worker isolation (crash, exit, segfault, hang), sharding, killed runs.

Fake backends with planted misbehaviour live in ``fake_backends.py`` beside this file; their
passing answers come from the float64 reference, so a PASS here is a real comparison.
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.matrix import suite_cases
from moe_validate.results import Outcome, load_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Three cheap smoke cases (seeds 0, 1, 2); the fakes misbehave on seed 1 only.
CASES = [c for c in suite_cases("smoke") if c.seed in (0, 1, 2)]
SEED1 = next(c.id for c in CASES if c.seed == 1)


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    # Spawned workers inherit sys.path; CLI subprocesses get it through PYTHONPATH.
    monkeypatch.syspath_prepend(str(HERE))


def _records(path):
    return load_results([path]).by_id()


def test_cases_fixture_is_what_the_fakes_expect():
    assert [c.seed for c in CASES] == [0, 1, 2]


# --- in-process outcomes ----------------------------------------------------------------------
@pytest.mark.parametrize("backend, outcome, reason_part", [
    ("fake_backends:Pass", Outcome.PASS, None),
    ("fake_backends:Wrong", Outcome.FAIL, "accuracy (budget vs exact)"),
    ("fake_backends:Oom", Outcome.OOM, "out of memory"),
    ("fake_backends:CompileError", Outcome.COMPILE_ERROR, "kernel launch failed"),
])
def test_inprocess_outcome_classification(backend, outcome, reason_part):
    result = runner.run_case_inprocess(CASES[0], backend, device="cpu")
    rec = result.record
    assert rec["outcome"] == outcome.value, result.message()
    assert rec["case_id"] == CASES[0].id and rec["params"] == CASES[0].params()
    assert rec["backend"] == backend
    assert rec["repro"].endswith(f"moe-validate repro {CASES[0].id} --backend {backend}")
    if reason_part:
        assert reason_part in rec["reason"]
    if outcome is Outcome.PASS:
        assert rec["error"] is None and rec["worst_margin"] is not None and rec["worst_margin"] <= 1
        assert set(rec["tolerance"]) == {"gate", "budget"} and set(rec["metrics"]) == {"mirror", "exact"}
        assert rec["config"] == {"BLOCK_M": 16, "planted": "none"}
    if outcome is Outcome.FAIL:
        assert rec["detail"] is not None and rec["worst_margin"] > 1
        assert CASES[0].id in result.message()
    if outcome in (Outcome.OOM, Outcome.COMPILE_ERROR):
        assert "Traceback" in rec["error"]


def test_unsupported_case_is_a_skip_with_the_backends_reason():
    fp32 = next(c for c in CASES if c.dtype == "fp32")
    result = runner.run_case_inprocess(fp32, "fake_backends:Unsupported", device="cpu")
    assert result.outcome is Outcome.SKIP
    assert result.record["reason"] == "planted: fp32 not supported by this backend"


def test_classify_exception_reads_the_cause_chain():
    import torch
    from triton.compiler.errors import CompilationError

    assert runner.classify_exception(ValueError("x")) is Outcome.CRASH
    assert runner.classify_exception(torch.cuda.OutOfMemoryError("oom")) is Outcome.OOM
    try:
        try:
            raise CompilationError(None, None, "bad tile")
        except CompilationError as inner:
            raise RuntimeError("launch") from inner
    except RuntimeError as outer:
        assert runner.classify_exception(outer) is Outcome.COMPILE_ERROR


def test_inprocess_run_records_a_crash_and_continues(tmp_path):
    progress = io.StringIO()
    summary = runner.run_cases(CASES, "fake_backends:Raise", tmp_path, workers=0, progress=progress)
    recs = _records(summary.results_path)
    assert recs[SEED1]["outcome"] == "CRASH" and "planted failure" in recs[SEED1]["reason"]
    assert "Traceback" in recs[SEED1]["error"]
    assert [recs[c.id]["outcome"] for c in CASES if c.seed != 1] == ["PASS", "PASS"]
    assert summary.exit_code == 1 and summary.bad_cases == [SEED1]
    # Not a TTY: one plain line per finished case, in order.
    lines = progress.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("[1/3] PASS")
    assert any(line.startswith("[2/3] CRASH") and SEED1 in line for line in lines)


def test_results_file_has_header_cases_and_footer(tmp_path):
    summary = runner.run_cases(CASES[:1], "reference", tmp_path, workers=0, suite="smoke", progress=None)
    rs = load_results([summary.results_path])
    assert rs.complete and len(rs.headers) == 1 and len(rs.cases) == 1
    header = rs.headers[0]
    assert header["backend"] == "reference" and header["suite"] == "smoke"
    assert header["env"]["torch"] and "interpreter" in header["env"]
    assert rs.footers[0]["counts"]["PASS"] == 1
    assert summary.exit_code == 0


# --- worker processes ---------------------------------------------------------------------
@pytest.mark.parametrize("backend, expected", [
    ("fake_backends:Segfault", "signal SIGSEGV"),
    ("fake_backends:Exit", "exit code 3"),
])
def test_dying_worker_is_a_crash_row_and_the_run_continues(tmp_path, backend, expected):
    summary = runner.run_cases(CASES, backend, tmp_path, workers=1, timeout_s=120, progress=None)
    rs = load_results([summary.results_path])
    recs = rs.by_id()
    assert rs.complete, "the run must end cleanly with a footer after a worker death"
    assert recs[SEED1]["outcome"] == "CRASH"
    assert expected in recs[SEED1]["reason"] and "worker replaced" in recs[SEED1]["reason"]
    assert recs[SEED1]["repro"].endswith(f"--backend {backend}")
    # The cases after the crash ran in a fresh worker and passed.
    assert sorted(r["outcome"] for r in rs.cases) == ["CRASH", "PASS", "PASS"]
    if "SEGV" in expected:
        # faulthandler in the worker wrote where it died into the worker log, kept in the record.
        assert "Segmentation fault" in recs[SEED1]["error"] and "fake_backends.py" in recs[SEED1]["error"]


def test_poisoned_cuda_context_retires_the_worker(tmp_path):
    summary = runner.run_cases(CASES, "fake_backends:Poison", tmp_path, workers=1, timeout_s=120, progress=None)
    recs = _records(summary.results_path)
    assert recs[SEED1]["outcome"] == "CRASH"
    assert recs[SEED1]["reason"].startswith("CUDA context poisoned: RuntimeError: CUDA error")
    assert sorted(r["outcome"] for r in recs.values()) == ["CRASH", "PASS", "PASS"]
    # One log per worker process: the first retired itself after the fault, a second took over.
    assert len(list((tmp_path / "logs").glob("worker-0-*.log"))) == 2


def test_hanging_case_times_out_and_the_worker_is_replaced(tmp_path):
    """One worker: it hangs on seed 1, is killed at the limit and replaced, and seed 2 still runs.

    Asserts outcomes only. How long the run takes depends on the host's load (a respawn imports
    torch again), so the clocks here are generous: a per-case limit far above what a correct tiny
    case takes on a loaded host, and an overall bound that turns a hung run into a failure instead
    of a hung test session. The limit's clock starts when the worker starts the case (its imports
    are not on it); the correct cases here take 0.02-0.24 s, measured with four CPU hogs on the 2
    cores of the CI host (issue 22). 4 s timed out the correct cases too on a 2-core host emulating
    AVX2 with a CPU hog; 12 s is three times that and idles the test's xdist worker 18 s less than
    the 30 s before."""
    finished = {}
    call = threading.Thread(daemon=True, target=lambda: finished.update(summary=runner.run_cases(
        CASES, "fake_backends:Hang", tmp_path, workers=1, timeout_s=12, progress=None)))
    call.start()
    call.join(timeout=600)
    assert not call.is_alive(), "the run did not finish within 600 s although its only hang has a 12 s limit"
    summary = finished["summary"]
    recs = _records(summary.results_path)
    assert recs[SEED1]["outcome"] == "TIMEOUT" and "12s per-case limit" in recs[SEED1]["reason"]
    # faulthandler dumped the stack of the hung worker shortly before it was killed.
    assert "fake_backends.py" in (recs[SEED1]["error"] or "")
    # The case after the hang ran, so the killed worker was replaced: two worker processes, two logs.
    assert [recs[c.id]["outcome"] for c in CASES] == ["PASS", "TIMEOUT", "PASS"]
    assert len(list((tmp_path / "logs").glob("worker-*.log"))) == 2
    assert summary.exit_code == 1


def test_bad_backend_spec_fails_before_any_case(tmp_path):
    with pytest.raises(ValueError, match="no attribute"):
        runner.run_cases(CASES, "fake_backends:Nope", tmp_path, workers=0)
    assert not (tmp_path / "results.jsonl").exists()


def test_run_cases_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        runner.run_cases(CASES, "reference", tmp_path, workers=-1)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        runner.run_cases(CASES, "reference", tmp_path, timeout_s=0)


# --- killed runs ----------------------------------------------------------------------------
def test_sigkilled_run_keeps_every_finished_case(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), TRITON_INTERPRET="1")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_validate.cli", "run", "--suite", "smoke", "--filter", "M7N64K64E4k2",
         "--backend", "fake_backends:Slow", "--workers", "0", "--out", str(out), "--no-report"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if results.exists() and results.read_text().count('"kind": "case"') >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run wrote no case records within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = results.read_text().count('"kind": "case"')
    rs = load_results([results])
    assert not rs.complete and len(rs.cases) == finished >= 2
    report = subprocess.run([sys.executable, "-m", "moe_validate.cli", "report", str(results),
                             "--out", str(tmp_path / "report.html")],
                            cwd=REPO, env=env, capture_output=True, text=True)
    # Incomplete is a verdict: exit 3, and the summary says how much of the run is there.
    assert report.returncode == 3, report.stderr
    expected = rs.runs[0].expected
    assert f"{finished} cases: {finished} PASS" in report.stdout
    assert f"{finished} of {len(expected)} expected cases present ({len(expected) - finished} missing" in report.stdout
    compare = subprocess.run([sys.executable, "-m", "moe_validate.cli", "compare", str(results), str(results)],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert compare.returncode == 3, compare.stdout + compare.stderr
    assert "verdict: INCOMPLETE" in compare.stdout and "no regressions" not in compare.stdout


# --- shards ---------------------------------------------------------------------------------
def test_shards_partition_the_suite():
    cases = suite_cases("smoke")
    ids = [c.id for c in cases]
    for n in (1, 2, 3, 7, len(cases) + 5):
        shares = [[c.id for c in runner.select_shard(cases, f"{i}/{n}")] for i in range(1, n + 1)]
        flat = [cid for share in shares for cid in share]
        assert sorted(flat) == sorted(ids), f"shards of {n} must cover every case exactly once"
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
    # Stable: independent of the order the suite lists its cases in.
    assert runner.select_shard(cases, "2/3") == [c for c in runner.select_shard(cases[::-1], "2/3")][::-1]


def test_sharded_runs_merge_to_the_unsharded_result_set(tmp_path):
    whole = runner.run_cases(CASES, "fake_backends:Raise", tmp_path / "all", workers=0, progress=None)
    parts = [runner.run_cases(runner.select_shard(CASES, f"{i}/2"), "fake_backends:Raise", tmp_path / f"s{i}",
                              workers=0, shard=f"{i}/2", progress=None) for i in (1, 2)]
    merged = load_results([p.results_path for p in parts])
    alone = load_results([whole.results_path])

    def key(rs):
        return [(c["case_id"], c["outcome"], c["worst_margin"]) for c in rs.cases]

    assert key(merged) == key(alone)
    assert merged.complete and len(merged.headers) == 2


@pytest.mark.parametrize("bad", ["0/3", "4/3", "a/b", "1", "1/0", "1/2/3"])
def test_parse_shard_rejects_malformed(bad):
    with pytest.raises(ValueError, match="shard must be 'i/n'"):
        runner.parse_shard(bad)


def test_repro_command_round_trips_through_the_cli_parser():
    from moe_validate.cli import build_parser

    line = runner.repro_command(CASES[0].id, "triton")
    argv = line.split("moe-validate ", 1)[1].split()
    args = build_parser().parse_args(argv)
    assert args.command == "repro" and args.case_id == CASES[0].id and args.backend == "triton"


def test_real_smoke_cases_end_to_end_through_the_triton_backend(tmp_path):
    pytest.importorskip("kernels", reason="the triton backend needs the kernels package")
    # One of each storage dtype plus a quantized scheme and an explicit tile config.
    smoke = suite_cases("smoke")
    picked = CASES + [next(c for c in smoke if c.scheme == "fp8_block128"),
                      next(c for c in smoke if c.config.startswith("BM"))]
    summary = runner.run_cases(picked, "triton", tmp_path, workers=1, timeout_s=300, suite="smoke", progress=None)
    rs = load_results([summary.results_path])
    assert rs.complete and len(rs.cases) == len(picked)
    for rec in rs.cases:
        assert rec["outcome"] == "PASS", (rec["case_id"], rec["reason"], rec["error"])
        assert set(rec["config"]) >= {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    explicit = next(c for c in picked if c.config.startswith("BM"))
    assert rs.by_id()[explicit.id]["config"] == explicit.explicit_config()
    # which table served each config (no GPU here: no device name, so never a tuned table)
    sources = {rec["case_id"]: rec["config_source"] for rec in rs.cases}
    assert sources[explicit.id] == {"kind": "given", "table": None, "device": None}
    assert {s["kind"] for cid, s in sources.items() if cid != explicit.id} <= {"default", "batch_invariant"}
    assert summary.exit_code == 0


def test_progress_is_a_tqdm_bar_on_a_terminal_for_long_runs():
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm (a declared dependency)")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    total = runner._Progress.BAR_MIN_CASES
    bar = runner._Progress(total, stream)
    assert bar.bar is not None
    for i in range(total):
        outcome = "FAIL" if i == 3 else "PASS"
        bar.update({"outcome": outcome, "case_id": f"case-{i}", "duration_s": 0.1, "reason": "planted"})
    bar.close()
    text = stream.getvalue()
    assert f"{total}/{total}" in text  # the bar reached the end
    assert "FAIL          case-3" in text and "case-4" not in text  # only non-passing cases get a line
