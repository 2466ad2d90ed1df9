"""Quantizers and dequantizers of SPEC.md, "Quantization schemes", written out plainly.

Quantizer arithmetic is defined in fp32, as the kernels do it:

- the input is converted to fp32 first (whatever its dtype, float64 included);
- a dynamic scale is ``s = max(absmax, 1e-10) / QMAX`` with absmax, the floor and the division
  all in fp32 (QMAX = 448 for fp8 e4m3fn, 127 for int8);
- ``q = saturate(round_half_even(x / s))`` with the division in fp32: fp8 is torch's
  ``.to(torch.float8_e4m3fn)`` after clamping to +-448 (that cast rounds half to even), int8 is
  ``torch.round`` (half to even) then a clamp to +-127;
- a static scale is used as given (shape ``()`` or ``(1,)``).

That is SPEC's quantizer. ``quantizer=`` (a ``moe_validate.contract.profile.Quantizer``, default
SPEC's) selects another implementation's formulas for the ``mirror`` to follow: one small
function per choice below (``_dynamic_scale``, ``_codes``).

Activation granularity (``QuantScheme.act_granularity``): ``"token"`` -> scale [R, 1];
``"token_group"`` -> scale [R, ceil(C/128)], one per row per 128 columns (the last group may be
short); ``"tensor_dynamic"`` -> scale [1] over the rows selected by ``valid_rows`` (all rows when
None); ``"tensor_static"`` -> the given scale.

Non-finite values: a per-tensor dynamic absmax skips NaN and Inf entries, so one bad token cannot
change the scale (and hence the output) of another (SPEC.md, Bad input: no leak). Per-token and
per-group scales are the row's own business: a NaN row gets a NaN scale and only it is affected.

Weight formats (``quantize_weights`` produces them for tests; ``dequantize_weights`` reads them):
fp8 block 128x128 (scale [E, ceil(N/128), ceil(K/128)]), fp8 per channel [E, N], fp8 per tensor
[E] (or [E, 1, 1]), int8 per channel [E, N], int4 per group of g along K packed two per byte
(low nibble = even k) with scale [E, N, K/g] and zero points [E, N, K/g] (uint8, default 8):
value = (q - zp) * scale.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from moe_validate.contract.spec import (
    FP8_BLOCK,
    FP8_MAX,
    INT4_DEFAULT_ZERO_POINT,
    INT4_GROUP_SIZES,
    INT8_MAX,
    QUANT_EPS,
    QuantScheme,
)
from moe_validate.contract.profile import SPEC_QUANTIZER, CodeRounding, Quantizer, ScaleFormula

__all__ = [
    "quantize_activation",
    "quantize_activation_codes",
    "dequantize_activation",
    "code_values",
    "quantize_weights",
    "dequantize_weights",
    "pack_int4",
    "unpack_int4",
]

INT4_QMAX_SYMMETRIC = 7.0  # symmetric int4: codes 1..15 around the implied zero point 8
INT4_LEVELS = 15.0  # asymmetric int4: codes 0..15


# ---------------------------------------------------------------------------------------------
# Elementwise quantizers (fp32 in, fp32 codes out).
# ---------------------------------------------------------------------------------------------
def _round_to_codes(x_over_s: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    """sat(rne(v)) for fp32 v; returns the codes as fp32 values (NaN stays NaN)."""
    if code_dtype == torch.float8_e4m3fn:
        return x_over_s.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    if code_dtype == torch.int8:
        return torch.round(x_over_s).clamp(-INT8_MAX, INT8_MAX)
    raise ValueError(f"code_dtype must be float8_e4m3fn or int8; got {code_dtype}")


def code_values(code_dtype: torch.dtype, device=None) -> torch.Tensor:
    """Every code ``_round_to_codes`` can return for a finite input, ascending (float64): fp8 e4m3fn's
    finite values (+0 and -0 are one code) or the integers -INT8_MAX..INT8_MAX."""
    if code_dtype == torch.float8_e4m3fn:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
        return torch.unique(values[torch.isfinite(values)]).to(device)
    if code_dtype == torch.int8:
        return torch.arange(-INT8_MAX, INT8_MAX + 1, dtype=torch.float64, device=device)
    raise ValueError(f"code_dtype must be float8_e4m3fn or int8; got {code_dtype}")


def _qmax(code_dtype: torch.dtype) -> float:
    return FP8_MAX if code_dtype == torch.float8_e4m3fn else INT8_MAX


def _div(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """IEEE (correctly rounded) division by a Python number on any device.

    PyTorch's CUDA kernels turn ``tensor / python_scalar`` into a multiplication by the
    reciprocal, which is one fp32 ulp off for some inputs; a scale one ulp off moves x / s off
    its exact rounding ties and flips fp8 codes (measured on an H100: 9 of 8448 codes). Dividing
    by a tensor of the same shape and device keeps the true division everywhere.
    """
    return numerator / torch.full_like(numerator, denominator)


def _scale_from_absmax(absmax_fp32: torch.Tensor, qmax: float) -> torch.Tensor:
    return _div(torch.clamp_min(absmax_fp32, QUANT_EPS), qmax)


# ---------------------------------------------------------------------------------------------
# A profile's quantizer: one function per scale formula and per code rounding.
# ---------------------------------------------------------------------------------------------
def _dynamic_scale(absmax_fp32: torch.Tensor, qmax: float, quantizer: Quantizer) -> torch.Tensor:
    """s from absmax (fp32) per ``quantizer.scale``; SPEC's (floor 1e-10, then divide) is
    ``_scale_from_absmax``."""
    if quantizer.scale is ScaleFormula.FLOOR_THEN_DIVIDE:
        return _div(torch.clamp_min(absmax_fp32, quantizer.floor), qmax)
    if quantizer.scale is ScaleFormula.FLOOR_THEN_RECIPROCAL:
        return torch.clamp_min(absmax_fp32, quantizer.floor) * torch.tensor(1.0 / qmax, dtype=torch.float32)
    if quantizer.scale is ScaleFormula.DIVIDE_THEN_FLOOR:
        return torch.clamp_min(_div(absmax_fp32, qmax), quantizer.floor)
    raise AssertionError(quantizer.scale)  # pragma: no cover


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """round(v) with ties away from zero (libdevice round), exact: |v| + 0.5 in float64."""
    v64 = v.to(torch.float64)
    return (torch.sign(v64) * torch.floor(v64.abs() + 0.5)).to(torch.float32)


def _codes(x32: torch.Tensor, scale: torch.Tensor, absmax_fp32: Optional[torch.Tensor], code_dtype: torch.dtype,
           quantizer: Quantizer) -> torch.Tensor:
    """sat(round(x / s)) in the form ``quantizer.codes`` names (fp32 codes; SPEC: rne(x / s))."""
    rule = quantizer.codes
    if rule is CodeRounding.DIVIDE_RNE:
        return _round_to_codes(x32 / scale, code_dtype)
    if rule is CodeRounding.RECIPROCAL_RNE:
        return _round_to_codes(x32 * torch.reciprocal(scale), code_dtype)
    if rule is CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY:
        if code_dtype != torch.int8 or absmax_fp32 is None:
            raise ValueError(f"codes {rule.value} are defined for dynamic int8 scales only; got {code_dtype}")
        qmax = _qmax(code_dtype)
        inverse = torch.full_like(absmax_fp32, qmax) / torch.clamp_min(absmax_fp32, quantizer.floor)
        return _round_half_away(x32 * inverse).clamp(-qmax, qmax)
    raise AssertionError(rule)  # pragma: no cover


def _finite_absmax(x_fp32: torch.Tensor) -> torch.Tensor:
    """absmax over the finite entries only (0 when there are none), fp32, shape [1]."""
    magnitudes = torch.where(torch.isfinite(x_fp32), x_fp32.abs(), torch.zeros_like(x_fp32))
    if magnitudes.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x_fp32.device)
    return magnitudes.amax().reshape(1)


def quantize_activation_codes(x: torch.Tensor, scheme, *, static_scale: Optional[torch.Tensor] = None,
                              valid_rows: Optional[torch.Tensor] = None,
                              quantizer: Quantizer = SPEC_QUANTIZER) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation [R, C] per the scheme; return (codes as fp32, scale fp32).

    Codes are kept as fp32 values (every fp8 and int8 code is exact in fp32) so that a NaN input
    stays visible as NaN instead of becoming an arbitrary int8. See the module docstring for the
    arithmetic. ``valid_rows`` (bool [R]) selects the rows a ``"tensor_dynamic"`` scale spans.
    ``quantizer``: the scale formula and code rounding (default SPEC's).
    """
    scheme = QuantScheme.parse(scheme)
    granularity = scheme.act_granularity
    if granularity is None:
        raise ValueError(f"scheme {scheme} does not quantize activations")
    if x.dim() != 2:
        raise ValueError(f"x must be [R, C] (2-D); got {tuple(x.shape)}")
    code_dtype = scheme.act_dtype
    qmax = _qmax(code_dtype)
    x32 = x.to(torch.float32)
    R, C = x32.shape

    if granularity == "token":
        absmax = (x32.abs().amax(dim=1, keepdim=True) if C else
                  torch.zeros(R, 1, dtype=torch.float32, device=x.device))
        scale = _dynamic_scale(absmax, qmax, quantizer)
        codes = _codes(x32, scale, absmax, code_dtype, quantizer)
    elif granularity == "token_group":
        num_groups = math.ceil(C / FP8_BLOCK)
        scale = torch.empty(R, num_groups, dtype=torch.float32, device=x.device)
        codes = torch.empty_like(x32)
        for g in range(num_groups):
            cols = slice(g * FP8_BLOCK, min((g + 1) * FP8_BLOCK, C))
            absmax = x32[:, cols].abs().amax(dim=1, keepdim=True)
            group_scale = _dynamic_scale(absmax, qmax, quantizer)
            scale[:, g:g + 1] = group_scale
            codes[:, cols] = _codes(x32[:, cols], group_scale, absmax, code_dtype, quantizer)
    elif granularity == "tensor_dynamic":
        rows = x32 if valid_rows is None else x32[valid_rows.to(torch.bool)]
        absmax = _finite_absmax(rows)
        scale = _dynamic_scale(absmax, qmax, quantizer)
        codes = _codes(x32, scale, absmax, code_dtype, quantizer)
    elif granularity == "tensor_static":
        if static_scale is None:
            raise ValueError(f"static_scale is required for scheme {scheme}")
        scale = static_scale.to(torch.float32).reshape(1)
        codes = _codes(x32, scale, None, code_dtype, quantizer)
    else:  # pragma: no cover -- the enum has no other granularity
        raise AssertionError(granularity)
    return codes, scale


def quantize_activation(x: torch.Tensor, scheme, *, static_scale: Optional[torch.Tensor] = None,
                        valid_rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation [R, C]; return (x_q in the scheme's activation dtype, scale fp32).

    Same arithmetic as ``quantize_activation_codes``; the codes are cast to float8_e4m3fn or
    int8 (a NaN becomes fp8 NaN; in int8 it has no representation, so use the codes form when
    non-finite inputs matter).
    """
    scheme = QuantScheme.parse(scheme)
    codes, scale = quantize_activation_codes(x, scheme, static_scale=static_scale, valid_rows=valid_rows)
    return codes.to(scheme.act_dtype), scale


def expand_act_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Broadcast an activation scale ([R, G] per group, [R, 1], [1] or []) to [rows, cols] fp64."""
    scale = scale.to(torch.float64)
    if scale.dim() == 2 and scale.shape[1] > 1:  # per token per 128 columns
        return scale.repeat_interleave(FP8_BLOCK, dim=1)[:, :cols]
    if scale.dim() == 2:  # per token
        return scale.expand(rows, cols)
    return scale.reshape(1, 1).expand(rows, cols)  # per tensor


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes * scale in float64, the scale broadcast per its shape (see ``expand_act_scale``)."""
    R, C = codes.shape
    return codes.to(torch.float64) * expand_act_scale(scale, R, C)


# ---------------------------------------------------------------------------------------------
# int4 packing.
# ---------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes (integers 0..15, last dim even) two per uint8: low nibble = even k."""
    if q.shape[-1] % 2:
        raise ValueError(f"q must have an even last dimension to pack two per byte; got {tuple(q.shape)}")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q must hold int4 codes in 0..15; got range [{int(q.min())}, {int(q.max())}]")
    low, high = q[..., 0::2], q[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 [..., C/2] -> int64 codes [..., C] (even k from the low nibble)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must have dtype uint8; got {packed.dtype}")
    p = packed.to(torch.int64)
    low, high = p & 0xF, (p >> 4) & 0xF
    return torch.stack((low, high), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------
def _block_reduce_absmax(w32: torch.Tensor) -> torch.Tensor:
    """absmax per 128x128 block of [E, N, K] -> [E, ceil(N/128), ceil(K/128)]."""
    E, N, K = w32.shape
    nb, kb = math.ceil(N / FP8_BLOCK), math.ceil(K / FP8_BLOCK)
    out = torch.empty(E, nb, kb, dtype=torch.float32, device=w32.device)
    for i in range(nb):
        for j in range(kb):
            block = w32[:, i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            out[:, i, j] = block.abs().amax(dim=(1, 2))
    return out


def _expand_block_scale(scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    return scale.repeat_interleave(FP8_BLOCK, dim=1).repeat_interleave(FP8_BLOCK, dim=2)[:, :N, :K]


def _expand_weight_scale(scale: torch.Tensor, scheme: QuantScheme, N: int, K: int,
                         group_size: Optional[int]) -> torch.Tensor:
    """The weight scale broadcast to [E, N, K] (float64)."""
    scale = scale.to(torch.float64)
    E = scale.shape[0]
    granularity = scheme.weight_granularity
    if granularity == "block":
        return _expand_block_scale(scale, N, K)
    if granularity == "channel":
        return scale.reshape(E, N, 1).expand(E, N, K)
    if granularity == "tensor":
        return scale.reshape(E, 1, 1).expand(E, N, K)
    if granularity == "group":
        return scale.repeat_interleave(group_size, dim=2)
    raise ValueError(f"scheme {scheme} has no weight scale")


def quantize_weights(w: torch.Tensor, scheme, group_size: Optional[int] = None,
                     zero_point: bool = False):
    """Quantize float weights [E, N, K] per the scheme; return (w_q, scale fp32, zp or None).

    fp32 arithmetic as for activations: ``s = max(absmax, 1e-10) / QMAX`` over the scheme's
    granule (128x128 block, output channel, expert, or int4 group of ``group_size`` along K).
    int4 symmetric (``zero_point=False``): ``s = absmax / 7``, ``q = clamp(rne(w/s) + 8, 0, 15)``,
    zp None (8 implied). int4 asymmetric (``zero_point=True``): ``s = max(max - min, 1e-10) / 15``,
    ``zp = clamp(rne(-min/s), 0, 15)``, ``q = clamp(rne(w/s) + zp, 0, 15)``, zp uint8. int4 codes
    are returned packed (``pack_int4``). Scheme ``none`` returns the weights unchanged.
    """
    scheme = QuantScheme.parse(scheme, "scheme")
    if w.dim() != 3:
        raise ValueError(f"w must be [E, N, K]; got {tuple(w.shape)}")
    if scheme is QuantScheme.NONE:
        return w, None, None
    E, N, K = w.shape
    w32 = w.to(torch.float32)
    granularity = scheme.weight_granularity
    if granularity == "group":
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}; got {group_size!r}")
        if K % group_size:
            raise ValueError(f"group_size must divide K = {K}; got {group_size}")
        groups = w32.reshape(E, N, K // group_size, group_size)
        if zero_point:
            lo, hi = groups.amin(dim=3), groups.amax(dim=3)
            scale = _div(torch.clamp_min(hi - lo, QUANT_EPS), INT4_LEVELS)
            zp = torch.round(-lo / scale).clamp(0, 15)
        else:
            scale = _div(torch.clamp_min(groups.abs().amax(dim=3), QUANT_EPS), INT4_QMAX_SYMMETRIC)
            zp = torch.full_like(scale, float(INT4_DEFAULT_ZERO_POINT))
        q = (torch.round(groups / scale.unsqueeze(3)) + zp.unsqueeze(3)).clamp(0, 15)
        packed = pack_int4(q.reshape(E, N, K))
        return packed, scale, (zp.to(torch.uint8) if zero_point else None)
    if group_size is not None:
        raise ValueError(f"group_size must be None for scheme {scheme}; got {group_size!r}")
    if zero_point:
        raise ValueError(f"zero_point is int4_w4a16 only; got scheme {scheme}")

    qmax = scheme.weight_qmax
    if granularity == "block":
        scale = _scale_from_absmax(_block_reduce_absmax(w32), qmax)
    elif granularity == "channel":
        scale = _scale_from_absmax(w32.abs().amax(dim=2), qmax)
    else:  # tensor
        scale = _scale_from_absmax(w32.abs().amax(dim=(1, 2)), qmax)
    full_scale = _expand_weight_scale(scale, scheme, N, K, None).to(torch.float32)
    codes = _round_to_codes(w32 / full_scale, scheme.weight_dtype)
    return codes.to(scheme.weight_dtype), scale, None


def dequantize_weights(w_q: torch.Tensor, scale: Optional[torch.Tensor], scheme, zp: Optional[torch.Tensor] = None,
                       group_size: Optional[int] = None) -> torch.Tensor:
    """The float64 value of stored weights [E, N, K] (int4: packed [E, N, K/2]).

    ``(q - zp) * scale`` for int4 (zp defaults to 8), ``q * scale`` with the scale broadcast
    per block / channel / tensor otherwise; scheme ``none`` is a plain conversion.
    """
    scheme = QuantScheme.parse(scheme, "scheme")
    if scheme is QuantScheme.NONE:
        return w_q.to(torch.float64)
    if scheme is QuantScheme.INT4_W4A16:
        codes = unpack_int4(w_q).to(torch.float64)
        E, N, K = codes.shape
        if zp is None:
            zero = torch.full((E, N, K), float(INT4_DEFAULT_ZERO_POINT), dtype=torch.float64, device=w_q.device)
        else:
            zero = zp.to(torch.float64).repeat_interleave(group_size, dim=2)
        return (codes - zero) * _expand_weight_scale(scale, scheme, N, K, group_size)
    E, N, K = w_q.shape
    return w_q.to(torch.float64) * _expand_weight_scale(scale, scheme, N, K, None)
