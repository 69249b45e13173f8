"""Node commands: `vipfarm daemon`, and `start`, `stop`, `state`, `log`, which talk to the daemon
of this network namespace over its control socket (`vipfarm.node.control`), or with `vipfarm --node
HOST` to that node's HTTP API (`vipfarm.cli.remote`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vipfarm.cli.remote import FARM, JSON, api_client, call, print_json, target_of

if TYPE_CHECKING:
    from vipfarm.api.models import LogPage, LogQuery

# Imports inside the commands: `vipfarm state` must not pay for the daemon (data path, nftables,
# supervisor), `--json` not for rich, and `vipfarm --help` for none of it.

FOLLOW_POLL_S = 0.5


def daemon(
    config: Path = typer.Option(..., "--config", help="farm configuration (TOML)"),
    node: str | None = typer.Option(None, "--node", help="this node's name (default: by address)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="runtime state directory"),
    log_dir: Path | None = typer.Option(None, "--log-dir", help="module.log and app.log go here"),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="persistent state (the last incarnation); survives reboots"
    ),
) -> None:
    """Run the node daemon in the foreground (systemd Type=notify): it starts the node's pulse
    and manager processes and restarts whichever dies."""
    import asyncio

    from vipfarm.config.loading import load_config
    from vipfarm.config.problems import ConfigError
    from vipfarm.node.control import already_runs, running_daemon
    from vipfarm.node.daemon import Daemon, DaemonError, default_dirs
    from vipfarm.node.host import local_addresses

    if os.geteuid() != 0:
        typer.echo("error: the daemon changes the kernel's data path: run it as root", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_config(config)
        me = cfg.find_self(node, local_addresses())
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    # Before the pulse touches the data path: one daemon per farm in a network namespace (the
    # manager's lock on the control socket is what finally decides; this says it up front).
    pid = running_daemon(cfg.farm.name)
    if pid is not None:
        typer.echo(f"error: {already_runs(cfg.farm.name, pid)}", err=True)
        raise typer.Exit(1)
    default_run, default_log, default_state = default_dirs(cfg.farm.name, me.name)
    d = Daemon(
        config.resolve(),
        me.name,
        run_dir=run_dir or default_run,
        log_dir=log_dir or default_log,
        state_dir=state_dir or default_state,
    )
    try:
        asyncio.run(d.run())
    except (DaemonError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def start(ctx: typer.Context, as_json: bool = JSON, farm: str | None = FARM) -> None:
    """Bring the node (back) into the farm and start its application."""
    from vipfarm.api.models import ActionResult

    result = call(ctx, farm, "start", ActionResult, method="POST")
    if as_json:
        print_json(result)
    else:
        typer.echo(f"node {result.node} is {result.state}")


def stop(
    ctx: typer.Context,
    force: bool = typer.Option(
        False, "--force", help="do not wait for established connections to end"
    ),
    as_json: bool = JSON,
    farm: str | None = FARM,
) -> None:
    """Drain the node: give away its buckets, let connections finish, stop the application."""
    from vipfarm.api.models import ActionResult, StopRequest

    result = call(ctx, farm, "stop", ActionResult, method="POST", body=StopRequest(force=force))
    if as_json:
        print_json(result)
    else:
        typer.echo(f"node {result.node} is {result.state}{' (forced)' if force else ''}")


def state(ctx: typer.Context, as_json: bool = JSON, farm: str | None = FARM) -> None:
    """The node's state and the whole farm as it sees it, with every node's config version."""
    from vipfarm.api.models import NodeStatus
    from vipfarm.cli.local import print_status_table

    st = call(ctx, farm, "farm", NodeStatus)
    if as_json:
        print_json(st)
        return
    # The same printing as the fast path's (vipfarm.cli.local), which a unit test compares.
    print_status_table(st.model_dump(mode="json"))


def log(
    ctx: typer.Context,
    app_log: bool = typer.Option(False, "--app", help="the application log (scripts' output)"),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
    lines: int = typer.Option(50, "-n", "--lines", min=1, help="lines of history to print"),
    farm: str | None = FARM,
) -> None:
    """Print the node's module log (events), or with --app the application log."""
    from vipfarm.api.models import MAX_LINES, LogQuery

    name = "app" if app_log else "module"

    def page(offset: int | None) -> LogPage:
        return _page(ctx, farm, LogQuery(log=name, offset=offset, limit=min(lines, MAX_LINES)))

    try:
        got = page(None)
        _write(got.lines)
        if not follow:
            return
        target = target_of(ctx)
        if target is not None:
            with api_client(target) as client:
                for line in client.stream_lines(
                    "/api/v1/logs/stream", {"log": name, "offset": got.next_offset}
                ):
                    _write([line])
            return  # the node's daemon stopped
        offset = got.next_offset
        while True:
            time.sleep(FOLLOW_POLL_S)
            got = page(0 if got.size < offset else offset)  # shorter: rotated, start over
            _write(got.lines)
            offset = got.next_offset
    except KeyboardInterrupt:
        pass


def _page(ctx: typer.Context, farm: str | None, query: LogQuery) -> LogPage:
    from vipfarm.api.models import LogPage

    target = target_of(ctx)
    if target is None:
        return call(ctx, farm, "log_page", LogPage, body=query)
    with api_client(target) as client:
        params = query.model_dump(exclude_none=True)
        result: LogPage = client.call("GET", "/api/v1/logs", LogPage, params=params)
        return result


def _write(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
