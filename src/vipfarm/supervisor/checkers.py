"""Health checkers and the rise/fall filter.

Theory of operation
-------------------
A checker is one probe of the application, run every `interval_s` and bounded by `timeout_s`:

- `tcp`: a TCP connection to host:port opens.
- `http`: `GET url` (httpx, no redirect followed, no proxy) answers `expect_status`, and the
  first 64 KiB of the body contain `expect_body` when it is set.
- `process`: a process with that name runs (its `comm`, or the basename of `argv[0]`, from
  /proc), or the PID in `pidfile` is alive. Zombies count as dead.
- `command`: the command exits 0; it runs in its own process group, killed as a group on timeout.
- `link`: /sys/class/net/IF/operstate is `up`, or `unknown` with carrier (loopback, some
  virtual devices never report `up`).

A probe never raises: every failure, including its timeout, becomes `CheckResult(ok=False,
detail)`. `RiseFall` turns the stream of results into a state with hysteresis: healthy after
`rise` consecutive successes, unhealthy after `fall` consecutive failures. It starts unhealthy,
so an application is never reported healthy before it has proved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from vipfarm.supervisor.scripts import ScriptRunner, pid_alive
from vipfarm.supervisor.spec import (
    CheckerSpec,
    CommandCheck,
    HttpCheck,
    LinkCheck,
    ProcessCheck,
    TcpCheck,
)

HTTP_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str


class RiseFall:
    """Healthy after `rise` consecutive successes, unhealthy after `fall` consecutive failures."""

    def __init__(self, rise: int, fall: int) -> None:
        self.rise, self.fall = rise, fall
        self.healthy = False
        self._streak = 0  # consecutive results that disagree with the current state

    def update(self, ok: bool) -> bool:
        """Feed one result; True when the state changed."""
        if ok == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= (self.rise if ok else self.fall):
            self.healthy, self._streak = ok, 0
            return True
        return False


async def _tcp(spec: TcpCheck) -> CheckResult:
    _, writer = await asyncio.open_connection(spec.host, spec.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return CheckResult(True, "connected")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Only http:// URLs are checked, but httpx builds a verifying TLS context (the CA bundle,
    # some 50 ms of CPU) for every client it makes unless it is handed one: make it once.
    return ssl.create_default_context()


_CLIENTS: dict[tuple[int, float], httpx.AsyncClient] = {}


def _client(timeout_s: float) -> httpx.AsyncClient:
    """One client per event loop and timeout: building one (its transport, its pools) cost
    more than the check itself. No connection is kept alive, so every check still opens a new
    connection, as a client of the application would."""
    key = (id(asyncio.get_running_loop()), timeout_s)
    client = _CLIENTS.get(key)
    if client is None:
        if len(_CLIENTS) > 16:  # loops of tests come and go: never grow without bound
            _CLIENTS.clear()
        # trust_env=False: a proxy from the environment must not stand between the node and
        # its own application.
        client = _CLIENTS[key] = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=_tls_context(),
            headers={"User-Agent": "vipfarm-checker"},
            limits=httpx.Limits(max_keepalive_connections=0),
        )
    return client


async def _http(spec: HttpCheck) -> CheckResult:
    async with _client(spec.timeout_s).stream("GET", spec.url) as response:
        status = response.status_code
        if status != spec.expect_status:
            return CheckResult(False, f"status {status}, expected {spec.expect_status}")
        if spec.expect_body is None:
            return CheckResult(True, f"status {status}")
        body = b""
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= HTTP_BODY_LIMIT:
                break
        if spec.expect_body.encode() not in body[:HTTP_BODY_LIMIT]:
            return CheckResult(False, f"status {status}, body lacks {spec.expect_body!r}")
        return CheckResult(True, f"status {status}, body matches")


def _process_names(pid: str) -> tuple[str, str]:
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    return comm, os.path.basename(argv0.decode(errors="replace"))


def _process(spec: ProcessCheck) -> CheckResult:
    if spec.pidfile is not None:
        try:
            text = spec.pidfile.read_text().strip()
        except OSError as exc:
            return CheckResult(False, f"pidfile {spec.pidfile}: {exc.strerror}")
        if not text.isdigit():
            return CheckResult(False, f"pidfile {spec.pidfile} holds {text[:20]!r}, not a PID")
        pid = int(text)
        if pid_alive(pid):
            return CheckResult(True, f"pid {pid} alive")
        return CheckResult(False, f"pid {pid} from {spec.pidfile} is not running")
    name = spec.process or ""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # comm is cut at 15 characters; argv[0] has the full name (if not rewritten).
            if name in _process_names(entry.name) and pid_alive(int(entry.name)):
                return CheckResult(True, f"pid {entry.name} is {name}")
        except OSError:
            continue  # exited while we looked
    return CheckResult(False, f"no process named {name}")


def _link(spec: LinkCheck) -> CheckResult:
    base = Path("/sys/class/net") / spec.interface
    try:
        state = (base / "operstate").read_text().strip()
    except OSError:
        return CheckResult(False, f"no interface {spec.interface}")
    if state == "up":
        return CheckResult(True, "up")
    if state == "unknown":
        with contextlib.suppress(OSError):
            if (base / "carrier").read_text().strip() == "1":
                return CheckResult(True, "unknown, carrier up")
    return CheckResult(False, f"operstate {state}")


async def run_check(spec: CheckerSpec, runner: ScriptRunner) -> CheckResult:
    """One probe, bounded by spec.timeout_s; every failure is a result, never an exception."""
    try:
        if isinstance(spec, CommandCheck):
            # The runner owns the timeout so it can kill the whole group.
            res = await runner.run(
                spec.label, spec.argv, spec.timeout_s, grace_s=0, to_app_log=False
            )
            detail = res.tail[-1] if res.tail else ""
            return CheckResult(res.ok, res.summary + (f": {detail}" if detail else ""))
        async with asyncio.timeout(spec.timeout_s):
            if isinstance(spec, TcpCheck):
                return await _tcp(spec)
            if isinstance(spec, HttpCheck):
                return await _http(spec)
            if isinstance(spec, ProcessCheck):
                return _process(spec)
            return _link(spec)
    except (TimeoutError, httpx.TimeoutException):
        return CheckResult(False, f"timed out after {spec.timeout_s:g}s")
    except httpx.RemoteProtocolError as exc:
        return CheckResult(False, f"not an HTTP response: {exc}")
    except httpx.HTTPError as exc:
        # httpx wraps the socket's error (connection refused, reset): report the socket's words,
        # as the tcp checker does.
        cause: BaseException = exc
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner
        return CheckResult(False, str(cause) or type(cause).__name__)
    except (OSError, ValueError) as exc:
        return CheckResult(False, str(exc) or type(exc).__name__)
    except Exception as exc:  # a bug in a probe must read as a failed check, not kill the loop
        return CheckResult(False, f"checker error: {exc!r}")
