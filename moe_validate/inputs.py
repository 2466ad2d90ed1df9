"""Seeded inputs: one ``MoEInputs`` per ``Case``, from ``case.seed`` alone.

Every random draw comes from one CPU ``torch.Generator`` seeded with ``case.seed`` and is moved to
the requested device afterwards, so a case has the same bits on a laptop and on a GPU.

Value scales (why outputs are O(1)): hidden states are unit-variance; ``w1`` entries have
variance 1/K and ``w2`` entries 1/I, so every GEMM output has variance ~1 whatever the shape;
router weights are softmax probabilities over all E experts (not renormalized, as vLLM's
``renormalize=False``), so a token's output is a sub-convex mix of O(1) rows. O(1) values keep
bf16/fp16/fp8 in their normal range (no subnormals, no saturation) unless a case asks for
outliers, and make an absolute error read as a relative one. The router weights are < 1 on
purpose: a kernel that drops the router weight then differs by an O(1) factor.

Quantized weights get a magnitude of 2**U(-1, 1) per (expert, 128-row block, 128-column block)
before quantization, so their scales (per block, channel, group or expert) differ by up to 4x
between experts and blocks. With iid weights every 128x128 block has nearly the same absmax
(~4 sigma): a kernel reading another expert's or block's scale was then off by a few percent,
inside the fp8 tolerance at realistic sizes (seen on the H100: a scale read from expert 0
passed premerge). The factors are drawn after every other tensor, so the rest of a case's
data is unchanged.

Curated kinds (``matrix.CURATED_ROUTINGS`` / ``CURATED_DATAS``), each for one property random
data never has: ``strided_ids`` hands ``topk_ids`` over as a strided view, made after the move to
the device (``Tensor.to`` copies a non-dense view into a dense tensor); ``tiny_row`` puts one
token at ~4e-8, where a floor on absmax larger than SPEC's 1e-10 shows; ``quant_ties`` makes
every entry of the hidden states an exact rounding tie of its row's dynamic scale
(``quant_tie_rows``); ``nan_token`` gives one token a NaN and an Inf (``compare.evaluate``
leaves its row out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from moe_validate.matrix import Case
from moe_validate.contract.spec import (
    FP8_BLOCK,
    FP8_MAX,
    LoRASpec,
    MoEInputs,
    QuantConfig,
    QuantScheme,
)

__all__ = ["make_inputs", "select_tokens", "torch_dtype", "quant_tie_rows", "LORA_RANK", "LORA_ADAPTERS",
           "OUTLIER_FACTOR", "STATIC_SCALE_HEADROOM", "TINY_ROW_FACTOR", "tie_scale"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_RANK = 5  # SPEC LoRA: ranks need not be powers of two, so the default is not one
LORA_ADAPTERS = 3  # adapter 1 is disabled; tokens use -1, 0, 1, 2
OUTLIER_FACTOR = 64.0  # outlier entries are this many sigmas: far beyond randn's range
# fp8_tensor_static scales are "calibrated" on the data with 25% headroom, so they differ from
# the dynamic per-tensor scale (a kernel that ignores a1_scale/a2_scale is caught) and never
# saturate on the case's own data.
STATIC_SCALE_HEADROOM = 1.25
HUGE_EXPERT_ID = 2**30  # a padded row's id far beyond any E: must be bound-checked
# tiny_row: randn times 2^-26 (exact) has absmax ~4e-8, between SPEC's floor 1e-10 and any floor
# from ~1e-7 up; GEMM1 and an activation linear near 0 keep GEMM2's input above 1e-10 too
TINY_ROW_FACTOR = 2.0 ** -26
# quant_ties: each row's dynamic scale s = absmax / QMAX is exactly 7 * 2^k, the power of two
# chosen so that absmax is ~3, like a randn row's (k = -10 for fp8, -8 for int8). fl32(1 / 7) is
# 0.43 of an ulp off, so x * (1 / s) leaves the tie x / s for every tie whose mantissa exceeds 1.33
# (half of those then round to the other code); with s = 3 * 2^k (1/3 ulp off) no tie would move.
def tie_scale(qmax: float) -> float:
    """The dynamic scale of a ``quant_ties`` row for a format with this QMAX: 7 * 2^k."""
    return 7.0 * 2.0 ** round(math.log2(3.0 / (7.0 * qmax)))


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {name!r}") from None


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _hidden_states(case: Case, g: torch.Generator) -> torch.Tensor:
    M, K = case.M, case.K
    x = _randn(g, M, K)
    if case.data == "outliers" and M * K:
        # ~1% of entries (at least one) and one whole channel become outliers
        n = max(1, (M * K) // 100)
        idx = torch.randperm(M * K, generator=g)[:n]
        x.view(-1)[idx] *= OUTLIER_FACTOR
        x[:, int(torch.randint(K, (1,), generator=g))] *= OUTLIER_FACTOR / 4
    elif case.data == "zero_blocks" and M * K:
        x[int(torch.randint(M, (1,), generator=g))] = 0.0  # a zero token: scale floor QUANT_EPS
        # one activation scale group (fp8_block128 groups are 128 wide), but never the whole row:
        # a fully zeroed input would make every output zero and every case trivially pass
        width = min(128, K // 2)
        start = int(torch.randint(max(1, K - width + 1), (1,), generator=g))
        x[:, start:start + width] = 0.0
    elif case.data == "positive":
        x = x.abs()
    elif case.data == "tiny_row" and M:
        x[int(torch.randint(M, (1,), generator=g))] *= TINY_ROW_FACTOR
    elif case.data == "quant_ties":
        x = quant_tie_rows(x, case.quant)
    elif case.data == "nan_token" and M >= 2:
        # not token 0, so that a token precedes it: a load running past the end of that token's
        # row (a dropped K mask) reads this one's column 0
        m = 1 + int(torch.randint(M - 1, (1,), generator=g))
        x[m, 0] = math.nan
        x[m, K - 1] = math.inf
    return x


def _code_grid(code_dtype: torch.dtype) -> torch.Tensor:
    """The non-negative codes of an activation format, ascending (float64): the reference's own."""
    from reference.quant import code_values  # lazily: importing the harness must not load the reference

    codes = code_values(code_dtype)
    return codes[codes >= 0]


def quant_tie_rows(z: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``z`` [M, K] (randn) turned into rows of exact rounding ties of their own dynamic scale.

    Every entry becomes ``sign * t * s`` with ``s = tie_scale(QMAX)`` and ``t`` the midpoint of two
    adjacent codes of the scheme's activation format nearest to ``|z| * QMAX / 3`` (fp8: 1.0625,
    1.1875, ... times a power of two; int8: j + 1/2); column 0 of every 128-column group becomes
    ``sign * QMAX * s``, the absmax. So max(absmax, 1e-10) / QMAX = s exactly for a per-token,
    per-group or per-tensor scale, x / s = t exactly, and rne(x / s) is decided by ties-to-even
    alone. Exact in S: fp8 ties need at most 8 significant bits (bf16), int8 ties 11 (fp16).
    """
    qmax = scheme.act_qmax
    scale = tie_scale(qmax)
    codes = _code_grid(scheme.act_dtype)
    ties = (codes[:-1] + codes[1:]) / 2
    t = z.abs().to(torch.float64).clamp(max=3.0) * (qmax / 3.0)
    nearest = torch.bucketize(t, ties).clamp(max=ties.numel() - 1)
    lower = (nearest - 1).clamp(min=0)
    pick = torch.where((ties[lower] - t).abs() < (ties[nearest] - t).abs(), lower, nearest)
    sign = torch.where(z < 0, -1.0, 1.0).to(torch.float64)
    x = sign * ties[pick]
    x[:, ::FP8_BLOCK] = sign[:, ::FP8_BLOCK] * qmax
    return (x * scale).to(torch.float32)


def _routing(case: Case, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [M, topk], topk_ids int32 [M, topk]) without ties unless asked.

    Ties are impossible by construction: the chosen experts are distinct (a permutation prefix)
    and their logits are made strictly decreasing with gaps >= 0.05, so the softmax weights are
    strictly decreasing too.
    """
    M, E, k = case.M, case.E, case.topk
    ids = torch.empty(M, k, dtype=torch.int64)
    if case.routing == "skewed":
        # Zipf-like popularity over a seeded expert order: a few hot experts take most routes
        order = torch.randperm(E, generator=g)
        pop = torch.empty(E)
        pop[order] = 1.0 / (torch.arange(E, dtype=torch.float32) + 1.0) ** 1.5
        for m in range(M):
            ids[m] = torch.multinomial(pop, k, replacement=False, generator=g)
    elif case.routing == "empty_experts":
        live = torch.randperm(E, generator=g)[: E // 2]  # the other half never receives a token
        for m in range(M):
            ids[m] = live[torch.randperm(live.numel(), generator=g)[:k]]
    else:
        for m in range(M):
            ids[m] = torch.randperm(E, generator=g)[:k]
        if case.routing == "one_expert" and M:
            hot = int(torch.randint(E, (1,), generator=g))
            for m in range(M):
                row = ids[m].tolist()
                if hot in row:
                    j = row.index(hot)
                    row[j] = row[0]
                row[0] = hot
                ids[m] = torch.tensor(row)
    # logits: the chosen ones strictly decreasing, the rest below them
    top = _randn(g, M, 1) + 2.0
    gaps = 0.05 + 0.95 * torch.rand(M, k, generator=g)
    chosen = top - torch.cumsum(gaps, dim=1)
    rest = chosen[:, -1:] - 0.05 - torch.rand(M, max(E - k, 0), generator=g) * 3.0
    if case.routing == "ties":
        chosen = top.expand(M, k).clone()  # every slot of a token carries the same weight
    denom = torch.exp(chosen).sum(1, keepdim=True) + torch.exp(rest).sum(1, keepdim=True)
    weights = (torch.exp(chosen) / denom).to(torch.float32)
    if case.routing == "invalid_ids" and M:
        # about a quarter of the rows (at least one) get invalid slots: -1, E (one past the end)
        # and a huge id; a padded row of a real batch looks like this
        rows = torch.randperm(M, generator=g)[: max(1, M // 4)]
        bad = torch.tensor([-1, E, HUGE_EXPERT_ID], dtype=torch.int64)
        for i, m in enumerate(rows.tolist()):
            j = i % k
            ids[m, j] = bad[i % 3]
            if i % 2 and k > 1:  # some rows lose every slot: the row must come out exactly zero
                ids[m] = bad[(i + 1) % 3]
    return weights, ids.to(torch.int32)


def _expert_map(case: Case, g: torch.Generator) -> Optional[torch.Tensor]:
    if case.expert_map == "none":
        return None
    # "half": a seeded half of the global experts is local, in a seeded local order
    E, L = case.E, case.local_experts
    emap = torch.full((E,), -1, dtype=torch.int32)
    owned = torch.randperm(E, generator=g)[:L]
    emap[owned] = torch.randperm(L, generator=g).to(torch.int32)
    return emap


def _block_magnitudes(g: torch.Generator, E: int, rows: int, cols: int, block: int = 128) -> torch.Tensor:
    """[E, rows, cols] factors 2**U(-1, 1), constant on each 128x128 block of each expert (see
    the module docstring: scales that differ between experts and blocks)."""
    nb, kb = max(1, math.ceil(rows / block)), max(1, math.ceil(cols / block))
    f = torch.exp2(torch.rand(E, nb, kb, generator=g) * 2.0 - 1.0)
    return f.repeat_interleave(block, dim=1)[:, :rows].repeat_interleave(block, dim=2)[:, :, :cols]


def _quantize(w: torch.Tensor, case: Case):
    """(w_q, scale, zp) through the reference's quantizer (SPEC "Quantization schemes")."""
    import reference  # lazily: the harness reaches the reference only when it builds inputs

    scheme = case.quant
    zero_point = scheme is QuantScheme.INT4_W4A16 and case.seed % 2 == 1  # odd seeds: explicit zp
    return reference.quantize_weights(w, scheme, group_size=case.group_size, zero_point=zero_point)


def _lora(case: Case, g: torch.Generator, S: torch.dtype) -> Optional[LoRASpec]:
    if case.lora == "none":
        return None
    L, E, r, K, N, I, M = LORA_ADAPTERS, case.local_experts, LORA_RANK, case.K, case.N, case.I, case.M
    # a ~ 1/sqrt(K), b ~ 0.5/sqrt(r): the delta is O(0.5), visible but not dominant
    def a_(rows_in):
        return (_randn(g, L, E, r, rows_in) / math.sqrt(rows_in)).to(S)

    def b_(rows_out):
        return (0.5 * _randn(g, L, E, rows_out, r) / math.sqrt(r)).to(S)

    # two slices (gate, up) for gated activations on even seeds, one slice otherwise
    if case.act.is_gated and case.seed % 2 == 0:
        w13_a, w13_b = (a_(K), a_(K)), (b_(N // 2), b_(N // 2))
    else:
        w13_a, w13_b = a_(K), b_(N)
    w2_a, w2_b = a_(I), b_(K)
    ids = torch.randint(-1, L, (M,), generator=g, dtype=torch.int64)
    if M >= 2:
        ids[0] = -1  # at least one token without adapter
        ids[1] = 0  # and at least one with an enabled adapter
    enabled = torch.tensor([True, False, True][:L])  # adapter 1 disabled
    return LoRASpec(w13_a=w13_a, w13_b=w13_b, w2_a=w2_a, w2_b=w2_b,
                    token_lora_ids=ids.to(torch.int32), enabled=enabled, stream=case.lora)


def make_inputs(case: Case, device="cpu") -> MoEInputs:
    """The inputs of ``case``, deterministic in ``case.seed``, on ``device``."""
    if not isinstance(case, Case):
        raise TypeError(f"case must be a moe_validate.matrix.Case; got {type(case).__name__}")
    ok, why = case.is_valid()
    if not ok:
        raise ValueError(f"case {case.id} is invalid: {why}")
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    S = torch_dtype(case.dtype)
    scheme = case.quant
    E, N, K, I = case.local_experts, case.N, case.K, case.I

    x = _hidden_states(case, g)
    w1 = _randn(g, E, N, K) / math.sqrt(K)
    w2 = _randn(g, E, K, I) / math.sqrt(I)
    weights, ids = _routing(case, g)
    emap = _expert_map(case, g)
    b1 = (0.5 * _randn(g, E, N)).to(S) if case.bias else None
    b2 = (0.5 * _randn(g, E, K)).to(S) if case.bias else None
    lora = _lora(case, g, S)

    quant: Optional[QuantConfig] = None
    if scheme.is_quantized:
        w1 = w1 * _block_magnitudes(g, E, N, K)
        w2 = w2 * _block_magnitudes(g, E, K, I)
        w1q, s1, z1 = _quantize(w1, case)
        w2q, s2, z2 = _quantize(w2, case)
        quant = QuantConfig(scheme=scheme, w1_scale=s1, w2_scale=s2, w1_zp=z1, w2_zp=z2,
                            group_size=case.group_size)
        w1, w2 = w1q, w2q
    else:
        w1, w2 = w1.to(S), w2.to(S)
    if case.bias or case.clamp is not None:
        quant = quant or QuantConfig(scheme=QuantScheme.NONE)
        quant.w1_bias, quant.w2_bias = b1, b2
        quant.gemm1_clamp_limit = case.clamp

    inputs = MoEInputs(
        hidden_states=x.to(S), w1=w1, w2=w2, topk_weights=weights, topk_ids=ids,
        activation=case.act, quant=quant, expert_map=emap,
        global_num_experts=case.E if emap is not None else -1,
        apply_router_weight_on_input=case.router_on_input, lora=lora,
    )
    if scheme.needs_static_act_scales:
        _calibrate_static_scales(inputs)
    if str(device) != "cpu":
        inputs = inputs.to(device)
    if case.routing == "strided_ids":
        inputs = dataclasses.replace(inputs, topk_ids=_strided_ids(inputs.topk_ids, case.E))
    return inputs


def _strided_ids(ids: torch.Tensor, E: int) -> torch.Tensor:
    """``ids`` [M, topk] as the first topk columns of a [M, 2 * topk] tensor on their device (row
    stride 2 * topk). The other columns hold other valid ids, (id + 1) mod E: a kernel that reads
    the flat route index m * topk + j instead of going through the strides gets a wrong routing,
    not an out-of-range id."""
    return torch.cat([ids, (ids + 1) % E], dim=1)[:, :ids.shape[1]]


def _calibrate_static_scales(inputs: MoEInputs) -> None:
    """fp8_tensor_static: a1/a2 scales from the data (absmax * headroom / 448).

    a1 from the GEMM1 input (after the router weight when it is applied on input); a2 from the
    activation output of an exact reference run with provisional unit scales (the activation
    output does not depend on a2, and a1 only through GEMM1's input quantization, which uses the
    final a1 here).
    """
    import reference

    x = inputs.hidden_states.to(torch.float64)
    if inputs.apply_router_weight_on_input and x.shape[0]:
        x = x * inputs.topk_weights.to(torch.float64)[:, :1]
    amax1 = _finite_absmax(x)
    q = inputs.quant
    q.a1_scale = torch.tensor([max(amax1, 1e-10) * STATIC_SCALE_HEADROOM / FP8_MAX], dtype=torch.float32)
    q.a2_scale = torch.tensor([1.0], dtype=torch.float32)
    stages = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
    c2 = stages["c2"][stages["route_valid"]]
    amax2 = _finite_absmax(c2)
    q.a2_scale = torch.tensor([max(amax2, 1e-10) * STATIC_SCALE_HEADROOM / FP8_MAX], dtype=torch.float32)


def _finite_absmax(x: torch.Tensor) -> float:
    """max |x| over the finite entries (a nan_token row is calibrated around, as the kernels'
    dynamic per-tensor absmax skips it); 1.0 for an empty tensor."""
    if not x.numel():
        return 1.0
    return float(torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).max())


def select_tokens(inputs: MoEInputs, index: torch.Tensor) -> MoEInputs:
    """The call restricted to the token rows ``index`` (1-D int64, any order, on any device).

    Every per-token tensor is indexed (hidden states, router ids and weights, LoRA adapter ids);
    weights, scales, biases and the expert map are shared. Row i of the new call is token
    ``index[i]`` of the old one, so for an implementation whose output row depends on its own
    token only, ``out(select_tokens(inputs, idx)) == out(inputs)[idx]`` (SPEC "Invariances").
    """
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D int32/int64 tensor of token rows; got "
                         f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
    M = inputs.hidden_states.shape[0]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= M):
        raise ValueError(f"index must hold token rows in [0, {M}); got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    idx = index.to(device=inputs.hidden_states.device, dtype=torch.int64)
    lora = inputs.lora
    if lora is not None:
        lora = dataclasses.replace(lora, token_lora_ids=lora.token_lora_ids[idx.to(lora.token_lora_ids.device)].contiguous())
    return dataclasses.replace(
        inputs,
        hidden_states=inputs.hidden_states[idx].contiguous(),
        topk_weights=inputs.topk_weights[idx].contiguous(),
        topk_ids=inputs.topk_ids[idx].contiguous(),
        lora=lora,
    )
