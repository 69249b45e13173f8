"""The data-path figures: throughput and latency against HAProxy, overhead, cost of dropping.

Three scenarios, each in labs of its own (`Context.lab`), each measured with wrk from the lab's
client namespace, every variant in both modes, rounds interleaved (see `vipfarm.bench.framework`):

* `throughput`: one 3-node lab. The farm (the VIP) against HAProxy in its own namespace balancing
  the same three nginx by their real addresses (layer 4, and layer 7 as a second variant), and
  against one node by its real address.
* `overhead`: a 1-node farm through the VIP against the same node by its real address, and against
  an identical node in a second lab that runs no data path at all.
* `drop_cost`: a lab where node1 owns every bucket and the others own none. The non-owners receive
  every frame sent to the VMAC (the switch floods it) and drop it. The CPU this costs is the
  difference in CPU per request between runs where the switch floods the non-owners and runs
  where their switch ports do not flood unknown unicast (`bridge_slave flood off`), everything
  else equal; measured for each decision point (`DROP_POINTS`: the BPF prefilter ahead of
  nftables, the default; the nftables netdev ingress chain alone; the inet prerouting chain after
  conntrack, as before issue 14), switched on the running lab between runs.

In every lab the switch floods the VMAC to the nodes only (`vipfarm.bench.switch`), and CPU per
request counts the lab's own tasks, softirq included (`vipfarm.bench.cpu`).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vipfarm.bench.framework import (
    Context,
    FigureSet,
    Goal,
    Run,
    Scenario,
    ScenarioResult,
    Settings,
    Target,
    cpu,
    interleave_steps,
    p99,
    paired_values,
    register,
    rps,
    values_of,
)
from vipfarm.bench.haproxy import haproxy_in
from vipfarm.bench.plots import bar_panels
from vipfarm.bench.profile import profile_variants
from vipfarm.bench.switch import node_port, set_flood, tx_packets
from vipfarm.bench.wrk import Mode
from vipfarm.datapath.spec import DecisionPoint
from vipfarm.lab.testbed import Lab, url_for
from vipfarm.lab.topology import BUCKETS, LabError, node_lan4, node_name

Combine = Callable[[Run, Run], float | None]


def _ratio(metric: Callable[[Run], float | None]) -> Combine:
    """metric(a) / metric(b)."""

    def combine(a: Run, b: Run) -> float | None:
        x, y = metric(a), metric(b)
        return x / y if x is not None and y else None

    return combine


def _loss_pct(a: Run, b: Run) -> float | None:
    """How much lower a's request rate is than b's, in percent (negative: a is faster)."""
    r = _ratio(rps)(a, b)
    return (1 - r) * 100 if r is not None else None


def _cpu_extra_pct(a: Run, b: Run) -> float | None:
    """How much more CPU a request costs in a than in b, in percent."""
    r = _ratio(cpu)(a, b)
    return (r - 1) * 100 if r is not None else None


def _direct(node: int = 1) -> str:
    return f"http://{node_lan4(node)}/"


# ---- throughput and latency: farm vs HAProxy vs one node

THROUGHPUT_VARIANTS = ("farm", "farm_directed", "haproxy", "haproxy_http", "direct")


def _delivery(lab: Lab) -> Callable[[bool], Callable[[], None]]:
    """`before` hooks that put the lab's farm in flood or directed delivery (node1 the entry),
    only when it is not in it already."""
    now = {"directed": False}

    def make(directed: bool) -> Callable[[], None]:
        def before() -> None:
            if now["directed"] != directed:
                lab.set_directed("node1" if directed else None)
                now["directed"] = directed

        return before

    return make


def _throughput(ctx: Context) -> ScenarioResult:
    with ctx.lab(nodes=3) as lab, haproxy_in(lab) as hap:
        delivery = _delivery(lab)
        targets = {
            "farm": Target(lab, url_for(), before=delivery(False)),
            "farm_directed": Target(lab, url_for(), before=delivery(True)),
            "haproxy": Target(lab, hap.url()),
            "haproxy_http": Target(lab, hap.url(http_mode=True)),
            "direct": Target(lab, _direct()),
        }
        runs = ctx.interleave("throughput", targets)
        profile = _profile(ctx, targets, ("farm", "haproxy", "direct"))
    f = FigureSet()
    f.add_wrk(runs, THROUGHPUT_VARIANTS)
    f.add("farm_vs_haproxy_rps", paired_values(runs, "farm", "haproxy", _ratio(rps)))
    f.add("farm_vs_haproxy_p99", paired_values(runs, "farm", "haproxy", _ratio(p99)))
    f.add("farm_vs_haproxy_cpu", paired_values(runs, "haproxy", "farm", _ratio(cpu)))
    f.add("farm_vs_haproxy_http_rps", paired_values(runs, "farm", "haproxy_http", _ratio(rps)))
    f.add("farm_vs_direct_rps", paired_values(runs, "farm", "direct", _ratio(rps)))
    f.add("farm_directed_vs_farm_rps", paired_values(runs, "farm_directed", "farm", _ratio(rps)))
    return f.result(runs, profile=profile)


def _profile(ctx: Context, targets: Mapping[str, Target], names: Sequence[str]) -> dict[str, Any]:
    if not ctx.settings.profile:
        return {}
    return profile_variants(ctx, {n: targets[n] for n in names}, Mode.CLOSE)


def _wrk_meanings(variants: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, what in variants.items():
        out[f"{key}_rps"] = f"requests/s, {what}"
        out[f"{key}_p50_ms"] = f"median latency (ms), {what}"
        out[f"{key}_p99_ms"] = f"99th percentile latency (ms), {what}"
        out[f"{key}_cpu_us"] = f"CPU per request (µs; client, switch and servers), {what}"
    return out


def _plot_throughput(figures: Mapping[str, Any], out: Path) -> list[Path]:
    bars = [
        ("farm", "farm (VIP)"),
        ("farm_directed", "farm, directed"),
        ("haproxy", "HAProxy tcp"),
        ("haproxy_http", "HAProxy http"),
        ("direct", "one node"),
    ]
    made = [
        bar_panels(
            out / "throughput_rps.png",
            "3 nodes: requests/s (median of rounds)",
            "requests/s",
            figures,
            [(f"{k}_rps", label) for k, label in bars],
        ),
        bar_panels(
            out / "latency_p99.png",
            "3 nodes: 99th percentile latency (median of rounds)",
            "ms",
            figures,
            [(f"{k}_p99_ms", label) for k, label in bars],
        ),
        bar_panels(
            out / "cpu_per_request.png",
            "3 nodes: CPU per request, client, switch and servers (median of rounds)",
            "µs",
            figures,
            [(f"{k}_cpu_us", label) for k, label in bars],
        ),
    ]
    return [p for p in made if p]


THROUGHPUT = register(
    Scenario(
        name="throughput",
        title="Throughput and latency: farm vs HAProxy vs one node",
        produces={
            **_wrk_meanings(
                {
                    "farm": "3-node farm through the VIP",
                    "farm_directed": "the same farm in directed delivery (node1 the entry, "
                    "forwarding 2/3 of the requests' frames to the other nodes)",
                    "haproxy": "HAProxy (mode tcp) in front of the same 3 nodes",
                    "haproxy_http": "HAProxy (mode http) in front of the same 3 nodes",
                    "direct": "one of the nodes by its real address",
                }
            ),
            "farm_vs_haproxy_rps": "farm requests/s ÷ HAProxy tcp requests/s (same round)",
            "farm_vs_haproxy_p99": "farm p99 ÷ HAProxy tcp p99 (same round; below 1 is better)",
            "farm_vs_haproxy_cpu": "requests per CPU-second, farm ÷ HAProxy tcp (HAProxy's CPU "
            "per request ÷ the farm's): the request rate ratio on a machine with nothing else "
            "to do",
            "farm_vs_haproxy_http_rps": "farm requests/s ÷ HAProxy http requests/s",
            "farm_vs_direct_rps": "farm requests/s ÷ one node's requests/s",
            "farm_directed_vs_farm_rps": "directed delivery requests/s ÷ flood delivery "
            "requests/s (same round)",
        },
        method=(
            "One lab: 3 nodes running nginx (one worker each, 6-byte reply), one client, and "
            "HAProxy (default settings: one thread per CPU) in a namespace of its own on the same "
            "LAN. The switch floods frames to the VMAC to the nodes only: the other hosts' NICs "
            "would drop them in hardware, which veths cannot. wrk runs in the client namespace "
            "against the VIP (the farm), HAProxy's TCP frontend (layer 4, the fair comparison "
            "for a layer-4 farm), HAProxy's HTTP frontend, and node1's real address. Same wrk "
            "settings, same backends, same reply for every variant; HAProxy balances round "
            "robin, the farm by the hash of client address and port. The directed variant is the "
            "same farm with directed delivery (issue 15): the VIP resolves to node1's MAC and "
            "node1's kernel forwards the other nodes' frames to them at layer 2; replies go "
            "straight back. The variants take turns "
            "within each round and the order rotates between rounds; figures are medians over "
            "rounds and ratios are medians of per-round ratios."
        ),
        steps=lambda s: interleave_steps(s, len(THROUGHPUT_VARIANTS), profiled=3),
        run=_throughput,
        goals=(
            Goal("farm_vs_haproxy_rps", ">=", 1.6, "farm requests/s ≥ 1.6 x HAProxy"),
            Goal(
                "farm_vs_direct_rps",
                ">=",
                0.95,
                "farm requests/s ≥ 0.95 x one node by its real address",
            ),
            Goal("farm_vs_haproxy_p99", "<=", 1.0, "farm p99 ≤ HAProxy p99"),
            Goal("farm_vs_haproxy_cpu", ">=", 1.5, "farm requests per CPU-second ≥ 1.5 x HAProxy"),
        ),
        plot=_plot_throughput,
    )
)


# ---- data path overhead on one node

OVERHEAD_VARIANTS = ("node_vip", "node_direct", "node_direct_notrack", "node_bare")
PROFILED_OVERHEAD = ("node_vip", "node_direct", "node_bare")


def _overhead(ctx: Context) -> ScenarioResult:
    with ctx.lab(nodes=1) as lab, ctx.lab(nodes=1, datapath=False) as bare:

        def notrack(on: bool) -> Callable[[], None]:
            def before() -> None:
                if lab.spec.notrack_other is not on:
                    lab.update_spec(notrack_other=on)

            return before

        targets = {
            "node_vip": Target(lab, url_for(), before=notrack(False)),
            "node_direct": Target(lab, _direct(), before=notrack(False)),
            "node_direct_notrack": Target(lab, _direct(), before=notrack(True)),
            "node_bare": Target(bare, _direct()),
        }
        runs = ctx.interleave("overhead", targets)
        notrack(False)()
        profile = _profile(ctx, targets, PROFILED_OVERHEAD)
    f = FigureSet()
    f.add_wrk(runs, OVERHEAD_VARIANTS)
    for key, a, b, combine in (
        ("datapath_overhead_pct", "node_vip", "node_direct", _loss_pct),
        ("datapath_overhead_vs_bare_pct", "node_vip", "node_bare", _loss_pct),
        ("datapath_side_cost_pct", "node_direct", "node_bare", _loss_pct),
        ("datapath_side_cost_notrack_pct", "node_direct_notrack", "node_bare", _loss_pct),
        ("datapath_cpu_pct", "node_vip", "node_direct", _cpu_extra_pct),
        ("datapath_cpu_vs_bare_pct", "node_vip", "node_bare", _cpu_extra_pct),
        ("datapath_side_cpu_pct", "node_direct", "node_bare", _cpu_extra_pct),
        ("datapath_side_cpu_notrack_pct", "node_direct_notrack", "node_bare", _cpu_extra_pct),
    ):
        f.add(key, paired_values(runs, a, b, combine))
    return f.result(runs, profile=profile)


def _plot_overhead(figures: Mapping[str, Any], out: Path) -> list[Path]:
    bars = [
        ("node_vip", "1-node farm (VIP)"),
        ("node_direct", "same node, real addr"),
        ("node_bare", "node without vipfarm"),
    ]
    made = bar_panels(
        out / "overhead_rps.png",
        "1 node: requests/s through the data path and around it",
        "requests/s",
        figures,
        [(f"{k}_rps", label) for k, label in bars],
    )
    return [made] if made else []


OVERHEAD = register(
    Scenario(
        name="overhead",
        title="Data path overhead on one node",
        produces={
            **_wrk_meanings(
                {
                    "node_vip": "1-node farm through the VIP",
                    "node_direct": "the same node by its real address (data path loaded)",
                    "node_direct_notrack": "the same, with notrack_other on (that traffic "
                    "exempt from conntrack)",
                    "node_bare": "an identical node in a lab without the data path",
                }
            ),
            "datapath_overhead_pct": "requests/s lost through the VIP vs the same node's real "
            "address, % (the data path's own cost)",
            "datapath_overhead_vs_bare_pct": "requests/s lost through the VIP vs a node without "
            "vipfarm, %",
            "datapath_side_cost_pct": "requests/s lost by traffic to the real address when the "
            "data path is loaded (conntrack then tracks every flow of the namespace), %",
            "datapath_side_cost_notrack_pct": "the same with notrack_other on, %",
            "datapath_cpu_pct": "extra CPU per request through the VIP vs the same node's real "
            "address, %: the data path's own cost, unblurred by other tenants",
            "datapath_cpu_vs_bare_pct": "extra CPU per request through the VIP vs a node "
            "without vipfarm, %",
            "datapath_side_cpu_pct": "extra CPU per request to the real address when the data "
            "path is loaded, %",
            "datapath_side_cpu_notrack_pct": "the same with notrack_other on, %",
        },
        method=(
            "Two 1-node labs up side by side: one with the data path (all 256 buckets on the "
            "node), one without. wrk requests the VIP and the real address of the first, and the "
            "real address of the second. The VIP costs what the design adds: frames to the VMAC "
            "are flooded (here to the node only), turned to `pkttype host`, hashed into their "
            "bucket and matched against the owned set at ingress, then tracked. Loading the "
            "data path also costs traffic that does not go to the VIP: conntrack then tracks "
            "every flow of the namespace, and the prerouting chain sees every packet; the "
            "`node_direct_notrack` variant measures that traffic again with `notrack_other` on "
            "(the lab switches it between runs: a spec reload of the runner). Overheads "
            "are medians of per-round figures: `(1 - rps_vip / rps_other) * 100` for request "
            "rates, `(cpu_vip / cpu_other - 1) * 100` for CPU per request."
        ),
        steps=lambda s: interleave_steps(
            s, len(OVERHEAD_VARIANTS), profiled=len(PROFILED_OVERHEAD)
        ),
        run=_overhead,
        goals=(
            Goal("datapath_overhead_pct", "<=", 3.0, "1-node data path overhead ≤ 3% (requests/s)"),
            Goal("datapath_cpu_pct", "<=", 5.0, "1-node data path overhead ≤ 5% (CPU per request)"),
        ),
        plot=_plot_overhead,
    )
)


# ---- CPU cost of the traffic a node drops


@dataclasses.dataclass(frozen=True)
class DropPoint:
    """Where a non-owner drops other nodes' frames: the spec changes that put the decision
    there, and how the figures say it."""

    changes: Mapping[str, Any]
    where: str


# Variant name suffix per decision point: the default keeps the historical names.
DROP_POINTS = {
    "": DropPoint(
        {"decide_at": DecisionPoint.INGRESS, "prefilter": True},
        "dropped by the prefilter, a BPF program at tc ingress ahead of nftables (the default)",
    ),
    "_nft": DropPoint(
        {"decide_at": DecisionPoint.INGRESS, "prefilter": False},
        "dropped by nftables at netdev ingress, before conntrack (the prefilter off)",
    ),
    "_prerouting": DropPoint(
        {"decide_at": DecisionPoint.PREROUTING, "prefilter": False},
        "dropped in prerouting after conntrack (before issue 14)",
    ),
}


def _drop_cost(ctx: Context) -> ScenarioResult:
    k = ctx.settings.droppers
    with ctx.lab(nodes=1 + k) as lab:
        droppers = [node_name(i) for i in range(2, k + 2)]
        ctx.status(f"drop_cost: moving every bucket to node1, {k} nodes own none")
        _wait_runners_catch_sighup(lab)
        lab.set_owned({"node1": list(range(BUCKETS)), **{d: [] for d in droppers}})
        ports = [node_port(lab, d) for d in droppers]

        def counters() -> dict[str, int]:
            return {"dropper_rx_packets": tx_packets(lab, ports)}

        def setup(point: DropPoint, flood: bool) -> Callable[[], None]:
            def before() -> None:
                if any(getattr(lab.spec, k) != v for k, v in point.changes.items()):
                    ctx.status(f"drop_cost: {point.where}")
                    lab.update_spec(**point.changes)
                set_flood(lab, ports, flood)

            return before

        targets = {
            f"drop_{kind}{suffix}": Target(
                lab, url_for(), before=setup(point, kind == "flooded"), counters=counters
            )
            for suffix, point in DROP_POINTS.items()
            for kind in ("flooded", "isolated")
        }
        runs = ctx.interleave("drop_cost", targets)
        profile = _profile(ctx, targets, list(targets))

    def cpu_delta(a: Run, b: Run) -> float | None:
        x, y = a.cpu_us_per_request, b.cpu_us_per_request
        return x - y if x is not None and y is not None else None

    def per_node_us(a: Run, b: Run) -> float | None:
        return _div(cpu_delta(a, b), k)

    def per_node_pct(a: Run, b: Run) -> float | None:
        d, y = per_node_us(a, b), b.cpu_us_per_request
        return d / y * 100 if d is not None and y else None

    def per_packet_us(a: Run, b: Run) -> float | None:
        d, pa, pb = cpu_delta(a, b), _rx_per_request(a), _rx_per_request(b)
        return (
            d / (pa - pb)
            if d is not None and pa is not None and pb is not None and pa > pb
            else None
        )

    f = FigureSet()
    f.add_wrk(runs, list(targets))
    for suffix in DROP_POINTS:
        pair = (f"drop_flooded{suffix}", f"drop_isolated{suffix}")
        f.add(f"drop_cpu_us{suffix}", paired_values(runs, *pair, per_node_us))
        f.add(f"drop_cpu_pct{suffix}", paired_values(runs, *pair, per_node_pct))
        f.add(f"drop_cpu_us_per_packet{suffix}", paired_values(runs, *pair, per_packet_us))
    for variant, key in (
        ("drop_flooded", "drop_packets_per_request"),
        ("drop_isolated", "drop_isolated_packets_per_request"),
    ):
        f.add(key, values_of(runs, variant, lambda r: _div(_rx_per_request(r), k)))
    return f.result(runs, notes={"droppers": k}, profile=profile)


def _catches_sighup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGHUP - 1) & 1)


def _wait_runners_catch_sighup(lab: Lab, timeout_s: float = 30.0) -> None:
    """Wait until every data path runner handles SIGHUP.

    `up()` returns once the kernels hold the buckets, but a runner installs its SIGHUP handler
    only after that, and SIGHUP's default action ends a process: `set_owned` right after `up`
    could kill a runner.
    """
    deadline = time.monotonic() + timeout_s
    for node, rec in lab.runners().items():
        while not _catches_sighup(rec.pid):
            if time.monotonic() > deadline:
                raise LabError(f"{node}: its data path runner did not start in {timeout_s:.0f} s")
            time.sleep(0.05)


def _div(x: float | None, y: float) -> float | None:
    return None if x is None else x / y


def _rx_per_request(run: Run) -> float | None:
    """Frames all non-owners together received per request served."""
    if run.result is None or not run.result.requests:
        return None
    return run.counters["dropper_rx_packets"] / run.result.requests


def _plot_drop(figures: Mapping[str, Any], out: Path) -> list[Path]:
    made = bar_panels(
        out / "drop_cost.png",
        "CPU per request, non-owners flooded or not",
        "µs per request",
        figures,
        [
            ("drop_flooded_cpu_us", "flooded, prefilter drop"),
            ("drop_isolated_cpu_us", "not flooded, prefilter drop"),
            ("drop_flooded_nft_cpu_us", "flooded, nftables ingress drop"),
            ("drop_isolated_nft_cpu_us", "not flooded, nftables ingress drop"),
            ("drop_flooded_prerouting_cpu_us", "flooded, prerouting drop"),
            ("drop_isolated_prerouting_cpu_us", "not flooded, prerouting drop"),
        ],
    )
    return [made] if made else []


def _drop_steps(s: Settings) -> int:
    n = 2 * len(DROP_POINTS)
    return interleave_steps(s, n, profiled=n)


def _drop_meanings() -> dict[str, str]:
    out: dict[str, str] = {}
    for suffix, point in DROP_POINTS.items():
        where = point.where
        out.update(
            _wrk_meanings(
                {
                    f"drop_flooded{suffix}": "node1 owns every bucket, the non-owners receive "
                    f"the flood, {where}",
                    f"drop_isolated{suffix}": "the same, the non-owners' switch ports do not "
                    f"flood, {where}",
                }
            )
        )
        out[f"drop_cpu_us{suffix}"] = (
            "CPU one non-owner costs per request it drops (µs; includes the software switch "
            f"copying the frame to it), {where}"
        )
        out[f"drop_cpu_pct{suffix}"] = (
            f"that, as % of the CPU the whole lab spends per request served, {where}"
        )
        out[f"drop_cpu_us_per_packet{suffix}"] = f"CPU per frame a non-owner drops (µs), {where}"
    return out


DROP_COST = register(
    Scenario(
        name="drop_cost",
        title="CPU cost of traffic a node drops",
        produces={
            **_drop_meanings(),
            "drop_packets_per_request": "frames each non-owner receives per request (flooded)",
            "drop_isolated_packets_per_request": "frames each non-owner receives per request "
            "when not flooded (ARP and other broadcasts only)",
        },
        method=(
            "One lab: node1 owns all 256 buckets, the other nodes own none but run the data path "
            "and receive every frame sent to the VMAC, which the switch floods, and drop it. "
            "Two variants alternate in every round with the same wrk load on the VIP: the "
            "non-owners' switch ports flood unknown unicast (normal), or do not (`bridge_slave "
            "flood off`). The difference in CPU per request between the variants, divided by "
            "the number of non-owners, is the CPU one non-owner spends on the traffic it drops. "
            "It includes the software bridge copying each frame to that port, which a hardware "
            "switch does for free, so it is an upper bound. Both variants are measured for each "
            "decision point: the prefilter (the default: a BPF program at tc ingress, ahead of "
            "nftables, hashes the frame and drops it when its bucket is not kept), suffixed "
            "`_nft` the nftables netdev ingress chain alone (the prefilter off: the bucket is "
            "computed there and foreign frames never reach conntrack) and, suffixed "
            "`_prerouting`, the old one (the ingress chain drops nothing, so each foreign frame "
            "is looked up in conntrack, a SYN's entry allocated and freed, and dropped by the "
            "inet chain at -150). The lab switches decision point between runs (a spec reload "
            "of every runner). `drop_decision` measures the decision alone, without the switch."
        ),
        steps=_drop_steps,
        run=_drop_cost,
        goals=(
            Goal("drop_cpu_us_per_packet", "<=", 0.3, "CPU per frame a non-owner drops ≤ 0.3 µs"),
        ),
        plot=_plot_drop,
    )
)
