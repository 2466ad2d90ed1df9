"""The comparison engine: metric panels, a pass/fail policy, and failure anatomy.

``evaluate(case, inputs, out)`` runs the reference itself (``mirror`` and ``exact``, on the
inputs' device), derives the per-element bounds (``tolerance.derive``), and returns an
``Evaluation``: data for the results file, never an exception for a numerical failure. Callers
decide whether to raise (``Evaluation.message()`` has PyTorch's anatomy, the diagnosis leading:
headline with the case id and ``moe_validate.diagnosis``'s one line; mismatched elements k / n
(p%); the one worst element, by |diff| / allowed, with the allowance there (the relative
difference only where the reference is larger than its allowance); NaN/Inf listed apart; the
first few coordinates with both values).

A panel (results.py schema) holds: ``max_abs``, ``max_normalized`` (max |d| / allowed: the
deciding metric, allowed 1), ``rel_frobenius``, ``cosine``, ``norm_ratio``, ``z_rms`` and
``z_max`` (d / sigma, sigma the modelled standard deviation), ``ulp`` (max ULP distance in the
storage dtype S), ``differing`` (elements not bit-equal to the oracle, with ``of`` = all; its
``allowed`` is the gate's count test), each ``{"value", "allowed", "margin"}``; plus ``worst``,
``nan_inf``, ``exceed_count`` and ``exceed_fraction``.

Two verdicts (docs/PROFILES.md): **accuracy** (the ``exact`` panel against the budget: as accurate
as the scheme allows, whatever the implementation rounds) and **conformance** (the ``mirror``
panel against the gate, count test included: rounds exactly where its declared numerics profile
says). ``moe_validate.verdicts.gating_policy`` decides which of them decide a case's outcome
(``from_arrays(gating=...)``). A conformance FAIL that does not gate is still said in the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from moe_validate import tolerance as _tol
from moe_validate.diagnosis import TILE  # nominal (token, column) tile used to name where an element lives
from moe_validate.contract.profile import SPEC_PROFILE, Fp8Accumulation, NumericsProfile
from moe_validate.contract.spec import MoEInputs, QuantScheme, storage_dtype
from moe_validate.verdicts import GATE_CHOICES, VERDICT_ORACLE, VERDICTS, conformance_note

__all__ = ["Evaluation", "evaluate", "metric_panel", "passes", "sampled_rows", "nonfinite_tokens", "TILE",
           "WORST_COUNT", "SAMPLE_HEAD_ROWS", "SAMPLE_TAIL_ROWS", "OVERFLOW_KEY"]

F64 = torch.float64
WORST_COUNT = 8
HEATMAP_MAX_CELLS = 64
_MESSAGE_COORDS = 5


def _m(value, allowed=None) -> dict:
    value = float(value)
    margin = None
    if allowed is not None:
        allowed = float(allowed)
        margin = value / allowed if allowed > 0 else (0.0 if value == 0 else math.inf)
    return {"value": value, "allowed": allowed, "margin": margin}


def _expert_grid(expert_of: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    if expert_of is None:
        return None
    e = expert_of.to("cpu").long()
    if e.dim() == 1:
        e = e[:, None].expand(shape)
    return e


def metric_panel(kernel: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, sigma: torch.Tensor,
                 storage: torch.dtype, token_expert: Optional[torch.Tensor] = None,
                 tile: Tuple[int, int] = TILE, count_allowed: Optional[int] = None) -> dict:
    """The full metric panel of ``kernel`` against one oracle ``ref`` with per-element bounds.

    ``token_expert``: [M] or [M, K] local expert id to name in worst elements (-1 = none).
    ``count_allowed``: the most elements that may differ from ``ref`` at all (the gate's count
    test, tolerance.count_allowance); the panel's ``differing`` always counts them.
    """
    if kernel.shape != ref.shape or allowed.shape != ref.shape:
        raise ValueError(f"kernel, ref and allowed must have one shape; got {tuple(kernel.shape)}, "
                         f"{tuple(ref.shape)}, {tuple(allowed.shape)}")
    k = kernel.detach().to("cpu", F64)
    r = ref.detach().to("cpu", F64)
    a = allowed.detach().to("cpu", F64)
    sg = sigma.detach().to("cpu", F64).clamp_min(1e-300)
    n = r.numel()
    k_nan, k_inf = torch.isnan(k), torch.isinf(k)
    r_nan, r_inf = torch.isnan(r), torch.isinf(r)
    r_fin = ~(r_nan | r_inf)
    both = r_fin & torch.isfinite(k)
    bad_special = r_fin & ~torch.isfinite(k)  # kernel NaN/Inf where the reference is finite
    d = torch.where(both, (k - r).abs(), torch.zeros_like(r))
    norm = torch.where(both, d / a.clamp_min(1e-300), torch.zeros_like(r))
    norm = torch.where(both & (d == 0), torch.zeros_like(norm), norm)
    norm = torch.where(bad_special, torch.full_like(norm, math.inf), norm)
    exceed = (both & (d > a)) | bad_special
    panel: dict = {}
    if n and both.any():
        i_abs = int(torch.argmax(torch.where(both, d, torch.full_like(d, -1.0))))
        panel["max_abs"] = _m(d.view(-1)[i_abs], a.view(-1)[i_abs])
    else:
        panel["max_abs"] = _m(0.0, 0.0)
    panel["max_normalized"] = _m(norm.max() if n else 0.0, 1.0)
    kf, rf = torch.where(both, k, 0.0), torch.where(both, r, 0.0)
    rn, kn = float(rf.norm()), float(kf.norm())
    dn = float((kf - rf).norm())
    an = float(torch.where(both, a, 0.0).norm())
    panel["rel_frobenius"] = _m(dn / rn if rn else (0.0 if dn == 0 else math.inf), an / rn if rn else None)
    panel["cosine"] = _m(float((kf * rf).sum()) / (kn * rn) if kn and rn else (1.0 if kn == rn else 0.0))
    panel["norm_ratio"] = _m(kn / rn if rn else (1.0 if kn == 0 else math.inf))
    z = torch.where(both, d / sg, torch.zeros_like(d))
    cnt = int(both.sum())
    panel["z_rms"] = _m(float((z ** 2).sum() / cnt) ** 0.5 if cnt else 0.0)
    panel["z_max"] = _m(z.max() if n else 0.0)
    # ULP distance in S against the oracle rounded to S (meaningful for a floating S)
    r_s = r.to(storage).to(F64)
    ulps = torch.where(both, (k - r_s).abs() / _tol.ulp(r_s, storage), torch.zeros_like(d))
    panel["ulp"] = _m(ulps.max() if n else 0.0)
    panel["nan_inf"] = {"kernel_nan": int(k_nan.sum()), "kernel_inf": int(k_inf.sum()),
                        "ref_nan": int(r_nan.sum()), "ref_inf": int(r_inf.sum())}
    panel["nan_where_ref_finite"] = int(bad_special.sum())
    panel["exceed_count"] = int(exceed.sum())
    # elements not bit-equal to the oracle (a kernel NaN/Inf where the reference is finite counts)
    differing = int(((k != r) & both).sum()) + int(bad_special.sum())
    panel["differing"] = {**_m(differing, count_allowed), "of": n}
    panel["exceed_fraction"] = float(exceed.sum()) / n if n else 0.0
    # worst elements: by normalized error (NaN/Inf where finite first, as inf)
    eg = _expert_grid(token_expert, r.shape)
    worst = []
    if n:
        order = torch.argsort(norm.view(-1), descending=True)[:WORST_COUNT]
        for idx in order.tolist():
            m_, c_ = divmod(idx, r.shape[1])
            if norm.view(-1)[idx] == 0 and worst:
                break
            worst.append({
                "token": m_, "column": c_,
                "expert": int(eg[m_, c_]) if eg is not None else None,
                "tile": f"r{m_ // tile[0]}c{c_ // tile[1]}",
                "kernel": float(k[m_, c_]), "reference": float(r[m_, c_]),
                "diff": float(d[m_, c_]) if both[m_, c_] else float("nan"),
                "allowed": float(a[m_, c_]),
                "normalized": float(norm[m_, c_]),
                "ulp": float(ulps[m_, c_]),
            })
    panel["worst"] = worst
    return panel


def passes(panel: dict) -> Tuple[bool, Optional[str]]:
    """The policy: (True, None) or (False, the failing metric with observed vs allowed).

    A kernel NaN/Inf where the reference is finite always fails; otherwise every element must
    be within its bound (``max_normalized`` <= 1), and where the panel carries a count test, no
    more elements may differ from the oracle than it allows.
    """
    bad = panel.get("nan_where_ref_finite", 0)
    if bad:
        ni = panel["nan_inf"]
        return False, (f"kernel NaN/Inf where the reference is finite at {bad} element(s) "
                       f"(kernel NaN {ni['kernel_nan']}, Inf {ni['kernel_inf']})")
    mn = panel["max_normalized"]
    if mn["value"] > 1.0:
        w = panel["worst"][0] if panel["worst"] else {}
        return False, (f"max_normalized {mn['value']:.3g} > 1: |diff| {w.get('diff', float('nan')):.3g} at "
                       f"(token {w.get('token')}, column {w.get('column')}) vs allowed {w.get('allowed', float('nan')):.3g}; "
                       f"{panel['exceed_count']} element(s) over")
    diff = panel.get("differing") or {}
    if diff.get("allowed") is not None and diff["value"] > diff["allowed"]:
        return False, (f"count: {int(diff['value'])} of {diff.get('of', '?')} element(s) differ from the oracle, more than the {int(diff['allowed'])} "
                       "a correct kernel's rounding flips can explain (every element is inside its own bound: "
                       "a systematic error smaller than one flip)")
    return True, None


_VERDICT_LABEL = {"accuracy": "accuracy (budget vs exact)", "conformance": "conformance (gate vs mirror)"}


def _verdict(panel: Optional[dict]) -> dict:
    """{"outcome", "reason", "margin"} of one panel: margin = the largest observed / allowed of the
    tests that decide it (max_normalized and, where there is one, the count)."""
    if panel is None:
        return {"outcome": "SKIP", "reason": "not compared", "margin": None}
    ok, why = passes(panel)
    margins = [panel["max_normalized"]["margin"]]
    diff = panel.get("differing") or {}
    if diff.get("allowed") is not None:
        margins.append(diff.get("margin"))
    margins = [m for m in margins if m is not None]
    return {"outcome": "PASS" if ok else "FAIL", "reason": why, "margin": max(margins) if margins else None}


@dataclass
class Evaluation:
    passed: bool
    reason: Optional[str]
    tolerance: dict
    metrics: dict
    detail: Optional[dict]
    worst_margin: Optional[float]
    case_id: str = ""
    # None: every token row was compared; else {"compared", "of", "mode", "rows"} (a row sample)
    compared_rows: Optional[dict] = None
    # {"accuracy": {"outcome", "reason", "margin"}, "conformance": {...}} (results.py CaseRecord.verdicts)
    verdicts: Dict[str, dict] = field(default_factory=dict)
    gating: Tuple[str, ...] = GATE_CHOICES["both"]  # the verdicts that decide ``passed``
    profile: str = SPEC_PROFILE.name  # the numerics profile the mirror followed
    _anatomy: dict = field(default_factory=dict, repr=False)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, case, kernel: torch.Tensor, oracles: Dict[str, tuple], tolerance: Optional[dict] = None,
                    expert_of: Optional[torch.Tensor] = None, num_experts: Optional[int] = None,
                    storage: Optional[torch.dtype] = None, always_detail: bool = False,
                    token_of_row: Optional[List[int]] = None, gating: Tuple[str, ...] = GATE_CHOICES["both"],
                    profile: str = SPEC_PROFILE.name) -> "Evaluation":
        """``oracles``: {"mirror": (ref, allowed, sigma[, count_allowed]), "exact": (...)}.

        ``token_of_row``: for a comparison of selected rows, the token (row of the whole batch)
        each compared row is; reasons, worst elements and messages then name those tokens.
        ``gating``: the verdicts (VERDICTS) that decide ``passed``; ``profile``: the name of the
        numerics profile the mirror followed (said when conformance fails).
        """
        if not gating or any(v not in VERDICTS for v in gating):
            raise ValueError(f"gating must be a non-empty tuple of {', '.join(VERDICTS)}; got {gating!r}")
        storage = storage or storage_dtype(kernel.dtype)
        panels = {name: metric_panel(kernel, o[0], o[1], o[2], storage, expert_of,
                                     count_allowed=o[3] if len(o) > 3 else None)
                  for name, o in oracles.items()}
        if token_of_row is not None:
            for panel in panels.values():
                for w in panel["worst"]:
                    w["token"] = token_of_row[w["token"]]
                    w["tile"] = f"r{w['token'] // TILE[0]}c{w['column'] // TILE[1]}"
        verdicts = {v: _verdict(panels.get(VERDICT_ORACLE[v])) for v in VERDICTS}
        failed = [v for v in VERDICTS if verdicts[v]["outcome"] == "FAIL"]
        gating_failed = [v for v in failed if v in gating]
        passed = not gating_failed
        # the failing gating verdict leads (accuracy first: it is the one that matters to everyone),
        # then a conformance failure that does not gate, in words
        reasons = [f"{_VERDICT_LABEL[v]}: {verdicts[v]['reason']}" for v in gating_failed]
        if "conformance" in failed and "conformance" not in gating:
            reasons.append(conformance_note(profile, verdicts["conformance"]["reason"]))
        reason = "; ".join(reasons) or None
        # The anatomy and the detail of a failed case are drawn against the mirror where conformance
        # failed too (gating or not): its bound is the tighter one, so it names where the error lives
        # most sharply; against the exact oracle where only accuracy failed.
        failing = None
        if gating_failed:
            failing = VERDICT_ORACLE["conformance" if "conformance" in failed else gating_failed[0]]
        gate = panels.get("mirror") or next(iter(panels.values()))
        worst_margin = gate["max_normalized"]["margin"]
        ev = cls(passed=passed, reason=reason, tolerance=tolerance or {}, metrics=panels, detail=None,
                 worst_margin=worst_margin, case_id=getattr(case, "id", str(case)), verdicts=verdicts,
                 gating=tuple(v for v in VERDICTS if v in gating), profile=profile)
        which = failing or ("mirror" if "mirror" in oracles else next(iter(oracles)))
        label = {o: _VERDICT_LABEL[v] for v, o in VERDICT_ORACLE.items()}
        ref, allowed = oracles[which][:2]
        ev._anatomy = _anatomy(kernel, ref, allowed, which, label.get(which, which), token_of_row, expert_of)
        if not passed or always_detail:
            ev.detail = _detail(kernel, ref, allowed, storage, expert_of, num_experts)
            if token_of_row is not None:
                ev.detail["heatmap"]["rows"] = "the compared token rows in order (not contiguous tokens)"
        return ev

    # --- output -----------------------------------------------------------------------------
    def record(self) -> dict:
        """The case-record fields this evaluation fills (results.py schema)."""
        return {"tolerance": self.tolerance, "metrics": self.metrics, "detail": self.detail,
                "worst_margin": self.worst_margin, "reason": self.reason, "compared_rows": self.compared_rows,
                "verdicts": self.verdicts, "gating": list(self.gating), "profile": self.profile}

    def skipped_checks(self) -> List[dict]:
        """A SKIP check row for every part of the judgment a bound did not apply (NOT_APPLIED_NOTES)."""
        return [{"name": check, "outcome": "SKIP", "reason": self.tolerance[bound][key]}
                for bound, key, check in NOT_APPLIED_NOTES if self.tolerance.get(bound, {}).get(key)]

    def rows_note(self) -> Optional[str]:
        """"compared rows: 256 of 16512, sampled (...)" for a row-sampled comparison, else None."""
        c = self.compared_rows
        if not c:
            return None
        return f"compared rows: {c['compared']} of {c['of']}, {c['mode']} ({c['how']})"

    def message(self, diagnosis: Optional[str] = None) -> str:
        """The failure anatomy, the diagnosis leading: headline (case id, outcome, diagnosis), the
        deciding reason, mismatched elements k / n (p%), the one worst element (largest |diff| /
        allowed) with the allowance there, NaN/Inf apart, the first few mismatches.

        ``diagnosis``: the record's one-line summary (``moe_validate.diagnosis``); made here from
        this evaluation's panels when not given.
        """
        a = self._anatomy
        if diagnosis is None and not self.passed:
            diagnosis = self._diagnosis()
        head = f"{self.case_id}: {'PASS' if self.passed else 'FAIL'}"
        if diagnosis:
            head += f": {diagnosis}"
        lines = [head]
        if self.reason:  # a row-sampled comparison says so in its reason
            lines.append(f"reason: {self.reason}")
        if not a:
            return "\n".join(lines)
        lines.append(f"Mismatched elements: {a['mismatched']} / {a['total']} ({a['pct']:.1f}%) against {a['oracle']}")
        w = a.get("worst")
        if w is not None:
            where = f"index {w['index']}" + (f" (expert {w['expert']})" if w.get("expert") is not None else "")
            if w["special"]:
                lines.append(f"Worst element: {where}: kernel {w['kernel']:.6g} where the reference is {w['reference']:.6g}")
            else:
                rel = (f"; relative difference {w['diff'] / abs(w['reference']):.3g}"
                       if w["reference"] != 0 and abs(w["reference"]) > w["allowed"] else "")
                lines.append(f"Worst element (largest |diff| / allowed): {where}: kernel {w['kernel']:.6g}, reference "
                             f"{w['reference']:.6g}; |diff| {w['diff']:.6g} against {w['allowed']:.6g} allowed there "
                             f"({w['normalized']:.3g}x){rel}")
        if a["nan_where_finite"]:
            lines.append(f"NaN/Inf: kernel NaN at {a['kernel_nan']} element(s) where the reference is finite, "
                         f"Inf at {a['kernel_inf']}; first at {a['first_special']}")
        if a["coords"]:
            lines.append("First mismatches (index: kernel, reference, allowed there):")
            for idx, kv, rv, av in a["coords"]:
                lines.append(f"  {idx}: kernel {kv:.6g}, reference {rv:.6g} (allowed {av:.3g})")
        return "\n".join(lines)

    def _diagnosis(self) -> Optional[str]:
        from moe_validate.diagnosis import summary_of

        return summary_of({"outcome": "FAIL", "reason": self.reason, "metrics": self.metrics, "detail": self.detail,
                           "params": self._anatomy.get("shape", {})})


def _anatomy(kernel, ref, allowed, which, label, token_of_row: Optional[List[int]] = None,
             expert_of: Optional[torch.Tensor] = None) -> dict:
    k = kernel.detach().to("cpu", F64).contiguous()  # a strided output (a layout the contract flags) still reads
    r = ref.detach().to("cpu", F64)
    a = allowed.detach().to("cpu", F64)
    n = r.numel()
    fin = torch.isfinite(r) & torch.isfinite(k)
    special = torch.isfinite(r) & ~torch.isfinite(k)
    d = torch.where(fin, (k - r).abs(), torch.zeros_like(r))
    mism = (fin & (d > a)) | special
    out = {"oracle": label, "total": n, "mismatched": int(mism.sum()),
           "pct": 100.0 * float(mism.sum()) / n if n else 0.0,
           "nan_where_finite": int(special.sum()),
           "kernel_nan": int((torch.isnan(k) & torch.isfinite(r)).sum()),
           "kernel_inf": int((torch.isinf(k) & torch.isfinite(r)).sum()),
           "worst": None, "coords": [], "first_special": None,
           "shape": {"M": int(r.shape[0]), "K": int(r.shape[1])} if r.dim() == 2 else {}}

    def idx_of(flat):
        if r.dim() != 2:
            return (flat,)
        row, col = divmod(flat, r.shape[1])
        return (token_of_row[row] if token_of_row is not None else int(row), int(col))

    # One worst location: the element whose |diff| uses most of its own allowance (a kernel
    # NaN/Inf where the reference is finite first). The largest |diff| anywhere may sit where
    # much is allowed and pass; naming it would make a failing case read as within tolerance.
    norm = torch.where(fin, torch.where(d == 0, torch.zeros_like(d), d / a.clamp_min(1e-300)), torch.zeros_like(d))
    norm = torch.where(special, torch.full_like(norm, math.inf), norm)
    if n and (fin.any() or special.any()):
        iw = int(torch.argmax(norm.view(-1)))
        eg = _expert_grid(expert_of, r.shape)
        expert = int(eg.reshape(-1)[iw]) if eg is not None else None
        out["worst"] = {"index": idx_of(iw), "kernel": float(k.view(-1)[iw]), "reference": float(r.view(-1)[iw]),
                        "diff": float(d.view(-1)[iw]), "allowed": float(a.view(-1)[iw]),
                        "normalized": float(norm.view(-1)[iw]), "special": bool(special.view(-1)[iw]),
                        "expert": expert if expert is not None and expert >= 0 else None}
    if special.any():
        out["first_special"] = idx_of(int(torch.nonzero(special.view(-1))[0]))
    for flat in torch.nonzero(mism.view(-1)).view(-1)[:_MESSAGE_COORDS].tolist():
        out["coords"].append((idx_of(flat), float(k.view(-1)[flat]), float(r.view(-1)[flat]), float(a.view(-1)[flat])))
    return out


def _histogram(values: torch.Tensor, edges: List[float]) -> dict:
    v = values[torch.isfinite(values)]
    counts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        counts.append(int(((v >= lo) & (v < hi)).sum()))
    counts[-1] += int((v >= edges[-1]).sum())  # the last bin is open to the right
    counts.append(int(torch.isinf(values).sum()))
    return {"edges": edges, "counts": counts, "last_count_is": "non-finite (NaN/Inf where the reference is finite)"}


def _heat_cell(n: int) -> int:
    """Elements per heatmap cell along an extent of ``n``: the smallest power of two that keeps
    the cells within HEATMAP_MAX_CELLS. One element per cell for a small case (a 7 x 64 output is
    7 x 64 cells, not two tiles); a power of two either divides the nominal TILE or is a multiple
    of it, so a cell never straddles a tile edge."""
    cell = 1
    while math.ceil(n / cell) > HEATMAP_MAX_CELLS:
        cell *= 2
    return cell


def _detail(kernel, ref, allowed, storage, expert_of, num_experts) -> dict:
    k = kernel.detach().to("cpu", F64)
    r = ref.detach().to("cpu", F64)
    a = allowed.detach().to("cpu", F64).clamp_min(1e-300)
    fin = torch.isfinite(k) & torch.isfinite(r)
    special = torch.isfinite(r) & ~torch.isfinite(k)
    d = torch.where(fin, (k - r).abs(), torch.zeros_like(r))
    norm = torch.where(fin, torch.where(d == 0, torch.zeros_like(d), d / a), torch.zeros_like(d))
    norm = torch.where(special, torch.full_like(norm, math.inf), norm)
    M, K = r.shape if r.dim() == 2 else (r.numel(), 1)
    rt, ct = _heat_cell(M), _heat_cell(K)
    heat = []
    for i in range(0, M, rt):
        row = []
        for j in range(0, K, ct):
            blk = norm[i:i + rt, j:j + ct]
            row.append(float(blk.max()) if blk.numel() else 0.0)
        heat.append(row)
    per_expert = []
    eg = _expert_grid(expert_of, r.shape)
    if eg is not None:
        E = num_experts if num_experts is not None else int(eg.max()) + 1 if eg.numel() else 0
        for e in range(max(E, 0)):
            sel = eg == e
            per_expert.append(float(norm[sel].max()) if sel.any() else 0.0)
    r_s = r.to(storage).to(F64)
    ulps = torch.where(fin, (k - r_s).abs() / _tol.ulp(r_s, storage), torch.zeros_like(d))
    ulps = torch.where(special, torch.full_like(ulps, math.inf), ulps)
    norm_edges = [0.0, 1e-3, 1e-2, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0, 256.0]
    ulp_edges = [0.0, 0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 64.5, 1024.5]
    return {
        "heatmap": {"row_tile": rt, "col_tile": ct, "values": heat, "metric": "max |diff| / allowed"},
        "per_expert": per_expert,
        "histograms": {"normalized_error": _histogram(norm.view(-1), norm_edges),
                       "ulp_distance": _histogram(ulps.view(-1), ulp_edges)},
    }


def _expert_of_element(stages: dict) -> torch.Tensor:
    """[M, K]: of each token's valid routes, the local expert contributing most to column k."""
    c3 = stages["c3"].abs()
    valid = stages["route_valid"].to(torch.bool)
    if c3.shape[1] == 0 or c3.shape[0] == 0:
        return torch.full(stages["out"].shape, -1, dtype=torch.long)
    c3 = torch.where(valid[..., None], c3, torch.full_like(c3, -1.0))
    j = c3.argmax(1)  # [M, K]
    ex = torch.gather(stages["route_expert"].long(), 1, j)
    anyv = valid.any(1, keepdim=True).expand_as(ex)
    return torch.where(anyv, ex, torch.full_like(ex, -1)).cpu()


# Row sample of a huge case (matrix.reference_is_sampled): the first rows, the LAST rows (the
# highest route ids, where offsets that outgrow int32 wrap and where a tail tile ends) and a
# seeded draw from the rows between.
SAMPLE_HEAD_ROWS = 32
SAMPLE_TAIL_ROWS = 128


def sampled_rows(M: int, count: int, seed: int) -> torch.Tensor:
    """Sorted distinct token rows (int64, CPU): the first SAMPLE_HEAD_ROWS, the last
    SAMPLE_TAIL_ROWS and ``count`` minus those drawn from the middle with ``seed``; all M rows
    when ``count >= M``."""
    if M < 0 or count < 1:
        raise ValueError(f"sampled_rows needs M >= 0 and count >= 1; got M={M}, count={count}")
    if count >= M:
        return torch.arange(M)
    head = torch.arange(min(SAMPLE_HEAD_ROWS, count, M))
    tail_n = min(SAMPLE_TAIL_ROWS, count - head.numel())
    tail = torch.arange(M - tail_n, M)
    lo, hi = head.numel(), M - tail_n
    middle_n = max(0, min(count - head.numel() - tail_n, hi - lo))
    g = torch.Generator().manual_seed(seed)
    middle = lo + torch.randperm(hi - lo, generator=g)[:middle_n]
    return torch.unique(torch.cat([head, middle, tail]))  # unique() also sorts


def _note_sampled_rows(ev: Evaluation, rows: List[int], M: int) -> None:
    ev.compared_rows = {"compared": len(rows), "of": M, "mode": "sampled",
                        "how": f"first {SAMPLE_HEAD_ROWS}, last {SAMPLE_TAIL_ROWS}, the rest seeded",
                        "rows": rows}
    note = ev.rows_note()
    ev.reason = f"{ev.reason} [{note}]" if ev.reason else note


def _default_rows(case, M: int) -> Optional[torch.Tensor]:
    from moe_validate import matrix

    if isinstance(case, matrix.Case) and matrix.reference_is_sampled(case):
        return sampled_rows(M, matrix.REFERENCE_SAMPLE_ROWS, case.seed)
    return None


def nonfinite_tokens(inputs: MoEInputs) -> List[int]:
    """The tokens whose hidden-state row holds a NaN or an Inf (CPU ints, ascending)."""
    x = inputs.hidden_states
    if not x.is_floating_point() or x.element_size() == 1:  # pre-quantized fp8/int8 codes
        return []
    return torch.nonzero(~torch.isfinite(x).all(dim=1)).view(-1).cpu().tolist()


def _note_finite_rows(ev: Evaluation, rows: List[int], M: int, left_out: List[int]) -> None:
    ev.compared_rows = {"compared": len(rows), "of": M, "mode": "tokens with finite input",
                        "how": f"token(s) {left_out} hold NaN/Inf: their own rows are unspecified, the others "
                               f"must not see it (SPEC Bad input)",
                        "rows": rows}
    note = ev.rows_note()
    ev.reason = f"{ev.reason} [{note}]" if ev.reason else note


def evaluate(case, inputs: MoEInputs, out: torch.Tensor, rows: Optional[torch.Tensor] = None, *,
             profile: NumericsProfile = SPEC_PROFILE, gating: Tuple[str, ...] = GATE_CHOICES["both"],
             fp8_accumulation: Optional[Fp8Accumulation] = None) -> Evaluation:
    """Runs the reference (mirror and exact) and judges ``out`` (the kernel's [M, K] output).

    ``profile``: the numerics profile the backend declares: the mirror rounds where it says and
    the gate's flip model counts its roundings (conformance); ``exact`` and the budget do not
    depend on it (accuracy). ``gating``: the verdicts that decide ``passed`` (``gating_policy``).
    ``fp8_accumulation``: how the run's fp8 dots accumulated, as the backend reports it
    (``backends.ReportsAccumulation``); None: a GPU's are taken to be Hopper's fp8 MMA.

    ``rows`` (1-D token indices): run the reference on those tokens only and compare those rows
    of ``out``; sound where each output row depends on its own token alone (no batch-wide
    dynamic scale). Default: all rows, except for a case ``matrix.reference_is_sampled`` marks
    (its full float64 reference would not fit), which is compared on ``sampled_rows``. A sampled
    evaluation says so in ``compared_rows``, its reason and its message.

    Tokens whose input holds NaN or Inf (``nonfinite_tokens``) are left out the same way, and the
    reference runs without them: SPEC leaves their own rows unspecified and asks only that the
    other rows do not see them. Sound under the same condition (no batch-wide dynamic scale).
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor; got {type(out).__name__}")
    if fp8_accumulation is not None and not isinstance(fp8_accumulation, Fp8Accumulation):
        raise TypeError(f"fp8_accumulation (a backend's last_fp8_accumulation) must be a "
                        f"contract.profile.Fp8Accumulation or None; got {fp8_accumulation!r}")
    M, K = inputs.hidden_states.shape
    if tuple(out.shape) != (M, K):
        raise ValueError(f"out must be [M, K] = [{M}, {K}]; got {tuple(out.shape)}")
    sampled, left_out = False, []
    if rows is None:
        rows = _default_rows(case, M)
        sampled = rows is not None
        left_out = nonfinite_tokens(inputs)
        if left_out:
            keep, out_set = (rows.tolist() if sampled else range(M)), set(left_out)
            rows = torch.tensor([m for m in keep if m not in out_set], dtype=torch.int64)
    if rows is not None:
        from moe_validate.inputs import select_tokens

        rows = torch.as_tensor(rows, dtype=torch.int64).cpu()
        scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
        if scheme.has_dynamic_tensor_scale:
            why = f"token(s) {left_out} hold NaN/Inf and are left out" if left_out else "a row-sampled reference"
            raise ValueError(f"comparing selected rows ({why}) needs every output row to depend on its own token "
                             f"only; {scheme.value} has a batch-wide dynamic scale")
        tokens = rows.tolist()
        ev = _evaluate_rows(case, select_tokens(inputs, rows), out[rows.to(out.device)], tokens, profile=profile,
                            gating=gating, fp8_accumulation=fp8_accumulation)
        if left_out and not sampled:
            _note_finite_rows(ev, tokens, M, left_out)
        else:
            _note_sampled_rows(ev, tokens, M)
        return ev
    return _evaluate_rows(case, inputs, out, profile=profile, gating=gating, fp8_accumulation=fp8_accumulation)


OVERFLOW_KEY = "overflow_not_judged"  # the budget's note where SPEC's own stores overflow S
# Parts of the judgment a bound derives but does not apply, each said by a note in its tolerance
# dict: (bound, note key, the SKIP check a case record shows for it)
NOT_APPLIED_NOTES = (("gate", "count_not_applied", "conformance_count"),
                     ("budget", OVERFLOW_KEY, "accuracy_overflow"))


def _without_storage_overflow(exact_out: torch.Tensor, spec_mirror_out: torch.Tensor, S: torch.dtype):
    """(exact's output with NaN where SPEC's own stores overflow S, the note saying so or None).

    Where the SPEC mirror's output is Inf/NaN but exact float64's is finite, a value on the way
    (c1, c2, c3 or the sum) left S's range: SPEC rounds it to S, so a correct kernel overflows
    there too, and no accuracy bound can hold. Those elements are left out of the accuracy
    comparison (as a non-finite reference is), and the record says how many."""
    overflow = torch.isfinite(exact_out) & ~torch.isfinite(spec_mirror_out.to(exact_out.device))
    n = int(overflow.sum())
    if not n:
        return exact_out, None
    name = str(S).replace("torch.", "")
    note = (f"accuracy not judged at {n} output element(s): SPEC's own stores overflow {name} there (the mirror "
            f"is Inf/NaN where exact float64 is finite), so a correct kernel overflows too; the data, not the "
            f"kernel, leaves {name}'s range")
    return exact_out.masked_fill(overflow, math.nan), note


def _evaluate_rows(case, inputs: MoEInputs, out: torch.Tensor, token_of_row: Optional[List[int]] = None, *,
                   profile: NumericsProfile = SPEC_PROFILE, gating: Tuple[str, ...] = GATE_CHOICES["both"],
                   fp8_accumulation: Optional[Fp8Accumulation] = None) -> Evaluation:
    import reference  # lazily: the comparison needs it, importing the harness must not

    from moe_validate.contract.rules import interpreting

    dev = inputs.hidden_states.device
    if not isinstance(profile, NumericsProfile):
        raise TypeError(f"profile must be a NumericsProfile; got {type(profile).__name__}")
    mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror", profile=profile)
    exact = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
    native_gpu = out.is_cuda and not interpreting()
    bounds = _tol.derive(case, inputs, mirror, native_gpu=native_gpu, exact=exact, profile=profile,
                         fp8_accumulation=fp8_accumulation)
    spec_mirror = mirror
    if profile != SPEC_PROFILE:
        # accuracy does not depend on the profile: the budget is the one SPEC's mirror gives
        spec_mirror = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="mirror")
        bounds["budget"] = _tol.derive(case, inputs, spec_mirror, native_gpu=native_gpu, exact=exact,
                                       fp8_accumulation=fp8_accumulation)["budget"]
    S = storage_dtype(inputs.hidden_states.dtype)
    exact_out, overflow_note = _without_storage_overflow(exact["out"].to(F64), spec_mirror["out"], S)
    oracles = {
        "mirror": (mirror["out"].to(F64), bounds["gate"].allowed, bounds["gate"].sigma, bounds["gate"].count_allowed),
        "exact": (exact_out, bounds["budget"].allowed, bounds["budget"].sigma, bounds["budget"].count_allowed),
    }
    tolerance = {k: b.to_dict() for k, b in bounds.items()}
    if overflow_note:
        tolerance["budget"][OVERFLOW_KEY] = overflow_note
    num_experts = inputs.w1.shape[0]
    ev = Evaluation.from_arrays(case, out.to(dev), oracles,
                                tolerance=tolerance,
                                expert_of=_expert_of_element(mirror), num_experts=num_experts, storage=S,
                                token_of_row=token_of_row, gating=gating, profile=profile.name)
    return ev
