"""The quantizers of reference.quant against hand-worked numbers (SPEC.md, Quantization schemes)."""

import numpy as np
import pytest
import torch

import reference
from moe_validate.contract.spec import QuantScheme
from reference.quant import _round_to_codes, dequantize_activation

F8 = torch.float8_e4m3fn


def _all_finite_fp8_values() -> torch.Tensor:
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = bits.view(F8).to(torch.float32)
    return values[torch.isfinite(values)]  # 0x7F and 0xFF are NaN in e4m3fn


# --- fp8 ---------------------------------------------------------------------------------------
def test_every_fp8_code_round_trips_with_unit_static_scale():
    values = _all_finite_fp8_values()
    assert values.numel() == 254
    q, scale = reference.quantize_activation(values.reshape(1, -1), "fp8_tensor_static",
                                             static_scale=torch.tensor(1.0))
    assert q.dtype == F8 and scale.tolist() == [1.0]
    assert torch.equal(q.view(torch.uint8), values.reshape(1, -1).to(F8).view(torch.uint8))  # signs of zero too


def test_every_fp8_code_round_trips_through_dynamic_per_token_scale():
    # Each row holds +-448, so s = 448 / 448 = 1 exactly and x / s = x: every code must survive.
    values = _all_finite_fp8_values()
    rows = torch.stack([values, torch.full_like(values, 448.0)], dim=1)  # [254, 2]
    q, scale = reference.quantize_activation(rows, "fp8_channel_token")
    assert torch.equal(scale, torch.ones(254, 1))
    assert torch.equal(q.to(torch.float32), rows)


def test_fp8_rounds_half_to_even_and_saturates():
    # In [1, 2) the e4m3 step is 1/8: 1.0625 is the midpoint of 1.0 and 1.125 -> 1.0 (even
    # mantissa), 1.1875 the midpoint of 1.125 and 1.25 -> 1.25. In [256, 448] the step is 32:
    # 272 is the midpoint of 256 and 288 -> 256 (even). Beyond 448 saturates, never NaN.
    x = torch.tensor([[1.0625, 1.1875, 272.0, 500.0, -1e6, 1e-3]])
    q, _ = reference.quantize_activation(x, "fp8_tensor_static", static_scale=torch.tensor([1.0]))
    # 1e-3 lies between the subnormals 0 and 2^-9 = 0.001953125, nearer 2^-9 (midpoint 2^-10 = 0.000977)
    assert q.to(torch.float32).tolist() == [[1.0, 1.25, 256.0, 448.0, -448.0, 0.001953125]]


def test_dynamic_scale_formula_is_fp32():
    # s = max(absmax, 1e-10) / 448 in fp32; an all-zero row gets the floor, not a division by 0.
    x = torch.tensor([[3.0, -6.0], [0.0, 0.0]], dtype=torch.bfloat16)
    q, scale = reference.quantize_activation(x, "fp8_tensor_token")
    assert scale[0, 0].item() == float(np.float32(6.0) / np.float32(448.0))
    assert scale[1, 0].item() == float(np.float32(1e-10) / np.float32(448.0))
    assert q[1].to(torch.float32).tolist() == [0.0, 0.0]
    # -6 / s = -448 exactly; 3 / s = 224 (both on the e4m3 grid).
    assert q[0].to(torch.float32).tolist() == [224.0, -448.0]


def test_token_group_scales_one_per_128_columns_last_group_short():
    C = 300  # groups [0, 128), [128, 256), [256, 300)
    x = torch.zeros(2, C)
    x[0, 5], x[0, 200], x[0, 299] = 448.0, -224.0, 44.8
    x[1, 127], x[1, 128] = 7.0, 3.5
    q, scale = reference.quantize_activation(x, "fp8_block128")
    assert scale.shape == (2, 3)
    f32 = np.float32
    expected = [[1.0, 0.5, float(f32(44.8) / f32(448.0))],
                [float(f32(7.0) / f32(448.0)), float(f32(3.5) / f32(448.0)), float(f32(1e-10) / f32(448.0))]]
    assert scale.tolist() == expected
    back = dequantize_activation(q.to(torch.float32), scale)
    # absmax of each group maps to code 448 and back to itself (up to the fp32 scale's rounding)
    assert back[0, 5].item() == 448.0 and back[0, 200].item() == -224.0
    assert back[1, 127].item() == pytest.approx(7.0, rel=2 ** -23)


def test_tensor_dynamic_uses_valid_rows_and_ignores_non_finite():
    x = torch.tensor([[1.0, 2.0], [100.0, 0.0], [float("nan"), float("inf")]])
    _, scale = reference.quantize_activation(x, "fp8_tensor_dynamic",
                                             valid_rows=torch.tensor([True, False, True]))
    # row 1 is not a valid row; row 2's NaN and Inf are skipped: absmax = 2
    assert scale.tolist() == [float(np.float32(2.0) / np.float32(448.0))]
    _, scale_all = reference.quantize_activation(x, "fp8_tensor_dynamic")
    assert scale_all.tolist() == [float(np.float32(100.0) / np.float32(448.0))]


@pytest.mark.parametrize("static_shape", [(), (1,)])
def test_tensor_static_uses_given_scale(static_shape):
    s = torch.full(static_shape, 0.5)
    q, scale = reference.quantize_activation(torch.tensor([[1.0, -3.0, 1000.0]]), "fp8_tensor_static", static_scale=s)
    assert scale.tolist() == [0.5]
    assert q.to(torch.float32).tolist() == [[2.0, -6.0, 448.0]]


# --- int8 --------------------------------------------------------------------------------------
def test_int8_rounds_ties_to_even_and_saturates():
    # absmax 127 gives s = 127/127 = 1 exactly, so x / s = x and the ties are visible.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.4999]])
    q, scale = reference.quantize_activation(x, "int8_channel_token")
    assert q.dtype == torch.int8 and scale.tolist() == [[1.0]]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, 3]]
    # Dynamic int8 scales put the absmax at exactly 127, so saturation only matters for the
    # fp32 rounding of x / s; the code step itself clamps to the symmetric range, never -128.
    assert _round_to_codes(torch.tensor([127.5, -127.5, -300.0]), torch.int8).tolist() == [127.0, -127.0, -127.0]


def test_int8_scale_is_fp32_division():
    x = torch.tensor([[7.0, 1.296875]])
    q, scale = reference.quantize_activation(x, "int8_channel_token")
    s = np.float32(7.0) / np.float32(127.0)
    assert scale.item() == float(s)
    # 1.296875 / s = 23.529 -> 24
    assert q.tolist() == [[127, 24]]


# --- int4 --------------------------------------------------------------------------------------
def test_int4_pack_layout_low_nibble_is_even_k():
    packed = reference.pack_int4(torch.tensor([[1, 2, 15, 0]]))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x0F]]


def test_int4_pack_unpack_round_trip_all_pairs():
    a, b = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    q = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1).reshape(2, 256)
    assert torch.equal(reference.unpack_int4(reference.pack_int4(q)), q)
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    assert torch.equal(reference.pack_int4(reference.unpack_int4(all_bytes)), all_bytes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_symmetric_weights(group_size):
    # Per group: absmax 7 * 0.5 -> s = 0.5; w = s * (q - 8) for integer q - 8 in [-7, 7].
    K = 128
    torch.manual_seed(group_size)
    steps = torch.randint(-7, 8, (2, 3, K)).to(torch.float32)
    steps[..., ::group_size] = 7.0  # every group reaches absmax 7 steps
    w = steps * 0.5
    w_q, scale, zp = reference.quantize_weights(w, "int4_w4a16", group_size=group_size)
    assert zp is None and w_q.shape == (2, 3, K // 2) and scale.shape == (2, 3, K // group_size)
    assert torch.equal(scale, torch.full_like(scale, 0.5))
    assert torch.equal(reference.unpack_int4(w_q), (steps + 8).to(torch.int64))
    assert torch.equal(reference.dequantize_weights(w_q, scale, "int4_w4a16", group_size=group_size), w.double())


def test_int4_zero_points_asymmetric():
    # Group 0 spans [-1, 14]: s = 15/15 = 1, zp = rne(1/1) = 1, q = w + 1 in 0..15.
    # Group 1 spans [0, 7.5]: s = 0.5, zp = 0, q = 2w.
    g0 = torch.arange(-1.0, 15.0).repeat(2)  # 32 values, min -1, max 14
    g1 = (torch.arange(0.0, 16.0) * 0.5).repeat(2)
    w = torch.cat([g0, g1]).reshape(1, 1, 64)
    w_q, scale, zp = reference.quantize_weights(w, "int4_w4a16", group_size=32, zero_point=True)
    assert scale.tolist() == [[[1.0, 0.5]]] and zp.dtype == torch.uint8 and zp.tolist() == [[[1, 0]]]
    codes = reference.unpack_int4(w_q)
    assert codes[0, 0, :16].tolist() == list(range(16)) and codes[0, 0, 32:48].tolist() == list(range(16))
    assert torch.equal(reference.dequantize_weights(w_q, scale, "int4_w4a16", zp=zp, group_size=32), w.double())


def test_int4_default_zero_point_is_8():
    packed = reference.pack_int4(torch.tensor([[[8, 9, 0, 15] * 8]]))
    deq = reference.dequantize_weights(packed, torch.tensor([[[2.0]]]), "int4_w4a16", group_size=32)
    assert deq[0, 0, :4].tolist() == [0.0, 2.0, -16.0, 14.0]


# --- fp8 / int8 weights ------------------------------------------------------------------------
def test_fp8_block_weights_partial_blocks():
    # N = K = 130: blocks of 128 and a short block of 2; each block's absmax is set to 448 * 2^-b.
    E, N, K = 1, 130, 130
    w = torch.zeros(E, N, K)
    for i, r0 in enumerate((0, 128)):
        for j, c0 in enumerate((0, 128)):
            w[0, r0, c0] = 448.0 * 2.0 ** -(2 * i + j)
            w[0, r0 + 1, c0 + 1] = 3.0 * 2.0 ** -(2 * i + j)  # 3 is an e4m3 code
    w_q, scale, _ = reference.quantize_weights(w, "fp8_block128")
    assert w_q.dtype == F8 and scale.shape == (1, 2, 2)
    assert scale.tolist() == [[[1.0, 0.5], [0.25, 0.125]]]
    assert torch.equal(reference.dequantize_weights(w_q, scale, "fp8_block128"), w.double())


@pytest.mark.parametrize("scheme", ["fp8_channel_token", "int8_channel_token", "int8_w8a16"])
def test_per_channel_weights(scheme):
    qmax = QuantScheme(scheme).weight_qmax
    # row n has absmax qmax * 2^-n, so the scale is 2^-n exactly and the codes are the steps.
    steps = torch.tensor([[[qmax, 1.0, -2.0, 0.0], [-qmax, 3.0, 4.0, 1.0]]])
    w = steps * torch.tensor([1.0, 0.5]).reshape(1, 2, 1)
    w_q, scale, zp = reference.quantize_weights(w, scheme)
    assert zp is None and scale.tolist() == [[1.0, 0.5]]
    assert torch.equal(w_q.to(torch.float32), steps)
    assert torch.equal(reference.dequantize_weights(w_q, scale, scheme), w.double())


def test_per_tensor_weights_accept_both_scale_layouts():
    w = torch.tensor([[[448.0, 1.0]], [[-2.0, 1.0]]])  # expert 1 absmax 2 -> s = 2/448
    w_q, scale, _ = reference.quantize_weights(w, "fp8_tensor_token")
    assert scale.shape == (2,)
    assert scale.tolist() == [1.0, float(np.float32(2.0) / np.float32(448.0))]
    a = reference.dequantize_weights(w_q, scale, "fp8_tensor_token")
    b = reference.dequantize_weights(w_q, scale.reshape(2, 1, 1), "fp8_tensor_token")
    assert torch.equal(a, b) and a[0].tolist() == [[448.0, 1.0]]


@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "fp8_tensor_token",
                                    "int8_channel_token", "int4_w4a16"])
def test_weight_round_trip_error_is_half_a_step(scheme):
    """|dequant(quant(w)) - w| <= half a quantization step, per element.

    Step: int8 / int4 -> the scale (uniform grid); fp8 e4m3 -> 2^(floor(log2|v|) - 3) * scale for
    normal codes (3 mantissa bits), 2^-9 * scale below 2^-6 (subnormals). Plus the fp32 division
    w/s (relative 2^-24 of |w|) which can move a value across a midpoint.
    """
    torch.manual_seed(1)
    w = torch.randn(2, 64, 128) * 0.1
    group = 64 if scheme == "int4_w4a16" else None
    w_q, scale, zp = reference.quantize_weights(w, scheme, group_size=group)
    back = reference.dequantize_weights(w_q, scale, scheme, zp=zp, group_size=group)
    s = reference.dequantize_weights(
        reference.pack_int4(torch.full((2, 64, 128), 9)) if scheme == "int4_w4a16" else torch.ones_like(w).to(w_q.dtype),
        scale, scheme, group_size=group)  # the scale broadcast to [E, N, K]
    if QuantScheme(scheme).is_fp8:
        v = (w.double() / s).abs()
        exponent = torch.floor(torch.log2(v.clamp_min(2.0 ** -6)))
        step = 2.0 ** (exponent - 3) * s
    else:
        step = s
    err = (back - w.double()).abs()
    assert bool((err <= 0.5 * step + w.double().abs() * 2.0 ** -23).all())
    assert err.max() > 0  # the test data really exercised rounding
