"""Fast fused-MoE experts on Triton (the path under validation). See SPEC.md for the semantics."""

from kernels.align import moe_align_block_size
from kernels.configs import KernelConfig, select_config
from kernels.experts import TritonExperts, fused_experts
from kernels.moe_sum import moe_sum

__all__ = ["fused_experts", "TritonExperts", "KernelConfig", "select_config", "moe_align_block_size", "moe_sum"]
