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

Remote control: the daemon is the `NodeService` of `vipfarm.api.app`. The same methods (`status`,
`start`, `stop`, `deploy`, ...) serve the local control socket (through `_local`, which validates
the arguments into the same request models) and, when the configuration has an `[api]` section,
the HTTP API, which uvicorn serves on this loop. Configuration deployment (`vipfarm.node.deploy`)
prepares and commits here; after a commit the live part is applied in place (rules and VIPs
through `DatapathService.update`, which keeps the leases, the weight through the core) and the
file is rewritten with its new version. When a peer comes up (`PeerUp`), its state is asked over
its API: a peer with a newer configuration version means this node missed a deployment, so it
fetches that configuration, validates it like a prepare and applies it (rejoin sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vipfarm.api.logs import read_page
from vipfarm.api.models import (
    AbortRequest,
    Ack,
    ActionResult,
    CommitReply,
    CommitRequest,
    ConfigInfo,
    DeployRequest,
    DeployResult,
    FarmNode,
    LogName,
    LogPage,
    LogQuery,
    NodeStatus,
    PrepareReply,
    PrepareRequest,
    StopRequest,
)
from vipfarm.config.loading import parse_config
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import FarmConfig, NodeSection
from vipfarm.datapath.kernel import Kernel
from vipfarm.datapath.service import DatapathService
from vipfarm.errors import VipfarmError
from vipfarm.log import event
from vipfarm.membership import events as ev
from vipfarm.membership.core import Membership, MembershipConfig
from vipfarm.membership.wire import NodeState
from vipfarm.node import deploy as dep
from vipfarm.node import sdnotify
from vipfarm.node import support as snap_mod
from vipfarm.node.control import ControlError, ControlServer, Handler
from vipfarm.node.host import busy_connections, link_up, local_addresses, next_incarnation
from vipfarm.node.metrics import FlowCounters, Metrics, NodeFacts
from vipfarm.supervisor import (
    AppSupervisor,
    Exhausted,
    Healthy,
    Restarting,
    ScriptFinished,
    SupervisorEvent,
    Unhealthy,
    setup_node_logs,
)

log = logging.getLogger("vipfarm.node.daemon")

DRAIN_POLL_S = 0.2
PEER_STATE_TIMEOUT_S = 2.0


class DaemonError(VipfarmError):
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
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.config_path = config_path
        self.config_text = config_path.read_text() if config_path else ""
        self.config_version, body = dep.split_version(self.config_text)
        self.config_digest = dep.digest(body)
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.module_log, self.app_log = setup_node_logs(log_dir)
        self.counters: dict[str, int] = {"heartbeat_send_errors": 0, "datapath_errors": 0}
        self.hb_sent: Counter[str] = Counter()
        self.hb_received: Counter[str] = Counter()
        self.hb_rejected: Counter[tuple[str, str]] = Counter()  # (network, reason)
        self.core_events: Counter[str] = Counter()
        self._drops_seen: dict[str, int] = {}
        self.metrics = Metrics()
        self._flows = FlowCounters()
        self.datapath = DatapathService(config.datapath_spec(node), run_dir / "datapath", kernel)
        self.incarnation = next_incarnation(run_dir / "incarnation")
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
        # Up "forever" at start: a fresh start is protected by the core's own listening period.
        self._link_up_since: float | None = -math.inf
        self.control = ControlServer(
            config.farm.name,
            {
                "state": self._local(self.status),
                "farm": self._local(self.farm_status),
                "start": self._local(self.start),
                "stop": self._local(self.stop, StopRequest),
                "log_page": self._local(self.log_page, LogQuery),
                "config": self._local(self.config_info),
                "deploy": self._local(self.deploy, DeployRequest),
                "snapshot": self._cmd_snapshot,
            },
            mutating={"start", "stop", "deploy", "snapshot"},
        )
        self.api_server: Any = None  # vipfarm.api.server.ApiServer, imported only when used
        self.peers_http: Any = None  # vipfarm.api.client.PeerClient
        self._prepared = dep.PreparedSlot()
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._peers: dict[str, list[tuple[str, int]]] = {}
        self._wake = asyncio.Event()
        self._exit = asyncio.Event()
        self._force = False
        self._drain_task: asyncio.Task[None] | None = None
        self._app_stopping = False
        self._exit_after_stop = False

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        await self.datapath.start(())
        try:
            await self.control.start()
            try:
                await self._start_api()
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
                # Stopped cleanly and holding nothing: say goodbye, so peers need not wait
                # dead_after to drop this node (the core sends nothing if buckets are held).
                self._send(self.core.shutdown(time.monotonic()))
            finally:
                sdnotify.notify("STOPPING=1")
                self._closing = True
                for task in list(self._tasks):
                    task.cancel()
                await self.supervisor.stop()
                self.supervisor.close()
                for tr in self._transports.values():
                    tr.close()
                await self._stop_api()
                await self.control.close()
        finally:
            self.datapath.stop()
            event(self.module_log, "daemon_stopped", node=self.node.name)

    async def _start_api(self) -> None:
        api = self.config.api
        if api is None:
            return
        from vipfarm.api.app import create_app
        from vipfarm.api.client import PeerClient, tls_verify
        from vipfarm.api.server import ApiServer

        addr = self.config.api_address(self.node)
        assert addr is not None
        token = api.token()
        try:
            text_token = token.decode("ascii")
        except UnicodeDecodeError:
            raise DaemonError(
                f"the API token in {api.token_file} is not ASCII text: a bearer token must be "
                "(e.g. head -c 32 /dev/urandom | base64)"
            ) from None
        app = create_app(self, token, metrics_public=api.metrics_public)
        server = ApiServer(app, addr, api.port, cert_file=api.cert_file, key_file=api.key_file)
        try:
            await server.start()
        except OSError as e:
            raise DaemonError(
                f"cannot listen for the API on {addr} port {api.port}: {e.strerror}; is another "
                "daemon using the port? (change api.port)"
            ) from e
        self.api_server = server
        self.peers_http = PeerClient(
            text_token, port=api.port, tls=api.tls, verify=tls_verify(api.ca_file, False)
        )

    async def _stop_api(self) -> None:
        if self.api_server is not None:
            await self.api_server.stop()
            self.api_server = None
        if self.peers_http is not None:
            await self.peers_http.aclose()
            self.peers_http = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task the daemon keeps a reference to, and cancels when it stops."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self.hb_received[network] += 1
        self.core.receive_datagram(data, network, now)
        drops = self.core.drops
        if drops != self._drops_seen:  # rare: only rejected datagrams change it
            for reason, n in drops.items():
                if n != self._drops_seen.get(reason, 0):
                    self.hb_rejected[(network, str(reason))] += n - self._drops_seen.get(reason, 0)
            self._drops_seen = dict(drops)
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send what the core wants sent, renew leases, and apply the core's events."""
        out = self.core.datagrams_to_send(now)
        if out:
            self._renew_leases()
            self._send(out)
        while (e := self.core.next_event()) is not None:
            self._on_core_event(e, now)

    def _send(self, out: list[tuple[str, bytes]]) -> None:
        for network, payload in out:
            tr = self._transports.get(network)
            if tr is None:
                continue
            for peer in self._peers[network]:
                try:
                    tr.sendto(payload, peer)
                    self.hb_sent[network] += 1
                except OSError:
                    self.counters["heartbeat_send_errors"] += 1

    def _renew_leases(self) -> None:
        try:
            self.kernel_owned = self.datapath.refresh()
        except Exception as e:  # the kernel refused: leases run out, which is the safe side
            self.counters["datapath_errors"] += 1
            event(self.module_log, "lease_renew_failed", logging.ERROR, error=e)

    def _on_core_event(self, e: ev.Event, now: float) -> None:
        self.core_events[type(e).__name__] += 1
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
            if self.peers_http is not None:
                self._spawn(self._sync_from(e.name))
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
        self._app_stopping = True  # from here on a `start` must wait for STOP
        await self.supervisor.stop()
        self._app_stopping = False
        self.core.stopped(time.monotonic())
        self._force = False
        self._wake.set()
        if self._exit_after_stop:
            self._exit.set()

    def _on_app_event(self, e: SupervisorEvent) -> None:
        if isinstance(e, ScriptFinished):
            self.metrics.observe_script(e.result.name, e.result.duration_s, e.result.ok)
            return
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
        moment when the link returns. So it counts as unhealthy (WAIT: it holds nothing) while
        the link is down, and stays so for dead_after + 2 intervals after the link is back:
        long enough to hear every live peer again (peers it declared dead while it heard
        nobody), so that it rejoins through the normal release-before-acquire instead of
        claiming buckets whose owners it merely could not hear (found by `vipfarm chaos`)."""
        iface = self.datapath.spec.interface
        up = link_up(iface)
        if not up:
            self._link_up_since = None
        elif self._link_up_since is None:
            self._link_up_since = now
        t = self.config.timing
        settle_s = (t.dead_after_ms + 2 * t.interval_ms) / 1000
        ok = up and self._link_up_since is not None and now - self._link_up_since >= settle_s
        if ok == self._link_ok:
            return
        self._link_ok = ok
        if not ok:
            event(self.module_log, "lan_link_down", logging.ERROR, interface=iface)
        else:
            event(self.module_log, "lan_link_up", interface=iface, settled_s=settle_s)
        self.core.set_app_healthy(self._app_ok and ok, now)

    # ------------------------------------------------------------------ node service
    # The methods below are the node's whole control surface: the control socket calls them
    # through `_local`, the HTTP API (vipfarm.api.app) directly.

    @property
    def closing(self) -> bool:
        return self._closing

    def _local(
        self, method: Callable[..., Awaitable[BaseModel]], request: type[BaseModel] | None = None
    ) -> Handler:
        """A control-socket handler: arguments into the request model, the answer as JSON."""

        async def handler(args: dict[str, Any]) -> Any:
            try:
                call = method(request.model_validate(args)) if request else method()
            except ValidationError as e:
                raise ControlError(f"bad arguments: {e}") from None
            try:
                return (await call).model_dump(mode="json")
            except ConfigError as e:
                raise ControlError(str(e)) from None

        return handler

    async def status(self) -> NodeStatus:
        now = time.monotonic()
        snap = self.core.snapshot(now)
        b = self.config.farm.buckets
        own_share = round(100.0 * len(self.kernel_owned) / b, 2)
        farm = [
            FarmNode(
                node=n["name"],
                # A node nobody hears is out of the farm, whatever it last said.
                state=(n["state"] or "STOP") if n["alive"] else "STOP",
                share=own_share if n["self"] else n["share"],
                alive=n["alive"],
                incarnation=n["incarnation"],
                weight=n["weight"],
                heartbeat_age_ms=n["heartbeat_age_ms"],
                config_version=self.config_version if n["self"] else None,
            )
            for n in snap["nodes"]
        ]
        return NodeStatus(
            farm_name=self.config.farm.name,
            node=self.node.name,
            state=snap["state"],
            share=own_share,
            app=self.supervisor.state.value,
            owned=sorted(self.kernel_owned),
            split_brain=snap["split_brain"],
            drops={str(k): v for k, v in snap["drops"].items()},
            counters=dict(self.counters),
            config_version=self.config_version,
            config_digest=self.config_digest,
            farm=farm,
        )

    async def farm_status(self) -> NodeStatus:
        """`status`, with every peer's configuration version asked over its API."""
        st = await self.status()
        if self.peers_http is None:
            return st

        async def version_of(name: str) -> int | None:
            addr = self.config.api_address(name)
            assert addr is not None
            try:
                peer = await self.peers_http.call(
                    "GET", addr, "/state", NodeStatus, timeout=PEER_STATE_TIMEOUT_S
                )
            except (dep.Refused, dep.Unreachable):
                return None
            return int(peer.config_version)

        peers = [n for n in st.farm if n.node != self.node.name]
        versions = await asyncio.gather(*(version_of(n.node) for n in peers))
        for n, v in zip(peers, versions, strict=True):
            n.config_version = v
        return st

    async def start(self) -> ActionResult:
        state = self.core.state
        draining = state in (NodeState.DRAINING, NodeState.STOPPING)
        if draining and not self._app_stopping and not self._exit_after_stop:
            # `start` during a drain cancels it: the application still runs, so the node
            # rejoins at once (WAIT, then UP through the usual release-before-acquire).
            if self._drain_task is not None:
                self._drain_task.cancel()
            self._force = False
            self.core.join(time.monotonic())
            self._wake.set()
            event(self.module_log, "drain_cancelled", state=state.name)
            return ActionResult(node=self.node.name, state=self.core.state.name)
        if state is not NodeState.STOP:
            raise ControlError(
                f"node {self.node.name} is {state.name}, not STOP: nothing to start"
                + (
                    " (it is stopping its application: start it once it is STOP)"
                    if draining
                    else ""
                )
            )
        await self.supervisor.start()
        self.core.join(time.monotonic())
        self._wake.set()
        return ActionResult(node=self.node.name, state=self.core.state.name)

    async def stop(self, req: StopRequest) -> ActionResult:
        state = self.core.state
        if state is NodeState.STOP:
            raise ControlError(f"node {self.node.name} is already STOP")
        if req.force:
            self._force = True
        if state is not NodeState.DRAINING:
            self.core.leave(time.monotonic())
        self._wake.set()
        return ActionResult(node=self.node.name, state=self.core.state.name, force=req.force)

    def log_path(self, log: LogName) -> Path:
        return self.log_dir / f"{log}.log"

    async def log_page(self, q: LogQuery) -> LogPage:
        return await asyncio.to_thread(read_page, self.log_path(q.log), q.log, q.offset, q.limit)

    async def config_info(self) -> ConfigInfo:
        return ConfigInfo(
            version=self.config_version,
            digest=self.config_digest,
            path=str(self.config_path or ""),
            text=self.config_text,
        )

    # ---- configuration deployment (vipfarm.node.deploy)

    def _validate(self, text: str) -> tuple[FarmConfig, list[str]]:
        """Blocking (reads files and netlink): run it in a worker thread."""
        assert self.config_path is not None
        return dep.validate_for_node(
            text,
            base_dir=self.config_path.parent,
            node=self.node.name,
            running=self.config,
            local_addresses=local_addresses,
        )

    def _need_file(self) -> Path:
        if self.config_path is None:
            raise ControlError(
                f"node {self.node.name}'s daemon was not started from a configuration file: "
                "it cannot take a deployment"
            )
        return self.config_path

    async def deploy(self, req: DeployRequest) -> DeployResult:
        """Coordinate a deployment to every node (this one included)."""
        path = self._need_file()
        _, body = dep.split_version(req.text)  # a copy from `config get` carries an old one
        # The file itself first, so that a broken file is a clear 422 before any node is asked.
        await asyncio.to_thread(
            parse_config, body, base_dir=path.parent, source="the deployed configuration"
        )
        alive = {n.node: n.alive for n in (await self.status()).farm}
        participants: list[dep.Participant] = [_LocalParticipant(self)]
        for n in self.config.nodes:
            if n.name == self.node.name:
                continue
            if self.peers_http is None:
                raise ControlError(
                    "the configuration has no [api] section, so the other nodes cannot be "
                    "reached: add one (see docs/CONFIG.md) and restart the daemons"
                )
            from vipfarm.api.client import RemoteNode

            addr = self.config.api_address(n)
            assert addr is not None
            participants.append(RemoteNode(n.name, addr, alive.get(n.name, False), self.peers_http))
        result = await dep.coordinate(body, self.node.name, participants, dry_run=req.dry_run)
        event(
            self.module_log,
            "config_deployed" if not req.dry_run else "config_checked",
            version=result.version,
            ok=result.ok,
            nodes=",".join(f"{v.node}:{v.outcome}" for v in result.nodes),
        )
        return result

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        self._need_file()
        try:
            new, changes = await asyncio.to_thread(self._validate, req.text)
            self._prepared.hold(req.deploy_id, req.origin, new, req.text, changes)
        except dep.Refused as e:
            event(self.module_log, "config_refused", logging.WARNING, origin=req.origin, why=e)
            raise ControlError(str(e)) from None
        return PrepareReply(
            node=self.node.name,
            version=self.config_version,
            digest=dep.digest(req.text),
            changes=changes,
        )

    async def commit(self, req: CommitRequest) -> CommitReply:
        self._need_file()
        async with self._config_lock:
            try:
                p = self._prepared.take(req.deploy_id)
            except dep.Refused as e:
                raise ControlError(str(e)) from None
            if req.version <= self.config_version:
                raise ControlError(
                    f"version {req.version} is not newer than node {self.node.name}'s "
                    f"{self.config_version}: deploy again"
                )
            await self._apply(p.config, p.body, req.version, p.origin, p.changes)
        return CommitReply(
            node=self.node.name,
            version=self.config_version,
            digest=self.config_digest,
            changes=p.changes,
        )

    async def abort(self, req: AbortRequest) -> Ack:
        self._prepared.drop(req.deploy_id)
        return Ack(node=self.node.name)

    async def _apply(
        self, new: FarmConfig, body: str, version: int, origin: str, changes: list[str]
    ) -> None:
        """Apply the live part, then write the file; on failure put the old state back."""
        path = self._need_file()
        old = self.config
        self._apply_live(new)
        text = dep.with_version(body, version, origin)
        try:
            await asyncio.to_thread(dep.write_atomically, path, text)
        except OSError as e:
            self._apply_live(old)
            raise ControlError(f"cannot write {path}: {e.strerror}") from None
        self.config_text, self.config_version, self.config_digest = text, version, dep.digest(body)
        event(
            self.module_log,
            "config_applied",
            version=version,
            digest=self.config_digest,
            origin=origin,
            changes=",".join(changes) or "-",
        )

    def _apply_live(self, new: FarmConfig) -> None:
        spec = new.datapath_spec(self.node.name)
        if spec != self.datapath.spec:
            old_spec = self.datapath.spec
            try:
                self.kernel_owned = self.datapath.update(spec)
            except Exception as e:
                self.counters["datapath_errors"] += 1
                event(self.module_log, "datapath_update_failed", logging.ERROR, error=e)
                with contextlib.suppress(Exception):
                    self.kernel_owned = self.datapath.update(old_spec)
                raise ControlError(f"the kernel refused the new rules: {e}") from None
        weight = new.node(self.node.name).weight
        if weight != self.core.weight:
            self.core.set_weight(weight, time.monotonic())
            self._wake.set()
        self.config = new
        self.node = new.node(self.node.name)

    async def _sync_from(self, peer: str) -> None:
        """Rejoin sync: take a newer configuration version from a peer that just came up."""
        addr = self.config.api_address(peer)
        assert addr is not None and self.peers_http is not None
        try:
            st = await self.peers_http.call("GET", addr, "/state", NodeStatus)
            if st.config_version <= self.config_version or self.config_path is None:
                return
            async with self._config_lock:
                if st.config_version <= self.config_version or self._prepared.busy:
                    return  # another sync won, or a deployment will bring us along
                info = await self.peers_http.call("GET", addr, "/config", ConfigInfo)
                version, body = dep.split_version(info.text)
                if version <= self.config_version:
                    return
                new, changes = await asyncio.to_thread(self._validate, body)
                await self._apply(new, body, version, f"{peer} (rejoin sync)", changes)
        except Exception as e:  # a background task: count and log, never lose it silently
            self.counters["config_sync_errors"] = self.counters.get("config_sync_errors", 0) + 1
            event(self.module_log, "config_sync_failed", logging.WARNING, peer=peer, error=e)

    # ---- support and metrics

    async def snapshot(self) -> bytes:
        state = (await self.status()).model_dump(mode="json")
        metrics = await self.metrics_text()
        return await asyncio.to_thread(
            snap_mod.build,
            farm=self.config.farm.name,
            node=self.node.name,
            state=state,
            config_text=self.config_text,
            logs={log: self.log_path(log) for log in ("module", "app")},
            metrics=metrics,
        )

    async def _cmd_snapshot(self, args: dict[str, Any]) -> Any:
        import base64

        return {"tar_gz_base64": base64.b64encode(await self.snapshot()).decode()}

    async def metrics_text(self) -> bytes:
        spec = self.datapath.spec
        try:
            flows = await asyncio.to_thread(self._flows.read, spec.farm, spec.rules)
        except Exception as e:  # a scrape must not fail for want of kernel counters
            self.counters["metrics_errors"] = self.counters.get("metrics_errors", 0) + 1
            event(self.module_log, "flow_counters_failed", logging.WARNING, error=e)
            flows = {}
        snap = self.core.snapshot(time.monotonic())
        checkers = self.supervisor.checker_results()
        return self.metrics.render(
            NodeFacts(
                state=self.core.state.name,
                app_state=self.supervisor.state.value,
                buckets_owned=len(self.kernel_owned),
                buckets=self.config.farm.buckets,
                config_version=self.config_version,
                split_brain=bool(snap["split_brain"]),
                peers_alive={n["name"]: n["alive"] for n in snap["nodes"] if not n["self"]},
                hb_sent=self.hb_sent,
                hb_received=self.hb_received,
                hb_rejected=self.hb_rejected,
                errors=self.counters,
                events=self.core_events,
                flows=flows,
                checkers=checkers,
            )
        )


class _LocalParticipant:
    """The coordinating node itself, called directly (`vipfarm.node.deploy.Participant`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.name = daemon.node.name
        self.alive = True
        self._d = daemon

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        try:
            return await self._d.prepare(req)
        except ControlError as e:
            raise dep.Refused(str(e)) from None

    async def commit(self, req: CommitRequest) -> CommitReply:
        try:
            return await self._d.commit(req)
        except ControlError as e:
            raise dep.Refused(str(e)) from None

    async def abort(self, req: AbortRequest) -> None:
        await self._d.abort(req)


def default_dirs(farm: str, node: str) -> tuple[Path, Path]:
    """Per farm *and node*, so several nodes of one farm can share a filesystem (the lab)."""
    return Path("/run/vipfarm") / farm / node, Path("/var/log/vipfarm") / farm / node
