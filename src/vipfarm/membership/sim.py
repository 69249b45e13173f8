"""Farm simulator: the real membership cores over a simulated network and a virtual clock.

Each simulated node is a `Membership` core driven by `Driver` (`vipfarm.membership.driver`),
the one driver of the core, which the node's pulse process runs with real sockets: the simulator
measures exactly what runs in production, the same timers, early sends and order of events.
The node (`_Node`) is only the driver's `Io`: a simulated kernel set that takes every
`BucketsChanged` at once, a kernel lease refreshed whenever heartbeats go out (so a crashed
daemon's buckets stay "owned" until the lease runs out, exactly like nftables element timeouts),
a broadcast into the simulated network, and wake-ups on the timing wheel. Scenario steps call
the core's local commands and then `poke`, as the daemon does; a drained daemon calls `stopped`
and exits through `shutdown`. The network delivers every heartbeat to every reachable peer with
independent loss, uniform delay, optional duplication and optional extra delay that reorders
datagrams.

Theory of operation:

- The virtual clock advances in slots of 0.1 ms. Deliveries and core wake-ups are appended to
  the slot's list in a ring of slot lists (a timing wheel, longer than any delay or timer), and
  the clock walks the ring slot by slot. That is one list append per datagram instead of a heap
  operation, which is what makes 64 nodes x 10 minutes (about 26 million receptions) feasible in
  Python. Timers are rounded up to the next slot; scenario actions sit in a small heap.
- The cost is per reception, so everything on that path is lean: the network's random draws
  are made in bulk (`_Draws`: no Python-level draw per delivery without duplication or
  reordering), ring entries are flat tuples, the cyclic garbage collector waits for the end of
  the run, a reception is one `Driver.datagram` call that ends at the core's answer when only a
  peer's liveness changed, and the core's receive path is short (see membership.core).
- The driver asks for wake-ups (`Io.wake_at`). The node files one in the first slot at or after
  the time asked that is still to be walked (the current slot while its scenario actions run,
  the next one while its deliveries are walked); a request it replaced stays in the ring and is
  skipped as stale when its slot comes.
- Events reach the metrics through `Io.on_event`. Convergence is checked once per driver call
  whose events could have ended one (a flag set in `on_event`, looked at when the call returns),
  not once per event.
- Metrics follow the issue: double ownership is checked whenever a kernel gains a bucket, and
  counted only while the live nodes are connected: no partition is active and no node believes a
  live, reachable peer dead (heavy loss can silence a link for dead_after, which is a partition
  as far as the protocol can tell; such false failovers are counted on their own). Split brain
  during those times is reported separately. Convergence of an event ends when, in every connected
  component, every live node's kernel holds exactly the buckets the assignment of that
  component's UP nodes gives it, and every core's view agrees.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from vipfarm.membership import events as ev
from vipfarm.membership.assignment import Members, balanced, min_moves, moved
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.membership.driver import Driver
from vipfarm.membership.wire import Codec, Drop, NodeState, bits_of, mask_of

SCENARIOS = ("crash", "join", "drain", "partition", "flap", "rolling", "hb_loss")
RES = 1e-4  # seconds per slot
_INV = 1.0 / RES
_RING = 1 << 16  # slots in the timing wheel (6.5 s): longer than any delay or timer
_KEY = b"vipfarm-simulator-key-0123456789abcdef"
Action = tuple[float, str, int]


@dataclass
class SimConfig:
    nodes: int = 8
    buckets: int = 256
    scenario: str = "crash"
    loss: float = 0.0
    delay_ms: tuple[float, float] = (1.0, 5.0)
    duplicate: float = 0.0
    reorder: float = 0.0
    duration: float = 30.0
    seed: int = 1
    interval: float = 0.1
    dead_after: float = 0.5
    lease: float = 0.3
    weights: list[int] | None = None
    period: float = 4.0  # seconds between scenario events
    networks: int = 1
    # The hb_loss scenario (and the script's "lossy"): the extra loss of every datagram a lossy
    # node sends or receives, on every network (chaos's hb_loss fault is 0.5 both ways).
    fault_loss: float = 0.5

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(
                f"unknown scenario {self.scenario!r}: use one of {', '.join(SCENARIOS)}"
            )
        if not 1 <= self.nodes <= 255:
            raise ValueError(f"--nodes {self.nodes} is out of range: use 1..255")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"--loss {self.loss} is out of range: use a probability in [0, 1)")
        for name, p in (
            ("--dup", self.duplicate),
            ("--reorder", self.reorder),
            ("--fault-loss", self.fault_loss),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} {p} is out of range: use a probability in [0, 1]")
        lo, hi = self.delay_ms
        if not 0.0 <= lo <= hi:
            raise ValueError(f"--delay-ms {lo}-{hi} is invalid: use MIN-MAX with 0 <= MIN <= MAX")
        if self.duration <= 0:
            raise ValueError(f"--duration {self.duration} must be positive")
        if self.weights is not None and len(self.weights) != self.nodes:
            raise ValueError(f"{len(self.weights)} weights for {self.nodes} nodes: give one each")
        if not 1 <= self.networks <= 3:
            raise ValueError(f"--networks {self.networks} is out of range: use 1..3")
        if self.period < 4 * self.dead_after:
            raise ValueError(f"period {self.period} s is too short: use at least 4 x dead_after")


@dataclass(slots=True, eq=False)
class _Node:
    """One simulated daemon: the `Io` of its core's `Driver` (None while the daemon is down).
    Nodes compare by identity: field by field would compare the simulators they hold."""

    sim: Simulator
    index: int
    name: str
    weight: int
    driver: Driver | None = None
    # Its driver's `receive` (the core's receive_datagram) while the daemon runs, None while it
    # is down: a reception calls it directly and the driver only when it answers more than
    # False (see Driver.received), a Python call less per reception.
    recv: Callable[[bytes, str, float], bool | Drop] | None = None
    incarnation: int = 0
    kernel: int = 0
    lease_until: float = -math.inf
    wake: int = 2**62  # slot of the pending wake-up
    group: int = 0
    joining: bool = False  # becomes a convergence event when it turns UP
    lossy: bool = False  # its datagrams are lost with fault_loss more, both ways (hb_loss)

    @property
    def core(self) -> Membership | None:
        driver = self.driver
        return None if driver is None else driver.core

    # -- Io
    def send(self, network: str, payload: bytes) -> None:
        self.sim._broadcast(self, payload, network)

    def renew_leases(self, now: float) -> None:
        self.lease_until = now + self.sim.cfg.lease

    def apply_buckets(self, owned: frozenset[int], now: float) -> frozenset[int]:
        self.sim._set_kernel(self, mask_of(owned), now)
        return owned  # a simulated kernel always does what it is told

    def on_event(self, event: ev.Event, now: float) -> None:
        self.sim._on_event(self, event, now)

    def wake_at(self, when: float) -> None:
        """A wake-up in the first slot at or after `when` that is still to be walked; a request
        it replaces stays in the ring, stale, and is skipped when its slot comes."""
        sim = self.sim
        k = sim.soonest if when == -math.inf else max(sim.soonest, math.ceil(when * _INV - 1e-6))
        if k != self.wake:
            self.wake = k
            sim.ring[k & (_RING - 1)].append((self, None, ""))


@dataclass
class _Pending:
    kind: str
    t: float
    node: str
    before: list[str | None] | None


@dataclass
class _Metrics:
    max_owners: int = 0
    max_owners_split: int = 0
    false_failovers: int = 0
    convergence: list[dict[str, Any]] = field(default_factory=list)
    moved: int = 0
    optimal: int = 0
    balance: float = 0.0
    bytes_sent: int = 0
    deliveries: int = 0
    max_unowned: float = 0.0
    split_brain_events: int = 0


class _Draws:
    """The network's random draws, made in bulk, from a generator of their own (scenario draws
    use `Simulator.rnd`), so that the common delivery needs no Python-level draw at all.

    - Loss: every delivery is lost independently with probability `loss`. The gaps between
      losses are then geometric, so one draw per loss (not per delivery) suffices:
      floor(log(1 - U) / log(1 - loss)) deliveries pass before the next loss.
    - Delay: a uniform number of slots in range(span), from random bytes that `bytes.translate`
      maps in C: bytes at or above the largest multiple of span below 256 are deleted (so that
      every offset is exactly equally likely), the others are taken modulo span.
    """

    def __init__(self, seed: int, span: int) -> None:
        self.rnd = random.Random(f"{seed}/network")
        self.span = span
        limit = 256 - 256 % span if span <= 256 else 0
        self._table = bytes(v % span if v < limit else 0 for v in range(256))
        self._reject = bytes(range(limit, 256))
        self._pool = b""
        self._loss = 0.0
        self._log_keep = 0.0
        self._next_loss = 0  # deliveries that pass before the next loss

    def lost(self, n: int, loss: float) -> list[int]:
        """Which of the next n deliveries are lost (indices, ascending); loss > 0."""
        if loss != self._loss:  # the first call, or the network changed (script "quiet")
            self._loss = loss
            self._log_keep = math.log1p(-loss)
            self._next_loss = self._gap()
        out = []
        i = self._next_loss
        while i < n:
            out.append(i)
            i += 1 + self._gap()
        self._next_loss = i - n
        return out

    def _gap(self) -> int:
        return int(math.log(1.0 - self.rnd.random()) / self._log_keep)

    def delays(self, n: int) -> Sequence[int]:
        """n extra delays in slots, each uniform in range(span)."""
        if self.span > 256:
            return [int(self.rnd.random() * self.span) for _ in range(n)]
        pool = self._pool
        while len(pool) < n:
            pool += self.rnd.randbytes(256).translate(self._table, self._reject)
        self._pool = pool[n:]
        return pool[:n]


class Simulator:
    """Runs one scenario; `run()` returns the JSON-ready result."""

    def __init__(self, cfg: SimConfig, script: Sequence[Action] | None = None) -> None:
        """`script` replaces the scenario by (time, action, node index) steps; actions are
        crash, start, drain, healthy, unhealthy, partition (nodes up to the index on one
        side), heal, quiet (loss, duplication and reordering stop), lossy (the node loses
        fault_loss of its datagrams both ways) and lossless (it no longer does)."""
        self.cfg = replace(cfg)  # scripts may change the network; keep the caller's copy
        self.script = script
        self.rnd = random.Random(cfg.seed)
        weights = cfg.weights or [1] * cfg.nodes
        self.nodes = [_Node(self, i, f"node{i + 1:02d}", w) for i, w in enumerate(weights)]
        self.by_name = {n.name: n for n in self.nodes}
        self.networks = tuple(["lan", "hb2", "hb3"][: cfg.networks])
        self.mcfg = {
            n.name: MembershipConfig(
                farm="sim",
                node=n.name,
                key=_KEY,
                nodes={m.name: m.weight for m in self.nodes},
                networks=self.networks,
                buckets=cfg.buckets,
                interval=cfg.interval,
                dead_after=cfg.dead_after,
                lease=cfg.lease,
            )
            for n in self.nodes
        }
        self.codec = Codec("sim", _KEY, cfg.buckets)
        # Slot lists of (node, payload, network) deliveries, or (node, None, "") for a wake-up.
        self.ring: list[list[tuple[_Node, bytes | None, str]]] = [[] for _ in range(_RING)]
        self.k = 0  # the slot being walked: sends leave from it
        # The first slot still to be walked: the current one while its actions run (its
        # deliveries come after them), the next one once its deliveries are being walked.
        self.soonest = 1
        # Set by an event that may end a convergence; checked once the driver call returns, so
        # that a batch of events costs one check.
        self.relevant = False
        self.actions: list[tuple[float, int, Callable[[float], None]]] = []
        self._action_seq = 0
        self.targets: list[list[_Node]] = []
        self.partitioned = False
        self.lossy = 0  # how many nodes are lossy (hb_loss)
        # (observer, peer) pairs where the observer believes the peer dead. When both are in
        # fact alive and connected (heavy loss hid the peer, or a partition has just healed and
        # no heartbeat got through yet), the farm is split as far as the protocol can tell.
        self.believed_dead: set[tuple[int, int]] = set()
        self.blind_until = -math.inf
        self.m = _Metrics()
        self.pending: list[_Pending] = []
        self.last_converged: list[str | None] | None = None
        self.ready = False  # initial convergence reached: metrics count from here
        self.unowned_since: list[float] = [math.inf] * cfg.buckets
        self.owner_count = [0] * cfg.buckets
        self.dmin = max(1, round(cfg.delay_ms[0] * 1e-3 * _INV))
        self.dspan = max(0, round((cfg.delay_ms[1] - cfg.delay_ms[0]) * 1e-3 * _INV)) + 1
        self.draws = _Draws(cfg.seed, self.dspan)

    # ---------------------------------------------------------------- topology
    def _retarget(self) -> None:
        live = [n for n in self.nodes if n.core is not None]
        self.targets = [[m for m in live if m is not n and m.group == n.group] for n in self.nodes]
        self.partitioned = len({n.group for n in live}) > 1

    def _misjudged(self) -> bool:
        nodes = self.nodes
        return any(self._reachable(nodes[a], nodes[b]) for a, b in self.believed_dead)

    def _reachable(self, a: _Node, b: _Node) -> bool:
        return a.core is not None and b.core is not None and a.group == b.group

    # ---------------------------------------------------------------- scheduling
    def at(self, t: float, fn: Callable[[float], None]) -> None:
        self._action_seq += 1
        heapq.heappush(self.actions, (t, self._action_seq, fn))

    # ---------------------------------------------------------------- node lifecycle
    def start(self, node: _Node, now: float) -> None:
        """Start a daemon: fresh core, empty kernel, join and report the app healthy."""
        node.incarnation += 1
        node.kernel = 0  # the daemon flushes the kernel set at start
        self.believed_dead = {(a, b) for a, b in self.believed_dead if a != node.index}
        core = Membership(self.mcfg[node.name], node.incarnation, codec=self.codec)
        node.driver = Driver(core, node)
        node.recv = node.driver.receive
        node.wake = 2**62
        node.joining = True
        self._retarget()
        core.join(now)
        core.set_app_healthy(True, now)
        self._poke(node, now)

    def crash(self, node: _Node, now: float) -> None:
        """The daemon dies; its kernel keeps the buckets until the lease runs out."""
        if any(m.core is not None and m.group != node.group for m in self.nodes):
            # It dies on one side of a partition: the other side may take its buckets while
            # its lease still runs, which is the split brain outliving the partition.
            self.blind_until = max(self.blind_until, node.lease_until)
        self._unserve(node, node.kernel, now)
        node.driver = node.recv = None
        node.wake = 2**62
        self._retarget()
        self._pend("crash", now, node.name)

    def _k(self, t: float) -> int:
        return math.ceil(t * _INV - 1e-6)

    # ---------------------------------------------------------------- kernel and metrics
    def _set_kernel(self, node: _Node, mask: int, now: float) -> None:
        gained = mask & ~node.kernel
        lost = node.kernel & ~mask
        if gained:
            for b in bits_of(gained):
                owners = 1 + sum(
                    1
                    for m in self.nodes
                    if m is not node and m.kernel >> b & 1 and m.lease_until > now
                )
                if self.partitioned or now < self.blind_until or self._misjudged():
                    self.m.max_owners_split = max(self.m.max_owners_split, owners)
                else:
                    self.m.max_owners = max(self.m.max_owners, owners)
        node.kernel = mask
        if node.core is not None:
            self._unserve(node, lost, now)
            self._serve(gained, now)

    def _serve(self, mask: int, now: float) -> None:
        for b in bits_of(mask):
            if self.owner_count[b] == 0 and self.ready:
                self.m.max_unowned = max(self.m.max_unowned, now - self.unowned_since[b])
            self.owner_count[b] += 1

    def _unserve(self, node: _Node, mask: int, now: float) -> None:
        for b in bits_of(mask):
            self.owner_count[b] -= 1
            if self.owner_count[b] == 0:
                self.unowned_since[b] = now

    # ---------------------------------------------------------------- events of one core
    def _poke(self, node: _Node, now: float) -> None:
        """After a local command on the node's core."""
        assert node.driver is not None
        node.driver.poke(now)
        self._after(now)

    def _after(self, now: float) -> None:
        """After a driver call: a batch of events that may have ended a convergence."""
        if self.relevant:
            self.relevant = False
            if self.pending:
                self._check_converged(now)

    def _on_event(self, node: _Node, e: ev.Event, now: float) -> None:
        """The metrics of one event (the driver already applied BucketsChanged)."""
        if isinstance(e, ev.BucketsChanged):
            self.relevant = True
        elif isinstance(e, ev.PeerDown):
            peer = self.by_name[e.name]
            self.believed_dead.add((node.index, peer.index))
            if self._reachable(node, peer):
                self.m.false_failovers += 1
            elif peer.lease_until - self.cfg.lease > now - self.cfg.dead_after:
                # It did send within dead_after, but nothing got through before it died
                # (or the partition): its lease may still run, exactly as in a partition.
                self.blind_until = max(self.blind_until, peer.lease_until)
            self.relevant = True
        elif isinstance(e, ev.PeerUp):
            self.believed_dead.discard((node.index, self.by_name[e.name].index))
            self.relevant = True
        elif isinstance(e, ev.StateChanged):
            self.relevant = True
            if e.old is NodeState.STARTING:
                self._unheard(node, now)
            if e.new is NodeState.UP and node.joining:
                node.joining = False
                self._pend("join", now, node.name)
        elif isinstance(e, ev.Drained):
            self.at(now + 0.1, partial(self._stopped, node))
        elif isinstance(e, ev.SplitBrainDetected):
            self.m.split_brain_events += 1
        elif isinstance(e, ev.ViewChanged):
            self.relevant = True

    def _unheard(self, node: _Node, now: float) -> None:
        """The node's listening period is over. A live, reachable peer it has not heard at all
        (loss silenced the link for dead_after) is behind a partition as far as the protocol can
        tell, exactly like a peer it declared dead, until it hears it (PeerUp)."""
        assert node.core is not None
        heard = {n.name for n in node.core.snapshot(now).nodes if n.alive}
        for m in self.nodes:
            if m is not node and m.core is not None and m.name not in heard:
                self.believed_dead.add((node.index, m.index))

    def _stopped(self, node: _Node, now: float) -> None:
        driver = node.driver
        if driver is not None and driver.core.state is NodeState.STOPPING:
            driver.core.stopped(now)
            driver.shutdown(now)  # the daemon says goodbye and exits after STOP
            self._after(now)
            self._unserve(node, node.kernel, now)
            node.driver = node.recv = None
            node.wake = 2**62
            self._retarget()

    # ---------------------------------------------------------------- convergence
    def _pend(self, kind: str, now: float, node: str) -> None:
        if self.ready:
            self.pending.append(_Pending(kind, now, node, self.last_converged))

    def _components(self) -> dict[int, list[_Node]]:
        comps: dict[int, list[_Node]] = {}
        for n in self.nodes:
            if n.core is not None:
                comps.setdefault(n.group, []).append(n)
        return comps

    def unsettled(self) -> str | None:
        """Why the farm is not settled, or None: in every connected component, the kernels of
        the live nodes hold a balanced assignment of the component's UP nodes (every bucket
        exactly once, every node within its quota, nodes that are not UP hold nothing), and
        every core's view is that UP set. A balanced assignment is a fixed point of
        `rebalance`, so nothing moves any more."""
        return self._settlement()[0]

    def _settlement(self) -> tuple[str | None, list[tuple[Members, list[str | None]]]]:
        """(why not settled or None, and when settled each component's UP set and owners)."""
        states = []
        for comp in self._components().values():
            members = self._members(comp)
            for n in comp:
                assert n.core is not None
                if n.core.members != members:
                    return f"{n.name} sees members {n.core.members}, not {members}", []
            owners = self._owners(comp)
            why = balanced(owners, members, self.cfg.buckets)
            if why is not None:
                return why, []
            states.append((members, owners))
        return None, states

    @staticmethod
    def _members(comp: list[_Node]) -> Members:
        return tuple(
            sorted(
                (n.name, n.core.weight)
                for n in comp
                if n.core is not None and n.core.state is NodeState.UP
            )
        )

    def _owners(self, comp: list[_Node]) -> list[str | None]:
        """The owner of every bucket by the kernels of `comp`, "*" for a bucket held twice."""
        owners: list[str | None] = [None] * self.cfg.buckets
        for n in comp:
            for b in bits_of(n.kernel):
                owners[b] = n.name if owners[b] is None else "*"
        return owners

    def _check_converged(self, now: float) -> bool:
        why, states = self._settlement()
        if why is not None:
            return False
        owners: list[str | None] | None = None
        if len(states) == 1:
            members, owners = states[0]
            self._balance(owners, members)
        before = self.pending[0].before if self.pending else None
        for p in self.pending:
            self.m.convergence.append(
                {
                    "event": p.kind,
                    "node": p.node,
                    "t": round(p.t, 4),
                    "convergence_ms": round((now - p.t) * 1000.0, 1),
                }
            )
        if before is not None and owners is not None:
            # Moves of one quiet period, against the converged state before it.
            item = self.m.convergence[-1]
            item["moved"] = moved(before, owners)
            item["optimal_moved"] = min_moves(before, members, self.cfg.buckets)
            self.m.moved += item["moved"]
            self.m.optimal += item["optimal_moved"]
        self.pending.clear()
        self.last_converged = owners
        return True

    def _balance(self, owners: list[str | None], members: Members) -> None:
        active = [(n, w) for n, w in members if w > 0]
        if not active:
            return
        total = sum(w for _, w in active)
        counts: dict[str | None, int] = {}
        for o in owners:
            counts[o] = counts.get(o, 0) + 1
        worst = max(counts.get(n, 0) / (self.cfg.buckets * w / total) for n, w in active)
        self.m.balance = max(self.m.balance, worst)

    # ---------------------------------------------------------------- the main loop
    def _broadcast(self, node: _Node, payload: bytes, net: str) -> None:
        targets = self.targets[node.index]
        m, cfg = self.m, self.cfg
        m.bytes_sent += len(payload) * (len(self.nodes) - 1)
        if cfg.duplicate or cfg.reorder or self.lossy:
            self._broadcast_each(node, targets, payload, net)
            return
        # The common case, with the random draws made in bulk (see _Draws): this loop runs
        # once per delivery, 26 million times in 64 nodes x 10 minutes.
        draws = self.draws
        if cfg.loss:
            lost = draws.lost(len(targets), cfg.loss)
            if lost:
                targets = targets.copy()
                for i in reversed(lost):
                    del targets[i]
        m.deliveries += len(targets)
        ring, wrap, base = self.ring, _RING - 1, self.k + self.dmin
        for r, d in zip(targets, draws.delays(len(targets)), strict=True):
            ring[(base + d) & wrap].append((r, payload, net))

    def _broadcast_each(
        self, sender: _Node, targets: list[_Node], payload: bytes, net: str
    ) -> None:
        """Delivery with duplication, reordering or a lossy node: the draws of one delivery at
        a time. A lossy node's datagrams are lost independently per receiver (unicast, as the
        pulse sends them), on the way out and again on the way in."""
        cfg = self.cfg
        rnd = self.draws.rnd.random
        loss, dup, reorder = cfg.loss, cfg.duplicate, cfg.reorder
        fault = cfg.fault_loss if self.lossy else 0.0
        out_lossy = sender.lossy
        base, span = self.k + self.dmin, self.dspan
        ring, wrap = self.ring, _RING - 1
        late = int(2 * cfg.interval * _INV)
        for r in targets:
            if loss and rnd() < loss:
                continue
            if fault and ((out_lossy and rnd() < fault) or (r.lossy and rnd() < fault)):
                continue
            copies = 2 if dup and rnd() < dup else 1
            for _ in range(copies):
                kk = base + int(rnd() * span)
                if reorder and rnd() < reorder:
                    kk += int(rnd() * late)
                ring[kk & wrap].append((r, payload, net))
                self.m.deliveries += 1

    def run(self) -> dict[str, Any]:
        # The loop allocates a tuple per delivery, none of them in a reference cycle: the cyclic
        # garbage collector would only walk them (about 3 % of the run), so it waits until the end.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        wall = time.perf_counter()
        self._plan()
        end_k = self._k(cfg.duration)
        ring, actions = self.ring, self.actions
        mask = _RING - 1
        next_action = self._k(actions[0][0]) if actions else end_k + 1
        for k in range(end_k + 1):
            if k >= next_action:
                self.k = self.soonest = k
                while k >= next_action:
                    t, _, fn = heapq.heappop(actions)
                    fn(t)
                    next_action = self._k(actions[0][0]) if actions else end_k + 1
            items = ring[k & mask]
            if not items:
                continue
            ring[k & mask] = []
            self.k, self.soonest = k, k + 1
            now = k * RES
            assert not self.relevant
            for node, payload, net in items:
                if payload is not None:
                    recv = node.recv
                    if recv is None:
                        continue  # the daemon is down
                    result = recv(payload, net, now)
                    if result is False:
                        continue  # only a peer's liveness changed: no event, nothing to send
                    node.driver.received(result, now)  # type: ignore[union-attr]
                else:
                    driver = node.driver
                    if driver is None or node.wake != k:
                        continue  # down, or a stale wake-up: the node asked for another slot
                    node.wake = 2**62
                    driver.timer(now)
                if self.relevant:
                    self._after(now)
        return self._result(time.perf_counter() - wall)

    # ---------------------------------------------------------------- scenarios
    def _plan(self) -> None:
        cfg = self.cfg
        if self.script is not None:
            self._plan_script(self.script)
            return
        n = len(self.nodes)
        first = n // 2 if cfg.scenario == "join" else n
        # Daemons start within one interval of each other, and every scenario event falls at a
        # random phase of the heartbeat schedule, so that worst cases (a crash right after a
        # heartbeat) are sampled, not avoided.
        for node in self.nodes[: max(1, first)]:
            self.at(self.rnd.uniform(0, cfg.interval), partial(self.start, node))
        warm = 2 * cfg.dead_after + 0.5 + cfg.interval
        self.at(warm, self._warm)
        t = warm + cfg.period / 2
        while t < cfg.duration:
            self.at(t + self.rnd.uniform(0, cfg.interval), getattr(self, f"_step_{cfg.scenario}"))
            t += cfg.period

    def _plan_script(self, script: Sequence[Action]) -> None:
        for node in self.nodes:
            self.at(0.0, partial(self.start, node))
        self.at(2 * self.cfg.dead_after + 0.5, self._warm)
        for t, kind, arg in script:
            self.at(t, partial(self._act, kind, arg))

    def _act(self, kind: str, arg: int, now: float) -> None:
        """One scripted step; steps that make no sense right now (crash a dead node) are no-ops."""
        node = self.nodes[arg % len(self.nodes)]
        if kind == "crash" and node.core is not None:
            self.crash(node, now)
        elif kind == "start" and node.core is None:
            self.start(node, now)
        elif kind == "drain":
            self._drain(node, now)
        elif kind in ("healthy", "unhealthy") and node.core is not None:
            node.core.set_app_healthy(kind == "healthy", now)
            self._poke(node, now)
        elif kind == "partition":
            for n in self.nodes:
                n.group = 0 if n.index <= arg % len(self.nodes) else 1
            self._retarget()
        elif kind == "heal":
            for n in self.nodes:
                n.group = 0
            self._retarget()
        elif kind == "lossy":
            self._set_lossy(node, True)
        elif kind == "lossless":
            self._set_lossy(node, False)
        elif kind == "quiet":
            self.cfg.loss = self.cfg.duplicate = self.cfg.reorder = 0.0

    def _set_lossy(self, node: _Node, lossy: bool) -> None:
        if node.lossy != lossy:
            node.lossy = lossy
            self.lossy += 1 if lossy else -1

    def _warm(self, now: float) -> None:
        self.ready = True
        for b in range(self.cfg.buckets):
            if self.owner_count[b] == 0:
                self.unowned_since[b] = now
        self.pending.append(_Pending("start", now, "-", None))
        self._check_converged(now)

    def _live(self) -> list[_Node]:
        return [n for n in self.nodes if n.core is not None]

    def _step_crash(self, now: float) -> None:
        live = self._live()
        if not live:
            return
        victim = self.rnd.choice(live)
        self.crash(victim, now)
        self.at(now + self.cfg.period / 2, partial(self.start, victim))

    def _drain(self, node: _Node, now: float) -> None:
        if node.core is None:
            return
        self._pend("drain", now, node.name)
        node.core.leave(now)
        self._poke(node, now)

    def _step_join(self, now: float) -> None:
        down = [n for n in self.nodes if n.core is None]
        if down:
            self.start(down[0], now)
            return
        node = self.rnd.choice(self.nodes)
        self._drain(node, now)
        self.at(now + self.cfg.period / 2, partial(self._restart, node))

    def _restart(self, node: _Node, now: float) -> None:
        if node.core is None:
            self.start(node, now)

    def _step_drain(self, now: float) -> None:
        live = [n for n in self._live() if n.core is not None and n.core.state is NodeState.UP]
        if not live:
            return
        node = self.rnd.choice(live)
        self._drain(node, now)
        self.at(now + self.cfg.period / 2, partial(self._restart, node))

    def _step_partition(self, now: float) -> None:
        live = self._live()
        if len(live) < 2:
            return
        self.rnd.shuffle(live)
        cut = self.rnd.randint(1, len(live) - 1)
        for i, node in enumerate(live):
            node.group = 0 if i < cut else 1
        self._retarget()
        self._pend("partition", now, "-")
        self.at(now + self.cfg.period / 2, self._heal)

    def _heal(self, now: float) -> None:
        for node in self.nodes:
            node.group = 0
        self._retarget()
        self.pending.clear()  # a partition's own convergence is per side; measure the heal
        self._pend("heal", now, "-")

    def _step_flap(self, now: float) -> None:
        node = self.nodes[0]
        if node.core is None:
            return
        steps = max(1, int(self.cfg.period / (2 * self.cfg.dead_after)))
        for i in range(steps):
            self.at(now + i * 2 * self.cfg.dead_after, partial(self._toggle, node))

    def _toggle(self, node: _Node, now: float) -> None:
        if node.core is None:
            return
        self._pend("flap", now, node.name)
        node.core.set_app_healthy(not node.core.app_healthy, now)
        self._poke(node, now)

    def _step_rolling(self, now: float) -> None:
        live = self._live()
        if not live:
            return
        index = int(now / self.cfg.period) % len(self.nodes)
        node = self.nodes[index]
        self._drain(node, now)
        self.at(now + self.cfg.period / 2, partial(self._restart, node))

    def _step_hb_loss(self, now: float) -> None:
        """chaos's hb_loss fault: a random live node loses fault_loss of its heartbeats, both
        ways, on every network, for half a period. Nothing should move: the convergence
        measured from the end of the fault is 0 unless a false failover moved buckets."""
        live = self._live()
        if not live:
            return
        node = self.rnd.choice(live)
        self._set_lossy(node, True)
        self.at(now + self.cfg.period / 2, partial(self._hb_loss_end, node))

    def _hb_loss_end(self, node: _Node, now: float) -> None:
        self._set_lossy(node, False)
        self._pend("hb_loss", now, node.name)
        self._check_converged(now)

    # ---------------------------------------------------------------- result
    def _result(self, wall: float) -> dict[str, Any]:
        cfg, m = self.cfg, self.m
        for b in range(cfg.buckets):
            if self.ready and self.owner_count[b] == 0:
                m.max_unowned = max(m.max_unowned, cfg.duration - self.unowned_since[b])
        conv = [c for c in m.convergence if c["event"] != "start"]
        drops: dict[str, int] = {}
        for n in self.nodes:
            if n.core is not None:
                for k, v in n.core.drops.items():
                    drops[k] = drops.get(k, 0) + v
        return {
            "nodes": cfg.nodes,
            "buckets": cfg.buckets,
            "scenario": cfg.scenario,
            "loss": cfg.loss,
            "delay_ms": list(cfg.delay_ms),
            "duplicate": cfg.duplicate,
            "reorder": cfg.reorder,
            "duration_s": cfg.duration,
            "seed": cfg.seed,
            "max_owners_per_bucket": m.max_owners,
            "max_owners_while_split": m.max_owners_split,
            "max_unowned_ms": round(m.max_unowned * 1000.0, 1),
            "convergence_ms": [c["convergence_ms"] for c in conv],
            "events": conv,
            "unconverged_events": [p.kind for p in self.pending],
            "moved_buckets": m.moved,
            "optimal_moved_buckets": m.optimal,
            "balance_max_over_mean": round(m.balance, 4),
            "false_failovers": m.false_failovers,
            "split_brain_events": m.split_brain_events,
            "heartbeat_bytes_per_node_per_s": round(
                m.bytes_sent / max(1, cfg.nodes) / cfg.duration, 1
            ),
            "datagrams_received": m.deliveries,
            "drops": drops,
            "wall_s": round(wall, 2),
        }


def simulate(cfg: SimConfig) -> dict[str, Any]:
    return Simulator(cfg).run()
