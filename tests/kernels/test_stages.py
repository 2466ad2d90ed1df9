"""The stage kernels on their own: activation (all nine) and moe_sum, against plain torch."""

import pytest
import torch

import kernels
from kernel_test_support import DEVICE, requires_triton_device
from kernels.activation import apply_activation
from moe_validate.contract.spec import Activation
from reference.activations import apply_activation as ref_activation

pytestmark = requires_triton_device


# The interpreter's tanh shim (2 sigmoid(2x) - 1) overflows exp() harmlessly for large |x|.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", [a.value for a in Activation])
def test_activation_one_rounding_valid_rows_only(activation):
    """c2 = round_S(act(c1)) in fp32: vs the float64 formula rounded once to bf16, the kernel may
    differ by the fp32 evaluation error plus one bf16 ulp where that error straddles a rounding
    boundary (on a small fraction of elements). The fp32 error is absolute, not relative, for
    the gelu family: 1 + erf(z) (or 1 + tanh) cancels for very negative x, with an error of a few
    fp32 ulps of 1, times 0.5|x||u|. Bound: 8 * 2^-24 * |x| * max(1, |u|)."""
    act = Activation.parse(activation)
    g = torch.Generator().manual_seed(71)
    R, I = 12, 40
    N = 2 * I if act.is_gated else I
    c1 = (torch.randn(R, N, generator=g) * 4).bfloat16().to(DEVICE)
    route_expert = torch.tensor([0, -1, 2, 1, -1, 0, 0, 1, 2, -1, 0, 1], dtype=torch.int32, device=DEVICE)
    c2 = torch.full((R, I), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    apply_activation(c1, c2, route_expert, act)
    valid = route_expert >= 0
    assert torch.isnan(c2[~valid]).all(), "rows of invalid routes must not be written"
    want = ref_activation(c1[valid].double(), act).to(torch.bfloat16)
    got = c2[valid]
    diff = (got.double() - want.double()).abs()
    one_ulp = torch.exp2(torch.floor(torch.log2(want.double().abs().clamp_min(1e-30))) - 7)
    c1v = c1[valid].double()
    if act.is_gated:
        gate = c1v[:, 0::2] if act.is_interleaved else c1v[:, :I]
        up = c1v[:, 1::2] if act.is_interleaved else c1v[:, I:]
    else:
        gate, up = c1v, torch.ones_like(c1v)
    fp32_eval = 8 * 2.0 ** -24 * gate.abs() * up.abs().clamp_min(1.0) * gate.abs().clamp_min(1.0)
    assert (diff <= one_ulp + fp32_eval).all()
    # Where the fp32 error is far below a bf16 ulp (no cancellation), flips must be rare.
    well_conditioned = fp32_eval <= one_ulp * 2.0 ** -6
    assert well_conditioned.double().mean() >= 0.5
    assert (diff[well_conditioned] > 0).double().mean() <= 0.02


def test_moe_sum_slot_order_and_invalid_slots():
    g = torch.Generator().manual_seed(72)
    M, topk, K = 5, 3, 20
    c3 = torch.randn(M, topk, K, generator=g).bfloat16()
    valid = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    c3[~valid] = float("nan")  # unwritten rows: never read
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16)
    kernels.moe_sum(c3.to(DEVICE), valid.to(DEVICE), out_dev := out.to(DEVICE))
    acc = torch.zeros(M, K, dtype=torch.float32)
    for j in range(topk):  # fp32, slot order, one rounding
        acc = acc + torch.where(valid[:, j:j + 1], c3[:, j].float(), torch.zeros(()))
    assert torch.equal(out_dev.cpu(), acc.bfloat16())
    assert torch.equal(out_dev.cpu()[1], torch.zeros(K, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_moe_sum_accepts_route_experts(dtype):
    c3 = torch.ones(2, 2, 4, dtype=torch.float16, device=DEVICE)
    out = torch.empty(2, 4, dtype=torch.float16, device=DEVICE)
    kernels.moe_sum(c3, torch.tensor([[0, -1], [3, 1]], dtype=dtype, device=DEVICE), out)
    assert out.cpu().tolist() == [[1.0] * 4, [2.0] * 4]
