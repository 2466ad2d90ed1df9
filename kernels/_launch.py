"""Programmatic dependent launch (PDL) for the pipeline's kernels on Hopper and newer GPUs.

A call is a chain of short kernels on one stream (route experts, quantizers, two GEMMs, moe_sum).
At one token each runs for a few microseconds, so the gap between two dependent kernels is a
visible part of the call. With PDL a kernel is launched with ``launch_pdl=True``: the launch may
be processed before its predecessor has completed, and the kernel's programs wait in
``griddepcontrol.wait`` (``gdc_wait``) until the predecessor grid has completed and its writes
are visible.

The contract every PDL-launched kernel keeps: ``wait_for_predecessor`` is its first statement,
before any global load or store. The wait covers the previous kernel only, and that one waited
for its own predecessor before it could complete, so every earlier kernel of the chain is
complete too (reads after writes and writes after reads are both safe). No kernel signals its
dependents early (``gdc_launch_dependents``): the trigger is implicit at completion. A kernel
launched without PDL (torch's own, the LoRA kernels, a user's kernel) waits for the full
completion of its predecessor as usual, so mixing is safe.

Measured on the H100 (``moe-validate bench --quick --m 1,16``, three runs each): the wait alone
takes 1-3 us off every decode row (Qwen3 fp8 M=1 38 -> 37 us, gpt-oss fp8 60 -> 58 us, Mixtral
fp8_block 158 -> 155 us) and never lost. Signalling dependents at a kernel's start lost up to
4% on the large fp8_block rows, and signalling from the quantizers and moe_sum only (not the
GEMMs) made Mixtral fp8_block M=1 228 us instead of 158: the early GEMM2 programs, resident and
waiting, crowd the SMs.

``launch_options(device)`` gives the two launch keywords: the ``PDL`` constexpr (the build
without it has no griddepcontrol instruction, which needs sm_90) and Triton's ``launch_pdl``. PDL
is on for CUDA devices of compute capability >= 9.0, off under the interpreter, on ROCm and where
the environment sets ``MOE_KERNELS_PDL=0`` (for A/B measurements; read on every call).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moe_validate.contract.rules import interpreting

__all__ = ["launch_options", "pdl_enabled", "wait_for_predecessor"]

PDL_ENV = "MOE_KERNELS_PDL"


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """The first statement of every PDL-launched kernel (see the module docstring's contract)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def _capability_allows(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL (see the module docstring)."""
    if device.type != "cuda" or interpreting():
        return False
    if os.environ.get(PDL_ENV, "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_allows(index)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel that starts with ``wait_for_predecessor``."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
