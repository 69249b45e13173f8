"""The node daemon: one per server and farm, wiring membership, data path and application.

Theory of operation
-------------------
Everything runs on one asyncio loop. The membership core (`vipfarm.membership.core`) is pure:
the daemon feeds it heartbeats from one UDP socket per heartbeat network and the time, sends
what it returns to every peer's address on that network, and applies its events:

* `BucketsChanged` -> the kernel (`DatapathService.set_owned`, one nftables transaction), then
  `confirm_owned(<read back from the kernel>)`: peers only ever hear of buckets the kernel holds.
* Every time heartbeats go out, the kernel leases are renewed. If this process dies or hangs,
  the leases run out (lease < dead_after) before any peer takes the buckets over.
* `Drained` (after `vipfarm stop`) -> wait until the node's established TCP connections to a VIP
  have ended or the drain timeout has passed, stop the application, `stopped()`: state STOP.

The application supervisor (`vipfarm.supervisor`) runs the module's scripts and checkers; its
health drives `set_app_healthy` (an unhealthy node is WAIT and owns nothing), and an exhausted
restart policy takes the node out of the farm.

Start-up order keeps every intermediate state safe: the data path comes first with no bucket
(so the VIP exists but this node accepts no new flow), then the control socket, the heartbeat
sockets, the core (which listens for `dead_after` before it claims anything), the application.
SIGTERM drains, stops the application and removes the data path; SIGKILL leaves the application
running and the kernel leases to expire, which is the fail-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vipfarm import sdnotify
from vipfarm.config import FarmConfig, NodeSection
from vipfarm.control import ControlError, ControlServer
from vipfarm.datapath.kernel import Kernel
from vipfarm.datapath.service import DatapathService
from vipfarm.log import event
from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.model import IPAddress
from vipfarm.protocol import NodeState
from vipfarm.supervisor import (
    AppSupervisor,
    Exhausted,
    Healthy,
    Restarting,
    SupervisorEvent,
    Unhealthy,
    setup_node_logs,
)

log = logging.getLogger("vipfarm.daemon")

DRAIN_POLL_S = 0.2
# TCP states in /proc/net/tcp that still carry a client's data: ESTABLISHED, FIN_WAIT1/2,
# CLOSE_WAIT, CLOSING, LAST_ACK (not TIME_WAIT: nothing left to serve).
_BUSY_TCP_STATES = {"01", "04", "05", "08", "0B", "09"}


def _proc_addr(hexaddr: str) -> IPAddress:
    raw = bytes.fromhex(hexaddr)
    # /proc prints each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def busy_connections(vips: Iterable[IPAddress], proc_net: Path = Path("/proc/net")) -> int:
    """TCP connections of this network namespace whose local address is a VIP and that are
    still open (the drain waits for these)."""
    wanted = set(vips)
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] not in _BUSY_TCP_STATES:
                continue
            local = fields[1].split(":")[0]
            if _proc_addr(local) in wanted:
                count += 1
    return count


def link_up(ifname: str) -> bool:
    """Whether an interface can carry traffic, by its operational state ("unknown", which
    drivers without carrier reporting show, counts as up)."""
    try:
        state = Path(f"/sys/class/net/{ifname}/operstate").read_text().strip()
    except OSError:
        return False
    return state not in ("down", "lowerlayerdown", "notpresent", "dormant")


class DaemonError(Exception):
    """The daemon cannot run; the text says why and what to do."""


class _HeartbeatProtocol(asyncio.DatagramProtocol):
    def __init__(self, daemon: Daemon, network: str) -> None:
        self.daemon = daemon
        self.network = network

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.daemon.on_datagram(data, self.network)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for a peer that is down come back here: count, never raise.
        self.daemon.counters["heartbeat_send_errors"] += 1


class Daemon:
    def __init__(
        self,
        config: FarmConfig,
        node: NodeSection,
        *,
        run_dir: Path,
        log_dir: Path,
        kernel: Kernel | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.module_log, self.app_log = setup_node_logs(log_dir)
        self.counters: dict[str, int] = {"heartbeat_send_errors": 0, "datapath_errors": 0}
        self.datapath = DatapathService(config.datapath_spec(node), run_dir / "datapath", kernel)
        self.incarnation = time.time_ns() // 1_000_000
        t = config.timing
        self.core = Membership(
            MembershipConfig(
                farm=config.farm.name,
                node=node.name,
                key=config.key(),
                nodes={n.name: n.weight for n in config.nodes},
                networks=tuple(n.name for n in config.networks),
                buckets=config.farm.buckets,
                interval=t.interval_ms / 1000,
                dead_after=t.dead_after_ms / 1000,
                lease=t.lease_ms / 1000,
            ),
            self.incarnation,
        )
        self.supervisor = AppSupervisor(
            config.app_spec(node),
            module_log=self.module_log,
            app_log=self.app_log,
            on_event=self._on_app_event,
        )
        self.kernel_owned: frozenset[int] = frozenset()
        self._app_ok = False
        self._link_ok = True
        self.control = ControlServer(
            config.farm.name,
            {
                "state": self._cmd_state,
                "start": self._cmd_start,
                "stop": self._cmd_stop,
                "logs": self._cmd_logs,
            },
            mutating={"start", "stop"},
        )
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._peers: dict[str, list[tuple[str, int]]] = {}
        self._wake = asyncio.Event()
        self._exit = asyncio.Event()
        self._force = False
        self._drain_task: asyncio.Task[None] | None = None
        self._exit_after_stop = False

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        await self.datapath.start(())
        try:
            await self.control.start()
            try:
                await self._open_sockets()
                self._install_signals()
                self.core.join(time.monotonic())
                await self.supervisor.start()
                sdnotify.notify("READY=1")
                event(
                    self.module_log,
                    "daemon_started",
                    farm=self.config.farm.name,
                    node=self.node.name,
                    incarnation=self.incarnation,
                    pid=os.getpid(),
                )
                await self._loop()
            finally:
                sdnotify.notify("STOPPING=1")
                await self.supervisor.stop()
                self.supervisor.close()
                for tr in self._transports.values():
                    tr.close()
                await self.control.close()
        finally:
            self.datapath.stop()
            event(self.module_log, "daemon_stopped", node=self.node.name)

    async def _open_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for net in self.config.networks:
            addr = self.node.address[net.name]
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda net=net.name: _HeartbeatProtocol(self, net),  # type: ignore[misc]
                    local_addr=(str(addr), net.port),
                    family=family,
                )
            except OSError as e:
                raise DaemonError(
                    f"cannot listen for heartbeats on {addr} port {net.port} (network "
                    f"{net.name}): {e.strerror}; is the address configured on this host?"
                ) from e
            self._transports[net.name] = transport
            self._peers[net.name] = [
                (str(n.address[net.name]), net.port)
                for n in self.config.nodes
                if n.name != self.node.name
            ]

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._terminate)

    def _terminate(self) -> None:
        """SIGTERM: drain, stop the application, then exit."""
        event(self.module_log, "daemon_terminating", state=self.core.state.name)
        self._exit_after_stop = True
        if self.core.state in (NodeState.STOP,):
            self._exit.set()
        else:
            self.core.leave(time.monotonic())
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while not self._exit.is_set():
            now = time.monotonic()
            self._check_link(now)
            if now >= self.core.get_timer():
                self.core.handle_timer(now)
            self._pump(now)
            delay = max(0.0, self.core.get_timer() - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def on_datagram(self, data: bytes, network: str) -> None:
        now = time.monotonic()
        self.core.receive_datagram(data, network, now)
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send what the core wants sent, renew leases, and apply the core's events."""
        out = self.core.datagrams_to_send(now)
        if out:
            self._renew_leases()
            for network, payload in out:
                tr = self._transports.get(network)
                if tr is None:
                    continue
                for peer in self._peers[network]:
                    try:
                        tr.sendto(payload, peer)
                    except OSError:
                        self.counters["heartbeat_send_errors"] += 1
        while (e := self.core.next_event()) is not None:
            self._on_core_event(e, now)

    def _renew_leases(self) -> None:
        try:
            self.kernel_owned = self.datapath.refresh()
        except Exception as e:  # the kernel refused: leases run out, which is the safe side
            self.counters["datapath_errors"] += 1
            event(self.module_log, "lease_renew_failed", logging.ERROR, error=e)

    def _on_core_event(self, e: ev.Event, now: float) -> None:
        if isinstance(e, ev.BucketsChanged):
            try:
                self.kernel_owned = self.datapath.set_owned(e.owned)
            except Exception as exc:
                self.counters["datapath_errors"] += 1
                event(self.module_log, "datapath_failed", logging.ERROR, error=exc)
                self.kernel_owned = self.datapath.datapath.read_owned()
            self.core.confirm_owned(self.kernel_owned, now)
            event(
                self.module_log,
                "buckets_changed",
                released=len(e.release),
                acquired=len(e.acquire),
                owned=len(self.kernel_owned),
            )
        elif isinstance(e, ev.Drained):
            if self._drain_task is None or self._drain_task.done():
                self._drain_task = asyncio.create_task(self._finish_drain())
        elif isinstance(e, ev.StateChanged):
            event(self.module_log, "state_changed", old=e.old.name, new=e.new.name)
        elif isinstance(e, ev.PeerDown):
            event(self.module_log, "peer_down", logging.WARNING, peer=e.name)
        elif isinstance(e, ev.PeerUp):
            event(self.module_log, "peer_up", peer=e.name, restarted=e.restarted)
        elif isinstance(e, ev.NetworkLost):
            event(self.module_log, "network_lost", logging.WARNING, peer=e.name, network=e.network)
        elif isinstance(e, ev.NetworkRestored):
            event(self.module_log, "network_restored", peer=e.name, network=e.network)
        elif isinstance(e, ev.ViewChanged):
            members = ",".join(f"{n}:{w}" for n, w in e.members)
            event(self.module_log, "view_changed", members=members, anchored=e.anchored)
        elif isinstance(e, ev.SplitBrainDetected):
            event(
                self.module_log,
                "split_brain_detected",
                logging.ERROR,
                buckets=len(e.buckets),
                nodes=",".join(e.nodes),
            )
        elif isinstance(e, ev.SplitBrainHealed):
            event(self.module_log, "split_brain_healed")
        elif isinstance(e, ev.LeaseLost):
            event(self.module_log, "lease_lost", logging.ERROR, silent_s=round(e.silent_s, 3))

    async def _finish_drain(self) -> None:
        """Every bucket is gone: let established connections finish, then stop the app."""
        deadline = time.monotonic() + self.config.drain.timeout_s
        vips = self.datapath.spec.vips
        while not self._force and time.monotonic() < deadline:
            left = busy_connections(vips)
            if left == 0:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        left = busy_connections(vips)
        event(self.module_log, "drained", connections_left=left, forced=self._force)
        await self.supervisor.stop()
        self.core.stopped(time.monotonic())
        self._force = False
        self._wake.set()
        if self._exit_after_stop:
            self._exit.set()

    def _on_app_event(self, e: SupervisorEvent) -> None:
        now = time.monotonic()
        if isinstance(e, Healthy):
            self._app_ok = True
        elif isinstance(e, Unhealthy | Restarting | Exhausted):
            self._app_ok = False
        self.core.set_app_healthy(self._app_ok and self._link_ok, now)
        if isinstance(e, Exhausted):
            event(self.module_log, "leaving_farm", logging.ERROR, reason="restart policy exhausted")
            self.core.leave(now)
        self._wake.set()

    def _check_link(self, now: float) -> None:
        """A node whose LAN link is down can serve nobody, and would otherwise believe every
        peer dead and claim every bucket, then accept the same new flows as its peers for a
        moment when the link returns. So it counts as unhealthy (WAIT: it releases everything)
        until the link is back, and then rejoins through the normal release-before-acquire."""
        ok = link_up(self.datapath.spec.interface)
        if ok == self._link_ok:
            return
        self._link_ok = ok
        iface = self.datapath.spec.interface
        event(self.module_log, "lan_link_up" if ok else "lan_link_down",
              logging.INFO if ok else logging.ERROR, interface=iface)  # fmt: skip
        self.core.set_app_healthy(self._app_ok and ok, now)

    # ------------------------------------------------------------------ control commands
    async def _cmd_state(self, args: dict[str, Any]) -> Any:
        now = time.monotonic()
        snap = self.core.snapshot(now)
        b = self.config.farm.buckets
        own_share = round(100.0 * len(self.kernel_owned) / b, 2)
        farm = []
        for n in snap["nodes"]:
            # A node nobody hears is out of the farm, whatever it last said.
            farm.append(
                {
                    "node": n["name"],
                    "state": (n["state"] or "STOP") if n["alive"] else "STOP",
                    "share": own_share if n["self"] else n["share"],
                    "alive": n["alive"],
                    "incarnation": n["incarnation"],
                    "weight": n["weight"],
                    "heartbeat_age_ms": n["heartbeat_age_ms"],
                }
            )
        return {
            "farm_name": self.config.farm.name,
            "node": self.node.name,
            "state": snap["state"],
            "share": own_share,
            "app": self.supervisor.state.value,
            "owned": sorted(self.kernel_owned),
            "split_brain": snap["split_brain"],
            "drops": snap["drops"],
            "counters": dict(self.counters),
            "farm": farm,
        }

    async def _cmd_start(self, args: dict[str, Any]) -> Any:
        state = self.core.state
        if state is not NodeState.STOP:
            raise ControlError(f"node {self.node.name} is {state.name}, not STOP: nothing to start")
        await self.supervisor.start()
        self.core.join(time.monotonic())
        self._wake.set()
        return {"state": self.core.state.name}

    async def _cmd_stop(self, args: dict[str, Any]) -> Any:
        force = bool(args.get("force"))
        state = self.core.state
        if state is NodeState.STOP:
            raise ControlError(f"node {self.node.name} is already STOP")
        if force:
            self._force = True
        if state is not NodeState.DRAINING:
            self.core.leave(time.monotonic())
        self._wake.set()
        return {"state": self.core.state.name, "force": force}

    async def _cmd_logs(self, args: dict[str, Any]) -> Any:
        return {
            "module": str(self.log_dir / "module.log"),
            "app": str(self.log_dir / "app.log"),
        }


def default_dirs(farm: str, node: str) -> tuple[Path, Path]:
    """Per farm *and node*, so several nodes of one farm can share a filesystem (the lab)."""
    return Path("/run/vipfarm") / farm / node, Path("/var/log/vipfarm") / farm / node
