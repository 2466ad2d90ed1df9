"""``run --backend A --against B``: two backends' outputs compared directly, under the derived bounds.

B's output takes the oracle's place. The bound is the gate's, counted once for each side: where
both backends are correct, each lies within the gate's per-element bound ``g`` of the mirror
(``|A - m| <= g`` and ``|B - m| <= g``), so by the triangle inequality ``|A - B| <= 2 g``. That
is the allowed difference per element; ``sigma`` is ``sqrt(2)`` times the gate's (two
independent rounding errors). There is no count test: two correct kernels may each flip a
different set of roundings, and the gate's allowance bounds the flips of one kernel against the
mirror, not the difference of two kernels.

So a pass says: A and B agree as closely as two correct kernels must. It does not say either is
correct (A's own verdicts do); for that the check records B's own margin against the gate too
(``other_margin``, > 1: B itself is outside its bound, and A's disagreement may be B's fault).
The check lands in ``record.checks`` as ``against:<B>`` and decides the outcome like any check.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

__all__ = ["against_check", "AGAINST_BOUND"]

AGAINST_BOUND = "2 x the gate's per-element bound (each side's allowed distance to the mirror, summed); no count test"


def _rows(case, M: int) -> Optional[torch.Tensor]:
    """The token rows the comparison covers: the case's reference sample for a huge case, else all."""
    from moe_validate import matrix
    from moe_validate.compare import sampled_rows

    if isinstance(case, matrix.Case) and matrix.reference_is_sampled(case):
        return sampled_rows(M, matrix.REFERENCE_SAMPLE_ROWS, case.seed)
    return None


def _other_output(case, inputs, spec: str):
    """(B's output, None) or (None, why B gave none)."""
    from moe_validate.backends import get_backend
    from moe_validate.run.case import one_line

    try:
        other = get_backend(spec)
        supported, why = other.supports(case)
        if not supported:
            return None, f"{spec} does not support the case: {why or 'no reason given'}"
        out = other.run(inputs, case)
    except Exception as exc:  # B's failure is this comparison's failure, never A's crash
        return None, f"{spec} raised {one_line(exc)}"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(inputs.hidden_states.shape):
        return None, f"{spec} returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, not [M, K]"
    return out, None


def against_check(case, inputs, out: torch.Tensor, spec: str) -> Dict[str, Any]:
    """The ``against:<spec>`` check of ``out`` (backend A's) against backend ``spec``'s output for ``inputs``.

    FAIL where an element differs by more than the bound (``AGAINST_BOUND``), where B produced no
    output (it raised or returned the wrong shape: the comparison did not happen, which must not
    read as agreement), SKIP with B's reason where B does not support the case.
    """
    import reference

    from moe_validate import tolerance
    from moe_validate.compare import metric_panel, passes
    from moe_validate.contract.rules import interpreting
    from moe_validate.contract.spec import storage_dtype
    from moe_validate.inputs import select_tokens

    name = f"against:{spec}"
    other, why = _other_output(case, inputs, spec)
    if other is None:
        outcome = "SKIP" if "does not support" in why else "FAIL"
        return {"name": name, "outcome": outcome, "reason": f"{name}: {why}", "bound": AGAINST_BOUND}
    rows = _rows(case, inputs.hidden_states.shape[0])
    sub = inputs if rows is None else select_tokens(inputs, rows)
    a, b = (out, other) if rows is None else (out[rows.to(out.device)], other[rows.to(other.device)])
    mirror = reference.run_stages(*sub.args(), **sub.kwargs(), precision="mirror")
    gate = tolerance.derive(case, sub, mirror, native_gpu=out.is_cuda and not interpreting())["gate"]
    storage = storage_dtype(inputs.hidden_states.dtype)
    dev = mirror["out"].device
    panel = metric_panel(a.to(dev), b.to(dev), 2 * gate.allowed, math.sqrt(2) * gate.sigma, storage)
    ok, why = passes(panel)
    own = metric_panel(b.to(dev), mirror["out"].to(torch.float64), gate.allowed, gate.sigma, storage)
    if own["nan_where_ref_finite"]:  # elements B gives no number for cannot vouch for A's
        ok, why = False, (f"{spec} returned NaN/Inf at {own['nan_where_ref_finite']} element(s) where the mirror is "
                          "finite: not comparable there")
    margin = panel["max_normalized"]["margin"]
    worst = panel["worst"][0] if panel["worst"] else None
    summary = (f"{name}: max |A - B| / (2 x gate) = {panel['max_normalized']['value']:.3g}, "
               f"{int(panel['differing']['value'])} of {panel['differing']['of']} elements differ, "
               f"max {panel['ulp']['value']:g} ulp")
    return {
        "name": name,
        "outcome": "PASS" if ok else "FAIL",
        "reason": summary if ok else f"{name}: {why}",
        "bound": AGAINST_BOUND,
        "margin": margin,
        "other_margin": own["max_normalized"]["margin"],
        "differing": int(panel["differing"]["value"]),
        "max_ulp": panel["ulp"]["value"],
        "worst": worst,
        "compared_rows": None if rows is None else len(rows),
    }
