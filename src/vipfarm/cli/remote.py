"""The CLI across the farm: `vipfarm [--node HOST] COMMAND`, and the farm-wide commands
`vipfarm config deploy`, `vipfarm config get` and `vipfarm snapshot`.

Without `--node`, a command talks to the daemon of this host (this network namespace) over its
control socket; with `--node HOST` (or `HOST:PORT`, or a URL), to that node's HTTP API, with the
token from `--token-file`, `$VIPFARM_TOKEN_FILE` or /etc/vipfarm/api.token. Both ways end in the
same daemon methods and the same answers (`vipfarm.api.models`), so every command prints the same
either way, and `--json` prints the answer itself.

Exit codes (`EXIT_*`, defined in `vipfarm.cli.local`): 0 done; 1 the operation failed (the node
refused, a deployment was refused, a node failed to apply); 2 usage or configuration error (bad
option, invalid file, token missing or rejected, several farms here and no --farm); 3 the node
cannot be reached (no daemon here, no answer).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from vipfarm.cli.local import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, Failure, ask

if TYPE_CHECKING:
    import ssl

    from pydantic import BaseModel

# Every build of the CLI imports this module (the root options), so it imports only typer (and
# the light `cli.local`) up front: the API models, rich, ssl, the configuration parser and the
# HTTP client are imported by the commands that use them (see vipfarm.cli).

# Two rounds over every node, each bounded by the nodes' own timeouts (vipfarm.api.client).
DEPLOY_TIMEOUT_S = 120.0
M = TypeVar("M", bound="BaseModel")

FARM = typer.Option(None, "--farm", help="farm name (default: the only farm running here)")
JSON = typer.Option(False, "--json", help="machine-readable output")


@dataclass(frozen=True)
class Target:
    """A remote node: its API's base URL, the token file, TLS verification."""

    url: str
    token_file: Path
    verify: ssl.SSLContext | bool


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def root_options(
    ctx: typer.Context,
    node: str | None = typer.Option(
        None,
        "--node",
        metavar="HOST",
        help="act on this node's API (HOST, HOST:PORT or URL) instead of this host's daemon",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        envvar="VIPFARM_TOKEN_FILE",
        help="the farm's API token (default: /etc/vipfarm/api.token)",
    ),
    port: int = typer.Option(9010, "--port", min=1, max=65535, help="API port for a bare HOST"),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", help="verify the node's certificate with this CA (implies HTTPS)"
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="HTTPS without certificate verification"
    ),
) -> None:
    """Active-active farm cluster on one shared virtual IP."""
    if node is None:
        ctx.obj = None
        return
    import ssl

    from vipfarm.api.client import DEFAULT_TOKEN_FILE, base_url, tls_verify

    try:
        url = base_url(node, port=port, tls=ca_file is not None or insecure)
        verify = tls_verify(ca_file, insecure)
    except (ValueError, OSError, ssl.SSLError) as e:
        fail(str(e), EXIT_USAGE)
    ctx.obj = Target(url, token_file or DEFAULT_TOKEN_FILE, verify)


def target_of(ctx: typer.Context) -> Target | None:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Target) else None


@contextmanager
def api_client(target: Target, timeout: float = 30.0) -> Iterator[Any]:
    """An `ApiClient` of the target; its errors become exit codes (see the module docstring)."""
    from vipfarm.api.client import ApiClient, ApiError, read_token
    from vipfarm.node.deploy import Unreachable

    try:
        token = read_token(target.token_file)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    try:
        with ApiClient(target.url, token, verify=target.verify, timeout=timeout) as client:
            yield client
    except Unreachable as e:
        fail(f"cannot reach the node's API: {e}", EXIT_UNREACHABLE)
    except ApiError as e:
        if e.status in (401, 403):
            fail(f"{target.url} refused the token ({e.status}): {e}", EXIT_USAGE)
        if e.body.nodes:
            _print_verdicts(e.body.nodes)
        fail(str(e), EXIT_USAGE if e.status == 422 else EXIT_FAILED)


def local_call(
    farm: str | None, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """One request to this host's daemon; its errors become exit codes (`cli.local.ask`)."""
    try:
        return ask(farm, cmd, args, timeout)
    except Failure as e:
        fail(e.message, e.code)


def call(
    ctx: typer.Context,
    farm: str | None,
    cmd: str,
    model: type[M],
    *,
    method: str = "GET",
    path: str = "",
    body: BaseModel | None = None,
    timeout: float = 30.0,
) -> M:
    """`cmd` on the local daemon, or `method path` on the `--node` target: the same answer."""
    target = target_of(ctx)
    if target is None:
        args = body.model_dump(mode="json") if body is not None else None
        return model.model_validate(local_call(farm, cmd, args, timeout))
    with api_client(target, timeout) as client:
        result: M = client.call(method, "/api/v1" + (path or f"/{cmd}"), model, body=body)
        return result


def print_json(model: BaseModel | dict[str, Any]) -> None:
    data = model if isinstance(model, dict) else model.model_dump(mode="json")
    typer.echo(json.dumps(data, indent=2))


def _print_verdicts(nodes: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("node", "outcome", "message", box=None)
    for v in nodes:
        table.add_row(v.node, v.outcome, v.message, style=None)
    Console(stderr=True).print(table, soft_wrap=True)


# ------------------------------------------------------------------------------ commands


def deploy(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="the new farm configuration (TOML)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate on every node, change nothing"),
    as_json: bool = JSON,
    farm: str | None = FARM,
) -> None:
    """Validate FILE, send it to every node, and apply it everywhere only when all accept."""
    from vipfarm.api.models import ConfigInfo, DeployRequest, DeployResult
    from vipfarm.config.loading import parse_config
    from vipfarm.config.problems import ConfigError

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {file}: {e}", EXIT_USAGE)
    if target_of(ctx) is None:
        # Relative paths in the file resolve where the daemon keeps its configuration.
        running = ConfigInfo.model_validate(local_call(farm, "config"))
        try:
            parse_config(text, base_dir=Path(running.path).parent, source=str(file))
        except ConfigError as e:
            fail(str(e), EXIT_USAGE)
    result = call(
        ctx,
        farm,
        "deploy",
        DeployResult,
        method="PUT",
        path="/config",
        body=DeployRequest(text=text, dry_run=dry_run),
        timeout=DEPLOY_TIMEOUT_S,
    )
    if as_json:
        print_json(result)
    else:
        what = "would deploy" if result.dry_run else "deployed"
        changes = ", ".join(result.changes) or "no change"
        typer.echo(f"{what} version {result.version} ({result.digest}): {changes}")
        _print_verdicts(result.nodes)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED)


def config_get(
    ctx: typer.Context,
    output: Path | None = typer.Option(None, "-o", "--output", help="write it to this file"),
    as_json: bool = JSON,
    farm: str | None = FARM,
) -> None:
    """Print the node's running configuration (its first line carries the version)."""
    from vipfarm.api.models import ConfigInfo

    info = call(ctx, farm, "config", ConfigInfo)
    if as_json:
        print_json(info)
    elif output is not None:
        output.write_text(info.text)
        typer.echo(f"version {info.version} written to {output}")
    else:
        typer.echo(info.text, nl=False)


def snapshot(
    ctx: typer.Context,
    output: Path | None = typer.Option(
        None, "-o", "--output", help="file to write (default: vipfarm-snapshot-NODE-TIME.tar.gz)"
    ),
    as_json: bool = JSON,
    farm: str | None = FARM,
) -> None:
    """Write a support bundle (tar.gz): configuration without secrets, logs, ruleset, state."""
    target = target_of(ctx)
    if target is None:
        data = base64.b64decode(local_call(farm, "snapshot", timeout=120)["tar_gz_base64"])
        where = "local"
    else:
        with api_client(target, timeout=120) as client:
            data = client.get_bytes("/api/v1/snapshot")
        where = target.url.split("://", 1)[1].replace(":", "_").replace("/", "")
    if output is None:
        output = Path(f"vipfarm-snapshot-{where}-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror}", EXIT_USAGE)
    if as_json:
        print_json({"path": str(output), "bytes": len(data)})
    else:
        typer.echo(f"snapshot written to {output} ({len(data)} bytes)")
