"""Stage localization: which pipeline stage of a failing backend went wrong, and where in it.

A backend that exposes its intermediates (``backends.ExposesStages``: ``run_stages(inputs, case)``)
is run once more for a case whose output failed, and every stage it hands back is compared with
what the mirror's stage function makes of the backend's *own* upstream stage. The stage functions
are the mirror reference's (``reference.pipeline.StageFunctions``, ``mirror`` precision) under the
backend's declared numerics profile (``numerics_profile``; SPEC's when none), the profile its
conformance verdict is judged under, so a rounding the profile declares is the stage function's
too and never reads as a divergence:

  c1     GEMM1 (+ bias, + LoRA w13)           from the inputs           (x, quantizer, TF32, stored dtype)
  c2     activation, rounded once (or twice)  from the backend's c1     (activation_rounding)
  c2_in  requantized GEMM2 input              from the backend's c2     (the profile's quantizer)
  c3     GEMM2 (+ bias, * w, + LoRA w2)       from the backend's c2_in  (router weight, stored dtype)
                                              (c2 for the LoRA delta)
  out    the top-k sum in slot order          from the backend's c3     (in fp32, or in S)

Judged against its own input, a stage's bound holds only that stage's arithmetic, so the first
stage over its bound is where the error entered (a wrong activation shows in c2 even though every
later stage is wrong too). Where the backend did not materialize a stage on the path it took (a
fused epilogue), the next stage starts from the mirror's value and its bound adds the skipped
stage's bound carried through the stage function (the activation's sensitivity, 1-Lipschitz
requantization plus the scale's move, |w2| times the router weight through GEMM2, the sum over
slots). Rows of invalid routes are never compared (a kernel never writes them).

Per-stage bound (``allowed``, elementwise), every term a worst case scaled by ``tolerance.Z_GATE``
where it is a standard deviation:
  GEMM stages  Z * u_acc * (1 + sqrt(n/6)) * s (the sequential fp32 accumulation model of
               ``tolerance._acc_growth``, s = sqrt(sum_k a_k^2 b_k^2); in fp32 with the partial sums'
               drift to |c|, ``tolerance._acc_sigma_drifting``, as the budget; u_acc = 2^-24, or the Hopper
               fp8-MMA unit on a native GPU, 0 for int8 x int8 in int32; a chained fp8 MMA adds its
               |c| part, ``tolerance.fp8_mma_truncation_sigma``) + one fp32 rounding per
               epilogue operation (dequantization, bias, router weight) + one ulp of the stored
               value's grid (S, or the profile's GEMM output dtype under quantized activations;
               ``reference.pipeline.gemm_output_dtype``) and, with LoRA, one S ulp for each of the
               delta and the sum (the LoRA rank-space product gets a second accumulation term);
  c2           ``tolerance.ACT_FP32_ULPS`` fp32 ulps of (|c2| + |g||u|) (fp32 math on both
               sides) + one S ulp (none on the fused silu + fp8 path, which never rounds c2); where
               the profile rounds twice, c2 = round_S(round_S(a) u'), a flip of the first rounding
               (a within those fp32 ulps, plus the carried c1 slack, on either side) adds ulp_S(a) |u'|;
  c2_in        one requantization step (``tolerance._requant_step``, with the profile's quantizer):
               both sides quantize the same values with the same formulas, a step is the most a
               division tie can move;
  out          the fp32 sum of topk S values: topk fp32 ulps of sum |c3| + one S ulp; where the profile
               sums in S, one S ulp per partial sum (``reference.pipeline.storage_partial_sums``).

Every field of ``NumericsProfile`` is followed: the router weight, the quantizers, TF32 operands and
weight-only weights in S enter through the mirror's x, w1, w2 and the stage functions, the rest as
above. ``localize`` fills the case record's ``stages`` (results.py; ``profile`` names the profile
the stage functions followed) and returns one check row.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from moe_validate.backends import ExposesStages, capability, declared
from moe_validate.contract.profile import SPEC_PROFILE, Fp8Accumulation, NumericsProfile
from moe_validate.contract.rules import interpreting
from moe_validate.contract.spec import MoEInputs, QuantScheme, storage_dtype
from moe_validate.tolerance import (ACT_FP32_ULPS, ACT_LIPSCHITZ, U32, U_ACC_FP8_NATIVE, Z_GATE, _acc_growth,
                                    _acc_sigma_drifting, _act_sensitivity, _gate_up, _per_expert_gemm_scales,
                                    _requant_step, fp8_mma, fp8_mma_chained, fp8_mma_truncation_sigma, ulp)

__all__ = ["STAGES", "ROUTE_STAGES", "CHECK_NAME", "localize", "compare_stages", "no_stages"]

F64 = torch.float64
ROUTE_STAGES = ("c1", "c2", "c2_in", "c3")  # what a backend may expose, route-major
STAGES = ROUTE_STAGES + ("out",)  # pipeline order; ``out`` is the run's output itself
CHECK_NAME = "stage_localization"
TILE = (16, 32)  # nominal (routes of one expert, column) tile used to name where an element lives


def no_stages(backend) -> Dict[str, Any]:
    """The record's ``stages`` before (or without) a localization."""
    return {"exposed": capability(backend, ExposesStages) is not None, "first_diverging": None, "stages": {}}


def _route_major(t: torch.Tensor, M: int, topk: int, name: str, device) -> torch.Tensor:
    """[M, topk, X] float64 from [M*topk, X] or [M, topk, X]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"run_stages()[{name!r}] must be a tensor or a string saying why it is missing; "
                        f"got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == M * topk:
        t = t.reshape(M, topk, t.shape[1])
    if t.dim() != 3 or tuple(t.shape[:2]) != (M, topk):
        raise ValueError(f"run_stages()[{name!r}] must be route-major [M*topk, X] or [M, topk, X] with "
                         f"M={M}, topk={topk}; got {list(t.shape)}")
    return t.detach().to(device=device, dtype=F64)


class _Pipeline:
    """The mirror's stage functions under the declared profile and the per-stage bounds of one call
    (see the module docstring)."""

    def __init__(self, inputs: MoEInputs, profile: NumericsProfile, native_gpu: bool,
                 fp8_accumulation: Optional[Fp8Accumulation] = None) -> None:
        from reference.pipeline import stage_functions

        self.inputs, self.profile = inputs, profile
        self.fns = stage_functions(*inputs.args(), **inputs.kwargs(), precision="mirror", profile=profile)
        self.mirror = self.fns.run()
        quant = inputs.quant
        self.scheme = QuantScheme.parse(quant.scheme if quant is not None else None)
        self.S = storage_dtype(inputs.hidden_states.dtype)
        self.gemm_grid = self.fns.gemm_output_dtype  # where c1 and c3 round (S, or the profile's)
        self.valid = self.fns.valid.to(torch.bool)
        self.local = self.fns.local.long()
        self.clamp = quant.gemm1_clamp_limit if quant is not None else None
        self.fused = self.fns.fused
        self.chained_fp8 = False
        if self.scheme.act_dtype == torch.int8:
            self.u_acc, self.exact_dot = U32, True
        else:
            native_fp8 = fp8_mma(self.scheme, native_gpu, fp8_accumulation)
            self.u_acc = U_ACC_FP8_NATIVE if native_fp8 else U32
            self.exact_dot = False
            self.chained_fp8 = fp8_mma_chained(self.scheme, native_fp8)
        self.n_round = 3 if inputs.lora is not None else 1

    def _gemm_slack(self, a: torch.Tensor, w: torch.Tensor, value: torch.Tensor, epilogue_ops: int,
                    scale_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Accumulation + epilogue error of a grouped GEMM, before the stored rounding."""
        sq, _ = _per_expert_gemm_scales(a, w, self.local, self.valid)
        s = sq.sqrt() if scale_rows is None else sq.sqrt() * scale_rows[..., None]
        if self.exact_dot:
            acc = Z_GATE * self.u_acc * s
        elif self.u_acc == U32:
            # fp32 accumulation with the partial sums' drift to the result, as the budget takes it (homogeneous
            # in (s, |c|), so the router weight's scaling may come first)
            acc = Z_GATE * _acc_sigma_drifting(U32, a.shape[-1], s, value.abs())
        else:  # the fp8 MMA's unit keeps its own growth
            acc = Z_GATE * self.u_acc * _acc_growth(a.shape[-1]) * s
        if self.chained_fp8:  # the accumulator's |c| part (tolerance.FP8_MMA_TRUNCATION), as the budget takes it
            acc = acc + Z_GATE * fp8_mma_truncation_sigma(a.shape[-1], value.abs())
        if self.inputs.lora is not None:
            acc = 2.0 * acc  # the rank-space LoRA product accumulates in fp32 too (bounded like the base)
        return acc + epilogue_ops * U32 * value.abs()

    def _reached(self, slack: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One ulp of ``dtype`` at the value ``slack`` can reach: either side rounds by up to half
        an ulp of its own binade, so one ulp above both bounds the pair."""
        return ulp(expected.abs() + slack + ulp(expected, dtype), dtype)

    def _stored(self, slack: torch.Tensor, expected: torch.Tensor, n_round: int,
                grid: Optional[torch.dtype] = None) -> torch.Tensor:
        """A slack before rounding, plus one ulp of ``grid`` (default S: the profile's GEMM output
        dtype for c1 and c3) for the first rounding and one S ulp for each of the others."""
        grid = grid or self.S
        if grid == self.S:
            return slack + n_round * self._reached(slack, expected, self.S)
        return slack + self._reached(slack, expected, grid) + (n_round - 1) * self._reached(slack, expected, self.S)

    # --- the stages: (expected from the upstream used, allowed given the upstream's slack) --------
    def c1(self, _upstream, _slack):
        m, q = self.mirror, self.inputs.quant
        x = m["x"][:, None, :].expand(self.valid.shape[0], self.valid.shape[1], m["x"].shape[1])
        ops = int(self.scheme.act_dtype is not None) + int(self.scheme.weight_dtype is not None) \
            + int(q is not None and q.w1_bias is not None)
        expected = m["c1"]
        slack = self._gemm_slack(x, m["w1"], expected, ops)
        return expected, self._stored(slack, expected, self.n_round, self.gemm_grid)

    def c2(self, c1, c1_slack):
        act = self.inputs.activation
        expected = self.fns.c2(c1)
        g, u = _gate_up(c1.abs(), act)
        gu = g * u if u is not None else g  # the |g||u| term: where gelu's 1 + erf cancels
        slack = ACT_FP32_ULPS * U32 * (expected.abs() + gu)
        if c1_slack is not None:
            slack = slack + _act_sensitivity(c1.abs() + c1_slack, c1_slack, act)
        if self.fns.twice and not self.fused:
            slack = slack + self._first_of_two_roundings(c1, c1_slack)
        return expected, (slack if self.fused else self._stored(slack, expected, 1))

    def _first_of_two_roundings(self, c1, c1_slack):
        """c2 = round_S(round_S(a) u'), a = act(g): where the two sides' a differ by a few fp32 ulps
        (or by the carried c1's slack), round_S(a) may differ by one ulp_S(a), which u' multiplies."""
        from reference.activations import gated_factors

        a, up = gated_factors(c1.to(torch.float32), self.inputs.activation, self.clamp)
        a, up = a.to(F64).abs(), up.to(F64).abs()
        a_err = ACT_FP32_ULPS * U32 * a
        if c1_slack is not None:
            dg, du = _gate_up(c1_slack, self.inputs.activation)
            a_err, up = a_err + ACT_LIPSCHITZ * dg, up + du
        return ulp(a + a_err, self.S) * up

    def c2_in(self, c2, c2_slack):
        expected = self.fns.c2_in(c2)
        step = _requant_step(expected, self.valid, self.scheme, self.inputs, quantizer=self.fns.quantizer)
        allowed = step.clone()
        if c2_slack is not None:
            # 1-Lipschitz up to one step, and a dynamic scale moves with its absmax: relative
            # change <= slack / absmax over the scale's group (bounded here by the row's)
            amax = c2.abs().amax(-1, keepdim=True).clamp_min(1e-30)
            allowed = allowed + c2_slack + expected.abs() * (c2_slack.amax(-1, keepdim=True) / amax).clamp(max=1.0)
        return expected, allowed

    def c3(self, c2_in, c2_in_slack, c2_for_lora):
        inp, q = self.inputs, self.inputs.quant
        expected = self.fns.c3(c2_in, c2_for_lora)
        has_bias = q is not None and q.w2_bias is not None
        w = torch.ones_like(self.valid, dtype=F64) if inp.apply_router_weight_on_input \
            else self.fns.gemm2_weights.to(F64).to(self.valid.device).abs()
        ops = int(self.scheme.act_dtype is not None) + int(self.scheme.weight_dtype is not None) \
            + int(has_bias) + int(not inp.apply_router_weight_on_input)
        slack = self._gemm_slack(c2_in, self.mirror["w2"], expected, ops, scale_rows=w)
        if c2_in_slack is not None:
            carried, _ = _per_expert_gemm_scales(c2_in_slack, self.mirror["w2"], self.local, self.valid, power=1)
            slack = slack + carried * w[..., None]
        return expected, self._stored(slack, expected, self.n_round, self.gemm_grid)

    def out(self, c3, c3_slack):
        expected = self.fns.out(c3)
        vm = self.valid[..., None].to(F64)
        topk = self.valid.shape[1]
        slack = topk * U32 * (c3.abs() * vm).sum(1)
        if c3_slack is not None:
            slack = slack + (c3_slack * vm).sum(1)
        if not self.fns.sums_in_storage:
            return expected, self._stored(slack, expected, 1)
        # the sum in S: every partial sum rounds to S, each by up to an ulp of its own, and a
        # rounding passes on the difference it was given (nearest rounding is monotone)
        from reference.pipeline import storage_partial_sums

        partials = storage_partial_sums(c3, self.valid, self.S)
        return expected, slack + sum(self._reached(slack, partials[:, j], self.S) for j in range(topk))


def _worst(kernel: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor, mask: torch.Tensor,
           local: Optional[torch.Tensor]) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(max |kernel - expected| / allowed over ``mask``, the worst element named)."""
    k, e = kernel, expected
    finite = torch.isfinite(e)
    bad_special = finite & ~torch.isfinite(k) & mask
    d = torch.where(finite & torch.isfinite(k), (k - e).abs(), torch.zeros_like(e))
    norm = torch.where(d == 0, torch.zeros_like(d), d / allowed.clamp_min(1e-300))
    norm = torch.where(bad_special, torch.full_like(norm, math.inf), norm)
    norm = torch.where(mask, norm, torch.zeros_like(norm))
    if norm.numel() == 0:
        return 0.0, None
    flat = int(torch.argmax(norm.reshape(-1)))
    value = float(norm.reshape(-1)[flat])
    if value == 0:
        return 0.0, None
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), norm.shape)]
    where: Dict[str, Any] = {"kernel": float(k[tuple(index)]), "reference": float(e[tuple(index)]),
                             "allowed": float(allowed[tuple(index)]), "normalized": value}
    if local is None:  # [M, K]: the output
        m, col = index
        where.update(token=m, column=col, expert=None, tile=f"r{m // TILE[0]}c{col // TILE[1]}")
        return value, where
    m, j, col = index
    topk = norm.shape[1]
    expert = int(local[m, j])
    # the route's position among its expert's routes (ascending r), as an aligned kernel lays them out
    same = (local.reshape(-1) == expert)
    position = int(same[: m * topk + j].sum())
    where.update(route=m * topk + j, token=m, slot=j, column=col, expert=expert,
                 tile=f"e{expert}r{position // TILE[0]}c{col // TILE[1]}")
    return value, where


def compare_stages(inputs: MoEInputs, exposed: Dict[str, Any], native_gpu: bool = False,
                   profile: NumericsProfile = SPEC_PROFILE,
                   fp8_accumulation: Optional[Fp8Accumulation] = None) -> Dict[str, Any]:
    """The record's ``stages`` for a backend's ``run_stages`` result ``exposed``, every stage
    function following ``profile`` (the backend's declared one; see the module docstring), the fp8
    dots modelled by ``fp8_accumulation`` (the backend's report of that run, ``tolerance.fp8_mma``)."""
    pipe = _Pipeline(inputs, profile, native_gpu, fp8_accumulation)
    M, topk = pipe.valid.shape
    device = pipe.valid.device
    mask3 = pipe.valid[..., None]
    requantizes = pipe.scheme.act_granularity is not None
    own: Dict[str, Optional[torch.Tensor]] = {}
    notes: Dict[str, str] = {}
    for name in STAGES:
        value = exposed.get(name)
        if name == "c2_in" and not requantizes:
            notes[name] = "not a stage of this scheme: GEMM2 reads c2 unquantized"
            own[name] = None
        elif isinstance(value, torch.Tensor):
            if name == "out":
                own[name] = value.detach().to(device=device, dtype=F64)
            else:
                own[name] = _route_major(value, M, topk, name, device)
        else:
            own[name] = None
            notes[name] = value if isinstance(value, str) and value else "not exposed by the backend"

    results: Dict[str, Any] = {}
    first = None
    used: Dict[str, torch.Tensor] = {}
    slack_of: Dict[str, Optional[torch.Tensor]] = {}

    def judge(name, expected, allowed):
        nonlocal first
        used[name] = own[name] if own[name] is not None else expected
        # downstream stages carry this stage's bound only where they start from the mirror's value
        slack_of[name] = None if own[name] is not None else allowed
        if own[name] is None:
            results[name] = {"unavailable": notes[name]}
            return
        mask = mask3.expand_as(expected) if name != "out" else torch.ones_like(expected, dtype=torch.bool)
        value, where = _worst(own[name], expected, allowed, mask, None if name == "out" else pipe.local)
        results[name] = {"max_normalized": value, "worst": where}
        if value > 1.0 and first is None:
            first = name

    judge("c1", *pipe.c1(None, None))
    judge("c2", *pipe.c2(used["c1"], slack_of["c1"]))
    if requantizes:
        judge("c2_in", *pipe.c2_in(used["c2"], slack_of["c2"]))
        c2_in, c2_in_slack = used["c2_in"], slack_of["c2_in"]
    else:
        results["c2_in"] = {"unavailable": notes["c2_in"]}
        c2_in, c2_in_slack = used["c2"], slack_of["c2"]
    judge("c3", *pipe.c3(c2_in, c2_in_slack, used["c2"]))
    judge("out", *pipe.out(used["c3"], slack_of["c3"]))
    return {"exposed": True, "first_diverging": first, "stages": results, "profile": profile.name}


def _summary(record: Dict[str, Any]) -> Tuple[str, str]:
    """(outcome, reason) of the check row for a ``compare_stages`` record."""
    stages = record["stages"]
    unavailable = [n for n in STAGES if "unavailable" in stages.get(n, {})]
    missing = f"; not compared (not materialized, or not a stage here): {', '.join(unavailable)}" if unavailable else ""
    first = record["first_diverging"]
    compared = [n for n in STAGES if "max_normalized" in stages.get(n, {})]
    within = compared if first is None else [n for n in compared if STAGES.index(n) < STAGES.index(first)]
    if first is None:
        return "PASS", (f"stage localization: every exposed stage is within its bound ({', '.join(within)}); the "
                        f"output's failure is below the per-stage bounds{missing}")
    s = stages[first]
    w = s["worst"] or {}
    if first == "out":
        at = f"token {w.get('token')}, column {w.get('column')}, tile {w.get('tile')}"
    else:
        at = (f"expert {w.get('expert')}, tile {w.get('tile')}: route {w.get('route')} (token {w.get('token')}, "
              f"slot {w.get('slot')}), column {w.get('column')}")
    before = f"; earlier stages within their bounds: {', '.join(within)}" if within else ""
    return "FAIL", (f"stage localization: first diverging stage {first} ({at}): {w.get('kernel', float('nan')):.6g} "
                    f"vs {w.get('reference', float('nan')):.6g}, |diff| / allowed = {s['max_normalized']:.3g}{before}"
                    f"{missing}")


def localize(case, inputs: MoEInputs, backend, out: Optional[torch.Tensor] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the record's ``stages``, one check row) for a case whose output failed.

    Runs the backend's ``run_stages`` once more (SKIP row when it has none); ``out`` (the judged
    output) is compared with that run's output bitwise, and a difference is said (the stages
    then describe another run than the one judged)."""
    run_stages = capability(backend, ExposesStages)
    if run_stages is None:
        return no_stages(backend), {
            "name": CHECK_NAME, "outcome": "SKIP",
            "reason": (f"stage localization: backend {getattr(backend, 'name', '?')!r} exposes no intermediates "
                       "(no run_stages method); the failure is located by token, column and expert only")}
    from moe_validate import matrix
    from moe_validate.verdicts import declared_profile

    if isinstance(case, matrix.Case) and matrix.reference_is_sampled(case):
        return no_stages(backend), {
            "name": CHECK_NAME, "outcome": "SKIP",
            "reason": "stage localization: not run for a row-sampled case (its full float64 stages do not fit)"}
    try:
        exposed = run_stages(inputs, case)
        if not isinstance(exposed, dict) or not isinstance(exposed.get("out"), torch.Tensor):
            raise TypeError(f"run_stages must return a dict with the run's output under 'out'; got "
                            f"{type(exposed).__name__}")
        profile = declared_profile(backend)
        native_gpu = inputs.hidden_states.is_cuda and not interpreting()
        record = compare_stages(inputs, exposed, native_gpu, profile,
                                declared(backend, "last_fp8_accumulation"))
    except Exception as exc:
        from moe_validate.run.case import cuda_poisoned, one_line

        if cuda_poisoned(exc):
            raise  # the worker must be retired: not a localization matter
        # The case already failed on its output; a localization that cannot run must not change that.
        return ({**no_stages(backend), "error": one_line(exc)},
                {"name": CHECK_NAME, "outcome": "SKIP", "reason": f"stage localization could not run: {one_line(exc)}"})
    outcome, reason = _summary(record)
    if profile != SPEC_PROFILE:
        reason += f"; the stage functions follow the declared profile {profile.name!r}"
    if out is not None and not _same_bits(out, exposed["out"]):
        record["rerun_differs"] = True
        reason += "; NOTE the stage run's output differs from the judged run's (the backend is not deterministic)"
    return record, {"name": CHECK_NAME, "outcome": outcome, "reason": reason}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device.type == "meta":
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
