"""Kernel data path of a node (DESIGN section 3).

* `ruleset` - pure generation of the nftables JSON ruleset and lease batches.
* `kernel` - the narrow `Kernel` interface and its Linux implementation; `fake` - in-memory one.
* `core` - `Datapath`: apply, lease, read back, remove; safe ordering and rollback.
* `arp` - ARP responder (pure) and its raw-socket service.
* `service` - the asyncio-facing composition; `runner` - the stand-alone static runner.
"""

from vipfarm.datapath.datapath import Datapath
from vipfarm.datapath.kernel import DatapathError, Kernel, LinuxKernel

__all__ = ["Datapath", "DatapathError", "Kernel", "LinuxKernel"]
