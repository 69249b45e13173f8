"""The node daemon: `vipfarm daemon` starts a node's two processes and keeps them running.

Theory of operation
-------------------
A node is two processes under one parent, as keepalived splits its VRRP and checker children:

* the **pulse** (`vipfarm.node.pulse`): heartbeats, the membership core, the kernel data path
  and its leases, at a raised scheduling priority, with nothing else on its loop;
* the **manager** (`vipfarm.node.manager`): the application supervisor, the control socket, the
  HTTP API, deployments, logs and metrics.

They talk over the local channel (`vipfarm.node.channel`). This parent does nothing else but
start them, restart whichever dies, and stop them in order, so it is as hard to stall as the
pulse: systemd sees one unit and one main process.

* Start: the pulse first (its data path comes up holding no bucket; the channel socket appears
  when it is ready), then the manager, which connects and says the desired state.
* A child that dies is started again after a pause that grows while it keeps dying quickly
  (`RESTART_MIN_S` to `RESTART_MAX_S`). A dead pulse's leases run out and peers take its
  buckets; the new pulse has a new incarnation and rejoins once the manager reconnects. A dead
  manager makes the pulse count the application unhealthy until the new one reports.
* Both children die with the parent (PR_SET_PDEATHSIG): `kill -9` of the daemon is a crashed
  node, whose leases run out, exactly as before the split. The application belongs to the
  module's scripts and keeps running.
* SIGTERM: the manager drains (buckets given away, connections finished, application stopped)
  and tells the pulse to say goodbye; then the pulse exits, having removed the data path.

Directories (`default_dirs`, each per farm and node): the run directory (/run: sockets, pid
files, the data path's state), the log directory, and the state directory (/var/lib: what must
survive a reboot, the pulse's last incarnation; the lab puts it in its own directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path

from vipfarm.errors import VipfarmError
from vipfarm.files import write_atomic
from vipfarm.log import MODULE_FORMAT, event
from vipfarm.node import channel as ch

RESTART_MIN_S = 0.2
RESTART_MAX_S = 5.0
STABLE_S = 10.0  # a child that ran this long before dying is restarted at once again
READY_TIMEOUT_S = 30.0
PULSE_STOP_TIMEOUT_S = 10.0


class DaemonError(VipfarmError):
    """The daemon cannot run; the text says why and what to do."""


def default_dirs(farm: str, node: str) -> tuple[Path, Path, Path]:
    """(run, log, state) directories. Per farm *and node*, so several nodes of one farm can
    share a filesystem (the lab). The state directory survives reboots: it keeps the pulse's
    last incarnation, which must grow across every restart (docs/PROTOCOL.md)."""
    return (
        Path("/run/vipfarm") / farm / node,
        Path("/var/log/vipfarm") / farm / node,
        Path("/var/lib/vipfarm") / farm / node,
    )


class _Child:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.delay = RESTART_MIN_S
        self.restarts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL
        )
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Daemon:
    def __init__(
        self,
        config_path: Path,
        node: str,
        *,
        run_dir: Path,
        log_dir: Path,
        state_dir: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self.node = node
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.state_dir = state_dir
        common = ["--config", str(config_path), "--node", node, "--run-dir", str(run_dir)]
        state = [] if state_dir is None else ["--state-dir", str(state_dir)]
        self.children = {
            "pulse": _Child([sys.executable, "-m", "vipfarm.node.pulse", *common, *state]),
            "manager": _Child(
                [
                    sys.executable,
                    "-m",
                    "vipfarm.node.manager",
                    *common,
                    "--log-dir",
                    str(log_dir),
                ],
            ),
        }
        self._stopping = False
        self._wake = asyncio.Event()
        self.module_log = logging.getLogger("vipfarm.daemon.module")

    def _setup_log(self) -> None:
        # The manager rotates module.log; a watched handler reopens the file after a rotation
        # instead of writing on into the rotated copy.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(self.log_dir / "module.log")
        handler.setFormatter(logging.Formatter(MODULE_FORMAT))
        self.module_log.addHandler(handler)
        self.module_log.setLevel(logging.INFO)

    async def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self._setup_log()
        # A daemon start means "in the farm"; only a stop asked of this daemon keeps it out.
        (self.run_dir / ch.STOPPED_MARK).unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._terminate)
        try:
            await self._start("pulse", first=True)
            await self._start("manager", first=True)
            event(self.module_log, "daemon_started", node=self.node, pid=os.getpid())
            await self._supervise()
        finally:
            await self._stop_all()
            event(self.module_log, "daemon_stopped", node=self.node)

    def _terminate(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _start(self, role: str, first: bool = False) -> None:
        child = self.children[role]
        if role == "pulse":
            (self.run_dir / ch.SOCKET_NAME).unlink(missing_ok=True)
        await child.start()
        assert child.proc is not None
        # Atomic: a reader (the CLI, a test) sees the old pid or the new one, never an empty file.
        write_atomic(self.run_dir / f"{role}.pid", f"{child.proc.pid}\n")
        if role == "pulse":
            await self._pulse_ready(child, first)
        if not first:
            event(
                self.module_log,
                f"{role}_restarted",
                logging.WARNING,
                pid=child.proc.pid,
                restarts=child.restarts,
            )

    async def _pulse_ready(self, child: _Child, first: bool) -> None:
        sock = self.run_dir / ch.SOCKET_NAME
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not sock.exists():
            assert child.proc is not None
            if child.proc.returncode is not None:
                if first:
                    raise DaemonError(
                        f"the pulse of node {self.node} could not start (exit status "
                        f"{child.proc.returncode}; its error is above)"
                    )
                return  # the supervision loop sees it and tries again
            if time.monotonic() > deadline:
                if first:
                    child.signal(signal.SIGKILL)
                    raise DaemonError(
                        f"the pulse of node {self.node} did not become ready within "
                        f"{READY_TIMEOUT_S:.0f} s"
                    )
                return
            await asyncio.sleep(0.02)

    async def _supervise(self) -> None:
        waits: dict[str, asyncio.Task[int]] = {}
        while not self._stopping:
            for role, child in self.children.items():
                if role not in waits and child.proc is not None:
                    waits[role] = asyncio.create_task(child.proc.wait())
            wake = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait(
                [wake, *waits.values()], return_when=asyncio.FIRST_COMPLETED
            )
            wake.cancel()
            if self._stopping:
                break
            for role in [r for r, t in waits.items() if t in done]:
                del waits[role]
                await self._restart(role)
        for t in waits.values():
            t.cancel()

    async def _restart(self, role: str) -> None:
        child = self.children[role]
        assert child.proc is not None
        ran = time.monotonic() - child.started
        event(
            self.module_log,
            f"{role}_exited",
            logging.ERROR,
            status=child.proc.returncode,
            ran_s=round(ran, 3),
        )
        child.delay = RESTART_MIN_S if ran >= STABLE_S else min(child.delay * 2, RESTART_MAX_S)
        child.restarts += 1
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), child.delay)
        if not self._stopping:
            await self._start(role)

    async def _stop_all(self) -> None:
        """The manager drains and stops the application; then the pulse leaves and exits."""
        manager, pulse = self.children["manager"], self.children["pulse"]
        if manager.alive:
            assert manager.proc is not None
            manager.signal(signal.SIGTERM)
            # No bound of ours: the drain has its own timeout, and systemd's TimeoutStopSec
            # covers it and the stop script.
            await manager.proc.wait()
        if pulse.alive:
            assert pulse.proc is not None
            pulse.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(pulse.proc.wait(), PULSE_STOP_TIMEOUT_S)
            except TimeoutError:
                pulse.signal(signal.SIGKILL)
                await pulse.proc.wait()
