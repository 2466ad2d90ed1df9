"""One hand-worked call per quantization scheme (SPEC.md, Quantization schemes), exact mode.

Common wiring: one token x = [7.0, 1.296875] (bf16-exact), one expert, topk 1, router weight
0.5, activation relu2_no_mul (c2 = max(c1, 0)^2, so N = I = 2), K = 2. Logical weights
    W1 = [[0.25, -0.5], [0.5, 0.5]]      W2 = [[1.0, 0.5], [-0.25, 2.0]]
are stored per scheme as codes times scales (written out below), so every scheme computes
    c1 = W1 . x_used,   c2 = c1^2,   out = 0.5 * W2 . c2_in
and differs only in x_used (input quantization) and c2_in (requantization), worked out by hand
in each case. int4 needs K and I to be multiples of the group size; its case pads to 32.
"""

import numpy as np
import pytest
import torch

import reference
from moe_validate.contract.spec import QuantConfig, QuantScheme

f32 = np.float32
X = [7.0, 1.296875]
W1 = [[0.25, -0.5], [0.5, 0.5]]
W2 = [[1.0, 0.5], [-0.25, 2.0]]
ROUTER_WEIGHT = 0.5
# K = 2 dots in float64: at most two roundings of 2^-53 relative each (and FMA may skip one).
RTOL = 2.0 ** -51


def _out(c2_in):
    a, b = c2_in
    return [ROUTER_WEIGHT * (W2[0][0] * a + W2[0][1] * b), ROUTER_WEIGHT * (W2[1][0] * a + W2[1][1] * b)]


def _c1(x):
    return [W1[0][0] * x[0] + W1[0][1] * x[1], W1[1][0] * x[0] + W1[1][1] * x[1]]


# x_used with a dynamic fp8 per-token (or per-group, or per-tensor: one token) scale:
# s = 7 / 448 = 1/64 exactly; 7 / s = 448; 1.296875 / s = 83 -> nearest e4m3 codes in [64, 128)
# step 8 are 80 and 88 -> 80; x_used = [7, 80/64] = [7, 1.25].
# c1 = [1.75 - 0.625, 3.5 + 0.625] = [1.125, 4.125]; c2 = [1.265625, 17.015625].
# Requantization per token: s2 = fl32(17.015625 / 448); 17.015625 / s2 -> 448;
# 1.265625 / s2 = 33.32 -> codes in [32, 64) step 4: 32. c2_in = [32 s2, 448 s2].
_S2_FP8 = float(f32(17.015625) / f32(448.0))
FP8_DYNAMIC = {"x": [7.0, 1.25], "c2_in": [32 * _S2_FP8, 448 * _S2_FP8]}

# Unquantized activations: x_used = x; c1 = [141/128, 531/128]; c2_in = c2.
_C2_PLAIN = [(141 / 128) ** 2, (531 / 128) ** 2]
PLAIN = {"x": X, "c2_in": _C2_PLAIN}

# fp8_tensor_static with a1 = 1/64 (x_used as in the dynamic case) and a2 = 1/16:
# c2 / a2 = [20.25, 272.25] -> 20 (step 2 in [16, 32)); 288 (step 32 in [256, 448]: 272.25 is
# past the midpoint 272). c2_in = [20/16, 288/16] = [1.25, 18.0].
FP8_STATIC = {"x": [7.0, 1.25], "c2_in": [1.25, 18.0]}

# int8_channel_token: s = fl32(7/127); 7 / s = 127; 1.296875 / s = 23.53 -> 24.
# x_used = [127 s, 24 s]; c1 = W1 . x_used = [1.0886, 4.1614]; c2 = c1^2 = [1.1850, 17.3174];
# s2 = fl32(fl32(c2[1]) / 127); c2[0] / s2 = 8.69 -> 9; c2[1] / s2 -> 127. c2_in = [9 s2, 127 s2].
_S_I8 = float(f32(7.0) / f32(127.0))
_X_I8 = [127 * _S_I8, 24 * _S_I8]
_C2_I8 = [v * v for v in _c1(_X_I8)]
_S2_I8 = float(f32(_C2_I8[1]) / f32(127.0))
INT8 = {"x": _X_I8, "c2_in": [9 * _S2_I8, 127 * _S2_I8]}


def _fp8(values):
    return torch.tensor(values, dtype=torch.float32).to(torch.float8_e4m3fn)


# Stored weights per weight granularity (codes x scale == W1, W2 exactly).
_TIMES4_W1, _TIMES4_W2 = [[[1.0, -2.0], [2.0, 2.0]]], [[[4.0, 2.0], [-1.0, 8.0]]]  # scale 1/4
_CHANNEL_W1, _CHANNEL_S1 = [[[1.0, -2.0], [1.0, 1.0]]], [[0.25, 0.5]]
_CHANNEL_W2, _CHANNEL_S2 = [[[2.0, 1.0], [-1.0, 8.0]]], [[0.5, 0.25]]


def _weights(scheme: QuantScheme):
    q = {}
    if scheme is QuantScheme.NONE:
        w1 = torch.tensor([W1], dtype=torch.bfloat16)
        w2 = torch.tensor([W2], dtype=torch.bfloat16)
    elif scheme.weight_granularity == "channel":
        dtype = scheme.weight_dtype
        w1 = torch.tensor(_CHANNEL_W1).to(dtype)
        w2 = torch.tensor(_CHANNEL_W2).to(dtype)
        q = dict(w1_scale=torch.tensor(_CHANNEL_S1), w2_scale=torch.tensor(_CHANNEL_S2))
    else:  # block or tensor, one scale of 1/4 per expert / block
        w1, w2 = _fp8(_TIMES4_W1), _fp8(_TIMES4_W2)
        layout = {"block": (1, 1, 1), "tensor": (1,)}[scheme.weight_granularity]
        if scheme is QuantScheme.FP8_TENSOR_STATIC:
            layout = (1, 1, 1)  # the other accepted per-tensor layout
            q = dict(a1_scale=torch.tensor(1 / 64), a2_scale=torch.tensor([1 / 16]))
        q.update(w1_scale=torch.full(layout, 0.25), w2_scale=torch.full(layout, 0.25))
    return w1, w2, QuantConfig(scheme, **q)


EXPECTED = {
    "none": PLAIN,
    "int8_w8a16": PLAIN,
    "fp8_block128": FP8_DYNAMIC,
    "fp8_channel_token": FP8_DYNAMIC,
    "fp8_tensor_token": FP8_DYNAMIC,
    "fp8_tensor_dynamic": FP8_DYNAMIC,
    "fp8_tensor_static": FP8_STATIC,
    "int8_channel_token": INT8,
}


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_scheme_hand_case(scheme):
    scheme = QuantScheme(scheme)
    w1, w2, quant = _weights(scheme)
    x = torch.tensor([X], dtype=torch.bfloat16)
    stages = reference.run_stages(x, w1, w2, torch.tensor([[ROUTER_WEIGHT]]), torch.tensor([[0]]),
                                  activation="relu2_no_mul", quant=quant)
    expected = EXPECTED[scheme.value]
    torch.testing.assert_close(stages["w1"][0], torch.tensor(W1, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(stages["w2"][0], torch.tensor(W2, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(stages["x"][0], torch.tensor(expected["x"], dtype=torch.float64), rtol=RTOL, atol=0)
    torch.testing.assert_close(stages["c2_in"][0, 0], torch.tensor(expected["c2_in"], dtype=torch.float64),
                               rtol=4 * RTOL, atol=0)
    torch.testing.assert_close(stages["out"][0], torch.tensor(_out(expected["c2_in"]), dtype=torch.float64),
                               rtol=8 * RTOL, atol=0)


@pytest.mark.parametrize("with_zero_points", [False, True])
def test_int4_hand_case(with_zero_points):
    """int4_w4a16, group 32: the PLAIN case padded to K = I = 32 (N = I for relu2_no_mul).

    w1 (group scale 1/4, implied zero point 8): row 0 = [0.25, -0.5] -> codes [9, 6]; row 1 =
    [0.5, 0.5] -> [10, 10]; every other code is 8 (value 0). w2 row 0 = [1, 0.5] with scale 1/2
    -> [10, 9]. w2 row 1: with zero points it is W2's [-0.25, 2] at scale 1/4 and zero point 1
    -> codes [0, 9]; without, [-0.25, 2] does not fit 8 +- 7 steps of one scale, so the case
    stores [-0.5, 2] at scale 1/2 -> codes [7, 12] and expects that.
    """
    K = I = 32
    codes1 = torch.full((1, I, K), 8)
    codes1[0, 0, :2] = torch.tensor([9, 6])
    codes1[0, 1, :2] = torch.tensor([10, 10])
    scale1 = torch.full((1, I, 1), 0.25)
    codes2 = torch.full((1, K, I), 8)
    codes2[0, 0, :2] = torch.tensor([10, 9])
    scale2 = torch.full((1, K, 1), 0.5)
    w2_logical = [[1.0, 0.5], [-0.5, 2.0]]
    quant_extra = {}
    if with_zero_points:
        codes2[0, 1, :2] = torch.tensor([0, 9])
        scale2[0, 1, 0] = 0.25
        zp2 = torch.full((1, K, 1), 8, dtype=torch.uint8)
        zp2[0, 1, 0] = 1
        quant_extra["w2_zp"] = zp2
        w2_logical = W2
    else:
        codes2[0, 1, :2] = torch.tensor([7, 12])
    quant = QuantConfig("int4_w4a16", w1_scale=scale1, w2_scale=scale2, group_size=32, **quant_extra)
    x = torch.zeros(1, K, dtype=torch.bfloat16)
    x[0, :2] = torch.tensor(X)
    stages = reference.run_stages(x, reference.pack_int4(codes1), reference.pack_int4(codes2),
                                  torch.tensor([[ROUTER_WEIGHT]]), torch.tensor([[0]]),
                                  activation="relu2_no_mul", quant=quant)
    a, b = _C2_PLAIN
    expected = torch.zeros(K, dtype=torch.float64)
    expected[0] = ROUTER_WEIGHT * (w2_logical[0][0] * a + w2_logical[0][1] * b)
    expected[1] = ROUTER_WEIGHT * (w2_logical[1][0] * a + w2_logical[1][1] * b)
    torch.testing.assert_close(stages["w1"][0, :2, :2], torch.tensor(W1, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(stages["out"][0], expected, rtol=8 * RTOL, atol=0)


def test_every_scheme_has_a_hand_case():
    assert set(EXPECTED) | {"int4_w4a16"} == {s.value for s in QuantScheme}


@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "fp8_tensor_dynamic", "int8_channel_token"])
def test_prequantized_input_equals_quantizing_inside(scheme):
    """hidden_states already quantized (with a1q_scale) gives the same result as bf16 input."""
    scheme = QuantScheme(scheme)
    w1, w2, quant = _weights(scheme)
    x = torch.tensor([X, [0.5, -3.0]], dtype=torch.bfloat16)
    args = (torch.tensor([[ROUTER_WEIGHT], [1.0]]), torch.tensor([[0], [0]]))
    x_q, a1q_scale = reference.quantize_activation(x, scheme)
    for precision in ("exact", "mirror"):
        from_bf16 = reference.fused_experts(x, w1, w2, *args, activation="relu2_no_mul", quant=quant,
                                            precision=precision)
        from_q = reference.fused_experts(x_q, w1, w2, *args, activation="relu2_no_mul", quant=quant,
                                         a1q_scale=a1q_scale, precision=precision)
        assert torch.equal(from_bf16, from_q)
