"""Golden outputs: each case's output stored bit for bit, and two stores compared in ulps.

Bring-up asks "does this GPU (driver, Triton) produce what the known-good machine produced?",
which metrics cannot answer: two correct kernels may round differently and both pass. So
``run --save-outputs DIR`` keeps each case's output as its raw bits, and ``compare --outputs
OLD NEW`` reports per case: bitwise-equal, the greatest ulp distance in the storage dtype, how
many elements differ and the first one (token, column, both values).

Storage: one ``<case>.npz`` per case (numpy's archive, compressed; numpy is already a dependency
of torch, safetensors is not ours). It holds ``bits`` (the output viewed as unsigned integers of
its width, since numpy has no bfloat16) and ``meta``, a JSON string: case id, seed, the sha256 of
the inputs (``input_digest``), dtype, shape, backend and the environment (gpu, driver, torch,
triton, commit, ...). Loading never unpickles (``allow_pickle=False``). A file per case lets
spawned workers write their own cases and ``--resume`` add the missing ones.

Two outputs are compared only when their inputs' digests agree: an ulp distance between outputs
of different inputs says nothing, so ``compare_outputs`` refuses (``GoldenError``) instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = ["GoldenError", "StoredOutput", "CaseOutputDiff", "OutputsDiff", "input_digest", "save_output",
           "load_outputs", "compare_outputs", "format_outputs_diff", "ulp_distance", "prepare_outputs_dir",
           "FORMAT"]

FORMAT = "moe-validate-outputs/1"
_SUFFIX = ".npz"
# The environment facts a bring-up comparison names (the rest of capture_env is host detail).
_ENV_KEYS = ("gpu", "capability", "driver", "cuda", "torch", "triton", "interpreter", "commit", "kernels_digest",
             "host")
# Width in bits of each storage dtype an output can have, by torch dtype name.
_WIDTH = {"bfloat16": 16, "float16": 16, "float32": 32, "float64": 64, "float8_e4m3fn": 8, "float8_e5m2": 8}
_UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


class GoldenError(ValueError):
    """A store that cannot be read or compared (not a store, unreadable file, different inputs)."""


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def input_digest(inputs) -> str:
    """sha256 (hex) over every field of the inputs: tensors by name, dtype, shape and bytes.

    Walks ``MoEInputs`` and the dataclasses inside it (quant, LoRA), so any change of a weight,
    scale, route or flag changes the digest.
    """
    import torch

    h = hashlib.sha256()

    def feed(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)}\0".encode())
            h.update(_tensor_bytes(value))
        elif is_dataclass(value) and not isinstance(value, type):
            for f in fields(value):
                feed(f"{name}.{f.name}", getattr(value, f.name))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{name}[{i}]", v)
        else:
            h.update(f"{name}={value!r}\0".encode())

    feed("inputs", inputs)
    return h.hexdigest()


def _file_name(case_id: str) -> str:
    """The case id where it is a safe file name, else a cleaned one with a hash of the id."""
    if re.fullmatch(r"[A-Za-z0-9._=-]+", case_id) and not case_id.startswith("."):
        return case_id + _SUFFIX
    clean = re.sub(r"[^A-Za-z0-9._=-]", "_", case_id).lstrip(".")[:150]
    return f"{clean}-{hashlib.sha256(case_id.encode()).hexdigest()[:10]}{_SUFFIX}"


_ENV_CACHE: Dict[str, Any] = {}


def _env() -> Dict[str, Any]:
    """This process's environment facts, captured once (git and nvidia-smi are subprocesses)."""
    if not _ENV_CACHE:
        from moe_validate.env import capture_env

        env = capture_env()
        _ENV_CACHE.update({k: env.get(k) for k in _ENV_KEYS})
    return dict(_ENV_CACHE)


def prepare_outputs_dir(path: Union[str, Path], *, resume: bool = False, overwrite: bool = False) -> Path:
    """Creates the store; a store holding outputs is refused unless resuming (adds) or overwriting (cleared).

    Only this module's files are removed by ``overwrite``; anything else there stays.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GoldenError(f"--save-outputs {path} is not a directory")
    held = sorted(path.glob("*" + _SUFFIX)) if path.is_dir() else []
    if held and not (resume or overwrite):
        raise GoldenError(f"--save-outputs {path} already holds {len(held)} outputs: choose an empty directory, "
                          "or pass --overwrite (replace them) or --resume (add the missing cases)")
    if overwrite:
        for f in held:
            f.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_output(directory: Union[str, Path], case, inputs, out, *, backend: str) -> Path:
    """Writes ``out`` (a tensor) of ``case`` run on ``inputs`` as ``<directory>/<case>.npz``; returns the path.

    Written to a temporary name and renamed, so a killed worker never leaves half a file.
    """
    import torch

    dtype = str(out.dtype).replace("torch.", "")
    if dtype not in _WIDTH:
        raise ValueError(f"out must be a floating tensor of {sorted(_WIDTH)}; got {out.dtype}")
    unsigned = getattr(torch, f"uint{_WIDTH[dtype]}")
    bits = out.detach().contiguous().cpu().view(unsigned).numpy()
    meta = {"format": FORMAT, "case_id": case.id, "seed": case.params().get("seed"),
            "input_digest": input_digest(inputs), "dtype": dtype, "shape": list(out.shape), "backend": backend,
            "env": _env()}
    path = Path(directory) / _file_name(case.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, bits=bits, meta=np.array(json.dumps(meta, sort_keys=True)))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass
class StoredOutput:
    case_id: str
    seed: Optional[int]
    input_digest: str
    dtype: str
    shape: Tuple[int, ...]
    backend: Optional[str]
    env: Dict[str, Any]
    bits: np.ndarray  # unsigned integers of the dtype's width, ``shape``
    path: Path

    @classmethod
    def load(cls, path: Path) -> "StoredOutput":
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                bits = data["bits"]
        except (OSError, ValueError, KeyError) as exc:
            raise GoldenError(f"{path} is not a readable output file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise GoldenError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("dtype") not in _WIDTH or list(bits.shape) != list(meta.get("shape", [])):
            raise GoldenError(f"{path}: dtype {meta.get('dtype')!r} / shape {meta.get('shape')} do not describe "
                              f"its bits {bits.dtype}{list(bits.shape)}")
        return cls(case_id=meta["case_id"], seed=meta.get("seed"), input_digest=meta["input_digest"],
                   dtype=meta["dtype"], shape=tuple(meta["shape"]), backend=meta.get("backend"),
                   env=meta.get("env") or {}, bits=bits, path=path)

    def values(self) -> np.ndarray:
        """The elements as float64 (for showing them)."""
        import torch

        t = torch.from_numpy(self.bits.view(_UNSIGNED[_WIDTH[self.dtype]]).copy())
        return t.view(getattr(torch, self.dtype)).to(torch.float64).numpy()


def load_outputs(directory: Union[str, Path], *, label: str = "outputs") -> Dict[str, StoredOutput]:
    """{case id: StoredOutput} of a store written by ``save_output``; ``GoldenError`` if none is there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GoldenError(f"{label} {directory} is not a directory")
    files = sorted(directory.glob("*" + _SUFFIX))
    if not files:
        raise GoldenError(f"{label} {directory} holds no output files (*{_SUFFIX}; written by run --save-outputs)")
    outputs: Dict[str, StoredOutput] = {}
    for f in files:
        out = StoredOutput.load(f)
        outputs[out.case_id] = out
    return outputs


# ---------------------------------------------------------------------------------------------
# comparing
# ---------------------------------------------------------------------------------------------
def _ordered(bits: np.ndarray, width: int) -> np.ndarray:
    """Sign-magnitude float bits as integers ordered like the values (+0 and -0 both 0).

    Adjacent representable values are adjacent integers, so the difference of two is their
    distance in ulps (across zero and up to infinity too).
    """
    u = bits.astype(np.uint64)
    sign = (u >> np.uint64(width - 1)) & np.uint64(1)
    magnitude = (u & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)
    return np.where(sign == 1, -magnitude, magnitude)


def ulp_distance(old: np.ndarray, new: np.ndarray, dtype: str) -> np.ndarray:
    """Per element, how many representable ``dtype`` values apart the two bit patterns are (float64).

    Equal bits are 0 apart (NaN included); a NaN against any other pattern is ``inf``.
    """
    width = _WIDTH[dtype]
    a, b = old.view(_UNSIGNED[width]), new.view(_UNSIGNED[width])
    dist = np.abs(_ordered(a, width) - _ordered(b, width)).astype(np.float64)
    nan = _is_nan(a, dtype) | _is_nan(b, dtype)
    return np.where(a == b, 0.0, np.where(nan, math.inf, dist))


def _is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    import torch

    t = torch.from_numpy(bits.copy()).view(getattr(torch, dtype))
    return torch.isnan(t.to(torch.float32) if t.element_size() == 1 else t).numpy()


@dataclass
class CaseOutputDiff:
    """One case present in both stores."""

    case_id: str
    dtype: str
    elements: int
    differing: int  # elements whose bits differ
    max_ulp: float  # greatest ulp distance in ``dtype`` (inf: a NaN against a number, or shapes differ)
    first: Optional[Dict[str, Any]] = None  # {"token", "column", "old", "new", "ulp"} of the first differing element
    problem: Optional[str] = None  # dtype or shape differ: not comparable element by element

    @property
    def equal(self) -> bool:
        return self.problem is None and self.differing == 0

    def line(self) -> str:
        if self.problem:
            return f"{self.case_id}: NOT COMPARABLE: {self.problem}"
        if self.equal:
            return f"{self.case_id}: bitwise-equal ({self.elements} elements)"
        f = self.first
        return (f"{self.case_id}: {self.differing} of {self.elements} elements differ, max {self.max_ulp:g} ulp "
                f"({self.dtype}); first at token {f['token']}, column {f['column']}: old {f['old']!r}, "
                f"new {f['new']!r} ({f['ulp']:g} ulp)")


@dataclass
class OutputsDiff:
    old: str
    new: str
    max_ulp: float
    cases: List[CaseOutputDiff] = field(default_factory=list)
    only_old: List[str] = field(default_factory=list)
    only_new: List[str] = field(default_factory=list)
    env_changes: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new)

    @property
    def beyond(self) -> List[CaseOutputDiff]:
        """Cases whose outputs differ by more than ``max_ulp`` (or cannot be compared)."""
        return [c for c in self.cases if c.problem or c.max_ulp > self.max_ulp]

    @property
    def exit_code(self) -> int:
        """3 when NEW lacks cases of OLD (its passes vouch for less), 1 beyond ``max_ulp``, else 0."""
        from moe_validate.exit_codes import EXIT_FAILURES, EXIT_INCOMPLETE, EXIT_PASS

        if self.only_old:
            return EXIT_INCOMPLETE
        return EXIT_FAILURES if self.beyond else EXIT_PASS


def _env_of(outputs: Dict[str, StoredOutput]) -> Dict[str, Any]:
    """The environment the store's cases agree on; a key they disagree on reads 'mixed'."""
    merged: Dict[str, Any] = {}
    for out in outputs.values():
        for k, v in out.env.items():
            merged[k] = v if merged.get(k, v) == v else "mixed"
    return merged


def _diff_case(old: StoredOutput, new: StoredOutput) -> CaseOutputDiff:
    n = int(np.prod(old.shape)) if old.shape else 1
    if old.dtype != new.dtype or old.shape != new.shape:
        return CaseOutputDiff(old.case_id, old.dtype, n, n, math.inf,
                              problem=f"old {old.dtype}{list(old.shape)}, new {new.dtype}{list(new.shape)}")
    ulps = ulp_distance(old.bits, new.bits, old.dtype)
    differing = np.flatnonzero(old.bits.reshape(-1) != new.bits.reshape(-1))
    diff = CaseOutputDiff(old.case_id, old.dtype, n, int(differing.size), float(ulps.max()) if n else 0.0)
    if differing.size:
        flat = int(differing[0])
        token, column = divmod(flat, old.shape[-1]) if len(old.shape) == 2 else (flat, 0)
        diff.first = {"token": token, "column": column, "old": float(old.values().reshape(-1)[flat]),
                      "new": float(new.values().reshape(-1)[flat]), "ulp": float(ulps.reshape(-1)[flat])}
    return diff


def compare_outputs(old_dir: Union[str, Path], new_dir: Union[str, Path], *, max_ulp: float = 0) -> OutputsDiff:
    """Compares two stores case by case; ``GoldenError`` when a common case's inputs differ."""
    if not (max_ulp >= 0 and math.isfinite(max_ulp)):
        raise GoldenError(f"--max-ulp must be a finite number >= 0; got {max_ulp}")
    old, new = load_outputs(old_dir, label="OLD"), load_outputs(new_dir, label="NEW")
    common = sorted(set(old) & set(new))
    other_inputs = [cid for cid in common if old[cid].input_digest != new[cid].input_digest]
    if other_inputs:
        shown = ", ".join(other_inputs[:5]) + (" ..." if len(other_inputs) > 5 else "")
        raise GoldenError(f"the inputs of {len(other_inputs)} of {len(common)} common cases differ between {old_dir} "
                          f"and {new_dir} (input digest), so their outputs cannot be compared: {shown}. Both runs "
                          "must generate the same inputs (same case ids and seeds, same inputs.py)")
    diff = OutputsDiff(str(old_dir), str(new_dir), max_ulp, [_diff_case(old[c], new[c]) for c in common],
                       sorted(set(old) - set(new)), sorted(set(new) - set(old)))
    old_env, new_env = _env_of(old), _env_of(new)
    diff.env_changes = {k: (old_env.get(k), new_env.get(k)) for k in sorted(set(old_env) | set(new_env))
                        if old_env.get(k) != new_env.get(k)}
    return diff


def format_outputs_diff(diff: OutputsDiff, *, show_equal: bool = True) -> str:
    """The text report: environment changes, one line per case, cases on one side only, the verdict."""
    lines = [f"outputs: {diff.old} -> {diff.new}"]
    for k, (a, b) in diff.env_changes.items():
        lines.append(f"  env {k}: {a} -> {b}")
    for c in diff.cases:
        if show_equal or not c.equal:
            lines.append(c.line())
    for cid in diff.only_old:
        lines.append(f"{cid}: only in OLD (missing from NEW)")
    for cid in diff.only_new:
        lines.append(f"{cid}: only in NEW")
    equal = sum(1 for c in diff.cases if c.equal)
    beyond = diff.beyond
    allowed = "bitwise" if diff.max_ulp == 0 else f"--max-ulp {diff.max_ulp:g}"
    lines.append(f"{len(diff.cases)} common cases: {equal} bitwise-equal, {len(diff.cases) - equal} differ, "
                 f"{len(beyond)} beyond {allowed}; {len(diff.only_old)} only in OLD, {len(diff.only_new)} only in NEW")
    return "\n".join(lines)
