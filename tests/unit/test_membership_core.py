"""The membership core driven by hand: two and three cores, a fake clock, exact deadlines.

Times are exact binary fractions (interval 1/8 s, lease 1/4 s, dead_after 1/2 s, delivery delay
1/64 s), so deadlines are asserted with `==`.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.membership.wire import VERSION, Codec, Drop, Heartbeat, NodeState

KEY = b"test-farm-key-0123456789abcdef-0123"
INTERVAL, LEASE, DEAD_AFTER, DELAY = 0.125, 0.25, 0.5, 1 / 64
E = TypeVar("E")


def config(name: str, names: list[str], **over: Any) -> MembershipConfig:
    fields: dict[str, Any] = {
        "farm": "test",
        "node": name,
        "key": KEY,
        "nodes": dict.fromkeys(names, 1),
        "buckets": 16,
        "interval": INTERVAL,
        "lease": LEASE,
        "dead_after": DEAD_AFTER,
    }
    fields.update(over)
    return MembershipConfig(**fields)


@dataclass
class Harness:
    names: list[str]
    over: dict[str, Any] = field(default_factory=dict)
    delay: float = DELAY
    confirm: bool = True  # apply BucketsChanged to the "kernel" and confirm at once
    shared: bool = True  # one codec for every core (False: each its own, for key changes)

    def __post_init__(self) -> None:
        cfg = config(self.names[0], self.names, **self.over)
        self.codec = Codec(cfg.farm, cfg.key, cfg.buckets)
        self.cores: dict[str, Membership] = {}
        self.running: set[str] = set()
        self.queue: list[tuple[float, int, str, str, bytes]] = []
        self.blocked: set[tuple[str, str]] = set()  # (src, dst) links that drop everything
        self.blocked_nets: set[tuple[str, str, str]] = set()  # (src, dst, network)
        self.log: list[tuple[float, str, ev.Event]] = []
        self.kernel: dict[str, frozenset[int]] = {}
        self.now = 0.0
        self._seq = 0
        self.tap: list[tuple[float, str, str, bytes]] = []  # everything sent: (t, src, net, data)
        for n in self.names:
            self.cores[n] = self.make(n, 1)

    def make(
        self, name: str, incarnation: int, cls: type[Membership] = Membership, **over: Any
    ) -> Membership:
        cfg = config(name, self.names, **{**self.over, **over})
        return cls(cfg, incarnation, codec=self.codec if self.shared else None)

    def inject(self, dst: str, payload: bytes, at: float, net: str = "lan") -> None:
        """Deliver `payload` to `dst` at `at` (an attacker on the network)."""
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, dst, net, payload))

    def start(self, name: str, now: float, healthy: bool = True) -> None:
        self.running.add(name)
        core = self.cores[name]
        core.join(now)
        core.set_app_healthy(healthy, now)
        self._drain(name, now)

    def crash(self, name: str) -> None:
        self.running.discard(name)

    def restart(
        self,
        name: str,
        now: float,
        incarnation: int,
        cls: type[Membership] = Membership,
        **over: Any,
    ) -> None:
        self.cores[name] = self.make(name, incarnation, cls, **over)
        self.kernel[name] = frozenset()
        self.start(name, now)

    def send(self, name: str, datagrams: list[tuple[str, bytes]], now: float) -> None:
        for net, payload in datagrams:
            self.tap.append((now, name, net, payload))
            for dst in self.running:
                if (
                    dst == name
                    or (name, dst) in self.blocked
                    or (name, dst, net) in self.blocked_nets
                ):
                    continue
                self._seq += 1
                heapq.heappush(self.queue, (now + self.delay, self._seq, dst, net, payload))

    def run_until(self, end: float) -> None:
        while True:
            timers = [(self.cores[n].get_timer(), n) for n in sorted(self.running)]
            t_timer, who = min(timers) if timers else (math.inf, "")
            t_msg = self.queue[0][0] if self.queue else math.inf
            t = min(t_timer, t_msg)
            if t > end:
                break
            self.now = t = max(t, self.now)
            if t_msg <= t_timer:
                _, _, dst, net, payload = heapq.heappop(self.queue)
                if dst in self.running:
                    self.cores[dst].receive_datagram(payload, net, t)
                    self._drain(dst, t)
                continue
            core = self.cores[who]
            core.handle_timer(t)
            self.send(who, core.datagrams_to_send(t), t)
            self._drain(who, t)
        self.now = end

    def _drain(self, name: str, now: float) -> None:
        core = self.cores[name]
        while (e := core.next_event()) is not None:
            self.log.append((now, name, e))
            if isinstance(e, ev.BucketsChanged) and self.confirm:
                self.kernel[name] = e.owned
                core.confirm_owned(e.owned, now)

    def events(self, name: str, kind: type[E]) -> list[tuple[float, E]]:
        return [(t, e) for t, n, e in self.log if n == name and isinstance(e, kind)]

    def owners(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for n in sorted(self.running):
            for b in self.kernel.get(n, frozenset()):
                out.setdefault(b, []).append(n)
        return out


def up_at(h: Harness, name: str) -> float:
    return next(t for t, e in h.events(name, ev.StateChanged) if e.new is NodeState.UP)


def acquired(h: Harness, name: str) -> list[tuple[float, frozenset[int]]]:
    return [(t, e.acquire) for t, e in h.events(name, ev.BucketsChanged) if e.acquire]


def released(h: Harness, name: str) -> list[tuple[float, frozenset[int]]]:
    return [(t, e.release) for t, e in h.events(name, ev.BucketsChanged) if e.release]


def last_sent(h: Harness, name: str) -> float:
    """When `name` last sent a heartbeat."""
    return max(t for t, src, _, _ in h.tap if src == name)


def only_owners(h: Harness) -> None:
    owners = h.owners()
    assert all(len(v) == 1 for v in owners.values()), owners
    assert sorted(owners) == list(range(16)), owners


# ------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"node": "ghost"}, "'ghost' is not among the configured nodes"),
        ({"nodes": {"a": 1, "x" * 33: 1}}, "is 33 bytes of UTF-8; use 1..32 bytes"),
        ({"nodes": {"a": 70000}}, "weight 70000 of node 'a' is out of range: use 0..65535"),
        ({"nodes": {"a": 1.5}}, "weight of node 'a' is 1.5; use an integer"),
        ({"buckets": 5000}, "bucket count 5000 is out of range: use 1..4096"),
        ({"lease": 0.6}, "interval < lease < dead_after"),
        ({"lease": 0.1}, "interval < lease < dead_after"),
        ({"networks": ()}, "must be a non-empty list of distinct names"),
        ({"networks": ("lan", "lan")}, "must be a non-empty list of distinct names"),
        ({"farm": ""}, "farm name is empty"),
        ({"key": b"short"}, "at least 32 random bytes"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(over: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"farm": "f", "node": "a", "key": KEY, "nodes": {"a": 1}}
    fields.update(over)
    with pytest.raises(ValueError, match=re.escape(message)):
        Membership(MembershipConfig(**fields), 1)


def test_incarnation_and_weight_are_checked() -> None:
    cfg = config("a", ["a"])
    with pytest.raises(ValueError, match="incarnation 0 is out of range"):
        Membership(cfg, 0)
    core = Membership(cfg, 1)
    with pytest.raises(ValueError, match=r"weight -1 is out of range: use an integer 0\.\.65535"):
        core.set_weight(-1, 0.0)


# ------------------------------------------------------------------------- one node
def test_lone_node_learns_for_dead_after_then_takes_everything() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    assert h.cores["a"].get_timer() == -math.inf  # first heartbeat at once
    h.run_until(2.0)
    states = [(t, e.new) for t, e in h.events("a", ev.StateChanged)]
    assert states == [
        (0.0, NodeState.STARTING),
        (DEAD_AFTER, NodeState.WAIT),
        (DEAD_AFTER, NodeState.UP),
    ]
    assert acquired(h, "a") == [(DEAD_AFTER, frozenset(range(16)))]
    assert h.cores["a"].owned == frozenset(range(16))


def test_heartbeats_every_interval_and_exact_timer() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    sent = []
    t = 0.0
    core = h.cores["a"]
    for _ in range(5):
        core.handle_timer(t)
        if core.datagrams_to_send(t):
            sent.append(t)
        t = core.get_timer()
    assert sent == [0.0, 0.125, 0.25, 0.375, 0.5]


# ------------------------------------------------------------------------- two nodes
def test_join_hands_over_release_before_acquire() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.run_until(1.0)
    h.start("b", 1.0)
    h.run_until(3.0)
    b_up = up_at(h, "b")
    assert b_up == 1.0 + DEAD_AFTER
    [(t_rel, rel)] = released(h, "a")
    [_, (t_acq, acq)] = acquired(h, "a")[:1] + acquired(h, "b")
    assert rel == acq and len(acq) == 8
    # a releases when it hears b is UP (one delivery delay); b acquires when it hears a's
    # heartbeat that shows the release and acknowledges b's claim (one more delay after a's
    # triggered heartbeat).
    assert t_rel == b_up + DELAY
    assert t_acq == t_rel + DELAY
    only_owners(h)


def test_no_acquire_before_the_release_is_confirmed() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.run_until(1.0)
    h.confirm = False  # a's kernel never confirms the release
    h.start("b", 1.0)
    h.run_until(3.0)
    assert released(h, "a")
    assert acquired(h, "b") == []
    assert h.cores["b"].snapshot(3.0).wanted  # still waiting


def test_peer_declared_dead_exactly_dead_after_its_last_heartbeat() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    sent_b = h.cores["b"].get_timer() - INTERVAL  # b's last heartbeat went out here
    h.crash("b")
    h.run_until(4.0)
    [(t_dead, down)] = h.events("a", ev.PeerDown)
    assert down.name == "b"
    assert t_dead == sent_b + DELAY + DEAD_AFTER
    # a took b's buckets in the same instant: no live peer left to acknowledge
    assert acquired(h, "a")[-1] == (t_dead, frozenset(h.kernel["b"]))


def test_replays_duplicates_strangers_and_own_datagrams_are_counted() -> None:
    h = Harness(["a", "b"])
    a, b = h.cores["a"], h.cores["b"]
    b.join(0.0)
    unproven = b.datagrams_to_send(0.0)[0][1]
    # b's incarnation is new to a and acks nothing of a's: held, not applied
    assert a.receive_datagram(unproven, "lan", 0.1) is True  # a asks for the proof at once
    assert a.receive_datagram(unproven, "lan", 0.1) is Drop.DUPLICATE
    # a's heartbeat names b in its need list; b's answer acks a's incarnation: proven
    assert b.receive_datagram(a.datagrams_to_send(0.1)[0][1], "lan", 0.1) is True
    first = b.datagrams_to_send(0.1)[0][1]
    second = b.datagrams_to_send(0.225)[0][1]
    assert a.receive_datagram(second, "lan", 0.2) is True
    assert a.receive_datagram(second, "lan", 0.2) is Drop.DUPLICATE
    assert a.receive_datagram(first, "lan", 0.2) is Drop.REPLAY
    assert a.receive_datagram(a.datagrams_to_send(0.2)[0][1], "lan", 0.2) is Drop.OWN
    assert a.receive_datagram(second, "wifi", 0.2) is Drop.UNKNOWN_NETWORK
    stranger = Membership(config("zed", ["zed"]), 1, codec=h.codec)
    assert (
        a.receive_datagram(stranger.datagrams_to_send(0.2)[0][1], "lan", 0.2) is Drop.UNKNOWN_NODE
    )
    assert a.receive_datagram(b"garbage", "lan", 0.2) is Drop.MALFORMED
    old = Membership(config("b", ["a", "b"]), 1, codec=h.codec)
    b2 = Membership(config("b", ["a", "b"]), b.incarnation + 1, codec=h.codec)
    # b restarted: its new incarnation supersedes the proven one once it proves itself
    assert a.receive_datagram(b2.datagrams_to_send(0.3)[0][1], "lan", 0.3) is True
    assert b2.receive_datagram(a.datagrams_to_send(0.31)[0][1], "lan", 0.31)
    assert a.receive_datagram(b2.datagrams_to_send(0.32)[0][1], "lan", 0.32) is True
    old._seq = 99
    assert a.receive_datagram(old.datagrams_to_send(0.32)[0][1], "lan", 0.32) is Drop.REPLAY
    assert a.drops == {
        "unproven": 2,
        "duplicate": 2,
        "replay": 2,
        "own": 1,
        "unknown_network": 1,
        "unknown_node": 1,
        "malformed": 1,
    }
    events = list(iter(a.next_event, None))
    assert any(isinstance(e, ev.PeerUp) and e.restarted for e in events)


def test_drain_releases_everything_then_says_goodbye() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    only_owners(h)
    h.cores["b"].leave(2.0)
    h._drain("b", 2.0)
    h.run_until(3.0)
    states = [e.new for _, e in h.events("b", ev.StateChanged)][-2:]
    assert states == [NodeState.DRAINING, NodeState.STOPPING]
    assert h.events("b", ev.Drained)
    assert h.kernel["b"] == frozenset()
    assert h.kernel["a"] == frozenset(range(16))
    h.cores["b"].stopped(3.0)
    h.send("b", h.cores["b"].shutdown(3.0), 3.0)
    h.crash("b")
    h.run_until(3.5)
    [(t_down, _)] = h.events("a", ev.PeerDown)
    assert t_down == 3.0 + DELAY  # at once, not after dead_after


def test_shutdown_refuses_while_holding_buckets() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.run_until(1.0)
    assert h.cores["a"].shutdown(1.0) == []


def test_unhealthy_app_gives_buckets_away_and_healthy_takes_them_back() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    share = h.kernel["a"]
    h.cores["a"].set_app_healthy(False, 2.0)
    h._drain("a", 2.0)
    h.run_until(2.5)
    assert h.cores["a"].state is NodeState.WAIT
    assert h.kernel["a"] == frozenset() and h.kernel["b"] == frozenset(range(16))
    h.cores["a"].set_app_healthy(True, 2.5)
    h._drain("a", 2.5)
    h.run_until(3.0)
    assert h.kernel["a"] == share
    only_owners(h)


def test_weight_zero_takes_nothing_and_weight_shifts_share() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    h.cores["b"].set_weight(0, 2.0)
    h._drain("b", 2.0)
    h.run_until(2.5)
    assert h.kernel["b"] == frozenset()
    h.cores["b"].set_weight(3, 2.5)
    h._drain("b", 2.5)
    h.run_until(3.0)
    assert len(h.kernel["b"]) == 12
    only_owners(h)


def test_stalled_daemon_gives_up_its_buckets_and_relearns() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.run_until(1.0)
    core = h.cores["a"]
    last_sent = core.get_timer() - INTERVAL
    late = 1.0 + LEASE + INTERVAL  # the event loop was stuck past the lease
    core.handle_timer(late)
    lost, release = list(iter(core.next_event, None))
    assert isinstance(lost, ev.LeaseLost) and lost.silent_s == pytest.approx(late - last_sent)
    assert isinstance(release, ev.BucketsChanged) and release.release == frozenset(range(16))
    core.confirm_owned([], late)
    assert core.owned == frozenset()
    t = late
    while t < late + DEAD_AFTER:
        core.datagrams_to_send(t)
        t = core.get_timer()
        core.handle_timer(t)
    assert t == late + DEAD_AFTER
    assert core.owned == frozenset(range(16))


# ------------------------------------------------------------------------- three nodes
def test_crash_of_one_of_three_needs_the_survivors_acknowledgements() -> None:
    h = Harness(["a", "b", "c"])
    for n in "abc":
        h.start(n, 0.0)
    h.run_until(2.0)
    only_owners(h)
    c_buckets = h.kernel["c"]
    sent_c = h.cores["c"].get_timer() - INTERVAL
    h.crash("c")
    t_dead = sent_c + DELAY + DEAD_AFTER
    h.run_until(t_dead - DELAY)
    h.blocked.add(("b", "a"))  # from now on a cannot hear b's acknowledgements
    h.run_until(t_dead + 0.25)
    assert [t for t, _ in h.events("a", ev.PeerDown)] == [t_dead]
    assert [t for t, _ in h.events("b", ev.PeerDown)] == [t_dead]
    # Each waits for the other's acknowledgement: b never heard a's claim, a never hears b.
    assert acquired(h, "a")[1:] == acquired(h, "b")[1:] == []
    assert h.cores["a"].snapshot(t_dead).wanted and h.cores["b"].snapshot(t_dead).wanted
    unblock = h.now
    h.blocked.clear()
    h.run_until(unblock + 0.5)
    only_owners(h)
    ((t_a, got_a),) = acquired(h, "a")[1:]
    ((_, got_b),) = acquired(h, "b")[1:]
    assert got_a | got_b == c_buckets and not got_a & got_b
    assert unblock < t_a <= unblock + INTERVAL / 4 + 2 * DELAY


def test_partition_both_sides_take_all_then_heal_deterministically() -> None:
    h = Harness(["a", "b", "c"])
    for n in "abc":
        h.start(n, 0.0)
    h.run_until(2.0)
    h.blocked |= {("c", "a"), ("a", "c"), ("c", "b"), ("b", "c")}
    h.run_until(4.0)
    assert h.kernel["c"] == frozenset(range(16))
    assert h.kernel["a"] | h.kernel["b"] == frozenset(range(16))
    h.blocked.clear()
    h.run_until(6.0)
    assert h.events("c", ev.SplitBrainDetected)
    assert h.events("c", ev.SplitBrainHealed)
    only_owners(h)
    views = {h.cores[n].members for n in "abc"}
    assert views == {(("a", 1), ("b", 1), ("c", 1))}


def test_lossy_link_is_not_a_failover_when_another_peer_vouches() -> None:
    h = Harness(["a", "b", "c"])
    for n in "abc":
        h.start(n, 0.0)
    h.run_until(2.0)
    h.blocked.add(("b", "a"))  # a stops hearing b directly; c still hears b
    h.run_until(5.0)
    assert h.events("a", ev.PeerDown) == []
    assert h.cores["a"].snapshot(5.0).nodes[1].alive is True
    h.crash("b")
    h.run_until(7.0)
    [(t_dead, _)] = h.events("a", ev.PeerDown)
    [(t_dead_c, _)] = h.events("c", ev.PeerDown)
    # a learns of b's death at most 2 intervals + a delay after c does
    assert t_dead_c <= t_dead <= t_dead_c + 2 * INTERVAL + DELAY


def test_a_node_that_hears_badly_keeps_its_peers_while_no_witness_could_speak() -> None:
    """d hears nothing of a, and one heartbeat of b and c every 3 intervals (heavy loss at d).
    b's heartbeats vouch for a, but each one's evidence runs out 2 intervals after it came,
    before the next one: d used to bury a. Now, at a's deadline no peer was heard recently
    enough to have vouched (no witness), so d keeps a until such a peer would be due itself,
    and the next heartbeat of b vouches again."""
    h = Harness(["a", "b", "c", "d"])
    for n in "abcd":
        h.start(n, 0.0)
    h.run_until(2.0)
    deaf = {("a", "d"), ("b", "d"), ("c", "d")}
    h.blocked |= deaf
    t = 2.0
    while t < 5.0:
        # Heartbeats go out every interval at the same phase: a window of one interval lets
        # exactly one of b's and one of c's through.
        h.blocked -= {("b", "d"), ("c", "d")}
        h.run_until(t + INTERVAL)
        h.blocked |= deaf
        t += 3 * INTERVAL
        h.run_until(t)
    assert h.events("d", ev.PeerDown) == []
    assert all(n.alive for n in h.cores["d"].snapshot(t).nodes)
    assert all(h.events(n, ev.PeerDown) == [] for n in "abc")
    # d hears b and c again (not a). When a dies, b's heartbeats stop vouching for it: d
    # buries it at most two one-way delays after dead_after from its last heartbeat.
    h.blocked -= {("b", "d"), ("c", "d")}
    h.run_until(t + 1.0)
    sent_a = last_sent(h, "a")
    h.crash("a")
    h.run_until(t + 2.0)
    [(t_dead, down)] = h.events("d", ev.PeerDown)
    assert down.name == "a"
    assert sent_a + DELAY + DEAD_AFTER <= t_dead <= sent_a + 2 * DELAY + DEAD_AFTER
    assert [t for t, _ in h.events("b", ev.PeerDown)] == [sent_a + DELAY + DEAD_AFTER]


@pytest.mark.parametrize("phase", [0.0, 0.01, 0.03, 0.06, 0.09, 0.12])
def test_a_crash_is_declared_dead_after_its_last_heartbeat_despite_vouching(phase: float) -> None:
    """Vouching evidence is gathered continuously; a survivor's heartbeat that still lists the
    crashed peer as fresh proves it alive at most two one-way delays after its last heartbeat
    (the survivor heard it one delay after it was sent, we hear the survivor one delay after):
    the death is as prompt as without vouching, give or take one delay."""
    h = Harness(["a", "b", "c"])
    h.start("a", 0.0)
    h.start("b", phase)
    h.start("c", phase / 2)
    h.run_until(2.0)
    sent_c = last_sent(h, "c")
    h.crash("c")
    h.run_until(4.0)
    for n in "ab":
        [(t_dead, down)] = h.events(n, ev.PeerDown)
        assert down.name == "c"
        assert sent_c + DELAY + DEAD_AFTER <= t_dead <= sent_c + 2 * DELAY + DEAD_AFTER


def test_a_node_cut_off_from_everyone_loses_its_buckets_on_time() -> None:
    """The majority buries an isolated node exactly dead_after after its last heartbeat (they
    hear one another: witnesses that do not vouch; up to one delay later through vouching, as
    before), and takes its buckets; the isolated node
    hears nobody, keeps its peers until the latest heard is due, then buries them all."""
    h = Harness(["a", "b", "c", "d"])
    h.start("a", 0.0)
    h.start("b", 0.02)
    h.start("c", 0.05)
    h.start("d", 0.07)
    h.run_until(2.0)
    d_buckets = h.kernel["d"]
    for n in "abc":
        h.blocked |= {(n, "d"), ("d", n)}
    sent_d = last_sent(h, "d")
    sent = {n: last_sent(h, n) for n in "abc"}
    h.run_until(4.0)
    for n in "abc":
        [(t_dead, down)] = h.events(n, ev.PeerDown)
        assert down.name == "d"
        assert sent_d + DELAY + DEAD_AFTER <= t_dead <= sent_d + 2 * DELAY + DEAD_AFTER
    taken = frozenset().union(*(h.kernel[n] for n in "abc"))
    assert taken == frozenset(range(16)) and d_buckets <= taken
    latest = max(sent.values()) + DELAY + DEAD_AFTER
    downs = h.events("d", ev.PeerDown)
    assert sorted(e.name for _, e in downs) == ["a", "b", "c"]
    assert all(sent[e.name] + DELAY + DEAD_AFTER <= t <= latest for t, e in downs)


def test_two_of_three_crash_at_once_the_survivor_buries_both_at_the_later_deadline() -> None:
    """The survivor hears nobody: the first deadline waits for the second peer's (less than an
    interval later here), then both are buried."""
    h = Harness(["a", "b", "c"])
    h.start("a", 0.0)
    h.start("b", 0.03)
    h.start("c", 0.08)
    h.run_until(2.0)
    sent = {n: last_sent(h, n) for n in "bc"}
    h.crash("b")
    h.crash("c")
    h.run_until(4.0)
    downs = h.events("a", ev.PeerDown)
    assert sorted(e.name for _, e in downs) == ["b", "c"]
    assert {t for t, _ in downs} == {max(sent.values()) + DELAY + DEAD_AFTER}
    assert h.kernel["a"] == frozenset(range(16))


def test_second_network_lost_is_a_warning_not_a_failover() -> None:
    h = Harness(["a", "b"], over={"networks": ("lan", "hb2")})
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    h.blocked_nets.add(("b", "a", "hb2"))
    last = h.cores["b"].get_timer() - INTERVAL
    h.run_until(3.0)
    [(t_lost, lost)] = h.events("a", ev.NetworkLost)
    assert (lost.name, lost.network) == ("b", "hb2")
    assert t_lost == last + DELAY + DEAD_AFTER
    assert h.events("a", ev.PeerDown) == []
    h.blocked_nets.clear()
    h.run_until(3.5)
    [(_, back)] = h.events("a", ev.NetworkRestored)
    assert (back.name, back.network) == ("b", "hb2")
    ages = h.cores["a"].snapshot(3.5).nodes[1].heartbeat_age_ms
    assert set(ages) == {"lan", "hb2"} and all(
        a is not None and a < 1000 * INTERVAL for a in ages.values()
    )


def test_snapshot_reports_every_node() -> None:
    h = Harness(["a", "b", "c"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    snap = h.cores["a"].snapshot(2.0)
    assert snap.members == (("a", 1), ("b", 1))
    rows = {n.name: n for n in snap.nodes}
    assert rows["a"].state == "UP" and rows["a"].share == 50.0
    assert rows["b"].alive and rows["b"].share == 50.0
    assert rows["c"] == ev.NodeView(
        name="c",
        is_self=False,
        state=None,
        alive=False,
        share=0.0,
        incarnation=None,
        weight=1,
        heartbeat_age_ms={"lan": None},
    )
    assert len(snap.owned) == 8


def test_timer_may_be_early_once_a_peer_is_heard_again_but_is_never_late() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0, healthy=False)  # WAIT: no handover, heartbeats exactly every interval
    h.start("b", 0.0, healthy=False)
    h.run_until(0.95)
    h.blocked.add(("b", "a"))  # b's heartbeat of 0.875 (heard at 0.890625) is the last for now
    h.run_until(1.36)
    h.blocked.clear()
    h.cores["b"].set_weight(2, 1.36)  # an extra heartbeat (no claim), heard at 1.375625
    h.run_until(1.38)
    a = h.cores["a"]
    # a's heartbeat of 1.375 set its timer to b's deadline, 0.890625 + dead_after: b was heard
    # since, so the timer is early, and the call then finds nothing due.
    assert a.get_timer() == 0.890625 + DEAD_AFTER
    h.run_until(1.45)
    assert h.events("a", ev.PeerDown) == []
    assert a.get_timer() == 1.5  # the next heartbeat
    h.crash("b")  # before its next heartbeat, due at 1.485
    h.run_until(3.0)
    [(t_dead, _)] = h.events("a", ev.PeerDown)
    assert t_dead == 1.36 + DELAY + DEAD_AFTER  # exactly dead_after after the last one heard


# ------------------------------------------------------------------------- freshness and replay
def heard_up(h: Harness, name: str, peer: str, since: float = 0.0) -> list[float]:
    return [t for t, e in h.events(name, ev.PeerUp) if e.name == peer and t >= since]


def replay(h: Harness, dst: str, recorded: list[bytes], start: float, gap: float) -> float:
    """Inject `recorded` into `dst`, one datagram every `gap` from `start`; returns the end."""
    t = start
    for payload in recorded:
        h.inject(dst, payload, t)
        t += gap
    return t


def test_a_restarted_node_ignores_a_replay_of_a_dead_peer() -> None:
    """Row 1 of the issue: b's heartbeats are recorded, b dies, a restarts, the recording is
    played to a. Nothing of it counts: a never hears b up and takes every bucket."""
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(1.0)
    h.restart("b", 1.0, 2)  # two incarnations of b on the recording
    h.run_until(3.0)
    only_owners(h)
    recorded = [d for _, src, _, d in h.tap if src == "b"]
    assert len(recorded) > 20
    h.crash("b")
    h.restart("a", 3.0, 3)
    end = replay(h, "a", recorded * 3, 3.0, INTERVAL / 2)
    h.run_until(end)
    a = h.cores["a"]
    assert heard_up(h, "a", "b", since=3.0) == []
    assert a.members == (("a", 1),)
    assert h.kernel["a"] == frozenset(range(16))
    # b's claims held a's own for at most dead_after past a's own start-up listening
    t_all = max(t for t, _ in acquired(h, "a") if t >= 3.0)
    assert t_all <= 3.0 + 2 * DEAD_AFTER
    assert a.drops["unproven"] > 0
    assert not any(isinstance(e, ev.PeerDown) for t, n, e in h.log if n == "a" and t >= 3.0)


def test_a_replay_of_the_current_incarnation_to_a_node_that_did_not_restart() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    recorded = [d for _, src, _, d in h.tap if src == "b"]
    h.crash("b")
    h.run_until(3.0)
    end = replay(h, "a", recorded, 3.0, INTERVAL / 2)
    h.run_until(end)
    assert heard_up(h, "a", "b", since=3.0) == []
    assert h.kernel["a"] == frozenset(range(16))
    assert h.cores["a"].drops["replay"] + h.cores["a"].drops.get("duplicate", 0) >= len(recorded)


def test_a_huge_incarnation_and_its_goodbye_do_not_lock_a_node_out() -> None:
    """A goodbye of an incarnation no one proved (a key holder's forgery, or a recording played
    after a clock went back) neither kills b nor shadows b's later real incarnations."""
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    forger = h.make("b", 2**64 - 1)
    h.inject("a", forger.datagrams_to_send(2.0)[0][1], 2.0)
    h.inject("a", forger.shutdown(2.0)[0][1], 2.01)
    h.run_until(3.0)
    assert not h.events("a", ev.PeerDown)
    assert h.cores["a"].drops["unproven"] >= 1
    only_owners(h)
    # b's real restart (a lower incarnation than the forged one) is taken at once
    h.restart("b", 3.0, 7)
    h.run_until(5.0)
    [t_up] = [t for t, e in h.events("a", ev.PeerUp) if e.restarted]
    assert t_up < 3.0 + 4 * DELAY + INTERVAL
    assert not h.events("a", ev.PeerDown)
    only_owners(h)


def test_a_restarted_peer_proves_itself_within_a_round_trip() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    h.restart("b", 2.0, 5)
    h.run_until(4.0)
    # b's first heartbeat (2.0) reaches a, a's quick heartbeat names b, b's quick answer acks a
    [t_up] = [t for t, e in h.events("a", ev.PeerUp) if e.restarted]
    gap = INTERVAL / 20
    assert t_up <= 2.0 + 3 * DELAY + 2 * gap
    assert not h.events("a", ev.PeerDown)
    only_owners(h)


def test_a_peer_that_never_hears_us_delays_a_claim_by_dead_after_at_most() -> None:
    """After a restart a real peer that cannot hear us yet and a recording look alike: its
    claims hold ours back for dead_after (a real peer proves itself long before), then it is
    treated as any silent peer."""
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(2.0)
    held_by_b = h.kernel["b"]
    h.blocked.add(("a", "b"))  # b hears nothing of a from now on
    h.restart("a", 2.0, 9)
    h.run_until(4.0)
    up = max(t for t, e in h.events("a", ev.StateChanged) if e.new is NodeState.UP)
    assert heard_up(h, "a", "b", since=2.0) == []
    # a took b's buckets once its claim had waited dead_after for b's acknowledgement
    late = [(t, acq) for t, acq in acquired(h, "a") if t >= 2.0 and acq & held_by_b]
    assert late and all(t >= up + DEAD_AFTER for t, _ in late)
    assert h.kernel["a"] == frozenset(range(16))


# ------------------------------------------------------------------------- key rotation
OLD, NEW = KEY, b"the-next-farm-key-0123456789abcdef"


def key_of(payload: bytes) -> int:
    return int.from_bytes(payload[36:40], "big")


def sent_keys(h: Harness, since: float) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for t, src, _, data in h.tap:
        if t >= since:
            out.setdefault(src, set()).add(key_of(data))
    return out


def test_key_rotation_without_downtime() -> None:
    from vipfarm.membership.wire import key_id

    h = Harness(["a", "b", "c"], shared=False)
    for n in h.names:
        h.start(n, 0.0)
    h.run_until(2.0)
    only_owners(h)
    # step 1, node by node: accept both keys; send the new one once every peer accepts it
    h.cores["a"].set_keys(OLD, NEW, 2.0)
    h.cores["b"].set_keys(OLD, NEW, 2.0)
    h.run_until(3.0)
    assert sent_keys(h, 2.5) == {n: {key_id(OLD)} for n in h.names}  # c knows only the old
    h.cores["c"].set_keys(OLD, NEW, 3.0)
    h.run_until(4.0)
    assert sent_keys(h, 3.5) == {n: {key_id(NEW)} for n in h.names}
    # a node that comes back with the old configuration turns the new key off again
    h.crash("c")
    h.run_until(5.0)
    h.restart("c", 5.0, 2, key=OLD)
    h.run_until(7.0)
    assert sent_keys(h, 6.5) == {n: {key_id(OLD)} for n in h.names}
    only_owners(h)
    h.cores["c"].set_keys(OLD, NEW, 7.0)
    h.run_until(8.0)
    # step 2: the old key retired, node by node
    for n in h.names:
        h.cores[n].set_keys(NEW, None, 8.0)
        h.run_until(h.now + 0.3)
    h.run_until(10.0)
    assert sent_keys(h, 9.5) == {n: {key_id(NEW)} for n in h.names}
    assert all(core.drops.get("unknown_key", 0) == 0 for core in h.cores.values())
    assert all(core.drops.get("bad_mac", 0) == 0 for core in h.cores.values())
    # nobody was ever taken for dead except c while it was down
    assert [(n, e.name) for t, n, e in h.log if isinstance(e, ev.PeerDown)] == [
        ("a", "c"),
        ("b", "c"),
    ]
    only_owners(h)


# ------------------------------------------------------------------------- rolling upgrade
class V1Node(Membership):
    """A node of the previous release as its peers see it: it sends heartbeat version 1 only,
    and its decoder drops every other version (`Drop.VERSION`)."""

    def receive_datagram(self, data: bytes, network: str, now: float) -> bool | Drop:
        if len(data) > 2 and data[2] != 1:
            return self._count(Drop.VERSION)
        return super().receive_datagram(data, network, now)

    def _version_now(self, now: float) -> int:
        return 1  # it knows no other


def versions_sent(h: Harness, since: float) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for t, src, _, data in h.tap:
        if t >= since:
            out.setdefault(src, set()).add(data[2])
    return out


def test_what_a_v1_node_sends_is_what_the_previous_release_decodes_and_vice_versa() -> None:
    from tests.fakes import wire_v1

    h = Harness(["a", "b", "c"])
    h.cores["c"] = h.make("c", 1, V1Node)
    for n in h.names:
        h.start(n, 0.0)
    h.run_until(2.0)
    old = wire_v1.Codec("test", KEY, 16)
    for _, src, _, data in h.tap[-12:]:
        got = old.decode(data)  # the released decoder takes every heartbeat sent now
        assert isinstance(got, wire_v1.Heartbeat), (src, got)
    released = old.encode(
        node_id=wire_v1.node_id("c"), digest=1, incarnation=5, seq=1, state=wire_v1.NodeState.UP,
        weight=1, owned=1, want=2, fresh=1, fresh_len=1, acks=(wire_v1.Ack(7, 8, 9),),
    )  # fmt: skip
    hb = h.codec.decode(released)
    assert isinstance(hb, Heartbeat)
    assert (hb.version, hb.owned, hb.want, hb.acks) == (1, 1, 2, {7: (8, 9)})


def test_a_farm_with_one_node_still_on_version_1() -> None:
    h = Harness(["a", "b", "c"])
    h.cores["c"] = h.make("c", 1, V1Node)
    for n in h.names:
        h.start(n, 0.0)
    h.run_until(3.0)
    only_owners(h)
    assert versions_sent(h, 1.0) == {n: {1} for n in h.names}
    # c dropped only what a and b sent in their first dead_after (which tells an upgraded
    # peer that they speak version 2)
    assert h.cores["c"].drops.get("version", 0) <= 2 * (DEAD_AFTER / INTERVAL + 4)
    assert not any(isinstance(e, ev.PeerDown) for _, _, e in h.log)
    # c is upgraded: its new incarnation speaks the newest version, and so does everybody again
    h.restart("c", 3.0, 2)
    h.run_until(5.0)
    assert versions_sent(h, 4.0) == {n: {VERSION} for n in h.names}
    assert not any(isinstance(e, ev.PeerDown) for _, _, e in h.log)
    only_owners(h)


class V2Node(Membership):
    """A node of the release before directed delivery: the frozen codec of that release reads
    what it receives (it drops version 3 and the kept and deaf flags), and it sends version 2 at
    most."""

    def receive_datagram(self, data: bytes, network: str, now: float) -> bool | Drop:
        from tests.fakes import wire_v2

        got = wire_v2.Codec("test", KEY, 16).decode(data)
        if not isinstance(got, wire_v2.Heartbeat):
            return self._count(Drop(got.value))
        return super().receive_datagram(data, network, now)

    def _version_now(self, now: float) -> int:
        return min(super()._version_now(now), 2)


def test_a_node_of_the_release_before_directed_delivery_reads_every_heartbeat() -> None:
    from tests.fakes import wire_v2

    h = Harness(["a", "b", "c"])
    h.cores["c"] = h.make("c", 1, V2Node)
    for n in ("a", "b"):  # directed or auto delivery: kept buckets and the deaf flag to say
        h.cores[n].kept, h.cores[n].deaf = 0b101, True
    for n in h.names:
        h.start(n, 0.0)
    h.run_until(3.0)
    only_owners(h)
    assert versions_sent(h, 1.0) == {n: {2} for n in h.names}
    old = wire_v2.Codec("test", KEY, 16)
    for t, src, _, data in h.tap:
        if t >= 1.0:  # the released decoder takes every heartbeat sent now, flags stripped
            assert isinstance(old.decode(data), wire_v2.Heartbeat), (src, data[3])
    # c dropped only what a and b sent in their first dead_after
    assert h.cores["c"].drops.get("version", 0) <= 2 * (DEAD_AFTER / INTERVAL + 4)
    assert not any(isinstance(e, ev.PeerDown) for _, _, e in h.log)
    assert h.cores["a"].legacy_peers(h.now) == ["c"]
    # c is upgraded: everybody speaks version 3 again, with the flags
    h.restart("c", 3.0, 2)
    h.run_until(5.0)
    assert versions_sent(h, 4.0) == {n: {3} for n in h.names}
    assert all(not core.legacy_peers(h.now) for core in h.cores.values())
    last = next(d for t, src, _, d in reversed(h.tap) if src == "a")
    hb = h.codec.decode(last)
    assert isinstance(hb, Heartbeat) and (hb.kept, hb.deaf) == (0b101, True)
    only_owners(h)


def test_recordings_of_two_incarnations_played_in_turn_do_not_speed_up_heartbeats() -> None:
    h = Harness(["a", "b"])
    h.start("a", 0.0)
    h.start("b", 0.0)
    h.run_until(1.0)
    first = [d for _, src, _, d in h.tap if src == "b"]
    h.restart("b", 1.0, 2)
    h.run_until(2.0)
    second = [d for _, src, _, d in h.tap if src == "b"][len(first) :]
    h.crash("b")
    h.restart("a", 2.0, 3)
    h.run_until(3.0)
    sent_before = len(h.tap)
    turns = [d for pair in zip(first, second, strict=False) for d in pair]
    end = replay(h, "a", turns, 3.0, INTERVAL / 10)
    h.run_until(end)
    sent = len(h.tap) - sent_before
    # one heartbeat per interval, plus a quick one for each new highest incarnation at most
    assert sent <= (end - 3.0) / INTERVAL + 3, sent
    assert h.kernel["a"] == frozenset(range(16))


def test_quiet_at_rest_and_never_while_a_handover_waits_on_a_heartbeat() -> None:
    # A driver may read heartbeats late while the core is quiet (the pulse's calm reading), so
    # quiet must be False whenever a heartbeat is awaited: by the node that wants buckets until
    # it holds them, and by every owner from hearing the claim until its release is done.
    h = Harness(["a", "b", "c"])
    for n in ("a", "b"):
        h.start(n, 0.0)
    h.run_until(2.0)
    assert all(h.cores[n].quiet() for n in ("a", "b"))
    h.start("c", 2.0)
    assert not h.cores["c"].quiet()  # not UP yet
    samples: list[tuple[float, dict[str, bool], dict[str, int]]] = []
    t = 2.0
    while t < 4.0:
        t += DELAY / 4
        h.run_until(t)
        held = {n: len(h.kernel.get(n, frozenset())) for n in h.names}
        samples.append((t, {n: h.cores[n].quiet() for n in h.names}, held))
    share = samples[-1][2]
    assert share["c"] > 0 and sum(share.values()) == 16
    assert share["a"] < 8 and share["b"] < 8  # both owners gave c buckets
    up = up_at(h, "c")
    for when, quiet, held in samples:
        if when >= up and held["c"] < share["c"]:
            assert not quiet["c"], when  # it wants
        # Each owner hears c's claim within one delay; from then until c holds its share it
        # is not quiet (both give c buckets here).
        if up + DELAY < when and held["c"] < share["c"]:
            assert not quiet["a"] and not quiet["b"], when
    # Settled again: every node is quiet.
    assert all(h.cores[n].quiet() for n in h.names)
    only_owners(h)
