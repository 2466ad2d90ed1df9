"""Worker processes: each case of a pooled run in a spawned process that may die, hang or poison its GPU.

Workers are started with ``multiprocessing`` 'spawn' (one per visible GPU by default). Worker i
is born with ``CUDA_VISIBLE_DEVICES`` set to the i-th visible entry (mod the GPU count; an outer
selection, UUIDs and MIG ids pass through). Where workers share a GPU, ``devices.GpuScheduler``
places cases so that their estimated memory fits it; a case too big to share runs alone. A worker
that dies (segfault, ``os._exit``) or whose CUDA context is poisoned is replaced and the case is
recorded as CRASH with its exit signal and the tail of the worker's log (faulthandler writes the
Python stack there); a case that outlives ``timeout_s`` is recorded as TIMEOUT, its worker killed
and replaced.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from moe_validate.backends import get_backend
from moe_validate.cpus import intra_op_threads
from moe_validate.devices import GpuInfo, GpuScheduler, gpu_budget_bytes, worker_gpus
from moe_validate.results import CaseRecord, Outcome
from moe_validate.run.case import CaseOptions, CaseResult, base_record, run_case_inprocess

__all__ = ["run_pool", "LOG_TAIL_CHARS", "DEFAULT_MAX_CONSECUTIVE_TIMEOUTS"]

# Time a fresh worker may take to import torch/triton and reach its first case (not counted
# against the per-case limit).
_STARTUP_ALLOWANCE_S = 120.0
# How much of a dead worker's log goes into the CRASH record.
LOG_TAIL_CHARS = 20_000
_CASE_MARKER = "=== moe-validate case "


# After this many TIMEOUTs in a row the backend is taken as hung: each further one would cost the
# whole per-case limit plus a worker respawn, and a nightly run would absorb them without limit.
DEFAULT_MAX_CONSECUTIVE_TIMEOUTS = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """The worker must not outlive the run (a hung case would keep its GPU after the parent's SIGKILL).

    Linux: the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``), which reaches a
    worker stuck in C code too. Elsewhere, and to cover the parent dying before the call, a
    daemon thread polls the parent's pid once a second.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="moe-validate-parent-watch", daemon=True).start()


def _worker_main(conn, backend_spec: str, gpu: Optional[str], log_path: str, timeout_s: Optional[float],
                 cpu_threads: Optional[int] = None, parent_pid: Optional[int] = None,
                 case_options: CaseOptions = CaseOptions()) -> None:
    """Entry point of a spawned worker: receive cases, send records, until told to stop."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent ends the run and kills the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before the first CUDA call of this process
    if cpu_threads:
        # Each worker's host-side math (tolerance model, statistics) would otherwise start one
        # thread per core: N workers oversubscribe the host N-fold. Measured on the H100 host
        # (16 cores), nightly x7: 4 workers at 16 threads 0.85 s/case, 2 workers at 4 threads 0.23
        # (the count: moe_validate.cpus.intra_op_threads).
        import torch

        torch.set_num_threads(cpu_threads)
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 2)  # C-level messages (CUDA, segfault notes) land in the log too
    sys.stderr = log
    faulthandler.enable(file=log)
    print(f"moe-validate worker pid {os.getpid()}: CUDA_VISIBLE_DEVICES="
          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}", file=log, flush=True)
    try:
        backend = get_backend(backend_spec)
    except Exception:
        backend = None
        backend_error = traceback.format_exc()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] == "stop":
            return
        case = message[1]
        print(f"{_CASE_MARKER}{case.id}", file=log, flush=True)
        conn.send(("started", case.id))  # the parent's per-case clock starts now, not at spawn
        if timeout_s:
            # Dump every thread's stack shortly before the parent kills us, for the TIMEOUT record.
            faulthandler.dump_traceback_later(max(0.9 * timeout_s, timeout_s - 5.0), exit=False, file=log)
        if backend is None:
            record = base_record(case, backend_spec, Outcome.CRASH, "backend failed to load in the worker")
            record.error = backend_error
            result = CaseResult(record)
        else:
            result = run_case_inprocess(case, backend, backend_name=backend_spec, options=case_options)
        if timeout_s:
            faulthandler.cancel_dump_traceback_later()
        conn.send(("result", result.record, result.retire_worker))
        if result.retire_worker:
            return


@contextlib.contextmanager
def _pinned_environment(gpu: Optional[str]):
    """``CUDA_VISIBLE_DEVICES=gpu`` while a child is spawned, so that it is born pinned.

    The spawned interpreter imports this module (and with it torch) before ``_worker_main`` runs;
    having the variable in its environment from the start means no import can initialise CUDA
    with every GPU visible. ``_worker_main`` sets it again (harmless) for other start methods.
    """
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class _Worker:
    gpu_index = 0  # the scheduler's index of this worker's GPU

    def __init__(self, ctx, slot: int, backend_spec: str, gpu: Optional[str], log_dir: Path,
                 timeout_s: Optional[float], cpu_threads: Optional[int] = None,
                 case_options: CaseOptions = CaseOptions()):
        self.slot = slot
        self.gpu = gpu
        self.log_path = log_dir / f"worker-{slot}-{uuid.uuid4().hex[:8]}.log"
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, backend_spec, gpu, str(self.log_path), timeout_s, cpu_threads, os.getpid(), case_options),
            name=f"moe-validate-worker-{slot}",
            daemon=True,
        )
        with _pinned_environment(gpu):
            self.proc.start()
        child_conn.close()
        self.case = None
        self.deadline: Optional[float] = None
        self.started = 0.0

    def assign(self, case, timeout_s: Optional[float]) -> None:
        self.case = case
        self.started = time.monotonic()
        # Until the worker says it started the case, allow for its start-up (imports, CUDA init).
        self.deadline = self.started + timeout_s + _STARTUP_ALLOWANCE_S if timeout_s else None
        self.conn.send(("case", case))

    def case_started(self, timeout_s: Optional[float]) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s if timeout_s else None

    def log_tail(self) -> str:
        """The log written since this worker's current case began."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        marker = f"{_CASE_MARKER}{self.case.id}" if self.case is not None else None
        if marker and marker in text:
            text = text[text.rindex(marker) + len(marker):].lstrip("\n")
        return text[-LOG_TAIL_CHARS:]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(10)
        self.kill()


def _exit_description(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"



# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
def run_pool(cases, backend_spec: str, workers: int, timeout_s: Optional[float], log_dir: Path,
             finish: Callable[[CaseRecord], None], gpus: Sequence[GpuInfo] = (), *,
             max_consecutive_timeouts: Optional[int] = DEFAULT_MAX_CONSECUTIVE_TIMEOUTS,
             case_options: CaseOptions = CaseOptions()) -> Optional[str]:
    """Runs ``cases`` in ``workers`` processes, handing each record to ``finish`` as it ends.

    Returns None, or why the pool stopped early (``max_consecutive_timeouts`` TIMEOUTs in a row;
    every case left was then recorded NOT_RUN).
    """
    if not cases:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    count = min(workers, len(cases))
    # Worker slot -> GPU slot mod len(gpus). Only GPUs that get a worker are scheduled on (with
    # fewer workers than GPUs the rest stay idle); on CPU there is one unplanned pseudo-GPU.
    gpu_of_slot = [0 if g is None else g for g in worker_gpus(count, len(gpus))]
    used_gpus = sorted(set(gpu_of_slot))
    if gpus:
        budgets = [gpu_budget_bytes(gpus[g], gpu_of_slot.count(g)) for g in used_gpus]
    else:
        budgets = [None]
    scheduler = GpuScheduler(cases, budgets)
    sched_index = {g: i for i, g in enumerate(used_gpus)}

    cpu_threads = intra_op_threads(count)  # one under the interpreter; else the usable CPUs shared out

    def spawn(slot: int) -> _Worker:
        entry = gpus[gpu_of_slot[slot]].entry if gpus else None
        worker = _Worker(ctx, slot, backend_spec, entry, log_dir, timeout_s, cpu_threads, case_options)
        worker.gpu_index = sched_index[gpu_of_slot[slot]]
        return worker

    pool: List[Optional[_Worker]] = [spawn(slot) for slot in range(count)]

    def replace(worker: _Worker) -> None:
        worker.kill()
        # A fresh worker costs seconds of start-up (torch, triton): only when cases are left for it.
        pool[worker.slot] = spawn(worker.slot) if scheduler.pending else None

    def release(worker: _Worker) -> None:
        scheduler.finish(worker.gpu_index, worker.case)

    def lost_case_record(worker: _Worker, outcome: Outcome, reason: str) -> CaseRecord:
        record = base_record(worker.case, backend_spec, outcome, reason)
        record.error = worker.log_tail() or None
        record.duration_s = round(time.monotonic() - worker.started, 6)
        return record

    timeouts_in_a_row = 0
    stopped: Optional[str] = None

    def record(rec: CaseRecord) -> None:
        nonlocal timeouts_in_a_row
        timeouts_in_a_row = timeouts_in_a_row + 1 if rec.outcome == Outcome.TIMEOUT.value else 0
        finish(rec)

    def hung() -> bool:
        return max_consecutive_timeouts is not None and timeouts_in_a_row >= max_consecutive_timeouts

    def give_up(reason: str) -> None:
        """Records every case in flight or pending as NOT_RUN, and kills the workers."""
        for worker in live():
            if worker.case is not None:
                release(worker)
                finish(base_record(worker.case, backend_spec, Outcome.NOT_RUN, reason))
                worker.case = None
            worker.kill()
        for case in scheduler.drain():
            finish(base_record(case, backend_spec, Outcome.NOT_RUN, reason))
        pool[:] = [None] * len(pool)

    def live() -> List[_Worker]:
        return [w for w in pool if w is not None]

    clean_end = False
    try:
        while True:
            for worker in live():
                if worker.case is None and scheduler.pending:
                    case = scheduler.take(worker.gpu_index)
                    if case is not None:
                        worker.assign(case, timeout_s)
            busy = [w for w in live() if w.case is not None]
            if not busy:
                if scheduler.pending:  # an idle GPU takes any case (GpuScheduler rule 1)
                    raise RuntimeError(f"internal: {scheduler.pending} cases left but no worker took one")
                break
            deadlines = [w.deadline for w in busy if w.deadline is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(multiprocessing.connection.wait(handles, timeout=wait_s))
            for worker in busy:
                if worker.conn not in ready and worker.proc.sentinel not in ready:
                    continue
                message = None
                try:
                    if worker.conn.poll():
                        message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "started":
                    worker.case_started(timeout_s)
                    continue
                if message is not None:
                    _, rec, retire = message
                    release(worker)
                    worker.case = None
                    record(rec)
                    if retire or not worker.proc.is_alive():
                        replace(worker)
                    continue
                worker.proc.join(5)
                release(worker)
                record(lost_case_record(
                    worker, Outcome.CRASH,
                    f"worker process died with {_exit_description(worker.proc.exitcode)}; worker replaced"))
                replace(worker)
            now = time.monotonic()
            for worker in live():
                if worker.case is not None and worker.deadline is not None and now >= worker.deadline:
                    worker.proc.kill()
                    worker.proc.join(10)
                    release(worker)
                    record(lost_case_record(
                        worker, Outcome.TIMEOUT,
                        f"exceeded the {timeout_s:g}s per-case limit; worker killed and replaced"))
                    if hung():
                        worker.kill()  # no replacement: the run gives up on this backend below
                        pool[worker.slot] = None
                    else:
                        replace(worker)
            if hung():
                stopped = (f"{timeouts_in_a_row} cases timed out in a row (limit {max_consecutive_timeouts}): the "
                           "backend looks hung; the rest were not run")
                give_up(f"not run: {stopped.split(':')[0]}")
                break
        clean_end = True
    finally:
        for worker in live():
            # After an interrupt or an internal error, do not wait for cases in flight.
            worker.stop() if clean_end else worker.kill()
    return stopped
