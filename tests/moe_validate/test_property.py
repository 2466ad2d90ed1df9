"""Property search: small shapes, dtypes and seeds through the triton backend, steered by
``hypothesis.target`` toward the largest normalized error, which must stay within the gate.

The normalized error is ``Evaluation.worst_margin``: the largest observed / allowed ratio over the
gate's metrics (mirror reference), so "within the gate" is exactly ``worst_margin <= 1`` and
``passed``. How many examples and whether they are random is the loaded hypothesis profile's
(``moe_validate/hypothesis_profiles.py``; ``pytest --hypothesis-profile ci|dev|gpu-nightly``): on CPU
the default ``ci`` profile is small and derandomized (the same examples on every CI run). The
``-m slow`` test searches 8x wider, always at random.
"""

import pytest

pytest.importorskip("kernels", reason="the triton backend needs the kernels package")

from hypothesis import assume, given, settings, target  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moe_validate.backends import TritonBackend  # noqa: E402
from moe_validate.matrix import Case  # noqa: E402
from moe_validate.results import Outcome  # noqa: E402
from moe_validate.runner import run_case_inprocess  # noqa: E402



@st.composite
def small_cases(draw):
    E = draw(st.integers(1, 4))
    K = draw(st.sampled_from([16, 32, 48, 64]))
    intermediate = draw(st.sampled_from([16, 32]))
    return Case(
        M=draw(st.integers(1, 9)),
        N=2 * intermediate,  # silu is gated: w1 holds gate and up rows
        K=K,
        E=E,
        topk=draw(st.integers(1, min(E, 2))),
        dtype=draw(st.sampled_from(["bf16", "fp16", "fp32"])),
        scheme=draw(st.sampled_from(["none", "int8_w8a16"])),
        routing=draw(st.sampled_from(["uniform", "skewed"])),
        seed=draw(st.integers(0, 2**20)),
    )


def _check(case: Case) -> None:
    valid, _ = case.is_valid()
    assume(valid)
    result = run_case_inprocess(case, TritonBackend(), backend_name="triton")
    assume(result.outcome is not Outcome.SKIP)
    margin = result.record["worst_margin"]
    if margin is not None:
        target(float(margin), label="worst gate margin (observed / allowed)")
    assert result.outcome is Outcome.PASS, result.message()
    assert margin is not None and margin <= 1.0, result.message()


@given(small_cases())
def test_worst_normalized_error_stays_within_the_gate(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=8 * settings.default.max_examples, derandomize=False)
@given(small_cases())
def test_worst_normalized_error_stays_within_the_gate_wide(case):
    _check(case)
