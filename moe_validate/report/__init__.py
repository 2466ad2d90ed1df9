"""The self-contained HTML report of a results file, and the baseline diff.

    render_report(results, out_path, *, baseline=None, title=None) -> Path
    diff_runs(old, new) -> RunDiff
    format_diff(diff) -> str

Logic lives in ``model`` (what the page shows) and ``diff`` (baseline classification); ``render``
only fills the jinja2 template, whose page script lays out the embedded JSON.
"""

from moe_validate.report.diff import DRIFT_FACTOR, DRIFT_MIN_MARGIN, RunDiff, diff_runs, format_diff
from moe_validate.report.render import render_report

__all__ = ["render_report", "diff_runs", "format_diff", "RunDiff", "DRIFT_FACTOR", "DRIFT_MIN_MARGIN"]
