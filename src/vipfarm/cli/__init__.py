"""The `vipfarm` command line: one typer app, one sub-app per area, each in its own module.

Theory of operation: a command must answer at once, and importing every area (the lab, chaos,
the bench, the simulator pull in the data path, nftables, httpx...) costs most of a second.
So nothing is imported up front: `main()` finds the command name in `sys.argv` (the first
argument that is not a root option or the value of one) and builds an app holding only that
command, whose module imports only what it needs. With no command, `--help`, or a name that
is not a command, it builds the whole app, so help lists everything and typer reports an
unknown command itself. The root options are the same in every build (`remote.root_options`).

`build_app(only)` is that builder; `app` (the whole app, built on first access) stays
importable for tests and tools: `from vipfarm.cli import app`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import typer

# Root options that take a value (see `remote.root_options`): the word after them is that value,
# not the command. tests/unit/test_cli_fast.py checks this against the callback's parameters.
VALUE_OPTIONS = frozenset({"--node", "--token-file", "--port", "--ca-file"})


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


def command_name(argv: Sequence[str]) -> str | None:
    """The command `argv` (without the program name) asks for: its first word that is neither a
    root option nor an option's value. None when there is none, or help is asked at the root."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if word == "--help":
            return None
        if word in VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


_full_app: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    # `app` on first access only, so that importing this package costs nothing (PEP 562).
    global _full_app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _full_app is None:
        _full_app = build_app()
    return _full_app


def main() -> None:
    build_app(command_name(sys.argv[1:]))()
