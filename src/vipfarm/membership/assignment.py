"""Bucket assignment: who owns which bucket, given the UP nodes, their weights and what they own.

Every node computes the assignment on its own from what the heartbeats tell it: the UP set, the
weights and every UP node's owned-bucket bitmap. Nodes that see the same heartbeats compute the
same owners, so no coordination round is needed.

Theory of operation:

1. **Quotas.** Node i of weight w_i gets `lo_i = floor(B*w_i/W)` or `hi_i = ceil(B*w_i/W)`
   buckets, so every node is within one bucket of its weighted ideal share. Exactly
   `B - sum(lo)` "tickets" let that many nodes go from lo to hi.
2. **Keep what is owned (history).** A bucket stays with its current owner while that owner is
   UP and within its quota. A node above its quota gives back only its excess; the tickets go
   first to nodes that already hold more than lo, in a fixed order (nodes with a ticket in the
   anchor, then a hash of the name; not the counts, so that a plan does not change half-way
   through its own handover). This moves exactly
   the minimum any balanced assignment allows (`min_moves`): the buckets of nodes that left, plus
   the excess of nodes whose quota shrank. A bucket two UP nodes claim (a healed split brain)
   stays with the lower name, the same priority the release rule of the core uses.
3. **Weighted rendezvous hashing with capacity caps (HRW)** hands out the free buckets. Every
   (node, bucket) pair has a cost `-ln(u)/w`, u uniform in (0, 1) from SHAKE-256 of the node name;
   pairs are visited cheapest first and a pair is taken when the bucket is free and the node is
   below its quota (or a ticket is left). One global order of pairs makes the result independent
   of any order of the nodes.
4. **Anchor.** While every live node runs the same configuration, the capped HRW assignment of
   the whole configured farm (configured weights) is the *anchor*. A node gives back buckets
   anchored to another UP node first and its own anchor buckets last, and HRW hands a free bucket
   to its anchor node before any other. A node that leaves the full farm and comes back gets
   its own buckets back (all, or all but one), and a cold start of the whole farm is the anchor.
   After long churn the layout may drift from the anchor: going back would cost moves. Without
   a common anchor (a configuration rollout in progress) only the costs decide.
5. **Plans.** A core keeps its latest result and recomputes only when the ownership changed in
   another way than progress along it (`on_plan`, `Planner`): during a handover each changed
   heartbeat would otherwise cost every node a full computation.

Why history: a pure function of the UP set cannot be both within one bucket of every share and
move only the minimum on every join and leave. A function that never moves a bucket unless its
owner left is a fixed ranking of the nodes per bucket (plain rendezvous hashing), which is not
balanced; the previous, anchored pure function measured 32-55 % above the minimum once nodes
were already down (docs/MEMBERSHIP.md).
The current owners are in every heartbeat, so using them keeps the assignment a deterministic
function of what every node sees: when the network is quiet all nodes compute the same result, and
a balanced state is a fixed point (nothing moves).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from vipfarm.membership.wire import bits_of

Members = tuple[tuple[str, int], ...]
"""UP nodes as (name, weight), sorted by name; weight-0 nodes take no buckets."""

_ANCHOR_BONUS = 1e9  # larger than any cost (-ln(2**-64) / 1 < 45): anchor pairs come first
_SCAN_FREE = 32  # with at most this many free buckets, _fill finds a node's next one by a scan
# A node's preferences (`_prefs`): buckets in its order, their costs and anchor bonuses in that
# order, and per bucket its position in the order.
_Prefs = tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[int, ...]]


@lru_cache(maxsize=1024)
def _costs(name: str, buckets: int) -> tuple[float, ...]:
    """-ln(u) per bucket for one node: exponentially distributed, independent per bucket."""
    raw = hashlib.shake_256(b"vipfarm-bucket\0" + name.encode()).digest(8 * buckets)
    return tuple(-math.log((x + 0.5) / 2.0**64) for x in struct.unpack(f"<{buckets}Q", raw))


@lru_cache(maxsize=1024)
def _ticket_rank(name: str) -> bytes:
    """Fixed order in which nodes above lo keep their ticket (a hash, so not always the same
    names first)."""
    return hashlib.shake_256(b"vipfarm-ticket\0" + name.encode()).digest(8)


def quotas(weights: Sequence[int], buckets: int) -> tuple[list[int], list[int]]:
    """(lo, hi) bucket counts per node: floor and ceiling of the weighted ideal share."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("quotas need at least one node with a positive weight")
    lo = [buckets * w // total for w in weights]
    hi = [q + (1 if buckets * w % total else 0) for q, w in zip(lo, weights, strict=True)]
    return lo, hi


def _fill(
    members: Members,
    free: int,
    counts: list[int],
    buckets: int,
    anchor: Members | None = None,
) -> list[int]:
    """Give every bucket of bitmap `free` to a member: capped weighted HRW, cheapest pair first.

    Returns one bitmap per member and updates `counts`. Pairs (node, bucket) are taken in the
    order of their cost, a bucket anchored to the node first (see `_prefs`); a pair is taken
    when the bucket is free and the node below its quota or a ticket is left. Instead of sorting
    every pair, each node with room walks its own cached preference list, and a heap holds one
    candidate per node: the same greedy order, but the usual case (a few free buckets, a few
    nodes with room) costs a few heap operations, not a sort of nodes x buckets.
    """
    lo, hi = quotas([w for _, w in members], buckets)
    tickets = buckets - sum(max(q, c) for q, c in zip(lo, counts, strict=True))
    got = [0] * len(members)
    is_free = bytearray(buckets)
    free_now = bits_of(free)  # the free buckets, for the scan below
    for b in free_now:
        is_free[b] = 1
    left = len(free_now)
    heap: list[tuple[float, int]] = []
    # Per node with room: its preference list, each position's cost and anchor bonus, each
    # bucket's position, and where its walk stands (the candidate in the heap).
    walks: list[_Prefs] = []
    pos = [0] * len(members)
    inv = [1.0 / w for _, w in members]
    for i, (name, _) in enumerate(members):
        c = counts[i]
        if not (left and (c < lo[i] or (c < hi[i] and tickets > 0))):
            walks.append(((), (), (), ()))  # full: never a candidate
            continue
        order, cost, bonus, rank = walk = _prefs(name, anchor, buckets)
        walks.append(walk)
        # The node's first free bucket in its order. Buckets behind its walk are never free
        # again, so that is also the free bucket of lowest position: with few free buckets
        # (a node left), finding that minimum in C beats walking past the taken ones.
        if left <= _SCAN_FREE:
            p = min(map(rank.__getitem__, free_now))
        else:
            p = 0
            while not is_free[order[p]]:
                p += 1
        pos[i] = p
        heap.append((cost[p] * inv[i] - bonus[p], i))
    heapq.heapify(heap)
    while left:
        _, i = heapq.heappop(heap)
        order, cost, bonus, rank = walks[i]
        p = pos[i]
        b = order[p]
        if is_free[b]:
            c = counts[i]
            if c >= lo[i]:
                if c >= hi[i] or tickets <= 0:
                    continue  # full for good: counts only grow and tickets only shrink
                tickets -= 1
            is_free[b] = 0
            free_now.remove(b)
            got[i] |= 1 << b
            counts[i] = c + 1
            left -= 1
            if not left:
                break
        # Next candidate of this node (its bucket was taken by another node, or by itself).
        if left <= _SCAN_FREE:
            p = min(map(rank.__getitem__, free_now))
        else:
            while not is_free[order[p]]:
                p += 1
        pos[i] = p
        heapq.heappush(heap, (cost[p] * inv[i] - bonus[p], i))
    return got


@lru_cache(maxsize=64)
def _plain(members: Members, buckets: int) -> tuple[int, ...]:
    """Capped HRW of `members` from scratch, as bitmaps."""
    return tuple(_fill(members, (1 << buckets) - 1, [0] * len(members), buckets))


@lru_cache(maxsize=64)
def _anchored(anchor: Members, buckets: int) -> dict[str, int]:
    """Anchor buckets of every configured node of positive weight, as bitmaps."""
    active = tuple((n, w) for n, w in anchor if w > 0)
    return (
        {n: m for (n, _), m in zip(active, _plain(active, buckets), strict=True)} if active else {}
    )


@lru_cache(maxsize=4096)
def _prefs(name: str, anchor: Members | None, buckets: int) -> _Prefs:
    """Buckets in the order node `name` prefers them (its anchor buckets, then by cost; a node's
    own order does not depend on its weight), with each one's cost and anchor bonus, and the
    position of every bucket in that order."""
    cost = _costs(name, buckets)
    home = _anchored(anchor, buckets).get(name, 0) if anchor else 0
    order = tuple(sorted(range(buckets), key=lambda b: (not home >> b & 1, cost[b])))
    rank = [0] * buckets
    for p, b in enumerate(order):
        rank[b] = p
    return (
        order,
        tuple(cost[b] for b in order),
        tuple(_ANCHOR_BONUS if home >> b & 1 else 0.0 for b in order),
        tuple(rank),
    )


@dataclass(frozen=True, slots=True)
class Assignment:
    """Owners of all buckets for one UP set: `masks[i]` is the bitmap of member i's buckets."""

    members: Members
    masks: tuple[int, ...]
    buckets: int

    @property
    def owners(self) -> tuple[int, ...]:
        """Per bucket, the index of its owner in `members`, or -1."""
        out = [-1] * self.buckets
        for i, mask in enumerate(self.masks):
            for b in bits_of(mask):
                out[b] = i
        return tuple(out)

    def mask(self, name: str) -> int:
        """Bitmap of the buckets `name` owns (0 for a node that is not a member)."""
        for i, (n, _) in enumerate(self.members):
            if n == name:
                return self.masks[i]
        return 0

    def owner_names(self) -> list[str | None]:
        return [self.members[o][0] if o >= 0 else None for o in self.owners]

    def counts(self) -> list[int]:
        return [m.bit_count() for m in self.masks]


@lru_cache(maxsize=256)
def rebalance(
    members: Members, current: tuple[int, ...], buckets: int, anchor: Members | None = None
) -> Assignment:
    """The assignment for UP nodes `members` (sorted (name, weight) pairs) that keeps as much of
    `current` (per member, the bitmap of buckets it owns now) as balance allows.

    `anchor` is the whole configured farm with configured weights (see the module docstring);
    None means no anchor. Weight-0 members own nothing. Bitmaps make the usual case (nothing
    or a few buckets to move) cost O(members), not O(buckets): every node runs this whenever a
    heartbeat shows a changed ownership.
    """
    if len(current) != len(members):
        raise ValueError(f"{len(current)} ownership bitmaps for {len(members)} members")
    idx = [i for i, (_, w) in enumerate(members) if w > 0]
    out = [0] * len(members)
    if not idx:
        return Assignment(members, tuple(out), buckets)
    active = tuple(members[i] for i in idx)
    everything = (1 << buckets) - 1
    taken = 0
    held = []
    for i in idx:  # members are sorted: a double claim stays with the lower name
        mine = current[i] & everything & ~taken
        taken |= mine
        held.append(mine)
    counts = [m.bit_count() for m in held]
    lo, hi = quotas([w for _, w in active], buckets)
    home = _anchored(anchor, buckets) if anchor else {}
    # Nodes that hold a ticket in the anchor keep it first: a node that leaves and comes back
    # then restores the anchor more often (exactly in 69 % of the cases measured, else one
    # bucket away; without this 35 %).
    eligible = [i for i in range(len(active)) if counts[i] > lo[i] < hi[i]]
    eligible.sort(
        key=lambda i: (
            home.get(active[i][0], 0).bit_count() <= lo[i],
            _ticket_rank(active[i][0]),
        )
    )
    quota = lo[:]
    for i in eligible[: buckets - sum(lo)]:
        quota[i] = hi[i]
    away = 0  # buckets anchored to a configured node that is not an active member
    names = {n for n, _ in active}
    for n, m in home.items():
        if n not in names:
            away |= m
    for i, mine in enumerate(held):
        excess = counts[i] - quota[i]
        if excess <= 0:
            continue
        cost = _costs(active[i][0], buckets)
        own = home.get(active[i][0], 0)

        def keep(b: int, own: int = own, cost: tuple[float, ...] = cost) -> tuple[int, float]:
            # Own anchor buckets are kept first, buckets whose anchor node is away next.
            return (0 if own >> b & 1 else 1 if away >> b & 1 or not home else 2), cost[b]

        for b in sorted(bits_of(mine), key=keep)[-excess:]:
            taken &= ~(1 << b)
            held[i] &= ~(1 << b)
        counts[i] = quota[i]
    free = everything & ~taken
    if free:
        for i, mask in enumerate(_fill(active, free, counts, buckets, anchor)):
            held[i] |= mask
    for i, mine in zip(idx, held, strict=True):
        out[i] = mine
    return Assignment(members, tuple(out), buckets)


def assign(members: Members, buckets: int, anchor: Members | None = None) -> Assignment:
    """The assignment of a farm in which nobody owns anything yet (a cold start)."""
    return rebalance(members, (0,) * len(members), buckets, anchor)


def _claims(masks: Sequence[int]) -> tuple[int, int]:
    """(buckets claimed by any of `masks`, buckets claimed by two or more)."""
    seen = twice = 0
    for m in masks:
        twice |= seen & m
        seen |= m
    return seen, twice


def on_plan(before: Sequence[int], after: Sequence[int], plan: Assignment) -> bool:
    """True when going from ownership `before` to `after` (bitmaps per member) only carried out
    part of `plan` = `rebalance(members, before, ...)`; `rebalance(members, after, ...)` is then
    `plan` again. Allowed steps: a node released buckets the plan takes from it and that no
    other member holds, or acquired buckets the plan gives it that no other member holds.

    Why the plan stays the same: a release lowers a count only down to the node's quota, so the
    nodes that keep a ticket (a fixed order of names, cut at the number of tickets) do not
    change, and what is left to shed is what was left of the shed list. An acquisition of
    planned buckets is a decision of the capped greedy committed early: every pair that greedy
    still takes finds its bucket free and its node with room, and a ticket the acquiring node
    took early is one it would have taken later, so every other node still finds its ticket.
    """
    seen, twice = _claims(after)
    handed = 0
    for b, a, p in zip(before, after, plan.masks, strict=True):
        handed |= a & ~b & p
    for b, a, p in zip(before, after, plan.masks, strict=True):
        if a == b:
            continue
        gained, lost = a & ~b, b & ~a
        # A lost bucket that another member still claims would pass to that member, unless
        # that member is the one the plan hands it to.
        if (lost & p) or (lost & seen & ~handed) or (gained & ~p) or (gained & twice):
            return False
    return True


class Planner:
    """One node's latest plan: `rebalance` is only called again when the ownership changed in
    another way than progress along the plan (`on_plan`). During a handover most changed
    heartbeats are such progress, and every node sees them in a different combination, so a
    shared cache would miss.

    The usual change is one node's heartbeat: for that the planner keeps the union of all
    claims and the buckets claimed twice, so the check costs a few bitmap operations instead
    of a pass over every member. A step that touches only buckets nobody else claims leaves
    the buckets claimed twice as they are."""

    __slots__ = ("_current", "_key", "_plan", "_twice", "_union")

    def __init__(self) -> None:
        self._key: tuple[Members, int, Members | None] | None = None
        self._current: tuple[int, ...] = ()
        self._plan: Assignment | None = None
        self._union: int | None = None  # of _current; None until a single change needs it
        self._twice = 0

    def plan(
        self,
        members: Members,
        current: tuple[int, ...],
        buckets: int,
        anchor: Members | None,
        changed: Sequence[int] | None = None,
    ) -> Assignment:
        """`rebalance(members, current, buckets, anchor)`, or the latest plan when `current`
        only progressed along it. `changed`, if given, holds (once each) every position whose
        bitmap may differ from the previous call's: only those are compared."""
        key = (members, buckets, anchor)
        plan = self._plan
        if plan is None or key != self._key or not self._progress(current, plan, changed):
            plan = self._plan = rebalance(members, current, buckets, anchor)
            self._key = key
            self._union = None
        self._current = current
        return plan

    def _progress(
        self, current: tuple[int, ...], plan: Assignment, hint: Sequence[int] | None
    ) -> bool:
        before = self._current
        if hint is None:
            changed = [i for i, (a, b) in enumerate(zip(current, before, strict=True)) if a != b]
        else:
            changed = [i for i in hint if current[i] != before[i]]
        if len(changed) != 1:
            self._union = None
            return not changed or on_plan(before, current, plan)
        j = changed[0]
        if self._union is None:
            self._union, self._twice = _claims(before)
        b, a, p = before[j], current[j], plan.masks[j]
        others = (self._union & ~b) | (self._twice & b)  # claimed by another member
        # on_plan for one member: release only what the plan takes away, take only what it
        # gives, and nobody else claims a bucket that changed hands.
        if (b & ~a & p) or (a & ~b & ~p) or ((a ^ b) & others):
            self._union = None
            return False
        self._union = others | a
        return True


def balanced(owners: Sequence[str | None], members: Members, buckets: int) -> str | None:
    """Why `owners` is not a settled assignment of `members`, or None: every bucket has an
    owner among the members of positive weight, each within its quota."""
    active = [(n, w) for n, w in members if w > 0]
    if not active:
        extra = [b for b, o in enumerate(owners) if o is not None]
        return f"buckets {extra} have owners, but no member has a weight" if extra else None
    count: dict[str | None, int] = {}
    for o in owners:
        count[o] = count.get(o, 0) + 1
    lo, hi = quotas([w for _, w in active], buckets)
    for (n, _), a, b in zip(active, lo, hi, strict=True):
        if not a <= count.get(n, 0) <= b:
            return f"{n} owns {count.get(n, 0)} buckets, quota {a}..{b}"
    stray = sorted(set(count) - {n for n, _ in active}, key=str)
    return f"buckets owned by {stray}, not by a member" if stray else None


def min_moves(old: Sequence[str | None], members: Members, buckets: int) -> int:
    """Fewest buckets that must change owner to go from owners `old` to any balanced assignment
    of `members` (the yardstick for "moves only what must move")."""
    active = [(n, w) for n, w in members if w > 0]
    if not active:
        return sum(1 for o in old if o is not None)
    lo, hi = quotas([w for _, w in active], buckets)
    count: dict[str | None, int] = {}
    for o in old:
        count[o] = count.get(o, 0) + 1
    names = {n for n, _ in active}
    must = sum(c for o, c in count.items() if o not in names)
    savings = []
    for i, (n, _) in enumerate(active):
        c = count.get(n, 0)
        must += max(0, c - lo[i])
        if hi[i] > lo[i]:
            savings.append(max(0, c - lo[i]) - max(0, c - hi[i]))
    savings.sort(reverse=True)
    return must - sum(savings[: buckets - sum(lo)])


def moved(old: Sequence[str | None], new: Sequence[str | None]) -> int:
    """Buckets whose owner differs between two owner lists."""
    return sum(1 for a, b in zip(old, new, strict=True) if a != b)


def masks_of(owners: Sequence[str | None], members: Members) -> tuple[int, ...]:
    """Per member, the bitmap of the buckets `owners` gives it (input of `rebalance`)."""
    pos = {n: i for i, (n, _) in enumerate(members)}
    out = [0] * len(members)
    for b, o in enumerate(owners):
        i = pos.get(o) if o is not None else None
        if i is not None:
            out[i] |= 1 << b
    return tuple(out)
