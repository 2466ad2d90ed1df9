"""kernels/quantize.py against the quantizer of SPEC.md ("Quantization schemes"), bit for bit.

The torch quantizer below is the SPEC text in torch: ``s = max(absmax, 1e-10) / QMAX`` in fp32,
``q = sat(rne(x / s))`` with an IEEE fp32 division. The exhaustive tests place every finite fp8
code, every midpoint between adjacent codes and every int8 tie into rows whose scale is a power
of two, so ``x / s`` is exact and the expected code is known without trusting any cast.

Runs on CUDA when present, else on CPU through the Triton interpreter (TRITON_INTERPRET=1).
"""

import math

import pytest
import torch

import kernels.quantize as quantize_module
from kernels._interp import INTERPRETING
from kernels.quantize import quantize_activation, silu_and_mul_quant_fp8_group
from moe_validate.contract.spec import FP8_FNUZ_MAX, FP8_MAX, INT8_MAX, QUANT_EPS, QuantScheme

if torch.cuda.is_available():
    DEVICE = "cuda"
elif INTERPRETING.value:
    DEVICE = "cpu"
else:
    DEVICE = None
    pytestmark = pytest.mark.skip(reason="needs a CUDA GPU or TRITON_INTERPRET=1 for CPU tensors")

F8 = torch.float8_e4m3fn
GROUP = 128
# The per-granularity scheme used to exercise each fp8 quantizer.
FP8_SCHEME = {
    "token": QuantScheme.FP8_CHANNEL_TOKEN,
    "token_group": QuantScheme.FP8_BLOCK128,
    "tensor_dynamic": QuantScheme.FP8_TENSOR_DYNAMIC,
    "tensor_static": QuantScheme.FP8_TENSOR_STATIC,
}
GRANULARITIES = tuple(FP8_SCHEME)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 rounding of the SPEC's absmax floor, divided as the kernels divide it.
ZERO_ROW_SCALE_FP8 = torch.tensor(QUANT_EPS, dtype=torch.float32) / FP8_MAX


# ---------------------------------------------------------------------------------------------
# The SPEC quantizer in torch
# ---------------------------------------------------------------------------------------------
def torch_scale(x, granularity, qmax, static_scale=None):
    """The scale tensor of SPEC.md, in the shape quantize_activation returns."""
    xf = x.float()
    rows, cols = xf.shape
    if granularity == "token":
        absmax = xf.abs().amax(dim=1, keepdim=True) if cols else xf.new_zeros(rows, 1)
    elif granularity == "token_group":
        groups = math.ceil(cols / GROUP)
        padded = torch.nn.functional.pad(xf.abs(), (0, groups * GROUP - cols))
        absmax = padded.view(rows, groups, GROUP).amax(dim=2)
    elif granularity == "tensor_dynamic":
        absmax = xf.abs().amax().reshape(1) if xf.numel() else xf.new_zeros(1)
    else:
        return static_scale
    # Divide by a tensor, not a Python number: CUDA torch turns `t / number` into
    # t * (1 / number), which is not the IEEE quotient the SPEC asks for (one ulp apart).
    return absmax.clamp(min=QUANT_EPS) / torch.full_like(absmax, qmax)


def torch_quantize(x, granularity, dtype=F8, qmax=None, static_scale=None):
    """(x_q, scale) per SPEC.md: sat(rne(x / s)) with the fp32 division x / s."""
    qmax = qmax if qmax is not None else (FP8_MAX if dtype == F8 else INT8_MAX)
    scale = torch_scale(x, granularity, qmax, static_scale)
    per_column = scale.repeat_interleave(GROUP, dim=1)[:, : x.shape[1]] if granularity == "token_group" else scale
    y = x.float() / per_column
    if dtype == torch.int8:
        return torch.round(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale  # round: half to even
    return y.clamp(-qmax, qmax).to(F8), scale


def assert_codes_equal(actual, expected):
    """Bitwise equality of quantized codes, with the first mismatches in the message.

    Under the interpreter only, fp8 -0 and +0 count as equal: the shared shim
    ``_interp.to_fp8_e4m3`` rounds through ``(y + 1.5*2^23) - 1.5*2^23``, which turns -0 into +0
    (the dequantized value is the same; reported to the shim's owner). On the GPU every bit counts.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.view(torch.uint8).cpu(), expected.view(torch.uint8).cpu()
    if actual.dtype == F8 and INTERPRETING.value:
        a, e = a.masked_fill(a == 0x80, 0), e.masked_fill(e == 0x80, 0)
    bad = (a != e).nonzero()
    if len(bad):
        shown = ", ".join(
            f"{tuple(i.tolist())}: got {actual[tuple(i)].float().item()} want {expected[tuple(i)].float().item()}"
            for i in bad[:5])
        raise AssertionError(f"{len(bad)} of {a.numel()} codes differ; first: {shown}")


def finite_fp8_values():
    """The 253 distinct finite e4m3fn values, ascending (+0 and -0 merge)."""
    every_code = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(F8).float()
    return torch.unique(every_code[~every_code.isnan()])


def expected_fp8_bits(values):
    """Bits of RNE(values) for values that are codes or exact midpoints of adjacent codes.

    Independent of any cast: a code maps to itself; a midpoint maps to whichever neighbour has
    an even bit pattern (the last mantissa bit is the last bit of the code).
    """
    grid = finite_fp8_values()
    bits_of = {v: int(torch.tensor(v).to(F8).view(torch.uint8)) for v in grid.tolist()}
    bits_of[0.0] = 0
    out = []
    for v in values.tolist():
        if v in bits_of:
            out.append(0x80 if (v == 0 and math.copysign(1, v) < 0) else bits_of[v])
            continue
        above = int(torch.searchsorted(grid, torch.tensor(v)))
        lo, hi = grid[above - 1].item(), grid[above].item()
        assert (lo + hi) / 2 == v, f"{v} is neither a code nor a midpoint"
        even = [b for b in (bits_of[lo], bits_of[hi]) if b % 2 == 0]
        assert len(even) == 1
        bits = even[0]
        out.append(0x80 if (bits == 0 and v < 0) else bits)  # a tie to zero keeps its sign
    return torch.tensor(out, dtype=torch.uint8)


def place_with_anchors(values, rows, cols, anchor):
    """Lay values into [rows, cols] around an ``anchor`` at column 0 of every 128-column group.

    With the anchor the largest magnitude, every row, every row group and the whole tensor
    share absmax == anchor. Returns (x, positions of the values in row-major order).
    """
    x = torch.zeros(rows, cols)
    is_anchor = torch.zeros(rows, cols, dtype=torch.bool)
    is_anchor[:, ::GROUP] = True
    x[is_anchor] = anchor
    free = (~is_anchor).flatten().nonzero().squeeze(1)
    assert len(free) >= len(values), "not enough slots for the values"
    positions = free[: len(values)]
    x.view(-1)[positions] = values
    return x, positions


def quantize_scheme(x, granularity, **kwargs):
    return quantize_activation(x, FP8_SCHEME[granularity], **kwargs)


# ---------------------------------------------------------------------------------------------
# fp8: every code, every midpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_every_code_and_midpoint_lands_exactly(granularity, dtype):
    grid = finite_fp8_values()
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact in fp32: one more mantissa bit than e4m3
    values = torch.cat([grid, -grid[grid == 0], midpoints])  # -0 included
    values = torch.cat([values, -values])  # each value in both signs (also as the lower code)
    x, positions = place_with_anchors(values, rows=8, cols=200, anchor=FP8_MAX)  # 200: groups 128 + 72
    # Row scales 2^-3 .. 2^4 for per-row granularities, one scale 2^2 for per-tensor ones; powers
    # of two keep x exact in every input dtype (fp16 covers 2^-14 .. 65504) and x / s exact.
    if granularity in ("token", "token_group"):
        row_scale = 2.0 ** torch.arange(-3, 5, dtype=torch.float32)[:, None]
    else:
        row_scale = torch.full((8, 1), 4.0)
    x = x * row_scale
    assert torch.equal(x.to(dtype).float(), x), "the values must be exact in the input dtype"
    x = x.to(dtype).to(DEVICE)
    static = torch.tensor([4.0], device=DEVICE) if granularity == "tensor_static" else None

    x_q, scale = quantize_scheme(x, granularity, static_scale=static)

    want_q, want_scale = torch_quantize(x, granularity, static_scale=static)
    assert torch.equal(scale, want_scale)
    exact_scale = {"token": row_scale, "token_group": row_scale.expand(8, 2),
                   "tensor_dynamic": torch.tensor([4.0]), "tensor_static": torch.tensor([4.0])}[granularity]
    assert torch.equal(scale.cpu(), exact_scale)
    assert_codes_equal(x_q, want_q)
    # The torch cast is itself checked against the independent RNE expectation.
    want_bits = expected_fp8_bits(values)
    got_bits = x_q.view(torch.uint8).cpu().view(-1)[positions]
    torch_bits = want_q.view(torch.uint8).cpu().view(-1)[positions]
    assert torch.equal(torch_bits, want_bits)
    assert_codes_equal(got_bits.view(F8), want_bits.view(F8))
    assert (x_q.view(torch.uint8).cpu()[:, ::GROUP] == 0x7E).all(), "anchors must map to 448"


def test_fp8_ties_round_to_even_examples():
    # Hand-checked ties: 1.0625 lies between 1.0 (mantissa 000) and 1.125 (001) -> 1.0;
    # 1.1875 between 1.125 (001) and 1.25 (010) -> 1.25; 2^-10 between 0 and 2^-9 -> 0;
    # 3*2^-10 between 2^-9 (subnormal 001) and 2^-8 (010) -> 2^-8; 464 is beyond the last code.
    ties = torch.tensor([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 432.0, 448.0])
    want = torch.tensor([1.0, 1.25, 0.0, 2.0 ** -8, 448.0, 448.0])  # 432: 416 (odd) or 448 (even)
    x = torch.cat([ties, -ties]).reshape(1, -1).to(DEVICE)
    x_q, scale = quantize_activation(x, "fp8_channel_token")
    assert scale.item() == 1.0
    assert torch.equal(x_q.float().cpu(), torch.cat([want, -want]).reshape(1, -1))


# ---------------------------------------------------------------------------------------------
# int8: ties to even, saturation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_int8_every_integer_and_tie(dtype):
    integers = torch.arange(-127, 128, dtype=torch.float32)
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5  # -126.5 .. 126.5
    values = torch.cat([integers, ties])
    # Independent expectation: a tie k + 0.5 goes to whichever of k, k + 1 is even.
    floor = torch.floor(ties)
    want_ties = torch.where(floor.remainder(2) == 0, floor, floor + 1)
    want = torch.cat([integers, want_ties]).to(torch.int8)
    x, positions = place_with_anchors(values, rows=4, cols=256, anchor=INT8_MAX)
    row_scale = 2.0 ** torch.tensor([[-2.0], [0.0], [1.0], [5.0]])  # exact in fp16 too (126.5*32)
    x = x * row_scale
    assert torch.equal(x.to(dtype).float(), x), "the values must be exact in the input dtype"
    x = x.to(dtype).to(DEVICE)

    x_q, scale = quantize_activation(x, "int8_channel_token")

    assert torch.equal(scale.cpu(), row_scale)
    want_q, want_scale = torch_quantize(x, "token", torch.int8)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)
    assert torch.equal(x_q.cpu().view(-1)[positions], want)
    assert torch.equal(x_q.cpu()[:, ::GROUP], torch.full((4, 2), 127, dtype=torch.int8))


def _absmax_values_above_qmax(qmax, count=4096):
    """fp32 absmax values a with fl(a / fl(a / qmax)) > qmax: x / s lands past QMAX."""
    candidates = 1.0 + torch.arange(count, dtype=torch.float32) * 2.0 ** -20
    s = candidates / qmax
    return candidates[candidates / s > qmax]


@pytest.mark.parametrize("scheme", ["int8_channel_token", "fp8_channel_token"])
def test_dynamic_extremes_saturate_to_qmax(scheme):
    """The absmax element maps to +-QMAX even where fp32 puts a / s just above QMAX."""
    qmax = QuantScheme(scheme).act_qmax
    over = _absmax_values_above_qmax(qmax)[:8]
    assert len(over) == 8, "the search must find absmax values that overshoot QMAX"
    rows = torch.stack([over, -over, torch.zeros(8)], dim=1)  # row r: +a, -a, 0
    rows = torch.cat([rows, torch.tensor([[-1.0, 0.5, 1.0]])])  # a row whose absmax is negative
    x = rows.to(DEVICE)
    x_q, scale = quantize_activation(x, scheme)
    want_q, want_scale = torch_quantize(x, "token", QuantScheme(scheme).act_dtype)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)
    got = x_q.float().cpu()
    assert torch.equal(got[:8, :2], torch.tensor([[qmax, -qmax]] * 8))
    assert got[8, 0].item() == -qmax and got[8, 2].item() == qmax
    assert got.abs().max().item() == qmax  # int8 never produces -128


def test_fp8_static_scale_saturates_beyond_448():
    s = 0.5
    beyond = torch.tensor([448.0, 449.0, 464.0, 480.0, 1000.0, 3.0e38])  # all beyond or at 448*s
    x = torch.cat([beyond * s, -beyond * s]).reshape(2, 6).to(DEVICE)
    static = torch.tensor(s, device=DEVICE)  # shape [] is accepted like [1]
    x_q, scale = quantize_activation(x, "fp8_tensor_static", static_scale=static)
    assert scale is static
    assert torch.equal(x_q.float().cpu(), torch.tensor([[448.0] * 6, [-448.0] * 6]))


def test_fnuz_qmax_scales_to_224_and_saturates_there():
    x = torch.tensor([[1.0, -3.5, 0.25, 7.0], [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    x_q, scale = quantize_activation(x, "fp8_channel_token", qmax=FP8_FNUZ_MAX)
    want_q, want_scale = torch_quantize(x, "token", qmax=FP8_FNUZ_MAX)
    assert torch.equal(scale, want_scale)
    assert torch.equal(scale[0].cpu(), torch.tensor([7.0 / 224.0]))
    assert_codes_equal(x_q, want_q)
    assert x_q.float()[0, 3].item() == 224.0
    static = torch.tensor([0.01], device=DEVICE)
    x_q, _ = quantize_activation(x, "fp8_tensor_static", static_scale=static, qmax=FP8_FNUZ_MAX)
    assert x_q.float()[0, 3].item() == 224.0  # 700 saturates at the fnuz QMAX, not 448


# ---------------------------------------------------------------------------------------------
# The division x / s is IEEE fp32 (not x * (1/s), not an approximate divide)
# ---------------------------------------------------------------------------------------------
def division_sensitive_values(scale, qmax, int8):
    """fp32 values x (both signs) whose code differs between fl(x / s) and fl(x * fl(1 / s)).

    Searched next to every rounding midpoint m (k + 0.5 for int8, between adjacent fp8 codes):
    x = fl(m * s) and its fp32 neighbours, where one ulp of the quotient decides the code.
    """
    if int8:
        midpoints = torch.arange(0, 127, dtype=torch.float32) + 0.5
    else:
        grid = finite_fp8_values()
        grid = grid[grid >= 0]
        midpoints = (grid[1:] + grid[:-1]) / 2

    def rne(y):
        return torch.round(y).clamp(-INT8_MAX, INT8_MAX) if int8 else y.clamp(-qmax, qmax).to(F8).float()

    x = midpoints * scale
    candidates = torch.cat([x, torch.nextafter(x, x * 2), torch.nextafter(x, x / 2)])
    differs = rne(candidates / scale) != rne(candidates * (1 / scale))
    found = candidates[differs]
    return torch.cat([found, -found])


@pytest.mark.parametrize("scheme", ["fp8_channel_token", "int8_channel_token", "fp8_tensor_static"])
def test_quotient_is_ieee_division(scheme):
    scheme = QuantScheme(scheme)
    int8 = scheme.act_dtype == torch.int8
    qmax = scheme.act_qmax
    # Absmax values (fp32 in [1, 2), so s = absmax / qmax is no power of two) whose scale has
    # many division-sensitive quotients; for some s, fl(1/s) is so close to 1/s that few differ.
    gen = torch.Generator().manual_seed(23)
    rows = []
    for a in 1.0 + torch.rand(64, generator=gen):
        found = division_sensitive_values(a / qmax, qmax, int8)
        if len(found) >= 20:
            rows.append(torch.cat([a.reshape(1), found[:200]]))
        if len(rows) == 4:
            break
    assert len(rows) == 4, "the search must find quotients that one ulp moves to another code"
    static = None
    if scheme.act_granularity == "tensor_static":  # one given scale: keep the first row's search
        static = (rows[0][:1] / qmax).to(DEVICE)
        rows = [rows[0]]
    width = max(len(r) for r in rows)
    x = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]).to(DEVICE)

    x_q, scale = quantize_activation(x, scheme, static_scale=static)

    want_q, want_scale = torch_quantize(x, scheme.act_granularity, scheme.act_dtype, static_scale=static)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)


# ---------------------------------------------------------------------------------------------
# Zero rows, outliers, column counts that are not multiples of 128, wide rows
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "fp8_tensor_dynamic",
                                    "int8_channel_token"])
def test_all_zero_rows_get_the_floor_scale_and_zero_codes(scheme):
    scheme = QuantScheme(scheme)
    x = torch.zeros(3, 200, device=DEVICE)
    if scheme.act_granularity != "tensor_dynamic":
        x[0, 5] = 2.0  # row 0 has a nonzero first group and an all-zero second group
    x_q, scale = quantize_activation(x, scheme)
    floor_scale = torch.tensor(QUANT_EPS, dtype=torch.float32) / scheme.act_qmax
    want_q, want_scale = torch_quantize(x, scheme.act_granularity, scheme.act_dtype)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)
    assert torch.isfinite(x_q.float()).all() and torch.isfinite(scale).all()
    # every scale is the floor except those of row 0's first group (or whole row, for token)
    is_floor = torch.ones(scale.shape, dtype=torch.bool)
    if scheme.act_granularity != "tensor_dynamic":
        is_floor[0, 0] = False
    assert (scale.cpu()[is_floor] == floor_scale).all()
    assert (scale.cpu()[~is_floor] == 2.0 / scheme.act_qmax).all()
    assert (x_q.float().cpu()[1:] == 0).all()


@pytest.mark.parametrize("scheme", ["fp8_tensor_token", "fp8_block128", "int8_channel_token", "fp8_tensor_dynamic"])
def test_skipping_zero_divisions_keeps_every_bit(scheme, monkeypatch):
    """``_div_rn``: tiles that are mostly padding bypass the division for zeros (div.rn's slow path
    on the GPU); +-0, subnormals and ordinary values give the same codes and scales either way."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 300, generator=gen)
    x[:, ::7] = 0.0
    x[:, 1::7] = -0.0
    x[:, 2::11] = 1e-40  # fp32 subnormals
    x[3] = 0.0  # an all-zero row: the floor scale
    x = x.to(torch.bfloat16).to(DEVICE)
    results = {}
    for skip in (False, True):
        monkeypatch.setattr(quantize_module, "_skip_zero_divisions", lambda *args, skip=skip: skip)
        results[skip] = quantize_activation(x, scheme)
    (q_plain, s_plain), (q_skip, s_skip) = results[False], results[True]
    assert torch.equal(s_plain.view(torch.int32), s_skip.view(torch.int32))
    assert torch.equal(q_plain.view(torch.uint8), q_skip.view(torch.uint8))
    if scheme == "fp8_tensor_token":  # the fused silu quantizer's silu(gate) divides as well
        c1 = torch.cat([x, x.flip(0)], dim=1)
        fused = {}
        for skip in (False, True):
            monkeypatch.setattr(quantize_module, "_skip_zero_divisions", lambda *args, skip=skip: skip)
            fused[skip] = silu_and_mul_quant_fp8_group(c1)
        assert torch.equal(fused[False][0].view(torch.uint8), fused[True][0].view(torch.uint8))
        assert torch.equal(fused[False][1].view(torch.int32), fused[True][1].view(torch.int32))


def test_zero_divisions_are_skipped_in_small_or_mostly_padded_launches():
    skip = quantize_module._skip_zero_divisions
    assert skip((1, 1), 1, 7168, 1, 8192)  # decode: one row, latency-bound
    assert skip((4, 1), 8, 2048, 2, 2048)  # c2 of one token's routes, full tiles
    assert skip((32768, 1), 131072, 768, 4, 1024)  # 25% of the tile elements are padding
    assert not skip((32768, 1), 32768, 14336, 1, 16384)  # prefill: 12.5%
    assert not skip((16384, 1), 16384, 4096, 1, 4096)  # full tiles


def test_one_outlier_per_128_column_group():
    gen = torch.Generator().manual_seed(11)
    rows, cols = 5, 300  # groups of 128, 128, 44
    x = torch.randn(rows, cols, generator=gen)
    groups = math.ceil(cols / GROUP)
    outliers = torch.empty(rows, groups)
    for g in range(groups):
        width = min(GROUP, cols - g * GROUP)
        cols_hit = g * GROUP + torch.randint(0, width, (rows,), generator=gen)
        sign = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
        outliers[:, g] = sign * (500.0 + 1000.0 * torch.rand(rows, generator=gen))
        x[torch.arange(rows), cols_hit] = outliers[:, g]
    # bf16 rows inside a wider buffer: the row stride (384) is not the column count
    storage = torch.full((rows, 384), float("nan"), dtype=torch.bfloat16)
    storage[:, :cols] = x
    x = storage.to(DEVICE)[:, :cols]
    x_q, scale = quantize_activation(x, "fp8_block128")
    want_q, want_scale = torch_quantize(x, "token_group")
    assert torch.equal(scale, want_scale)
    expected_scale = outliers.bfloat16().float().abs() / FP8_MAX
    assert torch.equal(scale.cpu(), expected_scale)
    assert_codes_equal(x_q, want_q)
    # each outlier is the group's absmax, so it quantizes to +-448
    assert (x_q.float().abs().cpu() == FP8_MAX).sum().item() == rows * groups


def test_tiling_never_changes_results(monkeypatch):
    """Tiny tiles: multi-block column loops per row (token), many partial maxima (tensor)."""
    monkeypatch.setattr(quantize_module, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(quantize_module, "_MAX_BLOCK_N", 32)
    monkeypatch.setattr(quantize_module, "_PARTIALS_BLOCK", 2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 100, generator=gen)
    x[7, 97] = -50.0  # the tensor absmax sits in the last partial and the last column block
    x[2, 70] = 9.0
    x = x.to(DEVICE)
    for granularity in GRANULARITIES:
        static = torch.tensor([0.02], device=DEVICE) if granularity == "tensor_static" else None
        x_q, scale = quantize_scheme(x, granularity, static_scale=static)
        want_q, want_scale = torch_quantize(x, granularity, static_scale=static)
        assert torch.equal(scale, want_scale), granularity
        assert_codes_equal(x_q, want_q)
    x_q, scale = quantize_activation(x, "int8_channel_token")
    want_q, want_scale = torch_quantize(x, "token", torch.int8)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)


@pytest.mark.parametrize("scheme", ["fp8_channel_token", "int8_channel_token"])
def test_token_scale_over_a_row_wider_than_one_tile(scheme):
    scheme = QuantScheme(scheme)
    cols = quantize_module._MAX_BLOCK_N + 37  # two column blocks, the second short
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, cols, generator=gen, dtype=torch.float32)
    x[0, cols - 1] = 30.0  # absmax in the second block: the first pass must see every block
    x = x.to(torch.float16).to(DEVICE)
    x_q, scale = quantize_activation(x, scheme)
    want_q, want_scale = torch_quantize(x, "token", scheme.act_dtype)
    assert torch.equal(scale, want_scale)
    assert_codes_equal(x_q, want_q)


def test_empty_inputs():
    x = torch.zeros(0, 200, device=DEVICE)
    for granularity in ("token", "token_group", "tensor_dynamic"):
        x_q, scale = quantize_scheme(x, granularity)
        assert x_q.shape == (0, 200)
        assert scale.shape == {"token": (0, 1), "token_group": (0, 2), "tensor_dynamic": (1,)}[granularity]
    _, scale = quantize_scheme(x, "tensor_dynamic")
    assert torch.equal(scale.cpu(), ZERO_ROW_SCALE_FP8.reshape(1))


# ---------------------------------------------------------------------------------------------
# row_valid
# ---------------------------------------------------------------------------------------------
def _as_mask(valid: torch.Tensor, kind: str) -> torch.Tensor:
    """The row mask as bools, or as the pipeline passes it: int32 route experts (-1 = invalid)."""
    if kind == "bool":
        return valid
    return torch.where(valid, torch.arange(valid.numel()) % 3, -1).to(torch.int32)


@pytest.mark.parametrize("mask_kind", ["bool", "route_experts"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_invalid_rows_are_never_read(granularity, mask_kind):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 200, generator=gen)
    x[1] = float("nan")
    x[4] = 1.0e30  # would dominate a per-tensor scale if it were read
    x[4, 3] = float("inf")
    valid = torch.tensor([True, False, True, True, False, True])
    x, valid_dev = x.to(DEVICE), valid.to(DEVICE)
    static = torch.tensor([0.05], device=DEVICE) if granularity == "tensor_static" else None

    x_q, scale = quantize_scheme(x, granularity, static_scale=static,
                                 row_valid=_as_mask(valid, mask_kind).to(DEVICE))

    want_q, want_scale = torch_quantize(x[valid_dev], granularity, static_scale=static)
    assert_codes_equal(x_q[valid_dev], want_q)
    if granularity in ("token", "token_group"):
        assert torch.equal(scale[valid_dev], want_scale)
    else:
        assert torch.equal(scale, want_scale)
    assert torch.isfinite(scale).all()
    assert torch.isfinite(x_q[valid_dev].float()).all()


def test_tensor_dynamic_scale_spans_finite_entries_only():
    """A NaN or Inf in one valid token must not set every other token's scale (no leak)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 200, generator=gen)
    x[1, 7] = float("nan")
    x[2, 150] = float("-inf")
    x[3, 199] = -6.5  # the finite absmax
    x = x.to(DEVICE)
    x_q, scale = quantize_activation(x, "fp8_tensor_dynamic")
    assert torch.equal(scale.cpu(), torch.tensor([6.5]) / torch.tensor([FP8_MAX]))
    clean_rows = torch.tensor([True, False, False, True], device=DEVICE)
    want_q, _ = torch_quantize(x[clean_rows], "tensor_static", static_scale=scale)
    assert_codes_equal(x_q[clean_rows], want_q)
    assert x_q[2, 150].float().item() == -FP8_MAX  # -inf / s saturates


# ---------------------------------------------------------------------------------------------
# Fused silu(gate) * up -> fp8 per token per 128 columns
# ---------------------------------------------------------------------------------------------
def fused_reference_bounds(c1):
    """silu(gate) * up in fp32 torch, and the relative error allowed between it and the kernel.

    Derivation (first order, unit roundoff u = 2^-24, ulp <= 2^-23 relative): the kernel forms
    g / (1 + exp(-g)) * up. Its exp may be the GPU's ex2.approx (2 ulp = 2^-22) after rounding
    the argument g*log2(e), which moves the exponent by |g|*log2(e)*u and exp by |g|*u
    relative; then three roundings (1 + e, the division, * up) add 3u; the sensitivity of
    1/(1 + e) to e's relative error is e/(1 + e) <= 1. torch's fp32 silu * up: exp within
    2 ulp (CUDA expf; CPU Sleef is 1 ulp) plus three roundings, 2^-22 + 3u. The sum is
    (|g| + 14) * u per element; the second-order terms (< 2^-40) are below the u we add for
    the two fp32 divisions x / s in check_fused_codes.
    """
    gate, up = c1.float().chunk(2, dim=1)
    act = torch.nn.functional.silu(gate) * up
    rel_err = (gate.abs() + 14.0) * 2.0 ** -24
    return act, rel_err


def check_fused_codes(c2_q, scale, act, rel_err):
    """Each scale within the group's error of the torch scale; each code a rounding of a value
    within rel_err + 2^-22 (the error above plus both fp32 divisions by the scale) of act / scale.
    """
    rows, cols = act.shape
    groups = math.ceil(cols / GROUP)
    _, torch_scale_ = torch_quantize(act, "token_group")
    group_err = torch.nn.functional.pad(rel_err, (0, groups * GROUP - cols)).view(rows, groups, GROUP).amax(2)
    assert ((scale / torch_scale_ - 1).abs() <= group_err + 2.0 ** -22).all(), "scale outside its bound"

    t = act / scale.repeat_interleave(GROUP, dim=1)[:, :cols]
    width = rel_err + 2.0 ** -22
    lo = (t * (1 - width.copysign(t))).clamp(-FP8_MAX, FP8_MAX).to(F8).float()
    hi = (t * (1 + width.copysign(t))).clamp(-FP8_MAX, FP8_MAX).to(F8).float()
    got = c2_q.float()
    outside = (got < lo) | (got > hi)
    assert not outside.any(), f"{int(outside.sum())} codes are no rounding of a value within the bound"
    return lo, hi


def fused_input(rows, inter, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    c1 = 3.0 * torch.randn(rows, 2 * inter, generator=gen)
    c1[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # exp overflow, silu(x) = x, zero gate
    c1[1, inter:] = 0.0  # an all-zero activation row
    return c1.to(dtype)


# The interpreter's numpy exp overflows to inf for gate < -88 (silu -> -0), as intended.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_silu_and_mul_quant_matches_fp32_torch(dtype):
    inter = 200  # 128 + 72: the last group is short
    c1 = fused_input(6, inter, dtype, seed=1).to(DEVICE)
    c2_q, scale = silu_and_mul_quant_fp8_group(c1)
    assert c2_q.dtype == F8 and c2_q.shape == (6, inter)
    assert scale.dtype == torch.float32 and scale.shape == (6, 2)
    act, rel_err = fused_reference_bounds(c1)
    check_fused_codes(c2_q, scale, act, rel_err)
    assert (scale[1] == ZERO_ROW_SCALE_FP8.to(scale.device)).all() and (c2_q[1].float() == 0).all()
    # Teeth: the activation rounded to the storage dtype first (the unfused path) leaves the
    # bound for bf16 inputs, so this check can tell the fused path from the unfused one.
    if dtype == torch.bfloat16:
        unfused_q, unfused_scale = torch_quantize(act.to(dtype), "token_group")
        with pytest.raises(AssertionError):
            check_fused_codes(unfused_q, unfused_scale, act, rel_err)


@pytest.mark.parametrize("mask_kind", ["bool", "route_experts"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_fused_silu_invalid_rows_are_never_read(mask_kind):
    c1 = fused_input(5, 130, torch.bfloat16, seed=2)
    c1[2] = float("nan")
    c1[3, :] = float("inf")
    valid = torch.tensor([True, True, False, False, True])
    c1, mask = c1.to(DEVICE), _as_mask(valid, mask_kind).to(DEVICE)
    valid = valid.to(DEVICE)
    c2_q, scale = silu_and_mul_quant_fp8_group(c1, row_valid=mask)
    act, rel_err = fused_reference_bounds(c1[valid])
    check_fused_codes(c2_q[valid], scale[valid], act, rel_err)
    assert torch.isfinite(scale).all()


# ---------------------------------------------------------------------------------------------
# Against reference.quantize_activation, where the reference package provides it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "fp8_tensor_dynamic",
                                    "fp8_tensor_static", "int8_channel_token"])
def test_matches_reference_quantize_activation(scheme):
    # The reference runs on CPU: on CUDA, torch computes `t / 448.0` as t * (1 / 448.0), one ulp
    # away from the SPEC's IEEE quotient, so a CUDA reference scale would differ by an ulp.
    reference = pytest.importorskip("reference", reason="the reference package is not in the tree yet")
    ref_quantize = getattr(reference, "quantize_activation", None)
    if ref_quantize is None:
        pytest.skip("reference.quantize_activation does not exist yet")
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(5, 200, generator=gen).bfloat16()
    x[2] = float("nan")
    valid = torch.tensor([True, True, False, True, True])
    static = torch.tensor([0.01]) if scheme == "fp8_tensor_static" else None
    ref_q, ref_scale = ref_quantize(x, scheme, static_scale=static, valid_rows=valid)
    x_q, scale = quantize_activation(x.to(DEVICE), scheme, row_valid=valid.to(DEVICE),
                                     static_scale=None if static is None else static.to(DEVICE))
    assert_codes_equal(x_q[valid.to(DEVICE)], ref_q.to(x_q.device)[valid])
    if QuantScheme(scheme).act_granularity in ("token", "token_group"):
        assert torch.equal(scale.cpu()[valid], ref_scale.float().cpu()[valid])
    else:
        assert torch.equal(scale.cpu().reshape(-1), ref_scale.float().cpu().reshape(-1))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


BAD_INPUTS = [
    (lambda: quantize_activation(_x(2, 8), "int8_w8a16"), ValueError, "scheme 'int8_w8a16' does not quantize"),
    (lambda: quantize_activation(_x(2, 8), "none"), ValueError, "scheme 'none' does not quantize"),
    (lambda: quantize_activation(_x(2, 8), "fp9"), ValueError, "scheme must be one of"),
    (lambda: quantize_activation([[1.0]], "fp8_block128"), TypeError, "x must be a torch.Tensor"),
    (lambda: quantize_activation(_x(8), "fp8_block128"), ValueError, r"x must be 2-D \[rows, columns\]"),
    (lambda: quantize_activation(_x(2, 8, dtype=torch.int32), "fp8_block128"), ValueError,
     "x must be float32, float16 or bfloat16"),
    (lambda: quantize_activation(_x(8, 2).t(), "fp8_block128"), ValueError, "x must have unit last stride"),
    (lambda: quantize_activation(_x(2, 8), "fp8_tensor_static"), ValueError, "static_scale is required"),
    (lambda: quantize_activation(_x(2, 8), "fp8_tensor_static", static_scale=_x(2)), ValueError,
     r"static_scale must have shape \[\] or \[1\]"),
    (lambda: quantize_activation(_x(2, 8), "fp8_tensor_static", static_scale=_x(1, dtype=torch.float64)),
     ValueError, "static_scale must be float32"),
    (lambda: quantize_activation(_x(2, 8), "fp8_tensor_static", static_scale=0.5), TypeError,
     "static_scale must be a torch.Tensor"),
    (lambda: quantize_activation(_x(2, 8), "fp8_block128", static_scale=_x(1)), ValueError,
     "static_scale is only used by tensor_static schemes"),
    (lambda: quantize_activation(_x(2, 8), "fp8_block128", row_valid=_x(2)), ValueError,
     "row_valid must be a bool tensor"),
    (lambda: quantize_activation(_x(2, 8), "fp8_block128", row_valid=_x(3, dtype=torch.bool)), ValueError,
     r"row_valid must have shape \[2\]"),
    (lambda: quantize_activation(_x(2, 8), "fp8_block128", qmax=500.0), ValueError, r"qmax must lie in \(0, 448"),
    (lambda: quantize_activation(_x(2, 8), "int8_channel_token", qmax=224.0), ValueError, r"qmax must lie in \(0, 127"),
    (lambda: silu_and_mul_quant_fp8_group(_x(2, 7)), ValueError, r"c1 must be \[R, 2I\]"),
    (lambda: silu_and_mul_quant_fp8_group(_x(2, 2, 8)), ValueError, "c1 must be 2-D"),
    (lambda: silu_and_mul_quant_fp8_group(_x(2, 8).to(F8)), ValueError, "c1 must be float32, float16 or bfloat16"),
    (lambda: silu_and_mul_quant_fp8_group(_x(2, 8), row_valid=_x(2, dtype=torch.uint8)), ValueError,
     "row_valid must be a bool tensor"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-tensor rule, which needs CPU tensors")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(quantize_module.INTERPRETING, "value", False)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        quantize_activation(_x(2, 8), "fp8_block128")


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes, every granularity bit for bit, fused silu within its bound
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (larger shapes)")
def test_gpu_large_shapes_bit_exact():
    gen = torch.Generator(device="cuda").manual_seed(17)
    for rows, cols, dtype in [(3000, 7168, torch.bfloat16), (40000, 128, torch.float16),
                              (257, 4096 + 200, torch.float32)]:
        x = torch.randn(rows, cols, device="cuda", generator=gen).to(dtype)
        x[rows - 1, cols - 1] = 77.0  # per-tensor absmax in the last partial
        valid = torch.rand(rows, device="cuda", generator=gen) < 0.9
        for granularity in GRANULARITIES:
            static = torch.tensor([0.003], device="cuda") if granularity == "tensor_static" else None
            for row_valid in (None, valid):
                x_q, scale = quantize_scheme(x, granularity, static_scale=static, row_valid=row_valid)
                sel = slice(None) if row_valid is None else row_valid
                want_q, want_scale = torch_quantize(x[sel], granularity, static_scale=static)
                assert_codes_equal(x_q[sel], want_q)
                assert torch.equal(scale[sel] if granularity in ("token", "token_group") else scale, want_scale)
        x_q, scale = quantize_activation(x, "int8_channel_token")
        want_q, want_scale = torch_quantize(x, "token", torch.int8)
        assert torch.equal(scale, want_scale)
        assert_codes_equal(x_q, want_q)
    for rows, inter in [(4096, 1408), (33, 2048 + 64)]:
        c1 = fused_input(rows, inter, torch.bfloat16, seed=rows).cuda()
        c2_q, scale = silu_and_mul_quant_fp8_group(c1)
        act, rel_err = fused_reference_bounds(c1)
        check_fused_codes(c2_q, scale, act, rel_err)
