"""The report of REAL runs in a real browser (headless system Chromium).

test_report_browser.py proves the page on synthetic results; this file closes the loop from the
command line to the pixels: ``moe-validate run`` (through ``cli.main``) writes results.jsonl and
report.html from actual kernel/reference evaluations, and Chromium must show exactly what the
JSONL says.

- A smoke run of the Triton backend (interpreter on CPU, native on a GPU) over 11 cheap cases
  (3 quant schemes x 9 activations): loads clean, counts equal the JSONL, the pivot holds every
  case, a case opens with its parameters, measured margins and repro.
- Planted failures, three real runs merged by ``moe-validate report a.jsonl b.jsonl c.jsonl``:
  the same 11 cases against ``fake_backends:Wrong`` (output x 1.5: every case FAILs its gate),
  4 cases against ``fake_backends:Raise`` (seed 1 raises in the worker: CRASH; the others PASS)
  and 1 case against ``planted_backends:NaNAt`` (one NaN in the output: FAIL). A failing case
  opens with a heatmap, per-expert bars, histograms and worst elements that match its record; the
  NaN's tile is magenta; the crash shows its traceback; every case shows its repro line.
  Screenshots go to $MOE_E2E_ARTIFACTS (default: the test's tmp dir).

Cost: 11 interpreter cases of the cheapest M5 family (``matrix.interpreter_cost`` 61k-82k each,
about 0.1-0.4 s apiece) plus 16 reference-only cases; the file takes 15-35 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_validate import cli, matrix
from moe_validate.results import Outcome

HERE = Path(__file__).resolve().parent
FAKES_DIR = HERE.parent / "moe_validate"  # fake_backends.py lives there; planted_backends.py here

# The M5N64K64E4k2 family is the cheapest of the smoke suite that still spans quant schemes and
# activations (seeds 100, 101, 150-158: fp8_block128, int8_channel_token, int4_w4a16 x all 9
# activations). One glob, because --filter terms are AND-ed.
SMOKE_FILTER = "bf16-*-M5N64K64E4k2-*"  # bf16 only: the fp32 cases of this shape exist for selftest kills
# Seeds 0-3 of the M7 family: the Raise fake crashes on seed 1 and answers the rest correctly
# (from the reference, so no interpreter cost).
CRASH_FILTER = "*-M7N64K64E4k2-s[0-3]"
# One case of a fourth scheme (fp8_channel_token) for planted_backends:NaNAt (one NaN in the output).
NAN_FILTER = "*-M6N48K40E3k2-*"


@pytest.fixture(scope="module")
def fakes_importable():
    # Spawned workers inherit sys.path from this process (runner uses spawn), so the planted
    # backends load there as ``fake_backends:<Name>`` too.
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(FAKES_DIR))
    mp.syspath_prepend(str(HERE))
    yield
    mp.undo()


def _cli(argv) -> int:
    return cli.main([str(a) for a in argv])


def _case_records(path: Path):
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in recs if r["kind"] == "case"]


def _jsonl_counts(paths):
    counts = {o.value: 0 for o in Outcome}
    for path in paths:
        for rec in _case_records(path):
            counts[rec["outcome"]] += 1
    return counts


def _selected_ids(expr):
    return [c.id for c in matrix.filter_cases(matrix.suite_cases("smoke"), expr) if c.is_valid()[0]]


def _assert_counts_shown(probe, expected):
    for outcome, n in expected.items():
        assert int(probe.page.inner_text(f'#counts [data-outcome="{outcome}"] .n')) == n, outcome
        if n:  # the outcome filter checkboxes count from the embedded table: the same numbers
            assert f"{outcome} ({n})" in probe.page.inner_text(f"label.outcome-{outcome}")
    assert int(probe.page.inner_text('#counts [data-outcome="TOTAL"] .n')) == sum(expected.values())


def _assert_pivot_matches(probe, records):
    """Default pivot is scheme x activation: every cell total equals the JSONL, all cases are in it."""
    grid = probe.page.locator("#pivot-grid")
    assert grid.get_attribute("data-rows") == "scheme" and grid.get_attribute("data-cols") == "activation"
    links = probe.page.locator("#pivot-grid a.pivot-link")
    want = {}
    for rec in records:
        key = (rec["params"]["scheme"], rec["params"]["activation"])
        want.setdefault(key, []).append(rec)
    assert links.count() == len(want)
    for k in range(links.count()):
        link = links.nth(k)
        query = dict(kv.split("=") for kv in link.get_attribute("href").split("?", 1)[1].split("&"))
        cell = want[(query["scheme"], query["activation"])]
        assert int(link.get_attribute("data-total")) == len(cell)
        assert int(link.get_attribute("data-bad")) == sum(Outcome(r["outcome"]).is_bad for r in cell)
    # Following a cell filters the table to exactly its cases.
    link = links.nth(links.count() - 1)
    query = dict(kv.split("=") for kv in link.get_attribute("href").split("?", 1)[1].split("&"))
    link.click()
    assert sorted(probe.visible_ids()) == sorted(r["case_id"] for r in want[(query["scheme"], query["activation"])])
    probe.page.click("#filter-clear")


def _open_case(probe, case_id):
    probe.page.click("#filter-clear")
    probe.page.fill("#filter-text", case_id)
    probe.wait_until("window.__moeReport.shown() === 1")
    probe.page.click(f'#case-body tr[data-case="{case_id}"] a.case-link')
    detail = probe.page.locator(f'tr.detail-row[data-detail-for="{case_id}"]')
    detail.wait_for()
    return detail


# ---------------------------------------------------------------------------------------------
# a real smoke run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, browser):
    # ``browser`` first: without Chromium/playwright the test skips before paying for the run.
    out = tmp_path_factory.mktemp("real_smoke")
    code = _cli(["run", "--suite", "smoke", "--filter", SMOKE_FILTER, "--out", out])
    results = out / "results.jsonl"
    assert results.exists() and (out / "report.html").exists()
    return code, results, out / "report.html"


def test_filter_selects_a_cheap_varied_subset():
    """Guards the premise of this file: if the smoke suite changes shape, say so here, not as a
    puzzling count mismatch or a slow CI job."""
    cases = [c for c in matrix.filter_cases(matrix.suite_cases("smoke"), SMOKE_FILTER) if c.is_valid()[0]]
    # 13 since issue 26 added s201 (int4 zero points over two K tiles) and s212 (fp8_block128 + clamp)
    assert 6 <= len(cases) <= 13, [c.id for c in cases]
    assert len({c.scheme for c in cases}) >= 3 and len({c.activation for c in cases}) >= 5
    # 82k is the costliest of the family; the M7 default cases cost 86k (about 0.5 s each).
    assert max(matrix.interpreter_cost(c) for c in cases) <= 86016
    assert len(_selected_ids(CRASH_FILTER)) == 4
    assert len(_selected_ids(NAN_FILTER)) == 1 and not set(_selected_ids(NAN_FILTER)) & set(_selected_ids(SMOKE_FILTER))
    assert sorted(c.seed for c in matrix.filter_cases(matrix.suite_cases("smoke"), CRASH_FILTER)) == [0, 1, 2, 3]


def test_smoke_run_report_renders_what_the_jsonl_says(probe, smoke_run, artifacts_dir):
    code, results, report = smoke_run
    records = _case_records(results)
    expected = _jsonl_counts([results])
    bad = [r["case_id"] for r in records if Outcome(r["outcome"]).is_bad]
    # The run covered exactly the selected cases, and its exit code agrees with its records.
    assert sorted(r["case_id"] for r in records) == sorted(_selected_ids(SMOKE_FILTER))
    assert code == (1 if bad else 0)
    assert {r["backend"] for r in records} == {"triton"}

    probe.open(report)
    _assert_counts_shown(probe, expected)
    assert probe.page.inner_text("#verdict") == ("FAILED" if bad else "PASSED")
    assert probe.shown() == len(records)
    assert sorted(probe.visible_ids()) == sorted(r["case_id"] for r in records)
    probe.page.screenshot(path=str(artifacts_dir / "real-smoke-report.png"), full_page=True)
    _assert_pivot_matches(probe, records)

    # A case opens. A passing case carries (by design, to keep big reports small) its parameters,
    # the margin of every panel metric the run measured and its repro line; the heavy evidence is
    # kept for non-passing cases (checked in the planted-failure test below).
    rec = next((r for r in records if r["outcome"] == "PASS"), records[0])
    detail = _open_case(probe, rec["case_id"])
    params = detail.locator("div.params").inner_text()
    for axis in ("scheme", "activation"):
        assert f"{axis} {rec['params'][axis]}" in params
    measured = {f"{panel}.{name}": entry["margin"] for panel, metrics in rec["metrics"].items()
                for name, entry in metrics.items() if isinstance(entry, dict) and entry.get("margin") is not None}
    shown = dict(span.rsplit(" ", 1) for span in detail.locator(".margins-compact span").all_inner_texts())
    assert set(shown) == set(measured) and measured
    if rec["outcome"] == "PASS":  # every margin within its bound; shown to 3 significant digits
        assert all(float(v) <= 1.0 for v in shown.values()), shown
    for key, margin in measured.items():
        # Shown to 3 significant digits: off by at most half a unit of the third, 5e-3 relative.
        assert float(shown[key]) == pytest.approx(margin, rel=5e-3, abs=1e-12), key
    assert detail.locator(".repro code").inner_text() == rec["repro"]
    assert "moe-validate repro" in rec["repro"] and rec["case_id"] in rec["repro"]
    detail.screenshot(path=str(artifacts_dir / "real-smoke-case.png"))
    assert probe.errors == []
    assert probe.external_requests() == []


# ---------------------------------------------------------------------------------------------
# real runs with planted failures, three runs merged
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, browser, fakes_importable):
    base = tmp_path_factory.mktemp("real_planted")
    wrong, crash, nan = base / "wrong", base / "crash", base / "nan"
    assert _cli(["run", "--suite", "smoke", "--filter", SMOKE_FILTER, "--backend", "fake_backends:Wrong",
                 "--out", wrong]) == 1
    assert _cli(["run", "--suite", "smoke", "--filter", CRASH_FILTER, "--backend", "fake_backends:Raise",
                 "--out", crash]) == 1
    assert _cli(["run", "--suite", "smoke", "--filter", NAN_FILTER, "--backend", "planted_backends:NaNAt",
                 "--out", nan]) == 1
    paths = [wrong / "results.jsonl", crash / "results.jsonl", nan / "results.jsonl"]
    merged = base / "merged.html"
    # Three backends, disjoint cases: merged only when asked (a report of one backend is the default).
    assert _cli(["report", *paths, "--out", merged]) == 2
    assert _cli(["report", *paths, "--out", merged, "--mixed-backends"]) == 1  # the planted failures
    return paths, merged


def test_planted_failures_render_with_their_evidence(probe, planted_run, artifacts_dir):
    paths, report = planted_run
    records = [r for p in paths for r in _case_records(p)]
    expected = _jsonl_counts(paths)
    # What was planted: Wrong fails all 11 gates, Raise crashes seed 1 and passes seeds 0, 2, 3,
    # NaNAt fails its one case.
    assert expected["FAIL"] == len(_selected_ids(SMOKE_FILTER)) + 1
    assert expected["CRASH"] == 1 and expected["PASS"] == 3
    assert sum(expected.values()) == len(records)

    probe.open(report)
    _assert_counts_shown(probe, expected)
    assert probe.page.inner_text("#verdict") == "FAILED"
    assert probe.shown() == len(records)
    probe.page.screenshot(path=str(artifacts_dir / "real-planted-report.png"), full_page=True)
    _assert_pivot_matches(probe, records)

    # The FAIL count links to exactly the failing cases.
    probe.page.click('#counts a[data-outcome="FAIL"]')
    assert sorted(probe.visible_ids()) == sorted(r["case_id"] for r in records if r["outcome"] == "FAIL")

    # A failing case: every piece of evidence its record carries is drawn, with the record's numbers.
    rec = next(r for r in records if r["outcome"] == "FAIL" and "fake_backends:Wrong" in r["backend"])
    det = rec["detail"]
    detail = _open_case(probe, rec["case_id"])
    heatmap = detail.locator("svg.heatmap")
    values = det["heatmap"]["values"]
    assert heatmap.count() == 1
    # Small cases are not pooled: one cell per (token tile, column tile).
    assert heatmap.get_attribute("data-rows") == str(len(values))
    assert heatmap.get_attribute("data-cols") == str(len(values[0]))
    assert heatmap.locator("rect").count() == len(values) * len(values[0]) > 0
    caption = detail.locator("figure", has=probe.page.locator("svg.heatmap")).locator("figcaption").inner_text()
    assert "; magenta = NaN/Inf" in caption and "finite cells" not in caption  # every cell finite here
    assert detail.locator("svg.per-expert rect").count() == len(det["per_expert"])
    hists = detail.locator("svg.histogram")
    assert hists.count() == len(det["histograms"]) > 0
    case = matrix.Case.from_id(rec["case_id"])
    for k, name in enumerate(det["histograms"]):  # insertion order survives JSON and the page
        hist = det["histograms"][name]
        # The comparer appends one count past the bins (its last_count_is: the non-finite
        # elements); the page draws the len(edges) - 1 bins and names that count in the caption.
        bins, beyond = hist["counts"][: len(hist["edges"]) - 1], hist["counts"][len(hist["edges"]) - 1:]
        assert len(beyond) == 1 and sum(bins) + beyond[0] == case.M * case.K  # each element of the [M, K] output once
        assert hists.nth(k).locator("rect").count() == len(bins) + len(beyond)  # the non-finite count: its own bar
        figure = detail.locator("figure", has=probe.page.locator("svg.histogram")).nth(k)
        caption = figure.locator("figcaption").inner_text()
        assert caption.startswith(f"histogram: {name} ({sum(bins)} elements in bins; {hist['last_count_is']}: {beyond[0]}")
    # Worst elements: one table per panel that recorded them, one row per element, same tokens.
    panels_with_worst = [p for p, m in rec["metrics"].items() if m.get("worst")]
    assert detail.locator("table.worst-elements").count() == len(panels_with_worst) > 0
    for panel in panels_with_worst:
        worst = rec["metrics"][panel]["worst"]
        table = detail.locator(f'div.worst[data-panel="{panel}"] table.worst-elements')
        head = table.locator("tr").first.locator("th").all_inner_texts()
        assert {"token", "column", "expert", "kernel", "reference"} <= set(head)
        rows = table.locator("tr")
        assert rows.count() == len(worst) + 1
        token_col = head.index("token")
        shown_tokens = [int(rows.nth(j + 1).locator("td").nth(token_col).inner_text()) for j in range(len(worst))]
        assert shown_tokens == [w["token"] for w in worst]
    # The gate that failed is marked, and the reason is the record's.
    assert detail.locator('[data-panel="mirror"] tr.exceeds').count() >= 1
    assert detail.locator(".reason-text").inner_text() == rec["reason"]
    assert detail.locator(".repro code").inner_text() == rec["repro"]
    assert "--backend fake_backends:Wrong" in rec["repro"]
    detail.screenshot(path=str(artifacts_dir / "real-planted-failing-case.png"))

    # The NaN (third run): its tile is drawn as non-finite (magenta), the others on the colour
    # scale, and the panel's NaN census and the reason name it.
    import planted_backends  # importable: planted_run put this directory on sys.path

    nan_rec = next(r for r in records if r["backend"] == "planted_backends:NaNAt")
    heat = nan_rec["detail"]["heatmap"]
    token, column = planted_backends.NAN_AT
    nan_cell = (token // heat["row_tile"], column // heat["col_tile"])
    assert heat["values"][nan_cell[0]][nan_cell[1]] == "Infinity"  # the comparer maps NaN to inf
    nan_detail = _open_case(probe, nan_rec["case_id"])
    rects = nan_detail.locator("svg.heatmap rect")
    n_cols = len(heat["values"][0])
    fills = [rects.nth(k).get_attribute("fill") for k in range(rects.count())]
    assert len(fills) == len(heat["values"]) * n_cols
    assert [k for k, f in enumerate(fills) if f == "#ff00ff"] == [nan_cell[0] * n_cols + nan_cell[1]]
    # The caption's max/min are those of the finite cells (the colour scale); it must say so and
    # count the magenta cells, not claim "max 0" for a case whose worst tile is NaN.
    caption = nan_detail.locator("figure", has=probe.page.locator("svg.heatmap")).locator("figcaption").inner_text()
    assert "finite cells: max " in caption and "; 1 NaN/Inf cell in magenta" in caption
    assert "kernel_nan 1" in nan_detail.locator('div.panel[data-panel="mirror"] .muted').inner_text()
    assert nan_detail.locator(".reason-text").inner_text() == nan_rec["reason"] and "NaN" in nan_rec["reason"]
    nan_detail.screenshot(path=str(artifacts_dir / "real-planted-nan-case.png"))

    # The crash (second run) shows its worker's traceback; opened by a #case= link to the page.
    crash = next(r for r in records if r["outcome"] == "CRASH")
    assert crash["case_id"] in _selected_ids(CRASH_FILTER) and "planted failure in the backend" in crash["error"]
    probe.open(report, "#case=" + crash["case_id"])
    crash_detail = probe.page.locator(f'tr.detail-row[data-detail-for="{crash["case_id"]}"]')
    crash_detail.wait_for()
    assert crash_detail.locator("pre.traceback").text_content() == crash["error"]
    assert crash_detail.locator("pre.traceback").text_content().startswith("Traceback (most recent call last)")
    assert crash_detail.locator(".repro code").inner_text() == crash["repro"]
    assert "--backend fake_backends:Raise" in crash["repro"]
    crash_detail.screenshot(path=str(artifacts_dir / "real-planted-crash-case.png"))
    assert probe.errors == []
    assert probe.external_requests() == []
