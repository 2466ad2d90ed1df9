"""How many CPUs this process may use, and how many torch threads each worker process gets.

``os.cpu_count()`` counts the host's CPUs, not this process's: a container limited by its
cgroup's CPU quota, or a job pinned by ``taskset``/Slurm to a few cores, reports the whole
machine, and N workers times that many threads oversubscribe it. ``usable_cpus()`` takes the
process's affinity (``os.sched_getaffinity``) capped by the cgroup quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up: a 1.5-CPU quota runs 2 threads in
bursts at best.

``intra_op_threads(workers)``: one torch intra-op thread per worker whenever kernels are
interpreted or the process is a pytest-xdist worker. The interpreter's work is many small tensor
ops, where a second thread only adds hand-offs and spins against the other processes for the
same cores. Measured on a 2-core machine shared with other jobs (load average 14-19, 2026-12-02):
``run --suite smoke --workers 1`` 81.7 s user CPU with torch's default two threads, 34.5 s with
one (97 outputs bitwise-equal); ``pytest -n 2 tests/test_validation_suite.py`` (the 97 smoke
items) 80.2 s against 33.8 s. ``OMP_NUM_THREADS=1`` on top of this rule gained nothing measurable
on tests/kernels + tests/reference + the suite (126 s against 137 s user, the load rising). Native GPU runs share the usable CPUs among the workers (the
host-side tolerance model and statistics are larger ops).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from moe_validate.contract.rules import interpreting

__all__ = ["usable_cpus", "cgroup_cpu_limit", "single_threaded", "intra_op_threads", "xdist_workers",
           "limit_torch_threads"]

_CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP) -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (1.5 = 150 ms per 100 ms), or None if unlimited.

    Reads the v2 file ``cpu.max`` ("max 100000" or "150000 100000") at ``root``, else v1's
    ``cpu/cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu.cfs_period_us``. A container sees its own
    cgroup at ``/sys/fs/cgroup``; an unreadable or malformed file means no known limit.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: Path = _CGROUP) -> int:
    """CPUs this process may run on: its affinity, capped by its cgroup's quota (rounded up); at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no affinity call, the host's count is all we know
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)


def xdist_workers() -> int:
    """How many pytest-xdist workers this session has (0: not under xdist)."""
    try:
        return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    except ValueError:
        return 0


def single_threaded() -> bool:
    """Whether each process should run one torch intra-op thread: interpreting, or a pytest-xdist worker."""
    return interpreting() or xdist_workers() > 0


def intra_op_threads(workers: int) -> int:
    """torch intra-op threads for each of ``workers`` processes sharing this process's CPUs.

    One where ``single_threaded()`` (the measurement in the module docstring), else the usable
    CPUs shared evenly among the workers.
    """
    if single_threaded():
        return 1
    return max(1, usable_cpus() // max(1, workers))


def limit_torch_threads(workers: int) -> int:
    """Sets torch's intra-op threads to ``intra_op_threads(workers)``; returns the count."""
    import torch

    threads = intra_op_threads(workers)
    torch.set_num_threads(threads)
    return threads
