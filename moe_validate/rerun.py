"""``moe-validate run --rerun-failed results.jsonl``: the cases that did not pass last time.

A case is re-run when its LAST record in the file (in file order: a ``--resume`` or a later
run appended to the same file replaces an earlier verdict) is anything but PASS or SKIP. The
cases are rebuilt from the records' own ``params``, so the re-run is exactly what ran (the
suite, ``--repeat --fresh-seeds`` seeds and all) whatever the default suite is now; ``--filter``
narrows them further.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from moe_validate.matrix import Case, filter_cases
from moe_validate.results import Outcome

__all__ = ["failed_cases", "last_outcomes"]


def last_outcomes(path: Union[str, Path]) -> Tuple[Optional[str], Dict[str, Tuple[str, dict]]]:
    """(the suite of the file's first header, {case id: (last outcome, params)}) of a results file.

    Raises ValueError naming the file and line for a missing file or a malformed line (a torn
    LAST line, left by a killed run, is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--rerun-failed: {p} does not exist or is not a file")
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    suite: Optional[str] = None
    last: Dict[str, Tuple[str, dict]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # a run killed mid-write: its last line is torn, the rest are whole
            raise ValueError(f"--rerun-failed: {p}:{number} is not a JSON record") from None
        if not isinstance(rec, dict):
            raise ValueError(f"--rerun-failed: {p}:{number} is not a JSON object")
        if rec.get("kind") == "header" and suite is None:
            suite = rec.get("suite")
        elif rec.get("kind") == "case":
            try:
                Outcome(rec.get("outcome"))
            except ValueError:
                raise ValueError(f"--rerun-failed: {p}:{number}: outcome must be one of "
                                 f"{', '.join(o.value for o in Outcome)}; got {rec.get('outcome')!r}") from None
            last[rec.get("case_id")] = (rec["outcome"], rec.get("params") or {})
    return suite, last


def failed_cases(path: Union[str, Path], filter_expr: Optional[str] = None) -> Tuple[str, List[Case]]:
    """(the file's suite, the cases whose last outcome in ``path`` was not PASS or SKIP, in file
    order, narrowed by ``filter_expr``). The suite is the original one, so a re-run's JUnit test
    ids (classname, name) are those of the first run and CI tools see the same tests pass.
    ValueError for an unusable file or params."""
    suite, last = last_outcomes(path)
    cases = []
    for case_id, (outcome, params) in last.items():
        if Outcome(outcome) in (Outcome.PASS, Outcome.SKIP):
            continue
        try:
            case = Case(**params)
        except TypeError as exc:
            raise ValueError(f"--rerun-failed: case {case_id} in {path} has params that make no Case: {exc}") from None
        if case.id != case_id:
            raise ValueError(f"--rerun-failed: case {case_id} in {path} has params of another case ({case.id})")
        cases.append(case)
    if filter_expr:
        cases = filter_cases(cases, filter_expr)
    return suite or "run", cases
