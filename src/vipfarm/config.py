"""Farm configuration: one TOML file per farm, identical on every node.

Theory of operation
-------------------
`load_config(path)` reads the file with `tomllib` and validates it with pydantic models that
forbid unknown keys, so a misspelt key is an error rather than a silent default. Validation runs
in two rounds: first every section on its own (types, ranges), then, once those all passed, the
checks that need several sections at once (node addresses against the declared networks, rule
overlap, the per-node data path spec, macro substitution in the module). Every problem found in a
round is reported, each as `key.path[index].field: bad value 'x': expected ...`, in one
`ConfigError`; nothing is applied by loading, so a bad file changes nothing.

Rules are converted to `vipfarm.datapath.spec.Rule` and the data path of each node is checked by
building its `vipfarm.datapath.spec.DatapathSpec`: the bounds and the overlap check live there only,
and their errors are mapped back onto the keys of this file (`port` -> `ports`, `lease_s` ->
`timing.lease_ms`).

The application module is a directory (`modules/<name>/`) holding `module.toml` (defaults:
scripts, checkers, restart policy, macros) and its scripts. The `[module]` section of the farm file
is merged over those defaults: tables merge key by key, everything else (including the list of
checkers) replaces. Then, for every node, `${name}` macros are substituted in script arguments and
checker fields, which yields the node's `AppSpec`, the input of `vipfarm.supervisor`. Built-in
macros: `${vip}` (first VIP), `${node}`, `${farm}`, `${module_dir}`; macro values may use the
built-ins only; `$$` is a literal `$`. Substituting for every node at load time means an unknown
macro or a checker field that is not valid after substitution is reported by `vipfarm config
check`, not at 3 a.m. when a node starts.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from vipfarm.datapath.spec import Affinity, DatapathSpec, IPAddress, Proto, Rule

__all__ = [
    "ApiSection",
    "AppSpec",
    "CheckerSpec",
    "CommandCheck",
    "ConfigError",
    "FarmConfig",
    "HttpCheck",
    "LinkCheck",
    "ModuleSection",
    "NodeSection",
    "Problem",
    "ProcessCheck",
    "RestartSpec",
    "TcpCheck",
    "load_config",
    "local_addresses",
    "parse_config",
]

KEY_MIN_BYTES = 32
TOKEN_MIN_BYTES = 16

Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where (`farm.buckets`) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Every problem of one configuration file; `str()` lists them one per line."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


def _error(loc: Loc, value: object, expected: str, *, show_value: bool = True) -> InitErrorDetails:
    """A located error for `ValidationError.from_exception_data`; pydantic prefixes `loc` with
    the location of the model whose validator raises it."""
    ctx = {"expected": expected, "show_value": show_value}
    return InitErrorDetails(
        type=PydanticCustomError("vipfarm", "{expected}", ctx), loc=loc, input=value
    )


def _raise(errors: Sequence[InitErrorDetails]) -> NoReturn:
    raise ValidationError.from_exception_data("vipfarm configuration", list(errors))


def _relocate(
    exc: ValidationError,
    mapper: typing.Callable[[Loc], Loc],
    root: type[BaseModel] | None = None,
) -> list[InitErrorDetails]:
    """Re-express the errors of an inner validation (Rule, DatapathSpec, a checker) at the keys
    of this file, keeping their message; `root` is the inner model, to list its keys."""
    return [
        _error(mapper(tuple(e["loc"])), None, _problem(e, root).message, show_value=False)
        for e in exc.errors(include_url=False)
    ]


def _under(prefix: Loc) -> typing.Callable[[Loc], Loc]:
    return lambda loc: (*prefix, *loc)


def _fmt_value(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(e: Mapping[str, Any]) -> str:
    """The `expected ...` half of a message, from a pydantic error."""
    ctx = e.get("ctx") or {}
    if e["type"] == "vipfarm":
        return str(ctx["expected"])
    msg = str(e["msg"])
    for prefix, replacement in _MSG_PREFIXES:
        if msg.startswith(prefix):
            return replacement + msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


_MSG_PREFIXES = (
    ("Input should be ", ""),
    ("Value error, ", ""),
    ("String should have ", "a string with "),
    ("String should match pattern ", "a string matching "),
    ("List should have ", "a list with "),
    ("Dictionary should have ", "a table with "),
)


def _path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (the key itself)"
        else:
            out += ("." if out else "") + part
    return out


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class found by following `loc` (TOML key names) from `root`."""
    tp: Any = root
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            by_key = {f.alias or n: f.annotation for n, f in tp.model_fields.items()}
            if not isinstance(part, str) or part not in by_key:
                return None
            tp = by_key[part]
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict and isinstance(part, str):
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _problem(e: Mapping[str, Any], root: type[BaseModel] | None) -> Problem:
    loc = tuple(e["loc"])
    path = _path(loc)
    if e["type"] == "missing":
        return Problem(path, "required key is missing")
    if e["type"] == "extra_forbidden":
        model = _model_at(root, loc[:-1]) if root else None
        if model is None:
            return Problem(path, "unknown key")
        keys = _keys_of(model)
        hint = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        dym = f" (did you mean '{hint[0]}'?)" if hint else ""
        return Problem(path, f"unknown key{dym}: expected one of {', '.join(keys)}")
    ctx = e.get("ctx") or {}
    value = e.get("input")
    # A whole table or list as "bad value" would drown the message; the path names it.
    show = ctx.get("show_value", True) and not isinstance(value, dict | list)
    expected = _expected(e)
    if show:
        return Problem(path, f"bad value {_fmt_value(value)}: expected {expected}")
    return Problem(path, expected)


def _problems(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    out: list[Problem] = []
    for e in exc.errors(include_url=False):
        p = _problem(e, root)
        if p not in out:
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# Small types


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_argv(value: object) -> object:
    """A command may be written as one string (split like a shell would) or a list."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"a command line that splits like a shell one ({exc})") from None
    return value


def _ip(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address, e.g. 198.51.100.100 or 2001:db8::100") from None


# One validator instead of pydantic's IPv4|IPv6 union, which reports two errors per bad address.
Address = Annotated[IPAddress, PlainValidator(_ip)]
Argv = Annotated[list[str], BeforeValidator(_split_argv), Field(min_length=1)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
MacroName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
NodeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
NetName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,15}$")]


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, dict) else {}
    return Path(ctx.get("base_dir") or Path.cwd())


# --------------------------------------------------------------------------------------------
# Checkers and the resolved application spec (what the supervisor consumes)


class _CheckBase(_Strict):
    name: str = Field(default="", description="label in logs; derived from the target if empty")
    interval_s: Seconds = 2.0
    timeout_s: Seconds = 1.0
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)

    @property
    def label(self) -> str:
        return self.name or self._target()

    def _target(self) -> str:
        raise NotImplementedError


class TcpCheck(_CheckBase):
    """Healthy when a TCP connection to host:port opens."""

    type: Literal["tcp"] = "tcp"
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    def _target(self) -> str:
        return f"tcp:{self.host}:{self.port}"


class HttpCheck(_CheckBase):
    """Healthy when GET url answers expect_status and, if set, the body contains expect_body."""

    type: Literal["http"] = "http"
    url: str
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_body: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"an http:// URL ({exc})") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("an http:// URL with a host, e.g. http://127.0.0.1:80/")
        return url

    def _target(self) -> str:
        return f"http:{self.url}"


class ProcessCheck(_CheckBase):
    """Healthy when a process with this name runs, or the PID in pidfile is alive."""

    type: Literal["process"] = "process"
    process: str | None = Field(default=None, min_length=1)
    pidfile: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ProcessCheck:
        if (self.process is None) == (self.pidfile is None):
            _raise([_error((), "", "exactly one of 'process' or 'pidfile'", show_value=False)])
        return self

    def _target(self) -> str:
        return f"process:{self.process or self.pidfile}"


class CommandCheck(_CheckBase):
    """Healthy when the command exits 0 within timeout_s."""

    type: Literal["command"] = "command"
    argv: Argv

    def _target(self) -> str:
        return f"command:{Path(self.argv[0]).name}"


class LinkCheck(_CheckBase):
    """Healthy when the interface's operstate is up."""

    type: Literal["link"] = "link"
    interface: str = Field(min_length=1, max_length=15)

    def _target(self) -> str:
        return f"link:{self.interface}"


CheckerSpec = TcpCheck | HttpCheck | ProcessCheck | CommandCheck | LinkCheck
CHECKER_TYPES: dict[str, type[_CheckBase]] = {
    "tcp": TcpCheck,
    "http": HttpCheck,
    "process": ProcessCheck,
    "command": CommandCheck,
    "link": LinkCheck,
}


class RestartSpec(_Strict):
    """At most `max` restarts within `within_s` seconds; then the node leaves the farm."""

    max: int = Field(default=3, ge=0, le=1000)
    within_s: Seconds = 300.0


class AppSpec(_Strict):
    """The application of one node, macros substituted: what `vipfarm.supervisor` runs."""

    module: str
    directory: Path
    env: dict[str, str] = Field(default_factory=dict)
    start: Argv
    stop: Argv
    force_stop: Argv | None = None
    start_timeout_s: Seconds = 60.0
    healthy_timeout_s: Seconds = 60.0
    stop_timeout_s: Seconds = 30.0
    kill_timeout_s: Seconds = 10.0
    checkers: list[CheckerSpec] = Field(default_factory=list)
    restart: RestartSpec = RestartSpec()


# --------------------------------------------------------------------------------------------
# The file's sections


def key_bytes(data: bytes) -> bytes:
    """The key in a key file: its bytes without one final line ending, so that a key written
    with or without a newline by an editor is the same key; binary keys work too."""
    for ending in (b"\r\n", b"\n"):
        if data.endswith(ending):
            return data[: -len(ending)]
    return data


def _in_config_dir(path: Path, info: ValidationInfo) -> Path:
    return path if path.is_absolute() else _base_dir(info) / path


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


class FarmSection(_Strict):
    name: str
    key_file: Path
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

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, path: Path, info: ValidationInfo) -> Path:
        return _secret_file(path, info, "key", KEY_MIN_BYTES)


class TimingSection(_Strict):
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
                _error(
                    ("lease_ms",),
                    self.lease_ms,
                    f"less than dead_after_ms ({self.dead_after_ms}): lower lease_ms or "
                    "raise dead_after_ms",
                )
            )
        if self.interval_ms >= self.lease_ms:
            errors.append(
                _error(
                    ("interval_ms",),
                    self.interval_ms,
                    f"less than lease_ms ({self.lease_ms}): lower interval_ms or raise lease_ms",
                )
            )
        if errors:
            _raise(errors)
        return self


class NetworkSection(_Strict):
    name: NetName
    port: int = Field(default=9001, ge=1, le=65535)


class NodeSection(_Strict):
    name: NodeName
    weight: int = Field(default=100, ge=0, le=65535)
    interface: str = "eth0"
    address: dict[str, Address] = Field(min_length=1)


def _ports_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


_PORTS_RE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")
_RULE_KEY = {"port": "ports", "port_end": "ports", "prefix4": "prefix", "prefix6": "prefix"}


class RuleSection(_Strict):
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
                _error(("ports",), self.ports, "a port like '80' or a range like '8000-8100'")
            )
        if self.prefix is not None and self.affinity != Affinity.CLIENT_SUBNET:
            errors.append(
                _error(("prefix",), self.prefix, "no prefix unless affinity = 'client-subnet'")
            )
        if errors or m is None:
            _raise(errors)
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
            _raise(
                _relocate(
                    exc, lambda loc: (_RULE_KEY.get(str(loc[0]), str(loc[0])) if loc else "ports",)
                )
            )
        return self

    @property
    def rule(self) -> Rule:
        return self._rule


class DrainSection(_Strict):
    timeout_s: float = Field(default=30.0, ge=0, le=86400)


class ApiSection(_Strict):
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
            _raise(
                [
                    _error(
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


def default_module_path() -> list[Path]:
    """Where `[module] name = "x"` is looked up, after `<config dir>/modules`."""
    env = [Path(p) for p in os.environ.get("VIPFARM_MODULE_PATH", "").split(":") if p]
    return [
        *env,
        Path("/etc/vipfarm/modules"),
        Path("/usr/local/share/vipfarm/modules"),
        Path("/usr/share/vipfarm/modules"),
        # A source checkout: src/vipfarm/config.py -> <repo>/modules.
        Path(__file__).resolve().parents[2] / "modules",
    ]


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class ModuleSection(_Strict):
    """`[module]` merged over the module's `module.toml`; macros are not substituted yet."""

    name: str = ""
    path: Path
    description: str = ""
    macros: dict[MacroName, str] = Field(default_factory=dict)
    start: Argv
    stop: Argv
    force_stop: Argv | None = None
    start_timeout_s: Seconds = AppSpec.model_fields["start_timeout_s"].default
    healthy_timeout_s: Seconds = AppSpec.model_fields["healthy_timeout_s"].default
    stop_timeout_s: Seconds = AppSpec.model_fields["stop_timeout_s"].default
    kill_timeout_s: Seconds = AppSpec.model_fields["kill_timeout_s"].default
    # Validated per node after macro substitution (a port may be written "${port}").
    checkers: list[dict[str, Any]] = Field(default_factory=list, alias="checker")
    restart: RestartSpec = RestartSpec()

    MODULE_FILE: ClassVar[str] = "module.toml"

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        base = _base_dir(info)
        ctx = info.context if isinstance(info.context, dict) else {}
        search: list[Path] = [base / "modules", *(ctx.get("module_path") or default_module_path())]
        name, path = data.get("name"), data.get("path")
        if path is not None:
            directory = Path(str(path))
            directory = directory if directory.is_absolute() else base / directory
            loc: Loc = ("path",)
        elif isinstance(name, str) and name:
            if "/" in name or name.startswith("."):
                _raise([_error(("name",), name, "a module name; use 'path' for a directory")])
            found = [d / name for d in search if (d / name / cls.MODULE_FILE).is_file()]
            if not found:
                where = ", ".join(str(d) for d in search)
                _raise(
                    [_error(("name",), name, f"a module found in one of: {where}; or set 'path'")]
                )
            directory, loc = found[0], ("name",)
        else:
            _raise([_error(("name",), name, "a module 'name' (generic, nginx, apache) or 'path'")])
        file = directory / cls.MODULE_FILE
        try:
            defaults = tomllib.loads(file.read_text())
        except OSError as exc:
            _raise([_error(loc, str(path or name), f"a module directory with {file} ({exc})")])
        except tomllib.TOMLDecodeError as exc:
            _raise([_error(loc, str(path or name), f"a valid {file}: {exc}")])
        for key in ("name", "path"):
            if key in defaults:
                _raise([_error(loc, key, f"no '{key}' key inside {file}")])
        merged = _deep_merge(defaults, data)
        merged["name"] = name or directory.resolve().name
        merged["path"] = directory.resolve()
        return merged


# --------------------------------------------------------------------------------------------
# Macros

_MACRO_RE = re.compile(r"\$\$|\$\{([^}]*)\}")


class _UnknownMacro(Exception):
    pass


def substitute(text: str, macros: Mapping[str, str]) -> str:
    """Replace `${name}` by its value and `$$` by `$`; anything else is left as it is."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        if name not in macros:
            raise _UnknownMacro(name)
        return macros[name]

    return _MACRO_RE.sub(repl, text)


def _substitute_tree(value: Any, macros: Mapping[str, str], loc: Loc) -> tuple[Any, list[Loc]]:
    """Substitute in every string of a TOML value; return it and the locations of unknown macros
    (each as loc + (name,), the macro name last)."""
    if isinstance(value, str):
        try:
            return substitute(value, macros), []
        except _UnknownMacro as exc:
            return value, [(*loc, str(exc))]
    if isinstance(value, list):
        out, bad = [], []
        for i, v in enumerate(value):
            sv, b = _substitute_tree(v, macros, (*loc, i))
            out.append(sv)
            bad += b
        return out, bad
    if isinstance(value, dict):
        outd, bad = {}, []
        for k, v in value.items():
            sv, b = _substitute_tree(v, macros, (*loc, k))
            outd[k] = sv
            bad += b
        return outd, bad
    return value, []


def env_name(macro: str) -> str:
    return "VIPFARM_M_" + macro.upper()


# --------------------------------------------------------------------------------------------
# The whole file


class FarmConfig(_Strict):
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
            _raise(errors)  # repeats (one per node) are merged by _problems
        return self

    def _check_networks(self) -> list[InitErrorDetails]:
        errors = []
        seen: set[str] = set()
        for i, net in enumerate(self.networks):
            if net.name in seen:
                errors.append(_error(("network", i, "name"), net.name, "a unique network name"))
            seen.add(net.name)
        return errors

    def _check_api(self) -> list[InitErrorDetails]:
        nets = [n.name for n in self.networks]
        if self.api is None or self.api.network is None or self.api.network in nets:
            return []
        return [
            _error(
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
                errors.append(_error(("node", i, "name"), node.name, "a unique node name"))
            names.add(node.name)
            for net in nets:
                if net not in node.address:
                    errors.append(
                        _error(
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
                        _error(
                            loc,
                            None,
                            f"unknown network '{net}': expected one of {', '.join(nets)}",
                            show_value=False,
                        )
                    )
                    continue
                if addr in owner:
                    errors.append(
                        _error(loc, str(addr), f"an address not already used ({owner[addr]})")
                    )
                owner[addr] = f"{node.name}.{net}"
                first = family.setdefault(net, (addr.version, node.name))
                if first[0] != addr.version:
                    errors.append(
                        _error(
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
            return _relocate(exc, lambda loc: spec_keys.get(str(loc[0]), loc))
        try:
            self._apps[node.name] = self._resolve_app(node)
        except ValidationError as exc:
            return _relocate(exc, lambda loc: loc)
        return []

    def _resolve_app(self, node: NodeSection) -> AppSpec:
        mod = self.module
        vips = self.vips
        builtins = {
            "vip": str(vips[0]),
            "node": node.name,
            "farm": self.farm.name,
            "module_dir": str(mod.path),
        }
        errors: list[InitErrorDetails] = []
        macros = dict(builtins)
        for name, value in mod.macros.items():
            loc: Loc = ("module", "macros", name)
            if name in builtins:
                errors.append(_error(loc, value, f"a macro name other than built-in '{name}'"))
                continue
            sub, bad = _substitute_tree(value, builtins, loc)
            for b in bad:
                errors.append(
                    _error(
                        loc,
                        value,
                        f"macro values to use only built-in macros ({', '.join(builtins)}), "
                        f"not ${{{b[-1]}}}",
                    )
                )
            macros[name] = sub
        if errors:
            _raise(errors)

        raw: dict[str, Any] = {
            "start": mod.start,
            "stop": mod.stop,
            "force_stop": mod.force_stop,
            "checker": mod.checkers,
        }
        subst, bad = _substitute_tree(raw, macros, ("module",))
        for b in bad:
            errors.append(
                _error(
                    b[:-1],
                    None,
                    f"unknown macro ${{{b[-1]}}}: expected one of {', '.join(macros)}; "
                    "or define it under [module.macros]",
                    show_value=False,
                )
            )
        checkers: list[CheckerSpec] = []
        for i, raw_checker in enumerate(subst["checker"]):
            if any(b[:3] == ("module", "checker", i) for b in bad):
                continue  # already reported; its fields would only fail again
            try:
                checkers.append(self._checker(raw_checker, mod.path))
            except ValidationError as exc:
                errors += _relocate(exc, _under(("module", "checker", i)))
        for key in ("start", "stop", "force_stop"):
            if subst[key] is not None:
                subst[key] = _in_module(subst[key], mod.path)
                if (err := _not_executable(subst[key][0])) is not None:
                    errors.append(_error(("module", key), subst[key][0], err))
        if errors:
            _raise(errors)
        env = {
            "VIPFARM_FARM": self.farm.name,
            "VIPFARM_NODE": node.name,
            "VIPFARM_VIPS": " ".join(str(v) for v in vips),
            "VIPFARM_MODULE_DIR": str(mod.path),
        }
        env |= {env_name(k): v for k, v in macros.items() if k not in builtins}
        return AppSpec(
            module=mod.name,
            directory=mod.path,
            env=env,
            start=subst["start"],
            stop=subst["stop"],
            force_stop=subst["force_stop"],
            start_timeout_s=mod.start_timeout_s,
            healthy_timeout_s=mod.healthy_timeout_s,
            stop_timeout_s=mod.stop_timeout_s,
            kill_timeout_s=mod.kill_timeout_s,
            checkers=checkers,
            restart=mod.restart,
        )

    @staticmethod
    def _checker(raw: Any, module_dir: Path) -> CheckerSpec:
        if not isinstance(raw, dict):
            _raise([_error((), raw, 'a table like { type = "tcp", port = 80 }')])
        kind = raw.get("type")
        cls = CHECKER_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            _raise([_error(("type",), kind, f"one of {', '.join(CHECKER_TYPES)}")])
        try:
            checker = typing.cast(CheckerSpec, cls.model_validate(raw))
        except ValidationError as exc:
            _raise(_relocate(exc, lambda loc: loc, root=cls))
        if isinstance(checker, CommandCheck):
            checker = checker.model_copy(update={"argv": _in_module(checker.argv, module_dir)})
        return checker

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


def _in_module(argv: list[str], module_dir: Path) -> list[str]:
    """A relative program that exists in the module directory runs from there; else from PATH."""
    prog = argv[0]
    if not os.path.isabs(prog) and (module_dir / prog).is_file():
        return [str(module_dir / prog), *argv[1:]]
    return argv


def _not_executable(prog: str) -> str | None:
    if os.path.isabs(prog) and os.path.exists(prog) and not os.access(prog, os.X_OK):
        return f"an executable script: chmod +x {prog}"
    return None


# --------------------------------------------------------------------------------------------
# Entry points


def parse_config(
    text: str,
    *,
    base_dir: Path,
    source: str = "<config>",
    module_path: Sequence[Path] | None = None,
) -> FarmConfig:
    """Validate TOML text; relative paths resolve against base_dir. Raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"line {m.group(1)}, column {m.group(2)}" if m else ""
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(source, [Problem(where, f"TOML syntax error: {msg}")]) from None
    context = {"base_dir": base_dir, "module_path": list(module_path or default_module_path())}
    try:
        return FarmConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc, FarmConfig)) from None


def load_config(path: Path | str, *, module_path: Sequence[Path] | None = None) -> FarmConfig:
    """Read and validate a farm file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read the file: {exc}")]) from None
    return parse_config(
        text, base_dir=path.resolve().parent, source=str(path), module_path=module_path
    )


def local_addresses() -> set[IPAddress]:
    """Every address configured on this host's interfaces (read-only netlink dump).

    Raises OSError when netlink cannot be read."""
    from pyroute2 import IPRoute, NetlinkError

    out: set[IPAddress] = set()
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS")
                if addr:
                    out.add(ipaddress.ip_address(addr.split("%")[0]))
    except NetlinkError as exc:
        raise OSError(f"cannot list local addresses: {exc}") from None
    return out
