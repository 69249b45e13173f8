"""vipfarm: an active-active farm cluster on one shared virtual IP.

Every node holds the VIP; clients resolve it to a virtual unicast MAC that no node ever uses as a
source, so the switch floods client frames to every node. A kernel filter on each node hashes the
client identity into buckets and accepts new flows only for the buckets that node owns. A
heartbeat protocol keeps exactly one owner per bucket. See DESIGN.md for the whole picture.
"""

__version__ = "0.1.0"
