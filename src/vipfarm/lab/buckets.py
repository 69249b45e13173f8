"""Which buckets each lab node owns, and how the lab moves them (pure, no I/O).

Until the node daemon exists, the lab plays membership by hand: every node runs a stand-alone
data path runner that owns a static set of buckets written in its spec file. `even_split` gives
the initial shares. `plan_handover` turns a requested change into two steps that keep the
project's one invariant, a bucket is never owned twice: first every node that loses buckets keeps
only what it keeps (release), and only once the kernels show the releases do nodes gain buckets
(acquire).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from pydantic import ValidationError

from vipfarm.datapath.spec import Affinity, DatapathSpec, Proto, Rule
from vipfarm.lab.topology import (
    BUCKETS,
    ECHO_PORT,
    HTTP_PORT,
    LAN_IF,
    LEASE_S,
    SEED,
    VIPS,
    LabError,
    node_name,
)


def even_split(nodes: int, buckets: int = BUCKETS) -> dict[str, list[int]]:
    """Bucket b belongs to node (b mod N) + 1: every node gets B/N buckets, give or take one.

    Interleaved rather than contiguous so the shares stay even for any N.
    """
    return {node_name(i + 1): list(range(i, buckets, nodes)) for i in range(nodes)}


def default_rules() -> list[Rule]:
    """HTTP on TCP 80 and echo on UDP 7, on both VIPs, spread per client address and port."""
    return [
        Rule(vip=vip, proto=proto, port=port, affinity=Affinity.CLIENT_IP_PORT)
        for vip in VIPS
        for proto, port in ((Proto.TCP, HTTP_PORT), (Proto.UDP, ECHO_PORT))
    ]


def datapath_spec(farm: str, rules: list[Rule] | None = None) -> DatapathSpec:
    """The spec every node of lab `farm` shares (the lab name is the farm name)."""
    try:
        return DatapathSpec(
            farm=farm,
            interface=LAN_IF,
            rules=default_rules() if rules is None else rules,
            buckets=BUCKETS,
            seed=SEED,
            lease_s=LEASE_S,
        )
    except ValidationError as e:
        raise LabError(f"invalid lab rules: {e}") from None


def node_key(key: int | str, nodes: int) -> str:
    """Accept a node as its number (1) or name ("node1"); return the name."""
    name = node_name(key) if isinstance(key, int) else key
    if name not in {node_name(i) for i in range(1, nodes + 1)}:
        raise LabError(f"no node {key!r} in this lab: use 1..{nodes} or node1..node{nodes}")
    return name


def plan_handover(
    current: Mapping[str, Collection[int]],
    target: Mapping[str, Collection[int]],
    buckets: int = BUCKETS,
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Split a change of ownership into (release step, acquire step).

    `current` holds every node's buckets; `target` the new buckets of the nodes that change
    (nodes it omits keep theirs). Each step maps the nodes to rewrite to their full new owned
    list. Raises LabError for a bucket out of range or owned twice in the outcome.
    """
    final = {n: set(b) for n, b in current.items()}
    for node, owned in target.items():
        bad = sorted(b for b in owned if not 0 <= b < buckets)
        if bad:
            raise LabError(f"{node}: buckets {bad} out of range: use 0..{buckets - 1}")
        final[node] = set(owned)
    seen: dict[int, str] = {}
    for node in sorted(final):
        for b in sorted(final[node]):
            if b in seen:
                raise LabError(
                    f"bucket {b} would be owned by both {seen[b]} and {node}: "
                    "give it to one node and take it from the other in the same call"
                )
            seen[b] = node
    release = {n: sorted(set(old) & final[n]) for n, old in current.items() if set(old) - final[n]}
    after_release = {n: set(release.get(n, old)) for n, old in current.items()}
    acquire = {n: sorted(b) for n, b in final.items() if b != after_release.get(n)}
    return release, acquire
