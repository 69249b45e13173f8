"""`vipfarm init`: write a complete, valid farm, from flags or by asking.

Theory of operation
-------------------
The plan of the farm comes from flags or, when none of the farm's flags is given and the input
is a terminal, from prompts (rich), each answer parsed at once by `vipfarm.install.farm` and
asked again when it is refused. Then the command makes the heartbeat key and the API token
(32 random bytes each), by default the farm CA and a certificate per node
(`vipfarm.install.pki`), and writes the bundle into a hidden staging directory inside `--dir`:

    DIR/nodes/NODE/   the complete /etc/vipfarm of that node (farm file, key, token, TLS files)
    DIR/ca/           the farm CA's key and certificate: keep them off the nodes

Each node's directory is then loaded exactly as `vipfarm config check FILE --node NODE` loads
it; only when every node passes is the staging directory moved into place, so a refused input
or a failed check leaves DIR as it was. `--node NAME` also installs NAME's files into `--etc`
(/etc/vipfarm), for the server `init` runs on. Last, it prints the commands that follow.

`--add-node NAME=ADDR,...` grows a bundle that `init` wrote: it reads the farm from the first
node's directory, parses the new node against its networks and nodes, signs the node's
certificate with the kept CA (DIR/ca/, `vipfarm.install.pki.sign_node`), and stages the new
node's directory (the farm's key and token, the CA's certificate, its own pair) and every node's
farm file with the node's `[[node]]` table appended. Every node's directory is loaded as
`config check` does before anything is replaced; then the farm files are replaced one by one
(atomically each) and the new directory moved in. The node list changes only with a restart of
every daemon (a deployment refuses it), so it prints that procedure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from vipfarm.datapath.spec import IPAddress
    from vipfarm.install.farm import FarmPlan, FileSpec

EXIT_INVALID = 2
T = TypeVar("T")


def init(
    farm: str | None = typer.Option(None, "--farm", help="farm name, e.g. web"),
    network: list[str] = typer.Option(
        [], "--network", metavar="NAME[:PORT]", help="a heartbeat network (repeat; default lan)"
    ),
    host: list[str] = typer.Option(
        [],
        "--host",
        metavar="NAME=ADDR[,ADDR...]",
        help="a node and its address on each --network, in order (repeat)",
    ),
    vip: list[str] = typer.Option([], "--vip", metavar="ADDR", help="a virtual IP (repeat)"),
    rule: list[str] = typer.Option(
        [],
        "--rule",
        metavar="[VIP=]PROTO/PORTS[/AFFINITY[:PREFIX]]",
        help="a balanced service, e.g. tcp/443/client-ip (repeat; default tcp/80)",
    ),
    module: str = typer.Option("nginx", "--module", help="the application module"),
    macro: list[str] = typer.Option(
        [], "--macro", metavar="NAME=VALUE", help="a macro of the module (repeat)"
    ),
    interface: str = typer.Option("eth0", "--interface", help="every node's LAN interface"),
    api_port: int = typer.Option(9010, "--api-port", min=1, max=65535, help="the API's port"),
    no_tls: bool = typer.Option(
        False, "--no-tls", help="plain-HTTP API: no farm CA, no certificates"
    ),
    directory: Path = typer.Option(
        Path("."), "--dir", help="where the bundle goes (nodes/NODE/ and ca/)"
    ),
    node: str | None = typer.Option(
        None, "--node", help="this server is NODE: also install its files into --etc"
    ),
    etc: Path = typer.Option(
        Path("/etc/vipfarm"), "--etc", help="the configuration directory --node installs into"
    ),
    add_node: str | None = typer.Option(
        None,
        "--add-node",
        metavar="NAME=ADDR[,ADDR...]",
        help="add a node to the farm already in --dir: its certificate from the kept CA (ca/), "
        "the farm's key and token, and the node in every node's farm file",
    ),
) -> None:
    """Write a new farm: its file, key, API token and TLS certificates for every node.

    Without --farm, --host and --vip it asks for each part of the farm. It writes
    DIR/nodes/NODE/, the complete /etc/vipfarm of each node, and DIR/ca/, the farm CA (keep its
    key off the nodes); each node's files are checked as `vipfarm config check` does before
    anything is moved into place. Example: vipfarm init --farm web --network lan --network hb2
    --host node1=198.51.100.11,192.0.2.11 --host node2=198.51.100.12,192.0.2.12
    --vip 198.51.100.100 --rule tcp/80/client-ip-port
    """
    from rich.console import Console

    from vipfarm.install.farm import InitInputError

    out, err = Console(), Console(stderr=True)
    if add_node is not None:
        if farm or host or vip or network or rule or macro or node:
            err.print(
                "error: --add-node: adds to the farm in --dir; give no other farm flag (its "
                "networks, interface and files come from the farm)",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(EXIT_INVALID)
        _add_node(out, err, add_node, directory)
        return
    interactive = not (farm or host or vip) and _stdin_is_tty()
    try:
        if interactive:
            plan = _ask(out, module=module, tls=not no_tls)
        else:
            plan = _from_flags(
                farm, network, host, vip, rule, module, macro, interface, api_port, not no_tls
            )
        if node is not None and node not in {n.name for n in plan.nodes}:
            names = ", ".join(n.name for n in plan.nodes)
            raise InitInputError("--node", node, f"one of the farm's nodes: {names}")
    except InitInputError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    _write(out, err, plan, directory, node, etc)


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _missing(flag: str, example: str) -> None:
    from vipfarm.install.farm import InitInputError

    raise InitInputError(flag, "", f"at least one {flag}, e.g. {flag} {example}")


def _from_flags(
    farm: str | None,
    network: list[str],
    host: list[str],
    vip: list[str],
    rule: list[str],
    module: str,
    macro: list[str],
    interface: str,
    api_port: int,
    tls: bool,
) -> FarmPlan:
    from vipfarm.install import farm as f

    if not farm:
        raise f.InitInputError("--farm", "", "a farm name, e.g. --farm web")
    name = f.parse_farm_name(farm)
    nets: list[f.NetworkPlan] = []
    for text in network or ["lan"]:
        nets.append(f.parse_network(text, nets))
    nodes: list[f.NodePlan] = []
    for text in host:
        nodes.append(f.parse_node(text, nets, nodes))
    if not nodes:
        _missing("--host", "node1=198.51.100.11")
    vips: list[IPAddress] = []
    for text in vip:
        vips.append(f.parse_vip(text, vips))
    if not vips:
        _missing("--vip", "198.51.100.100")
    rules = [f.parse_rule(text) for text in rule or ["tcp/80"]]
    module = _parse_module(module, _modules_found())
    macros = dict(f.parse_macro(text) for text in macro)
    return f.FarmPlan(
        farm=name,
        networks=tuple(nets),
        nodes=tuple(nodes),
        vips=tuple(vips),
        rules=tuple(rules),
        module=module,
        macros=macros,
        interface=f.parse_interface(interface),
        api_port=api_port,
        tls=tls,
    )


def _modules_found() -> list[str]:
    """The modules `[module] name = ...` can name on this host (the loader's search path)."""
    from vipfarm.config.modules import default_module_path

    return sorted(
        {p.name for d in default_module_path() if d.is_dir() for p in d.iterdir()
         if (p / "module.toml").is_file()}
    )  # fmt: skip


def _parse_module(text: str, found: list[str]) -> str:
    from vipfarm.config.modules import default_module_path
    from vipfarm.install.farm import InitInputError

    if text not in found:
        where = ", ".join(str(d) for d in default_module_path())
        raise InitInputError("--module", text, f"one of {', '.join(found)} (from {where})")
    return text


def _ask_one(out: Console, question: str, parse: Callable[[str], T], default: str) -> T:
    """Ask until `parse` accepts the answer; its refusal is shown as it is."""
    from rich.markup import escape
    from rich.prompt import Prompt

    from vipfarm.install.farm import InitInputError

    while True:
        answer = Prompt.ask(escape(question), console=out, default=default)
        try:
            return parse(answer or "")
        except InitInputError as exc:
            out.print(f"[red]{escape(exc.expected)}[/]", highlight=False)


def _ask_many(
    out: Console, question: str, parse: Callable[[str, list[T]], T], first: str
) -> list[T]:
    """Ask for values one by one, each parsed against the ones already given; an empty answer
    ends the list once it has one value."""
    from rich.markup import escape
    from rich.prompt import Prompt

    from vipfarm.install.farm import InitInputError

    values: list[T] = []
    while True:
        if values:
            answer = Prompt.ask(
                escape(f"{question} (empty: done)"), console=out, default="", show_default=False
            )
            if not answer:
                return values
        else:
            answer = Prompt.ask(escape(question), console=out, default=first)
        try:
            values.append(parse(answer or "", values))
        except InitInputError as exc:
            out.print(f"[red]{escape(exc.expected)}[/]", highlight=False)


def _ask(out: Console, *, module: str, tls: bool) -> FarmPlan:
    from rich.markup import escape
    from rich.prompt import Confirm, Prompt

    from vipfarm.install import farm as f

    out.print("[bold]A new vipfarm farm.[/] Defaults are in brackets; Enter takes them.")
    name = _ask_one(out, "Farm name", f.parse_farm_name, "web")
    nets = _ask_many(out, "Heartbeat network NAME[:PORT]", f.parse_network, "lan")
    example = ",".join(["198.51.100.11", *(f"192.0.{i + 1}.11" for i in range(1, len(nets)))])
    nodes = _ask_many(
        out,
        f"Node NAME=ADDR (one address per network: {', '.join(n.name for n in nets)})",
        lambda t, given: f.parse_node(t, nets, given),
        f"node1={example}",
    )
    vips = _ask_many(out, "VIP", f.parse_vip, "198.51.100.100")
    rules = _ask_many(
        out, "Rule PROTO/PORTS[/AFFINITY]", lambda t, _given: f.parse_rule(t), "tcp/80"
    )
    found = _modules_found()

    def parse_module(text: str) -> str:
        return _parse_module(text, found)

    mod = _ask_one(out, f"Module ({', '.join(found)})", parse_module, module)
    macros: dict[str, str] = {}
    out.print("Macros of the module, NAME=VALUE (its README lists them; e.g. port=80).")
    while True:
        answer = Prompt.ask("Macro (empty: done)", console=out, default="", show_default=False)
        if not answer:
            break
        try:
            k, v = f.parse_macro(answer)
            macros[k] = v
        except f.InitInputError as exc:
            out.print(f"[red]{escape(exc.expected)}[/]", highlight=False)
    iface = _ask_one(out, "LAN interface of every node", f.parse_interface, "eth0")
    api_port = _ask_one(out, "API port", lambda t: f.parse_port(t, "--api-port"), "9010")
    use_tls = Confirm.ask("HTTPS between nodes (a farm CA, a certificate per node)", default=tls)
    return f.FarmPlan(
        farm=name,
        networks=tuple(nets),
        nodes=tuple(nodes),
        vips=tuple(vips),
        rules=tuple(rules),
        module=mod,
        macros=macros,
        interface=iface,
        api_port=api_port,
        tls=use_tls,
    )


def _write(
    out: Console, err: Console, plan: FarmPlan, directory: Path, node: str | None, etc: Path
) -> None:
    from vipfarm.config.loading import load_config
    from vipfarm.config.problems import ConfigError
    from vipfarm.install import farm as f
    from vipfarm.install.pki import PkiError, make_farm_pki

    directory = directory.resolve()
    clash = [p for p in (directory / "nodes", directory / "ca") if p.exists()]
    if clash:
        err.print(
            f"error: --dir: {directory} already holds {', '.join(p.name for p in clash)}: "
            "choose an empty directory (nothing was written)",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_INVALID)
    names = f.file_names(plan.farm)
    tls: dict[str, f.NodeTls] | None = None
    pki = None
    if plan.tls:
        try:
            pki = make_farm_pki(plan.farm, [(n.name, n.addresses) for n in plan.nodes])
        except PkiError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        tls = {name: f.NodeTls(pki.ca_cert, cert, key) for name, (cert, key) in pki.nodes.items()}
    bundle = f.node_files(
        plan,
        key=f.encode_secret(secrets.token_bytes(32)),
        token=f.encode_secret(secrets.token_bytes(32)),
        tls=tls,
    )
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".vipfarm-init-", dir=directory))
    except OSError as exc:
        err.print(f"error: --dir: cannot write into {directory}: {exc}", markup=False)
        raise typer.Exit(1) from None
    done = False
    try:
        for name, files in bundle.items():
            _write_files(stage / "nodes" / name, files)
        if pki is not None:
            _write_files(
                stage / "ca",
                {
                    names["ca_cert"]: f.FileSpec(pki.ca_cert, f.PUBLIC_MODE),
                    f"{plan.farm}-ca.key": f.FileSpec(pki.ca_key, f.SECRET_MODE),
                },
                dir_mode=0o700,
            )
        for name in bundle:
            file = stage / "nodes" / name / names["config"]
            try:
                load_config(file).find_self(name)
            except ConfigError as exc:
                err.print(f"error: the farm written for {name} is invalid:", highlight=False)
                for p in exc.problems:
                    err.print(f"  {p}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_INVALID) from None
        for part in ("nodes", "ca"):
            if (stage / part).exists():
                os.rename(stage / part, directory / part)
        done = True
    except OSError as exc:
        err.print(f"error: --dir: cannot write into {directory}: {exc}", markup=False)
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and created:
            shutil.rmtree(directory, ignore_errors=True)  # nothing of ours is left behind
    out.print(
        f"[green]farm {plan.farm}[/]: {len(plan.nodes)} nodes written to {directory / 'nodes'}"
        + (f", CA in {directory / 'ca'} (keep its key off the nodes)" if pki else ""),
        highlight=False,
        soft_wrap=True,
    )
    first = plan.nodes[0].name
    if node is not None:
        try:
            _install(bundle[node], etc)
        except (OSError, FileExistsError) as exc:
            err.print(f"error: --etc: {exc} (the bundle is in {directory})", markup=False)
            raise typer.Exit(1) from None
        out.print(f"[green]{node}[/]: installed into {etc}", highlight=False)
    from vipfarm.cli.config import _summary

    check_file = directory / "nodes" / first / names["config"]
    _summary(out, check_file, load_config(check_file), None)
    _next_steps(out, plan, directory, names, node, etc)


def _write_files(d: Path, files: Mapping[str, FileSpec], dir_mode: int = 0o755) -> None:
    d.mkdir(parents=True, mode=dir_mode)
    d.chmod(dir_mode)
    for fname, spec in files.items():
        path = d / fname
        # Created with its final mode: a secret is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, spec.mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(spec.data)
        os.chmod(path, spec.mode)  # the umask may have narrowed the public ones


def _install(files: Mapping[str, FileSpec], etc: Path) -> None:
    taken = [n for n in files if (etc / n).exists()]
    if taken:
        raise FileExistsError(f"{etc} already has {', '.join(taken)}; nothing was installed")
    etc.mkdir(parents=True, exist_ok=True, mode=0o755)
    for fname, spec in files.items():
        fd = os.open(etc / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, spec.mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(spec.data)
        os.chmod(etc / fname, spec.mode)


def _next_steps(
    out: Console,
    plan: FarmPlan,
    directory: Path,
    names: dict[str, str],
    node: str | None,
    etc: Path,
) -> None:
    lines = ["", "[bold]Next:[/] on each server (as root), place its files and start the daemon:"]
    for n in plan.nodes:
        if n.name == node:
            continue
        lines.append(f"  rsync -a {directory}/nodes/{n.name}/ root@{n.addresses[0]}:/etc/vipfarm/")
    lines += [
        f"  vipfarm config check {etc}/{names['config']}",
        f"  vipfarm service install {plan.farm} --enable",
        "  vipfarm state",
    ]
    if plan.tls:
        port = "" if plan.api_port == 9010 else f" --port {plan.api_port}"
        lines.append(
            f"  vipfarm --node {plan.nodes[0].addresses[0]}{port} "
            f"--ca-file {etc}/{names['ca_cert']} state"
        )
    out.print("\n".join(lines), highlight=False, soft_wrap=True)


def _refuse(err: Console, message: str, code: int = EXIT_INVALID) -> NoReturn:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _add_node(out: Console, err: Console, text: str, directory: Path) -> None:
    from vipfarm.config.loading import load_config
    from vipfarm.config.problems import ConfigError
    from vipfarm.install import farm as f
    from vipfarm.install.pki import PkiError, sign_node

    directory = directory.resolve()
    nodes_dir = directory / "nodes"
    dirs = sorted(p for p in nodes_dir.iterdir() if p.is_dir()) if nodes_dir.is_dir() else []
    tomls = sorted(dirs[0].glob("*.toml")) if dirs else []
    if len(tomls) != 1:
        _refuse(err, f"--dir: {directory} holds no farm written by `vipfarm init` (nodes/NODE/)")
    try:
        cfg = load_config(tomls[0])
    except ConfigError as exc:
        _refuse(err, f"--dir: {tomls[0]} is invalid: {exc}")
    names = f.file_names(cfg.farm.name)
    if tomls[0].name != names["config"]:
        _refuse(err, f"--dir: {tomls[0]} is not {names['config']}, as `vipfarm init` wrote it")
    nets = [f.NetworkPlan(n.name, n.port) for n in cfg.networks]
    plans = [f.NodePlan(n.name, tuple(n.address[x.name] for x in cfg.networks)) for n in cfg.nodes]
    try:
        new = f.parse_node(text, nets, plans)
    except f.InitInputError as exc:
        _refuse(err, f"--add-node: bad value {exc.value!r}: expected {exc.expected}")
    if (nodes_dir / new.name).exists():
        _refuse(err, f"--add-node: {nodes_dir / new.name} exists already")
    first = dirs[0]
    tls = cfg.api is not None and cfg.api.cert_file is not None
    wanted = [names["key"], names["token"], *([names["ca_cert"]] if tls else [])]
    missing = [n for n in wanted if not (first / n).is_file()]
    if missing:
        _refuse(err, f"--dir: {first} has no {', '.join(missing)} (as `vipfarm init` wrote it)")
    farm_text = (
        tomls[0].read_text().rstrip("\n")
        + "\n\n"
        + "\n".join(f.render_node(new, nets, cfg.nodes[0].interface))
        + "\n"
    ).encode()
    files = {names["config"]: f.FileSpec(farm_text, f.PUBLIC_MODE)}
    files.update({n: f.FileSpec((first / n).read_bytes(), f.SECRET_MODE) for n in wanted[:2]})
    if tls:
        ca = directory / "ca"
        ca_cert, ca_key = ca / names["ca_cert"], ca / f"{cfg.farm.name}-ca.key"
        if not (ca_cert.is_file() and ca_key.is_file()):
            _refuse(
                err,
                f"--dir: the farm CA ({ca_cert}, {ca_key}) signs the new node's certificate: "
                "it is the ca/ directory `vipfarm init` wrote beside nodes/",
            )
        if ca_cert.read_bytes() != (first / names["ca_cert"]).read_bytes():
            _refuse(err, f"--dir: {ca_cert} is not the CA that {first.name} trusts")
        try:
            cert, key = sign_node(
                ca_cert.read_bytes(), ca_key.read_bytes(), new.name, new.addresses
            )
        except PkiError as exc:
            _refuse(err, str(exc), 1)
        files[names["ca_cert"]] = f.FileSpec(ca_cert.read_bytes(), f.PUBLIC_MODE)
        files[names["cert"]] = f.FileSpec(cert, f.PUBLIC_MODE)
        files[names["tls_key"]] = f.FileSpec(key, f.SECRET_MODE)
    stage = Path(tempfile.mkdtemp(prefix=".vipfarm-init-", dir=directory))
    try:
        # Every node's directory as it will be, checked before anything is replaced.
        for d in dirs:
            shutil.copytree(d, stage / d.name, symlinks=True)
            (stage / d.name / names["config"]).write_bytes(farm_text)
        _write_files(stage / new.name, files)
        for name in [*(d.name for d in dirs), new.name]:
            file = stage / name / names["config"]
            try:
                load_config(file).find_self(name)
            except ConfigError as exc:
                err.print(f"error: the farm with {new.name} is invalid for {name}:")
                for p in exc.problems:
                    err.print(f"  {p}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_INVALID) from None
        for d in dirs:
            os.replace(stage / d.name / names["config"], d / names["config"])
        os.rename(stage / new.name, nodes_dir / new.name)
    except OSError as exc:
        _refuse(err, f"--dir: cannot write into {directory}: {exc}", 1)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    out.print(
        f"[green]farm {cfg.farm.name}[/]: {new.name} added, {len(dirs) + 1} nodes in "
        f"{nodes_dir}" + (" (certificate signed by the farm CA)" if tls else ""),
        highlight=False,
        soft_wrap=True,
    )
    addr = {d.name: a for d in dirs for n in cfg.nodes if n.name == d.name
            for a in [n.address[cfg.networks[0].name]]}  # fmt: skip
    addr[new.name] = new.addresses[0]
    lines = [
        "",
        "[bold]Next[/] (the node list changes with a restart of every daemon, not a deployment):",
        "  place every node's files again:",
        *(f"  rsync -a {nodes_dir}/{n}/ root@{a}:/etc/vipfarm/" for n, a in addr.items()),
        "  restart the daemons one at a time, each once the farm is back to full strength:",
        *(f"  systemctl restart vipfarm@{cfg.farm.name}   (on {d.name})" for d in dirs),
        f"  on {new.name}: vipfarm service install {cfg.farm.name} --enable",
    ]
    out.print("\n".join(lines), highlight=False, soft_wrap=True)
