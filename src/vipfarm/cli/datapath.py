"""`vipfarm datapath`: the kernel data path of this node, without the daemon."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import typer
from pydantic import ValidationError

from vipfarm import log as vlog
from vipfarm.datapath import DatapathError, LinuxKernel, ruleset
from vipfarm.datapath.runner import load_spec, run

app = typer.Typer(help="Kernel data path of one node.", no_args_is_help=True)


def _need_root() -> None:
    if os.geteuid() != 0:
        typer.echo("error: the data path changes the kernel: run as root", err=True)
        raise typer.Exit(2)


def _spec(path: Path):  # type: ignore[no-untyped-def]
    try:
        return load_spec(path)
    except FileNotFoundError:
        typer.echo(f"error: spec file {path} does not exist", err=True)
    except ValidationError as e:
        typer.echo(f"error: spec file {path} is invalid:\n{e}", err=True)
    raise typer.Exit(2)


@app.command("run")
def run_cmd(
    spec: Path = typer.Option(..., "--spec", help="JSON NodeDatapathSpec file"),
    state_dir: Path = typer.Option(
        Path("/run/vipfarm"), "--state-dir", help="where original sysctls are kept"
    ),
) -> None:
    """Apply a spec with a static set of owned buckets and keep its leases alive.

    SIGHUP re-reads the spec file; SIGTERM removes everything and exits.
    """
    _need_root()
    _spec(spec)
    vlog.setup()
    try:
        asyncio.run(run(spec, state_dir))
    except DatapathError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


@app.command("owned")
def owned_cmd(farm: str = typer.Option(..., "--farm", help="farm name")) -> None:
    """Print the buckets this node owns, read back from the kernel, as a JSON list."""
    _need_root()
    try:
        got = LinuxKernel().nft_read_owned(farm)
    except DatapathError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if got is None:
        typer.echo(f"error: no data path for farm {farm!r} on this node", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(sorted(got)))


@app.command("ruleset")
def ruleset_cmd(
    spec: Path = typer.Option(..., "--spec", help="JSON NodeDatapathSpec file"),
) -> None:
    """Print the nftables JSON batch a spec produces, without applying it."""
    node = _spec(spec)
    typer.echo(json.dumps({"nftables": ruleset.ruleset_batch(node.datapath)}, indent=2))
