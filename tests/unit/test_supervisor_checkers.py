"""The http checker against a local server: status, body, redirects, garbage, timeouts."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from vipfarm.supervisor.checkers import HTTP_BODY_LIMIT, CheckResult, run_check
from vipfarm.supervisor.scripts import ScriptRunner
from vipfarm.supervisor.spec import HttpCheck

Reply = Callable[[bytes], Awaitable[bytes | None]]  # request line -> raw answer (None: hang)

RUNNER = ScriptRunner(
    env={}, cwd=None, app_log=logging.getLogger("test.app"), module_log=logging.getLogger("test")
)


def check(reply: Reply, path: str = "/", **kw: object) -> CheckResult:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        answer = await reply(request)
        if answer is None:
            await asyncio.sleep(10)
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    async def main() -> CheckResult:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            spec = HttpCheck.model_validate({"url": f"http://127.0.0.1:{port}{path}", **kw})
            return await run_check(spec, RUNNER)

    return asyncio.run(main())


def answer(status: bytes, body: bytes = b"pong\n", headers: bytes = b"") -> Reply:
    async def reply(request: bytes) -> bytes:
        return (
            b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain\r\n" + headers + b"\r\n" + body
        )

    return reply


def test_status_and_body() -> None:
    assert check(answer(b"200 OK")) == CheckResult(True, "status 200")
    assert check(answer(b"200 OK"), expect_body="pong") == CheckResult(
        True, "status 200, body matches"
    )
    assert check(answer(b"200 OK"), expect_body="nope") == CheckResult(
        False, "status 200, body lacks 'nope'"
    )
    assert check(answer(b"503 Unavailable")) == CheckResult(False, "status 503, expected 200")
    assert check(answer(b"503 Unavailable"), expect_status=503).ok


def test_the_request_names_the_path_and_query() -> None:
    seen: list[bytes] = []

    async def reply(request: bytes) -> bytes | None:
        seen.append(request)
        return await answer(b"200 OK")(request)

    assert check(reply, "/health?deep=1").ok
    assert seen == [b"GET /health?deep=1 HTTP/1.1\r\n"]


def test_only_the_first_64_kib_of_the_body_count() -> None:
    late = answer(b"200 OK", b"x" * HTTP_BODY_LIMIT + b"pong")
    assert check(late, expect_body="pong") == CheckResult(False, "status 200, body lacks 'pong'")
    early = answer(b"200 OK", b"x" * (HTTP_BODY_LIMIT - 4) + b"pong")
    assert check(early, expect_body="pong").ok


def test_a_redirect_is_not_followed() -> None:
    moved = answer(b"302 Found", b"", b"Location: http://127.0.0.1:1/\r\n")
    assert check(moved) == CheckResult(False, "status 302, expected 200")
    assert check(moved, expect_status=302).ok


def test_garbage_is_not_an_http_response() -> None:
    async def garbage(request: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH_9.2\r\n"

    res = check(garbage)
    assert not res.ok and res.detail.startswith("not an HTTP response: ")


def test_a_silent_server_times_out() -> None:
    async def hang(request: bytes) -> None:
        return None

    assert check(hang, timeout_s=0.2) == CheckResult(False, "timed out after 0.2s")


def test_nobody_listening_is_a_failure_not_an_exception() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the check runs
    res = asyncio.run(run_check(HttpCheck(url=f"http://127.0.0.1:{port}/"), RUNNER))
    assert not res.ok and "Connect call failed" in res.detail
