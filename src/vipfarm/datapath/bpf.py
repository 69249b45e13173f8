"""Just enough eBPF to load a program vipfarm generates itself: an assembler and the bpf(2) calls.

No compiler, no libbpf, no object file: `vipfarm.datapath.prefilter` writes its program as a
list of `Insn` (the kernel's instruction set, include/uapi/linux/bpf.h, encoded as the kernel
reads it), and this module loads it with the `bpf` system call through ctypes, creates array
maps, attaches it with a tcx link (Linux 6.6 and later; the link belongs to the file
descriptor, so a process that dies takes its program with it) and runs it on test packets
(`BPF_PROG_TEST_RUN`, for the tests). Every failure is an `BpfError` carrying the kernel's
errno text and, for a program the verifier refused, the end of its log.

Labels: a jump's target may be a string, resolved by `assemble` to the offset of the
instruction that `Label` marks.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

# bpf(2) commands (enum bpf_cmd)
_MAP_CREATE = 0
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_PROG_LOAD = 5
_PROG_TEST_RUN = 10
_LINK_CREATE = 28
_LINK_UPDATE = 29

MAP_ARRAY = 2
MAP_PERCPU_ARRAY = 6
PROG_SCHED_CLS = 3
ATTACH_TCX_INGRESS = 46  # enum bpf_attach_type, Linux 6.6

# Return codes of a tc program (TC_ACT_*; tcx reads them the same way).
TC_NEXT = -1  # TC_ACT_UNSPEC: the next program, then the stack, decides
TC_DROP = 2  # TC_ACT_SHOT

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

# Opcode parts
LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
MEM = 0x60
K, X = 0x00, 0x08
ADD, SUB, MUL, OR, AND, LSH, RSH, XOR, MOV, END = (
    0x00,
    0x10,
    0x20,
    0x40,
    0x50,
    0x60,
    0x70,
    0xA0,
    0xB0,
    0xD0,
)
JA, JEQ, JGT, JNE, JLT, CALL, EXIT = 0x00, 0x10, 0x20, 0x50, 0xA0, 0x80, 0x90
TO_BE = 0x08
PSEUDO_MAP_FD = 1
PSEUDO_MAP_VALUE = 2
HELPER_MAP_LOOKUP_ELEM = 1


class BpfError(OSError):
    """A bpf(2) call failed (errno set), or the verifier refused a program (its log attached)."""


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0  # a str: the label to jump to
    imm: int = 0


@dataclass(frozen=True)
class Label:
    name: str


Item = Insn | Label


# ---- instruction helpers (dst, src are register numbers 0-10)


def mov64(dst: int, src: int) -> Insn:
    return Insn(ALU64 | MOV | X, dst, src)


def movi(dst: int, imm: int) -> Insn:
    return Insn(ALU64 | MOV | K, dst, 0, 0, imm)


def alu32(op: int, dst: int, imm: int) -> Insn:
    return Insn(ALU | op | K, dst, 0, 0, imm)


def alu32x(op: int, dst: int, src: int) -> Insn:
    return Insn(ALU | op | X, dst, src)


def alu64(op: int, dst: int, imm: int) -> Insn:
    return Insn(ALU64 | op | K, dst, 0, 0, imm)


def alu64x(op: int, dst: int, src: int) -> Insn:
    return Insn(ALU64 | op | X, dst, src)


def bswap16(dst: int) -> Insn:
    """Network to host order (a little-endian host: the only kind this module runs on)."""
    return Insn(ALU | END | TO_BE, dst, 0, 0, 16)


def load(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(LDX | MEM | size, dst, src, off)


def store(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(STX | MEM | size, dst, src, off)


def store_imm(size: int, dst: int, off: int, imm: int) -> Insn:
    return Insn(ST | MEM | size, dst, 0, off, imm)


def jmp(op: int, dst: int, imm: int, target: str) -> Insn:
    return Insn(JMP | op | K, dst, 0, target, imm)


def jmp32(op: int, dst: int, imm: int, target: str) -> Insn:
    """A jump on the low 32 bits: a 64-bit compare would sign-extend an immediate >= 2**31."""
    return Insn(JMP32 | op | K, dst, 0, target, imm)


def jmpx(op: int, dst: int, src: int, target: str) -> Insn:
    return Insn(JMP | op | X, dst, src, target)


def goto(target: str) -> Insn:
    return Insn(JMP | JA, 0, 0, target)


def call(helper: int) -> Insn:
    return Insn(JMP | CALL, 0, 0, 0, helper)


def exit_() -> Insn:
    return Insn(JMP | EXIT)


def ld_map(dst: int, fd: int, value_offset: int | None = None) -> list[Insn]:
    """A map's address (`value_offset` None) or the address of its first value plus the offset
    (array maps): a 16-byte instruction, two slots."""
    if value_offset is None:
        return [Insn(0x18, dst, PSEUDO_MAP_FD, 0, fd), Insn(0)]
    return [Insn(0x18, dst, PSEUDO_MAP_VALUE, 0, fd), Insn(0, 0, 0, 0, value_offset)]


def assemble(items: list[Item]) -> bytes:
    """The program's bytes, labels resolved (a jump's offset counts from the next slot)."""
    where: dict[str, int] = {}
    n = 0
    for it in items:
        if isinstance(it, Label):
            if it.name in where:
                raise ValueError(f"label {it.name!r} defined twice")
            where[it.name] = n
        else:
            n += 1
    out = bytearray()
    n = 0
    for it in items:
        if isinstance(it, Label):
            continue
        off = it.off
        if isinstance(off, str):
            if off not in where:
                raise ValueError(f"jump to undefined label {off!r}")
            off = where[off] - n - 1
        if not -(2**15) <= off < 2**15:
            raise ValueError(f"jump of {off} slots does not fit an instruction")
        imm = it.imm if it.imm < 2**31 else it.imm - 2**32
        out += struct.pack("<BBhi", it.code, it.dst | it.src << 4, off, imm)
        n += 1
    return bytes(out)


# ---- system calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) is not known on {platform.machine()}")
    return nr


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    rc = int(_libc.syscall(_nr(), cmd, attr, len(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"cannot {what}: {os.strerror(err)}")
    return rc


def _attr(size: int, *fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    for off, fmt, value in fields:
        struct.pack_into(fmt, buf, off, value)
    return buf


def _addr(obj: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(obj)


def map_create(kind: int, key_size: int, value_size: int, entries: int, name: str) -> int:
    attr = _attr(
        72, (0, "<I", kind), (4, "<I", key_size), (8, "<I", value_size), (12, "<I", entries)
    )
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return _bpf(_MAP_CREATE, attr, f"create the BPF map {name}")


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
    attr = _attr(32, (0, "<I", fd), (8, "<Q", _addr(k)), (16, "<Q", _addr(v)))
    _bpf(_MAP_UPDATE_ELEM, attr, "update a BPF map")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    # The kernel writes the map's own value size: slack, should `fd` ever name another map.
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(max(value_size, 1 << 16))
    attr = _attr(32, (0, "<I", fd), (8, "<Q", _addr(k)), (16, "<Q", _addr(v)))
    _bpf(_MAP_LOOKUP_ELEM, attr, "read a BPF map")
    return v.raw[:value_size]


LOG_SIZE = 1 << 20


def prog_load(code: bytes, name: str, kind: int = PROG_SCHED_CLS) -> int:
    """Load a program; a refusal carries the verifier's log (its last lines say why). The log
    is asked for only to explain a refusal: writing it slows every verification."""
    insns = ctypes.create_string_buffer(code)
    lic = ctypes.create_string_buffer(b"GPL")

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _attr(
            128,
            (0, "<I", kind),
            (4, "<I", len(code) // 8),
            (8, "<Q", _addr(insns)),
            (16, "<Q", _addr(lic)),
        )
        if log is not None:
            for off, fmt, value in ((24, "<I", 1), (28, "<I", len(log)), (32, "<Q", _addr(log))):
                struct.pack_into(fmt, attr, off, value)
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        return _bpf(_PROG_LOAD, attr, f"load the BPF program {name}")

    try:
        return attempt(None)
    except BpfError as first:
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            return attempt(log)  # refused again, with the reason this time
        except BpfError as e:
            tail = log.value.decode(errors="replace").strip().splitlines()[-6:]
            raise BpfError(e.errno, f"{e.strerror}; verifier: {' | '.join(tail)}") from first


def link_tcx_ingress(prog_fd: int, ifindex: int) -> int:
    attr = _attr(64, (0, "<I", prog_fd), (4, "<I", ifindex), (8, "<I", ATTACH_TCX_INGRESS))
    return _bpf(_LINK_CREATE, attr, "attach the BPF program at tc ingress (tcx, Linux 6.6+)")


def link_update(link_fd: int, prog_fd: int) -> None:
    attr = _attr(16, (0, "<I", link_fd), (4, "<I", prog_fd))
    _bpf(_LINK_UPDATE, attr, "replace the attached BPF program")


SK_BUFF_SIZE = 192  # struct __sk_buff, Linux 6.x
SK_BUFF_MARK = 8


def test_run(prog_fd: int, packet: bytes) -> tuple[int, int]:
    """The program's verdict on one packet and the mark it left (`BPF_PROG_TEST_RUN`)."""
    data = ctypes.create_string_buffer(packet)
    out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(SK_BUFF_SIZE)
    attr = _attr(
        80,
        (0, "<I", prog_fd),
        (8, "<I", len(packet)),
        (12, "<I", len(out)),
        (16, "<Q", _addr(data)),
        (24, "<Q", _addr(out)),
        (32, "<I", 1),
        (44, "<I", SK_BUFF_SIZE),
        (56, "<Q", _addr(ctx)),
    )
    _bpf(_PROG_TEST_RUN, attr, "test-run the BPF program")
    retval: int = struct.unpack_from("<i", attr, 4)[0]
    mark: int = struct.unpack_from("<I", ctx, SK_BUFF_MARK)[0]
    return retval, mark


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the kernel's possible CPUs)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n
