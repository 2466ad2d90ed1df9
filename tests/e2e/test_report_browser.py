"""The report in a real browser (headless system Chromium): loads clean, counts, filters, details,
pivot links, a screenshot, and the load/filter time of a 10,000-case report."""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.parse
from pathlib import Path

import pytest

from moe_validate.report import render_report
from moe_validate.results import Outcome, ResultSet, load_results

_spec = importlib.util.spec_from_file_location("report_synth_results", Path(__file__).with_name("synth_results.py"))
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("report_e2e")


@pytest.fixture(scope="module")
def mixed_run(run_dir):
    """600 cases with failures of every kind and skips, in 2 shards, plus its report."""
    paths = synth.write_run(run_dir / "mixed", 600, fail_rate=0.06, bad_rate=0.03, skip_rate=0.1, seed=11, shards=2)
    results = load_results(paths)
    return paths, results, render_report(results, run_dir / "mixed.html")


def _jsonl_counts(paths):
    counts = {o.value: 0 for o in Outcome}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "case":
                counts[rec["outcome"]] += 1
    return counts


def test_report_loads_clean_and_shows_the_jsonl_counts(probe, mixed_run, artifacts_dir):
    paths, results, report = mixed_run
    probe.open(report)
    expected = _jsonl_counts(paths)
    for outcome, n in expected.items():
        shown = probe.page.inner_text(f'#counts [data-outcome="{outcome}"] .n')
        assert int(shown) == n, outcome
    assert int(probe.page.inner_text('#counts [data-outcome="TOTAL"] .n')) == sum(expected.values()) == 600
    assert probe.shown() == 600
    assert len(probe.visible_ids()) == 100  # paginated: one page of rows in the DOM, not 600
    assert probe.page.inner_text("#verdict") == "FAILED"
    # The outcome checkboxes count from the embedded table: the same numbers again.
    for outcome, n in expected.items():
        if n:
            assert f"{outcome} ({n})" in probe.page.inner_text(f'label.outcome-{outcome}')
    assert probe.page.locator("#shards tr").count() == 3  # header row + 2 shards
    probe.page.screenshot(path=str(artifacts_dir / "report-summary.png"))
    # Each count links to its cases.
    probe.page.click('#counts a[data-outcome="FAIL"]')
    assert probe.shown() == expected["FAIL"] > 0
    assert {results.by_id()[cid]["outcome"] for cid in probe.visible_ids()} == {"FAIL"}
    assert probe.errors == []
    assert probe.external_requests() == []


def test_filters_narrow_the_table(probe, mixed_run):
    _, results, report = mixed_run
    probe.open(report)
    needle = "fp8_block128-silu-"
    before = probe.updates()
    probe.page.fill("#filter-text", needle)
    probe.wait_until(f"window.__moeReport.updates() > {before}")
    want = [c for c in results.cases if needle in c["case_id"].lower()]
    assert 0 < probe.shown() == len(want) < 600
    assert all(needle in cid for cid in probe.visible_ids())
    probe.page.fill("#filter-text", "")
    probe.wait_until("window.__moeReport.shown() === 600")
    probe.page.check("#filter-outcome-FAIL")
    probe.page.check("#filter-outcome-SKIP")
    want = {c["case_id"] for c in results.cases if c["outcome"] in ("FAIL", "SKIP")}
    assert probe.shown() == len(want)
    assert set(probe.visible_ids()) <= want
    probe.page.select_option("#filter-axis-dtype", label="dtype = bf16")
    want = {c["case_id"] for c in results.cases if c["outcome"] in ("FAIL", "SKIP") and c["params"]["dtype"] == "bf16"}
    assert probe.shown() == len(want) > 0
    # Skip reasons are visible in the table.
    skip = next(c for c in results.cases if c["case_id"] in want and c["outcome"] == "SKIP")
    probe.page.fill("#filter-text", skip["case_id"])
    probe.wait_until("window.__moeReport.shown() === 1")
    assert probe.page.inner_text("#case-body tr.case-row td.reason") == skip["reason"]
    # Sorting by worst margin puts the largest first.
    probe.page.click("#filter-clear")
    probe.page.click('#case-head th[data-key="margin"]')
    first = probe.visible_ids()[0]
    measured = [c for c in results.cases if c.get("worst_margin") is not None]
    assert first == max(measured, key=lambda c: c["worst_margin"])["case_id"]
    assert probe.errors == []


def test_failing_case_opens_its_details_with_heatmap(probe, mixed_run, artifacts_dir):
    _, results, report = mixed_run
    probe.open(report)
    probe.page.check("#filter-outcome-FAIL")
    case_id = probe.visible_ids()[0]
    case = results.by_id()[case_id]
    probe.page.click(f'#case-body tr[data-case="{case_id}"] a.case-link')
    detail = probe.page.locator(f'tr.detail-row[data-detail-for="{case_id}"]')
    detail.wait_for()
    heatmap = detail.locator("svg.heatmap")
    values = case["detail"]["heatmap"]["values"]
    assert heatmap.count() == 1
    assert heatmap.locator("rect").count() == len(values) * len(values[0])
    assert detail.locator("svg.per-expert rect").count() == len(case["detail"]["per_expert"])
    assert detail.locator("svg.histogram").count() == len(case["detail"]["histograms"])
    assert detail.locator("table.worst-elements").count() == 2
    assert detail.locator('[data-panel="mirror"] tr.exceeds').count() >= 1
    # The derivations are folded below the errors; opened, they read as recorded.
    folded = detail.locator("details.derivations")
    assert folded.count() == 1 and folded.get_attribute("open") is None
    folded.locator("summary").click()
    derivation = detail.locator('[data-bound="gate"] ol.derivation li').all_inner_texts()
    assert derivation == case["tolerance"]["gate"]["derivation"]
    assert detail.locator(".repro code").inner_text() == case["repro"]
    detail.locator("button.copy").click()  # clipboard or fallback; must not throw
    detail.screenshot(path=str(artifacts_dir / "report-failing-case.png"))
    # A crash shows its traceback.
    crash = next(c for c in results.cases if c["outcome"] == "CRASH")
    probe.page.click("#filter-clear")
    probe.page.fill("#filter-text", crash["case_id"])
    probe.wait_until("window.__moeReport.shown() === 1")
    probe.page.click("#case-body a.case-link")
    assert probe.page.text_content("tr.detail-row pre.traceback") == crash["error"]
    assert probe.errors == []


def test_pivot_cells_link_to_their_cases(probe, mixed_run):
    _, results, report = mixed_run
    probe.open(report)
    grid = probe.page.locator("#pivot-grid")
    assert grid.get_attribute("data-rows") == "scheme" and grid.get_attribute("data-cols") == "activation"
    links = probe.page.locator("#pivot-grid a.pivot-link")
    assert links.count() > 20
    for k in (0, 7, links.count() - 1):
        link = links.nth(k)
        total = int(link.get_attribute("data-total"))
        href = link.get_attribute("href")
        link.click()
        assert probe.page.evaluate("location.hash") == href
        query = dict(kv.split("=") for kv in href.split("?", 1)[1].split("&"))
        want = [c for c in results.cases if c["params"]["scheme"] == query["scheme"]
                and c["params"]["activation"] == query["activation"]]
        assert probe.shown() == total == len(want)
        assert set(probe.visible_ids()) <= {c["case_id"] for c in want}
    # Another pair of axes, chosen in the page.
    probe.page.select_option("#pivot-rows", "dtype")
    probe.page.select_option("#pivot-cols", "lora")
    assert grid.get_attribute("data-rows") == "dtype" and grid.get_attribute("data-cols") == "lora"
    totals = [int(x) for x in probe.page.eval_on_selector_all("#pivot-grid a.pivot-link", "a => a.map(x => x.dataset.total)")]
    assert len(totals) == 9 and sum(totals) == 600
    bad = sum(int(x) for x in probe.page.eval_on_selector_all("#pivot-grid a.pivot-link", "a => a.map(x => x.dataset.bad)"))
    assert bad == sum(1 for c in results.cases if Outcome(c["outcome"]).is_bad)
    # Worst-margin links in the summary open the case.
    first = probe.page.locator("#worst-margins a.case-link").first
    case_id = first.inner_text()
    first.click()
    probe.page.locator(f'tr.detail-row[data-detail-for="{case_id}"]').wait_for()
    assert probe.errors == []


def test_hostile_strings_render_as_text(probe, run_dir):
    evil_id = 'bf16-none-silu-lora_none-M1N2K3E4k1-s0<img src=x onerror="window.__pwned=1">'
    evil_trace = 'Traceback\n</script><img src=y onerror="window.__pwned=2"> & <b>not bold</b>'
    case = {"kind": "case", "case_id": evil_id, "outcome": "CRASH", "reason": "<i>boom</i>", "error": evil_trace,
            "params": {"scheme": "none", "activation": "silu"}, "repro": "moe-validate repro 'x<y'", "worst_margin": None}
    rs = ResultSet(headers=[{"kind": "header", "env": {"gpu": "<b>gpu</b>"}}], cases=[case])
    report = render_report(rs, run_dir / "evil.html")
    probe.open(report, "#case=" + urllib.parse.quote(evil_id))
    probe.page.locator("tr.detail-row").wait_for()
    assert probe.page.text_content("tr.detail-row pre.traceback") == evil_trace
    assert probe.page.locator("img").count() == 0 and probe.page.locator("i").count() == 0
    assert probe.page.locator("b", has_text="not bold").count() == 0
    assert probe.page.locator("b", has_text="gpu").count() == 0
    assert "<b>gpu</b>" in probe.page.inner_text("#env")
    assert probe.page.evaluate("window.__pwned === undefined")
    assert probe.visible_ids() == [evil_id]
    assert probe.errors == []


def test_the_csp_blocks_an_injected_inline_handler(probe, mixed_run):
    # Escaping keeps markup out today; the policy must stop it too if escaping ever slipped: the
    # page's own script runs (by its hash), an inline handler added to the page does not.
    _, _, report = mixed_run
    probe.open(report)
    probe.page.evaluate("""() => { const img = document.createElement('img');
        img.setAttribute('onerror', 'window.__pwned = 1'); img.setAttribute('src', 'data:,not-an-image');
        document.body.appendChild(img); }""")
    time.sleep(0.3)
    assert probe.page.evaluate("window.__pwned === undefined")
    assert any("Content Security Policy" in e for e in probe.errors), probe.errors


def test_twenty_thousand_failing_cases_stay_small_and_open_fast(probe, run_dir, artifacts_dir):
    # Issue 19: 20,000 failing cases gave a 127 MB page that loaded in 14 s after 281 s of rendering.
    paths = synth.write_run(run_dir / "fail20k", 20_000, fail_rate=0.9, bad_rate=0.1, skip_rate=0.0, seed=3)
    results = load_results(paths)
    t0 = time.perf_counter()
    report = render_report(results, run_dir / "fail20k.html")
    render_s = time.perf_counter() - t0
    size_mb = report.stat().st_size / 2**20
    load_s = probe.open(report)
    assert probe.shown() == 20_000
    # The most severe cases carry full details; the others say where theirs are.
    probe.page.check("#filter-outcome-FAIL")
    probe.page.locator("#case-body tr.case-row a.case-link").last.click()
    probe.page.locator("tr.detail-row").wait_for()
    # The table sorts by severity: its last FAIL row is the mildest failure, whose details are left out.
    assert "they are in results.jsonl" in probe.page.locator("tr.detail-row .details-omitted").inner_text()
    print(f"\n20,000 failing cases: render {render_s:.1f} s, {size_mb:.1f} MiB, browser load {load_s:.2f} s")
    (artifacts_dir / "report-20k-failing.txt").write_text(f"size_mib={size_mb:.3f}\nrender_s={render_s:.3f}\n"
                                                          f"browser_load_s={load_s:.3f}\n")
    assert size_mb < 20
    assert load_s < 3
    assert probe.page.locator("#details-omitted").count() == 1
    assert probe.errors == []


def test_baseline_filter_lists_new_failures(probe, run_dir):
    old = load_results(synth.write_run(run_dir / "old", 300, fail_rate=0.05, seed=21))
    new = load_results(synth.write_run(run_dir / "new", 300, fail_rate=0.1, seed=22,
                                       env=dict(synth.ENV, driver="565.57.01")))
    from moe_validate.report import diff_runs

    diff = diff_runs(old, new)
    report = render_report(new, run_dir / "baseline.html", baseline=old)
    probe.open(report)
    assert int(probe.page.inner_text("#diff-count-new-failures")) == len(diff.new_failures) > 0
    assert "565.57.01" in probe.page.inner_text("#env-changes")
    probe.page.select_option("#filter-diff", label="new failure")
    assert sorted(probe.visible_ids()) == sorted(c.case_id for c in diff.new_failures)[:100]
    assert probe.shown() == len(diff.new_failures)
    assert probe.errors == []


def test_ten_thousand_case_report_opens_and_filters_fast(probe, run_dir, artifacts_dir):
    start = time.perf_counter()
    paths = synth.write_run(run_dir / "big", 10_000, fail_rate=0.02, bad_rate=0.002, skip_rate=0.05, seed=1)
    results = load_results(paths)
    loaded = time.perf_counter()
    report = render_report(results, run_dir / "big.html")
    rendered = time.perf_counter()
    size_mb = report.stat().st_size / 2**20
    load_s = probe.open(report)
    init_ms = probe.page.evaluate("window.__moeReport.initMs")
    before = probe.updates()
    t0 = time.perf_counter()
    probe.page.fill("#filter-text", "int4_w4a16-gelu")
    probe.wait_until(f"window.__moeReport.updates() > {before}")
    text_filter_s = time.perf_counter() - t0
    text_filter_ms = probe.page.evaluate("window.__moeReport.lastUpdateMs()")
    t0 = time.perf_counter()
    probe.page.check("#filter-outcome-FAIL")
    outcome_filter_s = time.perf_counter() - t0
    outcome_filter_ms = probe.page.evaluate("window.__moeReport.lastUpdateMs()")
    want = [c for c in results.cases if "int4_w4a16-gelu" in c["case_id"] and c["outcome"] == "FAIL"]
    assert probe.shown() == len(want)
    fails = sum(1 for c in results.cases if c["outcome"] == "FAIL")
    print(f"\n10,000-case report ({fails} FAIL): load_results {loaded - start:.2f} s (incl. writing), "
          f"render {rendered - loaded:.2f} s, file {size_mb:.2f} MiB; browser load {load_s:.2f} s "
          f"(page script {init_ms:.0f} ms); text filter {text_filter_s * 1000:.0f} ms wall / {text_filter_ms:.1f} ms "
          f"in page (incl. 60 ms debounce in wall); outcome filter {outcome_filter_s * 1000:.0f} ms wall / "
          f"{outcome_filter_ms:.1f} ms in page")
    (artifacts_dir / "report-10k-timing.txt").write_text(
        f"size_mib={size_mb:.3f}\nrender_s={rendered - loaded:.3f}\nbrowser_load_s={load_s:.3f}\n"
        f"init_ms={init_ms:.1f}\ntext_filter_wall_ms={text_filter_s * 1000:.1f}\ntext_filter_page_ms={text_filter_ms:.1f}\n"
        f"outcome_filter_wall_ms={outcome_filter_s * 1000:.1f}\noutcome_filter_page_ms={outcome_filter_ms:.1f}\n")
    # Sanity ceilings only (CI machines vary): measured numbers are printed above.
    assert load_s < 20 and text_filter_s < 20 and outcome_filter_s < 20
    assert size_mb < 20
    assert probe.errors == []


def test_degenerate_reports_load_clean(probe, run_dir):
    """Header only (a run killed before its first case), a bare case record, a huge heatmap."""
    render_report(ResultSet(headers=[{"kind": "header", "env": {}}]), run_dir / "empty.html")
    probe.open(run_dir / "empty.html")
    assert probe.shown() == 0 and probe.page.inner_text("#verdict") == "INCOMPLETE"
    values = [[0.001 * ((r + c) % 7) for c in range(300)] for r in range(250)]
    big = {"case_id": "big", "outcome": "FAIL", "params": {"scheme": "none", "activation": "silu"},
           "worst_margin": 2.0, "detail": {"heatmap": {"row_tile": 16, "col_tile": 32, "values": values}}}
    render_report(ResultSet(cases=[big, {"case_id": "bare", "outcome": "FAIL"}]), run_dir / "bare.html")
    probe.open(run_dir / "bare.html", "#case=big")
    rects = probe.page.locator('tr.detail-row[data-detail-for="big"] svg.heatmap rect').count()
    assert 0 < rects <= 64 * 96  # max-pooled for display
    probe.page.fill("#filter-text", "bare")
    probe.wait_until("window.__moeReport.shown() === 1")
    probe.page.click('#case-body tr[data-case="bare"] a.case-link')
    probe.page.locator('tr.detail-row[data-detail-for="bare"]').wait_for()
    assert probe.errors == []


def test_failed_check_and_row_sample_are_shown(probe, run_dir):
    violated = "alignment contract (SPEC pipeline step 5) violated: tile 3, past the padded total 48 (block_m 16), has expert 0; expected -1"
    cid = "bf16-none-silu-M5N32K32E3k3-s173"
    case = {"kind": "case", "case_id": cid, "outcome": "FAIL", "reason": violated, "worst_margin": 0.3,
            "params": {"scheme": "none", "activation": "silu"}, "repro": f"moe-validate repro {cid}",
            "checks": [{"name": "alignment_contract", "outcome": "FAIL", "reason": violated},
                       {"name": "invariance:sub", "outcome": "SKIP", "reason": "invariance sub: not declared"}],
            "compared_rows": {"compared": 256, "of": 16512, "mode": "sampled", "how": "first 32, last 128, the rest seeded"}}
    report = render_report(ResultSet(headers=[{"kind": "header", "env": {}}], cases=[case]), run_dir / "checks.html")
    probe.open(report, "#case=" + urllib.parse.quote(cid))
    detail = probe.page.locator("tr.detail-row")
    detail.wait_for()
    assert detail.locator('table.checks tr[data-check="alignment_contract"] td.outcome-FAIL').inner_text() == "FAIL"
    assert violated in detail.locator('table.checks tr[data-check="alignment_contract"]').inner_text()
    assert detail.locator('table.checks tr[data-check="invariance:sub"] td.outcome-SKIP').count() == 1
    assert detail.locator(".compared-rows").inner_text().startswith("compared rows: 256 of 16512, sampled")
    assert probe.errors == []


def _planted_failure_report(run_dir):
    """A real failing record (expert 1's contribution x1.01, through the runner) carrying the
    verdicts and gating the comparison records (synthesized here until that part merges), its report."""
    pytest.importorskip("reference", reason="the planted backend wraps the float64 reference")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe_validate"))
    from test_diagnosis import Planted, expert1_times_1_01

    from moe_validate.matrix import Case
    from moe_validate.results import storable
    from moe_validate.run.case import run_case_inprocess

    case = Case(M=12, N=64, K=64, E=4, topk=1, dtype="fp32", seed=7)
    rec = storable(run_case_inprocess(case, Planted("planted-scale", expert1_times_1_01), backend_name="planted-scale").record)
    rec["verdicts"] = {"accuracy": {"outcome": "FAIL", "reason": "budget exceeded", "margin": 40.0},
                       "conformance": {"outcome": "FAIL", "reason": "gate exceeded", "margin": 2730.0}}
    rec["gating"] = ["accuracy", "conformance"]
    header = {"kind": "header", "run_id": "planted", "suite": "smoke", "backend": "planted-scale",
              "env": dict(synth.ENV, gpu=None, capability=None, driver=None), "expected_cases": [rec["case_id"]]}
    rs = ResultSet(headers=[header], cases=[rec], footers=[{"kind": "footer", "run_id": "planted", "duration_s": 1.0,
                                                            "finished": "t"}])
    return rec, render_report(rs, run_dir / "planted.html")


def test_failure_view_shows_diagnosis_and_panels_without_scrolling(probe, run_dir, artifacts_dir):
    rec, report = _planted_failure_report(run_dir)
    probe.open(report, "#case=" + urllib.parse.quote(rec["case_id"]))
    detail = probe.page.locator("tr.detail-row")
    detail.wait_for()
    probe.page.screenshot(path=str(artifacts_dir / "report-failure-view-1400x900.png"))
    view = probe.page.viewport_size
    assert (view["width"], view["height"]) == (1400, 900)

    def on_screen(locator):
        box = locator.bounding_box()
        return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= view["height"] and box["x"] + box["width"] <= view["width"]

    summary = detail.locator(".diagnosis-summary")
    assert summary.inner_text() == rec["diagnosis"]["summary"]
    assert summary.inner_text().startswith("expert 1 ") and "constant ratio 1.01 (a scale bug?)" in summary.inner_text()
    assert on_screen(detail.locator(".diagnosis")), detail.locator(".diagnosis").bounding_box()
    for panel in ("mirror", "exact"):
        assert on_screen(detail.locator(f'.panel[data-panel="{panel}"]')), panel
    # both verdicts at a glance
    badges = {b.get_attribute("data-verdict"): b.inner_text() for b in detail.locator(".detail-head .vbadge").all()}
    assert badges == {"accuracy": "accuracy FAIL", "conformance": "conformance FAIL"}
    # the derivations are folded, after the errors
    assert detail.locator("details.derivations").get_attribute("open") is None
    # per-expert bars: a y axis, each bar's value, the limit line at 1.0
    bars = detail.locator("svg.per-expert")
    assert bars.locator("rect").count() == rec["params"]["E"]
    assert bars.locator("text.bar-value").count() == rec["params"]["E"]
    assert bars.locator("line.limit-line").count() == 1 and "limit 1" in bars.text_content()
    # histograms: a log x axis with every bin edge marked, values, the limit line on the normalized one
    hist = detail.locator('svg.histogram[data-name="normalized_error"]')
    assert hist.get_attribute("data-xscale") == "log" and "log scale" in hist.text_content()
    edges = rec["detail"]["histograms"]["normalized_error"]["edges"]
    assert hist.locator("line").count() >= len(edges) + 2  # axes + one tick per edge + the limit
    assert hist.locator("line.limit-line").count() == 1
    assert hist.locator("text.bar-value").count() == sum(1 for c in rec["detail"]["histograms"]["normalized_error"]["counts"][:-1] if c) + 1
    # the heatmap: one cell per element of this small case, drawn large enough to see
    heat = detail.locator("svg.heatmap")
    cells = heat.locator("rect").count()
    assert cells == rec["params"]["M"] * rec["params"]["K"], cells
    assert heat.bounding_box()["width"] >= 400 and heat.bounding_box()["height"] >= 150
    # the environment: the backend, and no raw null
    env = probe.page.inner_text("#env")
    assert "backend\tplanted-scale" in env and "null" not in env, env
    assert probe.errors == []


def test_compare_names_a_backend_change():
    from moe_validate.report import diff_runs, format_diff

    one = ResultSet(headers=[{"kind": "header", "run_id": "a", "backend": "triton", "env": dict(synth.ENV)}])
    two = ResultSet(headers=[{"kind": "header", "run_id": "b", "backend": "vllm", "env": dict(synth.ENV)}])
    text = format_diff(diff_runs(one, two))
    assert "environment: same" not in text and "backend: triton -> vllm" in text, text
