"""The control plane's own cost: CPU of a node's pulse (and manager) in steady state, by farm size.

For each size (3, 12 and 24 nodes; the quick run stops at 12), a farm of daemons with the default
timers and the built-in web server is built and left to settle; then the CPU time of every
node's pulse and manager is read from the scheduler's clock (`/proc/<pid>/task/*/schedstat`,
all threads) over a window with no client traffic. A pulse must read one heartbeat per peer,
per heartbeat network and interval, so its CPU can only be judged against that: the figure
`pulse_cpu_us_per_heartbeat` divides its CPU time by the heartbeats it received, and should stay
flat as the farm grows (it grows no faster than the heartbeats). The whole lab shares the
machine's cores, so on 2 cores a 24-node farm also measures how the pulses hold up when
together they need a sizeable share of a core: the 24-node farm runs the `tolerant` timers
(100 ms heartbeats), since 24 pulses at 50 ms would need more than two cores, and flood
delivery (an auto farm's directed start at that size needs more than two cores too).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vipfarm.bench.cpu import lab_tasks, task_cpu_ns
from vipfarm.bench.framework import Context, Goal, Scenario, ScenarioResult, Settings, register
from vipfarm.config.schema import TIMING_PROFILES
from vipfarm.lab import testbed
from vipfarm.lab.farm import DEFAULT_DELIVERY
from vipfarm.lab.topology import LabError

SIZES = (3, 12, 24)
# A smoke run measures one size: the 12-node farm alone took a third of `--quick`'s time.
QUICK_SIZES = (3,)
# 24 pulses at the default 50 ms interval need more than this machine's two cores together
# (about 10 % of a core each), so the 24-node farm runs the tolerant timers (100 ms): its CPU
# per heartbeat stays comparable with the others'.
PROFILE = {3: "default", 12: "default", 24: "tolerant"}
# An auto farm starts directed, and 24 nodes starting together steer more than two cores can
# keep up with (their applications then miss their health deadlines and the lab never comes
# up): the 24-node farm is measured with flood delivery, which an auto farm on a flooding
# switch answers with once it has settled.
DELIVERY = {24: "flood"}
SETTLE_S = 5.0
NETWORKS = 2  # the lab's heartbeat networks (LAN and hb2)


def _sizes(s: Settings) -> tuple[int, ...]:
    return QUICK_SIZES if s.quick else SIZES


def _role_pids(namespaces: Iterable[str], role: str) -> list[int]:
    """PIDs of the lab's processes whose command line names `role` (vipfarm.node.pulse...)."""
    out = []
    for pid in lab_tasks(namespaces):
        with contextlib.suppress(OSError):
            if role.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def cpu_percent(pids: list[int], window_s: float) -> list[float]:
    """Each process's CPU over `window_s`, in % of one core (processes that ended are left out)."""
    before = {p: t for p in pids if (t := task_cpu_ns(p)) is not None}
    t0 = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - t0
    out = []
    for pid, (start, ns0) in before.items():
        now = task_cpu_ns(pid)
        if now is not None and now[0] == start:
            out.append((now[1] - ns0) / 1e9 / elapsed * 100)
    return out


def _pulse_cpu(ctx: Context) -> ScenarioResult:
    window = 5.0 if ctx.settings.quick else 15.0
    figures: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for n in _sizes(ctx.settings):
        name = testbed.unique_name("vc")
        ctx.status(f"pulse CPU: building a {n}-node farm ({name})")
        profile = PROFILE.get(n, "default")
        interval_s = TIMING_PROFILES[profile][0] / 1000
        try:
            lab = testbed.up(
                name,
                nodes=n,
                clients=1,
                app="builtin",
                daemon=True,
                timing=profile,
                delivery=DELIVERY.get(n, DEFAULT_DELIVERY),
            )
        except LabError as e:  # one size that cannot run here does not end the whole bench
            notes[f"pulse_cpu_{n}_failed"] = str(e)
            ctx.advance()
            continue
        ctx.labs.add(name)
        try:
            time.sleep(SETTLE_S)  # the start's own work (rulesets, joins) is not steady state
            ctx.status(f"pulse CPU: {n} nodes, {window:g} s window")
            namespaces = [lab.ns(node) for node in lab.node_names]
            pulses = cpu_percent(_role_pids(namespaces, "vipfarm.node.pulse"), window)
            managers = cpu_percent(_role_pids(namespaces, "vipfarm.node.manager"), window)
        finally:
            ctx.labs.discard(name)
            testbed.down(name)
        ctx.advance()
        if not pulses:
            ctx.count("pulse_cpu_not_measured")
            continue
        pulse = statistics.mean(pulses)
        heartbeats_s = (n - 1) * NETWORKS / interval_s
        figures[f"pulse_cpu_pct_{n}"] = round(pulse, 2)
        figures[f"pulse_cpu_us_per_heartbeat_{n}"] = round(pulse / 100 / heartbeats_s * 1e6, 1)
        if managers:
            figures[f"daemon_cpu_pct_{n}"] = round(pulse + statistics.mean(managers), 2)
        notes[f"pulse_cpu_pct_{n}_all"] = [round(x, 2) for x in pulses]
        notes[f"manager_cpu_pct_{n}_all"] = [round(x, 2) for x in managers]
    return ScenarioResult(figures=figures, notes=notes)


def _produces() -> dict[str, str]:
    out: dict[str, str] = {}
    for n in SIZES:
        timers = f"{PROFILE[n]} timers" + (f", {DELIVERY[n]} delivery" if n in DELIVERY else "")
        out[f"pulse_cpu_pct_{n}"] = (
            f"CPU of one node's pulse, {n}-node farm at rest, {timers} (% of a core)"
        )
        out[f"pulse_cpu_us_per_heartbeat_{n}"] = (
            f"the pulse's CPU per heartbeat it receives, {n} nodes (µs)"
        )
        out[f"daemon_cpu_pct_{n}"] = f"pulse and manager of one node, {n} nodes (% of a core)"
    return out


PULSE_CPU = register(
    Scenario(
        name="pulse_cpu",
        title="Control plane: CPU of a node by farm size",
        produces=_produces(),
        method=__doc__ or "",
        steps=lambda s: len(_sizes(s)),
        run=_pulse_cpu,
        goals=(Goal("daemon_cpu_pct_12", "<=", 1.0, "a node's daemon under 1 % of a core"),),
    )
)
