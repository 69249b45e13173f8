"""The sweeper: a thread that releases kept buckets once their last connection is gone.

It calls `Datapath.sweep` (one conntrack dump, bounded; see `vipfarm.datapath.conntrack`) over
and over. While buckets this node does not own are kept (`Datapath.lingering`) it rests
`PERIOD_S` between sweeps; with none it only looks for connections to adopt, every
`IDLE_PERIOD_S` (a dump walks the whole conntrack hash table,
some 4 ms of kernel time for 262,144 slots, whatever it finds: measured, seven idle lab nodes
sweeping every second put `ctnetlink_dump_table` at the top of the bench's profile). `poke`
(a change of ownership that kept buckets) wakes it at once. Either rest is at least
`REST_FACTOR` times what the last sweep took, so a node with a huge conntrack table sweeps
less often instead of spending more than about 1/REST_FACTOR of a core on it. It runs at
normal priority (the pulse runs SCHED_RR, which its threads would inherit, and a scan must
never compete with the heartbeats for a core). A failed sweep is counted and logged once per
kind of error, and the next one tries again: kept buckets then stay kept longer, which costs a
little CPU and never a connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter

from vipfarm.datapath.datapath import Datapath, SweepResult
from vipfarm.log import event

log = logging.getLogger("vipfarm.datapath.sweeper")

PERIOD_S = 1.0
IDLE_PERIOD_S = 10.0
REST_FACTOR = 20


class Sweeper:
    def __init__(
        self, datapath: Datapath, period_s: float = PERIOD_S, idle_s: float = IDLE_PERIOD_S
    ) -> None:
        self.datapath = datapath
        self.period_s = period_s
        self.idle_s = idle_s
        self.counters: Counter[str] = Counter()
        self.last: SweepResult | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors_seen: set[str] = set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ct-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout_s)

    def poke(self) -> None:
        """Sweep now (buckets were just kept: the next sweep after the grace releases them)."""
        self._wake.set()

    def _run(self) -> None:
        # On Linux this changes the calling thread only: the rest of the process keeps its own.
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sweep_once()
            took = time.monotonic() - t0
            rest = self.period_s if self.datapath.lingering else self.idle_s
            self._wake.wait(max(rest, REST_FACTOR * took))
            self._wake.clear()

    def sweep_once(self) -> SweepResult | None:
        try:
            self.last = self.datapath.sweep()
        except Exception as e:  # never out of the thread: the next sweep tries again
            self.counters["sweep_errors"] += 1
            kind = type(e).__name__
            if kind not in self._errors_seen:
                self._errors_seen.add(kind)
                event(log, "sweep_failed", logging.ERROR, error=e)
            return None
        self.counters["sweeps"] += 1
        if not self.last.complete:
            self.counters["sweeps_incomplete"] += 1
        return self.last
