"""Configuration deployment: validate everywhere, then apply everywhere, with a version number.

Theory of operation
-------------------
`vipfarm config deploy FILE` (or `PUT /api/v1/config`) hands the text to one node, the
*coordinator*, which runs two phases over every node of its running configuration (itself
included, called directly; the others over their HTTP API with the farm's token):

1. **prepare**: each node validates the text with its own view (`validate_for_node`): the whole
   file as the daemon loads it, its own name in it, its addresses present on the host, and no
   change to a setting that needs a daemon restart (`classify`). A node that accepts keeps the
   parsed configuration in its `PreparedSlot` for `PREPARE_TTL_S`, and refuses any other
   deployment meanwhile, so two concurrent deployments cannot interleave. It answers with its
   current version.
2. **commit** (only when every node accepted): the new version is one more than the highest
   current version, so versions only grow, across restarts too, since a node reads its version
   back from the file. Each node applies the live part (rules and VIPs through the data path,
   its weight, the drain timeout) and then writes the file atomically where it loaded it from,
   the version in its first line (`with_version`).

If any node refuses, the coordinator aborts the prepared nodes and nothing changes anywhere; the
error names the node and its reason. A node whose API cannot be reached counts as a refusal while
the coordinator's farm view shows it alive, and is skipped (it is down) otherwise: a node that was
down fetches the current version from a peer when it hears that peer again (rejoin sync, in the
daemon). A dry run stops after the prepare phase.

What can change live and what cannot: see `LIVE_KEYS` and docs/API.md. Everything that the
heartbeat protocol or the node's identity depends on (farm name, buckets, seed, timing,
networks, the node list, names, addresses, interfaces), the application module and where and
how the API listens (port, network, TLS) need a restart of every daemon, which a deployment
refuses with the list of keys. The API's tokens and limits change live, and so do the farm key
files: the pulse swaps the heartbeat keys without a gap (key rotation).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from vipfarm.api.models import (
    AbortRequest,
    CommitReply,
    CommitRequest,
    DeployResult,
    NodeVerdict,
    PrepareReply,
    PrepareRequest,
)
from vipfarm.config.loading import parse_config
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import FarmConfig
from vipfarm.datapath.spec import IPAddress
from vipfarm.errors import VipfarmError
from vipfarm.node.control import ControlError

PREPARE_TTL_S = 30.0
HEADER_PREFIX = "# vipfarm config version "
_HEADER_RE = re.compile(r"^# vipfarm config version (\d+)\b[^\n]*(?:\n|$)")
# Keys whose change is applied without a restart (a key matches itself and everything under it).
LIVE_KEYS = (
    "rule",
    "drain",
    "node[*].weight",
    # the farm key files: the pulse swaps the heartbeat keys without a gap (a key rotation,
    # docs/CONFIG.md)
    "farm.key_file",
    "farm.next_key_file",
    # the API's tokens (a rotation, docs/API.md) and limits; not where or how it listens
    "api.token_file",
    "api.next_token_file",
    "api.max_body_bytes",
    "api.max_connections",
    "api.max_log_streams",
    "api.header_timeout_s",
    "api.body_timeout_s",
    "api.keepalive_timeout_s",
)

T = TypeVar("T")


class DeployError(ControlError):
    """A deployment did not happen (a node refused or could not be reached); nothing changed."""

    def __init__(self, message: str, nodes: Sequence[NodeVerdict] = ()) -> None:
        super().__init__(message)
        self.nodes = list(nodes)


class Refused(VipfarmError):
    """A node will not take this configuration; the text says why and what to do."""


class Unreachable(VipfarmError):
    """A node's API did not answer."""


# --------------------------------------------------------------------------- the file


def split_version(text: str) -> tuple[int, str]:
    """(version, text without the version line); version 0 when the line is absent."""
    m = _HEADER_RE.match(text)
    if m is None:
        return 0, text
    return int(m.group(1)), text[m.end() :]


def with_version(body: str, version: int, origin: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"{HEADER_PREFIX}{version}, deployed from {origin} at {when}"
        " (written by vipfarm config deploy: keep this line)\n" + body
    )


def digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- what changed


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
        out[f"{prefix}.#"] = len(value)
    else:
        out[prefix] = value


def changed_keys(old: FarmConfig, new: FarmConfig) -> list[str]:
    """Key paths whose value differs (`rule[1].ports`, `node[0].weight`, `rule.#` for a count)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old.model_dump(mode="json", by_alias=True), "", a)
    _flatten(new.model_dump(mode="json", by_alias=True), "", b)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def is_live(key: str) -> bool:
    general = re.sub(r"\[\d+\]", "[*]", key)
    return any(
        general == live or general.startswith((live + ".", live + "[")) for live in LIVE_KEYS
    )


def classify(old: FarmConfig, new: FarmConfig) -> tuple[list[str], list[str]]:
    """(live changes, changes that need a restart)."""
    keys = changed_keys(old, new)
    return [k for k in keys if is_live(k)], [k for k in keys if not is_live(k)]


MAX_CHANGES_LISTED = 12


def summarize(keys: list[str]) -> list[str]:
    """Changed keys as people read them: every key when there are few, else `rule[3]` once for
    all its fields, and at most `MAX_CHANGES_LISTED` entries (a deployment of thousands of rules
    is one line, not 15,000)."""
    if len(keys) <= MAX_CHANGES_LISTED:
        return keys
    out: list[str] = []
    for k in keys:
        head = k.split(".", 1)[0]
        item = head if "[" in head else k
        if item not in out:
            out.append(item)
    if len(out) > MAX_CHANGES_LISTED:
        out = [*out[: MAX_CHANGES_LISTED - 1], f"and {len(out) - MAX_CHANGES_LISTED + 1} more"]
    return out


def validate_for_node(
    text: str,
    *,
    base_dir: Path,
    node: str,
    running: FarmConfig,
    local_addresses: Callable[[], Iterable[IPAddress]],
) -> tuple[FarmConfig, list[str]]:
    """Parse `text` as node `node` would load it and check it can be applied live.

    Returns the configuration and the changed keys; raises Refused with the reason."""
    try:
        new = parse_config(text, base_dir=base_dir, source="the deployed configuration")
    except ConfigError as e:
        raise Refused(str(e)) from None
    try:
        me = new.node(node)
    except ConfigError:
        raise Refused(
            f"node {node} is not in the deployed configuration: a deployment cannot remove a "
            "node (that needs a restart of every daemon)"
        ) from None
    live, restart = classify(running, new)
    if restart:
        raise Refused(
            f"these settings need a restart of every daemon and cannot be deployed live: "
            f"{', '.join(restart)}. Install the file on every node and restart the daemons one "
            "at a time (systemctl restart vipfarm), or deploy only rule, weight and drain changes"
        )
    try:
        here = set(local_addresses())
    except OSError as e:
        raise Refused(f"cannot read this host's addresses to check the file: {e}") from None
    missing = [f"{net}={addr}" for net, addr in me.address.items() if addr not in here]
    if missing:
        raise Refused(f"node {node}'s addresses {', '.join(missing)} are not on this host")
    return new, summarize(live)


# --------------------------------------------------------------------------- participant side


@dataclass
class Prepared:
    deploy_id: str
    origin: str
    config: FarmConfig
    body: str
    changes: list[str]
    expires: float


class PreparedSlot:
    """At most one prepared deployment per node, forgotten after PREPARE_TTL_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: Prepared | None = None

    def current(self) -> Prepared | None:
        if self._held is not None and self._clock() >= self._held.expires:
            self._held = None
        return self._held

    def hold(
        self, deploy_id: str, origin: str, config: FarmConfig, body: str, changes: list[str]
    ) -> Prepared:
        held = self.current()
        if held is not None and held.deploy_id != deploy_id:
            left = held.expires - self._clock()
            raise Refused(
                f"another deployment (from {held.origin}) is in progress: retry in {left:.0f} s"
            )
        self._held = Prepared(
            deploy_id, origin, config, body, changes, self._clock() + PREPARE_TTL_S
        )
        return self._held

    def take(self, deploy_id: str) -> Prepared:
        held = self.current()
        if held is None or held.deploy_id != deploy_id:
            raise Refused(
                f"deployment {deploy_id} is not prepared here (it expired after "
                f"{PREPARE_TTL_S:g} s, or was aborted): deploy again"
            )
        self._held = None
        return held

    def drop(self, deploy_id: str) -> None:
        if self._held is not None and self._held.deploy_id == deploy_id:
            self._held = None

    @property
    def busy(self) -> bool:
        return self.current() is not None


# --------------------------------------------------------------------------- coordinator side


class Participant(Protocol):
    """One node as the coordinator drives it; failures raise Refused or Unreachable."""

    name: str
    alive: bool  # in the coordinator's farm view: an unreachable live node is a refusal

    def prepare(self, req: PrepareRequest) -> Awaitable[PrepareReply]: ...
    def commit(self, req: CommitRequest) -> Awaitable[CommitReply]: ...
    def abort(self, req: AbortRequest) -> Awaitable[object]: ...


async def _settle(aw: Awaitable[T]) -> T | Exception:
    try:
        return await aw
    except (Refused, Unreachable) as e:
        return e
    except Exception as e:  # a bug in one node's answer must not leave others prepared
        return Refused(f"unexpected error: {e!r}")


def _token_mismatch(
    prepared: Sequence[tuple[Participant, PrepareReply]], verdicts: list[NodeVerdict]
) -> list[NodeVerdict]:
    """Nodes whose API token files differ (their prepare replies' fingerprints), as refusals:
    applied, such a deployment would leave nodes unable to authenticate to each other. Nodes
    that send no fingerprint (older versions) are not compared."""
    groups: dict[str, list[str]] = {}
    for p, r in prepared:
        if r.tokens is not None:
            groups.setdefault(r.tokens, []).append(p.name)
    if len(groups) < 2:
        return []
    sets = "; ".join(", ".join(names) for names in sorted(groups.values()))
    message = (
        f"the API token files (api.token_file, api.next_token_file) differ between nodes "
        f"(the same within each group: {sets}): copy the same files to every node"
    )
    odd = {n for names in sorted(groups.values(), key=len)[:-1] for n in names}
    blocking = []
    for i, v in enumerate(verdicts):
        if v.node in odd:
            verdicts[i] = NodeVerdict(node=v.node, outcome="refused", message=message)
            blocking.append(verdicts[i])
    return blocking


async def coordinate(
    body: str, origin: str, participants: Sequence[Participant], *, dry_run: bool = False
) -> DeployResult:
    """Run both phases; raises DeployError (nothing changed) when a node refuses."""
    deploy_id = secrets.token_hex(8)
    prep = PrepareRequest(deploy_id=deploy_id, origin=origin, text=body)
    replies = await asyncio.gather(*(_settle(p.prepare(prep)) for p in participants))
    verdicts: list[NodeVerdict] = []
    prepared: list[tuple[Participant, PrepareReply]] = []
    blocking: list[NodeVerdict] = []
    for p, r in zip(participants, replies, strict=True):
        if isinstance(r, PrepareReply):
            prepared.append((p, r))
            verdicts.append(NodeVerdict(node=p.name, outcome="accepted"))
        elif isinstance(r, Unreachable) and not p.alive:
            verdicts.append(
                NodeVerdict(
                    node=p.name,
                    outcome="skipped",
                    message=f"down ({r}): it fetches the new version when it rejoins",
                )
            )
        else:
            outcome = "unreachable" if isinstance(r, Unreachable) else "refused"
            v = NodeVerdict(node=p.name, outcome=outcome, message=str(r))
            verdicts.append(v)
            blocking.append(v)
    if not blocking:
        blocking = _token_mismatch(prepared, verdicts)
    if blocking or dry_run:
        abort = AbortRequest(deploy_id=deploy_id)
        await asyncio.gather(*(_settle(p.abort(abort)) for p, _ in prepared))
    if blocking:
        why = "; ".join(f"{v.node} {v.outcome}: {v.message}" for v in blocking)
        raise DeployError(f"deployment refused, nothing changed: {why}", verdicts)
    version = max(r.version for _, r in prepared) + 1
    changes = prepared[0][1].changes if prepared else []
    if dry_run:
        return DeployResult(
            ok=True,
            dry_run=True,
            version=version,
            digest=digest(body),
            changes=changes,
            nodes=verdicts,
        )
    commit = CommitRequest(deploy_id=deploy_id, version=version)
    results = await asyncio.gather(*(_settle(p.commit(commit)) for p, _ in prepared))
    by_node = {p.name: r for (p, _), r in zip(prepared, results, strict=True)}
    final: list[NodeVerdict] = []
    for v in verdicts:
        done = by_node.get(v.node)
        if done is None:
            final.append(v)
        elif isinstance(done, CommitReply):
            final.append(NodeVerdict(node=v.node, outcome="applied"))
        else:
            final.append(NodeVerdict(node=v.node, outcome="failed", message=str(done)))
    return DeployResult(
        ok=all(v.outcome in ("applied", "skipped") for v in final),
        dry_run=False,
        version=version,
        digest=digest(body),
        changes=changes,
        nodes=final,
    )
