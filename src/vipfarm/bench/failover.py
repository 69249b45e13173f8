"""Failover and planned rebalance, against keepalived's VRRP: the figures the farm's safety and
availability claims rest on.

* `failover_ms` (and `failover_ms_12`): a 3-node (12-node) farm of daemons with the default
  timers; `kill -9` of every process of node2 (its kernel stays, as after a crash of the daemon
  and the application); the time until every bucket is held by a survivor. The end is taken from
  the survivors' own `buckets_changed` events, which carry the moment each pulse read its kernel
  back: polling a dozen kernels through `nft` takes longer than the failover itself.
* `client_failover_ms`: the same kill, seen by a client: one source port chosen per bucket node2
  owned (`vipfarm.datapath.jhash` computes the kernel's hash), each retried with new connections
  every 100 ms until one is answered by another node; the time until the last bucket answered.
* `vrrp_failover_ms`: keepalived moving a VIP between two hosts of the same LAN, each running the
  same small web server: `kill -9` of every process of the master, then the time until a new
  client connection to the VIP is answered by the backup. `default` uses keepalived's default
  advertisement interval (1 s), `fast` the fastest sane one (VRRPv3, 100 ms).
* `client_stall_ms`: during each kill, one client opens a new connection every 10 ms and
  records how long each waited for its answer; the figure is the longest wait. A SYN that meets
  the dead node's buckets before they move is lost, and the client's kernel sends it again only
  after 1 s, so this shows what a user feels; the same stream runs across keepalived's failover.
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
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from vipfarm.bench.framework import Context, Goal, Scenario, ScenarioResult, Settings, register
from vipfarm.datapath.jhash import bucket_of
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind, builtin_argv, resolve_app
from vipfarm.lab.load import Reply
from vipfarm.lab.procs import ProcRecord, spawn, terminate
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import LabError, client_lan4

KEEPALIVED = "/usr/sbin/keepalived"
VRRP_VIP = ipaddress.IPv4Address("198.51.100.150")
HOLD = 1000
FAILOVER_NODES = (3, 12)
STALL_RATE = 100.0  # new connections a second during a failover
STALL_S = 4.0  # how long the stream runs; the fault comes STALL_LEAD_S after its start
STALL_LEAD_S = 1.0
PLANNED_RATE = 500.0  # new connections a second during a planned drain and rejoin
PLANNED_S = 3.0


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


def change_times(
    lab: Lab, nodes: Iterable[str], since: float, kind: str = "acquired"
) -> list[float]:
    """Wall-clock times at which the kernels of `nodes` took (`kind` "acquired") or gave up
    ("released") buckets, after `since`: from the `buckets_changed` events of their module logs,
    which carry the time the pulse read its kernel back (`at`), so a measurement costs no
    polling of the kernels at all."""
    pattern = _CHANGED[kind]
    out: list[float] = []
    for node in nodes:
        path = lab.dir / "nodelogs" / node / "module.log"
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if "buckets_changed" not in line:
                    continue
                m = pattern.search(line)
                if m and int(m["n"]) > 0 and float(m["at"]) >= since:
                    out.append(float(m["at"]))
    return out


_CHANGED = {
    kind: re.compile(rf"\b{kind}=(?P<n>\d+).* at=(?P<at>[0-9.]+)")
    for kind in ("acquired", "released")
}


def unowned_gap_ms(lab: Lab, since: float) -> float | None:
    """An upper bound of the time any moved bucket went unowned after `since`: from the first
    release to the last acquisition (each bucket's own gap lies within it)."""
    released = change_times(lab, lab.node_names, since, "released")
    acquired = change_times(lab, lab.node_names, since, "acquired")
    if not released or not acquired:
        return None
    return max(0.0, (max(acquired) - min(released)) * 1000)


def syn_retransmissions(lab: Lab, client: str = "client1") -> int:
    """The client namespace's count of retransmitted SYNs (TcpExt TCPSynRetrans)."""
    text = lab.exec(client, ["cat", "/proc/net/netstat"], check=True).stdout
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(lines) >= 2:
        values = dict(zip(lines[0][1:], lines[1][1:], strict=False))
        return int(values.get("TCPSynRetrans", 0))
    return 0


class Stall:
    """A steady stream of new connections (`STALL_RATE` a second, each its own socket) from
    client1 around a fault: `client_stall_ms` is the longest any of them waited for its answer.
    A SYN that meets a dead owner is answered only after the client's own retransmission (1 s
    on Linux, then 3 s), whatever the failover time, which is what this shows."""

    def __init__(
        self, lab: Lab, url: str, seconds: float = STALL_S, rate: float = STALL_RATE
    ) -> None:
        self.replies: list[Reply] = []
        count = int(rate * seconds)

        def run() -> None:
            self.replies = lab.load(
                "client1",
                url,
                count=count,
                concurrency=count,
                timeout=10.0,
                total_timeout=seconds + 15,
                rate=rate,
            )

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        # Wait until the stream flows (the client process starts in ~0.3 s) before the fault.
        time.sleep(STALL_LEAD_S)

    def result(self) -> tuple[float | None, Counter[str]]:
        """(the longest wait of any request in ms, a failed one counting until it failed; the
        failed requests by error)."""
        self.thread.join(60)
        waits = [r.ms for r in self.replies]
        return (max(waits) if waits else None), Counter(r.error for r in self.replies if r.error)


def _farm_trial(
    ctx: Context, lab: Lab, victim: str = "node2"
) -> tuple[float | None, float | None, float | None, Counter[str]]:
    """One `kill -9` of `victim`: (failover_ms, client_failover_ms, client_stall_ms, the
    stall stream's failed requests by error)."""
    survivors = [n for n in lab.node_names if n != victim]
    owned = lab.kernel_owned([victim])[victim] or []
    ports = ports_for_buckets(lab, owned)
    probe = Probe(lab, "http://198.51.100.100/", ports, avoid=victim)
    stall = Stall(lab, "http://198.51.100.100/")
    try:
        probe.go()
        t_kill, wall_kill = time.monotonic(), time.time()
        lab.kill(victim)
        server = None
        while time.monotonic() - t_kill < 20:
            if lab.holds_every_bucket_once(survivors):
                # The kernels' own times: polling a dozen kernels takes longer than failover.
                times = change_times(lab, survivors, wall_kill)
                server = (max(times) - wall_kill) * 1000 if times else None
                break
            time.sleep(0.05)
        result = probe.result()
    finally:
        if probe.proc.poll() is None:
            probe.proc.kill()
    # Requests in flight to the node killed fail (its kernel resets them when its processes
    # die): what a crash costs, not a fault of the farm, so they go to the notes.
    stalled, failed = stall.result()
    firsts = list(result["first_ok"].values())
    client = None
    if len(firsts) == len(ports):
        client = (max(firsts) - t_kill) * 1000
    else:
        ctx.count("client_failover_buckets_never_served", len(ports) - len(firsts))
    lab.start_daemon(victim)
    lab.wait_farm_up(60)
    return server, client, stalled, failed


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


def _vrrp_trial(
    ctx: Context, lab: Lab, fast: bool
) -> tuple[float | None, float | None, Counter[str]]:
    """One VRRP pair (extra hosts 1 and 2), its master killed: (ms until the backup answers,
    client_stall_ms, the stream's failed requests by error)."""
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
        stall = Stall(lab, url)
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
        stalled, failed = stall.result()
        firsts = list(result["first_ok"].values())
        return ((firsts[0] - t_kill) * 1000 if firsts else None), stalled, failed
    finally:
        terminate([(r.pid, r.start) for recs in hosts.values() for r in recs], 5.0)
        for i in hosts:
            lab.remove_host(i)


def _farm_trials(ctx: Context, nodes: int) -> tuple[dict[str, list[float]], Counter[str]]:
    s = ctx.settings
    out: dict[str, list[float]] = {"server": [], "client": [], "stall": []}
    failed: Counter[str] = Counter()
    with _farm(ctx, nodes) as lab:
        for t in range(_trials(s)):
            ctx.status(f"failover: kill -9 of node2 of {nodes}, trial {t + 1}/{_trials(s)}")
            server, client, stall, lost = _farm_trial(ctx, lab)
            failed.update(lost)
            if server is None:
                ctx.count("failover_never_converged")
            for key, value in (("server", server), ("client", client), ("stall", stall)):
                if value is not None:
                    out[key].append(value)
            ctx.advance()
    return out, failed


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _failover(ctx: Context) -> ScenarioResult:
    s = ctx.settings
    farms = {n: _farm_trials(ctx, n) for n in FAILOVER_NODES}
    if not os.access(KEEPALIVED, os.X_OK):
        raise LabError(f"{KEEPALIVED} is missing: run scripts/install (apt-get install keepalived)")
    vrrp: dict[str, list[float]] = {"default": [], "fast": []}
    vrrp_stall: dict[str, list[float]] = {"default": [], "fast": []}
    vrrp_failed: dict[str, Counter[str]] = {"default": Counter(), "fast": Counter()}
    name = testbed.unique_name("vb")
    lab = testbed.up(name, nodes=1, clients=1, app="builtin", datapath=False)
    try:
        for mode in ("fast", "default"):
            for t in range(_trials(s)):
                ctx.status(f"failover: keepalived ({mode} timers), trial {t + 1}/{_trials(s)}")
                ms, stalled, failed = _vrrp_trial(ctx, lab, fast=mode == "fast")
                # keepalived's failed requests are a finding, not a safety counter of the farm
                vrrp_failed[mode].update(failed)
                if ms is None:
                    ctx.count("vrrp_failover_never_converged")
                else:
                    vrrp[mode].append(ms)
                if stalled is not None:
                    vrrp_stall[mode].append(stalled)
                ctx.advance()
    finally:
        testbed.down(name)
    figures: dict[str, Any] = {}
    notes: dict[str, Any] = {
        "vrrp_failover_ms_all": {k: [round(x, 1) for x in v] for k, v in vrrp.items()},
        "vrrp_client_stall_ms_all": {k: [round(x, 1) for x in v] for k, v in vrrp_stall.items()},
        "vrrp_stall_failed_requests": {k: dict(v) for k, v in vrrp_failed.items()},
    }
    for n, (got, failed) in farms.items():
        suffix = "" if n == 3 else f"_{n}"
        notes[f"client_stall{suffix}_failed_requests"] = dict(failed)
        figures[f"client_stall_failed{suffix}"] = sum(failed.values())
        notes[f"failover_ms{suffix}_all"] = [round(x, 1) for x in got["server"]]
        notes[f"client_failover_ms{suffix}_all"] = [round(x, 1) for x in got["client"]]
        notes[f"client_stall_ms{suffix}_all"] = [round(x, 1) for x in got["stall"]]
        for key, values in (("failover_ms", got["server"]), ("client_stall_ms", got["stall"])):
            if (m := _median(values)) is not None:
                figures[key + suffix] = m
        if n == 3 and (m := _median(got["client"])) is not None:
            figures["client_failover_ms"] = m
    if all(vrrp.values()):
        figures["vrrp_failover_ms"] = {k: _median(v) for k, v in vrrp.items()}
        if "failover_ms" in figures:
            figures["farm_vs_vrrp_fast_failover"] = round(
                figures["vrrp_failover_ms"]["fast"] / figures["failover_ms"], 2
            )
        if "client_failover_ms" in figures:
            figures["vrrp_fast_vs_farm_client_failover"] = round(
                figures["vrrp_failover_ms"]["fast"] / figures["client_failover_ms"], 2
            )
    if all(vrrp_stall.values()):
        figures["vrrp_client_stall_ms"] = {k: _median(v) for k, v in vrrp_stall.items()}
    # keepalived SIGKILLed leaves the VIP on the old master, whose kernel resets the SYNs of
    # clients that still resolve the VIP to it: they fail at once instead of stalling.
    figures["vrrp_client_stall_failed"] = {k: sum(v.values()) for k, v in vrrp_failed.items()}
    return ScenarioResult(figures=figures, notes=notes)


def _planned(ctx: Context, lab: Lab, figures: dict[str, Any], what: str, act: Any) -> None:
    """A planned move (`act`) under a stream of new connections: SYN retransmissions and the
    unowned gap, into figures `syn_retransmissions_<what>` and `unowned_gap_ms_<what>`."""
    syn0 = syn_retransmissions(lab)
    stall = Stall(lab, "http://198.51.100.100/", seconds=PLANNED_S, rate=PLANNED_RATE)
    wall = time.time()
    act()
    _worst, failed = stall.result()
    figures[f"syn_retransmissions_{what}"] = syn_retransmissions(lab) - syn0
    if failed:
        ctx.count(f"planned_{what}_requests_failed", sum(failed.values()))
    if (gap := unowned_gap_ms(lab, wall)) is not None:
        figures[f"unowned_gap_ms_{what}"] = round(gap, 1)


def _rebalance(ctx: Context) -> ScenarioResult:
    figures: dict[str, Any] = {}
    with _farm(ctx) as lab, lab.hold("client1", HOLD) as held:
        if held.initial["ok"] != HOLD:
            ctx.count("hold_connections_failed", HOLD - held.initial["ok"])
        ctx.status(f"rebalance: vipfarm stop (drain) node3 with {HOLD} connections open")

        def drain() -> None:
            lab.daemon_call("node3", "stop")
            t0 = time.monotonic()
            while lab.kernel_owned(["node3"])["node3"] and time.monotonic() - t0 < 20:
                time.sleep(0.01)

        _planned(ctx, lab, figures, "drain", drain)
        after = held.probe()
        figures["broken_connections_drain"] = HOLD - after["ok"] + after["moved"]
        ctx.advance()
        ctx.status("rebalance: node3 starts again and rejoins")

        def rejoin() -> None:
            lab.daemon_call("node3", "start")
            lab.wait_farm_up(30)

        _planned(ctx, lab, figures, "join", rejoin)
        after = held.probe()
        figures["broken_connections_join"] = HOLD - after["ok"] + after["moved"]
        ctx.advance()
    return ScenarioResult(figures=figures)


FAILOVER = register(
    Scenario(
        name="failover",
        title="Failover: vipfarm vs keepalived (VRRP)",
        produces={
            "failover_ms": "kill -9 of a node of 3 to every bucket held by a live node, from the "
            "survivors' kernels (ms, median)",
            "failover_ms_12": "the same in a 12-node farm (ms, median)",
            "client_failover_ms": "kill -9 of a node to a successful new connection in every "
            "bucket it owned, seen by a client (ms, median; 100 ms retry granularity)",
            "client_stall_ms": f"the longest wait of a new connection, {STALL_RATE:g} a second "
            "from one client, across a kill -9 in a 3-node farm (ms, median of trials)",
            "client_stall_ms_12": "the same in a 12-node farm (ms, median of trials)",
            "vrrp_failover_ms": "kill -9 of keepalived's master to a new connection answered "
            "by the backup (ms, median), per timer setting",
            "vrrp_client_stall_ms": "client_stall_ms for keepalived, per timer setting (answered "
            "requests; see vrrp_client_stall_failed)",
            "client_stall_failed": "requests of the stall stream that failed across the kill, "
            "3 nodes (all trials)",
            "client_stall_failed_12": "the same, 12 nodes",
            "vrrp_client_stall_failed": "requests of the stall stream that failed across "
            "keepalived's failover (all trials; mostly resets from the old master's kernel, "
            "which keeps the VIP when keepalived is killed)",
            "farm_vs_vrrp_fast_failover": "keepalived's failover with its fastest timers divided "
            "by the farm's failover_ms (>1: the farm is faster)",
            "vrrp_fast_vs_farm_client_failover": "keepalived with its fastest timers, divided "
            "by the farm's client failover (>1: the farm is faster)",
        },
        method=__doc__ or "",
        steps=lambda s: (len(FAILOVER_NODES) + 2) * _trials(s),
        run=_failover,
        goals=(
            Goal("failover_ms", "<=", 250, "failover within 250 ms (3 nodes, default timers)"),
            Goal("failover_ms_12", "<=", 500, "failover within 500 ms (12 nodes)"),
            Goal("farm_vs_vrrp_fast_failover", ">=", 1.0, "faster than keepalived (100 ms)"),
        ),
    )
)

REBALANCE = register(
    Scenario(
        name="rebalance",
        title=f"Planned rebalance under {HOLD} long-lived connections",
        produces={
            "broken_connections_drain": f"connections of {HOLD} broken by draining a node",
            "broken_connections_join": f"connections of {HOLD} broken by a node rejoining",
            "syn_retransmissions_drain": "SYNs the client sent again during the drain, under "
            f"{PLANNED_RATE:g} new connections a second",
            "syn_retransmissions_join": "the same during the rejoin",
            "unowned_gap_ms_drain": "upper bound of the time a moved bucket went unowned "
            "during the drain (first release to last acquisition, ms)",
            "unowned_gap_ms_join": "the same during the rejoin (ms)",
        },
        method=(
            f"{HOLD} keep-alive connections are opened from one client and spread over a "
            "3-node farm. `vipfarm stop` drains node3; once its kernel holds no bucket, every "
            "connection sends one more request: one that fails or is answered by another node "
            "than the first time is broken. node3 then starts again; once the farm is balanced, "
            "the same check. During both, a second client process opens "
            f"{PLANNED_RATE:g} new connections a second: the client namespace's count of "
            "retransmitted SYNs (`TcpExt TCPSynRetrans`) before and after gives "
            "`syn_retransmissions_*`, and the nodes' `buckets_changed` events (each with the "
            "time its kernel was read back) give the unowned gap."
        ),
        steps=lambda s: 2,
        run=_rebalance,
        goals=(
            Goal("broken_connections_drain", "<=", 0, "no connection broken by a drain"),
            Goal("broken_connections_join", "<=", 0, "no connection broken by a join"),
            Goal("syn_retransmissions_drain", "<=", 0, "no SYN retransmitted during a drain"),
            Goal("syn_retransmissions_join", "<=", 0, "no SYN retransmitted during a rejoin"),
        ),
    )
)
