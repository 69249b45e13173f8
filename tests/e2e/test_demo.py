"""The README's first command: `vipfarm demo` runs a whole farm and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

from vipfarm.lab.testbed import unique_name


def test_demo_runs_to_its_summary_and_removes_the_lab() -> None:
    name = unique_name()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vipfarm", "demo", "--name", name],
            capture_output=True,
            text=True,
            timeout=300,
        )
        # exit 0: every act settled (a crash failed over, the node rejoined, a drain and a start)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "summary" in proc.stdout and f"lab {name} removed" in proc.stdout
        # kill -9 resets the requests in flight on the killed node, nothing else may fail: no
        # connection refused, none timed out
        tail = proc.stdout[proc.stdout.rindex("connections in all") :]
        assert "refused" not in tail and "timeout" not in tail, tail
    finally:
        subprocess.run([sys.executable, "-m", "vipfarm", "lab", "down", "--name", name])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in left
