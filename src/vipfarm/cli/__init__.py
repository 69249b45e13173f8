"""The `vipfarm` command line: one typer app, one sub-app per area, each in its own module."""

from __future__ import annotations

import typer

from vipfarm.cli import datapath as datapath_cli
from vipfarm.cli import lab as lab_cli
from vipfarm.cli import sim as sim_cli

app = typer.Typer(
    name="vipfarm",
    help="Active-active farm cluster on one shared virtual IP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab_cli.app, name="lab")
app.add_typer(datapath_cli.app, name="datapath")
app.command("sim")(sim_cli.sim)


def main() -> None:
    app()
