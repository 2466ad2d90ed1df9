"""SPEC.md "Bad input": each item raises ValueError/TypeError naming the argument.

Every case starts from one valid call (``_valid_call``), breaks exactly one thing, and checks
the exception type and that the message names the argument. The checks live in
``moe_validate.contract.checks.validate_call`` (shared with the kernels); the reference calls it first.
"""

import math

import pytest
import torch

import reference
from moe_validate.contract.checks import CallShape, validate_call
from moe_validate.contract.spec import Activation, LoRASpec, QuantConfig, QuantScheme

M, K, I, E, TOPK, L, R = 4, 128, 64, 3, 2, 2, 4


def _valid_call(scheme="none", activation="silu", dtype=torch.bfloat16):
    scheme = QuantScheme(scheme)
    N = 2 * I if Activation(activation).is_gated else I
    x = torch.randn(M, K).to(dtype)
    w1, w2 = torch.randn(E, N, K) * 0.1, torch.randn(E, K, I) * 0.1
    group = 64 if scheme is QuantScheme.INT4_W4A16 else None
    extra = {}
    if scheme.needs_static_act_scales:
        extra = dict(a1_scale=torch.tensor(0.01), a2_scale=torch.tensor([0.01]))
    if scheme is QuantScheme.NONE:
        w1, w2 = w1.to(dtype), w2.to(dtype)
        quant = QuantConfig()
    else:
        w1, s1, _ = reference.quantize_weights(w1, scheme, group_size=group)
        w2, s2, _ = reference.quantize_weights(w2, scheme, group_size=group)
        quant = QuantConfig(scheme, w1_scale=s1, w2_scale=s2, group_size=group, **extra)
    args = dict(hidden_states=x, w1=w1, w2=w2, topk_weights=torch.rand(M, TOPK),
                topk_ids=torch.randint(0, E, (M, TOPK), dtype=torch.int32))
    kwargs = dict(activation=activation, quant=quant)
    return args, kwargs


def _lora_spec(N=2 * I, two=False):
    a = lambda *s: torch.randn(*s).to(torch.bfloat16)
    if two:
        w13_a, w13_b = (a(L, E, R, K), a(L, E, R, K)), (a(L, E, N // 2, R), a(L, E, N // 2, R))
    else:
        w13_a, w13_b = a(L, E, R, K), a(L, E, N, R)
    return LoRASpec(w13_a, w13_b, a(L, E, R, I), a(L, E, K, R), torch.zeros(M, dtype=torch.int32))


def _call(args, kwargs):
    return validate_call(args["hidden_states"], args["w1"], args["w2"], args["topk_weights"], args["topk_ids"],
                         **kwargs)


def test_valid_calls_pass_for_every_scheme():
    for scheme in QuantScheme:
        args, kwargs = _valid_call(scheme.value, dtype=torch.bfloat16)
        shape = _call(args, kwargs)
        assert isinstance(shape, CallShape)
        assert (shape.M, shape.K, shape.N, shape.I, shape.E, shape.topk) == (M, K, 2 * I, I, E, TOPK)
        assert shape.scheme is scheme and shape.global_num_experts == E and shape.gated


def test_padded_weight_strides_are_accepted():
    args, kwargs = _valid_call()
    padded = torch.zeros(E, 2 * I, K + 16, dtype=torch.bfloat16)[:, :, :K]
    padded.copy_(args["w1"])
    args["w1"] = padded
    assert _call(args, kwargs).K == K
    out = reference.fused_experts(**args, **kwargs)
    assert out.shape == (M, K)


# Each entry: (id, breaker(args, kwargs) -> None, exception type, text the message must contain).
def _set(key, value):
    def breaker(args, kwargs):
        target = args if key in args else kwargs
        target[key] = value(args, kwargs) if callable(value) else value
    return breaker


def _set_quant(field, value):
    def breaker(args, kwargs):
        setattr(kwargs["quant"], field, value(args, kwargs) if callable(value) else value)
    return breaker


def _scheme(scheme, breaker, activation="silu", dtype=torch.bfloat16):
    """Build the valid call of another scheme first, then break it."""
    def build():
        args, kwargs = _valid_call(scheme, activation, dtype)
        breaker(args, kwargs)
        return args, kwargs
    return build


def _with_lora(mutate=lambda lora: None, activation="silu", two=False):
    def breaker(args, kwargs):
        N = 2 * I if Activation(activation).is_gated else I
        lora = _lora_spec(N, two)
        mutate(lora)
        kwargs["lora"] = lora
        kwargs["activation"] = activation
        if not Activation(activation).is_gated:
            args["w1"] = args["w1"][:, :I].contiguous()
    return breaker


BAD = [
    # shapes and ranks
    ("hidden_states_rank", _set("hidden_states", torch.randn(M, K, 1).to(torch.bfloat16)), ValueError, "hidden_states"),
    ("w1_rank", _set("w1", lambda a, k: a["w1"][0]), ValueError, "w1"),
    ("w2_rank", _set("w2", lambda a, k: a["w2"].reshape(E, -1)), ValueError, "w2"),
    ("K_mismatch_w1", _set("w1", lambda a, k: a["w1"][:, :, :64].contiguous()), ValueError, "w1"),
    ("K_mismatch_w2", _set("w2", lambda a, k: a["w2"][:, :64].contiguous()), ValueError, "w2"),
    ("E_mismatch_w2", _set("w2", lambda a, k: a["w2"][:2].contiguous()), ValueError, "w2"),
    ("N_not_2I", _set("w1", lambda a, k: a["w1"][:, :I + 2].contiguous()), ValueError, "w1"),
    ("N_not_I_for_no_mul", _set("activation", "silu_no_mul"), ValueError, "N = I"),
    # dtypes
    ("hidden_states_dtype", _set("hidden_states", lambda a, k: a["hidden_states"].double()), TypeError, "hidden_states"),
    ("w1_dtype_differs", _set("w1", lambda a, k: a["w1"].half()), TypeError, "w1"),
    ("w2_dtype_differs", _set("w2", lambda a, k: a["w2"].float()), TypeError, "w2"),
    ("quant_weight_dtype", _scheme("fp8_channel_token", _set("w1", lambda a, k: a["w1"].to(torch.int8))),
     TypeError, "w1"),
    ("w8a16_needs_half_hidden", _scheme("int8_w8a16", lambda a, k: None, dtype=torch.float32), TypeError,
     "hidden_states"),
    ("prequantized_wrong_dtype", _scheme("fp8_tensor_token", _set("hidden_states", lambda a, k:
                                         a["hidden_states"].to(torch.int8))), TypeError, "hidden_states"),
    # strides
    ("w1_last_stride", _set("w1", lambda a, k: a["w1"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "w1"),
    ("w2_last_stride", _set("w2", lambda a, k: a["w2"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "w2"),
    ("hidden_states_not_contiguous", _set("hidden_states", lambda a, k: torch.zeros(M, 2 * K, dtype=torch.bfloat16)[:, ::2]),
     ValueError, "hidden_states"),
    ("hidden_states_row_padding", _set("hidden_states", lambda a, k: torch.zeros(M, K + 8, dtype=torch.bfloat16)[:, :K]),
     ValueError, "contiguous"),
    # routing
    ("topk_weights_shape", _set("topk_weights", torch.rand(M, TOPK + 1)), ValueError, "topk_weights"),
    ("topk_weights_dtype", _set("topk_weights", torch.rand(M, TOPK).half()), TypeError, "topk_weights"),
    ("topk_ids_dtype", _set("topk_ids", lambda a, k: a["topk_ids"].float()), TypeError, "topk_ids"),
    ("topk_ids_rows", _set("topk_ids", torch.zeros(M + 1, TOPK, dtype=torch.int32)), ValueError, "topk_ids"),
    ("router_on_input_topk2", _set("apply_router_weight_on_input", True), ValueError, "apply_router_weight_on_input"),
    ("expert_map_length", lambda a, k: k.update(expert_map=torch.tensor([0, 1, 2, -1]), global_num_experts=5),
     ValueError, "expert_map"),
    ("expert_map_dtype", lambda a, k: k.update(expert_map=torch.tensor([0., 1., 2.])), TypeError, "expert_map"),
    ("global_experts_without_map", _set("global_num_experts", 7), ValueError, "global_num_experts"),
    # scales, zero points, biases, group size
    ("block_scale_as_tensor", _scheme("fp8_block128", _set_quant("w1_scale", torch.ones(E))), ValueError,
     "quant.w1_scale"),
    ("block_scale_dtype", _scheme("fp8_block128", _set_quant("w2_scale", lambda a, k: k["quant"].w2_scale.half())),
     TypeError, "quant.w2_scale"),
    ("channel_scale_shape", _scheme("fp8_channel_token", _set_quant("w1_scale", torch.ones(E, 2 * I, 1))), ValueError,
     "quant.w1_scale"),
    ("tensor_scale_shape", _scheme("fp8_tensor_token", _set_quant("w2_scale", torch.ones(E, 1))), ValueError,
     "quant.w2_scale"),
    ("missing_weight_scale", _scheme("int8_channel_token", _set_quant("w1_scale", None)), ValueError, "quant.w1_scale"),
    ("static_without_a1_scale", _scheme("fp8_tensor_static", _set_quant("a1_scale", None)), ValueError, "quant.a1_scale"),
    ("static_without_a2_scale", _scheme("fp8_tensor_static", _set_quant("a2_scale", None)), ValueError, "quant.a2_scale"),
    ("static_scale_shape", _scheme("fp8_tensor_static", _set_quant("a1_scale", torch.ones(2))), ValueError,
     "quant.a1_scale"),
    ("a1_scale_on_dynamic_scheme", _scheme("fp8_tensor_token", _set_quant("a1_scale", torch.ones(1))), ValueError,
     "quant.a1_scale"),
    ("scale_for_unquantized", _set_quant("w1_scale", torch.ones(E)), ValueError, "quant.w1_scale"),
    ("int4_group_size_bad", _scheme("int4_w4a16", _set_quant("group_size", 48)), ValueError, "quant.group_size"),
    ("int4_group_size_missing", _scheme("int4_w4a16", _set_quant("group_size", None)), ValueError, "quant.group_size"),
    ("int4_group_not_dividing_I", _scheme("int4_w4a16", lambda a, k: (
        a.update(w1=a["w1"][:, :96].contiguous(), w2=a["w2"][:, :, :24].contiguous()),
        setattr(k["quant"], "w1_scale", k["quant"].w1_scale[:, :96]),
        setattr(k["quant"], "w2_scale", torch.ones(E, K, 1)))), ValueError, "quant.group_size"),
    ("int4_zero_point_dtype", _scheme("int4_w4a16", _set_quant("w1_zp", torch.zeros(E, 2 * I, K // 64))),
     TypeError, "quant.w1_zp"),
    ("int4_zero_point_shape", _scheme("int4_w4a16", _set_quant("w2_zp", torch.zeros(E, K, 2, dtype=torch.uint8))),
     ValueError, "quant.w2_zp"),
    ("zero_point_on_int8", _scheme("int8_w8a16", _set_quant("w1_zp", torch.zeros(E, 2 * I, 1, dtype=torch.uint8))),
     ValueError, "quant.w1_zp"),
    ("group_size_on_fp8", _scheme("fp8_channel_token", _set_quant("group_size", 64)), ValueError, "quant.group_size"),
    ("w1_bias_shape", _set_quant("w1_bias", torch.zeros(E, I)), ValueError, "quant.w1_bias"),
    ("w2_bias_dtype", _set_quant("w2_bias", torch.zeros(E, K, dtype=torch.int32)), TypeError, "quant.w2_bias"),
    ("prequantized_without_scale", _scheme("fp8_channel_token", _set("hidden_states", lambda a, k:
                                           a["hidden_states"].to(torch.float8_e4m3fn))), ValueError, "a1q_scale"),
    ("a1q_scale_shape", _scheme("fp8_block128", lambda a, k: (
        a.update(hidden_states=a["hidden_states"].to(torch.float8_e4m3fn)), k.update(a1q_scale=torch.ones(M, 2)))),
        ValueError, "a1q_scale"),
    ("a1q_scale_without_prequantized", _set("a1q_scale", torch.ones(M, 1)), ValueError, "a1q_scale"),
    # activation
    ("activation_unknown", _set("activation", "swish"), ValueError, "activation"),
    ("clamp_limit_non_silu", lambda a, k: (k.update(activation="gelu"), setattr(k["quant"], "gemm1_clamp_limit", 7.0)),
     ValueError, "quant.gemm1_clamp_limit"),
    ("clamp_limit_not_positive", _set_quant("gemm1_clamp_limit", -1.0), ValueError, "quant.gemm1_clamp_limit"),
    ("quant_wrong_type", _set("quant", {"scheme": "none"}), TypeError, "quant"),
    # LoRA
    ("lora_rank_mismatch", _with_lora(lambda l: setattr(l, "w13_b", l.w13_b[..., :R - 1])), ValueError, "lora.w13_b"),
    ("lora_w13_N", _with_lora(lambda l: setattr(l, "w13_b", l.w13_b[:, :, :I])), ValueError, "lora.w13_b"),
    ("lora_w13_K", _with_lora(lambda l: setattr(l, "w13_a", l.w13_a[..., :K - 1])), ValueError, "lora.w13_a"),
    ("lora_num_adapters", _with_lora(lambda l: setattr(l, "w2_b", l.w2_b[:1])), ValueError, "lora.w2_b"),
    ("lora_num_experts", _with_lora(lambda l: setattr(l, "w13_a", l.w13_a[:, :2])), ValueError, "lora.w13_a"),
    ("lora_w2_I", _with_lora(lambda l: setattr(l, "w2_a", l.w2_a[..., :I - 1])), ValueError, "lora.w2_a"),
    ("lora_two_slices_shape", _with_lora(lambda l: setattr(l, "w13_b", (l.w13_b[0], l.w13_b[1][:, :, :3])), two=True),
     ValueError, "lora.w13_b[1]"),
    ("lora_two_slices_non_gated", _with_lora(activation="relu2_no_mul", two=True), ValueError, "lora.w13_a"),
    ("lora_token_ids_length", _with_lora(lambda l: setattr(l, "token_lora_ids", torch.zeros(M + 1, dtype=torch.int32))),
     ValueError, "lora.token_lora_ids"),
    ("lora_token_ids_dtype", _with_lora(lambda l: setattr(l, "token_lora_ids", torch.zeros(M))), TypeError,
     "lora.token_lora_ids"),
    ("lora_enabled_shape", _with_lora(lambda l: setattr(l, "enabled", torch.ones(L + 1, dtype=torch.bool))),
     ValueError, "lora.enabled"),
    ("lora_stream", _with_lora(lambda l: object.__setattr__(l, "stream", "triple")), ValueError, "lora.stream"),
    ("lora_wrong_type", _set("lora", {"w13_a": None}), TypeError, "lora"),
    ("lora_with_prequantized", _scheme("fp8_channel_token", lambda a, k: (
        _with_lora()(a, k), a.update(hidden_states=a["hidden_states"].to(torch.float8_e4m3fn)),
        k.update(a1q_scale=torch.ones(M, 1)))), ValueError, "lora"),
]


@pytest.mark.parametrize("build, exc, text", [pytest.param(b, e, t, id=i) for i, b, e, t in BAD])
def test_bad_input_is_refused_with_a_named_argument(build, exc, text):
    if getattr(build, "__name__", "") == "build":  # built from another scheme's valid call
        args, kwargs = build()
    else:
        args, kwargs = _valid_call()
        build(args, kwargs)
    with pytest.raises(exc) as info:
        _call(args, kwargs)
    assert text in str(info.value), str(info.value)
    # The reference refuses the same call, before computing anything.
    with pytest.raises(exc):
        reference.fused_experts(**args, **kwargs)


def test_message_states_the_expectation():
    args, kwargs = _valid_call()
    args["w1"] = torch.zeros(8, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"w1 must be \[E, N, K\] with K = 128 \(hidden_states.shape\[1\]\); "
                                         r"got \(8, 256, 64\)"):
        _call(args, kwargs)


def test_ids_and_values_are_never_read():
    """Invalid expert ids are data, not bad input (SPEC: padded rows may hold any integer)."""
    args, kwargs = _valid_call()
    args["topk_ids"] = torch.tensor([[-1, 2**31 - 1]] * M, dtype=torch.int32)
    args["hidden_states"] = torch.full((M, K), math.nan).to(torch.bfloat16)
    assert _call(args, kwargs).M == M


def test_index_values_check_is_separate_and_named():
    """validate_index_values reads values (one sync); validate_call never does."""
    from moe_validate.contract.checks import validate_index_values

    validate_index_values(3, expert_map=torch.tensor([-1, 0, 2]))
    with pytest.raises(ValueError, match="expert_map"):
        validate_index_values(3, expert_map=torch.tensor([0, 3]))
    lora = _lora_spec()
    lora.token_lora_ids = torch.tensor([-1, 0, 1, L], dtype=torch.int32)
    with pytest.raises(ValueError, match="lora.token_lora_ids"):
        validate_index_values(E, lora=lora)
    lora.token_lora_ids = torch.tensor([-2, 0, 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="lora.token_lora_ids"):
        validate_index_values(E, lora=lora)
