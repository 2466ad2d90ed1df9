"""The top-k sum fused into GEMM2 on the tiny-M naive path gives moe_sum's bits.

``TritonExperts(fuse_topk_sum=True)`` has GEMM2 run one program per (token, column tile) that
loops over the token's slots, runs each valid slot's tile through the unfused GEMM2's own code
(``grouped_gemm._route_tile_fp32``), rounds it to S as c3 would be stored and adds it in fp32 from
+0.0 in slot order, skipping invalid slots, then stores round_S(sum) into the output; ``False``
stores c3 and runs ``moe_sum``. SPEC.md step 10 fixes the sum exactly that way, so the outputs must
agree bit for bit: for every scheme and storage dtype, with biases, expert maps (invalid routes),
tokens without any valid route (exact zeros), topk = 1, the router weight on the input, several
column and K tiles. The fusion exists only on the naive assignment without LoRA; anything else
with ``fuse_topk_sum=True`` must be refused with the reason.
"""

import math

import pytest
import torch

import kernels
from kernel_test_support import (DEVICE, ON_GPU, assert_close_to_reference, assert_same_bits, make_problem,
                                 raw_bits, requires_triton_device, run_apply, zero_lora)
from kernels.grouped_gemm import invoke_grouped_gemm
from moe_validate.contract.spec import QuantScheme

pytestmark = requires_triton_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# GEMM2 writes K = 40 columns: BLOCK_N = 32 gives two column tiles (the second ragged), and
# BLOCK_K = 32 over I = 64 two K tiles.
TWO_TILES = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def assert_fused_sum_matches_moe_sum(p, *, config=None):
    """Both placements on the naive path, NaN-poisoned workspaces and outputs: the same output
    bits; the fused run never writes c3 (nor c1, with the activation fused too). Returns the output."""
    ws_fused = []
    out_f, ex_f = run_apply(p, assignment="naive", fuse_topk_sum=True, config=config, workspaces=ws_fused)
    out_u, ex_u = run_apply(p, assignment="naive", fuse_topk_sum=False, config=config)
    assert ex_f.last_fused_topk_sum is True and ex_u.last_fused_topk_sum is False
    assert ex_f.last_assignment == ex_u.last_assignment == "naive"
    assert_same_bits(out_f, out_u, "output", "top-k sum fused into GEMM2", "GEMM2 -> c3 -> moe_sum")
    if ex_f.last_fused_activation:
        assert torch.isnan(ws_fused[0]).all(), "workspace13 (c1, c3) must stay unwritten: nothing reads it"
    return out_f


# ---------------------------------------------------------------------------------------------
# Every scheme (and storage dtype) the pipeline supports, with biases and an expert map: about
# half of the routes are not local (skipped), topk = 3 sums up to three tiles per token.
# ---------------------------------------------------------------------------------------------
SCHEMES = [
    ("none", "fp32", {}), ("none", "fp16", {}), ("none", "bf16", {}),
    ("fp8_block128", "bf16", {}), ("fp8_channel_token", "bf16", {}), ("fp8_tensor_token", "fp16", {}),
    ("fp8_tensor_static", "bf16", {}), ("fp8_tensor_dynamic", "bf16", {}),
    ("int8_channel_token", "bf16", {}), ("int8_w8a16", "fp16", {}),
    ("int4_w4a16", "bf16", dict(group_size=32, zero_point=True, K=64)),  # w1's K: whole groups
]


@pytest.mark.parametrize("scheme,dtype,extra", SCHEMES, ids=[f"{s}-{d}" for s, d, _ in SCHEMES])
def test_every_scheme(scheme, dtype, extra):
    scheme_ = QuantScheme.parse(scheme)
    if ON_GPU and scheme_.min_capability and torch.cuda.get_device_capability() < scheme_.min_capability:
        pytest.skip(f"{scheme} needs compute capability {scheme_.min_capability}")
    shape = {**dict(M=4, K=40, I=64, E=4, topk=3), **extra}
    p = make_problem(seed=401, dtype=DTYPES[dtype], scheme=scheme, activation="silu", bias=True, expert_map=True,
                     **shape)
    assert (p.kwargs["expert_map"][p.topk_ids.long()] < 0).any(), "recipe must contain non-local routes"
    assert_fused_sum_matches_moe_sum(p, config=TWO_TILES)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_default_config_and_reference(dtype):
    """The config the call picks itself, and agreement with the reference (mirror and exact)."""
    p = make_problem(seed=402, dtype=DTYPES[dtype], activation="gelu", bias=True, M=3, K=48, I=32, E=4, topk=2)
    assert_close_to_reference(p, assert_fused_sum_matches_moe_sum(p))


# ---------------------------------------------------------------------------------------------
# Routing edges: tokens without a valid route, topk = 1, the router weight on the input.
# ---------------------------------------------------------------------------------------------
def _with_all_invalid_token(p, token: int):
    """Route ``token`` to non-local experts only (odd global ids: expert_map -1, make_problem)."""
    topk = p.topk_ids.shape[1]
    p.topk_ids[token] = torch.arange(1, 2 * topk, 2, dtype=p.topk_ids.dtype, device=p.topk_ids.device)
    assert (p.kwargs["expert_map"][p.topk_ids[token].long()] < 0).all()
    return p


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_token_without_a_valid_route_gets_exact_zeros(dtype):
    p = _with_all_invalid_token(make_problem(seed=403, dtype=DTYPES[dtype], bias=True, expert_map=True,
                                             M=3, K=40, I=32, E=4, topk=2), token=1)
    out = assert_fused_sum_matches_moe_sum(p, config=TWO_TILES)
    assert not raw_bits(out[1]).any(), "a token without a valid route must get +0.0 (bias not added, no NaN)"
    assert raw_bits(out[0]).any() and raw_bits(out[2]).any()


def test_every_token_without_a_valid_route():
    p = make_problem(seed=404, dtype=torch.bfloat16, expert_map=True, M=2, K=40, I=32, E=4, topk=2)
    for token in range(2):
        _with_all_invalid_token(p, token)
    out = assert_fused_sum_matches_moe_sum(p)
    assert not raw_bits(out).any()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_topk_1(dtype):
    p = make_problem(seed=405, dtype=DTYPES[dtype], activation="swigluoai", bias=True, M=3, K=40, I=32, E=4, topk=1)
    assert_fused_sum_matches_moe_sum(p, config=TWO_TILES)


@pytest.mark.parametrize("scheme", ["none", "fp8_channel_token"])
def test_router_weight_on_input(scheme):
    if ON_GPU and scheme != "none" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    p = make_problem(seed=406, dtype=torch.bfloat16, scheme=scheme, bias=True, router_on_input=True,
                     expert_map=True, M=5, K=40, I=32, E=4, topk=1)
    out = assert_fused_sum_matches_moe_sum(p, config=TWO_TILES)
    assert_close_to_reference(p, out)


# ---------------------------------------------------------------------------------------------
# GEMM2 alone (invoke_grouped_gemm): c3 + moe_sum against topk_sum= on hand-made route experts,
# int64 poison included: -1 slots in every position, a token with none valid.
# ---------------------------------------------------------------------------------------------
def test_gemm2_alone_against_c3_and_moe_sum():
    g = torch.Generator().manual_seed(407)
    M, topk, E, I, K = 4, 3, 3, 32, 40
    R = M * topk
    a = torch.randn(R, I, generator=g).to(torch.bfloat16).to(DEVICE)
    w2 = (torch.randn(E, K, I, generator=g) / math.sqrt(I)).to(torch.bfloat16).to(DEVICE)
    bias = (torch.randn(E, K, generator=g) * 0.1).to(DEVICE)
    route_weight = (torch.rand(R, generator=g) + 0.1).to(DEVICE)
    route_expert = torch.tensor([[0, -1, 2], [-1, -1, -1], [1, 1, -1], [-1, 2, 0]], dtype=torch.int32,
                                device=DEVICE).view(-1)
    kw = dict(scheme=QuantScheme.NONE, config=TWO_TILES, top_k_div=1, num_routes=R, sorted_route_ids=None,
              expert_ids=None, num_post_padded=None, route_expert=route_expert, naive=True, bias=bias,
              route_weight=route_weight)
    c3 = torch.full((R, K), math.nan, dtype=torch.bfloat16, device=DEVICE)
    invoke_grouped_gemm(a, w2, c3, **kw)
    expected = torch.full((M, K), math.nan, dtype=torch.bfloat16, device=DEVICE)
    kernels.moe_sum(c3.view(M, topk, K), route_expert.view(M, topk), expected)
    out = torch.full((M, K), math.nan, dtype=torch.bfloat16, device=DEVICE)
    invoke_grouped_gemm(a, w2, out, topk_sum=topk, **kw)
    assert_same_bits(out, expected, "output", "topk_sum", "c3 + moe_sum")
    assert not raw_bits(out[1]).any() and torch.isfinite(out).all()


def _gemm2_call(aligned=False, out_dtype=torch.bfloat16, **change):
    """A valid GEMM2 call with the top-k sum (M = 2 tokens, topk = 2, naive), ``change`` applied."""
    R, E, I, K = 4, 2, 16, 16
    a = torch.ones(R, I, dtype=torch.bfloat16, device=DEVICE)
    w2 = torch.ones(E, K, I, dtype=torch.bfloat16, device=DEVICE)
    kw = dict(scheme=QuantScheme.NONE, config=TWO_TILES, top_k_div=1, num_routes=R, sorted_route_ids=None,
              expert_ids=None, num_post_padded=None, naive=True, topk_sum=2,
              route_expert=torch.tensor([0, 1, -1, -1], dtype=torch.int32, device=DEVICE))
    if aligned:
        kw.update(naive=False, sorted_route_ids=torch.arange(16, dtype=torch.int32, device=DEVICE),
                  expert_ids=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                  num_post_padded=torch.full((1,), 16, dtype=torch.int32, device=DEVICE))
    kw.update(change)
    return a, w2, torch.full((2, K), math.nan, dtype=out_dtype, device=DEVICE), kw


def test_the_valid_gemm2_call_runs():
    a, w2, out, kw = _gemm2_call()
    invoke_grouped_gemm(a, w2, out, **kw)
    assert torch.equal(out.float(), torch.tensor([[32.0] * 16, [0.0] * 16], device=DEVICE))


@pytest.mark.parametrize("change, needle", [
    (dict(aligned=True), "needs the naive path"),
    (dict(top_k_div=2), "top_k_div=1"),
    (dict(topk_sum=0), "topk_sum must be the topk"),
    (dict(topk_sum=True), "topk_sum must be the topk"),
    (dict(topk_sum=3), r"num_routes \(4\) must be M \* topk"),
    (dict(topk_sum=1), r"c is the \[M, N\] output, M = num_routes // topk = 4 rows; got \(2, 16\)"),
    (dict(activation="silu_no_mul"), "no activation"),
    (dict(out_dtype=torch.float8_e4m3fn), "c must have the storage dtype"),
], ids=["aligned", "top_k_div", "topk_0", "topk_bool", "topk_3", "c_rows", "activation", "c_dtype"])
def test_invoke_refuses_bad_topk_sum_use(change, needle):
    a, w2, out, kw = _gemm2_call(**change)
    with pytest.raises(ValueError, match=needle):
        invoke_grouped_gemm(a, w2, out, **kw)
    assert torch.isnan(out.float()).all(), "refused before any launch"


# ---------------------------------------------------------------------------------------------
# Which path runs: auto fuses on the naive assignment without LoRA; True refuses the rest before
# any launch, naming the reason.
# ---------------------------------------------------------------------------------------------
def test_auto_fuses_on_the_naive_path_only():
    naive_by_sparsity = make_problem(seed=408, M=1, K=40, I=32, E=8, topk=2)  # M*topk*4 <= E
    _, ex = run_apply(naive_by_sparsity)
    # the interpreter has no SMs: "auto" fuses every naive call; on a GPU this grid of a few
    # programs is far below two per SM (test_gpu_auto_fuses_only_with_two_programs_per_sm)
    assert ex.last_assignment == "naive" and ex.last_fused_topk_sum is (not ON_GPU)
    aligned = make_problem(seed=408, M=3, K=40, I=32, E=4, topk=2)
    _, ex = run_apply(aligned)
    assert ex.last_assignment == "aligned" and ex.last_fused_topk_sum is False
    with pytest.raises(ValueError, match="fuse_topk_sum=True.*only on the tiny-M naive assignment"):
        run_apply(aligned, fuse_topk_sum=True)


def test_lora_keeps_moe_sum_and_true_refuses_it():
    p = make_problem(seed=409, M=1, K=40, I=32, E=8, topk=2)
    out, ex = run_apply(p, lora=zero_lora(p))
    assert ex.last_assignment == "naive" and ex.last_fused_topk_sum is False
    with pytest.raises(ValueError, match="fuse_topk_sum=True.*LoRA adds its w2 delta into c3 before the sum"):
        run_apply(p, lora=zero_lora(p), fuse_topk_sum=True)
    # all-zero adapters add nothing: the moe_sum path's output is the fused path's
    fused, _ = run_apply(p)
    assert_same_bits(out, fused, "output", "LoRA (zero adapters), moe_sum", "no LoRA, fused top-k sum")


def test_fuse_topk_sum_must_be_auto_or_bool():
    with pytest.raises(ValueError, match="fuse_topk_sum must be 'auto', True or False; got 'yes'"):
        kernels.TritonExperts(None, fuse_topk_sum="yes")
    p = make_problem(seed=410, M=1, K=16, I=16, E=8, topk=2)
    with pytest.raises(ValueError, match="fuse_topk_sum must be 'auto', True or False; got 1"):
        kernels.fused_experts(*p.args(), **p.kwargs, fuse_topk_sum=1)


# ---------------------------------------------------------------------------------------------
# GPU: native MMAs and the FMA contraction the fused sum must not undergo (fp32 storage), on
# decode shapes with the configs the call selects itself.
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (realistic shapes are too slow for the interpreter)")

GPU_CASES = [
    ("none", "bf16"), ("none", "fp16"), ("none", "fp32"), ("fp8_block128", "bf16"), ("fp8_tensor_token", "bf16"),
    ("fp8_channel_token", "bf16"), ("int8_channel_token", "bf16"), ("int8_w8a16", "bf16"), ("int4_w4a16", "bf16"),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scheme,dtype", GPU_CASES, ids=[f"{s}-{d}" for s, d in GPU_CASES])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_fused_sum_matches_moe_sum(scheme, dtype, M):
    extra = dict(group_size=128) if scheme == "int4_w4a16" else {}
    p = make_problem(seed=411, dtype=DTYPES[dtype], scheme=scheme, M=M, K=1024, I=640, E=64, topk=8, bias=True,
                     expert_map=True, **extra)
    assert_fused_sum_matches_moe_sum(p)


@pytest.mark.gpu
@gpu
def test_gpu_auto_fuses_only_with_two_programs_per_sm():
    """"auto" wants M * cdiv(K, BLOCK_N) >= 2 programs per SM for the fused grid (the topk slots
    run one after another in a program); fewer, and the unfused GEMM2 + moe_sum run."""
    from kernels.experts import _FUSED_SUM_PROGRAMS_PER_SM
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    config = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    enough = _FUSED_SUM_PROGRAMS_PER_SM * sms
    for M, K in [(1, 1024), (2, 32 * enough // 2), (4, 32 * enough // 4 - 32)]:
        p = make_problem(seed=412, M=M, K=K, I=256, E=64, topk=4)
        _, ex = run_apply(p, config=config)
        assert ex.last_assignment == "naive"
        programs = M * -(-K // config.BLOCK_N)
        assert ex.last_fused_topk_sum is (programs >= enough), (M, K, programs, enough)
