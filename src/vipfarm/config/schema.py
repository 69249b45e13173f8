"""The sections of a farm file and the whole file, `FarmConfig`.

Theory of operation
-------------------
Validation runs in two rounds. First pydantic validates every section on its own (types,
ranges, the key and token files, the order of the timers). Once those all passed,
`FarmConfig` runs the checks that need several sections at once: network names are unique,
every node has one address on every network and no address is used twice, the API network is a
heartbeat network. Then, for every node, it builds the node's data path spec and application:

* Rules are converted to `vipfarm.datapath.spec.Rule` (by `RuleSection`) and each node's data
  path is checked by building its `vipfarm.datapath.spec.DatapathSpec`: the bounds and the
  overlap check live there only, and their errors are mapped back onto the keys of this file
  (`port` -> `ports`, `lease_s` -> `timing.lease_ms`).
* The application is resolved by `vipfarm.config.modules.resolve_app` (macros substituted).

Every problem of a round is reported at once (see `vipfarm.config.problems`); the built specs
are kept, so that `datapath_spec(node)` and `app_spec(node)` are lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from vipfarm.config.fields import Address, NetName, NodeName, Strict, base_dir
from vipfarm.config.modules import ModuleSection, resolve_app
from vipfarm.config.problems import ConfigError, Loc, Problem, error_at, raise_errors, relocate
from vipfarm.datapath.spec import Affinity, DatapathSpec, IPAddress, Proto, Rule
from vipfarm.supervisor.spec import AppSpec

__all__ = [
    "ApiSection",
    "DrainSection",
    "FarmConfig",
    "FarmSection",
    "NetworkSection",
    "NodeSection",
    "RuleSection",
    "TimingSection",
    "key_bytes",
]

KEY_MIN_BYTES = 32
TOKEN_MIN_BYTES = 16


def key_bytes(data: bytes) -> bytes:
    """The key in a key file: its bytes without one final line ending, so that a key written
    with or without a newline by an editor is the same key; binary keys work too."""
    for ending in (b"\r\n", b"\n"):
        if data.endswith(ending):
            return data[: -len(ending)]
    return data


def _in_config_dir(path: Path, info: ValidationInfo) -> Path:
    return path if path.is_absolute() else base_dir(info) / path


def _secret_file(path: Path, info: ValidationInfo, what: str, min_bytes: int) -> Path:
    """A file holding a secret: readable by us, by nobody else, long enough."""
    path = _in_config_dir(path, info)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"a readable {what} file ({exc.strerror}); create one with: "
            f"head -c 32 /dev/urandom | base64 > {path}; chmod 600 {path}"
        ) from None
    if st.st_mode & 0o004:
        raise ValueError(f"a {what} file that others cannot read: chmod 600 {path}")
    if len(key_bytes(data)) < min_bytes:
        raise ValueError(
            f"a {what} of at least {min_bytes} bytes, {path} has {len(key_bytes(data))}"
        )
    return path


def _farm_name_pattern() -> str:
    # The farm name ends up in the data path (nftables table names), whose model owns the rule.
    return str(DatapathSpec.model_json_schema()["properties"]["farm"]["pattern"])


class FarmSection(Strict):
    name: str
    key_file: Path
    # The key being rolled out: accepted beside key_file, and sent with once every live peer
    # accepts it too (docs/CONFIG.md, "Rotating the farm key").
    next_key_file: Path | None = None
    buckets: int = DatapathSpec.model_fields["buckets"].default
    seed: int = DatapathSpec.model_fields["seed"].default

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(_farm_name_pattern(), name):
            raise ValueError(
                "1 to 16 characters: lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        return name

    @field_validator("key_file", "next_key_file")
    @classmethod
    def _key_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _secret_file(path, info, "key", KEY_MIN_BYTES)


class TimingSection(Strict):
    interval_ms: int = Field(default=100, ge=10, le=10_000)
    dead_after_ms: int = Field(default=500, ge=20, le=600_000)
    lease_ms: int = Field(default=300, ge=10, le=600_000)

    @model_validator(mode="after")
    def _ordered(self) -> TimingSection:
        # A node's buckets must expire (lease) before peers may take them (dead_after), and the
        # lease must outlive at least one heartbeat, which is what refreshes it.
        errors = []
        if self.lease_ms >= self.dead_after_ms:
            errors.append(
                error_at(
                    ("lease_ms",),
                    self.lease_ms,
                    f"less than dead_after_ms ({self.dead_after_ms}): lower lease_ms or "
                    "raise dead_after_ms",
                )
            )
        if self.interval_ms >= self.lease_ms:
            errors.append(
                error_at(
                    ("interval_ms",),
                    self.interval_ms,
                    f"less than lease_ms ({self.lease_ms}): lower interval_ms or raise lease_ms",
                )
            )
        if errors:
            raise_errors(errors)
        return self


class NetworkSection(Strict):
    name: NetName
    port: int = Field(default=9001, ge=1, le=65535)


class NodeSection(Strict):
    name: NodeName
    weight: int = Field(default=100, ge=0, le=65535)
    interface: str = "eth0"
    address: dict[str, Address] = Field(min_length=1)


def _ports_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


_PORTS_RE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")
_RULE_KEY = {"port": "ports", "port_end": "ports", "prefix4": "prefix", "prefix6": "prefix"}


class RuleSection(Strict):
    vip: Address
    proto: Proto = Proto.TCP
    ports: Annotated[str, BeforeValidator(_ports_text)]
    affinity: Affinity = Affinity.CLIENT_IP
    prefix: int | None = None

    _rule: Rule = PrivateAttr()

    @model_validator(mode="after")
    def _to_rule(self) -> RuleSection:
        m = _PORTS_RE.match(self.ports)
        errors = []
        if not m:
            errors.append(
                error_at(("ports",), self.ports, "a port like '80' or a range like '8000-8100'")
            )
        if self.prefix is not None and self.affinity != Affinity.CLIENT_SUBNET:
            errors.append(
                error_at(("prefix",), self.prefix, "no prefix unless affinity = 'client-subnet'")
            )
        if errors or m is None:
            raise_errors(errors)
        fields: dict[str, Any] = {
            "vip": self.vip,
            "proto": self.proto,
            "port": int(m.group(1)),
            "port_end": int(m.group(2)) if m.group(2) else None,
            "affinity": self.affinity,
        }
        if self.prefix is not None:
            fields["prefix4" if self.vip.version == 4 else "prefix6"] = self.prefix
        try:
            self._rule = Rule(**fields)
        except ValidationError as exc:
            # Rule's only check on the whole model is the order of the port range.
            raise_errors(
                relocate(
                    exc, lambda loc: (_RULE_KEY.get(str(loc[0]), str(loc[0])) if loc else "ports",)
                )
            )
        return self

    @property
    def rule(self) -> Rule:
        return self._rule


class DrainSection(Strict):
    timeout_s: float = Field(default=30.0, ge=0, le=86400)


class ApiSection(Strict):
    """The node's HTTP API (`vipfarm.api`): where it listens and how callers prove who they are."""

    port: int = Field(default=9010, ge=1, le=65535)
    network: NetName | None = None  # default: the first heartbeat network
    token_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    metrics_public: bool = False

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, path: Path, info: ValidationInfo) -> Path:
        return _secret_file(path, info, "token", TOKEN_MIN_BYTES)

    @field_validator("cert_file", "ca_file")
    @classmethod
    def _readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        path = _in_config_dir(path, info)
        try:
            path.read_bytes()
        except OSError as exc:
            raise ValueError(f"a readable PEM file ({exc.strerror}: {path})") from None
        return path

    @field_validator("key_file")
    @classmethod
    def _tls_key(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _secret_file(path, info, "TLS key", 1)

    @model_validator(mode="after")
    def _pair(self) -> ApiSection:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise_errors(
                [
                    error_at(
                        (missing,),
                        None,
                        "both cert_file and key_file for TLS, or neither for plain HTTP",
                        show_value=False,
                    )
                ]
            )
        return self

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def token(self) -> bytes:
        """The bearer token callers must present (see `key_bytes`)."""
        return key_bytes(self.token_file.read_bytes())


class FarmConfig(Strict):
    """A validated farm configuration. Build it with `load_config` or `parse_config`."""

    farm: FarmSection
    timing: TimingSection = TimingSection()
    networks: list[NetworkSection] = Field(alias="network", min_length=1, max_length=8)
    nodes: list[NodeSection] = Field(alias="node", min_length=1, max_length=32)
    rules: list[RuleSection] = Field(alias="rule", min_length=1)
    module: ModuleSection
    drain: DrainSection = DrainSection()
    api: ApiSection | None = None

    _apps: dict[str, AppSpec] = PrivateAttr(default_factory=dict)
    _specs: dict[str, DatapathSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> FarmConfig:
        errors = [*self._check_networks(), *self._check_nodes(), *self._check_api()]
        if not errors:
            for node in self.nodes:
                errors += self._build_node(node)
        if errors:
            raise_errors(errors)  # repeats (one per node) are merged by problems_of
        return self

    def _check_networks(self) -> list[InitErrorDetails]:
        errors = []
        seen: set[str] = set()
        for i, net in enumerate(self.networks):
            if net.name in seen:
                errors.append(error_at(("network", i, "name"), net.name, "a unique network name"))
            seen.add(net.name)
        return errors

    def _check_api(self) -> list[InitErrorDetails]:
        nets = [n.name for n in self.networks]
        if self.api is None or self.api.network is None or self.api.network in nets:
            return []
        return [
            error_at(
                ("api", "network"),
                self.api.network,
                f"a heartbeat network of this file: one of {', '.join(nets)}",
            )
        ]

    def _check_nodes(self) -> list[InitErrorDetails]:
        errors = []
        nets = [n.name for n in self.networks]
        names: set[str] = set()
        owner: dict[IPAddress, str] = {}
        family: dict[str, tuple[int, str]] = {}
        for i, node in enumerate(self.nodes):
            if node.name in names:
                errors.append(error_at(("node", i, "name"), node.name, "a unique node name"))
            names.add(node.name)
            for net in nets:
                if net not in node.address:
                    errors.append(
                        error_at(
                            ("node", i, "address", net),
                            None,
                            f'missing: add {net} = "<address>" to the address table of '
                            f"node {node.name}; every node needs one on every network",
                            show_value=False,
                        )
                    )
            for net, addr in node.address.items():
                loc: Loc = ("node", i, "address", net)
                if net not in nets:
                    errors.append(
                        error_at(
                            loc,
                            None,
                            f"unknown network '{net}': expected one of {', '.join(nets)}",
                            show_value=False,
                        )
                    )
                    continue
                if addr in owner:
                    errors.append(
                        error_at(loc, str(addr), f"an address not already used ({owner[addr]})")
                    )
                owner[addr] = f"{node.name}.{net}"
                first = family.setdefault(net, (addr.version, node.name))
                if first[0] != addr.version:
                    errors.append(
                        error_at(
                            loc,
                            str(addr),
                            f"an IPv{first[0]} address like the other nodes' on '{net}' "
                            f"(node {first[1]})",
                        )
                    )
        return errors

    def _build_node(self, node: NodeSection) -> list[InitErrorDetails]:
        """Build and keep the node's DatapathSpec and AppSpec; return located errors."""
        i = self.nodes.index(node)
        spec_keys: dict[str, Loc] = {
            "farm": ("farm", "name"),
            "interface": ("node", i, "interface"),
            "rules": ("rule",),
            "buckets": ("farm", "buckets"),
            "seed": ("farm", "seed"),
            "lease_s": ("timing", "lease_ms"),
        }
        try:
            self._specs[node.name] = DatapathSpec(
                farm=self.farm.name,
                interface=node.interface,
                rules=[r.rule for r in self.rules],
                buckets=self.farm.buckets,
                seed=self.farm.seed,
                lease_s=self.timing.lease_ms / 1000,
            )
        except ValidationError as exc:
            return relocate(exc, lambda loc: spec_keys.get(str(loc[0]), loc))
        try:
            self._apps[node.name] = resolve_app(
                self.module, farm=self.farm.name, node=node.name, vips=self.vips
            )
        except ValidationError as exc:
            return relocate(exc, lambda loc: loc)
        return []

    # ---- queries

    @property
    def vips(self) -> list[IPAddress]:
        """Every VIP, in the order of the rules (the same on every node)."""
        return next(iter(self._specs.values())).vips

    def node(self, name: str) -> NodeSection:
        for n in self.nodes:
            if n.name == name:
                return n
        names = ", ".join(n.name for n in self.nodes)
        raise ConfigError(
            self.farm.name, [Problem("", f"node '{name}' is not in farm: expected one of {names}")]
        )

    def find_self(
        self, name: str | None = None, local_addresses: Iterable[IPAddress] = ()
    ) -> NodeSection:
        """This host's node: by name if given, else the one node with a local address."""
        if name is not None:
            return self.node(name)
        local = set(local_addresses)
        found = [n for n in self.nodes if local & set(n.address.values())]
        if len(found) == 1:
            return found[0]
        if not found:
            msg = (
                f"no node of farm {self.farm.name} has an address of this host: "
                "pass the node name (--node NAME) or add this host's address to its [[node]]"
            )
        else:
            msg = (
                f"several nodes have an address of this host ({', '.join(n.name for n in found)}):"
                " pass the node name (--node NAME)"
            )
        raise ConfigError(self.farm.name, [Problem("", msg)])

    def datapath_spec(self, node: str | NodeSection) -> DatapathSpec:
        return self._specs[self._name(node)]

    def app_spec(self, node: str | NodeSection) -> AppSpec:
        return self._apps[self._name(node)]

    def _name(self, node: str | NodeSection) -> str:
        return self.node(node if isinstance(node, str) else node.name).name

    def api_address(self, node: str | NodeSection) -> IPAddress | None:
        """Where `node`'s HTTP API listens; None when the file has no `[api]` section."""
        if self.api is None:
            return None
        net = self.api.network or self.networks[0].name
        return self.node(self._name(node)).address[net]

    def key(self) -> bytes:
        """The farm's shared HMAC key (see `key_bytes`)."""
        return key_bytes(self.farm.key_file.read_bytes())

    def next_key(self) -> bytes | None:
        """The key being rolled out (`farm.next_key_file`), or None."""
        path = self.farm.next_key_file
        return None if path is None else key_bytes(path.read_bytes())
