"""Programmatic dependent launch (``kernels._launch``): on where it may be, and never a change of bits.

With PDL a kernel's launch may be processed before its predecessor has completed, and its
programs wait in ``gdc_wait`` before touching memory. A kernel that read or wrote before that wait
would race: its output would differ from the PDL-off run now and then. The GPU tests compare PDL-on against PDL-off bit for
bit, eagerly and in CUDA-graph replays (where launches are tightest), over every multi-kernel chain
of the pipeline: the naive and the aligned route assignment, the three-kernel per-tensor dynamic
quantizer, the separate silu+fp8-group quantizer and the unfused activation kernel.
"""

import pytest
import torch

import kernels
from kernel_test_support import ON_GPU, make_problem, raw_bits, requires_triton_device, run_apply
from kernels import _launch
from kernels.moe_sum import _moe_sum_kernel

pytestmark = requires_triton_device


def test_off_without_a_cuda_device(monkeypatch):
    assert _launch.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _launch.pdl_enabled(torch.device("cuda", 0))  # interpreted launches take CPU tensors


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(_launch.PDL_ENV, "0")
    assert _launch.launch_options(torch.device("cuda", 0)) == {"PDL": False}


hopper = pytest.mark.skipif(not (ON_GPU and torch.cuda.get_device_capability() >= (9, 0)),
                            reason="PDL needs a CUDA GPU of compute capability >= 9.0")


@pytest.mark.gpu
@hopper
def test_kernels_are_built_and_launched_with_it():
    c3 = torch.randn(4, 2, 256, device="cuda", dtype=torch.bfloat16)
    valid = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    out = torch.empty(4, 256, device="cuda", dtype=torch.bfloat16)
    options = _launch.launch_options(out.device)
    assert options == {"PDL": True, "launch_pdl": True}
    compiled = _moe_sum_kernel[(1, 2)](c3, valid, out, 4, 256, *c3.stride(), *valid.stride(), *out.stride(),
                                       TOP_K=2, VALID_IS_EXPERT=True, BLOCK_T=16, BLOCK_K=128, **options)
    assert compiled.metadata.launch_pdl
    assert "griddepcontrol.wait" in compiled.asm["ptx"]
    assert torch.equal(out, (c3[:, 0].float() + c3[:, 1].float()).to(torch.bfloat16))


# (scheme, activation, M, assignment, fuse_activation): each exercises a different kernel chain
CHAINS = [
    ("none", "silu", 1, "naive", "auto"),  # route -> GEMM1+act -> GEMM2 -> moe_sum
    ("none", "gelu", 64, "aligned", False),  # + counts memset, offsets, scatter, separate activation
    ("fp8_tensor_dynamic", "silu", 3, "auto", "auto"),  # absmax partials -> tensor scale -> quantize, twice
    ("fp8_block128", "silu", 40, "aligned", "auto"),  # group quantizer, separate silu+fp8-group quantizer
    ("fp8_tensor_token", "swigluoai", 1, "naive", "auto"),  # per-token quantizer, biases
]


def _chain_problem(scheme, activation, M, seed):
    return make_problem(seed=seed, M=M, K=512, I=384, E=32, topk=4, dtype=torch.bfloat16, scheme=scheme,
                        activation=activation, bias=activation == "swigluoai", expert_map=True)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("scheme,activation,M,assignment,fuse", CHAINS, ids=[f"{c[0]}-{c[1]}-M{c[2]}" for c in CHAINS])
def test_same_bits_with_and_without_pdl_eager_and_in_graphs(scheme, activation, M, assignment, fuse, monkeypatch):
    p = _chain_problem(scheme, activation, M, seed=4000 + M)
    kw = dict(assignment=assignment, fuse_activation=fuse, poison=False)

    def without_pdl():
        with monkeypatch.context() as m:
            m.setenv(_launch.PDL_ENV, "0")
            return run_apply(p, **kw)[0]

    eager = run_apply(p, **kw)[0]  # also compiles every kernel before the capture
    assert torch.equal(raw_bits(eager), raw_bits(without_pdl()))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = run_apply(p, **kw)
    generator = torch.Generator(device="cpu").manual_seed(M)
    for _ in range(8):  # new inputs in place, replayed back to back, each checked against PDL off
        p.x.copy_(torch.randn(p.x.shape, generator=generator).to(p.x))
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(raw_bits(captured), raw_bits(without_pdl()))
