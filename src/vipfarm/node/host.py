"""Every read of the host this node runs on: /proc, /sys and the files a node keeps.

The pulse and the manager ask the host the same few questions (is the LAN link up, which
connections to a VIP are still open, which incarnation comes next, which addresses are local);
answering them in one place keeps one definition of each. So do the CLI's: where the control
sockets of this network namespace's daemons are (`farms_here`), and who serves one.

`vipfarm state` imports this module (through the control socket) and must start in a few tens of
ms, so only what its functions need is imported up front: psutil, pyroute2, ctypes, ipaddress,
pathlib and the spec types are imported by the functions that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from vipfarm.datapath.spec import IPAddress

# TCP states that still carry a client's data (not TIME_WAIT: nothing left to serve), as psutil
# names them (its CONN_* constants are these strings).
_BUSY_TCP_STATES = frozenset(
    {"ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING", "LAST_ACK"}
)

# Daemons' control sockets (see vipfarm.node.control): CONTROL_DIR/<netns inode>/<farm>.sock.
CONTROL_DIR = "/run/vipfarm/control"
CONTROL_SUFFIX = ".sock"
# A live daemon accepts at once; a connect that waits this long is a live but stuck one.
_PROBE_TIMEOUT_S = 1.0


def busy_connections(vips: Iterable[IPAddress]) -> int:
    """TCP connections of this network namespace whose local address is a VIP and that are
    still open (the drain waits for these)."""
    import ipaddress

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


def netns_inode() -> int:
    """The network namespace of the calling thread, as the inode of its nsfs file (what `lsns`
    and `ip netns identify` compare). Of the thread, not the process: the lab enters a node's
    namespace from a short-lived thread (`vipfarm.lab.netns`)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def control_dir(netns: int | None = None) -> str:
    """The directory of the control sockets of daemons in network namespace `netns` (default:
    the caller's)."""
    return f"{CONTROL_DIR}/{netns_inode() if netns is None else netns}"


def farms_here() -> list[str]:
    """Farms with a live daemon in this network namespace: the sockets of its control directory
    that a server listens on (a crashed daemon leaves its file behind, and it refuses a
    connection)."""
    here = control_dir()
    try:
        names = os.listdir(here)
    except OSError:  # none yet, or a directory this user may not read: no daemon we can reach
        return []
    farms = []
    for name in names:
        if name.endswith(CONTROL_SUFFIX) and listening(f"{here}/{name}"):
            farms.append(name.removesuffix(CONTROL_SUFFIX))
    return sorted(farms)


def listening(path: str) -> bool:
    """Whether a server listens on the Unix socket file `path` (a connection, closed at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_PROBE_TIMEOUT_S)
        try:
            sock.connect(path)
        except TimeoutError:
            return True  # its backlog is full: alive, and busy
        except PermissionError:
            return True  # there, but not for this user: the request will say so precisely
        except OSError:
            return False
    return True


_DOWN_STATES = (b"down", b"lowerlayerdown", b"notpresent", b"dormant")


class LinkState:
    """Whether one interface can carry traffic, by its operational state ("unknown", which
    drivers without carrier reporting show, counts as up). Read with one `pread` of a file
    kept open (sysfs builds the text afresh for every read at offset 0): the pulse asks many
    times a second. Reopened when the read fails (the interface was removed, or renamed and
    back)."""

    def __init__(self, ifname: str) -> None:
        self.path = f"/sys/class/net/{ifname}/operstate"
        self._fd: int | None = None

    def up(self) -> bool:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._fd, 32, 0).strip() not in _DOWN_STATES
        except OSError:
            self.close()
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def next_incarnation(path: Path) -> int:
    """A number larger than any earlier start's: the wall clock in ms, but never below the last
    one + 1 (kept in `path`), so a clock stepped back across a restart cannot make peers take
    the new daemon for a replay of the old one."""
    from vipfarm.files import write_atomic

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
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket
    (SO_PEERCRED): for a client, as it connected; for a server, as it called listen()."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED)."""
    return peer_credentials(sock)[1]


def local_addresses() -> set[IPAddress]:
    """Every address configured on this host's interfaces (read-only netlink dump).

    Raises OSError when netlink cannot be read."""
    import ipaddress

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
