"""`vipfarm demo`: a real farm in network namespaces, watched live in the terminal.

The demo builds a lab, keeps a steady stream of new client connections going to the VIP, and
shows per node the buckets its kernel owns and the share of recent connections it served. It
then plays a short script of acts (each an action plus a condition that says it has settled),
measures how long each took to settle as the clients see it, and ends with a summary. The lab
is always torn down unless `--keep` is given.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vipfarm.lab import testbed
from vipfarm.lab.buckets import even_split
from vipfarm.lab.load import Reply
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import BUCKETS

WINDOW = 300  # recent connections the share column is computed over


@dataclass
class Act:
    title: str
    action: Callable[[Lab], None]
    settled: Callable[[Lab, list[Reply]], bool]
    timeout_s: float = 20.0


@dataclass
class Outcome:
    title: str
    settle_ms: float | None
    requests: int
    errors: int


@dataclass
class Stats:
    recent: deque[Reply] = field(default_factory=lambda: deque(maxlen=WINDOW))
    total: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)

    def add(self, replies: list[Reply]) -> None:
        for r in replies:
            self.recent.append(r)
            self.total += 1
            if r.error:
                self.errors[r.error] += 1
            elif r.node:
                self.served[r.node] += 1


def static_acts(lab: Lab) -> list[Act]:
    """Planned rebalance with the stand-alone data path: drain the last node, bring it back."""
    last = lab.node_names[-1]
    rest = lab.node_names[:-1]

    def drain(lab: Lab) -> None:
        split = even_split(len(rest))
        plan: dict[int | str, list[int]] = {last: []}
        plan.update({n: split[f"node{i + 1}"] for i, n in enumerate(rest)})
        lab.set_owned(plan)

    def rejoin(lab: Lab) -> None:
        plan: dict[int | str, list[int]] = {}
        plan.update(even_split(len(lab.node_names)))
        lab.set_owned(plan)

    return [
        Act(
            f"drain {last}: its buckets move to {', '.join(rest)}",
            drain,
            lambda lab, batch: bool(batch) and all(r.node in rest for r in batch),
        ),
        Act(
            f"{last} rejoins and takes its share back",
            rejoin,
            lambda lab, batch: any(r.node == last for r in batch),
        ),
    ]


class Demo:
    def __init__(self, console: Console, lab: Lab, client: str = "client1") -> None:
        self.console = console
        self.lab = lab
        self.client = client
        self.stats = Stats()
        self.phase = "starting"
        self.events: deque[str] = deque(maxlen=8)

    def batch(self) -> list[Reply]:
        replies = self.lab.load(self.client, count=40, concurrency=20, timeout=1.0)
        self.stats.add(replies)
        return replies

    def render(self) -> Group:
        owned = self.lab.kernel_owned()
        shares = Counter(r.node for r in self.stats.recent if r.node)
        seen = max(1, sum(shares.values()))
        table = Table(title=f"farm {self.lab.name}: VIP 198.51.100.100", expand=False)
        for col in ("node", "buckets", "bucket share", "served (recent)", ""):
            table.add_column(col)
        for node in self.lab.node_names:
            buckets = owned.get(node) or []
            share = shares[node] / seen
            table.add_row(
                node,
                str(len(buckets)),
                f"{len(buckets) / BUCKETS:.0%}",
                f"{share:.0%}",
                Text("█" * round(share * 40), style="green"),
            )
        errors = sum(1 for r in self.stats.recent if r.error)
        head = Text.assemble(
            ("now: ", "bold"),
            self.phase,
            f"   connections: {self.stats.total}   recent failures: {errors}",
        )
        return Group(head, table, Panel("\n".join(self.events) or "-", title="events"))

    def run(self, acts: list[Act], warmup_s: float = 3.0) -> list[Outcome]:
        outcomes: list[Outcome] = []
        with Live(self.render(), console=self.console, refresh_per_second=4) as live:
            self.phase = "steady traffic over every node"
            end = time.monotonic() + warmup_s
            while time.monotonic() < end:
                self.batch()
                live.update(self.render())
            for act in acts:
                self.phase = act.title
                self.events.append(f"▶ {act.title}")
                before = (self.stats.total, sum(self.stats.errors.values()))
                t0 = time.monotonic()
                act.action(self.lab)
                settled_ms = None
                while time.monotonic() - t0 < act.timeout_s:
                    got = self.batch()
                    live.update(self.render())
                    if act.settled(self.lab, got):
                        settled_ms = (time.monotonic() - t0) * 1000
                        break
                outcome = Outcome(
                    act.title,
                    settled_ms,
                    self.stats.total - before[0],
                    sum(self.stats.errors.values()) - before[1],
                )
                outcomes.append(outcome)
                done = f"{settled_ms:.0f} ms" if settled_ms is not None else "did not settle"
                self.events.append(f"  settled in {done}, {outcome.errors} failed connections")
                for _ in range(5):  # let the new balance show
                    self.batch()
                    live.update(self.render())
        return outcomes


def summary(console: Console, lab: Lab, stats: Stats, outcomes: list[Outcome]) -> None:
    table = Table(title="summary")
    for col in ("act", "settled", "connections", "failed"):
        table.add_column(col)
    for o in outcomes:
        settled = f"{o.settle_ms:.0f} ms" if o.settle_ms is not None else "no"
        table.add_row(o.title, settled, str(o.requests), str(o.errors))
    console.print(table)
    served = ", ".join(f"{n} {stats.served[n]}" for n in lab.node_names)
    console.print(
        f"{stats.total} connections in all, served: {served}; "
        f"failed: {sum(stats.errors.values())} {dict(stats.errors) or ''}"
    )


def run_demo(console: Console, name: str = "vf", nodes: int = 3, keep: bool = False) -> int:
    console.print(f"[bold]building lab {name}[/]: {nodes} nodes, 1 client, in network namespaces")
    lab = testbed.up(name, nodes=nodes, clients=1)
    try:
        demo = Demo(console, lab)
        outcomes = demo.run(static_acts(lab))
        summary(console, lab, demo.stats, outcomes)
        return 0 if all(o.settle_ms is not None for o in outcomes) else 1
    finally:
        if keep:
            console.print(
                f"lab {name} left up: try `ip netns exec {name}-client1 curl -s "
                f"http://198.51.100.100/`, then `vipfarm lab down --name {name}`"
            )
        else:
            testbed.down(name)
            console.print(f"lab {name} removed")
