"""The bench framework: settings, the scenario registry and the context scenarios measure with.

A **scenario** builds its own labs, measures, and returns figures: flat result keys such as
`farm_rps`, each a number or a `{mode: number}` map. Scenarios are registered by name in a
registry that also knows, for every result key, which scenario produces it, so
`vipfarm bench --only failover_ms` runs just that one. A scenario carries what the report needs to
explain its figures: the meaning of each key, its method in prose, its goals (e.g. `farm_vs_haproxy
_rps >= 1.5`) and an optional plot.

To add a scenario (failover, rebalance, chaos...): write a module that builds a `Scenario` and
calls `register()` at import, and import that module in `vipfarm.bench.run` next to
`vipfarm.bench.figures`. Use `Context.lab()` for labs (torn down for sure, checked for buckets
owned twice), `Context.count()` for safety counters (the CI smoke test requires them all zero) and
`Context.status()`/`advance()` for the progress display.

Measurements with wrk go through `Context.interleave()`: every variant (a URL from a client of a
lab) is measured in every mode, round after round, the order of the variants rotating from one
round to the next, so slow drifts of a shared machine hit every variant alike. Every run also
records the CPU time of the lab's own tasks and of the whole machine (`vipfarm.bench.cpu`).
Figures are medians of per-round values (`FigureSet`), kept with the range those values spanned.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from vipfarm.bench import switch
from vipfarm.bench.cpu import lab_cpu_s, lab_tasks, snapshot
from vipfarm.bench.wrk import DONE_LUA, Mode, WrkError, WrkResult, parse_wrk, wrk_argv
from vipfarm.errors import VipfarmError
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind
from vipfarm.lab.testbed import Lab

Figure = float | dict[str, float]
RESERVED = frozenset(
    {"meta", "settings", "targets", "safety", "runs", "notes", "profiles", "spread", "chaos"}
)


class BenchError(VipfarmError):
    """The bench cannot run or went wrong; the text says what and how to fix it."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int  # measured runs per variant and mode; figures are their medians
    duration_s: int  # one wrk run
    warmup_s: int  # one unrecorded run per variant and mode first (0: none)
    connections: int
    threads: int
    droppers: int  # nodes owning no bucket in the drop-cost scenario
    profile: bool  # one perf-profiled run per variant (close mode) after the measured ones

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, rounds=1, duration_s=1, warmup_s=0, connections=16, threads=1,
                       droppers=3, profile=False)  # fmt: skip
        return cls(False, rounds=5, duration_s=3, warmup_s=1, connections=16, threads=1,
                   droppers=6, profile=True)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """What one variant measures: `url` requested from `client` of `lab`.

    `before` runs before each of its runs (e.g. to reconfigure the lab for this variant);
    `counters` is read before and after each run and the differences are kept with the run.
    """

    lab: Lab
    url: str
    client: str = "client1"
    before: Callable[[], None] | None = None
    counters: Callable[[], dict[str, int]] | None = None


@dataclass(frozen=True)
class Run:
    variant: str
    mode: Mode
    round: int
    result: WrkResult | None  # None: wrk failed (counted in safety)
    cpu_s: float  # the lab's processes, wrk and ksoftirqd (see vipfarm.bench.cpu)
    machine_busy_s: float
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.result is None or self.result.requests == 0:
            return None
        return self.cpu_s * 1e6 / self.result.requests

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "mode": str(self.mode), "round": self.round}
        if self.result is not None:
            out.update(asdict(self.result), rps=self.result.rps)
        out.update(cpu_s=self.cpu_s, machine_busy_s=self.machine_busy_s, counters=self.counters)
        return out


@dataclass
class ScenarioResult:
    figures: dict[str, Figure]
    runs: list[Run] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # see vipfarm.bench.profile
    spread: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # [min, max]


@dataclass(frozen=True)
class Goal:
    """A target a figure should meet, checked per mode when the figure has modes."""

    figure: str
    op: Literal[">=", "<="]
    limit: float
    text: str

    def met(self, value: float) -> bool:
        return value >= self.limit if self.op == ">=" else value <= self.limit


class Reporter(Protocol):
    def status(self, text: str) -> None: ...
    def advance(self) -> None: ...


class Context:
    """What a scenario measures with: settings, labs, wrk, safety counters, progress."""

    def __init__(self, settings: Settings, reporter: Reporter, workdir: Path) -> None:
        self.settings = settings
        self.reporter = reporter
        self.safety: Counter[str] = Counter()
        self.labs: set[str] = set()  # names of the labs up now: their processes are measured
        self.script = workdir / "wrk-done.lua"
        self.script.write_text(DONE_LUA)

    def status(self, text: str) -> None:
        self.reporter.status(text)

    def advance(self) -> None:
        self.reporter.advance()

    def count(self, counter: str, n: int = 1) -> None:
        """Add to a safety counter: anything that should never happen in a healthy run."""
        self.safety[counter] += n

    @contextmanager
    def lab(self, nodes: int, datapath: bool = True) -> Iterator[Lab]:
        """A fresh lab (nginx on every node, one client), removed when the block ends.

        Its switch is tuned to cost nothing but forwarding (see `vipfarm.bench.switch`).
        """
        name = testbed.unique_name("vb")
        self.status(f"building a {nodes}-node lab {name}")
        lab = testbed.up(name, nodes=nodes, clients=1, app=AppKind.NGINX, datapath=datapath)
        self.labs.add(name)
        try:
            switch.tune(lab)
            yield lab
            if datapath:
                self.count("buckets_owned_twice", owned_twice(lab.kernel_owned()))
        finally:
            self.labs.discard(name)
            self.status(f"removing lab {name}")
            testbed.down(name)

    def namespaces(self) -> list[str]:
        """Every namespace of the labs up now, extra ones (HAProxy's) included."""
        try:
            names = os.listdir("/run/netns")
        except OSError:
            return []
        return [ns for ns in names if ns.split("-", 1)[0] in self.labs]

    def wrk(self, target: Target, mode: Mode, duration_s: int) -> Run:
        """One wrk run, with the CPU it cost; the caller names its variant and round."""
        s = self.settings
        argv = wrk_argv(target.url, mode, duration_s, s.connections, s.threads, str(self.script))
        before = snapshot(lab_tasks(self.namespaces()))
        try:
            proc = target.lab.exec(target.client, argv, timeout=duration_s + 30)
            result: WrkResult | None = parse_wrk(proc.stdout + proc.stderr)
        except (WrkError, subprocess.TimeoutExpired):
            result = None
        after = snapshot(before.tasks)
        if result is None:
            self.count("wrk_failed_runs")
        else:
            self.count("wrk_socket_errors", result.socket_errors)
            self.count("wrk_non_2xx", result.non_2xx)
        cpu = lab_cpu_s(before, after)
        return Run("", mode, -1, result, cpu, (after.machine - before.machine).busy_s)

    def measure(self, variant: str, target: Target, mode: Mode, round: int, secs: int) -> Run:
        if target.before is not None:
            target.before()
        c0 = target.counters() if target.counters else {}
        run = self.wrk(target, mode, secs)
        c1 = target.counters() if target.counters else {}
        counters = {k: c1[k] - c0[k] for k in c1}
        return replace(run, variant=variant, round=round, counters=counters)

    def interleave(self, scenario: str, targets: Mapping[str, Target]) -> list[Run]:
        """Warm-up, then `rounds` rounds of every variant in every mode; the measured runs."""
        s = self.settings
        names = list(targets)
        runs: list[Run] = []
        if s.warmup_s:
            for name in names:
                for mode in Mode:
                    self.status(f"{scenario}: warm-up {name} {mode}")
                    self.measure(name, targets[name], mode, -1, s.warmup_s)
                    self.advance()
        for r in range(s.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for mode in Mode:
                    self.status(f"{scenario}: round {r + 1}/{s.rounds} {name} {mode}")
                    runs.append(self.measure(name, targets[name], mode, r, s.duration_s))
                    self.advance()
        return runs


def interleave_steps(settings: Settings, variants: int, profiled: int = 0) -> int:
    """Progress steps of `Context.interleave` over `variants`, plus `profiled` profiled runs."""
    runs = variants * len(Mode) * (settings.rounds + (1 if settings.warmup_s else 0))
    return runs + (profiled if settings.profile else 0)


def owned_twice(owned: Mapping[str, Sequence[int] | None]) -> int:
    """How many buckets more than one node's kernel holds."""
    seen: Counter[int] = Counter(b for buckets in owned.values() for b in buckets or ())
    return sum(1 for n in seen.values() if n > 1)


# ---- figures from runs (pure)

Values = dict[str, list[float]]  # per mode: one value per round


def _by(runs: Sequence[Run], variant: str, mode: Mode) -> list[Run]:
    return [r for r in runs if r.variant == variant and r.mode is mode and r.result is not None]


def values_of(runs: Sequence[Run], variant: str, value: Callable[[Run], float | None]) -> Values:
    """Per mode, `value` of each of the variant's successful runs."""
    out: Values = {}
    for mode in Mode:
        values = [v for r in _by(runs, variant, mode) if (v := value(r)) is not None]
        if values:
            out[str(mode)] = values
    return out


def paired_values(
    runs: Sequence[Run], a: str, b: str, combine: Callable[[Run, Run], float | None]
) -> Values:
    """Per mode, `combine(run of a, run of b)` for each round where both ran.

    Pairing within a round cancels what drifts between rounds (another tenant's load, thermal
    state) better than combining medians.
    """
    out: Values = {}
    for mode in Mode:
        bs = {r.round: r for r in _by(runs, b, mode)}
        values = [
            v
            for ra in _by(runs, a, mode)
            if ra.round in bs and (v := combine(ra, bs[ra.round])) is not None
        ]
        if values:
            out[str(mode)] = values
    return out


def rps(run: Run) -> float | None:
    return run.result.rps if run.result else None


def p50(run: Run) -> float | None:
    return run.result.p50_ms if run.result else None


def p99(run: Run) -> float | None:
    return run.result.p99_ms if run.result else None


def cpu(run: Run) -> float | None:
    return run.cpu_us_per_request


@dataclass
class FigureSet:
    """Figures as the medians of per-round values, with the range those values spanned."""

    figures: dict[str, Figure] = field(default_factory=dict)
    spread: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, key: str, values: Values) -> None:
        self.figures[key] = {m: statistics.median(v) for m, v in values.items()}
        self.spread[key] = {m: [min(v), max(v)] for m, v in values.items()}

    def add_wrk(self, runs: Sequence[Run], variants: Sequence[str]) -> None:
        """`<variant>_rps`, `_p50_ms`, `_p99_ms` and `_cpu_us` (CPU per request)."""
        for v in variants:
            for suffix, value in (("rps", rps), ("p50_ms", p50), ("p99_ms", p99), ("cpu_us", cpu)):
                self.add(f"{v}_{suffix}", values_of(runs, v, value))

    def result(self, runs: list[Run], **kwargs: Any) -> ScenarioResult:
        return ScenarioResult(self.figures, runs, spread=self.spread, **kwargs)


# ---- the registry


Plot = Callable[[Mapping[str, Any], Path], list[Path]]


@dataclass(frozen=True)
class Scenario:
    """One family of figures, measured in its own labs."""

    name: str
    title: str
    produces: Mapping[str, str]  # result key -> what it means (unit included)
    method: str  # markdown: how it is measured and why that is fair
    steps: Callable[[Settings], int]  # progress steps it will take
    run: Callable[[Context], ScenarioResult]
    goals: tuple[Goal, ...] = ()
    plot: Plot | None = None


_REGISTRY: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    """Add a scenario; its name and result keys must be new."""
    if scenario.name in _REGISTRY:
        raise ValueError(f"scenario {scenario.name!r} is registered twice")
    taken = producers()
    for key in scenario.produces:
        if key in RESERVED:
            raise ValueError(f"result key {key!r} is reserved in results.json: pick another")
        if key in taken:
            raise ValueError(f"result key {key!r} is produced by {taken[key].name!r} already")
    for goal in scenario.goals:
        if goal.figure not in scenario.produces:
            raise ValueError(f"goal on {goal.figure!r}, which {scenario.name!r} does not produce")
    _REGISTRY[scenario.name] = scenario
    return scenario


def scenarios() -> list[Scenario]:
    """Every registered scenario, in the order it runs."""
    return list(_REGISTRY.values())


def producers() -> dict[str, Scenario]:
    """Result key -> the scenario that produces it."""
    return {key: s for s in _REGISTRY.values() for key in s.produces}


def select(keys: Sequence[str]) -> list[Scenario]:
    """The scenarios to run for `keys` (result keys or scenario names; empty: all), in order."""
    if not keys:
        return scenarios()
    by_key = producers()
    wanted: set[str] = set()
    for key in keys:
        if key in _REGISTRY:
            wanted.add(key)
        elif key in by_key:
            wanted.add(by_key[key].name)
        else:
            known = ", ".join([*_REGISTRY, *by_key])
            raise BenchError(f"--only {key!r} names no scenario or result key: use one of {known}")
    return [s for s in _REGISTRY.values() if s.name in wanted]
