"""moe_validate.junit: the JUnit XML of a run, in the layout CI tools and pytest's --junitxml use."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from moe_validate import runner
from moe_validate.junit import write_junit
from moe_validate.matrix import filter_cases, suite_cases

HERE = Path(__file__).resolve().parent
# Under fake_backends:Mixed: bf16 s0 PASS, fp16 s1 CRASH, fp32 s2 SKIP, bf16 s3 FAIL.
CASES = filter_cases(suite_cases("smoke"), "*-none-silu-M7N64K64E4k2-s[0-3]")
OUTCOME_BY_SEED = {0: "PASS", 1: "CRASH", 2: "SKIP", 3: "FAIL"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    try:
        return runner.run_cases(CASES, "fake_backends:Mixed", tmp_path_factory.mktemp("mixed"), workers=0,
                                progress=None, suite="smoke")
    finally:
        sys.path.remove(str(HERE))


def _pytest_junit(tmp_path, family: str = "xunit2") -> ET.Element:
    """pytest's own --junitxml of a pass, a failure, a skip and an error: the reference layout.
    ``family="xunit1"``: the layout in which pytest writes testcase properties (record_property)."""
    (tmp_path / "test_ref.py").write_text(
        "import pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert 1 == 2, 'planted'\n"
        "def test_skip(): pytest.skip('planted skip')\n"
        "def test_property(record_property): record_property('accuracy', 'PASS')\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('planted')\n"
        "def test_error(broken): pass\n")
    xml = tmp_path / f"ref-{family}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                    "-o", f"junit_family={family}", f"--junitxml={xml}", str(tmp_path / "test_ref.py")],
                   capture_output=True, cwd=tmp_path, timeout=120)
    return ET.parse(xml).getroot()


def _attributes_by_tag(root: ET.Element):
    out = {}
    for el in root.iter():
        out.setdefault(el.tag, set()).update(el.attrib)
    return out


def _children_by_tag(root: ET.Element):
    out = {}
    for el in root.iter():
        out.setdefault(el.tag, set()).update(child.tag for child in el)
    return out


def test_one_testcase_per_case_with_outcome_elements(mixed_run, tmp_path):
    path = write_junit(mixed_run.results_path, tmp_path / "junit.xml")
    root = ET.parse(path).getroot()
    (suite,) = root.findall("testsuite")
    cases = {tc.get("name"): tc for tc in suite.findall("testcase")}
    assert sorted(cases) == sorted(c.id for c in CASES)
    assert sorted(OUTCOME_BY_SEED) == sorted(c.seed for c in CASES)
    for case in CASES:
        tc, outcome = cases[case.id], OUTCOME_BY_SEED[case.seed]
        assert tc.get("classname") == f"moe_validate.smoke.{case.dtype}.none"
        kinds = [child.tag for child in tc if child.tag != "properties"]
        verdicts = {p.get("name"): p.get("value") for p in tc.iter("property")}
        if outcome in ("PASS", "FAIL"):  # compared: both verdicts, what gated, the profile
            assert verdicts["accuracy"] in ("PASS", "FAIL") and verdicts["conformance"] in ("PASS", "FAIL")
            assert verdicts["gating"] == "accuracy" and verdicts["profile"] == "spec"
            assert float(verdicts["accuracy_margin"]) >= 0
        else:
            assert verdicts == {}
        if outcome == "FAIL":
            assert verdicts["accuracy"] == "FAIL"
            # the diagnosis leads the message and names the verdicts that failed
            assert "accuracy and conformance FAIL" in tc.find("failure").get("message")
        if outcome == "SKIP":
            assert kinds == ["skipped"] and "planted: fp32 not supported" in tc.find("skipped").get("message")
        elif outcome == "CRASH":
            assert kinds == ["error"] and tc.find("error").get("type") == "CRASH"
            assert "planted failure in the backend" in tc.find("error").text
        elif outcome == "FAIL":
            assert kinds == ["failure"] and tc.find("failure").get("type") == "FAIL"
            # the diagnosis leads the message CI shows: where, and the planted x1.5's pattern
            assert tc.find("failure").get("message").startswith(f"{case.id}: FAIL: everywhere ("), tc.find("failure").get("message")
            assert "constant ratio 1.5 (a scale bug?)" in tc.find("failure").get("message")
        else:
            assert kinds == []
        for bad in tc.findall("failure") + tc.findall("error"):
            # the pytest path's text: the message, then the repro command on its own line
            assert bad.get("message") == bad.text.splitlines()[0] and bad.get("message").startswith(case.id)
            last = bad.text.splitlines()[-1]
            assert last.startswith("repro: ") and last.endswith(f"moe-validate repro {case.id} --backend fake_backends:Mixed")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("4", "1", "1", "1")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["backend"] == "fake_backends:Mixed" and props["suite"] == "smoke"


def test_layout_is_the_one_pytest_writes(mixed_run, tmp_path):
    """Every element and attribute we write is one pytest's --junitxml writes in the same place
    (what CI tools' JUnit readers and the Jenkins JUnit schema accept), and the numbers parse."""
    ours = ET.parse(write_junit(mixed_run.results_path, tmp_path / "junit.xml")).getroot()
    ref = _pytest_junit(tmp_path)
    assert ours.tag == ref.tag == "testsuites"
    ref_attrs, ref_children = _attributes_by_tag(ref), _children_by_tag(ref)
    # testcase properties (the verdicts) are where pytest's xunit1 layout writes record_property
    legacy = _children_by_tag(_pytest_junit(tmp_path, "xunit1"))
    assert "properties" in legacy["testcase"]
    ref_children["testcase"] = ref_children["testcase"] | {"properties"}
    for tag, attrs in _attributes_by_tag(ours).items():
        assert tag in ref_attrs or tag in ("properties", "property"), tag
        if tag in ref_attrs:
            assert attrs <= ref_attrs[tag] | {"type"}, (tag, attrs - ref_attrs[tag])
    for tag, children in _children_by_tag(ours).items():
        allowed = ref_children.get(tag, set()) | ({"properties"} if tag == "testsuite" else set())
        assert children <= allowed | ({"property"} if tag == "properties" else set()), (tag, children - allowed)
    for suite in ours.iter("testsuite"):
        for name in ("tests", "failures", "errors", "skipped"):
            assert int(suite.get(name)) >= 0
        float(suite.get("time"))
    for tc in ours.iter("testcase"):
        assert float(tc.get("time")) >= 0 and tc.get("name") and tc.get("classname")
        assert len([c for c in tc if c.tag in ("failure", "error", "skipped")]) <= 1  # the schema's choice


def test_control_characters_in_an_error_stay_readable_xml(tmp_path):
    from moe_validate.results import CaseRecord, HeaderRecord, ResultsWriter

    results = tmp_path / "results.jsonl"
    with ResultsWriter(results) as w:
        w.write(HeaderRecord(run_id="r", backend="b", suite="smoke"))
        w.write(CaseRecord(case_id="c1", outcome="CRASH", run_id="r", reason="boom",
                           error="\x1b[31mred traceback\x1b[0m\x00", repro="moe-validate repro c1"))
    root = ET.parse(write_junit(results, tmp_path / "j.xml")).getroot()
    assert "red traceback" in root.find("testsuite/testcase/error").text


# --- the structure CI tools read, checked without a schema file -------------------------------
# What Jenkins' junit plugin, GitLab and Surefire-style readers take from a JUnit file, written as
# rules (no schema text copied): <testsuites> holding <testsuite>s; a suite's name, its counts
# (non-negative integers that agree with its testcases), a decimal time, an ISO 8601 timestamp;
# <properties> (only first, <property name value> inside) before the testcases and system-out/err
# after them; each testcase with name, classname and a decimal time, and at most one of
# <failure>/<error>/<skipped> (failure and error with a message and a type) plus system-out/err.
_OUTCOME_TAGS = ("failure", "error", "skipped")


def _junit_problems(root: ET.Element):
    import datetime

    problems = []

    def number(el, name, kind, required=True):
        value = el.get(name)
        if value is None:
            if required:
                problems.append(f"<{el.tag} {el.get('name')!r}> lacks {name}")
            return None
        try:
            parsed = kind(value)
        except ValueError:
            problems.append(f"<{el.tag}> {name}={value!r} is not a {kind.__name__}")
            return None
        if parsed < 0:
            problems.append(f"<{el.tag}> {name}={value!r} is negative")
        return parsed

    if root.tag != "testsuites":
        problems.append(f"root is <{root.tag}>, not <testsuites>")
    for child in root:
        if child.tag != "testsuite":
            problems.append(f"<testsuites> holds <{child.tag}>")
    for suite in root.iter("testsuite"):
        if not suite.get("name"):
            problems.append("a <testsuite> lacks its name")
        counts = {k: number(suite, k, int, required=(k == "tests")) for k in ("tests", "failures", "errors", "skipped")}
        number(suite, "time", float)
        if suite.get("timestamp") is not None:
            try:
                datetime.datetime.fromisoformat(suite.get("timestamp"))
            except ValueError:
                problems.append(f"timestamp {suite.get('timestamp')!r} is not ISO 8601")
        tags = [c.tag for c in suite]
        body = [t for t in tags if t not in ("system-out", "system-err")]
        if any(t not in ("properties", "testcase") for t in body):
            problems.append(f"<testsuite> holds {sorted(set(body) - {'properties', 'testcase'})}")
        if "properties" in tags and (tags.index("properties") != 0 or tags.count("properties") > 1):
            problems.append("<properties> must be the suite's one first child")
        tail = [i for i, t in enumerate(tags) if t in ("system-out", "system-err")]
        if tail and "testcase" in tags and min(tail) < max(i for i, t in enumerate(tags) if t == "testcase"):
            problems.append("system-out/err must follow the testcases")
        for prop in suite.iter("property"):
            if prop.get("name") is None or prop.get("value") is None:
                problems.append(f"a <property> lacks name or value: {prop.attrib}")
        cases = suite.findall("testcase")
        found = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
        for tc in cases:
            if not tc.get("name") or not tc.get("classname"):
                problems.append(f"a <testcase> lacks name or classname: {tc.attrib}")
            number(tc, "time", float)
            outcome = [c for c in tc if c.tag in _OUTCOME_TAGS]
            if len(outcome) > 1:
                problems.append(f"testcase {tc.get('name')!r} has {len(outcome)} outcome elements")
            # a testcase's own <properties> (pytest's record_property writes them) must come first
            body = [c.tag for c in tc if c.tag != "properties" or tc[0] is not c]
            if any(t not in _OUTCOME_TAGS + ("system-out", "system-err") for t in body):
                problems.append(f"testcase {tc.get('name')!r} holds {[c.tag for c in tc]}")
            for c in outcome:
                found[{"failure": "failures", "error": "errors", "skipped": "skipped"}[c.tag]] += 1
                if c.tag != "skipped" and not (c.get("message") and c.get("type")):
                    problems.append(f"<{c.tag}> of {tc.get('name')!r} lacks message or type")
        for key, n in found.items():
            if counts.get(key) is not None and counts[key] != n:
                problems.append(f"testsuite says {key}={counts[key]}, its testcases {n}")
    return problems


def test_run_junitxml_has_the_structure_ci_tools_read(tmp_path, monkeypatch, capsys):
    from moe_validate.cli import main

    monkeypatch.syspath_prepend(str(HERE))
    xml = tmp_path / "ci" / "junit.xml"
    code = main(["run", "--suite", "smoke", "--filter", "*-none-silu-M7N64K64E4k2-s[0-3]", "--backend",
                 "fake_backends:Mixed", "--workers", "0", "--out", str(tmp_path / "run"), "--no-report",
                 "--junitxml", str(xml)])
    assert code == 1 and f"junit:   {xml}" in capsys.readouterr().out
    root = ET.parse(xml).getroot()
    assert _junit_problems(root) == []
    (suite,) = root.iter("testsuite")
    assert [c.tag for c in suite][0] == "properties"
    assert sorted(child.tag for tc in suite.iter("testcase") for child in tc
                  if child.tag != "properties") == ["error", "failure", "skipped"]


@pytest.mark.parametrize("plant, expected", [
    (lambda s: s.set("failures", "7"), "failures=7, its testcases 1"),
    (lambda s: s.set("time", "soon"), "time='soon' is not a float"),
    (lambda s: s.find("testcase").append(ET.Element("failure", message="m", type="t"))
     or s.find("testcase").append(ET.Element("skipped")), "outcome elements"),
    (lambda s: s.append(ET.Element("properties")), "one first child"),
    (lambda s: s.find("testcase").attrib.pop("classname"), "lacks name or classname"),
    (lambda s: s.set("timestamp", "yesterday"), "not ISO 8601"),
])
def test_the_structure_check_catches_what_ci_tools_reject(mixed_run, tmp_path, plant, expected):
    root = ET.parse(write_junit(mixed_run.results_path, tmp_path / "junit.xml")).getroot()
    assert _junit_problems(root) == []
    plant(root.find("testsuite"))
    assert any(expected in p for p in _junit_problems(root)), _junit_problems(root)
