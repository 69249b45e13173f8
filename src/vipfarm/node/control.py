"""Local control of a node daemon over an abstract Unix socket.

The socket is `@vipfarm/<farm>` in the abstract namespace. Abstract Unix sockets belong to the
network namespace, not the filesystem, so in the lab `ip netns exec vf-node1 vipfarm state`
reaches node1's daemon and no other, and a crashed daemon leaves no stale socket file behind.
An abstract socket has no file permissions, so the server checks the peer's credentials
(SO_PEERCRED): anyone may read, only root (or the daemon's own user) may change anything.

The protocol is one JSON object per line in each direction: a request
`{"cmd": NAME, "args": {...}}` gets `{"ok": true, "result": ...}` or
`{"ok": false, "error": TEXT}`. Handlers are plain async functions, so the HTTP API can reuse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vipfarm.errors import VipfarmError
from vipfarm.log import event
from vipfarm.node.host import CONTROL_PREFIX, farms_here, peer_uid

log = logging.getLogger("vipfarm.node.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
# One request line at most: a deployment carries the whole configuration file.
MAX_LINE = 8 * 1024 * 1024


class ControlError(VipfarmError):
    """A request failed; the text goes back to the caller as is."""


def address(farm: str) -> str:
    return f"\0{CONTROL_PREFIX}{farm}"


@dataclass
class ControlServer:
    farm: str
    handlers: dict[str, Handler]
    mutating: set[str] = field(default_factory=set)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address(self.farm))
        except OSError as e:
            sock.close()
            raise ControlError(
                f"another vipfarm daemon of farm {self.farm!r} already runs in this network "
                f"namespace ({e.strerror}): stop it first (vipfarm stop --force)"
            ) from e
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else -1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = await self._dispatch(line, uid)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that went away or sent an over-long line: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, uid: int) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
            args = req.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'bad request: expected {"cmd": NAME, "args": {...}}'}
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {cmd!r}: known are {known}"}
        if cmd in self.mutating and uid not in (0, os.geteuid()):
            return {"ok": False, "error": f"{cmd!r} changes the node: run it as root"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not kill the daemon; the caller sees it
            event(log, "control_handler_failed", logging.ERROR, cmd=cmd, error=repr(e))
            return {"ok": False, "error": f"internal error in {cmd}: {e!r}"}


def call(farm: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Send one request to the local daemon and return its result; raises ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address(farm))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ControlError(
                f"no vipfarm daemon of farm {farm!r} runs in this network namespace: start it "
                "(vipfarm daemon --config FILE, or systemctl start vipfarm)"
            ) from e
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the connection without answering")
            buf += chunk
    except TimeoutError as e:
        raise ControlError(f"the daemon did not answer {cmd!r} within {timeout:g} s") from e
    finally:
        sock.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply.get("result")


def resolve_farm(farm: str | None) -> str:
    """The farm to talk to: the one given, else the only one running in this namespace."""
    if farm:
        return farm
    here = farms_here()
    if len(here) == 1:
        return here[0]
    if not here:
        raise ControlError(
            "no vipfarm daemon runs in this network namespace: start one with "
            "`vipfarm daemon --config FILE`"
        )
    raise ControlError(f"several farms run here ({', '.join(here)}): choose one with --farm")
