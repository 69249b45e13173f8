"""The value types that the sections of a farm file share.

Theory of operation
-------------------
Every section model derives from `Strict`: unknown keys are errors (a misspelt key must not fall
back to a default silently) and a validated configuration is frozen. Names and addresses are
annotated types, so each bad value is one error with one `expected ...` text. Relative paths in
the file resolve against the directory of the file, passed to validation as the context key
`base_dir` (see `base_dir`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo

from vipfarm.datapath.spec import IPAddress

__all__ = ["Address", "MacroName", "NetName", "NodeName", "Strict", "base_dir"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ip(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address, e.g. 198.51.100.100 or 2001:db8::100") from None


# One validator instead of pydantic's IPv4|IPv6 union, which reports two errors per bad address.
Address = Annotated[IPAddress, PlainValidator(_ip)]
MacroName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
NodeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
NetName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,15}$")]


def base_dir(info: ValidationInfo) -> Path:
    """The directory that relative paths of the file resolve against."""
    ctx = info.context if isinstance(info.context, dict) else {}
    return Path(ctx.get("base_dir") or Path.cwd())
