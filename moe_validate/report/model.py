"""The report's view model: every number, label and grouping the page shows, computed here.

The template and the page script only lay out what this module produced: the summary (counts,
environment, duration, worst margins), the pivots over every pair of low-cardinality axes, the
compact column-wise case table, the details of non-passing cases, the baseline section and the
calibration table (``moe_validate.calibration``: normalized-error RMS per scheme and dtype).

Size rules (a 10,000-case report must stay small and fast): case data is embedded once, column
by column, with axis values and reasons dictionary-encoded; margins for every case are rounded to
``MARGIN_DIGITS`` significant digits (a display value: the verdict was made by the runner on the
full value); the heavy parts (panels, heatmap, histograms, worst elements, traceback) are kept
only for non-passing cases. Worst-element values keep full precision: their last digits are the
point.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from moe_validate.coverage import ran_line
from moe_validate.diagnosis import diagnosis_of, format_number
from moe_validate.report.diff import RunDiff, merged_env
from moe_validate.results import CaseRecord, Outcome, ResultSet, cap_text, record_from_json

__all__ = ["ReportModel", "CalibrationView", "build_model", "pivot", "axis_values", "worst_cases", "PIVOT_MAX_VALUES",
           "DEFAULT_PIVOT", "OUTCOMES"]

OUTCOMES: Tuple[str, ...] = tuple(o.value for o in Outcome)
# Severity for colouring a group of cases: its most severe outcome wins.
_SEVERITY = {"SKIP": 0, "PASS": 1, "NOT_RUN": 2, "FAIL": 3, "TIMEOUT": 4, "OOM": 4, "COMPILE_ERROR": 5, "CRASH": 5}

# Axes shown first, in this order; SPEC.md vocabulary order within an axis (the report package
# does not import moe_validate.contract.spec, which pulls in torch).
_AXIS_ORDER = ("dtype", "scheme", "activation", "lora")
_VALUE_ORDER = {
    "dtype": ("fp32", "fp16", "bf16"),
    "scheme": ("none", "fp8_block128", "fp8_channel_token", "fp8_tensor_token", "fp8_tensor_static",
               "fp8_tensor_dynamic", "int8_channel_token", "int8_w8a16", "int4_w4a16"),
    "activation": ("silu", "gelu", "gelu_tanh", "swigluoai", "swiglustep", "silu_no_mul",
                   "gelu_no_mul", "gelu_tanh_no_mul", "relu2_no_mul"),
    "lora": ("none", "single", "dual"),
}
DEFAULT_PIVOT = ("scheme", "activation")
# An axis with more distinct values than this is not offered as a pivot axis (a pivot with
# hundreds of columns is unreadable); it stays filterable by free text.
PIVOT_MAX_VALUES = 40
# An axis with more distinct values than this gets no drop-down filter in the table.
FILTER_MAX_VALUES = 200
MARGIN_DIGITS = 3
_VERDICT_CODES = {"PASS": 1, "FAIL": 2, "SKIP": 3}
# Details budget (see _details_within_budget): at ~3 KB a failing case's panels, heatmap and
# histograms, 2,000 cases or 8 MiB keep the page under ~20 MB with 20,000 rows in the table.
DETAILS_MAX_CASES = 2_000
DETAILS_MAX_BYTES = 8 * 2**20
# A traceback in the page keeps its head and tail (results.jsonl keeps up to TEXT_CAPS["error"]).
DETAIL_ERROR_CHARS = 6_000
WORST_LIST_LENGTH = 15
_PANEL_SPECIAL_KEYS = ("worst", "nan_inf", "exceed_count", "exceed_fraction")
_WORST_COLUMNS = ("token", "column", "expert", "tile", "kernel", "reference", "diff", "allowed")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _round_sig(x: Any, digits: int = MARGIN_DIGITS) -> Any:
    """Rounds a float for display; non-finite floats become the strings the page script reads."""
    if not _num(x):
        return None if x is None else x
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return 0
    return float(f"{x:.{digits}g}")


def _json_value(x: Any) -> Any:
    """Full-precision JSON value (non-finite floats as strings)."""
    if _num(x) and isinstance(x, float) and not math.isfinite(x):
        return _round_sig(x)
    return x


def _margin_key(m: Optional[float]) -> float:
    """Sort key for 'worst first': NaN (no usable comparison) above +inf above any number."""
    if m is None:
        return -math.inf
    if math.isnan(m):
        return math.inf
    return m


def _as_records(cases) -> List[CaseRecord]:
    """Typed case records (callers may pass the JSON dicts)."""
    return [record_from_json({"kind": "case", **c}) if isinstance(c, dict) else c for c in cases]


def _case_margin(case: CaseRecord) -> Optional[float]:
    m = case.worst_margin
    return float(m) if _num(m) else None


def value_label(value: Any) -> str:
    """How an axis value is displayed and matched (JSON scalars: null, bools, numbers, text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _value_sort_key(axis: str, label: str, raw_values: Dict[str, Any]) -> tuple:
    order = _VALUE_ORDER.get(axis)
    if order and label in order:
        return (0, order.index(label), 0.0, label)
    raw = raw_values.get(label)
    if _num(raw):
        return (1, 0, float(raw), label)
    return (2, 0, 0.0, label)


def axis_values(cases: Sequence[Dict[str, Any]]) -> Dict[str, List[str]]:
    """Every params key -> its distinct value labels, in display order; axes in display order."""
    raw: Dict[str, Dict[str, Any]] = {}
    for case in cases:
        params = case.get("params") or {}
        if not isinstance(params, dict):
            continue
        for key, value in params.items():
            raw.setdefault(str(key), {}).setdefault(value_label(value), value)
    axes = [a for a in _AXIS_ORDER if a in raw] + sorted(a for a in raw if a not in _AXIS_ORDER)
    return {a: sorted(raw[a], key=lambda lbl, a=a: _value_sort_key(a, lbl, raw[a])) for a in axes}


def _param_label(case: CaseRecord, axis: str) -> Optional[str]:
    params = case.params or {}
    if not isinstance(params, dict) or axis not in params:
        return None
    return value_label(params[axis])


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
@dataclass
class WorstEntry:
    case_id: str
    outcome: str
    margin: Optional[float]
    reason: Optional[str]

    @property
    def margin_text(self) -> str:
        return _fmt(self.margin)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return format_number(x, digits, missing="-")


def worst_cases(cases: Sequence[Dict[str, Any]], limit: int = WORST_LIST_LENGTH) -> List[WorstEntry]:
    """Cases with a worst margin, worst first (NaN first: a NaN margin means no valid comparison)."""
    cases = _as_records(cases)
    measured = [c for c in cases if _case_margin(c) is not None]
    measured.sort(key=lambda c: (-_margin_key(_case_margin(c)), c["case_id"]))
    return [WorstEntry(c["case_id"], c["outcome"], _case_margin(c), c.get("reason")) for c in measured[:limit]]


@dataclass
class Shard:
    run_id: str
    shard: str
    started: str
    finished: str
    duration_s: Optional[float]
    suite: str
    backend: str


@dataclass
class Summary:
    total: int
    counts: Dict[str, int]
    bad: int
    env: Dict[str, str]
    shards: List[Shard]
    complete: bool
    problems: List[str]
    run_duration_s: Optional[float]  # sum of footers' duration_s (shards run in parallel or not)
    case_duration_s: float  # sum of cases' duration_s
    started: str
    finished: str
    worst: List[WorstEntry]
    skip_reasons: List[Tuple[str, int]]  # reason -> count, most frequent first
    completeness: str = ""  # "N of M expected cases present (...)"
    coverage: str = ""  # "ran 17 of 72 (55 skipped: ...)" (moe_validate.coverage)

    @property
    def verdict(self) -> str:
        """INCOMPLETE outranks FAILED (as in the exit status): a partial run's passes vouch for nothing."""
        if not self.complete:
            return "INCOMPLETE"
        if self.bad:
            return "FAILED"
        return "PASSED"

    def duration_text(self, seconds: Optional[float]) -> str:
        if seconds is None:
            return "-"
        if seconds < 120:
            return f"{seconds:.1f} s"
        return f"{seconds / 60:.1f} min"


def _summary(results: ResultSet) -> Summary:
    counts = results.counts()
    cases = results.cases
    # Footers are paired with headers by run_id when they carry one; otherwise by position, which
    # is only sound when every header has its footer (a killed shard would shift the pairing).
    footer_by_run = {f.get("run_id"): f for f in results.footers if f.get("run_id")}
    positional = results.complete and not footer_by_run
    shards = []
    for i, header in enumerate(results.headers):
        footer = footer_by_run.get(header.get("run_id")) if footer_by_run else (
            results.footers[i] if positional else None)
        if footer is not None:
            finished = str(footer.get("finished") or "-")
        elif positional or footer_by_run or not results.footers:
            finished = "not finished (killed?)"
        else:
            finished = "unknown (cannot pair footers with headers)"
        shards.append(Shard(
            run_id=str(header.get("run_id") or "-"), shard=str(header.get("shard") or "-"),
            started=str(header.get("started") or "-"), finished=finished,
            duration_s=float(footer["duration_s"]) if footer and _num(footer.get("duration_s")) else None,
            suite=str(header.get("suite") or "-"), backend=str(header.get("backend") or "-")))
    footer_durations = [float(f["duration_s"]) for f in results.footers if _num(f.get("duration_s"))]
    starts = sorted(str(h["started"]) for h in results.headers if h.get("started"))
    ends = sorted(str(f["finished"]) for f in results.footers if f.get("finished"))
    reasons: Dict[str, int] = {}
    for case in cases:
        if case["outcome"] == Outcome.SKIP.value:
            reason = case.get("reason") or "(no reason recorded)"
            reasons[reason] = reasons.get(reason, 0) + 1
    problems = list(results.problems)
    if not results.headers:
        problems.append("no header record: environment unknown")
    else:
        unfinished = results.unfinished_runs()
        if unfinished:
            problems.append(f"{len(unfinished)} of {len(results.runs)} run(s)/shard(s) have no footer: killed or still "
                            "running; their finished cases are shown")
        missing = results.missing()
        if missing:
            problems.append(f"{len(missing)} expected case(s) have no result: " + ", ".join(missing[:5])
                            + (" ..." if len(missing) > 5 else ""))
        if results.missing_shards():
            problems.append(f"shard(s) {', '.join(results.missing_shards())} of the split are absent")
        for r in results.runs:
            last = r.footers[-1:] and r.footers[-1]
            if last and last.interrupted:
                problems.append(f"run {r.run_id[:12]} was interrupted (Ctrl-C)")
            if last and last.stopped:
                problems.append(f"run {r.run_id[:12]} stopped early: {last.stopped}")
    return Summary(
        total=len(cases), counts=counts, bad=sum(n for o, n in counts.items() if Outcome(o).is_bad),
        env=merged_env(results), shards=shards, complete=results.complete, problems=problems,
        run_duration_s=sum(footer_durations) if footer_durations else None,
        case_duration_s=sum(float(c["duration_s"]) for c in cases if _num(c.get("duration_s"))),
        started=starts[0] if starts else "-", finished=ends[-1] if ends and results.complete else "-",
        worst=worst_cases(cases),
        skip_reasons=sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
        completeness=results.completeness_line() if results.headers else "",
        coverage=ran_line(cases, results.expected_count() or len(cases)))


# ---------------------------------------------------------------------------------------------
# Pivot
# ---------------------------------------------------------------------------------------------
@dataclass
class PivotCell:
    counts: Dict[str, int]
    worst_margin: Optional[float]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def status(self) -> str:
        """The most severe outcome in the cell ('empty' when no case has these values)."""
        present = [o for o, n in self.counts.items() if n]
        if not present:
            return "empty"
        return max(present, key=lambda o: _SEVERITY[o])


def pivot(cases: Sequence[Dict[str, Any]], row_axis: str, col_axis: str) -> Dict[Tuple[str, str], PivotCell]:
    """(row value, column value) -> outcome counts and worst margin of the cases there.

    Cases lacking either axis are left out. The worst margin ignores SKIP cases (they measured
    nothing) and ranks NaN above every number.
    """
    if not isinstance(row_axis, str) or not isinstance(col_axis, str) or row_axis == col_axis:
        raise ValueError(f"pivot needs two different axis names; got {row_axis!r} and {col_axis!r}")
    cases = _as_records(cases)
    outcomes = [c.outcome for c in cases]
    margins = [_case_margin(c) for c in cases]
    return _pivot_columns(outcomes, margins, [_param_label(c, row_axis) for c in cases],
                          [_param_label(c, col_axis) for c in cases])


def _pivot_columns(outcomes: List[str], margins: List[Optional[float]], rows: List[Optional[str]],
                   cols: List[Optional[str]]) -> Dict[Tuple[str, str], PivotCell]:
    cells: Dict[Tuple[str, str], PivotCell] = {}
    skip = Outcome.SKIP.value
    for outcome, m, r, c in zip(outcomes, margins, rows, cols):
        if r is None or c is None:
            continue
        cell = cells.get((r, c))
        if cell is None:
            cell = cells[(r, c)] = PivotCell({o: 0 for o in OUTCOMES}, None)
        cell.counts[outcome] += 1
        if m is not None and outcome != skip:
            if cell.worst_margin is None or _margin_key(m) > _margin_key(cell.worst_margin):
                cell.worst_margin = m
    return cells


def _pivot_payload(cases, axes: Dict[str, List[str]]) -> Dict[str, Any]:
    """Pivots for every unordered pair of pivotable axes, compactly: 'a|b' -> list of
    [row index, column index, counts per OUTCOMES..., worst margin]. The page transposes."""
    names = [a for a, vals in axes.items() if 1 <= len(vals) <= PIVOT_MAX_VALUES]
    outcomes = [c.outcome for c in cases]
    margins = [_case_margin(c) for c in cases]
    labels = {a: [_param_label(c, a) for c in cases] for a in names}
    out: Dict[str, Any] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ia = {v: k for k, v in enumerate(axes[a])}
            ib = {v: k for k, v in enumerate(axes[b])}
            rows = []
            cells = _pivot_columns(outcomes, margins, labels[a], labels[b])
            for (ra, cb), cell in sorted(cells.items(), key=lambda kv: (ia[kv[0][0]], ib[kv[0][1]])):
                rows.append([ia[ra], ib[cb]] + [cell.counts[o] for o in OUTCOMES] + [_round_sig(cell.worst_margin)])
            out[f"{a}|{b}"] = rows
    return {"axes": names, "cells": out}


# ---------------------------------------------------------------------------------------------
# Case table and details
# ---------------------------------------------------------------------------------------------
def _panel_view(panel: Dict[str, Any], compact: bool) -> Dict[str, Any]:
    metrics = []
    for name, entry in panel.items():
        if name in _PANEL_SPECIAL_KEYS or not isinstance(entry, dict) or "value" not in entry:
            continue
        margin = entry.get("margin")
        metrics.append({
            "name": str(name), "value": _json_value(entry.get("value")),
            "allowed": _json_value(entry.get("allowed")), "margin": _round_sig(margin),
            "exceeds": bool(_num(margin) and (math.isnan(margin) or margin > 1.0)),
        })
    view: Dict[str, Any] = {"metrics": metrics}
    if compact:
        return view
    view["exceed_count"] = panel.get("exceed_count")
    view["exceed_fraction"] = _round_sig(panel.get("exceed_fraction"))
    nan_inf = panel.get("nan_inf")
    view["nan_inf"] = {str(k): v for k, v in nan_inf.items()} if isinstance(nan_inf, dict) else None
    # Other scalar facts a comparer adds to a panel (e.g. a count of NaN where the reference is
    # finite) are shown as they are rather than dropped.
    view["extra"] = {str(k): _json_value(v) for k, v in panel.items()
                     if k not in _PANEL_SPECIAL_KEYS and (_num(v) or isinstance(v, str))}
    worst = [w for w in (panel.get("worst") or []) if isinstance(w, dict)]
    # The schema's columns first, in its order, then any further keys the comparer recorded.
    columns = [c for c in _WORST_COLUMNS if any(c in w for w in worst)]
    for w in worst:
        columns += [str(k) for k in w if k not in columns]
    view["worst"] = [[_json_value(w.get(col)) for col in columns] for w in worst]
    view["worst_columns"] = columns
    return view


def _bound_view(bound: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(bound, dict):
        return None
    terms = {str(k): _json_value(v) for k, v in bound.items()
             if k not in ("atol", "rtol", "derivation") and (_num(v) or isinstance(v, str))}
    derivation = bound.get("derivation") or []
    if isinstance(derivation, str):
        derivation = [derivation]
    return {"atol": _json_value(bound.get("atol")), "rtol": _json_value(bound.get("rtol")),
            "terms": terms, "derivation": [str(line) for line in derivation]}


# A heatmap larger than this is max-pooled for display (max, because the point of the picture
# is where the error peaks); 64 x 96 cells keep a detail view light even for M = 8192, K = 7168.
HEATMAP_MAX_ROWS = 64
HEATMAP_MAX_COLS = 96


def _pool_max(values: List[List[Any]], fr: int, fc: int) -> List[List[Any]]:
    """Max over fr x fc blocks; a NaN anywhere in a block makes the block NaN (it must show)."""
    out = []
    for r0 in range(0, len(values), fr):
        block_rows = values[r0:r0 + fr]
        width = max((len(r) for r in block_rows), default=0)
        row = []
        for c0 in range(0, width, fc):
            block = [v for r in block_rows for v in r[c0:c0 + fc] if _num(v)]
            if any(math.isnan(v) for v in block):
                row.append(float("nan"))
            else:
                row.append(max(block) if block else None)
        out.append(row)
    return out


def _grid_view(heatmap: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(heatmap, dict) or not isinstance(heatmap.get("values"), list):
        return None
    raw = [row if isinstance(row, list) else [] for row in heatmap["values"]]
    rows, cols = len(raw), max((len(r) for r in raw), default=0)
    fr, fc = max(1, math.ceil(rows / HEATMAP_MAX_ROWS)), max(1, math.ceil(cols / HEATMAP_MAX_COLS))
    if fr > 1 or fc > 1:
        raw = _pool_max(raw, fr, fc)
    finite = [float(v) for row in raw for v in row if _num(v) and math.isfinite(v)]
    values = [[_round_sig(v) for v in row] for row in raw]
    row_tile, col_tile = heatmap.get("row_tile"), heatmap.get("col_tile")
    return {"row_tile": row_tile * fr if _num(row_tile) else row_tile,
            "col_tile": col_tile * fc if _num(col_tile) else col_tile,
            "metric": heatmap.get("metric") if isinstance(heatmap.get("metric"), str) else None,
            "pooled": [fr, fc], "source_shape": [rows, cols], "values": values,
            "max": _round_sig(max(finite)) if finite else None, "min": _round_sig(min(finite)) if finite else None,
            "rows": len(values), "cols": max((len(r) for r in values), default=0)}


def _histogram_view(hist: Any) -> Optional[Dict[str, Any]]:
    """Bins between consecutive edges; counts beyond len(edges) - 1 are extra bins named by the
    histogram's ``last_count_is`` (the comparer appends the non-finite count that way)."""
    if not isinstance(hist, dict) or not isinstance(hist.get("edges"), list) or not isinstance(hist.get("counts"), list):
        return None
    edges, counts = hist["edges"], hist["counts"]
    bins = max(0, min(len(counts), len(edges) - 1))
    extra = counts[bins:]
    label = hist.get("last_count_is") if isinstance(hist.get("last_count_is"), str) else "beyond the last edge"
    return {"edges": [_round_sig(e) for e in edges[:bins + 1]], "counts": counts[:bins],
            "extra": [[label if len(extra) == 1 else f"{label} ({i})", c] for i, c in enumerate(extra)],
            "notes": [f"{k}: {v}" for k, v in hist.items() if k not in ("edges", "counts", "last_count_is")
                      and isinstance(v, (str, int, float))]}


def _ordered_params(params: Any) -> List[Tuple[str, Any]]:
    if not isinstance(params, dict):
        return []
    first = [k for k in _AXIS_ORDER if k in params]
    return [(k, params[k]) for k in first] + [(k, v) for k, v in params.items() if k not in _AXIS_ORDER]


def _verdicts_view(case: Any) -> Optional[List[Dict[str, Any]]]:
    """[{name, outcome, gating, reason, margin}] of accuracy and conformance, from the record's
    ``verdicts`` (None when it carries none: a record written before them, or no comparison)."""
    verdicts = case.get("verdicts")
    if not isinstance(verdicts, dict) or not verdicts:
        return None
    gating = case.get("gating") if isinstance(case.get("gating"), list) else None
    out = []
    for name in ("accuracy", "conformance"):
        v = verdicts.get(name)
        if not isinstance(v, dict):
            continue
        out.append({"name": name, "outcome": str(v.get("outcome") or "-"),
                    "gating": None if gating is None else name in gating,
                    "reason": v.get("reason") if isinstance(v.get("reason"), str) else None,
                    "margin": _round_sig(v.get("margin"))})
    return out or None


def _diagnosis_view(case: Any) -> Optional[Dict[str, Any]]:
    """The case's diagnosis (its own, or made now for an older record), as lines to show."""
    d = diagnosis_of(case)
    if not d:
        return None
    lines = []
    for key in ("where", "pattern"):
        part = d.get(key)
        if isinstance(part, dict):
            lines.append([key, str(part.get("detail") or part.get("text") or "")])
    verdict = d.get("verdict") if isinstance(d.get("verdict"), dict) else {}
    for line in verdict.get("meaning") or []:
        lines.append(["verdict", str(line)])
    stage = d.get("stage") if isinstance(d.get("stage"), dict) else None
    if stage and stage.get("text"):
        lines.append(["stage", str(stage["text"])])
    return {"summary": str(d.get("summary") or ""), "lines": lines}


def _details_view(case: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the page shows for a non-passing case."""
    view: Dict[str, Any] = {
        "diagnosis": _diagnosis_view(case),
        "verdicts": _verdicts_view(case),
        "params": [[str(k), value_label(v)] for k, v in _ordered_params(case.get("params"))],
        "backend": case.get("backend"),
        "config": case.get("config") if isinstance(case.get("config"), dict) else None,
        "error": cap_text(case["error"], DETAIL_ERROR_CHARS) if isinstance(case.get("error"), str) else None,
    }
    # Checks after the comparison (alignment contract, bitwise invariances): name, outcome, reason.
    checks = case.get("checks") if isinstance(case.get("checks"), list) else []
    view["checks"] = [[str(c.get("name")), str(c.get("outcome")), c.get("reason") or ""]
                      for c in checks if isinstance(c, dict)]
    rows = case.get("compared_rows") if isinstance(case.get("compared_rows"), dict) else None
    view["compared_rows"] = (f"compared rows: {rows.get('compared')} of {rows.get('of')}, {rows.get('mode')}"
                             + (f" ({rows['how']})" if rows.get("how") else "")) if rows else None
    tolerance = case.get("tolerance") if isinstance(case.get("tolerance"), dict) else {}
    view["tolerance"] = {name: _bound_view(tolerance.get(name)) for name in ("gate", "budget") if tolerance.get(name)}
    metrics = case.get("metrics") if isinstance(case.get("metrics"), dict) else {}
    # The gate (mirror) first, then the budget (exact), then anything else a comparer adds.
    panel_names = sorted((n for n, p in metrics.items() if isinstance(p, dict)),
                         key=lambda n: ({"mirror": 0, "exact": 1}.get(n, 2), n))
    view["panels"] = {name: _panel_view(metrics[name], compact=False) for name in panel_names}
    detail = case.get("detail") if isinstance(case.get("detail"), dict) else {}
    view["heatmap"] = _grid_view(detail.get("heatmap"))
    per_expert = detail.get("per_expert")
    view["per_expert"] = [_round_sig(v) for v in per_expert] if isinstance(per_expert, list) else None
    view["histograms"] = {str(name): h for name, h in ((n, _histogram_view(v)) for n, v in
                          (detail.get("histograms") or {}).items()) if h is not None}
    return view


def _details_within_budget(cases) -> Tuple[Dict[str, Any], int]:
    """Details of the non-passing cases most worth opening first (most severe outcome, then worst
    margin), until ``DETAILS_MAX_CASES`` cases or ``DETAILS_MAX_BYTES`` of JSON; every other
    non-passing case gets a stub saying where its details are (its row, reason and repro stay).

    Why a budget: a run of 20,000 failing cases embedded every panel, heatmap and traceback
    (127 MB, 281 s to render, 14 s to open). With it such a report stays near 10 MB.
    """
    bad = [i for i, c in enumerate(cases) if Outcome(c.outcome).is_bad]
    bad.sort(key=lambda i: (-_SEVERITY[cases[i].outcome], -_margin_key(_case_margin(cases[i])), cases[i].case_id))
    details: Dict[str, Any] = {}
    spent = 0
    for rank, i in enumerate(bad):
        if rank >= DETAILS_MAX_CASES or spent >= DETAILS_MAX_BYTES:
            break
        view = _details_view(cases[i])
        spent += len(json.dumps(view, default=str))
        details[str(i)] = view
    omitted = len(bad) - len(details)
    if omitted:
        stub = {"omitted": f"details not embedded: this report carries them for the {len(details)} most severe of "
                           f"{len(bad)} non-passing cases ({spent / 2**20:.1f} MiB); they are in results.jsonl, "
                           "and the repro command re-runs the case"}
        for i in bad[len(details):]:
            details[str(i)] = stub
    return details, omitted


def _compact_margins(cases) -> Dict[str, Any]:
    """Per case, the margin of every panel metric (rounded), aligned to one list of keys."""
    keys: List[str] = []
    index: Dict[str, int] = {}
    rows = []
    for case in cases:
        metrics = case.get("metrics") if isinstance(case.get("metrics"), dict) else {}
        row: Dict[int, Any] = {}
        for panel_name, panel in metrics.items():
            if not isinstance(panel, dict):
                continue
            for name, entry in panel.items():
                if name in _PANEL_SPECIAL_KEYS or not isinstance(entry, dict) or entry.get("margin") is None:
                    continue
                key = f"{panel_name}.{name}"
                if key not in index:
                    index[key] = len(keys)
                    keys.append(key)
                row[index[key]] = _round_sig(entry["margin"])
        rows.append(row)
    # Display order: the gate panel (mirror) first, then the budget (exact), metric names sorted.
    order = sorted(range(len(keys)), key=lambda i: ({"mirror": 0, "exact": 1}.get(keys[i].split(".")[0], 2), keys[i]))
    return {"keys": [keys[i] for i in order], "values": [[r.get(i) for i in order] if r else 0 for r in rows]}


def _repro_columns(cases) -> Dict[str, Any]:
    """Repro commands as one template with '{case_id}' plus the exceptions (most runners write
    the same command with only the id changing)."""
    templates: Dict[str, int] = {}
    for case in cases:
        repro, cid = case.get("repro"), case["case_id"]
        if isinstance(repro, str) and cid and cid in repro:
            t = repro.replace(cid, "{case_id}")
            templates[t] = templates.get(t, 0) + 1
    template = max(templates, key=templates.get) if templates else None
    exceptions = {}
    for i, case in enumerate(cases):
        repro = case.get("repro")
        expected = template.replace("{case_id}", case["case_id"]) if template else None
        if repro != expected:
            exceptions[str(i)] = repro if isinstance(repro, str) else None
    return {"template": template, "exceptions": exceptions}


def _table_payload(cases, axes: Dict[str, List[str]], diff_status: Dict[str, str]) -> Dict[str, Any]:
    reason_index: Dict[str, int] = {}
    reasons: List[str] = []
    reason_col = []
    for case in cases:
        reason = case.get("reason")
        if not reason:
            reason_col.append(-1)
            continue
        reason = str(reason)
        if reason not in reason_index:
            reason_index[reason] = len(reasons)
            reasons.append(reason)
        reason_col.append(reason_index[reason])
    value_index = {a: {v: i for i, v in enumerate(vals)} for a, vals in axes.items()}
    params_cols = {}
    for axis in axes:
        col = []
        for case in cases:
            label = _param_label(case, axis)
            col.append(-1 if label is None else value_index[axis][label])
        params_cols[axis] = col
    diff_labels = ["new failure", "fixed", "drift", "outcome change", "added"]
    # A failure's few-word diagnosis ("expert 1: scale x1.01") leads its row; dictionary-encoded.
    short_index: Dict[str, int] = {}
    shorts: List[str] = []
    short_col = []
    verdict_col = []
    for case in cases:
        d = diagnosis_of(case) if case.outcome == Outcome.FAIL.value else None
        short = d.get("short") if d else None
        if short:
            short_col.append(short_index.setdefault(short, len(shorts)))
            if short_col[-1] == len(shorts):
                shorts.append(short)
        else:
            short_col.append(-1)
        verdicts = _verdicts_view(case)
        verdict_col.append([_VERDICT_CODES.get(v["outcome"], 0) for v in verdicts] if verdicts else 0)
    return {
        "diagnoses": shorts,
        "diagnosis": short_col,
        "verdicts": verdict_col,  # per case [accuracy, conformance] as codes of verdict_codes, 0 = none recorded
        "verdict_codes": ["-", "PASS", "FAIL", "SKIP"],
        "ids": [c["case_id"] for c in cases],
        "outcome": [OUTCOMES.index(c["outcome"]) for c in cases],
        "margin": [_round_sig(_case_margin(c)) for c in cases],
        "duration": [_round_sig(c.get("duration_s"), 3) if _num(c.get("duration_s")) else None for c in cases],
        "reasons": reasons,
        "reason": reason_col,
        "params": params_cols,
        "diff_labels": diff_labels,
        "diff": [diff_labels.index(diff_status[c["case_id"]]) if c["case_id"] in diff_status else -1 for c in cases],
        "repro": _repro_columns(cases),
        "margins": _compact_margins(cases),
    }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
@dataclass
class BaselineView:
    diff: RunDiff
    old_summary: Summary
    list_limit: int

    def rows(self, changes) -> List[Any]:
        return changes[: self.list_limit]


@dataclass
class CalibrationView:
    """The calibration section: ``calibration.calibrate`` of the cases, formatted for the page."""

    band: Tuple[float, float]
    # scheme, dtype, failed, seeds, budget/gate {cases, elements, rms, max, events, flag}, count {differing,
    # ratio, events, flag, few_events}
    rows: List[Dict[str, Any]]
    ignored: int
    min_events: float  # gate rows expecting fewer differing elements (or independent events) are not judged

    @property
    def flagged(self) -> int:
        return sum(1 for r in self.rows for o in ("budget", "gate", "count") if r[o]["flag"])


def _calibration_view(cases) -> Optional[CalibrationView]:
    """None when no case was evaluated (a run of skips and crashes has nothing to calibrate)."""
    from moe_validate.calibration import COUNT_RATIO_LIMIT, MIN_FLIP_EVENTS, calibrate

    table = calibrate([c.to_json() for c in cases])  # calibration reads the JSON records
    if not table.rows:
        return None
    data = table.to_dict()
    rows = []
    for r in data["rows"]:
        row = {k: r[k] for k in ("scheme", "dtype", "label", "accumulation", "failed", "seeds")}
        for oracle in ("budget", "gate"):
            o = r[oracle]
            row[oracle] = {"cases": o["cases"], "elements": o["elements"], "rms": _fmt(o["z_rms"]),
                           "identical": o["identical"], "few_events": o["few_events"],
                           "events": _fmt(o["events"]) if o["events"] is not None else "-",
                           "max": _fmt(o["z_max"]) if o["cases"] else "-", "flag": o["flag"],
                           "side": (None if not o["flag"] else ("high" if o["z_rms"] > table.band[1] else "low"))}
        g = r["gate"]
        ratio = g["count_ratio"]
        row["count"] = {"differing": "-" if g["differing"] is None else g["differing"],
                        "ratio": _fmt(ratio) if ratio is not None else "-",
                        "events": "-" if g["recorded_events"] is None else _fmt(g["recorded_events"]),
                        "flag": g["count_flag"],
                        "side": None if not g["count_flag"] else ("high" if ratio > 1 else "low"),
                        "few_events": (not g["count_flag"] and ratio is not None
                                       and not 1.0 / COUNT_RATIO_LIMIT <= ratio <= COUNT_RATIO_LIMIT)}
        rows.append(row)
    return CalibrationView(band=table.band, rows=rows, ignored=table.ignored, min_events=MIN_FLIP_EVENTS)


@dataclass
class ReportModel:
    title: str
    generated: str
    summary: Summary
    axes: Dict[str, List[str]]
    payload: Dict[str, Any]  # the JSON the page script reads
    baseline: Optional[BaselineView] = None
    counts_order: Tuple[str, ...] = OUTCOMES
    calibration: Optional[CalibrationView] = None
    history: Optional[Any] = None  # report.history.HistoryView (report --history)

    def margin_text(self, x: Optional[float]) -> str:
        return _fmt(x)


def build_model(results: ResultSet, *, baseline: Optional[ResultSet] = None, title: Optional[str] = None,
                diff: Optional[RunDiff] = None, now: Optional[_dt.datetime] = None,
                baseline_list_limit: int = 500, history: Optional[Any] = None) -> ReportModel:
    """Computes everything the report shows from a result set (and optionally a baseline)."""
    if not isinstance(results, ResultSet):
        raise TypeError(f"results must be a moe_validate.results.ResultSet; got {type(results).__name__}")
    if baseline is not None and not isinstance(baseline, ResultSet):
        raise TypeError(f"baseline must be a ResultSet or None; got {type(baseline).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None; got {type(title).__name__}")
    cases = results.cases
    axes = axis_values(cases)
    summary = _summary(results)
    baseline_view = None
    diff_status: Dict[str, str] = {}
    if baseline is not None:
        if diff is None:
            from moe_validate.report.diff import diff_runs
            diff = diff_runs(baseline, results)
        diff_status = diff.status_by_case()
        baseline_view = BaselineView(diff=diff, old_summary=_summary(baseline), list_limit=baseline_list_limit)
    if title is None:
        suites = sorted({str(h.get("suite")) for h in results.headers if h.get("suite")})
        title = "moe-validate report" + (f": {', '.join(suites)}" if suites else "")
    default_pivot = list(DEFAULT_PIVOT)
    pivots = _pivot_payload(cases, axes)
    if not all(a in pivots["axes"] for a in default_pivot):
        default_pivot = pivots["axes"][:2]
    details, omitted = _details_within_budget(cases)
    payload = {
        "outcomes": list(OUTCOMES),
        "bad_outcomes": [o.value for o in Outcome if o.is_bad],
        "severity": dict(_SEVERITY),
        "axes": [{"name": a, "values": vals, "filterable": len(vals) <= FILTER_MAX_VALUES} for a, vals in axes.items()],
        "pivot": {"default": default_pivot, **pivots},
        "table": _table_payload(cases, axes, diff_status),
        "details": details,
        "details_omitted": omitted,
    }
    generated = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC")
    return ReportModel(title=title, generated=generated, summary=summary, axes=axes, payload=payload,
                       baseline=baseline_view, calibration=_calibration_view(cases), history=history)
