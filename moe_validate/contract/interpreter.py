"""The faithful interpreter: patches that make Triton's CPU interpreter compute what a GPU computes.

Any Triton kernel run under ``TRITON_INTERPRET=1`` (ours, vLLM's, a third party's) gets the same
verdict it would get on a GPU only if the interpreter's arithmetic matches the GPU's where it
matters. ``install()`` (idempotent; our ``kernels/_interp.py`` and the ``vllm`` backend call it
when interpreting) patches Triton's ``InterpreterBuilder`` and launcher so that:

- **dots** (``create_dot``): a floating ``tl.dot`` is ``np.matmul`` there, which multiplies bf16
  operands as their raw uint16 bits (a correct bf16 kernel reads values ~1e12; triton issue
  11584) and whose BLAS kernel rounds an element by its row/column position and the tile's row
  count (measured: 72 of 512 elements of a 16x32x32 fp32 dot change when the columns are
  permuted), so two correct kernels that place one dot product in different tile positions
  disagree in the last bit. The patch makes every floating dot with an fp32 accumulator a
  fixed-order sum: both operands widened exactly to fp32 (bf16 on the bits, fp8 through Triton's
  exact fp8->fp16 widening), products rounded, added over k in order (``np.add.accumulate`` is
  sequential by definition), then the accumulator added. Integer dots keep Triton's own.
  With ``install(fp32_dot="tf32")`` (or ``MOE_VALIDATE_INTERPRET_FP32_DOT=tf32``) an fp32 x fp32
  dot whose ``input_precision`` is the default ``tf32`` first truncates both operands to TF32's
  10 mantissa bits, as the tensor cores of sm_80+ read fp32 registers, so a kernel that forgot
  ``input_precision="ieee"`` shows the GPU's TF32 error on the CPU too (the default, ``"ieee"``,
  keeps the interpreter's IEEE behaviour).
- **casts to and from bf16** (``cast_impl``): fp32 -> bf16 truncates there (about a third of
  random values one ulp low) and mangles bf16 subnormals; int8 -> bf16 and bf16 -> int reinterpret
  the raw bits (NaN for negative ints). The patch converts through torch on the CPU, which rounds
  half to even like the GPU's ``cvt.rn`` and converts integers by value.
- **bf16 elementwise arithmetic** (``binary_op``, ``unary_op``, ``create_fma``): bf16 is stored
  as raw uint16 bits and numpy's op applied to them (``1.5 + 0.5`` reads 1.3e38; vLLM's LoRA
  kernel's ``prev + acc.to(bf16)`` gave NaN). The patch computes in fp32 and rounds to nearest
  even, the GPU's correctly rounded bf16 result; negation flips the sign bit.
- **fp32/fp16/bf16 -> fp8 e4m3fn** (``create_fp_to_fp``, round-to-nearest-even requested): the
  interpreter's own conversion is not RNE at ties (1.0625 -> 1.125), wrong for subnormals and out
  of range (500 -> 256). The patch saturates to +-448 and casts through torch, which is what the
  H100 gives (0 of 131072 values differ after clamping; docs/TRITON_FACTS.md). Other fp8 formats
  and explicit round-toward-zero keep Triton's own.
- **libdevice** (``create_extern_elementwise``): the interpreter raises for every
  ``tl.extra.*.libdevice`` function. The patch evaluates the common ones with numpy in the
  argument's precision (``tanh``, ``rint``, ``round`` half away from zero as CUDA's ``roundf``,
  ``exp``, ``log``, ``sqrt``, ``rsqrt``, ``erf``, ...; table ``_LIBDEVICE``). Transcendentals
  are within a few ulp of libdevice, not bit-identical; rounding functions are exact.
  The interpreter patches only ``triton.language`` for a launch, so ``_install_patch_lang`` also
  routes ``tl.extra.cuda.libdevice`` and the generic ``tl.extra.libdevice`` through it.
- **speed** (``_install_patch_lang``): the interpreter re-patches ``triton.language`` on every
  call of a ``@triton.jit`` helper (``inspect.getmembers`` over the whole module each time),
  although the launch already patched the same modules and the patches are stateless; inside a
  launch a helper whose modules the launch covered is not patched again.

Each fix is pinned by a test against torch (``tests/contract/test_interpreter.py``). The patches
reach into the interpreter's internals, so ``install()`` refuses Triton versions it was not tested
with (``TESTED_TRITON_VERSIONS``) unless ``MOE_VALIDATE_INTERPRETER_ANY_TRITON=1``.

Part of the leaf contract: imports torch, numpy and triton only (lazily, inside ``install``).
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from typing import Optional

import numpy as np

__all__ = ["install", "installed", "fixed_order_dot", "TESTED_TRITON_VERSIONS", "ANY_TRITON_ENV",
           "FP32_DOT_ENV", "UntestedTritonError"]

TESTED_TRITON_VERSIONS = ("3.9.0",)
ANY_TRITON_ENV = "MOE_VALIDATE_INTERPRETER_ANY_TRITON"
FP32_DOT_ENV = "MOE_VALIDATE_INTERPRET_FP32_DOT"
_FP32_DOT_MODES = ("ieee", "tf32")

_lock = threading.Lock()
_installed: dict = {}  # what install() did: {"triton": version, "fp32_dot": mode}


class UntestedTritonError(RuntimeError):
    """install() on a Triton whose interpreter internals these patches were not tested against."""


def installed() -> Optional[dict]:
    """None before ``install()``; else ``{"triton": version, "fp32_dot": mode}``."""
    return dict(_installed) if _installed else None


def install(fp32_dot: Optional[str] = None) -> dict:
    """Patch Triton's interpreter (idempotent; safe to call when not interpreting: it only patches
    the interpreter's classes, which a GPU launch never uses). ``fp32_dot``: ``"ieee"`` (default,
    or ``MOE_VALIDATE_INTERPRET_FP32_DOT``) or ``"tf32"`` (emulate sm_80+ default fp32 dots)."""
    import triton

    mode = fp32_dot if fp32_dot is not None else os.environ.get(FP32_DOT_ENV, "ieee")
    if mode not in _FP32_DOT_MODES:
        raise ValueError(f"fp32_dot must be one of {', '.join(_FP32_DOT_MODES)}; got {mode!r}")
    version = triton.__version__
    if version not in TESTED_TRITON_VERSIONS and os.environ.get(ANY_TRITON_ENV, "") != "1":
        raise UntestedTritonError(
            f"moe_validate.contract.interpreter patches Triton's interpreter internals and was tested "
            f"with Triton {', '.join(TESTED_TRITON_VERSIONS)}; this is Triton {version}. Run "
            f"tests/contract/test_interpreter.py on it and add it to TESTED_TRITON_VERSIONS, or set "
            f"{ANY_TRITON_ENV}=1 to patch anyway")
    with _lock:
        _installed["fp32_dot"] = mode  # read by the dot patch at each call
        if _installed.get("triton") != version:
            _install_fixed_order_dot()
            _install_faithful_casts()
            _install_bf16_arithmetic()
            _install_libdevice()
            _install_patch_lang()
            _installed["triton"] = version
    return dict(_installed)


# ---------------------------------------------------------------------------------------------
# dots
# ---------------------------------------------------------------------------------------------
def _exact_fp32_operand(handle):
    """The dot operand as an fp32 numpy array, exactly, or None for a dtype the patch leaves alone."""
    import triton.language as tl
    from triton.runtime import interpreter

    dtype = handle.dtype.scalar if hasattr(handle.dtype, "scalar") else handle.dtype
    data = handle.data
    if data.dtype in (np.float32, np.float16):
        return data.astype(np.float32)
    if dtype == tl.bfloat16:  # stored as raw uint16 bits: widen on the bits
        return (data.astype(np.uint32) << 16).view(np.float32)
    if dtype.is_floating() and dtype.primitive_bitwidth == 8 and hasattr(interpreter, "_convert_float"):
        return interpreter._convert_float(data, dtype, tl.float16, None).view(np.float16).astype(np.float32)
    return None


def fixed_order_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b in fp32 with every product rounded, then summed over k in order 0..K-1."""
    products = a[:, :, None] * b[None, :, :]
    return np.add.accumulate(products, axis=1)[:, -1, :] + acc


def _truncate_to_tf32(x: np.ndarray) -> np.ndarray:
    """fp32 with the low 13 mantissa bits cleared: what an sm_80+ tensor core reads as TF32."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _is_default_tf32(input_precision) -> bool:
    from triton._C.libtriton import ir

    return input_precision in (getattr(ir.INPUT_PRECISION, "TF32", None), None)


def _install_fixed_order_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder_class = interpreter.InterpreterBuilder
    native = builder_class.create_dot
    if getattr(native, "_fixed_order", False):
        return

    def create_dot(self, a, b, d, input_precision=None, *rest):
        a32, b32 = _exact_fp32_operand(a), _exact_fp32_operand(b)
        if a32 is None or b32 is None or a32.ndim != 2 or d.data.dtype != np.float32:
            return native(self, a, b, d, input_precision, *rest)
        if (_installed.get("fp32_dot") == "tf32" and a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32
                and _is_default_tf32(input_precision)):
            a32, b32 = _truncate_to_tf32(a32), _truncate_to_tf32(b32)
        return interpreter.TensorHandle(fixed_order_dot(a32, b32, d.data), d.dtype.scalar)

    create_dot._fixed_order = True
    builder_class.create_dot = create_dot


# ---------------------------------------------------------------------------------------------
# casts
# ---------------------------------------------------------------------------------------------
def _torch_dtype(tl_dtype):
    import torch
    import triton.language as tl

    return {
        tl.float64: torch.float64, tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
        tl.int64: torch.int64, tl.int32: torch.int32, tl.int16: torch.int16, tl.int8: torch.int8, tl.uint8: torch.uint8,
        tl.int1: torch.bool, tl.float8e4nv: torch.float8_e4m3fn,
    }.get(tl_dtype)


def _to_torch(handle):
    """The handle's values as a torch CPU tensor (bf16 and fp8 reinterpreted from their stored bits)."""
    import torch
    import triton.language as tl

    dtype = handle.dtype.scalar
    data = np.ascontiguousarray(handle.data)
    if dtype == tl.bfloat16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    if dtype == tl.float8e4nv:
        return torch.from_numpy(data.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(data)


def _from_torch(tensor, tl_dtype) -> np.ndarray:
    import torch
    import triton.language as tl

    if tl_dtype == tl.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tl_dtype == tl.float8e4nv:
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


FP8_E4M3_MAX = 448.0


def _install_faithful_casts() -> None:
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder_class = interpreter.InterpreterBuilder
    native_cast, native_fp_to_fp = builder_class.cast_impl, builder_class.create_fp_to_fp
    if getattr(native_cast, "_faithful", False):
        return

    def cast_impl(self, src, dst_type):
        src_dtype, dst_dtype = src.dtype.scalar, dst_type.scalar
        if tl.bfloat16 in (src_dtype, dst_dtype) and src_dtype != dst_dtype:
            target = _torch_dtype(dst_dtype)
            if target is not None and _torch_dtype(src_dtype) is not None:
                return interpreter.TensorHandle(_from_torch(_to_torch(src).to(target), dst_dtype), dst_dtype)
        return native_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_dtype, dst_dtype = src.dtype.scalar, dst_type.scalar
        if (dst_dtype == tl.float8e4nv and src_dtype in (tl.float32, tl.float16, tl.bfloat16)
                and rounding_mode in (None, ir.ROUNDING_MODE.RTNE)):
            import torch

            wide = _to_torch(src).to(torch.float32).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)  # NaN stays NaN
            return interpreter.TensorHandle(_from_torch(wide.to(torch.float8_e4m3fn), dst_dtype), dst_dtype)
        return native_fp_to_fp(self, src, dst_type, rounding_mode)

    cast_impl._faithful = True
    builder_class.cast_impl = cast_impl
    builder_class.create_fp_to_fp = create_fp_to_fp
    # the lambdas behind create_fp_trunc & co. look cast_impl up on self at call time: nothing else to do


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (np.asarray(data).astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)  # RNE
    return rounded.view(torch.int16).numpy().view(np.uint16)


def _install_bf16_arithmetic() -> None:
    """bf16 elementwise arithmetic: the interpreter stores bf16 as raw uint16 bits and applies
    numpy's op to them (1.5 + 0.5 reads 1.3e38; negation and comparisons are wrong for negative
    values). The patch computes in fp32 and rounds to nearest even once, which for + - * / equals
    the GPU's correctly rounded bf16 op (fp32 has more than 2 * 8 + 2 bits, so the double rounding
    is innocuous); comparisons and min/max on the fp32 values; negation flips the sign bit."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder_class = interpreter.InterpreterBuilder
    native_binary, native_unary, native_fma = builder_class.binary_op, builder_class.unary_op, builder_class.create_fma
    if getattr(native_binary, "_faithful", False):
        return

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar != tl.bfloat16 or rhs.dtype.scalar != tl.bfloat16:
            return native_binary(self, lhs, rhs, op)
        output = op(_bf16_bits_to_fp32(lhs.data), _bf16_bits_to_fp32(rhs.data))
        if output.dtype == np.bool_:  # a comparison
            return interpreter.TensorHandle(output, tl.int1)
        return interpreter.TensorHandle(_fp32_to_bf16_bits(output), tl.bfloat16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return native_unary(self, arg, op)
        if op is np.negative:
            return interpreter.TensorHandle(np.asarray(arg.data) ^ np.uint16(0x8000), tl.bfloat16)
        return interpreter.TensorHandle(_fp32_to_bf16_bits(op(_bf16_bits_to_fp32(arg.data))), tl.bfloat16)

    def create_fma(self, x, y, z):
        if z.dtype.scalar != tl.bfloat16:
            return native_fma(self, x, y, z)
        wide = [_bf16_bits_to_fp32(h.data).astype(np.float64) for h in (x, y, z)]  # correctly rounded
        return interpreter.TensorHandle(_fp32_to_bf16_bits((wide[0] * wide[1] + wide[2]).astype(np.float32)),
                                        tl.bfloat16)

    binary_op._faithful = True
    builder_class.binary_op = binary_op
    builder_class.unary_op = unary_op
    builder_class.create_fma = create_fma


# ---------------------------------------------------------------------------------------------
# libdevice
# ---------------------------------------------------------------------------------------------
def _round_half_away(x):
    # in float64 x + 0.5 is exact for every fp32 x, so the truncation rounds exactly as roundf
    wide = x.astype(np.float64)
    return np.trunc(wide + np.copysign(0.5, wide)).astype(x.dtype)


_erf = np.vectorize(math.erf, otypes=[np.float64])

# libdevice name (without the __nv_ prefix and the f suffix) -> numpy evaluation in the argument dtype
_LIBDEVICE = {
    "tanh": np.tanh, "exp": np.exp, "exp2": np.exp2, "expm1": np.expm1, "log": np.log, "log2": np.log2,
    "log10": np.log10, "log1p": np.log1p, "sqrt": np.sqrt, "rsqrt": lambda x: (1 / np.sqrt(x)).astype(x.dtype),
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "sinh": np.sinh, "cosh": np.cosh, "asinh": np.arcsinh,
    "acosh": np.arccosh, "atanh": np.arctanh, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "erf": lambda x: _erf(x).astype(x.dtype), "floor": np.floor, "ceil": np.ceil, "trunc": np.trunc,
    "rint": np.rint, "nearbyint": np.rint, "round": _round_half_away, "fabs": np.abs,
    "pow": np.power, "fmax": np.fmax, "fmin": np.fmin, "fmod": np.fmod, "atan2": np.arctan2,
    "copysign": np.copysign, "hypot": np.hypot,
}


def _libdevice_function(symbol: str):
    for prefix in ("__nv_", "__ocml_"):
        if symbol.startswith(prefix):
            name = symbol[len(prefix):]
            break
    else:
        return None
    if name.endswith(("_f32", "_f64")):  # ocml spelling
        name = name[:-4]
    elif name.endswith("f") and name[:-1] in _LIBDEVICE:
        name = name[:-1]
    return _LIBDEVICE.get(name)


def _install_libdevice() -> None:
    from triton.runtime import interpreter

    builder_class = interpreter.InterpreterBuilder
    native = builder_class.create_extern_elementwise
    if getattr(native, "_faithful", False):
        return

    def create_extern_elementwise(self, libName, libPath, symbol, argList, retType, isPure):
        function = _libdevice_function(symbol)
        if function is None:
            return native(self, libName, libPath, symbol, argList, retType, isPure)
        result = np.asarray(function(*[arg.data for arg in argList]))
        return interpreter.TensorHandle(result.astype(interpreter._get_np_dtype(retType)), retType.scalar)

    create_extern_elementwise._faithful = True
    builder_class.create_extern_elementwise = create_extern_elementwise


# ---------------------------------------------------------------------------------------------
# how the interpreter patches triton.language: once per launch (speed), with libdevice included
# ---------------------------------------------------------------------------------------------
_launch_state = threading.local()  # .covered: ids of the language modules the running launch patched


def _patch_libdevice(scope) -> None:
    """Make ``tl.extra.cuda.libdevice.*`` and the generic ``tl.extra.libdevice.*`` callable in this
    launch: the interpreter patches only ``triton.language`` itself, so a libdevice builtin would be
    called without its semantic (and the generic module's stubs return None)."""
    from triton.language.extra import libdevice as generic
    from triton.runtime import interpreter

    try:
        from triton.language.extra.cuda import libdevice as cuda
    except ImportError:  # a Triton without the CUDA backend: nothing to route to
        return
    interpreter._patch_builtin(cuda, interpreter.interpreter_builder, scope)
    for name in dir(generic):
        if not name.startswith("_") and callable(getattr(cuda, name, None)):
            scope.set_attr(generic, name, getattr(cuda, name))


def _install_patch_lang() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    native_patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if native_patch is None or executor is None or getattr(native_patch, "_faithful", False):
        return
    native_launch = executor.__call__

    def language_modules(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        covered = getattr(_launch_state, "covered", None)
        modules = language_modules(fn)
        if covered is not None and modules and modules <= covered:
            return None  # a helper's call inside a launch: its callers ignore the scope
        scope = native_patch(fn)
        _patch_libdevice(scope)
        if covered is not None:
            covered |= modules
        return scope

    def launch(self, *args, **kwargs):
        outer = getattr(_launch_state, "covered", None)
        _launch_state.covered = set()
        try:
            return native_launch(self, *args, **kwargs)
        finally:
            _launch_state.covered = outer

    patch_lang._faithful = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch
