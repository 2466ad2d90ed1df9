"""The nine activations of SPEC.md, "Activations", on rows of c1.

``apply_activation(c1, activation, clamp_limit)`` works in the dtype of ``c1``: the reference
passes float64 in ``exact`` mode and fp32 in ``mirror`` mode (the kernels compute activations in
fp32). Gated activations read gate rows ``[0, I)`` and up rows ``[I, 2I)`` of the last dimension,
except ``swigluoai``, which reads gate from even and up from odd positions.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from moe_validate.contract.spec import SWIGLU_LIMIT, Activation

__all__ = ["apply_activation", "split_gate_up", "gated_factors"]

SWIGLUOAI_ALPHA = 1.702  # swigluoai: xc * sigmoid(1.702 * xc)
GELU_TANH_COEFF = 0.044715


def split_gate_up(c1: torch.Tensor, activation: Activation) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of the last dimension of c1 for a gated activation."""
    if activation.is_interleaved:
        return c1[..., 0::2], c1[..., 1::2]
    half = c1.shape[-1] // 2
    return c1[..., :half], c1[..., half:]


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # x / sqrt(2) divides by a tensor: CUDA would turn a Python-scalar divisor into a reciprocal multiply
    return 0.5 * x * (1.0 + torch.erf(x / torch.full_like(x, math.sqrt(2.0))))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + GELU_TANH_COEFF * x * x * x)))


def apply_activation(c1: torch.Tensor, activation, clamp_limit: Optional[float] = None) -> torch.Tensor:
    """The activation of SPEC.md applied to the last dimension of c1 ([..., N] -> [..., I])."""
    act = Activation.parse(activation)
    if clamp_limit is not None and act is not Activation.SILU:
        raise ValueError(f"clamp_limit applies to activation silu only; got {act}")
    if not act.is_gated:
        x = c1
        if act is Activation.SILU_NO_MUL:
            return _silu(x)
        if act is Activation.GELU_NO_MUL:
            return _gelu(x)
        if act is Activation.GELU_TANH_NO_MUL:
            return _gelu_tanh(x)
        if act is Activation.RELU2_NO_MUL:
            return torch.clamp_min(x, 0.0) ** 2
        raise AssertionError(act)  # pragma: no cover

    x, u = split_gate_up(c1, act)
    if act is Activation.SILU:
        if clamp_limit is not None:
            limit = float(clamp_limit)
            return _silu(torch.clamp_max(x, limit)) * torch.clamp(u, -limit, limit)
        return _silu(x) * u
    if act is Activation.GELU:
        return _gelu(x) * u
    if act is Activation.GELU_TANH:
        return _gelu_tanh(x) * u
    if act is Activation.SWIGLUOAI:
        xc = torch.clamp_max(x, SWIGLU_LIMIT)
        uc = torch.clamp(u, -SWIGLU_LIMIT, SWIGLU_LIMIT)
        return (uc + 1.0) * xc * torch.sigmoid(SWIGLUOAI_ALPHA * xc)
    if act is Activation.SWIGLUSTEP:
        return torch.clamp_max(_silu(x), SWIGLU_LIMIT) * torch.clamp(u, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    raise AssertionError(act)  # pragma: no cover


def gated_factors(c1: torch.Tensor, activation, clamp_limit: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(act(g), u') of a gated activation, with value = act(g) * u' (SPEC.md, "Activations"): the
    two factors an implementation that stores act(g) before the product rounds separately
    (``reference.pipeline.activation_rounded_twice``). swigluoai: (xc sigmoid(1.702 xc), uc + 1)."""
    act = Activation.parse(activation)
    if not act.is_gated:
        raise ValueError(f"activation must be gated to split into factors; got {act}")
    if clamp_limit is not None and act is not Activation.SILU:
        raise ValueError(f"clamp_limit applies to activation silu only; got {act}")
    x, u = split_gate_up(c1, act)
    if act is Activation.SILU:
        if clamp_limit is not None:
            limit = float(clamp_limit)
            return _silu(torch.clamp_max(x, limit)), torch.clamp(u, -limit, limit)
        return _silu(x), u
    if act is Activation.GELU:
        return _gelu(x), u
    if act is Activation.GELU_TANH:
        return _gelu_tanh(x), u
    if act is Activation.SWIGLUOAI:
        xc = torch.clamp_max(x, SWIGLU_LIMIT)
        return xc * torch.sigmoid(SWIGLUOAI_ALPHA * xc), torch.clamp(u, -SWIGLU_LIMIT, SWIGLU_LIMIT) + 1.0
    if act is Activation.SWIGLUSTEP:
        return torch.clamp_max(_silu(x), SWIGLU_LIMIT), torch.clamp(u, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    raise AssertionError(act)  # pragma: no cover
