"""GPUs for the runner's workers: which ones are visible, what a case needs, which case goes where.

Pure logic (no torch at import, no CUDA calls except in ``detect_gpus``), so the placement rules
are unit-tested on CPU with simulated device counts and memory sizes.

- ``visible_entries(cuda_visible_devices, device_count)``: the strings a worker's
  ``CUDA_VISIBLE_DEVICES`` is set to, one per GPU this process can see: the i-th entry of an outer
  ``CUDA_VISIBLE_DEVICES`` ("3,5", "GPU-<uuid>,...", "MIG-<uuid>") or "0".."n-1" when unset.
- ``case_memory_bytes(case)``: an estimate of the device memory one case allocates (inputs,
  weights, kernel workspaces, the float64 reference's stages in both precisions, the comparison).
- ``GpuScheduler``: hands cases to workers so that the cases in flight on one GPU fit its memory;
  a case too big to share a GPU runs alone on it, and it cannot be starved by smaller cases.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

__all__ = [
    "GpuInfo",
    "GpuScheduler",
    "visible_entries",
    "detect_gpus",
    "case_memory_bytes",
    "gpu_budget_bytes",
    "worker_gpus",
    "PROCESS_OVERHEAD_BYTES",
    "USABLE_FRACTION",
    "XDIST_GPUS_ENV",
]

GIB = 1 << 30
# Device memory one worker process holds before its first case: the CUDA context, cuBLAS/cuDNN
# handles and the loaded Triton modules. About 0.5 GiB on H100/H200 with CUDA 12; 1 GiB keeps a
# margin (assumed, not measured here: scripts/gpu_multi.sh samples memory.used to check it).
PROCESS_OVERHEAD_BYTES = 1 * GIB
# Share of a GPU's memory the scheduler plans with: the rest is left to the driver, to other
# processes on a shared machine and to the caching allocator's rounding.
USABLE_FRACTION = 0.9
# The caching allocator rounds blocks up and keeps freed blocks cached, so a case's peak reserved
# memory exceeds the sum of its live tensors; 25% over the sum is the planning margin.
ALLOCATOR_SLACK = 1.25
# The controller of a pytest-xdist session publishes its visible GPUs here (comma-separated) so
# that each worker can pin itself before CUDA initialises in it (pytest_plugin.py).
XDIST_GPUS_ENV = "MOE_VALIDATE_XDIST_GPUS"


# ---------------------------------------------------------------------------------------------
# Visible devices
# ---------------------------------------------------------------------------------------------
def visible_entries(cuda_visible_devices: Optional[str], device_count: int) -> List[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value that pins a child process to each visible GPU, in order.

    ``cuda_visible_devices`` is this process's variable (None = unset) and ``device_count`` what
    CUDA reports with it. An entry is passed through unchanged (an index, ``GPU-<uuid>``,
    ``MIG-<uuid>`` or ``MIG-GPU-<uuid>/<gi>/<ci>``): re-exporting it names the same device. CUDA
    ignores everything after the first invalid entry, which is why the list is cut to
    ``device_count``. An empty variable hides every GPU.
    """
    if not isinstance(device_count, int) or isinstance(device_count, bool) or device_count < 0:
        raise ValueError(f"device_count must be an int >= 0; got {device_count!r}")
    if cuda_visible_devices is not None and not isinstance(cuda_visible_devices, str):
        raise TypeError(f"cuda_visible_devices must be a str or None; got {type(cuda_visible_devices).__name__}")
    if device_count == 0:
        return []
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    entries = [e.strip() for e in cuda_visible_devices.split(",")]
    entries = [e for e in entries if e]
    return entries[:device_count]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU a worker can be pinned to: its ``CUDA_VISIBLE_DEVICES`` entry and memory size."""

    entry: str
    total_bytes: Optional[int] = None  # None = unknown: no memory planning for this GPU

    def __post_init__(self):
        if not isinstance(self.entry, str) or not self.entry or "," in self.entry:
            raise ValueError(f"GpuInfo.entry must be one CUDA_VISIBLE_DEVICES entry; got {self.entry!r}")
        if self.total_bytes is not None and (not isinstance(self.total_bytes, int) or self.total_bytes <= 0):
            raise ValueError(f"GpuInfo.total_bytes must be a positive int or None; got {self.total_bytes!r}")


def detect_gpus(memory: bool = True) -> List[GpuInfo]:
    """The GPUs of this process, in ``CUDA_VISIBLE_DEVICES`` order; [] without CUDA.

    ``memory=True`` reads each device's size with ``torch.cuda.get_device_properties`` (a MIG
    slice reports its own size), which initialises torch's CUDA state in this process; with
    ``memory=False`` only the device count is queried and ``total_bytes`` is None.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    entries = visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES"), count)
    gpus = []
    for index, entry in enumerate(entries):
        total = None
        if memory:
            try:
                total = int(torch.cuda.get_device_properties(index).total_memory)
            except Exception:  # an unreadable size only turns memory planning off for that GPU
                total = None
        gpus.append(GpuInfo(entry, total or None))
    return gpus


def worker_gpus(worker_count: int, gpu_count: int) -> List[Optional[int]]:
    """The GPU index of each worker slot: slot i -> GPU i mod gpu_count; None for all on CPU.

    With fewer workers than GPUs the last GPUs get none; with more, GPUs are shared evenly
    (the first ``worker_count % gpu_count`` GPUs get one worker more).
    """
    for name, value in (("worker_count", worker_count), ("gpu_count", gpu_count)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    if gpu_count == 0:
        return [None] * worker_count
    return [slot % gpu_count for slot in range(worker_count)]


# ---------------------------------------------------------------------------------------------
# What one case needs
# ---------------------------------------------------------------------------------------------
_STORAGE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_LORA_RANK_BOUND = 16      # inputs.LORA_RANK is 5; 16 bounds it without importing torch here
_LORA_ADAPTERS_BOUND = 4   # adapters per case (inputs.py draws a few)
_SORT_BLOCK_M_BOUND = 256  # the largest BLOCK_M a config may pad each expert's rows to


def _weight_bytes_per_element(scheme: str, storage: int) -> float:
    if scheme == "none":
        return float(storage)
    if scheme == "int4_w4a16":
        return 0.5
    return 1.0  # fp8_* and int8_*: one byte per weight




def case_memory_bytes(case) -> int:
    """Estimated peak device memory of one case, in bytes (an estimate, not a bound).

    Sums the tensors alive together at the peak (``compare.evaluate`` holds the kernel output and
    both reference precisions at once) and adds ``ALLOCATOR_SLACK``:

    - inputs: x [M, K] and the output in the storage dtype; w1 [E_l, N, K], w2 [E_l, K, I] in the
      weight dtype; scales (at most one fp32 per 32 weights: the finest group any scheme uses);
      bias; topk weights and ids; LoRA adapters (rank and count bounded above);
    - kernel: the output and what ``kernels.TritonExperts.workspace_bytes`` declares (its
      workspaces, quantized activations, routing metadata padded to a BLOCK_M of at most
      ``_SORT_BLOCK_M_BOUND``);
    - reference, for each of the two precisions: float64 dequantized weights, x, and the stages
      per route (c1 [M*topk, N], act [M*topk, I], c2 [M*topk, K]) plus the output [M, K];
    - comparison: a handful (8) of float64 [M, K] temporaries.

    For a case whose reference is row-sampled (``matrix.reference_is_sampled``) the reference and
    comparison terms count the sampled rows instead of M.
    """
    try:
        M, N, K, topk = int(case.M), int(case.N), int(case.K), int(case.topk)
        E_local, I = int(case.local_experts), int(case.I)
        dtype, scheme, activation = str(case.dtype), str(case.scheme), str(case.activation)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TypeError(f"case must be a matrix.Case (M, N, K, topk, local_experts, I, dtype, scheme, activation); "
                        f"got {type(case).__name__}: {exc}") from None
    if dtype not in _STORAGE_BYTES:
        raise ValueError(f"case.dtype must be one of {', '.join(_STORAGE_BYTES)}; got {dtype!r}")
    s = _STORAGE_BYTES[dtype]
    routes = M * topk
    weights = E_local * (N * K + K * I)

    inputs = M * K * s + weights * _weight_bytes_per_element(scheme, s)
    if scheme != "none":
        inputs += weights * 4 / 32
    if getattr(case, "bias", False):
        inputs += E_local * (N + K) * s
    inputs += routes * (4 + 8)
    lora = getattr(case, "lora", "none")
    if lora != "none":
        streams = 2 if lora == "dual" else 1
        inputs += streams * _LORA_ADAPTERS_BOUND * E_local * _LORA_RANK_BOUND * (2 * K + N + I) * s

    kernel = M * K * s  # the output
    import kernels  # here, not at import: this module stays free of torch and triton until planning

    kernel += kernels.TritonExperts().workspace_bytes(M, N, K, topk, E_local, activation, s, _SORT_BLOCK_M_BOUND)

    # Invariance checks keep the first output while re-running (its workspaces are freed between).
    kernel += len(getattr(case, "invariances", ())) * M * K * s

    # A huge case's reference runs on a row sample (matrix.reference_is_sampled): its stages and
    # the comparison temporaries scale with the sampled rows, not M.
    from moe_validate import matrix

    ref_rows = M
    if isinstance(case, matrix.Case) and matrix.reference_is_sampled(case):
        ref_rows = matrix.REFERENCE_SAMPLE_ROWS
    per_precision = weights * 8 + ref_rows * K * 8 + ref_rows * topk * (N + I + K) * 8 + ref_rows * K * 8
    reference = 2 * per_precision
    comparison = 8 * ref_rows * K * 8
    return int(math.ceil((inputs + kernel + reference + comparison) * ALLOCATOR_SLACK))


def gpu_budget_bytes(gpu: GpuInfo, workers_on_gpu: int) -> Optional[int]:
    """Memory the cases in flight on ``gpu`` may use together; None = unknown (no planning)."""
    if gpu.total_bytes is None:
        return None
    if not isinstance(workers_on_gpu, int) or workers_on_gpu < 1:
        raise ValueError(f"workers_on_gpu must be an int >= 1; got {workers_on_gpu!r}")
    return max(0, int(gpu.total_bytes * USABLE_FRACTION) - workers_on_gpu * PROCESS_OVERHEAD_BYTES)


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------
class GpuScheduler:
    """Which pending case an idle worker on GPU ``g`` takes next.

    ``budgets[g]`` is the memory the cases in flight on GPU g may use together (None = unknown:
    any number of cases may share it, as many as it has workers). Rules, in order:

    1. A GPU with nothing in flight takes any case, even one larger than its budget (that case
       then runs alone: nothing else is placed beside it while it is over budget).
    2. Otherwise a case is placed only if it fits: in-flight estimates + its estimate <= budget.
    3. The head of the queue cannot be starved: when it fits on no GPU, one GPU (the one with the
       least in flight) is reserved for it and takes nothing else until it is placed there.

    With budgets known the queue is ordered largest estimate first (stable), so big cases start
    while GPUs are empty and the long tail is small cases; otherwise the given order is kept.
    """

    def __init__(self, cases: Sequence, budgets: Sequence[Optional[int]],
                 estimate: Callable[[object], int] = case_memory_bytes):
        if not budgets:
            raise ValueError("budgets must list at least one GPU (use None entries for unknown memory)")
        for b in budgets:
            if b is not None and (not isinstance(b, int) or b < 0):
                raise ValueError(f"budgets must be ints >= 0 or None; got {b!r}")
        self.budgets = list(budgets)
        self._estimate = estimate
        self.sizes: Dict[int, int] = {}
        # Without a known budget nothing is estimated (cases need not be matrix.Case then).
        self.planned = any(b is not None for b in self.budgets)
        items = [(self._size(c), i, c) for i, c in enumerate(cases)]
        if self.planned:
            items.sort(key=lambda t: (-t[0], t[1]))
        self._pending: List = [c for _, _, c in items]
        self.in_flight: List[List] = [[] for _ in self.budgets]
        self.reserved_for_head: Optional[int] = None

    def _size(self, case) -> int:
        if not self.planned:
            return 0
        key = id(case)
        if key not in self.sizes:
            size = self._estimate(case)
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"estimate must return an int >= 0 bytes; got {size!r} for {case!r}")
            self.sizes[key] = size
        return self.sizes[key]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def used(self, gpu: int) -> int:
        return sum(self._size(c) for c in self.in_flight[gpu])

    def fits(self, gpu: int, case) -> bool:
        """Rule 1 and 2: whether ``case`` may start on ``gpu`` now."""
        if not self.in_flight[gpu]:
            return True
        budget = self.budgets[gpu]
        return budget is None or self.used(gpu) + self._size(case) <= budget

    def drain(self) -> List:
        """Removes and returns every pending case (a run that gives up records them as not run)."""
        cases, self._pending = self._pending, []
        return cases

    def take(self, gpu: int) -> Optional[object]:
        """The case an idle worker on ``gpu`` should run now (removed from the queue), or None."""
        if not 0 <= gpu < len(self.budgets):
            raise ValueError(f"gpu must be in 0..{len(self.budgets) - 1}; got {gpu!r}")
        if not self._pending:
            return None
        head = self._pending[0]
        if self.fits(gpu, head):
            return self._start(gpu, 0)
        if not any(self.fits(g, head) for g in range(len(self.budgets))):
            if self.reserved_for_head is None:
                # Rule 3: the GPU with the least in flight frees up first (ties: lowest index).
                self.reserved_for_head = min(range(len(self.budgets)), key=lambda g: (self.used(g), g))
            if self.reserved_for_head == gpu:
                return None
        for pos in range(1, len(self._pending)):
            if self.fits(gpu, self._pending[pos]):
                return self._start(gpu, pos)
        return None

    def _start(self, gpu: int, pos: int):
        case = self._pending.pop(pos)
        if pos == 0:
            self.reserved_for_head = None
        self.in_flight[gpu].append(case)
        return case

    def finish(self, gpu: int, case) -> None:
        """``case`` left ``gpu`` (finished, crashed or timed out)."""
        for i, c in enumerate(self.in_flight[gpu]):
            if c is case:
                del self.in_flight[gpu][i]
                return
        raise ValueError(f"case {getattr(case, 'id', case)!r} is not in flight on gpu {gpu}")
