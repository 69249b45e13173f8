"""An attacker on the lab's networks, for the chaos faults and the hardening tests.

The attacker knows neither the farm key nor the API token. It is a namespace of its own
(`Lab.add_host(i, heartbeat=True)`: one leg on the LAN, one on heartbeat network 2), and what
it can do is what a host on those networks can:

* **sniff** heartbeats where they are delivered (`capture`, a packet socket in a node's
  namespace: a switch delivers unicast heartbeats only to their destination, so a real attacker
  would mirror a port or tap a cable);
* **send** UDP datagrams with any source address (`send_udp`: a raw socket with its own IP
  header), which is how a replay or a forgery looks like it comes from a peer and passes the
  pulse's source filter;
* **hold** connections to a node's API: idle, with half a request head, or announcing a body
  it never sends (`hold_api`).

Every function is bounded in count and time and sends only to addresses inside the lab.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import select
import socket
import struct
import time
from collections.abc import Iterable

from vipfarm.lab.netns import run_in_netns

ETH_P_IP = 0x0800


def capture(ns: str, src: str, port: int, seconds: float, limit: int = 200) -> list[bytes]:
    """UDP payloads from `src` to `port` that reach namespace `ns`, for `seconds` or until
    `limit` datagrams."""

    def sniff() -> list[bytes]:
        got: list[bytes] = []
        want = socket.inet_aton(src)
        with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP)) as s:
            s.settimeout(0.2)
            end = time.monotonic() + seconds
            while time.monotonic() < end and len(got) < limit:
                try:
                    pkt = s.recv(65535)
                except TimeoutError:
                    continue
                ihl = (pkt[0] & 0x0F) * 4
                if len(pkt) < ihl + 8 or pkt[9] != socket.IPPROTO_UDP or pkt[12:16] != want:
                    continue
                if int.from_bytes(pkt[ihl + 2 : ihl + 4], "big") == port:
                    got.append(bytes(pkt[ihl + 8 :]))
        return got

    return run_in_netns(ns, sniff, timeout=seconds + 10)


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    # The kernel fills in the IP checksum and id of a raw IP_HDRINCL packet; a UDP checksum
    # of 0 means "none" in IPv4.
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + udp


def send_udp(
    ns: str,
    datagrams: Iterable[tuple[str, str, bytes]],
    port: int,
    *,
    gap_s: float = 0.0,
    deadline_s: float = 30.0,
) -> int:
    """Send each (source, destination, payload) to UDP `port` from namespace `ns`, with any
    source address; stops at `deadline_s`. Returns how many were sent (large payloads leave as
    IP fragments; a full socket buffer skips one)."""
    items = list(datagrams)

    def send() -> int:
        sent = 0
        end = time.monotonic() + deadline_s
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            for src, dst, payload in items:
                if time.monotonic() > end:
                    break
                with contextlib.suppress(OSError):  # ENOBUFS, EMSGSIZE: one lost, go on
                    s.sendto(_ipv4_udp(src, dst, port, port, payload), (dst, 0))
                    sent += 1
                if gap_s:
                    time.sleep(gap_s)
        return sent

    return run_in_netns(ns, send, timeout=deadline_s + 10)


def random_datagrams(
    rng: random.Random,
    sources: list[str],
    targets: list[str],
    count: int,
    *,
    max_size: int = 60_000,
    prefix: bytes = b"",
) -> list[tuple[str, str, bytes]]:
    """`count` datagrams of random sizes and bytes, each from one of `sources` to one of
    `targets`; half start with `prefix` (e.g. a heartbeat's magic, version and farm id), so
    they reach the checks after the header's."""
    out = []
    for i in range(count):
        size = rng.randint(1, max_size)
        body = rng.randbytes(size)
        if i % 2 and prefix:
            body = prefix + body[len(prefix) :]
        out.append((rng.choice(sources), rng.choice(targets), body))
    return out


def hold_api(ns: str, host: str, port: int, count: int, hold_s: float) -> dict[str, int]:
    """Open `count` connections from `ns` to `host:port` and keep them for `hold_s`: a third
    idle, a third with half a request head, a third announcing a 128 MiB body without a token
    and sending a little of it. Returns how many were refused at once (`refused`), how many
    the server closed before the end (`closed_early`) and how many were still open (`open`)."""
    addr = ipaddress.ip_address(host)
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    heads = (
        b"",
        b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\n",
        b"PUT /api/v1/config HTTP/1.1\r\nHost: x\r\nContent-Length: 134217728\r\n\r\n"
        + b"x" * 4096,
    )

    def flood() -> dict[str, int]:
        socks: list[socket.socket] = []
        counts = {"refused": 0, "closed_early": 0, "open": 0}
        try:
            for i in range(count):
                s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(2.0)
                try:
                    s.connect((host, port))
                    if heads[i % 3]:
                        s.sendall(heads[i % 3])
                except OSError:
                    s.close()
                    counts["refused"] += 1
                    continue
                s.setblocking(False)
                socks.append(s)
            end = time.monotonic() + hold_s
            alive = set(socks)
            while alive and time.monotonic() < end:
                ready, _w, _x = select.select(list(alive), [], [], min(0.2, hold_s))
                for s in ready:
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # closed by the server (a 408, 503 or a plain close)
                        alive.discard(s)
                        counts["closed_early"] += 1
            counts["open"] = len(alive)
        finally:
            for s in socks:
                s.close()
        return counts

    return run_in_netns(ns, flood, timeout=hold_s + count * 2.0 + 10)
