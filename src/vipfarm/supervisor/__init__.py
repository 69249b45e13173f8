"""Application supervisor: module scripts, checkers, restart policy and the node's log files.

See `supervisor.py` for the life cycle, `scripts.py` for process groups and output, and
`checkers.py` for the probes and the rise/fall filter.
"""

from vipfarm.supervisor.checkers import CheckResult, RiseFall, run_check
from vipfarm.supervisor.logs import setup_node_logs
from vipfarm.supervisor.scripts import (
    ScriptResult,
    ScriptRunner,
    group_members,
    kill_group,
    pid_alive,
)
from vipfarm.supervisor.supervisor import (
    AppState,
    AppSupervisor,
    Exhausted,
    Healthy,
    Restarting,
    RestartWindow,
    ScriptFinished,
    SupervisorEvent,
    Unhealthy,
)

__all__ = [
    "AppState",
    "AppSupervisor",
    "CheckResult",
    "Exhausted",
    "Healthy",
    "RestartWindow",
    "Restarting",
    "RiseFall",
    "ScriptFinished",
    "ScriptResult",
    "ScriptRunner",
    "SupervisorEvent",
    "Unhealthy",
    "group_members",
    "kill_group",
    "pid_alive",
    "run_check",
    "setup_node_logs",
]
