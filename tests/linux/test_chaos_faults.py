"""The chaos faults that load a node instead of breaking it do what they claim, and end; and a
node that a fault took out of the farm by design is brought back so that later faults are
measured (vipfarm.lab.chaos)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vipfarm.lab.chaos import HOG, Chaos
from vipfarm.lab.procs import pid_alive
from vipfarm.lab.testbed import Lab, LabFactory
from vipfarm.lab.topology import node_hb


def _hogs(lab: Lab, node: str) -> list[int]:
    """PIDs of the busy processes running in `node`'s namespace."""
    pids = subprocess.run(
        ["ip", "netns", "pids", lab.ns(node)], capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if HOG.encode() in cmdline:
            found.append(int(pid))
    return found


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_cpu_hog_runs_one_busy_process_per_cpu_in_the_node_and_ends_them(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    chaos = Chaos(lab, seed=1, duration_s=0)
    hog = threading.Thread(target=chaos._hog, args=(["node1"], 3.0))
    hog.start()
    try:
        _wait("the busy processes", lambda: len(_hogs(lab, "node1")) >= 1, 10)
        pids = _hogs(lab, "node1")
        assert not _hogs(lab, "node2")
        before = {p: _cpu_ticks(p) for p in pids}
        _wait("CPU time", lambda: all(_cpu_ticks(p) > before[p] for p in pids), 10)
    finally:
        hog.join(30)
    assert not hog.is_alive()
    for p in pids:
        assert not pid_alive(p)
    assert not _hogs(lab, "node1")


def _rtt_ms(lab: Lab, src: str, dst: str) -> float:
    """The median round trip of five pings from `src` to `dst` (ms)."""
    out = lab.exec(src, ["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", dst]).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    assert times, out
    return times[len(times) // 2]


def test_heartbeat_delay_delays_the_nodes_heartbeat_network_both_ways_and_undoes_it(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, clients=1, app="builtin")
    chaos = Chaos(lab, seed=1, duration_s=0)
    peer = str(node_hb(2))
    assert _rtt_ms(lab, "node1", peer) < 40
    rec = chaos.delay_heartbeats("node1", seconds=60)
    try:
        # 40 ms + U(0, 80 ms) on the way out of node1 and again on the way back in
        assert _rtt_ms(lab, "node1", peer) >= 80
        # the other nodes' heartbeat network is not delayed
        assert _rtt_ms(lab, "node2", str(node_hb(3))) < 40
    finally:
        chaos.undelay_heartbeats("node1", rec)
    assert not pid_alive(rec.pid, rec.start)
    assert _rtt_ms(lab, "node1", peer) < 40
    ports = lab.exec("switch", ["ip", "-o", "link", "show", "master", "br1"]).stdout
    assert " n1h@" in ports and " d1b@" not in ports


def test_a_node_whose_restart_policy_is_used_up_is_started_again_and_later_faults_measured(
    lab_factory: LabFactory,
) -> None:
    """The lab allows 2 application restarts per 60 s: the third crash takes node2 out of the
    farm by design. Chaos records it, starts node2 as an operator would, and the faults after
    it converge and recover."""
    lab = lab_factory(nodes=3, clients=1, app="builtin", daemon=True)
    chaos = Chaos(lab, seed=3, duration_s=0)
    chaos.install_probes()
    results = [chaos.inject("app_crash", "node2") for _ in range(3)]
    assert [r.left_farm for r in results[:2]] == [[], []]
    assert all(r.recover_ms is not None for r in results[:2]), results
    assert results[2].left_farm == ["node2"], results
    assert results[2].recover_ms is not None, results
    assert lab.daemon_state("node2")["state"] == "UP"
    # A later fault that takes nobody out: heavy heartbeat loss (`hb_loss`) can end in a false
    # failover with the default timers, which is chaos's finding, not this test's subject.
    later = chaos.inject("cpu_hog", "node1")
    assert later.recover_ms is not None and not later.left_farm, later

    # Heartbeats pass the delaying forwarder (its UDP checksums are accepted): node2 keeps
    # hearing node1 on heartbeat network 2 while node1's port is behind it.
    rec = chaos.delay_heartbeats("node1", seconds=60)
    try:
        ages = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            farm = {n["node"]: n for n in lab.daemon_state("node2")["farm"]}
            ages.append(farm["node1"]["heartbeat_age_ms"]["hb2"])
            time.sleep(0.05)
    finally:
        chaos.undelay_heartbeats("node1", rec)
    assert all(a is not None and a < 400 for a in ages), ages
    log = Path(rec.log).read_text()
    assert '"forwarded": ' in log and '"forwarded": 0,' not in log, log

    report = chaos._report([*results, later])
    assert report.accepted_twice == 0
    assert report.false_failovers == 0, report.false_failover_events
