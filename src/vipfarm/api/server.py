"""uvicorn inside the manager's event loop, behind a connection guard.

The daemon owns the process: its SIGTERM handler drains the node. uvicorn's `Server.serve()`
installs its own SIGINT/SIGTERM handlers (with `signal.signal`, which would also replace the
loop's handlers) and re-raises the signal when it stops; `_EmbeddedServer` turns that off. The
listening socket is created here rather than by uvicorn, so a port that is taken or an address
that does not exist becomes an `OSError` the daemon reports, instead of uvicorn's `sys.exit`.

`stop()` sets `should_exit`; uvicorn then stops accepting, lets running requests finish for at
most `GRACE_S` (live log streams see `closing` and end), and returns.

Connections (the part of the API that no token protects)
--------------------------------------------------------
uvicorn's HTTP/1.1 protocol (h11) closes idle keep-alive connections, but a connection that
never finishes its request head, or its body, is held forever, and it accepts any number of
them. Each accepted connection therefore goes through two small layers of our own, both driven
by the shared `Limits` (changed live by a deployment) and counted in `Counters`:

* `_Acceptor` is the protocol the listening server creates. It admits the connection against
  `max_connections` (the farm's own nodes, by source address, have a pool of the same size of
  their own, so a flood from elsewhere cannot keep a deployment or the farm view out) or answers
  a fixed 503 and closes at once. With TLS it runs the handshake itself (`loop.start_tls`,
  within `header_timeout_s`), so connections that never finish it are counted and bounded too.
  It then hands the transport, plain or TLS, to `_GuardedH11` and steps out.
* `_GuardedH11` is uvicorn's h11 protocol with one deadline per phase, read from h11's own
  state after every read: the request head must be complete within `header_timeout_s` of the
  connection opening (or of the first byte after a keep-alive pause), the body within
  `body_timeout_s` of the head. While the application works on a complete request there is no
  deadline (a deployment or a log stream takes as long as it takes), and between requests
  uvicorn's keep-alive timeout (`keepalive_timeout_s`) applies. An expired request that had
  sent something is answered 408 (unless an answer has begun), then closed.

Everything is plain callbacks on the manager's loop: no task per connection, nothing that could
wait on the pulse, which is another process anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from vipfarm.api.guard import Counters, Limits
from vipfarm.datapath.spec import IPAddress
from vipfarm.log import event

log = logging.getLogger("vipfarm.api")
GRACE_S = 2.0
KEEPALIVE_S = Limits.keepalive_timeout_s  # peers reuse their pooled connections for less
_H11_LOG = logging.getLogger("vipfarm.api.h11")
_H11_LOG.setLevel(logging.ERROR)


def _raw_answer(status: int, reason: str, detail: str | None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for before h11 has a request."""
    body = b"" if detail is None else json.dumps({"detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 503:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """Admission and accounting of the API's connections (shared by every connection)."""

    def __init__(
        self,
        limits: Limits,
        counters: Counters,
        *,
        peers: Iterable[IPAddress] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.limits = limits
        self.counters = counters
        self.peers = {str(p) for p in peers}
        self.tls = tls
        self.open = {"peer": 0, "other": 0}
        self.handshakes: set[asyncio.Task[None]] = set()

    def pool_of(self, peername: Any) -> str:
        host = peername[0] if isinstance(peername, tuple) and peername else None
        if isinstance(host, str):
            with contextlib.suppress(ValueError):
                addr = ipaddress.ip_address(host.split("%", 1)[0])
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                if str(addr) in self.peers:
                    return "peer"
        return "other"

    def admit(self, pool: str) -> bool:
        if self.open[pool] >= self.limits.max_connections:
            self.counters.count("max_connections")
            return False
        self.open[pool] += 1
        self.counters.connections += 1
        return True

    def release(self, pool: str) -> None:
        self.open[pool] -= 1
        self.counters.connections -= 1


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines for the request head and body (module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        guard: ConnectionGuard,
        pool: str,
    ) -> None:
        super().__init__(config, server_state, app_state)
        # Malformed requests and upgrade attempts are counted, not logged: the network
        # decides how often they happen. Errors of the application itself are still logged.
        self.logger = _H11_LOG
        self.guard = guard
        self.pool: str | None = pool
        self.timeout_keep_alive = guard.limits.keepalive_timeout_s
        self._phase: str | None = None
        self._partial = False  # a request head has begun
        self._deadline: asyncio.TimerHandle | None = None
        # What arrives before `connection_made`: asyncio's TLS layer hands the request that
        # followed the handshake to this protocol before `start_tls` returns (about one
        # connection in 20 with curl, measured), and uvicorn cannot take it without a transport.
        self._early: list[bytes] | None = []

    def _arm(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            limits = self.guard.limits
            delay = limits.header_timeout_s if phase == "header" else limits.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expired, phase)

    def _follow(self) -> None:
        state = self.conn.their_state
        phase = "header" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._arm(phase)

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.guard.counters.count(f"{phase}_timeout")
        # An answer only if one can still be the first thing written, and only to a client
        # that sent something (a silent connection gets a silent close).
        unanswered = self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        if unanswered and (phase == "body" or self._partial):
            what = "request head" if phase == "header" else "request body"
            limit = (
                self.guard.limits.header_timeout_s
                if phase == "header"
                else self.guard.limits.body_timeout_s
            )
            self.transport.write(
                _raw_answer(408, "Request Timeout", f"the {what} took over {limit:g} s")
            )
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm("header")
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            # Bounded by what the TLS layer decrypts in one read, before our connection_made.
            self._early.append(data)
            return
        super().data_received(data)
        if self.transport.is_closing():
            return
        self._partial = True
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request is the keep-alive timer's until its first byte; a pipelined one
        # already parsed is in its body (or complete).
        state = self.conn.their_state
        self._partial = False
        self._arm("body" if state is h11.SEND_BODY else None)

    def send_400_response(self, msg: str) -> None:
        self.guard.counters.count("bad_request")
        super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        # A TLS connection can be lost between its handshake and `connection_made`.
        if self.transport is not None:
            super().connection_lost(exc)
        self.drop()

    def drop(self) -> None:
        """Give the connection's place in its pool back (once)."""
        if self.pool is not None:
            self.guard.release(self.pool)
            self.pool = None


class _Acceptor(asyncio.Protocol):
    """The listening server's protocol: admission, TLS, then `_GuardedH11` (module docstring).
    uvicorn creates it with its own arguments; `ApiServer` binds the guard to a subclass."""

    guard: ClassVar[ConnectionGuard]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self.guard
        pool = guard.pool_of(transport.get_extra_info("peername"))
        if not guard.admit(pool):
            if guard.tls is None:
                transport.write(
                    _raw_answer(
                        503,
                        "Service Unavailable",
                        f"this node's API has {guard.limits.max_connections} connections open "
                        "already, its limit (api.max_connections): retry later",
                    )
                )
            transport.close()
            return
        proto = _GuardedH11(self.config, self.server_state, self.app_state, guard, pool)
        if guard.tls is None:
            transport.set_protocol(proto)
            proto.connection_made(transport)
            return
        # Nothing is read until start_tls owns the transport: a ClientHello that arrived first
        # would otherwise reach this protocol and be lost.
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(transport, proto))
        guard.handshakes.add(task)
        task.add_done_callback(guard.handshakes.discard)

    async def _handshake(self, raw: asyncio.Transport, proto: _GuardedH11) -> None:
        guard = self.guard
        assert guard.tls is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw,
                proto,
                guard.tls,
                server_side=True,
                ssl_handshake_timeout=guard.limits.header_timeout_s,
            )
        except Exception:  # timed out, reset, not TLS at all: whatever the client sent
            guard.counters.count("tls_handshake")
            raw.abort()
            proto.drop()
            return
        except asyncio.CancelledError:
            raw.abort()
            proto.drop()
            raise
        if proto.pool is None:  # lost as the handshake ended: `connection_lost` released it
            return
        if tls is None:
            proto.drop()
            return
        proto.connection_made(tls)

    def data_received(self, data: bytes) -> None:
        pass  # a refused connection's request: never used

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # only a refused connection ends here; an admitted one is `_GuardedH11`'s


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon handles signals

    async def main_loop(self) -> None:
        # uvicorn wakes ten times a second to see whether it should stop (its date header only
        # changes once a second): on 24 idle nodes that is 240 wake-ups a second for nothing.
        # Here it ticks once a second and `request_exit` wakes it at once.
        self._exit_requested = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter += 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_requested.wait(), 1.0)

    def request_exit(self) -> None:
        self.should_exit = True
        if event := getattr(self, "_exit_requested", None):
            event.set()


class ApiServer:
    def __init__(
        self,
        app: FastAPI,
        host: IPAddress,
        port: int,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        limits: Limits | None = None,
        counters: Counters | None = None,
        peers: Iterable[IPAddress] = (),
    ) -> None:
        self.host, self.port = host, port
        self.tls = cert_file is not None
        self.limits = limits or Limits()
        self.counters = counters or Counters()
        context = None
        if cert_file is not None:
            # Ours, not uvicorn's: `_Acceptor` runs the handshake under its own deadline.
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self.guard = ConnectionGuard(self.limits, self.counters, peers=peers, tls=context)
        acceptor = type("Acceptor", (_Acceptor,), {"guard": self.guard})
        self._config = uvicorn.Config(
            app,
            http=acceptor,
            ws="none",
            log_config=None,
            lifespan="off",
            access_log=False,
            server_header=False,
            timeout_keep_alive=self.limits.keepalive_timeout_s,
            timeout_graceful_shutdown=int(GRACE_S),
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
        self._server.request_exit()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), GRACE_S + 3)
        except TimeoutError:
            self._task.cancel()
        except Exception as e:  # the API must never keep the daemon from stopping
            event(log, "api_stop_failed", logging.WARNING, error=repr(e))
        for task in list(self.guard.handshakes):
            task.cancel()
        self._task = None
