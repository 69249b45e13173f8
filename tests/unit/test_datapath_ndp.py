"""NDP responder logic and the BPF filter builder, on raw frames."""

from __future__ import annotations

import ipaddress
import struct

from vipfarm.datapath import ndp
from vipfarm.datapath.arp import mac_bytes
from vipfarm.datapath.packet import BPF_JEQ_K, BPF_RET_K, bpf_match_all

VIP = ipaddress.IPv6Address("2001:db8:100::100")
CLIENT = ipaddress.IPv6Address("2001:db8:100::201")
NODE_MAC = "52:54:00:00:00:01"
VMAC = "02:aa:bb:cc:dd:ee"
CLIENT_MAC = mac_bytes("52:54:00:00:00:99")


def ns_frame(
    src: ipaddress.IPv6Address = CLIENT,
    target: ipaddress.IPv6Address = VIP,
    hop: int = 255,
    eth_src: bytes = CLIENT_MAC,
) -> bytes:
    dst = ndp.solicited_node(target)
    body = struct.pack("!BBH4x16s", ndp.NS, 0, 0, target.packed) + bytes([1, 1]) + CLIENT_MAC
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, hop, src.packed, dst.packed)
    return ndp.multicast_mac(dst) + eth_src + b"\x86\xdd" + ip6 + body


def parse_na(frame: bytes) -> tuple[bytes, bytes, ipaddress.IPv6Address, int, bytes]:
    eth_dst, eth_src = frame[:6], frame[6:12]
    ip_dst = ipaddress.IPv6Address(frame[14 + 24 : 14 + 40])
    icmp = frame[54:]
    assert icmp[0] == ndp.NA
    assert ipaddress.IPv6Address(icmp[8:24]) == VIP
    assert icmp[24:26] == bytes([ndp.OPT_TLLA, 1])
    return eth_dst, eth_src, ip_dst, icmp[4], icmp[26:32]


def test_solicited_node_group_and_mac() -> None:
    assert ndp.solicited_node(VIP) == ipaddress.IPv6Address("ff02::1:ff00:100")
    assert ndp.multicast_mac(ndp.solicited_node(VIP)) == bytes.fromhex("3333ff000100")


def test_answers_solicitation_with_vmac_from_real_mac() -> None:
    r = ndp.NdpResponder(NODE_MAC, {VIP: VMAC})
    out = r.handle(ns_frame())
    assert out is not None and ndp.verify_checksum(out)
    eth_dst, eth_src, ip_dst, flags, tlla = parse_na(out)
    assert eth_dst == CLIENT_MAC and eth_src == mac_bytes(NODE_MAC)
    assert ip_dst == CLIENT
    assert flags == ndp.FLAG_SOLICITED | ndp.FLAG_OVERRIDE
    assert tlla == mac_bytes(VMAC)


def test_dad_probe_is_answered_to_all_nodes() -> None:
    r = ndp.NdpResponder(NODE_MAC, {VIP: VMAC})
    out = r.handle(ns_frame(src=ipaddress.IPv6Address("::")))
    assert out is not None and ndp.verify_checksum(out)
    eth_dst, _, ip_dst, flags, _ = parse_na(out)
    assert eth_dst == ndp.ALL_NODES_MAC and ip_dst == ndp.ALL_NODES
    assert flags == ndp.FLAG_OVERRIDE


def test_ignores_bad_hop_limit_other_targets_own_frames_and_garbage() -> None:
    r = ndp.NdpResponder(NODE_MAC, {VIP: VMAC})
    assert r.handle(ns_frame(hop=64)) is None  # off-link forgery
    assert r.handle(ns_frame(target=ipaddress.IPv6Address("2001:db8:100::11"))) is None
    assert r.handle(ns_frame(eth_src=mac_bytes(NODE_MAC))) is None
    assert r.handle(b"\x00" * 100) is None
    assert r.handle(ns_frame()[:70]) is None
    assert r.counters["answered"] == 0 and r.counters["ignored"] == 5


def test_announcements_are_unsolicited_overrides() -> None:
    r = ndp.NdpResponder(NODE_MAC, {VIP: VMAC})
    (frame,) = r.announcements()
    assert ndp.verify_checksum(frame)
    eth_dst, _, ip_dst, flags, tlla = parse_na(frame)
    assert (eth_dst, ip_dst, flags, tlla) == (
        ndp.ALL_NODES_MAC,
        ndp.ALL_NODES,
        ndp.FLAG_OVERRIDE,
        mac_bytes(VMAC),
    )


def run_bpf(prog: list[tuple[int, int, int, int]], frame: bytes) -> int:
    """A tiny interpreter for the subset `bpf_match_all` emits."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == BPF_RET_K:
            return k
        if code == BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
            continue
        size = 2 if code == 0x28 else 1
        if k + size > len(frame):
            return 0
        acc = int.from_bytes(frame[k : k + size], "big")
        pc += 1


def test_ns_filter_passes_only_solicitations() -> None:
    prog = ndp.ns_filter()
    assert run_bpf(prog, ns_frame()) > 0
    na = ndp.NdpResponder(NODE_MAC, {VIP: VMAC}).announcements()[0]
    assert run_bpf(prog, na) == 0
    assert run_bpf(prog, b"\xff" * 12 + b"\x08\x06" + b"\x00" * 60) == 0
    assert run_bpf(bpf_match_all([(0, 1, 7)]), b"\x07") > 0
