"""LoRA deltas on the expert GEMM outputs, fused into one Triton kernel per slice.

Math, per valid route r = m*topk + j with expert e and an enabled adapter l = token_lora_ids[m]:
``c[r, n] = round_S(c[r, n] + round_S(w[r] * sum_j b[l, e, n, j] * sum_k inp[row, k] * a[l, e, j, k]))``
where ``inp`` is ``x`` (w13, ``row = m``) or ``c2`` (w2, ``row = r``), and ``w[r]`` is the router
weight (w2 only, when it was not applied on the input). The rank-space intermediate stays fp32.

Tile decomposition: program (route, n_group). Each program loads the route's expert and adapter,
skips the route when either is absent (expert -1, adapter -1 or disabled), computes the rank-space
vector ``t = a[l, e] @ inp[row]`` over ``BLOCK_K`` tiles of K (the rank padded to the power of two
``BLOCK_R`` and masked), then walks its share of the ``BLOCK_N`` output tiles, each
``delta = b[l, e, tile, :] @ t``. The shrink is recomputed by every n_group of a route; every
output element's arithmetic is independent of ``BLOCK_N`` and of the number of n_groups.

Two schedules (``LoRASpec.stream``):
- ``single``: base GEMM, then the delta kernel adds ``round_S(delta)`` into ``c`` in place.
- ``dual``: the delta kernel stores ``round_S(delta)`` into a zero-filled buffer on an auxiliary
  CUDA stream while the base GEMM runs on the current stream; after the join, an add kernel
  computes ``round_S(c + buffer)`` on the rows that have an adapter. The same fp32 operations in
  the same order as ``single``, so the bits agree. Without CUDA the same path runs sequentially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from moe_validate.contract.spec import Activation, LoRASpec

__all__ = ["apply_lora_w13", "apply_lora_w2", "LoRAKernelConfig", "select_lora_config"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# No FMA contraction in the LoRA kernels. With it (Triton 3.6's default on CUDA), an fp32
# `single` launch fuses `delta * w[r]` with `+ c` into one FMA and skips the rounding of the
# product that SPEC.md and `dual` (which stores the product first) perform: measured on an H100,
# 12 of 240 fp32 elements differed between single and dual. Every sum here is then plain IEEE
# fp32 mul-then-add, the model the tests' error bound assumes.
_FP_FUSION = False


# ---------------------------------------------------------------------------------------------
# Triton helpers and kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_to_storage(x, dtype: tl.constexpr):
    """fp32 -> dtype, round half to even, on every path.

    bf16 is rounded with integer arithmetic on the bits and reinterpreted, never cast, because
    the interpreter's fp32 -> bf16 cast truncates (triton 3.9: 1554 of 4096 random values one
    ulp off) and mangles subnormals; on the GPU the bits equal the native RNE cast. NaN stays
    NaN (quiet). fp16 and fp32 casts are RNE on both paths as they are.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        half_ulp_even = 0x7FFF + ((bits >> 16) & 1)  # ties go to the even bf16 mantissa
        upper = tl.where(x != x, bits | 0x400000, bits + half_ulp_even) >> 16
        return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _to_fp32(x):
    """Exact widening to fp32; bf16 by bits, since the interpreter mangles bf16 subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _route_adapter(route, route_expert_ptr, token_lora_ids_ptr, enabled_ptr,
                   num_experts, num_adapters, TOP_K: tl.constexpr):
    """(active, expert, adapter) of one route; inactive routes are never dereferenced further.

    Out-of-range ids are treated as absent so that no pointer is ever formed from them; the
    launcher rejects such ids before a call, as the reference does
    (``moe_validate.contract.checks.validate_index_values``).
    """
    expert = tl.load(route_expert_ptr + route).to(tl.int64)
    adapter = tl.load(token_lora_ids_ptr + route // TOP_K).to(tl.int64)
    active = (expert >= 0) & (expert < num_experts) & (adapter >= 0) & (adapter < num_adapters)
    enabled = tl.load(enabled_ptr + tl.where(active, adapter, 0), mask=active, other=0)
    return active & (enabled != 0), expert, adapter


@triton.jit
def _lora_delta_kernel(
    # pointers
    out_ptr, inp_ptr, a_ptr, b_ptr,
    route_expert_ptr, token_lora_ids_ptr, enabled_ptr, route_weight_ptr,
    # sizes
    n_out, k_in, rank, num_experts, num_adapters,
    # strides
    stride_om, stride_on,
    stride_im, stride_ik,
    stride_al, stride_ae, stride_ar, stride_ak,
    stride_bl, stride_be, stride_bn, stride_br,
    # MoE facts
    TOP_K: tl.constexpr,
    INPUT_ROW_IS_TOKEN: tl.constexpr,  # w13 reads x[m]; w2 reads c2[r]
    HAS_ROUTE_WEIGHT: tl.constexpr,
    # epilogue: True adds into out (single), False stores round_S(delta) (dual's buffer)
    ACCUMULATE: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -- program id to (route, n_group); skip routes without an active adapter ---------------
    route = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    num_n_groups = tl.num_programs(1)
    active, expert, adapter = _route_adapter(route, route_expert_ptr, token_lora_ids_ptr,
                                             enabled_ptr, num_experts, num_adapters, TOP_K)
    if active:
        # -- pointers --------------------------------------------------------------------------
        if INPUT_ROW_IS_TOKEN:
            inp_row_ptr = inp_ptr + (route // TOP_K) * stride_im
        else:
            inp_row_ptr = inp_ptr + route * stride_im
        a_base = a_ptr + adapter * stride_al + expert * stride_ae
        b_base = b_ptr + adapter * stride_bl + expert * stride_be
        offs_r = tl.arange(0, BLOCK_R)
        rank_mask = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)

        # -- shrink: t[j] = sum_k inp[k] * a[j, k], fp32 ----------------------------------------
        t = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < k_in
            inp = _to_fp32(tl.load(inp_row_ptr + k * stride_ik, mask=k_mask, other=0.0))
            a_ptrs = a_base + offs_r[:, None] * stride_ar + k[None, :] * stride_ak
            a = tl.load(a_ptrs, mask=rank_mask[:, None] & k_mask[None, :], other=0.0)
            t += tl.sum(_to_fp32(a) * inp[None, :], axis=1)
        # Padded rank lanes hold 0 * inp, which is NaN where inp is Inf: force them to zero.
        t = tl.where(rank_mask, t, 0.0)
        if HAS_ROUTE_WEIGHT:
            route_weight = tl.load(route_weight_ptr + route)

        # -- expand, tile by tile: delta[n] = sum_j b[n, j] * t[j] --------------------------------
        out_row_ptr = out_ptr + route * stride_om
        for n0 in range(pid_n * BLOCK_N, n_out, num_n_groups * BLOCK_N):
            n = n0 + offs_n
            n_mask = n < n_out
            b_ptrs = b_base + n[:, None] * stride_bn + offs_r[None, :] * stride_br
            b = tl.load(b_ptrs, mask=n_mask[:, None] & rank_mask[None, :], other=0.0)
            delta = tl.sum(_to_fp32(b) * t[None, :], axis=1)
            if HAS_ROUTE_WEIGHT:
                delta = delta * route_weight
            # -- epilogue: one rounding of the delta to S, then one of the sum --------------------
            delta = _round_to_storage(delta, out_ptr.dtype.element_ty)
            out_ptrs = out_row_ptr + n * stride_on
            if ACCUMULATE:
                base = tl.load(out_ptrs, mask=n_mask, other=0.0)
                total = _to_fp32(base) + _to_fp32(delta)
                tl.store(out_ptrs, _round_to_storage(total, out_ptr.dtype.element_ty), mask=n_mask)
            else:
                tl.store(out_ptrs, delta, mask=n_mask)


@triton.jit
def _lora_add_kernel(
    # pointers
    out_ptr, delta_ptr, route_expert_ptr, token_lora_ids_ptr, enabled_ptr,
    # sizes
    n_out, num_experts, num_adapters,
    # strides
    stride_om, stride_on, stride_dm, stride_dn,
    # MoE facts
    TOP_K: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr,
):
    """out[r] = round_S(out[r] + delta[r]) on routes with an active adapter (dual's join).

    Rows without one are not touched: adding the buffer's +0 would turn a -0.0 into +0.0 and
    would read rows of invalid routes.
    """
    route = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    num_n_groups = tl.num_programs(1)
    active, expert, adapter = _route_adapter(route, route_expert_ptr, token_lora_ids_ptr,
                                             enabled_ptr, num_experts, num_adapters, TOP_K)
    if active:
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(pid_n * BLOCK_N, n_out, num_n_groups * BLOCK_N):
            n = n0 + offs_n
            n_mask = n < n_out
            out_ptrs = out_ptr + route * stride_om + n * stride_on
            base = tl.load(out_ptrs, mask=n_mask, other=0.0)
            delta = tl.load(delta_ptr + route * stride_dm + n * stride_dn, mask=n_mask, other=0.0)
            total = _to_fp32(base) + _to_fp32(delta)
            tl.store(out_ptrs, _round_to_storage(total, out_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAKernelConfig:
    """Tiles of the LoRA kernels. ``n_groups``: programs sharing one route's output columns.

    ``block_k`` fixes the fp32 summation order of the shrink; ``block_n`` and ``n_groups`` change
    which program computes an element, never its arithmetic.
    """

    block_n: int
    block_k: int
    n_groups: int = 1
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LoRAKernelConfig.{name} must be a power of two; got {value}")
        if self.n_groups < 1:
            raise ValueError(f"LoRAKernelConfig.n_groups must be >= 1; got {self.n_groups}")


def select_lora_config(num_routes: int, n_out: int, k_in: int, rank: int,
                       device: torch.device) -> LoRAKernelConfig:
    """Defaults, not tuned yet (speed is a later issue).

    Interpreter: one tile covers all of K and N, so a program is one vectorized step and the
    program count is just the number of routes. GPU: a [BLOCK_R, BLOCK_K] shrink tile of at
    most 4096 fp32 values (32 registers a thread at 4 warps), 64-column expand tiles, and enough
    n_groups for about 1024 programs so that small batches still spread over the SMs.
    """
    block_r = triton.next_power_of_2(rank)
    if device.type != "cuda":
        return LoRAKernelConfig(block_n=triton.next_power_of_2(n_out),
                                block_k=triton.next_power_of_2(k_in), n_groups=1)
    block_k = max(16, min(triton.next_power_of_2(k_in), 128, 4096 // block_r))
    block_n = 64
    n_tiles = triton.cdiv(n_out, block_n)
    n_groups = max(1, min(n_tiles, 1024 // max(num_routes, 1)))
    return LoRAKernelConfig(block_n=block_n, block_k=block_k, n_groups=n_groups)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int, dtypes: Sequence[torch.dtype], device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}); got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")


def _check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must be {layout} = {tuple(expected)}; got {tuple(t.shape)}")


def _check_common(out_name: str, out: torch.Tensor, route_expert: torch.Tensor,
                  lora: LoRASpec, topk, base_gemm) -> Tuple[int, torch.Tensor]:
    """Checks shared by both entry points; returns (num_adapters, enabled as int32 [L])."""
    if not callable(base_gemm):
        raise TypeError(f"base_gemm must be a zero-argument callable; got {type(base_gemm).__name__}")
    if not isinstance(lora, LoRASpec):
        raise TypeError(f"lora must be a moe_validate.contract.spec.LoRASpec or None; got {type(lora).__name__}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int; got {topk!r}")
    _check_tensor(out_name, out, 2, _FLOAT_DTYPES, None)
    device = out.device
    _check_tensor("route_expert", route_expert, 1, _INDEX_DTYPES, device)
    _check_tensor("lora.token_lora_ids", lora.token_lora_ids, 1, _INDEX_DTYPES, device)
    num_tokens = lora.token_lora_ids.shape[0]
    num_routes = num_tokens * topk
    _check_shape("route_expert", route_expert, (num_routes,), "[M*topk] (M from lora.token_lora_ids)")
    _check_shape(out_name, out, (num_routes, out.shape[1]), "[M*topk, columns]")
    _check_tensor("lora.w2_a", lora.w2_a, 4, _FLOAT_DTYPES, device)
    num_adapters = lora.w2_a.shape[0]
    if num_adapters < 1:
        raise ValueError("lora must hold at least one adapter (w2_a.shape[0] >= 1)")
    if lora.enabled is not None:
        _check_tensor("lora.enabled", lora.enabled, 1,
                      (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64), device)
        _check_shape("lora.enabled", lora.enabled, (num_adapters,), "[L]")
    enabled = lora.enabled_mask().to(torch.int32)
    return num_adapters, enabled


def _check_adapter_pair(a_name: str, a, b_name: str, b, num_adapters: int, k_in: int, n_out: int,
                        device, num_experts: Optional[int]) -> int:
    """a [L, E, r, k_in] and b [L, E, n_out, r]; returns the rank r."""
    _check_tensor(a_name, a, 4, _FLOAT_DTYPES, device)
    _check_tensor(b_name, b, 4, _FLOAT_DTYPES, device)
    num_experts = a.shape[1] if num_experts is None else num_experts
    rank = a.shape[2]
    if rank < 1:
        raise ValueError(f"{a_name} must have rank >= 1 (dim 2); got shape {tuple(a.shape)}")
    _check_shape(a_name, a, (num_adapters, num_experts, rank, k_in), "[L, E, r, K]")
    _check_shape(b_name, b, (num_adapters, num_experts, n_out, rank), "[L, E, N, r]")
    return rank


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
@dataclass
class _SliceJob:
    """One delta launch: ``out`` is a (possibly strided) column view of c or of the buffer."""

    out_columns: Callable[[torch.Tensor], torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    rank: int


def _launch_delta(out: torch.Tensor, inp: torch.Tensor, job: _SliceJob, route_expert, token_ids,
                  enabled, route_weight, *, topk: int, input_row_is_token: bool, accumulate: bool,
                  config: Optional[LoRAKernelConfig]) -> None:
    num_routes, n_out = out.shape
    k_in = inp.shape[1]
    cfg = config or select_lora_config(num_routes, n_out, k_in, job.rank, out.device)
    grid = (num_routes, min(cfg.n_groups, triton.cdiv(n_out, cfg.block_n)))
    _lora_delta_kernel[grid](
        out, inp, job.a, job.b,
        route_expert, token_ids, enabled, route_weight if route_weight is not None else out,
        n_out, k_in, job.rank, job.a.shape[1], job.a.shape[0],
        out.stride(0), out.stride(1),
        inp.stride(0), inp.stride(1),
        *job.a.stride(), *job.b.stride(),
        TOP_K=topk, INPUT_ROW_IS_TOKEN=input_row_is_token,
        HAS_ROUTE_WEIGHT=route_weight is not None, ACCUMULATE=accumulate,
        BLOCK_R=triton.next_power_of_2(job.rank), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, enable_fp_fusion=_FP_FUSION,
    )


def _launch_add(out: torch.Tensor, delta: torch.Tensor, route_expert, token_ids, enabled,
                num_experts: int, num_adapters: int, *, topk: int,
                config: Optional[LoRAKernelConfig]) -> None:
    num_routes, n_out = out.shape
    cfg = config or select_lora_config(num_routes, n_out, 1, 1, out.device)
    grid = (num_routes, min(cfg.n_groups, triton.cdiv(n_out, cfg.block_n)))
    _lora_add_kernel[grid](
        out, delta, route_expert, token_ids, enabled,
        n_out, num_experts, num_adapters,
        out.stride(0), out.stride(1), delta.stride(0), delta.stride(1),
        TOP_K=topk, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, enable_fp_fusion=_FP_FUSION,
    )


def _run_schedule(c: torch.Tensor, inp: torch.Tensor, jobs: Sequence[_SliceJob], route_expert,
                  lora: LoRASpec, enabled: torch.Tensor, route_weight, *, topk: int,
                  input_row_is_token: bool, base_gemm: Callable[[], None],
                  config: Optional[LoRAKernelConfig]) -> None:
    """Run base_gemm exactly once and add every slice's delta into c, per lora.stream."""
    num_experts, num_adapters = jobs[0].a.shape[1], jobs[0].a.shape[0]
    token_ids = lora.token_lora_ids
    launch = dict(topk=topk, input_row_is_token=input_row_is_token, config=config)

    if c.shape[0] == 0 or c.shape[1] == 0:  # nothing to add; the base GEMM still runs once
        base_gemm()
        return

    if lora.stream == "single":
        base_gemm()
        for job in jobs:
            _launch_delta(job.out_columns(c), inp, job, route_expert, token_ids, enabled,
                          route_weight, accumulate=True, **launch)
        return

    # dual: round_S(delta) into a zero-filled buffer laid out like c, then one add kernel.
    delta_buffer = torch.zeros(c.shape, dtype=c.dtype, device=c.device)

    def compute_deltas() -> None:
        for job in jobs:
            _launch_delta(job.out_columns(delta_buffer), inp, job, route_expert, token_ids,
                          enabled, route_weight, accumulate=False, **launch)

    if c.is_cuda:
        main_stream = torch.cuda.current_stream(c.device)
        aux_stream = torch.cuda.Stream(device=c.device)  # from torch's stream pool: cheap
        inputs_ready = torch.cuda.Event()
        inputs_ready.record(main_stream)  # after the buffer's zero fill and enabled's cast
        aux_stream.wait_event(inputs_ready)
        with torch.cuda.stream(aux_stream):
            compute_deltas()
        base_gemm()
        deltas_ready = torch.cuda.Event()
        deltas_ready.record(aux_stream)
        main_stream.wait_event(deltas_ready)
        # Everything the aux stream read or wrote lives until the main stream has joined it:
        # the callers' tensors are referenced here and the buffer is freed after the add kernel
        # on the main stream, so the caching allocator cannot hand their memory out early.
    else:  # the interpreter: the same buffer path, sequentially
        compute_deltas()
        base_gemm()
    _launch_add(c, delta_buffer, route_expert, token_ids, enabled, num_experts, num_adapters,
                topk=topk, config=config)


def apply_lora_w13(c1: torch.Tensor, x: torch.Tensor, route_expert: torch.Tensor,
                   lora: Optional[LoRASpec], activation: Union[Activation, str], *, topk: int,
                   base_gemm: Callable[[], None],
                   config: Optional[LoRAKernelConfig] = None) -> None:
    """Run ``base_gemm()`` (which writes c1) once and add the w13 LoRA delta into ``c1`` in place.

    ``c1`` [M*topk, N] route-major, ``x`` [M, K] unquantized, ``route_expert`` [M*topk] local
    expert or -1. Slices: one covers all N; two split N into halves, or for ``swigluoai``
    interleave (slice 0 on even columns, slice 1 on odd columns). ``config`` overrides the tiles.
    """
    if lora is None:
        base_gemm()
        return
    num_adapters, enabled = _check_common("c1", c1, route_expert, lora, topk, base_gemm)
    activation = Activation.parse(activation)
    device = c1.device
    _check_tensor("x", x, 2, _FLOAT_DTYPES, device)
    if x.dtype != c1.dtype:
        raise ValueError(f"x and c1 must share the storage dtype; got {x.dtype} and {c1.dtype}")
    num_tokens, k_in = x.shape
    _check_shape("x", x, (lora.token_lora_ids.shape[0], k_in), "[M, K] (M from lora.token_lora_ids)")
    n_total = c1.shape[1]

    slices = lora.w13_slices
    if len(slices) == 1:
        layouts = [lambda t: t]
    elif len(slices) == 2:
        if not activation.is_gated:
            raise ValueError(f"two w13 LoRA slices (gate, up) need a gated activation; got {activation}")
        if n_total % 2:
            raise ValueError(f"c1 must have an even number of columns for two w13 slices; got {n_total}")
        half = n_total // 2
        if activation.is_interleaved:
            layouts = [lambda t: t[:, 0::2], lambda t: t[:, 1::2]]
        else:
            layouts = [lambda t: t[:, :half], lambda t: t[:, half:]]
    else:
        raise ValueError(f"lora.w13_a must be one tensor or a pair of tensors; got {len(slices)}")
    n_slice = n_total // len(slices)
    jobs = []
    for index, ((a, b), columns) in enumerate(zip(slices, layouts)):
        suffix = "" if len(slices) == 1 else f"[{index}]"
        num_experts = jobs[0].a.shape[1] if jobs else None  # both slices hold the same experts
        rank = _check_adapter_pair(f"lora.w13_a{suffix}", a, f"lora.w13_b{suffix}", b, num_adapters,
                                   k_in, n_slice, device, num_experts)
        jobs.append(_SliceJob(columns, a, b, rank))

    _run_schedule(c1, x, jobs, route_expert, lora, enabled, None, topk=topk,
                  input_row_is_token=True, base_gemm=base_gemm, config=config)


def apply_lora_w2(c3: torch.Tensor, c2: torch.Tensor, route_expert: torch.Tensor,
                  route_weight: Optional[torch.Tensor], lora: Optional[LoRASpec], *, topk: int,
                  base_gemm: Callable[[], None],
                  config: Optional[LoRAKernelConfig] = None) -> None:
    """Run ``base_gemm()`` (which writes c3) once and add the w2 LoRA delta into ``c3`` in place.

    ``c3`` [M*topk, K] route-major, ``c2`` [M*topk, I] the unquantized activation output,
    ``route_weight`` float32 [M*topk] or None (router weight already applied on the input).
    """
    if lora is None:
        base_gemm()
        return
    num_adapters, enabled = _check_common("c3", c3, route_expert, lora, topk, base_gemm)
    device = c3.device
    num_routes, k_out = c3.shape
    _check_tensor("c2", c2, 2, _FLOAT_DTYPES, device)
    if c2.dtype != c3.dtype:
        raise ValueError(f"c2 and c3 must share the storage dtype; got {c2.dtype} and {c3.dtype}")
    _check_shape("c2", c2, (num_routes, c2.shape[1]), "[M*topk, I]")
    if route_weight is not None:
        _check_tensor("route_weight", route_weight, 1, (torch.float32,), device)
        _check_shape("route_weight", route_weight, (num_routes,), "[M*topk]")
    rank = _check_adapter_pair("lora.w2_a", lora.w2_a, "lora.w2_b", lora.w2_b, num_adapters,
                               c2.shape[1], k_out, device, None)
    job = _SliceJob(lambda t: t, lora.w2_a, lora.w2_b, rank)
    _run_schedule(c3, c2, [job], route_expert, lora, enabled, route_weight, topk=topk,
                  input_row_is_token=False, base_gemm=base_gemm, config=config)
