"""The farm `vipfarm init` writes: its plan, parsed from flags or answers, and its files.

Theory of operation
-------------------
`vipfarm init` takes each part of a farm as one short text (a flag's value or a prompt's
answer): a heartbeat network `lan:9001`, a node `node1=198.51.100.11,192.0.2.11` (one address
per network, in the order of the networks), a VIP, a rule `tcp/443/client-ip`, a macro
`port=8080`. One parser per kind turns the text into a frozen value or raises `InitInputError`
naming the flag, the bad value and the fix, so a prompt can ask again at once and a bad flag
changes nothing. The parsers check only what one value can show (and, for a node, the nodes
already given); everything else is left to the real configuration loader, which the command runs
on the result before anything is moved into place: a farm that `vipfarm init` writes is one that
`vipfarm config check` accepts, by construction rather than by a second copy of its rules.

`FarmPlan` holds the whole farm; `render_toml` writes its farm file (the same on every node) and
`node_files` the complete configuration directory of each node (the farm file, the heartbeat key,
the API token and, with TLS, the farm CA's certificate and the node's own certificate and key),
each with its file mode: secrets 0600, the rest 0644. Secrets and certificates are passed in, so
this module stays pure: `vipfarm.install.pki` makes the certificates, `secrets` the random bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vipfarm.datapath.spec import Affinity, IPAddress, Proto

__all__ = [
    "DEFAULT_API_PORT",
    "DEFAULT_HB_PORT",
    "FarmPlan",
    "FileSpec",
    "InitInputError",
    "NetworkPlan",
    "NodePlan",
    "NodeTls",
    "RulePlan",
    "encode_secret",
    "file_names",
    "node_files",
    "parse_farm_name",
    "parse_macro",
    "parse_network",
    "parse_node",
    "parse_port",
    "parse_rule",
    "parse_vip",
    "render_node",
    "render_toml",
]

DEFAULT_HB_PORT = 9001
DEFAULT_API_PORT = 9010
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644

# The same rules as the configuration's fields (vipfarm.config.fields, the data path's farm
# name); repeated as patterns here so that a prompt can refuse a name before the whole file
# exists. The loader run at the end stays the authority.
_FARM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,15}$")
_NET_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MACRO_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PORTS_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_IFACE_RE = re.compile(r"^[^/\s]{1,15}$")


class InitInputError(ValueError):
    """One bad value: `flag`, the value and what is expected, worded like the loader's problems
    (`--vip: bad value 'x': expected an IPv4 or IPv6 address ...`)."""

    def __init__(self, flag: str, value: str, expected: str) -> None:
        super().__init__(f"{flag}: bad value {value!r}: expected {expected}")
        self.flag, self.value, self.expected = flag, value, expected


@dataclass(frozen=True)
class NetworkPlan:
    name: str
    port: int = DEFAULT_HB_PORT


@dataclass(frozen=True)
class NodePlan:
    name: str
    addresses: tuple[IPAddress, ...]  # one per network, in the order of FarmPlan.networks


@dataclass(frozen=True)
class RulePlan:
    proto: Proto
    port: int
    port_end: int | None = None
    affinity: Affinity = Affinity.CLIENT_IP
    prefix: int | None = None
    vip: IPAddress | None = None  # None: the rule applies to every VIP

    @property
    def ports_text(self) -> str:
        return str(self.port) if self.port_end is None else f"{self.port}-{self.port_end}"


@dataclass(frozen=True)
class FarmPlan:
    farm: str
    networks: tuple[NetworkPlan, ...]
    nodes: tuple[NodePlan, ...]
    vips: tuple[IPAddress, ...]
    rules: tuple[RulePlan, ...]
    module: str = "nginx"
    macros: Mapping[str, str] = field(default_factory=dict)
    interface: str = "eth0"
    api_port: int = DEFAULT_API_PORT
    tls: bool = True


@dataclass(frozen=True)
class NodeTls:
    """The PEM files of one node's HTTPS: the farm CA's certificate, the node's own pair."""

    ca_cert: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class FileSpec:
    data: bytes
    mode: int


# --------------------------------------------------------------------------------------------
# One value at a time


def parse_farm_name(text: str, flag: str = "--farm") -> str:
    name = text.strip()
    if not _FARM_RE.fullmatch(name):
        raise InitInputError(
            flag,
            text,
            "1 to 16 characters: lowercase letters, digits, '-' or '_', starting with a letter "
            "or digit (e.g. web)",
        )
    return name


def parse_port(text: str, flag: str) -> int:
    value = text.strip()
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise InitInputError(flag, text, "a port number from 1 to 65535")
    return int(value)


def parse_network(text: str, existing: Sequence[NetworkPlan] = ()) -> NetworkPlan:
    """`NAME` or `NAME:PORT`: a heartbeat network and its UDP port."""
    flag = "--network"
    name, sep, port = text.strip().partition(":")
    if not _NET_RE.fullmatch(name):
        raise InitInputError(
            flag,
            text,
            "NAME or NAME:PORT, NAME of 1 to 16 lowercase letters, digits, '-' or '_' starting "
            f"with a letter (e.g. lan or hb2:{DEFAULT_HB_PORT})",
        )
    if any(n.name == name for n in existing):
        raise InitInputError(flag, text, f"a network name not given yet (have {_names(existing)})")
    if not sep:
        return NetworkPlan(name)
    try:
        return NetworkPlan(name, parse_port(port, flag))
    except InitInputError as exc:
        raise InitInputError(flag, text, f"NAME:PORT with {exc.expected}") from None


def parse_node(
    text: str, networks: Sequence[NetworkPlan], existing: Sequence[NodePlan] = ()
) -> NodePlan:
    """`NAME=ADDR[,ADDR...]`: a node and its address on each heartbeat network, in order."""
    flag = "--host"
    nets = ", ".join(n.name for n in networks)
    shape = f"NAME=ADDRESS with one address per network ({nets}), comma-separated, in that order"
    name, sep, rest = text.strip().partition("=")
    name = name.strip()
    if not sep or not _NODE_RE.fullmatch(name):
        raise InitInputError(
            flag, text, f"{shape}; NAME of letters, digits, '.', '-', '_' (e.g. node1=...)"
        )
    parts = [p.strip() for p in rest.split(",")] if rest.strip() else []
    if len(parts) != len(networks):
        raise InitInputError(flag, text, f"{shape}: {len(networks)} address(es), not {len(parts)}")
    addrs: list[IPAddress] = []
    for part in parts:
        try:
            addrs.append(ipaddress.ip_address(part))
        except ValueError:
            raise InitInputError(
                flag, text, f"{shape}; {part!r} is not an IPv4 or IPv6 address"
            ) from None
    if any(n.name == name for n in existing):
        raise InitInputError(flag, text, f"a node name not given yet (have {_names(existing)})")
    used = {a for n in existing for a in n.addresses}
    for a in addrs:
        if a in used or addrs.count(a) > 1:
            raise InitInputError(flag, text, f"addresses unique in the farm; {a} is given twice")
    for i, net in enumerate(networks):
        if existing and existing[0].addresses[i].version != addrs[i].version:
            raise InitInputError(
                flag,
                text,
                f"one IP family per network: {net.name} has IPv{existing[0].addresses[i].version}"
                f" addresses, {addrs[i]} is IPv{addrs[i].version}",
            )
    return NodePlan(name, tuple(addrs))


def parse_vip(text: str, existing: Sequence[IPAddress] = ()) -> IPAddress:
    try:
        vip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise InitInputError(
            "--vip", text, "an IPv4 or IPv6 address, e.g. 198.51.100.100 or 2001:db8::100"
        ) from None
    if vip in existing:
        raise InitInputError("--vip", text, "a VIP not given yet")
    return vip


def parse_rule(text: str) -> RulePlan:
    """`[VIP=]PROTO/PORTS[/AFFINITY[:PREFIX]]`, e.g. `tcp/80/client-ip-port`, `udp/53`,
    `tcp/8000-8100/client-subnet:24`; without VIP= the rule applies to every VIP."""
    flag = "--rule"
    affinities = ", ".join(a.value for a in Affinity)
    shape = (
        "[VIP=]PROTO/PORTS[/AFFINITY[:PREFIX]] like tcp/80, tcp/443/client-ip or "
        "udp/5000-5100/client-subnet:24"
    )
    body = text.strip()
    vip: IPAddress | None = None
    if "=" in body:
        vip_text, _, body = body.partition("=")
        try:
            vip = ipaddress.ip_address(vip_text.strip())
        except ValueError:
            raise InitInputError(flag, text, f"{shape}; {vip_text!r} is not a VIP") from None
    parts = body.split("/")
    if len(parts) not in (2, 3):
        raise InitInputError(flag, text, shape)
    try:
        proto = Proto(parts[0].lower())
    except ValueError:
        raise InitInputError(flag, text, f"{shape}; the protocol is tcp or udp") from None
    m = _PORTS_RE.fullmatch(parts[1])
    if not m:
        raise InitInputError(flag, text, f"{shape}; ports are '80' or a range '8000-8100'")
    port, port_end = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if not 1 <= port <= 65535 or (port_end is not None and not port <= port_end <= 65535):
        raise InitInputError(flag, text, f"{shape}; ports 1-65535, a range in increasing order")
    affinity, prefix = Affinity.CLIENT_IP, None
    if len(parts) == 3:
        aff_text, sep, prefix_text = parts[2].partition(":")
        try:
            affinity = Affinity(aff_text)
        except ValueError:
            raise InitInputError(
                flag, text, f"{shape}; the affinity is one of {affinities}"
            ) from None
        if sep:
            if affinity != Affinity.CLIENT_SUBNET or not prefix_text.isdigit():
                raise InitInputError(
                    flag, text, f"{shape}; a :PREFIX (a number) only after client-subnet"
                )
            prefix = int(prefix_text)
            if not 1 <= prefix <= (32 if vip is None or vip.version == 4 else 128):
                raise InitInputError(flag, text, f"{shape}; a prefix length 1-32 (IPv6: 1-128)")
    return RulePlan(proto, port, port_end, affinity, prefix, vip)


def parse_macro(text: str) -> tuple[str, str]:
    """`NAME=VALUE`: a macro of the module (`${NAME}` in its scripts and checkers)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not _MACRO_RE.fullmatch(name):
        raise InitInputError(
            "--macro",
            text,
            "NAME=VALUE, NAME of letters, digits and '_' not starting with a digit "
            "(e.g. port=8080)",
        )
    return name, value


def parse_interface(text: str) -> str:
    if not _IFACE_RE.fullmatch(text.strip()):
        raise InitInputError(
            "--interface", text, "an interface name of 1 to 15 characters, no '/' or space"
        )
    return text.strip()


def _names(items: Sequence[NetworkPlan] | Sequence[NodePlan]) -> str:
    return ", ".join(i.name for i in items) or "none"


# --------------------------------------------------------------------------------------------
# The files


def file_names(farm: str) -> dict[str, str]:
    """The names, in each node's configuration directory, of the farm's files. The API token is
    `api.token`, where the CLI looks by default (`vipfarm --node HOST ...` needs no flag)."""
    return {
        "config": f"{farm}.toml",
        "key": f"{farm}.key",
        "token": "api.token",
        "ca_cert": f"{farm}-ca.crt",
        "cert": f"{farm}-node.crt",
        "tls_key": f"{farm}-node.key",
    }


def _q(value: object) -> str:
    # A JSON string is a valid TOML basic string (the same escapes).
    return json.dumps(str(value))


def render_node(node: NodePlan, networks: Sequence[NetworkPlan], interface: str) -> list[str]:
    """The `[[node]]` table of one node, as lines (`vipfarm init --add-node` appends one)."""
    addrs = ", ".join(
        f"{net.name} = {_q(a)}" for net, a in zip(networks, node.addresses, strict=True)
    )
    return [
        "[[node]]",
        f"name = {_q(node.name)}",
        f"interface = {_q(interface)}",
        f"address = {{ {addrs} }}",
    ]


def render_toml(plan: FarmPlan) -> str:
    """The farm file: identical on every node, every path relative to its own directory."""
    names = file_names(plan.farm)
    lines = [
        f"# Farm {plan.farm}, written by `vipfarm init`. The same file on every node; each node",
        "# finds itself by its addresses (or `--node NAME`). Every key: docs/CONFIG.md.",
        "",
        "[farm]",
        f"name = {_q(plan.farm)}",
        f"key_file = {_q(names['key'])}   # heartbeat HMAC key: the same on every node, mode 0600",
        "",
        "[timing]",
        "# fast, default, tolerant or wan: heartbeat, lease and failover timers (docs/CONFIG.md)",
        'profile = "default"',
    ]
    for net in plan.networks:
        lines += ["", "[[network]]", f"name = {_q(net.name)}", f"port = {net.port}"]
    for node in plan.nodes:
        lines += ["", *render_node(node, plan.networks, plan.interface)]
    for rule in plan.rules:
        for vip in plan.vips if rule.vip is None else (rule.vip,):
            lines += [
                "",
                "[[rule]]",
                f"vip = {_q(vip)}",
                f"proto = {_q(rule.proto.value)}",
                f"ports = {_q(rule.ports_text)}",
                f"affinity = {_q(rule.affinity.value)}",
            ]
            if rule.prefix is not None:
                lines.append(f"prefix = {rule.prefix}")
    lines += ["", "[module]", f"name = {_q(plan.module)}"]
    if plan.macros:
        lines += ["", "[module.macros]"]
        lines += [f"{k} = {_q(v)}" for k, v in plan.macros.items()]
    lines += [
        "",
        "[api]",
        f"port = {plan.api_port}",
        f"network = {_q(plan.networks[0].name)}",
        f"token_file = {_q(names['token'])}   # the same on every node, mode 0600",
    ]
    if plan.tls:
        lines += [
            f"cert_file = {_q(names['cert'])}   # this node's own certificate (farm CA)",
            f"key_file = {_q(names['tls_key'])}   # its private key, mode 0600",
            f"ca_file = {_q(names['ca_cert'])}   # the farm CA: nodes verify each other with it",
        ]
    return "\n".join(lines) + "\n"


def encode_secret(raw: bytes) -> bytes:
    """A key or token file's content: base64 text (an editor or a copy-paste keeps it intact),
    one final newline, which is not part of the secret (vipfarm.config.schema.key_bytes)."""
    return base64.b64encode(raw) + b"\n"


def node_files(
    plan: FarmPlan,
    *,
    key: bytes,
    token: bytes,
    tls: Mapping[str, NodeTls] | None = None,
) -> dict[str, dict[str, FileSpec]]:
    """Every node's configuration directory: node name -> file name -> content and mode.
    `key` and `token` are the file contents (see `encode_secret`); `tls` holds one entry per
    node when `plan.tls`."""
    names = file_names(plan.farm)
    config = render_toml(plan).encode()
    out: dict[str, dict[str, FileSpec]] = {}
    for node in plan.nodes:
        files = {
            names["config"]: FileSpec(config, PUBLIC_MODE),
            names["key"]: FileSpec(key, SECRET_MODE),
            names["token"]: FileSpec(token, SECRET_MODE),
        }
        if plan.tls:
            if tls is None or node.name not in tls:
                raise ValueError(f"no certificate for node {node.name}")
            t = tls[node.name]
            files[names["ca_cert"]] = FileSpec(t.ca_cert, PUBLIC_MODE)
            files[names["cert"]] = FileSpec(t.cert, PUBLIC_MODE)
            files[names["tls_key"]] = FileSpec(t.key, SECRET_MODE)
        out[node.name] = files
    return out
