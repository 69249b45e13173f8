"""The `vipfarm` command line: `main()`, the entry point, and nothing it does not need at once.

Theory of operation: a command must answer at once, and the typer app alone (typer imports
pydantic) costs a tenth of a second before any work is done. So this package imports nothing
heavy: `main()` first offers the command line to the fast path of `vipfarm state`
(`vipfarm.cli.local.fast_state`: no typer, no pydantic, no rich unless it must draw for a
terminal), which takes only `state [--json] [--farm NAME]`. Everything else, and whatever the
fast path declines, goes to the typer app of `vipfarm.cli.commands`, built with only the command
asked for (`command_name`: the first argument that is neither a root option nor an option's
value).

`app` (the whole typer app, built on first access) stays importable for tests and tools:
`from vipfarm.cli import app`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

# Root options that take a value (see `remote.root_options`): the word after them is that value,
# not the command. tests/unit/test_cli_fast.py checks this against the callback's parameters.
VALUE_OPTIONS = frozenset({"--node", "--token-file", "--port", "--ca-file"})


def command_name(argv: Sequence[str]) -> str | None:
    """The command `argv` (without the program name) asks for: its first word that is neither a
    root option nor an option's value. None when there is none, or help is asked at the root."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if word == "--help":
            return None
        if word in VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


_full_app: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    # `app` on first access only, so that importing this package costs nothing (PEP 562).
    global _full_app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _full_app is None:
        from vipfarm.cli.commands import build_app

        _full_app = build_app()
    return _full_app


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        # Before any app is built: what an operator (or a package check) asks first, at once.
        from vipfarm import __version__

        print(f"vipfarm {__version__}")
        return
    if argv[:1] == ["state"]:
        from vipfarm.cli.local import fast_state

        code = fast_state(argv[1:])
        if code is not None:
            raise SystemExit(code)
    from vipfarm.cli.commands import build_app

    build_app(command_name(argv))()
