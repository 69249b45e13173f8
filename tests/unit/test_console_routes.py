"""The console's routes against a fake manager (`ConsoleHost`): sign-in and sign-out, the farm
snapshot (a dead node shown dead), an action recorded in the module log, validation as you
type, who serves a client, the timeline built from module logs, and the API schema kept free of
console routes. The browser side is tested in tests/e2e/test_console.py."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vipfarm.api.app import create_app
from vipfarm.api.models import (
    ActionResult,
    ConfigInfo,
    DeployRequest,
    DeployResult,
    FarmNode,
    LogPage,
    LogQuery,
    NodeStatus,
    StopRequest,
)
from vipfarm.config.loading import parse_config
from vipfarm.console.farm import parse_line, parse_metrics, timeline_entries
from vipfarm.datapath.jhash import bucket_of
from vipfarm.lab.apps import AppKind
from vipfarm.lab.farm import farm_toml
from vipfarm.node import deploy as dep

TOKEN = b"console-unit-token"


class FakeHost:
    def __init__(self, base: Path) -> None:
        key = base / "farm.key"
        key.write_text("k" * 64 + "\n")
        token = base / "api.token"
        token.write_text(TOKEN.decode() + "\n")
        key.chmod(0o600)
        token.chmod(0o600)
        (base / "pids").mkdir()
        self.config_path = base / "farm.toml"
        text = farm_toml("web", 3, _rules(), AppKind.BUILTIN, base, key, token_file=token)
        self.config_path.write_text(text)
        self.config = parse_config(text, base_dir=base)
        self.node = self.config.node("node1")
        self.module_log = logging.getLogger("vipfarm.test.console")
        self.peers_http: Any = None
        self.stopped: list[bool] = []
        self.restarts = 0
        self.log = base / "module.log"
        self.log.write_text("")

    @property
    def closing(self) -> bool:
        return False

    async def status(self) -> NodeStatus:
        owned = list(range(0, 256, 2))
        farm = [
            FarmNode(
                node="node1",
                state="UP",
                share=50.0,
                alive=True,
                incarnation=1,
                weight=100,
                heartbeat_age_ms={},
            ),
            FarmNode(
                node="node2",
                state="UP",
                share=50.0,
                alive=True,
                incarnation=2,
                weight=100,
                heartbeat_age_ms={"lan": 40.0, "hb2": 41.0},
            ),
            FarmNode(
                node="node3",
                state="STOP",
                share=0.0,
                alive=False,
                incarnation=3,
                weight=100,
                heartbeat_age_ms={"lan": None, "hb2": None},
            ),
        ]
        return NodeStatus(
            farm_name="web",
            node="node1",
            state="UP",
            share=50.0,
            app="healthy",
            owned=owned,
            split_brain=False,
            drops={},
            counters={},
            config_version=0,
            config_digest="abc",
            farm=farm,
        )

    async def start(self) -> ActionResult:
        return ActionResult(node="node1", state="WAIT")

    async def stop(self, req: StopRequest) -> ActionResult:
        self.stopped.append(req.force)
        return ActionResult(node="node1", state="DRAINING", force=req.force)

    async def log_page(self, query: LogQuery) -> LogPage:
        from vipfarm.api.logs import read_page

        return read_page(self.log, query.log, query.offset, query.limit)

    async def config_info(self) -> ConfigInfo:
        text = self.config_path.read_text()
        return ConfigInfo(version=0, digest=dep.digest(text), path=str(self.config_path), text=text)

    async def deploy(self, req: DeployRequest) -> DeployResult:
        parse_config(req.text, base_dir=self.config_path.parent)
        return DeployResult(
            ok=True, dry_run=req.dry_run, version=1, digest="d", changes=[], nodes=[]
        )

    async def restart_app(self) -> ActionResult:
        self.restarts += 1
        return ActionResult(node="node1", state="WAIT")

    async def snapshot(self) -> bytes:
        return b"\x1f\x8b"

    async def metrics_text(self) -> bytes:
        return (
            b'vipfarm_checker_healthy{checker="http:x"} 1.0\n'
            b'vipfarm_checker_last_ok{checker="http:x"} 0.0\n'
            b'vipfarm_new_flows_total{rule="tcp/x:80",verdict="accepted"} 7.0\n'
        )

    # the API's NodeService methods the console does not use
    async def farm_status(self) -> NodeStatus:
        return await self.status()

    def log_path(self, log: str) -> Path:
        return self.log

    async def prepare(self, req: Any) -> Any: ...
    async def commit(self, req: Any) -> Any: ...
    async def abort(self, req: Any) -> Any: ...


def _rules() -> list[Any]:
    from vipfarm.lab.buckets import datapath_spec

    return datapath_spec("web", None).rules


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.fixture
def client(host: FakeHost) -> Iterator[TestClient]:
    with TestClient(create_app(host, TOKEN), base_url="http://testserver") as c:
        yield c


def sign_in(client: TestClient) -> str:
    r = client.post("/console/login", data={"token": TOKEN.decode()}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    page = client.get("/console/")
    m = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert m is not None
    return m.group(1)


def test_sign_in_refuses_a_wrong_token_and_signs_out(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/console/"
    r = client.get("/console/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    r = client.post("/console/login", data={"token": "wrong"}, follow_redirects=False)
    assert r.status_code == 403 and "wrong token" in r.text and "set-cookie" not in r.headers
    csrf = sign_in(client)
    cookie = client.cookies.get("vipfarm_console")
    assert cookie
    assert client.get("/console/api/charts").status_code == 200
    r = client.post("/console/logout", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    client.cookies.set("vipfarm_console", cookie)  # the old cookie no longer works
    assert client.get("/console/api/charts").status_code == 401


def test_the_farm_snapshot_shows_a_dead_node_as_dead(client: TestClient) -> None:
    sign_in(client)
    snap = client.get("/console/api/farm").json()
    nodes = {n["name"]: n for n in snap["nodes"]}
    assert nodes["node1"]["self"] and nodes["node1"]["share"] == 50.0
    assert nodes["node1"]["checkers"] == [{"name": "http:x", "healthy": True, "last_ok": False}]
    assert nodes["node3"]["alive"] is False and nodes["node3"]["share"] == 0.0
    assert not nodes["node3"]["reachable"]
    assert len(snap["rules"]) == 4 and snap["buckets"] == 256


def test_an_action_needs_csrf_and_is_recorded_in_the_module_log(
    client: TestClient, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    csrf = sign_in(client)
    assert client.post("/console/api/nodes/node1/actions/force-stop").status_code == 403
    assert host.stopped == []
    with caplog.at_level(logging.INFO, logger="vipfarm.test.console"):
        r = client.post(
            "/console/api/nodes/node1/actions/force-stop", headers={"X-CSRF-Token": csrf}
        )
    assert r.status_code == 200 and r.json()["nodes"]["node1"] == {"ok": True, "state": "DRAINING"}
    assert host.stopped == [True]
    assert any(
        "console_action user=testclient action=force-stop target=node1 outcome=node1:DRAINING" in m
        for m in caplog.messages
    ), caplog.messages
    r = client.post("/console/api/nodes/node1/actions/reboot", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "reboot" in r.json()["detail"]
    r = client.post("/console/api/nodes/node9/actions/stop", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404


def test_validation_as_you_type_names_the_key(client: TestClient, host: FakeHost) -> None:
    csrf = sign_in(client)
    text = host.config_path.read_text()
    bad = text.replace('ports = "7"', 'ports = "70000"', 1)
    r = client.post("/console/api/config/check", json={"text": bad}, headers={"X-CSRF-Token": csrf})
    problems = r.json()["problems"]
    assert r.json()["ok"] is False and problems[0]["path"] == "rule[1].ports"
    assert "70000" in problems[0]["message"]
    r = client.post(
        "/console/api/config/check", json={"text": text}, headers={"X-CSRF-Token": csrf}
    )
    assert r.json() == {"ok": True, "problems": []}
    r = client.post("/console/api/config/check", json={"text": 5}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "text" in r.json()["detail"]
    r = client.post(
        "/console/api/config/deploy", json={"text": bad}, headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 422 and r.json()["problems"][0]["path"] == "rule[1].ports"


def test_who_serves_a_client_is_the_kernels_hash(client: TestClient, host: FakeHost) -> None:
    import ipaddress

    sign_in(client)
    client.get("/console/api/farm")
    r = client.get("/console/api/buckets/who", params={"client": "198.51.100.201", "port": 4242})
    spec = host.config.datapath_spec("node1")
    want = bucket_of(spec.rules[0], 256, spec.seed, ipaddress.ip_address("198.51.100.201"), 4242)
    assert r.json()["bucket"] == want
    assert r.json()["owners"] == (["node1"] if want % 2 == 0 else [])
    r = client.get("/console/api/buckets/who", params={"client": "nope"})
    assert r.status_code == 422 and "nope" in r.json()["detail"]
    r = client.get("/console/api/buckets/who", params={"client": "2001:db8::1"})
    assert r.status_code == 422 and "IPv6" in r.json()["detail"]


def test_the_timeline_has_one_failover_per_death_with_its_duration() -> None:
    logs = {
        "node1": [
            "2026-01-01 10:00:00,000 INFO state_changed old=WAIT new=UP",
            "2026-01-01 10:05:00,100 WARNING peer_down peer=node2",
            "2026-01-01 10:05:00,150 INFO buckets_changed released=0 acquired=40 owned=128",
            "2026-01-01 10:06:00,000 INFO console_action user=10.0.0.1 action=stop "
            'target=node3 outcome="node3:DRAINING"',
        ],
        "node3": [
            "2026-01-01 10:05:00,120 WARNING peer_down peer=node2",
            "2026-01-01 10:05:00,300 INFO buckets_changed released=0 acquired=45 owned=128",
            "2026-01-01 10:07:00,000 INFO config_applied version=2 digest=ab origin=node1 "
            "changes=rule[1].ports",
        ],
    }
    entries = timeline_entries(logs)
    failovers = [e for e in entries if e["kind"] == "failover"]
    assert len(failovers) == 1 and failovers[0]["node"] == "node2"
    assert failovers[0]["duration_ms"] == 200 and "2 node(s)" in failovers[0]["text"]
    kinds = sorted(e["kind"] for e in entries)
    assert kinds == ["action", "deploy", "failover", "state"]
    assert parse_line("not a log line") is None
    parsed = parse_line('2026-01-01 10:00:00,000 INFO x a=1 b="two words" c="q\\"d"')
    assert parsed is not None and parsed[3] == {"a": "1", "b": "two words", "c": 'q"d'}


def test_metrics_give_checkers_and_accepted_flows() -> None:
    checkers, accepted = parse_metrics(
        'vipfarm_checker_healthy{checker="a"} 0.0\n'
        'vipfarm_new_flows_total{rule="r1",verdict="accepted"} 3.0\n'
        'vipfarm_new_flows_total{rule="r2",verdict="accepted"} 4.0\n'
        'vipfarm_new_flows_total{rule="r2",verdict="dropped"} 9.0\n'
    )
    assert checkers == [{"name": "a", "healthy": False, "last_ok": None}] and accepted == 7.0


def test_the_api_schema_has_no_console_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]
    # and the API itself still wants its bearer token, cookie or not
    sign_in(client)
    assert client.get("/api/v1/state").status_code == 401


def test_peer_routes_answer_a_peer_with_the_farm_token_only(
    client: TestClient, host: FakeHost
) -> None:
    bearer = {"Authorization": "Bearer " + TOKEN.decode()}
    assert client.get("/console/peer/drain").status_code == 401
    r = client.get("/console/peer/drain", headers=bearer)
    assert r.status_code == 200 and r.json()["node"] == "node1"
    assert isinstance(r.json()["connections"], int)
    wrong = client.post("/console/peer/restart-app", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 403 and host.restarts == 0
    r = client.post("/console/peer/restart-app", headers=bearer)
    assert r.status_code == 200 and r.json()["state"] == "WAIT" and host.restarts == 1
    # a signed-in browser restarts through the action, which is recorded
    csrf = sign_in(client)
    r = client.post("/console/api/nodes/node1/actions/restart-app", headers={"X-CSRF-Token": csrf})
    assert r.json()["nodes"]["node1"] == {"ok": True, "state": "WAIT"} and host.restarts == 2
