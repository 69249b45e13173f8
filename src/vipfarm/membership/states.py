"""The local node's state machine, as one transition table (data, not code).

States (DESIGN section 1): STOP (not in the farm), STARTING (joined, listening to the farm for
`dead_after` before claiming anything, so it knows every live owner), WAIT (in the farm, the
application is not healthy, owns nothing), UP (owns its share), DRAINING (giving every bucket
away), STOPPING (owns nothing; the daemon lets established connections finish and stops the
application, then reports `stopped`).

Only UP nodes are members of the assignment. The core fires a trigger and looks the pair up in
`TRANSITIONS`; a pair that is not there is a no-op (e.g. HEALTHY while DRAINING: the drain goes
on). `mermaid()` renders the table for docs/MEMBERSHIP.md, so the diagram cannot drift from the
code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from vipfarm.membership.wire import NodeState


class Trigger(StrEnum):
    JOIN = "join"
    LEARNED = "learned"  # listened for dead_after: every live peer has been heard
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    LEAVE = "leave"
    DRAINED = "drained"  # every bucket released and the kernel confirmed it
    STOPPED = "stopped"  # the daemon stopped the application


S, T = NodeState, Trigger
TRANSITIONS: Final[dict[tuple[NodeState, Trigger], NodeState]] = {
    (S.STOP, T.JOIN): S.STARTING,
    (S.STARTING, T.LEARNED): S.WAIT,
    (S.WAIT, T.HEALTHY): S.UP,
    (S.UP, T.UNHEALTHY): S.WAIT,
    (S.STARTING, T.LEAVE): S.STOPPING,
    (S.WAIT, T.LEAVE): S.DRAINING,
    (S.UP, T.LEAVE): S.DRAINING,
    (S.DRAINING, T.DRAINED): S.STOPPING,
    (S.DRAINING, T.JOIN): S.WAIT,
    (S.STOPPING, T.JOIN): S.WAIT,
    (S.STOPPING, T.STOPPED): S.STOP,
}
del S, T


def next_state(state: NodeState, trigger: Trigger) -> NodeState | None:
    """The state after `trigger`, or None when the table has no such transition."""
    return TRANSITIONS.get((state, trigger))


def mermaid() -> str:
    """The transition table as a Mermaid state diagram."""
    lines = ["stateDiagram-v2", f"    [*] --> {NodeState.STOP.name}"]
    for (src, trig), dst in TRANSITIONS.items():
        lines.append(f"    {src.name} --> {dst.name}: {trig.value}")
    return "\n".join(lines) + "\n"
