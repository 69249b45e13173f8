"""Problems of a configuration file, worded for the person who edits it.

Theory of operation
-------------------
Validation is pydantic's; this module only rewords its errors. Every error becomes a `Problem`:
the TOML key path (`node[1].address.lan`, from pydantic's location) and a message of the form
`bad value 'x': expected ...`. Pydantic's own messages are turned into the `expected ...` half
(`Input should be ...` -> `...`); an unknown key lists the keys allowed there, with the closest
one as a hint; a whole table or list is never quoted as the bad value (the path names it).

The checks of vipfarm itself raise errors of the custom type `vipfarm` through `error_at` and
`raise_errors`: the context carries the `expected` text and whether the bad value is shown.
Errors of an inner model validated on behalf of the file (a data path `Rule`, a checker) are
re-expressed at the keys of the file by `relocate`, message kept. `ConfigError` holds every
problem of one file.

The file is untrusted input and every problem quotes part of it, so `ConfigError` makes its
problems safe to print and to send as JSON: characters that are not printable (control
characters, lone surrogates from a JSON body) are shown as Python escapes, a key that is not a
bare TOML key is quoted (`module.macros."a b"`), long texts are cut, and at most `MAX_PROBLEMS`
are kept (a file of a million bad keys yields a short answer, and quickly).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from vipfarm.errors import VipfarmError

__all__ = [
    "MAX_PROBLEMS",
    "ConfigError",
    "Loc",
    "Problem",
    "error_at",
    "problems_of",
    "raise_errors",
    "relocate",
    "under",
]

Loc = tuple[str | int, ...]

MAX_PROBLEMS = 50
_MAX_KEY = 64
_MAX_TEXT = 1000
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def printable(text: str, limit: int = _MAX_TEXT) -> str:
    """`text` with what is not printable escaped (`\\n`, `\\udcff`), cut to about `limit`."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where (`farm.buckets`) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(VipfarmError):
    """Every problem of one configuration file; `str()` lists them one per line."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = printable(source)
        self.problems = [Problem(printable(p.path), printable(p.message)) for p in problems]
        if len(self.problems) > MAX_PROBLEMS:
            more = len(self.problems) - MAX_PROBLEMS + 1
            self.problems[MAX_PROBLEMS - 1 :] = [
                Problem("...", f"and {more} more problems: fix those above first")
            ]
        n = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


def error_at(
    loc: Loc, value: object, expected: str, *, show_value: bool = True
) -> InitErrorDetails:
    """A located error for `ValidationError.from_exception_data`; pydantic prefixes `loc` with
    the location of the model whose validator raises it."""
    ctx = {"expected": expected, "show_value": show_value}
    return InitErrorDetails(
        type=PydanticCustomError("vipfarm", "{expected}", ctx), loc=loc, input=value
    )


def raise_errors(errors: Sequence[InitErrorDetails]) -> NoReturn:
    raise ValidationError.from_exception_data("vipfarm configuration", list(errors))


def relocate(
    exc: ValidationError,
    mapper: Callable[[Loc], Loc],
    root: type[BaseModel] | None = None,
) -> list[InitErrorDetails]:
    """Re-express the errors of an inner validation (Rule, DatapathSpec, a checker) at the keys
    of this file, keeping their message; `root` is the inner model, to list its keys."""
    return [
        error_at(mapper(tuple(e["loc"])), None, _problem(e, root).message, show_value=False)
        for e in exc.errors(include_url=False)
    ]


def under(prefix: Loc) -> Callable[[Loc], Loc]:
    return lambda loc: (*prefix, *loc)


def _fmt_value(value: object) -> str:
    if isinstance(value, str):
        text = repr(value[:100])
    else:
        try:
            text = str(value)
        except ValueError:  # an int too long to print (sys.set_int_max_str_digits)
            text = "a number too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(e: Mapping[str, Any]) -> str:
    """The `expected ...` half of a message, from a pydantic error."""
    ctx = e.get("ctx") or {}
    if e["type"] == "vipfarm":
        return str(ctx["expected"])
    msg = str(e["msg"])
    for prefix, replacement in _MSG_PREFIXES:
        if msg.startswith(prefix):
            return replacement + msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


_MSG_PREFIXES = (
    ("Input should be ", ""),
    ("Value error, ", ""),
    ("String should have ", "a string with "),
    ("String should match pattern ", "a string matching "),
    ("List should have ", "a list with "),
    ("Dictionary should have ", "a table with "),
)


def _path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (the key itself)"
        else:
            out += ("." if out else "") + _key(part)
    return out


def _key(part: str) -> str:
    """A key as TOML writes it: bare if it can be, else quoted; cut if long."""
    if _BARE_KEY.fullmatch(part) and len(part) <= _MAX_KEY:
        return part
    short = part if len(part) <= _MAX_KEY else part[: _MAX_KEY - 3] + "..."
    return '"' + printable(short).replace('"', '\\"') + '"'


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class found by following `loc` (TOML key names) from `root`."""
    tp: Any = root
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            by_key = {f.alias or n: f.annotation for n, f in tp.model_fields.items()}
            if not isinstance(part, str) or part not in by_key:
                return None
            tp = by_key[part]
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict and isinstance(part, str):
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _problem(e: Mapping[str, Any], root: type[BaseModel] | None) -> Problem:
    loc = tuple(e["loc"])
    path = _path(loc)
    if e["type"] == "missing":
        return Problem(path, "required key is missing")
    if e["type"] == "extra_forbidden":
        model = _model_at(root, loc[:-1]) if root else None
        if model is None:
            return Problem(path, "unknown key")
        keys = _keys_of(model)
        hint = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        dym = f" (did you mean '{hint[0]}'?)" if hint else ""
        return Problem(path, f"unknown key{dym}: expected one of {', '.join(keys)}")
    ctx = e.get("ctx") or {}
    value = e.get("input")
    # A whole table or list as "bad value" would drown the message; the path names it.
    show = ctx.get("show_value", True) and not isinstance(value, dict | list)
    expected = _expected(e)
    if show:
        return Problem(path, f"bad value {_fmt_value(value)}: expected {expected}")
    return Problem(path, expected)


def problems_of(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """The distinct problems of a validation, in order; past MAX_PROBLEMS only counted."""
    out: dict[Problem, None] = {}
    errors = exc.errors(include_url=False)
    for i, e in enumerate(errors):
        if len(out) >= MAX_PROBLEMS - 1:
            # Rewording (difflib for unknown keys) costs; past the cap only the count matters.
            more = f"and up to {len(errors) - i} more problems: fix those above first"
            return [*out, Problem("...", more)]
        out.setdefault(_problem(e, root))
    return list(out)
