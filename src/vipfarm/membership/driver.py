"""The one driver of the sans-I/O membership core, shared by the pulse and the simulator.

The core (`vipfarm.membership.core`) decides; something must feed it datagrams and the time,
send what it returns, keep the kernel in step and wake it when its timer is due. Doing that in
two places (the daemon and the simulator) let them drift: one honoured the core's request for an
early send, the other waited for the older timeout. So both go through this driver, and only
the I/O differs (`Io`): real sockets, nftables and an asyncio timer in the pulse; a timing wheel,
a simulated kernel and simulated links in the simulator.

The driver's rules, in the order they apply:

* A datagram goes to `core.receive_datagram`. A rejected one comes back as a `Drop` (counted
  by the core, and by the caller per network); a heartbeat that changed only a peer's liveness
  ends there (the timer can only have moved later). Otherwise the core's events are applied and
  the timer is re-armed if it moved earlier, which is how quick acknowledgements and announced
  releases go out at once instead of at the next interval. A caller may call the core itself
  (`Driver.receive`) and hand any answer but False to `received`, the rest of `datagram`.
* When the timer fires: `handle_timer`, then the heartbeats that are due. With every batch of
  heartbeats the kernel leases are renewed (`Io.renew_leases`; the pulse hands it to a thread of
  its own, so a slow kernel never holds a heartbeat back, and a late renewal only shortens this
  node's own ownership). Then events, then the timer is re-armed.
* `BucketsChanged` goes to the kernel (`Io.apply_buckets`) and what the kernel reports holding is
  confirmed to the core at once, so the next heartbeat announces the kernel's real state.
* After a local command (join, leave, health, weight...) the caller calls `poke`, which applies
  events, sends what became due and re-arms. A daemon that exits after `stopped` calls
  `shutdown` instead: it applies the events too, but sends only the goodbye (a last heartbeat
  just before it would say nothing new, and could arrive after the goodbye).

`Io.wake_at(when)` asks for one call of `timer` at or after `when`; each call replaces the
previous request. The driver only asks when the wake-up moved earlier, or after a wake-up.
"""

from __future__ import annotations

import math
from typing import Protocol

from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership
from vipfarm.membership.wire import Drop


class Io(Protocol):
    """What the driver needs from its surroundings."""

    def send(self, network: str, payload: bytes) -> None:
        """Send one heartbeat to every peer on `network`."""

    def renew_leases(self, now: float) -> None:
        """Refresh the kernel leases of the owned buckets (heartbeats are about to go out)."""

    def apply_buckets(self, owned: frozenset[int], now: float) -> frozenset[int]:
        """Make the kernel own exactly `owned`; return what it holds afterwards (read back)."""

    def on_event(self, event: ev.Event, now: float) -> None:
        """Every event of the core, after the driver handled it (BucketsChanged applied)."""

    def wake_at(self, when: float) -> None:
        """Call `Driver.timer` at or after `when` (replaces any earlier request)."""


class Driver:
    # The simulator calls `datagram` 26 million times per 64-node run: slots and the bound
    # receive method spare it two dictionary lookups per reception.
    __slots__ = ("_armed", "core", "io", "receive")

    def __init__(self, core: Membership, io: Io) -> None:
        self.core = core
        self.io = io
        self._armed = math.inf  # the time last passed to Io.wake_at, +inf after a wake-up
        # The core's receive_datagram: a caller may call it itself and hand an answer other
        # than False to `received` (that is `datagram` without the frame of its own).
        self.receive = core.receive_datagram

    def datagram(self, data: bytes, network: str, now: float) -> Drop | None:
        """One received datagram; a rejected one is returned as its reason."""
        result = self.receive(data, network, now)
        return None if result is False else self.received(result, now)

    def received(self, result: bool | Drop, now: float) -> Drop | None:
        """The rest of `datagram` for a caller that called `receive` itself and got something
        else than False (the simulator: 98 % of its 26 million receptions per 64-node run end
        at False, and a Python call less for each of them is a tenth of its time)."""
        if isinstance(result, Drop):
            return result
        self._events(now)
        self._rearm_if_earlier()
        return None

    def timer(self, now: float) -> None:
        """The wake-up asked for with `Io.wake_at` has come."""
        self._armed = math.inf
        core = self.core
        if now >= core.get_timer():
            core.handle_timer(now)
        self._send(now)
        self._events(now)
        self.io.wake_at(self._arm())

    def poke(self, now: float) -> None:
        """After a local command: apply its events and send what became due at once."""
        self._events(now)
        if self.core.get_timer() <= now:
            self.timer(now)
        else:
            self._rearm_if_earlier()

    def shutdown(self, now: float) -> None:
        """Apply pending events and say goodbye (only sent by a node in STOP that holds
        nothing: see `core.shutdown`). Nothing is re-armed: the daemon exits."""
        self._events(now)
        for network, payload in self.core.shutdown(now):
            self.io.send(network, payload)

    def _send(self, now: float) -> None:
        out = self.core.datagrams_to_send(now)
        if out:
            io = self.io
            io.renew_leases(now)
            for network, payload in out:
                io.send(network, payload)

    def _events(self, now: float) -> None:
        core, io = self.core, self.io
        while (e := core.next_event()) is not None:
            if isinstance(e, ev.BucketsChanged):
                core.confirm_owned(io.apply_buckets(e.owned, now), now)
            io.on_event(e, now)

    def _arm(self) -> float:
        self._armed = self.core.get_timer()
        return self._armed

    def _rearm_if_earlier(self) -> None:
        if self.core.get_timer() < self._armed:
            self.io.wake_at(self._arm())
