"""The lease renewal's netlink batch, byte by byte where it matters (the kernel test is in
tests/linux/test_datapath_ingress.py)."""

from __future__ import annotations

import struct

from vipfarm.datapath import leases


def _messages(batch: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(batch):
        length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", batch, pos)
        out.append((kind, flags, seq, batch[pos + 16 : pos + length]))
        pos += length
    return out


def test_a_renewal_is_flush_then_add_in_one_batch() -> None:
    elems = leases.elements([3, 1, 3], 150)
    batch = leases.renewal_batch("vipfarm_web", "owned", elems, seq=8)
    kinds = [(k, s) for k, _f, s, _b in _messages(batch)]
    assert kinds == [
        (leases.NFNL_MSG_BATCH_BEGIN, 8),
        ((10 << 8) | leases.NFT_MSG_DELSETELEM, 9),
        ((10 << 8) | leases.NFT_MSG_NEWSETELEM, 10),
        (leases.NFNL_MSG_BATCH_END, 11),
    ]
    _k, flags, _s, body = _messages(batch)[2]
    assert flags & leases.NLM_F_ACK and flags & leases.NLM_F_CREATE
    assert body[0] == leases.NFPROTO_NETDEV
    assert b"vipfarm_web\0" in body and b"owned\0" in body
    # Two elements (the duplicate counted once), each with the lease as big-endian ms.
    assert body.count(struct.pack("!Q", 150)) == 2
    assert struct.pack("=I", 1) in body and struct.pack("=I", 3) in body


def test_an_empty_renewal_only_flushes() -> None:
    batch = leases.renewal_batch("vipfarm_web", "owned", None, seq=0)
    kinds = [k & 0xFF for k, _f, _s, _b in _messages(batch)]
    assert kinds == [
        leases.NFNL_MSG_BATCH_BEGIN,
        leases.NFT_MSG_DELSETELEM,
        leases.NFNL_MSG_BATCH_END,
    ]


def test_acks_reads_errors_and_successes() -> None:
    def error(seq: int, err: int) -> bytes:
        return (
            struct.pack("=IHHII", 36, leases.NLMSG_ERROR, 0, seq, 0)
            + struct.pack("=i", err)
            + b"\0" * 16
        )

    assert leases.acks(error(5, 0) + error(6, -2)) == [(5, 0), (6, 2)]
    assert leases.acks(b"\x01\x02") == []  # truncated: nothing, no exception
