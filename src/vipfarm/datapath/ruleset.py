"""Pure generation of the nftables ruleset of one node (DESIGN section 3). No kernel access here.

Two tables per farm:

* ``netdev vipfarm_<farm>``: an ingress chain on the LAN interface turns frames addressed to a VMAC
  from ``PACKET_OTHERHOST`` into ``PACKET_HOST``, so IP input accepts them. It holds no state, so it
  is deleted and recreated on every apply (the hook device may have changed).
* ``inet vipfarm_<farm>``: a prerouting chain after conntrack (priority -150) that sends traffic
  to a VIP to the chain ``vip`` (other traffic pays two set lookups), which accepts established
  flows, drops TCP that is not a pure SYN (with tcp_loose=0 this node never picks up or resets a
  flow another node serves), hashes new flows of each rule into a bucket
  (`meta mark set jhash <key> mod B seed S`) and accepts them only when the bucket is in the set
  ``owned`` and a local socket (the application) would take them - so a node whose application
  died drops new flows instead of resetting them while its lease runs out. Anything else
  addressed to a VIP is dropped, except ICMP errors, because a port no rule balances would
  otherwise be answered by every node at once.

Each rule's new flows pass two named counters, ``<rule>_accepted`` on the accepting rule and
``<rule>_dropped`` on the drop right after it (`counter_names`), which is where the metrics of
new flows per rule come from. A counter is named after what the rule matches, not its position,
so it keeps its meaning when other rules are added or removed; the counter of a rule that was
removed stays in the table, unreferenced, until the table goes.

The inet table keeps the ``owned`` set across applies: an apply adds the table, set and chains
(no-ops when present) and flushes and refills the chains, all in one transaction, so a rule change
never drops the lease elements.

Lease elements are written in nft's text syntax, not JSON: nftables 1.0.6 parses a JSON element
timeout as whole seconds only (``"timeout": 0.3`` is silently dropped, leaving an element with no
timeout - verified), while leases are typically a few hundred milliseconds. The text batch is still
one libnftables transaction.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from vipfarm.datapath.spec import Affinity, DatapathSpec, IPAddress, Proto, Rule

Json = dict[str, Any]

INGRESS_PRIORITY = -500
# At mangle (-150): after conntrack (-200), so `ct state` is known.
PREROUTING_PRIORITY = -150
OWNED_SET = "owned"
MAIN_CHAIN = "pre"  # hooked: sends traffic to a VIP to VIP_CHAIN, lets everything else by
VIP_CHAIN = "vip"  # the decisions, for VIP traffic only
BUCKET_CHAIN = "bucket"

# A socket lookup: it only matches when a socket would take the packet (a listener, for a SYN).
# A node whose application is down thus drops new flows silently instead of answering RST, and
# clients retransmit until the bucket has moved to a node that serves. (A listener with
# IP_TRANSPARENT would not match; tproxy setups are not supported.)
LISTENING: Json = {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 0}}

_ICMP4_ERRORS = ["destination-unreachable", "time-exceeded", "parameter-problem", "source-quench"]
_ICMP6_ERRORS = ["destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem"]


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
                "key": {"meta": {"key": "mark"}},
                "value": {"jhash": {"mod": spec.buckets, "seed": spec.seed, "expr": key}},
            }
        },
        {"goto": {"target": BUCKET_CHAIN}},
    ]


def counter_names(rule: Rule) -> tuple[str, str]:
    """The named counters of a rule's new flows: (accepted, dropped)."""
    base = f"new_{rule.proto.value}_{rule.vip}_{rule.ports_text}"
    base = "".join(c if c.isalnum() else "_" for c in base)
    return base + "_accepted", base + "_dropped"


def _rule(table: str, chain: str, expr: list[Json], family: str = "inet") -> Json:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}}


def hook_rules(spec: DatapathSpec) -> list[list[Json]]:
    """The hooked chain: one set lookup per family, so traffic that is not for a VIP (the
    node's own services, its management, its heartbeats) pays two lookups and nothing more."""
    out: list[list[Json]] = []
    for version, l3 in ((4, "ip"), (6, "ip6")):
        family_vips = [str(v) for v in spec.vips if v.version == version]
        if family_vips:
            to_vip = _match(_payload(l3, "daddr"), {"set": family_vips})
            out.append([to_vip, {"jump": {"target": VIP_CHAIN}}])
    return out


def main_chain_rules(spec: DatapathSpec) -> list[list[Json]]:
    """Expressions of the VIP chain, in order. Pure, for unit tests and for the apply."""
    out: list[list[Json]] = []
    vips = spec.vips
    for version, l3, icmp, errors in (
        (4, "ip", "icmp", _ICMP4_ERRORS),
        (6, "ip6", "icmpv6", _ICMP6_ERRORS),
    ):
        family_vips = [str(v) for v in vips if v.version == version]
        if not family_vips:
            continue
        to_vip = _match(_payload(l3, "daddr"), {"set": family_vips})
        ct_ok = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
        out.append([to_vip, ct_ok, {"accept": None}])
        out.append([to_vip, _match(_payload(icmp, "type"), {"set": errors}), {"accept": None}])
    for rule in spec.rules:
        if rule.proto is Proto.TCP:
            not_pure_syn = _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn", op="!=")
            out.append([_daddr(rule.vip), _dport(rule), not_pure_syn, {"drop": None}])
        accepted, dropped = counter_names(rule)
        mark = {"meta": {"key": "mark"}}
        hashed = {"jhash": {"mod": spec.buckets, "seed": spec.seed, "expr": hash_key(rule)}}
        out.append(
            [
                _daddr(rule.vip),
                _dport(rule),
                LISTENING,
                {"mangle": {"key": mark, "value": hashed}},
                _match(mark, f"@{OWNED_SET}"),
                {"counter": accepted},
                {"accept": None},
            ]
        )
        # Not owned, or nothing listens: a new flow of this rule that another node takes.
        out.append([_daddr(rule.vip), _dport(rule), {"counter": dropped}, {"drop": None}])
    # Ping is balanced on the client address, so one node answers each client.
    for vip in vips:
        icmp = "icmp" if vip.version == 4 else "icmpv6"
        echo = _match(_payload(icmp, "type"), "echo-request")
        out.append([_daddr(vip), echo, *_to_bucket(spec, _payload(_l3(vip), "saddr"))])
    for version, l3 in ((4, "ip"), (6, "ip6")):
        family_vips = [str(v) for v in vips if v.version == version]
        if family_vips:
            out.append([_match(_payload(l3, "daddr"), {"set": family_vips}), {"drop": None}])
    return out


def ruleset_batch(spec: DatapathSpec) -> list[Json]:
    """The JSON command list that installs or updates the whole ruleset in one transaction.

    Idempotent: applying it twice leaves the same kernel state, and the `owned` set's elements
    survive it.
    """
    t = table_name(spec.farm)
    inet = {"family": "inet", "table": t}
    netdev = {"family": "netdev", "name": t}
    vmacs = sorted({spec.vmac(v) for v in spec.vips})
    batch: list[Json] = [
        {"add": {"table": netdev}},
        {"delete": {"table": netdev}},
        {"add": {"table": netdev}},
        {
            "add": {
                "chain": {
                    "family": "netdev",
                    "table": t,
                    "name": "ingress",
                    "type": "filter",
                    "hook": "ingress",
                    "dev": spec.interface,
                    "prio": INGRESS_PRIORITY,
                    "policy": "accept",
                }
            }
        },
        _rule(
            t,
            "ingress",
            [
                _match(_payload("ether", "daddr"), {"set": vmacs}),
                {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}},
            ],
            family="netdev",
        ),
        {"add": {"table": {"family": "inet", "name": t}}},
        {"add": {"set": {**inet, "name": OWNED_SET, "type": "mark", "flags": ["timeout"]}}},
        {
            "add": {
                "chain": {
                    **inet,
                    "name": MAIN_CHAIN,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": PREROUTING_PRIORITY,
                    "policy": "accept",
                }
            }
        },
        {"add": {"chain": {**inet, "name": VIP_CHAIN}}},
        {"add": {"chain": {**inet, "name": BUCKET_CHAIN}}},
        {"flush": {"chain": {**inet, "name": MAIN_CHAIN}}},
        {"flush": {"chain": {**inet, "name": VIP_CHAIN}}},
        {"flush": {"chain": {**inet, "name": BUCKET_CHAIN}}},
    ]
    batch += [
        {"add": {"counter": {**inet, "name": name}}}
        for rule in spec.rules
        for name in counter_names(rule)
    ]
    batch += [_rule(t, MAIN_CHAIN, expr) for expr in hook_rules(spec)]
    batch += [_rule(t, VIP_CHAIN, expr) for expr in main_chain_rules(spec)]
    batch.append(
        _rule(
            t,
            BUCKET_CHAIN,
            [_match({"meta": {"key": "mark"}}, f"@{OWNED_SET}"), {"accept": None}],
        )
    )
    batch.append(_rule(t, BUCKET_CHAIN, [{"drop": None}]))
    return batch


def remove_batch(farm: str) -> list[Json]:
    """Delete both tables; `add` first so the batch succeeds when they are already gone."""
    t = table_name(farm)
    out: list[Json] = []
    for family in ("netdev", "inet"):
        out.append({"add": {"table": {"family": family, "name": t}}})
        out.append({"delete": {"table": {"family": family, "name": t}}})
    return out


def owned_text(farm: str, buckets: Iterable[int], lease_s: float) -> str:
    """Replace the owned set with `buckets`, each leased for `lease_s`, as one text transaction."""
    t = table_name(farm)
    ms = max(1, round(lease_s * 1000))
    lines = [f"flush set inet {t} {OWNED_SET}"]
    elems = sorted(set(buckets))
    if elems:
        body = ", ".join(f"{b} timeout {ms}ms" for b in elems)
        lines.append(f"add element inet {t} {OWNED_SET} {{ {body} }}")
    return "\n".join(lines) + "\n"


def parse_counters(listing: Json) -> dict[str, int]:
    """Packets per named counter from `nft -j list counters table inet <t>` output."""
    out: dict[str, int] = {}
    for obj in listing.get("nftables", []):
        c = obj.get("counter")
        if c and "name" in c:
            out[c["name"]] = int(c.get("packets", 0))
    return out


def parse_owned(listing: Json) -> frozenset[int]:
    """Bucket numbers from `nft -j list set inet <t> owned` output."""
    out: set[int] = set()
    for obj in listing.get("nftables", []):
        s = obj.get("set")
        if not s:
            continue
        for e in s.get("elem", []):
            val = e["elem"]["val"] if isinstance(e, dict) else e
            out.add(int(val))
    return frozenset(out)
