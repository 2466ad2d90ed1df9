"""Result records: the JSONL contract between the runner, the report and `compare`.

A results file is JSON Lines, appended one line per event and flushed at once, so a run killed
at any moment loses only the case in flight. Three record kinds:

``{"kind": "header", ...}``
    one per run (or per shard): ``run_id``, ``started`` (ISO time), ``suite``, ``backend``,
    ``shard`` ("i/n" or null), ``argv``, ``env`` (dict: gpu, capability, driver, cuda, torch,
    triton, interpreter, commit, host, python).
``{"kind": "case", ...}``
    one per finished case:
      ``case_id``      str, stable and accepted back by ``moe-validate repro``
      ``params``       dict of axis -> value (JSON scalars), the case's parameters
      ``outcome``      one of ``Outcome`` values
      ``reason``       str or null (skip reason, crash summary, the failing metric)
      ``duration_s``   float
      ``backend``      str
      ``config``       dict or null: the launch config the backend reported
      ``config_source`` dict or null: which table served it (``kernels.configs.ConfigSource``:
                       kind tuned / sibling / default / given / batch_invariant, table, device)
      ``repro``        str: one shell command that re-runs just this case
      ``tolerance``    {"gate": Bound, "budget": Bound}; a Bound is a dict with at least
                       ``atol``, ``rtol`` (floats), ``derivation`` (list of str lines) and any
                       named terms it was built from
      ``metrics``      {"mirror": Panel, "exact": Panel}; a Panel is a dict of metric name ->
                       {"value": float, "allowed": float or null, "margin": float or null} plus
                       ``worst`` (list of {token, column, expert, tile, kernel, reference, diff,
                       allowed}), ``nan_inf`` ({"kernel_nan", "kernel_inf", "ref_nan", "ref_inf"}),
                       ``exceed_count``, ``exceed_fraction``
      ``detail``       optional dict for failing cases: ``heatmap`` {"row_tile", "col_tile",
                       "values": [[float]]}, ``per_expert`` [float], ``histograms``
                       {name: {"edges": [float], "counts": [int]}}
      ``error``        str or null: traceback text for CRASH / COMPILE_ERROR / OOM / TIMEOUT
      ``worst_margin`` float or null: max over gate metrics of observed / allowed
      ``checks``       list or null: checks after the comparison (moe_validate/invariance.py), each
                       {"name" ("alignment_contract", "invariance:perm", ...), "outcome" (PASS,
                       FAIL, SKIP), "reason"}; a FAIL makes the case FAIL, a SKIP is named in
                       ``reason``
      ``compared_rows`` dict or null: set when only some token rows were compared (a huge case's
                       row-sampled reference): {"compared", "of", "mode", "how", "rows"}
``{"kind": "footer", ...}``
    at a clean end of a run: ``finished``, ``duration_s``, ``counts`` {outcome: n}.

A file without a footer is a run that was killed; its case lines are still whole results.
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

__all__ = ["Outcome", "ResultsWriter", "ResultSet", "load_results", "ResultsError"]


class Outcome(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    CRASH = "CRASH"
    COMPILE_ERROR = "COMPILE_ERROR"
    OOM = "OOM"
    TIMEOUT = "TIMEOUT"

    def __str__(self) -> str:
        return self.value

    @property
    def is_bad(self) -> bool:
        """Outcomes that make a run exit non-zero."""
        return self not in (Outcome.PASS, Outcome.SKIP)


class ResultsError(ValueError):
    """A results file that cannot be used; the message names the file and line."""


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf: encode them as strings the reader turns back into floats."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


class ResultsWriter:
    """Appends records to a JSONL file, flushing and fsyncing each line."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") not in ("header", "case", "footer"):
            raise ValueError(f"record kind must be header, case or footer; got {record.get('kind')!r}")
        self._fh.write(json.dumps(_json_safe(record), sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ResultSet:
    """Records of one or more results files (shards merge here)."""

    headers: List[Dict[str, Any]] = field(default_factory=list)
    cases: List[Dict[str, Any]] = field(default_factory=list)
    footers: List[Dict[str, Any]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # e.g. a truncated last line, skipped

    def counts(self) -> Dict[str, int]:
        out = {o.value: 0 for o in Outcome}
        for c in self.cases:
            out[c["outcome"]] = out.get(c["outcome"], 0) + 1
        return out

    @property
    def complete(self) -> bool:
        """True when every header has its footer (no killed run or shard)."""
        return len(self.footers) >= len(self.headers) > 0

    def by_id(self) -> Dict[str, Dict[str, Any]]:
        return {c["case_id"]: c for c in self.cases}


def _iter_lines(path: Path) -> Iterator[tuple]:
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            yield lineno, line


def load_results(paths: Iterable[Union[str, Path]]) -> ResultSet:
    """Reads and merges results files.

    A torn last line (a run killed mid-write) is skipped and noted in ``problems``; any other
    malformed line raises ``ResultsError`` naming the file and line. When the same case id
    appears more than once (a case re-run, or overlapping shards) the last record wins.
    Cases are returned sorted by case id, so sharded and unsharded runs compare equal.
    """
    rs = ResultSet()
    cases: Dict[str, Dict[str, Any]] = {}
    paths = [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no results files given")
    for path in paths:
        if not path.exists():
            raise ResultsError(f"results file {path} does not exist")
        if path.is_dir():
            raise ResultsError(f"results file {path} is a directory; pass the .jsonl file inside it")
        try:
            lines = list(_iter_lines(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsError(f"cannot read results file {path}: {exc}") from None
        for i, (lineno, line) in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=float)
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    rs.problems.append(f"{path}:{lineno}: truncated last line skipped (killed run?)")
                    continue
                raise ResultsError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from None
            kind = rec.get("kind") if isinstance(rec, dict) else None
            if kind == "header":
                rs.headers.append(rec)
            elif kind == "footer":
                rs.footers.append(rec)
            elif kind == "case":
                missing = [k for k in ("case_id", "outcome") if k not in rec]
                if missing:
                    raise ResultsError(f"{path}:{lineno}: case record lacks {', '.join(missing)}")
                if rec["outcome"] not in Outcome._value2member_map_:
                    raise ResultsError(f"{path}:{lineno}: unknown outcome {rec['outcome']!r}")
                cases[rec["case_id"]] = _restore_floats(rec)
            else:
                raise ResultsError(f"{path}:{lineno}: record kind must be header, case or footer; got {kind!r}")
    if not rs.headers and not cases:
        raise ResultsError(f"no records in {', '.join(map(str, paths))}")
    rs.cases = [cases[k] for k in sorted(cases)]
    return rs


_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _restore_floats(value: Any) -> Any:
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    if isinstance(value, dict):
        return {k: (v if k in ("case_id", "reason", "repro", "error") else _restore_floats(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_floats(v) for v in value]
    return value
