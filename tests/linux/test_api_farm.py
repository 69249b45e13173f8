"""Issue 5 acceptance: the HTTP API, the CLI across nodes, deployment and metrics, on real
daemons in a lab.

Requests come from the lab's client namespace (the client side of the LAN) or from a node's
namespace, with a thread that enters the namespace (`run_in_netns`) or a CLI process started in
it. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from vipfarm.lab.netns import run_in_netns
from vipfarm.lab.testbed import Lab, LabFactory
from vipfarm.lab.topology import node_lan4
from vipfarm.node.control import ControlError

NEW_RULE = """
[[rule]]
vip = "198.51.100.100"
proto = "tcp"
ports = "8080"
"""


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def token(lab: Lab) -> str:
    return lab.api_token_file.read_text().strip()


def api(
    lab: Lab,
    node: str,
    method: str,
    path: str,
    *,
    auth: str | None = "good",
    body: dict[str, Any] | None = None,
    client: str = "client1",
) -> httpx.Response:
    """One HTTP request to `node`'s API from `client`'s namespace."""
    headers = {}
    if auth is not None:
        headers["Authorization"] = f"Bearer {token(lab) if auth == 'good' else auth}"
    url = lab.api_url(node, path)

    def send() -> httpx.Response:
        return httpx.request(method, url, headers=headers, json=body, timeout=15)

    return run_in_netns(lab.ns(client), send)


def vipfarm(lab: Lab, where: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(where, [sys.executable, "-m", "vipfarm", *args], timeout=90)


def remote(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`vipfarm --node <node's address> ...` from the client side of the lab."""
    i = int(node.removeprefix("node"))
    opts = ["--node", str(node_lan4(i)), "--token-file", str(lab.api_token_file)]
    return vipfarm(lab, "client1", *opts, *args)


def versions(lab: Lab) -> dict[str, int]:
    return {n: int(lab.daemon_state(n)["config_version"]) for n in lab.node_names}


def counters(lab: Lab, node: str) -> str:
    out = lab.exec(node, ["nft", "list", "counters", "table", "inet", f"vipfarm_{lab.name}"])
    return out.stdout


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


def test_calls_without_the_token_get_401_wrong_token_403_and_change_nothing(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=2, daemon=True, app="builtin")
    before = versions(lab)
    for path, method, body in (
        ("/api/v1/stop", "POST", {"force": True}),
        ("/api/v1/config", "PUT", {"text": "junk"}),
        ("/api/v1/state", "GET", None),
        ("/metrics", "GET", None),
    ):
        none = api(lab, "node2", method, path, auth=None, body=body)
        assert none.status_code == 401, (path, none.text)
        assert none.headers["www-authenticate"] == "Bearer"
        wrong = api(lab, "node2", method, path, auth="not-the-token", body=body)
        assert wrong.status_code == 403, (path, wrong.text)
    assert lab.daemon_state("node2")["state"] == "UP"
    assert versions(lab) == before
    assert "new=DRAINING" not in (lab.dir / "nodelogs" / "node2" / "module.log").read_text()
    schema = api(lab, "node2", "GET", "/openapi.json", auth=None)
    assert schema.status_code == 200 and "/api/v1/config" in schema.json()["paths"]
    good = api(lab, "node2", "GET", "/api/v1/state")
    assert good.status_code == 200 and good.json()["node"] == "node2"


def test_deploy_reaches_every_node_live_and_a_bad_or_refused_one_changes_nothing(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, daemon=True, app="builtin")
    assert versions(lab) == {"node1": 0, "node2": 0, "node3": 0}
    text = lab.farm_config.read_text()
    new = lab.dir / "new.toml"
    # A new rule, and node3 at half weight: both apply live.
    lighter = text.replace('name = "node3"\n', 'name = "node3"\nweight = 50\n')
    assert lighter != text
    new.write_text(lighter + NEW_RULE)
    out = vipfarm(lab, "node1", "config", "deploy", str(new))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deployed version 1" in out.stdout
    assert versions(lab) == {"node1": 1, "node2": 1, "node3": 1}
    for node in lab.node_names:
        assert "new_tcp_198_51_100_100_8080_accepted" in counters(lab, node), node
        assert lab.node_config(node).read_text().startswith("# vipfarm config version 1,")
    # node3's share follows its new weight: 256 * 50 / 250 buckets
    wait_for(
        "node3 to hold a fifth of the buckets",
        lambda: abs(len(lab.kernel_owned(["node3"])["node3"] or []) - 51) <= 1,
    )
    lab.wait_farm_up(20)
    # nothing was lost on the way: every node still serves
    assert {r.node for r in lab.load("client1", count=90)} == set(lab.node_names)

    bad = lab.dir / "bad.toml"
    bad.write_text(lighter + NEW_RULE.replace("8080", "70000"))
    out = vipfarm(lab, "node1", "config", "deploy", str(bad))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "rule[" in out.stderr and "70000" in out.stderr
    assert versions(lab) == {"node1": 1, "node2": 1, "node3": 1}

    # A setting that needs a restart is refused by every node, with the key named.
    slower = lab.dir / "slower.toml"
    text = new.read_text()
    assert 'profile = "default"' in text
    slower.write_text(text.replace('profile = "default"', 'profile = "default"\ninterval_ms = 40'))
    out = vipfarm(lab, "node1", "config", "deploy", str(slower))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "timing.interval_ms" in out.stderr and "refused" in out.stderr

    # node2 busy with another deployment: it refuses, the others were prepared and let go.
    held = api(
        lab,
        "node2",
        "POST",
        "/api/v1/config/prepare",
        body={"deploy_id": "elsewhere1", "origin": "operator", "text": new.read_text()},
    )
    assert held.status_code == 200, held.text
    out = remote(lab, "node1", "config", "deploy", "--json", str(new))
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"node2 refused: another deployment \(from operator\)", out.stderr)
    assert versions(lab) == {"node1": 1, "node2": 1, "node3": 1}
    api(lab, "node2", "POST", "/api/v1/config/abort", body={"deploy_id": "elsewhere1"})
    out = remote(lab, "node2", "config", "deploy", "--json", str(new))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["version"] == 2 and {v["outcome"] for v in result["nodes"]} == {"applied"}
    assert versions(lab) == {"node1": 2, "node2": 2, "node3": 2}


def test_a_node_that_was_down_gets_the_current_version_when_it_rejoins(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, daemon=True, app="builtin")
    lab.kill("node3")

    def node3_dead() -> bool:
        return not next(n for n in lab.daemon_state("node1")["farm"] if n["node"] == "node3")[
            "alive"
        ]

    wait_for("node1 to see node3 dead", node3_dead)
    new = lab.dir / "new.toml"
    new.write_text(lab.farm_config.read_text() + NEW_RULE)
    out = vipfarm(lab, "node1", "config", "deploy", "--json", str(new))
    assert out.returncode == 0, out.stdout + out.stderr
    outcome = {v["node"]: v["outcome"] for v in json.loads(out.stdout)["nodes"]}
    assert outcome == {"node1": "applied", "node2": "applied", "node3": "skipped"}
    assert "# vipfarm config version" not in lab.node_config("node3").read_text()

    lab.start_daemon("node3", wait=False)  # from its old file, version 0

    def node3_version() -> int | None:
        try:
            return int(lab.daemon_state("node3")["config_version"])
        except ControlError:
            return None  # not listening yet

    wait_for("node3 to fetch version 1 from a peer", lambda: node3_version() == 1)
    assert "new_tcp_198_51_100_100_8080_accepted" in counters(lab, "node3")
    assert lab.node_config("node3").read_text().startswith("# vipfarm config version 1,")
    assert "config_applied version=1" in (lab.dir / "nodelogs" / "node3" / "module.log").read_text()
    lab.wait_farm_up(30)


def test_remote_cli_drains_node2_from_the_client_side(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=3, daemon=True, app="builtin")
    st = remote(lab, "node2", "state", "--json")
    assert st.returncode == 0, st.stderr
    farm = {n["node"]: n for n in json.loads(st.stdout)["farm"]}
    assert set(farm) == set(lab.node_names)
    assert all(n["config_version"] == 0 and n["state"] == "UP" for n in farm.values())
    table = remote(lab, "node1", "state")
    assert table.returncode == 0 and "config" in table.stdout and "node3" in table.stdout

    out = remote(lab, "node2", "stop")
    assert out.returncode == 0, out.stderr
    assert "node node2 is DRAINING" in out.stdout
    wait_for("node2 to give every bucket away", lambda: not lab.kernel_owned(["node2"])["node2"])
    wait_for("node2 to reach STOP", lambda: lab.daemon_state("node2")["state"] == "STOP")
    assert {r.node for r in lab.load("client1", count=60)} == {"node1", "node3"}
    again = remote(lab, "node2", "stop")
    assert again.returncode == 1 and "already STOP" in again.stderr

    logs = remote(lab, "node2", "log", "-n", "200")
    assert logs.returncode == 0 and "drained" in logs.stdout

    snap = lab.dir / "node2.tar.gz"
    out = remote(lab, "node2", "snapshot", "-o", str(snap))
    assert out.returncode == 0, out.stderr
    with tarfile.open(fileobj=io.BytesIO(snap.read_bytes())) as tar:
        names = {Path(n).name for n in tar.getnames()}
        state_member = next(n for n in tar.getnames() if n.endswith("state.json"))
        extracted = tar.extractfile(state_member)
        assert extracted is not None
        assert json.load(extracted)["state"] == "STOP"
    assert {"config.toml", "ruleset.json", "module.log", "app.log", "metrics.txt"} <= names

    out = remote(lab, "node2", "start")
    assert out.returncode == 0, out.stderr
    lab.wait_farm_up(30)

    unreachable = vipfarm(
        lab, "client1", "--node", "198.51.100.99", "--token-file", str(lab.api_token_file), "state"
    )
    assert unreachable.returncode == 3, unreachable.stderr
    wrong = lab.dir / "wrong.token"
    wrong.write_text("x" * 32)
    denied = vipfarm(lab, "client1", "--node", "198.51.100.12", "--token-file", str(wrong), "stop")
    assert denied.returncode == 2 and "403" in denied.stderr
    assert lab.daemon_state("node2")["state"] == "UP"


FORGE = """
import socket, sys
from vipfarm.membership.wire import Codec, NodeState, config_digest, node_id
farm, target = sys.argv[1], sys.argv[2]
codec = Codec(farm, b"not the farm key, but long enough", 256)
payload = codec.encode(
    node_id=node_id("node2"), digest=0, incarnation=2**62, seq=1, state=NodeState.STOP,
    weight=100, owned=(1 << 256) - 1, want=0, fresh=0, fresh_len=1,
)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(payload, (target, 9001))
"""


def test_metrics_rise_with_traffic_and_a_forged_heartbeat_is_rejected(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, daemon=True, app="builtin")
    rule = {"rule": "tcp/198.51.100.100:80"}

    def scrape(node: str) -> str:
        resp = api(lab, node, "GET", "/metrics")
        assert resp.status_code == 200, resp.text
        return resp.text

    before = {n: scrape(n) for n in lab.node_names}
    replies = lab.load("client1", count=120)
    assert all(r.error is None for r in replies)
    after = {n: scrape(n) for n in lab.node_names}
    accepted = {
        n: metric(after[n], "vipfarm_new_flows_total", verdict="accepted", **rule)
        - metric(before[n], "vipfarm_new_flows_total", verdict="accepted", **rule)
        for n in lab.node_names
    }
    foreign = {
        n: metric(after[n], "vipfarm_foreign_frames_dropped_total")
        - metric(before[n], "vipfarm_foreign_frames_dropped_total")
        for n in lab.node_names
    }
    served = {n: sum(r.node == n for r in replies) for n in lab.node_names}
    for n in lab.node_names:
        # every connection's SYN is accepted by the node that served it; the others drop every
        # frame of it at ingress (SYN, ACK, data, FIN: several frames per connection)
        assert accepted[n] >= served[n] > 0, (n, accepted, served)
        assert foreign[n] >= 120 - served[n], (n, foreign, served)
    text = after["node1"]
    assert metric(text, "vipfarm_node_state", state="UP") == 1
    assert metric(text, "vipfarm_heartbeats_received_total", network="lan") > 0
    assert metric(text, "vipfarm_heartbeats_sent_total", network="hb2") > 0
    assert 80 <= metric(text, "vipfarm_buckets_owned") <= 90
    assert metric(text, "vipfarm_script_duration_seconds_count", script="start") >= 1

    view_before = {
        (n["node"], n["state"], n["incarnation"]) for n in lab.daemon_state("node1")["farm"]
    }
    # From node2's own address (heartbeats from any other source are dropped before decoding,
    # as `unknown_source`): the key id names a key node1 does not hold.
    run = lab.exec("node2", [sys.executable, "-c", FORGE, lab.name, str(node_lan4(1))], check=True)
    assert run.returncode == 0

    def rejected() -> float:
        return metric(
            scrape("node1"),
            "vipfarm_heartbeats_rejected_total",
            network="lan",
            reason="unknown_key",
        )

    wait_for("node1 to count the forged heartbeats as rejected", lambda: rejected() >= 5)
    view_after = {
        (n["node"], n["state"], n["incarnation"]) for n in lab.daemon_state("node1")["farm"]
    }
    assert view_after == view_before
    assert lab.daemon_state("node1")["drops"].get("unknown_key") == 5
