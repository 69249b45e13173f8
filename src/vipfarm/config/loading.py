"""Reading a farm file: TOML, then validation, every problem in one ConfigError.

Theory of operation
-------------------
`load_config(path)` reads the file and hands its text to `parse_config`, which parses it with
`tomllib` and validates it as a `vipfarm.config.schema.FarmConfig`. Relative paths in the file
resolve against the file's directory; modules are looked up there (`modules/`) and then in
`module_path` (default: `vipfarm.config.modules.default_module_path()`). A file that cannot be
read, is not TOML or does not validate raises `ConfigError` with every problem found; nothing is
applied by loading.
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

__all__ = ["load_config", "parse_config"]


def parse_config(
    text: str,
    *,
    base_dir: Path,
    source: str = "<config>",
    module_path: Sequence[Path] | None = None,
) -> FarmConfig:
    """Validate TOML text; relative paths resolve against base_dir. Raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"line {m.group(1)}, column {m.group(2)}" if m else ""
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(source, [Problem(where, f"TOML syntax error: {msg}")]) from None
    context = {"base_dir": base_dir, "module_path": list(module_path or default_module_path())}
    try:
        return FarmConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, problems_of(exc, FarmConfig)) from None


def load_config(path: Path | str, *, module_path: Sequence[Path] | None = None) -> FarmConfig:
    """Read and validate a farm file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read the file: {exc}")]) from None
    return parse_config(
        text, base_dir=path.resolve().parent, source=str(path), module_path=module_path
    )
