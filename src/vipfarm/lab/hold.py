"""Hold many long-lived HTTP/1.1 connections from a client and probe them on command.

`python -m vipfarm.lab.hold URL --count N` opens N keep-alive connections (each sends one
request, so each knows the node serving it), prints one JSON line, then reads commands on stdin:
`probe` sends one more request on every connection and prints a JSON line; `quit` (or EOF)
closes them all and exits. Each JSON line is
`{"open": N, "ok": K, "nodes": {"node1": n, ...}, "errors": {"reset": n, ...},
"moved": M}` where `moved` counts connections now answered by another node than the first time
(which would mean a connection was broken and silently replaced: it never should be).

Stdlib only, one process, asyncio streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from vipfarm.lab.load import _classify


@dataclass
class Conn:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    first: str | None = None
    last: str | None = None
    error: str | None = None
    served: int = 0


async def _ask(c: Conn, host: str, timeout: float) -> None:
    assert c.reader is not None and c.writer is not None
    c.writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    async with asyncio.timeout(timeout):
        await c.writer.drain()
        head = await c.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await c.reader.readexactly(length)
    c.last = body.decode(errors="replace").split("\n", 1)[0]
    c.first = c.first or c.last
    c.served += 1


async def _open(c: Conn, host: str, port: int, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            c.reader, c.writer = await asyncio.open_connection(host, port)
        await _ask(c, host, timeout)
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
        c.error = _classify(e) if isinstance(e, OSError | ValueError) else "closed"


async def _probe(c: Conn, host: str, timeout: float) -> None:
    if c.error:
        return
    try:
        await _ask(c, host, timeout)
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
        c.error = _classify(e) if isinstance(e, OSError | ValueError) else "closed"


def report(conns: list[Conn]) -> dict[str, object]:
    ok = [c for c in conns if not c.error]
    return {
        "open": len(conns),
        "ok": len(ok),
        "nodes": dict(Counter(c.last for c in ok)),
        "errors": dict(Counter(c.error for c in conns if c.error)),
        "moved": sum(1 for c in ok if c.last != c.first),
    }


async def main_async(url: str, count: int, timeout: float) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 80
    conns = [Conn() for _ in range(count)]
    await asyncio.gather(*(_open(c, host, port, timeout) for c in conns))
    print(json.dumps(report(conns)), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.strip()
        if cmd == "probe":
            await asyncio.gather(*(_probe(c, host, timeout) for c in conns))
            print(json.dumps(report(conns)), flush=True)
        elif cmd in ("quit", ""):
            break
    for c in conns:
        if c.writer is not None:
            c.writer.close()
    print(json.dumps(report(conns)), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipfarm.lab.hold")
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.url, args.count, args.timeout))


if __name__ == "__main__":
    main()
