"""``moe-validate tune``: pick a launch config per M bucket and write the table kernels read.

For one model shape and scheme, per M bucket: the candidates are a small grid for the bucket's
regime (routes per expert = M*topk/E: decode, small, middle, prefill; ``regime_candidates``; for
fp8_block128 the middle and prefill grids add BLOCK_N = 256, BLOCK_K = 128 shapes, which let
silu fuse its fp8 group quantization into GEMM1)
plus the config the kernels would pick without a table (so a tuned bucket never loses to the
default), filtered by the scheme's static rules (``kernels.configs.check_config``). Each is timed
with the bench timer (CUDA graph replays over rotated routing, median); a config that fails to
compile or launch is recorded and skipped. Then GEMM2 gets its own tiles: the fastest shared
config is timed again with each other schedule of the regime grid for GEMM2 alone
(``KernelConfig.gemm2``; BLOCK_M stays shared). Every candidate is CHECKED for correctness before
it is timed (``check_mode="every"``, the default): one case of the validation suite (same N and K,
``CHECK_E`` experts, top-``CHECK_TOPK``, ``check_m`` tokens, the config forced) through the Triton
backend against the float64 reference with the suite's own tolerance model; a candidate that fails
is rejected and never timed, so no timing of a wrong config is ever recorded and no bucket can
pick one. Correctness does not depend on M: each distinct config is checked once per run.
``check_mode="winners"`` (``tune --check winners``) checks only the fastest of each bucket, then
the next fastest if it fails: one check per distinct winner, for a quick re-tune of a grid that
was checked before. Either way only checked configs are written, into a JSON file named and laid
out exactly as ``kernels/configs.py`` reads it (``config_file_name(E, N, device, dtype, scheme)``,
top-level keys = M, plus ``_provenance``, which records the mode).

Everything is injectable for tests: ``timer(config, M) -> ms`` and ``check(config) -> (ok, why)``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from moe_validate.bench.timing import _first_line

__all__ = ["candidate_grid", "regime_candidates", "regime_of", "tune", "DEFAULT_TUNE_M", "CHECK_E", "CHECK_TOPK"]

DEFAULT_TUNE_M: Tuple[int, ...] = (1, 16, 64, 256, 1024, 4096, 16384)
CHECK_MODES = ("every", "winners")  # what tune checks against the reference: each candidate before timing, or winners
CHECK_E = 4  # experts in the correctness case: enough for several groups, cheap for the reference
CHECK_TOPK = 2
CHECK_M_GPU = 48  # ~24 routes per expert: partial tiles for BLOCK_M 16 .. 128


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per regime, from the H100 sweeps
# behind kernels/configs.py's defaults: decode is weight-streaming (narrow N tiles for many
# programs, deep K tiles and stages for bytes in flight), prefill is MMA-bound (128x256 tiles,
# 8 warps, swizzled groups). Configs that exceed shared memory fail to compile and are skipped.
_REGIMES: Tuple[Tuple[str, float, Tuple[Tuple[int, ...], ...]], ...] = (
    ("decode", 4, ((16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 64, 1, 4, 5),
                   (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3), (16, 32, 256, 1, 4, 3),
                   # More bytes in flight per SM for the H200's 1.4x bandwidth (its first tune,
                   # 2026-12-02: the deepest K tiles won M=1 and the GEMMs sat at 72-85% of the
                   # floor): deeper K tiles / more stages; BLOCK_K <= 128 ones for fp8_block128.
                   (16, 32, 512, 1, 4, 3), (16, 64, 256, 1, 4, 4), (16, 64, 128, 1, 4, 6), (16, 32, 128, 1, 4, 6))),
    ("small", 32, ((16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (32, 64, 128, 1, 4, 4),
                   (32, 128, 64, 1, 4, 4), (64, 64, 128, 1, 4, 3), (64, 128, 64, 1, 8, 4))),
    ("middle", 256, ((64, 128, 64, 1, 8, 4), (64, 128, 128, 8, 4, 3), (64, 256, 64, 8, 8, 3),
                     (128, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3))),
    ("prefill", float("inf"), ((128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 4),
                               (128, 128, 128, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 128, 8, 8, 3))),
)


# fp8_block128 with silu fuses its activation quantization into GEMM1 only where a program owns
# whole 128-column scale groups of c2, (BLOCK_N // 2) % 128 == 0 (kernels/experts.py); at prefill
# that saves c1's write and re-read (~4 GB, ~1.4 ms of 19.4 at Mixtral M=16384 on an H100). The
# shared grids above hold BLOCK_N = 256 shapes with BLOCK_K = 64 only; block-scaled fp8 prefers
# BLOCK_K = 128 (one scale block per K tile: one partial product per block), so these join the
# grids of that scheme alone. Other activations run them as plain BLOCK_N = 256 configs.
_FP8_GROUP_FUSION: Dict[str, Tuple[Tuple[int, ...], ...]] = {
    "middle": ((64, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3)),
    "prefill": ((64, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4)),
}


def regime_of(M: int, E: int, topk: int) -> str:
    """decode / small / middle / prefill by routes per expert (M*topk/E)."""
    rpe = M * topk / max(E, 1)
    for name, upper, _ in _REGIMES:
        if rpe <= upper:
            return name
    return _REGIMES[-1][0]  # pragma: no cover - the last bound is infinite


def _runnable(configs, scheme, on_gpu: bool) -> List[Any]:
    """``configs`` that pass the scheme's static rules (``check_config``), first occurrences only."""
    from kernels.configs import check_config

    out = []
    for cfg in configs:
        try:
            check_config(cfg, scheme, on_gpu=on_gpu)
        except ValueError:
            continue
        if cfg not in out:
            out.append(cfg)
    return out


def _configs(shapes, scheme, on_gpu: bool) -> List[Any]:
    from kernels.configs import KernelConfig

    return _runnable((KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=st)
                      for bm, bn, bk, gm, w, st in shapes), scheme, on_gpu)


def regime_candidates(scheme, regime: str, *, on_gpu: bool = True) -> List[Any]:
    """The grid of one regime, filtered by the scheme's static rules."""
    from moe_validate.contract.spec import QuantScheme

    s = QuantScheme.parse(scheme)
    for name, _, shapes in _REGIMES:
        if name == regime:
            if s is QuantScheme.FP8_BLOCK128:
                shapes = tuple(shapes) + _FP8_GROUP_FUSION.get(name, ())
            return _configs(shapes, s, on_gpu)
    raise ValueError(f"regime must be one of {[r[0] for r in _REGIMES]}; got {regime!r}")


def candidate_grid(scheme, *, on_gpu: bool = True, small: bool = True) -> List[Any]:
    """KernelConfigs to try, filtered by the scheme's static rules (``check_config``): the union
    of the regime grids (``small``), or a full cross product of tile sizes."""
    from moe_validate.contract.spec import QuantScheme

    s = QuantScheme.parse(scheme)
    if small:
        shapes = [shape for _, _, grid in _REGIMES for shape in grid]
        if s is QuantScheme.FP8_BLOCK128:
            shapes += [shape for grid in _FP8_GROUP_FUSION.values() for shape in grid]
    else:
        shapes = [(bm, bn, bk, gm, w, st) for bm in (16, 32, 64, 128) for bn in (64, 128, 256) for bk in (64, 128)
                  for gm in (1, 8) for w in (4, 8) for st in (3, 4)]
    return _configs(shapes, s, on_gpu)


def gemm2_variants(best, scheme, regime: str, *, on_gpu: bool = True) -> List[Any]:
    """``best`` with GEMM2 given each other tile schedule of the regime's grid (BLOCK_M stays
    ``best``'s: both GEMMs share the alignment). GEMM2's N is the hidden size and its K is I,
    a different shape from GEMM1's, so its best tiles often differ."""
    from dataclasses import replace

    from kernels.configs import Gemm2Tiles
    from moe_validate.contract.spec import QuantScheme

    s = QuantScheme.parse(scheme)
    variants = (replace(best, gemm2=Gemm2Tiles(BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M,
                                               num_warps=c.num_warps, num_stages=c.num_stages))
                for c in regime_candidates(s, regime, on_gpu=on_gpu))
    # A variant whose GEMM2 launch equals ``best``'s own is ``best`` again: not worth a timing.
    return _runnable((v for v in variants if v.for_gemm2() != best.for_gemm2()), s, on_gpu)


def check_candidate(model, scheme: str, cfg, *, check_m: int = CHECK_M_GPU, seed: int = 0,
                    _cache: Optional[Dict[str, Any]] = None) -> Tuple[bool, str]:
    """Run one validation case with ``cfg`` forced through the Triton backend and judge it with
    the suite's evaluation (reference mirror gate + exact budget); (passed, outcome and reason).

    ``_cache`` (a dict) keeps the generated inputs between candidates: they depend on the case
    without its config, and generating full-size weights on the host costs seconds.
    """
    from moe_validate.backends import TritonBackend
    from moe_validate.compare import evaluate
    from moe_validate.inputs import make_inputs
    from moe_validate.matrix import Case, config_token
    from moe_validate.runner import default_device

    case = Case(M=check_m, N=model.N, K=model.K, E=min(model.E, CHECK_E), topk=min(model.topk, CHECK_TOPK),
                dtype="bf16", scheme=scheme, activation=model.activation, seed=seed)
    ok, why = case.is_valid()
    if not ok:
        return False, f"check case invalid: {why}"
    backend = TritonBackend(config=cfg)  # forced: per-GEMM tiles have no case-id spelling
    ok, why = backend.supports(case)
    if not ok:
        return False, f"SKIP {case.id}: {why}"
    cache = _cache if _cache is not None else {}
    key = f"{case.M},{case.N},{case.K},{case.E},{case.topk},{scheme},{case.activation},{seed}"
    if cache.get("key") != key:
        cache.clear()
        cache["key"], cache["inputs"] = key, make_inputs(case, device=default_device())
    inputs = cache["inputs"]
    try:
        out = backend.run(inputs, case)
        if out.is_cuda:
            import torch

            torch.cuda.synchronize()  # an asynchronous fault belongs to this candidate
        ev = evaluate(case, inputs, out)
    except Exception as exc:
        return False, f"CRASH {case.id}: {_first_line(exc)}"
    label = f"{case.id} with config {config_token(cfg)}"
    return ev.passed, f"{'PASS' if ev.passed else 'FAIL'} {label}" + (f": {ev.reason}" if ev.reason else "")


def gpu_timer(model, scheme: str, *, routing_sets: int = 8, target_ms: float = 40.0, min_reps: int = 8,
              max_reps: int = 100, device: str = "cuda") -> Callable[[Any, int], float]:
    """A timer(config, M) -> median ms of ``kernels.fused_experts`` with the config forced
    (one CUDA graph per routing set, rotated between replays; the bench's method)."""
    import torch

    import kernels
    from moe_validate.bench.timing import _Timed, make_bench_weights, make_routing_sets

    w1, w2, quant = make_bench_weights(model, scheme, device)
    cache: Dict[int, Any] = {}

    def timer(cfg, M: int) -> float:
        if M not in cache:
            sets = make_routing_sets(M, model, routing_sets, device, seed=M)
            x = torch.randn(M, model.K, dtype=torch.bfloat16, device=device)
            cache.clear()
            cache[M] = (sets, x)
        sets, x = cache[M]

        def call(ids, w):
            return kernels.fused_experts(x, w1, w2, w, ids, activation=model.activation, quant=quant, config=cfg)

        t = _Timed("triton", call, sets, use_graph=device != "cpu")
        t.timed(2)
        est = max(min(t.times), 1e-3)
        t.times.clear()
        t.timed(int(max(min_reps, min(max_reps, target_ms / est))))
        return statistics.median(t.times)

    return timer


def _record_device_facts(directory: Path, facts) -> None:
    """Merge ``facts`` (a DeviceFacts) into ``directory/devices.json``: the sibling fallback's data."""
    from kernels.configs import DEVICES_FILE

    path = directory / DEVICES_FILE
    doc: Dict[str, Any] = {}
    if path.exists():
        doc = json.loads(path.read_text())
    doc.setdefault("_about", "device facts of the tuned tables beside this file (kernels.configs.DeviceFacts): "
                             "a GPU with no table of its own borrows the one of the same capability, nearest SM count")
    doc[facts.name] = facts.to_dict()
    ordered = {k: doc[k] for k in sorted(doc, key=lambda k: (not k.startswith("_"), k))}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(tmp, path)


def tune(model, scheme: str, m_list: Sequence[int] = DEFAULT_TUNE_M, *, out_dir: Optional[str] = None,
         device_name: Optional[str] = None, timer: Optional[Callable[[Any, int], float]] = None,
         check: Optional[Callable[[Any], Tuple[bool, str]]] = None, candidates: Optional[List[Any]] = None,
         command: str = "", check_m: Optional[int] = None, gemm2: Optional[bool] = None,
         device_facts: Optional[Any] = None, check_mode: str = "every",
         log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Tune and write the table; returns {"path", "table", "provenance"}.

    Merges into an existing file of the same name in ``out_dir`` (buckets not tuned now are
    kept). The device's facts (``device_facts``, a ``kernels.configs.DeviceFacts``; default: the
    current GPU's when it is the tuned device) go into ``devices.json`` beside the table, so that
    a sibling GPU without tables of its own can borrow this one's. Raises ValueError for bad arguments and RuntimeError when no candidate passes the
    correctness check.
    """
    import torch

    from kernels.configs import CONFIG_DIR, config_file_name, current_device_facts, untuned_config
    from moe_validate.contract.rules import interpreting
    from moe_validate.contract.spec import QuantScheme
    from moe_validate.env import capture_env
    from moe_validate.matrix import config_token

    s = QuantScheme.parse(scheme, name="--scheme")
    if check_mode not in CHECK_MODES:
        raise ValueError(f"check_mode must be one of {list(CHECK_MODES)}; got {check_mode!r}")
    if not m_list or any((not isinstance(m, int)) or m < 1 for m in m_list):
        raise ValueError(f"m_list must be positive integers; got {list(m_list)}")
    on_gpu = torch.cuda.is_available() and not interpreting()
    if device_name is None:
        if not on_gpu:
            raise ValueError("device_name is required without a CUDA GPU (the table is keyed by the device name)")
        device_name = torch.cuda.get_device_name()
    if timer is None:
        if not on_gpu:
            raise ValueError("timer is required without a CUDA GPU (timings under the interpreter mean nothing)")
        timer = gpu_timer(model, s.value)
    if check is None:
        cm = check_m if check_m is not None else CHECK_M_GPU
        inputs_cache: Dict[str, Any] = {}

        def check(cfg):
            return check_candidate(model, s.value, cfg, check_m=cm, _cache=inputs_cache)

    def candidates_for(M: int) -> List[Any]:
        if candidates is not None:
            return list(candidates)
        own = regime_candidates(s, regime_of(M, model.E, model.topk), on_gpu=on_gpu)
        default = untuned_config(M, model.E, model.N, model.K, model.topk, torch.bfloat16, s)
        return own + ([default] if default not in own else [])

    checked: Dict[str, Tuple[bool, str]] = {}

    def passes_check(cfg) -> bool:
        tok = config_token(cfg)
        if tok not in checked:
            try:
                checked[tok] = check(cfg)
            except Exception as exc:
                checked[tok] = (False, f"check raised {type(exc).__name__}: {exc}")
            log(f"check {tok}: {'ok' if checked[tok][0] else 'REJECTED'} ({checked[tok][1]})")
        return checked[tok][0]

    results: Dict[str, Any] = {}
    table: Dict[int, Dict[str, int]] = {}
    for M in m_list:
        cands = candidates_for(M)
        if not cands:
            raise ValueError(f"no candidate config satisfies the rules of scheme {s.value}")
        timings: List[Tuple[float, int, Any]] = []
        errors: Dict[str, str] = {}

        def time_each(configs, note: str = "") -> None:
            for cfg in configs:
                tok = config_token(cfg)
                if tok in checked and not checked[tok][0]:
                    continue  # rejected by the correctness check at an earlier bucket
                if check_mode == "every" and not passes_check(cfg):
                    continue  # a wrong config is never timed
                try:
                    ms = float(timer(cfg, M))
                except Exception as exc:  # a config that fails to compile or launch is skipped, not fatal
                    errors[tok] = _first_line(exc)
                    log(f"M={M} {tok}: failed ({errors[tok]})")
                    continue
                timings.append((ms, len(timings), cfg))  # ties go to the earlier candidate
                log(f"M={M} {tok}: {ms:.4f} ms{note}")
            timings.sort(key=lambda t: (t[0], t[1]))

        time_each(cands)
        # Stage 2: GEMM2's own tiles around the fastest shared config (default: when the
        # candidates are the regime grids; explicit candidates are timed as given).
        if timings and (gemm2 if gemm2 is not None else candidates is None):
            base_ms, base = timings[0][0], timings[0][2]
            time_each(gemm2_variants(base, s, regime_of(M, model.E, model.topk), on_gpu=on_gpu),
                      f" (shared config {base_ms:.4f} ms)")
        best = None
        for ms, _, cfg in timings:  # fastest first (in "every" mode all of them passed already)
            if passes_check(cfg):
                best = (ms, cfg)
                break
        if best is None:
            results[str(M)] = {"error": "no candidate ran and passed the check", "errors": errors}
            continue
        best_ms, best_cfg = best
        table[M] = best_cfg.to_dict()
        results[str(M)] = {"regime": regime_of(M, model.E, model.topk), "best": config_token(best_cfg),
                           "best_ms": best_ms, "timed": {config_token(c): t for t, _, c in timings},
                           "errors": errors}
    if not table:
        raise RuntimeError(f"tune found no usable config: checks {checked}; results {results}")

    env = capture_env()
    provenance = {
        "device": device_name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": env.get("torch"), "triton": env.get("triton"), "commit": env.get("commit"),
        "kernels_digest": env.get("kernels_digest"),
        "shape": {"E": model.E, "N": model.N, "K": model.K, "I": model.I, "topk": model.topk,
                  "activation": model.activation, "scheme": s.value},
        "method": ("per M: the regime's candidates and the untuned default, each checked against the float64 "
                   "reference (validation-suite case, config forced) before it is timed (median of CUDA-graph "
                   "replays over rotated routing sets); the fastest checked one wins" if check_mode == "every" else
                   "per M: the regime's candidates and the untuned default timed (median of CUDA-graph replays "
                   "over rotated routing sets); the fastest checked against the float64 reference "
                   "(validation-suite case, config forced), the next fastest if it fails"),
        "check_mode": check_mode,
        "rejected": {k: v[1] for k, v in checked.items() if not v[0]},
        "results": results,
    }
    directory = Path(out_dir) if out_dir else Path(CONFIG_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16  # the storage dtype S the kernels look the table up with
    path = directory / config_file_name(model.E, model.N, device_name, dtype, s)
    merged: Dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            merged.update({k: v for k, v in old.items() if not k.startswith("_")})
            if "_provenance" in old:
                provenance["previous_provenance"] = old["_provenance"]
        except (OSError, ValueError):
            pass
    merged.update({str(m): cfg for m, cfg in table.items()})
    ordered = {"_provenance": provenance}
    ordered.update({k: merged[k] for k in sorted(merged, key=int)})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(tmp, path)
    if device_facts is None and on_gpu:
        current = current_device_facts()
        device_facts = current if current is not None and current.name == device_name else None
    if device_facts is not None:
        _record_device_facts(directory, device_facts)
    from kernels.configs import _load_devices, _load_table

    _load_table.cache_clear()  # this process may have looked these files up before they were written
    _load_devices.cache_clear()
    return {"path": str(path), "table": table, "provenance": provenance}
