"""The lab's constants, names, addresses and the ip(8) commands that build it (pure, no I/O).

The lab is DESIGN section 5 in network namespaces: one `<name>-switch` namespace holds the
bridges (`br0` the LAN, `br1` heartbeat network 2, `br2` the remote subnet behind the router), and
every other namespace (nodes, clients, router, remote clients) is plugged into them by a veth
pair created from inside the switch namespace, so nothing is ever created in the root namespace.
Switch-side port names carry no lab name (they live in the lab's own switch namespace), which
keeps them far below the 15-character limit of interface names.

`flood_batch` turns unknown-unicast flooding off (or on again) on the node ports of the LAN bridge
(`vipfarm lab up --no-flood`, `Lab.set_flood`), the switch of a network that does not flood.

Everything here is a pure function of the lab's name and sizes, so the build plan is unit tested
without root; `vipfarm.lab.testbed` feeds these lines to `ip -batch`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vipfarm.errors import VipfarmError

# Lab-wide constants: every other lab module takes them from here.
STATE_ROOT = Path("/run/vipfarm-lab")
VIP4 = ipaddress.IPv4Address("198.51.100.100")
VIP6 = ipaddress.IPv6Address("2001:db8:100::100")
VIPS: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (VIP4, VIP6)
LAN_IF = "eth0"
HB_IF = "eth1"
BUCKETS = 256
SEED = 0x5EED
LEASE_S = 3.0
HTTP_PORT = 80
ECHO_PORT = 7
ROUTER_LAN4 = ipaddress.IPv4Address("198.51.100.1")
ROUTER_REMOTE4 = ipaddress.IPv4Address("203.0.113.1")
MAX_NODES = 32
MAX_CLIENTS = 54  # 198.51.100.(200+i) must stay a host address
MAX_REMOTE_CLIENTS = 54

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_SUFFIXES = r"(switch|router|node[0-9]+|client[0-9]+|remote[0-9]+|extra[0-9]+|haproxy)"


class LabError(VipfarmError):
    """A lab operation failed; the text says what and how to fix it."""


class Role(StrEnum):
    SWITCH = "switch"
    ROUTER = "router"
    NODE = "node"
    CLIENT = "client"
    REMOTE = "remote"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LabError(
            f"lab name {name!r} is invalid: use 1 to 10 lowercase letters or digits, starting "
            "with a letter (e.g. vf); it prefixes every namespace and is the farm name"
        )
    return name


def node_name(i: int) -> str:
    return f"node{i}"


def node_index(name: str) -> int:
    """The number of a node by its name: node3 -> 3 (the inverse of `node_name`)."""
    return int(name.removeprefix("node"))


def node_lan4(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.51.100.{10 + i}")


def node_lan6(i: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:db8:100::{10 + i}")


def node_hb(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"192.0.2.{10 + i}")


def client_lan4(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.51.100.{200 + i}")


def client_lan6(i: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:db8:100::{200 + i}")


def remote_addr(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"203.0.113.{200 + i}")


def extra_lan4(i: int) -> ipaddress.IPv4Address:
    """Extra LAN hosts (`Lab.add_host`, e.g. a VRRP pair for comparisons): 198.51.100.(60+i)."""
    return ipaddress.IPv4Address(f"198.51.100.{60 + i}")


def extra_hb4(i: int) -> ipaddress.IPv4Address:
    """An extra host's address on heartbeat network 2 (`Lab.add_host(i, heartbeat=True)`)."""
    return ipaddress.IPv4Address(f"192.0.2.{60 + i}")


def lab_namespaces(name: str, existing: list[str]) -> list[str]:
    """The namespaces among `existing` that belong to lab `name` (also those of a half-built lab).

    Lab names contain no '-', so lab `vf` never claims the namespaces of another lab.
    """
    pattern = re.compile(rf"^{re.escape(name)}-{_SUFFIXES}$")
    return [ns for ns in existing if pattern.match(ns)]


@dataclass(frozen=True)
class Link:
    """One veth pair: `ifname` inside the host, `port` on `bridge` in the switch namespace."""

    ifname: str
    port: str
    bridge: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Host:
    """A namespace plugged into the switch, with what `ip` must configure inside it."""

    ns: str
    role: Role
    index: int  # 1-based for nodes and clients; 0 for the router
    links: tuple[Link, ...]
    routes: tuple[str, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()

    @property
    def short(self) -> str:
        """The name used in the CLI and in `Lab` helpers: node1, client2, remote1, router."""
        return self.role.value if self.role is Role.ROUTER else f"{self.role.value}{self.index}"


# Addresses must be usable at once (no DAD); set before links exist so new devices inherit it.
_NO_DAD = (("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0"))
# Clients pin source ports (`http_get(source_port=...)`): let a new connection reuse a port that
# still has a TIME_WAIT entry to the same server.
_CLIENT = (*_NO_DAD, ("net.ipv4.tcp_tw_reuse", "1"))


@dataclass(frozen=True)
class Topology:
    """A lab's shape; validates sizes and derives every namespace, port and address from them."""

    name: str
    nodes: int = 3
    clients: int = 1
    remote_clients: int = 0

    def __post_init__(self) -> None:
        check_name(self.name)
        for what, value, low, high in (
            ("nodes", self.nodes, 1, MAX_NODES),
            ("clients", self.clients, 0, MAX_CLIENTS),
            ("remote clients", self.remote_clients, 0, MAX_REMOTE_CLIENTS),
        ):
            if not low <= value <= high:
                raise LabError(f"{what} = {value} is out of range: use {low} to {high}")

    @property
    def switch_ns(self) -> str:
        return f"{self.name}-switch"

    @property
    def router_ns(self) -> str:
        return f"{self.name}-router"

    def node_ns(self, i: int) -> str:
        return f"{self.name}-node{i}"

    def client_ns(self, i: int) -> str:
        return f"{self.name}-client{i}"

    def remote_ns(self, i: int) -> str:
        return f"{self.name}-remote{i}"

    def hosts(self) -> list[Host]:
        out = [
            Host(
                self.router_ns,
                Role.ROUTER,
                0,
                (
                    Link(LAN_IF, "rt0", "br0", (f"{ROUTER_LAN4}/24",)),
                    Link("eth1", "rt1", "br2", (f"{ROUTER_REMOTE4}/24",)),
                ),
                sysctls=(*_NO_DAD, ("net.ipv4.ip_forward", "1")),
            )
        ]
        out += [
            Host(
                self.node_ns(i),
                Role.NODE,
                i,
                (
                    Link(LAN_IF, f"n{i}l", "br0", (f"{node_lan4(i)}/24", f"{node_lan6(i)}/64")),
                    Link(HB_IF, f"n{i}h", "br1", (f"{node_hb(i)}/24",)),
                ),
                routes=(f"default via {ROUTER_LAN4}",),
                sysctls=_NO_DAD,
            )
            for i in range(1, self.nodes + 1)
        ]
        out += [
            Host(
                self.client_ns(i),
                Role.CLIENT,
                i,
                (Link(LAN_IF, f"c{i}", "br0", (f"{client_lan4(i)}/24", f"{client_lan6(i)}/64")),),
                routes=(f"default via {ROUTER_LAN4}",),
                sysctls=_CLIENT,
            )
            for i in range(1, self.clients + 1)
        ]
        out += [
            Host(
                self.remote_ns(i),
                Role.REMOTE,
                i,
                (Link(LAN_IF, f"r{i}", "br2", (f"{remote_addr(i)}/24",)),),
                routes=(f"default via {ROUTER_REMOTE4}",),
                sysctls=_CLIENT,
            )
            for i in range(1, self.remote_clients + 1)
        ]
        return out

    def namespaces(self) -> list[str]:
        """Every namespace of the lab, switch first (the order they are created in)."""
        return [self.switch_ns, *(h.ns for h in self.hosts())]

    def host(self, who: str) -> Host:
        """Find a host by short name (`node1`, `client1`, `router`) or namespace name."""
        for h in self.hosts():
            if who in (h.short, h.ns):
                return h
        known = ", ".join(h.short for h in self.hosts())
        raise LabError(f"lab {self.name!r} has no host {who!r}: use one of {known}")

    def switch_sysctls(self) -> tuple[tuple[str, str], ...]:
        # The switch is layer 2 only: without IPv6 its bridges send no RS/MLD noise into the LAN,
        # and with bridge netfilter off (on by default where br_netfilter is loaded) the frames it
        # forwards do not go through the iptables/nftables hooks, as on a real switch.
        return (
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
            ("net.bridge.bridge-nf-call-iptables", "0"),
            ("net.bridge.bridge-nf-call-ip6tables", "0"),
            ("net.bridge.bridge-nf-call-arptables", "0"),
        )

    def switch_batch(self) -> list[str]:
        """`ip -n <switch> -batch` lines: bridges, then every veth pair plugged into its bridge.

        Multicast snooping is off so the bridges flood like a dumb switch; that matters for NDP to
        the VIP, whose solicited-node group no node ever reports.
        """
        lines = []
        for br in ("br0", "br1", "br2"):
            lines += [f"link add {br} type bridge mcast_snooping 0", f"link set {br} up"]
        for h in self.hosts():
            for link in h.links:
                lines += [
                    f"link add {link.port} type veth peer name {link.ifname} netns {h.ns}",
                    f"link set {link.port} master {link.bridge} up",
                ]
        return lines


def flood_batch(topology: Topology, on: bool) -> list[str]:
    """`ip -n <switch> -batch` lines that turn unknown-unicast flooding on or off on the LAN
    bridge's node ports (as `bridge link set dev PORT flood off`): a switch that delivers a
    frame for an unknown MAC (the VMAC) to no node, as VMware's vSwitches, clouds and many
    data-centre switches do. Broadcast and multicast still reach every port."""
    word = "on" if on else "off"
    return [
        f"link set dev {link.port} type bridge_slave flood {word}"
        for h in topology.hosts()
        if h.role is Role.NODE
        for link in h.links
        if link.bridge == "br0"
    ]


def static_neighbours(nodes: int, table_limit: int) -> bool:
    """Whether the nodes need permanent neighbour entries for each other's addresses.

    Every namespace's ARP entries count against one host-wide limit (the root namespace's
    `net.ipv4.neigh.default.gc_thresh3`, 1024 by default): past it the kernel creates no new
    entry ("neighbor table overflow") and heartbeats to a peer not yet resolved are lost, so a
    24-node lab (2 x 24 x 23 = 1,104 entries among the nodes alone) never came up. Permanent
    entries do not count against it. A smaller lab keeps resolving as a real LAN does; half
    the limit leaves room for the clients, the router and another lab."""
    return 2 * nodes * (nodes - 1) > table_limit // 2


def neighbour_batch(node: Host, nodes: list[Host], macs: dict[tuple[str, str], str]) -> list[str]:
    """`ip -n <node ns> -batch` lines: a permanent entry for every other node's IPv4 address on
    each link, from `macs` ((namespace, ifname) -> MAC). IPv4 only: the heartbeats are, and
    IPv6 neighbours have a table (and limit) of their own that the nodes barely use."""
    lines = []
    for other in nodes:
        if other.ns == node.ns:
            continue
        for link in other.links:
            mac = macs[(other.ns, link.ifname)]
            for addr in link.addresses:
                ip = addr.split("/")[0]
                if ":" not in ip:
                    lines.append(f"neigh replace {ip} lladdr {mac} dev {link.ifname} nud permanent")
    return lines


def host_batch(host: Host) -> list[str]:
    """`ip -n <host ns> -batch` lines: loopback, links up with their addresses, routes."""
    lines = ["link set lo up"]
    for link in host.links:
        lines += [f"addr add {a} dev {link.ifname}" for a in link.addresses]
        lines.append(f"link set {link.ifname} up")
    lines += [f"route add {r}" for r in host.routes]
    return lines
