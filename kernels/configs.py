"""Launch configs for the grouped GEMMs: data, one lookup, one place.

A ``KernelConfig`` is the tile shape and schedule of ``kernels.grouped_gemm``. Both GEMMs of a
call share ``BLOCK_M``, because they share the routing alignment (padded to ``BLOCK_M``); GEMM2
(N = hidden size, K = I: a different shape from GEMM1's) may carry its own ``BLOCK_N``,
``BLOCK_K``, ``GROUP_M``, ``num_warps`` and ``num_stages`` in the optional ``gemm2`` field
(``Gemm2Tiles``; in a tuned JSON entry: ``"gemm2": {"BLOCK_N": ..., ...}``). Without it GEMM2
runs GEMM1's config, as before.

Lookup order in ``select_config`` (``lookup_config`` also says which one served: ``ConfigSource``):
  1. a tuned JSON file keyed by (E, N, device name, dtype, block shape) whose top-level keys are
     token counts M; the entry with the nearest M wins. Two layouts are read (docs/CONFIGS.md):
     ours (``config_file_name``: N = GEMM1's N, our field names) and vLLM's
     (``vllm_config_file_name``: N = I, vLLM's dtype tokens and field names, our extras in a
     sidecar file vLLM never opens). The folders searched, first hit wins: ``config_dir`` when
     given, else ``$MOE_VALIDATE_CONFIG_DIR``, ``$VLLM_TUNED_CONFIG_FOLDER``, ``kernels/configs/``;
  2. a GPU with no table of its own for the shape borrows the table of the nearest tuned device
     of the same architecture: same compute capability, then the nearest SM count (ties: by
     name). Tuned devices' facts live beside the tables in ``devices.json`` (``DeviceFacts``),
     not inside them, so the tables keep the layout other loaders read;
  3. otherwise a default from the shape (``_default_config``).
Callers override with ``config=`` (tests, the harness' fixed-config cases) and get one fixed,
M-independent config in batch-invariant mode (``batch_invariant_config``).

Every config is checked against the scheme's static facts (``check_config``): fp8/int8 dots
need ``BLOCK_K >= 32`` on the GPU, a K tile must not straddle a 128-wide fp8 scale block or an
int4 scale group, and ``tl.dot`` needs tiles of at least 16 on the GPU.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Optional, Tuple

import torch

from moe_validate.contract.profile import Fp8Accumulation
from moe_validate.contract.rules import fp8_tile_accumulation, interpreting
from moe_validate.contract.spec import FP8_BLOCK, QuantScheme

__all__ = ["KernelConfig", "Gemm2Tiles", "DeviceFacts", "ConfigSource", "select_config", "lookup_config",
           "untuned_config", "batch_invariant_config", "check_config", "config_file_name", "tuned_devices",
           "current_device_facts", "config_dirs", "vllm_config_file_name", "vllm_dtype_token", "to_vllm_entry",
           "from_vllm_entry", "vllm_sidecar_name", "fp8_accumulation"]


def _from_dict(cls, d, what: str, required):
    if not isinstance(d, dict):
        raise TypeError(f"{what} must be a dict; got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}; expected a subset of {sorted(names)}")
    missing = set(required) - set(d)
    if missing:
        raise ValueError(f"{what} must give {sorted(missing)}; got {d}")
    return {k: int(v) for k, v in d.items()}


@dataclass(frozen=True)
class Gemm2Tiles:
    """GEMM2's own tile shape and schedule (``KernelConfig.gemm2``); BLOCK_M is GEMM1's."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 2

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEVICES_FILE = "devices.json"  # in the config directory: {device name: {"capability": [9, 0], "sm_count": 132}}
CONFIG_DIR_ENV = "MOE_VALIDATE_CONFIG_DIR"  # our folder of tables, searched first
VLLM_CONFIG_DIR_ENV = "VLLM_TUNED_CONFIG_FOLDER"  # vLLM's user folder: tables a vLLM user already tuned


def config_dirs(config_dir: Optional[str] = None) -> Tuple[str, ...]:
    """The folders ``lookup_config`` searches, in order: ``config_dir`` alone when given, else
    ``$MOE_VALIDATE_CONFIG_DIR`` and ``$VLLM_TUNED_CONFIG_FOLDER`` (when set) before the package's."""
    if config_dir:
        return (config_dir,)
    found = [os.environ.get(CONFIG_DIR_ENV), os.environ.get(VLLM_CONFIG_DIR_ENV), CONFIG_DIR]
    return tuple(dict.fromkeys(d for d in found if d))


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and schedule of one grouped-GEMM launch.

    BLOCK_N counts weight rows (B columns) per program in both GEMMs. When GEMM1 applies a gated
    activation in its epilogue (``TritonExperts(fuse_activation=...)``) those rows are BLOCK_N // 2
    (gate, up) pairs, so a program writes BLOCK_N // 2 columns of c2: the dot shape, registers and
    shared memory stay those of the unfused GEMM1, and the rules of ``check_config`` (which are about
    the dot) are unchanged; the pairs only need BLOCK_N >= 2, which every GPU config has.

    fp8_block128 with silu (no clamp, no LoRA) fuses more: GEMM1's epilogue also quantizes c2 to
    fp8 per (row, 128 columns) and GEMM2 reads those codes and scales, c1 never written. A program
    must then own whole 128-column scale groups of c2: ``(BLOCK_N // 2) % 128 == 0``, i.e.
    BLOCK_N = 256 (one group) or 512. Any other BLOCK_N is still valid (``check_config`` does not
    ask for it): that call runs GEMM1 -> c1 -> the separate silu+fp8-group quantizer instead, with
    the same bits (``TritonExperts(fuse_activation=True)`` refuses it with the reason).
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 2
    gemm2: Optional[Gemm2Tiles] = None  # GEMM2's own tiles; None: GEMM2 runs this config too

    def to_dict(self) -> Dict:
        """Plain ints; ``gemm2`` appears (as a nested dict) only when set."""
        d = asdict(self)
        if self.gemm2 is None:
            del d["gemm2"]
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "KernelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict; got {type(d).__name__}")
        gemm2 = d.get("gemm2")
        base = {k: v for k, v in d.items() if k != "gemm2"}
        cfg = _from_dict(cls, base, "config", ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if gemm2 is not None:
            cfg["gemm2"] = Gemm2Tiles(**_from_dict(Gemm2Tiles, gemm2, "config.gemm2", ("BLOCK_N", "BLOCK_K")))
        return cls(**cfg)

    def for_gemm2(self) -> "KernelConfig":
        """The config GEMM2 launches with: ``gemm2``'s tiles with this BLOCK_M, or this config."""
        if self.gemm2 is None:
            return self
        return KernelConfig(BLOCK_M=self.BLOCK_M, **asdict(self.gemm2))


def fp8_accumulation(config: KernelConfig, capability: Optional[Tuple[int, int]]) -> Optional[Fp8Accumulation]:
    """How ``config``'s fp8 dots accumulate when compiled for a GPU of ``capability``
    (``contract.rules.fp8_tile_accumulation`` for each GEMM's tile); None where that is not known.
    One GEMM on the warpgroup MMA makes the launch FP8_MMA."""
    tiles = [fp8_tile_accumulation(c.BLOCK_M, c.num_warps, capability) for c in (config, config.for_gemm2())]
    if any(t is None for t in tiles):
        return None
    return Fp8Accumulation.FP8_MMA if Fp8Accumulation.FP8_MMA in tiles else Fp8Accumulation.FP32


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def check_config(config: KernelConfig, scheme: QuantScheme, group_size: Optional[int] = None,
                 on_gpu: Optional[bool] = None) -> None:
    """Raise ValueError when ``config`` (and its ``gemm2`` tiles) cannot run ``scheme`` (the rule is
    in the message). GEMM2's K tile obeys the same scale-block and group rules as GEMM1's."""
    if on_gpu is None:
        on_gpu = not interpreting()
    if config.gemm2 is not None and not isinstance(config.gemm2, Gemm2Tiles):
        raise TypeError(f"config.gemm2 must be a kernels.configs.Gemm2Tiles or None; got {type(config.gemm2).__name__}")
    _check_tiles(config, "config", scheme, group_size, on_gpu)
    if config.gemm2 is not None:
        _check_tiles(config.for_gemm2(), "config.gemm2", scheme, group_size, on_gpu)


def _check_tiles(config: KernelConfig, prefix: str, scheme: QuantScheme, group_size: Optional[int],
                 on_gpu: bool) -> None:
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = getattr(config, name)
        if not _is_pow2(v):
            raise ValueError(f"{prefix}.{name} must be a power of two; got {v}")
        if on_gpu and v < 16:
            raise ValueError(f"{prefix}.{name} must be >= 16 on the GPU (tl.dot minimum); got {v}")
    if config.GROUP_M < 1 or config.num_warps < 1 or config.num_stages < 1:
        raise ValueError(f"{prefix}.GROUP_M, num_warps, num_stages must be >= 1; got {config}")
    if scheme.act_dtype is not None and on_gpu and config.BLOCK_K < 32:
        raise ValueError(f"{prefix}.BLOCK_K must be >= 32 for {scheme.value} on the GPU (fp8/int8 dots); got {config.BLOCK_K}")
    if scheme.block_shape is not None and FP8_BLOCK % config.BLOCK_K != 0:
        raise ValueError(f"{prefix}.BLOCK_K must divide {FP8_BLOCK} for {scheme.value} (a K tile must not straddle "
                         f"a scale block); got {config.BLOCK_K}")
    if scheme is QuantScheme.INT4_W4A16:
        g = group_size or FP8_BLOCK
        if g % config.BLOCK_K != 0:
            raise ValueError(f"{prefix}.BLOCK_K must divide the int4 group size {g}; got {config.BLOCK_K}")


def _fit_to_scheme(config: KernelConfig, scheme: QuantScheme, group_size: Optional[int]) -> KernelConfig:
    """Shrink BLOCK_K so that a K tile stays inside one scale block/group (defaults only)."""
    bk = config.BLOCK_K
    if scheme.block_shape is not None:
        bk = min(bk, FP8_BLOCK)
    if scheme is QuantScheme.INT4_W4A16:
        bk = min(bk, group_size or FP8_BLOCK)
    if bk == config.BLOCK_K:
        return config
    return replace(config, BLOCK_K=bk)


def _default_config(M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                    scheme: QuantScheme) -> KernelConfig:
    if interpreting():
        # The interpreter's cost is dominated by the number of programs (each is a Python loop
        # iteration over numpy ops), while tile size costs little: larger N/K tiles, and a small
        # BLOCK_M because padding each expert's run to BLOCK_M multiplies wasted rows.
        return KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)
    # GPU defaults follow the shape of vLLM's untuned defaults (small BLOCK_M when each expert
    # sees few routes, larger for prefill); the large-batch rows were measured on an H100 (Triton
    # 3.6, bf16, E=8 topk=2 K=4096 I=14336, 2026-11-24, a 9-config sweep): at 256 routes per
    # expert 128x256x64 / 8 warps reached 397-451 TFLOP/s against 330-342 for 64x128x64, and
    # at 32 routes per expert 64x128x64 / 8 warps beat 32x64x64 by 7%. fp32 operands take half
    # the K tile and fewer stages (shared-memory budget).
    routes_per_expert = max(1, M * topk // max(E, 1))
    if scheme.block_shape is not None:
        bm = 16 if routes_per_expert <= 16 else 64
        return KernelConfig(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=1 if bm == 16 else 32,
                            num_warps=4, num_stages=3)
    if dtype == torch.float32:
        bm = 16 if routes_per_expert <= 16 else 64
        return KernelConfig(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=32, GROUP_M=1 if bm == 16 else 8,
                            num_warps=4, num_stages=2)
    if routes_per_expert <= 16:
        return KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    if routes_per_expert <= 64:
        return KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=8, num_stages=4)
    return KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def batch_invariant_config(dtype: torch.dtype, scheme: QuantScheme,
                           group_size: Optional[int] = None) -> KernelConfig:
    """One config independent of M, so a token's row never depends on the batch around it.

    The accumulation order of a row depends on BLOCK_K (the K split) and, on the GPU, on the
    MMA layout chosen from BLOCK_M/BLOCK_N/num_warps: all of them are fixed here.
    """
    bk = 32 if dtype == torch.float32 else 64
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4,
                       num_stages=1 if interpreting() else 2)
    return _fit_to_scheme(cfg, scheme, group_size)


def _dtype_tag(dtype: torch.dtype, scheme: QuantScheme) -> str:
    return scheme.value if scheme.is_quantized else str(dtype).replace("torch.", "")


def config_file_name(E: int, N: int, device_name: str, dtype: torch.dtype, scheme: QuantScheme) -> str:
    """File name of the tuned table for (E, N, device, dtype, block shape)."""
    scheme = QuantScheme.parse(scheme, "scheme")
    device = device_name.replace(" ", "_")
    name = f"E={E},N={N},device_name={device},dtype={_dtype_tag(dtype, scheme)}"
    if scheme.block_shape is not None:
        name += f",block_shape=[{scheme.block_shape[0]},{scheme.block_shape[1]}]"
    return name + ".json"


# --- vLLM's table layout (docs/CONFIGS.md) ---------------------------------------------------
# vLLM keys its tables by N = I (w2's K: half our GEMM1 N for gated activations), by its own
# dtype tokens, and spells the fields BLOCK_SIZE_M ...; its loader turns every top-level key but
# "triton_version" into an int and passes each entry to its kernel as keyword arguments, so a
# vLLM-format table carries neither our "_provenance" nor "gemm2": those go to the sidecar.
VLLM_FIELDS = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K",
               "GROUP_SIZE_M": "GROUP_M", "num_warps": "num_warps", "num_stages": "num_stages"}
VLLM_TABLE_META_KEYS = ("triton_version",)  # top-level keys vLLM's loader drops before int(M)
# Launch knobs in vLLM's shipped tables that our launcher has no counterpart for (ROCm's
# waves_per_eu / matrix_instr_nonkdim / kpack, Intel XPU's grf_mode, Triton's num_ctas, SPLIT_K):
# dropped, so those tables still give their tile shapes (every shipped table reads: a test).
VLLM_IGNORED_FIELDS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack", "grf_mode", "num_ctas", "SPLIT_K")
VLLM_SIDECAR_SUFFIX = ".moe_validate.json"  # beside a vLLM-format table: {"_provenance", "gemm2": {M: tiles}}

_VLLM_DTYPE = {
    QuantScheme.FP8_BLOCK128: "fp8_w8a8", QuantScheme.FP8_CHANNEL_TOKEN: "fp8_w8a8",
    QuantScheme.FP8_TENSOR_TOKEN: "fp8_w8a8", QuantScheme.FP8_TENSOR_STATIC: "fp8_w8a8",
    QuantScheme.FP8_TENSOR_DYNAMIC: "fp8_w8a8", QuantScheme.INT8_CHANNEL_TOKEN: "int8_w8a8",
    QuantScheme.INT8_W8A16: "int8_w8a16", QuantScheme.INT4_W4A16: "int4_w4a16",
}


def vllm_dtype_token(dtype: torch.dtype, scheme) -> Optional[str]:
    """vLLM's ``dtype=`` token for (storage dtype, scheme): one per weight/activation format
    (every fp8 granularity is ``fp8_w8a8``), ``float32`` for fp32 and none for bf16/fp16."""
    scheme = QuantScheme.parse(scheme, "scheme")
    if scheme.is_quantized:
        return _VLLM_DTYPE[scheme]
    return "float32" if dtype == torch.float32 else None


def _vllm_device_name(device_name: str) -> str:
    # vLLM files every H200 variant (e.g. "NVIDIA H200 NVL") under NVIDIA_H200.
    device = device_name.replace(" ", "_")
    return "NVIDIA_H200" if "H200" in device.split("_") else device


def vllm_config_file_name(E: int, I: int, device_name: str, dtype: torch.dtype, scheme) -> str:
    """File name vLLM's loader looks for: N is the intermediate size I (w2's K), not GEMM1's N."""
    scheme = QuantScheme.parse(scheme, "scheme")
    name = f"E={E},N={I},device_name={_vllm_device_name(device_name)}"
    token = vllm_dtype_token(dtype, scheme)
    if token is not None:
        name += f",dtype={token}"
    if scheme.block_shape is not None:
        name += f",block_shape=[{scheme.block_shape[0]},{scheme.block_shape[1]}]"
    return name + ".json"


def vllm_sidecar_name(table_name: str) -> str:
    """Our extras beside a vLLM-format table; a name vLLM's loader never builds."""
    return table_name[: -len(".json")] + VLLM_SIDECAR_SUFFIX


def to_vllm_entry(config: KernelConfig) -> Dict[str, int]:
    """One M entry in vLLM's spelling; ``gemm2`` is not representable there (use the sidecar)."""
    return {theirs: getattr(config, ours) for theirs, ours in VLLM_FIELDS.items()}


def from_vllm_entry(entry: Dict, what: str = "vLLM config entry") -> KernelConfig:
    """A vLLM entry as a KernelConfig; fields of other platforms' kernels are dropped, anything
    else unknown is an error naming the entry."""
    if not isinstance(entry, dict):
        raise TypeError(f"{what} must be a dict; got {type(entry).__name__}")
    unknown = set(entry) - set(VLLM_FIELDS) - set(VLLM_IGNORED_FIELDS)
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}; expected a subset of {sorted(VLLM_FIELDS)}")
    return KernelConfig.from_dict({VLLM_FIELDS[k]: v for k, v in entry.items() if k in VLLM_FIELDS})


@dataclass(frozen=True)
class DeviceFacts:
    """What makes two GPUs siblings for the tables: the name the tables are keyed by, the
    compute capability (architecture) and the SM count (how many programs run at once)."""

    name: str
    capability: Tuple[int, int]
    sm_count: int

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceFacts.name must be a non-empty str; got {self.name!r}")
        cap = tuple(self.capability)
        if len(cap) != 2 or not all(isinstance(v, int) and v >= 0 for v in cap):
            raise ValueError(f"DeviceFacts.capability must be (major, minor) ints; got {self.capability!r}")
        object.__setattr__(self, "capability", cap)
        if not isinstance(self.sm_count, int) or self.sm_count < 1:
            raise ValueError(f"DeviceFacts.sm_count must be a positive int; got {self.sm_count!r}")

    def to_dict(self) -> Dict:
        return {"capability": list(self.capability), "sm_count": self.sm_count}


@dataclass(frozen=True)
class ConfigSource:
    """Which table served a launch config.

    ``kind``: ``"tuned"`` (the device's own table), ``"sibling"`` (the table of ``device``, the
    nearest tuned device of the same architecture), ``"default"`` (no table: the shape default),
    ``"given"`` (the caller's ``config=``) or ``"batch_invariant"``. ``table`` is the file name
    and ``device`` the device the table was tuned on, both None without a table."""

    kind: str
    table: Optional[str] = None
    device: Optional[str] = None

    def to_dict(self) -> Dict:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def _load_table(path: str) -> Optional[Dict[int, KernelConfig]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    return {int(m): KernelConfig.from_dict(c) for m, c in raw.items() if not m.startswith("_")}


@functools.lru_cache(maxsize=64)
def _load_vllm_table(path: str) -> Optional[Dict[int, KernelConfig]]:
    """A vLLM-format table, with GEMM2 tiles from its sidecar (when there is one) applied per M."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    table = {}
    for m, entry in raw.items():
        if m in VLLM_TABLE_META_KEYS:
            continue
        if not m.isdigit():
            raise ValueError(f"{path}: top-level key {m!r} must be a token count M (vLLM's loader would fail on it)")
        table[int(m)] = from_vllm_entry(entry, f"{path}: entry {m}")
    sidecar = os.path.join(os.path.dirname(path), vllm_sidecar_name(os.path.basename(path)))
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            gemm2 = json.load(f).get("gemm2", {})
        for m, tiles in gemm2.items():
            if int(m) in table:
                table[int(m)] = replace(table[int(m)], gemm2=Gemm2Tiles(
                    **_from_dict(Gemm2Tiles, tiles, f"{sidecar}: gemm2 entry {m}", ("BLOCK_N", "BLOCK_K"))))
    return table


@functools.lru_cache(maxsize=16)
def _load_devices(path: str) -> Dict[str, DeviceFacts]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for name, facts in raw.items():
        if name.startswith("_"):
            continue
        if not isinstance(facts, dict) or set(facts) != {"capability", "sm_count"}:
            raise ValueError(f"{path}: entry {name!r} must be {{'capability': [major, minor], 'sm_count': n}}; "
                             f"got {facts!r}")
        out[name] = DeviceFacts(name, tuple(facts["capability"]), facts["sm_count"])
    return out


def tuned_devices(config_dir: Optional[str] = None) -> Dict[str, DeviceFacts]:
    """The facts of the tuned devices recorded in ``config_dir`` (default ``kernels/configs``)."""
    return dict(_load_devices(os.path.join(config_dir or CONFIG_DIR, DEVICES_FILE)))


@functools.lru_cache(maxsize=8)
def _cuda_device_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    return DeviceFacts(props.name, (props.major, props.minor), props.multi_processor_count)


def current_device_facts() -> Optional[DeviceFacts]:
    """The current CUDA device's facts, or None without one (or when interpreting)."""
    if torch.cuda.is_available() and not interpreting():
        return _cuda_device_facts(torch.cuda.current_device())
    return None


def _facts_for(device_name: str, directories: Tuple[str, ...]) -> Optional[DeviceFacts]:
    for directory in directories:
        known = _load_devices(os.path.join(directory, DEVICES_FILE)).get(device_name)
        if known is not None:
            return known
    current = current_device_facts()
    if current is not None and current.name == device_name:
        return current
    return None


def _current_device_name() -> Optional[str]:
    if torch.cuda.is_available() and not interpreting():
        return torch.cuda.get_device_name()
    return None


def _device_table(E: int, N: int, I: Optional[int], dtype: torch.dtype, scheme: QuantScheme, device: str,
                  directories: Tuple[str, ...]):
    """(table, file name) of ``device``'s table in the first folder holding one, ours before
    vLLM's layout within a folder (vLLM's only when I is known); else (None, None)."""
    ours = config_file_name(E, N, device, dtype, scheme)
    theirs = vllm_config_file_name(E, I, device, dtype, scheme) if I is not None else None
    for directory in directories:
        table = _load_table(os.path.join(directory, ours))
        if table:
            return table, ours
        if theirs is not None:
            table = _load_vllm_table(os.path.join(directory, theirs))
            if table:
                return table, theirs
    return None, None


def _find_table(E: int, N: int, I: Optional[int], dtype: torch.dtype, scheme: QuantScheme, device: str,
                facts: Optional[DeviceFacts], directories: Tuple[str, ...]):
    """(table, ConfigSource) of the device's own table, else of its nearest sibling, else (None, None)."""
    table, name = _device_table(E, N, I, dtype, scheme, device, directories)
    if table:
        return table, ConfigSource("tuned", name, device)
    if facts is None:
        return None, None  # unknown architecture: no sibling can be trusted
    known: Dict[str, DeviceFacts] = {}
    for directory in reversed(directories):  # an earlier folder's facts win
        known.update(_load_devices(os.path.join(directory, DEVICES_FILE)))
    siblings = sorted((abs(other.sm_count - facts.sm_count), other.name) for other in known.values()
                      if other.name != device and other.capability == facts.capability)
    for _, other in siblings:
        table, name = _device_table(E, N, I, dtype, scheme, other, directories)
        if table:
            return table, ConfigSource("sibling", name, other)
    return None, None


def lookup_config(M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                  scheme=QuantScheme.NONE, device_name: Optional[str] = None, *,
                  group_size: Optional[int] = None, config_dir: Optional[str] = None,
                  device_facts: Optional[DeviceFacts] = None,
                  intermediate_size: Optional[int] = None) -> Tuple[KernelConfig, ConfigSource]:
    """``select_config``'s config and the ``ConfigSource`` that served it.

    The device is ``device_name`` (default: ``device_facts``' name, else the current GPU's);
    its facts for the sibling fallback are ``device_facts``, else its ``devices.json`` entry,
    else the current GPU's properties when the names match. ``intermediate_size`` (I, w2's K)
    is what vLLM's tables are keyed by; without it only our layout is searched. ``config_dir``
    replaces the folders of ``config_dirs()``."""
    scheme = QuantScheme.parse(scheme)
    if device_facts is not None and not isinstance(device_facts, DeviceFacts):
        raise TypeError(f"device_facts must be a kernels.configs.DeviceFacts or None; got {type(device_facts).__name__}")
    device_name = device_name or (device_facts.name if device_facts is not None else _current_device_name())
    if device_name is not None:
        directories = config_dirs(config_dir)
        facts = device_facts if device_facts is not None else _facts_for(device_name, directories)
        table, source = _find_table(E, N, intermediate_size, dtype, scheme, device_name, facts, directories)
        if table:
            nearest = min(table, key=lambda m: (abs(m - M), m))
            return table[nearest], source
    return untuned_config(M, E, N, K, topk, dtype, scheme, group_size=group_size), ConfigSource("default")


def select_config(M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                  scheme=QuantScheme.NONE, device_name: Optional[str] = None, *,
                  group_size: Optional[int] = None, config_dir: Optional[str] = None,
                  device_facts: Optional[DeviceFacts] = None,
                  intermediate_size: Optional[int] = None) -> KernelConfig:
    """The launch config for one call: the device's tuned table (nearest M), else its nearest
    sibling's, else a default (``lookup_config`` also says which)."""
    return lookup_config(M, E, N, K, topk, dtype, scheme, device_name, group_size=group_size,
                         config_dir=config_dir, device_facts=device_facts,
                         intermediate_size=intermediate_size)[0]


def untuned_config(M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                   scheme=QuantScheme.NONE, *, group_size: Optional[int] = None) -> KernelConfig:
    """The config ``select_config`` falls back to when no tuned table exists (tune's baseline)."""
    scheme = QuantScheme.parse(scheme)
    return _fit_to_scheme(_default_config(M, E, N, K, topk, dtype, scheme), scheme, group_size)
