"""`vipfarm bench --quick`: the CI smoke test. The run completes, writes every file, each figure is
a positive number, the safety counters are zero and no lab is left behind. No speed assertions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from vipfarm.bench.wrk import Mode

BENCH_NS = re.compile(r"^v[bd][0-9a-f]{6}-")  # labs, and drop_decision's veth pair


def _bench_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if BENCH_NS.match(line)}


def test_quick_bench_writes_results_plots_and_summary(tmp_path: Path) -> None:
    before = _bench_namespaces()
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vipfarm", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 120 * 1.5, f"--quick took {elapsed:.0f} s; the issue allows 2 minutes"

    results = json.loads((out / "results.json").read_text())
    assert results["safety"] and not any(results["safety"].values()), results["safety"]
    for key in (
        "farm_rps",
        "haproxy_rps",
        "haproxy_http_rps",
        "direct_rps",
        "farm_p99_ms",
        "haproxy_p99_ms",
        "farm_cpu_us",
        "node_vip_rps",
        "node_direct_rps",
        "node_bare_rps",
        "drop_flooded_cpu_us",
        "drop_packets_per_request",
    ):
        assert set(results[key]) == {str(m) for m in Mode}, key
        assert all(v > 0 for v in results[key].values()), (key, results[key])
    for key in ("farm_vs_haproxy_rps", "datapath_overhead_pct", "drop_cpu_us"):
        assert set(results[key]) == {str(m) for m in Mode}, key
    for key in ("drop_cpu_us_per_packet_nft", "drop_cpu_us_per_packet_prerouting"):
        assert set(results[key]) == {str(m) for m in Mode}, key
    # The decision alone: the floor and what each decision point adds to it, per kind of frame.
    for kind in ("syn", "established"):
        assert results[f"decision_floor_ns_{kind}"] > 0
        for point in ("prefilter", "nft", "prerouting"):
            assert isinstance(results[f"decision_ns_{point}_{kind}"], float), (point, kind)
    # Non-owners receive the flooded frames (a few per request), and none when not flooded.
    assert results["drop_packets_per_request"]["close"] > 2
    assert results["drop_isolated_packets_per_request"]["close"] < 0.1
    assert results["meta"]["command"].startswith("vipfarm bench --quick")
    assert results["meta"]["machine"]["nproc"] >= 1
    assert {t["figure"] for t in results["targets"]} >= {
        "farm_vs_haproxy_rps",
        "farm_vs_haproxy_p99",
        "datapath_overhead_pct",
    }
    for png in (
        "throughput_rps.png",
        "latency_p99.png",
        "cpu_per_request.png",
        "overhead_rps.png",
        "drop_cost.png",
    ):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    summary = (out / "summary.md").read_text()
    assert "vipfarm bench --quick" in summary and "](throughput_rps.png)" in summary
    assert _bench_namespaces() <= before, "the bench left namespaces behind"
