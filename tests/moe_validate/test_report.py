"""Unit tests of the report's view model, baseline diff and rendered HTML (no browser)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from moe_validate.report import DRIFT_FACTOR, DRIFT_MIN_MARGIN, RunDiff, diff_runs, format_diff, render_report
from moe_validate.report.model import build_model, pivot, worst_cases
from moe_validate.report.render import embed_json
from moe_validate.results import Outcome, ResultsError, ResultSet, load_results

_SYNTH_PATH = Path(__file__).resolve().parents[1] / "e2e" / "synth_results.py"
_spec = importlib.util.spec_from_file_location("report_synth_results", _SYNTH_PATH)
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML namespace name the page script uses; never fetched
DATA_RE = re.compile(r'<script id="report-data" type="application/json">(.*?)</script>', re.S)


def _case(case_id, outcome, margin=None, *, reason=None, error=None, **params):
    return {"kind": "case", "case_id": case_id, "outcome": outcome, "worst_margin": margin, "reason": reason,
            "error": error, "params": params, "duration_s": 0.5, "repro": f"moe-validate repro {case_id}"}


def _result_set(cases, env=None, complete=True, expected=None):
    header = {"kind": "header", "run_id": "r", "suite": "smoke", "env": env or dict(synth.ENV),
              "expected_cases": expected}
    return ResultSet(headers=[header], cases=sorted(cases, key=lambda c: c["case_id"]),
                     footers=[{"kind": "footer", "duration_s": 3.0, "finished": "t"}] if complete else [])


def _payload(html: str):
    match = DATA_RE.search(html)
    assert match, "the report must embed its data in <script id=report-data>"
    return json.loads(match.group(1))


# ---------------------------------------------------------------------------------------------
# Summary counts, worst margins
# ---------------------------------------------------------------------------------------------
def test_summary_counts_match_the_jsonl_records(tmp_path):
    paths = synth.write_run(tmp_path, 400, fail_rate=0.05, bad_rate=0.02, skip_rate=0.1, seed=3)
    expected = {o.value: 0 for o in Outcome}
    for line in paths[0].read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "case":
            expected[rec["outcome"]] += 1
    model = build_model(load_results(paths))
    assert model.summary.counts == expected
    assert model.summary.total == 400
    assert model.summary.bad == sum(n for o, n in expected.items() if Outcome(o).is_bad) > 0
    assert model.summary.verdict == "FAILED"
    table = model.payload["table"]
    assert len(table["ids"]) == 400
    # The table's outcome column holds the same counts (the page counts it to label its filters).
    outcomes = model.payload["outcomes"]
    assert {o: sum(1 for k in table["outcome"] if outcomes[k] == o) for o in outcomes} == expected
    # Details only for non-passing, non-skipped cases: the heavy part of the page.
    assert len(model.payload["details"]) == model.summary.bad


def test_worst_margins_rank_nan_first_and_ignore_cases_without_margin():
    cases = [_case("a", "PASS", 0.5), _case("b", "FAIL", 3.0), _case("c", "FAIL", float("nan")),
             _case("d", "CRASH", None), _case("e", "PASS", 0.9), _case("f", "FAIL", float("inf"))]
    ranked = worst_cases(cases, limit=10)
    assert [w.case_id for w in ranked] == ["c", "f", "b", "e", "a"]
    assert ranked[0].margin_text == "NaN" and ranked[1].margin_text == "inf"
    assert [w.case_id for w in worst_cases(cases, limit=2)] == ["c", "f"]


def test_skip_reasons_are_counted_and_shown(tmp_path):
    cases = [_case("s1", "SKIP", reason="fp8 needs sm89+; device is sm80"),
             _case("s2", "SKIP", reason="fp8 needs sm89+; device is sm80"),
             _case("s3", "SKIP", reason=None), _case("p", "PASS", 0.1)]
    model = build_model(_result_set(cases))
    assert model.summary.skip_reasons == [("fp8 needs sm89+; device is sm80", 2), ("(no reason recorded)", 1)]
    html = render_report(_result_set(cases), tmp_path / "r.html").read_text()
    assert "fp8 needs sm89+; device is sm80" in html
    table = _payload(html)["table"]
    assert table["reasons"][table["reason"][table["ids"].index("s1")]] == "fp8 needs sm89+; device is sm80"


# ---------------------------------------------------------------------------------------------
# Pivot
# ---------------------------------------------------------------------------------------------
def test_pivot_cells_count_outcomes_and_keep_the_worst_measured_margin():
    cases = [
        _case("1", "PASS", 0.2, scheme="none", activation="silu"),
        _case("2", "FAIL", 4.0, scheme="none", activation="silu"),
        _case("3", "SKIP", 99.0, scheme="none", activation="silu"),  # a skip measured nothing
        _case("4", "PASS", 0.7, scheme="fp8_block128", activation="silu"),
        _case("5", "CRASH", None, scheme="fp8_block128", activation="silu"),
        _case("6", "PASS", float("nan"), scheme="fp8_block128", activation="gelu"),
        _case("7", "PASS", 0.1, scheme="fp8_block128", activation="gelu"),
        _case("8", "PASS", 0.1, scheme="none"),  # lacks the activation axis: not in this pivot
    ]
    cells = pivot(cases, "scheme", "activation")
    assert set(cells) == {("none", "silu"), ("fp8_block128", "silu"), ("fp8_block128", "gelu")}
    none_silu = cells[("none", "silu")]
    assert (none_silu.counts["PASS"], none_silu.counts["FAIL"], none_silu.counts["SKIP"]) == (1, 1, 1)
    assert none_silu.total == 3 and none_silu.worst_margin == 4.0 and none_silu.status == "FAIL"
    fp8_silu = cells[("fp8_block128", "silu")]
    assert fp8_silu.counts["CRASH"] == 1 and fp8_silu.status == "CRASH" and fp8_silu.worst_margin == 0.7
    assert math.isnan(cells[("fp8_block128", "gelu")].worst_margin)
    with pytest.raises(ValueError, match="two different axis names"):
        pivot(cases, "scheme", "scheme")


def test_embedded_pivots_equal_the_pivot_function_for_every_axis_pair(tmp_path):
    rs = load_results(synth.write_run(tmp_path, 600, fail_rate=0.1, skip_rate=0.1, seed=5))
    model = build_model(rs)
    piv = model.payload["pivot"]
    assert piv["default"] == ["scheme", "activation"]
    assert {"dtype", "scheme", "activation", "lora", "M", "seed"} <= set(piv["axes"])
    outcomes = model.payload["outcomes"]
    axes = {a["name"]: a["values"] for a in model.payload["axes"]}
    for key, rows in piv["cells"].items():
        a, b = key.split("|")
        expected = pivot(rs.cases, a, b)
        got = {(axes[a][r[0]], axes[b][r[1]]): r for r in rows}
        assert set(got) == set(expected), key
        for cell_key, row in got.items():
            assert row[2:2 + len(outcomes)] == [expected[cell_key].counts[o] for o in outcomes]
            want = expected[cell_key].worst_margin
            assert (row[-1] is None) if want is None else row[-1] == pytest.approx(want, rel=1e-2)
    # Axis values come in SPEC order, not alphabetical.
    assert axes["dtype"] == ["fp32", "fp16", "bf16"]
    assert axes["lora"] == ["none", "single", "dual"]


# ---------------------------------------------------------------------------------------------
# Baseline diff
# ---------------------------------------------------------------------------------------------
def _diff_fixture():
    old = [
        _case("pass-to-fail", "PASS", 0.3), _case("skip-to-crash", "SKIP"),
        _case("fail-to-pass", "FAIL", 3.0), _case("drift", "PASS", 0.2),
        _case("small-growth", "PASS", 0.01), _case("below-factor", "PASS", 0.4),
        _case("pass-to-skip", "PASS", 0.2), _case("fail-to-crash", "FAIL", 2.0),
        _case("zero-before", "PASS", 0.0), _case("removed", "PASS", 0.1), _case("same", "PASS", 0.5),
    ]
    new = [
        _case("pass-to-fail", "FAIL", 2.5, reason="mirror max_abs 0.05 > 0.02"), _case("skip-to-crash", "CRASH"),
        _case("fail-to-pass", "PASS", 0.5), _case("drift", "PASS", 0.2 * DRIFT_FACTOR * 1.01 + 0.3),
        _case("small-growth", "PASS", 0.04), _case("below-factor", "PASS", 0.4 * DRIFT_FACTOR * 0.99),
        _case("pass-to-skip", "SKIP"), _case("fail-to-crash", "CRASH"),
        _case("zero-before", "PASS", DRIFT_MIN_MARGIN), _case("added", "FAIL", 5.0), _case("same", "PASS", 0.5),
    ]
    old_env = dict(synth.ENV)
    new_env = dict(synth.ENV, driver="565.57.01", triton="3.7.0")
    # The new run was not asked to run "removed" (its expected list): removed, not missing.
    return (_result_set(old, env=old_env, expected=[c["case_id"] for c in old]),
            _result_set(new, env=new_env, expected=[c["case_id"] for c in new]))


def test_diff_classifies_new_failures_fixes_drift_and_changes():
    old, new = _diff_fixture()
    diff = diff_runs(old, new)
    ids = lambda changes: [c.case_id for c in changes]  # noqa: E731
    assert ids(diff.new_failures) == ["pass-to-fail", "skip-to-crash"]
    assert ids(diff.fixes) == ["fail-to-pass"]
    # 0.01 -> 0.04 grows 4x but stays under the floor; 0.4 -> 0.59 is under the factor.
    assert ids(diff.drift) == ["drift", "zero-before"]
    assert ids(diff.outcome_changes) == ["fail-to-crash", "pass-to-skip"]
    assert ids(diff.added) == ["added"] and ids(diff.removed) == ["removed"]
    assert diff.missing == [] and not diff.incomplete
    assert [(e.key, e.old, e.new) for e in diff.env_changes] == [
        ("driver", "560.35.03", "565.57.01"), ("triton", "3.6.0", "3.7.0")]
    assert diff.has_regressions
    assert diff.new_failures[0].reason == "mirror max_abs 0.05 > 0.02"
    assert diff.drift[0].growth == pytest.approx((0.2 * DRIFT_FACTOR * 1.01 + 0.3) / 0.2)
    assert diff.status_by_case()["pass-to-fail"] == "new failure"
    assert "same" not in diff.status_by_case()


def test_format_diff_names_every_section_and_the_verdict():
    diff = diff_runs(*_diff_fixture())
    text = format_diff(diff)
    for needle in ("new failures: 2", "fixes: 1", "drift (worst margin grew > x1.5", "other outcome changes: 2",
                   "added cases: 1", "removed cases (not selected by the new run): 1", "driver: 560.35.03 -> 565.57.01",
                   "pass-to-fail: PASS 0.3 -> FAIL 2.5", "verdict: REGRESSED"):
        assert needle in text, needle
    same = diff_runs(_diff_fixture()[0], _diff_fixture()[0])
    assert isinstance(same, RunDiff) and not same.has_regressions
    assert "environment: same" in format_diff(same) and "verdict: no regressions" in format_diff(same)


def test_missing_cases_and_unfinished_runs_make_the_comparison_incomplete():
    old, new = _diff_fixture()
    ids = [c.case_id for c in old.cases]
    # Killed after 4 of its cases: the rest are missing, never "removed" and never "no regressions".
    killed = _result_set([c.to_json() for c in old.cases[:4]], complete=False, expected=ids)
    diff = diff_runs(old, killed)
    assert [c.case_id for c in diff.missing] == sorted(ids[4:]) and diff.removed == []
    assert diff.incomplete and diff.new_unfinished == 1 and not diff.has_regressions
    text = format_diff(diff)
    assert f"4 of {len(ids)} expected cases present" in text and "verdict: INCOMPLETE (" in text
    # Died before its first case: everything is missing.
    empty = _result_set([], complete=False, expected=ids)
    assert len(diff_runs(old, empty).missing) == len(ids)
    # No expected list recorded (an older file): a case that disappeared counts as missing.
    legacy = _result_set([c.to_json() for c in old.cases[:4]], complete=True)
    assert [c.case_id for c in diff_runs(old, legacy).missing] == sorted(ids[4:])


def test_diff_and_format_reject_bad_arguments():
    old, _ = _diff_fixture()
    with pytest.raises(TypeError, match="new must be a moe_validate.results.ResultSet"):
        diff_runs(old, {"cases": []})
    with pytest.raises(TypeError, match="diff must be a RunDiff"):
        format_diff("not a diff")
    with pytest.raises(ValueError, match="max_lines_per_section"):
        format_diff(diff_runs(old, old), max_lines_per_section=0)


def test_baseline_section_is_rendered(tmp_path):
    old, new = _diff_fixture()
    html = render_report(new, tmp_path / "r.html", baseline=old).read_text()
    assert 'id="baseline"' in html
    assert '<span class="badge" id="diff-count-new-failures">2</span>' in html
    assert '<span class="badge" id="diff-count-drift">2</span>' in html
    assert "565.57.01" in html
    table = _payload(html)["table"]
    labels = table["diff_labels"]
    assert labels[table["diff"][table["ids"].index("pass-to-fail")]] == "new failure"
    assert table["diff"][table["ids"].index("same")] == -1
    assert 'id="baseline"' not in render_report(new, tmp_path / "plain.html").read_text()


# ---------------------------------------------------------------------------------------------
# Shards, truncated files
# ---------------------------------------------------------------------------------------------
def test_merged_shards_give_the_same_cases_and_list_every_shard(tmp_path):
    whole = load_results(synth.write_run(tmp_path / "one", 300, seed=9))
    parts = synth.write_run(tmp_path / "three", 300, seed=9, shards=3)
    merged = load_results(parts)
    assert [c["case_id"] for c in merged.cases] == [c["case_id"] for c in whole.cases]
    model = build_model(merged)
    assert model.summary.counts == build_model(whole).summary.counts
    assert [s.shard for s in model.summary.shards] == ["1/3", "2/3", "3/3"]
    assert all(s.finished != "-" and s.duration_s is not None for s in model.summary.shards)
    assert model.summary.complete and model.summary.problems == []
    # Shards on different GPUs: both values shown.
    first, second = synth.make_records(20, seed=1, shards=2)
    second[0]["env"] = dict(synth.ENV, gpu="NVIDIA H200")
    mixed = load_results([synth.write_jsonl(tmp_path / "a.jsonl", first), synth.write_jsonl(tmp_path / "b.jsonl", second)])
    assert build_model(mixed).summary.env["gpu"] == "NVIDIA H100 80GB HBM3 | NVIDIA H200"


def test_two_runs_of_the_same_cases_are_never_merged_silently(tmp_path):
    # Issue 19: a FAIL of one run was hidden by a PASS of another run of the same case id.
    a = synth.write_run(tmp_path / "a", 10, seed=1)
    b = synth.write_run(tmp_path / "b", 10, seed=2)
    with pytest.raises(ResultsError, match="recorded by two runs, run-1-0 and run-2-0.*--run"):
        load_results(a + b)
    chosen = load_results(a + b, run="run-2")
    assert [r.run_id for r in chosen.runs] == ["run-2-0"] and len(chosen.cases) == 10
    assert chosen.cases == load_results(b).cases
    with pytest.raises(ResultsError, match="--run 'run-' must name exactly one run"):
        load_results(a + b, run="run-")


def test_truncated_results_file_reports_the_problem_and_keeps_whole_cases(tmp_path):
    path = synth.write_run(tmp_path, 50, seed=4, complete=False, fail_rate=0.0, bad_rate=0.0)[0]
    text = path.read_text()
    path.write_text(text + text.splitlines()[-1][:40])  # a line torn mid-write by a killed run
    rs = load_results([path])
    model = build_model(rs)
    assert model.summary.total == 50
    assert model.summary.verdict == "INCOMPLETE"
    assert any("truncated last line" in p for p in model.summary.problems)
    assert any("no footer" in p for p in model.summary.problems)
    html = render_report(rs, tmp_path / "r.html").read_text()
    assert "truncated last line skipped" in html and "INCOMPLETE" in html


# ---------------------------------------------------------------------------------------------
# Rendered HTML: escaping, self-containment, contents
# ---------------------------------------------------------------------------------------------
EVIL_ID = 'bf16-none-silu-lora_none-M1N2K3E4k1-s0<script>alert("id")</script>&amp;'
EVIL_TRACE = 'Traceback:\n  File "x.py"\n</script><img src=x onerror=alert(1)> & <!-- \u2028 end'


def test_everything_from_the_data_is_escaped(tmp_path):
    cases = [_case(EVIL_ID, "CRASH", None, reason="<b>bold</b> & more", error=EVIL_TRACE, scheme="<i>"),
             _case("ok", "FAIL", 7.0, scheme="none")]
    rs = _result_set(cases, env=dict(synth.ENV, gpu="<GPU & co>"))
    html = render_report(rs, tmp_path / "r.html", title="T <title> & co").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html
    assert "<i>" not in html and "<GPU" not in html and "<title> &" not in html
    assert "&lt;GPU &amp; co&gt;" in html and "T &lt;title&gt; &amp; co" in html
    # Exactly two script elements (data + page script); the data one parses back to the exact strings.
    assert html.count("</script>") == 2
    payload = _payload(html)
    assert EVIL_ID in payload["table"]["ids"]
    detail = payload["details"][str(payload["table"]["ids"].index(EVIL_ID))]
    assert detail["error"] == EVIL_TRACE
    assert "<b>bold</b> & more" in payload["table"]["reasons"]


def test_csp_allows_only_the_inline_style_and_script_by_hash(tmp_path):
    from moe_validate.report.render import csp_hash

    html = render_report(_result_set([_case("a", "PASS", 0.1)]), tmp_path / "r.html").read_text()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert "unsafe-inline" not in policy and "default-src 'none'" in policy
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    script = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(script) == 1
    assert f"style-src '{csp_hash(style)}'" in policy and f"script-src '{csp_hash(script[0])}'" in policy


def test_details_are_embedded_within_a_budget(tmp_path, monkeypatch):
    from moe_validate.report import model as model_mod

    monkeypatch.setattr(model_mod, "DETAILS_MAX_CASES", 5)
    results = load_results(synth.write_run(tmp_path, 60, fail_rate=0.5, bad_rate=0.1, seed=5))
    payload = build_model(results).payload
    bad = [i for i, c in enumerate(results.cases) if Outcome(c.outcome).is_bad]
    full = [i for i in bad if "omitted" not in payload["details"][str(i)]]
    assert len(full) == 5 and payload["details_omitted"] == len(bad) - 5
    # The most severe first: crashes and compile errors before failures.
    severity = model_mod._SEVERITY
    worst_omitted = max(severity[results.cases[i].outcome] for i in bad if i not in full)
    assert min(severity[results.cases[i].outcome] for i in full) >= worst_omitted
    assert "they are in results.jsonl" in payload["details"][str(next(i for i in bad if i not in full))]["omitted"]


def test_embed_json_escapes_what_could_close_the_script_and_encodes_non_finite_floats():
    text = embed_json({"a": "</script><!--&", "b": float("nan"), "c": [float("-inf")], "d": "\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><!--&", "b": "NaN", "c": ["-Infinity"], "d": "\u2028"}


def test_report_is_self_contained(tmp_path):
    rs = load_results(synth.write_run(tmp_path, 200, fail_rate=0.1, seed=2))
    html = render_report(rs, tmp_path / "r.html").read_text()
    urls = set(re.findall(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>)]*", html))
    assert urls <= {SVG_NAMESPACE}, urls
    assert not re.search(r"\ssrc\s*=", html), "no element may load a resource"
    assert not re.search(r"@import|url\(", html)
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(h.startswith("#") for h in hrefs), [h for h in hrefs if not h.startswith("#")]
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_failing_case_details_carry_every_view(tmp_path):
    rs = load_results(synth.write_run(tmp_path, 300, fail_rate=0.2, bad_rate=0.05, seed=8))
    html = render_report(rs, tmp_path / "r.html").read_text()
    payload = _payload(html)
    ids = payload["table"]["ids"]
    failing = next(c for c in rs.cases if c["outcome"] == "FAIL")
    crash = next(c for c in rs.cases if c["outcome"] in ("CRASH", "COMPILE_ERROR", "OOM", "TIMEOUT"))
    passing = next(c for c in rs.cases if c["outcome"] == "PASS")
    det = payload["details"][str(ids.index(failing["case_id"]))]
    assert list(det["panels"]) == ["mirror", "exact"]
    mirror = det["panels"]["mirror"]
    assert {m["name"] for m in mirror["metrics"]} >= {"max_abs", "rel_frobenius", "cosine"}
    assert any(m["exceeds"] for m in mirror["metrics"])
    assert mirror["worst"][0][4] == 1.00390625 and mirror["worst"][0][5] == 1.0019531249999998  # full precision
    assert det["tolerance"]["gate"]["derivation"] == failing["tolerance"]["gate"]["derivation"]
    assert det["heatmap"]["rows"] == len(failing["detail"]["heatmap"]["values"])
    assert set(det["histograms"]) == {"normalized_error", "ulp_distance"}
    assert len(det["per_expert"]) == failing["params"]["E"]
    assert [p[0] for p in det["params"]][:4] == ["dtype", "scheme", "activation", "lora"]
    assert payload["details"][str(ids.index(crash["case_id"]))]["error"].startswith("Traceback")
    assert str(ids.index(passing["case_id"])) not in payload["details"]
    # Passing cases still show their margins, compactly.
    margins = payload["table"]["margins"]
    row = margins["values"][ids.index(passing["case_id"])]
    k = margins["keys"].index("mirror.max_abs")
    assert row[k] == pytest.approx(passing["metrics"]["mirror"]["max_abs"]["margin"], rel=1e-2)
    # Repro commands: one template, rebuilt per case by the page.
    assert payload["table"]["repro"]["template"] == "moe-validate repro --backend triton {case_id}"
    assert payload["table"]["repro"]["exceptions"] == {}
    # The summary is server-rendered: counts carry data attributes for the browser tests.
    for outcome, n in rs.counts().items():
        assert re.search(rf'data-outcome="{outcome}"[^>]*><span class="n" data-count="{n}">{n}</span>', html), outcome


def test_render_report_rejects_bad_arguments(tmp_path):
    rs = _result_set([_case("a", "PASS", 0.1)])
    with pytest.raises(TypeError, match="results must be a moe_validate.results.ResultSet"):
        render_report([], tmp_path / "r.html")
    with pytest.raises(TypeError, match="baseline must be a ResultSet or None"):
        render_report(rs, tmp_path / "r.html", baseline="old.jsonl")
    with pytest.raises(ValueError, match="out_path must be a file path"):
        render_report(rs, tmp_path)
    with pytest.raises(TypeError, match="out_path must be a str or Path"):
        render_report(rs, 3)
    out = render_report(rs, str(tmp_path / "sub" / "r.html"))
    assert out == tmp_path / "sub" / "r.html" and out.exists()


def test_non_finite_margins_render(tmp_path):
    rs = _result_set([_case("nan", "FAIL", float("nan"), scheme="none"), _case("inf", "FAIL", float("inf"), scheme="none")])
    payload = _payload(render_report(rs, tmp_path / "r.html").read_text())
    assert payload["table"]["margin"] == ["Infinity", "NaN"]


def test_large_heatmaps_are_max_pooled_for_display_and_keep_nan_visible(tmp_path):
    from moe_validate.report.model import HEATMAP_MAX_COLS, HEATMAP_MAX_ROWS

    rows, cols = 200, 230  # e.g. M = 3200 tokens in 16-row tiles, K = 7360 in 32-column tiles
    values = [[0.001 * ((r * 7 + c) % 5) for c in range(cols)] for r in range(rows)]
    values[150][3] = 9.0
    values[5][229] = float("nan")
    case = _case("big", "FAIL", 3.0, scheme="none")
    case["detail"] = {"heatmap": {"row_tile": 16, "col_tile": 32, "values": values}}
    grid = build_model(_result_set([case])).payload["details"]["0"]["heatmap"]
    fr, fc = grid["pooled"]
    assert (fr, fc) == (math.ceil(rows / HEATMAP_MAX_ROWS), math.ceil(cols / HEATMAP_MAX_COLS)) == (4, 3)
    assert grid["rows"] == math.ceil(rows / fr) <= HEATMAP_MAX_ROWS and grid["cols"] == math.ceil(cols / fc)
    assert (grid["row_tile"], grid["col_tile"], grid["source_shape"]) == (64, 96, [rows, cols])
    assert grid["values"][150 // fr][3 // fc] == 9.0 == grid["max"]  # the peak survives pooling
    assert grid["values"][5 // fr][229 // fc] == "NaN"
    small = _case("small", "FAIL", 3.0, scheme="none")
    small["detail"] = {"heatmap": {"row_tile": 16, "col_tile": 32, "values": [[1.0, 2.0], [3.0, float("inf")]]}}
    grid = build_model(_result_set([small])).payload["details"]["0"]["heatmap"]
    assert grid["pooled"] == [1, 1] and grid["values"] == [[1.0, 2.0], [3.0, "Infinity"]] and grid["max"] == 3.0


def test_header_only_and_minimal_records_render(tmp_path):
    empty = ResultSet(headers=[{"kind": "header", "run_id": "r", "env": {}}])
    model = build_model(empty)
    assert model.summary.total == 0 and model.summary.verdict == "INCOMPLETE"
    assert model.payload["pivot"]["axes"] == [] and model.payload["table"]["ids"] == []
    render_report(empty, tmp_path / "empty.html")
    # A case record with only the two required keys (what load_results insists on).
    bare = ResultSet(cases=[{"case_id": "x", "outcome": "FAIL"}])
    payload = _payload(render_report(bare, tmp_path / "bare.html").read_text())
    assert payload["details"]["0"]["panels"] == {} and payload["details"]["0"]["heatmap"] is None
    assert any("no header record" in p for p in build_model(bare).summary.problems)


def test_check_failures_and_row_samples_reach_the_details(tmp_path):
    """A case failed by a check after the comparison shows every check with its outcome and
    reason; a row-sampled comparison says how many rows it compared."""
    violated = ("invariance sub (batch invariance, one token dropped) violated: token 0, column 2: "
                "0.14335531 in the batch of 3 vs 0.143355295 in the batch of 2 (token 1 dropped)")
    case = _case("fp32-none-silu-M3N32K32E40k3-invar_perm+sub-s191", "FAIL", 0.2, reason=violated, dtype="fp32")
    case["checks"] = [{"name": "alignment_contract", "outcome": "PASS", "reason": None},
                      {"name": "invariance:perm", "outcome": "SKIP", "reason": "invariance perm: not declared"},
                      {"name": "invariance:sub", "outcome": "FAIL", "reason": violated}]
    case["compared_rows"] = {"compared": 256, "of": 16512, "mode": "sampled", "how": "first 32, last 128, the rest seeded"}
    payload = _payload(render_report(_result_set([case]), tmp_path / "checks.html").read_text())
    det = payload["details"]["0"]
    assert det["checks"] == [["alignment_contract", "PASS", ""], ["invariance:perm", "SKIP", "invariance perm: not declared"],
                             ["invariance:sub", "FAIL", violated]]
    assert det["compared_rows"] == "compared rows: 256 of 16512, sampled (first 32, last 128, the rest seeded)"
    assert payload["table"]["reasons"] == [violated]


# ---------------------------------------------------------------------------------------------
# Issue 25: the diagnosis leads, verdicts at a glance, the environment says the backend
# ---------------------------------------------------------------------------------------------
def _diagnosed(case_id="bf16-none-silu-M7N64K64E4k2-s0", verdicts=True):
    rec = _case(case_id, "FAIL", 3.0, reason="gate (mirror): max_normalized 3 > 1", M=7, K=64, E=4)
    worst = [{"token": t, "column": 5 + t, "expert": 1, "tile": "r0c0", "kernel": 1.5 * (t + 1), "reference": t + 1.0,
              "diff": 0.5 * (t + 1), "allowed": 0.01, "normalized": 50.0 * (t + 1), "ulp": 9.0} for t in range(4)]
    rec["metrics"] = {"mirror": {"max_normalized": {"value": 200.0, "allowed": 1.0, "margin": 200.0}, "worst": worst,
                                 "exceed_count": 4, "exceed_fraction": 4 / 448, "nan_inf": {}, "nan_where_ref_finite": 0}}
    rec["detail"] = {"per_expert": [0.1, 200.0, 0.2, 0.3]}
    if verdicts:
        rec["verdicts"] = {"accuracy": {"outcome": "PASS", "reason": None, "margin": 0.5},
                           "conformance": {"outcome": "FAIL", "reason": "planted", "margin": 200.0}}
        rec["gating"] = ["conformance"]
    return rec


def test_details_and_table_lead_with_the_diagnosis_and_the_verdicts(tmp_path):
    rec = _diagnosed()
    rs = _result_set([rec, _diagnosed("bf16-none-silu-M7N64K64E4k2-s1", verdicts=False), _case("p", "PASS", 0.1)])
    payload = _payload(render_report(rs, tmp_path / "r.html").read_text())
    i = payload["table"]["ids"].index(rec["case_id"])
    det = payload["details"][str(i)]
    assert det["diagnosis"]["summary"].startswith("expert 1 (4 of 4 worst elements; the only expert over its bound): "
                                                  "constant ratio 1.5 (a scale bug?)"), det["diagnosis"]
    assert ["where", det["diagnosis"]["lines"][0][1]] == det["diagnosis"]["lines"][0]
    assert [(v["name"], v["outcome"], v["gating"]) for v in det["verdicts"]] == [
        ("accuracy", "PASS", False), ("conformance", "FAIL", True)]
    table = payload["table"]
    assert table["diagnoses"][table["diagnosis"][i]] == "expert 1: scale x1.5"
    codes = table["verdict_codes"]
    assert [codes[c] for c in table["verdicts"][i]] == ["PASS", "FAIL"]
    j = table["ids"].index("bf16-none-silu-M7N64K64E4k2-s1")
    assert table["verdicts"][j] == 0 and payload["details"][str(j)]["verdicts"] is None  # none recorded: none shown
    assert table["diagnosis"][table["ids"].index("p")] == -1


def test_environment_names_the_backend_and_shows_no_null(tmp_path):
    rs = _result_set([_case("a", "PASS", 0.1)], env=dict(synth.ENV, gpu=None, driver=None))
    rs.headers[0].backend = "planted"
    env = build_model(rs).summary.env
    assert list(env)[0] == "backend" and env["backend"] == "planted"
    assert "gpu" not in env and "null" not in env.values()


def test_compare_leads_each_change_with_its_diagnosis_and_names_a_backend_change():
    old = _result_set([_case("bf16-none-silu-M7N64K64E4k2-s0", "PASS", 0.1)])
    new = _result_set([_diagnosed()])
    new.headers[0].backend, old.headers[0].backend = "vllm", "triton"
    text = format_diff(diff_runs(old, new))
    assert "environment: same" not in text and "  backend: triton -> vllm" in text, text
    line = next(x for x in text.splitlines() if x.startswith("  bf16-none-silu-M7N64K64E4k2-s0: PASS"))
    assert "[expert 1 (4 of 4 worst elements" in line and "constant ratio 1.5 (a scale bug?)" in line, line


def test_the_summary_says_the_coverage():
    rs = _result_set([_case("a", "PASS", 0.1), _case("b", "SKIP", reason="too slow under the Triton interpreter: "
                                                                            "~3.1e+07 MACs > 2e+07 (run it on a GPU)"),
                      _case("c", "SKIP", reason="too slow under the Triton interpreter: ~4.5e+07 MACs > 2e+07 (run it on a GPU)")],
                     expected=["a", "b", "c"])
    assert build_model(rs).summary.coverage == ("ran 1 of 3 (2 skipped: too slow under the Triton interpreter: "
                                                "# MACs > # (run it on a GPU))")
