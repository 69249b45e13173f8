"""uvicorn inside the daemon's event loop.

The daemon owns the process: its SIGTERM handler drains the node. uvicorn's `Server.serve()`
installs its own SIGINT/SIGTERM handlers (with `signal.signal`, which would also replace the
loop's handlers) and re-raises the signal when it stops; `_EmbeddedServer` turns that off. The
listening socket is created here rather than by uvicorn, so a port that is taken or an address
that does not exist becomes an `OSError` the daemon reports, instead of uvicorn's `sys.exit`.

`stop()` sets `should_exit`; uvicorn then stops accepting, lets running requests finish for at
most `GRACE_S` (live log streams see `closing` and end), and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from vipfarm.datapath.spec import IPAddress
from vipfarm.log import event

log = logging.getLogger("vipfarm.api")
GRACE_S = 2.0
KEEPALIVE_S = 5  # idle keep-alive connections close after this; peers reuse theirs for less


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon handles signals


class ApiServer:
    def __init__(
        self,
        app: FastAPI,
        host: IPAddress,
        port: int,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = cert_file is not None
        self._config = uvicorn.Config(
            app,
            log_config=None,
            lifespan="off",
            access_log=False,
            server_header=False,
            timeout_keep_alive=KEEPALIVE_S,
            timeout_graceful_shutdown=int(GRACE_S),
            ssl_certfile=str(cert_file) if cert_file else None,
            ssl_keyfile=str(key_file) if key_file else None,
        )
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Listen and serve in a task of the running loop; raises OSError if it cannot listen."""
        family = socket.AF_INET if self.host.version == 4 else socket.AF_INET6
        # proto given explicitly: asyncio sets TCP_NODELAY on accepted connections only when
        # their proto is IPPROTO_TCP, and without it a small answer waits for the client's
        # delayed ACK of the headers (40 ms per request, measured).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(self.host), self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api")
        event(log, "api_listening", url=self.url)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), GRACE_S + 3)
        except TimeoutError:
            self._task.cancel()
        except Exception as e:  # the API must never keep the daemon from stopping
            event(log, "api_stop_failed", logging.WARNING, error=repr(e))
        self._task = None
