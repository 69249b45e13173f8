"""Structured logging: every record is `event key=value ...`.

One line per event, values quoted only when they need it, so the output is greppable and
parseable by the journal and by `vipfarm log`. Modules call `event(log, "name", key=value)`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# The module log's line format: written by the manager (rotating) and the daemon (watched).
MODULE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _fmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(name: str, /, **fields: Any) -> str:
    """Render one event as `name k1=v1 k2=v2`."""
    return " ".join([name, *(f"{k}={_fmt(v)}" for k, v in fields.items())])


def event(logger: logging.Logger, name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, kv(name, **fields))


def setup(level: int = logging.INFO, stream: Any = None) -> None:
    """Send vipfarm's records to stdout (the journal under systemd) once."""
    root = logging.getLogger("vipfarm")
    root.setLevel(level)
    if not any(getattr(h, "_vipfarm", False) for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._vipfarm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
