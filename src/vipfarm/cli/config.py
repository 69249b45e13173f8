"""`vipfarm config`: validate a farm file without applying anything.

`check` loads the file exactly as the daemon will (including the module and every node's macro
substitution), prints a short summary and exits 0, or prints every problem and exits 2. It only
reads: the file, the key file, the module directory and, to say which node this host is, the
addresses of the local interfaces.

Whatever the file holds, the answer is exit 0 or 2 and no traceback: the loader raises only
`ConfigError` (see `vipfarm.config.loading`), text from the file is never read as rich markup,
and an unforeseen exception (a bug) is still reported as a problem with exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from vipfarm.config.schema import FarmConfig, NodeSection

# The parser and rich are imported by `check`: the whole CLI's help (and `config deploy`, which
# shares this group) should not pay for them.

app = typer.Typer(help="Farm configuration files.", no_args_is_help=True)

EXIT_INVALID = 2


@app.callback()
def group() -> None:
    """Farm configuration files."""


@app.command()
def check(
    file: Path = typer.Argument(..., help="farm configuration (TOML)"),
    node: str | None = typer.Option(
        None, "--node", help="check as this node (default: the node owning a local address)"
    ),
) -> None:
    """Validate FILE: print a summary and exit 0, or every problem and exit 2."""
    from rich.console import Console
    from rich.markup import escape

    from vipfarm.config.loading import load_config
    from vipfarm.config.problems import ConfigError, Problem, printable

    out, err = Console(), Console(stderr=True)
    try:
        cfg = load_config(file)
        me = _this_node(cfg, node)
        _summary(out, file, cfg, me)
    except Exception as exc:
        if not isinstance(exc, ConfigError):  # a bug: still an answer, not a traceback
            why = (
                f"internal error ({type(exc).__name__}: {exc}): a bug in vipfarm, please report it"
            )
            exc = ConfigError(str(file), [Problem("", why)])
        err.print(f"[bold red]{escape(exc.source)}: invalid[/]", highlight=False, soft_wrap=True)
        for p in exc.problems:
            err.print(f"  {printable(str(p))}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None


def _this_node(cfg: FarmConfig, name: str | None) -> NodeSection | None:
    from vipfarm.config.problems import ConfigError
    from vipfarm.node.host import local_addresses

    if name is not None:
        return cfg.find_self(name)
    try:
        return cfg.find_self(local_addresses=local_addresses())
    except (ConfigError, OSError):
        return None  # checking on a workstation is fine: the file itself is valid


def _summary(out: Console, file: Path, cfg: FarmConfig, me: NodeSection | None) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    t = cfg.timing
    out.print(
        f"[green]{escape(str(file))}: valid[/] - farm [bold]{cfg.farm.name}[/], "
        f"{len(cfg.nodes)} nodes, "
        f"{cfg.farm.buckets} buckets, interval {t.interval_ms} ms, lease {t.lease_ms} ms, "
        f"dead after {t.dead_after_ms} ms",
        highlight=False,
        soft_wrap=True,
    )
    nodes = Table("node", "weight", "interface", *(n.name for n in cfg.networks), box=None)
    for n in cfg.nodes:
        mark = " (this host)" if me is not None and n.name == me.name else ""
        addrs = [str(n.address[net.name]) for net in cfg.networks]
        nodes.add_row(*(Text(c) for c in (n.name + mark, str(n.weight), n.interface, *addrs)))
    out.print(nodes)
    rules = Table("vip", "proto", "ports", "affinity", box=None)
    for r in (s.rule for s in cfg.rules):
        affinity = str(r.affinity)
        if r.affinity == "client-subnet":
            affinity += f" /{r.prefix4 if r.vip.version == 4 else r.prefix6}"
        rules.add_row(*(Text(c) for c in (str(r.vip), str(r.proto), r.ports_text, affinity)))
    out.print(rules)
    app_spec = cfg.app_spec(me or cfg.nodes[0])
    checkers = ", ".join(c.label for c in app_spec.checkers) or "none"
    out.print(
        f"module [bold]{escape(app_spec.module)}[/] ({escape(str(app_spec.directory))}); "
        f"checkers: {escape(checkers)}; "
        f"restart at most {app_spec.restart.max} times in {app_spec.restart.within_s:g} s",
        highlight=False,
        soft_wrap=True,
    )
