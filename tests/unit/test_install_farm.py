"""The farm `vipfarm init` writes (vipfarm.install.farm) and the command itself (vipfarm.cli.init).

The parsers refuse each bad value with the flag, the value and the fix; the files of a plan load
with the real configuration loader for every node; the command writes a bundle that
`vipfarm config check` accepts for each node, with secrets mode 0600, and a refused input or a
failed check leaves the directory as it was.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vipfarm.cli.init as cli_init
from vipfarm.cli.commands import build_app
from vipfarm.config.loading import load_config, parse_config
from vipfarm.datapath.spec import Affinity, Proto
from vipfarm.install import farm as f

LAN = f.NetworkPlan("lan")
HB2 = f.NetworkPlan("hb2", 9002)
ADDR = ipaddress.ip_address


def plan(**over: object) -> f.FarmPlan:
    nets = (LAN, HB2)
    nodes: list[f.NodePlan] = []
    for i in (1, 2, 3):
        nodes.append(f.parse_node(f"node{i}=198.51.100.1{i},192.0.2.1{i}", nets, nodes))
    fields: dict[str, object] = {
        "farm": "web",
        "networks": nets,
        "nodes": tuple(nodes),
        "vips": (ADDR("198.51.100.100"), ADDR("2001:db8:100::100")),
        "rules": (f.parse_rule("tcp/80/client-ip-port"), f.parse_rule("tcp/443")),
        "module": "nginx",
        "macros": {"port": "8080"},
        "tls": False,
    }
    fields.update(over)
    return f.FarmPlan(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp/80", f.RulePlan(Proto.TCP, 80)),
        ("UDP/53", f.RulePlan(Proto.UDP, 53)),
        (
            "tcp/8000-8100/client-ip-port",
            f.RulePlan(Proto.TCP, 8000, 8100, Affinity.CLIENT_IP_PORT),
        ),
        (
            "tcp/80/client-subnet:24",
            f.RulePlan(Proto.TCP, 80, None, Affinity.CLIENT_SUBNET, 24),
        ),
        (
            "2001:db8::1=tcp/443/client-subnet:56",
            f.RulePlan(Proto.TCP, 443, None, Affinity.CLIENT_SUBNET, 56, ADDR("2001:db8::1")),
        ),
    ],
)
def test_parse_rule(text: str, expected: f.RulePlan) -> None:
    assert f.parse_rule(text) == expected


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("tcp", "PROTO/PORTS"),
        ("sctp/80", "tcp or udp"),
        ("tcp/http", "'8000-8100'"),
        ("tcp/90-80", "increasing order"),
        ("tcp/70000", "1-65535"),
        ("tcp/80/sticky", "client-ip, client-ip-port, client-subnet"),
        ("tcp/80/client-ip:24", "only after client-subnet"),
        ("tcp/80/client-subnet:33", "1-32"),
        ("nope=tcp/80", "is not a VIP"),
    ],
)
def test_parse_rule_refuses_with_flag_value_and_fix(text: str, fix: str) -> None:
    with pytest.raises(f.InitInputError) as exc:
        f.parse_rule(text)
    assert str(exc.value).startswith(f"--rule: bad value {text!r}: expected ")
    assert fix in str(exc.value)


def test_parse_node_checks_against_networks_and_nodes_given() -> None:
    nets = [LAN, HB2]
    n1 = f.parse_node("node1=198.51.100.11, 192.0.2.11", nets)
    assert n1 == f.NodePlan("node1", (ADDR("198.51.100.11"), ADDR("192.0.2.11")))
    cases = {
        "node1": "NAME=ADDRESS",
        "=198.51.100.12,192.0.2.12": "NAME=ADDRESS",
        "node2=198.51.100.12": "2 address(es), not 1",
        "node2=198.51.100.12,x": "'x' is not an IPv4 or IPv6 address",
        "node1=198.51.100.12,192.0.2.12": "a node name not given yet (have node1)",
        "node2=198.51.100.11,192.0.2.12": "198.51.100.11 is given twice",
        "node2=198.51.100.12,2001:db8::12": "hb2 has IPv4 addresses",
    }
    for text, fix in cases.items():
        with pytest.raises(f.InitInputError, match=r"^--host: bad value") as exc:
            f.parse_node(text, nets, [n1])
        assert fix in str(exc.value), text


def test_parse_small_values() -> None:
    assert f.parse_network("hb2:9002") == HB2
    assert f.parse_network("lan") == LAN
    with pytest.raises(f.InitInputError, match="not given yet"):
        f.parse_network("lan", [LAN])
    with pytest.raises(f.InitInputError, match=r"^--network: bad value 'lan:0'"):
        f.parse_network("lan:0")
    with pytest.raises(f.InitInputError, match=r"^--network: bad value 'Lan'"):
        f.parse_network("Lan")
    assert f.parse_farm_name("web") == "web"
    with pytest.raises(f.InitInputError, match=r"^--farm: bad value 'Web farm'"):
        f.parse_farm_name("Web farm")
    with pytest.raises(f.InitInputError, match="a VIP not given yet"):
        f.parse_vip("198.51.100.100", [ADDR("198.51.100.100")])
    with pytest.raises(f.InitInputError, match=r"^--vip: bad value '198.51.100.300'"):
        f.parse_vip("198.51.100.300")
    assert f.parse_macro("cmd=a=b c") == ("cmd", "a=b c")
    with pytest.raises(f.InitInputError, match=r"^--macro: bad value '1x=2'"):
        f.parse_macro("1x=2")


def test_rendered_farm_loads_for_every_node(tmp_path: Path) -> None:
    p = plan()
    files = f.node_files(p, key=f.encode_secret(os.urandom(32)), token=f.encode_secret(b"t" * 32))
    assert set(files) == {"node1", "node2", "node3"}
    configs = {spec.data for node in files.values() for n, spec in node.items() if n == "web.toml"}
    assert len(configs) == 1  # the same farm file on every node
    node_dir = tmp_path / "node2"
    node_dir.mkdir()
    for name, spec in files["node2"].items():
        (node_dir / name).write_bytes(spec.data)
        (node_dir / name).chmod(spec.mode)
    cfg = load_config(node_dir / "web.toml")
    assert cfg.find_self("node2").address["hb2"] == ADDR("192.0.2.12")
    assert [n.port for n in cfg.networks] == [9001, 9002]
    # Each rule without VIP= applies to every VIP.
    assert [(str(r.rule.vip), r.rule.port) for r in cfg.rules] == [
        ("198.51.100.100", 80),
        ("2001:db8:100::100", 80),
        ("198.51.100.100", 443),
        ("2001:db8:100::100", 443),
    ]
    assert cfg.app_spec("node2").env["VIPFARM_M_PORT"] == "8080"
    assert cfg.api is not None and cfg.api.token_file == node_dir / "api.token"
    assert not cfg.api.tls


def test_tls_files_and_modes() -> None:
    p = plan(tls=True)
    with pytest.raises(ValueError, match="no certificate for node node1"):
        f.node_files(p, key=b"k", token=b"t")
    tls = {n.name: f.NodeTls(b"CA", n.name.encode(), b"KEY") for n in p.nodes}
    files = f.node_files(p, key=b"k", token=b"t", tls=tls)["node3"]
    modes = {name: spec.mode for name, spec in files.items()}
    assert modes == {
        "web.toml": 0o644,
        "web.key": 0o600,
        "api.token": 0o600,
        "web-ca.crt": 0o644,
        "web-node.crt": 0o644,
        "web-node.key": 0o600,
    }
    assert files["web-node.crt"].data == b"node3"
    text = f.render_toml(p)
    for line in (
        'cert_file = "web-node.crt"',
        'key_file = "web-node.key"',
        'ca_file = "web-ca.crt"',
    ):
        assert line in text


def test_rule_for_one_vip_and_subnet_prefix(tmp_path: Path) -> None:
    p = plan(rules=(f.parse_rule("2001:db8:100::100=udp/5000-5100/client-subnet:56"),))
    (tmp_path / "web.key").write_bytes(f.encode_secret(os.urandom(32)))
    (tmp_path / "api.token").write_bytes(f.encode_secret(os.urandom(32)))
    for name in ("web.key", "api.token"):
        (tmp_path / name).chmod(0o600)
    cfg = parse_config(f.render_toml(p), base_dir=tmp_path)
    (rule,) = [r.rule for r in cfg.rules]
    assert (str(rule.vip), rule.port, rule.port_end, rule.prefix6) == (
        "2001:db8:100::100",
        5000,
        5100,
        56,
    )


def test_secret_encoding_survives_the_loader_reading() -> None:
    raw = os.urandom(32)
    enc = f.encode_secret(raw)
    assert enc.endswith(b"\n") and len(enc.strip()) >= 32


# --------------------------------------------------------------------------------------------
# The command

FLAGS = [
    "--farm", "web", "--network", "lan", "--network", "hb2",
    "--host", "node1=198.51.100.11,192.0.2.11",
    "--host", "node2=198.51.100.12,192.0.2.12",
    "--host", "node3=198.51.100.13,192.0.2.13",
    "--vip", "198.51.100.100", "--rule", "tcp/80/client-ip-port",
]  # fmt: skip


def test_init_writes_a_bundle_that_config_check_accepts(tmp_path: Path) -> None:
    app = build_app("init")
    etc = tmp_path / "etc"
    res = CliRunner().invoke(
        app, ["init", *FLAGS, "--dir", str(tmp_path / "b"), "--node", "node2", "--etc", str(etc)]
    )
    assert res.exit_code == 0, res.output
    assert "valid - farm web, 3 nodes" in res.output
    assert "vipfarm service install web --enable" in res.output
    b = tmp_path / "b"
    assert sorted(p.name for p in b.iterdir()) == ["ca", "nodes"]  # no staging left
    assert stat.S_IMODE((b / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((b / "ca" / "web-ca.key").stat().st_mode) == 0o600
    check = build_app("config")
    for node in ("node1", "node2", "node3"):
        d = b / "nodes" / node
        for secret in ("web.key", "api.token", "web-node.key"):
            assert stat.S_IMODE((d / secret).stat().st_mode) == 0o600, (node, secret)
        assert not (d / "web-ca.key").exists()  # the CA's key stays off the nodes
        res = CliRunner().invoke(check, ["config", "check", str(d / "web.toml"), "--node", node])
        assert res.exit_code == 0, res.output
        # The node's certificate is signed by the farm CA and names its addresses.
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(d / "web-ca.crt"), str(d / "web-node.crt")],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stderr
    assert (etc / "web-node.crt").read_bytes() == (
        b / "nodes" / "node2" / "web-node.crt"
    ).read_bytes()
    assert stat.S_IMODE((etc / "web.key").stat().st_mode) == 0o600
    # Same keys everywhere, one certificate per node.
    n1, n2 = b / "nodes" / "node1", b / "nodes" / "node2"
    assert (n1 / "web.key").read_bytes() == (n2 / "web.key").read_bytes()
    assert (n1 / "api.token").read_bytes() == (n2 / "api.token").read_bytes()
    assert (n1 / "web-node.crt").read_bytes() != (n2 / "web-node.crt").read_bytes()
    # A second init into the same place refuses and changes nothing.
    before = sorted(str(p) for p in b.rglob("*"))
    res = CliRunner().invoke(app, ["init", *FLAGS, "--dir", str(b)])
    assert res.exit_code == 2 and "already holds nodes, ca" in res.output
    assert sorted(str(p) for p in b.rglob("*")) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "node1=198.51.100.11", "--vip", "198.51.100.100"], "--farm: bad value ''"),
        (["--farm", "web", "--vip", "198.51.100.100"], "at least one --host"),
        (["--farm", "web", "--host", "node1=198.51.100.11"], "at least one --vip"),
        ([*FLAGS, "--module", "nosuch"], "--module: bad value 'nosuch': expected one of apache"),
        ([*FLAGS, "--node", "node9"], "--node: bad value 'node9': expected one of the farm's"),
        ([*FLAGS, "--interface", "a b"], "--interface: bad value 'a b'"),
        # Caught only by the loader: the generic module needs a start_cmd macro.
        ([*FLAGS, "--module", "generic"], "unknown macro ${start_cmd}"),
    ],
)
def test_init_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    target = tmp_path / "new"  # created by init, and removed again when it refuses
    res = CliRunner().invoke(build_app("init"), ["init", *args, "--no-tls", "--dir", str(target)])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert list(tmp_path.iterdir()) == []


def test_init_into_an_unwritable_place_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    res = CliRunner().invoke(
        build_app("init"), ["init", *FLAGS, "--no-tls", "--dir", str(tmp_path / "file" / "sub")]
    )
    assert res.exit_code == 1 and "--dir: cannot write into" in res.output, res.output


def test_farm_pki_errors_name_openssl(tmp_path: Path) -> None:
    from vipfarm.install.pki import PkiError, make_farm_pki, san_of

    assert san_of("n1", [ADDR("192.0.2.1"), ADDR("2001:db8::1")]) == (
        "DNS:n1,IP:192.0.2.1,IP:2001:db8::1"
    )
    with pytest.raises(PkiError, match="openssl req failed"):
        make_farm_pki("web", [("n1", [ADDR("192.0.2.1")])], openssl=str(tmp_path / "none"))
    fake = tmp_path / "openssl"
    fake.write_text("#!/bin/sh\necho refused >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(PkiError, match="openssl req -x509 failed: refused"):
        make_farm_pki("web", [("n1", [ADDR("192.0.2.1")])], openssl=str(fake))


def test_init_asks_when_no_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_init, "_stdin_is_tty", lambda: True)
    answers = [
        "Web Farm",  # refused: asked again
        "shop",
        "",  # the default network: lan
        "",  # done
        "node1=198.51.100.11",
        "node2=198.51.100.11",  # refused: address given twice
        "node2=198.51.100.12",
        "",
        "198.51.100.100",
        "",
        "tcp/80",
        "tcp/443/client-ip",
        "",
        "apache",
        "port=8080",
        "",
        "",  # eth0
        "9010",
        "n",  # no TLS
    ]
    res = CliRunner().invoke(
        build_app("init"), ["init", "--dir", str(tmp_path)], input="\n".join(answers) + "\n"
    )
    assert res.exit_code == 0, res.output
    assert "1 to 16 characters" in res.output
    assert "198.51.100.11 is given twice" in res.output
    cfg = load_config(tmp_path / "nodes" / "node2" / "shop.toml")
    assert [n.name for n in cfg.nodes] == ["node1", "node2"]
    assert [r.rule.port for r in cfg.rules] == [80, 443]
    assert cfg.app_spec("node1").module == "apache"
    assert cfg.api is not None and not cfg.api.tls


def _bundle(tmp_path: Path, *extra: str) -> Path:
    b = tmp_path / "b"
    i = FLAGS.index("node3=198.51.100.13,192.0.2.13")
    two = FLAGS[: i - 1] + FLAGS[i + 1 :]  # node1 and node2
    res = CliRunner().invoke(build_app("init"), ["init", *two, *extra, "--dir", str(b)])
    assert res.exit_code == 0 and "farm web, 2 nodes" in res.output, res.output
    return b


def test_add_node_signs_with_the_kept_ca_and_grows_every_farm_file(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    n1 = b / "nodes" / "node1"
    before = {p.name: p.read_bytes() for p in n1.iterdir()}
    res = CliRunner().invoke(
        build_app("init"), ["init", "--add-node", "node3=198.51.100.13,192.0.2.13", "--dir", str(b)]
    )
    assert res.exit_code == 0, res.output
    assert "node3 added, 3 nodes" in res.output and "systemctl restart vipfarm@web" in res.output
    assert sorted(p.name for p in b.iterdir()) == ["ca", "nodes"]  # no staging left
    d3 = b / "nodes" / "node3"
    assert sorted(p.name for p in d3.iterdir()) == sorted(before)
    for secret in ("web.key", "api.token", "web-node.key"):
        assert stat.S_IMODE((d3 / secret).stat().st_mode) == 0o600, secret
    # The farm's key, token and CA; only the farm file of the old nodes changed.
    for name in ("web.key", "api.token", "web-ca.crt"):
        assert (d3 / name).read_bytes() == before[name]
    after = {p.name: p.read_bytes() for p in n1.iterdir()}
    assert {k for k in after if after[k] != before[k]} == {"web.toml"}
    check = build_app("config")
    for node in ("node1", "node2", "node3"):
        d = b / "nodes" / node
        assert (d / "web.toml").read_bytes() == (d3 / "web.toml").read_bytes()
        res = CliRunner().invoke(check, ["config", "check", str(d / "web.toml"), "--node", node])
        assert res.exit_code == 0 and "3 nodes" in res.output, res.output
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(n1 / "web-ca.crt"), str(d3 / "web-node.crt")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", str(d3 / "web-node.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:node3" in san and "198.51.100.13" in san and "192.0.2.13" in san


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("node2=198.51.100.19,192.0.2.19", "a node name not given yet (have node1, node2)"),
        ("node3=198.51.100.12,192.0.2.13", "198.51.100.12 is given twice"),
        ("node3=198.51.100.13", "one address per network (lan, hb2)"),
    ],
)
def test_add_node_refuses_and_changes_nothing(tmp_path: Path, value: str, message: str) -> None:
    b = _bundle(tmp_path)
    before = {str(p): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    res = CliRunner().invoke(build_app("init"), ["init", "--add-node", value, "--dir", str(b)])
    assert res.exit_code == 2 and message in res.output, res.output
    assert {str(p): p.read_bytes() for p in b.rglob("*") if p.is_file()} == before


def test_add_node_needs_the_farms_own_ca(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    add = ["init", "--add-node", "node3=198.51.100.13,192.0.2.13", "--dir", str(b)]
    res = CliRunner().invoke(build_app("init"), [*add, "--farm", "web"])
    assert res.exit_code == 2 and "give no other farm flag" in res.output
    # Another farm's CA (its key and certificate) is refused: the nodes would not trust it.
    other = _bundle(tmp_path / "other")
    for name in ("web-ca.crt", "web-ca.key"):
        (b / "ca" / name).write_bytes((other / "ca" / name).read_bytes())
    res = CliRunner().invoke(build_app("init"), add)
    assert res.exit_code == 2 and "is not the CA that node1 trusts" in res.output, res.output
    (b / "ca" / "web-ca.key").unlink()
    res = CliRunner().invoke(build_app("init"), add)
    assert res.exit_code == 2 and "the farm CA" in res.output, res.output
    assert not (b / "nodes" / "node3").exists()
    # Without TLS there is no CA to keep, and the node is added all the same.
    plain = _bundle(tmp_path / "plain", "--no-tls")
    res = CliRunner().invoke(build_app("init"), [*add[:-1], str(plain)])
    assert res.exit_code == 0 and (plain / "nodes" / "node3" / "web.toml").is_file(), res.output


def test_sign_node_refuses_a_key_that_is_not_the_cas(tmp_path: Path) -> None:
    from vipfarm.install.pki import PkiError, make_farm_pki, sign_node

    a = make_farm_pki("web", [("node1", [ADDR("192.0.2.1")])])
    b = make_farm_pki("web", [("node1", [ADDR("192.0.2.1")])])
    with pytest.raises(PkiError, match="does not belong to its certificate"):
        sign_node(a.ca_cert, b.ca_key, "node2", [ADDR("192.0.2.2")])
    cert, key = sign_node(a.ca_cert, a.ca_key, "node2", [ADDR("192.0.2.2")])
    assert cert.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in key
