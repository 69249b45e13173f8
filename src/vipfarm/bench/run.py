"""`vipfarm bench`: run the registered scenarios, then write results.json, plots and the summary.

The run is one pass over the selected scenarios with a rich progress bar counting wrk runs. Each
scenario builds and removes its own labs, so a failure leaves nothing behind (the exception still
ends the bench: figures from a half-run would mislead). What a run writes, all in `--out`:
`results.json`, one PNG per figure family, `summary.md`; and with `--docs FILE` the same summary
at FILE, naming the plots instead of embedding them (how docs/BENCHMARKS.md is produced).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import vipfarm.bench.control  # registers pulse_cpu
import vipfarm.bench.decision  # registers drop_decision
import vipfarm.bench.directed  # registers directed (issue 15)
import vipfarm.bench.failover  # registers failover and rebalance
import vipfarm.bench.figures  # noqa: F401  (registers the data-path scenarios)
from vipfarm.bench.framework import BenchError, Context, Scenario, ScenarioResult, Settings, select
from vipfarm.bench.report import compose, fmt, markdown

# Add further scenario modules (failover, chaos) above, next to `vipfarm.bench.figures`.

TOOLS = {"wrk": ["wrk", "-v"], "haproxy": ["haproxy", "-v"], "nginx": ["nginx", "-v"]}


class RichReporter:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self) -> None:
        self.progress.advance(self.task)


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # e.g. "HAProxy version 2.6.12 2023/01/01 - https://...", "wrk 4.1.0 [epoll] Copyright ..."
    return lines[0].split(" - ")[0].split(" Copyright")[0].strip() if lines else "unknown"


def tool_versions() -> dict[str, str]:
    return {name: _first_line(argv) for name, argv in TOOLS.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def git_state() -> dict[str, Any] | None:
    """Commit of the checkout vipfarm runs from, and whether its tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("the bench builds network namespaces: run it as root")
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: run scripts/install (apt-get install wrk)")


def run_bench(
    settings: Settings,
    out: Path,
    command: str,
    only: Sequence[str] = (),
    docs: Path | None = None,
    console: Console | None = None,
    chaos: Path | None = None,
) -> dict[str, Any]:
    """Run the scenarios selected by `only` (all when empty); return what results.json holds.
    `chaos`: a chaos report recorded apart (`vipfarm chaos --out`), summarised with the run."""
    console = console or Console()
    chosen = select(only)
    recorded = read_chaos(chaos) if chaos is not None else None
    preflight()
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "tools": tool_versions(),
        "scenarios": [s.name for s in chosen],
    }
    t0 = time.monotonic()
    outcomes, seconds, safety = _measure(settings, chosen, console)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    results = compose(meta, settings, chosen, outcomes, safety, seconds)
    if recorded is not None:
        results["chaos"] = recorded
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    images = {s.name: s.plot(results, out) if s.plot else [] for s in chosen}
    (out / "summary.md").write_text(markdown(results, chosen, images, out))
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        # The plots stay in --out (bench/results is not committed): the copy names them only.
        docs.write_text(markdown(results, chosen, images, None))
    _print_summary(console, results, out, docs)
    return results


def read_chaos(path: Path) -> dict[str, Any]:
    """A chaos report's summary: the run's totals and each fault kind's count and worst figures."""
    try:
        data = json.loads(path.read_text())
        faults = data["faults"]
        kinds: dict[str, dict[str, Any]] = {}
        for f in faults:
            k = kinds.setdefault(
                f["kind"], {"count": 0, "converge_ms_max": None, "recover_ms_max": None}
            )
            k["count"] += 1
            for key, name in (("converge_ms", "converge_ms_max"), ("recover_ms", "recover_ms_max")):
                if f.get(key) is not None:
                    k[name] = max(k[name] or 0.0, round(float(f[key]), 1))
        summary = {
            key: data[key]
            for key in (
                "duration_s", "nodes", "loss", "seed", "requests", "failed", "accepted_twice",
                "syn_accepted_by_two", "max_unowned_ms", "false_failovers",
                "false_failover_events",
            )
            if key in data
        }  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(
            f"--chaos {path}: not a chaos report written by `vipfarm chaos --out` ({e})"
        ) from None
    return {**summary, "source": str(path), "kinds": kinds}


def _measure(
    settings: Settings, chosen: Sequence[Scenario], console: Console
) -> tuple[dict[str, ScenarioResult], dict[str, float], dict[str, int]]:
    outcomes: dict[str, ScenarioResult] = {}
    seconds: dict[str, float] = {}
    total = sum(s.steps(settings) for s in chosen)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with (
        tempfile.TemporaryDirectory(prefix="vipfarm-bench-") as work,
        Progress(*columns, console=console) as progress,
    ):
        task = progress.add_task("starting", total=total)
        ctx = Context(settings, RichReporter(progress, task), Path(work))
        for s in chosen:
            t0 = time.monotonic()
            ctx.status(s.title)
            outcomes[s.name] = s.run(ctx)
            seconds[s.name] = round(time.monotonic() - t0, 1)
        progress.update(task, description="done")
    return outcomes, seconds, dict(ctx.safety)


def _print_summary(console: Console, results: dict[str, Any], out: Path, docs: Path | None) -> None:
    goals = Table("goal", "mode", "measured", "met", title="goals")
    for t in results["targets"]:
        met = {True: "[green]yes[/]", False: "[red]falls short[/]", None: "not measured"}
        goals.add_row(t["goal"], t["mode"] or "", fmt(t["value"]), met[t["met"]])
    console.print(goals)
    bad = {k: v for k, v in results["safety"].items() if v}
    console.print(
        "safety counters: all zero" if not bad else f"[red]safety counters not zero: {bad}[/]"
    )
    where = f"{out}/results.json, summary.md and plots" + (f"; {docs}" if docs else "")
    console.print(f"written: {where} ({results['meta']['seconds']:.0f} s)")
