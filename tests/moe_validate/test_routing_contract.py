"""The alignment contract checks meaning, not one buffer layout (moe_validate/routing_contract.py).

Two layouts of the same correct alignment pass: ours (P a multiple of block_m, -1 past the padded
total) and vLLM's (P = R + E * (block_m - 1), expert ids past the total left uninitialized and
never read: ``tiles_past_total="unread"``). Planted violations are named in both: a route twice,
one missing, a wrong expert id, a wrong sentinel.
"""

from __future__ import annotations

import pytest
import torch

from moe_validate.routing_contract import check_alignment

pytest.importorskip("reference", reason="the contract derives validity from reference.pipeline.route")

E, BLOCK_M = 4, 4
# 7 tokens, topk 3, with an invalid id (-1) and one out of range (9)
IDS = torch.tensor([[0, 1, 2], [3, 0, -1], [1, 1, 9], [2, 3, 0], [0, 2, 1], [3, 3, 3], [1, 0, 2]])
R = IDS.numel()


def _layout(vllm: bool):
    """The alignment of IDS written by hand, expert by expert, routes ascending inside each run."""
    flat = IDS.reshape(-1)
    runs, experts = [], []
    for e in range(E):
        routes = torch.nonzero(flat == e).reshape(-1).tolist()
        padded = -(-len(routes) // BLOCK_M) * BLOCK_M
        runs += routes + [R] * (padded - len(routes))
        experts += [e] * (padded // BLOCK_M)
    total = len(runs)
    P = R + E * (BLOCK_M - 1) if vllm else -(-(R + E * (BLOCK_M - 1)) // BLOCK_M) * BLOCK_M
    sorted_ids = torch.full((P,), R, dtype=torch.int32)
    sorted_ids[:total] = torch.tensor(runs, dtype=torch.int32)
    tiles = -(-P // BLOCK_M)
    if vllm:  # torch.empty in vLLM: whatever was in memory, here real expert ids to make the point
        expert_ids = torch.arange(tiles, dtype=torch.int32) % E
    else:
        expert_ids = torch.full((tiles,), -1, dtype=torch.int32)
    expert_ids[: len(experts)] = torch.tensor(experts, dtype=torch.int32)
    stages = {"sorted_route_ids": sorted_ids, "expert_ids": expert_ids,
              "num_post_padded": torch.tensor([total], dtype=torch.int32), "block_m": BLOCK_M}
    if vllm:
        stages["tiles_past_total"] = "unread"
    return stages


def _copy(stages):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in stages.items()}


@pytest.mark.parametrize("vllm", [False, True], ids=["ours", "vllm"])
def test_both_layouts_of_a_correct_alignment_pass(vllm):
    stages = _layout(vllm)
    if vllm:
        assert stages["sorted_route_ids"].numel() % BLOCK_M, "vLLM's buffer size is no multiple of block_m here"
        past = int(stages["num_post_padded"][0]) // BLOCK_M
        assert (stages["expert_ids"][past:] >= 0).any(), "real expert ids past the total, never read"
    assert check_alignment(stages, IDS, E, E) is None


def test_unread_is_what_lets_expert_ids_past_the_total_be_anything():
    stages = _layout(vllm=True)
    del stages["tiles_past_total"]
    problem = check_alignment(stages, IDS, E, E)
    assert problem is not None and "past the padded total" in problem and "expected -1" in problem


@pytest.mark.parametrize("vllm", [False, True], ids=["ours", "vllm"])
def test_planted_violations_are_named_in_both_layouts(vllm):
    good = _layout(vllm)
    s = good["sorted_route_ids"]
    total = int(good["num_post_padded"][0])
    pad_slot = int(torch.nonzero(s[:total] == R)[0, 0])
    first_route = int(torch.nonzero(s < R)[0, 0])
    route = int(s[first_route])

    twice = _copy(good)
    twice["sorted_route_ids"][pad_slot] = route  # a route twice (the pad slot lies in another run)
    missing = _copy(good)
    missing["sorted_route_ids"][first_route] = R  # one route missing
    wrong_expert = _copy(good)
    wrong_expert["expert_ids"][0] = 2  # tile 0 belongs to expert 0
    wrong_sentinel = _copy(good)
    wrong_sentinel["sorted_route_ids"][pad_slot] = -1  # padding must be the sentinel M*topk
    wrong_sentinel_past = _copy(good)
    wrong_sentinel_past["sorted_route_ids"][total] = R + 1
    cases = [
        (twice, f"route {route} (token {route // 3}, slot {route % 3}) appears 2 times"),
        (missing, f"valid route {route} (token {route // 3}, slot {route % 3}, expert 0) is missing"),
        (wrong_expert, "tile 0 (slots 0..3) has expert 2; the padded runs give it to expert 0"),
        (wrong_sentinel, f"slot {pad_slot} holds -1: neither a route id in [0, {R}) nor the sentinel {R}"),
        (wrong_sentinel_past, f"slot {total} holds {R + 1}: neither a route id"),
    ]
    for stages, needle in cases:
        problem = check_alignment(stages, IDS, E, E)
        assert problem is not None and needle in problem, (needle, problem)


def test_the_padded_total_must_fit_the_buffers():
    short = _layout(vllm=True)
    total = int(short["num_post_padded"][0])
    short["expert_ids"] = short["expert_ids"][: total // BLOCK_M - 1]
    assert "needs" in check_alignment(short, IDS, E, E)
    odd = _layout(vllm=True)
    odd["num_post_padded"] = torch.tensor([total - 1])
    assert "not a multiple of block_m" in check_alignment(odd, IDS, E, E)
    with pytest.raises(ValueError, match="tiles_past_total must be one of"):
        check_alignment({**_layout(False), "tiles_past_total": "ignore"}, IDS, E, E)
