"""Property tests: random schedules of failures over a hostile simulated network.

Hypothesis draws a farm (2..6 nodes, weights, 16 or 64 buckets), a network (loss, delay,
duplication, reordering) and a schedule of crashes, restarts, drains, application health flips
and partitions, and runs the real cores in the simulator. Two properties must hold:

1. Safety: while the live nodes are connected, no bucket ever has two owners (the simulator
   checks every acquisition against every kernel whose lease has not run out).
2. Liveness: once the network is quiet (no more steps, no more loss) for dead_after plus two
   intervals, every bucket has exactly one owner, every UP node holds its quota (within one
   bucket of its weighted share) and every view agrees: nothing moves any more.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vipfarm.membership.core import Membership
from vipfarm.membership.sim import Action, SimConfig, Simulator

KINDS = ["crash", "start", "drain", "healthy", "unhealthy", "partition", "heal"]


@st.composite
def schedules(draw: st.DrawFn) -> tuple[SimConfig, list[Action]]:
    nodes = draw(st.integers(2, 6))
    lo = draw(st.floats(0.1, 5.0))
    cfg = SimConfig(
        nodes=nodes,
        buckets=draw(st.sampled_from([16, 64])),
        loss=draw(st.sampled_from([0.0, 0.02, 0.1, 0.3])),
        delay_ms=(lo, lo + draw(st.floats(0.0, 10.0))),
        duplicate=draw(st.sampled_from([0.0, 0.05])),
        reorder=draw(st.sampled_from([0.0, 0.05])),
        weights=draw(st.lists(st.integers(0, 3), min_size=nodes, max_size=nodes)),
        seed=draw(st.integers(0, 2**16)),
        duration=60.0,
    )
    t = 1.5
    script: list[Action] = []
    for _ in range(draw(st.integers(1, 10))):
        t += draw(st.floats(0.01, 1.5))
        script.append((t, draw(st.sampled_from(KINDS)), draw(st.integers(0, nodes - 1))))
    # Then the network heals and goes quiet, and every node is started and healthy.
    t += 0.01
    script += [(t, "heal", 0), (t, "quiet", 0)]
    script += [(t, "start", i) for i in range(nodes)] + [(t, "healthy", i) for i in range(nodes)]
    cfg.duration = t + cfg.dead_after + 2 * cfg.interval
    return cfg, script


@settings(max_examples=80, deadline=None)
@given(schedules())
def test_never_two_owners_and_settles_once_quiet(case: tuple[SimConfig, list[Action]]) -> None:
    cfg, script = case
    sim = Simulator(cfg, script)
    result = sim.run()
    assert result["max_owners_per_bucket"] <= 1
    assert sim.unsettled() is None
    live_up = [
        n for n in sim.nodes if n.core is not None and n.core.state.name == "UP" and n.weight
    ]
    owners = [sum(1 for n in sim.nodes if n.kernel >> b & 1) for b in range(cfg.buckets)]
    assert owners == [1 if live_up else 0] * cfg.buckets


@settings(max_examples=25, deadline=None)
@given(schedules())
def test_the_tallies_of_live_claims_equal_a_scan_of_the_live_peers(
    case: tuple[SimConfig, list[Action]],
) -> None:
    """The core keeps the union of the live peers' owned buckets (and of the owned and wanted
    buckets of peers with priority) per change instead of scanning every live peer at every
    evaluation: at every evaluation of every core the tallies equal that scan."""
    cfg, script = case
    evaluate = Membership._evaluate
    checked = [0]

    def checking(self: Membership, now: float) -> None:
        others = prio_owned = prio_want = 0
        for p in self._peer_list:
            if p.alive:
                assert p.hb is not None
                others |= p.hb.owned
                if p.prio:
                    prio_owned |= p.hb.owned
                    prio_want |= p.hb.want
        assert (self._others, self._prio_owned, self._prio_want) == (
            others,
            prio_owned,
            prio_want,
        )
        checked[0] += 1
        evaluate(self, now)

    Membership._evaluate = checking  # type: ignore[method-assign]
    try:
        Simulator(cfg, script).run()
    finally:
        Membership._evaluate = evaluate  # type: ignore[method-assign]
    assert checked[0] > 0
