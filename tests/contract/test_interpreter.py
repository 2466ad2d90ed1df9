"""Pins each fix of the faithful interpreter (moe_validate/contract/interpreter.py) against torch on
the CPU: plain Triton code (no helpers of ours: ``.to()``, ``tl.dot``, ``libdevice``) run under the
interpreter must give what torch gives, which is what the GPU gives (docs/TRITON_FACTS.md)."""


import pytest
import torch

from moe_validate.contract.rules import interpreting

if not interpreting():  # before the module-level install() below, which refuses untested Tritons
    pytest.skip("patches Triton's interpreter; natively there is nothing to patch", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402

from moe_validate.contract import interpreter  # noqa: E402

interpreter.install()

BLOCK = 1024


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_bits(got, expected, what):
    differ = _bits(got) != _bits(expected)
    assert not differ.any(), (f"{what}: {int(differ.sum())} / {differ.numel()} elements differ; first at "
                              f"{int(differ.nonzero()[0][0])}: got {got[differ][0].item()!r}, "
                              f"torch {expected[differ][0].item()!r}")


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK)
    return y


def _fp32_probe_values() -> torch.Tensor:
    """Random values, exact ties between bf16 neighbours, fp32 and bf16 subnormals, signed zeros,
    infinities, NaN and values beyond the fp16 range."""
    gen = torch.Generator().manual_seed(17)
    random = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-20, 20, (4096,), generator=gen).float())
    bf16_grid = torch.randn(512, generator=gen).to(torch.bfloat16).float()
    ties = (bf16_grid.view(torch.int32) | 0x8000).view(torch.float32)  # exactly halfway to the next bf16
    tiny = torch.tensor([1e-40, -1e-40, 2.0 ** -133, 3e-39, -0.0, 0.0, float("inf"), -float("inf"), float("nan"),
                         70000.0, -1e6])
    return torch.cat([random, ties, tiny])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_to_half_casts_round_half_to_even_like_torch(dtype):
    x = _fp32_probe_values()
    _assert_same_bits(_cast(x, dtype), x.to(dtype), f"fp32 -> {dtype} .to()")


@pytest.mark.parametrize("src", [torch.int8, torch.int32])
def test_int_to_bf16_converts_by_value(src):
    x = torch.arange(-128, 128, dtype=torch.int32).to(src)
    _assert_same_bits(_cast(x, torch.bfloat16), x.to(torch.bfloat16), f"{src} -> bf16 .to()")


def test_bf16_widens_and_converts_to_int_by_value():
    x = (torch.randn(2048, generator=torch.Generator().manual_seed(3)) * 50).to(torch.bfloat16)
    _assert_same_bits(_cast(x, torch.float32), x.float(), "bf16 -> fp32 .to()")
    _assert_same_bits(_cast(x, torch.int32), x.to(torch.int32), "bf16 -> int32 .to() (toward zero)")
    _assert_same_bits(_cast(x, torch.float16), x.to(torch.float16), "bf16 -> fp16 .to()")


@triton.jit
def _bf16_arith_kernel(a_ptr, b_ptr, c_ptr, sum_ptr, diff_ptr, prod_ptr, quot_ptr, max_ptr, neg_ptr, less_ptr,
                       fma_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask)
    b = tl.load(b_ptr + offs, mask=mask)
    tl.store(sum_ptr + offs, a + b, mask=mask)
    tl.store(diff_ptr + offs, a - b, mask=mask)
    tl.store(prod_ptr + offs, a * b, mask=mask)
    tl.store(quot_ptr + offs, a / b, mask=mask)
    tl.store(max_ptr + offs, tl.maximum(a, b), mask=mask)
    tl.store(neg_ptr + offs, -a, mask=mask)
    tl.store(less_ptr + offs, (a < b).to(tl.int8), mask=mask)
    tl.store(fma_ptr + offs, tl.fma(a, b, tl.load(c_ptr + offs, mask=mask)), mask=mask)


def test_bf16_elementwise_arithmetic_is_correctly_rounded_like_torch():
    """torch's bf16 + - * / compute in fp32 and round once (correctly rounded, as the GPU's bf16
    instructions); the stock interpreter applies numpy to the raw uint16 bits."""
    gen = torch.Generator().manual_seed(11)
    a, b, c = ((torch.randn(2048, generator=gen) * 4).to(torch.bfloat16) for _ in range(3))
    outs = [torch.empty_like(a) for _ in range(6)] + [torch.empty(2048, dtype=torch.int8), torch.empty_like(a)]
    _bf16_arith_kernel[(triton.cdiv(a.numel(), BLOCK),)](a, b, c, *outs, a.numel(), BLOCK=BLOCK)
    total, diff, prod, quot, high, neg, less, fused = outs
    _assert_same_bits(total, a + b, "bf16 a + b")
    _assert_same_bits(diff, a - b, "bf16 a - b")
    _assert_same_bits(prod, a * b, "bf16 a * b")
    _assert_same_bits(quot, a / b, "bf16 a / b")
    _assert_same_bits(high, torch.maximum(a, b), "bf16 maximum")
    _assert_same_bits(neg, -a, "bf16 -a")
    _assert_same_bits(less, (a < b).to(torch.int8), "bf16 a < b")
    _assert_same_bits(fused, (a.double() * b.double() + c.double()).to(torch.bfloat16), "bf16 fma")


def test_fp32_to_fp8_e4m3_is_saturating_rne_on_every_code_and_midpoint():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[torch.isfinite(codes)].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, midpoints, torch.tensor([500.0, -1000.0, 1e-4, -1e-4, 2.0 ** -10, -0.0])])
    expected = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    _assert_same_bits(_cast(x, torch.float8_e4m3fn), expected, "fp32 -> fp8 e4m3fn .to()")
    _assert_same_bits(_cast(x.to(torch.bfloat16), torch.float8_e4m3fn),
                      x.to(torch.bfloat16).float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn), "bf16 -> fp8 .to()")


@triton.jit
def _plain_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      IEEE: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :])
    if IEEE:
        acc = tl.dot(a, b, input_precision="ieee")
    else:
        acc = tl.dot(a, b)
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty))


def _plain_dot(a, b, out_dtype, ieee=False):
    c = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype)
    _plain_dot_kernel[(1,)](a, b, c, BLOCK_M=a.shape[0], BLOCK_N=b.shape[1], BLOCK_K=a.shape[1], IEEE=ieee)
    return c


def _sequential(a, b):
    a, b = a.float(), b.float()
    total = a[:, 0, None] * b[None, 0, :]
    for k in range(1, a.shape[1]):
        total = total + a[:, k, None] * b[None, k, :]
    return total


def test_a_plain_bf16_kernel_gets_the_gpu_answer():
    """The issue's example: a correct bf16 GEMM (bf16 operands, fp32 accumulator, one .to(bf16))
    read gate values ~1e12 on the stock interpreter (raw-bit product, truncating cast)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    _assert_same_bits(_plain_dot(a, b, torch.bfloat16), _sequential(a, b).to(torch.bfloat16), "bf16 dot -> bf16")


def test_tf32_emulation_truncates_default_fp32_dots_only():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(16, 32, generator=gen), torch.randn(32, 16, generator=gen)
    tf32 = lambda t: (t.view(torch.int32) & ~0x1FFF).view(torch.float32)  # noqa: E731
    try:
        interpreter.install(fp32_dot="tf32")
        _assert_same_bits(_plain_dot(a, b, torch.float32), _sequential(tf32(a), tf32(b)), "default fp32 dot as tf32")
        _assert_same_bits(_plain_dot(a, b, torch.float32, ieee=True), _sequential(a, b), "ieee fp32 dot")
    finally:
        interpreter.install(fp32_dot="ieee")
    _assert_same_bits(_plain_dot(a, b, torch.float32), _sequential(a, b), "default fp32 dot, emulation off")


@triton.jit
def _libdevice_kernel(x_ptr, tanh_ptr, rint_ptr, round_ptr, exp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(tanh_ptr + offs, libdevice.tanh(x), mask=mask)
    tl.store(rint_ptr + offs, libdevice.rint(x), mask=mask)
    tl.store(round_ptr + offs, libdevice.round(x), mask=mask)
    tl.store(exp_ptr + offs, libdevice.exp(x * 0.01), mask=mask)


def test_libdevice_functions_vllm_uses_exist_and_agree_with_torch():
    gen = torch.Generator().manual_seed(7)
    halves = torch.arange(-20, 21, dtype=torch.float32) + 0.5  # ties: rint to even, round away from zero
    x = torch.cat([torch.randn(2000, generator=gen) * 10, halves, torch.tensor([0.49999997, -0.49999997, -0.0])])
    outs = [torch.empty_like(x) for _ in range(4)]
    _libdevice_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, *outs, x.numel(), BLOCK=BLOCK)
    tanh, rint, rounded, exp = outs
    _assert_same_bits(rint, torch.round(x), "libdevice.rint (half to even)")
    # C's roundf: half away from zero, the sign kept (roundf(-0.0) and roundf(-0.4) are -0.0)
    _assert_same_bits(rounded, torch.copysign(torch.floor(x.double().abs() + 0.5), x.double()).float(),
                      "libdevice.round (half away from zero)")
    # transcendentals: numpy's fp32 functions, within a few ulp of libdevice (not bit-identical)
    torch.testing.assert_close(tanh, torch.tanh(x), rtol=3e-7, atol=1e-7)
    torch.testing.assert_close(exp, torch.exp(x * 0.01), rtol=3e-7, atol=0)


def test_refuses_an_untested_triton_unless_overridden(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    monkeypatch.delenv(interpreter.ANY_TRITON_ENV, raising=False)
    with pytest.raises(interpreter.UntestedTritonError, match="tested with Triton 3.9.0; this is Triton 0.0.1"):
        interpreter.install()
    monkeypatch.setenv(interpreter.ANY_TRITON_ENV, "1")
    assert interpreter.install()["triton"] == "0.0.1"  # patches again: each patch is idempotent on its own


def test_install_rejects_an_unknown_fp32_dot_mode():
    with pytest.raises(ValueError, match="fp32_dot must be one of ieee, tf32; got 'tf64'"):
        interpreter.install(fp32_dot="tf64")
