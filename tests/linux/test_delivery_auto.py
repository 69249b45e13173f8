"""Issue 15 acceptance, `delivery = "auto"`: the farm picks flood on a switch that floods and
directed on one that does not, by itself, and switches while it runs without breaking a
connection.

One daemon-mode lab (3 nodes, built-in application, one client) whose switch floods at first;
the test turns unknown-unicast flooding off on the node ports and back on while connections
are held. Waits poll with deadlines.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from vipfarm.lab import testbed
from vipfarm.lab.testbed import Lab, unique_name

NODES = ["node1", "node2", "node3"]


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_name("dm")
    try:
        yield testbed.up(name, nodes=3, clients=1, app="builtin", daemon=True)
    finally:
        testbed.down(name)


def answers(lab: Lab) -> set[str]:
    return {lab.daemon_state(n)["delivery"]["answers"] for n in NODES}


def served(lab: Lab, count: int = 60) -> Counter[str | None]:
    replies = lab.load("client1", count=count, timeout=3, total_timeout=60)
    assert not [r.error for r in replies if r.error], Counter(r.error for r in replies)
    return Counter(r.node for r in replies)


def test_auto_picks_flood_then_directed_when_flooding_stops_and_back(lab: Lab) -> None:
    # auto is the default: the farm file does not name a delivery
    assert "delivery" not in lab.farm_config.read_text()
    wait_for("every node to answer in flood style", lambda: answers(lab) == {"flood"})
    st = lab.daemon_state("node1")["delivery"]
    assert st["mode"] == "auto" and st["deaf_nodes"] == []
    assert all(age is not None for age in st["probe_heard_ms"].values()), st
    assert set(served(lab)) == set(NODES)
    with lab.hold("client1", 90) as held:
        assert held.initial["ok"] == 90
        lab.set_flood(False)
        took = wait_for("every node to answer directed", lambda: answers(lab) == {"directed"})
        # the evidence: in the end nobody hears anybody's probe (the first deaf node is enough
        # to switch every node)
        wait_for(
            "every node to be deaf",
            lambda: lab.daemon_state("node1")["delivery"]["deaf_nodes"] == NODES,
        )
        assert set(served(lab)) == set(NODES)
        probe = held.probe()
        assert probe["ok"] == 90 and probe["moved"] == 0, (probe, took)
        log = (lab.dir / "nodelogs" / "node1" / "module.log").read_text()
        assert "delivery_mode_changed" in log and "mode=directed" in log
        lab.set_flood(True)
        wait_for("every node to answer in flood style again", lambda: answers(lab) == {"flood"})
        assert set(served(lab)) == set(NODES)
        probe = held.probe()
        assert probe["ok"] == 90 and probe["moved"] == 0, probe
