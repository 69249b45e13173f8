"""Failover and planned rebalance, against keepalived's VRRP: the figures the farm's safety and
availability claims rest on.

* `failover_ms`: a 3-node farm of daemons; `kill -9` of every process of node2 (its kernel
  stays, as after a crash of the daemon and the application); the time until every bucket is
  held by node1 or node3 (read from their kernels, polled every ~10 ms).
* `client_failover_ms`: the same kill, seen by a client: one source port chosen per bucket node2
  owned (`vipfarm.datapath.jhash` computes the kernel's hash), each retried with new connections
  every 100 ms until one is answered by another node; the time until the last bucket answered.
* `vrrp_failover_ms`: keepalived moving a VIP between two hosts of the same LAN, each running the
  same small web server: `kill -9` of every process of the master, then the time until a new
  client connection to the VIP is answered by the backup. `default` uses keepalived's default
  advertisement interval (1 s), `fast` the fastest sane one (VRRPv3, 100 ms).
* `broken_connections_drain` / `broken_connections_join`: 1000 long-lived keep-alive connections
  spread over the farm; `vipfarm stop` drains node3 (then it is started again and rejoins); after
  each, every connection sends one more request, and those that fail or are answered by another
  node than before are broken.

Each failover figure is the median of its trials; the maximum goes into the notes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from vipfarm.bench.framework import Context, Goal, Scenario, ScenarioResult, Settings, register
from vipfarm.datapath.jhash import bucket_of
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind, builtin_argv, resolve_app
from vipfarm.lab.procs import ProcRecord, spawn, terminate
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import LabError, client_lan4

KEEPALIVED = "/usr/sbin/keepalived"
VRRP_VIP = ipaddress.IPv4Address("198.51.100.150")
HOLD = 1000


def _trials(s: Settings) -> int:
    return 1 if s.quick else 3


@contextlib.contextmanager
def _farm(ctx: Context, nodes: int = 3) -> Iterator[Lab]:
    name = testbed.unique_name("vb")
    ctx.status(f"building a {nodes}-node farm of daemons ({name})")
    lab = testbed.up(name, nodes=nodes, clients=1, app=resolve_app(AppKind.AUTO), daemon=True)
    ctx.labs.add(name)
    try:
        yield lab
    finally:
        ctx.labs.discard(name)
        testbed.down(name)


def ports_for_buckets(
    lab: Lab, buckets: list[int], client: int = 1, per_bucket: int = 4
) -> list[list[int]]:
    """For every bucket, `per_bucket` client source ports that hash into it (from 30000 up)."""
    rule = lab.spec.rules[0]
    address = client_lan4(client)
    found: dict[int, list[int]] = {b: [] for b in buckets}
    missing = len(buckets) * per_bucket
    for port in range(30000, 65000):
        group = found.get(bucket_of(rule, lab.spec.buckets, lab.spec.seed, address, port))
        if group is not None and len(group) < per_bucket:
            group.append(port)
            missing -= 1
            if not missing:
                break
    return [g for g in found.values() if g]


class Probe:
    """`vipfarm.lab.probe` in a client namespace: started, then released with `go()`."""

    def __init__(self, lab: Lab, url: str, groups: list[list[int]], avoid: str) -> None:
        spec = ";".join(",".join(map(str, g)) for g in groups)
        argv = [sys.executable, "-m", "vipfarm.lab.probe", url, "--avoid", avoid, "--ports", spec]
        self.proc = subprocess.Popen(
            [lab.ip, "netns", "exec", lab.ns("client1"), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise LabError("the failover probe did not start")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=60)
        data: dict[str, Any] = json.loads(out)
        return data


def acquired_times(lab: Lab, nodes: Iterable[str], since: float) -> list[float]:
    """Wall-clock times at which the kernels of `nodes` took buckets, after `since`: from the
    `buckets_changed` events of their module logs, which carry the time the pulse read its
    kernel back (`at`), so a measurement costs no polling of the kernels at all."""
    out: list[float] = []
    for node in nodes:
        path = lab.dir / "nodelogs" / node / "module.log"
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if "buckets_changed" not in line:
                    continue
                m = _ACQUIRED.search(line)
                if m and int(m["n"]) > 0 and float(m["at"]) >= since:
                    out.append(float(m["at"]))
    return out


_ACQUIRED = re.compile(r"acquired=(?P<n>\d+).* at=(?P<at>[0-9.]+)")


def _farm_trial(
    ctx: Context, lab: Lab, victim: str = "node2"
) -> tuple[float | None, float | None, int]:
    survivors = [n for n in lab.node_names if n != victim]
    owned = lab.kernel_owned([victim])[victim] or []
    ports = ports_for_buckets(lab, owned)
    probe = Probe(lab, "http://198.51.100.100/", ports, avoid=victim)
    try:
        probe.go()
        t_kill, wall_kill = time.monotonic(), time.time()
        lab.kill(victim)
        server = None
        while time.monotonic() - t_kill < 20:
            if lab.holds_every_bucket_once(survivors):
                # The kernels' own times: polling a dozen kernels takes longer than failover.
                times = acquired_times(lab, survivors, wall_kill)
                server = (max(times) - wall_kill) * 1000 if times else None
                break
            time.sleep(0.05)
        result = probe.result()
    finally:
        if probe.proc.poll() is None:
            probe.proc.kill()
    firsts = list(result["first_ok"].values())
    client = None
    if len(firsts) == len(ports):
        client = (max(firsts) - t_kill) * 1000
    else:
        ctx.count("client_failover_buckets_never_served", len(ports) - len(firsts))
    lab.start_daemon(victim)
    lab.wait_farm_up(60)
    return server, client, len(ports)


def _keepalived_conf(name: str, priority: int, fast: bool) -> str:
    advert = "0.1" if fast else "1"
    return f"""
global_defs {{
    router_id {name}
    vrrp_version 3
}}
vrrp_instance vf {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int {advert}
    virtual_ipaddress {{
        {VRRP_VIP}/24
    }}
}}
"""


def _vrrp_trial(ctx: Context, lab: Lab, fast: bool) -> float | None:
    """One VRRP pair (extra hosts 1 and 2), its master killed; ms until the backup answers."""
    hosts: dict[int, list[ProcRecord]] = {}
    for i, prio in ((1, 150), (2, 100)):
        ns = lab.add_host(i)
        root = lab.dir / f"vrrp{i}"
        root.mkdir(exist_ok=True)
        for stale in ("k.pid", "vrrp.pid"):  # a killed keepalived leaves them: it would refuse
            (root / stale).unlink(missing_ok=True)
        conf = root / "keepalived.conf"
        conf.write_text(_keepalived_conf(f"extra{i}", prio, fast))
        argv = [KEEPALIVED, "-n", "-l", "-P", "-f", str(conf), "-p", str(root / "k.pid"),
                "-r", str(root / "vrrp.pid")]  # fmt: skip
        procs = lab.dir / "procs"
        app = builtin_argv(f"extra{i}", True, [])
        hosts[i] = [
            spawn(lab.ip, f"extra{i}-keepalived", ns, argv, root / "k.log", procs / f"k{i}.json"),
            spawn(lab.ip, f"extra{i}-app", ns, app, root / "app.log", procs / f"a{i}.json"),
        ]
    try:
        url = f"http://{VRRP_VIP}/"
        deadline = time.monotonic() + 30
        while lab.http_get("client1", url, timeout=1).node != "extra1":
            if time.monotonic() > deadline:
                raise LabError("keepalived never made extra1 the master of the VIP")
            time.sleep(0.1)
        probe = Probe(lab, url, [[40000, 40001, 40002, 40003]], avoid="extra1")
        probe.go()
        # Every process of the master at once, as a crash: keepalived's VRRP child must not
        # outlive its parent long enough to resign gracefully (a priority-0 advertisement).
        pids = subprocess.run(
            [lab.ip, "netns", "pids", f"{lab.name}-extra1"], capture_output=True, text=True
        ).stdout.split()
        t_kill = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        result = probe.result()
        firsts = list(result["first_ok"].values())
        return (firsts[0] - t_kill) * 1000 if firsts else None
    finally:
        terminate([(r.pid, r.start) for recs in hosts.values() for r in recs], 5.0)
        for i in hosts:
            lab.remove_host(i)


def _failover(ctx: Context) -> ScenarioResult:
    s = ctx.settings
    servers: list[float] = []
    clients: list[float] = []
    with _farm(ctx) as lab:
        for t in range(_trials(s)):
            ctx.status(f"failover: kill -9 of node2, trial {t + 1}/{_trials(s)}")
            server, client, _ = _farm_trial(ctx, lab)
            if server is None:
                ctx.count("failover_never_converged")
            else:
                servers.append(server)
            if client is not None:
                clients.append(client)
            ctx.advance()
    if not os.access(KEEPALIVED, os.X_OK):
        raise LabError(f"{KEEPALIVED} is missing: run scripts/install (apt-get install keepalived)")
    vrrp: dict[str, list[float]] = {"default": [], "fast": []}
    name = testbed.unique_name("vb")
    lab = testbed.up(name, nodes=1, clients=1, app="builtin", datapath=False)
    try:
        for mode in ("fast", "default"):
            for t in range(_trials(s)):
                ctx.status(f"failover: keepalived ({mode} timers), trial {t + 1}/{_trials(s)}")
                ms = _vrrp_trial(ctx, lab, fast=mode == "fast")
                if ms is None:
                    ctx.count("vrrp_failover_never_converged")
                else:
                    vrrp[mode].append(ms)
                ctx.advance()
    finally:
        testbed.down(name)
    figures: dict[str, Any] = {}
    notes: dict[str, Any] = {
        "failover_ms_all": [round(x, 1) for x in servers],
        "client_failover_ms_all": [round(x, 1) for x in clients],
        "vrrp_failover_ms_all": {k: [round(x, 1) for x in v] for k, v in vrrp.items()},
    }
    if servers:
        figures["failover_ms"] = round(statistics.median(servers), 1)
    if clients:
        figures["client_failover_ms"] = round(statistics.median(clients), 1)
    if all(vrrp.values()):
        figures["vrrp_failover_ms"] = {k: round(statistics.median(v), 1) for k, v in vrrp.items()}
        figures["vrrp_fast_vs_farm_client_failover"] = (
            round(figures["vrrp_failover_ms"]["fast"] / figures["client_failover_ms"], 2)
            if clients
            else 0.0
        )
    return ScenarioResult(figures=figures, notes=notes)


def _rebalance(ctx: Context) -> ScenarioResult:
    figures: dict[str, Any] = {}
    with _farm(ctx) as lab, lab.hold("client1", HOLD) as held:
        if held.initial["ok"] != HOLD:
            ctx.count("hold_connections_failed", HOLD - held.initial["ok"])
        ctx.status(f"rebalance: vipfarm stop (drain) node3 with {HOLD} connections open")
        lab.daemon_call("node3", "stop")
        t0 = time.monotonic()
        while lab.kernel_owned(["node3"])["node3"] and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        after = held.probe()
        figures["broken_connections_drain"] = HOLD - after["ok"] + after["moved"]
        ctx.advance()
        ctx.status("rebalance: node3 starts again and rejoins")
        lab.daemon_call("node3", "start")
        lab.wait_farm_up(30)
        after = held.probe()
        figures["broken_connections_join"] = HOLD - after["ok"] + after["moved"]
        ctx.advance()
    return ScenarioResult(figures=figures)


FAILOVER = register(
    Scenario(
        name="failover",
        title="Failover: vipfarm vs keepalived (VRRP)",
        produces={
            "failover_ms": "kill -9 of a node to every bucket held by a live node (ms, median)",
            "client_failover_ms": "kill -9 of a node to a successful new connection in every "
            "bucket it owned, seen by a client (ms, median)",
            "vrrp_failover_ms": "kill -9 of keepalived's master to a new connection answered "
            "by the backup (ms, median), per timer setting",
            "vrrp_fast_vs_farm_client_failover": "keepalived with its fastest timers, divided "
            "by the farm's client failover (>1: the farm is faster)",
        },
        method=__doc__ or "",
        steps=lambda s: 3 * _trials(s),
        run=_failover,
        goals=(Goal("failover_ms", "<=", 500, "failover within 500 ms"),),
    )
)

REBALANCE = register(
    Scenario(
        name="rebalance",
        title=f"Planned rebalance under {HOLD} long-lived connections",
        produces={
            "broken_connections_drain": f"connections of {HOLD} broken by draining a node",
            "broken_connections_join": f"connections of {HOLD} broken by a node rejoining",
        },
        method=(
            f"{HOLD} keep-alive connections are opened from one client and spread over a "
            "3-node farm. `vipfarm stop` drains node3; once its kernel holds no bucket, every "
            "connection sends one more request: one that fails or is answered by another node "
            "than the first time is broken. node3 then starts again; once the farm is balanced, "
            "the same check."
        ),
        steps=lambda s: 2,
        run=_rebalance,
        goals=(
            Goal("broken_connections_drain", "<=", 0, "no connection broken by a drain"),
            Goal("broken_connections_join", "<=", 0, "no connection broken by a join"),
        ),
    )
)
