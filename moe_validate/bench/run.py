"""One bench run: each (model, scheme, M) row group timed for ours and the peers, interleaved in
rounds, with errors and skips recorded per row (``run_bench``).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from moe_validate.bench.models import OURS, SCHEME_ALIASES, ModelShape
from moe_validate.bench.output import BENCH_KIND, BENCH_SCHEMA_VERSION
from moe_validate.bench.roofline import (DECODE_MAX_M, PREFILL_MIN_M, attach_ratios, call_flops, derive_metrics,
                                         floor_bytes, regime, summarize, timing_stats)
from moe_validate.bench.timing import (_Timed, _first_line, make_bench_weights, make_routing_sets, measure_ceilings,
                                       profile_kernels, unique_experts)


# The reference computes in float64 with a Python loop over experts: seconds per call at large
# M. It is a correctness anchor, shown for scale only at small M.
REFERENCE_MAX_M = 16


def _rel_fro(a, b) -> float:
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _reference_fits(model: ModelShape, scheme: str) -> Tuple[bool, str]:
    """The reference dequantizes all weights to float64 (about 3 copies of 8 bytes/element at
    the peak for block scales, 2 otherwise): refuse when that exceeds 80% of free memory."""
    import torch

    from moe_validate.contract.spec import QuantScheme

    elems = model.E * (model.N * model.K + model.K * model.I)
    need = elems * 8 * (3 if QuantScheme.parse(scheme).block_shape else 2)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        return False, (f"the float64 reference needs ~{need / 2**30:.0f} GiB for this model's weights; "
                       f"{free / 2**30:.0f} GiB free")
    return True, ""


def _base_row(model: ModelShape, scheme: str, M: int, backend: str) -> Dict[str, Any]:
    from moe_validate.contract.spec import QuantScheme

    label = {v: k for k, v in SCHEME_ALIASES.items()}.get(scheme, scheme)
    return {"model": model.name, "scheme": scheme, "scheme_label": label,
            "dtype": "bfloat16", "weight_dtype": "float8_e4m3fn" if QuantScheme.parse(scheme).is_fp8 else "bfloat16",
            "M": M, "E": model.E, "topk": model.topk, "K": model.K, "I": model.I, "N": model.N,
            "activation": model.activation, "regime": regime(M), "backend": backend,
            "status": "ok", "reason": None, "timing": None, "config": None, "check": None,
            "bytes": None, "flops": call_flops(M, model), "unique_experts": None, "routing_sets": 0,
            "intensity": None, "floor_ms": None, "floor_bound": None, "tflops": None, "gbps": None,
            "fraction_of_floor": None, "ratio_vs_ours": None}


def _bench_row_group(model, scheme, M, backends, weights, ceilings, args, log) -> List[Dict[str, Any]]:
    """All backends of one (model, scheme, M): capture, check, interleaved timing, metrics."""
    import torch

    import kernels
    from moe_validate.peers import peer_scheme_support, torch_grouped_experts
    from moe_validate.contract.spec import QuantScheme

    device = args.get("device", "cuda")  # "cpu" only in the plumbing test (fake CUDA timing)
    w1, w2, quant = weights
    sets = make_routing_sets(M, model, args["routing_sets"], device, seed=M)
    uniq = [unique_experts(ids) for ids, _ in sets]
    mean_unique = sum(uniq) / len(uniq)
    x = torch.randn(M, model.K, dtype=torch.bfloat16, device=device)
    rows: Dict[str, Dict[str, Any]] = {}
    timed: Dict[str, _Timed] = {}
    nbytes = floor_bytes(M, model, scheme, mean_unique)
    flops = call_flops(M, model)
    for b in backends:
        row = _base_row(model, scheme, M, b)
        row.update(bytes=nbytes, flops=flops, unique_experts=mean_unique, routing_sets=len(sets))
        rows[b] = row
        try:
            if b == OURS:
                experts = kernels.TritonExperts(quant)
                if not experts.supports_quant_scheme(*QuantScheme.parse(scheme).quant_keys):
                    raise _Unsupported(f"TritonExperts does not support {scheme} on this device")

                def call(ids, w):
                    return kernels.fused_experts(x, w1, w2, w, ids, activation=model.activation, quant=quant)

                from kernels.configs import lookup_config

                config, source = lookup_config(M, model.E, model.N, model.K, model.topk, torch.bfloat16, scheme)
                row["config"], row["config_source"] = config.to_dict(), source.to_dict()
                timed[b] = _Timed(b, call, sets, use_graph=True)
            elif b == "torch-grouped":
                ok, why = peer_scheme_support(scheme, device)
                if not ok:
                    raise _Unsupported(why)

                def call(ids, w):
                    return torch_grouped_experts(x, w1, w2, w, ids, activation=model.activation, quant=quant)

                timed[b] = _Timed(b, call, sets, use_graph=True)
            elif b == "reference":
                if M > args["reference_max_m"]:
                    raise _Skipped(f"reference rows are capped at M <= {args['reference_max_m']} (float64, slow)")
                ok, why = _reference_fits(model, scheme)
                if not ok:
                    raise _Unsupported(why)
                import reference

                def call(ids, w):
                    return reference.fused_experts(x, w1, w2, w, ids, activation=model.activation,
                                                   quant=quant, precision="mirror", out_dtype=torch.bfloat16)

                timed[b] = _Timed(b, call, sets, use_graph=False)
                timed[b].method = "eager+events (host-synchronising float64 reference, no graph)"
        except _Unsupported as exc:
            row["status"], row["reason"] = "unsupported", str(exc)
        except _Skipped as exc:
            row["status"], row["reason"] = "skipped", str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            row["status"], row["reason"] = "error", "OOM: " + _first_line(exc)
            torch.cuda.empty_cache()
        except Exception as exc:
            row["status"], row["reason"] = "error", _first_line(exc)
            log(traceback.format_exc())
            torch.cuda.synchronize()

    # Correctness cross-check on one routing set: every live backend against ours (or the
    # reference, when ours is not live). A fast wrong result must not look like a win.
    try:
        outs = {}
        for b, t in timed.items():
            t.load_next()
            outs[b] = t.run_once().clone()
        torch.cuda.synchronize()
        anchor = "reference" if "reference" in outs else (OURS if OURS in outs else None)
        for b, out in outs.items():
            nan = bool(torch.isnan(out).any())
            check = {"nan": nan}
            if anchor is not None and b != anchor:
                check[f"rel_fro_vs_{anchor}"] = _rel_fro(out, outs[anchor])
            if OURS in outs and b not in (OURS, anchor):
                check[f"rel_fro_vs_{OURS}"] = _rel_fro(out, outs[OURS])
            rows[b]["check"] = check
    except Exception as exc:
        log(f"cross-check failed for {model.name} {scheme} M={M}: {_first_line(exc)}")

    # Interleaved timing: estimate each backend's time, then rounds over all backends.
    live = dict(timed)
    reps: Dict[str, int] = {}
    for b, t in list(live.items()):
        try:
            probe = []
            for _ in range(2 if b != "reference" else 1):
                t.load_next()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t.run_once()
                end.record()
                torch.cuda.synchronize()
                probe.append(start.elapsed_time(end))
            est = max(min(probe), 1e-3)
            if b == "reference":
                reps[b] = max(1, min(args["reference_reps"], int(args["target_ms"] / est)))
            else:
                reps[b] = int(max(args["min_reps"], min(args["max_reps"], args["target_ms"] / est)))
        except Exception as exc:
            rows[b]["status"], rows[b]["reason"] = "error", _first_line(exc)
            live.pop(b)
            torch.cuda.synchronize()
    rounds = args["rounds"]
    for r in range(rounds):
        for b, t in list(live.items()):
            n = max(1, reps[b] // rounds + (1 if r < reps[b] % rounds else 0))
            try:
                t.timed(n)
            except Exception as exc:
                rows[b]["status"], rows[b]["reason"] = "error", _first_line(exc)
                live.pop(b)
                torch.cuda.synchronize()
    for b, t in timed.items():
        if rows[b]["status"] == "ok" and t.times:
            rows[b]["timing"] = {**timing_stats(t.times), "method": t.method, "rounds": rounds}
            if args.get("profile") and b == OURS:
                try:
                    rows[b]["profile"] = profile_kernels(t)
                except Exception as exc:  # a profiler failure costs the breakdown, not the row
                    rows[b]["profile"] = {"error": _first_line(exc)}
                    torch.cuda.synchronize()
        elif rows[b]["status"] == "ok":
            rows[b]["status"], rows[b]["reason"] = "error", "no timings recorded"
    for row in rows.values():
        derive_metrics(row, ceilings)
    del timed
    return list(rows.values())


class _Unsupported(Exception):
    pass


class _Skipped(Exception):
    pass


def _gpu_ready() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        return False, f"torch unavailable: {exc}"
    if not torch.cuda.is_available():
        return False, "bench needs a CUDA GPU (Triton timings under the CPU interpreter are meaningless)"
    from moe_validate.contract.rules import interpreting

    if interpreting():
        return False, "TRITON_INTERPRET=1 is set: bench times native kernels only; unset it on a GPU machine"
    return True, ""


def run_bench(models: Sequence[ModelShape], schemes: Sequence[str], m_list: Sequence[int],
              peers: Sequence[str], *, argv: Optional[List[str]] = None, time_budget_s: float = float("inf"),
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              settings: Optional[Dict[str, Any]] = None, ceilings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the benchmark and return the bench document (see ``write_bench`` for the files)."""
    from moe_validate.env import capture_env

    args = {"routing_sets": 8, "target_ms": 150.0, "min_reps": 10, "max_reps": 200, "rounds": 3,
            "reference_max_m": REFERENCE_MAX_M, "reference_reps": 3}
    args.update(settings or {})
    started = time.monotonic()
    doc: Dict[str, Any] = {
        "kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv or []), "env": capture_env(),
        "settings": {**args, "models": [m.to_dict() for m in models], "schemes": list(schemes),
                     "m_list": list(m_list), "peers": list(peers), "time_budget_s": time_budget_s,
                     "fp8_tensor_means": "fp8_tensor_token",
                     "regimes": {"decode_max_m": DECODE_MAX_M, "prefill_min_m": PREFILL_MIN_M}},
        "ceilings": {}, "rows": [], "notes": [
            "floor = max(bytes/bandwidth, flops/rate); bytes = unique experts hit (mean over routing sets) x "
            "bytes per expert (incl. scales) + x in + out + routing tensors",
            f"reference rows only at M <= {args['reference_max_m']} (float64, host-synchronising, slow)",
            "ratio_vs_ours = peer median / our median on the same row (> 1: ours is faster)",
        ],
    }
    ok, why = _gpu_ready()
    if not ok:
        doc["error"] = why
        for model in models:
            for scheme in schemes:
                for M in m_list:
                    for b in [OURS, *peers]:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="unsupported", reason=why, bytes=None, flops=call_flops(M, model),
                                   intensity=None, floor_ms=None, floor_bound=None, tflops=None, gbps=None,
                                   fraction_of_floor=None, unique_experts=None, routing_sets=0)
                        doc["rows"].append(row)
        attach_ratios(doc["rows"])
        doc["summary"] = summarize(doc["rows"])
        return doc

    import torch

    log("measuring ceilings ...")
    doc["ceilings"] = ceilings if ceilings is not None else measure_ceilings("cuda")
    log(f"ceilings: {json.dumps({k: v for k, v in doc['ceilings'].items() if k != 'method'})}")
    backends = [OURS, *peers]
    for model in models:
        for scheme in schemes:
            rows_of_pair = []
            if scheme not in model.schemes:
                for M in m_list:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="skipped", reason=f"{model.name} is benchmarked in {', '.join(model.schemes)} only"
                                   + (f" ({model.note})" if model.note else ""), bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        rows_of_pair.append(row)
                doc["rows"].extend(rows_of_pair)
                continue
            weights = None
            try:
                log(f"{model.name} {scheme}: generating weights ...")
                weights = make_bench_weights(model, scheme, args.get("device", "cuda"))
            except Exception as exc:
                reason = ("OOM: " if isinstance(exc, torch.cuda.OutOfMemoryError) else "") + _first_line(exc)
                for M in m_list:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="error", reason=f"weights: {reason}", bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        doc["rows"].append(row)
                torch.cuda.empty_cache()
                continue
            for M in m_list:
                if time.monotonic() - started > time_budget_s:
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="skipped", reason=f"time budget of {time_budget_s:.0f}s spent",
                                   bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        doc["rows"].append(row)
                    continue
                t0 = time.monotonic()
                try:
                    rows = _bench_row_group(model, scheme, M, backends, weights, doc["ceilings"], args, log)
                except Exception as exc:  # a failure of one row group is a recorded outcome
                    log(traceback.format_exc())
                    rows = []
                    for b in backends:
                        row = _base_row(model, scheme, M, b)
                        row.update(status="error", reason=_first_line(exc), bytes=None, flops=call_flops(M, model))
                        derive_metrics_safe(row, doc["ceilings"])
                        rows.append(row)
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception:
                        pass
                doc["rows"].extend(rows)
                brief = ", ".join(f"{r['backend']}={_fmt_ms(r)}" for r in rows)
                log(f"{model.name} {scheme} M={M}: {brief} ({time.monotonic() - t0:.1f}s)")
            del weights
            torch.cuda.empty_cache()
    attach_ratios(doc["rows"])
    doc["summary"] = summarize(doc["rows"])
    doc["duration_s"] = time.monotonic() - started
    return doc


def derive_metrics_safe(row: Dict[str, Any], ceilings: Dict[str, Any]) -> None:
    """Metrics for a row without a measurement (bytes unknown): every derived field None."""
    for key in ("intensity", "floor_ms", "floor_bound", "tflops", "gbps", "fraction_of_floor"):
        row.setdefault(key, None)
    row.setdefault("unique_experts", None)
    row.setdefault("routing_sets", 0)


def _fmt_ms(row: Dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['timing']['median_ms']:.3f}ms"
