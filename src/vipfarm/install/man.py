"""Man pages generated from the CLI's own help: `vipfarm(1)` and `vipfarm-COMMAND(1)`.

Theory of operation
-------------------
The help of every command already says what it does and what each option means (typer builds a
click command tree from the function signatures). `man_pages` walks that tree and writes one
roff page per top-level command, with a section per subcommand for groups (`vipfarm-config(1)`
holds check, deploy and get), plus `vipfarm(1)` for the root options and the list of commands.
The pages are generated, never edited: the Debian package build runs this, so they cannot
drift from the program. Only the man(7) macros every man implementation knows are used.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import typer

# typer (0.29) carries its own copy of click; its classes are reached through typer, duck-typed:
# a command has get_params/collect_usage_pieces/get_short_help_str, a group list_commands too.
Command = Any

__all__ = ["man_pages", "roff_escape"]


def roff_escape(text: str) -> str:
    """Text safe in a roff body: backslashes and hyphens escaped, no line starting with a control
    character (`.` or `'`) that roff would take for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line) if line[:1] in (".", "'") else line for line in text.split("\n")
    )


def _paragraphs(text: str) -> str:
    # click's help keeps the docstring's paragraphs; one .PP between them, lines joined.
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n.PP\n".join(roff_escape(p) for p in paras)


def _options(ctx: typer.Context, cmd: Command) -> list[str]:
    out: list[str] = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or getattr(param, "hidden", False):
            continue
        names, help_text = record
        out += [".TP", f"\\fB{roff_escape(names)}\\fR", roff_escape(" ".join(help_text.split()))]
    return out


def _usage(ctx: typer.Context, cmd: Command) -> str:
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    return f"\\fB{roff_escape(ctx.command_path)}\\fR {roff_escape(pieces)}"


def _header(name: str, summary: str, version: str, date: str) -> list[str]:
    return [
        f'.TH "{name.upper()}" "1" "{date}" "vipfarm {version}" "vipfarm manual"',
        ".SH NAME",
        f"{roff_escape(name)} \\- {roff_escape(summary)}",
    ]


def _command_body(ctx: typer.Context, cmd: Command, level: str = ".SH") -> list[str]:
    lines = [level + " SYNOPSIS" if level == ".SH" else level + f" {roff_escape(cmd.name or '')}"]
    lines += [_usage(ctx, cmd)]
    if cmd.help:
        lines += [".PP", _paragraphs(cmd.help)]
    opts = _options(ctx, cmd)
    if opts:
        lines += [".SH OPTIONS" if level == ".SH" else ".PP\nOptions:", *opts]
    return lines


def man_pages(root: Command, *, version: str, date: datetime.date | None = None) -> dict[str, str]:
    """File name (`vipfarm.1`, `vipfarm-config.1`, ...) -> roff text, for the whole CLI."""
    day = (date or datetime.date.today()).isoformat()
    name = root.name or "vipfarm"
    root_ctx = typer.Context(root, info_name=name)
    pages: dict[str, str] = {}
    commands = sorted(root.list_commands(root_ctx))
    lines = _header(name, (root.help or "").strip().split("\n")[0], version, day)
    lines += [".SH SYNOPSIS", f"\\fB{name}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]..."]
    lines += [".SH DESCRIPTION", _paragraphs(root.help or "")]
    lines += [".SH OPTIONS", *_options(root_ctx, root), ".SH COMMANDS"]
    for c in commands:
        sub = root.get_command(root_ctx, c)
        if sub is not None:
            lines += [".TP", f"\\fB{name} {c}\\fR", roff_escape(sub.get_short_help_str(80))]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{name}\\-{c}\\fR(1)" for c in commands)]
    pages[f"{name}.1"] = "\n".join(lines) + "\n"
    for c in commands:
        cmd = root.get_command(root_ctx, c)
        if cmd is None:
            continue
        ctx = typer.Context(cmd, info_name=c, parent=root_ctx)
        lines = _header(f"{name}-{c}", cmd.get_short_help_str(80), version, day)
        lines += _command_body(ctx, cmd)
        if hasattr(cmd, "list_commands"):
            lines += [".SH COMMANDS"]
            for s in sorted(cmd.list_commands(ctx)):
                subcmd = cmd.get_command(ctx, s)
                if subcmd is None:
                    continue
                sctx = typer.Context(subcmd, info_name=s, parent=ctx)
                lines += _command_body(sctx, subcmd, level=".SS")
        lines += [".SH SEE ALSO", f"\\fB{name}\\fR(1)"]
        pages[f"{name}-{c}.1"] = "\n".join(lines) + "\n"
    return pages


def main(argv: list[str] | None = None) -> None:
    """`python -m vipfarm.install.man DIR`: write every page into DIR (the package build)."""
    import os
    import sys
    from pathlib import Path

    from vipfarm import __version__
    from vipfarm.cli.commands import build_app

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m vipfarm.install.man DIR")
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    root = typer.main.get_command(build_app())
    # Reproducible builds: the date of the sources (SOURCE_DATE_EPOCH), when the build gives one.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    day = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date() if epoch else None
    for fname, text in man_pages(root, version=__version__, date=day).items():
        (out / fname).write_text(text)


if __name__ == "__main__":
    main()
