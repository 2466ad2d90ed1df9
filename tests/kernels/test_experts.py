"""kernels.fused_experts / TritonExperts against the reference (SPEC.md, Pipeline).

Each test: explicit seed; inputs from ``kernel_test_support.make_problem``; routing invariants
where the test is about routing; comparison with ``reference.fused_experts`` in mirror mode
(tight gate) and exact mode (accuracy budget), both bounds derived in
``kernel_test_support.budgets``. Bitwise invariances are compared with ``torch.equal``.

CPU runs (TRITON_INTERPRET=1) use tiny shapes; GPU runs add realistic ones (``@pytest.mark.gpu``).
"""

import pytest
import torch

import kernels
import reference
from kernel_test_support import (
    ON_GPU, assert_close_to_reference, make_problem, requires_triton_device, run_apply, run_kernel,
    to_device,
)
from moe_validate.contract.spec import Activation, QuantConfig, QuantScheme

pytestmark = requires_triton_device

ALL_ACTIVATIONS = [a.value for a in Activation]
SMALL = dict(M=5, K=48, I=24, E=4, topk=2)


# ---------------------------------------------------------------------------------------------
# Unquantized grid: every activation, every storage dtype, bias, expert map, router on input.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_every_activation_bf16_with_bias(activation):
    p = make_problem(seed=11, dtype=torch.bfloat16, activation=activation, bias=True, **SMALL)
    assert_close_to_reference(p, run_kernel(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "swigluoai", "gelu_tanh_no_mul"])
def test_storage_dtypes(dtype, activation):
    p = make_problem(seed=12, dtype=dtype, activation=activation, **SMALL)
    assert_close_to_reference(p, run_kernel(p))


def test_silu_clamp_limit():
    p = make_problem(seed=13, dtype=torch.bfloat16, activation="silu", clamp=0.5, **SMALL)
    out = run_kernel(p)
    assert_close_to_reference(p, out)
    unclamped = make_problem(seed=13, dtype=torch.bfloat16, activation="silu", **SMALL)
    assert not torch.equal(out, run_kernel(unclamped)), "the clamp limit had no effect"


def test_expert_map_drops_non_local_routes():
    p = make_problem(seed=14, dtype=torch.bfloat16, expert_map=True, bias=True, **SMALL)
    assert (p.kwargs["expert_map"][p.topk_ids.long()] < 0).any(), "recipe must contain non-local routes"
    assert_close_to_reference(p, run_kernel(p))


def test_router_weight_on_input():
    p = make_problem(seed=15, dtype=torch.bfloat16, router_on_input=True, M=6, K=48, I=24, E=4, topk=1)
    assert_close_to_reference(p, run_kernel(p))


# ---------------------------------------------------------------------------------------------
# Quantized schemes: every scheme vs reference. K = 256 and I = 128 so that the fp8 block scales
# have two K blocks for GEMM1, and int4 groups of 64 have several groups per tile row.
# ---------------------------------------------------------------------------------------------
QUANT_CASES = [
    ("fp8_block128", "silu", {}),  # the fused silu + fp8-group path
    ("fp8_block128", "gelu", {}),  # activation then requantization
    ("fp8_channel_token", "silu", {}),
    ("fp8_tensor_token", "swigluoai", {}),
    ("fp8_tensor_static", "silu", {}),
    ("fp8_tensor_dynamic", "relu2_no_mul", {}),
    ("int8_channel_token", "silu", {}),
    ("int8_w8a16", "silu", {}),
    ("int4_w4a16", "silu", dict(group_size=64)),
    ("int4_w4a16", "gelu", dict(group_size=32, zero_point=True)),
]


@pytest.mark.parametrize("scheme,activation,extra", QUANT_CASES, ids=[f"{s}-{a}" for s, a, _ in QUANT_CASES])
def test_quantized_scheme(scheme, activation, extra):
    p = make_problem(seed=21, dtype=torch.bfloat16, scheme=scheme, activation=activation, bias=True,
                     M=4, K=256, I=128, E=3, topk=2, **extra)
    assert_close_to_reference(p, run_kernel(p))


def test_fp8_tensor_weight_scale_layout_e11():
    """fp8 per-tensor weight scales may be [E] or [E, 1, 1]: both give the same bits."""
    p = make_problem(seed=22, dtype=torch.bfloat16, scheme="fp8_tensor_token", M=4, K=128, I=64, E=2, topk=2)
    q = p.kwargs["quant"]
    q3 = QuantConfig(**{**q.__dict__, "w1_scale": q.w1_scale.view(-1, 1, 1), "w2_scale": q.w2_scale.view(-1, 1, 1)})
    assert torch.equal(run_kernel(p), kernels.fused_experts(*p.args(), **{**p.kwargs, "quant": q3}))


def test_prequantized_input_with_a1q_scale():
    """fp8 hidden_states with a per-token a1q_scale: same bits as quantizing inside the call."""
    from kernels.quantize import quantize_activation

    p = make_problem(seed=23, dtype=torch.bfloat16, scheme="fp8_channel_token", M=4, K=128, I=64, E=2, topk=2)
    x_q, a1q = quantize_activation(p.x, QuantScheme.FP8_CHANNEL_TOKEN)
    out = kernels.fused_experts(x_q, *p.args()[1:], **p.kwargs, a1q_scale=a1q)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, run_kernel(p))


# ---------------------------------------------------------------------------------------------
# LoRA orchestration (kernels.lora owns the deltas; here: c1/c3 route-major, base GEMM handed
# over, unquantized inputs, router weight handling).
# ---------------------------------------------------------------------------------------------
def _lora(p, *, two_slices, stream, ids, enabled=None, seed=3):
    from moe_validate.contract.spec import LoRASpec

    g = torch.Generator().manual_seed(seed)
    L, r = 2, 3
    E, N, K = p.w1.shape
    I = p.w2.shape[2]
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).to(p.x.dtype).to(p.x.device)  # noqa: E731
    if two_slices:
        w13_a, w13_b = (rnd(L, E, r, K), rnd(L, E, r, K)), (rnd(L, E, N // 2, r), rnd(L, E, N // 2, r))
    else:
        w13_a, w13_b = rnd(L, E, r, K), rnd(L, E, N, r)
    return LoRASpec(w13_a, w13_b, rnd(L, E, r, I), rnd(L, E, K, r),
                    torch.tensor(ids, dtype=torch.int32, device=p.x.device),
                    enabled=None if enabled is None else torch.tensor(enabled, device=p.x.device), stream=stream)


@pytest.mark.parametrize("activation,two_slices,router_on_input",
                         [("silu", False, False), ("swigluoai", True, False), ("gelu_no_mul", False, True)])
def test_lora_orchestration(activation, two_slices, router_on_input):
    topk = 1 if router_on_input else 2
    p = make_problem(seed=25, dtype=torch.bfloat16, activation=activation, router_on_input=router_on_input,
                     M=6, K=48, I=24, E=3, topk=topk)
    p.kwargs["lora"] = _lora(p, two_slices=two_slices, stream="single", ids=[0, 1, -1, 1, 0, 0])
    single = run_kernel(p)
    assert_close_to_reference(p, single)
    p.kwargs["lora"] = _lora(p, two_slices=two_slices, stream="dual", ids=[0, 1, -1, 1, 0, 0])
    assert torch.equal(run_kernel(p), single), "single vs dual stream"


def test_lora_all_disabled_is_no_lora():
    p = make_problem(seed=26, dtype=torch.bfloat16, M=5, K=48, I=24, E=3, topk=2)
    base = run_kernel(p, config=FIXED)
    p.kwargs["lora"] = _lora(p, two_slices=False, stream="single", ids=[0, 1, 1, 0, -1], enabled=[False, False])
    assert torch.equal(run_kernel(p, config=FIXED), base)


# ---------------------------------------------------------------------------------------------
# Bitwise invariances (SPEC.md, Invariances) for a fixed launch config.
# ---------------------------------------------------------------------------------------------
FIXED = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def test_run_to_run_and_naive_vs_aligned():
    p = make_problem(seed=31, dtype=torch.bfloat16, bias=True, M=6, K=40, I=24, E=8, topk=3)
    a1, ex = run_apply(p, assignment="aligned", config=FIXED)
    assert ex.last_assignment == "aligned"
    a2, _ = run_apply(p, assignment="aligned", config=FIXED)
    n1, ex = run_apply(p, assignment="naive", config=FIXED)
    assert ex.last_assignment == "naive"
    assert torch.equal(a1, a2), "run-to-run"
    assert torch.equal(a1, n1), "naive vs aligned assignment"


def test_token_row_permutation():
    p = make_problem(seed=32, dtype=torch.bfloat16, M=7, K=40, I=24, E=4, topk=2)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0)).to(p.x.device)
    q = to_device(p, p.x.device)
    q.x, q.topk_weights, q.topk_ids = p.x[perm].contiguous(), p.topk_weights[perm], p.topk_ids[perm]
    assert torch.equal(run_kernel(p, config=FIXED)[perm], run_kernel(q, config=FIXED))


def test_padded_weight_strides():
    """Weights with padded outer strides (a slice of a wider buffer) give the same bits."""
    p = make_problem(seed=33, dtype=torch.bfloat16, M=5, K=40, I=24, E=3, topk=2)
    w1_big = torch.zeros(3, p.w1.shape[1] + 3, p.w1.shape[2] + 8, dtype=p.w1.dtype, device=p.x.device)
    w1_big[:, : p.w1.shape[1], : p.w1.shape[2]] = p.w1
    w2_big = torch.zeros(3, p.w2.shape[1], p.w2.shape[2] + 5, dtype=p.w2.dtype, device=p.x.device)
    w2_big[:, :, : p.w2.shape[2]] = p.w2
    w1_pad = w1_big[:, : p.w1.shape[1], : p.w1.shape[2]]
    w2_pad = w2_big[:, :, : p.w2.shape[2]]
    assert not w1_pad.is_contiguous() and not w2_pad.is_contiguous()
    out = kernels.fused_experts(p.x, w1_pad, w2_pad, p.topk_weights, p.topk_ids, **p.kwargs, config=FIXED)
    assert torch.equal(out, run_kernel(p, config=FIXED))


@pytest.mark.parametrize("scheme", ["none", "fp8_block128", "int8_channel_token"])
def test_batch_invariant_mode(scheme):
    """batch_invariant=True: a token's row alone equals its row inside a batch."""
    kw = dict(K=128, I=64) if scheme != "none" else dict(K=40, I=24)
    p = make_problem(seed=34, dtype=torch.bfloat16, scheme=scheme, M=9, E=4, topk=2, **kw)
    batch = run_kernel(p, batch_invariant=True)
    for m in (0, 8):
        one = to_device(p, p.x.device)
        one.x, one.topk_weights, one.topk_ids = p.x[m:m + 1], p.topk_weights[m:m + 1], p.topk_ids[m:m + 1]
        assert torch.equal(run_kernel(one, batch_invariant=True)[0], batch[m]), f"token {m}"


def test_last_config_is_reported():
    p = make_problem(seed=35, dtype=torch.bfloat16, **SMALL)
    _, ex = run_apply(p, config=FIXED)
    assert ex.last_config == FIXED
    _, ex = run_apply(p, batch_invariant=True)
    assert isinstance(ex.last_config, kernels.KernelConfig)


# ---------------------------------------------------------------------------------------------
# Regressions and edge shapes.
# ---------------------------------------------------------------------------------------------
def test_ragged_k_511():
    p = make_problem(seed=41, dtype=torch.bfloat16, M=3, K=511, I=24, E=2, topk=2)
    assert_close_to_reference(p, run_kernel(p))


def test_huge_positive_ids_in_padded_rows():
    """Padded token rows carry stale ids (2^40, 2^31 - 1): dropped, no out-of-bounds read."""
    p = make_problem(seed=42, dtype=torch.bfloat16, M=6, K=40, I=24, E=4, topk=2)
    ids = p.topk_ids.to(torch.int64)
    ids[4] = torch.tensor([2 ** 40, 2 ** 31 - 1])
    ids[5, 1] = 2 ** 62
    p.topk_ids = ids
    out, _ = run_apply(p)
    assert torch.equal(out[4], torch.zeros_like(out[4])), "a token without a valid route gets exact zeros"
    assert_close_to_reference(p, out)


def test_negative_ids_with_map_whose_last_entry_is_local():
    p = make_problem(seed=43, dtype=torch.bfloat16, M=6, K=40, I=24, E=3, topk=2)
    emap = torch.tensor([-1, 0, -1, 1, -1, 2], dtype=torch.int32, device=p.x.device)  # last entry local
    p.kwargs.update(expert_map=emap, global_num_experts=6)
    p.topk_ids = torch.tensor([[5, -1], [-1, -1], [3, 5], [1, -7], [0, 5], [-1, 3]], dtype=torch.int32,
                              device=p.x.device)
    out, _ = run_apply(p)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close_to_reference(p, out)


def test_shared_expert_appended_after_routed_ones():
    """An always-on shared expert as id E (global_num_experts = E + 1 with no map)."""
    p = make_problem(seed=44, dtype=torch.bfloat16, M=5, K=40, I=24, E=5, topk=2)
    shared = torch.full((5, 1), 4, dtype=torch.int32, device=p.x.device)
    p.topk_ids = torch.cat([torch.remainder(p.topk_ids[:, :1], 4), shared], dim=1)
    assert_close_to_reference(p, run_kernel(p))


@pytest.mark.parametrize("E,topk", [(33, 2), (1, 1), (3, 3)], ids=["E33", "E1", "topk_eq_E"])
def test_expert_counts(E, topk):
    p = make_problem(seed=45, dtype=torch.bfloat16, M=6, K=40, I=24, E=E, topk=topk)
    assert_close_to_reference(p, run_kernel(p))


@pytest.mark.parametrize("M", [0, 1])
def test_zero_and_one_token(M):
    p = make_problem(seed=46, dtype=torch.bfloat16, M=M, K=40, I=24, E=4, topk=2)
    out, _ = run_apply(p)
    assert tuple(out.shape) == (M, 40)
    if M:
        assert_close_to_reference(p, out)


def test_all_routes_to_one_expert():
    p = make_problem(seed=47, dtype=torch.bfloat16, M=20, K=40, I=24, E=4, topk=1)
    p.topk_ids = torch.full_like(p.topk_ids, 2)
    assert_close_to_reference(p, run_kernel(p))


def test_nan_token_does_not_leak():
    p = make_problem(seed=48, dtype=torch.bfloat16, M=6, K=40, I=24, E=2, topk=2)  # tokens share experts
    clean = run_kernel(p)
    p.x[3, 7] = float("nan")
    dirty, _ = run_apply(p)
    assert torch.isnan(dirty[3]).any()
    others = [m for m in range(6) if m != 3]
    assert torch.equal(dirty[others], clean[others])


@pytest.mark.parametrize("scheme", ["none", "fp8_block128"])
def test_nan_poisoned_workspaces_never_read(scheme):
    """Invalid routes leave workspace rows unwritten (NaN); nothing of them may reach the output."""
    kw = dict(K=128, I=64) if scheme != "none" else dict(K=40, I=24)
    p = make_problem(seed=49, dtype=torch.bfloat16, scheme=scheme, expert_map=True, M=6, E=3, topk=3, **kw)
    poisoned, _ = run_apply(p, poison=True, config=FIXED if scheme == "none" else None)
    zeroed, _ = run_apply(p, poison=False, config=FIXED if scheme == "none" else None)
    assert torch.isfinite(poisoned).all()
    assert torch.equal(poisoned, zeroed)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic shapes, native bf16 dots, 64-bit offsets.
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (realistic shapes are too slow for the interpreter)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scheme,extra", [("none", {}), ("fp8_block128", {}), ("fp8_channel_token", {}),
                                          ("int8_channel_token", {}), ("int8_w8a16", {}),
                                          ("int4_w4a16", dict(group_size=128))])
@pytest.mark.parametrize("M", [1, 33, 512])
def test_gpu_realistic_shapes(scheme, extra, M):
    p = make_problem(seed=51, dtype=torch.bfloat16, scheme=scheme, M=M, K=1024, I=512, E=16, topk=4,
                     bias=True, **extra)
    assert_close_to_reference(p, run_kernel(p))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fuse_activation", [False, True], ids=["c1_stored", "fused_c2"])
def test_gpu_int64_offsets_route_times_n_over_2_31(fuse_activation):
    """M*topk*I > 2^31: c1 [R, 2I] (unfused) and c2 [R, I] (written by the fused GEMM1) offsets
    need 64-bit arithmetic; the run must not crash or corrupt."""
    M, topk, K, I, E = 16384, 8, 256, 16896, 8  # R*I = 131072 * 16896 > 2^31
    assert M * topk * I > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(52)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(E, 2 * I, K, device="cuda", generator=g) / 16).bfloat16()
    w2 = (torch.randn(E, K, I, device="cuda", generator=g) / 130).bfloat16()  # ~1/sqrt(I)
    ids = torch.randint(0, E, (M, topk), device="cuda", generator=g, dtype=torch.int32)
    tw = torch.rand(M, topk, device="cuda", generator=g)
    out = kernels.fused_experts(x, w1, w2, tw, ids, fuse_activation=fuse_activation)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    for m in (0, M - 1):  # the last token's routes live at the highest c1/c2 offsets
        ref = reference.fused_experts(x[m:m + 1], w1, w2, tw[m:m + 1], ids[m:m + 1], precision="mirror")
        assert (out[m].double() - ref[0]).abs().max() <= 0.05 * ref.abs().max() + 1e-3


def test_gemm2_runs_its_own_tiles(monkeypatch):
    """A config with ``gemm2`` tiles: GEMM1 launches the base tiles, GEMM2 its own (same BLOCK_M)."""
    from kernels import experts as experts_module
    from kernels.configs import Gemm2Tiles

    launched = []
    real = experts_module.invoke_grouped_gemm

    def spy(a, b, c, **kw):
        launched.append((tuple(b.shape), kw["config"]))
        return real(a, b, c, **kw)

    monkeypatch.setattr(experts_module, "invoke_grouped_gemm", spy)
    p = make_problem(seed=36, dtype=torch.bfloat16, bias=True, **SMALL)
    cfg = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, gemm2=Gemm2Tiles(BLOCK_N=16, BLOCK_K=16))
    out = run_kernel(p, config=cfg)
    (w1_shape, c1_cfg), (w2_shape, c2_cfg) = launched
    assert w1_shape == tuple(p.w1.shape) and w2_shape == tuple(p.w2.shape)
    assert (c1_cfg.BLOCK_N, c1_cfg.BLOCK_K) == (32, 32)
    assert (c2_cfg.BLOCK_M, c2_cfg.BLOCK_N, c2_cfg.BLOCK_K) == (16, 16, 16)
    assert_close_to_reference(p, out)
