"""The two verdicts of a compared case and which of them decide its outcome (issue 17).

- **accuracy**: the output against ``exact`` within the budget: as accurate as the scheme allows,
  whatever the implementation rounds. It does not depend on any numerics profile.
- **conformance**: the output against the ``mirror`` within the gate, count test included: it
  rounds exactly where its declared numerics profile (``moe_validate.contract.profile``) says.

``gating_policy`` is the policy (docs/PROFILES.md): our own backends gate on both; someone else's
(``module:attr``, an entry point, ``vllm``) on accuracy alone, conformance reported; a backend may
declare ``gating``; ``--gate`` overrides. A conformance FAIL that does not gate is said in the
case's reason and the run's summary (``conformance_note``), never hidden; it leaves the exit
status alone (exit_codes.py). Torch-free: the CLI and the pytest plugin read it at start.
"""

from __future__ import annotations

from typing import Optional, Tuple

from moe_validate.contract.profile import SPEC_PROFILE, NumericsProfile

__all__ = ["VERDICTS", "VERDICT_ORACLE", "GATE_CHOICES", "OWN_BACKENDS", "gating_policy", "declared_profile",
           "conformance_note", "not_gating_conformance_failure"]

VERDICTS = ("accuracy", "conformance")
VERDICT_ORACLE = {"accuracy": "exact", "conformance": "mirror"}  # the reference panel each one reads
# --gate on the CLI and the pytest plugin
GATE_CHOICES = {"accuracy": ("accuracy",), "both": ("accuracy", "conformance")}
# Our own implementations (backends.py's built-ins but vllm, which is someone else's kernel): their
# rounding is ours to decide, so conformance gates too. tests/moe_validate/test_verdicts.py holds
# this to backends.builtin_backend_names().
OWN_BACKENDS = frozenset({"triton", "reference", "torch-grouped", "ordered-reversed", "ordered-sequential",
                          "ordered-split-k"})


def declared_profile(backend) -> NumericsProfile:
    """The numerics profile ``backend`` declares (``numerics_profile``; None or absent: SPEC_PROFILE)."""
    from moe_validate.backends import declared

    profile = declared(backend, "numerics_profile")
    if profile is None:
        return SPEC_PROFILE
    if not isinstance(profile, NumericsProfile):
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r}: numerics_profile must be a "
                        f"moe_validate.contract.profile.NumericsProfile or None; got {type(profile).__name__}")
    return profile


def check_gate(gate: Optional[str]) -> None:
    """ValueError unless ``gate`` (``--gate``) is None or one of GATE_CHOICES."""
    if gate is not None and gate not in GATE_CHOICES:
        raise ValueError(f"gate must be one of {', '.join(GATE_CHOICES)}; got {gate!r}")


def gating_policy(backend, backend_name: str, gate: Optional[str] = None) -> Tuple[str, ...]:
    """The verdicts that decide ``backend``'s outcomes: ``gate`` ("accuracy" or "both", from
    ``--gate``) if given; else what the backend declares (``gating``: a tuple of VERDICTS that
    includes accuracy); else both for OWN_BACKENDS and accuracy alone for a third-party backend."""
    from moe_validate.backends import declared

    check_gate(gate)
    if gate is not None:
        return GATE_CHOICES[gate]
    gating = declared(backend, "gating")
    if gating is not None:
        if (not isinstance(gating, (tuple, list)) or any(v not in VERDICTS for v in gating)
                or "accuracy" not in gating):
            raise ValueError(f"backend {backend_name!r}: gating must be a tuple of {', '.join(VERDICTS)} that "
                             f"includes accuracy; got {gating!r}")
        return tuple(v for v in VERDICTS if v in gating)
    return GATE_CHOICES["both"] if backend_name in OWN_BACKENDS else GATE_CHOICES["accuracy"]


def conformance_note(profile_name: str, why: str) -> str:
    """The words for a conformance FAIL that does not gate (a case's reason)."""
    return (f"conformance FAIL (not gating): rounds differently from its declared profile {profile_name}: {why}; "
            "accuracy held")


def not_gating_conformance_failure(record) -> bool:
    """Whether a case record's conformance verdict failed while not deciding its outcome."""
    verdicts = record.verdicts or {}
    return ((verdicts.get("conformance") or {}).get("outcome") == "FAIL"
            and "conformance" not in (record.gating or ()))
