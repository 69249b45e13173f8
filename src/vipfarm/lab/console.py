"""`vipfarm lab console`: a lab node's web console on the host's loopback.

The lab's nodes live in network namespaces, so their API port is not reachable from the host's
browser. `Forwarder` listens on `127.0.0.1:PORT` of the host (loopback only: it touches no
interface of the host) and, for each connection, opens a TCP connection to the node's API
address from inside the node's namespace (the socket is created by a thread that entered the
namespace, `vipfarm.lab.netns`; a socket stays in the namespace it was created in), then copies
bytes both ways until either side closes. Connections are bounded (`MAX_CONNECTIONS`).

The browser thus loads the console from `http://127.0.0.1:PORT/`; every request the page makes
goes to that origin, i.e. to the one node, as on a real farm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from vipfarm.datapath.spec import IPAddress
from vipfarm.lab.netns import run_in_netns
from vipfarm.log import event

log = logging.getLogger("vipfarm.lab")
MAX_CONNECTIONS = 64
CHUNK = 64 * 1024


class Forwarder:
    """127.0.0.1:`port` on the host to `addr`:`target_port` inside namespace `ns`."""

    def __init__(self, ns: str, addr: IPAddress, target_port: int, port: int = 0) -> None:
        self.ns, self.addr, self.target_port = ns, addr, target_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _connect_socket(self) -> socket.socket:
        family = socket.AF_INET6 if self.addr.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            sock = await asyncio.to_thread(run_in_netns, self.ns, self._connect_socket)
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, (str(self.addr), self.target_port)), 5.0
                )
            except (OSError, TimeoutError) as e:
                sock.close()
                event(log, "console_forward_failed", logging.WARNING, ns=self.ns, error=e)
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._open -= 1
            writer.close()

    async def serve(self, stop: Callable[[], bool] | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            while stop is None or not stop():
                await asyncio.sleep(0.2)

    # ---- in a thread of its own (tests, the demo)

    def start(self) -> Forwarder:
        stopping = threading.Event()
        self._stopping = stopping

        def body() -> None:
            try:
                asyncio.run(self.serve(stopping.is_set))
            except BaseException as e:
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=body, name="console-forwarder", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(5)
            self._thread = None


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    finally:
        with contextlib.suppress(Exception):
            dst.write_eof() if dst.can_write_eof() else dst.close()


def for_lab(name: str, node: str = "node1", port: int = 9010) -> tuple[Forwarder, str]:
    """A forwarder to `node`'s console in lab `name` (not started) and the farm's API token."""
    from vipfarm.lab.testbed import API_PORT, Lab
    from vipfarm.lab.topology import LabError, node_index, node_lan4

    lab = Lab.attach(name)
    if node not in lab.node_names:
        raise LabError(f"lab {name} has no node {node!r}: use one of {', '.join(lab.node_names)}")
    if not lab.config.daemon:
        raise LabError(f"lab {name} runs no daemons (--static): it has no console")
    index = node_index(node)
    token = lab.api_token_file.read_text().strip()
    return Forwarder(lab.ns(node), node_lan4(index), API_PORT, port), token
