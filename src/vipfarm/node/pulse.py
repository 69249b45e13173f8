"""The pulse: the process of a node that nothing of the management plane can stall.

Theory of operation
-------------------
The pulse owns what must run on time: the heartbeat sockets, the membership core (through the
shared `vipfarm.membership.driver.Driver`, the same code path the simulator runs), the kernel
data path (nftables ruleset, bucket leases, VIP addresses, ARP/NDP responders) and the lease
renewals. Nothing else runs on its loop: the API, the console, deployments, checkers and log
streams live in the manager process (`vipfarm.node.manager`), which talks to the pulse over the
local channel (`vipfarm.node.channel`). The pulse imports nothing of the API stack and raises
its own scheduling priority (SCHED_RR, or a lower nice value where real-time is refused).

* `BucketsChanged` -> the kernel (one nftables transaction), read back, confirmed to the core:
  peers only ever hear of buckets the kernel holds. Every batch of heartbeats renews the leases
  (in the lease thread); if the pulse dies or hangs, the leases run out (lease < dead_after)
  before any peer takes the buckets over.
* The application's health comes from the manager (`Health`), repeated every
  `channel.KEEPALIVE_S`. A manager that says nothing for `manager_timeout` (hung, stopped) or
  whose connection closes (dead) makes the application count as unhealthy: the node goes to
  WAIT and gives its buckets away cleanly, through the usual release-before-acquire. When the
  manager speaks again, health returns with its next `Health`.
* A LAN link that is down also counts as unhealthy, and for dead_after + 2 intervals after it
  is back (see `_check_link`).
* The pulse joins the farm when the manager says `Join` (the manager holds the desired state
  and says it whole on every connection), so a pulse restarted by the daemon rejoins by itself
  and a node an operator stopped stays stopped.
* Events (the core's and the pulse's own) go to the manager, which writes the module log; while
  no manager is connected they are printed, kept (bounded) and replayed on the next connection.
* SIGTERM or `Shutdown`: leave (if still in the farm) and wait, bounded, for the buckets to be
  given away, then say goodbye, remove the data path and exit.
* A heartbeat socket drops, before any decoding, every datagram whose source address is not a
  configured peer's address on that network (`unknown_source`); what passes goes to the core,
  which rejects the rest cheaply (docs/PROTOCOL.md, "Receiving"). Every drop is counted by
  network and reason (exported as metrics); a peer that speaks a heartbeat version or key this
  node cannot read is logged once, with the fix.
* The incarnation is persisted in the state directory (`--state-dir`, default
  /var/lib/vipfarm/FARM/NODE) before the first heartbeat, as max(now in ms, last + 1): peers
  accept a new incarnation only once it proves fresh, and never one lower than the last.
* `ApplyConfig` may name new farm key files (a key rotation step): they are read and checked
  first, then the data path is updated, then the keys are swapped in the core without a gap.

Start-up order keeps every intermediate state safe: the data path comes first with no bucket
(the VIP exists but this node accepts no new flow), then the heartbeat sockets, the channel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from vipfarm.datapath.kernel import DatapathError, Kernel
from vipfarm.datapath.service import DatapathService
from vipfarm.datapath.spec import DatapathSpec, Rule
from vipfarm.errors import VipfarmError
from vipfarm.log import event, kv, setup
from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.membership.driver import Driver
from vipfarm.membership.wire import MIN_VERSION, VERSION, Codec, Drop, NodeState
from vipfarm.node import channel as ch
from vipfarm.node.delivery import Directed
from vipfarm.node.host import LinkState, die_with_parent, next_incarnation, peer_uid

log = logging.getLogger("vipfarm.pulse")

MANAGER_TIMEOUT_S = 1.5
DRAIN_MAX = 256  # datagrams read per wake-up and socket
RECV_BYTES = 65536  # larger than any heartbeat: an oversized datagram arrives whole, and is dropped
RECV_BUFFER = 4 << 20  # bytes: a second of heartbeats of a 64-node farm on one network
LINK_CHECK_S = 0.02  # how stale the LAN link's state may be
SHUTDOWN_DRAIN_FACTOR = 4  # a shutdown waits at most this many dead_after for the release
BACKLOG = 1000  # events kept while no manager is connected
RT_PRIORITY = 10  # SCHED_RR priority: above every normal task, below the kernel's own threads
NICE = -15
# Calm reading (`Pulse._set_reading`): with at least this many peers, a quiet node reads
# heartbeats every CALM_READ_FRACTION of an interval instead of waking for each. Below it the
# wake-ups saved (one or two per interval) are not worth the later reading.
CALM_MIN_PEERS = 4
CALM_READ_FRACTION = 0.5
# A lease renewal is skipped while the last one still covers the next heartbeat with this
# fraction of an interval to spare (against a late timer): about every other heartbeat with
# every timing profile, where each renewal is a kernel transaction.
RENEW_SPARE = 0.5


class PulseError(VipfarmError):
    """The pulse cannot run; the text says why and what to do."""


def raise_priority() -> str:
    """SCHED_RR if allowed, else the lowest nice value allowed; says which it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(RT_PRIORITY))
        return f"rr:{RT_PRIORITY}"
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
        return f"nice:{NICE}"
    except OSError:
        return "normal"


def _grow_receive_buffer(sock: socket.socket) -> None:
    """SO_RCVBUFFORCE (root) past net.core.rmem_max, else as much as rmem_max allows."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, RECV_BUFFER)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)


def normal_priority() -> None:
    """For the worker threads of slow jobs (a large ruleset, its validation): the pulse runs
    SCHED_RR, which its threads inherit, and a CPU-bound thread at the same real-time priority
    would hold the loop's core for a whole 100 ms round-robin slice at a time (a 3,000-rule
    update applied on every node at once cost lost leases that way). On Linux the call applies
    to the calling thread only."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


_RULES: TypeAdapter[list[Rule]] = TypeAdapter(list[Rule])
SPEC_CHUNK = 200  # rules validated per call (each call holds the GIL throughout)


def parse_spec(data: dict[str, Any]) -> DatapathSpec:
    """`DatapathSpec.model_validate`, the rules in chunks: pydantic validates a list in one
    call that never lets go of the GIL (55 ms for 3,000 rules here, several times that on a busy
    machine), and the pulse's loop must get the GIL within a few milliseconds. The spec then
    takes the validated rules as they are. A bad rule is reported by the whole validation, so
    its position is the one in the configuration."""
    rules = data.get("rules")
    if not isinstance(rules, list) or len(rules) <= SPEC_CHUNK:
        return DatapathSpec.model_validate(data)
    try:
        checked: list[Rule] = []
        for i in range(0, len(rules), SPEC_CHUNK):
            checked += _RULES.validate_python(rules[i : i + SPEC_CHUNK])
    except ValidationError:
        return DatapathSpec.model_validate(data)  # raises, with the right location
    return DatapathSpec.model_validate({**data, "rules": checked})


class Lateness:
    """How late the pulse's timer fired (the scheduling delay its timers must leave room for):
    the worst since start, the worst of the last `WINDOW_S` (two windows, so the figure never
    drops to nothing at a window's edge) and a count of firings later than 5 and 20 ms."""

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self.worst = 0.0
        self.current = 0.0
        self.previous = 0.0
        self.window_start = -math.inf
        self.over_5ms = 0
        self.over_20ms = 0

    def add(self, late_s: float, now: float) -> None:
        if late_s < 0 or late_s == math.inf:
            return
        if now - self.window_start >= self.WINDOW_S:
            self.previous, self.current, self.window_start = self.current, 0.0, now
        self.current = max(self.current, late_s)
        self.worst = max(self.worst, late_s)
        self.over_5ms += late_s > 0.005
        self.over_20ms += late_s > 0.020

    def summary(self, now: float) -> dict[str, float]:
        recent = (
            max(self.current, self.previous) if now - self.window_start < 2 * self.WINDOW_S else 0
        )
        return {
            "max": round(self.worst * 1000, 2),
            "recent_max": round(recent * 1000, 2),
            "over_5ms": self.over_5ms,
            "over_20ms": self.over_20ms,
        }


@dataclasses.dataclass
class PulseSettings:
    """What the pulse takes from the farm configuration (`settings_from_config`)."""

    membership: MembershipConfig
    spec: DatapathSpec
    listen: dict[str, tuple[str, int]]  # network -> (own address, port)
    peers: dict[str, list[tuple[str, int]]]  # network -> every peer's (address, port)
    # network -> each peer's address (as the socket reports a source) -> its name
    sources: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


def read_keys(key_file: Path, next_key_file: Path | None) -> tuple[bytes, bytes | None]:
    """The farm keys from their files, for a live key change: read with the checks of
    validation (`read_secret`: FileRefused, a ValueError, names the file and the fix)."""
    from vipfarm.config.schema import KEY_MAX_BYTES, key_bytes
    from vipfarm.config.secrets import read_secret

    def read(path: Path) -> bytes:
        return key_bytes(read_secret(path, what="farm key", max_bytes=KEY_MAX_BYTES))

    return read(key_file), None if next_key_file is None else read(next_key_file)


def settings_from_config(path: Path, node: str) -> PulseSettings:
    from vipfarm.config.loading import load_config

    cfg = load_config(path)
    me = cfg.node(node)
    t = cfg.timing
    return PulseSettings(
        membership=MembershipConfig(
            farm=cfg.farm.name,
            node=me.name,
            key=cfg.key(),
            next_key=cfg.next_key(),
            nodes={n.name: n.weight for n in cfg.nodes},
            networks=tuple(n.name for n in cfg.networks),
            buckets=cfg.farm.buckets,
            interval=t.interval_ms / 1000,
            dead_after=t.dead_after_ms / 1000,
            lease=t.lease_ms / 1000,
        ),
        spec=cfg.datapath_spec(me),
        listen={n.name: (str(me.address[n.name]), n.port) for n in cfg.networks},
        peers={
            net.name: [(str(n.address[net.name]), net.port) for n in cfg.nodes if n.name != node]
            for net in cfg.networks
        },
        sources={
            net.name: {str(n.address[net.name]): n.name for n in cfg.nodes if n.name != node}
            for net in cfg.networks
        },
    )


class Pulse:
    def __init__(
        self,
        settings: PulseSettings,
        *,
        run_dir: Path,
        state_dir: Path | None = None,
        kernel: Kernel | None = None,
    ):
        self.settings = settings
        self.run_dir = run_dir
        self.state_dir = state_dir or run_dir
        self.name = settings.membership.node
        self.datapath = DatapathService(settings.spec, run_dir / "datapath", kernel)
        # Persisted (written and fsynced) before the first heartbeat: a peer takes a new
        # incarnation only when it is higher than the last one it proved.
        self.incarnation = next_incarnation(self.state_dir / "incarnation")
        self.core = Membership(settings.membership, self.incarnation)
        self.driver = Driver(self.core, self)
        self.counters: Counter[str] = Counter(heartbeat_send_errors=0, datapath_errors=0)
        self.hb_sent: Counter[str] = Counter()
        self.hb_received: Counter[str] = Counter()
        self.hb_rejected: Counter[tuple[str, str]] = Counter()
        self.core_events: Counter[str] = Counter()
        # Per network, the configured peers' addresses (what a heartbeat may come from) and
        # their names, for the once-per-peer warnings (`_unreadable`).
        self._sources = settings.sources
        self._warned: set[tuple[str, str]] = set()
        self.kernel_owned: frozenset[int] = frozenset()
        self.priority = "normal"
        self._socks: dict[str, socket.socket] = {}
        self._timer: asyncio.Handle | None = None
        self._timer_when = -math.inf
        # How late the timer (heartbeats, leases) fires: the margin the timers must cover.
        self.lateness = Lateness()
        self._exit = asyncio.Event()
        # The manager: its connection, when it last said anything, what it said of the app.
        self._manager: asyncio.StreamWriter | None = None
        self._manager_heard = -math.inf
        self._app_ok = False
        self._backlog: deque[ch.Event] = deque(maxlen=BACKLOG)
        self._link_ok = True
        self._link_checked_at = -math.inf
        self._link: LinkState | None = None
        self._link_iface = ""
        self._link_up_since: float | None = -math.inf  # up "forever": the core listens first
        self._server: asyncio.AbstractServer | None = None
        self._apply_lock = asyncio.Lock()
        self._lease_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        self._renewing: Future[frozenset[int]] | None = None
        self._renewed_at = -math.inf
        self._calm = False  # reading heartbeats on the calm cadence (no socket readers)
        self._calm_timer: asyncio.TimerHandle | None = None
        self._flooded_until = -math.inf  # a drain found more than DRAIN_MAX queued: not calm
        self._tasks: set[asyncio.Task[None]] = set()
        self.directed = self._make_directed()

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="slow", initializer=normal_priority
            )
        )
        await self.datapath.start(())
        # Only now: building and applying the ruleset is the heaviest work a pulse does, and
        # at a real-time priority it held a core against every other process (a dozen nodes
        # starting at once starved their peers' heartbeats). Nothing is sent before this.
        self.priority = raise_priority()
        try:
            await self._open_sockets()
            await self._listen()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._exit.set)
            self._emit(
                "pulse_started",
                node=self.name,
                incarnation=self.incarnation,
                pid=os.getpid(),
                priority=self.priority,
            )
            self.driver.poke(time.monotonic())
            await self._exit.wait()
            await self._leave_for_good()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._server is not None:
                self._server.close()
            self._close_sockets()
            self._lease_pool.shutdown(wait=True)
            self.directed.stop()
            self.datapath.stop()
            self._emit("pulse_stopped", node=self.name)
            await self._flush_manager()

    async def _leave_for_good(self) -> None:
        """Give every bucket away (bounded), then say goodbye."""
        core = self.core
        if core.state is not NodeState.STOP:
            core.leave(time.monotonic())
            self.driver.poke(time.monotonic())
            deadline = time.monotonic() + SHUTDOWN_DRAIN_FACTOR * core.config.dead_after
            while core.state is NodeState.DRAINING and time.monotonic() < deadline:
                await asyncio.sleep(core.config.interval / 4)
            core.stopped(time.monotonic())
            self.driver.poke(time.monotonic())
        self.driver.shutdown(time.monotonic())

    async def _open_sockets(self) -> None:
        """One non-blocking UDP socket per heartbeat network, read by `_drain`.

        Not asyncio's datagram transport: it reads one datagram per wake-up of the loop, so
        after the pulse was held up (a busy machine, a long kernel transaction) the timer could
        fire with most of the peers' heartbeats still queued, and declare live peers dead
        (seen at 12 nodes under load). `_fire` drains every socket before the core looks at the
        time, and the receive buffer is large enough to hold a second of heartbeats of a big
        farm, so nothing that arrived is judged missing. It is also cheaper per datagram."""
        loop = asyncio.get_running_loop()
        for net, (addr, port) in self.settings.listen.items():
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                _grow_receive_buffer(sock)
                sock.bind((addr, port))
            except OSError as e:
                sock.close()
                self._close_sockets()
                raise PulseError(
                    f"cannot listen for heartbeats on {addr} port {port} (network {net}): "
                    f"{e.strerror}; is the address configured on this host?"
                ) from e
            self._socks[net] = sock
            loop.add_reader(sock.fileno(), self._drain, net)

    def _close_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._socks.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        if self._calm_timer is not None:
            self._calm_timer.cancel()
            self._calm_timer = None
        self._calm = False

    def _set_reading(self) -> None:
        """Read heartbeats as they arrive, or on the calm cadence.

        A node of a large farm wakes for nearly every heartbeat of every peer (two networks, a
        dozen peers: over 200 wake-ups a second, each an epoll round and a pass of the event
        loop, a fifth of the pulse's CPU). While the core is quiet (`Membership.quiet`: no
        handover under way, nothing to acknowledge) nothing waits on a heartbeat, so the
        sockets leave the loop and are read every CALM_READ_FRACTION of an interval, and at
        every timer before the core looks at silences. A heartbeat read late counts as heard
        late (a silence is judged later, never earlier: safe, and a failover is at most that
        fraction of an interval slower). Any change that makes the core wait or be waited for
        turns arrival reading back on at once, and so does a socket found holding more than
        one drain reads (a flood), for dead_after."""
        calm = (
            len(self.core.config.nodes) > CALM_MIN_PEERS
            and self.core.quiet()
            and time.monotonic() >= self._flooded_until
        )
        if calm == self._calm or not self._socks:
            return
        self._calm = calm
        loop = asyncio.get_running_loop()
        for net, sock in self._socks.items():
            if calm:
                loop.remove_reader(sock.fileno())
            else:
                loop.add_reader(sock.fileno(), self._drain, net)
        if calm:
            self._arm_calm_read()
        elif self._calm_timer is not None:
            self._calm_timer.cancel()
            self._calm_timer = None

    def _calm_read(self) -> None:
        self._calm_timer = None
        for network in self._socks:
            self._drain(network)
        self._set_reading()
        if self._calm and self._calm_timer is None:
            self._arm_calm_read()

    def _arm_calm_read(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.core.config.interval * CALM_READ_FRACTION
        self._calm_timer = loop.call_later(period, self._calm_read)

    def _drain(self, network: str) -> None:
        """Every datagram queued on `network`'s socket (bounded per call, so a flood cannot hold
        the loop: the rest is read on the next wake-up)."""
        sock = self._socks.get(network)
        if sock is None:
            return
        for _ in range(DRAIN_MAX):
            try:
                data, addr = sock.recvfrom(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier send: count, never raise
                self.counters["heartbeat_recv_errors"] += 1
                continue
            self.on_datagram(data, network, addr[0])
        # More queued than one call reads: a flood (or a stall). Read as it arrives for a while,
        # or the calm cadence would leave the rest to fill the socket and lose real heartbeats.
        self._flooded_until = time.monotonic() + self.core.config.dead_after
        if self._calm:
            self._set_reading()

    # ------------------------------------------------------------------ the driver's I/O
    def send(self, network: str, payload: bytes) -> None:
        sock = self._socks.get(network)
        if sock is None:
            return
        for peer in self.settings.peers[network]:
            try:
                sock.sendto(payload, peer)
                self.hb_sent[network] += 1
            except OSError:  # full buffer, no route, a peer's ICMP error: its next one goes
                self.counters["heartbeat_send_errors"] += 1

    def renew_leases(self, now: float) -> None:
        """Hand the renewal to the lease thread and send the heartbeats at once: a renewal that
        waits in the kernel (behind a large ruleset update) must not hold the heartbeats back.
        A renewal that is late or fails only shortens this node's own ownership, the safe side;
        the core notices a node that stopped sending, and the kernel read-back what it holds."""
        cfg = self.core.config
        if now + (1 + RENEW_SPARE) * cfg.interval < self._renewed_at + cfg.lease:
            return  # the lease outlives the next heartbeat: renewed then
        if self._renewing is not None and not self._renewing.done():
            self.counters["lease_renew_busy"] += 1
            return
        # Counted from the submission: the kernel's expiry is set later, so never earlier.
        self._renewed_at = now
        self._renewing = self._lease_pool.submit(self.datapath.refresh)
        loop = asyncio.get_running_loop()
        self._renewing.add_done_callback(lambda fut: loop.call_soon_threadsafe(self._renewed, fut))

    def _renewed(self, fut: Future[frozenset[int]]) -> None:
        try:
            self.kernel_owned = fut.result()
        except Exception as e:  # the kernel refused: leases run out, which is the safe side
            self.counters["datapath_errors"] += 1
            self._emit("lease_renew_failed", logging.ERROR, error=e)

    def apply_buckets(self, owned: frozenset[int], now: float) -> frozenset[int]:
        before = self.kernel_owned
        try:
            self.kernel_owned = self.datapath.set_owned(owned)
        except Exception as exc:
            self.counters["datapath_errors"] += 1
            self._emit("datapath_failed", logging.ERROR, error=exc)
            self.kernel_owned = self.datapath.datapath.read_owned()
        self._emit(
            "buckets_changed",
            released=len(before - self.kernel_owned),
            acquired=len(self.kernel_owned - before),
            owned=len(self.kernel_owned),
            # when the kernel held it (wall clock, for the bench: the module log's own time
            # stamp is the manager's, written later)
            at=round(time.time(), 4),
        )
        return self.kernel_owned

    def on_event(self, e: ev.Event, now: float) -> None:
        self.core_events[type(e).__name__] += 1
        if isinstance(e, ev.StateChanged):
            self._emit("state_changed", old=e.old.name, new=e.new.name)
        elif isinstance(e, ev.Drained):
            self._emit("buckets_given_away")
        elif isinstance(e, ev.PeerDown):
            self._emit("peer_down", logging.WARNING, peer=e.name)
        elif isinstance(e, ev.PeerUp):
            self._emit("peer_up", peer=e.name, restarted=e.restarted)
        elif isinstance(e, ev.NetworkLost):
            self._emit("network_lost", logging.WARNING, peer=e.name, network=e.network)
        elif isinstance(e, ev.NetworkRestored):
            self._emit("network_restored", peer=e.name, network=e.network)
        elif isinstance(e, ev.ViewChanged):
            members = ",".join(f"{n}:{w}" for n, w in e.members)
            self._emit("view_changed", members=members, anchored=e.anchored)
        elif isinstance(e, ev.SplitBrainDetected):
            self._emit(
                "split_brain_detected",
                logging.ERROR,
                buckets=len(e.buckets),
                nodes=",".join(e.nodes),
            )
        elif isinstance(e, ev.SplitBrainHealed):
            self._emit("split_brain_healed")
        elif isinstance(e, ev.LeaseLost):
            self._emit("lease_lost", logging.ERROR, silent_s=round(e.silent_s, 3))

    def wake_at(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when == math.inf:
            return
        loop = asyncio.get_running_loop()
        if when == -math.inf:
            self._timer = loop.call_soon(self._fire)
            self._timer_when = loop.time()
        else:
            self._timer = loop.call_at(when, self._fire)
            self._timer_when = when

    # ------------------------------------------------------------------ inputs
    def on_datagram(self, data: bytes, network: str, source: str = "") -> None:
        self.hb_received[network] += 1
        peer = self._sources.get(network, {}).get(source)
        if peer is None:
            # Before any decoding: a flood from elsewhere costs one dict lookup per datagram.
            self.hb_rejected[(network, Drop.UNKNOWN_SOURCE.value)] += 1
            self.core.count_drop(Drop.UNKNOWN_SOURCE)
            return
        drop = self.driver.datagram(data, network, time.monotonic())
        if self._calm and not self.core.quiet():
            self._set_reading()
        if drop is not None:
            self.hb_rejected[(network, str(drop))] += 1
            if drop is Drop.VERSION or drop is Drop.UNKNOWN_KEY:
                self._unreadable(peer, source, drop, data)

    def _unreadable(self, peer: str, source: str, drop: Drop, data: bytes) -> None:
        """Say once per peer (and reason) that its heartbeats cannot be read, and the fix."""
        if (peer, drop) in self._warned:
            return
        self._warned.add((peer, drop))
        if drop is Drop.VERSION:
            version = data[2]
            fix = (
                "upgrade vipfarm on this node: the peer speaks a newer heartbeat version"
                if version > VERSION
                else f"upgrade vipfarm on {peer}"
            )
            self._emit(
                "heartbeat_version_unsupported",
                logging.ERROR,
                peer=peer,
                source=source,
                version=version,
                speaks=f"{MIN_VERSION}..{VERSION}",
                fix=fix,
            )
        else:
            self._emit(
                "heartbeat_key_unknown",
                logging.ERROR,
                peer=peer,
                source=source,
                fix=(
                    "the peer sends with a farm key this node does not have: install the same "
                    "farm.key_file and farm.next_key_file on every node (docs/CONFIG.md, "
                    "rotating the farm key)"
                ),
            )

    def _fire(self) -> None:
        self._timer = None
        woke = time.monotonic()
        self.lateness.add(woke - self._timer_when, woke)
        for network in self._socks:
            self._drain(network)  # what arrived counts before the core looks at silences
        now = time.monotonic()
        self._check_health(now)
        self.driver.timer(now)
        self._delivery_tick(now)
        self._set_reading()

    # ------------------------------------------------------------------ directed delivery
    def _make_directed(self) -> Directed:
        addresses: dict[str, list[str]] = {}
        for by_addr in self._sources.values():
            for addr, peer in by_addr.items():
                addresses.setdefault(peer, []).append(addr)
        return Directed(self.name, self.datapath, addresses, self._emit)

    def _delivery_tick(self, now: float) -> None:
        """Entries, steering and the flood probe (`vipfarm.node.delivery`); the kept buckets
        (None in flood delivery: the heartbeats carry none) and the deaf flag (auto delivery)
        for the next heartbeats. A flood farm pays one attribute test per timer."""
        directed = self.directed
        try:
            if not directed.active:
                if self.core.kept is not None:  # the farm went back to flood
                    directed.idle()
                    self.core.kept, self.core.deaf = None, False
                return
            self.core.kept = directed.tick(
                now,
                self.core.state,
                self.core.peer_claims(),
                self.kernel_owned,
                self.datapath.kept,
                self.core.legacy_peers(now),
            )
            self.core.deaf = directed.deaf
        except Exception as e:  # never the heartbeats' problem
            self.counters["delivery_errors"] += 1
            self._emit("delivery_failed", logging.ERROR, error=e)

    def _check_health(self, now: float) -> None:
        """The application counts healthy while the manager says so, has said anything within
        the manager timeout, and the LAN link is up (see `_check_link`)."""
        self._check_link(now)
        fresh = self._manager is not None and now - self._manager_heard <= MANAGER_TIMEOUT_S
        if self._app_ok and not fresh:
            self._emit(
                "manager_silent", logging.WARNING, silent_s=round(now - self._manager_heard, 3)
            )
            self._app_ok = False  # until the manager says it again
        healthy = self._app_ok and self._link_ok
        if healthy != self.core.app_healthy:
            self.core.set_app_healthy(healthy, now)

    def _check_link(self, now: float) -> None:
        """A node whose LAN link is down can serve nobody, and would otherwise believe every
        peer dead and claim every bucket, then accept the same new flows as its peers for a
        moment when the link returns. So it counts as unhealthy (WAIT: it holds nothing) while
        the link is down, and stays so for dead_after + 2 intervals after the link is back:
        long enough to hear every live peer again (peers it declared dead while it heard
        nobody), so that it rejoins through the normal release-before-acquire instead of
        claiming buckets whose owners it merely could not hear (found by `vipfarm chaos`)."""
        iface = self.datapath.spec.interface
        # The timer fires several times per interval; sysfs is read at most every
        # LINK_CHECK_S (an open/read/close each time was a fifth of the pulse's CPU).
        if now - self._link_checked_at < LINK_CHECK_S:
            return
        self._link_checked_at = now
        if self._link is None or self._link_iface != iface:
            self._link, self._link_iface = LinkState(iface), iface
        up = self._link.up()
        if not up:
            self._link_up_since = None
        elif self._link_up_since is None:
            self._link_up_since = now
        cfg = self.core.config
        settle_s = cfg.dead_after + 2 * cfg.interval
        ok = up and self._link_up_since is not None and now - self._link_up_since >= settle_s
        if ok != self._link_ok:
            self._link_ok = ok
            if ok:
                self._emit("lan_link_up", interface=iface, settled_s=round(settle_s, 3))
            else:
                self._emit("lan_link_down", logging.ERROR, interface=iface)

    # ------------------------------------------------------------------ the channel
    async def _listen(self) -> None:
        path = self.run_dir / ch.SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=ch.MAX_FRAME + 4
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is None or peer_uid(sock) not in (0, os.getuid()):
            writer.close()
            return
        try:
            hello = await asyncio.wait_for(ch.read(reader), timeout=5.0)
            if not isinstance(hello, ch.Hello) or hello.role != "manager":
                raise ch.ChannelError("the first message must be the manager's hello")
        except (ch.ChannelError, asyncio.IncompleteReadError, TimeoutError, OSError) as e:
            self.counters["channel_refused"] += 1
            self._emit("channel_refused", logging.WARNING, error=e)
            writer.close()
            return
        if self._manager is not None:  # a new manager replaces the old one
            self._manager.close()
        self._manager = writer
        self._manager_heard = time.monotonic()
        writer.write(ch.encode(ch.Hello(role="pulse", pid=os.getpid())))
        self._emit("manager_connected", pid=hello.pid)
        await self._flush_manager()
        try:
            while True:
                msg = await ch.read(reader)
                self._manager_heard = time.monotonic()
                self._handle(msg, writer)
        except (ch.ChannelError, asyncio.IncompleteReadError, ConnectionError) as e:
            if self._manager is writer:
                self._emit("manager_lost", logging.WARNING, pid=hello.pid, error=e)
        finally:
            if self._manager is writer:
                self._manager = None
                self._app_ok = False
                self._check_health(time.monotonic())
                self.driver.poke(time.monotonic())
            writer.close()

    def _handle(self, msg: ch.Message, writer: asyncio.StreamWriter) -> None:
        now = time.monotonic()
        core = self.core
        if isinstance(msg, ch.Health):
            self._app_ok = msg.healthy
            self._check_health(now)
        elif isinstance(msg, ch.Join | ch.Leave):
            out = core.state in (NodeState.STOP, NodeState.DRAINING, NodeState.STOPPING)
            if isinstance(msg, ch.Join) and out:
                core.join(now)
            elif isinstance(msg, ch.Leave) and not out:
                core.leave(now)
            if msg.id is not None:
                state = {"state": core.state.name}
                writer.write(ch.encode(ch.Reply(id=msg.id, ok=True, data=state)))
        elif isinstance(msg, ch.Stopped):
            core.stopped(now)
        elif isinstance(msg, ch.ApplyConfig):
            self._spawn(self._apply_config(msg, writer))
        elif isinstance(msg, ch.Query):
            writer.write(ch.encode(ch.Reply(id=msg.id, ok=True, data=self.state(now))))
        elif isinstance(msg, ch.Shutdown):
            self._exit.set()
        self.driver.poke(now)
        self._set_reading()

    async def _apply_config(self, msg: ch.ApplyConfig, writer: asyncio.StreamWriter) -> None:
        keys: tuple[bytes, bytes | None] | None = None
        if msg.key_file is not None:
            try:
                keys = read_keys(
                    Path(msg.key_file),
                    None if msg.next_key_file is None else Path(msg.next_key_file),
                )
                cfg = self.core.config
                Codec(cfg.farm, keys[0], cfg.buckets, keys[1])  # refuses a bad key, changes nothing
            except (OSError, ValueError) as e:
                if not writer.is_closing():
                    writer.write(ch.encode(ch.Reply(id=msg.id, ok=False, error=f"farm key: {e}")))
                return
        async with self._apply_lock:
            reply = await self._apply_spec(msg)
        if (
            reply.ok
            and keys is not None
            and keys != (self.core.config.key, self.core.config.next_key)
        ):
            self.core.set_keys(keys[0], keys[1], time.monotonic())
            self._warned.clear()
            self._emit("farm_keys_changed", next_key=keys[1] is not None)
            self.driver.poke(time.monotonic())
        if reply.ok and msg.weight != self.core.weight:
            self.core.set_weight(msg.weight, time.monotonic())
            self.driver.poke(time.monotonic())
        if not writer.is_closing():
            writer.write(ch.encode(reply))

    async def _apply_spec(self, msg: ch.ApplyConfig) -> ch.Reply:
        """A new ruleset in a worker thread: thousands of rules take the kernel seconds, and
        the heartbeats and lease renewals must go on meanwhile (the leases survive the update:
        the owned set is kept, not recreated)."""
        current = self.datapath.spec

        def parse() -> tuple[DatapathSpec, bool]:
            spec = parse_spec(msg.spec)
            return spec, spec == current

        try:
            # Validating thousands of rules takes a while, and so does comparing them with the
            # current ones (30-100 ms for 3,000): not on the pulse's loop.
            spec, unchanged = await asyncio.to_thread(parse)
        except ValueError as e:
            return ch.Reply(id=msg.id, ok=False, error=f"bad data path: {e}")
        if unchanged:
            return ch.Reply(id=msg.id, ok=True, data={"owned": sorted(self.kernel_owned)})
        old = self.datapath.spec
        t0 = time.monotonic()
        try:
            self.kernel_owned = await self.datapath.update_in_thread(spec)
        except Exception as e:
            self.counters["datapath_errors"] += 1
            self._emit("datapath_update_failed", logging.ERROR, error=e)
            with contextlib.suppress(Exception):
                self.kernel_owned = await self.datapath.update_in_thread(old)
            return ch.Reply(id=msg.id, ok=False, error=f"the kernel refused the new rules: {e}")
        self._emit(
            "datapath_updated", rules=len(spec.rules), took_s=round(time.monotonic() - t0, 3)
        )
        return ch.Reply(id=msg.id, ok=True, data={"owned": sorted(self.kernel_owned)})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def state(self, now: float) -> dict[str, Any]:
        """What the manager reports: the core's snapshot and what the kernel holds, read back."""
        return {
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "priority": self.priority,
            "snapshot": dataclasses.asdict(self.core.snapshot(now)),
            "kernel_owned": sorted(self.kernel_owned),
            # given away, established connections still served (read back by the sweeper)
            "kernel_kept": sorted(self.datapath.kept),
            "prefilter": self._prefilter_state(),
            "app_healthy": self.core.app_healthy,
            "link_ok": self._link_ok,
            "counters": dict(self.counters),
            "hb_sent": dict(self.hb_sent),
            "hb_received": dict(self.hb_received),
            "hb_rejected": [[n, r, c] for (n, r), c in self.hb_rejected.items()],
            "core_events": dict(self.core_events),
            "timer_late_ms": self.lateness.summary(now),
            "delivery": self.directed.state(),
        }

    def _prefilter_state(self) -> dict[str, object]:
        try:
            return self.datapath.prefilter_state()
        except DatapathError as e:  # a report must not fail for want of a counter
            return {"on": None, "error": str(e)}

    def _emit(self, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
        """An event for the module log: to the manager, or printed and kept until one comes."""
        msg = ch.Event(name=name, level=level, fields={k: _plain(v) for k, v in fields.items()})
        if self._manager is not None and not self._manager.is_closing():
            self._manager.write(ch.encode(msg))
            return
        event(log, name, level, **fields)
        if len(self._backlog) == self._backlog.maxlen:
            self.counters["events_dropped"] += 1
        self._backlog.append(msg.model_copy(update={"fields": {**msg.fields, "at": time.time()}}))

    async def _flush_manager(self) -> None:
        w = self._manager
        if w is None:
            return
        while self._backlog:
            w.write(ch.encode(self._backlog.popleft()))
        with contextlib.suppress(ConnectionError):
            await w.drain()


def _plain(v: Any) -> Any:
    return v if isinstance(v, bool | int | float | str) or v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipfarm-pulse", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, help="persistent state (default: the run dir)")
    args = p.parse_args(argv)
    die_with_parent()
    setup()
    try:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        if args.state_dir is not None:
            args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pulse = Pulse(
            settings_from_config(args.config, args.node),
            run_dir=args.run_dir,
            state_dir=args.state_dir,
        )
        asyncio.run(pulse.run())
    except Exception as e:  # start-up failures: one clear line for the daemon to pass on
        print(f"error: {e}", file=sys.stderr)
        print(kv("pulse_failed", error=type(e).__name__), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
