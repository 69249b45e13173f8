"""`vipfarm demo`: a real farm in network namespaces, watched live in the terminal.

The demo builds a lab whose nodes run the vipfarm daemon, keeps a steady stream of new client
connections going to the VIP, and shows per node the buckets its kernel owns and the share of
recent connections it served. It then plays a short script of acts (a crash, the rejoin, a
drain) (each an action plus a condition that says it has settled),
measures how long each took to settle as the clients see it, and ends with a summary. The lab
is always torn down unless `--keep` is given.
"""

from __future__ import annotations

import threading
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
from vipfarm.lab.load import Reply
from vipfarm.lab.testbed import Lab
from vipfarm.lab.topology import BUCKETS

WINDOW = 300  # recent connections the share column is computed over


@dataclass
class Act:
    title: str
    action: Callable[[Lab], None]
    settled: Callable[[Lab, list[Reply]], bool]
    # when the farm itself (not yet the clients) has settled, e.g. every bucket has a live owner
    server_settled: Callable[[Lab], bool] | None = None
    timeout_s: float = 20.0


@dataclass
class Outcome:
    title: str
    settle_ms: float | None
    requests: int
    errors: int
    server_ms: float | None = None
    slow: int = 0  # connections that needed a SYN retransmission (over 900 ms)


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


def farm_acts(lab: Lab) -> list[Act]:
    """The script: a node crashes and comes back, another one is drained and comes back."""
    names = lab.node_names
    victim = names[1] if len(names) > 1 else names[0]
    drained = names[-1]
    others = [n for n in names if n != victim]
    rest = [n for n in names if n != drained]

    def crash(lab: Lab) -> None:
        lab.kill(victim)

    def restart(lab: Lab) -> None:
        lab.start_daemon(victim, wait=False)

    def drain(lab: Lab) -> None:
        lab.daemon_call(drained, "stop")

    def back(lab: Lab) -> None:
        lab.daemon_call(drained, "start")

    def serves_only(nodes: list[str]) -> Callable[[Lab, list[Reply]], bool]:
        return lambda lab, batch: (
            bool(batch) and all(r.error is None and r.node in nodes for r in batch)
        )

    def serves(node: str) -> Callable[[Lab, list[Reply]], bool]:
        return lambda lab, batch: any(r.node == node for r in batch)

    def owned_by(nodes: list[str]) -> Callable[[Lab], bool]:
        return lambda lab: lab.holds_every_bucket_once(nodes)

    acts = [
        Act(
            f"kill -9 every process of {victim}",
            crash,
            serves_only(others),
            owned_by(others),
        ),
        Act(f"{victim} restarts, rejoins", restart, serves(victim)),
    ]
    if drained != victim:
        acts += [
            Act(f"vipfarm stop (drain) {drained}", drain, serves_only(rest)),
            Act(f"vipfarm start {drained}", back, serves(drained)),
        ]
    return acts


class Demo:
    def __init__(self, console: Console, lab: Lab, client: str = "client1") -> None:
        self.console = console
        self.lab = lab
        self.client = client
        self.stats = Stats()
        self.phase = "starting"
        self.events: deque[str] = deque(maxlen=10)
        # (start, end, replies) of every batch, appended by the load thread
        self.batches: list[tuple[float, float, list[Reply]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _load(self) -> None:
        """Keep new connections coming until told to stop, whatever the farm does."""
        while not self._stop.is_set():
            t0 = time.monotonic()
            # 3 s like a patient client: a SYN lost to a dead node is retransmitted after 1 s
            replies = self.lab.load(self.client, count=40, concurrency=20, timeout=3.0)
            with self._lock:
                self.stats.add(replies)
                self.batches.append((t0, time.monotonic(), replies))

    def _state(self, node: str) -> str:
        try:
            return str(self.lab.daemon_state(node, timeout=0.5)["state"])
        except Exception:  # a killed node has no daemon to ask
            return "down"

    def render(self) -> Group:
        owned = self.lab.kernel_owned()
        with self._lock:
            recent = list(self.stats.recent)
            total = self.stats.total
        shares = Counter(r.node for r in recent if r.node)
        seen = max(1, sum(shares.values()))
        table = Table(title=f"farm {self.lab.name}: VIP 198.51.100.100", expand=False)
        for col in ("node", "state", "buckets", "bucket share", "served (recent)", ""):
            table.add_column(col)
        for node in self.lab.node_names:
            buckets = owned.get(node) or []
            share = shares[node] / seen
            table.add_row(
                node,
                self._state(node),
                str(len(buckets)),
                f"{len(buckets) / BUCKETS:.0%}",
                f"{share:.0%}",
                Text("█" * round(share * 40), style="green"),
            )
        errors = sum(1 for r in recent if r.error)
        head = Text.assemble(
            ("now: ", "bold"),
            self.phase,
            f"   connections: {total}   recent failures: {errors}",
        )
        return Group(head, table, Panel("\n".join(self.events) or "-", title="events"))

    def _play(self, act: Act, live: Live) -> Outcome:
        self.phase = act.title
        self.events.append(f"▶ {act.title}")
        t0 = time.monotonic()
        act.action(self.lab)
        server_ms = None
        if act.server_settled is not None:
            while time.monotonic() - t0 < act.timeout_s:
                if act.server_settled(self.lab):
                    server_ms = (time.monotonic() - t0) * 1000
                    break
                time.sleep(0.01)
        settled_ms = None
        while settled_ms is None and time.monotonic() - t0 < act.timeout_s:
            with self._lock:
                later = [b for b in self.batches if b[0] >= t0]
            for _start, end, replies in later:
                if act.settled(self.lab, replies):
                    settled_ms = (end - t0) * 1000
                    break
            live.update(self.render())
            time.sleep(0.1)
        with self._lock:  # every connection that overlapped the act until it settled
            until = t0 + (settled_ms or act.timeout_s * 1000) / 1000
            during = [r for s, e, rs in self.batches if e >= t0 and s <= until for r in rs]
        outcome = Outcome(
            act.title,
            settled_ms,
            len(during),
            sum(1 for r in during if r.error),
            server_ms,
            sum(1 for r in during if r.error is None and r.ms > 900),
        )
        done = f"{settled_ms:.0f} ms" if settled_ms is not None else "did not settle"
        if server_ms is not None:
            self.events.append(f"  every bucket had a live owner after {server_ms:.0f} ms")
        self.events.append(
            f"  clients settled in {done}: {outcome.errors} failed, "
            f"{outcome.slow} needed a SYN retransmission"
        )
        return outcome

    def run(self, acts: list[Act], warmup_s: float = 3.0, pause_s: float = 2.0) -> list[Outcome]:
        outcomes: list[Outcome] = []
        loader = threading.Thread(target=self._load, name="demo-load", daemon=True)
        loader.start()
        try:
            with Live(self.render(), console=self.console, refresh_per_second=4) as live:
                self.phase = "steady traffic over every node"
                end = time.monotonic() + warmup_s
                while time.monotonic() < end:
                    live.update(self.render())
                    time.sleep(0.25)
                for act in acts:
                    outcomes.append(self._play(act, live))
                    end = time.monotonic() + pause_s  # let the new balance show
                    while time.monotonic() < end:
                        live.update(self.render())
                        time.sleep(0.25)
        finally:
            self._stop.set()
            loader.join(timeout=30)
        return outcomes


def summary(console: Console, lab: Lab, stats: Stats, outcomes: list[Outcome]) -> None:
    table = Table(title="summary")
    for col in ("act", "farm ok", "clients ok", "conns", "failed", "retried"):
        table.add_column(col)
    for o in outcomes:
        settled = f"{o.settle_ms:.0f} ms" if o.settle_ms is not None else "no"
        server = f"{o.server_ms:.0f} ms" if o.server_ms is not None else "-"
        table.add_row(o.title, server, settled, str(o.requests), str(o.errors), str(o.slow))
    console.print(table)
    served = ", ".join(f"{n} {stats.served[n]}" for n in lab.node_names)
    console.print(
        f"{stats.total} connections in all, served: {served}; "
        f"failed: {sum(stats.errors.values())} {dict(stats.errors) or ''}"
    )


def run_demo(
    console: Console,
    name: str = "vf",
    nodes: int = 3,
    keep: bool = False,
    console_port: int | None = None,
) -> int:
    console.print(f"[bold]building lab {name}[/]: {nodes} nodes, 1 client, in network namespaces")
    lab = testbed.up(name, nodes=nodes, clients=1, daemon=True)
    try:
        demo = Demo(console, lab)
        outcomes = demo.run(farm_acts(lab))
        summary(console, lab, demo.stats, outcomes)
        if console_port is not None:
            serve_console(console, name, console_port)
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


def serve_console(console: Console, name: str, port: int) -> None:
    """node1's web console on 127.0.0.1:`port` (`vipfarm.lab.console`) until Ctrl-C."""
    from vipfarm.lab.console import for_lab

    fwd, token = for_lab(name, "node1", port)
    fwd.start()
    console.print(f"[bold]web console[/]: {fwd.url} (token: {token}); Ctrl-C ends the demo")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fwd.stop()
