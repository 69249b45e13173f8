"""The lab's pure parts: names, addresses, ip batches, bucket split and handover planning."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vipfarm.datapath.spec import Proto
from vipfarm.lab.apps import nginx_argv, nginx_conf, parse_proc_net
from vipfarm.lab.buckets import (
    datapath_spec,
    default_rules,
    even_split,
    node_key,
    plan_handover,
)
from vipfarm.lab.topology import (
    VIP4,
    VIP6,
    LabError,
    Role,
    Topology,
    check_name,
    host_batch,
    lab_namespaces,
    neighbour_batch,
    static_neighbours,
)


def test_names_and_addresses() -> None:
    topo = Topology("vf", nodes=2, clients=1, remote_clients=1)
    assert topo.namespaces() == [
        "vf-switch",
        "vf-router",
        "vf-node1",
        "vf-node2",
        "vf-client1",
        "vf-remote1",
    ]
    node2 = topo.host("node2")
    assert node2 == topo.host("vf-node2")
    assert (node2.role, node2.short) == (Role.NODE, "node2")
    assert [(link.ifname, link.bridge, link.addresses) for link in node2.links] == [
        ("eth0", "br0", ("198.51.100.12/24", "2001:db8:100::12/64")),
        ("eth1", "br1", ("192.0.2.12/24",)),
    ]
    assert node2.routes == ("default via 198.51.100.1",)
    client = topo.host("client1")
    assert client.links[0].addresses == ("198.51.100.201/24", "2001:db8:100::201/64")
    router = topo.host("router")
    assert [link.addresses for link in router.links] == [("198.51.100.1/24",), ("203.0.113.1/24",)]
    assert ("net.ipv4.ip_forward", "1") in router.sysctls
    remote = topo.host("remote1")
    assert (remote.links[0].bridge, remote.links[0].addresses) == ("br2", ("203.0.113.201/24",))
    assert remote.routes == ("default via 203.0.113.1",)
    for host in topo.hosts():
        assert ("net.ipv6.conf.default.accept_dad", "0") in host.sysctls
    with pytest.raises(LabError, match="no host 'node3': use one of router, node1, node2"):
        topo.host("node3")


def test_largest_lab_fits_interface_names_and_address_plan() -> None:
    topo = Topology("abcdefghij", nodes=32, clients=54, remote_clients=54)
    ports = [link.port for h in topo.hosts() for link in h.links]
    assert len(ports) == len(set(ports)) and max(map(len, ports)) <= 15
    addresses = [
        ipaddress.ip_interface(a).ip
        for h in topo.hosts()
        for link in h.links
        for a in link.addresses
    ]
    assert len(addresses) == len(set(addresses))
    assert VIP4 not in addresses and VIP6 not in addresses
    assert str(topo.host("client54").links[0].addresses[0]) == "198.51.100.254/24"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes = 0 is out of range: use 1 to 32"),
        ({"nodes": 33}, "nodes = 33 is out of range"),
        ({"clients": 55}, "clients = 55 is out of range: use 0 to 54"),
        ({"remote_clients": -1}, "remote clients = -1 is out of range"),
    ],
)
def test_sizes_are_checked(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(LabError, match=message):
        Topology("vf", **kwargs)


@pytest.mark.parametrize("bad", ["", "VF", "vf-1", "1vf", "abcdefghijk", "v_f"])
def test_bad_lab_names(bad: str) -> None:
    with pytest.raises(LabError, match="is invalid: use 1 to 10 lowercase letters or digits"):
        check_name(bad)


def test_lab_namespaces_only_claims_its_own() -> None:
    existing = ["vf-node1", "vf-switch", "vf2-node1", "vf-nodex", "vf-client12", "vfx-sw", "x"]
    assert lab_namespaces("vf", existing) == ["vf-node1", "vf-switch", "vf-client12"]


def test_batches() -> None:
    topo = Topology("vf", nodes=1, clients=1)
    switch = topo.switch_batch()
    assert switch[:2] == ["link add br0 type bridge mcast_snooping 0", "link set br0 up"]
    assert "link add n1l type veth peer name eth0 netns vf-node1" in switch
    assert "link set n1h master br1 up" in switch
    assert host_batch(topo.host("node1")) == [
        "link set lo up",
        "addr add 198.51.100.11/24 dev eth0",
        "addr add 2001:db8:100::11/64 dev eth0",
        "link set eth0 up",
        "addr add 192.0.2.11/24 dev eth1",
        "link set eth1 up",
        "route add default via 198.51.100.1",
    ]


def test_static_neighbours_only_where_the_host_wide_table_would_overflow() -> None:
    # 1,024 entries by default for every namespace together: 16 nodes resolve by ARP
    # (480 entries among them), 24 (1,104) would overflow it.
    assert not static_neighbours(16, 1024)
    assert static_neighbours(24, 1024)
    assert not static_neighbours(24, 8192)


def test_neighbour_batch_pins_every_other_nodes_ipv4_addresses() -> None:
    nodes = [h for h in Topology("nb", 3, 1, 0).hosts() if h.role is Role.NODE]
    macs = {
        (h.ns, link.ifname): f"02:00:00:00:0{h.index}:0{j}"
        for h in nodes
        for j, link in enumerate(h.links)
    }
    lines = neighbour_batch(nodes[0], nodes, macs)
    assert lines == [
        "neigh replace 198.51.100.12 lladdr 02:00:00:00:02:00 dev eth0 nud permanent",
        "neigh replace 192.0.2.12 lladdr 02:00:00:00:02:01 dev eth1 nud permanent",
        "neigh replace 198.51.100.13 lladdr 02:00:00:00:03:00 dev eth0 nud permanent",
        "neigh replace 192.0.2.13 lladdr 02:00:00:00:03:01 dev eth1 nud permanent",
    ]


@pytest.mark.parametrize(("nodes", "buckets"), [(1, 256), (3, 256), (7, 256), (32, 256), (5, 7)])
def test_even_split(nodes: int, buckets: int) -> None:
    split = even_split(nodes, buckets)
    assert list(split) == [f"node{i}" for i in range(1, nodes + 1)]
    owned = sorted(b for bs in split.values() for b in bs)
    assert owned == list(range(buckets))
    sizes = [len(bs) for bs in split.values()]
    assert max(sizes) - min(sizes) <= 1


def test_default_rules_and_spec() -> None:
    rules = default_rules()
    assert {(str(r.vip), r.proto, r.port, r.affinity.value) for r in rules} == {
        (vip, proto, port, "client-ip-port")
        for vip in ("198.51.100.100", "2001:db8:100::100")
        for proto, port in ((Proto.TCP, 80), (Proto.UDP, 7))
    }
    spec = datapath_spec("vf")
    assert (spec.farm, spec.interface, spec.buckets, spec.lease_s) == ("vf", "eth0", 256, 3.0)
    assert spec.vips == [VIP4, VIP6]
    with pytest.raises(LabError, match="invalid lab rules"):
        datapath_spec("vf", [])


def test_node_key() -> None:
    assert node_key(2, 3) == node_key("node2", 3) == "node2"
    with pytest.raises(LabError, match=r"no node 4 in this lab: use 1\.\.3 or node1\.\.node3"):
        node_key(4, 3)
    with pytest.raises(LabError, match="no node 'client1'"):
        node_key("client1", 3)


def test_handover_releases_before_acquiring() -> None:
    current = {"node1": [0, 1], "node2": [2, 3], "node3": [4, 5]}
    # node1 takes 2 from node2 and gives 0 to node3; node3 keeps what it has.
    release, acquire = plan_handover(current, {"node1": [1, 2], "node2": [3], "node3": [0, 4, 5]})
    assert release == {"node1": [1], "node2": [3]}
    assert acquire == {"node1": [1, 2], "node3": [0, 4, 5]}
    # Only gains: nothing to release first. Only losses: nothing to acquire after.
    assert plan_handover({"node1": [0], "node2": []}, {"node2": [1]}) == ({}, {"node2": [1]})
    assert plan_handover({"node1": [0, 1]}, {"node1": [1]}) == ({"node1": [1]}, {})
    assert plan_handover(current, {"node2": [3, 2]}) == ({}, {})


def test_handover_refuses_double_ownership_and_bad_buckets() -> None:
    current = {"node1": [0], "node2": [1]}
    with pytest.raises(LabError, match="bucket 0 would be owned by both node1 and node2"):
        plan_handover(current, {"node2": [0, 1]})
    with pytest.raises(LabError, match=r"node1: buckets \[256, 300\] out of range: use 0..255"):
        plan_handover(current, {"node1": [0, 256, 300]})


def test_nginx_config_is_self_contained(tmp_path: Path) -> None:
    conf = nginx_conf("node3", tmp_path)
    assert 'return 200 "node3\\n";' in conf
    assert "listen 0.0.0.0:80" in conf and "listen [::]:80 ipv6only=on" in conf
    assert f"pid {tmp_path}/nginx.pid;" in conf
    for line in conf.splitlines():
        if "_temp_path" in line or "error_log" in line:
            assert str(tmp_path) in line
    argv = nginx_argv(tmp_path)
    assert argv[-2:] == ["-g", "daemon off;"] and str(tmp_path / "nginx.conf") in argv


def test_parse_proc_net() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0\n"
    )
    assert parse_proc_net(tcp) == [
        (ipaddress.ip_address("0.0.0.0"), 80, "0A"),
        (ipaddress.ip_address("127.0.0.1"), 8080, "01"),
    ]
    udp6 = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: B80D0120000000010000000000010000:0007 00000000000000000000000000000000:0000 07\n"
    )
    assert parse_proc_net(udp6) == [(VIP6, 7, "07")]
