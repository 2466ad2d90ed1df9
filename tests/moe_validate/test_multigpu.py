"""Several GPUs on CPU: visible devices, worker pinning, memory-aware placement, shards that merge.

No GPU is needed: device counts (0, 1, 2, 8), an outer ``CUDA_VISIBLE_DEVICES`` ("3,5", UUIDs,
MIG ids) and memory sizes are simulated. Spawned workers report the ``CUDA_VISIBLE_DEVICES``
they were BORN with (``/proc/self/environ``, the environment at exec), which is what CUDA reads
at initialisation. The backends below are loaded by spawned workers as ``test_multigpu:<Name>``.
"""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_validate import devices, runner
from moe_validate.backends import ReferenceBackend
from moe_validate.devices import GIB, GpuInfo, GpuScheduler, case_memory_bytes, visible_entries, worker_gpus
from moe_validate.matrix import Case, filter_cases, suite_cases
from moe_validate.results import load_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


# --- backends for spawned workers --------------------------------------------------------------
def _birth_environment():
    """The environment this process was exec'd with (what a CUDA initialisation would see)."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


class WhereAmI:
    """The reference's answer; its config records where the worker runs and when the case ran."""

    name = "where-am-i"
    sleep_s = 0.0

    def __init__(self):
        self.last_config = None

    def supports(self, case):
        return True, ""

    def run(self, inputs, case=None):
        start = time.time()
        time.sleep(self.sleep_s)
        out = ReferenceBackend().run(inputs, case)
        self.last_config = {"pid": os.getpid(), "start": start, "end": time.time(),
                            "cvd_now": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "cvd_at_birth": _birth_environment().get("CUDA_VISIBLE_DEVICES")}
        return out


class SlowWhereAmI(WhereAmI):
    sleep_s = 0.5


class Mixed:
    """Every outcome the report distinguishes, by seed: PASS, FAIL (output x1.5), CRASH, SKIP (fp32)."""

    name = "mixed"
    last_config = None

    def supports(self, case):
        if case.dtype == "fp32":
            return False, "planted: fp32 not supported"
        return True, ""

    def run(self, inputs, case=None):
        if case.seed % 3 == 2:
            raise RuntimeError("planted crash")
        out = ReferenceBackend().run(inputs, case)
        self.last_config = {"BLOCK_M": 16}
        return out * 1.5 if case.seed % 3 == 1 else out


@pytest.fixture(autouse=True)
def _this_module_importable(monkeypatch):
    # Spawned workers inherit sys.path: they import this file as `test_multigpu`.
    monkeypatch.syspath_prepend(str(HERE))


# Four identical shapes (same memory estimate), different seeds: cheap under the reference.
SAME_SIZE = [Case(M=7, N=64, K=64, E=4, topk=2, seed=s) for s in range(4)]


# =================================================================================================
# Visible devices and worker -> GPU
# =================================================================================================
@pytest.mark.parametrize("cvd, count, expected", [
    (None, 0, []),
    (None, 1, ["0"]),
    (None, 2, ["0", "1"]),
    (None, 8, [str(i) for i in range(8)]),
    ("3,5", 2, ["3", "5"]),
    (" 3 , 5 ", 2, ["3", "5"]),
    ("GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000001,GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000002", 2,
     ["GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000001", "GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000002"]),
    ("MIG-4b1e0a2c-1111-2222-3333-444444444444", 1, ["MIG-4b1e0a2c-1111-2222-3333-444444444444"]),
    ("MIG-GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000001/1/0", 1, ["MIG-GPU-8f1c0c1e-aaaa-bbbb-cccc-000000000001/1/0"]),
    # CUDA stops at the first invalid entry ("7,x,5" shows one GPU): the count cuts the list.
    ("7,x,5", 1, ["7"]),
    ("", 0, []),
    ("3,5", 0, []),
])
def test_visible_entries_are_the_outer_entries_in_order(cvd, count, expected):
    assert visible_entries(cvd, count) == expected


@pytest.mark.parametrize("args, error", [
    ((None, -1), ValueError), ((None, 1.0), ValueError), ((None, True), ValueError), ((3, 1), TypeError),
])
def test_visible_entries_rejects_bad_arguments(args, error):
    with pytest.raises(error, match="device_count|cuda_visible_devices"):
        visible_entries(*args)


@pytest.mark.parametrize("count", [0, 1, 2, 8])
@pytest.mark.parametrize("cvd", [None, "3,5,6,7,9,10,11,12"])
def test_runner_visible_gpus_follow_simulated_cuda(monkeypatch, count, cvd):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if cvd is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    expected = (cvd.split(",") if cvd else [str(i) for i in range(8)])[:count]
    assert runner.visible_gpus() == expected


@pytest.mark.parametrize("gpu_count", [0, 1, 2, 8])
def test_default_workers_is_one_per_gpu_and_one_on_cpu(gpu_count):
    gpus = [GpuInfo(str(i), 80 * GIB) for i in range(gpu_count)]
    assert runner.default_workers(gpus) == max(1, gpu_count)


@pytest.mark.parametrize("workers, gpu_count, expected", [
    (1, 0, [None]),
    (3, 0, [None, None, None]),
    (1, 1, [0]),
    (3, 1, [0, 0, 0]),
    (2, 2, [0, 1]),
    (5, 2, [0, 1, 0, 1, 0]),
    (8, 8, list(range(8))),
    (3, 8, [0, 1, 2]),
    (16, 8, list(range(8)) * 2),
])
def test_worker_gpus_round_robin(workers, gpu_count, expected):
    assert worker_gpus(workers, gpu_count) == expected


# =================================================================================================
# Spawned workers are born pinned to their entry
# =================================================================================================
def test_each_worker_is_born_pinned_to_its_own_gpu_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,MIG-bbbb")  # the outer selection: kept by the parent
    entries = ["GPU-aaaa", "MIG-bbbb"]
    summary = runner.run_cases(SAME_SIZE, "test_multigpu:WhereAmI", tmp_path, workers=None,
                               gpus=[GpuInfo(e, 80 * GIB) for e in entries], progress=None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,MIG-bbbb"
    results = load_results([summary.results_path])
    assert results.headers[0]["workers"] == 2 and results.headers[0]["gpus"] == entries
    configs = [c["config"] for c in results.cases]
    assert [c["outcome"] for c in results.cases] == ["PASS"] * 4
    for cfg in configs:
        # Born with it: CUDA could not have been initialised with both GPUs visible.
        assert cfg["cvd_at_birth"] == cfg["cvd_now"] and cfg["cvd_now"] in entries, cfg
    by_pid = {}
    for cfg in configs:
        by_pid.setdefault(cfg["pid"], set()).add(cfg["cvd_now"])
    assert all(len(e) == 1 for e in by_pid.values()), f"a worker changed GPUs: {by_pid}"
    assert set().union(*by_pid.values()) <= set(entries)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker-*.log"))
    assert "CUDA_VISIBLE_DEVICES=GPU-aaaa" in logs and "CUDA_VISIBLE_DEVICES=MIG-bbbb" in logs


def _overlaps(configs):
    spans = sorted((c["start"], c["end"]) for c in configs)
    return any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_two_workers_share_a_gpu_only_when_both_cases_fit(tmp_path):
    size = case_memory_bytes(SAME_SIZE[0])
    assert all(case_memory_bytes(c) == size for c in SAME_SIZE)
    overhead = 2 * devices.PROCESS_OVERHEAD_BYTES  # two workers on the one GPU

    def gpu_with_budget(budget):
        return GpuInfo("0", int((budget + overhead) / devices.USABLE_FRACTION) + 1)

    # Budget for 1.5 cases: the two workers must take turns. Budget for 4 cases: they overlap.
    tight = runner.run_cases(SAME_SIZE, "test_multigpu:SlowWhereAmI", tmp_path / "tight", workers=2,
                             gpus=[gpu_with_budget(int(1.5 * size))], progress=None)
    roomy = runner.run_cases(SAME_SIZE, "test_multigpu:SlowWhereAmI", tmp_path / "roomy", workers=2,
                             gpus=[gpu_with_budget(4 * size)], progress=None)
    tight_cfgs = [c["config"] for c in load_results([tight.results_path]).cases]
    roomy_cfgs = [c["config"] for c in load_results([roomy.results_path]).cases]
    assert len(tight_cfgs) == len(roomy_cfgs) == 4
    assert not _overlaps(tight_cfgs), "two cases that do not fit together ran at once on one GPU"
    assert _overlaps(roomy_cfgs), "two workers on a roomy GPU should run cases at once"


# =================================================================================================
# Memory estimate
# =================================================================================================
def test_estimate_covers_the_float64_reference_weights_and_grows_with_the_shape():
    base = Case(M=80, N=512, K=384, E=16, topk=2)
    reference_weights = 2 * base.E * (base.N * base.K + base.K * base.I) * 8  # both precisions
    assert case_memory_bytes(base) > reference_weights
    for bigger in (Case(M=800, N=512, K=384, E=16, topk=2), Case(M=80, N=1024, K=384, E=16, topk=2),
                   Case(M=80, N=512, K=768, E=16, topk=2), Case(M=80, N=512, K=384, E=32, topk=2),
                   Case(M=80, N=512, K=384, E=16, topk=4), Case(M=80, N=512, K=384, E=16, topk=2, lora="dual"),
                   Case(M=80, N=512, K=384, E=16, topk=2, dtype="fp32")):
        assert case_memory_bytes(bigger) > case_memory_bytes(base), bigger.id
    # Half the experts are local with an expert map: fewer weights on this device.
    assert case_memory_bytes(Case(M=80, N=512, K=384, E=16, topk=2, expert_map="half")) < case_memory_bytes(base)


def test_every_nightly_case_fits_one_h100_worker_and_the_largest_bringup_case_is_big():
    h100 = devices.gpu_budget_bytes(GpuInfo("0", 80 * GIB), 1)
    assert max(case_memory_bytes(c) for c in suite_cases("nightly")) < h100 / 8
    # bringup's M=1 decode on E=64, N=4096, K=2048: 64*(4096*2048 + 2048*2048) weights held in float64
    # by both reference precisions is 12.9 GB alone: eight such cases would not fit one H100 together.
    largest = max(suite_cases("bringup"), key=case_memory_bytes)
    assert case_memory_bytes(largest) > 2 * 64 * (4096 * 2048 + 2048 * 2048) * 8


def test_estimate_rejects_non_cases():
    with pytest.raises(TypeError, match="case must be a matrix.Case"):
        case_memory_bytes(object())


# =================================================================================================
# Scheduler (pure: synthetic sizes)
# =================================================================================================
class _Sized:
    def __init__(self, name, size):
        self.id, self.size = name, size

    def __repr__(self):
        return f"{self.id}({self.size})"


def _sched(sizes, budgets):
    cases = [_Sized(f"c{i}", s) for i, s in enumerate(sizes)]
    return cases, GpuScheduler(cases, budgets, estimate=lambda c: c.size)


def test_unknown_memory_keeps_the_given_order_and_does_not_limit():
    cases, s = _sched([5, 50, 500], [None])
    assert [s.take(0), s.take(0), s.take(0), s.take(0)] == cases + [None]


def test_largest_first_and_cases_that_do_not_fit_wait():
    cases, s = _sched([3, 6, 6, 3], [10])
    first = s.take(0)
    assert first is cases[1]  # largest first (stable among equals)
    assert s.take(0) is None  # the other 6 does not fit beside it (6 + 6 > 10)
    s.finish(0, first)
    second = s.take(0)
    assert second is cases[2]
    third = s.take(0)
    assert third is cases[0]  # 6 + 3 <= 10
    assert s.take(0) is None  # 6 + 3 + 3 > 10
    s.finish(0, second)
    assert s.take(0) is cases[3]  # 3 + 3 <= 10
    assert s.pending == 0 and s.take(0) is None


def test_a_case_larger_than_the_gpu_runs_alone():
    cases, s = _sched([50, 1, 1], [10, 10])
    big = s.take(0)
    assert big.size == 50
    assert s.take(0) is None, "nothing may share a GPU with a case over its budget"
    small = s.take(1)
    assert small.size == 1  # the other GPU keeps working
    s.finish(0, big)
    assert s.take(0).size == 1


def test_the_head_of_the_queue_is_not_starved_by_small_cases():
    # One GPU (budget 10), two workers. The second 6 fits beside nothing but the small cases; if
    # they were placed whenever they fit, a stream of them could keep it waiting forever. The GPU
    # is reserved for the head instead: it takes nothing more until the head starts there.
    cases, s = _sched([6, 6, 1, 1, 1], [10])
    first = s.take(0)
    assert first.size == 6
    assert s.take(0) is None and s.reserved_for_head == 0
    s.finish(0, first)
    assert s.take(0).size == 6 and s.reserved_for_head is None
    assert s.take(0).size == 1  # 6 + 1 fits: small cases fill in behind it


def test_a_blocked_head_reserves_one_gpu_and_the_others_keep_working():
    cases, s = _sched([9, 9, 9, 1, 1], [10, 10])
    a, b = s.take(0), s.take(1)
    assert a.size == b.size == 9
    assert s.take(0) is None  # GPU 0 (least in flight, lowest index) is reserved for the third 9
    assert s.take(1).size == 1  # 9 + 1 fits on GPU 1
    s.finish(0, a)
    assert s.take(0).size == 9


@pytest.mark.parametrize("seed", range(6))
def test_simulated_runs_never_oversubscribe_and_always_finish(seed):
    """Discrete-event runs over random sizes, budgets and worker counts: at every moment each GPU
    holds either one case or cases whose sizes sum within its budget; every case finishes."""
    rng = random.Random(seed)
    gpu_count = rng.choice([1, 2, 8])
    workers_per_gpu = rng.choice([1, 2, 3])
    budgets = [rng.randint(5, 40) for _ in range(gpu_count)]
    sizes = [rng.choice([1, 2, 3, 5, 8, 13, 60]) for _ in range(rng.randint(5, 60))]
    cases, s = _sched(sizes, budgets)
    workers = [(g, w) for g in range(gpu_count) for w in range(workers_per_gpu)]
    running = {}  # worker -> (case, end time)
    now, done = 0.0, []
    while s.pending or running:
        for worker in workers:
            if worker not in running:
                case = s.take(worker[0])
                if case is not None:
                    running[worker] = (case, now + rng.uniform(0.5, 3.0))
        for g in range(gpu_count):
            on_gpu = [c for (gg, _), (c, _) in running.items() if gg == g]
            assert len(on_gpu) <= 1 or sum(c.size for c in on_gpu) <= budgets[g], (g, on_gpu, budgets[g])
        assert running, f"deadlock: {s.pending} pending, nothing running"
        worker, (case, end) = min(running.items(), key=lambda kv: kv[1][1])
        now = end
        del running[worker]
        s.finish(worker[0], case)
        done.append(case)
    assert sorted(c.id for c in done) == sorted(c.id for c in cases)


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budgets"):
        GpuScheduler([], [])
    with pytest.raises(ValueError, match="budgets"):
        GpuScheduler([], [-1])
    _, s = _sched([1], [10])
    with pytest.raises(ValueError, match="gpu must be in 0..0"):
        s.take(1)
    with pytest.raises(ValueError, match="not in flight"):
        s.finish(0, _Sized("x", 1))


# =================================================================================================
# pytest-xdist: gwN -> GPU N mod count, -n auto
# =================================================================================================
@pytest.mark.parametrize("worker, published, expected", [
    ("gw0", "3,5", "3"), ("gw1", "3,5", "5"), ("gw2", "3,5", "3"), ("gw7", "GPU-a,GPU-b,MIG-c", "GPU-b"),
    ("gw0", "", None), ("main", "3,5", None), (None, "3,5", None),
])
def test_pin_xdist_worker(worker, published, expected):
    from moe_validate.pytest_plugin import pin_xdist_worker

    env = {devices.XDIST_GPUS_ENV: published, "CUDA_VISIBLE_DEVICES": "3,5"}
    if worker is not None:
        env["PYTEST_XDIST_WORKER"] = worker
    assert pin_xdist_worker(env) == expected
    assert env["CUDA_VISIBLE_DEVICES"] == (expected or "3,5")


SIMULATED_GPUS_CONFTEST = """
import os
from pathlib import Path
from moe_validate import devices
# Two simulated GPUs for the controller (conftests load before pytest_configure).
devices.detect_gpus = lambda memory=True: [devices.GpuInfo("GPU-1111"), devices.GpuInfo("MIG-2222")]
# What a conftest that initialises CUDA here (tests/conftest.py does) would see in a worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    (Path(os.environ["PIN_OUT"]) / (os.environ["PYTEST_XDIST_WORKER"] + ".conftest")).write_text(
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
"""
PINNING_TEST = """
import json, os
from pathlib import Path

def test_where(tmp_path_factory):
    out = Path(os.environ["PIN_OUT"]) / (os.environ["PYTEST_XDIST_WORKER"] + ".json")
    born = dict(i.split("=", 1) for i in Path("/proc/self/environ").read_text().split("\\0") if "=" in i)
    out.write_text(json.dumps([os.environ.get("CUDA_VISIBLE_DEVICES"), born.get("CUDA_VISIBLE_DEVICES")]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes two device UUIDs in CUDA_VISIBLE_DEVICES: on a GPU host "
                    "they meet the real driver (the workers were born with '0' on the H100); the pinning logic is "
                    "tested on CPU hosts (CI), the real multi-GPU path by scripts/gpu_multi.sh")
def test_xdist_auto_is_one_worker_per_gpu_and_each_worker_pins_itself(pytester, tmp_path):
    pytester.makeconftest(SIMULATED_GPUS_CONFTEST)
    pytester.makepyfile(test_where=PINNING_TEST.replace("def test_where", "def test_a") +
                        PINNING_TEST.replace("import json, os\nfrom pathlib import Path\n", "").replace(
                            "def test_where", "def test_b"))
    out = tmp_path / "pins"
    out.mkdir()
    # Autoload off and the plugins named with -p: the GPU image's way (the package is not installed
    # there); the workers get the same -p arguments from the controller.
    env = {"PIN_OUT": str(out), "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "GPU-1111,MIG-2222",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    saved = {k: os.environ.get(k) for k in list(env) + ["TRITON_INTERPRET", devices.XDIST_GPUS_ENV]}
    try:
        os.environ.update(env)
        os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would leave `auto` to xdist
        result = pytester.runpytest_subprocess("-p", "xdist.plugin", "-p", "moe_validate.pytest_plugin", "-n", "auto",
                                               "--moe-workers-per-gpu", "2", "-p", "no:cacheprovider")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    result.assert_outcomes(passed=2)
    assert any(re.search(r"\b4 workers\b", line) for line in result.outlines), result.outlines[:10]
    pins = {p.stem: json.loads(p.read_text()) for p in out.glob("gw*.json")}
    expected = {"gw0": "GPU-1111", "gw1": "MIG-2222", "gw2": "GPU-1111", "gw3": "MIG-2222"}
    assert pins, "no worker ran a test"
    for worker, (now, born) in pins.items():
        # The worker was exec'd with both GPUs visible; the plugin narrowed it to its own entry
        # before any conftest was imported.
        assert born == "GPU-1111,MIG-2222"
        assert now == expected[worker], (worker, now)
        assert (out / f"{worker}.conftest").read_text() == expected[worker]


class _Config:
    def __init__(self, per_gpu):
        self.per_gpu = per_gpu

    def getoption(self, name, default=None):
        assert name == "moe_workers_per_gpu"
        return self.per_gpu


@pytest.mark.parametrize("gpu_count, interpret, per_gpu, expected", [
    (0, False, 1, None),   # no GPU: xdist's own auto (one per CPU)
    (2, True, 1, None),    # the interpreter runs cases on CPU whatever GPUs exist
    (2, False, 0, None),   # --moe-workers-per-gpu 0: xdist's own auto
    (1, False, 1, 1),
    (2, False, 1, 2),
    (8, False, 1, 8),
    (8, False, 2, 16),
])
def test_xdist_auto_num_workers(monkeypatch, gpu_count, interpret, per_gpu, expected):
    from moe_validate.pytest_plugin import pytest_xdist_auto_num_workers

    monkeypatch.setattr(devices, "detect_gpus", lambda memory=True: [GpuInfo(str(i)) for i in range(gpu_count)])
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pytest_xdist_auto_num_workers(_Config(per_gpu)) == expected


# =================================================================================================
# Shards
# =================================================================================================
SHARD_PRINT = ("from moe_validate.matrix import suite_cases; from moe_validate.runner import select_shard; "
               "print([[c.id for c in select_shard(suite_cases('nightly'), f'{i}/3')] for i in (1, 2, 3)])")


def test_shards_are_the_same_under_another_hash_seed():
    # A CI job on another machine is another process with another string-hash seed: shards must
    # depend on the case ids alone (sorted), never on set or dict iteration order.
    here = repr([[c.id for c in runner.select_shard(suite_cases("nightly"), f"{i}/3")] for i in (1, 2, 3)])
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "7"
    out = subprocess.run([sys.executable, "-c", SHARD_PRINT], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO)), check=True)
    assert out.stdout.strip() == here, f"shards differ under PYTHONHASHSEED={seed}"


# Fields of a case record that legitimately differ between an unsharded run and its shards:
#   duration_s - wall-clock time of the case (machine load, process warm-up); nothing else.
# Everything else (params, outcome, reason, config, repro, tolerance, metrics, detail, error,
# worst_margin) must be identical. Header and footer records are per-run metadata (run_id,
# started/finished, argv, shard, env with host, durations) and are compared only through counts.
TIMING_FIELDS = ("duration_s", "run_id")  # what differs between two runs of the same cases
# In the rendered report's embedded data, the table's "duration" column is the same timing field.
REPORT_TIMING_COLUMNS = ("duration",)
# Ten smoke cases on the base shape (seeds 0-9: bf16/fp16/fp32 and the fp8/int8 schemes); with Mixed
# they give PASS (seeds 0, 3, 6, 9), FAIL (1, 4, 7), CRASH (5, 8) and SKIP (seed 2 is fp32).
SHARD_SUITE_FILTER = "*-M7N64K64E4k2-s[0-9]"


def _report_data(html_path):
    html = Path(html_path).read_text(encoding="utf-8")
    match = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no embedded report data in {html_path}"
    data = json.loads(match.group(1))
    for column in REPORT_TIMING_COLUMNS:
        data["table"].pop(column)
    return data


def test_three_shards_merge_into_the_unsharded_report(tmp_path, capsys):
    from moe_validate.cli import main

    cases = filter_cases(suite_cases("smoke"), SHARD_SUITE_FILTER)
    assert len(cases) == 10
    common = ["run", "--suite", "smoke", "--filter", SHARD_SUITE_FILTER, "--backend", "test_multigpu:Mixed",
              "--workers", "0", "--no-report"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 1  # the planted FAIL and CRASH
    for i in (1, 2, 3):
        assert main(common + ["--shard", f"{i}/3", "--out", str(tmp_path / f"shard{i}")]) == 1
    shard_files = [str(tmp_path / f"shard{i}" / "results.jsonl") for i in (1, 2, 3)]
    # Both hold the planted FAIL and CRASH: report exits 1 for each, the merged shards being complete.
    assert main(["report", *shard_files, "--out", str(tmp_path / "merged.html")]) == 1
    assert main(["report", str(tmp_path / "whole" / "results.jsonl"), "--out", str(tmp_path / "whole.html")]) == 1
    capsys.readouterr()

    whole = load_results([tmp_path / "whole" / "results.jsonl"])
    merged = load_results(shard_files)
    shard_ids = [[c["case_id"] for c in load_results([f]).cases] for f in shard_files]
    assert all(shard_ids) and sum(map(len, shard_ids)) == len(cases), "three non-empty disjoint shards"
    assert {c["outcome"] for c in whole.cases} == {"PASS", "FAIL", "CRASH", "SKIP"}

    def without_timing(rs):
        return [{k: v for k, v in c.items() if k not in TIMING_FIELDS} for c in rs.cases]

    a, b = without_timing(whole), without_timing(merged)
    assert [c["case_id"] for c in a] == [c["case_id"] for c in b] == sorted(c.id for c in cases)
    for x, y in zip(a, b):
        assert json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True), x["case_id"]
    assert merged.counts() == whole.counts() and merged.complete and len(merged.headers) == 3
    assert sorted(h["shard"] for h in merged.headers) == ["1/3", "2/3", "3/3"]
    assert _report_data(tmp_path / "merged.html") == _report_data(tmp_path / "whole.html")
