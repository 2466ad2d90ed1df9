"""Golden outputs (moe_validate/golden.py) and run --against (moe_validate/against.py)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_validate import runner
from moe_validate.cli import main
from moe_validate.exit_codes import EXIT_FAILURES, EXIT_INCOMPLETE, EXIT_PASS, EXIT_USAGE
from moe_validate.golden import GoldenError, StoredOutput, compare_outputs, format_outputs_diff, ulp_distance
from moe_validate.matrix import filter_cases, suite_cases

HERE = Path(__file__).resolve().parent
# bf16, fp16, fp32 and bf16 again: every storage width a smoke output has.
FILTER = "*-none-silu-M7N64K64E4k2-s[0-3]"
CASES = filter_cases(suite_cases("smoke"), FILTER)


def _saved(tmp_path, name: str, backend: str = "triton") -> Path:
    outputs = tmp_path / f"{name}-outputs"
    summary = runner.run_cases(CASES, backend, tmp_path / name, workers=0, progress=None,
                               case_options=runner.CaseOptions(save_outputs=str(outputs)))
    assert summary.exit_code == EXIT_PASS
    return outputs


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Two independent triton runs of the same cases, each with its outputs saved."""
    base = tmp_path_factory.mktemp("golden")
    return _saved(base, "a"), _saved(base, "b")


def _rewrite(path: Path, *, bits=None, **meta_changes) -> None:
    """Plants a change in one stored output (its bits, or fields of its meta)."""
    with np.load(path, allow_pickle=False) as data:
        stored_bits, meta = data["bits"].copy(), json.loads(str(data["meta"]))
    meta.update(meta_changes)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, bits=stored_bits if bits is None else bits, meta=np.array(json.dumps(meta)))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_each_case_is_stored_with_its_seed_digest_and_env(golden):
    a, _ = golden
    files = sorted(a.glob("*.npz"))
    assert [f.stem for f in files] == sorted(c.id for c in CASES)
    with np.load(files[0], allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        bits = data["bits"]
    case = next(c for c in CASES if c.id == files[0].stem)
    assert meta["case_id"] == case.id and meta["seed"] == case.seed and meta["backend"] == "triton"
    assert len(meta["input_digest"]) == 64 and meta["shape"] == [7, 64] and list(bits.shape) == [7, 64]
    assert {"gpu", "torch", "triton", "commit", "interpreter"} <= set(meta["env"])


def test_two_runs_of_the_same_cases_are_bitwise_equal(golden):
    diff = compare_outputs(*golden)
    assert [c.case_id for c in diff.cases] == sorted(c.id for c in CASES)
    assert all(c.equal and c.max_ulp == 0 and c.differing == 0 for c in diff.cases)
    assert diff.exit_code == EXIT_PASS and not diff.only_old and not diff.only_new
    assert "4 bitwise-equal, 0 differ" in format_outputs_diff(diff)


@pytest.mark.parametrize("dtype_prefix", ["bf16", "fp16", "fp32"])
def test_a_one_ulp_change_in_one_element_is_flagged_with_its_location(golden, tmp_path, dtype_prefix):
    old, new = golden[0], _copy(golden[1], tmp_path / "new")
    path = next(f for f in new.glob(f"{dtype_prefix}-*.npz"))
    with np.load(path, allow_pickle=False) as data:
        bits = data["bits"].copy()
    bits[3, 17] += 1  # the next representable value away from zero (or from +0 up)
    _rewrite(path, bits=bits)
    diff = compare_outputs(old, new)
    (changed,) = [c for c in diff.cases if not c.equal]
    assert changed.case_id == path.stem
    assert changed.differing == 1 and changed.max_ulp == 1
    assert (changed.first["token"], changed.first["column"], changed.first["ulp"]) == (3, 17, 1)
    assert changed.first["old"] == float(StoredOutput.load(old / path.name).values()[3, 17])
    assert changed.first["new"] == float(StoredOutput.load(path).values()[3, 17]) != changed.first["old"]
    assert diff.exit_code == EXIT_FAILURES
    assert "token 3, column 17" in format_outputs_diff(diff)
    assert compare_outputs(old, new, max_ulp=1).exit_code == EXIT_PASS  # within --max-ulp 1


def test_outputs_of_different_inputs_are_refused(golden, tmp_path, capsys):
    old, new = golden[0], _copy(golden[1], tmp_path / "new")
    path = sorted(new.glob("*.npz"))[0]
    _rewrite(path, input_digest="0" * 64)
    with pytest.raises(GoldenError, match=f"inputs of 1 of 4 common cases differ.*{path.stem}"):
        compare_outputs(old, new)
    assert main(["compare", "--outputs", str(old), str(new)]) == EXIT_USAGE
    assert "input digest" in capsys.readouterr().err


def test_cases_on_one_side_only_are_listed_and_a_missing_one_is_incomplete(golden, tmp_path, capsys):
    old, new = golden[0], _copy(golden[1], tmp_path / "new")
    gone = sorted(new.glob("*.npz"))[0]
    gone.unlink()
    diff = compare_outputs(old, new)
    assert diff.only_old == [gone.stem] and diff.exit_code == EXIT_INCOMPLETE
    assert compare_outputs(new, old).only_new == [gone.stem]
    assert compare_outputs(new, old).exit_code == EXIT_PASS
    assert main(["compare", "--outputs", str(old), str(new)]) == EXIT_INCOMPLETE
    assert f"{gone.stem}: only in OLD" in capsys.readouterr().out


def test_compare_outputs_usage_errors(golden, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "--outputs", str(golden[0]), str(empty)]) == EXIT_USAGE
    assert "holds no output files" in capsys.readouterr().err
    assert main(["compare", "--outputs", str(golden[0]), str(golden[1]), "--max-ulp", "-1"]) == EXIT_USAGE
    assert "--max-ulp" in capsys.readouterr().err
    assert main(["compare", str(golden[0]), str(golden[1]), "--max-ulp", "1"]) == EXIT_USAGE


def test_save_outputs_refuses_a_store_that_holds_outputs(golden, tmp_path, capsys):
    held = _copy(golden[0], tmp_path / "held")
    code = main(["run", "--suite", "smoke", "--filter", FILTER, "--backend", "reference", "--workers", "0",
                 "--out", str(tmp_path / "run"), "--save-outputs", str(held), "--no-report"])
    assert code == EXIT_USAGE and "already holds 4 outputs" in capsys.readouterr().err


def test_ulp_distance_counts_representable_values_across_zero_and_nan():
    import torch

    values = torch.tensor([1.0, -0.0, 1.0, float("nan"), float("inf")], dtype=torch.bfloat16)
    other = torch.tensor([1.0, 0.0, -1.0, float("nan"), float("inf")], dtype=torch.bfloat16)
    a, b = values.view(torch.uint16).numpy(), other.view(torch.uint16).numpy()
    dist = ulp_distance(a, b, "bfloat16")
    assert dist[0] == 0 and dist[1] == 0  # -0 and +0 are one value apart by zero
    assert dist[2] == 2 * 0x3F80  # 1 to -1: down to +0, then as many again
    assert dist[3] == 0 and dist[4] == 0  # the same NaN and the same Inf bits
    b2 = b.copy()
    b2[0] = a[3]
    assert ulp_distance(a, b2, "bfloat16")[0] == float("inf")  # a number against a NaN


# --- run --against -------------------------------------------------------------------------
def _against_checks(out_dir: Path):
    from moe_validate.results import load_results

    rs = load_results([out_dir / "results.jsonl"])
    return rs, [c for rec in rs.cases for c in rec.checks or () if c["name"].startswith("against:")]


def test_against_reference_passes_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--suite", "smoke", "--filter", FILTER, "--backend", "triton", "--against", "reference",
                 "--workers", "0", "--out", str(out), "--no-report"])
    assert code == EXIT_PASS
    rs, checks = _against_checks(out)
    assert len(checks) == len(CASES) and all(c["outcome"] == "PASS" for c in checks)
    assert all(c["margin"] is not None and c["margin"] <= 1 and c["other_margin"] <= 1 for c in checks)
    assert rs.headers[0].extra["against"]["backend"] == "reference"


def test_against_a_planted_wrong_backend_fails_with_its_location(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    out = tmp_path / "run"
    code = main(["run", "--suite", "smoke", "--filter", FILTER, "--backend", "triton",
                 "--against", "fake_backends:Wrong", "--workers", "0", "--out", str(out), "--no-report"])
    assert code == EXIT_FAILURES
    rs, checks = _against_checks(out)
    assert len(checks) == len(CASES) and all(c["outcome"] == "FAIL" for c in checks)
    assert all("against:fake_backends:Wrong: max_normalized" in c["reason"] and "token" in c["reason"] for c in checks)
    assert all(c["other_margin"] > 1 for c in checks)  # the wrong backend is outside its own gate too
    assert all(rec.outcome == "FAIL" for rec in rs.cases)


def test_against_a_backend_that_raises_fails_rather_than_agrees(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    from moe_validate.against import against_check
    from moe_validate.inputs import make_inputs
    from moe_validate.backends import get_backend

    case = next(c for c in CASES if c.seed == 1)  # fake_backends:Raise raises on seed 1
    inputs = make_inputs(case, device="cpu")
    out = get_backend("reference").run(inputs, case)
    check = against_check(case, inputs, out, "fake_backends:Raise")
    assert check["outcome"] == "FAIL" and "planted failure" in check["reason"]
    check = against_check(case, inputs, out, "fake_backends:Unsupported")
    assert check["outcome"] == "PASS"  # Unsupported only refuses fp32; this is fp16
    fp32 = next(c for c in CASES if c.dtype == "fp32")
    inputs32 = make_inputs(fp32, device="cpu")
    check = against_check(fp32, inputs32, get_backend("reference").run(inputs32, fp32), "fake_backends:Unsupported")
    assert check["outcome"] == "SKIP" and "planted: fp32 not supported" in check["reason"]
