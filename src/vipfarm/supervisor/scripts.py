"""Running module scripts and command checkers as process groups.

Theory of operation
-------------------
Every script runs in a new session (`start_new_session=True`), so it leads its own process group
and everything it forks stays in that group unless it calls `setsid` itself (as daemons do).
Killing the group therefore reaches grandchildren that a plain `kill(pid)` would orphan.

Output does not go through asyncio's subprocess pipes: with those, `Process.wait()` (Python
3.11) returns only once every pipe is closed, and a start script whose application keeps running
in the background keeps the pipe open forever. Instead the runner makes its own pipe, gives the
write end to the child as stdout and stderr, and reads the other end with a line protocol; the
script's exit and the end of its output are thus independent. Each line goes to the application
log prefixed with the script name. When the script has exited, the runner waits a moment for
its last lines; if a background process still holds the pipe, the pump stays attached (so the
application's output keeps reaching the log) until `close()`.

A script that outlives its timeout gets SIGTERM to its group, then SIGKILL after a grace. A
finished script's group is killed too (anything it left behind is a leak), except for the start
script, whose group may hold the application: the runner remembers those groups so a forced stop
can kill them. Liveness of a group is read from /proc, ignoring zombies: a container's PID 1
may never reap the orphans it inherits, and a zombie has exited in every sense that matters.

If the coroutine running a script is cancelled, the script's group gets SIGKILL before the
cancellation propagates, so cancelling a supervisor leaves no script behind.

The daemon runs scripts as root, so what it runs must be as safe as root itself, as sshd's
StrictModes demands of authorized_keys: `untrusted(path)` resolves the path's symlinks, then
checks the file and every directory above it up to `/`: each must be owned by root (or by the
user running vipfarm) and not writable by group or others, since whoever can write any of them
can make root run their code. A world-writable directory with the sticky bit (`/tmp`) is allowed
above the file: there only an entry's owner may replace it, and the entry below it is checked.
The configuration runs this check on the module and its scripts when it is loaded (so
`vipfarm config check` reports it), and `ScriptRunner.run` again just before each run, when
root, on the program it is about to run (a file may have changed since); a refused program is a
script that could not run, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vipfarm.files import file_kind, owner_name
from vipfarm.log import event
from vipfarm.supervisor.logs import log_output

MAX_LINE = 4096
TAIL_LINES = 5
EXIT_DRAIN_S = 0.2
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class ScriptResult:
    """How one run ended. `exit_code` is negative for a signal, None if it could not start."""

    name: str
    exit_code: int | None
    duration_s: float
    timed_out: bool = False
    error: str | None = None
    tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def summary(self) -> str:
        if self.error is not None:
            return f"{self.name} could not run: {self.error}"
        if self.timed_out:
            return f"{self.name} timed out after {self.duration_s:.1f}s"
        assert self.exit_code is not None
        if self.exit_code < 0:
            return f"{self.name} killed by signal {-self.exit_code}"
        return f"{self.name} exited {self.exit_code}"


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat from the state field on, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] != b"Z"


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is pgid."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields and len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def signal_group(pgid: int, sig: int) -> bool:
    """Send sig to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only possible if the PGID was recycled by another user's session: not ours any more.
        return False
    return True


async def kill_group(pgid: int, grace_s: float) -> bool:
    """SIGTERM the group, wait up to grace_s for it to empty, then SIGKILL what is left.

    Returns True if SIGKILL was needed.
    """
    if not group_members(pgid):
        return False
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return False
        await asyncio.sleep(POLL_S)
    signal_group(pgid, signal.SIGKILL)
    # SIGKILL cannot be caught; the members vanish as soon as the kernel tears them down.
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    return True


def untrusted(path: Path | str) -> str | None:
    """Why root must not run (or trust the content of) `path`, with the fix; None if it may.

    Checks `path` (symlinks resolved) and every directory above it, as described in the module
    docstring; a missing file is not this check's business (None)."""
    try:
        real = Path(os.path.realpath(path))
    except ValueError:
        return f"{path!r} is not a file name (it holds a NUL byte)"
    trusted = {0, os.geteuid()}
    who = "root" if os.geteuid() == 0 else f"root or {owner_name(os.geteuid())}"
    for i, p in enumerate((real, *real.parents)):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot check {p} ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):  # replaced by a link since realpath: check again later
            return f"{p} changed while it was being checked: try again"
        if i > 0 and not stat.S_ISDIR(st.st_mode):
            return f"{p} is {file_kind(st.st_mode)}, not a directory"
        if st.st_uid not in trusted:
            return (
                f"{p} is owned by {owner_name(st.st_uid)}, who could make root run anything "
                f"there: it must be owned by {who}: run chown root {p}"
            )
        writable = st.st_mode & 0o022
        if writable and not (i > 0 and st.st_mode & stat.S_ISVTX):
            which = {0o020: "group", 0o002: "others", 0o022: "group and others"}[writable]
            letters = {0o020: "g", 0o002: "o", 0o022: "go"}[writable]
            return (
                f"{p} is mode {stat.S_IMODE(st.st_mode):04o} (writable by {which}), so they "
                f"could make root run anything there: run chmod {letters}-w {p}"
            )
    return None


class _LinePump(asyncio.Protocol):
    """Reads a pipe, splits it into lines, hands each line to a callback."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._buf = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line[:MAX_LINE].decode(errors="replace").rstrip("\r")
        if text:
            self._on_line(text)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = b""
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ScriptRunner:
    """Runs scripts for one application: common environment, working directory and logs."""

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        app_log: logging.Logger,
        module_log: logging.Logger,
    ) -> None:
        self._env = {**os.environ, **env}
        self._cwd = cwd
        self._app_log = app_log
        self._log = module_log
        self._lingering: set[_LinePump] = set()
        # Groups of finished start scripts that may still hold the application.
        self.kept_groups: list[int] = []

    async def run(
        self,
        name: str,
        argv: Sequence[str],
        timeout_s: float,
        *,
        grace_s: float = 2.0,
        keep_group: bool = False,
        to_app_log: bool = True,
    ) -> ScriptResult:
        """Run argv in its own process group; never raises for a failing or missing script."""
        tail: deque[str] = deque(maxlen=TAIL_LINES)

        def on_line(line: str) -> None:
            tail.append(line)
            if to_app_log:
                log_output(self._app_log, name, line)

        started = time.monotonic()
        if (refused := self._refused(argv)) is not None:
            result = ScriptResult(name, None, 0.0, error=refused)
            self._report(result, argv)
            return result
        rfd, wfd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=wfd,
                stderr=wfd,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            os.close(rfd)
            result = ScriptResult(name, None, time.monotonic() - started, error=str(exc))
            self._report(result, argv)
            return result
        finally:
            os.close(wfd)
        pgid = proc.pid
        loop = asyncio.get_running_loop()
        pump = _LinePump(on_line)
        self._lingering.add(pump)
        pump.done.add_done_callback(lambda _: self._lingering.discard(pump))
        timed_out = False
        try:
            await loop.connect_read_pipe(lambda: pump, os.fdopen(rfd, "rb", buffering=0))
            try:
                code = await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                timed_out = True
                await kill_group(pgid, grace_s)
                code = await proc.wait()
            if timed_out or not keep_group:
                await kill_group(pgid, 0)
            elif group_members(pgid):
                self.kept_groups.append(pgid)
        except asyncio.CancelledError:
            # Whatever the script was doing, nothing of it may outlive the cancellation.
            signal_group(pgid, signal.SIGKILL)
            pump.close()
            raise
        # The last lines belong before the "finished" record; a pipe still held by a background
        # process stays attached (in _lingering) until it closes or close() is called.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump.done), EXIT_DRAIN_S)
        result = ScriptResult(name, code, time.monotonic() - started, timed_out, tail=tuple(tail))
        self._report(result, argv)
        return result

    def _refused(self, argv: Sequence[str]) -> str | None:
        """Why root must not run argv[0] (see `untrusted`); only checked when root."""
        if os.geteuid() != 0 or not argv:
            return None
        prog = argv[0]
        if os.sep not in prog:
            found = shutil.which(prog, path=self._env.get("PATH"))
            if found is None:
                return None  # exec reports the missing program
            prog = found
        elif not os.path.isabs(prog) and self._cwd is not None:
            prog = str(self._cwd / prog)
        return untrusted(prog)

    def _report(self, result: ScriptResult, argv: Sequence[str]) -> None:
        level = logging.INFO if result.ok else logging.WARNING
        event(
            self._log,
            "script_finished",
            level=level,
            script=result.name,
            exit_code=result.exit_code,
            duration_s=f"{result.duration_s:.3f}",
            timed_out=result.timed_out,
            **({"error": result.error} if result.error else {}),
            **({"argv": " ".join(argv)} if not result.ok else {}),
        )

    async def kill_kept_groups(self, grace_s: float) -> int:
        """Forced stop of what start scripts left behind; returns how many groups needed it."""
        killed = 0
        for pgid in self.kept_groups:
            members = group_members(pgid)
            if members:
                forced = await kill_group(pgid, grace_s)
                killed += 1
                event(
                    self._log,
                    "group_killed",
                    level=logging.WARNING,
                    pgid=pgid,
                    processes=len(members),
                    sigkill=forced,
                )
        self.kept_groups.clear()
        return killed

    def close(self) -> None:
        """Detach from pipes still held by background processes (their output is dropped)."""
        for pump in list(self._lingering):
            pump.close()
        self._lingering.clear()
