"""The systemd unit `vipfarm@.service`: one node daemon per farm, `vipfarm@web` for web.toml.

Theory of operation
-------------------
The unit is a template rendered for one executable: `vipfarm service install` writes it with
the real path of the `vipfarm` it runs as (a virtualenv's console script, /usr/bin/vipfarm of
the Debian package), so the boot start runs the same installation the operator tested; the
Debian package renders it at build time for /usr/bin/vipfarm. The rendered text is the whole
contract and is checked by `systemd-analyze verify` in the tests.

Hardening: the daemon is root and must stay able to do its job, and so must the application:
the module's start script runs the application (nginx, a generic program) as a child of the
daemon, inside this unit, with this unit's restrictions. So the unit restricts only what neither
needs, and says why for each; what it leaves open is stated too, so that nobody "fixes" it:

- open: CAP_NET_ADMIN (nftables, addresses on lo, the VMAC), CAP_NET_RAW (ARP/NDP responder on
  an AF_PACKET socket), CAP_SYS_NICE and no RestrictRealtime (the pulse raises itself to
  SCHED_RR so that no load on the host delays a heartbeat), /proc/sys writable (the data path
  sets arp_ignore, arp_announce and nf_conntrack_tcp_loose, and puts them back), /etc/vipfarm
  writable (`vipfarm config deploy` replaces the farm file), no capability bounding set, namespaces,
  SUID or W^X restriction (the application may need any of them: nginx switches users, a JIT
  runtime maps executable memory);
- restricted: the rest of /usr, /boot and /etc read-only (ProtectSystem=full), no kernel module
  loading by the service itself (the kernel still autoloads nf_tables on first use), no kernel
  log or hostname changes, cgroups read-only, native system calls only, and sockets of the
  families a farm uses (unix, IPv4, IPv6, netlink for nftables and addresses, packet).
  Not ProtectClock: it implies a device allow-list, and an application may need a device.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CONFIG_DIR",
    "MAN_PAGES",
    "UNIT_NAME",
    "installed_man_pages",
    "instance",
    "render_unit",
]

UNIT_NAME = "vipfarm@.service"
CONFIG_DIR = Path("/etc/vipfarm")


def instance(farm: str) -> str:
    return f"vipfarm@{farm}.service"


MAN_PAGES = ("man:vipfarm(1)", "man:vipfarm-daemon(1)")
# Where the man pages of an installation live (the Debian package's, a local install's).
MAN_DIRS = (Path("/usr/share/man/man1"), Path("/usr/local/share/man/man1"))


def installed_man_pages(dirs: Sequence[Path] = MAN_DIRS) -> tuple[str, ...]:
    """The man: URIs to name in Documentation=: only pages that exist, since `systemd-analyze
    verify` fails a unit whose documentation `man` cannot find (a pip install has none)."""
    return tuple(
        uri
        for uri in MAN_PAGES
        if any(
            next(d.glob(f"{uri[4:].split('(')[0]}.1*"), None) is not None
            for d in dirs
            if d.is_dir()
        )
    )


def render_unit(
    command: Sequence[str],
    *,
    config_dir: Path = CONFIG_DIR,
    documentation: Sequence[str] = MAN_PAGES,
) -> str:
    """The unit for the executable `command` (argv prefix: `/usr/bin/vipfarm`, or a Python
    interpreter with `-m vipfarm`); it must be absolute, systemd does not search PATH.
    `documentation`: URIs that exist on the host (see `installed_man_pages`)."""
    if not command or not Path(command[0]).is_absolute():
        raise ValueError(f"an absolute executable path for ExecStart, not {command!r}")
    exe = " ".join(shlex.quote(c) for c in command)
    conf = f"{config_dir}/%i.toml"
    docs = f"Documentation={' '.join(documentation)}\n" if documentation else ""
    return f"""\
# One vipfarm node daemon per farm: `systemctl enable --now vipfarm@web` runs
# {conf.replace("%i", "web")}. Written by `vipfarm service install` (or the Debian package) for
# {command[0]}; `vipfarm service install` again rewrites it.
[Unit]
Description=vipfarm node daemon (farm %i)
{docs}After=network-online.target nftables.service
Wants=network-online.target
AssertPathExists={conf}

[Service]
Type=notify
# The manager, a child of the daemon, says READY once its control socket and API listen.
NotifyAccess=all
ExecStart={exe} daemon --config {conf}
# SIGTERM drains the node (buckets move away, established connections finish) and then runs the
# module's stop script; give it the drain timeout plus the stop timeouts.
TimeoutStopSec=120
Restart=on-failure
RestartSec=1
# The application belongs to the module's start/stop scripts, not to the daemon: when the daemon
# crashes and restarts, the application keeps serving its established connections.
KillMode=process
LimitNOFILE=65536
# Root, with what the data path needs said out loud: CAP_NET_ADMIN (nftables, addresses),
# CAP_NET_RAW (ARP/NDP responder), CAP_SYS_NICE (the pulse runs at SCHED_RR).
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_SYS_NICE
StateDirectory=vipfarm
LogsDirectory=vipfarm
RuntimeDirectory=vipfarm
# Several farms share /run/vipfarm (one subdirectory each): stopping one keeps the others'.
RuntimeDirectoryPreserve=yes

# Hardening: only what neither the daemon nor the module's application needs (see
# vipfarm.install.unit). /proc/sys stays writable (the data path's sysctls), and so does
# /etc/vipfarm (`vipfarm config deploy` replaces the farm file); realtime scheduling stays
# allowed (the pulse).
ProtectSystem=full
ReadWritePaths={config_dir}
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET

[Install]
WantedBy=multi-user.target
"""
