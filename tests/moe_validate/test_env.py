"""The environment record: complete and JSON-ready on a CPU machine, never failing."""

import json
import re

from moe_validate import env as env_mod
from moe_validate.env import capture_env, format_env

RESULTS_KEYS = {"gpu", "capability", "driver", "cuda", "torch", "triton", "interpreter", "commit", "host", "python"}


def test_capture_env_on_cpu(monkeypatch):
    import torch
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = capture_env()
    assert RESULTS_KEYS <= set(env)  # every key moe_validate/results.py promises in a header
    assert env["gpu"] is None and env["capability"] is None and env["driver"] is None and env["gpu_count"] == 0
    assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__
    assert env["interpreter"] is True and env["cpu_count"] >= 1 and env["python"].count(".") == 2
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["commit"])
    json.dumps(env)  # goes into the results header as is


def test_interpreter_flag_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert capture_env()["interpreter"] is False


def test_missing_git_leaves_commit_empty(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert env_mod._git_commit(env_mod._REPO_ROOT) is None
    assert capture_env()["commit"] is None


def test_broken_cuda_query_is_recorded_not_raised(monkeypatch):
    import torch

    def boom():
        raise RuntimeError("driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    env = capture_env()
    assert env["gpu"] is None and "driver too old" in env["torch_error"]


def test_format_env_one_line_per_key():
    env = {"gpu": None, "torch": "2.13", "interpreter": True}
    lines = format_env(env).splitlines()
    assert len(lines) == 3 and lines[0].split() == ["gpu", "-"] and lines[2].split() == ["interpreter", "True"]


def test_kernels_digest_names_the_kernel_sources(tmp_path):
    """The digest follows the kernel files' content (not git), so a stale .git cannot hide a change."""
    import shutil

    from moe_validate import env as env_mod

    here = env_mod.kernels_digest()
    assert re.fullmatch(r"[0-9a-f]{16}", here) and capture_env()["kernels_digest"] == here
    shutil.copytree(env_mod._REPO_ROOT / "kernels", tmp_path / "kernels")
    assert env_mod.kernels_digest(tmp_path) == here  # same bytes elsewhere: same digest
    (tmp_path / "kernels" / "moe_sum.py").write_text((tmp_path / "kernels" / "moe_sum.py").read_text() + "\n# edit\n")
    assert env_mod.kernels_digest(tmp_path) != here
    assert env_mod.kernels_digest(tmp_path / "nowhere") is None
