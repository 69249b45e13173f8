"""The driver of the membership core (`vipfarm.membership.driver`), and the simulator using it.

The scripted tests run two `Driver`s whose `Io` only records: the test delivers every datagram
(after a fixed delay) and fires every timer at the time asked for, and then reads the record
for the driver's rules. The last test replays what one simulated node's driver was fed through a
plain recording `Io` and expects the same heartbeats, byte for byte, at the same times: the
simulator measures exactly the code path of the pulse.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import vipfarm.membership.sim as sim_module
from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.membership.driver import Driver, Io
from vipfarm.membership.sim import RES, Action, SimConfig, Simulator
from vipfarm.membership.wire import Codec, Drop, Heartbeat, NodeState, mask_of, node_id

KEY = b"test-farm-key-0123456789abcdef-0123"
INTERVAL, LEASE, DEAD_AFTER, DELAY = 0.125, 0.25, 0.5, 1 / 64
NAMES = ["a", "b"]  # a has priority


def config(name: str) -> MembershipConfig:
    return MembershipConfig(
        farm="test",
        node=name,
        key=KEY,
        nodes=dict.fromkeys(NAMES, 1),
        buckets=16,
        interval=INTERVAL,
        lease=LEASE,
        dead_after=DEAD_AFTER,
    )


Call = tuple[str, float, object]


@dataclass
class Recorder:
    """An `Io` that records every call as (what, time, detail) and holds what it is told to.
    `now` is the time of the driver call in progress (`send` and `wake_at` get none)."""

    now: float = 0.0
    kernel: frozenset[int] = frozenset()
    wake: float = math.inf
    calls: list[Call] = field(default_factory=list)

    def send(self, network: str, payload: bytes) -> None:
        self.calls.append(("send", self.now, (network, payload)))

    def renew_leases(self, now: float) -> None:
        self.calls.append(("renew", now, None))

    def apply_buckets(self, owned: frozenset[int], now: float) -> frozenset[int]:
        self.kernel = owned
        self.calls.append(("apply", now, owned))
        return owned

    def on_event(self, event: ev.Event, now: float) -> None:
        self.calls.append(("event", now, event))

    def wake_at(self, when: float) -> None:
        self.wake = when
        self.calls.append(("wake", self.now, when))

    def sent(self) -> list[tuple[float, str, bytes]]:
        return [(t, *d) for w, t, d in self.calls if w == "send" and isinstance(d, tuple)]


@dataclass
class Farm:
    """Two drivers over a loss-free network with a fixed delay."""

    drivers: dict[str, Driver] = field(default_factory=dict)
    io: dict[str, Recorder] = field(default_factory=dict)
    flight: list[tuple[float, int, str, bytes]] = field(default_factory=list)
    now: float = 0.0
    _seq: int = 0

    def __post_init__(self) -> None:
        self.codec = Codec("test", KEY, 16)
        for n in NAMES:
            self.io[n] = Recorder()
            self.drivers[n] = Driver(Membership(config(n), 1, codec=self.codec), self.io[n])

    def core(self, name: str) -> Membership:
        return self.drivers[name].core

    def call(self, name: str, fn: Callable[[Driver], object]) -> object:
        """One driver call at `now`; what it sent is put in flight to the other node."""
        io = self.io[name]
        io.now = self.now
        before = len(io.calls)
        result = fn(self.drivers[name])
        for what, _, detail in io.calls[before:]:
            if what == "send" and isinstance(detail, tuple):
                for peer in NAMES:
                    if peer != name:
                        self._seq += 1
                        heapq.heappush(self.flight, (self.now + DELAY, self._seq, peer, detail[1]))
        return result

    def start(self, name: str) -> None:
        self.core(name).join(self.now)
        self.core(name).set_app_healthy(True, self.now)
        self.call(name, lambda d: d.poke(self.now))

    def step(self, running: set[str]) -> tuple[str, str, bytes | None]:
        """The earliest delivery or due timer of the running nodes: (kind, node, payload)."""
        timer = min(running, key=lambda n: self.io[n].wake)
        t_timer = self.io[timer].wake
        while self.flight and self.flight[0][2] not in running:
            heapq.heappop(self.flight)  # to a node that is not running: lost
        if self.flight and self.flight[0][0] <= t_timer:
            self.now, _, dst, payload = heapq.heappop(self.flight)
            self.call(dst, lambda d: d.datagram(payload, "lan", self.now))
            return "datagram", dst, payload
        self.now = max(self.now, t_timer)
        self.io[timer].wake = math.inf  # a request is used up when it fires
        self.call(timer, lambda d: d.timer(self.now))
        return "timer", timer, None

    def run_until(self, t: float, running: set[str]) -> None:
        while (
            min(
                min(self.io[n].wake for n in running),
                self.flight[0][0] if self.flight else math.inf,
            )
            <= t
        ):
            self.step(running)
        self.now = t


def settled_farm() -> Farm:
    farm = Farm()
    farm.start("a")
    farm.start("b")
    farm.run_until(2.0, {"a", "b"})
    assert [farm.core(n).state for n in NAMES] == [NodeState.UP, NodeState.UP]
    assert farm.io["a"].kernel | farm.io["b"].kernel == frozenset(range(16))
    return farm


def decode(payload: bytes) -> Heartbeat:
    hb = Codec("test", KEY, 16).decode(payload)
    assert isinstance(hb, Heartbeat)
    return hb


def test_a_rejected_datagram_returns_its_drop_and_touches_no_io() -> None:
    farm = settled_farm()
    b_last = farm.io["b"].sent()[-1][2]
    a_last = farm.io["a"].sent()[-1][2]
    calls = len(farm.io["a"].calls)
    before = dict(farm.core("a").drops)
    a = farm.drivers["a"]
    assert a.datagram(b_last, "lan", farm.now) is Drop.DUPLICATE  # delivered already
    assert a.datagram(a_last, "lan", farm.now) is Drop.OWN
    garbage = a.datagram(b"\x00garbage", "lan", farm.now)
    assert garbage in (Drop.MALFORMED, Drop.NOT_VIPFARM)
    assert a.datagram(b_last, "wifi", farm.now) is Drop.UNKNOWN_NETWORK
    assert len(farm.io["a"].calls) == calls
    after = farm.core("a").drops
    assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == {
        "duplicate": 1,
        "own": 1,
        garbage: 1,
        "unknown_network": 1,
    }


def test_buckets_are_applied_and_confirmed_before_a_heartbeat_announces_them() -> None:
    farm = settled_farm()
    for name in NAMES:
        kernel: frozenset[int] = frozenset()
        applied = 0
        for what, _, detail in farm.io[name].calls:
            if what == "apply" and isinstance(detail, frozenset):
                kernel, applied = detail, applied + 1
            elif what == "event" and isinstance(detail, ev.BucketsChanged):
                assert detail.owned == kernel  # on_event comes after the kernel has it
            elif what == "send" and isinstance(detail, tuple):
                assert decode(detail[1]).owned == mask_of(kernel)  # exactly the kernel's state
        assert applied >= 1 and kernel == farm.io[name].kernel != frozenset()


def test_leases_are_renewed_before_every_batch_of_heartbeats() -> None:
    farm = settled_farm()
    for name in NAMES:
        calls = farm.io[name].calls
        batches = 0
        for i, (what, t, _) in enumerate(calls):
            if what == "send" and calls[i - 1][0] != "send":
                assert calls[i - 1][:2] == ("renew", t)
                batches += 1
        assert batches == sum(1 for c in calls if c[0] == "renew") > 2 / INTERVAL


def test_a_peer_wanting_buckets_is_acknowledged_early_by_an_earlier_wake_up() -> None:
    farm = Farm()
    farm.start("a")
    farm.run_until(1.0, {"a"})
    assert farm.io["a"].kernel == frozenset(range(16))  # a alone holds everything
    farm.start("b")
    while True:
        before = farm.io["a"].wake
        kind, name, payload = farm.step({"a", "b"})
        if kind == "datagram" and name == "a" and payload is not None and decode(payload).want:
            break
    t = farm.now
    ack_at = farm.io["a"].wake
    assert ack_at < before  # the driver re-armed at once, not at the next interval
    assert t <= ack_at <= t + INTERVAL / 20 + 1e-9
    while farm.step({"a", "b"})[:2] != ("timer", "a"):
        pass
    (when, _, ack), *_ = [s for s in farm.io["a"].sent() if s[0] >= t]
    assert when == ack_at < before
    assert node_id("b") in decode(ack).acks


def test_a_daemon_that_exits_after_stopped_applies_its_events_and_only_says_goodbye() -> None:
    farm = settled_farm()

    def leave(d: Driver) -> None:
        d.core.leave(farm.now)
        d.poke(farm.now)

    farm.call("b", leave)
    farm.run_until(3.0, {"a", "b"})
    assert farm.io["b"].kernel == frozenset() and farm.core("b").state is NodeState.STOPPING
    calls = farm.io["b"].calls
    before = len(calls)
    farm.core("b").stopped(farm.now)
    farm.call("b", lambda d: d.shutdown(farm.now))
    (w1, _, stop), (w2, _, bye) = calls[before:]
    assert (w1, stop) == ("event", ev.StateChanged(NodeState.STOPPING, NodeState.STOP))
    assert w2 == "send" and isinstance(bye, tuple) and decode(bye[1]).bye


# ------------------------------------------------------------ the simulator shares the driver
@dataclass
class Tee:
    """The simulated node's `Io` with every call of its driver's recorded on the way."""

    io: Io
    log: list[Call]
    now: float = 0.0

    def send(self, network: str, payload: bytes) -> None:
        self.log.append(("send", self.now, (network, payload)))
        self.io.send(network, payload)

    def renew_leases(self, now: float) -> None:
        self.io.renew_leases(now)

    def apply_buckets(self, owned: frozenset[int], now: float) -> frozenset[int]:
        return self.io.apply_buckets(owned, now)

    def on_event(self, event: ev.Event, now: float) -> None:
        self.io.on_event(event, now)

    def wake_at(self, when: float) -> None:
        self.log.append(("wake", self.now, when))
        self.io.wake_at(when)


def test_the_simulator_feeds_its_nodes_exactly_what_a_plain_driver_would_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """node01 only starts (at 0); its peers crash, restart and drain. Everything the simulator
    fed node01's driver, replayed into a fresh core through a recording Io, gives the same
    heartbeats at the same times, and the simulator woke node01 when its driver asked."""
    inputs: dict[str, list[Call]] = {}

    class Tap(Driver):
        def __init__(self, core: Membership, io: Io) -> None:
            self.tee = Tee(io, inputs.setdefault(core.name, []))
            self.poking = False  # poke calls timer itself: that call is not an input
            super().__init__(core, self.tee)
            # The simulator calls `receive` and then, unless it answered False, `received`.
            self.heard: tuple[bytes, str] | None = None
            receive = self.receive

            def tapped(data: bytes, network: str, now: float) -> bool | Drop:
                self.tee.now = now
                result = receive(data, network, now)
                if result is False:
                    self.tee.log.append(("datagram", now, (data, network, None)))
                else:
                    self.heard = (data, network)
                return result

            self.receive = tapped

        def received(self, result: bool | Drop, now: float) -> Drop | None:
            out = super().received(result, now)
            assert self.heard is not None
            self.tee.log.append(("datagram", now, (*self.heard, out)))
            self.heard = None
            return out

        def timer(self, now: float) -> None:
            self.tee.now = now
            if not self.poking:
                self.tee.log.append(("timer", now, None))
            super().timer(now)

        def poke(self, now: float) -> None:
            self.tee.now = now
            self.tee.log.append(("poke", now, None))
            self.poking = True
            super().poke(now)
            self.poking = False

    monkeypatch.setattr(sim_module, "Driver", Tap)
    cfg = SimConfig(nodes=3, buckets=32, loss=0.1, delay_ms=(0.5, 3.0), duration=4.0, seed=3)
    script: list[Action] = [(1.5, "crash", 1), (2.3, "start", 1), (2.6, "drain", 2)]
    sim = Simulator(cfg, script)
    on_wire: list[bytes] = []
    broadcast = sim._broadcast

    def tap_wire(node: sim_module._Node, payload: bytes, net: str) -> None:
        if node.name == "node01":
            on_wire.append(payload)
        broadcast(node, payload, net)

    monkeypatch.setattr(sim, "_broadcast", tap_wire)
    sim.run()

    log = inputs["node01"]
    assert [c for c in log if c[0] == "poke"] == [("poke", 0.0, None)]  # the start, only
    replay = Recorder()
    core = Membership(sim.mcfg["node01"], 1)
    driver = Driver(core, replay)
    core.join(0.0)
    core.set_app_healthy(True, 0.0)
    pending: tuple[float, float] | None = None  # (when, asked at) of node01's wake-up
    for what, t, detail in log:
        replay.now = t
        if pending is not None and what != "wake":
            assert t <= max(pending) + RES + 1e-9, "the simulator missed a wake-up"
        if what == "poke":
            driver.poke(t)
        elif what == "timer":
            assert pending is not None and pending[0] - 1e-9 <= t
            pending = None
            driver.timer(t)
        elif what == "datagram":
            assert isinstance(detail, tuple)
            data, network, result = detail
            assert driver.datagram(data, network, t) == result
        elif what == "wake":
            assert isinstance(detail, float)
            pending = (detail, t)
    sent = [(t, d) for w, t, d in log if w == "send"]
    assert sent == [(t, (net, payload)) for t, net, payload in replay.sent()]
    assert on_wire == [payload for _, _, payload in replay.sent()]
    assert len(sent) > 3.5 / INTERVAL  # one per interval at least, over 4 s
    assert any(decode_sim(d[0]).bye for w, _, d in log if w == "datagram" and isinstance(d, tuple))
    node01 = sim.by_name["node01"]
    assert node01.core is not None and node01.kernel == mask_of(replay.kernel) != 0
    assert node01.core.snapshot(cfg.duration) == core.snapshot(cfg.duration)


def decode_sim(payload: bytes) -> Heartbeat:
    hb = Codec("sim", sim_module._KEY, 32).decode(payload)
    assert isinstance(hb, Heartbeat)
    return hb
