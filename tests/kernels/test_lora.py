"""LoRA on the experts: kernels.lora.apply_lora_w13 / apply_lora_w2 (SPEC.md, LoRA).

Recipe: explicit seed; hand-made route-major buffers and a base_gemm closure that writes them;
an fp64 oracle written here with plain loops, with the fp32 error bound derived below; bitwise
checks for every invariance SPEC.md states exactly (single == dual, disabled == no LoRA, rows
without an adapter untouched, NaN rows of invalid routes never read).

Error bound of the fused kernel against the fp64 oracle (per element, u = 2^-24, the fp32 unit
roundoff; p = the significand bits of S: 24 fp32, 11 fp16, 8 bf16):
- shrink t_j = sum_k x_k a_jk in fp32: |t32_j - t_j| <= gamma_K * T_j, T_j = sum_k |x_k a_jk|
  (products of S values are exact in fp32 for fp16/bf16 and rounded once for fp32, which
  gamma_K already covers: Higham, Accuracy and Stability, 3.1);
- expand d = sum_j b_j t32_j over the rank r, then * w: |d32 - d| <= gamma_{K+r+1} * |w| * D,
  D = sum_j |b_j| T_j (gamma_a + gamma_b + gamma_a gamma_b <= gamma_{a+b}); call this E;
- two roundings to S, each moving a value y by at most 2^-p |y| (half an ulp) plus half the
  smallest subnormal spacing of S. The oracle rounds the exact d and the exact sum the same two
  times, so the kernel and the oracle differ by at most
  G = E + 2^-p (2|d| + E) + eta  after round_S(d), and
  G + 2^-p (2|c + round_S(d)| + G) + eta  after round_S(c + round_S(d)).
  (c + round_S(d) is formed in fp32 and then rounded to S: for fp16/bf16 that double rounding is
  innocuous because 24 >= 2p + 2; for fp32 it is the one rounding.)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import pytest
import torch
import triton
import triton.language as tl

from moe_validate.contract.rules import interpreting
from moe_validate.contract.spec import Activation, LoRASpec
from kernels.lora import (
    LoRAKernelConfig,
    _round_to_storage,
    _to_fp32,
    apply_lora_w13,
    apply_lora_w2,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIGNIFICAND_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
FP32_UNIT_ROUNDOFF = 2.0 ** -24
INTERPRETING = interpreting()
# Kernels run natively where a GPU is usable, else through the interpreter on CPU tensors;
# oracles and comparisons always run on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not INTERPRETING,
    reason="Triton kernels need TRITON_INTERPRET=1 on CPU, or a CUDA GPU")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING,
    reason="needs a CUDA GPU without TRITON_INTERPRET: dual-stream scheduling on real streams")


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def _make_lora(gen, *, L, E, K, N, I, ranks_w13: Sequence[int], rank_w2: int, token_ids,
               dtype, enabled=None, stream="single", device="cpu") -> LoRASpec:
    """Adapters scaled so that every delta is O(1), like the base outputs it is added to."""
    n_slice = N // len(ranks_w13)
    pairs = [(_randn(gen, L, E, r, K, scale=K ** -0.5, dtype=dtype, device=device),
              _randn(gen, L, E, n_slice, r, scale=r ** -0.5, dtype=dtype, device=device))
             for r in ranks_w13]
    w13_a = pairs[0][0] if len(pairs) == 1 else tuple(p[0] for p in pairs)
    w13_b = pairs[0][1] if len(pairs) == 1 else tuple(p[1] for p in pairs)
    return LoRASpec(
        w13_a=w13_a, w13_b=w13_b,
        w2_a=_randn(gen, L, E, rank_w2, I, scale=I ** -0.5, dtype=dtype, device=device),
        w2_b=_randn(gen, L, E, K, rank_w2, scale=rank_w2 ** -0.5, dtype=dtype, device=device),
        token_lora_ids=torch.as_tensor(token_ids, dtype=torch.int32, device=device),
        enabled=None if enabled is None else torch.as_tensor(enabled, dtype=torch.bool, device=device),
        stream=stream)


def _with(lora: LoRASpec, **changes) -> LoRASpec:
    fields = dict(lora.__dict__)
    fields.update(changes)
    return LoRASpec(**fields)


class _BaseGemm:
    """Stands in for the grouped GEMM: writes ``value`` into ``out``, counting its calls."""

    def __init__(self, out: torch.Tensor, value: torch.Tensor):
        self.out, self.value, self.calls = out, value, 0

    def __call__(self) -> None:
        self.calls += 1
        self.out.copy_(self.value)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN payloads and the sign of zero compare exactly."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    differ = _bits(actual) != _bits(expected)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ "
                              f"bitwise, first at {differ.nonzero()[0].tolist()}")


def _nan_rows(rows: int, cols: int, dtype) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The fp64 oracle
# ---------------------------------------------------------------------------------------------
def _active_adapter(route: int, route_expert, lora: LoRASpec, topk: int) -> Optional[int]:
    if int(route_expert[route]) < 0:
        return None
    adapter = int(lora.token_lora_ids[route // topk])
    if adapter < 0 or not bool(lora.enabled_mask()[adapter]):
        return None
    return adapter


def _round_twice_bound(delta, magnitude, total, error, dtype) -> torch.Tensor:
    """The kernel-vs-oracle bound of the module docstring, elementwise (float64)."""
    half_ulp = 2.0 ** -SIGNIFICAND_BITS[dtype]
    finfo = torch.finfo(dtype)
    eta = finfo.smallest_normal * 2.0 ** (1 - SIGNIFICAND_BITS[dtype])  # subnormal spacing
    after_delta = error + half_ulp * (2 * delta.abs() + error) + eta
    return after_delta + half_ulp * (2 * total.abs() + after_delta) + eta


def _oracle(base: torch.Tensor, inp: torch.Tensor, route_expert, lora: LoRASpec, topk: int,
            pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], columns: Sequence[slice],
            route_weight: Optional[torch.Tensor], input_row_is_token: bool):
    """(expected in S, allowed |kernel - expected| in fp64, mask of rows with an adapter)."""
    dtype = base.dtype
    expected = base.clone()
    allowed = torch.zeros(base.shape, dtype=torch.float64)
    touched = torch.zeros(base.shape[0], dtype=torch.bool)
    for route in range(base.shape[0]):
        adapter = _active_adapter(route, route_expert, lora, topk)
        if adapter is None:
            continue
        touched[route] = True
        expert = int(route_expert[route])
        row = inp[route // topk if input_row_is_token else route].double()
        weight = 1.0 if route_weight is None else float(route_weight[route])
        for (a, b), cols in zip(pairs, columns):
            a64, b64 = a[adapter, expert].double(), b[adapter, expert].double()
            delta = (b64 @ (a64 @ row)) * weight
            magnitude = (b64.abs() @ (a64.abs() @ row.abs())) * abs(weight)
            gamma = (a64.shape[1] + a64.shape[0] + 1) * FP32_UNIT_ROUNDOFF
            error = gamma / (1 - gamma) * magnitude
            total = base[route, cols].double() + delta.to(dtype).double()
            expected[route, cols] = total.to(dtype)
            allowed[route, cols] = _round_twice_bound(delta, magnitude, total, error, dtype)
    return expected, allowed, touched


def _w13_layout(activation: Activation, num_slices: int, N: int) -> List[slice]:
    if num_slices == 1:
        return [slice(0, N)]
    if activation.is_interleaved:
        return [slice(0, N, 2), slice(1, N, 2)]
    return [slice(0, N // 2), slice(N // 2, N)]


def _assert_within(actual, expected, allowed, what: str) -> None:
    diff = (actual.double() - expected.double()).abs()
    nan_mismatch = actual.isnan() != expected.isnan()
    over = (diff > allowed) & ~expected.isnan()
    assert not nan_mismatch.any(), f"{what}: NaN where the oracle has none, or the reverse"
    if over.any():
        i = over.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(over.sum())} of {over.numel()} elements exceed the bound; "
                             f"first at {i}: got {actual[tuple(i)].item()}, expected "
                             f"{expected[tuple(i)].item()}, allowed {allowed[tuple(i)].item():.3g}")


# ---------------------------------------------------------------------------------------------
# Scenario: a small batch with per-token adapters, a disabled adapter and invalid routes.
# ---------------------------------------------------------------------------------------------
M, TOPK, K, I, E, L = 5, 2, 24, 20, 3, 3
# token 0: adapter 1; token 1: adapter 2 (disabled); token 2: none; tokens 3, 4: adapter 0.
TOKEN_IDS = [1, 2, -1, 0, 0]
ENABLED = [True, True, False]
# Routes r = m*2 + j; -1 marks invalid routes, whose rows hold NaN.
ROUTE_EXPERT = [0, 2, 1, -1, 2, 0, 1, 1, -1, 0]


def _w13_case(dtype, activation: Activation, ranks: Sequence[int], stream: str, seed: int,
              token_ids=TOKEN_IDS, enabled=ENABLED):
    gen = _gen(seed)
    N = 2 * I if activation.is_gated else I
    lora = _make_lora(gen, L=L, E=E, K=K, N=N, I=I, ranks_w13=ranks, rank_w2=4, token_ids=token_ids,
                      dtype=dtype, enabled=enabled, stream=stream)
    x = _randn(gen, M, K, dtype=dtype)
    route_expert = torch.tensor(ROUTE_EXPERT, dtype=torch.int32)
    base = _randn(gen, M * TOPK, N, dtype=dtype)
    base[route_expert < 0] = float("nan")
    return lora, x, route_expert, base


def _on_device(value):
    """``value`` (a tensor, a tuple of them, a LoRASpec or anything else) on DEVICE."""
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE)
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    if isinstance(value, LoRASpec):
        return LoRASpec(**{k: _on_device(v) for k, v in value.__dict__.items()})
    return value


def _run_w13(lora, x, route_expert, base, activation, *, topk=TOPK,
             **kwargs) -> Tuple[torch.Tensor, _BaseGemm]:
    """apply_lora_w13 on DEVICE with a NaN-poisoned c1 that base_gemm overwrites; c1 on CPU."""
    c1 = _nan_rows(*base.shape, base.dtype).to(DEVICE)
    gemm = _BaseGemm(c1, base.to(DEVICE))
    apply_lora_w13(c1, _on_device(x), _on_device(route_expert), _on_device(lora), activation,
                   topk=topk, base_gemm=gemm, **kwargs)
    return c1.cpu(), gemm


def _run_w2(lora, c2, route_expert, route_weight, base, *, topk=TOPK) -> Tuple[torch.Tensor, _BaseGemm]:
    c3 = _nan_rows(*base.shape, base.dtype).to(DEVICE)
    gemm = _BaseGemm(c3, base.to(DEVICE))
    apply_lora_w2(c3, _on_device(c2), _on_device(route_expert), _on_device(route_weight),
                  _on_device(lora), topk=topk, base_gemm=gemm)
    return c3.cpu(), gemm


W13_LAYOUTS = [
    pytest.param(Activation.SILU_NO_MUL, (5,), id="one_slice-silu_no_mul-r5"),
    pytest.param(Activation.SILU, (3,), id="one_slice-silu-r3"),
    pytest.param(Activation.SILU, (3, 5), id="two_slices_halves-silu-r3r5"),
    pytest.param(Activation.SWIGLUOAI, (5, 3), id="two_slices_interleaved-swigluoai-r5r3"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("activation, ranks", W13_LAYOUTS)
def test_w13_matches_fp64_oracle_and_dual_is_bitwise_single(dtype, activation, ranks):
    lora, x, route_expert, base = _w13_case(dtype, activation, ranks, "single", seed=11)
    single, gemm = _run_w13(lora, x, route_expert, base, activation)
    assert gemm.calls == 1

    pairs = lora.w13_slices
    expected, allowed, touched = _oracle(base, x, route_expert, lora, TOPK, pairs,
                                         _w13_layout(activation, len(pairs), base.shape[1]), None, True)
    assert touched.sum() == 5, "the scenario should give five routes an active adapter"
    _assert_within(single[touched], expected[touched], allowed[touched], "w13 single vs fp64")
    # Rows without an active adapter, NaN rows of invalid routes included, keep their bits.
    _assert_bitwise(single[~touched], base[~touched], "w13 rows without an adapter")

    dual, gemm = _run_w13(_with(lora, stream="dual"), x, route_expert, base, activation)
    assert gemm.calls == 1
    _assert_bitwise(dual, single, "w13 dual vs single")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("with_route_weight", [True, False], ids=["route_weight", "weight_on_input"])
def test_w2_matches_fp64_oracle_and_dual_is_bitwise_single(dtype, with_route_weight):
    gen = _gen(23)
    lora = _make_lora(gen, L=L, E=E, K=K, N=2 * I, I=I, ranks_w13=(3,), rank_w2=5, token_ids=TOKEN_IDS,
                      dtype=dtype, enabled=ENABLED)
    route_expert = torch.tensor(ROUTE_EXPERT, dtype=torch.int32)
    c2 = _randn(gen, M * TOPK, I, dtype=dtype)
    c2[route_expert < 0] = float("nan")
    base = _randn(gen, M * TOPK, K, dtype=dtype)
    base[route_expert < 0] = float("nan")
    # Router weights far from 1 so that a dropped or doubled weight cannot hide in the bound.
    route_weight = torch.rand(M * TOPK, generator=gen) * 0.5 + 0.1 if with_route_weight else None

    results = {}
    for stream in ("single", "dual"):
        results[stream], gemm = _run_w2(_with(lora, stream=stream), c2, route_expert, route_weight, base)
        assert gemm.calls == 1

    expected, allowed, touched = _oracle(base, c2, route_expert, lora, TOPK, [(lora.w2_a, lora.w2_b)],
                                         [slice(0, K)], route_weight, False)
    _assert_within(results["single"][touched], expected[touched], allowed[touched], "w2 single vs fp64")
    _assert_bitwise(results["single"][~touched], base[~touched], "w2 rows without an adapter")
    _assert_bitwise(results["dual"], results["single"], "w2 dual vs single")


@pytest.mark.parametrize("stream", ["single", "dual"])
@pytest.mark.parametrize("absent", ["all_disabled", "all_ids_-1"])
def test_absent_adapters_are_bitwise_no_lora(stream, absent):
    dtype = torch.bfloat16
    token_ids = [-1] * M if absent == "all_ids_-1" else TOKEN_IDS
    enabled = [False] * L if absent == "all_disabled" else ENABLED
    lora, x, route_expert, base = _w13_case(dtype, Activation.SILU, (3, 5), stream, seed=5,
                                            token_ids=token_ids, enabled=enabled)
    # -0.0 in the base output: an add of the buffer's zeros would turn it into +0.0.
    base[0, :4] = -0.0
    with_lora, gemm = _run_w13(lora, x, route_expert, base, Activation.SILU)
    assert gemm.calls == 1
    without, _ = _run_w13(None, x, route_expert, base, Activation.SILU)
    _assert_bitwise(with_lora, without, f"w13 {absent} vs no LoRA")

    c2 = _randn(_gen(6), M * TOPK, I, dtype=dtype)
    outs = [_run_w2(spec, c2, route_expert, torch.ones(M * TOPK), base[:, :K])[0] for spec in (lora, None)]
    _assert_bitwise(outs[0], outs[1], f"w2 {absent} vs no LoRA")


@pytest.mark.parametrize("stream", ["single", "dual"])
def test_sparse_routing_with_a_distinctive_token_0(stream):
    """Few tokens per expert among many invalid routes; token 0 is huge and alone on adapter 0.

    A kernel that let an invalid route (or a padding lane) fall back to token 0, row 0 or
    adapter 0 would write token 0's 1e3-sized delta into a row that must stay NaN or untouched.
    """
    dtype, topk, M_, E_, N = torch.float16, 4, 6, 8, 16
    gen = _gen(3)
    token_ids = [0, -1, 1, -1, 1, -1]
    lora = _make_lora(gen, L=2, E=E_, K=K, N=N, I=I, ranks_w13=(3,), rank_w2=3, token_ids=token_ids,
                      dtype=dtype, stream=stream)
    x = _randn(gen, M_, K, dtype=dtype)
    x[0] = 1e3  # distinctive: its delta is ~1e3 against O(1) elsewhere
    route_expert = torch.full((M_ * topk,), -1, dtype=torch.int32)
    route_expert[0], route_expert[3] = 5, 7      # token 0: two valid routes
    route_expert[9], route_expert[16] = 5, 2     # tokens 2 and 4: one each; the rest invalid
    route_expert[6] = 1                          # token 1: valid route, no adapter
    base = _randn(gen, M_ * topk, N, dtype=dtype)
    base[route_expert < 0] = float("nan")

    c1, gemm = _run_w13(lora, x, route_expert, base, "silu_no_mul", topk=topk)
    assert gemm.calls == 1
    expected, allowed, touched = _oracle(base, x, route_expert, lora, topk, lora.w13_slices,
                                         [slice(0, N)], None, True)
    assert touched.tolist().count(True) == 4
    _assert_within(c1[touched], expected[touched], allowed[touched], "sparse w13 vs fp64")
    _assert_bitwise(c1[~touched], base[~touched], "sparse rows without an adapter")
    assert (c1[0] - base[0]).abs().max() > 100, "token 0's own rows must carry its large delta"


def test_base_gemm_runs_once_in_every_schedule_and_edge_case():
    lora, x, route_expert, base = _w13_case(torch.float32, Activation.SILU, (3,), "single", seed=2)
    for spec in (None, lora, _with(lora, stream="dual")):
        _, gemm = _run_w13(spec, x, route_expert, base, Activation.SILU)
        assert gemm.calls == 1, f"base_gemm ran {gemm.calls} times with lora={spec and spec.stream}"
    # No tokens at all: nothing to add, the base GEMM still runs once.
    empty = _with(lora, token_lora_ids=torch.empty(0, dtype=torch.int32))
    _, gemm = _run_w13(empty, x[:0], route_expert[:0], base[:0], Activation.SILU)
    assert gemm.calls == 1


def test_alternating_batches_with_and_without_adapters():
    """No state survives a call: each batch equals the same batch run alone."""
    dtype = torch.bfloat16
    with_adapters = _w13_case(dtype, Activation.SILU, (3, 5), "dual", seed=8)
    without = _w13_case(dtype, Activation.SILU, (3, 5), "dual", seed=8, token_ids=[-1] * M)
    alone = [_run_w13(*with_adapters, Activation.SILU)[0], _run_w13(*without, Activation.SILU)[0]]
    for round_ in range(2):
        for case, reference in zip((with_adapters, without), alone):
            _assert_bitwise(_run_w13(*case, Activation.SILU)[0], reference, f"round {round_}")
    lora, x, route_expert, base = without
    _assert_bitwise(alone[1], base, "a batch without adapters keeps the base output")


def test_tile_config_changes_no_bits_and_a_k_loop_stays_within_the_bound():
    dtype, activation = torch.float32, Activation.SWIGLUOAI
    lora, x, route_expert, base = _w13_case(dtype, activation, (5, 3), "single", seed=4)
    # One BLOCK_K fixes the shrink's summation order; BLOCK_N and n_groups only move work
    # between programs, so they must not change any element's arithmetic.
    block_k = triton.next_power_of_2(K)
    whole = LoRAKernelConfig(block_n=triton.next_power_of_2(base.shape[1]), block_k=block_k)
    default, _ = _run_w13(lora, x, route_expert, base, activation, config=whole)
    for block_n, n_groups in ((4, 1), (8, 2), (16, 3)):
        for stream in ("single", "dual"):
            tiled, _ = _run_w13(_with(lora, stream=stream), x, route_expert, base, activation,
                                config=LoRAKernelConfig(block_n=block_n, block_k=block_k, n_groups=n_groups))
            _assert_bitwise(tiled, default, f"BLOCK_N={block_n} n_groups={n_groups} {stream}")
    # BLOCK_K = 16 < K = 24: a two-step K loop with a masked tail, still within the fp32 bound.
    looped, _ = _run_w13(lora, x, route_expert, base, activation,
                         config=LoRAKernelConfig(block_n=8, block_k=16, n_groups=1))
    expected, allowed, touched = _oracle(base, x, route_expert, lora, TOPK, lora.w13_slices,
                                         _w13_layout(activation, 2, base.shape[1]), None, True)
    _assert_within(looped[touched], expected[touched], allowed[touched], "BLOCK_K=16 vs fp64")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _bad_call(change: str):
    lora, x, route_expert, base = _w13_case(torch.float16, Activation.SILU, (3, 5), "single", seed=1)
    c1 = base.clone()
    args = dict(c1=c1, x=x, route_expert=route_expert, lora=lora, activation=Activation.SILU,
                topk=TOPK, base_gemm=lambda: None)
    a0, a1 = lora.w13_a
    b0, b1 = lora.w13_b
    if change == "x_K":
        args["x"] = x[:, :-1]
    elif change == "x_dtype":
        args["x"] = x.float()
    elif change == "c1_rows":
        args["c1"] = c1[:-1]
    elif change == "route_expert_len":
        args["route_expert"] = route_expert[:-1]
    elif change == "route_expert_dtype":
        args["route_expert"] = route_expert.float()
    elif change == "slice_b_rows":
        args["lora"] = _with(lora, w13_b=(b0, b1[:, :, :-1]))
    elif change == "slice_rank_mismatch":
        args["lora"] = _with(lora, w13_b=(b0, b1[..., :-1]))
    elif change == "one_slice_N":
        args["lora"] = _with(lora, w13_a=a0, w13_b=b0)  # b0 covers N/2, c1 has N columns
    elif change == "two_slices_no_mul":
        args["activation"] = "silu_no_mul"
    elif change == "enabled_len":
        args["lora"] = _with(lora, enabled=torch.ones(L + 1, dtype=torch.bool))
    elif change == "topk":
        args["topk"] = 0
    elif change == "base_gemm":
        args["base_gemm"] = None
    elif change == "activation":
        args["activation"] = "swish"
    return args


BAD_W13 = [
    ("x_K", ValueError, r"lora.w13_a\[0\] must be \[L, E, r, K\]"),
    ("x_dtype", ValueError, "x and c1 must share the storage dtype"),
    ("c1_rows", ValueError, r"c1 must be \[M\*topk, columns\]"),
    ("route_expert_len", ValueError, r"route_expert must be \[M\*topk\]"),
    ("route_expert_dtype", ValueError, "route_expert must have dtype in"),
    ("slice_b_rows", ValueError, r"lora.w13_b\[1\] must be \[L, E, N, r\]"),
    ("slice_rank_mismatch", ValueError, r"lora.w13_b\[1\] must be \[L, E, N, r\]"),
    ("one_slice_N", ValueError, r"lora.w13_b must be \[L, E, N, r\]"),
    ("two_slices_no_mul", ValueError, "two w13 LoRA slices .* need a gated activation"),
    ("enabled_len", ValueError, r"lora.enabled must be \[L\]"),
    ("topk", ValueError, "topk must be a positive int"),
    ("base_gemm", TypeError, "base_gemm must be a zero-argument callable"),
    ("activation", ValueError, "activation must be one of"),
]


@pytest.mark.parametrize("change, error, message", BAD_W13, ids=[c[0] for c in BAD_W13])
def test_w13_bad_arguments_raise_before_launch(change, error, message):
    args = _bad_call(change)
    c1 = args["c1"]
    before = c1.clone()
    with pytest.raises(error, match=message):
        apply_lora_w13(args.pop("c1"), args.pop("x"), args.pop("route_expert"), args.pop("lora"),
                       args.pop("activation"), **args)
    _assert_bitwise(c1, before, "c1 after a rejected call")


def test_w2_bad_arguments_raise_before_launch():
    gen = _gen(9)
    lora = _make_lora(gen, L=L, E=E, K=K, N=I, I=I, ranks_w13=(3,), rank_w2=3, token_ids=TOKEN_IDS,
                      dtype=torch.float32)
    route_expert = torch.tensor(ROUTE_EXPERT, dtype=torch.int32)
    c2, c3 = torch.zeros(M * TOPK, I), torch.zeros(M * TOPK, K)
    weight = torch.ones(M * TOPK)

    def call(**changes):
        args = dict(c3=c3, c2=c2, route_expert=route_expert, route_weight=weight, lora=lora)
        args.update(changes)
        apply_lora_w2(*args.values(), topk=TOPK, base_gemm=lambda: None)

    with pytest.raises(ValueError, match=r"lora.w2_a must be \[L, E, r, K\]"):
        call(c2=torch.zeros(M * TOPK, I + 1))
    with pytest.raises(ValueError, match=r"lora.w2_b must be \[L, E, N, r\]"):
        call(c3=torch.zeros(M * TOPK, K + 1))
    with pytest.raises(ValueError, match="route_weight must have dtype in"):
        call(route_weight=weight.half())
    with pytest.raises(ValueError, match=r"route_weight must be \[M\*topk\]"):
        call(route_weight=weight[:-1])
    with pytest.raises(ValueError, match=r"c2 must be \[M\*topk, I\]"):
        call(c2=c2[:-1])
    with pytest.raises(TypeError, match="lora must be a moe_validate.contract.spec.LoRASpec"):
        call(lora={"w2_a": lora.w2_a})


# ---------------------------------------------------------------------------------------------
# The rounding helper (pins the interpreter fact it works around)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _round_trip_kernel(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
    """y = round_S(x) (fp32 -> S), z = fp32(y) (S -> fp32, read back from memory)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, _round_to_storage(x, y_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    tl.store(z_ptr + offs, _to_fp32(tl.load(y_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 of 3e38 is inf, on purpose
def test_storage_conversions_match_torch(dtype):
    """The interpreter's own bf16 casts truncate and mangle subnormals; ours must not."""
    gen = _gen(0)
    grid = torch.randn(512, generator=gen).to(dtype).float()
    ulp = (torch.nextafter(grid.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() - grid).abs()
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                             3.3895e38, -3.3895e38, 65519.0, 65520.0, 1e-40, -1e-40, 6e-8])
    x = torch.cat([grid + ulp / 2,            # exact ties: even mantissa wins
                   grid + ulp * 0.4999, grid + ulp * 0.5001,
                   torch.randn(512, generator=gen) * 100, specials])
    y, z = torch.empty(x.shape, dtype=dtype, device=DEVICE), torch.empty(x.shape, device=DEVICE)
    _round_trip_kernel[(1,)](x.to(DEVICE), y, z, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    y, z = y.cpu(), z.cpu()
    expected = x.to(dtype)
    same = (_bits(y) == _bits(expected)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{int((~same).sum())} values differ from torch's cast, e.g. {x[~same][:4].tolist()}"
    widened = (_bits(z) == _bits(y.float())) | (z.isnan() & y.isnan())
    assert widened.all(), f"widening differs from torch for {y[~widened][:4].tolist()}"


# ---------------------------------------------------------------------------------------------
# Real CUDA streams
# ---------------------------------------------------------------------------------------------
def _busy_main_stream(busy: torch.Tensor, rounds: int) -> None:
    """Queue ~rounds * 0.14 TFLOP of matmuls on the current stream (milliseconds on an H100)."""
    acc = busy
    for _ in range(rounds):
        acc = acc @ busy


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("slow", ["slow_base_gemm", "late_inputs_slow_lora"])
def test_cuda_dual_stream_is_bitwise_single(dtype, slow):
    """Real streams, with each side of the fork made the slow one.

    slow_base_gemm: the base GEMM queues matmuls ahead of its write, so an add kernel that
    skipped waiting on the main stream, or ran before it, would see NaN rows of c.
    late_inputs_slow_lora: the main stream is busy when the call starts and only then writes x
    and c2 (NaN until then), the base GEMM is a quick copy and the LoRA work is large: an aux
    stream that did not wait for the main stream reads NaN inputs, and a main stream that did
    not join the aux stream adds an unfinished buffer.
    """
    device = torch.device("cuda")
    late = slow == "late_inputs_slow_lora"
    Mg, topk, Eg, Lg = (512, 8, 8, 4) if late else (96, 4, 8, 4)
    Kg, Ig = (1024, 1024) if late else (512, 384)
    activation = Activation.SWIGLUOAI
    Ng = 2 * Ig
    gen = _gen(77)
    token_ids = (torch.arange(Mg) % (Lg + 1)) - 1  # every adapter and -1
    lora = _make_lora(gen, L=Lg, E=Eg, K=Kg, N=Ng, I=Ig, ranks_w13=(5, 16), rank_w2=13,
                      token_ids=token_ids, dtype=dtype, enabled=[True, False, True, True], device=device)
    x = _randn(gen, Mg, Kg, dtype=dtype, device=device)
    route_expert = torch.randint(-1, Eg, (Mg * topk,), generator=gen, dtype=torch.int32).to(device)
    base1 = _randn(gen, Mg * topk, Ng, dtype=dtype, device=device)
    c2 = _randn(gen, Mg * topk, Ig, dtype=dtype, device=device)
    base3 = _randn(gen, Mg * topk, Kg, dtype=dtype, device=device)
    weight = torch.rand(Mg * topk, generator=gen).to(device)
    busy = torch.randn(4096, 4096, device=device)

    def base_gemm(out, value):
        def gemm():
            if not late:
                _busy_main_stream(busy, 8)
            out.copy_(value)
        return gemm

    results = {}
    # The first round compiles the kernels (the host then stalls long enough for any stream to
    # drain, which would hide a missing wait); the second round is the one that is checked.
    for stream in ("single", "dual") * 2:
        spec = _with(lora, stream=stream)
        # NaN-filled and synchronized, so that a read before the main stream's write sees NaN.
        x_live, c2_live = torch.full_like(x, float("nan")), torch.full_like(c2, float("nan"))
        c1, c3 = torch.full_like(base1, float("nan")), torch.full_like(base3, float("nan"))
        torch.cuda.synchronize()
        if late:
            _busy_main_stream(busy, 8)
        x_live.copy_(x)
        c2_live.copy_(c2)
        apply_lora_w13(c1, x_live, route_expert, spec, activation, topk=topk, base_gemm=base_gemm(c1, base1))
        apply_lora_w2(c3, c2_live, route_expert, weight, spec, topk=topk, base_gemm=base_gemm(c3, base3))
        torch.cuda.synchronize()
        results[stream] = (c1.cpu(), c3.cpu())
    _assert_bitwise(results["dual"][0], results["single"][0], "cuda w13 dual vs single")
    _assert_bitwise(results["dual"][1], results["single"][1], "cuda w2 dual vs single")

    # The single results against the fp64 oracle on a sample of routes (the oracle loops).
    sample = torch.arange(0, Mg * topk, 7 if late else 1)
    lora_cpu = LoRASpec(**{k: (tuple(t.cpu() for t in v) if isinstance(v, tuple)
                               else v.cpu() if isinstance(v, torch.Tensor) else v)
                           for k, v in lora.__dict__.items()})
    route_cpu = route_expert.cpu().clone()
    keep = torch.zeros(Mg * topk, dtype=torch.bool)
    keep[sample] = True
    route_cpu[~keep] = -1  # the oracle skips routes outside the sample
    for got, base, inp, pairs, layout, w, by_token in (
            (results["single"][0], base1, x, lora_cpu.w13_slices, _w13_layout(activation, 2, Ng), None, True),
            (results["single"][1], base3, c2, [(lora_cpu.w2_a, lora_cpu.w2_b)], [slice(0, Kg)], weight, False)):
        base = base.cpu()
        expected, allowed, touched = _oracle(base, inp.cpu(), route_cpu, lora_cpu, topk, pairs, layout,
                                             None if w is None else w.cpu(), by_token)
        _assert_within(got[touched], expected[touched], allowed[touched], "cuda vs fp64")
        untouched = keep & ~touched
        _assert_bitwise(got[untouched], base[untouched], "cuda rows without an adapter")


# ---------------------------------------------------------------------------------------------
# End to end: kernels.fused_experts against reference.fused_experts(precision="mirror")
# ---------------------------------------------------------------------------------------------
def _end_to_end_available() -> Tuple[bool, str]:
    import inspect
    try:
        import kernels
        import reference
    except Exception as exc:  # a sibling module that does not import yet
        return False, f"kernels or reference does not import yet: {exc!r}"
    for name, module in (("kernels", kernels), ("reference", reference)):
        fn = getattr(module, "fused_experts", None)
        if fn is None or "lora" not in inspect.signature(fn).parameters:
            return False, f"{name}.fused_experts with lora= is not there yet"
    return True, ""


_E2E_OK, _E2E_REASON = _end_to_end_available()


@pytest.mark.skipif(not _E2E_OK, reason=_E2E_REASON or "available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("stream", ["single", "dual"])
@pytest.mark.parametrize("weight_on_input", [False, True], ids=["route_weight", "weight_on_input"])
def test_fused_experts_with_lora_is_bitwise_mirror_on_exact_inputs(dtype, stream, weight_on_input):
    """Exact arithmetic makes the mirror a bitwise gate.

    Inputs are integers in {-1, 0, 1} (router weights 1/2 and 1/4 in GEMM2, or 1/2 on the input),
    the activation relu2_no_mul: every product and partial sum of every stage is a multiple of
    2^-4 below 2^16 (|c1| <= K = 8, |d13| <= r*K = 24, c2 <= 32^2, |c3| <= 8*1024,
    |d2| <= 3*8*1024), so at most 20 significant bits: exact in fp32 whatever the summation
    order. The kernel and the mirror then round the same real numbers at
    the same places, so they must agree bit for bit; a wrong slice, adapter, expert, token or
    router weight changes integers by whole units.
    """
    import kernels
    import reference

    gen = _gen(31)
    M_, K_, I_, E_, L_, topk = 6, 8, 8, 4, 2, (1 if weight_on_input else 2)

    def ints(*shape):
        return torch.randint(-1, 2, shape, generator=gen).to(dtype)

    hidden = ints(M_, K_)
    w1, w2 = ints(E_, I_, K_), ints(E_, K_, I_)
    topk_ids = torch.stack([torch.randperm(E_, generator=gen)[:topk] for _ in range(M_)]).to(torch.int32)
    topk_weights = torch.tensor([[0.5]] if weight_on_input else [[0.5, 0.25]]).repeat(M_, 1)
    lora = LoRASpec(w13_a=ints(L_, E_, 3, K_), w13_b=ints(L_, E_, I_, 3),
                    w2_a=ints(L_, E_, 3, I_), w2_b=ints(L_, E_, K_, 3),
                    token_lora_ids=torch.tensor([0, 1, -1, 1, 0, 1], dtype=torch.int32),
                    enabled=torch.tensor([True, True]), stream=stream)
    args = (hidden, w1, w2, topk_weights, topk_ids)
    kwargs = dict(activation="relu2_no_mul", apply_router_weight_on_input=weight_on_input)
    got = kernels.fused_experts(*map(_on_device, args), lora=_on_device(lora), **kwargs).cpu()
    mirror = reference.fused_experts(*args, lora=lora, precision="mirror", **kwargs)
    without = reference.fused_experts(*args, lora=None, precision="mirror", **kwargs)
    assert not torch.equal(mirror, without), "the adapters should change the output"
    _assert_bitwise(got.double(), mirror.double(), "fused_experts(lora) vs mirror")
