"""The control socket's rules that need no socket: farm names, who may run what, the layout.

The socket itself, its directories, the lock and the credentials are tests/linux/test_control.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vipfarm.datapath.spec import DatapathSpec
from vipfarm.node import control, host
from vipfarm.node.manager import CONTROL_MUTATING, CONTROL_PUBLIC


def test_farm_names_are_the_configurations() -> None:
    pattern = DatapathSpec.model_json_schema()["properties"]["farm"]["pattern"]
    assert f"^{control.FARM_NAME.pattern}$" == pattern
    for good in ("web", "a", "f-1_2", "x" * 16):
        assert control.check_farm_name(good) == good
    for bad in ("", "../etc", "a/b", "Web", "-x", "x" * 17, "a\0b", ".hidden", "a b"):
        with pytest.raises(control.FarmChoiceError, match="bad farm name"):
            control.check_farm_name(bad)


def test_the_socket_is_keyed_by_the_network_namespace() -> None:
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    assert control.address("web") == f"/run/vipfarm/control/{ino}/web.sock"
    assert control.address("web", netns=7) == "/run/vipfarm/control/7/web.sock"
    assert control.lock_path("web", netns=7) == "/run/vipfarm/control/7/web.lock"
    assert control.namespace_dir_of("/proc/self/ns/net") == f"/run/vipfarm/control/{ino}"


def server(**kw: Any) -> control.ControlServer:
    async def ok(args: dict[str, Any]) -> Any:
        return "done"

    handlers: dict[str, control.Handler] = dict.fromkeys(
        ("state", "farm", "stop", "log_page", "config"), ok
    )
    return control.ControlServer("web", handlers, **kw)


def test_only_the_public_commands_are_for_everyone() -> None:
    s = server(mutating={"stop"}, public={"state", "farm"})
    other = os.geteuid() + 1 if os.geteuid() else 65534
    for uid in (0, os.geteuid()):
        assert all(s.allowed(cmd, uid) is None for cmd in ("state", "stop", "log_page"))
    assert s.allowed("state", other) is None and s.allowed("farm", other) is None
    assert s.allowed("stop", other) == "'stop' changes the node: run it as root"
    assert s.allowed("log_page", other) == (
        "'log_page' is for root only: run it as root (any user may ask: farm, state)"
    )
    # Not listed, not allowed: a command added later is root's until someone decides otherwise.
    assert server().allowed("state", other) is not None


def test_a_command_cannot_be_public_and_mutating() -> None:
    with pytest.raises(ValueError, match="both public and mutating"):
        server(mutating={"stop"}, public={"stop"})


def test_the_managers_policy() -> None:
    assert {"state", "farm"} == CONTROL_PUBLIC
    assert {"start", "stop", "deploy", "snapshot"} <= CONTROL_MUTATING
    assert not CONTROL_PUBLIC & CONTROL_MUTATING


def test_dispatch_refuses_others_before_the_handler_runs() -> None:
    ran: list[str] = []

    async def stop(args: dict[str, Any]) -> Any:
        ran.append("stop")
        return "stopped"

    s = control.ControlServer("web", {"stop": stop}, mutating={"stop"})
    line = json.dumps({"cmd": "stop"}).encode()
    other = os.geteuid() + 1 if os.geteuid() else 65534
    reply = asyncio.run(s._dispatch(line, other))
    assert reply == {"ok": False, "error": "'stop' changes the node: run it as root"}
    assert ran == []
    assert asyncio.run(s._dispatch(line, os.geteuid())) == {"ok": True, "result": "stopped"}
    long_name = json.dumps({"cmd": "x" * 10_000}).encode()
    assert len(asyncio.run(s._dispatch(long_name, 0))["error"]) < 200  # not echoed whole


def test_a_server_in_a_directory_of_its_own_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without root: the directories are the test user's, which the checks accept for the
    # daemon's own user, and the client accepts a server of its own user.
    monkeypatch.setattr(host, "CONTROL_DIR", str(tmp_path / "vipfarm" / "control"))

    async def state(args: dict[str, Any]) -> Any:
        return {"node": "node1"}

    async def main() -> None:
        s = control.ControlServer("web", {"state": state}, public={"state"})
        await s.start()
        try:
            assert host.farms_here() == ["web"]
            answer = await asyncio.to_thread(control.call, "web", "state")
            assert answer == {"node": "node1"}
            with pytest.raises(control.ControlError, match="already runs"):
                await control.ControlServer("web", {}).start()
        finally:
            await s.close()

    asyncio.run(main())
    assert host.farms_here() == []
    assert not Path(host.control_dir()).exists()
