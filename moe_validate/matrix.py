"""The case matrix: what one validation case is, which cases are valid, and the four suites.

A ``Case`` is a frozen value: shape (M, N, K, E, topk), storage dtype, quant scheme, activation,
LoRA mode, launch config, expert map, router-weight placement, bias, clamp, routing, data
distribution, int4 group size and seed. Its ``id`` is readable and stable and parses back with
``Case.from_id``; the CLI and the pytest plugin speak ids.

Suites are data: a few orthogonal axes crossed by small generators (one-value-at-a-time for
``smoke``/``premerge``, greedy all-pairs for ``nightly``) plus curated edge cases, each group under
a comment that says what it exercises. ``Case.is_valid`` decides which combinations exist at all
(SPEC.md); ``Case.device_skip_reason`` decides which of those the current device can run.

``E`` is the GLOBAL number of experts (``global_num_experts``); with ``expert_map="half"`` the
rank owns ``E // 2`` local experts, so ``w1`` is ``[E // 2, N, K]``.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from dataclasses import dataclass, fields, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from moe_validate.contract.spec import Activation, QuantScheme

__all__ = [
    "Case",
    "AXES",
    "SUITES",
    "suite_cases",
    "default_suite",
    "filter_cases",
    "pairwise_cases",
    "feasible_pairs",
    "case_pairs",
    "interpreter_cost",
    "backend_runs",
    "reference_is_sampled",
    "INVARIANCES",
]

DTYPES = ("fp32", "fp16", "bf16")
LORA_MODES = ("none", "single", "dual")
EXPERT_MAPS = ("none", "half")
# routing distributions (inputs.py builds them):
#   uniform        every token picks topk distinct experts uniformly at random
#   skewed         a few hot experts take most routes (Zipf-like draw without replacement)
#   one_expert     every token's first slot is the same expert (one very long expert run)
#   empty_experts  routes land on a subset of experts only; the rest receive no token
#   ties           equal router weights for every slot of a token (ids still distinct)
#   invalid_ids    some slots carry -1, E or huge ids (padded rows): they must contribute zero
ROUTINGS = ("uniform", "skewed", "one_expert", "empty_experts", "ties", "invalid_ids")
# data distributions of hidden states (inputs.py):
#   randn        standard normal
#   outliers     normal plus a few entries x64 (stresses per-token / per-tensor scales)
#   zero_blocks  a whole token row and a whole column group are zero (scale floor QUANT_EPS)
#   positive     |normal| (no cancellation; the output has a large mean)
DATAS = ("randn", "outliers", "zero_blocks", "positive")
# Values for curated cases only: valid everywhere, but not in AXES, so the generators do not cross
# them (a new crossed value would renumber the seed of every generated case after it).
#   routing strided_ids  uniform ids handed over as a strided view, the first topk columns of a
#                        [M, 2 * topk] tensor (SPEC: any int32/int64 [M, topk])
#   data tiny_row        one token row scaled by 2^-26 (absmax ~4e-8, below 1e-7): the dynamic
#                        scale's floor (SPEC 1e-10) is all that keeps its codes
#   data quant_ties      every entry an exact rounding tie of its row's dynamic scale
#                        (x / s = a midpoint of the code grid; s = 7 * 2^k, 1 / s inexact):
#                        the division and the ties-to-even rounding of the activation quantizer
#   data nan_token       one token (not the first) with NaN in column 0 and +Inf in its last
#                        column; the comparison leaves its row out (compare.evaluate): SPEC only
#                        asks that nothing of it leaks into the other tokens' rows
CURATED_ROUTINGS = ("strided_ids",)
CURATED_DATAS = ("tiny_row", "quant_ties", "nan_token")
INT4_GROUP_SIZES = (32, 64, 128)
# An explicit launch config: ``config_token`` spells it, ``parse_config_token`` reads it back.
_CONFIG_RE = re.compile(r"^BM(\d+)BN(\d+)BK(\d+)GM(\d+)W(\d+)S(\d+)$")
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
CONFIG_KINDS = ("auto", "inv")
EXPLICIT_CONFIGS = ("BM16BN32BK32GM1W4S2", "BM64BN64BK64GM8W4S3")


def parse_config_token(token: str) -> Optional[Dict[str, int]]:
    """"BM16BN32BK32GM1W4S2" -> the ``kernels.KernelConfig.from_dict`` fields; None for any other
    string. A case's config has one tile set, which GEMM2 shares (no ``+g2`` part)."""
    m = _CONFIG_RE.match(token)
    if not m:
        return None
    return dict(zip(_CONFIG_KEYS, map(int, m.groups())))


def config_token(config) -> str:
    """A ``kernels.KernelConfig`` spelled as in a case id; GEMM2's own tiles, where the config has
    them, follow as ``+g2BN..BK..GM..W..S..`` (tune's tables; no case id carries them)."""
    token = (f"BM{config.BLOCK_M}BN{config.BLOCK_N}BK{config.BLOCK_K}GM{config.GROUP_M}"
             f"W{config.num_warps}S{config.num_stages}")
    g2 = config.gemm2
    if g2 is not None:
        token += f"+g2BN{g2.BLOCK_N}BK{g2.BLOCK_K}GM{g2.GROUP_M}W{g2.num_warps}S{g2.num_stages}"
    return token

SUITES: Tuple[str, ...] = ("smoke", "premerge", "nightly", "bringup")
# Bitwise invariance checks a case can ask for (SPEC "Invariances"; moe_validate/invariance.py):
#   rerun  the same inputs again give the same bits
#   perm   permuted token rows give the permuted output rows
#   sub    with batch_invariant=True, a batch without one token gives the other tokens' rows
#          unchanged (the dropped token changes M's parity and shifts the rows after it)
INVARIANCES = ("rerun", "perm", "sub", "paths")


def _fmt_float(v: float) -> str:
    """A clamp limit in an id: ``7.0`` -> ``7``. Validity keeps limits in [0.01, 1e4], where
    ``{:g}`` needs neither a '-' (the id separator) nor an exponent."""
    return f"{v:g}"


@dataclass(frozen=True)
class Case:
    M: int
    N: int  # rows of w1[e]: 2*I for gated activations, I for *_no_mul
    K: int
    E: int  # global number of experts
    topk: int
    dtype: str = "bf16"
    scheme: str = "none"
    activation: str = "silu"
    lora: str = "none"
    config: str = "auto"
    expert_map: str = "none"
    router_on_input: bool = False
    bias: bool = False
    clamp: Optional[float] = None
    routing: str = "uniform"
    group_size: Optional[int] = None
    seed: int = 0
    # Contract addition (defaulted, so every contract-conforming constructor call still works):
    # the hidden-state distribution the task asks for ("outliers, zero blocks").
    data: str = "randn"
    # Bitwise invariance checks run after the comparison (moe_validate/invariance.py): "none" or
    # a '+'-joined subset of INVARIANCES in that order, e.g. "perm+sub".
    invariance: str = "none"

    # --- derived facts --------------------------------------------------------------------
    @property
    def act(self) -> Activation:
        return Activation.parse(self.activation)

    @property
    def quant(self) -> QuantScheme:
        return QuantScheme.parse(self.scheme)

    @property
    def I(self) -> int:  # noqa: E743 - the SPEC's name for the intermediate size
        return self.N // 2 if self.act.is_gated else self.N

    @property
    def local_experts(self) -> int:
        return self.E // 2 if self.expert_map == "half" else self.E

    # --- id ---------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        parts = [self.dtype, self.scheme, self.activation]
        if self.lora != "none":
            parts.append(f"lora_{self.lora}")
        parts.append(f"M{self.M}N{self.N}K{self.K}E{self.E}k{self.topk}")
        if self.config != "auto":
            parts.append(f"cfg_{self.config}")
        if self.expert_map != "none":
            parts.append(f"map_{self.expert_map}")
        if self.router_on_input:
            parts.append("rwin")
        if self.bias:
            parts.append("bias")
        if self.clamp is not None:
            parts.append(f"clamp{_fmt_float(self.clamp)}")
        if self.routing != "uniform":
            parts.append(f"rt_{self.routing}")
        if self.data != "randn":
            parts.append(f"d_{self.data}")
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.invariance != "none":
            parts.append(f"invar_{self.invariance}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id

    _SHAPE_RE = re.compile(r"^M(\d+)N(\d+)K(\d+)E(\d+)k(\d+)$")

    @classmethod
    def from_id(cls, case_id: str) -> "Case":
        """Parses ``Case.id`` back; ValueError naming the bad token otherwise."""
        if not isinstance(case_id, str) or not case_id:
            raise ValueError(f"case id must be a non-empty string; got {case_id!r}")
        expect = "dtype-scheme-activation[-lora_X]-M<M>N<N>K<K>E<E>k<topk>[-extras][-invar_X]-s<seed>"
        tokens = case_id.split("-")
        if len(tokens) < 5:
            raise ValueError(f"case id {case_id!r} must look like {expect}")
        kw: Dict[str, object] = {}
        dtype, scheme, activation = tokens[:3]
        if dtype not in DTYPES:
            raise ValueError(f"case id {case_id!r}: dtype token must be one of {', '.join(DTYPES)}; got {dtype!r}")
        try:
            QuantScheme.parse(scheme, name="case id scheme token")
            Activation.parse(activation, name="case id activation token")
        except ValueError as exc:
            raise ValueError(f"case id {case_id!r}: {exc}") from None
        kw.update(dtype=dtype, scheme=scheme, activation=activation)
        rest = tokens[3:]
        if rest and rest[0].startswith("lora_"):
            kw["lora"] = rest.pop(0)[len("lora_"):]
        if not rest:
            raise ValueError(f"case id {case_id!r} lacks the shape token M..N..K..E..k..")
        m = cls._SHAPE_RE.match(rest.pop(0))
        if not m:
            raise ValueError(f"case id {case_id!r}: shape token must be M<M>N<N>K<K>E<E>k<topk>")
        kw.update(zip(("M", "N", "K", "E", "topk"), map(int, m.groups())))
        if not rest or not re.fullmatch(r"s\d+", rest[-1]):
            raise ValueError(f"case id {case_id!r} must end with the seed token s<seed>")
        kw["seed"] = int(rest.pop()[1:])
        for tok in rest:
            if tok.startswith("cfg_"):
                kw["config"] = tok[4:]
            elif tok.startswith("map_"):
                kw["expert_map"] = tok[4:]
            elif tok == "rwin":
                kw["router_on_input"] = True
            elif tok == "bias":
                kw["bias"] = True
            elif tok.startswith("clamp"):
                try:
                    kw["clamp"] = float(tok[5:])
                except ValueError:
                    raise ValueError(f"case id {case_id!r}: clamp token must be clamp<float>; got {tok!r}") from None
            elif tok.startswith("rt_"):
                kw["routing"] = tok[3:]
            elif tok.startswith("d_"):
                kw["data"] = tok[2:]
            elif re.fullmatch(r"g\d+", tok):
                kw["group_size"] = int(tok[1:])
            elif tok.startswith("invar_"):
                kw["invariance"] = tok[len("invar_"):]
            else:
                raise ValueError(f"case id {case_id!r}: unknown token {tok!r} (expected {expect})")
        case = cls(**kw)  # type: ignore[arg-type]
        if case.id != case_id:
            raise ValueError(f"case id {case_id!r} is not canonical (it reads back as {case.id!r})")
        return case

    # --- data -------------------------------------------------------------------------------
    def params(self) -> Dict[str, object]:
        """Axis -> value, JSON scalars only (the results file's ``params``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # --- validity ---------------------------------------------------------------------------
    def is_valid(self) -> Tuple[bool, str]:
        """(True, "") or (False, the rule it breaks). Invalid cases are never collected."""
        reason = self._invalid_reason()
        return (reason is None, reason or "")

    def _invalid_reason(self) -> Optional[str]:  # noqa: C901 - one rule per line reads best
        for name in ("M", "N", "K", "E", "topk", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                return f"{name} must be an int; got {v!r}"
        if self.M < 0:
            return f"M must be >= 0; got {self.M}"
        for name in ("N", "K", "E", "topk"):
            if getattr(self, name) < 1:
                return f"{name} must be >= 1; got {getattr(self, name)}"
        if self.seed < 0:
            return f"seed must be >= 0; got {self.seed}"
        if self.dtype not in DTYPES:
            return f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}"
        try:
            scheme, act = self.quant, self.act
        except ValueError as exc:
            return str(exc)
        if self.lora not in LORA_MODES:
            return f"lora must be one of {', '.join(LORA_MODES)}; got {self.lora!r}"
        if self.expert_map not in EXPERT_MAPS:
            return f"expert_map must be one of {', '.join(EXPERT_MAPS)}; got {self.expert_map!r}"
        if self.routing not in ROUTINGS + CURATED_ROUTINGS:
            return f"routing must be one of {', '.join(ROUTINGS + CURATED_ROUTINGS)}; got {self.routing!r}"
        if self.data not in DATAS + CURATED_DATAS:
            return f"data must be one of {', '.join(DATAS + CURATED_DATAS)}; got {self.data!r}"
        reason = self._invariance_invalid_reason(scheme)
        if reason:
            return reason
        cfg = self.explicit_config()
        if self.config not in CONFIG_KINDS and cfg is None:
            return f"config must be auto, inv or like BM16BN32BK32GM1W4S2; got {self.config!r}"
        # SPEC "Shapes": a gated activation reads gate and up halves (or even/odd rows) of c1.
        if act.is_gated and self.N % 2:
            return f"gated activation {act} needs an even N (N = 2I); got N={self.N}"
        # topk distinct experts per token out of the global E.
        if self.topk > self.E:
            return f"topk must be <= E; got topk={self.topk}, E={self.E}"
        # SPEC "Pipeline" 3: the router weight can only be folded into x with one route per token.
        if self.router_on_input and self.topk != 1:
            return f"router_on_input needs topk=1 (SPEC pipeline step 3); got topk={self.topk}"
        # SPEC "Activations": the clamp limit applies to silu only.
        if self.clamp is not None:
            if act is not Activation.SILU:
                return f"clamp applies to silu only (SPEC Activations); got activation={act}"
            if not (0.01 <= float(self.clamp) <= 1e4):
                return f"clamp must be in [0.01, 1e4] (a positive limit spelled without exponent); got {self.clamp}"
        # SPEC "Quantization schemes": fp32 storage appears only in the `none` row; w8a16/w4a16
        # take fp16/bf16 activations; fp8/int8 activation schemes quantize the input anyway, so an
        # fp32 S would only change intermediate roundings nobody deploys (vLLM runs them in bf16/fp16).
        if self.dtype == "fp32" and scheme is not QuantScheme.NONE:
            return f"fp32 storage is specified for scheme none only (SPEC quant table); got scheme={scheme}"
        # int4_w4a16: group scales [E, N, K/g] and [E, K, I/g] need g | K and g | I, g in {32,64,128}.
        if scheme is QuantScheme.INT4_W4A16:
            if self.group_size not in INT4_GROUP_SIZES:
                return f"int4_w4a16 needs group_size in {INT4_GROUP_SIZES}; got {self.group_size}"
            if self.K % self.group_size or self.I % self.group_size:
                return f"int4_w4a16 group_size {self.group_size} must divide K={self.K} and I={self.I}"
        elif self.group_size is not None:
            return f"group_size applies to int4_w4a16 only; got scheme={scheme}"
        # LoRA is allowed with every scheme, activation and dtype: SPEC "LoRA" feeds the adapters
        # the UNQUANTIZED activations and adds the deltas to c1/c3 in S, so the scheme never
        # reaches the LoRA arithmetic (it only disables the fused silu+fp8 path, SPEC step 8).
        if self.expert_map == "half" and (self.E < 2 or self.E % 2):
            return f"expert_map=half needs an even E >= 2; got E={self.E}"
        if self.routing == "empty_experts" and self.E < 2 * self.topk:
            return f"routing=empty_experts routes to E//2 experts, so it needs E >= 2*topk; got E={self.E}, topk={self.topk}"
        if self.routing == "one_expert" and self.E < 2:
            return "routing=one_expert needs E >= 2 (with E=1 every routing is one expert)"
        if self.data == "tiny_row" and self.dtype == "fp16":
            return "data=tiny_row needs bf16 or fp32 storage (fp16's normal range ends at 6e-5; the row would be subnormal)"
        if self.data == "quant_ties":
            if scheme.act_granularity not in ("token", "token_group", "tensor_dynamic"):
                return f"data=quant_ties needs a dynamic activation scale (per token, group or tensor); got scheme={scheme}"
            # int8 ties (j + 1/2) * 7 * 2^-8 need 11 significant bits, fp8 ties at most 8
            if scheme.value.startswith("int8") and self.dtype != "fp16":
                return f"data=quant_ties with int8 activations needs fp16 storage (11-bit ties); got dtype={self.dtype}"
            if self.router_on_input:
                return "data=quant_ties excludes router_on_input (round_S(x * w) moves the entries off their ties)"
        if self.data == "nan_token":
            if self.M < 2:
                return f"data=nan_token needs M >= 2 (a token it could leak into); got M={self.M}"
            # the comparison runs the reference without that token (compare.evaluate's row selection)
            if scheme.has_dynamic_tensor_scale:
                return (f"data=nan_token needs every output row to depend on its own token only; {scheme} has a "
                        f"batch-wide dynamic scale")
        if cfg is not None:
            bm, bn, bk, gm, w, s = (cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"))
            for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
                if v < 16 or v & (v - 1):
                    return f"config {name} must be a power of two >= 16 (tl.dot tile); got {v}"
            if w not in (1, 2, 4, 8, 16) or s < 1 or gm < 1:
                return f"config must have num_warps in 1..16 (power of two), num_stages >= 1, GROUP_M >= 1; got {self.config}"
            # SPEC "Quantization schemes": a K tile must not straddle a 128 scale group.
            if scheme is QuantScheme.FP8_BLOCK128 and 128 % bk:
                return f"fp8_block128 needs BLOCK_K dividing 128 (no K tile across a scale group); got {bk}"
            # int4: one K tile reads one group scale, so BLOCK_K must divide the group size
            # (kernels/configs.check_config enforces the same rule at launch)
            if scheme is QuantScheme.INT4_W4A16 and self.group_size % bk:
                return f"int4_w4a16 needs BLOCK_K dividing group_size {self.group_size}; got BLOCK_K={bk}"
        return None

    @property
    def invariances(self) -> Tuple[str, ...]:
        """The invariance checks this case asks for, in INVARIANCES order (() for "none")."""
        return () if self.invariance == "none" else tuple(self.invariance.split("+"))

    def _invariance_invalid_reason(self, scheme: QuantScheme) -> Optional[str]:
        if not isinstance(self.invariance, str):
            return f"invariance must be a str; got {self.invariance!r}"
        if self.invariance == "none":
            return None
        names = self.invariance.split("+")
        expect = f"'none' or a '+'-joined subset of {'+'.join(INVARIANCES)} in that order"
        if any(n not in INVARIANCES for n in names) or len(set(names)) != len(names) \
                or names != sorted(names, key=INVARIANCES.index):
            return f"invariance must be {expect}; got {self.invariance!r}"
        # Permuting or dropping tokens needs two tokens to say anything.
        if ("perm" in names or "sub" in names) and self.M < 2:
            return f"invariance perm/sub need M >= 2; got M={self.M}"
        # SPEC "Invariances": batch invariance holds only without a batch-wide dynamic scale (the
        # fp8_tensor_dynamic scale is a max over every route of the batch, so dropping a token
        # legitimately changes every other token's quantization).
        if "sub" in names and scheme.has_dynamic_tensor_scale:
            return (f"invariance sub (batch invariance) does not hold for {scheme.value}: its dynamic "
                    f"per-tensor scale spans the whole batch (SPEC Invariances)")
        return None

    def explicit_config(self) -> Optional[Dict[str, int]]:
        return parse_config_token(self.config)

    # --- device -----------------------------------------------------------------------------
    def device_skip_reason(self, capability: Optional[Tuple[int, int]], interpreting: bool) -> Optional[str]:
        """Why this device cannot run the case (None = it can)."""
        if interpreting:
            # The interpreter runs every scheme (fp8 casts are made exact by kernels/_interp.py),
            # but it executes each program in Python: cost grows with the work per program
            # count. Beyond this budget one case takes minutes on a CI core.
            cost = interpreter_cost(self)
            if cost > INTERPRETER_COST_LIMIT:
                return (f"too slow under the Triton interpreter: ~{cost:.2e} MACs > "
                        f"{INTERPRETER_COST_LIMIT:.0e} (run it on a GPU)")
            return None
        if capability is None:
            return "needs a CUDA GPU or TRITON_INTERPRET=1 (no device to run Triton on)"
        need = self.quant.min_capability
        if need is not None and tuple(capability) < need:
            return (f"{self.scheme} needs compute capability sm{need[0]}{need[1]}+ "
                    f"(SPEC quant table); this GPU is sm{capability[0]}{capability[1]}")
        cfg = self.explicit_config()
        if cfg is not None and self.quant.is_fp8 and cfg["BLOCK_K"] < 32:
            return "fp8 tl.dot needs BLOCK_K >= 32 on the GPU (TRITON_NOTES.md); config has BLOCK_K < 32"
        return None


# MACs of both GEMMs plus LoRA, the interpreter's cost proxy (its time is ~linear in the work
# for a fixed tile shape). 2e7 MACs is a few seconds per case on one CI core with the tiles the
# kernels pick for tiny shapes; smoke cases stay far below.
INTERPRETER_COST_LIMIT = 2e7


def interpreter_cost(case: Case) -> float:
    routes = case.M * case.topk
    gemm = routes * (case.N * case.K + case.K * case.I)
    lora = routes * 8 * (case.K + case.N + case.I + case.K) if case.lora != "none" else 0
    return float(gemm + lora) * backend_runs(case)


def backend_runs(case: Case) -> int:
    """How many times the backend runs for this case: once, plus its invariance checks (the
    sub-batch check runs the full batch again in batch-invariant mode unless the case already
    fixes its config)."""
    runs = 1
    for name in case.invariances:
        runs += 1
        if name == "sub" and case.config == "auto":
            runs += 1
    return runs


# The float64 reference keeps, per precision (mirror and exact), c1 [M*topk, N], the activation
# [M*topk, I] and c3 [M*topk, K]. Past REFERENCE_FULL_LIMIT_BYTES (8 GiB: a tenth of an 80 GB
# GPU, and 12x the largest curated bring-up case, M=8192 N=K=1024 topk=2 at 0.67 GB) it runs on a
# sample of REFERENCE_SAMPLE_ROWS token rows (compare.sampled_rows) and only those rows are
# compared. Sound only where every output row depends on its own token alone: not for schemes
# with a batch-wide dynamic scale (those keep the full reference, and an OOM is an outcome).
REFERENCE_FULL_LIMIT_BYTES = 8 * 2 ** 30
REFERENCE_SAMPLE_ROWS = 256


def reference_full_bytes(case: Case) -> int:
    """float64 bytes of the full reference's per-route stages, both precisions."""
    return 2 * 8 * case.M * case.topk * (case.N + case.I + case.K)


def reference_is_sampled(case: Case) -> bool:
    """Whether ``compare.evaluate`` runs the reference on sampled token rows for this case."""
    return (case.M > REFERENCE_SAMPLE_ROWS and reference_full_bytes(case) > REFERENCE_FULL_LIMIT_BYTES
            and not case.quant.has_dynamic_tensor_scale)


# =================================================================================================
# Axes and generators
# =================================================================================================
# The orthogonal axes every suite draws from (values in their natural order; the first value is
# the default used when an axis is not being varied).
AXES: Dict[str, Tuple] = {
    "dtype": ("bf16", "fp16", "fp32"),
    "scheme": tuple(s.value for s in QuantScheme),
    "activation": tuple(a.value for a in Activation),
    "lora": LORA_MODES,
    "config": ("auto", "inv") + EXPLICIT_CONFIGS,
    "expert_map": EXPERT_MAPS,
    "router_on_input": (False, True),
    "bias": (False, True),
    "clamp": (None, 7.0),
    "routing": ROUTINGS,
    "data": DATAS,
    "group_size": (None,) + INT4_GROUP_SIZES,
}


def _repair(case: Case) -> Case:
    """Adjusts dependent fields so that a generated case is valid when it can be.

    Only fields that a rule ties to another are touched (topk for router_on_input, group_size
    for int4); the axis values a generator chose are kept, so an impossible pair stays invalid.
    """
    kw = {}
    if case.router_on_input and case.topk != 1:
        kw["topk"] = 1
    if case.scheme == "int4_w4a16":
        if case.group_size is None:
            fitting = [g for g in INT4_GROUP_SIZES if case.K % g == 0 and case.I % g == 0]
            if fitting:
                kw["group_size"] = fitting[-1]
    if case.routing == "empty_experts" and case.E < 2 * (kw.get("topk", case.topk)):
        kw["topk"] = max(1, case.E // 2)
    return replace(case, **kw) if kw else case


def _one_at_a_time(base: Case, axes: Dict[str, Sequence], seed0: int, skip_values: Dict[str, set] = None) -> List[Case]:
    """Every value of every axis at least once, each varied alone from ``base`` (then repaired)."""
    out: List[Case] = []
    seed = seed0
    for axis, values in axes.items():
        for v in values:
            if skip_values and v in skip_values.get(axis, ()):
                continue
            kw = {axis: v, "seed": seed}
            # partner values that a rule requires (recorded here rather than hidden in repair):
            if axis == "clamp" and v is not None:
                kw["activation"] = "silu"
            if axis == "dtype" and v == "fp32":
                kw["scheme"] = "none"
            if axis == "group_size" and v is not None:
                kw["scheme"] = "int4_w4a16"
            c = _repair(replace(base, **kw))
            seed += 1
            if c.is_valid()[0]:
                out.append(c)
    return out


def case_pairs(case: Case, axes: Dict[str, Sequence] = None) -> set:
    """The set of ((axis, value), (axis, value)) pairs a case covers."""
    axes = axes or AXES
    items = [(a, getattr(case, a)) for a in axes]
    return {tuple(sorted(p, key=str)) for p in itertools.combinations(items, 2)}


def _pair_case(base: Case, a: str, va, b: str, vb) -> Optional[Case]:
    """The base case with the two values imposed and dependents repaired, or None if impossible."""
    kw = {a: va, b: vb}
    c = replace(base, **kw)
    # partners the rules demand, chosen without touching a or b
    fixes = []
    if c.clamp is not None and "activation" not in kw:
        fixes.append(("activation", "silu"))
    if c.dtype == "fp32" and "scheme" not in kw:
        fixes.append(("scheme", "none"))
    if c.group_size is not None and "scheme" not in kw:
        fixes.append(("scheme", "int4_w4a16"))
    if c.scheme != "int4_w4a16" and c.group_size is not None and "group_size" not in kw:
        fixes.append(("group_size", None))
    if c.scheme != "none" and c.dtype == "fp32" and "dtype" not in kw:
        fixes.append(("dtype", "bf16"))
    if c.activation != "silu" and c.clamp is not None and "clamp" not in kw:
        fixes.append(("clamp", None))
    if fixes:
        c = replace(c, **dict(fixes))
    c = _repair(c)
    if getattr(c, a) != va or getattr(c, b) != vb:  # a rule forced one of the pair away
        return None
    return c if c.is_valid()[0] else None


def feasible_pairs(base: Case, axes: Dict[str, Sequence] = None) -> Tuple[set, Dict[tuple, str]]:
    """(pairs some valid case on base's shape can cover, {impossible pair: the rule it breaks})."""
    axes = axes or AXES
    ok, impossible = set(), {}
    names = list(axes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for va in axes[a]:
                for vb in axes[b]:
                    pair = tuple(sorted(((a, va), (b, vb)), key=str))
                    c = _pair_case(base, a, va, b, vb)
                    if c is None:
                        raw = replace(base, **{a: va, b: vb})
                        impossible[pair] = raw.is_valid()[1] or "a rule forces another value (e.g. int4 needs a group_size)"
                    else:
                        ok.add(pair)
    return ok, impossible


def pairwise_cases(base: Case, axes: Dict[str, Sequence] = None, seed0: int = 0) -> List[Case]:
    """A greedy all-pairs cover: every feasible pair of axis values in at least one valid case.

    Greedy in the AETG style: for each still-uncovered pair, start a case from that pair and
    fill the other axes one by one with the value that covers most uncovered pairs (ties by
    the axis' value order, so the result is deterministic), keeping the case valid.
    """
    axes = axes or AXES
    todo, _ = feasible_pairs(base, axes)
    names = list(axes)
    cases: List[Case] = []
    seed = seed0
    while todo:
        first = min(todo, key=lambda p: (str(p[0][0]), str(p[0][1]), str(p[1][0]), str(p[1][1])))
        (a, va), (b, vb) = first
        cur = _pair_case(base, a, va, b, vb)
        fixed = {a, b}
        for axis in names:
            if axis in fixed:
                continue
            best, best_gain = None, -1
            for v in axes[axis]:
                cand = _repair(replace(cur, **{axis: v}))
                if not cand.is_valid()[0]:
                    continue
                # the axes already fixed must keep their values (repair may move topk only)
                if any(getattr(cand, f) != getattr(cur, f) for f in fixed):
                    continue
                gain = len(case_pairs(cand, axes) & todo)
                if gain > best_gain:
                    best, best_gain = cand, gain
            if best is not None:
                cur = best
            fixed.add(axis)
        cur = replace(cur, seed=seed)
        seed += 1
        covered = case_pairs(cur, axes) & todo
        assert first in covered, f"pairwise generator lost its seed pair {first} in {cur.id}"
        todo -= covered
        cases.append(cur)
    return cases


# =================================================================================================
# Suites
# =================================================================================================
def _smoke() -> List[Case]:
    # Tiny shapes for the CPU interpreter: M <= 9, N <= 64, K <= 64, E <= 4 (one case K=128 for
    # int4 g128, which needs K and I divisible by 128). Every axis value appears at least once.
    base = Case(M=7, N=64, K=64, E=4, topk=2)
    axes = dict(AXES)
    axes.pop("group_size")
    cases = _one_at_a_time(base, axes, seed0=0)
    # int4 group sizes: g32 fits I=32 (gated N=64); g64 needs I=64 (no_mul N=64);
    # g128 needs K and I of 128: the single larger smoke case.
    cases += [
        Case(M=5, N=64, K=64, E=4, topk=2, scheme="int4_w4a16", group_size=32, seed=100),
        Case(M=5, N=64, K=64, E=4, topk=2, scheme="int4_w4a16", activation="silu_no_mul", group_size=64, seed=101),
        Case(M=3, N=128, K=128, E=2, topk=1, scheme="int4_w4a16", activation="gelu_no_mul", group_size=128, seed=102),
    ]
    # every quant scheme with bias, with LoRA and with fp16 (the schemes are the riskiest axis)
    for i, s in enumerate(AXES["scheme"]):
        g = 32 if s == "int4_w4a16" else None
        cases.append(Case(M=9, N=64, K=64, E=4, topk=2, scheme=s, bias=True, group_size=g, dtype="fp16", seed=110 + i))
        cases.append(Case(M=6, N=64, K=64, E=3, topk=2, scheme=s, lora="dual", group_size=g,
                          activation="swigluoai" if i % 2 else "gelu_tanh", seed=130 + i))
    # every activation with an fp8 scheme (requantization of the activation output)
    for i, a in enumerate(AXES["activation"]):
        cases.append(Case(M=5, N=64, K=64, E=4, topk=2, scheme="fp8_block128" if i % 2 else "int8_channel_token",
                          activation=a, seed=150 + i))
    # edges: no tokens; one token; one expert; topk = E; odd K (masks); E not a power of two;
    # router weight on input with an expert map; all routes invalid but the first
    cases += [
        Case(M=0, N=64, K=64, E=4, topk=2, seed=170),
        Case(M=1, N=64, K=64, E=4, topk=2, seed=171),
        Case(M=4, N=32, K=32, E=1, topk=1, seed=172),
        Case(M=5, N=32, K=32, E=3, topk=3, seed=173),
        Case(M=6, N=64, K=63, E=4, topk=2, seed=174),
        Case(M=6, N=48, K=40, E=3, topk=2, scheme="fp8_channel_token", seed=175),
        Case(M=8, N=64, K=64, E=4, topk=1, router_on_input=True, expert_map="half", seed=176),
        Case(M=9, N=64, K=64, E=4, topk=2, routing="invalid_ids", lora="single", bias=True, seed=177),
    ]
    # planted-bug coverage (moe-validate selftest kill matrix): an activation constant changed in
    # the 4th digit moves outputs ~1e-4..1e-3 relative, inside bf16's gate, so fp32 cases; a clamp
    # limit that randn gate values actually exceed (clamp 7 is never reached on N(0, 1) data); fp8
    # block scales with more than one 128-block per expert along both N and K, so a transposed or
    # shifted block-scale index reads a different scale
    cases += [
        Case(M=5, N=64, K=64, E=4, topk=2, dtype="fp32", activation="gelu_tanh_no_mul", seed=19),
        Case(M=5, N=64, K=64, E=4, topk=2, dtype="fp32", activation="swigluoai", seed=15),
        Case(M=7, N=64, K=64, E=4, topk=2, clamp=1.0, seed=35),
        Case(M=5, N=320, K=256, E=4, topk=2, scheme="fp8_block128", seed=4),
    ]
    # bitwise invariances (SPEC "Invariances", moe_validate/invariance.py). topk >= 3 so that the
    # slot order of the combine matters; fp32 storage, where a reordered fp32 sum shows in the
    # output bits (bf16 rounds one fp32 ulp away almost always); the aligned path (M*topk*4 > E)
    # and the tiny-M naive path (M*topk*4 <= E, also after dropping a token); an fp8 per-token-
    # group scheme (the quantizer must not look across tokens), LoRA (per-token adapter ids
    # travel with their rows), and fp8_tensor_dynamic, whose batch-wide scale allows only perm.
    cases += [
        Case(M=7, N=64, K=64, E=4, topk=3, dtype="fp32", invariance="rerun+perm+sub", seed=190),
        Case(M=3, N=32, K=32, E=40, topk=3, dtype="fp32", invariance="perm+sub", seed=191),
        Case(M=6, N=64, K=64, E=4, topk=3, scheme="fp8_block128", invariance="perm+sub", seed=192),
        Case(M=4, N=64, K=64, E=4, topk=2, lora="single", invariance="perm+sub", seed=193),
        Case(M=5, N=64, K=64, E=4, topk=3, scheme="fp8_tensor_dynamic", invariance="rerun+perm", seed=194),
        # internal paths (naive vs aligned, activation fused into GEMM1 or not) in bf16, where a
        # skipped rounding of c1 shows in the bits; gated and interleaved activations
        Case(M=6, N=64, K=64, E=4, topk=2, invariance="paths", seed=195),
        Case(M=4, N=64, K=64, E=4, topk=2, activation="swigluoai", invariance="paths", seed=196),
        Case(M=7, N=64, K=64, E=4, topk=2, clamp=1.0, invariance="paths", seed=197),
        # silu + fp8_block128: GEMM1 fuses the fp8 group quantization only at BLOCK_N = 256 (no
        # default config has it), which run_paths forces for this comparison; I = 32 fills part of
        # the one 128-column group (the rest is zeros on both paths), enough to reach every line
        Case(M=4, N=64, K=64, E=4, topk=2, scheme="fp8_block128", invariance="paths", seed=198),
    ]
    # coverage the independent mutant set (docs/MUTANTS_INDEPENDENT.md) found missing, one line each:
    cases += [
        # int4 zero points read per K group when a group spans two K tiles (g64 > BLOCK_K 32; odd
        # seed: explicit zero points)
        Case(M=5, N=64, K=64, E=4, topk=2, scheme="int4_w4a16", activation="silu_no_mul", group_size=64,
             config="BM16BN32BK32GM1W4S2", seed=201),
        # fp8_block128 with a gated activation fused into GEMM1 and I = 128: a tile's gate rows
        # and its up rows (I + j) lie in different 128-row weight scale blocks
        Case(M=3, N=256, K=64, E=2, topk=1, scheme="fp8_block128", activation="gelu", seed=202),
        # GROUP_M swizzle with a partial last group of row tiles that all hold routes (the naive
        # path: one route per tile) and two column tiles per GEMM
        Case(M=3, N=64, K=64, E=16, topk=1, config="BM16BN32BK32GM4W4S2", seed=203),
        # invalid ids (-1, E, huge) together with an expert_map: bound checks before the map lookup
        Case(M=9, N=64, K=64, E=4, topk=2, expert_map="half", routing="invalid_ids", seed=204),
        # the combine's slot order and its one rounding with topk = 3, where both matter: moe_sum
        # against GEMM2's fused top-k sum (the paths invariance) in bf16 (an extra rounding per
        # slot) and in fp32 (a reordered fp32 sum shows in the bits)
        Case(M=6, N=64, K=64, E=4, topk=3, invariance="paths", seed=205),
        Case(M=6, N=64, K=64, E=4, topk=3, dtype="fp32", invariance="paths", seed=206),
        # the +-7 clamps of swigluoai and swiglustep reached from both sides (outliers push c1 past
        # +-7, which randn data never does), in fp32 where a clamp on the wrong side shows
        Case(M=5, N=64, K=64, E=4, topk=2, dtype="fp32", activation="swigluoai", data="outliers", seed=207),
        Case(M=5, N=64, K=64, E=4, topk=2, dtype="fp32", activation="swiglustep", data="outliers", seed=208),
        # the per-tensor dynamic absmax on rows whose width (K = 40, I = 24) is not a power of two,
        # so the column loop ends on a partial chunk
        Case(M=5, N=48, K=40, E=4, topk=2, scheme="fp8_tensor_dynamic", seed=209),
        # two w13 LoRA slices (even seed) with swigluoai: slice 0 on the even rows, slice 1 on the odd
        Case(M=6, N=64, K=64, E=3, topk=2, activation="swigluoai", lora="single", seed=210),
        # LoRA with the router weight on the input: the w13 delta reads round_S(x * w), not x
        Case(M=6, N=64, K=64, E=4, topk=1, router_on_input=True, lora="single", seed=211),
        # silu + fp8_block128 with gemm1_clamp_limit: the clamp rules out the fused fp8 group path
        Case(M=5, N=64, K=64, E=4, topk=2, scheme="fp8_block128", clamp=1.0, seed=212),
        # topk_ids as a strided view (row stride 2 * topk): the ids are read through their strides
        Case(M=6, N=64, K=64, E=4, topk=2, routing="strided_ids", seed=213),
        # one token at ~4e-8 (below 1e-7), activation linear near 0 so that GEMM2's input stays
        # tiny too: the dynamic scale's floor is SPEC's 1e-10, nothing larger
        Case(M=4, N=64, K=64, E=4, topk=2, scheme="int8_channel_token", activation="silu_no_mul",
             data="tiny_row", seed=214),
        # hidden states of exact rounding ties for their per-token scale, fp8 (bf16) and int8 (fp16):
        # the quantizer divides (x * (1 / s) moves ties) and rounds ties to even
        Case(M=4, N=64, K=64, E=4, topk=2, scheme="fp8_channel_token", data="quant_ties", seed=215),
        Case(M=4, N=64, K=64, E=4, topk=2, dtype="fp16", scheme="int8_channel_token", data="quant_ties",
             seed=216),
        # the per-tensor dynamic absmax over c2 with invalid routes (unwritten rows), and the paths
        # invariance, whose rerun with a finite workspace poison shows a read of those rows (the
        # absmax skips the NaN poison)
        Case(M=6, N=64, K=64, E=4, topk=2, scheme="fp8_tensor_dynamic", routing="invalid_ids",
             invariance="paths", seed=217),
        # NaN and Inf in one token's input, compared on the other tokens (SPEC Bad input: it must
        # not leak); K = 63 ends on a partial K tile, where a load past a row's end reads the next
        # token's column 0
        Case(M=6, N=64, K=63, E=4, topk=2, data="nan_token", seed=218),
    ]
    return _dedupe(cases)


def _premerge() -> List[Case]:
    # One GPU, < 2 minutes: mid-size shapes, every axis value once, plus every scheme crossed
    # with a gated activation on a shape with several K tiles and partial N tiles.
    base = Case(M=100, N=512, K=256, E=8, topk=2)
    axes = dict(AXES)
    axes.pop("group_size")
    cases = _one_at_a_time(base, axes, seed0=1000)
    cases += [Case(M=64, N=512, K=256, E=8, topk=2, scheme="int4_w4a16", group_size=g, seed=1100 + i)
              for i, g in enumerate(INT4_GROUP_SIZES)]
    for i, s in enumerate(AXES["scheme"]):
        g = 64 if s == "int4_w4a16" else None
        cases.append(Case(M=33, N=384, K=320, E=6, topk=3, scheme=s, group_size=g, bias=True, seed=1120 + i))
    # shapes that stress masks and sorting: M=1 decode, odd K, E=1, topk=E, many experts
    cases += [
        Case(M=1, N=256, K=128, E=8, topk=2, seed=1140),
        Case(M=17, N=256, K=200, E=4, topk=2, scheme="fp8_block128", seed=1141),
        Case(M=64, N=256, K=128, E=1, topk=1, seed=1142),
        Case(M=31, N=128, K=128, E=4, topk=4, seed=1143),
        Case(M=256, N=256, K=256, E=64, topk=8, seed=1144),
        Case(M=0, N=256, K=128, E=8, topk=2, seed=1145),
    ]
    # bitwise invariances on GPU tiles (see _smoke): aligned fp32, the naive path, an fp8 scheme
    # with several K tiles, and the batch-invariant config itself
    cases += [
        Case(M=100, N=512, K=256, E=8, topk=3, dtype="fp32", invariance="rerun+perm+sub", seed=1150),
        Case(M=3, N=256, K=128, E=64, topk=3, dtype="fp32", invariance="perm+sub", seed=1151),
        Case(M=65, N=384, K=320, E=6, topk=4, scheme="fp8_block128", invariance="rerun+perm+sub", seed=1152),
        Case(M=77, N=320, K=480, E=12, topk=3, config="inv", invariance="perm+sub", seed=1153),
        # internal paths on native MMAs: bf16 gated, interleaved swigluoai, fp8 per-token
        Case(M=48, N=512, K=256, E=8, topk=2, invariance="paths", seed=1154),
        Case(M=33, N=384, K=320, E=6, topk=4, activation="swigluoai", invariance="paths", seed=1155),
        Case(M=40, N=256, K=256, E=8, topk=2, scheme="fp8_tensor_token", invariance="paths", seed=1156),
        # silu + fp8_block128: the fp8 group quantization fused into GEMM1 (BLOCK_N = 256, forced
        # by run_paths) vs the separate quantizer, two column tiles of c2
        Case(M=48, N=512, K=256, E=8, topk=2, scheme="fp8_block128", invariance="paths", seed=1157),
        # fp32 storage on the naive path, both top-k sum placements: where the GPU compiler could
        # contract the fused sum's add with the epilogue's product (docs/MUTANTS_INDEPENDENT.md)
        Case(M=3, N=256, K=128, E=64, topk=3, dtype="fp32", invariance="paths", seed=1158),
    ]
    return _dedupe(cases)


def _nightly() -> List[Case]:
    # All-pairs over every axis on one mid shape, the premerge cases, and shapes where
    # tiling changes (partial tiles on every dimension, large E, large M).
    base = Case(M=80, N=512, K=384, E=16, topk=2)
    cases = pairwise_cases(base, AXES, seed0=2000)
    cases += _premerge()
    cases += [
        Case(M=257, N=1024, K=512, E=32, topk=4, scheme=s, group_size=(128 if s == "int4_w4a16" else None), seed=2500 + i)
        for i, s in enumerate(AXES["scheme"])
    ]
    cases += [
        Case(M=129, N=2 * 352, K=448, E=10, topk=3, activation=a, seed=2520 + i)
        for i, a in enumerate(AXES["activation"])
    ]
    return _dedupe(cases)


def _bringup() -> List[Case]:
    # Everything in nightly, plus stress and edge shapes.
    cases = _nightly()
    edge_shapes = [
        # (M, N, K, E, topk): what it exercises
        (1, 256, 511, 8, 2),      # K=511: odd K, partial last K tile everywhere
        (64, 256, 512, 33, 3),    # E not a multiple of 32 (expert-id tiling)
        (64, 256, 256, 1, 1),     # E=1
        (32, 256, 256, 6, 6),     # topk = E: every token visits every expert
        (0, 256, 256, 8, 2),      # M=0: nothing to do, must not launch or crash
        (1, 4096, 2048, 64, 8),   # M=1 decode on a large layer
        (8192, 1024, 1024, 8, 2), # huge M: thousands of routes per expert
        (333, 768, 640, 128, 8),  # many experts, most with few tokens
    ]
    for i, (M, N, K, E, k) in enumerate(edge_shapes):
        for j, s in enumerate(("none", "fp8_block128", "int8_channel_token", "int8_w8a16")):
            cases.append(Case(M=M, N=N, K=K, E=E, topk=k, scheme=s, seed=3000 + 10 * i + j))
    # stress data and routing on the large shape: outliers with per-tensor scales, all tokens to
    # one expert, invalid ids with LoRA
    cases += [
        Case(M=4096, N=1024, K=1024, E=16, topk=2, scheme="fp8_tensor_dynamic", data="outliers", seed=3100),
        Case(M=4096, N=1024, K=1024, E=16, topk=2, scheme="fp8_block128", routing="one_expert", seed=3101),
        Case(M=2048, N=1024, K=1024, E=16, topk=2, lora="dual", routing="invalid_ids", seed=3102),
        Case(M=2048, N=1024, K=1024, E=16, topk=2, scheme="int4_w4a16", group_size=128, data="zero_blocks", seed=3103),
    ]
    # every scheme under the batch-invariant config and an explicit config, on odd shapes
    for i, s in enumerate(AXES["scheme"]):
        g = 32 if s == "int4_w4a16" else None
        cases.append(Case(M=77, N=320, K=480, E=12, topk=2, scheme=s, group_size=g, config="inv", seed=3200 + i))
        # (int4 g32 needs BLOCK_K | 32, so it gets the small explicit config)
        cfg = EXPLICIT_CONFIGS[0] if s == "int4_w4a16" else EXPLICIT_CONFIGS[1]
        cases.append(Case(M=77, N=320, K=480, E=12, topk=2, scheme=s, group_size=g, config=cfg, seed=3220 + i))
    return _dedupe(cases)


def _dedupe(cases: Iterable[Case]) -> List[Case]:
    seen, out = set(), []
    for c in cases:
        ok, why = c.is_valid()
        if not ok:  # a generator bug: suites hold valid cases only
            raise AssertionError(f"suite generator produced invalid case {c.id}: {why}")
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


_SUITE_BUILDERS = {"smoke": _smoke, "premerge": _premerge, "nightly": _nightly, "bringup": _bringup}
_CACHE: Dict[str, List[Case]] = {}


def suite_cases(name: str) -> List[Case]:
    """The cases of suite ``name`` (a fresh list; the Case objects are immutable)."""
    if name not in _SUITE_BUILDERS:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {name!r}")
    if name not in _CACHE:
        _CACHE[name] = _SUITE_BUILDERS[name]()
    return list(_CACHE[name])


def default_suite(has_cuda: bool) -> str:
    return "premerge" if has_cuda else "smoke"


_FIELD_NAMES = tuple(f.name for f in fields(Case))
_FIELD_TYPES = {f.name: str(f.type) for f in fields(Case)}  # annotations are strings here (postponed evaluation)


def _value_matches(actual, text: str) -> bool:
    if isinstance(actual, bool):
        return text.lower() in (("true", "1", "yes") if actual else ("false", "0", "no"))
    if actual is None:
        return text.lower() in ("none", "null", "")
    if isinstance(actual, float):
        try:
            return float(text) == actual
        except ValueError:
            return False
    if isinstance(actual, int):
        try:
            return int(text) == actual
        except ValueError:
            return False
    return fnmatch.fnmatchcase(str(actual), text)


# Axes whose values form a closed set: a value (or glob) matching none of them is a typo, not "0 cases".
_CLOSED_AXES: Dict[str, Tuple[str, ...]] = {
    "dtype": DTYPES, "scheme": tuple(s.value for s in QuantScheme), "activation": tuple(a.value for a in Activation),
    "lora": LORA_MODES, "expert_map": EXPERT_MAPS, "routing": ROUTINGS + CURATED_ROUTINGS,
    "data": DATAS + CURATED_DATAS,
}
_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no")
_NONE_WORDS = ("none", "null")
FILTER_SYNTAX = ("terms are axis=value, axis!=value (value may be a glob: scheme=fp8_*) or a glob on the case id; "
                 "combine with 'not', 'and', 'or' and parentheses; a comma is a lower-precedence 'and' "
                 "(a, b or c means a and (b or c))")
_FILTER_TOKEN = re.compile(r"\s*(?:(?P<punct>[(),])|(?P<atom>[A-Za-z_]\w*\s*!?=\s*[^\s(),]*)|(?P<word>[^\s(),]+))")
_ATOM = re.compile(r"(?P<axis>[A-Za-z_]\w*)\s*(?P<op>!?=)\s*(?P<value>.*)")


_GLOB = re.compile(r"[*?\[]")


def _is_invariance_list(value: str) -> bool:
    parts = value.split("+")
    return all(p in INVARIANCES for p in parts) and [INVARIANCES.index(p) for p in parts] == sorted(
        {INVARIANCES.index(p) for p in parts})


def _check_filter_value(axis: str, value: str, term: str) -> None:
    """Raise ValueError when ``value`` can match no case on ``axis``, naming what it could be."""
    kind = _FIELD_TYPES[axis]
    where = f"in filter term {term!r}"
    if value.lower() in _NONE_WORDS and kind.startswith("Optional"):
        return
    if kind == "bool":
        if value.lower() not in _BOOL_WORDS:
            raise ValueError(f"filter value for {axis} must be one of {', '.join(_BOOL_WORDS)}; got {value!r} {where}")
    elif kind.endswith("int]") or kind == "int":
        try:
            number = int(value)
        except ValueError:
            extra = " or none" if kind.startswith("Optional") else ""
            raise ValueError(f"filter value for {axis} must be an integer{extra}; got {value!r} {where}") from None
        if axis == "group_size" and number not in INT4_GROUP_SIZES:
            raise ValueError(f"filter value for group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} or "
                             f"none; got {value!r} {where}")
    elif kind.endswith("float]") or kind == "float":
        try:
            float(value)
        except ValueError:
            raise ValueError(f"filter value for {axis} must be a number or none; got {value!r} {where}") from None
    elif _GLOB.search(value) is None and axis == "config" and value not in CONFIG_KINDS and parse_config_token(value) is None:
        raise ValueError(f"filter value for config must be one of {', '.join(CONFIG_KINDS)} or a launch config "
                         f"like {EXPLICIT_CONFIGS[0]} (or a glob); got {value!r} {where}")
    elif _GLOB.search(value) is None and axis == "invariance" and value != "none" and not _is_invariance_list(value):
        raise ValueError(f"filter value for invariance must be none or a '+'-joined subset of {', '.join(INVARIANCES)} "
                         f"in that order (or a glob); got {value!r} {where}")
    elif axis in _CLOSED_AXES and not any(fnmatch.fnmatchcase(v, value) for v in _CLOSED_AXES[axis]):
        raise ValueError(f"filter value for {axis} must be one of {', '.join(_CLOSED_AXES[axis])} (or a glob "
                         f"matching one); got {value!r} {where}")


class _FilterParser:
    """Recursive descent over ``filter := expr ("," expr)*; expr := conj ("or" conj)*;
    conj := unary ("and" unary)*; unary := "not" unary | "(" expr ")" | term``. Each rule
    returns a predicate on a Case."""

    def __init__(self, expr: str):
        self.expr = expr
        self.tokens: List[Tuple[str, str]] = []
        pos, end = 0, len(expr.rstrip())
        while pos < end:
            m = _FILTER_TOKEN.match(expr, pos)
            kind = m.lastgroup
            text = m.group(kind).strip()
            if kind == "word" and text.lower() in ("and", "or", "not"):
                kind = text.lower()
            self.tokens.append((kind, text))
            pos = m.end()
        self.i = 0

    def _error(self, what: str) -> ValueError:
        at = repr(self.tokens[self.i][1]) if self.i < len(self.tokens) else "the end"
        return ValueError(f"malformed filter {self.expr!r}: {what} at {at}; {FILTER_SYNTAX}; "
                          f"axes: {', '.join(_FIELD_NAMES)}")

    def _peek(self) -> Optional[str]:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def _take(self, kind: str) -> bool:
        if self._peek() == kind:
            self.i += 1
            return True
        return False

    def _next_text(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1][1]

    def _take_punct(self, ch: str) -> bool:
        if self.i < len(self.tokens) and self.tokens[self.i] == ("punct", ch):
            self.i += 1
            return True
        return False

    def parse(self):
        if not self.tokens:
            return lambda c: True
        parts = [self._or()]
        while self._take_punct(","):
            if self._peek() is None:
                break  # a trailing comma, as the old syntax allowed
            parts.append(self._or())
        if self.i != len(self.tokens):
            raise self._error("unexpected term")
        return lambda c: all(p(c) for p in parts)

    def _or(self):
        parts = [self._and()]
        while self._take("or"):
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda c: any(p(c) for p in parts))

    def _and(self):
        parts = [self._unary()]
        while self._take("and"):
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else (lambda c: all(p(c) for p in parts))

    def _unary(self):
        if self._take("not"):
            inner = self._unary()
            return lambda c: not inner(c)
        if self._take_punct("("):
            inner = self._or()
            if not self._take_punct(")"):
                raise self._error("expected ')'")
            return inner
        kind = self._peek()
        if kind == "atom":
            return self._atom(self._next_text())
        if kind == "word":
            return self._id_glob(self._next_text())
        raise self._error("expected a term")

    def _atom(self, term: str):
        m = _ATOM.match(term)
        axis, op, value = m.group("axis"), m.group("op"), m.group("value").strip()
        if axis not in _FIELD_NAMES:
            raise ValueError(f"filter axis must be one of {', '.join(_FIELD_NAMES)}; got {axis!r} in {term!r}")
        _check_filter_value(axis, value, term)
        if op == "!=":
            return lambda c: not _value_matches(getattr(c, axis), value)
        return lambda c: _value_matches(getattr(c, axis), value)

    def _id_glob(self, term: str):
        if "=" in term:
            raise self._error("a term with '=' must be axis=value")
        pattern = term if any(ch in term for ch in "*?[") else f"*{term}*"
        return lambda c: fnmatch.fnmatchcase(c.id, pattern)


def filter_cases(cases: Iterable[Case], expr: str) -> List[Case]:
    """Cases matching the filter expression ``expr`` (an empty one keeps everything).

    A term is ``axis=value`` or ``axis!=value`` (value may be a glob for string axes, e.g.
    ``scheme=fp8_*``) or a glob on the case id (``*lora_dual*``; a bare word matches inside the
    id). Terms combine with ``not``, ``and``, ``or`` and parentheses; commas join whole
    expressions with ``and`` (the old syntax: ``scheme=fp8_*,activation=silu``), so
    ``scheme=fp8_block128 or not dtype=fp32, bias=true`` keeps the biased cases that are fp8_block128
    or not fp32. A malformed expression, an unknown axis or a value no case can have (``scheme=fp9``)
    raises ValueError naming the valid axes or values.
    """
    if not isinstance(expr, str):
        raise TypeError(f"filter expression must be a str; got {type(expr).__name__}")
    keep = _FilterParser(expr).parse()
    return [c for c in cases if keep(c)]
