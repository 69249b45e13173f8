"""The prefilter: a BPF program at tc ingress that drops other nodes' frames before nftables.

Every node receives every frame sent to a VMAC and drops the (N-1)/N that are not its own. The
nftables ingress decision (`vipfarm.datapath.ruleset`) does that before conntrack, but the netdev
hook, its chains and its lookups still cost some 200 ns a frame (measured: `vipfarm bench`,
docs/BENCHMARKS.md). This program, attached with a tcx link ahead of that hook, takes the same
decision for the common case in a few tens of nanoseconds, and leaves everything else to
nftables, which stays the authority:

* a frame to one of the spec's VMACs, IPv4 without options or IPv6 without extension headers,
  not a fragment, TCP or UDP, to a VIP, protocol and port a rule balances: its bucket is hashed
  exactly as nftables does (`vipfarm.datapath.jhash`: lookup3 over the key's registers, then
  ``(h * buckets) >> 32``), and if the bucket is not in the prefilter's kept bitmap the frame is
  dropped and counted (a per-CPU counter);
* a frame of a bucket in the bitmap goes on with its bucket in the mark, tagged
  (`ruleset.PREFILTER_TAG`): the nftables ingress chain takes it from there instead of looking
  up the rule and hashing again (some 130 ns of an owned frame's path);
* anything else (another MAC, ARP, ICMP, fragments, options, ports no rule has) goes on
  unchanged (``TC_ACT_UNSPEC``: the next program, then nftables, decides).

Safety rests on one invariant, kept by `vipfarm.datapath.datapath.Datapath`: the bitmap always
holds every bucket of the nftables kept set (which holds every owned bucket). Buckets are added
to the bitmap before the nftables transaction that keeps them, and taken out only after the
transaction that released them succeeded. So the prefilter drops only frames nftables would drop
too, and a failure anywhere leaves extra bits (frames go on to nftables), never a missing one.

The program is written in eBPF by `program` (`vipfarm.datapath.bpf` assembles and loads it: no
compiler or library is needed at install time). The rules are immediates in the code, so a
change of rules loads a new program and swaps it in atomically (``BPF_LINK_UPDATE``); the bitmap
and the counter are array maps that survive it. The link belongs to the process that made it:
if that process dies, the kernel detaches the program and nftables decides alone. Kernels before
6.6 have no tcx: there the prefilter is off and says why (`Datapath.prefilter_state`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vipfarm.datapath import bpf, ruleset
from vipfarm.datapath.bpf import (
    ADD,
    AND,
    DW,
    JGT,
    JLT,
    JNE,
    LSH,
    MOV,
    MUL,
    OR,
    RSH,
    SUB,
    XOR,
    B,
    BpfError,
    H,
    Item,
    Label,
    W,
)
from vipfarm.datapath.jhash import JHASH_INITVAL
from vipfarm.datapath.spec import Affinity, DatapathSpec, Proto, Rule

MAX_RULES = 1024  # a longer program is not worth verifying: nftables alone decides then
BITMAP_BYTES = 512  # 4,096 buckets, the most a spec may have
_ETH = 14
_PROTO = {Proto.TCP: socket.IPPROTO_TCP, Proto.UDP: socket.IPPROTO_UDP}

# registers
_CTX, _DATA, _END = 6, 7, 8
_A, _B, _C, _T1, _T2 = 1, 2, 0, 3, 4  # the hash's state and temporaries
_PROTO_REG, _PORT_REG = 1, 5  # while the rules are matched (the port in host order)


class Unsupported(ValueError):
    """The spec is one the prefilter does not take (nftables alone decides); says why."""


def _le32(raw: bytes) -> int:
    value: int = struct.unpack("<I", raw)[0]
    return value


def _rol(dst: int, x: int, k: int) -> list[Item]:
    """dst = rol32(x, k), with _T2 as scratch."""
    return [
        bpf.alu32x(MOV, dst, x),
        bpf.alu32(LSH, dst, k),
        bpf.alu32x(MOV, _T2, x),
        bpf.alu32(RSH, _T2, 32 - k),
        bpf.alu32x(OR, dst, _T2),
    ]


def _step(op: int, dst: int, x: int, k: int) -> list[Item]:
    """dst op= rol32(x, k)"""
    return [*_rol(_T1, x, k), bpf.alu32x(op, dst, _T1)]


def _mix() -> list[Item]:
    a, b, c = _A, _B, _C
    out: list[Item] = []
    # x -= z; x ^= rol(z, k); z += y
    steps = ((a, b, c, 4), (b, c, a, 6), (c, a, b, 8), (a, b, c, 16), (b, c, a, 19), (c, a, b, 4))
    for x, y, z, k in steps:
        out += [bpf.alu32x(SUB, x, z), *_step(XOR, x, z, k), bpf.alu32x(ADD, z, y)]
    return out


def _final() -> list[Item]:
    a, b, c = _A, _B, _C
    out: list[Item] = []
    for x, y, k in (
        (c, b, 14),
        (a, c, 11),
        (b, a, 25),
        (c, b, 16),
        (a, c, 4),
        (b, a, 14),
        (c, b, 24),
    ):
        out += [bpf.alu32x(XOR, x, y), *_step(SUB, x, y, k)]
    return out


def _jhash(words: list[list[Item]], seed: int) -> list[Item]:
    """The kernel's jhash over len(words) 32-bit words, into _C; each `words` entry loads one
    word (little-endian, as jhash reads it) into _T1."""
    n = len(words)
    init = (JHASH_INITVAL + 4 * n + seed) & 0xFFFFFFFF
    out: list[Item] = [bpf.alu32(MOV, r, init) for r in (_A, _B, _C)]
    for start in range(0, n, 3):
        for reg, load in zip((_A, _B, _C), words[start : start + 3], strict=False):
            out += [*load, bpf.alu32x(ADD, reg, _T1)]
        out += _mix() if n - start > 3 else _final()
    return out


def _word(off: int, size: int = W, mask: int | None = None) -> list[Item]:
    out: list[Item] = [bpf.load(size, _T1, _DATA, off)]
    if mask is not None and mask != 0xFFFFFFFF:
        out.append(bpf.alu32(AND, _T1, mask))
    return out


def _key_words(rule: Rule) -> list[list[Item]]:
    """How to load each 32-bit word of the rule's hash key (`ruleset.hash_key`)."""
    v4 = rule.vip.version == 4
    saddr, sport = (_ETH + 12, _ETH + 20) if v4 else (_ETH + 8, _ETH + 40)
    n = 1 if v4 else 4
    masks = [0xFFFFFFFF] * n
    if rule.affinity is Affinity.CLIENT_SUBNET:
        prefix = rule.prefix4 if v4 else rule.prefix6
        net = ipaddress.ip_network(f"{'0.0.0.0' if v4 else '::'}/{prefix}").netmask.packed
        masks = [_le32(net[4 * i : 4 * i + 4]) for i in range(n)]
    words = [_word(saddr + 4 * i, W, masks[i]) for i in range(n)]
    if rule.affinity is Affinity.CLIENT_IP_PORT:
        words.append(_word(sport, H))  # a register: the 2 port bytes, then 2 zero bytes
    return words


def _key_name(rule: Rule) -> str:
    if rule.affinity is Affinity.CLIENT_SUBNET:
        return (
            f"k{rule.vip.version}_subnet_{rule.prefix4 if rule.vip.version == 4 else rule.prefix6}"
        )
    return f"k{rule.vip.version}_{rule.affinity.value}"


def _match_rules(rules: list[Rule], daddr_regs: list[int]) -> list[Item]:
    """Each rule in turn: VIP (the words in `daddr_regs`), protocol and port range; the first
    that matches goes to its key's hash (rules never overlap, `DatapathSpec`), none to pass."""
    out: list[Item] = []
    for i, rule in enumerate(rules):
        nxt = f"r{rule.vip.version}_{i}"
        packed = rule.vip.packed
        for j, reg in enumerate(daddr_regs):
            out.append(bpf.jmp32(JNE, reg, _le32(packed[4 * j : 4 * j + 4]), nxt))
        out.append(bpf.jmp(JNE, _PROTO_REG, _PROTO[rule.proto], nxt))
        end = rule.port if rule.port_end is None else rule.port_end
        if end == rule.port:
            out.append(bpf.jmp(JNE, _PORT_REG, rule.port, nxt))
        else:
            out += [bpf.jmp(JLT, _PORT_REG, rule.port, nxt), bpf.jmp(JGT, _PORT_REG, end, nxt)]
        out += [bpf.goto(_key_name(rule)), Label(nxt)]
    return [*out, bpf.goto("pass")]


def _family(version: int, rules: list[Rule]) -> list[Item]:
    """Parse one family's headers (or pass), then match its rules."""
    if version == 4:
        l4 = _ETH + 20
        out: list[Item] = [
            Label("v4"),
            bpf.mov64(2, _DATA),
            bpf.alu64(ADD, 2, l4 + 4),
            bpf.jmpx(JGT, 2, _END, "pass"),
            bpf.load(B, 2, _DATA, _ETH),
            bpf.jmp(JNE, 2, 0x45, "pass"),  # IPv4, no options
            bpf.load(H, 2, _DATA, _ETH + 6),
            bpf.alu32(AND, 2, 0xFF3F),  # MF or a fragment offset (little-endian load)
            bpf.jmp(JNE, 2, 0, "pass"),
            bpf.load(B, _PROTO_REG, _DATA, _ETH + 9),
            bpf.load(W, 4, _DATA, _ETH + 16),
            bpf.load(H, _PORT_REG, _DATA, l4 + 2),
            bpf.bswap16(_PORT_REG),
        ]
        return out + _match_rules(rules, [4])
    l4 = _ETH + 40
    daddr = [2, 3, 4, 9]
    out = [
        Label("v6"),
        bpf.mov64(2, _DATA),
        bpf.alu64(ADD, 2, l4 + 4),
        bpf.jmpx(JGT, 2, _END, "pass"),
        bpf.load(B, _PROTO_REG, _DATA, _ETH + 6),  # next header: TCP or UDP only
        bpf.load(H, _PORT_REG, _DATA, l4 + 2),
        bpf.bswap16(_PORT_REG),
        *(bpf.load(W, r, _DATA, _ETH + 24 + 4 * i) for i, r in enumerate(daddr)),
    ]
    return out + _match_rules(rules, daddr)


def program(spec: DatapathSpec, kept_fd: int, drops_fd: int) -> list[Item]:
    """The prefilter for `spec`; raises `Unsupported` for a spec it does not take."""
    if len(spec.rules) > MAX_RULES:
        raise Unsupported(f"{len(spec.rules)} rules, more than the prefilter's {MAX_RULES}")
    vmacs = sorted({spec.vmac(v) for v in spec.vips})
    by_family = {v: [r for r in spec.rules if r.vip.version == v] for v in (4, 6)}
    out: list[Item] = [
        bpf.mov64(_CTX, 1),
        bpf.load(W, _DATA, _CTX, 76),  # __sk_buff.data
        bpf.load(W, _END, _CTX, 80),  # __sk_buff.data_end
        bpf.mov64(2, _DATA),
        bpf.alu64(ADD, 2, _ETH),
        bpf.jmpx(JGT, 2, _END, "pass"),
        bpf.load(W, 2, _DATA, 0),
        bpf.load(H, 3, _DATA, 4),
    ]
    for i, mac in enumerate(vmacs):
        raw = bytes.fromhex(mac.replace(":", ""))
        out += [
            bpf.jmp32(JNE, 2, _le32(raw[:4]), f"mac{i}"),
            bpf.jmp(bpf.JEQ, 3, struct.unpack("<H", raw[4:])[0], "vmac"),
            Label(f"mac{i}"),
        ]
    out += [bpf.goto("pass"), Label("vmac"), bpf.load(H, 2, _DATA, 12)]
    if by_family[4]:
        out.append(bpf.jmp(bpf.JEQ, 2, 0x0008, "v4"))  # 0x0800, read little-endian
    if by_family[6]:
        out.append(bpf.jmp(bpf.JEQ, 2, 0xDD86, "v6"))  # 0x86dd
    out.append(bpf.goto("pass"))
    for version, rules in by_family.items():
        if rules:
            out += _family(version, rules)
    keys: dict[str, Rule] = {}
    for rule in spec.rules:
        keys.setdefault(_key_name(rule), rule)
    for name, rule in keys.items():
        out += [Label(name), *_jhash(_key_words(rule), spec.seed), bpf.goto("bucket")]
    out += [
        Label("bucket"),
        bpf.alu32x(MOV, 0, _C),  # zero-extended
        bpf.alu64(MUL, 0, spec.buckets),
        bpf.alu64(RSH, 0, 32),  # reciprocal_scale: the bucket, < spec.buckets
        bpf.mov64(9, 0),
        bpf.mov64(1, 0),
        bpf.alu64(RSH, 1, 5),
        bpf.alu64(LSH, 1, 2),
        bpf.alu64(AND, 1, BITMAP_BYTES - 4),  # the bitmap word's offset, for the verifier too
        *bpf.ld_map(2, kept_fd, 0),
        bpf.alu64x(ADD, 2, 1),
        bpf.load(W, 3, 2, 0),
        bpf.alu64(AND, 0, 31),
        bpf.alu32x(RSH, 3, 0),
        bpf.alu32(AND, 3, 1),
        bpf.jmp(bpf.JEQ, 3, 0, "foreign"),
        # Kept: nftables takes the bucket from the mark instead of hashing again.
        bpf.alu32(OR, 9, ruleset.PREFILTER_TAG),
        bpf.store(W, _CTX, 9, bpf.SK_BUFF_MARK),
        bpf.goto("pass"),
        Label("foreign"),
        bpf.store_imm(W, 10, -4, 0),
        bpf.mov64(2, 10),
        bpf.alu64(ADD, 2, -4),
        *bpf.ld_map(1, drops_fd),
        bpf.call(bpf.HELPER_MAP_LOOKUP_ELEM),
        bpf.jmp(bpf.JEQ, 0, 0, "drop"),
        bpf.load(DW, 1, 0, 0),
        bpf.alu64(ADD, 1, 1),
        bpf.store(DW, 0, 1, 0),
        Label("drop"),
        bpf.movi(0, bpf.TC_DROP),
        bpf.exit_(),
        Label("pass"),
        bpf.movi(0, bpf.TC_NEXT),
        bpf.exit_(),
    ]
    return out


def bitmap(buckets: Iterable[int]) -> bytes:
    words = [0] * (BITMAP_BYTES // 4)
    for b in buckets:
        words[b >> 5] |= 1 << (b & 31)
    return struct.pack(f"<{len(words)}I", *words)


def from_bitmap(raw: bytes) -> frozenset[int]:
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    return frozenset(32 * i + j for i, w in enumerate(words) if w for j in range(32) if w >> j & 1)


@dataclass
class Loaded:
    """One farm's prefilter in this kernel: its maps, program and link (file descriptors)."""

    ifindex: int
    kept_fd: int
    drops_fd: int
    prog_fd: int = -1
    link_fd: int = -1

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd, self.kept_fd, self.drops_fd):
            if fd >= 0:
                os.close(fd)
        self.link_fd = self.prog_fd = self.kept_fd = self.drops_fd = -1


_KEY0 = b"\0\0\0\0"


def load(spec: DatapathSpec, kept: frozenset[int], current: Loaded | None) -> Loaded:
    """Attach the prefilter for `spec` with `kept` in its bitmap, or swap the program of
    `current` (its maps kept, its bitmap rewritten). Raises `BpfError` or `Unsupported`; a
    failed first load leaves nothing behind."""
    fresh = current is None
    if current is None:
        ifindex = socket.if_nametoindex(spec.interface)
        kept_fd = bpf.map_create(bpf.MAP_ARRAY, 4, BITMAP_BYTES, 1, "vipfarm_kept")
        try:
            drops_fd = bpf.map_create(bpf.MAP_PERCPU_ARRAY, 4, 8, 1, "vipfarm_drops")
        except BpfError:
            os.close(kept_fd)
            raise
        current = Loaded(ifindex, kept_fd, drops_fd)
    try:
        set_kept(current, kept)
        code = bpf.assemble(program(spec, current.kept_fd, current.drops_fd))
        prog_fd = bpf.prog_load(code, f"vipfarm_{spec.farm}"[:15])
        try:
            if current.link_fd < 0:
                current.link_fd = bpf.link_tcx_ingress(prog_fd, current.ifindex)
            else:
                bpf.link_update(current.link_fd, prog_fd)
        except BpfError:
            os.close(prog_fd)
            raise
    except Exception:  # a refusal, or a program that does not assemble
        if fresh:
            current.close()
        raise
    if current.prog_fd >= 0:
        os.close(current.prog_fd)
    current.prog_fd = prog_fd
    return current


def set_kept(loaded: Loaded, kept: Iterable[int]) -> None:
    bpf.map_update(loaded.kept_fd, _KEY0, bitmap(kept))


def read(loaded: Loaded) -> tuple[frozenset[int], int]:
    """The bitmap and the frames dropped so far (all CPUs), read back from the kernel."""
    kept = from_bitmap(bpf.map_lookup(loaded.kept_fd, _KEY0, BITMAP_BYTES))
    cpus = bpf.possible_cpus()
    raw = bpf.map_lookup(loaded.drops_fd, _KEY0, 8 * cpus)
    return kept, sum(struct.unpack(f"<{cpus}Q", raw))
