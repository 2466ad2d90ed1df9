"""The bench document on disk and on the terminal: ``bench.json`` + ``bench.html`` and the text table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from moe_validate.bench.models import OURS
from moe_validate.bench.timing import _first_line


BENCH_SCHEMA_VERSION = 1
BENCH_KIND = "moe-validate-bench"


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_bench(doc: Dict[str, Any], out_dir) -> Tuple[Path, Optional[Path]]:
    """Write ``bench.json`` and the standalone ``bench.html`` into ``out_dir``; return both paths
    (the HTML path is None, with a note on stderr, if rendering failed: the JSON always lands)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False))
    html_path: Optional[Path] = out / "bench.html"
    try:
        from moe_validate.report.bench_section import render_bench_html

        html_path.write_text(render_bench_html(doc))
    except Exception as exc:
        print(f"bench.html not written: {_first_line(exc)}", file=sys.stderr)
        html_path = None
    return json_path, html_path


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _config_sources(rows) -> Dict[str, int]:
    """Row counts per table that served our config: "tuned <device>", "sibling <device>", "default"."""
    counts: Dict[str, int] = {}
    for r in rows:
        src = r.get("config_source") or {}
        label = " ".join(v for v in (src.get("kind"), src.get("device")) if v) or "unrecorded"
        counts[label] = counts.get(label, 0) + 1
    return counts


def format_table(doc: Dict[str, Any]) -> str:
    """A compact text table: one line per measured (model, scheme, M): our median and p10-p90,
    TFLOP/s, GB/s, % of the floor, and per peer its time / ours (> 1: ours faster). Rows skipped
    by the model's scheme list are counted, not listed."""
    rows = doc.get("rows", [])
    peers = list(doc.get("settings", {}).get("peers", []))
    head = f"{'model':<15} {'scheme':<10} {'M':>5} {'ours ms':>8} {'p10-p90 ms':>15} {'TF/s':>5} {'GB/s':>5} {'fl%':>4}"
    for p in peers:
        head += f" {p[:9] + '/us':>12}"
    lines = [head]
    keys: List[Tuple[str, str, int]] = []
    for r in rows:
        k = (r["model"], r["scheme"], r["M"])
        if k not in keys:
            keys.append(k)
    by = {(r["model"], r["scheme"], r["M"], r["backend"]): r for r in rows}
    skipped: Dict[str, int] = {}
    for k in keys:
        ours = by.get((*k, OURS))
        if ours is None:
            continue
        label = ours.get("scheme_label") or k[1]
        if ours["status"] == "skipped" and "benchmarked in" in (ours.get("reason") or ""):
            skipped[f"{k[0]} {label}"] = skipped.get(f"{k[0]} {label}", 0) + 1
            continue
        if ours["status"] == "ok":
            t = ours["timing"]
            frac = ours.get("fraction_of_floor")
            line = (f"{k[0][:15]:<15} {label[:10]:<10} {k[2]:>5} {t['median_ms']:>8.3f} "
                    f"{t['p10_ms']:>7.3f}-{t['p90_ms']:<7.3f} {_f(ours['tflops'], '.0f'):>5} {_f(ours['gbps'], '.0f'):>5} "
                    f"{_f(None if frac is None else 100 * frac, '.0f'):>4}")
        else:
            line = f"{k[0][:15]:<15} {label[:10]:<10} {k[2]:>5} {ours['status'][:8]:>8} {'':>15} {'':>5} {'':>5} {'':>4}"
        for p in peers:
            pr = by.get((*k, p))
            if pr is None:
                cell = "-"
            elif pr.get("ratio_vs_ours"):
                cell = f"{pr['ratio_vs_ours']:.2f}"
            elif pr["status"] == "ok":
                cell = f"{pr['timing']['median_ms']:.2f}ms"
            else:
                cell = pr["status"][:11]
            line += f" {cell:>12}"
        # A fast wrong result must not read as a win: flag our rows whose cross-check is off.
        # 0.05 relative Frobenius is far above the kernel's own error (a few bf16 ulps, fp8
        # requantization flips: <= 1e-2) and far below a real bug (O(0.1 .. 1)).
        chk = ours.get("check") or {}
        if chk.get("nan") or any(isinstance(v, float) and v > 0.05 for k, v in chk.items() if k.startswith("rel_fro")):
            line += f"  !check {chk}"
        lines.append(line)
    profiled = [by[(*k, OURS)] for k in keys if (by.get((*k, OURS)) or {}).get("profile")]
    if profiled:
        lines.append("kernel breakdown of ours (us per call: kernels by time; sum of kernels vs median):")
        for r in profiled:
            prof = r["profile"]
            head = f"  {r['model'][:15]} {(r.get('scheme_label') or r['scheme'])[:10]} M={r['M']}:"
            if prof.get("error"):
                lines.append(f"{head} profiler failed: {prof['error']}")
                continue
            parts = ", ".join(f"{k['name'].split('::')[-1][:28]} {k['us_per_call']:.1f}"
                              + (f" x{k['launches_per_call']:.0f}" if k["launches_per_call"] > 1.5 else "")
                              for k in prof["kernels"])
            med_us = 1e3 * r["timing"]["median_ms"]
            lines.append(f"{head} sum {prof['kernel_sum_us']:.1f} of {med_us:.1f} | {parts}")
    served = _config_sources(by[(*k, OURS)] for k in keys if (by.get((*k, OURS)) or {}).get("status") == "ok")
    if served:
        lines.append("configs served by: " + "; ".join(f"{src} x{n}" for src, n in served.items()))
    if skipped:
        lines.append("not run (model benchmarked in other schemes): " + ", ".join(f"{k} x{n}" for k, n in skipped.items()))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines.append(f"{len(errors)} error rows, first: {errors[0]['backend']} {errors[0]['model']} "
                     f"{errors[0]['scheme']} M={errors[0]['M']}: {(errors[0]['reason'] or '')[:150]}")
    summ = doc.get("summary") or {}
    for p, per in (summ.get("ratio_geomean") or {}).items():
        parts = ", ".join(f"{reg} {_f(v['geomean'], '.2f')} (n={v['n']})" for reg, v in per.items())
        lines.append(f"geomean {p} / ours: {parts}")
        best = (summ.get("ratio_at_floor_geomean") or {}).get(p)
        if best and any(v["n"] for v in best.values()):
            parts = ", ".join(f"{reg} {_f(v['geomean'], '.2f')}" for reg, v in best.items())
            lines.append(f"  best possible (at the floor) {p} / floor: {parts}")
    ff = summ.get("ours_fraction_of_floor_geomean") or {}
    if ff:
        lines.append("geomean ours floor fraction: " + ", ".join(
            f"{reg} {_f(v['geomean'], '.2f')} (n={v['n']})" for reg, v in ff.items()))
    c = doc.get("ceilings") or {}
    lines.append(f"ceilings: {_f(c.get('bandwidth_GBps'), '.0f')} GB/s, bf16 {_f(c.get('bf16_tflops'), '.0f')} TF/s, "
                 f"fp8 {_f(c.get('fp8_tflops'), '.0f')} TF/s; peer columns: peer time / ours (> 1: ours faster)")
    return "\n".join(lines)
