"""The data path as the asyncio programs (the stand-alone runner, the daemon) use it.

`DatapathService` composes the kernel state (`Datapath`) with the ARP and NDP responders and the
sweeper of kept buckets (`vipfarm.datapath.sweeper`, a thread started and stopped with the
data path), and announces the VMACs (gratuitous ARP, unsolicited NA) on start and after every
change of ownership. In directed delivery (`set_entry`) the responders answer only for the VIPs
this node is the entry of, with its own MAC, and a VIP that becomes this node's is announced at
once (gratuitous ARP, unsolicited NA).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from vipfarm.datapath.arp import ETH_P_ARP, ArpResponder
from vipfarm.datapath.datapath import Datapath
from vipfarm.datapath.kernel import Kernel, LinuxKernel
from vipfarm.datapath.ndp import ETH_P_IPV6, NdpResponder, ns_filter
from vipfarm.datapath.packet import PacketService
from vipfarm.datapath.ruleset import SteerPlan
from vipfarm.datapath.spec import DatapathSpec, Delivery, IPAddress
from vipfarm.datapath.sweeper import Sweeper

T = TypeVar("T")


class DatapathService:
    def __init__(self, spec: DatapathSpec, state_dir: Path, kernel: Kernel | None = None) -> None:
        self.kernel = kernel or LinuxKernel()
        self.datapath = Datapath(spec, self.kernel, state_dir)
        self.sweeper = Sweeper(self.datapath)
        self.responders: list[PacketService] = []
        # Directed delivery: the VIPs this node is the entry of (None: flood delivery).
        self.entry: frozenset[IPAddress] | None = (
            frozenset() if spec.delivery.steers else None  # auto starts directed
        )

    @property
    def spec(self) -> DatapathSpec:
        return self.datapath.spec

    @property
    def kept(self) -> frozenset[int]:
        """The kept buckets as last read back from the kernel (by a change or a sweep)."""
        return self.datapath.kept

    def prefilter_state(self) -> dict[str, object]:
        return self.datapath.prefilter_state()

    def _start_responders(self, spec: DatapathSpec) -> None:
        self._stop_responders()
        if spec.delivery is Delivery.FLOOD:
            self.entry = None
        elif self.entry is None:
            self.entry = frozenset()  # until the pulse names this node an entry
        mac = self.kernel.link_mac(spec.interface)
        v4 = {v: spec.vmac(v) for v in spec.vips if isinstance(v, ipaddress.IPv4Address)}
        v6 = {v: spec.vmac(v) for v in spec.vips if isinstance(v, ipaddress.IPv6Address)}
        if v4:
            self.responders.append(PacketService(spec.interface, ETH_P_ARP, ArpResponder(mac, v4)))
        if v6:
            ndp = NdpResponder(mac, v6)
            self.responders.append(
                PacketService(
                    spec.interface, ETH_P_IPV6, ndp, bpf=ns_filter(), multicast=ndp.multicast_macs
                )
            )
        self._entry_to_responders()
        for r in self.responders:
            r.start()
        self.announce()

    def _entry_to_responders(self) -> None:
        for r in self.responders:
            resp = r.responder
            if isinstance(resp, ArpResponder):
                resp.entry = (
                    None
                    if self.entry is None
                    else frozenset(v for v in self.entry if isinstance(v, ipaddress.IPv4Address))
                )
            elif isinstance(resp, NdpResponder):
                resp.entry = (
                    None
                    if self.entry is None
                    else frozenset(v for v in self.entry if isinstance(v, ipaddress.IPv6Address))
                )

    def set_entry(self, vips: frozenset[IPAddress] | None) -> bool:
        """Directed delivery: answer ARP/NDP for `vips` (None: flood delivery, every VIP with
        its VMAC). Announces at once when a VIP was gained; True when anything changed."""
        if vips == self.entry:
            return False
        gained = vips is None or self.entry is None or bool(vips - self.entry)
        self.entry = vips
        self._entry_to_responders()
        if gained:
            self.announce()
        return True

    def _stop_responders(self) -> None:
        for r in self.responders:
            r.stop()
        self.responders = []

    def announce(self) -> None:
        for r in self.responders:
            r.announce()

    async def start(self, owned: Iterable[int] = ()) -> frozenset[int]:
        result = self.datapath.start(owned)
        try:
            self._start_responders(self.spec)
        except Exception:
            self._stop_responders()
            self.datapath.stop()
            raise
        self.sweeper.start()
        return result

    def set_owned(self, buckets: Iterable[int]) -> frozenset[int]:
        wanted = frozenset(buckets)
        released = self.datapath.intended - wanted
        changed = wanted != self.datapath.intended
        result = self.datapath.set_owned(wanted)
        if released:
            self.sweeper.poke()
        if changed:
            self.announce()
        return result

    def refresh(self) -> frozenset[int]:
        return self.datapath.refresh()

    def set_steer(self, plan: SteerPlan) -> bool:
        """The steering plan of directed delivery into the kernel (blocking: a worker's job)."""
        return self.datapath.set_steer(plan)

    def update(self, spec: DatapathSpec) -> frozenset[int]:
        result = self.datapath.update(spec)
        self._start_responders(spec)
        return result

    async def update_in_thread(self, spec: DatapathSpec) -> frozenset[int]:
        """`update` with the kernel work in a worker thread, so that the caller's loop goes on
        (renewing leases: the kernel layer keeps a separate context for them); the responders
        restart on the loop, which owns their sockets."""
        result = await asyncio.to_thread(_without_gc, self.datapath.update, spec)
        self._start_responders(spec)
        return result

    def stop(self) -> None:
        self.sweeper.stop()
        self._stop_responders()
        self.datapath.stop()


def _without_gc(fn: Callable[[DatapathSpec], T], spec: DatapathSpec) -> T:
    """`fn(spec)` with the cyclic garbage collector off. Building the batch of a large ruleset
    (18,000 commands for 3,000 rules) triggers full collections that hold the GIL for 20-75 ms
    each on a quiet machine, several times that under load, and the pulse's loop waits on them:
    a 300 ms lease went by unrenewed in a test. The batch has no reference cycles, so reference
    counting frees it anyway; the collector resumes afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        return fn(spec)
    finally:
        if was:
            gc.enable()
