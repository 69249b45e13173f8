"""Property tests: whatever a farm file holds, loading it ends in a config or a ConfigError whose
problems name a key, `vipfarm config check` exits 0 or 2 without a traceback, and the API
answers 422 (never 500).

Inputs are generated two ways: random TOML documents (random tables of real and made-up keys
holding random values: huge integers, NaN, control characters, nesting) and mutations of a
valid farm file, both as data (a value replaced, a key dropped or added) and as text (spans
inserted or deleted, dangerous snippets spliced in). Hypothesis runs derandomized with no
example database, so every run tries the same inputs: it cannot flake, and a failure
reproduces.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.unit.test_api_app import TOKEN, FakeNode
from vipfarm.api.app import create_app
from vipfarm.cli import app as cli_app
from vipfarm.config.loading import parse_config
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import FarmConfig
from vipfarm.node import deploy as dep

REPO = Path(__file__).resolve().parents[2]

FUZZ = settings(
    max_examples=80,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

BASE = textwrap.dedent(
    """
    [farm]
    name = "web"
    key_file = "farm.key"
    buckets = 64

    [timing]
    interval_ms = 100
    dead_after_ms = 500
    lease_ms = 300

    [[network]]
    name = "lan"

    [[node]]
    name = "node1"
    address = { lan = "198.51.100.11" }

    [[node]]
    name = "node2"
    weight = 50
    address = { lan = "198.51.100.12" }

    [[rule]]
    vip = "198.51.100.100"
    ports = "80"

    [[rule]]
    vip = "2001:db8::100"
    proto = "udp"
    ports = "5000-5100"
    affinity = "client-subnet"
    prefix = 48

    [module]
    name = "testmod"
    start_timeout_s = 5.5

    [module.macros]
    port = "9090"

    [[module.checker]]
    type = "tcp"
    port = "${port}"

    [[module.checker]]
    type = "http"
    url = "http://127.0.0.1:${port}/"

    [module.restart]
    max = 2

    [drain]
    timeout_s = 3

    [api]
    token_file = "api.token"
    metrics_public = true
    """
)

MODULE_TOML = """
start = ["start", "${port}"]
stop = "stop"
[macros]
port = "8080"
"""

KEYS = sorted(
    {
        *("farm", "name", "key_file", "buckets", "seed", "timing", "interval_ms", "lease_ms"),
        *("dead_after_ms", "network", "port", "node", "weight", "interface", "address", "lan"),
        *("rule", "vip", "proto", "ports", "affinity", "prefix", "module", "path", "macros"),
        *("start", "stop", "force_stop", "checker", "type", "host", "url", "argv", "pidfile"),
        *("process", "rise", "fall", "restart", "max", "within_s", "drain", "timeout_s", "api"),
        *("token_file", "cert_file", "ca_file", "metrics_public", "description"),
    }
)

SNIPPETS = [
    "nan",
    "-inf",
    "1e400",
    "9" * 30,
    "9" * 5000,
    "-0",
    "0x7fffffffffffffff",
    "true",
    '""',
    '"\\u0000"',
    '"\\ud800"',
    '"${vip}"',
    '"${nope}"',
    '"$$"',
    '"/dev/zero"',
    '"/"',
    '"."',
    '"farm.key\\u0000x"',
    "[" * 40 + "]" * 40,
    "{a = {b = {c = 1}}}",
    "a." * 50 + "b = 1",
    "1979-05-27T07:32:00Z",
    "[]",
    "{}",
    "'''",
    '"""',
    "\n[[rule]]\n",
    "\n[module]\n",
    "\x00",
    "\u202e",
    "é",
]


@pytest.fixture(scope="module")
def farm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    for name, size in (("farm.key", 32), ("api.token", 24)):
        (d / name).write_text(os.urandom(size).hex() + "\n")
        (d / name).chmod(0o600)
    mod = d / "modules" / "testmod"
    mod.mkdir(parents=True)
    (mod / "module.toml").write_text(MODULE_TOML)
    for script in ("start", "stop"):
        (mod / script).write_text("#!/bin/sh\nexit 0\n")
        (mod / script).chmod(0o755)
    return d


def assert_config_or_problems(farm_dir: Path, text: str) -> None:
    try:
        cfg = parse_config(text, base_dir=farm_dir, source="fuzz.toml", module_path=[])
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            # Every problem says where: a key path, a line, or the file as a whole.
            assert p.path, p
            assert "internal error" not in p.message, p
        # Safe to print and to send as JSON (no lone surrogates, no control characters).
        json.dumps([str(p) for p in exc.problems], ensure_ascii=False).encode()
        str(exc).encode()
        assert "\n" not in "".join(str(p) for p in exc.problems)
    else:
        assert isinstance(cfg, FarmConfig)


def test_the_base_file_is_valid(farm_dir: Path) -> None:
    cfg = parse_config(BASE, base_dir=farm_dir, module_path=[])
    assert len(cfg.nodes) == 2 and cfg.api is not None


# ------------------------------------------------------------------------------ a TOML writer


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON escapes are TOML escapes (a lone surrogate is not TOML)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def toml_doc(data: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items())


# ------------------------------------------------------------------------------ strategies

keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
scalars = st.one_of(
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**100, 0, -1, 65536, 4097]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["198.51.100.11", "2001:db8::1", "80", "1-2", "tcp", "${vip}", "lan"]),
    st.booleans(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=8)


def _paths(v: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*at, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*at, i))


@st.composite
def mutated_data(draw: st.DrawFn) -> dict[str, Any]:
    """The base file as data with a few values replaced, keys dropped or keys added."""
    data: dict[str, Any] = tomllib.loads(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[last] = draw(values)
        elif action == "drop" and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return data


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """The base file as text with values replaced by dangerous snippets, spans deleted or
    replaced, and snippets spliced in anywhere."""
    lines = BASE.splitlines(keepends=True)
    for _ in range(draw(st.integers(0, 3))):
        assignments = [i for i, line in enumerate(lines) if " = " in line]
        i = draw(st.sampled_from(assignments))
        key = lines[i].split(" = ", 1)[0]
        lines[i] = f"{key} = {draw(st.sampled_from(SNIPPETS))}\n"
    text = "".join(lines)
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        new = draw(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=10), st.just("")))
        text = text[:i] + new + text[j:]
    return text


# ------------------------------------------------------------------------------ properties


@settings(FUZZ, max_examples=60)
@given(doc=documents)
def test_random_documents_give_a_config_or_problems(farm_dir: Path, doc: dict[str, Any]) -> None:
    assert_config_or_problems(farm_dir, toml_doc(doc))


@settings(FUZZ, max_examples=60)
@given(data=mutated_data())
def test_mutated_data_gives_a_config_or_problems(farm_dir: Path, data: dict[str, Any]) -> None:
    assert_config_or_problems(farm_dir, toml_doc(data))


@FUZZ
@given(text=mutated_text())
def test_mutated_text_gives_a_config_or_problems(farm_dir: Path, text: str) -> None:
    assert_config_or_problems(farm_dir, text)


@settings(FUZZ, max_examples=25)
@given(text=st.one_of(mutated_text(), mutated_data().map(toml_doc), documents.map(toml_doc)))
def test_config_check_exits_0_or_2_without_a_traceback(farm_dir: Path, text: str) -> None:
    path = farm_dir / "check.toml"
    path.write_text(text, errors="surrogatepass")
    res = CliRunner().invoke(cli_app, ["config", "check", str(path)])
    assert res.exit_code in (0, 2), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output


@pytest.fixture(scope="module")
def api(farm_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(FakeNode(farm_dir), TOKEN)) as client:
        yield client


@settings(FUZZ, max_examples=25)
@given(text=st.one_of(mutated_text(), mutated_data().map(toml_doc), documents.map(toml_doc)))
def test_the_api_answers_invalid_files_with_422(api: TestClient, text: str) -> None:
    resp = api.put(
        "/api/v1/config", json={"text": text}, headers={"Authorization": "Bearer " + TOKEN.decode()}
    )
    # The fake refuses every valid file with 409 (see FakeNode.deploy); an invalid one is 422.
    assert resp.status_code in (409, 422), resp.text
    if resp.status_code == 422:
        assert resp.json()["problems"]


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "9" * 5000,
        "a = " + "[" * 100_000,
        "a." * 100_000 + "b = 1",
        '[farm]\nname = "w\udcffb"\n"\ud800" = 1\n',
        "\x00\x01\x02",
        "[farm]\nbuckets = nan\nseed = inf\n",
    ],
)
def test_the_api_answers_what_crashed_the_loader_with_422(api: TestClient, text: str) -> None:
    # JSON escapes lone surrogates (\\udcff): a client may send what UTF-8 cannot encode.
    headers = {"Authorization": "Bearer " + TOKEN.decode(), "Content-Type": "application/json"}
    resp = api.put("/api/v1/config", content=json.dumps({"text": text}), headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["problems"]


@settings(FUZZ, max_examples=25)
@given(text=st.one_of(mutated_text(), mutated_data().map(toml_doc)))
def test_a_participant_refuses_invalid_files_with_reasons(farm_dir: Path, text: str) -> None:
    """The prepare path of a deployment (each node's `validate_for_node`): a verdict, either
    accepted or Refused naming the problems, never another exception (the API's 409)."""
    running = parse_config(BASE, base_dir=farm_dir, module_path=[])
    here = [a for n in running.nodes for a in n.address.values()]
    try:
        dep.validate_for_node(
            text, base_dir=farm_dir, node="node1", running=running, local_addresses=lambda: here
        )
    except dep.Refused as exc:
        assert str(exc)
