"""TritonExperts' declarations about itself, held to what apply does: ``alternative_paths`` names
the paths a call does not take and which path each switch set takes; ``workspace_bytes`` bounds the
memory apply uses. (That every alternative gives the default's bits: tests/moe_validate/test_invariance.py.)"""

import pytest

import kernels
from kernel_test_support import make_problem, requires_triton_device, run_apply, zero_lora
from kernels.configs import KernelConfig

pytestmark = requires_triton_device


def _takes_as_declared(p, alternative, lora=None):
    sw = alternative.switches
    _, experts = run_apply(p, assignment=sw.assignment, fuse_activation=sw.fuse_activation,
                           fuse_topk_sum=sw.fuse_topk_sum, config=sw.config, lora=lora)
    return (experts.last_assignment, experts.last_fused_activation, experts.last_fused_topk_sum) == (
        alternative.takes.assignment, alternative.takes.fused_activation, alternative.takes.fused_topk_sum)


def _alternatives(p, lora=None, **kw):
    experts = kernels.TritonExperts(p.kwargs.get("quant"))
    kwargs = {k: v for k, v in p.kwargs.items() if k != "quant"}
    return experts.alternative_paths(*p.args(), **kwargs, lora=lora, **kw)


@pytest.mark.parametrize("M, E", [(8, 4), (1, 8)], ids=["aligned", "naive"])
def test_each_alternative_takes_the_declared_path(M, E):
    p = make_problem(seed=3, M=M, K=64, I=32, E=E, topk=2)
    _, default = run_apply(p)
    alternatives = _alternatives(p)
    assert len(alternatives) == 3  # assignment, top-k sum placement, activation placement
    for alternative in alternatives:
        assert alternative.versus is None
        assert _takes_as_declared(p, alternative), alternative.label
    taken = {(a.takes.assignment, a.takes.fused_topk_sum) for a in alternatives}
    taken.add((default.last_assignment, default.last_fused_topk_sum))
    assert {("aligned", False), ("naive", True), ("naive", False)} <= taken  # every top-k sum placement


def test_lora_offers_no_fusion():
    """LoRA adds into c1 and c3: no fused activation or top-k sum exists; only the assignment flips."""
    p = make_problem(seed=4, M=1, K=64, I=32, E=8, topk=2)
    lora = zero_lora(p)
    alternatives = _alternatives(p, lora=lora)
    assert [a.label for a in alternatives] == ["assignment=aligned (default naive)"]
    assert _takes_as_declared(p, alternatives[0], lora=lora)


def test_fp8_group_quantization_is_compared_at_block_n_256():
    p = make_problem(seed=5, M=4, K=128, I=128, E=4, topk=2, scheme="fp8_block128")
    alternatives = _alternatives(p)
    fused = alternatives[-1]
    assert fused.versus is not None and fused.switches.config.BLOCK_N == fused.versus.config.BLOCK_N == 256
    assert fused.switches.fuse_activation is True and fused.versus.fuse_activation is False
    assert fused.takes.fused_activation
    assert _takes_as_declared(p, fused)


def test_workspace_bytes_cover_the_workspaces():
    experts = kernels.TritonExperts()
    for M, N, K, topk, E, act in [(1, 64, 32, 2, 8, "silu"), (33, 256, 128, 4, 16, "gelu_no_mul")]:
        (r13, c13), (r2, c2), _ = experts.workspace_shapes(M, N, K, topk, E, E, None, act)
        bound = experts.workspace_bytes(M, N, K, topk, E, act, 2, 256)
        routing = 4 * (M * topk + E * 256)  # sorted routes padded to BLOCK_M = 256 per expert
        assert bound >= (r13 * c13 + r2 * c2) * 2 + routing
        assert bound < experts.workspace_bytes(2 * M, N, K, topk, E, act, 2, 256)


def test_alternative_paths_launch_nothing(monkeypatch):
    from kernels import experts as experts_module

    def no_launch(*args, **kwargs):
        raise AssertionError("alternative_paths launched a kernel")

    monkeypatch.setattr(experts_module, "invoke_grouped_gemm", no_launch)
    p = make_problem(seed=6, M=8, K=64, I=32, E=4, topk=2)
    assert _alternatives(p, config=KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4,
                                                num_stages=1))
