"""The decisions the kernels, the reference and the harness must make the same way, each once.

- ``fused_silu_fp8_group``: which calls quantize their silu output straight from fp32 into fp8
  1x128 groups (SPEC step 8), with no S rounding between activation and quantization.
- ``interpreting``: whether Triton runs kernels through its interpreter, read as Triton reads it.
- ``takes_naive_path``: when the tiny-M path (one route per tile, no alignment) runs.
- ``fp8_tile_accumulation``: how one of our kernels' Triton fp8 ``tl.dot`` tiles accumulates on a GPU.
"""

from __future__ import annotations

import os

__all__ = ["fused_silu_fp8_group", "interpreting", "takes_naive_path", "fp8_tile_accumulation", "NAIVE_SPARSITY"]

# How Triton reads a boolean environment variable (triton.knobs.env_bool -> libtriton's
# getenv_bool in the installed 3.x): the whole value, case-insensitive; anything else is false,
# so "2", " 1" and "t" do not interpret. tests/moe_validate/test_contract_rules.py pins it to Triton.
_TRITON_TRUE = frozenset({"1", "true", "on", "yes", "y"})

# vLLM's heuristic for the tiny-M path: one route per tile pays off when there are several
# experts per route (alignment would then produce one mostly-padding tile per route anyway and
# costs two extra launches).
NAIVE_SPARSITY = 4


def fused_silu_fp8_group(activation, scheme, gemm1_clamp_limit, has_lora: bool) -> bool:
    """silu + fp8_block128, no GEMM1 clamp, no LoRA: c2 is quantized from the fp32 activation in
    1x128 groups (the kernels' ``silu_and_mul_quant_fp8_group``, or its fusion into GEMM1's
    epilogue where the config allows). ``activation`` and ``scheme``: the enums or their values."""
    # Imported here: the module stays torch-free, for the CLI and the pytest plugin's start.
    from moe_validate.contract.spec import Activation, QuantScheme

    return (activation == Activation.SILU and scheme == QuantScheme.FP8_BLOCK128
            and gemm1_clamp_limit is None and not has_lora)


def interpreting() -> bool:
    """Whether Triton interprets kernels (``TRITON_INTERPRET`` as Triton reads it). Read at call
    time; kernels/_interp.py reads it once, at import, like Triton's own ``@triton.jit``."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE


def takes_naive_path(num_routes: int, num_local_experts: int) -> bool:
    """Whether "auto" assignment takes the tiny-M naive path: at least ``NAIVE_SPARSITY`` local
    experts per route (M * topk routes)."""
    return num_routes * NAIVE_SPARSITY <= num_local_experts


# Where the accumulator of an fp8 tl.dot was measured (docs/TRITON_FACTS.md): Hopper, Triton 3.6.
FP8_ACCUMULATION_MEASURED = ((9, 0),)


def fp8_tile_accumulation(block_m: int, num_warps: int, capability):
    """``contract.profile.Fp8Accumulation`` of one Triton fp8 ``tl.dot`` tile of ``block_m`` rows
    launched with ``num_warps``, compiled for a GPU of ``capability`` ((major, minor)); None where
    that is not known (no GPU, or one it was not measured on).

    Triton lowers a dot to Hopper's warpgroup MMA (wgmma, whose fp8 accumulator keeps fewer bits)
    only where a warpgroup owns the tile: M a multiple of 64 (wgmma's M) and num_warps a multiple
    of 4; narrower tiles take mma.sync, which accumulates in fp32. Measured on an H200 with our
    kernels (fresh-seed nightly, docs/BOUNDS.md): BLOCK_M = 16 cases differ from an
    fp32-accumulated mirror in ~1/2000 of the elements the wgmma accumulator gives. It is a fact
    about our kernels' tiles, not every Triton kernel's: vLLM's fp8 kernel on BLOCK_SIZE_M 32 tiles
    flipped 4-6x more than fp32 accumulation allows (H200, session 11; docs/VLLM.md)."""
    from moe_validate.contract.profile import Fp8Accumulation

    if capability is None or tuple(capability) not in FP8_ACCUMULATION_MEASURED:
        return None
    warpgroup = block_m % 64 == 0 and num_warps % 4 == 0
    return Fp8Accumulation.FP8_MMA if warpgroup else Fp8Accumulation.FP32
