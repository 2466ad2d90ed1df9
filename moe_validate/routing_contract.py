"""The alignment contract (SPEC.md "Pipeline" step 5), checked exactly on a backend's routing stages.

A backend that exposes its routing (``backends.ExposesRouting``: ``routing_stages(inputs, case)``)
hands back, for the case's routes:

  ``sorted_route_ids`` int [P]   route ids r = m*topk + j laid out expert by expert, each expert's
                                 run padded to a multiple of ``block_m`` with the sentinel R = M*topk
  ``expert_ids``       int [>= T / block_m]  the local expert of each tile
  ``num_post_padded``  int [1]   the padded total T = sum_e ceil(count_e / block_m) * block_m
  ``block_m``          int
  ``tiles_past_total`` str, optional: ``"-1"`` (the default, SPEC step 5: every tile the buffers
                                 hold past T has expert -1) or ``"unread"`` (the kernel stops at
                                 ``num_post_padded`` and never reads an expert id there; vLLM's
                                 layout, whose ``expert_ids`` past T are left uninitialized)

The contract is about meaning, not one buffer layout: P is any size >= T (ours is a multiple of
``block_m``; vLLM's is ``R + E * (block_m - 1)``, the most any routing can need), and ``expert_ids``
may hold more tiles than T / block_m. ``check_alignment`` compares the stages with what the
contract implies from the router ids alone (``reference.pipeline.route`` decides validity and
local experts) and returns the first violation as one readable line, or None. Rule by rule:

  1. the shapes fit: T a multiple of block_m, T <= P, at least T / block_m expert ids;
  2. T is the sum of the padded per-expert counts;
  3. every slot holds a route id or the sentinel; slots at or past T hold the sentinel;
  4. every valid route appears exactly once, no invalid route appears;
  5. tile t < T / block_m belongs to the expert whose padded run covers slot t * block_m (runs in
     expert order, empty experts own no tile), and every route in it is routed to that expert;
  6. unless ``tiles_past_total`` is ``"unread"``: every tile past the padded total has expert -1
     (a kernel may then skip it; one that reads an expert id there must not find a real expert).

Order inside an expert's run is free (SPEC: it must not change any output bit), so it is not checked.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["check_alignment", "ROUTING_STAGE_KEYS"]

ROUTING_STAGE_KEYS = ("sorted_route_ids", "expert_ids", "num_post_padded", "block_m")
TILES_PAST_TOTAL = ("-1", "unread")


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask)[0, 0])


def check_alignment(stages: Dict[str, Any], topk_ids: torch.Tensor, num_local_experts: int,
                    global_num_experts: int, expert_map: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when ``stages`` (see the module docstring) honour the alignment contract, else why not."""
    missing = [k for k in ROUTING_STAGE_KEYS if k not in stages]
    if missing:
        raise ValueError(f"routing stages must have {', '.join(ROUTING_STAGE_KEYS)}; missing {', '.join(missing)}")
    from reference.pipeline import route

    block_m = int(stages["block_m"])
    if block_m < 1:
        raise ValueError(f"routing stages: block_m must be >= 1; got {block_m}")
    past_total = stages.get("tiles_past_total", "-1")
    if past_total not in TILES_PAST_TOTAL:
        raise ValueError(f"routing stages: tiles_past_total must be one of {TILES_PAST_TOTAL}; got {past_total!r}")
    sorted_ids = stages["sorted_route_ids"].detach().to("cpu", torch.int64).reshape(-1)
    expert_ids = stages["expert_ids"].detach().to("cpu", torch.int64).reshape(-1)
    total = int(torch.as_tensor(stages["num_post_padded"]).reshape(-1)[0])
    M, topk = topk_ids.shape
    R = M * topk
    valid, local = route(topk_ids.detach().cpu(), num_local_experts, global_num_experts,
                         None if expert_map is None else expert_map.detach().cpu())
    valid, local = valid.reshape(-1), local.reshape(-1)
    P = sorted_ids.numel()

    # 1. shapes (P and the number of expert ids are the layout's choice, as long as T fits)
    if total % block_m:
        return f"num_post_padded {total} is not a multiple of block_m {block_m}"
    if total > P:
        return f"num_post_padded {total} exceeds the {P} slots of sorted_route_ids"
    if expert_ids.numel() < total // block_m:
        return (f"expert_ids has {expert_ids.numel()} tiles; the padded total {total} / block_m {block_m} "
                f"needs {total // block_m}")
    # 2. padded total
    counts = torch.bincount(local[valid], minlength=num_local_experts)[:num_local_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    expect_total = int(padded.sum())
    if total != expect_total:
        return (f"num_post_padded is {total}; the padded per-expert counts sum to {expect_total} "
                f"(block_m {block_m}, counts {counts.tolist()})")
    # 3. slot contents
    out_of_range = (sorted_ids < 0) | (sorted_ids > R)
    if out_of_range.any():
        s = _first(out_of_range)
        return f"slot {s} holds {int(sorted_ids[s])}: neither a route id in [0, {R}) nor the sentinel {R}"
    past = sorted_ids[total:] != R
    if past.any():
        s = total + _first(past)
        return (f"slot {s}, at or past the padded total {total}, holds route {int(sorted_ids[s])} "
                f"instead of the sentinel {R}")
    # 4. each valid route exactly once, no invalid one
    routes = sorted_ids[:total][sorted_ids[:total] < R]
    seen = torch.bincount(routes, minlength=R)[:R] if R else torch.zeros(0, dtype=torch.int64)
    if R and (seen > 1).any():
        r = _first(seen > 1)
        return f"route {r} (token {r // topk}, slot {r % topk}) appears {int(seen[r])} times"
    if R and (valid & (seen == 0)).any():
        r = _first(valid & (seen == 0))
        return f"valid route {r} (token {r // topk}, slot {r % topk}, expert {int(local[r])}) is missing"
    if R and (~valid & (seen > 0)).any():
        r = _first(~valid & (seen > 0))
        return f"invalid route {r} (token {r // topk}, slot {r % topk}) appears in the aligned list"
    # 5. tile owners within the padded total, and routes matching their tile's expert
    used = total // block_m
    ends = torch.cumsum(padded, 0)
    tile_start = torch.arange(used, dtype=torch.int64) * block_m
    owner = torch.searchsorted(ends, tile_start, right=True)
    wrong = expert_ids[:used] != owner
    if wrong.any():
        t = _first(wrong)
        return (f"tile {t} (slots {t * block_m}..{(t + 1) * block_m - 1}) has expert {int(expert_ids[t])}; "
                f"the padded runs give it to expert {int(owner[t])}")
    if used:
        tiles = sorted_ids[:total].view(used, block_m)
        is_route = tiles < R
        route_expert = torch.where(is_route, local[tiles.clamp_max(max(R - 1, 0))], owner[:, None])
        mismatch = is_route & (route_expert != owner[:, None])
        if mismatch.any():
            t, lane = (int(v) for v in torch.nonzero(mismatch)[0])
            r = int(tiles[t, lane])
            return (f"tile {t} of expert {int(owner[t])} holds route {r} (token {r // topk}, slot {r % topk}) "
                    f"of expert {int(local[r])}")
    # 6. tiles past the padded total
    if past_total == "unread":
        return None
    beyond = expert_ids[used:] != -1
    if beyond.any():
        t = used + _first(beyond)
        return (f"tile {t}, past the padded total {total} (block_m {block_m}), has expert {int(expert_ids[t])}; "
                f"expected -1")
    return None
