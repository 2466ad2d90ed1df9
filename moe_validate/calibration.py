"""Calibration of the error model: how large the normalized errors really are, per scheme and dtype
(and, for a GPU run's fp8 dots, per accumulator the gate modelled: ``CalibrationRow.accumulation``).

``tolerance.derive`` models, per output element, the standard deviation ``sigma`` of the
kernel's error against each oracle; ``compare.metric_panel`` records for every evaluated case
``z_rms`` (the root mean square of ``z = |kernel - oracle| / sigma`` over the finite elements)
and ``z_max``. SPEC.md ("Tolerances"): over many seeds ``z`` should have standard deviation near
1; a drift means the model or the kernel changed. This module pools those per-case numbers from
a ``ResultSet`` (no new record fields are needed) into one row per (quant scheme, storage dtype)
and per oracle: ``budget`` (kernel vs ``exact``) and ``gate`` (kernel vs ``mirror``).

Pooling. Case i contributes ``n_i`` elements with mean square ``z_rms_i^2``; the pooled RMS is
``sqrt(sum_i n_i z_rms_i^2 / sum_i n_i)``, i.e. exactly the RMS over every element of every case
(a large case weighs more, as its elements are more samples). ``n_i`` is the number of elements
the panel averaged over: the output is ``[M, K]`` (``params``), minus the elements where the
reference is not finite (``nan_inf.ref_nan + ref_inf``) and those where only the kernel is not
finite (``nan_where_ref_finite``); the two sets are disjoint, so the count is exact. Cases
without metrics (SKIP, CRASH, ...) and empty outputs (M = 0) add nothing.

RMS, not standard deviation: ``z`` is built from ``|d|``, so the records cannot give the mean
of the signed error. RMS^2 = std^2 + mean^2 >= std^2: the RMS is the larger, conservative figure;
for a zero-mean error (what the model assumes) the two are equal.

The band. A row is flagged when its pooled RMS leaves ``DEFAULT_BAND`` = [0.2, 1.5]:

- above 1.5: the model underestimates the error. Bounds are ``Z = 6`` modelled sigmas
  (``tolerance.Z_GATE``/``Z_BUDGET``); at RMS 1.5 that is 6 / 1.5 = 4 true standard deviations,
  which a Gaussian error exceeds with probability 6.3e-5 per element, i.e. several elements of
  every nightly-sized case (257 x 512 = 1.3e5 outputs): the suite would fail at random. (Between
  1 and 1.5 the bounded, uniform rounding errors have lighter tails than a Gaussian, so the
  margin is thin but not yet flaky.) For the gate, whose bound covers flips by hard terms built
  on capped, not typical, flip rates, a high RMS says the flip model undercounts the kernel's
  flips: its worst margins tell how close the gate is.
- below 0.2: the model is more than 5x conservative, so a bound admits errors of 6 / 0.2 = 30
  true standard deviations and loses sensitivity to real bugs. The budget's model is
  conservative on purpose, by known factors: the flip probability is capped at 2 sigma / step where the mean
  is 0.8 sigma / step (2.5x on flip-dominated terms), the fp32 accumulation growth
  ``1 + sqrt(n / 6)`` is the sequential worst case where blocked / tensor-core sums are smaller,
  and the Hopper fp8 MMA unit is taken with 4x headroom. RMS values around 0.3 to 0.7 are
  therefore expected and not alarming (about 0.5 was reported for the budget on an H100; a
  ``moe-validate calibrate`` there gives the current figure); below 0.2 the gap is larger than
  those factors explain. (The gate's sigma uses typical, measured rates instead: near 1.)
  Under the CPU interpreter
  the fp8 and int8 dots are exact, so quantized rows read lower there than on a GPU: compare
  rows only between runs of one environment.

The gate's ``sigma`` is flip-aware (``tolerance.flip_aware_sigma``): kernel and mirror differ only
where the kernel's fp32 arithmetic carries a stored value across a rounding midpoint, so most
elements differ by exactly 0 and a few by one or more steps of a stored format. The model gives
each element the variance of that discrete difference (flip probability times step squared,
propagated through the pipeline), so the gate's pooled RMS is near 1 when the flip model holds,
like the budget's. Its sample RMS, though, is a sum over rare events of very different sizes: it
means something only when the model expects enough of them. The gate record carries the
expected number of output elements that differ (``tolerance.gate.flip_events_expected``); a gate
row that expects fewer than ``MIN_FLIP_EVENTS`` = 20 (counting noise alone: +-1/sqrt(20) = 22% on
RMS^2, and the sizes are skewed) is marked "few flips" instead of flagged. On the CPU interpreter
the fp8 and int8 dots are (nearly) exact, so quantized gate rows read "few flips" or "= oracle"
there; a GPU run calibrates them.

A row whose every element equals its oracle (z_max = 0: the ``reference`` backend against
``mirror``, or the interpreter's exact fp8 dots) has nothing to calibrate and is marked
identical instead of flagged.

The gate's count (tolerance.count_allowance). Each gate record carries the number of output
elements that differ from the mirror at all (``metrics.mirror.differing``) and the model's
expected number (``tolerance.gate.differing_expected``). The count test allows
``tolerance.COUNT_RATE_SLACK`` = 4 times the modelled rates, so the pooled ratio observed /
expected of a row must stay within ``COUNT_RATIO_LIMIT`` = 4 either way: above, the count test
would fail correct kernels; below, it has lost that much sensitivity. A ratio is judged only where
it means something, counted in independent events, not elements: one rounding flip of a
requantized code moves a whole cluster of output elements together (tolerance.count_allowance's
``m_e``, up to K of them), so a count of 200 elements may be one event, and a model whose expected
count is mostly such rare clusters (p 0.08 per case of ~160 elements on the fp16 per-tensor fp8
cases an H200 runs on mma.sync tiles) reads a pooled ratio near 0 in most samples and 8x in a few,
whatever its accuracy. Each gate record carries the count's second moment under the model
(``tolerance.gate.differing_second_moment`` = sum p_d + sum_e p_e (m_e + m_e^2)); pooled over the
row's cases (independent), its dispersion ``phi = second moment / expected`` (>= 1; 1 for
independent single elements, a Poisson count) is the size of a typical event, so ``expected / phi``
is the number of independent events the model expects and ``observed / phi`` the number seen (a
quasi-Poisson reading). The ratio is judged high when the observed count holds at least
``MIN_FLIP_EVENTS`` events, low when the model expects at least that many: for a Poisson count
(phi = 1) that is the element rule, and with 20 events a 4x departure is never chance (a Poisson
count of mean 20 is <= 5 with probability 7e-5; one of mean 5 is >= 20 with probability 3e-6). A
record without the second moment (written before it existed) counts as phi = 1: its row is judged
by elements, as before. The gate's RMS is a sum over the same events, so a gate row whose count
expects under ``MIN_FLIP_EVENTS`` independent events is "few flips" too.

The flag is information for a person (printed and shown in the report), not a verdict:
``moe-validate calibrate --strict`` turns it into exit status 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from moe_validate.results import CaseRecord, ResultSet

__all__ = ["DEFAULT_BAND", "MIN_FLIP_EVENTS", "COUNT_RATIO_LIMIT", "ORACLES", "OracleStats", "CalibrationRow", "CalibrationTable",
           "calibrate", "case_element_count"]

DEFAULT_BAND: Tuple[float, float] = (0.2, 1.5)
MIN_FLIP_EVENTS = 20.0  # a gate row expecting fewer differing elements is not flagged (module docstring)
COUNT_RATIO_LIMIT = 4.0  # = tolerance.COUNT_RATE_SLACK (this module must not import torch)
# Oracle label -> the metrics key of its panel (results.py: metrics {"mirror": ..., "exact": ...}).
ORACLES: Tuple[Tuple[str, str], ...] = (("budget", "exact"), ("gate", "mirror"))
# Row order: SPEC vocabulary order (this module must not import moe_validate.contract.spec, which pulls in
# torch: the report imports it); unknown values sort after, alphabetically.
_SCHEME_ORDER = ("none", "fp8_block128", "fp8_channel_token", "fp8_tensor_token", "fp8_tensor_static",
                 "fp8_tensor_dynamic", "int8_channel_token", "int8_w8a16", "int4_w4a16")
_DTYPE_ORDER = ("fp32", "fp16", "bf16")


def _order(value: str, known: Sequence[str]) -> tuple:
    return (known.index(value), "") if value in known else (len(known), value)


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def case_element_count(record: Dict[str, Any], panel: Dict[str, Any]) -> int:
    """How many elements ``panel``'s ``z_rms`` averaged over (see the module docstring)."""
    params = record.get("params") or {}
    m, k = params.get("M"), params.get("K")
    if not (isinstance(m, int) and isinstance(k, int)):
        raise ValueError(f"case {record.get('case_id')!r}: params must hold integer M and K to weigh its z_rms; "
                         f"got M={m!r}, K={k!r}")
    census = panel.get("nan_inf") or {}
    excluded = int(census.get("ref_nan", 0)) + int(census.get("ref_inf", 0)) + int(panel.get("nan_where_ref_finite", 0))
    return max(0, m * k - excluded)


@dataclass
class OracleStats:
    """One oracle's pooled normalized error over the cases of a row."""

    oracle: str = "budget"  # "budget" or "gate": what an RMS above the band means differs
    cases: int = 0  # cases that contributed at least one element
    elements: int = 0
    sum_sq: float = 0.0  # sum over cases of n_i * z_rms_i^2
    z_max: float = 0.0
    case_rms_min: Optional[float] = None
    case_rms_max: Optional[float] = None
    # gate only: expected number of differing output elements (None: the model does not count
    # events, as for the budget, or a pooled record did not say)
    events: Optional[float] = None
    events_known: bool = True
    # gate only: output elements that differ from the mirror, observed and modelled (None: a
    # pooled record did not carry them)
    differing: Optional[int] = None
    differing_expected: Optional[float] = None
    differing_known: bool = True
    # gate only: the count's second moment under the model, pooled (None: some record did not carry it)
    differing_second_moment: Optional[float] = None
    second_moment_known: bool = True

    @property
    def z_rms(self) -> Optional[float]:
        return math.sqrt(self.sum_sq / self.elements) if self.elements else None

    def add(self, n: int, z_rms: float, z_max: float, events: Optional[float] = None,
            count: Optional[Tuple[int, float, Optional[float]]] = None) -> None:
        """Pool one case. ``count``: (observed, expected, second moment or None) of its differing elements."""
        if n <= 0:
            return
        if self.oracle == "gate":
            if events is None:
                self.events_known = False
            self.events = None if not self.events_known else (self.events or 0.0) + events
            if count is None:
                self.differing_known = False
            if self.differing_known:
                self.differing = (self.differing or 0) + count[0]
                self.differing_expected = (self.differing_expected or 0.0) + count[1]
            else:
                self.differing = self.differing_expected = None
            if count is None or count[2] is None:
                self.second_moment_known = False
            self.differing_second_moment = (None if not (self.differing_known and self.second_moment_known)
                                            else (self.differing_second_moment or 0.0) + count[2])
        self.cases += 1
        self.elements += n
        self.sum_sq += n * z_rms * z_rms
        self.z_max = max(self.z_max, z_max)
        self.case_rms_min = z_rms if self.case_rms_min is None else min(self.case_rms_min, z_rms)
        self.case_rms_max = z_rms if self.case_rms_max is None else max(self.case_rms_max, z_rms)

    @property
    def identical(self) -> bool:
        """Every pooled element equals the oracle (z = 0): a backend that is the oracle (the
        ``reference`` backend against ``mirror``), or the interpreter's exact dots. Nothing to
        calibrate, so no band flag."""
        return self.cases > 0 and self.z_max == 0.0

    @property
    def dispersion(self) -> float:
        """phi: differing elements per independent event, second moment / expected (module docstring);
        1 (each element its own event) where the records did not carry the second moment."""
        if not self.differing_second_moment or not self.differing_expected:
            return 1.0
        return max(1.0, self.differing_second_moment / self.differing_expected)

    @property
    def independent_events(self) -> Optional[float]:
        """The number of independent events the pooled model expects, expected / phi (gate only)."""
        return None if self.differing_expected is None else self.differing_expected / self.dispersion

    @property
    def recorded_events(self) -> Optional[float]:
        """``independent_events`` where every pooled record carried the second moment, else None."""
        return None if self.differing_second_moment is None else self.independent_events

    @property
    def few_events(self) -> bool:
        """A gate row whose model expects under ``MIN_FLIP_EVENTS`` differing elements, or under that
        many independent events: its RMS is counting noise, so it is not flagged (module docstring)."""
        if self.oracle != "gate":
            return False
        few_elements = self.events is not None and self.events < MIN_FLIP_EVENTS
        events = self.recorded_events
        return few_elements or (events is not None and events < MIN_FLIP_EVENTS)

    @property
    def count_ratio(self) -> Optional[float]:
        """Observed / modelled differing elements (gate only; None without both)."""
        if self.differing is None or not self.differing_expected:
            return None
        return self.differing / self.differing_expected

    def count_flag(self) -> Optional[str]:
        """None unless the observed count leaves the model by more than COUNT_RATIO_LIMIT with
        enough independent events to tell (module docstring)."""
        ratio = self.count_ratio
        if ratio is None:
            return None
        phi = self.dispersion
        per_event = f" ({phi:.3g} elements per independent event)" if phi > 1.0 else ""
        if self.differing / phi >= MIN_FLIP_EVENTS and ratio > COUNT_RATIO_LIMIT:
            return (f"count {self.differing} / expected {self.differing_expected:.3g} = {ratio:.3g} > "
                    f"{COUNT_RATIO_LIMIT:g}{per_event}: the flip model undercounts; the count test would fail "
                    "correct kernels")
        if self.differing_expected / phi >= MIN_FLIP_EVENTS and ratio < 1.0 / COUNT_RATIO_LIMIT:
            return (f"count {self.differing} / expected {self.differing_expected:.3g} = {ratio:.3g} < "
                    f"1/{COUNT_RATIO_LIMIT:g}{per_event}: the flip model overcounts; the count test lost that much "
                    "sensitivity")
        return None

    def flag(self, band: Tuple[float, float]) -> Optional[str]:
        """None inside the band (or when identical to the oracle, or too few flips expected to
        tell); otherwise which side and what it means."""
        rms = self.z_rms
        if rms is None or self.identical or self.few_events:
            return None
        if rms > band[1] and self.oracle == "gate":
            return (f"RMS {rms:.3g} > {band[1]:g}: the flip model undercounts the kernel's rounding flips "
                    "(the bound's hard flip terms use capped rates; the worst margin tells how close the gate is)")
        if rms > band[1]:
            return f"RMS {rms:.3g} > {band[1]:g}: the model underestimates the error (bounds too tight, flaky)"
        if rms < band[0]:
            return f"RMS {rms:.3g} < {band[0]:g}: the model is over {1 / band[0]:g}x conservative (bounds lose sensitivity)"
        return None

    def to_dict(self, band: Tuple[float, float]) -> Dict[str, Any]:
        return {"cases": self.cases, "elements": self.elements, "z_rms": self.z_rms, "z_max": self.z_max,
                "case_rms_min": self.case_rms_min, "case_rms_max": self.case_rms_max, "identical": self.identical,
                "events": self.events, "few_events": self.few_events, "flag": self.flag(band),
                "differing": self.differing, "differing_expected": self.differing_expected,
                "differing_second_moment": self.differing_second_moment,
                "independent_events": self.independent_events, "recorded_events": self.recorded_events,
                "count_ratio": self.count_ratio, "count_flag": self.count_flag()}


@dataclass
class CalibrationRow:
    scheme: str
    dtype: str
    # a GPU run's fp8 dots as the gate modelled them (tolerance.Bound.fp8_accumulation: "fp32",
    # "fp8 mma", "unreported"); None off a GPU and without fp8 dots. Its own row: pooled, the
    # fp8 MMA's many flips hid the fp32 tiles' few (docs/BOUNDS.md, session 10)
    accumulation: Optional[str] = None
    oracles: Dict[str, OracleStats] = field(default_factory=lambda: {name: OracleStats(name) for name, _ in ORACLES})
    failed: int = 0  # FAIL cases among those pooled (their errors are in the numbers)
    seeds: set = field(default_factory=set)

    @property
    def label(self) -> str:
        """The scheme, with the accumulator where the row has one: ``fp8_tensor_token/fp32``."""
        return self.scheme if self.accumulation is None else f"{self.scheme}/{self.accumulation}"

    def flags(self, band: Tuple[float, float]) -> List[str]:
        out = [f"{name}: {f}" for name, _ in ORACLES if (f := self.oracles[name].flag(band))]
        count = self.oracles["gate"].count_flag()
        return out + ([f"gate count: {count}"] if count else [])


@dataclass
class CalibrationTable:
    rows: List[CalibrationRow]
    band: Tuple[float, float] = DEFAULT_BAND
    ignored: int = 0  # case records without a usable metric panel (SKIP, CRASH, ...)
    # evaluated records (PASS or FAIL, with both panels) whose z is not a number: a model sigma that is
    # NaN somewhere. Not pooled, and a flag of their own: calibration cannot vouch for rows it lost
    not_a_number: List[str] = field(default_factory=list)

    @property
    def flagged(self) -> List[Tuple[Optional[CalibrationRow], str]]:
        lost = ([(None, f"{len(self.not_a_number)} evaluated case(s) with a z-score that is not a number (the "
                        f"model's sigma is NaN there: a bug), not pooled: {', '.join(self.not_a_number[:3])}"
                        + (" ..." if len(self.not_a_number) > 3 else ""))] if self.not_a_number else [])
        return [(row, f) for row in self.rows for f in row.flags(self.band)] + lost

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: what the report embeds."""
        return {
            "band": list(self.band), "ignored": self.ignored, "not_a_number": list(self.not_a_number),
            "rows": [{"scheme": r.scheme, "dtype": r.dtype, "accumulation": r.accumulation, "label": r.label,
                      "failed": r.failed, "seeds": len(r.seeds),
                      **{name: r.oracles[name].to_dict(self.band) for name, _ in ORACLES}} for r in self.rows],
        }

    def format(self) -> str:
        """A plain-text table: one line per (scheme, dtype), both oracles side by side."""
        def num(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.3g}"

        head = (f"{'scheme':<28} {'dtype':<5} {'cases':>5} {'elements':>9} | {'budget RMS':>10} {'max':>8} | "
                f"{'gate RMS':>8} {'max':>8} {'flips':>8} {'differ':>7} {'/model':>7} {'events':>7} | flag")
        lines = [f"normalized error z = |kernel - oracle| / sigma, pooled over cases and seeds; "
                 f"band for the RMS: [{self.band[0]:g}, {self.band[1]:g}] (SPEC: near 1; "
                 "see moe_validate/calibration.py for why); flips = differing output elements the gate's "
                 "model expects, events = the independent events they stand for (a requantized code's flip moves "
                 f"a cluster of elements; under {MIN_FLIP_EVENTS:g} of either: too few to calibrate)",
                 head, "-" * len(head)]
        for r in self.rows:
            b, g = r.oracles["budget"], r.oracles["gate"]
            notes = []
            for name, _ in ORACLES:
                stats = r.oracles[name]
                if stats.flag(self.band):
                    notes.append(f"{name} {'HIGH' if stats.z_rms > self.band[1] else 'LOW'}")
                elif stats.identical:
                    notes.append(f"{name} = oracle")
                elif stats.few_events:
                    notes.append(f"{name}: few flips")
            ratio = r.oracles["gate"].count_ratio
            if r.oracles["gate"].count_flag():
                notes.append(f"count {'HIGH' if ratio > 1 else 'LOW'}")
            elif ratio is not None and not 1.0 / COUNT_RATIO_LIMIT <= ratio <= COUNT_RATIO_LIMIT:
                notes.append("count: few events")
            flag = "; ".join(notes)
            if r.failed:
                flag = (flag + "; " if flag else "") + f"{r.failed} FAIL included"
            lines.append(f"{r.label:<28} {r.dtype:<5} {b.cases:>5} {b.elements:>9} | {num(b.z_rms):>10} "
                         f"{num(b.z_max):>8} | {num(g.z_rms):>8} {num(g.z_max):>8} {num(g.events):>8} "
                         f"{'-' if g.differing is None else g.differing:>7} {num(g.count_ratio):>7} "
                         f"{num(g.recorded_events):>7} "
                         f"| {flag or 'ok'}")
        if not self.rows:
            lines.append("(no evaluated case: nothing to calibrate)")
        if self.ignored:
            lines.append(f"{self.ignored} case record(s) without metrics (skipped, crashed, ...) are not pooled")
        lines += [f for row, f in self.flagged if row is None]
        return "\n".join(lines)


def _z_value(panel: Dict[str, Any], metric: str) -> Optional[float]:
    entry = panel.get(metric)
    value = entry.get("value") if isinstance(entry, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
        return None
    return float(value)


def _gate_bound(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The record's gate tolerance (``tolerance.gate``), or {} where it has none."""
    tol = rec.get("tolerance")
    gate = tol.get("gate") if isinstance(tol, dict) else None
    return gate if isinstance(gate, dict) else {}


def _expected_flips(rec: Dict[str, Any]) -> Optional[float]:
    """The gate's expected number of differing output elements, as its bound recorded it (or None)."""
    value = _gate_bound(rec).get("flip_events_expected")
    return float(value) if _finite_number(value) and value >= 0 else None


def _differing(rec: Dict[str, Any]) -> Optional[Tuple[int, float, Optional[float]]]:
    """(observed, modelled, the model's second moment or None) output elements differing from the
    mirror, as the record carries them."""
    gate, metrics = _gate_bound(rec), rec.get("metrics")
    expected, second = gate.get("differing_expected"), gate.get("differing_second_moment")
    panel = metrics.get("mirror") if isinstance(metrics, dict) else None
    observed = (panel.get("differing") or {}).get("value") if isinstance(panel, dict) else None
    if not (_finite_number(expected) and _finite_number(observed)) or expected < 0 or observed < 0:
        return None
    return int(observed), float(expected), float(second) if _finite_number(second) and second >= 0 else None


def _accumulation(rec: Dict[str, Any]) -> Optional[str]:
    """The gate's ``fp8_accumulation`` as the record carries it (None: none recorded)."""
    value = _gate_bound(rec).get("fp8_accumulation")
    return value if isinstance(value, str) else None


def _z_not_a_number(rec: Dict[str, Any]) -> bool:
    """An evaluated record (PASS or FAIL, both panels present) whose z_rms or z_max is NaN."""
    metrics = rec.get("metrics")
    if rec.get("outcome") not in ("PASS", "FAIL") or not isinstance(metrics, dict):
        return False
    panels = [metrics.get(key) for _, key in ORACLES]
    if not all(isinstance(p, dict) for p in panels):
        return False
    values = [(p.get(m) or {}).get("value") if isinstance(p.get(m), dict) else None
              for p in panels for m in ("z_rms", "z_max")]
    return any((isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.lower() == "nan") for v in values)


def _observations(rec: Dict[str, Any]) -> Optional[Dict[str, Tuple[int, float, float]]]:
    """{oracle: (elements, z_rms, z_max)} of a poolable record, else None."""
    if rec.get("outcome") not in ("PASS", "FAIL"):
        return None
    params, metrics = rec.get("params"), rec.get("metrics")
    if not isinstance(params, dict) or not isinstance(metrics, dict):
        return None
    if not all(isinstance(params.get(k), int) and not isinstance(params.get(k), bool) for k in ("M", "K")):
        return None
    out = {}
    for name, key in ORACLES:
        panel = metrics.get(key)
        if not isinstance(panel, dict):
            return None
        z_rms, z_max = _z_value(panel, "z_rms"), _z_value(panel, "z_max")
        if z_rms is None or z_max is None:
            return None
        out[name] = (case_element_count(rec, panel), z_rms, z_max)
    return out


def calibrate(results: Union[ResultSet, Iterable[Dict[str, Any]]], *,
              band: Tuple[float, float] = DEFAULT_BAND) -> CalibrationTable:
    """The calibration table of a result set (or of an iterable of case records).

    Rows are (scheme, dtype) from each record's ``params``, in SPEC order. PASS and FAIL records
    whose two panels carry ``z_rms`` and ``z_max`` (numbers, not NaN) and whose params carry
    integer ``M`` and ``K`` are pooled (a FAIL's errors are real observations; the row counts
    them so that a reader can tell a broken kernel from a drifting model); every other record
    (SKIP, CRASH, a panel from an older schema) is counted in ``ignored``, so that a report never
    fails over this table. An infinite z (an error where the model's sigma is zero) is pooled
    as it is: the row reads RMS inf and is flagged. Raises ValueError for a band that is not
    0 < low < high, TypeError for something that is not a ResultSet or records.
    """
    if not (isinstance(band, (tuple, list)) and len(band) == 2 and all(_finite_number(b) for b in band)
            and 0 < band[0] < band[1]):
        raise ValueError(f"band must be (low, high) with 0 < low < high; got {band!r}")
    band = (float(band[0]), float(band[1]))
    records = results.cases if isinstance(results, ResultSet) else results
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise TypeError(f"results must be a ResultSet or an iterable of case records; got {type(results).__name__}")
    rows: Dict[Tuple[str, str], CalibrationRow] = {}
    ignored = 0
    not_a_number: List[str] = []
    for rec in records:
        rec = rec.to_json() if isinstance(rec, CaseRecord) else rec  # a typed record: its JSON fields
        if not isinstance(rec, dict):
            raise TypeError(f"case records must be dicts; got {type(rec).__name__}")
        observed = _observations(rec)
        if observed is None:
            if _z_not_a_number(rec):
                not_a_number.append(str(rec.get("case_id")))
            else:
                ignored += 1
            continue
        params = rec["params"]
        key = (str(params.get("scheme", "none")), str(params.get("dtype", "?")), _accumulation(rec))
        row = rows.setdefault(key, CalibrationRow(*key))
        if rec["outcome"] == "FAIL":
            row.failed += 1
        if "seed" in params and any(n > 0 for n, _, _ in observed.values()):
            row.seeds.add(params["seed"])
        flips, count = _expected_flips(rec), _differing(rec)
        for name, (n, z_rms, z_max) in observed.items():
            if name == "gate":
                row.oracles[name].add(n, z_rms, z_max, flips, count)
            else:
                row.oracles[name].add(n, z_rms, z_max)
    ordered = sorted(rows.values(), key=lambda r: (_order(r.scheme, _SCHEME_ORDER), _order(r.dtype, _DTYPE_ORDER),
                                                   r.accumulation or ""))
    return CalibrationTable(rows=ordered, band=band, ignored=ignored, not_a_number=not_a_number)
