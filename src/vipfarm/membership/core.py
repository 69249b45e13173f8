"""The membership core: sans-I/O heartbeat membership and safe bucket handover.

The core never touches a socket, a clock or the kernel (in the style of aioquic). The daemon
feeds it datagrams and the time, sends what it returns, and applies the events it emits:

    core.receive_datagram(data, network, now)     # never raises
    core.handle_timer(now)                        # when now >= core.get_timer()
    for network, payload in core.datagrams_to_send(now): send payload to every peer on network
    while (ev := core.next_event()) is not None: act on ev (BucketsChanged -> kernel, then
                                                  core.confirm_owned(kernel buckets, now))

Theory of operation (docs/MEMBERSHIP.md has the long version and the safety argument):

- **Liveness.** Every node sends a heartbeat every `interval` on every heartbeat network. A peer
  is alive while a valid heartbeat arrived on some network within `dead_after`. A peer that is
  silent towards us but that another live peer reports hearing within two intervals (the
  heartbeat's "fresh" bitmap, gathered at every heartbeat we send) is not declared dead: a
  lossy link is not a failover. Nor is it while no peer could have vouched (every other peer
  silent towards us for two intervals too: the loss is ours), for at most two intervals more.
  Both only delay a death, by at most two one-way delays for a real crash heard by others.
  Silence on one network while another works is a warning (`NetworkLost`).
- **Assignment.** The UP set (self and live peers whose latest heartbeat says UP), the weights
  and what every UP node owns now (its heartbeat's `owned`, our own kernel set) determine every
  bucket's owner (`assignment.rebalance`): owners keep their buckets within their quota, only the
  minimum moves, and free buckets go to their anchor node (the configured farm's assignment,
  while every live node advertises the same configuration digest) or by capped HRW.
- **Release before acquire.** A heartbeat carries `owned` (every bucket this node's kernel holds
  or may hold: confirmed buckets plus acquisitions not yet confirmed, and released buckets until
  the release is confirmed) and `want` (buckets it is waiting to acquire). A node releases what
  it should no longer own at once. It acquires a wanted bucket b only when the latest heartbeat
  of every live peer (1) acknowledges a heartbeat of ours that already wanted b, (2) does not
  own b, and (3) does not want b unless we have priority (lower node name). A claim (want, then
  owned) is continuous from its first heartbeat to its release, so two nodes can never both pass
  this test for one bucket while they hear each other; dead peers are ignored because their
  kernel leases (lease < dead_after) expired before we noticed.
- **Split brain.** Nodes that cannot hear each other each take the missing buckets. When they
  hear each other again, a double claim is reported and resolved: a node releases a bucket that
  a live peer with priority also holds, and the normal handover then gives it to its assigned
  owner.
- **Hung daemon.** If no heartbeat was sent for longer than `lease`, the kernel leases have
  expired: the core releases everything (`LeaseLost`) and listens for `dead_after` again before
  claiming anything.
- **Goodbye.** A node that stopped and holds nothing says so (`shutdown`), and peers stop
  waiting for it at once.
- **Fresh incarnations.** A node that restarted remembers no peer, so a recorded heartbeat
  would pass every sequence check. A newer incarnation of a peer (or the first one heard) counts
  only once one of its heartbeats acknowledges our *current* incarnation; until then it is held
  (`_hold`: no liveness, claim, acknowledgement or goodbye; it does not supersede the proven
  one). Heartbeats carry a need list (peers not proven yet), and a node acknowledges every peer
  that lists it, at once: the proof costs one quick round trip. A held heartbeat's claims delay
  ours for at most dead_after (`_unproven_block`). Version 1 heartbeats (rolling upgrade) predate
  the proof and count as proven; a node sends the lowest version a live peer speaks.
- **Keys.** The codec holds the farm key and, during a rotation, the next one; heartbeats name
  their key, and the core sends with the next key once every peer heard advertises it.
- **Timers.** `get_timer()` is the next heartbeat, the end of a listening period, or the
  earliest peer deadline, and never late. The receive path is O(1) and touches little memory
  (the simulator runs 26 million receptions per 10 minutes of 64 nodes): a heartbeat from a
  live peer stores the time in the peer's slot of a list, from which C computes the earliest
  deadline when it may come before the next heartbeat; a peer heard again since may leave the
  timer early, and `handle_timer` then finds nothing due. An unchanged claim is one byte-string
  comparison.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from vipfarm.log import event as log_event
from vipfarm.membership import events as ev
from vipfarm.membership.assignment import Members, Planner
from vipfarm.membership.states import Trigger, next_state
from vipfarm.membership.wire import (
    DELIVERY_VERSION,
    MAX_ACKS,
    MAX_NAME_BYTES,
    MIN_VERSION,
    VERSION,
    Ack,
    Codec,
    Drop,
    Heartbeat,
    NodeState,
    bits_of,
    config_digest,
    farm_id,
    mask_of,
    node_id,
)

log = logging.getLogger(__name__)

MAX_WEIGHT: Final = 65535
_FRESH_INTERVALS: Final = 2  # a peer heard within this many intervals is reported fresh
_TRIGGER_FRACTION: Final = 20  # extra heartbeats are at least interval/20 apart
_CLAIM_SPEEDUP: Final = 4  # heartbeat period divisor while buckets are wanted


@dataclass(frozen=True)
class MembershipConfig:
    """What the daemon knows from the farm configuration; validated at construction."""

    farm: str
    node: str
    key: bytes
    nodes: Mapping[str, int]  # every configured node (self included) -> configured weight
    networks: tuple[str, ...] = ("lan",)
    buckets: int = 256
    interval: float = 0.1
    dead_after: float = 0.5
    lease: float = 0.3
    next_key: bytes | None = None  # the key being rolled out (accepted; sent once peers have it)
    nodes_sorted: tuple[tuple[str, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.farm:
            raise ValueError("farm name is empty: set the farm name in the configuration")
        if not self.nodes:
            raise ValueError("the farm has no nodes: list at least this node")
        if len(self.nodes) > MAX_ACKS:
            raise ValueError(f"{len(self.nodes)} nodes configured; a farm has at most {MAX_ACKS}")
        for name, weight in self.nodes.items():
            size = len(name.encode())
            if not 1 <= size <= MAX_NAME_BYTES:
                raise ValueError(
                    f"node name {name!r} is {size} bytes of UTF-8; use 1..{MAX_NAME_BYTES} bytes"
                )
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ValueError(f"weight of node {name!r} is {weight!r}; use an integer")
            if not 0 <= weight <= MAX_WEIGHT:
                raise ValueError(
                    f"weight {weight} of node {name!r} is out of range: use 0..{MAX_WEIGHT} "
                    "(0 = the node takes no buckets)"
                )
        if self.node not in self.nodes:
            raise ValueError(
                f"this node {self.node!r} is not among the configured nodes "
                f"{sorted(self.nodes)}: add it or fix the node name"
            )
        ids: dict[int, str] = {}
        for name in self.nodes:
            other = ids.setdefault(node_id(name), name)
            if other != name:
                raise ValueError(
                    f"node names {other!r} and {name!r} hash to the same id: rename one"
                )
        if (
            not self.networks
            or len(set(self.networks)) != len(self.networks)
            or "" in self.networks
        ):
            raise ValueError(
                f"heartbeat networks {list(self.networks)!r} must be a non-empty list of "
                "distinct names"
            )
        if not 1 <= self.buckets <= 4096:
            raise ValueError(f"bucket count {self.buckets} is out of range: use 1..4096")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"interval {self.interval} s must be a positive number of seconds")
        if not self.interval < self.lease < self.dead_after:
            raise ValueError(
                f"timers must satisfy interval < lease < dead_after, got interval={self.interval} "
                f"lease={self.lease} dead_after={self.dead_after}: the lease must outlive one "
                "heartbeat interval and expire before peers declare the node dead "
                "(defaults: 0.1 < 0.3 < 0.5)"
            )
        object.__setattr__(self, "nodes_sorted", tuple(sorted(self.nodes.items())))


def _shift(counts: list[int], union: int, old: int, new: int) -> int:
    """One member of a tally goes from bitmap `old` to `new`: update the per-bucket counts and
    return the new union (the buckets counted at least once)."""
    for b in bits_of(old & ~new):
        counts[b] -= 1
        if not counts[b]:
            union &= ~(1 << b)
    for b in bits_of(new & ~old):
        if not counts[b]:
            union |= 1 << b
        counts[b] += 1
    return union


class _Peer:
    __slots__ = (
        "alive",
        "cand",
        "cand_heard",
        "cand_top",
        "counted",
        "hb",
        "hb_at",
        "heard",
        "id",
        "incarnation",
        "index",
        "indirect",
        "name",
        "need_ack",
        "net_heard",
        "net_lost",
        "net_seq",
        "prio",
        "seq",
        "slot",
        "version",
        "version_inc",
        "vouched",
    )

    def __init__(self, name: str, index: int, slot: int, prio: bool, networks: int) -> None:
        self.name = name
        self.id = node_id(name)
        self.index = index  # position in the sorted configured node list (fresh bitmap)
        self.slot = slot  # position among the peers (Membership._heard_at)
        self.prio = prio  # wins ties against us (lower name)
        self.alive = False
        self.vouched = False  # alive only because other peers still hear it
        self.hb: Heartbeat | None = None
        self.counted: Heartbeat | None = None  # whose claims the core's tallies hold (alive)
        self.incarnation = 0
        self.seq = 0  # latest applied heartbeat
        self.heard = -math.inf  # latest valid heartbeat, any network
        # When `hb` arrived, kept only with several networks (with one, it is `heard`): a late
        # copy of an older heartbeat refreshes `heard` but says nothing of `hb.fresh`.
        self.hb_at = -math.inf
        # Alive until indirect + dead_after without being heard: the latest time another
        # peer's heartbeat proved it alive (`_gather`), or, while no peer could have vouched,
        # the latest heartbeat of any other peer (`_suspect`).
        self.indirect = -math.inf
        self.net_seq = [0] * networks  # latest per network, kept only with several networks
        self.net_heard = [-math.inf] * networks
        self.net_lost = [True] * networks
        # The latest heartbeat of an incarnation newer than `incarnation` that is not proven
        # fresh yet (see Membership._hold), and when it came.
        self.cand: Heartbeat | None = None
        self.cand_heard = -math.inf
        self.cand_top = 0  # the highest unproven incarnation heard (a real restart is higher)
        # (incarnation, seq) of its latest heartbeat that lists us in its need list (we ack it).
        self.need_ack: tuple[int, int, float] | None = None  # and when it came
        self.version = 0  # highest protocol version heard from incarnation version_inc
        self.version_inc = 0


class Membership:
    """One node's membership core. See the module docstring for the protocol."""

    def __init__(self, config: MembershipConfig, incarnation: int, codec: Codec | None = None):
        if not 1 <= incarnation < 2**64:
            raise ValueError(
                f"incarnation {incarnation} is out of range: use 1..2**64-1, growing at every "
                "daemon start (e.g. the start time in milliseconds)"
            )
        self.config = config
        self.name = config.node
        self.incarnation = incarnation
        if codec is None:
            codec = Codec(config.farm, config.key, config.buckets, config.next_key)
        elif codec.buckets != config.buckets or codec.farm_id != farm_id(config.farm):
            raise ValueError(
                f"the codec is for another farm or bucket count ({codec.buckets} buckets); "
                f"share a codec only between cores of farm {config.farm!r} with "
                f"{config.buckets} buckets"
            )
        self._cached = codec.cached
        self._decode = codec.decode
        self._codec = codec
        self._id = codec.intern_id(node_id(config.node))
        self._digest = config_digest(dict(config.nodes), config.buckets)
        self._anchor: Members = config.nodes_sorted
        self._fresh_len = (len(config.nodes) + 7) // 8
        self._nets = {n: i for i, n in enumerate(config.networks)}
        self._net0 = config.networks[0]
        self._multi = len(config.networks) > 1
        self._dead_after = config.dead_after
        others = [(i, n) for i, (n, _) in enumerate(config.nodes_sorted) if n != config.node]
        self._peer_list = [
            _Peer(n, i, slot, n < config.node, len(config.networks))
            for slot, (i, n) in enumerate(others)
        ]
        for p in self._peer_list:
            p.id = codec.intern_id(p.id)  # the decoder's object: dict lookups match by identity
        self._peers = {p.id: p for p in self._peer_list}
        self._by_name = {p.name: p for p in self._peer_list}
        # The claims of the live peers, kept per change of a heartbeat's claim instead of a scan
        # of every live peer at every evaluation: per bucket, how many live peers own it, and
        # how many of those with priority own it and want it; and each tally's union.
        self._n_owned = [0] * config.buckets
        self._n_prio_owned = [0] * config.buckets
        self._n_prio_want = [0] * config.buckets
        self._others = 0  # owned by some live peer
        self._prio_owned = 0  # owned by a live peer with priority
        self._prio_want = 0  # wanted by a live peer with priority
        # Live peers heard directly within dead_after, and when each was last heard (any
        # network; +inf for the other peers), by slot: a heartbeat costs one list store, and the
        # earliest death deadline is min(_heard_at) + dead_after, which C computes quickly.
        # _heard_floor is that minimum when last computed: heard times only grow, so it stays a
        # lower bound (peers that join the direct set lower it themselves).
        self._direct: dict[int, _Peer] = {}
        self._heard_at = [math.inf] * len(self._peer_list)
        self._heard_floor = math.inf
        # With several networks, live peers ordered by last heard on each (network lost).
        self._by_net: list[OrderedDict[int, _Peer]] = [
            OrderedDict() for _ in (config.networks if self._multi else ())
        ]
        self._vouched: dict[int, _Peer] = {}
        self._direct_mask = 0  # config-index bitmap of the peers in _direct
        self._wanting: dict[int, _Peer] = {}  # live peers whose latest heartbeat wants buckets
        self._needing: dict[int, _Peer] = {}  # peers whose latest heartbeat needs our ack
        self._cands: dict[int, _Peer] = {}  # peers with an unproven newer incarnation
        self._low: dict[int, _Peer] = {}  # peers whose incarnation speaks an older version
        self._probe_until: float | None = None  # end of our first dead_after (see _version_now)
        self.drops: dict[str, int] = {}

        self.state = NodeState.STOP
        self.weight = config.nodes[config.node]
        self.app_healthy = False
        self._seq = 0
        self._held = 0  # confirmed by the daemon
        self._requested = 0  # what the kernel was asked to hold
        self._unconfirmed = False
        self._want = 0
        self._want_since: dict[int, int] = {}
        self._want_at: dict[int, float] = {}  # when each wanted bucket was first wanted
        self._cand_wake = math.inf  # when an unproven peer's block on a claim runs out
        self._learn_until = -math.inf
        self._view: tuple[Members, Members | None] | None = None
        self._view_dirty = True
        self._planner = Planner()
        self._plan_stale = True  # the view or a peer's owned buckets changed since _plan_mine
        self._plan_held = 0  # our own buckets when _plan_mine was computed
        self._plan_mine = 0  # our buckets in the latest plan
        # The plan's input, kept per change like the tallies: every member's owned bitmap by
        # its position in `_plan_members` (the view's members when they were laid out), and the
        # peers whose claims changed since the latest plan.
        self._plan_members: Members | None = None
        self._plan_pos: dict[str, int] = {}
        self._plan_cur: list[int] = []
        self._plan_touched: set[str] = set()
        self._split = False
        # Directed delivery: the buckets this node keeps but no longer owns, which the daemon
        # sets and every heartbeat then carries (wire.FLAG_KEPT); None in flood farms.
        self.kept: int | None = None
        # delivery = "auto": this node misses a live peer's flood probe (wire.FLAG_DEAF).
        self.deaf = False
        self._blocked = 0  # owned by a live peer, or claimed by one with priority
        self._blocker: _Peer | None = None  # a peer whose acknowledgement was missing
        self._events: deque[ev.Event] = deque()

        self._last_send: float | None = None
        self._next_send = -math.inf  # send at the first opportunity
        self._timer = -math.inf
        self._timer_dirty = True

    # ----------------------------------------------------------------- daemon-facing API
    def receive_datagram(self, data: bytes, network: str, now: float) -> bool | Drop:
        """Process one received datagram. Bad ones are counted in `drops`, ignored and
        returned as their `Drop` reason (truthy: test with `is False`/`isinstance`).

        Otherwise returns True when the datagram changed more than a peer's liveness, i.e. when
        events or an earlier timer may be pending; a driver may skip `next_event`/`get_timer` on
        False (the timer can then only have moved later).
        """
        got = self._cached(data) or self._decode(data)
        try:
            # The usual case, a heartbeat of a configured peer, in one subscript: a Drop has no
            # node_id, and neither our own id nor an unknown one is a key (try is free in 3.11).
            peer = self._peers[got.node_id]  # type: ignore[union-attr]
        except (AttributeError, KeyError):
            if not isinstance(got, Heartbeat):
                return self._count(got)
            return self._count(Drop.OWN if got.node_id == self._id else Drop.UNKNOWN_NODE)
        hb: Heartbeat = got  # type: ignore[assignment]  # a Drop raised above
        ni: int | None
        if network is self._net0:
            ni = 0  # the first network's own name object (a simulator's, a pulse's)
        else:
            ni = self._nets.get(network)
            if ni is None:
                return self._count(Drop.UNKNOWN_NETWORK)
        seq = hb.seq
        multi = self._multi
        if hb.incarnation != peer.incarnation:
            if hb.incarnation < peer.incarnation:
                return self._count(Drop.REPLAY)
            c = peer.cand
            if c is not None and c.incarnation == hb.incarnation and seq <= c.seq:
                return self._count(Drop.DUPLICATE if seq == c.seq else Drop.REPLAY)
            # A new incarnation counts only once it proves fresh: it acknowledges a heartbeat of
            # our own current incarnation, which did not exist before we started, so a recording
            # cannot (version 1 peers predate the proof: see docs/PROTOCOL.md).
            a = hb.acks.get(self._id)
            if hb.version > 1 and (a is None or a[0] != self.incarnation):
                return self._hold(peer, hb, now)
            self._new_incarnation(peer, hb)
        else:
            # With one network, the latest sequence number applied is that network's latest
            # (net_seq is kept only with several; this saves a list access per heartbeat).
            last = peer.net_seq[ni] if multi else peer.seq
            if seq <= last:
                return self._count(Drop.DUPLICATE if seq == last else Drop.REPLAY)
        peer.heard = now
        alive = peer.alive  # nothing below changes it before _bury/_revive
        if alive:
            if peer.vouched:
                self._unvouch(peer)
            else:
                self._heard_at[peer.slot] = now
        if multi:
            peer.net_seq[ni] = seq
            peer.net_heard[ni] = now
            if alive:
                if peer.net_lost[ni]:
                    self._net_restored(peer, ni)
                else:
                    self._by_net[ni].move_to_end(peer.id)
            if seq <= peer.seq:
                return bool(self._events)  # a late copy from a slower network: liveness only
            peer.hb_at = now
        peer.seq = seq
        quick = (hb.need or peer.need_ack is not None) and self._note_need(peer, hb, now)
        old = peer.hb
        peer.hb = hb
        if hb.bye:
            if alive:
                self._bury(peer)  # it stopped, owns nothing and said goodbye
                self._evaluate(now)
            return True
        if not alive:
            self._revive(peer, hb)
        elif old is not None and old.body == hb.body:
            # The claim is unchanged: the usual heartbeat, which only refreshed liveness above.
            want = hb.want
            if want:
                self._schedule_send(now)  # acknowledge claims quickly
            if self._want and self._id in hb.acks:
                # Only an acknowledgement is new: no claim changed, so only rule 3 can.
                ready = self._acquirable()
                if ready:
                    self._evaluate(now)
                    return True
            return bool(want or quick or self._events)
        elif old is not None and (
            old.state != hb.state or old.weight != hb.weight or old.digest != hb.digest
        ):
            self._view_dirty = True
        if alive:
            self._tally(peer, hb)
        if hb.version != peer.version or hb.incarnation != peer.version_inc:
            self._set_version(peer, hb)
        if old is None or old.owned != hb.owned:
            self._plan_stale = True
        if hb.want:
            self._wanting[peer.id] = peer
            self._schedule_send(now)  # acknowledge claims quickly
        else:
            self._wanting.pop(peer.id, None)
        self._evaluate(now)
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[str, bytes]]:
        """Heartbeats due now, as (network, payload): send each payload to every peer on it."""
        if now < self._next_send:
            return []
        self._check_lease(now)
        wanting = self._wanting
        acks = tuple(Ack(p.id, p.incarnation, p.seq) for p in wanting.values()) if wanting else ()
        if self._needing or self._cands:
            acks = self._proof_acks(acks, now)
        out = self._heartbeat(now, self._fresh(now), acks, need=tuple(self._cands))
        self._last_send = now
        # While claiming, repeat the claim sooner: a lost claim or acknowledgement then costs
        # a fraction of an interval, not a whole one.
        self._next_send = now + self.config.interval / (_CLAIM_SPEEDUP if self._want else 1)
        self._timer_dirty = True
        return out

    def _proof_acks(self, acks: tuple[Ack, ...], now: float) -> tuple[Ack, ...]:
        """Forget unproven incarnations and need lists not heard for dead_after, and add an
        acknowledgement for every peer whose latest heartbeat needs one (one ack per peer: of
        the incarnation that asked, which is the newer one when a live peer restarted)."""
        horizon = now - self._dead_after
        for p in [p for p in self._cands.values() if p.cand_heard < horizon]:
            p.cand = None
            del self._cands[p.id]
        if not self._needing:
            return acks
        by_id = {a.node_id: a for a in acks}
        for p in list(self._needing.values()):
            assert p.need_ack is not None
            inc, seq, at = p.need_ack
            if at < horizon:
                p.need_ack = None
                del self._needing[p.id]
            elif p.id not in by_id or inc != p.incarnation:
                by_id[p.id] = Ack(p.id, inc, seq)
        return tuple(by_id.values())

    def _use_next_key(self, now: float) -> bool:
        """Send with the next key once every peer heard within dead_after (proven or not: a
        peer that cannot read us yet cannot prove itself either) advertises that it accepts
        it. A peer that comes back with an older configuration turns this off again at its
        first heartbeat. Version 1 peers know only the primary key."""
        nid = self._codec.next_key_id
        if not nid or self._low:
            return False
        horizon = now - self._dead_after
        for p in self._peer_list:
            for h, t in ((p.hb, p.heard), (p.cand, p.cand_heard)):
                if h is not None and t >= horizon and nid not in (h.key_id, h.alt_key_id):
                    return False
        return True

    def _heartbeat(
        self,
        now: float,
        fresh: int,
        acks: tuple[Ack, ...],
        bye: bool = False,
        need: tuple[int, ...] = (),
    ) -> list[tuple[str, bytes]]:
        self._seq += 1
        version = self._version_now(now)
        payload = self._codec.encode(
            node_id=self._id,
            digest=self._digest,
            incarnation=self.incarnation,
            seq=self._seq,
            state=self.state,
            weight=self.weight,
            owned=self._held | self._requested,
            want=self._want,
            fresh=fresh,
            fresh_len=self._fresh_len,
            acks=acks,
            bye=bye,
            need=need if version > 1 else (),
            version=version,
            use_next=self._use_next_key(now),
            kept=self.kept,
            deaf=self.deaf,
        )
        return [(net, payload) for net in self.config.networks]

    def get_timer(self) -> float:
        """When `handle_timer` (and then `datagrams_to_send`) must next be called.

        Never late, and exact when computed; a peer heard since may have moved its deadline
        later, and `handle_timer` then finds nothing due (an early call is always harmless).
        """
        if self._timer_dirty:
            self._timer_dirty = False
            best = self._next_send
            if self._learning() and self._learn_until < best:
                best = self._learn_until
            if self._cand_wake < best:
                best = self._cand_wake
            da = self._dead_after
            if self._heard_floor + da < best:
                # A peer may be due before anything else: look at the exact earliest (the floor
                # may be stale). Usually the next heartbeat comes first and this is skipped.
                self._heard_floor = min(self._heard_at, default=math.inf)
                best = min(best, self._heard_floor + da)
            for p in self._vouched.values():
                if p.indirect + da < best:
                    best = p.indirect + da
            for n, order in enumerate(self._by_net):
                for p in order.values():
                    if p.net_heard[n] + da < best:
                        best = p.net_heard[n] + da
                    break
            self._timer = best
        return self._timer

    def handle_timer(self, now: float) -> None:
        """Declare silent peers dead or their networks lost, and finish listening periods."""
        self._check_lease(now)
        da = self._dead_after
        changed = False
        if self._heard_floor + da <= now:
            self._heard_floor = min(self._heard_at, default=math.inf)
            # Silent the longest first; the order only matters for the order of the events.
            due = sorted(
                (p for p in self._direct.values() if p.heard + da <= now), key=lambda p: p.heard
            )
            for p in due:
                changed |= self._suspect(p, now)
        if self._vouched:
            for p in [p for p in self._vouched.values() if p.indirect + da <= now]:
                del self._vouched[p.id]
                changed |= self._suspect(p, now)
        for n, order in enumerate(self._by_net):
            while order:
                p = next(iter(order.values()))
                if p.net_heard[n] + da > now:
                    break
                del order[p.id]
                p.net_lost[n] = True
                self._emit(ev.NetworkLost(p.name, self.config.networks[n]))
        if self.state is NodeState.STARTING and now >= self._learn_until:
            self._fire(Trigger.LEARNED, now)
            changed = True
        elif self._learning() and now >= self._learn_until:
            self._learn_until = -math.inf
            changed = True
        if self._cand_wake <= now:
            self._cand_wake = math.inf  # an unproven peer's block on a claim ran out
            changed = True
        if not self._unconfirmed and self._held != self._requested and now >= self._next_send:
            self._request(self._requested, self._held)  # the kernel did not do what we asked
        if changed:
            self._evaluate(now)
        self._timer_dirty = True

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    def confirm_owned(self, buckets: Iterable[int], now: float) -> None:
        """What the kernel holds after applying the latest `BucketsChanged`."""
        held = mask_of(buckets)
        self._unconfirmed = False
        if held != self._held:
            self._held = held
            self._schedule_send(now)
            self._evaluate(now)

    # -- local commands
    def join(self, now: float) -> None:
        """Ask to be in the farm (STOP -> STARTING, or cancel a drain)."""
        if self.state is NodeState.STOP:
            self._learn_until = now + self.config.dead_after
        self._fire(Trigger.JOIN, now)

    def leave(self, now: float) -> None:
        """Drain: give away every bucket; `Drained` follows once the kernel confirmed it."""
        self._fire(Trigger.LEAVE, now)

    def stopped(self, now: float) -> None:
        """The daemon stopped the application after `Drained` (STOPPING -> STOP)."""
        self._fire(Trigger.STOPPED, now)

    def shutdown(self, now: float) -> list[tuple[str, bytes]]:
        """Goodbye heartbeats for a daemon that exits after `stopped`: peers stop waiting for
        this node at once instead of after dead_after. Empty unless the node is in STOP and
        holds nothing (a node with buckets must time out, so that its kernel lease runs out
        before peers take them)."""
        if self.state is not NodeState.STOP or self._held | self._requested | self._want:
            return []
        self._next_send = math.inf
        self._timer_dirty = True
        return self._heartbeat(now, 0, (), bye=True)

    def set_weight(self, weight: int, now: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight!r} is out of range: use an integer 0..{MAX_WEIGHT}")
        if weight != self.weight:
            self.weight = weight
            self._view_dirty = True
            self._schedule_send(now)
            self._evaluate(now)

    def count_drop(self, reason: Drop) -> None:
        """Count a datagram its driver dropped before the core saw it (e.g. `unknown_source`),
        so that `drops` stays the one count of every drop."""
        self._count(reason)

    def set_keys(self, key: bytes, next_key: bytes | None, now: float) -> None:
        """Replace the farm keys live (a key rotation step); raises ValueError on a bad key,
        changing nothing."""
        self._codec.set_keys(key, next_key)
        self.config = replace(self.config, key=key, next_key=next_key)
        self._schedule_send(now)

    def set_app_healthy(self, healthy: bool, now: float) -> None:
        if healthy != self.app_healthy:
            self.app_healthy = healthy
            self._settle(now)
            self._evaluate(now)

    # -- read-only views
    @property
    def owned(self) -> frozenset[int]:
        """Buckets the kernel holds or may hold (what our heartbeats advertise)."""
        return frozenset(bits_of(self._held | self._requested))

    @property
    def members(self) -> Members:
        return self._view[0] if self._view else ()

    def peer_claims(self) -> list[tuple[str, bool, NodeState | None, int, int, int, bool]]:
        """Each peer as its latest heartbeat says: (name, alive, state, owned, want, kept
        bitmaps, deaf); for directed delivery, which must know every node interested in a
        bucket, and for auto delivery, which must know who misses the flood probe."""
        out: list[tuple[str, bool, NodeState | None, int, int, int, bool]] = []
        for p in self._peer_list:
            hb = p.hb
            if hb is None:
                out.append((p.name, p.alive, None, 0, 0, 0, False))
            else:
                out.append((p.name, p.alive, hb.state, hb.owned, hb.want, hb.kept, hb.deaf))
        return out

    def snapshot(self, now: float) -> ev.Snapshot:
        """The farm as this node sees it (for `vipfarm state`, the metrics and the console)."""
        b = self.config.buckets

        def share(mask: int) -> float:
            return round(100.0 * mask.bit_count() / b, 2)

        nodes = [
            ev.NodeView(
                name=self.name,
                is_self=True,
                state=self.state.name,
                alive=True,
                share=share(self._held | self._requested),
                incarnation=self.incarnation,
                weight=self.weight,
                heartbeat_age_ms={},
            )
        ]
        for p in self._peer_list:
            hb = p.hb
            nodes.append(
                ev.NodeView(
                    name=p.name,
                    is_self=False,
                    state=hb.state.name if hb else None,
                    alive=p.alive,
                    share=share(hb.owned) if hb and p.alive else 0.0,
                    incarnation=p.incarnation or None,
                    weight=hb.weight if hb else self.config.nodes[p.name],
                    heartbeat_age_ms={
                        net: (
                            round((now - (p.net_heard[i] if self._multi else p.heard)) * 1e3, 1)
                            if p.hb
                            else None
                        )
                        for net, i in self._nets.items()
                    },
                )
            )
        nodes.sort(key=lambda n: n.name)
        return ev.Snapshot(
            farm=self.config.farm,
            node=self.name,
            state=self.state.name,
            members=tuple(self.members),
            owned=tuple(bits_of(self._held | self._requested)),
            wanted=tuple(bits_of(self._want)),
            split_brain=self._split,
            drops={str(k): v for k, v in self.drops.items()},
            nodes=tuple(nodes),
        )

    # ----------------------------------------------------------------- internals
    def _count(self, reason: Drop) -> Drop:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return reason

    def _emit(self, e: ev.Event) -> None:
        self._events.append(e)
        if log.isEnabledFor(logging.INFO):
            fields = {k: getattr(e, k) for k in getattr(e, "__slots__", ())}
            for k, v in fields.items():
                if isinstance(v, frozenset):
                    fields[k] = ",".join(map(str, sorted(v))) or "-"
            log_event(log, type(e).__name__, node=self.name, **fields)

    def _learning(self) -> bool:
        return self._learn_until != -math.inf

    def _suspect(self, p: _Peer, now: float) -> bool:
        """`p` is silent towards us for dead_after: vouched for by a peer, kept while no peer
        could have vouched, or dead (True)."""
        da = self._dead_after
        self._undirect(p)
        self._gather(p)
        if max(p.heard, p.indirect) + da <= now and self._direct:
            # Nobody vouches. That is evidence of death only if a witness could have: a peer
            # whose latest heartbeat came within _FRESH_INTERVALS, so that it would have
            # listed `p` had it heard `p`. When every other peer has been silent that long
            # too, we are the one who hears badly (heavy loss at this node), and `p` is kept
            # until the latest of those peers would be due itself (at most _FRESH_INTERVALS
            # more): by then a witness has spoken, or every peer is being buried alike.
            multi, digest = self._multi, self._digest
            latest = -math.inf
            for q in self._direct.values():
                hb = q.hb
                if hb is not None and hb.digest == digest:
                    t = q.hb_at if multi else q.heard
                    if t > latest:
                        latest = t
            # A witness's fresh bit would keep `p` alive until t - span + dead_after (as in
            # `_gather`, the same expression: a heartbeat at the boundary is exactly one of
            # an expired vouch and no witness).
            if latest - _FRESH_INTERVALS * self.config.interval + da <= now:
                # Not evidence that `p` lives: only a later deadline, through `indirect`.
                p.indirect = max(p.indirect, latest)
        if max(p.heard, p.indirect) + da > now:
            p.vouched = True
            self._vouched[p.id] = p
            return False
        self._bury(p)
        return True

    def _bury(self, p: _Peer) -> None:
        p.alive = p.vouched = False
        self._tally(p, None)
        self._undirect(p)
        self._vouched.pop(p.id, None)
        self._wanting.pop(p.id, None)
        for n, order in enumerate(self._by_net):
            order.pop(p.id, None)
            p.net_lost[n] = True
        self._view_dirty = True
        self._timer_dirty = True
        self._emit(ev.PeerDown(p.name))

    def _direct_add(self, p: _Peer) -> None:
        self._direct[p.id] = p
        self._direct_mask |= 1 << p.index
        self._heard_at[p.slot] = p.heard
        self._heard_floor = min(self._heard_floor, p.heard)

    def _undirect(self, p: _Peer) -> None:
        self._direct.pop(p.id, None)
        self._direct_mask &= ~(1 << p.index)
        self._heard_at[p.slot] = math.inf

    def _unvouch(self, p: _Peer) -> None:
        p.vouched = False
        del self._vouched[p.id]
        self._direct_add(p)

    def _revive(self, p: _Peer, hb: Heartbeat) -> None:
        p.alive = True
        self._tally(p, hb)
        p.vouched = False
        self._direct_add(p)
        for n, order in enumerate(self._by_net):
            # Every network gets dead_after from now to show up before it is reported lost.
            p.net_heard[n] = p.heard
            p.net_lost[n] = False
            order[p.id] = p
        self._view_dirty = True
        self._timer_dirty = True
        self._emit(ev.PeerUp(p.name, hb.incarnation, restarted=False))

    def _net_restored(self, p: _Peer, ni: int) -> None:
        p.net_lost[ni] = False
        self._by_net[ni][p.id] = p
        self._emit(ev.NetworkRestored(p.name, self.config.networks[ni]))

    def _new_incarnation(self, p: _Peer, hb: Heartbeat) -> None:
        if p.cand is not None and p.cand.incarnation <= hb.incarnation:
            p.cand = None
            self._cands.pop(p.id, None)
        restarted = p.alive
        p.incarnation = hb.incarnation
        p.seq = 0
        p.net_seq = [0] * len(p.net_seq)
        p.indirect = -math.inf
        if restarted:
            self._view_dirty = True
            self._emit(ev.PeerUp(p.name, hb.incarnation, restarted=True))

    def _hold(self, p: _Peer, hb: Heartbeat, now: float) -> bool | Drop:
        """A heartbeat of an incarnation newer than the proven one (or of the first one heard)
        that does not prove itself fresh: it may be a recording, so it gives no liveness, no
        claim, no acknowledgement that counts and no goodbye, and does not supersede the proven
        incarnation. It is kept (the latest per peer) for three things only: our need list
        names the peer, so that a real peer acknowledges us at once and proves itself; we
        acknowledge it if it needs us; and what it owns or wants delays our own claims on those
        buckets for at most dead_after (a real peer that cannot hear us yet may hold them: see
        `_unproven_block`)."""
        p.cand = hb
        p.cand_heard = now
        self._cands[p.id] = p
        if hb.version != p.version or hb.incarnation != p.version_inc:
            self._set_version(p, hb)
        quick = self._note_need(p, hb, now)
        if hb.incarnation > p.cand_top:
            # Ask it for its proof at once. Only for a new highest incarnation: recordings of
            # older ones played in turn must not make us send faster.
            p.cand_top = hb.incarnation
            self._schedule_send(now)
            quick = True
        self._count(Drop.UNPROVEN)
        # No evaluation: a held heartbeat can only hold our claims back, and every acquisition
        # is decided in `_evaluate`, which reads the held heartbeats (`_unproven_block`).
        return True if quick else Drop.UNPROVEN

    def _note_need(self, p: _Peer, hb: Heartbeat, now: float) -> bool:
        """Track whether `p`'s latest heartbeat asks us for an acknowledgement; True when it
        newly does (a quick heartbeat is then scheduled)."""
        if self._id in hb.need:
            last = p.need_ack
            if last is not None and hb.incarnation < last[0]:
                return False  # an older incarnation asking (a recording): keep the newest
            fresh_ask = last is None or hb.incarnation > last[0]
            p.need_ack = (hb.incarnation, hb.seq, now)
            self._needing[p.id] = p
            if fresh_ask:
                self._schedule_send(now)
            return fresh_ask
        if p.need_ack is not None and p.need_ack[0] <= hb.incarnation:
            p.need_ack = None
            del self._needing[p.id]
        return False

    def _set_version(self, p: _Peer, hb: Heartbeat) -> None:
        """Track the highest version `p`'s current incarnation was heard speaking (a node of
        this release starts with the newest version, see `_version_now`, so its peers learn
        it is upgraded even while an older peer keeps everybody on the older version)."""
        if hb.incarnation != p.version_inc:
            p.version_inc = hb.incarnation
            p.version = hb.version
        elif hb.version > p.version:
            p.version = hb.version
        if p.version < VERSION:
            self._low[p.id] = p
        else:
            self._low.pop(p.id, None)

    def quiet(self) -> bool:
        """Whether nothing of this node waits on a peer's next heartbeat: it is UP, holds what
        it asked the kernel for, claims nothing, and no peer wants a bucket, needs an
        acknowledgement or waits for its new incarnation's proof. A driver may then read
        heartbeats on a cadence of its own instead of as each arrives (the pulse does): what
        one can change then (a peer's state or weight, a new view) is taken up a fraction of
        an interval later, and no handover is slowed, since every step of one makes a node
        wait (want), be waited for (a peer wants) or confirm (held != requested). A silence is
        judged no earlier: the driver reads what arrived before the core looks at silences,
        and a heartbeat read late only counts as heard late."""
        return (
            self.state is NodeState.UP
            and not self._want
            and not self._wanting
            and not self._cands
            and not self._needing
            and not self._unconfirmed
            and not self._events
            and self._held == self._requested
        )

    def legacy_peers(self, now: float) -> list[str]:
        """Peers heard within dead_after that speak a version before DELIVERY_VERSION: they drop
        heartbeats with the kept and deaf flags, so while one lives nobody sends them and
        directed or auto delivery falls back (vipfarm.node.delivery). Usually none: free."""
        if not self._low:
            return []
        horizon = now - self._dead_after
        return sorted(
            p.name
            for p in self._low.values()
            if p.version < DELIVERY_VERSION and max(p.heard, p.cand_heard) >= horizon
        )

    def _version_now(self, now: float) -> int:
        """The version to send: the newest during our first dead_after (peers learn that we
        speak it), then the lowest one that a peer heard within dead_after speaks (a rolling
        upgrade: a peer of the previous release must read us). A peer of the previous release
        that comes back is heard at its first heartbeat and read at once; it cannot read us
        before our answer, as a node that is still listening before it claims anything."""
        if self._probe_until is None:
            self._probe_until = now + self._dead_after
        if not self._low or now < self._probe_until:
            return VERSION
        horizon = now - self._dead_after
        version = VERSION
        for p in self._low.values():
            if max(p.heard, p.cand_heard) >= horizon:
                version = min(version, p.version)
        return max(version, MIN_VERSION)

    def _unproven_block(self, now: float) -> int:
        """Our wanted buckets that an unproven incarnation heard within dead_after owns or
        wants, and that we have wanted for less than dead_after.

        Without the proof (after our restart, say) we cannot tell a recording from a real peer
        that does not hear us yet; the real one acknowledges our claim within a round trip and
        is then proven, so the claim waits for that. A recording never proves, and after
        dead_after it is treated like any peer we do not hear: as dead."""
        da = self._dead_after
        horizon = now - da
        claims = 0
        for p in self._cands.values():
            c = p.cand
            if c is not None and p.cand_heard >= horizon:
                claims |= c.owned | c.want
        claims &= self._want
        young = 0
        wake = math.inf
        for b in bits_of(claims):
            until = self._want_at[b] + da
            if until > now:
                young |= 1 << b
                wake = min(wake, until)
        if wake < self._cand_wake:
            self._cand_wake = wake
            self._timer_dirty = True
        return young

    def _fresh(self, now: float) -> int:
        """Config-index bitmap of the peers we heard directly within _FRESH_INTERVALS.

        The peers left out (silent towards us that long) and the vouched ones also gather
        the vouching evidence of the moment (`_gather`), at every heartbeat we send: each
        voucher's latest heartbeat is then read about once, not only the one that happens to
        be the latest at the deadline."""
        horizon = now - _FRESH_INTERVALS * self.config.interval
        if self._heard_floor < horizon:
            self._heard_floor = min(self._heard_at, default=math.inf)
        mask = self._direct_mask
        if self._heard_floor < horizon:  # someone is not fresh (else the usual case)
            for p in self._direct.values():
                if p.heard < horizon:
                    mask &= ~(1 << p.index)
                    self._gather(p)
        for p in self._vouched.values():
            self._gather(p)
        return mask

    def _gather(self, p: _Peer) -> None:
        """Raise `p.indirect` to what the latest heartbeats of the peers we hear directly
        prove: one that lists `p` as fresh was sent at most _FRESH_INTERVALS after its
        sender heard `p`, so `p` was alive then (up to the two one-way delays, which only
        make the evidence later than the truth by that much; see docs/MEMBERSHIP.md)."""
        best = p.indirect
        span = _FRESH_INTERVALS * self.config.interval
        multi, digest, i = self._multi, self._digest, p.index
        for q in self._direct.values():
            hb = q.hb
            if hb is not None and hb.fresh >> i & 1 and hb.digest == digest:
                t = (q.hb_at if multi else q.heard) - span
                if t > best:
                    best = t
        p.indirect = best

    def _schedule_send(self, now: float) -> None:
        gap = self.config.interval / _TRIGGER_FRACTION
        soon = now if self._last_send is None else max(now, self._last_send + gap)
        if soon < self._next_send:
            self._next_send = soon
            self._timer_dirty = True

    def _check_lease(self, now: float) -> None:
        last = self._last_send
        if last is None or now - last <= self.config.lease:
            return
        # No heartbeat means no lease refresh: the kernel already dropped our buckets.
        self._last_send = now
        if self._held | self._requested | self._want:
            self._emit(ev.LeaseLost(round(now - last, 6)))
            self._want = 0
            self._want_since.clear()
            self._want_at.clear()
            self._request(0, self._held | self._requested)
        self._learn_until = now + self.config.dead_after
        self._timer_dirty = True

    def _fire(self, trigger: Trigger, now: float) -> None:
        new = next_state(self.state, trigger)
        if new is None:
            log_event(log, "ignored", level=logging.DEBUG, node=self.name, trigger=trigger)
            return
        old, self.state = self.state, new
        self._view_dirty = True
        if new is not NodeState.STARTING and old is NodeState.STARTING:
            self._learn_until = -math.inf
        self._emit(ev.StateChanged(old, new))
        self._schedule_send(now)
        self._settle(now)
        self._evaluate(now)

    def _settle(self, now: float) -> None:
        """Apply the application's health to WAIT/UP."""
        if self.state is NodeState.WAIT and self.app_healthy:
            self._fire(Trigger.HEALTHY, now)
        elif self.state is NodeState.UP and not self.app_healthy:
            self._fire(Trigger.UNHEALTHY, now)

    def _request(self, requested: int, previous: int) -> None:
        self._requested = requested
        self._unconfirmed = True
        self._emit(
            ev.BucketsChanged(
                release=frozenset(bits_of(previous & ~requested)),
                acquire=frozenset(bits_of(requested & ~previous)),
                owned=frozenset(bits_of(requested)),
            )
        )

    def _evaluate(self, now: float) -> None:
        """Recompute the view and move buckets: the heart of release-before-acquire."""
        if self._view_dirty:
            self._view_dirty = False
            self._update_view([p for p in self._peer_list if p.alive])
        mine_held = self._held | self._requested
        others, prio_owned, prio_want = self._others, self._prio_owned, self._prio_want
        mine = 0
        if self.state is NodeState.UP and not self._learning():
            if self._plan_stale or mine_held != self._plan_held:
                # Only a changed view or ownership can change the plan; wants and
                # acknowledgements, most of a handover's heartbeats, cannot.
                self._plan_mine = self._replan(mine_held)
                self._plan_held = mine_held
                self._plan_stale = False
            mine = self._plan_mine
        # Only overlaps with our own buckets are certain: two peers' heartbeats may be of
        # different ages, ours is the truth.
        dup = mine_held & others

        # Release first: what is no longer ours, and what a peer with priority also holds.
        requested = self._requested & mine & ~prio_owned
        self._want &= mine
        for b in [b for b in self._want_since if not self._want >> b & 1]:
            del self._want_since[b]
            del self._want_at[b]
        new_wants = mine & ~requested & ~self._want
        if new_wants:
            since = self._seq + 1  # the next heartbeat is the first to carry the claim
            for b in bits_of(new_wants):
                self._want_since[b] = since
                self._want_at[b] = now
            self._want |= new_wants
            self._schedule_send(now)

        self._blocked = others | prio_want
        if self._cands and self._want:
            self._blocked |= self._unproven_block(now)
        ready = self._acquirable()
        if ready:
            self._want &= ~ready
            for b in bits_of(ready):
                del self._want_since[b]
                del self._want_at[b]
            requested |= ready
        if requested != self._requested:
            self._request(requested, self._requested)
            self._schedule_send(now)

        if dup and not self._split:
            self._split = True
            holders = tuple(
                sorted(
                    [self.name]
                    + [p.name for p in self._peer_list if p.alive and p.hb and p.hb.owned & dup]
                )
            )
            self._emit(ev.SplitBrainDetected(frozenset(bits_of(dup)), holders))
        elif not dup and self._split:
            self._split = False
            self._emit(ev.SplitBrainHealed())

        if (
            self.state is NodeState.DRAINING
            and not (self._held | self._requested)
            and not self._unconfirmed
        ):
            self._emit(ev.Drained())
            self._fire(Trigger.DRAINED, now)

    def _tally(self, p: _Peer, hb: Heartbeat | None) -> None:
        """`p`'s claims in the tallies become those of `hb` (None: `p` is not alive). The cost
        is one step per bucket that changed in its claim, not one per live peer."""
        old = p.counted
        p.counted = hb
        o0 = old.owned if old is not None else 0
        o1 = hb.owned if hb is not None else 0
        if o0 != o1:
            self._plan_touched.add(p.name)
            self._others = _shift(self._n_owned, self._others, o0, o1)
            if p.prio:
                self._prio_owned = _shift(self._n_prio_owned, self._prio_owned, o0, o1)
        if p.prio:
            w0 = old.want if old is not None else 0
            w1 = hb.want if hb is not None else 0
            if w0 != w1:
                self._prio_want = _shift(self._n_prio_want, self._prio_want, w0, w1)

    def _replan(self, mine_held: int) -> int:
        """Our buckets in the plan for the current view and ownership. The members are this
        node and UP live peers (the view is up to date), so each one's bitmap is its latest
        heartbeat's; only those of the peers tallied since the latest plan are read again, and
        the planner is told which positions may have changed instead of comparing them all."""
        assert self._view is not None
        members, anchor = self._view
        by_name, me = self._by_name, self.name
        hint: list[int] | None
        if members is not self._plan_members:
            self._plan_members = members
            self._plan_pos = {n: i for i, (n, _) in enumerate(members)}
            self._plan_cur = [
                mine_held if n == me else by_name[n].hb.owned  # type: ignore[union-attr]
                for n, _ in members
            ]
            hint = None
        else:
            pos, cur = self._plan_pos, self._plan_cur
            hint = []
            for name in self._plan_touched:
                i = pos.get(name)
                if i is not None:
                    cur[i] = by_name[name].hb.owned  # type: ignore[union-attr]
                    hint.append(i)
            i = pos[me]
            cur[i] = mine_held
            hint.append(i)
        self._plan_touched.clear()
        plan = self._planner.plan(
            members, tuple(self._plan_cur), self.config.buckets, anchor, changed=hint
        )
        return plan.masks[self._plan_pos[me]]

    def _update_view(self, alive: list[_Peer]) -> None:
        members = [(p.name, p.hb.weight) for p in alive if p.hb and p.hb.state is NodeState.UP]
        if self.state is NodeState.UP:
            members.append((self.name, self.weight))
        anchor = self._anchor if all(p.hb and p.hb.digest == self._digest for p in alive) else None
        view = (tuple(sorted(members)), anchor)
        if view != self._view:
            self._view = view
            self._plan_stale = True
            self._emit(ev.ViewChanged(view[0], anchor is not None))

    def _acquirable(self) -> int:
        """Wanted buckets that no live peer owns or claims first and that every live peer has
        acknowledged wanting (rule 3 of release-before-acquire)."""
        ready = self._want & ~self._blocked
        if not ready or not (self._direct or self._vouched):
            return ready
        floor = min(self._want_since[b] for b in bits_of(ready))
        # Acknowledgements arrive one by one: the peer that blocked the last check usually still
        # does, which makes each check O(1) instead of a scan of every peer.
        blocker = self._blocker
        if blocker is not None and blocker.alive and self._ack_of(blocker) < floor:
            return 0
        acked = math.inf
        for p in self._peer_list:
            if not p.alive:
                continue
            a = self._ack_of(p)
            if a < floor:
                self._blocker = p
                return 0
            acked = min(acked, a)
        self._blocker = None
        for b in bits_of(ready):
            if self._want_since[b] > acked:
                ready &= ~(1 << b)
        return ready

    def _ack_of(self, p: _Peer) -> int:
        a = p.hb.acks.get(self._id) if p.hb is not None else None
        return a[1] if a is not None and a[0] == self.incarnation else 0
