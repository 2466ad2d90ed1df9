"""``moe-validate selftest``: prove the harness can fail, by planting bugs and watching it catch them.

For each mutant of a catalogue (an exact-text patch of ``kernels/``): ``planted``, the selftest's own
``moe_validate.mutants.MUTANTS`` (written beside the suites), or ``independent``,
``moe_validate.mutants_independent.INDEPENDENT_MUTANTS`` (written without seeing the suites, issue 26):

1. copy the ``kernels`` package into a temporary directory and apply the patch there (the
   production source is never touched; a hunk that does not match exactly once makes the mutant
   *stale*, reported loudly and counted as a failure of the selftest);
2. run the mutant's cases in ONE child process whose ``sys.path`` starts with that directory, so
   ``import kernels`` gets the mutant; ``TRITON_INTERPRET`` is inherited from this process. The
   child is forked from a server that has imported torch, triton and numpy, never ``kernels``
   (``_server_context``); where that cannot be, it is a fresh interpreter. Inside,
   each case goes through the harness exactly as a user's run does
   (``runner.run_case_inprocess`` -> ``inputs.make_inputs`` -> ``backends.TritonBackend`` with NaN-
   poisoned workspaces -> ``compare.evaluate`` against the reference);
3. a case *kills* the mutant when its outcome is bad (FAIL, CRASH, COMPILE_ERROR, OOM, TIMEOUT)
   while the unmutated copy passes it. The clean copy runs first through the same machinery, on
   every selected case: a case it does not pass cannot kill anything (reported as such).

Cases per mutant: the suite's cases that can reach the mutated code (``Mutant.reaches``), those
that resolve it best first (``Mutant.prefer``), then cheapest first (``matrix.interpreter_cost``),
at most ``cap``; with ``all_cases`` every case of the suite, in cost order, whatever the mutant's
reach (what a team that has only the suite would run). The kill matrix (mutant x case ->
killed / survived, with the metric that caught it) is written as JSON and as a short text table.

Exit status of the command: 0 when the clean copy passes every selected case, no patch is stale
and every mutant expected to be caught here is killed; 1 otherwise; 2 for bad input.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from moe_validate.contract.rules import interpreting
from moe_validate.mutants import MUTANTS, REQUIRED_MUTANTS, Hunk, Mutant, mutant_by_name
from moe_validate.mutants_independent import INDEPENDENT_MUTANTS, IndependentMutant, independent_mutant_by_name

__all__ = [
    "StalePatch",
    "CaseRun",
    "MutantReport",
    "SelftestReport",
    "kernels_source_dir",
    "apply_hunks",
    "stale_patches",
    "select_cases",
    "expected_here",
    "run_copy",
    "run_selftest",
    "add_selftest_parser",
    "run_selftest_command",
    "DEFAULT_CAP",
    "SUITE_ORDER",
    "BAD_OUTCOMES",
    "CATALOGUES",
]

DEFAULT_CAP = 3  # cases per mutant: enough to reach the code from two or three angles, cheap on CPU
SUITE_ORDER = ("smoke", "premerge", "nightly", "bringup")
BAD_OUTCOMES = ("FAIL", "CRASH", "COMPILE_ERROR", "OOM", "TIMEOUT")
# The mutant sets: "planted" was written beside the suites (and tunes them), "independent" without
# seeing them (issue 26), so its kill rate is the suites' coverage of bugs nobody aimed them at.
CATALOGUES: Dict[str, Tuple[Mutant, ...]] = {"planted": MUTANTS, "independent": INDEPENDENT_MUTANTS}
_BY_NAME = {"planted": mutant_by_name, "independent": independent_mutant_by_name}
# Subprocess limits: interpreter start (torch + triton import) plus a generous per-case allowance;
# a case that hangs is a TIMEOUT outcome (a kill, as for a user's run), not a hung selftest.
STARTUP_ALLOWANCE_S = 120.0
PER_CASE_TIMEOUT_S = 600.0
_LOG_TAIL = 4000


class StalePatch(ValueError):
    """A hunk's old snippet does not occur exactly once in the current kernels source."""


# ---------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------
def kernels_source_dir() -> Path:
    """The directory ``import kernels`` resolves to in this process (without importing it)."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("cannot locate the kernels package (is the repository root on sys.path?)")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _hunk_problem(mutant_name: str, index: int, hunk: Hunk, text: Optional[str]) -> Optional[str]:
    where = f"mutant {mutant_name}, hunk {index + 1} (kernels/{hunk.file})"
    if text is None:
        return f"{where}: file does not exist"
    count = text.count(hunk.old)
    if count != 1:
        first = hunk.old.strip().splitlines()[0] if hunk.old.strip() else repr(hunk.old)
        return f"{where}: old snippet must occur exactly once, found {count} times: {first[:100]!r}"
    return None


def apply_hunks(kernels_dir: Path, mutant: Mutant) -> None:
    """Patch the kernels copy in ``kernels_dir`` in place; StalePatch names the first bad hunk."""
    # Check every hunk against the pristine text first, so a stale mutant leaves nothing half-applied.
    texts: Dict[str, str] = {}
    for i, hunk in enumerate(mutant.hunks):
        path = kernels_dir / hunk.file
        text = texts.get(hunk.file)
        if text is None:
            text = path.read_text(encoding="utf-8") if path.exists() else None
        problem = _hunk_problem(mutant.name, i, hunk, text)
        if problem:
            raise StalePatch(problem)
        texts[hunk.file] = text.replace(hunk.old, hunk.new, 1)
    for name, text in texts.items():
        (kernels_dir / name).write_text(text, encoding="utf-8")


def stale_patches(mutants: Iterable[Mutant] = MUTANTS, kernels_dir: Optional[Path] = None) -> Dict[str, str]:
    """{mutant name: problem} for every mutant whose hunks do not apply exactly once (no kernel runs)."""
    kernels_dir = Path(kernels_dir) if kernels_dir is not None else kernels_source_dir()
    cache: Dict[str, Optional[str]] = {}
    problems: Dict[str, str] = {}
    for mutant in mutants:
        texts: Dict[str, Optional[str]] = {}
        for i, hunk in enumerate(mutant.hunks):
            if hunk.file not in texts:
                if hunk.file not in cache:
                    path = kernels_dir / hunk.file
                    cache[hunk.file] = path.read_text(encoding="utf-8") if path.exists() else None
                texts[hunk.file] = cache[hunk.file]
            problem = _hunk_problem(mutant.name, i, hunk, texts[hunk.file])
            if problem:
                problems[mutant.name] = problem
                break
            texts[hunk.file] = texts[hunk.file].replace(hunk.old, hunk.new, 1)
    return problems


def _copy_kernels(dest_root: Path, mutant: Optional[Mutant]) -> Path:
    src = kernels_source_dir()
    dest = dest_root / "kernels"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if mutant is not None:
        apply_hunks(dest, mutant)
    return dest


# ---------------------------------------------------------------------------------------------
# Case selection and expectations
# ---------------------------------------------------------------------------------------------
def _on_gpu() -> bool:
    if interpreting():
        return False
    import torch

    return torch.cuda.is_available()


def select_cases(mutant: Mutant, suite: str, cap: Optional[int] = DEFAULT_CAP,
                 on_gpu: Optional[bool] = None, filter_expr: Optional[str] = None,
                 all_cases: bool = False) -> List:
    """The suite's cases that reach the mutant's code, preferred then cheapest first, at most ``cap``.

    ``filter_expr`` (``matrix.filter_cases`` syntax, e.g. ``dtype=bf16``) narrows the suite first.
    ``all_cases``: every case of the (filtered) suite, cheapest first, neither reach nor cap applied.

    The mutant's ``extra_case_ids`` (cases no suite holds, e.g. > 2^31 elements) are added where
    the mutant is expected to be caught. Cases the interpreter would skip as too slow are left out
    on CPU (they would only be SKIP rows).
    """
    from moe_validate import matrix

    on_gpu = _on_gpu() if on_gpu is None else on_gpu
    cases = matrix.suite_cases(suite)
    if filter_expr:
        cases = matrix.filter_cases(cases, filter_expr)
    if not all_cases:
        cases = [c for c in cases if mutant.reaches(c)]
    if not on_gpu:
        cases = [c for c in cases if matrix.interpreter_cost(c) <= matrix.INTERPRETER_COST_LIMIT]
    prefer = mutant.prefer or (lambda c: False)
    cases.sort(key=lambda c: (not prefer(c), matrix.interpreter_cost(c), c.id))
    if cap is not None and not all_cases:
        cases = cases[:cap]
    if mutant.extra_case_ids and expected_here(mutant, suite, on_gpu)[0]:
        known = {c.id for c in cases}
        cases += [matrix.Case.from_id(cid) for cid in mutant.extra_case_ids if cid not in known]
    return cases


def expected_here(mutant: Mutant, suite: str, on_gpu: bool) -> Tuple[bool, str]:
    """(whether this run must kill the mutant, why not when it need not)."""
    if mutant.catch == "none":
        return False, f"not expected to be caught: {mutant.why}"
    if mutant.gpu_only and not on_gpu:
        return False, f"GPU only: {mutant.why}"
    if mutant.catch == "premerge" and SUITE_ORDER.index(suite) < SUITE_ORDER.index("premerge"):
        return False, f"caught from premerge on: {mutant.why}"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Running one copy (clean or mutant) in a subprocess
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseRun:
    """One case's outcome under one copy of the kernels."""

    case_id: str
    outcome: str  # an Outcome value, or NOT_RUN (the subprocess ended before reaching it)
    reason: Optional[str] = None
    caught_by: Optional[str] = None  # for bad outcomes: "mirror:max_normalized", "crash", ...
    margin: Optional[float] = None  # max |diff| / allowed of the gate (mirror), when compared
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "outcome": self.outcome, "reason": self.reason,
                "caught_by": self.caught_by, "margin": self.margin, "duration_s": self.duration_s}


def _caught_by(record: dict) -> Optional[str]:
    """Which metric turned the case bad: ``<oracle>:nan_inf`` / ``<oracle>:max_normalized`` /
    ``<oracle>:differing`` (the count test), a check
    after the comparison (``check:alignment_contract``, ``check:invariance:sub``), or the outcome."""
    outcome = record.get("outcome")
    if outcome not in BAD_OUTCOMES:
        return None
    if outcome != "FAIL":
        return outcome.lower()
    metrics = record.get("metrics") or {}
    for oracle in ("mirror", "exact"):
        panel = metrics.get(oracle)
        if not panel:
            continue
        if panel.get("nan_where_ref_finite"):
            return f"{oracle}:nan_inf"
        if panel.get("max_normalized", {}).get("value", 0.0) > 1.0:
            return f"{oracle}:max_normalized"
        differing = panel.get("differing") or {}
        if differing.get("allowed") is not None and differing["value"] > differing["allowed"]:
            return f"{oracle}:differing"  # the gate's count test
    for check in record.get("checks") or ():  # the comparison passed: a check failed the case
        if check.get("outcome") == "FAIL":
            return f"check:{check['name']}"
    return "fail"


_CASE_MARKER = "=== selftest case "
_CHILD_WRONG_KERNELS = 3
_CHILD_RETIRED = 4


def _child_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point inside the subprocess: run the listed cases against ``import kernels``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    import kernels

    loaded = Path(kernels.__file__).resolve().parent
    if loaded != Path(spec["kernels_dir"]).resolve():
        print(f"selftest child: imported kernels from {loaded}, expected the copy at {spec['kernels_dir']}",
              file=sys.stderr)
        return _CHILD_WRONG_KERNELS
    from moe_validate.backends import TritonBackend
    from moe_validate.cpus import limit_torch_threads, single_threaded
    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    if single_threaded():  # one child per usable CPU runs at once under the interpreter
        limit_torch_threads(1)

    backend = TritonBackend()
    with open(spec["results"], "a", encoding="utf-8") as out:
        for case_id in spec["case_ids"]:
            print(f"{_CASE_MARKER}{case_id}", file=sys.stderr, flush=True)
            result = run_case_inprocess(Case.from_id(case_id), backend, device=spec["device"],
                                        backend_name="triton")
            rec = result.record
            gate = ((rec.get("metrics") or {}).get("mirror") or {}).get("max_normalized") or {}
            line = CaseRun(case_id, rec["outcome"], rec.get("reason"), _caught_by(rec), gate.get("value"),
                           rec.get("duration_s", 0.0))
            out.write(json.dumps(line.to_dict()) + "\n")
            out.flush()
            if rec.get("error") and rec["outcome"] in BAD_OUTCOMES:
                print(rec["error"], file=sys.stderr, flush=True)
            if spec.get("stop_on_kill") and rec["outcome"] in BAD_OUTCOMES:
                break
            if result.retire_worker:
                # The CUDA context is poisoned (illegal address, device assert): every later case
                # here would crash for this case's reason. The parent starts a fresh process.
                return _CHILD_RETIRED
    return 0


def _child_env(root: Path) -> Dict[str, str]:
    env = dict(os.environ)  # TRITON_INTERPRET (and CUDA_VISIBLE_DEVICES) as in this process
    repo_root = Path(__file__).resolve().parent.parent
    parts = [str(root), str(repo_root)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# A child forked from one server that has imported torch, triton and numpy skips the ~2.3 s a
# fresh interpreter spends importing them (issue 22, on the 2-core CI host: a smoke selftest starts
# ~55 children; tests/moe_validate/test_selftest.py on 2 xdist workers went from 207 s to 49 s).
# The server imports neither ``kernels`` nor anything that initialises CUDA, so a fork starts as
# clean as a fresh interpreter. Its imports read the environment once (thread counts: OpenBLAS,
# OpenMP), so the server serves only while this process's environment is the one it started with.
_SERVER_PRELOAD = ["torch", "triton", "triton.language", "triton.experimental.gluon", "numpy"]
_SERVER_ENV_IGNORED = ("PYTEST_CURRENT_TEST",)  # pytest rewrites it per test; no import reads it
_server_lock = threading.Lock()
_server_env: Optional[Dict[str, str]] = None


def _server_context():
    """The ``forkserver`` context for the children, or None: a fresh interpreter then (no
    forkserver on this platform, or the environment changed since the server started)."""
    global _server_env
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return None  # '<stdin>': a forked child re-imports __main__ (multiprocessing), there is none
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_IGNORED}
    with _server_lock:
        if _server_env is None:
            from multiprocessing import forkserver

            forkserver.set_forkserver_preload(_SERVER_PRELOAD)
            forkserver.ensure_running()  # now, with the environment recorded here
            _server_env = env
    return multiprocessing.get_context("forkserver") if env == _server_env else None


def _forked_child(root: str, spec_path: str, log_path: str, env: Dict[str, str]) -> None:
    """A forked child takes what ``python -c`` started in ``root`` with ``env`` would have (its
    output in the log, that environment, that working directory first on ``sys.path``, then
    ``PYTHONPATH``, no bytecode written), then runs ``_child_main``."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(root)
    sys.path[:0] = [""] + env["PYTHONPATH"].split(os.pathsep)
    sys.dont_write_bytecode = True
    sys.exit(_child_main([spec_path]))


def run_copy(mutant: Optional[Mutant], case_ids: Sequence[str], *, device: Optional[str] = None,
             stop_on_kill: bool = False, timeout_s: Optional[float] = None) -> Tuple[List[CaseRun], str]:
    """Run ``case_ids`` against a copy of the kernels (patched with ``mutant``, or clean for None).

    Returns the per-case runs in order (cases the subprocess never reached are NOT_RUN, the one it
    died or hung in CRASH/TIMEOUT) and the tail of its log. Raises StalePatch for a stale mutant.
    """
    if device is None:
        device = "cuda" if _on_gpu() else "cpu"
    if timeout_s is None:
        timeout_s = STARTUP_ALLOWANCE_S + PER_CASE_TIMEOUT_S * max(1, len(case_ids))
    done: Dict[str, CaseRun] = {}
    log_text = ""
    with tempfile.TemporaryDirectory(prefix=f"moe-selftest-{mutant.name if mutant else 'clean'}-") as tmp:
        root = Path(tmp)
        kernels_dir = _copy_kernels(root, mutant)
        results = root / "results.jsonl"
        # A subprocess that dies (abort, segfault) or hangs is charged to the case in flight, as
        # the runner does for its workers, and a fresh one continues with the remaining cases.
        for attempt in range(len(case_ids)):
            todo = [cid for cid in case_ids if cid not in done]
            if not todo or (stop_on_kill and any(r.outcome in BAD_OUTCOMES for r in done.values())):
                break
            rc, ended, text = _run_child(root, kernels_dir, results, todo, device, stop_on_kill, attempt,
                                         timeout_s)
            log_text += text
            if rc == _CHILD_WRONG_KERNELS:
                raise RuntimeError(f"selftest child did not load the kernels copy: {text.strip()[-500:]}")
            if rc != 0 and _CASE_MARKER not in text:
                # It died before its first case: the copy does not even import (a broken patch),
                # which says nothing about the harness. Reported as an error, never as a kill.
                raise RuntimeError(f"the kernels copy failed before its first case (exit status {rc}): "
                                   f"{text.strip()[-800:]}")
            done.update(_read_results(results))
            if rc == 0 and ended == "exit":
                break
            if rc == _CHILD_RETIRED:  # its last case is recorded; go on in a fresh process
                continue
            in_flight = next((cid for cid in todo if cid not in done), None)
            if in_flight is None:
                break
            if ended == "timeout":
                done[in_flight] = CaseRun(in_flight, "TIMEOUT", f"selftest subprocess exceeded {timeout_s:.0f}s",
                                          "timeout")
            else:
                done[in_flight] = CaseRun(in_flight, "CRASH", f"selftest subprocess died (exit status {rc})",
                                          "crash")
    stopped_early = stop_on_kill and any(r.outcome in BAD_OUTCOMES for r in done.values())
    runs = [done.get(cid) or CaseRun(cid, "NOT_RUN", "not reached: an earlier case killed the mutant"
                                     if stopped_early else "not reached") for cid in case_ids]
    return runs, log_text[-_LOG_TAIL:]


def _read_results(path: Path) -> Dict[str, CaseRun]:
    out: Dict[str, CaseRun] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the child's death
                    continue
                out[d["case_id"]] = CaseRun(**d)
    return out


def _run_child(root: Path, kernels_dir: Path, results: Path, case_ids: Sequence[str], device: str,
               stop_on_kill: bool, attempt: int, timeout_s: float) -> Tuple[Optional[int], str, str]:
    """One subprocess over ``case_ids``: (exit status or None, "exit" | "timeout", its log)."""
    spec_path = root / f"spec{attempt}.json"
    spec_path.write_text(json.dumps({"case_ids": list(case_ids), "results": str(results), "device": device,
                                     "kernels_dir": str(kernels_dir), "stop_on_kill": stop_on_kill}),
                         encoding="utf-8")
    log_path = root / f"child{attempt}.log"
    env = _child_env(root)
    ended = "exit"
    context = _server_context()
    with open(log_path, "w", encoding="utf-8") as log:
        if context is not None:
            proc = context.Process(target=_forked_child, args=(str(root), str(spec_path), str(log_path), env))
            proc.start()
            try:
                proc.join(timeout_s)
            finally:
                if proc.exitcode is None:  # over the limit (or this process interrupted)
                    proc.kill()
                    proc.join()
                    ended = "timeout"
            rc = None if ended == "timeout" else proc.exitcode
            proc.close()
        else:
            # cwd = the copy's root: `python -c` puts the cwd first on sys.path, so it must hold the
            # (mutated) kernels copy and nothing else.
            cmd = [sys.executable, "-c", "import sys; from moe_validate.selftest import _child_main; "
                                         "sys.exit(_child_main())", str(spec_path)]
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, ended = None, "timeout"
    return rc, ended, log_path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# The whole selftest
# ---------------------------------------------------------------------------------------------
@dataclass
class MutantReport:
    mutant: Mutant
    expected: bool
    not_expected_reason: str
    case_ids: List[str]
    runs: List[CaseRun] = field(default_factory=list)
    stale: Optional[str] = None
    error: Optional[str] = None  # the selftest itself could not run this mutant
    log_tail: str = ""
    not_run_reason: Optional[str] = None  # not run on this machine at all (GPU-only on CPU)

    def cell(self, run: CaseRun, clean: Dict[str, CaseRun]) -> str:
        """killed | survived | skipped | not_run | clean_failed for one (mutant, case)."""
        c = clean.get(run.case_id)
        if c is None or c.outcome != "PASS":
            return "clean_failed"
        if run.outcome in BAD_OUTCOMES:
            return "killed"
        if run.outcome == "PASS":
            return "survived"
        if run.outcome == "SKIP":
            return "skipped"
        return "not_run"

    def verdict(self, clean: Dict[str, CaseRun]) -> str:
        if self.stale:
            return "stale"
        if self.error:
            return "error"
        if self.not_run_reason:
            return "not_here"
        if not self.case_ids:
            return "no_case"
        if not self.runs:
            return "not_run"
        cells = [self.cell(r, clean) for r in self.runs]
        if "killed" in cells:
            return "killed"
        return "survived"

    def problem(self, clean: Dict[str, CaseRun]) -> Optional[str]:
        """Why this mutant makes the selftest fail, or None."""
        v = self.verdict(clean)
        if v == "stale":
            return f"{self.mutant.name}: STALE PATCH: {self.stale}"
        if v == "error":
            return f"{self.mutant.name}: selftest error: {self.error}"
        if not self.expected or v == "killed":
            return None
        if v == "no_case":
            return f"{self.mutant.name}: no case of the suite reaches it ({self.mutant.reach_doc})"
        cells = [self.cell(r, clean) for r in self.runs]
        if "survived" not in cells:
            return f"{self.mutant.name}: no usable case (cells: {', '.join(sorted(set(cells)))})"
        return f"{self.mutant.name}: SURVIVED {cells.count('survived')} case(s): {self.mutant.bug}"

    def to_dict(self, clean: Dict[str, CaseRun]) -> dict:
        m = self.mutant
        return {
            "name": m.name, "bug": m.bug, "catch": m.catch, "why": m.why, "gpu_only": m.gpu_only,
            "reach": m.reach_doc, "required": m.name in REQUIRED_MUTANTS,
            "area": m.area if isinstance(m, IndependentMutant) else None,
            "equivalent_reason": (m.equivalent_reason or None) if isinstance(m, IndependentMutant) else None,
            "hunks": [{"file": f"kernels/{h.file}", "old": h.old, "new": h.new} for h in m.hunks],
            "expected_here": self.expected, "not_expected_reason": self.not_expected_reason or None,
            "verdict": self.verdict(clean), "problem": self.problem(clean), "stale": self.stale,
            "error": self.error, "not_run_reason": self.not_run_reason,
            "cases": {r.case_id: {**r.to_dict(), "cell": self.cell(r, clean)} for r in self.runs},
        }


@dataclass
class SelftestReport:
    suite: str
    device: str
    interpreting: bool
    cap: Optional[int]
    clean: Dict[str, CaseRun]
    mutants: List[MutantReport]
    started: str
    duration_s: float = 0.0
    clean_log_tail: str = ""
    catalogue: str = "planted"
    all_cases: bool = False

    def clean_problems(self) -> List[str]:
        """Selected cases the clean copy does not pass (a SKIP is this device's limit, not a failure)."""
        return [f"clean copy: {r.case_id}: {r.outcome}" + (f" ({r.reason})" if r.reason else "")
                for r in self.clean.values() if r.outcome not in ("PASS", "SKIP")]

    def problems(self) -> List[str]:
        out = self.clean_problems()
        out += [p for p in (m.problem(self.clean) for m in self.mutants) if p]
        return out

    @property
    def exit_code(self) -> int:
        return 1 if self.problems() else 0

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for m in self.mutants:
            v = m.verdict(self.clean)
            out[v] = out.get(v, 0) + 1
        return out

    def kill_rate(self) -> Tuple[int, int]:
        """(killed, mutants that can be killed): the argued equivalents (catch "none") and the
        mutants not run here leave the denominator."""
        live = [m for m in self.mutants if m.mutant.catch != "none" and not m.not_run_reason and not m.stale]
        return sum(m.verdict(self.clean) == "killed" for m in live), len(live)

    def to_dict(self) -> dict:
        killed, live = self.kill_rate()
        return {
            "kind": "selftest", "suite": self.suite, "device": self.device, "interpreting": self.interpreting,
            "catalogue": self.catalogue, "all_cases": self.all_cases, "kill_rate": {"killed": killed, "of": live},
            "cap": self.cap, "started": self.started, "duration_s": round(self.duration_s, 3),
            "clean": {cid: r.to_dict() for cid, r in self.clean.items()},
            "clean_passes_all": not self.clean_problems(),
            "mutants": [m.to_dict(self.clean) for m in self.mutants],
            "counts": self.counts(), "problems": self.problems(), "exit_code": self.exit_code,
        }

    def format_table(self) -> str:
        """A short text table: one row per mutant, then the problems."""
        scope = "every case of the suite" if self.all_cases else f"reaching cases, cap {self.cap}"
        lines = [f"selftest: suite {self.suite} on {self.device}"
                 f"{' (Triton interpreter)' if self.interpreting else ''}, {self.catalogue} catalogue, "
                 f"{len(self.mutants)} mutants ({scope}), {self.duration_s:.0f}s",
                 f"clean copy: {sum(r.outcome == 'PASS' for r in self.clean.values())}/{len(self.clean)} "
                 f"selected cases pass"]
        width = max([len(m.mutant.name) for m in self.mutants] + [6])
        lines.append(f"{'mutant':<{width}}  {'expect':<8}  {'verdict':<9}  kills  caught by")
        for m in self.mutants:
            cells = [m.cell(r, self.clean) for r in m.runs]
            kills = cells.count("killed")
            used = sum(c in ("killed", "survived") for c in cells)
            by = sorted({r.caught_by for r, c in zip(m.runs, cells) if c == "killed" and r.caught_by})
            expect = m.mutant.catch + ("*" if m.mutant.gpu_only else "") if m.expected else "-"
            lines.append(f"{m.mutant.name:<{width}}  {expect:<8}  {m.verdict(self.clean):<9}  "
                         f"{kills}/{used:<3}  {', '.join(by)}")
        lines.append("expect: where the catalogue says it is caught ('-' = not expected on this run; * = GPU only); "
                     "kills: killing cases / cases the clean copy passes")
        counts = self.counts()
        lines.append("mutants: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
        killed, live = self.kill_rate()
        if live:
            lines.append(f"kill rate: {killed}/{live} ({100.0 * killed / live:.0f}%) of the mutants that are neither "
                         f"argued equivalent nor unrunnable here")
        problems = self.problems()
        if problems:
            lines.append(f"PROBLEMS ({len(problems)}):")
            lines += [f"  {p}" for p in problems]
        else:
            lines.append("OK: the clean copy passes and every mutant expected here is killed")
        return "\n".join(lines)

    def write(self, out_dir: Path) -> Tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        js, txt = out_dir / "kill_matrix.json", out_dir / "kill_matrix.txt"
        js.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        txt.write_text(self.format_table() + "\n", encoding="utf-8")
        return js, txt


def _resolve_mutants(names: Optional[Sequence[str]], catalogue: str = "planted") -> List[Mutant]:
    if catalogue not in CATALOGUES:
        raise ValueError(f"catalogue must be one of {', '.join(CATALOGUES)}; got {catalogue!r}")
    if not names:
        return list(CATALOGUES[catalogue])
    return [_BY_NAME[catalogue](n) for n in names]


def _default_workers(on_gpu: bool) -> int:
    # One subprocess per mutant; the interpreter is single-threaded, so one per core on CPU. On a
    # GPU a few processes share the device (each holds its own context and caches).
    from moe_validate.cpus import usable_cpus

    return 2 if on_gpu else min(8, usable_cpus())


def run_selftest(suite: str = "smoke", mutant_names: Optional[Sequence[str]] = None, *,
                 cap: Optional[int] = DEFAULT_CAP, workers: Optional[int] = None,
                 stop_on_kill: bool = False, filter_expr: Optional[str] = None,
                 progress=None, catalogue: str = "planted", all_cases: bool = False) -> SelftestReport:
    """Clean copy first (every selected case), then every chosen mutant; returns the report."""
    from moe_validate import matrix

    if suite not in SUITE_ORDER:
        raise ValueError(f"suite must be one of {', '.join(SUITE_ORDER)}; got {suite!r}")
    mutants = _resolve_mutants(mutant_names, catalogue)
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be >= 1 (cases per mutant); got {cap}")
    on_gpu = _on_gpu()
    workers = workers or _default_workers(on_gpu)
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    device = "cuda" if on_gpu else "cpu"
    start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def say(text: str) -> None:
        if progress is not None:
            print(text, file=progress, flush=True)

    stale = stale_patches(mutants)
    reports: List[MutantReport] = []
    for m in mutants:
        ok, why = expected_here(m, suite, on_gpu)
        runnable = not (m.gpu_only and not on_gpu)
        ids = [c.id for c in select_cases(m, suite, cap, on_gpu, filter_expr, all_cases)] if runnable else []
        reports.append(MutantReport(m, ok, why, ids, stale=stale.get(m.name),
                                    not_run_reason=None if runnable else f"GPU only: {m.why}"))
        if m.name in stale:
            say(f"STALE PATCH: {stale[m.name]}")

    union: List[str] = []
    for r in reports:
        union += [cid for cid in r.case_ids if cid not in union and not r.stale]

    # Clean copy: the union of all selected cases, split over the workers.
    chunks = [union[i::workers] for i in range(min(workers, len(union)))]
    clean: Dict[str, CaseRun] = {}
    clean_tail = ""
    say(f"clean copy: {len(union)} cases on {device} with {len(chunks)} worker(s)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(chunks))) as pool:
        for runs, tail in pool.map(lambda ids: run_copy(None, ids, device=device), chunks):
            clean.update({r.case_id: r for r in runs})
            clean_tail = clean_tail or (tail if any(r.outcome != "PASS" for r in runs) else "")
    clean = {cid: clean[cid] for cid in union}
    for r in clean.values():
        if r.outcome != "PASS":
            say(f"clean copy does not pass {r.case_id}: {r.outcome} {r.reason or ''}")

    def one(report: MutantReport) -> MutantReport:
        if report.stale or report.not_run_reason or not report.case_ids:
            return report
        usable = [cid for cid in report.case_ids if clean.get(cid) and clean[cid].outcome == "PASS"]
        order = usable + [cid for cid in report.case_ids if cid not in usable]
        try:
            report.runs, report.log_tail = run_copy(report.mutant, order, device=device, stop_on_kill=stop_on_kill)
        except StalePatch as exc:
            report.stale = str(exc)
        except Exception as exc:  # the selftest's own failure, recorded per mutant
            report.error = f"{type(exc).__name__}: {exc}"
        say(f"{report.mutant.name}: {report.verdict(clean)}")
        return report

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, reports))
    return SelftestReport(suite=suite, device=device, interpreting=interpreting(), cap=cap, clean=clean,
                          mutants=reports, started=started, duration_s=time.perf_counter() - start,
                          clean_log_tail=clean_tail, catalogue=catalogue, all_cases=all_cases)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_selftest_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``selftest`` to ``moe-validate``'s sub-parsers (cli.build_parser's ``sub``)."""
    p = subparsers.add_parser(
        "selftest", help="plant known bugs in a copy of the kernels and check that the suite catches each",
        description="Runs the clean kernels and every mutant (a planted bug) on the cases of the suite "
                    "that reach the mutated code; exit 1 if the clean copy fails, a patch is stale, or "
                    "a mutant expected to be caught here survives.")
    p.add_argument("--suite", default=None, help="smoke | premerge | nightly | bringup "
                                                 "(default: smoke on CPU, premerge on a GPU)")
    p.add_argument("--mutant", nargs="+", metavar="NAME", help="only these mutants (default: all); "
                                                              "--list-mutants prints the names")
    p.add_argument("--out", help="directory for kill_matrix.json and kill_matrix.txt "
                                 "(default: reports/selftest-<suite>-<UTC timestamp>/)")
    p.add_argument("--workers", type=int, help="mutant subprocesses at a time (default: usable CPUs, max 8; 2 on a GPU)")
    p.add_argument("--filter", help="narrow the suite first: the filter syntax of moe-validate run --filter "
                                    "(axis=value terms or id globs joined by and/or/not)")
    p.add_argument("--cap", type=int, default=DEFAULT_CAP, help=f"cases per mutant, cheapest first (default {DEFAULT_CAP})")
    p.add_argument("--first-kill", action="store_true", help="stop each mutant at its first killing case (faster; "
                                                             "the matrix then shows fewer cells)")
    p.add_argument("--catalogue", choices=tuple(CATALOGUES), default="planted",
                   help="planted: the selftest's mutants, written beside the suites (default); independent: "
                        "realistic bugs written without seeing the suites (issue 26, docs/MUTANTS_INDEPENDENT.md)")
    p.add_argument("--all-cases", action="store_true",
                   help="run every case of the suite on each mutant, whatever its reach, and no --cap "
                        "(the coverage a team with only the suite gets; use --first-kill to keep it short)")
    p.add_argument("--list-mutants", action="store_true", help="print the catalogue and exit")
    p.set_defaults(func=run_selftest_command)
    return p


def _usage(message: str) -> int:
    print(f"moe-validate: error: {message}", file=sys.stderr)
    return 2


def run_selftest_command(args) -> int:
    """The ``selftest`` subcommand: 0 all good, 1 a problem (listed), 2 bad input (one stderr line)."""
    catalogue = getattr(args, "catalogue", "planted")
    if getattr(args, "list_mutants", False):
        for m in CATALOGUES[catalogue]:
            where = m.catch + (" (GPU only)" if m.gpu_only else "")
            print(f"{m.name:<34} {where:<20} {m.bug}")
        return 0
    from moe_validate import matrix

    suite = args.suite or ("premerge" if _on_gpu() else "smoke")
    if suite not in matrix.SUITES:
        return _usage(f"--suite must be one of {', '.join(matrix.SUITES)}; got {suite!r}")
    names = args.mutant or None
    if names:
        unknown = [n for n in names if n not in {m.name for m in CATALOGUES[catalogue]}]
        if unknown:
            return _usage(f"unknown mutant {', '.join(map(repr, unknown))}; see --list-mutants")
    if args.workers is not None and args.workers < 1:
        return _usage(f"--workers must be >= 1; got {args.workers}")
    if args.cap is not None and args.cap < 1:
        return _usage(f"--cap must be >= 1; got {args.cap}")
    if not interpreting():
        import torch

        if not torch.cuda.is_available():
            return _usage("no CUDA device: set TRITON_INTERPRET=1 to run the kernels through the Triton interpreter")
    if args.filter:
        try:
            if not matrix.filter_cases(matrix.suite_cases(suite), args.filter):
                return _usage(f"--filter {args.filter!r} matches no case of suite {suite!r}")
        except (ValueError, TypeError) as exc:
            return _usage(str(exc))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out) if args.out else Path("reports") / f"selftest-{suite}-{stamp}"
    report = run_selftest(suite, names, cap=args.cap, workers=args.workers, stop_on_kill=args.first_kill,
                          filter_expr=args.filter, progress=sys.stderr, catalogue=catalogue,
                          all_cases=getattr(args, "all_cases", False))
    js, txt = report.write(out_dir)
    print(report.format_table())
    print(f"kill matrix: {js}\n             {txt}")
    return report.exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m moe_validate.selftest ...`` (the same options as ``moe-validate selftest``)."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # one line on stderr, exit 2 (as cli.py)
            raise SystemExit(_usage(f"{message} (see moe-validate selftest --help)"))

    parser = _Parser(prog="moe-validate")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_selftest_parser(sub)
    args = parser.parse_args(["selftest"] + list(sys.argv[1:] if argv is None else argv))
    return run_selftest_command(args)


if __name__ == "__main__":
    sys.exit(main())
