"""Reading the files a farm file names: secrets (farm key, API token, TLS key) and the others,
without trusting them.

Theory of operation
-------------------
Every file that the configuration names is read by one of two functions here, never by
`Path.read_bytes()`:

* `read_capped(path, what=..., max_bytes=...)` for files that are not secret (the farm file, a
  module's `module.toml`, PEM certificates): the path (symlinks resolved) must name a regular
  file, which is read with a cap.
* `read_secret(path, what=..., max_bytes=...)` for secrets: the same, and the file must be owned
  by root (or by the user running vipfarm) and have no group or other permission bits, as ssh
  demands of a private key. A key that others could read is not secret any more; one that
  another user owns can be replaced by them.

Both first `stat` the resolved path and refuse anything but a regular file before opening it:
opening a FIFO would block until a writer comes, and opening a device may have effects of its
own. The file is then opened with `O_NONBLOCK | O_NOFOLLOW` (in case it was swapped for a FIFO
or a link since the `stat`), checked again with `fstat` on the open descriptor (the checks apply
to what is actually read, not to what the path named a moment before) and read with at most
`max_bytes + 1` bytes asked for, so a huge file or a device costs nothing and is refused as too
large. A refusal is a `FileRefused` (a `ValueError`, so that pydantic validators report it at
the key that named the file) whose text names the file, what is wrong with it and the exact
fix, e.g. `/etc/vipfarm/farm.key is mode 0644 (readable by group and others): run chmod 600
/etc/vipfarm/farm.key`.

`key_bytes` is what a key or token file holds: its bytes without one final line ending.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vipfarm.files import file_kind, owner_name

__all__ = ["FileRefused", "a", "create_hint", "key_bytes", "read_capped", "read_secret"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW


class FileRefused(ValueError):
    """A file vipfarm will not read; the text names the file, what is wrong and the fix."""


def key_bytes(data: bytes) -> bytes:
    """The key in a key file: its bytes without one final line ending, so that a key written
    with or without a newline by an editor is the same key; binary keys work too."""
    for ending in (b"\r\n", b"\n"):
        if data.endswith(ending):
            return data[: -len(ending)]
    return data


def a(what: str) -> str:
    """`what` with its indefinite article: 'a farm key', 'an API token'."""
    return f"an {what}" if what[:1].lower() in "aeio" or what.startswith("API") else f"a {what}"


def create_hint(path: Path | str) -> str:
    """The command that creates a random key or token file only its owner can read."""
    return f"(umask 077; head -c 32 /dev/urandom | base64 > {path})"


def read_capped(
    path: Path | str, *, what: str, max_bytes: int, missing_hint: str | None = None
) -> bytes:
    """The content of the regular file `path` (symlinks followed), at most `max_bytes`.

    Raises FileRefused naming the file: missing (`missing_hint` is the fix), not a regular file,
    unreadable or larger than `max_bytes`."""
    return _read(Path(path), what, max_bytes, missing_hint, secret=False)


def read_secret(
    path: Path | str,
    *,
    what: str,
    max_bytes: int,
    missing_hint: str | None = None,
    check_access: bool = True,
) -> bytes:
    """The content of the secret file `path`, checked as described in the module docstring.

    `check_access=False` keeps the checks on the kind and size of the file but not those on its
    owner and mode (for a user's own copy of a token, which root does not rely on). The hint for
    a missing file defaults to `create_hint(path)`."""
    hint = missing_hint if missing_hint is not None else f"create one with: {create_hint(path)}"
    return _read(Path(path), what, max_bytes, hint, secret=check_access)


def _read(path: Path, what: str, max_bytes: int, hint: str | None, *, secret: bool) -> bytes:
    try:
        real = Path(os.path.realpath(path))
        st = os.stat(real)
    except ValueError:  # a NUL byte in the name
        raise FileRefused(f"{path!r} is not a file name (it holds a NUL byte)") from None
    except FileNotFoundError:
        raise FileRefused(f"{path} does not exist" + (f": {hint}" if hint else "")) from None
    except OSError as exc:
        raise FileRefused(f"cannot read {path} ({exc.strerror})") from None
    shown = str(path) if real == Path(os.path.abspath(path)) else f"{path} (a link to {real})"
    _check_kind(st, shown, what)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise FileRefused(f"cannot read {shown} ({exc.strerror})") from None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise FileRefused(f"{shown} changed while it was being read: try again")
        _check_kind(fst, shown, what)
        if secret:
            _check_access(fst, shown, real, what)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FileRefused(f"cannot read {shown} ({exc.strerror})") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise FileRefused(
            f"{shown} is larger than {max_bytes} bytes, too large for {a(what)}: "
            "is it the right file?"
        )
    return b"".join(chunks)


def _check_kind(st: os.stat_result, shown: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(
            f"{shown} is {file_kind(st.st_mode)}, not a regular file: name the file that holds "
            f"the {what}"
        )


def _check_access(st: os.stat_result, shown: str, real: Path, what: str) -> None:
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        who = "root" if euid == 0 else f"root or {owner_name(euid)}"
        to = "root" if euid == 0 else str(euid)
        raise FileRefused(
            f"{shown} is owned by {owner_name(st.st_uid)}: {a(what)} must be owned by {who}, "
            f"as anyone else could replace it: run chown {to} {real}"
        )
    if st.st_mode & 0o077:
        raise FileRefused(
            f"{shown} is mode {stat.S_IMODE(st.st_mode):04o} ({_access_text(st.st_mode)}): "
            f"run chmod 600 {real}"
        )


def _access_text(mode: int) -> str:
    """'readable by group and others', 'writable by group, readable by others', ..."""

    def perms(bits: int) -> str:
        names = [
            n for bit, n in ((4, "readable"), (2, "writable"), (1, "executable")) if bits & bit
        ]
        return " and ".join(names)

    group, other = (mode >> 3) & 7, mode & 7
    if group == other:
        return f"{perms(group)} by group and others"
    parts = [
        f"{perms(group)} by group" if group else "",
        f"{perms(other)} by others" if other else "",
    ]
    return ", ".join(p for p in parts if p)
