"""What the supervisor runs: one node's application, its checkers and its restart policy.

Theory of operation
-------------------
These models are the supervisor's input. `vipfarm.config` builds them, per node, from the
`[module]` section of the farm file once every macro is substituted; the supervisor never sees a
macro or a module directory to look up. They are strict pydantic models (unknown keys are
errors, instances are frozen) so that the configuration can validate a checker table straight
into its model and report its problems at the keys of the file.

A checker's `type` field selects its model (`CHECKER_TYPES`); `label` names it in logs and
defaults to its target (`tcp:127.0.0.1:80`). A command (`start`, `stop`, a command checker's
`argv`) may be written as one string, split like a shell would, or as a list.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "CHECKER_TYPES",
    "AppSpec",
    "Argv",
    "CheckerSpec",
    "CommandCheck",
    "HttpCheck",
    "LinkCheck",
    "ProcessCheck",
    "RestartSpec",
    "Seconds",
    "TcpCheck",
]


def _split_argv(value: object) -> object:
    """A command may be written as one string (split like a shell would) or a list."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"a command line that splits like a shell one ({exc})") from None
    return value


Argv = Annotated[list[str], BeforeValidator(_split_argv), Field(min_length=1)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _CheckBase(_Strict):
    name: str = Field(default="", description="label in logs; derived from the target if empty")
    interval_s: Seconds = 2.0
    timeout_s: Seconds = 1.0
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)

    @property
    def label(self) -> str:
        return self.name or self._target()

    def _target(self) -> str:
        raise NotImplementedError


class TcpCheck(_CheckBase):
    """Healthy when a TCP connection to host:port opens."""

    type: Literal["tcp"] = "tcp"
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    def _target(self) -> str:
        return f"tcp:{self.host}:{self.port}"


class HttpCheck(_CheckBase):
    """Healthy when GET url answers expect_status and, if set, the body contains expect_body."""

    type: Literal["http"] = "http"
    url: str
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_body: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"an http:// URL ({exc})") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("an http:// URL with a host, e.g. http://127.0.0.1:80/")
        return url

    def _target(self) -> str:
        return f"http:{self.url}"


class ProcessCheck(_CheckBase):
    """Healthy when a process with this name runs, or the PID in pidfile is alive."""

    type: Literal["process"] = "process"
    process: str | None = Field(default=None, min_length=1)
    pidfile: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ProcessCheck:
        if (self.process is None) == (self.pidfile is None):
            # The error type and context that vipfarm.config.problems words as "expected ...",
            # without the value (there is no single key to show).
            raise PydanticCustomError(
                "vipfarm",
                "{expected}",
                {"expected": "exactly one of 'process' or 'pidfile'", "show_value": False},
            )
        return self

    def _target(self) -> str:
        return f"process:{self.process or self.pidfile}"


class CommandCheck(_CheckBase):
    """Healthy when the command exits 0 within timeout_s."""

    type: Literal["command"] = "command"
    argv: Argv

    def _target(self) -> str:
        return f"command:{Path(self.argv[0]).name}"


class LinkCheck(_CheckBase):
    """Healthy when the interface's operstate is up."""

    type: Literal["link"] = "link"
    interface: str = Field(min_length=1, max_length=15)

    def _target(self) -> str:
        return f"link:{self.interface}"


CheckerSpec = TcpCheck | HttpCheck | ProcessCheck | CommandCheck | LinkCheck
CHECKER_TYPES: dict[str, type[_CheckBase]] = {
    "tcp": TcpCheck,
    "http": HttpCheck,
    "process": ProcessCheck,
    "command": CommandCheck,
    "link": LinkCheck,
}


class RestartSpec(_Strict):
    """At most `max` restarts within `within_s` seconds; then the node leaves the farm."""

    max: int = Field(default=3, ge=0, le=1000)
    within_s: Seconds = 300.0


class AppSpec(_Strict):
    """The application of one node, macros substituted: what `vipfarm.supervisor` runs."""

    module: str
    directory: Path
    env: dict[str, str] = Field(default_factory=dict)
    start: Argv
    stop: Argv
    force_stop: Argv | None = None
    start_timeout_s: Seconds = 60.0
    healthy_timeout_s: Seconds = 60.0
    stop_timeout_s: Seconds = 30.0
    kill_timeout_s: Seconds = 10.0
    checkers: list[CheckerSpec] = Field(default_factory=list)
    restart: RestartSpec = RestartSpec()
