"""Dynamic and static activation quantizers, and the fused silu-and-mul + fp8 group quantizer.

Math (SPEC.md, "Quantization schemes"), all in fp32:
    s = max(absmax, 1e-10) / QMAX        q = saturate(rne(x / s))
with QMAX = 448 for fp8 e4m3fn (224 is the e4m3fnuz convention, available through ``qmax=``)
and 127 for int8. Both divisions are IEEE round-to-nearest (``tl.div_rn``): Triton's plain ``/``
on fp32 is an approximate division on NVIDIA GPUs, and one ulp there moves codes at rounding
ties, so the kernels could not match a torch reference bit for bit.

Tile decomposition:
- ``_quantize_row_groups_kernel``: one program per (BLOCK_M rows, one column group). A group is
  128 columns for ``token_group`` (one scale per row per group) and the whole row for ``token``.
  When the group fits one tile the tile is loaded once; otherwise a first column loop finds the
  absmax and a second one quantizes.
- per-tensor dynamic scale in two passes: ``_absmax_partials_kernel`` (one absmax of the finite
  entries per BLOCK_M rows, columns looped), then ``_tensor_scale_kernel`` (one program reduces the partials and
  writes the scale). Max is exact and order-free, so the result does not depend on the tiling.
- ``_quantize_with_scale_kernel``: one program per (BLOCK_M, BLOCK_N) tile, one scalar scale read
  from memory (the static scale, or the per-tensor dynamic scale of the two passes above).
- ``_silu_and_mul_quant_fp8_group_kernel``: one program per (BLOCK_M rows, one 128-column group
  of the activation output); reads the gate and the up tile of c1, forms silu(gate) * up in fp32
  (``silu_and_mul_fp32``) and quantizes it without rounding it to the storage dtype first.
  GEMM1 can do the same in its epilogue (``kernels.grouped_gemm``, ``FP8_GROUP_QUANT``) with the
  same helpers (``silu_and_mul_fp32``, ``_dynamic_scale``, ``_quantize``) and the same output
  layout (``fp8_group_outputs``), so the two paths give the same codes and scales bit for bit.

Rows whose ``row_valid`` entry is False are never loaded: they read as zero, so their codes are 0
and their per-row scales 1e-10 / QMAX (callers must treat both as unspecified).

Non-finite values in valid rows (the contract assumes finite ones): the per-tensor dynamic absmax
spans finite entries only, as the reference's does, so one token's NaN or Inf cannot change
another token's codes. Per-row and per-group scales stay the row's own business: Triton's max
skips NaN, so a NaN entry leaves its row's scale finite and becomes a saturated code through
``_interp``'s clamp (-448 / -127 where the reference keeps NaN); an Inf entry makes its row's or
group's scale Inf.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels._interp import INTERPRETING, to_fp8_e4m3, to_fp32, to_int8
from kernels._launch import launch_options, wait_for_predecessor
from moe_validate.contract.spec import (
    FP8_BLOCK,
    FP8_FNUZ_MAX,
    FP8_MAX,
    INT8_MAX,
    QUANT_EPS,
    QuantScheme,
)

__all__ = [
    "quantize_activation",
    "silu_and_mul_quant_fp8_group",
    "silu_and_mul_fp32",
    "fp8_group_outputs",
    "FP8_MAX",
    "FP8_FNUZ_MAX",
    "INT8_MAX",
    "QUANT_EPS",
    "ACT_GROUP_SIZE",
]

ACT_GROUP_SIZE = FP8_BLOCK  # token_group: one scale per row per 128 columns
_QUANT_EPS = tl.constexpr(QUANT_EPS)
_FP32_MAX = tl.constexpr(torch.finfo(torch.float32).max)

# Tile sizes. Untuned: these kernels are memory bound and small next to the GEMMs. A tile of
# 4096 elements is 32 values per thread at 4 warps. A row group up to 16384 columns (every
# model's hidden and intermediate size) is one tile of one row, at up to 16 warps (still 32
# values per thread): one pass, one load latency. On the H100 a 14336-column row in 4096-column
# chunks (two passes for the per-token absmax) cost ~9 us at decode, most of a fp8 call's
# non-GEMM time. Wider groups are processed in a column loop (two passes).
_TILE_ELEMENTS = 4096
_MAX_BLOCK_N = 16384
_VALUES_PER_THREAD = 32
_PARTIALS_BLOCK = 1024  # partial maxima reduced per iteration by _tensor_scale_kernel
_FEW_PROGRAMS = 32  # a quantizer launch this small is latency-bound (_skip_zero_divisions)

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_QMAX = {torch.float8_e4m3fn: FP8_MAX, torch.int8: INT8_MAX}


# ---------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dynamic_scale(absmax, QMAX: tl.constexpr):
    """s = max(absmax, 1e-10) / QMAX, IEEE-rounded."""
    qmax = tl.full(absmax.shape, QMAX, tl.float32)
    return tl.div_rn(tl.maximum(absmax, _QUANT_EPS), qmax)


@triton.jit
def _div_rn(x, d, SKIP_ZEROS: tl.constexpr):
    """``tl.div_rn(x, d)`` for a divisor d > 0; with SKIP_ZEROS, zeros of x bypass the division
    (x / d for x = +-0 and d > 0 is x itself: the same bits).

    On the GPU div.rn's fast path rejects a zero dividend and calls its slow subroutine. A tile that
    is mostly padding (rows past R and columns past C load as 0: at one token, most of it) spends its
    time there, and skipping pays: H100, one decode-shape quantizer launch 4.2-6.8 -> 2.6-3.3 us
    (scripts/gpu_probe_decode_launches.py). Where the tiles are full the selects cost more than the
    few slow divisions: prefill quantizers ran 25-60% slower with them. The launchers decide
    (``_skip_zero_divisions``)."""
    if SKIP_ZEROS:
        is_zero = x == 0.0
        return tl.where(is_zero, x, tl.div_rn(tl.where(is_zero, 1.0, x), d))
    else:
        return tl.div_rn(x, d)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr, SKIP_ZEROS: tl.constexpr):
    """sat(rne(x / scale)) for an fp32 tile and a scale tile of the same shape (``_div_rn``)."""
    y = _div_rn(x, scale, SKIP_ZEROS)
    # Saturate at QMAX first: for fp8 this is the fnuz convention when QMAX = 224 (the casts
    # below saturate at the format's own maximum); for int8 it keeps rint's argument small.
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8:
        return to_fp8_e4m3(y)
    else:
        return to_int8(y)


@triton.jit
def silu_and_mul_fp32(gate, up, SKIP_ZEROS: tl.constexpr):
    """silu(gate) * up in fp32: the one copy of the fused silu+fp8-group quantizer's formula,
    shared by ``_silu_and_mul_quant_fp8_group_kernel`` and GEMM1's fused epilogue."""
    # silu(g) = g / (1 + exp(-g)); exp overflows to inf for g < -88, giving -0 (true value < 1e-36)
    return _div_rn(gate, 1.0 + tl.exp(-gate), SKIP_ZEROS) * up


@triton.jit
def _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID: tl.constexpr):
    """True for rows inside the tensor that row_valid admits: HAS_ROW_VALID 0 = every row,
    1 = a nonzero byte (bool flags), 2 = an int32 route expert >= 0 (``kernels.align.route_experts``
    output, read as is: no conversion launch)."""
    in_bounds = offs_m < R
    if HAS_ROW_VALID == 2:
        flag = tl.load(row_valid_ptr + offs_m, mask=in_bounds, other=-1)
        return in_bounds & (flag >= 0)
    elif HAS_ROW_VALID == 1:
        flag = tl.load(row_valid_ptr + offs_m, mask=in_bounds, other=0)
        return in_bounds & (flag != 0)
    else:
        return in_bounds


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _quantize_row_groups_kernel(
    # pointers
    x_ptr, xq_ptr, scale_ptr, row_valid_ptr,
    # sizes
    R, C, group_cols,
    # strides (unit column strides)
    stride_xr, stride_qr, stride_sr,
    # precision
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, HAS_ROW_VALID: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,  # tiles mostly padding: zeros bypass the division (_div_rn)
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    # program id -> (row block, column group)
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    load_rows = _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID)
    store_rows = offs_m < R
    col_start = pid_g * group_cols
    col_end = tl.minimum(col_start + group_cols, C)

    # pointers (int64 row offsets: R * stride can pass 2**31)
    rows = offs_m.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xr
    q_rows = xq_ptr + rows[:, None] * stride_qr

    if ONE_TILE:
        offs_n = col_start + tl.arange(0, BLOCK_N)
        in_group = offs_n[None, :] < col_end
        x = tl.load(x_rows + offs_n[None, :], mask=load_rows[:, None] & in_group, other=0.0)
        x = x.to(tl.float32)
        scale = _dynamic_scale(tl.max(tl.abs(x), axis=1), QMAX)
        q = _quantize(x, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_N)), QMAX, IS_FP8, SKIP_ZEROS)
        tl.store(q_rows + offs_n[None, :], q, mask=store_rows[:, None] & in_group)
    else:
        absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(col_start, col_end, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            mask = load_rows[:, None] & (offs_n[None, :] < col_end)
            x = tl.load(x_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = _dynamic_scale(absmax, QMAX)
        scale_tile = tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_N))
        for c0 in range(col_start, col_end, BLOCK_N):
            offs_n = c0 + tl.arange(0, BLOCK_N)
            in_group = offs_n[None, :] < col_end
            x = tl.load(x_rows + offs_n[None, :], mask=load_rows[:, None] & in_group, other=0.0)
            q = _quantize(x.to(tl.float32), scale_tile, QMAX, IS_FP8, SKIP_ZEROS)
            tl.store(q_rows + offs_n[None, :], q, mask=store_rows[:, None] & in_group)

    tl.store(scale_ptr + rows * stride_sr + pid_g, scale, mask=store_rows)


@triton.jit
def _absmax_partials_kernel(
    # pointers
    x_ptr, partial_ptr, row_valid_ptr,
    # sizes
    R, C,
    # strides
    stride_xr,
    # precision
    HAS_ROW_VALID: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    load_rows = _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xr
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask = load_rows[:, None] & (offs_n[None, :] < C)
        x = tl.load(x_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        # Finite entries only (NaN fails the comparison too): one token's NaN or Inf must not
        # set the scale of every other token (SPEC.md, Bad input); the reference does the same.
        magnitude = tl.abs(x)
        magnitude = tl.where(magnitude <= _FP32_MAX, magnitude, 0.0)
        absmax = tl.maximum(absmax, tl.max(magnitude, axis=1))
    tl.store(partial_ptr + pid_m, tl.max(absmax, axis=0))


@triton.jit
def _tensor_scale_kernel(
    # pointers
    partial_ptr, scale_ptr,
    # sizes
    num_partials,
    # precision
    QMAX: tl.constexpr,
    # tiles
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, num_partials, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        absmax = tl.maximum(absmax, tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0))
    scale = _dynamic_scale(tl.max(absmax, axis=0, keep_dims=True), QMAX)
    tl.store(scale_ptr + tl.arange(0, 1), scale)


@triton.jit
def _quantize_with_scale_kernel(
    # pointers
    x_ptr, xq_ptr, scale_ptr, row_valid_ptr,
    # sizes
    R, C,
    # strides
    stride_xr, stride_qr,
    # precision
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, HAS_ROW_VALID: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,  # tiles mostly padding: zeros bypass the division (_div_rn)
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    load_rows = _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID)
    in_cols = offs_n[None, :] < C
    rows = offs_m.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * stride_xr + offs_n[None, :],
                mask=load_rows[:, None] & in_cols, other=0.0)
    scale = tl.load(scale_ptr + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32))
    q = _quantize(x.to(tl.float32), scale, QMAX, IS_FP8, SKIP_ZEROS)
    tl.store(xq_ptr + rows[:, None] * stride_qr + offs_n[None, :], q,
             mask=(offs_m[:, None] < R) & in_cols)


@triton.jit
def _silu_and_mul_quant_fp8_group_kernel(
    # pointers
    c1_ptr, q_ptr, scale_ptr, row_valid_ptr,
    # sizes
    R, I,
    # strides
    stride_cr, stride_qr, stride_sr,
    # precision
    QMAX: tl.constexpr, HAS_ROW_VALID: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
    SKIP_ZEROS: tl.constexpr,  # tiles mostly padding: zeros bypass the division (_div_rn)
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_g * GROUP_N + tl.arange(0, GROUP_N)
    load_rows = _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID)
    in_cols = offs_n[None, :] < I
    load_mask = load_rows[:, None] & in_cols
    rows = offs_m.to(tl.int64)

    # gate columns [0, I), up columns [I, 2I) of c1, widened exactly (as GEMM1's epilogue does)
    gate_ptrs = c1_ptr + rows[:, None] * stride_cr + offs_n[None, :]
    gate = to_fp32(tl.load(gate_ptrs, mask=load_mask, other=0.0))
    up = to_fp32(tl.load(gate_ptrs + I, mask=load_mask, other=0.0))
    act = silu_and_mul_fp32(gate, up, SKIP_ZEROS)

    scale = _dynamic_scale(tl.max(tl.abs(act), axis=1), QMAX)
    q = _quantize(act, tl.broadcast_to(scale[:, None], (BLOCK_M, GROUP_N)), QMAX, True, SKIP_ZEROS)
    store_rows = offs_m < R
    tl.store(q_ptr + rows[:, None] * stride_qr + offs_n[None, :], q,
             mask=store_rows[:, None] & in_cols)
    tl.store(scale_ptr + rows * stride_sr + pid_g, scale, mask=store_rows)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _check_rows(x: torch.Tensor, name: str) -> None:
    """x is a 2-D fp32/fp16/bf16 tensor with unit column stride on a device Triton can run on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, columns]; got shape {tuple(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit last stride; got strides {tuple(x.stride())}")
    if x.shape[0] > 1 and x.stride(0) < x.shape[1]:
        raise ValueError(f"{name} rows must not overlap; got strides {tuple(x.stride())} "
                         f"for shape {tuple(x.shape)}")
    if not (x.is_cuda or (INTERPRETING.value and x.device.type == "cpu")):
        raise ValueError(f"{name} must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1); "
                         f"got device {x.device}")


def _row_valid_bytes(row_valid: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """row_valid as the kernels read it, after checks: bools as a contiguous uint8 view (Triton
    loads bytes, not bools), int32 route experts as they are (valid = >= 0); see
    ``_row_valid_mode`` for the kernels' HAS_ROW_VALID."""
    if row_valid is None:
        return None
    if not isinstance(row_valid, torch.Tensor):
        raise TypeError(f"row_valid must be a torch.Tensor or None; got {type(row_valid).__name__}")
    if row_valid.dtype not in (torch.bool, torch.int32):
        raise ValueError(f"row_valid must be a bool tensor (True = valid) or int32 route experts (valid = >= 0); "
                         f"got {row_valid.dtype}")
    if tuple(row_valid.shape) != (x.shape[0],):
        raise ValueError(f"row_valid must have shape [{x.shape[0]}] (one flag per row); "
                         f"got {tuple(row_valid.shape)}")
    if row_valid.device != x.device:
        raise ValueError(f"row_valid must be on {x.device} like its data; got {row_valid.device}")
    if row_valid.dtype == torch.int32:
        return row_valid.contiguous()
    return row_valid.contiguous().view(torch.uint8)


def _row_valid_mode(flags: Optional[torch.Tensor]) -> int:
    """HAS_ROW_VALID of ``_load_row_mask`` for the output of ``_row_valid_bytes``."""
    if flags is None:
        return 0
    return 2 if flags.dtype == torch.int32 else 1


def _resolve_qmax(qmax: Optional[float], act_dtype: torch.dtype) -> float:
    limit = _DTYPE_QMAX[act_dtype]
    if qmax is None:
        return limit
    qmax = float(qmax)
    if not 0.0 < qmax <= limit:
        raise ValueError(f"qmax must lie in (0, {limit}] for {act_dtype}; got {qmax}")
    return qmax


def _check_static_scale(static_scale, x: torch.Tensor) -> None:
    if static_scale is None:
        raise ValueError("static_scale is required for a tensor_static scheme (the given a1/a2 "
                         "scale); got None")
    if not isinstance(static_scale, torch.Tensor):
        raise TypeError(f"static_scale must be a torch.Tensor; got {type(static_scale).__name__}")
    if static_scale.dtype != torch.float32:
        raise ValueError(f"static_scale must be float32; got {static_scale.dtype}")
    if tuple(static_scale.shape) not in ((), (1,)):
        raise ValueError(f"static_scale must have shape [] or [1]; got {tuple(static_scale.shape)}")
    if static_scale.device != x.device:
        raise ValueError(f"static_scale must be on {x.device} like x; got {static_scale.device}")


def _group_tiles(group_cols: int) -> Tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, ONE_TILE) for row groups of group_cols columns."""
    block_n = min(triton.next_power_of_2(max(group_cols, 1)), _MAX_BLOCK_N)
    return max(1, _TILE_ELEMENTS // block_n), block_n, group_cols <= block_n


def _skip_zero_divisions(grid: Tuple[int, ...], rows: int, cols: int, block_m: int, block_n: int) -> bool:
    """Whether a quantizer launch skips dividing zeros (``_div_rn``): where it is latency-bound (at
    most ``_FEW_PROGRAMS`` programs: the rows of a few tokens), or where at least a quarter of its
    tile elements are padding (rows past ``rows``, columns past ``cols``). H100 probes
    (scripts/gpu_probe_decode_launches.py): decode launches of 1-8 programs ran 1.2-2.3x faster
    skipping (one x row of 7168 in an 8192 tile 4.5 -> 2.8 us); 131072 rows of 768 in 1024
    columns (25%) 255 -> 211 us; full prefill tiles and rows of 14336 in 16384 columns (12.5%)
    25-60% slower, so there the plain division stays."""
    padded = triton.cdiv(rows, block_m) * block_m * triton.cdiv(cols, block_n) * block_n
    return math.prod(grid) <= _FEW_PROGRAMS or 4 * (padded - rows * cols) >= padded


def _warps_for(block_m: int, block_n: int) -> int:
    """4 warps up to 4096 elements per tile, more for wider one-row tiles (32 values per thread)."""
    return max(4, min(16, (block_m * block_n) // (32 * _VALUES_PER_THREAD)))


def quantize_activation(
    x: torch.Tensor,
    scheme: Union[QuantScheme, str],
    *,
    static_scale: Optional[torch.Tensor] = None,
    row_valid: Optional[torch.Tensor] = None,
    qmax: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize activation rows per ``scheme.act_granularity``; returns ``(x_q, scale)``.

    ``x`` [R, C] fp32/fp16/bf16 with unit last stride. ``x_q`` [R, C] has ``scheme.act_dtype``;
    ``scale`` is float32: [R, 1] (``token``), [R, ceil(C/128)] (``token_group``), [1]
    (``tensor_dynamic``, absmax over the finite entries of the rows with ``row_valid``) or ``static_scale`` itself
    (``tensor_static``). ``row_valid`` bool [R]: False rows are never read; their outputs are
    unspecified. ``qmax`` overrides QMAX (e.g. ``FP8_FNUZ_MAX``; the codes stay e4m3fn).
    """
    scheme = QuantScheme.parse(scheme, "scheme")
    granularity = scheme.act_granularity
    if granularity is None:
        raise ValueError(f"scheme {scheme.value!r} does not quantize activations "
                         f"(its act_granularity is None)")
    _check_rows(x, "x")
    row_flags = _row_valid_bytes(row_valid, x)
    if granularity == "tensor_static":
        _check_static_scale(static_scale, x)
    elif static_scale is not None:
        raise ValueError(f"static_scale is only used by tensor_static schemes; scheme "
                         f"{scheme.value!r} quantizes with {granularity} dynamic scales")
    act_dtype = scheme.act_dtype
    qmax = _resolve_qmax(qmax, act_dtype)
    is_fp8 = act_dtype == torch.float8_e4m3fn

    R, C = x.shape
    x_q = torch.empty((R, C), dtype=act_dtype, device=x.device)
    has_rows = _row_valid_mode(row_flags)
    flags_arg = row_flags if has_rows else x  # never dereferenced when HAS_ROW_VALID is False

    if granularity in ("token", "token_group"):
        group_cols = ACT_GROUP_SIZE if granularity == "token_group" else C
        num_groups = triton.cdiv(C, ACT_GROUP_SIZE) if granularity == "token_group" else 1
        scale = torch.empty((R, num_groups), dtype=torch.float32, device=x.device)
        block_m, block_n, one_tile = _group_tiles(group_cols)
        if R > 0 and num_groups > 0:
            grid = (triton.cdiv(R, block_m), num_groups)
            _quantize_row_groups_kernel[grid](
                x, x_q, scale, flags_arg,
                R, C, group_cols,
                x.stride(0), x_q.stride(0), scale.stride(0),
                QMAX=qmax, IS_FP8=is_fp8, HAS_ROW_VALID=has_rows,
                BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, num_warps=_warps_for(block_m, block_n),
                SKIP_ZEROS=_skip_zero_divisions(grid, R, C, block_m, block_n),
                **launch_options(x.device),
            )
        return x_q, scale

    if granularity == "tensor_dynamic":
        block_m, block_n, _ = _group_tiles(C)
        block_n = min(block_n, _TILE_ELEMENTS)  # a column loop per row block: keep its tile small
        block_m = max(1, _TILE_ELEMENTS // block_n)
        num_partials = triton.cdiv(R, block_m) if C > 0 else 0
        partials = torch.empty((num_partials,), dtype=torch.float32, device=x.device)
        if num_partials > 0:
            _absmax_partials_kernel[(num_partials,)](
                x, partials, flags_arg,
                R, C,
                x.stride(0),
                HAS_ROW_VALID=has_rows,
                BLOCK_M=block_m, BLOCK_N=block_n, **launch_options(x.device),
            )
        scale = torch.empty((1,), dtype=torch.float32, device=x.device)
        _tensor_scale_kernel[(1,)](partials, scale, num_partials, QMAX=qmax, BLOCK=_PARTIALS_BLOCK,
                                   **launch_options(x.device))
    else:  # tensor_static
        scale = static_scale

    block_n = min(triton.next_power_of_2(max(C, 1)), ACT_GROUP_SIZE)
    block_m = max(1, _TILE_ELEMENTS // block_n)
    if R > 0 and C > 0:
        grid = (triton.cdiv(R, block_m), triton.cdiv(C, block_n))
        _quantize_with_scale_kernel[grid](
            x, x_q, scale, flags_arg,
            R, C,
            x.stride(0), x_q.stride(0),
            QMAX=qmax, IS_FP8=is_fp8, HAS_ROW_VALID=has_rows,
            BLOCK_M=block_m, BLOCK_N=block_n,
            SKIP_ZEROS=_skip_zero_divisions(grid, R, C, block_m, block_n),
            **launch_options(x.device),
        )
    return x_q, scale


def fp8_group_outputs(R: int, I: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised outputs of the fused silu+fp8-group quantization of R rows of I columns:
    codes [R, I] float8_e4m3fn and scales float32 [R, ceil(I/128)] (row-major, one scale per row
    per 128 columns), as both the separate kernel and GEMM1's fused epilogue write them and
    GEMM2 reads them."""
    codes = torch.empty((R, I), dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty((R, triton.cdiv(I, ACT_GROUP_SIZE)), dtype=torch.float32, device=device)
    return codes, scale


def silu_and_mul_quant_fp8_group(
    c1: torch.Tensor,
    row_valid: Optional[torch.Tensor] = None,
    *,
    qmax: float = FP8_MAX,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up in fp32, quantized per row per 128 columns to fp8 e4m3fn.

    ``c1`` [R, 2I] fp32/fp16/bf16 (gate columns [0, I), up columns [I, 2I)). Returns ``c2_q``
    [R, I] float8_e4m3fn and ``scale`` float32 [R, ceil(I/128)]. The fp32 activation is
    quantized directly, never rounded to c1's dtype first. ``row_valid`` as in
    ``quantize_activation``.
    """
    _check_rows(c1, "c1")
    R, two_i = c1.shape
    if two_i % 2:
        raise ValueError(f"c1 must be [R, 2I] (gate then up columns); got an odd column count {two_i}")
    row_flags = _row_valid_bytes(row_valid, c1)
    qmax = _resolve_qmax(qmax, torch.float8_e4m3fn)
    I = two_i // 2
    num_groups = triton.cdiv(I, ACT_GROUP_SIZE)
    c2_q, scale = fp8_group_outputs(R, I, c1.device)
    block_m = max(1, _TILE_ELEMENTS // ACT_GROUP_SIZE // 2)  # two input tiles (gate, up) per program
    if R > 0 and num_groups > 0:
        grid = (triton.cdiv(R, block_m), num_groups)
        _silu_and_mul_quant_fp8_group_kernel[grid](
            c1, c2_q, scale, row_flags if row_flags is not None else c1,
            R, I,
            c1.stride(0), c2_q.stride(0), scale.stride(0),
            QMAX=qmax, HAS_ROW_VALID=_row_valid_mode(row_flags),
            BLOCK_M=block_m, GROUP_N=ACT_GROUP_SIZE, SKIP_ZEROS=_skip_zero_divisions(grid, R, I, block_m, ACT_GROUP_SIZE),
            **launch_options(c1.device),
        )
    return c2_q, scale
