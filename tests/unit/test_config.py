"""Farm configuration: loading, every kind of error message, macros, find_self, the CLI."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from vipfarm.cli import config as config_cli
from vipfarm.config.loading import load_config, parse_config
from vipfarm.config.modules import substitute
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import TIMING_PROFILES, FarmConfig
from vipfarm.datapath.spec import Affinity
from vipfarm.supervisor.spec import CHECKER_TYPES, CommandCheck, HttpCheck, TcpCheck

REPO = Path(__file__).resolve().parents[2]

MODULE_TOML = """
description = "test module"
start = ["start", "${greeting}"]
stop = "stop --now"
stop_timeout_s = 7

[macros]
greeting = "hello"
port = "8080"

[[checker]]
type = "tcp"
port = "${port}"

[restart]
max = 5
within_s = 100
"""

GOOD = """
[farm]
name = "web"
key_file = "farm.key"

[[network]]
name = "lan"

[[network]]
name = "hb2"
port = 9002

[[node]]
name = "node1"
address = { lan = "198.51.100.11", hb2 = "192.0.2.11" }

[[node]]
name = "node2"
weight = 50
interface = "ens3"
notrack_other = true
prefilter = false
address = { lan = "198.51.100.12", hb2 = "192.0.2.12" }

[[rule]]
vip = "198.51.100.100"
ports = "80"

[[rule]]
vip = "198.51.100.100"
proto = "udp"
ports = "5000-5100"
affinity = "client-subnet"
prefix = 16

[module]
name = "testmod"

[module.macros]
port = "9090"
"""


@pytest.fixture
def farm_dir(tmp_path: Path) -> Path:
    key = tmp_path / "farm.key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    mod = tmp_path / "modules" / "testmod"
    mod.mkdir(parents=True)
    (mod / "module.toml").write_text(MODULE_TOML)
    for script in ("start", "stop"):
        (mod / script).write_text("#!/bin/sh\nexit 0\n")
        (mod / script).chmod(0o755)
    return tmp_path


def parse(farm_dir: Path, text: str) -> FarmConfig:
    return parse_config(textwrap.dedent(text), base_dir=farm_dir, module_path=[])


def problems(farm_dir: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(farm_dir, text)
    return [str(p) for p in exc.value.problems]


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --------------------------------------------------------------------------------------------
# A good file


def test_good_file(farm_dir: Path) -> None:
    cfg = parse(farm_dir, GOOD)
    assert [n.name for n in cfg.nodes] == ["node1", "node2"]
    assert cfg.timing.profile == "default"
    assert (cfg.timing.interval_ms, cfg.timing.lease_ms, cfg.timing.dead_after_ms) == (50, 150, 200)
    assert cfg.networks[0].port == 9001 and cfg.networks[1].port == 9002
    assert cfg.farm.key_file == farm_dir / "farm.key"
    assert len(cfg.key()) == 64  # the trailing newline is not part of the key
    assert cfg.drain.timeout_s == 30

    spec = cfg.datapath_spec("node2")
    assert spec.farm == "web" and spec.interface == "ens3" and spec.lease_s == 0.15
    assert spec.buckets == 256
    assert spec.notrack_other and not cfg.datapath_spec("node1").notrack_other
    assert not spec.prefilter and cfg.datapath_spec("node1").prefilter
    udp = spec.rules[1]
    assert (udp.port, udp.port_end, udp.affinity, udp.prefix4) == (
        5000,
        5100,
        Affinity.CLIENT_SUBNET,
        16,
    )


def test_module_defaults_merge_and_macros(farm_dir: Path) -> None:
    cfg = parse(farm_dir, GOOD)
    app = cfg.app_spec("node1")
    mod = farm_dir / "modules" / "testmod"
    assert app.module == "testmod" and app.directory == mod.resolve()
    assert app.start == [str(mod.resolve() / "start"), "hello"]  # relative script: module dir
    assert app.stop == [str(mod.resolve() / "stop"), "--now"]  # a string is split like sh
    assert app.stop_timeout_s == 7 and app.restart.max == 5  # from module.toml
    (checker,) = app.checkers
    assert isinstance(checker, TcpCheck) and checker.port == 9090  # farm macro wins
    assert app.env["VIPFARM_M_PORT"] == "9090" and app.env["VIPFARM_M_GREETING"] == "hello"
    assert app.env["VIPFARM_NODE"] == "node1" and app.env["VIPFARM_FARM"] == "web"
    assert app.env["VIPFARM_VIPS"] == "198.51.100.100"
    assert app.env["VIPFARM_MODULE_DIR"] == str(mod.resolve())


def test_builtin_macros_differ_per_node_and_checkers_replace(farm_dir: Path) -> None:
    text = GOOD + textwrap.dedent(
        """
        greeting = "I am ${node} of ${farm} on $${vip} ${vip}"
        [[module.checker]]
        type = "command"
        argv = "check ${node} ${module_dir}"
        [[module.checker]]
        type = "http"
        url = "http://127.0.0.1:${port}/${node}"
        expect_body = "${greeting}"
        """
    )
    cfg = parse(farm_dir, text)
    for node in ("node1", "node2"):
        app = cfg.app_spec(node)
        assert app.start[1] == f"I am {node} of web on ${{vip}} 198.51.100.100"
        cmd, http = app.checkers  # the farm's list replaced the module's tcp checker
        assert isinstance(cmd, CommandCheck) and isinstance(http, HttpCheck)
        assert cmd.argv == ["check", node, str(app.directory)]
        assert http.url == f"http://127.0.0.1:9090/{node}"
        assert http.expect_body == app.start[1]


def test_substitute() -> None:
    assert substitute("a${x}b$$c$d", {"x": "1"}) == "a1b$c$d"
    with pytest.raises(Exception, match="y"):
        substitute("${y}", {})


def test_example_and_shipped_modules_load(tmp_path: Path) -> None:
    shutil.copy(REPO / "src" / "vipfarm" / "examples" / "web.toml", tmp_path)
    key = tmp_path / "web.key"
    key.write_bytes(os.urandom(16).hex().encode())
    key.chmod(0o600)
    cfg = load_config(tmp_path / "web.toml")
    assert cfg.app_spec("node3").module == "nginx"
    assert cfg.nodes[2].weight == 50

    base = (tmp_path / "web.toml").read_text()
    for module in ("generic", "nginx", "apache"):
        text = re.sub(r'name = "nginx"', f'name = "{module}"', base)
        if module == "generic":
            text = text.replace('port = "80"', 'start_cmd = "myapp --port 80"')
        app = parse_config(text, base_dir=tmp_path).app_spec("node1")
        assert app.directory == REPO / "src" / "vipfarm" / "modules" / module
        for argv in (app.start, app.stop, app.force_stop or app.stop):
            assert os.access(argv[0], os.X_OK), argv
        assert app.checkers
        assert (REPO / "src" / "vipfarm" / "modules" / module / "README.md").is_file()


def test_find_self(farm_dir: Path) -> None:
    cfg = parse(farm_dir, GOOD)
    ip = ipaddress.ip_address
    assert cfg.find_self("node2").name == "node2"
    assert cfg.find_self(local_addresses=[ip("127.0.0.1"), ip("192.0.2.12")]).name == "node2"
    with pytest.raises(ConfigError, match="node 'node9' is not in farm: expected one of node1"):
        cfg.find_self("node9")
    with pytest.raises(ConfigError, match=r"no node of farm web .*--node NAME"):
        cfg.find_self(local_addresses=[ip("127.0.0.1")])
    with pytest.raises(ConfigError, match=r"several nodes .*node1, node2"):
        cfg.find_self(local_addresses=[ip("198.51.100.11"), ip("198.51.100.12")])


# --------------------------------------------------------------------------------------------
# Errors: each names its key path, the bad value and what is expected

BAD = [
    ('name = "web"', 'name = "Web!"', "farm.name: bad value 'Web!': expected 1 to 16 characters"),
    ("[farm]", "[farm]\nbuckets = 0", "farm.buckets: bad value 0: expected greater than or equal"),
    ("[farm]", "[farm]\nbuckets = 5000", "farm.buckets: bad value 5000: expected less than"),
    ("weight = 50", "weight = 70000", "node[1].weight: bad value 70000: expected less than"),
    ("weight = 50", 'weight = "heavy"', "node[1].weight: bad value 'heavy': expected a valid int"),
    ('"198.51.100.12"', '"198.51.100.300"', "node[1].address.lan: bad value '198.51.100.300'"),
    ('ports = "80"', 'ports = "http"', "rule[0].ports: bad value 'http': expected a port like"),
    ('ports = "80"', 'ports = "70000"', "rule[0].ports: bad value 70000: expected less than"),
    ('ports = "80"', 'ports = "90-80"', "rule[0].ports: port range 90-80 is reversed"),
    ('ports = "80"', "ports = 0", "rule[0].ports: bad value 0: expected greater than"),
    ('proto = "udp"', 'proto = "sctp"', "rule[1].proto: bad value 'sctp': expected 'tcp' or 'udp'"),
    ("prefix = 16", "prefix = 40", "rule[1].prefix: bad value 40: expected less than or equal"),
    ('"client-subnet"', '"client-ip"', "rule[1].prefix: bad value 16: expected no prefix unless"),
    ('"client-subnet"', '"sticky"', "rule[1].affinity: bad value 'sticky': expected 'client-ip'"),
    ("port = 9002", "port = 99999", "network[1].port: bad value 99999: expected less than"),
    ('name = "hb2"', 'name = "lan"', "network[1].name: bad value 'lan': expected a unique"),
    ('name = "node2"', 'name = "node1"', "node[1].name: bad value 'node1': expected a unique"),
    ('interface = "ens3"', 'interface = ""', "node[1].interface: "),
    (
        '"ens3"',
        '"a-very-long-ifname"',
        "node[1].interface: bad value 'a-very-long-ifname': expected a string with at most 15",
    ),
    ('name = "testmod"', 'name = "nosuch"', "module.name: bad value 'nosuch': expected a module"),
    ("[module.macros]", "[module.restart]\nmax = -1\n[module.macros]", "module.restart.max: bad"),
    ('port = "9090"', 'port = "x"', "module.checker[0].port: bad value 'x': expected a valid int"),
    ('"testmod"', '"testmod"\nstop = "stop ${nope}"', "module.stop[1]: unknown macro ${nope}"),
    ('port = "9090"', 'vip = "x"', "module.macros.vip: bad value 'x': expected a macro name other"),
    ('port = "9090"', 'p = "${p2}"', "module.macros.p: bad value '${p2}': expected macro values"),
    (
        "[module.macros]",
        "stop_timeout_s = 0\n[module.macros]",
        "module.stop_timeout_s: bad value 0",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), BAD, ids=[b[2].split(":")[0] for b in BAD])
def test_bad_value_names_key_value_and_expectation(
    farm_dir: Path, old: str, new: str, expected: str
) -> None:
    found = problems(farm_dir, edit(old, new))
    assert any(p.startswith(expected) for p in found), found


def test_unknown_key_suggests_the_right_one(farm_dir: Path) -> None:
    (p,) = problems(farm_dir, edit('key_file = "farm.key"', 'key_file = "farm.key"\nbukets = 8'))
    assert p == (
        "farm.bukets: unknown key (did you mean 'buckets'?): "
        "expected one of name, key_file, next_key_file, buckets, seed, delivery"
    )
    (p,) = problems(farm_dir, edit("[[node]]", "[nodes]\n[[node]]"))
    assert p.startswith("nodes: unknown key (did you mean 'node'?): expected one of farm")
    text = GOOD + '[[module.checker]]\ntype = "tcp"\nport = 1\nhots = "x"\n'
    (p,) = problems(farm_dir, text)
    assert p.startswith("module.checker[0].hots: unknown key (did you mean 'host'?)")
    (p,) = problems(farm_dir, GOOD + '[[module.checker]]\ntype = "smtp"\n')
    assert p == "module.checker[0].type: bad value 'smtp': expected one of " + ", ".join(
        CHECKER_TYPES
    )


def test_missing_keys(farm_dir: Path) -> None:
    found = problems(farm_dir, edit('ports = "80"', ""))
    assert found == ["rule[0].ports: required key is missing"]
    found = problems(farm_dir, GOOD.replace("[[rule]]", "[[xrule]]").replace("xrule", "junk", 1))
    assert any(p.startswith("junk: unknown key") for p in found)
    found = problems(farm_dir, GOOD + '[[module.checker]]\ntype = "process"\n')
    assert found == ["module.checker[0]: exactly one of 'process' or 'pidfile'"]


def test_overlapping_rules(farm_dir: Path) -> None:
    text = GOOD.replace(
        "[module]",
        '[[rule]]\nvip = "198.51.100.100"\nproto = "udp"\nports = "5050"\n\n[module]',
    )
    (p,) = problems(farm_dir, text)
    assert p.startswith("rule: rules overlap: 198.51.100.100 udp 5050 and 5000-5100")


def test_lease_must_be_shorter_than_dead_after_and_longer_than_interval(farm_dir: Path) -> None:
    found = problems(farm_dir, edit("[[network]]", "[timing]\nlease_ms = 200\n\n[[network]]"))
    assert found == [
        "timing.lease_ms: bad value 200: expected less than dead_after_ms (200): "
        "lower lease_ms or raise dead_after_ms"
    ]
    found = problems(farm_dir, edit("[[network]]", "[timing]\ninterval_ms = 150\n[[network]]"))
    assert found == [
        "timing.interval_ms: bad value 150: expected less than lease_ms (150): "
        "lower interval_ms or raise lease_ms"
    ]
    # A profile's timers are checked the same way against the ones set explicitly.
    found = problems(
        farm_dir, edit("[[network]]", '[timing]\nprofile = "fast"\nlease_ms = 300\n[[network]]')
    )
    assert found == [
        "timing.lease_ms: bad value 300: expected less than dead_after_ms (100): "
        "lower lease_ms or raise dead_after_ms"
    ]


def test_timing_profiles(farm_dir: Path) -> None:
    for profile, timers in TIMING_PROFILES.items():
        text = edit("[[network]]", f'[timing]\nprofile = "{profile}"\n\n[[network]]')
        t = parse(farm_dir, text).timing
        assert (t.interval_ms, t.lease_ms, t.dead_after_ms) == timers
        assert t.interval_ms < t.lease_ms < t.dead_after_ms
    # An explicit timer overrides the profile's.
    text = edit("[[network]]", '[timing]\nprofile = "wan"\ninterval_ms = 100\n\n[[network]]')
    t = parse(farm_dir, text).timing
    assert (t.interval_ms, t.lease_ms, t.dead_after_ms) == (100, 750, 1250)
    (p,) = problems(farm_dir, edit("[[network]]", '[timing]\nprofile = "quick"\n[[network]]'))
    assert p.startswith("timing.profile: bad value 'quick'") and "'fast'" in p, p


def test_node_addresses(farm_dir: Path) -> None:
    found = problems(farm_dir, edit(', hb2 = "192.0.2.12"', ""))
    assert found == [
        'node[1].address.hb2: missing: add hb2 = "<address>" to the address table of node '
        "node2; every node needs one on every network"
    ]
    found = problems(farm_dir, edit('hb2 = "192.0.2.12"', 'hb3 = "192.0.2.12"'))
    assert "node[1].address.hb3: unknown network 'hb3': expected one of lan, hb2" in found
    found = problems(farm_dir, edit('"192.0.2.12"', '"192.0.2.11"'))
    assert found == [
        "node[1].address.hb2: bad value '192.0.2.11': expected an address not already used "
        "(node1.hb2)"
    ]
    found = problems(farm_dir, edit('"192.0.2.12"', '"2001:db8::12"'))
    assert found[0].startswith(
        "node[1].address.hb2: bad value '2001:db8::12': expected an IPv4 address like"
    )


def test_key_file_checks(farm_dir: Path) -> None:
    key = farm_dir / "farm.key"
    key.chmod(0o644)
    (p,) = problems(farm_dir, GOOD)
    assert p == (
        f"farm.key_file: {key} is mode 0644 (readable by group and others): run chmod 600 {key}"
    )
    key.chmod(0o600)
    key.write_bytes(b"31 bytes, one short of the mark\r\n")
    (p,) = problems(farm_dir, GOOD)
    assert p.startswith(f"farm.key_file: {key} holds 31 bytes: a farm key must be at least 32")
    assert p.endswith(f"create one with: (umask 077; head -c 32 /dev/urandom | base64 > {key})")
    key.unlink()
    (p,) = problems(farm_dir, GOOD)
    assert p == (
        f"farm.key_file: {key} does not exist: create one with: "
        f"(umask 077; head -c 32 /dev/urandom | base64 > {key})"
    )


def test_every_problem_of_a_round_is_reported(farm_dir: Path) -> None:
    text = edit('name = "web"', 'name = "Web!"')
    text = edit("weight = 50", "weight = -1", text)
    text = edit('ports = "80"', 'ports = "x"', text)
    assert len(problems(farm_dir, text)) == 3


def test_toml_syntax_error_gives_line_and_column(farm_dir: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("[farm]\nname = web\n", base_dir=farm_dir, source="f.toml")
    (p,) = exc.value.problems
    assert str(p).startswith("line 2, column 8: TOML syntax error: Invalid value")
    assert str(exc.value).startswith("f.toml: 1 problem\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "none.toml")


def test_module_by_path_and_script_permissions(farm_dir: Path) -> None:
    moved = farm_dir / "elsewhere"
    shutil.move(farm_dir / "modules" / "testmod", moved)
    cfg = parse(farm_dir, edit('name = "testmod"', 'path = "elsewhere"'))
    assert cfg.app_spec("node1").module == "elsewhere"
    (moved / "start").chmod(0o644)
    found = problems(farm_dir, edit('name = "testmod"', 'path = "elsewhere"'))
    assert found == [
        f"module.start: bad value '{moved.resolve()}/start': expected an executable script: "
        f"chmod +x {moved.resolve()}/start"
    ]


# --------------------------------------------------------------------------------------------
# The CLI


def cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(config_cli.app, name="config")
    return root


def test_cli_check(farm_dir: Path) -> None:
    (farm_dir / "farm.toml").write_text(GOOD)
    res = CliRunner().invoke(cli(), ["config", "check", str(farm_dir / "farm.toml")])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output and "node2" in res.output and "testmod" in res.output
    res = CliRunner().invoke(
        cli(), ["config", "check", str(farm_dir / "farm.toml"), "--node", "node2"]
    )
    assert res.exit_code == 0 and "node2 (this host)" in res.output

    before = sorted(p.name for p in farm_dir.rglob("*"))
    (farm_dir / "bad.toml").write_text(edit("weight = 50", "weight = 70000"))
    res = CliRunner().invoke(cli(), ["config", "check", str(farm_dir / "bad.toml")])
    assert res.exit_code == 2
    assert "node[1].weight: bad value 70000: expected less than or equal to 65535" in res.output
    after = sorted(p.name for p in farm_dir.rglob("*"))
    assert after == sorted([*before, "bad.toml"])  # checking wrote nothing

    res = CliRunner().invoke(
        cli(), ["config", "check", str(farm_dir / "farm.toml"), "--node", "nope"]
    )
    assert res.exit_code == 2 and "node 'nope' is not in farm" in res.output


# --------------------------------------------------------------------------------------------
# docs/CONFIG.md documents every key


def _key_paths(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        out.append(key)
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        for sub in (ann, *args):
            if isinstance(sub, type) and issubclass(sub, BaseModel) and sub is not model:
                out += _key_paths(sub, key + ".")
    return out


def test_config_doc_lists_every_key() -> None:
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    keys = _key_paths(FarmConfig, "")
    keys.remove("module.checker")
    for kind, cls in CHECKER_TYPES.items():
        assert f"`{kind}`" in doc
        keys += [f"module.checker.{k}" for k in cls.model_fields]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/CONFIG.md lacks {missing}"
