"""The shared rules of moe_validate/contract/rules.py, pinned where they meet the outside world."""

import pytest
import triton

from moe_validate.contract.rules import NAIVE_SPARSITY, fused_silu_fp8_group, interpreting, takes_naive_path
from moe_validate.contract.spec import Activation, QuantScheme

# Triton's own spellings and a few near misses (whitespace, other truthy words Triton refuses).
SPELLINGS = ["1", "0", "true", "True", "TRUE", "on", "ON", "yes", "y", "Y", "false", "off", "no", "",
             "2", " 1", "1 ", "t", "enabled"]


@pytest.mark.skipif(not hasattr(triton, "knobs"), reason="this Triton has no triton.knobs to compare with")
@pytest.mark.parametrize("value", SPELLINGS)
def test_interpreting_reads_the_variable_as_triton_does(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is triton.knobs.runtime.interpret


def test_interpreting_without_the_variable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpreting() is False


def test_naive_path_threshold():
    E = 8 * NAIVE_SPARSITY
    assert takes_naive_path(8, E)  # exactly NAIVE_SPARSITY experts per route
    assert not takes_naive_path(9, E)
    assert not takes_naive_path(1, NAIVE_SPARSITY - 1)


@pytest.mark.parametrize("activation, scheme", [(Activation.SILU, QuantScheme.FP8_BLOCK128), ("silu", "fp8_block128")])
def test_fused_silu_fp8_group_takes_enums_or_values(activation, scheme):
    assert fused_silu_fp8_group(activation, scheme, None, False)
    assert not fused_silu_fp8_group(activation, scheme, 7.0, False)  # a GEMM1 clamp
    assert not fused_silu_fp8_group(activation, scheme, None, True)  # LoRA adds into c1 first


def test_fused_silu_fp8_group_needs_silu_and_fp8_block128():
    assert not fused_silu_fp8_group(Activation.GELU, QuantScheme.FP8_BLOCK128, None, False)
    assert not fused_silu_fp8_group(Activation.SILU_NO_MUL, QuantScheme.FP8_BLOCK128, None, False)
    assert not fused_silu_fp8_group(Activation.SILU, QuantScheme.FP8_CHANNEL_TOKEN, None, False)
