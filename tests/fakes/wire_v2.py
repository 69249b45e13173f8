# A frozen copy of src/vipfarm/membership/wire.py as released with heartbeat version 2 (commit
# dec3a9c), before directed delivery added its flags; kept unchanged so that tests can check
# the current code against what a node of that release really sends and accepts (rolling
# upgrades). Do not edit it to follow changes.
"""Heartbeat wire format: a versioned, HMAC-SHA256-authenticated binary datagram.

Every node sends one heartbeat per `interval` (and a few extra when its claims change) to every
peer on every heartbeat network. The datagram says who the sender is (farm id, node id,
incarnation, sequence number), what it is (state, weight) and which buckets it holds, wants and
hears, which key authenticates it, and which peers it still needs a proof of freshness from;
docs/PROTOCOL.md describes it field by field.

Theory of operation:

- Two versions are spoken. Version 2 (`VERSION`) names the key that MACs the datagram (a 32-bit
  key id) and the other key the sender accepts, which lets a farm rotate its key without
  downtime, and carries the *need* list (peers whose current incarnation the sender has not yet
  proven fresh: they answer with an acknowledgement, see membership.core). Version 1 is the
  previous format, decoded and encoded for a rolling upgrade (always with the primary key).
- `Codec.encode` packs the fields and appends `HMAC-SHA256(subkey, everything before)`, where
  the subkey is derived from a farm key with a fixed label per version, so the raw farm key never
  MACs anything else the project may sign later. The codec keeps the SHA-256 states of the keyed
  inner and outer pads (RFC 2104), so a tag costs the hashing of the datagram only: the same
  tag as `hmac.digest`, in less than half the time.
- `Codec.decode` never raises: it returns a `Heartbeat` or the `Drop` reason. Everything that
  costs nothing comes before the MAC: the length bounds, magic, version, farm id, the exact
  total length computed from the header's counts, and (version 2) a known key id, so a flood of
  garbage costs a few comparisons per datagram and one MAC at most per datagram that names our
  farm and key. Only authenticated bytes are parsed further. Replay (old incarnation or
  sequence, or an incarnation not yet proven fresh) needs per-peer state and is the membership
  core's job; the reasons it uses are listed in `Drop` too.
- The simulator hands the same payload object to dozens of receivers, and a daemon receives the
  same datagram once per heartbeat network, so `decode` keeps a cache of *authenticated* verdicts
  keyed by the payload bytes: identical bytes always yield the identical verdict, so the MAC is
  computed once per payload, not once per receiver. Unauthenticated datagrams are never cached
  (they would let anyone fill memory), and the cache is bounded in entries and in bytes (cleared
  when either bound is reached, which keeps it O(1)).
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
VERSION: Final = 2  # the newest version this code speaks
MIN_VERSION: Final = 1  # the oldest one it still decodes and, for such peers, sends
TAG_LEN: Final = 32
MIN_KEY_LEN: Final = 32
MAX_NAME_BYTES: Final = 32
MAX_BUCKETS: Final = 4096
MAX_ACKS: Final = 255
MAX_FRESH: Final = (MAX_ACKS + 7) // 8  # a farm has at most 255 nodes
FLAG_BYE: Final = 0x01  # last heartbeat of a node that stopped and owns nothing

# Version 1: magic, version, flags, farm id, node id, incarnation, seq, ack count, fresh length,
# then the "body": config digest, state, reserved, weight, buckets (and the two bitmaps after it)
_HEADER1: Final = struct.Struct("!2sBB8sIQQBHIBBHH")
HEADER1_LEN: Final = _HEADER1.size
_BODY1_AT: Final = 35
# Version 2: magic, version, flags, farm id, node id, incarnation, seq, ack count, need count,
# fresh length, then the body: key id, other key id, config digest, state, reserved, weight,
# buckets (and the bitmaps). The key ids are in the body so that a key switch is a claim change.
_HEADER2: Final = struct.Struct("!2sBB8sIQQBBHIIIBBHH")
HEADER2_LEN: Final = _HEADER2.size
HEADER_LEN: Final = HEADER2_LEN
_BODY2_AT: Final = 36
_ACK: Final = struct.Struct("!IQQ")
ACK_LEN: Final = _ACK.size
NEED_LEN: Final = 4
MAX_DATAGRAM: Final = (
    HEADER2_LEN + 2 * (MAX_BUCKETS // 8) + MAX_FRESH + MAX_ACKS * (ACK_LEN + NEED_LEN) + TAG_LEN
)
_CACHE_MAX: Final = 4096  # entries
_CACHE_BYTES: Final = 1 << 20  # payload bytes kept as keys
_IDS_MAX: Final = 4 * MAX_ACKS  # node ids whose objects are shared (a farm has at most 255)
_BLOCK: Final = 64  # SHA-256 block size, for the HMAC pads
_NO_NEED: Final[tuple[int, ...]] = ()


class NodeState(IntEnum):
    """A node's state as carried on the wire (values are part of protocol versions 1 and 2)."""

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
    UNKNOWN_KEY = "unknown_key"
    BAD_MAC = "bad_mac"
    BUCKET_MISMATCH = "bucket_mismatch"
    UNKNOWN_NODE = "unknown_node"
    OWN = "own"
    REPLAY = "replay"
    DUPLICATE = "duplicate"
    UNPROVEN = "unproven"
    UNKNOWN_NETWORK = "unknown_network"
    UNKNOWN_SOURCE = "unknown_source"  # counted by the pulse, before decoding


def farm_id(farm: str) -> bytes:
    """8 bytes naming the farm on the wire; lets a node tell a neighbour farm from an attack."""
    return hashlib.sha256(b"vipfarm-farm\0" + farm.encode()).digest()[:8]


def node_id(name: str) -> int:
    """32-bit id of a node name on the wire (collisions are rejected at configuration time)."""
    return int.from_bytes(hashlib.sha256(b"vipfarm-node\0" + name.encode()).digest()[:4], "big")


def key_id(key: bytes) -> int:
    """32-bit id of a farm key on the wire (never 0, which means "none"). An HMAC under the key,
    so it says nothing about the key to whoever does not hold it."""
    return int.from_bytes(hmac.digest(key, b"vipfarm key id", "sha256")[:4], "big") or 1


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
    body: bytes  # key ids .. want bitmap, verbatim: equal bodies mean an unchanged claim
    version: int = VERSION
    key_id: int = 0  # the key that authenticated it (0 for version 1: the primary key)
    alt_key_id: int = 0  # the other key the sender accepts (0: none)
    need: tuple[int, ...] = _NO_NEED  # node ids whose acknowledgement the sender waits for


def _pads(subkey: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    padded = subkey.ljust(_BLOCK, b"\0")
    return (
        hashlib.sha256(bytes(b ^ 0x36 for b in padded)),
        hashlib.sha256(bytes(b ^ 0x5C for b in padded)),
    )


def _check_key(key: bytes, what: str) -> None:
    if len(key) < MIN_KEY_LEN:
        raise ValueError(
            f"{what} is {len(key)} bytes; it must be at least {MIN_KEY_LEN} random bytes "
            "(generate one with `head -c 32 /dev/urandom | base64`)"
        )


class Codec:
    """Encodes and verifies heartbeats of one farm. Share one instance between cores freely.

    `key` is the primary farm key (`farm.key_file`); `next_key` the one being rolled out
    (`farm.next_key_file`). Both are accepted; which one a heartbeat is sent with is the
    caller's choice (`encode(use_next=...)`), and version 1 always uses the primary key."""

    __slots__ = (
        "_bitmap_len",
        "_bodies",
        "_cache",
        "_cache_bytes",
        "_ids",
        "_pads1",
        "_pads2",
        "buckets",
        "cached",
        "farm_id",
        "key_id",
        "next_key_id",
    )

    def __init__(self, farm: str, key: bytes, buckets: int, next_key: bytes | None = None) -> None:
        if not 1 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"bucket count {buckets} is out of range: use 1..{MAX_BUCKETS}")
        self.farm_id = farm_id(farm)
        self.buckets = buckets
        self._bitmap_len = (buckets + 7) // 8
        self._cache: dict[bytes, Heartbeat | Drop] = {}
        self._cache_bytes = 0
        # The receive hot path calls this first and `decode` only on a miss.
        self.cached = self._cache.get
        self._ids: dict[int, int] = {}
        self._bodies: dict[int, bytes] = {}  # latest body per node id
        self.key_id = self.next_key_id = 0
        self._pads1 = _pads(b"")
        self._pads2: dict[int, tuple[hashlib._Hash, hashlib._Hash]] = {}
        self.set_keys(key, next_key)

    def set_keys(self, key: bytes, next_key: bytes | None = None) -> None:
        """Replace the keys (a live key rotation step); verdicts cached under the old keys go."""
        _check_key(key, "farm key")
        pads2 = {key_id(key): _pads(hmac.digest(key, b"vipfarm heartbeat v2", "sha256"))}
        nid = 0
        if next_key is not None and next_key != key:
            _check_key(next_key, "next farm key")
            nid = key_id(next_key)
            if nid in pads2:
                raise ValueError(
                    "the farm key and the next farm key have the same key id (a 1 in 4 billion "
                    "chance): generate another next key"
                )
            pads2[nid] = _pads(hmac.digest(next_key, b"vipfarm heartbeat v2", "sha256"))
        self.key_id = key_id(key)
        self.next_key_id = nid
        self._pads1 = _pads(hmac.digest(key, b"vipfarm heartbeat v1", "sha256"))
        self._pads2 = pads2
        self._cache.clear()
        self._cache_bytes = 0

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
        need: tuple[int, ...] = (),
        version: int = VERSION,
        use_next: bool = False,
    ) -> bytes:
        """Pack and authenticate one heartbeat. `fresh_len` is the fresh bitmap size in bytes.
        Version 1 has no need list and no key ids (the primary key MACs it)."""
        if len(acks) > MAX_ACKS or len(need) > MAX_ACKS:
            raise ValueError(
                f"{len(acks)} acks and {len(need)} needs do not fit one heartbeat "
                f"(at most {MAX_ACKS} each)"
            )
        n = self._bitmap_len
        flags = FLAG_BYE if bye else 0
        if version == 1:
            head = _HEADER1.pack(
                MAGIC, 1, flags, self.farm_id, node_id, incarnation, seq, len(acks), fresh_len,
                digest, int(state), 0, weight, self.buckets,
            )  # fmt: skip
            inner, outer = self._pads1
            tail: list[bytes] = []
        elif version == VERSION:
            kid = self.next_key_id if use_next and self.next_key_id else self.key_id
            alt = self.key_id if kid != self.key_id else self.next_key_id
            head = _HEADER2.pack(
                MAGIC, VERSION, flags, self.farm_id, node_id, incarnation, seq, len(acks),
                len(need), fresh_len, kid, alt, digest, int(state), 0, weight, self.buckets,
            )  # fmt: skip
            inner, outer = self._pads2[kid]
            tail = [b"".join(i.to_bytes(4, "big") for i in need)]
        else:
            raise ValueError(f"heartbeat version {version} is not spoken: use 1 or {VERSION}")
        parts = [
            head,
            owned.to_bytes(n, "little"),
            want.to_bytes(n, "little"),
            fresh.to_bytes(fresh_len, "little"),
            *(_ACK.pack(a.node_id, a.incarnation, a.seq) for a in acks),
            *tail,
        ]
        msg = b"".join(parts)
        return msg + _mac(inner, outer, msg)

    def decode(self, data: bytes) -> Heartbeat | Drop:
        """Verify and parse one datagram; never raises. Authenticated verdicts are cached per
        payload bytes."""
        hit = self._cache.get(data)
        if hit is not None:
            return hit
        result, authenticated = self._decode(data)
        if authenticated:
            size = len(data)
            if len(self._cache) >= _CACHE_MAX or self._cache_bytes + size > _CACHE_BYTES:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[data] = result
            self._cache_bytes += size
        return result

    @property
    def cache_size(self) -> tuple[int, int]:
        """(entries, payload bytes) of the verdict cache."""
        return len(self._cache), self._cache_bytes

    def _decode(self, data: bytes) -> tuple[Heartbeat | Drop, bool]:
        """(verdict, whether the MAC verified)."""
        size = len(data)
        if size < HEADER1_LEN + TAG_LEN or size > MAX_DATAGRAM:
            return Drop.MALFORMED, False
        if data[:2] != MAGIC:
            return Drop.NOT_VIPFARM, False
        version = data[2]
        if version == VERSION:
            if size < HEADER2_LEN + TAG_LEN:
                return Drop.MALFORMED, False
            (
                _, _, flags, fid, nid, incarnation, seq, n_acks, n_need, fresh_len,
                kid, alt, digest, state, reserved, weight, buckets,
            ) = _HEADER2.unpack_from(data)  # fmt: skip
            head_len, body_at = HEADER2_LEN, _BODY2_AT
        elif version == 1:
            (
                _, _, flags, fid, nid, incarnation, seq, n_acks, fresh_len,
                digest, state, reserved, weight, buckets,
            ) = _HEADER1.unpack_from(data)  # fmt: skip
            head_len, body_at, n_need, kid, alt = HEADER1_LEN, _BODY1_AT, 0, 0, 0
        else:
            return Drop.VERSION, False
        if fid != self.farm_id:
            return Drop.FOREIGN_FARM, False
        # The exact length from the header's own counts: a datagram that disagrees is dropped
        # before any hashing (the bucket count is checked against ours after the MAC, where a
        # mismatch means a misconfigured peer rather than noise).
        n = (buckets + 7) // 8
        end = size - TAG_LEN
        fresh_at = head_len + 2 * n
        acks_at = fresh_at + fresh_len
        need_at = acks_at + n_acks * ACK_LEN
        if fresh_len > MAX_FRESH or end != need_at + n_need * NEED_LEN:
            return Drop.MALFORMED, False
        if version == 1:
            inner, outer = self._pads1
        else:
            pads = self._pads2.get(kid)
            if pads is None:
                return Drop.UNKNOWN_KEY, False
            inner, outer = pads
        if not hmac.compare_digest(_mac(inner, outer, memoryview(data)[:end]), data[end:]):
            return Drop.BAD_MAC, False
        # Authenticated from here on: a malformed datagram now means a buggy or newer peer.
        if buckets != self.buckets:
            return Drop.BUCKET_MISMATCH, True
        if (
            flags & ~FLAG_BYE
            or reserved
            or state > NodeState.STOPPING
            or incarnation == 0
            or (alt and alt == kid)
        ):
            return Drop.MALFORMED, True
        owned = int.from_bytes(data[head_len : head_len + n], "little")
        want = int.from_bytes(data[head_len + n : fresh_at], "little")
        if (owned | want) >> buckets or (flags and (state or owned or want)):
            return Drop.MALFORMED, True
        acks = {}
        for i in range(n_acks):
            a_node, a_inc, a_seq = _ACK.unpack_from(data, acks_at + i * ACK_LEN)
            acks[self.intern_id(a_node)] = (a_inc, a_seq)
        need = (
            tuple(
                int.from_bytes(data[at : at + NEED_LEN], "big")
                for at in range(need_at, end, NEED_LEN)
            )
            if n_need
            else _NO_NEED
        )
        nid = self.intern_id(nid)
        body = data[body_at:fresh_at]
        last = self._bodies.get(nid)
        if last == body:
            body = last  # unchanged claim: the core compares by identity
        elif last is not None or len(self._bodies) < _IDS_MAX:
            self._bodies[nid] = body
        hb = Heartbeat(
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
            version=version,
            key_id=kid,
            alt_key_id=alt,
            need=need,
        )
        return hb, True


def _mac(inner: hashlib._Hash, outer: hashlib._Hash, msg: bytes | memoryview) -> bytes:
    """HMAC-SHA256(subkey, msg) from the precomputed pad states of the subkey."""
    i = inner.copy()
    i.update(msg)
    o = outer.copy()
    o.update(i.digest())
    return o.digest()
