"""What the node API takes and returns, as pydantic models.

One set of models for both transports: the HTTP API declares them as request bodies and response
models (so the OpenAPI schema is exact and schemathesis checks every answer against it), the
local control socket sends their JSON dump, and the CLI and the nodes parse answers back into
them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

LogName = Literal["module", "app"]


def _whole_number(value: object) -> object:
    # JSON Schema counts 5.0 as an integer; strict pydantic would not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_whole_number)]


class _Model(BaseModel):
    """An answer. Unknown keys are ignored when reading one, so a node still understands a
    peer that runs a newer version (a rolling upgrade)."""

    model_config = ConfigDict(extra="ignore")


class _Query(BaseModel):
    """Query parameters: strings by nature, so converted; unknown ones refused."""

    model_config = ConfigDict(extra="forbid")


class _Request(BaseModel):
    """A JSON request body: no coercion (`0` is not `false`), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FarmNode(_Model):
    """One node as the answering node sees it."""

    node: str
    state: str = Field(description="STOP, STARTING, WAIT, UP, DRAINING or STOPPING")
    share: float = Field(description="percentage of the buckets it holds")
    alive: bool
    incarnation: int | None
    weight: int
    heartbeat_age_ms: dict[str, float | None] = Field(
        description="per heartbeat network, ms since its last heartbeat; empty for itself"
    )
    config_version: int | None = Field(
        default=None, description="its configuration version, when its API answered"
    )


class NodeProcesses(_Model):
    """The two processes of a node (`vipfarm.node`): who answers, and whether the pulse did."""

    manager_pid: int
    pulse_pid: int | None = Field(description="None until the pulse answered once")
    pulse_answered: bool = Field(
        description="the pulse answered this request; if not, state and farm are its last answer"
    )
    pulse_priority: str | None = Field(default=None, description="rr:N, nice:N or normal")
    pulse_timer_late_ms: dict[str, float] | None = Field(
        default=None,
        description="how late the pulse's timer fired: max since start, recent_max (last "
        "10-20 s), and counts over 5 and 20 ms; the margin the timers must leave",
    )


class NodeStatus(_Model):
    """A node's own state and its view of the farm."""

    farm_name: str
    node: str
    state: str
    share: float
    app: str = Field(description="the application supervisor's state")
    owned: list[int] = Field(description="buckets its kernel holds")
    kept: list[int] | None = Field(
        default=None,
        description="buckets its kernel keeps (read back): the owned ones, and those given away "
        "while it still serves established connections in them (docs/DATAPATH.md)",
    )
    split_brain: bool
    drops: dict[str, int] = Field(description="rejected heartbeats by reason")
    counters: dict[str, int]
    config_version: int
    config_digest: str
    farm: list[FarmNode]
    processes: NodeProcesses | None = Field(
        default=None, description="the node's pulse and manager processes"
    )
    delivery: dict[str, Any] | None = Field(
        default=None,
        description="how frames reach the nodes: mode, each VIP's entry node, peer MACs "
        "(directed delivery, docs/DATAPATH.md)",
    )
    prefilter: dict[str, Any] | None = Field(
        default=None,
        description="the BPF prefilter that drops other nodes' frames before nftables: on, "
        "frames dropped, or why it is off (docs/DATAPATH.md)",
    )


class StopRequest(_Request):
    force: bool = Field(default=False, description="do not wait for connections to end")


class ActionResult(_Model):
    node: str
    state: str
    force: bool = False


MAX_LINES = 10_000


class LogQuery(_Query):
    log: LogName = "module"
    offset: int | None = Field(default=None, ge=0, description="byte offset; none: the tail")
    limit: int = Field(default=100, ge=1, le=MAX_LINES)


class StreamQuery(_Query):
    log: LogName = "module"
    offset: int | None = Field(default=None, ge=0, description="byte offset; none: the end")


class LogPage(_Model):
    """Whole lines of a log file from byte `offset` up to `next_offset`."""

    log: LogName
    lines: list[str]
    offset: int
    next_offset: int
    size: int


class ConfigInfo(_Model):
    version: int = Field(description="0 until the first deployment")
    digest: str = Field(description="SHA-256 prefix of the text without its version line")
    path: str
    text: str


class DeployRequest(_Request):
    text: str = Field(description="the whole farm configuration (TOML)")
    dry_run: bool = Field(default=False, description="validate on every node, change nothing")


class NodeVerdict(_Model):
    """One node's part in a deployment."""

    node: str
    outcome: Literal["applied", "accepted", "refused", "unreachable", "skipped", "failed"]
    message: str = ""


class DeployResult(_Model):
    ok: bool
    dry_run: bool
    version: int = Field(description="the version deployed (for a dry run: it would be)")
    digest: str
    changes: list[str] = Field(description="configuration keys that changed")
    nodes: list[NodeVerdict]


class PrepareRequest(_Request):
    deploy_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    origin: str = Field(max_length=64)
    text: str


class PrepareReply(_Model):
    node: str
    version: int
    digest: str
    changes: list[str]
    tokens: str | None = Field(
        default=None,
        description="fingerprint of the API tokens the node would accept with this "
        "configuration, so that the coordinator can refuse token files that differ between "
        "nodes (none from nodes that predate it)",
    )


class CommitRequest(_Request):
    deploy_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    version: JsonInt = Field(ge=1)


class CommitReply(_Model):
    node: str
    version: int
    digest: str
    changes: list[str]


class AbortRequest(_Request):
    deploy_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class Ack(_Model):
    node: str


class Problem(_Model):
    path: str
    message: str


class ErrorBody(_Model):
    """Every error answer: what went wrong and, where it applies, the fix."""

    detail: str
    problems: list[Problem] = Field(default_factory=list)
    nodes: list[NodeVerdict] = Field(default_factory=list)
