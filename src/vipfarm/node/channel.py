"""The local channel between a node's manager and its pulse: typed, versioned, bounded.

The pulse listens on a filesystem Unix socket in the node's run directory (owner-only, in a
root-owned directory) and takes one manager at a time; only root (or the daemon's own user, by
SO_PEERCRED) may connect. Each frame is a 4-byte big-endian length and one JSON object, at most
`MAX_FRAME` bytes: a frame that is longer, not JSON or not a known message closes the connection
(the manager reconnects and says everything again, so nothing is lost by closing).

Messages carry `v` (`VERSION`) and `type`. The first message each way is `Hello`; a peer with
another version is refused with a clear text, so a pulse and a manager of different releases
never act on half-understood messages.

Manager -> pulse: `Health` (the application's health; repeated every `KEEPALIVE_S` as the
manager's sign of life: a pulse that hears nothing for its manager timeout counts the
application unhealthy and gives its buckets away), `Join`, `Leave`, `Stopped` (after a drain
stopped the application), `ApplyConfig` (a deployed configuration's data path and weight),
`Query` (the pulse's state), `Shutdown`. Requests carry an `id` and get a `Reply` with that id.

Pulse -> manager: `Event` (what happened: the core's events and the pulse's own, for the module
log and for the manager's reactions to `Drained` and `PeerUp`), `Reply`.

The manager holds the node's *desired* state (in the farm or not, healthy or not) and says it
whole on every (re)connection, so a restarted pulse picks up where the old one was.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from vipfarm.errors import VipfarmError

VERSION = 1
MAX_FRAME = 8 * 1024 * 1024
KEEPALIVE_S = 0.25
SOCKET_NAME = "pulse.sock"  # in the node's run directory
STOPPED_MARK = "stopped"  # in the run directory while an operator wants the node out
_LEN = struct.Struct("!I")


class ChannelError(VipfarmError):
    """The other side sent something this side cannot take; the connection is closed."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1  # VERSION


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    role: Literal["pulse", "manager"]
    pid: int


class Health(_Msg):
    type: Literal["health"] = "health"
    healthy: bool


class Join(_Msg):
    """Be in the farm; with an `id`, the reply carries the state right after the command."""

    type: Literal["join"] = "join"
    id: int | None = None


class Leave(_Msg):
    """Drain; with an `id`, the reply carries the state right after the command."""

    type: Literal["leave"] = "leave"
    id: int | None = None


class Stopped(_Msg):
    type: Literal["stopped"] = "stopped"


class ApplyConfig(_Msg):
    """Replace the data path's rules and VIPs (leases kept), the weight and the heartbeat keys
    (the pulse reads the key files itself: no key material crosses the channel)."""

    type: Literal["apply_config"] = "apply_config"
    id: int
    spec: dict[str, Any]  # vipfarm.datapath.spec.DatapathSpec, as JSON
    weight: int
    key_file: str | None = None  # farm.key_file; None: keep the keys
    next_key_file: str | None = None  # farm.next_key_file


class Query(_Msg):
    type: Literal["query"] = "query"
    id: int


class Shutdown(_Msg):
    """Leave (if still in the farm), say goodbye, remove the data path and exit."""

    type: Literal["shutdown"] = "shutdown"


class Event(_Msg):
    type: Literal["event"] = "event"
    name: str
    level: int = 20
    fields: dict[str, Any] = Field(default_factory=dict)


class Reply(_Msg):
    type: Literal["reply"] = "reply"
    id: int
    ok: bool
    error: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[
    Hello | Health | Join | Leave | Stopped | ApplyConfig | Query | Shutdown | Event | Reply,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    body = msg.model_dump_json().encode()
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        raw = json.loads(body)
    except ValueError as e:
        raise ChannelError(f"a frame is not JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("v") != VERSION:
        raise ChannelError(
            f"channel version {raw.get('v')!r}, this side speaks {VERSION}: run the pulse and "
            "the manager of one release (restart the daemon after an upgrade)"
        )
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ChannelError(f"an unknown or malformed message: {e.errors()[0]['msg']}") from None


async def read(reader: asyncio.StreamReader) -> Message:
    """The next message; EOF raises asyncio.IncompleteReadError, a bad frame ChannelError."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ChannelError(f"a frame of {n} bytes is over the limit of {MAX_FRAME}")
    return decode(await reader.readexactly(n))
