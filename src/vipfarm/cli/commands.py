"""The typer app of `vipfarm`: one sub-app per area, each in its own module, registered on demand.

Theory of operation: a command must answer at once, and importing every area (the lab, chaos,
the bench, the simulator pull in the data path, nftables, httpx...) costs most of a second.
So nothing is imported up front: `vipfarm.cli.main()` finds the command name in `sys.argv` (the
first argument that is not a root option or the value of one) and `build_app(name)` builds an
app holding only that command, whose module imports only what it needs. With no command,
`--help`, or a name that is not a command, it builds the whole app, so help lists everything
and typer reports an unknown command itself. The root options are the same in every build
(`remote.root_options`).
"""

from __future__ import annotations

from collections.abc import Callable

import typer


def _lab(app: typer.Typer) -> None:
    from vipfarm.cli import lab

    app.add_typer(lab.app, name="lab")


def _datapath(app: typer.Typer) -> None:
    from vipfarm.cli import datapath

    app.add_typer(datapath.app, name="datapath")


def _config(app: typer.Typer) -> None:
    from vipfarm.cli import config, remote

    # A fresh group each build: the module's own `app` stays `check` alone (tests use it so),
    # and building twice does not register deploy and get twice.
    group = typer.Typer(help=config.app.info.help, no_args_is_help=True)
    group.callback()(config.group)
    group.command("check")(config.check)
    group.command("deploy")(remote.deploy)
    group.command("get")(remote.config_get)
    app.add_typer(group, name="config")


def _remote(name: str) -> Callable[[typer.Typer], None]:
    def register(app: typer.Typer) -> None:
        from vipfarm.cli import remote

        app.command(name)(getattr(remote, name))

    return register


def _node(name: str) -> Callable[[typer.Typer], None]:
    def register(app: typer.Typer) -> None:
        from vipfarm.cli import node

        app.command(name)(getattr(node, name))

    return register


def _sim(app: typer.Typer) -> None:
    from vipfarm.cli import sim

    app.command("sim")(sim.sim)


def _chaos(app: typer.Typer) -> None:
    from vipfarm.cli import chaos

    app.command("chaos")(chaos.chaos)


def _bench(app: typer.Typer) -> None:
    from vipfarm.cli import bench

    app.command("bench")(bench.bench)


def _init(app: typer.Typer) -> None:
    from vipfarm.cli import init

    app.command("init")(init.init)


def _service(app: typer.Typer) -> None:
    from vipfarm.cli import service

    app.add_typer(service.app, name="service")


def _demo(app: typer.Typer) -> None:
    app.command("demo")(demo)


# Every top-level command and the function that registers it (and imports its module).
COMMANDS: dict[str, Callable[[typer.Typer], None]] = {
    "lab": _lab,
    "datapath": _datapath,
    "config": _config,
    "snapshot": _remote("snapshot"),
    "sim": _sim,
    "chaos": _chaos,
    "bench": _bench,
    "daemon": _node("daemon"),
    "start": _node("start"),
    "stop": _node("stop"),
    "state": _node("state"),
    "log": _node("log"),
    "demo": _demo,
    "init": _init,
    "service": _service,
}


def demo(
    nodes: int = typer.Option(3, "--nodes", help="farm nodes"),
    name: str = typer.Option("vf", "--name", help="lab name"),
    keep: bool = typer.Option(False, "--keep", help="leave the lab up afterwards"),
    console: bool = typer.Option(
        False, "--console", help="afterwards, serve node1's web console on 127.0.0.1 until Ctrl-C"
    ),
    console_port: int = typer.Option(9010, "--console-port", help="port of --console"),
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
        raise typer.Exit(
            run_demo(
                Console(),
                name=name,
                nodes=nodes,
                keep=keep,
                console_port=console_port if console else None,
            )
        )
    except LabError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def build_app(only: str | None = None) -> typer.Typer:
    """The CLI with command `only` alone (its module alone imported), or with every command."""
    from vipfarm.cli.remote import root_options

    app = typer.Typer(
        name="vipfarm",
        help="Active-active farm cluster on one shared virtual IP.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    app.callback()(root_options)  # --node HOST: node commands act on that node's API
    if only is not None and only in COMMANDS:
        COMMANDS[only](app)
    else:
        for register in COMMANDS.values():
            register(app)
    return app
