"""`vipfarm sim`: the real membership cores over a simulated network (vipfarm.membership.sim).

Prints one JSON object with `--json` (the metrics of the issue: ownership, convergence,
movement, balance, false failovers, heartbeat traffic), otherwise a short human summary. Bad
options exit with status 2 and a message that names the value and the fix.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from vipfarm.config.schema import TIMING_PROFILES
from vipfarm.membership.sim import SCENARIOS, SimConfig, simulate


def _range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        return (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not MIN-MAX in milliseconds, e.g. 1-5") from None


def _weights(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def sim(
    nodes: int = typer.Option(8, "--nodes", help="farm nodes (1-255)"),
    buckets: int = typer.Option(256, "--buckets", help="buckets B (1-4096)"),
    scenario: str = typer.Option(
        "crash", "--scenario", help=f"what happens every --period: {'|'.join(SCENARIOS)}"
    ),
    loss: float = typer.Option(0.0, "--loss", help="probability that a datagram is lost"),
    delay_ms: str = typer.Option("1-5", "--delay-ms", help="one-way delay range MIN-MAX (ms)"),
    duplicate: float = typer.Option(0.0, "--dup", help="probability of a duplicate datagram"),
    reorder: float = typer.Option(
        0.0, "--reorder", help="probability of up to 2 intervals extra delay (reordering)"
    ),
    duration: float = typer.Option(30.0, "--duration", help="simulated seconds"),
    seed: int = typer.Option(1, "--seed", help="random seed (runs are reproducible)"),
    period: float = typer.Option(4.0, "--period", help="seconds between scenario events"),
    weights: str | None = typer.Option(None, "--weights", help="per-node weights, e.g. 1,1,2"),
    networks: int = typer.Option(1, "--networks", help="heartbeat networks (1-3)"),
    fault_loss: float = typer.Option(
        0.5,
        "--fault-loss",
        help="scenario hb_loss: extra loss of the faulty node's datagrams, both ways",
    ),
    profile: str = typer.Option(
        "tolerant",
        "--profile",
        help="the timers of this timing.profile: fast|default|tolerant|wan (tolerant, "
        "100/300/500 ms, keeps the figures of docs/MEMBERSHIP.md comparable)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run the membership core over a simulated network with a virtual clock."""
    timers = TIMING_PROFILES.get(profile)
    if timers is None:
        typer.echo(
            f"error: --profile {profile!r}: use one of {', '.join(TIMING_PROFILES)}", err=True
        )
        raise typer.Exit(2)
    interval_ms, lease_ms, dead_after_ms = timers
    try:
        cfg = SimConfig(
            interval=interval_ms / 1000,
            dead_after=dead_after_ms / 1000,
            lease=lease_ms / 1000,
            nodes=nodes,
            buckets=buckets,
            scenario=scenario,
            loss=loss,
            delay_ms=_range(delay_ms),
            duplicate=duplicate,
            reorder=reorder,
            duration=duration,
            seed=seed,
            period=period,
            weights=_weights(weights),
            networks=networks,
            fault_loss=fault_loss,
        )
        result = simulate(cfg)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(_summary(result))


def _summary(r: dict[str, Any]) -> str:
    conv = r["convergence_ms"]
    lines = [
        f"{r['nodes']} nodes, {r['buckets']} buckets, scenario {r['scenario']}, "
        f"{r['duration_s']} s simulated in {r['wall_s']} s",
        f"max owners per bucket (connected): {r['max_owners_per_bucket']}",
        f"max unowned: {r['max_unowned_ms']} ms",
        f"convergence: {len(conv)} events, max {max(conv) if conv else '-'} ms",
        f"moved buckets: {r['moved_buckets']} (optimal {r['optimal_moved_buckets']})",
        f"balance max/mean: {r['balance_max_over_mean']}",
        f"false failovers: {r['false_failovers']}",
        f"heartbeat traffic: {r['heartbeat_bytes_per_node_per_s']} B/s per node",
    ]
    if r["unconverged_events"]:
        lines.append(f"not converged at the end: {', '.join(r['unconverged_events'])}")
    return "\n".join(lines)
