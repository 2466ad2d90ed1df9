"""JUnit XML of a results file, for CI dashboards (``moe-validate run --junitxml FILE``).

The layout is the one CI tools read and pytest's ``--junitxml`` writes: one ``<testsuites>``
holding one ``<testsuite>`` (counts, time, timestamp, hostname, the run's properties) with one
``<testcase>`` per case. ``classname`` is ``moe_validate.<suite>.<dtype>.<scheme>``, so a
dashboard groups cases by suite and precision; ``name`` is the case id. A FAIL is a
``<failure>``, a case that reached no verdict (CRASH, COMPILE_ERROR, OOM, TIMEOUT, NOT_RUN) an
``<error>``, a SKIP a ``<skipped>`` with its reason. Failure and error texts are the pytest
path's: the case's message, then ``repro: <command>``; a failure's message leads with the
verdict that failed ("accuracy (budget vs exact): ..." or "conformance (gate vs mirror): ...").
A compared case carries both verdicts as testcase properties (``accuracy``, ``conformance``:
PASS or FAIL, with ``*_margin``), plus ``gating`` and ``profile``; a conformance FAIL that does
not gate shows there and in the case's ``<system-out>``, on a passing testcase. Testcase
properties are where pytest writes ``record_property`` (its xunit1 layout, read by Jenkins and
GitLab); the xunit2 schema has no place for them.

Checked once (2026-12-02) with xmlschema against the Jenkins xunit plugin's junit-10.xsd, which
pytest's own tests use: valid except ``<error>``, which that schema spells ``errors`` and which
pytest's ``--junitxml`` writes as ``<error>`` too (test_junit.py compares with pytest's output,
and checks the structure CI readers rely on, as rules, on every test run).
"""

from __future__ import annotations

import os
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional, Union

from moe_validate.results import CaseRecord, Outcome, load_results
from moe_validate.verdicts import not_gating_conformance_failure

__all__ = ["write_junit", "junit_tree"]

# Outcomes that end in no verdict about the numbers: CI tools count these as errors, not failures.
_ERROR_OUTCOMES = (Outcome.CRASH, Outcome.COMPILE_ERROR, Outcome.OOM, Outcome.TIMEOUT, Outcome.NOT_RUN)


# Characters XML 1.0 forbids (control codes other than tab and newlines): a traceback with
# terminal colours would otherwise make the whole file unreadable to the CI tool.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("?", text)


def _classname(suite: str, rec: CaseRecord) -> str:
    params = rec.params or {}
    return f"moe_validate.{suite}.{params.get('dtype', 'unknown')}.{params.get('scheme', 'unknown')}"


def _case_message(rec: CaseRecord) -> str:
    """The first line CI shows: the pytest path's message for a case without its evaluation."""
    from moe_validate.run.case import CaseResult

    return CaseResult(rec).message()


def _testcase(suite: str, rec: CaseRecord) -> ET.Element:
    el = ET.Element("testcase", classname=_classname(suite, rec), name=rec.case_id,
                    time=f"{float(rec.duration_s or 0.0):.3f}")
    _verdict_properties(el, rec)
    outcome = rec.outcome_enum
    if outcome is Outcome.SKIP:
        reason = _xml_text(rec.reason or "not supported")
        ET.SubElement(el, "skipped", type="moe_validate.skip", message=reason).text = reason
    elif outcome.is_bad:
        message = _xml_text(_case_message(rec))
        tag = "error" if outcome in _ERROR_OUTCOMES else "failure"
        child = ET.SubElement(el, tag, type=outcome.value, message=message.splitlines()[0])
        child.text = f"{message}\nrepro: {_xml_text(rec.repro)}" if rec.repro else message
    elif not_gating_conformance_failure(rec):
        ET.SubElement(el, "system-out").text = _xml_text(rec.reason or "conformance FAIL (not gating)")
    return el


def _verdict_properties(el: ET.Element, rec: CaseRecord) -> None:
    """Both verdicts (and what gated, which profile) as ``<properties>`` of a compared case."""
    if not rec.verdicts:
        return
    props = ET.SubElement(el, "properties")
    for name, verdict in rec.verdicts.items():
        ET.SubElement(props, "property", name=name, value=str(verdict.get("outcome")))
        if verdict.get("margin") is not None:
            ET.SubElement(props, "property", name=f"{name}_margin", value=f"{float(verdict['margin']):.4g}")
    if rec.gating:
        ET.SubElement(props, "property", name="gating", value=",".join(rec.gating))
    if rec.profile:
        ET.SubElement(props, "property", name="profile", value=_xml_text(rec.profile))


def junit_tree(results: Union[str, Path, Iterable[Union[str, Path]]], *, suite: Optional[str] = None,
               timestamp: Optional[str] = None) -> ET.ElementTree:
    """The JUnit tree of the cases in ``results`` (one path or several: the shards of one run)."""
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    rs = load_results(paths)
    header = rs.headers[0] if rs.headers else None
    suite = suite or (header.get("suite") if header is not None else None) or "run"
    counts = rs.counts()
    errors = sum(counts.get(o.value, 0) for o in _ERROR_OUTCOMES)
    top = ET.Element("testsuites", name="moe-validate")
    ts = ET.SubElement(top, "testsuite", name=f"moe_validate.{suite}", errors=str(errors),
                       failures=str(counts.get(Outcome.FAIL.value, 0)), skipped=str(counts.get(Outcome.SKIP.value, 0)),
                       tests=str(len(rs.cases)), time=f"{sum(float(c.duration_s or 0.0) for c in rs.cases):.3f}",
                       timestamp=timestamp or (header.get("started") if header is not None else None) or "",
                       hostname=socket.gethostname())
    if not ts.get("timestamp"):
        del ts.attrib["timestamp"]
    run_facts = {k: header.get(k) for k in ("backend", "run_id", "shard")} if header is not None else {}
    present = {k: v for k, v in {"suite": suite, **run_facts}.items() if v is not None}
    if present:
        pe = ET.SubElement(ts, "properties")
        for name, value in present.items():
            ET.SubElement(pe, "property", name=name, value=_xml_text(str(value)))
    for rec in rs.cases:
        ts.append(_testcase(suite, rec))
    return ET.ElementTree(top)


def write_junit(results: Union[str, Path, Iterable[Union[str, Path]]], out_path: Union[str, Path], *,
                suite: Optional[str] = None) -> Path:
    """Write the JUnit XML of ``results`` to ``out_path`` (atomically: CI never reads half a file)."""
    out = Path(out_path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    tree = junit_tree(results, suite=suite)
    ET.indent(tree)
    tmp = out.with_name(out.name + ".tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out)
    return out
