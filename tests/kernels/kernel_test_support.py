"""Shared recipes for the kernels/ tests: device choice, seeded inputs, derived error bounds.

Not a test module. Every bound below is derived in its docstring; none is tuned to make a test
pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import kernels
import reference
from kernels._interp import INTERPRETING
from moe_validate.contract.spec import Activation, LoRASpec, QuantConfig, QuantScheme, storage_dtype
from reference.activations import split_gate_up

if torch.cuda.is_available() and not INTERPRETING.value:
    DEVICE = "cuda"
elif INTERPRETING.value:
    DEVICE = "cpu"
else:
    DEVICE = None

requires_triton_device = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on CPU")
ON_GPU = DEVICE == "cuda"

# unit roundoff u (half an ulp at 1.0) of each storage dtype
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_U = 2.0 ** -24


@dataclass
class Problem:
    """One call's inputs (as the kernel and the reference take them)."""

    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.w1, self.w2, self.topk_weights, self.topk_ids)


def make_problem(*, seed: int, M: int, K: int, I: int, E: int, topk: int, dtype=torch.bfloat16,
                 activation="silu", scheme="none", bias=False, expert_map=False, router_on_input=False,
                 group_size=None, zero_point=False, clamp=None, device=None) -> Problem:
    """Seeded inputs. Routing draws distinct experts per token (no duplicate slot ids); weights
    are scaled ~1/sqrt(fan-in) so intermediates stay O(1) and activations are not saturated.

    ``expert_map=True`` makes E the local count of a 2E-expert global space: even global ids are
    local (expert_map[2e] = e), odd ones are not, so about half of the routes are invalid.
    """
    device = device or DEVICE
    g = torch.Generator().manual_seed(seed)
    act = Activation.parse(activation)
    scheme = QuantScheme.parse(scheme)
    N = 2 * I if act.is_gated else I
    x = torch.randn(M, K, generator=g).to(dtype)
    w1f = torch.randn(E, N, K, generator=g) / math.sqrt(K)
    w2f = torch.randn(E, K, I, generator=g) / math.sqrt(I)
    global_E = 2 * E if expert_map else E
    ids = torch.stack([torch.randperm(global_E, generator=g)[:topk] for _ in range(M)]) if M else \
        torch.zeros(0, topk, dtype=torch.int64)
    ids = ids.to(torch.int32)
    tw = torch.rand(M, topk, generator=g) + 0.1
    quant_kw = {}
    if scheme.is_quantized:
        w1, s1, z1 = reference.quantize_weights(w1f, scheme, group_size=group_size, zero_point=zero_point)
        w2, s2, z2 = reference.quantize_weights(w2f, scheme, group_size=group_size, zero_point=zero_point)
        quant_kw.update(w1_scale=s1, w2_scale=s2, w1_zp=z1, w2_zp=z2, group_size=group_size)
        if scheme.needs_static_act_scales:
            # static scales chosen so that the observed absmax maps near the top of the fp8 range
            quant_kw.update(a1_scale=torch.tensor([4.0 / 448]), a2_scale=torch.tensor([2.0 / 448]))
    else:
        w1, w2 = w1f.to(dtype), w2f.to(dtype)
    if bias:
        quant_kw.update(w1_bias=torch.randn(E, N, generator=g) * 0.1, w2_bias=torch.randn(E, K, generator=g) * 0.1)
    if clamp is not None:
        quant_kw.update(gemm1_clamp_limit=clamp)
    quant = QuantConfig(scheme=scheme, **quant_kw) if (quant_kw or scheme.is_quantized) else None
    kwargs = dict(activation=act.value, quant=quant)
    if expert_map:
        emap = torch.full((global_E,), -1, dtype=torch.int32)
        emap[0::2] = torch.arange(E, dtype=torch.int32)
        kwargs.update(expert_map=emap, global_num_experts=global_E)
    if router_on_input:
        kwargs.update(apply_router_weight_on_input=True)
    p = Problem(x, w1, w2, tw, ids, kwargs)
    return to_device(p, device)


def to_device(p: Problem, device) -> Problem:
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, QuantConfig):
            return QuantConfig(**{k: mv(x) for k, x in v.__dict__.items()})
        return v

    return Problem(*(mv(t) for t in p.args()), {k: mv(v) for k, v in p.kwargs.items()})


def run_kernel(p: Problem, **extra) -> torch.Tensor:
    return kernels.fused_experts(*p.args(), **p.kwargs, **extra)


def zero_lora(p: Problem) -> LoRASpec:
    """One rank-2, single-stream adapter slot of all-zero weights for p's shapes: it adds nothing,
    but makes the call take the LoRA path (c1 and c3 written, the LoRA kernels launched)."""
    E, N, K = p.w1.shape
    I = p.w2.shape[2]
    z = lambda *shape: torch.zeros(*shape, dtype=p.x.dtype, device=p.x.device)  # noqa: E731
    ids = torch.zeros(p.x.shape[0], dtype=torch.int32, device=p.x.device)
    return LoRASpec(z(1, E, 2, K), z(1, E, N, 2), z(1, E, 2, I), z(1, E, K, 2), ids, stream="single")


def run_apply(p: Problem, *, assignment="auto", poison=True, config=None, batch_invariant=False,
              fuse_activation="auto", fuse_topk_sum="auto", workspaces=None, lora=None):
    """TritonExperts.apply with NaN-poisoned output and workspaces (the harness' protocol).

    ``workspaces``: a list that receives (workspace13, workspace2) after the call, for tests
    that look at the intermediates (c2 lives in workspace2 on every path)."""
    quant = p.kwargs.get("quant") or QuantConfig()
    act = Activation.parse(p.kwargs.get("activation", "silu"))
    experts = kernels.TritonExperts(quant, assignment=assignment, fuse_activation=fuse_activation,
                                    fuse_topk_sum=fuse_topk_sum)
    M, K = p.x.shape
    E, N, _ = p.w1.shape
    topk = p.topk_ids.shape[1]
    gne = p.kwargs.get("global_num_experts", -1)
    ws13, ws2, out_shape = experts.workspace_shapes(M, N, K, topk, gne if gne > 0 else E, E, None, act)
    S = storage_dtype(p.x.dtype)
    fill = float("nan") if poison else 0.0
    out = torch.full(out_shape, fill, dtype=S, device=p.x.device)
    a = torch.full(ws13, fill, dtype=S, device=p.x.device)
    b = torch.full(ws2, fill, dtype=S, device=p.x.device)
    experts.apply(out, *p.args(), act, gne, p.kwargs.get("expert_map"), None,
                  quant.a2_scale, a, b, None, p.kwargs.get("apply_router_weight_on_input", False),
                  lora=lora, config=config, batch_invariant=batch_invariant)
    if workspaces is not None:
        workspaces.extend([a, b])
    return out, experts


# Hoeffding: a sum of independent zero-mean terms |e_i| <= b_i exceeds z * sqrt(sum b_i^2) with
# probability <= 2 exp(-z^2 / 2); z = 6 gives 3e-8 per output element.
Z = 6.0


def _act_scale(scheme: QuantScheme, c2: torch.Tensor, valid: torch.Tensor, quant) -> Optional[torch.Tensor]:
    """The requantization scale of each c2 element [M, topk, I] (float64), as the quantizer picks it."""
    gran = scheme.act_granularity
    qmax = scheme.act_qmax
    a = c2.abs()
    if gran == "tensor_static":
        return torch.full_like(c2, float(quant.a2_scale.reshape(-1)[0]))
    if gran == "tensor_dynamic":
        return torch.full_like(c2, max(float(a[valid].max()) if valid.any() else 0.0, 1e-10) / qmax)
    if gran == "token":
        return (a.amax(-1, keepdim=True).clamp_min(1e-10) / qmax).expand_as(c2)
    # token_group: 128-column groups
    cols = c2.shape[-1]
    groups = math.ceil(cols / 128)
    padded = torch.nn.functional.pad(a, (0, groups * 128 - cols))
    gmax = padded.view(*c2.shape[:-1], groups, 128).amax(-1).clamp_min(1e-10) / qmax
    return gmax.repeat_interleave(128, dim=-1)[..., :cols]


def budgets(p: Problem, S: torch.dtype):
    """(mirror gate, exact budget) per output element, both float64 [M, K].

    Built stage by stage from the exact reference intermediates (c1, c2, c3 of ``run_stages``),
    u = unit roundoff of S, acc = 2^-24 (fp32 accumulation; 2^-13 for Hopper fp8 MMAs, whose
    accumulator keeps fewer bits, TRITON_NOTES.md):
      c1:  e1 = u |c1| (its rounding) + K acc R1,  R1 = sqrt(sum_k (x_k w1_ik)^2) sqrt(K) (the size
           of the partial sums the fp32 accumulator rounds);
      c2:  e2 = sens * e1 + u |c2| + 8 2^-24 |g| (|u| + 1) (fp32 evaluation; the gelu family's
           1 + erf cancels), sens = 1.2 (|up| + 1) on the gate error plus |g| on the up error
           (|silu'|, |gelu'| <= 1.13; relu2: 2|g|);
      c3:  each term of sum_i c2_i w2_ki carries an independent bounded error e2_i |w2_ki|, so by
           Hoeffding the sum is off by <= Z sqrt(sum_i (e2_i w2_ki)^2); plus I acc R3, plus the
           c3 rounding u |c3|; times the router weight;
           quantized schemes: a requantization code flips (by one step: int8 s, fp8 2^-3 |c2| +
           2^-9 s) only where the c2 perturbation e2 crosses a rounding midpoint; with the
           midpoint position uniform within a step this has probability <= e2 / step, so each
           term has variance <= e2 step w2^2 and magnitude <= b = step |w2|; Bernstein then
           bounds the sum by Z sqrt(sum_i (e2^2 + e2 step) w2^2) + (Z^2 / 3) max_i b_i (exact
           budget). The mirror gate instead allows at most two flips per route row (2 max_i b_i):
           there c2 is bit-identical unless an upstream S rounding flipped (itself rare, see
           below), and a flipped c2 value moves a code only with probability ~ ulp_S / step
           (2^-5 for bf16 into fp8), so more than two flips in one row is not plausible;
      out: the sum over slots plus u |out| and one ulp for the final cast of the exact value.
    Mirror: the same stages round in both, so a stored value differs only by a one-ulp flip
    (2u relative) where the fp32 order difference straddles a rounding boundary, plus the order
    difference itself (2 K acc R1, 2 I acc R3): the chain above with e1 = 2u |c1| + 2 K acc R1,
    2u for the c2, c3 and output roundings, every flip taken at its bound (Hoeffding).
    """
    u = UNIT_ROUNDOFF[S]
    quant = p.kwargs.get("quant")
    scheme = QuantScheme.parse(quant.scheme if quant else "none")
    act = Activation.parse(p.kwargs.get("activation", "silu"))
    acc = 2.0 ** -13 if (ON_GPU and scheme.is_fp8) else FP32_U
    st = reference.run_stages(*p.args(), **p.kwargs, precision="exact")
    x, w1, w2 = st["x"], st["w1"], st["w2"]
    valid, local = st["route_valid"], st["route_expert"]
    c1, c2, c3 = st["c1"], st["c2"], st["c3"]
    M, topk = valid.shape
    K = x.shape[1]
    I = w2.shape[2]
    safe = local.clamp_min(0)
    # R1[m, j, n] = sqrt(sum_k (x[m,k] w1[e,n,k])^2) * sqrt(K)
    R1 = torch.sqrt(_per_route(x.pow(2).unsqueeze(1).expand(M, topk, K), w1.pow(2), safe)) * math.sqrt(K)
    tw = p.topk_weights.double().abs()
    if p.kwargs.get("apply_router_weight_on_input"):
        tw = torch.ones_like(tw)
    w2sq, w2abs = w2.pow(2), w2.abs()  # per expert; contracted per route by _per_route (no [M, topk, K, I] gather)
    R3 = torch.sqrt(_per_route(c2.pow(2), w2sq, safe)) * math.sqrt(I)
    qstep = None
    if scheme.act_dtype is not None:
        s2 = _act_scale(scheme, c2, valid, quant)
        qstep = s2 if scheme.act_dtype == torch.int8 else 2.0 ** -3 * c2.abs() + 2.0 ** -9 * s2

    if act.is_gated:
        g, up = split_gate_up(c1, act)
        fp32_eval = 8 * FP32_U * g.abs() * (up.abs() + 1)
    else:
        g, up = c1, None
        fp32_eval = 8 * FP32_U * g.abs() * g.abs().clamp_min(1.0)

    def through_activation(e1: torch.Tensor) -> torch.Tensor:
        if act.is_gated:
            eg, eu = split_gate_up(e1, act)
            return 1.2 * (up.abs() + 1) * eg + 1.2 * g.abs() * eu
        return torch.maximum(torch.full_like(g, 1.2), 2 * g.abs()) * e1

    def finish(e3: torch.Tensor, out_term: torch.Tensor) -> torch.Tensor:
        e3 = e3 * tw.unsqueeze(2)
        e3 = torch.where(valid.unsqueeze(2), e3, torch.zeros_like(e3))
        return e3.sum(1) + out_term

    # Exact: every rounding at its bound; Hoeffding over the GEMM2 sum, Bernstein with flips.
    e1 = u * c1.abs() + K * acc * R1
    e2 = through_activation(e1) + u * c2.abs() + fp32_eval
    if qstep is None:
        e3 = Z * torch.sqrt(_per_route(e2.pow(2), w2sq, safe))
    else:
        var = e2.pow(2) + e2 * qstep
        b = _per_route(qstep, w2abs, safe, reduce="amax")
        e3 = Z * torch.sqrt(_per_route(var, w2sq, safe)) + Z * Z / 3 * b
    exact = finish(e3 + I * acc * R3 + u * c3.abs(), u * st["out"].abs())

    # Mirror: a stored value differs only by a one-ulp flip (2u relative), at its bound here,
    # plus the order difference itself; Hoeffding over the GEMM2 sum as for exact.
    e1 = 2 * u * c1.abs() + 2 * K * acc * R1
    e2 = through_activation(e1) + fp32_eval + 2 * u * c2.abs()
    e3 = Z * torch.sqrt(_per_route(e2.pow(2), w2sq, safe))
    if qstep is not None:
        e3 = e3 + 2 * _per_route(qstep, w2abs, safe, reduce="amax")
    mirror = finish(e3 + 2 * I * acc * R3 + 2 * u * c3.abs(), 2 * u * st["out"].abs())
    return mirror, exact


def _per_route(a: torch.Tensor, w: torch.Tensor, expert: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """out[m, j, n] = sum_i (or max_i) a[m, j, i] * w[expert[m, j], n, i], one expert at a time:
    gathering w per route ([M, topk, N, I] float64) took 16 GiB at M = 512 on the GPU."""
    M, topk, _ = a.shape
    out = torch.zeros(M, topk, w.shape[1], dtype=a.dtype, device=a.device)
    for e in torch.unique(expert).tolist():
        sel = expert == e
        rows = a[sel]  # [routes of e, I]
        if reduce == "sum":
            out[sel] = rows @ w[e].T
        else:
            out[sel] = (rows.unsqueeze(1) * w[e].unsqueeze(0)).amax(2)
    return out


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float8_e4m3fn: torch.uint8}


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN (the poison of rows never written) compares equal to itself."""
    return t.view(_BITS[t.dtype])


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str, got_name: str = "got",
                     expected_name: str = "expected") -> None:
    """Bit-for-bit equality of two tensors, naming the first differing element and both values."""
    differ = raw_bits(got) != raw_bits(expected)
    assert not differ.any(), (
        f"{what} differs in {int(differ.sum())} / {differ.numel()} elements; first at "
        f"{tuple(int(i) for i in differ.nonzero()[0])}: {got_name} {got[differ][0].item()!r}, "
        f"{expected_name} {expected[differ][0].item()!r}")


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |t| (float64 result; the subnormal floor included)."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    a = torch.clamp_min(t.abs().double(), torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def assert_close_to_reference(p: Problem, out: torch.Tensor, *, min_bitwise_fraction=0.9):
    """Kernel vs reference mirror (tight) and exact (budget), with the bounds of ``budgets``.

    On the CPU interpreter the fp32 accumulation order of small tiles matches the mirror's so
    closely that nearly every element is bit-identical (fp16/bf16 storage): at least
    ``min_bitwise_fraction`` must be (a wrong scale index or a dropped term breaks that at once,
    well before the bound).
    """
    S = storage_dtype(p.x.dtype)
    mirror = reference.fused_experts(*p.args(), **p.kwargs, precision="mirror")
    exact = reference.fused_experts(*p.args(), **p.kwargs, precision="exact")
    assert out.dtype == S and tuple(out.shape) == tuple(mirror.shape)
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf for finite inputs"
    mirror_gate_rel, exact_budget = budgets(p, S)
    mirror_gate = ulp(mirror, S) + mirror_gate_rel
    got = out.double()
    d_m = (got - mirror).abs()
    d_e = (got - exact).abs()
    bad_m = d_m > mirror_gate
    bad_e = d_e > exact_budget + ulp(exact, S)  # + the final rounding to S of the exact value
    assert not bad_m.any(), (
        f"kernel vs mirror: {int(bad_m.sum())} / {bad_m.numel()} elements over the gate; worst diff "
        f"{float(d_m.max()):.3e} at {tuple(int(i) for i in (d_m == d_m.max()).nonzero()[0])}, "
        f"allowed there {float(mirror_gate[d_m == d_m.max()][0]):.3e}")
    assert not bad_e.any(), (
        f"kernel vs exact: {int(bad_e.sum())} / {bad_e.numel()} elements over the budget; worst diff "
        f"{float(d_e.max()):.3e}")
    # fp32 storage: the mirror rounds float64 sums while the kernel accumulates in fp32, so most
    # elements differ by an ulp there; the bit-identity check is only meaningful when u(S) is far
    # above the fp32 accumulation error (fp16, bf16).
    if not ON_GPU and out.numel() and S != torch.float32:
        same = (got == mirror).double().mean().item()
        assert same >= min_bitwise_fraction, f"only {same:.3f} of elements bit-identical to the mirror"
