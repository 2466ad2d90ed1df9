"""Repetitions (``run --repeat N --fresh-seeds``) and the normalized-error calibration table.

The calibration numbers are pinned on hand-made records whose pooled RMS is computed by hand in
each test; one small real ``moe-validate calibrate`` runs two smoke cases over two seeds on the
reference backend (float64, no Triton programs: a few seconds on the CPU).
"""

import json
import math
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.calibration import DEFAULT_BAND, calibrate, case_element_count
from moe_validate.cli import main
from moe_validate.matrix import Case, suite_cases
from moe_validate.report import render_report
from moe_validate.results import ResultsWriter, load_results

HERE = Path(__file__).resolve().parent
SMOKE = suite_cases("smoke")
# Seeds 0 and 1 of the smoke suite: bf16 and fp16, both unquantized silu (tiny, M=7 K=64).
TWO = [c for c in SMOKE if c.seed in (0, 1)]


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# ---------------------------------------------------------------------------------------------
# Repetitions
# ---------------------------------------------------------------------------------------------
def test_fresh_seeds_give_distinct_valid_round_tripping_ids():
    cases = SMOKE[:12]
    repeated = runner.repeat_cases(cases, 3, fresh_seeds=True)
    assert len(repeated) == 36
    ids = [c.id for c in repeated]
    assert len(set(ids)) == 36, "an id repeats: results.jsonl would keep only its last record"
    # repetition-major; repetition 0 is the plain run, r adds r * stride to the seed
    assert [c.id for c in repeated[:12]] == [c.id for c in cases]
    for rep in range(3):
        for base, case in zip(cases, repeated[12 * rep: 12 * (rep + 1)]):
            assert case.seed == base.seed + rep * runner.REPEAT_SEED_STRIDE
            assert case.seed % 2 == base.seed % 2  # inputs.py reads the parity
            assert runner.repetition_of_seed(case.seed) == rep
            # everything but the seed is the original case
            assert Case.from_id(case.id) == case and case.is_valid() == (True, "")
            assert case.params() == {**base.params(), "seed": case.seed}


def test_repetitions_are_deterministic():
    first = [c.id for c in runner.repeat_cases(SMOKE, 2, fresh_seeds=True)]
    again = [c.id for c in runner.repeat_cases(list(SMOKE), 2, fresh_seeds=True)]
    assert first == again
    assert runner.fresh_seed(7, 3) == 3_000_007


def test_repeat_options_are_checked():
    assert runner.repeat_cases(TWO, 1, fresh_seeds=False) == TWO
    with pytest.raises(ValueError, match="needs fresh_seeds"):
        runner.repeat_cases(TWO, 2, fresh_seeds=False)
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        runner.repeat_cases(TWO, 0, fresh_seeds=True)
    with pytest.raises(TypeError, match="repeat must be an int"):
        runner.repeat_cases(TWO, 2.0, fresh_seeds=True)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 1000000\)"):
        runner.fresh_seed(runner.REPEAT_SEED_STRIDE, 1)
    with pytest.raises(ValueError, match="repetition must be >= 0"):
        runner.fresh_seed(1, -1)


def test_failures_are_grouped_by_repetition():
    ids = ["bf16-none-silu-M7N64K64E4k2-s1", "bf16-none-silu-M7N64K64E4k2-s2000001",
           "fp16-none-silu-M7N64K64E4k2-s2000003"]
    assert runner.failures_per_repetition(ids, 3) == [[ids[0]], [], ids[1:]]
    with pytest.raises(ValueError, match="beyond the 2 run"):
        runner.failures_per_repetition(ids, 2)
    with pytest.raises(ValueError, match="seed token"):
        runner.failures_per_repetition(["no-seed-here"], 1)


def test_run_repeat_writes_one_file_and_prints_failures_per_repetition(tmp_path, capsys):
    # fake_backends:Raise crashes on seed 1 only: repetition 0 has it, repetition 1 runs seed 1000001.
    out = tmp_path / "rep"
    code = main(["run", "--suite", "smoke", "--filter", "*M7N64K64E4k2-s[01]", "--backend", "fake_backends:Raise",
                 "--workers", "0", "--repeat", "2", "--fresh-seeds", "--out", str(out), "--no-report"])
    stdout = capsys.readouterr().out
    assert code == 1
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records].count("header") == 1
    header = records[0]
    assert header["repeat"] == 2 and header["fresh_seeds"] is True and header["case_count"] == 4
    case_ids = [r["case_id"] for r in records if r["kind"] == "case"]
    assert sorted(case_ids) == sorted(c.id for c in runner.repeat_cases(TWO, 2, fresh_seeds=True))
    assert len(load_results([out / "results.jsonl"]).cases) == 4  # nothing collapsed on reading
    assert "repetition 0: 1 not passing: fp16-none-silu-M7N64K64E4k2-s1" in stdout
    assert "repetition 1: 0 not passing" in stdout
    assert "stability: 1 not passing over 2 repetitions in 1 of them" in stdout


def test_run_repeat_without_fresh_seeds_is_a_usage_error(capsys):
    assert main(["run", "--suite", "smoke", "--filter", "seed=0", "--repeat", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --fresh-seeds" in err, err
    assert main(["run", "--suite", "smoke", "--filter", "seed=0", "--repeat", "0", "--fresh-seeds"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err


def test_a_repeated_case_id_reproduces(capsys):
    case = runner.repeat_cases([TWO[0]], 2, fresh_seeds=True)[1]
    assert case.seed == 1_000_000 + TWO[0].seed
    assert main(["repro", case.id, "--backend", "reference"]) == 0
    assert f"{case.id}: PASS" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Calibration on hand-made records
# ---------------------------------------------------------------------------------------------
def _panel(z_rms, z_max, ref_nan=0, ref_inf=0, nan_where_ref_finite=0):
    return {"z_rms": {"value": z_rms, "allowed": None, "margin": None},
            "z_max": {"value": z_max, "allowed": None, "margin": None},
            "nan_inf": {"kernel_nan": nan_where_ref_finite, "kernel_inf": 0, "ref_nan": ref_nan, "ref_inf": ref_inf},
            "nan_where_ref_finite": nan_where_ref_finite}


def _record(case_id, scheme, dtype, M, K, budget, gate, outcome="PASS", seed=0, flips=None):
    """``flips``: the gate model's expected number of differing output elements (None: not recorded)."""
    rec = {"kind": "case", "case_id": case_id, "outcome": outcome, "reason": None, "duration_s": 0.0,
           "backend": "hand", "params": {"scheme": scheme, "dtype": dtype, "M": M, "K": K, "seed": seed},
           "metrics": {"exact": budget, "mirror": gate}}
    if flips is not None:
        rec["tolerance"] = {"gate": {"name": "gate", "flip_events_expected": flips}, "budget": {"name": "budget"}}
    return rec


HAND = [
    # bf16/none: 6 elements at RMS 1 and 2 at RMS 3 -> sqrt((6*1 + 2*9) / 8) = sqrt(3)
    # (gate: 15 + 10 flips expected -> 25 >= MIN_FLIP_EVENTS, judged)
    _record("a", "none", "bf16", 2, 3, _panel(1.0, 2.0), _panel(0.5, 1.0), seed=0, flips=15.0),
    _record("b", "none", "bf16", 1, 2, _panel(3.0, 4.0), _panel(0.5, 3.0), seed=1, flips=10.0),
    # fp8_block128/bf16: 2x3 outputs, one reference NaN and one kernel NaN where finite -> 4 elements
    _record("c", "fp8_block128", "bf16", 2, 3, _panel(0.1, 0.3, ref_nan=1, nan_where_ref_finite=1),
            _panel(0.0, 0.0), outcome="FAIL", seed=2),
    # none/fp16 sorts before none/bf16 (SPEC dtype order fp32, fp16, bf16)
    _record("d", "none", "fp16", 4, 1, _panel(0.8, 1.5), _panel(20.0, 50.0), seed=3, flips=40.0),
    # int4_w4a16/bf16: a gate RMS far out of band, but the model expects 2.5 flips: too few to judge
    _record("i", "int4_w4a16", "bf16", 2, 2, _panel(0.5, 1.0), _panel(9.0, 18.0), seed=5, flips=2.5),
    # empty output: no elements, the row exists but has no RMS
    _record("e", "int8_w8a16", "bf16", 0, 8, _panel(0.0, 0.0), _panel(0.0, 0.0), seed=4),
    # not poolable: skipped, crashed, an old panel without z-scores
    {"kind": "case", "case_id": "f", "outcome": "SKIP", "params": {"M": 1, "K": 1}, "metrics": None},
    {"kind": "case", "case_id": "g", "outcome": "CRASH", "params": {"M": 1, "K": 1}, "metrics": None},
    _record("h", "none", "bf16", 1, 1, {"max_abs": {"value": 0.0}}, {"max_abs": {"value": 0.0}}),
]


def test_pooled_rms_is_element_weighted():
    table = calibrate(HAND)
    assert [(r.scheme, r.dtype) for r in table.rows] == [
        ("none", "fp16"), ("none", "bf16"), ("fp8_block128", "bf16"), ("int8_w8a16", "bf16"), ("int4_w4a16", "bf16")]
    assert table.ignored == 3
    fp16, bf16, fp8, int8, int4 = table.rows
    b = bf16.oracles["budget"]
    assert (b.cases, b.elements) == (2, 8)
    assert b.z_rms == pytest.approx(math.sqrt(3.0), rel=1e-12)
    assert b.z_max == 4.0 and (b.case_rms_min, b.case_rms_max) == (1.0, 3.0)
    assert bf16.oracles["gate"].z_rms == pytest.approx(0.5, rel=1e-12) and bf16.oracles["gate"].z_max == 3.0
    assert bf16.seeds == {0, 1} and bf16.failed == 0
    assert case_element_count(HAND[2], HAND[2]["metrics"]["exact"]) == 4
    assert fp8.oracles["budget"].elements == 4 and fp8.oracles["budget"].z_rms == pytest.approx(0.1)
    assert fp8.failed == 1
    assert int8.oracles["budget"].cases == 0 and int8.oracles["budget"].z_rms is None
    assert int8.seeds == set()  # an empty output is no sample
    # the gate's expected flips add up over cases; a record without them makes the row's count unknown
    assert bf16.oracles["gate"].events == 25.0 and fp16.oracles["gate"].events == 40.0
    assert int4.oracles["gate"].events == 2.5 and fp8.oracles["gate"].events is None
    assert bf16.oracles["budget"].events is None  # the budget's model counts no events


def test_flags_follow_the_band():
    table = calibrate(HAND)
    fp16, bf16, fp8, int8, int4 = table.rows
    assert table.band == DEFAULT_BAND == (0.2, 1.5)
    # sqrt(3) = 1.73 > 1.5: too tight; 20 > 1.5; 0.1 < 0.2: too loose; 0.5 and 0.8 inside
    assert "underestimates" in bf16.oracles["budget"].flag(table.band)
    assert bf16.oracles["gate"].flag(table.band) is None
    assert fp16.oracles["budget"].flag(table.band) is None
    # a gate above the band: the flip model undercounts flips (the bound's hard terms use capped rates)
    assert "undercounts the kernel's rounding flips" in fp16.oracles["gate"].flag(table.band)
    # RMS 9, but 2.5 expected flips (< MIN_FLIP_EVENTS): counting noise, not judged
    assert int4.oracles["gate"].few_events and int4.oracles["gate"].flag(table.band) is None
    assert "conservative" in fp8.oracles["budget"].flag(table.band)
    # z = 0 everywhere: identical to the oracle, not "too conservative"
    assert fp8.oracles["gate"].identical and fp8.oracles["gate"].flag(table.band) is None
    assert int8.oracles["budget"].flag(table.band) is None  # nothing pooled
    assert len(table.flagged) == 3
    # a wider band clears every flag
    assert calibrate(HAND, band=(0.05, 25.0)).flagged == []
    text = table.format()
    assert "budget HIGH" in text and "gate HIGH" in text and "budget LOW" in text and "gate = oracle" in text
    assert "1 FAIL included" in text and "3 case record(s) without metrics" in text
    assert "gate: few flips" in text.splitlines()[-2]  # the int4 row, before the ignored-records line


def test_an_infinite_z_is_pooled_and_flagged():
    rec = _record("x", "none", "bf16", 1, 4, _panel(math.inf, math.inf), _panel(1.0, 1.0))
    row = calibrate([rec]).rows[0]
    assert row.oracles["budget"].z_rms == math.inf and row.oracles["budget"].flag(DEFAULT_BAND)


@pytest.mark.parametrize("band", [(0.0, 1.0), (1.5, 0.2), (0.2,), (0.2, math.inf), "0.2,1.5"])
def test_bad_band_is_a_value_error(band):
    with pytest.raises(ValueError, match="band must be"):
        calibrate(HAND, band=band)


def test_bad_results_are_type_errors():
    with pytest.raises(TypeError, match="ResultSet or an iterable"):
        calibrate({"kind": "case"})
    with pytest.raises(TypeError, match="case records must be dicts"):
        calibrate(["a"])


def test_report_shows_the_calibration_table(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.write({"kind": "header", "run_id": "r", "suite": "hand", "backend": "hand", "shard": None,
                      "argv": [], "env": {}})
        for rec in HAND:
            writer.write(rec)
    html = render_report(load_results([path]), tmp_path / "report.html").read_text()
    assert '<section id="calibration">' in html and 'href="#calibration"' in html
    table = html[html.index('id="calibration-table"'):html.index("</table>", html.index('id="calibration-table"'))]
    rows = table.split("<tr data-scheme=")[1:]
    assert [r.split(">")[0] for r in rows] == ['"none" data-dtype="fp16" class="calibration-flagged"',
                                                '"none" data-dtype="bf16" class="calibration-flagged"',
                                                '"fp8_block128" data-dtype="bf16" class="calibration-flagged"',
                                                '"int8_w8a16" data-dtype="bf16"',
                                                '"int4_w4a16" data-dtype="bf16"']
    assert ">1.73<" in rows[1] and "cal-high" in rows[1]  # sqrt(3), three significant digits
    assert ">25<" in rows[1]  # the gate's expected flips, 15 + 10
    assert ">9<" in rows[4] and "cal-high" not in rows[4] and "too few flips (or independent events) expected" in rows[4]
    assert ">0.1<" in rows[2] and "cal-low" in rows[2] and "identical to the oracle" in rows[2]
    assert "1 FAIL case(s) included" in rows[2]
    assert "3 case record(s) without metrics" in html


def test_report_without_evaluated_cases_has_no_calibration_section(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.write(next(r for r in HAND if r["outcome"] == "SKIP"))
    html = render_report(load_results([path]), tmp_path / "report.html").read_text()
    assert 'id="calibration"' not in html


# ---------------------------------------------------------------------------------------------
# A real calibrate run
# ---------------------------------------------------------------------------------------------
def test_calibrate_command_on_two_smoke_cases(tmp_path, capsys):
    out = tmp_path / "cal"
    code = main(["calibrate", "--suite", "smoke", "--filter", "*M7N64K64E4k2-s[01]", "--seeds", "2",
                 "--backend", "reference", "--workers", "0", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    results = load_results([out / "results.jsonl"])
    assert sorted(c["case_id"] for c in results.cases) == sorted(
        c.id for c in runner.repeat_cases(TWO, 2, fresh_seeds=True))
    assert results.headers[0]["calibration"] is True and results.headers[0]["repeat"] == 2
    table = calibrate(results)
    assert [(r.scheme, r.dtype) for r in table.rows] == [("none", "fp16"), ("none", "bf16")]
    for row in table.rows:
        assert row.seeds == {c.seed for c in runner.repeat_cases(TWO, 2, fresh_seeds=True) if c.dtype == row.dtype}
        budget, gate = row.oracles["budget"], row.oracles["gate"]
        assert (budget.cases, budget.elements) == (2, 2 * 7 * 64)
        # The reference backend returns the mirror oracle itself: the gate difference is exactly 0.
        assert gate.identical
        # The budget compares mirror (rounded where the kernel stores) with exact: the real
        # calibration check of SPEC ("near 1"). About 0.5 is measured here; the band is why
        # this is acceptable (calibration.py).
        assert DEFAULT_BAND[0] <= budget.z_rms <= DEFAULT_BAND[1], table.format()
    assert "stability: 0 not passing over 2 repetitions (stable)" in stdout
    assert table.format() in stdout
    html = (out / "report.html").read_text()
    assert 'id="calibration-table"' in html


def test_calibrate_strict_exits_1_on_an_out_of_band_row(tmp_path, capsys):
    # fp32 on the reference backend: its mirror accumulates in float64, while the budget's sigma
    # models fp32 accumulation (typical: 0.3 u sqrt(BK + K/BK) s), so the sigma is larger than the
    # mirror's real error and the row reads below 0.2 (0.11 measured; the Triton kernel, which does
    # accumulate in fp32, reads 0.47 on the smoke suite's fp32 cases): a true LOW for this backend.
    argv = ["calibrate", "--suite", "smoke", "--filter", "fp32-none-silu-M7N64K64E4k2-s2", "--seeds", "1",
            "--backend", "reference", "--workers", "0", "--no-report"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0  # printed, not a verdict
    assert "budget LOW" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "b"), "--strict"]) == 1
    assert "budget LOW" in capsys.readouterr().out
    assert not (tmp_path / "b" / "report.html").exists()
    # the same table from the records, without running: a nightly's results pooled afterwards
    recorded = [str(tmp_path / "a" / "results.jsonl")]
    assert main(["calibrate", "--from", *recorded]) == 0
    assert "budget LOW" in capsys.readouterr().out
    assert main(["calibrate", "--strict", "--from", *recorded]) == 1
    assert main(["calibrate", "--from", *recorded, "--seeds", "3"]) == 2  # a run's option
    assert "--seeds only apply to a calibration run" in capsys.readouterr().err


def test_calibrate_from_records_without_an_evaluated_case_is_not_a_pass_under_strict(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.write(next(r for r in HAND if r["outcome"] == "SKIP"))
    assert main(["calibrate", "--from", str(path)]) == 0
    assert main(["calibrate", "--from", str(path), "--strict"]) == 1
    assert "nothing calibrated" in capsys.readouterr().err


def test_first_repetition_continues_a_stability_run_with_new_seeds(tmp_path, capsys):
    """--first-repetition 1 --repeat 2 runs repetitions 1 and 2 (seeds +1e6, +2e6), never
    repetition 0's seeds again, and reports the repetitions by their own numbers."""
    assert [c.seed for c in runner.repeat_cases(TWO, 2, fresh_seeds=True, first=1)] == \
        [c.seed + k * 1_000_000 for k in (1, 2) for c in TWO]
    with pytest.raises(ValueError, match="needs fresh_seeds"):
        runner.repeat_cases(TWO, 1, fresh_seeds=False, first=1)
    out = tmp_path / "rep"
    code = main(["run", "--suite", "smoke", "--filter", "*M7N64K64E4k2-s[01]", "--backend", "fake_backends:Raise",
                 "--workers", "0", "--repeat", "2", "--fresh-seeds", "--first-repetition", "1", "--out", str(out),
                 "--no-report"])
    stdout = capsys.readouterr().out
    assert code == 0  # Raise crashes on seed 1 only, which is repetition 0's
    assert "repetition 1: 0 not passing" in stdout and "repetition 2: 0 not passing" in stdout
    assert "repetition 0" not in stdout and "stability: 0 not passing over 2 repetitions (stable)" in stdout
    assert main(["run", "--suite", "smoke", "--filter", "seed=0", "--first-repetition", "-1", "--fresh-seeds"]) == 2
    assert "--first-repetition must be >= 0" in capsys.readouterr().err


def _gate_count_record(seed: int, differing: int, expected: float, second_moment=None, z_rms=1.0) -> dict:
    panel = {"z_rms": {"value": 1.0}, "z_max": {"value": 2.0}, "nan_inf": {}, "nan_where_ref_finite": 0}
    gate = {"flip_events_expected": 100.0, "differing_expected": expected}
    if second_moment is not None:
        gate["differing_second_moment"] = second_moment
    return {"case_id": f"bf16-none-silu-M7N64K64E4k2-s{seed}", "outcome": "PASS",
            "params": {"M": 7, "K": 64, "scheme": "none", "dtype": "bf16", "seed": seed},
            "metrics": {"exact": dict(panel), "mirror": {**panel, "z_rms": {"value": z_rms},
                                                         "differing": {"value": differing}}},
            "tolerance": {"gate": gate}}


@pytest.mark.parametrize("observed, expected, flagged", [
    (30, 30.0, None),  # on the model
    (100, 30.0, None),  # 3.3x: inside the count test's slack
    (130, 30.0, "HIGH"),  # 4.3x: the count test would fail correct kernels
    (5, 30.0, "LOW"),  # 1/6: the count test lost that much sensitivity
    (0, 10.0, None),  # too few expected to call it low
    (10, 1.0, None),  # too few observed to call it high
])
def test_calibration_pools_the_gate_count_and_flags_it_beyond_the_slack(observed, expected, flagged):
    from moe_validate import tolerance
    from moe_validate.calibration import COUNT_RATIO_LIMIT

    assert COUNT_RATIO_LIMIT == tolerance.COUNT_RATE_SLACK  # the count test allows what calibration checks
    # two cases of one row: the counts add up
    records = [_gate_count_record(1, observed // 2, expected / 2), _gate_count_record(2, observed - observed // 2, expected / 2)]
    table = calibrate(records)
    gate = table.rows[0].oracles["gate"]
    assert gate.differing == observed and gate.differing_expected == pytest.approx(expected)
    assert gate.count_ratio == pytest.approx(observed / expected)
    flags = table.rows[0].flags(table.band)
    if flagged is None:
        assert not flags, flags
    else:
        assert len(flags) == 1 and flags[0].startswith("gate count:"), flags
        assert f"count {flagged}" in table.format()


@pytest.mark.parametrize("observed, expected, second_moment, flagged", [
    # the fp16 fp8_tensor_static rows of an H200 nightly: ~7 direct flips and p 0.08 of one cluster of
    # ~160 elements per case, so the expected 20.7 per case is mostly a rare event; 0 clusters seen
    (11, 5 * 20.7, 5 * (7.4 + 0.083 * (160 + 160 ** 2)), None),
    (4 * 202, 5 * 20.7, 5 * (7.4 + 0.083 * (160 + 160 ** 2)), None),  # a cluster in every case: still chance
    (5, 30.0, 30.0, "LOW"),  # a Poisson count (second moment = mean): judged by elements, as before
    (130, 30.0, 30.0, "HIGH"),
    (5, 600.0, 6000.0, "LOW"),  # 10 elements per event, 60 events expected, ~0.5 seen
    (2500, 600.0, 6000.0, "HIGH"),  # 250 events seen where 60 were expected
    (300, 50.0, 5000.0, None),  # 100 per event: 3 seen, 0.5 expected; too few to tell
])
def test_calibration_judges_the_count_by_independent_events(observed, expected, second_moment, flagged):
    records = [_gate_count_record(1, observed // 2, expected / 2, second_moment / 2),
               _gate_count_record(2, observed - observed // 2, expected / 2, second_moment / 2)]
    table = calibrate(records)
    gate = table.rows[0].oracles["gate"]
    assert gate.differing_second_moment == pytest.approx(second_moment)
    assert gate.independent_events == pytest.approx(expected ** 2 / second_moment)
    flags = table.rows[0].flags(table.band)
    text = table.format()
    if flagged is None:
        assert not flags, flags
        ratio = observed / expected
        if not 0.25 <= ratio <= 4:
            assert "count: few events" in text
    else:
        assert len(flags) == 1 and flags[0].startswith("gate count:"), flags
        assert f"count {flagged}" in text


def test_a_gate_rms_over_few_independent_events_is_not_judged():
    # the same rare clusters carry the z-scores' variance: an RMS of 0.03 there is chance, not a model off
    # 30x; a record without the second moment keeps the element rule (judged)
    few = [_gate_count_record(s, 3, 20.7, 7.4 + 0.083 * (160 + 160 ** 2), z_rms=0.03) for s in range(5)]
    table = calibrate(few)
    assert table.rows[0].oracles["gate"].few_events and not table.flagged
    assert "gate: few flips" in table.format()
    old = [_gate_count_record(s, 3, 20.7, None, z_rms=0.03) for s in range(5)]
    assert [f.split(":")[0] for _, f in calibrate(old).flagged] == ["gate", "gate count"]  # RMS 0.03, count 0.145
    mixed = calibrate(few[:4] + old[:1]).rows[0].oracles["gate"]  # one record without it: the row cannot tell
    assert mixed.differing_second_moment is None and mixed.independent_events == pytest.approx(mixed.differing_expected)


def test_the_report_shows_the_count_calibration(tmp_path):
    from moe_validate.report.model import _calibration_view

    class Rec:
        def __init__(self, d):
            self.d = d

        def to_json(self):
            return self.d

    view = _calibration_view([Rec(_gate_count_record(s, 1, 30.0, 30.0)) for s in (1, 2)])
    row = view.rows[0]
    assert row["count"]["flag"] and row["count"]["side"] == "low" and view.flagged == 1
    assert row["count"]["differing"] == 2 and row["count"]["events"] != "-"


def test_a_record_whose_z_is_not_a_number_is_named_and_flagged_not_silently_dropped():
    # the records store a NaN z as the string "NaN" (results.py); such a case was evaluated, so its
    # row lost data: calibrate says which, and --strict fails on it
    good = _gate_count_record(1, 30, 30.0, 30.0)
    lost = _gate_count_record(2, 30, 30.0, 30.0)
    lost["metrics"]["mirror"]["z_rms"] = {"allowed": None, "margin": None, "value": "NaN"}
    skipped = {"case_id": "x", "outcome": "SKIP", "params": {}}
    table = calibrate([good, lost, skipped])
    assert table.ignored == 1 and table.not_a_number == [lost["case_id"]]
    assert [row for row, _ in table.flagged] == [None]
    assert "not a number" in table.format() and lost["case_id"] in table.format()
    assert table.to_dict()["not_a_number"] == [lost["case_id"]]


def test_rows_are_split_by_the_fp8_accumulator_the_gate_modelled():
    # pooled, the fp8 MMA's many flips hid the fp32 tiles' few (docs/BOUNDS.md, session 10)
    wide, narrow, plain = (_gate_count_record(s, 300, 300.0, 300.0) for s in (1, 2, 3))
    for rec, unit in ((wide, "fp8 mma"), (narrow, "fp32")):
        rec["params"]["scheme"] = "fp8_tensor_token"
        rec["tolerance"]["gate"]["fp8_accumulation"] = unit
    plain["params"]["scheme"] = "fp8_tensor_token"  # a CPU run: no accumulator recorded
    table = calibrate([wide, narrow, plain])
    assert [(r.scheme, r.accumulation) for r in table.rows] == [
        ("fp8_tensor_token", None), ("fp8_tensor_token", "fp32"), ("fp8_tensor_token", "fp8 mma")]
    assert "fp8_tensor_token/fp32" in table.format()
    assert [r["label"] for r in table.to_dict()["rows"]] == ["fp8_tensor_token", "fp8_tensor_token/fp32",
                                                             "fp8_tensor_token/fp8 mma"]
