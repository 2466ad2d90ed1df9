"""The benchmark section of the report: a roofline plot (inline SVG) and the rows as tables.

    render_bench_section(bench) -> str   an HTML fragment (<section>) for embedding
    render_bench_html(bench) -> str      a standalone, self-contained page (no network, no script)

``bench`` is the document ``moe_validate.bench.run_bench`` returns (or ``bench.json`` loaded).
The roofline: x = arithmetic intensity (FLOP per byte of the floor's bytes), y = achieved
TFLOP/s, both log scale; the memory ceiling ``y = bandwidth * x`` and one horizontal line per
matrix rate (bf16, fp8) as measured at the start of the run. Only layout happens here; every
number comes from the document.
"""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List

__all__ = ["render_bench_section", "render_bench_html", "roofline_svg"]

_COLORS = {"triton": "#1f77b4", "torch-grouped": "#d62728", "reference": "#7f7f7f"}
_MARKERS = {"none": "circle", "fp8_tensor_token": "square", "fp8_block128": "diamond"}
_W, _H, _PAD_L, _PAD_B, _PAD_T, _PAD_R = 720, 420, 64, 48, 16, 150


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _log_ticks(lo: float, hi: float) -> List[float]:
    return [10.0 ** e for e in range(int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi))) + 1)]


def roofline_svg(bench: Dict[str, Any]) -> str:
    """The roofline as an <svg> element (empty-state text when nothing was measured)."""
    rows = [r for r in bench.get("rows", []) if r.get("status") == "ok" and r.get("tflops") and r.get("intensity")]
    c = bench.get("ceilings") or {}
    bw_tbs = (c.get("bandwidth_GBps") or 0) / 1e3  # TB/s: y [TFLOP/s] = bw [TB/s] * x [FLOP/B]
    rates = [(k, c.get(k)) for k in ("bf16_tflops", "fp8_tflops") if c.get(k)]
    if not rows:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="60" role="img">'
                f'<text x="10" y="35" font-size="14">no measured rows to plot</text></svg>')
    xs = [r["intensity"] for r in rows]
    ys = [r["tflops"] for r in rows] + [v for _, v in rates]
    x_lo, x_hi = min(xs) / 2, max(xs) * 2
    y_lo, y_hi = min(ys) / 2, max(ys) * 2
    lx0, lx1, ly0, ly1 = math.log10(x_lo), math.log10(x_hi), math.log10(y_lo), math.log10(y_hi)
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def px(x: float) -> float:
        return _PAD_L + (math.log10(x) - lx0) / (lx1 - lx0) * pw

    def py(y: float) -> float:
        return _PAD_T + ph - (math.log10(y) - ly0) / (ly1 - ly0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
           f'aria-label="roofline: achieved TFLOP/s against arithmetic intensity" font-family="sans-serif" font-size="11">',
           f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
           f'<clipPath id="plot"><rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}"/></clipPath>']
    for t in _log_ticks(x_lo, x_hi):
        if x_lo <= t <= x_hi:
            out.append(f'<line x1="{px(t):.1f}" y1="{_PAD_T}" x2="{px(t):.1f}" y2="{_PAD_T + ph}" stroke="#eee"/>'
                       f'<text x="{px(t):.1f}" y="{_PAD_T + ph + 14}" text-anchor="middle">{t:g}</text>')
    for t in _log_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            out.append(f'<line x1="{_PAD_L}" y1="{py(t):.1f}" x2="{_PAD_L + pw}" y2="{py(t):.1f}" stroke="#eee"/>'
                       f'<text x="{_PAD_L - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{_PAD_L + pw / 2}" y="{_H - 8}" text-anchor="middle">arithmetic intensity (FLOP / byte)</text>')
    out.append(f'<text x="14" y="{_PAD_T + ph / 2}" transform="rotate(-90 14 {_PAD_T + ph / 2})" '
               f'text-anchor="middle">achieved TFLOP/s</text>')
    g = ['<g clip-path="url(#plot)">']
    for key, rate in rates:
        label = key.replace("_tflops", "")
        # the roof: bandwidth slope up to the ridge point, then the rate
        ridge = rate / bw_tbs if bw_tbs else x_lo
        x_start = x_lo
        pts = []
        if bw_tbs:
            pts.append((x_start, bw_tbs * x_start))
            pts.append((max(min(ridge, x_hi), x_lo), bw_tbs * max(min(ridge, x_hi), x_lo)))
        pts.append((max(ridge, x_lo), rate))
        pts.append((x_hi, rate))
        path = " ".join(f"{px(x):.1f},{py(max(y, y_lo * 1e-3)):.1f}" for x, y in pts)
        dash = "" if label == "bf16" else ' stroke-dasharray="6 3"'
        g.append(f'<polyline points="{path}" fill="none" stroke="#2ca02c" stroke-width="1.5"{dash}>'
                 f'<title>{label} roof: {rate:.0f} TFLOP/s, {bw_tbs * 1e3:.0f} GB/s</title></polyline>')
    for r in rows:
        x, y = px(r["intensity"]), py(r["tflops"])
        color = _COLORS.get(r["backend"], "#9467bd")
        tip = (f'{r["backend"]} {r["model"]} {r["scheme"]} M={r["M"]}: {r["timing"]["median_ms"]:.3f} ms, '
               f'{r["tflops"]:.1f} TFLOP/s, {_num(r.get("gbps"), ".0f")} GB/s, '
               f'floor fraction {_num(r.get("fraction_of_floor"), ".2f")}')
        shape = _MARKERS.get(r["scheme"], "circle")
        if shape == "square":
            g.append(f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{color}" fill-opacity="0.75">'
                     f'<title>{_esc(tip)}</title></rect>')
        elif shape == "diamond":
            g.append(f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}" '
                     f'fill="{color}" fill-opacity="0.75"><title>{_esc(tip)}</title></polygon>')
        else:
            g.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}" fill-opacity="0.75"><title>{_esc(tip)}</title></circle>')
    g.append("</g>")
    out.extend(g)
    # legend
    lx, ly = _PAD_L + pw + 12, _PAD_T + 10
    for i, b in enumerate(sorted({r["backend"] for r in rows})):
        out.append(f'<circle cx="{lx}" cy="{ly + 16 * i}" r="4" fill="{_COLORS.get(b, "#9467bd")}"/>'
                   f'<text x="{lx + 10}" y="{ly + 16 * i + 4}">{_esc(b)}</text>')
    base = ly + 16 * (len({r["backend"] for r in rows}) + 1)
    for i, (scheme, shape) in enumerate(_MARKERS.items()):
        out.append(f'<text x="{lx}" y="{base + 16 * i}">{shape}: {_esc(scheme)}</text>')
    out.append(f'<text x="{lx}" y="{base + 16 * len(_MARKERS)}">solid roof: bf16</text>')
    out.append(f'<text x="{lx}" y="{base + 16 * (len(_MARKERS) + 1)}">dashed roof: fp8</text>')
    out.append("</svg>")
    return "".join(out)


def _summary_table(bench: Dict[str, Any]) -> str:
    summ = bench.get("summary") or {}
    regimes = summ.get("regimes") or {}
    head = "".join(f"<th>{_esc(k)}<br><small>{_esc(v)}</small></th>" for k, v in regimes.items())
    body = []
    for peer, per in (summ.get("ratio_geomean") or {}).items():
        cells = "".join(f"<td>{_num(v.get('geomean'), '.2f')} <small>(n={v.get('n')})</small></td>" for v in per.values())
        body.append(f"<tr><th>{_esc(peer)} time / ours</th>{cells}</tr>")
        best = (summ.get("ratio_at_floor_geomean") or {}).get(peer)
        if best and any(v.get("n") for v in best.values()):
            cells = "".join(f"<td>{_num(v.get('geomean'), '.2f')}</td>" for v in best.values())
            body.append(f"<tr><th>{_esc(peer)} time / floor<br><small>best ratio possible</small></th>{cells}</tr>")
    ff = summ.get("ours_fraction_of_floor_geomean") or {}
    if ff:
        cells = "".join(f"<td>{_num(v.get('geomean'), '.2f')} <small>(n={v.get('n')})</small></td>" for v in ff.values())
        body.append(f"<tr><th>ours: fraction of floor</th>{cells}</tr>")
    return f'<table class="b-summary"><tr><th>geometric mean</th>{head}</tr>{"".join(body)}</table>'


def _rows_table(bench: Dict[str, Any]) -> str:
    cols = ("model", "scheme", "M", "backend", "status", "median ms", "p10-p90 ms", "TFLOP/s", "GB/s",
            "floor ms", "bound", "floor frac", "vs ours", "uniq experts", "check", "note")
    out = ['<table class="b-rows"><tr>' + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for r in bench.get("rows", []):
        t = r.get("timing") or {}
        check = r.get("check") or {}
        check_txt = ", ".join(f"{k}={_num(v, '.1e') if isinstance(v, float) else v}" for k, v in check.items())
        note = r.get("reason") or t.get("method") or ""
        cls = "ok" if r.get("status") == "ok" else "not-ok"
        cells = (r.get("model"), r.get("scheme"), r.get("M"), r.get("backend"), r.get("status"),
                 _num(t.get("median_ms"), ".4f"),
                 f'{_num(t.get("p10_ms"), ".4f")}-{_num(t.get("p90_ms"), ".4f")}' if t else "-",
                 _num(r.get("tflops"), ".1f"), _num(r.get("gbps"), ".0f"), _num(r.get("floor_ms"), ".4f"),
                 r.get("floor_bound") or "-", _num(r.get("fraction_of_floor"), ".2f"),
                 _num(r.get("ratio_vs_ours"), ".2f"), _num(r.get("unique_experts"), ".1f"), check_txt or "-", note)
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _ceilings(bench: Dict[str, Any]) -> str:
    c = bench.get("ceilings") or {}
    items = [f"bandwidth {_num(c.get('bandwidth_GBps'), '.0f')} GB/s", f"bf16 {_num(c.get('bf16_tflops'), '.0f')} TFLOP/s",
             f"fp8 {_num(c.get('fp8_tflops'), '.0f')} TFLOP/s"]
    methods = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in (c.get("method") or {}).items())
    errors = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in (c.get("errors") or {}).items())
    return (f"<p><b>Ceilings measured at start:</b> {', '.join(items)}</p>"
            + (f"<ul>{methods}</ul>" if methods else "") + (f"<p>not measured:</p><ul>{errors}</ul>" if errors else ""))


def render_bench_section(bench: Any) -> str:
    """The benchmark as one <section> (styles scoped by class names beginning with ``b-``)."""
    bench = _as_doc(bench)
    env = bench.get("env") or {}
    env_line = ", ".join(f"{k} {env.get(k)}" for k in ("gpu", "driver", "cuda", "torch", "triton", "commit") if env.get(k))
    notes = "".join(f"<li>{_esc(n)}</li>" for n in bench.get("notes", []))
    error = f'<p class="b-error">{_esc(bench["error"])}</p>' if bench.get("error") else ""
    return (f'<section class="b-bench"><h2>Benchmark</h2>{error}'
            f"<p>{_esc(env_line or 'environment not recorded')}; created {_esc(bench.get('created'))}</p>"
            f"{_ceilings(bench)}<h3>Roofline</h3>{roofline_svg(bench)}<h3>Summary</h3>{_summary_table(bench)}"
            f"<ul>{notes}</ul><h3>Rows</h3>{_rows_table(bench)}</section>")


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
.b-bench table{border-collapse:collapse;font-size:12px;margin:.5em 0}
.b-bench th,.b-bench td{border:1px solid #ccc;padding:2px 6px;text-align:right}
.b-bench th{background:#f3f3f3}
.b-bench tr.not-ok td{color:#888}
.b-error{color:#b00;font-weight:bold}
"""


def _as_doc(bench: Any) -> Dict[str, Any]:
    """The bench document from a dict, JSON text, or the path of a ``bench.json``."""
    import json
    import os

    if isinstance(bench, dict):
        return bench
    if isinstance(bench, os.PathLike) or (isinstance(bench, str) and not bench.lstrip().startswith("{")):
        with open(bench) as f:
            return json.load(f)
    if isinstance(bench, str):
        return json.loads(bench)
    raise TypeError(f"bench must be a dict, JSON text or a path to bench.json; got {type(bench).__name__}")


def render_bench_html(bench: Any) -> str:
    """A standalone page: inline CSS and SVG, no external resource, no script.

    ``bench`` is the document (dict), its JSON text, or the path of a ``bench.json``.
    """
    bench = _as_doc(bench)
    title = f"moe-validate bench {bench.get('created', '')}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{render_bench_section(bench)}</body></html>\n")
