"""results.json and the markdown summary, composed from the scenarios' figures (pure).

`compose()` lays results.json out as the issue asks: every figure under its own flat key at the top
level (`farm_rps`, ...; a `{mode: value}` map for per-mode figures), next to the reserved keys
`meta` (command, machine, date, commit), `settings`, `targets` (each goal checked per mode),
`safety` (counters that must be zero), `spread` (the range of each figure's per-round values),
`profiles` (perf breakdowns), `notes` and `runs` (every measured run, for re-analysis).
`markdown()` renders that dictionary, with the scenarios' own words for what each figure means.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vipfarm.bench.framework import Scenario, ScenarioResult, Settings
from vipfarm.bench.wrk import Mode

# Always present in `safety`, so a smoke test can require each of them to be zero.
SAFETY_COUNTERS = ("wrk_failed_runs", "wrk_socket_errors", "wrk_non_2xx", "buckets_owned_twice")

CAVEAT = (
    "All of this runs on one host: the client, every node, the software switch and HAProxy share "
    "the same CPUs. The farm's scale-out advantage (each node adds its own CPUs, a proxy stays "
    "one box every byte goes through) cannot show here: the ratios measure the per-request "
    "overhead of each way to balance, not capacity. CPU per request (`*_cpu_us`: the lab's own "
    "processes, wrk and the kernel work they trigger, other tenants of the machine left out) is "
    "the steadiest view of that overhead; request rates and latencies move with whatever else "
    "the machine runs."
)


def check_goals(scenarios: Sequence[Scenario], results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every goal of every scenario, per mode when the figure has modes; `met` None if missing."""
    out = []
    for s in scenarios:
        for goal in s.goals:
            value = results.get(goal.figure)
            values = value if isinstance(value, dict) else {None: value}
            for mode, v in values.items():
                out.append(
                    {
                        "goal": goal.text,
                        "figure": goal.figure,
                        "mode": mode,
                        "op": goal.op,
                        "limit": goal.limit,
                        "value": v,
                        "met": None if v is None else goal.met(v),
                    }
                )
    return out


def compose(
    meta: Mapping[str, Any],
    settings: Settings,
    scenarios: Sequence[Scenario],
    outcomes: Mapping[str, ScenarioResult],
    safety: Mapping[str, int],
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    results: dict[str, Any] = {"meta": dict(meta), "settings": asdict(settings)}
    for s in scenarios:
        results.update(outcomes[s.name].figures)
    results["targets"] = check_goals(scenarios, results)
    results["safety"] = {c: 0 for c in SAFETY_COUNTERS} | dict(safety)
    results["notes"] = {
        s.name: {
            "seconds": seconds[s.name],
            "lab_share_of_busy": lab_share([outcomes[s.name]]),
            **outcomes[s.name].notes,
        }
        for s in scenarios
    }
    results["meta"]["lab_share_of_busy"] = lab_share(outcomes.values())
    results["profiles"] = {
        s.name: outcomes[s.name].profile for s in scenarios if outcomes[s.name].profile
    }
    results["spread"] = {k: v for s in scenarios for k, v in outcomes[s.name].spread.items()}
    results["runs"] = {s.name: [r.as_json() for r in outcomes[s.name].runs] for s in scenarios}
    return results


def lab_share(outcomes: Iterable[ScenarioResult]) -> float | None:
    """The lab's CPU time over the machine's busy time during the measured runs: how much of the
    machine the bench had (the rest went to other tenants)."""
    runs = [r for o in outcomes for r in o.runs]
    busy = sum(r.machine_busy_s for r in runs)
    return sum(r.cpu_s for r in runs) / busy if busy else None


def fmt(value: Any) -> str:
    """A figure for a table: a few significant digits, thousands as whole numbers."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _cell(results: Mapping[str, Any], key: str, mode: str | None) -> str:
    """A figure, with the range of its per-round values when there was more than one."""
    value = results.get(key)
    if isinstance(value, dict):
        value = value.get(mode) if mode else None
    low, high = results.get("spread", {}).get(key, {}).get(mode, [None, None])
    if value is None or low is None or low == high:
        return fmt(value)
    return f"{fmt(value)} ({fmt(low)} to {fmt(high)})"


def _figure_rows(scenario: Scenario, results: Mapping[str, Any]) -> list[str]:
    modes = [str(m) for m in Mode]
    rows = [
        f"| figure | {' | '.join(modes)} | meaning |",
        f"|---|{'---:|' * len(modes)}---|",
    ]
    for key, meaning in scenario.produces.items():
        value = results.get(key)
        if isinstance(value, dict) and not set(value) <= set(modes):
            # per setting rather than per mode (e.g. keepalived's default and fast timers)
            named = ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
            cells = [named] + [""] * (len(modes) - 1)
        elif isinstance(value, dict):
            cells = [_cell(results, key, m) for m in modes]
        else:
            cells = [fmt(value)] + [""] * (len(modes) - 1)
        rows.append(f"| `{key}` | {' | '.join(cells)} | {meaning} |")
    return rows


def _goal_rows(results: Mapping[str, Any]) -> list[str]:
    rows = ["| goal | mode | measured (rounds from, to) | met |", "|---|---|---:|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**falls short**", None: "not measured"}[t["met"]]
        measured = _cell(results, t["figure"], t["mode"]) if t["mode"] else fmt(t["value"])
        rows.append(f"| {t['goal']} (`{t['figure']}`) | {t['mode'] or ''} | {measured} | {met} |")
    return rows


def _meta_lines(meta: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    m = meta["machine"]
    git = meta.get("git") or {}
    commit = git.get("commit", "unknown")[:12]
    if git.get("dirty"):
        commit += " with uncommitted changes"
    tools = ", ".join(meta.get("tools", {}).values())
    load = ", ".join(f"{x:.2f}" for x in m.get("loadavg", []))
    kind = "quick" if settings["quick"] else "full"
    share = "n/a" if meta.get("lab_share_of_busy") is None else fmt(meta["lab_share_of_busy"] * 100)
    return [
        f"- Command: `{meta['command']}` ({kind} run, {meta['seconds']:.0f} s)",
        f"- Date: {meta['date']}, commit `{commit}`",
        f"- Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gb']:.0f} GB, "
        f"Linux {m['kernel']}; load average at start {load}",
        f"- Tools: {tools}",
        f"- Load: wrk with {settings['threads']} thread(s) and {settings['connections']} "
        f"connections, {settings['rounds']} round(s) of {settings['duration_s']} s per variant "
        f"and mode"
        + (f" after a {settings['warmup_s']} s warm-up" if settings["warmup_s"] else ""),
        f"- Share of the machine: the lab's own tasks used {share}% "
        "of the machine's busy CPU time during the measured runs; the rest was other work on "
        "the machine, which slows every variant alike and is left out of the CPU figures.",
        "- Modes: `close` sends `Connection: close`, so every request is a new TCP connection; "
        "`keepalive` reuses each connection for many requests.",
    ]


def markdown(
    results: Mapping[str, Any],
    scenarios: Sequence[Scenario],
    images: Mapping[str, Sequence[Path]],
    where: Path | None,
) -> str:
    """The summary; `images` are each scenario's plots, embedded with links relative to directory
    `where`, or, when `where` is None (a copy kept away from the plots), named only."""
    meta = results["meta"]
    lines = [
        "# vipfarm benchmarks",
        "",
        "<!-- Generated by `vipfarm bench`; do not edit. Rerun the command below instead. -->",
        "",
        *_meta_lines(meta, results["settings"]),
        "",
        CAVEAT,
        "",
        "## Goals",
        "",
        *_goal_rows(results),
        "",
        "## Safety counters",
        "",
        "Things that must never happen in a healthy run (the CI smoke test requires zero):",
        "",
        *(f"- `{k}`: {v}" for k, v in results["safety"].items()),
    ]
    for s in scenarios:
        lines += ["", f"## {s.title}", "", s.method, "", *_figure_rows(s, results)]
        plots = images.get(s.name, ())
        if where is not None:
            lines += [
                line for p in plots for line in ("", f"![{p.stem}]({os.path.relpath(p, where)})")
            ]
        elif plots:
            lines += [
                "",
                f"Plots (written by the run, not kept here): {', '.join(f'`{p}`' for p in plots)}",
            ]
        if s.name in results.get("profiles", {}):
            lines += ["", *_profile_lines(results["profiles"][s.name])]
    if "chaos" in results:
        lines += ["", *_chaos_lines(results["chaos"])]
    return "\n".join(lines) + "\n"


def _chaos_lines(c: Mapping[str, Any]) -> list[str]:
    """A long chaos run recorded apart from the bench (`vipfarm chaos --out`, `--chaos`)."""
    lines = [
        "## Chaos",
        "",
        f"`vipfarm chaos`, {c.get('duration_s', 0):.0f} s, {c.get('nodes')} nodes, "
        f"{float(c.get('loss', 0)) * 100:g} % heartbeat loss throughout, seed {c.get('seed')}, "
        "the default timers; faults drawn from every kind while one client opens new "
        f"connections without pause (report: `{c.get('source')}`).",
        "",
        "| figure | value | goal |",
        "|---|---:|---|",
        f"| connections | {c.get('requests')} | |",
        f"| failed, by error | {c.get('failed') or 0} | |",
        f"| accepted by two nodes | {c.get('accepted_twice')} | 0 |",
        f"| SYNs let through by two nodes | {c.get('syn_accepted_by_two')} | 0 |",
        f"| false failovers | {c.get('false_failovers')} | 0 |",
        f"| longest unowned bucket (ms) | {fmt(c.get('max_unowned_ms'))} | |",
        "",
        "| fault | times | worst converged (ms) | worst recovered (ms) |",
        "|---|---:|---:|---:|",
    ]
    for kind, k in sorted(c.get("kinds", {}).items()):
        lines.append(
            f"| {kind} | {k['count']} | {fmt(k['converge_ms_max'])} | {fmt(k['recover_ms_max'])} |"
        )
    for e in c.get("false_failover_events", []):
        lines.append(f"\nFalse failover: `{e}`")
    return lines


def _profile_lines(profile: Mapping[str, Any]) -> list[str]:
    variants: Mapping[str, Any] = profile["variants"]
    names = list(variants)
    areas = list(dict.fromkeys(a for v in variants.values() for a in v["areas"]))
    lines = [
        f"### Where the time goes ({profile['mode']} mode, perf)",
        "",
        "CPU per request by area, in µs: one profiled run per variant, samples of the lab's own "
        "tasks only (its processes, wrk, ksoftirqd). Kernel areas are grouped by symbol; softirq "
        "work shows under the task it interrupted. Without a hardware PMU (a VM) perf samples on "
        "a timer, so time spent with interrupts off lands where they come back on "
        "(`_raw_spin_unlock_irqrestore`, counted under locks). One run per variant: shares are "
        "indicative, totals move by some 10% from run to run.",
        "",
        f"| area | {' | '.join(names)} |",
        f"|---|{'---:|' * len(names)}",
        f"| **total** | {' | '.join(fmt(variants[n]['cpu_us']) for n in names)} |",
    ]
    for area in areas:
        cells = [fmt(variants[n]["areas"].get(area)) for n in names]
        lines.append(f"| {area} | {' | '.join(cells)} |")
    lines.append("")
    first = names[0]
    for other in names[1:]:
        lines.append(f"- {_difference(first, other, variants[first], variants[other])}")
    for n in names:
        top = ", ".join(f"`{sym}` {pct:.1f}%" for pct, sym, _ in variants[n]["top"][:8])
        lines.append(f"- top symbols, {n} ({variants[n]['samples']} samples): {top}")
    return lines


def _difference(a: str, b: str, pa: Mapping[str, Any], pb: Mapping[str, Any]) -> str:
    """`a` against `b`: the total and the areas that differ most, in µs per request."""
    areas = set(pa["areas"]) | set(pb["areas"])
    diffs = {x: pa["areas"].get(x, 0.0) - pb["areas"].get(x, 0.0) for x in areas}
    biggest = sorted(diffs, key=lambda x: -abs(diffs[x]))[:4]
    parts = ", ".join(f"{x} {diffs[x]:+.1f}" for x in biggest)
    return (
        f"{a} against {b}: {pa['cpu_us'] - pb['cpu_us']:+.1f} µs per request; "
        f"the areas that differ most: {parts}"
    )
