"""The CLI imports only what the command asked for (vipfarm.cli): behaviour, not timing.

A node command runs `python -X importtime -m vipfarm ...` in a fresh interpreter, whose import
log names every module imported; none of the heavy areas may appear, and `vipfarm state` (the
fast path of vipfarm.cli.local) imports neither typer nor pydantic nor rich. The command-name parser
is checked against the real root options, so a new root option with a value cannot silently
make `vipfarm --new-option X state` build the whole app.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import vipfarm.cli
from vipfarm.cli import VALUE_OPTIONS, command_name
from vipfarm.cli.commands import COMMANDS, build_app

SRC = Path(vipfarm.cli.__file__).resolve().parents[2]
# The lab, the bench, the simulator, the API server and plotting: none is needed to talk to the
# local daemon or to check a file.
HEAVY = (
    "vipfarm.lab",
    "vipfarm.bench",
    "vipfarm.membership.sim",
    "vipfarm.node.daemon",
    "fastapi",
    "uvicorn",
    "matplotlib",
)


def imported(*args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "VIPFARM_TOKEN_FILE": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vipfarm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode in (0, 2, 3), proc.stderr  # help, usage error, or no daemon here
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert lines, "no -X importtime output"
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(HEAVY))


@pytest.mark.parametrize(
    "args",
    [
        ("state", "--help"),
        ("state", "--farm", "nosuchfarm"),  # the whole local path, up to "no daemon here"
        ("state", "--json", "--farm", "nosuchfarm"),
        ("--node", "127.0.0.1:1", "state", "--help"),
        ("start", "--help"),
        ("stop", "--help"),
        ("log", "--help"),
        ("config", "check", "--help"),
    ],
    ids=" ".join,
)
def test_node_commands_import_no_heavy_module(args: tuple[str, ...]) -> None:
    modules = imported(*args)
    assert "vipfarm.cli" in modules
    assert heavy_in(modules) == []
    if args[0] != "--node":  # the local daemon is reached over its socket, not HTTP
        assert "httpx" not in modules


# What `vipfarm state` does without: the typer app, the API models, the table library.
CLI_FRAMEWORK = ("typer", "click", "pydantic", "pydantic_core", "rich", "vipfarm.api", "asyncio")


@pytest.mark.parametrize(
    "args",
    [
        ("state", "--farm", "nosuchfarm"),
        ("state", "--json", "--farm", "nosuchfarm"),
        ("state", "--farm=nosuchfarm", "--json"),
        ("state", "--farm", "Not/A/Farm"),
    ],
    ids=" ".join,
)
def test_state_imports_no_cli_framework(args: tuple[str, ...]) -> None:
    modules = imported(*args)
    assert "vipfarm.cli.local" in modules and "vipfarm.node.control" in modules
    assert sorted(m for m in modules if m.startswith(CLI_FRAMEWORK)) == []


def test_state_with_other_options_is_typers() -> None:
    assert "typer" in imported("state", "--help")
    assert "typer" in imported("--port", "9010", "state", "--farm", "nosuchfarm")


def test_config_check_of_a_file_imports_no_heavy_module(tmp_path: Path) -> None:
    # The parser itself runs (and refuses the file): still nothing heavy.
    bad = tmp_path / "farm.toml"
    bad.write_text("[farm]\nname = 1\n")
    modules = imported("config", "check", str(bad))
    assert "vipfarm.config" in modules
    assert heavy_in(modules) == []


def test_root_help_still_builds_everything() -> None:
    # Not a speed goal: help lists every command, so every command module is loaded.
    assert "vipfarm.cli.sim" in imported("--help")


def test_value_options_match_the_root_callback() -> None:
    root = typer.main.get_command(build_app("state"))
    takes_value = {o for p in root.params if not getattr(p, "is_flag", False) for o in p.opts}
    assert takes_value == VALUE_OPTIONS


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        ([], None),
        (["--help"], None),
        (["state"], "state"),
        (["state", "--help"], "state"),
        (["--node", "state", "stop"], "stop"),  # a host called "state"
        (["--node=h", "--port", "9", "--insecure", "log", "-f"], "log"),
        (["--token-file", "t", "--ca-file", "c", "config", "check", "x"], "config"),
        (["--", "state"], "state"),
        (["nosuch"], "nosuch"),
        (["--node"], None),
    ],
)
def test_command_name(argv: list[str], name: str | None) -> None:
    assert command_name(argv) == name


def test_each_partial_app_has_its_command_alone() -> None:
    full = typer.main.get_command(vipfarm.cli.app)
    assert isinstance(full, typer.core.TyperGroup)
    assert set(full.commands) == set(COMMANDS)
    for name in COMMANDS:
        one = typer.main.get_command(build_app(name))
        assert isinstance(one, typer.core.TyperGroup)
        assert list(one.commands) == [name]


def test_config_group_keeps_its_three_commands_however_often_built() -> None:
    for _ in range(2):
        out = CliRunner().invoke(build_app("config"), ["config", "--help"])
        assert out.exit_code == 0, out.output
        assert all(c in out.output for c in ("check", "deploy", "get"))


def test_unknown_command_is_typers_error() -> None:
    out = CliRunner().invoke(build_app(command_name(["nosuch"])), ["nosuch"])
    assert out.exit_code == 2 and "No such command" in out.output
