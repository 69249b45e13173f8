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

The key, token and TLS key files are checked by `secret_file` (for a field validator, also the
one for any new secret key): `vipfarm.config.secrets.read_secret` (a regular file owned by root
with no group or other bits, read with a cap), a minimum length, printable ASCII for a token.
At most `MAX_RULES` rules on `MAX_VIPS` distinct VIPs.

Every problem of a round is reported at once (see `vipfarm.config.problems`); the built specs
are kept, so that `datapath_spec(node)` and `app_spec(node)` are lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from vipfarm.config.fields import Address, NetName, NodeName, Strict, base_dir
from vipfarm.config.modules import ModuleSection, resolve_app
from vipfarm.config.problems import ConfigError, Loc, Problem, error_at, raise_errors, relocate
from vipfarm.config.secrets import (
    FileRefused,
    a,
    create_hint,
    key_bytes,
    read_capped,
    read_secret,
)
from vipfarm.datapath.spec import Affinity, DatapathSpec, Delivery, IPAddress, Proto, Rule
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
    "secret_file",
]

KEY_MIN_BYTES = 32
TOKEN_MIN_BYTES = 16
# Caps on what is read of each file (see vipfarm.config.secrets): far above any real one, far
# below what would hurt; a bigger file is refused as not what its key says it is.
KEY_MAX_BYTES = 4096
TOKEN_MAX_BYTES = 4096  # it travels in an HTTP header
TLS_KEY_MAX_BYTES = 64 * 1024
PEM_MAX_BYTES = 4 * 1024 * 1024  # a CA bundle (the system's is about 200 KiB)
MAX_RULES = 16384
# Every VIP is on lo, answered by ARP/NDP, and listed in the scripts' VIPFARM_VIPS, one
# environment string, which the kernel caps at 128 KiB (MAX_ARG_STRLEN): 3,000 IPv6 VIPs.
MAX_VIPS = 1024


def _in_config_dir(path: Path, info: ValidationInfo) -> Path:
    return path if path.is_absolute() else base_dir(info) / path


def _refused(message: str) -> PydanticCustomError:
    # The message names the file and the fix; the value as written would only repeat it.
    return PydanticCustomError("vipfarm", "{expected}", {"expected": message, "show_value": False})


def secret_file(
    path: Path,
    info: ValidationInfo,
    *,
    what: str,
    min_bytes: int,
    max_bytes: int,
    text: bool = False,
) -> Path:
    """Validate a key, token or TLS key file named in the farm file (for a field validator):
    relative to the file's directory, a secret file (`vipfarm.config.secrets.read_secret`) of
    `min_bytes` to `max_bytes` (one final line ending excluded); `text`: printable ASCII only,
    as a bearer token must be. Returns the absolute path."""
    path = _in_config_dir(path, info)
    try:
        data = key_bytes(read_secret(path, what=what, max_bytes=max_bytes))
    except FileRefused as exc:
        raise _refused(str(exc)) from None
    if len(data) < min_bytes:
        raise _refused(
            f"{path} holds {len(data)} bytes: {a(what)} must be at least {min_bytes} random "
            f"bytes: create one with: {create_hint(path)}"
        )
    bad = next((i for i, b in enumerate(data) if not 0x21 <= b <= 0x7E), None) if text else None
    if bad is not None:
        raise _refused(
            f"{path} holds byte 0x{data[bad]:02x} at offset {bad}: {a(what)} must be printable "
            f"ASCII without spaces, as it travels in an HTTP header: create one with: "
            f"{create_hint(path)}"
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
    # How frames to a VIP reach the nodes (docs/CONFIG.md, "Delivery"): flood (the VMAC, which
    # the switch floods to every node), directed (an entry node forwards at layer 2) or auto
    # (chosen by a probe, the default: it works on any switch). A farm that still runs nodes of
    # a release without directed delivery answers in flood style until they are upgraded
    # (docs/PROTOCOL.md, versions).
    delivery: Delivery = Delivery.AUTO

    @field_validator("delivery", mode="before")
    @classmethod
    def _delivery(cls, value: object) -> object:
        if value not in {d.value for d in Delivery}:
            raise ValueError(f'{value!r} is not a delivery: write "flood", "directed" or "auto"')
        return value

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
        if path is None:
            return None
        return secret_file(
            path, info, what="farm key", min_bytes=KEY_MIN_BYTES, max_bytes=KEY_MAX_BYTES
        )


# Heartbeat interval, lease and dead_after (ms) per `timing.profile`. `default` fails over within
# about 250 ms: dead_after is 4 intervals (with two heartbeat networks and 5 % loss, four
# heartbeats in a row lost on both is a 1-in-10^10 event) and the lease leaves dead_after one
# interval of margin, against the pulse's worst measured scheduling delay of a few ms under a
# busy process per core (it runs SCHED_RR; docs/MEMBERSHIP.md, "Timers"). `tolerant` is the
# previous default, for hosts where the pulse cannot get a real-time priority; `wan` for
# heartbeat networks with tens of ms of jitter.
TIMING_PROFILES: dict[str, tuple[int, int, int]] = {
    "fast": (25, 75, 100),
    "default": (50, 150, 200),
    "tolerant": (100, 300, 500),
    "wan": (250, 750, 1250),
}


class TimingSection(Strict):
    profile: Literal["fast", "default", "tolerant", "wan"] = "default"
    interval_ms: int = Field(default=TIMING_PROFILES["default"][0], ge=10, le=10_000)
    dead_after_ms: int = Field(default=TIMING_PROFILES["default"][2], ge=20, le=600_000)
    lease_ms: int = Field(default=TIMING_PROFILES["default"][1], ge=10, le=600_000)

    @model_validator(mode="before")
    @classmethod
    def _from_profile(cls, data: Any) -> Any:
        """The profile gives every timer the configuration does not set itself."""
        if isinstance(data, dict):
            timers = TIMING_PROFILES.get(str(data.get("profile", "default")))
            if timers is not None:
                keys = ("interval_ms", "lease_ms", "dead_after_ms")
                data = {**dict(zip(keys, timers, strict=True)), **data}
        return data

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
    # Exempt the node's own traffic (not to or from a VIP) from conntrack (docs/CONFIG.md):
    # per node, as it changes the meaning of the host's own stateful firewall rules.
    notrack_other: bool = False
    # The BPF prefilter ahead of nftables (docs/DATAPATH.md): off only for a node whose tc
    # ingress must hold nothing but its own programs.
    prefilter: bool = True


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
    next_token_file: Path | None = None  # a rotation under way: accepted too, used first
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    metrics_public: bool = False
    # Limits (vipfarm.api.guard): what an unauthenticated caller can hold, and for how long.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    max_connections: int = Field(default=256, ge=4, le=65536)
    max_log_streams: int = Field(default=16, ge=0, le=1024)
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # At least 3: the nodes reuse their pooled connections to each other for 2 s.
    keepalive_timeout_s: int = Field(default=5, ge=3, le=3600)

    @field_validator("token_file", "next_token_file")
    @classmethod
    def _token_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        return secret_file(
            path,
            info,
            what="API token",
            min_bytes=TOKEN_MIN_BYTES,
            max_bytes=TOKEN_MAX_BYTES,
            text=True,
        )

    @field_validator("cert_file", "ca_file")
    @classmethod
    def _readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        path = _in_config_dir(path, info)
        try:
            read_capped(path, what="PEM certificate", max_bytes=PEM_MAX_BYTES)
        except FileRefused as exc:
            raise _refused(str(exc)) from None
        return path

    @field_validator("key_file")
    @classmethod
    def _tls_key(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        return secret_file(
            path, info, what="TLS private key", min_bytes=1, max_bytes=TLS_KEY_MAX_BYTES
        )

    @model_validator(mode="after")
    def _pair(self) -> ApiSection:
        if self.next_token_file is not None and self.next_token_file == self.token_file:
            raise_errors(
                [
                    error_at(
                        ("next_token_file",),
                        str(self.next_token_file),
                        "a file other than token_file (the next token of a rotation), or no "
                        "next_token_file",
                    )
                ]
            )
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
        """The bearer token callers must present (see `key_bytes`), read again with the checks
        of validation; raises FileRefused."""
        return key_bytes(read_secret(self.token_file, what="API token", max_bytes=TOKEN_MAX_BYTES))

    def next_token(self) -> bytes | None:
        """The next token of a rotation under way, accepted as well as `token()`."""
        if self.next_token_file is None:
            return None
        return key_bytes(
            read_secret(self.next_token_file, what="API token", max_bytes=TOKEN_MAX_BYTES)
        )


class FarmConfig(Strict):
    """A validated farm configuration. Build it with `load_config` or `parse_config`."""

    farm: FarmSection
    timing: TimingSection = TimingSection()
    networks: list[NetworkSection] = Field(alias="network", min_length=1, max_length=8)
    nodes: list[NodeSection] = Field(alias="node", min_length=1, max_length=32)
    rules: list[RuleSection] = Field(alias="rule", min_length=1, max_length=MAX_RULES)
    module: ModuleSection
    drain: DrainSection = DrainSection()
    api: ApiSection | None = None

    _apps: dict[str, AppSpec] = PrivateAttr(default_factory=dict)
    _specs: dict[str, DatapathSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> FarmConfig:
        errors = [
            *self._check_networks(),
            *self._check_nodes(),
            *self._check_api(),
            *self._check_vips(),
        ]
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

    def _check_vips(self) -> list[InitErrorDetails]:
        vips = {r.vip for r in self.rules}
        if len(vips) <= MAX_VIPS:
            return []
        return [
            error_at(
                ("rule",),
                None,
                f"at most {MAX_VIPS} distinct VIPs, not {len(vips)}: every VIP is held on lo "
                "and passed to the scripts in VIPFARM_VIPS",
                show_value=False,
            )
        ]

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
            "delivery": ("farm", "delivery"),
            "notrack_other": ("node", i, "notrack_other"),
            "prefilter": ("node", i, "prefilter"),
        }
        # The rules are the same on every node: checked (overlap included) with the first node
        # only, so that a file of thousands of rules is not checked 32 times over.
        first = self._specs.get(self.nodes[0].name) if i > 0 else None
        try:
            spec = DatapathSpec(
                farm=self.farm.name,
                interface=node.interface,
                rules=[r.rule for r in (self.rules if i == 0 else self.rules[:1])],
                buckets=self.farm.buckets,
                seed=self.farm.seed,
                lease_s=self.timing.lease_ms / 1000,
                delivery=self.farm.delivery,
                notrack_other=node.notrack_other,
                prefilter=node.prefilter,
            )
        except ValidationError as exc:
            return relocate(exc, lambda loc: spec_keys.get(str(loc[0]), loc))
        if i > 0:
            if first is None:
                return []  # the first node's spec failed: the file is refused with its errors
            spec = spec.model_copy(update={"rules": first.rules})
        self._specs[node.name] = spec
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
        """The farm's shared HMAC key (see `key_bytes`), read again with the checks of
        validation; raises FileRefused."""
        return key_bytes(read_secret(self.farm.key_file, what="farm key", max_bytes=KEY_MAX_BYTES))

    def next_key(self) -> bytes | None:
        """The key being rolled out (`farm.next_key_file`), or None; raises FileRefused."""
        path = self.farm.next_key_file
        if path is None:
            return None
        return key_bytes(read_secret(path, what="farm key", max_bytes=KEY_MAX_BYTES))
