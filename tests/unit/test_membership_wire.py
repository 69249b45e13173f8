"""Heartbeat wire format: round trip, every drop reason, and a fuzzer that runs in the suite."""

from __future__ import annotations

import hmac
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipfarm.membership.wire import (
    FLAG_BYE,
    HEADER_LEN,
    TAG_LEN,
    Ack,
    Codec,
    Drop,
    Heartbeat,
    NodeState,
    bits_of,
    config_digest,
    farm_id,
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


def remac(codec: Codec, msg: bytes) -> bytes:
    """Re-authenticate a hand-modified datagram, to reach the checks after the MAC."""
    return msg + hmac.digest(codec._subkey, msg, "sha256")


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
        (b"VF\x02" + bytes(HEADER_LEN + TAG_LEN), Drop.VERSION),
    ],
    ids=["empty", "zero-farm", "magic", "version"],
)
def test_cheap_checks_come_first(data: bytes, reason: Drop) -> None:
    assert Codec("farm", KEY, B).decode(data) == reason


def test_foreign_farm_wrong_key_and_tampering_are_told_apart() -> None:
    mine = Codec("farm", KEY, B)
    assert mine.decode(encode(Codec("other", KEY, B))) == Drop.FOREIGN_FARM
    assert mine.decode(encode(Codec("farm", b"x" * 32, B))) == Drop.BAD_MAC
    data = bytearray(encode(mine))
    data[HEADER_LEN + 3] ^= 0x10  # one owned bit flipped in transit
    assert mine.decode(bytes(data)) == Drop.BAD_MAC


def test_bucket_count_must_match() -> None:
    assert Codec("farm", KEY, 512).decode(encode(Codec("farm", KEY, B))) == Drop.BUCKET_MISMATCH


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m[:3] + b"\x80" + m[4:],  # unknown flag
        lambda m: m[:40] + b"\x01" + m[41:],  # reserved byte
        lambda m: m[:39] + b"\x09" + m[40:],  # no such state
        lambda m: m[:16] + bytes(8) + m[24:],  # incarnation 0
        lambda m: m + b"\x00",  # trailing byte
        lambda m: m[:-1],  # truncated ack
        lambda m: m[:32] + b"\x07" + m[33:],  # ack count beyond the data
    ],
    ids=["flag", "reserved", "state", "incarnation", "trailing", "truncated", "ack-count"],
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


def test_goodbye_only_from_a_stopped_node_that_owns_nothing() -> None:
    codec = Codec("farm", KEY, B)
    bye = codec.decode(encode(codec, state=NodeState.STOP, owned=0, want=0, bye=True))
    assert isinstance(bye, Heartbeat) and bye.bye
    msg = encode(codec, state=NodeState.UP, owned=0, want=0)[:-TAG_LEN]
    forged = msg[:3] + bytes([FLAG_BYE]) + msg[4:]
    assert codec.decode(remac(codec, forged)) == Drop.MALFORMED


def test_decode_results_are_cached_per_payload() -> None:
    codec = Codec("farm", KEY, B)
    data = encode(codec)
    first = codec.decode(data)
    assert codec.cached(data) is first
    assert codec.decode(bytes(data)) is first
    for i in range(5000):  # the cache stays bounded
        codec.decode(i.to_bytes(4, "big"))
    assert len(codec._cache) <= 4096


def test_tag_is_hmac_sha256_of_everything_before_it() -> None:
    codec = Codec("farm", KEY, B)
    data = encode(codec)
    assert data[-TAG_LEN:] == hmac.digest(codec._subkey, data[:-TAG_LEN], "sha256")


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
    with pytest.raises(ValueError, match="acks do not fit"):
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
    head = struct.pack("!2sBB8s", b"VF", 1, 0, farm_id("farm"))
    result = codec.decode(remac(codec, head + body))
    assert isinstance(result, Drop | Heartbeat)
