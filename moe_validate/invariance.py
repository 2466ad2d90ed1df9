"""Checks after the comparison: the alignment contract and the bitwise invariances of SPEC.md.

The reference comparison bounds how far an output may be from the truth; it cannot see a kernel
whose bits depend on things they must not depend on (a slot order chosen by the batch size moves
an fp32 sum by one rounding, well inside the gate). SPEC "Invariances" makes those promises
bitwise, so they are checked bitwise, by re-running the backend on transformed inputs:

  ``rerun``  the same inputs again                       -> the same bits
  ``perm``   token rows permuted (seeded, not identity)  -> row i is the original row perm[i]
  ``sub``    one token dropped (the middle one: M's parity changes and the rows after it shift),
             both runs in batch-invariant mode           -> every other row unchanged
  ``paths``  the backend's other internal paths for the same call (``run_paths``: for Triton,
             naive vs aligned assignment, top-k sum fused into GEMM2 or not, activation fused
             into GEMM1 or not) -> the same bits.
             ``run_paths`` yields ``(label, output)`` pairs, compared with the default run, or
             ``(label, output, expected)`` triples, compared with their own ``expected`` (two
             paths at a launch config other than the default's, e.g. Triton's fp8 group
             quantization fused into GEMM1, which needs BLOCK_N = 256)

A case asks for them with ``Case.invariance`` (``"perm+sub"``). ``sub`` needs batch-invariant
mode: the harness asks for it by handing the backend the case with ``config="inv"`` (a case with
an explicit tile config keeps it: a fixed config is what the promise is about). A backend says
which invariances it honours through an optional ``supports_invariance(name, case) -> (bool,
reason)``; without one, ``rerun`` and ``perm`` are assumed (SPEC makes them unconditional) and
``sub`` is SKIPPED, because nothing says the backend reads ``config="inv"``.

Independently, for a backend exposing ``routing_stages(inputs, case)`` (``backends.ExposesRouting``)
the alignment contract (``routing_contract.check_alignment``) is checked on every case with tokens;
for one without it the check is SKIPPED with that reason. Capabilities are asked through
``backends.capability``, never probed here.

``run_checks`` returns one record per check (results.py schema, the case record's ``checks``):
``{"name", "outcome": "PASS" | "FAIL" | "SKIP", "reason"}``. A FAIL's reason names the check,
the first differing token and column, both values (and their bits) and how many elements differ.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from moe_validate.backends import ExposesRouting, RunsPaths, SupportsInvariance, capability
from moe_validate.inputs import select_tokens
from moe_validate.matrix import INVARIANCES
from moe_validate.routing_contract import check_alignment

__all__ = ["run_checks", "bitwise_difference", "invariance_permutation", "sub_batch_rows",
           "ALIGNMENT_CHECK", "CHECK_NAMES", "DEFAULT_SUPPORTED"]

ALIGNMENT_CHECK = "alignment_contract"
CHECK_NAMES = {name: f"invariance:{name}" for name in INVARIANCES}
# What a backend without ``supports_invariance`` is assumed to honour (see the module docstring).
DEFAULT_SUPPORTED = ("rerun", "perm")
_DESCRIPTION = {
    "rerun": "run-to-run",
    "perm": "token-row permutation",
    "sub": "batch invariance, one token dropped",
    "paths": "internal paths of the same call",
}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def _record(name: str, outcome: str, reason: Optional[str] = None) -> Dict[str, Any]:
    return {"name": name, "outcome": outcome, "reason": reason}


def bitwise_difference(expected: torch.Tensor, got: torch.Tensor, token_of_row: Callable[[int], int],
                       labels: Tuple[str, str]) -> Optional[str]:
    """None when ``got`` has exactly the bits of ``expected``; else the first differing element.

    Bits, not values: -0.0 vs +0.0 differ and NaN equals the same NaN. ``token_of_row`` maps a
    row of ``expected`` to the token it belongs to in the original batch (for the message);
    ``labels`` names the two runs.
    """
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return (f"output {labels[1]} is {got.dtype} {tuple(got.shape)}; {labels[0]} is "
                f"{expected.dtype} {tuple(expected.shape)}")
    a, b = expected.detach().cpu(), got.detach().cpu()
    view = _INT_VIEW.get(a.dtype)
    differ = (a.view(view) != b.view(view)) if view is not None else (a != b)
    if not differ.any():
        return None
    count = int(differ.sum())
    row, col = (int(v) for v in torch.nonzero(differ)[0])
    va, vb = a[row, col], b[row, col]
    bits = ""
    if view is not None:
        width = a.element_size() * 2
        mask = (1 << (8 * a.element_size())) - 1
        bits_a = int(va.view(view)) & mask
        bits_b = int(vb.view(view)) & mask
        bits = f" (bits 0x{bits_a:0{width}x} vs 0x{bits_b:0{width}x})"
    return (f"token {token_of_row(row)}, column {col}: {float(va):.9g} {labels[0]} vs {float(vb):.9g} "
            f"{labels[1]}{bits}; {count} of {differ.numel()} element(s) differ")


def invariance_permutation(M: int, seed: int) -> torch.Tensor:
    """A seeded permutation of M >= 2 token rows that moves at least one row (int64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(M, generator=g)
    if torch.equal(perm, torch.arange(M)):
        perm = perm.flip(0)
    return perm


def sub_batch_rows(M: int) -> torch.Tensor:
    """The rows kept by the sub-batch check: all but the middle token (M >= 2)."""
    drop = M // 2
    return torch.cat([torch.arange(drop), torch.arange(drop + 1, M)])


def _supports(backend, name: str, case) -> Tuple[bool, str]:
    if name == "paths" and capability(backend, RunsPaths) is None:
        return False, f"backend {getattr(backend, 'name', '?')!r} exposes no internal paths (no run_paths method)"
    declared = capability(backend, SupportsInvariance)
    if declared is not None:
        ok, why = declared(name, case)
        return bool(ok), why or ""
    if name in DEFAULT_SUPPORTED:
        return True, ""
    return False, (f"backend {getattr(backend, 'name', '?')!r} does not declare batch-invariant mode "
                   f"(no supports_invariance method)")


def _batch_invariant_case(case):
    """The case run in batch-invariant mode: config "inv", unless it fixes an explicit config."""
    return case if case.config != "auto" else replace(case, config="inv")


def _check_invariance(name: str, case, inputs, out: torch.Tensor, backend) -> Dict[str, Any]:
    label = f"invariance {name} ({_DESCRIPTION[name]})"
    check = CHECK_NAMES[name]
    ok, why = _supports(backend, name, case)
    if not ok:
        return _record(check, "SKIP", f"{label}: {why}")
    M = inputs.hidden_states.shape[0]
    device = inputs.hidden_states.device
    if name == "rerun":
        again = backend.run(inputs, case)
        diff = bitwise_difference(out, again, lambda r: r, ("first run", "second run"))
    elif name == "perm":
        perm = invariance_permutation(M, case.seed)
        permuted = backend.run(select_tokens(inputs, perm.to(device)), case)
        expected = out[perm.to(out.device)]
        diff = bitwise_difference(expected, permuted, lambda r: int(perm[r]), ("in order", "permuted"))
    elif name == "paths":
        diff = None
        for variant, got, *expected in backend.run_paths(inputs, case):
            if expected:
                diff = bitwise_difference(expected[0], got, lambda r: r, ("expected", "got"))
            else:
                diff = bitwise_difference(out, got, lambda r: r, ("default path", variant))
            if diff is not None:
                diff = f"{variant}: {diff}"
                break
    else:  # sub
        inv_case = _batch_invariant_case(case)
        full = out if inv_case is case else backend.run(inputs, inv_case)
        keep = sub_batch_rows(M)
        sub = backend.run(select_tokens(inputs, keep.to(device)), inv_case)
        expected = full[keep.to(full.device)]
        diff = bitwise_difference(expected, sub, lambda r: int(keep[r]),
                                  (f"in the batch of {M}", f"in the batch of {M - 1} (token {M // 2} dropped)"))
    if diff is None:
        return _record(check, "PASS")
    return _record(check, "FAIL", f"{label} violated: {diff}")


def _check_alignment(case, inputs, backend) -> Optional[Dict[str, Any]]:
    if inputs.hidden_states.shape[0] == 0:
        return None  # nothing routed: no check, no row
    stages_of = capability(backend, ExposesRouting)
    if stages_of is None:
        return _record(ALIGNMENT_CHECK, "SKIP", f"alignment contract: backend {getattr(backend, 'name', '?')!r} "
                                                "exposes no routing metadata (no routing_stages method)")
    stages = stages_of(inputs, case)
    if stages is None:
        return _record(ALIGNMENT_CHECK, "SKIP", f"alignment contract: backend {getattr(backend, 'name', '?')!r} "
                                                "gave no routing metadata for this run (routing_stages returned None)")
    E = inputs.w1.shape[0]
    G = inputs.global_num_experts if inputs.global_num_experts > 0 else E
    problem = check_alignment(stages, inputs.topk_ids, E, G, inputs.expert_map)
    if problem is None:
        return _record(ALIGNMENT_CHECK, "PASS")
    return _record(ALIGNMENT_CHECK, "FAIL", f"alignment contract (SPEC pipeline step 5) violated: {problem}")


def run_checks(case, inputs, out: torch.Tensor, backend) -> List[Dict[str, Any]]:
    """The alignment contract (where the backend exposes its routing), then ``case.invariances``.

    Call right after the backend produced ``out`` for ``inputs``: ``routing_stages`` describes the
    launch config of the backend's last run.
    """
    checks: List[Dict[str, Any]] = []
    alignment = _check_alignment(case, inputs, backend)
    if alignment is not None:
        checks.append(alignment)
    for name in getattr(case, "invariances", ()):
        checks.append(_check_invariance(name, case, inputs, out, backend))
    return checks
