"""Parsing untrusted TOML text with `tomllib`: a dict or a located problem, never a crash.

Theory of operation
-------------------
`tomllib` is correct but not built for hostile input: its parser recurses into nested arrays
and inline tables (RecursionError past about 1,000 levels), the memory it takes for a dotted key
grows with the square of its parts (a 20 KB key costs 400 MB), and an integer of more than 4300
digits raises a bare ValueError. `parse_toml` therefore first makes one linear pass over the
text (`_screen`: it tracks strings and comments, jumping between the characters that matter
with a regular expression) that rejects values nested more than `MAX_NESTING` deep and dotted
keys of more than `MAX_KEY_PARTS` parts, then calls `tomllib.loads` and turns each of its
errors into a `TomlProblem` saying where (`line 3, column 8`, or `the file`) and what. A text
the pass misreads is one `tomllib` rejects anyway: it stops at its first error, and up to that
point both read strings and comments alike.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

__all__ = ["MAX_KEY_PARTS", "MAX_NESTING", "TomlProblem", "parse_toml"]

MAX_NESTING = 16
MAX_KEY_PARTS = 8


class TomlProblem(Exception):
    """Text that is not acceptable TOML: where (a line and column, or 'the file') and what."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def parse_toml(text: str) -> dict[str, Any]:
    """`tomllib.loads(text)`, screened first; raises TomlProblem only."""
    if (screened := _screen(text)) is not None:
        raise TomlProblem(*screened)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "the file"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise TomlProblem(where, f"TOML syntax error: {msg}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer of more than 4300 digits (int() refuses to convert it).
        what = "too deeply nested" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise TomlProblem("the file", f"not valid TOML: {what}") from None


def _screen(text: str) -> tuple[str, str] | None:
    """The first construct that would make tomllib recurse too deep or blow up, else None."""
    depth = 0
    dots = 0  # dots in the current segment: a dotted key is one segment
    line = 1
    n = len(text)
    m = _SIGNIFICANT.search(text)
    while m is not None:
        i = m.start()
        c = text[i]
        if c == "\n":
            line += 1
            dots = 0
        elif c == "#":
            end = text.find("\n", i)
            m = _SIGNIFICANT.search(text, n if end < 0 else end)
            continue
        elif c in "\"'":
            quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else c
            j = i + len(quote)
            while True:
                j = text.find(quote, j) if quote == c == "'" else _find_close(text, j, quote)
                if j < 0 or len(quote) == 1 or not text.startswith(quote[0], j + 3):
                    break
                j += 1  # up to two more quote marks may close a multi-line string
            if j < 0:
                return None  # unterminated: tomllib reports it
            line += text.count("\n", i, j)
            m = _SIGNIFICANT.search(text, j + len(quote))
            continue
        elif c in "[{":
            depth += 1
            dots = 0
            if depth > MAX_NESTING:
                return (
                    f"line {line}",
                    f"values nested more than {MAX_NESTING} deep: a farm file needs 3 at most",
                )
        elif c in "]}":
            depth = max(0, depth - 1)
            dots = 0
        elif c in "=,":
            dots = 0
        elif c == ".":
            dots += 1
            if dots >= MAX_KEY_PARTS:
                return (
                    f"line {line}",
                    f"a dotted key of more than {MAX_KEY_PARTS} parts: a farm file needs 3 at "
                    "most (module.restart.max)",
                )
        m = _SIGNIFICANT.search(text, i + 1)
    return None


_SIGNIFICANT = re.compile(r"[\n#\"'\[\]{}=,.]")


def _find_close(text: str, start: int, quote: str) -> int:
    """Where the basic string (quote '"' or '\"\"\"') or literal '\'\'\'' opened before `start`
    closes, skipping backslash escapes in basic strings; -1 if it does not."""
    escapes = quote[0] == '"'
    j = start
    while True:
        k = text.find(quote, j)
        if k < 0:
            return -1
        if not escapes:
            return k
        backslashes = 0
        while k - 1 - backslashes >= start and text[k - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return k
        j = k + 1
