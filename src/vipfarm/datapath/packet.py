"""Raw-socket I/O shared by the ARP and NDP responders.

A `PacketService` owns one AF_PACKET socket on the LAN interface for one ethertype, optionally
with a classic BPF filter (so that an IPv6 socket wakes up for neighbour solicitations only, not
for every data packet) and link-layer multicast memberships (so that a real NIC accepts the
solicited-node multicast of a VIP that lives on `lo`). The filter is attached before the socket
is bound, so no unfiltered frame is ever queued. Frames are handed to a pure `Responder`, whose
answers are sent back; I/O errors are counted, never raised into the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
from collections import Counter
from typing import Protocol

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_MULTICAST = 0
SO_ATTACH_FILTER = 26

# Classic BPF opcodes, enough for "load a byte/half-word, compare, return".
BPF_LD_H_ABS = 0x28
BPF_LD_B_ABS = 0x30
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06

BpfInsn = tuple[int, int, int, int]  # code, jt, jf, k


class Responder(Protocol):
    counters: Counter[str]

    def handle(self, frame: bytes) -> bytes | None: ...
    def announcements(self) -> list[bytes]: ...


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, a pseudo-header included by the caller."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def bpf_match_all(checks: list[tuple[int, int, int]]) -> list[BpfInsn]:
    """A filter accepting frames where every (offset, size, value) check holds."""
    prog: list[BpfInsn] = []
    n = len(checks)
    for i, (offset, size, value) in enumerate(checks):
        prog.append((BPF_LD_H_ABS if size == 2 else BPF_LD_B_ABS, 0, 0, offset))
        remaining = n - i - 1  # jump over the remaining checks to "reject"
        prog.append((BPF_JEQ_K, 0, 2 * remaining + 1, value))
    prog.append((BPF_RET_K, 0, 0, 0x40000))
    prog.append((BPF_RET_K, 0, 0, 0))
    return prog


class PacketService:
    def __init__(
        self,
        interface: str,
        ethertype: int,
        responder: Responder,
        bpf: list[BpfInsn] | None = None,
        multicast: list[bytes] | None = None,
    ) -> None:
        self.interface = interface
        self.ethertype = ethertype
        self.responder = responder
        self.counters = responder.counters
        self.bpf = bpf
        self.multicast = multicast or []
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._filter_buf: ctypes.Array[ctypes.c_char] | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing until bound
        try:
            if self.bpf:
                self._attach(sock, self.bpf)
            sock.bind((self.interface, self.ethertype))
            ifindex = socket.if_nametoindex(self.interface)
            for mac in self.multicast:
                mreq = struct.pack("iHH8s", ifindex, PACKET_MR_MULTICAST, len(mac), mac)
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _attach(self, sock: socket.socket, prog: list[BpfInsn]) -> None:
        insns = b"".join(struct.pack("HBBI", *insn) for insn in prog)
        self._filter_buf = ctypes.create_string_buffer(insns)  # must outlive the setsockopt
        fprog = struct.pack("HL", len(prog), ctypes.addressof(self._filter_buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded, so a flood cannot starve the loop
            try:
                frame = self._sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:
                self.counters["recv_errors"] += 1
                return
            reply = self.responder.handle(frame)
            if reply is not None:
                self.send(reply)

    def send(self, frame: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(frame)
        except OSError:
            self.counters["send_errors"] += 1

    def announce(self) -> None:
        for frame in self.responder.announcements():
            self.send(frame)
        self.counters["announcements"] += 1
