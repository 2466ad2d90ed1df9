"""The GPU flip-rate measurement scripts (issue 23) keep working: scripts/gpu_stage_rates.py measures a
case stage by stage and scripts/gpu_rates_recheck.py re-derives its model on the CPU. Both run under the
interpreter here on one smoke case; on a GPU they measured the rates docs/BOUNDS.md reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("reference")

from moe_validate.matrix import Case  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_rates_count_each_stage_against_its_own_upstream_and_the_recheck_agrees(tmp_path, monkeypatch):
    rates, recheck = _load("gpu_stage_rates"), _load("gpu_rates_recheck")
    monkeypatch.setattr(rates, "BINS", True)
    case = Case.from_id("fp16-none-silu-M9N64K64E4k2-bias-s110")
    rec = rates.measure(case, "cpu")
    stages = rec["stages"]
    assert set(stages) == {"c1", "c2", "c3", "out"}  # the unfused paths write every stage
    for stage, kinds in stages.items():
        for kind, v in kinds.items():
            assert 0 <= v["observed"] <= v["n"] and v["model"] >= 0, (stage, kind)
    # an element's own arithmetic differs no more often than the stage as a whole can
    assert stages["c3"]["own"]["observed"] <= stages["c3"]["total"]["observed"]
    assert stages["out"]["own"]["observed"] == 0  # the fp32 top-k sum of equal c3 is equal
    assert 0 <= rec["count_allowed"] <= stages["out"]["total"]["n"]
    counts, flips, model = rec["bins"]["c1"]
    assert sum(counts) == stages["c1"]["own"]["n"] and sum(flips) == stages["c1"]["own"]["observed"]
    rec["repetition"] = 0
    path = tmp_path / "rates.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    again = recheck.rederive(rec)  # the model as derive computes it for a GPU run of these inputs
    assert again["observed"] == stages["out"]["total"]["observed"]
    assert again["allowed"] >= rec["count_allowed"]  # the GPU's model only adds flips
    rates.summary([str(path)])  # prints its table without failing


def test_amax_flips_count_the_groups_whose_dynamic_scale_moves():
    # a group's scale follows its amax element: a flip there moves it, a flip elsewhere does not
    import torch

    rates = _load("gpu_stage_rates")
    mirror = torch.tensor([[[1.0, -4.0, 2.0], [0.5, 0.25, 0.125]], [[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    p = torch.full_like(mirror, 0.02)
    p[0, 1, 0] = 0.5
    kernel = mirror.clone()
    kernel[0, 0, 1] = -4.03125  # the amax of route (0, 0) moves
    kernel[0, 1, 2] = 0.126  # not the amax of route (0, 1)
    kernel[1, 1, 0] = 9.0  # an invalid route is never compared
    token = rates.amax_flips(kernel, mirror, p, valid, "token")
    assert token == {"groups": 3, "observed": 1, "model": 0.54, "observed_low_p": 0, "model_low_p": 0.0,
                     "groups_low_p": 0}
    tensor = rates.amax_flips(kernel, mirror, p, valid, "tensor_dynamic")
    assert tensor["groups"] == 1 and tensor["observed"] == 1 and tensor["model"] == 0.02
