"""What ``moe-validate bench`` measures: the model shapes, schemes, M lists and peers, and the
parsing of the options that choose them (ValueError naming the option).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class ModelShape:
    """One MoE layer's expert shape: E experts, top-k, hidden K, intermediate I."""

    name: str
    E: int
    topk: int
    K: int
    I: int  # noqa: E741 - the SPEC's name
    activation: str = "silu"
    schemes: Tuple[str, ...] = ("none", "fp8_tensor_token", "fp8_block128")  # what the model is benchmarked in
    note: str = ""

    @property
    def N(self) -> int:
        from moe_validate.contract.spec import Activation

        return 2 * self.I if Activation.parse(self.activation).is_gated else self.I

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["N"] = self.N
        d["schemes"] = list(self.schemes)
        return d


_FP8_ONLY = ("fp8_tensor_token", "fp8_block128", "fp8_tensor_static", "fp8_tensor_dynamic", "fp8_channel_token")
MODELS: Dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("mixtral-8x7b", E=8, topk=2, K=4096, I=14336),
        ModelShape("qwen3-30b-a3b", E=128, topk=8, K=2048, I=768),
        # DeepSeek-V3 ships fp8 (128x128 blocks); its bf16 experts would be 22.5 GB, so it is
        # benchmarked in fp8 only. "-tp8" is one rank of an 8-way tensor-parallel split of I.
        ModelShape("deepseek-v3", E=256, topk=8, K=7168, I=2048, schemes=_FP8_ONLY,
                   note="fp8 only (as deployed)"),
        ModelShape("deepseek-v3-tp8", E=256, topk=8, K=7168, I=256, schemes=_FP8_ONLY,
                   note="one rank of an 8-way split of I; fp8 only"),
        ModelShape("gpt-oss-120b", E=128, topk=4, K=2880, I=2880, activation="swigluoai",
                   note="bf16/fp8 instead of its shipped mxfp4; no biases"),
    )
}

DEFAULT_M: Tuple[int, ...] = tuple(2 ** i for i in range(15))  # 1 .. 16384
QUICK_M: Tuple[int, ...] = (1, 16, 128, 1024, 4096, 16384)
SCHEME_ALIASES = {"bf16": "none", "fp8_tensor": "fp8_tensor_token", "fp8_block": "fp8_block128"}
DEFAULT_SCHEMES = ("bf16", "fp8_tensor", "fp8_block")
PEERS = ("reference", "torch-grouped")
OURS = "triton"


# ---------------------------------------------------------------------------------------------
# argument parsing (ValueError naming the option and the expectation)
# ---------------------------------------------------------------------------------------------
def _split(text: str, option: str) -> List[str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{option} must be a non-empty comma-separated list; got {text!r}")
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ValueError(f"{option} has an empty item: {text!r}")
    return items


def parse_model_spec(text: str) -> ModelShape:
    """A model name from ``MODELS`` or a custom ``E=8,topk=2,K=4096,I=14336[,act=silu]`` shape."""
    if text in MODELS:
        return MODELS[text]
    if "=" not in text:
        raise ValueError(f"--model must be one of {', '.join(MODELS)} or 'E=..,topk=..,K=..,I=..[,act=..]'; "
                         f"got {text!r}")
    fields: Dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--model custom shape item {part!r} must be key=value")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"E", "topk", "K", "I", "act", "name"}
    missing = {"E", "topk", "K", "I"} - set(fields)
    if unknown or missing:
        raise ValueError(f"--model custom shape needs E, topk, K, I (optional act, name); "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)} in {text!r}")
    try:
        E, topk, K, I = (int(fields[k]) for k in ("E", "topk", "K", "I"))
    except ValueError:
        raise ValueError(f"--model custom shape E, topk, K, I must be integers; got {text!r}") from None
    if min(E, topk, K, I) < 1 or topk > E:
        raise ValueError(f"--model custom shape needs positive sizes and topk <= E; got {text!r}")
    act = fields.get("act", "silu")
    from moe_validate.contract.spec import Activation

    Activation.parse(act, name="--model act")
    name = fields.get("name") or f"E{E}k{topk}K{K}I{I}" + ("" if act == "silu" else f"-{act}")
    return ModelShape(name, E=E, topk=topk, K=K, I=I, activation=act, schemes=tuple(s.value for s in _schemes()))


def _schemes():
    from moe_validate.contract.spec import QuantScheme

    return list(QuantScheme)


def parse_models(text: Optional[str]) -> List[ModelShape]:
    if text is None:
        return list(MODELS.values())
    return [parse_model_spec(t) for t in _split(text, "--models")]


def parse_schemes(text: Optional[str]) -> List[str]:
    """Scheme values (``QuantScheme`` strings) from aliases (bf16, fp8_tensor, fp8_block) or values."""
    from moe_validate.contract.spec import QuantScheme

    items = list(DEFAULT_SCHEMES) if text is None else _split(text, "--schemes")
    out = []
    for item in items:
        value = SCHEME_ALIASES.get(item, item)
        try:
            scheme = QuantScheme.parse(value, name="--schemes item")
        except ValueError:
            raise ValueError(f"--schemes items must be bf16, fp8_tensor, fp8_block or a scheme value "
                             f"({', '.join(s.value for s in QuantScheme)}); got {item!r}") from None
        if scheme in (QuantScheme.INT4_W4A16, QuantScheme.INT8_W8A16, QuantScheme.INT8_CHANNEL_TOKEN):
            raise ValueError(f"--schemes: bench covers bf16 and fp8 schemes; got {item!r}")
        if scheme.value not in out:
            out.append(scheme.value)
    return out


def parse_m_list(text: Optional[str], quick: bool = False) -> List[int]:
    if text is None:
        return list(QUICK_M if quick else DEFAULT_M)
    out = []
    for item in _split(text, "--m"):
        try:
            m = int(item)
        except ValueError:
            raise ValueError(f"--m items must be positive integers; got {item!r}") from None
        if m < 1:
            raise ValueError(f"--m items must be positive integers; got {item!r}")
        out.append(m)
    return sorted(set(out))


def parse_peers(text: Optional[str]) -> List[str]:
    if text is None:
        return list(PEERS)
    if text.strip() in ("", "none"):
        return []
    out = []
    for item in _split(text, "--peers"):
        if item not in PEERS:
            raise ValueError(f"--peers items must be among {', '.join(PEERS)}; got {item!r}")
        if item not in out:
            out.append(item)
    return out
