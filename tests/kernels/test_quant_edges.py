"""Quantized paths on edge data (issue 4): batch invariance for every scheme without a dynamic
per-tensor scale, all-zero rows, saturation, one outlier per 128-column block, weight scales from
1e-9 to 1e-3, and block-boundary shapes (accepted where the scheme allows them, rejected where
not). Each recipe: seeded problem, one planted edge, kernel vs reference with the bounds of
``kernel_test_support.budgets``."""

import pytest
import torch

from kernel_test_support import assert_close_to_reference, make_problem, run_kernel, to_device
from moe_validate.contract.spec import QuantScheme

# (scheme, make_problem extras): K = 256 and I = 128 give two 128-blocks along K for GEMM1 and
# several int4 groups per tile row.
SCHEMES = {
    "fp8_block128": {},
    "fp8_channel_token": {},
    "fp8_tensor_token": {},
    "fp8_tensor_static": {},
    "fp8_tensor_dynamic": {},
    "int8_channel_token": {},
    "int8_w8a16": {},
    "int4_w4a16": dict(group_size=64),
}
SHAPE = dict(M=6, K=256, I=128, E=3, topk=2)


def _problem(scheme, seed, **over):
    kw = {**SHAPE, **SCHEMES[scheme], **over}
    return make_problem(seed=seed, dtype=torch.bfloat16, scheme=scheme, **kw)


# SPEC "Invariances": with batch_invariant=True a token's row does not depend on the rest of the
# batch, for every scheme without a dynamic per-tensor scale (whose scale spans the batch).
INVARIANT = ["none"] + [s for s in SCHEMES if not QuantScheme(s).has_dynamic_tensor_scale]


@pytest.mark.parametrize("scheme", INVARIANT)
def test_batch_invariance_every_scheme_without_a_batch_wide_scale(scheme):
    p = make_problem(seed=60, dtype=torch.bfloat16, scheme=scheme, **{**SHAPE, **SCHEMES.get(scheme, {})})
    batch = run_kernel(p, batch_invariant=True)
    for m in (0, SHAPE["M"] - 1):
        one = to_device(p, p.x.device)
        one.x, one.topk_weights, one.topk_ids = p.x[m:m + 1], p.topk_weights[m:m + 1], p.topk_ids[m:m + 1]
        assert torch.equal(run_kernel(one, batch_invariant=True)[0], batch[m]), f"{scheme}: token {m}"


def test_dynamic_per_tensor_scale_is_batch_wide():
    """The exception above is real: a large token changes another token's fp8_tensor_dynamic result."""
    p = _problem("fp8_tensor_dynamic", 61)
    before = run_kernel(p, batch_invariant=True)[0]
    p.x[-1] *= 64  # raises the batch absmax, so token 0 quantizes with a coarser step
    after = run_kernel(p, batch_invariant=True)[0]
    assert not torch.equal(before, after)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_all_zero_rows(scheme):
    """An all-zero token: dynamic scales take the 1e-10 floor (no 0/0), the output row is the
    bias-free result of zero input (exact zeros through GEMM1, the activation of zero)."""
    p = _problem(scheme, 62)
    p.x[1] = 0
    out = run_kernel(p)
    assert torch.isfinite(out).all()
    assert_close_to_reference(p, out)


@pytest.mark.parametrize("scheme", ["fp8_tensor_static", "fp8_tensor_token", "int8_channel_token", "fp8_block128"])
def test_saturating_values(scheme):
    """Values far beyond the static scale saturate at +-448 (fp8) instead of becoming NaN/Inf; with
    dynamic scales the absmax element maps exactly to +-QMAX (448 or 127)."""
    p = _problem(scheme, 63)
    p.x[2, :7] = torch.tensor([3e4, -3e4, 1e3, -1e3, 448.0, -448.0, 127.0], dtype=p.x.dtype)
    out = run_kernel(p)
    assert torch.isfinite(out).all()
    assert_close_to_reference(p, out)


@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "int8_channel_token"])
def test_one_outlier_per_128_block(scheme):
    """One element 1000x larger in each 128-column block: per-group scales confine its effect to
    its block, per-token scales to its row; both must match the reference's quantizer."""
    p = _problem(scheme, 64)
    for block_start in range(0, SHAPE["K"], 128):
        p.x[:, block_start + 5] *= 1000
    assert_close_to_reference(p, run_kernel(p))


@pytest.mark.parametrize("scheme", ["fp8_block128", "fp8_channel_token", "fp8_tensor_token", "int8_channel_token",
                                    "int8_w8a16", "int4_w4a16"])
def test_weight_scales_from_1e_9_to_1e_3(scheme):
    """Arbitrary weight scales spanning six decades (log-uniform in [1e-9, 1e-3]): dequantization
    applies each one at its index, so the result tracks the reference element by element."""
    p = _problem(scheme, 65)
    quant = p.kwargs["quant"]
    g = torch.Generator().manual_seed(65)
    for name in ("w1_scale", "w2_scale"):
        s = getattr(quant, name)
        wide = torch.pow(10.0, -9 + 6 * torch.rand(s.shape, generator=g)).to(s.device, s.dtype)
        setattr(quant, name, wide)
    out = run_kernel(p)
    assert torch.isfinite(out).all()
    assert_close_to_reference(p, out)


@pytest.mark.parametrize("scheme,K,I", [("fp8_block128", 200, 96), ("fp8_block128", 128 + 32, 128 + 64),
                                        ("fp8_channel_token", 200, 96), ("int8_channel_token", 136, 40),
                                        ("fp8_tensor_dynamic", 72, 40)])
def test_block_boundary_shapes_allowed(scheme, K, I):
    """K or N not a multiple of 128: the last scale group is short, and K tiles never straddle a
    128 group (SPEC: BLOCK_K must not straddle a group)."""
    p = _problem(scheme, 66, K=K, I=I)
    assert_close_to_reference(p, run_kernel(p))


def test_int4_group_not_dividing_k_is_rejected():
    """int4 groups must tile K exactly (scales [E, N, K/g]): a ragged K is a clear ValueError."""
    p = _problem("int4_w4a16", 67, K=256, group_size=64)
    x = torch.cat([p.x, p.x[:, :32]], dim=1)  # K = 288 is not a multiple of 64
    w1 = torch.cat([p.w1, p.w1[:, :, :16]], dim=2)  # packed: K/2 = 144 bytes per row
    with pytest.raises(ValueError, match="group_size|K"):
        run_kernel(type(p)(x, w1, p.w2, p.topk_weights, p.topk_ids, p.kwargs))
