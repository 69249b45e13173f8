"""Watch given client ports until each gets a new connection answered: failover from a client's
point of view, one port per bucket.

`python -m vipfarm.lab.probe URL --ports P1,P2,...[;Q1,Q2,...] [--avoid NODE]
[--attempt-timeout S] [--deadline S]` prints `ready`, waits for a line on stdin (`go`), then for
each group of ports (one group per bucket; `;` separates groups, `,` the ports of a group) keeps
opening new connections (HTTP/1.0, one request), rotating over the group's ports, until one is
answered by a node other than `--avoid`. Rotating matters: retrying at once from the same port
would reuse a 4-tuple the server may still hold half-open from the attempt before. It prints one
JSON object: `{"go": T, "first_ok": {"group": T, ...}, "nodes": {"group": node}}` keyed by the
group's first port, times on CLOCK_MONOTONIC, which every namespace of the machine shares, so the
caller can subtract its own timestamps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from vipfarm.lab.load import Target, _one, parse_target


async def _watch(
    target: Target, ports: list[int], avoid: str | None, attempt_s: float, deadline: float
) -> tuple[float | None, str | None]:
    i = 0
    while time.monotonic() < deadline:
        reply = await _one(target, 0, ports[i % len(ports)], attempt_s, deadline)
        i += 1
        if reply.error is None and reply.node != avoid:
            return time.monotonic(), reply.node
        if reply.error is None:  # still the old node: not failed over yet
            await asyncio.sleep(0.005)
    return None, None


async def run(
    url: str, groups: list[list[int]], avoid: str | None, attempt_s: float, total_s: float
) -> dict[str, object]:
    target = parse_target(url)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    go = time.monotonic()
    deadline = go + total_s
    results = await asyncio.gather(*(_watch(target, g, avoid, attempt_s, deadline) for g in groups))
    keys = [str(g[0]) for g in groups]
    return {
        "go": go,
        "first_ok": {k: t for k, (t, _) in zip(keys, results, strict=True) if t is not None},
        "nodes": {k: n for k, (_, n) in zip(keys, results, strict=True) if n is not None},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipfarm.lab.probe")
    parser.add_argument("url")
    parser.add_argument("--ports", required=True, help="groups of ports: 1,2,3;4,5,6")
    parser.add_argument("--avoid", help="a reply from this node does not count")
    parser.add_argument("--attempt-timeout", type=float, default=0.2)
    parser.add_argument("--deadline", type=float, default=20.0)
    args = parser.parse_args(argv)
    groups = [[int(p) for p in g.split(",") if p] for g in args.ports.split(";") if g]
    out = asyncio.run(run(args.url, groups, args.avoid, args.attempt_timeout, args.deadline))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
