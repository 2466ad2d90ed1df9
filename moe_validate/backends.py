"""Backends: the one interface through which the harness reaches an experts implementation.

A backend turns one call's ``MoEInputs`` into the ``[M, K]`` output and says which cases it
can run. Built in:

- ``triton``: ``kernels.TritonExperts`` through its modular ``apply`` (output and workspaces
  allocated from ``workspace_shapes`` and poisoned with NaN before every call, so a kernel
  that leaves a row unwritten, or reads a workspace row it never wrote, shows up as NaN).
- ``reference``: the float64 reference in ``mirror`` mode, cast to the storage dtype: a sanity
  backend that must pass every case (if it does not, the tolerance model or the comparison is
  wrong, not a kernel).

Two optional methods let the harness check more than the output (``moe_validate/invariance.py``):

- ``supports_invariance(name, case) -> (bool, reason)`` for the bitwise invariance checks a case
  asks for (``Case.invariance``: ``rerun``, ``perm``, ``sub``). ``sub`` needs batch-invariant mode,
  which the harness requests by passing a case whose ``config`` is ``"inv"``. Without the method,
  ``rerun`` and ``perm`` are checked and ``sub`` is SKIPPED with that reason.
- ``routing_stages(inputs, case) -> dict or None``: the alignment of the last run's routes
  (``sorted_route_ids``, ``expert_ids``, ``num_post_padded``, ``block_m``), checked exactly against
  SPEC's alignment contract (``moe_validate/routing_contract.py``).

Anything else is loaded by ``get_backend("package.module:attr")`` or by name from the
entry-point group ``moe_validate.backends``. ``attr`` may be a Backend instance, a class (called
with no arguments) or a factory function returning one.

``kernels``, ``reference`` and torch are imported inside the functions that use them, so that
the CLI and the pytest plugin start fast and work where one of them is missing.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from moe_validate.env import interpreting

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from moe_validate.matrix import Case
    from moe_validate.contract.spec import MoEInputs

__all__ = [
    "Backend",
    "TritonBackend",
    "ReferenceBackend",
    "get_backend",
    "builtin_backend_names",
    "device_capability",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "moe_validate.backends"


@runtime_checkable
class Backend(Protocol):
    """What the runner needs from an implementation under test."""

    name: str
    last_config: Optional[dict]  # the launch config of the last ``run``, or None

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> "torch.Tensor":
        """The ``[M, K]`` output for ``inputs`` (``case`` gives the launch-config choice)."""
        ...

    def supports(self, case: "Case") -> Tuple[bool, str]:
        """(True, "") or (False, why): a False becomes a SKIP row with that reason."""
        ...


def device_capability() -> Optional[Tuple[int, int]]:
    """CUDA compute capability of the current device, or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def _config_to_dict(config: Any) -> Optional[dict]:
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"a backend's last_config must be a dict or have to_dict(); got {type(config).__name__}")


def _fp8_group_quant_call(inputs: "MoEInputs") -> bool:
    """silu + fp8_block128 without clamp or LoRA: the call whose GEMM1 can fuse the fp8 group
    quantization of its activation, given a config that allows it (the kernels' own rule)."""
    from kernels.experts import silu_fp8_group_call

    quant = inputs.quant
    return quant is not None and silu_fp8_group_call(inputs.activation, quant.scheme, quant.gemm1_clamp_limit,
                                                      inputs.lora)


def _storage_dtype(inputs: "MoEInputs"):
    from moe_validate.contract.spec import storage_dtype

    return storage_dtype(inputs.hidden_states.dtype)


class TritonBackend:
    """``kernels.TritonExperts`` through its modular ``workspace_shapes`` + ``apply`` API."""

    name = "triton"

    def __init__(self, config=None) -> None:
        # ``config``: a kernels.KernelConfig forced on every run whatever the case says (tune checks
        # candidates, per-GEMM tiles included, that no case-id spelling can express).
        self.forced_config = config
        self.last_config: Optional[dict] = None
        self.last_config_source: Optional[dict] = None  # kernels.configs.ConfigSource of last_config

    def supports(self, case: "Case") -> Tuple[bool, str]:
        reason = case.device_skip_reason(device_capability(), interpreting())
        if reason:
            return False, reason
        import kernels
        from moe_validate.contract.spec import Activation, QuantConfig, QuantScheme

        scheme = QuantScheme.parse(case.scheme)
        experts = kernels.TritonExperts(QuantConfig(scheme=scheme, group_size=case.group_size))
        weight_key, act_key = scheme.quant_keys
        if not experts.supports_quant_scheme(weight_key, act_key):
            return False, f"TritonExperts does not support {scheme.value} ({weight_key}, {act_key}) on this device"
        activation = Activation.parse(case.activation)
        if hasattr(experts, "supports_activation") and not experts.supports_activation(activation):
            return False, f"TritonExperts does not support activation {activation.value} on this device"
        return True, ""

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None, *, assignment: str = "auto",
            fuse_activation="auto", fuse_topk_sum="auto", config=None) -> "torch.Tensor":
        """``assignment``, ``fuse_activation`` and ``fuse_topk_sum`` pick TritonExperts' internal
        paths (the ``paths`` invariance re-runs with the ones not taken); the defaults let the
        kernels choose. ``last_paths`` records the ones taken. ``config`` (a kernels.KernelConfig)
        overrides the case's and the forced config."""
        import torch

        import kernels
        from moe_validate.contract.spec import Activation, QuantConfig

        quant = inputs.quant if inputs.quant is not None else QuantConfig()
        activation = Activation.parse(inputs.activation)
        hidden = inputs.hidden_states
        M, K = hidden.shape
        E, N, _ = inputs.w1.shape
        topk = inputs.topk_ids.shape[1]
        global_num_experts = inputs.global_num_experts if inputs.global_num_experts > 0 else E

        # Case.config: "auto" = the kernels' own per-M choice, "inv" = the batch-invariant fixed
        # config, anything else an explicit tile config ("BM16BN32BK32GM1W4S2").
        override, config, batch_invariant = config, None, False
        if case is not None and case.config == "inv":
            batch_invariant = True
        elif case is not None and case.config != "auto":
            explicit = case.explicit_config()
            if explicit is None:
                raise ValueError(f"case.config must be 'auto', 'inv' or like 'BM16BN32BK32GM1W4S2'; got {case.config!r}")
            config = kernels.KernelConfig.from_dict(explicit)
        if self.forced_config is not None:
            config, batch_invariant = self.forced_config, False
        if override is not None:
            config, batch_invariant = override, False

        experts = kernels.TritonExperts(quant, assignment=assignment, fuse_activation=fuse_activation,
                                        fuse_topk_sum=fuse_topk_sum)
        ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
            M, N, K, topk, global_num_experts, E, None, activation
        )
        dtype = _storage_dtype(inputs)
        # NaN poison: every element the kernel should write is overwritten; anything left (or
        # read back before being written) propagates as NaN into the output and fails the case.
        output = torch.full(tuple(out_shape), math.nan, dtype=dtype, device=hidden.device)
        workspace13 = torch.full(tuple(ws13_shape), math.nan, dtype=dtype, device=hidden.device)
        workspace2 = torch.full(tuple(ws2_shape), math.nan, dtype=dtype, device=hidden.device)
        self.last_config = self.last_config_source = None
        try:
            experts.apply(
                output,
                hidden,
                inputs.w1,
                inputs.w2,
                inputs.topk_weights,
                inputs.topk_ids,
                activation,
                global_num_experts,
                inputs.expert_map,
                None,  # a1q_scale: hidden_states arrive unquantized; apply quantizes them per the scheme
                quant.a2_scale,
                workspace13,
                workspace2,
                None,  # expert_tokens_meta: only for batched (pre-grouped) inputs, which we do not use
                inputs.apply_router_weight_on_input,
                lora=inputs.lora,
                config=config,
                batch_invariant=batch_invariant,
            )
        finally:
            # Also when the launch fails: a COMPILE_ERROR record should name the config that failed.
            self.last_config = _config_to_dict(getattr(experts, "last_config", None))
            source = getattr(experts, "last_config_source", None)
            self.last_config_source = None if source is None else source.to_dict()
        self.last_paths = {"assignment": experts.last_assignment,
                           "fused_activation": getattr(experts, "last_fused_activation", None),
                           "fused_topk_sum": getattr(experts, "last_fused_topk_sum", None)}
        return output

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]:
        """Every SPEC invariance: ``config="inv"`` selects ``batch_invariant=True`` in ``run``."""
        return True, ""

    def run_paths(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> List[Tuple]:
        """The same call through each internal path the kernels did not take by themselves:
        the other route-to-tile assignment (naive <-> aligned, SPEC "Invariances"), the other
        top-k sum placement on the naive assignment (moe_sum <-> fused into GEMM2, where the call
        allows it: no LoRA) and the other activation placement (unfused <-> fused into GEMM1's
        epilogue, where the call allows it). Every one must give the bits of the default path.
        The top-k sum fuses only on the naive assignment: there, with "auto" placement, the
        assignment variant of an aligned call fuses it, and the top-k sum variant runs the naive
        assignment with the placement that naive run did not take; so without LoRA all three of
        (aligned, moe_sum), (naive, fused), (naive, moe_sum) are compared.

        silu + fp8_block128 (no clamp, no LoRA) fuses its activation and fp8 group quantization
        into GEMM1 only with (BLOCK_N // 2) % 128 == 0, which no default config has. There the
        two placements are compared with each other at the default config with BLOCK_N = 256:
        a ``(label, fused output, unfused output)`` triple (a config change may move accumulation
        order, so neither is compared with the default run)."""
        self.run(inputs, case)  # which paths the kernels choose for this call
        taken, taken_config = dict(self.last_paths), self.last_config
        variants: List[Tuple] = []
        try:
            other = "naive" if taken["assignment"] == "aligned" else "aligned"
            flipped = self.run(inputs, case, assignment=other)
            flipped_sum = self.last_paths["fused_topk_sum"]
            label = f"assignment={other} (default {taken['assignment']})"
            if flipped_sum != taken["fused_topk_sum"]:
                label += ", top-k sum " + ("fused into GEMM2" if flipped_sum else "by moe_sum")
            variants.append((label, flipped))
            naive_sum_fused = taken["fused_topk_sum"] if taken["assignment"] == "naive" else flipped_sum
            if naive_sum_fused:
                variants.append(("top-k sum by moe_sum, assignment=naive (auto fuses it into GEMM2 there)",
                                 self.run(inputs, case, assignment="naive", fuse_topk_sum=False)))
            else:
                try:
                    variants.append(("top-k sum fused into GEMM2, assignment=naive (auto leaves it to moe_sum there)",
                                     self.run(inputs, case, assignment="naive", fuse_topk_sum=True)))
                except ValueError:
                    pass  # this call cannot fuse (LoRA adds into c3 before the sum): no such path
            if taken["fused_activation"]:
                variants.append(("activation unfused (default fused into GEMM1)",
                                 self.run(inputs, case, fuse_activation=False)))
            elif _fp8_group_quant_call(inputs):
                variants.append(self._fp8_group_quant_pair(inputs, case, taken_config))
            else:
                try:
                    variants.append(("activation fused into GEMM1 (default unfused)",
                                     self.run(inputs, case, fuse_activation=True)))
                except ValueError:
                    pass  # this call cannot fuse (LoRA adds into c1 first): no such path
        finally:
            self.last_paths, self.last_config = taken, taken_config  # describe the default run again
        return variants

    def _fp8_group_quant_pair(self, inputs: "MoEInputs", case: Optional["Case"], taken_config: Optional[dict]):
        """(label, fused, unfused) for silu + fp8_block128 at a config whose programs own whole
        128-column scale groups: the default config with BLOCK_N = 256 (GEMM2 keeps its tiles)."""
        from dataclasses import replace

        import kernels
        from kernels.configs import Gemm2Tiles
        from moe_validate.contract.spec import FP8_BLOCK

        base = kernels.KernelConfig.from_dict(taken_config)
        gemm2 = base.gemm2
        if gemm2 is None:  # GEMM2 ran these tiles: keep them, only GEMM1's BLOCK_N changes
            gemm2 = Gemm2Tiles(BLOCK_N=base.BLOCK_N, BLOCK_K=base.BLOCK_K, GROUP_M=base.GROUP_M,
                               num_warps=base.num_warps, num_stages=base.num_stages)
        config = replace(base, BLOCK_N=2 * FP8_BLOCK, gemm2=gemm2)
        fused = self.run(inputs, case, fuse_activation=True, config=config)
        unfused = self.run(inputs, case, fuse_activation=False, config=config)
        label = (f"silu + fp8 group quantization fused into GEMM1 vs unfused, both at GEMM1 BLOCK_N={config.BLOCK_N} "
                 f"(the default BLOCK_N={base.BLOCK_N} cannot fuse)")
        return label, fused, unfused

    def routing_stages(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> Optional[dict]:
        """The alignment of ``inputs``' routes at the BLOCK_M of the last run's launch config.

        Computed by ``kernels.moe_align_block_size``, the stages ``apply`` runs (route experts,
        expert offsets, scatter), on the same ids, expert map and block size. Also where ``apply``
        took the tiny-M naive path: the contract is the align stages' own. None before any run.
        """
        import kernels

        if not self.last_config or "BLOCK_M" not in self.last_config:
            return None
        block_m = int(self.last_config["BLOCK_M"])
        E = inputs.w1.shape[0]
        G = inputs.global_num_experts if inputs.global_num_experts > 0 else E
        sorted_ids, expert_ids, num_post_padded = kernels.moe_align_block_size(
            inputs.topk_ids, block_m, G, inputs.expert_map, num_local_experts=E)
        return {"sorted_route_ids": sorted_ids, "expert_ids": expert_ids,
                "num_post_padded": num_post_padded, "block_m": block_m}


class ReferenceBackend:
    """The float64 reference in ``mirror`` mode, cast to the storage dtype ``S``.

    Mirror mode rounds to ``S`` where the pipeline stores, including the final output, so the
    cast of its float64 result to ``S`` is exact; this backend must pass every case.
    """

    name = "reference"

    def __init__(self, precision: str = "mirror") -> None:
        self.precision = precision
        self.last_config: Optional[dict] = None

    def supports(self, case: "Case") -> Tuple[bool, str]:
        return True, ""  # float64 on any device; no capability needed

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]:
        """Run-to-run only: the reference computes each expert's routes as one float64 matmul,
        and nothing promises that a BLAS gives a row the same bits in a batch of another size or
        order (a float64 difference would have to cross an S rounding to show, but can)."""
        if name == "rerun":
            return True, ""
        return False, ("the float64 reference promises no bitwise invariance across batches "
                       "(its matmuls may block by batch size); it is a sanity backend, not a subject")

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> "torch.Tensor":
        import torch

        import reference

        out = reference.fused_experts(
            *inputs.args(), **inputs.kwargs(), precision=self.precision, out_dtype=torch.float64
        )
        return out.to(_storage_dtype(inputs))


_BUILTIN = {
    "triton": TritonBackend,
    "reference": ReferenceBackend,
    # The benchmark peer (moe_validate/peers.py), imported on first use: it needs torch.
    "torch-grouped": lambda: importlib.import_module("moe_validate.peers").TorchGroupedBackend(),
}


def builtin_backend_names() -> Tuple[str, ...]:
    return tuple(_BUILTIN)


def _entry_point(name: str):
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 style API
        eps = entry_points().get(ENTRY_POINT_GROUP, [])
    for ep in eps:
        if ep.name == name:
            return ep
    return None


def _as_backend(obj: Any, spec: str) -> Backend:
    """Instance, class or factory -> a Backend instance (validated)."""
    if isinstance(obj, type):
        obj = obj()
    elif callable(obj) and not (hasattr(obj, "run") and hasattr(obj, "supports")):
        obj = obj()
    missing = [m for m in ("run", "supports") if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"backend {spec!r} must provide run(inputs, case=None) and supports(case); "
            f"{type(obj).__name__} lacks {', '.join(missing)}"
        )
    if not getattr(obj, "name", None):
        try:
            obj.name = spec
        except AttributeError:
            pass
    if not hasattr(obj, "last_config"):
        try:
            obj.last_config = None
        except AttributeError:
            pass
    return obj


def get_backend(spec: str) -> Backend:
    """A backend from ``"triton"``, ``"reference"``, ``"module:attr"`` or an entry-point name.

    Raises ValueError for a spec that names nothing loadable (the message lists what is known).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"backend must be a non-empty string; got {spec!r}")
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"backend {spec!r} must look like 'package.module:attr'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"backend {spec!r}: cannot import module {module_name!r} ({exc})") from None
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(f"backend {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
        return _as_backend(obj, spec)
    ep = _entry_point(spec)
    if ep is not None:
        return _as_backend(ep.load(), spec)
    raise ValueError(
        f"backend must be one of {', '.join(_BUILTIN)}, 'module:attr' or a name registered in the "
        f"{ENTRY_POINT_GROUP!r} entry-point group; got {spec!r}"
    )
