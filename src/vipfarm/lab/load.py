"""Many requests from one client process, each classified: served by which node, or why not.

`python -m vipfarm.lab.load URL --count N [--concurrency C] [--timeout S] [--total-timeout S]
[--source-port P] [--rate R]` runs inside a client namespace and prints one JSON object:
`{"elapsed_s": ..., "results": [{"node": "node2", "error": null, "sport": 40001, "ms": 1.3,
"status": 200, "body": "node2\\n"}, ...]}` in request order.

URL is `http://HOST[:PORT]/PATH` (HOST may be `[v6]`) or `udp://HOST:PORT`. Every request uses a
fresh socket, so with a `client-ip-port` rule every request is hashed anew. `--source-port P`
gives request i the source port P + i (the port pinned, the same request lands on the same node).
HTTP requests are HTTP/1.0, so the server closes first and the client keeps no TIME_WAIT.

An error is one word: `refused` (RST to the SYN), `reset` (RST later), `timeout` (no answer
within the per-request timeout or before the total deadline), `http-<status>`, `bad-reply`, or
the errno name in lower case (e.g. `ehostunreach`).

Stdlib only: it starts in a fraction of a second inside the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    node: str | None
    error: str | None
    sport: int
    ms: float
    status: int | None = None
    body: str = ""
    t: float = 0.0  # when the request started, seconds after the run began


def parse_http(data: bytes) -> tuple[int, str]:
    """(status, body) of a raw HTTP/1.x response; ValueError when it is not one."""
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP response")
    return int(parts[1]), body.decode(errors="replace")


def _classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return "bad-reply"


@dataclass(frozen=True)
class Target:
    udp: bool
    family: socket.AddressFamily
    addr: tuple[str, int]
    request: bytes  # HTTP request; for UDP the payload is the request number


def parse_target(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "udp") or not parts.hostname:
        raise ValueError(f"target {url!r}: use http://HOST[:PORT]/PATH or udp://HOST:PORT")
    host = parts.hostname
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if parts.scheme == "udp":
        if parts.port is None:
            raise ValueError(f"target {url!r} has no port: use udp://HOST:PORT")
        return Target(True, family, (host, parts.port), b"")
    hostport = f"[{host}]" if family == socket.AF_INET6 else host
    path = parts.path or "/"
    request = f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode()
    return Target(False, family, (host, parts.port or 80), request)


async def _exchange(sock: socket.socket, target: Target, i: int) -> Reply:
    loop = asyncio.get_running_loop()
    if target.udp:
        payload = str(i).encode()
        await loop.sock_sendto(sock, payload, target.addr)
        data = await loop.sock_recv(sock, 65535)
        node, _, echoed = data.decode(errors="replace").partition(" ")
        if echoed.encode() != payload:
            return Reply(None, "bad-reply", 0, 0.0, body=data.decode(errors="replace"))
        return Reply(node, None, 0, 0.0, body=data.decode(errors="replace"))
    await loop.sock_connect(sock, target.addr)
    await loop.sock_sendall(sock, target.request)
    chunks = []
    while chunk := await loop.sock_recv(sock, 65536):
        chunks.append(chunk)
    status, body = parse_http(b"".join(chunks))
    if status != 200:
        return Reply(None, f"http-{status}", 0, 0.0, status, body)
    return Reply(body.split("\n", 1)[0], None, 0, 0.0, status, body)


async def _one(target: Target, i: int, sport: int | None, timeout: float, deadline: float) -> Reply:
    sock = socket.socket(target.family, socket.SOCK_DGRAM if target.udp else socket.SOCK_STREAM)
    sock.setblocking(False)
    t0 = time.monotonic()
    try:
        if sport is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", sport))
        async with asyncio.timeout(max(0.0, min(timeout, deadline - t0))):
            reply = await _exchange(sock, target, i)
    except (OSError, ValueError) as e:
        reply = Reply(None, _classify(e), 0, 0.0)
    finally:
        port = sock.getsockname()[1]
        sock.close()
    reply.sport, reply.ms = port, round((time.monotonic() - t0) * 1000, 3)
    return reply


async def run(
    url: str,
    count: int,
    concurrency: int = 50,
    timeout: float = 2.0,
    total_timeout: float = 30.0,
    source_port: int | None = None,
    rate: float | None = None,
) -> list[Reply]:
    """Send `count` requests, at most `concurrency` at a time, all within `total_timeout`;
    with `rate`, request i starts no earlier than i / rate seconds after the first (a stream)."""
    target = parse_target(url)
    start = time.monotonic()
    deadline = start + total_timeout
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Reply:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        async with gate:
            sport = None if source_port is None else source_port + i
            t = time.monotonic() - start
            reply = await _one(target, i, sport, timeout, deadline)
            reply.t = round(t, 4)
            return reply

    return list(await asyncio.gather(*(gated(i) for i in range(count))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipfarm.lab.load")
    parser.add_argument("url", help="http://HOST[:PORT]/PATH or udp://HOST:PORT")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    parser.add_argument("--total-timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--source-port", type=int, help="request i uses source port P+i")
    parser.add_argument("--rate", type=float, help="start at most this many requests a second")
    args = parser.parse_args(argv)
    if args.count < 1 or args.concurrency < 1:
        parser.error("--count and --concurrency must be at least 1")
    if args.source_port is not None and not 1 <= args.source_port <= 65536 - args.count:
        parser.error(f"--source-port {args.source_port}: ports P..P+count-1 must be 1..65535")
    try:
        parse_target(args.url)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.monotonic()
    results = asyncio.run(
        run(
            args.url,
            args.count,
            args.concurrency,
            args.timeout,
            args.total_timeout,
            args.source_port,
            args.rate,
        )
    )
    elapsed = round(time.monotonic() - t0, 3)
    json.dump({"elapsed_s": elapsed, "results": [asdict(r) for r in results]}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
