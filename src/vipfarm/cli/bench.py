"""`vipfarm bench`: measure the farm against HAProxy and a lone node, in labs it builds itself."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def bench(
    quick: bool = typer.Option(
        False, "--quick", help="one short round per variant (under 2 minutes): a smoke test"
    ),
    out: Path = typer.Option(
        Path("bench-results"), "--out", help="directory for results.json, plots and summary.md"
    ),
    docs: Path | None = typer.Option(
        None, "--docs", help="also write the summary here (docs/BENCHMARKS.md: see bench/run)"
    ),
    only: list[str] = typer.Option(
        [], "--only", help="run only the scenario producing this result key (or named so)"
    ),
    chaos: Path | None = typer.Option(
        None,
        "--chaos",
        help="include this chaos report (`vipfarm chaos --out FILE`) in the results and summary",
    ),
) -> None:
    """Measure throughput, latency and data path costs; write results.json, plots, a summary."""
    from vipfarm.bench.framework import BenchError, Settings
    from vipfarm.bench.run import run_bench
    from vipfarm.lab.topology import LabError

    command = shlex.join(["vipfarm", *sys.argv[1:]])
    try:
        results = run_bench(Settings.make(quick), out, command, only, docs, chaos=chaos)
    except (BenchError, LabError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if any(results["safety"].values()):
        raise typer.Exit(3)
