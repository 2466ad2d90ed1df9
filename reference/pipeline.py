"""The fused-experts pipeline of SPEC.md, one stage per function, in float64.

Read it next to SPEC.md, "Pipeline": each function names its step. Routes are handled in the
flat order ``r = m*topk + j``; tensors indexed by route are [M, topk, ...] and hold exact zeros
for invalid routes. Every GEMM loops over local experts and multiplies the gathered rows of
that expert with one matmul (float64), which is both plain and fast enough for GPU suites.

Two precisions:

- ``"exact"``: float64 everywhere after the quantizations the scheme specifies (of x for GEMM1
  and of the activation output for GEMM2). No other rounding.
- ``"mirror"``: additionally rounds to the storage dtype S exactly where the pipeline stores
  (steps 3, 6 to 10): the router-weighted input, c1 (after bias), c1 after the LoRA add, c2
  (except on the fused silu + fp8_block128 path), c3, c3 after the LoRA add and the output. The
  activation and the router-weighted input are computed in fp32 as the kernels do, and the
  final top-k sum accumulates in fp32 in slot order. A kernel and the mirror then differ only by
  fp32 accumulation order and the rounding flips it causes.

The mirror follows a numerics profile (``profile=``, a ``moe_validate.contract.profile.NumericsProfile``;
default ``SPEC_PROFILE``, exactly the text above): where an implementation declares that it rounds
elsewhere or quantizes with other formulas, the mirror does so too, one small function per choice
(``router_weight``, ``dot_operand``, ``gemm_output_rounder``, ``activation_rounded_twice``, the
quantizer of ``reference.quant``, ``combine_in_storage``). ``exact`` follows no profile: it is the
scheme itself, the yardstick of accuracy whatever an implementation rounds.

``StageFunctions`` (``stage_functions(...)``) holds one call's stages after routing under one
precision and profile, each a function of its upstream stage; ``run_stages`` chains them, and the
harness's stage localization applies them to a backend's own intermediates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from moe_validate.contract.checks import CallShape, validate_call, validate_index_values
from moe_validate.contract.profile import (
    SPEC_PROFILE,
    DotPrecision,
    GemmOutputDtype,
    NumericsProfile,
    TopkSum,
    WeightPrecision,
)
from moe_validate.contract.rules import fused_silu_fp8_group
from moe_validate.contract.spec import Activation, LoRASpec, QuantConfig, QuantScheme

from reference.activations import apply_activation, gated_factors
from reference.quant import dequantize_activation, dequantize_weights, quantize_activation_codes

__all__ = [
    "PRECISIONS",
    "STAGE_KEYS",
    "route",
    "prepare_input",
    "gemm1",
    "lora_w13",
    "activation_stage",
    "requantize",
    "gemm2",
    "lora_w2",
    "combine",
    "StageFunctions",
    "stage_functions",
    "run_stages",
    "fused_experts",
]

PRECISIONS = ("exact", "mirror")
STAGE_KEYS = ("x", "route_valid", "route_expert", "w1", "w2", "c1", "c2", "c2_in", "c3", "out")

F64 = torch.float64
RoundFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def storage_rounder(S: torch.dtype, precision: str) -> RoundFn:
    """round_S for mirror mode (t -> S -> float64); the identity for exact mode."""
    if precision == "exact":
        return _identity

    def round_S(t: torch.Tensor) -> torch.Tensor:
        return t.to(S).to(F64)

    return round_S


# ---------------------------------------------------------------------------------------------
# A profile's rounding choices (mirror mode), one function each.
# ---------------------------------------------------------------------------------------------
def lora_rank_rounder(S: torch.dtype, profile: NumericsProfile, precision: str) -> RoundFn:
    """LoRA's shrink result as the expand dot reads it: kept (SPEC) or, where the profile's
    ``lora_rank_intermediate`` says so, stored to S first (mirror mode)."""
    if profile.lora_rank_intermediate is WeightPrecision.STORAGE:
        return storage_rounder(S, precision)
    return _identity


def router_weight(topk_weights: torch.Tensor, S: torch.dtype, precision: WeightPrecision) -> torch.Tensor:
    """The router weights as a product uses them (float64): as given (fp32), or rounded to S first."""
    if precision is WeightPrecision.STORAGE:
        return topk_weights.to(S).to(F64)
    return topk_weights.to(F64)


def dot_operand(shape: CallShape, profile: NumericsProfile, precision: str) -> RoundFn:
    """What an fp32 x fp32 GEMM reads of its operands: TF32 (the low 13 mantissa bits cleared, as
    sm_80+ tensor cores read fp32) where the profile says so and both operands are fp32 (S = fp32,
    nothing quantized); the operand itself otherwise."""
    scheme = shape.scheme
    if (precision != "mirror" or profile.fp32_dot is not DotPrecision.TF32 or shape.storage_dtype != torch.float32
            or scheme.act_granularity is not None or scheme.weight_dtype is not None):
        return _identity

    def tf32(t: torch.Tensor) -> torch.Tensor:
        bits = t.to(torch.float32).contiguous().view(torch.int32) & ~0x1FFF
        return bits.view(torch.float32).to(F64)

    return tf32


def gemm_output_dtype(shape: CallShape, profile: NumericsProfile, precision: str) -> torch.dtype:
    """The dtype c1 and c3 are stored in: S (SPEC), or, for quantized (fp8 / int8) activations in
    mirror mode, the dtype the profile's ``quantized_gemm_output`` names (bf16 or fp32)."""
    if precision == "mirror" and shape.scheme.act_granularity is not None:
        if profile.quantized_gemm_output is GemmOutputDtype.FP32:
            return torch.float32
        if profile.quantized_gemm_output is GemmOutputDtype.BF16:
            return torch.bfloat16
    return shape.storage_dtype


def gemm_output_rounder(shape: CallShape, profile: NumericsProfile, precision: str) -> RoundFn:
    """How c1 and c3 are stored: rounded to ``gemm_output_dtype`` (mirror), unrounded (exact)."""
    return storage_rounder(gemm_output_dtype(shape, profile, precision), precision)


# ---------------------------------------------------------------------------------------------
# Step 2: routing.
# ---------------------------------------------------------------------------------------------
def route(topk_ids: torch.Tensor, E: int, global_num_experts: int,
          expert_map: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(valid bool [M, topk], local expert int64 [M, topk] or -1).

    A route is valid iff ``0 <= id < global_num_experts`` and, with an expert map,
    ``expert_map[id] >= 0``. Ids are bound-checked before any indexing, so huge positive ids in
    padded rows are harmless. Raises ValueError if the map names a local expert outside [0, E).
    """
    ids = topk_ids.to(torch.int64)
    in_range = (ids >= 0) & (ids < global_num_experts)
    safe_ids = torch.where(in_range, ids, torch.zeros_like(ids))
    if expert_map is None:
        local = torch.where(in_range, ids, torch.full_like(ids, -1))
    else:
        validate_index_values(E, expert_map=expert_map)
        emap = expert_map.to(torch.int64)
        local = torch.where(in_range, emap[safe_ids], torch.full_like(ids, -1))
    valid = local >= 0
    return valid, torch.where(valid, local, torch.full_like(local, -1))


def _routes_of_expert(valid: torch.Tensor, local: torch.Tensor, e: int) -> torch.Tensor:
    """Flat route indices r (ascending) routed to local expert e."""
    return torch.nonzero((valid & (local == e)).reshape(-1), as_tuple=False).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Steps 3-4: router weight on input, input quantization.
# ---------------------------------------------------------------------------------------------
def prepare_input(hidden_states: torch.Tensor, topk_weights: torch.Tensor, shape: CallShape, *,
                  apply_router_weight_on_input: bool, a1q_scale: Optional[torch.Tensor],
                  precision: str, profile: NumericsProfile = SPEC_PROFILE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x as GEMM1 uses it, x unquantized for LoRA), both float64 [M, K].

    Step 3: ``x = round_S(x * w[m])`` (product in fp32 in mirror mode, as the kernels do, with w
    as the profile's ``router_weight_input`` says; float64 in exact mode). Step 4:
    quantize->dequantize per the scheme's activation key (mirror: the profile's quantizer);
    pre-quantized input (fp8/int8 with ``a1q_scale``) is only dequantized.
    """
    scheme = shape.scheme
    if hidden_states.dtype in (torch.float8_e4m3fn, torch.int8):
        x_used = dequantize_activation(hidden_states.to(torch.float32), a1q_scale)
        return x_used, x_used
    if apply_router_weight_on_input:
        if precision == "mirror":
            w = router_weight(topk_weights[:, :1], shape.storage_dtype, profile.router_weight_input)
            scaled = hidden_states.to(torch.float32) * w.to(torch.float32)
            x_unq = scaled.to(shape.storage_dtype).to(F64)
        else:
            x_unq = hidden_states.to(F64) * topk_weights[:, :1].to(F64)
    else:
        x_unq = hidden_states.to(F64)
    if scheme.act_granularity is None:
        return x_unq, x_unq
    codes, scale = quantize_activation_codes(x_unq, scheme, static_scale=shape.quant.a1_scale,
                                             quantizer=_quantizer(scheme, profile, precision))
    return dequantize_activation(codes, scale), x_unq


def _quantizer(scheme: QuantScheme, profile: NumericsProfile, precision: str, fused: bool = False):
    """The activation quantizer the mirror follows (the profile's; exact: SPEC's)."""
    chosen = profile if precision == "mirror" else SPEC_PROFILE
    return chosen.quantizer("int8" if scheme.act_dtype == torch.int8 else "fp8", scheme.act_granularity, fused)


# ---------------------------------------------------------------------------------------------
# Steps 6 and 9: the two grouped GEMMs.
# ---------------------------------------------------------------------------------------------
def gemm1(x: torch.Tensor, w1: torch.Tensor, w1_bias: Optional[torch.Tensor], valid: torch.Tensor,
          local: torch.Tensor, round_S: RoundFn) -> torch.Tensor:
    """c1 [M, topk, N]: ``round_S(x[m] . w1[e] + b1[e])`` per valid route, zeros elsewhere."""
    M, topk = valid.shape
    E, N, _ = w1.shape
    c1 = torch.zeros(M * topk, N, dtype=F64, device=x.device)
    for e in range(E):
        routes = _routes_of_expert(valid, local, e)
        if routes.numel() == 0:
            continue
        acc = x[routes // topk] @ w1[e].T
        if w1_bias is not None:
            acc = acc + w1_bias[e]
        c1[routes] = round_S(acc)
    return c1.reshape(M, topk, N)


def gemm2(c2_in: torch.Tensor, w2: torch.Tensor, w2_bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
          valid: torch.Tensor, local: torch.Tensor, round_S: RoundFn, *,
          apply_router_weight_on_input: bool) -> torch.Tensor:
    """c3 [M, topk, K]: ``round_S((c2_in[r] . w2[e] + b2[e]) * w[r])`` per valid route.

    No ``* w[r]`` when the router weight was applied on the input. ``topk_weights``: as the
    product uses them (``router_weight``).
    """
    M, topk = valid.shape
    E, K, _ = w2.shape
    flat_in = c2_in.reshape(M * topk, c2_in.shape[2])
    flat_w = topk_weights.to(F64).reshape(M * topk)
    c3 = torch.zeros(M * topk, K, dtype=F64, device=c2_in.device)
    for e in range(E):
        routes = _routes_of_expert(valid, local, e)
        if routes.numel() == 0:
            continue
        acc = flat_in[routes] @ w2[e].T
        if w2_bias is not None:
            acc = acc + w2_bias[e]
        if not apply_router_weight_on_input:
            acc = acc * flat_w[routes].unsqueeze(1)
        c3[routes] = round_S(acc)
    return c3.reshape(M, topk, K)


# ---------------------------------------------------------------------------------------------
# Steps 7 and 9: LoRA deltas.
# ---------------------------------------------------------------------------------------------
def _active_adapter(lora: LoRASpec, valid: torch.Tensor) -> torch.Tensor:
    """Adapter index per route (int64 [M, topk]), -1 where none applies (no id, disabled, invalid)."""
    validate_index_values(lora.w2_a.shape[1], lora=lora)
    ids = lora.token_lora_ids.to(torch.int64)
    enabled = lora.enabled_mask()
    has_adapter = ids >= 0
    active = has_adapter & enabled[torch.where(has_adapter, ids, torch.zeros_like(ids))]
    per_token = torch.where(active, ids, torch.full_like(ids, -1))
    return torch.where(valid, per_token.unsqueeze(1).expand_as(valid), torch.full_like(valid, -1, dtype=torch.int64))


def _lora_groups(adapter: torch.Tensor, local: torch.Tensor, E: int, L: int):
    """Yield (l, e, flat routes) for every (adapter, expert) pair that has routes."""
    flat_adapter, flat_local = adapter.reshape(-1), local.reshape(-1)
    for l in range(L):
        for e in range(E):
            routes = torch.nonzero((flat_adapter == l) & (flat_local == e), as_tuple=False).reshape(-1)
            if routes.numel():
                yield l, e, routes


def lora_w13(c1: torch.Tensor, x_unq: torch.Tensor, lora: Optional[LoRASpec], valid: torch.Tensor,
             local: torch.Tensor, activation: Activation, round_S: RoundFn,
             round_rank: RoundFn = _identity) -> torch.Tensor:
    """c1 with the LoRA w13 delta added: ``round_S(c1 + round_S(round_rank(x_unq . A^T) . B^T))``.

    Two slices (gate, up) land on rows [0, N/2) and [N/2, N), or on even and odd rows for
    swigluoai. Routes without an active adapter keep c1 bit for bit. ``round_rank``: how the
    rank-space intermediate is stored (SPEC: not rounded; a profile's ``lora_rank_intermediate``).
    """
    if lora is None:
        return c1
    M, topk, N = c1.shape
    E = lora.w2_a.shape[1]
    adapter = _active_adapter(lora, valid)
    out = c1.reshape(M * topk, N).clone()
    slices = lora.w13_slices
    for l, e, routes in _lora_groups(adapter, local, E, lora.num_adapters):
        x_rows = x_unq[routes // topk]
        deltas = [round_rank(x_rows @ a[l, e].to(F64).T) @ b[l, e].to(F64).T for a, b in slices]
        if len(deltas) == 1:
            d13 = deltas[0]
        elif activation.is_interleaved:
            d13 = torch.empty(routes.numel(), N, dtype=F64, device=c1.device)
            d13[:, 0::2], d13[:, 1::2] = deltas[0], deltas[1]
        else:
            d13 = torch.cat(deltas, dim=1)
        out[routes] = round_S(out[routes] + round_S(d13))
    return out.reshape(M, topk, N)


def lora_w2(c3: torch.Tensor, c2_unq: torch.Tensor, lora: Optional[LoRASpec], topk_weights: torch.Tensor,
            valid: torch.Tensor, local: torch.Tensor, round_S: RoundFn, *,
            apply_router_weight_on_input: bool, round_rank: RoundFn = _identity) -> torch.Tensor:
    """c3 with ``round_S(c3 + round_S(round_rank(c2 . A^T) . B^T * w[r]))`` added (no ``* w[r]`` on
    input; ``round_rank`` as in ``lora_w13``)."""
    if lora is None:
        return c3
    M, topk, K = c3.shape
    E = lora.w2_a.shape[1]
    adapter = _active_adapter(lora, valid)
    out = c3.reshape(M * topk, K).clone()
    flat_c2 = c2_unq.reshape(M * topk, c2_unq.shape[2])
    flat_w = topk_weights.to(F64).reshape(M * topk)
    for l, e, routes in _lora_groups(adapter, local, E, lora.num_adapters):
        d2 = round_rank(flat_c2[routes] @ lora.w2_a[l, e].to(F64).T) @ lora.w2_b[l, e].to(F64).T
        if not apply_router_weight_on_input:
            d2 = d2 * flat_w[routes].unsqueeze(1)
        out[routes] = round_S(out[routes] + round_S(d2))
    return out.reshape(M, topk, K)


# ---------------------------------------------------------------------------------------------
# Step 8: activation and requantization.
# ---------------------------------------------------------------------------------------------
def activation_rounded_twice(c1: torch.Tensor, activation: Activation, clamp_limit: Optional[float],
                             round_S: RoundFn) -> torch.Tensor:
    """c2 = round_S(round_S(act(g)) * u) in fp32: the gate's activation stored to S, then the
    product with up rounded again (a profile's ``ActivationRounding.DOUBLE``)."""
    act_g, up = gated_factors(c1.to(torch.float32), activation, clamp_limit)
    stored = round_S(act_g.to(F64)).to(torch.float32)
    return round_S((stored * up).to(F64))


def activation_stage(c1: torch.Tensor, valid: torch.Tensor, activation: Activation,
                     clamp_limit: Optional[float], round_S: RoundFn, *, precision: str,
                     fused: bool, twice: bool = False) -> torch.Tensor:
    """c2 [M, topk, I]: the activation in fp32 (mirror) or float64 (exact), one rounding to S
    in mirror mode unless ``fused`` (none) or ``twice`` (``activation_rounded_twice``); zeros for
    invalid routes."""
    compute_dtype = torch.float32 if precision == "mirror" else F64
    if twice and not fused and precision == "mirror":
        c2 = activation_rounded_twice(c1, activation, clamp_limit, round_S)
        return torch.where(valid.unsqueeze(2), c2, torch.zeros_like(c2))
    c2 = apply_activation(c1.to(compute_dtype), activation, clamp_limit).to(F64)
    if not fused:
        c2 = round_S(c2)
    return torch.where(valid.unsqueeze(2), c2, torch.zeros_like(c2))


def requantize(c2: torch.Tensor, valid: torch.Tensor, scheme: QuantScheme,
               a2_scale: Optional[torch.Tensor], quantizer=None) -> torch.Tensor:
    """c2_in [M, topk, I]: the GEMM2 input, quantize->dequantize per the scheme (float64).

    Only valid routes' rows are quantized; a dynamic per-tensor scale spans all of them (never
    per expert). ``quantizer``: a profile's formulas (default SPEC's).
    """
    if scheme.act_granularity is None:
        return c2
    M, topk, I = c2.shape
    flat = c2.reshape(M * topk, I)
    rows = torch.nonzero(valid.reshape(-1), as_tuple=False).reshape(-1)
    c2_in = torch.zeros_like(flat)
    if rows.numel():
        extra = {} if quantizer is None else {"quantizer": quantizer}
        codes, scale = quantize_activation_codes(flat[rows], scheme, static_scale=a2_scale, **extra)
        c2_in[rows] = dequantize_activation(codes, scale)
    return c2_in.reshape(M, topk, I)


# ---------------------------------------------------------------------------------------------
# Step 10: the top-k sum.
# ---------------------------------------------------------------------------------------------
def sums_in_storage(topk: int, precision: str, topk_sum: TopkSum) -> bool:
    """Whether the top-k sum accumulates in S (each add rounded to S) rather than in fp32 with one
    rounding: a profile's ``TopkSum.STORAGE_UP_TO_4`` with topk 2..4, in mirror mode."""
    return precision == "mirror" and topk_sum is TopkSum.STORAGE_UP_TO_4 and 2 <= topk <= 4


def _storage_sums(c3: torch.Tensor, valid: torch.Tensor, storage_dtype: torch.dtype):
    """Yield the partial sums over slots 0..j (fp32 holding S values) of a sum accumulated in S:
    each add in fp32, rounded to S; invalid slots add exact zeros."""
    acc = torch.zeros(c3.shape[0], c3.shape[2], dtype=torch.float32, device=c3.device)
    for j in range(c3.shape[1]):
        term = c3[:, j].to(torch.float32)
        acc = (acc + torch.where(valid[:, j:j + 1], term, torch.zeros_like(term))).to(storage_dtype).to(torch.float32)
        yield acc


def storage_partial_sums(c3: torch.Tensor, valid: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """[M, topk, K] float64: every partial sum of a top-k sum accumulated in S (``sums_in_storage``);
    the last is the output."""
    return torch.stack([acc.to(F64) for acc in _storage_sums(c3, valid, storage_dtype)], 1)


def combine_in_storage(c3: torch.Tensor, valid: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """out [M, K] = sum over slots j in order, accumulated in S: each add in fp32, rounded to S
    (a profile's ``TopkSum.STORAGE_UP_TO_4``, topk 2..4); invalid slots add exact zeros."""
    acc = torch.zeros(c3.shape[0], c3.shape[2], dtype=torch.float32, device=c3.device)
    for acc in _storage_sums(c3, valid, storage_dtype):
        pass
    return acc.to(F64)


def combine(c3: torch.Tensor, valid: torch.Tensor, storage_dtype: torch.dtype, *, precision: str,
            topk_sum: TopkSum = TopkSum.FP32) -> torch.Tensor:
    """out [M, K] = round_S(sum over valid slots j, in slot order, of c3[m, j]).

    Mirror mode accumulates in fp32 (``float(c3)``) and rounds once to S (or, where ``topk_sum``
    says so, in S: ``sums_in_storage``, ``combine_in_storage``); exact mode sums in float64. A
    token without a valid route gets exact zeros.
    """
    M, topk, K = c3.shape
    if sums_in_storage(topk, precision, topk_sum):
        return combine_in_storage(c3, valid, storage_dtype)
    acc_dtype = torch.float32 if precision == "mirror" else F64
    acc = torch.zeros(M, K, dtype=acc_dtype, device=c3.device)
    for j in range(topk):
        term = c3[:, j].to(acc_dtype)
        acc = acc + torch.where(valid[:, j:j + 1], term, torch.zeros_like(term))
    if precision == "mirror":
        return acc.to(storage_dtype).to(F64)
    return acc


# ---------------------------------------------------------------------------------------------
# The whole call.
# ---------------------------------------------------------------------------------------------
def _dequantized_weights(shape: CallShape, w1: torch.Tensor, w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    q = shape.quant
    w1_f = dequantize_weights(w1, q.w1_scale, shape.scheme, zp=q.w1_zp, group_size=q.group_size)
    w2_f = dequantize_weights(w2, q.w2_scale, shape.scheme, zp=q.w2_zp, group_size=q.group_size)
    return w1_f, w2_f


def weight_only_operand(shape: CallShape, profile: NumericsProfile, precision: str) -> RoundFn:
    """A weight-only scheme's dequantized weight as the dot reads it: (q - zp) * s (exact in
    float64), or, where the profile says STORAGE, that product in fp32 rounded to S."""
    if (precision != "mirror" or shape.scheme.weight_dtype is None or shape.scheme.act_granularity is not None
            or profile.weight_only_dequantized is not WeightPrecision.STORAGE):
        return _identity
    return lambda w: w.to(torch.float32).to(shape.storage_dtype).to(F64)


def _bias(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Biases are used in fp32 (SPEC.md): any float dtype -> fp32 -> float64."""
    return None if b is None else b.to(torch.float32).to(F64)


@dataclass(frozen=True)
class StageFunctions:
    """The pipeline of one validated call, stage by stage, under one precision and profile.

    Every stage after the input preparation is a function of its upstream stage: ``c1(x, x_unq)``,
    ``c2(c1)``, ``c2_in(c2)``, ``c3(c2_in, c2)``, ``out(c3)``. ``run`` chains them from the inputs
    (``run_stages``); stage localization (moe_validate/stages.py) applies each one to a backend's
    own upstream stage, so both follow the profile through the same functions. Made by
    ``stage_functions``; ``w1`` and ``w2`` are the dequantized weights as the dots read them
    (``weight_only_operand``), ``valid`` and ``local`` the routes (``route``).
    """

    shape: CallShape
    precision: str
    profile: NumericsProfile  # SPEC_PROFILE for exact: the scheme itself, whatever an implementation rounds
    hidden_states: torch.Tensor
    topk_weights: torch.Tensor
    a1q_scale: Optional[torch.Tensor]
    lora: Optional[LoRASpec]
    apply_router_weight_on_input: bool
    valid: torch.Tensor
    local: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor

    # --- the profile's choices for this call (each one of the functions above) -----------------
    @property
    def storage_dtype(self) -> torch.dtype:
        return self.shape.storage_dtype

    @property
    def round_S(self) -> RoundFn:
        return storage_rounder(self.storage_dtype, self.precision)

    @property
    def round_rank(self) -> RoundFn:
        """How LoRA's rank-space intermediate is stored (``lora_rank_rounder``)."""
        return lora_rank_rounder(self.storage_dtype, self.profile, self.precision)

    @property
    def gemm_output_dtype(self) -> torch.dtype:
        """The dtype c1 and c3 are stored in (``gemm_output_dtype``)."""
        return gemm_output_dtype(self.shape, self.profile, self.precision)

    @property
    def fused(self) -> bool:
        """The fused silu + fp8 1x128 path (c2 never stored in S)."""
        return fused_silu_fp8_group(self.shape.activation, self.shape.scheme, self.shape.quant.gemm1_clamp_limit,
                                    self.lora is not None)

    @property
    def twice(self) -> bool:
        """Whether c2 is rounded twice (``activation_rounded_twice``)."""
        return self.profile.rounds_activation_twice(self.shape.activation, self.shape.quant.gemm1_clamp_limit)

    @property
    def quantizer(self):
        """The requantization quantizer (the profile's; exact: SPEC's), None when GEMM2 reads c2 as is."""
        scheme = self.shape.scheme
        return _quantizer(scheme, self.profile, self.precision, self.fused) if scheme.act_granularity else None

    @property
    def gemm2_weights(self) -> torch.Tensor:
        """The router weights as GEMM2's epilogue multiplies by them (``router_weight``)."""
        precision = self.profile.router_weight_gemm2 if self.precision == "mirror" else WeightPrecision.FP32
        return router_weight(self.topk_weights, self.storage_dtype, precision)

    @property
    def sums_in_storage(self) -> bool:
        """Whether the top-k sum accumulates in S (``sums_in_storage``)."""
        return sums_in_storage(self.valid.shape[1], self.precision, self.profile.topk_sum)

    # --- the stages ------------------------------------------------------------------------------
    def x(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Steps 3-4: (x as GEMM1 uses it, x unquantized for LoRA) (``prepare_input``)."""
        return prepare_input(self.hidden_states, self.topk_weights, self.shape,
                             apply_router_weight_on_input=self.apply_router_weight_on_input,
                             a1q_scale=self.a1q_scale, precision=self.precision, profile=self.profile)

    def c1(self, x: torch.Tensor, x_unq: torch.Tensor) -> torch.Tensor:
        """Steps 6-7: GEMM1 (+ bias), stored per ``gemm_output_dtype``, then the LoRA w13 delta."""
        operand = dot_operand(self.shape, self.profile, self.precision)
        c1 = gemm1(operand(x), operand(self.w1), _bias(self.shape.quant.w1_bias), self.valid, self.local,
                   gemm_output_rounder(self.shape, self.profile, self.precision))
        return lora_w13(c1, x_unq, self.lora, self.valid, self.local, self.shape.activation, self.round_S,
                        self.round_rank)

    def c2(self, c1: torch.Tensor) -> torch.Tensor:
        """Step 8: the activation, rounded once, twice or (fused) not at all (``activation_stage``)."""
        return activation_stage(c1, self.valid, self.shape.activation, self.shape.quant.gemm1_clamp_limit,
                                self.round_S, precision=self.precision, fused=self.fused, twice=self.twice)

    def c2_in(self, c2: torch.Tensor) -> torch.Tensor:
        """Step 8: the GEMM2 input, requantized with the profile's quantizer (``requantize``)."""
        return requantize(c2, self.valid, self.shape.scheme, self.shape.quant.a2_scale, self.quantizer)

    def c3(self, c2_in: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        """Step 9: GEMM2 (+ bias, * router weight), stored per ``gemm_output_dtype``, then the LoRA
        w2 delta (from the unquantized ``c2``)."""
        operand = dot_operand(self.shape, self.profile, self.precision)
        c3 = gemm2(operand(c2_in), operand(self.w2), _bias(self.shape.quant.w2_bias), self.gemm2_weights,
                   self.valid, self.local, gemm_output_rounder(self.shape, self.profile, self.precision),
                   apply_router_weight_on_input=self.apply_router_weight_on_input)
        return lora_w2(c3, c2, self.lora, self.topk_weights, self.valid, self.local, self.round_S,
                       apply_router_weight_on_input=self.apply_router_weight_on_input, round_rank=self.round_rank)

    def out(self, c3: torch.Tensor) -> torch.Tensor:
        """Step 10: the top-k sum (``combine``)."""
        return combine(c3, self.valid, self.storage_dtype, precision=self.precision, topk_sum=self.profile.topk_sum)

    def run(self) -> Dict[str, torch.Tensor]:
        """Every named intermediate, each stage from the one before (``run_stages``)."""
        x, x_unq = self.x()
        c1 = self.c1(x, x_unq)
        c2 = self.c2(c1)
        c2_in = self.c2_in(c2)
        c3 = self.c3(c2_in, c2)
        return {"x": x, "route_valid": self.valid, "route_expert": self.local, "w1": self.w1, "w2": self.w2,
                "c1": c1, "c2": c2, "c2_in": c2_in, "c3": c3, "out": self.out(c3)}


def stage_functions(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu",
                    quant: Optional[QuantConfig] = None, expert_map=None, global_num_experts: int = -1,
                    apply_router_weight_on_input: bool = False, lora: Optional[LoRASpec] = None,
                    a1q_scale=None, precision: str = "exact", out_dtype=None,
                    profile: NumericsProfile = SPEC_PROFILE) -> StageFunctions:
    """The ``StageFunctions`` of one call: validated (as the kernels validate), routed (step 2),
    weights dequantized. Arguments as ``run_stages``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if not isinstance(profile, NumericsProfile):
        raise TypeError(f"profile must be a NumericsProfile; got {type(profile).__name__}")
    shape = validate_call(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, quant=quant,
                          expert_map=expert_map, global_num_experts=global_num_experts,
                          apply_router_weight_on_input=apply_router_weight_on_input, lora=lora,
                          a1q_scale=a1q_scale)
    validate_index_values(shape.E, expert_map=expert_map, lora=lora, quant=quant)  # as the kernels do
    valid, local = route(topk_ids, shape.E, shape.global_num_experts, expert_map)
    if precision == "exact":
        profile = SPEC_PROFILE  # exact is the scheme itself, whatever an implementation rounds
    w1_f, w2_f = (weight_only_operand(shape, profile, precision)(w) for w in _dequantized_weights(shape, w1, w2))
    return StageFunctions(shape=shape, precision=precision, profile=profile, hidden_states=hidden_states,
                          topk_weights=topk_weights, a1q_scale=a1q_scale, lora=lora,
                          apply_router_weight_on_input=apply_router_weight_on_input, valid=valid, local=local,
                          w1=w1_f, w2=w2_f)


def run_stages(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu",
               quant: Optional[QuantConfig] = None, expert_map=None, global_num_experts: int = -1,
               apply_router_weight_on_input: bool = False, lora: Optional[LoRASpec] = None,
               a1q_scale=None, precision: str = "exact", out_dtype=None,
               profile: NumericsProfile = SPEC_PROFILE) -> Dict[str, torch.Tensor]:
    """Every named intermediate of one call (SPEC.md, Pipeline), float64 unless noted.

    Keys: ``x`` [M, K] GEMM1 input as used; ``route_valid`` bool [M, topk]; ``route_expert``
    int64 [M, topk] (local expert or -1); ``w1`` [E, N, K] and ``w2`` [E, K, I] dequantized;
    ``c1`` [M, topk, N] after bias and LoRA; ``c2`` [M, topk, I] activation output before
    requantization; ``c2_in`` [M, topk, I] GEMM2 input as used; ``c3`` [M, topk, K] after bias,
    router weight and LoRA; ``out`` [M, K]. Rows of invalid routes are zeros. ``out_dtype`` is
    accepted (and ignored) so that the keyword arguments of ``fused_experts`` pass through.
    ``profile``: the numerics profile the mirror follows (ignored by ``exact``). The stages are
    those of ``stage_functions``, each computed from the one before.
    """
    return stage_functions(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, quant=quant,
                           expert_map=expert_map, global_num_experts=global_num_experts,
                           apply_router_weight_on_input=apply_router_weight_on_input, lora=lora,
                           a1q_scale=a1q_scale, precision=precision, profile=profile).run()


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu",
                  quant: Optional[QuantConfig] = None, expert_map=None, global_num_experts: int = -1,
                  apply_router_weight_on_input: bool = False, lora: Optional[LoRASpec] = None,
                  a1q_scale=None, precision: str = "exact", out_dtype: torch.dtype = torch.float64,
                  profile: NumericsProfile = SPEC_PROFILE) -> torch.Tensor:
    """The reference output [M, K]: ``run_stages(...)["out"]`` cast to ``out_dtype``.

    In mirror mode the values are representable in the storage dtype S, so casting to S is
    exact. Inputs are never modified; computation stays on the inputs' device. ``profile``: the
    numerics profile the mirror follows (``run_stages``).
    """
    stages = run_stages(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, quant=quant,
                        expert_map=expert_map, global_num_experts=global_num_experts,
                        apply_router_weight_on_input=apply_router_weight_on_input, lora=lora,
                        a1q_scale=a1q_scale, precision=precision, profile=profile)
    return stages["out"].to(out_dtype)
