"""HAProxy as the baseline load balancer: its own namespace on the lab's LAN, in front of the nodes.

`haproxy_in(lab)` adds a namespace `<lab>-haproxy` plugged into the lab's `br0` by a veth made
from inside the switch namespace (as the lab plugs every host), gives it 198.51.100.50/24 and runs
one `haproxy -db` there with two frontends over the same nodes, by their real addresses:

* port 80, `mode tcp`: a layer-4 proxy, the fair comparison for the farm, which balances flows;
* port 81, `mode http`: what most deployments run, parsing every request.

Both balance round robin without health checks, as the lab's static farm has none. HAProxy runs
with its default thread count (one per CPU).

The process is recorded in the lab's state directory and the namespace name is one the lab knows,
so `vipfarm lab down` removes both even after a crash of the bench; normally they go when the
context ends (deleting the namespace takes the veth with it).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vipfarm.lab.apps import bound, in_netns
from vipfarm.lab.procs import ProcRecord, alive, spawn, terminate
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import HTTP_PORT, LabError, node_lan4

HAPROXY = "/usr/sbin/haproxy"
ADDRESS = ipaddress.IPv4Address("198.51.100.50")
TCP_PORT = HTTP_PORT
HTTP_MODE_PORT = 81
SWITCH_PORT = "hap0"  # in the lab's own switch namespace: no clash with other labs


def haproxy_conf(backends: Sequence[ipaddress.IPv4Address], address: ipaddress.IPv4Address) -> str:
    """A configuration with a TCP frontend on port 80 and an HTTP one on 81, same backends."""
    servers = "\n".join(f"    server node{i} {b}:{HTTP_PORT}" for i, b in enumerate(backends, 1))
    sections = []
    for mode, port in (("tcp", TCP_PORT), ("http", HTTP_MODE_PORT)):
        sections.append(
            f"frontend fe_{mode}\n"
            f"    mode {mode}\n"
            f"    bind {address}:{port}\n"
            f"    default_backend be_{mode}\n\n"
            f"backend be_{mode}\n"
            f"    mode {mode}\n"
            f"    balance roundrobin\n"
            f"{servers}\n"
        )
    return (
        "global\n"
        "    maxconn 4096\n\n"
        "defaults\n"
        "    timeout connect 2s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n\n" + "\n".join(sections)
    )


@dataclass(frozen=True)
class Haproxy:
    ns: str
    record: ProcRecord

    def url(self, http_mode: bool = False) -> str:
        return f"http://{ADDRESS}:{HTTP_MODE_PORT if http_mode else TCP_PORT}/"


def _ip(lab: Lab, *args: str, input: str | None = None) -> None:
    proc = subprocess.run(
        [lab.ip, *args], input=input, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _wait_listening(rec: ProcRecord, timeout_s: float = 15.0) -> None:
    want = {(ADDRESS, TCP_PORT), (ADDRESS, HTTP_MODE_PORT)}
    deadline = time.monotonic() + timeout_s
    while not (in_netns(rec.pid, rec.ns) and want <= bound(rec.pid, "tcp")):
        if not alive(rec):
            tail = "\n".join(Path(rec.log).read_text(errors="replace").splitlines()[-10:])
            raise LabError(f"haproxy exited at start:\n{tail}")
        if time.monotonic() > deadline:
            raise LabError(f"haproxy did not listen on {ADDRESS} within {timeout_s:.0f} s")
        time.sleep(0.05)


@contextmanager
def haproxy_in(lab: Lab) -> Iterator[Haproxy]:
    """Run HAProxy in front of every node of `lab` for the duration of the block."""
    if not os.access(HAPROXY, os.X_OK):
        raise LabError(f"{HAPROXY} is not installed: run scripts/install (apt-get install haproxy)")
    ns = f"{lab.name}-haproxy"
    switch = lab.ns("switch")
    root = lab.dir / "haproxy"
    root.mkdir(exist_ok=True)
    conf = root / "haproxy.cfg"
    conf.write_text(haproxy_conf([node_lan4(i) for i in range(1, lab.config.nodes + 1)], ADDRESS))
    rec: ProcRecord | None = None
    _ip(lab, "netns", "add", ns)
    try:
        plug = f"link add {SWITCH_PORT} type veth peer name eth0 netns {ns}\n"
        plug += f"link set {SWITCH_PORT} master br0 up\n"
        plug += f"link set dev {SWITCH_PORT} type bridge_slave flood off\n"  # a bystander
        _ip(lab, "-n", switch, "-batch", "-", input=plug)
        batch = f"link set lo up\naddr add {ADDRESS}/24 dev eth0\nlink set eth0 up\n"
        _ip(lab, "-n", ns, "-batch", "-", input=batch)
        rec = spawn(
            lab.ip,
            "haproxy",
            ns,
            [HAPROXY, "-f", str(conf), "-db"],
            root / "haproxy.log",
            lab.dir / "procs" / "haproxy.json",
        )
        _wait_listening(rec)
        yield Haproxy(ns, rec)
    finally:
        if rec is not None:
            terminate([(rec.pid, rec.start)], grace_s=5.0)
        subprocess.run([lab.ip, "netns", "del", ns], capture_output=True, check=False)
