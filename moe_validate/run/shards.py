"""Which cases a run gets: shards of a suite (``--shard i/n``) and repetitions (``--repeat``)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["parse_shard", "select_shard", "REPEAT_SEED_STRIDE", "fresh_seed", "repetition_of_seed",
           "repeat_cases", "failures_per_repetition"]


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"i/n"`` with 1 <= i <= n -> (i, n); None -> None."""
    if text is None:
        return None
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shard must be 'i/n' with integers 1 <= i <= n (e.g. 2/4); got {text!r}") from None
    if not (count >= 1 and 1 <= index <= count):
        raise ValueError(f"shard must be 'i/n' with 1 <= i <= n (e.g. 2/4); got {text!r}")
    return index, count


def select_shard(cases: Sequence, shard: Optional[Union[str, Tuple[int, int]]]) -> List:
    """The cases of shard i/n: position i-1 (mod n) in the sorted list of case ids.

    Depends only on the set of case ids, so every job of a CI matrix that builds the same suite
    picks a disjoint share and the shares cover every case once. Cases keep their given order.
    """
    if isinstance(shard, str) or shard is None:
        shard = parse_shard(shard)
    if shard is None:
        return list(cases)
    index, count = shard
    ids = sorted({c.id for c in cases})
    mine = {cid for pos, cid in enumerate(ids) if pos % count == index - 1}
    return [c for c in cases if c.id in mine]

# ---------------------------------------------------------------------------------------------
# Repetitions (``moe-validate run --repeat N --fresh-seeds``, ``moe-validate calibrate``)
# ---------------------------------------------------------------------------------------------
# Repetition r of a case with seed s runs with seed s + r * REPEAT_SEED_STRIDE. Every suite seed is
# far below the stride (the largest is in the 3000s), so the map (s, r) -> seed is one-to-one over
# a suite: no two repetitions, and no two cases, share an id. The stride is even, so a fresh seed
# keeps the parity that inputs.py reads (odd int4 seeds carry an explicit zero point, even gated
# seeds split w1 in two slices): a curated case keeps exercising what it was written for. The
# repetition stays readable in the id: s3000007 is repetition 3 of seed 7. Repetition 0 keeps the
# case's own seed, so ``--repeat 1 --fresh-seeds`` is the plain run.
REPEAT_SEED_STRIDE = 1_000_000


def fresh_seed(seed: int, repetition: int) -> int:
    """The seed of repetition ``repetition`` (0-based) of a case whose own seed is ``seed``."""
    for name, value in (("seed", seed), ("repetition", repetition)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not 0 <= seed < REPEAT_SEED_STRIDE:
        raise ValueError(f"seed must be in [0, {REPEAT_SEED_STRIDE}) to be re-seeded per repetition; got {seed}")
    if repetition < 0:
        raise ValueError(f"repetition must be >= 0; got {repetition}")
    return seed + repetition * REPEAT_SEED_STRIDE


def repetition_of_seed(seed: int) -> int:
    """The repetition index a (possibly re-seeded) case seed belongs to: ``fresh_seed``'s inverse."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    return seed // REPEAT_SEED_STRIDE


def repeat_cases(cases: Sequence, repeat: int, *, fresh_seeds: bool, first: int = 0) -> List:
    """``cases`` ``repeat`` times, repetition-major (all of repetition ``first``, then ``first + 1``, ...).

    ``first`` > 0 continues an earlier stability run (repetitions 0 .. first-1 already ran) with
    new seeds instead of repeating the ones already judged.

    With ``fresh_seeds`` every case of repetition r is ``dataclasses.replace(case,
    seed=fresh_seed(case.seed, r))``: its id names the seed it ran with, so ``moe-validate repro``
    re-runs exactly that repetition. Without ``fresh_seeds`` only ``repeat == 1`` is accepted:
    a results file keys cases by id (the last record of an id wins when it is read), so N
    identical ids would keep one repetition and silently drop the others.
    """
    import dataclasses

    if not isinstance(repeat, int) or isinstance(repeat, bool):
        raise TypeError(f"repeat must be an int; got {type(repeat).__name__}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"first repetition must be an int >= 0; got {first!r}")
    if first and not fresh_seeds:
        raise ValueError(f"first repetition {first} > 0 needs fresh_seeds (--fresh-seeds)")
    cases = list(cases)
    if repeat == 1 and not fresh_seeds:
        return cases
    if not fresh_seeds:
        raise ValueError(f"repeat {repeat} > 1 needs fresh_seeds (--fresh-seeds): repetitions with one case id "
                         "collapse to the last one in results.jsonl; for identical inputs run into separate --out "
                         "directories")
    return [dataclasses.replace(case, seed=fresh_seed(case.seed, rep))
            for rep in range(first, first + repeat) for case in cases]


def failures_per_repetition(bad_case_ids: Sequence[str], repeat: int) -> List[List[str]]:
    """The not-passing case ids grouped by repetition (index r holds repetition r's ids).

    A repetition is read back from the id's seed token (``-s<seed>``, the last token of every id).
    """
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1; got {repeat!r}")
    groups: List[List[str]] = [[] for _ in range(repeat)]
    for case_id in bad_case_ids:
        token = str(case_id).rsplit("-", 1)[-1]
        if not (token.startswith("s") and token[1:].isdigit()):
            raise ValueError(f"case id {case_id!r} must end with the seed token s<seed>")
        rep = repetition_of_seed(int(token[1:]))
        if rep >= repeat:
            raise ValueError(f"case id {case_id!r} is repetition {rep}, beyond the {repeat} run")
        groups[rep].append(case_id)
    return groups

