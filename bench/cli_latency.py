#!/usr/bin/env python3
"""How long `vipfarm state` takes on a node, as an operator types it (goal: median < 300 ms).

    sudo .venv/bin/python bench/cli_latency.py [--runs 30] [--off-runs 10] [--baseline SRC]
        [--out DIR]

Builds a 3-node lab of node daemons (`vipfarm.lab.testbed`, built-in web server, no clients)
under a fresh name `vq<hex>` (the tests' labs are `vt*`, the bench's `vb*`), then times the
wall clock of `ip netns exec <lab>-node1 <venv>/bin/vipfarm state` and of `state --json`,
`--runs` times each, alternating, in a fresh process every time: interpreter start, imports,
the control-socket request and printing, which is what the operator waits for.

Cases, in order, on the same lab:

- `all_up`: every node UP;
- `peer_dead`: node3's processes killed with SIGKILL (`Lab.kill`, a crashed daemon) and node1
  seeing it dead. Its kernel still answers, so node1's question to node3's API (`state` asks
  the daemon for `farm`, which asks every peer's config version) is refused at once;
- `peer_off` (`--off-runs` runs, 0 to skip): node3's links also down, a machine that is gone:
  the question to node3 now waits for the daemon's peer timeout (PEER_STATE_TIMEOUT_S).

Each CLI run also records the child's CPU time (user + system, from its rusage): on a shared
machine wall times swing with the neighbours' load, CPU time barely does. `--baseline SRC`
adds `state` run with PYTHONPATH=SRC (e.g. another checkout's src/, the code before a change),
interleaved with the others so both see the same load; that tree's CLI must find this tree's
daemons (trees from before the control socket moved to /run/vipfarm/control cannot: measure
them on their own, without --baseline). Beside the CLI, each case times the
daemon's side alone: the control-socket commands `farm` (what `vipfarm state` asks) and `state`
(no peer questions), sent from this process (`Lab.daemon_call`), and `ip netns exec <ns> true`,
the cost of entering the namespace.

The lab is removed on every exit, SIGTERM and Ctrl-C included. Everything runs in the lab's
namespaces; the host's interfaces are never touched. Writes `cli_latency.json` (every run, in
ms) and `cli_latency.png` (when matplotlib is importable) to --out (default bench/results),
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from vipfarm.lab import testbed
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import LabError

GOAL_MS = 300.0
RUN_TIMEOUT_S = 30.0  # one CLI run; the peer timeout is 2 s, so this is a hang
MAX_RUNS = 200
DEAD_SEEN_TIMEOUT_S = 20.0


def vipfarm_argv() -> list[str]:
    """The `vipfarm` entry point next to this interpreter (an operator's command), else -m."""
    script = Path(sys.executable).parent / "vipfarm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vipfarm"]


def timed_ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t)


def summary(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"runs": 0}
    median = statistics.median(ms)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return {
        "runs": len(ms),
        "median_ms": round(median, 1),
        "p90_ms": round(p90, 1),
        "max_ms": round(max(ms), 1),
        "min_ms": round(min(ms), 1),
        "goal_met": median < GOAL_MS,
    }


class Series:
    """Wall times and, for CLI runs, the child's CPU time (user + system), in ms."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.cpu_ms: list[float] = []

    def figures(self) -> dict[str, Any]:
        out = {**summary(self.ms), "ms": [round(x, 1) for x in self.ms]}
        if self.cpu_ms:
            out["cpu_median_ms"] = round(statistics.median(self.cpu_ms), 1)
            out["cpu_ms"] = [round(x, 1) for x in self.cpu_ms]
        return out


def cli_run(lab: Lab, argv: list[str], series: Series, as_json: bool, path: str | None) -> None:
    # `ip netns exec` execs the command in place, so the child's rusage is vipfarm's own: CPU
    # time barely moves with the neighbours' load, wall time does.
    env = [] if path is None else ["env", f"PYTHONPATH={path}"]
    cmd = [*env, *argv, "state", *(["--json"] if as_json else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = lab.exec("node1", cmd, timeout=RUN_TIMEOUT_S)
    series.ms.append(1000 * (time.perf_counter() - t))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    series.cpu_ms.append(1000 * cpu)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` in node1 failed ({proc.returncode}): {proc.stderr}")
    if as_json:
        json.loads(proc.stdout)  # a whole answer, not a truncated one


def measure_case(lab: Lab, argv: list[str], runs: int, baseline: str | None) -> dict[str, Any]:
    human, machine, base = Series(), Series(), Series()
    for _ in range(runs):  # interleaved, so a neighbour's load spike hits every series alike
        cli_run(lab, argv, human, as_json=False, path=None)
        cli_run(lab, argv, machine, as_json=True, path=None)
        if baseline is not None:
            cli_run(lab, argv, base, as_json=False, path=baseline)
    farm, state, netns = Series(), Series(), Series()
    for _ in range(runs):
        farm.ms.append(timed_ms(lambda: lab.daemon_call("node1", "farm")))
        state.ms.append(timed_ms(lambda: lab.daemon_call("node1", "state")))
        netns.ms.append(timed_ms(lambda: lab.exec("node1", ["true"], check=True)))
    out = {
        "state": human.figures(),
        "state_json": machine.figures(),
        **({"state_baseline": base.figures()} if baseline is not None else {}),
        "control_farm": farm.figures(),
        "control_state": state.figures(),
        "netns_exec_true": netns.figures(),
    }
    for key, value in out.items():
        brief = {k: v for k, v in value.items() if k not in ("ms", "cpu_ms")}
        print(f"  {key}: {json.dumps(brief)}", flush=True)
    return out


def node3_dead_for_node1(lab: Lab) -> bool:
    farm = lab.daemon_call("node1", "state")["farm"]
    return not any(n["node"] == "node3" and n["alive"] for n in farm)


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return round(time.monotonic() - t0, 2)


def run(name: str, runs: int, off_runs: int, baseline: str | None) -> dict[str, Any]:
    argv = vipfarm_argv()
    cases: dict[str, Any] = {}
    t0 = time.monotonic()
    lab = testbed.up(name, nodes=3, clients=0, app="builtin", daemon=True)
    try:
        where = lab.exec("node1", [sys.executable, "-c", "import vipfarm; print(vipfarm.__file__)"])
        print(
            f"lab {name} up in {time.monotonic() - t0:.1f} s; vipfarm from {where.stdout.strip()}"
        )
        print("all_up", flush=True)
        cases["all_up"] = measure_case(lab, argv, runs, baseline)
        lab.kill("node3")
        seen = wait_for(
            "node1 to see node3 dead", lambda: node3_dead_for_node1(lab), DEAD_SEEN_TIMEOUT_S
        )
        print(f"peer_dead (node1 saw node3 dead {seen} s after the kill)", flush=True)
        cases["peer_dead"] = {"dead_seen_after_s": seen, **measure_case(lab, argv, runs, baseline)}
        if off_runs:
            links = json.loads(lab.exec("node3", [lab.ip, "-j", "link", "show"], check=True).stdout)
            for link in links:
                if link["ifname"] != "lo":  # every network: the API may listen on any
                    lab.exec("node3", [lab.ip, "link", "set", link["ifname"], "down"], check=True)
            print("peer_off (node3's links down too)", flush=True)
            cases["peer_off"] = measure_case(lab, argv, off_runs, baseline)
    finally:
        testbed.down(name)
    return {
        "vipfarm": argv,
        "vipfarm_module": where.stdout.strip(),
        "baseline_pythonpath": baseline,
        "cases": cases,
    }


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = result["cases"]
    labels, data = [], []
    for case, figures in cases.items():
        for key in ("state", "state_json", "state_baseline", "control_farm"):
            if key not in figures:
                continue
            labels.append(f"{case}\n{key}")
            data.append(figures[key]["ms"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.axhline(GOAL_MS, color="tab:red", linestyle="--", label=f"goal: median < {GOAL_MS:g} ms")
    ax.set_ylabel("wall time (ms)")
    ax.set_yscale("log")
    ax.set_title("vipfarm state on node1 of a 3-node lab")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def table(result: dict[str, Any]) -> str:
    rows = [f"{'case':<10} {'what':<16} {'median':>8} {'p90':>8} {'max':>8} {'cpu':>6}  goal"]
    for case, figures in result["cases"].items():
        for key, s in figures.items():
            if not isinstance(s, dict):
                continue
            goal = ("met" if s["goal_met"] else "MISSED") if key.startswith("state") else ""
            cpu = s.get("cpu_median_ms", "")
            figures_ms = f"{s['median_ms']:>8} {s['p90_ms']:>8} {s['max_ms']:>8} {cpu:>6}"
            rows.append(f"{case:<10} {key:<16} {figures_ms}  {goal}")
    return "\n".join(rows)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # through the `finally` that removes the lab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per command and case")
    parser.add_argument("--off-runs", type=int, default=10, help="runs with node3 gone (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default=None, help="lab name (default: vq + 6 hex digits)")
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also time `state` with PYTHONPATH=SRC (another tree's src/), interleaved",
    )
    args = parser.parse_args()
    if not (1 <= args.runs <= MAX_RUNS and 0 <= args.off_runs <= MAX_RUNS):
        parser.error(f"--runs and --off-runs go up to {MAX_RUNS}")
    if os.geteuid() != 0:
        print("error: run as root: the benchmark builds network namespaces", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    name = args.name or testbed.unique_name("vq")
    result: dict[str, Any] = {
        "meta": {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "lab": name,
        },
        "goal_ms": GOAL_MS,
    }
    try:
        result.update(run(name, args.runs, args.off_runs, args.baseline))
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["meta"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if plot(result, args.out / "cli_latency.png"):
        print(f"wrote {args.out / 'cli_latency.png'}", file=sys.stderr)
    print(f"wrote {args.out / 'cli_latency.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
