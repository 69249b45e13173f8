#!/usr/bin/env python3
"""Does a change of the simulator or the membership core change the protocol's behaviour?

    python bench/sim_identity.py --out /tmp/new.json                  # this tree
    python bench/sim_identity.py --baseline /tmp/old/src --out ...    # and an older tree: compare

Runs every scenario of `vipfarm sim --help` at 8 nodes with 5 % loss (several seeds), and a few
variations (duplication and reordering, two heartbeat networks, weights, 16 and 32 nodes; with
`--big` also 64 nodes x 600 s at the defaults), in a fresh process per tree. For every run it
records the simulator's JSON result without `wall_s` (events, convergence figures, moved
buckets, drops, traffic) and two digests of what happened inside: every heartbeat sent
(slot, sender, network, payload bytes) and every event of every core (slot, node, event), in
order. Equal digests mean every datagram and every event was the same at the same virtual time,
which is a stronger check than equal summaries.

With `--baseline DIR` (the `src` directory of another tree, e.g. from `git archive`), the same
runs are made with that tree's code and compared run by run; the exit status is 1 when any run
differs, and the differing keys are printed. Wall times of both trees are printed as well (not
compared: they depend on the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

RUNS: list[dict[str, Any]] = [
    *(
        {"nodes": 8, "scenario": s, "loss": 0.05, "duration": 60.0, "seed": seed}
        for s in ("crash", "join", "drain", "partition", "flap", "rolling")
        for seed in (1, 2, 3)
    ),
    *(
        {
            "nodes": 8,
            "scenario": s,
            "loss": 0.05,
            "duplicate": 0.05,
            "reorder": 0.05,
            "duration": 60.0,
            "seed": 4,
        }
        for s in ("crash", "join", "drain", "partition", "flap", "rolling")
    ),
    *(
        {"nodes": 8, "scenario": s, "loss": 0.05, "networks": 2, "duration": 60.0, "seed": 5}
        for s in ("crash", "partition", "rolling")
    ),
    {
        "nodes": 8,
        "scenario": "crash",
        "loss": 0.05,
        "weights": [1, 2, 3, 1, 1, 2, 0, 1],
        "duration": 60.0,
        "seed": 6,
    },
    {"nodes": 8, "scenario": "crash", "loss": 0.3, "duration": 60.0, "seed": 7},
    {"nodes": 16, "scenario": "crash", "loss": 0.05, "duration": 60.0, "seed": 8},
    {"nodes": 32, "scenario": "drain", "loss": 0.05, "duration": 40.0, "seed": 9},
]
BIG: list[dict[str, Any]] = [
    {"nodes": 64, "duration": 600.0},
    {"nodes": 64, "duration": 120.0, "loss": 0.05, "scenario": "rolling", "seed": 10},
]

# Run in the child process, with the tree under test first on sys.path.
_CHILD = r"""
import hashlib, json, sys
from vipfarm.membership import sim
from vipfarm.membership.sim import SimConfig, Simulator

runs = json.loads(sys.argv[1])
out = []
for spec in runs:
    spec = dict(spec)
    if "delay_ms" in spec:
        spec["delay_ms"] = tuple(spec["delay_ms"])
    s = Simulator(SimConfig(**spec))
    sent = hashlib.sha256()
    events = hashlib.sha256()
    counts = [0, 0]
    broadcast, on_event = s._broadcast, s._on_event

    def _broadcast(node, payload, net, _b=broadcast, _s=s):
        counts[0] += 1
        sent.update(b"%d %d %s " % (_s.k, node.index, net.encode()))
        sent.update(payload)
        _b(node, payload, net)

    def _on_event(node, e, now, _o=on_event):
        counts[1] += 1
        events.update(f"{round(now * 1e4)} {node.index} {e!r}\n".encode())
        _o(node, e, now)

    s._broadcast, s._on_event = _broadcast, _on_event
    r = s.run()
    wall = r.pop("wall_s")
    out.append({"spec": spec, "result": r, "sent": sent.hexdigest(), "heartbeats": counts[0],
                "events_digest": events.hexdigest(), "event_count": counts[1], "wall_s": wall})
print(json.dumps({"module": sim.__file__, "runs": out}))
"""


def run_tree(src: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(runs)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"the simulator of {src} failed:\n{proc.stderr}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = [k for k in ("sent", "heartbeats", "events_digest", "event_count") if a[k] != b[k]]
    keys += [
        f"result.{k}"
        for k in sorted(set(a["result"]) | set(b["result"]))
        if a["result"].get(k) != b["result"].get(k)
    ]
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    ap.add_argument("--src", default=os.path.normpath(here), help="tree under test (its src/)")
    ap.add_argument("--baseline", help="src/ of the tree to compare with")
    ap.add_argument("--big", action="store_true", help="add 64-node runs (minutes)")
    ap.add_argument("--out", help="write both trees' records here (JSON)")
    args = ap.parse_args()
    runs = RUNS + (BIG if args.big else [])
    t = time.perf_counter()
    new = run_tree(args.src, runs)
    print(f"{new['module']}: {len(runs)} runs in {time.perf_counter() - t:.1f} s")
    record: dict[str, Any] = {"tree": new}
    status = 0
    if args.baseline:
        t = time.perf_counter()
        old = run_tree(args.baseline, runs)
        print(f"{old['module']}: {len(runs)} runs in {time.perf_counter() - t:.1f} s")
        record["baseline"] = old
        same = 0
        for a, b in zip(old["runs"], new["runs"], strict=True):
            differs = _diff(a, b)
            label = " ".join(f"{k}={v}" for k, v in a["spec"].items())
            walls = f"wall {a['wall_s']} -> {b['wall_s']} s"
            if differs:
                status = 1
                print(f"DIFFERENT  {label}: {', '.join(differs)} ({walls})")
            else:
                same += 1
                print(
                    f"identical  {label}: {a['heartbeats']} heartbeats, {a['event_count']} "
                    f"events, {len(a['result']['events'])} measured ({walls})"
                )
        print(f"{same} of {len(runs)} runs identical")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
