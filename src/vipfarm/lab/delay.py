"""A delaying forwarder between two interfaces: the chaos fault `heartbeat_delay`.

    python -m vipfarm.lab.delay PORT_A PORT_B --delay-ms 40 --jitter-ms 80 --seconds 5

Delay and jitter on a link are `tc qdisc ... netem`'s job, and nftables cannot hold a packet. The
lab's kernel has no sch_netem (`CONFIG_NET_SCH_NETEM` is not set, and the kernel loads no
modules), so the fault uses this forwarder instead: `Chaos` takes the node's port on heartbeat
network 2 (`n<i>h` in the switch namespace) off its bridge, plugs a fresh veth into the bridge
in its place, and runs this process in the switch namespace between the two. Every frame that
arrives on one interface is sent out of the other after `delay + uniform(0, jitter)`, both
ways, so heartbeats to and from the node are late and, with jitter, reordered; ARP goes the
same way. Nothing else on the network changes.

Theory of operation: one packet socket per interface (`AF_PACKET`, every protocol), a heap of
(due time, sequence, socket, frame), and `select` until the next frame arrives or the next one
is due. Frames this process sent itself come back as `PACKET_OUTGOING` and are skipped. The
veths hand over UDP with a checksum left for the hardware to fill in (checksum offload), which a
frame re-sent from a packet socket would carry unfilled: the forwarder clears the UDP checksum
of IPv4 frames (0 means "no checksum" in IPv4), which the receiver accepts. The process is
bounded: it exits after `--seconds` (the fault ends it earlier by PID, with SIGTERM) and holds at
most `MAX_HELD` frames (more are dropped and counted). It prints one line of counts at the end.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import select
import signal
import socket
import sys
import time
from types import FrameType

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
MAX_HELD = 10_000


class _Stopped(Exception):
    """SIGTERM or SIGINT: the fault is over (raised from the handler, so select returns)."""


def _on_term(_sig: int, _frame: FrameType | None) -> None:
    raise _Stopped


def clear_udp_checksum(frame: bytes) -> bytes:
    """The frame with the UDP checksum of an IPv4/UDP packet set to 0 (no checksum)."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != ETH_P_IP.to_bytes(2, "big"):
        return frame
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != socket.IPPROTO_UDP or len(frame) < 14 + ihl + 8:
        return frame
    at = 14 + ihl + 6
    return frame[:at] + b"\0\0" + frame[at + 2 :]


def relay(
    a: str, b: str, delay_s: float, jitter_s: float, seconds: float, seed: int
) -> dict[str, int]:
    """Forward frames between interfaces `a` and `b`, each held for delay + U(0, jitter)."""
    rnd = random.Random(seed)
    socks = {}
    for name in (a, b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((name, 0))
        s.setblocking(False)
        socks[name] = s
    other = {socks[a]: socks[b], socks[b]: socks[a]}
    held: list[tuple[float, int, socket.socket, bytes]] = []
    counts = {"forwarded": 0, "dropped_full": 0, "send_errors": 0, "left_held": 0}
    seq = 0
    end = time.monotonic() + seconds
    print(json.dumps({"event": "delay_ready", "a": a, "b": b}), flush=True)
    try:
        while (now := time.monotonic()) < end:
            wait = end - now
            if held:
                wait = min(wait, max(0.0, held[0][0] - now))
            ready, _, _ = select.select(list(other), [], [], wait)
            now = time.monotonic()
            for s in ready:
                while True:
                    try:
                        frame, addr = s.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr[2] == socket.PACKET_OUTGOING:
                        continue  # a frame this process sent
                    if len(held) >= MAX_HELD:
                        counts["dropped_full"] += 1
                        continue
                    seq += 1
                    due = now + delay_s + rnd.uniform(0.0, jitter_s)
                    heapq.heappush(held, (due, seq, other[s], clear_udp_checksum(frame)))
            while held and held[0][0] <= now:
                _, _, out, frame = heapq.heappop(held)
                try:
                    out.send(frame)
                    counts["forwarded"] += 1
                except OSError:
                    counts["send_errors"] += 1
    except _Stopped:
        counts["left_held"] = len(held)
    finally:
        for s in socks.values():
            s.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="one interface (e.g. the node's port)")
    ap.add_argument("b", help="the other one (e.g. the veth plugged into the bridge)")
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--jitter-ms", type=float, default=80.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="exit after this long")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if not (0 <= args.delay_ms <= 10_000 and 0 <= args.jitter_ms <= 10_000 and args.seconds > 0):
        ap.error("--delay-ms and --jitter-ms must be 0..10000, --seconds positive")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    counts = relay(
        args.a, args.b, args.delay_ms / 1e3, args.jitter_ms / 1e3, args.seconds, args.seed
    )
    print(json.dumps({"event": "delay_done", **counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
