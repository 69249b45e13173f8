"""Bucket assignment: determinism, balance and movement bounds (bench/assignment.py has the
full comparison with Maglev-style population)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vipfarm.membership.assignment as assignment_module
from vipfarm.membership.assignment import (
    Assignment,
    Members,
    Planner,
    _costs,
    assign,
    balanced,
    masks_of,
    min_moves,
    moved,
    on_plan,
    quotas,
    rebalance,
)

SIZES = [1, 2, 3, 7, 16, 33, 64]


def farm(n: int, weighted: bool, seed: int = 0) -> Members:
    rnd = random.Random(seed * 100 + n)
    return tuple(sorted((f"node{i:02d}", rnd.randint(1, 10) if weighted else 1) for i in range(n)))


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
    st.randoms(use_true_random=False),
)
def test_every_node_within_one_bucket_of_its_weighted_share(
    weights: list[int], buckets: int, down: int, rnd: random.Random
) -> None:
    anchor = tuple((f"n{i:02d}", w) for i, w in enumerate(weights))
    members = anchor[: max(1, len(anchor) - down)]
    assert_balanced(assign(members, buckets), members, buckets)
    assert_balanced(assign(members, buckets, anchor), members, buckets)
    # From any ownership at all, double claims included.
    current = tuple(rnd.getrandbits(buckets) & rnd.getrandbits(buckets) for _ in members)
    assert_balanced(rebalance(members, current, buckets, anchor), members, buckets)


def assert_balanced(a: Assignment, members: Members, buckets: int) -> None:
    assert balanced(a.owner_names(), members, buckets) is None
    active = [(n, w) for n, w in members if w > 0]
    total = sum(w for _, w in active)
    for n, w in active:
        assert abs(a.mask(n).bit_count() - buckets * w / total) < 1
    assert sum(a.counts()) == (buckets if active else 0)


def test_same_inputs_same_result_and_cold_start_of_the_full_farm_is_the_anchor() -> None:
    members = farm(9, weighted=True)
    current = tuple(random.Random(1).getrandbits(256) for _ in members)
    first = rebalance(members, current, 256, members)
    rebalance.cache_clear()
    assert rebalance(members, current, 256, members) == first
    assert assign(members, 256, members) == assign(members, 256)  # anchor = capped HRW


def test_weight_zero_and_empty() -> None:
    a = assign((("a", 0), ("b", 2)), 16)
    assert a.mask("a") == 0 and a.mask("b") == 2**16 - 1
    assert assign((("a", 0),), 16).owners == (-1,) * 16
    assert assign((), 16).owner_names() == [None] * 16
    assert assign((("a", 1),), 16, (("a", 1), ("b", 1))).mask("a") == 2**16 - 1
    with pytest.raises(ValueError, match="2 ownership bitmaps for 1 members"):
        rebalance((("a", 1),), (0, 0), 16)


def test_min_moves() -> None:
    members = (("a", 1), ("b", 1))
    assert min_moves(["a", "a", "b", "b"], members, 4) == 0
    assert min_moves(["a", "a", "a", "b"], members, 4) == 1
    assert min_moves(["c", "c", "a", "b"], members, 4) == 2
    assert min_moves([None, "a", "a", "b"], members, 4) == 1
    assert min_moves(["a", "a", "a", "b", "b"], members, 5) == 0  # 3/2 is within one bucket
    assert min_moves(["a"], (), 1) == 1


def test_a_double_claim_stays_with_the_lower_name() -> None:
    members = (("a", 1), ("b", 1))
    a = rebalance(members, (0b0011, 0b1110), 4)
    assert a.mask("a") == 0b0011 and a.mask("b") == 0b1100


@pytest.mark.parametrize("buckets", [256, 1024])
@pytest.mark.parametrize("weighted", [False, True], ids=["equal", "weighted"])
def test_every_join_leave_and_weight_change_moves_exactly_the_minimum(
    buckets: int, weighted: bool
) -> None:
    """Random walks of single events from whatever state history left (nodes already down,
    weights changed): every step moves exactly `min_moves`, stays balanced, and is a fixed
    point (computing again moves nothing)."""
    for n in SIZES:
        full = farm(n, weighted)
        rnd = random.Random(n * buckets + weighted)
        weights = dict(full)
        up = set(weights)
        owners = assign(full, buckets, full).owner_names()
        for _ in range(25):
            down = sorted(set(weights) - up)
            roll = rnd.random()
            if roll < 0.15 and weighted:
                weights[rnd.choice(sorted(up))] = rnd.randint(0, 10)
            elif down and (roll >= 0.6 or len(up) == 1):
                up.add(rnd.choice(down))
            elif len(up) > 1:
                up.remove(rnd.choice(sorted(up)))
            members = tuple(sorted((m, weights[m]) for m in up))
            a = rebalance(members, masks_of(owners, members), buckets, full)
            new = a.owner_names()
            assert_balanced(a, members, buckets)
            assert moved(owners, new) == min_moves(owners, members, buckets), (n, members)
            assert rebalance(members, a.masks, buckets, full) == a
            owners = new


def test_leaving_and_rejoining_the_full_farm_restores_the_anchor_within_one_bucket() -> None:
    exact = total = 0
    for weighted in (False, True):
        for n in (2, 3, 7, 16, 33, 64):
            full = farm(n, weighted)
            base = assign(full, 256, full)
            for x in full:
                less = tuple(m for m in full if m != x)
                away = rebalance(less, masks_of(base.owner_names(), less), 256, full)
                gone = base.mask(x[0]).bit_count()
                assert moved(base.owner_names(), away.owner_names()) == gone
                back = rebalance(full, masks_of(away.owner_names(), full), 256, full)
                diff = moved(base.owner_names(), back.owner_names())
                assert diff <= 1
                exact += diff == 0
                total += 1
    assert exact >= 0.6 * total


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=1, max_size=6),
    st.sampled_from([8, 16, 64]),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_progress_along_the_plan_keeps_the_plan(
    weights: list[int], buckets: int, anchored: bool, rnd: random.Random
) -> None:
    """`on_plan` is what lets a core skip `rebalance`: whenever it says the plan still holds,
    computing it again gives the same plan; and releases and acquisitions the plan asks for,
    of buckets nobody else claims, are recognised as progress."""
    members = tuple((f"n{i}", w) for i, w in enumerate(weights))
    anchor = members if anchored else None
    current = tuple(rnd.getrandbits(buckets) & rnd.getrandbits(buckets) for _ in members)
    plan = rebalance(members, current, buckets, anchor)
    after = list(current)
    for i, p in enumerate(plan.masks):
        for b in range(buckets):
            claimed = any(after[k] >> b & 1 for k in range(len(members)) if k != i)
            if rnd.random() < 0.5 and not claimed and (after[i] ^ p) >> b & 1:
                after[i] ^= 1 << b  # release what the plan takes, take what it gives
    assert on_plan(current, tuple(after), plan)
    assert rebalance(members, tuple(after), buckets, anchor) == plan
    for _ in range(3):  # arbitrary changes: whenever on_plan says yes, it is right
        after[rnd.randrange(len(after))] ^= 1 << rnd.randrange(buckets)
        if on_plan(current, tuple(after), plan):
            assert rebalance(members, tuple(after), buckets, anchor) == plan


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=1, max_size=6),
    st.sampled_from([8, 64]),
    st.randoms(use_true_random=False),
)
def test_a_planner_always_answers_what_rebalance_would(
    weights: list[int], buckets: int, rnd: random.Random
) -> None:
    """A core's planner over a run of handover steps (mostly one node at a time carrying out
    the plan, sometimes anything else): its answer is always `rebalance` of the input."""
    members = tuple((f"n{i}", w) for i, w in enumerate(weights))
    planner = Planner()
    current = [rnd.getrandbits(buckets) & rnd.getrandbits(buckets) for _ in members]
    for _ in range(40):
        want = rebalance(members, tuple(current), buckets, members)
        assert planner.plan(members, tuple(current), buckets, members) == want
        i = rnd.randrange(len(members))
        if rnd.random() < 0.8:  # one step of the plan for node i, or of a stale plan
            step = (current[i] ^ want.masks[i]) & rnd.getrandbits(buckets)
            current[i] ^= step
        else:
            current[i] ^= 1 << rnd.randrange(buckets)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=1, max_size=6),
    st.sampled_from([8, 64]),
    st.randoms(use_true_random=False),
)
def test_a_planner_told_which_positions_changed_answers_the_same(
    weights: list[int], buckets: int, rnd: random.Random
) -> None:
    """The core tells its planner which members' bitmaps may have changed (`changed`, a
    superset): the answers are those of a planner that compares every position."""
    members = tuple((f"n{i}", w) for i, w in enumerate(weights))
    told, plain = Planner(), Planner()
    current = [rnd.getrandbits(buckets) & rnd.getrandbits(buckets) for _ in members]
    hint: list[int] | None = None
    for _ in range(40):
        got = told.plan(members, tuple(current), buckets, members, changed=hint)
        assert got == plain.plan(members, tuple(current), buckets, members)
        assert got == rebalance(members, tuple(current), buckets, members)
        touched = set(rnd.sample(range(len(members)), rnd.randint(0, len(members))))
        for i in touched:
            if rnd.random() < 0.7:  # a step of the plan, or anything else
                current[i] ^= (current[i] ^ got.masks[i]) & rnd.getrandbits(buckets)
            elif rnd.random() < 0.5:
                current[i] ^= 1 << rnd.randrange(buckets)
        hint = sorted(touched)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=40),
    st.sampled_from([16, 256, 1024]),
    st.randoms(use_true_random=False),
)
def test_the_scan_for_few_free_buckets_gives_what_the_walk_gives(
    weights: list[int], buckets: int, rnd: random.Random
) -> None:
    """`_fill` finds a node's next free bucket by a scan of the free ones when there are few,
    by a walk along its preferences otherwise: the assignment is the same either way."""
    members = tuple((f"node{i:02d}", w) for i, w in enumerate(weights))
    keep = rnd.random()
    current = tuple(
        m & rnd.getrandbits(buckets) if rnd.random() < keep else 0
        for m in assign(members, buckets).masks
    )
    results = []
    default = assignment_module._SCAN_FREE
    try:
        for scan in (0, buckets + 1):  # always walk, always scan
            assignment_module._SCAN_FREE = scan
            results.append(rebalance.__wrapped__(members, current, buckets, members))
    finally:
        assignment_module._SCAN_FREE = default
    assert results[0] == results[1]


def test_quotas() -> None:
    assert quotas([1, 1, 1], 256) == ([85, 85, 85], [86, 86, 86])
    assert quotas([1, 3], 256) == ([64, 192], [64, 192])
    with pytest.raises(ValueError, match="positive weight"):
        quotas([0], 16)
    lo, hi = quotas([3, 5, 7], 1000)
    assert sum(lo) <= 1000 <= sum(hi) and all(h - q <= 1 for q, h in zip(lo, hi, strict=True))
    assert math.isclose(sum(_costs("x", 4096)) / 4096, 1.0, rel_tol=0.1)  # Exp(1) costs
