"""The request guard (`vipfarm.api.guard`) in front of the node app: refusals decided from the
request head alone (401/403 and 413 without the body ever being read, a node API version this
node cannot speak), token rotation on both sides (the app accepts the next token too; the peer
client tries it first and falls back), the log stream cap, and what the API counts."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.unit.test_api_app import GOOD, TOKEN, FakeNode
from tests.unit.test_api_server import LOOPBACK, free_port
from vipfarm.api.app import create_app
from vipfarm.api.client import PeerClient
from vipfarm.api.guard import (
    API_VERSION,
    VERSION_HEADER,
    Counters,
    Limits,
    Tokens,
    version_problem,
)
from vipfarm.api.models import NodeStatus
from vipfarm.api.server import ApiServer
from vipfarm.node import deploy as dep

NEXT = b"the-next-token-0123456789"


def asgi_call(
    app: Any, method: str, path: str, headers: dict[str, str], body_chunks: int = 0
) -> tuple[int, dict[str, str], bytes, int]:
    """One request straight through the ASGI app with a body that fails the test if read.

    Returns (status, headers, body, chunks of the request body the app asked for)."""
    asked = 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if body_chunks:
            pytest.fail(f"the app read the request body of {method} {path}")
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("192.0.2.9", 40000),
        "server": ("192.0.2.1", 9010),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], hdrs, body, asked


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


def test_401_403_and_413_are_decided_before_a_byte_of_the_body_is_read(node: FakeNode) -> None:
    counters = Counters()
    app = create_app(node, TOKEN, counters=counters, limits=Limits(max_body_bytes=1 << 20))
    big = {"Content-Length": str(128 << 20), "Content-Type": "application/json"}
    status, headers, body, asked = asgi_call(app, "PUT", "/api/v1/config", big, body_chunks=1)
    assert (status, asked) == (401, 0)
    assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert "Authorization: Bearer" in json.loads(body)["detail"]
    wrong = {**big, "Authorization": "Bearer not-it"}
    status, _, body, asked = asgi_call(app, "PUT", "/api/v1/config", wrong, body_chunks=1)
    assert (status, asked) == (403, 0)
    good = {**big, **GOOD}
    status, headers, body, asked = asgi_call(app, "PUT", "/api/v1/config", good, body_chunks=1)
    assert (status, asked) == (413, 0) and headers["connection"] == "close"
    assert "over 1048576 bytes (api.max_body_bytes)" in json.loads(body)["detail"]
    assert counters.refused == {"no_token": 1, "wrong_token": 1, "body_too_large": 1}
    assert node.calls == [] and node.version == 0


def test_an_answer_before_the_body_was_read_closes_the_connection(node: FakeNode) -> None:
    app = create_app(node, TOKEN)
    body = {"Content-Length": "100000"}
    status, headers, _, asked = asgi_call(app, "POST", "/not-here", body, body_chunks=1)
    assert (status, asked, headers["connection"]) == (404, 0, "close")
    status, headers, _, _ = asgi_call(app, "GET", "/openapi.json", {})
    assert status == 200 and "connection" not in headers  # no body: keep-alive as usual


def test_a_chunked_body_over_the_limit_is_413_as_soon_as_it_passes(node: FakeNode) -> None:
    counters = Counters()
    with TestClient(
        create_app(node, TOKEN, counters=counters, limits=Limits(max_body_bytes=64 * 1024))
    ) as c:

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 16 * 1024

        resp = c.put("/api/v1/config", content=chunks(), headers=GOOD)
        assert resp.status_code == 413, resp.text
        assert "api.max_body_bytes" in resp.json()["detail"]
    assert counters.refused == {"body_too_large": 1}


def test_the_next_token_of_a_rotation_is_accepted_too_and_live(node: FakeNode) -> None:
    tokens = Tokens(TOKEN)
    with TestClient(create_app(node, tokens)) as c:
        nxt = {"Authorization": "Bearer " + NEXT.decode()}
        assert c.get("/api/v1/state", headers=nxt).status_code == 403
        tokens.set(TOKEN, NEXT)  # the rotation's first deployment
        assert c.get("/api/v1/state", headers=nxt).status_code == 200
        assert c.get("/api/v1/state", headers=GOOD).status_code == 200
        tokens.set(NEXT, None)  # the second: the old token is retired
        assert c.get("/api/v1/state", headers=nxt).status_code == 200
        assert c.get("/api/v1/state", headers=GOOD).status_code == 403


def test_a_version_this_node_cannot_speak_is_refused_naming_both_and_the_fix(
    node: FakeNode,
) -> None:
    counters = Counters()
    with TestClient(create_app(node, TOKEN, counters=counters, node="node node1")) as c:
        # Today's nodes send no header: version 1, served; so is the current version.
        old = c.get("/api/v1/state", headers=GOOD)
        assert old.status_code == 200 and old.headers[VERSION_HEADER] == str(API_VERSION)
        now = c.get("/api/v1/state", headers={**GOOD, VERSION_HEADER: str(API_VERSION)})
        assert now.status_code == 200
        newer = c.post(
            "/api/v1/config/abort",
            json={"deploy_id": "abcdefgh"},
            headers={**GOOD, VERSION_HEADER: str(API_VERSION + 1)},
        )
        assert newer.status_code == 400
        detail = newer.json()["detail"]
        assert f"version {API_VERSION + 1}" in detail and f"1 to {API_VERSION}" in detail
        assert "upgrade vipfarm on node node1" in detail
        bad = c.get("/api/v1/state", headers={**GOOD, VERSION_HEADER: "two"})
        assert bad.status_code == 400 and "bad value 'two'" in bad.json()["detail"]
        # The version says nothing to a caller without the token.
        anon = c.get("/api/v1/state", headers={VERSION_HEADER: "99"})
        assert anon.status_code == 401
    assert counters.refused == {"bad_version": 2, "no_token": 1}
    assert "upgrade vipfarm on the calling node" in (version_problem("0") or "")


def test_log_streams_over_the_cap_get_503_and_give_their_slot_back(tmp_path: Path) -> None:
    counters = Counters()
    limits = Limits(max_log_streams=1)

    async def scenario() -> None:
        node = FakeNode(tmp_path)
        server = ApiServer(
            create_app(node, TOKEN, counters=counters, limits=limits),
            LOOPBACK,
            free_port(),
            counters=counters,
            limits=limits,
        )
        await server.start()
        try:
            async with httpx_client() as client:
                url = server.url + "/api/v1/logs/stream"
                async with client.stream("GET", url, headers=GOOD) as first:
                    assert first.status_code == 200
                    assert counters.log_streams == 1
                    second = await client.get(url, headers=GOOD)
                    assert second.status_code == 503
                    assert "api.max_log_streams = 1" in second.json()["detail"]
                for _ in range(100):  # the server notices the first one went away
                    if counters.log_streams == 0:
                        break
                    await asyncio.sleep(0.05)
                assert counters.log_streams == 0
                async with client.stream("GET", url, headers=GOOD) as again:
                    assert again.status_code == 200
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert counters.refused == {"max_log_streams": 1}


def httpx_client() -> Any:
    import httpx

    return httpx.AsyncClient(timeout=5)


def test_peer_client_tries_the_next_token_first_and_falls_back_once(tmp_path: Path) -> None:
    """The peer side of a rotation: whatever order the nodes apply the deployments in, a
    node that sends [next, current] is let in by a peer accepting either."""
    counters = Counters()
    tokens = Tokens(TOKEN)  # the peer has not applied the rotation's first step yet

    async def scenario() -> None:
        port = free_port()
        server = ApiServer(
            create_app(FakeNode(tmp_path), tokens, counters=counters), LOOPBACK, port
        )
        await server.start()
        client = PeerClient([NEXT.decode(), TOKEN.decode()], port=port, tls=False)
        try:
            for _ in range(3):
                st = await client.call("GET", LOOPBACK, "/state", NodeStatus)
                assert st.node == "node1"
            assert counters.refused == {"wrong_token": 1}  # the next token once, then remembered
            tokens.set(NEXT, None)  # the peer applied the second step: only the new token
            await client.call("GET", LOOPBACK, "/state", NodeStatus)
            assert counters.refused == {"wrong_token": 2}
            stale = PeerClient(TOKEN.decode(), port=port, tls=False)
            try:
                with pytest.raises(dep.Refused, match=r"refused our token \(HTTP 403\)"):
                    await stale.call("GET", LOOPBACK, "/state", NodeStatus)
            finally:
                await stale.aclose()
        finally:
            await client.aclose()
            await server.stop()

    asyncio.run(scenario())


def test_api_refusals_are_in_the_metrics(node: FakeNode) -> None:
    from vipfarm.node.metrics import Metrics, NodeFacts

    text = (
        Metrics()
        .render(
            NodeFacts(
                state="UP",
                app_state="healthy",
                buckets_owned=1,
                buckets=256,
                config_version=0,
                split_brain=False,
                api_refused={"no_token": 3, "header_timeout": 2},
                api_connections=7,
                api_log_streams=1,
            )
        )
        .decode()
    )
    assert 'vipfarm_api_refused_total{reason="no_token"} 3.0' in text
    assert 'vipfarm_api_refused_total{reason="header_timeout"} 2.0' in text
    assert "vipfarm_api_connections 7.0" in text and "vipfarm_api_log_streams 1.0" in text


def test_peers_are_recognised_by_address_v4_mapped_too() -> None:
    from vipfarm.api.server import ConnectionGuard

    guard = ConnectionGuard(Limits(), Counters(), peers=[ipaddress.ip_address("198.51.100.12")])
    assert guard.pool_of(("198.51.100.12", 5000)) == "peer"
    assert guard.pool_of(("::ffff:198.51.100.12", 5000, 0, 0)) == "peer"
    assert guard.pool_of(("198.51.100.99", 5000)) == "other"
    assert guard.pool_of(None) == "other"
