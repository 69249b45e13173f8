# A frozen copy of src/vipfarm/membership/wire.py as released with heartbeat version 1 (commit
# a29bd9f), kept unchanged so that tests can check the current code against what a node of
# that release really sends and accepts (rolling upgrades). Do not edit it to follow changes.
"""Heartbeat wire format: a versioned, HMAC-SHA256-authenticated binary datagram.

Every node sends one heartbeat per `interval` (and a few extra when its claims change) to every
peer on every heartbeat network. The datagram says who the sender is (farm id, node id,
incarnation, sequence number), what it is (state, weight) and which buckets it holds, wants and
hears; docs/PROTOCOL.md describes it field by field.

Theory of operation:

- `Codec.encode` packs the fields and appends `HMAC-SHA256(subkey, everything before)`, where
  the subkey is derived from the farm key with a fixed label, so the raw farm key never MACs
  anything else the project may sign later. The codec keeps the SHA-256 states of the keyed
  inner and outer pads (RFC 2104), so a tag costs the hashing of the datagram only: the same
  tag as `hmac.digest`, in less than half the time.
- `Codec.decode` never raises: it returns a `Heartbeat` or the `Drop` reason. Cheap checks come
  first (length, magic, version, farm id), then the MAC over everything before the tag, and only
  authenticated bytes are parsed further. Replay (old incarnation or sequence) needs per-peer state
  and is the membership core's job; the reasons it uses are listed in `Drop` too.
- The simulator hands the same payload object to dozens of receivers, and a daemon receives the
  same datagram once per heartbeat network, so `decode` keeps a bounded cache keyed by the payload
  bytes: identical bytes always yield the identical verdict, so the MAC is computed once per
  payload, not once per receiver. The cache is cleared when full, which keeps it O(1) and bounded.
- The receive path is dominated by memory latency, not arithmetic, so the decoder also shares
  objects between heartbeats: every heartbeat of one node carries the same node id int object
  (`Codec.intern_id`, which the core uses for its peer table too, so a lookup matches by
  identity without reading a second int), and a heartbeat whose body equals the previous one
  of its node carries that same bytes object (an unchanged claim compares by identity). Both
  tables are bounded by the number of node ids, which only authenticated datagrams add.
- Bitmaps (owned, wanted, fresh) travel as little-endian bit strings: bucket i is bit i % 8 of
  byte i // 8. In memory they are Python ints with bit i set, which makes set algebra cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

MAGIC: Final = b"VF"
VERSION: Final = 1
TAG_LEN: Final = 32
MIN_KEY_LEN: Final = 32
MAX_NAME_BYTES: Final = 32
MAX_BUCKETS: Final = 4096
MAX_ACKS: Final = 255
FLAG_BYE: Final = 0x01  # last heartbeat of a node that stopped and owns nothing

# magic, version, flags, farm id, node id, incarnation, seq, ack count, fresh length,
# then the "body": config digest, state, reserved, weight, buckets (and the two bitmaps after it)
_HEADER: Final = struct.Struct("!2sBB8sIQQBHIBBHH")
HEADER_LEN: Final = _HEADER.size
_BODY_AT: Final = 35
_ACK: Final = struct.Struct("!IQQ")
ACK_LEN: Final = _ACK.size
_CACHE_MAX: Final = 4096
_IDS_MAX: Final = 4 * MAX_ACKS  # node ids whose objects are shared (a farm has at most 255)
_BLOCK: Final = 64  # SHA-256 block size, for the HMAC pads


class NodeState(IntEnum):
    """A node's state as carried on the wire (values are part of protocol version 1)."""

    STOP = 0
    STARTING = 1
    WAIT = 2
    UP = 3
    DRAINING = 4
    STOPPING = 5


_STATES: Final = tuple(NodeState)  # by wire value: a tuple index is cheaper than NodeState(v)


class Drop(StrEnum):
    """Why a datagram was dropped; the membership core counts drops by these names."""

    MALFORMED = "malformed"
    NOT_VIPFARM = "not_vipfarm"
    VERSION = "version"
    FOREIGN_FARM = "foreign_farm"
    BAD_MAC = "bad_mac"
    BUCKET_MISMATCH = "bucket_mismatch"
    UNKNOWN_NODE = "unknown_node"
    OWN = "own"
    REPLAY = "replay"
    DUPLICATE = "duplicate"
    UNKNOWN_NETWORK = "unknown_network"


def farm_id(farm: str) -> bytes:
    """8 bytes naming the farm on the wire; lets a node tell a neighbour farm from an attack."""
    return hashlib.sha256(b"vipfarm-farm\0" + farm.encode()).digest()[:8]


def node_id(name: str) -> int:
    """32-bit id of a node name on the wire (collisions are rejected at configuration time)."""
    return int.from_bytes(hashlib.sha256(b"vipfarm-node\0" + name.encode()).digest()[:4], "big")


def config_digest(nodes: dict[str, int], buckets: int) -> int:
    """32-bit digest of the configured node names, their configured weights and B.

    Peers whose digest differs have a different farm configuration (a rollout in progress); the
    core then stops using what depends on identical configurations (see membership.core).
    """
    text = "\n".join(f"{n}\t{w}" for n, w in sorted(nodes.items())) + f"\n{buckets}"
    return int.from_bytes(hashlib.sha256(b"vipfarm-config\0" + text.encode()).digest()[:4], "big")


def bits_of(mask: int) -> list[int]:
    """The bucket numbers set in a bitmap int, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def mask_of(buckets: Iterable[int]) -> int:
    """Bitmap int from an iterable of bucket numbers."""
    mask = 0
    for b in buckets:
        mask |= 1 << b
    return mask


@dataclass(frozen=True, slots=True)
class Ack:
    """The sender applied heartbeat `seq` of incarnation `incarnation` of node `node_id`."""

    node_id: int
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True, eq=False)
class Heartbeat:
    """One decoded heartbeat. Bitmaps are ints (bit i = bucket or config-index i)."""

    node_id: int
    digest: int
    incarnation: int
    seq: int
    state: NodeState
    weight: int
    owned: int
    want: int
    fresh: int
    acks: dict[int, tuple[int, int]]
    bye: bool
    body: bytes  # digest .. want bitmap, verbatim: equal bodies mean an unchanged claim


class Codec:
    """Encodes and verifies heartbeats of one farm. Share one instance between cores freely."""

    __slots__ = (
        "_bitmap_len",
        "_bodies",
        "_cache",
        "_ids",
        "_inner",
        "_outer",
        "_subkey",
        "buckets",
        "cached",
        "farm_id",
    )

    def __init__(self, farm: str, key: bytes, buckets: int) -> None:
        if len(key) < MIN_KEY_LEN:
            raise ValueError(
                f"farm key is {len(key)} bytes; it must be at least {MIN_KEY_LEN} random bytes "
                "(generate one with `head -c 32 /dev/urandom | base64`)"
            )
        if not 1 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"bucket count {buckets} is out of range: use 1..{MAX_BUCKETS}")
        self.farm_id = farm_id(farm)
        self.buckets = buckets
        self._bitmap_len = (buckets + 7) // 8
        self._subkey = hmac.digest(key, b"vipfarm heartbeat v1", "sha256")
        padded = self._subkey.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self._cache: dict[bytes, Heartbeat | Drop] = {}
        # The receive hot path calls this first and `decode` only on a miss.
        self.cached = self._cache.get
        self._ids: dict[int, int] = {}
        self._bodies: dict[int, bytes] = {}  # latest body per node id

    def intern_id(self, node_id: int) -> int:
        """The one int object this codec uses for `node_id` (an equal int: only speed depends
        on getting the shared object)."""
        if len(self._ids) < _IDS_MAX:
            return self._ids.setdefault(node_id, node_id)
        return self._ids.get(node_id, node_id)

    def encode(
        self,
        *,
        node_id: int,
        digest: int,
        incarnation: int,
        seq: int,
        state: NodeState,
        weight: int,
        owned: int,
        want: int,
        fresh: int,
        fresh_len: int,
        acks: tuple[Ack, ...] = (),
        bye: bool = False,
    ) -> bytes:
        """Pack and authenticate one heartbeat. `fresh_len` is the fresh bitmap size in bytes."""
        if len(acks) > MAX_ACKS:
            raise ValueError(f"{len(acks)} acks do not fit one heartbeat (at most {MAX_ACKS})")
        n = self._bitmap_len
        parts = [
            _HEADER.pack(
                MAGIC,
                VERSION,
                FLAG_BYE if bye else 0,
                self.farm_id,
                node_id,
                incarnation,
                seq,
                len(acks),
                fresh_len,
                digest,
                int(state),
                0,
                weight,
                self.buckets,
            ),
            owned.to_bytes(n, "little"),
            want.to_bytes(n, "little"),
            fresh.to_bytes(fresh_len, "little"),
            *(_ACK.pack(a.node_id, a.incarnation, a.seq) for a in acks),
        ]
        msg = b"".join(parts)
        return msg + self._mac(msg)

    def _mac(self, msg: bytes | memoryview) -> bytes:
        """HMAC-SHA256(subkey, msg) from the precomputed pad states."""
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def decode(self, data: bytes) -> Heartbeat | Drop:
        """Verify and parse one datagram; never raises. Results are cached per payload bytes."""
        hit = self._cache.get(data)
        if hit is not None:
            return hit
        result = self._decode(data)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[data] = result
        return result

    def _decode(self, data: bytes) -> Heartbeat | Drop:
        end = len(data) - TAG_LEN
        if end < HEADER_LEN:
            return Drop.MALFORMED
        (
            magic,
            version,
            flags,
            fid,
            nid,
            incarnation,
            seq,
            n_acks,
            fresh_len,
            digest,
            state,
            reserved,
            weight,
            buckets,
        ) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            return Drop.NOT_VIPFARM
        if version != VERSION:
            return Drop.VERSION
        if fid != self.farm_id:
            return Drop.FOREIGN_FARM
        if not hmac.compare_digest(self._mac(memoryview(data)[:end]), data[end:]):
            return Drop.BAD_MAC
        # Authenticated from here on: a malformed datagram now means a buggy or newer peer.
        if buckets != self.buckets:
            return Drop.BUCKET_MISMATCH
        n = self._bitmap_len
        fresh_at = HEADER_LEN + 2 * n
        acks_at = fresh_at + fresh_len
        if (
            flags & ~FLAG_BYE
            or reserved
            or state > NodeState.STOPPING
            or end != acks_at + n_acks * ACK_LEN
            or incarnation == 0
        ):
            return Drop.MALFORMED
        owned = int.from_bytes(data[HEADER_LEN : HEADER_LEN + n], "little")
        want = int.from_bytes(data[HEADER_LEN + n : fresh_at], "little")
        if (owned | want) >> buckets or (flags and (state or owned or want)):
            return Drop.MALFORMED
        acks = {}
        for i in range(n_acks):
            a_node, a_inc, a_seq = _ACK.unpack_from(data, acks_at + i * ACK_LEN)
            acks[self.intern_id(a_node)] = (a_inc, a_seq)
        nid = self.intern_id(nid)
        body = data[_BODY_AT:fresh_at]
        last = self._bodies.get(nid)
        if last == body:
            body = last  # unchanged claim: the core compares by identity
        elif last is not None or len(self._bodies) < _IDS_MAX:
            self._bodies[nid] = body
        return Heartbeat(
            node_id=nid,
            digest=digest,
            incarnation=incarnation,
            seq=seq,
            state=_STATES[state],
            weight=weight,
            owned=owned,
            want=want,
            fresh=int.from_bytes(data[fresh_at:acks_at], "little"),
            acks=acks,
            bye=bool(flags),
            body=body,
        )
