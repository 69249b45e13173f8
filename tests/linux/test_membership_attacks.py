"""Issue 11 acceptance: the heartbeat attacks measured on a lab, no farm key known.

(a) Replay: node2's heartbeats are captured off the wire in node1's namespace, node2 is killed,
    node1's daemon is restarted, and the capture is played to node1 from node2's address. Before
    the fix node1 took node2 for alive and gave it half of its buckets; now the replayed
    incarnation never proves itself fresh, and node1 holds every bucket.
(b) Flood: 4,096 random 60 kB datagrams to node1's heartbeat port (half of them with our magic,
    version and farm id, so that they reach the length checks) from node2's address, and more
    from a client; the pulse's memory stays flat and the farm intact.

Every loop is bounded in count and time, traffic goes only to addresses inside the lab, and
every wait polls with a deadline.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vipfarm.lab import attacker
from vipfarm.lab.netns import run_in_netns
from vipfarm.lab.testbed import Lab, LabFactory
from vipfarm.lab.topology import node_lan4
from vipfarm.membership.wire import MAGIC, VERSION, farm_id

PORT = 9001  # the lab's heartbeat port (vipfarm.lab.farm)
BUCKETS = 256


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def capture(lab: Lab, where: str, src: str, seconds: float, limit: int = 200) -> list[bytes]:
    """UDP payloads from `src` to the heartbeat port seen in `where`'s namespace (what an
    attacker on the LAN sees)."""
    return attacker.capture(lab.ns(where), src, PORT, seconds, limit)


def send_from(
    lab: Lab,
    where: str,
    bind: tuple[str, int],
    dst: str,
    payloads: list[bytes],
    gap: float,
    stop: threading.Event | None = None,
) -> int:
    """Send `payloads` (bounded) from `where`'s namespace, `gap` seconds apart; returns the
    number sent."""

    def send() -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        try:
            s.bind(bind)
            n = 0
            for p in payloads:
                if stop is not None and stop.is_set():
                    break
                try:
                    s.sendto(p, (dst, PORT))
                    n += 1
                except OSError:  # a full queue under the flood: that datagram is lost
                    pass
                if gap:
                    time.sleep(gap)
            return n
        finally:
            s.close()

    return run_in_netns(lab.ns(where), send, timeout=len(payloads) * (gap + 0.01) + 60)


def pulse_pid(lab: Lab, node: str) -> int:
    return int((lab.dir / "run" / node / "pulse.pid").read_text())


def module_log(lab: Lab, node: str) -> str:
    return (lab.dir / "nodelogs" / node / "module.log").read_text()


def test_a_replay_of_a_dead_peer_to_a_restarted_node_changes_nothing(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=2, daemon=True, app="builtin")
    node1, node2 = str(node_lan4(1)), str(node_lan4(2))
    recorded = capture(lab, "node1", node2, seconds=8.0)
    assert len(recorded) >= 50, len(recorded)
    lab.kill("node2")
    wait_for(
        "node1 to take every bucket",
        lambda: lab.kernel_owned(["node1"])["node1"] == list(range(BUCKETS)),
    )

    # node1's daemon restarts; once it answers (its pulse runs and its manager is connected,
    # so it joins within moments), node2's recording plays to it from node2's address, in order
    # and at its own pace (about 8 s of a live-looking node2)
    old_pulse = pulse_pid(lab, "node1")
    lab.kill("node1")
    lab.start_daemon("node1", wait=False)

    def answers() -> bool:
        try:
            st = lab.daemon_state("node1", timeout=2.0)
        except Exception:  # not yet: the daemon is starting
            return False
        return bool(st["processes"]["pulse_pid"] != old_pulse)

    wait_for("node1's new daemon to answer", answers, timeout=60)
    stop = threading.Event()
    sent: list[int] = []
    player = threading.Thread(
        target=lambda: sent.append(
            send_from(lab, "node2", (node2, PORT), node1, recorded, 0.1, stop)
        )
    )
    player.start()
    try:

        def up_and_whole() -> bool:
            try:
                st = lab.daemon_state("node1", timeout=2.0)
            except Exception:  # not answering yet: the daemon is starting
                return False
            return st["state"] == "UP" and lab.kernel_owned(["node1"])["node1"] == list(
                range(BUCKETS)
            )

        wait_for("the restarted node1 to hold every bucket", up_and_whole)
        # ... while the replay still runs (before the fix, node1 took the recording for a
        # live node2 and kept only its own half until the replay ended)
        assert player.is_alive(), "the replay ended before node1 held every bucket"
        while player.is_alive():  # and it never gives one away while the replay runs
            assert lab.kernel_owned(["node1"])["node1"] == list(range(BUCKETS))
            time.sleep(0.2)
        st = lab.daemon_state("node1")
        assert [f["alive"] for f in st["farm"] if f["node"] == "node2"] == [False]
        assert st["state"] == "UP" and len(st["owned"]) == BUCKETS
        assert st["drops"].get("unproven", 0) > 0, st["drops"]
    finally:
        stop.set()
        player.join(timeout=60)
    assert sent == [len(recorded)]
    since_restart = module_log(lab, "node1").split("pulse_started")[-1]
    assert "peer=node2" not in since_restart or "peer_up" not in since_restart


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_flood_of_large_datagrams_keeps_the_pulse_flat_and_the_farm_intact(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=2, daemon=True, app="builtin")
    node1, node2 = str(node_lan4(1)), str(node_lan4(2))
    pid = pulse_pid(lab, "node1")
    before = rss_kib(pid)
    logged_before = module_log(lab, "node1").count("peer_down")
    ours = MAGIC + bytes([VERSION, 0]) + farm_id(lab.name)
    flood = [
        (ours if i % 2 else b"") + os.urandom(60_000 - (len(ours) if i % 2 else 0))
        for i in range(64)
    ]
    # every datagram distinct: a cache keyed by bytes would keep each
    payloads = [p[:-4] + i.to_bytes(4, "big") for i in range(4096) for p in (flood[i % 64],)]
    t0 = time.monotonic()
    n = send_from(lab, "node2", (node2, 0), node1, payloads, 0.0005)
    stranger = send_from(lab, "client1", ("0.0.0.0", 0), node1, payloads[:512], 0.0005)
    took = time.monotonic() - t0
    assert n == 4096 and stranger == 512
    assert took < 120

    def counted() -> bool:
        st = lab.daemon_state("node1")
        return bool(sum(st["drops"].values()) >= 1000)

    wait_for("node1 to count the flood", counted)
    after = rss_kib(pid)
    print(f"pulse RSS {before} KiB -> {after} KiB after the flood ({took:.1f} s)")
    assert after - before < 16 * 1024, (before, after)
    st = lab.daemon_state("node1")
    drops = st["drops"]
    assert drops.get("unknown_source", 0) > 0, drops
    assert drops.get("malformed", 0) + drops.get("not_vipfarm", 0) > 0, drops
    # the farm stayed intact: nobody was taken for dead, every bucket owned once
    assert module_log(lab, "node1").count("peer_down") == logged_before
    assert "peer_down" not in module_log(lab, "node2")
    assert lab.holds_every_bucket_once(["node1", "node2"])
    assert all(f["alive"] for f in st["farm"])
