"""What broke and where, in words: the diagnosis of a non-passing case, from what its record measured.

``diagnose(record)`` reads a finished case record (a ``CaseRecord`` or its JSON mapping) and
returns ``None`` for a PASS, else::

    {"summary": one line, the first thing every output shows,
     "where":   {"kind": expert | token | column | tile_edge | column_band | tile | experts_but |
                         everywhere | scattered | unknown, "text", "detail", ...ids},
     "pattern": {"kind": nan_inf | sign_flip | zero | scale | scale_per_expert | offset | ulp_bias |
                         count_excess | systematic | random | unknown, "text", ...figures},
     "verdict": {"failed": [verdict names], "text", "meaning": [lines]},
     "stage":   {"first_diverging", "text"} or None,
     "checks":  [names of the failed post-comparison checks],
     "basis":   which elements the figures come from}

It measures nothing: every figure comes from the record (the failing panel's ``worst`` elements
with their token, column, expert and tile; ``exceed_count`` and ``differing``; ``nan_inf``;
``detail.per_expert``; ``verdicts``; ``stages``; ``checks``), so it can be computed again for a
record written before it existed (``diagnosis_of``). The wording hedges where the evidence is a
handful of elements ("a scale bug?"): a diagnosis is a lead to follow, the verdict stays the
panels'. Pure Python: the report and ``compare`` read it without importing torch.
"""

from __future__ import annotations

import math
import re
from statistics import median
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["diagnose", "diagnosis_of", "summary_of", "TILE", "VERDICT_MEANING"]

# Nominal (token, column) tile used to name where an element lives (compare.py's worst elements
# and heatmap use it too): the kernels' most common BLOCK_M x BLOCK_N at small M.
TILE = (16, 32)

# What each verdict means when it fails (results.CaseRecord.verdicts; docs/SPEC.md, "Tolerances").
VERDICT_MEANING = {
    "accuracy": "the output is further from the exact (float64) result than the scheme's error budget allows: "
                "the numbers are wrong",
    "conformance": "the output does not round where the declared numerics profile says (against the mirror, "
                   "count test included): right in magnitude, different in its roundings",
}
# The oracle panel each verdict is judged on.
_PANEL_OF = {"accuracy": "exact", "conformance": "mirror"}
_VERDICT_OF_LABEL = {"budget (exact)": "accuracy", "gate (mirror)": "conformance"}

_NOT_COMPARED = {
    "SKIP": "skipped", "CRASH": "crashed", "COMPILE_ERROR": "did not compile", "OOM": "out of memory",
    "TIMEOUT": "timed out", "NOT_RUN": "not run",
}
# Unit roundoff of each storage dtype: two of them bound the spread a constant ratio shows after
# the output is rounded to S.
_EPS = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# A ratio (or offset) counts as constant when its spread over the worst elements is under this
# share of its distance from 1 (from 0): a scale bug scales every element alike, noise does not.
_CONSTANT_SPREAD = 0.1
# A fraction of elements over the bound from which the error is "everywhere".
_EVERYWHERE_FRACTION = 0.5
# Up to this many ulps an error under the bound is "few-ulp" (a rounding-mode slip, a 1-ulp bias).
_FEW_ULP = 4


# ---------------------------------------------------------------------------------------------
# Reading the record
# ---------------------------------------------------------------------------------------------
def _get(rec: Any, key: str, default: Any = None) -> Any:
    getter = getattr(rec, "get", None)
    value = getter(key, default) if callable(getter) else getattr(rec, key, default)
    return default if value is None else value


_READ = ("outcome", "reason", "params", "metrics", "detail", "verdicts", "gating", "profile", "stages", "checks")


def _special(x: Any) -> Any:
    return _SPECIAL.get(x, x) if isinstance(x, str) else x


def _restored_panel(panel: Mapping) -> Dict[str, Any]:
    """``_restored`` for a metric panel's known two levels (metrics of scalars, worst elements),
    without recursing: a report diagnoses thousands of old records."""
    out: Dict[str, Any] = {}
    for key, value in panel.items():
        if key == "worst" and isinstance(value, list):
            out[key] = [{a: _special(b) for a, b in w.items()} if isinstance(w, dict) else w for w in value]
        elif isinstance(value, dict):
            out[key] = {a: _special(b) for a, b in value.items()}
        else:
            out[key] = _special(value)
    return out


def _view(rec: Any) -> Dict[str, Any]:
    """The fields a diagnosis reads, with stored non-finite floats restored once."""
    view = {k: _restored(_get(rec, k)) if k in ("verdicts", "stages") else _get(rec, k) for k in _READ}
    metrics = view["metrics"]
    if isinstance(metrics, dict):
        view["metrics"] = {name: _restored_panel(p) if isinstance(p, dict) else p for name, p in metrics.items()}
    detail = view["detail"]
    if isinstance(detail, dict):  # only what is read: the per-expert maxima and the heatmap
        view["detail"] = {k: _restored(detail[k]) for k in ("per_expert", "heatmap") if k in detail}
    return view


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _restored(value: Any) -> Any:
    """A stored record writes non-finite floats as "NaN" / "Infinity" (results.make_json_safe):
    read them back as floats."""
    if isinstance(value, str):
        return _SPECIAL.get(value, value)
    if isinstance(value, dict):
        return {k: _restored(v) for k, v in value.items()}
    if isinstance(value, list):
        if not any(isinstance(v, (str, dict, list)) for v in value):
            return value  # plain numbers (most heatmap rows): nothing to restore
        return [_restored(v) for v in value]
    return value


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _num(x) and math.isfinite(x)


def format_number(x: Any, digits: int = 3, missing: str = "?") -> str:
    """``x`` to ``digits`` significant digits, NaN and infinities by name, ``missing`` for a
    non-number (the report's tables say "-", a diagnosis "?")."""
    if not _num(x):
        return missing
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


_g = format_number


def _reported_failure(rec: Any) -> bool:
    """A verdict the record itself says FAIL (on a PASS: one that does not gate)."""
    verdicts = _get(rec, "verdicts")
    return isinstance(verdicts, dict) and any((v or {}).get("outcome") == "FAIL" for v in verdicts.values()
                                              if isinstance(v, dict))


def _failed_verdicts(rec: Any) -> Tuple[List[str], bool]:
    """(names of the failed verdicts, whether the record said so itself in ``verdicts``)."""
    verdicts = _get(rec, "verdicts")
    if isinstance(verdicts, dict) and verdicts:
        return [n for n in ("accuracy", "conformance") if (verdicts.get(n) or {}).get("outcome") == "FAIL"], True
    # A record written before the verdicts existed: read each oracle's panel the way
    # compare.passes judges it (NaN where the reference is finite, an element over its bound, or
    # more differing elements than the count test allows).
    metrics = _get(rec, "metrics", {})
    if isinstance(metrics, dict) and metrics:
        return [v for v in ("accuracy", "conformance")
                if isinstance(metrics.get(_PANEL_OF[v]), dict) and _panel_failed(metrics[_PANEL_OF[v]])], False
    reason = str(_get(rec, "reason", ""))
    # No panels either: the comparison's reason names the first failing oracle by its label.
    return [v for label, v in _VERDICT_OF_LABEL.items() if reason.startswith(label)], False


def _panel_failed(panel: Mapping) -> bool:
    mn = (panel.get("max_normalized") or {}).get("value")
    diff = panel.get("differing") or {}
    over_count = _num(diff.get("allowed")) and _num(diff.get("value")) and diff["value"] > diff["allowed"]
    return bool(panel.get("nan_where_ref_finite")) or (_num(mn) and (math.isnan(mn) or mn > 1.0)) or bool(over_count)


def _failing_panel(rec: Any, failed: List[str]) -> Tuple[Optional[str], Optional[Mapping]]:
    """The panel to read: accuracy's (exact) before conformance's (mirror); else the worse one."""
    metrics = _get(rec, "metrics", {})
    if not isinstance(metrics, dict) or not metrics:
        return None, None
    for verdict in ("accuracy", "conformance"):
        name = _PANEL_OF[verdict]
        if verdict in failed and isinstance(metrics.get(name), dict):
            return name, metrics[name]
    bad = [n for n, p in metrics.items() if isinstance(p, dict) and _panel_failed(p)]
    if not bad:
        return None, None
    name = max(bad, key=lambda n: _margin_key((metrics[n].get("max_normalized") or {}).get("margin")))
    return name, metrics[name]


def _margin_key(m: Any) -> float:
    if not _num(m):
        return -math.inf
    return math.inf if math.isnan(m) else float(m)


def _elements(panel: Mapping) -> List[Dict[str, Any]]:
    """The worst elements over their bound (NaN/Inf where the reference is finite included); all
    the worst ones with any error when none is over (a count-test failure)."""
    worst = [w for w in panel.get("worst") or [] if isinstance(w, dict)]
    over = [w for w in worst if _num(w.get("normalized")) and (w["normalized"] > 1.0 or math.isnan(w["normalized"]))]
    if over:
        return over
    return [w for w in worst if _num(w.get("normalized")) and w["normalized"] > 0] or worst


def _ints(elements, key) -> List[int]:
    return sorted({int(w[key]) for w in elements if _num(w.get(key))})


def _span(values: Sequence[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}" if _contiguous(values) else \
        ", ".join(map(str, values[:6])) + (" ..." if len(values) > 6 else "")


def _contiguous(values: Sequence[int]) -> bool:
    return len(values) > 1 and values[-1] - values[0] + 1 == len(values)


# ---------------------------------------------------------------------------------------------
# Where the error lives
# ---------------------------------------------------------------------------------------------
def _tile_maxima(heat: Mapping) -> List[float]:
    """The heatmap's maxima per nominal TILE (its cells may be finer or coarser than a tile)."""
    rows = heat.get("values") if isinstance(heat.get("values"), list) else []
    rt, ct = heat.get("row_tile"), heat.get("col_tile")
    if not (_num(rt) and _num(ct) and rt > 0 and ct > 0):
        rt, ct = TILE
    tiles: Dict[Tuple[int, int], float] = {}
    for r, row in enumerate(rows):
        for c, v in enumerate(row if isinstance(row, list) else []):
            if _num(v):
                key = (int(r * rt // TILE[0]), int(c * ct // TILE[1]))
                tiles[key] = max(tiles.get(key, -math.inf), v, key=_margin_key)
    return list(tiles.values())


def _spared_expert(per_expert: List[float]) -> Optional[int]:
    """The one expert the error spares, where the per-expert maxima say so: at least three
    experts; it within its bound or under half the others', which agree within 2x (a bug in every
    expert's weights but one's also reaches its tokens through their other routes)."""
    if len(per_expert) < 3 or any(math.isnan(v) for v in per_expert):
        return None
    low = min(range(len(per_expert)), key=per_expert.__getitem__)
    others = [v for i, v in enumerate(per_expert) if i != low]
    if min(others) <= 1.0:
        return None
    if per_expert[low] <= 1.0:
        return low
    return low if max(others) <= 2 * min(others) and per_expert[low] < min(others) / 2 else None


def _spread(tokens, columns, experts) -> str:
    parts = [f"{len(tokens)} token(s)", f"{len(columns)} column(s)"] + ([f"{len(experts)} expert(s)"] if experts else [])
    return ", ".join(parts)


def _edge_of(values: Sequence[int], size: int, extent: Optional[int]) -> Optional[str]:
    """Which tile edge every value lies on: 'last' (p % size == size - 1, or the tensor's last
    index), 'first' (p % size == 0, beyond the first tile), or None."""
    if not values:
        return None
    last = all(v % size == size - 1 or (extent is not None and v == extent - 1) for v in values)
    first = all(v % size == 0 and v > 0 for v in values)
    return "last" if last else "first" if first else None


def _where(elements: List[Dict[str, Any]], panel: Mapping, detail: Mapping, params: Mapping) -> Dict[str, Any]:
    tokens, columns = _ints(elements, "token"), _ints(elements, "column")
    experts = sorted({int(w["expert"]) for w in elements if _num(w.get("expert")) and w["expert"] >= 0})
    M, K = params.get("M"), params.get("K")
    over = int(panel.get("exceed_count") or 0)
    differing = panel.get("differing") or {}
    # A count-test failure (every element inside its bound): the differing elements are the evidence.
    count_only = not over and _num(differing.get("value")) and differing["value"] > 0
    if count_only:
        over = int(differing["value"])
    total = (panel.get("differing") or {}).get("of") or (M * K if _num(M) and _num(K) else None)
    fraction = panel.get("exceed_fraction") if _num(panel.get("exceed_fraction")) else (
        over / total if total else 0.0)
    n = len(elements)
    what = "differing element(s)" if count_only else "element(s) over the bound"
    basis = (f"all {n} {what}" if over and over <= n else
             f"the {n} worst of {over} {what}" if over else f"the {n} worst differing element(s)")
    out: Dict[str, Any] = {"basis": basis, "tokens": tokens, "columns": columns, "experts": experts,
                           "over": over, "fraction": fraction}
    rt, ct = TILE
    per_expert = detail.get("per_expert") if isinstance(detail, dict) else None
    per_expert = [float(v) for v in per_expert if _num(v)] if isinstance(per_expert, list) else []

    def done(kind: str, text: str, detail_text: str = "") -> Dict[str, Any]:
        out.update(kind=kind, text=text, detail=detail_text or basis)
        return out

    if not elements:
        return done("unknown", "location unknown", "the record names no worst element")
    # Experts with an element over its bound, over all elements (the detail's per-expert maxima).
    experts_over = [e for e, v in enumerate(per_expert) if math.isnan(v) or v > 1.0]
    cells = _tile_maxima(detail.get("heatmap") if isinstance(detail.get("heatmap"), dict) else {})
    cells_over = sum(1 for v in cells if math.isnan(v) or v > 1.0)
    if n >= 2 and len(tokens) == 1 and len(columns) > 1 and (not _num(K) or over <= K):
        t = tokens[0]
        tail = " (the last token: a tail-tile mask?)" if _num(M) and t == M - 1 and M > 1 else ""
        return done("token", f"token {t} only{tail}", f"{basis}, all in token {t}, over columns {_span(columns)}")
    # An edge means something only where the tensor spans more than one tile that way.
    col_edge = (_edge_of(columns, ct, K) if n >= 2 and _num(K) and K > ct and (not _num(M) or over <= M * len(columns))
                else None)
    if col_edge and (len(columns) > 1 or len(tokens) > 1):
        return done("tile_edge", f"tile edge: column{'s' if len(columns) > 1 else ''} {_span(columns)}, the "
                                 f"{col_edge} column of {ct}-wide tiles", f"{basis}, over tokens {_span(tokens)}")
    if n >= 2 and len(columns) == 1 and len(tokens) > 1 and (not _num(M) or over <= M):
        return done("column", f"column {columns[0]} only", f"{basis}, over tokens {_span(tokens)}")
    row_edge = (_edge_of(tokens, rt, M) if n >= 2 and len(tokens) > 1 and _num(M) and M > rt
                and (not _num(K) or over <= K * len(tokens)) else None)
    if row_edge:
        return done("tile_edge", f"tile edge: tokens {_span(tokens)}, the {row_edge} row of {rt}-row tiles",
                    f"{basis}, over columns {_span(columns)}")
    lone = experts_over[0] if len(per_expert) > 1 and len(experts_over) == 1 else None
    if lone is None and n >= 2 and len(experts) == 1 and (
            not per_expert or max(range(len(per_expert)), key=lambda i: _margin_key(per_expert[i])) == experts[0]):
        lone = experts[0]
    if lone is not None:
        others = [v for i, v in enumerate(per_expert) if i != lone]
        spread = (f"; per-expert max error {_g(per_expert[lone])} vs at most {_g(max(others, key=_margin_key))} elsewhere"
                  if per_expert and others and lone < len(per_expert) else "")
        share = (f"{sum(1 for w in elements if w.get('expert') == lone)} of {n} worst elements"
                 + ("; the only expert over its bound" if lone in experts_over and len(experts_over) == 1 else ""))
        out["expert"] = lone
        return done("expert", f"expert {lone} ({share})", f"{basis}, routed mostly to expert {lone}{spread}")
    if count_only and differing.get("of"):
        share = differing["value"] / differing["of"]
        kind = "everywhere" if share >= _EVERYWHERE_FRACTION else "scattered"
        return done(kind, f"{kind} ({int(differing['value'])} of {differing['of']} elements differ from the oracle)", basis)
    spared = _spared_expert(per_expert)
    if spared is not None:
        e, others = spared, [v for i, v in enumerate(per_expert) if i != spared]
        out["spared_expert"] = e
        return done("experts_but", f"every expert but {e}", f"{basis}; expert {e}'s max error {_g(per_expert[e])} vs "
                                                            f"{_g(min(others))}-{_g(max(others))} elsewhere")
    everywhere_ish = (fraction >= 0.1 and len(per_expert) > 1 and len(experts_over) == len(per_expert)
                      and cells and cells_over >= 0.75 * len(cells))
    if fraction >= _EVERYWHERE_FRACTION or everywhere_ish:
        return done("everywhere", f"everywhere ({100 * fraction:.0f}% of elements over the bound"
                                  + (f", in every expert and {cells_over} of {len(cells)} tiles" if everywhere_ish else "")
                                  + ")",
                    f"{basis}; over {_spread(tokens, columns, experts)}")
    if n >= 2 and _num(K) and K >= 8 and len(tokens) > 1 and columns[-1] - columns[0] + 1 <= K // 4:
        return done("column_band", f"columns {columns[0]}-{columns[-1]} (a band of {columns[-1] - columns[0] + 1} "
                                   f"of {K})", f"{basis}, over tokens {_span(tokens)}")
    tiles = sorted({str(w.get("tile")) for w in elements if w.get("tile")})
    if n >= 2 and len(tiles) == 1 and over <= rt * ct and _num(M) and _num(K) and (M > rt or K > ct):
        return done("tile", f"one tile ({tiles[0]}: {rt} tokens x {ct} columns)", f"{basis}, all in tile {tiles[0]}")
    if n == 1 and over <= 1:
        w = elements[0]
        return done("scattered", f"one element (token {w.get('token')}, column {w.get('column')})", basis)
    return done("scattered", f"scattered over {_spread(tokens, columns, experts)} "
                             f"({100 * fraction:.2g}% of elements over the bound)", basis)


# ---------------------------------------------------------------------------------------------
# Its pattern
# ---------------------------------------------------------------------------------------------
def _nan_where(panel: Mapping, elements: List[Dict[str, Any]]) -> Dict[str, Any]:
    ni = panel.get("nan_inf") or {}
    bad = int(panel.get("nan_where_ref_finite") or 0)
    parts = [f"NaN at {ni.get('kernel_nan', 0)}" if ni.get("kernel_nan") else None,
             f"Inf at {ni.get('kernel_inf', 0)}" if ni.get("kernel_inf") else None]
    what = " and ".join(p for p in parts if p) or "NaN/Inf"
    return {"kind": "nan_inf", "count": bad,
            "text": f"{what} element(s) where the reference is finite" + (f" ({bad} in all)" if all(parts) else "")}


def _simplest_in(lo: float, hi: float) -> str:
    """The shortest decimal inside [lo, hi]: the ratios 1.4996 .. 1.5007 of a x1.5 bug read 1.5,
    not their median's last, rounding-made digits."""
    mid = (lo + hi) / 2
    for decimals in range(0, 9):
        candidate = round(mid, decimals)
        if lo <= candidate <= hi:
            return f"{candidate:.{decimals}f}"
    return f"{mid:.6g}"


def _constant(ratios: List[float], eps: float) -> bool:
    """Ratios off 1 to one side, their spread under _CONSTANT_SPREAD of the distance (or 4 eps)."""
    dev = median(ratios) - 1.0
    return bool(dev) and all((q - 1.0) * dev > 0 for q in ratios) and (
        max(ratios) - min(ratios) <= max(_CONSTANT_SPREAD * abs(dev), 4 * eps))


def _ratio_text(ratios: List[float]) -> str:
    """'constant ratio 1.01', or 'constant ratio about 1.02' where only the storage rounding's
    slack made the ratios agree (the worst elements, chosen by their error, lean outward)."""
    dev = median(ratios) - 1.0
    value = _simplest_in(min(ratios), max(ratios))
    if max(ratios) - min(ratios) > _CONSTANT_SPREAD * abs(dev):
        return f"constant ratio about {value}"
    return f"constant ratio {value}"


def _ratio_per_expert(elements: List[Dict[str, Any]], eps: float) -> List[Tuple[int, str]]:
    """[(expert, ratio)] when the worst elements of each of two or more experts (two or more each)
    share a constant kernel/reference ratio of their own; [] otherwise."""
    groups: Dict[int, List[float]] = {}
    for w in elements:
        if _num(w.get("expert")) and w["expert"] >= 0 and _finite(w.get("kernel")) and _finite(w.get("reference")) \
                and w["reference"] != 0:
            groups.setdefault(int(w["expert"]), []).append(w["kernel"] / w["reference"])
    # experts with a single worst element say little: read the others, if they hold 2/3 of them
    read = {e: g for e, g in groups.items() if len(g) >= 2}
    if len(groups) < 2 or not read or sum(map(len, read.values())) * 3 < 2 * sum(map(len, groups.values())) \
            or not all(_constant(g, eps) for g in read.values()):
        return []
    return [(e, _simplest_in(min(g), max(g)) if e in read else f"{_g(g[0], 4)} (one element)")
            for e, g in sorted(groups.items())]


def _pattern(elements: List[Dict[str, Any]], panel: Mapping, params: Mapping, random_like: bool = True) -> Dict[str, Any]:
    """``random_like``: the error is spread (everywhere, scattered); located in one expert, token
    or tile, mixed signs say only that no ratio or offset fits (the record lacks the parts)."""
    if panel.get("nan_where_ref_finite"):
        return _nan_where(panel, elements)
    pairs = [(float(w["kernel"]), float(w["reference"])) for w in elements
             if _finite(w.get("kernel")) and _finite(w.get("reference"))]
    n = len(pairs)
    diffs = [k - r for k, r in pairs]
    above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    mn = (panel.get("max_normalized") or {}).get("value")
    differing = panel.get("differing") or {}
    ulp = (panel.get("ulp") or {}).get("value")
    eps = _EPS.get(str(params.get("dtype")), 2.0 ** -8)
    if _num(mn) and mn <= 1.0 and _num(differing.get("allowed")) and differing.get("value", 0) > differing["allowed"]:
        # Every element inside its bound; too many differ at all: an error smaller than the bound.
        count = f"{int(differing['value'])} of {differing.get('of', '?')} elements differ from the oracle"
        limit = f"more than the {int(differing['allowed'])} rounding flips explain"
        ratios = [k / r for k, r in pairs if r != 0]
        if len(ratios) >= 2 and _constant(ratios, eps) and abs(median(ratios) - 1.0) > 2 * eps:
            return {"kind": "scale", "ratio": median(ratios), "spread": max(ratios) - min(ratios),
                    "text": f"{_ratio_text(ratios)} (a scale bug?) inside the tolerance: {count}, {limit}"}
        few = _num(ulp) and ulp <= _FEW_ULP
        by = f"by at most {_g(ulp)} ulp" if few else f"by up to {_g(ulp)} ulp, each inside its bound"
        if n and (above == n or below == n):
            side = "above" if above else "below"
            return {"kind": "ulp_bias", "ulp": ulp, "side": side,
                    "text": (f"systematic {_g(ulp)}-ulp bias: " if few else "systematic bias under the tolerance: ")
                            + f"{count} {by}, {limit}, the {n} worst all {side} it (a rounding-mode or bias bug?)"}
        return {"kind": "count_excess", "ulp": ulp,
                "text": f"{'few-ulp ' if few else ''}count excess: {count} {by}, {limit} (mixed signs)"}
    if not n:
        return {"kind": "unknown", "text": "no finite worst element to read a pattern from"}
    nonzero = [(k, r) for k, r in pairs if r != 0]
    ratios = [k / r for k, r in nonzero]
    if all(k == 0 for k, _ in pairs) and nonzero:
        return {"kind": "zero", "text": "kernel wrote 0 where the reference is not (an unwritten or masked output?)"}
    if len(ratios) >= 2 and all(abs(q + 1) <= 0.02 for q in ratios):
        return {"kind": "sign_flip", "ratio": median(ratios),
                "text": f"sign flip: kernel = -reference (kernel/reference {_g(min(ratios), 4)} .. {_g(max(ratios), 4)})"}
    if len(ratios) >= 2:
        mid = median(ratios)
        spread = max(ratios) - min(ratios)
        if _constant(ratios, eps):
            return {"kind": "scale", "ratio": mid, "spread": spread,
                    "text": f"{_ratio_text(ratios)} (a scale bug?): kernel/reference over {len(ratios)} "
                            f"elements, spread {_g(spread, 2)}"}
    per_expert_ratio = _ratio_per_expert(elements, eps)
    if per_expert_ratio:
        parts = ", ".join(f"expert {e}: {r}" for e, r in per_expert_ratio)
        return {"kind": "scale_per_expert", "ratios": per_expert_ratio,
                "text": f"a constant ratio per expert ({parts}; kernel/reference): a per-expert scale bug?"}
    if n >= 2:
        mid_d = median(diffs)
        if mid_d and all(d * mid_d > 0 for d in diffs) and max(diffs) - min(diffs) <= _CONSTANT_SPREAD * abs(mid_d):
            return {"kind": "offset", "offset": mid_d,
                    "text": f"constant offset {mid_d:+.3g} kernel - reference (a missing or doubled bias?)"}
    if n >= 2 and (above == n or below == n):
        side = "above" if above else "below"
        return {"kind": "systematic", "side": side,
                "text": f"systematic bias: all {n} worst elements {side} the reference"
                        + (f" (kernel/reference {_g(min(ratios), 4)} .. {_g(max(ratios), 4)}, not constant)" if ratios else "")}
    if n >= 2:
        z = (panel.get("z_rms") or {}).get("value")
        cos = (panel.get("cosine") or {}).get("value")
        return {"kind": "random", "text": f"{'random-looking: ' if random_like else ''}mixed signs ({above} above, "
                                          f"{below} below the reference){'' if random_like else ', no constant ratio or offset'}"
                                          + (f", cosine {_g(cos, 4)}" if _num(cos) else "")
                                          + (f", z RMS {_g(z)}" if _num(z) else "")}
    k, r = pairs[0]
    return {"kind": "unknown", "text": f"kernel {_g(k, 6)} vs reference {_g(r, 6)}"}


# ---------------------------------------------------------------------------------------------
# Verdict, stage, checks
# ---------------------------------------------------------------------------------------------
def _verdict(rec: Any, failed: List[str], recorded: bool) -> Dict[str, Any]:
    gating = _get(rec, "gating")
    profile = _get(rec, "profile")
    meaning = []
    for name in failed:
        note = "" if not isinstance(gating, list) or name in gating else " (not gating for this backend)"
        text = VERDICT_MEANING[name]
        if name == "conformance" and profile:
            text = text.replace("the declared numerics profile", f"the declared numerics profile ({profile})")
        meaning.append(f"{name} FAIL{note}: {text}")
    if not failed:
        text = "the comparison passed" if recorded else "verdict unknown"
    elif failed == ["conformance"] and recorded:
        text = "conformance FAIL, accuracy PASS (within the error budget; rounds unlike the declared profile)"
    elif failed == ["accuracy"] and recorded:
        text = "accuracy FAIL, conformance PASS"
    else:
        text = " and ".join(failed) + " FAIL"
    return {"failed": failed, "text": text, "meaning": meaning}


def _stage(rec: Any) -> Optional[Dict[str, Any]]:
    stages = _get(rec, "stages")
    if not isinstance(stages, dict):
        return None
    first = stages.get("first_diverging")
    if not stages.get("exposed"):
        return {"first_diverging": None, "text": "the backend exposes no stages"}
    if not first:
        return {"first_diverging": None, "text": "every exposed stage matches; the divergence is after the last one"}
    info = (stages.get("stages") or {}).get(first) or {}
    worst = info.get("worst") if isinstance(info, dict) else None
    at = ""
    if isinstance(worst, dict) and worst:
        at = " (worst at " + ", ".join(f"{k} {worst[k]}" for k in ("token", "column", "expert") if worst.get(k) is not None) + ")"
    return {"first_diverging": first, "text": f"first diverging stage: {first}{at}"}


def _failed_checks(rec: Any) -> List[Dict[str, Any]]:
    return [c for c in _get(rec, "checks", []) or [] if isinstance(c, dict) and c.get("outcome") == "FAIL"]


# ---------------------------------------------------------------------------------------------
# The diagnosis
# ---------------------------------------------------------------------------------------------
def _first_line(text: Any, limit: int = 200) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# Few-word labels (``short``: a report's case table, where thousands of rows share a handful).
_PATTERN_LABEL = {"nan_inf": "NaN/Inf", "sign_flip": "sign flip", "zero": "zeros", "scale": "scale",
                  "scale_per_expert": "scale per expert", "offset": "offset",
                  "ulp_bias": "ulp bias", "count_excess": "count excess", "systematic": "systematic bias",
                  "random": "random", "unknown": "?"}


def _label(where: Mapping) -> str:
    kind = where.get("kind")
    if kind == "expert":
        return f"expert {where.get('expert')}"
    if kind == "token":
        return f"token {where['tokens'][0]}"
    if kind == "column":
        return f"column {where['columns'][0]}"
    if kind == "tile_edge":
        return "tile edge"
    if kind == "column_band":
        return "column band"
    if kind == "experts_but":
        return f"all experts but {where.get('spared_expert')}"
    return {"tile": "one tile", "everywhere": "everywhere", "scattered": "scattered"}.get(kind, "?")


def diagnose(rec: Any) -> Optional[Dict[str, Any]]:
    """The diagnosis of a finished case record (see the module docstring); None for a PASS,
    unless a verdict that does not gate failed (a PASS with its conformance FAIL reported)."""
    rec = _view(rec)
    outcome = str(_get(rec, "outcome", ""))
    if outcome == "" or (outcome == "PASS" and not _reported_failure(rec)):
        return None
    reason = _first_line(_get(rec, "reason"))
    if outcome in _NOT_COMPARED:
        return {"summary": f"{_NOT_COMPARED[outcome]}: {reason}" if reason else _NOT_COMPARED[outcome],
                "where": None, "pattern": None, "verdict": None, "stage": _stage(rec), "checks": [], "basis": None}
    failed, recorded = _failed_verdicts(rec)
    checks = _failed_checks(rec)
    check_names = [str(c.get("name")) for c in checks]
    verdict = _verdict(rec, failed, recorded)
    stage = _stage(rec)
    panel_name, panel = _failing_panel(rec, failed)
    if panel is None:
        # The comparison passed (or was not recorded): a failed check is what broke.
        if checks:
            first = checks[0]
            summary = f"check {first.get('name')} failed: {_first_line(first.get('reason'))}"
            if len(checks) > 1:
                summary += f" (+{len(checks) - 1} more check(s): {', '.join(check_names[1:])})"
        else:
            summary = f"failed: {reason}" if reason else "failed (no measurement recorded)"
        return {"summary": summary, "where": None, "pattern": None, "verdict": verdict, "stage": stage,
                "checks": check_names, "basis": None}
    params = _get(rec, "params", {})
    params = params if isinstance(params, dict) else {}
    detail = _get(rec, "detail", {})
    detail = detail if isinstance(detail, dict) else {}
    elements = _elements(panel)
    where = _where(elements, panel, detail, params)
    pattern = _pattern(elements, panel, params, random_like=where["kind"] in ("everywhere", "scattered", "unknown"))
    summary = f"{where['text']}: {pattern['text']}; {verdict['text']}"
    short = f"{_label(where)}: {_PATTERN_LABEL.get(pattern['kind'], pattern['kind'])}"
    if pattern["kind"] == "scale":
        short += f" x{_simplest_in(pattern['ratio'] - pattern['spread'] / 2, pattern['ratio'] + pattern['spread'] / 2)}"
    if stage and stage.get("first_diverging"):
        summary += f"; {stage['text']}"
    if check_names:
        summary += f"; check{'s' if len(check_names) > 1 else ''} {', '.join(check_names)} FAIL"
    return {"summary": summary, "short": short, "where": where, "pattern": pattern, "verdict": verdict,
            "stage": stage, "checks": check_names, "basis": f"{where['basis']} of the {panel_name} panel",
            "panel": panel_name}


def diagnosis_of(rec: Any) -> Optional[Dict[str, Any]]:
    """The record's own diagnosis, or one computed now for a record written without it."""
    own = _get(rec, "diagnosis")
    if isinstance(own, dict) and own.get("summary"):
        return own
    try:
        return diagnose(rec)
    except Exception as exc:  # an odd old record must not stop a report or a comparison
        return {"summary": f"(no diagnosis: {type(exc).__name__}: {_first_line(exc)})", "where": None,
                "pattern": None, "verdict": None, "stage": None, "checks": [], "basis": None}


def summary_of(rec: Any) -> Optional[str]:
    """The one-line summary of ``diagnosis_of(rec)``; None for a PASS."""
    d = diagnosis_of(rec)
    return d.get("summary") if d else None


_NUMBERS = re.compile(r"~?\b\d[\d.]*(?:e[+-]?\d+)?")


def reason_group(reason: Optional[str]) -> str:
    """A skip or failure reason with its numbers masked, so reasons differing only in a figure group."""
    return _NUMBERS.sub("#", _first_line(reason) or "(no reason recorded)")
