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
exception and never a hang. So:

* the file is read with `vipfarm.config.secrets.read_capped` (a FIFO or a device is refused
  without blocking, at most `MAX_CONFIG_BYTES` are read) and must be UTF-8 (the problem says
  where it is not);
* `vipfarm.config.tomltext.parse_toml` screens the text before `tomllib` sees it (values nested
  more than `MAX_NESTING` deep, dotted keys of more than `MAX_KEY_PARTS` parts, which would make
  `tomllib` recurse too deep or take gigabytes) and turns each of `tomllib`'s errors, its bare
  ValueError for an integer of more than 4300 digits included, into a located problem;
* any other exception from validation would be a bug in a validator; it is still turned into a
  `ConfigError` (`internal error ...`), so that neither `vipfarm config check` nor the API shows
  a traceback or a 500 for a bad file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from vipfarm.config.modules import default_module_path
from vipfarm.config.problems import ConfigError, Problem, problems_of
from vipfarm.config.schema import FarmConfig
from vipfarm.config.secrets import FileRefused, read_capped
from vipfarm.config.tomltext import MAX_KEY_PARTS, MAX_NESTING, TomlProblem, parse_toml

__all__ = ["MAX_CONFIG_BYTES", "MAX_KEY_PARTS", "MAX_NESTING", "load_config", "parse_config"]

# The API takes a body of 4 MiB (vipfarm.api.app.MAX_BODY): a file of thousands of rules.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


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
            [Problem("the file", f"larger than {MAX_CONFIG_BYTES} bytes: is it a farm file?")],
        )
    try:
        data = parse_toml(text)
    except TomlProblem as exc:
        raise ConfigError(source, [Problem(exc.where, exc.message)]) from None
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
