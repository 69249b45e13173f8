"""CI's chaos smoke test: 60 seconds of random faults under load. It asserts that the run
completes and that its safety counters are zero; it asserts no speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_sixty_seconds_of_chaos_accept_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vipfarm", "chaos", "--duration", "60", "--seed", "7",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["duration_s"] >= 60
    assert len(report["faults"]) >= 5
    assert report["requests"] > 1000
    assert report["accepted_twice"] == 0
    assert report["false_failovers"] == 0, report["false_failover_events"]
    # every fault that takes a node away converges without it (a bucket never stays unowned)
    for f in report["faults"]:
        if f["kind"] in ("kill9", "daemon_crash", "link_flap"):
            assert f["converge_ms"] is not None, f
        assert f["recover_ms"] is not None, f
