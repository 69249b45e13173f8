"""The lab's software switch, tuned so it costs what a hardware switch costs the hosts: nothing.

A frame to the VMAC is unknown unicast, which a switch floods to every port. A hardware switch
does that for free and the NIC of a host that is not a node drops the frame in hardware; a veth
hands it to the host's kernel, which spends CPU to discard it. The nodes themselves must receive
the flood in either world (their NIC is promiscuous), so that cost stays in the figures. So the
bench turns unknown-unicast flooding off on the ports of the hosts that are not nodes (router,
clients, HAProxy): they never need it, their own addresses being learnt as soon as they speak.

Bridge netfilter (`br_netfilter`, built into this kernel) would also pass every bridged frame
through the switch namespace's IP hooks; a layer-2 switch has no business doing that.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import LabError, Role

BRIDGE_NF = ("iptables", "ip6tables", "arptables")


def _switch(lab: Lab, argv: list[str], input: str | None = None) -> str:
    proc = subprocess.run(
        [lab.ip, "-n", lab.ns("switch"), *argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"switch of lab {lab.name}: `ip {' '.join(argv)}` failed: {proc.stderr}")
    return proc.stdout


def node_port(lab: Lab, node: str) -> str:
    """The switch port a node's LAN interface is plugged into."""
    return lab.topology.host(node).links[0].port


def bystander_ports(lab: Lab) -> list[str]:
    return [link.port for h in lab.topology.hosts() if h.role is not Role.NODE for link in h.links]


def set_flood(lab: Lab, ports: Sequence[str], on: bool) -> None:
    """Let `ports` receive flooded unknown unicast, or not."""
    flag = "on" if on else "off"
    _switch(
        lab,
        ["-batch", "-"],
        "".join(f"link set dev {p} type bridge_slave flood {flag}\n" for p in ports),
    )


def tune(lab: Lab) -> None:
    """No flooding to the lab's bystanders, no netfilter on bridged frames."""
    set_flood(lab, bystander_ports(lab), on=False)
    subprocess.run(
        [lab.ip, "netns", "exec", lab.ns("switch"), "sysctl", "-q", "-w"]
        + [f"net.bridge.bridge-nf-call-{t}=0" for t in BRIDGE_NF],
        capture_output=True,
        timeout=30,
        check=False,  # without br_netfilter there is nothing to turn off
    )


def tx_packets(lab: Lab, ports: Sequence[str]) -> int:
    """Frames the switch has sent out of `ports` (what the hosts behind them received)."""
    links = {
        link["ifname"]: link for link in json.loads(_switch(lab, ["-j", "-s", "link", "show"]))
    }
    return sum(int(links[p]["stats64"]["tx"]["packets"]) for p in ports)
