"""The local control channel: its socket in root-only directories, one daemon per farm and network
namespace, JSON lines, who may do what, errors; and `vipfarm state` against a live socket.

Runs as root: the socket lives under /run/vipfarm/control, and the tests switch to `nobody`
(uid 65534) in forked children or with `setpriv` to play the unprivileged local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vipfarm.lab.testbed import LabFactory
from vipfarm.node import control, host, sdnotify
from vipfarm.node.host import farms_here
from vipfarm.node.manager import CONTROL_MUTATING, CONTROL_PUBLIC

NOBODY = 65534
SRC = Path(control.__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root (the socket directories are root's)")


def new_farm() -> str:
    return "t" + uuid.uuid4().hex[:8]


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def run_with_server(
    handlers: dict[str, control.Handler],
    body: Callable[[str], Any],
    mutating: set[str] | frozenset[str] = frozenset(),
    public: set[str] | frozenset[str] = frozenset({"state"}),
    farm: str | None = None,
) -> Any:
    """`body(farm)` in a thread while a ControlServer of `farm` serves in this one."""
    farm = farm or new_farm()

    async def main() -> Any:
        server = control.ControlServer(farm, handlers, mutating, public)
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
        path = Path(control.address(farm))
        assert path == Path(
            f"/run/vipfarm/control/{os.stat('/proc/self/ns/net').st_ino}/{farm}.sock"
        )
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 and stat.S_ISSOCK(path.stat().st_mode)
        for d in (path.parent, path.parent.parent, path.parent.parent.parent):
            st = d.lstat()
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0, d
            assert not st.st_mode & 0o022, d
        assert (path.parent / f"{farm}.lock").read_text() == f"{os.getpid()}\n"
        assert control.call(farm, "state", {"x": 1}) == {"node": "node1", "echo": {"x": 1}}
        assert farm in farms_here()
        assert control.resolve_farm(farm) == farm
        with pytest.raises(control.ControlError, match="not started"):
            control.call(farm, "stop")
        with pytest.raises(control.ControlError, match="unknown command 'nope'"):
            control.call(farm, "nope")
        with pytest.raises(control.ControlError, match="internal error in bug"):
            control.call(farm, "bug")
        # the daemon survives a bug and garbage lines
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(b"not json\n[1, 2]\n")
            s.settimeout(10)
            got = b""
            while got.count(b"\n") < 2:
                got += s.recv(4096) or b"(closed)\n"
            assert got.count(b"bad request") == 2, got
        assert control.call(farm, "state")["node"] == "node1"
        return None

    farm = new_farm()
    run_with_server({"state": _state, "stop": _boom, "bug": _bug}, body, farm=farm)
    # A clean close leaves nothing behind.
    assert not Path(control.address(farm)).exists()
    assert not Path(control.lock_path(farm)).exists()
    assert farm not in farms_here()


def test_second_server_of_same_farm_is_refused() -> None:
    def body(farm: str) -> None:
        async def second() -> None:
            await control.ControlServer(farm, {}).start()

        with pytest.raises(control.ControlError, match=f"already runs .*pid {os.getpid()}"):
            asyncio.run(second())
        assert control.call(farm, "state")["node"] == "node1"  # the first one is untouched

    run_with_server({"state": _state}, body)


def test_running_daemon_is_the_holder_of_the_lock() -> None:
    def body(farm: str) -> None:
        assert control.running_daemon(farm) == os.getpid()
        assert control.running_daemon(farm) == os.getpid()  # asking took nothing away
        assert control.call(farm, "state")["node"] == "node1"

    farm = new_farm()
    assert control.running_daemon(farm) is None
    run_with_server({"state": _state}, body, farm=farm)
    assert control.running_daemon(farm) is None


def test_a_second_daemon_of_a_node_refuses_to_start(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2, clients=0, daemon=True, app="builtin")
    before = lab.daemon_state("node1")
    manager = before["processes"]["manager_pid"]
    second = lab.exec(
        "node1",
        [
            sys.executable,
            "-m",
            "vipfarm",
            "daemon",
            "--config",
            str(lab.node_config("node1")),
            "--node",
            "node1",
            "--run-dir",
            str(lab.dir / "run" / "second"),
            "--log-dir",
            str(lab.dir / "nodelogs" / "second"),
        ],
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(
        f"error: another vipfarm daemon of farm {lab.name!r} already runs in this network "
        f"namespace (pid {manager}, socket "
    )
    after = lab.daemon_state("node1")
    assert after["state"] == "UP" and after["processes"]["manager_pid"] == manager
    assert not (lab.dir / "run" / "second").exists()  # it started nothing


def _serve_forever(farm: str, ready: int) -> None:
    """A forked child: a daemon's control socket, until it is killed."""

    async def main() -> None:
        server = control.ControlServer(farm, {"state": _state}, public={"state"})
        await server.start()
        os.write(ready, b"up")
        await asyncio.sleep(3600)

    try:
        asyncio.run(main())
    finally:
        os._exit(1)


def test_a_crashed_daemons_socket_does_not_block_a_restart() -> None:
    farm = new_farm()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _serve_forever(farm, w)
    os.close(w)
    try:
        assert os.read(r, 2) == b"up"
        assert control.call(farm, "state")["node"] == "node1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    path = Path(control.address(farm))
    assert path.exists() and Path(control.lock_path(farm)).exists()  # left by the crash
    assert farm not in farms_here()
    with pytest.raises(control.DaemonUnreachable, match="no vipfarm daemon of farm"):
        control.call(farm, "state")

    def body(farm: str) -> None:
        assert control.call(farm, "state")["node"] == "node1"
        assert farms_here().count(farm) == 1

    run_with_server({"state": _state}, body, farm=farm)


def _in_child(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """fn() in a forked child; its JSON-able result, or its exception's text raised here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": fn()}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        with contextlib.suppress(BaseException):
            os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child did not finish within {timeout:g} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    got = json.loads(b"".join(chunks) or b'{"error": "the child said nothing"}')
    if "error" in got:
        raise AssertionError(got["error"])
    return got["ok"]


def _as_nobody(fn: Callable[[], Any]) -> Any:
    def child() -> Any:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return fn()

    return _in_child(child)


def _errno_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as e:
        return type(e).__name__
    return "done"


def test_an_unprivileged_user_cannot_take_the_socket_before_the_daemon() -> None:
    farm = new_farm()

    def in_a_new_namespace() -> dict[str, Any]:
        # A namespace of our own, fresh: its control directory does not exist yet, as on a node
        # before its daemon first starts.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        here = host.control_dir()
        assert not os.path.exists(here)
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def squat() -> dict[str, str]:
            def bind_path() -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.bind(control.address(farm))

            def bind_in_control_dir() -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.bind(f"{host.CONTROL_DIR}/{farm}.sock")

            return {
                "mkdir_namespace_dir": _errno_of(lambda: os.mkdir(here)),
                "file_in_control_dir": _errno_of(lambda: open(f"{host.CONTROL_DIR}/x", "w")),
                "mkdir_in_run_vipfarm": _errno_of(lambda: os.mkdir("/run/vipfarm/control2")),
                "bind_socket_path": _errno_of(bind_path),
                "bind_in_control_dir": _errno_of(bind_in_control_dir),
            }

        # The old attack, from root here for brevity: the abstract name the daemon used to take.
        squatter.bind(f"\0vipfarm/{farm}")
        squatter.listen()
        before = _as_nobody(squat)

        async def daemon() -> dict[str, Any]:
            server = control.ControlServer(farm, {"state": _state}, public={"state"})
            await server.start()
            try:
                during = await asyncio.to_thread(
                    _as_nobody,
                    lambda: {
                        "state": control.call(farm, "state")["node"],
                        "unlink": _errno_of(lambda: os.unlink(control.address(farm))),
                        "lock": _errno_of(lambda: os.open(control.lock_path(farm), os.O_RDWR)),
                        "rename_dir": _errno_of(lambda: os.rename(here, here + ".x")),
                    },
                )
                root_answer = await asyncio.to_thread(control.call, farm, "state")
                return {"during": during, "root": root_answer["node"]}
            finally:
                await server.close()

        return {"before": before, **asyncio.run(daemon())}

    got = _in_child(in_a_new_namespace)
    assert got["before"] == {
        "mkdir_namespace_dir": "PermissionError",
        "file_in_control_dir": "PermissionError",
        "mkdir_in_run_vipfarm": "PermissionError",
        "bind_socket_path": "FileNotFoundError",  # its directory is not there, nor can it be
        "bind_in_control_dir": "PermissionError",
    }
    assert got["during"] == {
        "state": "node1",  # nobody still reads the state
        "unlink": "PermissionError",
        "lock": "PermissionError",
        "rename_dir": "PermissionError",
    }
    assert got["root"] == "node1"


def test_unsafe_directories_are_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "CONTROL_DIR", str(tmp_path / "vipfarm" / "control"))
    farm = new_farm()
    ns_dir = Path(host.control_dir())

    async def start() -> None:
        server = control.ControlServer(farm, {"state": _state})
        await server.start()
        await server.close()

    ns_dir.mkdir(parents=True, mode=0o755)
    ns_dir.chmod(0o777)  # anyone could have made a socket in there
    with pytest.raises(control.ControlError, match=f"{ns_dir} must be a directory owned by root"):
        asyncio.run(start())
    ns_dir.chmod(0o755)
    os.chown(ns_dir, NOBODY, NOBODY)
    with pytest.raises(control.ControlError, match=f"owner uid {NOBODY}.*rm -r {ns_dir}"):
        asyncio.run(start())
    ns_dir.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ns_dir.symlink_to(elsewhere)
    with pytest.raises(control.ControlError, match="it is not a directory"):
        asyncio.run(start())
    ns_dir.unlink()
    (tmp_path / "vipfarm").chmod(0o775)
    with pytest.raises(control.ControlError, match=f"{tmp_path / 'vipfarm'} must be"):
        asyncio.run(start())
    (tmp_path / "vipfarm").chmod(0o755)
    asyncio.run(start())  # and made right, it starts (and cleans up after itself)
    assert not ns_dir.exists()


def _impostor(path: str, ready: int) -> None:
    """A forked child: a socket bound by root, listening as nobody, answering anything."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        sock.listen()  # SO_PEERCRED of the clients' end: who listened
        os.write(ready, b"up")
        sock.settimeout(60)
        while True:
            conn, _ = sock.accept()
            with conn:
                if conn.recv(4096):
                    conn.sendall(b'{"ok": true, "result": {"node": "impostor"}}\n')
    finally:
        os._exit(0)


def test_a_server_that_is_not_root_is_refused_by_the_cli() -> None:
    farm = new_farm()
    control._own_dirs(None)
    path = control.address(farm)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _impostor(path, w)
    os.close(w)
    try:
        assert os.read(r, 2) == b"up"
        with pytest.raises(control.ControlError, match=f"served by uid {NOBODY}.*not by root"):
            control.call(farm, "state")
        for args in (["state"], ["state", "--json"], ["--port", "9010", "state"], ["stop"]):
            proc = vipfarm(*args, "--farm", farm)
            assert proc.returncode == 1, proc
            assert proc.stdout == ""
            assert proc.stderr.startswith(f"error: the control socket {path} is served by uid ")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_other_users_cannot_hold_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "OTHER_REQUEST_TIMEOUT_S", 3.0)  # its 9 connects take ms
    servers: list[control.ControlServer] = []

    def flood(farm: str) -> dict[str, Any]:
        def as_nobody() -> dict[str, Any]:
            held = []
            for _ in range(control.MAX_OTHER_CLIENTS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(control.address(farm))
                held.append(s)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
                extra.settimeout(10)
                extra.connect(control.address(farm))
                extra_got = extra.recv(100)  # closed at once, unanswered
            held[0].settimeout(10)
            held[0].sendall(b"not json, but in time\n")
            in_time = held[0].recv(4096)
            held[1].settimeout(10)
            silent = held[1].recv(100)  # the server gives up on a connection that says nothing
            return {
                "extra": extra_got.decode(),
                "in_time": in_time.decode(),
                "silent": silent.decode(),
            }

        got: dict[str, Any] = _as_nobody(as_nobody)
        got["root"] = control.call(farm, "state")["node"]  # never locked out
        return got

    async def main() -> dict[str, Any]:
        server = control.ControlServer(new_farm(), {"state": _state})
        servers.append(server)
        await server.start()
        try:
            return await asyncio.to_thread(flood, server.farm)
        finally:
            await server.close()

    got = asyncio.run(main())
    assert got["extra"] == "" and got["silent"] == ""
    assert "bad request" in got["in_time"]
    assert got["root"] == "node1"
    refused = servers[0].refused
    assert refused["too_many_clients"] >= 1 and refused["request_timeout"] >= 1, refused
    assert refused["bad_request"] == 1


# ------------------------------------------------------------------ the CLI against a socket

STATUS = {
    "farm_name": "web",
    "node": "node1",
    "state": "UP",
    "share": 50.0,
    "app": "running",
    "owned": [0, 2],
    "split_brain": False,
    "drops": {},
    "counters": {"heartbeats_sent": 10},
    "config_version": 2,
    "config_digest": "abc",
    "farm": [
        {
            "node": "node1",
            "state": "UP",
            "share": 50.0,
            "alive": True,
            "incarnation": 1,
            "weight": 1,
            "heartbeat_age_ms": {},
            "config_version": 2,
        },
        {
            "node": "node2",
            "state": "UP",
            "share": 50.0,
            "alive": True,
            "incarnation": 2,
            "weight": 1,
            "heartbeat_age_ms": {"lan": 21.7},
            "config_version": None,
        },
    ],
    "processes": {"manager_pid": 1, "pulse_pid": 2, "pulse_answered": False},
}


async def _farm(args: dict[str, Any]) -> Any:
    return STATUS


async def _stop(args: dict[str, Any]) -> Any:
    return {"node": "node1", "state": "DRAINING", "force": bool(args.get("force"))}


async def _log_page(args: dict[str, Any]) -> Any:
    return {"lines": ["secret"], "next_offset": 6, "size": 6}


MANAGER_LIKE: dict[str, control.Handler] = {
    "state": _farm,
    "farm": _farm,
    "stop": _stop,
    "start": _stop,
    "log_page": _log_page,
}


def vipfarm(*args: str, user: int | None = None, importtime: bool = False) -> Any:
    """`python -m vipfarm ARGS` as the operator runs it (as `user`: setpriv), output captured."""
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(SRC),
        "COLUMNS": "100",
        "LANG": "C.UTF-8",
    }
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [*prefix, sys.executable, *flags, "-m", "vipfarm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )


@contextlib.contextmanager
def manager_like_server() -> Iterator[str]:
    """A control socket with the manager's policy (who may do what) and canned answers."""
    farm = new_farm()
    started: list[str] = []
    stop = asyncio.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        server = control.ControlServer(farm, MANAGER_LIKE, CONTROL_MUTATING, CONTROL_PUBLIC)
        await server.start()
        loop_box.append(asyncio.get_running_loop())
        started.append(farm)
        try:
            await stop.wait()
        finally:
            await server.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    wait_for("the control server", lambda: bool(started) or not thread.is_alive())
    assert started, "the control server did not start"
    try:
        yield farm
    finally:
        loop_box[0].call_soon_threadsafe(stop.set)
        thread.join(10)


def test_an_unprivileged_user_may_ask_state_but_not_stop() -> None:
    with manager_like_server() as farm:
        for who in (NOBODY, None):
            table = vipfarm("state", "--farm", farm, user=who)
            assert table.returncode == 0, table.stderr
            assert table.stdout.startswith("farm web, node node1: UP 50% (application running)")
            assert "warning: the pulse did not answer" in table.stdout
            as_json = vipfarm("state", "--json", "--farm", farm, user=who)
            assert as_json.returncode == 0 and json.loads(as_json.stdout)["node"] == "node1"
        stop = vipfarm("stop", "--farm", farm, user=NOBODY)
        assert (stop.returncode, stop.stderr) == (
            1,
            "error: 'stop' changes the node: run it as root\n",
        )
        log = vipfarm("log", "--farm", farm, user=NOBODY)
        assert log.returncode == 1 and "'log_page' is for root only" in log.stderr
        assert "secret" not in log.stdout
        as_root = vipfarm("stop", "--farm", farm)
        assert (as_root.returncode, as_root.stdout) == (0, "node node1 is DRAINING\n")


def test_state_prints_the_same_by_both_paths_and_imports_no_framework() -> None:
    with manager_like_server() as farm:
        for args in (["--farm", farm], ["--json", "--farm", farm]):
            fast = vipfarm("state", *args, importtime=True)
            # A root option sends `state` through the typer app (vipfarm.cli.main).
            typer_path = vipfarm("--port", "9010", "state", *args, importtime=True)
            assert fast.returncode == typer_path.returncode == 0, (fast.stderr, typer_path.stderr)
            assert fast.stdout == typer_path.stdout
            fast_modules = {
                line.rsplit("|", 1)[1].strip()
                for line in fast.stderr.splitlines()
                if line.startswith("import time:")
            }
            assert "vipfarm.cli.local" in fast_modules
            heavy = ("typer", "pydantic", "rich", "asyncio", "psutil", "vipfarm.api")
            assert sorted(m for m in fast_modules if m.startswith(heavy)) == []
            assert "import time:" in typer_path.stderr and "typer" in typer_path.stderr


def test_no_daemon_is_a_clear_error() -> None:
    with pytest.raises(control.DaemonUnreachable, match="no vipfarm daemon of farm 'ghost'"):
        control.call("ghost", "state")
    with pytest.raises(control.FarmChoiceError, match=r"bad farm name '\.\./etc'"):
        control.call("../etc", "state")


def test_sdnotify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    name = "\0vipfarm-test-notify-" + uuid.uuid4().hex[:8]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name[1:])
        assert sdnotify.notify("READY=1") is True
        assert s.recv(100) == b"READY=1"
