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
from vipfarm.lab.farm import DEFAULT_DELIVERY
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
    static: bool = typer.Option(
        False,
        "--static",
        help="no node daemons: a stand-alone data path per node with a fixed even split",
    ),
    datapath: bool = typer.Option(
        True, "--datapath/--no-datapath", help="with --static: start the data path runners"
    ),
    no_flood: bool = typer.Option(
        False,
        "--no-flood",
        help="the LAN switch floods no unknown unicast to the nodes (as VMware, clouds)",
    ),
    delivery: str = typer.Option(
        DEFAULT_DELIVERY,
        "--delivery",
        help="the farm's delivery: flood, directed or auto (docs/CONFIG.md)",
    ),
) -> None:
    """Build a lab: switch, nodes running the vipfarm daemon and their application, clients,
    router, remote clients."""
    lab = _guard(
        lambda: testbed.up(
            name,
            nodes,
            clients,
            remote_clients,
            app_kind,
            datapath=datapath,
            daemon=not static,
            no_flood=no_flood,
            delivery=delivery,
        )
    )
    typer.echo(
        f"lab {lab.name} is up: {nodes} nodes ({lab.config.app}), {clients} clients, "
        f"{remote_clients} remote clients"
    )
    if clients:
        typer.echo(f"try: ip netns exec {lab.ns('client1')} curl http://{VIP4}/")


@app.command()
def kill(node: str = typer.Argument(..., help="node name, e.g. node2"), name: str = NAME) -> None:
    """SIGKILL every process of a node (daemon and application): a crashed server."""
    pids = _guard(lambda: testbed.Lab.attach(name).kill(_node(name, node)))
    typer.echo(f"{node}: killed {len(pids)} processes")


@app.command("start")
def start_node(
    node: str = typer.Argument(..., help="node name, e.g. node2"), name: str = NAME
) -> None:
    """Start a node's daemon again (after `lab kill`); returns once the node is UP."""

    def run() -> None:
        lab = testbed.Lab.attach(name)
        if not lab.config.daemon:
            raise LabError(f"lab {name} runs no daemons (it was built with --static)")
        lab.start_daemon(_node(name, node))

    _guard(run)
    typer.echo(f"{node} is UP")


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    ctx: typer.Context,
    who: str = typer.Argument(..., help="node1, client1, remote1, router or switch"),
    name: str = NAME,
) -> None:
    """Run a command in a lab namespace: `vipfarm lab exec node1 -- vipfarm state`."""
    import os

    argv = list(ctx.args)
    if not argv:
        typer.echo("error: give the command after --, e.g. lab exec node1 -- ip addr", err=True)
        raise typer.Exit(2)
    lab = _guard(lambda: testbed.Lab.attach(name))
    ns = _guard(lambda: lab.ns(who))
    if argv[0] == "vipfarm":  # the same vipfarm as this one, whatever PATH says
        argv = [sys.executable, "-m", "vipfarm", *argv[1:]]
    os.execvp(lab.ip, [lab.ip, "netns", "exec", ns, *argv])


def _node(name: str, node: str) -> str:
    lab = testbed.Lab.attach(name)
    if node not in lab.node_names:
        raise LabError(f"lab {name} has no {node!r}: its nodes are {', '.join(lab.node_names)}")
    return node


@app.command()
def console(
    name: str = NAME,
    node: str = typer.Option("node1", "--node", help="the node whose console to open"),
    port: int = typer.Option(9010, "--port", help="port on the host's 127.0.0.1"),
) -> None:
    """Make a lab node's web console reachable at http://127.0.0.1:PORT/ (a forwarder on
    loopback until Ctrl-C); prints the URL and the token to sign in with."""
    import asyncio

    from vipfarm.lab.console import for_lab

    fwd, token = _guard(lambda: for_lab(name, node, port))

    async def run() -> None:
        task = asyncio.create_task(fwd.serve())
        while not fwd._ready.is_set() and not task.done():
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
        typer.echo(f"console of {name}/{node}: {fwd.url}")
        typer.echo(f"token: {token}")
        typer.echo("Ctrl-C stops the forwarder")
        await task

    try:
        asyncio.run(run())
    except OSError as e:
        typer.echo(f"error: cannot listen on 127.0.0.1:{port}: {e.strerror} (use --port)", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


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
            + (
                "node daemons"
                if config.get("daemon")
                else f"static data path {'on' if config['datapath'] else 'off'}"
            )
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
