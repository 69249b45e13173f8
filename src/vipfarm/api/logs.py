"""Reading a node's log files for the API: pages of whole lines, and a live follow.

Pages are addressed by byte offsets, which stay valid while the file grows: without an offset a
page is the last `limit` lines (read backwards in blocks, so a big log costs only what is
returned); with one it is up to `limit` lines from there, and `next_offset` continues. Reads are
plain blocking file reads, so the API runs them in a worker thread, never on the event loop.

`follow` yields new complete lines as they are appended (polling, as `tail -F` does), starts
over from the beginning when the file was rotated (a new inode or a shorter file), and ends when
`stop()` says so (the server shuts down) or the consumer goes away.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from vipfarm.api.models import LogName, LogPage

BLOCK = 64 * 1024
MAX_PAGE_BYTES = 4 * 1024 * 1024
FOLLOW_POLL_S = 0.25


def read_page(path: Path, log: LogName, offset: int | None, limit: int) -> LogPage:
    """Lines of `path`: the last `limit` ones, or up to `limit` from byte `offset`."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return LogPage(log=log, lines=[], offset=0, next_offset=0, size=0)
    with f:
        size = os.fstat(f.fileno()).st_size
        start = _tail_start(f, size, limit) if offset is None else min(offset, size)
        f.seek(start)
        data = f.read(min(size - start, MAX_PAGE_BYTES))
    # Only whole lines: a line still being written is left for the next page.
    end = data.rfind(b"\n") + 1
    chunk = data[:end].splitlines()[:limit]
    used = sum(len(line) + 1 for line in chunk)
    return LogPage(
        log=log,
        lines=[line.decode("utf-8", errors="replace") for line in chunk],
        offset=start,
        next_offset=start + used,
        size=size,
    )


def _tail_start(f: BinaryIO, size: int, limit: int) -> int:
    """Byte offset where the last `limit` complete lines begin."""
    pos = size
    newlines = 0
    # The last byte is normally the final newline; it ends the last line, it does not start one.
    f.seek(max(0, size - 1))
    trailing = f.read(1) == b"\n"
    need = limit + (1 if trailing else 0)
    while pos > 0 and size - pos < MAX_PAGE_BYTES:
        step = min(BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        count = block.count(b"\n")
        if newlines + count >= need:
            # Walk back to the newline that precedes the first wanted line.
            idx = len(block)
            for _ in range(need - newlines):
                idx = block.rindex(b"\n", 0, idx)
            return pos + idx + 1
        newlines += count
    return pos


async def follow(path: Path, offset: int | None, stop: Callable[[], bool]) -> AsyncIterator[bytes]:
    """New complete lines of `path` from `offset` (default: its current end), as they come."""
    pos = offset
    ino: int | None = None
    pending = b""
    while not stop():
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            await asyncio.sleep(FOLLOW_POLL_S)
            continue
        if pos is None:
            pos = st.st_size
        if (ino is not None and st.st_ino != ino) or st.st_size < pos:
            pos, pending = 0, b""  # rotated or truncated: the new file from its start
        ino = st.st_ino
        if st.st_size > pos:
            data = await asyncio.to_thread(_read_from, path, pos, st.st_size - pos)
            pos += len(data)
            pending += data
            end = pending.rfind(b"\n") + 1
            if end:
                yield pending[:end]
                pending = pending[end:]
            continue
        await asyncio.sleep(FOLLOW_POLL_S)


def _read_from(path: Path, pos: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(pos)
        return f.read(min(n, MAX_PAGE_BYTES))
