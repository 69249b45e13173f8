"""What the console shows and does, farm-wide, from the node it was loaded from.

Theory of operation
-------------------
The browser talks only to the node that served the page; this module reaches the others
through the node-to-node API (`vipfarm.api.client.PeerClient`, the client deployments use), as
the CLI's `--node` does (and, for the one thing that API lacks, the open connections of a
drain, through the peer's console route `/console/peer/drain`), and the node itself directly
(the same `NodeService` methods the API and the control socket call).

Farm view. A poller runs in the manager while the console is in use: every `TICK_S` it asks
this node for its state (its pulse's view: who is alive on which heartbeat network, states,
shares), and every peer has its own poll loop asking that peer for its own state (application,
configuration version, the buckets its kernel holds). The two are kept apart on purpose: a peer
that hangs delays only its own loop, and a peer this node's pulse declares dead is shown dead at
the next tick without being asked at all. A peer whose API has not answered for
`UNREACHABLE_S` is shown unreachable. Each tick composes one snapshot (`FarmSnapshot`, plain
JSON); subscribers (the server-sent event streams of open pages) are woken when it changes, so
a change reaches the page within one tick plus the stream's latency.

History. Every `SAMPLE_S` the poller also reads each node's metrics (checkers' results, the
new connections its kernel accepted) and keeps one hour of samples per node (`Sample`) for the
charts; while a page is open it reads them every `CHECKERS_S` for the checkers' column. It
notes failovers as it sees them: from the tick a node is first seen dead to the first tick
when the live nodes' shares add up to 100 % again (`observed` entries of the timeline).

Timeline. Built on request from the module logs of every node (their last `TIMELINE_LINES`
lines, through the API): state changes, peers declared dead (one failover line per dead node,
with the time from the first `peer_down` to the last survivor's takeover `buckets_changed`),
deployments, application and daemon restarts, and the actions operators took in the console.

Configuration history. The last `HISTORY` configurations this manager ran or deployed are kept
in memory (version, digest, text), so the console can roll back to one: a rollback is a new
deployment of the old text (versions only grow, so every node takes it as any deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import tarfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from vipfarm.api.models import (
    ActionResult,
    ConfigInfo,
    DeployRequest,
    DeployResult,
    LogName,
    LogPage,
    LogQuery,
    NodeStatus,
    StopRequest,
)
from vipfarm.config.schema import FarmConfig
from vipfarm.datapath.spec import IPAddress
from vipfarm.log import event
from vipfarm.node.deploy import Refused, Unreachable

log = logging.getLogger("vipfarm.console")

TICK_S = 0.25  # farm view refresh while a page is open
IDLE_TICK_S = 5.0  # while none is: the charts' and failovers' history still advances
PEER_TIMEOUT_S = 1.0
UNREACHABLE_S = 1.5
SAMPLE_S = 5.0
CHECKERS_S = 2.0
HISTORY_S = 3600.0
HISTORY = 10
TIMELINE_LINES = 10_000  # the most one log page holds (api.models.MAX_LINES)
TIMELINE_S = 24 * 3600.0
IDLE_STOP_S = 600.0  # the poller stops after this long without a console request


@runtime_checkable
class ConsoleHost(Protocol):
    """What the console needs of the manager (`vipfarm.node.manager.Manager` is one)."""

    config: FarmConfig
    node: Any  # vipfarm.config.schema.NodeSection: this node
    config_path: Path | None
    module_log: logging.Logger
    peers_http: Any  # vipfarm.api.client.PeerClient, None without an [api] section

    @property
    def closing(self) -> bool: ...

    async def status(self) -> NodeStatus: ...
    async def start(self) -> ActionResult: ...
    async def stop(self, req: StopRequest) -> ActionResult: ...
    async def log_page(self, query: LogQuery) -> LogPage: ...
    async def config_info(self) -> ConfigInfo: ...
    async def deploy(self, req: DeployRequest) -> DeployResult: ...
    async def snapshot(self) -> bytes: ...
    async def metrics_text(self) -> bytes: ...


class NodeUnknown(LookupError):
    pass


@dataclass
class Sample:
    t: float
    share: float
    accepted_per_s: float | None


@dataclass
class _PeerState:
    status: NodeStatus | None = None
    answered_at: float = 0.0
    error: str = ""
    task: asyncio.Task[None] | None = None
    since: float = field(default_factory=time.monotonic)


@dataclass
class _NodeHistory:
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=int(HISTORY_S / SAMPLE_S)))
    checkers: list[dict[str, Any]] = field(default_factory=list)
    accepted_total: float | None = None
    accepted_at: float = 0.0
    draining_since: float | None = None
    connections: int | None = None  # open connections left, while draining


_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) (\S+)(.*)$")


def parse_line(line: str) -> tuple[float, str, str, dict[str, str]] | None:
    """(time, level, event, fields) of a module log line; None for anything else."""
    m = _LINE.match(line)
    if m is None:
        return None
    try:
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    except ValueError:
        return None
    fields: dict[str, str] = {}
    for k, v in _KV.findall(m.group(5)):
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = v[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        fields[k] = v
    return t, m.group(3), m.group(4), fields


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], float]:
    """Checkers (label, healthy, last probe ok) and the accepted new flows of a metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    healthy: dict[str, bool] = {}
    last: dict[str, bool] = {}
    accepted = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vipfarm_checker_healthy":
                healthy[s.labels["checker"]] = s.value == 1
            elif s.name == "vipfarm_checker_last_ok":
                last[s.labels["checker"]] = s.value == 1
            elif s.name == "vipfarm_new_flows_total" and s.labels.get("verdict") == "accepted":
                accepted += s.value
    checkers = [{"name": n, "healthy": h, "last_ok": last.get(n)} for n, h in healthy.items()]
    return checkers, accepted


class Farm:
    """The console's farm-wide backend in one manager (see the module docstring)."""

    def __init__(self, host: ConsoleHost, bearer: Callable[[], bytes]) -> None:
        self.host = host
        self._bearer = bearer
        self.snapshot: dict[str, Any] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._peers: dict[str, _PeerState] = {}
        self._history: dict[str, _NodeHistory] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribers = 0
        self._last_use = time.monotonic()
        self._last_sample = 0.0
        self._last_chart = 0.0
        self._drain_task: asyncio.Task[None] | None = None
        self._dead_since: dict[str, float] = {}
        self.observed: deque[dict[str, Any]] = deque(maxlen=1000)
        self.configs: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._raw: httpx.AsyncClient | None = None
        self.me: str = host.node.name

    # ---- life cycle

    def nudge(self) -> None:
        """Wake every poll loop now (a page opened: the idle pace is over)."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def _pause(self) -> None:
        wake = self._wake
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), TICK_S if self.subscribers else IDLE_TICK_S)

    def touch(self) -> None:
        """A console request: make sure the poller runs."""
        self._last_use = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-farm")

    async def close(self) -> None:
        for task in [self._task, *(p.task for p in self._peers.values())]:
            if task is not None:
                task.cancel()
        if self._raw is not None:
            await self._raw.aclose()

    async def wait_change(self, seen: int, timeout: float) -> int:
        """Until the snapshot's version is past `seen` (or `timeout`); the current version."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        else:
            await asyncio.sleep(0)  # a caller looping on this never holds the loop
        return self.version

    async def _run(self) -> None:
        while not self.host.closing:
            if time.monotonic() - self._last_use > IDLE_STOP_S and self.subscribers == 0:
                break
            try:
                await self._tick()
            except Exception as e:  # the poller must outlive any one bad answer
                event(self.host.module_log, "console_tick_failed", logging.WARNING, error=e)
            await self._pause()
        for p in self._peers.values():
            if p.task is not None:
                p.task.cancel()
        self._peers.clear()

    # ---- the farm view

    def address(self, name: str) -> IPAddress:
        try:
            addr = self.host.config.api_address(name)
        except Exception:
            raise NodeUnknown(name) from None
        if addr is None:
            raise NodeUnknown(name)
        return addr

    def node_names(self) -> list[str]:
        return [n.name for n in self.host.config.nodes]

    async def _peer_loop(self, name: str) -> None:
        p = self._peers[name]
        while not self.host.closing:
            alive = self._alive(name)
            if alive and self.host.peers_http is not None:
                try:
                    p.status = await self.host.peers_http.call(
                        "GET", self.address(name), "/state", NodeStatus, timeout=PEER_TIMEOUT_S
                    )
                    p.answered_at = time.monotonic()
                    p.error = ""
                except Exception as e:  # Unreachable, Refused, a bad answer: shown, not raised
                    p.error = str(e) or type(e).__name__
            await self._pause()

    def _alive(self, name: str) -> bool:
        for n in self.snapshot.get("nodes", ()):
            if n["name"] == name:
                return bool(n["alive"])
        return True

    async def _tick(self) -> None:
        local = await self.host.status()
        self.me = local.node
        now = time.monotonic()
        for n in local.farm:
            if n.node != local.node and n.node not in self._peers:
                self._peers[n.node] = p = _PeerState()
                p.task = asyncio.create_task(self._peer_loop(n.node), name=f"console-{n.node}")
        due = now - self._last_sample >= (CHECKERS_S if self.subscribers else SAMPLE_S)
        if due:
            self._last_sample = now
            await self._sample(local, chart=now - self._last_chart >= SAMPLE_S)
            if now - self._last_chart >= SAMPLE_S:
                self._last_chart = now
        snap = self._compose(local, now)
        draining = [n["name"] for n in snap["nodes"] if n["drain_s_left"] is not None]
        if draining and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = asyncio.create_task(self._drain_progress(draining))
        self._note_failovers(snap)
        if snap != self.snapshot:
            self.snapshot = snap
            self.version += 1
            self._changed.set()
            self._changed = asyncio.Event()
        if not self.configs or self.configs[-1]["version"] != local.config_version:
            info = await self.host.config_info()
            self.remember_config(info)

    def remember_config(self, info: ConfigInfo) -> None:
        if any(c["digest"] == info.digest and c["version"] == info.version for c in self.configs):
            return
        self.configs.append(
            {"version": info.version, "digest": info.digest, "text": info.text, "at": time.time()}
        )

    def _compose(self, local: NodeStatus, now: float) -> dict[str, Any]:
        nodes = []
        total = 0.0
        for n in local.farm:
            own = n.node == local.node
            peer = None if own else self._peers.get(n.node)
            st: NodeStatus | None = local if own else (peer.status if peer else None)
            # A peer's API is unreachable when it has not answered for UNREACHABLE_S (from
            # its loop's start: a first answer is given that long to come).
            stale = UNREACHABLE_S + (0.0 if self.subscribers else IDLE_TICK_S)
            reachable = own or (
                peer is not None
                and now - max(peer.answered_at, peer.since) < stale
                and (peer.status is not None or not peer.error)
            )
            if not n.alive:
                reachable = False
            hist = self._history.setdefault(n.node, _NodeHistory())
            state = n.state
            if state in ("DRAINING", "STOPPING"):
                if hist.draining_since is None:
                    hist.draining_since = time.time()
            else:
                hist.draining_since = None
            drain_left = None
            if hist.draining_since is not None:
                drain_left = max(
                    0.0, self.host.config.drain.timeout_s - (time.time() - hist.draining_since)
                )
            owned = st.owned if st is not None and reachable else None
            # The kernel's read-back when the node answered (exact), else its share in the view.
            if not n.alive:
                share = 0.0
            elif owned is not None:
                share = 100.0 * len(owned) / self.host.config.farm.buckets
            else:
                share = n.share
            total += share
            nodes.append(
                {
                    "name": n.node,
                    "self": own,
                    "state": state,
                    "alive": n.alive,
                    "reachable": reachable,
                    "share": share,
                    "weight": n.weight,
                    "heartbeats": {
                        k: (None if v is None else round(v)) for k, v in n.heartbeat_age_ms.items()
                    },
                    "app": st.app if st is not None and reachable else None,
                    "config_version": st.config_version if st is not None and reachable else None,
                    "config_digest": st.config_digest if st is not None and reachable else None,
                    "owned": owned or [],
                    "checkers": hist.checkers if reachable else [],
                    "drain_s_left": None if drain_left is None else round(drain_left),
                    "drain_connections": hist.connections if drain_left is not None else None,
                    "error": "" if own or peer is None else peer.error,
                }
            )
        cfg = self.host.config
        spec = cfg.datapath_spec(local.node)
        return {
            "farm": local.farm_name,
            "me": local.node,
            "buckets": spec.buckets,
            "split_brain": local.split_brain,
            "share_total": round(total, 3),
            "pulse_answered": local.processes.pulse_answered if local.processes else True,
            "nodes": nodes,
            "rules": [
                {
                    "vip": str(r.vip),
                    "proto": r.proto.value,
                    "ports": r.ports_text,
                    "affinity": r.affinity.value,
                }
                for r in spec.rules
            ],
            "vips": sorted({str(r.vip) for r in spec.rules}),
            # directed and auto delivery: mode, answers in use, each VIP's entry, evidence
            "delivery": local.delivery,
        }

    def _note_failovers(self, snap: dict[str, Any]) -> None:
        now = time.time()
        live = [n for n in snap["nodes"] if n["alive"]]
        for n in snap["nodes"]:
            if not n["alive"] and n["name"] not in self._dead_since:
                self._dead_since[n["name"]] = now
            elif n["alive"]:
                self._dead_since.pop(n["name"], None)
        whole = abs(sum(n["share"] for n in live) - 100.0) < 0.6
        for name, since in list(self._dead_since.items()):
            if since <= 0 or not whole:
                continue
            self.observed.append(
                {
                    "t": since,
                    "kind": "failover",
                    "node": name,
                    "text": f"{name} dead: every bucket had a live owner again after "
                    f"{(now - since) * 1000:.0f} ms (seen by the console on {self.me})",
                    "duration_ms": round((now - since) * 1000),
                    "source": "console",
                }
            )
            self._dead_since[name] = -1.0  # noted once until it comes back

    # ---- drain progress

    async def busy_here(self) -> int:
        from vipfarm.node.host import busy_connections

        vips = self.host.config.datapath_spec(self.me).vips
        return await asyncio.to_thread(busy_connections, vips)

    async def _drain_progress(self, names: list[str]) -> None:
        """Open connections left on each draining node (its console's peer route)."""

        async def one(name: str) -> None:
            try:
                if name == self.me:
                    left = await self.busy_here()
                else:
                    raw = await self._raw_get(name, "/console/peer/drain", PEER_TIMEOUT_S)
                    left = int(json.loads(raw)["connections"])
            except Exception:
                left = None  # an older node without the route, or it went away
            self._history.setdefault(name, _NodeHistory()).connections = left

        await asyncio.gather(*(one(n) for n in names))

    # ---- history (charts and checkers)

    async def _sample(self, local: NodeStatus, *, chart: bool) -> None:
        async def one(name: str) -> None:
            try:
                text = (await self.metrics(name)).decode("utf-8", "replace")
                checkers, accepted = parse_metrics(text)
            except Exception:
                return  # a node that does not answer has no sample: a gap in its chart
            hist = self._history.setdefault(name, _NodeHistory())
            hist.checkers = checkers
            if not chart:
                return
            now = time.monotonic()
            rate = None
            if hist.accepted_total is not None and now > hist.accepted_at:
                rate = max(0.0, (accepted - hist.accepted_total) / (now - hist.accepted_at))
            hist.accepted_total, hist.accepted_at = accepted, now
            share = next((n.share for n in local.farm if n.node == name), 0.0)
            hist.samples.append(Sample(time.time(), share, rate))

        alive = [n.node for n in local.farm if n.alive]
        await asyncio.gather(*(one(n) for n in alive))

    def charts(self) -> dict[str, Any]:
        return {
            name: [
                {"t": round(s.t, 1), "share": s.share, "accepted_per_s": s.accepted_per_s}
                for s in h.samples
            ]
            for name, h in self._history.items()
        }

    # ---- per-node calls: this node directly, the others over the API

    def _client(self) -> Any:
        if self.host.peers_http is None:
            raise NodeUnknown("the configuration has no [api] section: no other node is reached")
        return self.host.peers_http

    async def action(self, name: str, action: str) -> ActionResult:
        if name == self.me:
            if action == "start":
                return await self.host.start()
            if action == "restart-app":
                return await self.restart_app_here()
            return await self.host.stop(StopRequest(force=action == "force-stop"))
        if action == "restart-app":
            raw = await self._raw_request(name, "POST", "/console/peer/restart-app", 30.0)
            return ActionResult.model_validate_json(raw)
        addr = self.address(name)
        if action == "start":
            result: ActionResult = await self._client().call("POST", addr, "/start", ActionResult)
        else:
            result = await self._client().call(
                "POST", addr, "/stop", ActionResult, StopRequest(force=action == "force-stop")
            )
        return result

    async def log_page(self, name: str, q: LogQuery) -> LogPage:
        if name == self.me:
            return await self.host.log_page(q)
        params = f"?log={q.log}&limit={q.limit}" + (
            f"&offset={q.offset}" if q.offset is not None else ""
        )
        page: LogPage = await self._client().call(
            "GET", self.address(name), "/logs" + params, LogPage, timeout=5.0
        )
        return page

    async def config_of(self, name: str) -> ConfigInfo:
        if name == self.me:
            return await self.host.config_info()
        info: ConfigInfo = await self._client().call(
            "GET", self.address(name), "/config", ConfigInfo, timeout=5.0
        )
        return info

    async def restart_app_here(self) -> ActionResult:
        restart = getattr(self.host, "restart_app", None)
        if restart is None:
            raise NodeUnknown(f"{self.me} cannot restart its application from the console")
        result: ActionResult = await restart()
        return result

    async def _raw_get(self, name: str, path: str, timeout: float) -> bytes:
        return await self._raw_request(name, "GET", path, timeout)

    async def _raw_request(self, name: str, method: str, path: str, timeout: float) -> bytes:
        """A request outside the JSON node API (metrics, snapshots, the console's peer routes)
        to a peer, with the farm's token; an error answer raises `Refused` with its text."""
        client = self._client()
        if self._raw is None:
            from vipfarm.api.client import tls_verify

            api = self.host.config.api
            self._raw = httpx.AsyncClient(verify=tls_verify(api.ca_file if api else None, False))
        addr = self.address(name)
        host = f"[{addr}]" if addr.version == 6 else str(addr)
        url = f"{client.scheme}://{host}:{client.port}{path}"
        try:
            resp = await self._raw.request(
                method,
                url,
                headers={"Authorization": "Bearer " + self._bearer().decode()},
                timeout=timeout,
            )
        except httpx.TransportError as e:
            raise Unreachable(f"{name}: {str(e) or type(e).__name__}") from None
        if resp.status_code >= 400:
            try:
                detail = str(json.loads(resp.content)["detail"])
            except (ValueError, KeyError, TypeError):
                detail = f"HTTP {resp.status_code}"
            raise Refused(f"{name}: {detail}")
        return resp.content

    async def metrics(self, name: str) -> bytes:
        if name == self.me:
            return await self.host.metrics_text()
        return await self._raw_get(name, "/metrics", PEER_TIMEOUT_S * 2)

    async def snapshot_of(self, name: str) -> bytes:
        if name == self.me:
            return await self.host.snapshot()
        return await self._raw_get(name, "/api/v1/snapshot", 30.0)

    async def snapshot_all(self) -> tuple[bytes, dict[str, str]]:
        """Every node's snapshot in one tar; the nodes that gave none, with why."""
        names = self.node_names()
        results = await asyncio.gather(
            *(self.snapshot_of(n) for n in names), return_exceptions=True
        )
        buf = io.BytesIO()
        failed: dict[str, str] = {}
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, r in zip(names, results, strict=True):
                if isinstance(r, BaseException):
                    failed[name] = str(r) or type(r).__name__
                    continue
                info = tarfile.TarInfo(f"{name}.tar.gz")
                info.size, info.mtime, info.mode = len(r), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(r))
            if failed:
                text = "".join(f"{n}: {why}\n" for n, why in failed.items()).encode()
                info = tarfile.TarInfo("MISSING.txt")
                info.size, info.mtime, info.mode = len(text), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(text))
        return buf.getvalue(), failed

    # ---- the timeline

    async def timeline(self) -> list[dict[str, Any]]:
        names = self.node_names()

        async def lines_of(name: str) -> list[str]:
            try:
                page = await self.log_page(name, LogQuery(log="module", limit=TIMELINE_LINES))
            except Exception:
                return []
            return page.lines

        pages = await asyncio.gather(*(lines_of(n) for n in names))
        entries = timeline_entries(dict(zip(names, pages, strict=True)))
        entries += list(self.observed)
        cutoff = time.time() - TIMELINE_S
        # Newest first; lines of one instant keep their logged order, reversed with the rest.
        order = {id(e): i for i, e in enumerate(entries)}
        entries = [e for e in entries if e["t"] >= cutoff]
        entries.sort(key=lambda e: (e["t"], order[id(e)]), reverse=True)
        return entries


def timeline_entries(logs: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Timeline lines from the module logs of every node (see the module docstring)."""
    out: list[dict[str, Any]] = []
    # failovers: dead peer -> [(observer, peer_down time, takeover time)]
    downs: dict[str, list[tuple[float, float | None]]] = {}
    for node, lines in logs.items():
        pending: list[tuple[str, float]] = []  # peers declared dead, takeover not yet seen
        for line in lines:
            parsed = parse_line(line)
            if parsed is None:
                continue
            t, _level, name, f = parsed
            if name == "state_changed":
                out.append(
                    _entry(t, "state", node, f"{node}: {f.get('old', '?')} → {f.get('new', '?')}")
                )
            elif name == "peer_down":
                pending.append((f.get("peer", "?"), t))
            elif name == "buckets_changed" and pending and f.get("acquired", "0") != "0":
                for peer, t0 in pending:
                    downs.setdefault(peer, []).append((t0, t))
                pending = []
            elif name == "config_applied":
                out.append(
                    _entry(
                        t,
                        "deploy",
                        node,
                        f"{node}: configuration version {f.get('version', '?')} applied "
                        f"(from {f.get('origin', '?')}; changed {f.get('changes', '-')})",
                    )
                )
            elif name == "config_deployed":
                out.append(
                    _entry(
                        t,
                        "deploy",
                        node,
                        f"deployment of version {f.get('version', '?')} from {node}: "
                        f"{'ok' if f.get('ok') == 'True' else 'failed'} ({f.get('nodes', '')})",
                    )
                )
            elif name in ("daemon_started", "manager_started"):
                what = "daemon" if name == "daemon_started" else "manager"
                out.append(_entry(t, "restart", node, f"{node}: {what} started"))
            elif name == "app_state" and f.get("new") in ("starting", "exhausted", "stopped"):
                out.append(
                    _entry(t, "app", node, f"{node}: application {f.get('old')} → {f.get('new')}")
                )
            elif name == "console_action":
                out.append(
                    _entry(
                        t,
                        "action",
                        node,
                        f"{f.get('user', '?')} on {node}'s console: {f.get('action', '?')} "
                        f"{f.get('target', '?')}: {f.get('outcome', '?')}",
                    )
                )
        for peer, t0 in pending:
            downs.setdefault(peer, []).append((t0, None))
    for peer, seen in downs.items():
        seen.sort()
        # One failover per death: peer_down lines of several observers within 5 s of the first.
        group: list[tuple[float, float | None]] = []
        for t0, t1 in [*seen, (float("inf"), None)]:
            if group and t0 - group[0][0] > 5.0:
                start = group[0][0]
                ends = [e for _, e in group if e is not None]
                text = f"failover: {peer} declared dead by {len(group)} node(s)"
                duration = None
                if ends:
                    duration = round((max(ends) - start) * 1000)
                    text += f"; its buckets taken over in {duration} ms"
                e = _entry(start, "failover", peer, text)
                e["duration_ms"] = duration
                out.append(e)
                group = []
            group.append((t0, t1))
    return out


def _entry(t: float, kind: str, node: str, text: str) -> dict[str, Any]:
    return {"t": t, "kind": kind, "node": node, "text": text, "source": "log"}


async def gather_actions(
    names: list[str], act: Callable[[str], Awaitable[ActionResult]]
) -> dict[str, dict[str, Any]]:
    """`act` on every node at once; each node's outcome (its new state, or why not)."""
    results = await asyncio.gather(*(act(n) for n in names), return_exceptions=True)
    out: dict[str, dict[str, Any]] = {}
    for name, r in zip(names, results, strict=True):
        if isinstance(r, BaseException):
            out[name] = {"ok": False, "message": str(r) or type(r).__name__}
        else:
            out[name] = {"ok": True, "state": r.state}
    return out


LOG_NAMES: tuple[LogName, ...] = ("module", "app")
