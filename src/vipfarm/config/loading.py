"""Reading a farm file: TOML, then validation, every problem in one ConfigError.

Theory of operation
-------------------
`load_config(path)` reads the file and hands its text to `parse_config`, which parses it with
`tomllib` and validates it as a `vipfarm.config.schema.FarmConfig`. Relative paths in the file
resolve against the file's directory; modules are looked up there (`modules/`) and then in
`module_path` (default: `vipfarm.config.modules.default_module_path()`). A file that cannot be
read, is not TOML or does not validate raises `ConfigError` with every problem found; nothing is
applied by loading.

The text is untrusted (it may come over the API in a deployment), and the contract is strict:
whatever the input, the result is a `FarmConfig` or a `ConfigError`, quickly, never another
exception and never a hang. So, before `tomllib` sees it:

* the file is read with `vipfarm.config.secrets.read_capped` (a FIFO or a device is refused
  without blocking, at most `MAX_CONFIG_BYTES` are read) and must be UTF-8 (the problem says
  where it is not);
* `_screen` makes one linear pass over the text that rejects what would make `tomllib` itself
  blow up: values nested more than `MAX_NESTING` deep (its parser recurses: RecursionError) and
  dotted keys of more than `MAX_KEY_PARTS` parts (its memory grows with the square of the parts:
  a 20 KB key costs 400 MB). The pass tracks strings and comments; a file it misreads is one
  `tomllib` rejects anyway.

`tomllib`'s own ValueError (an integer of more than 4300 digits) becomes a problem too. Any
other exception from validation would be a bug in a validator; it is still turned into a
`ConfigError` (`internal error ...`), so that neither `vipfarm config check` nor the API shows a
traceback or a 500 for a bad file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from vipfarm.config.modules import default_module_path
from vipfarm.config.problems import ConfigError, Problem, problems_of
from vipfarm.config.schema import FarmConfig
from vipfarm.config.secrets import FileRefused, read_capped

__all__ = ["MAX_CONFIG_BYTES", "MAX_KEY_PARTS", "MAX_NESTING", "load_config", "parse_config"]

# The API takes a body of 4 MiB (vipfarm.api.app.MAX_BODY): a file of thousands of rules.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_NESTING = 16
MAX_KEY_PARTS = 8


def parse_config(
    text: str,
    *,
    base_dir: Path,
    source: str = "<config>",
    module_path: Sequence[Path] | None = None,
) -> FarmConfig:
    """Validate TOML text; relative paths resolve against base_dir. Raises ConfigError only."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            source,
            [Problem("", f"the file is larger than {MAX_CONFIG_BYTES} bytes: is it a farm file?")],
        )
    if (screened := _screen(text)) is not None:
        raise ConfigError(source, [screened])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "the file"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(source, [Problem(where, f"TOML syntax error: {msg}")]) from None
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer of more than 4300 digits (int() refuses to convert it).
        what = "too deeply nested" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise ConfigError(source, [Problem("the file", f"not a valid farm file: {what}")]) from None
    context = {"base_dir": base_dir, "module_path": list(module_path or default_module_path())}
    try:
        return FarmConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, problems_of(exc, FarmConfig)) from None
    except ConfigError:
        raise
    except Exception as exc:  # a validator's bug; the file still gets an answer, not a crash
        raise ConfigError(
            source,
            [
                Problem(
                    "the file",
                    f"internal error while validating it ({type(exc).__name__}: {exc}): "
                    "this is a bug in vipfarm, please report it with the file",
                )
            ],
        ) from None


def load_config(path: Path | str, *, module_path: Sequence[Path] | None = None) -> FarmConfig:
    """Read and validate a farm file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = read_capped(path, what="farm configuration", max_bytes=MAX_CONFIG_BYTES)
    except FileRefused as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read the file: {exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            str(path),
            [
                Problem(
                    f"line {line}, column {column}",
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8",
                )
            ],
        ) from None
    return parse_config(
        text, base_dir=path.resolve().parent, source=str(path), module_path=module_path
    )


def _screen(text: str) -> Problem | None:
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
                return Problem(
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
                return Problem(
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
