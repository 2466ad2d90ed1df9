"""Measure the count model's flip rates stage by stage (issue 23): for every case of the given suites
and repetitions, run the triton backend with its intermediates (``run_stages``), and count per stage
the elements that differ

- from the mirror's own value of that stage (``total``: what the count model propagates), and
- from the mirror's stage function applied to the kernel's own upstream stage (``own``: the stage's
  own arithmetic only; c1 has no upstream, so its own count is its total),

next to the model's expected counts (``tolerance.flip_aware_sigma``'s per-stage probabilities, as
``derive`` computes them on this device) and the out-level count test (``count_allowance``, forced
on). One JSON line per case run. Runs on a GPU (compiled kernels) or under TRITON_INTERPRET=1.

    python scripts/gpu_stage_rates.py --suite premerge --suite nightly --reps 0 1 --limit 500 --out rates.jsonl
    python scripts/gpu_stage_rates.py --summary rates.jsonl      (pooled observed / model per stage and class)

For dynamic activation scales it also counts the groups whose amax element of c2 differs (``amax``): the event
that moves the whole group's scale, whose probability the gate takes as p_c2 at the argmax.
"""
import argparse
import dataclasses
import functools
import json
import sys
import time
from collections import defaultdict

import torch


def count(kernel, expected, mask, rel=0.0):
    """Elements of ``mask`` (finite in ``expected``) where the two differ (by more than ``rel`` |expected|)."""
    keep = mask & torch.isfinite(expected)
    return int((((kernel - expected).abs() > rel * expected.abs()) & keep).sum())


def expected_count(p, valid, mirror_stage):
    """The model's sum of probabilities over valid, finite elements."""
    keep = valid[..., None] & torch.isfinite(mirror_stage) if p.dim() == 3 else torch.isfinite(mirror_stage)
    return p[keep].sum()


# a requantized element differs by a code step (>= 2^-4 of it in fp8, 1/127 in int8); a dynamic scale one fp32
# ulp off moves a whole group by 2^-24: not a code flip
CODE_REL = 1e-4


def measure(case, device):
    from moe_validate import tolerance as tol
    from moe_validate.backends import TritonBackend
    from moe_validate.contract.spec import QuantScheme
    from moe_validate.inputs import make_inputs
    from moe_validate.stages import _route_major
    from reference.pipeline import stage_functions

    backend = TritonBackend()
    ok, why = backend.supports(case)
    if not ok:
        return {"case_id": case.id, "skip": why}
    inputs = make_inputs(case, device=device)
    t0 = time.perf_counter()
    # the unfused paths write every stage; the paths invariance holds them bitwise equal to the fused ones
    backend.run = functools.partial(TritonBackend.run, backend, fuse_activation=False, fuse_topk_sum=False)
    exposed = backend.run_stages(inputs, case)
    fns = stage_functions(*inputs.args(), **inputs.kwargs(), precision="mirror")
    mirror = fns.run()
    per_stage = {}
    native_gpu = device == "cuda"
    fp8_unit = backend.last_fp8_accumulation  # how this launch's fp8 dots accumulated (ReportsAccumulation)
    tol.flip_aware_sigma(inputs, mirror, native_gpu=native_gpu, per_stage=per_stage, fp8_accumulation=fp8_unit)
    allowed, expected, _, _ = tol.count_allowance(inputs, mirror, per_stage)
    valid = fns.valid.to(torch.bool)
    M, T = valid.shape
    m3 = valid[..., None]
    own = {}
    for name in ("c1", "c2", "c2_in", "c3"):
        value = exposed.get(name)
        own[name] = _route_major(value, M, T, name, valid.device) if isinstance(value, torch.Tensor) else None
    scheme = QuantScheme.parse(inputs.quant.scheme if inputs.quant is not None else None)
    requant = scheme.act_granularity is not None
    rec = {"case_id": case.id, "dtype": case.dtype, "scheme": case.scheme, "activation": case.activation,
           "lora": case.lora, "bias": case.bias, "router_on_input": case.router_on_input,
           "paths": dict(backend.last_paths), "config": backend.last_config,
           "fp8_accumulation": None if fp8_unit is None else fp8_unit.value, "stages": {}}

    def put(stage, kind, kernel, ref, p, rel=0.0):
        """Record one stage count: kernel vs ref over the valid routes (all of out), beside the model's sum p."""
        mask = m3.expand_as(kernel) if stage != "out" else torch.ones_like(kernel, dtype=torch.bool)
        model = 0.0 if p is None else expected_count(p, valid, mirror[stage])
        rec["stages"].setdefault(stage, {})[kind] = {"observed": count(kernel, ref, mask, rel),
                                                     "model": round(float(model), 4), "n": int(mask.sum())}

    # each stage function applied to the kernel's own upstream stage: the stage's own arithmetic
    own_ref = {}
    if own["c1"] is not None:
        own_ref["c1"] = mirror["c1"]  # c1 has no upstream stage
        if own["c2"] is not None:
            own_ref["c2"] = fns.c2(own["c1"])
    if requant and own["c2_in"] is not None and own["c2"] is not None:
        own_ref["c2_in"] = fns.c2_in(own["c2"])
    upstream = own["c2_in"] if requant else own["c2"]
    if own["c3"] is not None and upstream is not None and (inputs.lora is None or own["c2"] is not None):
        own_ref["c3"] = fns.c3(upstream, own["c2"] if own["c2"] is not None else mirror["c2"])
    if BINS:
        rec["bins"] = binned(inputs, mirror, own, own_ref, per_stage, valid)
    if own["c2"] is not None and scheme.act_granularity in ("token", "token_group", "tensor_dynamic"):
        rec["amax"] = amax_flips(own["c2"], mirror["c2"], per_stage["p_c2"], valid, scheme.act_granularity)
    kout = exposed["out"].to(torch.float64)
    if "c1" in own_ref:
        put("c1", "own", own["c1"], own_ref["c1"], per_stage["p_c1"])
    if own["c2"] is not None:
        put("c2", "total", own["c2"], mirror["c2"], per_stage["p_c2"])
        if "c2" in own_ref:
            put("c2", "own", own["c2"], own_ref["c2"], per_stage["p_c2_own"])
    if requant and own["c2_in"] is not None:
        put("c2_in", "total", own["c2_in"], mirror["c2_in"], per_stage["p_c2_in"], CODE_REL)
        if "c2_in" in own_ref:
            put("c2_in", "own", own["c2_in"], own_ref["c2_in"], None, CODE_REL)
    if own["c3"] is not None:
        put("c3", "total", own["c3"], mirror["c3"], per_stage["p_c3"])
        if "c3" in own_ref:
            put("c3", "own", own["c3"], own_ref["c3"], per_stage["p_c3_direct"])
        put("out", "own", kout, fns.out(own["c3"]), None)
    rec["stages"].setdefault("out", {})["total"] = {
        "observed": count(kout, mirror["out"], torch.ones_like(kout, dtype=torch.bool)),
        "model": round(float(expected), 4), "n": kout.numel()}
    rec["count_allowed"] = int(allowed)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def amax_flips(kernel_c2, mirror_c2, p_c2, valid, granularity):
    """A dynamic scale follows its group's amax. The groups whose amax differs between the kernel's c2 and the
    mirror's (observed), beside the model's sum over groups of p_c2 at the mirror's argmax (the probability the
    gate gives the scale's move, ``rho_p``); also for the groups where that p is below 0.01 alone."""
    F64 = torch.float64
    m3 = valid[..., None].expand_as(mirror_c2)
    k = torch.where(m3, kernel_c2.to(F64).abs(), torch.zeros((), dtype=F64))
    m = torch.where(m3, mirror_c2.to(F64).abs(), torch.zeros((), dtype=F64))
    p = torch.where(m3, p_c2.to(F64), torch.zeros((), dtype=F64))
    if granularity == "tensor_dynamic":
        k, m, p = k.reshape(1, -1), m.reshape(1, -1), p.reshape(1, -1)
    else:
        width = 128 if granularity == "token_group" else m.shape[-1]
        cols = m.shape[-1] // width * width
        k, m, p = (t[..., :cols].reshape(-1, width) for t in (k, m, p))
    live = m.amax(-1) > 0
    k, m, p = k[live], m[live], p[live]
    arg = m.argmax(-1, keepdim=True)
    flipped = (k.amax(-1) != m.amax(-1)).to(F64)
    p_arg = torch.gather(p, -1, arg).squeeze(-1)
    low = p_arg < 0.01
    return {"groups": int(live.sum()), "observed": int(flipped.sum()), "model": round(float(p_arg.sum()), 4),
            "observed_low_p": int(flipped[low].sum()), "model_low_p": round(float(p_arg[low].sum()), 4),
            "groups_low_p": int(low.sum())}


BINS = False
BIN_EDGES = [2.0 ** k for k in range(-8, 4)]  # r = |mirror value| / s, s = sqrt(sum_k a_k^2 b_k^2) of its dot


def binned(inputs, mirror, own, own_ref, per_stage, valid):
    """Per stage (c1 own, c3 own): per bin of r = |c| / s, [elements, observed flips, model sum p]."""
    from moe_validate import tolerance as tol

    F64 = torch.float64
    out = {}
    rexp = mirror["route_expert"].long()
    m3 = valid[..., None]
    x = mirror["x"].to(F64)
    M, T = valid.shape
    edges = torch.tensor(BIN_EDGES, dtype=F64, device=x.device)
    wts = inputs.topk_weights.to(F64).abs()
    if inputs.apply_router_weight_on_input:
        wts = torch.ones_like(wts)
    jobs = []
    if "c1" in own_ref:
        s1, _ = tol._per_expert_gemm_scales(x[:, None, :].expand(M, T, x.shape[1]), mirror["w1"].to(F64), rexp, valid)
        jobs.append(("c1", own["c1"], own_ref["c1"], s1.sqrt(), per_stage["p_c1"]))
    if "c3" in own_ref and inputs.lora is None:  # s2 is GEMM2's scale, without the LoRA delta
        s2, _ = tol._per_expert_gemm_scales(mirror["c2_in"].to(F64), mirror["w2"].to(F64), rexp, valid)
        jobs.append(("c3", own["c3"], own_ref["c3"], s2.sqrt() * wts[..., None], per_stage["p_c3_direct"]))
    for name, kern, ref, scale, p in jobs:
        keep = m3.expand_as(ref) & torch.isfinite(ref) & (scale > 0)
        r = (ref.abs() / scale.clamp_min(1e-300))[keep]
        b = torch.bucketize(r, edges)
        flips = (kern != ref)[keep].to(F64)
        pk = p[keep]
        nb = len(BIN_EDGES) + 1
        out[name] = [torch.bincount(b, minlength=nb).tolist(),
                     torch.bincount(b, weights=flips, minlength=nb).round().long().tolist(),
                     [round(v, 3) for v in torch.bincount(b, weights=pk, minlength=nb).tolist()]]
    return out


def collect(args):
    from moe_validate.matrix import filter_cases, suite_cases
    from moe_validate.run.shards import fresh_seed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.time()
    cases = []
    for suite in args.suite:
        cases += suite_cases(suite)
    if args.filter:
        cases = filter_cases(cases, args.filter)
    done = 0
    with open(args.out, "a") as fh:
        for rep in args.reps:
            for case in cases:
                if time.time() - t_start > args.limit:
                    print(f"time limit: {done} runs", file=sys.stderr)
                    return
                run = case if rep == 0 else dataclasses.replace(case, seed=fresh_seed(case.seed, rep))
                try:
                    rec = measure(run, device)
                except Exception as exc:  # a crashing case is recorded, not fatal
                    rec = {"case_id": run.id, "error": f"{type(exc).__name__}: {exc}"[:400]}
                rec["repetition"] = rep
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                done += 1
    print(f"done: {done} runs in {time.time() - t_start:.0f} s", file=sys.stderr)


def summary(paths, by=("dtype", "scheme", "activation")):
    pooled = defaultdict(lambda: [0, 0.0, 0, 0])
    worst = defaultdict(float)
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            if "stages" not in rec or rec["dtype"] == "fp32":
                continue
            key = tuple(rec[b] for b in by)
            for stage, kinds in rec["stages"].items():
                for kind, v in kinds.items():
                    row = pooled[(stage, kind) + key]
                    row[0] += v["observed"]
                    row[1] += v["model"]
                    row[2] += v["n"]
                    row[3] += 1
                    if v["model"] >= 5:
                        worst[(stage, kind) + key] = max(worst[(stage, kind) + key], v["observed"] / v["model"])
            if "amax" in rec:
                for kind, (o, mdl) in {"all": ("observed", "model"), "low p": ("observed_low_p", "model_low_p")}.items():
                    row = pooled[("amax", kind) + key]
                    row[0] += rec["amax"][o]
                    row[1] += rec["amax"][mdl]
                    row[2] += rec["amax"]["groups"]
                    row[3] += 1
            if rec.get("count_allowed"):
                o = rec["stages"]["out"]["total"]["observed"]
                worst[("used", "of allowed") + key] = max(worst[("used", "of allowed") + key], o / rec["count_allowed"])
    print(f"{'stage':6} {'kind':6} {' '.join(by):40} {'runs':>5} {'observed':>9} {'model':>10} {'ratio':>7} {'worst':>6}")
    for k in sorted(pooled):
        obs, model, n, runs = pooled[k]
        ratio = obs / model if model > 0 else float("inf") if obs else 0.0
        print(f"{k[0]:6} {k[1]:6} {' '.join(map(str, k[2:])):40} {runs:5d} {obs:9d} {model:10.1f} {ratio:7.2f} "
              f"{worst.get(k, 0):6.2f}")
    for k in sorted(x for x in worst if x[0] == "used"):
        print("count used / allowed, worst:", " ".join(map(str, k[2:])), f"{worst[k]:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", action="append", default=[])
    ap.add_argument("--filter")
    ap.add_argument("--reps", type=int, nargs="+", default=[0])
    ap.add_argument("--limit", type=float, default=500.0)
    ap.add_argument("--out", default="rates.jsonl")
    ap.add_argument("--summary", nargs="+")
    ap.add_argument("--by", default="dtype,scheme,activation")
    ap.add_argument("--bins", action="store_true", help="also bin c1 and c3 own flips by |c| / s")
    a = ap.parse_args()
    if a.summary:
        summary(a.summary, tuple(a.by.split(",")))
    else:
        BINS = a.bins
        collect(a)
