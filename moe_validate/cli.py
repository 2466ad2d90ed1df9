"""``moe-validate``: run, list, repro, report, compare, env, bench, tune, calibrate.

A thin shell over ``moe_validate.runner``. Exit statuses, the same for every command
(``EXIT_CODES``, printed by ``--help`` and tabled in the README):

    0    pass: every expected case ran and passed or was skipped (compare: no regressions)
    1    case failures: a case failed, crashed, timed out, ... (compare: new failures or drift;
         calibrate --strict: a row flagged or a z that is NaN; bench: nothing could be timed)
    2    usage error: bad argument or input file (unknown suite, malformed case id or filter,
         unreadable or mixed results, an --out that holds another run or cannot be written)
    3    incomplete: expected cases missing or not run, a run without its footer (killed), or
         (run --max-skip FRACTION) more of the cases skipped than FRACTION
    4    harness error: the harness could not record (disk full, output gone mid-run)
    130  interrupted (Ctrl-C): the results and the report of what finished are written

Where several apply, the higher row of 130, 4, 3, 1 wins: an incomplete run's passes vouch for
nothing, so "incomplete" outranks "failed". Errors are one line on stderr, never a traceback.

Heavy modules (torch, triton, the report renderer) are imported by the subcommands that need
them, so ``moe-validate --help`` and ``list`` start quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from moe_validate.verdicts import GATE_CHOICES
from moe_validate.exit_codes import (EXIT_CODES, EXIT_FAILURES, EXIT_HARNESS, EXIT_INCOMPLETE, EXIT_INTERRUPTED,
                                     EXIT_PASS, EXIT_USAGE)

__all__ = ["main", "build_parser", "UsageError"]

PROG = "moe-validate"


class HarnessError(Exception):
    """The harness could not do its job (not the user's input): one line, exit status 4."""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints usage and a message on two lines
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_visible_without_torch() -> bool:
    """Whether an NVIDIA GPU is visible here, asked without importing torch (``list`` starts in a
    tenth of a second, not seconds): the driver lists each GPU under /proc/driver/nvidia/gpus, and
    ``CUDA_VISIBLE_DEVICES`` set to nothing (or -1) hides them all, as it does from torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def _select_cases(suite: Optional[str], expr: Optional[str], has_cuda=_has_cuda):
    """(suite name, valid cases of the suite matching ``expr``); bad names -> UsageError.
    ``has_cuda`` is asked only when no suite is named (the default depends on the machine)."""
    from moe_validate import matrix

    name = suite or matrix.default_suite(has_cuda())
    try:
        cases = matrix.suite_cases(name)
        if expr:
            cases = matrix.filter_cases(cases, expr)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    # suite_cases never yields invalid cases; the check keeps that promise visible here.
    return name, [c for c in cases if c.is_valid()[0]]


def _backend_or_usage(spec: str):
    from moe_validate.backends import get_backend

    try:
        return get_backend(spec)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _load(paths, run=None, mixed_backends=False):
    from moe_validate.results import ResultsError, load_results

    try:
        results = load_results(paths, run=run, mixed_backends=mixed_backends)
    except ResultsError as exc:
        raise UsageError(str(exc)) from None
    for problem in results.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    return results


def _render(results, out_path: Path, *, baseline=None, title: Optional[str] = None, history=None) -> Optional[Path]:
    """The HTML report, or None (with a note on stderr) where the renderer is unavailable."""
    try:
        from moe_validate.report import render_report
    except ImportError as exc:
        print(f"{PROG}: report.html not written: moe_validate.report is unavailable ({exc})", file=sys.stderr)
        return None
    return render_report(results, out_path, baseline=baseline, title=title, history=history)


def _summary_line(counts) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    return f"{total} cases: {parts or 'none'}"


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def _repeated(cases, repeat: int, fresh_seeds: bool, first: int = 0):
    """``runner.repeat_cases`` with bad options as UsageError."""
    from moe_validate import runner

    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1; got {repeat}")
    if first < 0:
        raise UsageError(f"--first-repetition must be >= 0; got {first}")
    try:
        return runner.repeat_cases(cases, repeat, fresh_seeds=fresh_seeds, first=first)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc).replace("fresh_seeds (--fresh-seeds)", "--fresh-seeds")) from None


def _repetition_lines(bad_cases, repeat: int, first: int = 0) -> List[str]:
    """One line per repetition with its not-passing cases, then the stability verdict."""
    from moe_validate.runner import failures_per_repetition

    groups = failures_per_repetition(bad_cases, first + repeat)[first:]
    lines = []
    for rep, ids in enumerate(groups, start=first):
        line = f"repetition {rep}: {len(ids)} not passing"
        if ids:
            line += ": " + ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        lines.append(line)
    total = sum(len(g) for g in groups)
    lines.append(f"stability: {total} not passing over {repeat} repetitions"
                 + (" (stable)" if total == 0 else f" in {sum(1 for g in groups if g)} of them"))
    return lines


def _check_worker_options(args) -> None:
    """--workers, --timeout and --max-timeouts, shared by every command that runs cases."""
    import math

    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0; got {args.workers}")
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive finite number of seconds; got {args.timeout}")
    if getattr(args, "max_timeouts", 1) < 0:
        raise UsageError(f"--max-timeouts must be >= 0 (0 = no limit); got {args.max_timeouts}")


def _run_cases(cases, args, out_dir, **kwargs):
    """``runner.run_cases`` with the out-dir refusals as usage errors and write failures as harness errors."""
    from moe_validate import runner
    from moe_validate.results import ResultsWriteError
    from moe_validate.run.outdir import OutDirError

    max_timeouts = getattr(args, "max_timeouts", None)
    # --gate (run, calibrate) travels with every case's options
    kwargs["case_options"] = dataclasses.replace(kwargs.get("case_options", runner.CaseOptions()),
                                                 gate=getattr(args, "gate", None))
    try:
        return runner.run_cases(
            cases, args.backend, out_dir, workers=args.workers, timeout_s=args.timeout,
            argv=[PROG] + list(args.argv), progress=sys.stderr, resume=getattr(args, "resume", False),
            overwrite=getattr(args, "overwrite", False),
            max_consecutive_timeouts=(max_timeouts or None) if max_timeouts is not None
            else runner.DEFAULT_MAX_CONSECUTIVE_TIMEOUTS, **kwargs)
    except OutDirError as exc:
        raise UsageError(str(exc)) from None
    except ResultsWriteError as exc:
        raise HarnessError(f"{exc.strerror}; the file keeps every whole record written before it: finish the run "
                           "with --resume") from None
    except OSError as exc:
        raise HarnessError(f"cannot write under {out_dir}: {exc.strerror or exc}") from None


def _out_dir(args, name: str) -> Path:
    """--out, or reports/<name>-<UTC timestamp>/."""
    if args.out:
        return Path(args.out)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("reports") / f"{name}-{stamp}"


def _coverage_lines(results_path: Path, expected: int, max_skip: Optional[float]) -> Tuple[List[str], bool]:
    """(the end-of-run coverage line and the diagnosis of each not-passing case, whether the skip
    fraction exceeds ``max_skip``)."""
    from moe_validate.coverage import ran_line, skip_fraction
    from moe_validate.diagnosis import summary_of
    from moe_validate.results import ResultsError, load_results

    try:
        cases = load_results([results_path]).cases
    except ResultsError as exc:
        return [f"coverage unknown: {exc}"], False
    lines = []
    bad = [c for c in cases if c.is_bad]
    for rec in bad[:_DIAGNOSED_AT_END]:  # a FAIL's diagnosis says where; the others' name their outcome
        lines.append(f"  {rec.case_id}: " + ("FAIL: " if rec.outcome == "FAIL" else "") + str(summary_of(rec)))
    if len(bad) > _DIAGNOSED_AT_END:
        lines.append(f"  ... {len(bad) - _DIAGNOSED_AT_END} more not passing: the report and results.jsonl hold them all")
    lines.append(ran_line(cases, expected))
    fraction = skip_fraction(cases, expected)
    over = max_skip is not None and fraction > max_skip
    if over:
        lines.append(f"{PROG}: {100 * fraction:.0f}% of the cases skipped, more than --max-skip {max_skip:g} allows: "
                     f"exit {EXIT_INCOMPLETE} (the run checked too little of its suite to pass)")
    return lines, over


_DIAGNOSED_AT_END = 10  # not-passing cases whose diagnosis the end of a run prints


def _max_skip(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--max-skip must be a fraction between 0 and 1; got {text!r}")
    return value


def cmd_run(args) -> int:
    from moe_validate import runner
    from moe_validate.contract.rules import interpreting
    from moe_validate.coverage import plan_line

    max_skip = _max_skip(args.max_skip)
    suite, cases = _select_cases(args.suite, args.filter)
    if args.rerun_failed:  # issue 22: only the cases whose last outcome there was not PASS/SKIP
        suite, cases = _rerun_failed_or_usage(args.rerun_failed, args.filter)
    if args.filter and not cases:
        raise UsageError(f"--filter {args.filter!r} matches no case of suite {suite!r}")
    try:
        shard = runner.parse_shard(args.shard)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # The shard is taken before repeating, so each CI job repeats its own share.
    cases = _repeated(runner.select_shard(cases, shard), args.repeat, args.fresh_seeds, args.first_repetition)
    _backend_or_usage(args.backend)
    _check_worker_options(args)
    out_dir = _out_dir(args, suite)
    repeat_fields = ({"repeat": args.repeat, "fresh_seeds": args.fresh_seeds, "first_repetition": args.first_repetition}
                     if (args.repeat > 1 or args.fresh_seeds) else {})
    options, option_fields = _case_options(args)
    # Coverage up front: what this run will and will not check, and about how long it takes.
    summary = _run_cases(cases, args, out_dir, suite=suite, shard=args.shard, header_extra={**repeat_fields,
                         **option_fields}, case_options=options,
                         announce=plan_line(suite, args.backend, cases, interpreting=interpreting(), workers=args.workers))
    if summary.interrupted:
        print(f"{PROG}: interrupted: writing the report of the {summary.present} cases that finished", file=sys.stderr)
    print(f"results: {summary.results_path}")
    if options.save_outputs:
        print(f"outputs: {options.save_outputs}")
    if args.junitxml:  # issue 22: JUnit XML for CI dashboards
        from moe_validate.junit import write_junit

        print(f"junit:   {write_junit(summary.results_path, args.junitxml, suite=suite)}")
    if not args.no_report:
        report = _render_or_note(summary.results_path, out_dir / "report.html",
                                 title=f"{suite} / {args.backend}" + (f" / shard {args.shard}" if args.shard else "")
                                 + (f" / {args.repeat} repetitions" if args.repeat > 1 else ""))
        if report is not None:
            print(f"report:  {report}")
    print(summary.format())
    if summary.bad_cases:
        shown = summary.bad_cases[:10]
        print("not passing: " + ", ".join(shown) + (" ..." if len(summary.bad_cases) > 10 else ""))
    coverage, too_many_skipped = _coverage_lines(summary.results_path, summary.expected, max_skip)
    print("\n".join(coverage))
    if args.repeat > 1 or args.fresh_seeds:
        print("\n".join(_repetition_lines(summary.bad_cases, args.repeat, args.first_repetition)))
    code = summary.exit_code
    # A run that skipped more than --max-skip allows is incomplete (3), unless worse was said.
    return EXIT_INCOMPLETE if too_many_skipped and code in (EXIT_PASS, EXIT_FAILURES) else code


def _case_options(args):
    """(runner.CaseOptions, header fields) of --save-outputs and --against; bad values -> UsageError."""
    from moe_validate.runner import CaseOptions

    fields = {}
    save = None
    if args.save_outputs:
        from moe_validate.golden import GoldenError, prepare_outputs_dir

        try:
            save = str(prepare_outputs_dir(args.save_outputs, resume=args.resume, overwrite=args.overwrite).resolve())
        except GoldenError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"--save-outputs {args.save_outputs} cannot be created: {exc.strerror or exc}") from None
        fields["save_outputs"] = save
    if args.against:
        _backend_or_usage(args.against)
        from moe_validate.against import AGAINST_BOUND

        fields["against"] = {"backend": args.against, "bound": AGAINST_BOUND}
    return CaseOptions(save_outputs=save, against=args.against), fields


def _rerun_failed_or_usage(path: str, expr: Optional[str]):
    from moe_validate.rerun import failed_cases

    try:
        return failed_cases(path, expr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _render_or_note(results_path: Path, out_path: Path, *, title: str) -> Optional[Path]:
    """The report after a run; a report that fails to render is a note, never a lost run."""
    try:
        return _render(_load([results_path]), out_path, title=title)
    except UsageError as exc:
        print(f"{PROG}: report.html not written: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{PROG}: report.html not written: {exc.strerror or exc}", file=sys.stderr)
    return None


def cmd_calibrate(args) -> int:
    from moe_validate.calibration import calibrate

    if args.from_results:
        return _calibrate_recorded(args)
    args.seeds = 5 if args.seeds is None else args.seeds
    args.backend = args.backend or "triton"
    suite, cases = _select_cases(args.suite, args.filter)
    if args.filter and not cases:
        raise UsageError(f"--filter {args.filter!r} matches no case of suite {suite!r}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1; got {args.seeds}")
    cases = _repeated(cases, args.seeds, True)
    _backend_or_usage(args.backend)
    _check_worker_options(args)
    out_dir = _out_dir(args, f"calibrate-{suite}")
    summary = _run_cases(cases, args, out_dir, suite=suite,
                         header_extra={"repeat": args.seeds, "fresh_seeds": True, "calibration": True})
    results = _load([summary.results_path])
    table = calibrate(results)
    print(f"results: {summary.results_path}")
    if not args.no_report:
        report = _render(results, out_dir / "report.html", title=f"calibration: {suite} x {args.seeds} seeds / {args.backend}")
        if report is not None:
            print(f"report:  {report}")
    print(summary.format())
    print("\n".join(_repetition_lines(summary.bad_cases, args.seeds)))
    print(table.format())
    if summary.bad_cases:
        return 1
    return 1 if (args.strict and table.flagged) else 0


def _calibrate_recorded(args) -> int:
    """``calibrate --from``: the table of recorded results (a nightly's, several runs' shards or
    fresh-seed repetitions pooled), without running anything."""
    from moe_validate.calibration import calibrate

    run_only = [name for name, given in (("--suite", args.suite), ("--filter", args.filter),
                                         ("--seeds", args.seeds is not None), ("--backend", args.backend is not None),
                                         ("--out", args.out), ("--workers", args.workers is not None),
                                         ("--resume", args.resume), ("--overwrite", args.overwrite),
                                         ("--gate", args.gate is not None)) if given]
    if run_only:
        raise UsageError(f"--from pools recorded results; {', '.join(run_only)} only apply to a calibration run")
    table = calibrate(_load(args.from_results))
    print(table.format())
    if not table.rows:
        print(f"{PROG}: no evaluated case in {', '.join(map(str, args.from_results))}: nothing calibrated",
              file=sys.stderr)
        return 1 if args.strict else 0
    return 1 if (args.strict and table.flagged) else 0


def cmd_list(args) -> int:
    suite, cases = _select_cases(args.suite, args.filter, has_cuda=_gpu_visible_without_torch)
    for case in cases:
        print(case.id)
    # The count goes to stderr so that stdout stays a clean list of ids for scripts.
    print(f"{len(cases)} cases in suite {suite}" + (f" matching {args.filter!r}" if args.filter else ""),
          file=sys.stderr)
    return 0


def cmd_repro(args) -> int:
    from moe_validate.matrix import Case
    from moe_validate.runner import CaseOptions, run_case_inprocess

    try:
        case = Case.from_id(args.case_id)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    valid, why = case.is_valid()
    if not valid:
        raise UsageError(f"case {args.case_id!r} is not a valid case: {why}")
    backend = _backend_or_usage(args.backend)
    result = run_case_inprocess(case, backend, backend_name=args.backend, options=CaseOptions(gate=args.gate))
    print(result.message())
    rec = result.record
    if rec.get("config"):
        print(f"config: {json.dumps(rec['config'], sort_keys=True)}")
    if rec.get("checks"):
        print("checks: " + ", ".join(f"{c['name']} {c['outcome']}" for c in rec["checks"]))
    print(f"{rec['outcome']} in {rec['duration_s']:.2f}s")
    return 1 if result.outcome.is_bad else 0


def _verdict_code(results, *, failed: bool) -> int:
    if not results.complete:
        return EXIT_INCOMPLETE
    return EXIT_FAILURES if failed else EXIT_PASS


def cmd_report(args) -> int:
    history = None
    if args.history:  # issue 22: the positional RESULTS are the runs; the report is of the newest
        results, history = _history_or_usage(args)
        default_out = Path(history.history.runs[-1].label)
        # history.html: the newest run's own report.html stays as its run wrote it
        default_out = (default_out if default_out.is_dir() else default_out.parent) / "history.html"
    else:
        results = _load(args.results, run=args.run, mixed_backends=args.mixed_backends)
        default_out = Path(args.results[0]).with_name("report.html")
    baseline = _load([args.baseline]) if args.baseline else None
    out = Path(args.out) if args.out else default_out
    try:
        report = _render(results, out, baseline=baseline, history=history)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    if report is not None:
        print(f"report: {report}")
    if history is not None:
        from moe_validate.report.history import format_history

        print(format_history(history.history))
    print(_summary_line(results.counts()))
    print(results.completeness_line())
    failed = any(c.is_bad for c in results.cases)
    code = _verdict_code(results, failed=failed)
    return EXIT_PASS if args.exit_zero else code


def _history_or_usage(args):
    """(the newest run's ResultSet, HistoryView) of report --history RESULTS..."""
    from moe_validate.report.history import HistoryView, build_history, history_runs
    from moe_validate.results import ResultsError

    if args.run or args.mixed_backends:
        raise UsageError("--history reads each run whole: --run and --mixed-backends do not apply")
    try:
        runs = history_runs(args.results)
    except (ValueError, ResultsError) as exc:
        raise UsageError(str(exc)) from None
    for label, results in runs:
        for problem in results.problems:
            print(f"{PROG}: warning: {label}: {problem}", file=sys.stderr)
    return runs[-1][1], HistoryView(build_history(runs))


def cmd_compare(args) -> int:
    if args.outputs:
        return _compare_outputs(args)
    if args.max_ulp is not None:
        raise UsageError("--max-ulp applies to compare --outputs (two --save-outputs directories)")
    old, new = _load([args.old], run=args.old_run), _load([args.new], run=args.new_run)
    try:
        from moe_validate.report import diff_runs, format_diff
    except ImportError as exc:
        raise UsageError(f"compare needs moe_validate.report, which is unavailable ({exc})") from None
    diff = diff_runs(old, new)
    print(format_diff(diff))
    if diff.incomplete:
        return EXIT_INCOMPLETE
    return EXIT_FAILURES if diff.has_regressions else EXIT_PASS


def _compare_outputs(args) -> int:
    """compare --outputs OLD NEW: two golden-output stores, case by case, bitwise or within --max-ulp."""
    from moe_validate.golden import GoldenError, compare_outputs, format_outputs_diff

    if args.old_run or args.new_run:
        raise UsageError("--old-run/--new-run select runs of results files; compare --outputs reads directories")
    try:
        diff = compare_outputs(args.old, args.new, max_ulp=args.max_ulp or 0)
    except GoldenError as exc:
        raise UsageError(str(exc)) from None
    print(format_outputs_diff(diff))
    return diff.exit_code


def cmd_bench(args) -> int:
    from moe_validate import bench

    try:
        models = bench.parse_models(args.models)
        schemes = bench.parse_schemes(args.schemes)
        m_list = bench.parse_m_list(args.m, quick=args.quick)
        peers = bench.parse_peers(args.peers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget must be positive seconds; got {args.time_budget}")
    if args.reference_max_m < 0:
        raise UsageError(f"--reference-max-m must be >= 0; got {args.reference_max_m}")
    from moe_validate.contract.rules import interpreting

    # At once, before any row: without a GPU every row would be 'unsupported'.
    if interpreting() or not _has_cuda():
        raise UsageError("bench needs a CUDA GPU with native Triton (unset TRITON_INTERPRET): timings under the "
                         "interpreter or on a CPU mean nothing")
    settings = {"reference_max_m": args.reference_max_m, "profile": bool(args.profile)}
    if args.quick:
        settings.update(target_ms=60.0, max_reps=60, routing_sets=4)
    out_dir = _out_dir(args, "bench")
    doc = bench.run_bench(models, schemes, m_list, peers, argv=[PROG] + list(args.argv),
                          time_budget_s=args.time_budget or float("inf"), settings=settings)
    json_path, html_path = bench.write_bench(doc, out_dir)
    print(f"bench:   {json_path}")
    if html_path is not None:
        print(f"html:    {html_path}")
    print(bench.format_table(doc))
    if doc.get("error"):
        print(f"{PROG}: bench did not run: {doc['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_tune(args) -> int:
    from moe_validate import bench

    try:
        # A custom shape is itself comma-separated (E=..,topk=..): then it is the only model.
        models = [bench.parse_model_spec(args.model)] if "=" in args.model else bench.parse_models(args.model)
        schemes = bench.parse_schemes(args.scheme)
        m_list = bench.parse_m_list(args.m) if args.m else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Every (model, scheme) pair the model is benchmarked in (DeepSeek-V3 ships fp8 only).
    pairs = [(m, s) for m in models for s in schemes if s in m.schemes]
    if not pairs:
        raise UsageError(f"--scheme {args.scheme!r} is not a scheme of --model {args.model!r} "
                         f"(schemes per model: {'; '.join(f'{m.name}: {list(m.schemes)}' for m in models)})")
    from moe_validate.contract.rules import interpreting

    if not _has_cuda() or interpreting():
        raise UsageError("tune needs a CUDA GPU with native Triton (unset TRITON_INTERPRET): timings under the "
                         "interpreter mean nothing")
    from moe_validate.tune import DEFAULT_TUNE_M, tune

    failed = 0
    for model, scheme in pairs:
        try:
            result = tune(model, scheme, m_list or list(DEFAULT_TUNE_M), out_dir=args.out,
                          command=" ".join([PROG] + list(args.argv)), check_mode=args.check,
                          table_format=args.format,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
        except RuntimeError as exc:  # no usable config for this pair: say so, tune the others
            print(f"{PROG}: tune {model.name} {scheme}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{model.name} {scheme}: {result['path']}")
        for m, cfg in sorted(result["table"].items()):
            print(f"  M={m}: {json.dumps(cfg, sort_keys=True)}", flush=True)
    return 1 if failed else 0


def cmd_env(args) -> int:
    from moe_validate.env import capture_env, format_env

    env = capture_env()
    print(json.dumps(env, indent=2, sort_keys=True) if args.json else format_env(env))
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    exit_table = "exit status (every command):\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES)
    parser = _Parser(prog=PROG, description="Validate fused-MoE expert kernels against the float64 reference.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=exit_table)
    parser.add_argument("--version", action=_VersionAction, help="print the package version and the commit it runs from")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                                help="what to do (each has its own --help)")
    sub.required = True

    def out_args(p):
        p.add_argument("--max-timeouts", type=int, default=3, metavar="N",
                       help="after N cases time out in a row, record the rest NOT_RUN (the backend looks hung; "
                            "default 3, 0 = no limit)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out: run only its missing (or NOT_RUN) cases, after cutting a "
                            "torn last line; needs the same selection and backend")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the results in --out (by default a non-empty --out is refused)")

    def gate_arg(p):
        p.add_argument("--gate", choices=tuple(GATE_CHOICES), default=None,
                       help="which verdicts decide a case's outcome: accuracy (budget vs exact) or both (also "
                            "conformance, gate vs mirror); default: both for our own backends, accuracy for a "
                            "third-party one (docs/PROFILES.md)")

    def suite_args(p):
        p.add_argument("--suite", help="smoke | premerge | nightly | bringup (default: smoke on CPU, premerge on a GPU)")
        p.add_argument("--filter", help="terms axis=value, axis!=value (scheme=fp8_block128) or a glob on the case "
                                        "id, joined by and/or/not and parentheses; commas join with and, last: "
                                        "'scheme=fp8_* or not dtype=fp32, bias=true'")

    p = sub.add_parser("run", help="run a suite and write results.jsonl and report.html", epilog=exit_table,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_args(p)
    p.add_argument("--backend", default="triton", help="triton | reference | module:attr | entry-point name")
    p.add_argument("--shard", help="i/n: run the i-th of n disjoint shares of the cases (1 <= i <= n)")
    p.add_argument("--out", help="output directory (default: reports/<suite>-<UTC timestamp>/)")
    p.add_argument("--workers", type=int, help="worker processes (default: one per visible GPU, 1 on CPU; "
                                               "0 = in this process, no isolation and no timeout)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-case limit in seconds (default 600)")
    out_args(p)
    gate_arg(p)
    p.add_argument("--no-report", action="store_true", help="write results.jsonl only")
    p.add_argument("--max-skip", metavar="FRACTION",
                   help=f"fail the run (exit {EXIT_INCOMPLETE}, incomplete) when more than FRACTION (0..1) of its cases "
                        "are skipped: a CPU job that skipped most of its suite has not passed it")
    p.add_argument("--junitxml", metavar="FILE", help="also write the run as JUnit XML (one testcase per case) for CI")
    p.add_argument("--save-outputs", metavar="DIR", help="also store each case's output bit for bit in DIR (one "
                   ".npz per case with its seed, input digest and environment), for compare --outputs")
    p.add_argument("--against", metavar="BACKEND", help="also run BACKEND on each case's inputs and compare the two "
                   "outputs directly: allowed per element twice the gate's bound, no count test (docs/BRINGUP.md)")
    p.add_argument("--rerun-failed", metavar="RESULTS", help="run only the cases whose last outcome in this "
                   "results.jsonl was not PASS or SKIP (rebuilt from its records; --filter narrows them)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the selected cases N times into one results.jsonl (N > 1 needs --fresh-seeds)")
    p.add_argument("--fresh-seeds", action="store_true",
                   help="repetition r runs each case with seed + r * 1000000 (repetition 0: the case's own seed); "
                        "ids name the seed used, so repro re-runs one repetition")
    p.add_argument("--first-repetition", type=int, default=0, metavar="R",
                   help="number the repetitions from R (with --fresh-seeds): continues a stability run whose "
                        "repetitions 0..R-1 already ran, with new seeds")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("calibrate", help="run a suite over fresh seeds and print the normalized-error (z) "
                                         "calibration table per scheme and dtype")
    suite_args(p)
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="fresh seeds per case (default 5)")
    p.add_argument("--backend", default=None, help="triton | reference | module:attr | entry-point name "
                                                   "(default triton)")
    p.add_argument("--from", dest="from_results", nargs="+", metavar="RESULTS",
                   help="pool these results.jsonl files (runs, shards, fresh-seed repetitions) instead of "
                        "running: the same table and --strict, nothing run")
    p.add_argument("--out", help="output directory (default: reports/calibrate-<suite>-<UTC timestamp>/)")
    p.add_argument("--workers", type=int, help="worker processes (as for run)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-case limit in seconds (default 600)")
    out_args(p)
    gate_arg(p)
    p.add_argument("--no-report", action="store_true", help="write results.jsonl only")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a row is flagged (its RMS out of the band, its count beyond 4x the model with "
                        "enough independent events) or an evaluated case's z is NaN; with --from, also when no "
                        "case was evaluated (default: the flags are printed only)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("list", help="print the case ids of a suite, one per line")
    suite_args(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("repro", help="run one case in this process and print its evaluation",
                       description="Run one case in this process (no worker, no timeout) and print what broke and "
                                   "where: its diagnosis, the failure anatomy, the launch config and the checks.")
    p.add_argument("case_id", metavar="CASE_ID",
                   help="a case id as run, list and the report print it, e.g. bf16-none-silu-M7N64K64E4k2-s0")
    p.add_argument("--backend", default="triton",
                   help="triton | reference | module:attr | entry-point name (default triton), as for run")
    gate_arg(p)
    p.set_defaults(func=cmd_repro)

    p = sub.add_parser("report", help="merge results files (shards) and render one HTML report", epilog=exit_table,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl",
                   help="results files to merge into one report (the shards of one run, or one file)")
    p.add_argument("--out", help="report file (default: report.html beside the first results file)")
    p.add_argument("--baseline", metavar="OLD.jsonl", help="results to diff against in the report")
    p.add_argument("--run", metavar="RUN_ID", help="report only this run (id or unique prefix) of a file holding several")
    p.add_argument("--mixed-backends", action="store_true",
                   help="merge runs of different backends (their case ids must be disjoint; by default refused)")
    p.add_argument("--history", action="store_true",
                   help="RESULTS are N runs (results files, or directories: each directory of results files under "
                        "them is one run): add per-case outcome and margin trends, new failures, fixes and flaky "
                        "cases; the report (default: history.html beside the newest run) and the exit status "
                        "are the newest run's")
    p.add_argument("--exit-zero", action="store_true",
                   help="exit 0 once the report is written (default: 1 on failures, 3 on an incomplete run)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="text diff of two runs: new failures, fixes, drift, missing cases (exit 1 on "
                                       "regressions, 3 when NEW is incomplete)",
                       epilog=exit_table, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", metavar="OLD", help="results.jsonl (or, with --outputs, a --save-outputs directory)")
    p.add_argument("new", metavar="NEW", help="as OLD")
    p.add_argument("--outputs", action="store_true",
                   help="OLD and NEW are run --save-outputs directories: per case bitwise-equal, max ulp distance, "
                        "differing elements, the first one (exit 1 beyond --max-ulp, 3 when NEW lacks cases)")
    p.add_argument("--max-ulp", type=float, metavar="N", help="with --outputs: the largest ulp distance that "
                   "passes (default 0: bitwise)")
    p.add_argument("--old-run", metavar="RUN_ID", help="the run of OLD to compare (when it holds several)")
    p.add_argument("--new-run", metavar="RUN_ID", help="the run of NEW to compare (when it holds several)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("env", help="print the environment a run would record",
                       description="Print the environment a run records in its results header: GPU, capability, "
                                   "driver, CUDA, torch, triton, interpreter mode, commit, host, python.")
    p.add_argument("--json", action="store_true", help="print it as one JSON object (the header's env field)")
    p.set_defaults(func=cmd_env)
    # selftest owns its options (moe_validate/selftest.py); main() hands it the rest of the
    # command line, so that building this parser never imports it (it pulls in torch).
    sub.add_parser("selftest", add_help=False,
                   help="plant known bugs in a copy of the kernels and check that the suite catches each "
                        "(moe-validate selftest --help)")

    p = sub.add_parser("bench", help="time our experts against peers on model shapes (GPU); bench.json + bench.html")
    p.add_argument("--models", help="comma-separated: mixtral-8x7b, qwen3-30b-a3b, deepseek-v3, deepseek-v3-tp8, "
                                    "gpt-oss-120b (default: all)")
    p.add_argument("--schemes", help="comma-separated: bf16, fp8_tensor (= fp8_tensor_token), fp8_block "
                                     "(= fp8_block128) or scheme values (default: all three)")
    p.add_argument("--m", help="comma-separated token counts (default 1,2,4,...,16384; --quick: 1,16,128,1024,4096,16384)")
    p.add_argument("--peers", help="comma-separated: reference, torch-grouped, or none (default: both)")
    p.add_argument("--out", help="output directory (default: reports/bench-<UTC timestamp>/)")
    p.add_argument("--quick", action="store_true", help="fewer M values, repetitions and routing sets")
    p.add_argument("--time-budget", type=float, help="seconds; rows after it are recorded as skipped")
    p.add_argument("--reference-max-m", type=int, default=16, help="largest M timed for the reference (default 16)")
    p.add_argument("--profile", action="store_true",
                   help="also record our per-kernel device times (torch.profiler) per row: where the time goes")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="search launch configs per M bucket (GPU) and write the kernels' JSON table")
    p.add_argument("--model", required=True,
                   help="comma-separated bench model names or E=..,topk=..,K=..,I=..[,act=..] shapes")
    p.add_argument("--scheme", required=True,
                   help="comma-separated bf16, fp8_tensor, fp8_block or scheme values; each model is tuned in "
                        "the listed schemes it is benchmarked in")
    p.add_argument("--m", help="comma-separated M buckets (default 1,16,64,256,1024,4096,16384)")
    p.add_argument("--out", help="directory for the JSON table (default: kernels/configs/)")
    p.add_argument("--check", choices=["every", "winners"], default="every",
                   help="which configs are checked against the float64 reference: every candidate before it is "
                        "timed (default), or only each bucket's fastest (a quick re-tune of a checked grid)")
    p.add_argument("--format", choices=["moe_validate", "vllm"], default="moe_validate",
                   help="table layout: ours (default), or vLLM's (N = I, its field names; our extras in a sidecar "
                        "file) that vLLM reads from VLLM_TUNED_CONFIG_FOLDER (docs/CONFIGS.md)")
    p.set_defaults(func=cmd_tune)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the package version and the commit, read when asked (git runs only then)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def version_text() -> str:
    """'moe-validate 0.1.0 (commit <sha>[+dirty])'; 'commit unknown' outside a git checkout."""
    from importlib import metadata

    from moe_validate.env import _REPO_ROOT, _git_commit

    try:
        version = metadata.version(PROG)
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    commit = _git_commit(_REPO_ROOT)
    return f"{PROG} {version} (commit {commit or 'unknown'})"


def _interpreter_without_gpu() -> None:
    """README: with no GPU the kernels run through the Triton interpreter, set up here.

    Must happen before the first ``import triton`` (kernels/_interp.py decides at import time);
    spawned workers inherit it. An explicit ``TRITON_INTERPRET`` in the environment is kept.
    """
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["selftest"]:
            _interpreter_without_gpu()
            from moe_validate.selftest import main as selftest_main

            return selftest_main(argv[1:])
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command in ("run", "repro", "env", "calibrate"):  # list runs nothing: no torch
            _interpreter_without_gpu()
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HarnessError as exc:
        print(f"{PROG}: harness error: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except BrokenPipeError:  # `moe-validate list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
