"""Backends: the one interface through which the harness reaches an experts implementation.

A backend turns one call's ``MoEInputs`` into the ``[M, K]`` output and says which cases it
can run. Built in:

- ``triton``: ``kernels.TritonExperts`` through its modular ``apply`` (output and workspaces
  allocated from ``workspace_shapes`` and poisoned with NaN before every call, so a kernel
  that leaves a row unwritten, or reads a workspace row it never wrote, shows up as NaN; its
  ``run_paths`` runs once more with a large finite poison, which a reduction that skips NaN
  cannot skip). It declares the optional methods below; its ``run_stages`` asks ``TritonExperts.apply`` for
  copies of the intermediates it materializes on the paths it takes.
- ``reference``: the float64 reference in ``mirror`` mode, cast to the storage dtype: a sanity
  backend that must pass every case (if it does not, the tolerance model or the comparison is
  wrong, not a kernel).
- ``ordered-reversed``, ``ordered-sequential``, ``ordered-split-k``: the mirror's stages with fp32
  GEMMs in another accumulation order (``moe_validate/ordered.py``), for calibrating the gate's
  flip model where the interpreted kernels barely flip.

Optional capabilities are typed Protocols (below; ``docs/BACKENDS.md`` is the page for a team
wrapping its own kernel): ``SupportsInvariance``, ``ExposesRouting``, ``RunsPaths``,
``ExposesStages``, ``ReportsConfig``, ``ReportsAccumulation`` and ``DeclaresNumerics``. ``capability(backend, Protocol)``
is the one place that answers "does this backend have X" (a member set to None declares its
absence); ``check_backend`` checks every declared one when the backend loads (a non-callable
member or a method that cannot take the arguments the harness passes is a TypeError naming the
backend, the capability and what was expected) and ``capability_summary`` is what the run header
records. What a backend lacks is SKIPPED with the reason, never assumed.

Anything else is loaded by ``get_backend("package.module:attr")`` or by name from the
entry-point group ``moe_validate.backends``. ``attr`` may be a Backend instance, a class (called
with no arguments) or a factory function returning one.

``kernels``, ``reference`` and torch are imported inside the functions that use them, so that
the CLI and the pytest plugin start fast and work where one of them is missing.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from moe_validate.contract.rules import interpreting

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from moe_validate.matrix import Case
    from moe_validate.contract.spec import MoEInputs

__all__ = [
    "Backend",
    "SupportsInvariance",
    "ExposesRouting",
    "RunsPaths",
    "ExposesStages",
    "ReportsConfig",
    "ReportsAccumulation",
    "DeclaresNumerics",
    "CAPABILITIES",
    "capability",
    "declared",
    "check_backend",
    "capability_summary",
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
    """What the runner needs from an implementation under test (required)."""

    name: str

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> "torch.Tensor":
        """The ``[M, K]`` output for ``inputs`` (``case`` gives the launch-config choice).

        The call contract (checked on every call, ``moe_validate/call_contract.py``): inputs left
        unchanged; output of shape [M, K], the storage dtype S, on the inputs' device, unit
        column stride with rows that do not overlap, sharing no memory with any input."""
        ...

    def supports(self, case: "Case") -> Tuple[bool, str]:
        """(True, "") or (False, why): a False becomes a SKIP row with that reason."""
        ...


# --- optional capabilities ---------------------------------------------------------------------
@runtime_checkable
class SupportsInvariance(Protocol):
    """Which bitwise invariances (``Case.invariance``: rerun, perm, sub, paths) the backend honours.
    Without it: rerun and perm are checked (SPEC makes them unconditional), sub is SKIPPED."""

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]: ...


@runtime_checkable
class ExposesRouting(Protocol):
    """The alignment of the last run's routes (``sorted_route_ids``, ``expert_ids``,
    ``num_post_padded``, ``block_m``; ``routing_contract.py``), or None. Without it: the
    alignment contract is SKIPPED."""

    def routing_stages(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> Optional[dict]: ...


@runtime_checkable
class RunsPaths(Protocol):
    """The same call through the backend's other internal paths, ``(label, output)`` or
    ``(label, output, expected)`` each (``invariance.py``). Without it: ``paths`` is SKIPPED."""

    def run_paths(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> List[Tuple]: ...


@runtime_checkable
class ExposesStages(Protocol):
    """One run that also hands back its intermediates: ``{"out": [M, K], "c1": ..., "c2": ...,
    "c2_in": ..., "c3": ...}``, each stage route-major ([M*topk, X] or [M, topk, X], route
    r = m*topk + j; rows of invalid routes are not compared) as a tensor, or a string saying why
    this run did not materialize it. Used to localize a failing case by pipeline stage
    (``moe_validate/stages.py``). Without it: the localization is SKIPPED."""

    def run_stages(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> Dict[str, Any]: ...


@runtime_checkable
class ReportsConfig(Protocol):
    """The launch config of the last ``run`` (a dict or an object with ``to_dict()``, or None),
    and optionally where it came from; recorded with the case."""

    last_config: Any


@runtime_checkable
class ReportsAccumulation(Protocol):
    """How the last ``run``'s fp8 dots accumulated on the GPU (a ``contract.profile.Fp8Accumulation``,
    or None: not known). Its tiles pick the instruction, so it is a fact of the launch; the gate
    models those dots by it. Without it (or None) a GPU's fp8 dots are taken to be Hopper's fp8 MMA,
    the coarser accumulator: never a false alarm, less sensitivity where the dots were exact."""

    last_fp8_accumulation: Any


@runtime_checkable
class DeclaresNumerics(Protocol):
    """The backend's numerics: ``numerics_profile`` (a NumericsProfile; None = ours, SPEC.md), which
    the mirror reference follows, and ``gating`` (the verdicts that decide the outcome, a tuple of
    "accuracy" / "conformance"). The policy for them lives with the profiles, not here."""

    numerics_profile: Any
    gating: Tuple[str, ...]


@dataclass(frozen=True)
class Capability:
    """One optional member: the Protocol declaring it and how the harness uses it."""

    protocol: type
    member: str
    args: Optional[Tuple[str, ...]]  # the positional arguments the harness passes; None: an attribute
    enables: str
    without: str  # what happens when the backend lacks it
    per_run: bool = False  # an attribute each run sets: None before the first run, declared all the same


CAPABILITIES: Tuple[Capability, ...] = (
    Capability(SupportsInvariance, "supports_invariance", ("name", "case"),
               "the bitwise invariances it declares (sub needs batch-invariant mode)",
               "rerun and perm are checked, sub is SKIPPED"),
    Capability(ExposesRouting, "routing_stages", ("inputs", "case"),
               "the alignment contract on every case with tokens", "alignment_contract is SKIPPED"),
    Capability(RunsPaths, "run_paths", ("inputs", "case"),
               "the paths invariance (internal paths give the default run's bits)", "invariance paths is SKIPPED"),
    Capability(ExposesStages, "run_stages", ("inputs", "case"),
               "a failing case localized to the first diverging stage and its expert/tile",
               "stage localization is SKIPPED (a failure is located by token, column and expert)"),
    Capability(ReportsConfig, "last_config", None, "the launch config recorded with each case",
               "no config recorded", per_run=True),
    Capability(ReportsConfig, "last_config_source", None, "where the launch config came from",
               "no config source recorded", per_run=True),
    Capability(ReportsAccumulation, "last_fp8_accumulation", None,
               "the gate models a GPU run's fp8 dots by the accumulator they used",
               "a GPU's fp8 dots are modelled as Hopper's fp8 MMA (the coarser accumulator)", per_run=True),
    Capability(DeclaresNumerics, "numerics_profile", None, "the mirror follows the declared numerics",
               "the mirror follows SPEC.md's numerics"),
    Capability(DeclaresNumerics, "gating", None, "the verdicts that decide the outcome",
               "the default gating policy for the backend applies"),
)
_REQUIRED = (("run", ("inputs", "case")), ("supports", ("case",)))


def capability(backend: Any, protocol: type) -> Optional[Any]:
    """The member of ``backend`` that implements ``protocol`` (a bound method; for the attribute
    Protocols the value of the first: ``last_config``, ``numerics_profile``), or None when the
    backend lacks it or sets it to None.

    The one place that answers "does this backend have X"; ``check_backend`` has made sure at
    load time that a declared method takes the harness's arguments."""
    members = [c.member for c in CAPABILITIES if c.protocol is protocol]
    if not members:
        raise ValueError(f"protocol must be one of the optional capabilities "
                         f"({', '.join(sorted({c.protocol.__name__ for c in CAPABILITIES}))}); got {protocol!r}")
    return declared(backend, members[0])


def declared(backend: Any, member: str) -> Optional[Any]:
    """The value of the optional member ``member`` (one of ``CAPABILITIES``: ``gating``,
    ``last_config_source``, ...) of ``backend``, or None when it lacks it or sets it to None."""
    if member not in {c.member for c in CAPABILITIES}:
        raise ValueError(f"member must be one of {', '.join(c.member for c in CAPABILITIES)}; got {member!r}")
    try:
        return getattr(backend, member, None)
    except Exception:  # a property that raises is treated as absent; check_backend said so at load
        return None


def _call_problem(fn: Any, args: Tuple[str, ...]) -> Optional[str]:
    """None if ``fn`` can be called with ``len(args)`` positional arguments, else what is wrong."""
    if not callable(fn):
        return f"is not callable (a {type(fn).__name__})"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension without a signature: cannot tell, accepted
        return None
    try:
        sig.bind(*args)
    except TypeError as exc:
        return f"has signature {sig}, which cannot take ({', '.join(args)}): {exc}"
    return None


def check_backend(obj: Any, spec: str) -> None:
    """TypeError unless ``obj`` has the required methods and every optional capability it declares
    has the expected form (see ``CAPABILITIES``). The message names the backend, the capability and
    what was expected."""
    kind = type(obj).__name__
    missing = [m for m, _ in _REQUIRED if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"backend {spec!r} must provide run(inputs, case=None) and supports(case); "
                        f"{kind} lacks {', '.join(missing)}")
    for member, args in _REQUIRED:
        problem = _call_problem(getattr(obj, member), args)
        if problem:
            raise TypeError(f"backend {spec!r} ({kind}): required method {member} {problem}; "
                            f"expected {member}({', '.join(args)})")
    for cap in CAPABILITIES:
        try:
            value = getattr(obj, cap.member, None)
        except Exception as exc:
            raise TypeError(f"backend {spec!r} ({kind}): capability {cap.protocol.__name__}: reading "
                            f"{cap.member} raised {type(exc).__name__}: {exc}") from None
        if value is None:
            continue
        if cap.args is not None:
            problem = _call_problem(value, cap.args)
            if problem:
                raise TypeError(f"backend {spec!r} ({kind}): capability {cap.protocol.__name__}: {cap.member} "
                                f"{problem}; expected a method {cap.member}({', '.join(cap.args)}) "
                                f"(or {cap.member} = None to declare it absent)")
        elif cap.member == "gating":
            if (not isinstance(value, (tuple, list)) or not value
                    or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"backend {spec!r} ({kind}): capability DeclaresNumerics: gating must be a "
                                f"non-empty tuple of verdict names (\"accuracy\", \"conformance\"); got {value!r}")


def capability_summary(backend: Any) -> Dict[str, Any]:
    """What the run header records: the optional capabilities the backend declares and lacks."""
    has, lacking = [], []
    for cap in CAPABILITIES:
        present = hasattr(backend, cap.member) if cap.per_run else declared(backend, cap.member) is not None
        (has if present else lacking).append(cap.member)
    profile = declared(backend, "numerics_profile")
    gating = declared(backend, "gating")
    return {"declared": has, "lacking": lacking,
            "numerics_profile": None if profile is None else getattr(profile, "name", type(profile).__name__),
            "gating": None if gating is None else list(gating)}


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


def _quant(inputs: "MoEInputs"):
    from moe_validate.contract.spec import QuantConfig

    return inputs.quant if inputs.quant is not None else QuantConfig()


def _storage_dtype(inputs: "MoEInputs"):
    from moe_validate.contract.spec import storage_dtype

    return storage_dtype(inputs.hidden_states.dtype)


# The second poison (``TritonBackend.run_paths``): finite and exact in fp32, fp16 and bf16, far above
# any O(1) activation. NaN catches an unwritten row that reaches the output through arithmetic;
# this one catches a read that NaN slips through: a max that skips NaN (the per-tensor absmax skips
# non-finite entries on purpose, SPEC "Bad input") or a select on isfinite. A correct kernel never
# reads an unwritten row (SPEC step 10), so its output bits cannot depend on the poison.
FINITE_POISON = 2.0 ** 14
POISON_VARIANT = f"default paths, output and workspaces poisoned with {FINITE_POISON:g} instead of NaN"


class TritonBackend:
    """``kernels.TritonExperts`` through its modular ``workspace_shapes`` + ``apply`` API."""

    name = "triton"

    def __init__(self, config=None) -> None:
        # ``config``: a kernels.KernelConfig forced on every run whatever the case says (tune checks
        # candidates, per-GEMM tiles included, that no case-id spelling can express).
        self.forced_config = config
        self.last_config: Optional[dict] = None
        self.last_config_source: Optional[dict] = None  # kernels.configs.ConfigSource of last_config
        self.last_fp8_accumulation = None  # kernels.configs.fp8_accumulation of last_config on this device

    def supports(self, case: "Case") -> Tuple[bool, str]:
        reason = case.device_skip_reason(device_capability(), interpreting())
        if reason:
            return False, reason
        import kernels
        from moe_validate.contract.spec import QuantConfig

        scheme = case.quant
        experts = kernels.TritonExperts(QuantConfig(scheme=scheme, group_size=case.group_size))
        weight_key, act_key = scheme.quant_keys
        if not experts.supports_quant_scheme(weight_key, act_key):
            return False, f"TritonExperts does not support {scheme.value} ({weight_key}, {act_key}) on this device"
        activation = case.act
        if not experts.supports_activation(activation):
            return False, f"TritonExperts does not support activation {activation.value} on this device"
        return True, ""

    def run(self, inputs: "MoEInputs", case: Optional["Case"] = None, *, assignment: str = "auto",
            fuse_activation="auto", fuse_topk_sum="auto", config=None, stages=None,
            poison: float = math.nan) -> "torch.Tensor":
        """``assignment``, ``fuse_activation`` and ``fuse_topk_sum`` pick TritonExperts' internal
        paths (the ``paths`` invariance re-runs with the ones not taken); the defaults let the
        kernels choose. ``last_paths`` records the ones taken. ``config`` (a kernels.KernelConfig)
        overrides the case's and the forced config. ``stages``: a dict for ``TritonExperts.apply`` to
        copy its intermediates into (``run_stages``); None, the default, copies nothing. ``poison``:
        what the output and workspaces hold before the call (NaN; ``run_paths`` also uses
        ``FINITE_POISON``)."""
        import torch

        import kernels

        quant = _quant(inputs)
        activation = inputs.activation
        hidden = inputs.hidden_states
        M, K = hidden.shape
        E, N, _ = inputs.w1.shape
        topk = inputs.topk_ids.shape[1]
        global_num_experts = inputs.global_num_experts if inputs.global_num_experts > 0 else E
        config, batch_invariant = self._launch_config(case, config)

        experts = kernels.TritonExperts(quant, assignment=assignment, fuse_activation=fuse_activation,
                                        fuse_topk_sum=fuse_topk_sum)
        ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
            M, N, K, topk, global_num_experts, E, None, activation
        )
        dtype = _storage_dtype(inputs)
        # NaN poison: every element the kernel should write is overwritten; anything left (or
        # read back before being written) propagates as NaN into the output and fails the case.
        output = torch.full(tuple(out_shape), poison, dtype=dtype, device=hidden.device)
        workspace13 = torch.full(tuple(ws13_shape), poison, dtype=dtype, device=hidden.device)
        workspace2 = torch.full(tuple(ws2_shape), poison, dtype=dtype, device=hidden.device)
        self.last_config = self.last_config_source = self.last_fp8_accumulation = None
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
                **({} if stages is None else {"stages": stages}),  # the plain call unless stages are asked for
            )
        finally:
            # Also when the launch fails: a COMPILE_ERROR record should name the config that failed.
            self.last_config = _config_to_dict(getattr(experts, "last_config", None))
            source = getattr(experts, "last_config_source", None)
            self.last_config_source = None if source is None else source.to_dict()
            self.last_fp8_accumulation = getattr(experts, "last_fp8_accumulation", None)
        self.last_paths = {"assignment": experts.last_assignment, "fused_activation": experts.last_fused_activation,
                           "fused_topk_sum": experts.last_fused_topk_sum}
        return output

    def run_stages(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> Dict[str, Any]:
        """``run`` once more, asking TritonExperts for the intermediates it materializes on the
        paths it takes (``ExposesStages``): route-major ``c1``, ``c2``, ``c2_in`` (the requantized
        GEMM2 input, dequantized to float64 from the codes and scales GEMM2 reads) and ``c3``; a
        stage that path never writes is a string saying so, not a recomputation."""
        from reference.quant import dequantize_activation

        captured: Dict[str, Any] = {}
        out = self.run(inputs, case, stages=captured)
        result: Dict[str, Any] = {"out": out}
        result["c1"] = captured.get("c1", "not materialized: the activation runs in GEMM1's epilogue "
                                          "(fused_activation), c1 is never written")
        result["c2"] = captured.get("c2", "not materialized in S: silu + fp8_block128 quantizes the fp32 activation "
                                          "directly (SPEC step 8), c2 is never stored")
        if "c2_codes" in captured:
            result["c2_in"] = dequantize_activation(captured["c2_codes"], captured["c2_scale"])
        else:
            result["c2_in"] = "not a stage of this scheme: GEMM2 reads c2 unquantized"
        result["c3"] = captured.get("c3", "not materialized: the top-k sum runs in GEMM2 (fused_topk_sum), c3 is "
                                          "never written")
        if inputs.hidden_states.shape[0] == 0:
            result.update({k: "no routes: M = 0" for k in ("c1", "c2", "c2_in", "c3")})
        return result

    def _launch_config(self, case: Optional["Case"], override) -> Tuple[Any, bool]:
        """(config, batch_invariant) for ``apply``: ``override``, else the forced config, else the
        case's. Case.config: "auto" = the kernels' own per-M choice (None), "inv" = the
        batch-invariant fixed config, anything else an explicit tile config ("BM16BN32BK32GM1W4S2")."""
        import kernels

        config, batch_invariant = None, False
        if case is not None and case.config == "inv":
            batch_invariant = True
        elif case is not None and case.config != "auto":
            explicit = case.explicit_config()
            if explicit is None:
                raise ValueError(f"case.config must be 'auto', 'inv' or like 'BM16BN32BK32GM1W4S2'; "
                                 f"got {case.config!r}")
            config = kernels.KernelConfig.from_dict(explicit)
        if self.forced_config is not None:
            config, batch_invariant = self.forced_config, False
        if override is not None:
            config, batch_invariant = override, False
        return config, batch_invariant

    def supports_invariance(self, name: str, case: "Case") -> Tuple[bool, str]:
        """Every SPEC invariance: ``config="inv"`` selects ``batch_invariant=True`` in ``run``."""
        return True, ""

    def run_paths(self, inputs: "MoEInputs", case: Optional["Case"] = None) -> List[Tuple]:
        """The same call through each internal path the kernels did not take by themselves, as
        the kernels declare them (``TritonExperts.alternative_paths``: the other assignment, the
        other top-k sum and activation placements where the call allows them). Every one must
        give the bits of the default run: a ``(label, output)`` pair; or, for a path at another
        launch config (which may move accumulation order), a ``(label, output, output at that
        config on the default path)`` triple. A run that takes another path than declared raises.

        Last, the default paths again with the output and workspaces poisoned with
        ``FINITE_POISON`` instead of NaN: what they held before the call must not change a bit
        (SPEC step 10)."""
        import kernels

        self.run(inputs, case)  # the default paths, recorded as last_paths
        taken, taken_config = dict(self.last_paths), self.last_config
        config, batch_invariant = self._launch_config(case, None)
        experts = kernels.TritonExperts(_quant(inputs))
        alternatives = experts.alternative_paths(
            *inputs.args(), activation=inputs.activation, expert_map=inputs.expert_map,
            global_num_experts=inputs.global_num_experts,
            apply_router_weight_on_input=inputs.apply_router_weight_on_input, lora=inputs.lora, config=config,
            batch_invariant=batch_invariant)
        variants: List[Tuple] = []
        try:
            for alternative in alternatives:
                out = self._run_switches(inputs, case, alternative.switches)
                if self.last_paths != alternative.takes.as_dict():
                    raise RuntimeError(f"TritonExperts declared {alternative.takes} for {alternative.label!r} "
                                       f"but took {self.last_paths}")
                if alternative.versus is None:
                    variants.append((alternative.label, out))
                else:
                    variants.append((alternative.label, out, self._run_switches(inputs, case, alternative.versus)))
            variants.append((POISON_VARIANT, self.run(inputs, case, poison=FINITE_POISON)))
        finally:
            self.last_paths, self.last_config = taken, taken_config  # describe the default run again
        return variants

    def _run_switches(self, inputs: "MoEInputs", case: Optional["Case"], switches) -> "torch.Tensor":
        return self.run(inputs, case, assignment=switches.assignment, fuse_activation=switches.fuse_activation,
                        fuse_topk_sum=switches.fuse_topk_sum, config=switches.config)

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
    # The installed vLLM's TritonExperts (moe_validate/vllm_backend.py); vLLM is imported on first use.
    "vllm": lambda: importlib.import_module("moe_validate.vllm_backend").VllmBackend(),
    # Calibration backends (moe_validate/ordered.py): a correct pipeline in another fp32 order,
    # real rounding flips against the mirror on a CPU.
    "ordered-reversed": lambda: importlib.import_module("moe_validate.ordered").OrderedBackend("reversed"),
    "ordered-sequential": lambda: importlib.import_module("moe_validate.ordered").OrderedBackend("sequential"),
    "ordered-split-k": lambda: importlib.import_module("moe_validate.ordered").OrderedBackend("split_k"),
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
    """Instance, class or factory -> a Backend instance, checked (``check_backend``)."""
    if interpreting():  # an outside backend's Triton kernels get the faithful interpreter too
        from moe_validate.contract import interpreter

        interpreter.install()
    if isinstance(obj, type):
        obj = obj()
    elif callable(obj) and not (hasattr(obj, "run") and hasattr(obj, "supports")):
        obj = obj()
    check_backend(obj, spec)
    if not getattr(obj, "name", None):
        try:
            obj.name = spec
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
        backend = _BUILTIN[spec]()
        check_backend(backend, spec)
        return backend
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
