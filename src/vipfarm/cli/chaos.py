"""`vipfarm chaos`: random faults on a farm of daemons under a steady load (vipfarm.lab.chaos)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vipfarm.lab.chaos import FAULT_HELP, FAULTS, run_chaos, write_report
from vipfarm.lab.farm import DEFAULT_DELIVERY
from vipfarm.lab.topology import LabError


def chaos(
    duration: float = typer.Option(60.0, "--duration", help="seconds of faults"),
    seed: int = typer.Option(1, "--seed", help="random seed: the same seed, the same faults"),
    nodes: int = typer.Option(3, "--nodes", help="farm nodes"),
    faults: str = typer.Option(
        ",".join(FAULTS), "--faults", help="comma-separated faults to draw from"
    ),
    loss: float = typer.Option(
        0.0, "--loss", help="heartbeat loss on every node for the whole run (e.g. 0.05)"
    ),
    out: Path | None = typer.Option(None, "--out", help="also write the JSON report here"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report only"),
    no_flood: bool = typer.Option(
        False, "--no-flood", help="a switch that floods no unknown unicast (as VMware, clouds)"
    ),
    delivery: str = typer.Option(
        DEFAULT_DELIVERY, "--delivery", help="the farm's delivery: flood, directed or auto"
    ),
) -> None:
    if not 0.0 <= loss < 1.0:
        typer.echo(f"error: --loss {loss} is out of range: use a probability in [0, 1)", err=True)
        raise typer.Exit(2)
    if os.geteuid() != 0:
        typer.echo("error: chaos builds network namespaces: run it as root", err=True)
        raise typer.Exit(2)
    chosen = tuple(f.strip() for f in faults.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown or not chosen:
        typer.echo(f"error: unknown fault(s) {unknown}: choose from {', '.join(FAULTS)}", err=True)
        raise typer.Exit(2)
    console = Console(stderr=as_json)
    try:
        report = run_chaos(
            duration,
            seed,
            nodes,
            progress=console.log,
            faults=chosen,
            no_flood=no_flood,
            delivery=delivery,
            loss=loss,
        )
    except LabError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if out is not None:
        write_report(report, out)
    if as_json:
        typer.echo(report.to_json())
    else:
        table = Table(title=f"chaos: {report.duration_s} s, seed {seed}, {report.nodes} nodes")
        columns = ("t (s)", "fault", "node", "converged ms", "recovered ms", "conns", "failed")
        for col in (*columns, "false failovers", "left the farm"):
            table.add_column(col)
        for f in report.faults:
            table.add_row(
                f"{f.started_s:.1f}",
                f.kind,
                f.node,
                "-" if f.converge_ms is None else f"{f.converge_ms:.0f}",
                "-" if f.recover_ms is None else f"{f.recover_ms:.0f}",
                str(f.requests),
                json.dumps(f.failed) if f.failed else "0",
                str(f.false_failovers),
                ", ".join(f.left_farm) or "-",
            )
        console.print(table)
        console.print(
            f"{report.requests} connections, failed {report.failed or 0}; "
            f"accepted twice: {report.accepted_twice} (SYNs let through by two nodes: "
            f"{report.syn_accepted_by_two}); longest unowned bucket: "
            f"{report.max_unowned_ms:.0f} ms; false failovers: {report.false_failovers}"
        )
    if report.accepted_twice:
        raise typer.Exit(1)


chaos.__doc__ = (
    "Keep a load on a lab farm while injecting random faults; report convergence, failed "
    "requests, connections accepted twice (must be 0), unowned time and false failovers. "
    "Exit status 1 when a connection was accepted twice. A node whose restart policy a fault "
    "used up leaves the farm by design: chaos records it (`left_farm`) and starts it again "
    "as an operator would (vipfarm start).\n\nFault kinds (--faults):\n\n"
    + "\n\n".join(f"{kind}: {what}" for kind, what in FAULT_HELP.items())
)
