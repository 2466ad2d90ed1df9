"""The call contract: what every ``backend.run(inputs, case)`` must honour, checked on every call.

  inputs   left unchanged: every tensor of ``MoEInputs`` (hidden_states, w1, w2, topk_weights,
           topk_ids, expert_map, the scales, biases and zero points of ``quant``, the LoRA
           tensors) has the same shape, strides and bits after the call as before.
  output   a ``torch.Tensor`` of shape [M, K]; dtype = the storage dtype S (SPEC "Shapes and
           names"; a float32 or float64 output is a failure, not a more accurate pass); on the
           inputs' device (the harness never moves it silently); unit column stride with rows
           that do not overlap (``stride(1) == 1``, ``stride(0) >= K``: a contiguous tensor or a
           row slice of a wider buffer); sharing no memory with any input (not in place: an
           experts call whose output overwrote ``hidden_states`` would also change an input).

Each violated clause is a named check (``CHECK_NAMES``) in the case's ``checks`` with a message
naming the tensor or the property, what was expected and what came back.

How inputs are snapshotted: a device-side bitwise digest, not a clone. A clone doubles the
inputs' memory (a DeepSeek-sized ``w1`` alone is 15 GB), a digest needs a few temporary slices.
Each tensor's bytes (the viewed elements, any strides) are read as uint8 words ``b_i`` and
summed as ``sum_i b_i * h_i mod P`` (``P = 2^31 - 1``, a prime, ``h_i = (i * A mod (P - 1)) + 1``,
so ``0 < h_i < P``) for two independent multipliers ``A``, in int64 without overflow (a slice of
2^22 bytes sums below 2^62). Any change of a single byte changes both sums (P is prime and
larger than any byte difference or weight); a change of many bytes escapes only if two
independent sums mod P vanish together (about 2^-62 for changes not built to collide).
Shape, strides, dtype and device are compared exactly beside the digest. On a detected mutation
the harness rebuilds the inputs from the case seed (``inputs.make_inputs`` is deterministic),
checks that the rebuilt ones have the pre-call digests, and judges the output against those:
never against the mutated inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from moe_validate.contract.spec import LoRASpec, MoEInputs, QuantConfig, storage_dtype

__all__ = ["INPUTS_UNCHANGED", "OUTPUT_TYPE", "OUTPUT_SHAPE", "OUTPUT_DTYPE", "OUTPUT_DEVICE", "OUTPUT_LAYOUT",
           "OUTPUT_ALIASING", "CHECK_NAMES", "InputSnapshot", "snapshot", "named_tensors", "output_problems",
           "ContractedBackend", "digest"]

INPUTS_UNCHANGED = "contract:inputs_unchanged"
OUTPUT_TYPE = "contract:output_type"
OUTPUT_SHAPE = "contract:output_shape"
OUTPUT_DTYPE = "contract:output_dtype"
OUTPUT_DEVICE = "contract:output_device"
OUTPUT_LAYOUT = "contract:output_layout"
OUTPUT_ALIASING = "contract:output_aliasing"
CHECK_NAMES = (INPUTS_UNCHANGED, OUTPUT_TYPE, OUTPUT_SHAPE, OUTPUT_DTYPE, OUTPUT_DEVICE, OUTPUT_LAYOUT,
               OUTPUT_ALIASING)
# Without these the output cannot be judged at all (no values to compare): the case FAILs on them
# alone (so does an output on the meta device, which holds no values).
BLOCKING = (OUTPUT_TYPE, OUTPUT_SHAPE)

_P = (1 << 31) - 1
_MULTIPLIERS = (0x2545F491 % (_P - 1), 0x5BD1E995 % (_P - 1))
# 2^8 * 2^31 * 2^22 < 2^62: the int64 sum of one slice cannot overflow; its temporaries (the bytes
# as int64 and their products with two weights) stay near 100 MB on the device.
_SLICE_BYTES = 1 << 22


def named_tensors(inputs: MoEInputs) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor a backend receives, with a name a message can use (``quant.w1_scale``,
    ``lora.w13_a[0]``)."""
    for f in fields(inputs):
        value = getattr(inputs, f.name)
        if isinstance(value, (QuantConfig, LoRASpec)):
            for g in fields(value):
                yield from _tensors(f"{f.name}.{g.name}", getattr(value, g.name))
        else:
            yield from _tensors(f.name, value)


def _tensors(name: str, value: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(f"{name}[{i}]", v)


_WEIGHTS: Dict[str, torch.Tensor] = {}  # device -> the weights h_i of the first _CACHED_BYTES positions
_CACHED_BYTES = 1 << 20


def _weights(start: int, count: int, device: torch.device) -> torch.Tensor:
    """[count, 2] int64: h_i = (i * A mod (P - 1)) + 1 for i in [start, start + count), both A."""
    if start + count <= _CACHED_BYTES:
        table = _WEIGHTS.get(str(device))
        if table is None:
            table = _WEIGHTS[str(device)] = _weights_uncached(0, _CACHED_BYTES, device)
        return table[start:start + count]
    return _weights_uncached(start, count, device)


def _weights_uncached(start: int, count: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(start, start + count, dtype=torch.int64, device=device) % (_P - 1)
    multipliers = torch.tensor(_MULTIPLIERS, dtype=torch.int64, device=device)
    return index[:, None] * multipliers[None, :] % (_P - 1) + 1


def digest(t: torch.Tensor) -> Tuple[int, int]:
    """The two sums mod P of ``t``'s bytes (see the module docstring), computed on ``t``'s device."""
    t = t.detach()
    if t.numel() == 0:
        return (0, 0)
    if t.dim() == 0:
        t = t.reshape(1)
    row_bytes = max(1, t[0].numel() * t.element_size())
    rows_per_slice = max(1, _SLICE_BYTES // row_bytes)
    acc = torch.zeros(len(_MULTIPLIERS), dtype=torch.int64, device=t.device)
    offset = 0
    for start in range(0, t.shape[0], rows_per_slice):
        part = t[start:start + rows_per_slice].contiguous().reshape(-1).view(torch.uint8)
        for lo in range(0, part.numel(), _SLICE_BYTES):  # one row wider than a slice: split it
            words = part[lo:lo + _SLICE_BYTES].to(torch.int64)
            sums = (words[:, None] * _weights(offset, words.numel(), t.device)).sum(0)
            offset += words.numel()
            acc = (acc + sums % _P) % _P
    return tuple(int(v) for v in acc.tolist())


def _meta(t: torch.Tensor) -> Tuple:
    return (t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.device))


@dataclass
class InputSnapshot:
    """What the inputs were before a call: per tensor name, (dtype, shape, strides, offset, device)
    and the digest."""

    entries: Dict[str, Tuple[Tuple, Tuple[int, int]]]

    def changes(self, inputs: MoEInputs) -> List[str]:
        """The tensors of ``inputs`` that differ from this snapshot, each as one phrase."""
        now = {name: t for name, t in named_tensors(inputs)}
        out = []
        for name, (meta, sums) in self.entries.items():
            t = now.get(name)
            if t is None:
                out.append(f"{name} was removed")
            elif _meta(t) != meta:
                out.append(f"{name} changed shape/strides/dtype/device from {meta} to {_meta(t)}")
            elif digest(t) != sums:
                out.append(f"{name} {tuple(t.shape)} {t.dtype} was written to (its bits changed)")
        out += [f"{name} was added" for name in now if name not in self.entries]
        return out


def snapshot(inputs: MoEInputs) -> InputSnapshot:
    return InputSnapshot({name: (_meta(t), digest(t)) for name, t in named_tensors(inputs)})


def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None


def output_problems(out: Any, inputs: MoEInputs) -> List[Tuple[str, str]]:
    """(check name, message) for every clause of the output contract that ``out`` breaks."""
    M, K = inputs.hidden_states.shape
    if not isinstance(out, torch.Tensor):
        return [(OUTPUT_TYPE, f"run must return a torch.Tensor [M, K] = [{M}, {K}]; got {type(out).__name__}")]
    problems = []
    if tuple(out.shape) != (M, K):
        problems.append((OUTPUT_SHAPE, f"output must be [M, K] = [{M}, {K}]; got {list(out.shape)}"))
    S = storage_dtype(inputs.hidden_states.dtype)
    if out.dtype != S:
        problems.append((OUTPUT_DTYPE, f"output must have the storage dtype S = {S} (the dtype of hidden_states, "
                                       f"bf16 for fp8/int8 hidden states); got {out.dtype}"))
    device = inputs.hidden_states.device
    if out.device != device:
        problems.append((OUTPUT_DEVICE, f"output must be on the inputs' device {device}; got {out.device} "
                                        "(the harness does not move it)"))
    if out.dim() == 2 and out.shape[0] > 0 and out.shape[1] > 0:
        rows_overlap = out.shape[0] > 1 and out.stride(0) < out.shape[1]
        if (out.shape[1] > 1 and out.stride(1) != 1) or rows_overlap:
            problems.append((OUTPUT_LAYOUT, f"output must have unit column stride and rows that do not overlap "
                                            f"(stride(1) == 1, stride(0) >= K = {out.shape[1]}); got strides "
                                            f"{tuple(out.stride())}"))
    ptr = _storage_ptr(out)
    if ptr is not None:
        shared = [name for name, t in named_tensors(inputs) if _storage_ptr(t) == ptr]
        if shared:
            problems.append((OUTPUT_ALIASING, f"output shares memory with the input {', '.join(shared)}: in-place "
                                              "outputs are not part of the contract (allocate the output)"))
    return problems


class ContractedBackend:
    """A backend whose every ``run`` is checked against the call contract.

    Everything but ``run`` is the wrapped backend's (its capabilities included, so that
    ``backends.capability`` sees through). ``violations`` collects the first message per check
    name with the call it came from; ``calls`` counts the calls.
    """

    def __init__(self, backend: Any) -> None:
        self.__dict__["wrapped"] = backend
        self.__dict__["violations"] = {}
        self.__dict__["calls"] = 0
        self.__dict__["mutated"] = False  # some call changed its inputs
        self.__dict__["first_snapshot"] = None  # the inputs of the first call, before it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrapped"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["wrapped"], name, value)

    def run(self, inputs: MoEInputs, case=None):
        before = snapshot(inputs)
        if self.first_snapshot is None:
            self.__dict__["first_snapshot"] = before
        out = self.wrapped.run(inputs, case)
        self.__dict__["calls"] += 1
        call = self.calls
        changed = before.changes(inputs)
        if changed:
            self.__dict__["mutated"] = True
            self._note(INPUTS_UNCHANGED, f"the backend changed its inputs: {'; '.join(changed)}", call)
        for name, message in output_problems(out, inputs):
            self._note(name, message, call)
        return out

    def _note(self, name: str, message: str, call: int) -> None:
        if name not in self.violations:
            where = "" if call == 1 else f" (call {call} of the case: an invariance re-run)"
            self.violations[name] = f"{name}: {message}{where}"

    def checks(self) -> List[Dict[str, Any]]:
        """The contract's rows for the case record: one FAIL per violated clause, or one PASS."""
        if self.violations:
            return [{"name": name, "outcome": "FAIL", "reason": self.violations[name]}
                    for name in CHECK_NAMES if name in self.violations]
        return [{"name": "contract", "outcome": "PASS",
                 "reason": f"{self.calls} call(s): inputs unchanged; output [M, K], dtype S, on the inputs' "
                           "device, unit column stride, not aliasing an input"}]

    def untouched_inputs(self, case, device: str) -> MoEInputs:
        """The first call's inputs as they were before it: rebuilt from the case seed and checked
        against its snapshot (a rebuild that differs is a harness error, raised)."""
        from moe_validate.inputs import make_inputs

        fresh = make_inputs(case, device=device)
        differ = self.first_snapshot.changes(fresh)
        if differ:
            raise RuntimeError(f"the inputs rebuilt from the case seed differ from the ones the backend got "
                               f"({'; '.join(differ)}): make_inputs is not deterministic for {case.id}")
        return fresh

    def blocked(self, out: Any) -> Optional[str]:
        """The message of a violation that leaves ``out`` (the first call's) no values to judge:
        not a tensor, the wrong shape, or a tensor without data (the meta device); else None."""
        for name in BLOCKING:
            if name in self.violations:
                return self.violations[name]
        if out.device.type == "meta":
            return self.violations.get(OUTPUT_DEVICE, f"{OUTPUT_DEVICE}: a meta tensor holds no values")
        return None
