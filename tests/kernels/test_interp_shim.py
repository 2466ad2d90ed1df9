"""Pins the facts kernels/_interp.py relies on (TRITON_NOTES.md): the casts are bit-exact against
torch on every fp8 code, every midpoint between codes (ties), signed zeros, subnormals and
out-of-range values, on the interpreter and natively on a GPU; dots are IEEE for fp32 and correct
for bf16 (the interpreter's raw-bit bf16 product is routed through fp32); ``add_rn`` after a product
rounds twice, like torch's separate multiply and add, subnormals included (no FMA, no flush to zero)."""

import pytest
import torch
import triton
import triton.language as tl

from kernel_test_support import assert_same_bits
from kernels._interp import add_rn, dot, tanh, to_fp32, to_fp8_e4m3, to_int8, to_storage
from kernels.activation import activation_fp32
from moe_validate.contract.rules import interpreting
from moe_validate.contract.spec import SWIGLU_LIMIT

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@triton.jit
def _cast_kernel(x_ptr, fp8_ptr, int8_ptr, tanh_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(fp8_ptr + offs, to_fp8_e4m3(x), mask=mask)
    tl.store(int8_ptr + offs, to_int8(x), mask=mask)
    tl.store(tanh_ptr + offs, tanh(x * 0.01), mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :])
    acc = dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


def _cast_inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].sort().values
    midpoints = (codes[1:] + codes[:-1]) / 2  # exact ties: round-half-even decides
    special = torch.tensor([-0.0, 0.0, -1e-6, 1e-6, -2.0**-10, 2.0**-10, 448.5, 464.0, 500.0, -1e4, 126.5, -127.5])
    return torch.cat([codes, midpoints, special, torch.randn(20000, generator=gen) * 100,
                      torch.randn(2000, generator=gen) * 1e-3])


def test_fp8_and_int8_casts_are_bit_exact_against_torch():
    x = _cast_inputs().to(DEVICE)
    fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    int8 = torch.empty(x.shape, dtype=torch.int8, device=DEVICE)
    th = torch.empty_like(x)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, fp8, int8, th, x.numel(), BLOCK=1024)
    expected_fp8 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    bad = (fp8.view(torch.uint8) != expected_fp8.view(torch.uint8)).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} fp8 codes differ, first inputs {x[bad[:5]].tolist()}"
    expected_int8 = torch.round(x).clamp(-127, 127).to(torch.int8)  # torch.round is half-to-even
    assert torch.equal(int8, expected_int8)
    # tanh: libdevice on GPU, 2*sigmoid(2x)-1 when interpreting; both within a few fp32 ulps
    torch.testing.assert_close(th, torch.tanh(x * 0.01), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dot_is_accurate_for_every_storage_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(32, 64, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(64, 32, generator=gen).to(dtype).to(DEVICE)
    c = torch.empty(32, 32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)
    ref = a.double() @ b.double()
    rel = float((c.double() - ref).norm() / ref.norm())
    # exact products of S-valued operands accumulated in fp32 over K=64: relF ~ sqrt(K) * 2^-24 ~ 5e-7;
    # TF32 would give ~1e-3 and the interpreter's raw-bit bf16 product ~1e9, so 1e-5 separates them
    assert rel < 1e-5, rel


@triton.jit
def _storage_kernel(x_ptr, y_ptr, back_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = to_storage(x, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(back_ptr + offs, to_fp32(tl.load(y_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_rounding_and_widening_match_torch(dtype):
    gen = torch.Generator().manual_seed(2)
    info = torch.finfo(dtype)
    # random values, exact ties between neighbours, subnormals, overflow to inf, signed zeros, NaN
    grid = torch.randn(4096, generator=gen).to(dtype)
    ties = (grid.float() + grid.float().nextafter(torch.tensor(float("inf"))).to(dtype).float()) / 2
    special = torch.tensor([0.0, -0.0, info.tiny / 3, -info.tiny / 5, info.tiny * 0.75, info.max * 1.001,
                            -info.max * 2, float("inf"), float("nan")])
    x = torch.cat([torch.randn(20000, generator=gen) * 3, ties, special]).float().to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    back = torch.empty_like(x)
    _storage_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, back, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} roundings differ, e.g. {x[~same][:4].tolist()}"
    assert torch.equal(back.isnan(), expected.isnan())
    finite = ~back.isnan()
    assert torch.equal(back[finite], expected.float()[finite])


@triton.jit
def _product_sum_kernel(x_ptr, w_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, add_rn(y, x * w), mask=mask)


def test_add_rn_rounds_the_product_first_and_keeps_subnormals():
    """The fused top-k sum adds the epilogue's last product (the c3 value itself for fp32 storage)
    with add_rn: an FMA would skip the product's rounding (a quarter of random triples differ)
    and a flush-to-zero add would lose subnormal sums."""
    gen = torch.Generator().manual_seed(3)
    n = 20000
    x, w, y = (torch.randn(n, generator=gen) for _ in range(3))
    tiny = torch.finfo(torch.float32).tiny
    # subnormal results: tiny products plus tiny addends (exact in fp32, flushed by an ftz add)
    x[:100], w[:100], y[:100] = tiny * 0.5, 0.25, tiny * 0.125
    x, w, y = x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    out = torch.empty_like(x)
    _product_sum_kernel[(triton.cdiv(n, 1024),)](x, w, y, out, n, BLOCK=1024)
    expected = y + x * w  # two kernels: two roundings
    assert bool((expected[:100] != 0).all()) and bool((expected[:100].abs() < tiny).all())
    differ = out.view(torch.int32) != expected.view(torch.int32)
    assert not bool(differ.any()), f"{int(differ.sum())} of {n} sums differ, first at {int(differ.nonzero()[0])}"


# ---------------------------------------------------------------------------------------------
# The interpreter's floating tl.dot is patched to a fixed-order sum (moe_validate.contract.interpreter): an element's
# bits depend on its own row and column only, so two correct kernels that put the same dot product
# at different tile positions agree bit for bit on every host (issue 24). np.matmul does not.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _native_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :])
    c = tl.load(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :])
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], tl.dot(a, b, c))


def _sequential_dot(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + a @ b the slow way: fp32 products, added over k in order, then the accumulator."""
    a, b = a.float(), b.float()
    total = a[:, 0, None] * b[None, 0, :]
    for k in range(1, a.shape[1]):
        total = total + a[:, k, None] * b[None, k, :]
    return total + acc


def _native_dot(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    c = acc.clone()
    _native_dot_kernel[(1,)](a, b, c, BLOCK_M=a.shape[0], BLOCK_N=b.shape[1], BLOCK_K=a.shape[1])
    return c


interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="the fixed-order dot patches the Triton interpreter; "
                                      "on a GPU tl.dot is the hardware's MMA (its order is the compiler's)")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_interpreter_dot_is_the_fixed_order_sum(dtype):
    gen = torch.Generator().manual_seed(24)
    a = torch.randn(16, 64, generator=gen).to(dtype)
    b = torch.randn(64, 32, generator=gen).to(dtype)
    acc = torch.randn(16, 32, generator=gen)
    assert_same_bits(_native_dot(a, b, acc), _sequential_dot(a, b, acc), f"{dtype} dot", "interpreter", "sequential")


@interpreter_only
def test_interpreter_dot_bits_do_not_depend_on_position_or_row_count():
    """The two rearrangements the kernels make: gate/up columns interleaved (fused activation) and
    a token row moved or computed in a smaller tile (permutation and sub-batch invariance)."""
    gen = torch.Generator().manual_seed(25)
    a = torch.randn(32, 64, generator=gen)
    b = torch.randn(64, 32, generator=gen)
    zeros = torch.zeros(32, 32)
    full = _native_dot(a, b, zeros)
    columns = torch.cat([torch.arange(0, 32, 2), torch.arange(1, 32, 2)])
    assert_same_bits(_native_dot(a, b[:, columns].contiguous(), zeros), full[:, columns], "column-permuted dot")
    rows = torch.randperm(32, generator=gen)
    assert_same_bits(_native_dot(a[rows].contiguous(), b, zeros), full[rows], "row-permuted dot")
    assert_same_bits(_native_dot(a[:16].contiguous(), b, zeros[:16]), full[:16], "16-row dot")


@triton.jit
def _activation_tile_kernel(x_ptr, u_ptr, y_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    y = activation_fp32(x, u, 0.0, ACTIVATION=ACTIVATION, HAS_CLAMP=False, SWIGLU_LIMIT=SWIGLU_LIMIT)
    tl.store(y_ptr + offs, y, mask=mask)


@interpreter_only
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swigluoai", "swiglustep"])
def test_interpreter_activation_bits_do_not_depend_on_tile_length_or_offset(activation):
    """The fused epilogue and the activation kernel apply the same fp32 math to tiles of other
    lengths and alignments; under the interpreter that math is numpy's, whose SIMD loops handle a
    vector body and a tail. Pinned here so that a host (or numpy build) where the tail rounds
    differently shows up as this failure, not as a fused-vs-unfused mismatch."""
    gen = torch.Generator().manual_seed(26)
    x, u = torch.randn(2, 1000, generator=gen) * 4
    def apply(offset, block):
        xs, us = x[offset:].contiguous(), u[offset:].contiguous()
        y = torch.empty_like(xs)
        _activation_tile_kernel[(triton.cdiv(xs.numel(), block),)](xs, us, y, xs.numel(), ACTIVATION=activation,
                                                                   BLOCK=block)
        return y
    whole = apply(0, 1024)
    for offset, block in [(0, 16), (3, 32), (5, 64), (7, 128)]:
        assert_same_bits(apply(offset, block), whole[offset:], f"{activation} at offset {offset}, tiles of {block}")
