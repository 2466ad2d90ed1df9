"""Runs cases against a backend and records every outcome, one JSONL line per finished case.

Two ways to run:

- ``run_case_inprocess(case, backend)``: one case in this process (the pytest plugin,
  ``moe-validate repro`` and ``--workers 0`` use it). Exceptions become outcomes: CUDA OOM ->
  OOM, a Triton compilation (or out-of-resources) error -> COMPILE_ERROR, anything else -> CRASH.
- ``run_cases(cases, backend, out_dir)``: many cases, each in a worker process started with
  ``multiprocessing`` 'spawn' (one worker per visible GPU by default). Worker i is born with
  ``CUDA_VISIBLE_DEVICES`` set to the i-th visible entry (mod the GPU count; an outer selection,
  UUIDs and MIG ids pass through). Where workers share a GPU, ``devices.GpuScheduler`` places
  cases so that their estimated memory fits it; a case too big to share runs alone. A worker that dies
  (segfault, ``os._exit``) or whose CUDA context is poisoned is replaced and the case is recorded
  as CRASH with its exit signal and the tail of the worker's log (faulthandler writes the
  Python stack there); a case that outlives ``timeout_s`` is recorded as TIMEOUT, its worker
  killed and replaced. Every record is appended to ``<out_dir>/results.jsonl`` the moment the
  case finishes, so a run killed at any point keeps all finished cases.

Cases are duck-typed: the runner uses ``case.id`` and ``case.params()`` and hands the case to
the backend, ``moe_validate.inputs.make_inputs`` and ``moe_validate.compare.evaluate``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import shlex
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from moe_validate.backends import Backend, get_backend
from moe_validate.devices import (GpuInfo, GpuScheduler, detect_gpus, gpu_budget_bytes, visible_entries,
                                  worker_gpus)
from moe_validate.contract.rules import interpreting
from moe_validate.env import capture_env
from moe_validate.results import Outcome, ResultsWriter

__all__ = [
    "CaseResult",
    "RunSummary",
    "run_case_inprocess",
    "run_cases",
    "parse_shard",
    "select_shard",
    "default_workers",
    "visible_gpus",
    "repro_command",
    "classify_exception",
    "header_record",
    "footer_record",
    "DEFAULT_TIMEOUT_S",
    "REPEAT_SEED_STRIDE",
    "fresh_seed",
    "repetition_of_seed",
    "repeat_cases",
    "failures_per_repetition",
]

# A generous per-case limit: the largest bring-up cases compile several Triton kernels (tens of
# seconds each on a cold cache) and the CPU interpreter runs a smoke case in seconds.
DEFAULT_TIMEOUT_S = 600.0
# Time a fresh worker may take to import torch/triton and reach its first case (not counted
# against the per-case limit).
_STARTUP_ALLOWANCE_S = 120.0
# How much of a dead worker's log goes into the CRASH record.
_LOG_TAIL_CHARS = 20_000
_CASE_MARKER = "=== moe-validate case "
# Substrings of CUDA errors after which the context is unusable: the worker must be replaced.
_POISONED_CUDA = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "CUDA error",
    "CUDA_ERROR",
)


# ---------------------------------------------------------------------------------------------
# One case, in this process
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """A finished case: the JSON-ready ``record`` and, when the comparison ran, the Evaluation."""

    record: Dict[str, Any]
    evaluation: Any = None
    retire_worker: bool = False  # the CUDA context is poisoned; this process must not run more

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.record["outcome"])

    def message(self) -> str:
        """What a person needs first: the evaluation's message for FAIL, the reason otherwise."""
        rec = self.record
        if self.evaluation is not None and not getattr(self.evaluation, "passed", True):
            msg = getattr(self.evaluation, "message", None)
            if callable(msg):
                failed_checks = [c["reason"] for c in rec.get("checks") or () if c["outcome"] == "FAIL"]
                return "\n".join([msg()] + failed_checks)
        head = f"{rec['case_id']}: {rec['outcome']}"
        if rec.get("reason"):
            head += f" ({rec['reason']})"
        if rec.get("error") and self.outcome.is_bad:
            head += "\n" + rec["error"].rstrip()
        return head


def repro_command(case_id: str, backend: str) -> str:
    """One shell line that re-runs just this case (with the interpreter flag when it applies)."""
    prefix = "TRITON_INTERPRET=1 " if interpreting() else ""
    return f"{prefix}moe-validate repro {shlex.quote(case_id)} --backend {shlex.quote(backend)}"


def _exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify_exception(exc: BaseException) -> Outcome:
    """OOM, COMPILE_ERROR or CRASH for an exception raised while running a case.

    Looks through ``__cause__``/``__context__`` so that a launcher wrapping a Triton error in its
    own exception is still classified by the root cause. Only modules already imported are
    consulted: classifying must not import torch or triton.
    """
    torch = sys.modules.get("torch")
    oom_types: Tuple[type, ...] = ()
    if torch is not None:
        oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                      getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    compile_types: List[type] = []
    errors_mod = sys.modules.get("triton.compiler.errors")
    if errors_mod is not None:
        compile_types.append(errors_mod.CompilationError)
    runtime_errors = sys.modules.get("triton.runtime.errors")
    if runtime_errors is not None and hasattr(runtime_errors, "OutOfResources"):
        # Shared memory or registers exceeded by a launch config: a build failure of that config.
        compile_types.append(runtime_errors.OutOfResources)
    for link in _exception_chain(exc):
        if oom_types and isinstance(link, oom_types):
            return Outcome.OOM
        if compile_types and isinstance(link, tuple(compile_types)):
            return Outcome.COMPILE_ERROR
    return Outcome.CRASH


def _cuda_poisoned(exc: BaseException) -> bool:
    text = "".join(str(link) for link in _exception_chain(exc))
    return any(s in text for s in _POISONED_CUDA)


def _base_record(case, backend_name: str) -> Dict[str, Any]:
    return {
        "kind": "case",
        "case_id": case.id,
        "params": case.params(),
        "outcome": None,
        "reason": None,
        "duration_s": 0.0,
        "backend": backend_name,
        "config": None,
        "config_source": None,
        "repro": repro_command(case.id, backend_name),
        "tolerance": None,
        "metrics": None,
        "detail": None,
        "error": None,
        "worst_margin": None,
        "checks": None,
        "compared_rows": None,
    }


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _device_context(device: str):
    """``torch.cuda.device(i)`` for "cuda:i" so that Triton launches on the inputs' device."""
    import contextlib

    if device.startswith("cuda"):
        import torch

        return torch.cuda.device(torch.device(device))
    return contextlib.nullcontext()


def default_device() -> str:
    """The GPU when there is one, except under the interpreter, which runs on CPU tensors."""
    import torch

    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def run_case_inprocess(case, backend: Union[str, Backend], *, device: Optional[str] = None,
                       backend_name: Optional[str] = None) -> CaseResult:
    """Runs one case here and returns its result; never raises for a failure of the case itself.

    ``backend`` is a Backend or a spec for ``get_backend``; ``backend_name`` (default: the spec,
    or the backend's ``name``) is what the record and its repro line name.
    """
    if isinstance(backend, str):
        backend_name = backend_name or backend
        backend = get_backend(backend)
    backend_name = backend_name or getattr(backend, "name", "?")
    record = _base_record(case, backend_name)
    evaluation = None
    retire = False
    start = time.perf_counter()
    try:
        supported, why = backend.supports(case)
        if not supported:
            record["outcome"], record["reason"] = Outcome.SKIP.value, why or "not supported by this backend"
            return CaseResult(record)
        from moe_validate.compare import evaluate
        from moe_validate.inputs import make_inputs

        device = device or default_device()
        with _device_context(device):
            inputs = make_inputs(case, device=device)
            out = backend.run(inputs, case)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()  # an asynchronous kernel fault must surface here, not later
            record["config"] = getattr(backend, "last_config", None)
            record["config_source"] = getattr(backend, "last_config_source", None)
            evaluation = evaluate(case, inputs, out)
            # The alignment contract and the case's bitwise invariances (re-runs of the backend),
            # right after the run whose launch config routing_stages describes.
            from moe_validate.invariance import run_checks

            checks = run_checks(case, inputs, out, backend)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
        failed = [c for c in checks if c["outcome"] == "FAIL"]
        skipped = [c for c in checks if c["outcome"] == "SKIP"]
        record["outcome"] = (Outcome.PASS if evaluation.passed and not failed else Outcome.FAIL).value
        reasons = [evaluation.reason] if evaluation.reason else []
        # A failing check leads when the comparison passed; a skipped one is said, never hidden.
        reasons += [c["reason"] for c in failed] + [f"SKIPPED {c['reason']}" for c in skipped]
        record["reason"] = "; ".join(reasons) or None
        record["tolerance"] = evaluation.tolerance
        record["metrics"] = evaluation.metrics
        record["detail"] = evaluation.detail
        record["worst_margin"] = evaluation.worst_margin
        record["checks"] = checks or None
        record["compared_rows"] = evaluation.compared_rows
    except Exception as exc:  # every failure of the case is a recorded outcome
        record["outcome"] = classify_exception(exc).value
        record["reason"] = _one_line(exc)
        record["error"] = traceback.format_exc()
        if record["config"] is None:
            record["config"] = getattr(backend, "last_config", None)
            record["config_source"] = getattr(backend, "last_config_source", None)
        # After a device fault the CUDA context is unusable: the worker must not run more cases.
        retire = _cuda_poisoned(exc)
        if retire and record["outcome"] == Outcome.CRASH.value:
            record["reason"] = "CUDA context poisoned: " + record["reason"]
    finally:
        record["duration_s"] = round(time.perf_counter() - start, 6)
    return CaseResult(record, evaluation, retire)


# ---------------------------------------------------------------------------------------------
# Sharding, workers, devices
# ---------------------------------------------------------------------------------------------
def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"i/n"`` with 1 <= i <= n -> (i, n); None -> None."""
    if text is None:
        return None
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shard must be 'i/n' with integers 1 <= i <= n (e.g. 2/4); got {text!r}") from None
    if not (count >= 1 and 1 <= index <= count):
        raise ValueError(f"shard must be 'i/n' with 1 <= i <= n (e.g. 2/4); got {text!r}")
    return index, count


def select_shard(cases: Sequence, shard: Optional[Union[str, Tuple[int, int]]]) -> List:
    """The cases of shard i/n: position i-1 (mod n) in the sorted list of case ids.

    Depends only on the set of case ids, so every job of a CI matrix that builds the same suite
    picks a disjoint share and the shares cover every case once. Cases keep their given order.
    """
    if isinstance(shard, str) or shard is None:
        shard = parse_shard(shard)
    if shard is None:
        return list(cases)
    index, count = shard
    ids = sorted({c.id for c in cases})
    mine = {cid for pos, cid in enumerate(ids) if pos % count == index - 1}
    return [c for c in cases if c.id in mine]


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


# ---------------------------------------------------------------------------------------------
# Repetitions (``moe-validate run --repeat N --fresh-seeds``, ``moe-validate calibrate``)
# ---------------------------------------------------------------------------------------------
# Repetition r of a case with seed s runs with seed s + r * REPEAT_SEED_STRIDE. Every suite seed is
# far below the stride (the largest is in the 3000s), so the map (s, r) -> seed is one-to-one over
# a suite: no two repetitions, and no two cases, share an id. The stride is even, so a fresh seed
# keeps the parity that inputs.py reads (odd int4 seeds carry an explicit zero point, even gated
# seeds split w1 in two slices): a curated case keeps exercising what it was written for. The
# repetition stays readable in the id: s3000007 is repetition 3 of seed 7. Repetition 0 keeps the
# case's own seed, so ``--repeat 1 --fresh-seeds`` is the plain run.
REPEAT_SEED_STRIDE = 1_000_000


def fresh_seed(seed: int, repetition: int) -> int:
    """The seed of repetition ``repetition`` (0-based) of a case whose own seed is ``seed``."""
    for name, value in (("seed", seed), ("repetition", repetition)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not 0 <= seed < REPEAT_SEED_STRIDE:
        raise ValueError(f"seed must be in [0, {REPEAT_SEED_STRIDE}) to be re-seeded per repetition; got {seed}")
    if repetition < 0:
        raise ValueError(f"repetition must be >= 0; got {repetition}")
    return seed + repetition * REPEAT_SEED_STRIDE


def repetition_of_seed(seed: int) -> int:
    """The repetition index a (possibly re-seeded) case seed belongs to: ``fresh_seed``'s inverse."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    return seed // REPEAT_SEED_STRIDE


def repeat_cases(cases: Sequence, repeat: int, *, fresh_seeds: bool, first: int = 0) -> List:
    """``cases`` ``repeat`` times, repetition-major (all of repetition ``first``, then ``first + 1``, ...).

    ``first`` > 0 continues an earlier stability run (repetitions 0 .. first-1 already ran) with
    new seeds instead of repeating the ones already judged.

    With ``fresh_seeds`` every case of repetition r is ``dataclasses.replace(case,
    seed=fresh_seed(case.seed, r))``: its id names the seed it ran with, so ``moe-validate repro``
    re-runs exactly that repetition. Without ``fresh_seeds`` only ``repeat == 1`` is accepted:
    a results file keys cases by id (the last record of an id wins when it is read), so N
    identical ids would keep one repetition and silently drop the others.
    """
    import dataclasses

    if not isinstance(repeat, int) or isinstance(repeat, bool):
        raise TypeError(f"repeat must be an int; got {type(repeat).__name__}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"first repetition must be an int >= 0; got {first!r}")
    if first and not fresh_seeds:
        raise ValueError(f"first repetition {first} > 0 needs fresh_seeds (--fresh-seeds)")
    cases = list(cases)
    if repeat == 1 and not fresh_seeds:
        return cases
    if not fresh_seeds:
        raise ValueError(f"repeat {repeat} > 1 needs fresh_seeds (--fresh-seeds): repetitions with one case id "
                         "collapse to the last one in results.jsonl; for identical inputs run into separate --out "
                         "directories")
    return [dataclasses.replace(case, seed=fresh_seed(case.seed, rep))
            for rep in range(first, first + repeat) for case in cases]


def failures_per_repetition(bad_case_ids: Sequence[str], repeat: int) -> List[List[str]]:
    """The not-passing case ids grouped by repetition (index r holds repetition r's ids).

    A repetition is read back from the id's seed token (``-s<seed>``, the last token of every id).
    """
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1; got {repeat!r}")
    groups: List[List[str]] = [[] for _ in range(repeat)]
    for case_id in bad_case_ids:
        token = str(case_id).rsplit("-", 1)[-1]
        if not (token.startswith("s") and token[1:].isdigit()):
            raise ValueError(f"case id {case_id!r} must end with the seed token s<seed>")
        rep = repetition_of_seed(int(token[1:]))
        if rep >= repeat:
            raise ValueError(f"case id {case_id!r} is repetition {rep}, beyond the {repeat} run")
        groups[rep].append(case_id)
    return groups


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------
def _worker_main(conn, backend_spec: str, gpu: Optional[str], log_path: str, timeout_s: Optional[float],
                 cpu_threads: Optional[int] = None) -> None:
    """Entry point of a spawned worker: receive cases, send records, until told to stop."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before the first CUDA call of this process
    if cpu_threads:
        # Each worker's host-side math (tolerance model, statistics) would otherwise start one
        # thread per core: N workers oversubscribe the host N-fold. Measured on the H100 host
        # (16 cores), nightly x7: 4 workers at 16 threads 0.85 s/case, 2 workers at 4 threads 0.23.
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
            record = _base_record(case, backend_spec)
            record["outcome"], record["reason"] = Outcome.CRASH.value, "backend failed to load in the worker"
            record["error"] = backend_error
            result = CaseResult(record)
        else:
            result = run_case_inprocess(case, backend, backend_name=backend_spec)
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
                 timeout_s: Optional[float], cpu_threads: Optional[int] = None):
        self.slot = slot
        self.gpu = gpu
        self.log_path = log_dir / f"worker-{slot}-{uuid.uuid4().hex[:8]}.log"
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, backend_spec, gpu, str(self.log_path), timeout_s, cpu_threads),
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
        return text[-_LOG_TAIL_CHARS:]

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
# A whole run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    results_path: Path
    counts: Dict[str, int]
    duration_s: float
    bad_cases: List[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every case passed or was skipped, 1 otherwise."""
        return 1 if self.bad_cases else 0

    def format(self) -> str:
        parts = [f"{n} {o}" for o, n in self.counts.items() if n]
        total = sum(self.counts.values())
        return f"{total} cases in {self.duration_s:.1f}s: " + (", ".join(parts) if parts else "nothing run")


class _Progress:
    """A tqdm bar on a terminal for long runs; otherwise one plain line per finished case."""

    BAR_MIN_CASES = 20

    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = total, 0, stream
        self.bar = None
        if stream is not None and total >= self.BAR_MIN_CASES and getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=stream, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, record: Dict[str, Any]) -> None:
        self.done += 1
        if self.stream is None:
            return
        outcome = record["outcome"]
        line = f"[{self.done}/{self.total}] {outcome:<13} {record['case_id']}  {record['duration_s']:.2f}s"
        if outcome != Outcome.PASS.value and record.get("reason"):
            line += f"  {record['reason']}"
        if self.bar is not None:
            if outcome != Outcome.PASS.value:
                self.bar.write(line, file=self.stream)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def header_record(*, suite: Optional[str], backend: str, shard: Optional[str], argv: List[str],
                  **extra: Any) -> Dict[str, Any]:
    """The results-file header (results.py schema) for a run, a shard or a pytest worker."""
    return {"kind": "header", "run_id": uuid.uuid4().hex, "started": now_iso(), "suite": suite,
            "backend": backend, "shard": shard, "argv": list(argv), "env": capture_env(), **extra}


def footer_record(duration_s: float, counts: Dict[str, int]) -> Dict[str, Any]:
    return {"kind": "footer", "finished": now_iso(), "duration_s": round(duration_s, 3), "counts": dict(counts)}


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
    bar = _Progress(len(cases), progress)

    with ResultsWriter(results_path) as writer:
        writer.write(header_record(suite=suite, backend=backend, shard=shard,
                                   argv=argv if argv is not None else sys.argv,
                                   case_count=len(cases), workers=workers, timeout_s=timeout_s,
                                   gpus=[g.entry for g in gpus] if workers else [], **(header_extra or {})))

        def finish(record: Dict[str, Any]) -> None:
            writer.write(record)
            counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
            if Outcome(record["outcome"]).is_bad:
                bad.append(record["case_id"])
            bar.update(record)

        try:
            if workers == 0:
                for case in cases:
                    finish(run_case_inprocess(case, backend_obj, backend_name=backend).record)
            else:
                _run_pool(cases, backend, workers, timeout_s, out_dir / "logs", finish, gpus)
        finally:
            bar.close()
        duration = time.monotonic() - start
        writer.write(footer_record(duration, counts))
    return RunSummary(results_path, counts, duration, bad)


def _run_pool(cases, backend_spec: str, workers: int, timeout_s: Optional[float], log_dir: Path, finish,
              gpus: Sequence[GpuInfo] = ()) -> None:
    if not cases:
        return
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

    cpu_threads = max(1, (os.cpu_count() or 1) // count)  # the host's cores shared among the workers

    def spawn(slot: int) -> _Worker:
        entry = gpus[gpu_of_slot[slot]].entry if gpus else None
        worker = _Worker(ctx, slot, backend_spec, entry, log_dir, timeout_s, cpu_threads)
        worker.gpu_index = sched_index[gpu_of_slot[slot]]
        return worker

    pool = [spawn(slot) for slot in range(count)]

    def replace(worker: _Worker) -> None:
        worker.kill()
        pool[worker.slot] = spawn(worker.slot)

    def release(worker: _Worker) -> None:
        scheduler.finish(worker.gpu_index, worker.case)

    def lost_case_record(worker: _Worker, outcome: Outcome, reason: str) -> Dict[str, Any]:
        record = _base_record(worker.case, backend_spec)
        record.update(outcome=outcome.value, reason=reason, error=worker.log_tail() or None,
                      duration_s=round(time.monotonic() - worker.started, 6))
        return record

    clean_end = False
    try:
        while True:
            for worker in pool:
                if worker.case is None and scheduler.pending:
                    case = scheduler.take(worker.gpu_index)
                    if case is not None:
                        worker.assign(case, timeout_s)
            busy = [w for w in pool if w.case is not None]
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
                    _, record, retire = message
                    release(worker)
                    worker.case = None
                    finish(record)
                    if retire or not worker.proc.is_alive():
                        replace(worker)
                    continue
                worker.proc.join(5)
                release(worker)
                finish(lost_case_record(
                    worker, Outcome.CRASH,
                    f"worker process died with {_exit_description(worker.proc.exitcode)}; worker replaced"))
                replace(worker)
            now = time.monotonic()
            for worker in list(pool):
                if worker.case is not None and worker.deadline is not None and now >= worker.deadline:
                    worker.proc.kill()
                    worker.proc.join(10)
                    release(worker)
                    finish(lost_case_record(
                        worker, Outcome.TIMEOUT,
                        f"exceeded the {timeout_s:g}s per-case limit; worker killed and replaced"))
                    replace(worker)
        clean_end = True
    finally:
        for worker in pool:
            # After an interrupt or an internal error, do not wait for cases in flight.
            worker.stop() if clean_end else worker.kill()

