"""moe_validate.cpus: CPUs from affinity and the cgroup quota, and torch threads per worker."""

import os

import pytest

from moe_validate import cpus


def _cgroup(tmp_path, files):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_cgroup_quota_v2_and_v1(tmp_path, files, limit):
    assert cpus.cgroup_cpu_limit(_cgroup(tmp_path, files)) == limit


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert cpus.usable_cpus(_cgroup(tmp_path / "none", {})) == 8
    assert cpus.usable_cpus(_cgroup(tmp_path / "q", {"cpu.max": "150000 100000"})) == 2
    assert cpus.usable_cpus(_cgroup(tmp_path / "big", {"cpu.max": "6400000 100000"})) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cpus.usable_cpus(_cgroup(tmp_path / "none", {})) == 1


def test_one_thread_per_worker_when_interpreting_or_under_xdist(monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 16)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cpus.intra_op_threads(2) == 8 and cpus.intra_op_threads(32) == 1
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert cpus.intra_op_threads(2) == 1
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cpus.intra_op_threads(1) == 1


def test_nothing_picks_worker_counts_from_os_cpu_count():
    """The harness sizes workers and threads by moe_validate.cpus, never the host's count."""
    from pathlib import Path

    root = Path(cpus.__file__).resolve().parent
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if "os.cpu_count()" in p.read_text(encoding="utf-8") and p.name not in ("cpus.py", "env.py")]
    assert users == []
