"""Prometheus metrics of one node (`/metrics` of the API), with prometheus-client.

Theory of operation
-------------------
Nothing is counted twice and nothing costs anything between scrapes: the daemon keeps plain
counters where events happen (heartbeats per network, rejections per reason and network,
membership events), and a scrape turns a `NodeFacts` snapshot of them into metric families
(`_FactsCollector`), in a registry of its own (not the process-global one, so several daemons in
one test process never mix). Script durations are the exception: they are observed into a
histogram when a script finishes.

New flows per rule come from the kernel: the ruleset counts every rule's accepted and dropped
new flows in named nftables counters (`vipfarm.datapath.ruleset.counter_names`), read here with
one `list counters` call on a libnftables handle of our own, from a worker thread.

Every metric is prefixed `vipfarm_`; docs/API.md lists them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vipfarm.datapath import ruleset
from vipfarm.datapath.spec import Rule
from vipfarm.membership.wire import NodeState

SCRIPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class NodeFacts:
    """Everything a scrape reports, read from the daemon at that moment."""

    state: str
    app_state: str
    buckets_owned: int
    buckets: int
    config_version: int
    split_brain: bool
    peers_alive: Mapping[str, bool] = field(default_factory=dict)
    hb_sent: Mapping[str, int] = field(default_factory=dict)
    hb_received: Mapping[str, int] = field(default_factory=dict)
    hb_rejected: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (network, reason)
    errors: Mapping[str, int] = field(default_factory=dict)
    events: Mapping[str, int] = field(default_factory=dict)
    flows: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (rule, verdict)
    foreign_dropped: int = 0  # frames of other nodes' buckets, dropped at ingress
    checkers: Iterable[tuple[str, bool, bool | None]] = ()  # (name, healthy, last probe ok)
    api_refused: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    api_connections: int = 0
    api_log_streams: int = 0
    delivery: Mapping[str, Any] | None = None  # the pulse's delivery state (node.delivery)


def rule_label(rule: Rule) -> str:
    host = f"[{rule.vip}]" if rule.vip.version == 6 else str(rule.vip)
    return f"{rule.proto.value}/{host}:{rule.ports_text}"


class FlowCounters:
    """Reads the data path's named counters: packets of new flows per (rule, verdict)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nft: Any = None

    def read(self, farm: str, rules: Iterable[Rule]) -> tuple[dict[tuple[str, str], int], int]:
        """Packets of new flows per (rule, verdict), and frames of other nodes' buckets dropped
        at ingress (the netdev table's `foreign` counter). Blocking (libnftables); call it from
        a worker thread. Empty and 0 when the tables are gone."""
        table = ruleset.table_name(farm)
        with self._lock:
            if self._nft is None:
                import nftables

                self._nft = nftables.Nftables()
                self._nft.set_json_output(True)
            # Both tables' counters in one listing: the inet table's per rule, the netdev
            # table's `foreign` (a scrape may come four times a second from the console).
            rc, out, _err = self._nft.cmd("list counters")
        if rc != 0 or not out.strip():
            return {}, 0
        ours = [
            o
            for o in json.loads(out).get("nftables", [])
            if o.get("counter", {}).get("table") == table
        ]

        def of(family: str) -> dict[str, int]:
            objs = [o for o in ours if o["counter"].get("family") == family]
            return ruleset.parse_counters({"nftables": objs})

        packets, foreign = of("inet"), of("netdev").get(ruleset.FOREIGN_COUNTER, 0)
        result: dict[tuple[str, str], int] = {}
        for rule in rules:
            for verdict, name in zip(
                ("accepted", "dropped"), ruleset.counter_names(rule), strict=True
            ):
                if name in packets:
                    result[(rule_label(rule), verdict)] = packets[name]
        return result, foreign


class _FactsCollector(Collector):
    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        f = self._owner.facts
        if f is None:
            return
        state = GaugeMetricFamily("vipfarm_node_state", "1 for the node's state", labels=["state"])
        for s in NodeState:
            state.add_metric([s.name], 1.0 if s.name == f.state else 0.0)
        yield state
        app = GaugeMetricFamily(
            "vipfarm_app_state", "1 for the application's state", labels=["state"]
        )
        app.add_metric([f.app_state], 1.0)
        yield app
        yield GaugeMetricFamily(
            "vipfarm_buckets_owned", "buckets this node's kernel holds", value=f.buckets_owned
        )
        yield GaugeMetricFamily("vipfarm_buckets", "buckets of the farm", value=f.buckets)
        yield GaugeMetricFamily(
            "vipfarm_config_version", "deployed configuration version", value=f.config_version
        )
        yield GaugeMetricFamily(
            "vipfarm_split_brain", "1 while two live nodes claim a bucket", value=f.split_brain
        )
        peers = GaugeMetricFamily("vipfarm_peer_alive", "1 while a peer is heard", labels=["peer"])
        for peer, alive in sorted(f.peers_alive.items()):
            peers.add_metric([peer], 1.0 if alive else 0.0)
        yield peers
        yield _counter("vipfarm_heartbeats_sent", "heartbeats sent", ["network"], f.hb_sent)
        yield _counter(
            "vipfarm_heartbeats_received",
            "datagrams received on a heartbeat socket (rejected ones included)",
            ["network"],
            f.hb_received,
        )
        yield _counter(
            "vipfarm_heartbeats_rejected",
            "heartbeats dropped, by network and reason (bad_mac: wrong key or forged)",
            ["network", "reason"],
            f.hb_rejected,
        )
        yield _counter("vipfarm_errors", "errors counted and survived", ["kind"], f.errors)
        yield _counter(
            "vipfarm_membership_events", "membership events, by kind", ["event"], f.events
        )
        failovers = CounterMetricFamily(
            "vipfarm_failovers", "peers declared dead (their buckets were taken over)"
        )
        failovers.add_metric([], f.events.get("PeerDown", 0))
        yield failovers
        yield _counter(
            "vipfarm_new_flows",
            "new flows (packets opening one) per rule: accepted here or dropped (a bucket "
            "this node only keeps, or nothing listening)",
            ["rule", "verdict"],
            f.flows,
        )
        foreign = CounterMetricFamily(
            "vipfarm_foreign_frames_dropped",
            "frames to a VIP in other nodes' buckets, dropped at ingress before conntrack",
        )
        foreign.add_metric([], f.foreign_dropped)
        yield foreign
        healthy = GaugeMetricFamily(
            "vipfarm_checker_healthy", "1 while a checker is healthy", labels=["checker"]
        )
        ok = GaugeMetricFamily(
            "vipfarm_checker_last_ok", "1 when the latest probe succeeded", labels=["checker"]
        )
        for name, is_healthy, last in f.checkers:
            healthy.add_metric([name], 1.0 if is_healthy else 0.0)
            if last is not None:
                ok.add_metric([name], 1.0 if last else 0.0)
        yield healthy
        yield ok
        yield _counter(
            "vipfarm_api_refused",
            "API requests and connections refused or closed, by reason (no_token, "
            "wrong_token, bad_version, body_too_large, max_connections, max_log_streams, "
            "header_timeout, body_timeout, tls_handshake, bad_request)",
            ["reason"],
            f.api_refused,
        )
        yield GaugeMetricFamily(
            "vipfarm_api_connections", "open connections to the API", value=f.api_connections
        )
        yield GaugeMetricFamily(
            "vipfarm_api_log_streams", "live log streams being served", value=f.api_log_streams
        )
        if f.delivery is not None:
            d = f.delivery
            mode = GaugeMetricFamily(
                "vipfarm_delivery",
                "1 for the farm's delivery (flood, directed, auto) and the ARP/NDP answers in use",
                labels=["delivery", "answers"],
            )
            mode.add_metric([str(d.get("mode")), str(d.get("answers"))], 1.0)
            yield mode
            yield GaugeMetricFamily(
                "vipfarm_delivery_entry_vips",
                "VIPs this node is the entry of (directed answers)",
                value=len(d.get("entry_of_here", ())),
            )
            yield GaugeMetricFamily(
                "vipfarm_delivery_deaf_nodes",
                "live nodes that miss a peer's flood probe (auto delivery)",
                value=len(d.get("deaf_nodes", ())),
            )


def _counter(
    name: str, doc: str, labels: list[str], values: Mapping[Any, int]
) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return fam


class Metrics:
    """One node's registry: observe scripts as they finish, render a scrape from facts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.facts: NodeFacts | None = None
        self._script_seconds = Histogram(
            "vipfarm_script_duration_seconds",
            "module scripts' run time",
            ["script"],
            buckets=SCRIPT_BUCKETS,
            registry=self.registry,
        )
        self._script_failures = Counter(
            "vipfarm_script_failures",
            "module scripts that failed",
            ["script"],
            registry=self.registry,
        )
        self.registry.register(_FactsCollector(self))

    def observe_script(self, name: str, seconds: float, ok: bool) -> None:
        self._script_seconds.labels(name).observe(seconds)
        if not ok:
            self._script_failures.labels(name).inc()

    def render(self, facts: NodeFacts) -> bytes:
        self.facts = facts
        return generate_latest(self.registry)
