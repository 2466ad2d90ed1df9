"""Every activation of SPEC.md through the whole reference pipeline, against numbers worked out
independently (Python's math module, formulas copied from SPEC.md's table).

The pipeline is wired so that c1 = x exactly: one expert, topk 1, w1 = identity rows, w2 picks
c2[0] and c2[1] into output columns 0 and 1, router weight 0.5 (a power of two, so exact). The
tokens are chosen so that every clamp of the table is active somewhere: up values 9.0 and 8.5
beyond the swiglu limit 7, a gate of 9.0 (min(x, 7) for swigluoai, silu(9) > 7 for swiglustep),
and the interleaved layout of swigluoai reads (gate, up) = (x0, x1), (x2, x3) instead of
(x0, x2), (x1, x3).
"""

import pytest
import torch

import reference
from moe_validate.contract.spec import Activation, QuantConfig
from reference.activations import apply_activation

TOKENS = [[1.5, -0.75, 9.0, 8.5], [9.0, 0.5, -2.0, 3.0]]
ROUTER_WEIGHT = 0.5

# act(gate, up) per token for output columns 0 and 1 (see module docstring for the wiring).
EXPECTED = {
    "silu": [[11.03725542861419, -2.04523579275687], [-17.997778897632248, 0.933688996802782]],
    "gelu": [[12.598102782870416, -1.4447493714025348], [-18.0, 1.0371936919110196]],
    "gelu_tanh": [[12.596144192822095, -1.445335281092227], [-18.0, 1.0371420294754319]],
    "swigluoai": [[0.3479155496117691, 55.99962502642654], [10.499929692454977, -0.25736550742316744]],
    "swiglustep": [[8.584532000033258, -1.6843118293291868], [-14.0, 0.933688996802782]],
    "silu_no_mul": [[1.2263617142904655, -0.24061597561845527], [8.998889448816124, 0.3112296656009273]],
    "gelu_no_mul": [[1.399789198096713, -0.16997051428265114], [9.0, 0.34573123063700656]],
    "gelu_tanh_no_mul": [[1.3995715769802328, -0.17003944483437966], [9.0, 0.34571400982514394]],
    "relu2_no_mul": [[2.25, 0.0], [81.0, 0.25]],
}
# silu with gemm1_clamp_limit = 1: silu(min(x, 1)) * clamp(u, -1, 1).
EXPECTED_SILU_LIMIT_1 = [[0.7310585786300049, -0.24061597561845527], [-0.7310585786300049, 0.3112296656009273]]

# Exact mode evaluates each formula with a handful of float64 operations (2^-53 each) and
# libm erf/tanh/exp (within a few ulps); 1e-14 relative leaves ~50 ulps of room and still
# rejects any wrong formula, constant or layout (those move values by > 1e-3).
FP64_RTOL = 1e-14
# Mirror mode computes the activation in fp32: ~10 operations of 2^-24 each -> 2^-20 relative.
FP32_RTOL = 2.0 ** -20


def _wiring(activation: Activation):
    N = 4 if activation.is_gated else 2
    w1 = torch.eye(4, dtype=torch.float32)[:N].reshape(1, N, 4).contiguous()
    w2 = torch.zeros(1, 4, 2, dtype=torch.float32)
    w2[0, 0, 0] = 1.0
    w2[0, 1, 1] = 1.0
    x = torch.tensor(TOKENS, dtype=torch.float32)
    topk_weights = torch.full((2, 1), ROUTER_WEIGHT, dtype=torch.float32)
    topk_ids = torch.zeros(2, 1, dtype=torch.int64)
    return x, w1, w2, topk_weights, topk_ids


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_activation_through_pipeline(name):
    activation = Activation.parse(name)
    out = reference.fused_experts(*_wiring(activation), activation=name)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[:, :2] = ROUTER_WEIGHT * torch.tensor(EXPECTED[name], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=FP64_RTOL, atol=0.0)


def test_silu_clamp_limit():
    quant = QuantConfig(gemm1_clamp_limit=1.0)
    out = reference.fused_experts(*_wiring(Activation.SILU), activation="silu", quant=quant)
    expected = ROUTER_WEIGHT * torch.tensor(EXPECTED_SILU_LIMIT_1, dtype=torch.float64)
    torch.testing.assert_close(out[:, :2], expected, rtol=FP64_RTOL, atol=0.0)
    assert torch.equal(out[:, 2:], torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_activation_in_fp32(name):
    """The mirror-mode path: the same formulas evaluated in fp32 stay within fp32 rounding."""
    activation = Activation.parse(name)
    c1 = torch.tensor(TOKENS, dtype=torch.float32)
    if not activation.is_gated:
        c1 = c1[:, :2]
    got = apply_activation(c1, activation)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(EXPECTED[name], dtype=torch.float64),
                               rtol=FP32_RTOL, atol=2.0 ** -24)


def test_every_activation_is_covered():
    assert set(EXPECTED) == {a.value for a in Activation}
