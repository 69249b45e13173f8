"""The drop decision alone: what one frame of another node's bucket costs, per decision point.

`drop_cost` measures a non-owner in a whole lab, software switch included. This scenario takes
the switch and the application away to see the decision itself: two namespaces joined by a
veth pair. The receiver holds vipfarm's ruleset for one VIP and owns no bucket; the sender, a
Python process pinned to one CPU, writes a fixed count of frames to the VMAC with `sendmmsg` on
a packet socket (64 a call, 1,024 client ports, checksums right), either pure SYNs or
established-looking ACKs. The receiving side runs in the sender's own softirq (a veth delivers
on the CPU that sends), so the sender's CPU time per frame is the whole path: its system call,
the veth, the receiver's stack and the decision. Variants, in turn within each round:

* `floor`: no vipfarm at all; the stack drops the frame (`PACKET_OTHERHOST`) in IP input;
* `prefilter`: the default data path, the BPF prefilter attached (by a helper process in the
  receiver's namespace, which holds its link);
* `nft`: the nftables netdev ingress decision alone;
* `prerouting`: the decision after conntrack, as before issue 14.

Each decision's figure is its time per frame minus the floor's, in the same round: what the
decision adds to a frame that has arrived. Medians over rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from vipfarm.bench.framework import (
    BenchError,
    Context,
    Scenario,
    ScenarioResult,
    Settings,
    register,
)
from vipfarm.datapath import ruleset
from vipfarm.datapath.spec import DatapathSpec, DecisionPoint, Rule
from vipfarm.lab import testbed

SENDER_IP, RECEIVER_IP, VIP = "198.51.100.1", "198.51.100.2", "198.51.100.100"
KINDS = ("syn", "established")
VARIANTS = ("floor", "prefilter", "nft", "prerouting")

SEND = r"""
import ctypes, json, os, socket, struct, sys, time
from vipfarm.datapath.packet import inet_checksum as csum
ifname, dst, src, vip, count, syn = sys.argv[1:7]
count, syn = int(count), syn == "1"
os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

def frame(sport):
    flags = 0x02 if syn else 0x10
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0 if syn else 1, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(vip) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(vip))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return bytes.fromhex(dst.replace(":", "")) + b"\x02\0\0\0\0\x99\x08\x00" + ip + tcp

class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

class Hdr(ctypes.Structure):  # struct msghdr
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(Iov)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]

class Msg(ctypes.Structure):  # struct mmsghdr
    _fields_ = [("hdr", Hdr), ("len", ctypes.c_uint32)]

BATCH, BATCHES = 64, 16
libc = ctypes.CDLL(None, use_errno=True)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
sock.bind((ifname, 0))
keep, batches = [], []
for b in range(BATCHES):
    iovs, msgs = (Iov * BATCH)(), (Msg * BATCH)()
    for i in range(BATCH):
        buf = ctypes.create_string_buffer(frame(20000 + b * BATCH + i), 60)
        keep.append(buf)
        iovs[i].base, iovs[i].len = ctypes.addressof(buf), 60
        msgs[i].hdr.iov, msgs[i].hdr.iovlen = ctypes.pointer(iovs[i]), 1
    keep.append(iovs)
    batches.append(msgs)
fd, sent, n = sock.fileno(), 0, 0
t0, c0 = time.monotonic(), time.thread_time()
while sent < count:
    k = libc.sendmmsg(fd, batches[n % BATCHES], BATCH, 0)
    if k <= 0:
        raise OSError(ctypes.get_errno(), "sendmmsg")
    sent, n = sent + k, n + 1
cpu, wall = time.thread_time() - c0, time.monotonic() - t0
print(json.dumps({"cpu_ns": cpu / sent * 1e9, "wall_ns": wall / sent * 1e9, "calls": n}))
"""

HOLD = r"""
import sys
from vipfarm.datapath import prefilter
from vipfarm.datapath.spec import DatapathSpec
loaded = prefilter.load(DatapathSpec.model_validate_json(sys.argv[1]), frozenset(), None)
print("attached", flush=True)
sys.stdin.read()  # until the bench closes it
loaded.close()
"""


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])} failed: {proc.stderr.strip()[-500:]}")
    return proc


class Pair:
    """Two namespaces joined by a veth: `<name>-s` sends, `<name>-r` receives."""

    def __init__(self, name: str) -> None:
        self.sender, self.receiver = f"{name}-s", f"{name}-r"

    def up(self) -> None:
        s, r = self.sender, self.receiver
        for ns in (s, r):
            _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", s, "link", "add", "vs", "type", "veth", "peer", "name", "vr", "netns", r])
        for ns, dev, addr in ((s, "vs", SENDER_IP), (r, "vr", RECEIVER_IP)):
            _run(
                ["ip", "-n", ns, "-batch", "-"],
                input=f"addr add {addr}/24 dev {dev}\nlink set {dev} up\n",
            )

    def down(self) -> None:
        for ns in (self.sender, self.receiver):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def nft(self, batch: list[dict[str, Any]]) -> None:
        _run(
            ["ip", "netns", "exec", self.receiver, "nft", "-j", "-f", "-"],
            input=json.dumps({"nftables": batch}),
        )

    def send(self, vmac: str, count: int, syn: bool) -> dict[str, float]:
        argv = [sys.executable, "-c", SEND, "vs", vmac, SENDER_IP, VIP, str(count), str(int(syn))]
        out = _run(["ip", "netns", "exec", self.sender, *argv]).stdout
        result: dict[str, float] = json.loads(out)
        return result


class Unavailable(Exception):
    """This kernel cannot run the prefilter: the scenario goes on without that variant."""


@contextmanager
def _prefilter_held(pair: Pair, spec: DatapathSpec) -> Iterator[None]:
    argv = [sys.executable, "-c", HOLD, spec.model_dump_json()]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pair.receiver, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if line.strip() != "attached":
            why = (line + proc.stderr.read()).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(why[0])
        yield
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spec_of(spec: DatapathSpec, variant: str) -> DatapathSpec:
    """The data path each variant runs: the prefilter's, nftables alone, or prerouting."""
    if variant == "prefilter":
        return spec
    point = DecisionPoint.PREROUTING if variant == "prerouting" else DecisionPoint.INGRESS
    return spec.model_copy(update={"decide_at": point, "prefilter": False})


def _count(settings: Settings) -> int:
    return 50_000 if settings.quick else 400_000


def _drop_decision(ctx: Context) -> ScenarioResult:
    pair = Pair(testbed.unique_name("vd"))
    spec = DatapathSpec(farm="bench", interface="vr", rules=[Rule(vip=VIP, port=80)])
    vmac = spec.vmac(spec.vips[0])
    per: dict[tuple[str, str], list[float]] = {}
    count = _count(ctx.settings)
    unavailable: str | None = None
    try:
        pair.up()
        for r in range(ctx.settings.rounds):
            turn = r % len(VARIANTS)
            for variant in VARIANTS[turn:] + VARIANTS[:turn]:
                ctx.status(f"drop_decision: round {r + 1}/{ctx.settings.rounds} {variant}")
                pair.nft(ruleset.remove_batch(spec.farm))
                if variant != "floor":
                    pair.nft(ruleset.ruleset_batch(_spec_of(spec, variant), fresh=True))
                held = _prefilter_held(pair, spec) if variant == "prefilter" else nullcontext()
                try:
                    with held:
                        for kind in KINDS:
                            got = pair.send(vmac, count, syn=kind == "syn")
                            per.setdefault((variant, kind), []).append(got["cpu_ns"])
                except Unavailable as e:
                    unavailable = str(e)
                ctx.advance()
    finally:
        pair.down()
    figures: dict[str, Any] = {}
    for kind in KINDS:
        floor = per[("floor", kind)]
        figures[f"decision_floor_ns_{kind}"] = round(statistics.median(floor), 1)
        for variant in VARIANTS[1:]:
            if (variant, kind) not in per:
                continue
            extra = [v - f for v, f in zip(per[(variant, kind)], floor, strict=True)]
            figures[f"decision_ns_{variant}_{kind}"] = round(statistics.median(extra), 1)
    notes: dict[str, Any] = {"frames_per_run": count, "prefilter_unavailable": unavailable}
    notes |= {f"{v}_{k}_ns_all": [round(x, 1) for x in xs] for (v, k), xs in per.items()}
    return ScenarioResult(figures=figures, notes=notes)


def _produces() -> dict[str, str]:
    what = {
        "prefilter": "the BPF prefilter (the default)",
        "nft": "the nftables netdev ingress decision alone",
        "prerouting": "the decision after conntrack (before issue 14)",
    }
    frames = {"syn": "pure SYNs", "established": "established-looking ACKs"}
    out: dict[str, str] = {}
    for kind, frame in frames.items():
        out[f"decision_floor_ns_{kind}"] = (
            f"ns per frame with no vipfarm at all ({frame}): sender, veth and the stack's own drop"
        )
        for variant, text in what.items():
            out[f"decision_ns_{variant}_{kind}"] = (
                f"ns a dropped frame ({frame}) costs above that floor, {text}"
            )
    return out


DROP_DECISION = register(
    Scenario(
        name="drop_decision",
        title="The drop decision alone, per decision point",
        produces=_produces(),
        method=__doc__ or "",
        steps=lambda s: s.rounds * len(VARIANTS),
        run=_drop_decision,
    )
)
