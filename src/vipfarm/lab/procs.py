"""Long-running lab processes: start them in a namespace, record them, stop them for sure.

A process is started as `ip netns exec <ns> argv...`; `ip` execs the command in place, so the
PID we get is the command's own. Each process is recorded in a JSON file (role, namespace, PID,
argv, log file and the kernel start time of the PID). The start time makes the record safe
against PID reuse: `lab down` long after a crash never signals an unrelated process that
happens to have the same PID.

Stopping is SIGTERM, a wait with a deadline, then SIGKILL. Zombies count as dead (and are reaped
when they are our children), so a `Lab` that started its processes itself can stop them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from vipfarm.files import write_atomic


@dataclass(frozen=True)
class ProcRecord:
    role: str  # e.g. node1-app, node1-nginx, node1-datapath
    ns: str
    pid: int
    start: int  # /proc/<pid>/stat starttime, in clock ticks since boot
    argv: list[str]
    log: str

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> ProcRecord:
        return cls(**json.loads(path.read_text()))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a PID, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[1]


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True while `pid` runs (not a zombie) and, when given, still has start time `start`."""
    st = _stat(pid)
    if st is None or (start is not None and st[1] != start):
        return False
    if st[0] in "ZX":
        _reap(pid)
        return False
    return True


def alive(rec: ProcRecord) -> bool:
    return pid_alive(rec.pid, rec.start)


def spawn(ip: str, role: str, ns: str, argv: list[str], log: Path, record: Path) -> ProcRecord:
    """Start `argv` in namespace `ns`, detached in its own session, output to `log`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [ip, "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    start = start_time(proc.pid)
    rec = ProcRecord(role, ns, proc.pid, -1 if start is None else start, argv, str(log))
    rec.save(record)
    return rec


def terminate(pids: Iterable[tuple[int, int | None]], grace_s: float) -> list[int]:
    """SIGTERM every (pid, start time), wait up to `grace_s`, SIGKILL the rest.

    Returns the PIDs that had to be killed.
    """
    todo = [(pid, start) for pid, start in pids if pid_alive(pid, start)]
    for pid, _ in todo:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while todo and time.monotonic() < deadline:
        time.sleep(0.02)
        todo = [(pid, start) for pid, start in todo if pid_alive(pid, start)]
    for pid, _ in todo:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    left = list(todo)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [(pid, start) for pid, start in left if pid_alive(pid, start)]
    return [pid for pid, _ in todo]
