"""Checks after the comparison: bitwise invariances, the alignment contract, row-sampled references.

- ``Case.invariance``: ids round-trip, validity rules (order, M >= 2, no sub-batch check for a
  batch-wide dynamic scale), the smoke suite holds naive and aligned invariance cases;
- ``bitwise_difference``: pinned messages on hand-made tensors (bits, not values);
- ``run_checks`` with planted backends (the float64 reference's answer, perturbed in one place):
  a parity-dependent backend fails ``sub`` naming token, column and both values; a position-
  dependent one fails ``perm``; a backend that does not declare batch-invariant mode gets ``sub``
  SKIPPED with the reason in the record; the runner turns a failed check into FAIL;
- ``check_alignment``: the kernels' own alignment passes; every rule, broken by hand, is named;
- row sampling: the reference on sampled rows equals the full reference on those rows, a wrong
  LAST row is caught and named by its token, and the record says what was compared.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moe_validate import invariance, matrix
from moe_validate.backends import ReferenceBackend
from moe_validate.compare import evaluate, sampled_rows, SAMPLE_HEAD_ROWS, SAMPLE_TAIL_ROWS
from moe_validate.contract.rules import takes_naive_path
from moe_validate.inputs import make_inputs, select_tokens
from moe_validate.matrix import Case
from moe_validate.routing_contract import check_alignment
from moe_validate.runner import default_device, run_case_inprocess

reference = pytest.importorskip("reference", reason="the checks compare against the float64 reference")

# fp32 storage, topk 3: the case the route_order_batch_dependent mutant is killed on
FP32_CASE = Case(M=7, N=64, K=64, E=4, topk=3, dtype="fp32", invariance="rerun+perm+sub", seed=190)


# =================================================================================================
# Case axis
# =================================================================================================
def test_invariance_appears_in_the_id_and_round_trips():
    assert FP32_CASE.id == "fp32-none-silu-M7N64K64E4k3-invar_rerun+perm+sub-s190"
    assert Case.from_id(FP32_CASE.id) == FP32_CASE
    assert FP32_CASE.invariances == ("rerun", "perm", "sub")
    assert Case(M=7, N=64, K=64, E=4, topk=2).invariances == ()


@pytest.mark.parametrize("invariance, M, scheme, needle", [
    ("sub+perm", 7, "none", "in that order"),
    ("perm+perm", 7, "none", "in that order"),
    ("shuffle", 7, "none", "subset of rerun+perm+sub"),
    ("perm", 1, "none", "M >= 2"),
    ("sub", 7, "fp8_tensor_dynamic", "spans the whole batch"),
])
def test_invalid_invariances_say_which_rule(invariance, M, scheme, needle):
    ok, why = Case(M=M, N=64, K=64, E=4, topk=2, scheme=scheme, invariance=invariance).is_valid()
    assert not ok and needle in why


def test_rerun_and_perm_are_valid_with_a_dynamic_tensor_scale():
    assert Case(M=5, N=64, K=64, E=4, topk=3, scheme="fp8_tensor_dynamic", invariance="rerun+perm").is_valid()[0]


def test_smoke_has_invariance_cases_on_the_naive_and_the_aligned_path():
    cases = [c for c in matrix.suite_cases("smoke") if "sub" in c.invariances and c.topk >= 3 and c.dtype == "fp32"]
    naive = [c for c in cases if takes_naive_path(c.M * c.topk, c.local_experts)]
    aligned = [c for c in cases if not takes_naive_path(c.M * c.topk, c.local_experts)]
    assert naive and aligned
    # the dropped token keeps the naive case naive (SPEC: both paths give the same bits anyway)
    assert all(takes_naive_path((c.M - 1) * c.topk, c.local_experts) for c in naive)
    # interpreter cost counts the re-runs: the full batch once more in batch-invariant mode, then the sub-batch
    assert matrix.backend_runs(FP32_CASE) == 5
    assert matrix.interpreter_cost(FP32_CASE) == 5 * matrix.interpreter_cost(replace(FP32_CASE, invariance="none"))


# =================================================================================================
# bitwise_difference
# =================================================================================================
def test_bitwise_difference_names_token_column_values_bits_and_count():
    a = torch.zeros(3, 4, dtype=torch.float32)
    b = a.clone()
    b[1, 2] = 1.0
    b[2, 0] = 2.0
    msg = invariance.bitwise_difference(a, b, lambda r: r + 10, ("first", "second"))
    assert msg == ("token 11, column 2: 0 first vs 1 second (bits 0x00000000 vs 0x3f800000); "
                   "2 of 12 element(s) differ")


def test_bitwise_difference_sees_signed_zero_and_accepts_the_same_nan():
    a = torch.tensor([[0.0, math.nan]], dtype=torch.bfloat16)
    assert invariance.bitwise_difference(a, a.clone(), lambda r: r, ("x", "y")) is None
    b = torch.tensor([[-0.0, math.nan]], dtype=torch.bfloat16)
    msg = invariance.bitwise_difference(a, b, lambda r: r, ("x", "y"))
    assert "0x0000 vs 0x8000" in msg and "1 of 2" in msg


def test_permutation_is_seeded_and_never_the_identity():
    for M in (2, 3, 7):
        for seed in range(20):
            p = invariance.invariance_permutation(M, seed)
            assert sorted(p.tolist()) == list(range(M)) and p.tolist() != list(range(M))
            assert torch.equal(p, invariance.invariance_permutation(M, seed))
    assert invariance.sub_batch_rows(7).tolist() == [0, 1, 2, 4, 5, 6]


def test_select_tokens_moves_every_per_token_tensor():
    case = Case(M=5, N=64, K=64, E=4, topk=2, lora="single", seed=193)
    inputs = make_inputs(case)
    idx = torch.tensor([4, 0, 2])
    sub = select_tokens(inputs, idx)
    assert torch.equal(sub.hidden_states, inputs.hidden_states[idx])
    assert torch.equal(sub.topk_ids, inputs.topk_ids[idx])
    assert torch.equal(sub.topk_weights, inputs.topk_weights[idx])
    assert torch.equal(sub.lora.token_lora_ids, inputs.lora.token_lora_ids[idx])
    assert sub.w1 is inputs.w1 and sub.lora.w2_a is inputs.lora.w2_a
    with pytest.raises(ValueError, match=r"token rows in \[0, 5\)"):
        select_tokens(inputs, torch.tensor([5]))


# =================================================================================================
# run_checks with planted backends
# =================================================================================================
def _nudge(t: torch.Tensor, row) -> torch.Tensor:
    """One ulp up at [row, 0] (row: an index or a slice): far inside every gate, visible bitwise."""
    t = t.clone()
    t[row, 0] = torch.nextafter(t[row, 0], torch.full_like(t[row, 0], math.inf))
    return t


class _Declared(ReferenceBackend):
    """The reference's answer, claiming every invariance (so the checks run)."""

    name = "declared"

    def supports_invariance(self, name, case):
        return True, ""


class ParityDependent(_Declared):
    """Every row moves by one ulp when M is odd (what route_order_batch_dependent does to sums)."""

    def run(self, inputs, case=None):
        out = super().run(inputs, case)
        return _nudge(out, slice(None)) if out.shape[0] % 2 else out


class PositionDependent(_Declared):
    """The row in position 1 of any batch moves by one ulp (a kernel tiling by position, not token)."""

    def run(self, inputs, case=None):
        return _nudge(super().run(inputs, case), 1)


class Undeclared(ReferenceBackend):
    """No supports_invariance: sub cannot be asked for, so it must be SKIPPED, not passed."""

    name = "undeclared"
    supports_invariance = None


def _checks(backend, case=FP32_CASE):
    inputs = make_inputs(case)
    out = backend.run(inputs, case)
    return {c["name"]: c for c in invariance.run_checks(case, inputs, out, backend)}


def test_correct_backend_passes_every_invariance():
    checks = _checks(_Declared())
    assert [checks[invariance.CHECK_NAMES[n]]["outcome"] for n in FP32_CASE.invariances] == ["PASS"] * 3
    assert checks[invariance.ALIGNMENT_CHECK]["outcome"] == "SKIP"  # the reference exposes no routing


def test_parity_dependent_backend_fails_sub_only_with_token_column_and_values():
    checks = _checks(ParityDependent())
    assert checks["invariance:rerun"]["outcome"] == "PASS"
    assert checks["invariance:perm"]["outcome"] == "PASS"
    sub = checks["invariance:sub"]
    assert sub["outcome"] == "FAIL"
    assert sub["reason"].startswith("invariance sub (batch invariance, one token dropped) violated: token 0, column 0:")
    assert "in the batch of 7 vs" in sub["reason"] and "in the batch of 6 (token 3 dropped)" in sub["reason"]
    assert "6 of 384 element(s) differ" in sub["reason"]


def test_position_dependent_backend_fails_perm_naming_the_original_token():
    checks = _checks(PositionDependent())
    perm = invariance.invariance_permutation(FP32_CASE.M, FP32_CASE.seed)
    assert int(perm[1]) != 1  # else the planted position would hold the same token in both runs
    assert checks["invariance:perm"]["outcome"] == "FAIL"
    # rows differ where token 1 sits in the permuted batch, and at position 1 (token perm[1]);
    # the message names the token of the first such row
    first_row = min(1, int(torch.nonzero(perm == 1)[0, 0]))
    assert f"token {int(perm[first_row])}, column 0" in checks["invariance:perm"]["reason"]


def test_a_backend_without_batch_invariant_mode_gets_sub_skipped_with_a_reason():
    checks = _checks(Undeclared())
    assert checks["invariance:perm"]["outcome"] == "PASS"
    assert checks["invariance:sub"]["outcome"] == "SKIP"
    assert "does not declare batch-invariant mode" in checks["invariance:sub"]["reason"]


def test_runner_fails_the_case_on_a_violation_and_names_skips_on_a_pass():
    failed = run_case_inprocess(FP32_CASE, ParityDependent(), backend_name="parity")
    assert failed.record["outcome"] == "FAIL"
    assert failed.record["reason"].startswith("invariance sub")
    assert failed.record["metrics"]["mirror"]["max_normalized"]["value"] <= 1  # the comparison alone passes
    assert "invariance sub" in failed.message()
    skipped = run_case_inprocess(FP32_CASE, Undeclared(), backend_name="undeclared")
    assert skipped.record["outcome"] == "PASS"
    assert "SKIPPED invariance sub" in skipped.record["reason"]
    assert [c["outcome"] for c in skipped.record["checks"] if c["name"].startswith("invariance:")] == \
        ["PASS", "PASS", "SKIP"]


def test_reference_backend_declares_rerun_only():
    checks = _checks(ReferenceBackend())
    assert checks["invariance:rerun"]["outcome"] == "PASS"
    assert checks["invariance:perm"]["outcome"] == "SKIP" and checks["invariance:sub"]["outcome"] == "SKIP"


# =================================================================================================
# The alignment contract
# =================================================================================================
@pytest.fixture(scope="module")
def aligned():
    """The kernels' alignment of a 7-token, topk-3 batch over 4 experts with some invalid ids."""
    kernels = pytest.importorskip("kernels", reason="the contract is checked on the kernels' own alignment")
    ids = torch.tensor([[0, 1, 2], [3, 0, -1], [1, 1, 9], [2, 3, 0], [0, 2, 1], [3, 3, 3], [1, 0, 2]],
                       dtype=torch.int32, device=default_device())  # native kernels need CUDA tensors
    s, e, n = kernels.moe_align_block_size(ids, 4, 4)
    return ids, {"sorted_route_ids": s, "expert_ids": e, "num_post_padded": n, "block_m": 4}


def _broken(stages, **changes):
    out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in stages.items()}
    for key, fn in changes.items():
        fn(out[key])
    return out


def test_kernels_alignment_honours_the_contract(aligned):
    ids, stages = aligned
    assert check_alignment(stages, ids, 4, 4) is None
    # tiles past the padded total exist here, so rule 6 is exercised
    assert int(stages["num_post_padded"][0]) < stages["sorted_route_ids"].numel()


def _set(index, value):
    def fn(t):
        t[index] = value
    return fn


def test_each_broken_rule_is_named(aligned):
    ids, st = aligned
    R, total = ids.numel(), int(st["num_post_padded"][0])
    last_tile = st["expert_ids"].numel() - 1
    s = st["sorted_route_ids"]
    first_route_slot = int(torch.nonzero(s < R)[0, 0])
    pad_slot = int(torch.nonzero(s[:total] == R)[0, 0])
    cases = [
        (dict(expert_ids=_set(last_tile, 0)), f"tile {last_tile}, past the padded total {total} (block_m 4), has expert 0; expected -1"),
        (dict(num_post_padded=_set(0, total + 4)), f"num_post_padded is {total + 4}"),
        (dict(sorted_route_ids=_set(total, 0)), f"slot {total}, at or past the padded total {total}, holds route 0"),
        (dict(sorted_route_ids=_set(first_route_slot, R)), "is missing"),
        (dict(sorted_route_ids=_set(pad_slot, int(s[first_route_slot]))), "appears 2 times"),
        (dict(sorted_route_ids=_set(pad_slot, 5)), "invalid route 5 (token 1, slot 2) appears"),
        (dict(sorted_route_ids=_set(0, R + 1)), "neither a route id"),
        (dict(expert_ids=_set(0, 3)), "tile 0 (slots 0..3) has expert 3; the padded runs give it to expert 0"),
    ]
    for changes, needle in cases:
        problem = check_alignment(_broken(st, **changes), ids, 4, 4)
        assert problem is not None and needle in problem, (changes, problem)


def test_a_route_in_another_experts_tile_is_named(aligned):
    ids, st = aligned
    R = ids.numel()
    s = st["sorted_route_ids"]
    e = st["expert_ids"]
    # swap one route of expert 0's first tile with one of expert 1's first tile
    a = int(torch.nonzero((s[:4] < R))[0, 0])
    t1 = int(torch.nonzero(e == 1)[0, 0])
    b = t1 * 4 + int(torch.nonzero(s[t1 * 4:t1 * 4 + 4] < R)[0, 0])
    broken = _broken(st)
    broken["sorted_route_ids"][a], broken["sorted_route_ids"][b] = s[b], s[a]
    problem = check_alignment(broken, ids, 4, 4)
    assert problem is not None and problem.startswith("tile 0 of expert 0 holds route")


# =================================================================================================
# Row-sampled reference
# =================================================================================================
def test_sampled_rows_keep_the_first_and_last_rows_and_are_seeded():
    rows = sampled_rows(10_000, 256, seed=3)
    assert rows.numel() == 256 and torch.equal(rows, torch.unique(rows))
    assert rows[:SAMPLE_HEAD_ROWS].tolist() == list(range(SAMPLE_HEAD_ROWS))
    assert rows[-SAMPLE_TAIL_ROWS:].tolist() == list(range(10_000 - SAMPLE_TAIL_ROWS, 10_000))
    assert torch.equal(rows, sampled_rows(10_000, 256, seed=3))
    assert not torch.equal(rows, sampled_rows(10_000, 256, seed=4))
    assert sampled_rows(100, 256, seed=0).tolist() == list(range(100))


def test_only_the_int32_overflow_case_is_sampled_and_it_fits_an_h100():
    from moe_validate.devices import case_memory_bytes
    from moe_validate.mutants import INT32_OVERFLOW_CASE

    big = Case.from_id(INT32_OVERFLOW_CASE)
    assert matrix.reference_is_sampled(big)
    assert case_memory_bytes(big) < 16 * 2 ** 30  # kernel 6.5 GB + sampled reference < 1 GB, with slack
    for suite in matrix.SUITES:
        assert not any(matrix.reference_is_sampled(c) for c in matrix.suite_cases(suite))


SAMPLED_CASE = Case(M=40, N=64, K=64, E=4, topk=3, scheme="fp8_block128", bias=True, seed=7)
SAMPLE = torch.tensor([0, 1, 5, 17, 30, 38, 39])


@pytest.mark.parametrize("precision", ["mirror", "exact"])
def test_reference_on_sampled_rows_equals_the_full_reference_on_those_rows(precision):
    inputs = make_inputs(SAMPLED_CASE)
    full = reference.run_stages(*inputs.args(), **inputs.kwargs(), precision=precision)["out"]
    sub_inputs = select_tokens(inputs, SAMPLE)
    sub = reference.run_stages(*sub_inputs.args(), **sub_inputs.kwargs(), precision=precision)["out"]
    if precision == "mirror":
        # every stage rounds to S: a float64 matmul's batch-size-dependent order cannot show
        assert torch.equal(sub, full[SAMPLE])
    else:
        # float64 throughout: a BLAS may sum the K=64 (then I=32) products of a row in another
        # order for another batch size; that moves an O(1) value by at most ~K * 2^-53 * sum|ab|
        # (~1e-14 here). 1e-12 is 100x that and 1e9x below the smallest gate (~1e-3).
        torch.testing.assert_close(sub, full[SAMPLE], rtol=0, atol=1e-12)


def test_sampled_compare_matches_the_full_compare_on_those_rows_and_catches_a_wrong_last_row():
    inputs = make_inputs(SAMPLED_CASE)
    out = ReferenceBackend().run(inputs, SAMPLED_CASE)
    ev = evaluate(SAMPLED_CASE, inputs, out, rows=SAMPLE)
    full = evaluate(SAMPLED_CASE, inputs, out)
    assert ev.passed and full.passed
    assert ev.compared_rows["compared"] == 7 and ev.compared_rows["of"] == 40
    assert ev.reason.startswith("compared rows: 7 of 40, sampled")
    assert full.compared_rows is None
    # the same tolerance on the same rows: the bounds are per token (SPEC: no batch-wide scale here)
    bad = out.clone()
    bad[39, 5] += 1.0
    ev_bad = evaluate(SAMPLED_CASE, inputs, bad, rows=SAMPLE)
    full_bad = evaluate(SAMPLED_CASE, inputs, bad)
    assert not ev_bad.passed and not full_bad.passed
    assert ev_bad.metrics["mirror"]["worst"][0]["token"] == 39 == full_bad.metrics["mirror"]["worst"][0]["token"]
    assert ev_bad.metrics["mirror"]["worst"][0]["allowed"] == full_bad.metrics["mirror"]["worst"][0]["allowed"]
    assert "(token 39, column 5)" in ev_bad.reason and "compared rows: 7 of 40, sampled" in ev_bad.reason
    assert "(39, 5)" in ev_bad.message()
    # a row outside the sample is not looked at (that is the price, stated in the record)
    unseen = out.clone()
    unseen[20, 5] += 1.0
    assert evaluate(SAMPLED_CASE, inputs, unseen, rows=SAMPLE).passed


def test_sampling_refuses_a_batch_wide_dynamic_scale():
    case = Case(M=8, N=64, K=64, E=4, topk=2, scheme="fp8_tensor_dynamic", seed=3)
    inputs = make_inputs(case)
    out = ReferenceBackend().run(inputs, case)
    with pytest.raises(ValueError, match="batch-wide dynamic scale"):
        evaluate(case, inputs, out, rows=torch.tensor([0, 7]))


class WrongLastRow(ReferenceBackend):
    """The reference's answer with the last token's row off by 1 (where int32 offsets wrap)."""

    def run(self, inputs, case=None):
        out = super().run(inputs, case).clone()
        out[-1] += 1.0
        return out


def test_runner_records_the_sample_of_a_case_too_big_for_the_full_reference(monkeypatch):
    # Stand-in for the int32-overflow case at a CPU size: the 8 GiB limit lowered to nothing.
    monkeypatch.setattr(matrix, "REFERENCE_FULL_LIMIT_BYTES", 0)
    case = Case(M=300, N=32, K=32, E=4, topk=2, seed=5)
    assert matrix.reference_is_sampled(case)
    ok = run_case_inprocess(case, ReferenceBackend(), backend_name="reference")
    assert ok.record["outcome"] == "PASS"
    assert ok.record["compared_rows"]["compared"] == matrix.REFERENCE_SAMPLE_ROWS
    assert ok.record["compared_rows"]["rows"][-SAMPLE_TAIL_ROWS:] == list(range(300 - SAMPLE_TAIL_ROWS, 300))
    assert ok.record["reason"].startswith("compared rows: 256 of 300, sampled")
    bad = run_case_inprocess(case, WrongLastRow(), backend_name="wrong-last-row")
    assert bad.record["outcome"] == "FAIL"
    assert "(token 299, column" in bad.record["reason"] and "compared rows: 256 of 300" in bad.record["reason"]


# ---------------------------------------------------------------------------------------------
# paths: the backend's other internal paths of the same call must give the same bits
# ---------------------------------------------------------------------------------------------
PATHS_CASE = Case(M=6, N=64, K=64, E=4, topk=2, invariance="paths", seed=195)


class TwoPaths(_Declared):
    """A backend with one alternative internal path, optionally one ulp off on token 2."""

    def __init__(self, off: bool):
        super().__init__()
        self.off = off

    def run_paths(self, inputs, case=None):
        alt = super().run(inputs, case)
        return [("path B (default A)", _nudge(alt, 2) if self.off else alt)]


def test_paths_pass_when_every_path_agrees_and_fail_naming_the_path_and_token():
    assert _checks(TwoPaths(off=False), PATHS_CASE)["invariance:paths"]["outcome"] == "PASS"
    failed = _checks(TwoPaths(off=True), PATHS_CASE)["invariance:paths"]
    assert failed["outcome"] == "FAIL"
    assert failed["reason"].startswith("invariance paths (internal paths of the same call) violated: "
                                       "path B (default A): token 2, column 0:")


def test_paths_are_skipped_with_a_reason_for_a_backend_without_run_paths():
    check = _checks(_Declared(), PATHS_CASE)["invariance:paths"]
    assert check["outcome"] == "SKIP" and "no run_paths method" in check["reason"]


def _naive_run_fuses_the_sum(backend, inputs, case) -> bool:
    """Whether "auto" fuses the top-k sum on this call's naive assignment: wherever it can under
    the interpreter; on a GPU only with two GEMM2 programs per SM (kernels/experts.py), which these
    small cases lack. run_paths' variants follow that choice either way."""
    backend.run(inputs, case, assignment="naive")
    return backend.last_paths["fused_topk_sum"]


def _sum_variant_label(naive_fuses: bool) -> str:
    if naive_fuses:
        return "top-k sum by moe_sum, assignment=naive (auto fuses it into GEMM2 there)"
    return "top-k sum fused into GEMM2, assignment=naive (auto leaves it to moe_sum there)"


def test_triton_backend_offers_the_paths_it_did_not_take():
    """The kernels' own path choice is recorded; run_paths flips the assignment, runs the naive
    assignment with the top-k sum placement that naive run did not take, flips the activation
    placement (fused <-> unfused), reruns the default with a finite poison, and every variant has
    the default's bits."""
    from moe_validate.backends import POISON_VARIANT, TritonBackend

    backend = TritonBackend()
    inputs = make_inputs(PATHS_CASE, device=default_device())
    naive_fuses = _naive_run_fuses_the_sum(backend, inputs, PATHS_CASE)
    assert naive_fuses is (default_device() == "cpu")
    out = backend.run(inputs, PATHS_CASE)
    default_paths = {"assignment": "aligned", "fused_activation": True, "fused_topk_sum": False}
    assert backend.last_paths == default_paths
    variants = backend.run_paths(inputs, PATHS_CASE)
    assert [label for label, _ in variants] == [
        "assignment=naive (default aligned)" + (", top-k sum fused into GEMM2" if naive_fuses else ""),
        _sum_variant_label(naive_fuses),
        "activation unfused (default fused into GEMM1)",
        POISON_VARIANT]
    for _, got in variants:
        assert invariance.bitwise_difference(out, got, lambda r: r, ("a", "b")) is None
    assert backend.last_paths == default_paths


NAIVE_PATHS_CASE = Case(M=1, N=64, K=64, E=8, topk=2, invariance="paths", seed=199)
LORA_NAIVE_PATHS_CASE = Case(M=1, N=64, K=64, E=8, topk=2, lora="single", invariance="paths", seed=199)


def test_triton_backend_paths_from_the_naive_path():
    """From a naive default run, run_paths compares the aligned assignment (moe_sum) and the naive
    one with the other top-k sum placement against it."""
    from moe_validate.backends import TritonBackend

    backend = TritonBackend()
    inputs = make_inputs(NAIVE_PATHS_CASE, device=default_device())
    out = backend.run(inputs, NAIVE_PATHS_CASE)
    naive_fuses = backend.last_paths["fused_topk_sum"]
    assert backend.last_paths["assignment"] == "naive" and naive_fuses is (default_device() == "cpu")
    variants = backend.run_paths(inputs, NAIVE_PATHS_CASE)
    assert [label for label, _ in variants][:2] == [
        "assignment=aligned (default naive)" + (", top-k sum by moe_sum" if naive_fuses else ""),
        _sum_variant_label(naive_fuses)]
    for _, got in variants:
        assert invariance.bitwise_difference(out, got, lambda r: r, ("a", "b")) is None


def test_triton_backend_paths_with_lora_offer_no_fused_top_k_sum():
    """LoRA adds its w2 delta into c3 before the sum: neither the default nor any variant fuses it."""
    from moe_validate.backends import POISON_VARIANT, TritonBackend

    backend = TritonBackend()
    inputs = make_inputs(LORA_NAIVE_PATHS_CASE, device=default_device())
    out = backend.run(inputs, LORA_NAIVE_PATHS_CASE)
    assert backend.last_paths["assignment"] == "naive" and backend.last_paths["fused_topk_sum"] is False
    variants = backend.run_paths(inputs, LORA_NAIVE_PATHS_CASE)
    assert [label for label, _ in variants] == ["assignment=aligned (default naive)", POISON_VARIANT]
    for _, got in variants:
        assert invariance.bitwise_difference(out, got, lambda r: r, ("a", "b")) is None


class PairedPaths(_Declared):
    """Two paths at another launch config, compared with each other (a (label, got, expected)
    triple): both one ulp off the default run on token 1, optionally one more ulp apart on token 3."""

    def __init__(self, apart: bool):
        super().__init__()
        self.apart = apart

    def run_paths(self, inputs, case=None):
        other_config = _nudge(super().run(inputs, case), 1)
        got = _nudge(other_config, 3) if self.apart else other_config
        return [("path B vs path C at config X", got, other_config)]


def test_paths_triples_compare_the_two_paths_with_each_other():
    assert _checks(PairedPaths(apart=False), PATHS_CASE)["invariance:paths"]["outcome"] == "PASS"
    failed = _checks(PairedPaths(apart=True), PATHS_CASE)["invariance:paths"]
    assert failed["outcome"] == "FAIL"
    assert failed["reason"].startswith("invariance paths (internal paths of the same call) violated: "
                                       "path B vs path C at config X: token 3, column 0:")
    assert " expected vs " in failed["reason"] and " got (bits " in failed["reason"]


FP8_GROUP_PATHS_CASE = Case(M=4, N=64, K=64, E=4, topk=2, scheme="fp8_block128", invariance="paths", seed=198)


def test_triton_backend_compares_the_fused_fp8_group_quantization_at_block_n_256(monkeypatch):
    """silu + fp8_block128 fuses its fp8 group quantization into GEMM1 only at BLOCK_N = 256 (no
    default config): run_paths runs both placements at the default config with that BLOCK_N and
    hands them over as a triple; the backend afterwards describes the default run again."""
    from kernels import experts as experts_module
    from moe_validate.backends import POISON_VARIANT, TritonBackend

    fused_launches = []
    real = experts_module.invoke_grouped_gemm

    def spy(a, b, c, **kw):
        if kw.get("c_scale") is not None:
            fused_launches.append(kw["config"].BLOCK_N)
        return real(a, b, c, **kw)

    monkeypatch.setattr(experts_module, "invoke_grouped_gemm", spy)

    assert FP8_GROUP_PATHS_CASE in matrix.suite_cases("smoke")
    backend = TritonBackend()
    inputs = make_inputs(FP8_GROUP_PATHS_CASE, device=default_device())
    backend.run(inputs, FP8_GROUP_PATHS_CASE)
    default_config, default_paths = backend.last_config, dict(backend.last_paths)
    assert default_paths["fused_activation"] is False and default_config["BLOCK_N"] < 256
    variants = backend.run_paths(inputs, FP8_GROUP_PATHS_CASE)
    assert [len(v) for v in variants] == [2, 2, 3, 2] and variants[3][0] == POISON_VARIANT
    label, fused, unfused = variants[2]
    assert "fused into GEMM1 vs unfused" in label and "BLOCK_N=256" in label
    assert invariance.bitwise_difference(unfused, fused, lambda r: r, ("a", "b")) is None
    assert backend.last_config == default_config and backend.last_paths == default_paths
    assert fused_launches == [256], "exactly one run (the fused variant) takes GEMM1's fp8 group quantization"
