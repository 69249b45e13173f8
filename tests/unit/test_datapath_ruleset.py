"""Ruleset generation, without a kernel."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from pydantic import ValidationError

from vipfarm.datapath import ruleset
from vipfarm.datapath.spec import Affinity, DatapathSpec, DecisionPoint, Proto, Rule, vmac_for

V4 = ipaddress.ip_address("198.51.100.100")
V6 = ipaddress.ip_address("2001:db8:100::100")


def spec(*rules: Rule, **kw: Any) -> DatapathSpec:
    return DatapathSpec(farm="web", interface="eth0", rules=list(rules), **kw)


def rendered(expr: list[dict[str, Any]]) -> str:
    return json.dumps(expr, sort_keys=True)


def test_hash_key_per_affinity() -> None:
    ip = ruleset.hash_key(Rule(vip=V4, port=80, affinity=Affinity.CLIENT_IP))
    assert ip == {"payload": {"protocol": "ip", "field": "saddr"}}
    port = ruleset.hash_key(
        Rule(vip=V4, proto=Proto.UDP, port=53, affinity=Affinity.CLIENT_IP_PORT)
    )
    assert port == {
        "concat": [
            {"payload": {"protocol": "ip", "field": "saddr"}},
            {"payload": {"protocol": "udp", "field": "sport"}},
        ]
    }
    sub4 = ruleset.hash_key(Rule(vip=V4, port=80, affinity=Affinity.CLIENT_SUBNET, prefix4=20))
    assert sub4 == {"&": [{"payload": {"protocol": "ip", "field": "saddr"}}, "255.255.240.0"]}
    sub6 = ruleset.hash_key(Rule(vip=V6, port=80, affinity=Affinity.CLIENT_SUBNET, prefix6=48))
    assert sub6 == {"&": [{"payload": {"protocol": "ip6", "field": "saddr"}}, "ffff:ffff:ffff::"]}


def test_inet_chain_order_established_lo_syn_guard_owned_bit_then_drop() -> None:
    s = spec(
        Rule(vip=V4, port=80),
        Rule(vip=V4, proto=Proto.UDP, port=7000, port_end=7010),
        buckets=512,
        seed=42,
    )
    rules = ruleset.main_chain_rules(s)
    texts = [rendered(r) for r in rules]
    assert '"ct"' in texts[0] and '"accept"' in texts[0]
    # the node's own processes (over lo, which ingress never sees): served, any bucket or port
    from_lo = {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}
    assert from_lo in rules[1] and texts[1].endswith('{"accept": null}]')
    assert '"mark"' not in texts[1] and sum(from_lo in r for r in rules) == 1
    assert '"icmp"' in texts[2] and "destination-unreachable" in texts[2]
    # TCP: a non-SYN to the port is dropped before anything else
    assert '"syn", "ack"' in texts[3] and texts[3].endswith('{"drop": null}]')
    # the bucket was computed at ingress: here only the owned bit is tested, then the socket
    owned_bit = {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x80000000]},
                           "right": 0x80000000}}  # fmt: skip
    assert owned_bit in rules[4]
    assert rules[4].index(owned_bit) < rules[4].index(ruleset.LISTENING)
    # the accepted flow's conntrack entry carries the mark: the owned bit and the bucket
    ct_mark = {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}
    assert ct_mark in rules[4] and texts[4].endswith('{"accept": null}]')
    accepted, dropped = ruleset.counter_names(s.rules[0])
    assert {"counter": accepted} in rules[4] and {"counter": dropped} in rules[5]
    assert texts[5].endswith('{"drop": null}]')
    # UDP range has no SYN guard and matches the range
    assert '"range": [7000, 7010]' in texts[6] and owned_bit in rules[6]
    assert "echo-request" in texts[8] and owned_bit in rules[8]
    assert texts[-1].endswith('{"drop": null}]') and "198.51.100.100" in texts[-1]
    assert not any('"jhash"' in t for t in texts)  # no hashing after conntrack


def test_ingress_hashes_each_rule_and_decides_per_bucket() -> None:
    s = spec(
        Rule(vip=V4, port=80),
        Rule(vip=V6, proto=Proto.UDP, port=53, affinity=Affinity.CLIENT_SUBNET, prefix6=48),
        buckets=512,
        seed=42,
    )
    hooked = [rendered(r) for r in ruleset.ingress_rules(s)]
    # first, a frame the prefilter hashed and let through (to a VMAC): host, and its bucket,
    # untagged, to the decision
    tag, mask = ruleset.PREFILTER_TAG, ruleset.BUCKET_MASK
    assert f'"&": [{{"meta": {{"key": "mark"}}}}, {tag}]' in hooked[0]
    assert '"pkttype"' in hooked[0] and vmac_for("web", V4) not in hooked[0]
    assert f'{{"&": [{{"meta": {{"key": "mark"}}}}, {mask}]}}' in hooked[0]
    assert hooked[0].endswith('{"goto": {"target": "bucket"}}]')
    assert vmac_for("web", V4) in hooked[1] and '"pkttype"' in hooked[1]
    assert '"jump": {"target": "vip"}' in hooked[2] and '"ip"' in hooked[2]
    assert '"ip6"' in hooked[3]
    for off in ({"prefilter": False}, {"decide_at": DecisionPoint.PREROUTING}):
        rules = [rendered(r) for r in ruleset.ingress_rules(s.model_copy(update=off))]
        assert len(rules) == 3 and str(tag) not in "".join(rules), off
    # one map lookup per family sends a rule's frames to the chain of its hash key
    texts = [rendered(r) for r in ruleset.decide_rules(s)]
    assert '"vmap"' in texts[0] and '"@rules4"' in texts[0] and '"th"' in texts[0]
    assert '"vmap"' in texts[1] and '"@rules6"' in texts[1] and '"ip6"' in texts[1]
    assert "echo-request" in texts[2] and "echo-request" in texts[3]
    assert len(texts) == 4  # anything else goes on to the inet table
    maps = ruleset.rule_maps(s)
    assert maps["rules4"] == [
        [{"concat": [str(V4), "tcp", 80]}, {"goto": {"target": "h4_client-ip"}}]
    ]
    assert maps["rules6"] == [
        [{"concat": [str(V6), "udp", 53]}, {"goto": {"target": "h6_client-subnet_48"}}]
    ]
    chains = ruleset.hash_chains(s)
    assert set(chains) == {"h4_client-ip", "h6_client-subnet_48"}
    for rule in s.rules:
        text = rendered(chains[ruleset.hash_chain(rule)])
        key = json.dumps(ruleset.hash_key(rule), sort_keys=True)
        assert '"jhash"' in text and '"mod": 512' in text and '"seed": 42' in text
        assert key in text and text.endswith('{"goto": {"target": "bucket"}}]')
    # rules with the same hash key share its chain; a range is an interval element
    many = spec(*(Rule(vip=V4, port=p, affinity=Affinity.CLIENT_IP_PORT) for p in (80, 443)),
                Rule(vip=V4, proto=Proto.UDP, port=7000, port_end=7010,
                     affinity=Affinity.CLIENT_IP_PORT))  # fmt: skip
    assert set(ruleset.hash_chains(many)) == {"h4_client-ip-port_tcp", "h4_client-ip-port_udp"}
    # single ports in a hash map, ranges in an interval map (slower to fill: only when needed)
    assert [len(v) for v in ruleset.rule_maps(many).values()] == [2, 1]
    ranged = ruleset.rule_maps(many)["ranges4"][0][0]
    assert ranged == {"concat": [str(V4), "udp", {"range": [7000, 7010]}]}
    decide = [rendered(r) for r in ruleset.decide_rules(many)]
    assert '"@rules4"' in decide[0] and '"@ranges4"' in decide[1]
    made = [c["add"]["map"] for c in ruleset.ruleset_batch(many) if "map" in c.get("add", {})]
    assert [(m["name"], m.get("flags")) for m in made] == [
        ("rules4", None),
        ("ranges4", ["interval"]),
    ]
    bucket = [rendered(r) for r in ruleset.bucket_rules(s)]
    # not kept (kept holds the owned buckets too): dropped after one lookup
    assert '"@kept"' in bucket[0] and '"op": "!="' in bucket[0]
    assert bucket[0].endswith('{"counter": "foreign"}, {"drop": null}]')
    assert '"@owned"' in bucket[1] and '"|"' in bucket[1] and bucket[1].endswith('"accept": null}]')
    # the packet path writes no set
    assert '"op": "add"' not in "".join(bucket) and '"op": "update"' not in "".join(bucket)
    # kept: a pure SYN is the new owner's, anything else goes on to conntrack
    assert '"syn", "ack"' in bucket[2] and bucket[2].endswith('{"drop": null}]')
    assert bucket[3] == '[{"accept": null}]'


def test_prerouting_decision_point_drops_nothing_at_ingress() -> None:
    s = spec(Rule(vip=V4, port=80), decide_at=DecisionPoint.PREROUTING)
    bucket = [rendered(r) for r in ruleset.bucket_rules(s)]
    assert len(bucket) == 2 and '"@owned"' in bucket[0] and bucket[1] == '[{"accept": null}]'
    assert not any('"drop"' in t for t in bucket)


def test_dual_stack_rules_per_family() -> None:
    s = spec(Rule(vip=V4, port=80), Rule(vip=V6, port=80))
    texts = [rendered(r) for r in ruleset.main_chain_rules(s)]
    assert any('"icmpv6"' in t and "packet-too-big" in t for t in texts)
    assert any('"ip6"' in t and '"jhash"' in t for t in map(rendered, ruleset.decide_rules(s)))
    assert sum(t.endswith('{"drop": null}]') and '"set"' in t for t in texts) == 2


def test_batch_is_one_idempotent_transaction() -> None:
    s = spec(Rule(vip=V4, port=80))
    batch = ruleset.ruleset_batch(s)
    # no table is deleted: the netdev table holds the sets (leases, kept buckets), and both
    # tables' chains are only flushed and refilled
    assert not any("table" in c.get("delete", {}) for c in batch)
    sets = [c["add"]["set"] for c in batch if "set" in c.get("add", {})]
    assert [(x["family"], x["name"], x.get("flags")) for x in sets] == [
        ("netdev", "owned", ["timeout"]),
        ("netdev", "kept", None),  # nft makes it dynamic: a rule adds to it
    ]
    again = ruleset.ruleset_batch(s, kept_exists=True)  # an update: the set is not added again
    assert [c for c in batch if c not in again] == [{"add": {"set": {**sets[1], "type": "mark"}}}]
    flushed = [c["flush"].get("chain") or c["flush"]["map"] for c in batch if "flush" in c]
    assert {(c["family"], c["name"]) for c in flushed} == {
        ("netdev", "ingress"), ("netdev", "vip"), ("netdev", "bucket"), ("netdev", "h4_client-ip"),
        ("netdev", "rules4"), ("inet", "pre"), ("inet", "vip"),
    }  # fmt: skip
    chains = [c["add"]["chain"] for c in batch if "chain" in c.get("add", {})]
    ingress = next(c for c in chains if c.get("hook") == "ingress")
    assert ingress["dev"] == "eth0" and ingress["prio"] == -500
    pre = next(c for c in chains if c.get("hook") == "prerouting")
    assert pre["prio"] == -150
    hooked = [
        c["add"]["rule"]["expr"]
        for c in batch
        if c.get("add", {}).get("rule", {}).get("chain") == "ingress"
    ]
    assert any(vmac_for("web", V4) in rendered(e) for e in hooked)
    assert ruleset.ruleset_batch(s) == batch  # deterministic
    # notrack is off: its chains are removed (add first, so that works when they are absent)
    raw = [c for c in batch if c.get("delete", {}).get("chain", {}).get("name") == "raw_pre"]
    assert len(raw) == 1


def test_fresh_batch_recreates_the_hooked_chain_and_the_inet_table_only() -> None:
    batch = ruleset.ruleset_batch(spec(Rule(vip=V4, port=80)), fresh=True)
    deleted = [c["delete"] for c in batch if "delete" in c]
    assert {"chain": {"family": "netdev", "table": "vipfarm_web", "name": "ingress"}} in deleted
    assert {"table": {"family": "inet", "name": "vipfarm_web"}} in deleted
    assert not any(d.get("table", {}).get("family") == "netdev" for d in deleted)
    assert not any("set" in d for d in deleted)


def test_notrack_exempts_what_is_not_to_or_from_a_vip() -> None:
    s = spec(Rule(vip=V4, port=80), notrack_other=True)
    assert [rendered(r) for r in ruleset.notrack_rules(s, "in")] == [
        rendered([{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                             "right": {"set": [str(V4)]}}}, {"notrack": None}]),
        rendered([{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
                  {"notrack": None}]),
    ]  # fmt: skip
    assert '"saddr"' in rendered(ruleset.notrack_rules(s, "out")[0])
    batch = ruleset.ruleset_batch(s)
    hooks = {
        c["add"]["chain"]["name"]: (c["add"]["chain"]["hook"], c["add"]["chain"]["prio"])
        for c in batch
        if "hook" in c.get("add", {}).get("chain", {})
    }
    assert hooks["raw_pre"] == ("prerouting", -300) and hooks["raw_out"] == ("output", -300)
    chains = {c["add"]["rule"]["chain"] for c in batch if "rule" in c.get("add", {})}
    assert {"raw_pre", "raw_out"} <= chains


def test_counters_are_named_after_the_rule_and_declared_in_the_batch() -> None:
    tcp = Rule(vip=V4, port=8000, port_end=8100)
    udp6 = Rule(vip=V6, proto=Proto.UDP, port=53)
    assert ruleset.counter_names(tcp) == (
        "new_tcp_198_51_100_100_8000_8100_accepted",
        "new_tcp_198_51_100_100_8000_8100_dropped",
    )
    assert ruleset.counter_names(udp6)[0] == "new_udp_2001_db8_100__100_53_accepted"
    batch = ruleset.ruleset_batch(spec(tcp, udp6))
    declared = [c["add"]["counter"]["name"] for c in batch if "counter" in c.get("add", {})]
    assert declared == ["foreign", *ruleset.counter_names(tcp), *ruleset.counter_names(udp6)]
    first_rule = next(
        i for i, c in enumerate(batch) if c.get("add", {}).get("rule", {}).get("family") == "inet"
    )
    last_counter = max(i for i, c in enumerate(batch) if "counter" in c.get("add", {}))
    assert last_counter < first_rule  # a rule may only name a counter that exists


def test_parse_counters_listing() -> None:
    listing = {
        "nftables": [
            {"metainfo": {}},
            {"counter": {"family": "inet", "name": "a_accepted", "packets": 7, "bytes": 420}},
            {"counter": {"family": "inet", "name": "a_dropped", "packets": 0, "bytes": 0}},
        ]
    }
    assert ruleset.parse_counters(listing) == {"a_accepted": 7, "a_dropped": 0}


def test_owned_text_leases_in_milliseconds() -> None:
    text = ruleset.owned_text("web", [5, 1, 5], 0.3)
    assert text.splitlines() == [
        "flush set netdev vipfarm_web owned",
        "add element netdev vipfarm_web owned { 1 timeout 300ms, 5 timeout 300ms }",
        "add element netdev vipfarm_web kept { 1, 5 }",  # kept holds every owned bucket
    ]
    assert ruleset.owned_text("web", [], 1).splitlines() == ["flush set netdev vipfarm_web owned"]


def test_sets_text_moves_buckets_between_owned_and_kept_in_one_batch() -> None:
    text = ruleset.sets_text("web", [1], 1, keep=[7, 3], unkeep=[1, 4])
    assert text.splitlines() == [
        "flush set netdev vipfarm_web owned",
        "add element netdev vipfarm_web owned { 1 timeout 1000ms }",
        "add element netdev vipfarm_web kept { 1, 3, 7 }",  # an owned bucket stays kept
        # a removal that succeeds whether or not the element is there
        "add element netdev vipfarm_web kept { 4 }",
        "delete element netdev vipfarm_web kept { 4 }",
    ]
    assert ruleset.sets_text("web", None, 0, keep=[2]).splitlines() == [
        "add element netdev vipfarm_web kept { 2 }"
    ]


def test_parse_owned_listing() -> None:
    listing = {
        "nftables": [
            {"metainfo": {}},
            {"set": {"name": "owned", "elem": [{"elem": {"val": 3, "timeout": 1}}, 9]}},
        ]
    }
    assert ruleset.parse_owned(listing) == {3, 9}


def test_remove_batch_tolerates_missing_tables() -> None:
    batch = ruleset.remove_batch("web")
    assert [next(iter(c)) for c in batch] == ["add", "delete", "add", "delete"]


def test_vmac_is_locally_administered_unicast_and_stable() -> None:
    mac = vmac_for("web", V4)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert mac == vmac_for("web", V4) != vmac_for("web2", V4) != vmac_for("web", V6)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"port": 70000}, "less than or equal to 65535"),
        ({"port": 90, "port_end": 80}, "reversed"),
        ({"port": 80, "affinity": "sticky"}, "client-ip"),
    ],
)
def test_rule_validation_names_the_problem(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        Rule(vip=V4, **kwargs)


def test_overlapping_rules_rejected() -> None:
    with pytest.raises(ValidationError, match="overlap"):
        spec(Rule(vip=V4, port=80, port_end=90), Rule(vip=V4, port=85))
    spec(Rule(vip=V4, port=80), Rule(vip=V4, proto=Proto.UDP, port=80))  # other proto is fine


def test_only_vip_traffic_enters_the_vip_chain() -> None:
    s = spec(Rule(vip=V4, port=80), Rule(vip=V6, port=443))
    hook = ruleset.hook_rules(s)
    assert [rendered(r) for r in hook] == [
        rendered(
            [
                {"match": {"op": "==", "left": {"payload": {"protocol": fam, "field": "daddr"}},
                           "right": {"set": [str(vip)]}}},
                {"jump": {"target": "vip"}},
            ]
        )
        for fam, vip in (("ip", V4), ("ip6", V6))
    ]  # fmt: skip
    chains = {
        c["add"]["rule"]["chain"] for c in ruleset.ruleset_batch(s) if "rule" in c.get("add", {})
    }
    # netdev: ingress, vip, bucket and the hash chain; inet: pre, vip
    assert chains == {"ingress", "pre", "vip", "bucket", "h4_client-ip", "h6_client-ip"}
    only_v4 = ruleset.hook_rules(spec(Rule(vip=V4, port=80)))
    assert len(only_v4) == 1
