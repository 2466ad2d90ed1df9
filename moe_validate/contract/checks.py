"""The shared "Bad input" checks of SPEC.md, used by both ``kernels`` and ``reference``.

Part of the leaf contract (torch and ``moe_validate.contract.spec`` only). ``validate_call``
inspects shapes, dtypes, strides and devices -- never tensor values, so it costs no device
synchronization -- and either returns the resolved problem size (``CallShape``) or raises
``ValueError``/``TypeError`` naming the offending argument and what was expected.
``validate_index_values`` is the second check, which does read values (one device sync):
expert-map entries, LoRA adapter ids and int4 zero points; kernels and reference both call it. Expert ids in ``topk_ids`` are never bad input
(padded rows may hold any integer). Device capability is not checked here: each backend adds
its own ``supports`` check.

Decisions this module makes where SPEC.md is silent (kernels inherit them by calling it):
- pre-quantized ``hidden_states`` (fp8 / int8) must come with ``a1q_scale`` and is refused
  together with ``apply_router_weight_on_input`` or LoRA, because both are specified on the
  unquantized input, which the caller no longer has;
- without an ``expert_map`` the global expert count must equal the local one (ids are then
  local ids); with one, ``expert_map`` has exactly ``global_num_experts`` entries;
- scales, zero points and ``group_size`` that the scheme does not use are refused rather than
  silently ignored, and two w13 LoRA slices need a gated activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from moe_validate.contract.spec import (
    FP8_BLOCK,
    INT4_GROUP_SIZES,
    Activation,
    LoRASpec,
    QuantConfig,
    QuantScheme,
    storage_dtype,
)

__all__ = ["CallShape", "validate_call", "validate_index_values", "act_scale_shape"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class CallShape:
    """The resolved problem size and vocabulary of one valid call."""

    M: int
    K: int
    N: int
    I: int  # noqa: E741 -- SPEC.md's name for the intermediate size
    E: int
    topk: int
    global_num_experts: int
    storage_dtype: torch.dtype
    activation: Activation
    scheme: QuantScheme
    quant: QuantConfig
    gated: bool


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _require_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def _require_shape(t: torch.Tensor, name: str, expected: Tuple[int, ...], what: str) -> None:
    if _shape(t) != tuple(expected):
        raise ValueError(f"{name} must be {what} = {tuple(expected)}; got {_shape(t)}")


def _require_dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype], why: str = "") -> None:
    if t.dtype not in allowed:
        suffix = f" ({why})" if why else ""
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}{suffix}; got {t.dtype}")


def _require_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on the device of hidden_states ({device}); got {t.device}")


def _require_unit_last_stride(t: torch.Tensor, name: str) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride along its last dimension (padded outer strides are fine); "
            f"got strides {tuple(t.stride())}"
        )


def act_scale_shape(scheme: QuantScheme, rows: int, cols: int) -> Optional[Tuple[int, ...]]:
    """Shape of the dynamic activation scale the scheme produces for a [rows, cols] input.

    ``None`` for unquantized activations; per-tensor scales are ``(1,)`` (a ``()`` scale is
    accepted wherever one is given).
    """
    granularity = scheme.act_granularity
    if granularity is None:
        return None
    if granularity == "token_group":
        return (rows, math.ceil(cols / FP8_BLOCK))
    if granularity == "token":
        return (rows, 1)
    return (1,)


def _check_scalar_scale(t, name: str, device: torch.device) -> None:
    t = _require_tensor(t, name)
    if _shape(t) not in ((), (1,)):
        raise ValueError(f"{name} must hold one element (shape () or (1,)); got {_shape(t)}")
    _require_dtype(t, name, (torch.float32,), "scales are float32")
    _require_device(t, name, device)


def _check_weight_scale(t, name: str, scheme: QuantScheme, E: int, rows: int, cols: int,
                        group_size: Optional[int], device: torch.device) -> None:
    """rows x cols is the logical (unpacked) shape of one expert's weight matrix."""
    if t is None:
        raise ValueError(f"{name} is required for scheme {scheme}")
    t = _require_tensor(t, name)
    _require_dtype(t, name, (torch.float32,), "scales are float32")
    _require_device(t, name, device)
    granularity = scheme.weight_granularity
    if granularity == "block":
        expected = (E, math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
        _require_shape(t, name, expected, f"[E, ceil({rows}/128), ceil({cols}/128)] for {scheme}")
    elif granularity == "channel":
        _require_shape(t, name, (E, rows), f"[E, {rows}] (one scale per output channel) for {scheme}")
    elif granularity == "tensor":
        if _shape(t) not in ((E,), (E, 1, 1)):
            raise ValueError(f"{name} must be [E] = ({E},) or [E, 1, 1] for {scheme}; got {_shape(t)}")
    elif granularity == "group":
        expected = (E, rows, cols // group_size)
        _require_shape(t, name, expected, f"[E, {rows}, {cols}/group_size] for {scheme}")


def _check_zero_point(t, name: str, E: int, rows: int, cols: int, group_size: int,
                      device: torch.device) -> None:
    t = _require_tensor(t, name)
    _require_dtype(t, name, (torch.uint8,), "int4 zero points are uint8 in 0..15")
    _require_device(t, name, device)
    _require_shape(t, name, (E, rows, cols // group_size), f"[E, {rows}, {cols}/group_size]")


def _check_bias(t, name: str, expected: Tuple[int, int], what: str, device: torch.device) -> None:
    t = _require_tensor(t, name)
    if not t.dtype.is_floating_point or t.dtype.itemsize == 1:
        raise TypeError(f"{name} must have a float dtype (float32/float16/bfloat16/float64); got {t.dtype}")
    _require_device(t, name, device)
    _require_shape(t, name, expected, what)


def _check_quant(quant: QuantConfig, scheme: QuantScheme, *, E: int, N: int, K: int, I: int,
                 activation: Activation, device: torch.device) -> None:
    used_weight_scales = scheme.weight_granularity is not None
    for name in ("w1_scale", "w2_scale"):
        if not used_weight_scales and getattr(quant, name) is not None:
            raise ValueError(f"quant.{name} must be None for scheme {scheme} (its weights are not quantized)")
    for name in ("w1_zp", "w2_zp"):
        if scheme is not QuantScheme.INT4_W4A16 and getattr(quant, name) is not None:
            raise ValueError(f"quant.{name} must be None for scheme {scheme} (zero points are int4_w4a16 only)")
    for name in ("a1_scale", "a2_scale"):
        value = getattr(quant, name)
        if scheme.needs_static_act_scales:
            if value is None:
                raise ValueError(f"quant.{name} is required for scheme {scheme} (static activation scale)")
            _check_scalar_scale(value, f"quant.{name}", device)
        elif value is not None:
            raise ValueError(f"quant.{name} must be None for scheme {scheme} (only fp8_tensor_static "
                             f"takes static activation scales)")

    group_size = quant.group_size
    if scheme is QuantScheme.INT4_W4A16:
        if group_size is None:
            raise ValueError(f"quant.group_size is required for scheme {scheme}; one of {INT4_GROUP_SIZES}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quant.group_size must be one of {INT4_GROUP_SIZES}; got {group_size!r}")
        for dim_name, dim in (("K", K), ("I", I)):
            if dim % group_size:
                raise ValueError(f"quant.group_size must divide {dim_name} = {dim}; got {group_size}")
    elif group_size is not None:
        raise ValueError(f"quant.group_size must be None for scheme {scheme} (int4_w4a16 only); got {group_size!r}")

    if used_weight_scales:
        _check_weight_scale(quant.w1_scale, "quant.w1_scale", scheme, E, N, K, group_size, device)
        _check_weight_scale(quant.w2_scale, "quant.w2_scale", scheme, E, K, I, group_size, device)
    if quant.w1_zp is not None:
        _check_zero_point(quant.w1_zp, "quant.w1_zp", E, N, K, group_size, device)
    if quant.w2_zp is not None:
        _check_zero_point(quant.w2_zp, "quant.w2_zp", E, K, I, group_size, device)

    if quant.w1_bias is not None:
        _check_bias(quant.w1_bias, "quant.w1_bias", (E, N), "[E, N]", device)
    if quant.w2_bias is not None:
        _check_bias(quant.w2_bias, "quant.w2_bias", (E, K), "[E, K]", device)

    limit = quant.gemm1_clamp_limit
    if limit is not None:
        if activation is not Activation.SILU:
            raise ValueError(f"quant.gemm1_clamp_limit applies to activation silu only; got activation {activation}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (limit > 0 and math.isfinite(limit)):
            raise ValueError(f"quant.gemm1_clamp_limit must be a finite number > 0; got {limit!r}")


def _check_lora(lora: LoRASpec, *, M: int, K: int, N: int, I: int, E: int,
                activation: Activation, device: torch.device) -> None:
    if not isinstance(lora, LoRASpec):
        raise TypeError(f"lora must be a moe_validate.contract.spec.LoRASpec or None; got {type(lora).__name__}")
    if lora.stream not in LoRASpec.STREAMS:
        raise ValueError(f"lora.stream must be 'single' or 'dual'; got {lora.stream!r}")
    w2_a = _require_tensor(lora.w2_a, "lora.w2_a")
    if w2_a.dim() != 4:
        raise ValueError(f"lora.w2_a must be [L, E, r, I]; got {_shape(w2_a)}")
    L = w2_a.shape[0]

    def check_pair(a, b, a_name, b_name, in_dim, in_name, out_dim, out_name):
        a = _require_tensor(a, a_name)
        b = _require_tensor(b, b_name)
        for t, n in ((a, a_name), (b, b_name)):
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{n} must have dtype {_dtype_names(_FLOAT_DTYPES)}; got {t.dtype}")
            _require_device(t, n, device)
            _require_unit_last_stride(t, n)
            if t.dim() != 4:
                raise ValueError(f"{n} must be 4-D; got {_shape(t)}")
        rank = a.shape[2]
        if rank < 1:
            raise ValueError(f"{a_name} must have rank r >= 1; got {_shape(a)}")
        _require_shape(a, a_name, (L, E, rank, in_dim), f"[L, E, r, {in_name}] (L = {L} from lora.w2_a, E = {E})")
        _require_shape(b, b_name, (L, E, out_dim, rank),
                       f"[L, E, {out_name}, r] (r = {rank} from {a_name})")

    slices_a, slices_b = lora.w13_a, lora.w13_b
    if isinstance(slices_a, (tuple, list)) != isinstance(slices_b, (tuple, list)):
        raise TypeError("lora.w13_a and lora.w13_b must both be tensors (one slice) or both be pairs (gate, up)")
    if isinstance(slices_a, (tuple, list)):
        if len(slices_a) != 2 or len(slices_b) != 2:
            raise ValueError(f"lora.w13_a and lora.w13_b must hold one or two slices; got "
                             f"{len(slices_a)} and {len(slices_b)}")
        if not activation.is_gated:
            raise ValueError(f"lora.w13_a with two slices (gate, up) needs a gated activation; got {activation}")
        for i in range(2):
            check_pair(slices_a[i], slices_b[i], f"lora.w13_a[{i}]", f"lora.w13_b[{i}]", K, "K", N // 2, "N/2")
    else:
        check_pair(slices_a, slices_b, "lora.w13_a", "lora.w13_b", K, "K", N, "N")
    check_pair(lora.w2_a, lora.w2_b, "lora.w2_a", "lora.w2_b", I, "I", K, "K")

    ids = _require_tensor(lora.token_lora_ids, "lora.token_lora_ids")
    _require_dtype(ids, "lora.token_lora_ids", _ID_DTYPES)
    _require_device(ids, "lora.token_lora_ids", device)
    _require_shape(ids, "lora.token_lora_ids", (M,), "[M]")
    if lora.enabled is not None:
        enabled = _require_tensor(lora.enabled, "lora.enabled")
        _require_dtype(enabled, "lora.enabled", (torch.bool,))
        _require_device(enabled, "lora.enabled", device)
        _require_shape(enabled, "lora.enabled", (L,), "[L]")


def validate_call(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu", quant=None,
                  expert_map=None, global_num_experts=-1, apply_router_weight_on_input=False,
                  lora=None, a1q_scale=None) -> CallShape:
    """Check one fused-experts call against SPEC.md's "Bad input" list; return its CallShape.

    Raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for everything else; the
    message names the argument and states the expectation. Tensor values are never read.
    """
    hidden_states = _require_tensor(hidden_states, "hidden_states")
    w1 = _require_tensor(w1, "w1")
    w2 = _require_tensor(w2, "w2")
    topk_weights = _require_tensor(topk_weights, "topk_weights")
    topk_ids = _require_tensor(topk_ids, "topk_ids")

    act = Activation.parse(activation, "activation")
    if quant is None:
        quant = QuantConfig()
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a moe_validate.contract.spec.QuantConfig or None; got {type(quant).__name__}")
    scheme = QuantScheme.parse(quant.scheme, "quant.scheme")
    device = hidden_states.device

    # --- hidden_states --------------------------------------------------------------------
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [M, K] (2-D); got {_shape(hidden_states)}")
    M, K = hidden_states.shape
    prequantized = hidden_states.dtype in (torch.float8_e4m3fn, torch.int8)
    if scheme in (QuantScheme.INT8_W8A16, QuantScheme.INT4_W4A16):
        allowed_hidden = _HALF_DTYPES
    elif scheme is QuantScheme.NONE:
        allowed_hidden = _FLOAT_DTYPES
    else:
        allowed_hidden = _FLOAT_DTYPES + (scheme.act_dtype,)
    _require_dtype(hidden_states, "hidden_states", allowed_hidden, f"scheme {scheme}")
    if not hidden_states.is_contiguous():
        raise ValueError(f"hidden_states must be contiguous; got strides {tuple(hidden_states.stride())} "
                         f"for shape {_shape(hidden_states)}")
    if K < 1:
        raise ValueError(f"hidden_states must have K >= 1 columns; got {_shape(hidden_states)}")

    # --- weights ----------------------------------------------------------------------------
    packed = scheme is QuantScheme.INT4_W4A16
    if w1.dim() != 3:
        raise ValueError(f"w1 must be [E, N, K] (3-D); got {_shape(w1)}")
    if w2.dim() != 3:
        raise ValueError(f"w2 must be [E, K, I] (3-D); got {_shape(w2)}")
    weight_dtype = scheme.weight_dtype
    if weight_dtype is None:
        why = "unquantized weights have hidden_states' dtype"
        _require_dtype(w1, "w1", (hidden_states.dtype,), why)
        _require_dtype(w2, "w2", (hidden_states.dtype,), why)
    else:
        why = f"the weight dtype of scheme {scheme}" + (", two int4 values per byte" if packed else "")
        _require_dtype(w1, "w1", (weight_dtype,), why)
        _require_dtype(w2, "w2", (weight_dtype,), why)
    for t, n in ((w1, "w1"), (w2, "w2")):
        _require_device(t, n, device)
        _require_unit_last_stride(t, n)

    E = w1.shape[0]
    if E < 1:
        raise ValueError(f"w1 must have at least one expert; got {_shape(w1)}")
    k_factor = 2 if packed else 1
    if packed and K % 2:
        raise ValueError(f"hidden_states must have an even K for int4_w4a16 (two values per byte); got K = {K}")
    if w1.shape[2] * k_factor != K:
        what = "K/2 (packed int4)" if packed else "K"
        raise ValueError(f"w1 must be [E, N, {what}] with K = {K} (hidden_states.shape[1]); got {_shape(w1)}")
    N = w1.shape[1]
    I = w2.shape[2] * k_factor  # noqa: E741
    if w2.shape[0] != E or w2.shape[1] != K:
        what = "I/2 (packed int4)" if packed else "I"
        raise ValueError(f"w2 must be [E, K, {what}] with E = {E} (w1.shape[0]) and K = {K} "
                         f"(hidden_states.shape[1]); got {_shape(w2)}")
    expected_N = 2 * I if act.is_gated else I
    if N != expected_N or I < 1:
        rule = "N = 2*I for gated" if act.is_gated else "N = I for non-gated"
        raise ValueError(f"w1 must have N = {expected_N} rows ({rule} activation {act}, I = {I} from "
                         f"w2.shape[2]); got w1 {_shape(w1)}, w2 {_shape(w2)}")

    # --- routing ----------------------------------------------------------------------------
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise ValueError(f"topk_ids must be [M, topk] with M = {M}; got {_shape(topk_ids)}")
    topk = topk_ids.shape[1]
    if topk < 1:
        raise ValueError(f"topk_ids must have topk >= 1; got {_shape(topk_ids)}")
    _require_dtype(topk_ids, "topk_ids", _ID_DTYPES)
    _require_shape(topk_weights, "topk_weights", (M, topk), "[M, topk] like topk_ids")
    _require_dtype(topk_weights, "topk_weights", (torch.float32,))
    _require_device(topk_ids, "topk_ids", device)
    _require_device(topk_weights, "topk_weights", device)

    if isinstance(global_num_experts, bool) or not isinstance(global_num_experts, int):
        raise TypeError(f"global_num_experts must be an int; got {type(global_num_experts).__name__}")
    if global_num_experts == -1:
        global_num_experts = E
    if global_num_experts < 1:
        raise ValueError(f"global_num_experts must be -1 or >= 1; got {global_num_experts}")
    if expert_map is None:
        if global_num_experts != E:
            raise ValueError(f"global_num_experts must equal E = {E} (w1.shape[0]) without an expert_map; "
                             f"got {global_num_experts}")
    else:
        expert_map = _require_tensor(expert_map, "expert_map")
        _require_dtype(expert_map, "expert_map", _ID_DTYPES)
        _require_device(expert_map, "expert_map", device)
        _require_shape(expert_map, "expert_map", (global_num_experts,),
                       "[global_num_experts] (-1 resolves to E = w1.shape[0])")

    if not isinstance(apply_router_weight_on_input, bool):
        raise TypeError(f"apply_router_weight_on_input must be a bool; got {type(apply_router_weight_on_input).__name__}")
    if apply_router_weight_on_input and topk != 1:
        raise ValueError(f"apply_router_weight_on_input requires topk = 1; got topk = {topk}")

    # --- quantization -----------------------------------------------------------------------
    _check_quant(quant, scheme, E=E, N=N, K=K, I=I, activation=act, device=device)

    if prequantized:
        if a1q_scale is None:
            raise ValueError(f"a1q_scale is required when hidden_states is pre-quantized ({hidden_states.dtype})")
        a1q_scale = _require_tensor(a1q_scale, "a1q_scale")
        _require_dtype(a1q_scale, "a1q_scale", (torch.float32,), "scales are float32")
        _require_device(a1q_scale, "a1q_scale", device)
        expected = act_scale_shape(scheme, M, K)
        ok = _shape(a1q_scale) in ((), (1,)) if expected == (1,) else _shape(a1q_scale) == expected
        if not ok:
            raise ValueError(f"a1q_scale must be {expected} (the {scheme.act_granularity} activation scale of "
                             f"scheme {scheme}); got {_shape(a1q_scale)}")
        if apply_router_weight_on_input:
            raise ValueError("apply_router_weight_on_input needs unquantized hidden_states (the router weight "
                             f"is applied before quantization); got {hidden_states.dtype}")
        if lora is not None:
            raise ValueError(f"lora needs unquantized hidden_states (LoRA reads the unquantized input); "
                             f"got {hidden_states.dtype}")
    elif a1q_scale is not None:
        raise ValueError(f"a1q_scale must be None unless hidden_states is pre-quantized (fp8/int8); "
                         f"got hidden_states {hidden_states.dtype}")

    if lora is not None:
        _check_lora(lora, M=M, K=K, N=N, I=I, E=E, activation=act, device=device)

    return CallShape(M=M, K=K, N=N, I=I, E=E, topk=topk, global_num_experts=global_num_experts,
                     storage_dtype=storage_dtype(hidden_states.dtype), activation=act, scheme=scheme,
                     quant=quant, gated=act.is_gated)


def validate_index_values(E: int, *, expert_map=None, lora=None, quant=None) -> None:
    """Check the tensors whose values must lie in range; the kernels and the reference both call it.

    ``expert_map`` entries must be -1 (not local) or a local expert in [0, E); LoRA
    ``token_lora_ids`` must be -1 (no adapter) or in [0, L); int4 zero points (``quant.w1_zp``,
    ``quant.w2_zp``) must be in 0..15. Call after ``validate_call``.

    Cost: reading values is a device sync. All the minima and maxima are gathered into one small
    tensor and read once, so a call costs one sync (none when no such tensor is given): on a GPU,
    a few microseconds against a launch sequence of tens.
    """
    checks = []  # (name, tensor, lowest allowed, highest allowed, what is allowed)
    if expert_map is not None and expert_map.numel():
        checks.append(("expert_map", expert_map, -1, E - 1, f"-1 (not local) or local expert ids in [0, {E})"))
    if lora is not None and lora.token_lora_ids.numel():
        L = lora.num_adapters
        checks.append(("lora.token_lora_ids", lora.token_lora_ids, -1, L - 1, f"-1 (no adapter) or in [0, {L})"))
    for name in ("w1_zp", "w2_zp"):
        zp = getattr(quant, name, None) if quant is not None else None
        if zp is not None and zp.numel():
            checks.append((f"quant.{name}", zp, 0, 15, "int4 zero points in 0..15 (SPEC.md, int4_w4a16)"))
    if not checks:
        return
    if any(t.is_cuda for _, t, _, _, _ in checks) and torch.cuda.is_current_stream_capturing():
        # Reading values is a host sync, which a CUDA graph capture forbids. The captured call
        # replays the shapes and tensors of an eager call made before capture (that is how graph
        # capture is used), and that eager call checked them.
        return
    by_device = {}
    for check in checks:
        by_device.setdefault(check[1].device, []).append(check)
    for group in by_device.values():
        extremes = torch.stack([torch.stack([t.min().to(torch.int64), t.max().to(torch.int64)])
                                for _, t, _, _, _ in group]).tolist()  # the one read (sync) per device
        for (name, _, low, high, allowed), (lo, hi) in zip(group, extremes):
            if lo < low or hi > high:
                raise ValueError(f"{name} values must be {allowed}; got range [{lo}, {hi}]")
