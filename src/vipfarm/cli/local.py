"""The CLI's side of this host's daemon, without typer, pydantic or rich: the exit codes, the one
local request every node command makes, and `vipfarm state` itself.

Theory of operation
-------------------
`vipfarm state` is what an operator types most, and nearly all its time used to be start-up:
typer imports pydantic (its adapters), then the API models (pydantic again) and rich for the
table, about half a second on a loaded node when the daemon answers in 10 ms. So `vipfarm.cli.
main()` tries `fast_state` first: for `state [--json] [--farm NAME]` and nothing else (any root
option, `--node` above all, `--help` or anything unexpected goes to the typer app, which
behaves as before) it asks the control socket (`vipfarm.node.control`: blocking sockets, no
asyncio), checks the answer against the shape of `NodeStatus` (`status_fields`, which a unit
test holds equal to the model) and prints it.

Output is the typer path's, byte for byte, because both paths print with the same functions:
`print_status_json` (the model's JSON dump: its fields in order, defaults filled in, unknown
keys of a newer daemon dropped, as `NodeStatus.model_dump` does) and `print_status_table`. The
table is rich's; when rich would print it without styling and without squeezing it (not a
terminal as rich decides it, a UTF-8 stream, every text printable ASCII, the table no wider
than the console as rich measures it), `plain_table` draws the same characters without
importing rich, wrapping the lines above the table as rich does, and a unit test compares the
two at every width from the table's own. Names go to rich as `Text`, never as markup, so a
name is printed as it is. A pulse that did not answer the request (`processes.pulse_answered`
false) gets a warning line under the first.

An answer that does not have exactly the expected shape is not guessed at: `fast_state` gives
up and the typer path asks again and validates it with the model, as before. Errors print as
the typer path prints them (`error: ...` on stderr) with the same exit codes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Failure(Exception):
    """A request that failed, with the text and exit code the CLI ends with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def ask(
    farm: str | None, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """One request to this host's daemon; its errors become `Failure`s with exit codes: no daemon
    answers 3, a farm to choose 2, anything the daemon refused 1."""
    from vipfarm.node import control

    try:
        return control.call(control.resolve_farm(farm), cmd, args, timeout=timeout)
    except control.DaemonUnreachable as e:
        raise Failure(str(e), EXIT_UNREACHABLE) from None
    except control.FarmChoiceError as e:
        raise Failure(str(e), EXIT_USAGE) from None
    except control.ControlError as e:
        raise Failure(str(e), EXIT_FAILED) from None


# ------------------------------------------------------------------ the answer's shape


class _Odd(Exception):
    """An answer that is not exactly what the model describes: let the model judge it."""


_REQUIRED = object()
Convert = Callable[[Any], Any]


def _str(v: Any) -> str:
    if type(v) is not str:
        raise _Odd
    return v


def _int(v: Any) -> int:
    if type(v) is not int:
        raise _Odd
    return v


def _float(v: Any) -> float:
    if type(v) not in (int, float):
        raise _Odd
    return float(v)


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Odd
    return bool(v)


def _as_is(v: Any) -> Any:
    return v


def _optional(conv: Convert) -> Convert:
    return lambda v: None if v is None else conv(v)


def _list(conv: Convert) -> Convert:
    def convert(v: Any) -> list[Any]:
        if type(v) is not list:
            raise _Odd
        return [conv(x) for x in v]

    return convert


def _dict(conv: Convert) -> Convert:
    def convert(v: Any) -> dict[str, Any]:
        if type(v) is not dict:
            raise _Odd
        return {_str(k): conv(x) for k, x in v.items()}

    return convert


Fields = tuple[tuple[str, Convert, object], ...]


def _model(fields: Fields) -> Convert:
    def convert(v: Any) -> dict[str, Any]:
        if type(v) is not dict:
            raise _Odd
        out = {}
        for name, conv, default in fields:
            if name in v:
                out[name] = conv(v[name])
            elif default is _REQUIRED:
                raise _Odd
            else:
                out[name] = default
        return out

    return convert


# vipfarm.api.models: FarmNode, NodeProcesses, NodeStatus, field by field, in order (their
# defaults are all None). tests/unit/test_cli_local.py holds these equal to the models.
FARM_NODE: Fields = (
    ("node", _str, _REQUIRED),
    ("state", _str, _REQUIRED),
    ("share", _float, _REQUIRED),
    ("alive", _bool, _REQUIRED),
    ("incarnation", _optional(_int), _REQUIRED),
    ("weight", _int, _REQUIRED),
    ("heartbeat_age_ms", _dict(_optional(_float)), _REQUIRED),
    ("config_version", _optional(_int), None),
)
NODE_PROCESSES: Fields = (
    ("manager_pid", _int, _REQUIRED),
    ("pulse_pid", _optional(_int), _REQUIRED),
    ("pulse_answered", _bool, _REQUIRED),
    ("pulse_priority", _optional(_str), None),
    ("pulse_timer_late_ms", _optional(_dict(_float)), None),
)
NODE_STATUS: Fields = (
    ("farm_name", _str, _REQUIRED),
    ("node", _str, _REQUIRED),
    ("state", _str, _REQUIRED),
    ("share", _float, _REQUIRED),
    ("app", _str, _REQUIRED),
    ("owned", _list(_int), _REQUIRED),
    ("kept", _optional(_list(_int)), None),
    ("split_brain", _bool, _REQUIRED),
    ("drops", _dict(_int), _REQUIRED),
    ("counters", _dict(_int), _REQUIRED),
    ("config_version", _int, _REQUIRED),
    ("config_digest", _str, _REQUIRED),
    ("farm", _list(_model(FARM_NODE)), _REQUIRED),
    ("processes", _optional(_model(NODE_PROCESSES)), None),
    ("delivery", _optional(_dict(_as_is)), None),
    ("prefilter", _optional(_dict(_as_is)), None),
)
_status = _model(NODE_STATUS)


def status_fields() -> dict[str, Fields]:
    return {"NodeStatus": NODE_STATUS, "FarmNode": FARM_NODE, "NodeProcesses": NODE_PROCESSES}


def node_status(answer: Any) -> dict[str, Any] | None:
    """The answer as `NodeStatus.model_dump(mode="json")` would give it, or None when it is not
    plainly one (the model decides then)."""
    try:
        result: dict[str, Any] = _status(answer)
    except _Odd:
        return None
    return result


# ------------------------------------------------------------------ printing


def print_status_json(status: dict[str, Any], out: IO[str] | None = None) -> None:
    (out or sys.stdout).write(json.dumps(status, indent=2) + "\n")


LINGERING_SHOWN = 10
COLUMNS = ("node", "state", "share", "weight", "alive", "last heartbeat (ms)", "config")


def _title(st: dict[str, Any]) -> tuple[str, str, str]:
    """The first line: before the farm's name, between it and the node's, after."""
    rest = (
        f": {st['state']} {st['share']:g}% (application {st['app']}), "
        f"configuration version {st['config_version']}"
    )
    return st["farm_name"], st["node"], rest


def status_lines(st: dict[str, Any]) -> tuple[list[str], list[tuple[str, ...]]]:
    """The lines above the table and the table's rows, as text."""
    farm, node, rest = _title(st)
    lines = [f"farm {farm}, node {node}{rest}"]
    procs = st.get("processes")
    if procs is not None and not procs["pulse_answered"]:
        pid = procs["pulse_pid"]
        lines.append(
            "warning: the pulse did not answer: state and farm are its last answer"
            + (" (it has not answered yet)" if pid is None else f" (pulse pid {pid})")
        )
    delivery = st.get("delivery")
    if delivery is not None and delivery.get("mode") in ("directed", "auto"):
        entries = ", ".join(f"{v} {n or '-'}" for v, n in delivery.get("entries", {}).items())
        mode = delivery["mode"]
        if mode == "auto":
            deaf = ", ".join(delivery.get("deaf_nodes", ())) or "none"
            mode = f"auto (answers {delivery.get('answers')}; missing probes: {deaf})"
        lines.append(f"delivery {mode}, entries: {entries or '-'}")
    pf = st.get("prefilter") or {}
    if pf.get("on") is False and pf.get("off_because") not in (None, "turned off"):
        lines.append(
            f"prefilter off (nftables alone drops other nodes' frames): {pf['off_because']}"
        )
    lingering = sorted(set(st.get("kept") or ()) - set(st["owned"]))
    if lingering:
        shown = ", ".join(map(str, lingering[:LINGERING_SHOWN]))
        hidden = len(lingering) - LINGERING_SHOWN
        more = f" and {hidden} more" if hidden > 0 else ""
        lines.append(
            f"still serving connections in {len(lingering)} bucket(s) given away: {shown}{more}"
        )
    rows: list[tuple[str, ...]] = []
    for n in st["farm"]:
        ages = ", ".join(
            f"{net} {'-' if age is None else f'{age:.0f}'}"
            for net, age in n["heartbeat_age_ms"].items()
        )
        rows.append(
            (
                n["node"],
                n["state"],
                f"{n['share']:g}%",
                str(n["weight"]),
                "yes" if n["alive"] else "no",
                ages or "(self)",
                "?" if n["config_version"] is None else str(n["config_version"]),
            )
        )
    return lines, rows


def print_status_table(st: dict[str, Any]) -> None:
    """The human form of `state`: rich's rendering, drawn without rich when that is the same."""
    lines, rows = status_lines(st)
    plain = plain_table(lines, rows, sys.stdout)
    if plain is not None:
        sys.stdout.write(plain)
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: a name is printed as it is, never read as a style or an emoji code.
    console = Console()
    farm, node, rest = _title(st)
    title = Text.assemble("farm ", (farm, "bold"), ", node ", (node, "bold"), rest)
    console.print(title, highlight=False)
    for line in lines[1:]:
        console.print(Text(line), highlight=False)
    table = Table()
    for col in COLUMNS:
        table.add_column(col)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


# Characters whose width is one column: rich lays them out as plainly as `plain_table` does.
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F))


def _rich_plain_width(stream: IO[str]) -> int | None:
    """The width rich would lay out for when it would print to `stream` without styles, else None
    (rich.console.Console: is_terminal, size)."""
    env = os.environ
    if env.get("TTY_COMPATIBLE", "") == "1":
        return None
    if env.get("TTY_COMPATIBLE", "") != "0":
        force = env.get("FORCE_COLOR")
        if force is not None:
            if force != "":
                return None
        else:
            try:
                if stream.isatty():
                    return None
            except ValueError:
                pass
    if not (getattr(stream, "encoding", None) or "utf-8").lower().startswith("utf"):
        return None  # rich would draw an ASCII box
    columns = env.get("COLUMNS")
    if columns is not None and columns.isdigit():
        return int(columns) or None  # COLUMNS=0: rich's own corner case
    for fd in (0, 1, 2):
        try:
            width = os.get_terminal_size(fd).columns
        except (ValueError, OSError):
            continue
        return width or 80
    return 80


_WORD = re.compile(r"\s*\S+\s*")


def wrap(text: str, width: int) -> list[str]:
    """A line of printable ASCII as rich wraps it at `width` (rich._wrap.divide_line, then
    Text.wrap: a word keeps its trailing blanks up to the width; a word longer than the width
    is folded)."""
    breaks: list[int] = []
    offset = 0
    for match in _WORD.finditer(text):
        start, word = match.start(), match.group()
        length = len(word.rstrip())
        if width - offset >= length:
            offset += len(word)
        elif length > width:
            pieces = [word[i : i + width] for i in range(0, len(word), width)]
            for i, piece in enumerate(pieces):
                if start:
                    breaks.append(start)
                if i == len(pieces) - 1:
                    offset = len(piece)
                else:
                    start += len(piece)
        elif offset and start:
            breaks.append(start)
            offset = len(word)
    # Beyond the width a line has only its word's trailing blanks, which rich drops.
    return [text[a:b][:width] for a, b in zip([0, *breaks], [*breaks, len(text)], strict=True)]


def plain_table(
    lines: Sequence[str], rows: Sequence[tuple[str, ...]], stream: IO[str]
) -> str | None:
    """What rich prints for these lines and this table (HEAVY_HEAD box, one space of padding)
    when it prints it unstyled and unwrapped; None when it would do anything else."""
    width = _rich_plain_width(stream)
    if width is None:
        return None
    texts = [*lines, *COLUMNS, *(cell for row in rows for cell in row)]
    if not all(_PLAIN.issuperset(text) for text in texts):
        return None
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *rows, strict=True)]
    if sum(widths) + 3 * len(widths) + 1 > width:
        return None  # rich would shrink and wrap the columns: its own business

    def rule(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right + "\n"

    def row(cells: Sequence[str], bar: str) -> str:
        return (
            bar
            + bar.join(f" {c.ljust(w)} " for c, w in zip(cells, widths, strict=True))
            + bar
            + "\n"
        )

    out = [part + "\n" for line in lines for part in wrap(line, width)]
    out.append(rule("┏", "━", "┳", "┓"))
    out.append(row(COLUMNS, "┃"))
    out.append(rule("┡", "━", "╇", "┩"))
    out.extend(row(r, "│") for r in rows)
    out.append(rule("└", "─", "┴", "┘"))
    return "".join(out)


# ------------------------------------------------------------------ the fast path


def state_options(argv: Sequence[str]) -> tuple[bool, str | None] | None:
    """(--json, --farm) of `state`'s own arguments, or None for anything else."""
    as_json, farm, seen = False, None, set()
    words = iter(argv)
    for word in words:
        name, eq, value = word.partition("=")
        if name in seen:
            return None
        seen.add(name)
        if word == "--json":
            as_json = True
        elif name == "--farm":
            if not eq:
                value = next(words, "")
            if not value or value.startswith("-"):
                return None
            farm = value
        else:
            return None
    return as_json, farm


def fast_state(argv: Sequence[str]) -> int | None:
    """`vipfarm state ...` (argv: what follows `state`) done here; None to leave it to typer."""
    options = state_options(argv)
    if options is None:
        return None
    as_json, farm = options
    try:
        status = node_status(ask(farm, "farm"))
        if status is None:
            return None
        if as_json:
            print_status_json(status)
        else:
            print_status_table(status)
        sys.stdout.flush()
    except Failure as e:
        sys.stderr.write(f"error: {e.message}\n")
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")  # what click prints
        return EXIT_FAILED
    except BrokenPipeError:
        # `vipfarm state | head`: the reader went away. Quiet, and no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return EXIT_OK
