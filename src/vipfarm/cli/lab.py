"""`vipfarm lab`: build, inspect and remove a multi-node farm in network namespaces.

Thin wrappers over `vipfarm.lab.testbed`; every failure is a `LabError` whose text says what to
do, printed on stderr with exit status 1. Logs go to stderr so `status --json` stays parseable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from vipfarm import log as vlog
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind
from vipfarm.lab.topology import VIP4, LabError

app = typer.Typer(
    help="Build and drive a multi-node farm in network namespaces.", no_args_is_help=True
)

T = TypeVar("T")

NAME = typer.Option("vf", "--name", help="lab name: prefixes every namespace; the farm name")


def _guard(action: Callable[[], T]) -> T:
    vlog.setup(stream=sys.stderr)
    try:
        return action()
    except LabError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def up(
    name: str = NAME,
    nodes: int = typer.Option(3, "--nodes", help="farm nodes (1-32)"),
    clients: int = typer.Option(1, "--clients", help="clients on the LAN"),
    remote_clients: int = typer.Option(0, "--remote-clients", help="clients behind the router"),
    app_kind: AppKind = typer.Option(
        AppKind.AUTO, "--app", help="node web server (auto: nginx when installed)"
    ),
    datapath: bool = typer.Option(
        True, "--datapath/--no-datapath", help="start a data path runner on every node"
    ),
) -> None:
    """Build a lab: switch, nodes with their applications, clients, router, remote clients."""
    lab = _guard(
        lambda: testbed.up(name, nodes, clients, remote_clients, app_kind, datapath=datapath)
    )
    typer.echo(
        f"lab {lab.name} is up: {nodes} nodes ({lab.config.app}), {clients} clients, "
        f"{remote_clients} remote clients"
    )
    if clients:
        typer.echo(f"try: ip netns exec {lab.ns('client1')} curl http://{VIP4}/")


@app.command()
def down(name: str = NAME) -> None:
    """Remove a lab: processes, namespaces, veths and files (also a half-built one)."""
    _guard(lambda: testbed.down(name))


@app.command()
def status(
    name: str = NAME,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Describe a lab: namespaces and addresses, processes, buckets owned per node."""
    info = _guard(lambda: testbed.status(name))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _print_status(info)
    if not info["exists"]:
        raise typer.Exit(1)


def _print_status(info: dict[str, Any]) -> None:
    console = Console()
    if not info["exists"]:
        console.print(f"no lab named {info['name']!r}")
        return
    config = info["config"]
    if config is None:
        console.print(f"lab {info['name']}: half-built (no lab.json): `vipfarm lab down`")
    else:
        console.print(
            f"lab {info['name']}: {config['nodes']} nodes ({config['app']}), "
            f"{config['clients']} clients, {config['remote_clients']} remote clients, "
            f"data path {'on' if config['datapath'] else 'off'}"
        )
    hosts = Table("namespace", "present", "addresses", "owned buckets")
    for ns in info["namespaces"]:
        node = ns["name"].removeprefix(f"{info['name']}-")
        owned = ""
        if node in info["owned"]:
            buckets = info["owned"][node]
            owned = "?" if buckets is None else str(len(buckets))
        hosts.add_row(
            ns["name"],
            "yes" if ns["present"] else "[red]no[/red]",
            " ".join(a for addrs in ns["addresses"].values() for a in addrs),
            owned,
        )
    console.print(hosts)
    procs = Table("process", "namespace", "pid", "alive")
    for p in info["processes"]:
        procs.add_row(p["role"], p["ns"], str(p["pid"]), "yes" if p["alive"] else "[red]no[/red]")
    console.print(procs)
