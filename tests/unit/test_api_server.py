"""uvicorn embedded in an asyncio loop (`vipfarm.api.server`), on loopback: it serves without
touching the loop's signal handlers, speaks TLS when given a certificate, reports a taken port
as OSError, and stops when asked."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.unit.test_api_app import TOKEN
from vipfarm.api.app import create_app
from vipfarm.api.guard import Counters, Limits
from vipfarm.api.server import ApiServer
from vipfarm.datapath.spec import IPAddress

LOOPBACK: IPAddress = ipaddress.ip_address("127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hello_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


@pytest.fixture
def cert(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl(1) is needed to make a test certificate: apt-get install openssl")
    crt, key = tmp_path / "api.crt", tmp_path / "api.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=vipfarm-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    yield crt, key


def test_serves_in_the_loop_and_leaves_signal_handlers_alone() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        terminated: list[int] = []
        loop.add_signal_handler(signal.SIGTERM, terminated.append, 1)
        before = signal.getsignal(signal.SIGTERM)
        port = free_port()
        server = ApiServer(hello_app(), LOOPBACK, port)
        await server.start()
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{server.url}/hello")
        assert resp.json() == {"hello": "world"}
        assert signal.getsignal(signal.SIGTERM) is before  # uvicorn installed nothing
        await server.stop()
        assert signal.getsignal(signal.SIGTERM) is before
        signal.raise_signal(signal.SIGTERM)  # still the loop's handler, not uvicorn's
        await asyncio.sleep(0.05)
        assert terminated == [1]
        loop.remove_signal_handler(signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"{server.url}/hello")

    asyncio.run(scenario())


def test_accepted_connections_do_not_wait_for_a_delayed_ack() -> None:
    """Without TCP_NODELAY on accepted connections a small answer's body waits for the client's
    delayed ACK of its headers: about 40 ms per request instead of about 1. Checked on the
    server's own socket rather than timed, so a loaded machine cannot fail it."""

    async def scenario() -> list[int]:
        server = ApiServer(hello_app(), LOOPBACK, free_port())
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{server.url}/hello")).status_code == 200
                # the keep-alive connection is still open: read its option on the server side
                return [
                    conn.transport.get_extra_info("socket").getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY
                    )
                    for conn in server._server.server_state.connections
                ]
        finally:
            await server.stop()

    options = asyncio.run(scenario())
    assert options and all(options), options


def test_a_request_that_follows_the_tls_handshake_at_once_is_served(
    cert: tuple[Path, Path],
) -> None:
    """asyncio's TLS layer may hand the first request to the protocol before `start_tls`
    returns; it was lost (an empty reply) on about one new connection in 20."""
    crt, key = cert

    async def scenario() -> list[int]:
        server = ApiServer(hello_app(), LOOPBACK, free_port(), cert_file=crt, key_file=key)
        await server.start()
        try:
            codes = []
            for _ in range(100):  # curl sends its request right behind the handshake
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10",
                    "--cacert", str(crt), f"{server.url}/hello",
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                codes.append(int(out or 0))
            return codes
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == [200] * 100


def test_tls_with_the_configured_certificate(cert: tuple[Path, Path]) -> None:
    crt, key = cert

    async def scenario() -> None:
        server = ApiServer(hello_app(), LOOPBACK, free_port(), cert_file=crt, key_file=key)
        await server.start()
        assert server.url.startswith("https://127.0.0.1:")
        try:
            verify = ssl.create_default_context(cafile=str(crt))
            async with httpx.AsyncClient(verify=verify) as client:
                assert (await client.get(f"{server.url}/hello")).status_code == 200
            async with httpx.AsyncClient() as client:  # system CAs do not know it
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.get(f"{server.url}/hello")
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_taken_port_is_an_oserror_not_an_exit() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = ApiServer(hello_app(), LOOPBACK, taken.getsockname()[1])
            with pytest.raises(OSError):
                await server.start()
            await server.stop()  # nothing started: a no-op

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the guard


def guarded_app(counters: Counters, limits: Limits) -> FastAPI:
    """The real node app (auth, version, body limit) over a service that is never reached
    without the token."""
    from tests.unit.test_api_app import FakeNode

    return create_app(
        FakeNode(Path(tempfile.mkdtemp(prefix="vipfarm-guard-"))),
        TOKEN,
        limits=limits,
        counters=counters,
    )


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes (fails the test if it does not)."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def run_guarded(
    scenario: Callable[[ApiServer], Awaitable[None]],
    limits: Limits,
    *,
    peers: Iterable[IPAddress] = (),
    cert: tuple[Path, Path] | None = None,
) -> Counters:
    counters = Counters()

    async def main() -> None:
        server = ApiServer(
            guarded_app(counters, limits),
            LOOPBACK,
            free_port(),
            limits=limits,
            counters=counters,
            peers=peers,
            cert_file=cert[0] if cert else None,
            key_file=cert[1] if cert else None,
        )
        await server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    asyncio.run(main())
    return counters


def test_silent_half_sent_and_slow_connections_are_closed_by_their_deadlines() -> None:
    limits = Limits(header_timeout_s=0.5, body_timeout_s=0.8, keepalive_timeout_s=1)

    async def scenario(server: ApiServer) -> None:
        t0 = time.monotonic()
        silent = await asyncio.open_connection("127.0.0.1", server.port)
        head = await asyncio.open_connection("127.0.0.1", server.port)
        head[1].write(b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\n")  # never finished
        body = await asyncio.open_connection("127.0.0.1", server.port)
        body[1].write(
            b"PUT /api/v1/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN
            + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"te'
        )
        assert await read_until_closed(silent[0], 3) == b""  # no answer to no request
        assert (await read_until_closed(head[0], 3)).startswith(b"HTTP/1.1 408 ")
        assert (await read_until_closed(body[0], 3)).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - t0 < 2.5
        # A client that behaves is served, then its idle keep-alive connection is closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_until_closed(reader, 3)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}")
        for _, w in (silent, head, body, (reader, writer)):
            w.close()

    counters = run_guarded(scenario, limits)
    assert counters.refused == {"header_timeout": 2, "body_timeout": 1}
    assert counters.connections == 0


def test_no_token_is_refused_from_the_head_and_the_body_is_never_read() -> None:
    async def scenario(server: ApiServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"PUT /api/v1/config HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 134217728\r\n\r\n"  # 128 MiB announced, none sent
        )
        answer = await read_until_closed(reader, 3)
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b"connection: close" in answer.lower() and b"www-authenticate: Bearer" in answer
        writer.close()

    counters = run_guarded(scenario, Limits())
    assert counters.refused == {"no_token": 1}


def test_over_max_connections_a_new_one_gets_503_at_once_but_a_peer_gets_in() -> None:
    limits = Limits(max_connections=3, header_timeout_s=5)
    peer = ipaddress.ip_address("127.0.0.2")

    async def scenario(server: ApiServer) -> None:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        answer = await read_until_closed(reader, 2)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"api.max_connections" in answer
        # The farm's own nodes have a pool of their own: a flood cannot keep them out.
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        ) as client:
            resp = await client.get(server.url + "/openapi.json")
            assert resp.status_code == 200
        for _, w in [*held, (reader, writer)]:
            w.close()

    counters = run_guarded(scenario, limits, peers=[peer])
    assert counters.refused == {"max_connections": 1}


def test_a_tls_handshake_that_never_comes_is_closed_and_counted(cert: tuple[Path, Path]) -> None:
    limits = Limits(header_timeout_s=0.5)

    async def scenario(server: ApiServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await read_until_closed(reader, 3) == b""
        writer.close()
        verify = ssl.create_default_context(cafile=str(cert[0]))
        async with httpx.AsyncClient(verify=verify) as client:
            assert (await client.get(server.url + "/openapi.json")).status_code == 200

    counters = run_guarded(scenario, limits, cert=cert)
    assert counters.refused == {"tls_handshake": 1}


def test_tls_handshakes_in_progress_count_against_the_cap(cert: tuple[Path, Path]) -> None:
    limits = Limits(header_timeout_s=0.6, max_connections=4)

    async def scenario(server: ApiServer) -> None:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        await asyncio.sleep(0.1)
        assert server.counters.connections == 4
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await read_until_closed(reader, 0.4) == b""  # at once, before any deadline
        for r, _ in held:
            assert await read_until_closed(r, 3) == b""
        for _, w in [*held, (reader, writer)]:
            w.close()

    counters = run_guarded(scenario, limits, cert=cert)
    assert counters.refused == {"max_connections": 1, "tls_handshake": 4}
    assert counters.connections == 0
