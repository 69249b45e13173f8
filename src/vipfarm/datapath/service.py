"""The data path as the asyncio programs (the stand-alone runner, the daemon) use it.

`DatapathService` composes the kernel state (`Datapath`) with the ARP responder, and announces
the VMAC with gratuitous ARP on start and after every change of ownership.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from vipfarm.datapath.arp import ArpResponder, ArpService
from vipfarm.datapath.core import Datapath
from vipfarm.datapath.kernel import Kernel, LinuxKernel
from vipfarm.model import DatapathSpec


class DatapathService:
    def __init__(self, spec: DatapathSpec, state_dir: Path, kernel: Kernel | None = None) -> None:
        self.kernel = kernel or LinuxKernel()
        self.datapath = Datapath(spec, self.kernel, state_dir)
        self.arp: ArpService | None = None

    @property
    def spec(self) -> DatapathSpec:
        return self.datapath.spec

    def _make_arp(self, spec: DatapathSpec) -> ArpService:
        vmacs = {v: spec.vmac(v) for v in spec.vips if isinstance(v, ipaddress.IPv4Address)}
        responder = ArpResponder(self.kernel.link_mac(spec.interface), vmacs)
        return ArpService(spec.interface, responder)

    async def start(self, owned: Iterable[int] = ()) -> frozenset[int]:
        result = self.datapath.start(owned)
        try:
            self.arp = self._make_arp(self.spec)
            self.arp.start()
        except Exception:
            self.datapath.stop()
            raise
        self.arp.announce()
        return result

    def set_owned(self, buckets: Iterable[int]) -> frozenset[int]:
        wanted = frozenset(buckets)
        changed = wanted != self.datapath.intended
        result = self.datapath.set_owned(wanted)
        if changed and self.arp is not None:
            self.arp.announce()
        return result

    def refresh(self) -> frozenset[int]:
        return self.datapath.refresh()

    def update(self, spec: DatapathSpec) -> frozenset[int]:
        result = self.datapath.update(spec)
        if self.arp is not None:
            self.arp.stop()
        self.arp = self._make_arp(spec)
        self.arp.start()
        self.arp.announce()
        return result

    def stop(self) -> None:
        if self.arp is not None:
            self.arp.stop()
            self.arp = None
        self.datapath.stop()
