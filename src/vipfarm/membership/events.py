"""Events the membership core hands to its driver (`Membership.next_event()`), and its snapshot.

Plain frozen dataclasses. The daemon acts on `BucketsChanged` (apply to the kernel, then call
`confirm_owned`) and `Drained` (let connections finish, stop the application, call `stopped`);
the rest are for logs, metrics and the web console.
"""

from __future__ import annotations

from dataclasses import dataclass

from vipfarm.membership.wire import NodeState


@dataclass(frozen=True, slots=True)
class BucketsChanged:
    """Make the kernel hold exactly `owned`: drop `release`, add `acquire`.

    Release-before-acquire across nodes is the core's job: a bucket in `acquire` is already
    released by every live peer. Call `confirm_owned` with what the kernel holds afterwards.
    """

    release: frozenset[int]
    acquire: frozenset[int]
    owned: frozenset[int]


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: NodeState
    new: NodeState


@dataclass(frozen=True, slots=True)
class Drained:
    """Every bucket is given away and the kernel confirmed it: stop the application now."""


@dataclass(frozen=True, slots=True)
class PeerUp:
    name: str
    incarnation: int
    restarted: bool  # a new incarnation of a peer that was alive: its daemon restarted


@dataclass(frozen=True, slots=True)
class PeerDown:
    name: str


@dataclass(frozen=True, slots=True)
class NetworkLost:
    """A peer is silent on one heartbeat network but alive on another: a warning only."""

    name: str
    network: str


@dataclass(frozen=True, slots=True)
class NetworkRestored:
    name: str
    network: str


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """The UP set changed. `anchored` tells whether the configured farm anchors the assignment
    (False while live nodes run different configurations)."""

    members: tuple[tuple[str, int], ...]
    anchored: bool


@dataclass(frozen=True, slots=True)
class SplitBrainDetected:
    """Live nodes claim the same buckets (after a partition healed, or a hung daemon woke up)."""

    buckets: frozenset[int]
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SplitBrainHealed:
    pass


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The daemon did not send a heartbeat for longer than the lease (it hung or was paused):
    the kernel has dropped every bucket by now, so the core releases all and relearns the farm."""

    silent_s: float


Event = (
    BucketsChanged
    | StateChanged
    | Drained
    | PeerUp
    | PeerDown
    | NetworkLost
    | NetworkRestored
    | ViewChanged
    | SplitBrainDetected
    | SplitBrainHealed
    | LeaseLost
)


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node of the farm as the core sees it (`Snapshot.nodes`)."""

    name: str
    is_self: bool
    state: str | None  # the latest heartbeat's state; None if never heard
    alive: bool
    share: float  # % of the buckets it owns (0 for a dead peer)
    incarnation: int | None
    weight: int
    heartbeat_age_ms: dict[str, float | None]  # per heartbeat network; None if never heard


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The farm as this node's core sees it (`Membership.snapshot`): for state and metrics."""

    farm: str
    node: str
    state: str
    members: tuple[tuple[str, int], ...]
    owned: tuple[int, ...]
    wanted: tuple[int, ...]
    split_brain: bool
    drops: dict[str, int]
    nodes: tuple[NodeView, ...]
