"""The vocabulary shared by the kernels, the reference and the harness.

Part of the leaf contract (``moe_validate/contract``): it imports torch, enum and dataclasses
only, so that ``kernels`` and ``reference`` can depend on it without pulling in the harness.
torch is imported when a dtype or a tensor is first asked for (``FP8_DTYPE``, ``weight_dtype``,
``storage_dtype``, ...), not at import: the case vocabulary alone (``moe-validate list``) stays
torch-free.
``docs/SPEC.md`` defines every name here; the docstrings repeat only what a caller needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

__all__ = [
    "Activation",
    "QuantScheme",
    "QuantConfig",
    "LoRASpec",
    "MoEInputs",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_FNUZ_MAX",
    "INT8_MAX",
    "QUANT_EPS",
    "FP8_BLOCK",
    "SWIGLU_LIMIT",
    "storage_dtype",
]

# ---------------------------------------------------------------------------------------------
# Format constants (SPEC.md, "Quantization schemes").
# ---------------------------------------------------------------------------------------------
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_FNUZ_MAX = 224.0  # the e4m3fnuz constant used on ROCm
INT8_MAX = 127.0
QUANT_EPS = 1e-10  # floor on absmax before dividing, so an all-zero row gets a finite scale
FP8_BLOCK = 128  # fp8_block128: weight blocks 128x128, activation groups 1x128
SWIGLU_LIMIT = 7.0  # swigluoai and swiglustep clamp constant


class Activation(str, enum.Enum):
    """The nine activations of SPEC.md. String values are the public spelling."""

    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    SWIGLUOAI = "swigluoai"
    SWIGLUSTEP = "swiglustep"
    SILU_NO_MUL = "silu_no_mul"
    GELU_NO_MUL = "gelu_no_mul"
    GELU_TANH_NO_MUL = "gelu_tanh_no_mul"
    RELU2_NO_MUL = "relu2_no_mul"

    def __str__(self) -> str:  # f"{act}" prints "silu", not "Activation.SILU"
        return self.value

    @property
    def is_gated(self) -> bool:
        """Gated activations read a gate and an up half of c1 (N = 2I); the rest read N = I."""
        return not self.value.endswith("_no_mul")

    @property
    def is_interleaved(self) -> bool:
        """swigluoai stores gate on even rows and up on odd rows of w1[e]."""
        return self is Activation.SWIGLUOAI

    @classmethod
    def parse(cls, value: Union["Activation", str], name: str = "activation") -> "Activation":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None


class QuantScheme(str, enum.Enum):
    """The nine quantization schemes of SPEC.md.

    Each member knows its weight format and granularity, its activation format and
    granularity, the seed's (weight key, activation key) names and the compute capability it
    needs. ``act_granularity`` is one of: ``None`` (unquantized activations), ``"token_group"``
    (per token per 128 columns), ``"token"``, ``"tensor_static"``, ``"tensor_dynamic"``.
    ``weight_granularity`` is one of ``None``, ``"block"``, ``"channel"``, ``"tensor"``, ``"group"``.
    """

    NONE = "none"
    FP8_BLOCK128 = "fp8_block128"
    FP8_CHANNEL_TOKEN = "fp8_channel_token"
    FP8_TENSOR_TOKEN = "fp8_tensor_token"
    FP8_TENSOR_STATIC = "fp8_tensor_static"
    FP8_TENSOR_DYNAMIC = "fp8_tensor_dynamic"
    INT8_CHANNEL_TOKEN = "int8_channel_token"
    INT8_W8A16 = "int8_w8a16"
    INT4_W4A16 = "int4_w4a16"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union["QuantScheme", str, None], name: str = "quant.scheme") -> "QuantScheme":
        if value is None:
            return cls.NONE
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None

    # --- weights -----------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> Optional[torch.dtype]:
        """Storage dtype of quantized weights (int4 is packed into uint8); None = unquantized."""
        return _torch_dtype(_WEIGHT_DTYPE[self])

    @property
    def weight_granularity(self) -> Optional[str]:
        return _WEIGHT_GRANULARITY[self]

    @property
    def weight_qmax(self) -> Optional[float]:
        return _QMAX.get(_WEIGHT_DTYPE[self])

    # --- activations -------------------------------------------------------------------------
    @property
    def act_dtype(self) -> Optional[torch.dtype]:
        """Dtype the activations are quantized to before each GEMM; None = not quantized."""
        return _torch_dtype(_ACT_DTYPE[self])

    @property
    def act_granularity(self) -> Optional[str]:
        return _ACT_GRANULARITY[self]

    @property
    def act_qmax(self) -> Optional[float]:
        return _QMAX.get(_ACT_DTYPE[self])

    # --- facts derived from the above ---------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self is not QuantScheme.NONE

    @property
    def is_fp8(self) -> bool:
        return _WEIGHT_DTYPE[self] == _F8

    @property
    def block_shape(self) -> Optional[Tuple[int, int]]:
        return (FP8_BLOCK, FP8_BLOCK) if self is QuantScheme.FP8_BLOCK128 else None

    @property
    def has_dynamic_tensor_scale(self) -> bool:
        """Batch invariance does not hold for schemes whose scale spans the whole batch."""
        return self.act_granularity == "tensor_dynamic"

    @property
    def needs_static_act_scales(self) -> bool:
        return self.act_granularity == "tensor_static"

    @property
    def quant_keys(self) -> Tuple[Optional[str], Optional[str]]:
        """(weight key, activation key) in the seed's support-table vocabulary."""
        return _QUANT_KEYS[self]

    @property
    def min_capability(self) -> Optional[Tuple[int, int]]:
        """Least CUDA compute capability with native support; None = every device."""
        if self.is_fp8:
            return (8, 9)
        if self is QuantScheme.INT8_CHANNEL_TOKEN:
            return (7, 5)
        return None


# Dtypes by their torch names, resolved when asked for (torch is not imported before).
_F8, _I8, _U8 = "float8_e4m3fn", "int8", "uint8"
_QMAX = {_F8: FP8_MAX, _I8: INT8_MAX}
_Q = QuantScheme
_WEIGHT_DTYPE = {
    _Q.NONE: None, _Q.FP8_BLOCK128: _F8, _Q.FP8_CHANNEL_TOKEN: _F8, _Q.FP8_TENSOR_TOKEN: _F8,
    _Q.FP8_TENSOR_STATIC: _F8, _Q.FP8_TENSOR_DYNAMIC: _F8, _Q.INT8_CHANNEL_TOKEN: _I8,
    _Q.INT8_W8A16: _I8, _Q.INT4_W4A16: _U8,
}
_WEIGHT_GRANULARITY = {
    _Q.NONE: None, _Q.FP8_BLOCK128: "block", _Q.FP8_CHANNEL_TOKEN: "channel",
    _Q.FP8_TENSOR_TOKEN: "tensor", _Q.FP8_TENSOR_STATIC: "tensor", _Q.FP8_TENSOR_DYNAMIC: "tensor",
    _Q.INT8_CHANNEL_TOKEN: "channel", _Q.INT8_W8A16: "channel", _Q.INT4_W4A16: "group",
}
_ACT_DTYPE = {
    _Q.NONE: None, _Q.FP8_BLOCK128: _F8, _Q.FP8_CHANNEL_TOKEN: _F8, _Q.FP8_TENSOR_TOKEN: _F8,
    _Q.FP8_TENSOR_STATIC: _F8, _Q.FP8_TENSOR_DYNAMIC: _F8, _Q.INT8_CHANNEL_TOKEN: _I8,
    _Q.INT8_W8A16: None, _Q.INT4_W4A16: None,
}
_ACT_GRANULARITY = {
    _Q.NONE: None, _Q.FP8_BLOCK128: "token_group", _Q.FP8_CHANNEL_TOKEN: "token",
    _Q.FP8_TENSOR_TOKEN: "token", _Q.FP8_TENSOR_STATIC: "tensor_static",
    _Q.FP8_TENSOR_DYNAMIC: "tensor_dynamic", _Q.INT8_CHANNEL_TOKEN: "token",
    _Q.INT8_W8A16: None, _Q.INT4_W4A16: None,
}
_QUANT_KEYS = {
    _Q.NONE: (None, None),
    _Q.FP8_BLOCK128: ("kFp8Static128BlockSym", "kFp8Dynamic128Sym"),
    _Q.FP8_CHANNEL_TOKEN: ("kFp8StaticChannelSym", "kFp8DynamicTokenSym"),
    _Q.FP8_TENSOR_TOKEN: ("kFp8StaticTensorSym", "kFp8DynamicTokenSym"),
    _Q.FP8_TENSOR_STATIC: ("kFp8StaticTensorSym", "kFp8StaticTensorSym"),
    _Q.FP8_TENSOR_DYNAMIC: ("kFp8StaticTensorSym", "kFp8DynamicTensorSym"),
    _Q.INT8_CHANNEL_TOKEN: ("kInt8StaticChannelSym", "kInt8DynamicTokenSym"),
    _Q.INT8_W8A16: ("kInt8StaticChannelSym", None),
    _Q.INT4_W4A16: ("kInt4StaticGroupAsym", None),
}
del _I8, _U8, _Q


def _torch_dtype(name: Optional[str]):
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def __getattr__(name: str):
    if name == "FP8_DTYPE":  # torch.float8_e4m3fn, resolved on first use
        return _torch_dtype(_F8)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

INT4_GROUP_SIZES = (32, 64, 128)
INT4_DEFAULT_ZERO_POINT = 8


@dataclass
class QuantConfig:
    """Quantization, bias and clamp settings of one call (SPEC.md).

    Scale shapes (all float32):
      fp8_block128       w*_scale [E, ceil(N/128), ceil(K/128)] (w2: [E, ceil(K/128), ceil(I/128)])
      *_channel_token    w*_scale [E, N] (w2: [E, K]); int8_w8a16 likewise
      fp8_tensor_*       w*_scale [E] or [E, 1, 1]
      int4_w4a16         w*_scale [E, N, K/g] (w2: [E, K, I/g]); w*_zp the same shape, uint8 in 0..15
      fp8_tensor_static  a1_scale, a2_scale: one element each (shape [] or [1])
    Biases: w1_bias [E, N], w2_bias [E, K], any float dtype (used in fp32).
    ``gemm1_clamp_limit`` applies to ``silu`` only.
    """

    scheme: Union[QuantScheme, str] = QuantScheme.NONE
    w1_scale: Optional[torch.Tensor] = None
    w2_scale: Optional[torch.Tensor] = None
    a1_scale: Optional[torch.Tensor] = None
    a2_scale: Optional[torch.Tensor] = None
    w1_bias: Optional[torch.Tensor] = None
    w2_bias: Optional[torch.Tensor] = None
    w1_zp: Optional[torch.Tensor] = None
    w2_zp: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    gemm1_clamp_limit: Optional[float] = None

    def __post_init__(self) -> None:
        self.scheme = QuantScheme.parse(self.scheme)


@dataclass
class LoRASpec:
    """LoRA adapters on the experts (SPEC.md, LoRA).

    ``w13_a``/``w13_b`` are either one slice (``w13_a`` [L, E, r, K], ``w13_b`` [L, E, N, r]) or
    a pair of slices (gate, up), each ``a`` [L, E, r, K] and ``b`` [L, E, N/2, r]; for
    ``swigluoai`` slice 0 lands on the even rows of c1 and slice 1 on the odd rows.
    ``w2_a`` [L, E, r, I], ``w2_b`` [L, E, K, r]. ``token_lora_ids`` [M] int32, -1 = no adapter.
    ``enabled`` [L] bool (None = all enabled). ``stream`` is ``"single"`` or ``"dual"``.
    """

    w13_a: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    w13_b: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    token_lora_ids: torch.Tensor
    enabled: Optional[torch.Tensor] = None
    stream: str = "single"

    STREAMS = ("single", "dual")

    def __post_init__(self) -> None:
        if self.stream not in self.STREAMS:
            raise ValueError(f"lora.stream must be 'single' or 'dual'; got {self.stream!r}")

    @property
    def w13_slices(self) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        """((a, b),) for one slice or ((a_gate, b_gate), (a_up, b_up)) for two."""
        if isinstance(self.w13_a, (tuple, list)):
            return tuple(zip(self.w13_a, self.w13_b))
        return ((self.w13_a, self.w13_b),)

    @property
    def num_adapters(self) -> int:
        return self.w2_a.shape[0]

    def enabled_mask(self) -> torch.Tensor:
        import torch

        if self.enabled is None:
            return torch.ones(self.num_adapters, dtype=torch.bool, device=self.w2_a.device)
        return self.enabled.to(torch.bool)


@dataclass
class MoEInputs:
    """One call's arguments, as the harness hands them to a backend.

    ``kwargs()`` gives the keyword arguments of ``kernels.fused_experts`` and
    ``reference.fused_experts`` (the positional tensors excluded).
    """

    hidden_states: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    activation: Union[Activation, str] = Activation.SILU
    quant: Optional[QuantConfig] = None
    expert_map: Optional[torch.Tensor] = None
    global_num_experts: int = -1
    apply_router_weight_on_input: bool = False
    lora: Optional[LoRASpec] = None

    POSITIONAL = ("hidden_states", "w1", "w2", "topk_weights", "topk_ids")

    def __post_init__(self) -> None:
        self.activation = Activation.parse(self.activation)  # once, here: every backend gets the enum

    def args(self) -> tuple:
        return tuple(getattr(self, n) for n in self.POSITIONAL)

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.POSITIONAL}

    def to(self, device: Union[str, torch.device]) -> "MoEInputs":
        """A copy with every tensor (including those inside quant and lora) on ``device``."""
        import torch

        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, (tuple, list)):
                return type(v)(move(x) for x in v)
            if isinstance(v, (QuantConfig, LoRASpec)):
                return type(v)(**{f.name: move(getattr(v, f.name)) for f in fields(v)})
            return v

        return MoEInputs(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def storage_dtype(hidden_dtype: torch.dtype) -> torch.dtype:
    """The dtype S in which the pipeline stores intermediates and the output (SPEC.md).

    S is the dtype of ``hidden_states``, except bf16 when ``hidden_states`` arrives already
    quantized (fp8 or int8).
    """
    import torch

    if hidden_dtype in (torch.float8_e4m3fn, torch.int8):
        return torch.bfloat16
    return hidden_dtype
