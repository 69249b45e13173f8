"""`vipfarm chaos`: its help lists every fault kind, and the report table shows the new columns
(the lab itself is exercised in tests/linux/test_chaos_faults.py and tests/e2e/test_chaos.py)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import vipfarm.cli.chaos as chaos_cli
from vipfarm.lab.chaos import FAULT_HELP, FAULTS, ChaosReport, FaultResult


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("chaos")(chaos_cli.chaos)
    app.command("other")(lambda: None)  # two commands: `chaos` stays a subcommand
    return app


def test_help_documents_every_fault_kind_and_the_loss_option() -> None:
    out = CliRunner().invoke(_app(), ["chaos", "--help"], terminal_width=200).output
    assert set(FAULTS) == set(FAULT_HELP) >= {"cpu_hog", "cpu_hog_all", "heartbeat_delay"}
    for kind in FAULTS:
        assert f"{kind}:" in out
    assert "--loss" in out


def test_the_report_shows_false_failovers_and_nodes_that_left_the_farm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    def fake(duration: float, seed: int, nodes: int, **kw: Any) -> ChaosReport:
        seen.update(kw)
        fault = FaultResult("app_crash", "node2", 1.0, None, 812.0, 40, {}, 0, ["node2"])
        return ChaosReport("vc1", seed, duration, nodes, loss=kw["loss"], faults=[fault])

    monkeypatch.setenv("COLUMNS", "200")  # the table on one line per row
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(chaos_cli, "run_chaos", fake)
    result = CliRunner().invoke(
        _app(), ["chaos", "--duration", "5", "--loss", "0.05", "--faults", "app_crash"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["loss"] == 0.05 and seen["faults"] == ("app_crash",)
    assert "false failovers" in result.output and "left the farm" in result.output
    row = next(line for line in result.output.splitlines() if "app_crash" in line)
    assert row.count("node2") == 2  # the fault's node, and the node that left the farm
    bad = CliRunner().invoke(_app(), ["chaos", "--loss", "1.5"])
    assert bad.exit_code == 2 and "--loss 1.5 is out of range" in bad.output
