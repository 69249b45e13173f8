"""Configuration deployment without a network: versions, change classification, the prepared
slot, the per-node validation and the two-phase coordinator with fake nodes."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from vipfarm.api.models import (
    AbortRequest,
    CommitReply,
    CommitRequest,
    DeployResult,
    PrepareReply,
    PrepareRequest,
)
from vipfarm.config.loading import parse_config
from vipfarm.config.schema import FarmConfig
from vipfarm.node import deploy as dep

FARM = """
[farm]
name = "web"
key_file = "farm.key"

[[network]]
name = "lan"

[[node]]
name = "node1"
address = { lan = "198.51.100.11" }

[[node]]
name = "node2"
address = { lan = "198.51.100.12" }

[[rule]]
vip = "198.51.100.100"
ports = "80"

[module]
name = "generic"

[module.macros]
start_cmd = "sleep 1000"
"""
ME = ipaddress.ip_address("198.51.100.11")


@pytest.fixture
def farm_dir(tmp_path: Path) -> Path:
    key = tmp_path / "farm.key"
    key.write_text("k" * 40)
    key.chmod(0o600)
    return tmp_path


def load(text: str, base: Path) -> FarmConfig:
    return parse_config(text, base_dir=base)


def test_version_line_round_trip_and_digest_ignores_it() -> None:
    assert dep.split_version(FARM) == (0, FARM)
    text = dep.with_version(FARM, 7, "node1")
    assert text.startswith("# vipfarm config version 7, deployed from node1 at ")
    assert dep.split_version(text) == (7, FARM)
    assert dep.digest(dep.split_version(text)[1]) == dep.digest(FARM) != dep.digest(FARM + " ")
    # a deployed copy deployed again keeps one version line, the new one
    again = dep.with_version(dep.split_version(text)[1], 8, "node2")
    assert again.count("# vipfarm config version") == 1


def test_rules_weights_and_drain_are_live_everything_else_needs_a_restart(
    farm_dir: Path,
) -> None:
    old = load(FARM, farm_dir)
    live_text = (
        FARM.replace('ports = "80"', 'ports = "8080"').replace(
            'name = "node2"\n', 'name = "node2"\nweight = 50\n'
        )
        + '\n[drain]\ntimeout_s = 5\n[[rule]]\nvip = "198.51.100.100"\nports = "443"\n'
    )
    live, restart = dep.classify(old, load(live_text, farm_dir))
    assert restart == []
    assert "rule[0].ports" in live and "node[1].weight" in live and "drain.timeout_s" in live
    assert "rule.#" in live and "rule[1].vip" in live
    timing = load(FARM + "\n[timing]\ninterval_ms = 40\n", farm_dir)
    assert dep.classify(old, timing)[1] == ["timing.interval_ms"]
    renamed = load(FARM.replace("198.51.100.12", "198.51.100.13"), farm_dir)
    assert dep.classify(old, renamed)[1] == ["node[1].address.lan"]
    macro = load(FARM.replace("sleep 1000", "sleep 2000"), farm_dir)
    assert dep.classify(old, macro)[1] == ["module.macros.start_cmd"]


def test_the_farm_key_files_are_live_for_a_rotation(farm_dir: Path) -> None:
    nxt = farm_dir / "farm-2.key"
    nxt.write_text("n" * 40)
    nxt.chmod(0o600)
    old = load(FARM, farm_dir)
    step1 = load(
        FARM.replace(
            'key_file = "farm.key"', 'key_file = "farm.key"\nnext_key_file = "farm-2.key"'
        ),
        farm_dir,
    )
    assert dep.classify(old, step1) == (["farm.next_key_file"], [])
    assert step1.next_key() == b"n" * 40
    step2 = load(FARM.replace('key_file = "farm.key"', 'key_file = "farm-2.key"'), farm_dir)
    assert dep.classify(step1, step2) == (["farm.key_file", "farm.next_key_file"], [])
    assert step2.key() == b"n" * 40 and step2.next_key() is None


def test_validate_for_node_names_what_is_wrong(farm_dir: Path) -> None:
    running = load(FARM, farm_dir)

    def check(text: str, addrs: tuple[str, ...] = ("198.51.100.11",)) -> list[str]:
        _, changes = dep.validate_for_node(
            text,
            base_dir=farm_dir,
            node="node1",
            running=running,
            local_addresses=lambda: [ipaddress.ip_address(a) for a in addrs],
        )
        return changes

    assert check(FARM.replace('"80"', '"81"')) == ["rule[0].ports"]
    with pytest.raises(dep.Refused, match=r"rule\[0\]\.ports: bad value 70000"):
        check(FARM.replace('"80"', '"70000"'))
    with pytest.raises(dep.Refused, match=r"need a restart.*timing\.lease_ms"):
        check(FARM + "\n[timing]\nlease_ms = 100\n")
    with pytest.raises(dep.Refused, match="node node1 is not in the deployed"):
        check(FARM.replace('name = "node1"', 'name = "node9"'))
    with pytest.raises(dep.Refused, match=r"lan=198\.51\.100\.11 are not on this host"):
        check(FARM, addrs=("192.0.2.1",))


def test_prepared_slot_holds_one_deployment_until_taken_or_expired(farm_dir: Path) -> None:
    now = [100.0]
    slot = dep.PreparedSlot(clock=lambda: now[0])
    cfg = load(FARM, farm_dir)
    slot.hold("aaaa1111", "node1", cfg, FARM, [])
    assert slot.busy
    slot.hold("aaaa1111", "node1", cfg, FARM, [])  # the same deployment again is fine
    with pytest.raises(dep.Refused, match=r"another deployment \(from node1\).*retry in 30 s"):
        slot.hold("bbbb2222", "node2", cfg, FARM, [])
    with pytest.raises(dep.Refused, match="not prepared here"):
        slot.take("bbbb2222")
    assert slot.take("aaaa1111").origin == "node1" and not slot.busy
    slot.hold("cccc3333", "node1", cfg, FARM, [])
    now[0] += dep.PREPARE_TTL_S
    assert not slot.busy  # expired: a coordinator that died does not block the node forever
    slot.hold("dddd4444", "node2", cfg, FARM, [])
    slot.drop("dddd4444")
    assert not slot.busy


class FakeNode:
    def __init__(
        self,
        name: str,
        version: int = 0,
        *,
        alive: bool = True,
        refuse: str | None = None,
        down: bool = False,
        fail_commit: bool = False,
        tokens: str | None = None,
    ) -> None:
        self.name, self.version, self.alive = name, version, alive
        self.tokens = tokens
        self.refuse, self.down, self.fail_commit = refuse, down, fail_commit
        self.log: list[str] = []

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        if self.down:
            raise dep.Unreachable("connection refused")
        if self.refuse:
            raise dep.Refused(self.refuse)
        self.log.append("prepare")
        return PrepareReply(
            node=self.name, version=self.version, digest="d", changes=["rule"], tokens=self.tokens
        )

    async def commit(self, req: CommitRequest) -> CommitReply:
        if self.fail_commit:
            raise dep.Refused("the kernel refused the new rules")
        self.log.append(f"commit {req.version}")
        self.version = req.version
        return CommitReply(node=self.name, version=req.version, digest="d", changes=[])

    async def abort(self, req: AbortRequest) -> None:
        self.log.append("abort")


def run(nodes: list[FakeNode], dry_run: bool = False) -> DeployResult:
    return asyncio.run(dep.coordinate("text", "node1", nodes, dry_run=dry_run))


def test_every_node_accepts_then_every_node_commits_the_next_version() -> None:
    nodes = [FakeNode("node1", 3), FakeNode("node2", 4), FakeNode("node3", 4)]
    result = run(nodes)
    assert result.ok and result.version == 5 and result.changes == ["rule"]
    assert [v.outcome for v in result.nodes] == ["applied"] * 3
    assert all(n.log == ["prepare", "commit 5"] for n in nodes)


def test_one_refusal_aborts_the_others_and_says_who_and_why() -> None:
    nodes = [FakeNode("node1"), FakeNode("node2", refuse="another deployment"), FakeNode("node3")]
    with pytest.raises(dep.DeployError, match="node2 refused: another deployment") as e:
        run(nodes)
    assert {v.node: v.outcome for v in e.value.nodes} == {
        "node1": "accepted",
        "node2": "refused",
        "node3": "accepted",
    }
    assert nodes[0].log == nodes[2].log == ["prepare", "abort"]
    assert nodes[1].log == []


def test_a_down_node_is_skipped_but_an_unreachable_live_one_blocks() -> None:
    nodes = [FakeNode("node1"), FakeNode("node2", alive=False, down=True)]
    result = run(nodes)
    assert result.ok and [v.outcome for v in result.nodes] == ["applied", "skipped"]
    assert "rejoins" in result.nodes[1].message
    nodes = [FakeNode("node1"), FakeNode("node2", alive=True, down=True)]
    with pytest.raises(dep.DeployError, match="node2 unreachable: connection refused"):
        run(nodes)
    assert nodes[0].log == ["prepare", "abort"]


def test_dry_run_prepares_everywhere_and_commits_nowhere() -> None:
    nodes = [FakeNode("node1", 2), FakeNode("node2", 2)]
    result = run(nodes, dry_run=True)
    assert result.ok and result.dry_run and result.version == 3
    assert all(n.log == ["prepare", "abort"] and n.version == 2 for n in nodes)


def test_a_failed_commit_is_reported_not_hidden() -> None:
    nodes = [FakeNode("node1"), FakeNode("node2", fail_commit=True)]
    result = run(nodes)
    assert not result.ok
    assert [(v.outcome, v.message) for v in result.nodes] == [
        ("applied", ""),
        ("failed", "the kernel refused the new rules"),
    ]


def test_token_files_that_differ_between_nodes_are_refused_before_any_commit() -> None:
    nodes = [FakeNode("node1", tokens="aa"), FakeNode("node2", tokens="bb"), FakeNode("node3")]
    nodes.append(FakeNode("node4", tokens="aa"))
    with pytest.raises(dep.DeployError, match=r"token files .* differ between nodes") as e:
        run(nodes)
    outcome = {v.node: v.outcome for v in e.value.nodes}
    # node2 is the odd one out; node3 (an older node, no fingerprint) is not compared
    assert outcome == {
        "node1": "accepted",
        "node2": "refused",
        "node3": "accepted",
        "node4": "accepted",
    }
    assert "node1, node4" in str(e.value) and "copy the same files" in str(e.value)
    assert all(n.log == ["prepare", "abort"] for n in nodes)
    same = [FakeNode("node1", tokens="aa"), FakeNode("node2", tokens="aa"), FakeNode("node3")]
    assert run(same).ok


API = '\n[api]\ntoken_file = "api.token"\n'


def test_the_api_tokens_and_limits_are_live_where_it_listens_is_not(farm_dir: Path) -> None:
    for name in ("api.token", "api.next"):
        (farm_dir / name).write_text(name * 8)
        (farm_dir / name).chmod(0o600)
    old = load(FARM + API, farm_dir)
    step1 = load(FARM + API + 'next_token_file = "api.next"\nmax_connections = 64\n', farm_dir)
    live, restart = dep.classify(old, step1)
    assert restart == [] and live == ["api.max_connections", "api.next_token_file"]
    step2 = load(FARM + API.replace("api.token", "api.next") + "header_timeout_s = 2\n", farm_dir)
    live, restart = dep.classify(step1, step2)
    assert restart == []
    assert live == [
        "api.header_timeout_s",
        "api.max_connections",
        "api.next_token_file",
        "api.token_file",
    ]
    moved = load(FARM + API + "port = 9011\n", farm_dir)
    assert dep.classify(old, moved)[1] == ["api.port"]
    assert dep.classify(load(FARM, farm_dir), old)[1] != []  # adding the API: a restart
