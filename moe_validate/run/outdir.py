"""The output directory of a run: one run per directory, locked while it writes.

A second run into a directory that already holds results is refused: its records would
interleave with the first run's in one ``results.jsonl``. ``--resume`` continues the run that is
there (only its missing cases, after cutting a torn last line); ``--overwrite`` starts over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

from moe_validate.results import HeaderRecord, Outcome, ResultsError, load_results

__all__ = ["OutDirError", "ResumePlan", "RESULTS_NAME", "LOCK_NAME", "locked", "prepare", "repair_torn_tail"]

RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".moe-validate.lock"
# What --overwrite removes: this harness's own outputs, nothing else a user put there.
_OUTPUTS = (RESULTS_NAME, "report.html")
_OUTPUT_DIRS = ("logs",)


class OutDirError(ValueError):
    """The output directory cannot be used as asked (bad input: exit 2). The message names --out."""


@dataclass
class ResumePlan:
    """What a ``--resume`` continues: the run in the directory and the cases it already has."""

    header: HeaderRecord
    done: Set[str]  # case ids with a result (NOT_RUN is not one)
    previous: Dict[str, str]  # case id -> outcome of every record the run has
    segments: int  # headers the run has written so far
    repaired: Optional[str] = None  # what was cut from a torn last line
    notes: List[str] = field(default_factory=list)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutDirError(f"--out {out_dir} cannot be created: {exc.strerror or exc}") from None
    if not out_dir.is_dir():
        raise OutDirError(f"--out {out_dir} is not a directory")
    probe = out_dir / f".moe-validate-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutDirError(f"--out {out_dir} is not writable: {exc.strerror or exc}") from None


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``out_dir`` (``fcntl.flock``: released by the OS if we die)."""
    _check_writable(out_dir)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): the refusal of a non-empty --out still holds
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise OutDirError(f"--out {out_dir} is in use by another moe-validate run (pid {holder}); wait for it "
                              "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


def repair_torn_tail(path: Path) -> Optional[str]:
    """Cuts a last line that has no newline (a write cut short); returns what was cut, or None."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return None
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
        return data[keep:].decode("utf-8", "replace")


def _describe(results_path: Path) -> str:
    try:
        rs = load_results([results_path])
    except ResultsError as exc:
        return f"unreadable: {exc}"
    runs = ", ".join(f"run {r.run_id[:12]} of backend {r.backend or '?'}, {len(r.cases)} cases" for r in rs.runs)
    return runs or "no cases"


def prepare(out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> Optional[ResumePlan]:
    """Readies ``out_dir`` for a run (call it under ``locked``); a ResumePlan for ``resume``."""
    if resume and overwrite:
        raise OutDirError("--resume and --overwrite exclude each other")
    results_path = out_dir / RESULTS_NAME
    has_results = results_path.exists() and results_path.stat().st_size > 0
    if overwrite:
        for name in _OUTPUTS:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
        for name in _OUTPUT_DIRS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        return None
    if not resume:
        if has_results:
            raise OutDirError(f"--out {out_dir} already holds {RESULTS_NAME} ({_describe(results_path)}): pass "
                              "--resume to run its missing cases, --overwrite to replace it, or choose another --out")
        return None
    if not has_results:
        raise OutDirError(f"--resume: --out {out_dir} holds no {RESULTS_NAME} to resume")
    try:
        repaired = repair_torn_tail(results_path)
    except OSError as exc:
        raise OutDirError(f"--resume: cannot repair {results_path}: {exc.strerror or exc}") from None
    try:
        rs = load_results([results_path])
    except ResultsError as exc:
        raise OutDirError(f"--resume: {exc}") from None
    if len(rs.runs) != 1 or not rs.runs[0].headers:
        raise OutDirError(f"--resume: {results_path} must hold exactly one run with a header; it holds "
                          f"{_describe(results_path)}")
    run = rs.runs[0]
    if run.expected is None:
        raise OutDirError(f"--resume: run {run.run_id[:12]} in {results_path} did not record its expected case ids "
                          "(written by an older moe-validate): start over with --overwrite")
    done = {cid for cid, c in run.cases.items() if c.outcome != Outcome.NOT_RUN.value}
    notes = [f"repaired a torn last line ({len(repaired)} characters cut)"] if repaired else []
    return ResumePlan(header=run.headers[0], done=done, previous={cid: c.outcome for cid, c in run.cases.items()}, segments=len(run.headers), repaired=repaired, notes=notes)
