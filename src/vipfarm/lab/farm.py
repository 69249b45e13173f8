"""The farm configuration a lab in daemon mode gives its node daemons (pure text generation).

One TOML file for every node, as in production: two heartbeat networks (the LAN on eth0 and
heartbeat network 2 on eth1), the lab's rules, and the `generic` module running the node's web
server (nginx, or the built-in one). `${node}` makes the one command line right for every node.
Checkers are quick so that tests of application failure run in seconds.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from vipfarm.config.schema import FarmSection
from vipfarm.datapath.spec import Rule
from vipfarm.lab.apps import AppKind, nginx_argv
from vipfarm.lab.topology import BUCKETS, HTTP_PORT, LAN_IF, node_hb, node_lan4

NODE_MACRO = "${node}"
# The farm file names a delivery only when it is not the default, as an operator would write it.
DEFAULT_DELIVERY: str = FarmSection.model_fields["delivery"].default.value


def _q(value: object) -> str:
    """A TOML basic string (JSON strings are valid TOML strings)."""
    return json.dumps(str(value))


def app_command(app: AppKind, lab_dir: Path) -> str:
    """The web server's command line, with `${node}` where the node's name goes."""
    if app is AppKind.NGINX:
        argv = nginx_argv(lab_dir / "nginx" / NODE_MACRO)
    else:
        argv = [sys.executable, "-m", "vipfarm.lab.app", "--node", NODE_MACRO, "--http"]
    return " ".join(shlex.quote(a) if NODE_MACRO not in a else a for a in argv)


def farm_toml(
    name: str,
    nodes: int,
    rules: list[Rule],
    app: AppKind,
    lab_dir: Path,
    key_file: Path,
    drain_timeout_s: float = 30.0,
    token_file: Path | None = None,
    timing: str = "default",
    delivery: str = DEFAULT_DELIVERY,
) -> str:
    lines = [
        f"# Farm configuration of lab {name}, written by `vipfarm lab up --daemon`.",
        "[farm]",
        f"name = {_q(name)}",
        f"key_file = {_q(key_file)}",
        f"buckets = {BUCKETS}",
        *([f"delivery = {_q(delivery)}"] if delivery != DEFAULT_DELIVERY else []),
        "",
        "[timing]",
        f"profile = {_q(timing)}",
        "",
        "[[network]]",
        'name = "lan"',
        "port = 9001",
        "",
        "[[network]]",
        'name = "hb2"',
        "port = 9001",
    ]
    for i in range(1, nodes + 1):
        lines += [
            "",
            "[[node]]",
            f'name = "node{i}"',
            f"interface = {_q(LAN_IF)}",
            f'address = {{ lan = "{node_lan4(i)}", hb2 = "{node_hb(i)}" }}',
        ]
    for r in rules:
        lines += [
            "",
            "[[rule]]",
            f"vip = {_q(r.vip)}",
            f"proto = {_q(r.proto.value)}",
            f"ports = {_q(r.ports_text)}",
            f"affinity = {_q(r.affinity.value)}",
        ]
        if r.affinity.value == "client-subnet":
            lines.append(f"prefix = {r.prefix4 if r.vip.version == 4 else r.prefix6}")
    pidfile = lab_dir / "pids" / f"{NODE_MACRO}.app.pid"
    lines += [
        "",
        "[module]",
        'name = "generic"',
        "stop_timeout_s = 10",
        "kill_timeout_s = 5",
        "healthy_timeout_s = 30",
        "",
        "[module.macros]",
        f"start_cmd = {_q(app_command(app, lab_dir))}",
        f"pidfile = {_q(pidfile)}",
        "",
        "[[module.checker]]",
        'type = "process"',
        'pidfile = "${pidfile}"',
        "interval_s = 0.5",
        "timeout_s = 1",
        "rise = 1",
        "fall = 1",
        "",
        "[[module.checker]]",
        'type = "http"',
        f'url = "http://127.0.0.1:{HTTP_PORT}/"',
        'expect_body = "${node}"',
        "interval_s = 0.5",
        "timeout_s = 1",
        "rise = 1",
        "fall = 2",
        "",
        "[module.restart]",
        "max = 2",
        "within_s = 60",
        "",
        "[drain]",
        f"timeout_s = {drain_timeout_s:g}",
        "",
    ]
    if token_file is not None:  # the API on every node's LAN address, port 9010
        lines += ["[api]", f"token_file = {_q(token_file)}", ""]
    return "\n".join(lines)
