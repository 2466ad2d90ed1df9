"""silu + fp8 group quantization fused into GEMM1's epilogue (fp8_block128) gives the unfused bits.

For silu + fp8_block128 without clamp or LoRA, GEMM1 with a config of ``(BLOCK_N // 2) % 128 == 0``
(a program owns whole 128-column scale groups of c2) forms silu(gate) * up from c1 as stored and
quantizes it per (row, 128 columns) itself; with any other BLOCK_N, or ``fuse_activation=False``,
GEMM1 stores c1 and ``silu_and_mul_quant_fp8_group`` (the separate kernel) quantizes it. GEMM2
reads the codes and scales either way, so they must agree bit for bit on every valid route's row
(rows of invalid routes are unspecified on both paths: GEMM2 never reads them), and so must the
output. The spy below records what GEMM2 receives and what the separate kernel produced.
"""

import pytest
import torch

import kernels
from kernel_test_support import (ON_GPU, assert_close_to_reference, assert_same_bits, make_problem, raw_bits,
                                 requires_triton_device, run_apply)
from kernels import experts as experts_module
from kernels.grouped_gemm import invoke_grouped_gemm
from kernels.quantize import fp8_group_outputs

pytestmark = requires_triton_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# BLOCK_N = 256 weight rows: 128 (gate, up) pairs, one scale group of c2 per program; 512: two.
BN256 = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2)
BN512 = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=512, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
BN128 = kernels.KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2)



class _Spy:
    """Wraps the launches of ``kernels.experts``: GEMM2's A operand and scales, GEMM1's c_scale,
    and the separate quantizer's outputs (cloned: buffers are reused by later stages)."""

    def __init__(self, monkeypatch, w2):
        self.gemm2, self.gemm1_fused_quant, self.separate = None, False, None
        real_gemm, real_quant = experts_module.invoke_grouped_gemm, experts_module.silu_and_mul_quant_fp8_group

        def gemm(a, b, c, **kw):
            if b.data_ptr() == w2.data_ptr():
                self.gemm2 = (a.clone(), kw["a_scale"].clone(), kw["route_expert"].clone())
            elif kw.get("c_scale") is not None:
                self.gemm1_fused_quant = True
            return real_gemm(a, b, c, **kw)

        def quant(c1, row_valid=None, **kw):
            q, s = real_quant(c1, row_valid=row_valid, **kw)
            self.separate = (q.clone(), s.clone())
            return q, s

        monkeypatch.setattr(experts_module, "invoke_grouped_gemm", gemm)
        monkeypatch.setattr(experts_module, "silu_and_mul_quant_fp8_group", quant)


def _run(p, monkeypatch, **kw):
    with monkeypatch.context() as m:
        spy = _Spy(m, p.w2)
        out, ex = run_apply(p, **kw)
    return out, ex, spy


def assert_fused_quant_matches_unfused(p, monkeypatch, *, config=BN256, assignment="auto"):
    """Fused (GEMM1 epilogue) vs unfused (c1 + the separate kernel), same config: the codes and
    scales GEMM2 reads agree on every valid route's row, and the outputs bit for bit."""
    out_f, ex_f, spy_f = _run(p, monkeypatch, fuse_activation=True, config=config, assignment=assignment)
    out_u, ex_u, spy_u = _run(p, monkeypatch, fuse_activation=False, config=config, assignment=assignment)
    assert ex_f.last_fused_activation is True and ex_u.last_fused_activation is False
    assert spy_f.gemm1_fused_quant and spy_f.separate is None, "the fused path must not run the separate kernel"
    assert not spy_u.gemm1_fused_quant and spy_u.separate is not None
    assert ex_f.last_assignment == ex_u.last_assignment
    (q_f, s_f, route_expert), (q_u, s_u, _) = spy_f.gemm2, spy_u.gemm2
    # the unfused path hands GEMM2 exactly the separate kernel's codes and scales
    assert torch.equal(q_u.view(torch.uint8), spy_u.separate[0].view(torch.uint8))
    assert torch.equal(s_u.view(torch.int32), spy_u.separate[1].view(torch.int32))
    valid = route_expert >= 0
    assert valid.any()
    I = p.w2.shape[2]
    assert q_f.dtype == torch.float8_e4m3fn and tuple(q_f.shape) == (valid.numel(), I)
    assert tuple(s_f.shape) == tuple(s_u.shape) == (valid.numel(), -(-I // 128))
    assert_same_bits(q_f[valid], q_u[valid], "fp8 codes of valid rows", "fused", "unfused")
    assert_same_bits(s_f[valid], s_u[valid], "scales of valid (row, group)s", "fused", "unfused")
    assert torch.equal(raw_bits(out_f), raw_bits(out_u)), "codes and scales agree but the outputs differ"
    return out_f


def _problem(seed, **kw):
    shape = dict(M=7, K=128, I=128, E=4, topk=2, dtype=torch.bfloat16)
    shape.update(kw)
    return make_problem(seed=seed, scheme="fp8_block128", activation="silu", **shape)


# ---------------------------------------------------------------------------------------------
# Bitwise agreement: storage dtypes, one or two groups per program, several column tiles, ragged
# I, bias, expert maps (invalid routes), naive and aligned assignment, router weight on the input.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_storage_dtypes(dtype, monkeypatch):
    p = _problem(301, dtype=DTYPES[dtype], bias=True)
    assert_fused_quant_matches_unfused(p, monkeypatch)


@pytest.mark.parametrize("I,K,config", [
    (256, 256, BN256),  # two column tiles, several K tiles and K scale blocks
    (96, 128, BN256),  # ragged: one partial group (columns past I hold zeros on both paths)
    (256, 128, BN512),  # two groups per program
    (200, 128, BN512),  # two groups per program, the second partial
], ids=["I256-BN256", "I96-BN256", "I256-BN512", "I200-BN512"])
def test_groups_and_tiles(I, K, config, monkeypatch):
    p = _problem(302, I=I, K=K, M=5, bias=True)
    assert_fused_quant_matches_unfused(p, monkeypatch, config=config)


@pytest.mark.parametrize("assignment", ["naive", "aligned"])
def test_expert_map_invalid_routes(assignment, monkeypatch):
    p = _problem(303, M=9, E=4, expert_map=True)
    assert (p.kwargs["expert_map"][p.topk_ids.long()] < 0).any(), "recipe must contain non-local routes"
    assert_fused_quant_matches_unfused(p, monkeypatch, assignment=assignment)


@pytest.mark.parametrize("router_on_input", [False, True], ids=["router_in_gemm2", "router_on_input"])
def test_router_weights(router_on_input, monkeypatch):
    p = _problem(304, M=11, topk=1 if router_on_input else 2, router_on_input=router_on_input)
    out = assert_fused_quant_matches_unfused(p, monkeypatch)
    assert_close_to_reference(p, out)


def test_separate_kernel_and_epilogue_directly():
    """invoke_grouped_gemm alone: c1 stored then the separate kernel, against c_scale's epilogue,
    on the tiny-M naive path with a padding route (expert -1: its row is never written)."""
    from kernels.quantize import quantize_activation, silu_and_mul_quant_fp8_group

    p = _problem(305, M=3, E=6, topk=2, I=128, K=128)
    quant = p.kwargs["quant"]
    R = p.topk_ids.numel()
    route_expert = p.topk_ids.reshape(-1).to(torch.int32).clone()
    route_expert[1] = -1
    a1, a1_scale = quantize_activation(p.x, "fp8_block128")
    kw = dict(scheme=quant.scheme, config=BN256, top_k_div=2, num_routes=R, sorted_route_ids=None, expert_ids=None,
              num_post_padded=None, route_expert=route_expert, naive=True, a_scale=a1_scale, b_scale=quant.w1_scale)
    c1 = torch.full((R, 256), float("nan"), dtype=p.x.dtype, device=p.x.device)
    invoke_grouped_gemm(a1, p.w1, c1, **kw)
    valid = route_expert >= 0
    q_u, s_u = silu_and_mul_quant_fp8_group(c1, row_valid=valid)
    q_f, s_f = fp8_group_outputs(R, 128, p.x.device)
    invoke_grouped_gemm(a1, p.w1, q_f, activation="silu", c_scale=s_f, c1_dtype=p.x.dtype, **kw)
    assert torch.equal(q_f[valid].view(torch.uint8), q_u[valid].view(torch.uint8))
    assert torch.equal(s_f[valid].view(torch.int32), s_u[valid].view(torch.int32))
    with pytest.raises(ValueError, match=r"\(config.BLOCK_N // 2\) % 128 == 0.*got BLOCK_N=128"):
        invoke_grouped_gemm(a1, p.w1, q_f, activation="silu", c_scale=s_f, c1_dtype=p.x.dtype,
                            **{**kw, "config": BN128})
    with pytest.raises(ValueError, match="silu without gemm1_clamp_limit"):
        invoke_grouped_gemm(a1, p.w1, q_f, activation="gelu", c_scale=s_f, c1_dtype=p.x.dtype, **kw)
    with pytest.raises(ValueError, match="c_scale must be float32"):
        invoke_grouped_gemm(a1, p.w1, q_f, activation="silu", c_scale=s_f[:, :0], c1_dtype=p.x.dtype, **kw)
    with pytest.raises(ValueError, match="float8_e4m3fn codes and needs c1_dtype"):
        invoke_grouped_gemm(a1, p.w1, q_f, activation="silu", c_scale=s_f, **kw)


# ---------------------------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------------------------
def test_path_choice(monkeypatch):
    """auto fuses at BLOCK_N = 256 and not at 128 (the interpreter default is 64); True refuses a
    config that cannot fuse, naming the rule; False never fuses."""
    p = _problem(306, M=4, K=128, I=128, E=2)
    _, ex, spy = _run(p, monkeypatch, config=BN256)
    assert ex.last_fused_activation is True and spy.gemm1_fused_quant
    _, ex, spy = _run(p, monkeypatch, config=BN128)
    assert ex.last_fused_activation is False and spy.separate is not None
    _, ex, _ = _run(p, monkeypatch)
    assert ex.last_fused_activation is (ex.last_config.BLOCK_N // 2 % 128 == 0)
    _, ex, spy = _run(p, monkeypatch, config=BN256, fuse_activation=False)
    assert ex.last_fused_activation is False and spy.separate is not None and not spy.gemm1_fused_quant
    with pytest.raises(ValueError, match=r"fuse_activation=True.*silu\+fp8-group quantizer.*"
                                         r"\(config.BLOCK_N // 2\) % 128 == 0.*got BLOCK_N=128"):
        run_apply(p, config=BN128, fuse_activation=True)


def test_clamp_takes_the_plain_fused_activation(monkeypatch):
    """A clamp keeps silu off the fp8 group quantizer: at BLOCK_N = 256 GEMM1 fuses the plain
    (clamped) activation and the per-group quantizer runs on c2 as usual."""
    p = make_problem(seed=307, dtype=torch.bfloat16, scheme="fp8_block128", activation="silu", clamp=1.0,
                     M=5, K=128, I=128, E=4, topk=2)
    out_f, ex_f, spy_f = _run(p, monkeypatch, fuse_activation=True, config=BN256)
    out_u, ex_u, _ = _run(p, monkeypatch, fuse_activation=False, config=BN256)
    assert ex_f.last_fused_activation is True and not spy_f.gemm1_fused_quant and spy_f.separate is None
    assert torch.equal(raw_bits(out_f), raw_bits(out_u))


# ---------------------------------------------------------------------------------------------
# GPU: native fp8 MMAs and the epilogue's layouts at realistic shapes.
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (realistic shapes are too slow for the interpreter)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,config", [
    (1, kernels.KernelConfig(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)),
    (33, kernels.KernelConfig(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
    (512, kernels.KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)),
    (512, kernels.KernelConfig(BLOCK_M=64, BLOCK_N=512, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)),
], ids=["M1-BM16", "M33-BM64", "M512-BM128", "M512-BN512"])
def test_gpu_fused_quant_matches_unfused(M, config, monkeypatch):
    p = _problem(308, M=M, K=1024, I=640, E=16, topk=4, bias=True, expert_map=True)
    assert_fused_quant_matches_unfused(p, monkeypatch, config=config)
