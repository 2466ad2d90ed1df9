"""Baseline comparison: what changed between an old run and a new run of the same suite.

``diff_runs(old, new)`` classifies every case id present in either run:

- **new failure**: present in both, not bad before (PASS or SKIP), bad now (FAIL, CRASH, ...).
- **fix**: present in both, bad before, PASS now.
- **drift**: present in both, PASS in both, and the worst margin (observed / allowed, the gate's
  own scale) grew by more than ``DRIFT_FACTOR`` while reaching at least ``DRIFT_MIN_MARGIN``.
  A case can pass and still be getting worse; this is the early warning. The floor keeps noise
  near zero out: a margin moving from 0.001 to 0.004 is a 4x growth that means nothing, while
  0.2 -> 0.5 (half the allowance consumed) is worth a look.
- **outcome change**: present in both with any other change of outcome (FAIL -> CRASH,
  PASS -> SKIP: a case that stopped running is lost coverage, so it is listed, not hidden).
- **added / removed**: in only one of the runs. A case the new run was not asked to run (absent
  from its header's expected list) is removed; one it was asked to run and has no result for is
  **missing**.
- **missing**: expected by the new run (its header's ``expected_cases``) but absent or NOT_RUN;
  when the new run recorded no expected list, every removed case counts as missing. Missing
  cases, or a new run without its footer (killed), make the comparison **incomplete**: its own
  verdict and exit status, never "no regressions".

Environment differences compare the merged ``env`` of each run's headers key by key (several
headers are shards of one run: their distinct values are joined), the backend first: a run of
another backend is never "the same environment". Each changed case carries its diagnosis
(``moe_validate.diagnosis``: what broke and where), which leads its line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from moe_validate.diagnosis import summary_of
from moe_validate.results import CaseRecord, Outcome, ResultSet

__all__ = ["RunDiff", "CaseChange", "EnvChange", "diff_runs", "format_diff", "DRIFT_FACTOR",
           "DRIFT_MIN_MARGIN", "merged_env"]

# Worst margin must grow by more than this factor between runs to count as drift. 1.5x: run-to-run
# noise of a fixed-seed case on a fixed config is zero (the invariances are bitwise), so any growth
# comes from a changed kernel, config or environment; 1.5x leaves room for a config change that
# only reorders accumulation (a few ulps on a margin built from a few ulps) without flagging it.
DRIFT_FACTOR = 1.5
# ... and must end at least this high (a quarter of the allowance) to be worth reporting.
DRIFT_MIN_MARGIN = 0.25

# The environment keys whose differences are reported first (the ones that change numerics).
ENV_KEYS_FIRST = ("backend", "gpu", "capability", "driver", "cuda", "torch", "triton", "interpreter", "commit")


@dataclass(frozen=True)
class CaseChange:
    """One case that changed between the runs."""

    case_id: str
    old_outcome: Optional[str]  # None when the case is new
    new_outcome: Optional[str]  # None when the case was removed
    old_margin: Optional[float]
    new_margin: Optional[float]
    reason: Optional[str] = None  # the new run's reason (or the old one's, for a removed case)
    diagnosis: Optional[str] = None  # the new run's one-line diagnosis of a case not passing

    @property
    def growth(self) -> Optional[float]:
        """new / old worst margin, when both are finite and old is positive."""
        if _finite(self.old_margin) and _finite(self.new_margin) and self.old_margin > 0:
            return self.new_margin / self.old_margin
        return None


@dataclass(frozen=True)
class EnvChange:
    key: str
    old: str
    new: str


@dataclass
class RunDiff:
    """The classification made by ``diff_runs``; every list is sorted by case id."""

    new_failures: List[CaseChange] = field(default_factory=list)
    fixes: List[CaseChange] = field(default_factory=list)
    drift: List[CaseChange] = field(default_factory=list)
    outcome_changes: List[CaseChange] = field(default_factory=list)
    added: List[CaseChange] = field(default_factory=list)
    removed: List[CaseChange] = field(default_factory=list)
    missing: List[CaseChange] = field(default_factory=list)
    new_completeness: str = ""  # "N of M expected cases present (...)" of the new run
    new_unfinished: int = 0  # runs of the new set without a footer (killed)
    env_changes: List[EnvChange] = field(default_factory=list)
    old_counts: Dict[str, int] = field(default_factory=dict)
    new_counts: Dict[str, int] = field(default_factory=dict)
    drift_factor: float = DRIFT_FACTOR
    drift_min_margin: float = DRIFT_MIN_MARGIN

    @property
    def incomplete(self) -> bool:
        """The new run lacks cases it set out to run, or was killed: what it says is not the whole story."""
        return bool(self.missing or self.new_unfinished)

    @property
    def has_regressions(self) -> bool:
        """New failures or drift: what should make a CI comparison step red."""
        return bool(self.new_failures or self.drift)

    def status_by_case(self) -> Dict[str, str]:
        """case id -> one label (new failure, fixed, drift, outcome change, added) for the table."""
        out: Dict[str, str] = {}
        for label, changes in (("added", self.added), ("outcome change", self.outcome_changes),
                               ("drift", self.drift), ("fixed", self.fixes),
                               ("new failure", self.new_failures)):
            for change in changes:
                out[change.case_id] = label
        return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _margin(case: CaseRecord) -> Optional[float]:
    value = case.worst_margin
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def merged_env(results: ResultSet) -> Dict[str, str]:
    """Each env key -> its distinct values over all headers (shards), joined with ' | '; the
    backend of each run (header, else its cases) under ``backend``. A value not recorded (None:
    no GPU on a CPU machine, no git) is left out rather than shown as a raw null."""
    values: Dict[str, List[str]] = {}

    def add(key: str, value: Any) -> None:
        if value is None:
            return
        seen = values.setdefault(str(key), [])
        if str(value) not in seen:
            seen.append(str(value))

    for run in results.runs:
        add("backend", run.backend)
    if not results.runs:
        for header in results.headers:
            add("backend", header.get("backend"))
    for header in results.headers:
        env = header.get("env") or {}
        if not isinstance(env, dict):
            continue
        for key, value in env.items():
            add(key, value)
    ordered = [k for k in ENV_KEYS_FIRST if k in values] + sorted(k for k in values if k not in ENV_KEYS_FIRST)
    return {k: " | ".join(values[k]) for k in ordered}


def _check_result_set(value: Any, name: str) -> None:
    if not isinstance(value, ResultSet):
        raise TypeError(f"{name} must be a moe_validate.results.ResultSet; got {type(value).__name__}")


def diff_runs(old: ResultSet, new: ResultSet) -> RunDiff:
    """Compares two result sets case by case (see the module docstring for the classes)."""
    _check_result_set(old, "old")
    _check_result_set(new, "new")
    old_by_id, new_by_id = old.by_id(), new.by_id()
    diff = RunDiff(old_counts=old.counts(), new_counts=new.counts(), new_completeness=new.completeness_line(),
                   new_unfinished=len(new.unfinished_runs()))
    expected_lists = [r.expected for r in new.runs]
    new_expected = (None if not expected_lists or any(x is None for x in expected_lists)
                    else {cid for x in expected_lists for cid in x})
    not_run = Outcome.NOT_RUN.value
    for case_id in sorted(set(old_by_id) | set(new_by_id) | (new_expected or set())):
        o, n = old_by_id.get(case_id), new_by_id.get(case_id)
        if n is None or n.outcome == not_run:
            if new_expected is None or case_id in new_expected:
                diff.missing.append(CaseChange(case_id, o.outcome if o else None, n.outcome if n else None,
                                               _margin(o) if o else None, None,
                                               n.reason if n else "expected by the new run; no result"))
            elif o is not None:
                diff.removed.append(CaseChange(case_id, o.outcome, None, _margin(o), None, o.reason))
            continue
        if o is None:
            diff.added.append(CaseChange(case_id, None, n.outcome, None, _margin(n), n.reason,
                                         summary_of(n) if Outcome(n.outcome).is_bad else None))
            continue
        change = CaseChange(case_id, o.outcome, n.outcome, _margin(o), _margin(n), n.reason,
                            summary_of(n) if Outcome(n.outcome).is_bad else None)
        old_bad, new_bad = Outcome(o.outcome).is_bad, Outcome(n.outcome).is_bad
        if new_bad and not old_bad:
            diff.new_failures.append(change)
        elif old_bad and n.outcome == Outcome.PASS.value:
            diff.fixes.append(change)
        elif o.outcome != n.outcome:
            diff.outcome_changes.append(change)
        elif n.outcome == Outcome.PASS.value and _is_drift(change.old_margin, change.new_margin):
            diff.drift.append(change)
    old_env, new_env = merged_env(old), merged_env(new)
    for key in list(old_env) + [k for k in new_env if k not in old_env]:
        before, after = old_env.get(key, "(absent)"), new_env.get(key, "(absent)")
        if before != after:
            diff.env_changes.append(EnvChange(key, before, after))
    return diff


def _is_drift(old_margin: Optional[float], new_margin: Optional[float]) -> bool:
    if new_margin is None:
        return False
    if math.isnan(new_margin):
        # A passing case whose margin became NaN has lost its measurement: flag it unless it
        # already was NaN.
        return old_margin is not None and not math.isnan(old_margin)
    if new_margin < DRIFT_MIN_MARGIN:
        return False
    if old_margin is None or math.isnan(old_margin) or old_margin <= 0:
        # No earlier measurement to compare with, or zero error before: any margin above the
        # floor is growth without bound.
        return old_margin is not None and not math.isnan(old_margin)
    return new_margin > DRIFT_FACTOR * old_margin


def _fmt_margin(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


def _change_line(change: CaseChange) -> str:
    before = f"{change.old_outcome or '-'} {_fmt_margin(change.old_margin)}"
    after = f"{change.new_outcome or '-'} {_fmt_margin(change.new_margin)}"
    line = f"  {change.case_id}: {before} -> {after}"
    if change.growth is not None and change.old_outcome == change.new_outcome:
        line += f" (x{change.growth:.2f})"
    if change.new_outcome not in (None, Outcome.PASS.value):
        text = change.diagnosis or (change.reason.splitlines()[0][:120] if change.reason else None)
        if text:
            line += f"  [{text}]"
    return line


def format_diff(diff: RunDiff, max_lines_per_section: int = 50) -> str:
    """The diff as plain text for a terminal: counts, environment, then each class of change."""
    if not isinstance(diff, RunDiff):
        raise TypeError(f"diff must be a RunDiff (from diff_runs); got {type(diff).__name__}")
    if not isinstance(max_lines_per_section, int) or max_lines_per_section < 1:
        raise ValueError(f"max_lines_per_section must be a positive int; got {max_lines_per_section!r}")
    lines: List[str] = []
    outcomes = [o.value for o in Outcome]
    lines.append("outcome        old      new    delta")
    for name in outcomes:
        a, b = diff.old_counts.get(name, 0), diff.new_counts.get(name, 0)
        if a or b:
            lines.append(f"{name:<13}{a:>5}    {b:>5}    {b - a:+d}")
    if diff.env_changes:
        lines.append("environment changed:")
        for env in diff.env_changes:
            lines.append(f"  {env.key}: {env.old} -> {env.new}")
    else:
        lines.append("environment: same")
    sections: List[Tuple[str, List[CaseChange]]] = [
        ("new failures", diff.new_failures),
        ("fixes", diff.fixes),
        (f"drift (worst margin grew > x{diff.drift_factor:g} to >= {diff.drift_min_margin:g})", diff.drift),
        ("other outcome changes", diff.outcome_changes),
        ("added cases", diff.added),
        ("removed cases (not selected by the new run)", diff.removed),
        ("missing cases (expected by the new run, no result)", diff.missing),
    ]
    for title, changes in sections:
        lines.append(f"{title}: {len(changes)}")
        for change in changes[:max_lines_per_section]:
            lines.append(_change_line(change))
        if len(changes) > max_lines_per_section:
            lines.append(f"  ... and {len(changes) - max_lines_per_section} more")
    lines.append(f"new run: {diff.new_completeness}")
    if diff.incomplete:
        verdict = "INCOMPLETE" + (" and REGRESSED" if diff.has_regressions else "")
    else:
        verdict = "REGRESSED" if diff.has_regressions else "no regressions"
    lines.append(f"verdict: {verdict} ({len(diff.new_failures)} new failures, {len(diff.drift)} drifting, "
                 f"{len(diff.fixes)} fixed, {len(diff.missing)} missing"
                 + (f", {diff.new_unfinished} run(s) without a footer" if diff.new_unfinished else "") + ")")
    return "\n".join(lines)
