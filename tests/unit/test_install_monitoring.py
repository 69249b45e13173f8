"""The monitoring files (packaging/monitoring): every metric and label they use exists.

The names come from a real scrape: `vipfarm.node.metrics.Metrics` rendered with facts that fill
every family, parsed back with prometheus-client's parser. The alert rules also pass
`promtool check rules` and their own `promtool test rules` (promtool comes with Debian's
prometheus package, which scripts/install installs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import vipfarm.membership.events as events
from vipfarm.membership.wire import NodeState
from vipfarm.node.metrics import Metrics, NodeFacts

MON = Path(__file__).resolve().parents[2] / "packaging" / "monitoring"
ALERTS = MON / "vipfarm-alerts.yml"
DASHBOARD = MON / "vipfarm-dashboard.json"
# Labels that Prometheus adds (the scrape job, the target) or that a histogram has.
SCRAPE_LABELS = {"job", "instance", "farm", "le"}


def scraped() -> tuple[set[str], set[str]]:
    """The sample names and label names of one node's /metrics."""
    m = Metrics()
    m.facts = NodeFacts(
        state="UP",
        app_state="running",
        buckets_owned=85,
        buckets=256,
        config_version=3,
        split_brain=False,
        peers_alive={"node2": True},
        hb_sent={"lan": 10},
        hb_received={"lan": 9},
        hb_rejected={("lan", "bad_mac"): 1},
        errors={"datapath_errors": 0, "lease_renew_busy": 0},
        events={"PeerDown": 1, "LeaseLost": 0},
        flows={("tcp/198.51.100.100:80", "accepted"): 5},
        checkers=[("tcp:127.0.0.1:80", True, True)],
    )
    m.observe_script("start", 0.2, ok=False)
    text = generate_latest(m.registry).decode()
    names, labels = set(), set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            names.add(s.name)
            labels |= set(s.labels)
    return names, labels


def expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_every_metric_used_exists() -> None:
    names, _ = scraped()
    used = {m for e in expressions() for m in re.findall(r"\bvipfarm_[a-z0-9_]+", e)}
    assert used, "no vipfarm metric found in the monitoring files"
    missing = sorted(used - names)
    assert missing == [], f"used but not exported by vipfarm.node.metrics: {missing}"
    # And the alerts are all there.
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for needed in (
        "VipfarmNodeDown",
        "VipfarmFarmBelowTwoNodes",
        "VipfarmShareImbalance",
        "VipfarmHeartbeatNetworkLost",
        "VipfarmLeaseRenewalFailing",
        "VipfarmConfigVersionSkew",
    ):
        assert needed in alerts


def test_every_label_and_label_value_used_exists() -> None:
    _, labels = scraped()
    known = labels | SCRAPE_LABELS
    for e in expressions():
        for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", e):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                assert label in known, (label, e)
        for label, _op, value in re.findall(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"', e):
            if label == "version":
                continue  # count_values' output label
            assert label in known, (label, e)
            if label == "state":
                assert value in {s.name for s in NodeState}, e
            if label == "event":
                assert hasattr(events, value), e
            if label == "kind":
                pulse = (Path(events.__file__).parents[1] / "node" / "pulse.py").read_text()
                for kind in value.split("|"):
                    assert f'"{kind}"' in pulse or f"{kind}=" in pulse, (kind, e)


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "farm"}


def promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool comes with Debian's prometheus package: scripts/install installs it"
    return exe


def test_promtool_checks_and_tests_the_rules() -> None:
    for args in (["check", "rules", ALERTS.name], ["test", "rules", "vipfarm-alerts.test.yml"]):
        res = subprocess.run(
            [promtool(), *args], cwd=MON, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_checks_the_scrape_example(tmp_path: Path) -> None:
    # The example's paths point at a Prometheus server's /etc: put them under tmp_path.
    text = (MON / "prometheus-scrape.yml").read_text()
    shutil.copy(ALERTS, tmp_path / "vipfarm-alerts.yml")
    for name in ("web-ca.crt", "api.token"):
        (tmp_path / name).write_text("x\n")
    text = text.replace("/etc/prometheus/vipfarm/", f"{tmp_path}/").replace(
        "/etc/prometheus/", f"{tmp_path}/"
    )
    (tmp_path / "prometheus.yml").write_text(text)
    res = subprocess.run(
        [promtool(), "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["vipfarm-alerts.yml", "prometheus-scrape.yml"])
def test_no_made_up_urls(name: str) -> None:
    assert not re.search(r"https?://", (MON / name).read_text())
