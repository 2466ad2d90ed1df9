"""What a run covers, said up front and at the end.

``plan_line`` is a run's first line: suite, backend, interpreter mode, case count, how many will
skip on this machine for cost, and an estimate of how long. ``ran_line`` is its last word on
coverage: "ran 17 of 72 (55 skipped: <top reasons>)". ``skip_fraction`` is what ``run
--max-skip`` holds a run to: a CPU job that skipped three quarters of its suite has not passed it.
Torch-free: it reads cases (``matrix.Case``) and records only.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from moe_validate.diagnosis import reason_group

__all__ = ["plan_line", "ran_line", "skip_fraction", "skip_reasons", "estimate_seconds",
           "INTERPRETER_MACS_PER_S", "INTERPRETER_CASE_OVERHEAD_S"]

# The Triton interpreter's pace on the triton backend, to estimate a CPU run: a case takes about
# INTERPRETER_CASE_OVERHEAD_S plus matrix.interpreter_cost(case) / INTERPRETER_MACS_PER_S seconds.
# Measured 2026-12-02 on premerge cases that fit the interpreter (one shared CI core, niced):
# 1.82e7 MACs in 2.71 s, 1.97e7 in 3.47 s, an empty case in 0.01 s. An estimate, said as "~".
INTERPRETER_MACS_PER_S = 6e6
INTERPRETER_CASE_OVERHEAD_S = 0.2
_TOP_REASONS = 3


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def estimate_seconds(cases: Sequence, *, interpreting: bool, backend: str) -> Optional[float]:
    """Seconds the cases that will run should take, where the pace is modelled (the triton
    backend under the interpreter); None elsewhere."""
    if not interpreting or backend != "triton":
        return None
    from moe_validate.matrix import interpreter_cost

    return sum(INTERPRETER_CASE_OVERHEAD_S + interpreter_cost(c) / INTERPRETER_MACS_PER_S for c in cases
               if c.device_skip_reason(None, True) is None)


def plan_line(suite: str, backend: str, cases: Sequence, *, interpreting: bool, workers: Optional[int] = None) -> str:
    """'run: suite smoke, backend triton, Triton interpreter (CPU), 97 cases (3 will skip: too slow
    under the interpreter), estimate ~2 min'."""
    mode = "Triton interpreter (CPU)" if interpreting else "native (GPU)"
    line = f"run: suite {suite}, backend {backend}, {mode}, {len(cases)} case{'s' if len(cases) != 1 else ''}"
    if interpreting:
        slow = sum(1 for c in cases if hasattr(c, "device_skip_reason") and c.device_skip_reason(None, True))
        if slow:
            line += f" ({slow} will skip: too slow under the interpreter, run them on a GPU)"
    estimate = estimate_seconds(cases, interpreting=interpreting, backend=backend) if cases and all(
        hasattr(c, "device_skip_reason") for c in cases) else None
    if estimate is not None:
        line += f", estimate {_duration(estimate / max(1, workers or 1))}"
    else:
        line += ", no time estimate for this backend and device"
    return line


def skip_reasons(records: Iterable) -> List[Tuple[str, int]]:
    """(reason, count) of the SKIP records, most frequent first; reasons that differ only in a
    figure (each case's own cost) are one group, its figures shown as #."""
    counts: Dict[str, int] = {}
    texts: Dict[str, set] = {}
    for rec in records:
        if rec.get("outcome") == "SKIP":
            key = reason_group(rec.get("reason"))
            counts[key] = counts.get(key, 0) + 1
            texts.setdefault(key, set()).add(str(rec.get("reason") or "(no reason recorded)").splitlines()[0])
    shown = {key: next(iter(texts[key])) if len(texts[key]) == 1 else key for key in counts}
    return sorted(((shown[k], n) for k, n in counts.items()), key=lambda kv: (-kv[1], kv[0]))


def ran_line(records: Sequence, expected: int) -> str:
    """'ran 17 of 72 (55 skipped: <top reasons>)'; NOT_RUN and missing cases are not "ran"."""
    skipped = sum(1 for r in records if r.get("outcome") == "SKIP")
    ran = sum(1 for r in records if r.get("outcome") not in ("SKIP", "NOT_RUN"))
    line = f"ran {ran} of {expected}"
    if skipped:
        reasons = skip_reasons(records)
        top = "; ".join(f"{reason} x{n}" if len(reasons) > 1 else reason for reason, n in reasons[:_TOP_REASONS])
        more = f"; {len(reasons) - _TOP_REASONS} more reasons" if len(reasons) > _TOP_REASONS else ""
        line += f" ({skipped} skipped: {top}{more})"
    return line


def skip_fraction(records: Sequence, expected: int) -> float:
    """Skipped cases over the cases the run set out to run (0 for an empty run)."""
    return sum(1 for r in records if r.get("outcome") == "SKIP") / expected if expected else 0.0
