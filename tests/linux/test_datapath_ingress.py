"""Issue 14 acceptance: the drop before conntrack, kept buckets, and what they keep working.

Each test builds its own lab (static bucket split by the stand-alone runner, whose data path
service runs the sweeper) and waits on conditions with deadlines; no fixed sleeps. Conntrack is
read over netlink inside the node's namespace (`vipfarm.datapath.conntrack`, and pyroute2 for
the statistics).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable

import pytest

from vipfarm.datapath.jhash import bucket_of
from vipfarm.datapath.ruleset import FOREIGN_COUNTER, OWNED_MARK, table_name
from vipfarm.datapath.spec import Affinity, DecisionPoint, Proto, Rule
from vipfarm.lab.buckets import even_split
from vipfarm.lab.procs import alive
from vipfarm.lab.testbed import Lab, LabFactory, url_for
from vipfarm.lab.topology import BUCKETS, ECHO_PORT, VIP4, VIP6, client_lan4, node_lan4


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


CT_REPORT = r"""
import json, socket
from pyroute2 import NFCTSocket
from vipfarm.datapath import conntrack
entries = conntrack.marks()
with NFCTSocket(nfgen_family=socket.AF_UNSPEC) as ct:
    stats = ct.stat()
invalid = sum(m.get_attr("CTA_STATS_INVALID") or 0 for m in stats)
print(json.dumps({"entries": entries, "invalid": invalid}))
"""


def ct_report(lab: Lab, node: str) -> dict[str, object]:
    """Every conntrack entry of the node, as (mark, live), and its `invalid` statistic."""
    out = lab.exec(node, [sys.executable, "-c", CT_REPORT], check=True).stdout
    report: dict[str, object] = json.loads(out)
    return report


def live_buckets(lab: Lab, node: str) -> set[int]:
    entries = ct_report(lab, node)["entries"]
    assert isinstance(entries, list)
    return {m & 0xFFFF for m, live in entries if live and m and m & OWNED_MARK}


def foreign_dropped(lab: Lab, node: str) -> int:
    argv = ["nft", "-j", "list", "counter", "netdev", table_name(lab.name), FOREIGN_COUNTER]
    listing = json.loads(lab.exec(node, argv, check=True).stdout)
    return next(int(o["counter"]["packets"]) for o in listing["nftables"] if "counter" in o)


def kept(lab: Lab, node: str) -> list[int]:
    return lab.kernel_kept([node])[node] or []


def lingering(lab: Lab, node: str) -> set[int]:
    """Kept buckets the node does not own (the kept set holds the owned ones too)."""
    return set(kept(lab, node)) - set(lab.kernel_owned([node])[node] or [])


def test_1000_connections_survive_two_rebalances_away_and_back(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=1, app="nginx")
    split: dict[int | str, list[int]] = {k: v for k, v in even_split(3).items()}
    rotated: dict[int | str, list[int]] = {
        "node1": split["node3"],
        "node2": split["node1"],
        "node3": split["node2"],
    }
    with (
        lab.hold("client1", 1000) as v4,
        lab.hold("client1", 60, url=f"http://[{VIP6}]/") as v6,
    ):
        assert v4.initial["ok"] == 1000, v4.initial
        assert v6.initial["ok"] == 60, v6.initial
        # Away: every bucket moves to another node (release first, then acquire).
        lab.set_owned(rotated)
        for node in lab.node_names:
            got = lingering(lab, node)
            assert got and got <= set(split[node]), (node, sorted(got))
        after = v4.probe()
        assert after["ok"] == 1000 and after["moved"] == 0, after
        assert v6.probe()["ok"] == 60
        # New connections go to the new owners while the old ones stay where they were.
        new = lab.load("client1", count=60, timeout=5, source_port=30000)
        assert not [r.error for r in new if r.error]
        owner = {b: n for n, bs in rotated.items() for b in bs}
        rule = lab.spec.rules[0]
        for r in new:
            assert owner[bucket_of(rule, BUCKETS, lab.spec.seed, client_lan4(1), r.sport)] == r.node
        # And back: a bucket that returns leaves the kept set.
        lab.set_owned(split)
        back = v4.probe()
        assert back["ok"] == 1000 and back["moved"] == 0, back
        assert v6.probe()["ok"] == 60
        for node in lab.node_names:  # what lingers now is from the 60 new connections
            assert lingering(lab, node) <= set(rotated[node]), node


def test_a_kept_bucket_is_released_once_its_last_connection_ends(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, clients=1, app="nginx")
    split = even_split(3)
    with lab.hold("client1", 30) as held:
        on_node1 = held.initial["nodes"].get("node1", 0)
        assert held.initial["ok"] == 30 and on_node1 > 0, held.initial
        lab.set_owned({"node1": [], "node2": split["node2"] + split["node1"]})
        # Kept right away (same transaction as the release), then only where connections are:
        # the sweeper lets the empty buckets go after its grace period.
        assert set(kept(lab, "node1")) == set(split["node1"])
        wait_for(
            "node1 to keep just the buckets of its connections",
            lambda: set(kept(lab, "node1")) == live_buckets(lab, "node1"),
        )
        assert 0 < len(kept(lab, "node1")) <= on_node1
        probe = held.probe()
        assert probe["ok"] == 30 and probe["nodes"].get("node1") == on_node1, probe
    wait_for(
        "node1's kept set to empty once its connections closed", lambda: not kept(lab, "node1")
    )
    assert live_buckets(lab, "node1") == set()


UDP_ASK = r"""
import json, select, socket, sys, time
vip, port, sports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
socks = {}
for sport in sports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", sport))
    s.sendto(b"x", (vip, port))
    socks[s] = sport
out = {sport: set() for sport in sports}
deadline = time.monotonic() + 0.7  # every node that answers, within that time
while (left := deadline - time.monotonic()) > 0:
    for s in select.select(list(socks), [], [], left)[0]:
        out[socks[s]].add(s.recv(100).split()[0].decode())
print(json.dumps({k: sorted(v) for k, v in out.items()}))
"""


def udp_answers(lab: Lab, sports: list[int]) -> dict[int, list[str]]:
    argv = [sys.executable, "-c", UDP_ASK, str(VIP4), str(ECHO_PORT), ",".join(map(str, sports))]
    out = json.loads(lab.exec("client1", argv, check=True, timeout=60).stdout)
    return {int(k): v for k, v in out.items()}


def test_udp_flows_stay_with_their_node_while_kept_and_the_bucket_is_released_after(
    lab_factory: LabFactory,
) -> None:
    rules = [
        Rule(vip=VIP4, proto=Proto.TCP, port=80, affinity=Affinity.CLIENT_IP_PORT),
        Rule(vip=VIP4, proto=Proto.UDP, port=ECHO_PORT, affinity=Affinity.CLIENT_IP_PORT),
    ]
    lab = lab_factory(nodes=3, clients=1, app="builtin", rules=rules)
    # UDP entries live 30 s after their last datagram by default: shorter here, in the lab only.
    for node in lab.node_names:
        lab.exec(node, ["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=8"], check=True)
    split = even_split(3)
    udp = rules[1]
    sports = [
        p
        for p in range(31000, 32000)
        if bucket_of(udp, BUCKETS, lab.spec.seed, client_lan4(1), p) in split["node1"]
    ][:12]
    first = udp_answers(lab, sports)
    assert all(nodes == ["node1"] for nodes in first.values()), first
    buckets = {bucket_of(udp, BUCKETS, lab.spec.seed, client_lan4(1), p) for p in sports}

    lab.set_owned({"node1": [], "node2": split["node2"] + split["node1"]})
    assert buckets <= set(kept(lab, "node1"))
    # Each old flow still reaches node1 (its conntrack entry); node2 takes it as a new flow
    # too, as it always did: UDP has no handshake to tell an old flow from a new one.
    again = udp_answers(lab, sports)
    assert all("node1" in nodes for nodes in again.values()), again
    wait_for(
        "node1 to release its UDP buckets once their entries expired",
        lambda: not set(kept(lab, "node1")) & buckets,
        timeout=40,
    )
    last = udp_answers(lab, sports)
    assert all(nodes == ["node2"] for nodes in last.values()), last


FLOOD = r"""
import os, random, socket, struct, sys, time
from vipfarm.datapath.packet import inet_checksum as checksum
vip, syns, acks, udps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((vip, 80))
src = probe.getsockname()[0]

def tcp(sport, flags, payload=b""):
    seq, ack = random.getrandbits(32), random.getrandbits(32)
    head = struct.pack("!HHIIBBHHH", sport, 80, seq, ack, 5 << 4, flags, 65535, 0, 0)
    length = struct.pack("!BBH", 0, 6, len(head) + len(payload))
    pseudo = socket.inet_aton(src) + socket.inet_aton(vip) + length
    c = checksum(pseudo + head + payload)
    return head[:16] + struct.pack("!H", c) + head[18:] + payload

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
deadline = time.monotonic() + 30
sent = 0
for i in range(syns + acks):
    if time.monotonic() > deadline:
        break
    flags, payload = (0x02, b"") if i < syns else (0x18, b"GET / HTTP/1.1\r\n\r\n")
    raw.sendto(tcp(random.randint(20000, 60000), flags, payload), (vip, 0))
    sent += 1
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(udps):
    if time.monotonic() > deadline:
        break
    u.sendto(b"x", (vip, 7))
    sent += 1
print(sent)
"""


def test_a_non_owner_tracks_nothing_under_a_flood_of_foreign_traffic(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, clients=1, app="builtin")
    lab.set_owned({"node1": list(range(BUCKETS)), "node2": [], "node3": []})
    assert lab.http_get("client1").node == "node1"  # resolves the VMAC, node1 serves
    wait_for("the sweeper to empty the kept sets", lambda: not kept(lab, "node2"))
    before = {n: ct_report(lab, n) for n in ("node2", "node3")}
    assert all(r["entries"] == [] for r in before.values()), before

    def flood() -> None:
        argv = [sys.executable, "-c", FLOOD, str(VIP4), "3000", "3000", "1000"]
        done = lab.exec("client1", argv, timeout=90)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 7000

    # With the prefilter (the default), nftables does not even see them; without it, its
    # ingress chain drops them, counted. Either way they never reach conntrack.
    for prefilter, seen in ((True, 0), (False, 7000)):
        if lab.spec.prefilter is not prefilter:
            lab.update_spec(prefilter=prefilter)
        dropped = {n: foreign_dropped(lab, n) for n in ("node2", "node3")}
        flood()
        for node in ("node2", "node3"):
            after = ct_report(lab, node)
            assert after["entries"] == [], (node, after["entries"][:5])  # type: ignore[index]
            # Not even looked up: an established-looking frame with no entry would count
            # invalid (tcp_loose=0) had it reached conntrack.
            assert after["invalid"] == before[node]["invalid"], (node, after, before[node])
            counted = foreign_dropped(lab, node) - dropped[node]
            assert counted == seen if prefilter else counted >= seen, (node, prefilter, counted)
        assert lab.http_get("client1", url_for()).node == "node1"


def untracked_count(lab: Lab, node: str) -> int:
    """Entries that are not vipfarm's (no owned bit): the node's own traffic."""
    entries = ct_report(lab, node)["entries"]
    assert isinstance(entries, list)
    return sum(1 for m, _live in entries if not (m or 0) & OWNED_MARK)


def test_notrack_other_exempts_the_nodes_own_traffic_and_still_tracks_the_vip(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    direct = f"http://{node_lan4(1)}/"
    lab.update_spec(notrack_other=True)
    before = untracked_count(lab, "node1")
    for port in range(33000, 33010):
        assert lab.http_get("client1", direct, source_port=port).node == "node1"
    assert untracked_count(lab, "node1") == before  # not tracked at all
    replies = lab.load("client1", count=40, timeout=5, source_port=33100)
    assert not [r.error for r in replies if r.error]
    served = sum(1 for r in replies if r.node == "node1")
    entries = ct_report(lab, "node1")["entries"]
    assert isinstance(entries, list)
    marked = [m for m, _live in entries if (m or 0) & OWNED_MARK]
    assert served and len(marked) >= served  # the VIP path is tracked as before

    lab.update_spec(notrack_other=False)
    before = untracked_count(lab, "node1")
    assert lab.http_get("client1", direct, source_port=33200).node == "node1"
    assert untracked_count(lab, "node1") == before + 1


def test_connections_outlive_the_lease_of_a_node_whose_runner_died(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, clients=1, app="nginx")
    with lab.hold("client1", 60) as held:
        on_node2 = held.initial["nodes"].get("node2", 0)
        assert held.initial["ok"] == 60 and on_node2 > 0, held.initial
        os.kill(lab.runners()["node2"].pid, signal.SIGKILL)  # its tables stay, nobody renews
        wait_for("node2's leases to run out", lambda: lab.kernel_owned(["node2"])["node2"] == [])
        probe = held.probe()
        assert probe["ok"] == 60 and probe["moved"] == 0, probe
        assert probe["nodes"].get("node2") == on_node2


def test_a_runner_that_dies_takes_its_prefilter_with_it(lab_factory: LabFactory) -> None:
    """The prefilter's link belongs to the process: its death leaves nftables to decide."""
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    lab.set_owned({"node1": list(range(BUCKETS)), "node2": []})
    assert lab.http_get("client1").node == "node1"
    wait_for("the sweeper to empty node2's kept set", lambda: not kept(lab, "node2"))

    def flood() -> int:
        before = foreign_dropped(lab, "node2")
        argv = [sys.executable, "-c", FLOOD, str(VIP4), "500", "500", "0"]
        done = lab.exec("client1", argv, timeout=90)
        assert done.returncode == 0 and int(done.stdout) == 1000, done.stderr
        return foreign_dropped(lab, "node2") - before

    assert flood() == 0  # all dropped by the prefilter, nftables saw none
    os.kill(lab.runners()["node2"].pid, signal.SIGKILL)
    wait_for("nftables to see node2's foreign frames again", lambda: flood() >= 1000)
    assert ct_report(lab, "node2")["entries"] == []


def test_the_nodes_own_processes_reach_the_vip_whatever_its_buckets(
    lab_factory: LabFactory,
) -> None:
    """Over lo, which no ingress decision sees: served by the node itself, owned or not."""
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    lab.set_owned({"node1": [], "node2": list(range(BUCKETS))})
    for port in range(34000, 34010):
        assert lab.http_get("node1", source_port=port).node == "node1"
    lab.set_owned({"node1": list(range(BUCKETS)), "node2": []})
    assert lab.http_get("node2", source_port=34100).node == "node2"
    # and the LAN still goes to the owner
    assert lab.http_get("client1", source_port=34200).node == "node1"


OPERATOR_TABLES = """\
table inet host {
	set admins {
		type ipv4_addr
		elements = { 192.0.2.10 }
	}

	chain pre {
		type filter hook prerouting priority raw; policy accept;
		tcp dport 2222 ip saddr != @admins counter drop
	}

	chain out {
		type filter hook output priority filter; policy accept;
		ct state established counter accept
	}
}
table netdev host_nd {
	chain ingress {
		type filter hook ingress device "eth0" priority 10; policy accept;
		ether type arp counter accept
	}
}
"""


def test_the_hosts_own_tables_and_traffic_are_left_as_they_were(lab_factory: LabFactory) -> None:
    """Every change vipfarm makes (ownership, notrack, decision point, prefilter, stop) leaves
    the operator's tables, a netdev chain on the same interface included, exactly as they were,
    and the node's own service answers on its real address throughout."""
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    lab.exec("node1", ["nft", "-f", "-"], input=OPERATOR_TABLES, check=True)

    def operator_tables() -> str:
        return "".join(
            lab.exec("node1", ["nft", "-s", "list", "table", *t], check=True).stdout
            for t in (("inet", "host"), ("netdev", "host_nd"))
        )

    def check(step: str) -> None:
        assert operator_tables() == before, step
        for port in (34000, 34001):
            direct = lab.http_get("client1", f"http://{node_lan4(1)}/", source_port=port)
            assert direct.node == "node1", (step, direct.error)

    before = operator_tables()
    assert "192.0.2.10" in before and '"eth0"' in before
    check("started")
    lab.set_owned({"node1": list(range(BUCKETS)), "node2": []})
    assert lab.http_get("client1").node == "node1"
    split: dict[int | str, list[int]] = {k: v for k, v in even_split(2).items()}
    lab.set_owned(split)
    check("ownership moved away and back")
    for changes in (
        {"notrack_other": True},
        {"prefilter": False},
        {"decide_at": DecisionPoint.PREROUTING},
        {"notrack_other": False, "prefilter": True, "decide_at": DecisionPoint.INGRESS},
    ):
        lab.update_spec(**changes)
        check(f"spec {changes}")
    tables = lab.exec("node1", ["nft", "list", "tables"], check=True).stdout
    assert f"netdev {table_name(lab.name)}" in tables and f"inet {table_name(lab.name)}" in tables
    runner = lab.runners()["node1"]
    os.kill(runner.pid, signal.SIGTERM)
    wait_for("node1's runner to stop", lambda: not alive(runner))
    check("stopped")
    # Nothing of vipfarm's is left, and nothing else was added.
    ruleset = lab.exec("node1", ["nft", "-s", "list", "ruleset"], check=True).stdout
    assert ruleset == before
