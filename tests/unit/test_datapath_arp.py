"""ARP responder logic on raw frames."""

from __future__ import annotations

import ipaddress

from vipfarm.datapath.arp import (
    BROADCAST,
    OP_REPLY,
    OP_REQUEST,
    ZERO_MAC,
    Arp,
    ArpResponder,
    mac_bytes,
)

VIP = ipaddress.IPv4Address("198.51.100.100")
CLIENT = ipaddress.IPv4Address("198.51.100.201")
NODE_MAC = "52:54:00:00:00:01"
VMAC = "02:aa:bb:cc:dd:ee"
CLIENT_MAC = mac_bytes("52:54:00:00:00:99")


def request(dst: bytes = BROADCAST, tpa: ipaddress.IPv4Address = VIP) -> bytes:
    return Arp(dst, CLIENT_MAC, OP_REQUEST, CLIENT_MAC, CLIENT, ZERO_MAC, tpa).to_frame()


def test_reply_carries_vmac_but_real_source() -> None:
    r = ArpResponder(NODE_MAC, {VIP: VMAC})
    out = r.handle(request())
    assert out is not None
    reply = Arp.parse(out)
    assert reply is not None
    assert reply.op == OP_REPLY
    assert reply.eth_src == mac_bytes(NODE_MAC)  # never the VMAC as Ethernet source
    assert reply.sha == mac_bytes(VMAC)
    assert reply.spa == VIP and reply.tpa == CLIENT
    assert reply.eth_dst == CLIENT_MAC and reply.tha == CLIENT_MAC
    assert r.counters["answered"] == 1


def test_unicast_recheck_to_vmac_is_answered() -> None:
    r = ArpResponder(NODE_MAC, {VIP: VMAC})
    assert r.handle(request(dst=mac_bytes(VMAC))) is not None


def test_ignores_other_targets_replies_own_frames_and_garbage() -> None:
    r = ArpResponder(NODE_MAC, {VIP: VMAC})
    assert r.handle(request(tpa=ipaddress.IPv4Address("198.51.100.11"))) is None
    assert r.handle(request(dst=mac_bytes("52:54:00:00:00:42"))) is None
    garp = r.announcements()[0]
    assert r.handle(garp) is None  # another node's (or our own) gratuitous ARP
    assert r.handle(b"\x00" * 10) is None
    assert r.handle(b"\xff" * 60) is None
    reply = Arp(BROADCAST, CLIENT_MAC, OP_REPLY, CLIENT_MAC, CLIENT, ZERO_MAC, VIP).to_frame()
    assert r.handle(reply) is None
    assert r.counters["answered"] == 0


def test_gratuitous_announces_every_vip() -> None:
    vip2 = ipaddress.IPv4Address("198.51.100.101")
    r = ArpResponder(NODE_MAC, {VIP: VMAC, vip2: "02:00:00:00:00:02"})
    frames = [Arp.parse(f) for f in r.announcements()]
    assert [(f.spa, f.tpa, f.eth_dst, f.eth_src) for f in frames if f] == [
        (VIP, VIP, BROADCAST, mac_bytes(NODE_MAC)),
        (vip2, vip2, BROADCAST, mac_bytes(NODE_MAC)),
    ]
    assert all(len(f) == 60 for f in r.announcements())
