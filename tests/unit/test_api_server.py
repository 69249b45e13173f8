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
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

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


def test_small_answers_do_not_wait_for_a_delayed_ack() -> None:
    """Without TCP_NODELAY on accepted connections a small answer's body waits for the ACK of
    its headers: about 40 ms per request instead of about 1."""

    async def scenario() -> float:
        server = ApiServer(hello_app(), LOOPBACK, free_port())
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                took = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    await client.get(f"{server.url}/hello")
                    took.append(time.perf_counter() - t0)
            return statistics.median(took)
        finally:
            await server.stop()

    assert asyncio.run(scenario()) < 0.02


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
