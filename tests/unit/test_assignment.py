"""Bucket assignment: determinism, balance and movement bounds (bench/assignment.py has the
full comparison with Maglev-style population)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipfarm.membership.assignment import (
    Members,
    _costs,
    assign,
    min_moves,
    moved,
    quotas,
)

SIZES = [1, 2, 3, 7, 16, 33, 64]


def farm(n: int, weighted: bool, seed: int = 0) -> Members:
    rnd = random.Random(seed * 100 + n)
    return tuple(sorted((f"node{i:02d}", rnd.randint(1, 10) if weighted else 1) for i in range(n)))


def assert_balanced(members: Members, buckets: int, anchor: Members | None = None) -> None:
    a = assign(members, buckets, anchor)
    active = [(n, w) for n, w in members if w > 0]
    total = sum(w for _, w in active)
    counts = a.counts()
    for n, w in active:
        ideal = buckets * w / total
        assert abs(counts[members.index((n, w))] - ideal) < 1, (n, counts, ideal)
    assert all(o >= 0 for o in a.owners) if active else all(o < 0 for o in a.owners)


def reference(members: Members, buckets: int) -> list[str]:
    """Capped HRW by its definition: every pair, cheapest first."""
    lo, hi = quotas([w for _, w in members], buckets)
    tickets = buckets - sum(lo)
    pairs = sorted(
        (_costs(n, buckets)[b] / w, i, b)
        for i, (n, w) in enumerate(members)
        for b in range(buckets)
    )
    owner = [-1] * buckets
    count = [0] * len(members)
    for _, i, b in pairs:
        if owner[b] >= 0:
            continue
        if count[i] >= lo[i]:
            if count[i] >= hi[i] or not tickets:
                continue
            tickets -= 1
        owner[b] = i
        count[i] += 1
    return [members[o][0] for o in owner]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=12),
    st.sampled_from([1, 7, 64, 300]),
)
def test_plain_assignment_is_capped_hrw_by_definition(weights: list[int], buckets: int) -> None:
    members = tuple((f"n{i}", w) for i, w in enumerate(weights))
    assert assign(members, buckets).owner_names() == reference(members, buckets)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=40),
    st.sampled_from([1, 16, 256, 1024]),
    st.integers(0, 40),
)
def test_every_node_within_one_bucket_of_its_weighted_share(
    weights: list[int], buckets: int, down: int
) -> None:
    anchor = tuple((f"n{i:02d}", w) for i, w in enumerate(weights))
    members = anchor[: max(1, len(anchor) - down)]
    assert_balanced(members, buckets)
    assert_balanced(members, buckets, anchor)


def test_assignment_depends_only_on_the_up_set() -> None:
    members = farm(9, weighted=True)
    first = assign(members, 256, members).owner_names()
    assign.cache_clear()
    assert assign(members, 256, members).owner_names() == first


def test_weight_zero_and_empty() -> None:
    a = assign((("a", 0), ("b", 2)), 16)
    assert a.mask("a") == 0 and a.mask("b") == 2**16 - 1
    assert assign((("a", 0),), 16).owners == (-1,) * 16
    assert assign((), 16).owner_names() == [None] * 16
    assert assign((("a", 1),), 16, (("a", 1), ("b", 1))).mask("a") == 2**16 - 1


def test_min_moves() -> None:
    members = (("a", 1), ("b", 1))
    assert min_moves(["a", "a", "b", "b"], members, 4) == 0
    assert min_moves(["a", "a", "a", "b"], members, 4) == 1
    assert min_moves(["c", "c", "a", "b"], members, 4) == 2
    assert min_moves([None, "a", "a", "b"], members, 4) == 1
    assert min_moves(["a", "a", "a", "b", "b"], members, 5) == 0  # 3/2 is within one bucket
    assert min_moves(["a"], (), 1) == 1


def single_events(full: Members) -> list[tuple[Members, Members]]:
    out = []
    for x in full:
        less = tuple(m for m in full if m != x)
        if less:
            out += [(full, less), (less, full)]
    return out


@pytest.mark.parametrize("buckets", [256, 1024])
@pytest.mark.parametrize("weighted", [False, True], ids=["equal", "weighted"])
def test_one_node_joining_or_leaving_moves_only_what_must_move(
    buckets: int, weighted: bool
) -> None:
    """From the full farm: at most 10 % more than the minimum, or one bucket of quota rounding
    when the minimum is below 10 (the rounding of who gets the extra bucket)."""
    total_moved = total_min = 0
    for n in SIZES:
        full = farm(n, weighted)
        for before, after in single_events(full):
            old = assign(before, buckets, full).owner_names()
            new = assign(after, buckets, full).owner_names()
            got, best = moved(old, new), min_moves(old, after, buckets)
            assert got <= max(1.1 * best, best + 1), (n, before, after, got, best)
            total_moved += got
            total_min += best
            assert_balanced(after, buckets, full)
    assert total_moved <= 1.03 * total_min


@pytest.mark.parametrize("buckets", [256, 1024])
def test_with_nodes_already_down_extra_moves_stay_small(buckets: int) -> None:
    rnd = random.Random(buckets)
    total_moved = total_min = 0
    for n in (8, 16, 33, 64):
        full = farm(n, weighted=True, seed=1)
        for k in (1, 2, 4):
            base = tuple(m for m in full if m not in set(rnd.sample(full, k)))
            x = rnd.choice(base)
            after = tuple(m for m in base if m != x)
            old = assign(base, buckets, full).owner_names()
            new = assign(after, buckets, full).owner_names()
            total_moved += moved(old, new)
            total_min += min_moves(old, after, buckets)
    assert total_moved <= 1.2 * total_min


def test_anchoring_beats_plain_capped_hrw() -> None:
    full = farm(33, weighted=False)
    plain = anchored = best = 0
    for before, after in single_events(full):
        plain += moved(assign(before, 256).owner_names(), assign(after, 256).owner_names())
        old = assign(before, 256, full).owner_names()
        anchored += moved(old, assign(after, 256, full).owner_names())
        best += min_moves(old, after, 256)
    assert anchored <= 1.1 * best < 1.2 * best < plain


def test_quotas() -> None:
    assert quotas([1, 1, 1], 256) == ([85, 85, 85], [86, 86, 86])
    assert quotas([1, 3], 256) == ([64, 192], [64, 192])
    with pytest.raises(ValueError, match="positive weight"):
        quotas([0], 16)
    lo, hi = quotas([3, 5, 7], 1000)
    assert sum(lo) <= 1000 <= sum(hi) and all(h - q <= 1 for q, h in zip(lo, hi, strict=True))
    assert math.isclose(sum(_costs("x", 4096)) / 4096, 1.0, rel_tol=0.1)  # Exp(1) costs
