"""The combine: out[m, k] = round_S(sum over valid slots j, in slot order, of float(c3[m, j, k])).

Accumulates in fp32 starting from +0.0 and skips invalid slots (never reads them: their c3 rows
were never written), so a token with no valid route gets exact zeros. Tile decomposition:
BLOCK_T tokens x BLOCK_K columns per program, the topk slots unrolled in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _interp
from kernels._launch import launch_options, wait_for_predecessor

__all__ = ["moe_sum"]


@triton.jit
def _moe_sum_kernel(
    # pointers
    c3_ptr, valid_ptr, out_ptr,
    # sizes
    M, K,
    # strides
    stride_c3m, stride_c3j, stride_c3k, stride_vm, stride_vj, stride_om, stride_ok,
    # MoE facts
    TOP_K: tl.constexpr,
    VALID_IS_EXPERT: tl.constexpr,  # valid holds route experts (valid = >= 0), else 0/1 bytes
    # tile constexprs
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_mask = offs_t < M
    k_mask = offs_k < K
    rows = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        flag = tl.load(valid_ptr + rows * stride_vm + j * stride_vj, mask=t_mask, other=0)
        if VALID_IS_EXPERT:
            slot_valid = t_mask & (flag >= 0)
        else:
            slot_valid = flag != 0
        m = slot_valid[:, None] & k_mask[None, :]
        v = _interp.to_fp32(tl.load(c3_ptr + rows[:, None] * stride_c3m + j * stride_c3j
                                    + offs_k[None, :] * stride_c3k, mask=m, other=0.0))
        acc = tl.where(m, acc + v, acc)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_k[None, :] * stride_ok,
             _interp.to_storage(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & k_mask[None, :])


def moe_sum(c3: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, K] <- sum of c3 [M, topk, K] over slots where ``valid`` [M, topk] is true.

    ``valid`` may be bool, or integer route experts (valid = >= 0, the ``route_experts`` output
    viewed as [M, topk]).
    """
    if c3.dim() != 3:
        raise ValueError(f"c3 must be [M, topk, K]; got {tuple(c3.shape)}")
    M, topk, K = c3.shape
    if tuple(valid.shape) != (M, topk):
        raise ValueError(f"valid must be [M, topk] = {(M, topk)}; got {tuple(valid.shape)}")
    if tuple(out.shape) != (M, K):
        raise ValueError(f"out must be [M, K] = {(M, K)}; got {tuple(out.shape)}")
    if M == 0 or K == 0:
        return
    # No conversion launch (it would cost a kernel per call at decode): bools are read as bytes,
    # route experts (int32) are compared in the kernel.
    if valid.dtype == torch.bool:
        valid_i, is_expert = valid.view(torch.uint8), False
    elif valid.dtype == torch.int32:
        valid_i, is_expert = valid, True
    else:
        valid_i, is_expert = valid.to(torch.int32), True  # other integer route experts: -1 stays -1
    block_t, block_k = 16, min(128, triton.next_power_of_2(K))
    grid = (triton.cdiv(M, block_t), triton.cdiv(K, block_k))
    _moe_sum_kernel[grid](
        c3, valid_i, out, M, K,
        c3.stride(0), c3.stride(1), c3.stride(2), valid_i.stride(0), valid_i.stride(1),
        out.stride(0), out.stride(1),
        TOP_K=topk, VALID_IS_EXPERT=is_expert, BLOCK_T=block_t, BLOCK_K=block_k, **launch_options(out.device),
    )
