"""Issue 15: the lab's switch that floods no unknown unicast (`vipfarm lab up --no-flood`), and
why directed delivery exists: on it, a flood farm answers nothing, and a directed one does.
One static lab."""

from __future__ import annotations

from vipfarm.lab.testbed import LabFactory


def test_a_flood_farm_answers_nothing_until_the_switch_floods(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, app="builtin", no_flood=True)
    replies = lab.load("client1", count=9, timeout=1, total_timeout=15)
    assert [r.node for r in replies if r.node] == []
    lab.set_flood(True)
    replies = lab.load("client1", count=9, timeout=2, total_timeout=15)
    assert all(r.node for r in replies), [r.error for r in replies]
    lab.set_flood(False)
    ports = lab.exec("switch", ["bridge", "-d", "link", "show"]).stdout
    assert ports.count("flood off") >= 3, ports
    # the same static farm in directed delivery (what the throughput bench compares)
    lab.set_directed("node1")
    replies = lab.load("client1", count=90, timeout=2, total_timeout=30)
    assert all(r.node for r in replies), [r.error for r in replies]
    assert {r.node for r in replies} == {"node1", "node2", "node3"}
