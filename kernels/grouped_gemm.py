"""The grouped expert GEMM: one kernel for GEMM1 (w13) and GEMM2 (w2), every scheme.

    C[r, n] = round_S( (dequant(sum_k A[row(r), k] * B[e(r), n, k]) + bias[e(r), n]) * w[r] )

for every valid route r of a tile, where row(r) = r // topk for GEMM1 (A = the token-major
input x) and r for GEMM2 (A = the route-major activation c2), and C is route-major [R, N].

Tile decomposition: the aligned route list (``kernels.align``) is cut into BLOCK_M tiles that
each belong to one expert; program (pid_m, pid_n) computes the BLOCK_M x BLOCK_N tile of C for
those routes and output columns [pid_n*BLOCK_N, +BLOCK_N), looping over K in BLOCK_K steps and
accumulating in fp32 (int32 for int8 x int8). GROUP_M swizzles pid_m so that consecutive
programs reuse the same B columns. In the tiny-M path (``NAIVE``) tile pid_m holds route pid_m
alone (row 0), its expert read from ``route_expert``; padding rows carry the sentinel R. One
helper (``_route_tile_fp32``: pointers, K loop, fp32 epilogue), called from one place, computes
every tile of every variant below; the kernel rounds its result to S once. The launcher is
``plan_grouped_gemm`` (checks, modes, grid: a ``GemmPlan``) then the launch of that plan.

Dequantization:
  weights/acts fp8 or int8, 128x128 block scales: per K tile, acc += dot * (a_s[row, kb] * b_s[e, nb, kb])
  channel [E, N] / tensor [E] weight scales and token [rows, 1] / tensor [1] act scales: after
      the K loop, on the whole accumulator;
  int8_w8a16: int8 weights converted (exactly) to S, per-channel scale after the K loop;
  int4_w4a16: nibble (low = even k) minus zero point (default 8) converted (exactly) to S, dot,
      then scaled per (column, group) per K tile (a K tile never straddles a group).
Tiles with expert -1 write nothing; padding rows are masked: every valid route's row is
written exactly once and no other row is touched.

Fused activation (GEMM1 without LoRA, ``activation=``): the epilogue rounds the tile to S as c1
would be stored, widens it again, applies ``kernels.activation.activation_fp32`` (the activation
kernel's own math) and stores c2 [R, I] instead: c1 is never written. For a gated activation a
program's BLOCK_N weight rows are BLOCK_N // 2 (gate, up) pairs placed side by side (tile column
2j = gate row of c2 column j, 2j + 1 = its up row; rows j and I + j, or 2j and 2j + 1 for the
interleaved swigluoai), so one dot of the usual shape feeds both and ``tl.split`` of the
reshaped accumulator separates them; each product sees exactly the operands, K order and
dequantization of the unfused GEMM1, hence the same bits.

Fused silu + fp8 group quantization (``FP8_GROUP_QUANT``; fp8_block128 with silu, no clamp, no
LoRA): the epilogue goes on where ``kernels.quantize.silu_and_mul_quant_fp8_group`` would start.
From c1 as stored (rounded to S, widened) it forms silu(gate) * up in fp32 by that kernel's own
helper (``silu_and_mul_fp32``), takes per row and per 128-column group of c2 the absmax, the
scale (``_dynamic_scale``) and the codes (``_quantize``), and stores the fp8 codes into c [R, I]
and the fp32 scales into c_scale [R, ceil(I/128)]: the quantizer's layout, its bits, and neither
c1 nor an S-rounded c2 is ever written. It needs whole groups per program, i.e. BLOCK_N // 2 (the
c2 columns of a program) a multiple of 128: BLOCK_N = 256 is one group per program.

Fused top-k sum (``TOPK_SUM``; GEMM2 on the naive path without LoRA, ``topk_sum=``):

    out[m, n] = round_S( sum over valid slots j, in order, fp32 from +0.0, of c3[m*topk + j, n] )

with c3 as above but never stored: program (token m, pid_n) loops over m's topk slots, runs each
valid slot's route alone through the tile helper exactly as its unfused naive program would,
rounds it to S as c3 would be stored, widens it and adds it to the sum; invalid slots are skipped
(no weight read), so a token without a valid route stores zeros. The adds are explicitly
rounded (``_interp.add_rn``: never contracted with the epilogue's last product into an FMA). That
is ``kernels.moe_sum`` on c3 bit for bit, without c3's round trip and the extra launch. The grid
has M * cdiv(N, BLOCK_N) programs (topk times fewer than the unfused GEMM2's), each streaming up
to topk weight tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels import _interp
from kernels._launch import launch_options, wait_for_predecessor
from kernels.activation import activation_fp32
from kernels.quantize import ACT_GROUP_SIZE, FP8_MAX, _dynamic_scale, _quantize, silu_and_mul_fp32
from moe_validate.contract.spec import SWIGLU_LIMIT, Activation

__all__ = ["invoke_grouped_gemm", "plan_grouped_gemm", "GemmPlan", "fp8_group_quant_blocker"]


@triton.jit
def _route_tile_fp32(
    # pointers
    a_ptr, b_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, b_zp_ptr, route_weight_ptr,
    # the tile: its expert, its BLOCK_M route ids (row_mask: the lanes holding a route) and column tile
    expert, routes, row_mask, pid_n,
    # sizes
    N, K,
    # strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_biase, stride_biasn,
    stride_asm, stride_ask,
    stride_bse, stride_bsn, stride_bsk,
    stride_bze, stride_bzn, stride_bzk,
    # MoE facts
    A_ROW_DIV: tl.constexpr, MUL_ROUTE_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    # precision flags
    WEIGHT_FORMAT: tl.constexpr, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_ZP: tl.constexpr,
    GROUP_K: tl.constexpr, GROUP_N: tl.constexpr, GATE_UP: tl.constexpr,
    # tile constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Stages 2-4 of one tile (routes of one expert x BLOCK_N weight rows): pointers, the K loop,
    the fp32 epilogue. Returns the [BLOCK_M, BLOCK_N] fp32 tile before its one rounding to S,
    which the caller does where it stores C, applies a fused activation or sums the top-k slots:
    every path runs this one copy, so every path sees the same operands, K order and epilogue."""
    a_rows = tl.where(row_mask, routes // A_ROW_DIV, 0)

    # Stage 2: pointers (int64 offsets: rows * stride can exceed 2^31). offs_n are the weight
    # rows (B columns) of the tile; everything up to the epilogue's rounding indexes by them.
    if GATE_UP == "none":
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
    else:
        # Tile column 2j + h holds C column pid_n * BLOCK_N/2 + j: its gate row (h = 0) and its
        # up row (h = 1) side by side, so the accumulator splits into (gate, up) in registers.
        offs_pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        is_up = tl.arange(0, BLOCK_N) % 2
        if GATE_UP == "interleaved":
            offs_n = 2 * offs_pair + is_up
        else:
            offs_n = offs_pair + is_up * N
        n_mask = offs_pair < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_base = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    if WEIGHT_FORMAT == "int4":
        b_ptrs = b_base + (offs_k[:, None] // 2) * stride_bk
        b_shift = (offs_k[:, None] % 2) * 4
    else:
        b_ptrs = b_base + offs_k[:, None] * stride_bk

    # Stage 3: K loop, fp32 accumulation (int32 for int8 x int8).
    if WEIGHT_FORMAT == "int8":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_start = kt * BLOCK_K
        k_mask = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if WEIGHT_FORMAT == "int4":
            packed = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
            q = ((packed.to(tl.int32) >> b_shift) & 0xF)
            group = k_start // GROUP_K
            if HAS_ZP:
                zp = tl.load(b_zp_ptr + expert * stride_bze + offs_n.to(tl.int64) * stride_bzn + group * stride_bzk,
                             mask=n_mask, other=0).to(tl.int32)
                q = q - zp[None, :]
            else:
                q = q - 8
            q = tl.where(k_mask[:, None], q, 0)
            # via fp32: the interpreter turns int -> bf16 casts into NaN; |q| <= 15 is exact in S.
            partial = _interp.dot(a, q.to(tl.float32).to(a.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
            b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn + group * stride_bsk,
                          mask=n_mask, other=0.0)
            acc += partial * b_s[None, :]
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if WEIGHT_FORMAT == "int8":
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            elif WEIGHT_FORMAT == "fp8":
                if B_SCALE == "block":
                    group = k_start // GROUP_K
                    a_s = tl.load(a_scale_ptr + a_rows * stride_asm + group * stride_ask, mask=row_mask, other=0.0)
                    partial = tl.dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
                    # acc += partial * (a_s * b_s): the scale product first, then one FMA per element
                    # (H100 probe, scripts/gpu_probe_fp8_block.py: 706 -> 771 TF/s at 128x128x128
                    # with the scalar b_s below). Both branches round the same products: same bits.
                    if GATE_UP == "none" and GROUP_N % BLOCK_N == 0:
                        # the tile's rows lie in one weight scale block: one scalar per K tile
                        b_s = tl.load(b_scale_ptr + expert * stride_bse + ((pid_n * BLOCK_N) // GROUP_N).to(tl.int64)
                                      * stride_bsn + group * stride_bsk)
                        acc += partial * (a_s[:, None] * b_s)
                    else:
                        b_s = tl.load(b_scale_ptr + expert * stride_bse + (offs_n // GROUP_N).to(tl.int64) * stride_bsn
                                      + group * stride_bsk, mask=n_mask, other=0.0)
                        acc += partial * (a_s[:, None] * b_s[None, :])
                else:
                    acc = tl.dot(a, b, acc)
            elif WEIGHT_FORMAT == "int8_w8a16":
                acc = _interp.dot(a, b.to(tl.float32).to(a.dtype), acc)  # via fp32, as for int4
            else:
                acc = _interp.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        if WEIGHT_FORMAT == "int4":
            b_ptrs += (BLOCK_K // 2) * stride_bk
        else:
            b_ptrs += BLOCK_K * stride_bk

    # Stage 4: epilogue in fp32: dequantize, + bias, * router weight (the one cast to S: the caller's).
    acc = acc.to(tl.float32)
    if A_SCALE == "row":
        a_s = tl.load(a_scale_ptr + a_rows * stride_asm, mask=row_mask, other=0.0)
        acc = acc * a_s[:, None]
    elif A_SCALE == "tensor":
        acc = acc * tl.load(a_scale_ptr)
    if B_SCALE == "channel":
        b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn, mask=n_mask, other=0.0)
        acc = acc * b_s[None, :]
    elif B_SCALE == "tensor":
        acc = acc * tl.load(b_scale_ptr + expert * stride_bse)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_biase + offs_n.to(tl.int64) * stride_biasn, mask=n_mask, other=0.0)
        acc = acc + _interp.to_fp32(bias)[None, :]
    if MUL_ROUTE_WEIGHT:
        w = tl.load(route_weight_ptr + routes, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    return acc


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, b_zp_ptr, route_weight_ptr,
    sorted_route_ids_ptr, expert_ids_ptr, num_post_padded_ptr, route_expert_ptr,
    c_scale_ptr,  # FP8_GROUP_QUANT only: the fp32 scales of c's codes, [R, ceil(N / QUANT_GROUP)]
    # sizes (N = columns of C: the weight rows, or I with a fused gated activation, B then has 2N rows)
    N, K, num_routes,
    # strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_biase, stride_biasn,
    stride_asm, stride_ask,
    stride_bse, stride_bsn, stride_bsk,
    stride_bze, stride_bzn, stride_bzk,
    stride_csm,
    # MoE facts
    A_ROW_DIV: tl.constexpr,  # topk for GEMM1 (A is token-major), 1 for GEMM2
    NAIVE: tl.constexpr,  # one route per tile, no alignment
    MUL_ROUTE_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    # GEMM2 on the naive path with the top-k sum fused: a program owns token pid_m, sums the tiles
    # of its TOP_K slots and stores the [M, N] output row; C (c3) is never written
    TOPK_SUM: tl.constexpr,
    TOP_K: tl.constexpr,  # slots per token (TOPK_SUM only)
    # precision flags
    clamp_limit,  # silu's gemm1_clamp_limit (fused activation with HAS_CLAMP only)
    WEIGHT_FORMAT: tl.constexpr,  # "float" | "fp8" | "int8" (w8a8) | "int8_w8a16" | "int4"
    A_SCALE: tl.constexpr,  # "none" | "row" | "tensor" | "row_group"
    B_SCALE: tl.constexpr,  # "none" | "channel" | "tensor" | "block" | "group"
    HAS_ZP: tl.constexpr,
    GROUP_K: tl.constexpr,  # K extent of one scale block/group (block and group scales)
    GROUP_N: tl.constexpr,  # N extent of one weight scale block (block scales)
    ACTIVATION: tl.constexpr,  # "" (store C) or the activation fused into the epilogue (GEMM1)
    GATE_UP: tl.constexpr,  # fused gated activation: "split" (gate rows [0, N), up [N, 2N)) | "interleaved"; else "none"
    HAS_CLAMP: tl.constexpr, SWIGLU_LIMIT: tl.constexpr,
    # S, the storage dtype c1 is rounded to; c_ptr's own dtype except with FP8_GROUP_QUANT, where c
    # holds fp8 codes and the S-rounded c1 exists only in registers
    C1_DTYPE: tl.constexpr,
    # Fused silu + fp8 group quantization (fp8_block128 + silu, GEMM1): c gets the fp8 codes of
    # silu(gate) * up and c_scale one scale per (row, QUANT_GROUP columns), exactly what the separate
    # silu_and_mul_quant_fp8_group kernel would make of c1, which then is never written (a constexpr:
    # the codes and scales replace the S store, and the reductions exist only in this variant)
    FP8_GROUP_QUANT: tl.constexpr,
    QUANT_GROUP: tl.constexpr,  # columns per activation scale group (128)
    QUANT_GROUPS: tl.constexpr,  # groups per program: (BLOCK_N // 2) // QUANT_GROUP (a constexpr tile dim)
    QUANT_QMAX: tl.constexpr,  # QMAX of the fp8 codes (448 for e4m3fn)
    # tile constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (kernels._launch)
):
    if B_SCALE == "block" or B_SCALE == "group":
        tl.static_assert(GROUP_K % BLOCK_K == 0, "BLOCK_K must divide the scale group: a K tile must not straddle it")
    if WEIGHT_FORMAT == "int4":
        tl.static_assert(BLOCK_K % 2 == 0, "int4 packs two k per byte: BLOCK_K must be even")
    if GATE_UP != "none":
        tl.static_assert(ACTIVATION != "", "gate/up pairs exist only with a fused activation")
        tl.static_assert(not MUL_ROUTE_WEIGHT, "the activation fuses into GEMM1, which has no router weight")
        tl.static_assert(BLOCK_N >= 2, "a fused gated activation needs BLOCK_N >= 2 (BLOCK_N // 2 gate/up pairs)")
    if FP8_GROUP_QUANT:
        tl.static_assert(ACTIVATION == "silu" and GATE_UP == "split" and not HAS_CLAMP,
                         "the fused fp8 group quantization is silu (gate rows [0, N), up [N, 2N)) without clamp")
        tl.static_assert(QUANT_GROUPS >= 1 and QUANT_GROUPS * QUANT_GROUP == BLOCK_N // 2,
                         "the fused fp8 group quantization needs whole groups per program: (BLOCK_N // 2) % 128 == 0")
    if TOPK_SUM:
        tl.static_assert(NAIVE and A_ROW_DIV == 1 and ACTIVATION == "",
                         "the top-k sum fuses into GEMM2 (route-major A, no activation) on the naive path only")

    wait_for_predecessor(PDL)

    # Stage 1: program id -> (route tile, column tile), GROUP_M swizzled. A column tile of C is
    # BLOCK_N wide, or BLOCK_N // 2 (gate/up pairs) with a fused gated activation. With TOPK_SUM
    # the "route tile" is a token: pid_m = m.
    pid = tl.program_id(0)
    if GATE_UP == "none":
        num_pid_n = tl.cdiv(N, BLOCK_N)
    else:
        num_pid_n = tl.cdiv(N, BLOCK_N // 2)
    num_pid_m = tl.num_programs(0) // num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # C's columns; stage 5 halves them for gate/up pairs

    # Stage 1b: the route tiles the program runs through stages 2-4. A tile program owns one:
    # pid_m's BLOCK_M aligned routes, or route pid_m alone in row 0 on the naive path. With
    # TOPK_SUM the program owns token pid_m's TOP_K slots (TOP_K is 1 otherwise), taken in order.
    if TOPK_SUM:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        if NAIVE:
            expert = tl.load(route_expert_ptr + pid_m).to(tl.int64)
            routes = tl.where(offs_m == 0, pid_m, num_routes).to(tl.int64)
        else:
            if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
                return
            expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
            routes = tl.load(sorted_route_ids_ptr + pid_m * BLOCK_M + offs_m).to(tl.int64)
        if expert < 0:
            return  # padding tile or invalid route: its rows are never read

    for j in tl.static_range(TOP_K):
        if TOPK_SUM:
            # Slot j: route m*TOP_K + j alone in row 0, exactly as its own unfused naive program
            # would run it. An invalid slot (expert < 0) is skipped, its weights never read, as
            # moe_sum skips it.
            route = pid_m * TOP_K + j
            expert = tl.load(route_expert_ptr + route).to(tl.int64)
            routes = tl.where(offs_m == 0, route, num_routes).to(tl.int64)
            valid = expert >= 0
        else:
            # a constexpr, so that this branch compiles to straight-line code: a tile program
            # whose expert is invalid has returned above
            valid: tl.constexpr = True
        if valid:
            # Stages 2-4, then the one rounding to S: c1, c3, or the c1 a fused activation reads.
            row_mask = routes < num_routes
            acc = _route_tile_fp32(
                a_ptr, b_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, b_zp_ptr, route_weight_ptr,
                expert, routes, row_mask, pid_n, N, K,
                stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_biase, stride_biasn,
                stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_bze, stride_bzn, stride_bzk,
                A_ROW_DIV, MUL_ROUTE_WEIGHT, HAS_BIAS, WEIGHT_FORMAT, A_SCALE, B_SCALE, HAS_ZP, GROUP_K,
                GROUP_N, GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K)
            c = _interp.to_storage(acc, C1_DTYPE)
            if TOPK_SUM:
                # Widened, the slot's c3 joins an fp32 sum that starts at +0.0: moe_sum's sum of
                # c3, bit for bit, without c3. _interp.add_rn: the GPU would fuse this add with the
                # epilogue's last product into one FMA (with S = fp32 that product is the c3 value
                # itself), skipping the product's rounding.
                total = _interp.add_rn(total, _interp.to_fp32(c))

    if TOPK_SUM:
        # Stage 6 (top-k sum): row 0 is token pid_m's output row, rounded to S once.
        token_row = offs_m == 0
        out_rows = tl.where(token_row, pid_m, 0).to(tl.int64)
        out_ptrs = c_ptr + out_rows[:, None] * stride_cm + offs_cn[None, :].to(tl.int64) * stride_cn
        tl.store(out_ptrs, _interp.to_storage(total, C1_DTYPE), mask=token_row[:, None] & (offs_cn < N)[None, :])
    else:
        # Stage 5 (fused GEMM1 only): the activation on c1 exactly as stored (rounded to S, widened),
        # in fp32 by the activation kernel's own helper, one more rounding to S: c2 bit for bit. With
        # FP8_GROUP_QUANT, silu(gate) * up by the fp8 group quantizer's helper instead, then its codes.
        if ACTIVATION != "":
            c1 = _interp.to_fp32(c)
            if GATE_UP == "none":
                y = activation_fp32(c1, c1, clamp_limit, ACTIVATION, HAS_CLAMP, SWIGLU_LIMIT)
            else:
                gate, up = tl.split(tl.reshape(c1, (BLOCK_M, BLOCK_N // 2, 2)))
                if FP8_GROUP_QUANT:
                    # the separate quantizer's formula (not activation_fp32's); skipping zeros or not
                    # gives the same bits, and no tuned config takes this path: the plain division
                    y = silu_and_mul_fp32(gate, up, False)
                else:
                    y = activation_fp32(gate, up, clamp_limit, ACTIVATION, HAS_CLAMP, SWIGLU_LIMIT)
                offs_cn = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            if FP8_GROUP_QUANT:
                # Stage 5b: per (row, 128-column group) of y: absmax, scale, codes, as the separate
                # kernel computes them. Columns past N hold y = 0 (their weight rows load as 0), as that
                # kernel's masked loads give, so a ragged last group has the same absmax. One group
                # per program (BLOCK_N = 256) reduces the tile itself; several a [rows, groups, 128] view.
                if QUANT_GROUPS == 1:
                    scale = _dynamic_scale(tl.max(tl.abs(y), axis=1), QUANT_QMAX)
                    c = _quantize(y, tl.broadcast_to(scale[:, None], (BLOCK_M, QUANT_GROUP)), QUANT_QMAX, True, False)
                    tl.store(c_scale_ptr + routes * stride_csm + pid_n, scale, mask=row_mask)
                else:
                    y = tl.reshape(y, (BLOCK_M, QUANT_GROUPS, QUANT_GROUP))
                    scale = _dynamic_scale(tl.max(tl.abs(y), axis=2), QUANT_QMAX)
                    q = _quantize(y, tl.broadcast_to(scale[:, :, None], (BLOCK_M, QUANT_GROUPS, QUANT_GROUP)),
                                  QUANT_QMAX, True, False)
                    c = tl.reshape(q, (BLOCK_M, BLOCK_N // 2))
                    offs_g = pid_n * QUANT_GROUPS + tl.arange(0, QUANT_GROUPS)
                    tl.store(c_scale_ptr + routes[:, None] * stride_csm + offs_g[None, :], scale,
                             mask=row_mask[:, None] & (offs_g * QUANT_GROUP < N)[None, :])
            else:
                c = _interp.to_storage(y, C1_DTYPE)

        # Stage 6: masked store by route id.
        cn_mask = offs_cn < N
        c_ptrs = c_ptr + routes[:, None] * stride_cm + offs_cn[None, :].to(tl.int64) * stride_cn
        tl.store(c_ptrs, c, mask=row_mask[:, None] & cn_mask[None, :])


def _weight_format(b: torch.Tensor, a: torch.Tensor, scheme) -> str:
    if scheme.value == "int4_w4a16":
        return "int4"
    if scheme.value == "int8_w8a16":
        return "int8_w8a16"
    if b.dtype == torch.float8_e4m3fn:
        return "fp8"
    if b.dtype == torch.int8:
        return "int8"
    return "float"


_TL_STORAGE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def fp8_group_quant_blocker(config) -> str:
    """Why GEMM1 with ``config`` cannot fuse the silu + fp8 group quantization ("" if it can)."""
    if (config.BLOCK_N // 2) % ACT_GROUP_SIZE != 0 or config.BLOCK_N < 2 * ACT_GROUP_SIZE:
        return (f"it needs (config.BLOCK_N // 2) % {ACT_GROUP_SIZE} == 0, a program owning whole "
                f"{ACT_GROUP_SIZE}-column scale groups of c2 (BLOCK_N = 256, 512, ...); got BLOCK_N={config.BLOCK_N}")
    return ""


def _strides(t: Optional[torch.Tensor], n: int):
    if t is None:
        return (0,) * n
    # Leading dims are the indexed ones ([E, N] channel scales index (e, n); [R, 1] token scales
    # index r); missing trailing dims are never indexed.
    s = tuple(t.stride())[:n]
    return s + (0,) * (n - len(s))


def _check_topk_sum(topk: int, c: torch.Tensor, num_routes: int, route_expert: torch.Tensor, naive: bool,
                    top_k_div: int, activation) -> None:
    """The top-k sum fuses into GEMM2 on the naive path only; c must be the [M, N] output."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk_sum must be the topk (an int >= 1) whose slots are summed; got {topk!r}")
    if not naive:
        raise ValueError("topk_sum (the top-k sum fused into GEMM2) needs the naive path (one route per tile): "
                         "an aligned tile holds routes of many tokens")
    if activation is not None or top_k_div != 1:
        raise ValueError(f"topk_sum fuses into GEMM2 (route-major a, top_k_div=1, no activation); got "
                         f"top_k_div={top_k_div}, activation={getattr(activation, 'value', activation)}")
    if num_routes % topk or route_expert.numel() != num_routes:
        raise ValueError(f"topk_sum={topk}: num_routes ({num_routes}) must be M * topk, one route expert each; "
                         f"got {route_expert.numel()} route experts")
    if c.shape[0] != num_routes // topk:
        raise ValueError(f"with topk_sum, c is the [M, N] output, M = num_routes // topk = {num_routes // topk} "
                         f"rows; got {tuple(c.shape)}")


@dataclass(frozen=True)
class GemmPlan:
    """One grouped-GEMM launch, decided from its arguments before anything runs (testable without
    a launch): the grid, the runtime sizes and the kernel's constexpr arguments by name."""

    grid: Tuple[int]
    N: int  # columns of c: b's rows, or I = half of them with a fused gated activation
    K: int
    num_routes: int
    clamp_limit: float  # silu's gemm1_clamp_limit (0.0 where HAS_CLAMP is False)
    flat_b_scale: bool  # per-tensor weight scales [E, 1, 1] are passed as [E]
    constexprs: Dict[str, Any]

    @property
    def launches(self) -> bool:
        """False where no route or no column exists: nothing to write."""
        return self.num_routes > 0 and self.N > 0


def plan_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
    scheme, config, top_k_div: int, num_routes: int,
    sorted_route_ids: Optional[torch.Tensor], expert_ids: Optional[torch.Tensor],
    num_post_padded: Optional[torch.Tensor], route_expert: torch.Tensor,
    naive: bool,
    bias: Optional[torch.Tensor] = None,
    a_scale: Optional[torch.Tensor] = None, b_scale: Optional[torch.Tensor] = None,
    b_zp: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
    route_weight: Optional[torch.Tensor] = None,
    activation=None, clamp_limit: Optional[float] = None,
    c_scale: Optional[torch.Tensor] = None, c1_dtype: Optional[torch.dtype] = None,
    topk_sum: Optional[int] = None,
) -> GemmPlan:
    """The launch ``invoke_grouped_gemm`` makes with these arguments (its docstring says what they
    mean); ValueError naming the argument where they do not fit together."""
    if a.dim() != 2 or b.dim() != 3 or c.dim() != 2:
        raise ValueError(f"grouped GEMM needs a [rows, K], b [E, N, K], c [R, N]; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(c.shape)}")
    N, K = b.shape[1], a.shape[1]
    gate_up = "none"
    if activation is not None:
        activation = Activation.parse(activation)
        if route_weight is not None:
            raise ValueError("a fused activation belongs to GEMM1, which takes no route_weight")
        if clamp_limit is not None and activation is not Activation.SILU:
            raise ValueError(f"gemm1_clamp_limit applies to silu only; got activation {activation.value}")
        if activation.is_gated:
            gate_up = "interleaved" if activation.is_interleaved else "split"
            if N % 2 or config.BLOCK_N < 2:
                raise ValueError(f"a fused gated activation needs an even w1 row count N and config.BLOCK_N >= 2 "
                                 f"(BLOCK_N // 2 gate/up pairs per program); got N={N}, BLOCK_N={config.BLOCK_N}")
            N //= 2  # from here on N counts columns of C (= c2)
    elif clamp_limit is not None:
        raise ValueError("clamp_limit is only meaningful with a fused activation")
    if c_scale is not None:
        why = fp8_group_quant_blocker(config)
        if activation is not Activation.SILU or clamp_limit is not None:
            why = "the fused fp8 group quantization is silu without gemm1_clamp_limit"
        if why:
            raise ValueError(f"c_scale (fused silu + fp8 group quantization): {why}")
        if c.dtype != torch.float8_e4m3fn or c1_dtype not in _TL_STORAGE:
            raise ValueError(f"the fused fp8 group quantization writes float8_e4m3fn codes and needs c1_dtype "
                             f"(fp32/fp16/bf16); got c {c.dtype}, c1_dtype {c1_dtype}")
        groups = triton.cdiv(N, ACT_GROUP_SIZE)
        if c_scale.dtype != torch.float32 or c_scale.dim() != 2 or tuple(c_scale.shape) != (c.shape[0], groups):
            raise ValueError(f"c_scale must be float32 [{c.shape[0]}, {groups}] (one scale per row per "
                             f"{ACT_GROUP_SIZE} columns); got {c_scale.dtype} {tuple(c_scale.shape)}")
    elif c.dtype not in _TL_STORAGE or (c1_dtype is not None and c1_dtype != c.dtype):
        raise ValueError(f"c must have the storage dtype (fp32/fp16/bf16; c1_dtype differs from it only with "
                         f"c_scale); got c {c.dtype}, c1_dtype {c1_dtype}")
    if c.shape[1] != N:
        raise ValueError(f"c must have {N} columns ({'c2' if activation is not None else 'the w rows'}); "
                         f"got {tuple(c.shape)}")
    if topk_sum is not None:
        _check_topk_sum(topk_sum, c, num_routes, route_expert, naive, top_k_div, activation)

    # Precision modes: how the kernel reads the scales of this scheme.
    fmt = _weight_format(b, a, scheme)
    act_gran = scheme.act_granularity
    if a_scale is None:
        a_mode = "none"
    elif act_gran == "token_group":
        a_mode = "row_group"
    elif act_gran == "token":
        a_mode = "row"
    else:
        a_mode = "tensor"
    w_gran = scheme.weight_granularity
    b_mode = {None: "none", "block": "block", "channel": "channel", "tensor": "tensor", "group": "group"}[w_gran]
    flat_b_scale = b_mode == "tensor"
    if fmt == "float":
        a_mode, b_mode = "none", "none"
    group_k = 128
    if b_mode == "group":
        group_k = group_size

    # Grid: one program per (route tile, column tile); per (token, column tile) with the top-k sum.
    if topk_sum is not None:
        num_tiles = num_routes // topk_sum  # one per token
    elif naive:
        num_tiles = num_routes
    else:
        num_tiles = sorted_route_ids.numel() // config.BLOCK_M
    cols_per_tile = config.BLOCK_N // 2 if gate_up != "none" else config.BLOCK_N
    constexprs = dict(
        A_ROW_DIV=top_k_div,
        NAIVE=naive,
        MUL_ROUTE_WEIGHT=route_weight is not None,
        HAS_BIAS=bias is not None,
        TOPK_SUM=topk_sum is not None,
        TOP_K=topk_sum if topk_sum is not None else 1,
        WEIGHT_FORMAT=fmt,
        A_SCALE=a_mode,
        B_SCALE=b_mode,
        HAS_ZP=b_zp is not None,
        GROUP_K=group_k,
        GROUP_N=128,
        ACTIVATION=activation.value if activation is not None else "",
        GATE_UP=gate_up,
        HAS_CLAMP=clamp_limit is not None,
        SWIGLU_LIMIT=SWIGLU_LIMIT,
        C1_DTYPE=_TL_STORAGE[c1_dtype if c1_dtype is not None else c.dtype],
        FP8_GROUP_QUANT=c_scale is not None,
        QUANT_GROUP=ACT_GROUP_SIZE,
        QUANT_GROUPS=config.BLOCK_N // 2 // ACT_GROUP_SIZE if c_scale is not None else 1,
        QUANT_QMAX=FP8_MAX,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
    )
    return GemmPlan(grid=(num_tiles * triton.cdiv(N, cols_per_tile),), N=N, K=K, num_routes=num_routes,
                    clamp_limit=float(clamp_limit) if clamp_limit is not None else 0.0, flat_b_scale=flat_b_scale,
                    constexprs=constexprs)


def invoke_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
    scheme, config, top_k_div: int, num_routes: int,
    sorted_route_ids: Optional[torch.Tensor], expert_ids: Optional[torch.Tensor],
    num_post_padded: Optional[torch.Tensor], route_expert: torch.Tensor,
    naive: bool,
    bias: Optional[torch.Tensor] = None,
    a_scale: Optional[torch.Tensor] = None, b_scale: Optional[torch.Tensor] = None,
    b_zp: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
    route_weight: Optional[torch.Tensor] = None,
    activation=None, clamp_limit: Optional[float] = None,
    c_scale: Optional[torch.Tensor] = None, c1_dtype: Optional[torch.dtype] = None,
    topk_sum: Optional[int] = None,
) -> None:
    """Launch one grouped GEMM writing c[r, :] for every valid route r (route-major c).

    ``a`` [rows, K] (x for GEMM1, c2 for GEMM2, possibly quantized); ``b`` [E, N, K] (int4:
    [E, N, K/2] uint8); ``c`` [R, N] in S. Scales follow SPEC.md's shapes; the caller has
    validated them. ``top_k_div`` maps a route to its A row (topk for GEMM1, 1 for GEMM2).

    With ``activation`` (GEMM1 only) the epilogue applies it and ``c`` is c2 [R, I] (I = N/2 for
    gated activations, N otherwise): bit for bit what storing c1 and running
    ``kernels.activation.apply_activation`` gives. ``config.BLOCK_N`` is then still the number
    of weight rows per program, i.e. BLOCK_N // 2 gate/up pairs (c2 columns) for gated ones.

    With ``c_scale`` (activation silu without clamp): the fused silu + fp8 group quantization.
    ``c`` is then the float8_e4m3fn codes [R, I] and ``c_scale`` the float32 scales
    [R, ceil(I/128)] (``kernels.quantize.fp8_group_outputs``), bit for bit what
    ``silu_and_mul_quant_fp8_group`` gives on the stored c1 for every valid route's row;
    ``c1_dtype`` is the storage dtype S c1 would have had (the epilogue rounds to it first), and
    ``config.BLOCK_N // 2`` must be a multiple of 128 (a program owns whole scale groups).

    With ``topk_sum`` = topk (GEMM2 on the naive path: ``naive``, ``top_k_div`` 1, no activation):
    the top-k sum fused in. ``c`` is then the [M, N] output (M = num_routes // topk) instead of
    the route-major c3, and c[m] is bit for bit what ``kernels.moe_sum`` makes of c3 (slots in
    order, fp32 from +0.0, invalid routes skipped, one rounding to S; zeros for a token without a
    valid route): one program per (token, column tile) runs each valid slot's tile through the
    very code of the unfused GEMM2.
    """
    plan = plan_grouped_gemm(
        a, b, c, scheme=scheme, config=config, top_k_div=top_k_div, num_routes=num_routes,
        sorted_route_ids=sorted_route_ids, expert_ids=expert_ids, num_post_padded=num_post_padded,
        route_expert=route_expert, naive=naive, bias=bias, a_scale=a_scale, b_scale=b_scale, b_zp=b_zp,
        group_size=group_size, route_weight=route_weight, activation=activation, clamp_limit=clamp_limit,
        c_scale=c_scale, c1_dtype=c1_dtype, topk_sum=topk_sum)
    if not plan.launches:
        return
    if plan.flat_b_scale:
        b_scale = b_scale.reshape(-1)
    dummy = c
    _grouped_gemm_kernel[plan.grid](
        a, b, c,
        bias if bias is not None else dummy,
        a_scale if a_scale is not None else dummy,
        b_scale if b_scale is not None else dummy,
        b_zp if b_zp is not None else dummy,
        route_weight if route_weight is not None else dummy,
        sorted_route_ids if sorted_route_ids is not None else route_expert,
        expert_ids if expert_ids is not None else route_expert,
        num_post_padded if num_post_padded is not None else route_expert,
        route_expert,
        c_scale if c_scale is not None else dummy,
        plan.N, plan.K, plan.num_routes,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        *_strides(bias, 2),
        *_strides(a_scale, 2),
        *_strides(b_scale, 3),
        *_strides(b_zp, 3),
        c_scale.stride(0) if c_scale is not None else 0,
        clamp_limit=plan.clamp_limit,
        **plan.constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(c.device),
    )
