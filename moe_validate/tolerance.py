"""Per-case, per-element error bounds derived from the arithmetic (SPEC.md "Tolerances").

Two oracles, two bounds:

- ``gate`` (kernel vs the reference's ``mirror``): both apply the same quantizers and round at
  the same places, so they differ only by (a) fp32 (or Hopper fp8-MMA) accumulation order in
  the GEMMs and fp32-vs-float64 activation math, and (b) the rounding *flips* that (a) causes at
  each store (c1, c2, the requantization of c2, c3, out). (a) is a small continuous error,
  modelled as a standard deviation; (b) is discrete: a few flip events per route, each moving
  one c2_in element by at most one step (an S ulp, or one requantization step), which GEMM2
  carries to the output times |w2| and the router weight.
- ``budget`` (kernel vs ``exact``: float64 after input quantization only): every rounding stage
  of the pipeline (c1, c2, requantization, c3, out) contributes a uniform rounding error; they
  propagate through the activation and GEMM2 as independent zero-mean errors, so the output
  error's standard deviation uses the scale ``sqrt(sum_i a_i^2 b_i^2)`` (never ``|ref|``, which
  cancellation can make arbitrarily small). Requantization codes flip against exact's only near
  their midpoints: those flips are counted per output element from exact's codes
  (``requant_flip_events``), with a Chernoff tail.

The gate also counts: a correct kernel differs from the mirror only where a flip happened, so
the number of differing elements must stay within a Chernoff tail of the modelled flips
(``count_allowance``, ``Bound.count_allowed``). That catches what no per-element bound can: an
error below one flip on many elements (a skipped rounding, a 1-ulp bias).

Both are per output element: ``allowed[m, k] = hard[m, k] + Z * sigma[m, k]``, from conservative
rates (capped flip probabilities, the sequential worst case of fp32 accumulation). ``Bound.sigma``
is what the z-scores divide by (calibration.py): the modelled standard deviation of the whole
difference at *typical* rates, so that ``z = d / sigma`` has RMS ~1 for a correct kernel. For the
gate that is ``flip_aware_sigma`` (the discrete flips included, propagated stage by stage); for
the budget, its own model at the typical accumulation error. ``Bound`` keeps the tensors for the
comparison and serializes to the results schema (``atol``, ``rtol``, ``derivation`` lines and the
named terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from moe_validate.contract.profile import (
    SPEC_PROFILE,
    Division,
    DotPrecision,
    Fp8Accumulation,
    NumericsProfile,
    ScaleFormula,
    TopkSum,
    WeightPrecision,
)
from moe_validate.contract.rules import fused_silu_fp8_group
from moe_validate.contract.spec import FP8_BLOCK, FP8_DTYPE, Activation, MoEInputs, QuantScheme, storage_dtype

__all__ = ["Bound", "derive", "unit_roundoff", "ulp", "PRECISION_BITS", "Z_GATE", "Z_BUDGET"]

F64 = torch.float64

# Significand precision p (bits, implicit bit included): the unit roundoff is u = 2^-p and one
# ulp at 1.0 is 2^(1-p). bf16 u = 2^-8, fp16 2^-11, fp32 2^-24, fp8 e4m3 2^-4 (SPEC "Tolerances").
PRECISION_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8, FP8_DTYPE: 4}
# Smallest exponent of a normal number (the ulp stays 2^(EMIN+1-p) below it: subnormals).
_EMIN = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126, FP8_DTYPE: -6}

# Z: how many standard deviations of the continuous (random-like) error part are allowed. The
# largest of n ~ 1e6 independent Gaussian errors exceeds 5 sigma with probability ~0.6; 6 sigma
# ~1e-3 per million elements. The rounding errors modelled here are bounded (uniform), so their
# tails are lighter than Gaussian.
Z_GATE = 6.0
Z_BUDGET = 6.0
# Flip-probability factor: a rounding whose input moves by delta flips with probability
# <= |delta| / ulp; with delta ~ N(0, sigma^2), E|delta| = 0.8 sigma; 2 sigma / ulp is a safe cap.
FLIP_SIGMAS = 2.0
# Poisson tail for the number of flip events: ceil(lambda + 4 sqrt(lambda)) holds with
# probability > 1 - 1e-4 for every lambda (for lambda -> 0 it is one event, exceeded with
# probability ~lambda^2 / 2). The mirror quantizes with the kernels' fp32 formulas, so the input
# quantization and the dynamic scales agree exactly and add no events.
# |d activation|: every activation has |f'(g)| <= 1.13 (gelu's maximum; silu 1.1), |f(g)| <= |g|,
# so a change (dg, du) moves f(g)*u by at most 1.13 * (|u| dg + |g| du) (relu2: 2|g| dg).
ACT_LIPSCHITZ = 1.13
# Activation math in fp32 vs float64: a handful of fp32 operations (exp, division, product):
# at most ~4 units of fp32 roundoff relative to the result.
ACT_FP32_ULPS = 4.0
U32 = 2.0 ** -24
# Hopper fp8 MMA does not accumulate in full fp32 (TRITON_NOTES: relF 7e-5 at K=64 on random
# data, i.e. an effective unit ~1.6e-5 = 2^-16 under the model below); 2^-14 gives 4x headroom.
# The interpreter's fp8 dot is exact, and int8 dots accumulate exactly in int32.
U_ACC_FP8_NATIVE = 2.0 ** -14


def fp8_mma(scheme: QuantScheme, native_gpu: bool, fp8_accumulation: Optional[Fp8Accumulation]) -> bool:
    """Whether ``scheme``'s dots are modelled with the fp8 MMA's accumulator (U_ACC_FP8_NATIVE): fp8
    dots compiled for a GPU, unless the backend reported that its launch accumulated them in full fp32
    (``backends.ReportsAccumulation``; the kernels' mma.sync tiles, ``kernels.configs.fp8_accumulation``)."""
    return scheme.is_fp8 and native_gpu and fp8_accumulation is not Fp8Accumulation.FP32


FP8_UNREPORTED = "unreported"  # Bound.fp8_accumulation where the backend did not say (modelled as the fp8 MMA)


def fp8_mma_chained(scheme: QuantScheme, native_fp8: bool) -> bool:
    """Whether the fp8 MMA's accumulator carries the dot's running sum across the K loop (its |c| part,
    FP8_MMA_TRUNCATION): every fp8 scheme modelled on the MMA but the block-scaled one, whose partials are
    scaled per block and added in fp32."""
    return native_fp8 and scheme.weight_granularity != "block"


def fp8_unit(scheme: QuantScheme, native_gpu: bool, fp8_accumulation: Optional[Fp8Accumulation]) -> Optional[str]:
    """Which accumulator a GPU run's fp8 dots were modelled with, as recorded (``Bound.fp8_accumulation``):
    the reported ``Fp8Accumulation``'s value, or FP8_UNREPORTED; None off a GPU or without fp8 dots."""
    if not (scheme.is_fp8 and native_gpu):
        return None
    return FP8_UNREPORTED if fp8_accumulation is None else Fp8Accumulation(fp8_accumulation).value


def _fp8_unit_note(scheme: QuantScheme, native_gpu: bool, fp8_accumulation: Optional[Fp8Accumulation]) -> str:
    """The derivation's word on which accumulator the fp8 dots were modelled with, and why."""
    return {None: "",
            Fp8Accumulation.FP32.value: "; fp8 dots: fp32 accumulation, as the backend reported for this launch "
                                        "(mma.sync tiles)",
            Fp8Accumulation.FP8_MMA.value: "; fp8 dots: Hopper's fp8 MMA, as the backend reported for this launch",
            FP8_UNREPORTED: "; fp8 dots: taken to be Hopper's fp8 MMA (the backend did not report its accumulator)",
            }[fp8_unit(scheme, native_gpu, fp8_accumulation)]


def unit_roundoff(dtype: torch.dtype) -> float:
    try:
        return 2.0 ** -PRECISION_BITS[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(PRECISION_BITS)}; got {dtype}") from None


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |values| (float64 out; 0 -> the smallest subnormal spacing)."""
    return _spacing(values, PRECISION_BITS[dtype], _EMIN[dtype])


def _spacing(values: torch.Tensor, p: int, emin: int) -> torch.Tensor:
    """The spacing at |values| of a binary format with ``p`` significant bits and smallest normal
    exponent ``emin`` (float64 out; below 2^emin the subnormal spacing)."""
    v = values.to(F64).abs()
    _, e = torch.frexp(v)  # v = m * 2^e with m in [0.5, 1): the binade's ulp is 2^(e-1+1-p)
    e = torch.where(v == 0, torch.full_like(v, emin), torch.clamp(e.to(F64) - 1, min=emin))
    return torch.exp2(e + 1 - p)


def _acc_growth(n: int) -> float:
    """Std of recursive fp32 summation of n products, in units of u * s (s = sqrt(sum a^2 b^2)).

    Each partial sum S_k (|S_k| ~ sqrt(k) sigma_term) is rounded with an error ~ u |S_k| / sqrt(3);
    summing the variances gives ~ u^2 n^2 sigma_term^2 / 6 = u^2 n s^2 / 6; plus one rounding
    of each product (u s / sqrt(3) < u s). Blocked/tensor-core sums are smaller; this is the
    sequential worst case.
    """
    return 1.0 + math.sqrt(max(n, 1) / 6.0)


def _acc_sigma_drifting(u: float, n: int, s: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``_acc_growth``'s sequential std, u (1 + sqrt(n/6)) s, where the partial sums also drift to the
    result: S_k = (k/n) c + a random walk of size s, so E S_k^2 = (k/n)^2 c^2 + (k/n) s^2 and the
    roundings' variance sums to u^2 n (c^2/9 + s^2/6): u (s + sqrt(n/6) sqrt(s^2 + 2 c^2 / 3)).
    ``size``: |c|, the dot's result before its epilogue (|c| + |bias|). Where |c| >> s (products of
    one sign, or an element several s out) the random-walk model alone undercounts: an fp32 nightly
    case on the H200 (session 11) had c = 1.07 at s = 0.30 and a GEMM2 error of 1.43e-6, 7.7x its
    u (1 + sqrt(n/6)) s = 1.85e-7 (a sequential fp32 sum of the same products errs by 1.04e-6)."""
    return u * (s + math.sqrt(max(n, 1) / 6.0) * (s ** 2 + (2.0 / 3.0) * size ** 2).sqrt())


@dataclass
class Bound:
    """One oracle's per-element bound and how it was derived."""

    name: str
    allowed: torch.Tensor  # [M, K] float64: |kernel - oracle| <= allowed
    sigma: torch.Tensor  # [M, K] float64: modelled std of |kernel - oracle| at typical rates (z-scores)
    atol: float
    rtol: float
    z: float
    derivation: List[str] = field(default_factory=list)
    terms: Dict[str, float] = field(default_factory=dict)
    # the most elements allowed to differ from the oracle at all (None: no count test)
    count_allowed: Optional[int] = None
    # why this bound's count test is derived but not applied (a skipped check in the record)
    count_not_applied: Optional[str] = None
    # a GPU run's fp8 dots, as modelled (fp8_unit); calibrate splits its rows by it
    fp8_accumulation: Optional[str] = None

    def to_dict(self) -> dict:
        a = self.allowed[torch.isfinite(self.allowed)]
        out = {
            "name": self.name, "atol": self.atol, "rtol": self.rtol, "z": self.z,
            "derivation": list(self.derivation),
            "allowed_max": float(a.max()) if a.numel() else 0.0,
            "allowed_median": float(a.median()) if a.numel() else 0.0,
        }
        out.update({k: float(v) for k, v in self.terms.items()})
        if self.count_allowed is not None:
            out["count_allowed"] = int(self.count_allowed)
        if self.count_not_applied is not None:
            out["count_not_applied"] = self.count_not_applied
        if self.fp8_accumulation is not None:
            out["fp8_accumulation"] = self.fp8_accumulation
        return out


# =================================================================================================
# Helpers over route stages
# =================================================================================================
def _gate_up(c1: torch.Tensor, act: Activation) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not act.is_gated:
        return c1, None
    if act.is_interleaved:
        return c1[..., 0::2], c1[..., 1::2]
    half = c1.shape[-1] // 2
    return c1[..., :half], c1[..., half:]


def _gate_rows(N: int, act: Activation, device) -> torch.Tensor:
    """[N] float64: 1 on c1's gate rows (every row of an ungated activation), 0 on its up rows."""
    gate = torch.zeros(N, dtype=F64, device=device)
    if not act.is_gated:
        gate[:] = 1.0
    elif act.is_interleaved:
        gate[0::2] = 1.0
    else:
        gate[:N // 2] = 1.0
    return gate


def _scale_group_width(gran: Optional[str], I: int) -> int:
    """How many c2 columns share one requantization scale: FP8_BLOCK for per-token groups, else the
    whole row (a per-token or per-tensor scale; at least 1)."""
    return FP8_BLOCK if gran == "token_group" else max(I, 1)


def _act_sensitivity(c1, dc1, act):
    """Bound on |delta c2| given per-element |delta c1| (same layout as c1)."""
    g, u = _gate_up(c1.abs(), act)
    dg, du = _gate_up(dc1, act)
    if act is Activation.RELU2_NO_MUL:
        return 2.0 * g * dg  # d(g^2) = 2 g dg
    if u is None:
        return ACT_LIPSCHITZ * dg
    if act is Activation.SWIGLUOAI:
        u = u + 1.0  # (u + 1) multiplies the gate term
    return ACT_LIPSCHITZ * (u * dg + g * du)


def _requant_step(c2_in: torch.Tensor, valid: torch.Tensor, scheme: QuantScheme, inputs: MoEInputs,
                  quantizer=None) -> Optional[torch.Tensor]:
    """Per-element size of one requantization step of c2 (in the dequantized domain), or None.

    The step is the quantized format's ulp at the value times the scale: fp8 e4m3 has 3
    mantissa bits (ulp = 2^(e-3), subnormal floor 2^-9) and int8 a uniform step of 1. The group
    absmax is bounded by the row absmax (per-token groups) or the global absmax (per tensor).
    ``quantizer``: a profile's (``contract.profile.Quantizer``) scale formula and floor (default SPEC's).
    """
    gran = scheme.act_granularity
    if gran is None:
        return None
    v = c2_in.abs()
    if gran in ("token", "token_group"):
        amax = v.amax(-1, keepdim=True)
    elif gran == "tensor_dynamic":
        amax = v[valid].max() if valid.any() else torch.zeros((), dtype=F64, device=v.device)
    else:
        amax = None
    if gran == "tensor_static":
        scale = inputs.quant.a2_scale.to(F64).reshape(()).to(v.device)
    elif quantizer is not None and quantizer.scale is ScaleFormula.DIVIDE_THEN_FLOOR:
        scale = (amax / scheme.act_qmax).clamp_min(quantizer.floor)
    else:  # max(absmax, floor) / QMAX (times 1 / QMAX: the same scale to within an fp32 ulp)
        scale = amax.clamp_min(1e-10 if quantizer is None else quantizer.floor) / scheme.act_qmax
    if scheme.act_dtype == FP8_DTYPE:
        return ulp(v / scale, FP8_DTYPE) * scale
    return torch.ones_like(v) * scale


def _per_expert_gemm_scales(a, w, route_expert, valid, power: int = 2):
    """For every valid route r (token m, slot j) with expert e:
    sq[r, n] = sum_k |a[r, k]|^p |w[e, n, k]|^p (p = ``power``)  and  wmax[r, n] = max_k |w[e, n, k]|.

    a: [M, topk, K_in], w: [E, N_out, K_in]; loops over experts so memory stays O(routes x N).
    """
    M, T = a.shape[0], a.shape[1]
    N = w.shape[1]
    sq = torch.zeros(M, T, N, dtype=F64, device=a.device)
    wmax = torch.zeros(M, T, N, dtype=F64, device=a.device)
    for e in range(w.shape[0]):
        sel = valid & (route_expert == e)
        if not sel.any():
            continue
        we = w[e].to(F64)
        sq[sel] = (a[sel].abs() ** power) @ (we.abs() ** power).T
        wmax[sel] = we.abs().amax(-1).expand(int(sel.sum()), N)
    return sq, wmax


_LN_1E6 = math.log(1e6)
_JUMP_CHUNK_ELEMENTS = 1 << 24  # routes x K x I elements materialized at once


def _valid_routes_by_expert(w2: torch.Tensor, route_expert, valid):
    """Per local expert e: (token index, slot index, |w2[e]| as float64 [K, I]) of its valid routes,
    in chunks small enough that an [R, K, I] product stays within _JUMP_CHUNK_ELEMENTS."""
    K, I = w2.shape[1], w2.shape[2]
    chunk = max(1, _JUMP_CHUNK_ELEMENTS // max(1, K * I))
    for e in range(w2.shape[0]):
        sel = valid & (route_expert == e)
        if not sel.any():
            continue
        m_idx, j_idx = torch.nonzero(sel, as_tuple=True)
        aw = w2[e].to(F64).abs()  # [K, I]
        for c0 in range(0, m_idx.numel(), chunk):
            yield m_idx[c0:c0 + chunk], j_idx[c0:c0 + chunk], aw


def _flip_jumps(p: torch.Tensor, jump: torch.Tensor, w2: torch.Tensor, route_expert, valid, wts) -> torch.Tensor:
    """[M, K]: sum over a token's routes of ceil(lam + 4 sqrt(lam)) * J * w (see the caller)."""
    M, T, I = p.shape
    K = w2.shape[1]
    out = torch.zeros(M, K, dtype=F64, device=p.device)
    if M == 0 or I == 0:
        return out
    for mi, ji, aw in _valid_routes_by_expert(w2, route_expert, valid):
        jumps = jump[mi, ji][:, None, :] * aw[None]  # [R, K, I]
        J = jumps.amax(-1)
        pr = p[mi, ji][:, None, :]
        lam = (pr * jumps).sum(-1) / J.clamp_min(1e-300)
        poisson = torch.ceil(lam + 4.0 * lam.sqrt()) * J  # all jumps of one sign
        # jumps of random sign (a flip goes up or down with equal odds): Bernstein at 1e-6,
        # sqrt(2 V ln 1e6) + J ln(1e6) / 3 with V = sum_i p_i jump_i^2
        var = (pr * jumps ** 2).sum(-1)
        bernstein = (2.0 * var * _LN_1E6).sqrt() + J * _LN_1E6 / 3.0
        out.index_put_((mi,), torch.minimum(poisson, bernstein) * wts[mi, ji][:, None], accumulate=True)
    return out


# =================================================================================================
# The gate's flip-aware standard deviation (what the z-scores of kernel vs mirror divide by)
# =================================================================================================
# Kernel and mirror store the same quantities on the same grids; they differ only where the
# kernel's fp32 arithmetic moves a value across a rounding midpoint that the float64 mirror does
# not cross (a *flip*). The model follows the discrepancy D = kernel - mirror of every stored
# element through the pipeline as three numbers: its variance V = E[D^2], its mean absolute value
# A = E|D|, and the probability p that it is nonzero; a continuous fp32 error C ~ N(0, sigma^2)
# joins before each rounding (E|C| = sqrt(2/pi) sigma = 0.8 sigma).
#
# Rounding both sides to a grid of spacing q (x uniform within its cell): for a fixed incoming
# difference t q, the stored values differ by n q with n = floor(t) or floor(t) + 1, and
# E[(stored difference)^2] = q^2 (t^2 + f (1 - f)) with f = frac(t), while E|stored difference| = t q
# exactly. So a rounding keeps A, adds q^2 E[f (1 - f)] to V, and leaves only a discrete difference.
# E[f (1 - f)] is t - t^2 ~ t for t << 1 (the flip: one step q with probability t) and 1/6 averaged
# over f once differences reach q. Hence, per rounding,
#     V' = V + q^2 h,   h = min(1/6, min(A_c / q, 1/6) + min(A_d / q, p_d / 6)),
#     A' = A_c + A_d,   p' = min(1, min(A_c / q, 1) + min(A_d / q, p_d)),
# with (A_c) the continuous and (A_d, p_d) the discrete parts of the incoming difference (a rare
# discrete jump J of probability p gives h = p min(J / q, 1/6)).
# Between roundings the differences move through the pipeline's maps: the activation's partial
# derivatives (f'_g, f'_u, from float64 autograd at the mirror's c1), GEMM2 (a sum over i of
# independent differences: V adds up with w2^2, A with |w2| but at most 0.8 sqrt(V), p adds up),
# the router weight, the fp32 top-k sum (exact for equal inputs: it adds no continuous term).
#
# Typical (not worst-case) continuous errors. Each has a standard deviation sigma (what it adds to
# V) and a *flip-driving* mean absolute value A (what moves a value across a midpoint: the chance
# of a flip at a rounding to q is A / q). They differ because the kernel's last fp32 rounding
# before a store cannot flip it: RN_S(RN_32(y)) = RN_S(y) but at double-rounding ties. Measured on
# the CPU interpreter (2026-11-24; tests/moe_validate/test_flip_model.py re-measures each one) and
# checked on a GPU by ``moe-validate calibrate``:
# - fp32 dot of length n in BLOCK_K tiles (BK = min(n, 64)): each tile is a recursive sum (error
#   variance 0.18 u^2 |S_k|^2 per add with |S_k|^2 ~ k s^2 / n: 0.09 u^2 BK s^2 over the tiles),
#   and the tiles are summed recursively again (0.09 u^2 (n / BK) s^2): sigma = 0.3 u s
#   sqrt(BK + n / BK) where nearly every add rounds (fp16 x fp16 products carry 22 significant
#   bits, fp32 ones round themselves: measured 0.28-0.31). A product of b significant bits is exact
#   in fp32, and an add then rounds only when the partial sum exceeds it 2^(24-b)-fold: bf16 x bf16
#   (b = 16) rounds in ~10% of adds for Gaussian data (sigma measured 0.1), fp8 x fp8 (b = 8)
#   almost never. Flip-driving A, in u s sqrt(n), from flip counts where |c| >= s / 4 (the flat
#   part: tinier results flip about half as often, but their steps are too small to matter for
#   the variance) at n = 256, BLOCK_K = 32, 4-8 x 2^20 elements, by product bits (ACC_CLASSES):
#   fp16 x fp16 (22) 0.09; bf16 x bf16 (16) 0.045; fp16 x int8 (18) 0.039; bf16 x int8 (15) 0.014;
#   fp16 x int4 (15) 0.012; bf16 x int4 (12) 0.001; fp8 x fp8 (8) 0.002. The interpreted kernel's
#   GEMM1 reads 0.09-0.12 (fp16) and 0.01-0.04 (bf16, few flips). sigma: 0.3 and 0.1 measured for
#   the first two classes, ~2.5 A taken below them. int8 x int8 -> int32 is exact.
#   Hopper's fp8 MMA: sigma = A / 0.8 = 2^-16 (1 + sqrt(n/6)) s (relF 7e-5 at K=64, TRITON_NOTES).
# - fp32 epilogue operations (dequantization multiplies, bias add, router weight): sigma =
#   0.42 u |c| each (a uniform rounding error has variance ulp^2 / 12, and E[ulp^2] = 2.16 u^2 |c|^2
#   over a binade), A = 0.8 sigma.
# - fp32 activation math, kernel vs the mirror's torch fp32, relative to (|c2| + |g| |u|) (the
#   |g||u| term is where gelu cancels): sigma 0.25 u, A 0.06 u (0.15 u for the gelu_tanh pair,
#   whose tanh is 2 sigmoid(2y) - 1); relu2 is one correctly rounded product on both sides: 0.
# (minimum product bits, sigma, A), first match wins
ACC_CLASSES = ((20, 0.3, 0.09), (16, 0.1, 0.045), (13, 0.03, 0.013), (0, 0.01, 0.002))
# A compiled kernel's tensor-core dot (bf16, fp16 and weight-only operands; not the fp8 MMA, which has
# its own unit above, nor int8 x int8, exact in int32) flips more than these classes say, and its
# flips do not fade with |c| as an s-proportional error's do: measured on one H200 (Triton 3.6,
# scripts/gpu_stage_rates.py --bins, premerge + nightly x 4 seeds, docs/BOUNDS.md), c1 and c3 flip
# 1.6-3.3x the class rate where |c| << s, and where |c| >= s / 2 they level off at a rate that grows
# linearly with the dot length n (bf16 c1: 3.2e-5 at n = 256, 8.0e-5 at 512; c3: 2.6e-5 at 128,
# 1.1e-4 at 704), the signature of a bias added at every accumulation step (the MMA's alignment
# truncates the addends toward zero) in proportion to the partial sum's size. So on a GPU the
# flip-driving error gains E|B| = GPU_MMA_TRUNCATION u32 n (|c| + s / 2): the partial sums run
# from 0 to c with a random-walk part of size ~s. Fitted at tau = 7e-3 over those rows, it
# reproduces the measured rates within 0.6-1.4x in every bin with more than 100 flips
# (bf16 and fp16, n = 128-704). Products of fewer than 16 bits (the weight-only int8 and int4
# schemes) lose fewer bits to the alignment: their tau, 1.5e-3, puts the pooled c1 and c3 rates of
# those rows at 0.4-1.2x the model where 7e-3 gave 0.15-0.6x.
GPU_MMA_TRUNCATION = 7e-3
GPU_MMA_TRUNCATION_SHORT = 1.5e-3  # products of < 16 significant bits
ACC_TILE = 64
U_ACC_FP8_NATIVE_TYPICAL = 2.0 ** -16
# The fp8 MMA's accumulator also loses bits in proportion to the running sum where it carries that sum
# across the K loop (acc = dot(a, b, acc): every fp8 scheme but the block-scaled one, whose partials
# restart every scale block and are added in fp32). Measured on one H200 (Triton 3.6,
# scripts/gpu_stage_rates.py --bins, premerge + nightly fp8 cases x 8 fresh seeds, docs/BOUNDS.md):
# with the unit alone, c1's and c3's own flips ran 1.6-5x the model where |c| >= s and the amax
# elements of the dynamic scales' groups flipped 2.7-3.1x (the unit is s-proportional, so it fades
# where |c| >> s, and the amax element is the largest |c|); the rate levels off at
# about 1.0e-4 x n in bf16, 8x that in fp16 (an error relative to |c|, linear in n). As
# E|B| = FP8_MMA_TRUNCATION u32 n |c|, tau = 6 puts those bins at 0.83-1.39 of the model and the
# amax flips at 0.84-1.25; block-scaled rows (no such term) read 0.49-1.03 without it.
FP8_MMA_TRUNCATION = 6.0
EPILOGUE_OP_SIGMA = 0.42  # x u32 |value| per fp32 operation
ACT_SIGMA = 0.25  # x u32 (|c2| + |g| |u|)
ACT_FLIP = {Activation.GELU_TANH: 0.15, Activation.GELU_TANH_NO_MUL: 0.15, Activation.RELU2_NO_MUL: 0.0}
ACT_FLIP_DEFAULT = 0.06
_MEAN_ABS = math.sqrt(2.0 / math.pi)  # E|C| / sigma for a Gaussian C


TF32_BITS = 11  # TF32: 10 stored mantissa bits and the implicit one


def _tf32_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of the TF32 grid at |v|: TF32_BITS significant bits, fp32's exponent range."""
    return _spacing(v, TF32_BITS, _EMIN[torch.float32])


def product_bits(scheme: QuantScheme, S: torch.dtype, tf32: bool = False,
                 weight_in_storage: bool = False) -> Optional[int]:
    """Significant bits of one GEMM product for ``scheme`` with storage ``S`` (None: int8 x int8,
    accumulated exactly in int32). Weight-only int formats: int8 carries 7 magnitude bits, int4
    minus its zero point 4. ``tf32``: fp32 operands read as TF32 (a profile's ``fp32_dot``);
    ``weight_in_storage``: a weight-only weight dequantized to S before the dot (a profile's
    ``weight_only_dequantized``), so it carries S's bits."""
    if scheme.act_dtype == torch.int8:
        return None
    if scheme.act_dtype == FP8_DTYPE:
        return 2 * PRECISION_BITS[FP8_DTYPE]
    if tf32 and S == torch.float32 and scheme.weight_dtype is None:
        return 2 * TF32_BITS
    act = PRECISION_BITS[S]
    if weight_in_storage:
        return 2 * act
    weight = {torch.int8: 7}.get(scheme.weight_dtype, 4 if scheme.weight_granularity == "group" else act)
    return act + weight


def acc_error_typical(n: int, bits: Optional[int], native_fp8: bool = False) -> Tuple[float, float]:
    """(sigma, A) of an fp32-accumulated dot of length n, in units of s = sqrt(sum a^2 b^2).

    ``bits``: significant bits of one product (``product_bits``; None = exact int32 accumulation).
    """
    n = max(int(n), 1)
    if bits is None:
        return 0.0, 0.0
    if native_fp8:
        sigma = U_ACC_FP8_NATIVE_TYPICAL * _acc_growth(n) / _MEAN_ABS
        return sigma, _MEAN_ABS * sigma
    sigma_k, flip_k = next((sk, fk) for min_bits, sk, fk in ACC_CLASSES if bits >= min_bits)
    bk = min(n, ACC_TILE)
    return sigma_k * U32 * math.sqrt(bk + n / bk), flip_k * U32 * math.sqrt(n)


def _mma_truncation(n: int, bits: int, size: torch.Tensor, s: torch.Tensor, chained_fp8: bool = False
                    ) -> torch.Tensor:
    """E|B| of a compiled tensor-core dot's accumulation bias (GPU_MMA_TRUNCATION) for dots of
    length ``n`` whose results are at most ``size`` in magnitude, with scales ``s`` and products of
    ``bits`` significant bits. ``chained_fp8``: the chained fp8 MMA's (_fp8_mma_truncation) instead."""
    if chained_fp8:
        return _fp8_mma_truncation(n, size)
    return _mma_tau(bits) * U32 * n * (size + 0.5 * s)


def _fp8_mma_truncation(n: int, size: torch.Tensor) -> torch.Tensor:
    """E|B| of the chained fp8 MMA's |c| part (FP8_MMA_TRUNCATION) for dots of length ``n`` and results
    of magnitude ``size``; its random-walk part is its unit's (acc_error_typical), so no s term."""
    return FP8_MMA_TRUNCATION * U32 * n * size


def fp8_mma_truncation_sigma(n: int, size: torch.Tensor) -> torch.Tensor:
    """The std of the chained fp8 MMA's |c| part (dots of length ``n``, results of magnitude ``size``)
    for the budget, its z-scores and stage localization: E|B| / 0.8 at the fitted tau. A bound takes
    Z of it, 7.5 E|B|, and no headroom on tau: it was fitted over 136 GPU records, which it reproduces
    within 0.83-1.39 (FP8_MMA_TRUNCATION), where the unit's 4x (U_ACC_FP8_NATIVE) stands for one probe."""
    return _fp8_mma_truncation(n, size) / _MEAN_ABS


def _mma_tau(bits: int) -> float:
    """GPU_MMA_TRUNCATION's tau for products of ``bits`` significant bits."""
    return GPU_MMA_TRUNCATION if bits >= 16 else GPU_MMA_TRUNCATION_SHORT


def _route_bias(bias: Optional[torch.Tensor], route_expert: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """|bias| of each valid route's expert [M, topk, N] in float64 (biases are used in fp32); 0 without one."""
    if bias is None:
        return torch.zeros((), dtype=F64, device=route_expert.device)
    b = bias.to(torch.float32).to(F64).to(route_expert.device).abs()[route_expert.clamp_min(0)]
    return b * valid[..., None].to(F64)


def round_both(V: torch.Tensor, A_c: torch.Tensor, A_d: torch.Tensor, p_d: torch.Tensor, q: torch.Tensor,
               n_round: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V, A, p) of the difference after kernel and mirror both round to the grid ``q`` (see above).

    V: incoming variance (continuous and discrete parts together); A_c: E|continuous part|;
    A_d, p_d: E|discrete part| and the probability that it is nonzero. ``n_round`` roundings of
    the same grid in a row (each may flip) add their h terms.
    """
    qs = q.clamp_min(1e-300)
    h = torch.clamp(torch.clamp(A_c / qs, max=1.0 / 6.0) + torch.minimum(A_d / qs, p_d / 6.0), max=1.0 / 6.0)
    p = torch.clamp(torch.clamp(A_c / qs, max=1.0) + torch.minimum(A_d / qs, p_d), max=1.0)
    return V + n_round * q ** 2 * h, A_c + A_d, torch.clamp(n_round * p, max=1.0)


def _act_partials(c1: torch.Tensor, act: Activation, clamp_limit) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(|df/dg|, |df/du|) per c2 element at c1 (float64 autograd of the reference activation)."""
    from reference.activations import apply_activation  # the harness may import reference

    # autograd even when the caller runs under no_grad or inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        c1 = c1.detach().to(F64).clone().requires_grad_(True)
        apply_activation(c1, act, clamp_limit).sum().backward()
    dg, du = _gate_up(c1.grad.detach().abs(), act)
    return dg, du


# =================================================================================================
# A numerics profile's roundings (contract/profile.py), as the mirror follows them
# =================================================================================================
# The mirror rounds where the backend's declared profile says, so the gate compares like with like;
# what a profile changes for the flip model is *where* a discrepancy can cross a grid:
# - GEMM outputs kept in fp32 (quantized schemes): c1 and c3 round to the fp32 grid, not S's;
# - double activation rounding: act(g) is stored to S before the product: one more rounding, on
#   act(g)'s S grid, between the c1 differences and c2's own rounding; a flip there moves c2 by
#   ulp_S(act(g)) |u'| (u' the up factor) before c2 rounds;
# - top-k sum in S (topk 2..4): every partial sum rounds to S, so each of the topk - 1 adds is a
#   rounding where differing c3 may flip the partial (equal c3 still give equal sums);
# - TF32 dots: both sides read the same TF32 operands (the mirror truncates them too); the products
#   carry 22 bits (exact in fp32) and are accumulated by the same fp32 tensor-core accumulator the
#   model uses for bf16 and fp16 dots, so only the product bits change (same accumulation class);
#   GEMM2's operand c2 is an intermediate, though: its TF32 rounding flips where c2 differs (the
#   per-element gate takes it as a requantization step of one TF32 ulp);
# - router weight rounded to S, other quantizer formulas: a function of the inputs alone, computed
#   the same on both sides: no flip of their own (their flips come from differing c2, modelled already);
# - LoRA rank intermediate stored to S: rounded alike on both sides; a shrink accumulated in another
#   fp32 order could flip it, which is not modelled (said in the derivation).
@dataclass
class _ProfileRoundings:
    """What ``profile`` changes for one call (see above); float64 tensors from the mirror's stages."""

    profile: NumericsProfile
    gemm_grid: torch.dtype  # the dtype c1 and c3 are stored in
    act_gate: Optional[torch.Tensor]  # |act(g)| [M, T, I] when stored to S first (double rounding), else None
    act_up: Optional[torch.Tensor]  # |u'| the stored act(g) is multiplied by
    act_gate_partial: Optional[torch.Tensor]  # |d act(g) / dg|
    act_up_partial: Optional[torch.Tensor]  # |d u' / du|
    topk_partials: Optional[torch.Tensor]  # [M, T-1, K]: the mirror's partial sums (rounded to S), else None
    tf32: bool
    weight_in_storage: bool  # a weight-only scheme's dequantized weight rounded to S before the dot
    quantizer: object  # the profile's requantization quantizer (None: unquantized)
    lora_rank_in_storage: bool = False  # the call has LoRA and the profile stores its rank intermediate to S

    def lines(self, S: torch.dtype) -> List[str]:
        """The derivation lines of what this profile adds (empty for SPEC's)."""
        p = self.profile
        if p == SPEC_PROFILE or not p.differences():
            return []
        out = [f"profile {p.name}: the mirror follows it ({'; '.join(p.differences())})"]
        if self.gemm_grid != S:
            grid = str(self.gemm_grid).replace("torch.", "")
            out.append(f"GEMM outputs in {grid} (quantized activations): c1 and c3 round to the {grid} grid, "
                       f"ulp_{grid} in place of ulp_S")
        if self.act_gate is not None:
            out.append("double activation rounding: c2 = round_S(round_S(a) u'), a = act(g): one more rounding on "
                       "ulp_S(a); flip p = 2 sigma_a / ulp_S(a) with sigma_a = 4 u32 |a| + 1.13 sigma_c1(g); one flip "
                       "moves c2 by ulp_S(a) |u'| (then c2 rounds): delta_i += ulp_S(a) |u'|, count step q += ulp_S(a) |u'|")
        if self.topk_partials is not None:
            out.append(f"top-k sum in S: topk - 1 partial sums round to S: out term sum_j ulp_S(partial_j) in place of "
                       "1 ulp_S(out); each rounding keeps E|D| (so the count's carry to out is unchanged) and adds "
                       "q^2 h to V")
        if self.weight_in_storage:
            out.append("weight-only weights dequantized to S before the dot: the same rounding of an input on both "
                       "sides (no flip term); the products carry 2 x S bits (accumulation class by product_bits)")
        if self.tf32:
            out.append("TF32 dots: both sides read TF32 operands (22-bit products, exact in fp32): same accumulation "
                       "unit and class as other fp32-accumulated dots; GEMM2's operand c2 is an intermediate, so its "
                       "TF32 rounding is a flip event of one TF32 ulp (the gate's requantization step)")
        if self.lora_rank_in_storage:
            out.append("LoRA rank intermediate stored to S: rounded the same on both sides; its flips (an fp32 shrink "
                       "in another order crossing an S midpoint) are not modelled: an implementation that declares it "
                       "is judged as if its shrink matched the mirror's order")
        if p.router_weight_gemm2 != SPEC_PROFILE.router_weight_gemm2 or \
                p.router_weight_input != SPEC_PROFILE.router_weight_input:
            out.append("router weight rounded to S: the same function of an input on both sides: no flip term")
        return out


def _gemm_grid(inputs: MoEInputs, profile: NumericsProfile) -> torch.dtype:
    """The dtype c1 and c3 are stored in under ``profile``: the mirror's rule
    (reference.pipeline.gemm_output_dtype), applied to this call's shape."""
    from reference.pipeline import gemm_output_dtype  # the harness may import reference

    from moe_validate.contract.checks import validate_call

    return gemm_output_dtype(validate_call(*inputs.args(), **inputs.kwargs()), profile, "mirror")


def _profile_roundings(inputs: MoEInputs, stages: Dict[str, torch.Tensor], profile: NumericsProfile) -> _ProfileRoundings:
    act = inputs.activation
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    S = storage_dtype(inputs.hidden_states.dtype)
    clamp_limit = inputs.quant.gemm1_clamp_limit if inputs.quant is not None else None
    fused = fused_silu_fp8_group(act, scheme, clamp_limit, inputs.lora is not None)
    gemm_grid = _gemm_grid(inputs, profile)
    act_gate = act_up = gate_partial = up_partial = None
    if not fused and profile.rounds_activation_twice(act, clamp_limit):
        act_gate, act_up, gate_partial, up_partial = _gate_factors(stages["c1"], act, clamp_limit)
    partials = None
    valid = stages["route_valid"].to(torch.bool)
    T = valid.shape[1] if valid.dim() == 2 else 1
    if profile.topk_sum is TopkSum.STORAGE_UP_TO_4 and 2 <= T <= 4:
        from reference.pipeline import storage_partial_sums  # the harness may import reference

        partials = storage_partial_sums(stages["c3"], valid, S)[:, 1:]  # after each add: where it rounds
    quantizer = None
    if scheme.act_granularity is not None:
        quantizer = profile.quantizer("int8" if scheme.act_dtype == torch.int8 else "fp8", scheme.act_granularity, fused)
    tf32 = profile.fp32_dot is DotPrecision.TF32 and product_bits(scheme, S, True) == 2 * TF32_BITS
    weight_in_storage = (scheme.weight_dtype is not None and scheme.act_granularity is None
                         and profile.weight_only_dequantized is WeightPrecision.STORAGE)
    lora_rank_in_storage = inputs.lora is not None and profile.lora_rank_intermediate is WeightPrecision.STORAGE
    return _ProfileRoundings(profile, gemm_grid, act_gate, act_up, gate_partial, up_partial, partials, tf32,
                             weight_in_storage, quantizer, lora_rank_in_storage)


def _gate_factors(c1: torch.Tensor, act: Activation, clamp_limit):
    """(|a|, |u'|, |da/dg|, |du'/du|) of c2 = a(g) u' at the mirror's c1 (float64 autograd)."""
    from reference.activations import gated_factors  # the harness may import reference

    with torch.inference_mode(False), torch.enable_grad():
        c1 = c1.detach().to(F64).clone().requires_grad_(True)
        a, up = gated_factors(c1, act, clamp_limit)
        (grad_g,) = torch.autograd.grad(a.sum(), c1, retain_graph=True)
        (grad_u,) = torch.autograd.grad(up.sum(), c1)
    da, _ = _gate_up(grad_g.abs(), act)
    _, dup = _gate_up(grad_u.abs(), act)
    return a.detach().abs(), up.detach().abs(), da, dup


def _per_expert_matmul(a, w, route_expert, valid):
    """[M, T, N]: sum_k a[r, k] w[e(r), n, k] (signed) for valid routes, zeros elsewhere."""
    M, T = a.shape[0], a.shape[1]
    out = torch.zeros(M, T, w.shape[1], dtype=F64, device=a.device)
    for e in range(w.shape[0]):
        sel = valid & (route_expert == e)
        if sel.any():
            out[sel] = a[sel] @ w[e].to(F64).T
    return out


def _sum_over_inputs(V, A, p, w, route_expert, valid, wts):
    """A linear map sum_i w[e, k, i] D_i (times the router weight) of independent differences D_i."""
    var, _ = _per_expert_gemm_scales(V.clamp_min(0).sqrt(), w, route_expert, valid, power=2)
    mass, _ = _per_expert_gemm_scales(A, w, route_expert, valid, power=1)
    var = var * wts[..., None] ** 2
    mean_abs = torch.minimum(mass * wts[..., None], _MEAN_ABS * var.sqrt())
    events = torch.clamp(p.sum(-1, keepdim=True), max=1.0).expand_as(var)
    return var, mean_abs, events


def flip_aware_sigma(inputs: MoEInputs, stages: Dict[str, torch.Tensor], *, native_gpu: bool,
                     per_stage: Optional[Dict[str, torch.Tensor]] = None,
                     profile: NumericsProfile = SPEC_PROFILE,
                     roundings: Optional[_ProfileRoundings] = None,
                     ties: Optional[DivisionTies] = None,
                     fp8_accumulation: Optional[Fp8Accumulation] = None,
                     ) -> Tuple[torch.Tensor, List[str], Dict[str, float]]:
    """[M, K] modelled std of kernel - mirror, with derivation lines and summary terms (see above).

    ``per_stage``: a dict to fill with the modelled (V, p) of every stored stage (``V_c1``,
    ``p_c1``, ... ``V_out``, ``p_out``), for tests that compare them stage by stage.
    ``profile``: the numerics profile the mirror ``stages`` followed (its extra roundings are modelled).
    ``roundings``: ``_profile_roundings`` of these inputs, stages and profile, where the caller has it.
    ``ties``: ``division_ties`` of the same, where the caller has it (computed here otherwise).
    ``fp8_accumulation``: how the run's fp8 dots accumulated (``fp8_mma``), as its backend reported.
    """
    act = inputs.activation
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    quant = inputs.quant
    S = storage_dtype(inputs.hidden_states.dtype)
    valid = stages["route_valid"].to(torch.bool)
    rexp = stages["route_expert"].long()
    x, w1, w2 = stages["x"].to(F64), stages["w1"].to(F64), stages["w2"].to(F64)
    c1, c2, c2_in, c3 = (stages[k].to(F64) for k in ("c1", "c2", "c2_in", "c3"))
    out = stages["out"].to(F64)
    M, K = out.shape
    T = valid.shape[1]
    I = c2.shape[-1]
    vm = valid[..., None].to(F64)
    wts = inputs.topk_weights.to(F64).to(out.device).abs()
    if inputs.apply_router_weight_on_input:
        wts = torch.ones_like(wts)
    zeros_out = torch.zeros_like(out)
    if M == 0 or K == 0 or T == 0:
        return zeros_out, ["no output element: nothing to model"], {"flip_events_expected": 0.0}
    clamp_limit = quant.gemm1_clamp_limit if quant is not None else None
    fused = fused_silu_fp8_group(act, scheme, clamp_limit, inputs.lora is not None)
    pr = roundings if roundings is not None else _profile_roundings(inputs, stages, profile)
    if ties is None:
        ties = division_ties(inputs, stages, profile, native_gpu)
    G = pr.gemm_grid  # the grid c1 and c3 are stored on (S unless the profile keeps them in fp32)
    bits = product_bits(scheme, S, pr.tf32, pr.weight_in_storage)
    native_fp8 = fp8_mma(scheme, native_gpu, fp8_accumulation)
    (k1, a1), (k2, a2) = acc_error_typical(x.shape[1], bits, native_fp8), acc_error_typical(I, bits, native_fp8)
    n_epi1 = int(scheme.act_dtype is not None) + int(scheme.weight_dtype is not None) \
        + int(quant is not None and quant.w1_bias is not None)
    n_epi2 = int(scheme.act_dtype is not None) + int(scheme.weight_dtype is not None) \
        + int(quant is not None and quant.w2_bias is not None) + int(not inputs.apply_router_weight_on_input)

    # --- c1 = round_S(acc1): continuous fp32 error, one rounding ----------------------------------
    xr = x[:, None, :].expand(M, T, x.shape[1])
    s1_sq, _ = _per_expert_gemm_scales(xr, w1, rexp, valid)
    epi1 = EPILOGUE_OP_SIGMA * U32 * c1.abs() * math.sqrt(n_epi1)
    s1_eff = s1_sq.sqrt()
    # GPU_MMA_TRUNCATION: every tensor-core dot but int8 x int8 (the fp8 MMA's at its own tau).
    # fp8 x fp8 on mma.sync tiles (8-bit products: the short tau) was measured on the H200: without the
    # term c1's and c3's own flips ran up to 4.5x the model in fp16 (fp8_block128), with it 0.22-0.96
    # (scripts/gpu_stage_rates.py, docs/BOUNDS.md)
    # the fp8 MMA's |c| part needs an accumulator that carries the running sum across the K loop: a
    # block-scaled dot restarts it every scale block (its partials are scaled and added in fp32)
    chained_fp8 = fp8_mma_chained(scheme, native_fp8)
    mma_bias = native_gpu and bits is not None and (chained_fp8 or not native_fp8)
    trunc1 = torch.zeros_like(c1)
    if mma_bias:
        # the partial sums run to the dot's own result, before the bias: |acc| <= |c| + |b|
        b1 = _route_bias(quant.w1_bias if quant is not None else None, rexp, valid)
        trunc1 = _mma_truncation(x.shape[1], bits, c1.abs() + b1, s1_eff, chained_fp8)
    var_c1_pre = ((k1 * s1_eff) ** 2 + epi1 ** 2 + (trunc1 / _MEAN_ABS) ** 2) * vm
    A1_pre = (a1 * s1_eff + _MEAN_ABS * epi1 + trunc1) * vm
    if ties is not None:
        # a near-tie input code flips with p, by E[D^2] <= p (sum_k jump_k |w1|)^2; it moves the whole row
        # of c1 together, so its flips are not independent per element: the count takes it as one event
        # per token (count_allowance), and only its variance enters here (the z-scores)
        shift1 = ties.c1_shift(c1)
        var_c1_pre = var_c1_pre + TRITON_DIVISION_P * (ties.c1 ** 2 + shift1 ** 2) * vm
        A1_pre = A1_pre + TRITON_DIVISION_P * shift1 * vm
    zero1 = torch.zeros_like(c1)
    V1, A1, p1 = round_both(var_c1_pre, A1_pre, zero1, zero1, ulp(c1, G))

    # --- c2 = round_S(act(c1)) (not rounded on the fused silu + fp8_block128 path) ------------
    dg, du = _act_partials(c1, act, clamp_limit)
    Vg, Vu = _gate_up(V1, act)
    Ag, Au = _gate_up(A1, act)
    pg, pu = _gate_up(p1, act)
    g_abs, u_abs = _gate_up(c1.abs(), act)
    V2 = dg ** 2 * Vg
    A2d = dg * Ag
    p2d = pg.clone()
    if du is not None:
        V2, A2d, p2d = V2 + du ** 2 * Vu, A2d + du * Au, p2d + pu
        act_scale = c2.abs() + g_abs * (u_abs + (1.0 if act is Activation.SWIGLUOAI else 0.0))
    else:
        act_scale = c2.abs() + g_abs
    act_flip = ACT_FLIP.get(act, ACT_FLIP_DEFAULT)
    sig_act = (ACT_SIGMA if act_flip else 0.0) * U32 * act_scale * vm
    V2 = V2 + sig_act ** 2
    A2c = act_flip * U32 * act_scale * vm
    p2d = torch.clamp(p2d, max=1.0)
    if pr.act_gate is not None:
        # double rounding (the profile): a = act(g) rounds to S first, then c2 = round_S(round_S(a) u')
        a, up, da, dup = pr.act_gate, pr.act_up, pr.act_gate_partial, pr.act_up_partial
        a_scale = a + g_abs  # the activation's fp32 noise, relative to (|a| + |g|) as for c2 above
        sig_a = (ACT_SIGMA if act_flip else 0.0) * U32 * a_scale * vm
        Va, Aa, pa = round_both(da ** 2 * Vg + sig_a ** 2, act_flip * U32 * a_scale * vm, da * Ag,
                                torch.clamp(pg, max=1.0), ulp(a, S))
        # round_S(a) u' is exact in fp32 for S = bf16 / fp16 (<= 22 bits); in fp32 it is one more fp32 op
        product = EPILOGUE_OP_SIGMA * U32 * c2.abs() * vm * float(S == torch.float32)
        V2 = up ** 2 * Va + (a * dup) ** 2 * Vu + product ** 2
        A2c = _MEAN_ABS * product
        A2d = up * Aa + a * dup * Au
        p2d = torch.clamp(pa + pu, max=1.0)
    p_c2_own = torch.clamp(A2c / ulp(c2, S).clamp_min(1e-300), max=1.0) * vm  # the activation's own flips
    if not fused:
        V2, A2, p2 = round_both(V2, A2c, A2d, p2d, ulp(c2, S))
        A2c = torch.zeros_like(A2)
        A2d, p2d = A2, p2
    V_c2, p_c2 = V2, p2d  # c2 as stored (before any requantization)
    lines = [
        "sigma (z-scores): flip-aware std of kernel - mirror; per stored element track V = E[D^2], A = E|D|, "
        "p = P(D != 0); a rounding to grid q keeps A and adds q^2 min(1/6, A_c/q + min(A_d/q, p_d/6))",
        f"continuous sources (typical sigma / flip-driving A): accumulation {k1 / U32:.3g} / {a1 / U32:.3g} u32 s1 "
        f"(GEMM1, n={x.shape[1]}) and {k2 / U32:.3g} / {a2 / U32:.3g} u32 s2 (GEMM2, n={I}); epilogue "
        f"{EPILOGUE_OP_SIGMA} / {EPILOGUE_OP_SIGMA * _MEAN_ABS:.2g} u32 |c| per fp32 op ({n_epi1} in GEMM1, {n_epi2} in GEMM2); "
        f"activation {ACT_SIGMA if act_flip else 0} / {act_flip} u32 (|c2| + |g||u|)",
        "propagation: c1 -> c2 by |df/dg|, |df/du| (float64 autograd at the mirror's c1); "
        "GEMM2 sums independent c2_in differences: V w^2 sum_i w2^2 V_i, A <= min(w sum_i |w2| A_i, 0.8 sqrt(V))",
    ]
    if ties is not None:
        lines += ties.lines()
    if mma_bias and chained_fp8:
        lines.append(f"the fp8 MMA's accumulator (measured on an H200): + {FP8_MMA_TRUNCATION:g} u32 n |c| "
                     "flip-driving truncation in GEMM1 and GEMM2 beside its unit's s-proportional part "
                     "(FP8_MMA_TRUNCATION)")
    elif mma_bias:
        lines.append(f"compiled tensor-core dots (measured on an H200): + {_mma_tau(bits):g} u32 n (|c| + s/2) "
                     "flip-driving accumulation bias in GEMM1 and GEMM2 (GPU_MMA_TRUNCATION)")

    # --- requantization of c2 (codes and, for dynamic scales, the scale itself) -----------------
    coherent = None  # [M, T, K] variance of a group-wide scale shift, carried through GEMM2 coherently
    coherent_out = None  # the same for a per-tensor dynamic scale: every route moves together
    gran = scheme.act_granularity
    if gran is not None:
        step = _requant_step(c2_in, valid, scheme, inputs, pr.quantizer)
        amax_src = c2.abs() * vm
        rho_var = rho_abs = rho_p = None
        if gran in ("token", "token_group"):
            width = _scale_group_width(gran, I)
            coherent = torch.zeros(M, T, K, dtype=F64, device=out.device)
            rho_var, rho_abs, rho_p = (torch.zeros_like(c2) for _ in range(3))
            for g0 in range(0, I, width):
                grp = slice(g0, min(I, g0 + width))
                amax, arg = amax_src[..., grp].max(-1, keepdim=True)
                # an all-zero group (an invalid route, zero blocks) has no scale to shift: 0, not 0 x inf = NaN
                inv = torch.where(amax > 0, 1.0 / amax.clamp_min(1e-300), torch.zeros_like(amax))
                rv = torch.gather(V2[..., grp], -1, arg) * inv ** 2
                ra = torch.gather(A2d[..., grp] + A2c[..., grp], -1, arg) * inv
                rp = torch.gather(p2d[..., grp], -1, arg)
                rho_var[..., grp], rho_abs[..., grp], rho_p[..., grp] = rv, ra, rp  # broadcast over the group
                part = torch.zeros_like(c2)
                part[..., grp] = c2_in[..., grp]
                coherent += rv * (_per_expert_matmul(part, w2, rexp, valid) * wts[..., None]) ** 2
        elif gran == "tensor_dynamic" and valid.any():
            flat = amax_src.reshape(-1)
            idx = int(flat.argmax())
            amax = flat[idx].clamp_min(1e-300)
            rv = V2.reshape(-1)[idx] / amax ** 2
            rho_var = torch.full_like(c2, float(rv))
            rho_abs = torch.full_like(c2, float((A2d.reshape(-1)[idx] + A2c.reshape(-1)[idx]) / amax))
            rho_p = torch.full_like(c2, float(p2d.reshape(-1)[idx]))
            coherent_out = rv  # times out^2 below
        # the scale shift also moves every code of the group toward a midpoint: one more discrete source
        if rho_abs is not None:
            A_scale = rho_abs * c2_in.abs()
            A2d_q = A2d + A_scale
            p2d_q = torch.clamp(p2d + rho_p, max=1.0)
        else:
            A2d_q, p2d_q = A2d, p2d
        if ties is not None:  # a near-tie code flips by one step with p: A_c / q gains p
            A2c = A2c + TRITON_DIVISION_P * ties.c2_in * vm
            V2 = V2 + TRITON_DIVISION_P * ties.c2_in ** 2 * vm
        V2, A2, p2 = round_both(V2, A2c, A2d_q, p2d_q, step)
        A2c = torch.zeros_like(A2)
        lines.append(f"requantization ({gran}): a rounding to the code step; a dynamic scale moves with its "
                     "group's amax element: relative rho = D_amax / amax shifts the group coherently "
                     "(variance E[rho^2] (w sum_group c2_in w2)^2) and moves codes by rho |c2_in|")
    else:
        A2 = A2d + A2c

    # --- c3 = round_S(w (c2_in . w2 + b2)) -------------------------------------------------------
    V3, A3d, p3d = _sum_over_inputs(V2 * vm, A2 * vm, p2 * vm, w2, rexp, valid, wts)
    s2_sq, _ = _per_expert_gemm_scales(c2_in, w2, rexp, valid)
    epi2 = EPILOGUE_OP_SIGMA * U32 * c3.abs() * math.sqrt(n_epi2)
    s2_eff = s2_sq.sqrt() * wts[..., None]
    trunc3 = torch.zeros_like(c3)
    if mma_bias:
        b2 = _route_bias(quant.w2_bias if quant is not None else None, rexp, valid) * wts[..., None]
        trunc3 = _mma_truncation(I, bits, c3.abs() + b2, s2_eff, chained_fp8)
    var_c3_cont = ((k2 * s2_eff) ** 2 + epi2 ** 2 + (trunc3 / _MEAN_ABS) ** 2) * vm
    A3c = (a2 * s2_eff + _MEAN_ABS * epi2 + trunc3) * vm
    if ties is not None:
        shift3 = ties.c3_shift(c3)
        var_c3_cont = var_c3_cont + TRITON_DIVISION_P * shift3 ** 2 * vm
        A3c = A3c + TRITON_DIVISION_P * shift3 * vm
    V3 = V3 + var_c3_cont
    if coherent is not None:
        V3 = V3 + coherent * vm
    V3, A3, p3 = round_both(V3, A3c, A3d * vm, p3d * vm, ulp(c3, G))
    p3_direct = torch.clamp(A3c / ulp(c3, G).clamp_min(1e-300), max=1.0) * vm  # c3 flips of its own accumulation

    # --- out = round_S(sum_j c3[m, j]) in fp32 (equal inputs give equal sums) -------------------
    if pr.topk_partials is not None:
        # the profile's sum in S: every partial sum rounds to S (each a rounding of differing inputs)
        Vo, Ao, po = V3[:, 0] * vm[:, 0], A3[:, 0] * vm[:, 0], p3[:, 0] * vm[:, 0]
        for j in range(1, T):
            Vo = Vo + V3[:, j] * vm[:, j]
            Ao = torch.minimum(Ao + A3[:, j] * vm[:, j], _MEAN_ABS * Vo.sqrt())
            po = torch.clamp(po + p3[:, j] * vm[:, j], max=1.0)
            if coherent_out is not None and j == T - 1:
                Vo = Vo + coherent_out * out ** 2
            # as for the final rounding below: V gains the rounding's q^2 h, A is kept, and p stays the
            # incoming probability (an upper bound of the stored partial's)
            Vo, _, _ = round_both(Vo, torch.zeros_like(Vo), Ao, po, ulp(pr.topk_partials[:, j - 1], S))
    else:
        Vo = (V3 * vm).sum(1)
        Ao = torch.minimum((A3 * vm).sum(1), _MEAN_ABS * Vo.sqrt())
        po = torch.clamp((p3 * vm).sum(1), max=1.0)
        if coherent_out is not None:
            Vo = Vo + coherent_out * out ** 2
        Vo, _, _ = round_both(Vo, torch.zeros_like(Vo), Ao, po, ulp(out, S))
    Vo = Vo * valid.any(1, keepdim=True).to(F64)  # a token without a valid route is exactly zero
    lines.append("out: the fp32 top-k sum of equal c3 is equal; differing c3 add up (V, A, p summed over slots), "
                 "then the final rounding to S")
    if inputs.lora is not None:
        lines.append("LoRA: its deltas are small next to c1 and c3; their own fp32 noise is not modelled")
    sig = Vo.sqrt()
    lines += pr.lines(S)
    if per_stage is not None:
        q2 = _requant_step(c2_in, valid, scheme, inputs, pr.quantizer) if gran is not None else ulp(c2, S)
        if gran is None and pr.act_gate is not None:
            q2 = q2 + ulp(pr.act_gate, S) * pr.act_up  # an act(g) flip moves c2 by ulp_S(a) |u'|, then c2 rounds
        if ties is not None:
            per_stage["p_token_input_ties"] = 1.0 - (1.0 - TRITON_DIVISION_P) ** ties.tokens
            per_stage["p_c2_in_ties"] = TRITON_DIVISION_P * (ties.c2_in > 0).to(F64) * vm
        per_stage.update(V_c1=V1, p_c1=p1, V_c2=V_c2, p_c2=p_c2, p_c2_own=p_c2_own, V_c2_in=V2, p_c2_in=p2, q_c2_in=q2,
                         p_c3_direct=p3_direct, V_c3=V3, p_c3=p3,
                         V_out=Vo, p_out=po)
    terms = {"sigma_flip_max": float(sig.max()), "sigma_flip_median": float(sig.median()),
             "flip_p_c1_mean": float(p1[valid].mean()) if valid.any() else 0.0,
             "flip_p_out_mean": float(po[valid.any(1)].mean()) if valid.any() else 0.0,
             # expected number of output elements that differ from the mirror (calibration.py
             # trusts a pooled gate RMS only when enough of them are expected)
             "flip_events_expected": float(po.sum())}
    return sig, lines, terms


# =================================================================================================
# The gate's count test: how many output elements may differ from the mirror at all
# =================================================================================================
# The per-element gate must let every element move by a worst-case flip, so a systematic error
# smaller than one flip (1 ulp on every element, a skipped rounding) passes it everywhere. But a
# correct kernel differs from the mirror in FEW elements: only where a flip happened. The count
# C = #{kernel != mirror} is a sum of two kinds of events (flip_aware_sigma's probabilities):
# - direct: c3[r, k] flips at its own rounding (its fp32 accumulation and epilogue), probability
#   p_d per element, independent between elements (each has its own accumulation);
# - clustered: a c2_in element (route r, input i) differs by one grid step q (an S ulp, or one
#   requantization step), probability p_e; it moves c3[r, k] by d = q |w2[e, k, i]| w_r, which
#   crosses a rounding of c3 with probability min(1, d / ulp_S(c3[r, k])) (the positions of the
#   values in their cells are independent across k), so it makes X_e differing elements, a sum of
#   independent Bernoullis with mean m_e = sum_k P_k <= K.
# Either way the output differs only if the changed c3 (by max(d, ulp(c3)), or one ulp for a direct
# flip) carries the fp32 top-k sum across a rounding of out: probability min(1, change / ulp_S(out))
# (equal c3 give equal sums), so P_k = min(1, d / ulp(c3)) min(1, max(d, ulp(c3)) / ulp(out)) and a
# direct flip counts p_d min(1, ulp(c3) / ulp(out)).
# Chernoff on the compound sum: log E exp(t C) <= sum_d log(1 + p_d (e^t - 1))
#   + sum_e log(1 + p_e (exp(m_e (e^t - 1)) - 1))   (E e^{tX} <= exp(m (e^t - 1)) for a Bernoulli
# sum), so P(C >= c) <= exp(psi(t) - t c) for every t > 0: c* = min_t (psi(t) + ln(1/alpha)) / t.
# Which input of a route flips follows the model's rates (small elements most, with small clusters;
# the shape measured on the interpreter matches, docs/BOUNDS.md).
# The rates are the model's typical ones times COUNT_RATE_SLACK: ``moe-validate calibrate
# --strict`` fails when a (scheme, dtype) row's measured count leaves the model by more than that
# factor, so a correct kernel stays inside it. Events of a shared dynamic scale (its amax element
# flips) are counted per element, as the model's p does, not as one event: the slack covers them.
COUNT_ALPHA = 1e-6  # per case: 1e4 cases x 10 repetitions give a false alarm with probability 1e-1 at most
COUNT_RATE_SLACK = 4.0  # = calibration.COUNT_RATIO_LIMIT: rates may be off by this factor before calibrate flags them
# On a GPU the compiled kernels' dots flip more, and their flips reach larger elements (the
# tensor cores' accumulation bias, GPU_MMA_TRUNCATION): measured stage by stage on one H200
# (docs/BOUNDS.md), the model with that term puts every judged (scheme, dtype) row's pooled count
# within the slack and no correct run above 0.36 of its allowance, so the count test is applied
# there too. The switch stays: a device whose rates leave the slack (``moe-validate calibrate
# --strict`` there) can turn it off, and its records then say the count was not applied.
COUNT_TEST_ON_GPU = True
_COUNT_THETAS = torch.exp(torch.linspace(math.log(1e-2), math.log(40.0), 96, dtype=F64))
_COUNT_CHUNK = 1 << 22  # events x thetas evaluated at once


def _log_mgf_sum(p: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """sum over events of log(1 + p (inner - 1)) for every theta: p [n], inner [n, thetas] (may be inf)."""
    return torch.log1p(p[:, None] * (inner - 1.0)).sum(0)


def chernoff_count_quantile(p_direct: torch.Tensor, p_event: torch.Tensor, m_event: torch.Tensor,
                            alpha: float = COUNT_ALPHA) -> float:
    """c* with P(C >= c*) <= alpha for C = sum Bernoulli(p_direct) + sum_e Bernoulli(p_e) X_e,
    X_e a Bernoulli sum of mean m_e (see above). All three are flat float64 tensors."""
    thetas = _COUNT_THETAS.to(p_direct.device)  # the events' device: a GPU run's stages live on the GPU
    et = torch.expm1(thetas)  # e^t - 1
    psi = torch.zeros_like(et)
    pd = p_direct[p_direct > 0]
    step = max(1, _COUNT_CHUNK // et.numel())
    for c0 in range(0, pd.numel(), step):
        psi += _log_mgf_sum(pd[c0:c0 + step], 1.0 + et[None, :])
    keep = (p_event > 0) & (m_event > 0)
    pe, me = p_event[keep], m_event[keep]
    for c0 in range(0, pe.numel(), step):
        psi += _log_mgf_sum(pe[c0:c0 + step], torch.exp(me[c0:c0 + step, None] * et[None, :]))
    c = (psi + math.log(1.0 / alpha)) / thetas
    return float(c.min())


def _cluster_sizes(q2, w2, c3_ulp, out_ulp, route_expert, valid, wts) -> torch.Tensor:
    """[M, T, I]: m = sum_k P_k (above) with d = q2[r, i] |w2[e, k, i]| w_r, per valid route."""
    M, T, I = q2.shape
    out = torch.zeros(M, T, I, dtype=F64, device=q2.device)
    for mi, ji, aw in _valid_routes_by_expert(w2, route_expert, valid):
        move = q2[mi, ji][:, None, :] * aw[None] * wts[mi, ji][:, None, None]  # [R, K, I]
        u3 = c3_ulp[mi, ji][:, :, None].clamp_min(1e-300)
        u_out = out_ulp[mi][:, :, None].clamp_min(1e-300)
        p_k = torch.clamp(move / u3, max=1.0) * torch.clamp(torch.maximum(move, u3) / u_out, max=1.0)
        out[mi, ji] = p_k.sum(1)
    return out


def count_allowance(inputs: MoEInputs, stages: Dict[str, torch.Tensor], per_stage: Dict[str, torch.Tensor],
                    slack: float = COUNT_RATE_SLACK, alpha: float = COUNT_ALPHA,
                    profile: NumericsProfile = SPEC_PROFILE) -> Tuple[int, float, List[str], Dict[str, float]]:
    """(allowed count, expected count, derivation lines, terms) of the gate's count test.

    ``per_stage``: flip_aware_sigma's stage dict (p_c2_in, q_c2_in, p_c3_direct), computed for the
    same ``profile``. The expected count is the model's (no slack): sum p_d + sum_e p_e m_e, an
    upper bound of E[C].
    """
    S = storage_dtype(inputs.hidden_states.dtype)
    out = stages["out"]
    n = out.numel()
    valid = stages["route_valid"].to(torch.bool)
    if n == 0 or not valid.any() or "p_c2_in" not in per_stage:
        return n, 0.0, ["count: no valid route, every output element is an exact zero on both sides"], \
            {"differing_expected": 0.0, "differing_allowed": float(n), "differing_second_moment": 0.0}
    wts = inputs.topk_weights.to(F64).to(out.device).abs()
    if inputs.apply_router_weight_on_input:
        wts = torch.ones_like(wts)
    vm = valid[..., None].to(F64)
    c3_ulp = ulp(stages["c3"].to(F64), _gemm_grid(inputs, profile))
    out_ulp = ulp(out.to(F64), S)
    m_e = _cluster_sizes(per_stage["q_c2_in"].to(F64), stages["w2"], c3_ulp, out_ulp,
                         stages["route_expert"].long(), valid, wts)
    p_e = per_stage["p_c2_in"] * vm
    carry = torch.clamp(c3_ulp / out_ulp[:, None, :].clamp_min(1e-300), max=1.0)  # a c3 flip reaches out
    p_d = torch.clamp((per_stage["p_c3_direct"] * carry * vm).sum(1), max=1.0)  # [M, K]
    # C counts finite elements only (compare: a non-finite mirror element must match as a special
    # value): an event on an overflowed route (an fp16 c2 at inf, a NaN c3) lands on no counted element.
    # Left in, its NaN made the expected count n (an H200 nightly's fp16 d_outliers case, session 14)
    p_d = torch.nan_to_num(p_d * torch.isfinite(out.to(F64)), nan=0.0)
    finite_e = torch.isfinite(p_e) & torch.isfinite(m_e)
    p_e, m_e = torch.where(finite_e, p_e, 0.0).reshape(-1), torch.where(finite_e, m_e, 0.0).reshape(-1)
    p_tie = per_stage.get("p_c2_in_ties")
    if p_tie is None:
        p_rates = torch.clamp(slack * p_e, max=1.0)
    else:  # a near-tie code's p is measured, not modelled: the slack scales the rest of p only
        p_tie = p_tie.reshape(-1)
        p_rates = torch.clamp(slack * (p_e - p_tie).clamp_min(0.0) + p_tie, max=1.0)
    ties = per_stage.get("p_token_input_ties")
    if ties is not None:
        # a token whose input codes differ (DivisionTies) may differ in its whole output row; its
        # probability is measured, not modelled (TRITON_DIVISION_P, about 2x the flips seen): no slack
        K = out.shape[1]
        p_tok = ties.to(F64) * valid.any(1).to(F64)
        p_e, m_e = torch.cat([p_e, p_tok]), torch.cat([m_e, torch.full_like(p_tok, float(K))])
        p_rates = torch.cat([p_rates, p_tok])
    expected = float(min(n, p_d.sum() + (p_e * m_e).sum()))
    # E[C^2]'s sum over events, sum p_d + sum_e p_e (m_e + m_e^2) (a Bernoulli sum X_e has Var <= m_e): it
    # says how many independent events the expected count stands for, (E C)^2 / this; calibrate
    # judges a pooled ratio only where they are enough to tell it from chance (calibration.py)
    second_moment = float(p_d.sum() + (p_e * (m_e + m_e ** 2)).sum())
    c_star = chernoff_count_quantile(torch.clamp(slack * p_d, max=1.0).reshape(-1), p_rates, m_e, alpha)
    allowed = int(min(n, max(0, math.ceil(c_star) - 1)))  # C >= c* fails
    lines = [
        f"count: C = #(kernel != mirror) of {n}; expected {expected:.3g} = sum p_d min(1, ulp(c3)/ulp(out)) "
        "(own c3 flips reaching out) + sum_e p_e m_e (a c2_in element one step q off moves c3[k] by d = q |w2| w: "
        "m_e = sum_k min(1, d/ulp(c3)) min(1, max(d, ulp(c3))/ulp(out)) elements)",
        f"count: allowed C <= {allowed}: Chernoff bound on the compound sum at alpha = {alpha:g} with every rate "
        f"x{slack:g} (the calibration limit), c* = min_t (psi(t) + ln(1/alpha)) / t = {c_star:.4g}"
        + (" (>= n: no count test possible here)" if allowed >= n else ""),
    ]
    if ties is not None:
        lines.append(f"count: {int((ties > 0).sum())} token(s) with near-tie input codes under a Triton-division "
                     f"quantizer: one event each, p = 1 - (1 - {TRITON_DIVISION_P})^(their count), of K = {out.shape[1]} "
                     "elements (the whole output row), their p without the rate slack (measured)")
    terms = {"differing_expected": expected, "differing_allowed": float(allowed),
             "differing_direct_expected": float(p_d.sum()), "differing_events_expected": float(p_e.sum()),
             "differing_second_moment": second_moment,
             "count_rate_slack": slack, "count_alpha": alpha}
    return allowed, expected, lines, terms


# =================================================================================================
# The budget's requantization flips: counted per output element, not one worst jump each
# =================================================================================================
# Kernel and ``exact`` both requantize c2 (SPEC step 8); their codes differ only where the
# kernel's quantizer input lands across a rounding midpoint from exact's. Which codes can flip is
# known per case: exact's value v (c2 / scale, in code units) sits at a distance d from its code's
# upper and lower midpoints, and an accurate kernel's input differs from v by
#     e = (independent part, |.| <= b) + (the group's common shift).
# b: the error a correct kernel's c2 can carry, divided by the scale: the activation's image of
#   a c1 box (requant_c1_box: the SPEC's roundings plus REQUANT_EXTRA_ROUNDINGS, each half an S
#   ulp of what it rounds, Z sigma of the worst-case fp32 accumulation, fp32 epilogue operations),
#   evaluated at the box's corners in float64, plus a curvature margin (|f''| <= _ACT_CURVATURE:
#   an extremum of f inside the box), the fp32 activation math (ACT_FP32_ULPS u32 (|c2| + |g||u|))
#   and 1 + REQUANT_EXTRA_ROUNDINGS roundings of c2 to S. "Accurate" is thus: every stored value
#   within the SPEC's roundings plus one more of each (a double rounding, an activation computed
#   in S, a bias or dequantization rounded apart).
# The common shift: a dynamic scale is amax / QMAX over its group, and the kernel's amax lies in
#   [max(|c2| - b), max(|c2| + b)]: a relative scale error rho in [rho_lo, rho_hi] (+- 2 u32 for
#   the fp32 division), which moves every v of the group by -v rho / (1 + rho) together. The rho
#   range is cut into cells (REQUANT_SHIFT_CELLS, more where the shift is wide: a cell moves no code
#   by more than REQUANT_SHIFT_PER_CELL of its step); each cell has reference codes, those of
#   v / (1 + rho_mid), and within it each element takes the cell's largest shift toward a midpoint
#   of its reference code. The reference codes' own move off exact's, read with the kernel's scale
#   s (1 + rho), is a signed term per group (_group_shift_term): the shift's code moves and the
#   dequantized scale's cancel there. Plus _QUANTIZER_OPS u32 |v| for the fp32 divisions (a
#   reciprocal multiply included). A static scale has one cell of rho = 0.
# A code flips up only if e >= d_up: with the independent part symmetric and unimodal (a sum of
# independent uniform rounding errors is), P(e_ind >= x) <= (b - x) / (2 b) for 0 <= x < b and 0
# for x >= b, and by Gauss's inequality on its random part (C1Box.sigma through the activation,
# and c2's roundings) past its fixed part; p_up is the smaller, with x = d_up - shift (1 if x <= 0),
# the same for down. The jump is the code distance to the farthest code v + b + shift reaches,
# times s (1 + rho_hi).
# Measured (docs/BOUNDS.md): every code where mirror and exact differ is such a flip, and the
# model's sum p is 4-12x the mirror's flips (its b admits roundings the SPEC does not make).
# Per output element, the flips of the token's routes add w_r w2[e, k, i] jump_i in a KNOWN
# direction each (the jump's side times the sign of w2): out rises by X+ = sum of the raising ones
# and falls by X- = sum of the lowering ones, each a sum of independent Bernoullis for a given rho.
# Chernoff on each: P(X >= x) <= exp(psi(t) - t x) with psi(t) = sum over (route, scale group) of
# the cells' largest t H + sum_i log(1 + p (e^{t a} - 1)) (H: the cell's signed term; so it holds
# whatever rho each group has), and
# x* = min_t (psi(t) + ln(1 / FLIP_ALPHA)) / t, never more than sum a (all of them flip). The flip
# term is max(x*+, x*-): exceeded with probability <= 2 FLIP_ALPHA per element.
REQUANT_EXTRA_ROUNDINGS = 1  # roundings to S beyond the SPEC's an accurate kernel may add, at c1 and at c2
FLIP_ALPHA = 1e-9  # per output element and direction: the one-sided Gaussian tail at Z = 6
_ACT_CURVATURE = 2.0  # >= |f''| of every activation's gate function (silu 0.5, gelu 0.8, relu2 2)
_EPILOGUE_OPS_C1 = 4.0  # fp32 operations after GEMM1's accumulation (dequantization, bias, LoRA adds)
_QUANTIZER_OPS = 4.0  # fp32 roundings in x / s, kernel's and exact's (conversion and division each)
REQUANT_SHIFT_CELLS = 6  # cells of a dynamic scale's relative error rho, each bounded apart (at least)
REQUANT_SHIFT_CELLS_MAX = 12  # at most (the Chernoff sums' cost grows with them)
REQUANT_SHIFT_PER_CELL = 0.5  # the most a cell's shift may move a code, in its steps (below that: more cells)
_FLIP_U_RANGE = (math.log(0.05), math.log(500.0))  # ln(theta x the largest jump) searched for x*
_FLIP_GOLDEN_STEPS = 10  # the last bracket: 0.62^11 of the range, about 4% in theta
_FLIP_BLOCK_ELEMENTS = 1 << 22  # cells x routes x columns x I per block of the Chernoff sums
_FLIP_BLOCK_ELEMENTS_CUDA = 1 << 25  # fewer launches where memory is plentiful (8 bytes each)


def lora_accumulation_sigma(inputs: MoEInputs, stages: Dict[str, torch.Tensor], *factors
                            ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For each ``factor`` ([M, T, N], [M, T, K]): the std of the LoRA deltas' own fp32 accumulation,
    at c1 and at c3 (0 without LoRA), in the units of ``factor(n)`` x u32 per unit scale
    (``_acc_growth`` for the bound, the typical ``acc_error_typical`` for the z-scores). The sums
    below are computed once for all factors.

    A delta is two dots, ``t = a . A^T`` over the n inputs, then ``d = t . B^T`` over the rank r, so
    its error is the shrink's, carried through B, plus the expand's own:
        var = (u f(n))^2 sum_r B^2 sum_i a^2 A^2 + (u f(r))^2 sum_r t^2 B^2
    (the base GEMM's scale rule, s^2 = sum a^2 b^2, applied to each dot). Its scale is not small next
    to the base GEMM's: the rank-space t can be large where B cancels it (an fp32 nightly case on the
    H200, session 11: sum_r |t| |B| = 2.3 where the base s2 = 0.3, which failed the budget by 8%).
    """
    M, T = stages["route_valid"].shape[:2]
    N, K = stages["c1"].shape[-1], stages["c3"].shape[-1]
    dev = stages["c1"].device
    zero1, zero3 = torch.zeros(M, T, N, dtype=F64, device=dev), torch.zeros(M, T, K, dtype=F64, device=dev)
    lora = inputs.lora
    if lora is None or M == 0 or T == 0:
        return [(zero1, zero3) for _ in factors]
    from reference import pipeline as ref  # the harness may import reference

    valid, local = stages["route_valid"].to(torch.bool), stages["route_expert"].long()
    x, c2 = stages["x"].to(F64), stages["c2"].to(F64)
    rank = lora.w2_a.shape[2]
    square = (lambda w: tuple(t.to(F64) ** 2 for t in w) if isinstance(w, (tuple, list)) else w.to(F64) ** 2)
    keep = (lambda w: tuple(t.to(F64) for t in w) if isinstance(w, (tuple, list)) else w.to(F64))
    ident = lambda v: v  # noqa: E731
    sq = lambda v: v * v  # noqa: E731 (the rank-space t, squared before the expand)
    both_sq = replace(lora, w13_a=square(lora.w13_a), w13_b=square(lora.w13_b), w2_a=square(lora.w2_a),
                      w2_b=square(lora.w2_b))
    b_sq = replace(lora, w13_a=keep(lora.w13_a), w13_b=square(lora.w13_b), w2_a=keep(lora.w2_a),
                   w2_b=square(lora.w2_b))
    shrink1 = ref.lora_w13(zero1, x ** 2, both_sq, valid, local, inputs.activation, ident)
    expand1 = ref.lora_w13(zero1, x, b_sq, valid, local, inputs.activation, ident, round_rank=sq)
    w_sq = inputs.topk_weights.to(F64).to(dev) ** 2
    rwin = inputs.apply_router_weight_on_input
    shrink2 = ref.lora_w2(zero3, c2 ** 2, both_sq, w_sq, valid, local, ident, apply_router_weight_on_input=rwin)
    expand2 = ref.lora_w2(zero3, c2, b_sq, w_sq, valid, local, ident, apply_router_weight_on_input=rwin, round_rank=sq)
    n1, n2 = x.shape[-1], c2.shape[-1]
    return [(U32 * (f(n1) ** 2 * shrink1 + f(rank) ** 2 * expand1).clamp_min(0.0).sqrt(),
             U32 * (f(n2) ** 2 * shrink2 + f(rank) ** 2 * expand2).clamp_min(0.0).sqrt()) for f in factors]


def _lora_input(inputs: MoEInputs, device) -> torch.Tensor:
    """[M, K] float64: what the LoRA w13 delta reads (SPEC LoRA): the hidden states, times the router
    weight where it is applied on the input."""
    x = inputs.hidden_states.to(F64).to(device)
    if _stores_weighted_input(inputs):
        x = x * inputs.topk_weights[:, :1].to(F64).to(device)
    return x


def _lora_w13_delta(inputs: MoEInputs, stages: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[M, T, N] float64: the LoRA w13 delta d13 unrounded (SPEC LoRA), for the routes of ``stages``
    (mirror's or exact's: the same inputs give the same delta)."""
    from reference import pipeline as ref  # the harness may import reference

    c1 = stages["c1"]
    return ref.lora_w13(torch.zeros_like(c1, dtype=F64), _lora_input(inputs, c1.device), inputs.lora,
                        stages["route_valid"].to(torch.bool), stages["route_expert"].long(), inputs.activation,
                        lambda v: v)


def lora_store_parts(inputs: MoEInputs, stages: Dict[str, torch.Tensor]
                     ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(base1, d13, base3, d2) float64, [M, T, N] and [M, T, K]: the operands of the LoRA stores
    c1 = round_S(base1 + round_S(d13)) and c3 = round_S(base3 + round_S(d2)) (SPEC LoRA), from the
    mirror's stages; None without LoRA. Where base and delta cancel, each rounds at its own
    magnitude, far above the ulp of |c1| or |c3| (an H200 nightly, session 14: |base3| 0.254 against
    |c3| 0.0127, so one flip of the base's rounding was 32 ulps of c3, over a gate that allowed 3)."""
    if inputs.lora is None:
        return None
    from reference import pipeline as ref  # the harness may import reference

    valid, local = stages["route_valid"].to(torch.bool), stages["route_expert"].long()
    c1, c2, c3 = (stages[k].to(F64) for k in ("c1", "c2", "c3"))
    d13 = _lora_w13_delta(inputs, stages)
    d2 = ref.lora_w2(torch.zeros_like(c3), c2, inputs.lora, inputs.topk_weights.to(F64).to(c3.device), valid,
                     local, lambda v: v, apply_router_weight_on_input=inputs.apply_router_weight_on_input)
    return c1 - d13, d13, c3 - d2, d2


class C1Box(NamedTuple):
    """How far an accurate kernel's c1 may lie from exact's, [M, T, N] each (c1 units): ``box`` bounds
    it; of that, ``fixed`` is the part taken as a fixed unknown offset (fp32 epilogue operations, the
    LoRA delta's fp32 products, input codes at ties) and the rest is a sum of independent roundings
    and the accumulation error, symmetric and unimodal each, whose standard deviation is at most
    ``sigma`` (a rounding of half-width h: h / sqrt(3), the uniform's, the widest such law)."""

    box: torch.Tensor
    sigma: torch.Tensor
    fixed: torch.Tensor

    def widened(self, fixed: torch.Tensor) -> "C1Box":
        return C1Box(self.box + fixed, self.sigma, self.fixed + fixed)

    def masked(self, mask: torch.Tensor) -> "C1Box":
        return C1Box(self.box * mask, self.sigma * mask, self.fixed * mask)


def requant_c1_box(inputs: MoEInputs, exact: Dict[str, torch.Tensor], sigma_acc1: torch.Tensor,
                   extra: int = REQUANT_EXTRA_ROUNDINGS) -> C1Box:
    """[M, T, N]: how far an accurate kernel's c1 may lie from exact's (c1 units; see above).

    Each rounding to S moves a value by half an ulp of what it rounds: c1 itself, and with LoRA
    the base product and the delta too (``round_S(base + round_S(d13))``, SPEC LoRA), whose
    magnitudes can exceed |c1| where they cancel; the delta's fp32 rank-space products add at
    most (K + r) u32 (|x| |A|^T) |B|^T (the deterministic bound of two fp32 dot products).
    ``sigma_acc1``: the worst-case std of GEMM1's fp32 accumulation per c1 element. ``extra``:
    roundings to S an accurate kernel may add (the z-scores' typical kernel: 0).
    """
    S = storage_dtype(inputs.hidden_states.dtype)
    uS = unit_roundoff(S)
    c1 = exact["c1"].to(F64)
    half_ulp = lambda v: 0.5 * ulp(v.abs() * (1.0 + 2.0 * uS), S)  # noqa: E731 (the kernel's value may sit a binade up)
    if inputs.lora is None:
        base, stores, lora_fp32 = c1.abs(), (1 + extra) * half_ulp(c1), torch.zeros_like(c1)
        stores_var = (1 + extra) * half_ulp(c1) ** 2 / 3.0
    else:
        from reference import pipeline as ref  # the harness may import reference

        valid, local = exact["route_valid"].to(torch.bool), exact["route_expert"].long()
        x_unq = _lora_input(inputs, c1.device)  # with rwin x * w: exact's in float64, the kernel's stored in S
        rwin = _stores_weighted_input(inputs)
        zero = torch.zeros_like(c1)
        d13 = _lora_w13_delta(inputs, exact)
        absolute = (lambda w: tuple(a.abs() for a in w) if isinstance(w, (tuple, list)) else w.abs())
        abs_lora = replace(inputs.lora, w13_a=absolute(inputs.lora.w13_a), w13_b=absolute(inputs.lora.w13_b))
        mag = ref.lora_w13(zero, x_unq.abs(), abs_lora, valid, local, inputs.activation, lambda v: v)
        rank = inputs.lora.w13_slices[0][0].shape[2]
        base = (c1 - d13).abs()
        largest = torch.maximum(torch.maximum(base, d13.abs()), c1.abs())
        stores = half_ulp(c1) + half_ulp(base) + half_ulp(d13) + extra * half_ulp(largest)
        stores_var = (half_ulp(c1) ** 2 + half_ulp(base) ** 2 + half_ulp(d13) ** 2 + extra * half_ulp(largest) ** 2) / 3.0
        lora_fp32 = (x_unq.shape[1] + rank) * U32 * mag
        if rwin:
            # the kernel's x * w is within 2 u_S of exact's (the weight rounded to S, the product): a sum
            # of independent roundings through |A| |B|, symmetric, at most 2 u_S mag (random, not fixed)
            stores = stores + 2.0 * uS * mag
            stores_var = stores_var + (2.0 * uS * mag) ** 2 / 3.0
    fixed = lora_fp32 + _EPILOGUE_OPS_C1 * U32 * base
    return C1Box(stores + Z_BUDGET * sigma_acc1 + fixed, (stores_var + sigma_acc1 ** 2).sqrt(), fixed)


def _pre_quantized(inputs: MoEInputs) -> bool:
    """The hidden states come as fp8 or int8 codes (with a1q_scale): no quantizer of ours runs on them,
    and with the router weight on the input no x * w is stored in S before GEMM1."""
    return inputs.hidden_states.dtype in (FP8_DTYPE, torch.int8)


def _stores_weighted_input(inputs: MoEInputs) -> bool:
    """The router weight is applied on the input and the kernel stores x * w in S (SPEC step 3) before
    quantizing it: not for pre-quantized hidden states."""
    return inputs.apply_router_weight_on_input and not _pre_quantized(inputs)


def input_tie_c1_box(inputs: MoEInputs, w1: torch.Tensor, route_expert: torch.Tensor, valid: torch.Tensor,
                     x: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """([M, T, N] c1 units, how many input codes): GEMM1's input codes an accurate kernel may round
    the other way than exact's, read through |w1| (dequantized, [E, N, K]). ``x``: the values the
    kernel quantizes, [M, K] (default the hidden states; router_weighted_input_c1_box: x * w in S).

    Where x / s lies within the quantizer's fp32 fuzz (_QUANTIZER_OPS u32 |x / s|) of a midpoint
    between two codes, an exact tie included, another accurate quantizer (x * (1 / s), a tie taken
    half away from zero instead of to even, the scale in another fp32 order) may take the
    neighbouring code: one step of x. Random data has no such element (a zero box); data built
    on ties has many (the ``quant_ties`` data kind), and without this box a kernel that breaks its
    ties otherwise would read as inaccurate.
    """
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    a1 = inputs.quant.a1_scale if scheme.act_granularity == "tensor_static" else None
    x = inputs.hidden_states if x is None else x
    dx, n = _tie_jumps(x.to(F64).to(w1.device), scheme, None, _QUANTIZER_OPS, a1)
    M, K = dx.shape
    box = _per_expert_matmul(dx[:, None, :].expand(M, valid.shape[1], K), w1.abs(), route_expert, valid)
    return box, n


def router_weighted_input_c1_box(inputs: MoEInputs, w1: torch.Tensor, route_expert: torch.Tensor,
                                 valid: torch.Tensor) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """([M, T, N] c1 units, how many input codes at ties, the SPEC way's signed move [M, T, N]): with the router
    weight on the input, how far an accurate kernel's dequantized GEMM1 input can move its c1 from
    exact's (whose x * w is float64).

    The kernel stores x * w in S before quantizing it (SPEC step 3), and its codes and dynamic scale
    follow from that S value. Which S value is a small set: the weight as given (fp32) or rounded to S
    first (vLLM's ``topk_weights.to(S)``), the product rounded once to S or through fp32 first. For each,
    the dequantized input differs from exact's by a known vector D (the codes the rounding moved, the
    scale its amax moved); its c1 moves by D . w1 exactly, and the box takes the largest |D . w1| over
    them, plus the ties of each (input_tie_c1_box's rule, on the S values: another accurate quantizer
    may take the other code there). The SPEC's own way's D . w1 (the weight as fp32, the product via
    fp32), signed and without ties, is returned apart: the budget's z-scores take it as a typical
    kernel's mean c1 move (requant_flip_variance_typical), not the largest."""
    from reference.quant import dequantize_activation, quantize_activation_codes  # the harness may import reference
    from moe_validate.contract.profile import WeightPrecision

    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    dev = w1.device
    x = inputs.hidden_states.to(F64).to(dev)
    a1 = inputs.quant.a1_scale if scheme.act_granularity == "tensor_static" else None
    top1 = inputs.topk_weights[:, :1]

    def dequantized(v):
        q, sc = quantize_activation_codes(v, scheme, static_scale=a1)
        return dequantize_activation(q, sc).to(dev)

    exact = dequantized(x * top1.to(F64).to(dev))
    M, K = x.shape
    T = valid.shape[1]
    box = torch.zeros(M, T, w1.shape[1], dtype=F64, device=dev)
    ties, spec = 0, box
    for precision in (WeightPrecision.FP32, WeightPrecision.STORAGE):
        for via_fp32 in (False, True):  # the product rounded to S once, or through fp32 first
            x_S = _router_weighted_stored(inputs, precision, via_fp32).to(dev)
            D = (dequantized(x_S) - exact)[:, None, :].expand(M, T, K)
            tie, n = input_tie_c1_box(inputs, w1, route_expert, valid, x=x_S)
            signed = _per_expert_matmul(D, w1, route_expert, valid)
            box, ties = torch.maximum(box, signed.abs() + tie), max(ties, n)
            if precision is WeightPrecision.FP32 and via_fp32:
                spec = signed
    return box, ties, spec


def _router_weighted_stored(inputs: MoEInputs, precision, via_fp32: bool) -> torch.Tensor:
    """[M, K] float64: x * w as a kernel stores it in S with the router weight on the input: the
    weight at ``precision`` (a WeightPrecision), the product rounded to S once or through fp32 first.
    The SPEC's way: WeightPrecision.FP32, via fp32."""
    from reference.pipeline import router_weight  # the harness may import reference

    S = storage_dtype(inputs.hidden_states.dtype)
    x = inputs.hidden_states.to(F64)
    w = router_weight(inputs.topk_weights[:, :1], S, precision).to(x.device)
    stored = (x.to(torch.float32) * w.to(torch.float32)).to(S) if via_fp32 else (x * w).to(S)
    return stored.to(F64)


def _tie_jumps(x: torch.Tensor, scheme: QuantScheme, quantizer, fuzz_u32: float, static_scale
               ) -> Tuple[torch.Tensor, int]:
    """([R, C] dequantized jump, how many): one code step (toward the nearer midpoint's far side)
    where x / s of ``quantizer``'s codes (None: SPEC's) lies within ``fuzz_u32`` u32 |x / s| of a
    midpoint, 0 elsewhere (and at a NaN, which has no code to flip)."""
    from reference.quant import expand_act_scale, quantize_activation_codes  # the harness may import reference

    dev = x.device
    R, C = x.shape
    kwargs = {} if quantizer is None else {"quantizer": quantizer}
    q, s = quantize_activation_codes(x, scheme, static_scale=static_scale, **kwargs)
    scale = expand_act_scale(s, R, C).to(dev)
    v = x / scale
    grid = _code_grid(scheme.act_dtype, dev)
    idx, d_up, d_down = _midpoint_distances(grid, q.to(F64).to(dev), v)
    last = grid.numel() - 1
    fuzz = fuzz_u32 * U32 * v.abs()
    step_up = grid[(idx + 1).clamp(max=last)] - grid[idx]
    step_down = grid[idx] - grid[(idx - 1).clamp(min=0)]
    zero = torch.zeros_like(v)
    jump = torch.maximum(torch.where(d_up.abs() <= fuzz, step_up, zero), torch.where(d_down.abs() <= fuzz, step_down, zero))
    return torch.where(jump > 0, jump * scale, zero), int((jump > 0).sum())


# --- quantizers that divide with Triton's fp32 `/` (Division.TRITON), on a GPU ----------------
# Compiled for an NVIDIA GPU, Triton's fp32 `/` is an approximation (docs/TRITON_FACTS.md): on an
# H200 28% of 127 / absmax and 4.7% of absmax / 127 came out one ulp off the correctly rounded
# quotient, 0.06% two (scripts/gpu_vllm_int8_probe.py; PTX's div.full.f32 is specified to 2 ulp).
# The mirror divides correctly, so where the kernel's x / s lies within the division's reach of a
# midpoint between two codes it may take the other code. Such near ties are common, not rare: the
# fp32 product x * (QMAX / absmax) of a bf16 x lands exactly on a half code for 0.15-0.2% of codes
# of normal data and 4.7% of uniform data (bf16 has 8 significant bits, so x / absmax is a ratio of
# small integers). Each near tie is a flip event of one code with probability TRITON_DIVISION_P (the
# share of quotients off at all; an exact tie flips in one direction of the error only, so this is
# about 2x the measured code flip rate: 4e-4 of normal codes flipped, 2.5e-3 were near ties). On
# GEMM1's input a flipped code moves c1 by one step times |w1| along the whole row; the scale, off
# by up to TRITON_DIVISION_ULPS, moves the dequantized GEMM output by up to 4 u32 |c| with the same
# probability. The interpreter divides correctly: nothing of this applies off a GPU.
# Measured per quantizer with this near-tie rule (scripts/gpu_vllm_division_ties.py, H200, session
# 15; 8 bf16 data sets of 1-8M codes each): no code differed outside a near tie; of the near ties
# vLLM's int8 per-token quantizer flipped 0.012-0.155 and its fp8 1x128 one 0-0.006, and at the test
# data's exact ties (inputs.quant_tie_rows) neither flipped any. One p serves both: >= 1.9x every
# measured share.
TRITON_DIVISION_ULPS = 2
TRITON_DIVISION_P = 0.3
# u32 |x / s| around a midpoint: the quotient's 2 ulp (<= 4 u32), the product's rounding on each
# side (2 u32) and the float64 x / s against the mirror's own fp32 one (2 u32)
_TRITON_DIVISION_FUZZ = 8.0


@dataclass
class DivisionTies:
    """Where a Division.TRITON quantizer on a GPU may take another code than the mirror (see above)."""

    c1: torch.Tensor  # [M, T, N]: sum over GEMM1's near-tie input codes of one step x |w1| (c1 units)
    c2_in: torch.Tensor  # [M, T, I]: one requantization step at a near-tie code of c2 (dequantized), else 0
    tokens: torch.Tensor  # [M]: GEMM1 input codes near a tie, per token
    n_input: int  # GEMM1 input codes near a tie
    n_requant: int  # requantization codes near a tie
    input_scale: bool  # GEMM1's input scale is divided the Triton way (its dequantization may shift)
    requant_scale: bool  # the requantization scale is

    def c1_shift(self, c1: torch.Tensor) -> torch.Tensor:
        """|shift| of c1 when GEMM1's input scale is TRITON_DIVISION_ULPS off (0 if it is not divided so)."""
        return _scale_shift(c1, self.input_scale)

    def c3_shift(self, c3: torch.Tensor) -> torch.Tensor:
        """The same for c3 and the requantization scale."""
        return _scale_shift(c3, self.requant_scale)

    def lines(self) -> List[str]:
        return [f"Triton fp32 division in the quantizer (approximate on a GPU, measured on an H200): codes whose "
                f"x / s lies within {_TRITON_DIVISION_FUZZ:g} u32 |x / s| of a midpoint may take the other code "
                f"with p = {TRITON_DIVISION_P}: {self.n_input} GEMM1 input code(s) (one step x |w1| into c1) and "
                f"{self.n_requant} requantization code(s) (one step into c2_in); a scale {TRITON_DIVISION_ULPS} ulp "
                f"off moves the dequantized c1 / c3 by 4 u32 |c| with the same p"]


def _scale_shift(c: torch.Tensor, divided: bool) -> torch.Tensor:
    """|shift| of a dequantized GEMM output whose activation scale is TRITON_DIVISION_ULPS off (4 u32 |c|)."""
    return 2.0 * TRITON_DIVISION_ULPS * U32 * c.abs() if divided else torch.zeros_like(c)


def division_ties(inputs: MoEInputs, stages: Dict[str, torch.Tensor], profile: NumericsProfile, native_gpu: bool
                  ) -> Optional[DivisionTies]:
    """The near-tie codes of ``profile``'s Triton-division quantizers on a GPU (None where none applies)."""
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    gran = scheme.act_granularity
    if not native_gpu or gran is None:
        return None
    dtype_name = "int8" if scheme.act_dtype == torch.int8 else "fp8"
    clamp_limit = inputs.quant.gemm1_clamp_limit
    fused = fused_silu_fp8_group(inputs.activation, scheme, clamp_limit, inputs.lora is not None)
    q_in, q_re = profile.quantizer(dtype_name, gran), profile.quantizer(dtype_name, gran, fused)
    pre_quantized = _pre_quantized(inputs)
    input_triton = q_in.division is Division.TRITON and not pre_quantized
    requant_triton = q_re.division is Division.TRITON
    if not (input_triton or requant_triton):
        return None
    valid = stages["route_valid"].to(torch.bool)
    rexp = stages["route_expert"].long()
    c1, c2 = stages["c1"].to(F64), stages["c2"].to(F64)
    M, T, I = c2.shape
    tie1, n1 = torch.zeros_like(c1), 0
    per_token = torch.zeros(M, dtype=F64, device=c1.device)
    if input_triton:
        from reference.pipeline import prepare_input  # the harness may import reference

        from moe_validate.contract.checks import validate_call

        # what the mirror quantizes: the hidden states, or round_S(x * w) with the router weight on input
        _, x = prepare_input(inputs.hidden_states, inputs.topk_weights,
                             validate_call(*inputs.args(), **inputs.kwargs()),
                             apply_router_weight_on_input=inputs.apply_router_weight_on_input, a1q_scale=None,
                             precision="mirror", profile=profile)
        a1 = inputs.quant.a1_scale if gran == "tensor_static" else None
        dx, n1 = _tie_jumps(x.to(c1.device), scheme, q_in, _TRITON_DIVISION_FUZZ, a1)
        per_token = (dx > 0).sum(1).to(F64)
        tie1 = _per_expert_matmul(dx[:, None, :].expand(M, T, dx.shape[1]), stages["w1"].to(F64).abs(), rexp, valid)
    tie2, n2 = torch.zeros_like(c2), 0
    rows = torch.nonzero(valid.reshape(-1), as_tuple=False).reshape(-1)
    if requant_triton and rows.numel():
        a2 = inputs.quant.a2_scale if gran == "tensor_static" else None
        dx, n2 = _tie_jumps(c2.reshape(M * T, I)[rows], scheme, q_re, _TRITON_DIVISION_FUZZ, a2)
        tie2.view(M * T, I)[rows] = dx
    return DivisionTies(tie1, tie2, per_token, n1, n2, input_triton and gran != "tensor_static",
                        requant_triton and gran != "tensor_static")


def _midpoint_distances(grid: torch.Tensor, codes: torch.Tensor, v: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index of each code in ``grid``, distance from ``v`` up to the midpoint above its code, down
    to the one below), in code units; inf past the format's largest and smallest codes."""
    mids = 0.5 * (grid[1:] + grid[:-1])
    last = grid.numel() - 1
    idx = torch.searchsorted(grid, codes.contiguous()).clamp(0, last)
    d_up = torch.where(idx < last, mids[idx.clamp(max=last - 1)], torch.full_like(v, math.inf)) - v
    d_down = v - torch.where(idx > 0, mids[(idx - 1).clamp(min=0)], torch.full_like(v, -math.inf))
    return idx, d_up, d_down


def _code_grid(code_dtype: torch.dtype, device) -> torch.Tensor:
    """Every finite code value of the activation format, ascending (float64): the reference's own."""
    from reference.quant import code_values  # the harness may import reference

    return code_values(code_dtype, device)


def _group_max(t: torch.Tensor, valid: torch.Tensor, gran: str) -> torch.Tensor:
    """t [M, T, I] reduced by max over each quantization group of the scheme, broadcast back."""
    if gran == "token":
        return t.amax(-1, keepdim=True).expand_as(t)
    if gran == "token_group":
        out = torch.empty_like(t)
        width = _scale_group_width(gran, t.shape[-1])
        for g0 in range(0, t.shape[-1], width):
            grp = slice(g0, g0 + width)
            out[..., grp] = t[..., grp].amax(-1, keepdim=True)
        return out
    top = t[valid].max() if valid.any() else torch.zeros((), dtype=F64, device=t.device)
    return top.expand_as(t)


def _c2_error_bound(inputs: MoEInputs, c1e: torch.Tensor, c2e: torch.Tensor, c1_box: C1Box,
                    S: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([M, T, I] bound, its random part's std, its fixed part): |kernel's c2 - exact's c2| for an
    accurate kernel (see above), c2 units. The c1 box reaches c2 through the activation, evaluated at
    its corners (dev); its random and fixed shares reach it in proportion (the larger of the gate's
    and the up row's share: sqrt(sum (f' sigma)^2) <= max(sigma / box) sum |f'| box). The curvature
    margin and the fp32 activation are fixed; c2's own roundings random."""
    b_c1 = c1_box.box
    from reference.activations import apply_activation  # the harness may import reference

    act = inputs.activation
    clamp_limit = inputs.quant.gemm1_clamp_limit if inputs.quant is not None else None
    gate = _gate_rows(c1e.shape[-1], act, c1e.device)
    up = 1.0 - gate
    corners = [(sg, su) for sg in (-1.0, 1.0) for su in ((-1.0, 1.0) if act.is_gated else (0.0,))]
    dev = torch.zeros_like(c2e)
    for sg, su in corners:
        moved = apply_activation(c1e + b_c1 * (sg * gate + su * up), act, clamp_limit)
        dev = torch.maximum(dev, (moved - c2e).abs())
    g, u = _gate_up(c1e.abs(), act)
    bg, bu = _gate_up(b_c1, act)
    if u is None:
        curvature = 0.5 * _ACT_CURVATURE * bg ** 2
        act_scale = c2e.abs() + g
    else:
        curvature = 0.5 * _ACT_CURVATURE * bg ** 2 * (u + bu + 1.0)  # swigluoai multiplies by (u + 1)
        act_scale = c2e.abs() + g * u
    uS = unit_roundoff(S)
    n2 = 1 + REQUANT_EXTRA_ROUNDINGS
    half = 0.5 * ulp(c2e.abs() * (1.0 + 2.0 * uS), S)  # the kernel's value may sit one binade up
    box = b_c1.clamp_min(1e-300)
    share_random = _gate_up(c1_box.sigma / box, act)
    share_fixed = _gate_up(c1_box.fixed / box, act)
    pick = (lambda pair: pair[0] if pair[1] is None else torch.maximum(pair[0], pair[1]))  # noqa: E731
    fixed = dev * pick(share_fixed) + curvature + ACT_FP32_ULPS * U32 * act_scale
    sigma = ((dev * pick(share_random)) ** 2 + n2 * half ** 2 / 3.0).sqrt()
    return dev + curvature + ACT_FP32_ULPS * U32 * act_scale + n2 * half, sigma, fixed


def _exact_requant_codes(inputs: MoEInputs, exact: Dict[str, torch.Tensor], scheme: QuantScheme
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) [M, T, I] float64: exact's own requantization of its c2 (zeros and ones at invalid
    routes)."""
    from reference.quant import expand_act_scale, quantize_activation_codes  # the harness may import reference

    c2e = exact["c2"].to(F64)
    M, T, I = c2e.shape
    codes, scale = torch.zeros_like(c2e), torch.ones_like(c2e)
    rows = torch.nonzero(exact["route_valid"].to(torch.bool).reshape(-1), as_tuple=False).reshape(-1)
    if rows.numel():
        a2 = inputs.quant.a2_scale if scheme.act_granularity == "tensor_static" else None
        q, s = quantize_activation_codes(c2e.reshape(M * T, I)[rows], scheme, static_scale=a2)
        codes.view(M * T, I)[rows] = q.to(F64)
        scale.view(M * T, I)[rows] = expand_act_scale(s, rows.numel(), I)
    return codes, scale


def requant_flip_events(inputs: MoEInputs, exact: Dict[str, torch.Tensor], c1_box: C1Box
                        ) -> Dict[str, torch.Tensor]:
    """The requantization flips an accurate kernel may have against ``exact`` (see above).

    Per common-shift cell (leading dimension, REQUANT_SHIFT_CELLS cells of the scale's relative
    error rho in [rho_lo, rho_hi]) and c2_in element [M, T, I]: ``p_up``, ``p_down`` (probability
    bounds), ``jump_up``, ``jump_down`` (the dequantized change, >= 0). Per element: ``b`` (the
    independent error, code units), ``codes`` and ``scale`` (exact's), ``rho_lo``, ``rho_hi``.
    ``c1_box``: how far an accurate kernel's c1 may lie from exact's (requant_c1_box).
    """
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    gran = scheme.act_granularity
    S = storage_dtype(inputs.hidden_states.dtype)
    valid = exact["route_valid"].to(torch.bool)
    c1e, c2e = exact["c1"].to(F64), exact["c2"].to(F64)
    vm = valid[..., None]
    codes, scale = _exact_requant_codes(inputs, exact, scheme)
    b_abs, sigma_abs, fixed_abs = (t * vm for t in _c2_error_bound(inputs, c1e, c2e, c1_box, S))
    mag = c2e.abs() * vm
    if gran == "tensor_static":
        rho_lo = rho_hi = torch.zeros_like(c2e)
        cells = 1
    else:  # the kernel's amax lies in [max(|c2| - b), max(|c2| + b)]; its fp32 scale rounds once more
        amax = _group_max(mag, valid, gran).clamp_min(1e-300)
        rho_hi = torch.clamp(_group_max(mag + b_abs, valid, gran) / amax - 1.0 + 2.0 * U32, max=0.5)
        rho_lo = torch.clamp(_group_max((mag - b_abs).clamp_min(0.0), valid, gran) / amax - 1.0 - 2.0 * U32, min=-0.5)
    v = c2e / scale
    kernel_unit = scale * (1.0 + rho_lo)  # the smallest code unit the kernel's scale may have
    b, sigma, fixed = b_abs / kernel_unit, sigma_abs / kernel_unit, fixed_abs / kernel_unit
    fuzz = _QUANTIZER_OPS * U32 * v.abs()
    grid = _code_grid(scheme.act_dtype, c2e.device)
    mids = 0.5 * (grid[1:] + grid[:-1])
    if gran != "tensor_static":
        # enough cells that within one the shift moves no code by more than REQUANT_SHIFT_PER_CELL of its
        # step: a code the shift carries across a midpoint inside a cell is a flip with p = 1 there
        # (int8's step is absolute: at |rho| 2.5% the shift reaches 3 codes; fp8's is relative, 1/8-1/16)
        idx = torch.searchsorted(grid, codes.contiguous()).clamp(1, grid.numel() - 1)
        step_at = (grid[idx] - grid[idx - 1]).clamp_min(1e-300)
        moves = (v.abs() * (rho_hi - rho_lo) / (1.0 + rho_lo) / step_at)[valid]
        widest = float(moves.max()) if moves.numel() else 0.0
        cells = int(min(REQUANT_SHIFT_CELLS_MAX, max(REQUANT_SHIFT_CELLS, math.ceil(widest / REQUANT_SHIFT_PER_CELL))))
    sig, bs = sigma.clamp_min(1e-300), b.clamp_min(1e-300)

    def tail(x):  # P(e_ind >= x); 1 for x <= 0 (the common shift alone may cross)
        # symmetric unimodal on [-b, b]: (b - x) / 2b; and Gauss's inequality for the random part
        # (std sigma) past the fixed part: P(R >= y) <= (1 - y / (sqrt(3) sigma)) / 2 for y <= 2 sigma / sqrt(3),
        # 2 sigma^2 / (9 y^2) beyond
        y = x - fixed
        gauss = torch.where(y <= 2.0 * sig / math.sqrt(3.0), 0.5 * (1.0 - y / (math.sqrt(3.0) * sig)),
                            2.0 * sig ** 2 / (9.0 * y.clamp_min(1e-300) ** 2))
        gauss = torch.where(y <= 0, torch.ones_like(y), gauss)
        return torch.where(x <= 0, torch.ones_like(x), torch.minimum(torch.clamp((bs - x) / (2.0 * bs), min=0.0), gauss))

    dq = scale * (1.0 + rho_hi.clamp_min(0.0))
    out = {k: [] for k in ("p_up", "p_down", "jump_up", "jump_down", "ref", "r0", "r1")}
    for j in range(cells):
        r0 = rho_lo + (rho_hi - rho_lo) * (j / cells)
        r1 = rho_lo + (rho_hi - rho_lo) * ((j + 1) / cells)
        # v moves to v / (1 + rho): by -v rho / (1 + rho), monotone in rho, so the cell's extremes
        s0, s1 = -v * r0 / (1.0 + r0), -v * r1 / (1.0 + r1)
        # (the quantizer's fuzz widens the shift: a code within it of its midpoint may flip for sure)
        s_hi, s_lo = torch.maximum(s0, s1) + fuzz, torch.minimum(s0, s1) - fuzz
        # the cell's reference codes: those of v shifted to the cell's middle rho (exact's at rho = 0).
        # Flips are counted from them; their own moves off exact's codes go to the group's signed term
        # (_group_shift_term), where the shift's code moves and the dequantized scale's cancel
        rm = 0.5 * (r0 + r1)
        ref = torch.where(rm == 0, codes, grid[torch.searchsorted(mids, (v / (1.0 + rm)).contiguous())])
        _, d_up, d_dn = _midpoint_distances(grid, ref, v)
        top = grid[torch.searchsorted(mids, (v + b + s_hi).contiguous(), right=True)]  # farthest codes reached
        bottom = grid[torch.searchsorted(mids, (v - b + s_lo).contiguous(), right=False)]
        jump_up = (top - ref).clamp_min(0.0) * dq * vm
        jump_dn = (ref - bottom).clamp_min(0.0) * dq * vm
        out["p_up"].append(torch.where(jump_up > 0, tail(d_up - s_hi), torch.zeros_like(v)))
        out["p_down"].append(torch.where(jump_dn > 0, tail(d_dn + s_lo), torch.zeros_like(v)))
        out["jump_up"].append(jump_up)
        out["jump_down"].append(jump_dn)
        out["ref"].append(ref * vm)
        out["r0"].append(r0 * vm)
        out["r1"].append(r1 * vm)
    ev = {k: torch.stack(t) for k, t in out.items()}
    ev.update(b=b * vm, codes=codes, scale=scale, rho_lo=rho_lo * vm, rho_hi=rho_hi * vm)
    return ev


class TypicalFlips(NamedTuple):
    """requant_flip_variance_typical's answer: ``var_codes`` [M, T, I] (dequantized units^2, for GEMM2
    to carry), ``var_scale`` [M, K] (the dynamic scale's share at the output), ``p_up``, ``p_down``
    [M, T, I] (each code's flip probability, for the record and its tests)."""

    var_codes: torch.Tensor
    var_scale: torch.Tensor
    p_up: torch.Tensor
    p_down: torch.Tensor


def requant_flip_variance_typical(inputs: MoEInputs, exact: Dict[str, torch.Tensor], sigma_c1: torch.Tensor,
                                  w1: torch.Tensor, w2: torch.Tensor, route_expert: torch.Tensor,
                                  valid: torch.Tensor, wts: torch.Tensor, c1_mean: Optional[torch.Tensor] = None,
                                  c2_rounds: bool = True,
                                  exact_codes: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> TypicalFlips:
    """For the budget's z-scores: the mean square a *typical* accurate kernel's requantization adds
    to its output error against exact (TypicalFlips).

    The bound counts flips from a worst-case box (requant_flip_events: Z sigma, extra roundings, the
    largest scale shift, every tie); its probabilities are bounds, 10-25x the flips correct kernels
    show (z RMS 0.16-0.3 on smoke, session 14), which left calibration nothing to check. Here the
    kernel's c2 error is Gaussian instead: c1's at ``sigma_c1`` (the typical accumulation), the
    SPEC's roundings only and the fp32 epilogue as uniform, carried through the activation by
    central differences (the gate's and the up row's apart), with ``c1_mean`` (the SPEC's x * w move
    with the router weight on the input) as its mean, and GEMM1's input codes exact's (at a tie too:
    the SPEC's quantizer breaks it as exact does); then c2's own rounding to S unless ``c2_rounds``
    is False (the fused silu + fp8_block128 path). A dynamic scale takes the error at its group's
    largest element: rho = e_max / amax, which moves every code by -v rho (one Gaussian per code
    with its own error) and scales the group's dequantized sum by rho (the second output). A code
    flips up with P(e > d_up) to the next code, down likewise: E[jump^2] = p_up jump_up^2 +
    p_down jump_down^2. ``exact_codes``: exact's (codes, scale) where the caller has them
    (requant_flip_events' ``codes`` and ``scale``); computed otherwise.
    """
    from reference.activations import apply_activation  # the harness may import reference

    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    gran = scheme.act_granularity
    S = storage_dtype(inputs.hidden_states.dtype)
    act = inputs.activation
    c1e, c2e = exact["c1"].to(F64), exact["c2"].to(F64)
    M, T, I = c2e.shape
    vm = valid[..., None]
    box = requant_c1_box(inputs, exact, sigma_c1, extra=0)
    var_c1 = box.sigma ** 2 + box.fixed ** 2 / 3.0
    clamp_limit = inputs.quant.gemm1_clamp_limit if inputs.quant is not None else None
    mean_c2 = torch.zeros_like(c2e)
    if c1_mean is not None:
        mean_c2 = (apply_activation(c1e + c1_mean, act, clamp_limit) - c2e) * vm
    # c1's spread through the activation: central differences one std wide along the gate and the up
    # rows apart (independent; a clamp's flat part moves nothing)
    sd_c1 = var_c1.sqrt()
    gate = _gate_rows(c1e.shape[-1], act, c1e.device)
    var_c2 = torch.zeros_like(c2e)
    for row in ((gate, 1.0 - gate) if act.is_gated else (gate,)):
        step = sd_c1 * row
        var_c2 = var_c2 + (0.5 * (apply_activation(c1e + step, act, clamp_limit)
                                  - apply_activation(c1e - step, act, clamp_limit))) ** 2
    g, u = _gate_up(c1e.abs(), act)
    act_scale = c2e.abs() + (g if u is None else g * u)
    var_c2 = var_c2 * vm + (ACT_FP32_ULPS * U32 * act_scale) ** 2 / 3.0
    if c2_rounds:
        var_c2 = var_c2 + ulp(c2e, S) ** 2 / 12.0
    codes, scale = exact_codes if exact_codes is not None else _exact_requant_codes(inputs, exact, scheme)
    zero = torch.zeros_like(c2e)
    rho_mean, rho_var = zero, zero
    if gran != "tensor_static":  # the kernel's amax is its largest element's |c2 + e|
        mag = c2e.abs() * vm
        amax = _group_max(mag, valid, gran).clamp_min(1e-300)
        at_max = (mag == amax) & vm & (mag > 0)

        def at_group_max(t):  # t at the group's largest element (0 for a group of zeros)
            picked = _group_max(torch.where(at_max, t, torch.full_like(t, -math.inf)), valid, gran)
            return torch.where(torch.isfinite(picked), picked, zero) * vm

        rho_mean = at_group_max(torch.sign(c2e) * mean_c2 / amax)
        rho_var = at_group_max(var_c2 / amax ** 2)
    v = c2e / scale
    mean = mean_c2 / scale - v * rho_mean
    sd = (var_c2 / scale ** 2 + v ** 2 * rho_var).sqrt().clamp_min(1e-300)
    grid = _code_grid(scheme.act_dtype, c2e.device)
    last = grid.numel() - 1
    idx, d_up, d_dn = _midpoint_distances(grid, codes, v)
    r2 = math.sqrt(2.0)
    p_up = torch.nan_to_num(0.5 * torch.erfc((d_up - mean) / (r2 * sd))) * vm
    p_dn = torch.nan_to_num(0.5 * torch.erfc((d_dn + mean) / (r2 * sd))) * vm
    jump_up = (grid[(idx + 1).clamp(max=last)] - grid[idx]) * scale
    jump_dn = (grid[idx] - grid[(idx - 1).clamp(min=0)]) * scale
    var_codes = torch.nan_to_num((p_up * jump_up ** 2 + p_dn * jump_dn ** 2) * vm)
    # the scale's share: rho times each group's dequantized sum through w2 (one rho per group)
    var_scale = torch.zeros(M, w2.shape[1], dtype=F64, device=c2e.device)
    if gran != "tensor_static":
        dq = codes * scale * vm
        width = _scale_group_width(gran, I)
        for g0 in range(0, I, width):
            grp = slice(g0, g0 + width)
            part = _per_expert_matmul(dq[..., grp], w2[..., grp], route_expert, valid)  # [M, T, K]
            e_rho2 = rho_mean[..., g0:g0 + 1] ** 2 + rho_var[..., g0:g0 + 1]
            var_scale = var_scale + (e_rho2 * part ** 2 * wts[..., None] ** 2).sum(1)
    return TypicalFlips(var_codes, var_scale, p_up, p_dn)


def codes_outside_flip_model(ev: Dict[str, torch.Tensor], kernel_codes: torch.Tensor, valid: torch.Tensor
                             ) -> torch.Tensor:
    """[valid codes] bool: where an implementation's requantization codes (``kernel_codes`` of the
    valid rows, read at exact's scale) lie where no rho cell of ``requant_flip_events``' model ``ev``
    reaches: neither the cell's reference code nor a flip from it that the cell allows (its direction
    with p > 0 and a jump at least as large). For tests and probes: it must be empty."""
    scale = ev["scale"][valid]
    ref = ev["ref"][:, valid]
    dq = (kernel_codes.to(F64)[None] - ref) * scale[None]
    slack = 1.0 + 1e-12
    reached = ((dq == 0)
               | ((dq > 0) & (ev["p_up"][:, valid] > 0) & (dq <= ev["jump_up"][:, valid] * slack))
               | ((dq < 0) & (ev["p_down"][:, valid] > 0) & (-dq <= ev["jump_down"][:, valid] * slack)))
    return ~reached.any(0)


def _directed_flips(ev: Dict[str, torch.Tensor], w2_routes: torch.Tensor, w: torch.Tensor, ms: slice,
                    raising: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p, a) [C, tokens, T, cols, I]: each code's flip probability and its move of the output
    column in one direction. Out rises where an up flip meets w w2 > 0 or a down flip meets
    w w2 < 0, falls otherwise: per (i, column) only one of the code's two flips moves it that way."""
    gain = w2_routes * w[:, :, None, None]  # [tokens, T, cols, I]: the output's change per unit of c2_in
    pos = gain > 0
    up_key, down_key = ("up", "down") if raising else ("down", "up")
    p = torch.where(pos[None], ev["p_" + up_key][:, ms, :, None, :], ev["p_" + down_key][:, ms, :, None, :])
    jump = torch.where(pos[None], ev["jump_" + up_key][:, ms, :, None, :], ev["jump_" + down_key][:, ms, :, None, :])
    # a jump that cannot happen must not reach exp (0 * inf)
    a = jump * gain.abs()[None] * (p > 0)
    return p, a


def _group_shift_term(ev: Dict[str, torch.Tensor], w2_routes: torch.Tensor, w: torch.Tensor, ms: slice, by_group,
                      group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(largest, smallest) [C, tokens, T, cols, G]: per rho cell and scale group, the signed move of the
    output column that the cell's reference codes make against exact's, read with the kernel's scale
    s (1 + rho) for rho at either end of the cell: w sum_(i in group) w2[k, i] s ((1 + rho) ref_i - code_i)
    (linear in rho). A dynamic scale's common shift moves codes by about -v rho and the dequantization
    back by +v rho: summed here, they cancel to the residuals' difference (at most a step per code);
    bounded apart, as a flip of each code and a scale term, they added (up to 4 int8 codes per element
    at |rho| 2.5%). Zero for a static scale (its reference codes are exact's, rho = 0)."""
    gain = (w2_routes * w[:, :, None, None])[None]  # [1, tokens, T, cols, I]
    scale = ev["scale"][ms][None, :, :, None, :]
    ref = by_group(gain * (ev["ref"][:, ms, :, None, :] * scale))  # [C, tokens, T, cols, G]
    exact = by_group(gain * (ev["codes"][ms][None, :, :, None, :] * scale))
    r0 = ev["r0"][:, ms, :, None, ::group]  # one rho per group (constant over its columns)
    r1 = ev["r1"][:, ms, :, None, ::group]
    at0, at1 = (1.0 + r0) * ref - exact, (1.0 + r1) * ref - exact
    return torch.maximum(at0, at1), torch.minimum(at0, at1)


def _flip_sum_quantile(ev: Dict[str, torch.Tensor], w2: torch.Tensor, route_expert, valid, wts, group: int,
                       alpha: float = FLIP_ALPHA) -> Tuple[torch.Tensor, torch.Tensor]:
    """([M, K] flip term, [M, K] its all-flip cap): per output element max(x*+, x*-) (above).

    ``group``: the width of the columns that share one scale (one common shift rho). For every
    theta, each (route, group) contributes its log-MGF maximized over the rho cells: a bound that
    holds whatever rho each group has (P(X >= x | rho) <= exp(psi_rho(t) - t x) <= exp(psi(t) - t x)).
    x*(t) = (psi(t) + ln(1/alpha)) / t is a valid bound at every t and unimodal in t (psi convex,
    psi(0) = 0), so a golden-section search per element finds its minimum with a few evaluations.
    Output elements are independent: the work runs in blocks of tokens x columns, each block's
    search on its own tensors.
    """
    C, M, T, I = ev["p_up"].shape
    E, K = w2.shape[0], w2.shape[1]
    dev = ev["p_up"].device
    L = math.log(1.0 / alpha)
    G = -(-I // group)
    budget = _FLIP_BLOCK_ELEMENTS_CUDA if dev.type == "cuda" else _FLIP_BLOCK_ELEMENTS
    cols = max(1, min(K, budget // max(1, C * T * I)))
    tokens = max(1, min(M, budget // max(1, C * T * cols * I)))
    experts = route_expert.clamp(0, max(E - 1, 0))  # invalid routes carry weight 0 below
    w_all = wts.to(F64) * valid

    def by_group(t):  # [..., I] -> [..., G]: sum over each group's columns
        pad = G * group - I
        if pad:
            t = torch.nn.functional.pad(t, (0, pad))
        return t.reshape(*t.shape[:-1], G, group).sum(-1)

    bound = torch.zeros(M, K, dtype=F64, device=dev)
    cap = torch.zeros(M, K, dtype=F64, device=dev)
    for m0 in range(0, M, tokens):
        ms = slice(m0, min(M, m0 + tokens))
        if not bool(valid[ms].any()):
            continue
        for k0 in range(0, K, cols):
            ks = slice(k0, min(K, k0 + cols))
            w2_routes = w2[:, ks][experts[ms]].to(F64)  # [tokens, T, cols, I]
            h_hi, h_lo = _group_shift_term(ev, w2_routes, w_all[ms], ms, by_group, group)
            for raising in (True, False):
                p, a = _directed_flips(ev, w2_routes, w_all[ms], ms, raising)
                h = h_hi if raising else -h_lo  # [C, tokens, T, cols, G]: the signed move in this direction
                J = a.amax(-1).amax(2).amax(0)  # [tokens, cols]: the largest single move
                c = (by_group(a) + h).amax(0).sum(-1).sum(1)
                Js = J.clamp_min(1e-300)

                def x_at(u):  # the Chernoff bound at theta = e^u / J, per element
                    theta = u.exp() / Js
                    lg = torch.log1p(p * torch.expm1(theta[None, :, None, :, None] * a))
                    return ((by_group(lg) + theta[None, :, None, :, None] * h).amax(0).sum(-1).sum(1) + L) / theta

                x_star = _golden_section_min(x_at, J.shape, dev)
                b = torch.where(J > 0, torch.minimum(x_star, c), c)
                bound[ms, ks] = torch.maximum(bound[ms, ks], b)
                cap[ms, ks] = torch.maximum(cap[ms, ks], c)
    return bound, cap


def _golden_section_min(f, shape, dev) -> torch.Tensor:
    """The smallest of f's values seen by an elementwise golden-section search for the minimum of a
    unimodal f over u in _FLIP_U_RANGE (f is evaluated at both ends too)."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    lo = torch.full(shape, _FLIP_U_RANGE[0], dtype=F64, device=dev)
    hi = torch.full(shape, _FLIP_U_RANGE[1], dtype=F64, device=dev)
    x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    f1, f2 = f(x1), f(x2)
    best = torch.minimum(torch.minimum(f(lo), f(hi)), torch.minimum(f1, f2))
    for _ in range(_FLIP_GOLDEN_STEPS):
        left = f1 <= f2  # the minimum lies in [lo, x2]
        hi, lo = torch.where(left, x2, hi), torch.where(left, lo, x1)
        xn = torch.where(left, hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo))
        fn = f(xn)
        best = torch.minimum(best, fn)
        x1, x2 = torch.where(left, xn, x2), torch.where(left, x1, xn)
        f1, f2 = torch.where(left, fn, f2), torch.where(left, f1, fn)
    return best


# =================================================================================================
# The derivation
# =================================================================================================
def derive(case, inputs: MoEInputs, stages: Dict[str, torch.Tensor], native_gpu: bool,
           exact: Optional[Dict[str, torch.Tensor]] = None,
           budget_detail: Optional[Dict[str, torch.Tensor]] = None,
           profile: NumericsProfile = SPEC_PROFILE,
           fp8_accumulation: Optional[Fp8Accumulation] = None) -> Dict[str, Bound]:
    """{"gate": Bound, "budget": Bound} for ``case`` from the MIRROR stages of its inputs.

    ``exact``: the reference's ``exact`` stages of the same inputs, where the caller has them (the
    budget's requantization flips are counted from exact's codes); computed here otherwise.
    ``budget_detail``: a dict to fill with the budget's requantization flip events
    (``requant_flip_events``' keys, ``b_c1``, ``flip_term`` and ``flip_cap``), for tests and probes.

    ``native_gpu``: the kernel ran compiled on a GPU (not the interpreter); only then is the
    Hopper fp8-MMA accumulation unit used. The CPU interpreter needs no widening: its fp8 casts
    are exact (kernels/_interp.to_fp8_e4m3), so it gets the same gate as an exact GPU.
    ``profile``: the numerics profile the mirror ``stages`` followed; the gate counts its
    roundings. The budget is meant from SPEC's mirror stages (accuracy does not depend on a
    profile): ``compare.evaluate`` derives it from those.
    ``fp8_accumulation``: how the run's fp8 dots accumulated, as its backend reported (``fp8_mma``).
    """
    act = inputs.activation
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    S = storage_dtype(inputs.hidden_states.dtype)
    uS = unit_roundoff(S)
    M, K = stages["out"].shape
    dev = stages["out"].device
    valid = stages["route_valid"].to(torch.bool)
    rexp = stages["route_expert"].long()
    x, w1, w2 = stages["x"].to(F64), stages["w1"].to(F64), stages["w2"].to(F64)
    c1, c2, c2_in, c3 = (stages[k].to(F64) for k in ("c1", "c2", "c2_in", "c3"))
    out = stages["out"].to(F64)
    T = valid.shape[1] if valid.dim() == 2 else 1
    N, I = c1.shape[-1], c2.shape[-1]
    vmask = valid[..., None].to(F64)
    wts = inputs.topk_weights.to(F64).to(dev).abs()
    if inputs.apply_router_weight_on_input:
        wts = torch.ones_like(wts)  # GEMM2 does not multiply by the router weight
    has_lora = inputs.lora is not None
    # roundings per stored element: c1 = round(round(acc + b) + round(d13)) with LoRA, else one
    n_round_c1 = 3 if has_lora else 1
    n_round_c3 = 3 if has_lora else 1
    # what each store rounds, per stage: with LoRA the base, the delta and their sum (lora_store_parts)
    parts = lora_store_parts(inputs, stages)
    c1_stores = [c1] if parts is None else [parts[0], parts[1], c1]
    c3_stores = [c3] if parts is None else [parts[2], parts[3], c3]

    # --- accumulation units ------------------------------------------------------------------
    native_fp8 = fp8_mma(scheme, native_gpu, fp8_accumulation)  # the fp8 MMA's unit (bound and z-scores)
    chained = fp8_mma_chained(scheme, native_fp8)  # and its |c| part (FP8_MMA_TRUNCATION)
    if scheme.act_dtype == torch.int8:
        u_acc = U32  # int8 x int8 -> int32 is exact; only the fp32 dequant multiply rounds
        growth1 = growth2 = 1.0
        acc_note = "int8 dots accumulate exactly in int32: only the fp32 dequantization rounds (1 u32)"
    else:
        u_acc = U_ACC_FP8_NATIVE if native_fp8 else U32
        growth1, growth2 = _acc_growth(K), _acc_growth(I)
        acc_note = (f"accumulation unit {u_acc:.3g} ("
                    + ("Hopper fp8 MMA, docs/TRITON_FACTS.md" if u_acc != U32 else "fp32") + f"); growth 1+sqrt(n/6): "
                    f"GEMM1 n=K={K} -> {growth1:.3g}, GEMM2 n=I={I} -> {growth2:.3g}"
                    + _fp8_unit_note(scheme, native_gpu, fp8_accumulation)
                    + ("; + the chained accumulator's |c| part (FP8_MMA_TRUNCATION, fp8_mma_truncation_sigma)"
                       if chained else ""))

    # --- GEMM scales s = sqrt(sum a^2 b^2) per route element ----------------------------------
    xr = x[:, None, :].expand(M, T, K) if T else x[:, None, :]
    s1_sq, _ = _per_expert_gemm_scales(xr, w1, rexp, valid)
    s1 = s1_sq.sqrt()
    s2_sq, w2max = _per_expert_gemm_scales(c2_in, w2, rexp, valid)
    s2 = s2_sq.sqrt() * wts[..., None]
    w2max = w2max * wts[..., None]

    # the chained fp8 MMA's |c| part (FP8_MMA_TRUNCATION; zero elsewhere): one sigma with the
    # accumulation's, in the gate, the budget and its z-scores
    chained1 = chained2 = torch.zeros((), dtype=F64, device=dev)
    if chained:
        chained1 = fp8_mma_truncation_sigma(K, c1.abs() + _route_bias(inputs.quant.w1_bias, rexp, valid))
        chained2 = fp8_mma_truncation_sigma(I, c3.abs() + _route_bias(inputs.quant.w2_bias, rexp, valid) * wts[..., None])
    sigma_acc2 = torch.hypot(u_acc * growth2 * s2, chained2)  # GEMM2's continuous discrepancy per c3

    # ===================== gate: kernel vs mirror =============================================
    pr = _profile_roundings(inputs, stages, profile)
    sigma_c1 = torch.hypot(u_acc * growth1 * s1, chained1)  # continuous c1 discrepancy before rounding
    ulp_c1 = ulp(c1, pr.gemm_grid)
    ulp_c2 = ulp(c2, S)
    sigma_c2_pre = ACT_FP32_ULPS * U32 * c2.abs() + _act_sensitivity(c1, sigma_c1, act)
    p_c1 = torch.clamp(n_round_c1 * FLIP_SIGMAS * sigma_c1 / ulp_c1, max=1.0)
    c1_jump = ulp_c1  # how far one c1 flip moves c1
    # with LoRA a flip of the base's or the delta's store moves c1 by up to that operand's ulp
    # (lora_store_parts: above ulp_c1 where they cancel; a store finer than c1's moves it through
    # c1's own rounding, so at least ulp_c1); the rate stays the one of c1's ulp (the larger)
    coarse1 = [torch.maximum(ulp(v, pr.gemm_grid), ulp_c1) for v in c1_stores]
    lora_jump1 = torch.stack(coarse1).amax(0) - ulp_c1  # >= 0: what LoRA's stores add to a c1 flip
    ties = division_ties(inputs, stages, profile, native_gpu)
    if ties is not None:
        # near-tie input codes (and a shifted input scale) may move c1 by more than one ulp
        shift1 = ties.c1_shift(c1)
        p_c1 = torch.clamp(p_c1 + TRITON_DIVISION_P * torch.clamp((ties.c1 + shift1) / ulp_c1, max=1.0), max=1.0)
        c1_jump = ulp_c1 + ties.c1 + shift1
    p_c2 = torch.clamp(FLIP_SIGMAS * sigma_c2_pre / ulp_c2, max=1.0)
    step = _requant_step(c2_in, valid, scheme, inputs)
    step_gate = _requant_step(c2_in, valid, scheme, inputs, pr.quantizer)
    # The mirror follows the fused silu+fp8_block128 rule of SPEC step 8 (no round_S before the
    # requantization), so a kernel that takes that path matches it; no extra flips are budgeted.
    fused_ok = fused_silu_fp8_group(act, scheme, inputs.quant.gemm1_clamp_limit if inputs.quant is not None else None,
                                    has_lora)
    if step is not None:
        p_q = torch.clamp(FLIP_SIGMAS * sigma_c2_pre / step_gate.clamp_min(1e-300), max=1.0)
    else:
        p_q = torch.zeros_like(c2)
        step = step_gate = torch.zeros_like(c2)
        if pr.tf32:
            # GEMM2 reads c2, an intermediate, as TF32 (the profile's fp32 dots): a rounding to the
            # TF32 grid that differing c2 can flip, as a requantization step is
            step_gate = _tf32_ulp(c2)
            p_q = torch.clamp(FLIP_SIGMAS * sigma_c2_pre / step_gate.clamp_min(1e-300), max=1.0)
    # one flip event moves one c2_in element i by at most delta_i: an S ulp of c2, the
    # activation's image of an S ulp of c1, and (quantized activations) one requantization step
    delta = ulp_c2 + _act_sensitivity(c1, c1_jump, act) + step_gate
    if ties is not None:  # a near-tie requantization code: one more event, by up to its own step
        p_q = torch.clamp(p_q + TRITON_DIVISION_P * (ties.c2_in > 0), max=1.0)
        delta = delta + (ties.c2_in - step_gate).clamp_min(0.0)
    # c1 flips map onto the c2 element they feed (gate and up rows)
    pg, pu = _gate_up(p_c1, act)
    p_events = pg + (pu if pu is not None else 0.0) + p_c2 + p_q
    if pr.act_gate is not None:
        # double activation rounding (the profile): act(g) itself rounds to S: one more flip event
        # per c2 element, driven by the gate's c1 discrepancy and the activation's fp32 math
        ulp_a = ulp(pr.act_gate, S)
        sigma_a = ACT_FP32_ULPS * U32 * pr.act_gate + ACT_LIPSCHITZ * _gate_up(sigma_c1, act)[0]
        p_events = p_events + FLIP_SIGMAS * sigma_a / ulp_a.clamp_min(1e-300)
        delta = delta + ulp_a * pr.act_up  # moves c2 by ulp_S(a) |u'| before c2 rounds
    p_events = torch.clamp(p_events, max=1.0)
    delta_max = delta.amax(-1) if I else torch.zeros(c2.shape[:-1], dtype=F64, device=dev)
    # Flip events are rare jumps of different sizes: bound their sum per route and output column
    # with the same Poisson/Bernstein rule as the budget (``_flip_jumps``): J = max_i delta_i
    # |w2[e,k,i]|, lambda = sum_i p_i delta_i |w2[e,k,i]| / J.
    flip_term = _flip_jumps(p_events, delta, w2, rexp, valid, wts)  # [M, K]
    if bool((lora_jump1 > 0).any()):
        # the same events with LoRA's larger c1 jumps; the larger of the two (the rule's ceil over a
        # lambda weighted by J is not monotone in a jump, and a wider jump must not narrow the gate)
        delta_lora = delta + _act_sensitivity(c1, c1_jump + lora_jump1, act) - _act_sensitivity(c1, c1_jump, act)
        flip_term = torch.maximum(flip_term, _flip_jumps(p_events, delta_lora, w2, rexp, valid, wts))
    lam = (p_events * vmask).sum(-1)  # expected events per route (reported)
    flips = torch.ceil(lam + 4.0 * lam.sqrt())

    # continuous part through GEMM2: sum_i w2^2 sigma_i^2 (the mirror's c2_in carries no
    # continuous error when requantized; then only flips matter)
    cont_in = sigma_c2_pre if scheme.act_granularity is None else torch.zeros_like(sigma_c2_pre)
    prop_sq, _ = _per_expert_gemm_scales(cont_in, w2, rexp, valid)
    var_gate = ((prop_sq * wts[..., None] ** 2 + sigma_acc2 ** 2) * vmask).sum(1)
    sigma_gate = var_gate.sqrt()
    ulp_c3 = ulp(c3, pr.gemm_grid)
    # |round(a) - round(b)| <= |a - b| + ulp(c3): the base's and the delta's flips add their own ulps (at
    # least c3's each, as before: a finer store still counts one ulp of c3)
    c3_ulps = (sum(torch.maximum(ulp(v, pr.gemm_grid), ulp_c3) * ((v != 0) | (c3 != 0)) for v in c3_stores)
               * vmask).sum(1)
    if pr.topk_partials is not None:
        # the profile's top-k sum in S: each of the topk - 1 partial sums may flip by its own S ulp
        out_ulp = (ulp(pr.topk_partials, S) * (pr.topk_partials != 0)).sum(1)
    else:
        out_ulp = ulp(out, S) * (out != 0)
    sum_err = (T - 1) * U32 * (c3.abs() * vmask).sum(1)  # fp32 sum of topk S values
    hard_gate = out_ulp + c3_ulps + sum_err + flip_term
    allowed_gate = hard_gate + Z_GATE * sigma_gate

    # z-scores divide by the flip-aware standard deviation (the bound above covers flips by its
    # hard terms; the continuous sigma alone would read flips as 100-1000 sigma events)
    model_stages: Dict[str, torch.Tensor] = {}
    sigma_flip, flip_lines, flip_terms = flip_aware_sigma(inputs, stages, native_gpu=native_gpu,
                                                          per_stage=model_stages, profile=profile, roundings=pr,
                                                          ties=ties, fp8_accumulation=fp8_accumulation)
    count_allowed, _, count_lines, count_terms = count_allowance(inputs, stages, model_stages, profile=profile)
    count_not_applied = None
    if native_gpu and not COUNT_TEST_ON_GPU:
        count_allowed = None  # the expected count is still recorded, for calibrate on that GPU
        count_terms.pop("differing_allowed", None)
        count_not_applied = (
            "conformance count test (elements differing from the mirror): not applied on a GPU, whose flip "
            "rates are not calibrated yet (docs/BOUNDS.md); conformance is judged per element only, blind to "
            "a rounding done one ulp differently")
        count_lines = count_lines[:1] + [
            "count: not applied on a GPU: its flip rates (tensor-core accumulation, the fast fp32 "
            "transcendentals) are not measured yet (docs/BOUNDS.md); a `moe-validate calibrate --strict` "
            "there within 4x turns it on (tolerance.COUNT_TEST_ON_GPU)"]
    elif count_allowed is not None and count_allowed >= out.numel() and count_terms["differing_expected"] > 0:
        # derived, but it cannot fail: the record says so as a skipped check, not as a silent pass (fp32
        # cases; GPU cases on the fp8 MMA's rates, which can flip every element; vLLM's fp8 cases)
        count_not_applied = (
            f"conformance count test (elements differing from the mirror): cannot fail here, the model lets "
            f"all {out.numel()} elements differ (expected {count_terms['differing_expected']:.4g}); "
            "conformance is judged per element only")

    gate = Bound(
        name="gate", allowed=allowed_gate, sigma=sigma_flip.clamp_min(1e-300), atol=0.0,
        rtol=2.0 * uS, z=Z_GATE,
        derivation=[
            "gate = kernel vs mirror: same quantizers and stores, differ by accumulation order and the flips it causes",
            f"S = {str(S).replace('torch.', '')}, u_S = 2^-{PRECISION_BITS[S]}; {acc_note}",
            f"out: 1 ulp_S(|mirror|) (final rounding may flip) + (topk-1) u32 sum|c3| (fp32 sum of {T} slots)",
            ("c3: per slot one ulp_S of each store: the base |c3 - d|, the LoRA delta |d| and their sum |c3| "
             "(base and delta may cancel: their ulps exceed |c3|'s)" if has_lora else "c3: 1 ulp_S(|c3|) per slot (one store)"),
            f"continuous: Z={Z_GATE} x sqrt(sum_slots w^2 sum_i w2^2 sigma_c2^2 + (u_acc g(I) s2)^2"
            + (" + the chained fp8 MMA's sigma(I, |c3|)^2" if chained else "")
            + "), s2 = sqrt(sum_i c2_in^2 w2^2)"
            + ("; sigma_c1 = hypot(u_acc g(K) s1, the chained fp8 MMA's sigma(K, |c1|))"
               if chained else ""),
            "flip events: p = min(1, "
            f"{FLIP_SIGMAS} sigma_pre / step) for each c1, c2 and requantization rounding",
            "one flip moves one c2_in element i by <= delta_i = ulp_S(c2) + 1.13(|u| ulp(g) + |g| ulp(u))"
            + (" + one requantization step" if scheme.act_granularity else ""),
            "per route and column: J = max_i delta_i |w2[e,k,i]|, lambda = sum_i p_i delta_i |w2| / J; allow "
            "min(ceil(lambda + 4 sqrt(lambda)) J [Poisson tail < 1e-4], sqrt(2 V ln 1e6) + J ln(1e6)/3 "
            "[random signs, Bernstein]) x w",
        ] + (["fused silu+fp8_block128: the mirror skips round_S(c2) as the kernel does (SPEC step 8)"]
             if fused_ok else []) + flip_lines + count_lines,
        count_allowed=count_allowed, count_not_applied=count_not_applied,
        terms={
            "u_S": uS, "u_acc": u_acc, "growth_gemm1": growth1, "growth_gemm2": growth2,
            "flips_per_route_max": float(flips.max()) if flips.numel() else 0.0,
            "flip_lambda_mean": float(lam[valid].mean()) if valid.any() else 0.0,
            "flip_term_max": float(flip_term.max()) if flip_term.numel() else 0.0,
            "sigma_cont_max": float(sigma_gate.max()) if sigma_gate.numel() else 0.0,
            "n_round_c1": n_round_c1, "n_round_c3": n_round_c3,
            **({"division_ties_input": float(ties.n_input), "division_ties_requant": float(ties.n_requant)}
               if ties is not None else {}),
            **flip_terms, **count_terms,
        },
    )

    # ===================== budget: kernel vs exact ==============================================
    # Each rounding to nearest leaves a uniform error of std ulp/sqrt(12).
    r12 = 1.0 / math.sqrt(12.0)
    # Requantization flips are counted from exact's codes (requant_flip_events). With the router
    # weight applied on input, c1 also carries the input codes that x * w's rounding to S moved
    # (router_weighted_input_c1_box, in the c1 box); pre-quantized input has no such rounding.
    weighted_input = _stores_weighted_input(inputs)
    counted = scheme.act_granularity is not None and bool(valid.any())
    # the bound's fp32 accumulation std with the partial sums' drift to the result (the fp8 MMA's unit
    # and exact int8 x int8 dots keep theirs; the gate's flip model is measured, not this worst case)
    if scheme.act_dtype != torch.int8 and not native_fp8:
        bias1 = _route_bias(inputs.quant.w1_bias if inputs.quant is not None else None, rexp, valid)
        bias2 = _route_bias(inputs.quant.w2_bias if inputs.quant is not None else None, rexp, valid) * wts[..., None]
        sigma_c1_b = _acc_sigma_drifting(u_acc, K, s1, c1.abs() + bias1) * vmask
        sigma_c3_b = _acc_sigma_drifting(u_acc, I, s2, c3.abs() + bias2) * vmask
    else:  # the gate's sigmas (with the chained fp8 MMA's |c| part)
        sigma_c1_b, sigma_c3_b = sigma_c1 * vmask, sigma_acc2 * vmask
    if counted:
        if exact is None:
            import reference  # the harness may import reference

            exact = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision="exact")
        exact = {k: v.to(dev) for k, v in exact.items()}
        base_box = requant_c1_box(inputs, exact, sigma_c1_b)
        if weighted_input:
            tie_c1, n_ties, spec_c1 = router_weighted_input_c1_box(inputs, w1, rexp, valid)
        else:
            (tie_c1, n_ties), spec_c1 = input_tie_c1_box(inputs, w1, rexp, valid), None
        c1_box = base_box.widened(tie_c1).masked(vmask)
        b_c1 = c1_box.box
        flip_ev = requant_flip_events(inputs, exact, c1_box)
        flip_b, flip_cap = _flip_sum_quantile(flip_ev, w2, rexp, valid, wts,
                                              group=_scale_group_width(scheme.act_granularity, I))
        # (the dequantized scale's shift, rho w sum_{i in group} w2 c2_in, is in flip_b: _group_shift_term)
        if budget_detail is not None:
            budget_detail.update(flip_ev, b_c1=b_c1, tie_c1=tie_c1, flip_term=flip_b, flip_cap=flip_cap)
    def budget_variance(sig_acc1, sig_acc2):
        """var_b [M, K] for given accumulation std of GEMM1 (per c1) and GEMM2 (per c3). Requantized
        schemes: exact requantizes its own c2 too, so a kernel's c2 errors reach the output only through
        the codes they flip and the scale they shift: counted in the bound's hard term (flip_b) and the
        z-scores' typical flips (requant_flip_variance_typical), not here."""
        var_c2 = torch.zeros_like(c2)
        if scheme.act_granularity is None:
            var_c1 = sum((u * r12) ** 2 for u in coarse1) + sig_acc1 ** 2
            if inputs.apply_router_weight_on_input:
                # the kernel (and mirror) round x * w to S; exact does not: that error crosses GEMM1
                # (requantized schemes take it in the c1 box: router_weighted_input_c1_box)
                vx = (2.0 * uS * x.abs() * r12)[:, None, :].expand(M, T, K)
                var_c1 = var_c1 + _per_expert_gemm_scales(vx, w1, rexp, valid)[0]
            var_c2 = (ulp_c2 * r12) ** 2 + _act_sensitivity(c1, var_c1.sqrt(), act) ** 2 + (ACT_FP32_ULPS * U32 * c2) ** 2
        prop_sq_b, _ = _per_expert_gemm_scales(var_c2.sqrt(), w2, rexp, valid)
        var_b = ((prop_sq_b * wts[..., None] ** 2 + sig_acc2 ** 2
                  + sum((torch.maximum(ulp(v, S), ulp(c3, S)) * r12) ** 2 for v in c3_stores)) * vmask).sum(1)
        var_b = var_b + (ulp(out, S) * (out != 0) * r12) ** 2 + (sum_err * r12) ** 2
        return var_b

    # the LoRA deltas' own fp32 dots (fp32 operands: S x S products, never the fp8 MMA), for the bound
    # (the sequential worst case) and the z-scores (typical)
    lora_bits = product_bits(QuantScheme.parse(None), S)
    (lora1_b, lora2_b), (lora1_z, lora2_z) = lora_accumulation_sigma(
        inputs, stages, _acc_growth, lambda n: acc_error_typical(n, lora_bits)[0] / U32)
    var_b = budget_variance((sigma_c1_b ** 2 + lora1_b ** 2).sqrt(), (sigma_c3_b ** 2 + lora2_b ** 2).sqrt())
    # the requantization flips, counted per element (requant_flip_events, _flip_sum_quantile; nothing
    # to count without a valid route)
    hard_b = flip_b if counted else torch.zeros_like(out)
    sigma_b = var_b.sqrt()
    allowed_b = hard_b + Z_BUDGET * sigma_b
    # z-scores: the same model at the typical accumulation error (acc_error_typical plus one fp32
    # epilogue operation), not the sequential worst case the bound uses
    bits = product_bits(scheme, S)
    typ1, typ2 = acc_error_typical(K, bits, native_fp8)[0], acc_error_typical(I, bits, native_fp8)[0]
    sigma_c1_z = ((typ1 * s1) ** 2 + (EPILOGUE_OP_SIGMA * U32 * c1) ** 2 + chained1 ** 2 + lora1_z ** 2).sqrt()
    var_bz = budget_variance(sigma_c1_z, ((typ2 * s2) ** 2 + (EPILOGUE_OP_SIGMA * U32 * c3) ** 2 + chained2 ** 2
                                          + lora2_z ** 2).sqrt())
    var_flip_z = torch.zeros_like(out)
    if counted:  # a typical kernel's requantization flips and scale error (requant_flip_variance_typical)
        typical = requant_flip_variance_typical(
            inputs, exact, sigma_c1_z * vmask, w1, w2, rexp, valid, wts, c1_mean=spec_c1, c2_rounds=not fused_ok,
            exact_codes=(flip_ev["codes"], flip_ev["scale"]))
        typical_flips = float((typical.p_up + typical.p_down).sum())
        flip_sq, _ = _per_expert_gemm_scales(typical.var_codes.sqrt(), w2, rexp, valid)
        var_flip_z = (flip_sq * wts[..., None] ** 2 * vmask).sum(1) + typical.var_scale
    sigma_z = (var_bz + var_flip_z).sqrt()
    if budget_detail is not None and counted:
        budget_detail.update(var_z_base=var_bz, var_z_flips=var_flip_z, typical=typical)
    q_note = {None: "none"}.get(scheme.act_granularity, f"{scheme.act_dtype} step (ulp at the value x scale)".replace("torch.", ""))
    requant_terms: Dict[str, float] = {}
    if counted:
        vsel = valid[..., None].expand_as(flip_ev["b"])
        p_any = flip_ev["p_up"] + flip_ev["p_down"]  # [cells, M, T, I]
        moved = (flip_ev["ref"] != flip_ev["codes"][None]).to(F64)  # a cell's reference codes off exact's
        n_codes, n_cand = int(vsel.sum()), int((((p_any > 0) | (moved > 0)).any(0) & vsel).sum())
        # codes that may differ from exact's, in the cell where most may
        expected = float(((torch.clamp(p_any, max=1.0) * (1.0 - moved) + moved) * vsel).sum((1, 2, 3)).max())
        b_med = float(flip_ev["b"][vsel].median()) if n_codes else 0.0
        rel_max = float(torch.maximum(flip_ev["rho_lo"].abs(), flip_ev["rho_hi"].abs())[vsel].max()) if n_codes else 0.0
        n_cells = flip_ev["p_up"].shape[0]
        ratio = (flip_b / flip_cap.clamp_min(1e-300))[flip_cap > 0]
        requant_terms = {"input_codes_at_ties": float(n_ties),
                         "requant_codes": float(n_codes), "requant_codes_may_flip": float(n_cand),
                         "requant_flips_expected": expected,
                         "requant_flips_typical": typical_flips,
                         "requant_scale_rel_max": rel_max,
                         "requant_flip_term_max": float(flip_b.max())}
        requant_lines = [
            f"requantization ({q_note}): exact requantizes too; its codes flip only where an accurate kernel's input "
            f"v + e crosses a midpoint: e = independent (|.| <= b, code units, median {b_med:.3g}: corners of the c1 box "
            f"(SPEC roundings +{REQUANT_EXTRA_ROUNDINGS}, Z sigma acc, fp32 epilogue) through the activation, curvature, "
            f"fp32 activation, {1 + REQUANT_EXTRA_ROUNDINGS} c2 roundings) + the group's common shift -v rho / (1 + rho) "
            f"(scale error |rho| <= {rel_max:.3g}, from amax in [max(|c2| - b), max(|c2| + b)]; {n_cells} cell(s) of rho) + 4 u32 |v|",
            f"flip p <= min((b - x) / 2b, Gauss(x - the box's fixed part; sigma of its random part)), x = d - (the "
            f"cell's largest shift toward the midpoint at distance d) (symmetric unimodal e; 1 if x <= 0): {n_cand} of "
            f"{n_codes} codes may differ from exact's, {expected:.3g} expected",
            "flips are counted from each cell's reference codes (v / (1 + rho_mid)'s); their moves off exact's codes, "
            "read with the kernel's scale s (1 + rho) at the cell's ends, are one signed term per scale group: "
            "w sum_(i in group) w2 s ((1 + rho) ref_i - code_i), where the shift's code moves and the scale's cancel",
            (f"router weight on input: x * w stored in S (the weight as fp32 or rounded to S, the product rounded "
             f"once or via fp32) moves the dequantized input by a known D: the largest |D . w1| over those 4 is "
             f"added to the c1 box, with {n_ties} input codes at ties (as below) on the stored values"
             if weighted_input else
             f"GEMM1 input codes at ties: {n_ties} x / s within {_QUANTIZER_OPS:g} u32 of a midpoint, where another "
             "accurate quantizer may take the neighbouring code: one step each, through |w1|, added to the c1 box"),
            f"flips per output element: X+ (raising) and X- (lowering) sums of w w2 jump_i in known directions; "
            f"Chernoff x* = min_t (sum_(route, group) max_cell (t H + sum_i log(1 + p (e^(t a) - 1))) + ln(1/{FLIP_ALPHA:g})) / t "
            "(H: the cell's signed term above), "
            "capped by sum a; "
            f"allow max(x*+, x*-): median {float(ratio.median()) if ratio.numel() else 0.0:.3g} of the all-flip cap",
        ]
    else:
        requant_lines = []
    budget = Bound(
        name="budget", allowed=allowed_b, sigma=sigma_z.clamp_min(1e-300), atol=0.0, rtol=uS, z=Z_BUDGET,
        derivation=[
            "budget = kernel vs exact (float64 after input quantization): every rounding stage is an error source",
            f"rounding stages: c1 x{n_round_c1}, c2, c3 x{n_round_c3}, out"
            + (", x * w (router weight on input)" if inputs.apply_router_weight_on_input else "")
            + "; each uniform with std ulp/sqrt(12)",
        ] + requant_lines + [
            "c1 errors reach c2 through |f'| <= 1.13 (|u| dg + |g| du); relu2: 2|g| dg",
            "GEMM2 propagates independent c2_in errors as sqrt(sum_i w2^2 sigma_i^2) (the s_ij scale, not |ref|)",
            f"{acc_note}",
            f"allowed = scale-shift term + Z={Z_BUDGET} x sigma (sigma with the sequential worst-case accumulation)",
            "z-scores d/sigma (RMS ~1 expected) use the same model at the typical accumulation error "
            f"({typ1 / U32:.3g} u32 s1, {typ2 / U32:.3g} u32 s2; flip_aware_sigma's constants)"
            + (" plus a typical kernel's requantization flips and scale error (Gaussian c2 errors, the SPEC's "
               f"roundings only: {typical_flips:.3g} flips expected; "
               "requant_flip_variance_typical)" if counted else ""),
        ],
        terms={"u_S": uS, "u_acc": u_acc, "sigma_max": float(sigma_b.max()) if sigma_b.numel() else 0.0,
               "hard_max": float(hard_b.max()) if hard_b.numel() else 0.0, **requant_terms},
    )
    gate.fp8_accumulation = budget.fp8_accumulation = fp8_unit(scheme, native_gpu, fp8_accumulation)
    return {"gate": gate, "budget": budget}
