"""From a package to a running farm, with nothing from the source tree (issue 16).

- The wheel, installed with its dependencies into a fresh virtualenv outside the checkout
  (`pip install`, PyPI through pip's own configuration) by docs/INSTALL.md's own commands, runs
  `vipfarm init` with flags for three lab nodes from an empty directory, and `vipfarm config
  check` accepts each node's directory; the modules come from the installed package.
- A lab whose node daemons are that installed `vipfarm`, with the files `init` wrote (HTTPS API,
  farm CA), serves the VIP, its node APIs answer over verified HTTPS only, its console loads.
- docs/INSTALL.md, every command of it in its order (`test_install_md_walkthrough`): the Debian
  package built by `packaging/deb/build` installed with apt-get on two servers, the farm written
  with `vipfarm init`, placed, checked, started through the unit `vipfarm service install`
  wrote, watched, grown by a third node (`init --add-node`), operated, removed and purged, and
  purge leaves nothing behind, checked file by file. The servers are lab namespaces, each with a
  mount namespace of its own (see `Server`); how each command runs is in
  tests/linux/install_doc.py (`WAYS`), and a command of the document that no way covers fails
  the test. The test purges even when it fails. No made-up URL ships in the wheel or the
  package.

Every subprocess runs with a clean environment (no PYTHONPATH) from a directory outside the
checkout, so nothing can be imported from the source tree by accident.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.linux.install_doc import DocCommand, doc_commands, shows, way_of
from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind
from vipfarm.lab.buckets import datapath_spec
from vipfarm.lab.testbed import Lab, unique_name
from vipfarm.lab.topology import STATE_ROOT, VIP4, node_hb, node_lan4

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
# A root shell's PATH on Debian: the servers' commands find Debian's python3 and /usr/bin/vipfarm.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


def run(argv: list[str | Path], cwd: Path, timeout: float = 180, check: bool = True) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def doc_way(name: str) -> list[DocCommand]:
    return [c for c in doc_commands() if way_of(c)[0].name == name]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """INSTALL.md's wheel build (way `wheel_build`), by this interpreter's pip into a test
    directory."""
    base = tmp_path_factory.mktemp("wheel")
    (cmd,) = doc_way("wheel_build")
    line = cmd.line.replace(".venv/bin/pip", f"{sys.executable} -m pip -q")
    line = line.replace("-w dist", f"-w {base}")
    run(["bash", "-c", line], REPO)
    (built,) = base.glob("vipfarm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the checkout holding the wheel and its dependencies, made by
    INSTALL.md's commands (way `wheel_venv`) with /opt and /usr/local/bin in a test directory;
    returns the virtualenv. Its `vipfarm` is also base/usr/local/bin/vipfarm, the link."""
    base = tmp_path_factory.mktemp("venv")
    (base / "usr" / "local" / "bin").mkdir(parents=True)
    for cmd in doc_way("wheel_venv"):
        line = cmd.line.replace("/opt/vipfarm", f"{base}/opt/vipfarm")
        line = line.replace("/usr/local/bin", f"{base}/usr/local/bin")
        line = re.sub(r"vipfarm-\S+\.whl", str(wheel), line).replace(" install ", " install -q ")
        proc = subprocess.run(
            ["bash", "-c", line], cwd=base, env=clean_env(PATH=ROOT_PATH), capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, f"{cmd}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    link = base / "usr" / "local" / "bin" / "vipfarm"
    assert link.is_symlink() and run([link, "--version"], base).strip() == f"vipfarm {VERSION}"
    return base / "opt" / "vipfarm"


# A shipped URL is an example (a documentation or loopback address, a placeholder) or one of
# these real ones, each a name rather than a link to follow: made-up URLs (a project site that
# does not exist) must not ship.
REAL_URLS = (
    "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",  # DEP-5 Format:
    "http://www.w3.org/2000/svg",  # the SVG namespace of the console's icons
)
_URL_RE = re.compile(r"https?://[^\s\"'<>`)\\]*")
_EXAMPLE_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def made_up_urls(root: Path) -> list[str]:
    """The URLs in the text files under `root` that are neither examples nor REAL_URLS."""
    bad = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        for url in _URL_RE.findall(data.decode(errors="replace")):
            host = url.split("://", 1)[1].split("/", 1)[0]
            if url in REAL_URLS or _example_host(host):
                continue
            bad.append(f"{path.relative_to(root)}: {url}")
    return bad


def _example_host(host: str) -> bool:
    if not host or any(c in host for c in "{$[") or host.isupper() or host.startswith("..."):
        return True  # a placeholder: http://HOST[:PORT], ${vip}, {host}, https://...
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host.strip("[]")
    if "." not in name and ":" not in name:
        return True  # one label (localhost, node2, host): a name on the farm's own network
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    return addr.is_loopback or any(addr in net for net in _EXAMPLE_NETS)


def test_no_made_up_urls_in_the_wheel(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    assert made_up_urls(tmp_path) == []
    # The check itself: a project site that does not exist is found.
    (tmp_path / "x.md").write_text(
        "see https://vipfarm.example.org/docs or http://127.0.0.1/ or https://node2:9010"
    )
    assert made_up_urls(tmp_path) == ["x.md: https://vipfarm.example.org/docs"]


@contextmanager
def pk_lab(**kwargs: object) -> Iterator[Lab]:
    """A lab named pk + 6 hex digits (this test's namespaces), removed afterwards."""
    name = unique_name("pk")
    try:
        yield testbed.up(name, **kwargs)  # type: ignore[arg-type]
    finally:
        testbed.down(name)


def init_flags(farm: str) -> list[str]:
    hosts = [f"node{i}={node_lan4(i)},{node_hb(i)}" for i in (1, 2, 3)]
    return [
        "--farm", farm, "--network", "lan", "--network", "hb2",
        *(a for h in hosts for a in ("--host", h)),
        "--vip", str(VIP4), "--rule", "tcp/80/client-ip-port",
    ]  # fmt: skip


def test_wheel_in_a_fresh_venv_writes_and_checks_a_farm(installed: Path, tmp_path: Path) -> None:
    vipfarm = installed / "bin" / "vipfarm"
    assert run([vipfarm, "--version"], tmp_path).strip() == f"vipfarm {VERSION}"
    site = run(
        [installed / "bin" / "python", "-c", "import vipfarm; print(vipfarm.__file__)"], tmp_path
    ).strip()
    assert not site.startswith(str(REPO)) and str(installed) in site
    farm_dir = tmp_path / "farm"
    farm_dir.mkdir()
    out = run([vipfarm, "init", *init_flags("web")], farm_dir)
    assert "valid - farm web, 3 nodes" in out
    assert sorted(p.name for p in farm_dir.iterdir()) == ["ca", "nodes"]
    for i in (1, 2, 3):
        out = run(
            [vipfarm, "config", "check", f"nodes/node{i}/web.toml", "--node", f"node{i}"], farm_dir
        )
        assert "valid - farm web" in out and f"node{i} (this host)" in out
        # nginx, from the installed package's own modules (the last directory of the path).
        assert f"{installed}/lib/python" in out and "site-packages/vipfarm/modules/nginx" in out
    # The wheel carries the modules' scripts executable, and the example farm.
    pkg = Path(site).parent
    assert os.access(pkg / "modules" / "nginx" / "start", os.X_OK)
    assert (pkg / "examples" / "web.toml").is_file()
    # The unit runs the vipfarm it was installed by, by the path it was called with: the link
    # of INSTALL.md's /usr/local/bin (here in the fixture's directory).
    link = installed.parent.parent / "usr" / "local" / "bin" / "vipfarm"
    units = tmp_path / "units"
    run([link, "service", "install", "web", "--config-dir", farm_dir / "nodes" / "node1",
         "--unit-dir", units], tmp_path)  # fmt: skip
    assert f"ExecStart={link} daemon --config " in (units / "vipfarm@.service").read_text()


def test_lab_of_installed_daemons_serves_the_vip_and_the_console_over_https(
    installed: Path, tmp_path: Path
) -> None:
    with pk_lab(nodes=3, clients=1, app="builtin", datapath=False, daemon=False) as lab:
        _installed_daemons_serve(installed, lab, tmp_path)


def _installed_daemons_serve(installed: Path, lab: Lab, tmp_path: Path) -> None:
    vipfarm = installed / "bin" / "vipfarm"
    # The lab builds the network and the nodes' web servers (0.0.0.0:80); the daemons, their
    # configuration and certificates come from the installed package alone.
    farm = "pk" + lab.name[-6:]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    pids = tmp_path / "pids"
    pids.mkdir()
    run(
        [
            vipfarm, "init", *init_flags(farm), "--module", "generic",
            "--macro", "start_cmd=sleep 100000", "--macro", f"pidfile={pids}/${{node}}.pid",
        ],
        bundle,
    )  # fmt: skip
    for i in (1, 2, 3):
        node = f"node{i}"
        # Without the test's own PYTHONPATH (a developer may point it at the checkout).
        argv = [
            "env", "-u", "PYTHONPATH", "-u", "PYTHONHOME", str(vipfarm), "daemon",
            "--config", str(bundle / "nodes" / node / f"{farm}.toml"),
            "--node", node, "--run-dir", str(tmp_path / "run" / node),
            "--log-dir", str(tmp_path / "log" / node),
            "--state-dir", str(tmp_path / "state" / node),  # never the host's /var/lib
        ]  # fmt: skip
        lab._start(f"{node}-daemon", lab.ns(node), argv)
    n1 = bundle / "nodes" / "node1"
    api = [
        "ip", "netns", "exec", lab.ns("client1"), vipfarm, "--node", str(node_lan4(2)),
        "--ca-file", n1 / f"{farm}-ca.crt", "--token-file", n1 / "api.token",
    ]  # fmt: skip

    def farm_state() -> dict[str, object] | None:
        proc = subprocess.run(
            [str(a) for a in [*api, "state", "--json"]],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    deadline = time.monotonic() + 90
    state = farm_state()
    while not (state and _all_up(state)) and time.monotonic() < deadline:
        time.sleep(0.5)
        state = farm_state()
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "log").rglob("*.log") if p.is_file())
    assert state and _all_up(state), f"farm not UP over HTTPS: {state}\n{logs}"
    # The VIP answers the client, served by one of the nodes.
    out = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-s", "-m", "5",
               f"http://{VIP4}/"], tmp_path)  # fmt: skip
    assert "node" in out
    # The API speaks HTTPS only: plain HTTP is refused, and so is a client without the CA.
    plain = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-s", "-m", "5", "-o",
                 "/dev/null", "-w", "%{http_code}", f"http://{node_lan4(2)}:9010/api/v1/state"],
                tmp_path, check=False)  # fmt: skip
    assert not plain.startswith("2"), plain
    url = f"https://{node_lan4(2)}:9010/api/v1/state"
    unverified = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-s", "-m", "5", url],
                     tmp_path, check=False)  # fmt: skip
    assert '"state"' not in unverified
    # The console ships in the package and loads over the same HTTPS: the sign-in page, its
    # stylesheet, and nothing else without a session.
    n1ca = str(n1 / f"{farm}-ca.crt")
    base = f"https://{node_lan4(2)}:9010/console"
    page = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-sf", "-m", "5", "--cacert",
                n1ca, f"{base}/login"], tmp_path)  # fmt: skip
    assert "<title>vipfarm console: sign in</title>" in page
    css = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-sf", "-m", "5", "--cacert",
               n1ca, f"{base}/static/console.css"], tmp_path)  # fmt: skip
    assert "{" in css
    closed = run(["ip", "netns", "exec", lab.ns("client1"), "curl", "-s", "-m", "5", "-o",
                  "/dev/null", "-w", "%{http_code}", "--cacert", n1ca, f"{base}/api/farm"],
                 tmp_path, check=False)  # fmt: skip
    assert closed.startswith("4"), closed


def _all_up(state: dict[str, object]) -> bool:
    """The farm view of `vipfarm state --json`: every node UP, and each one's configuration
    version known, which the node asked its peers for over their HTTPS APIs (farm CA)."""
    nodes = state.get("farm")
    if not isinstance(nodes, list) or len(nodes) != 3:
        return False
    return all(n.get("state") == "UP" and n.get("config_version") is not None for n in nodes)


# --------------------------------------------------------------------------------------------
# docs/INSTALL.md, every command in its order, on its servers (node3 joins in section 7)

RC_DIRS = tuple(f"rc{r}.d" for r in "0123456S")
RETRY_S = 60.0
READY_S = 60.0
STOP_S = 120.0  # the unit's TimeoutStopSec


def cmd_env(home: Path, **extra: str) -> dict[str, str]:
    """A root login's environment; COLUMNS as a terminal's, so that rich draws whole tables."""
    return {"PATH": ROOT_PATH, "HOME": str(home), "LANG": "C.UTF-8", "COLUMNS": "160", **extra}


class Context:
    """Where the commands of one prompt run: a working directory that `cd` moves, and the argv
    prefix that enters the machine's namespaces (none for `build` and `admin`, this host)."""

    def __init__(self, name: str, cwd: Path, state: Path) -> None:
        self.name, self.cwd, self.home, self.state = name, cwd, cwd, state
        cwd.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)

    def prefix(self) -> list[str]:
        return []

    def run(
        self,
        line: str,
        timeout: float = 300,
        cwd: Path | None = None,
        answers: str = "",
        **env: str,
    ) -> subprocess.CompletedProcess[str]:
        """`line` by bash in this machine's namespaces and working directory (or in `cwd`,
        which leaves the working directory as it was)."""
        pwd = self.state / ("pwd" if cwd is None else "pwd-once")
        script = 'cd "$1" || exit 99; eval "$2"; rc=$?; pwd > "$3"; exit $rc'
        proc = subprocess.run(
            [*self.prefix(), "bash", "-c", script, "bash", str(cwd or self.cwd), line, str(pwd)],
            env=cmd_env(self.home, **env), capture_output=True, text=True, timeout=timeout,
            input=answers,
        )  # fmt: skip
        if cwd is None and pwd.exists():
            self.cwd = Path(pwd.read_text().strip())
        return proc


class Client(Context):
    def __init__(self, name: str, ns: str, base: Path) -> None:
        super().__init__(name, base / "home", base / "state")
        self.ns = ns

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


class Server(Context):
    """One server of the walkthrough: its lab namespace for the network, and a mount namespace
    of its own (held by a `sleep`, entered with nsenter) so that what the document does on one
    server is not seen by the other, though both share this machine's filesystem:

    - /run is a fresh tmpfs, as after a boot (nginx's pid file, the daemon's sockets), without
      /run/systemd/system: systemd is not running, as on this machine;
    - /etc/systemd/system and /etc/rc?.d are copies of this machine's: `systemctl disable` and
      `enable` change links there, and `vipfarm service install` writes its unit there;
    - node2's /etc/vipfarm is a directory of its own; node1's is this machine's, so that the
      purge is checked on what a real server holds. /var/lib/vipfarm and /var/log/vipfarm are
      shared: the daemon keeps them per farm and node.

    The mount namespace starts with the server's first command (node2's /etc/vipfarm must exist
    by then: the package made it on node1). `view(path)` is a path of the server as this test
    sees it (through /proc/PID/root)."""

    def __init__(self, name: str, ns: str, base: Path, own_etc: bool) -> None:
        super().__init__(name, base / "home", base / "state")
        self.ns, self.own_etc = ns, own_etc
        self.holder: subprocess.Popen[str] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def _hold(self) -> int:
        if self.holder is not None:
            return self.holder.pid
        priv = self.state / "private"
        binds = {"/etc/systemd/system": priv / "systemd-system"}
        binds.update({f"/etc/{d}": priv / d for d in RC_DIRS if Path(f"/etc/{d}").is_dir()})
        for target, copy in binds.items():
            shutil.copytree(target, copy, symlinks=True)
        if self.own_etc:
            assert Path("/etc/vipfarm").is_dir(), "node2's first command before the package"
            binds["/etc/vipfarm"] = priv / "etc-vipfarm"
            binds["/etc/vipfarm"].mkdir(mode=0o755)
        steps = ["mount -t tmpfs -o mode=0755 tmpfs /run", "mkdir /run/lock"]
        steps += [f"mount --bind {shlex.quote(str(s))} {t}" for t, s in binds.items()]
        script = " && ".join([*steps, "echo ready", "exec sleep 100000"])
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
             "bash", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.holder.stdout is not None and self.holder.stderr is not None
        ready = self.holder.stdout.readline()  # "ready", or nothing when a step failed
        assert ready.strip() == "ready", f"{self.name}: {self.holder.stderr.read()}"
        return self.holder.pid

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self._hold()), "-m", "-n", "--"]

    def view(self, path: str) -> Path:
        return Path(f"/proc/{self._hold()}/root") / path.lstrip("/")

    # ---- what systemd would do for `systemctl enable --now` and `disable --now`

    def start_unit(self, farm: str) -> None:
        """`systemctl enable --now vipfarm@FARM`: verify the unit, enable it, start it."""
        unit = self.view("/etc/systemd/system/vipfarm@.service")
        instance = self.state / f"vipfarm@{farm}.service"
        instance.write_text(unit.read_text())
        verify = self.run(f"systemd-analyze verify {instance}")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        enable = self.run(f"systemctl enable vipfarm@{farm}.service")
        assert enable.returncode == 0, enable.stdout + enable.stderr
        link = f"/etc/systemd/system/multi-user.target.wants/vipfarm@{farm}.service"
        assert self.view(link).is_symlink()
        self.exec_start(farm)

    def journal(self) -> str:
        path = self.state / "journal.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def exec_start(self, farm: str) -> None:
        """The unit's ExecStart for instance FARM, as systemd starts it: the directories it
        makes, NOTIFY_SOCKET, / as working directory, its minimal environment; returns once the
        daemon sent READY=1 (Type=notify)."""
        text = self.view("/etc/systemd/system/vipfarm@.service").read_text()
        service = dict(
            line.split("=", 1)
            for line in text.split("[Service]", 1)[1].split("\n[", 1)[0].splitlines()
            if "=" in line and not line.startswith("#")
        )
        assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
        for key, root in (("StateDirectory", "/var/lib"), ("LogsDirectory", "/var/log"),
                          ("RuntimeDirectory", "/run")):  # fmt: skip
            self.view(f"{root}/{service[key]}").mkdir(mode=0o755, exist_ok=True)
        sock_path = self.state / "notify.sock"
        sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.5)
        with sock, (self.state / "journal.log").open("ab") as log:
            self.daemon = subprocess.Popen(
                [*self.prefix()[:-1], "--wd=/", "--",
                 *shlex.split(service["ExecStart"].replace("%i", farm))],
                env={"PATH": ROOT_PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(sock_path)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + READY_S
            while True:
                why = "exited" if self.daemon.poll() is not None else None
                if why is None and time.monotonic() > deadline:
                    why = "sent no READY=1"
                assert why is None, f"{self.name}: the daemon {why}\n{self.journal()}"
                try:
                    if b"READY=1" in sock.recv(4096).split(b"\n"):
                        return
                except TimeoutError:
                    continue

    def stop_unit(self) -> int | None:
        """SIGTERM to the main process only (KillMode=process), waited for; its exit code."""
        if self.daemon is None or self.daemon.poll() is not None:
            return None if self.daemon is None else self.daemon.returncode
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(timeout=10)
            return None

    def close(self) -> None:
        self.stop_unit()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(timeout=10)


def network_lab(name: str, nodes: int, clients: int) -> Lab:
    """The lab's network alone (namespaces, bridges, addresses): the servers' software is what
    the document installs; `testbed.down` removes it."""
    config = testbed.LabConfig(
        name=name, nodes=nodes, clients=clients, remote_clients=0, app=AppKind.BUILTIN,
        datapath=False, rules=datapath_spec(name, None).rules, daemon=True,
    )  # fmt: skip
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    testbed.state_dir(name).mkdir()
    (testbed.state_dir(name) / "lab.json").write_text(config.model_dump_json(indent=2))
    lab = Lab(config, testbed.ip_command())
    lab._build_network()
    return lab


def dpkg_installed(package: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return res.returncode == 0 and "installed" in res.stdout and "not-installed" not in res.stdout


def _dpkg_knows(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


def scripts_install_packages() -> list[str]:
    text = (REPO / "scripts" / "install").read_text()
    m = re.search(r"^packages=\((.*?)\)", text, flags=re.S | re.M)
    assert m, "scripts/install has no packages=(...) list"
    return m.group(1).split()


class Walkthrough:
    """The state the document's commands build up, and one method per way (install_doc.WAYS)."""

    def __init__(self, tmp: Path, wheel: Path, lab: Lab) -> None:
        self.tmp, self.wheel, self.lab = tmp, wheel, lab
        self.dist = tmp / "dist"
        self.servers = {
            n: Server(n, lab.ns(n), tmp / n, own_etc=n != "node1") for n in lab.node_names
        }
        self.contexts: dict[str, Context] = {
            "build": Context("build", REPO, tmp / "build"),
            "admin": Context("admin", tmp / "admin", tmp / "admin-state"),
            "client1": Client("client1", lab.ns("client1"), tmp / "client1"),
            **self.servers,
        }
        self.by_address = {str(node_lan4(int(n[4:]))): n for n in lab.node_names}
        self.new: list[Path] = []  # what the package brings that this machine does not have
        self.purged = False

    def check(self, cmd: DocCommand, proc: subprocess.CompletedProcess[str], out: str) -> None:
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        missing = shows(out, cmd)
        assert not missing, f"{cmd}: does not print {missing}\n{out}"

    def as_written(self, cmd: DocCommand, m: re.Match[str]) -> str:
        proc = self.contexts[cmd.where].run(cmd.line, answers=cmd.answers)
        self.check(cmd, proc, proc.stdout + proc.stderr)
        return proc.stdout + proc.stderr

    def scripts_install(self, cmd: DocCommand, m: re.Match[str]) -> None:
        missing = [p for p in scripts_install_packages() if not dpkg_installed(p)]
        assert not missing, f"scripts/install did not install {missing}"

    def deb_build(self, cmd: DocCommand, m: re.Match[str]) -> None:
        proc = self.contexts["build"].run(
            cmd.line, timeout=600, OUT=str(self.dist), PYTHON=sys.executable, WHEEL=str(self.wheel)
        )
        self.check(cmd, proc, (proc.stdout + proc.stderr).replace(f"{self.dist}/", "dist/"))
        (deb,) = self.dist.glob("vipfarm_*.deb")
        info = run(["dpkg-deb", "-f", deb, "Depends"], self.tmp)
        for dep in ("nftables", "iproute2", "python3", "openssl"):
            assert dep in info
        contents = run(["dpkg-deb", "-c", deb], self.tmp).splitlines()
        paths = [
            Path("/" + ln.split(None, 5)[5].split(" -> ")[0].removeprefix("./")) for ln in contents
        ]
        self.new = [p for p in paths if p != Path("/") and not os.path.lexists(p)]
        # No made-up URL in what the package ships of its own (its Python dependencies' files
        # are theirs); the control file included.
        x = self.tmp / "deb-x"
        run(["dpkg-deb", "-R", deb, x], self.tmp)
        shutil.rmtree(next((x / "usr" / "lib" / "vipfarm" / "lib").glob("python3*")))
        assert made_up_urls(x) == []
        assert Path("/usr/bin/vipfarm") in self.new and Path("/usr/lib/vipfarm") in self.new

    def scp(self, cmd: DocCommand, m: re.Match[str]) -> None:
        src = self.dist / m["src"].removeprefix("dist/")
        shutil.copy(src, self.servers[self.by_address[m["addr"]]].cwd)

    def rsync(self, cmd: DocCommand, m: re.Match[str]) -> None:
        # rsync resolves /proc/PID/root itself (to /), so it runs in the server's namespaces,
        # reading from the admin's directory (this machine's /tmp, seen by both).
        server = self.servers[self.by_address[m["addr"]]]
        admin = self.contexts["admin"]
        proc = server.run(f"rsync -a {m['src']} {m['dest']}", cwd=admin.cwd)
        self.check(cmd, proc, proc.stdout + proc.stderr)
        token = server.view(m["dest"]) / "api.token"
        assert token.is_file() and token.stat().st_mode & 0o777 == 0o600, cmd

    def rsync_pull(self, cmd: DocCommand, m: re.Match[str]) -> None:
        server = self.servers[self.by_address[m["addr"]]]
        proc = server.run(f"rsync -a {m['src']} {m['dest']}", cwd=self.contexts["admin"].cwd)
        self.check(cmd, proc, proc.stdout + proc.stderr)

    def restart(self, cmd: DocCommand, m: re.Match[str]) -> None:
        server = self.servers[cmd.where]
        code = server.stop_unit()
        assert code == 0, f"{server.name}: daemon exit {code}\n{server.journal()}"
        server.exec_start(m["farm"])

    def service_install(self, cmd: DocCommand, m: re.Match[str]) -> None:
        out = self.as_written(cmd, m)
        farm = m["farm"]
        assert f"systemctl enable --now vipfarm@{farm}.service" in out, out
        server = self.servers[cmd.where]
        # The package's own unit passes too, and its man pages are installed.
        packaged = Path("/lib/systemd/system/vipfarm@.service")
        assert "ExecStart=/usr/bin/vipfarm daemon --config /etc/vipfarm/%i.toml" in \
            packaged.read_text()  # fmt: skip
        shutil.copy(packaged, self.tmp / f"vipfarm@{farm}.service")
        run(["systemd-analyze", "verify", self.tmp / f"vipfarm@{farm}.service"], self.tmp)
        run(["man", "-w", "vipfarm-init"], self.tmp)
        assert os.access("/usr/share/vipfarm/modules/nginx/start", os.X_OK)
        server.start_unit(farm)

    def service_remove(self, cmd: DocCommand, m: re.Match[str]) -> None:
        out = self.as_written(cmd, m)
        assert f"systemctl disable vipfarm@{m['farm']}.service" in out, out
        server = self.servers[cmd.where]
        code = server.stop_unit()
        assert code == 0, f"{server.name}: daemon exit {code}\n{server.journal()}"

    def purge(self, cmd: DocCommand, m: re.Match[str]) -> None:
        if self.purged:
            # Both servers share this machine's dpkg database: the first purge removed the
            # package for both, and apt no longer knows it (a real node2 still has it).
            proc = self.contexts[cmd.where].run(cmd.line)
            assert "Unable to locate package vipfarm" in proc.stderr, proc.stdout + proc.stderr
            return
        self.as_written(cmd, m)
        assert not _dpkg_knows("vipfarm")
        self.purged = True
        made = [Path("/etc/vipfarm"), Path("/var/lib/vipfarm"), Path("/var/log/vipfarm")]
        left = [p for p in [*self.new, *made] if os.path.lexists(p)]
        assert left == [], f"left behind by purge: {left[:20]}"
        for server in self.servers.values():
            units = list(server.view("/etc/systemd/system").rglob("vipfarm*"))
            assert units == [], f"{server.name}: {units}"

    def retry(self, cmd: DocCommand, m: re.Match[str]) -> None:
        deadline = time.monotonic() + RETRY_S
        while True:
            proc = self.contexts[cmd.where].run(cmd.line, timeout=30)
            out = proc.stdout + proc.stderr
            if (proc.returncode == 0 and not shows(out, cmd)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.check(cmd, proc, out)

    def wheel_build(self, cmd: DocCommand, m: re.Match[str]) -> None:
        pass  # the `wheel` fixture ran it

    def wheel_venv(self, cmd: DocCommand, m: re.Match[str]) -> None:
        pass  # the `installed` fixture ran it


def test_install_md_walkthrough(wheel: Path, installed: Path, tmp_path: Path) -> None:
    """docs/INSTALL.md from the package build to the purge, on two servers (module docstring;
    the `wheel` and `installed` fixtures run its wheel commands)."""
    cmds = [(c, *way_of(c)) for c in doc_commands()]  # a command no way covers fails here
    assert not _dpkg_knows("vipfarm"), "vipfarm is installed on this machine: purge it first"
    name = unique_name("pk")
    walk: Walkthrough | None = None
    try:
        walk = Walkthrough(tmp_path, wheel, network_lab(name, nodes=3, clients=1))
        for cmd, way, m in cmds:
            t0 = time.monotonic()
            getattr(walk, way.name)(cmd, m)
            print(f"{time.monotonic() - t0:6.2f} s  {way.name:16} {cmd}")  # with -s
        assert walk.purged
    finally:
        if walk is not None:
            for server in walk.servers.values():
                server.close()
        if _dpkg_knows("vipfarm"):
            subprocess.run(["dpkg", "--purge", "vipfarm"], capture_output=True, timeout=300)
        testbed.down(name)
