"""Bucket assignment: who owns which bucket, as a pure function of the UP nodes and their weights.

Every node computes the assignment on its own from what the heartbeats tell it; nodes that see
the same UP set compute the same owners, so no coordination round is needed.

Theory of operation:

1. **Quotas.** Node i of weight w_i gets `lo_i = floor(B*w_i/W)` or `hi_i = ceil(B*w_i/W)`
   buckets, so every node is within one bucket of its weighted ideal share. Exactly
   `B - sum(lo)` "tickets" let that many nodes go from lo to hi; the assignment hands them out.
2. **Weighted rendezvous hashing with capacity caps (HRW).** Every (node, bucket) pair has a cost
   `-ln(u)/w`, u uniform in (0, 1) from SHAKE-256 of the node name; the smallest cost wins, which
   is weighted rendezvous hashing. Pairs are visited cheapest first and a pair is taken when the
   bucket is free and the node is below its quota (or a ticket is left). One global order of
   pairs makes the result independent of any order of the nodes.
3. **Anchoring.** Capped HRW alone moves 70-130 % more buckets than necessary when one node
   joins or leaves (the caps of every node shift and some overflow buckets return; see
   docs/MEMBERSHIP.md for the measurements). So when every live node runs the same configuration,
   the assignment is anchored on the *configured* farm: compute capped HRW once for all
   configured nodes (configured weights), let every UP node keep its anchor buckets (up to its
   quota), and spread only the buckets of the nodes that are not UP, by capped HRW again. One node
   leaving a full farm then moves exactly its own buckets, and coming back moves them back. With
   k nodes down, only buckets of those k nodes can move in addition. Without a common anchor
   (configuration rollout in progress) the assignment is plain capped HRW over the UP set.

Exact balance and exactly minimal movement for *every* subset at once is impossible for any
function of the UP set alone (a choice rule that never moves a bucket unless its owner left is a
fixed ranking per bucket, i.e. plain rendezvous hashing, which is not balanced); anchoring makes
the common cases exact instead.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

Members = tuple[tuple[str, int], ...]
"""UP nodes as (name, weight), sorted by name; weight-0 nodes take no buckets."""


@lru_cache(maxsize=1024)
def _costs(name: str, buckets: int) -> tuple[float, ...]:
    """-ln(u) per bucket for one node: exponentially distributed, independent per bucket."""
    raw = hashlib.shake_256(b"vipfarm-bucket\0" + name.encode()).digest(8 * buckets)
    return tuple(-math.log((x + 0.5) / 2.0**64) for x in struct.unpack(f"<{buckets}Q", raw))


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
    owners: list[int],
    free: Sequence[int],
    counts: list[int],
    buckets: int,
) -> None:
    """Give every bucket in `free` to a member: capped weighted HRW, cheapest pair first.

    The pairs are one flat list of costs sorted by index: no tuple per pair, which measured
    faster in CPython than tuples or a lazy heap of per-bucket proposals.
    """
    lo, hi = quotas([w for _, w in members], buckets)
    tickets = buckets - sum(max(q, c) for q, c in zip(lo, counts, strict=True))
    flat: list[float] = []
    for name, w in members:
        cost = _costs(name, buckets)
        flat.extend([cost[b] / w for b in free])
    nfree = len(free)
    left = nfree
    for k in sorted(range(len(flat)), key=flat.__getitem__):
        i, j = divmod(k, nfree)
        b = free[j]
        if owners[b] >= 0:
            continue
        c = counts[i]
        if c >= lo[i]:
            if c >= hi[i] or tickets <= 0:
                continue
            tickets -= 1
        owners[b] = i
        counts[i] = c + 1
        left -= 1
        if not left:
            return
    raise AssertionError("capped HRW left buckets unassigned")  # pragma: no cover - invariant


@lru_cache(maxsize=64)
def _plain(members: Members, buckets: int) -> tuple[int, ...]:
    owners = [-1] * buckets
    _fill(members, owners, range(buckets), [0] * len(members), buckets)
    return tuple(owners)


@dataclass(frozen=True, slots=True)
class Assignment:
    """Owners of all buckets for one UP set. `owners[b]` indexes `members`, or is -1."""

    members: Members
    owners: tuple[int, ...]
    masks: tuple[int, ...]  # per member: bitmap of its buckets

    @classmethod
    def of(cls, members: Members, owners: Sequence[int]) -> Assignment:
        masks = [0] * len(members)
        for b, o in enumerate(owners):
            if o >= 0:
                masks[o] |= 1 << b
        return cls(members, tuple(owners), tuple(masks))

    def mask(self, name: str) -> int:
        """Bitmap of the buckets `name` owns (0 for a node that is not a member)."""
        for i, (n, _) in enumerate(self.members):
            if n == name:
                return self.masks[i]
        return 0

    def owner_names(self) -> list[str | None]:
        return [self.members[o][0] if o >= 0 else None for o in self.owners]

    def counts(self) -> list[int]:
        out = [0] * len(self.members)
        for o in self.owners:
            if o >= 0:
                out[o] += 1
        return out


@lru_cache(maxsize=256)
def assign(members: Members, buckets: int, anchor: Members | None = None) -> Assignment:
    """The assignment for UP nodes `members` (sorted (name, weight) pairs).

    `anchor` is the whole configured farm with configured weights (see the module docstring);
    None means plain capped HRW over `members`. Weight-0 members own nothing.
    """
    active = tuple((n, w) for n, w in members if w > 0)
    if not active:
        return Assignment.of(members, (-1,) * buckets)
    index = {n: members.index((n, w)) for n, w in active}
    anchor_active = tuple((n, w) for n, w in anchor if w > 0) if anchor else ()
    if not anchor_active or anchor_active == active:
        plain = _plain(active, buckets)
        return Assignment.of(members, [index[active[o][0]] for o in plain])
    base = _plain(anchor_active, buckets)
    pos = {n: i for i, (n, _) in enumerate(active)}
    lo, hi = quotas([w for _, w in active], buckets)
    kept: list[list[int]] = [[] for _ in active]
    for b, o in enumerate(base):
        i = pos.get(anchor_active[o][0], -1)
        if i >= 0:
            kept[i].append(b)
    for i, (name, _) in enumerate(active):
        cost = _costs(name, buckets)
        # Best first; a node whose weight dropped below its configured one keeps its best.
        kept[i] = sorted(kept[i], key=cost.__getitem__)[: hi[i]]
    # Fewer tickets than anchor nodes holding one: the nodes whose weakest bucket is the
    # least attached (highest cost) give a bucket back.
    excess = sum(max(q, len(k)) for q, k in zip(lo, kept, strict=True)) - buckets
    if excess > 0:
        over = [i for i in range(len(active)) if len(kept[i]) > lo[i]]
        over.sort(key=lambda i: -_costs(active[i][0], buckets)[kept[i][-1]] / active[i][1])
        for i in over[:excess]:
            kept[i].pop()
    owners = [-1] * buckets
    counts = [len(k) for k in kept]
    for i, mine in enumerate(kept):
        for b in mine:
            owners[b] = i
    free = [b for b in range(buckets) if owners[b] < 0]
    if free:
        _fill(active, owners, free, counts, buckets)
    return Assignment.of(members, [index[active[o][0]] for o in owners])


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
