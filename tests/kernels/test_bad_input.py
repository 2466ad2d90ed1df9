"""Bad input (SPEC.md): a clear ValueError/TypeError naming the argument, before any launch.

The shared checks (moe_validate.contract.checks.validate_call) are exercised through kernels.fused_experts
for a representative set; the kernel-only checks (device, interpreter, capability, config,
workspaces) in full.
"""

import dataclasses

import pytest
import torch

import kernels
import kernels.experts as experts_module
from kernel_test_support import DEVICE, make_problem, requires_triton_device, run_kernel, zero_lora
from moe_validate.contract.spec import QuantConfig, QuantScheme

pytestmark = requires_triton_device


@pytest.fixture
def p():
    return make_problem(seed=61, dtype=torch.bfloat16, M=4, K=32, I=16, E=3, topk=2)


def call(p, **over):
    args = dict(zip(("hidden_states", "w1", "w2", "topk_weights", "topk_ids"), p.args()))
    kw = dict(p.kwargs)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return kernels.fused_experts(*args.values(), **kw)


@pytest.mark.parametrize("change,exc,match", [
    (lambda p: dict(hidden_states=p.x[None]), ValueError, "hidden_states must be"),
    (lambda p: dict(w1=p.w1[:, :, :-1]), ValueError, "w1 must be"),
    (lambda p: dict(w2=p.w2[:, :-1]), ValueError, "w2 must be"),
    (lambda p: dict(w1=p.w1[:, :-2]), ValueError, "w1 must have N"),
    (lambda p: dict(hidden_states=p.x.float()), TypeError, "w1 must have dtype"),
    (lambda p: dict(hidden_states=p.x.t().contiguous().t()[:, :]), ValueError, "contiguous"),
    (lambda p: dict(w1=p.w1.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "unit stride"),
    (lambda p: dict(topk_weights=p.topk_weights[:, :1]), ValueError, "topk_weights"),
    (lambda p: dict(topk_ids=p.topk_ids.float()), TypeError, "topk_ids"),
    (lambda p: dict(apply_router_weight_on_input=True), ValueError, "topk = 1"),
    (lambda p: dict(activation="swish"), ValueError, "activation must be one of"),
    (lambda p: dict(quant=QuantConfig("fp8_block128")), (ValueError, TypeError), "w1"),
    (lambda p: dict(global_num_experts=7), ValueError, "global_num_experts"),
    (lambda p: dict(config=kernels.KernelConfig(16, 48, 32)), ValueError, "power of two"),
    (lambda p: dict(config="BM16"), TypeError, "config must be"),
], ids=["rank", "K_mismatch", "w2_K", "N_vs_I", "dtype", "noncontig_x", "stride_w1", "topk_w",
        "ids_dtype", "router_on_input_topk2", "activation", "scales_missing", "gne", "config_pow2",
        "config_type"])
def test_rejected(p, change, exc, match):
    if "noncontig" in match or match == "contiguous":
        x = torch.empty(p.x.shape[1], p.x.shape[0], dtype=p.x.dtype, device=p.x.device).t()
        change = lambda p: dict(hidden_states=x)  # noqa: E731
    with pytest.raises(exc, match=match):
        call(p, **change(p))


def test_cpu_tensors_without_interpreter(p, monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only reach this check on a CPU run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        run_kernel(p)


def test_scheme_unsupported_on_device(monkeypatch):
    p = make_problem(seed=62, dtype=torch.bfloat16, scheme="fp8_channel_token", M=2, K=128, I=64, E=2, topk=1)
    monkeypatch.setattr(experts_module, "_device_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match="needs compute capability"):
        run_kernel(p)


def test_supports_quant_scheme_is_device_aware(monkeypatch):
    ex = kernels.TritonExperts()
    keys = QuantScheme.FP8_BLOCK128.quant_keys
    assert ex.supports_quant_scheme(None, None)
    assert not ex.supports_quant_scheme("kNoSuchKey", None)
    monkeypatch.setattr(experts_module, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert not ex.supports_quant_scheme(*keys)
    assert ex.supports_quant_scheme(*QuantScheme.INT8_CHANNEL_TOKEN.quant_keys)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert ex.supports_quant_scheme(*keys)
    assert all(ex.supports_activation(a) for a in ("silu", "swigluoai", "relu2_no_mul"))
    assert not ex.supports_activation("swish")


def test_workspace_too_small_and_wrong_dtype(p):
    ex = kernels.TritonExperts()
    ws13, ws2, out = ex.workspace_shapes(4, 32, 32, 2, 3, 3, None, "silu")
    assert ws13 == (8, 32) and ws2 == (8, 16) and out == (4, 32)
    o = torch.empty(out, dtype=torch.bfloat16, device=DEVICE)
    small = torch.empty(3, 32, dtype=torch.bfloat16, device=DEVICE)
    good2 = torch.empty(ws2, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="workspace13 must hold"):
        ex.apply(o, *p.args(), "silu", -1, None, None, None, small, good2, None, False)
    with pytest.raises(TypeError, match="workspace2 must have the storage dtype"):
        ex.apply(o, *p.args(), "silu", -1, None, None, None, torch.empty(ws13, dtype=torch.bfloat16, device=DEVICE),
                 good2.float(), None, False)
    with pytest.raises(ValueError, match="output must be"):
        ex.apply(o[:2], *p.args(), "silu", -1, None, None, None, small, good2, None, False)


def test_fp8_tensor_scale_wrong_shape():
    p = make_problem(seed=63, dtype=torch.bfloat16, scheme="fp8_tensor_token", M=2, K=128, I=64, E=2, topk=1)
    q = p.kwargs["quant"]
    bad = QuantConfig(**{**q.__dict__, "w1_scale": q.w1_scale.view(-1, 1)})
    with pytest.raises(ValueError, match="w1_scale"):
        call(p, quant=bad)


# --- index values: rejected by the kernels exactly as by the reference (one shared check) -----
def _bad_expert_map(value):
    def change(p):
        p.kwargs["expert_map"] = p.kwargs["expert_map"].clone()
        p.kwargs["expert_map"][1] = value  # an odd (not local) global id mapped out of range
        return p
    return change


def _bad_lora_id(value):
    def change(p):
        lora = zero_lora(p)
        lora.token_lora_ids[0] = value
        p.kwargs["lora"] = lora
        return p
    return change


def _bad_zero_point(p):
    zp = p.kwargs["quant"].w1_zp.clone()
    zp[0, 0, 0] = 200  # SPEC: uint8 in 0..15
    p.kwargs["quant"] = dataclasses.replace(p.kwargs["quant"], w1_zp=zp)
    return p


@pytest.mark.parametrize("problem, change, match", [
    (dict(expert_map=True), _bad_expert_map(3), r"expert_map values must be -1 \(not local\) or local expert ids "
                                                r"in \[0, 3\); got range \[-1, 3\]"),
    (dict(expert_map=True), _bad_expert_map(-2), r"expert_map values .* got range \[-2, 2\]"),
    (dict(), _bad_lora_id(1), r"lora.token_lora_ids values must be -1 \(no adapter\) or in \[0, 1\); got range \[0, 1\]"),
    (dict(), _bad_lora_id(-5), r"lora.token_lora_ids values .* got range \[-5, 0\]"),
    (dict(scheme="int4_w4a16", group_size=32, zero_point=True, dtype=torch.float16), _bad_zero_point,
     r"quant.w1_zp values must be int4 zero points in 0..15 .*got range \[\d+, 200\]"),
], ids=["expert_map_high", "expert_map_low", "lora_id_high", "lora_id_low", "int4_zero_point_200"])
def test_index_values_are_rejected_as_the_reference_does(problem, change, match):
    import reference

    p = change(make_problem(seed=62, M=4, K=64, I=32, E=3, topk=2, **problem))
    with pytest.raises(ValueError, match=match) as from_kernels:
        run_kernel(p)
    with pytest.raises(ValueError) as from_reference:
        reference.fused_experts(*p.args(), **p.kwargs)
    assert str(from_kernels.value) == str(from_reference.value)
