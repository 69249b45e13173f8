"""The prefilter's program, run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`).

It must drop exactly the frames of buckets outside its bitmap, hashing each exactly as nftables
does (`vipfarm.datapath.jhash` predicts nftables; the namespace tests check that prediction
against the kernel), and let everything else go on to nftables untouched.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterator

import pytest

from vipfarm.datapath import bpf, prefilter, ruleset
from vipfarm.datapath.jhash import bucket_of
from vipfarm.datapath.spec import DatapathSpec, IPAddress, Rule

V4, V4B, V6 = "198.51.100.100", "198.51.100.101", "2001:db8::100"
RULES = [
    Rule(vip=V4, port=80),
    Rule(vip=V4, proto="udp", port=53, affinity="client-ip-port"),
    Rule(vip=V4, port=443, affinity="client-ip-port"),
    Rule(vip=V4B, port=8000, port_end=8100, affinity="client-subnet", prefix4=20),
    Rule(vip=V6, port=80),
    Rule(vip=V6, proto="udp", port=53, affinity="client-ip-port"),
    Rule(vip=V6, port=443, affinity="client-subnet", prefix6=56),
    Rule(vip=V6, proto="udp", port=9000, port_end=9999, affinity="client-subnet", prefix6=120),
]
SRC_MAC = bytes.fromhex("020000000001")


def frame(
    spec: DatapathSpec,
    vip: IPAddress,
    proto: int,
    client: IPAddress,
    sport: int,
    dport: int,
    mac: bytes | None = None,
) -> bytes:
    dst = mac if mac is not None else bytes.fromhex(spec.vmac(vip).replace(":", ""))
    l4 = struct.pack("!HH", sport, dport) + b"\0" * 16
    if vip.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, client.packed, vip.packed
        )
        return dst + SRC_MAC + b"\x08\x00" + ip + l4
    ip = struct.pack("!IHBB16s16s", 0x6 << 28, len(l4), proto, 64, client.packed, vip.packed)
    return dst + SRC_MAC + b"\x86\xdd" + ip + l4


class Loaded:
    def __init__(self, spec: DatapathSpec) -> None:
        self.spec = spec
        self.kept_fd = bpf.map_create(bpf.MAP_ARRAY, 4, prefilter.BITMAP_BYTES, 1, "t_kept")
        self.drops_fd = bpf.map_create(bpf.MAP_PERCPU_ARRAY, 4, 8, 1, "t_drops")
        code = bpf.assemble(prefilter.program(spec, self.kept_fd, self.drops_fd))
        self.prog_fd = bpf.prog_load(code, "t_prefilter")
        self.handle = prefilter.Loaded(0, self.kept_fd, self.drops_fd, self.prog_fd)
        self.mark = 0

    def keep(self, buckets: set[int]) -> None:
        prefilter.set_kept(self.handle, buckets)

    def run(self, packet: bytes) -> int:
        verdict, mark = bpf.test_run(self.prog_fd, packet)
        self.mark = mark
        return verdict


@pytest.fixture
def loaded(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    spec = DatapathSpec(farm="t", interface="eth0", rules=RULES, buckets=request.param)
    got = Loaded(spec)
    yield got
    got.handle.close()


def client_of(rnd: random.Random, version: int) -> IPAddress:
    if version == 4:
        return ipaddress.ip_address(rnd.getrandbits(32))
    return ipaddress.ip_address(0x20010DB8 << 96 | rnd.getrandbits(96))


@pytest.mark.parametrize("loaded", [1, 7, 256, 4096], indirect=True)
def test_drops_exactly_the_buckets_it_does_not_keep(loaded: Loaded) -> None:
    spec = loaded.spec
    rnd = random.Random(spec.buckets)
    kept = set(rnd.sample(range(spec.buckets), spec.buckets // 2))
    loaded.keep(kept)
    dropped = 0
    for rule in spec.rules:
        proto = 6 if rule.proto == "tcp" else 17
        for _ in range(150):
            client = client_of(rnd, rule.vip.version)
            sport = rnd.randrange(1024, 65536)
            dport = rnd.randint(rule.port, rule.port_end or rule.port)
            bucket = bucket_of(rule, spec.buckets, spec.seed, client, sport)
            verdict = loaded.run(frame(spec, rule.vip, proto, client, sport, dport))
            want = bpf.TC_NEXT if bucket in kept else bpf.TC_DROP
            assert verdict == want, (str(rule.vip), rule.affinity, str(client), sport, bucket)
            if verdict == bpf.TC_NEXT:  # its bucket for nftables, tagged
                assert loaded.mark == ruleset.PREFILTER_TAG | bucket, (hex(loaded.mark), bucket)
            dropped += verdict == bpf.TC_DROP
    assert dropped and prefilter.read(loaded.handle) == (frozenset(kept), dropped)
    loaded.keep(set(range(spec.buckets)))  # everything kept: nothing dropped
    rule = spec.rules[0]
    assert loaded.run(frame(spec, rule.vip, 6, client_of(rnd, 4), 1000, 80)) == bpf.TC_NEXT


@pytest.mark.parametrize("loaded", [256], indirect=True)
def test_leaves_everything_else_to_nftables(loaded: Loaded) -> None:
    spec = loaded.spec
    loaded.keep(set())  # would drop any frame it decides on
    v4, v6 = ipaddress.ip_address(V4), ipaddress.ip_address(V6)
    c4, c6 = ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8:1::7")
    good = frame(spec, v4, 6, c4, 1234, 80)
    assert loaded.run(good) == bpf.TC_DROP  # the frame the others are variations of

    def ipv4(offset: int, value: bytes) -> bytes:
        return good[: 14 + offset] + value + good[14 + offset + len(value) :]

    others = {
        "another MAC (this node's own, directed delivery)": frame(
            spec, v4, 6, c4, 1234, 80, mac=bytes.fromhex("525400000001")
        ),
        "a VMAC of another farm": frame(
            spec, v4, 6, c4, 1234, 80, mac=bytes.fromhex("02aabbccddee")
        ),
        "ARP": good[:12] + b"\x08\x06" + good[14:],
        "VLAN-tagged": good[:12] + b"\x81\x00" + good[14:],
        "IPv4 options": ipv4(0, b"\x46"),
        "a first fragment": ipv4(6, b"\x20\x00"),
        "a later fragment": ipv4(6, b"\x00\x10"),
        "ICMP": ipv4(9, b"\x01"),
        "another VIP": ipv4(16, ipaddress.ip_address("198.51.100.9").packed),
        "a port no rule has": frame(spec, v4, 6, c4, 1234, 81),
        "UDP to a TCP rule's port": frame(spec, v4, 17, c4, 1234, 80),
        "below a range": frame(spec, ipaddress.ip_address(V4B), 6, c4, 1234, 7999),
        "above a range": frame(spec, ipaddress.ip_address(V4B), 6, c4, 1234, 8101),
        "IPv6 with an extension header": frame(spec, v6, 0, c6, 1234, 80),
        "IPv6 fragment header": frame(spec, v6, 44, c6, 1234, 80),
        "truncated before the ports": good[:37],
        # (the kernel test-runs no IP frame shorter than its IP header)
        "IPv6 truncated before the ports": frame(spec, v6, 6, c6, 1234, 80)[:57],
    }
    for what, packet in others.items():
        assert loaded.run(packet) == bpf.TC_NEXT, what
        assert loaded.mark == 0, what  # not one of its frames: nftables decides as ever
    assert loaded.run(frame(spec, v6, 6, c6, 1234, 80)) == bpf.TC_DROP
    assert loaded.run(frame(spec, ipaddress.ip_address(V4B), 6, c4, 1, 8100)) == bpf.TC_DROP


def test_a_program_the_verifier_refuses_says_why() -> None:
    with pytest.raises(bpf.BpfError, match=r"verifier: .*R0 !read_ok"):
        bpf.prog_load(bpf.assemble([bpf.exit_()]), "t_refused")  # exits with r0 unset
