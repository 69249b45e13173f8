"""The manager: the process of a node that runs everything the operator touches.

Theory of operation
-------------------
The manager runs the management plane: the application supervisor and its checkers, the local
control socket and the HTTP API (and the console), configuration deployment, logs, metrics and
support snapshots. Whatever it does, however slowly, cannot delay a heartbeat: the heartbeats,
the membership core and the kernel leases live in the pulse (`vipfarm.node.pulse`), a process of
its own, which the manager talks to over the local channel (`vipfarm.node.channel`).

* The manager holds the node's desired state: in the farm or not (`vipfarm start`/`stop`), and
  the application's health as its supervisor sees it. It says both on every connection to the
  pulse and repeats the health every `channel.KEEPALIVE_S`, which is also its sign of life: a
  pulse that stops hearing it gives the node's buckets away.
* It writes the module log, its own events and the pulse's (`Event` messages), and reacts to two
  of them: `buckets_given_away` (a drain gave every bucket away: let established connections
  finish, stop the application, tell the pulse `Stopped`) and `peer_up` (ask the peer for its
  configuration version: a newer one means this node missed a deployment, so it fetches it,
  validates it like a prepare and applies it: rejoin sync).
* What it reports is what the pulse answers (`Query`): the core's view and the buckets the
  kernel holds, read back. A pulse that does not answer within `PULSE_QUERY_TIMEOUT_S` is
  reported as such, with its last answer: `vipfarm state` never waits on anything dead.
* Deployments are prepared and committed here (`vipfarm.node.deploy`); the live part goes to the
  pulse (`ApplyConfig`: rules and VIPs with the leases kept, and the weight), then the file is
  rewritten with its new version.
* The API's tokens and limits are objects the API reads on every request and connection
  (`vipfarm.api.guard`); a deployment that changes them replaces their contents once the
  file is written, so a token rotation needs no restart. Node-to-node calls send the next
  token of a rotation first (`vipfarm.api.client.PeerClient`).
* SIGTERM drains: leave, wait for `buckets_given_away`, let connections finish, stop the
  application, tell the pulse `Stopped` then `Shutdown`, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from vipfarm.api.guard import Counters, Limits, Tokens, fingerprint
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
    NodeProcesses,
    NodeStatus,
    PrepareReply,
    PrepareRequest,
    StopRequest,
)
from vipfarm.config.loading import load_config, parse_config
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import FarmConfig
from vipfarm.errors import VipfarmError
from vipfarm.files import write_atomic
from vipfarm.log import event
from vipfarm.membership.events import Snapshot
from vipfarm.node import channel as ch
from vipfarm.node import deploy as dep
from vipfarm.node import sdnotify
from vipfarm.node.control import ControlError, ControlServer, Handler
from vipfarm.node.host import busy_connections, die_with_parent, local_addresses
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

log = logging.getLogger("vipfarm.manager")

DRAIN_POLL_S = 0.2
RESTART_HANDOVER_S = 3.0  # an application restart waits at most this for the buckets to go
PEER_STATE_TIMEOUT_S = 2.0
PULSE_QUERY_TIMEOUT_S = 0.5
PULSE_APPLY_TIMEOUT_S = 10.0
RECONNECT_S = 0.1
_SNAPSHOT = TypeAdapter(Snapshot)


# The control socket's commands that change the node, and those any local user may run:
# read-only, and nothing the configuration file or the logs protect. Every other command
# (log_page and config too) is root's (vipfarm.node.control: who may do what).
CONTROL_MUTATING = frozenset({"start", "stop", "deploy", "snapshot"})
CONTROL_PUBLIC = frozenset({"state", "farm"})


class ManagerError(VipfarmError):
    """The manager cannot run; the text says why and what to do."""


class PulseUnavailable(ControlError):
    """The pulse is not connected or did not answer in time."""


class PulseLink:
    """The manager's end of the channel: reconnects forever, requests with replies."""

    def __init__(
        self, path: Path, on_connect: Callable[[], None], on_event: Callable[[ch.Event], None]
    ):
        self.path = path
        self._on_connect = on_connect
        self._on_event = on_event
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[ch.Reply]] = {}
        self._next_id = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def send(self, msg: ch.Health | ch.Join | ch.Leave | ch.Stopped | ch.Shutdown) -> bool:
        if not self.connected:
            return False
        assert self._writer is not None
        self._writer.write(ch.encode(msg))
        return True

    async def request(
        self, make: Callable[[int], ch.Query | ch.ApplyConfig | ch.Join | ch.Leave], timeout: float
    ) -> ch.Reply:
        if not self.connected:
            raise PulseUnavailable("the pulse is not running (the daemon restarts it)")
        assert self._writer is not None
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[ch.Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(ch.encode(make(rid)))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PulseUnavailable(f"the pulse did not answer within {timeout} s") from None
        finally:
            self._pending.pop(rid, None)

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(self.path), limit=ch.MAX_FRAME + 4
                )
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                writer.write(ch.encode(ch.Hello(role="manager", pid=os.getpid())))
                hello = await asyncio.wait_for(ch.read(reader), timeout=5.0)
                if not isinstance(hello, ch.Hello) or hello.role != "pulse":
                    raise ch.ChannelError("the first message must be the pulse's hello")
                self._writer = writer
                self._on_connect()
                while True:
                    msg = await ch.read(reader)
                    if isinstance(msg, ch.Reply):
                        fut = self._pending.get(msg.id)
                        if fut is not None and not fut.done():
                            fut.set_result(msg)
                    elif isinstance(msg, ch.Event):
                        self._on_event(msg)
            except (ch.ChannelError, asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                pass
            finally:
                self._writer = None
                writer.close()
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(PulseUnavailable("the pulse went away"))
            await asyncio.sleep(RECONNECT_S)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Manager:
    def __init__(
        self,
        config: FarmConfig,
        node: str,
        *,
        run_dir: Path,
        log_dir: Path,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.node = config.node(node)
        self.config_path = config_path
        self.config_text = config_path.read_text() if config_path else ""
        self.config_version, body = dep.split_version(self.config_text)
        self.config_digest = dep.digest(body)
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.module_log, self.app_log = setup_node_logs(log_dir)
        self.counters: dict[str, int] = {}
        self.metrics = Metrics()
        self._flows = FlowCounters()
        self.supervisor = AppSupervisor(
            config.app_spec(self.node),
            module_log=self.module_log,
            app_log=self.app_log,
            on_event=self._on_app_event,
        )
        self.pulse = PulseLink(
            run_dir / ch.SOCKET_NAME, self._on_pulse_connect, self._on_pulse_event
        )
        self._pulse_state: dict[str, Any] | None = None
        self._in_farm = not (run_dir / ch.STOPPED_MARK).exists()
        self._app_ok = False
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
            mutating=CONTROL_MUTATING,
            public=CONTROL_PUBLIC,
        )
        self.api_server: Any = None  # vipfarm.api.server.ApiServer, imported only when used
        # What the API reads live: deployments change them in place (tokens, limits).
        self.api_tokens = Tokens(b"")
        self.api_limits = Limits()
        self.api_counters = Counters()
        self.peers_http: Any = None  # vipfarm.api.client.PeerClient
        self._prepared = dep.PreparedSlot()
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._exit = asyncio.Event()
        self._force = False
        self._drain_task: asyncio.Task[None] | None = None
        self._app_stopping = False
        self._exit_after_stop = False

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        await self.control.start()
        try:
            await self._start_api()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._terminate)
            self._spawn(self.pulse.run())
            self._spawn(self._keepalive())
            if self._in_farm:
                await self.supervisor.start()
            sdnotify.notify("READY=1")
            event(
                self.module_log,
                "manager_started",
                farm=self.config.farm.name,
                node=self.node.name,
                pid=os.getpid(),
                in_farm=self._in_farm,
            )
            await self._exit.wait()
            self.pulse.send(ch.Shutdown())
        finally:
            sdnotify.notify("STOPPING=1")
            self._closing = True
            for task in list(self._tasks):
                task.cancel()
            await self.supervisor.stop()
            self.supervisor.close()
            self.pulse.close()
            await self._stop_api()
            await self.control.close()
            event(self.module_log, "manager_stopped", node=self.node.name)

    async def _start_api(self) -> None:
        api = self.config.api
        if api is None:
            return
        from vipfarm.api.app import create_app
        from vipfarm.api.client import PeerClient, tls_verify
        from vipfarm.api.server import ApiServer

        addr = self.config.api_address(self.node)
        assert addr is not None
        try:
            current, upcoming = _api_tokens(self.config)
        except ControlError as e:
            raise ManagerError(str(e)) from None
        self.api_tokens.set(current, upcoming)
        self._set_api_limits(self.config)
        app = create_app(
            self,
            self.api_tokens,
            metrics_public=api.metrics_public,
            limits=self.api_limits,
            counters=self.api_counters,
            node=f"node {self.node.name}",
        )
        peers = [self.config.api_address(n) for n in self.config.nodes]
        server = ApiServer(
            app,
            addr,
            api.port,
            cert_file=api.cert_file,
            key_file=api.key_file,
            limits=self.api_limits,
            counters=self.api_counters,
            peers=[p for p in peers if p is not None],
        )
        try:
            await server.start()
        except OSError as e:
            raise ManagerError(
                f"cannot listen for the API on {addr} port {api.port}: {e.strerror}; is another "
                "daemon using the port? (change api.port)"
            ) from e
        self.api_server = server
        self.peers_http = PeerClient(
            _peer_tokens(self.api_tokens),
            port=api.port,
            tls=api.tls,
            verify=tls_verify(api.ca_file, False),
        )

    def _set_api_limits(self, config: FarmConfig) -> None:
        """The `[api]` limits into the object the running API reads them from (live)."""
        api = config.api
        if api is None:
            return
        for name in (
            "max_body_bytes",
            "max_connections",
            "max_log_streams",
            "header_timeout_s",
            "body_timeout_s",
            "keepalive_timeout_s",
        ):
            setattr(self.api_limits, name, getattr(api, name))

    def _set_api_tokens(self, tokens: tuple[bytes, bytes | None]) -> None:
        """A deployment changed the tokens: the API accepts, and the peer client sends, the
        new set from the next request on."""
        if tokens == (self.api_tokens.current, self.api_tokens.next):
            return
        self.api_tokens.set(*tokens)
        if self.peers_http is not None:
            self.peers_http.set_tokens(_peer_tokens(self.api_tokens))
        event(
            self.module_log,
            "api_tokens_changed",
            accepted=len(self.api_tokens.accepted),
            rotating=self.api_tokens.next is not None,
        )

    async def _stop_api(self) -> None:
        if self.api_server is not None:
            await self.api_server.stop()
            self.api_server = None
        if self.peers_http is not None:
            await self.peers_http.aclose()
            self.peers_http = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task the manager keeps a reference to, and cancels when it stops."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _terminate(self) -> None:
        """SIGTERM: drain, stop the application, then exit."""
        event(self.module_log, "daemon_terminating", state=self._state())
        self._exit_after_stop = True
        self._in_farm = False
        if self._state() == "STOP" or not self.pulse.connected:
            self._exit.set()
        else:
            self.pulse.send(ch.Leave())

    # ------------------------------------------------------------------ the pulse
    async def _keepalive(self) -> None:
        while True:
            self.pulse.send(ch.Health(healthy=self._app_ok))
            await asyncio.sleep(ch.KEEPALIVE_S)

    def _on_pulse_connect(self) -> None:
        """Say the desired state whole: a restarted pulse picks up where the old one was."""
        self.pulse.send(ch.Health(healthy=self._app_ok))
        if self._in_farm:
            self.pulse.send(ch.Join())
        elif self._state() not in ("STOP", "DRAINING", "STOPPING"):
            self.pulse.send(ch.Leave())

    def _on_pulse_event(self, msg: ch.Event) -> None:
        event(self.module_log, msg.name, msg.level, **msg.fields)
        if msg.name == "state_changed":
            self._note_state(str(msg.fields.get("new")))
        elif msg.name == "buckets_given_away":
            if self._drain_task is None or self._drain_task.done():
                self._drain_task = asyncio.create_task(self._finish_drain())
        elif msg.name == "peer_up" and self.peers_http is not None:
            self._spawn(self._sync_from(str(msg.fields["peer"])))

    async def _query(self) -> tuple[dict[str, Any], bool]:
        """The pulse's state, and whether it answered now (else its last answer)."""
        try:
            reply = await self.pulse.request(lambda i: ch.Query(id=i), PULSE_QUERY_TIMEOUT_S)
        except PulseUnavailable:
            if self._pulse_state is None:
                raise
            return self._pulse_state, False
        self._pulse_state = reply.data
        return reply.data, True

    def _note_state(self, state: str) -> None:
        """A state change heard between two queries: keep the last answer current."""
        if self._pulse_state is not None:
            self._pulse_state["snapshot"]["state"] = state

    def _state(self) -> str:
        if self._pulse_state is None:
            return "STOP" if not self.pulse.connected else "STARTING"
        return str(self._pulse_state["snapshot"]["state"])

    async def _finish_drain(self) -> None:
        """Every bucket is gone: let established connections finish, then stop the app."""
        deadline = time.monotonic() + self.config.drain.timeout_s
        vips = self.config.datapath_spec(self.node).vips
        while not self._force and time.monotonic() < deadline:
            left = await asyncio.to_thread(busy_connections, vips)
            if left == 0:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        left = await asyncio.to_thread(busy_connections, vips)
        event(self.module_log, "drained", connections_left=left, forced=self._force)
        self._app_stopping = True  # from here on a `start` must wait for STOP
        await self.supervisor.stop()
        self._app_stopping = False
        self._app_ok = False
        self.pulse.send(ch.Health(healthy=False))
        self.pulse.send(ch.Stopped())
        self._force = False
        if self._exit_after_stop:
            self._exit.set()

    def _on_app_event(self, e: SupervisorEvent) -> None:
        if isinstance(e, ScriptFinished):
            self.metrics.observe_script(e.result.name, e.result.duration_s, e.result.ok)
            return
        if isinstance(e, Healthy):
            self._app_ok = True
        elif isinstance(e, Unhealthy | Restarting | Exhausted):
            self._app_ok = False
        self.pulse.send(ch.Health(healthy=self._app_ok))
        if isinstance(e, Exhausted):
            event(self.module_log, "leaving_farm", logging.ERROR, reason="restart policy exhausted")
            self._in_farm = False
            self.pulse.send(ch.Leave())

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
        data, answered = await self._query()
        snap = _SNAPSHOT.validate_python(data["snapshot"])
        owned = data["kernel_owned"]
        own_share = round(100.0 * len(owned) / self.config.farm.buckets, 2)
        farm = [
            FarmNode(
                node=n.name,
                # A node nobody hears is out of the farm, whatever it last said.
                state=(n.state or "STOP") if n.alive else "STOP",
                share=own_share if n.is_self else n.share,
                alive=n.alive,
                incarnation=n.incarnation,
                weight=n.weight,
                heartbeat_age_ms=n.heartbeat_age_ms,
                config_version=self.config_version if n.is_self else None,
            )
            for n in snap.nodes
        ]
        return NodeStatus(
            farm_name=self.config.farm.name,
            node=self.node.name,
            state=snap.state,
            share=own_share,
            app=self.supervisor.state.value,
            owned=owned,
            kept=data.get("kernel_kept"),
            split_brain=snap.split_brain,
            drops=dict(snap.drops),
            counters={
                **data["counters"],
                **self.counters,
                # What the control socket turned away (other users' floods, bad requests).
                **{f"control_{why}": n for why, n in self.control.refused.items()},
            },
            config_version=self.config_version,
            config_digest=self.config_digest,
            farm=farm,
            processes=NodeProcesses(
                manager_pid=os.getpid(),
                pulse_pid=data["pid"],
                pulse_answered=answered,
                pulse_priority=data["priority"],
                pulse_timer_late_ms=data.get("timer_late_ms"),
            ),
            delivery=data.get("delivery"),
            prefilter=data.get("prefilter"),
        )

    async def farm_status(self) -> NodeStatus:
        """`status`, with every live peer's configuration version asked over its API (a peer
        this node knows to be dead is not asked: its version is None at once)."""
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

        peers = [n for n in st.farm if n.node != self.node.name and n.alive]
        versions = await asyncio.gather(*(version_of(n.node) for n in peers))
        for n, v in zip(peers, versions, strict=True):
            n.config_version = v
        return st

    def _mark_stopped(self, stopped: bool) -> None:
        mark = self.run_dir / ch.STOPPED_MARK
        if stopped:
            mark.touch()
        else:
            mark.unlink(missing_ok=True)

    async def start(self) -> ActionResult:
        state = self._state()
        draining = state in ("DRAINING", "STOPPING")
        if draining and not self._app_stopping and not self._exit_after_stop:
            # `start` during a drain cancels it: the application still runs, so the node
            # rejoins at once (WAIT, then UP through the usual release-before-acquire).
            if self._drain_task is not None:
                self._drain_task.cancel()
            self._force = False
            self._in_farm = True
            self._mark_stopped(False)
            event(self.module_log, "drain_cancelled", state=state)
            return ActionResult(node=self.node.name, state=await self._tell(ch.Join))
        if state != "STOP":
            raise ControlError(
                f"node {self.node.name} is {state}, not STOP: nothing to start"
                + (
                    " (it is stopping its application: start it once it is STOP)"
                    if draining
                    else ""
                )
            )
        await self.supervisor.start()
        self._in_farm = True
        self._mark_stopped(False)
        return ActionResult(node=self.node.name, state=await self._tell(ch.Join))

    async def stop(self, req: StopRequest) -> ActionResult:
        state = self._state()
        if state == "STOP":
            raise ControlError(f"node {self.node.name} is already STOP")
        if req.force:
            self._force = True
        self._in_farm = False
        self._mark_stopped(True)
        return ActionResult(node=self.node.name, state=await self._tell(ch.Leave), force=req.force)

    async def restart_app(self) -> ActionResult:
        """Restart the application of a node in the farm (the web console's action): report it
        unhealthy first, so that its buckets go to the peers (release before acquire) before
        the application stops, then stop and start it; the node rejoins when it is healthy."""
        state = self._state()
        if not self._in_farm or state in ("STOP", "DRAINING", "STOPPING"):
            raise ControlError(f"node {self.node.name} is {state}: start it instead")
        if self._app_stopping:
            raise ControlError(f"node {self.node.name} is stopping its application already")
        event(self.module_log, "app_restart_requested", state=state)
        self._app_ok = False
        self.pulse.send(ch.Health(healthy=False))
        deadline = time.monotonic() + RESTART_HANDOVER_S
        while time.monotonic() < deadline:
            with contextlib.suppress(PulseUnavailable):
                data, _ = await self._query()
                if not data["kernel_owned"]:
                    break
            await asyncio.sleep(DRAIN_POLL_S / 4)
        self._app_stopping = True
        try:
            await self.supervisor.stop()
        finally:
            self._app_stopping = False
        await self.supervisor.start()
        return ActionResult(node=self.node.name, state=self._state())

    async def _tell(self, kind: type[ch.Join] | type[ch.Leave]) -> str:
        """Join or leave now; the state right after. The desired state is recorded already,
        so a pulse that is not connected is told when it connects."""
        try:
            reply = await self.pulse.request(lambda i: kind(id=i), PULSE_QUERY_TIMEOUT_S)
        except PulseUnavailable:
            event(self.module_log, "pulse_not_connected", logging.WARNING, told=kind.__name__)
            return self._state()
        state = str(reply.data["state"])
        self._note_state(state)
        return state

    def log_path(self, log: LogName) -> Path:
        return self.log_dir / f"{log}.log"

    async def log_page(self, q: LogQuery) -> LogPage:
        from vipfarm.api.logs import read_page

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
        new = await asyncio.to_thread(
            parse_config, body, base_dir=path.parent, source="the deployed configuration"
        )
        alive = {n.node: n.alive for n in (await self.status()).farm}
        await self._check_token_retirement(new, alive)
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

    async def _check_token_retirement(self, new: FarmConfig, alive: dict[str, bool]) -> None:
        """A deployment that stops accepting a token needs every node up: a node that is down
        knows only the tokens of its own file, and could never be let back in to fetch the new
        configuration (rejoin sync)."""
        if self.api_server is None or new.api is None:
            return
        try:
            kept = {t for t in await asyncio.to_thread(_api_tokens, new) if t is not None}
        except ControlError:
            return  # every node's prepare refuses it, with the reason
        if set(self.api_tokens.accepted) <= kept:
            return
        down = sorted(n.name for n in self.config.nodes if not alive.get(n.name, False))
        if down:
            raise ControlError(
                f"this deployment retires an API token (the current api.token_file is no longer "
                f"accepted) while {', '.join(down)} {'is' if len(down) == 1 else 'are'} down: "
                "such a node knows only the old token and would be locked out when it comes back. "
                "Bring it back first (it takes the configuration of the rotation's first step), "
                "then deploy again"
            )

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        self._need_file()
        try:
            new, changes = await asyncio.to_thread(self._validate, req.text)
            # A token the API could not use is refused here, not at commit; its fingerprint
            # lets the coordinator see token files that differ between nodes.
            tokens = await asyncio.to_thread(_api_tokens, new) if new.api else None
            self._prepared.hold(req.deploy_id, req.origin, new, req.text, changes)
        except (dep.Refused, ControlError) as e:
            event(self.module_log, "config_refused", logging.WARNING, origin=req.origin, why=e)
            raise ControlError(str(e)) from None
        return PrepareReply(
            node=self.node.name,
            version=self.config_version,
            digest=dep.digest(req.text),
            changes=changes,
            tokens=fingerprint(tokens) if tokens else None,
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
        # Read before anything changes: a token file gone since the prepare fails the commit.
        tokens = await asyncio.to_thread(_api_tokens, new) if self.api_server else None
        await self._apply_live(new)
        text = dep.with_version(body, version, origin)
        try:
            await asyncio.to_thread(write_atomic, path, text)
        except OSError as e:
            await self._apply_live(old)
            raise ControlError(f"cannot write {path}: {e.strerror}") from None
        self.config_text, self.config_version, self.config_digest = text, version, dep.digest(body)
        if tokens is not None:
            self._set_api_tokens(tokens)
            self._set_api_limits(new)
        event(
            self.module_log,
            "config_applied",
            version=version,
            digest=self.config_digest,
            origin=origin,
            changes=",".join(changes) or "-",
        )

    async def _apply_live(self, new: FarmConfig) -> None:
        """The data path and the weight through the pulse (which puts its old state back if
        the kernel refuses), then the manager's own copy."""
        spec = new.datapath_spec(self.node.name).model_dump(mode="json")
        weight = new.node(self.node.name).weight
        farm = new.farm
        reply = await self.pulse.request(
            lambda i: ch.ApplyConfig(
                id=i,
                spec=spec,
                weight=weight,
                key_file=str(farm.key_file),
                next_key_file=None if farm.next_key_file is None else str(farm.next_key_file),
            ),
            PULSE_APPLY_TIMEOUT_S,
        )
        if not reply.ok:
            self.counters["datapath_errors"] = self.counters.get("datapath_errors", 0) + 1
            raise ControlError(reply.error)
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
        from vipfarm.node import support

        state = (await self.status()).model_dump(mode="json")
        metrics = await self.metrics_text()
        return await asyncio.to_thread(
            support.build,
            farm=self.config.farm.name,
            node=self.node.name,
            state=state,
            config_text=self.config_text,
            logs={log: self.log_path(log) for log in ("module", "app")},
            metrics=metrics,
        )

    async def _cmd_snapshot(self, args: dict[str, Any]) -> Any:
        return {"tar_gz_base64": base64.b64encode(await self.snapshot()).decode()}

    async def metrics_text(self) -> bytes:
        spec = self.config.datapath_spec(self.node)
        try:
            flows, foreign = await asyncio.to_thread(self._flows.read, spec.farm, spec.rules)
        except Exception as e:  # a scrape must not fail for want of kernel counters
            self.counters["metrics_errors"] = self.counters.get("metrics_errors", 0) + 1
            event(self.module_log, "flow_counters_failed", logging.WARNING, error=e)
            flows, foreign = {}, 0
        data, _ = await self._query()
        snap = _SNAPSHOT.validate_python(data["snapshot"])
        return self.metrics.render(
            NodeFacts(
                state=snap.state,
                app_state=self.supervisor.state.value,
                buckets_owned=len(data["kernel_owned"]),
                buckets=self.config.farm.buckets,
                config_version=self.config_version,
                split_brain=snap.split_brain,
                peers_alive={n.name: n.alive for n in snap.nodes if not n.is_self},
                hb_sent=data["hb_sent"],
                hb_received=data["hb_received"],
                hb_rejected={(n, r): c for n, r, c in data["hb_rejected"]},
                errors={**data["counters"], **self.counters},
                events=data["core_events"],
                flows=flows,
                # the prefilter's drops never reach the netdev table's counter
                foreign_dropped=foreign + int(data.get("prefilter", {}).get("dropped") or 0),
                checkers=self.supervisor.checker_results(),
                api_refused=dict(self.api_counters.refused),
                api_connections=self.api_counters.connections,
                api_log_streams=self.api_counters.log_streams,
                delivery=data.get("delivery"),
            )
        )


def _api_tokens(config: FarmConfig) -> tuple[bytes, bytes | None]:
    """(token, next token) of `config`'s `[api]`; ControlError names the file and the fix.
    Blocking (reads the files)."""
    api = config.api
    if api is None:
        return b"", None
    tokens: list[bytes | None] = []
    for key, path, read in (
        ("api.token_file", api.token_file, api.token),
        ("api.next_token_file", api.next_token_file, api.next_token),
    ):
        try:
            token = read()
        except OSError as e:
            raise ControlError(f"cannot read {key} {path}: {e.strerror}") from None
        except ValueError as e:  # FileRefused: the file changed since it was validated
            raise ControlError(f"{key}: {e}") from None
        if token is not None and not token.isascii():
            raise ControlError(
                f"the API token in {path} ({key}) is not ASCII text: a bearer token must be "
                "(e.g. head -c 32 /dev/urandom | base64)"
            )
        tokens.append(token)
    assert tokens[0] is not None
    return tokens[0], tokens[1]


def _peer_tokens(tokens: Tokens) -> list[str]:
    """What the node sends its peers, in order: the next token of a rotation first, since
    the current one is the one about to be retired."""
    return [t.decode("ascii") for t in reversed(tokens.accepted)]


class _LocalParticipant:
    """The coordinating node itself, called directly (`vipfarm.node.deploy.Participant`)."""

    def __init__(self, manager: Manager) -> None:
        self.name = manager.node.name
        self.alive = True
        self._m = manager

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        try:
            return await self._m.prepare(req)
        except ControlError as e:
            raise dep.Refused(str(e)) from None

    async def commit(self, req: CommitRequest) -> CommitReply:
        try:
            return await self._m.commit(req)
        except ControlError as e:
            raise dep.Refused(str(e)) from None

    async def abort(self, req: AbortRequest) -> None:
        await self._m.abort(req)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipfarm-manager", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--log-dir", type=Path, required=True)
    args = p.parse_args(argv)
    die_with_parent()
    try:
        cfg = load_config(args.config)
        m = Manager(
            cfg, args.node, run_dir=args.run_dir, log_dir=args.log_dir, config_path=args.config
        )
        asyncio.run(m.run())
    except (ManagerError, ControlError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
