"""Heartbeat wire format: round trip, every drop reason, the checks made before any MAC, the
bounded cache of authenticated verdicts, key ids, version 1, and a fuzzer that runs in the
suite."""

from __future__ import annotations

import hmac
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vipfarm.membership.wire as wire
from vipfarm.membership.wire import (
    FLAG_BYE,
    FLAG_DEAF,
    HEADER1_LEN,
    HEADER_LEN,
    MAX_DATAGRAM,
    TAG_LEN,
    Ack,
    Codec,
    Drop,
    Heartbeat,
    NodeState,
    bits_of,
    config_digest,
    farm_id,
    key_id,
    mask_of,
    node_id,
)

KEY = b"0123456789abcdef0123456789abcdef"
B = 256


def encode(codec: Codec, **over: object) -> bytes:
    fields: dict[str, object] = {
        "node_id": node_id("node1"),
        "digest": 0xDEADBEEF,
        "incarnation": 1_700_000_000_000,
        "seq": 42,
        "state": NodeState.UP,
        "weight": 3,
        "owned": mask_of([0, 5, 255]),
        "want": mask_of([7]),
        "fresh": 0b1011,
        "fresh_len": 1,
        "acks": (Ack(node_id("node2"), 9, 77),),
    }
    fields.update(over)
    return codec.encode(**fields)  # type: ignore[arg-type]


def subkey(key: bytes, version: int) -> bytes:
    label = min(version, 2)  # versions 2 and 3 share one (the version byte is under the MAC)
    return hmac.digest(key, f"vipfarm heartbeat v{label}".encode(), "sha256")


def remac(codec: Codec, msg: bytes, key: bytes = KEY) -> bytes:
    """Re-authenticate a hand-modified datagram, to reach the checks after the MAC."""
    return msg + hmac.digest(subkey(key, msg[2]), msg, "sha256")


def test_round_trip_keeps_every_field() -> None:
    codec = Codec("farm", KEY, B)
    hb = Codec("farm", KEY, B).decode(encode(codec))
    assert isinstance(hb, Heartbeat)
    assert hb.node_id == node_id("node1")
    assert (hb.digest, hb.incarnation, hb.seq) == (0xDEADBEEF, 1_700_000_000_000, 42)
    assert (hb.state, hb.weight) == (NodeState.UP, 3)
    assert bits_of(hb.owned) == [0, 5, 255]
    assert bits_of(hb.want) == [7]
    assert hb.fresh == 0b1011
    assert hb.acks == {node_id("node2"): (9, 77)}
    assert hb.bye is False


def test_size_is_header_bitmaps_fresh_acks_and_tag() -> None:
    data = encode(Codec("farm", KEY, B))
    assert len(data) == HEADER_LEN + 2 * (B // 8) + 1 + 20 + TAG_LEN
    assert len(encode(Codec("farm", KEY, B), need=(1, 2))) == len(data) + 8
    assert len(encode(Codec("farm", KEY, B), version=1)) == len(data) - (HEADER_LEN - HEADER1_LEN)


def test_body_ignores_seq_fresh_and_acks() -> None:
    codec = Codec("farm", KEY, B)
    a = codec.decode(encode(codec, seq=1, fresh=1, acks=()))
    b = codec.decode(encode(codec, seq=2, fresh=0, acks=(Ack(1, 2, 3),)))
    c = codec.decode(encode(codec, seq=3, want=0))
    assert isinstance(a, Heartbeat) and isinstance(b, Heartbeat) and isinstance(c, Heartbeat)
    assert a.body == b.body
    assert a.body != c.body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Drop.MALFORMED),
        (b"VF\x01" + bytes(HEADER_LEN + TAG_LEN), Drop.FOREIGN_FARM),
        (b"XX" + bytes(HEADER_LEN + TAG_LEN), Drop.NOT_VIPFARM),
        (b"VF\x02" + bytes(HEADER_LEN + TAG_LEN), Drop.FOREIGN_FARM),
        (b"VF\x03" + bytes(HEADER_LEN + TAG_LEN), Drop.FOREIGN_FARM),
        (b"VF\x04" + bytes(HEADER_LEN + TAG_LEN), Drop.VERSION),
        (b"VF\x02" + bytes(MAX_DATAGRAM), Drop.MALFORMED),
    ],
    ids=["empty", "zero-farm", "magic", "zero-farm-v2", "zero-farm-v3", "version", "too-long"],
)
def test_cheap_checks_come_first(data: bytes, reason: Drop) -> None:
    assert Codec("farm", KEY, B).decode(data) == reason


def test_foreign_farm_wrong_key_and_tampering_are_told_apart() -> None:
    mine = Codec("farm", KEY, B)
    assert mine.decode(encode(Codec("other", KEY, B))) == Drop.FOREIGN_FARM
    # version 2 names its key: another key is refused before any MAC; version 1 does not
    assert mine.decode(encode(Codec("farm", b"x" * 32, B))) == Drop.UNKNOWN_KEY
    assert mine.decode(encode(Codec("farm", b"x" * 32, B), version=1)) == Drop.BAD_MAC
    data = bytearray(encode(mine))
    data[HEADER_LEN + 3] ^= 0x10  # one owned bit flipped in transit
    assert mine.decode(bytes(data)) == Drop.BAD_MAC


def test_bucket_count_must_match() -> None:
    assert Codec("farm", KEY, 512).decode(encode(Codec("farm", KEY, B))) == Drop.BUCKET_MISMATCH


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m[:3] + b"\x80" + m[4:],  # unknown flag
        lambda m: m[:49] + b"\x01" + m[50:],  # reserved byte
        lambda m: m[:48] + b"\x09" + m[49:],  # no such state
        lambda m: m[:16] + bytes(8) + m[24:],  # incarnation 0
        lambda m: m + b"\x00",  # trailing byte
        lambda m: m[:-1],  # truncated ack
        lambda m: m[:32] + b"\x07" + m[33:],  # ack count beyond the data
        lambda m: m[:33] + b"\x01" + m[34:],  # need count beyond the data
        lambda m: m[:40] + m[36:40] + m[44:],  # the other key id is the key id
    ],
    ids=[
        "flag",
        "reserved",
        "state",
        "incarnation",
        "trailing",
        "truncated",
        "ack-count",
        "need-count",
        "same-key-twice",
    ],
)
def test_authenticated_but_malformed(mutate: object) -> None:
    codec = Codec("farm", KEY, B)
    msg = encode(codec)[:-TAG_LEN]
    assert codec.decode(remac(codec, mutate(msg))) == Drop.MALFORMED  # type: ignore[operator]


def test_bits_beyond_bucket_count_are_malformed() -> None:
    codec = Codec("farm", KEY, 12)
    msg = bytearray(encode(codec, owned=1, want=0, acks=())[:-TAG_LEN])
    msg[HEADER_LEN + 1] = 0x80  # bucket 15 of 12
    assert codec.decode(remac(codec, bytes(msg))) == Drop.MALFORMED


def test_the_delivery_flags_travel_in_version_3_only() -> None:
    """Version 3 carries the kept bitmap and the deaf flag; a version 2 heartbeat leaves them
    out (the release before them drops a heartbeat with an unknown flag), and one that has
    them anyway is malformed, as that release finds it."""
    codec = Codec("farm", KEY, B)
    hb = codec.decode(encode(codec, kept=mask_of([3, 200]), deaf=True))
    assert isinstance(hb, Heartbeat)
    assert (hb.version, bits_of(hb.kept), hb.deaf, bits_of(hb.owned)) == (
        3,
        [3, 200],
        True,
        [0, 5, 255],
    )
    plain = encode(codec, version=2)
    assert encode(codec, version=2, kept=mask_of([3]), deaf=True) == plain
    old = codec.decode(plain)
    assert isinstance(old, Heartbeat) and (old.version, old.kept, old.deaf) == (2, 0, False)
    msg = plain[:-TAG_LEN]
    assert codec.decode(remac(codec, msg[:3] + bytes([FLAG_DEAF]) + msg[4:])) == Drop.MALFORMED


def test_goodbye_only_from_a_stopped_node_that_owns_nothing() -> None:
    codec = Codec("farm", KEY, B)
    bye = codec.decode(encode(codec, state=NodeState.STOP, owned=0, want=0, bye=True))
    assert isinstance(bye, Heartbeat) and bye.bye
    msg = encode(codec, state=NodeState.UP, owned=0, want=0)[:-TAG_LEN]
    forged = msg[:3] + bytes([FLAG_BYE]) + msg[4:]
    assert codec.decode(remac(codec, forged)) == Drop.MALFORMED


def test_authenticated_results_are_cached_per_payload_and_nothing_else() -> None:
    codec = Codec("farm", KEY, B)
    data = encode(codec)
    first = codec.decode(data)
    assert codec.cached(data) is first
    assert codec.decode(bytes(data)) is first
    for i in range(5000):  # garbage is never kept
        codec.decode(i.to_bytes(4, "big") * 20)
    forged = bytearray(data)
    forged[-1] ^= 1
    assert codec.decode(bytes(forged)) is Drop.BAD_MAC
    assert codec.cache_size == (1, len(data))


def test_the_cache_is_bounded_in_entries_and_bytes() -> None:
    codec = Codec("farm", KEY, 4096)
    big = (1 << 4096) - 1
    size = 0
    for seq in range(1, 2000):  # 1,1 kB each: the byte bound (1 MiB) is reached first
        data = encode(codec, seq=seq, owned=big, want=0, acks=())
        size = len(data)
        assert isinstance(codec.decode(data), Heartbeat)
        entries, held = codec.cache_size
        assert entries <= 4096 and held <= 1 << 20
    assert size > 1000
    small = Codec("farm", KEY, 8)
    for seq in range(1, 5000):
        small.decode(encode(small, seq=seq, owned=1, want=0, acks=()))
        assert small.cache_size[0] <= 4096


def test_length_and_key_are_checked_before_any_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec("farm", KEY, B)
    valid = encode(Codec("farm", KEY, B))
    foreign_key = encode(Codec("farm", b"y" * 32, B))
    macs = []
    real = wire._mac

    def counting(*args: object) -> bytes:
        macs.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(wire, "_mac", counting)
    for bad in (
        valid + b"\0",  # one byte more than the header's counts say
        valid[:-1],
        valid[:32] + b"\x09" + valid[33:],  # 9 acks claimed
        valid + bytes(60_000),  # a flood datagram
        foreign_key,  # a key we do not hold
        valid[:34] + b"\xff\xff" + valid[36:],  # fresh bitmap longer than any farm's
    ):
        assert codec.decode(bad) in (Drop.MALFORMED, Drop.UNKNOWN_KEY)
    assert macs == []
    assert isinstance(codec.decode(valid), Heartbeat)
    assert macs == [1]


def test_tag_is_hmac_sha256_of_everything_before_it() -> None:
    codec = Codec("farm", KEY, B)
    data = encode(codec)
    assert data[-TAG_LEN:] == hmac.digest(subkey(KEY, 2), data[:-TAG_LEN], "sha256")
    v1 = encode(codec, version=1)
    assert v1[-TAG_LEN:] == hmac.digest(subkey(KEY, 1), v1[:-TAG_LEN], "sha256")


def test_version_1_round_trip() -> None:
    """The previous format, byte for byte as version 1 code wrote it: no key ids, no need."""
    codec = Codec("farm", KEY, B)
    data = encode(codec, version=1)
    fixed = struct.pack(
        "!2sBB8sIQQBHIBBHH",
        b"VF", 1, 0, farm_id("farm"), node_id("node1"), 1_700_000_000_000, 42, 1, 1,
        0xDEADBEEF, int(NodeState.UP), 0, 3, B,
    )  # fmt: skip
    assert data.startswith(fixed)
    hb = codec.decode(data)
    assert isinstance(hb, Heartbeat)
    assert (hb.version, hb.key_id, hb.alt_key_id, hb.need) == (1, 0, 0, ())
    assert bits_of(hb.owned) == [0, 5, 255] and hb.acks == {node_id("node2"): (9, 77)}
    with pytest.raises(ValueError, match="version 4 is not spoken"):
        encode(codec, version=4)


def test_keys_are_named_and_both_accepted_during_a_rotation() -> None:
    old, new = KEY, b"N" * 32
    rotating = Codec("farm", old, B, next_key=new)
    assert (rotating.key_id, rotating.next_key_id) == (key_id(old), key_id(new))
    only_old, only_new = Codec("farm", old, B), Codec("farm", new, B)
    with_old, with_new = encode(rotating), encode(rotating, use_next=True)
    for data, kid, alt in (
        (with_old, key_id(old), key_id(new)),
        (with_new, key_id(new), key_id(old)),
    ):
        hb = rotating.decode(data)
        assert isinstance(hb, Heartbeat) and (hb.key_id, hb.alt_key_id) == (kid, alt)
    assert isinstance(only_old.decode(with_old), Heartbeat)
    assert only_old.decode(with_new) is Drop.UNKNOWN_KEY
    assert isinstance(only_new.decode(with_new), Heartbeat)
    assert isinstance(rotating.decode(encode(only_new)), Heartbeat)
    # version 1 always uses the primary key
    assert isinstance(only_old.decode(encode(rotating, version=1, use_next=True)), Heartbeat)
    # a step of the rotation replaces the keys and forgets what the old ones verified
    only_old.set_keys(new)
    assert only_old.cache_size == (0, 0)
    assert only_old.decode(with_old) is Drop.UNKNOWN_KEY
    with pytest.raises(ValueError, match="next farm key is 5 bytes"):
        only_old.set_keys(old, b"short")
    assert only_old.key_id == key_id(new)  # a refused change changes nothing


def test_heartbeats_of_one_node_share_the_id_and_an_unchanged_body() -> None:
    codec = Codec("farm", KEY, B)
    first, again, changed = (
        codec.decode(encode(codec, seq=1)),
        codec.decode(encode(codec, seq=2, fresh=0, acks=())),  # the same claim
        codec.decode(encode(codec, seq=3, want=0)),
    )
    assert isinstance(first, Heartbeat) and isinstance(again, Heartbeat)
    assert isinstance(changed, Heartbeat)
    assert first.node_id is again.node_id is changed.node_id is codec.intern_id(node_id("node1"))
    assert list(first.acks) == [node_id("node2")]
    assert next(iter(first.acks)) is codec.intern_id(node_id("node2"))
    assert again.body is first.body
    assert changed.body != first.body


def test_codec_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="at least 32 random bytes"):
        Codec("farm", b"short", B)
    with pytest.raises(ValueError, match=r"bucket count 0 .* 1\.\.4096"):
        Codec("farm", KEY, 0)
    with pytest.raises(ValueError, match="acks and 0 needs do not fit"):
        encode(Codec("farm", KEY, B), acks=tuple(Ack(i, 1, 1) for i in range(256)))


def test_ids_are_stable_and_distinct() -> None:
    assert farm_id("farm") == farm_id("farm") != farm_id("farm2")
    assert len(farm_id("farm")) == 8
    assert node_id("node1") != node_id("node2")
    assert 0 <= node_id("node1") < 2**32
    assert config_digest({"a": 1, "b": 2}, 256) == config_digest({"b": 2, "a": 1}, 256)
    assert config_digest({"a": 1, "b": 2}, 256) != config_digest({"a": 1, "b": 3}, 256)
    assert config_digest({"a": 1}, 256) != config_digest({"a": 1}, 512)


# --------------------------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = Codec("farm", KEY, B).decode(data)
    assert isinstance(result, Drop)  # random bytes never authenticate


@FUZZ
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(list(NodeState)),
    st.integers(0, 65535),
    st.integers(0, 2**B - 1),
    st.integers(0, 2**B - 1),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)), max_size=5),
)
def test_fuzz_round_trip(
    nid: int,
    inc: int,
    seq: int,
    state: NodeState,
    weight: int,
    owned: int,
    want: int,
    acks: list[tuple[int, int]],
) -> None:
    codec = Codec("farm", KEY, B)
    data = encode(
        codec,
        node_id=nid,
        incarnation=inc,
        seq=seq,
        state=state,
        weight=weight,
        owned=owned,
        want=want,
        acks=tuple(Ack(a, b, b) for a, b in acks),
    )
    hb = Codec("farm", KEY, B).decode(data)
    assert isinstance(hb, Heartbeat)
    assert (hb.node_id, hb.incarnation, hb.seq, hb.state, hb.weight) == (
        nid,
        inc,
        seq,
        state,
        weight,
    )
    assert (hb.owned, hb.want) == (owned, want)
    assert hb.acks == {a: (b, b) for a, b in acks}


@FUZZ
@given(st.data())
def test_fuzz_mutations_never_raise_and_never_authenticate(data: st.DataObject) -> None:
    codec = Codec("farm", KEY, B)
    valid = encode(codec)
    pos = data.draw(st.integers(0, len(valid)))
    kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if kind == "flip" and pos < len(valid):
        bit = data.draw(st.integers(0, 7))
        mutated = valid[:pos] + bytes([valid[pos] ^ (1 << bit)]) + valid[pos + 1 :]
    elif kind == "cut":
        mutated = valid[:pos]
    else:
        mutated = valid[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + valid[pos:]
    if mutated == valid:
        return
    result = Codec("farm", KEY, B).decode(mutated)
    assert isinstance(result, Drop)


@FUZZ
@given(st.binary(min_size=0, max_size=120))
def test_fuzz_authenticated_garbage_is_malformed_or_parsed(body: bytes) -> None:
    """Even a peer holding the key cannot crash the parser."""
    codec = Codec("farm", KEY, B)
    for version in (1, 2, 3):
        head = struct.pack("!2sBB8s", b"VF", version, 0, farm_id("farm"))
        if version >= 2:
            # node id .. fresh length, then the key id, so that the MAC is reached
            body = body[:24].ljust(24, b"\0") + key_id(KEY).to_bytes(4, "big") + body[24:]
        result = codec.decode(remac(codec, head + body))
        assert isinstance(result, Drop | Heartbeat)
