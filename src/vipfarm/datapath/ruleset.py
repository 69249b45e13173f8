"""Pure generation of the nftables ruleset of one node (DESIGN section 3). No kernel access here.

Two tables per farm; docs/DATAPATH.md draws the whole path.

* ``netdev vipfarm_<farm>`` decides, before conntrack, which frames this node looks at. Its ingress
  chain on the LAN interface turns frames addressed to a VMAC from ``PACKET_OTHERHOST`` into
  ``PACKET_HOST`` (so IP input accepts them), sends a frame the prefilter hashed already
  (`PREFILTER_TAG` in the mark, `vipfarm.datapath.prefilter`) with its bucket straight to the
  chain ``bucket``, and every other IPv4/IPv6 packet to a VIP to the chain ``vip``. There one
  lookup in a verdict map (``rules4``/``rules6``: VIP . protocol . port or port range, an
  interval map) sends a balanced rule's frames to the chain of its hash
  key (one per affinity, family and protocol or prefix, see `hash_chain`), which computes the
  bucket with the same expression as before (``meta mark set jhash <key> mod B seed S``, so
  `vipfarm.datapath.jhash` still predicts it): every frame to a VIP passes here, so its cost
  must not grow with the number of rules. Then the chain ``bucket`` decides: a bucket not in
  the set ``kept`` (the buckets this node may hold connections in: every owned bucket, and
  those it gave away, or whose lease ran out, while it still serves established connections
  in them) is dropped and counted (``foreign``); a bucket in the set ``owned`` passes with the
  *owned bit* (`OWNED_MARK`) added to the mark; a bucket only kept passes without the bit,
  except a pure TCP SYN, which is a new flow for the owner. So a frame for a bucket this node
  neither owns nor keeps costs a map lookup, the hash and one set lookup, and never
  reaches conntrack. What no rule matches (non-first fragments, which conntrack must
  reassemble first; ports no rule balances; replies to connections this node opened from a
  VIP) goes on to the inet table unchanged, which decides it as it always did.
  This table holds the state (both sets, leases included) and is never recreated by an update:
  an apply adds the table, sets, maps and chains (no-ops when present) and flushes and refills
  the chains and the rule maps, in one transaction. Only `start` recreates the hooked chain
  (``fresh``), since adding a chain that exists on another device would add that device to it.
* Directed delivery (``DatapathSpec.delivery`` directed or auto; docs/DATAPATH.md): the chain
  ``bucket`` starts with one more rule, for frames a client addressed to this node's own MAC
  (not a VMAC) that no farm node sent (set ``peers``): a lookup of the bucket in the verdict
  map ``steer``, whose chains rewrite both MACs and send the frame, at layer 2, to the other
  nodes interested in the bucket (``fwd``, and ``dup`` for the buckets in transition), see
  `steer_chains`. The map, its chains and the peers set are replaced in one transaction of
  their own on every change of the plan (`steer_batch`), and are part of `ruleset_batch`'s.
* ``inet vipfarm_<farm>``: a prerouting chain after conntrack (priority -150) that sends traffic
  to a VIP to the chain ``vip``, which accepts established flows, drops TCP that is not a pure
  SYN (with tcp_loose=0 this node never picks up or resets a flow another node serves), and
  accepts a new flow of a rule only when the ingress decision marked it owned and a local
  socket (the application) would take it - so a node whose application died drops new flows
  instead of resetting them while its lease runs out. An accepted new flow's conntrack entry
  gets the packet's mark (``ct mark set meta mark``: the owned bit and the bucket), which is
  how the sweeper (`vipfarm.datapath.sweeper`) knows which buckets still hold connections of
  this node. Anything else addressed to a VIP is dropped, except ICMP errors, because a port no
  rule balances would otherwise be answered by every node at once. New flows from the node
  itself (over ``lo``) are served here, whatever their bucket; new flows to a VIP that entered
  through another interface carry no owned bit and are dropped.
* Optionally (``DatapathSpec.notrack_other``, off by default) two raw chains (priority -300,
  before conntrack) exempt every packet that is not to or from a VIP from conntrack, so the
  node's own traffic costs what it cost before vipfarm was installed. Off by default because it
  changes the meaning of the host's own stateful rules: an untracked packet is never
  ``ct state established`` for the host's firewall, and NAT (masquerade, Docker) needs
  conntrack.

`DecisionPoint.PREROUTING` keeps the old decision point for comparison (`vipfarm bench`): the
ingress chain marks owned buckets but drops nothing, so foreign frames go through conntrack and
are dropped at -150.

Each rule's new flows pass two named counters, ``<rule>_accepted`` on the accepting rule and
``<rule>_dropped`` on the drop right after it (`counter_names`), which is where the metrics of
new flows per rule come from; ``dropped`` now counts new flows of owned or kept buckets this
node does not take (nothing listens, or the bucket is only kept), and the frames of other
nodes' buckets are counted once, at ingress, in the netdev table's counter ``foreign``. A
counter is named after what the rule matches, not its position, so it keeps its meaning when
other rules are added or removed; the counter of a rule that was removed stays in the table,
unreferenced, until the table goes.

Lease elements are written in nft's text syntax, not JSON: nftables 1.0.6 parses a JSON element
timeout as whole seconds only (``"timeout": 0.3`` is silently dropped, leaving an element with no
timeout - verified), while leases are typically a few hundred milliseconds. A change of owned
buckets and the matching change of kept ones are one text batch, so one libnftables transaction.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vipfarm.datapath.spec import (
    Affinity,
    DatapathSpec,
    DecisionPoint,
    IPAddress,
    Proto,
    Rule,
)

Json = dict[str, Any]

INGRESS_PRIORITY = -500
# At mangle (-150): after conntrack (-200), so `ct state` is known.
PREROUTING_PRIORITY = -150
# Before conntrack (-200): where `notrack` must happen.
RAW_PRIORITY = -300

# The sets live in the netdev table, where the ingress decision reads them.
SETS_FAMILY = "netdev"
OWNED_SET = "owned"
KEPT_SET = "kept"
FOREIGN_COUNTER = "foreign"  # frames of other nodes' buckets, dropped at ingress
# Directed delivery (see `steer_batch`): `nft` reserves the word "fwd", hence "steer".
STEER_MAP = "steer"  # netdev verdict map: bucket -> the chain that sends it to its nodes
PEERS_SET = "peers"  # netdev: the farm's other nodes' LAN MACs (never forward their frames)
FORWARDED_COUNTER = "forwarded"  # frames this node sent on to other nodes

INGRESS_CHAIN = "ingress"  # netdev, hooked on the LAN interface
DECIDE_CHAIN = "vip"  # netdev: the bucket of each balanced rule's frames
BUCKET_CHAIN = "bucket"  # netdev: owned, kept or dropped
MAIN_CHAIN = "pre"  # inet, hooked: sends traffic to a VIP to VIP_CHAIN, lets everything else by
VIP_CHAIN = "vip"  # inet: the decisions that need conntrack, for VIP traffic only
RAW_IN_CHAIN = "raw_pre"  # inet, optional: notrack for what is not to a VIP
RAW_OUT_CHAIN = "raw_out"  # inet, optional: notrack for what is not from a VIP

# The mark layout, for packets (set at ingress) and conntrack entries (copied from the packet
# that opened the flow): the bucket in the low bits, and the owned bit, which says "this node
# owned the bucket when the frame came in". Bucket numbers stay small (< 4096), so the owned bit
# also tells vipfarm's conntrack entries from everybody else's (mark 0).
OWNED_MARK = 0x8000_0000
BUCKET_MASK = 0xFFFF
# Set at tc ingress by the prefilter (`vipfarm.datapath.prefilter`) with the bucket of a frame it
# hashed and let through: the ingress chain then goes straight to the decision. Nothing from the
# wire sets a mark, and the chain replaces it with the bare bucket before anything else reads it.
PREFILTER_TAG = 0x4000_0000

# A socket lookup: it only matches when a socket would take the packet (a listener, for a SYN).
# A node whose application is down thus drops new flows silently instead of answering RST, and
# clients retransmit until the bucket has moved to a node that serves. (A listener with
# IP_TRANSPARENT would not match; tproxy setups are not supported.)
_FROM_LO: Json = {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}
LISTENING: Json = {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 0}}

_ICMP4_ERRORS = ["destination-unreachable", "time-exceeded", "parameter-problem", "source-quench"]
_ICMP6_ERRORS = ["destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem"]
_MARK: Json = {"meta": {"key": "mark"}}


def table_name(farm: str) -> str:
    return f"vipfarm_{farm}"


def _l3(vip: IPAddress) -> str:
    return "ip" if vip.version == 4 else "ip6"


def _payload(proto: str, field: str) -> Json:
    return {"payload": {"protocol": proto, "field": field}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr(vip: IPAddress) -> Json:
    return _match(_payload(_l3(vip), "daddr"), str(vip))


def _dport(rule: Rule) -> Json:
    right: Any = rule.port if rule.port_end is None else {"range": [rule.port, rule.port_end]}
    return _match(_payload(rule.proto.value, "dport"), right)


def _subnet_mask(version: int, prefix: int) -> str:
    net = ipaddress.ip_network(f"{'0.0.0.0' if version == 4 else '::'}/{prefix}")
    return str(net.netmask)


def _families(spec: DatapathSpec) -> list[tuple[int, str, list[str]]]:
    """(version, nft protocol, the spec's VIPs of that family as text), for both families."""
    return [
        (version, l3, [str(v) for v in spec.vips if v.version == version])
        for version, l3 in ((4, "ip"), (6, "ip6"))
    ]


def hash_key(rule: Rule) -> Json:
    """The expression hashed into a bucket, per affinity."""
    l3 = _l3(rule.vip)
    saddr = _payload(l3, "saddr")
    if rule.affinity is Affinity.CLIENT_IP:
        return saddr
    if rule.affinity is Affinity.CLIENT_SUBNET:
        prefix = rule.prefix4 if rule.vip.version == 4 else rule.prefix6
        return {"&": [saddr, _subnet_mask(rule.vip.version, prefix)]}
    return {"concat": [saddr, _payload(rule.proto.value, "sport")]}


def _to_bucket(spec: DatapathSpec, key: Json) -> list[Json]:
    return [
        {
            "mangle": {
                "key": _MARK,
                "value": {"jhash": {"mod": spec.buckets, "seed": spec.seed, "expr": key}},
            }
        },
        {"goto": {"target": BUCKET_CHAIN}},
    ]


def _owned_bit() -> Json:
    """The ingress decision said: a bucket this node owns."""
    return _match({"&": [_MARK, OWNED_MARK]}, OWNED_MARK)


def _mark_conntrack() -> Json:
    """The new flow's conntrack entry remembers its bucket (and that this node accepted it)."""
    return {"mangle": {"key": {"ct": {"key": "mark"}}, "value": _MARK}}


def counter_names(rule: Rule) -> tuple[str, str]:
    """The named counters of a rule's new flows: (accepted, dropped)."""
    base = f"new_{rule.proto.value}_{rule.vip}_{rule.ports_text}"
    base = "".join(c if c.isalnum() else "_" for c in base)
    return base + "_accepted", base + "_dropped"


def _rule(table: str, chain: str, expr: list[Json], family: str = "inet") -> Json:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}}


# ---- netdev: the decision before conntrack


def ingress_rules(spec: DatapathSpec) -> list[list[Json]]:
    """The hooked ingress chain: VMAC frames become `host`, VIP packets go to the decision."""
    vmacs = sorted({spec.vmac(v) for v in spec.vips})
    to_host: Json = {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}}
    out: list[list[Json]] = []
    if spec.prefilter and spec.decide_at is DecisionPoint.INGRESS:
        # Hashed by the prefilter already (same rules, same hash): its bucket is in the mark,
        # and it tags frames to a VMAC only, so a register compare stands in for the VMAC
        # lookup. First, because every frame a node serves through the VIP comes this way.
        out.append(
            [
                _match({"&": [_MARK, PREFILTER_TAG]}, PREFILTER_TAG),
                to_host,
                {"mangle": {"key": _MARK, "value": {"&": [_MARK, BUCKET_MASK]}}},
                {"goto": {"target": BUCKET_CHAIN}},
            ]
        )
    out.append([_match(_payload("ether", "daddr"), {"set": vmacs}), to_host])
    for _version, l3, vips in _families(spec):
        if vips:
            out.append(
                [_match(_payload(l3, "daddr"), {"set": vips}), {"jump": {"target": DECIDE_CHAIN}}]
            )
    return out


def hash_chain(rule: Rule) -> str:
    """The netdev chain that computes the bucket of `rule`'s frames: one per distinct hash key
    (family, affinity, protocol for the source port, prefix), shared by every rule with it."""
    name = f"h{rule.vip.version}_{rule.affinity.value}"
    if rule.affinity is Affinity.CLIENT_IP_PORT:
        name += f"_{rule.proto.value}"
    elif rule.affinity is Affinity.CLIENT_SUBNET:
        name += f"_{rule.prefix4 if rule.vip.version == 4 else rule.prefix6}"
    return name


def hash_chains(spec: DatapathSpec) -> dict[str, list[Json]]:
    """Each hash chain's one rule: the bucket into the mark, then the decision."""
    out: dict[str, list[Json]] = {}
    for rule in spec.rules:
        out.setdefault(hash_chain(rule), _to_bucket(spec, hash_key(rule)))
    return out


def rule_map_name(version: int, ranges: bool = False) -> str:
    return f"{'ranges' if ranges else 'rules'}{version}"


def rule_maps(spec: DatapathSpec) -> dict[str, list[list[Json]]]:
    """The elements of the verdict maps from (VIP, protocol, port) to each rule's hash chain:
    one lookup per frame, however many rules the farm has. Per family, single ports go in a
    hash map (``rules4``) and port ranges in an interval map (``ranges4``), which is only there
    when a rule has a range: filling an interval map costs the kernel far more (a 3,000-rule
    update took 1.2 s instead of 0.6 s, measured), and it is rebuilt on every update."""
    out: dict[str, list[list[Json]]] = {}
    for rule in spec.rules:
        ranged = rule.port_end is not None and rule.port_end != rule.port
        port: Any = {"range": [rule.port, rule.port_end]} if ranged else rule.port
        key = {"concat": [str(rule.vip), rule.proto.value, port]}
        name = rule_map_name(rule.vip.version, ranged)
        out.setdefault(name, []).append([key, {"goto": {"target": hash_chain(rule)}}])
    return out


def decide_rules(spec: DatapathSpec) -> list[list[Json]]:
    """The netdev chain `vip`: each balanced rule's frames (and ping) into their bucket.

    A frame no map holds returns to the hooked chain, whose policy lets it on to the inet
    table: fragments after the first (their ports are in the first one; conntrack reassembles
    them before the inet chain decides, and the reassembled packet keeps the first fragment's
    mark), ICMP errors, ports no rule balances.
    """
    out: list[list[Json]] = []
    maps = rule_maps(spec)
    for version, l3, _vips in _families(spec):
        fields = [_payload(l3, "daddr"), {"meta": {"key": "l4proto"}}, _payload("th", "dport")]
        for ranges in (False, True):
            name = rule_map_name(version, ranges)
            if name in maps:
                out.append([{"vmap": {"key": {"concat": fields}, "data": f"@{name}"}}])
    for vip in spec.vips:
        icmp = "icmp" if vip.version == 4 else "icmpv6"
        echo = _match(_payload(icmp, "type"), "echo-request")
        out.append([_daddr(vip), echo, *_to_bucket(spec, _payload(_l3(vip), "saddr"))])
    return out


def bucket_rules(spec: DatapathSpec) -> list[list[Json]]:
    """The netdev chain `bucket`: a bucket not kept is dropped before conntrack, an owned one
    passes with the owned bit, a kept one passes (but for a pure SYN, a new flow that is the new
    owner's).

    The kept set holds every owned bucket too (`sets_text` adds them with each change of
    ownership), so most frames here, other nodes', cost one lookup and are gone; the packet
    path never writes a set (a set update per frame cost an owned frame some 30 ns, measured)."""
    with_bit = {"mangle": {"key": _MARK, "value": {"|": [_MARK, OWNED_MARK]}}}
    out: list[list[Json]] = []
    if spec.delivery.steers:
        # Frames a client sent to this node's own MAC (this node is, or was, the entry of their
        # VIP) go to the nodes interested in their bucket; frames to a VMAC came by flooding,
        # so every node got them anyway, and frames from a peer were forwarded already (never
        # twice: two nodes with different views must not bounce a frame between them).
        vmacs = sorted({spec.vmac(v) for v in spec.vips})
        out.append(
            [
                _match(_payload("ether", "daddr"), {"set": vmacs}, op="!="),
                _match(_payload("ether", "saddr"), f"@{PEERS_SET}", op="!="),
                {"vmap": {"key": _MARK, "data": f"@{STEER_MAP}"}},
            ]
        )
    owned = [_match(_MARK, f"@{OWNED_SET}"), with_bit, {"accept": None}]
    if spec.decide_at is DecisionPoint.PREROUTING:
        # The old decision point: conntrack, then -150 drops.
        return [*out, owned, [{"accept": None}]]
    not_kept = _match(_MARK, f"@{KEPT_SET}", op="!=")
    pure_syn = _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn")
    return [
        *out,
        [not_kept, {"counter": FOREIGN_COUNTER}, {"drop": None}],
        owned,
        [pure_syn, {"counter": FOREIGN_COUNTER}, {"drop": None}],
        [{"accept": None}],  # kept: established connections this node serves
    ]


# ---- inet: the decisions that need conntrack


def hook_rules(spec: DatapathSpec) -> list[list[Json]]:
    """The hooked chain: one set lookup per family, so traffic that is not for a VIP (the
    node's own services, its management, its heartbeats) pays two lookups and nothing more."""
    out: list[list[Json]] = []
    for _version, l3, vips in _families(spec):
        if vips:
            out.append(
                [_match(_payload(l3, "daddr"), {"set": vips}), {"jump": {"target": VIP_CHAIN}}]
            )
    return out


def main_chain_rules(spec: DatapathSpec) -> list[list[Json]]:
    """Expressions of the inet VIP chain, in order. Pure, for unit tests and for the apply."""
    out: list[list[Json]] = []
    for (_v, l3, vips), icmp, errors in zip(
        _families(spec), ("icmp", "icmpv6"), (_ICMP4_ERRORS, _ICMP6_ERRORS), strict=True
    ):
        if not vips:
            continue
        to_vip = _match(_payload(l3, "daddr"), {"set": vips})
        ct_ok = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
        out.append([to_vip, ct_ok, {"accept": None}])
        # This node's own processes reach a VIP over lo, which no ingress decision sees: they
        # are served here, whatever the bucket or the port (no other node ever receives them,
        # so none can answer twice). Not marked: the sweeper keeps buckets for the LAN's
        # connections only.
        out.append([to_vip, _FROM_LO, {"accept": None}])
        out.append([to_vip, _match(_payload(icmp, "type"), {"set": errors}), {"accept": None}])
    for rule in spec.rules:
        if rule.proto is Proto.TCP:
            not_pure_syn = _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn", op="!=")
            out.append([_daddr(rule.vip), _dport(rule), not_pure_syn, {"drop": None}])
        accepted, dropped = counter_names(rule)
        # The owned bit first: a register compare, cheaper than the socket lookup.
        out.append(
            [
                _daddr(rule.vip),
                _dport(rule),
                _owned_bit(),
                LISTENING,
                _mark_conntrack(),
                {"counter": accepted},
                {"accept": None},
            ]
        )
        # Not owned (only kept, or not from the LAN), or nothing listens.
        out.append([_daddr(rule.vip), _dport(rule), {"counter": dropped}, {"drop": None}])
    # Ping is balanced on the client address, so one node answers each client.
    for vip in spec.vips:
        icmp = "icmp" if vip.version == 4 else "icmpv6"
        echo = _match(_payload(icmp, "type"), "echo-request")
        out.append([_daddr(vip), echo, _owned_bit(), _mark_conntrack(), {"accept": None}])
    for _version, l3, vips in _families(spec):
        if vips:
            out.append([_match(_payload(l3, "daddr"), {"set": vips}), {"drop": None}])
    return out


def notrack_rules(spec: DatapathSpec, direction: str) -> list[list[Json]]:
    """`notrack` for every packet not to (`in`) or from (`out`) a VIP, per family."""
    field = "daddr" if direction == "in" else "saddr"
    out: list[list[Json]] = []
    for _version, l3, vips in _families(spec):
        if vips:
            cond = _match(_payload(l3, field), {"set": vips}, op="!=")
        else:
            cond = _match({"meta": {"key": "nfproto"}}, "ipv4" if l3 == "ip" else "ipv6")
        out.append([cond, {"notrack": None}])
    return out


def _base_chain(family: str, table: str, name: str, hook: str, prio: int, **extra: Any) -> Json:
    chain = {"family": family, "table": table, "name": name, "type": "filter", "hook": hook}
    return {"add": {"chain": {**chain, **extra, "prio": prio, "policy": "accept"}}}


def ruleset_batch(
    spec: DatapathSpec,
    fresh: bool = False,
    kept_exists: bool = False,
    plan: SteerPlan | None = None,
    stale_chains: Iterable[str] | None = None,
) -> list[Json]:
    """The JSON command list that installs or updates the whole ruleset in one transaction.

    Idempotent: applying it twice leaves the same kernel state, and the sets' elements (owned
    with their leases, kept) survive it. `fresh` (at start) also recreates the hooked ingress
    chain and the stateless inet table, which clears what a crashed run of another version or
    on another interface may have left there.

    `kept_exists`: leave the kept set out of the batch. Earlier releases added to it from
    the packet path, which made nft create it ``dynamic``; nftables 1.0.6's JSON cannot say
    ``dynamic``, so adding such a set again would differ from it and fail the batch
    (verified). The caller says whether the set is there, and an existing one is left as it is.

    Directed delivery: `plan` fills the steering map in the same transaction (`steer_batch`,
    `stale_chains` the steering chains a previous plan made); a flood spec with `stale_chains`
    (not None) removes what a directed one made.
    """
    t = table_name(spec.farm)
    netdev = {"family": "netdev", "table": t}
    inet = {"family": "inet", "table": t}
    ingress = _base_chain(
        "netdev", t, INGRESS_CHAIN, "ingress", INGRESS_PRIORITY, dev=spec.interface
    )
    batch: list[Json] = [
        {"add": {"table": {"family": "netdev", "name": t}}},
        {"add": {"set": {**netdev, "name": OWNED_SET, "type": "mark", "flags": ["timeout"]}}},
        {"add": {"counter": {**netdev, "name": FOREIGN_COUNTER}}},
    ]
    if not kept_exists:
        batch.insert(2, {"add": {"set": {**netdev, "name": KEPT_SET, "type": "mark"}}})
    if spec.delivery.steers:
        batch += steer_objects(spec.farm)
    if fresh:
        batch += [ingress, {"delete": {"chain": {**netdev, "name": INGRESS_CHAIN}}}]
    hashes = hash_chains(spec)
    maps = rule_maps(spec)
    netdev_chains = (INGRESS_CHAIN, DECIDE_CHAIN, BUCKET_CHAIN, *hashes)
    batch += [
        ingress,
        *({"add": {"chain": {**netdev, "name": c}}} for c in netdev_chains[1:]),
        *({"flush": {"chain": {**netdev, "name": c}}} for c in netdev_chains),
    ]
    for version, l3type in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        for ranges in (False, True):
            name = rule_map_name(version, ranges)
            if name not in maps:
                continue
            m = {**netdev, "name": name}
            kind = {"type": [l3type, "inet_proto", "inet_service"], "map": "verdict"}
            batch.append(
                {"add": {"map": {**m, **kind, **({"flags": ["interval"]} if ranges else {})}}}
            )
            batch.append({"flush": {"map": m}})
            batch.append({"add": {"element": {**m, "elem": maps[name]}}})
    batch.append({"add": {"table": {"family": "inet", "name": t}}})
    if fresh:
        batch += [
            {"delete": {"table": {"family": "inet", "name": t}}},
            {"add": {"table": {"family": "inet", "name": t}}},
        ]
    batch += [
        _base_chain("inet", t, MAIN_CHAIN, "prerouting", PREROUTING_PRIORITY),
        {"add": {"chain": {**inet, "name": VIP_CHAIN}}},
        {"flush": {"chain": {**inet, "name": MAIN_CHAIN}}},
        {"flush": {"chain": {**inet, "name": VIP_CHAIN}}},
    ]
    raw = ((RAW_IN_CHAIN, "prerouting", "in"), (RAW_OUT_CHAIN, "output", "out"))
    for name, hook, _ in raw:
        batch.append(_base_chain("inet", t, name, hook, RAW_PRIORITY))
        verb = "flush" if spec.notrack_other else "delete"
        batch.append({verb: {"chain": {**inet, "name": name}}})
    batch += [
        {"add": {"counter": {**inet, "name": name}}}
        for rule in spec.rules
        for name in counter_names(rule)
    ]
    batch += [_rule(t, INGRESS_CHAIN, e, "netdev") for e in ingress_rules(spec)]
    batch += [_rule(t, name, expr, "netdev") for name, expr in hashes.items()]
    batch += [_rule(t, DECIDE_CHAIN, e, "netdev") for e in decide_rules(spec)]
    batch += [_rule(t, BUCKET_CHAIN, e, "netdev") for e in bucket_rules(spec)]
    batch += [_rule(t, MAIN_CHAIN, expr) for expr in hook_rules(spec)]
    batch += [_rule(t, VIP_CHAIN, expr) for expr in main_chain_rules(spec)]
    if spec.notrack_other:
        for name, _hook, direction in raw:
            batch += [_rule(t, name, e) for e in notrack_rules(spec, direction)]
    if spec.delivery.steers and plan is not None:
        batch += steer_batch(spec, plan, stale_chains)
    elif not spec.delivery.steers and stale_chains is not None:
        batch += unsteer_batch(spec.farm, stale_chains)  # directed before: take it away
    return batch


def remove_batch(farm: str) -> list[Json]:
    """Delete both tables; `add` first so the batch succeeds when they are already gone."""
    t = table_name(farm)
    out: list[Json] = []
    for family in ("netdev", "inet"):
        out.append({"add": {"table": {"family": family, "name": t}}})
        out.append({"delete": {"table": {"family": family, "name": t}}})
    return out


def _elements(buckets: Iterable[int], suffix: str = "") -> str:
    return ", ".join(f"{b}{suffix}" for b in sorted(set(buckets)))


def sets_text(
    farm: str,
    owned: Iterable[int] | None,
    lease_s: float,
    keep: Iterable[int] = (),
    unkeep: Iterable[int] = (),
) -> str:
    """One text transaction: replace the owned set with `owned` (None: leave it), each leased for
    `lease_s`; add `keep` to the kept set and remove `unkeep` from it.

    The owned buckets are added to the kept set too, and never removed from it: the ingress
    decision drops what is not kept before it looks at the owned set (`bucket_rules`). A
    removal is written as add-then-delete, so it succeeds whether or not the element is there
    (deleting a missing element would fail the whole transaction)."""
    t = table_name(farm)
    lines: list[str] = []
    if owned is not None:
        owned = set(owned)
        keep = owned.union(keep)
        unkeep = set(unkeep) - owned
        ms = max(1, round(lease_s * 1000))
        lines.append(f"flush set {SETS_FAMILY} {t} {OWNED_SET}")
        if body := _elements(owned, f" timeout {ms}ms"):
            lines.append(f"add element {SETS_FAMILY} {t} {OWNED_SET} {{ {body} }}")
    if body := _elements(keep):
        lines.append(f"add element {SETS_FAMILY} {t} {KEPT_SET} {{ {body} }}")
    if body := _elements(unkeep):
        lines.append(f"add element {SETS_FAMILY} {t} {KEPT_SET} {{ {body} }}")
        lines.append(f"delete element {SETS_FAMILY} {t} {KEPT_SET} {{ {body} }}")
    return "\n".join(lines) + "\n"


def owned_text(farm: str, buckets: Iterable[int], lease_s: float) -> str:
    """Replace the owned set with `buckets`, each leased for `lease_s`, as one text transaction."""
    return sets_text(farm, buckets, lease_s)


def list_set_command(farm: str, name: str) -> str:
    """The nft command that lists one of the farm's sets (`nft -j <this>` from a shell)."""
    return f"list set {SETS_FAMILY} {table_name(farm)} {name}"


def parse_counters(listing: Json) -> dict[str, int]:
    """Packets per named counter from `nft -j list counters table inet <t>` output."""
    out: dict[str, int] = {}
    for obj in listing.get("nftables", []):
        c = obj.get("counter")
        if c and "name" in c:
            out[c["name"]] = int(c.get("packets", 0))
    return out


def parse_owned(listing: Json) -> frozenset[int]:
    """Bucket numbers from `nft -j list set ...` output (the owned or the kept set)."""
    out: set[int] = set()
    for obj in listing.get("nftables", []):
        s = obj.get("set")
        if not s:
            continue
        for e in s.get("elem", []):
            val = e["elem"]["val"] if isinstance(e, dict) else e
            out.add(int(val))
    return frozenset(out)


# ---- directed delivery: the entry sends frames on to the nodes of their bucket


@dataclass(frozen=True)
class SteerPlan:
    """Where this node sends frames of other nodes' buckets (directed delivery).

    `targets`: bucket -> the LAN MACs of the other nodes interested in it (its owner, the nodes
    that still keep it, a node about to acquire it), in a fixed order; a bucket not named is
    decided here alone. `local`: the buckets this node is interested in itself (owned or kept),
    whose frames it also keeps after sending copies on. `peers`: every other node's MAC this
    node knows, dead ones included: their frames are never forwarded again."""

    mac: str
    targets: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    local: frozenset[int] = frozenset()
    peers: frozenset[str] = frozenset()


def steer_objects(farm: str) -> list[Json]:
    """The set, map and counter of directed delivery (no-ops when present)."""
    netdev = {"family": "netdev", "table": table_name(farm)}
    return [
        {"add": {"set": {**netdev, "name": PEERS_SET, "type": "ether_addr"}}},
        {"add": {"map": {**netdev, "name": STEER_MAP, "type": "mark", "map": "verdict"}}},
        {"add": {"counter": {**netdev, "name": FORWARDED_COUNTER}}},
    ]


def _node_chain(mac: str) -> str:
    return "to_" + mac.replace(":", "")


def steer_chains(
    spec: DatapathSpec, plan: SteerPlan
) -> tuple[dict[str, list[Json]], list[list[Any]]]:
    """The steering chains (name -> the one rule's expressions) and the map's elements.

    The per-frame cost stays flat: one map lookup, then a chain of a few statements. A bucket
    with one other interested node (the common case) jumps to that node's chain, which
    rewrites both MACs and forwards (`fwd` ends the frame's path here). A bucket in transition
    (several interested nodes, or this node and others) goes through a fan-out chain shared by
    every bucket with the same targets: a copy (`dup`) to each node but the last, and the
    frame itself to the last, or kept for this node's own decision when it is interested too
    (the chain then returns to `bucket`). The source MAC is rewritten to this node's, so the
    switch never learns a client's MAC on this node's port."""
    dev = spec.interface
    src = {"mangle": {"key": _payload("ether", "saddr"), "value": plan.mac}}
    count = {"counter": FORWARDED_COUNTER}

    def dst(mac: str) -> Json:
        return {"mangle": {"key": _payload("ether", "daddr"), "value": mac}}

    chains: dict[str, list[Json]] = {}
    fans: dict[tuple[tuple[str, ...], bool], str] = {}
    elems: list[list[Any]] = []
    for bucket in sorted(plan.targets):
        macs = plan.targets[bucket]
        if not macs or not 0 <= bucket < spec.buckets:
            continue
        here = bucket in plan.local
        if len(macs) == 1 and not here:
            name = _node_chain(macs[0])
            chains.setdefault(name, [count, src, dst(macs[0]), {"fwd": {"dev": dev}}])
        else:
            key = (macs, here)
            name = fans.get(key, "")
            if not name:
                name = fans[key] = f"fan_{len(fans)}"
                expr: list[Json] = [count, src]
                for mac in macs[:-1]:
                    expr += [dst(mac), {"dup": {"addr": dev}}]
                if here:
                    expr += [dst(macs[-1]), {"dup": {"addr": dev}}]
                else:
                    expr += [dst(macs[-1]), {"fwd": {"dev": dev}}]
                chains[name] = expr
        elems.append([bucket, {"jump": {"target": name}}])
    return chains, elems


def steer_batch(
    spec: DatapathSpec, plan: SteerPlan, stale_chains: Iterable[str] | None = None
) -> list[Json]:
    """Replace the steering map, its chains and the peers set: one transaction on its own (a
    change of owners or keepers) or the tail of `ruleset_batch`. The map is flushed before the
    chains it pointed to are flushed or deleted (`stale_chains`: those of the previous plan
    that this one no longer has), so no element ever points to a chain that is gone."""
    t = table_name(spec.farm)
    netdev = {"family": "netdev", "table": t}
    chains, elems = steer_chains(spec, plan)
    batch: list[Json] = [
        *steer_objects(spec.farm),
        {"flush": {"map": {**netdev, "name": STEER_MAP}}},
        {"flush": {"set": {**netdev, "name": PEERS_SET}}},
    ]
    if plan.peers:
        batch.append(
            {"add": {"element": {**netdev, "name": PEERS_SET, "elem": sorted(plan.peers)}}}
        )
    for name, expr in chains.items():
        batch += [
            {"add": {"chain": {**netdev, "name": name}}},
            {"flush": {"chain": {**netdev, "name": name}}},
            _rule(t, name, expr, "netdev"),
        ]
    for name in sorted(set(stale_chains or ()) - set(chains)):
        batch += [
            {"flush": {"chain": {**netdev, "name": name}}},
            {"delete": {"chain": {**netdev, "name": name}}},
        ]
    if elems:
        batch.append({"add": {"element": {**netdev, "name": STEER_MAP, "elem": elems}}})
    return batch


def unsteer_batch(farm: str, stale_chains: Iterable[str]) -> list[Json]:
    """Remove directed delivery's objects (after the bucket chain lost its steering rule)."""
    netdev = {"family": "netdev", "table": table_name(farm)}
    batch = steer_objects(farm)
    batch.append({"delete": {"map": {**netdev, "name": STEER_MAP}}})
    for name in sorted(set(stale_chains)):
        batch += [
            {"flush": {"chain": {**netdev, "name": name}}},
            {"delete": {"chain": {**netdev, "name": name}}},
        ]
    batch.append({"delete": {"set": {**netdev, "name": PEERS_SET}}})
    return batch


def steer_chain_names(spec: DatapathSpec, plan: SteerPlan) -> frozenset[str]:
    return frozenset(steer_chains(spec, plan)[0])
