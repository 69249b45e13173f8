"""systemd readiness notification (`Type=notify`) without a dependency.

`notify("READY=1")` writes to $NOTIFY_SOCKET when systemd set it, and does nothing otherwise;
an error is swallowed because a missing supervisor must never stop the daemon.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
