"""ARP for the VIPs: clients must learn VIP -> VMAC, from every node, without any node ever
sending a frame whose Ethernet source is the VMAC (DESIGN section 3, step 2).

`ArpResponder` is pure: it is fed raw Ethernet frames and returns the frames to send. It answers
requests for a VIP, broadcast or unicast to the VMAC (clients re-check stale entries that way),
with Ethernet source = this node's real MAC and ARP sender hardware address = the VMAC. Every node
answers; the answers are identical, so the client's cache ends on the VMAC whichever comes last.
`announcements()` builds the broadcasts sent on start and on every change of ownership, which
refresh existing client entries (Linux updates, but does not create, entries from gratuitous ARP).

Directed delivery (`entry` is not None): the VIP resolves to a real node's MAC instead. Only
the VIP's entry node answers, with its own MAC as sender hardware address, and announces it the
same way (gratuitous ARP when it becomes the entry, which Linux clients apply at once whatever
their neighbour `locktime`: a gratuitous ARP always overrides); every other node stays silent
for that VIP. A gratuitous ARP seen from a peer is never answered.

The socket side is `vipfarm.datapath.packet.PacketService`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
OP_REQUEST = 1
OP_REPLY = 2


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


@dataclass(frozen=True, slots=True)
class Arp:
    eth_dst: bytes
    eth_src: bytes
    op: int
    sha: bytes
    spa: ipaddress.IPv4Address
    tha: bytes
    tpa: ipaddress.IPv4Address

    def to_frame(self) -> bytes:
        frame = _ETH.pack(self.eth_dst, self.eth_src, ETH_P_ARP) + _ARP.pack(
            1, ETH_P_IP, 6, 4, self.op, self.sha, self.spa.packed, self.tha, self.tpa.packed
        )
        return frame.ljust(60, b"\x00")  # minimum Ethernet payload

    @classmethod
    def parse(cls, frame: bytes) -> Arp | None:
        """None for anything that is not an Ethernet/IPv4 ARP request or reply."""
        if len(frame) < _ETH.size + _ARP.size:
            return None
        dst, src, ethertype = _ETH.unpack_from(frame)
        if ethertype != ETH_P_ARP:
            return None
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
        if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4) or op not in (OP_REQUEST, OP_REPLY):
            return None
        return cls(dst, src, op, sha, ipaddress.IPv4Address(spa), tha, ipaddress.IPv4Address(tpa))


class ArpResponder:
    """Pure ARP logic for one interface: which frames to answer, and with what."""

    def __init__(self, node_mac: str, vmacs: dict[ipaddress.IPv4Address, str]) -> None:
        self.node_mac = mac_bytes(node_mac)
        self.vmacs = {vip: mac_bytes(m) for vip, m in vmacs.items()}
        self.counters: Counter[str] = Counter()
        # None: flood delivery (answer the VMAC for every VIP); otherwise directed delivery,
        # and the VIPs this node is the entry of (answered with its own MAC).
        self.entry: frozenset[ipaddress.IPv4Address] | None = None

    def _answer_mac(self, vip: ipaddress.IPv4Address) -> bytes | None:
        if self.entry is None:
            return self.vmacs.get(vip)
        return self.node_mac if vip in self.entry else None

    def handle(self, frame: bytes) -> bytes | None:
        arp = Arp.parse(frame)
        if arp is None:
            self.counters["ignored"] += 1
            return None
        vmac = self.vmacs.get(arp.tpa)
        if arp.op != OP_REQUEST or vmac is None:
            self.counters["ignored"] += 1
            return None
        if arp.sha in self.vmacs.values() or arp.eth_src == self.node_mac:
            self.counters["own"] += 1  # a gratuitous ARP of this farm, or our own frame
            return None
        if arp.eth_dst not in (BROADCAST, vmac, self.node_mac):
            self.counters["ignored"] += 1
            return None
        if arp.spa == arp.tpa:
            self.counters["gratuitous"] += 1  # a peer announcing itself: nothing to answer
            return None
        answer = self._answer_mac(arp.tpa)
        if answer is None:
            self.counters["not_entry"] += 1  # directed: another node is this VIP's entry
            return None
        self.counters["answered"] += 1
        return Arp(
            eth_dst=arp.eth_src,
            eth_src=self.node_mac,
            op=OP_REPLY,
            sha=answer,
            spa=arp.tpa,
            tha=arp.sha,
            tpa=arp.spa,
        ).to_frame()

    def announcements(self) -> list[bytes]:
        """Gratuitous ARP for every VIP this node answers (all of them in flood delivery)."""
        out = []
        for vip in sorted(self.vmacs):
            mac = self._answer_mac(vip)
            if mac is not None:
                out.append(Arp(BROADCAST, self.node_mac, OP_REQUEST, mac, vip, ZERO_MAC, vip))
        return [a.to_frame() for a in out]
