"""The expert activation: c2[r, i] = round_S(act(c1[r, gate(i)], c1[r, up(i)])) in fp32.

Gated activations read the gate column i and the up column I + i of the route-major c1 [R, 2I]
(swigluoai interleaves: gate 2i, up 2i + 1); ``*_no_mul`` read column i of c1 [R, I]. Only rows
of valid routes (``route_expert[r] >= 0``) are read or written, so rows the GEMM never wrote
(NaN-poisoned workspace) stay untouched. Tile decomposition: BLOCK_R routes x BLOCK_I columns
per program. Formulas (SPEC.md, Activations), with x = gate, u = up:

  silu        silu(x) * u, with clamp limit L: silu(min(x, L)) * clamp(u, -L, L)
  gelu        0.5 x (1 + erf(x / sqrt 2)) * u
  gelu_tanh   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) * u
  swigluoai   xc = min(x, 7), uc = clamp(u, -7, 7): (uc + 1) * xc * sigmoid(1.702 xc)
  swiglustep  min(silu(x), 7) * clamp(u, -7, 7)
  *_no_mul    the same without * u;  relu2_no_mul  max(x, 0)^2
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _interp
from kernels._launch import launch_options, wait_for_predecessor
from moe_validate.contract.spec import SWIGLU_LIMIT, Activation

__all__ = ["apply_activation", "activation_fp32"]


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (...)
    return 0.5 * x * (1.0 + _interp.tanh(inner))


@triton.jit
def activation_fp32(x, u, clamp_limit,
                    ACTIVATION: tl.constexpr, HAS_CLAMP: tl.constexpr, SWIGLU_LIMIT: tl.constexpr):
    """act(x, u) in fp32 on a tile (x = gate, u = up; u is ignored by the ``*_no_mul`` forms).

    The one copy of the activation math: the activation kernel below and the fused GEMM1
    epilogue (``kernels.grouped_gemm``) both call it, so the two paths give the same bits.
    """
    if ACTIVATION == "silu":
        if HAS_CLAMP:
            y = _silu(tl.minimum(x, clamp_limit)) * tl.minimum(tl.maximum(u, -clamp_limit), clamp_limit)
        else:
            y = _silu(x) * u
    elif ACTIVATION == "gelu":
        y = _gelu(x) * u
    elif ACTIVATION == "gelu_tanh":
        y = _gelu_tanh(x) * u
    elif ACTIVATION == "swigluoai":
        xc = tl.minimum(x, SWIGLU_LIMIT)
        uc = tl.minimum(tl.maximum(u, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        y = (uc + 1.0) * xc * tl.sigmoid(1.702 * xc)
    elif ACTIVATION == "swiglustep":
        y = tl.minimum(_silu(x), SWIGLU_LIMIT) * tl.minimum(tl.maximum(u, -SWIGLU_LIMIT), SWIGLU_LIMIT)
    elif ACTIVATION == "silu_no_mul":
        y = _silu(x)
    elif ACTIVATION == "gelu_no_mul":
        y = _gelu(x)
    elif ACTIVATION == "gelu_tanh_no_mul":
        y = _gelu_tanh(x)
    else:
        tl.static_assert(ACTIVATION == "relu2_no_mul", "unknown activation")
        r = tl.maximum(x, 0.0)
        y = r * r
    return y


@triton.jit
def _activation_kernel(
    # pointers
    c1_ptr, c2_ptr, route_expert_ptr,
    # sizes
    num_routes, I,
    # strides
    stride_c1m, stride_c1n, stride_c2m, stride_c2n,
    # precision flags
    clamp_limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_CLAMP: tl.constexpr, SWIGLU_LIMIT: tl.constexpr,
    # tile constexprs
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    # Stage 1: rows of valid routes, columns of this tile.
    pid_r = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    r_in = offs_r < num_routes
    valid = r_in & (tl.load(route_expert_ptr + offs_r, mask=r_in, other=-1) >= 0)
    mask = valid[:, None] & (offs_i < I)[None, :]
    rows = offs_r.to(tl.int64)[:, None] * stride_c1m
    # Stage 2: gate (and up) values in fp32.
    if ACTIVATION == "swigluoai":
        gate_col = 2 * offs_i
        up_col = 2 * offs_i + 1
    else:
        gate_col = offs_i
        up_col = I + offs_i
    x = _interp.to_fp32(tl.load(c1_ptr + rows + gate_col[None, :] * stride_c1n, mask=mask, other=0.0))
    if GATED:
        u = _interp.to_fp32(tl.load(c1_ptr + rows + up_col[None, :] * stride_c1n, mask=mask, other=0.0))
    else:
        u = x  # ignored by the *_no_mul forms
    # Stage 3: the activation (shared with the fused GEMM1 epilogue).
    y = activation_fp32(x, u, clamp_limit, ACTIVATION, HAS_CLAMP, SWIGLU_LIMIT)
    # Stage 4: one rounding to S, masked store.
    c2_ptrs = c2_ptr + offs_r.to(tl.int64)[:, None] * stride_c2m + offs_i[None, :] * stride_c2n
    tl.store(c2_ptrs, _interp.to_storage(y, c2_ptr.dtype.element_ty), mask=mask)


def apply_activation(c1: torch.Tensor, c2: torch.Tensor, route_expert: torch.Tensor,
                     activation, clamp_limit: Optional[float] = None) -> None:
    """c2 [R, I] <- act(c1 [R, N]) for rows with route_expert >= 0 (others untouched)."""
    activation = Activation.parse(activation)
    R, N = c1.shape
    I = c2.shape[1]
    expected_n = 2 * I if activation.is_gated else I
    if N != expected_n or c2.shape[0] != R:
        raise ValueError(f"activation {activation.value} maps c1 [R, {expected_n}] to c2 [R, {I}]; "
                         f"got c1 {tuple(c1.shape)}, c2 {tuple(c2.shape)}")
    if clamp_limit is not None and activation is not Activation.SILU:
        raise ValueError(f"gemm1_clamp_limit applies to silu only; got activation {activation.value}")
    if R == 0 or I == 0:
        return
    block_r, block_i = 16, min(128, triton.next_power_of_2(I))
    grid = (triton.cdiv(R, block_r), triton.cdiv(I, block_i))
    _activation_kernel[grid](
        c1, c2, route_expert,
        R, I,
        c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1),
        float(clamp_limit) if clamp_limit is not None else 0.0,
        ACTIVATION=activation.value, GATED=activation.is_gated, HAS_CLAMP=clamp_limit is not None, SWIGLU_LIMIT=SWIGLU_LIMIT,
        BLOCK_R=block_r, BLOCK_I=block_i, **launch_options(c1.device),
    )
