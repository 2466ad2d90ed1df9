"""One case in this process: run the backend, compare, run the checks, and make it a record.

``run_case_inprocess(case, backend)`` never raises for a failure of the case itself: exceptions
become outcomes (CUDA OOM -> OOM, a Triton compilation or out-of-resources error ->
COMPILE_ERROR, anything else -> CRASH). The pytest plugin, ``moe-validate repro``, ``--workers 0``
and the spawned workers all run cases through it.

Cases are duck-typed: ``case.id`` and ``case.params()`` here, the case itself handed to the
backend, ``moe_validate.inputs.make_inputs`` and ``moe_validate.compare.evaluate``.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

from moe_validate.backends import CAPABILITIES, Backend, ReportsConfig, declared, get_backend
from moe_validate.contract.rules import interpreting
from moe_validate.results import CaseRecord, Outcome, make_json_safe

__all__ = ["CaseResult", "CaseOptions", "run_case_inprocess", "repro_command", "classify_exception", "base_record",
           "default_device", "one_line", "cuda_poisoned", "fill_diagnosis"]

REPORTED_CONFIG = tuple(c.member for c in CAPABILITIES if c.protocol is ReportsConfig)  # config, source
# Substrings of CUDA errors after which the context is unusable: the worker must be replaced.
_POISONED_CUDA = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "CUDA error",
    "CUDA_ERROR",
)


@dataclass(frozen=True)
class CaseOptions:
    """What a run asks of every case beyond running and judging it (picklable: each worker gets it)."""

    save_outputs: Optional[str] = None  # directory of golden outputs (moe_validate.golden)
    against: Optional[str] = None  # a backend spec whose output takes the oracle's place (moe_validate.against)
    # "accuracy" or "both" (--gate): which verdicts decide the outcome, overriding the backend's
    # default (verdicts.gating_policy); None: that default
    gate: Optional[str] = None

    def __post_init__(self) -> None:
        from moe_validate.verdicts import check_gate

        check_gate(self.gate)


@dataclass
class CaseResult:
    """A finished case: its ``record`` and, when the comparison ran, the Evaluation."""

    record: CaseRecord
    evaluation: Any = None
    retire_worker: bool = False  # the CUDA context is poisoned; this process must not run more

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.record.outcome)

    def message(self) -> str:
        """What a person needs first: the diagnosis, then the evaluation's anatomy for a FAIL, the
        reason (and traceback) otherwise."""
        from moe_validate.diagnosis import summary_of

        rec = self.record
        summary = summary_of(rec)
        failed_checks = [c["reason"] for c in rec.checks or () if c["outcome"] == "FAIL"]
        if self.evaluation is not None and not getattr(self.evaluation, "passed", True):
            msg = getattr(self.evaluation, "message", None)
            if callable(msg):
                return "\n".join([msg(diagnosis=summary)] + failed_checks)
        head = f"{rec.case_id}: {rec.outcome}"
        if summary:
            head += f": {summary}"
        lines = [head]
        if rec.reason and rec.reason not in head:
            lines.append(f"reason: {rec.reason}")
        lines += [c for c in failed_checks if c not in head]
        if rec.error and self.outcome.is_bad:
            lines.append(rec.error.rstrip())
        return "\n".join(lines)


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


def cuda_poisoned(exc: BaseException) -> bool:
    text = "".join(_safe_str(link) for link in _exception_chain(exc))
    return any(s in text for s in _POISONED_CUDA)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a backend's exception whose __str__ raises is still a recorded outcome
        return f"<{type(exc).__name__} whose str() raised>"


def base_record(case, backend_name: str, outcome: Optional[Outcome] = None, reason: Optional[str] = None) -> CaseRecord:
    """The record of ``case`` before (or without) running it."""
    return CaseRecord(case_id=case.id, params=case.params(), outcome=outcome.value if outcome else "",
                      reason=reason, backend=backend_name, repro=repro_command(case.id, backend_name))


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {_safe_str(exc)}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _device_context(device: str):
    """``torch.cuda.device(i)`` for "cuda:i" so that Triton launches on the inputs' device."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.device(torch.device(device))
    return contextlib.nullcontext()


def default_device() -> str:
    """The GPU when there is one, except under the interpreter, which runs on CPU tensors."""
    import torch

    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _backend_config(backend) -> Tuple[Any, Any]:
    """(``last_config``, ``last_config_source``) of the backend (``backends.ReportsConfig``; None where it
    does not report them); a property that raises is said, not fatal."""
    values = []
    for name in REPORTED_CONFIG:
        try:
            values.append(getattr(backend, name, None))
        except Exception as exc:
            values.append(f"<{name} raised {one_line(exc)}>")
    return values[0], values[1]


def run_case_inprocess(case, backend: Union[str, Backend], *, device: Optional[str] = None,
                       backend_name: Optional[str] = None, options: CaseOptions = CaseOptions()) -> CaseResult:
    """Runs one case here and returns its result; never raises for a failure of the case itself.

    ``backend`` is a Backend or a spec for ``get_backend``; ``backend_name`` (default: the spec,
    or the backend's ``name``) is what the record and its repro line name. ``options``: which
    verdicts gate, save the output, compare with another backend (``CaseOptions``). The mirror
    follows the backend's declared numerics profile. The record is JSON-safe whatever the backend
    returned (``make_json_safe``: changes listed in ``notes``), so it can cross a pipe and be written.
    """
    if isinstance(backend, str):
        backend_name = backend_name or backend
        backend = get_backend(backend)
    backend_name = backend_name or getattr(backend, "name", "?")
    record = base_record(case, backend_name)
    if options.gate is not None:
        record.repro += f" --gate {shlex.quote(options.gate)}"
    evaluation = None
    retire = False
    start = time.perf_counter()
    try:
        supported, why = backend.supports(case)
        if not supported:
            record.outcome, record.reason = Outcome.SKIP.value, why or "not supported by this backend"
            return CaseResult(record)
        from moe_validate.call_contract import CHECK_NAMES as CONTRACT_CHECKS, ContractedBackend
        from moe_validate.compare import evaluate
        from moe_validate.verdicts import declared_profile, gating_policy
        from moe_validate.inputs import make_inputs
        from moe_validate.stages import CHECK_NAME as STAGE_CHECK, localize, no_stages

        device = device or default_device()
        with _device_context(device):
            inputs = make_inputs(case, device=device)
            # Every call of the backend checked against the call contract (call_contract.py).
            contracted = ContractedBackend(backend)
            out = contracted.run(inputs, case)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()  # an asynchronous kernel fault must surface here, not later
            record.config, record.config_source = _backend_config(backend)
            record.stages = no_stages(backend)
            blocked = contracted.blocked(out)
            if blocked is not None:  # nothing to compare: the contract's failure is the verdict
                record.outcome, record.reason = Outcome.FAIL.value, blocked
                record.checks = contracted.checks()
                return CaseResult(record)
            if contracted.mutated:  # judge against the inputs as they were, never the mutated ones
                inputs = contracted.untouched_inputs(case, device)
            evaluation = evaluate(case, inputs, out, profile=declared_profile(backend),
                                  gating=gating_policy(backend, backend_name, options.gate),
                                  fp8_accumulation=declared(backend, "last_fp8_accumulation"))
            # The alignment contract and the case's bitwise invariances (re-runs of the backend),
            # right after the run whose launch config routing_stages describes.
            from moe_validate.invariance import run_checks

            checks = run_checks(case, inputs, out, contracted)
            checks += evaluation.skipped_checks()  # a count not applied, elements not judged: said
            _save_output(options, case, inputs, out, backend_name, record)
            if options.against:
                from moe_validate.against import against_check

                checks.append(against_check(case, inputs, out, options.against))
            if not evaluation.passed:  # where in the pipeline the output went wrong
                record.stages, stage_check = localize(case, inputs, contracted, out)
                checks.append(stage_check)
            checks += contracted.checks()
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
        failed = [c for c in checks if c["outcome"] == "FAIL"]
        skipped = [c for c in checks if c["outcome"] == "SKIP"]
        record.outcome = (Outcome.PASS if evaluation.passed and not failed else Outcome.FAIL).value
        # A broken call contract leads (the backend did not do what any caller relies on), then the
        # comparison, then the other failed checks; a skipped check is said, never hidden.
        broken = [c["reason"] for c in failed if c["name"] in CONTRACT_CHECKS]
        reasons = broken + ([evaluation.reason] if evaluation.reason else [])
        reasons += [c["reason"] for c in failed if c["name"] not in CONTRACT_CHECKS]
        # a localization that found no stage over its bound still says so (what was compared)
        reasons += [c["reason"] for c in checks if c["name"] == STAGE_CHECK and c["outcome"] == "PASS"]
        if skipped:
            lead = f"PASS with {len(skipped)} check(s) skipped: " if record.outcome == Outcome.PASS.value else ""
            reasons.append(lead + "; ".join(f"SKIPPED {c['reason']}" for c in skipped))
        record.reason = "; ".join(reasons) or None
        record.tolerance = evaluation.tolerance
        record.metrics = evaluation.metrics
        record.detail = evaluation.detail
        record.worst_margin = evaluation.worst_margin
        record.checks = checks or None
        record.compared_rows = evaluation.compared_rows
        record.verdicts = evaluation.verdicts  # accuracy and conformance, gating or not
        record.gating = list(evaluation.gating)
        record.profile = evaluation.profile
    except Exception as exc:  # every failure of the case is a recorded outcome
        record.outcome = classify_exception(exc).value
        record.reason = one_line(exc)
        try:
            record.error = traceback.format_exc()
        except Exception:  # formatting a hostile exception can raise too
            record.error = f"{type(exc).__name__} (its traceback could not be formatted)"
        if record.config is None:
            record.config, record.config_source = _backend_config(backend)
        # After a device fault the CUDA context is unusable: the worker must not run more cases.
        retire = cuda_poisoned(exc)
        if retire and record.outcome == Outcome.CRASH.value:
            record.reason = "CUDA context poisoned: " + record.reason
    finally:
        record.duration_s = round(time.perf_counter() - start, 6)
        _make_storable(record)
        fill_diagnosis(record)
    return CaseResult(record, evaluation, retire)


def fill_diagnosis(record: CaseRecord) -> None:
    """``record.diagnosis`` from what the finished record measured (None for a PASS); a diagnosis
    that cannot be made is a note, never a lost case."""
    from moe_validate.diagnosis import diagnose

    if record.diagnosis is not None:
        return
    try:
        record.diagnosis = make_json_safe(diagnose(record), record.notes, "diagnosis")
    except Exception as exc:  # the case's outcome stands whatever the diagnosis does
        record.notes.append(f"diagnosis: not made ({one_line(exc)})")


def _save_output(options: CaseOptions, case, inputs, out, backend_name: str, record: CaseRecord) -> None:
    """The golden output, when asked; a store that cannot be written is a note, not the case's failure."""
    if not options.save_outputs:
        return
    from moe_validate.golden import save_output

    try:
        save_output(options.save_outputs, case, inputs, out, backend=backend_name)
    except (OSError, ValueError) as exc:
        record.notes.append(f"output not saved to {options.save_outputs}: {exc}")


def _make_storable(record: CaseRecord) -> None:
    """Every field JSON-safe in place (a backend's config may hold anything)."""
    for name in ("config", "config_source", "tolerance", "metrics", "detail", "checks", "compared_rows", "params",
                 "verdicts", "stages", "diagnosis"):
        setattr(record, name, make_json_safe(getattr(record, name), record.notes, name, text_cap=1_000_000))
