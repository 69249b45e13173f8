"""Farm key rotation without downtime, end to end on a lab: two live deployments.

Step 1 adds `farm.next_key_file`: every node accepts both keys and, once every peer advertises
the new one, sends with it. Step 2 makes the new key the only one. Heartbeats are captured off
the wire in node1's namespace to see which key each node sends with; throughout, no node is
taken for dead and every bucket has exactly one owner.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections.abc import Callable

import pytest

from vipfarm.lab.testbed import Lab, LabFactory
from vipfarm.lab.topology import node_lan4
from vipfarm.membership.wire import key_id

from .test_membership_attacks import capture

BUCKETS = 256


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def keys_on_the_wire(lab: Lab, seconds: float = 1.5) -> dict[str, set[tuple[int, int]]]:
    """(key id, other key id) of the heartbeats node2 and node3 send to node1."""
    out: dict[str, set[tuple[int, int]]] = {}
    for peer in ("node2", "node3"):
        src = str(node_lan4(int(peer.removeprefix("node"))))
        got = capture(lab, "node1", src, seconds=seconds, limit=40)
        out[peer] = {
            (int.from_bytes(d[36:40], "big"), int.from_bytes(d[40:44], "big"))
            for d in got
            if len(d) > 44 and d[2] >= 2  # versions 2 and 3 name their keys
        }
    return out


def deploy(lab: Lab, text: str) -> None:
    path = lab.dir / f"deploy-{secrets.token_hex(3)}.toml"
    path.write_text(text)
    out = lab.exec(
        "node1", [sys.executable, "-m", "vipfarm", "config", "deploy", str(path)], timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


class Watch:
    """Samples the kernels every 0.2 s in a thread: every bucket owned once, always."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.bad: list[dict[str, list[int] | None]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            owned = self.lab.kernel_owned()
            held = [b for n in owned.values() for b in (n or [])]
            if not len(held) == len(set(held)) == BUCKETS:
                self.bad.append(owned)
            self.polls += 1
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class Traffic:
    """New connections to the VIP from client1, in batches of 40, until stopped (bounded by the
    ports 40000-59999: each connection has its own source port)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.served = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        port = 40000
        while not self._stop.is_set() and port + 40 <= 59999:
            replies = self.lab.load("client1", count=40, timeout=3.0, source_port=port)
            port += 40
            self.served += sum(1 for r in replies if r.error is None)
            self.failed += [r.error for r in replies if r.error is not None]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_the_farm_key_is_rotated_live_without_a_gap(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, daemon=True, app="builtin")
    old_key = (lab.dir / "farm.key").read_bytes().rstrip(b"\n")
    new_file = lab.dir / "farm-2.key"
    new_file.touch(mode=0o600)
    new_file.write_text(secrets.token_hex(32) + "\n")
    new_key = new_file.read_bytes().rstrip(b"\n")
    old_id, new_id = key_id(old_key), key_id(new_key)
    assert keys_on_the_wire(lab) == {p: {(old_id, 0)} for p in ("node2", "node3")}

    base = lab.farm_config.read_text()
    key_line = next(line for line in base.splitlines() if line.startswith("key_file = "))
    watch = Watch(lab)
    traffic = Traffic(lab)
    try:
        deploy(
            lab, base.replace(key_line, f"{key_line}\nnext_key_file = {json.dumps(str(new_file))}")
        )
        wait_for(
            "every node to send with the new key",
            lambda: (
                keys_on_the_wire(lab, 1.0) == {p: {(new_id, old_id)} for p in ("node2", "node3")}
            ),
        )
        deploy(lab, base.replace(key_line, f"key_file = {json.dumps(str(new_file))}"))
        wait_for(
            "the old key to be retired",
            lambda: keys_on_the_wire(lab, 1.0) == {p: {(new_id, 0)} for p in ("node2", "node3")},
        )
        lab.wait_farm_up(10)
    finally:
        traffic.stop()
        watch.stop()
    assert watch.polls > 10
    assert watch.bad == []
    assert traffic.served > 100 and traffic.failed == [], (traffic.served, traffic.failed[:5])
    for node in lab.node_names:
        log = (lab.dir / "nodelogs" / node / "module.log").read_text()
        assert "peer_down" not in log, log[-3000:]
        assert "farm_keys_changed" in log
        drops = lab.daemon_state(node)["drops"]
        assert drops.get("unknown_key", 0) == 0 and drops.get("bad_mac", 0) == 0, drops
