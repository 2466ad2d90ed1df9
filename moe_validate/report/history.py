"""``report --history``: N runs in time order, and per case its outcome and margin trend.

A run is one results file given by name, or, for a directory given, each directory under it
holding results files (the files of one directory are merged: the shards of one night). Runs
are ordered by their first header's start time. A case is *good* in a run where it PASSed or
was SKIPped, *bad* where it failed, crashed, timed out, ...; a run without it (or with it
NOT_RUN) is a gap, not a change. Over the runs in which a case is present:

- ``flaky``: its good/bad state changed at least twice (P F P, F P F): one outcome proves nothing;
- ``new failure``: changed once, bad in the newest run;
- ``fixed``: changed once, good in the newest run;
- ``failing`` / ``passing``: never changed.

The newest run's margin against the oldest present one says how close a passing case drifts
to its bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from moe_validate.results import Outcome, ResultSet, load_results

__all__ = ["RunPoint", "CaseTrend", "History", "HistoryView", "history_runs", "build_history", "format_history",
           "STATUS_ORDER", "MIN_RUNS"]

MIN_RUNS = 2
# How the section lists cases: the changes first, then the steady ones.
STATUS_ORDER = ("new failure", "flaky", "fixed", "failing", "passing")
_GOOD = (Outcome.PASS.value, Outcome.SKIP.value)
_RESULTS_GLOB = "results*.jsonl"


@dataclass
class RunPoint:
    label: str  # the directory or file the run came from
    started: Optional[str]
    backend: Optional[str]
    commit: Optional[str]
    gpu: Optional[str]
    counts: Dict[str, int]
    complete: bool


@dataclass
class CaseTrend:
    case_id: str
    outcomes: List[Optional[str]]  # per run, oldest first; None = absent or NOT_RUN
    margins: List[Optional[float]]
    status: str = "passing"
    changes: int = 0  # good/bad flips over the runs where the case is present

    @property
    def latest_margin(self) -> Optional[float]:
        return next((m for m in reversed(self.margins) if m is not None), None)


@dataclass
class History:
    runs: List[RunPoint]
    cases: List[CaseTrend] = field(default_factory=list)  # in STATUS_ORDER, then by latest margin, highest first

    def with_status(self, status: str) -> List[CaseTrend]:
        return [c for c in self.cases if c.status == status]

    @property
    def counts(self) -> Dict[str, int]:
        return {s: len(self.with_status(s)) for s in STATUS_ORDER}


def _groups(paths: Iterable[Union[str, Path]]) -> List[Tuple[str, List[Path]]]:
    """(label, files) of each run: a file alone; under a directory, each directory of results files."""
    groups: List[Tuple[str, List[Path]]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(_RESULTS_GLOB))
            if not found:
                raise ValueError(f"--history: {p} holds no {_RESULTS_GLOB} files")
            by_dir: Dict[Path, List[Path]] = {}
            for f in found:
                by_dir.setdefault(f.parent, []).append(f)
            groups += [(str(d), files) for d, files in sorted(by_dir.items())]
        elif p.is_file():
            groups.append((str(p), [p]))
        else:
            raise ValueError(f"--history: {p} is neither a results file nor a directory")
    return groups


def history_runs(paths: Sequence[Union[str, Path]]) -> List[Tuple[str, ResultSet]]:
    """(label, ResultSet) of each run named by ``paths``, oldest first; ValueError for fewer than MIN_RUNS.

    A run's problems (a torn last line) stay in its ``ResultSet.problems`` for the caller to show.
    """
    runs = [(label, load_results(files)) for label, files in _groups(paths)]
    if len(runs) < MIN_RUNS:
        raise ValueError(f"--history needs at least {MIN_RUNS} runs (results files, or directories of them); "
                         f"got {len(runs)}")

    def started(item: Tuple[str, ResultSet]) -> str:
        return min((h.started or "" for h in item[1].headers), default="")

    return sorted(runs, key=started)  # stable: runs without a start time keep the order given


def _point(label: str, results: ResultSet) -> RunPoint:
    env = results.headers[0].env if results.headers else {}
    return RunPoint(label=label, started=min((h.started for h in results.headers if h.started), default=None),
                    backend=results.runs[0].backend if results.runs else None, commit=env.get("commit"),
                    gpu=env.get("gpu") or ("interpreter" if env.get("interpreter") else None),
                    counts={o: n for o, n in results.counts().items() if n}, complete=results.complete)


def _classify(trend: CaseTrend) -> None:
    states = [o in _GOOD for o in trend.outcomes if o is not None]
    trend.changes = sum(1 for a, b in zip(states, states[1:]) if a != b)
    if trend.changes >= 2:
        trend.status = "flaky"
    elif trend.changes == 1:
        trend.status = "fixed" if states[-1] else "new failure"
    else:
        trend.status = "passing" if states and states[-1] else "failing"


def build_history(runs: Sequence[Tuple[str, ResultSet]]) -> History:
    """The trend of every case present in any run (runs oldest first)."""
    by_run = [results.by_id() for _, results in runs]
    trends = []
    for cid in sorted({cid for cases in by_run for cid in cases}):
        outcomes, margins = [], []
        for cases in by_run:
            rec = cases.get(cid)
            present = rec is not None and rec.outcome != Outcome.NOT_RUN.value
            outcomes.append(rec.outcome if present else None)
            margins.append(rec.worst_margin if present else None)
        trend = CaseTrend(cid, outcomes, margins)
        _classify(trend)
        trends.append(trend)
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    trends.sort(key=lambda t: (rank[t.status], -(t.latest_margin if t.latest_margin is not None else -1.0)))
    return History(runs=[_point(label, results) for label, results in runs], cases=trends)


def _cell(outcome: Optional[str], margin: Optional[float]) -> str:
    if outcome is None:
        return "-"
    return outcome if margin is None else f"{outcome} {margin:.3g}"


def format_history(history: History, *, limit: int = 20) -> str:
    """The text summary: the runs, the counts per status, and the cases that changed (``limit`` per status)."""
    lines = [f"history over {len(history.runs)} runs (oldest first):"]
    for i, r in enumerate(history.runs):
        counts = ", ".join(f"{n} {o}" for o, n in r.counts.items())
        lines.append(f"  [{i}] {r.started or '?'}  {r.label}  {r.backend or '?'}  {counts}"
                     + ("" if r.complete else "  (incomplete)"))
    lines.append("cases: " + ", ".join(f"{n} {s}" for s, n in history.counts.items()))
    for status in ("new failure", "fixed", "flaky"):
        cases = history.with_status(status)
        if not cases:
            continue
        lines.append(f"{status} ({len(cases)}):")
        for c in cases[:limit]:
            lines.append(f"  {c.case_id}: " + " | ".join(_cell(o, m) for o, m in zip(c.outcomes, c.margins)))
        if len(cases) > limit:
            lines.append(f"  ... {len(cases) - limit} more")
    return "\n".join(lines)


@dataclass
class HistoryView:
    """The report's history section: the runs, and per case one cell per run (at most ``limit`` rows)."""

    history: History
    limit: int = 300

    @property
    def rows(self) -> List[Dict[str, object]]:
        return [{"case_id": c.case_id, "status": c.status, "changes": c.changes,
                 "cells": [{"outcome": o or "", "text": _cell(o, m)} for o, m in zip(c.outcomes, c.margins)]}
                for c in self.history.cases[: self.limit]]

    @property
    def hidden(self) -> int:
        return max(0, len(self.history.cases) - self.limit)
