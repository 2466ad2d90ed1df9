"""An experts implementation written for the tests in plain torch: neither our kernels nor reference/.

It plays the part of someone else's kernel (issue 17): correct, but rounding in its own places,
declared in ``INDEPENDENT_PROFILE``:

- gated activations round twice: ``c2 = round_S(round_S(act(g)) * u)`` (silu, gelu, gelu_tanh);
- the router weight is rounded to S before it multiplies (GEMM2's epilogue, and x on input);
- int8 per-token codes are ``round_half_away(x * (127 / absmax))``;
- fp8 1x128 group scales are ``max(absmax, 1e-10) * (1 / 448)`` (the fused silu path's too);
- the top-k sum accumulates in S for topk 2..4.

``IndependentExperts(declared=...)`` says which profile it declares (default its own; ``None``:
none, i.e. SPEC's). ``plant=`` adds one real accuracy loss: ``"ignore_expert_scale"`` (expert 1's
GEMM2 weight scale read as expert 0's) or ``"accumulate_in_storage"`` (every floating dot's K loop
accumulated in S, rounded after every add). ``run_stages`` exposes its intermediates for the stage
localization (``ExposesStages``). Importable by name so the runner can load it as
``independent_experts:IndependentExperts`` (the tests put this directory on ``sys.path``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from moe_validate.contract.profile import (
    SPEC_PROFILE,
    ActivationRounding,
    CodeRounding,
    NumericsProfile,
    Quantizer,
    ScaleFormula,
    TopkSum,
    WeightPrecision,
)

INDEPENDENT_PROFILE = NumericsProfile(
    name="independent-test",
    activation_rounding=ActivationRounding.DOUBLE,
    double_rounded_activations=("silu", "gelu", "gelu_tanh"),
    router_weight_gemm2=WeightPrecision.STORAGE,
    router_weight_input=WeightPrecision.STORAGE,
    topk_sum=TopkSum.STORAGE_UP_TO_4,
    int8_token=Quantizer(ScaleFormula.FLOOR_THEN_DIVIDE, 1e-10, CodeRounding.QMAX_OVER_ABSMAX_HALF_AWAY),
    fp8_token_group=Quantizer(ScaleFormula.FLOOR_THEN_RECIPROCAL, 1e-10, CodeRounding.DIVIDE_RNE),
    fp8_token_group_fused=Quantizer(ScaleFormula.FLOOR_THEN_RECIPROCAL, 1e-10, CodeRounding.DIVIDE_RNE),
)

SCHEMES = ("none", "int8_channel_token", "fp8_block128", "fp8_channel_token", "fp8_tensor_token")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "silu_no_mul", "gelu_no_mul", "gelu_tanh_no_mul")
PLANTS = (None, "ignore_expert_scale", "accumulate_in_storage")
FP8 = torch.float8_e4m3fn
GROUP = 128


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


_ACT = {"silu": _silu, "gelu": _gelu, "gelu_tanh": _gelu_tanh}


class IndependentExperts:
    name = "independent"

    def __init__(self, declared: Optional[NumericsProfile] = INDEPENDENT_PROFILE, plant: Optional[str] = None):
        if plant not in PLANTS:
            raise ValueError(f"plant must be one of {PLANTS}; got {plant!r}")
        self.numerics_profile = declared
        self.plant = plant
        self.last_config = {"implementation": "tests/moe_validate/independent_experts.py", "plant": plant}

    def supports(self, case):
        if case.scheme not in SCHEMES:
            return False, f"the independent experts implement schemes {', '.join(SCHEMES)} only"
        if case.act.value not in ACTIVATIONS:
            return False, f"the independent experts implement activations {', '.join(ACTIVATIONS)} only"
        if case.lora != "none" or case.clamp is not None:
            return False, "the independent experts take no LoRA and no clamp"
        return True, ""

    # --- one call ---------------------------------------------------------------------------
    def run(self, inputs, case=None):
        return self._forward(inputs)

    def run_stages(self, inputs, case=None):
        """``run`` once more, keeping its intermediates route-major [M, topk, X] (``ExposesStages``):
        ``c1`` and ``c3`` in S; ``c2`` in S (in fp32 on the fused silu + fp8 1x128 path, which never
        stores it); ``c2_in``, the requantized GEMM2 input as its codes times its scales, in float64
        (schemes that quantize activations)."""
        stages = {}
        out = self._forward(inputs, stages)
        return {"out": out, **stages}

    def _forward(self, inputs, stages=None):
        x = inputs.hidden_states
        S = x.dtype
        q = inputs.quant
        scheme = q.scheme.value if q is not None else "none"
        act = inputs.activation.value
        M, K = x.shape
        E, N = inputs.w1.shape[:2]
        topk = inputs.topk_ids.shape[1]
        G = inputs.global_num_experts if inputs.global_num_experts > 0 else E
        ids = inputs.topk_ids.long()
        local = ids.clone()
        valid = (ids >= 0) & (ids < G)
        if inputs.expert_map is not None:
            local = torch.where(valid, inputs.expert_map.long()[ids.clamp(0, G - 1)], torch.full_like(ids, -1))
        valid &= local >= 0
        w = inputs.topk_weights.float()
        if inputs.apply_router_weight_on_input:
            x = (x.float() * w[:, :1].to(S).float()).to(S)
        fused = act == "silu" and scheme == "fp8_block128"
        out3 = torch.zeros(M, topk, K, dtype=torch.float32, device=x.device)
        if stages is not None:
            I = inputs.w2.shape[2]
            kept = {"c1": torch.zeros(M, topk, N, dtype=S, device=x.device),
                    "c2": torch.zeros(M, topk, I, dtype=torch.float32 if fused else S, device=x.device),
                    "c2_in": torch.zeros(M, topk, I, dtype=torch.float64, device=x.device),
                    "c3": torch.zeros(M, topk, K, dtype=S, device=x.device)}
        for e in range(E):
            sel = valid & (local == e)
            if not sel.any():
                continue
            m_idx, j_idx = torch.nonzero(sel, as_tuple=True)
            c1 = self._gemm(x[m_idx], inputs.w1[e], q, scheme, e, "w1", S)
            if q is not None and q.w1_bias is not None:
                c1 = c1 + q.w1_bias[e].float()
            c1 = c1.to(S)
            c2 = self._activation(c1, act, S, fused=fused)
            requantized = [] if stages is not None else None
            c3 = self._gemm(c2, inputs.w2[e], q, scheme, e, "w2", S, requantized)
            if q is not None and q.w2_bias is not None:
                c3 = c3 + q.w2_bias[e].float()
            if not inputs.apply_router_weight_on_input:
                c3 = c3 * w[m_idx, j_idx].to(S).float()[:, None]
            out3[m_idx, j_idx] = c3.to(S).float()
            if stages is not None:
                kept["c1"][m_idx, j_idx], kept["c2"][m_idx, j_idx] = c1, c2
                kept["c3"][m_idx, j_idx] = c3.to(S)
                if requantized:
                    kept["c2_in"][m_idx, j_idx] = requantized[0]
        if stages is not None:
            if scheme == "none":
                kept["c2_in"] = "not a stage of this scheme: GEMM2 reads c2 unquantized"
            stages.update(kept)
        return self._topk_sum(out3, valid, S)

    # --- pieces ------------------------------------------------------------------------------
    def _activation(self, c1, act, S, fused):
        """c2 rows; ``fused``: silu + fp8 1x128 keeps the fp32 activation for the quantizer (SPEC step 8)."""
        g = c1.float()
        if act.endswith("_no_mul"):
            return _ACT[act[:-len("_no_mul")]](g).to(S)
        half = g.shape[1] // 2
        gate, up = g[:, :half], g[:, half:]
        if fused:
            return _silu(gate) * up
        return (_ACT[act](gate).to(S).float() * up).to(S)

    def _gemm(self, a, w_q, q, scheme, e, which, S, requantized=None):
        """a [R, Kin] . w[e] [N, Kin]^T in fp32 with the scheme's dequantization (fp32 out).
        ``requantized``: a list to receive a's quantized form, codes times scales in float64."""
        scale = None if q is None else (q.w1_scale if which == "w1" else q.w2_scale)
        if self.plant == "ignore_expert_scale" and which == "w2" and e == 1:
            e_scale = 0  # the planted accuracy loss: expert 1 reads expert 0's weight scale
        else:
            e_scale = e
        if scheme == "none":
            return self._dot(a.float(), w_q.float(), S)
        if scheme == "int8_channel_token":
            codes, sx = _int8_per_token(a.float())
            _keep(requantized, codes, sx)
            acc = (codes.double() @ w_q.double().T).float()  # exact integer dot
            return acc * sx * scale[e_scale].float()[None, :]
        if scheme == "fp8_block128":
            Kin = a.shape[1]
            acc = torch.zeros(a.shape[0], w_q.shape[0], dtype=torch.float32, device=a.device)
            pieces = []
            for g0 in range(0, Kin, GROUP):
                cols = slice(g0, min(Kin, g0 + GROUP))
                codes, sx = _fp8_group(a.float()[:, cols])
                _keep(pieces, codes, sx)
                block = self._dot(codes, w_q[:, cols].float(), S)
                sw = scale[e_scale][:, g0 // GROUP].float().repeat_interleave(GROUP)[: w_q.shape[0]]
                acc = acc + block * sx * sw[None, :]
            if requantized is not None:
                requantized.append(torch.cat(pieces, 1))
            return acc
        codes, sx = _fp8_per_token(a.float())
        _keep(requantized, codes, sx)
        sw = scale[e_scale].float()
        sw = sw.reshape(-1)[None, :] if scheme == "fp8_channel_token" else sw.reshape(1, 1)
        return self._dot(codes, w_q.float(), S) * sx * sw

    def _dot(self, a32, w32, S):
        if self.plant == "accumulate_in_storage":
            acc = torch.zeros(a32.shape[0], w32.shape[0], dtype=torch.float32, device=a32.device)
            for k in range(a32.shape[1]):  # every add rounded to S: the planted accuracy loss
                acc = (acc + a32[:, k:k + 1] * w32[:, k][None, :]).to(S).float()
            return acc
        return a32 @ w32.T

    @staticmethod
    def _topk_sum(c3, valid, S):
        topk = c3.shape[1]
        c3 = torch.where(valid[..., None], c3, torch.zeros_like(c3))
        if 2 <= topk <= 4:
            acc = c3[:, 0].to(S)
            for j in range(1, topk):
                acc = (acc.float() + c3[:, j]).to(S)
            return acc
        return c3.sum(1).to(S)


def _keep(requantized, codes, scale):
    """Append codes * scale (float64: exact) to ``requantized`` unless it is None."""
    if requantized is not None:
        requantized.append(codes.double() * scale.double())


def _int8_per_token(x):
    absmax = x.abs().amax(1, keepdim=True).clamp_min(1e-10)
    v = x * (torch.full_like(absmax, 127.0) / absmax)
    codes = (torch.sign(v.double()) * torch.floor(v.double().abs() + 0.5)).clamp(-127, 127).float()
    return codes, absmax / torch.full_like(absmax, 127.0)


def _fp8_group(x):
    s = x.abs().amax(1, keepdim=True).clamp_min(1e-10) * torch.tensor(1.0 / 448.0, dtype=torch.float32)
    return (x / s).clamp(-448.0, 448.0).to(FP8).float(), s


def _fp8_per_token(x):
    absmax = x.abs().amax(1, keepdim=True).clamp_min(1e-10)
    s = absmax / torch.full_like(absmax, 448.0)
    return (x / s).clamp(-448.0, 448.0).to(FP8).float(), s


def declared_as_spec():
    """The same implementation declaring no profile (so SPEC's): it must fail conformance only."""
    return IndependentExperts(declared=None)


__all__ = ["IndependentExperts", "INDEPENDENT_PROFILE", "declared_as_spec", "SPEC_PROFILE"]
