"""`vipfarm sim`: placeholder until the simulator lands."""

from __future__ import annotations

import typer


def sim() -> None:
    """Run the membership core over a simulated network."""
    raise typer.Exit(1)
