"""`vipfarm lab`: placeholder until the lab lands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Build and drive a multi-node farm in network namespaces.", no_args_is_help=True)
