"""kernels.moe_align_block_size: the routing metadata invariants (SPEC.md, Pipeline steps 2 and 5).

Each test builds ids with a seed, runs the Triton alignment and checks, exactly:
  - every valid route appears once, every invalid route never; padding slots hold M*topk;
  - each BLOCK_M tile belongs to one expert (expert_ids), and its routes are that expert's;
  - each expert's run is padded to a multiple of BLOCK_M; num_post_padded is the sum;
  - tiles past the padded total have expert id -1.
"""

import pytest
import torch

from kernel_test_support import DEVICE, requires_triton_device
from kernels import moe_align_block_size
from kernels.align import max_padded_routes, route_experts

pytestmark = requires_triton_device


def local_expert_of(ids, global_num_experts, expert_map):
    """The SPEC's route validity, in plain Python (no clever indexing)."""
    out = []
    for v in ids.reshape(-1).tolist():
        if not (0 <= v < global_num_experts):
            out.append(-1)
        elif expert_map is None:
            out.append(v)
        else:
            out.append(int(expert_map[v]))
    return out


def check_alignment(ids, block_m, global_num_experts, num_local, expert_map=None):
    sorted_ids, expert_ids, num_post = moe_align_block_size(
        ids.to(DEVICE), block_m, global_num_experts, expert_map.to(DEVICE) if expert_map is not None else None,
        num_local_experts=num_local)
    sorted_ids, expert_ids = sorted_ids.cpu().tolist(), expert_ids.cpu().tolist()
    total = int(num_post.cpu()[0])
    R = ids.numel()
    local = local_expert_of(ids, global_num_experts, expert_map)
    counts = [sum(1 for e in local if e == k) for k in range(num_local)]
    assert total == sum(-(-c // block_m) * block_m for c in counts)
    assert len(sorted_ids) == max_padded_routes(R, num_local, block_m) >= total
    seen = [r for r in sorted_ids if r != R]
    assert sorted(seen) == sorted(r for r in range(R) if local[r] >= 0), "each valid route exactly once"
    assert all(r == R for r in sorted_ids[total:]), "nothing past the padded total"
    owners = []
    for t in range(len(expert_ids)):
        tile = sorted_ids[t * block_m:(t + 1) * block_m]
        if t * block_m >= total:
            assert expert_ids[t] == -1
            continue
        e = expert_ids[t]
        assert 0 <= e < num_local
        assert all(local[r] == e for r in tile if r != R), f"tile {t} mixes experts"
        assert any(r != R for r in tile), f"tile {t} is all padding inside the total"
        owners.append(e)
    assert owners == sorted(owners), "experts' runs are laid out in expert order, contiguous"
    return sorted_ids, expert_ids, total


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_random_ids_with_invalid_routes(block_m):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-3, 12, (37, 3), generator=g, dtype=torch.int32)  # E = 10: ids 10, 11 invalid
    check_alignment(ids, block_m, 10, 10)


def test_expert_map_and_huge_ids():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 8, (20, 2), generator=g, dtype=torch.int64)
    ids[15:] = torch.tensor([2 ** 40, 2 ** 62])  # stale ids of padded token rows
    ids[3, 0] = -(2 ** 50)
    emap = torch.tensor([-1, 0, 1, -1, 2, -1, -1, 3], dtype=torch.int32)  # last entry local
    check_alignment(ids, 4, 8, 4, emap)


@pytest.mark.parametrize("E", [1, 33])
def test_expert_counts_not_multiple_of_32(E):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, E, (17, min(E, 2)), generator=g, dtype=torch.int32)
    check_alignment(ids, 8, E, E)


def test_zero_tokens_and_all_invalid():
    check_alignment(torch.zeros(0, 2, dtype=torch.int32), 16, 4, 4)
    _, expert_ids, total = check_alignment(torch.full((5, 2), -1, dtype=torch.int32), 16, 4, 4)
    assert total == 0 and all(e == -1 for e in expert_ids)


def test_route_experts_bounds_checks():
    ids = torch.tensor([[0, 5, -1], [2 ** 40, 3, 1]], dtype=torch.int64)
    emap = torch.tensor([1, -1, 0, 2, -1], dtype=torch.int32)
    got = route_experts(ids.to(DEVICE), 5, 3, emap.to(DEVICE)).cpu().tolist()
    assert got == [1, -1, -1, -1, 2, -1]


def test_bad_block_m():
    with pytest.raises(ValueError, match="block_m"):
        moe_align_block_size(torch.zeros(2, 2, dtype=torch.int32, device=DEVICE), 12, 4)
