"""The conntrack reader's netlink encoding and parsing, on hand-built messages."""

from __future__ import annotations

import socket
import struct

from vipfarm.datapath import conntrack


def nla(kind: int, value: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(value), kind | (0x8000 if nested else 0))
    return head + value + b"\0" * (-len(value) % 4)


def entry(mark: int | None, tcp_state: int | None) -> bytes:
    attrs = nla(1, nla(1, b"\0" * 8), nested=True)  # CTA_TUPLE_ORIG, ignored
    if tcp_state is not None:
        tcp = nla(
            conntrack.CTA_PROTOINFO_TCP,
            nla(conntrack.CTA_PROTOINFO_TCP_STATE, bytes([tcp_state])),
            True,
        )
        attrs += nla(conntrack.CTA_PROTOINFO, tcp, nested=True)
    if mark is not None:
        attrs += nla(conntrack.CTA_MARK, struct.pack("!I", mark))
    return attrs


def test_mark_and_liveness_of_an_entry() -> None:
    established = entry(0x8000_0007, 3)
    assert conntrack.entry_mark(established, 0, len(established)) == (0x8000_0007, True)
    for ended in (conntrack.TCP_CONNTRACK_TIME_WAIT, conntrack.TCP_CONNTRACK_CLOSE):
        data = entry(0x8000_0001, ended)
        assert conntrack.entry_mark(data, 0, len(data)) == (0x8000_0001, False)
    udp = entry(0x8000_00FF, None)  # no TCP state: live while the entry exists
    assert conntrack.entry_mark(udp, 0, len(udp)) == (0x8000_00FF, True)
    unmarked = entry(None, 3)
    assert conntrack.entry_mark(unmarked, 0, len(unmarked)) == (None, True)


def test_a_truncated_attribute_ends_the_parse_without_raising() -> None:
    data = entry(0x8000_0002, 3) + struct.pack("=HH", 2, 8)  # length below the header size
    assert conntrack.entry_mark(data, 0, len(data)) == (0x8000_0002, True)


def test_dump_request_filters_on_mark_and_mask_for_both_families() -> None:
    req = conntrack.dump_request(0x8000_0000, 0x8000_FFFF, seq=7)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 16 + 4 + 8 + 8
    assert kind == (conntrack.NFNL_SUBSYS_CTNETLINK << 8) | conntrack.IPCTNL_MSG_CT_GET
    assert flags == conntrack.NLM_F_REQUEST | conntrack.NLM_F_DUMP and (seq, pid) == (7, 0)
    assert req[16] == socket.AF_UNSPEC
    assert req[20:] == nla(conntrack.CTA_MARK, struct.pack("!I", 0x8000_0000)) + nla(
        conntrack.CTA_MARK_MASK, struct.pack("!I", 0x8000_FFFF)
    )


def test_an_attribute_longer_than_its_message_is_not_read() -> None:
    data = entry(None, 3) + struct.pack("=HH", 64, conntrack.CTA_MARK) + b"\0\0\0\1"
    assert conntrack.entry_mark(data, 0, len(data)) == (None, True)
