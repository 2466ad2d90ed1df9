"""CPU tests of `moe-validate bench` / `tune`: arithmetic, summaries, the torch-grouped peer,
the JSON document, the HTML section, the tuned-table round trip and CLI bad input.

GPU timing itself is not exercised here (it needs a device); everything around it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moe_validate import bench
from moe_validate.bench import ModelShape
from moe_validate.bench import run as bench_run
from moe_validate.bench import timing as bench_timing
from moe_validate.contract.rules import interpreting

MIXTRAL = bench.MODELS["mixtral-8x7b"]
DEEPSEEK = bench.MODELS["deepseek-v3"]


# ---------------------------------------------------------------------------------------------
# floor / roofline arithmetic, pinned with hand numbers
# ---------------------------------------------------------------------------------------------
def test_expert_bytes_hand_numbers():
    # Mixtral bf16: w1 [28672, 4096] + w2 [4096, 14336], 2 bytes each:
    # (117,440,512 + 58,720,256) * 2 = 352,321,536 bytes.
    assert MIXTRAL.N == 28672
    assert bench.expert_weight_bytes(MIXTRAL, "none") == 352_321_536
    # DeepSeek-V3 fp8_block128: elements 4096*7168 + 7168*2048 = 44,040,192 (1 byte each);
    # scales (4096/128)*(7168/128) + (7168/128)*(2048/128) = 32*56 + 56*16 = 2688 fp32 = 10,752 B.
    assert bench.expert_weight_bytes(DEEPSEEK, "fp8_block128") == 44_040_192 + 10_752
    # per-expert (tensor) scales: one fp32 each for w1 and w2.
    assert bench.expert_weight_bytes(DEEPSEEK, "fp8_tensor_token") == 44_040_192 + 8
    # per-channel: N + K scales.
    assert bench.expert_weight_bytes(DEEPSEEK, "fp8_channel_token") == 44_040_192 + 4 * (4096 + 7168)


def test_flops_bytes_intensity_and_floor_hand_numbers():
    # FLOPs per token for Mixtral: 2 * topk * (N*K + K*I) = 2 * 2 * 176,160,768 = 704,643,072.
    assert bench.call_flops(1, MIXTRAL) == 704_643_072
    assert bench.call_flops(3, MIXTRAL) == 3 * 704_643_072
    # M = 1 hitting 2 experts: weights 2 * 352,321,536 + x in and out 2 * 4096 * 2 + ids and
    # weights 2 * (4 + 4) = 704,643,072 + 16,384 + 16.
    nbytes = bench.floor_bytes(1, MIXTRAL, "none", unique_experts=2)
    assert nbytes == 704_659_472
    assert bench.call_flops(1, MIXTRAL) / nbytes == pytest.approx(0.9999767, rel=1e-6)
    # 3 TB/s and 1 PFLOP/s: memory 704,659,472 / 3e12 = 234.886 us, compute 0.705 us -> memory bound.
    t, bound = bench.floor_seconds(nbytes, bench.call_flops(1, MIXTRAL), 3e12, 1e15)
    assert bound == "memory" and t == pytest.approx(704_659_472 / 3e12)
    # Prefill M=16384 with all 8 experts hit: flops 1.1545e13 / 1e15 = 11.5 ms > bytes 2.82e9 / 3e12.
    nb = bench.floor_bytes(16384, MIXTRAL, "none", unique_experts=8)
    t, bound = bench.floor_seconds(nb, bench.call_flops(16384, MIXTRAL), 3e12, 1e15)
    assert bound == "compute" and t == pytest.approx(16384 * 704_643_072 / 1e15)
    with pytest.raises(ValueError, match="positive"):
        bench.floor_seconds(1, 1, 0, 1)


def test_expected_unique_experts():
    assert bench.expected_unique_experts(8, 2, 1) == pytest.approx(2.0)  # one token: exactly topk
    assert bench.expected_unique_experts(256, 8, 1) == pytest.approx(8.0)
    # two tokens: 8 * (1 - (3/4)^2) = 3.5
    assert bench.expected_unique_experts(8, 2, 2) == pytest.approx(3.5)
    assert bench.expected_unique_experts(8, 2, 10_000) == pytest.approx(8.0)


def test_derive_metrics_fraction_of_floor():
    row = bench_run._base_row(MIXTRAL, "none", 1, "triton")
    row.update(bytes=1e9, flops=2e12, timing={"median_ms": 2.0})
    bench.derive_metrics(row, {"bandwidth_GBps": 1000.0, "bf16_tflops": 500.0, "fp8_tflops": 1000.0})
    # memory 1e9 / 1e12 = 1 ms; compute 2e12 / 5e14 = 4 ms -> floor 4 ms compute-bound; 2 ms measured
    # would beat the floor: fraction 2.0 (a sign of a wrong ceiling, shown as is).
    assert row["floor_bound"] == "compute" and row["floor_ms"] == pytest.approx(4.0)
    assert row["fraction_of_floor"] == pytest.approx(2.0)
    assert row["tflops"] == pytest.approx(1000.0) and row["gbps"] == pytest.approx(500.0)
    assert row["intensity"] == pytest.approx(2000.0)
    fp8 = bench_run._base_row(MIXTRAL, "fp8_block128", 1, "triton")
    fp8.update(bytes=1e9, flops=2e12, timing={"median_ms": 8.0})
    bench.derive_metrics(fp8, {"bandwidth_GBps": 1000.0, "bf16_tflops": 500.0, "fp8_tflops": 1000.0})
    assert fp8["floor_ms"] == pytest.approx(2.0) and fp8["floor_bound"] == "compute"  # fp8 rate used
    assert fp8["fraction_of_floor"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# regimes, geometric means, percentiles, summaries
# ---------------------------------------------------------------------------------------------
def test_regime_boundaries():
    assert [bench.regime(m) for m in (1, 64, 65, 4095, 4096, 16384)] == [
        "decode", "decode", "middle", "middle", "prefill", "prefill"]


def test_geomean_and_percentile():
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert bench.geomean([2.0, 8.0, 4.0]) == pytest.approx(4.0)
    assert bench.geomean([]) is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            bench.geomean([1.0, bad])
    vals = [float(v) for v in range(1, 11)]  # 1..10
    assert bench.percentile(vals, 50) == pytest.approx(5.5)
    assert bench.percentile(vals, 10) == pytest.approx(1.9)  # position 0.9 between 1 and 2
    assert bench.percentile(vals, 90) == pytest.approx(9.1)
    stats = bench.timing_stats([3.0, 1.0, 2.0])
    assert stats["median_ms"] == 2.0 and stats["min_ms"] == 1.0 and stats["reps"] == 3


def _row(backend, M, median, status="ok", scheme="none", model="m"):
    r = {"model": model, "scheme": scheme, "M": M, "backend": backend, "status": status,
         "timing": {"median_ms": median} if status == "ok" else None}
    return r


def test_ratios_and_summary_per_regime():
    rows = [
        _row("triton", 1, 1.0), _row("torch-grouped", 1, 2.0),      # decode ratio 2
        _row("triton", 16, 1.0), _row("torch-grouped", 16, 8.0),    # decode ratio 8
        _row("triton", 256, 2.0), _row("torch-grouped", 256, 1.0),  # middle ratio 0.5
        _row("triton", 4096, 4.0), _row("torch-grouped", 4096, 4.0, status="unsupported"),
        _row("triton", 16384, 1.0, status="error"), _row("torch-grouped", 16384, 3.0),  # no ratio
    ]
    for r in rows:
        r["fraction_of_floor"] = 0.5 if r["backend"] == "triton" and r["status"] == "ok" else None
        r["floor_ms"] = 0.5  # the same floor on every row: the best possible ratio is peer / 0.5
    bench.attach_ratios(rows)
    assert rows[1]["ratio_vs_ours"] == pytest.approx(2.0)
    assert rows[5]["ratio_vs_ours"] == pytest.approx(0.5)
    assert rows[7]["ratio_vs_ours"] is None and rows[9]["ratio_vs_ours"] is None
    s = bench.summarize(rows)
    tg = s["ratio_geomean"]["torch-grouped"]
    assert tg["decode"] == {"geomean": pytest.approx(4.0), "n": 2}  # sqrt(2 * 8)
    assert tg["middle"] == {"geomean": pytest.approx(0.5), "n": 1}
    assert tg["prefill"] == {"geomean": None, "n": 0}
    assert s["ours_fraction_of_floor_geomean"]["decode"]["geomean"] == pytest.approx(0.5)
    # best possible ratio: over the rows that have a ratio, peer median / floor
    best = s["ratio_at_floor_geomean"]["torch-grouped"]
    assert best["decode"] == {"geomean": pytest.approx(8.0), "n": 2}  # sqrt(4 * 16)
    assert best["middle"] == {"geomean": pytest.approx(2.0), "n": 1}
    assert best["prefill"]["n"] == 0
    assert "best possible (at the floor) torch-grouped / floor: decode 8.00, middle 2.00" in bench.format_table(
        {"rows": [], "summary": s, "settings": {"peers": ["torch-grouped"]}})
    assert s["status_counts"]["triton"] == {"ok": 4, "error": 1}


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
def test_parsers():
    assert bench.parse_schemes("bf16,fp8_tensor,fp8_block") == ["none", "fp8_tensor_token", "fp8_block128"]
    assert bench.parse_schemes("fp8_tensor_static") == ["fp8_tensor_static"]
    assert bench.parse_m_list("16,1,16") == [1, 16]
    assert bench.parse_m_list(None, quick=True) == list(bench.QUICK_M)
    assert bench.parse_m_list(None)[0] == 1 and bench.parse_m_list(None)[-1] == 16384
    assert bench.parse_peers("none") == [] and bench.parse_peers(None) == ["reference", "torch-grouped"]
    custom = bench.parse_model_spec("E=4,topk=2,K=64,I=32,act=swigluoai")
    assert (custom.E, custom.topk, custom.K, custom.I, custom.N) == (4, 2, 64, 32, 64)
    for bad, match in (("int4_w4a16", "bf16 and fp8"), ("fp9", "--schemes items"), ("bf16,,fp8_block", "empty")):
        with pytest.raises(ValueError, match=match):
            bench.parse_schemes(bad)
    for bad in ("0", "x", "-4"):
        with pytest.raises(ValueError, match="--m items"):
            bench.parse_m_list(bad)
    with pytest.raises(ValueError, match="--peers"):
        bench.parse_peers("vllm")
    for bad in ("llama", "E=4,topk=8,K=64,I=32", "E=4,K=64", "E=a,topk=1,K=1,I=1", "E=4,topk=2,K=64,I=32,zz=1"):
        with pytest.raises(ValueError, match="--model"):
            bench.parse_model_spec(bad)


# ---------------------------------------------------------------------------------------------
# the torch-grouped peer on CPU
# ---------------------------------------------------------------------------------------------
def _peer_inputs(M=13, K=32, I=16, E=4, topk=2, dtype=torch.float32, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *s: torch.rand(*s, generator=g) + 0.5) if positive else (lambda *s: torch.randn(*s, generator=g))
    x = draw(M, K).to(dtype)
    w1 = (draw(E, 2 * I, K) / K ** 0.5).to(dtype)
    w2 = (draw(E, K, I) / I ** 0.5).to(dtype)
    ids = torch.rand(M, E, generator=g).topk(topk, dim=1).indices.to(torch.int32)
    w = torch.rand(M, topk, generator=g) + 0.1
    return x, w1, w2, w, ids


def test_peer_fp32_elementwise_bound_on_positive_data():
    """fp32 peer against the float64 reference (exact) on positive data.

    Bound derivation (u = 2^-24): with all terms positive, an fp32 dot of length n has
    relative error <= gamma_n = n u / (1 - n u) (no cancellation). c1 gets gamma_K (K = 32).
    silu(g) * u has relative condition <= 1 + max_{g>0} g (1 - sigmoid(g)) <= 1.28 in g and 1
    in u, and is evaluated in fp32 (a few u). GEMM2 adds gamma_I (I = 16) and c3 is rounded
    before the router weight multiply (u) and after it (u); the positive fp32 sum over topk = 2
    adds u and the fp32 output cast nothing. Total <= 2.28 gamma_32 + gamma_16 + 8u ~ 1.3e-5.
    """
    from moe_validate.peers import torch_grouped_experts

    import reference

    x, w1, w2, w, ids = _peer_inputs(positive=True)
    out = torch_grouped_experts(x, w1, w2, w, ids)
    ref = reference.fused_experts(x, w1, w2, w, ids, precision="exact")
    u = 2.0 ** -24
    gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
    bound = 2.28 * gamma(32) + gamma(16) + 8 * u
    rel = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert out.dtype == torch.float32 and rel <= bound, f"max relative error {rel:.3e} > derived {bound:.3e}"


def test_peer_catches_a_dropped_router_weight():
    """The bound above is tight enough to fail a planted bug (router weights ignored)."""
    from moe_validate.peers import torch_grouped_experts

    import reference

    x, w1, w2, w, ids = _peer_inputs(positive=True)
    bugged = torch_grouped_experts(x, w1, w2, torch.ones_like(w), ids)
    ref = reference.fused_experts(x, w1, w2, w, ids, precision="exact")
    assert ((bugged.double() - ref).abs() / ref.abs()).max().item() > 0.1


def _rel_fro(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_peer_bf16_and_fallback_against_mirror():
    """bf16 peer against the reference mirror (which rounds to bf16 where the pipeline stores).

    Bound derivation: the two differ by (a) accumulation order (fp32 vs float64), which only
    flips a bf16 rounding of c1 / c2 / out where a value sits within K u32 of a rounding
    boundary (a fraction ~ K u32 / 2^-8 ~ 5e-4 of elements, each by one bf16 ulp = 2^-8 rel),
    and (b) the peer's extra rounding of c3 before the router weight (<= 2^-8 relative per
    element, i.e. <= 2^-8 in relative Frobenius norm). (a) + (b) < 2 * 2^-8 ~ 7.8e-3.
    The per-expert loop fallback must meet the same bound.
    """
    from moe_validate.peers import torch_grouped_experts

    import reference

    x, w1, w2, w, ids = _peer_inputs(dtype=torch.bfloat16, seed=1)
    ids[0, 0] = -1  # invalid routes contribute zeros
    ids[2, 1] = 99
    ref = reference.fused_experts(x, w1, w2, w, ids, precision="mirror", out_dtype=torch.bfloat16)
    bound = 2 * 2.0 ** -8
    for fallback in (False, True):
        out = torch_grouped_experts(x, w1, w2, w, ids, allow_fallback=fallback)
        assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
        assert _rel_fro(out, ref) <= bound, (fallback, _rel_fro(out, ref))
    # swapped gate/up halves (a planted bug) is far outside
    I = w1.shape[1] // 2
    swapped = torch.cat([w1[:, I:], w1[:, :I]], dim=1)
    assert _rel_fro(torch_grouped_experts(x, swapped, w2, w, ids), ref) > 10 * bound


def test_peer_fp8_per_token_emulation_against_mirror():
    """fp8_tensor_token through the peer's CPU emulation of torch._scaled_grouped_mm.

    Same quantizer as SPEC (s = max(absmax, 1e-10)/448, saturating RNE cast); products of e4m3
    codes are exact in fp32, so the peer and the mirror differ by accumulation order and by the
    peer's extra c3 rounding. Order can flip a bf16 rounding of c1 (then possibly one e4m3 code
    of c2, 2^-3 relative of that element) in a fraction ~5e-4 of elements: relative Frobenius
    <= sqrt(5e-4) * 2^-3 ~ 2.8e-3; plus 2^-8 for the c3 rounding: bound 1e-2 (derived 6.7e-3).
    """
    from moe_validate.peers import torch_grouped_experts
    from moe_validate.contract.spec import QuantConfig

    import reference

    x, w1, w2, w, ids = _peer_inputs(dtype=torch.bfloat16, seed=2, M=16)
    q1, s1, _ = reference.quantize_weights(w1.float(), "fp8_tensor_token")
    q2, s2, _ = reference.quantize_weights(w2.float(), "fp8_tensor_token")
    quant = QuantConfig("fp8_tensor_token", w1_scale=s1, w2_scale=s2)
    out = torch_grouped_experts(x, q1, q2, w, ids, quant=quant)
    ref = reference.fused_experts(x, q1, q2, w, ids, quant=quant, precision="mirror")
    assert _rel_fro(out, ref) <= 1e-2
    # the weight scales must be applied: dropping them is caught
    bad = QuantConfig("fp8_tensor_token", w1_scale=torch.ones_like(s1), w2_scale=s2)
    assert _rel_fro(torch_grouped_experts(x, q1, q2, w, ids, quant=bad), ref) > 0.5


def test_peer_backend_registered_and_supports():
    from moe_validate.backends import builtin_backend_names, get_backend
    from moe_validate.matrix import Case

    assert "torch-grouped" in builtin_backend_names()
    b = get_backend("torch-grouped")
    assert b.name == "torch-grouped"
    assert b.supports(Case(M=4, N=64, K=32, E=4, topk=2)) == (True, "")
    ok, why = b.supports(Case(M=4, N=64, K=32, E=4, topk=2, scheme="fp8_block128"))
    assert not ok and "block" in why
    ok, why = b.supports(Case(M=4, N=64, K=32, E=4, topk=2, lora="single"))
    assert not ok and "LoRA" in why
    # through the harness runner: the peer passes a validation case against the reference
    from moe_validate.runner import run_case_inprocess

    result = run_case_inprocess(Case(M=9, N=64, K=32, E=4, topk=2, dtype="fp32"), b)
    assert result.record["outcome"] == "PASS", result.record.get("reason")


def test_peer_rejects_unsupported_input():
    from moe_validate.peers import torch_grouped_experts
    from moe_validate.contract.spec import QuantConfig

    x, w1, w2, w, ids = _peer_inputs()
    with pytest.raises(ValueError, match="quant.scheme"):
        torch_grouped_experts(x, w1, w2, w, ids, quant=QuantConfig("int8_w8a16"))


# ---------------------------------------------------------------------------------------------
# JSON document and HTML section
# ---------------------------------------------------------------------------------------------
def _synthetic_doc():
    ceilings = {"bandwidth_GBps": 3000.0, "bf16_tflops": 700.0, "fp8_tflops": 1300.0,
                "method": {"bandwidth": "copy"}, "errors": {}}
    rows = []
    for M in (1, 128, 4096):
        nbytes = bench.floor_bytes(M, MIXTRAL, "none", unique_experts=min(8, 2 * M))
        for backend, ms in (("triton", 0.3 * (1 + M / 512)), ("torch-grouped", 0.4 * (1 + M / 512))):
            r = bench_run._base_row(MIXTRAL, "none", M, backend)
            r.update(bytes=nbytes, flops=bench.call_flops(M, MIXTRAL), unique_experts=min(8, 2 * M), routing_sets=8,
                     timing={**bench.timing_stats([ms * 0.98, ms, ms * 1.05]), "method": "cuda_graph+events"})
            bench.derive_metrics(r, ceilings)
            rows.append(r)
        ref = bench_run._base_row(MIXTRAL, "none", M, "reference")
        ref.update(status="skipped", reason="capped <M>", bytes=nbytes, flops=bench.call_flops(M, MIXTRAL))
        bench.derive_metrics(ref, ceilings)
        rows.append(ref)
    bench.attach_ratios(rows)
    return {"kind": bench.BENCH_KIND, "schema_version": bench.BENCH_SCHEMA_VERSION, "created": "2026-11-24T00:00:00+00:00",
            "argv": [], "env": {"gpu": "Fake GPU"}, "settings": {"peers": ["reference", "torch-grouped"]},
            "ceilings": ceilings, "rows": rows, "summary": bench.summarize(rows), "notes": ["a <note> & more"]}


REQUIRED_ROW_KEYS = {"model", "scheme", "M", "backend", "status", "reason", "timing", "bytes", "flops", "intensity",
                     "floor_ms", "floor_bound", "fraction_of_floor", "tflops", "gbps", "ratio_vs_ours", "regime",
                     "unique_experts", "E", "topk", "K", "I", "N"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests bench's no-GPU branch; this machine has a GPU")
def test_cpu_run_records_unsupported_rows_and_writes_files(tmp_path):
    """Without a GPU, bench still writes a complete document: every row 'unsupported' with why."""
    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    doc = bench.run_bench([tiny], ["none", "fp8_block128"], [1, 8], ["torch-grouped"], argv=["x"])
    assert doc["kind"] == bench.BENCH_KIND and doc["schema_version"] == 1
    assert {"env", "ceilings", "settings", "rows", "summary", "notes", "created"} <= set(doc)
    assert len(doc["rows"]) == 2 * 2 * 2
    for r in doc["rows"]:
        assert REQUIRED_ROW_KEYS <= set(r), REQUIRED_ROW_KEYS - set(r)
        assert r["status"] == "unsupported" and ("GPU" in r["reason"] or "TRITON_INTERPRET" in r["reason"])
    json_path, html_path = bench.write_bench(doc, tmp_path)
    back = json.loads(json_path.read_text())
    assert back["rows"][0]["model"] == "tiny"
    assert "no measured rows" in html_path.read_text()


def test_json_of_measured_rows_round_trips(tmp_path):
    doc = _synthetic_doc()
    doc["rows"][0]["check"] = {"rel_fro_vs_triton": float("nan")}  # NaN must not break strict JSON
    json_path, _ = bench.write_bench(doc, tmp_path)
    back = json.loads(json_path.read_text())
    assert back["rows"][0]["check"]["rel_fro_vs_triton"] is None
    ok = [r for r in back["rows"] if r["status"] == "ok"]
    assert len(ok) == 6 and all(REQUIRED_ROW_KEYS <= set(r) for r in back["rows"])
    tg = [r for r in ok if r["backend"] == "torch-grouped"]
    assert all(r["ratio_vs_ours"] == pytest.approx(4 / 3) for r in tg)


def test_html_section_is_self_contained_with_roofline(tmp_path):
    from moe_validate.report.bench_section import render_bench_html, render_bench_section

    doc = _synthetic_doc()
    page = render_bench_html(doc)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1
    # no network and no script: the only URL is the SVG namespace
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert "<script" not in page and "<link" not in page and "@import" not in page
    # two roofs (bf16 solid, fp8 dashed) and one marker per measured row
    assert page.count("<polyline") == 2
    assert page.count("<circle") - 2 == 6  # 2 legend dots (triton, torch-grouped)
    assert "a &lt;note&gt; &amp; more" in page and "capped &lt;M&gt;" in page
    section = render_bench_section(doc)
    assert section.startswith("<section") and section.endswith("</section>")
    _, html_path = bench.write_bench(doc, tmp_path)
    assert html_path.read_text() == page
    assert "geomean" in bench.format_table(doc) and "1.33" in bench.format_table(doc)


# ---------------------------------------------------------------------------------------------
# tune -> JSON table -> select_config
# ---------------------------------------------------------------------------------------------
def test_tune_writes_a_table_select_config_picks_up(tmp_path):
    """``check_mode="winners"``: real correctness checks (interpreter, tiny case) of the winners only, a fake timer that
    prefers one config per bucket, and a candidate that would win everywhere but fails its
    check: it is checked once, rejected, never written and never timed again; the table has
    the checked winners and the provenance, and select_config finds it by name."""
    from kernels.configs import KernelConfig, config_file_name, select_config
    from moe_validate.contract.spec import QuantScheme
    from moe_validate.tune import check_candidate, tune

    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    a = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    b = KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16 * 2, GROUP_M=1, num_warps=4, num_stages=1)
    rejected = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
    checked, timed = [], []

    def check(cfg):
        checked.append(cfg)
        if cfg == rejected:
            return False, "planted failure"
        return check_candidate(tiny, "none", cfg, check_m=6)

    def fake_timer(cfg, M):  # a wins small M, b wins large M; the rejected one is fastest everywhere
        timed.append((cfg, M))
        return {(a, True): 1.0, (a, False): 3.0, (b, True): 2.0, (b, False): 1.5,
                (rejected, True): 0.5, (rejected, False): 0.5}[(cfg, M < 100)]

    result = tune(tiny, "none", [1, 16, 1024], out_dir=str(tmp_path), device_name="Fake GPU 80GB",
                  timer=fake_timer, check=check, candidates=[a, b, rejected], command="moe-validate tune test",
                  check_mode="winners")
    assert checked == [rejected, a, b]  # fastest first, each config checked at most once
    assert (rejected, 16) not in timed and (rejected, 1024) not in timed  # rejected once: never timed again
    path = Path(result["path"])
    assert path.name == config_file_name(4, 32, "Fake GPU 80GB", torch.bfloat16, QuantScheme.NONE)
    raw = json.loads(path.read_text())
    prov = raw["_provenance"]
    assert prov["device"] == "Fake GPU 80GB" and prov["command"] == "moe-validate tune test" and prov["date"]
    assert "planted failure" in json.dumps(prov["rejected"])
    assert sorted(k for k in raw if not k.startswith("_")) == ["1", "1024", "16"]
    assert prov["results"]["1024"]["best"] == "BM32BN32BK32GM1W4S1"
    kw = dict(device_name="Fake GPU 80GB", config_dir=str(tmp_path))
    assert select_config(1, 4, 32, 32, 2, torch.bfloat16, "none", **kw) == a
    assert select_config(20, 4, 32, 32, 2, torch.bfloat16, "none", **kw) == a  # nearest bucket 16
    assert select_config(5000, 4, 32, 32, 2, torch.bfloat16, "none", **kw) == b


def test_tune_checks_every_candidate_before_timing_it_by_default(tmp_path):
    """The default mode: each distinct config is checked against the reference once, before its
    first timing; a rejected one is never timed, at any bucket, and the provenance says how."""
    from kernels.configs import KernelConfig
    from moe_validate.tune import tune

    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    a = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    b = KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    wrong = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
    events = []

    def check(cfg):
        events.append(("check", cfg))
        return (False, "planted failure") if cfg == wrong else (True, "ok")

    def timer(cfg, M):
        events.append(("time", cfg, M))
        return {a: 2.0, b: 1.0, wrong: 0.1}[cfg]  # the wrong config would be the fastest

    result = tune(tiny, "none", [1, 1024], out_dir=str(tmp_path), device_name="Fake", timer=timer, check=check,
                  candidates=[a, wrong, b])
    assert [e for e in events if e[0] == "check"] == [("check", a), ("check", wrong), ("check", b)]
    for cfg in (a, b):
        assert events.index(("check", cfg)) < events.index(("time", cfg, 1))
    assert not [e for e in events if e[0] == "time" and e[1] == wrong]
    raw = json.loads(Path(result["path"]).read_text())
    assert raw["_provenance"]["check_mode"] == "every" and "planted failure" in json.dumps(raw["_provenance"])
    assert raw["1"] == b.to_dict() and raw["1024"] == b.to_dict()
    with pytest.raises(ValueError, match="check_mode"):
        tune(tiny, "none", [1], out_dir=str(tmp_path), device_name="X", timer=timer, check=check, check_mode="some")


def test_tune_default_candidates_are_per_regime_and_include_the_untuned_default(tmp_path):
    """Without explicit candidates each bucket times its regime's grid plus the config the
    kernels would use untuned, so a tuned bucket can never be slower than no table."""
    from kernels.configs import untuned_config
    from moe_validate.tune import regime_candidates, regime_of, tune

    model = ModelShape("q", E=128, topk=8, K=2048, I=768)
    assert [regime_of(m, 128, 8) for m in (1, 64, 256, 4096)] == ["decode", "decode", "small", "middle"]
    assert regime_of(16384, 128, 8) == "prefill"
    timed = {}

    def timer(cfg, M):
        timed.setdefault(M, []).append(cfg)
        return 1.0

    tune(model, "fp8_block128", [1, 16384], out_dir=str(tmp_path), device_name="Fake", timer=timer,
         check=lambda cfg: (True, "ok"))
    for M in (1, 16384):
        want = regime_candidates("fp8_block128", regime_of(M, 128, 8))
        default = untuned_config(M, 128, 1536, 2048, 8, torch.bfloat16, "fp8_block128")
        assert timed[M][:len(want)] == want and default in timed[M]
        assert all(128 % c.BLOCK_K == 0 for c in timed[M])  # the scheme's rule filters every grid
    assert timed[1] != timed[16384]
    with pytest.raises(ValueError, match="regime"):
        regime_candidates("none", "lunch")


def test_fp8_block128_grids_hold_configs_that_fuse_the_activation_quantization():
    """silu + fp8_block128 fuses its fp8 group quantization into GEMM1 only where (BLOCK_N // 2)
    % 128 == 0: the middle and prefill grids of that scheme hold such configs with BLOCK_K = 128
    (one scale block per K tile), the other schemes' grids and the decode/small ones are unchanged."""
    from moe_validate.tune import regime_candidates

    for regime in ("middle", "prefill"):
        fp8 = regime_candidates("fp8_block128", regime)
        fusing = [c for c in fp8 if (c.BLOCK_N // 2) % 128 == 0 and c.BLOCK_K == 128]
        assert {c.BLOCK_M for c in fusing} >= {64, 128} and all(c.num_warps == 8 for c in fusing)
        assert len(fp8) <= 8, "each candidate costs GPU time at every bucket"
        assert not [c for c in regime_candidates("none", regime) if c not in fp8]
    for regime in ("decode", "small"):
        assert regime_candidates("fp8_block128", regime) == [c for c in regime_candidates("none", regime)
                                                             if 128 % c.BLOCK_K == 0]


def test_tune_gives_gemm2_its_own_tiles_when_faster(tmp_path, monkeypatch):
    """Stage 2 times the fastest shared config with each other GEMM2 schedule of the regime; a
    faster variant wins, is checked for real (interpreter, forced config through the backend),
    lands in the table with its "gemm2" entry and select_config returns it."""
    from kernels.configs import Gemm2Tiles, KernelConfig, select_config
    from moe_validate.tune import check_candidate, gemm2_variants, tune

    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    base = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    variants = gemm2_variants(base, "none", "decode", on_gpu=True)
    assert variants and all(v.BLOCK_M == 16 and v.gemm2 is not None for v in variants)
    assert all((v.gemm2.BLOCK_N, v.gemm2.BLOCK_K) != (64, 128) or v.gemm2.num_stages != 4 for v in variants)
    winner = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1,
                          gemm2=Gemm2Tiles(BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1))
    shared = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    import moe_validate.tune as tune_mod

    monkeypatch.setattr(tune_mod, "gemm2_variants",
                        lambda best, scheme, regime, on_gpu=True: [winner] if best == shared else [])
    checked = []

    def check(cfg):
        checked.append(cfg)
        return check_candidate(tiny, "none", cfg, check_m=6)

    result = tune(tiny, "none", [4], out_dir=str(tmp_path), device_name="Fake GPU", gemm2=True,
                  timer=lambda cfg, M: 0.5 if cfg == winner else 1.0, check=check, candidates=[shared],
                  check_mode="winners")
    assert checked == [winner]
    raw = json.loads(Path(result["path"]).read_text())
    assert raw["4"]["gemm2"] == {"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}
    assert "+g2BN16BK16" in raw["_provenance"]["results"]["4"]["best"]
    got = select_config(4, 4, 32, 32, 2, torch.bfloat16, "none", device_name="Fake GPU", config_dir=str(tmp_path))
    assert got == winner and got.for_gemm2().BLOCK_N == 16


def test_tune_bad_input(tmp_path):
    from moe_validate.tune import tune

    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    with pytest.raises(ValueError, match="m_list"):
        tune(tiny, "none", [0], out_dir=str(tmp_path), device_name="X", timer=lambda c, m: 1.0)
    with pytest.raises(ValueError, match="--scheme"):
        tune(tiny, "fp9", [1], out_dir=str(tmp_path), device_name="X", timer=lambda c, m: 1.0)
    with pytest.raises(RuntimeError, match="no usable config"):
        tune(tiny, "none", [1], out_dir=str(tmp_path), device_name="X", timer=lambda c, m: 1.0,
             check=lambda c: (False, "no"))


# ---------------------------------------------------------------------------------------------
# CLI bad input: one stderr line, exit 2
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["bench", "--schemes", "int4_w4a16"], "--schemes"),
    (["bench", "--m", "0,4"], "--m items"),
    (["bench", "--models", "llama"], "--model"),
    (["bench", "--peers", "vllm"], "--peers"),
    (["bench", "--time-budget", "-1"], "--time-budget"),
    (["tune", "--model", "mixtral-8x7b"], "--scheme"),
    (["tune", "--model", "deepseek-v3", "--scheme", "bf16"], "not a scheme of"),
    (["tune", "--model", "nope", "--scheme", "bf16"], "--model"),
])
def test_cli_bad_input(argv, needle, capsys):
    from moe_validate.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_tune_without_gpu_is_usage_error(capsys):
    from moe_validate.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tune would run")
    assert main(["tune", "--model", "mixtral-8x7b", "--scheme", "bf16"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the per-row machinery (capture, cross-check, interleaved timing, metrics) with fake CUDA timing
# ---------------------------------------------------------------------------------------------
class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeStream:
    def wait_stream(self, other):
        pass


def _no_graph(*args, **kwargs):
    raise RuntimeError("no CUDA graphs on CPU")


@pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                    reason="fakes CUDA around CPU tensors (interpreter kernels); on a real GPU the bench itself "
                           "runs this branch (scripts/gpu_bench.sh)")
def test_row_group_plumbing_with_fake_cuda(monkeypatch):
    """One row group runs end to end on CPU: our kernels (interpreter), the reference and the
    peer are called on the same rotated routing, cross-checked, timed in interleaved rounds
    (host clock standing in for CUDA events), with the graph-capture failure recorded as the
    timing method. The GPU run uses the same code with real events and graphs."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80e9, 80e9))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _no_graph)
    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    args = {"routing_sets": 2, "target_ms": 1.0, "min_reps": 2, "max_reps": 2, "rounds": 2,
            "reference_max_m": 4, "reference_reps": 2, "device": "cpu"}
    ceilings = {"bandwidth_GBps": 100.0, "bf16_tflops": 1.0, "fp8_tflops": 2.0}
    weights = bench.make_bench_weights(tiny, "none", "cpu")
    rows = bench_run._bench_row_group(tiny, "none", 3, ["triton", "reference", "torch-grouped"], weights, ceilings,
                                  args, lambda s: None)
    by = {r["backend"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], [r["reason"] for r in rows]
    for r in rows:
        assert r["timing"]["reps"] >= 2 and r["timing"]["rounds"] == 2
        assert r["unique_experts"] <= 4 and r["routing_sets"] == 2
        assert r["bytes"] == pytest.approx(bench.floor_bytes(3, tiny, "none", r["unique_experts"]))
        assert r["tflops"] > 0 and r["fraction_of_floor"] > 0
    assert "graph capture failed" in by["triton"]["timing"]["method"]
    assert by["triton"]["config"]["BLOCK_M"] >= 1
    # our kernels against the bf16-rounded mirror reference: identical on this tiny case up to
    # fp32 accumulation order (K = 32): far below one bf16 ulp in relative Frobenius norm
    assert by["triton"]["check"]["rel_fro_vs_reference"] < 2.0 ** -8
    assert by["torch-grouped"]["check"]["rel_fro_vs_reference"] < 2 * 2.0 ** -8
    # the reference is capped by M, the peer has no block-scaled fp8 path
    over = bench_run._bench_row_group(tiny, "none", 8, ["triton", "reference"], weights, ceilings, args, lambda s: None)
    assert over[1]["status"] == "skipped" and "M <= 4" in over[1]["reason"]
    w8 = bench.make_bench_weights(tiny, "fp8_block128", "cpu")
    fp8 = bench_run._bench_row_group(tiny, "fp8_block128", 3, ["triton", "torch-grouped"], w8, ceilings, args,
                                 lambda s: None)
    assert fp8[0]["status"] == "ok" and fp8[1]["status"] == "unsupported" and "block" in fp8[1]["reason"]


def test_render_accepts_json_text_and_path(tmp_path):
    from moe_validate.report.bench_section import render_bench_html

    doc = _synthetic_doc()
    json_path, _ = bench.write_bench(doc, tmp_path)
    from_path = render_bench_html(json_path)
    assert from_path == render_bench_html(json_path.read_text()) == render_bench_html(str(json_path))
    assert from_path.count("<circle") == render_bench_html(doc).count("<circle")
    with pytest.raises(TypeError, match="bench must be"):
        render_bench_html(42)


@pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                    reason="fakes CUDA around CPU tensors (interpreter kernels); on a real GPU the bench itself "
                           "runs this branch (scripts/gpu_bench.sh)")
def test_run_bench_gpu_branch_with_fake_cuda(monkeypatch, tmp_path):
    """The whole GPU branch of run_bench (weights per model and scheme, row groups, scheme
    restrictions, time budget, ratios, summary, files) with fake CUDA timing on CPU."""
    import contextlib

    for name, value in (("Event", _FakeEvent), ("Stream", _FakeStream), ("CUDAGraph", _no_graph)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80e9, 80e9))
    monkeypatch.setattr(bench_run, "_gpu_ready", lambda: (True, ""))
    tiny = ModelShape("tiny", E=4, topk=2, K=32, I=16)
    fp8_only = ModelShape("tiny-fp8", E=4, topk=2, K=32, I=16, schemes=("fp8_block128",))
    settings = {"routing_sets": 2, "target_ms": 1.0, "min_reps": 1, "max_reps": 1, "rounds": 1,
                "reference_max_m": 2, "reference_reps": 1, "device": "cpu"}
    ceilings = {"bandwidth_GBps": 100.0, "bf16_tflops": 1.0, "fp8_tflops": 2.0, "method": {}, "errors": {}}
    doc = bench.run_bench([tiny, fp8_only], ["none"], [2], ["torch-grouped"], settings=settings,
                          ceilings=ceilings, log=lambda s: None)
    by = {(r["model"], r["backend"]): r for r in doc["rows"]}
    assert by[("tiny", "triton")]["status"] == "ok" and by[("tiny", "torch-grouped")]["status"] == "ok"
    assert by[("tiny", "torch-grouped")]["ratio_vs_ours"] > 0
    assert by[("tiny-fp8", "triton")]["status"] == "skipped"
    assert "benchmarked in fp8_block128 only" in by[("tiny-fp8", "triton")]["reason"]
    assert doc["summary"]["ratio_geomean"]["torch-grouped"]["decode"]["n"] == 1
    # a spent time budget turns the remaining rows into recorded skips
    late = bench.run_bench([tiny], ["none"], [2], [], settings=settings, ceilings=ceilings, time_budget_s=0.0,
                           log=lambda s: None)
    assert [r["status"] for r in late["rows"]] == ["skipped"] and "time budget" in late["rows"][0]["reason"]
    json_path, html_path = bench.write_bench(doc, tmp_path)
    assert json.loads(json_path.read_text())["rows"] and "<svg" in html_path.read_text()
    assert "not run (model benchmarked in other schemes): tiny-fp8 bf16 x1" in bench.format_table(doc)


def test_table_flags_a_wrong_result():
    doc = _synthetic_doc()
    ours = next(r for r in doc["rows"] if r["backend"] == "triton")
    ours["check"] = {"nan": False, "rel_fro_vs_reference": 0.3}
    flagged = [line for line in bench.format_table(doc).splitlines() if "!check" in line]
    assert len(flagged) == 1 and flagged[0].split()[2] == str(ours["M"])


# ---------------------------------------------------------------------------------------------
# --profile: per-kernel breakdown
# ---------------------------------------------------------------------------------------------
def test_short_kernel_name():
    assert bench_timing._short_kernel_name("void at::native::vectorized_elementwise_kernel<4, Foo>(int, Foo)") == \
        "at::native::vectorized_elementwise_kernel"
    assert bench_timing._short_kernel_name("_grouped_gemm_kernel") == "_grouped_gemm_kernel"


def test_profile_kernels_aggregates_per_call(monkeypatch):
    """Device events are summed per kernel name and divided by the number of runs; host-side
    runtime events and CPU events are dropped; kernels come out by time, largest first."""
    import types

    import torch.profiler

    class Ev:
        def __init__(self, name, us, dev="DeviceType.CUDA"):
            self.name, self.device_time, self.device_type = name, us, dev

    events = []
    for _ in range(4):  # 4 runs: two GEMM launches of 10 and 30 us, one sum kernel, noise
        events += [Ev("_grouped_gemm_kernel", 10.0), Ev("_grouped_gemm_kernel", 30.0), Ev("_moe_sum_kernel", 2.0),
                   Ev("cudaGraphLaunch", 5.0), Ev("aten::copy_", 99.0, dev="DeviceType.CPU")]

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    runs = []
    t = types.SimpleNamespace(graphs=[object()], run_once=lambda: runs.append(1))
    prof = bench.profile_kernels(t, reps=4)
    assert len(runs) == 3 + 4  # warm-up, then the profiled runs
    assert [k["name"] for k in prof["kernels"]] == ["_grouped_gemm_kernel", "_moe_sum_kernel"]
    assert prof["kernels"][0] == {"name": "_grouped_gemm_kernel", "us_per_call": 40.0, "launches_per_call": 2.0}
    assert prof["kernel_sum_us"] == pytest.approx(42.0)
    assert "graph replays" in prof["method"]
    row = {"model": "m", "scheme": "bf16", "scheme_label": "bf16", "M": 1, "backend": bench.OURS, "status": "ok",
           "timing": {"median_ms": 0.050, "p10_ms": 0.049, "p90_ms": 0.051}, "tflops": 1.0, "gbps": 1.0,
           "fraction_of_floor": 0.5, "check": {}, "profile": prof}
    text = bench.format_table({"rows": [row], "settings": {"peers": []}})
    assert "m bf16 M=1: sum 42.0 of 50.0 | _grouped_gemm_kernel 40.0 x2, _moe_sum_kernel 2.0" in text


def test_table_says_which_tables_served_our_rows():
    """bench rows carry lookup_config's ConfigSource; the table counts rows per serving table."""
    from moe_validate.bench.output import _config_sources

    rows = [{"config_source": {"kind": "tuned", "table": "E=8,...json", "device": "NVIDIA H200"}},
            {"config_source": {"kind": "tuned", "table": "E=8,...json", "device": "NVIDIA H200"}},
            {"config_source": {"kind": "sibling", "table": "E=128,...json", "device": "NVIDIA H100 80GB HBM3"}},
            {"config_source": {"kind": "default", "table": None, "device": None}},
            {}]  # a row written before rows carried the source
    assert _config_sources(rows) == {"tuned NVIDIA H200": 2, "sibling NVIDIA H100 80GB HBM3": 1, "default": 1,
                                     "unrecorded": 1}
