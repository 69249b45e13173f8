"""The systemd unit (vipfarm.install.unit), `vipfarm service`, and the generated man pages.

The unit names the executable it is rendered for, no made-up URL, the hardening that fits, and
passes `systemd-analyze verify` (present on this machine and on CI's: the test fails, not skips,
where it is missing). `service install` refuses a farm file that does not load and writes
nothing; `remove` keeps the unit while another farm is enabled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vipfarm.cli.commands import build_app
from vipfarm.install.man import man_pages, roff_escape
from vipfarm.install.unit import installed_man_pages, render_unit

FLAGS = [
    "--farm", "web", "--host", "node1=198.51.100.11", "--host", "node2=198.51.100.12",
    "--vip", "198.51.100.100", "--no-tls",
]  # fmt: skip


def directives(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_unit_text() -> None:
    text = render_unit(["/usr/bin/vipfarm"])
    d = directives(text)
    assert d["ExecStart"] == "/usr/bin/vipfarm daemon --config /etc/vipfarm/%i.toml"
    assert d["Type"] == "notify" and d["NotifyAccess"] == "all"
    assert d["KillMode"] == "process"
    assert "CAP_SYS_NICE" in d["AmbientCapabilities"]
    assert d["ProtectSystem"] == "full" and d["ReadWritePaths"] == "/etc/vipfarm"
    assert "AF_PACKET" in d["RestrictAddressFamilies"]
    # What the pulse and the data path need is not restricted.
    for key in ("RestrictRealtime", "ProtectKernelTunables", "NoNewPrivileges", "ProtectClock"):
        assert key not in d
    assert not re.search(r"https?://", text)  # no made-up URLs
    assert d["Documentation"] == "man:vipfarm(1) man:vipfarm-daemon(1)"
    assert "Documentation" not in directives(render_unit(["/usr/bin/vipfarm"], documentation=()))
    venv = render_unit(["/opt/vf env/bin/python", "-m", "vipfarm"], config_dir=Path("/srv/vf"))
    assert directives(venv)["ExecStart"] == (
        "'/opt/vf env/bin/python' -m vipfarm daemon --config /srv/vf/%i.toml"
    )
    with pytest.raises(ValueError, match="absolute"):
        render_unit(["vipfarm"])


def test_installed_man_pages(tmp_path: Path) -> None:
    assert installed_man_pages([tmp_path]) == ()
    (tmp_path / "vipfarm.1.gz").write_bytes(b"")
    assert installed_man_pages([tmp_path, tmp_path / "missing"]) == ("man:vipfarm(1)",)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of systemd: apt-get install systemd"
    conf = tmp_path / "etc"
    conf.mkdir()
    (tmp_path / "vipfarm@web.service").write_text(
        render_unit([sys.executable, "-m", "vipfarm"], config_dir=conf, documentation=())
    )
    res = subprocess.run(
        [analyze, "verify", str(tmp_path / "vipfarm@web.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_service_install_and_remove(tmp_path: Path) -> None:
    runner = CliRunner()
    bundle, etc, units = tmp_path / "b", tmp_path / "etc", tmp_path / "units"
    res = runner.invoke(
        build_app("init"),
        ["init", *FLAGS, "--dir", str(bundle), "--node", "node1", "--etc", str(etc)],
    )
    assert res.exit_code == 0, res.output
    app = build_app("service")
    where = ["--config-dir", str(etc), "--unit-dir", str(units)]
    res = runner.invoke(app, ["service", "install", "shop", *where])
    assert res.exit_code == 2 and "shop.toml exists" in res.output
    (etc / "web.key").chmod(0o644)
    res = runner.invoke(app, ["service", "install", "web", *where])
    assert res.exit_code == 2 and "farm.key_file" in res.output, res.output
    assert not units.exists()  # refused: nothing written
    (etc / "web.key").chmod(0o600)
    res = runner.invoke(app, ["service", "install", "web", "--enable", *where])
    assert res.exit_code == 0, res.output
    unit = units / "vipfarm@.service"
    assert f"--config {etc}/%i.toml" in unit.read_text()
    assert os.stat(unit).st_mode & 0o777 == 0o644
    # Another farm still enabled: the unit stays; the last one gone: it goes.
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "vipfarm@web.service").symlink_to(unit)
    (wants / "vipfarm@db.service").symlink_to(unit)
    res = runner.invoke(app, ["service", "remove", "web", "--unit-dir", str(units)])
    assert res.exit_code == 0 and "still enabled for vipfarm@db.service" in res.output
    assert unit.exists() and not (wants / "vipfarm@web.service").is_symlink()
    res = runner.invoke(app, ["service", "remove", "db", "--unit-dir", str(units)])
    assert res.exit_code == 0 and not unit.exists()
    assert (etc / "web.toml").exists()  # the configuration stays


def test_man_pages_cover_every_command() -> None:
    import vipfarm.cli.commands

    root = typer.main.get_command(build_app())
    pages = man_pages(root, version="9.9")
    assert set(pages) == {"vipfarm.1", *(f"vipfarm-{c}.1" for c in vipfarm.cli.commands.COMMANDS)}
    init = pages["vipfarm-init.1"]
    assert init.startswith('.TH "VIPFARM-INIT" "1"')
    assert "\\-\\-host" in init and "vipfarm 9.9" in init
    config = pages["vipfarm-config.1"]
    assert all(f".SS {sub}" in config for sub in ("check", "deploy", "get"))
    man = shutil.which("man")
    assert man, "man-db: apt-get install man-db"
    for name in ("vipfarm.1", "vipfarm-init.1"):
        res = subprocess.run(
            [man, "-l", "-"],
            input=pages[name],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"},
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr.lower(), res.stderr


def test_roff_escape() -> None:
    assert roff_escape(".x\n'y\n-z \\") == "\\&.x\n\\&'y\n\\-z \\e"
