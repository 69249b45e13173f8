"""The fast path of `vipfarm state` (vipfarm.cli.local) prints what the typer path prints.

The typer path validates the daemon's answer with `NodeStatus` and prints its dump; the fast path
checks the answer against its own copy of the model's shape and prints it without typer,
pydantic or rich. For the same answers both must print the same bytes, as a table (drawn by rich,
or without rich when rich would draw it plainly) and as JSON; and an answer of another shape
must leave the fast path, never be guessed at.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from typer.testing import CliRunner

from vipfarm.api.models import FarmNode, NodeProcesses, NodeStatus
from vipfarm.cli import local
from vipfarm.cli.commands import build_app
from vipfarm.node import control


def farm_node(name: str, **kw: Any) -> dict[str, Any]:
    node = {
        "node": name,
        "state": "UP",
        "share": 33.33,
        "alive": True,
        "incarnation": 1764633600123,
        "weight": 1,
        "heartbeat_age_ms": {"lan": 12.4, "hb2": 13.0},
        "config_version": 3,
    }
    node.update(kw)
    return node


def answer(**kw: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "farm_name": "web",
        "node": "node1",
        "state": "UP",
        "share": 33.34,
        "app": "running",
        "owned": [0, 3, 6],
        "split_brain": False,
        "drops": {"bad_mac": 2},
        "counters": {"heartbeats_sent": 812},
        "config_version": 3,
        "config_digest": "a1b2c3d4",
        "farm": [
            farm_node("node1", heartbeat_age_ms={}, share=33.34),
            farm_node("node2"),
            farm_node("node3", alive=False, state="STOP", share=0.0, config_version=None),
        ],
        "processes": {
            "manager_pid": 4242,
            "pulse_pid": 4243,
            "pulse_answered": True,
            "pulse_priority": "rr:10",
        },
    }
    st.update(kw)
    return st


def _pulse_silent() -> dict[str, Any]:
    st = answer()
    st["processes"]["pulse_answered"] = False
    return st


def _pulse_never() -> dict[str, Any]:
    st = _pulse_silent()
    st["processes"]["pulse_pid"] = None
    return st


def _newer_daemon() -> dict[str, Any]:
    # Keys a newer daemon may add, a share sent as a whole number, optional keys left out.
    st = answer(share=50, future_key={"x": 1})
    st["farm"][1]["future"] = True
    del st["farm"][1]["config_version"]
    del st["processes"]["pulse_priority"]
    return st


ANSWERS = {
    "all_up": answer(),
    "pulse_silent": _pulse_silent(),
    "pulse_never": _pulse_never(),
    "no_processes": {k: v for k, v in answer().items() if k != "processes"},
    "newer_daemon": _newer_daemon(),
    "long_names": answer(
        node="n" * 63,
        farm=[farm_node("n" * 63, heartbeat_age_ms={"net-with-a-long-name": None})],
    ),
    "odd_characters": answer(app="failed: [bold]exit 1[/] :smile: \\ done"),
    "not_ascii": answer(app="démarré ✓"),
    "alone": answer(farm=[farm_node("node1", heartbeat_age_ms={})]),
}


def fields_of(model: type[BaseModel]) -> list[tuple[str, object]]:
    return [
        (name, local._REQUIRED if f.default is PydanticUndefined else f.default)
        for name, f in model.model_fields.items()
    ]


def test_the_fast_paths_shape_is_the_models() -> None:
    models: dict[str, type[BaseModel]] = {
        "NodeStatus": NodeStatus,
        "FarmNode": FarmNode,
        "NodeProcesses": NodeProcesses,
    }
    for name, fields in local.status_fields().items():
        assert [(f, default) for f, _, default in fields] == fields_of(models[name]), name


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_the_answer_is_read_as_the_model_reads_it(name: str) -> None:
    raw = copy.deepcopy(ANSWERS[name])
    assert local.node_status(raw) == NodeStatus.model_validate(raw).model_dump(mode="json")
    assert raw == ANSWERS[name]  # the answer itself is left alone


@pytest.mark.parametrize(
    "change",
    [
        {"config_version": "3"},
        {"share": "33"},
        {"split_brain": 0},
        {"owned": [1, True]},
        {"farm": [{"node": "node1"}]},
        {"processes": {"manager_pid": 1}},
        {"drops": {"x": 1.5}},
        {"farm": "node1"},
    ],
    ids=str,
)
def test_an_answer_of_another_shape_is_left_to_the_model(change: dict[str, Any]) -> None:
    assert local.node_status(answer(**change)) is None
    missing = answer()
    del missing["config_digest"]
    assert local.node_status(missing) is None
    assert local.node_status(["not", "a", "dict"]) is None


def typer_path(args: list[str], raw: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(control, "resolve_farm", lambda farm: farm or "web")
    monkeypatch.setattr(control, "call", lambda farm, cmd, args=None, timeout=10: raw)
    result = CliRunner().invoke(build_app("state"), ["state", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def fast_path(args: list[str], raw: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(control, "resolve_farm", lambda farm: farm or "web")
    monkeypatch.setattr(control, "call", lambda farm, cmd, args=None, timeout=10: raw)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert local.fast_state(args) == 0
    return out.getvalue()


@pytest.mark.parametrize("columns", ["200", "100", "60"])
@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_the_fast_path_prints_what_the_typer_path_prints(
    name: str, columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    raw = ANSWERS[name]
    for args in (["--farm", "web"], ["--json"], ["--json", "--farm=web"]):
        assert fast_path(args, raw, monkeypatch) == typer_path(args, raw, monkeypatch), args
    as_json = json.loads(fast_path(["--json"], raw, monkeypatch))
    assert as_json == NodeStatus.model_validate(raw).model_dump(mode="json")


def old_rich_table(lines: list[str], rows: list[tuple[str, ...]], width: int) -> str:
    """What the typer path printed before the fast path existed: rich, reading markup."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=width)
    for line in lines:
        console.print(line, highlight=False)
    table = Table()
    for col in local.COLUMNS:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return out.getvalue()


def rich_path(st: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """`print_status_table` made to draw with rich."""
    out = io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(local, "plain_table", lambda *args: None)
        m.setattr("sys.stdout", out)
        local.print_status_table(st)
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_the_plain_table_is_richs_table(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    st = local.node_status(ANSWERS[name])
    assert st is not None
    lines, rows = local.status_lines(st)
    natural = sum(max(len(c) for c in col) + 3 for col in zip(local.COLUMNS, *rows, strict=True))
    natural += 1
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    # From just below the table's width, where rich starts to squeeze it, to beyond every line.
    plain_widths = []
    for width in range(natural - 1, max(natural, *map(len, lines)) + 3):
        monkeypatch.setenv("COLUMNS", str(width))
        plain = local.plain_table(lines, rows, io.StringIO())
        if plain is None:
            assert width < natural or name == "not_ascii", width
            continue
        plain_widths.append(width)
        assert plain == rich_path(st, monkeypatch), width
        if name != "odd_characters":  # which the markup of old read as styles and an emoji
            assert plain == old_rich_table(lines, rows, width), width
    assert name == "not_ascii" or plain_widths[0] == natural


TEXTS = [
    "farm vqe4488b, node node1: UP 33.59% (application healthy), configuration version 0",
    "warning: the pulse did not answer: state and farm are its last answer (pulse pid 4243)",
    "a " + "x" * 30 + " b  c   " + "y" * 7 + "  ",
    "  leading blanks, then words",
    "z" * 50,
]


@pytest.mark.parametrize("text", TEXTS)
def test_wrap_is_richs(text: str) -> None:
    from rich.console import Console
    from rich.text import Text

    for width in range(1, len(text) + 3):
        out = io.StringIO()
        Console(file=out, width=width).print(Text(text), highlight=False)
        assert "".join(line + "\n" for line in local.wrap(text, width)) == out.getvalue(), width


def test_rich_is_used_for_a_terminal_and_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    lines, rows = local.status_lines(answer())
    monkeypatch.setenv("COLUMNS", "200")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for var in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    assert local.plain_table(lines, rows, Tty()) is None
    assert local.plain_table(lines, rows, io.StringIO()) is not None
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert local.plain_table(lines, rows, io.StringIO()) is None
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # rich reads it before FORCE_COLOR
    assert local.plain_table(lines, rows, io.StringIO()) is not None
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert local.plain_table(lines, rows, io.StringIO()) is None


def test_a_silent_pulse_is_shown() -> None:
    lines, _ = local.status_lines(_pulse_silent())
    assert lines[1] == (
        "warning: the pulse did not answer: state and farm are its last answer (pulse pid 4243)"
    )
    assert local.status_lines(answer())[0] == [
        "farm web, node node1: UP 33.34% (application running), configuration version 3"
    ]


def test_a_prefilter_that_could_not_attach_is_shown() -> None:
    off = {"on": False, "off_because": "prefilter not attached to eth0: no tcx", "dropped": 0}
    lines, _ = local.status_lines(answer(prefilter=off))
    assert lines[1] == (
        "prefilter off (nftables alone drops other nodes' frames): prefilter not attached to "
        "eth0: no tcx"
    )
    for quiet in ({"on": True, "kept": 3, "dropped": 9}, {**off, "off_because": "turned off"}):
        assert len(local.status_lines(answer(prefilter=quiet))[0]) == 1


def test_buckets_given_away_but_still_serving_are_shown() -> None:
    assert len(local.status_lines(answer(kept=[0, 3, 6]))[0]) == 1  # owned only: nothing to say
    lines, _ = local.status_lines(answer(kept=[0, 1, 3, 4, 6]))
    assert lines[1] == "still serving connections in 2 bucket(s) given away: 1, 4"
    many = list(range(100, 112))
    lines, _ = local.status_lines(answer(kept=many))
    assert lines[1].endswith(": 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 2 more")
    st = local.node_status(answer(kept=many))
    assert st is not None and st["kept"] == many


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        ([], (False, None)),
        (["--json"], (True, None)),
        (["--farm", "web", "--json"], (True, "web")),
        (["--farm=web"], (False, "web")),
        (["--help"], None),
        (["--farm"], None),
        (["--farm", "--json"], None),
        (["--farm="], None),
        (["--json", "--json"], None),
        (["--farm", "a", "--farm", "b"], None),
        (["extra"], None),
        (["-h"], None),
    ],
)
def test_state_options(argv: list[str], parsed: tuple[bool, str | None] | None) -> None:
    assert local.state_options(argv) == parsed


def test_an_odd_answer_goes_to_the_typer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "resolve_farm", lambda farm: "web")
    monkeypatch.setattr(control, "call", lambda *a, **kw: answer(config_version="3"))
    assert local.fast_state([]) is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (control.DaemonUnreachable("no vipfarm daemon of farm 'web' runs here"), 3),
        (control.FarmChoiceError("several farms run here (a, b): choose one with --farm"), 2),
        (control.ControlError("the control socket is served by uid 65534"), 1),
    ],
)
def test_errors_read_as_the_typer_paths(
    error: control.ControlError, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: Any, **kw: Any) -> Any:
        raise error

    monkeypatch.setattr(control, "resolve_farm", lambda farm: "web")
    monkeypatch.setattr(control, "call", fails)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert local.fast_state([]) == code
    typer_out = CliRunner().invoke(build_app("state"), ["state"])
    assert typer_out.exit_code == code
    assert err.getvalue() == typer_out.stderr == f"error: {error}\n"
