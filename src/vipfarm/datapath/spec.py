"""Validated data shared by the data path, the lab and (later) the farm configuration.

Pydantic models with `extra="forbid"` so that a misspelt key is an error, not a silent default.
Everything here is plain data; nothing touches the kernel.
"""

from __future__ import annotations

import hashlib
import ipaddress
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Affinity(StrEnum):
    """What the bucket hash is computed over."""

    CLIENT_IP = "client-ip"
    CLIENT_IP_PORT = "client-ip-port"
    CLIENT_SUBNET = "client-subnet"


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class DecisionPoint(StrEnum):
    """Where frames for other nodes' buckets are dropped (vipfarm.datapath.ruleset)."""

    INGRESS = "ingress"  # the netdev ingress chain, before conntrack: the default
    PREROUTING = "prerouting"  # after conntrack, as before issue 14: kept for comparison benches


class Delivery(StrEnum):
    """How frames to a VIP reach the node that serves them (docs/DATAPATH.md, "Delivery")."""

    FLOOD = "flood"  # the VIP resolves to the VMAC, which the switch floods to every node
    DIRECTED = "directed"  # the VIP resolves to an entry node's MAC; it forwards at layer 2
    # Flood or directed answers, chosen by the nodes from a probe (vipfarm.node.delivery); the
    # kernel steers as in directed delivery throughout, so a switch costs no kernel change.
    AUTO = "auto"

    @property
    def steers(self) -> bool:
        """Whether the kernel forwards frames sent to this node's own MAC (directed, auto)."""
        return self is not Delivery.FLOOD


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """One balanced service: a VIP, a protocol, a port or port range, and the affinity."""

    vip: IPAddress
    proto: Proto = Proto.TCP
    port: int = Field(ge=1, le=65535, description="first (or only) port")
    port_end: int | None = Field(default=None, ge=1, le=65535, description="last port of a range")
    affinity: Affinity = Affinity.CLIENT_IP
    prefix4: Annotated[int, Field(ge=1, le=32)] = 24
    prefix6: Annotated[int, Field(ge=1, le=128)] = 64

    @model_validator(mode="after")
    def _range_ordered(self) -> Rule:
        if self.port_end is not None and self.port_end < self.port:
            raise ValueError(
                f"port range {self.port}-{self.port_end} is reversed: write it as "
                f"{self.port_end}-{self.port}"
            )
        return self

    @property
    def ports_text(self) -> str:
        if self.port_end is None or self.port_end == self.port:
            return str(self.port)
        return f"{self.port}-{self.port_end}"


def vmac_for(farm: str, vip: IPAddress) -> str:
    """The virtual MAC of a VIP: locally administered unicast (02:...), stable per farm and VIP.

    Every node computes the same value, so no coordination is needed.
    """
    digest = hashlib.sha256(f"vipfarm\0{farm}\0{vip}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


class DatapathSpec(_Strict):
    """Everything the kernel data path of one node needs, except which buckets it owns."""

    farm: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,15}$")
    interface: str = Field(min_length=1, max_length=15, description="LAN interface (e.g. eth0)")
    rules: list[Rule] = Field(min_length=1)
    buckets: int = Field(default=256, ge=1, le=4096)
    seed: int = Field(default=0x5EED, ge=0, le=0xFFFFFFFF)
    lease_s: float = Field(default=3.0, gt=0, le=3600)
    decide_at: DecisionPoint = DecisionPoint.INGRESS
    delivery: Delivery = Delivery.FLOOD
    notrack_other: bool = Field(
        default=False,
        description="exempt traffic that is not to or from a VIP from conntrack (see ruleset)",
    )
    prefilter: bool = Field(
        default=True,
        description="drop other nodes' frames in a BPF program at tc ingress, before nftables "
        "(vipfarm.datapath.prefilter; Linux 6.6 or later, else nftables alone decides)",
    )

    @field_validator("rules")
    @classmethod
    def _no_overlap(cls, rules: list[Rule]) -> list[Rule]:
        # Sorted by first port per (VIP, protocol), an overlap always shows between a rule and
        # the one reaching furthest before it: O(n log n), for farms of thousands of rules.
        groups: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
        for i, r in enumerate(rules):
            groups.setdefault((str(r.vip), r.proto), []).append((r.port, r.port_end or r.port, i))
        for spans in groups.values():
            spans.sort()
            reach, holder = -1, -1
            for lo, hi, i in spans:
                if lo <= reach:
                    first, then = sorted((holder, i))
                    r, s = rules[then], rules[first]
                    raise ValueError(
                        f"rules overlap: {r.vip} {r.proto} {r.ports_text} and {s.ports_text}; "
                        "each port of a VIP may belong to one rule only"
                    )
                if hi > reach:
                    reach, holder = hi, i
        return rules

    @property
    def vips(self) -> list[IPAddress]:
        # dict.fromkeys: first-seen order in O(n); a list scan was O(n^2) and took 35 s for a
        # configuration check of 5,000 VIPs on 32 nodes.
        return list(dict.fromkeys(r.vip for r in self.rules))

    def vmac(self, vip: IPAddress) -> str:
        return vmac_for(self.farm, vip)


class SteerSpec(_Strict):
    """Directed delivery for a stand-alone runner (the lab's static farms), which has no
    membership to compute it from: the VIPs this node is the entry of, and its steering plan
    (`vipfarm.datapath.ruleset.SteerPlan`)."""

    entry: list[IPAddress] = Field(default_factory=list)
    mac: str
    targets: dict[int, list[str]] = Field(default_factory=dict)
    local: list[int] = Field(default_factory=list)
    peers: list[str] = Field(default_factory=list)


class NodeDatapathSpec(_Strict):
    """What a stand-alone data path runner reads: the spec plus the buckets this node owns."""

    datapath: DatapathSpec
    owned: list[int] = Field(default_factory=list)
    steer: SteerSpec | None = None  # directed delivery (None: leave it as it is)
