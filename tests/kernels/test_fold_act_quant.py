"""Activation quantization folded into the GEMMs on the tiny-M naive path gives the unfolded bits.

``TritonExperts(fold_act_quant="auto" | True)`` on the naive path (one route per tile) has each
GEMM program quantize its own A row (x for GEMM1, c2 for GEMM2) with ``kernels.quantize``'s
helpers, instead of the ``quantize_activation`` launches of ``fold_act_quant=False``. Same
codes, same scales, same accumulation: c3 (workspace13) and the output must agree bit for bit,
for per-token schemes (the row's absmax over all K, several K tiles and a ragged tail) and the
per-token-group fp8_block128 (BLOCK_K = 128: one K tile per group, ragged last group), with
invalid routes, the router weight on the input or in GEMM2, and fp32/fp16/bf16 storage.
"""

import pytest
import torch

import kernels
from kernel_test_support import (ON_GPU, assert_close_to_reference, make_problem, requires_triton_device,
                                 run_apply)
from kernels.grouped_gemm import invoke_grouped_gemm

pytestmark = requires_triton_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
TOKEN_SCHEMES = ["fp8_tensor_token", "fp8_channel_token", "int8_channel_token"]

# BLOCK_K = 32: K = 200 is seven K tiles, the last one ragged (8 columns), for the per-token
# absmax pass and the quantized tiles. BLOCK_K = 128 (fp8_block128): K = 200 is a full group and
# a ragged one of 72 columns; I = 136 likewise for GEMM2.
TOKEN_TILES = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
GROUP_TILES = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
SHAPE = dict(M=3, K=200, I=136, E=8, topk=2)


def _tiles(scheme):
    return GROUP_TILES if scheme == "fp8_block128" else TOKEN_TILES


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


def assert_folded_matches_unfolded(p, *, config, expect=(True, True), assignment="naive", fold=True):
    """Both paths on NaN-poisoned workspaces: same c3 (workspace13) and output bits. Returns the output."""
    ws_f, ws_u = [], []
    out_f, ex_f = run_apply(p, assignment=assignment, config=config, fold_act_quant=fold, workspaces=ws_f)
    out_u, ex_u = run_apply(p, assignment=assignment, config=config, fold_act_quant=False, workspaces=ws_u)
    assert ex_f.last_folded_act_quant == expect and ex_u.last_folded_act_quant == (False, False)
    assert ex_f.last_assignment == ex_u.last_assignment == "naive"
    for name, a, b in (("workspace13 (c1/c3)", ws_f[0], ws_u[0]), ("workspace2 (c2)", ws_f[1], ws_u[1])):
        differ = _bits(a) != _bits(b)
        assert not differ.any(), (
            f"{name} differs in {int(differ.sum())} / {differ.numel()} elements; first at "
            f"{tuple(int(i) for i in differ.nonzero()[0])}: folded {a[differ][0].item()!r}, "
            f"unfolded {b[differ][0].item()!r}")
    assert torch.equal(_bits(out_f), _bits(out_u)), "workspaces agree but the outputs differ"
    return out_f


# ---------------------------------------------------------------------------------------------
# Every foldable scheme x storage dtype, with bias and invalid routes (an expert map: half of the
# routes are not local, their tiles exit before loading A).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("scheme", TOKEN_SCHEMES + ["fp8_block128"])
def test_every_scheme_and_dtype(scheme, dtype):
    # gelu: fp8_block128 with silu takes the fused silu+fp8 quantizer for GEMM2's input
    p = make_problem(seed=301, dtype=DTYPES[dtype], scheme=scheme, activation="gelu", bias=True,
                     expert_map=True, **SHAPE)
    assert (p.kwargs["expert_map"][p.topk_ids.long()] < 0).any(), "recipe must contain non-local routes"
    assert_folded_matches_unfolded(p, config=_tiles(scheme))


@pytest.mark.parametrize("scheme", TOKEN_SCHEMES + ["fp8_block128"])
@pytest.mark.parametrize("activation", ["swigluoai", "relu2_no_mul"])
def test_activations(scheme, activation):
    p = make_problem(seed=302, dtype=torch.bfloat16, scheme=scheme, activation=activation, **SHAPE)
    assert_folded_matches_unfolded(p, config=_tiles(scheme))


def test_fused_silu_fp8_group_path_folds_gemm1_only():
    """silu + fp8_block128: GEMM2's input comes from the fused silu+fp8 quantizer (fp32 activation,
    never rounded to S): only GEMM1's input quantization folds."""
    p = make_problem(seed=303, dtype=torch.bfloat16, scheme="fp8_block128", activation="silu", expert_map=True,
                     **SHAPE)
    assert_folded_matches_unfolded(p, config=GROUP_TILES, expect=(True, False))


@pytest.mark.parametrize("scheme", ["fp8_tensor_token", "fp8_block128"])
def test_router_weight_on_input(scheme):
    p = make_problem(seed=304, dtype=torch.float16, scheme=scheme, activation="gelu", router_on_input=True,
                     M=4, K=200, I=136, E=8, topk=1)
    assert_folded_matches_unfolded(p, config=_tiles(scheme))


@pytest.mark.parametrize("scheme", ["int8_channel_token", "fp8_block128"])
def test_unfused_activation_and_clamp(scheme):
    """The fold is in the K loop: the activation kernel path (fuse_activation=False's GEMM1 writes
    c1) and silu's clamp (which keeps fp8_block128 off the fused quantizer) fold the same way."""
    p = make_problem(seed=305, dtype=torch.bfloat16, scheme=scheme, activation="silu", clamp=1.0, **SHAPE)
    assert_folded_matches_unfolded(p, config=_tiles(scheme))


def test_outliers_and_a_zero_row():
    """A token with one huge entry (its scale saturates the rest to tiny codes) and an all-zero
    token (absmax 0: the 1e-10 floor of the scale)."""
    p = make_problem(seed=306, dtype=torch.bfloat16, scheme="fp8_channel_token", activation="gelu", **SHAPE)
    p.x[0, 137] = 300.0
    p.x[1] = 0.0
    assert_folded_matches_unfolded(p, config=TOKEN_TILES)


def test_default_config_and_reference():
    """Decode: M = 1 routes to the naive path by itself (R * 4 <= E) and folds by default; the
    folded output also passes the reference gates."""
    p = make_problem(seed=307, dtype=torch.bfloat16, scheme="fp8_tensor_token", activation="silu", bias=True,
                     M=1, K=96, I=64, E=8, topk=2)
    out = assert_folded_matches_unfolded(p, config=None, assignment="auto", fold="auto")
    assert_close_to_reference(p, out)


# ---------------------------------------------------------------------------------------------
# Which path runs: auto folds only where it can; True refuses the rest before any launch.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["none", "fp8_tensor_static", "fp8_tensor_dynamic", "int8_w8a16"])
def test_auto_does_not_fold_other_schemes_and_true_names_the_scheme(scheme):
    p = make_problem(seed=308, dtype=torch.bfloat16, scheme=scheme, activation="gelu", M=2, K=64, I=32, E=8, topk=2)
    _, ex = run_apply(p, assignment="naive", config=TOKEN_TILES)
    assert ex.last_folded_act_quant == (False, False)
    with pytest.raises(ValueError, match=f"fold_act_quant=True but .*quant.scheme {scheme} has"):
        run_apply(p, assignment="naive", config=TOKEN_TILES, fold_act_quant=True)


def test_aligned_path_does_not_fold():
    p = make_problem(seed=309, dtype=torch.bfloat16, scheme="fp8_tensor_token", activation="gelu",
                     M=6, K=64, I=32, E=4, topk=2)
    out_a, ex = run_apply(p, config=TOKEN_TILES)
    assert ex.last_assignment == "aligned" and ex.last_folded_act_quant == (False, False)
    with pytest.raises(ValueError, match="fold_act_quant=True but .*aligned path"):
        run_apply(p, assignment="aligned", config=TOKEN_TILES, fold_act_quant=True)
    # the naive path's folded bits are the aligned path's (SPEC "Invariances", naive vs aligned)
    out_n, ex_n = run_apply(p, assignment="naive", config=TOKEN_TILES)
    assert ex_n.last_folded_act_quant == (True, True)
    assert torch.equal(_bits(out_a), _bits(out_n))


def test_group_fold_needs_block_k_128_per_gemm():
    """fp8_block128 folds a GEMM only with BLOCK_K = 128 (its K tile is the scale group); GEMM2's
    own tiles decide for GEMM2."""
    from kernels.configs import Gemm2Tiles

    p = make_problem(seed=310, dtype=torch.bfloat16, scheme="fp8_block128", activation="gelu", **SHAPE)
    small_k = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_stages=1)
    _, ex = run_apply(p, assignment="naive", config=small_k)
    assert ex.last_folded_act_quant == (False, False)
    with pytest.raises(ValueError, match=r"config.BLOCK_K must be 128 .*got 64"):
        run_apply(p, assignment="naive", config=small_k, fold_act_quant=True)
    mixed = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_stages=1,
                                 gemm2=Gemm2Tiles(BLOCK_N=64, BLOCK_K=64, num_stages=1))
    assert_folded_matches_unfolded(p, config=mixed, expect=(True, False), fold="auto")
    with pytest.raises(ValueError, match=r"config.gemm2.BLOCK_K must be 128"):
        run_apply(p, assignment="naive", config=mixed, fold_act_quant=True)


def test_lora_and_a1q_scale_are_refused_by_true():
    from moe_validate.spec import LoRASpec

    p = make_problem(seed=311, dtype=torch.bfloat16, scheme="fp8_tensor_token", activation="silu",
                     M=2, K=64, I=32, E=8, topk=2)
    E, N, K = p.w1.shape
    I = p.w2.shape[2]
    z = lambda *shape: torch.zeros(*shape, dtype=p.x.dtype, device=p.x.device)  # noqa: E731
    lora = LoRASpec(z(1, E, 2, K), z(1, E, N, 2), z(1, E, 2, I), z(1, E, K, 2),
                    torch.zeros(2, dtype=torch.int32, device=p.x.device), stream="single")
    quant = p.kwargs["quant"]
    R = 4
    ws13 = torch.empty(R, max(N, K), dtype=p.x.dtype, device=p.x.device)
    ws2 = torch.empty(R, I, dtype=p.x.dtype, device=p.x.device)
    out = torch.empty(p.x.shape, dtype=p.x.dtype, device=p.x.device)
    args = (out, *p.args(), "silu", -1, None, None, None, ws13, ws2, None, False)
    ex = kernels.TritonExperts(quant, assignment="naive")
    ex.apply(*args, lora=lora)
    assert ex.last_folded_act_quant == (False, False)
    with pytest.raises(ValueError, match="fold_act_quant=True but .*lora is given"):
        kernels.TritonExperts(quant, assignment="naive", fold_act_quant=True).apply(*args, lora=lora)

    # a given a1q_scale: x arrives quantized, GEMM1 has nothing to fold; GEMM2 still folds
    from kernels.quantize import quantize_activation

    xq, xs = quantize_activation(p.x, "fp8_tensor_token")
    args_q = (out, xq, *p.args()[1:], "silu", -1, None, xs, None, ws13, ws2, None, False)
    ex = kernels.TritonExperts(quant, assignment="naive")
    ex.apply(*args_q)
    assert ex.last_folded_act_quant == (False, True)
    ref = torch.empty_like(out)
    kernels.TritonExperts(quant, assignment="naive", fold_act_quant=False).apply(ref, *args_q[1:])
    assert torch.equal(_bits(out), _bits(ref))
    with pytest.raises(ValueError, match="fold_act_quant=True but .*a1q_scale is given"):
        kernels.TritonExperts(quant, assignment="naive", fold_act_quant=True).apply(*args_q)


def test_fold_act_quant_must_be_auto_or_bool():
    with pytest.raises(ValueError, match="fold_act_quant must be 'auto', True or False; got 'yes'"):
        kernels.TritonExperts(None, fold_act_quant="yes")


def test_launcher_refuses_bad_quantize_a():
    """invoke_grouped_gemm(quantize_a=True) checks its preconditions before the launch."""
    p = make_problem(seed=312, dtype=torch.bfloat16, scheme="fp8_block128", activation="silu_no_mul",
                     M=2, K=64, I=32, E=4, topk=1)
    from kernels.align import route_experts
    from moe_validate.spec import QuantScheme

    quant = p.kwargs["quant"]
    route_expert = route_experts(p.topk_ids, 4, 4, None)
    c = torch.empty(2, 32, dtype=p.x.dtype, device=p.x.device)
    kw = dict(top_k_div=1, num_routes=2, sorted_route_ids=None, expert_ids=None, num_post_padded=None,
              route_expert=route_expert, b_scale=quant.w1_scale, quantize_a=True)
    block = QuantScheme.FP8_BLOCK128
    with pytest.raises(ValueError, match="config.BLOCK_K = 128 .*got 64"):
        invoke_grouped_gemm(p.x, p.w1, c, scheme=block, config=kernels.KernelConfig(16, 32, 64), naive=True, **kw)
    with pytest.raises(ValueError, match="naive path"):
        invoke_grouped_gemm(p.x, p.w1, c, scheme=block, config=GROUP_TILES, naive=False, **kw)
    with pytest.raises(ValueError, match="a_scale must be None"):
        invoke_grouped_gemm(p.x, p.w1, c, scheme=block, config=GROUP_TILES, naive=True,
                            a_scale=torch.ones(2, 1, device=p.x.device), **kw)
    with pytest.raises(ValueError, match="unquantized a"):
        invoke_grouped_gemm(p.x.to(torch.float8_e4m3fn), p.w1, c, scheme=block, config=GROUP_TILES, naive=True, **kw)
    with pytest.raises(ValueError, match="fp8_tensor_static .*tensor_static"):
        invoke_grouped_gemm(p.x, p.w1, c, scheme=QuantScheme.FP8_TENSOR_STATIC, config=GROUP_TILES, naive=True, **kw)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (model shapes are too slow for the interpreter)")
@pytest.mark.parametrize("scheme", TOKEN_SCHEMES + ["fp8_block128"])
def test_gpu_decode_shapes_with_selected_configs(scheme):
    """Native fp8/int8 MMAs on quantized in-register tiles, with the configs the call selects."""
    p = make_problem(seed=313, dtype=torch.bfloat16, scheme=scheme, activation="gelu", bias=True,
                     M=2, K=2048, I=768, E=64, topk=4)
    assert_folded_matches_unfolded(p, config=None, assignment="auto", fold="auto")
