"""The node state machine: one table, and the diagram in docs/MEMBERSHIP.md generated from it."""

from __future__ import annotations

from pathlib import Path

from vipfarm.membership.states import TRANSITIONS, Trigger, mermaid, next_state
from vipfarm.membership.wire import NodeState

DOC = Path(__file__).resolve().parents[2] / "docs" / "MEMBERSHIP.md"


def test_docs_carry_the_diagram_generated_from_the_table() -> None:
    text = DOC.read_text()
    block = text.split("<!-- states:begin -->\n```mermaid\n", 1)[1].split("```\n<!--", 1)[0]
    assert block == mermaid(), (
        "docs/MEMBERSHIP.md is out of date: paste the output of "
        "`python -c 'from vipfarm.membership.states import mermaid; print(mermaid())'`"
    )


def test_every_state_is_reachable_from_stop_and_can_get_back() -> None:
    reach = {NodeState.STOP}
    while True:
        more = {dst for (src, _), dst in TRANSITIONS.items() if src in reach} - reach
        if not more:
            break
        reach |= more
    assert reach == set(NodeState)
    for state in NodeState:
        seen, todo = {state}, [state]
        while todo:
            s = todo.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        assert NodeState.STOP in seen, state


def test_unknown_pairs_are_no_ops() -> None:
    assert next_state(NodeState.UP, Trigger.HEALTHY) is None
    assert next_state(NodeState.DRAINING, Trigger.HEALTHY) is None
    assert next_state(NodeState.STOP, Trigger.LEAVE) is None
    assert next_state(NodeState.UP, Trigger.LEAVE) is NodeState.DRAINING
