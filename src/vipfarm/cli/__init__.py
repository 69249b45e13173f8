"""The `vipfarm` command line: one typer app, one sub-app per area, each in its own module."""

from __future__ import annotations

import typer

from vipfarm.cli import bench as bench_cli
from vipfarm.cli import chaos as chaos_cli
from vipfarm.cli import config as config_cli
from vipfarm.cli import datapath as datapath_cli
from vipfarm.cli import lab as lab_cli
from vipfarm.cli import node as node_cli
from vipfarm.cli import remote as remote_cli
from vipfarm.cli import sim as sim_cli

app = typer.Typer(
    name="vipfarm",
    help="Active-active farm cluster on one shared virtual IP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab_cli.app, name="lab")
app.add_typer(datapath_cli.app, name="datapath")
app.add_typer(config_cli.app, name="config")
app.callback()(remote_cli.root_options)  # --node HOST: node commands act on that node's API
config_cli.app.command("deploy")(remote_cli.deploy)
config_cli.app.command("get")(remote_cli.config_get)
app.command("snapshot")(remote_cli.snapshot)
app.command("sim")(sim_cli.sim)
app.command("chaos")(chaos_cli.chaos)
app.command("bench")(bench_cli.bench)
app.command("daemon")(node_cli.daemon)
app.command("start")(node_cli.start)
app.command("stop")(node_cli.stop)
app.command("state")(node_cli.state)
app.command("log")(node_cli.log)


@app.command()
def demo(
    nodes: int = typer.Option(3, "--nodes", help="farm nodes"),
    name: str = typer.Option("vf", "--name", help="lab name"),
    keep: bool = typer.Option(False, "--keep", help="leave the lab up afterwards"),
) -> None:
    """Build a farm in network namespaces and watch it balance, rebalance and recover."""
    import os

    from rich.console import Console

    from vipfarm.lab.demo import run_demo
    from vipfarm.lab.topology import LabError

    if os.geteuid() != 0:
        typer.echo("error: the demo builds network namespaces: run it as root", err=True)
        raise typer.Exit(2)
    try:
        raise typer.Exit(run_demo(Console(), name=name, nodes=nodes, keep=keep))
    except LabError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    app()
