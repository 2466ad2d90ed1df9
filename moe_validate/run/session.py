"""A whole run: the cases of one selection against one backend, into one results file.

``run_cases(cases, backend, out_dir)`` writes a header (the run's identity and the case ids it
expects), one record per finished case the moment it finishes (so a run killed at any point
keeps all finished cases), and a footer at its end; it returns a ``RunSummary``.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from moe_validate.backends import get_backend
from moe_validate.devices import GpuInfo, detect_gpus, visible_entries
from moe_validate.env import capture_env, interpreting
from moe_validate.results import (CaseRecord, FooterRecord, HeaderRecord, Outcome, ResultsWriter,
                                  expected_digest)
from moe_validate.run.case import run_case_inprocess
from moe_validate.run.progress import Progress
from moe_validate.run.workers import run_pool

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

    @property
    def exit_code(self) -> int:
        """0 when every case passed or was skipped, 1 otherwise."""
        return 1 if self.bad_cases else 0

    def format(self) -> str:
        parts = [f"{n} {o}" for o, n in self.counts.items() if n]
        total = sum(self.counts.values())
        return f"{total} cases in {self.duration_s:.1f}s: " + (", ".join(parts) if parts else "nothing run")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def header_record(*, suite: Optional[str], backend: str, shard: Optional[str], argv: List[str],
                  expected_cases: Optional[Sequence[str]] = None, run_id: Optional[str] = None,
                  **extra: Any) -> HeaderRecord:
    """The results-file header for a run, a shard or a pytest worker."""
    expected = list(expected_cases) if expected_cases is not None else None
    return HeaderRecord(run_id=run_id or uuid.uuid4().hex, started=now_iso(), suite=suite, backend=backend,
                        shard=shard, argv=list(argv), env=capture_env(), expected_cases=expected,
                        expected_digest=expected_digest(expected) if expected is not None else None,
                        case_count=len(expected) if expected is not None else extra.pop("case_count", None),
                        extra=extra)


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
) -> RunSummary:
    """Runs ``cases`` (already sharded) against the backend spec ``backend``.

    ``workers``: None = ``default_workers()`` (one per visible GPU); 0 = in this process (no
    isolation, no timeout); N = N spawned workers, worker i pinned to GPU i mod len(gpus) through
    its own ``CUDA_VISIBLE_DEVICES``. ``gpus``: the GPUs to place workers on (default: detected;
    [] under the interpreter or without CUDA; tests pass simulated ones). Where several workers
    share a GPU of known size, cases are placed so that their estimated memory
    (``devices.case_memory_bytes``) fits it, and a case too big to share runs alone
    (``devices.GpuScheduler``). ``header_extra``: more header fields (``--repeat`` records
    ``repeat`` and ``fresh_seeds`` there). Writes ``<out_dir>/results.jsonl``
    (header, one line per case, footer at a clean end) and returns the summary. Raises
    ValueError for a backend spec that cannot be loaded, before any case runs.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a spec string (workers rebuild it); got {type(backend).__name__}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive or None; got {timeout_s}")
    backend_obj = get_backend(backend)  # fail fast on a bad spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
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
    start = time.monotonic()
    counts = {o.value: 0 for o in Outcome}
    bad: List[str] = []
    bar = Progress(len(cases), progress)
    header = header_record(suite=suite, backend=backend, shard=shard, argv=argv if argv is not None else sys.argv,
                           expected_cases=[c.id for c in cases], workers=workers, timeout_s=timeout_s,
                           gpus=[g.entry for g in gpus] if workers else [], **(header_extra or {}))

    with ResultsWriter(results_path) as writer:
        writer.write(header)

        def finish(record: CaseRecord) -> None:
            record.run_id = header.run_id
            writer.write(record)
            counts[record.outcome] = counts.get(record.outcome, 0) + 1
            if Outcome(record.outcome).is_bad:
                bad.append(record.case_id)
            bar.update(record)

        try:
            if workers == 0:
                for case in cases:
                    finish(run_case_inprocess(case, backend_obj, backend_name=backend).record)
            else:
                run_pool(cases, backend, workers, timeout_s, out_dir / "logs", finish, gpus)
        finally:
            bar.close()
        duration = time.monotonic() - start
        writer.write(footer_record(duration, counts, run_id=header.run_id))
    return RunSummary(results_path, counts, duration, bad, header.run_id)
