"""Node commands: `vipfarm daemon`, and `start`, `stop`, `state`, `log`, which talk to the daemon
of this network namespace over its control socket (`vipfarm.control`)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vipfarm import control
from vipfarm.config import ConfigError, load_config, local_addresses
from vipfarm.control import ControlError

FARM = typer.Option(None, "--farm", help="farm name (default: the only farm running here)")


def _call(farm: str | None, cmd: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return control.call(control.resolve_farm(farm), cmd, args)
    except ControlError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def daemon(
    config: Path = typer.Option(..., "--config", help="farm configuration (TOML)"),
    node: str | None = typer.Option(None, "--node", help="this node's name (default: by address)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="runtime state directory"),
    log_dir: Path | None = typer.Option(None, "--log-dir", help="module.log and app.log go here"),
) -> None:
    """Run the node daemon in the foreground (systemd Type=notify)."""
    from vipfarm.daemon import Daemon, DaemonError, default_dirs
    from vipfarm.datapath import DatapathError

    if os.geteuid() != 0:
        typer.echo("error: the daemon changes the kernel's data path: run it as root", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_config(config)
        me = cfg.find_self(node, local_addresses())
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    default_run, default_log = default_dirs(cfg.farm.name, me.name)
    try:
        d = Daemon(
            cfg,
            me,
            run_dir=run_dir or default_run,
            log_dir=log_dir or default_log,
            config_path=config.resolve(),
        )
        asyncio.run(d.run())
    except (DaemonError, DatapathError, ControlError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def start(farm: str | None = FARM) -> None:
    """Bring this node (back) into the farm and start its application."""
    result = _call(farm, "start")
    typer.echo(f"node is {result['state']}")


def stop(
    force: bool = typer.Option(
        False, "--force", help="do not wait for established connections to end"
    ),
    farm: str | None = FARM,
) -> None:
    """Drain this node: give away its buckets, let connections finish, stop the application."""
    result = _call(farm, "stop", {"force": force})
    typer.echo(f"node is {result['state']}{' (forced)' if force else ''}")


def state(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    farm: str | None = FARM,
) -> None:
    """This node's state and the farm as it sees it."""
    st = _call(farm, "state")
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    console = Console()
    console.print(
        f"farm [bold]{st['farm_name']}[/], node [bold]{st['node']}[/]: {st['state']} "
        f"{st['share']:g}% (application {st['app']})"
    )
    table = Table()
    for col in ("node", "state", "share", "alive", "weight", "last heartbeat (ms)"):
        table.add_column(col)
    for n in st["farm"]:
        ages = ", ".join(
            f"{net} {'-' if age is None else f'{age:.0f}'}"
            for net, age in n["heartbeat_age_ms"].items()
        )
        table.add_row(
            n["node"],
            n["state"],
            f"{n['share']:g}%",
            "yes" if n["alive"] else "no",
            str(n["weight"]),
            ages or "(self)",
        )
    console.print(table)


def log(
    app_log: bool = typer.Option(False, "--app", help="the application log (scripts' output)"),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
    lines: int = typer.Option(50, "-n", "--lines", help="lines of history to print"),
    farm: str | None = FARM,
) -> None:
    """Print the node's module log (events), or with --app the application log."""
    paths = _call(farm, "logs")
    path = Path(paths["app" if app_log else "module"])
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f.readlines()[-lines:]:
                sys.stdout.write(line)
            sys.stdout.flush()
            while follow:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    continue
                if path.stat().st_ino != os.fstat(f.fileno()).st_ino:  # rotated
                    f.close()
                    f = path.open(encoding="utf-8", errors="replace")
                time.sleep(0.2)
    except FileNotFoundError:
        typer.echo(f"error: {path} does not exist yet", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
