"""IPv6 neighbour discovery for the VIPs: the IPv6 twin of `vipfarm.datapath.arp`.

A VIP6 lives on `lo`, and Linux answers a neighbour solicitation only for addresses of the
interface it arrived on, so the kernel never answers for it; `NdpResponder` does, with a
neighbour advertisement whose Ethernet source is the node's real MAC and whose target link-layer
address option is the VMAC. Solicitations arrive on the VIP's solicited-node multicast group
(joined on the packet socket, so a real NIC accepts them) or unicast to the VMAC (reachability
confirmation). A solicitation from the unspecified address (a client's DAD) is answered on the
all-nodes group, which also defends the VIP. `announcements()` are unsolicited advertisements with
the override flag, which update existing client entries after a change of ownership.

Directed delivery (`entry` not None): as in `vipfarm.datapath.arp`, only a VIP's entry node
answers and announces it, with its own MAC in the target link-layer address option.

Only frames that pass a BPF filter (IPv6, next header ICMPv6, type 135) reach this code.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter

from vipfarm.datapath.arp import mac_bytes
from vipfarm.datapath.packet import BpfInsn, bpf_match_all, inet_checksum

ETH_P_IPV6 = 0x86DD
ICMPV6 = 58
NS = 135
NA = 136
OPT_TLLA = 2
FLAG_SOLICITED = 0x40
FLAG_OVERRIDE = 0x20
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
_ETH = struct.Struct("!6s6sH")
_IP6 = struct.Struct("!IHBB16s16s")
ETH_LEN = _ETH.size
IP6_LEN = _IP6.size


def solicited_node(addr: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + addr.packed[13:])


def multicast_mac(addr: ipaddress.IPv6Address) -> bytes:
    return b"\x33\x33" + addr.packed[12:]


def ns_filter() -> list[BpfInsn]:
    return bpf_match_all(
        [(12, 2, ETH_P_IPV6), (ETH_LEN + 6, 1, ICMPV6), (ETH_LEN + IP6_LEN, 1, NS)]
    )


def _checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    return inet_checksum(src + dst + struct.pack("!I3xB", len(icmp), ICMPV6) + icmp)


def build_na(
    eth_dst: bytes,
    eth_src: bytes,
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    target: ipaddress.IPv6Address,
    flags: int,
    tlla: bytes,
) -> bytes:
    body = struct.pack("!BBHB3x16s", NA, 0, 0, flags, target.packed) + bytes([OPT_TLLA, 1]) + tlla
    csum = _checksum(src.packed, dst.packed, body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    ip6 = _IP6.pack(0x60000000, len(body), ICMPV6, 255, src.packed, dst.packed)
    return _ETH.pack(eth_dst, eth_src, ETH_P_IPV6) + ip6 + body


def verify_checksum(frame: bytes) -> bool:
    """True when the ICMPv6 checksum of an Ethernet/IPv6/ICMPv6 frame is right (for tests)."""
    _v, plen, _nh, _hl, src, dst = _IP6.unpack_from(frame, ETH_LEN)
    icmp = frame[ETH_LEN + IP6_LEN : ETH_LEN + IP6_LEN + plen]
    zeroed = icmp[:2] + b"\x00\x00" + icmp[4:]
    (stored,) = struct.unpack_from("!H", icmp, 2)
    return _checksum(src, dst, zeroed) == int(stored)


class NdpResponder:
    def __init__(self, node_mac: str, vmacs: dict[ipaddress.IPv6Address, str]) -> None:
        self.node_mac = mac_bytes(node_mac)
        self.vmacs = {vip: mac_bytes(m) for vip, m in vmacs.items()}
        self.counters: Counter[str] = Counter()
        self.entry: frozenset[ipaddress.IPv6Address] | None = None  # as ArpResponder.entry

    def _answer_mac(self, vip: ipaddress.IPv6Address) -> bytes | None:
        if self.entry is None:
            return self.vmacs.get(vip)
        return self.node_mac if vip in self.entry else None

    @property
    def multicast_macs(self) -> list[bytes]:
        return sorted({multicast_mac(solicited_node(v)) for v in self.vmacs})

    def handle(self, frame: bytes) -> bytes | None:
        parsed = self._parse_ns(frame)
        if parsed is None:
            self.counters["ignored"] += 1
            return None
        eth_src, src, target = parsed
        vmac = self._answer_mac(target)
        if vmac is None:
            self.counters["not_entry"] += 1
            return None
        self.counters["answered"] += 1
        if src.is_unspecified:  # DAD: answer everyone, not solicited
            return build_na(ALL_NODES_MAC, self.node_mac, target, ALL_NODES, target,
                            FLAG_OVERRIDE, vmac)  # fmt: skip
        return build_na(
            eth_src, self.node_mac, target, src, target, FLAG_SOLICITED | FLAG_OVERRIDE, vmac
        )

    def _parse_ns(
        self, frame: bytes
    ) -> tuple[bytes, ipaddress.IPv6Address, ipaddress.IPv6Address] | None:
        if len(frame) < ETH_LEN + IP6_LEN + 24:
            return None
        _dst, eth_src, ethertype = _ETH.unpack_from(frame)
        if ethertype != ETH_P_IPV6 or eth_src == self.node_mac:
            return None
        vtf, plen, nh, hop, src, _ip_dst = _IP6.unpack_from(frame, ETH_LEN)
        if vtf >> 28 != 6 or nh != ICMPV6 or hop != 255 or plen < 24:
            return None
        off = ETH_LEN + IP6_LEN
        if frame[off] != NS or frame[off + 1] != 0 or len(frame) < off + plen:
            return None
        target = ipaddress.IPv6Address(frame[off + 8 : off + 24])
        if target not in self.vmacs:
            return None
        return eth_src, ipaddress.IPv6Address(src), target

    def announcements(self) -> list[bytes]:
        return [
            build_na(ALL_NODES_MAC, self.node_mac, vip, ALL_NODES, vip, FLAG_OVERRIDE, mac)
            for vip in sorted(self.vmacs)
            if (mac := self._answer_mac(vip)) is not None
        ]
