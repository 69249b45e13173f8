"""The lab itself: topology, node applications, clients' helpers, up/down/status, bucket moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from vipfarm.datapath.ruleset import table_name
from vipfarm.datapath.spec import Affinity, Proto, Rule
from vipfarm.lab import testbed
from vipfarm.lab.buckets import even_split
from vipfarm.lab.procs import pid_alive, start_time
from vipfarm.lab.procs import terminate as real_terminate
from vipfarm.lab.testbed import Lab, LabFactory, state_dir, unique_name, url_for
from vipfarm.lab.topology import VIP4, VIP6, LabError, Topology, lab_namespaces

pytestmark = pytest.mark.linux

IP = testbed.ip_command()


def namespaces_of(name: str) -> list[str]:
    return lab_namespaces(name, testbed.list_netns(IP))


def root_links() -> set[str]:
    out = subprocess.run([IP, "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


def lab_pids(lab: Lab) -> list[tuple[int, int]]:
    return [(r.pid, r.start) for r in lab.records()]


def assert_gone(name: str, pids: list[tuple[int, int | None]], links_before: set[str]) -> None:
    assert namespaces_of(name) == []
    assert not state_dir(name).exists()
    assert [p for p, s in pids if pid_alive(p, s)] == []
    assert root_links() <= links_before, "the lab left an interface in the root namespace"


def test_topology_addresses_and_apps(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2, clients=1, remote_clients=1, app="builtin", datapath=False)
    assert sorted(namespaces_of(lab.name)) == sorted(lab.topology.namespaces())

    info = lab.status()
    addrs = {ns["name"]: ns["addresses"] for ns in info["namespaces"]}
    assert addrs[f"{lab.name}-node2"] == {
        "eth0": ["198.51.100.12/24", "2001:db8:100::12/64"],
        "eth1": ["192.0.2.12/24"],
    }
    assert addrs[f"{lab.name}-client1"] == {"eth0": ["198.51.100.201/24", "2001:db8:100::201/64"]}
    assert addrs[f"{lab.name}-router"] == {"eth0": ["198.51.100.1/24"], "eth1": ["203.0.113.1/24"]}
    assert addrs[f"{lab.name}-remote1"] == {"eth0": ["203.0.113.201/24"]}
    assert addrs[f"{lab.name}-switch"] == {}
    route = lab.exec("node1", ["ip", "route", "show", "default"], check=True).stdout
    assert route.startswith("default via 198.51.100.1 dev eth0")
    dad = lab.exec("node1", ["cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad"], check=True)
    assert dad.stdout.strip() == "0"
    assert "tentative" not in lab.exec("node1", ["ip", "-6", "addr"], check=True).stdout

    for i in (1, 2):
        assert lab.http_get("client1", f"http://198.51.100.1{i}/").body == f"node{i}\n"
        assert lab.http_get("client1", f"http://[2001:db8:100::1{i}]/").node == f"node{i}"
    # Remote clients reach the LAN through the router.
    assert lab.http_get("remote1", "http://198.51.100.11/").node == "node1"
    # Heartbeat network 2 joins the nodes only.
    ping = lab.exec("node1", ["ping", "-c1", "-W2", "192.0.2.12"])
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_udp_echo_answers_from_the_vip(lab_factory: LabFactory) -> None:
    # Without a data path no node holds the VIP: give it to node2 only, by hand. The echo bound
    # before the address existed (IP_FREEBIND) and must answer on it now.
    lab = lab_factory(nodes=2, app="builtin", datapath=False)
    lab.exec("node2", ["ip", "addr", "add", f"{VIP4}/32", "dev", "eth0"], check=True)
    lab.exec("node2", ["ip", "addr", "add", f"{VIP6}/128", "dev", "eth0", "nodad"], check=True)
    v4 = lab.udp_echo("client1", VIP4, source_port=40007)
    assert (v4.node, v4.body, v4.sport) == ("node2", "node2 0", 40007)
    assert lab.udp_echo("client1", VIP6).body == "node2 0"
    replies = lab.load("client1", f"udp://{VIP4}:7", count=50)
    assert {(r.node, r.error) for r in replies} == {("node2", None)}


def test_nginx_answers_with_the_node_name(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2, app="nginx", datapath=False)
    roles = {r.role for r in lab.records()}
    assert {"node1-nginx", "node2-nginx", "node1-app", "node2-app"} <= roles
    assert lab.http_get("client1", "http://198.51.100.12/").body == "node2\n"
    assert lab.http_get("client1", "http://[2001:db8:100::11]/").node == "node1"
    nginx_pid = next(r.pid for r in lab.records() if r.role == "node1-nginx")
    assert os.readlink(f"/proc/{nginx_pid}/cwd")  # it runs, in the foreground under our PID
    assert (lab.dir / "nginx" / "node1" / "nginx.pid").read_text().strip() == str(nginx_pid)


def test_request_errors_are_classified(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=1, app="builtin", datapath=False)
    assert lab.http_get("client1", "http://198.51.100.11:81/").error == "refused"
    lost = lab.http_get("client1", "http://198.51.100.99/", timeout=0.5)
    assert lost.error == "timeout" and 400 < lost.ms < 5000
    pinned = [lab.http_get("client1", "http://198.51.100.11/", source_port=41000) for _ in "ab"]
    assert [(r.node, r.sport) for r in pinned] == [("node1", 41000)] * 2


def test_down_removes_everything_also_strays(lab_factory: LabFactory) -> None:
    links_before = root_links()
    lab = lab_factory(nodes=2, clients=1, remote_clients=1, app="nginx", datapath=False)
    # A process the lab did not record: down must find it through `ip netns pids`.
    stray = subprocess.Popen([IP, "netns", "exec", lab.ns("client1"), "sleep", "600"])
    pids: list[tuple[int, int | None]] = [*lab_pids(lab), (stray.pid, start_time(stray.pid))]
    # Every process in node1's namespace (nginx workers included). Not `pgrep`: namespaces
    # share the PID space, so it would also list other labs' nginx.
    in_node1 = [
        int(p) for p in subprocess.check_output([IP, "netns", "pids", lab.ns("node1")]).split()
    ]
    pids += [(p, start_time(p)) for p in in_node1]
    lab.down()
    stray.wait(timeout=10)
    assert_gone(lab.name, pids, links_before)
    lab.down()  # idempotent


def test_failed_up_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    links_before = root_links()
    name = unique_name()
    started: list[Lab] = []

    def broken(self: Lab) -> None:
        started.append(self)
        raise RuntimeError("injected failure after the network was built")

    monkeypatch.setattr(Lab, "_start_datapath", broken)
    with pytest.raises(RuntimeError, match="injected"):
        testbed.up(name, nodes=2, app="builtin", datapath=True)
    assert started, "the failure must come after the apps started"
    assert_gone(name, [], links_before)


def test_down_half_built_and_absent_lab() -> None:
    links_before = root_links()
    name = unique_name()
    testbed.down(name)  # nothing exists: fine
    topo = Topology(name, nodes=2)
    for ns in (topo.switch_ns, topo.node_ns(1)):
        subprocess.run([IP, "netns", "add", ns], check=True)
    subprocess.run(
        [IP, "-n", topo.switch_ns, "link", "add", "n1l", "type", "veth", "peer", "name", "eth0",
         "netns", topo.node_ns(1)],
        check=True,
    )  # fmt: skip
    (state_dir(name) / "procs").mkdir(parents=True)
    (state_dir(name) / "procs" / "node1-app.json").write_text("{truncated")
    sleeper = subprocess.Popen([IP, "netns", "exec", topo.node_ns(1), "sleep", "600"])
    try:
        assert testbed.status(name)["exists"]
        testbed.down(name)
        sleeper.wait(timeout=10)
        assert_gone(name, [(sleeper.pid, None)], links_before)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            testbed.down(name)


def test_up_twice_is_refused_and_keeps_the_first(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=1, app="builtin", datapath=False)
    with pytest.raises(LabError, match=f"vipfarm lab down --name {lab.name}"):
        testbed.up(lab.name, nodes=1, app="builtin", datapath=False)
    assert lab.http_get("client1", "http://198.51.100.11/").node == "node1"


def test_bad_parameters_are_refused_before_anything_is_built() -> None:
    name = unique_name()
    with pytest.raises(LabError, match="nodes = 40 is out of range"):
        testbed.up(name, nodes=40)
    with pytest.raises(LabError, match="lab name 'Bad-Name' is invalid"):
        testbed.up("Bad-Name")
    with pytest.raises(LabError, match="app 'apache' is unknown"):
        testbed.up(name, app="apache")
    assert namespaces_of(name) == [] and not state_dir(name).exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vipfarm", "lab", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_up_status_down() -> None:
    name = unique_name()
    try:
        up = _cli(
            "up", "--name", name, "--nodes", "2", "--app", "builtin", "--static", "--no-datapath"
        )
        assert up.returncode == 0, up.stderr
        again = _cli("up", "--name", name, "--nodes", "2")
        assert again.returncode == 1
        assert f"vipfarm lab down --name {name}" in again.stderr
        st = _cli("status", "--name", name, "--json")
        assert st.returncode == 0, st.stderr
        info = json.loads(st.stdout)
        assert info["exists"] and info["config"]["nodes"] == 2
        assert info["config"]["app"] == "builtin" and info["config"]["datapath"] is False
        assert {ns["name"]: ns["present"] for ns in info["namespaces"]} == {
            f"{name}-{suffix}": True for suffix in ("switch", "router", "node1", "node2", "client1")
        }
        assert sorted(p["role"] for p in info["processes"] if p["alive"]) == [
            "node1-app",
            "node2-app",
        ]
        assert info["owned"] == {}
        assert _cli("status", "--name", name).returncode == 0
    finally:
        down = _cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    gone = _cli("status", "--name", name, "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["exists"] is False


def test_datapath_spreads_and_set_owned_moves_buckets(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, app="builtin")
    assert lab.status()["owned"] == even_split(3)
    served = Counter(r.node for r in lab.load("client1", count=150))
    assert set(served) == {"node1", "node2", "node3"}, served

    everything = list(range(256))
    t0 = time.monotonic()
    lab.set_owned({1: everything, "node2": [], 3: []})
    moved_s = time.monotonic() - t0
    assert lab.kernel_owned() == {"node1": everything, "node2": [], "node3": []}
    assert [lab.spec_owned(n) for n in lab.node_names] == [everything, [], []]
    replies = lab.load("client1", url_for(VIP6), count=100)
    assert {(r.node, r.error) for r in replies} == {("node1", None)}
    assert moved_s < 10

    with pytest.raises(LabError, match="bucket 0 would be owned by both node1 and node2"):
        lab.set_owned({2: [0]})
    assert lab.kernel_owned(["node2"]) == {"node2": []}


def test_custom_rules_and_remote_client(lab_factory: LabFactory) -> None:
    rules = [Rule(vip=VIP4, proto=Proto.TCP, port=80, affinity=Affinity.CLIENT_IP)]
    lab = lab_factory(nodes=2, clients=1, remote_clients=1, app="builtin", rules=rules)
    assert lab.spec.rules == rules
    # Affinity on the client address only: every connection of one client lands on one node.
    for client in ("client1", "remote1"):
        nodes = {(r.node, r.error) for r in lab.load(client, count=20)}
        assert len(nodes) == 1 and None not in {n for n, _ in nodes}, nodes


def test_down_stops_runners_first_and_they_clean_the_kernel(
    lab_factory: LabFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = lab_factory(nodes=1, app="builtin")
    table = table_name(lab.name)

    def kernel_state() -> tuple[bool, str]:
        tables = lab.exec("node1", ["nft", "list", "tables"], check=True).stdout
        lo = lab.exec("node1", ["ip", "-br", "addr", "show", "dev", "lo"], check=True).stdout
        return table in tables, lo

    has_table, lo = kernel_state()
    assert has_table and str(VIP4) in lo
    after_first_stop: list[tuple[bool, str]] = []

    def spy(pids: list[tuple[int, int | None]], grace_s: float) -> list[int]:
        killed = real_terminate(pids, grace_s)
        if not after_first_stop:
            after_first_stop.append(kernel_state())
            assert killed == [], "the runner needed SIGKILL"
        return killed

    monkeypatch.setattr(testbed, "terminate", spy)
    lab.down()
    # The first stop was the runner's; it removed its table and the VIP while the app still ran.
    has_table, lo = after_first_stop[0]
    assert not has_table and str(VIP4) not in lo
