"""Routing metadata: which local expert each route uses, and routes grouped by expert.

A route is (token m, slot j), flat index r = m*topk + j. Its local expert is

    e(r) = expert_map[id] (or id)  if 0 <= id < global_num_experts and that is >= 0, else -1

and invalid routes (e = -1) are dropped. Alignment lays the valid routes out expert by expert,
each expert's run padded to a multiple of BLOCK_M with the sentinel R = M*topk, so that every
BLOCK_M tile of ``sorted_route_ids`` belongs to exactly one expert (``expert_ids[tile]``, -1 for
tiles past the end). Three small kernels, no host synchronisation:

  1. ``_route_expert_kernel`` (grid: R / BLOCK_R): e(r) with every bound checked before any
     indexing, and a per-expert count (atomic add).
  2. ``_expert_offsets_kernel`` (one program): padded counts, their prefix sum (each expert's
     first slot), the padded total, and the owner of every tile.
  3. ``_scatter_routes_kernel`` (grid: R / BLOCK_R): each valid route takes the next slot of its
     expert (atomic cursor). The order inside an expert is therefore not deterministic on the
     GPU, which is harmless: every GEMM row is computed from its own route only.

The tiny-M path (``route_experts`` alone) skips 2 and 3: the GEMM then runs one route per tile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels._launch import launch_options, wait_for_predecessor

__all__ = ["moe_align_block_size", "route_experts", "max_padded_routes"]


@triton.jit
def _route_expert_kernel(
    # pointers
    topk_ids_ptr, expert_map_ptr, route_expert_ptr, counts_ptr,
    # sizes
    num_routes, global_num_experts, num_local_experts,
    # strides
    stride_idm, stride_idj,
    # MoE facts
    TOP_K: tl.constexpr, HAS_EXPERT_MAP: tl.constexpr, COUNT: tl.constexpr,
    # tile constexprs
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    # Stage 1: this program's routes and their raw ids (int64, so huge stale ids stay exact).
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = offs_r < num_routes
    ids = tl.load(topk_ids_ptr + (offs_r // TOP_K) * stride_idm + (offs_r % TOP_K) * stride_idj,
                  mask=in_range, other=-1).to(tl.int64)
    # Stage 2: bound-check the global id before it indexes the map.
    valid = in_range & (ids >= 0) & (ids < global_num_experts)
    safe_ids = tl.where(valid, ids, 0)
    if HAS_EXPERT_MAP:
        local = tl.load(expert_map_ptr + safe_ids, mask=valid, other=-1).to(tl.int64)
    else:
        local = safe_ids
    valid = valid & (local >= 0) & (local < num_local_experts)
    local = tl.where(valid, local, -1)
    # Stage 3: store e(r) and count the valid routes of each expert.
    tl.store(route_expert_ptr + offs_r, local.to(tl.int32), mask=in_range)
    if COUNT:
        tl.atomic_add(counts_ptr + tl.where(valid, local, 0), 1, mask=valid)


@triton.jit
def _expert_offsets_kernel(
    # pointers
    counts_ptr, cursor_ptr, expert_ids_ptr, num_post_padded_ptr,
    # sizes
    num_local_experts, num_tiles,
    # tile constexprs
    BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    # Stage 1: padded run length of each expert and its first slot (exclusive prefix sum).
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < num_local_experts
    counts = tl.load(counts_ptr + offs_e, mask=e_mask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(cursor_ptr + offs_e, starts, mask=e_mask)
    tl.store(num_post_padded_ptr, total)
    # Stage 2: tile t (first slot t*BLOCK_M) belongs to the expert e with starts[e] <= slot <
    # ends[e]; ends is non-decreasing, so e = #{e' : ends[e'] <= slot}. Past the total: -1.
    ends_row = tl.where(e_mask, ends, total + 1)  # padding lanes never count
    for t0 in range(0, num_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        slot = offs_t * BLOCK_M
        owner = tl.sum((ends_row[None, :] <= slot[:, None]).to(tl.int32), axis=1)
        owner = tl.where(slot < total, owner, -1)
        tl.store(expert_ids_ptr + offs_t, owner, mask=offs_t < num_tiles)


@triton.jit
def _scatter_routes_kernel(
    # pointers
    route_expert_ptr, cursor_ptr, sorted_route_ids_ptr,
    # sizes
    num_routes,
    # tile constexprs
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = offs_r < num_routes
    local = tl.load(route_expert_ptr + offs_r, mask=in_range, other=-1)
    valid = in_range & (local >= 0)
    slot = tl.atomic_add(cursor_ptr + tl.where(valid, local, 0), 1, mask=valid)
    tl.store(sorted_route_ids_ptr + slot, offs_r.to(tl.int32), mask=valid)


_BLOCK_R = 128


def max_padded_routes(num_routes: int, num_local_experts: int, block_m: int) -> int:
    """Upper bound on the aligned length: every expert may waste block_m - 1 padding slots,
    but never more tiles than routes when there are fewer routes than experts."""
    bound = num_routes + num_local_experts * (block_m - 1)
    if num_routes < num_local_experts:
        bound = min(bound, num_routes * block_m)
    return triton.cdiv(bound, block_m) * block_m


def _check_ids(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [M, topk]; got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expert_map must be a 1-D int32/int64 tensor; got {expert_map.dtype} "
                             f"{tuple(expert_map.shape)}")
        if expert_map.device != topk_ids.device:
            raise ValueError(f"expert_map must be on {topk_ids.device}; got {expert_map.device}")


def route_experts(topk_ids: torch.Tensor, global_num_experts: int, num_local_experts: int,
                  expert_map: Optional[torch.Tensor] = None,
                  counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 [M*topk]: the local expert of every route, -1 for invalid ones (the tiny-M path).

    With ``counts`` (int32 [num_local_experts], zeroed) also counts the valid routes per expert.
    """
    _check_ids(topk_ids, expert_map)
    if expert_map is not None and expert_map.numel() < global_num_experts:
        raise ValueError(f"expert_map must have global_num_experts={global_num_experts} entries; "
                         f"got {expert_map.numel()}")
    M, topk = topk_ids.shape
    R = M * topk
    route_expert = torch.empty(R, dtype=torch.int32, device=topk_ids.device)
    if R == 0:
        return route_expert
    _route_expert_kernel[(triton.cdiv(R, _BLOCK_R),)](
        topk_ids, expert_map if expert_map is not None else route_expert, route_expert,
        counts if counts is not None else route_expert,
        R, global_num_experts, num_local_experts,
        topk_ids.stride(0), topk_ids.stride(1),
        TOP_K=topk, HAS_EXPERT_MAP=expert_map is not None, COUNT=counts is not None,
        BLOCK_R=_BLOCK_R, **launch_options(topk_ids.device),
    )
    return route_expert


def align_routes(route_expert: torch.Tensor, counts: torch.Tensor, block_m: int,
                 num_local_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stages 2 and 3 given ``route_experts`` output and counts."""
    R = route_expert.numel()
    device = route_expert.device
    padded_len = max_padded_routes(R, num_local_experts, block_m)
    num_tiles = padded_len // block_m
    sorted_route_ids = torch.full((padded_len,), R, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_tiles, dtype=torch.int32, device=device)
    num_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    cursor = torch.empty(max(num_local_experts, 1), dtype=torch.int32, device=device)
    _expert_offsets_kernel[(1,)](
        counts, cursor, expert_ids, num_post_padded,
        num_local_experts, num_tiles,
        BLOCK_E=triton.next_power_of_2(max(num_local_experts, 1)), BLOCK_T=64, BLOCK_M=block_m,
        **launch_options(device),
    )
    if R > 0:
        _scatter_routes_kernel[(triton.cdiv(R, _BLOCK_R),)](
            route_expert, cursor, sorted_route_ids, R, BLOCK_R=_BLOCK_R, **launch_options(device),
        )
    return sorted_route_ids, expert_ids, num_post_padded


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         expert_map: Optional[torch.Tensor] = None, *,
                         num_local_experts: Optional[int] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the valid routes of ``topk_ids`` by local expert, padded to ``block_m``.

    ``num_experts`` is the global expert count (ids at or above it are invalid); the local count
    defaults to ``num_experts`` (or ``expert_map``'s length). Returns
      sorted_route_ids int32 [P]: route ids r = m*topk + j, expert by expert, padding = M*topk;
      expert_ids int32 [P / block_m]: the local expert of each tile, -1 past the padded total;
      num_routes_post_padded int32 [1]: the padded total (a device tensor: no host sync).
    """
    if not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two; got {block_m!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}")
    if num_local_experts is None:
        num_local_experts = num_experts
    counts = torch.zeros(max(num_local_experts, 1), dtype=torch.int32, device=topk_ids.device)
    route_expert = route_experts(topk_ids, num_experts, num_local_experts, expert_map, counts=counts)
    return align_routes(route_expert, counts, block_m, num_local_experts)
