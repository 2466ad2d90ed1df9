"""Runs cases against a backend and records every outcome, one JSONL line per finished case.

The public face of ``moe_validate.run``; the work is split along its seams there:

- ``run.case``: ``run_case_inprocess(case, backend)``, one case in this process (the pytest plugin,
  ``moe-validate repro`` and ``--workers 0`` use it); exceptions become outcomes.
- ``run.workers``: the pool of spawned worker processes that crash, hang or poison their GPU
  without taking the run with them.
- ``run.session``: ``run_cases(cases, backend, out_dir)``, a whole run into ``results.jsonl``.
- ``run.shards``: ``--shard i/n`` and ``--repeat N --fresh-seeds``.
- ``run.progress``: the progress bar or lines.
"""

from moe_validate.run.case import CaseOptions, CaseResult, classify_exception, default_device, repro_command, run_case_inprocess
from moe_validate.run.progress import Progress as _Progress
from moe_validate.run.session import (DEFAULT_TIMEOUT_S, RunSummary, default_workers, footer_record, header_record,
                                      now_iso, run_cases, visible_gpus)
from moe_validate.run.workers import DEFAULT_MAX_CONSECUTIVE_TIMEOUTS
from moe_validate.run.shards import (REPEAT_SEED_STRIDE, failures_per_repetition, fresh_seed, parse_shard,
                                     repeat_cases, repetition_of_seed, select_shard)

__all__ = [
    "CaseResult",
    "CaseOptions",
    "RunSummary",
    "run_case_inprocess",
    "run_cases",
    "parse_shard",
    "select_shard",
    "default_workers",
    "default_device",
    "visible_gpus",
    "repro_command",
    "classify_exception",
    "header_record",
    "footer_record",
    "now_iso",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MAX_CONSECUTIVE_TIMEOUTS",
    "REPEAT_SEED_STRIDE",
    "fresh_seed",
    "repetition_of_seed",
    "repeat_cases",
    "failures_per_repetition",
]
