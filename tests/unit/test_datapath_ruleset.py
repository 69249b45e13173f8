"""Ruleset generation, without a kernel."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from pydantic import ValidationError

from vipfarm.datapath import ruleset
from vipfarm.datapath.spec import Affinity, DatapathSpec, Proto, Rule, vmac_for

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


def test_chain_order_established_first_then_syn_guard_then_hash_then_drop() -> None:
    s = spec(
        Rule(vip=V4, port=80),
        Rule(vip=V4, proto=Proto.UDP, port=7000, port_end=7010),
        buckets=512,
        seed=42,
    )
    rules = ruleset.main_chain_rules(s)
    texts = [rendered(r) for r in rules]
    assert '"ct"' in texts[0] and '"accept"' in texts[0]
    assert '"icmp"' in texts[1] and "destination-unreachable" in texts[1]
    # TCP: a non-SYN to the port is dropped before any hashing
    assert '"syn", "ack"' in texts[2] and texts[2].endswith('{"drop": null}]')
    assert '"jhash"' in texts[3] and '"mod": 512' in texts[3] and '"seed": 42' in texts[3]
    # new flows only when the application listens: no RST from a node whose app died
    assert rules[3].index(ruleset.LISTENING) < next(
        i for i, e in enumerate(rules[3]) if "mangle" in e
    )
    # a new flow is accepted (and counted) only when its bucket is owned; else counted, dropped
    assert '"@owned"' in texts[3] and texts[3].endswith('{"accept": null}]')
    accepted, dropped = ruleset.counter_names(s.rules[0])
    assert {"counter": accepted} in rules[3] and {"counter": dropped} in rules[4]
    assert texts[4].endswith('{"drop": null}]') and '"jhash"' not in texts[4]
    # UDP range has no SYN guard and matches the range
    assert '"range": [7000, 7010]' in texts[5] and '"jhash"' in texts[5]
    assert "echo-request" in texts[7]
    assert texts[-1].endswith('{"drop": null}]') and "198.51.100.100" in texts[-1]
    assert sum('"jhash"' in t for t in texts) == 3


def test_dual_stack_rules_per_family() -> None:
    s = spec(Rule(vip=V4, port=80), Rule(vip=V6, port=80))
    texts = [rendered(r) for r in ruleset.main_chain_rules(s)]
    assert any('"icmpv6"' in t and "packet-too-big" in t for t in texts)
    assert any('"ip6"' in t and '"jhash"' in t for t in texts)
    assert sum(t.endswith('{"drop": null}]') and '"set"' in t for t in texts) == 2


def test_batch_is_one_idempotent_transaction() -> None:
    s = spec(Rule(vip=V4, port=80))
    batch = ruleset.ruleset_batch(s)
    verbs = [next(iter(c)) for c in batch]
    # the stateless netdev table is recreated; the inet table is only flushed, so the owned set
    # (and its leases) survives a re-apply
    assert verbs[:3] == ["add", "delete", "add"]
    assert {"delete": {"table": {"family": "inet", "name": "vipfarm_web"}}} not in batch
    assert {"flush": {"chain": {"family": "inet", "table": "vipfarm_web", "name": "pre"}}} in batch
    chains = [c["add"]["chain"] for c in batch if "chain" in c.get("add", {})]
    ingress = next(c for c in chains if c.get("hook") == "ingress")
    assert ingress["dev"] == "eth0" and ingress["prio"] == -500
    pre = next(c for c in chains if c.get("hook") == "prerouting")
    assert pre["prio"] == -150
    vmac_rule = next(c for c in batch if c.get("add", {}).get("rule", {}).get("chain") == "ingress")
    assert vmac_for("web", V4) in rendered(vmac_rule["add"]["rule"]["expr"])
    assert ruleset.ruleset_batch(s) == batch  # deterministic


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
    assert declared == [*ruleset.counter_names(tcp), *ruleset.counter_names(udp6)]
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
        "flush set inet vipfarm_web owned",
        "add element inet vipfarm_web owned { 1 timeout 300ms, 5 timeout 300ms }",
    ]
    assert ruleset.owned_text("web", [], 1).splitlines() == ["flush set inet vipfarm_web owned"]


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
    assert chains == {"ingress", "pre", "vip", "bucket"}
    only_v4 = ruleset.hook_rules(spec(Rule(vip=V4, port=80)))
    assert len(only_v4) == 1
