"""The node API (FastAPI app) against a fake node: authentication, error answers, log pages and
the live stream, metrics, the OpenAPI schema checked by schemathesis, and the CLI's handling of
targets, tokens and exit codes.

`FakeNode` keeps a node's state in memory, validates configurations with the real `parse_config`
(so an invalid one fails the way it does on a node), reads real log files with the real pager
and renders real metrics; only the kernel and the other nodes are missing.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from typer.testing import CliRunner

from vipfarm.api import logs as logfiles
from vipfarm.api.app import create_app
from vipfarm.api.client import base_url, read_token
from vipfarm.api.models import (
    AbortRequest,
    Ack,
    ActionResult,
    CommitReply,
    CommitRequest,
    ConfigInfo,
    DeployRequest,
    DeployResult,
    FarmNode,
    LogName,
    LogPage,
    LogQuery,
    NodeStatus,
    NodeVerdict,
    PrepareReply,
    PrepareRequest,
    StopRequest,
)
from vipfarm.config.loading import parse_config
from vipfarm.node import deploy as dep
from vipfarm.node.control import ControlError
from vipfarm.node.metrics import Metrics, NodeFacts

TOKEN = b"unit-test-token-0123456789"


class FakeNode:
    def __init__(self, base: Path, *, closing: bool = False) -> None:
        self.base = base
        self.state = "UP"
        self.version = 0
        self.slot = dep.PreparedSlot()
        self.calls: list[str] = []
        self._closing = closing
        self._metrics = Metrics()
        for name in ("module", "app"):
            (base / f"{name}.log").write_text("".join(f"{name} line {i}\n" for i in range(30)))

    @property
    def closing(self) -> bool:
        return self._closing

    async def status(self) -> NodeStatus:
        return NodeStatus(
            farm_name="web",
            node="node1",
            state=self.state,
            share=100.0 if self.state == "UP" else 0.0,
            app="healthy",
            owned=[0, 1],
            split_brain=False,
            drops={"bad_mac": 1},
            counters={"datapath_errors": 0},
            config_version=self.version,
            config_digest="abc",
            farm=[
                FarmNode(
                    node="node1",
                    state=self.state,
                    share=100.0,
                    alive=True,
                    incarnation=1,
                    weight=100,
                    heartbeat_age_ms={},
                    config_version=self.version,
                )
            ],
        )

    async def farm_status(self) -> NodeStatus:
        return await self.status()

    async def start(self) -> ActionResult:
        if self.state != "STOP":
            raise ControlError(f"node node1 is {self.state}, not STOP: nothing to start")
        self.calls.append("start")
        self.state = "UP"
        return ActionResult(node="node1", state="STARTING")

    async def stop(self, req: StopRequest) -> ActionResult:
        if self.state == "STOP":
            raise ControlError("node node1 is already STOP")
        self.calls.append(f"stop force={req.force}")
        self.state = "STOP"
        return ActionResult(node="node1", state="DRAINING", force=req.force)

    def log_path(self, log: LogName) -> Path:
        return self.base / f"{log}.log"

    async def log_page(self, q: LogQuery) -> LogPage:
        return await asyncio.to_thread(
            logfiles.read_page, self.log_path(q.log), q.log, q.offset, q.limit
        )

    async def config_info(self) -> ConfigInfo:
        return ConfigInfo(version=self.version, digest="abc", path="/etc/farm.toml", text="")

    async def deploy(self, req: DeployRequest) -> DeployResult:
        parse_config(req.text, base_dir=self.base, source="the deployed configuration")
        raise dep.DeployError(  # a valid file is refused, so tests see that path too
            "deployment refused, nothing changed: node2 refused: busy",
            [NodeVerdict(node="node2", outcome="refused", message="busy")],
        )

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        try:
            cfg = parse_config(req.text, base_dir=self.base)
            self.slot.hold(req.deploy_id, req.origin, cfg, req.text, [])
        except Exception as e:
            raise ControlError(str(e)) from None
        return PrepareReply(node="node1", version=self.version, digest="abc", changes=[])

    async def commit(self, req: CommitRequest) -> CommitReply:
        try:
            self.slot.take(req.deploy_id)
        except dep.Refused as e:
            raise ControlError(str(e)) from None
        self.version = req.version
        return CommitReply(node="node1", version=req.version, digest="abc", changes=[])

    async def abort(self, req: AbortRequest) -> Ack:
        self.slot.drop(req.deploy_id)
        return Ack(node="node1")

    async def snapshot(self) -> bytes:
        return b"\x1f\x8b not really a tarball"

    async def metrics_text(self) -> bytes:
        return self._metrics.render(
            NodeFacts(
                state=self.state,
                app_state="healthy",
                buckets_owned=2,
                buckets=256,
                config_version=self.version,
                split_brain=False,
                hb_rejected={("lan", "bad_mac"): 1},
                flows={("tcp/198.51.100.100:80", "accepted"): 5},
            )
        )


# ------------------------------------------------------------------------------ fixtures

GOOD = {"Authorization": "Bearer " + TOKEN.decode()}


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


@pytest.fixture
def client(node: FakeNode) -> Iterator[TestClient]:
    with TestClient(create_app(node, TOKEN)) as c:
        yield c


# ------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/stop", {"force": True}),
        ("POST", "/api/v1/start", None),
        ("PUT", "/api/v1/config", {"text": ""}),
        ("POST", "/api/v1/config/commit", {"deploy_id": "abcdefgh", "version": 9}),
        ("GET", "/api/v1/state", None),
        ("GET", "/metrics", None),
    ],
)
def test_no_token_401_wrong_token_403_and_nothing_runs(
    client: TestClient, node: FakeNode, method: str, path: str, body: dict[str, object] | None
) -> None:
    node.state = "STOP"  # so that a start that got through would show
    resp = client.request(method, path, json=body)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in resp.json()["detail"]
    basic = client.request(method, path, json=body, headers={"Authorization": "Basic eDp5"})
    assert basic.status_code == 401
    wrong = client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "wrong token" in wrong.json()["detail"]
    assert node.calls == [] and node.version == 0 and node.state == "STOP"


def test_metrics_can_be_public_the_rest_cannot(node: FakeNode) -> None:
    with TestClient(create_app(node, TOKEN, metrics_public=True)) as c:
        resp = c.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'vipfarm_node_state{state="UP"} 1.0' in resp.text
        assert c.get("/api/v1/state").status_code == 401


def test_openapi_is_public_and_declares_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/api/v1/state", "/api/v1/config", "/api/v1/logs/stream", "/metrics"} <= set(
        schema["paths"]
    )
    assert client.get("/docs").status_code == 404  # it would load scripts from a CDN


# ------------------------------------------------------------------------------ answers


def test_start_stop_and_their_conflicts(client: TestClient, node: FakeNode) -> None:
    resp = client.post("/api/v1/stop", json={"force": True}, headers=GOOD)
    assert resp.json() == {"node": "node1", "state": "DRAINING", "force": True}
    again = client.post("/api/v1/stop", headers=GOOD)
    assert again.status_code == 409 and again.json()["detail"] == "node node1 is already STOP"
    assert client.post("/api/v1/start", headers=GOOD).json()["state"] == "STARTING"
    assert node.calls == ["stop force=True", "start"]


def test_invalid_configuration_is_422_with_one_problem_per_key(client: TestClient) -> None:
    resp = client.put("/api/v1/config", json={"text": "[farm]\nname = 'Bad Name'\n"}, headers=GOOD)
    assert resp.status_code == 422
    body = resp.json()
    assert body["detail"] == "the deployed configuration: invalid"
    paths = {p["path"] for p in body["problems"]}
    assert {"farm.name", "farm.key_file", "network", "node", "rule", "module"} <= paths


def test_refused_deployment_is_409_naming_the_node(client: TestClient, tmp_path: Path) -> None:
    key = tmp_path / "farm.key"
    key.write_text("k" * 40)
    key.chmod(0o600)
    example = Path(__file__).resolve().parents[2] / "src" / "vipfarm" / "examples" / "web.toml"
    text = example.read_text()
    text = text.replace('key_file = "web.key"', f'key_file = "{key}"')
    resp = client.put("/api/v1/config", json={"text": text}, headers=GOOD)
    assert resp.status_code == 409, resp.text
    assert resp.json()["nodes"] == [{"node": "node2", "outcome": "refused", "message": "busy"}]


def test_bad_request_bodies_and_queries_are_422(client: TestClient) -> None:
    bad = client.post("/api/v1/config/commit", json={"deploy_id": "x"}, headers=GOOD)
    assert bad.status_code == 422
    assert {p["path"] for p in bad.json()["problems"]} == {"body.deploy_id", "body.version"}
    assert client.get("/api/v1/logs?limit=0", headers=GOOD).status_code == 422
    assert client.get("/api/v1/logs?log=secret", headers=GOOD).status_code == 422


def test_log_pages_tail_then_page_forward(client: TestClient, node: FakeNode) -> None:
    tail = client.get("/api/v1/logs?limit=3", headers=GOOD).json()
    assert tail["lines"] == ["module line 27", "module line 28", "module line 29"]
    assert tail["next_offset"] == tail["size"]
    first = client.get("/api/v1/logs?log=app&offset=0&limit=2", headers=GOOD).json()
    assert first["lines"] == ["app line 0", "app line 1"]
    second = client.get(
        f"/api/v1/logs?log=app&offset={first['next_offset']}&limit=1", headers=GOOD
    ).json()
    assert second["lines"] == ["app line 2"]


def test_read_page_leaves_a_line_being_written_and_handles_no_file(tmp_path: Path) -> None:
    path = tmp_path / "module.log"
    path.write_bytes(b"one\ntwo\nthr")
    page = logfiles.read_page(path, "module", None, 10)
    assert page.lines == ["one", "two"] and page.next_offset == 8
    assert logfiles.read_page(path, "module", 4, 10).lines == ["two"]
    assert logfiles.read_page(tmp_path / "none.log", "module", None, 5).lines == []
    big = tmp_path / "big.log"
    big.write_text("".join(f"{i:06d}\n" for i in range(50_000)))  # several read blocks
    assert logfiles.read_page(big, "module", None, 3).lines == ["049997", "049998", "049999"]


def test_follow_yields_appended_lines_and_restarts_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "module.log"
    path.write_text("old\n")
    stop = [False]

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        gen = logfiles.follow(path, None, lambda: stop[0])
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        with path.open("a") as f:
            f.write("new 1\npartial")
        got.append(await asyncio.wait_for(task, 5))
        path.rename(tmp_path / "module.log.1")
        path.write_text("rotated\n")
        got.append(await asyncio.wait_for(gen.__anext__(), 5))
        stop[0] = True
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(gen.__anext__(), 5)
        return got

    assert asyncio.run(scenario()) == [b"new 1\n", b"rotated\n"]


def test_stream_endpoint_sends_lines_until_the_server_closes(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, closing=True)  # closing: the stream ends after what is there
    with TestClient(create_app(node, TOKEN)) as c:
        resp = c.get("/api/v1/logs/stream?log=app&offset=0", headers=GOOD)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert resp.text == ""  # closing before the first poll: nothing, and it ends


def test_metrics_render_counters_with_labels(client: TestClient) -> None:
    text = client.get("/metrics", headers=GOOD).text
    assert 'vipfarm_heartbeats_rejected_total{network="lan",reason="bad_mac"} 1.0' in text
    assert 'vipfarm_new_flows_total{rule="tcp/198.51.100.100:80",verdict="accepted"} 5.0' in text
    assert "vipfarm_buckets_owned 2.0" in text and "vipfarm_failovers_total 0.0" in text


def test_snapshot_is_gzip(client: TestClient) -> None:
    resp = client.get("/api/v1/snapshot", headers=GOOD)
    assert resp.headers["content-type"] == "application/gzip"


# ------------------------------------------------------------------------------ schemathesis

SCHEMA_DIR = Path(tempfile.mkdtemp(prefix="vipfarm-api-schema-"))
STATUSES: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(FakeNode(SCHEMA_DIR, closing=True), TOKEN),
    # The token through the schema's own security scheme: schemathesis then also checks that
    # requests without it are refused.
    config=SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN.decode()}}}}
    ),
)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_every_answer_matches_the_schema_and_none_is_5xx(case: Case[Any]) -> None:
    excluded = []
    if (case.method, case.path) == ("PUT", "/api/v1/config"):
        # Any string fits the schema, but only a valid farm file is accepted (422 otherwise):
        # TOML content is beyond what a JSON schema can say.
        excluded.append(positive_data_acceptance)
    response = case.call_and_validate(excluded_checks=excluded)
    STATUSES[(case.method, case.path)].add(response.status_code)


def test_schemathesis_got_past_the_token_to_every_operation() -> None:
    """Runs after the schema test (file order): every operation answered something besides
    401/403, so the generated requests were authenticated and reached the handlers."""
    operations = {
        (method.upper(), path) for path, ops in schema.raw_schema["paths"].items() for method in ops
    }
    assert operations <= set(STATUSES)
    stuck = {op for op in operations if STATUSES[op] <= {401, 403}}
    assert not stuck, stuck


# ------------------------------------------------------------------------------ CLI side


def test_base_url_forms() -> None:
    assert base_url("198.51.100.12") == "http://198.51.100.12:9010"
    assert base_url("198.51.100.12", tls=True) == "https://198.51.100.12:9010"
    assert base_url("node2:8443", tls=True) == "https://node2:8443"
    assert base_url("2001:db8::12") == "http://[2001:db8::12]:9010"
    assert base_url("[2001:db8::12]:9") == "http://[2001:db8::12]:9"
    assert base_url("https://node2:9010/") == "https://node2:9010"
    for bad in ("ftp://x", "a/b", "x:port", ""):
        with pytest.raises(ValueError, match="--node"):
            base_url(bad)


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    path.write_text("s3cret-token\n")
    assert read_token(path) == "s3cret-token"
    with pytest.raises(ValueError, match=r"pass --token-file FILE or set VIPFARM_TOKEN_FILE"):
        read_token(tmp_path / "missing")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not ASCII"):
        read_token(path)


def test_cli_exit_codes_for_usage_and_unreachable(tmp_path: Path) -> None:
    from vipfarm.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["--node", "a/b", "state"])
    assert bad.exit_code == 2 and "--node 'a/b'" in bad.output
    token = tmp_path / "t"
    no_token = runner.invoke(app, ["--node", "127.0.0.1:1", "--token-file", str(token), "stop"])
    assert no_token.exit_code == 2 and "cannot read the API token file" in no_token.output
    token.write_text("abcdefabcdefabcdef")
    # port 1 on loopback: nothing listens, the connection is refused at once
    down = runner.invoke(app, ["--node", "127.0.0.1:1", "--token-file", str(token), "state"])
    assert down.exit_code == 3 and "cannot reach" in down.output
