"""The application supervisor of one node.

Theory of operation
-------------------
`AppSupervisor.start()` launches one supervising task that loops over *runs* of the application:

1. run the start script (`start_timeout_s`); a failure ends the run;
2. start one task per checker and wait until every checker is healthy (each through its own
   rise/fall filter), at most `healthy_timeout_s`; report `Healthy`;
3. wait until any checker turns unhealthy; report `Unhealthy`; the run ends.

When a run ends, the restart policy decides: at most `restart.max` restarts within a sliding
window of `restart.within_s` seconds. If a restart is allowed the supervisor reports
`Restarting`, stops the application and begins a new run; otherwise it reports `Exhausted`,
stops the application and gives up (the daemon then takes the node out of the farm).

Stopping the application (`stop()`, a restart, or giving up) runs the stop script with
`stop_timeout_s`; if that fails or times out, the `force_stop` script runs with
`kill_timeout_s`. Then any process still left in a start script's process group gets SIGTERM
and, `kill_timeout_s` later, SIGKILL. The same `kill_timeout_s` is the grace between SIGTERM
and SIGKILL for a script that outlives its own timeout.

Every change is reported as an event dataclass on `events` (an asyncio queue; the oldest event
is dropped if nobody reads it for a long time) and to the optional `on_event` callback, and is
logged to the module log with `vipfarm.log.event`. Checker results are logged when they change.

Cancelling `stop()` or the supervising task kills the script running at that moment together
with its whole process group; the application started by an earlier, finished start script is
only ever stopped by `stop()` (a daemon restart must not take the service down with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from vipfarm.log import event
from vipfarm.supervisor.checkers import CheckResult, RiseFall, run_check
from vipfarm.supervisor.scripts import ScriptResult, ScriptRunner
from vipfarm.supervisor.spec import AppSpec, CheckerSpec, RestartSpec

EVENT_QUEUE_MAX = 1000


class AppState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class Healthy:
    """Every checker is healthy: the node may own buckets."""


@dataclass(frozen=True, slots=True)
class Unhealthy:
    """A checker turned unhealthy after the application had been healthy."""

    reason: str


@dataclass(frozen=True, slots=True)
class Restarting:
    """The run ended (reason); restart number `attempt` of at most `max` within `within_s`."""

    attempt: int
    max: int
    within_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Exhausted:
    """The restart policy is used up: leave the farm. The application is stopped next."""

    restarts: int
    within_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class ScriptFinished:
    result: ScriptResult


SupervisorEvent = Healthy | Unhealthy | Restarting | Exhausted | ScriptFinished


class RestartWindow:
    """At most `max` restarts within any `within_s` seconds (a sliding window)."""

    def __init__(self, spec: RestartSpec) -> None:
        self.spec = spec
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the policy allows it."""
        while self._times and self._times[0] <= now - self.spec.within_s:
            self._times.popleft()
        if len(self._times) >= self.spec.max:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        return len(self._times)

    def reset(self) -> None:
        self._times.clear()


class _Checker:
    """One checker's loop: probe, filter, remember the latest result."""

    def __init__(self, spec: CheckerSpec) -> None:
        self.spec = spec
        self.filter = RiseFall(spec.rise, spec.fall)
        self.last: CheckResult | None = None


class AppSupervisor:
    """Starts, watches, restarts and stops the application of one node."""

    def __init__(
        self,
        spec: AppSpec,
        *,
        module_log: logging.Logger,
        app_log: logging.Logger,
        on_event: Callable[[SupervisorEvent], None] | None = None,
    ) -> None:
        self.spec = spec
        self._log = module_log
        self._on_event = on_event
        self.events: asyncio.Queue[SupervisorEvent] = asyncio.Queue(EVENT_QUEUE_MAX)
        self.events_dropped = 0
        self._runner = ScriptRunner(
            env=spec.env, cwd=spec.directory, app_log=app_log, module_log=module_log
        )
        self._window = RestartWindow(spec.restart)
        self._checkers = [_Checker(c) for c in spec.checkers]
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._may_run = False  # a start script ran since the last complete stop
        self.state = AppState.STOPPED

    # ---- public API

    @property
    def healthy(self) -> bool:
        return self.state == AppState.HEALTHY

    def checker_results(self) -> list[tuple[str, bool, bool | None]]:
        """Each checker's (label, healthy after rise/fall, latest probe ok or None if none yet):
        a read-only view for metrics and state."""
        return [
            (c.spec.label, c.filter.healthy, c.last.ok if c.last else None) for c in self._checkers
        ]

    async def start(self) -> None:
        """Begin supervising (returns at once); a fresh start forgets earlier restarts."""
        if self._task is not None and not self._task.done():
            return
        self._window.reset()
        self._set_state(AppState.STARTING)
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.spec.module}")

    async def wait_healthy(self, timeout_s: float) -> bool:
        """True once healthy within timeout_s; False at once if stopped or exhausted."""
        done = (AppState.HEALTHY, AppState.STOPPED, AppState.EXHAUSTED)
        with contextlib.suppress(TimeoutError):
            await self._until(lambda: self.state in done, timeout_s)
        return self.healthy

    async def stop(self) -> None:
        """Stop supervising, then stop the application (graceful, then forced)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._may_run:
            await self._stop_app()
        self._set_state(AppState.STOPPED)

    def close(self) -> None:
        """Release pipes still attached to background processes (after stop())."""
        self._runner.close()

    # ---- the supervising task

    async def _supervise(self) -> None:
        try:
            await self._supervise_runs()
        except Exception as exc:
            # A bug here must not leave the node in the farm with nobody watching the app.
            self._log.exception("supervisor failed")
            self._emit(Exhausted(self._window.used, self.spec.restart.within_s, repr(exc)))
            self._set_state(AppState.EXHAUSTED)

    async def _supervise_runs(self) -> None:
        while True:
            reason = await self._run_once()
            restart = self.spec.restart
            if not self._window.allow(time.monotonic()):
                self._emit(
                    Exhausted(self._window.used, restart.within_s, reason),
                    logging.ERROR,
                )
                await self._stop_app()
                self._set_state(AppState.EXHAUSTED)
                return
            self._emit(
                Restarting(self._window.used, restart.max, restart.within_s, reason),
                logging.WARNING,
            )
            await self._stop_app()

    async def _run_once(self) -> str:
        """One run of the application; returns why it ended."""
        self._set_state(AppState.STARTING)
        self._may_run = True
        res = await self._script("start", self.spec.start, self.spec.start_timeout_s)
        if not res.ok:
            return f"start script failed: {res.summary}"
        for c in self._checkers:
            c.filter = RiseFall(c.spec.rise, c.spec.fall)
            c.last = None
        tasks = [asyncio.create_task(self._check_loop(c)) for c in self._checkers]
        try:
            try:
                await self._until(self._all_healthy, self.spec.healthy_timeout_s)
            except TimeoutError:
                return f"not healthy within {self.spec.healthy_timeout_s:g}s: {self._failing()}"
            self._set_state(AppState.HEALTHY)
            self._emit(Healthy())
            await self._until(lambda: not self._all_healthy(), None)
            reason = self._failing()
            self._set_state(AppState.UNHEALTHY)
            self._emit(Unhealthy(reason), logging.WARNING)
            return reason
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _check_loop(self, c: _Checker) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            res = await run_check(c.spec, self._runner)
            if c.last is None or res.ok != c.last.ok:
                event(
                    self._log,
                    "checker_result",
                    level=logging.INFO if res.ok else logging.WARNING,
                    checker=c.spec.label,
                    ok=res.ok,
                    detail=res.detail,
                )
            c.last = res
            if c.filter.update(res.ok):
                event(self._log, "checker_state", checker=c.spec.label, healthy=c.filter.healthy)
                self._changed.set()
            await asyncio.sleep(max(0.0, began + c.spec.interval_s - loop.time()))

    def _all_healthy(self) -> bool:
        return all(c.filter.healthy for c in self._checkers)

    def _failing(self) -> str:
        bad = [c for c in self._checkers if not c.filter.healthy]
        return "; ".join(
            f"{c.spec.label}: {c.last.detail if c.last else 'no result yet'}" for c in bad
        )

    async def _until(self, predicate: Callable[[], bool], timeout_s: float | None) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                # No await between the test and clear(): a change cannot slip in unseen.
                self._changed.clear()
                await self._changed.wait()

    async def _stop_app(self) -> None:
        self._set_state(AppState.STOPPING)
        spec = self.spec
        res = await self._script("stop", spec.stop, spec.stop_timeout_s)
        if not res.ok and spec.force_stop is not None:
            await self._script("force_stop", spec.force_stop, spec.kill_timeout_s)
        await self._runner.kill_kept_groups(spec.kill_timeout_s)
        self._may_run = False

    async def _script(self, name: str, argv: list[str], timeout_s: float) -> ScriptResult:
        res = await self._runner.run(
            name, argv, timeout_s, grace_s=self.spec.kill_timeout_s, keep_group=name == "start"
        )
        self._emit(ScriptFinished(res), log=False)  # the runner logged it with its details
        return res

    # ---- reporting

    def _set_state(self, state: AppState) -> None:
        if state != self.state:
            event(self._log, "app_state", module=self.spec.module, old=self.state, new=state)
            self.state = state
            self._changed.set()

    def _emit(self, ev: SupervisorEvent, level: int = logging.INFO, *, log: bool = True) -> None:
        if log:
            fields = {k: getattr(ev, k) for k in getattr(ev, "__slots__", ())}
            event(self._log, "app_" + type(ev).__name__.lower(), level=level, **fields)
        if self.events.full():
            self.events.get_nowait()
            self.events_dropped += 1
        self.events.put_nowait(ev)
        if self._on_event is not None:
            self._on_event(ev)
