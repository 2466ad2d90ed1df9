"""pytest plugin: the validation cases as pytest items.

Loaded by every pytest run through the ``pytest11`` entry point, so this module imports only
the standard library and pytest at import time; torch, the case matrix and the backends are
imported when a test actually asks for ``moe_case``. A run that does not use the fixture is
untouched (five options and two fixtures are all that it adds).

- ``moe_case`` is parametrized over the suite's case ids (``--moe-suite``, default: ``smoke``
  on CPU, ``premerge`` on a GPU; ``--moe-filter`` as in ``moe-validate run``), so ``-k`` works on
  ids, and each item carries one marker per axis value (``scheme_fp8_block128``, ``act_silu``,
  ``lora_dual``, ``dtype_bf16``, ``config_inv``, ``map_half``, ``routing_skewed``, ``data_randn``,
  plus ``bias``, ``router_on_input``, ``clamp`` where set, and ``invar_perm`` etc. per invariance
  check) for ``-m``.
- ``moe_run(case)`` runs a case in this process through ``runner.run_case_inprocess`` with
  ``--moe-backend``; a device skip becomes ``pytest.skip(reason)``, anything but PASS a failure
  with the evaluation's message. ``--moe-gate accuracy|both`` picks the verdicts that decide
  (docs/PROFILES.md); a pass whose conformance verdict failed without gating is a
  ``ConformanceWarning`` in pytest's warnings summary.
- With ``--moe-results DIR`` (or ``--moe-report FILE``) every process appends its finished cases
  to ``DIR/results-<worker>.jsonl`` (one file per xdist worker, so no two processes share a
  file); at the end the controller merges them and renders one report (``--moe-report``, default
  ``DIR/report.html``). Without ``--moe-results`` the results go to ``<FILE stem>.results/``.
- Under pytest-xdist with GPUs, worker ``gwN`` runs on visible GPU ``N % count``: the controller
  publishes its visible GPUs (the ``CUDA_VISIBLE_DEVICES`` entries, UUIDs and MIG ids included)
  in ``MOE_VALIDATE_XDIST_GPUS`` before it starts the workers, and each worker sets its own
  ``CUDA_VISIBLE_DEVICES`` to its entry in ``pytest_load_initial_conftests``, before any conftest
  (which may import torch and query CUDA) is loaded. ``-n auto`` means one worker per GPU
  (times ``--moe-workers-per-gpu``, default 1; 0 leaves ``auto`` to xdist, i.e. one per CPU);
  without GPUs, or under ``TRITON_INTERPRET=1`` (cases run on CPU), ``auto`` is xdist's.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from moe_validate.contract.rules import interpreting

# Case axes that become "<prefix>_<value>" markers, and boolean-ish axes that become a bare marker.
_VALUE_MARKERS = (
    ("dtype", "dtype"),
    ("scheme", "scheme"),
    ("activation", "act"),
    ("lora", "lora"),
    ("config", "config"),
    ("expert_map", "map"),
    ("routing", "routing"),
    ("data", "data"),
)
_FLAG_MARKERS = ("bias", "router_on_input", "clamp")  # present when truthy / not None

_STATE = pytest.StashKey()


class ConformanceWarning(UserWarning):
    """A case passed (its gating verdicts held) but its conformance verdict failed (docs/PROFILES.md)."""

_PUBLISHED = pytest.StashKey()  # the controller's previous MOE_VALIDATE_XDIST_GPUS, restored at the end


def pytest_addoption(parser) -> None:
    group = parser.getgroup("moe-validate", "moe-validate cases as pytest items")
    group.addoption("--moe-suite", default=None,
                    help="suite for the moe_case fixture: smoke | premerge | nightly | bringup "
                         "(default: smoke on CPU, premerge on a GPU)")
    group.addoption("--moe-filter", default=None,
                    help="axis=value, axis!=value or a glob on the case id, joined by and/or/not and "
                         "parentheses; commas join with and, last (as moe-validate --filter)")
    group.addoption("--moe-backend", default="triton",
                    help="backend under test: triton | reference | module:attr | entry-point name")
    from moe_validate.verdicts import GATE_CHOICES  # torch-free

    group.addoption("--moe-gate", default=None, choices=tuple(GATE_CHOICES),
                    help="which verdicts decide a case (as moe-validate --gate): accuracy, or both (also "
                         "conformance); default: both for our own backends, accuracy for a third-party one")
    group.addoption("--moe-results", default=None, metavar="DIR",
                    help="append each finished case to DIR/results-<worker>.jsonl")
    group.addoption("--moe-report", default=None, metavar="FILE",
                    help="render one HTML report of the session's cases to FILE")
    group.addoption("--moe-workers-per-gpu", default=1, type=_non_negative_int, metavar="N",
                    help="with pytest-xdist on GPUs: '-n auto' starts N workers per visible GPU "
                         "(default 1; 0 = xdist's own auto, one per CPU)")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise pytest.UsageError(f"moe-validate: --moe-workers-per-gpu must be an integer >= 0; got {text!r}") from None
    if value < 0:
        raise pytest.UsageError(f"moe-validate: --moe-workers-per-gpu must be an integer >= 0; got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# One GPU per xdist worker
# ---------------------------------------------------------------------------------------------
def _controller_gpus() -> List[str]:
    """The controller's visible GPU entries ([] without CUDA or under the interpreter)."""
    if interpreting():
        return []
    from moe_validate import devices

    return [g.entry for g in devices.detect_gpus(memory=False)]


def pin_xdist_worker(environ=None) -> Optional[str]:
    """Sets ``CUDA_VISIBLE_DEVICES`` of xdist worker ``gwN`` to the controller's GPU ``N % count``.

    Reads ``PYTEST_XDIST_WORKER`` (set by xdist before the worker parses its configuration) and
    the list the controller published; returns the entry it pinned to, or None where either is
    missing (not an xdist worker, or no GPUs). ``environ`` defaults to ``os.environ``.
    """
    from moe_validate.devices import XDIST_GPUS_ENV

    env = os.environ if environ is None else environ
    match = re.fullmatch(r"gw(\d+)", env.get("PYTEST_XDIST_WORKER", ""))
    entries = [e.strip() for e in env.get(XDIST_GPUS_ENV, "").split(",") if e.strip()]
    if match is None or not entries:
        return None
    entry = entries[int(match.group(1)) % len(entries)]
    env["CUDA_VISIBLE_DEVICES"] = entry
    return entry


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    # The earliest hook a -p / entry-point plugin gets in a worker: before conftests, which may
    # import torch and initialise CUDA (tests/conftest.py does), after which the variable is read.
    pin_xdist_worker()
    # Before hypothesis' own pytest_configure reads --hypothesis-profile.
    from moe_validate.hypothesis_profiles import register_hypothesis_profiles

    register_hypothesis_profiles()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> Optional[int]:
    """``-n auto``: one worker per visible GPU (x --moe-workers-per-gpu); None = xdist decides."""
    per_gpu = config.getoption("moe_workers_per_gpu", 1)
    if not per_gpu:
        return None
    gpus = _controller_gpus()
    return len(gpus) * per_gpu if gpus else None


class _State:
    """Per-process plugin state: the cases, the backend and this process's results writer."""

    def __init__(self, config) -> None:
        self.config = config
        opt = config.option
        # The xdist worker id from this session's own config (an environment variable would be
        # inherited by a nested pytest run, e.g. pytester inside an xdist worker).
        workerinput = getattr(config, "workerinput", None)
        self.worker = workerinput["workerid"] if workerinput else "main"
        self.is_controller = workerinput is None
        self.report_path = Path(opt.moe_report).resolve() if opt.moe_report else None
        if opt.moe_results:
            self.results_dir: Optional[Path] = Path(opt.moe_results).resolve()
        elif self.report_path is not None:
            self.results_dir = self.report_path.with_name(self.report_path.stem + ".results")
        else:
            self.results_dir = None
        if self.results_dir is not None and self.report_path is None:
            self.report_path = self.results_dir / "report.html"
        self.suite: Optional[str] = None
        self._cases = None
        self._backend = None
        self._writer = None
        self.counts: Dict[str, int] = {}
        self.rendered: Optional[Path] = None
        self.registered_markers: set = set()
        self.started = time.monotonic()

    # --- cases --------------------------------------------------------------------------------
    def cases(self):
        if self._cases is None:
            import torch

            from moe_validate import matrix

            opt = self.config.option
            self.suite = opt.moe_suite or matrix.default_suite(torch.cuda.is_available())
            try:
                cases = matrix.suite_cases(self.suite)
                if opt.moe_filter:
                    cases = matrix.filter_cases(cases, opt.moe_filter)
            except (ValueError, TypeError) as exc:
                raise pytest.UsageError(f"moe-validate: {exc}") from None
            self._cases = [c for c in cases if c.is_valid()[0]]
        return self._cases

    def backend(self):
        if self._backend is None:
            from moe_validate.backends import get_backend

            try:
                self._backend = get_backend(self.config.option.moe_backend)
            except (ValueError, TypeError) as exc:
                raise pytest.UsageError(f"moe-validate: --moe-backend: {exc}") from None
        return self._backend

    def device(self) -> Optional[str]:
        """None (the default device) for a pinned worker, which sees one GPU; a fallback where a
        worker still sees several (pinning came too late): ``cuda:N % count`` for worker gwN."""
        match = re.fullmatch(r"gw(\d+)", self.worker)
        if match is None:
            return None
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"cuda:{int(match.group(1)) % count}" if count > 1 else None

    # --- results ------------------------------------------------------------------------------
    def record(self, record: Dict) -> None:
        self.counts[record["outcome"]] = self.counts.get(record["outcome"], 0) + 1
        if self.results_dir is None:
            return
        if self._writer is None:
            from moe_validate.results import ResultsWriter
            from moe_validate.runner import header_record

            self._writer = ResultsWriter(self.results_dir / f"results-{self.worker}.jsonl")
            self._writer.write(header_record(suite=self.suite, backend=self.config.option.moe_backend, shard=None,
                                             argv=["pytest"] + list(self.config.invocation_params.args),
                                             worker=self.worker))
        self._writer.write(record)

    def close(self, duration_s: float) -> None:
        """Footer and close, at the end of this process's session (a killed worker leaves none)."""
        if self._writer is not None:
            from moe_validate.runner import footer_record

            self._writer.write(footer_record(duration_s, self.counts))
            self._writer.close()
            self._writer = None

    def result_files(self) -> List[Path]:
        return sorted(self.results_dir.glob("results-*.jsonl")) if self.results_dir else []


def _ident(value) -> str:
    """A marker-safe spelling of an axis value (``-m`` expressions need identifiers)."""
    return re.sub(r"\W", "_", str(value))


def case_markers(params: Dict) -> List[str]:
    """Marker names for a case's ``params()``: one per axis value, in a fixed order."""
    names = [f"{prefix}_{_ident(params[axis])}" for axis, prefix in _VALUE_MARKERS
             if params.get(axis) is not None]
    names += [flag for flag in _FLAG_MARKERS if params.get(flag) not in (None, False)]
    # one marker per invariance check the case asks for ("perm+sub" -> invar_perm, invar_sub)
    invariance = params.get("invariance")
    if invariance and invariance != "none":
        names += [f"invar_{_ident(name)}" for name in str(invariance).split("+")]
    return names


def _publish_gpus_for_workers(config) -> None:
    """Controller of an xdist run: tell the workers (started after this) which GPUs exist."""
    from moe_validate.devices import XDIST_GPUS_ENV

    if getattr(config, "workerinput", None) is not None:
        return
    if getattr(config.option, "dist", "no") == "no" and not getattr(config.option, "numprocesses", None):
        return
    gpus = _controller_gpus()
    config.stash[_PUBLISHED] = os.environ.get(XDIST_GPUS_ENV)
    if gpus:
        os.environ[XDIST_GPUS_ENV] = ",".join(gpus)
    else:  # a value inherited from an outer run names GPUs this session does not have
        os.environ.pop(XDIST_GPUS_ENV, None)


def pytest_unconfigure(config) -> None:
    from moe_validate.devices import XDIST_GPUS_ENV

    if _PUBLISHED in config.stash:
        before = config.stash[_PUBLISHED]
        if before is None:
            os.environ.pop(XDIST_GPUS_ENV, None)
        else:
            os.environ[XDIST_GPUS_ENV] = before


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "moe_case: a moe-validate case item (parametrized moe_case fixture)")
    state = _State(config)
    config.stash[_STATE] = state
    from moe_validate.cpus import limit_torch_threads, single_threaded, xdist_workers

    if single_threaded():  # xdist workers or the interpreter: torch imported only then (issue 22)
        limit_torch_threads(max(1, xdist_workers()))
    _publish_gpus_for_workers(config)
    opt = config.option
    if opt.moe_suite is not None or opt.moe_filter:
        # Bad names are a usage error of this command line, caught before collection (the matrix
        # is imported only when an option asks for it).
        from moe_validate import matrix

        try:
            if opt.moe_suite is not None and opt.moe_suite not in matrix.SUITES:
                matrix.suite_cases(opt.moe_suite)  # raises with the list of known suites
            if opt.moe_filter:
                matrix.filter_cases([], opt.moe_filter)  # parses every term
        except (ValueError, TypeError) as exc:
            raise pytest.UsageError(f"moe-validate: {exc}") from None
    if opt.moe_backend != "triton":
        state.backend()  # load a third-party backend now: a bad spec is a usage error, not N failures
    if state.is_controller and state.results_dir is not None:
        # The directory holds one session's files: a stale worker file would be merged otherwise.
        state.results_dir.mkdir(parents=True, exist_ok=True)
        for stale in state.result_files():
            stale.unlink()


def pytest_generate_tests(metafunc) -> None:
    if "moe_case" not in metafunc.fixturenames:
        return
    state: _State = metafunc.config.stash[_STATE]
    params = []
    for case in state.cases():
        names = case_markers(case.params())
        for name in names:
            if name not in state.registered_markers:  # registered before use: --strict-markers holds
                metafunc.config.addinivalue_line("markers", f"{name}: moe-validate case axis value")
                state.registered_markers.add(name)
        marks = [pytest.mark.moe_case] + [getattr(pytest.mark, n) for n in names]
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("moe_case", params, indirect=True)


@pytest.fixture
def moe_case(request):
    """The Case of this item (parametrized by the plugin over ``--moe-suite``/``--moe-filter``)."""
    if not hasattr(request, "param"):
        pytest.fail("moe_case is parametrized by the moe_validate plugin; request it from a test function",
                    pytrace=False)
    return request.param


@pytest.fixture
def moe_run(request):
    """``moe_run(case)``: run the case in-process, record it, skip or fail per its outcome."""
    state: _State = request.config.stash[_STATE]

    def run(case):
        from moe_validate.runner import CaseOptions, run_case_inprocess

        result = run_case_inprocess(case, state.backend(), device=state.device(),
                                    backend_name=request.config.option.moe_backend,
                                    options=CaseOptions(gate=request.config.option.moe_gate))
        state.record(result.record)
        rec = result.record
        request.node.user_properties.append(("moe_outcome", rec["outcome"]))
        request.node.user_properties.append(("moe_repro", rec["repro"]))
        if rec.get("worst_margin") is not None:
            request.node.user_properties.append(("moe_worst_margin", rec["worst_margin"]))
        for verdict, v in (rec.get("verdicts") or {}).items():
            request.node.user_properties.append((f"moe_{verdict}", v["outcome"]))
        if rec["outcome"] == "SKIP":
            pytest.skip(rec["reason"] or "not supported")
        if result.outcome.is_bad:
            pytest.fail(f"{result.message()}\nrepro: {rec['repro']}", pytrace=False)
        from moe_validate.verdicts import not_gating_conformance_failure

        if not_gating_conformance_failure(rec):  # a pass, but said: in pytest's warnings summary
            warnings.warn(f"{rec['case_id']}: {rec['reason']}", ConformanceWarning, stacklevel=2)
        return result

    return run


def pytest_sessionfinish(session, exitstatus) -> None:
    state: Optional[_State] = session.config.stash.get(_STATE, None)
    if state is None:
        return
    state.close(time.monotonic() - state.started)
    if not state.is_controller or state.report_path is None:
        return
    files = state.result_files()
    if not files:
        return
    from moe_validate.results import load_results

    try:
        from moe_validate.report import render_report
    except ImportError as exc:
        sys.stderr.write(f"moe-validate: report not written: moe_validate.report is unavailable ({exc})\n")
        return
    state.rendered = render_report(load_results(files), state.report_path,
                                   title=f"pytest {state.suite or ''} / {session.config.option.moe_backend}")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state: Optional[_State] = config.stash.get(_STATE, None)
    if state is None or not state.is_controller or state.results_dir is None or not state.result_files():
        return
    terminalreporter.write_line(f"moe-validate results: {state.results_dir}")
    if state.rendered is not None:
        terminalreporter.write_line(f"moe-validate report:  {state.rendered}")
