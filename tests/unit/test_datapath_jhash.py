"""nftables' jhash in Python: the published lookup3 vectors and the key layouts."""

from __future__ import annotations

import ipaddress

from vipfarm.datapath.jhash import bucket_of, hash_key, jhash
from vipfarm.datapath.spec import Affinity, Proto, Rule

V4 = ipaddress.ip_address("198.51.100.100")
CLIENT = ipaddress.ip_address("203.0.113.77")


def test_lookup3_reference_vectors() -> None:
    # Bob Jenkins' lookup3.c driver: hashlittle("Four score and seven years ago", 30, 0 and 1).
    text = b"Four score and seven years ago"
    assert jhash(text, 0) == 0x17770551
    assert jhash(text, 1) == 0xCD628161
    assert jhash(b"", 0) == 0xDEADBEEF


def test_key_layout_per_affinity() -> None:
    port_rule = Rule(vip=V4, port=80, affinity=Affinity.CLIENT_IP_PORT)
    assert hash_key(port_rule, CLIENT, 0x1234) == CLIENT.packed + b"\x12\x34\x00\x00"
    ip_rule = Rule(vip=V4, proto=Proto.UDP, port=53, affinity=Affinity.CLIENT_IP)
    assert hash_key(ip_rule, CLIENT, 999) == CLIENT.packed
    subnet = Rule(vip=V4, port=80, affinity=Affinity.CLIENT_SUBNET, prefix4=24)
    assert hash_key(subnet, CLIENT) == ipaddress.ip_address("203.0.113.0").packed


def test_buckets_are_in_range_and_spread() -> None:
    rule = Rule(vip=V4, port=80, affinity=Affinity.CLIENT_IP_PORT)
    got = [bucket_of(rule, 256, 0x5EED, CLIENT, p) for p in range(40000, 45000)]
    assert min(got) >= 0 and max(got) <= 255
    counts = [got.count(b) for b in range(256)]
    assert min(counts) > 5 and max(counts) < 40  # ~19.5 each
    assert bucket_of(rule, 1, 7, CLIENT, 1) == 0
