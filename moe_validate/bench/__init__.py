"""``moe-validate bench``: our fused experts against peers, on model shapes, against the roofline.

For each (model, scheme, M) row and each backend (``triton`` = ours, ``torch-grouped``,
``reference``):

- timing: the call is captured in one CUDA graph per pre-generated routing set (``_Timed``) and
  the graphs are replayed in rotation, so that consecutive replays hit different experts and a
  small footprint is not served from L2. Warm-up replays first, then per-replay
  CUDA events; the median and p10/p90 are reported. Backends of one row are interleaved in
  rounds (ours, peers, ours, peers, ...) so that clock or thermal drift hits all alike. The
  reference cannot be captured (it synchronises with the host); it is timed eagerly with events
  at small M only (``REFERENCE_MAX_M``) and where its float64 weights fit in memory.
- floor: ``max(bytes / bandwidth, flops / rate)`` where bytes are the weights of the experts the
  routing actually hits (unique experts x bytes per expert, including scales) plus activations
  in and out plus the routing tensors, and flops are ``2 * M * topk * (N*K + K*I)``. Bandwidth
  and rates are measured at the start (``measure_ceilings``): a device-to-device copy counting
  read + write, and torch.matmul (bf16) / torch._scaled_mm (fp8) on large square matrices.
- reported: median ms, TFLOP/s, GB/s (floor bytes / time), fraction of the floor reached
  (floor / median), and for peers the ratio ``peer median / our median`` (> 1: ours is faster).
  Geometric means of the ratios and of our floor fractions per regime (decode M <= 64, middle,
  prefill M >= 4096).

"fp8_tensor" means ``fp8_tensor_token`` (per-expert weight scales, dynamic per-token activation
scales): the per-tensor scheme that ``torch._scaled_grouped_mm`` can run (row-wise scales), so
the peer comparison is like for like. Any ``QuantScheme`` value is accepted too.

Everything that does not touch a GPU (shapes, floor and roofline arithmetic, regimes, geometric
means, argument parsing, JSON layout) is a plain function tested on CPU.

The package, in the order a run uses it: ``models`` (what to bench, and the option parsing),
``roofline`` (floors, regimes, statistics: pure), ``timing`` (the GPU side: ceilings, inputs,
CUDA-graph timing, profiles), ``run`` (``run_bench``), ``output`` (``bench.json``, ``bench.html``,
the text table). The names below are the public ones; the helpers stay in their modules.
"""

from moe_validate.bench.models import (DEFAULT_M, DEFAULT_SCHEMES, MODELS, OURS, PEERS, QUICK_M, SCHEME_ALIASES,
                                       ModelShape, parse_m_list, parse_model_spec, parse_models, parse_peers,
                                       parse_schemes)
from moe_validate.bench.output import BENCH_KIND, BENCH_SCHEMA_VERSION, format_table, write_bench
from moe_validate.bench.roofline import (DECODE_MAX_M, PREFILL_MIN_M, REGIMES, activation_bytes, attach_ratios,
                                         call_flops, derive_metrics, expected_unique_experts, expert_weight_bytes,
                                         floor_bytes, floor_seconds, geomean, percentile, regime, summarize,
                                         timing_stats)
from moe_validate.bench.run import REFERENCE_MAX_M, run_bench
from moe_validate.bench.timing import make_bench_weights, make_routing_sets, measure_ceilings, profile_kernels

__all__ = [
    "ModelShape",
    "MODELS",
    "DEFAULT_M",
    "QUICK_M",
    "SCHEME_ALIASES",
    "parse_models",
    "parse_schemes",
    "parse_m_list",
    "parse_peers",
    "expert_weight_bytes",
    "floor_bytes",
    "call_flops",
    "floor_seconds",
    "regime",
    "geomean",
    "summarize",
    "percentile",
    "measure_ceilings",
    "run_bench",
    "write_bench",
    "format_table",
    "BENCH_SCHEMA_VERSION",
    "BENCH_KIND",
    "DEFAULT_SCHEMES",
    "PEERS",
    "OURS",
    "REFERENCE_MAX_M",
    "DECODE_MAX_M",
    "PREFILL_MIN_M",
    "REGIMES",
    "parse_model_spec",
    "activation_bytes",
    "expected_unique_experts",
    "timing_stats",
    "derive_metrics",
    "attach_ratios",
    "make_bench_weights",
    "make_routing_sets",
    "profile_kernels",
]
