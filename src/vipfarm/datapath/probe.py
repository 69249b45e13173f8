"""The flood probe of `delivery = "auto"`: does a frame sent to the VMAC reach every node?

Every node of an auto farm sends, every `PROBE_INTERVAL_S` (half a second), one Ethernet frame
to the VMAC of the farm's first VIP from its own MAC, with its own ethertype (`ETH_P_PROBE`,
0x88B5, the IEEE local experimental ethertype) and a small payload: a magic, the farm id and
the sender's node id. Nothing ever sends *from* the VMAC, so a switch that floods unknown
unicast delivers the probe to every node, and one that does not (VMware vSwitches, clouds,
`bridge link set dev PORT flood off`) to none. Each node's NIC accepts frames to the VMAC (the
data path puts it in the unicast filter), and `ProbeResponder` records when it last heard each
node id; `vipfarm.node.delivery` turns that into the farm's choice.

The probe carries no MAC: a forged probe can at most make a node believe that the switch
floods, which someone able to send frames on the LAN could do worse with ARP alone. Frames
are bounded (`parse` checks the length, magic and farm id) and counted by reason.

`ProbeResponder` fits `vipfarm.datapath.packet.PacketService`: `handle` records and never
answers, and `announcements` is the probe itself, so `PacketService.announce` sends it.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Callable

from vipfarm.datapath.arp import mac_bytes

ETH_P_PROBE = 0x88B5
PROBE_INTERVAL_S = 0.5
MAGIC = b"VFPR"
_ETH = struct.Struct("!6s6sH")
_BODY = struct.Struct("!4s8sI")
FRAME_LEN = 60  # the Ethernet minimum, padded


def build(vmac: str, node_mac: str, farm_id: bytes, node_id: int) -> bytes:
    frame = _ETH.pack(mac_bytes(vmac), mac_bytes(node_mac), ETH_P_PROBE)
    frame += _BODY.pack(MAGIC, farm_id, node_id)
    return frame.ljust(FRAME_LEN, b"\x00")


def parse(frame: bytes, farm_id: bytes) -> int | None:
    """The sender's node id of a probe of farm `farm_id`, or None."""
    if len(frame) < _ETH.size + _BODY.size or len(frame) > 1514:
        return None
    _dst, _src, ethertype = _ETH.unpack_from(frame)
    magic, fid, nid = _BODY.unpack_from(frame, _ETH.size)
    if ethertype != ETH_P_PROBE or magic != MAGIC or fid != farm_id:
        return None
    return int(nid)


class ProbeResponder:
    """Records probes heard (by node id, on `clock`); its one announcement is our probe."""

    def __init__(
        self,
        vmac: str,
        node_mac: str,
        farm_id: bytes,
        node_id: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_mac = mac_bytes(node_mac)
        self.vmac = mac_bytes(vmac)
        self.farm_id = farm_id
        self.node_id = node_id
        self.clock = clock
        self.frame = build(vmac, node_mac, farm_id, node_id)
        self.heard: dict[int, float] = {}
        self.counters: Counter[str] = Counter()

    def handle(self, frame: bytes) -> bytes | None:
        # A packet socket also sees this node's own outgoing probes.
        if frame[6:12] == self.node_mac:
            self.counters["own"] += 1
            return None
        if frame[:6] != self.vmac:
            self.counters["ignored"] += 1
            return None
        nid = parse(frame, self.farm_id)
        if nid is None or nid == self.node_id:
            self.counters["ignored"] += 1
            return None
        self.counters["heard"] += 1
        if len(self.heard) < 1024 or nid in self.heard:  # bounded: a farm has at most 255
            self.heard[nid] = self.clock()
        return None

    def announcements(self) -> list[bytes]:
        return [self.frame]
