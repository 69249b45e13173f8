"""The support bundle of one node (`vipfarm snapshot`): a tar.gz to attach to a bug report.

It holds the node's state (JSON), its configuration file as running (the farm key and the API
token are files the configuration only names: their contents are never included), the tail of
the module and application logs, the farm's nftables tables, the metrics, and versions. Building
it reads files and the kernel, so it runs in a worker thread.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipfarm import __version__
from vipfarm.datapath import ruleset

LOG_TAIL_BYTES = 4 * 1024 * 1024
README = """\
vipfarm support snapshot of node {node} (farm {farm}), taken {when}.

state.json     the node's state and its view of the farm (vipfarm state --json)
config.toml    the configuration as the node runs it; key and token files are not included
logs/          the last {tail} MiB of the module log (events) and the application log
ruleset.json   the farm's nftables tables (nft -j list table ...)
metrics.txt    the Prometheus metrics at that moment
versions.json  vipfarm, Python and kernel versions
"""


def _tail(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - LOG_TAIL_BYTES))
            return f.read()
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})\n".encode()


def _ruleset(farm: str) -> Any:
    try:
        import nftables

        nft = nftables.Nftables()
        nft.set_json_output(True)
        out: dict[str, Any] = {}
        for family in ("inet", "netdev"):
            rc, text, err = nft.cmd(f"list table {family} {ruleset.table_name(farm)}")
            out[family] = json.loads(text) if rc == 0 and text.strip() else {"error": err.strip()}
        return out
    except Exception as e:  # a snapshot is for diagnosis: report, never fail
        return {"error": repr(e)}


def build(
    *,
    farm: str,
    node: str,
    state: Mapping[str, Any],
    config_text: str,
    logs: Mapping[str, Path],
    metrics: bytes,
) -> bytes:
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    files: dict[str, bytes] = {
        "README": README.format(
            node=node, farm=farm, when=when, tail=LOG_TAIL_BYTES // 2**20
        ).encode(),
        "state.json": json.dumps(state, indent=2).encode(),
        "config.toml": config_text.encode(),
        "ruleset.json": json.dumps(_ruleset(farm), indent=2).encode(),
        "metrics.txt": metrics,
        "versions.json": json.dumps(
            {
                "vipfarm": __version__,
                "python": sys.version,
                "kernel": platform.release(),
                "host": platform.node(),
            },
            indent=2,
        ).encode(),
    }
    for name, path in logs.items():
        files[f"logs/{name}.log"] = _tail(path)
    buf = io.BytesIO()
    prefix = f"vipfarm-{farm}-{node}"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
