"""The one interpreter shim: in-kernel helpers whose GPU and interpreter forms differ.

Decided at trace time from ``TRITON_INTERPRET`` (``INTERPRETING`` is a constexpr), so the GPU
build contains only the native path. Facts behind each branch: ``docs/TRITON_FACTS.md``.

- ``dot``: the interpreter multiplies raw bits for bf16 ``tl.dot`` (triton issue 11584), so bf16
  operands go through fp32 there; fp32 operands always use IEEE dots (never TF32).
- ``rint``: round half to even. libdevice is unavailable when interpreting; the magic-number
  form ``(x + 1.5*2^23) - 1.5*2^23`` is RNE in fp32 for ``|x| < 2^22``, and callers only pass
  values already clamped far below that.
- ``to_fp8_e4m3``: the interpreter's fp32 -> e4m3fn cast is not RNE at ties and wrong for
  subnormals and out-of-range values, so there the value is first rounded onto the e4m3 grid
  exactly (the cast of a representable value is then exact). Saturates to +-448 on both paths.
- ``tanh``: libdevice on the GPU; ``2*sigmoid(2x) - 1`` when interpreting.
- ``to_storage`` / ``to_fp32``: the interpreter's fp32 -> bf16 cast truncates (about a third of
  random values land one ulp low) and mangles bf16 subnormals both ways, so there bf16 is rounded
  (RNE) and widened on the bits; on the GPU the native casts are already RNE and exact.
- ``add_rn``: an fp32 add the GPU compiler may not contract into an FMA with the product feeding
  it (Triton enables FP fusion by default: a plain ``a * b + c`` compiles to ``fma.rn.f32``, one
  rounding instead of two). PTX ``add.rn.f32`` (an explicit rounding mode) is never contracted;
  libdevice's ``add_rn`` would be, but Triton builds libdevice flush-to-zero (``add.rn.ftz``),
  which differs from a plain add on subnormals. The interpreter never contracts.

The interpreter's own infidelities (raw-bit bf16 dots, position-dependent dot rounding,
truncating bf16 casts, missing libdevice) and its per-helper re-patching are fixed once, for every
kernel, by ``moe_validate.contract.interpreter.install()``, called at import when interpreting;
the helpers here stay explicit so that our kernels' bits do not depend on those patches.
"""

import triton
import triton.language as tl

from moe_validate.contract.rules import interpreting

INTERPRETING = tl.constexpr(interpreting())

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23
FP8_E4M3_MAX = tl.constexpr(448.0)

if not INTERPRETING:
    from triton.language.extra import libdevice as _libdevice
else:  # the name must exist for the untaken branch; it is never traced
    _libdevice = None


if INTERPRETING:
    from moe_validate.contract import interpreter as _faithful_interpreter

    _faithful_interpreter.install()


@triton.jit
def to_fp32(x):
    """Exact widening of fp16/bf16/fp32 to fp32."""
    if INTERPRETING:
        if x.dtype == tl.bfloat16:
            y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.float32)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """One round-half-even rounding of fp32 to the storage dtype (fp32/fp16/bf16); NaN stays NaN."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            ties_to_even = 0x7FFF + ((bits >> 16) & 1)
            upper = tl.where(x != x, bits | 0x400000, bits + ties_to_even) >> 16
            y = upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def dot(a, b, acc):
    """acc += a @ b with fp32 accumulation; IEEE for fp32, bf16 routed via fp32 when interpreting."""
    if INTERPRETING:
        if a.dtype == tl.bfloat16:
            a = to_fp32(a)
        if b.dtype == tl.bfloat16:
            b = to_fp32(b)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def add_rn(x, y):
    """x + y in fp32, rounded once on its own (never fused with the product that made x or y)."""
    if INTERPRETING:
        return x + y
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def rint(x):
    """Round half to even, fp32 in and out. Valid for |x| < 2**22."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def tanh(x):
    if INTERPRETING:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        return _libdevice.tanh(x)


@triton.jit
def to_fp8_e4m3(x):
    """Saturating RNE cast of fp32 to float8_e4m3fn (x must be finite)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if INTERPRETING:
        # Round onto the e4m3 grid by hand: 3 mantissa bits, exponent floor -6 (subnormal step 2^-9).
        bits = x.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) - 127
        exp = tl.maximum(exp, -6)
        step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
        rounded = tl.abs(rint(x / step) * step)
        # the magic-number rint loses the sign of values that round to zero: restore it from the
        # sign bit, so -0.0 and tiny negatives give code 0x80 as torch's cast does
        x = tl.where(bits < 0, -rounded, rounded)
    return x.to(tl.float8e4nv)


@triton.jit
def to_int8(x):
    """Saturating RNE cast of fp32 to int8."""
    x = tl.minimum(tl.maximum(rint(x), -127.0), 127.0)
    return x.to(tl.int8)
