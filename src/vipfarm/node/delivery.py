"""Directed delivery in the pulse: which node is each VIP's entry, and where frames go.

Theory of operation
-------------------
Where the switch does not flood frames for the VMAC (VMware vSwitches, clouds, switches that
suppress unknown unicast), a farm with ``delivery = "directed"`` resolves each VIP to a real
node's MAC instead: the VIP's *entry*. Every node computes the entry of every VIP from the
membership view all nodes share, with rendezvous hashing of (VIP, node name) over the alive
nodes that are UP (over the alive WAIT nodes when none is UP), so entries spread over VIPs and
a VIP's entry moves only when its own entry leaves or dies (`entry_for`). Only the entry
answers ARP/NDP for its VIP, with its own MAC; on becoming the entry it announces the VIP at
once (gratuitous ARP, unsolicited NA), so clients move within the failover time of the farm
plus one announcement.

Frames a client addressed to a node's own MAC are sent on by that node's kernel, at layer 2, to
every other node interested in their bucket (`vipfarm.datapath.ruleset.steer_chains`): its
owner, the nodes that still keep it (they serve established connections in it), and a node that
wants it (about to acquire it: its first SYN is not lost to the handover). Each receiving node
then decides exactly as in flood delivery. Any node forwards, not only the entry: a client whose
cache still names a former entry is served as long as that node lives. The interested nodes
come from the peers' heartbeats (owned, wanted, and the kept bitmap of `wire.FLAG_KEPT`, which
this node's heartbeats carry too); their MACs from the kernel's neighbour table for their
configured addresses (the heartbeats on the LAN keep those entries fresh), looked up again
while a live peer's MAC is unknown and remembered for good: a frame from any farm node, dead
or alive, is never forwarded again, so two nodes with different views cannot bounce a frame.
A node steers nothing while it misses the MAC of a live peer (its first moments, or those of
a node that joins with a MAC it never saw: one read of the neighbour table, `MAC_RETRY_S`),
and answers for no VIP then either.

``delivery = "auto"``: the kernel steers as in directed delivery throughout (frames addressed
to a VMAC are never steered, so this costs nothing while clients use the VMAC), and only the
ARP/NDP answers change. Every node sends a flood probe twice a second (`vipfarm.datapath.probe`)
and says in its heartbeats (`wire.FLAG_DEAF`) when it has missed, for `DEAF_AFTER_S`, the probe
of a peer alive for that long. A node answers in flood style (the VMAC, from every node) only
when no alive node, itself included, has been deaf for `SETTLE_S`; it goes back to directed
answers (and announces its entries at once) as soon as any node is deaf. It starts directed,
which works on every network; established connections survive a change either way, because
the steering follows the owners and keepers in both modes. A change is an event
(`delivery_mode_changed`, with the evidence) and `vipfarm state` shows the mode and evidence.

A rolling upgrade from a release without directed delivery: its nodes answer with the VMAC,
send no probe and drop heartbeats that carry the kept or deaf flag, so nobody sends those while
such a node lives (`Membership.legacy_peers`). Meanwhile auto delivery answers in flood style,
which is what the farm did before the upgrade (an old node's probe is not missed, and nobody
says it is deaf); directed delivery never makes an old node an entry (it would not answer), and
steers to the owners and wanters it hears of, but not to the buckets an old node keeps, which it
cannot say. Both are events (`delivery_legacy_peers`), and `vipfarm state` lists such peers.

`Directed.tick` runs on every timer of the pulse: it compares a cheap key of its inputs with the
last one and does the work only on a change; the kernel transactions (steering plan, neighbour
reads) run in a worker thread, one at a time, the latest plan winning.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vipfarm.datapath.packet import PacketService
from vipfarm.datapath.probe import ETH_P_PROBE, PROBE_INTERVAL_S, ProbeResponder
from vipfarm.datapath.ruleset import SteerPlan
from vipfarm.datapath.service import DatapathService
from vipfarm.datapath.spec import Delivery, IPAddress
from vipfarm.membership.wire import NodeState, bits_of, farm_id, node_id

log = logging.getLogger("vipfarm.delivery")

# How often the neighbour table is read while a live peer's MAC is unknown. A peer's entry is
# there from its first heartbeat on: resolving our address, it sent an ARP request, from which
# our kernel makes an entry for it; so this is the wait before steering starts again.
MAC_RETRY_S = 0.2
MAC_REFRESH_S = 10.0  # and otherwise (a peer's NIC may change)
# Steering plans are kernel transactions, and while a farm starts or a rebalance runs the plan
# changes with nearly every heartbeat. Only a VIP's entry, and for a while a former one (clients
# that missed its successor's announcement), receive frames to steer, so they apply a changed
# plan at once and then at most every STEER_GAP_S; any other node (at most every SLOW_GAP_S)
# steers only the frames of clients with a very stale ARP/NDP cache. Without this, a 12-node
# farm starting on two cores spent most of its CPU on plans no frame used, starved its pulses
# and took minutes to settle.
STEER_GAP_S = 0.1
SLOW_GAP_S = 2.0
RECENT_ENTRY_S = 60.0  # a former entry keeps the short gap this long
DEAF_AFTER_S = 3.5 * PROBE_INTERVAL_S  # a live peer's probe missed this long: deaf
SETTLE_S = 5.0  # flood answers only after no node was deaf for this long (hysteresis)

Claim = tuple[str, bool, NodeState | None, int, int, int, bool]  # Membership.peer_claims


def _score(vip: IPAddress, node: str) -> bytes:
    return hashlib.sha256(f"vipfarm-entry\0{vip}\0{node}".encode()).digest()


def entry_for(vip: IPAddress, candidates: Iterable[str]) -> str | None:
    """The entry of `vip` among `candidates`: the highest rendezvous score (None: nobody)."""
    best: tuple[bytes, str] | None = None
    for node in candidates:
        score = (_score(vip, node), node)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]


def candidates(
    me: str, my_state: NodeState, claims: Sequence[Claim], legacy: Iterable[str] = ()
) -> list[str]:
    """The nodes that may be an entry: alive and UP, or alive and WAIT when none is UP; never a
    node of a release without directed delivery (`legacy`)."""
    old = frozenset(legacy)
    states = [(me, my_state)] + [
        (c[0], c[2]) for c in claims if c[1] and c[2] is not None and c[0] not in old
    ]
    for wanted in (NodeState.UP, NodeState.WAIT):
        found = sorted(n for n, s in states if s is wanted)
        if found:
            return found
    return []


def entries(
    me: str,
    my_state: NodeState,
    claims: Sequence[Claim],
    vips: Iterable[IPAddress],
    legacy: Iterable[str] = (),
) -> dict[IPAddress, str | None]:
    nodes = candidates(me, my_state, claims, legacy)
    return {vip: entry_for(vip, nodes) for vip in vips}


def steer_plan(
    mac: str,
    claims: Sequence[Claim],
    macs: dict[str, str],
    local: frozenset[int],
) -> SteerPlan:
    """Where this node sends each bucket's frames: to every alive peer with a known MAC that
    owns, wants or keeps it, in name order."""
    targets: dict[int, list[str]] = {}
    for name, alive, _state, owned, want, kept, _deaf in sorted(claims):
        peer_mac = macs.get(name)
        if not alive or peer_mac is None:
            continue
        for b in bits_of(owned | want | kept):
            targets.setdefault(b, []).append(peer_mac)
    return SteerPlan(
        mac=mac,
        targets={b: tuple(t) for b, t in targets.items()},
        local=local,
        peers=frozenset(m for m in macs.values() if m != mac),
    )


class FloodVote:
    """The choice of auto delivery, pure: fed the peers' claims and when each node's probe was
    last heard (by node id), it says whether this node is deaf, which nodes are, and whether to
    answer in flood style (`flood`). Starts directed, which works on every network."""

    def __init__(self, me: str, started: float) -> None:
        self.me = me
        self.started = started
        self.last_deaf = started
        self.alive_since: dict[str, float] = {}
        self.deaf = False
        self.deaf_nodes: list[str] = []
        self.missed: list[str] = []
        self.flood = False

    def update(self, now: float, claims: Sequence[Claim], heard: Mapping[int, float]) -> bool:
        """Take the latest evidence in; True when `flood` changed."""
        missed = []
        for name, alive, _state, _owned, _want, _kept, _deaf in claims:
            if not alive:
                self.alive_since.pop(name, None)
                continue
            # A peer just (re)joined may not have probed yet: it counts after a full window.
            since = self.alive_since.setdefault(name, now)
            last = heard.get(node_id(name))
            if now - since >= DEAF_AFTER_S and (last is None or now - last > DEAF_AFTER_S):
                missed.append(name)
        self.missed = missed
        # Until this node has listened for a full window, it has no verdict of its own.
        self.deaf = bool(missed) and now - self.started >= DEAF_AFTER_S
        self.deaf_nodes = sorted(
            ([self.me] if self.deaf else []) + [c[0] for c in claims if c[1] and c[6]]
        )
        if self.deaf_nodes:
            self.last_deaf = now
        flood = not self.deaf_nodes and now - self.last_deaf >= SETTLE_S
        changed = flood != self.flood
        self.flood = flood
        return changed


class Directed:
    """The pulse's directed delivery: entries, announcements and the steering plan."""

    def __init__(
        self,
        me: str,
        service: DatapathService,
        addresses: dict[str, list[str]],
        emit: Callable[..., None],
    ) -> None:
        self.me = me
        self.service = service
        self.addresses = addresses  # peer name -> its configured addresses (every network)
        self.emit = emit
        self.macs: dict[str, str] = {}
        self._mac: str | None = None  # this node's LAN MAC
        self.entry_of: dict[IPAddress, str | None] = {}
        self.mac_unknown: list[str] = []
        self._key: Any = None
        self._deferred: SteerPlan | None = None  # computed, not yet handed to the kernel
        self._handed = -1e9  # when a plan was last handed to the kernel
        self._entry_until = -1e9  # short gaps until then (this node was an entry)
        self._busy = False
        self._pending: SteerPlan | None = None
        self._answer: frozenset[IPAddress] | None = frozenset()  # the entry VIPs to answer
        self._macs_read = -1e9
        self._reading = False
        self.applied = 0
        self.errors = 0
        # auto delivery
        self.flood_answers = False  # answering with the VMAC (auto found that frames flood)
        self.deaf = False  # this node misses a live peer's probe
        self.deaf_nodes: list[str] = []
        self._prober: PacketService | None = None
        self._probe_sent = -1e9
        self._started: float | None = None
        self.vote: FloodVote | None = None
        self.legacy: tuple[str, ...] = ()  # live peers of a release without directed delivery

    @property
    def active(self) -> bool:
        return self.service.spec.delivery.steers

    def idle(self) -> None:
        """Flood delivery: undo what directed or auto delivery set (cheap when nothing)."""
        if self.service.entry is not None:
            self.service.set_entry(None)
        self._key = None
        self._stop_prober()
        self.flood_answers = self.deaf = False

    def tick(
        self,
        now: float,
        my_state: NodeState,
        claims: Sequence[Claim],
        owned: frozenset[int],
        kept: frozenset[int],
        legacy: Sequence[str] = (),
    ) -> int | None:
        """Recompute on a change of inputs; returns the kept bitmap the heartbeats must carry
        (None: flood delivery, carry nothing). `legacy`: the live peers that predate directed
        delivery (see the module's docstring)."""
        if not self.active:
            self.idle()
            return None
        if self._started is None:
            self._started = now
        self._set_legacy(tuple(legacy))
        if self.service.spec.delivery is Delivery.AUTO:
            self._auto(now, claims)
        else:
            self._stop_prober()
            self.flood_answers = self.deaf = False
        lingering = kept - owned
        alive_unknown = [c[0] for c in claims if c[1] and c[0] not in self.macs]
        every = MAC_RETRY_S if alive_unknown else MAC_REFRESH_S
        if not self._reading and now - self._macs_read >= every:
            self._macs_read = now
            self._read_macs()
        spec = self.service.spec
        # id(spec): comparing a spec of thousands of rules would cost the loop milliseconds.
        key = (
            my_state,
            owned,
            kept,
            tuple(claims),
            tuple(sorted(self.macs.items())),
            id(spec),
            self.flood_answers,
            self.legacy,
        )
        if key != self._key:
            self._key = key
            self.mac_unknown = alive_unknown
            self._update_entry(my_state, claims, spec.vips)
            if self._mac is None:
                self._mac = self.service.kernel.link_mac(spec.interface)
            plan = steer_plan(self._mac, claims, self.macs, owned | kept)
            if alive_unknown:
                # Steer nothing while a live peer's MAC is unknown: a steering node then always
                # knows every live peer, so a frame a live peer forwarded is never forwarded
                # again, and no disagreement of views can make a frame go round (layer 2 has no
                # TTL). Frames of a dead node's stale kernel go one hop further at most.
                plan = SteerPlan(mac=plan.mac, local=plan.local, peers=plan.peers)
            self._deferred = plan
        if self._answer or self.service.entry:
            self._entry_until = now + RECENT_ENTRY_S
        if self._deferred is not None:
            gap = STEER_GAP_S if now < self._entry_until else SLOW_GAP_S
            if now - self._handed >= gap:
                plan, self._deferred, self._handed = self._deferred, None, now
                self._apply(plan)
        mask = 0
        for b in lingering:
            mask |= 1 << b
        return mask

    def _update_entry(
        self, my_state: NodeState, claims: Sequence[Claim], vips: Iterable[IPAddress]
    ) -> None:
        entry_of = entries(self.me, my_state, claims, vips, self.legacy)
        mine = frozenset(v for v, n in entry_of.items() if n == self.me)
        if self.flood_answers:  # auto, frames flood: every node answers with the VMAC
            self._answer = None
            self.service.set_entry(None)
        else:
            # A new entry answers (and announces) only once it can steer to every live peer
            # and the kernel has the plan (`_applied`): until then the clients that know the
            # former entry keep using it, which steers as well. A VIP lost stops at once.
            self._answer = frozenset() if self.mac_unknown else mine
            current = self.service.entry
            if current is None or not current <= self._answer:
                self.service.set_entry((current or frozenset()) & self._answer)
        if entry_of != self.entry_of:
            before = frozenset(v for v, n in self.entry_of.items() if n == self.me)
            self.entry_of = entry_of
            if mine != before:
                self.emit(
                    "entry_changed",
                    logging.INFO,
                    gained=",".join(map(str, sorted(mine - before, key=str))) or "-",
                    lost=",".join(map(str, sorted(before - mine, key=str))) or "-",
                    entries=",".join(f"{v}={n}" for v, n in entry_of.items()),
                )

    def _set_legacy(self, legacy: tuple[str, ...]) -> None:
        if legacy == self.legacy:
            return
        self.legacy = legacy
        auto = self.service.spec.delivery is Delivery.AUTO
        self.emit(
            "delivery_legacy_peers",
            logging.WARNING if legacy else logging.INFO,
            peers=",".join(legacy) or "-",
            effect=(
                "-"
                if not legacy
                else "flood answers until they are upgraded"
                if auto
                else "they are never entries; what they keep is not steered"
            ),
        )

    # ---- auto delivery: the flood probe
    def _auto(self, now: float, claims: Sequence[Claim]) -> None:
        prober = self._prober
        if prober is None:
            spec = self.service.spec
            mac = self.service.kernel.link_mac(spec.interface)
            responder = ProbeResponder(
                spec.vmac(spec.vips[0]), mac, farm_id(spec.farm), node_id(self.me)
            )
            prober = PacketService(spec.interface, ETH_P_PROBE, responder)
            prober.start()
            self._prober = prober
        if now - self._probe_sent >= PROBE_INTERVAL_S:
            self._probe_sent = now
            prober.announce()
        heard = prober.responder.heard if isinstance(prober.responder, ProbeResponder) else {}
        if self.vote is None:
            self.vote = FloodVote(self.me, now)
        vote = self.vote
        if self.legacy:  # they send no probe: not deaf, they simply predate it
            old = frozenset(self.legacy)
            claims = [c for c in claims if c[0] not in old]
        if vote.update(now, claims, heard):
            self.emit(
                "delivery_mode_changed",
                logging.INFO if vote.flood else logging.WARNING,
                mode="flood" if vote.flood else "directed",
                deaf=",".join(vote.deaf_nodes) or "-",
                missed=",".join(vote.missed) or "-",
            )
        # With an old node alive the farm answers as before the upgrade, and the deaf flag
        # could not be sent anyway.
        self.flood_answers = vote.flood or bool(self.legacy)
        self.deaf = vote.deaf and not self.legacy
        self.deaf_nodes = list(vote.deaf_nodes)

    def _stop_prober(self) -> None:
        if self._prober is not None:
            self._prober.stop()
            self._prober = None

    def stop(self) -> None:
        self._stop_prober()

    def _apply(self, plan: SteerPlan) -> None:
        if self._busy:
            self._pending = plan  # the latest plan wins
            return
        self._busy = True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.service.set_steer, plan)
        fut.add_done_callback(self._applied)

    def _applied(self, fut: asyncio.Future[bool]) -> None:
        self._busy = False
        try:
            if fut.result():
                self.applied += 1
        except Exception as e:  # keep the previous plan: frames still reach its nodes
            self.errors += 1
            self.emit("steer_failed", logging.ERROR, error=str(e))
            self._key = None  # try again at the next tick
        if self._pending is not None:
            plan, self._pending = self._pending, None
            self._apply(plan)
            return
        if self._answer is not None and self._answer != self.service.entry:
            self.service.set_entry(self._answer)  # announces the VIPs gained

    def _read_macs(self) -> None:
        self._reading = True
        loop = asyncio.get_running_loop()
        iface = self.service.spec.interface
        fut = loop.run_in_executor(None, self.service.kernel.neighbours, iface)
        fut.add_done_callback(self._macs_done)

    def _macs_done(self, fut: asyncio.Future[dict[str, str]]) -> None:
        self._reading = False
        try:
            table = fut.result()
        except Exception as e:
            self.emit("neighbours_unreadable", logging.WARNING, error=str(e))
            return
        for name, addrs in self.addresses.items():
            for a in addrs:
                mac = table.get(a)
                if mac is not None and self.macs.get(name) != mac:
                    self.macs[name] = mac
                    self.emit("peer_mac_learned", logging.INFO, peer=name, mac=mac)
                    break

    def state(self) -> dict[str, Any]:
        """For `vipfarm state` (through the pulse's state)."""
        steer = self.service.datapath.steer
        delivery = self.service.spec.delivery
        heard: dict[str, float | None] = {}
        if self._prober is not None and isinstance(self._prober.responder, ProbeResponder):
            last = self._prober.responder.heard
            now = time.monotonic()
            for name in self.addresses:
                t = last.get(node_id(name))
                heard[name] = None if t is None else round((now - t) * 1000, 1)
        answers = "flood" if delivery is Delivery.FLOOD or self.flood_answers else "directed"
        return {
            "mode": delivery.value,
            "answers": answers,
            "deaf_nodes": list(self.deaf_nodes),
            "probe_heard_ms": heard,
            "entries": {str(v): n for v, n in self.entry_of.items()},
            "entry_of_here": sorted(str(v) for v in (self.service.entry or ())),
            "peer_macs": dict(sorted(self.macs.items())),
            "mac_unknown": list(self.mac_unknown),
            "legacy_peers": list(self.legacy),
            "steered_buckets": len(steer.targets) if steer is not None else 0,
            "plans_applied": self.applied,
            "plan_errors": self.errors,
        }
