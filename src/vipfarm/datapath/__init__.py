"""Kernel data path of a node (DESIGN section 3; docs/DATAPATH.md).

* `ruleset` - pure generation of the nftables JSON ruleset and of the set (lease, kept) batches.
* `kernel` - the narrow `Kernel` interface and its Linux implementation (tests/fakes has an
  in-memory one).
* `datapath` - `Datapath`: apply, lease, keep, sweep, read back, remove; safe ordering, rollback.
* `conntrack` - a bounded reader of this node's conntrack entries over netlink.
* `sweeper` - the thread that releases kept buckets once their last connection is gone.
* `arp`, `ndp` - ARP and NDP responders (pure) and their raw-socket service (`packet`).
* `service` - the asyncio-facing composition; `runner` - the stand-alone static runner.
"""

from vipfarm.datapath.datapath import Datapath
from vipfarm.datapath.kernel import DatapathError, Kernel, LinuxKernel

__all__ = ["Datapath", "DatapathError", "Kernel", "LinuxKernel"]
