"""Every read of the host this node runs on: /proc, /sys and the files a node keeps.

The pulse and the manager ask the host the same few questions (is the LAN link up, which
connections to a VIP are still open, which incarnation comes next, which addresses are local);
answering them in one place keeps one definition of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import signal
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vipfarm.files import write_atomic

if TYPE_CHECKING:
    from vipfarm.datapath.spec import IPAddress

# psutil is imported by the functions that use it: `vipfarm state` imports this module (through
# the control socket) and must not pay for it.
# TCP states that still carry a client's data (not TIME_WAIT: nothing left to serve), as psutil
# names them (its CONN_* constants are these strings).
_BUSY_TCP_STATES = frozenset(
    {"ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING", "LAST_ACK"}
)

# The abstract Unix socket names of daemons' control sockets (see vipfarm.node.control).
CONTROL_PREFIX = "vipfarm/"


def busy_connections(vips: Iterable[IPAddress]) -> int:
    """TCP connections of this network namespace whose local address is a VIP and that are
    still open (the drain waits for these)."""
    import psutil

    wanted = set(vips)
    count = 0
    # psutil reads /proc/net/tcp and tcp6, which show the sockets of the reader's namespace.
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status not in _BUSY_TCP_STATES or not conn.laddr:
            continue
        local = ipaddress.ip_address(conn.laddr.ip)
        # An IPv4 client of a dual-stack (::) listener shows as ::ffff:a.b.c.d.
        if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
            local = local.ipv4_mapped
        if local in wanted:
            count += 1
    return count


def farms_here() -> list[str]:
    """Farms with a daemon in this network namespace (their abstract control sockets)."""
    import psutil

    names: set[str] = set()
    for conn in psutil.net_connections(kind="unix"):
        # /proc/net/unix, and so psutil, writes an abstract name with a leading "@".
        path = conn.laddr if isinstance(conn.laddr, str) else ""
        if path.startswith("@" + CONTROL_PREFIX):
            names.add(path.removeprefix("@" + CONTROL_PREFIX))
    return sorted(names)


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


def die_with_parent() -> None:
    """SIGKILL this process when the daemon that started it dies: a `kill -9` of the daemon
    must leave the leases to run out, not a pulse renewing them for nobody."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


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
