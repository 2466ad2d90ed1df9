"""Backends with planted misbehaviour, loaded by the runner as ``fake_backends:<Name>``.

Importable by name (not a test module) so that spawned worker processes and ``moe-validate``
subprocesses can load them; the tests put this directory on ``sys.path`` / ``PYTHONPATH``.
Passing answers come from the real float64 reference (``ReferenceBackend``), so every fake
either returns what the sanity backend returns or fails in one planted way.
"""

import ctypes
import os
import time

from moe_validate.backends import ReferenceBackend


class _Base:
    name = "fake"
    last_config = None

    def supports(self, case):
        return True, ""

    def _correct(self, inputs, case):
        return ReferenceBackend().run(inputs, case)


class Pass(_Base):
    """The reference's answer with a config record: must PASS."""

    name = "fake-pass"

    def run(self, inputs, case=None):
        self.last_config = {"BLOCK_M": 16, "planted": "none"}
        return self._correct(inputs, case)


class Raise(_Base):
    """Raises on the cases of seed 1, passes the rest."""

    name = "fake-raise"

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            raise RuntimeError("planted failure in the backend")
        return self._correct(inputs, case)


class Exit(_Base):
    """The worker process exits with status 3 on the cases of seed 1."""

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            os._exit(3)
        return self._correct(inputs, case)


class Segfault(_Base):
    """Dereferences NULL (SIGSEGV) on the cases of seed 1."""

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            ctypes.string_at(0)
        return self._correct(inputs, case)


class Hang(_Base):
    """Sleeps far past any test timeout on the cases of seed 1."""

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            time.sleep(3600)
        return self._correct(inputs, case)


class Slow(_Base):
    """Passes, 0.4 s per case: gives a test time to kill a run mid-way."""

    def run(self, inputs, case=None):
        time.sleep(0.4)
        return self._correct(inputs, case)


class Oom(_Base):
    def run(self, inputs, case=None):
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted)")


class CompileError(_Base):
    def run(self, inputs, case=None):
        from triton.compiler.errors import CompilationError

        try:
            raise CompilationError(None, None, "planted: BLOCK_K must be >= 32 for fp8 dots")
        except CompilationError as exc:  # wrapped, as a launcher might do
            raise RuntimeError("kernel launch failed") from exc


class Wrong(_Base):
    """A planted numeric bug: the output scaled by 1.5 (a dropped/duplicated router weight)."""

    def run(self, inputs, case=None):
        return self._correct(inputs, case) * 1.5


class Unsupported(_Base):
    def supports(self, case):
        if case.dtype == "fp32":
            return False, "planted: fp32 not supported by this backend"
        return True, ""

    def run(self, inputs, case=None):
        return self._correct(inputs, case)


def make_pass():
    """A factory, for the 'module:attr names a function' form of --backend."""
    return Pass()


NOT_A_BACKEND = object()


class Poison(_Base):
    """Raises what a device fault looks like on the cases of seed 1 (the context is then unusable)."""

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (planted)")
        return self._correct(inputs, case)


class Unserializable(_Base):
    """Passes, with a launch config JSON cannot hold (a set, a function, a tensor, an object)."""

    def run(self, inputs, case=None):
        import torch

        self.last_config = {"tiles": {16, 32}, "pick": lambda m: m, "scale": torch.tensor([0.5, 2.0]),
                            ("BLOCK_M", 1): object(), "fine": 64}
        return self._correct(inputs, case)


class _Hostile(Exception):
    def __str__(self):
        raise RuntimeError("__str__ of a hostile exception")


class HostileError(_Base):
    """Raises an exception whose str() itself raises."""

    def run(self, inputs, case=None):
        raise _Hostile()


class HugeError(_Base):
    """Raises with a 5 MB message (a tensor printed into an error, a runaway log)."""

    def run(self, inputs, case=None):
        raise RuntimeError("head-of-message " + "x" * 5_000_000 + " tail-of-message")


class HangAll(_Base):
    """Every case hangs: a wedged backend."""

    def run(self, inputs, case=None):
        time.sleep(3600)


class Mixed(_Base):
    """One run with every kind of outcome: fp32 unsupported (SKIP), seed 1 raises (CRASH), seed 3
    answers wrong (FAIL), the rest pass. For writers of run summaries (JUnit XML, --rerun-failed)."""

    name = "fake-mixed"

    def supports(self, case):
        if case.dtype == "fp32":
            return False, "planted: fp32 not supported by this backend"
        return True, ""

    def run(self, inputs, case=None):
        if case is not None and case.seed == 1:
            raise RuntimeError("planted failure in the backend")
        out = self._correct(inputs, case)
        return out * 1.5 if case is not None and case.seed == 3 else out
