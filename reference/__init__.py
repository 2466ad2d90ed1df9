"""The slow, obviously correct float64 reference for fused MoE experts (SPEC.md).

``fused_experts`` is the output; ``run_stages`` returns every named intermediate so the harness
can say where a result diverged; the quantizers are public so that tests and input generators
produce exactly the formats SPEC.md defines. Each pipeline stage is also callable on its own
from ``reference.pipeline`` (``route``, ``prepare_input``, ``gemm1``, ``lora_w13``,
``activation_stage``, ``requantize``, ``gemm2``, ``lora_w2``, ``combine``), and as the functions of
one call's upstream stage under a precision and numerics profile (``stage_functions``).
"""

from reference.pipeline import fused_experts, run_stages
from reference.quant import dequantize_weights, pack_int4, quantize_activation, quantize_weights, unpack_int4

__all__ = [
    "fused_experts",
    "run_stages",
    "quantize_weights",
    "quantize_activation",
    "dequantize_weights",
    "pack_int4",
    "unpack_int4",
]
