#!/usr/bin/env python3
"""Bucket assignment and membership simulator benchmarks (issue 3).

    .venv/bin/python bench/assignment.py [--quick] [--out DIR] [--part assignment|sim|all]

Assignment: compares, for B = 256 and 1024, equal and random weights (1..10), N = 1..64:

- `hrw`: weighted rendezvous hashing with capacity caps over the UP set (no anchor);
- `maglev`: Maglev-style population (each node walks its own permutation of the buckets,
  nodes take turns in proportion to their weights until each reaches its quota);
- `hrw-anchored`: the previous design, a pure function of the UP set anchored on the configured
  farm (UP nodes keep their anchor buckets, capped HRW spreads the rest);
- `vipfarm`: what vipfarm uses, `assignment.rebalance`: current owners keep their buckets within
  their quota, the anchor is a preference, capped HRW hands out the free buckets.

Events: a random walk per farm: every node leaves the full farm and comes back ("single"), then
as many joins and leaves again with nodes already down ("degraded"). Each algorithm follows the
walk from its own previous result. For each event it counts the buckets that changed owner
against `min_moves` (the fewest any balanced assignment allows) and checks balance (every node
within one bucket of its weighted ideal share).

Simulator: wall time of 64 nodes x 600 simulated seconds (crash scenario, defaults), crash
convergence for N = 2..64, and false failovers of 64 nodes at 5 % loss for 600 s.

Writes `assignment.json` (and `assignment.png` when matplotlib is importable) to --out
(default bench/results).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vipfarm.membership.assignment import (
    Members,
    _costs,
    assign,
    masks_of,
    min_moves,
    moved,
    quotas,
    rebalance,
)
from vipfarm.membership.sim import SimConfig, simulate

Owners = list[str | None]


def maglev(members: Members, buckets: int) -> Owners:
    """Weighted Maglev-style population with exact quotas (largest remainder, then name)."""
    active = [(n, w) for n, w in members if w > 0]
    if not active:
        return [None] * buckets
    lo, _ = quotas([w for _, w in active], buckets)
    total = sum(w for _, w in active)
    rest = sorted(
        range(len(active)),
        key=lambda i: (-(buckets * active[i][1] % total), active[i][0]),
    )
    quota = lo[:]
    for i in rest[: buckets - sum(lo)]:
        quota[i] += 1
    prefs = []
    for n, _ in active:
        cost = _costs(n, buckets)
        prefs.append(sorted(range(buckets), key=cost.__getitem__))
    pos = [0] * len(active)
    count = [0] * len(active)
    owners: Owners = [None] * buckets
    turns = [(1 / w, n, i) for i, (n, w) in enumerate(active) if quota[i]]
    heapq.heapify(turns)
    while turns:
        _, name, i = heapq.heappop(turns)
        pref = prefs[i]
        while owners[pref[pos[i]]] is not None:
            pos[i] += 1
        owners[pref[pos[i]]] = name
        count[i] += 1
        if count[i] < quota[i]:
            heapq.heappush(turns, ((count[i] + 1) / active[i][1], name, i))
    return owners


Algorithm = Callable[[Members, int, Members, Owners | None], Owners]


def _vipfarm(members: Members, buckets: int, anchor: Members, old: Owners | None) -> Owners:
    if old is None:
        return assign(members, buckets, anchor).owner_names()
    return rebalance(members, masks_of(old, members), buckets, anchor).owner_names()


ALGORITHMS: dict[str, Algorithm] = {
    "hrw": lambda m, b, _anchor, _old: assign(m, b).owner_names(),
    "maglev": lambda m, b, _anchor, _old: maglev(m, b),
    "hrw-anchored": lambda m, b, anchor, _old: _anchored_only(m, b, anchor),
    "vipfarm": _vipfarm,
}


def _anchored_only(members: Members, buckets: int, anchor: Members) -> Owners:
    """The previous design (re-expressed with `rebalance`), a pure function of the UP set: UP
    nodes keep their anchor buckets up to their quota, capped HRW spreads the rest."""
    base = assign(anchor, buckets).owner_names()
    kept = tuple(o if any(o == n for n, _ in members) else None for o in base)
    return rebalance(members, masks_of(list(kept), members), buckets).owner_names()


def balance(owners: Owners, members: Members, buckets: int) -> float:
    active = [(n, w) for n, w in members if w > 0]
    if not active:
        return 0.0
    total = sum(w for _, w in active)
    return max(abs(sum(1 for o in owners if o == n) - buckets * w / total) for n, w in active)


def walk(full: Members, rnd: random.Random) -> list[tuple[str, Members]]:
    """A random walk of single events from the full farm: every node leaves and rejoins once
    ("single": the farm is full before or after), then as many events again with nodes
    already down ("degraded"). Each step is (kind, members after it)."""
    out: list[tuple[str, Members]] = []
    for x in full:
        less = tuple(m for m in full if m != x)
        if less:
            out += [("single", less), ("single", full)]
    up = set(full)
    for _ in range(len(full) + 8 if len(full) > 2 else 0):
        down = sorted(set(full) - up)
        if down and (rnd.random() < 0.4 or len(up) <= 2):
            up.add(rnd.choice(down))
        else:
            up.remove(rnd.choice(sorted(up)))
        members = tuple(sorted(up))
        out.append(("single" if members == full or len(down) == 0 else "degraded", members))
    return out


def bench_assignment(quick: bool) -> dict[str, Any]:
    sizes = [1, 2, 3, 4, 5, 8, 12, 16, 24, 32, 48, 64] if quick else list(range(1, 65))
    results: dict[str, Any] = {}
    for buckets in (256, 1024):
        for weighted in (False, True):
            rnd = random.Random(buckets * 2 + weighted)
            farms = []
            for n in sizes:
                weights = [rnd.randint(1, 10) if weighted else 1 for _ in range(n)]
                farms.append(tuple(sorted((f"node{i:02d}", w) for i, w in enumerate(weights))))
            for name, algo in ALGORITHMS.items():
                key = f"{name}/B{buckets}/{'weighted' if weighted else 'equal'}"
                results[key] = _measure(algo, farms, buckets, random.Random(7))
                print(key, json.dumps(results[key]["all"]), file=sys.stderr, flush=True)
    return results


def _measure(
    algo: Algorithm, farms: Sequence[Members], buckets: int, rnd: random.Random
) -> dict[str, Any]:
    stats: dict[str, dict[str, Any]] = {}
    times: list[float] = []
    for full in farms:
        old = algo(full, buckets, full, None)
        for kind, members in walk(full, rnd):
            t = time.perf_counter()
            new = algo(members, buckets, full, old)
            times.append(time.perf_counter() - t)
            got, best = moved(old, new), min_moves(old, members, buckets)
            for group in ("all", kind):
                s = stats.setdefault(
                    group,
                    {"events": 0, "moved": 0, "optimal": 0, "within_10pct": 0, "within_1": 0},
                )
                s["events"] += 1
                s["moved"] += got
                s["optimal"] += best
                s["within_10pct"] += got <= 1.1 * best
                s["within_1"] += got <= best + 1
                s["max_extra"] = max(s.get("max_extra", 0), got - best)
                s["worst_balance"] = max(
                    s.get("worst_balance", 0.0), balance(new, members, buckets)
                )
            old = new
    for s in stats.values():
        s["ratio"] = round(s["moved"] / max(1, s["optimal"]), 4)
        s["worst_balance"] = round(s["worst_balance"], 3)
    stats["time_ms"] = {
        "mean": round(1000 * statistics.mean(times), 2),
        "max": round(1000 * max(times), 2),
    }
    return stats


def bench_sim(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duration = 60.0 if quick else 600.0
    cpu = time.process_time()
    r = simulate(SimConfig(nodes=64, scenario="crash", duration=duration))
    out["crash_64_nodes"] = {
        "simulated_s": duration,
        "wall_s": r["wall_s"],
        "cpu_s": round(time.process_time() - cpu, 2),  # wall minus other load on the machine
        "load_average_1min": round(os.getloadavg()[0], 2),
        "datagrams_received": r["datagrams_received"],
        "receptions_per_wall_s": round(r["datagrams_received"] / r["wall_s"]),
        "max_owners_per_bucket": r["max_owners_per_bucket"],
        "max_crash_convergence_ms": max(
            e["convergence_ms"] for e in r["events"] if e["event"] == "crash"
        ),
        "heartbeat_bytes_per_node_per_s": r["heartbeat_bytes_per_node_per_s"],
    }
    print("sim 64 nodes", json.dumps(out["crash_64_nodes"]), file=sys.stderr, flush=True)
    per_n = {}
    for n in [2, 3, 4, 8, 16, 32, 64] if quick else range(2, 65):
        r = simulate(SimConfig(nodes=n, scenario="crash", duration=30.0, seed=n))
        crashes = [e["convergence_ms"] for e in r["events"] if e["event"] == "crash"]
        per_n[n] = max(crashes)
    out["crash_convergence_ms_by_nodes"] = per_n
    out["crash_convergence_ms_max"] = max(per_n.values())
    print("crash convergence", json.dumps(per_n), file=sys.stderr, flush=True)
    r = simulate(SimConfig(nodes=64, scenario="crash", loss=0.05, duration=duration, seed=5))
    out["loss_5pct_64_nodes"] = {
        "simulated_s": duration,
        "false_failovers": r["false_failovers"],
        "max_owners_per_bucket": r["max_owners_per_bucket"],
        "wall_s": r["wall_s"],
        "max_crash_convergence_ms": max(
            e["convergence_ms"] for e in r["events"] if e["event"] == "crash"
        ),
    }
    print("5% loss", json.dumps(out["loss_5pct_64_nodes"]), file=sys.stderr, flush=True)
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    assignment = result.get("assignment")
    if not assignment:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    keys = sorted(assignment)
    ratios = [assignment[k]["all"]["ratio"] for k in keys]
    colors = ["tab:green" if k.startswith("vipfarm") else "tab:gray" for k in keys]
    ax.barh(keys, ratios, color=colors)
    ax.axvline(1.1, color="tab:red", linestyle="--", label="1.1 x minimum")
    ax.set_xlabel("buckets moved / minimum possible (all join and leave events)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, 60 s simulations")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--part", choices=["assignment", "sim", "all"], default="all")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "meta": {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": platform.platform(),
            "python": platform.python_version(),
        }
    }
    if args.part in ("assignment", "all"):
        result["assignment"] = bench_assignment(args.quick)
    if args.part in ("sim", "all"):
        result["sim"] = bench_sim(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "assignment.json").write_text(json.dumps(result, indent=1) + "\n")
    if plot(result, args.out / "assignment.png"):
        print(f"wrote {args.out / 'assignment.png'}", file=sys.stderr)
    print(f"wrote {args.out / 'assignment.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
