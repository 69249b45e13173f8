"""`vipfarm datapath`: placeholder until the data path lands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Kernel data path of one node.", no_args_is_help=True)
