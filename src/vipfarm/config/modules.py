"""Application modules: where a module is found, how the farm file overrides it, macros.

Theory of operation
-------------------
A module is a directory (`modules/<name>/`) holding `module.toml` (defaults: scripts, checkers,
restart policy, macros) and its scripts. `[module] name = "x"` looks the module up in
`<config dir>/modules`, then in `default_module_path()` (`$VIPFARM_MODULE_PATH`, /etc,
/usr/local/share, /usr/share, and last the package's own `vipfarm/modules/`); `path = "dir"`
names the directory itself. `ModuleSection` merges the `[module]` section over those defaults:
tables merge key by key, everything else (including the list of checkers) replaces.

`resolve_app` then substitutes `${name}` macros, for one node, in script arguments and checker
fields, which yields the node's `vipfarm.supervisor.spec.AppSpec`. Built-in macros: `${vip}`
(first VIP), `${node}`, `${farm}`, `${module_dir}`; macro values may use the built-ins only;
`$$` is a literal `$`. Checkers are validated only after substitution, since a port may be
written `"${port}"`. A relative program that exists in the module directory runs from there,
anything else from PATH. Every macro except the built-ins also reaches the scripts as an
environment variable (`env_name`), next to `VIPFARM_FARM`, `VIPFARM_NODE`, `VIPFARM_VIPS` and
`VIPFARM_MODULE_DIR`.

The daemon runs the module's scripts as root, so the module directory, everything in it and
every directory above it must be owned by root and writable by nobody else
(`vipfarm.supervisor.scripts.untrusted`), and so must any other script given by absolute path:
the configuration refuses the module otherwise, naming the file and the `chmod`/`chown` that
fixes it. `module.toml` is read with a cap and must be a regular file.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails

from vipfarm.config.fields import MacroName, Strict, base_dir
from vipfarm.config.problems import Loc, error_at, raise_errors, relocate, under
from vipfarm.config.secrets import FileRefused, read_capped
from vipfarm.config.tomltext import TomlProblem, parse_toml
from vipfarm.datapath.spec import IPAddress
from vipfarm.supervisor.scripts import untrusted
from vipfarm.supervisor.spec import (
    CHECKER_TYPES,
    AppSpec,
    Argv,
    CheckerSpec,
    CommandCheck,
    RestartSpec,
    Seconds,
)

__all__ = [
    "PACKAGE_MODULES",
    "ModuleSection",
    "default_module_path",
    "env_name",
    "resolve_app",
    "substitute",
]


# The modules shipped inside the package (package data: src/vipfarm/modules in a checkout,
# site-packages/vipfarm/modules once installed): last, so that any copy an operator placed in a
# directory above overrides them.
PACKAGE_MODULES = Path(__file__).resolve().parents[1] / "modules"

MODULE_FILE_MAX_BYTES = 1024 * 1024
# Entries of a module directory checked for ownership and mode; a module has a handful.
MODULE_ENTRIES_CHECKED = 1000


def default_module_path() -> list[Path]:
    """Where `[module] name = "x"` is looked up, after `<config dir>/modules`."""
    env = [Path(p) for p in os.environ.get("VIPFARM_MODULE_PATH", "").split(":") if p]
    return [
        *env,
        Path("/etc/vipfarm/modules"),
        Path("/usr/local/share/vipfarm/modules"),
        Path("/usr/share/vipfarm/modules"),
        PACKAGE_MODULES,
    ]


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class ModuleSection(Strict):
    """`[module]` merged over the module's `module.toml`; macros are not substituted yet."""

    name: str = ""
    path: Path
    description: str = ""
    # Bounds: every macro and argument is substituted for every node, at load time.
    macros: dict[MacroName, str] = Field(default_factory=dict, max_length=256)
    start: Annotated[Argv, Field(max_length=256)]
    stop: Annotated[Argv, Field(max_length=256)]
    force_stop: Annotated[Argv, Field(max_length=256)] | None = None
    start_timeout_s: Seconds = AppSpec.model_fields["start_timeout_s"].default
    healthy_timeout_s: Seconds = AppSpec.model_fields["healthy_timeout_s"].default
    stop_timeout_s: Seconds = AppSpec.model_fields["stop_timeout_s"].default
    kill_timeout_s: Seconds = AppSpec.model_fields["kill_timeout_s"].default
    # Validated per node after macro substitution (a port may be written "${port}").
    checkers: list[dict[str, Any]] = Field(default_factory=list, alias="checker", max_length=64)
    restart: RestartSpec = RestartSpec()

    MODULE_FILE: ClassVar[str] = "module.toml"

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        base = base_dir(info)
        ctx = info.context if isinstance(info.context, dict) else {}
        search: list[Path] = [base / "modules", *(ctx.get("module_path") or default_module_path())]
        name, path = data.get("name"), data.get("path")
        if path is not None:
            directory = Path(str(path))
            directory = directory if directory.is_absolute() else base / directory
            loc: Loc = ("path",)
        elif isinstance(name, str) and name:
            if "/" in name or name.startswith(".") or "\0" in name:
                raise_errors(
                    [error_at(("name",), name, "a module name; use 'path' for a directory")]
                )
            found = [d / name for d in search if _is_file(d / name / cls.MODULE_FILE)]
            if not found:
                where = ", ".join(str(d) for d in search)
                raise_errors(
                    [error_at(("name",), name, f"a module found in one of: {where}; or set 'path'")]
                )
            directory, loc = found[0], ("name",)
        else:
            raise_errors(
                [error_at(("name",), name, "a module 'name' (generic, nginx, apache) or 'path'")]
            )
        file = directory / cls.MODULE_FILE
        shown = str(path or name)
        # Trust first: what a module file says is only worth reading if root can rely on it.
        if (why := _untrusted_module(directory)) is not None:
            raise_errors(
                [
                    error_at(
                        loc, None, f"a module that only root can change: {why}", show_value=False
                    )
                ]
            )
        try:
            text = read_capped(file, what="module file", max_bytes=MODULE_FILE_MAX_BYTES).decode()
            defaults = parse_toml(text)
        except FileRefused as exc:
            raise_errors(
                [error_at(loc, shown, f"a module directory with {cls.MODULE_FILE}: {exc}")]
            )
        except UnicodeDecodeError:
            raise_errors([error_at(loc, shown, f"a {file} in UTF-8")])
        except TomlProblem as exc:
            raise_errors([error_at(loc, shown, f"a valid {file}: {exc}")])
        for key in ("name", "path"):
            if key in defaults:
                raise_errors([error_at(loc, key, f"no '{key}' key inside {file}")])
        merged = _deep_merge(defaults, data)
        merged["name"] = name or directory.resolve().name
        merged["path"] = directory.resolve()
        return merged


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _untrusted_module(directory: Path) -> str | None:
    """Why root must not run this module's scripts (see `untrusted`): the directory, the ones
    above it, and what it holds (its scripts source each other)."""
    if (why := untrusted(directory)) is not None:
        return why
    try:
        with os.scandir(directory) as entries:
            for n, entry in enumerate(entries):
                if n >= MODULE_ENTRIES_CHECKED:
                    return f"{directory} holds more than {MODULE_ENTRIES_CHECKED} entries"
                if (why := untrusted(entry.path)) is not None:
                    return why
    except OSError as exc:
        return f"cannot list {directory} ({exc.strerror})"
    return None


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
# The application of one node


def resolve_app(mod: ModuleSection, *, farm: str, node: str, vips: Sequence[IPAddress]) -> AppSpec:
    """The application of node `node`: macros substituted, checkers validated. Raises
    ValidationError located at the keys of the farm file."""
    builtins = {
        "vip": str(vips[0]),
        "node": node,
        "farm": farm,
        "module_dir": str(mod.path),
    }
    errors: list[InitErrorDetails] = []
    macros = dict(builtins)
    for name, value in mod.macros.items():
        loc: Loc = ("module", "macros", name)
        if name in builtins:
            errors.append(error_at(loc, value, f"a macro name other than built-in '{name}'"))
            continue
        sub, bad = _substitute_tree(value, builtins, loc)
        for b in bad:
            errors.append(
                error_at(
                    loc,
                    value,
                    f"macro values to use only built-in macros ({', '.join(builtins)}), "
                    f"not ${{{b[-1]}}}",
                )
            )
        macros[name] = sub
    if errors:
        raise_errors(errors)

    raw: dict[str, Any] = {
        "start": mod.start,
        "stop": mod.stop,
        "force_stop": mod.force_stop,
        "checker": mod.checkers,
    }
    subst, bad = _substitute_tree(raw, macros, ("module",))
    for b in bad:
        errors.append(
            error_at(
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
            checkers.append(_checker(raw_checker, mod.path))
        except ValidationError as exc:
            errors += relocate(exc, under(("module", "checker", i)))
    for key in ("start", "stop", "force_stop"):
        if subst[key] is not None:
            subst[key] = _in_module(subst[key], mod.path)
            if (err := _not_executable(subst[key][0])) is not None:
                errors.append(error_at(("module", key), subst[key][0], err))
            elif os.path.isabs(subst[key][0]) and (why := untrusted(subst[key][0])):
                errors.append(
                    error_at(
                        ("module", key),
                        None,
                        f"a script only root can change: {why}",
                        show_value=False,
                    )
                )
    if errors:
        raise_errors(errors)
    env = {
        "VIPFARM_FARM": farm,
        "VIPFARM_NODE": node,
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


def _checker(raw: Any, module_dir: Path) -> CheckerSpec:
    if not isinstance(raw, dict):
        raise_errors([error_at((), raw, 'a table like { type = "tcp", port = 80 }')])
    kind = raw.get("type")
    cls = CHECKER_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise_errors([error_at(("type",), kind, f"one of {', '.join(CHECKER_TYPES)}")])
    try:
        checker = typing.cast(CheckerSpec, cls.model_validate(raw))
    except ValidationError as exc:
        raise_errors(relocate(exc, lambda loc: loc, root=cls))
    if isinstance(checker, CommandCheck):
        checker = checker.model_copy(update={"argv": _in_module(checker.argv, module_dir)})
        prog = checker.argv[0]
        if os.path.isabs(prog) and (why := untrusted(prog)) is not None:
            raise_errors(
                [
                    error_at(
                        ("argv",), None, f"a command only root can change: {why}", show_value=False
                    )
                ]
            )
    return checker


def _in_module(argv: list[str], module_dir: Path) -> list[str]:
    """A relative program that exists in the module directory runs from there; else from PATH."""
    prog = argv[0]
    if not os.path.isabs(prog) and _is_file(module_dir / prog):
        return [str(module_dir / prog), *argv[1:]]
    return argv


def _not_executable(prog: str) -> str | None:
    if "\0" in prog:
        return "a program name without a NUL byte"
    if os.path.isabs(prog) and os.path.exists(prog) and not os.access(prog, os.X_OK):
        return f"an executable script: chmod +x {prog}"
    return None
