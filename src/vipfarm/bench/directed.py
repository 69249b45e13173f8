"""Directed delivery (issue 15): failover of the entry node, and what forwarding costs it.

Both on a 3-node farm of daemons with `delivery = "directed"` on a lab whose switch floods no
unknown unicast to the nodes (`vipfarm lab up --no-flood`), the network directed delivery is
for.

* `directed_failover_ms`: `kill -9` of every process of the entry of the IPv4 VIP (its kernel
  stays, as for `failover_ms`); one client source port per bucket the entry owned plus 16
  buckets of each other node, each retried with new connections every 100 ms until a node
  other than the entry answers (`vipfarm.lab.probe`); the time until the last one did. This is
  the farm's failover plus the new entry's announcement.
* `directed_crash_failover_ms`: the same, but the entry's LAN link goes down with its
  processes, as when the machine dies: its kernel no longer forwards anything, so every bucket
  waits for the new entry's gratuitous ARP to move the client.
* `entry_cpu_ns_per_forwarded_frame`: UDP datagrams to the VIP's echo service from one client
  source port whose bucket another node owns (the entry forwards each: one map lookup, two MAC
  rewrites, one transmission, and the lab's switch carries the frame once more), against the
  same number from a port whose bucket the entry owns (no forwarding); the difference of the
  lab's CPU time (`vipfarm.bench.cpu`: softirq work included), divided by the datagrams. It
  includes the second pass through the lab's software switch, which a real switch does in
  hardware, so it is an upper bound of what the entry pays.

Each figure is the median of its trials; every trial is in the notes.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from vipfarm.bench import cpu
from vipfarm.bench.failover import Probe, ports_for_buckets
from vipfarm.bench.framework import Context, Scenario, ScenarioResult, Settings, register
from vipfarm.datapath.jhash import bucket_of
from vipfarm.datapath.spec import Proto
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind, resolve_app
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import ECHO_PORT, VIP4, LabError, client_lan4
from vipfarm.node.delivery import entry_for

DATAGRAMS = 100_000
SAMPLE = 16  # buckets of each surviving node probed too


def _trials(s: Settings) -> int:
    return 1 if s.quick else 3


@contextlib.contextmanager
def _farm(ctx: Context) -> Iterator[Lab]:
    name = testbed.unique_name("vb")
    ctx.status(f"building a 3-node directed farm on a switch that does not flood ({name})")
    lab = testbed.up(
        name,
        nodes=3,
        clients=1,
        app=resolve_app(AppKind.AUTO),
        daemon=True,
        no_flood=True,
        delivery="directed",
    )
    ctx.labs.add(name)
    try:
        _wait_macs(lab)
        yield lab
    finally:
        ctx.labs.discard(name)
        testbed.down(name)


def _wait_macs(lab: Lab, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    want = len(lab.node_names) - 1
    while True:
        views = [lab.daemon_state(n)["delivery"] for n in lab.node_names]
        if all(len(v["peer_macs"]) == want for v in views):
            return
        if time.monotonic() > deadline:
            raise LabError("the nodes did not learn each other's MACs")
        time.sleep(0.1)


def _trial(ctx: Context, lab: Lab, crash: bool) -> float | None:
    nodes = lab.node_names
    victim = str(entry_for(VIP4, nodes))
    owned = lab.kernel_owned()
    buckets = list(owned[victim] or [])
    for n in nodes:
        if n != victim:
            buckets += (owned[n] or [])[:SAMPLE]
    ports = ports_for_buckets(lab, buckets)
    probe = Probe(lab, "http://198.51.100.100/", ports, avoid=victim)
    try:
        probe.go()
        t_kill = time.monotonic()
        lab.kill(victim)
        if crash:
            lab.exec(victim, ["ip", "link", "set", "eth0", "down"], check=True)
        result = probe.result()
    finally:
        if probe.proc.poll() is None:
            probe.proc.kill()
    firsts = list(result["first_ok"].values())
    ms = (max(firsts) - t_kill) * 1000 if len(firsts) == len(ports) else None
    if ms is None:
        ctx.count("directed_failover_buckets_never_served", len(ports) - len(firsts))
    if crash:
        lab.exec(victim, ["ip", "link", "set", "eth0", "up"], check=True)
    lab.start_daemon(victim)
    lab.wait_farm_up(30)
    _wait_macs(lab)
    return ms


_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", int(sys.argv[2])))
payload = bytes(64)
for _ in range(int(sys.argv[3])):
    s.sendto(payload, (sys.argv[1], int(sys.argv[4])))
"""


def _port_owned_by(lab: Lab, node: str, owned: dict[str, list[int] | None]) -> int:
    rule = next(r for r in lab.spec.rules if r.vip == VIP4 and r.proto is Proto.UDP)
    mine = set(owned[node] or [])
    for port in range(20000, 60000):
        if bucket_of(rule, lab.spec.buckets, lab.spec.seed, client_lan4(1), port) in mine:
            return port
    raise LabError(f"no client port hashes into a bucket of {node}")


def _send_cpu_s(ctx: Context, lab: Lab, port: int) -> float:
    pids = cpu.lab_tasks(ctx.namespaces())
    before = cpu.snapshot(pids)
    lab.exec(
        "client1",
        [sys.executable, "-c", _SENDER, str(VIP4), str(port), str(DATAGRAMS), str(ECHO_PORT)],
        check=True,
        timeout=120,
    )
    return cpu.lab_cpu_s(before, cpu.snapshot(pids))


def _forward_cost(ctx: Context, lab: Lab) -> list[float]:
    entry = str(entry_for(VIP4, lab.node_names))
    other = next(n for n in lab.node_names if n != entry)
    owned = lab.kernel_owned()
    forwarded, local = _port_owned_by(lab, other, owned), _port_owned_by(lab, entry, owned)
    out = []
    for t in range(_trials(ctx.settings)):
        ctx.status(f"directed: CPU per forwarded datagram, round {t + 1}/{_trials(ctx.settings)}")
        via_entry = _send_cpu_s(ctx, lab, forwarded)
        direct = _send_cpu_s(ctx, lab, local)
        out.append((via_entry - direct) * 1e9 / DATAGRAMS)
        ctx.advance()
    return out


def _directed(ctx: Context) -> ScenarioResult:
    s = ctx.settings
    kills: list[float] = []
    crashes: list[float] = []
    with _farm(ctx) as lab:
        costs = _forward_cost(ctx, lab)
        for t in range(_trials(s)):
            for crash, into in ((False, kills), (True, crashes)):
                what = "crash (link down)" if crash else "kill -9"
                ctx.status(f"directed: {what} of the entry, trial {t + 1}/{_trials(s)}")
                ms = _trial(ctx, lab, crash)
                if ms is not None:
                    into.append(ms)
                ctx.advance()
    figures: dict[str, Any] = {}
    notes: dict[str, Any] = {
        "directed_failover_ms_all": [round(x, 1) for x in kills],
        "directed_crash_failover_ms_all": [round(x, 1) for x in crashes],
        "entry_cpu_ns_per_forwarded_frame_all": [round(x) for x in costs],
    }
    if kills:
        figures["directed_failover_ms"] = round(statistics.median(kills), 1)
    if crashes:
        figures["directed_crash_failover_ms"] = round(statistics.median(crashes), 1)
    if costs:
        figures["entry_cpu_ns_per_forwarded_frame"] = round(statistics.median(costs))
    return ScenarioResult(figures=figures, notes=notes)


DIRECTED = register(
    Scenario(
        name="directed",
        title="Directed delivery: entry failover and forwarding cost",
        produces={
            "directed_failover_ms": "kill -9 of the entry node to a new connection answered "
            "by another node in every probed bucket, seen by a client (ms, median)",
            "directed_crash_failover_ms": "the same with the entry's LAN link down too (a dead "
            "machine): every bucket waits for the new entry's announcement (ms, median)",
            "entry_cpu_ns_per_forwarded_frame": "CPU the entry (and the lab's switch, once "
            "more) spends per frame it forwards to another node (ns, median)",
        },
        method=__doc__ or "",
        steps=lambda s: 3 * _trials(s),
        run=_directed,
    )
)
