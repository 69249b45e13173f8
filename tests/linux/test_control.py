"""The local control channel: abstract Unix socket, JSON lines, credentials, errors."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

import pytest

from vipfarm.node import control, sdnotify
from vipfarm.node.host import farms_here


def run_with_server(
    handlers: dict[str, control.Handler], body: Any, mutating: set[str] | None = None
) -> Any:
    farm = "t" + uuid.uuid4().hex[:8]

    async def main() -> Any:
        server = control.ControlServer(farm, handlers, mutating or set())
        await server.start()
        try:
            return await asyncio.to_thread(body, farm)
        finally:
            await server.close()

    return asyncio.run(main())


async def _state(args: dict[str, Any]) -> Any:
    return {"node": "node1", "echo": args}


async def _boom(args: dict[str, Any]) -> Any:
    raise control.ControlError("cannot stop: not started")


async def _bug(args: dict[str, Any]) -> Any:
    return 1 // 0


def test_round_trip_and_errors() -> None:
    def body(farm: str) -> None:
        assert control.call(farm, "state", {"x": 1}) == {"node": "node1", "echo": {"x": 1}}
        assert farm in farms_here()
        assert control.resolve_farm(farm) == farm
        with pytest.raises(control.ControlError, match="not started"):
            control.call(farm, "stop")
        with pytest.raises(control.ControlError, match="unknown command 'nope'"):
            control.call(farm, "nope")
        with pytest.raises(control.ControlError, match="internal error in bug"):
            control.call(farm, "bug")
        # the daemon survives a bug and a garbage line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(control.address(farm))
            s.sendall(b"not json\n")
            assert b"bad request" in s.recv(4096)
        assert control.call(farm, "state")["node"] == "node1"

    run_with_server({"state": _state, "stop": _boom, "bug": _bug}, body)


def test_second_server_of_same_farm_is_refused() -> None:
    def body(farm: str) -> None:
        async def second() -> None:
            await control.ControlServer(farm, {}).start()

        with pytest.raises(control.ControlError, match="already runs"):
            asyncio.run(second())

    run_with_server({"state": _state}, body)


def test_mutating_command_needs_root_from_other_users() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (it switches to another uid in a child)")

    def body(farm: str) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, then try to stop the node
            os.close(r)
            try:
                os.setuid(65534)
                try:
                    control.call(farm, "stop")
                    msg = b"allowed"
                except control.ControlError as e:
                    msg = str(e).encode()
                state = control.call(farm, "state")["node"].encode()
                os.write(w, msg + b"|" + state)
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        out = os.read(r, 4096).decode()
        os.close(r)
        assert out == "'stop' changes the node: run it as root|node1"

    async def _stop(args: dict[str, Any]) -> Any:
        return "stopped"

    run_with_server({"state": _state, "stop": _stop}, body, mutating={"stop"})


def test_no_daemon_is_a_clear_error() -> None:
    with pytest.raises(control.ControlError, match="no vipfarm daemon of farm 'ghost'"):
        control.call("ghost", "state")


def test_sdnotify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    name = "\0vipfarm-test-notify-" + uuid.uuid4().hex[:8]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name[1:])
        assert sdnotify.notify("READY=1") is True
        assert s.recv(100) == b"READY=1"
