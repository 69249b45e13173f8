"""The two log files of a node: the module log and the application log.

The module log (`module.log`) records what vipfarm did and saw: state changes, failovers,
checker results, script runs with their duration and exit code, one `event key=value` line each.
The application log (`app.log`) holds what the scripts and the application they started printed,
one line per output line, prefixed with the script name. Both rotate by size. Both loggers are
children of the `vipfarm` logger, so `vipfarm.log.setup()` also sends every record to stdout
(the journal, under systemd), where application lines appear as structured `output` events.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from vipfarm.log import MODULE_FORMAT, kv, setup

MODULE_LOGGER = "vipfarm.module"
APP_LOGGER = "vipfarm.app"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5


class _AppFileFormatter(logging.Formatter):
    """`time script: line` in app.log, which is read by people, not parsers."""

    def format(self, record: logging.LogRecord) -> str:
        script = getattr(record, "script", None)
        line = getattr(record, "line", None)
        if script is None or line is None:
            return super().format(record)
        return f"{self.formatTime(record)} {script}: {line}"


def _file_handler(
    path: Path, formatter: logging.Formatter, max_bytes: int, backups: int
) -> logging.Handler:
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(formatter)
    handler._vipfarm_node_log = True  # type: ignore[attr-defined]
    return handler


def setup_node_logs(
    log_dir: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    level: int = logging.INFO,
) -> tuple[logging.Logger, logging.Logger]:
    """Create log_dir and attach module.log and app.log; returns (module_logger, app_logger).

    Calling it again (e.g. with another directory) replaces the files, never duplicates them.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    setup(level)
    loggers = []
    for name, file, formatter in (
        (MODULE_LOGGER, "module.log", logging.Formatter(MODULE_FORMAT)),
        (APP_LOGGER, "app.log", _AppFileFormatter("%(asctime)s %(message)s")),
    ):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, "_vipfarm_node_log", False):
                logger.removeHandler(h)
                h.close()
        logger.addHandler(_file_handler(log_dir / file, formatter, max_bytes, backups))
        logger.setLevel(level)
        loggers.append(logger)
    return loggers[0], loggers[1]


def log_output(app_log: logging.Logger, script: str, line: str) -> None:
    """One line a script printed: `output script=x line=...` on stdout, `x: line` in app.log."""
    app_log.info(kv("output", script=script, line=line), extra={"script": script, "line": line})
