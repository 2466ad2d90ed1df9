"""Result records: the JSONL contract between the runner, the report and `compare`.

A results file is JSON Lines, appended one line per event and flushed at once, so a run killed
at any moment loses only the case in flight. Three record kinds, each a dataclass below that the
writer, the report and ``compare`` share (``to_json`` / ``from_json``; fields a newer writer adds
land in ``extra`` and survive a round trip):

``HeaderRecord`` (``"kind": "header"``)
    one per run segment: the run's identity (``run_id``, ``backend``, ``suite``, ``shard``) and
    what it set out to do (``expected_cases``: every case id it was asked to run, with
    ``expected_digest`` and ``case_count``), ``started``, ``argv``, ``env`` (gpu, capability,
    driver, cuda, torch, triton, interpreter, commit, host, python). ``segment`` is 0 for the run's
    start and 1, 2, ... for each ``--resume`` of it (same ``run_id``).
``CaseRecord`` (``"kind": "case"``)
    one per finished case: ``run_id``, ``case_id``, ``params``, ``outcome`` (an ``Outcome``
    value), ``reason``, ``duration_s``, ``backend``, ``config`` (the launch config the backend
    reported), ``config_source`` (which table served it: ``kernels.configs.ConfigSource``, kind
    tuned / sibling / default / given / batch_invariant, table, device), ``repro`` (one shell line), ``tolerance`` ({"gate", "budget"} bounds with their
    derivation), ``metrics`` ({"mirror", "exact"} metric panels), ``detail`` (heatmap, per-expert,
    histograms, for failing cases), ``error`` (traceback or worker log), ``worst_margin``,
    ``checks`` (post-comparison checks, moe_validate/invariance.py), ``compared_rows`` (row
    sampling of huge cases), ``notes`` (what the harness changed to store the record: a value
    made JSON-safe, a text cut to its cap), ``verdicts`` (accuracy and conformance), ``gating``
    (which of them decide the outcome), ``profile`` (the numerics profile the mirror followed),
    ``stages`` (stage localization) and ``diagnosis`` (what broke and where, in words).
``FooterRecord`` (``"kind": "footer"``)
    at the end of a run segment: ``run_id``, ``finished``, ``duration_s``, ``counts``;
    ``interrupted`` (Ctrl-C) and ``stopped`` (why the runner gave up on the rest, e.g. too many
    timeouts in a row) say why cases may be missing.

A run without a footer was killed; its case lines are still whole results. Which cases a run
lacks is read against its header's ``expected_cases`` (``RunRecords.missing``).

The records also answer ``rec["field"]`` and ``rec.get("field")`` (read-only, the JSON names),
for code and tests written against the JSON schema.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Union

__all__ = ["Outcome", "HeaderRecord", "CaseRecord", "FooterRecord", "RunRecords", "ResultsWriter", "ResultSet",
           "load_results", "ResultsError", "ResultsWriteError", "record_from_json", "make_json_safe", "cap_text",
           "expected_digest", "TEXT_CAPS", "DEFAULT_TEXT_CAP"]


class Outcome(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    CRASH = "CRASH"
    COMPILE_ERROR = "COMPILE_ERROR"
    OOM = "OOM"
    TIMEOUT = "TIMEOUT"
    # The runner gave up before running the case (too many timeouts in a row): not a result.
    NOT_RUN = "NOT_RUN"

    def __str__(self) -> str:
        return self.value

    @property
    def is_bad(self) -> bool:
        """Outcomes that make a run exit non-zero."""
        return self not in (Outcome.PASS, Outcome.SKIP)


class ResultsError(ValueError):
    """A results file that cannot be used; the message names the file and line."""


class ResultsWriteError(OSError):
    """A record could not be written (disk full, read-only, gone); the file keeps its whole lines."""


# ---------------------------------------------------------------------------------------------
# Making anything storable: JSON-safe values and capped texts
# ---------------------------------------------------------------------------------------------
# Caps on stored texts (characters). A traceback keeps its head (where it started) and its
# tail (the exception), the middle is counted. 20,000 per error keeps a results file of 20,000
# crashing cases near 400 MB at worst; a reason is a one-line summary.
TEXT_CAPS = {"error": 20_000, "reason": 2_000, "repro": 4_000}
DEFAULT_TEXT_CAP = 8_000
_HEAD_SHARE = 0.25


def cap_text(text: str, limit: int) -> str:
    """``text`` if it fits, else its head and tail around a line saying how much was cut."""
    if len(text) <= limit:
        return text
    head = int(limit * _HEAD_SHARE)
    tail = limit - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted by moe-validate ...]\n{text[-tail:]}"


def _plain_float(value: float) -> Any:
    """JSON has no NaN/Inf: encode them as strings the reader turns back into floats."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def make_json_safe(value: Any, notes: Optional[List[str]] = None, where: str = "record", *,
                   text_cap: int = DEFAULT_TEXT_CAP) -> Any:
    """A copy of ``value`` that ``json.dumps`` accepts, whatever a backend put there.

    Tensors and numpy scalars become numbers or lists; enums their value; anything else its
    ``repr``. Every such change, and every string cut to ``text_cap``, appends a line to ``notes``
    naming where it happened, so the record says what was altered.
    """
    def note(text: str) -> None:
        if notes is not None and len(notes) < 50:
            notes.append(text)

    if value is None or isinstance(value, bool) or isinstance(value, int) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, float):
        return _plain_float(value)
    if isinstance(value, str):
        if len(value) > text_cap:
            note(f"{where}: {len(value)} characters capped to {text_cap} (head and tail kept)")
            return cap_text(value, text_cap)
        return value
    if isinstance(value, enum.Enum):
        return make_json_safe(value.value, notes, where, text_cap=text_cap)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = k if isinstance(k, str) else str(k.value if isinstance(k, enum.Enum) else k)
            out[key] = make_json_safe(v, notes, f"{where}.{key}", text_cap=text_cap)
        return out
    if isinstance(value, (list, tuple)):
        return [make_json_safe(v, notes, f"{where}[{i}]", text_cap=text_cap) for i, v in enumerate(value)]
    # Tensors, numpy arrays and scalars: their numbers (small ones only; a big one is summarised).
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            count = numel() if callable(numel) else numel
            if isinstance(count, int) and count <= 64:
                note(f"{where}: {type(value).__name__} stored as its values")
                return make_json_safe(tolist(), None, where, text_cap=text_cap)
        except Exception:  # a broken tolist falls through to repr
            pass
    try:
        text = repr(value)
    except Exception as exc:  # even repr may raise
        text = f"<{type(value).__name__} whose repr raised {type(exc).__name__}>"
    note(f"{where}: {type(value).__name__} is not JSON-serializable; stored as its repr")
    return cap_text(text, min(text_cap, 2_000))


# ---------------------------------------------------------------------------------------------
# Typed records
# ---------------------------------------------------------------------------------------------
_FIELD_NAMES: Dict[type, frozenset] = {}


class _Record:
    """JSON mapping access to a record's fields (``rec["outcome"]``, ``rec.get("reason")``)."""

    kind: ClassVar[str] = ""
    extra: Dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        if key == "kind":
            return self.kind
        if key in self._field_names():
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return key == "kind" or key in self._field_names() or key in self.extra

    def keys(self) -> List[str]:
        return list(self.to_json())

    def items(self):
        return self.to_json().items()

    @classmethod
    def _field_names(cls) -> Set[str]:
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.name != "extra")
        return names

    def to_json(self) -> Dict[str, Any]:
        """The JSON object of this record (fields, then ``extra``), not yet made JSON-safe."""
        out: Dict[str, Any] = {"kind": self.kind}
        out.update(self.extra)
        for name in self._field_names():
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]):
        names = cls._field_names()
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "kind"}
        return cls(**known, extra=extra)


@dataclass
class HeaderRecord(_Record):
    kind: ClassVar[str] = "header"
    run_id: Optional[str] = None
    started: Optional[str] = None
    suite: Optional[str] = None
    backend: Optional[str] = None
    shard: Optional[str] = None
    argv: List[str] = field(default_factory=list)
    env: Dict[str, Any] = field(default_factory=dict)
    expected_cases: Optional[List[str]] = None  # None: not recorded (an old file, a pytest worker)
    expected_digest: Optional[str] = None
    case_count: Optional[int] = None
    segment: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # workers, timeout_s, gpus, repeat, ...


@dataclass
class CaseRecord(_Record):
    kind: ClassVar[str] = "case"
    case_id: str = ""
    outcome: str = ""
    run_id: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    duration_s: float = 0.0
    backend: Optional[str] = None
    config: Any = None
    config_source: Optional[Dict[str, Any]] = None  # which table served config (kernels.configs.ConfigSource)
    repro: Optional[str] = None
    tolerance: Optional[Dict[str, Any]] = None
    metrics: Optional[Dict[str, Any]] = None
    detail: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    worst_margin: Optional[float] = None
    checks: Optional[List[Dict[str, Any]]] = None
    compared_rows: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    # The two verdicts (issue 17): {"accuracy": VERDICT, "conformance": VERDICT}, VERDICT =
    # {"outcome": "PASS" | "FAIL" | "SKIP", "reason": str or None, "margin": float or None}.
    # accuracy = against the exact oracle (the budget): as accurate as the scheme allows;
    # conformance = against the mirror (the gate, count test included): rounds where the declared
    # numerics profile says. None for a case that never compared (SKIP, CRASH, ...).
    verdicts: Optional[Dict[str, Dict[str, Any]]] = None
    gating: Optional[List[str]] = None  # the verdicts that decide ``outcome`` ("accuracy", "conformance")
    profile: Optional[str] = None  # name of the numerics profile the mirror followed
    # Stage localization (moe_validate/stages.py): {"exposed": bool, "first_diverging": stage name
    # or None, "profile": the numerics profile whose stage functions were used, "stages": {stage:
    # {"max_normalized", "worst": {token, column, expert, tile, ...}} or {"unavailable": why}}};
    # stages are compared only for a case whose output failed.
    stages: Optional[Dict[str, Any]] = None
    # What broke and where, in words (moe_validate/diagnosis.py): {"summary": one line, "where",
    # "pattern", "verdict", "stage", ...}; None for a PASS.
    diagnosis: Optional[Dict[str, Any]] = None
    # Unknown JSON keys (a newer writer's fields) are kept here and written back.
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def outcome_enum(self) -> Outcome:
        return Outcome(self.outcome)

    @property
    def is_bad(self) -> bool:
        return Outcome(self.outcome).is_bad


@dataclass
class FooterRecord(_Record):
    kind: ClassVar[str] = "footer"
    run_id: Optional[str] = None
    finished: Optional[str] = None
    duration_s: Optional[float] = None
    counts: Dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    stopped: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


_KINDS = {"header": HeaderRecord, "case": CaseRecord, "footer": FooterRecord}
Record = Union[HeaderRecord, CaseRecord, FooterRecord]


def record_from_json(data: Any) -> Record:
    """A typed record from a JSON object (or a record, returned as is)."""
    if isinstance(data, _Record):
        return data
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"record kind must be header, case or footer; got {kind!r}")
    return _KINDS[kind].from_json(data)


def expected_digest(case_ids: Sequence[str]) -> str:
    """A short digest of a run's case-id list (order-independent), to compare selections."""
    h = hashlib.sha256("\n".join(sorted(case_ids)).encode("utf-8"))
    return h.hexdigest()[:16]


def storable(record: Union[Record, Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON object to write for ``record``: JSON-safe, texts capped, what changed noted."""
    rec = record_from_json(record)
    data = rec.to_json()
    notes: List[str] = list(data.get("notes") or []) if rec.kind == "case" else []
    before = len(notes)
    safe = {}
    for key, value in data.items():
        if key == "notes":
            continue
        safe[key] = make_json_safe(value, notes, key, text_cap=TEXT_CAPS.get(key, DEFAULT_TEXT_CAP))
    if rec.kind == "case":
        safe["notes"] = [str(n) for n in notes]
    elif len(notes) > before:
        safe["notes"] = notes
    return safe


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class ResultsWriter:
    """Appends records to a JSONL file, flushing and fsyncing each line.

    A write that fails (disk full, read-only, file gone) raises ``ResultsWriteError`` after
    cutting the file back to its last whole line: the file stays readable, whatever it lacks.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a failed write leaves nothing behind in a buffer to be flushed later.
        self._fh = open(self.path, "ab", buffering=0)
        self._good_size = os.fstat(self._fh.fileno()).st_size

    def write(self, record: Union[Record, Dict[str, Any]]) -> None:
        data = storable(record)
        line = (json.dumps(data, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        try:
            view = memoryview(line)
            while view:
                view = view[self._fh.write(view):]
            os.fsync(self._fh.fileno())
        except BaseException as exc:  # a full disk, or Ctrl-C in the middle of a line
            try:  # drop the partial line; truncating needs no free space
                os.ftruncate(self._fh.fileno(), self._good_size)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise ResultsWriteError(exc.errno or errno.EIO,
                                        f"cannot write {self.path}: {exc.strerror or exc}") from exc
            raise
        self._good_size += len(line)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class RunRecords:
    """Everything one run wrote (its header segments, cases and footers), over every file read."""

    run_id: str
    headers: List[HeaderRecord] = field(default_factory=list)
    cases: Dict[str, CaseRecord] = field(default_factory=dict)
    footers: List[FooterRecord] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    ended: bool = False  # the last record read of this run was a footer (its last segment ended)

    @property
    def backend(self) -> Optional[str]:
        for h in self.headers:
            if h.backend:
                return h.backend
        return next((c.backend for c in self.cases.values() if c.backend), None)

    @property
    def suite(self) -> Optional[str]:
        return next((h.suite for h in self.headers if h.suite), None)

    @property
    def shard(self) -> Optional[str]:
        return next((h.shard for h in self.headers if h.shard), None)

    @property
    def expected(self) -> Optional[List[str]]:
        """The case ids the run set out to run (its first header's list); None when not recorded."""
        for h in self.headers:
            if h.expected_cases is not None:
                return list(h.expected_cases)
        return None

    @property
    def finished(self) -> bool:
        """The last segment ended cleanly (a footer after the last header; a killed segment that a
        ``--resume`` completed does not count against the run)."""
        return bool(self.headers) and self.ended

    @property
    def interrupted(self) -> bool:
        return any(f.interrupted for f in self.footers[-1:])

    def missing(self) -> List[str]:
        """Expected ids without a result: absent, or recorded NOT_RUN. [] when nothing was expected."""
        expected = self.expected
        if expected is None:
            return []
        return [cid for cid in expected
                if cid not in self.cases or self.cases[cid].outcome == Outcome.NOT_RUN.value]


@dataclass
class ResultSet:
    """Records of one or more results files, grouped by run (shards are disjoint runs that merge).

    ``cases`` is the merged view the report shows, sorted by case id: every run's records, where
    no case id may appear in two runs (``load_results`` refuses that unless one run is chosen).
    """

    headers: List[HeaderRecord] = field(default_factory=list)
    cases: List[CaseRecord] = field(default_factory=list)
    footers: List[FooterRecord] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # e.g. a truncated last line, skipped
    runs: List[RunRecords] = field(default_factory=list)

    def __post_init__(self):
        # Hand-built sets (tests, tools) may pass JSON dicts.
        self.headers = [record_from_json({"kind": "header", **h} if isinstance(h, dict) else h) for h in self.headers]
        self.cases = [record_from_json({"kind": "case", **c} if isinstance(c, dict) else c) for c in self.cases]
        self.footers = [record_from_json({"kind": "footer", **f} if isinstance(f, dict) else f) for f in self.footers]
        if not self.runs and self.headers:
            self.runs = _group_hand_built(self.headers, self.cases, self.footers)

    def counts(self) -> Dict[str, int]:
        out = {o.value: 0 for o in Outcome}
        for c in self.cases:
            out[c.outcome] = out.get(c.outcome, 0) + 1
        return out

    @property
    def complete(self) -> bool:
        """Every run ended cleanly, no expected case is missing and no shard of a split is absent."""
        if not self.headers:
            return False
        return all(r.finished for r in self.runs) and not self.missing() and not self.missing_shards()

    def missing(self) -> List[str]:
        """Expected case ids without a result, over every run, sorted."""
        return sorted({cid for r in self.runs for cid in r.missing()})

    def expected_count(self) -> Optional[int]:
        """How many cases the runs set out to run; None when a run did not record it."""
        lists = [r.expected for r in self.runs]
        if not lists or any(x is None for x in lists):
            return None
        return len({cid for x in lists for cid in x})

    def present_count(self) -> int:
        """Cases with a result (NOT_RUN records are not results)."""
        return sum(1 for c in self.cases if c.outcome != Outcome.NOT_RUN.value)

    def unfinished_runs(self) -> List[RunRecords]:
        return [r for r in self.runs if not r.finished]

    def missing_shards(self) -> List[str]:
        """'i/n' of each shard of a split suite that no file here holds (one suite and backend)."""
        counts: Dict[int, Set[int]] = {}
        for r in self.runs:
            try:
                i, n = (int(p) for p in str(r.shard).split("/"))
            except ValueError:
                continue
            counts.setdefault(n, set()).add(i)
        return [f"{i}/{n}" for n, seen in sorted(counts.items()) for i in range(1, n + 1) if i not in seen]

    def completeness_line(self) -> str:
        """'N of M expected cases present' (or why M is unknown), with what is missing."""
        present, expected = self.present_count(), self.expected_count()
        if expected is None:
            text = f"{present} cases present (the expected case list was not recorded)"
        else:
            text = f"{present} of {expected} expected cases present"
        extras = []
        if self.missing():
            extras.append(f"{len(self.missing())} missing")
        if self.missing_shards():
            extras.append(f"shards {', '.join(self.missing_shards())} absent")
        unfinished = self.unfinished_runs()
        if unfinished:
            extras.append(f"{len(unfinished)} run(s) without a footer (killed or still running)")
        interrupted = [r for r in self.runs if r.interrupted]
        if interrupted:
            extras.append(f"{len(interrupted)} run(s) interrupted")
        stopped = [f.stopped for r in self.runs for f in r.footers[-1:] if f.stopped]
        extras += [f"stopped: {s}" for s in stopped]
        return text + (f" ({'; '.join(extras)})" if extras else "")

    def by_id(self) -> Dict[str, CaseRecord]:
        return {c.case_id: c for c in self.cases}


def _group_hand_built(headers, cases, footers) -> List[RunRecords]:
    runs: Dict[str, RunRecords] = {}
    first = str(headers[0].run_id or "run")
    for h in headers:
        runs.setdefault(str(h.run_id or first), RunRecords(str(h.run_id or first))).headers.append(h)
    for c in cases:
        runs.setdefault(str(c.run_id or first), RunRecords(str(c.run_id or first))).cases[c.case_id] = c
    for f in footers:
        entry = runs.setdefault(str(f.run_id or first), RunRecords(str(f.run_id or first)))
        entry.footers.append(f)
        entry.ended = True
    return list(runs.values())


def _iter_lines(path: Path) -> Iterator[tuple]:
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            yield lineno, line


def load_results(paths: Iterable[Union[str, Path]], *, run: Optional[str] = None,
                 mixed_backends: bool = False) -> ResultSet:
    """Reads results files and groups their records by run.

    A case record belongs to the run its ``run_id`` names, or (older files) to the header above
    it in its file. Within one run a later record of a case replaces an earlier one (a
    ``--resume`` re-running a NOT_RUN case). Two runs holding the same case id, or runs of
    different backends, are refused with ``ResultsError`` naming them, unless ``run`` (a run id
    or a unique prefix) chooses one: a result of one run never silently hides another's.
    ``mixed_backends`` lets runs of different backends merge when their case ids are disjoint
    (each record keeps its backend; ``problems`` says which were merged).
    A torn last line (a run killed mid-write) is skipped and noted in ``problems``; any other
    malformed line raises ``ResultsError`` naming the file and line. ``cases`` is sorted by case
    id, so sharded and unsharded runs compare equal.
    """
    rs = ResultSet()
    runs: Dict[str, RunRecords] = {}
    paths = [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no results files given")
    anonymous = 0
    for path in paths:
        if not path.exists():
            raise ResultsError(f"results file {path} does not exist")
        if path.is_dir():
            raise ResultsError(f"results file {path} is a directory; pass the .jsonl file inside it")
        try:
            lines = list(_iter_lines(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsError(f"cannot read results file {path}: {exc}") from None
        current: Optional[str] = None  # the run of the last header seen in this file

        def run_of(run_id: Optional[str]) -> RunRecords:
            nonlocal current, anonymous
            key = run_id or current
            if key is None:
                anonymous += 1
                key = current = f"(no header: {path.name})"
            entry = runs.get(key)
            if entry is None:
                entry = runs[key] = RunRecords(key)
            if str(path) not in entry.files:
                entry.files.append(str(path))
            return entry

        for i, (lineno, line) in enumerate(lines):
            if not line.strip():
                continue
            try:
                data = json.loads(line, parse_constant=float)
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    rs.problems.append(f"{path}:{lineno}: truncated last line skipped (killed run?)")
                    continue
                raise ResultsError(f"{path}:{lineno}: not a JSON record ({exc.msg}); a torn line from an "
                                   "interrupted write: `moe-validate run --resume` on that --out repairs it") from None
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind == "header":
                rec = HeaderRecord.from_json(data)
                if not rec.run_id:
                    anonymous += 1
                    rec.run_id = f"(unnamed run {anonymous} in {path.name})"
                current = rec.run_id
                entry = run_of(rec.run_id)
                entry.headers.append(rec)
                entry.ended = False
                rs.headers.append(rec)
            elif kind == "footer":
                rec = FooterRecord.from_json(data)
                entry = run_of(rec.run_id)
                entry.footers.append(rec)
                entry.ended = True
                rs.footers.append(rec)
            elif kind == "case":
                missing = [k for k in ("case_id", "outcome") if k not in data]
                if missing:
                    raise ResultsError(f"{path}:{lineno}: case record lacks {', '.join(missing)}")
                if data["outcome"] not in Outcome._value2member_map_:
                    raise ResultsError(f"{path}:{lineno}: unknown outcome {data['outcome']!r}")
                rec = CaseRecord.from_json(_restore_floats(data) if _may_hold_special(line) else data)
                entry = run_of(rec.run_id)
                rec.run_id = entry.run_id
                entry.cases[rec.case_id] = rec
            else:
                raise ResultsError(f"{path}:{lineno}: record kind must be header, case or footer; got {kind!r}")
    if not rs.headers and not any(r.cases for r in runs.values()):
        raise ResultsError(f"no records in {', '.join(map(str, paths))}")
    chosen = list(runs.values())
    if run is not None:
        chosen = [r for r in chosen if r.run_id == run] or [r for r in chosen if r.run_id.startswith(run)]
        if len(chosen) != 1:
            known = ", ".join(_run_label(r) for r in runs.values())
            raise ResultsError(f"--run {run!r} must name exactly one run of {', '.join(map(str, paths))} "
                               f"({'none' if not chosen else 'several'} match; runs: {known})")
        rs.headers = list(chosen[0].headers)
        rs.footers = list(chosen[0].footers)
    _refuse_mixed(chosen, paths, mixed_backends)
    backends = sorted({r.backend for r in chosen if r.backend})
    if len(backends) > 1:
        rs.problems.append(f"runs of {len(backends)} backends merged ({', '.join(backends)}): each case row is "
                           "one backend's result")
    rs.runs = chosen
    merged = {cid: c for r in chosen for cid, c in r.cases.items()}
    rs.cases = [merged[k] for k in sorted(merged)]
    return rs


def _run_label(r: RunRecords) -> str:
    return f"{r.run_id[:12]} (backend {r.backend or '?'}, {len(r.cases)} cases)"


def _refuse_mixed(runs: List[RunRecords], paths: Sequence[Path], mixed_backends: bool) -> None:
    backends = sorted({r.backend for r in runs if r.backend})
    if len(backends) > 1 and not mixed_backends:
        raise ResultsError(f"results mix backends {', '.join(backends)} in {', '.join(map(str, paths))}: report one "
                           f"backend at a time (--run RUN_ID), or merge disjoint cases with --mixed-backends (runs: {', '.join(_run_label(r) for r in runs)})")
    owner: Dict[str, RunRecords] = {}
    for r in runs:
        for cid in r.cases:
            other = owner.get(cid)
            if other is not None:
                raise ResultsError(f"case {cid} was recorded by two runs, {other.run_id[:12]} and {r.run_id[:12]}, in "
                                   f"{', '.join(map(str, paths))}: choose one with --run RUN_ID (runs: "
                                   f"{', '.join(_run_label(x) for x in runs)})")
            owner[cid] = r


_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_TEXT_FIELDS = ("case_id", "reason", "repro", "error", "run_id", "backend", "notes")


def _may_hold_special(line: str) -> bool:
    """Whether a JSON line can hold one of _SPECIAL's strings: without their letters (or a \\u
    escape that could spell them) _restore_floats would return a copy of the record unchanged,
    at 60% of the reading time of a 20,000-case file."""
    return "NaN" in line or "Infinity" in line or "\\u" in line


def _restore_floats(value: Any) -> Any:
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    if isinstance(value, dict):
        return {k: (v if k in _TEXT_FIELDS else _restore_floats(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_floats(v) for v in value]
    return value
