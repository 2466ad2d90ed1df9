"""Is decode timing host-bound? Qwen3 bf16 / fp8 M=1: old method (copy set into static buffers,
one graph) vs per-set graphs (bench._Timed) vs a batch of back-to-back replays / n."""
import statistics
import torch
import kernels
from moe_validate import bench

for scheme in ("none", "fp8_tensor_token"):
    model = bench.parse_models("qwen3-30b-a3b")[0]
    w1, w2, quant = bench.make_bench_weights(model, scheme, "cuda")
    sets = bench.make_routing_sets(1, model, 8, "cuda", seed=1)
    x = torch.randn(1, model.K, dtype=torch.bfloat16, device="cuda")
    ids_s, w_s = sets[0][0].clone(), sets[0][1].clone()
    call0 = lambda: kernels.fused_experts(x, w1, w2, w_s, ids_s, activation=model.activation, quant=quant)
    for _ in range(3):
        call0()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call0()
    old = []
    for i in range(200):
        ids_s.copy_(sets[i % 8][0]); w_s.copy_(sets[i % 8][1])
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); old.append((s, e))
    torch.cuda.synchronize()
    old = statistics.median(s.elapsed_time(e) for s, e in old) * 1e3
    t = bench._Timed("ours", lambda ids, w: kernels.fused_experts(x, w1, w2, w, ids, activation=model.activation,
                                                                  quant=quant), sets, use_graph=True)
    t.timed(200)
    new = statistics.median(t.times) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(400):
        t.load_next(); t.run_once()
    e.record(); torch.cuda.synchronize()
    batch = s.elapsed_time(e) * 1e3 / 400
    print(f"qwen3 {scheme} M=1: old copy+graph {old:.1f} us, per-set graphs {new:.1f} us, batch {batch:.1f} us per call")
