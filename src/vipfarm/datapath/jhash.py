"""Which bucket a client falls into: nftables' `jhash` computed in Python.

The data path marks a new flow with `jhash <key> mod B seed S` (vipfarm.datapath.ruleset). The
kernel (net/netfilter/nft_hash.c) hashes the key's registers with `jhash(data, len, seed)`
(include/linux/jhash.h, Bob Jenkins' lookup3 over little-endian 32-bit words) and scales the
32-bit result into 0..B-1 with `reciprocal_scale`, i.e. (h * B) >> 32 - not `h % B`. The key is
laid out as nftables registers: an IPv4 address takes 4 bytes in network order, an IPv6 address
16, and a port one 4-byte register holding the 2 port bytes (network order) then 2 zero bytes.

Tests check this against the kernel: for many client ports, the node that answers is the owner
of the bucket computed here. It lets tools say which node serves a client, and lets benchmarks
probe every bucket of a node.
"""

from __future__ import annotations

import ipaddress
import struct

from vipfarm.datapath.spec import Affinity, IPAddress, Rule

_M = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M
    a ^= _rol(c, 4)
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= _rol(a, 6)
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= _rol(b, 8)
    b = (b + a) & _M
    a = (a - c) & _M
    a ^= _rol(c, 16)
    c = (c + b) & _M
    b = (b - a) & _M
    b ^= _rol(a, 19)
    a = (a + c) & _M
    c = (c - b) & _M
    c ^= _rol(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol(b, 14)) & _M
    a ^= c
    a = (a - _rol(c, 11)) & _M
    b ^= a
    b = (b - _rol(a, 25)) & _M
    c ^= b
    c = (c - _rol(b, 16)) & _M
    a ^= c
    a = (a - _rol(c, 4)) & _M
    b ^= a
    b = (b - _rol(a, 14)) & _M
    c ^= b
    c = (c - _rol(b, 24)) & _M
    return c


def jhash(data: bytes, initval: int) -> int:
    """The kernel's `jhash(key, length, initval)`."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & _M
    i = 0
    while length - i > 12:
        x, y, z = struct.unpack_from("<III", data, i)
        a, b, c = _mix((a + x) & _M, (b + y) & _M, (c + z) & _M)
        i += 12
    tail = data[i:] + b"\x00" * (12 - (length - i))
    if length - i == 0:
        return c
    x, y, z = struct.unpack("<III", tail)
    return _final((a + x) & _M, (b + y) & _M, (c + z) & _M)


def _register_port(port: int) -> bytes:
    return struct.pack("!H", port) + b"\x00\x00"


def hash_key(rule: Rule, client: IPAddress, port: int = 0) -> bytes:
    """The bytes nftables hashes for a new flow of `rule` from `client`:`port`."""
    if rule.affinity is Affinity.CLIENT_SUBNET:
        prefix = rule.prefix4 if client.version == 4 else rule.prefix6
        net = ipaddress.ip_network(f"{client}/{prefix}", strict=False)
        return net.network_address.packed
    if rule.affinity is Affinity.CLIENT_IP_PORT:
        return client.packed + _register_port(port)
    return client.packed


def bucket_of(rule: Rule, buckets: int, seed: int, client: IPAddress, port: int = 0) -> int:
    """The bucket a new flow of `rule` from `client`:`port` falls into."""
    h = jhash(hash_key(rule, client, port), seed)
    return (h * buckets) >> 32
