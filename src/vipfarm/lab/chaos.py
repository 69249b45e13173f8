"""`vipfarm chaos`: a steady load on a farm of daemons while random faults hit it.

Theory of operation
-------------------
A lab of node daemons is built; three threads then run until the duration is over:

* **load**: batches of new HTTP connections from a client, each with its own pinned source port,
  never reused within a run (ports 20000..59999; the run stops adding load when they are used
  up). Every reply is kept with its start time.
* **sampler**: reads every node's owned buckets from its kernel, over and over, to find the
  longest time a bucket had no owner at all (an upper bound: samples are ~20-50 ms apart).
* **faults** (this thread): picks faults with a seeded RNG, injects them, measures how long the
  farm takes to converge (every bucket held exactly once by the nodes that should hold it, every
  such node UP), repairs the fault, measures convergence again, pauses, repeats.

**Accepted twice** is measured exactly, not sampled, where the harm shows: at the client. An
extra nftables table in the client's namespace (`inet vfchaos`) adds the (Ethernet source, client
port) of every SYN-ACK from the VIP to a dynamic set; nodes answer from their own MACs, so a client
port answered by two MACs is a connection attempt two nodes accepted and answered (the second
answer ends in a reset). Source ports are unique within a run, so a legitimate second connection
can never look like one. Each node also records, in its own namespace, the (client, port) of every
SYN its vipfarm chain let through (`syn_accepted_by_two` counts pairs found on two nodes): that
also counts a SYN taken by a node that could no longer answer (its cable was just pulled, so the
client retried and another node answered), which is harmless, hence the client-side figure is
the one that must be zero.

Three faults come from an **attacker** on the LAN and heartbeat network 2 that knows neither the
farm key nor the API token (`vipfarm.lab.attacker`): `hb_forge` replays heartbeats captured from
a node (this run's and those recorded before earlier faults, older incarnations included) and
sends forged ones, all from that node's own address; `hb_flood` sends random datagrams, half with
a heartbeat's header, from the attacker's and the nodes' addresses to every node on both
networks; `api_flood` holds 300 idle or half-sent connections to a node's API. None of them may
cost a failover or a bucket.

Two faults load the machine or the network instead of breaking anything: `cpu_hog` runs one
busy process per CPU in one node's namespace (`cpu_hog_all`: in every node's at once) for the
hold time, ended by PID; `heartbeat_delay` delays every frame on one node's port of heartbeat
network 2 by 40 ms plus up to 80 ms of jitter (so they are also reordered), both ways. This
kernel has no `sch_netem` (tc netem is the usual tool; nftables cannot delay), so the delay is
a forwarder (`vipfarm.lab.delay`) that the node's switch port is moved behind for the hold
time. `--loss` adds heartbeat loss on every node for the whole run (each heartbeat received is
dropped with that probability, in a chain of its own that the faults never flush). None of
these may cost a failover. `FAULT_HELP` says what every kind does; `vipfarm chaos --help` shows
it.

**False failovers** are `peer_down` events in the nodes' logs for a peer that was not down: not
killed, not isolated, not within its fault's window; each fault's result counts those that
fell between its start and the next fault's.

**A node the farm takes out by design.** Three application crashes within the lab's restart
window (`restart.max = 2` per 60 s) use up the node's restart policy: its daemon leaves the
farm (drains to STOP) and stays out, as in production, until an operator starts it again. Chaos
notices (a node not UP whose log says `leaving_farm`), records it in the fault's result
(`left_farm`), waits for the node to reach STOP, starts it as an operator would (`vipfarm
start`, the control socket's `start`), and measures the recovery from that start, so later
faults converge and recover as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from vipfarm.lab import attacker, testbed
from vipfarm.lab.farm import DEFAULT_DELIVERY
from vipfarm.lab.load import Reply
from vipfarm.lab.procs import ProcRecord, terminate
from vipfarm.lab.testbed import API_PORT, Lab
from vipfarm.lab.topology import (
    BUCKETS,
    VIP4,
    extra_hb4,
    extra_lan4,
    node_hb,
    node_index,
    node_lan4,
)
from vipfarm.membership.wire import MAGIC, VERSION, farm_id

# Every fault kind and what it does (`vipfarm chaos --help` prints this table).
FAULT_HELP = {
    "kill9": "kill -9 of every process of a node; started again after the hold time",
    "daemon_crash": "kill -9 of a node's daemon only (its application keeps running)",
    "app_crash": "kill -9 of a node's application; its supervisor restarts it",
    "link_flap": "a node's LAN and heartbeat links down for the hold time",
    "hb_loss": "half of a node's heartbeats lost, both ways, on every network",
    "hb_partition": "heartbeat network 2 cut off at a node",
    "rolling_restart": "every node in turn: vipfarm stop, then vipfarm start",
    "hb_forge": "an attacker replays and forges a peer's heartbeats to a node",
    "hb_flood": "an attacker floods every node's heartbeat port with random datagrams",
    "api_flood": "an attacker holds 300 idle or half-sent connections to a node's API",
    "cpu_hog": "one busy process per CPU in a node's namespace for the hold time",
    "cpu_hog_all": "one busy process per CPU in every node's namespace at once",
    "heartbeat_delay": "40-120 ms delay with jitter on a node's heartbeat network 2, both ways",
}
FAULTS = tuple(FAULT_HELP)
# Faults after which a node is really gone for a while: a peer_down for it is expected.
NODE_DOWN_FAULTS = {"kill9", "daemon_crash", "link_flap"}
PORT_FIRST, PORT_LAST = 20000, 59999
BATCH = 40
CONVERGE_TIMEOUT_S = 20.0
HB_PORT = 9001  # the lab's heartbeat port (vipfarm.lab.farm)
ATTACKER = 9  # the attacker is extra host 9, on the LAN and heartbeat network 2
FLOOD_PER_NETWORK = 1000
API_FLOOD_CONNECTIONS = 300
HB_DELAY_MS, HB_JITTER_MS = 40.0, 80.0  # heartbeat_delay: each frame 40 ms + U(0, 80 ms) late
STOP_TIMEOUT_S = 45.0  # a node that left the farm drains to STOP within the lab's 30 s drain
# A busy loop bounded in time (the fault ends it earlier by PID).
HOG = """import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""

CLIENT_TABLE = f"""
table inet vfchaos {{
  set synacks {{ type ether_addr . inet_service; size 65535; flags dynamic,timeout; timeout 1h; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr {VIP4} tcp flags & (syn | ack) == syn | ack add @synacks {{ ether saddr . tcp dport }}
  }}
}}
"""

CHAOS_TABLE = f"""
table inet vfchaos {{
  set accepted {{ type ipv4_addr . inet_service; size 65535; flags dynamic,timeout; timeout 1h; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip daddr {VIP4} tcp flags & (syn | ack) == syn add @accepted {{ ip saddr . tcp sport }}
  }}
  chain hb_in {{
    type filter hook prerouting priority -300; policy accept;
  }}
  chain hb_out {{
    type filter hook output priority -300; policy accept;
  }}
  chain hb_background {{
    type filter hook prerouting priority -301; policy accept;
  }}
}}
"""


@dataclass
class FaultResult:
    kind: str
    node: str
    started_s: float  # seconds after the run began
    converge_ms: float | None  # from injection to the farm settled without the node
    recover_ms: float | None  # from repair to the farm settled with every node again
    requests: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    false_failovers: int = 0  # unexplained peer_down lines between this fault and the next
    # Nodes the farm took out by design during the fault (restart policy used up): chaos
    # started them again, and recover_ms is then measured from that start.
    left_farm: list[str] = field(default_factory=list)


@dataclass
class ChaosReport:
    name: str
    seed: int
    duration_s: float
    nodes: int
    loss: float = 0.0  # background heartbeat loss on every node
    requests: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    accepted_twice: int = 0
    syn_accepted_by_two: int = 0
    max_unowned_ms: float = 0.0
    false_failovers: int = 0
    false_failover_events: list[str] = field(default_factory=list)
    faults: list[FaultResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class Chaos:
    def __init__(
        self, lab: Lab, seed: int, duration_s: float, client: str = "client1", loss: float = 0.0
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"heartbeat loss {loss} is out of range: use a probability in [0, 1)")
        self.lab = lab
        self.loss = loss
        self.rng = random.Random(seed)
        self.seed = seed
        self.duration_s = duration_s
        self.client = client
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._port = PORT_FIRST
        self._unowned_since: dict[int, float] = {}
        self.max_unowned_s = 0.0
        # (node, wall-clock start, wall-clock end) of windows where the node was really gone:
        # peers' peer_down for it is expected, and so is its own for every peer (when it was
        # isolated it could hear nobody)
        self.expected_down: list[tuple[str, float, float]] = []
        self.on_progress: Callable[[str], None] = lambda _msg: None
        # heartbeats captured by hb_forge, by (sender, network address), replayed by later ones
        self.recorded: dict[tuple[str, str], list[bytes]] = {}
        self.attacker_ns: str | None = None
        # Nodes that left the farm by design (restart policy used up) since the last check,
        # and how far each node's module log has been read for that.
        self._left: set[str] = set()
        self._log_seen: dict[str, int] = {}
        for node in lab.node_names:
            with contextlib.suppress(OSError):
                self._log_seen[node] = (lab.dir / "nodelogs" / node / "module.log").stat().st_size

    # ------------------------------------------------------------------ setup
    def install_probes(self) -> None:
        table = CHAOS_TABLE
        if self.loss:
            # Per mille: numgen draws 0..999 for every heartbeat received.
            permille = round(self.loss * 1000)
            table += (
                "add rule inet vfchaos hb_background "
                f"udp dport {HB_PORT} numgen random mod 1000 < {permille} drop\n"
            )
        for node in self.lab.node_names:
            self.lab.exec(node, ["nft", "-f", "-"], input=table, check=True)
        self.lab.exec(self.client, ["nft", "-f", "-"], input=CLIENT_TABLE, check=True)

    def _attacker(self) -> str:
        if self.attacker_ns is None:
            self.attacker_ns = self.lab.add_host(ATTACKER, heartbeat=True)
        return self.attacker_ns

    def _pairs(self, who: str, set_name: str) -> list[tuple[str, int]]:
        out = self.lab.exec(
            who, ["nft", "-j", "list", "set", "inet", "vfchaos", set_name], check=True
        ).stdout
        pairs = []
        for obj in json.loads(out)["nftables"]:
            for e in obj.get("set", {}).get("elem", []):
                val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                first, port = val["concat"]
                pairs.append((str(first), int(port)))
        return pairs

    def accepted_twice(self) -> int:
        """Client ports that SYN-ACKs from two different nodes answered."""
        macs = Counter(port for _mac, port in self._pairs(self.client, "synacks"))
        return sum(1 for n in macs.values() if n > 1)

    def syn_accepted_by_two(self) -> int:
        """(client, port) pairs whose SYN two nodes' vipfarm chains let through."""
        seen: Counter[tuple[str, int]] = Counter()
        for node in self.lab.node_names:
            seen.update(set(self._pairs(node, "accepted")))
        return sum(1 for n in seen.values() if n > 1)

    # ------------------------------------------------------------------ threads
    def _load(self) -> None:
        while not self._stop.is_set() and self._port + BATCH <= PORT_LAST:
            start = time.monotonic() - self.t0
            port, self._port = self._port, self._port + BATCH
            got = self.lab.load(
                self.client, count=BATCH, concurrency=20, timeout=3.0, source_port=port
            )
            for r in got:
                r.t += start
            with self._lock:
                self.replies.extend(got)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            owned = self.lab.kernel_owned()
            held = {b for buckets in owned.values() for b in buckets or []}
            for b in range(BUCKETS):
                if b in held:
                    since = self._unowned_since.pop(b, None)
                    if since is not None:
                        self.max_unowned_s = max(self.max_unowned_s, now - since)
                else:
                    self._unowned_since.setdefault(b, now)
            time.sleep(0.03)  # the farm shares the machine's two cores with this

    # ------------------------------------------------------------------ convergence
    def _settled(self, nodes: list[str]) -> bool:
        """Every node of `nodes` UP and their kernels holding every bucket once. Notes nodes
        whose restart policy is used up (they are leaving the farm: see `_bring_back`)."""
        states = {}
        for n in nodes:
            try:
                states[n] = self.lab.daemon_state(n, timeout=2)
            except Exception:
                return False
        for n, st in states.items():
            # `exhausted` lasts only until the drain ends (then the app is `stopped` and the
            # node STOP), so the node's own log says why it is out.
            if (st["state"] != "UP" or st.get("app") == "exhausted") and self._logged_leaving(n):
                self._left.add(n)
        if any(st["state"] != "UP" for st in states.values()):
            return False
        return self.lab.holds_every_bucket_once(nodes)

    def _logged_leaving(self, node: str) -> bool:
        """Whether `node`'s module log has a `leaving_farm` line (its daemon left the farm by
        itself: restart policy used up) that was not looked at yet."""
        path = self.lab.dir / "nodelogs" / node / "module.log"
        try:
            with path.open("rb") as f:
                f.seek(self._log_seen.get(node, 0))
                data = f.read()
        except OSError:
            return False
        end = data.rfind(b"\n") + 1  # whole lines only
        self._log_seen[node] = self._log_seen.get(node, 0) + end
        return b" leaving_farm " in data[:end]

    def _converge(self, nodes: list[str]) -> float | None:
        """ms until `nodes` have settled; None after CONVERGE_TIMEOUT_S, or at once when one of
        them has left the farm by design (it will not come back on its own)."""
        t = time.monotonic()
        while time.monotonic() - t < CONVERGE_TIMEOUT_S:
            if self._settled(nodes):
                return round((time.monotonic() - t) * 1000, 1)
            if self._left & set(nodes):
                return None
            time.sleep(0.02)
        return None

    def _bring_back(self) -> tuple[list[str], float | None]:
        """Start again, as an operator would (`vipfarm start`), every node that left the farm
        by design since the last check (restart policy used up), once it has drained to STOP;
        then ms from the first start until the whole farm has settled (None if it did not)."""
        left = sorted(self._left)
        self._left.clear()
        if not left:
            return [], None
        for node in left:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if self.lab.daemon_state(node)["state"] == "STOP":
                        break
                time.sleep(0.05)
        t = time.monotonic()
        for node in left:
            with contextlib.suppress(Exception):
                self.lab.daemon_call(node, "start")
        done = self._converge(self.lab.node_names)
        return left, None if done is None else round((time.monotonic() - t) * 1000, 1)

    # ------------------------------------------------------------------ faults
    def _hb_rules(self, node: str, rule_in: str | None = None, rule_out: str | None = None) -> None:
        """Replace the node's heartbeat fault rules (incoming, outgoing); none: no fault."""
        cmd = "flush chain inet vfchaos hb_in\nflush chain inet vfchaos hb_out\n"
        if rule_in:
            cmd += f"add rule inet vfchaos hb_in {rule_in}\n"
        if rule_out:
            cmd += f"add rule inet vfchaos hb_out {rule_out}\n"
        self.lab.exec(node, ["nft", "-f", "-"], input=cmd, check=True)

    def _links(self, node: str, up: bool) -> None:
        for ifname in ("eth1", "eth0"):
            self.lab.exec(node, ["ip", "link", "set", ifname, "up" if up else "down"], check=True)
        if up:
            self.lab.exec(
                node, ["ip", "route", "replace", "default", "via", "198.51.100.1"], check=True
            )

    def _until_app_not_healthy(self, node: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.lab.daemon_state(node, timeout=2).get("app") != "healthy":
                    return
            time.sleep(0.02)

    def _hog(self, nodes: list[str], hold_s: float) -> None:
        """One busy process per CPU in each of `nodes`' namespaces for `hold_s`, ended by PID
        (each one also stops by itself a little later, should chaos itself die)."""
        recs: list[ProcRecord] = []
        try:
            for node in nodes:
                for c in range(os.cpu_count() or 1):
                    argv = [sys.executable, "-c", HOG, f"{hold_s + 5:g}"]
                    recs.append(self.lab.spawn(f"{node}-hog{c}", node, argv))
            time.sleep(hold_s)
        finally:
            terminate([(r.pid, r.start) for r in recs], grace_s=1.0)

    def _delay_ports(self, node: str) -> tuple[str, str, str]:
        """(the node's port on heartbeat network 2, the forwarder's veth end, its bridge end)."""
        i = node_index(node)
        return f"n{i}h", f"d{i}h", f"d{i}b"

    def delay_heartbeats(self, node: str, seconds: float) -> ProcRecord:
        """Move `node`'s port on heartbeat network 2 behind a delaying forwarder
        (`vipfarm.lab.delay`, at most `seconds`); `undelay_heartbeats` puts it back."""
        port, fwd, plug = self._delay_ports(node)
        self.lab.ip_batch(
            "switch",
            [
                f"link add {plug} type veth peer name {fwd}",
                f"link set {plug} master br1 up",
                f"link set {fwd} promisc on up",
            ],
        )
        argv = [sys.executable, "-m", "vipfarm.lab.delay", port, fwd]
        argv += ["--delay-ms", f"{HB_DELAY_MS:g}", "--jitter-ms", f"{HB_JITTER_MS:g}"]
        argv += ["--seconds", f"{seconds:g}", "--seed", str(self.rng.randrange(2**31))]
        rec = self.lab.spawn(f"{node}-hbdelay", "switch", argv)
        log = Path(rec.log)
        deadline = time.monotonic() + 10.0
        while "delay_ready" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                self.undelay_heartbeats(node, rec)
                raise RuntimeError(f"the delaying forwarder of {node} did not start: {log}")
            time.sleep(0.02)
        # Only now off the bridge: the forwarder already listens on both ends.
        self.lab.ip_batch("switch", [f"link set {port} nomaster", f"link set {port} promisc on"])
        return rec

    def undelay_heartbeats(self, node: str, rec: ProcRecord) -> None:
        port, _fwd, plug = self._delay_ports(node)
        self.lab.ip_batch("switch", [f"link set {port} promisc off master br1"], check=False)
        terminate([(rec.pid, rec.start)], grace_s=2.0)
        self.lab.ip_batch("switch", [f"link del {plug}"], check=False)

    def inject(self, kind: str, node: str) -> FaultResult:
        names = self.lab.node_names
        others = [n for n in names if n != node]
        started = time.monotonic() - self.t0
        wall = time.time()
        converge = recover = None
        hold_s = self.rng.uniform(1.0, 3.0)
        if kind == "kill9":
            self.lab.kill(node)
            converge, recover = self._away(others, hold_s, lambda: self._restart(node))
        elif kind == "daemon_crash":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.lab.daemon_record(node).pid, signal.SIGKILL)
            converge, recover = self._away(others, hold_s, lambda: self._restart(node))
        elif kind == "app_crash":
            pid = self.lab.app_pid(node)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                # Measure from the moment the supervisor noticed: before it, the farm still
                # looks settled with the dead application.
                self._until_app_not_healthy(node)
            recover = self._converge(names)
        elif kind == "link_flap":
            self._links(node, up=False)
            converge, recover = self._away(others, hold_s, lambda: self._links(node, up=True))
        elif kind == "hb_loss":  # half of the node's heartbeats lost, both ways, every network
            lossy = "udp dport 9001 numgen random mod 100 < 50 drop"
            self._hb_rules(node, lossy, lossy)
            time.sleep(hold_s)
            self._hb_rules(node)
            recover = self._converge(names)
        elif kind == "hb_partition":  # heartbeat network 2 cut off at this node
            self._hb_rules(
                node, 'iifname "eth1" udp dport 9001 drop', 'oifname "eth1" udp dport 9001 drop'
            )
            time.sleep(hold_s)
            self._hb_rules(node)
            recover = self._converge(names)
        elif kind == "rolling_restart":
            t = time.monotonic()
            for n in names:
                self.lab.daemon_call(n, "stop")
                deadline = time.monotonic() + CONVERGE_TIMEOUT_S
                while time.monotonic() < deadline:
                    with contextlib.suppress(Exception):
                        if self.lab.daemon_state(n)["state"] == "STOP":
                            break
                    time.sleep(0.05)
                self.lab.daemon_call(n, "start")
                if self._converge(names) is None:
                    break
            recover = round((time.monotonic() - t) * 1000, 1)
        elif kind == "hb_forge":
            self._forge(node, others, hold_s)
            recover = self._converge(names)
        elif kind == "hb_flood":
            self._flood(hold_s)
            recover = self._converge(names)
        elif kind in ("cpu_hog", "cpu_hog_all"):
            self._hog([node] if kind == "cpu_hog" else names, hold_s)
            recover = self._converge(names)
        elif kind == "heartbeat_delay":
            rec = self.delay_heartbeats(node, hold_s + 30)
            try:
                time.sleep(hold_s)
            finally:
                self.undelay_heartbeats(node, rec)
            recover = self._converge(names)
        elif kind == "api_flood":
            attacker.hold_api(
                self._attacker(),
                str(node_lan4(node_index(node))),
                API_PORT,
                API_FLOOD_CONNECTIONS,
                hold_s,
            )
            recover = self._converge(names)
        else:
            raise ValueError(f"unknown fault {kind!r}: choose from {', '.join(FAULTS)}")
        if kind in NODE_DOWN_FAULTS:
            self.expected_down.append((node, wall, time.time() + 1.0))
        result = FaultResult(kind, node, round(started, 3), converge, recover)
        # A node the farm took out by design (its restart policy used up) stays out until an
        # operator starts it: do that, and measure the recovery from there.
        left, recovered = self._bring_back()
        if left:
            result.left_farm = left
            result.recover_ms = recovered
        return result

    def _forge(self, node: str, others: list[str], hold_s: float) -> None:
        """Replay a peer's heartbeats to `node` and forge some, all from the peer's address."""
        if not others:
            return
        peer = self.rng.choice(others)
        i, p = node_index(node), node_index(peer)
        nets = [(str(node_lan4(p)), str(node_lan4(i))), (str(node_hb(p)), str(node_hb(i)))]
        for src, _dst in nets:
            got = attacker.capture(self.lab.ns(node), src, HB_PORT, seconds=0.5, limit=20)
            self.recorded.setdefault((peer, src), []).extend(got)
            del self.recorded[(peer, src)][:-60]  # the newest 60, older incarnations included
        datagrams = []
        for src, dst in nets:
            for payload in self.recorded.get((peer, src), []):
                datagrams.append((src, dst, payload))
                forged = bytearray(payload)
                forged[-1 - self.rng.randrange(min(len(forged), 32))] ^= 0xFF  # a bad tag
                datagrams.append((src, dst, bytes(forged)))
        self.rng.shuffle(datagrams)
        if datagrams:
            attacker.send_udp(
                self._attacker(),
                datagrams,
                HB_PORT,
                gap_s=hold_s / len(datagrams),
                deadline_s=hold_s + 2,
            )

    def _flood(self, hold_s: float) -> None:
        """Random datagrams to every node on both heartbeat networks."""
        header = MAGIC + bytes([VERSION, 0]) + farm_id(self.lab.name)
        count = len(self.lab.node_names)
        for own, addr in ((extra_lan4, node_lan4), (extra_hb4, node_hb)):
            nodes = [str(addr(i)) for i in range(1, count + 1)]
            datagrams = attacker.random_datagrams(
                self.rng,
                [str(own(ATTACKER)), *nodes],
                nodes,
                FLOOD_PER_NETWORK,
                max_size=9000,
                prefix=header,
            )
            attacker.send_udp(self._attacker(), datagrams, HB_PORT, deadline_s=hold_s + 2)

    def _restart(self, node: str) -> None:
        self.lab.start_daemon(node, wait=False)

    def _away(
        self, others: list[str], hold_s: float, repair: Callable[[], None]
    ) -> tuple[float | None, float | None]:
        """A node was just taken away: ms until the others settle without it, then, after
        `hold_s`, ms from `repair()` until the whole farm has settled again."""
        converge = self._converge(others)
        time.sleep(hold_s)
        t = time.monotonic()
        repair()
        done = self._converge(self.lab.node_names)
        return converge, None if done is None else round((time.monotonic() - t) * 1000, 1)

    # ------------------------------------------------------------------ the run
    def run(self, faults: tuple[str, ...] = FAULTS) -> ChaosReport:
        self.install_probes()
        threads = [
            threading.Thread(target=self._load, name="chaos-load", daemon=True),
            threading.Thread(target=self._sample, name="chaos-sampler", daemon=True),
        ]
        for th in threads:
            th.start()
        results: list[FaultResult] = []
        try:
            time.sleep(1.0)  # a baseline before the first fault
            while time.monotonic() - self.t0 < self.duration_s:
                kind = self.rng.choice(faults)
                node = self.rng.choice(self.lab.node_names)
                self.on_progress(f"{kind} on {node}")
                res = self.inject(kind, node)
                results.append(res)
                self.on_progress(
                    f"{kind} on {node}: converged {res.converge_ms} ms, "
                    f"recovered {res.recover_ms} ms"
                )
                time.sleep(self.rng.uniform(0.5, 1.5))
        finally:
            self._stop.set()
            for th in threads:
                th.join(timeout=60)
        return self._report(results)

    def _report(self, results: list[FaultResult]) -> ChaosReport:
        with self._lock:
            replies = list(self.replies)
        bounds = [r.started_s for r in results] + [time.monotonic() - self.t0]
        false = self._false_failovers()
        for i, res in enumerate(results):
            window = [r for r in replies if bounds[i] <= r.t < bounds[i + 1]]
            res.requests = len(window)
            res.failed = dict(Counter(r.error for r in window if r.error))
            lo, hi = self.wall0 + bounds[i], self.wall0 + bounds[i + 1]
            res.false_failovers = sum(1 for stamp, _ in false if lo <= stamp < hi)
        return ChaosReport(
            name=self.lab.name,
            seed=self.seed,
            duration_s=round(time.monotonic() - self.t0, 1),
            nodes=len(self.lab.node_names),
            loss=self.loss,
            requests=len(replies),
            failed=dict(Counter(r.error for r in replies if r.error)),
            accepted_twice=self.accepted_twice(),
            syn_accepted_by_two=self.syn_accepted_by_two(),
            max_unowned_ms=round(self.max_unowned_s * 1000, 1),
            false_failovers=len(false),
            false_failover_events=[line for _, line in false],
            faults=results,
        )

    def false_failovers(self) -> list[str]:
        """`peer_down` log lines no fault explains, as `node: line`."""
        return [line for _, line in self._false_failovers()]

    def _false_failovers(self) -> list[tuple[float, str]]:
        """(wall-clock time, `node: line`) of every `peer_down` log line no fault explains."""
        found: list[tuple[float, str]] = []
        for node in self.lab.node_names:
            path = self.lab.dir / "nodelogs" / node / "module.log"
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if " peer_down " not in line:
                        continue
                    peer = line.split("peer=", 1)[1].split()[0]
                    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if stamp < self.wall0:
                        continue
                    expected = any(
                        gone in (peer, node) and start <= stamp <= end
                        for gone, start, end in self.expected_down
                    )
                    if not expected:
                        found.append((stamp, f"{node}: {line}"))
        return sorted(found)


def run_chaos(
    duration_s: float,
    seed: int,
    nodes: int = 3,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    faults: tuple[str, ...] = FAULTS,
    no_flood: bool = False,
    delivery: str = DEFAULT_DELIVERY,
    loss: float = 0.0,
) -> ChaosReport:
    """Build a lab of daemons, run the chaos on it, always tear it down. `no_flood` and
    `delivery`: a switch that floods no unknown unicast and the farm's delivery (issue 15)."""
    lab_name = name or testbed.unique_name("vc")
    lab = testbed.up(
        lab_name,
        nodes=nodes,
        clients=1,
        app="builtin",
        daemon=True,
        no_flood=no_flood,
        delivery=delivery,
    )
    try:
        chaos = Chaos(lab, seed, duration_s, loss=loss)
        if progress is not None:
            chaos.on_progress = progress
        return chaos.run(faults)
    finally:
        testbed.down(lab_name)


def write_report(report: ChaosReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json() + "\n")
