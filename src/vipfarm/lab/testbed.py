"""Build, drive and tear down a lab: a whole farm in network namespaces on one machine.

`up()` creates the namespaces of `vipfarm.lab.topology` (one `ip -batch`), sets their sysctls
before any device exists (one `sysctl` per namespace), wires and addresses them (one `ip -batch`
per namespace), starts every node's application (nginx or the built-in one, plus the UDP echo)
and, unless told not to, a stand-alone data path runner per node with an even share of the
buckets. A 3-node lab is up in about a second. A failed `up` tears down what it built. `Lab`
then offers what tests need: run a command in a namespace, HTTP and UDP requests from a client
(one process for many requests), and moving buckets between nodes, release before acquire.

Everything a lab owns is findable from its name alone, so `down()` works from another process,
after a crash, or on a half-built lab: processes are recorded under `/run/vipfarm-lab/<name>/`
and every process left in a lab namespace is the lab's. `down()` stops the data path runners
first and waits for them, because they remove their kernel state on SIGTERM and must do so
before their namespace goes; then the other processes, then stragglers found with `ip netns
pids`, then the namespaces (which takes every veth with them; the control socket directories of
their daemons first, `vipfarm.node.control`) and the state directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from vipfarm.datapath.ruleset import KEPT_SET, OWNED_SET, list_set_command, parse_owned
from vipfarm.datapath.spec import DatapathSpec, IPAddress, NodeDatapathSpec, Rule, SteerSpec
from vipfarm.files import write_atomic
from vipfarm.lab.apps import (
    AppKind,
    builtin_argv,
    nginx_argv,
    node_ready,
    resolve_app,
    write_nginx,
)
from vipfarm.lab.buckets import datapath_spec, even_split, node_key, plan_handover
from vipfarm.lab.farm import DEFAULT_DELIVERY, farm_toml
from vipfarm.lab.load import Reply
from vipfarm.lab.netns import run_in_netns
from vipfarm.lab.procs import ProcRecord, alive, spawn, terminate
from vipfarm.lab.topology import (
    ECHO_PORT,
    STATE_ROOT,
    VIP4,
    VIPS,
    LabError,
    Role,
    Topology,
    check_name,
    extra_hb4,
    extra_lan4,
    flood_batch,
    host_batch,
    lab_namespaces,
    neighbour_batch,
    node_index,
    node_lan4,
    node_name,
    static_neighbours,
)
from vipfarm.log import event
from vipfarm.node import control
from vipfarm.node.control import ControlError

log = logging.getLogger("vipfarm.lab")

API_PORT = 9010  # the API's default port, which the lab's farm configuration keeps
READY_TIMEOUT_S = 30.0  # generous: a loaded 2-core machine starts a few Pythons slowly
READY_PER_NODE_S = 2.0  # and more for every node of a lab of daemons
# Daemons started at once. Each node starts three Pythons (daemon, pulse, manager) and its
# application; 24 nodes started together on two cores took minutes, and most of their
# applications missed the module's healthy_timeout_s, used up the restart policy and left the
# nodes in STOP. Started in waves, each once the previous one runs, they come up in seconds.
START_WAVE = 8
KERNEL_ROLES = ("-datapath", "-daemon")  # processes that own kernel state: stopped first


class LabConfig(BaseModel):
    """What `up` was asked for, saved as `lab.json` so other processes can attach."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    nodes: int
    clients: int
    remote_clients: int
    app: AppKind
    datapath: bool
    rules: list[Rule]
    daemon: bool = False  # node daemons (membership, failover) instead of static runners
    timing: str = "default"  # the daemons' timing.profile
    no_flood: bool = False  # the LAN switch floods no unknown unicast to the nodes' ports
    delivery: str = DEFAULT_DELIVERY  # the farm's delivery (daemon mode): flood, directed or auto


def unique_name(prefix: str = "vt") -> str:
    """A fresh lab name for a test run, short enough for every namespace and port name."""
    return prefix + secrets.token_hex(3)


def state_dir(name: str) -> Path:
    return STATE_ROOT / name


def ip_command() -> str:
    """Path of ip(8); the lab needs root and iproute2."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces): run it with sudo or as root")
    found = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise LabError("ip(8) not found: install iproute2 (apt-get install iproute2)")
    return found


def _run(
    argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns(ip: str) -> list[str]:
    out = _run([ip, "-j", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def url_for(vip: IPAddress = VIP4, port: int = 80, path: str = "/") -> str:
    host = f"[{vip}]" if vip.version == 6 else str(vip)
    return f"http://{host}:{port}{path}"


def _poll(what: str, done: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _tail(path: str, lines: int = 10) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Holder:
    """Long-lived connections held by a client process; every method returns its JSON report."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.initial = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise LabError("the connection holder exited early")
        result: dict[str, Any] = json.loads(line)
        return result

    def _send(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def probe(self) -> dict[str, Any]:
        """One more request on every connection."""
        return self._send("probe")

    def close(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            return None
        try:
            return self._send("quit")
        finally:
            self.proc.wait(timeout=30)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except (LabError, OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class Lab:
    """A running lab. Get one from `up()` or `Lab.attach(name)`."""

    def __init__(self, config: LabConfig, ip: str) -> None:
        self.config = config
        self.topology = Topology(config.name, config.nodes, config.clients, config.remote_clients)
        self.ip = ip
        self.dir = state_dir(config.name)
        self.spec: DatapathSpec = datapath_spec(config.name, config.rules)

    @classmethod
    def attach(cls, name: str) -> Lab:
        check_name(name)
        path = state_dir(name) / "lab.json"
        try:
            config = LabConfig.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise LabError(
                f"no lab named {name!r} ({path} is missing): start one with "
                f"`vipfarm lab up --name {name}`"
            ) from None
        return cls(config, ip_command())

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def node_names(self) -> list[str]:
        return [node_name(i) for i in range(1, self.config.nodes + 1)]

    def ns(self, who: str) -> str:
        """Namespace of a host given as `node1`, `client1`, `remote1`, `router` or `switch`."""
        if who in ("switch", self.topology.switch_ns):
            return self.topology.switch_ns
        return self.topology.host(who).ns

    def exec(
        self,
        who: str,
        argv: list[str],
        *,
        check: bool = False,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a lab namespace; text output captured."""
        return _run(
            [self.ip, "netns", "exec", self.ns(who), *argv],
            input=input,
            check=check,
            timeout=timeout,
        )

    # ---- requests from clients

    def load(
        self,
        client: str,
        url: str | None = None,
        count: int = 100,
        *,
        concurrency: int = 50,
        timeout: float = 2.0,
        total_timeout: float = 30.0,
        source_port: int | None = None,
        rate: float | None = None,
    ) -> list[Reply]:
        """`count` requests from `client` in one process (see `vipfarm.lab.load`), in order."""
        argv = [
            sys.executable,
            "-m",
            "vipfarm.lab.load",
            url or url_for(),
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--timeout",
            str(timeout),
            "--total-timeout",
            str(total_timeout),
        ]
        if source_port is not None:
            argv += ["--source-port", str(source_port)]
        if rate is not None:
            argv += ["--rate", str(rate)]
        proc = self.exec(client, argv, check=True, timeout=total_timeout + 30)
        return [Reply(**r) for r in json.loads(proc.stdout)["results"]]

    def http_get(
        self,
        client: str,
        url: str | None = None,
        source_port: int | None = None,
        timeout: float = 5.0,
    ) -> Reply:
        """One HTTP GET (default: the v4 VIP); `.node` names the server, `.error` why none did."""
        return self.load(
            client, url, 1, timeout=timeout, total_timeout=timeout, source_port=source_port
        )[0]

    def udp_echo(
        self,
        client: str,
        vip: IPAddress = VIP4,
        source_port: int | None = None,
        timeout: float = 2.0,
    ) -> Reply:
        """One datagram to the echo service on `vip`; `.node` names the node that answered."""
        host = f"[{vip}]" if vip.version == 6 else str(vip)
        return self.load(
            client,
            f"udp://{host}:{ECHO_PORT}",
            1,
            timeout=timeout,
            total_timeout=timeout,
            source_port=source_port,
        )[0]

    def hold(self, client: str, count: int, url: str | None = None) -> Holder:
        """Open `count` long-lived keep-alive connections from `client` (see `vipfarm.lab.hold`);
        use as a context manager so they are always closed."""
        argv = [sys.executable, "-m", "vipfarm.lab.hold", url or url_for(), "--count", str(count)]
        return Holder([self.ip, "netns", "exec", self.ns(client), *argv])

    # ---- buckets

    def _spec_path(self, node: str) -> Path:
        return self.dir / f"{node}.spec.json"

    def spec_owned(self, node: str) -> list[int]:
        """The buckets `node` is told to own (its spec file)."""
        text = self._spec_path(node).read_text()
        return NodeDatapathSpec.model_validate_json(text).owned

    def _write_spec(self, node: str, owned: Iterable[int], steer: SteerSpec | None = None) -> None:
        spec = NodeDatapathSpec(datapath=self.spec, owned=sorted(owned), steer=steer)
        # The runner re-reads on SIGHUP: never let it see half a file.
        write_atomic(self._spec_path(node), spec.model_dump_json(indent=2))

    def kernel_owned(self, nodes: Iterable[str] | None = None) -> dict[str, list[int] | None]:
        """Buckets each node's kernel holds (None when there is no data path), in parallel.

        Same reading as `vipfarm datapath owned` (the data path's own table name and parser),
        but through the `nft` binary: a Python start per node per poll costs ~0.4 s of CPU,
        which a 32-node lab polling on 2 cores cannot afford.
        """
        return self._kernel_set(OWNED_SET, nodes)

    def kernel_kept(self, nodes: Iterable[str] | None = None) -> dict[str, list[int] | None]:
        """Buckets each node's kernel keeps (given away, established connections still served),
        read like `kernel_owned`."""
        return self._kernel_set(KEPT_SET, nodes)

    def _kernel_set(self, name: str, nodes: Iterable[str] | None) -> dict[str, list[int] | None]:
        argv = ["nft", "-j", *list_set_command(self.name, name).split()]
        procs = {
            node: subprocess.Popen(
                [self.ip, "netns", "exec", self.ns(node), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for node in (self.node_names if nodes is None else nodes)
        }
        out: dict[str, list[int] | None] = {}
        for node, proc in procs.items():
            try:
                stdout, _ = proc.communicate(timeout=30)
                ok = proc.returncode == 0
                out[node] = sorted(parse_owned(json.loads(stdout))) if ok else None
            except (subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
                out[node] = None
        return out

    def _wait_owned(self, expected: Mapping[str, list[int]], timeout: float) -> None:
        """Poll the kernels until each node in `expected` holds exactly its buckets."""
        runners = self.runners()
        pending = {node: sorted(b) for node, b in expected.items()}

        def done() -> bool:
            for node in pending:
                rec = runners.get(node)
                if rec is None or not alive(rec):
                    log_tail = _tail(rec.log) if rec else "(never started)"
                    raise LabError(f"{node}: its data path runner is not running:\n{log_tail}")
            for node, got in self.kernel_owned(pending).items():
                if got == pending[node]:
                    del pending[node]
            return not pending

        what = f"the kernels of {', '.join(expected)} to show their buckets"
        _poll(what, done, timeout, interval=0)  # each poll runs a process per node anyway

    def _apply(self, owned: Mapping[str, list[int]], timeout: float) -> None:
        """Rewrite spec files, SIGHUP the runners, wait until every kernel shows its new set."""
        runners = self.runners()
        for node, buckets in owned.items():
            self._write_spec(node, buckets)
            rec = runners.get(node)
            if rec is not None and alive(rec):
                os.kill(rec.pid, signal.SIGHUP)
        self._wait_owned(owned, timeout)

    def set_owned(self, changes: Mapping[int | str, Iterable[int]], timeout: float = 15.0) -> None:
        """Give nodes new bucket sets (nodes not named keep theirs), never owning one twice.

        Nodes that lose buckets release them first; nodes gain buckets only once every kernel
        shows the releases. Keys are node numbers (1) or names ("node1").
        """
        if not self.config.datapath:
            raise LabError(f"lab {self.name!r} runs no data path (it was started without one)")
        target = {node_key(k, self.config.nodes): list(v) for k, v in changes.items()}
        current = {n: self.spec_owned(n) for n in self.node_names}
        release, acquire = plan_handover(current, target, self.spec.buckets)
        t0 = time.monotonic()
        if release:
            self._apply(release, timeout)
        if acquire:
            self._apply(acquire, timeout)
        event(
            log,
            "lab_set_owned",
            lab=self.name,
            released=",".join(release),
            acquired=",".join(acquire),
            ms=round((time.monotonic() - t0) * 1000),
        )

    def node_mac(self, node: str) -> str:
        return self.exec(node, ["cat", "/sys/class/net/eth0/address"], check=True).stdout.strip()

    def set_directed(self, entry: str | None, timeout: float = 30.0) -> None:
        """Static labs: directed delivery with `entry` the entry of every VIP, each node's
        steering plan computed from the buckets the lab gave it (what the node daemons
        compute from their membership); None: flood delivery again. Call it again after
        moving buckets."""
        if entry is None:
            self.update_spec(timeout, delivery="flood")
            return
        macs = {n: self.node_mac(n) for n in self.node_names}
        owned = {n: self.spec_owned(n) for n in self.node_names}
        steer = {
            node: SteerSpec(
                entry=list(self.spec.vips) if node == entry else [],
                mac=macs[node],
                targets={b: [macs[o]] for o in self.node_names if o != node for b in owned[o]},
                local=owned[node],
                peers=[m for n, m in macs.items() if n != node],
            )
            for node in self.node_names
        }
        self.update_spec(timeout, steer=steer, delivery="directed")

    def update_spec(
        self,
        timeout: float = 30.0,
        steer: Mapping[str, SteerSpec] | None = None,
        **changes: Any,
    ) -> None:
        """Change the data path spec of every node's runner (e.g. `notrack_other=True`), owned
        buckets unchanged: rewrite the spec files, SIGHUP the runners, and wait until each has
        logged its reload (a runner that logs an error instead fails the call)."""
        if not self.config.datapath:
            raise LabError(f"lab {self.name!r} runs no data path (it was started without one)")
        self.spec = DatapathSpec.model_validate({**self.spec.model_dump(), **changes})
        runners = self.runners()

        def seen(node: str, what: str) -> int:
            try:
                return Path(runners[node].log).read_text(errors="replace").count(what)
            except OSError:
                return 0

        before = {n: (seen(n, "runner_reloaded"), seen(n, "runner_error")) for n in runners}
        for node, rec in runners.items():
            self._write_spec(node, self.spec_owned(node), (steer or {}).get(node))
            os.kill(rec.pid, signal.SIGHUP)

        def done() -> bool:
            for node, (_reloads, errors) in before.items():
                if seen(node, "runner_error") > errors:
                    raise LabError(
                        f"{node}: its runner refused the new spec:\n{_tail(runners[node].log)}"
                    )
            return all(seen(n, "runner_reloaded") > r for n, (r, _e) in before.items())

        _poll("the runners to apply the new spec", done, timeout)

    # ---- processes

    def records(self) -> list[ProcRecord]:
        return _records(self.name)

    def runners(self) -> dict[str, ProcRecord]:
        """The data path runners' records, by node name."""
        suffix = "-datapath"
        return {r.role.removesuffix(suffix): r for r in self.records() if r.role.endswith(suffix)}

    def ip_batch(self, who: str, lines: list[str], check: bool = True) -> None:
        """`ip -n <namespace of who> -batch -` with `lines` (chaos rewires switch ports)."""
        _run(
            [self.ip, "-n", self.ns(who), "-batch", "-"], input="\n".join(lines) + "\n", check=check
        )

    def spawn(self, role: str, who: str, argv: list[str]) -> ProcRecord:
        """Start `argv` in the namespace of `who` (a host or `switch`), recorded like the lab's
        own processes: `down()` ends it if its owner does not (chaos faults end theirs by PID
        with `procs.terminate`). Output goes to `logs/<role>.log`."""
        return self._start(role, self.ns(who), argv)

    def _start(self, role: str, ns: str, argv: list[str]) -> ProcRecord:
        (self.dir / "procs").mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        log_path = self.dir / "logs" / f"{role}.log"
        return spawn(self.ip, role, ns, argv, log_path, self.dir / "procs" / f"{role}.json")

    def _start_apps(self) -> None:
        vips = list(dict.fromkeys([*VIPS, *self.spec.vips]))
        builtin_http = self.config.app is AppKind.BUILTIN and not self.config.daemon
        apps: list[ProcRecord] = []  # one per node: its namespace is ready when this listens
        started: list[ProcRecord] = []
        for node in self.node_names:
            ns = self.ns(node)
            if self.config.app is AppKind.NGINX:
                root = self.dir / "nginx" / node
                write_nginx(node, root)
                if not self.config.daemon:  # with daemons, the module starts the web server
                    started.append(self._start(f"{node}-nginx", ns, nginx_argv(root)))
            apps.append(self._start(f"{node}-app", ns, builtin_argv(node, builtin_http, vips)))
            started.append(apps[-1])

        def ready() -> bool:
            for rec in started:
                if not alive(rec):
                    raise LabError(f"{rec.role} exited during start:\n{_tail(rec.log)}")
            http = not self.config.daemon
            return all(node_ready(rec.pid, rec.ns, vips, http) for rec in apps)

        _poll("node applications to listen", ready, READY_TIMEOUT_S)

    def _start_datapath(self) -> None:
        split = even_split(self.config.nodes, self.spec.buckets)
        for node in self.node_names:
            self._write_spec(node, split[node])
            # Per-node state dir: the runner keeps the sysctls it must restore there, and the
            # nodes share one filesystem.
            argv = [
                sys.executable,
                "-m",
                "vipfarm",
                "datapath",
                "run",
                "--spec",
                str(self._spec_path(node)),
                "--state-dir",
                str(self.dir / "datapath" / node),
            ]
            self._start(f"{node}-datapath", self.ns(node), argv)
        self._wait_owned(split, READY_TIMEOUT_S)

    def add_host(self, i: int, heartbeat: bool = False) -> str:
        """Plug an extra host `<lab>-extra<i>` into the LAN with address 198.51.100.(60+i), and
        with `heartbeat` into heartbeat network 2 too (192.0.2.(60+i), its eth1); `down` removes
        it with the rest. Returns its namespace."""
        ns = f"{self.name}-extra{i}"
        legs = [("eth0", f"x{i}", "br0", extra_lan4(i))]
        if heartbeat:
            legs.append(("eth1", f"x{i}h", "br1", extra_hb4(i)))
        _run([self.ip, "netns", "add", ns])
        _run(
            [self.ip, "-n", self.ns("switch"), "-batch", "-"],
            input="".join(
                f"link add {port} type veth peer name {ifname} netns {ns}\n"
                f"link set {port} master {bridge} up\n"
                for ifname, port, bridge, _addr in legs
            ),
        )
        _run(
            [self.ip, "-n", ns, "-batch", "-"],
            input="link set lo up\n"
            + "".join(
                f"addr add {addr}/24 dev {ifname}\nlink set {ifname} up\n"
                for ifname, _port, _bridge, addr in legs
            ),
        )
        return ns

    def remove_host(self, i: int) -> None:
        """Undo `add_host(i)`: the veth first (deleting a namespace frees its devices only
        later, so the port name would still be taken), then the namespace."""
        for port in (f"x{i}", f"x{i}h"):
            _run([self.ip, "-n", self.ns("switch"), "link", "del", port], check=False)
        _run([self.ip, "netns", "del", f"{self.name}-extra{i}"], check=False)

    # ---- node daemons (daemon mode)

    @property
    def farm_config(self) -> Path:
        """The farm file the lab wrote; each node runs from its own copy (`node_config`)."""
        return self.dir / "farm.toml"

    def node_config(self, node: str) -> Path:
        """`node`'s configuration file, as /etc/vipfarm/farm.toml on a real server: a
        deployment rewrites each node's copy, and a node that was down keeps its old one."""
        return self.dir / "etc" / node / "farm.toml"

    @property
    def api_token_file(self) -> Path:
        """The farm's API token (`[api] token_file`), for `vipfarm --token-file`."""
        return self.dir / "api.token"

    def api_url(self, node: str, path: str = "") -> str:
        """`node`'s HTTP API on its LAN address, reachable from the lab's clients."""
        return f"http://{node_lan4(node_index(node))}:{API_PORT}{path}"

    def _start_daemons(self) -> None:
        key = self.dir / "farm.key"
        for secret in (key, self.api_token_file):
            # Exactly 0600 whatever the umask: the configuration refuses a secret others can read.
            write_atomic(secret, secrets.token_hex(32) + "\n", mode=0o600)
        (self.dir / "pids").mkdir(exist_ok=True)
        self.farm_config.write_text(
            farm_toml(
                self.name,
                self.config.nodes,
                self.config.rules,
                self.config.app,
                self.dir,
                key,
                token_file=self.api_token_file,
                timing=self.config.timing,
                delivery=self.config.delivery,
            )
        )
        names = self.node_names
        for first in range(0, len(names), START_WAVE):
            wave = names[first : first + START_WAVE]
            for node in wave:
                self.node_config(node).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.farm_config, self.node_config(node))
                self.start_daemon(node, wait=False)
            if first + START_WAVE < len(names):
                self._wait_answering(wave)
        # Every node starts three Pythons (daemon, pulse, manager): a big lab on two cores
        # needs longer than a small one.
        self.wait_farm_up(READY_TIMEOUT_S + READY_PER_NODE_S * self.config.nodes)
        if self.config.delivery == "auto":
            self.wait_delivery_settled(READY_TIMEOUT_S)

    def _wait_answering(self, wave: list[str]) -> None:
        """Until every node of `wave` reports a state other than STOP (its daemon, pulse and
        manager run and it has joined), so the next wave's Pythons do not compete with this
        one's start-up."""
        _poll(
            f"{wave[0]}..{wave[-1]} to start",
            lambda: all(self._state_of(n) not in (None, "STOP") for n in wave),
            READY_TIMEOUT_S + READY_PER_NODE_S * len(wave),
            interval=0.2,
        )

    def wait_delivery_settled(self, timeout: float) -> None:
        """Auto delivery: until every node answers as this switch calls for: flood
        style where it floods, directed where it does not. An auto farm starts directed and
        answers in flood style only once every node heard every other's probe for a while
        (vipfarm.node.delivery), so a test of flood behaviour waits for that first."""
        answers = "directed" if self.config.no_flood else "flood"

        def settled() -> bool:
            try:
                return all(
                    self.daemon_state(n)["delivery"]["answers"] == answers for n in self.node_names
                )
            except (OSError, KeyError, TypeError, ValueError):  # as _state_of
                return False

        _poll(f"every node to answer in {answers} style", settled, timeout, interval=0.2)

    def start_daemon(self, node: str, wait: bool = True) -> ProcRecord:
        """Start `node`'s daemon (again); with `wait`, until it reports UP."""
        argv = [
            sys.executable,
            "-m",
            "vipfarm",
            "daemon",
            "--config",
            str(self.node_config(node)),
            "--node",
            node,
            "--run-dir",
            str(self.dir / "run" / node),
            "--log-dir",
            str(self.dir / "nodelogs" / node),
            # never the real /var/lib: the lab's own directory, removed with the lab
            "--state-dir",
            str(self.dir / "state" / node),
        ]
        rec = self._start(f"{node}-daemon", self.ns(node), argv)
        if wait:
            _poll(f"{node} to be UP", lambda: self._state_of(node) == "UP", READY_TIMEOUT_S)
        return rec

    def daemon_state(self, node: str, timeout: float = 5.0) -> dict[str, Any]:
        """`vipfarm state --json` of `node`'s daemon, asked over its control socket."""
        result: dict[str, Any] = run_in_netns(
            self.ns(node), lambda: control.call(self.name, "state", timeout=timeout), timeout + 5
        )
        return result

    def daemon_call(self, node: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return run_in_netns(self.ns(node), lambda: control.call(self.name, cmd, args))

    def _state_of(self, node: str) -> str | None:
        try:
            return str(self.daemon_state(node)["state"])
        except (ControlError, OSError):
            return None

    def holds_every_bucket_once(self, nodes: Iterable[str]) -> bool:
        """Whether the kernels of `nodes` together hold every bucket, each exactly once."""
        wanted = list(nodes)
        owned = self.kernel_owned(wanted)
        held = [b for n in wanted for b in (owned[n] or [])]
        return len(held) == len(set(held)) == self.spec.buckets

    def app_pid(self, node: str) -> int | None:
        """The application PID the generic module recorded (daemon mode); None while none is."""
        try:
            return int((self.dir / "pids" / f"{node}.app.pid").read_text())
        except (OSError, ValueError):
            return None

    def wait_farm_up(self, timeout: float, nodes: Iterable[str] | None = None) -> None:
        """Until every node (of `nodes`) is UP and the kernels hold every bucket exactly once."""
        wanted = list(nodes or self.node_names)

        def ready() -> bool:
            if any(self._state_of(n) != "UP" for n in wanted):
                return False
            return self.holds_every_bucket_once(wanted)

        _poll("every node UP and every bucket owned once", ready, timeout, interval=0.1)

    def kill(self, node: str) -> list[int]:
        """SIGKILL every process of `node` (daemon and application): a crashed server."""
        pids = [int(p) for p in _run([self.ip, "netns", "pids", self.ns(node)]).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def daemon_record(self, node: str) -> ProcRecord:
        for r in self.records():
            if r.role == f"{node}-daemon":
                return r
        raise LabError(f"{node} has no daemon in lab {self.name}")

    def _build_network(self) -> None:
        topo = self.topology
        _run(
            [self.ip, "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in topo.namespaces())
        )
        sysctls = {topo.switch_ns: topo.switch_sysctls()}
        sysctls.update({h.ns: h.sysctls for h in topo.hosts()})
        for ns, pairs in sysctls.items():
            _run(
                [
                    self.ip,
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-e",  # bridge netfilter keys exist only where br_netfilter is loaded
                    "-w",
                    *(f"{k}={v}" for k, v in pairs),
                ]
            )
        # Devices are created only now, after accept_dad=0, so they inherit it.
        _run(
            [self.ip, "-n", topo.switch_ns, "-batch", "-"],
            input="\n".join(topo.switch_batch()) + "\n",
        )
        for h in topo.hosts():
            _run([self.ip, "-n", h.ns, "-batch", "-"], input="\n".join(host_batch(h)) + "\n")
        if static_neighbours(topo.nodes, _neighbour_limit()):
            self._pin_neighbours()
        if self.config.no_flood:
            self.set_flood(False)

    def _pin_neighbours(self) -> None:
        """Permanent neighbour entries among the nodes (`topology.static_neighbours`)."""
        nodes = [h for h in self.topology.hosts() if h.role is Role.NODE]
        macs = {}
        for h in nodes:
            links = json.loads(_run([self.ip, "-n", h.ns, "-j", "link", "show"]).stdout)
            macs.update({(h.ns, link["ifname"]): link["address"] for link in links})
        for h in nodes:
            batch = "\n".join(neighbour_batch(h, nodes, macs)) + "\n"
            _run([self.ip, "-n", h.ns, "-batch", "-"], input=batch)

    def set_flood(self, on: bool) -> None:
        """Turn unknown-unicast flooding of the LAN switch on or off on the node ports while
        the lab runs (`topology.flood_batch`)."""
        batch = "\n".join(flood_batch(self.topology, on)) + "\n"
        _run([self.ip, "-n", self.topology.switch_ns, "-batch", "-"], input=batch)

    def status(self) -> dict[str, Any]:
        return status(self.name)

    def down(self) -> None:
        down(self.name)


def _neighbour_limit() -> int:
    """The host-wide ARP entry limit (read only: the root namespace is never changed)."""
    try:
        return int(Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3").read_text())
    except (OSError, ValueError):
        return 1024  # the kernel's default


def _records(name: str) -> list[ProcRecord]:
    out = []
    for path in sorted((state_dir(name) / "procs").glob("*.json")):
        try:
            out.append(ProcRecord.load(path))
        except (OSError, ValueError, TypeError):
            continue  # a record half-written by a crashed `up`: `ip netns pids` still finds it
    return out


def up(
    name: str = "vf",
    nodes: int = 3,
    clients: int = 1,
    remote_clients: int = 0,
    app: AppKind | str = AppKind.AUTO,
    rules: list[Rule] | None = None,
    datapath: bool = True,
    daemon: bool = False,
    timing: str = "default",
    no_flood: bool = False,
    delivery: str = DEFAULT_DELIVERY,
) -> Lab:
    """Build lab `name` and return it running; on any failure remove what was built.

    `daemon=True` runs a node daemon on every node (real membership and failover, the app
    started by the daemon's module); otherwise `datapath` chooses a static runner per node.
    `no_flood`: the LAN switch floods no unknown unicast to the nodes (`Lab.set_flood`);
    `delivery`: the farm's delivery in daemon mode (flood, directed or auto: the default).
    """
    if daemon:
        datapath = False
    ip = ip_command()
    Topology(name, nodes, clients, remote_clients)  # validates before anything is touched
    config = LabConfig(
        name=name,
        nodes=nodes,
        clients=clients,
        remote_clients=remote_clients,
        app=resolve_app(app),
        datapath=datapath,
        rules=datapath_spec(name, rules).rules,
        daemon=daemon,
        timing=timing,
        no_flood=no_flood,
        delivery=delivery,
    )
    existing = sorted(lab_namespaces(name, list_netns(ip)))
    if existing or state_dir(name).exists():
        what = ", ".join(existing) or str(state_dir(name))
        raise LabError(
            f"lab {name!r} already exists ({what}): remove it with `vipfarm lab down --name {name}`"
        )
    t0 = time.monotonic()
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        state_dir(name).mkdir()  # atomic: of two concurrent `up`, one fails here
    except FileExistsError:
        raise LabError(f"lab {name!r} is being created by another process") from None
    try:
        (state_dir(name) / "lab.json").write_text(config.model_dump_json(indent=2))
        lab = Lab(config, ip)
        lab._build_network()
        lab._start_apps()
        if datapath:
            lab._start_datapath()
        if daemon:
            lab._start_daemons()
    except BaseException as exc:
        try:
            down(name)
        except LabError as e:
            event(log, "lab_cleanup_failed", level=logging.ERROR, lab=name, error=e)
        raise exc
    event(
        log,
        "lab_up",
        lab=name,
        nodes=nodes,
        clients=clients,
        remote=remote_clients,
        app=config.app,
        datapath=datapath,
        daemon=daemon,
        no_flood=no_flood,
        delivery=delivery,
        s=round(time.monotonic() - t0, 2),
    )
    return lab


class LabFactory(Protocol):
    """The signature of `up` without the name: what the `lab_factory` test fixture offers."""

    def __call__(
        self,
        nodes: int = 3,
        clients: int = 1,
        remote_clients: int = 0,
        app: AppKind | str = AppKind.AUTO,
        rules: list[Rule] | None = None,
        datapath: bool = True,
        daemon: bool = False,
        timing: str = "default",
        no_flood: bool = False,
        delivery: str = DEFAULT_DELIVERY,
    ) -> Lab: ...


def down(name: str, grace_s: float = 10.0) -> None:
    """Remove everything lab `name` made; idempotent, also for a half-built lab or none."""
    check_name(name)
    ip = ip_command()
    t0 = time.monotonic()
    records = _records(name)
    # Runners and daemons first, and waited for: they remove their kernel state on SIGTERM.
    first = [(r.pid, r.start) for r in records if r.role.endswith(KERNEL_ROLES)]
    killed = terminate(first, grace_s)
    others = [(r.pid, r.start) for r in records if not r.role.endswith(KERNEL_ROLES)]
    killed += terminate(others, grace_s)
    namespaces = lab_namespaces(name, list_netns(ip))
    for ns in namespaces:
        pids = _run([ip, "netns", "pids", ns], check=False).stdout.split()
        killed += terminate([(int(p), None) for p in pids], grace_s)
    for ns in namespaces:
        # Its daemons' control sockets, which a killed daemon leaves behind; the directory is
        # named by the namespace's inode, which the kernel may give a later namespace.
        with contextlib.suppress(OSError):
            shutil.rmtree(control.namespace_dir_of(f"/run/netns/{ns}"))
    if namespaces:
        _run(
            [ip, "-force", "-batch", "-"],
            input="".join(f"netns del {ns}\n" for ns in namespaces),
            check=False,
        )
    shutil.rmtree(state_dir(name), ignore_errors=True)
    left = lab_namespaces(name, list_netns(ip))
    if left or state_dir(name).exists():
        raise LabError(f"lab {name!r}: could not remove {', '.join(left) or state_dir(name)}")
    event(
        log,
        "lab_down",
        lab=name,
        namespaces=len(namespaces),
        processes=len(records),
        killed=len(killed),
        s=round(time.monotonic() - t0, 2),
    )


def _addresses(ip: str, ns: str) -> dict[str, list[str]]:
    """Global addresses per interface (the VIPs on `lo` included)."""
    proc = _run([ip, "-n", ns, "-j", "addr", "show"], check=False)
    out: dict[str, list[str]] = {}
    for link in json.loads(proc.stdout or "[]"):
        addrs = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("scope") == "global"
        ]
        if addrs:
            out[link["ifname"]] = addrs
    return out


def status(name: str) -> dict[str, Any]:
    """What exists of lab `name`: config, namespaces with addresses, processes, owned buckets."""
    check_name(name)
    ip = ip_command()
    present = lab_namespaces(name, list_netns(ip))
    try:
        lab: Lab | None = Lab.attach(name)
    except LabError:
        lab = None
    expected = lab.topology.namespaces() if lab else []
    names = expected + sorted(set(present) - set(expected))
    records = _records(name)
    owned: dict[str, list[int] | None] = {}
    if lab and lab.config.datapath:
        running = [node for node, rec in lab.runners().items() if alive(rec)]
        owned = {n: None for n in lab.node_names}
        owned.update(lab.kernel_owned(running))
    return {
        "name": name,
        "exists": bool(present) or state_dir(name).exists(),
        "state_dir": str(state_dir(name)),
        "config": lab.config.model_dump(mode="json") if lab else None,
        "namespaces": [
            {
                "name": ns,
                "role": ns.removeprefix(f"{name}-").rstrip("0123456789"),
                "present": ns in present,
                "addresses": _addresses(ip, ns) if ns in present else {},
            }
            for ns in names
        ],
        "processes": [
            {
                "role": r.role,
                "ns": r.ns,
                "pid": r.pid,
                "alive": alive(r),
                "log": r.log,
                "argv": r.argv,
            }
            for r in records
        ],
        "owned": owned,
    }
