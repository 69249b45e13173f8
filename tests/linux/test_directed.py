"""Issue 15 acceptance: directed delivery on a lab whose switch floods no unknown unicast.

One daemon-mode lab for the whole module (`--no-flood`, `delivery = "directed"`, 3 nodes, the
built-in application, 2 LAN clients and a remote one behind the router), reused by every test
in order: new connections (IPv4, IPv6, remote), client-ip affinity, a rebalance under live
connections, then the kill -9 of the entry node. Waits poll with deadlines.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from vipfarm.datapath.spec import Affinity, Proto, Rule
from vipfarm.lab import testbed
from vipfarm.lab.load import Reply
from vipfarm.lab.testbed import Lab, unique_name, url_for
from vipfarm.lab.topology import ECHO_PORT, VIP4, VIP6
from vipfarm.node.delivery import entry_for

RULES = [
    Rule(vip=VIP4, proto=Proto.TCP, port=80, affinity=Affinity.CLIENT_IP_PORT),
    Rule(vip=VIP4, proto=Proto.UDP, port=ECHO_PORT, affinity=Affinity.CLIENT_IP),
    Rule(vip=VIP6, proto=Proto.TCP, port=80, affinity=Affinity.CLIENT_IP_PORT),
]
NODES = ["node1", "node2", "node3"]


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_name("dm")
    try:
        built = testbed.up(
            name,
            nodes=3,
            clients=2,
            remote_clients=1,
            app="builtin",
            rules=RULES,
            daemon=True,
            no_flood=True,
            delivery="directed",
        )
        # Every node knows its peers' MACs (learned from the neighbour table) before the
        # tests start: until then a node cannot steer to them.
        wait_for(
            "every node to know its peers' MACs",
            lambda: all(len(built.daemon_state(n)["delivery"]["peer_macs"]) == 2 for n in NODES),
        )
        yield built
    finally:
        testbed.down(name)


def _spread(replies: list[Reply]) -> Counter[str | None]:
    assert not [r.error for r in replies if r.error], Counter(r.error for r in replies)
    return Counter(r.node for r in replies)


def test_state_names_one_entry_per_vip_and_only_it_answers_arp(lab: Lab) -> None:
    views = {n: lab.daemon_state(n)["delivery"] for n in NODES}
    expected = {str(v): entry_for(v, NODES) for v in (VIP4, VIP6)}
    for node, view in views.items():
        assert view["mode"] == "directed"
        assert view["entries"] == expected, (node, view)
        assert view["entry_of_here"] == sorted(v for v, n in expected.items() if n == node)
    # the client resolved each VIP to its entry's real MAC, not to a VMAC
    macs = {n: lab.exec(n, ["cat", "/sys/class/net/eth0/address"]).stdout.strip() for n in NODES}
    lab.load("client1", count=1)
    lab.load("client1", url_for(VIP6), count=1)
    neigh = lab.exec("client1", ["ip", "neigh", "show", "dev", "eth0"]).stdout
    for vip in (VIP4, VIP6):
        line = next(ln for ln in neigh.splitlines() if ln.startswith(f"{vip} "))
        assert macs[str(expected[str(vip)])] in line, (vip, line)


def test_new_connections_spread_over_every_node_v4_v6_and_remote(lab: Lab) -> None:
    for who, url in (("client1", None), ("client1", url_for(VIP6)), ("remote1", None)):
        spread = _spread(lab.load(who, url, count=300, timeout=3, total_timeout=60))
        assert set(spread) == set(NODES), (who, url, spread)
        # 300 over 3 nodes, client-ip-port: a fair share each, as in flood delivery
        assert all(c >= 50 for c in spread.values()), (who, url, spread)


def test_client_ip_affinity_holds(lab: Lab) -> None:
    udp = f"udp://{VIP4}:{ECHO_PORT}"
    for client in ("client1", "client2", "remote1"):
        spread = _spread(lab.load(client, udp, count=40, timeout=2, total_timeout=30))
        assert len(spread) == 1, (client, spread)  # one client, one node, every source port


def test_live_connections_survive_a_rebalance(lab: Lab) -> None:
    """node3 drains (its buckets move to node1 and node2, its connections stay on it), then
    joins again (buckets move from node1 and node2 back to it): every held connection answers
    from the node that first served it, through the entry's fan-out to owner and keepers."""
    with lab.hold("client1", 150) as held:
        assert held.initial["ok"] == 150 and set(held.initial["nodes"]) == set(NODES)
        out = lab.daemon_call("node3", "stop", {"force": False})
        assert out is not None
        wait_for("node3 to give every bucket away", lambda: lab.kernel_owned()["node3"] == [])
        new = _spread(lab.load("client2", count=90))
        assert "node3" not in new
        probe = held.probe()
        assert probe["ok"] == 150 and probe["moved"] == 0, probe
        lab.daemon_call("node3", "start")
        lab.wait_farm_up(30)
        probe = held.probe()
        assert probe["ok"] == 150 and probe["moved"] == 0, probe
    assert "node3" in _spread(lab.load("client2", count=90))


def test_kill_of_the_entry_fails_over_with_an_announcement(lab: Lab) -> None:
    """kill -9 of every process of the v4 VIP's entry: another node becomes its entry and
    announces it (gratuitous ARP), and new connections are served again."""
    entry = str(entry_for(VIP4, NODES))
    replies: list[Reply] = []
    started = time.monotonic()

    def stream() -> None:
        replies.extend(
            lab.load("client1", count=500, rate=100, concurrency=200, timeout=3, total_timeout=20)
        )

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for("the stream to start", lambda: time.monotonic() - started > 1.0)
    t_kill = time.monotonic()
    lab.kill(entry)
    survivors = [n for n in NODES if n != entry]
    new_entry = entry_for(VIP4, survivors)
    wait_for(
        f"{new_entry} to be the entry of {VIP4}",
        lambda: lab.daemon_state(str(new_entry))["delivery"]["entries"][str(VIP4)] == new_entry,
    )
    thread.join(timeout=60)
    kill_at = t_kill - started
    after = [r for r in replies if r.t > kill_at + 1.5]
    assert after and all(r.error is None for r in after), Counter(r.error for r in after)
    assert {r.node for r in after} == set(survivors)
    log = (lab.dir / "nodelogs" / str(new_entry) / "module.log").read_text()
    assert "entry_changed" in log
    # the client now resolves the VIP to the new entry
    mac = lab.exec(str(new_entry), ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    neigh = lab.exec("client1", ["ip", "neigh", "show", str(VIP4)]).stdout
    assert mac in neigh, neigh
    # IPv6 too: the new entry's unsolicited NA (override) moved the client's entry for VIP6
    # (both VIPs have the same entry among these node names, before and after)
    assert entry_for(VIP6, survivors) == new_entry
    v6 = _spread(lab.load("client1", url_for(VIP6), count=60, timeout=3, total_timeout=30))
    assert set(v6) == set(survivors), v6
    neigh6 = lab.exec("client1", ["ip", "-6", "neigh", "show", str(VIP6)]).stdout
    assert mac in neigh6, neigh6
    lab.start_daemon(entry)
    lab.wait_farm_up(30)
    assert set(_spread(lab.load("client1", count=90))) == set(NODES)
