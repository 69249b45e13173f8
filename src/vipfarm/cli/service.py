"""`vipfarm service install|remove FARM [--enable]`: the boot start of a farm's daemon.

Theory of operation
-------------------
`install` checks the farm file (/etc/vipfarm/FARM.toml) as `vipfarm config check` does, writes
the template unit `vipfarm@.service` (`vipfarm.install.unit`) into the unit directory with the
real path of the `vipfarm` running this command, creates the configuration directory, reloads
systemd and, with `--enable`, enables and starts `vipfarm@FARM`. A farm file that does not load
refuses the install and changes nothing. `remove` stops and disables `vipfarm@FARM` and removes
the unit file once no other farm of this host is enabled; the configuration stays (it holds the
farm's secrets, which the operator removes on purpose, not by accident).

When systemd is not the running init (a container, a chroot), the files are still written and
the systemctl steps are printed instead of run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import typer

app = typer.Typer(help="The systemd unit of a farm's daemon.", no_args_is_help=True)

EXIT_INVALID = 2
_UNIT_DIR = Path("/etc/systemd/system")


def _systemd_running() -> bool:
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    return Path("/run/systemd/system").is_dir()


def _command() -> list[str]:
    """The argv prefix that runs this very installation of vipfarm."""
    script = Path(sys.argv[0])
    if script.name == "vipfarm" and script.is_file():
        # A console script (a venv's bin/vipfarm, /usr/bin/vipfarm): its absolute path. Not
        # resolved through symlinks: a venv's python is a symlink to the base interpreter.
        return [os.path.abspath(script)]
    return [os.path.abspath(sys.executable), "-m", "vipfarm"]


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        typer.echo(f"error: systemctl {' '.join(args)}: {proc.stderr.strip()}", err=True)
        raise typer.Exit(1)


@app.callback()
def group() -> None:
    """The systemd unit of a farm's daemon."""


@app.command()
def install(
    farm: str = typer.Argument(..., help="the farm: its file is CONFIG_DIR/FARM.toml"),
    enable: bool = typer.Option(False, "--enable", help="also enable and start vipfarm@FARM"),
    config_dir: Path = typer.Option(Path("/etc/vipfarm"), "--config-dir", hidden=True),
    unit_dir: Path = typer.Option(_UNIT_DIR, "--unit-dir", hidden=True),
) -> None:
    """Write vipfarm@.service for this vipfarm (and start vipfarm@FARM with --enable)."""
    from vipfarm.config.loading import load_config
    from vipfarm.config.problems import ConfigError
    from vipfarm.install.unit import UNIT_NAME, installed_man_pages, instance, render_unit

    file = config_dir / f"{farm}.toml"
    if not file.is_file():
        typer.echo(
            f"error: FARM: bad value {farm!r}: expected a farm whose file {file} exists; "
            "write it with `vipfarm init` (nothing was installed)",
            err=True,
        )
        raise typer.Exit(EXIT_INVALID)
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        typer.echo(f"error: {file}: invalid (nothing was installed)", err=True)
        for p in exc.problems:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    if cfg.farm.name != farm:
        typer.echo(
            f"error: FARM: bad value {farm!r}: {file} names farm {cfg.farm.name!r}; "
            f"rename the file {cfg.farm.name}.toml (nothing was installed)",
            err=True,
        )
        raise typer.Exit(EXIT_INVALID)
    unit = unit_dir / UNIT_NAME
    tmp = unit.with_name(unit.name + ".tmp")
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(
            render_unit(_command(), config_dir=config_dir, documentation=installed_man_pages())
        )
        tmp.chmod(0o644)
        os.replace(tmp, unit)  # atomic: systemd never reads half a unit
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        typer.echo(f"error: cannot write {unit}: {exc} (as root?)", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {unit} (ExecStart: {' '.join(_command())})")
    steps = [("daemon-reload",)] + ([("enable", "--now", instance(farm))] if enable else [])
    if _systemd_running():
        for step in steps:
            _systemctl(*step)
        if enable:
            typer.echo(f"{instance(farm)} enabled and started: vipfarm state")
    else:
        typer.echo("systemd is not running here; once it is:")
        for step in steps:
            typer.echo(f"  systemctl {' '.join(step)}")
    if not enable:
        typer.echo(f"start at boot: systemctl enable --now {instance(farm)}")


@app.command()
def remove(
    farm: str = typer.Argument(..., help="the farm whose vipfarm@FARM stops"),
    unit_dir: Path = typer.Option(_UNIT_DIR, "--unit-dir", hidden=True),
) -> None:
    """Stop and disable vipfarm@FARM; remove the unit once no farm uses it (the configuration
    in /etc/vipfarm stays)."""
    from vipfarm.install.unit import UNIT_NAME, instance

    if _systemd_running():
        _systemctl("disable", "--now", instance(farm))
    else:
        typer.echo(f"systemd is not running here; once it is: systemctl disable {instance(farm)}")
        wants = unit_dir / "multi-user.target.wants" / instance(farm)
        if wants.is_symlink():
            wants.unlink()
    others = sorted(p.name for p in unit_dir.glob("*.wants/vipfarm@*.service"))
    unit = unit_dir / UNIT_NAME
    if others:
        typer.echo(f"kept {unit}: still enabled for {', '.join(others)}")
    elif unit.exists():
        unit.unlink()
        typer.echo(f"removed {unit}")
        if _systemd_running():
            _systemctl("daemon-reload")
