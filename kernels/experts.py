"""TritonExperts: the fused-experts pipeline of SPEC.md ("Pipeline") on Triton kernels.

    out[m] = round_S( sum_{valid j} round_S( (W2[e] . act(round_S(W1[e] . x[m] + b1)) + b2) * w[m, j] ) )

Stages (each its own kernel, all on the caller's stream, no host synchronisation):
  route experts (+ counts) -> align (or the tiny-M naive path) -> [quantize x] -> GEMM1 into the
  route-major c1 [R, N] (+ LoRA w13) -> activation into c2 [R, I] -> [requantize c2] (or the
  fused silu+fp8-group quant) -> GEMM2 into the route-major c3 [R, K] (+ LoRA w2) -> moe_sum.
Without LoRA (which adds into c1 before the activation), GEMM1 applies the activation in its
epilogue and writes c2 directly (one launch and the c1 round trip saved; bitwise the same, see
``kernels.grouped_gemm``): ``fuse_activation``. For silu + fp8_block128 (no clamp) the epilogue
goes on to the fused fp8 group quantization and writes c2's fp8 codes and per-(row, 128 columns)
scales, what ``silu_and_mul_quant_fp8_group`` would make of c1; that needs GEMM1's
``(config.BLOCK_N // 2) % 128 == 0`` (a program owns whole scale groups: BLOCK_N = 256), and
with a narrower config the two-kernel path runs. On the tiny-M naive path without LoRA (which adds
its w2 delta into c3 before the sum), GEMM2 sums each token's topk slots itself and writes the
output: one program per (token, column tile) runs every valid slot's tile through the code of the
unfused GEMM2 and adds the S-rounded values in slot order as ``moe_sum`` does (bitwise the same,
see ``kernels.grouped_gemm``): ``fuse_topk_sum``; c3 is then never written and moe_sum never
launched. That grid has topk times fewer programs, so on a GPU "auto" fuses only where two
programs per SM remain (at M=1 the lost parallelism costs more than the moe_sum launch saved). c1 and c3 share ``workspace13`` (c1 is dead once the activation has read it); c2 lives
in ``workspace2``. The workspace shapes do not depend on the fusions (c1 or c3 is then simply
unused; the fp8 codes and scales get their own buffers on both paths). Only rows of valid routes
are ever written or read, so NaN-poisoned workspaces and outputs are harmless; tokens without a
valid route get exact zeros from ``moe_sum`` or the fused sum.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Tuple, Union

import torch
import triton

from kernels.activation import apply_activation
from kernels.align import align_routes, route_experts
from kernels.configs import (ConfigSource, Gemm2Tiles, KernelConfig, batch_invariant_config, check_config,
                             fp8_accumulation, lookup_config)
from kernels.grouped_gemm import fp8_group_quant_blocker, invoke_grouped_gemm
from kernels.lora import apply_lora_w13, apply_lora_w2
from kernels.moe_sum import moe_sum
from kernels.quantize import ACT_GROUP_SIZE, fp8_group_outputs, quantize_activation, silu_and_mul_quant_fp8_group
from moe_validate.contract.checks import CallShape, validate_call, validate_index_values
from moe_validate.contract.profile import Fp8Accumulation
from moe_validate.contract.rules import fused_silu_fp8_group, interpreting, takes_naive_path
from moe_validate.contract.spec import Activation, QuantConfig, QuantScheme

__all__ = ["TritonExperts", "fused_experts", "Paths", "PathSwitches", "AlternativePath"]

# The fused top-k sum runs one GEMM2 program per (token, column tile), each streaming its topk
# weight tiles one after another: topk times fewer programs than the unfused GEMM2. "auto" fuses
# only where at least this many programs per SM remain. H100 bench (fused vs GEMM2 + moe_sum, with
# PDL): at M=1 every model lost (Qwen3 bf16 54 vs 38 us with 32 programs, DeepSeek-V3 fp8 144 vs
# 137 us with 112, gpt-oss bf16 93 vs 81 us with 90); at M=4 it won 2-4% with 360-448 programs
# (DeepSeek-V3, its tp8 shape, gpt-oss) and lost 3% with 128 (Qwen3).
_FUSED_SUM_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class Paths:
    """The internal paths one call takes (``TritonExperts.last_*`` after ``apply``)."""

    assignment: str  # "naive" (one route per tile) or "aligned"
    fused_activation: bool  # the activation in GEMM1's epilogue (c1 never written)
    fused_topk_sum: bool  # the top-k sum in GEMM2 (c3 never written, no moe_sum)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PathSwitches:
    """The ``TritonExperts`` switches, and the launch config, that select a path."""

    assignment: str = "auto"
    fuse_activation: Union[str, bool] = "auto"
    fuse_topk_sum: Union[str, bool] = "auto"
    config: Optional[KernelConfig] = None  # None: the call's own config


@dataclass(frozen=True)
class AlternativePath:
    """A path the default call does not take; it must give the default's bits. ``versus`` set: the
    path runs at another config, which may move accumulation order, so it is compared with the
    run at ``versus`` (the default path at that config) instead of the default run."""

    label: str
    switches: PathSwitches
    takes: Paths  # what the call with ``switches`` takes
    versus: Optional[PathSwitches] = None


def _tensors_of(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_of(v)


def _check_devices(hidden_states: torch.Tensor, named) -> None:
    """Every tensor on hidden_states' device, and a device Triton can run on."""
    device = hidden_states.device
    for name, value in named:
        for t in _tensors_of(value):
            if t.device != device:
                raise ValueError(f"{name} must be on the device of hidden_states ({device}); got {t.device}")
    if device.type == "cpu" and not interpreting():
        raise ValueError("hidden_states is a CPU tensor: the Triton kernels run on CPU only through the "
                         "interpreter; set TRITON_INTERPRET=1 before importing triton, or move the tensors to CUDA")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"hidden_states must be on a CUDA device (or CPU with TRITON_INTERPRET=1); got {device}")


def _device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_capability(device)
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fused_sum_fills_the_gpu(M: int, K: int, gemm2_config: KernelConfig, device: torch.device) -> bool:
    """Whether the fused top-k sum's GEMM2 grid (M * cdiv(K, BLOCK_N) programs) has at least
    ``_FUSED_SUM_PROGRAMS_PER_SM`` programs per SM. Under the interpreter there are no SMs: True,
    so "auto" fuses wherever it can and the CPU suites run the fused path."""
    if device.type != "cuda" or interpreting():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    programs = M * triton.cdiv(K, gemm2_config.BLOCK_N)
    return programs >= _FUSED_SUM_PROGRAMS_PER_SM * _sm_count(index)


def _scheme_supported(scheme: QuantScheme, capability: Optional[Tuple[int, int]]) -> bool:
    need = scheme.min_capability
    return need is None or capability is None or tuple(capability) >= need


def _resolve_config(config, M, E, N, K, topk, dtype, scheme, group_size,
                    batch_invariant, I: Optional[int] = None) -> Tuple[KernelConfig, ConfigSource]:
    if config is not None:
        if isinstance(config, dict):
            config = KernelConfig.from_dict(config)
        if not isinstance(config, KernelConfig):
            raise TypeError(f"config must be a kernels.KernelConfig or a dict; got {type(config).__name__}")
        source = ConfigSource("given")
    elif batch_invariant:
        config, source = batch_invariant_config(dtype, scheme, group_size), ConfigSource("batch_invariant")
    else:
        config, source = lookup_config(M, E, N, K, topk, dtype, scheme, group_size=group_size, intermediate_size=I)
    check_config(config, scheme, group_size)
    return config, source


def _flat_view(workspace: torch.Tensor, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    if workspace.dtype != dtype:
        raise TypeError(f"{name} must have the storage dtype {dtype}; got {workspace.dtype}")
    if not workspace.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is reinterpreted as [{rows}, {cols}])")
    if workspace.numel() < rows * cols:
        raise ValueError(f"{name} must hold at least {rows}*{cols} elements (see workspace_shapes); "
                         f"got shape {tuple(workspace.shape)}")
    return workspace.view(-1)[: rows * cols].view(rows, cols)


class TritonExperts:
    """The modular experts object (mirrors vLLM's TritonExperts): workspaces + apply."""

    def __init__(self, quant_config: Optional[QuantConfig] = None, *, assignment: str = "auto",
                 fuse_activation="auto", fuse_topk_sum="auto"):
        """``assignment``: "auto" | "naive" | "aligned" (route-to-tile path; auto by sparsity).
        ``fuse_activation``: "auto" (fuse the activation into GEMM1 wherever it can be: no LoRA;
        for silu + fp8_block128, where GEMM1's config has (BLOCK_N // 2) % 128 == 0, together
        with the fp8 group quantization), True (the same, and a call that cannot be fused raises
        ValueError with the reason) or False (always GEMM1 -> c1 -> activation kernel, or the
        separate silu+fp8-group quantizer). Both paths give the same bits; the switch exists for
        tests and measurements. ``last_fused_activation`` says which one the last call took.
        ``fuse_topk_sum``: "auto" (GEMM2 sums each token's slots and writes the output where it
        can, the naive assignment without LoRA, and where its grid still has two programs per SM:
        ``_FUSED_SUM_PROGRAMS_PER_SM``), True (wherever it can; a call that cannot raises
        ValueError with the reason) or False (always GEMM2 -> c3 -> moe_sum); the same bits either
        way. ``last_fused_topk_sum`` says which one the last call took."""
        if quant_config is None:
            quant_config = QuantConfig()
        if not isinstance(quant_config, QuantConfig):
            raise TypeError(f"quant_config must be a moe_validate.contract.spec.QuantConfig or None; "
                            f"got {type(quant_config).__name__}")
        if assignment not in ("auto", "naive", "aligned"):
            raise ValueError(f"assignment must be 'auto', 'naive' or 'aligned'; got {assignment!r}")
        if not (fuse_activation == "auto" or fuse_activation is True or fuse_activation is False):
            raise ValueError(f"fuse_activation must be 'auto', True or False; got {fuse_activation!r}")
        if not (fuse_topk_sum == "auto" or fuse_topk_sum is True or fuse_topk_sum is False):
            raise ValueError(f"fuse_topk_sum must be 'auto', True or False; got {fuse_topk_sum!r}")
        self.quant_config = quant_config
        self.assignment = assignment
        self.fuse_activation = fuse_activation
        self.fuse_topk_sum = fuse_topk_sum
        self.last_config: Optional[KernelConfig] = None
        self.last_config_source: Optional[ConfigSource] = None  # which table served last_config
        # how last_config's fp8 dots accumulate on this device (configs.fp8_accumulation; None: unknown)
        self.last_fp8_accumulation: Optional[Fp8Accumulation] = None
        self.last_assignment: Optional[str] = None
        self.last_fused_activation: Optional[bool] = None
        self.last_fused_topk_sum: Optional[bool] = None

    # --- capabilities -----------------------------------------------------------------------
    def supports_quant_scheme(self, weight_key, act_key) -> bool:
        """Whether (weight key, activation key) of the seed's table runs on this device."""
        for scheme in QuantScheme:
            if scheme.quant_keys == (weight_key, act_key):
                capability = None
                if torch.cuda.is_available() and not interpreting():
                    capability = torch.cuda.get_device_capability()
                return _scheme_supported(scheme, capability)
        return False

    def supports_activation(self, activation) -> bool:
        try:
            Activation.parse(activation)
        except ValueError:
            return False
        return True

    # --- workspaces -------------------------------------------------------------------------
    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                         expert_tokens_meta, activation):
        """(workspace13, workspace2, output) shapes: c1 [R, N] then c3 [R, K] share the first,
        c2 [R, I] is the second (I = N/2 for gated activations, N otherwise)."""
        activation = Activation.parse(activation)
        R = M * topk
        I = N // 2 if activation.is_gated else N
        return (R, max(N, K)), (R, I), (M, K)

    def workspace_bytes(self, M, N, K, topk, local_num_experts, activation, storage_bytes: int,
                        max_block_m: int) -> int:
        """Device bytes one ``apply`` needs besides its inputs and output, at most: the two
        workspaces of ``workspace_shapes`` (``storage_bytes`` per element) and what ``apply``
        allocates itself: the quantized activations (one byte per element, an fp32 scale per
        row group of ``ACT_GROUP_SIZE``), the fp32 router-weight products, and the routing
        metadata aligned to a BLOCK_M of at most ``max_block_m``. Plain arithmetic: the harness
        plans device memory with it before any tensor exists."""
        (r13, c13), (r2, c2), _ = self.workspace_shapes(M, N, K, topk, None, local_num_experts, None, activation)
        R = M * topk
        workspaces = (r13 * c13 + r2 * c2) * storage_bytes
        quantized = (M * K + R * c2) + 4 * (M * triton.cdiv(K, ACT_GROUP_SIZE) + R * triton.cdiv(c2, ACT_GROUP_SIZE))
        router_weights = M * K * (4 + storage_bytes) + R * 4
        tiles = triton.cdiv(R + local_num_experts * (max_block_m - 1), max_block_m)
        routing = 4 * (R + tiles * max_block_m + tiles + 2 * local_num_experts + 1)
        return int(workspaces + quantized + router_weights + routing)

    def finalize(self, *args, **kwargs) -> None:
        return None

    # --- the pipeline -----------------------------------------------------------------------
    def _fuse_activation(self, lora, fused_silu_quant: bool, activation: Activation, config: KernelConfig) -> bool:
        """Whether GEMM1 applies the activation in its epilogue (see ``fuse_activation``)."""
        blockers = []
        if lora is not None:
            blockers.append("LoRA adds its w13 delta into c1 before the activation")
        if fused_silu_quant:
            why = fp8_group_quant_blocker(config)
            if why:
                blockers.append("silu + fp8_block128 fuses its silu+fp8-group quantizer into GEMM1 only where the "
                                f"config allows it: {why} (otherwise the separate quantizer reads c1)")
        if activation.is_gated and config.BLOCK_N < 2:
            blockers.append(f"a gated activation needs config.BLOCK_N >= 2 (gate/up pairs); got {config.BLOCK_N}")
        if self.fuse_activation is True and blockers:
            raise ValueError("fuse_activation=True but this call cannot fuse the activation into GEMM1: "
                             + "; ".join(blockers))
        return self.fuse_activation is not False and not blockers

    def _fuse_topk_sum(self, naive: bool, lora, fills_the_gpu: bool) -> bool:
        """Whether GEMM2 sums each token's slots into the output (see ``fuse_topk_sum``)."""
        blockers = []
        if not naive:
            blockers.append("the top-k sum fuses into GEMM2 only on the tiny-M naive assignment (one route per "
                            "tile); an aligned tile holds routes of many tokens")
        if lora is not None:
            blockers.append("LoRA adds its w2 delta into c3 before the sum")
        if self.fuse_topk_sum is True and blockers:
            raise ValueError("fuse_topk_sum=True but this call cannot fuse the top-k sum into GEMM2: "
                             + "; ".join(blockers))
        if self.fuse_topk_sum == "auto":
            return not blockers and fills_the_gpu
        return self.fuse_topk_sum is True

    def _paths(self, shape: CallShape, lora, config: KernelConfig, device: torch.device) -> Paths:
        """The paths this object's switches take for a validated call at ``config`` (ValueError
        where a switch forced to True cannot be honoured). No launch: ``apply`` and
        ``alternative_paths`` both decide here."""
        fused_silu_quant = fused_silu_fp8_group(shape.activation, shape.scheme, shape.quant.gemm1_clamp_limit,
                                                lora is not None)
        fuse_act = self._fuse_activation(lora, fused_silu_quant, shape.activation, config)
        if self.assignment == "auto":
            naive = takes_naive_path(shape.M * shape.topk, shape.E)
        else:
            naive = self.assignment == "naive"
        fuse_sum = self._fuse_topk_sum(naive, lora,
                                       _fused_sum_fills_the_gpu(shape.M, shape.K, config.for_gemm2(), device))
        return Paths("naive" if naive else "aligned", fuse_act, fuse_sum)

    def alternative_paths(self, hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu",
                          expert_map=None, global_num_experts=-1, apply_router_weight_on_input=False,
                          lora=None, config=None, batch_invariant=False) -> List[AlternativePath]:
        """The internal paths this call (the arguments of ``fused_experts``) does not take with
        this object's switches, each of which must give its bits (SPEC "Invariances"): the other
        route-to-tile assignment (naive <-> aligned); on the naive assignment the other top-k sum
        placement (moe_sum <-> fused into GEMM2; not with LoRA); the other activation placement
        (unfused <-> fused into GEMM1's epilogue; not with LoRA). The top-k sum fuses only on the
        naive assignment, so from an aligned call the assignment variant may fuse it and the
        top-k sum variant runs naive with the placement that one did not take: without LoRA all
        of (aligned, moe_sum), (naive, fused), (naive, moe_sum) are covered.

        silu + fp8_block128 (no clamp, no LoRA) fuses the activation and its fp8 group
        quantization only where GEMM1's programs own whole scale groups, which no default config
        allows: there the two placements run at the call's config with GEMM1's BLOCK_N = 256
        (GEMM2 keeps its tiles) and are compared with each other (``versus``). No launch here."""
        shape = validate_call(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
                              quant=self.quant_config, expert_map=expert_map, global_num_experts=global_num_experts,
                              apply_router_weight_on_input=apply_router_weight_on_input, lora=lora)
        config, _ = _resolve_config(config, shape.M, shape.E, shape.N, shape.K, shape.topk, shape.storage_dtype,
                                    shape.scheme, self.quant_config.group_size, batch_invariant, shape.I)
        device = hidden_states.device
        own = PathSwitches(self.assignment, self.fuse_activation, self.fuse_topk_sum)

        def takes(switches: PathSwitches) -> Paths:
            experts = TritonExperts(self.quant_config, assignment=switches.assignment,
                                    fuse_activation=switches.fuse_activation, fuse_topk_sum=switches.fuse_topk_sum)
            return experts._paths(shape, lora, switches.config or config, device)

        def takes_if_it_can(switches: PathSwitches) -> Optional[Paths]:
            try:
                return takes(switches)
            except ValueError:  # a fusion forced on a call that cannot take it (LoRA): no such path
                return None

        default = takes(own)
        alternatives: List[AlternativePath] = []

        other = "naive" if default.assignment == "aligned" else "aligned"
        flipped_switches = replace(own, assignment=other)
        flipped = takes(flipped_switches)
        label = f"assignment={other} (default {default.assignment})"
        if flipped.fused_topk_sum != default.fused_topk_sum:
            label += ", top-k sum " + ("fused into GEMM2" if flipped.fused_topk_sum else "by moe_sum")
        alternatives.append(AlternativePath(label, flipped_switches, flipped))

        naive_sum_fused = default.fused_topk_sum if default.assignment == "naive" else flipped.fused_topk_sum
        if naive_sum_fused:
            label = "top-k sum by moe_sum, assignment=naive (auto fuses it into GEMM2 there)"
        else:
            label = "top-k sum fused into GEMM2, assignment=naive (auto leaves it to moe_sum there)"
        switches = replace(own, assignment="naive", fuse_topk_sum=not naive_sum_fused)
        paths = takes_if_it_can(switches)
        if paths is not None:
            alternatives.append(AlternativePath(label, switches, paths))

        if default.fused_activation:
            switches = replace(own, fuse_activation=False)
            alternatives.append(AlternativePath("activation unfused (default fused into GEMM1)", switches,
                                                takes(switches)))
        elif fused_silu_fp8_group(shape.activation, shape.scheme, shape.quant.gemm1_clamp_limit, lora is not None):
            group_config = _fp8_group_quant_config(config)
            fused = replace(own, fuse_activation=True, config=group_config)
            label = (f"silu + fp8 group quantization fused into GEMM1 vs unfused, both at GEMM1 BLOCK_N="
                     f"{group_config.BLOCK_N} (the default BLOCK_N={config.BLOCK_N} cannot fuse)")
            alternatives.append(AlternativePath(label, fused, takes(fused),
                                                versus=replace(own, fuse_activation=False, config=group_config)))
        else:
            switches = replace(own, fuse_activation=True)
            paths = takes_if_it_can(switches)
            if paths is not None:
                alternatives.append(AlternativePath("activation fused into GEMM1 (default unfused)", switches, paths))
        return alternatives

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input, lora=None, config=None,
              batch_invariant=False, stages=None) -> None:
        """``stages``: None (the launches alone), or a dict that receives copies of the
        intermediates this call materializes, route-major [R, .] (rows of invalid routes as the
        kernels left them: unwritten): ``c1`` (GEMM1 + bias + LoRA, in S; not on the fused-activation
        path), ``c2`` (the activation, in S; not with the fused silu+fp8-group quantization),
        ``c2_codes`` and ``c2_scale`` (the requantized GEMM2 input, for schemes that requantize) and
        ``c3`` (GEMM2 + bias + router weight + LoRA, in S; not with the fused top-k sum). The copies
        are taken between launches; the launches are the same either way."""
        quant = self.quant_config
        if a2_scale is not None and quant.a2_scale is None and QuantScheme.parse(quant.scheme).needs_static_act_scales:
            quant = replace(quant, a2_scale=a2_scale)
        shape = validate_call(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
                              quant=quant, expert_map=expert_map, global_num_experts=global_num_experts,
                              apply_router_weight_on_input=apply_router_weight_on_input, lora=lora,
                              a1q_scale=a1q_scale)
        # Index values the kernels would otherwise drop silently, rejected as the reference does (one sync).
        validate_index_values(shape.E, expert_map=expert_map, lora=lora, quant=quant)
        if expert_tokens_meta is not None:
            raise ValueError("expert_tokens_meta must be None: TritonExperts takes standard (token-major) "
                             "inputs, not batched per-expert ones")
        scheme, S = shape.scheme, shape.storage_dtype
        M, K, N, I, E, topk = shape.M, shape.K, shape.N, shape.I, shape.E, shape.topk
        R = M * topk
        _check_devices(hidden_states, [("output", output), ("workspace13", workspace13),
                                       ("workspace2", workspace2), ("a2_scale", a2_scale),
                                       ("quant", [v for v in quant.__dict__.values()]),
                                       ("lora", None if lora is None else list(lora.__dict__.values()))])
        capability = _device_capability(hidden_states.device)
        if not _scheme_supported(scheme, capability):
            raise ValueError(f"quant.scheme {scheme.value} needs compute capability >= {scheme.min_capability}; "
                             f"this device has {capability}")
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != (M, K) or output.dtype != S:
            raise ValueError(f"output must be a [M, K] = {(M, K)} tensor of the storage dtype {S}; got "
                             f"{getattr(output, 'dtype', None)} {tuple(getattr(output, 'shape', ()))}")
        config, self.last_config_source = _resolve_config(config, M, E, N, K, topk, S, scheme, quant.group_size,
                                                          batch_invariant, I)
        self.last_config = config
        self.last_fp8_accumulation = fp8_accumulation(config, capability) if scheme.is_fp8 else None
        clamp = quant.gemm1_clamp_limit
        fused_silu_quant = fused_silu_fp8_group(shape.activation, scheme, clamp, lora is not None)
        paths = self._paths(shape, lora, config, hidden_states.device)
        self.last_assignment = paths.assignment
        self.last_fused_activation = fuse_act = paths.fused_activation
        self.last_fused_topk_sum = fuse_sum = paths.fused_topk_sum
        naive = paths.assignment == "naive"
        if M == 0:
            return
        c1 = _flat_view(workspace13, "workspace13", R, N, S)
        c3 = _flat_view(workspace13, "workspace13", R, K, S)
        c2 = _flat_view(workspace2, "workspace2", R, I, S)

        # Routing: local expert per route (+ counts), then alignment unless the tiny-M path runs.
        counts = None if naive else torch.zeros(E, dtype=torch.int32, device=hidden_states.device)
        route_expert = route_experts(topk_ids, shape.global_num_experts, E, expert_map, counts=counts)
        if naive:
            sorted_ids = expert_ids = num_post_padded = None
        else:
            sorted_ids, expert_ids, num_post_padded = align_routes(route_expert, counts, config.BLOCK_M, E)
        routing = dict(scheme=scheme, config=config, num_routes=R, sorted_route_ids=sorted_ids,
                       expert_ids=expert_ids, num_post_padded=num_post_padded,
                       route_expert=route_expert, naive=naive)

        # Router weight on the input (topk = 1): x = round_S(x * w[m]), the product in fp32 like
        # every other epilogue of the pipeline (the reference's mirror does the same).
        x = hidden_states
        if apply_router_weight_on_input:
            x = (x.float() * topk_weights[:, :1].float()).to(S)

        # GEMM1 input quantization.
        a1, a1_scale = x, None
        if scheme.act_dtype is not None:
            if a1q_scale is not None:
                a1_scale = a1q_scale
            else:
                a1, a1_scale = quantize_activation(x, scheme, static_scale=quant.a1_scale)

        gemm1_kw = dict(top_k_div=topk, bias=quant.w1_bias, a_scale=a1_scale, b_scale=quant.w1_scale,
                        b_zp=quant.w1_zp, group_size=quant.group_size, **routing)
        a2, a2_used_scale = c2, None
        if fuse_act and fused_silu_quant:
            # GEMM1 with silu and the fp8 group quantization in its epilogue: codes and scales
            # directly, neither c1 nor c2 written.
            a2, a2_used_scale = fp8_group_outputs(R, I, hidden_states.device)
            invoke_grouped_gemm(a1, w1, a2, activation=shape.activation, c_scale=a2_used_scale, c1_dtype=S,
                                **gemm1_kw)
        elif fuse_act:
            # GEMM1 with the activation in its epilogue: c2 directly, c1 never written.
            invoke_grouped_gemm(a1, w1, c2, activation=shape.activation, clamp_limit=clamp, **gemm1_kw)
        else:
            def gemm1() -> None:
                invoke_grouped_gemm(a1, w1, c1, **gemm1_kw)

            # apply_lora_w13 calls gemm1 itself (single or dual stream); without LoRA it just calls it.
            apply_lora_w13(c1, x, route_expert, lora, shape.activation, topk=topk, base_gemm=gemm1)
            if stages is not None:
                stages["c1"] = c1.clone()  # c3 reuses workspace13 later

        # Activation (unless fused above) + requantization, or the fused silu + fp8 group quantization.
        # The quantizers read route experts as their row mask (valid = >= 0): no mask launch.
        if fused_silu_quant:
            if not fuse_act:
                a2, a2_used_scale = silu_and_mul_quant_fp8_group(c1, row_valid=route_expert)
        else:
            if not fuse_act:
                apply_activation(c1, c2, route_expert, shape.activation, clamp)
            if stages is not None:
                stages["c2"] = c2.clone()
            if scheme.act_dtype is not None:
                a2, a2_used_scale = quantize_activation(c2, scheme, static_scale=quant.a2_scale,
                                                        row_valid=route_expert)
        if stages is not None and scheme.act_dtype is not None:
            stages["c2_codes"], stages["c2_scale"] = a2.clone(), a2_used_scale.clone()

        # GEMM2 (route-major in) with the router weight, GEMM2's own tiles where the config has
        # them (same BLOCK_M: same alignment).
        route_weight = None if apply_router_weight_on_input else topk_weights.reshape(-1).contiguous()
        gemm2_kw = dict(top_k_div=1, bias=quant.w2_bias, a_scale=a2_used_scale, b_scale=quant.w2_scale,
                        b_zp=quant.w2_zp, group_size=quant.group_size, route_weight=route_weight,
                        **{**routing, "config": config.for_gemm2()})
        if fuse_sum:
            # With the top-k sum in slot order: the output directly, c3 never written.
            invoke_grouped_gemm(a2, w2, output, topk_sum=topk, **gemm2_kw)
        else:
            def gemm2() -> None:
                invoke_grouped_gemm(a2, w2, c3, **gemm2_kw)

            # Into the route-major c3, then LoRA w2, then the combine in slot order (tokens without
            # a valid route get exact zeros).
            apply_lora_w2(c3, c2, route_expert, route_weight, lora, topk=topk, base_gemm=gemm2)
            if stages is not None:
                stages["c3"] = c3.clone()
            moe_sum(c3.view(M, topk, K), route_expert.view(M, topk), output)


def _fp8_group_quant_config(config: KernelConfig) -> KernelConfig:
    """``config`` at GEMM1 BLOCK_N = 256: each program's 128 gate/up column pairs make one whole
    128-column scale group of c2 (``fp8_group_quant_blocker``); GEMM2 keeps the tiles it ran."""
    gemm2 = config.gemm2
    if gemm2 is None:  # GEMM2 ran GEMM1's tiles: keep them, only GEMM1's BLOCK_N changes
        gemm2 = Gemm2Tiles(BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    return replace(config, BLOCK_N=2 * ACT_GROUP_SIZE, gemm2=gemm2)


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, *, activation="silu", quant=None,
                  expert_map=None, global_num_experts=-1, apply_router_weight_on_input=False, lora=None,
                  a1q_scale=None, config=None, batch_invariant=False, fuse_activation="auto",
                  fuse_topk_sum="auto") -> torch.Tensor:
    """The [M, K] output in the storage dtype S (SPEC.md, Pipeline). ``fuse_activation`` and
    ``fuse_topk_sum``: see ``TritonExperts``."""
    experts = TritonExperts(quant, fuse_activation=fuse_activation, fuse_topk_sum=fuse_topk_sum)
    shape = validate_call(hidden_states, w1, w2, topk_weights, topk_ids, activation=activation, quant=quant,
                          expert_map=expert_map, global_num_experts=global_num_experts,
                          apply_router_weight_on_input=apply_router_weight_on_input, lora=lora,
                          a1q_scale=a1q_scale)
    ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
        shape.M, shape.N, shape.K, shape.topk, shape.global_num_experts, shape.E, None, shape.activation)
    device, S = hidden_states.device, shape.storage_dtype
    output = torch.empty(out_shape, dtype=S, device=device)
    workspace13 = torch.empty(ws13_shape, dtype=S, device=device)
    workspace2 = torch.empty(ws2_shape, dtype=S, device=device)
    experts.apply(output, hidden_states, w1, w2, topk_weights, topk_ids, shape.activation,
                  shape.global_num_experts, expert_map, a1q_scale, None, workspace13, workspace2, None,
                  apply_router_weight_on_input, lora=lora, config=config, batch_invariant=batch_invariant)
    return output
