"""report --history (moe_validate/report/history.py) over synthesized runs."""

from pathlib import Path

import pytest

from moe_validate.cli import main
from moe_validate.exit_codes import EXIT_FAILURES, EXIT_PASS, EXIT_USAGE
from moe_validate.report.history import build_history, format_history, history_runs
from moe_validate.results import CaseRecord, FooterRecord, HeaderRecord, ResultsWriter

# Per case, its outcome in runs 0..3 (None: not in that run) and the margin it records.
PLAN = {
    "steady": ["PASS", "PASS", "PASS", "PASS"],
    "breaks": ["PASS", "PASS", "PASS", "FAIL"],
    "repaired": ["CRASH", "FAIL", "PASS", "PASS"],
    "flaky": ["PASS", "FAIL", "PASS", "FAIL"],
    "gap": ["FAIL", None, "FAIL", "FAIL"],
    "skipped": ["SKIP", "SKIP", "PASS", "SKIP"],
}
MARGIN = {"PASS": 0.25, "FAIL": 3.0, "SKIP": None, "CRASH": None}


def _write_run(path: Path, index: int, cases, *, shard=None) -> Path:
    run_id = f"run{index}" + (f"-{shard.replace('/', 'of')}" if shard else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    with ResultsWriter(path) as w:
        w.write(HeaderRecord(run_id=run_id, started=f"2026-12-0{index + 1}T02:00:00+00:00", suite="nightly",
                             backend="triton", shard=shard, expected_cases=sorted(cases), case_count=len(cases),
                             env={"gpu": "H200", "commit": f"c{index}"}))
        for cid, outcome in sorted(cases.items()):
            margin = MARGIN[outcome] * (1 + index / 10) if MARGIN[outcome] is not None else None
            w.write(CaseRecord(case_id=cid, outcome=outcome, run_id=run_id, worst_margin=margin, backend="triton"))
        w.write(FooterRecord(run_id=run_id, duration_s=1.0))
    return path


def _nights(base: Path, *, order=range(4)) -> list:
    """One results file per night (written in ``order``, so the loader must sort them by start time)."""
    paths = []
    for i in order:
        cases = {cid: outcomes[i] for cid, outcomes in PLAN.items() if outcomes[i] is not None}
        paths.append(_write_run(base / f"night{i}" / "results.jsonl", i, cases))
    return paths


def test_statuses_from_the_outcome_trend(tmp_path):
    history = build_history(history_runs(_nights(tmp_path, order=[2, 0, 3, 1])))
    status = {c.case_id: c.status for c in history.cases}
    assert status == {"steady": "passing", "breaks": "new failure", "repaired": "fixed", "flaky": "flaky",
                      "gap": "failing", "skipped": "passing"}
    assert [r.started[:10] for r in history.runs] == ["2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04"]
    gap = next(c for c in history.cases if c.case_id == "gap")
    assert gap.outcomes == ["FAIL", None, "FAIL", "FAIL"] and gap.margins[1] is None
    steady = next(c for c in history.cases if c.case_id == "steady")
    assert steady.margins == pytest.approx([0.25, 0.275, 0.3, 0.325])  # the trend, oldest first
    # the changes are listed first
    assert [c.status for c in history.cases][:3] == ["new failure", "flaky", "fixed"]


def test_text_summary_names_the_changes(tmp_path):
    text = format_history(build_history(history_runs(_nights(tmp_path))))
    assert "history over 4 runs" in text
    assert "cases: 1 new failure, 1 flaky, 1 fixed, 1 failing, 2 passing" in text
    assert "breaks: PASS 0.25 | PASS 0.275 | PASS 0.3 | FAIL 3.9" in text
    assert "gap: FAIL 3 | - | FAIL 3.6 | FAIL 3.9" not in text  # a steady failure is counted, not listed


def test_a_directory_of_runs_merges_each_runs_shards(tmp_path):
    for i in range(3):
        cases = {cid: outcomes[i] for cid, outcomes in PLAN.items() if outcomes[i] is not None}
        ids = sorted(cases)
        half = len(ids) // 2
        _write_run(tmp_path / f"night{i}" / "results-1.jsonl", i, {c: cases[c] for c in ids[:half]}, shard="1/2")
        _write_run(tmp_path / f"night{i}" / "results-2.jsonl", i, {c: cases[c] for c in ids[half:]}, shard="2/2")
    runs = history_runs([tmp_path])
    assert len(runs) == 3 and all(len(rs.cases) == len(rs.by_id()) for _, rs in runs)
    history = build_history(runs)
    assert {c.case_id: c.status for c in history.cases}["repaired"] == "fixed"
    assert len(history.cases) == len(PLAN)


def test_report_history_cli_writes_the_section_and_exits_as_the_newest_run(tmp_path, capsys):
    paths = _nights(tmp_path)
    out = tmp_path / "history.html"
    assert main(["report", "--history", *map(str, paths), "--out", str(out)]) == EXIT_FAILURES  # night 3 fails
    printed = capsys.readouterr().out
    assert "new failure (1):" in printed and "fixed (1):" in printed and "flaky (1):" in printed
    html = out.read_text()
    assert 'id="history"' in html and 'id="history-cases"' in html and 'href="#history"' in html
    section = html[html.index('id="history-cases"'):]
    assert section.index("breaks") < section.index("steady")  # a change is listed before a steady case
    assert section.count("<tr data-status=") == len(PLAN)
    # the newest run passes -> exit 0
    clean = tmp_path / "clean"
    _write_run(clean / "a" / "results.jsonl", 0, {"x": "FAIL"})
    _write_run(clean / "b" / "results.jsonl", 1, {"x": "PASS"})
    assert main(["report", "--history", str(clean), "--out", str(tmp_path / "c.html")]) == EXIT_PASS
    assert "fixed (1):" in capsys.readouterr().out


def test_report_history_usage_errors(tmp_path, capsys):
    (one,) = _nights(tmp_path, order=[0])
    assert main(["report", "--history", str(one)]) == EXIT_USAGE
    assert "at least 2 runs" in capsys.readouterr().err
    assert main(["report", "--history", str(one), str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "neither a results file nor a directory" in capsys.readouterr().err
    assert main(["report", "--history", str(one), str(one), "--run", "run0"]) == EXIT_USAGE
