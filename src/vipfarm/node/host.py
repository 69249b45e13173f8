"""Every read of the host this node runs on: /proc, /sys and the files a node keeps.

The pulse and the manager ask the host the same few questions (is the LAN link up, which
connections to a VIP are still open, which incarnation comes next, which addresses are local);
answering them in one place keeps one definition of each.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from pathlib import Path

from vipfarm.datapath.spec import IPAddress
from vipfarm.files import write_atomic

# TCP states in /proc/net/tcp that still carry a client's data: ESTABLISHED, FIN_WAIT1/2,
# CLOSE_WAIT, CLOSING, LAST_ACK (not TIME_WAIT: nothing left to serve).
_BUSY_TCP_STATES = {"01", "04", "05", "08", "0B", "09"}


def _proc_addr(hexaddr: str) -> IPAddress:
    raw = bytes.fromhex(hexaddr)
    # /proc prints each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def busy_connections(vips: Iterable[IPAddress], proc_net: Path = Path("/proc/net")) -> int:
    """TCP connections of this network namespace whose local address is a VIP and that are
    still open (the drain waits for these)."""
    wanted = set(vips)
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] not in _BUSY_TCP_STATES:
                continue
            local = fields[1].split(":")[0]
            if _proc_addr(local) in wanted:
                count += 1
    return count


def link_up(ifname: str) -> bool:
    """Whether an interface can carry traffic, by its operational state ("unknown", which
    drivers without carrier reporting show, counts as up)."""
    try:
        state = Path(f"/sys/class/net/{ifname}/operstate").read_text().strip()
    except OSError:
        return False
    return state not in ("down", "lowerlayerdown", "notpresent", "dormant")


def next_incarnation(path: Path) -> int:
    """A number larger than any earlier start's: the wall clock in ms, but never below the last
    one + 1 (kept in `path`), so a clock stepped back across a restart cannot make peers take
    the new daemon for a replay of the old one."""
    try:
        last = int(path.read_text())
    except (OSError, ValueError):
        last = 0
    value = max(time.time_ns() // 1_000_000, last + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, str(value))
    return value


def local_addresses() -> set[IPAddress]:
    """Every address configured on this host's interfaces (read-only netlink dump).

    Raises OSError when netlink cannot be read."""
    from pyroute2 import IPRoute, NetlinkError

    out: set[IPAddress] = set()
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS")
                if addr:
                    out.add(ipaddress.ip_address(addr.split("%")[0]))
    except NetlinkError as exc:
        raise OSError(f"cannot list local addresses: {exc}") from None
    return out
