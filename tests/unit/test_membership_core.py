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
from vipfarm.membership.wire import Codec, Drop, NodeState

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
        for n in self.names:
            self.cores[n] = Membership(config(n, self.names, **self.over), 1, codec=self.codec)

    def start(self, name: str, now: float, healthy: bool = True) -> None:
        self.running.add(name)
        core = self.cores[name]
        core.join(now)
        core.set_app_healthy(healthy, now)
        self._drain(name, now)

    def crash(self, name: str) -> None:
        self.running.discard(name)

    def restart(self, name: str, now: float, incarnation: int) -> None:
        self.cores[name] = Membership(
            config(name, self.names, **self.over), incarnation, codec=self.codec
        )
        self.kernel[name] = frozenset()
        self.start(name, now)

    def send(self, name: str, datagrams: list[tuple[str, bytes]], now: float) -> None:
        for net, payload in datagrams:
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
