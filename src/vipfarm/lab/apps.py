"""What runs on a lab node besides the data path: the web application and the UDP echo.

HTTP on port 80 is nginx when it is installed (the Debian binary, run with a configuration, pid
file, temp paths and logs of its own under the lab's state dir, in the foreground), else the
built-in server of `vipfarm.lab.app`. The UDP echo on port 7 is always the built-in one, bound to
the VIPs. Both answer with the node's name first, so a client knows who served it.

Readiness is read from `/proc/<pid>/net/{tcp,tcp6,udp,udp6}`, which list the sockets of the
network namespace that process lives in: no command has to run inside the namespace to learn that
a node listens.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from enum import StrEnum
from pathlib import Path

from vipfarm.datapath.spec import IPAddress
from vipfarm.lab.topology import ECHO_PORT, HTTP_PORT, LabError

NGINX = Path("/usr/sbin/nginx")

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class AppKind(StrEnum):
    AUTO = "auto"
    NGINX = "nginx"
    BUILTIN = "builtin"


def resolve_app(kind: AppKind | str) -> AppKind:
    """auto -> nginx when installed, else builtin; nginx when missing is an error."""
    try:
        kind = AppKind(kind)
    except ValueError:
        raise LabError(f"app {kind!r} is unknown: use nginx, builtin or auto") from None
    has_nginx = os.access(NGINX, os.X_OK)
    if kind is AppKind.AUTO:
        return AppKind.NGINX if has_nginx else AppKind.BUILTIN
    if kind is AppKind.NGINX and not has_nginx:
        raise LabError(
            f"{NGINX} is not installed: apt-get install nginx-light, or use --app builtin"
        )
    return kind


def nginx_conf(node: str, root: Path) -> str:
    """A self-contained nginx configuration answering `<node>\\n` on port 80, v4 and v6."""
    tmp = root / "tmp"
    temps = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temps}
    server {{
        listen 0.0.0.0:{HTTP_PORT} default_server;
        listen [::]:{HTTP_PORT} ipv6only=on default_server;
        location / {{
            default_type text/plain;
            return 200 "{node}\\n";
        }}
    }}
}}
"""


def nginx_argv(root: Path) -> list[str]:
    """nginx in the foreground, every path (even the early error log) under `root`."""
    conf = root / "nginx.conf"
    return [
        str(NGINX),
        "-p",
        str(root),
        "-e",
        str(root / "error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


def write_nginx(node: str, root: Path) -> None:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(nginx_conf(node, root))


def builtin_argv(node: str, http: bool, vips: list[IPAddress]) -> list[str]:
    argv = [sys.executable, "-m", "vipfarm.lab.app", "--node", node]
    if http:
        argv.append("--http")
    for vip in vips:
        argv += ["--echo-vip", str(vip)]
    return argv


def _address(hexaddr: str) -> IPAddress:
    # /proc prints each 32-bit word of the address as a native-endian integer.
    raw = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexaddr), 8)
    )
    return ipaddress.ip_address(raw)


def parse_proc_net(text: str) -> list[tuple[IPAddress, int, str]]:
    """(local address, local port, state) of every socket in a /proc/net/{tcp,udp}[6] table."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        addr, port = fields[1].split(":")
        out.append((_address(addr), int(port, 16), fields[3]))
    return out


def bound(pid: int, proto: str) -> set[tuple[IPAddress, int]]:
    """Local (address, port) of the listening TCP or bound UDP sockets in `pid`'s namespace."""
    found = set()
    for table in (proto, proto + "6"):
        try:
            text = Path(f"/proc/{pid}/net/{table}").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for addr, port, state in parse_proc_net(text):
            if proto == "udp" or state == _LISTEN:
                found.add((addr, port))
    return found


def in_netns(pid: int, ns: str) -> bool:
    """True when `pid` lives in network namespace `ns` (it may still be `ip netns exec`)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


def node_ready(pid: int, ns: str, vips: list[IPAddress], http: bool = True) -> bool:
    """True once `pid` is in `ns` and that namespace listens on HTTP v4 and v6 (unless `http` is
    false: a node daemon's module starts the web server later) and echoes on every VIP."""
    if not in_netns(pid, ns):
        return False  # before setns, /proc/<pid>/net shows the root namespace's sockets
    tcp = bound(pid, "tcp")
    udp = bound(pid, "udp")
    wild = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
    return (not http or wild <= {a for a, p in tcp if p == HTTP_PORT}) and set(vips) <= {
        a for a, p in udp if p == ECHO_PORT
    }
