"""Drive wrk(1) and read its figures exactly.

wrk is run with a small Lua script whose `done()` hook prints one line, `VIPFARM_WRK {json}`, with
the raw counters (requests, duration and latency percentiles in microseconds, the socket errors
and the count of non-2xx/3xx replies). Reading those numbers beats parsing wrk's human summary,
which rounds to two decimals and changes unit (us, ms, s) with the magnitude.

Two modes: `keepalive` (wrk's default: each connection carries many requests) and `close`
(`Connection: close`: the server closes after each reply, so every request is a new TCP
connection, which is what exercises the farm's per-flow decision).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from vipfarm.errors import VipfarmError

MARKER = "VIPFARM_WRK "

# done() runs once after every thread has finished; `latency` holds every request's latency in
# microseconds.
DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d}\\n',
    "MARKER", summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
""".replace("MARKER", MARKER)


class Mode(StrEnum):
    CLOSE = "close"
    KEEPALIVE = "keepalive"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


class WrkError(VipfarmError):
    """wrk did not run to its summary; the text holds wrk's own words."""


def wrk_argv(
    url: str, mode: Mode, duration_s: float, connections: int, threads: int, script: str
) -> list[str]:
    argv = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration_s))}s",
        "--timeout=2s",
        f"--script={script}",
    ]
    if mode is Mode.CLOSE:
        argv += ["--header", "Connection: close"]
    return [*argv, url]


def parse_wrk(stdout: str) -> WrkResult:
    """The figures from wrk's output with `DONE_LUA`; WrkError when the marker line is missing."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            try:
                raw = json.loads(line.removeprefix(MARKER))
                return WrkResult(
                    requests=int(raw["requests"]),
                    duration_s=raw["duration_us"] / 1e6,
                    p50_ms=raw["p50_us"] / 1000,
                    p90_ms=raw["p90_us"] / 1000,
                    p99_ms=raw["p99_us"] / 1000,
                    max_ms=raw["max_us"] / 1000,
                    socket_errors=sum(int(raw[k]) for k in ("connect", "read", "write", "timeout")),
                    non_2xx=int(raw["status"]),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise WrkError(f"wrk summary line is malformed ({e}): {line!r}") from None
    tail = "\n".join(stdout.strip().splitlines()[-5:])
    raise WrkError(f"wrk printed no summary line:\n{tail or '(no output)'}")
