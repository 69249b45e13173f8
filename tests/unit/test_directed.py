"""Directed delivery (issue 15), pure parts: the steering ruleset, the kept bitmap on the wire,
the entry choice and the steering plan, the ARP/NDP answers, the configuration, the lab switch."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kernel import FakeKernel
from vipfarm.config.schema import FarmSection
from vipfarm.datapath import probe, ruleset
from vipfarm.datapath.arp import BROADCAST, OP_REQUEST, ZERO_MAC, Arp, ArpResponder, mac_bytes
from vipfarm.datapath.datapath import Datapath, sysctl_settings
from vipfarm.datapath.ndp import (
    ETH_P_IPV6,
    ICMPV6,
    NS,
    OPT_TLLA,
    NdpResponder,
    multicast_mac,
    solicited_node,
)
from vipfarm.datapath.probe import ProbeResponder
from vipfarm.datapath.ruleset import SteerPlan, steer_batch, steer_chains
from vipfarm.datapath.service import DatapathService
from vipfarm.datapath.spec import DatapathSpec, Delivery
from vipfarm.lab.topology import Topology, flood_batch
from vipfarm.membership.wire import (
    FLAG_DEAF,
    FLAG_KEPT,
    HEADER_LEN,
    TAG_LEN,
    Codec,
    Drop,
    Heartbeat,
    NodeState,
    farm_id,
    mask_of,
    node_id,
)
from vipfarm.node.delivery import (
    DEAF_AFTER_S,
    SETTLE_S,
    Claim,
    Directed,
    FloodVote,
    candidates,
    entries,
    entry_for,
    steer_plan,
)
from vipfarm.node.metrics import Metrics, NodeFacts

VIP4 = ipaddress.IPv4Address("198.51.100.100")
VIP6 = ipaddress.IPv6Address("2001:db8:100::100")
ME = "52:54:00:00:00:01"
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def spec(delivery: str = "directed") -> DatapathSpec:
    return DatapathSpec.model_validate(
        {
            "farm": "web",
            "interface": "eth0",
            "delivery": delivery,
            "rules": [{"vip": str(VIP4), "port": 80}, {"vip": str(VIP6), "port": 80}],
        }
    )


def rules_of(batch: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [
        c["add"]["rule"]["expr"]
        for c in batch
        if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == chain
    ]


# ---- ruleset


def test_flood_ruleset_has_nothing_of_directed_delivery() -> None:
    text = str(ruleset.ruleset_batch(spec("flood")))
    for word in (ruleset.STEER_MAP, ruleset.PEERS_SET, "fwd", "dup"):
        assert f"'{word}'" not in text


def test_directed_bucket_chain_steers_client_frames_to_own_mac_first() -> None:
    s = spec()
    batch = ruleset.ruleset_batch(s, plan=SteerPlan(mac=ME))
    first = rules_of(batch, ruleset.BUCKET_CHAIN)[0]
    vmacs = sorted({s.vmac(v) for v in s.vips})
    assert first == [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "daddr"}},
                   "right": {"set": vmacs}}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                   "right": "@peers"}},
        {"vmap": {"key": {"meta": {"key": "mark"}}, "data": "@steer"}},
    ]  # fmt: skip
    # the owned/kept/drop decision follows unchanged
    flood = rules_of(ruleset.ruleset_batch(spec("flood")), ruleset.BUCKET_CHAIN)
    assert rules_of(batch, ruleset.BUCKET_CHAIN)[1:] == flood
    # the map exists before the rule that reads it
    adds = [c["add"] for c in batch if "add" in c]
    made = next(i for i, a in enumerate(adds) if a.get("map", {}).get("name") == ruleset.STEER_MAP)
    read = next(i for i, a in enumerate(adds) if "@steer" in str(a.get("rule")))
    assert made < read


def test_one_target_jumps_to_that_nodes_chain_which_rewrites_both_macs_and_forwards() -> None:
    chains, elems = steer_chains(spec(), SteerPlan(mac=ME, targets={3: (A,), 9: (A,), 4: (B,)}))
    assert set(chains) == {"to_52540000000a", "to_52540000000b"}
    assert chains["to_52540000000a"] == [
        {"counter": "forwarded"},
        {"mangle": {"key": {"payload": {"protocol": "ether", "field": "saddr"}}, "value": ME}},
        {"mangle": {"key": {"payload": {"protocol": "ether", "field": "daddr"}}, "value": A}},
        {"fwd": {"dev": "eth0"}},
    ]
    assert elems == [
        [3, {"jump": {"target": "to_52540000000a"}}],
        [4, {"jump": {"target": "to_52540000000b"}}],
        [9, {"jump": {"target": "to_52540000000a"}}],
    ]


def test_a_bucket_in_transition_fans_out_copies_and_keeps_its_own() -> None:
    plan = SteerPlan(
        mac=ME, targets={1: (A, B), 2: (A, B), 5: (C,), 6: (A,)}, local=frozenset({5, 6})
    )
    chains, elems = steer_chains(spec(), plan)
    verdicts = {b: v["jump"]["target"] for b, v in elems}
    assert verdicts[1] == verdicts[2]  # one fan-out chain per distinct target list
    fan = chains[verdicts[1]]
    ops = [next(iter(e)) for e in fan]
    assert ops == ["counter", "mangle", "mangle", "dup", "mangle", "fwd"]
    assert fan[2]["mangle"]["value"] == A and fan[4]["mangle"]["value"] == B
    # this node serves the bucket too: copies only, and the frame goes on to its own decision
    for b, mac in ((5, C), (6, A)):
        chain = chains[verdicts[b]]
        assert [next(iter(e)) for e in chain] == ["counter", "mangle", "mangle", "dup"]
        assert chain[2]["mangle"]["value"] == mac


def test_out_of_range_and_empty_targets_are_left_out() -> None:
    chains, elems = steer_chains(spec(), SteerPlan(mac=ME, targets={256: (A,), 7: ()}))
    assert chains == {} and elems == []


def test_steer_batch_flushes_the_map_before_removing_stale_chains() -> None:
    s = spec()
    batch = steer_batch(
        s, SteerPlan(mac=ME, targets={1: (A,)}, peers=frozenset({A, B})), {"to_x", "fan_0"}
    )
    kinds = [(verb, next(iter(obj)), next(iter(obj.values())).get("name")) for c in batch
             for verb, obj in c.items()]  # fmt: skip
    flush_map = kinds.index(("flush", "map", ruleset.STEER_MAP))
    for stale in ("to_x", "fan_0"):
        flush = kinds.index(("flush", "chain", stale))
        assert flush_map < flush < kinds.index(("delete", "chain", stale))
    assert ("delete", "chain", "to_52540000000a") not in kinds
    peers = [c for c in batch if "add" in c and c["add"].get("element", {}).get("name") == "peers"]
    assert peers[0]["add"]["element"]["elem"] == [A, B]


def test_datapath_applies_a_plan_once_and_takes_directed_away_when_flooding(
    tmp_path: Path,
) -> None:
    kernel = FakeKernel(lambda: 0.0, {"lo": "00:00:00:00:00:00", "eth0": ME})
    kernel.sysctls = {name: "0" for name in sysctl_settings("eth0")}
    dp = Datapath(spec(), kernel, tmp_path)
    dp.start()
    assert dp.steer == SteerPlan(mac=ME)
    plan = SteerPlan(mac=ME, targets={1: (A, B)})
    assert dp.set_steer(plan) and not dp.set_steer(plan)  # unchanged: no transaction
    dp.update(spec("flood"))
    last = kernel.batches[-1]
    assert {
        "delete": {"map": {"family": "netdev", "table": "vipfarm_web", "name": "steer"}}
    } in last
    assert dp.steer is None and not dp.set_steer(plan)


# ---- wire


def _encode(codec: Codec, **over: Any) -> bytes:
    fields: dict[str, Any] = {
        "node_id": node_id("node1"),
        "digest": 1,
        "incarnation": 5,
        "seq": 2,
        "state": NodeState.UP,
        "weight": 1,
        "owned": mask_of([0, 1]),
        "want": mask_of([2]),
        "fresh": 0,
        "fresh_len": 1,
    }
    fields.update(over)
    return codec.encode(**fields)


def test_kept_bitmap_round_trips_behind_its_flag() -> None:
    codec = Codec("farm", b"k" * 32, 256)
    data = _encode(codec, kept=mask_of([9, 255]))
    assert data[3] & FLAG_KEPT
    hb = codec.decode(data)
    assert isinstance(hb, Heartbeat) and hb.kept == mask_of([9, 255]) and not hb.bye
    assert hb.owned == mask_of([0, 1]) and hb.want == mask_of([2])
    assert len(data) == len(_encode(codec)) + 32
    empty = codec.decode(_encode(codec, kept=0, seq=3))
    assert isinstance(empty, Heartbeat) and empty.kept == 0


def test_without_kept_the_heartbeat_is_what_it_always_was() -> None:
    codec = Codec("farm", b"k" * 32, 256)
    assert _encode(codec) == _encode(codec, kept=None)
    assert _encode(codec)[3] == 0
    hb = codec.decode(_encode(codec))
    assert isinstance(hb, Heartbeat) and hb.kept == 0
    # version 1 has no room for it: never sent there
    assert _encode(codec, version=1, kept=5) == _encode(codec, version=1)


def test_kept_flag_with_a_wrong_length_or_stray_bits_is_refused() -> None:
    codec = Codec("farm", b"k" * 32, 12)
    plain = _encode(codec, owned=1, want=0)
    flagged = plain[:3] + bytes([FLAG_KEPT]) + plain[4:]
    assert codec.decode(flagged) == Drop.MALFORMED  # no kept bitmap: the length disagrees
    msg = bytearray(_encode(codec, owned=1, want=0, kept=1)[:-TAG_LEN])
    msg[HEADER_LEN + 2 * 2 + 1] = 0x80  # kept bucket 15 of 12
    sub = hmac.digest(b"k" * 32, b"vipfarm heartbeat v2", "sha256")
    assert codec.decode(bytes(msg) + hmac.digest(sub, bytes(msg), "sha256")) == Drop.MALFORMED


# ---- entry choice and plan


def test_entry_is_deterministic_and_moves_only_when_its_node_goes() -> None:
    nodes = [f"node{i}" for i in range(1, 6)]
    vips = [ipaddress.IPv4Address(f"198.51.100.{100 + i}") for i in range(40)]
    first = {v: entry_for(v, nodes) for v in vips}
    assert first == {v: entry_for(v, reversed(nodes)) for v in vips}
    assert len(set(first.values())) == 5  # spread over the nodes
    for v in vips:
        gone = "node3"
        after = entry_for(v, [n for n in nodes if n != gone])
        assert after == first[v] or first[v] == gone
    assert entry_for(VIP4, []) is None


def test_candidates_are_alive_up_nodes_or_wait_ones_when_none_is_up() -> None:
    claims = [
        ("node2", True, NodeState.UP, 1, 0, 0, False),
        ("node3", False, NodeState.UP, 0, 0, 0, False),  # dead
        ("node4", True, NodeState.WAIT, 0, 0, 0, False),
        ("node5", True, None, 0, 0, 0, False),  # never heard
    ]
    assert candidates("node1", NodeState.UP, claims) == ["node1", "node2"]
    assert candidates("node1", NodeState.DRAINING, claims) == ["node2"]
    waiting = [("node4", True, NodeState.WAIT, 0, 0, 0, False)]
    assert candidates("node1", NodeState.WAIT, waiting) == ["node1", "node4"]
    assert candidates("node1", NodeState.STOP, []) == []
    got = entries("node1", NodeState.UP, claims, [VIP4, VIP6])
    assert set(got.values()) <= {"node1", "node2"}


def test_plan_sends_each_bucket_to_every_live_interested_peer_with_a_known_mac() -> None:
    claims = [
        ("node2", True, NodeState.UP, mask_of([1, 2]), mask_of([3]), 0, False),
        ("node3", True, NodeState.DRAINING, 0, 0, mask_of([1]), False),  # keeps 1: connections
        ("node4", False, NodeState.UP, mask_of([4]), 0, 0, False),  # dead
        ("node5", True, NodeState.UP, mask_of([5]), 0, 0, False),  # MAC unknown yet
    ]
    plan = steer_plan(ME, claims, {"node2": A, "node3": B, "node4": C}, frozenset({7}))
    assert dict(plan.targets) == {1: (A, B), 2: (A,), 3: (A,)}
    assert plan.local == {7} and plan.mac == ME
    assert plan.peers == {A, B, C}  # a dead node's frames are never forwarded either


# ---- ARP and NDP


CLIENT_MAC = mac_bytes("52:54:00:00:00:99")
CLIENT4 = ipaddress.IPv4Address("198.51.100.201")


def _who_has(tpa: ipaddress.IPv4Address = VIP4) -> bytes:
    return Arp(BROADCAST, CLIENT_MAC, OP_REQUEST, CLIENT_MAC, CLIENT4, ZERO_MAC, tpa).to_frame()


def test_directed_arp_entry_answers_with_its_own_mac_others_stay_silent() -> None:
    vip2 = ipaddress.IPv4Address("198.51.100.101")
    r = ArpResponder(ME, {VIP4: "02:aa:bb:cc:dd:ee", vip2: "02:aa:bb:cc:dd:ef"})
    r.entry = frozenset({VIP4})
    reply = Arp.parse(r.handle(_who_has()) or b"")
    assert reply is not None and reply.sha == mac_bytes(ME) and reply.eth_src == mac_bytes(ME)
    assert r.handle(_who_has(vip2)) is None and r.counters["not_entry"] == 1
    (garp,) = r.announcements()
    parsed = Arp.parse(garp)
    assert parsed is not None and parsed.spa == parsed.tpa == VIP4
    assert parsed.sha == mac_bytes(ME)
    # a peer's gratuitous ARP is never answered
    peer = Arp(BROADCAST, mac_bytes(A), OP_REQUEST, mac_bytes(A), VIP4, ZERO_MAC, VIP4).to_frame()
    assert r.handle(peer) is None
    r.entry = frozenset()
    assert r.announcements() == [] and r.handle(_who_has()) is None


def _ns(target: ipaddress.IPv6Address) -> bytes:
    src = ipaddress.IPv6Address("2001:db8:100::201")
    dst = solicited_node(target)
    body = struct.pack("!BBHI16s", NS, 0, 0, 0, target.packed) + bytes([OPT_TLLA - 1, 1])
    body += CLIENT_MAC
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, len(body), ICMPV6, 255, src.packed, dst.packed)
    return struct.pack("!6s6sH", multicast_mac(dst), CLIENT_MAC, ETH_P_IPV6) + ip6 + body


def test_directed_ndp_entry_advertises_its_own_mac() -> None:
    r = NdpResponder(ME, {VIP6: "02:aa:bb:cc:dd:ee"})
    assert r.handle(_ns(VIP6)) is not None  # flood: answered with the VMAC
    r.entry = frozenset()
    assert r.handle(_ns(VIP6)) is None and r.announcements() == []
    r.entry = frozenset({VIP6})
    na = r.handle(_ns(VIP6))
    assert na is not None and na.endswith(mac_bytes(ME))
    (announce,) = r.announcements()
    assert announce.endswith(mac_bytes(ME))


# ---- configuration and lab


def test_delivery_values() -> None:
    assert spec().delivery is Delivery.DIRECTED
    base = {"name": "web", "key_file": "/nonexistent"}
    with pytest.raises(ValueError, match="is not a delivery: write"):
        FarmSection.model_validate({**base, "delivery": "flod"})


def test_no_flood_switch_turns_flooding_off_on_the_node_lan_ports_only() -> None:
    topo = Topology("dm", nodes=2, clients=1)
    assert flood_batch(topo, False) == [
        "link set dev n1l type bridge_slave flood off",
        "link set dev n2l type bridge_slave flood off",
    ]
    assert flood_batch(topo, True)[0].endswith("flood on")


# ---- auto: the probe, the deaf flag, the vote


def test_probe_frames_are_heard_from_peers_only() -> None:
    fid = farm_id("web")
    vmac = "02:aa:bb:cc:dd:ee"
    now = [10.0]
    me = ProbeResponder(vmac, ME, fid, node_id("node1"), clock=lambda: now[0])
    peer = probe.build(vmac, A, fid, node_id("node2"))
    assert len(peer) == probe.FRAME_LEN and probe.parse(peer, fid) == node_id("node2")
    assert me.handle(peer) is None and me.heard == {node_id("node2"): 10.0}
    assert me.handle(me.announcements()[0]) is None and me.counters["own"] == 1
    other_farm = probe.build(vmac, A, farm_id("db"), node_id("node3"))
    assert me.handle(other_farm) is None
    assert me.handle(peer[:20]) is None
    assert me.handle(probe.build("02:00:00:00:00:99", A, fid, node_id("node3"))) is None
    assert set(me.heard) == {node_id("node2")} and me.counters["ignored"] == 3


def test_deaf_flag_round_trips_and_is_never_sent_by_default() -> None:
    codec = Codec("farm", b"k" * 32, 256)
    hb = codec.decode(_encode(codec, deaf=True))
    assert isinstance(hb, Heartbeat) and hb.deaf and not hb.bye
    assert _encode(codec)[3] & FLAG_DEAF == 0
    assert _encode(codec, version=1, deaf=True) == _encode(codec, version=1)


def _claims(deaf: dict[str, bool], alive: bool = True) -> list[Claim]:
    return [(n, alive, NodeState.UP, 0, 0, 0, d) for n, d in deaf.items()]


def test_vote_starts_directed_goes_flood_when_all_hear_and_back_at_once() -> None:
    vote = FloodVote("node1", started=0.0)
    ids = {n: node_id(n) for n in ("node2", "node3")}
    claims = _claims({"node2": False, "node3": False})
    t = 0.0
    while t < SETTLE_S:  # everybody hears everybody: flood only after the settling time
        assert not vote.update(t, claims, {i: t for i in ids.values()}) and not vote.flood
        t += 0.5
    assert vote.update(t, claims, {i: t for i in ids.values()}) and vote.flood
    # a peer says it is deaf: directed at once
    assert vote.update(
        t + 0.1, _claims({"node2": True, "node3": False}), {i: t for i in ids.values()}
    )
    assert not vote.flood and vote.deaf_nodes == ["node2"] and not vote.deaf
    # this node misses node3's probe for a whole window: deaf itself
    heard = {ids["node2"]: t + 10}
    vote.update(t + 10, claims, heard)
    assert vote.deaf and vote.missed == ["node3"] and vote.deaf_nodes == ["node1"]


def test_vote_gives_a_new_or_returning_peer_a_window_before_counting_it() -> None:
    vote = FloodVote("node1", started=0.0)
    vote.update(100.0, [], {})
    assert not vote.deaf  # alone: nobody to miss
    claims = _claims({"node2": False})
    vote.update(101.0, claims, {})
    assert not vote.deaf  # node2 just came: it may not have probed yet
    vote.update(101.0 + DEAF_AFTER_S + 0.1, claims, {})
    assert vote.deaf
    vote.update(110.0, _claims({"node2": False}, alive=False), {})
    assert not vote.deaf and "node2" not in vote.alive_since


def test_metrics_show_the_delivery_and_its_evidence() -> None:
    facts = NodeFacts(
        state="UP",
        app_state="healthy",
        buckets_owned=2,
        buckets=256,
        config_version=1,
        split_brain=False,
        delivery={"mode": "auto", "answers": "directed", "entry_of_here": [str(VIP4)],
                  "deaf_nodes": ["node1", "node2"]},
    )  # fmt: skip
    text = Metrics().render(facts).decode()
    assert 'vipfarm_delivery{answers="directed",delivery="auto"} 1.0' in text
    assert "vipfarm_delivery_entry_vips 1.0" in text
    assert "vipfarm_delivery_deaf_nodes 2.0" in text
    flood = NodeFacts("UP", "healthy", 2, 256, 1, False)
    assert "vipfarm_delivery" not in Metrics().render(flood).decode()


def test_directed_tick_waits_for_every_mac_then_steers_and_answers(tmp_path: Path) -> None:
    kernel = FakeKernel(lambda: 0.0, {"lo": "00:00:00:00:00:00", "eth0": ME})
    service = DatapathService(spec(), tmp_path, kernel)
    events: list[str] = []
    d = Directed(
        "node1",
        service,
        {"node2": ["198.51.100.12"], "node3": ["198.51.100.13"]},
        lambda name, *_a, **_k: events.append(name),
    )
    claims: list[Claim] = [
        ("node2", True, NodeState.UP, mask_of([1, 2]), 0, 0, False),
        ("node3", True, NodeState.UP, mask_of([3]), 0, mask_of([2]), False),
    ]
    mine = {v for v in (VIP4, VIP6) if entry_for(v, ["node1", "node2", "node3"]) == "node1"}

    clock = [0.0]

    async def ticking(what: str, cond: Callable[[], bool], kept: frozenset[int]) -> int | None:
        """Tick (as the pulse's timer does) until `cond`; the last tick's kept bitmap."""
        deadline = time.monotonic() + 5
        while True:
            clock[0] += 0.25
            out = d.tick(clock[0], NodeState.UP, claims, frozenset({0}), kept)
            if cond():
                return out
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)

    def steer() -> SteerPlan:
        return service.datapath.steer or SteerPlan(mac="none")  # none applied yet

    async def run() -> None:
        kernel.neigh["eth0"] = {"198.51.100.12": A}  # node3's MAC not learnt yet
        await ticking("a plan with node2", lambda: steer().peers == {A}, frozenset({0}))
        assert d.mac_unknown == ["node3"] and dict(steer().targets) == {}
        assert service.entry == frozenset()  # no answers before every live peer is known
        kernel.neigh["eth0"]["198.51.100.13"] = B
        kept = await ticking("the full plan", lambda: bool(steer().targets), frozenset({0, 7}))
        assert kept == mask_of([7])  # kept, not owned: what the heartbeats carry
        assert dict(steer().targets) == {1: (A,), 2: (A, B), 3: (B,)}
        assert steer().local == {0, 7}
        await ticking("the answers", lambda: service.entry == frozenset(mine), frozenset({0, 7}))
        assert d.state()["entries"] == {str(v): entry_for(v, ["node1", "node2", "node3"])
                                        for v in (VIP4, VIP6)}  # fmt: skip

    asyncio.run(run())
    assert "peer_mac_learned" in events


def test_a_node_of_an_older_release_is_never_an_entry() -> None:
    claims: list[Claim] = [
        ("node2", True, NodeState.UP, 1, 0, 0, False),
        ("node3", True, NodeState.UP, 2, 0, 0, False),
    ]
    assert candidates("node1", NodeState.UP, claims, ["node3"]) == ["node1", "node2"]
    vips = [ipaddress.IPv4Address(f"198.51.100.{100 + i}") for i in range(20)]
    got = entries("node1", NodeState.UP, claims, vips, ["node3"])
    assert set(got.values()) == {"node1", "node2"}
    # a node never leaves itself out: every VIP keeps an entry that answers for it
    assert candidates("node3", NodeState.UP, claims[:1], ["node1"]) == ["node2", "node3"]


def test_directed_tick_with_an_older_peer_says_so_once_and_keeps_it_out(tmp_path: Path) -> None:
    kernel = FakeKernel(lambda: 0.0, {"lo": "00:00:00:00:00:00", "eth0": ME})
    kernel.neigh["eth0"] = {"198.51.100.12": A, "198.51.100.13": B}
    service = DatapathService(spec(), tmp_path, kernel)
    events: list[tuple[str, dict[str, Any]]] = []
    d = Directed(
        "node1",
        service,
        {"node2": ["198.51.100.12"], "node3": ["198.51.100.13"]},
        lambda name, _level, **fields: events.append((name, fields)),
    )
    claims: list[Claim] = [
        ("node2", True, NodeState.UP, mask_of([1]), 0, 0, False),
        ("node3", True, NodeState.UP, mask_of([2]), 0, 0, False),
    ]

    async def run() -> None:
        for t in range(3):
            d.tick(float(t), NodeState.UP, claims, frozenset({0}), frozenset({0}), ["node3"])
            await asyncio.sleep(0.01)
        assert "node3" not in d.entry_of.values()
        assert d.state()["legacy_peers"] == ["node3"]
        d.tick(5.0, NodeState.UP, claims, frozenset({0}), frozenset({0}), [])  # upgraded
        await asyncio.sleep(0.01)

    asyncio.run(run())
    said = [f for name, f in events if name == "delivery_legacy_peers"]
    assert said == [
        {"peers": "node3", "effect": "they are never entries; what they keep is not steered"},
        {"peers": "-", "effect": "-"},
    ]
    assert set(d.entry_of.values()) <= {"node1", "node2", "node3"} and d.legacy == ()
