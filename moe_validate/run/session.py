"""A whole run: the cases of one selection against one backend, into one results file.

``run_cases(cases, backend, out_dir)`` writes a header (the run's identity and the case ids it
expects), one record per finished case the moment it finishes (so a run killed at any point
keeps all finished cases), and a footer at its end; it returns a ``RunSummary``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from moe_validate.backends import capability_summary, get_backend
from moe_validate.devices import GpuInfo, detect_gpus, visible_entries
from moe_validate.contract.rules import interpreting
from moe_validate.env import capture_env
from moe_validate.exit_codes import EXIT_FAILURES, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_PASS
from moe_validate.results import (CaseRecord, FooterRecord, HeaderRecord, Outcome, ResultsWriter,
                                  expected_digest)
from moe_validate.run.case import CaseOptions, fill_diagnosis, run_case_inprocess
from moe_validate.run.outdir import RESULTS_NAME, OutDirError, ResumePlan, locked, prepare
from moe_validate.run.progress import Progress
from moe_validate.run.workers import DEFAULT_MAX_CONSECUTIVE_TIMEOUTS, run_pool
from moe_validate.verdicts import not_gating_conformance_failure

__all__ = ["RunSummary", "run_cases", "header_record", "footer_record", "default_workers", "visible_gpus",
           "DEFAULT_TIMEOUT_S", "now_iso"]

# A generous per-case limit: the largest bring-up cases compile several Triton kernels (tens of
# seconds each on a cold cache) and the CPU interpreter runs a smoke case in seconds.
DEFAULT_TIMEOUT_S = 600.0


def visible_gpus() -> List[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries a worker can be pinned to, in order; [] on CPU.

    Respects an outer ``CUDA_VISIBLE_DEVICES`` (indices, ``GPU-<uuid>``, ``MIG-<uuid>``): worker
    i of GPU i is given exactly the i-th entry (``devices.visible_entries``).
    """
    import torch

    if not torch.cuda.is_available():
        return []
    return visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


def default_workers(gpus: Optional[Sequence[GpuInfo]] = None) -> int:
    """One worker per visible GPU (``gpus``, default: detected); one on a CPU machine.

    Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors whatever GPUs exist, so one.
    """
    if gpus is None:
        gpus = [] if interpreting() else detect_gpus(memory=False)
    return max(1, len(gpus))


@dataclass
class RunSummary:
    results_path: Path
    counts: Dict[str, int]
    duration_s: float
    bad_cases: List[str] = field(default_factory=list)
    run_id: Optional[str] = None
    expected: int = 0  # cases the run set out to run
    present: int = 0  # of them, cases with a result (not NOT_RUN)
    interrupted: bool = False
    stopped: Optional[str] = None  # why the runner gave up on the rest (too many timeouts in a row)
    # PASS cases whose conformance verdict failed without gating: (case id, declared profile)
    conformance_only: List[Tuple[str, Optional[str]]] = field(default_factory=list)

    @property
    def incomplete(self) -> bool:
        return self.present < self.expected

    @property
    def exit_code(self) -> int:
        """130 interrupted; 3 incomplete (cases not run); 1 a case not passing; 0 all passed or skipped."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.incomplete:
            return EXIT_INCOMPLETE
        return EXIT_FAILURES if self.bad_cases else EXIT_PASS

    def format(self) -> str:
        parts = [f"{n} {o}" for o, n in self.counts.items() if n]
        total = sum(self.counts.values())
        line = f"{total} cases in {self.duration_s:.1f}s: " + (", ".join(parts) if parts else "nothing run")
        if self.incomplete or self.interrupted or self.stopped:
            line += f"; {self.present} of {self.expected} expected cases present"
            line += " (interrupted)" if self.interrupted else ""
            line += f" (stopped: {self.stopped})" if self.stopped else ""
        if self.conformance_only:
            profiles = sorted({p or "spec" for _, p in self.conformance_only})
            shown = ", ".join(cid for cid, _ in self.conformance_only[:5])
            line += (f"\nconformance FAIL (not gating) in {len(self.conformance_only)} passing case(s): they round "
                     f"differently from their declared profile {', '.join(profiles)}; accuracy held (exit status "
                     f"unchanged; --gate both makes it gate): {shown}"
                     + (" ..." if len(self.conformance_only) > 5 else ""))
        return line


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def header_record(*, suite: Optional[str], backend: str, shard: Optional[str], argv: List[str],
                  expected_cases: Optional[Sequence[str]] = None, run_id: Optional[str] = None,
                  segment: int = 0, **extra: Any) -> HeaderRecord:
    """The results-file header for a run, a shard or a pytest worker."""
    expected = list(expected_cases) if expected_cases is not None else None
    return HeaderRecord(run_id=run_id or uuid.uuid4().hex, started=now_iso(), suite=suite, backend=backend,
                        shard=shard, argv=list(argv), env=capture_env(), expected_cases=expected,
                        expected_digest=expected_digest(expected) if expected is not None else None,
                        case_count=len(expected) if expected is not None else extra.pop("case_count", None),
                        segment=segment, extra=extra)


def footer_record(duration_s: float, counts: Dict[str, int], *, run_id: Optional[str] = None,
                  **fields: Any) -> FooterRecord:
    return FooterRecord(run_id=run_id, finished=now_iso(), duration_s=round(duration_s, 3), counts=dict(counts),
                        **fields)


def run_cases(
    cases: Sequence,
    backend: str,
    out_dir: Union[str, Path],
    *,
    workers: Optional[int] = None,
    timeout_s: Optional[float] = DEFAULT_TIMEOUT_S,
    suite: Optional[str] = None,
    shard: Optional[str] = None,
    argv: Optional[List[str]] = None,
    progress=sys.stderr,
    gpus: Optional[Sequence[GpuInfo]] = None,
    header_extra: Optional[Dict[str, Any]] = None,
    resume: bool = False,
    overwrite: bool = False,
    max_consecutive_timeouts: Optional[int] = DEFAULT_MAX_CONSECUTIVE_TIMEOUTS,
    announce: Optional[str] = None,
    case_options: CaseOptions = CaseOptions(),
) -> RunSummary:
    """Runs ``cases`` (already sharded) against the backend spec ``backend``.

    ``workers``: None = ``default_workers()`` (one per visible GPU); 0 = in this process (no
    isolation, no timeout); N = N spawned workers, worker i pinned to GPU i mod len(gpus) through
    its own ``CUDA_VISIBLE_DEVICES``. ``gpus``: the GPUs to place workers on (default: detected;
    [] under the interpreter or without CUDA; tests pass simulated ones). Where several workers
    share a GPU of known size, cases are placed so that their estimated memory
    (``devices.case_memory_bytes``) fits it, and a case too big to share runs alone
    (``devices.GpuScheduler``). ``header_extra``: more header fields (``--repeat`` records
    ``repeat`` and ``fresh_seeds`` there).

    Writes ``<out_dir>/results.jsonl`` (header, one line per case, footer at the end) while
    holding the directory's lock. A directory that already holds results is refused
    (``OutDirError``) unless ``resume`` (continue that run: same selection and backend, only
    the cases it lacks, a torn last line cut first) or ``overwrite`` (start over).
    ``max_consecutive_timeouts``: after that many TIMEOUTs in a row the backend is taken as hung
    and the rest of the cases are recorded NOT_RUN (None: no limit). Ctrl-C ends the run with a
    footer marked ``interrupted`` and returns (``RunSummary.interrupted``). Raises ValueError for a
    backend spec that cannot be loaded, before any case runs; ``ResultsWriteError`` when a record
    cannot be written (the file keeps its whole lines). ``case_options``: what every case does
    beyond its run (which verdicts gate, save its output, compare with another backend); the header
    records a ``gate`` that overrides the backend's default.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a spec string (workers rebuild it); got {type(backend).__name__}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    if timeout_s is not None and not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be positive and finite, or None; got {timeout_s}")
    if max_consecutive_timeouts is not None and max_consecutive_timeouts < 1:
        raise ValueError(f"max_consecutive_timeouts must be >= 1 or None; got {max_consecutive_timeouts}")
    if case_options.gate is not None:
        header_extra = {**(header_extra or {}), "gate": case_options.gate}
    backend_obj = get_backend(backend)  # fail fast on a bad spec
    out_dir = Path(out_dir)
    if gpus is None:
        gpus = [] if interpreting() else detect_gpus(memory=False)
        if workers is not None and workers > len(gpus) > 0:
            # GPUs will be shared: their sizes are needed for memory planning (reading them sets
            # up torch's CUDA state in this process, which one worker per GPU does not need).
            gpus = detect_gpus(memory=True)
    gpus = list(gpus)
    for gpu in gpus:
        if not isinstance(gpu, GpuInfo):
            raise TypeError(f"gpus must hold devices.GpuInfo; got {type(gpu).__name__}")
    if workers is None:
        workers = default_workers(gpus)
    cases = list(cases)
    with locked(out_dir):
        plan = prepare(out_dir, resume=resume, overwrite=overwrite)
        return _run_locked(cases, backend, backend_obj, out_dir, plan, workers=workers, timeout_s=timeout_s,
                           suite=suite, shard=shard, argv=argv, progress=progress, gpus=gpus,
                           header_extra=header_extra, max_consecutive_timeouts=max_consecutive_timeouts,
                           case_options=case_options, announce=announce)


def _run_locked(cases, backend, backend_obj, out_dir: Path, plan: Optional[ResumePlan], *, workers, timeout_s,
                suite, shard, argv, progress, gpus, header_extra, max_consecutive_timeouts,
                case_options, announce=None) -> RunSummary:
    results_path = out_dir / RESULTS_NAME
    expected_ids = [c.id for c in cases]
    outcomes: Dict[str, str] = {}  # case id -> outcome, over the whole run (earlier segments too)
    run_id, segment, to_run = None, 0, cases
    extra = dict(header_extra or {})
    extra["capabilities"] = capability_summary(backend_obj)  # what the backend declares, what is SKIPPED
    if plan is not None:
        before = plan.header
        if before.backend != backend:
            raise OutDirError(f"--resume: {results_path} is a run of backend {before.backend!r}, not {backend!r}")
        if before.expected_digest != expected_digest(expected_ids):
            raise OutDirError(f"--resume: the selection ({len(expected_ids)} cases) is not the one run "
                              f"{before.run_id[:12]} set out to run ({before.case_count} cases); resume with the same "
                              "--suite, --filter, --shard and --repeat")
        run_id, segment = before.run_id, plan.segments
        outcomes.update(plan.previous)
        to_run = [c for c in cases if c.id not in plan.done]
        if plan.notes:
            extra["resume_notes"] = plan.notes
    if announce and progress is not None:  # once the out dir is accepted: a refusal stays the only line
        print(announce, file=progress, flush=True)
    start = time.monotonic()
    new_counts = {o.value: 0 for o in Outcome}
    bar = Progress(len(to_run), progress)
    header = header_record(suite=suite, backend=backend, shard=shard, argv=argv if argv is not None else sys.argv,
                           expected_cases=expected_ids, run_id=run_id, segment=segment, workers=workers,
                           timeout_s=timeout_s, gpus=[g.entry for g in gpus] if workers else [], **extra)
    interrupted, stopped = False, None
    conformance_only: List[Tuple[str, Optional[str]]] = []  # (case id, profile) of this segment

    with ResultsWriter(results_path) as writer:
        writer.write(header)

        def finish(record: CaseRecord) -> None:
            record.run_id = header.run_id
            fill_diagnosis(record)  # outcomes the parent records (TIMEOUT, a dead worker) too
            writer.write(record)
            new_counts[record.outcome] = new_counts.get(record.outcome, 0) + 1
            outcomes[record.case_id] = record.outcome
            if record.outcome == Outcome.PASS.value and not_gating_conformance_failure(record):
                conformance_only.append((record.case_id, record.profile))
            bar.update(record)

        try:
            if workers == 0:
                for case in to_run:
                    finish(run_case_inprocess(case, backend_obj, backend_name=backend, options=case_options).record)
            else:
                stopped = run_pool(to_run, backend, workers, timeout_s, out_dir / "logs", finish, gpus,
                                   max_consecutive_timeouts=max_consecutive_timeouts, case_options=case_options)
        except KeyboardInterrupt:
            interrupted = True  # the cases that finished are kept; the footer says why the rest are missing
        finally:
            bar.close()
        duration = time.monotonic() - start
        writer.write(footer_record(duration, new_counts, run_id=header.run_id, interrupted=interrupted,
                                   stopped=stopped))
    counts = {o.value: 0 for o in Outcome}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = [cid for cid in expected_ids if cid in outcomes and Outcome(outcomes[cid]).is_bad]
    present = sum(1 for cid in expected_ids if outcomes.get(cid, Outcome.NOT_RUN.value) != Outcome.NOT_RUN.value)
    return RunSummary(results_path, counts, duration, bad, header.run_id, expected=len(expected_ids),
                      present=present, interrupted=interrupted, stopped=stopped, conformance_only=conformance_only)
