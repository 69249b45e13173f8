"""From a package to a running farm, with nothing from the source tree (issue 16).

- The wheel, installed with its dependencies into a fresh virtualenv outside the checkout
  (`pip install`, PyPI through pip's own configuration), runs `vipfarm init` with flags for three
  lab nodes from an empty directory, and `vipfarm config check` accepts each node's directory;
  the modules come from the installed package.
- A lab whose node daemons are that installed `vipfarm`, with the files `init` wrote (HTTPS API,
  farm CA), serves the VIP, and its node APIs answer over verified HTTPS only.
- The Debian package built by `packaging/deb/build` installs on this machine, `vipfarm --version`
  and `vipfarm config check` work from it, its unit passes `systemd-analyze verify`, and purge
  leaves nothing behind, checked file by file. The test purges even when it fails.

Every subprocess runs with a clean environment (no PYTHONPATH) from a directory outside the
checkout, so nothing can be imported from the source tree by accident.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vipfarm.lab.testbed import LabFactory
from vipfarm.lab.topology import VIP4, node_hb, node_lan4

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", base, REPO], base)
    (built,) = base.glob("vipfarm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the checkout holding the wheel and its dependencies."""
    base = tmp_path_factory.mktemp("venv")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", venv], base)
    run([venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel], base)
    return venv


def init_flags(farm: str) -> list[str]:
    hosts = [f"node{i}={node_lan4(i)},{node_hb(i)}" for i in (1, 2, 3)]
    return [
        "--farm", farm, "--network", "lan", "--network", "hb2",
        *(a for h in hosts for a in ("--host", h)),
        "--vip", str(VIP4), "--rule", "tcp/80/client-ip-port",
    ]  # fmt: skip


def install_doc_commands() -> list[list[str]]:
    """The `vipfarm ...` commands of docs/INSTALL.md's shell blocks, continuations joined and
    comments dropped, as argv lists."""
    text = (REPO / "docs" / "INSTALL.md").read_text()
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "vipfarm":
                commands.append(argv)
    return commands


def test_install_doc_init_and_check_run_as_written(installed: Path, tmp_path: Path) -> None:
    # The farm of docs/INSTALL.md, written and checked by the installed vipfarm exactly as the
    # document says (its commands that need real servers run in the lab test below).
    cmds = {" ".join(argv[1:3]): argv for argv in install_doc_commands()}
    for needed in ("init --farm", "config check", "service install", "--version"):
        assert needed in cmds, f"docs/INSTALL.md has no `vipfarm {needed}`"
    bin_ = installed / "bin" / "vipfarm"
    farm_dir = tmp_path / "farm-web"
    farm_dir.mkdir()
    out = run([bin_, *cmds["init --farm"][1:]], farm_dir)
    assert "valid - farm web, 2 nodes" in out
    etc = farm_dir / "nodes" / "node1"  # what rsync places in node1's /etc/vipfarm
    check = [a.replace("/etc/vipfarm", str(etc)) for a in cmds["config check"][1:]]
    out = run([bin_, *check, "--node", "node1"], tmp_path)
    assert "node1 (this host)" in out
    # Not --enable: on a host that runs systemd, that would start a real vipfarm@web.
    service = [a for a in cmds["service install"][1:] if a != "--enable"]
    service += ["--config-dir", str(etc), "--unit-dir", str(tmp_path / "u")]
    run([bin_, *service], tmp_path)
    assert f"ExecStart={bin_} daemon" in (tmp_path / "u" / "vipfarm@.service").read_text()


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


def test_lab_of_installed_daemons_serves_the_vip_and_the_console_over_https(
    installed: Path, lab_factory: LabFactory, tmp_path: Path
) -> None:
    vipfarm = installed / "bin" / "vipfarm"
    # The lab builds the network and the nodes' web servers (0.0.0.0:80); the daemons, their
    # configuration and certificates come from the installed package alone.
    lab = lab_factory(nodes=3, clients=1, app="builtin", datapath=False, daemon=False)
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
# The Debian package


def dpkg_installed(package: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return res.returncode == 0 and "installed" in res.stdout and "not-installed" not in res.stdout


@pytest.fixture
def deb(wheel: Path, tmp_path: Path) -> Iterator[Path]:
    assert not dpkg_installed("vipfarm"), "vipfarm is installed on this machine: purge it first"
    out = tmp_path / "dist"
    env = clean_env(OUT=str(out), PYTHON=sys.executable, WHEEL=str(wheel))
    proc = subprocess.run(
        [str(REPO / "packaging" / "deb" / "build")], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (package,) = out.glob("vipfarm_*.deb")
    try:
        yield package
    finally:
        if dpkg_installed("vipfarm") or _dpkg_knows("vipfarm"):
            subprocess.run(["dpkg", "--purge", "vipfarm"], capture_output=True, timeout=300)


def _dpkg_knows(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


def test_debian_package_installs_works_and_purges_to_nothing(deb: Path, tmp_path: Path) -> None:
    contents = run(["dpkg-deb", "-c", deb], tmp_path).splitlines()
    paths = [
        Path("/" + line.split(None, 5)[5].split(" -> ")[0].removeprefix("./")) for line in contents
    ]
    paths = [p for p in paths if p != Path("/")]
    info = run(["dpkg-deb", "-f", deb, "Depends"], tmp_path)
    for dep in ("nftables", "iproute2", "python3"):
        assert dep in info
    # What the package brings that this machine does not have yet: all of it must go again.
    new = [p for p in paths if not os.path.lexists(p)]
    assert Path("/usr/bin/vipfarm") in new and Path("/usr/lib/vipfarm") in new
    made_by_vipfarm = [Path("/etc/vipfarm"), Path("/var/lib/vipfarm"), Path("/var/log/vipfarm")]
    for p in made_by_vipfarm:
        assert not p.exists(), f"{p} exists before the package is installed"

    run(["dpkg", "-i", deb], tmp_path, timeout=300)
    assert run(["/usr/bin/vipfarm", "--version"], tmp_path).strip() == f"vipfarm {VERSION}"
    for d in ("/etc/vipfarm", "/var/lib/vipfarm"):
        assert Path(d).is_dir()
    assert os.access("/usr/share/vipfarm/modules/nginx/start", os.X_OK)
    # A farm written and checked by the packaged vipfarm, its module from /usr/share.
    farm_dir = tmp_path / "farm"
    farm_dir.mkdir()
    run(["/usr/bin/vipfarm", "init", *init_flags("web")], farm_dir)
    out = run(["/usr/bin/vipfarm", "config", "check", "nodes/node1/web.toml", "--node", "node1"],
              farm_dir)  # fmt: skip
    assert "valid - farm web" in out and "/usr/share/vipfarm/modules/nginx" in out
    # The operator's files in /etc/vipfarm, as `init --node` and a daemon would leave them.
    shutil.copytree(farm_dir / "nodes" / "node1", "/etc/vipfarm", dirs_exist_ok=True)
    Path("/var/log/vipfarm/web").mkdir(parents=True)
    run(["/usr/bin/vipfarm", "config", "check", "/etc/vipfarm/web.toml", "--node", "node1"],
        tmp_path)  # fmt: skip
    # The unit, with its man pages installed, passes systemd-analyze verify.
    unit = Path("/lib/systemd/system/vipfarm@.service")
    assert "ExecStart=/usr/bin/vipfarm daemon --config /etc/vipfarm/%i.toml" in unit.read_text()
    shutil.copy(unit, tmp_path / "vipfarm@web.service")
    run(["systemd-analyze", "verify", tmp_path / "vipfarm@web.service"], tmp_path)
    run(["man", "-w", "vipfarm-init"], tmp_path)

    run(["dpkg", "--purge", "vipfarm"], tmp_path, timeout=300)
    assert not _dpkg_knows("vipfarm")
    left = [p for p in [*new, *made_by_vipfarm] if os.path.lexists(p)]
    assert left == [], f"left behind by purge: {left[:20]}"
