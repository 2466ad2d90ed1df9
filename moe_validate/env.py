"""The environment a run happened in, recorded in every results header.

``capture_env()`` never raises: on a CPU machine the GPU fields are ``None``, and a missing
``git`` or ``nvidia-smi`` leaves its field ``None`` rather than failing the run. Keys follow
``moe_validate.results`` (gpu, capability, driver, cuda, torch, triton, interpreter, commit,
host, python) plus ``cpu_count``, ``usable_cpus``, ``gpu_count``, ``platform`` and ``kernels_digest``.

``kernels_digest`` names the kernel sources themselves (sha256 of ``kernels/**/*.py``, 16 hex
digits): a copied tree can carry a stale ``.git`` (seen on the device machine, whose commit
stayed at an older sync while the files were current), so the commit alone does not say which
kernels produced a result or a tuned table.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from moe_validate.contract.rules import interpreting
from moe_validate.cpus import usable_cpus

__all__ = ["capture_env", "format_env", "kernels_digest"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list, cwd: Optional[Path] = None) -> Optional[str]:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _git_commit(root: Path) -> Optional[str]:
    """The commit of the tree this package was loaded from, with "+dirty" when it has edits."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return None
    # --untracked-files=no: scratch files beside the tree do not make the commit "dirty".
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit + ("+dirty" if status else "")


def kernels_digest(root: Path = _REPO_ROOT) -> Optional[str]:
    """sha256 (first 16 hex digits) over the kernel sources' relative paths and bytes."""
    files = sorted((root / "kernels").rglob("*.py"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _driver_version() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def capture_env(device_index: Optional[int] = None) -> Dict[str, Any]:
    """A JSON-ready dict describing this machine; GPU facts for ``device_index`` (default current)."""
    env: Dict[str, Any] = {
        "gpu": None,
        "gpu_count": 0,
        "capability": None,
        "driver": None,
        "cuda": None,
        "torch": None,
        "triton": None,
        "interpreter": interpreting(),
        "commit": _git_commit(_REPO_ROOT),
        "kernels_digest": kernels_digest(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # affinity and cgroup quota: what worker counts are sized by
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            index = torch.cuda.current_device() if device_index is None else device_index
            env["gpu"] = torch.cuda.get_device_name(index)
            env["capability"] = list(torch.cuda.get_device_capability(index))
            env["gpu_count"] = torch.cuda.device_count()
            env["driver"] = _driver_version()
    except Exception as exc:  # a broken CUDA install must not stop a CPU run from being recorded
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    return env


def format_env(env: Dict[str, Any]) -> str:
    """``key: value`` lines, in a fixed order, for ``moe-validate env``."""
    width = max(len(k) for k in env)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in env.items())


if __name__ == "__main__":  # pragma: no cover - convenience
    print(format_env(capture_env()), file=sys.stdout)
