"""Issue 2 acceptance: the kernel data path of a farm, in a lab of network namespaces.

Each test builds its own lab (static bucket split by the stand-alone runner) and waits on
conditions with deadlines; no fixed sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest

from vipfarm.datapath.jhash import bucket_of
from vipfarm.datapath.spec import Affinity, IPAddress, Proto, Rule, vmac_for
from vipfarm.lab.buckets import even_split
from vipfarm.lab.testbed import Lab, LabFactory
from vipfarm.lab.topology import VIP4, VIP6, client_lan4, client_lan6, remote_addr


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def neighbour_mac(lab: Lab, client: str, addr: str) -> str | None:
    out = lab.exec(client, ["ip", "neigh", "show", addr], check=True).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None


def link_mac(lab: Lab, who: str, ifname: str = "eth0") -> str:
    out = lab.exec(who, ["cat", f"/sys/class/net/{ifname}/address"], check=True).stdout
    return out.strip()


def test_300_connections_spread_over_3_nodes_through_the_vmac(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=1)
    vmac = vmac_for(lab.name, VIP4)
    assert neighbour_mac(lab, "client1", str(VIP4)) is None  # the client starts with no entry

    replies = lab.load("client1", count=300, concurrency=30, timeout=5, source_port=20000)
    errors = Counter(r.error for r in replies if r.error)
    assert not errors, f"failed connections: {errors}"
    served = Counter(r.node for r in replies)
    for node in lab.node_names:
        share = served[node] / 300
        assert 0.25 <= share <= 0.42, f"{node} served {share:.0%}: {served}"

    assert neighbour_mac(lab, "client1", str(VIP4)) == vmac
    node_macs = {link_mac(lab, n) for n in lab.node_names}
    assert vmac not in node_macs
    fdb = lab.exec("switch", ["bridge", "fdb", "show"], check=True).stdout
    assert vmac not in fdb, "a bridge learned the VMAC: some node sent a frame from it"


def test_ipv6_vip_resolves_to_its_vmac_and_spreads(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=1)
    url = f"http://[{VIP6}]/"
    replies = lab.load("client1", url, count=90, timeout=5, source_port=21000)
    assert not [r.error for r in replies if r.error]
    assert set(Counter(r.node for r in replies)) == set(lab.node_names)
    assert neighbour_mac(lab, "client1", str(VIP6)) == vmac_for(lab.name, VIP6)
    fdb = lab.exec("switch", ["bridge", "fdb", "show"], check=True).stdout
    assert vmac_for(lab.name, VIP6) not in fdb


def test_client_ip_affinity_pins_each_client_to_one_node(lab_factory: LabFactory) -> None:
    rules = [Rule(vip=VIP4, port=80, affinity=Affinity.CLIENT_IP)]
    lab = lab_factory(nodes=3, clients=3, rules=rules)
    for client in ("client1", "client2", "client3"):
        replies = lab.load(client, count=50, concurrency=10, timeout=5)
        assert not [r.error for r in replies if r.error]
        nodes = {r.node for r in replies}
        assert len(nodes) == 1, f"{client} was served by {nodes}"


def test_remote_clients_behind_the_router(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=0, remote_clients=2)
    for client in ("remote1", "remote2"):
        replies = lab.load(client, count=60, timeout=5, source_port=22000)
        assert not [r.error for r in replies if r.error]
        assert set(Counter(r.node for r in replies)) == set(lab.node_names)


HOLD_SCRIPT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
def ask():
    s.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(dict(l.split(b": ", 1) for l in head.split(b"\r\n")[1:])[b"Content-Length"])
    while len(body) < length:
        body += s.recv(4096)
    return body.decode().split()[0]
print(ask(), flush=True)
for line in sys.stdin:
    try:
        print(ask(), flush=True)
    except OSError as e:
        print("error", type(e).__name__, flush=True)
"""


def test_moving_every_bucket_away_keeps_a_live_connection(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=1, app="builtin")
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("client1"), sys.executable, "-c", HOLD_SCRIPT, str(VIP4)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        serving = holder.stdout.readline().strip()
        assert serving in lab.node_names
        others = [n for n in lab.node_names if n != serving]
        lab.set_owned(
            {serving: [], others[0]: list(range(0, 256, 2)), others[1]: list(range(1, 256, 2))}
        )
        assert lab.kernel_owned([serving]) == {serving: []}

        for _ in range(3):  # the old connection keeps working, on the old node
            holder.stdin.write("again\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == serving
        new = lab.load("client1", count=60, timeout=5, source_port=23000)
        assert not [r.error for r in new if r.error]
        assert {r.node for r in new} == set(others)
    finally:
        holder.kill()
        holder.wait()


def test_lease_expiry_stops_new_flows_on_a_frozen_node(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, clients=1, app="builtin")
    runner = lab.runners()["node2"]
    os.kill(runner.pid, signal.SIGSTOP)
    try:
        wait_for("node2's lease to run out", lambda: lab.kernel_owned(["node2"])["node2"] == [])
        replies = lab.load("client1", count=60, timeout=1.5, source_port=24000)
        served = Counter(r.node for r in replies)
        failed = [r for r in replies if r.error]
        assert "node2" not in served
        assert served["node1"] > 0 and served["node3"] > 0
        assert failed and all(r.error == "timeout" for r in failed), Counter(
            r.error for r in failed
        )
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    wait_for(
        "node2 to renew its lease",
        lambda: lab.kernel_owned(["node2"])["node2"] == even_split(3)["node2"],
    )
    assert "node2" in {r.node for r in lab.load("client1", count=60, timeout=5)}


def test_udp_rule_balances_an_echo_service(lab_factory: LabFactory) -> None:
    rules = [
        Rule(vip=VIP4, proto=Proto.TCP, port=80, affinity=Affinity.CLIENT_IP_PORT),
        Rule(vip=VIP4, proto=Proto.UDP, port=7, affinity=Affinity.CLIENT_IP_PORT),
    ]
    lab = lab_factory(nodes=3, clients=1, app="builtin", rules=rules)
    answers = [lab.udp_echo("client1", source_port=25000 + i) for i in range(30)]
    assert not [a.error for a in answers if a.error]
    served = Counter(a.node for a in answers)
    assert set(served) == set(lab.node_names), served
    # one source port keeps landing on one node
    again = {lab.udp_echo("client1", source_port=25000).node for _ in range(3)}
    assert again == {answers[0].node}


@pytest.mark.parametrize(
    ("affinity", "vip"),
    [
        (Affinity.CLIENT_IP_PORT, VIP4),
        (Affinity.CLIENT_IP_PORT, VIP6),
        (Affinity.CLIENT_IP, VIP4),
        (Affinity.CLIENT_SUBNET, VIP4),
    ],
)
def test_predicted_bucket_owner_is_the_node_that_answers(
    lab_factory: LabFactory, affinity: Affinity, vip: IPAddress
) -> None:
    """vipfarm.datapath.jhash computes the kernel's jhash: its bucket's owner is who answers."""
    rule = Rule(vip=vip, port=80, affinity=affinity, prefix4=28)
    lab = lab_factory(nodes=3, clients=2, remote_clients=2, app="builtin", rules=[rule])
    owner = {b: n for n, bs in lab.kernel_owned().items() for b in bs or []}
    clients: dict[str, IPAddress] = {"client1": client_lan4(1), "client2": client_lan4(2)}
    if vip == VIP6:
        clients = {"client1": client_lan6(1), "client2": client_lan6(2)}
    elif affinity is not Affinity.CLIENT_IP_PORT:
        clients.update({"remote1": remote_addr(1), "remote2": remote_addr(2)})
    url = f"http://[{vip}]/" if vip == VIP6 else None
    for name, address in clients.items():
        replies = lab.load(name, url, count=60, timeout=5, source_port=26000)
        assert not [r.error for r in replies if r.error]
        for r in replies:
            bucket = bucket_of(rule, lab.spec.buckets, lab.spec.seed, address, r.sport)
            assert owner[bucket] == r.node, (name, r.sport, bucket)
