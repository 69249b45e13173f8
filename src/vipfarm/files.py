"""Writing a file so that a reader, or a crash, sees the old content or the new, never half.

Theory of operation
-------------------
`write_atomic` writes the data to a new temporary file in the directory of the target (the same
file system, so the rename below is atomic), flushes it and fsyncs it, then renames it over the
target and fsyncs the directory. Without the first fsync a crash after the rename can leave an
empty or partial file under the target's name (the rename reached the disk, the data did not);
without the second the rename itself may be lost. On any failure the temporary file is removed
and the target is untouched.

The mode of the new file: `mode` when given; else the mode of the file it replaces; else what
`open()` would create (0o666 less the umask).

`file_kind` and `owner_name` word a stat result for the messages of the checks on files that
vipfarm reads as secrets (`vipfarm.config.secrets`) or runs as root
(`vipfarm.supervisor.scripts.untrusted`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from pathlib import Path

__all__ = ["file_kind", "owner_name", "write_atomic"]


def file_kind(mode: int) -> str:
    """What a stat mode is, as a noun phrase: 'a directory', 'a FIFO (named pipe)', ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def owner_name(uid: int) -> str:
    """'uid 1000 (alice)', or 'uid 1000' when the user database does not know it."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OverflowError):
        return f"uid {uid}"


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` (text is written as UTF-8) atomically and durably."""
    raw = data.encode() if isinstance(data, str) else data
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o7777
    # A random name, created exclusively: two writers of one target never share a temporary.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
