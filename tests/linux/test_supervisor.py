"""The application supervisor with real processes, on loopback only. No root needed.

Every wait polls a condition against a deadline; the deadlines are generous for a loaded 2-core
machine, the timeouts under test are short so the suite stays fast.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vipfarm.config.loading import parse_config
from vipfarm.supervisor import (
    AppState,
    AppSupervisor,
    Exhausted,
    Healthy,
    Restarting,
    RestartWindow,
    RiseFall,
    ScriptFinished,
    ScriptRunner,
    SupervisorEvent,
    Unhealthy,
    group_members,
    pid_alive,
    run_check,
    setup_node_logs,
)
from vipfarm.supervisor.spec import (
    AppSpec,
    CommandCheck,
    HttpCheck,
    LinkCheck,
    ProcessCheck,
    RestartSpec,
    TcpCheck,
)

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


async def until(pred: Callable[[], bool], timeout_s: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Any, Any, Path]:
    module_log, app_log = setup_node_logs(tmp_path / "logs")
    return module_log, app_log, tmp_path / "logs"


def runner(logs: tuple[Any, Any, Path], env: dict[str, str] | None = None) -> ScriptRunner:
    return ScriptRunner(env=env or {}, cwd=None, app_log=logs[1], module_log=logs[0])


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


# --------------------------------------------------------------------------------------------
# Scripts


def test_script_output_env_exit_code_and_logs(logs: tuple[Any, Any, Path]) -> None:
    async def main() -> None:
        r = runner(logs, {"VIPFARM_M_PORT": "8080"})
        res = await r.run("greet", sh('echo "hello $VIPFARM_M_PORT"; echo oops >&2; exit 3'), 10)
        assert res.exit_code == 3 and not res.ok and not res.timed_out
        assert 0 < res.duration_s < 10
        assert res.tail == ("hello 8080", "oops")
        r.close()

    run(main())
    app = (logs[2] / "app.log").read_text()
    assert "greet: hello 8080" in app and "greet: oops" in app
    module = (logs[2] / "module.log").read_text()
    assert "script_finished script=greet exit_code=3" in module


def test_missing_program_is_a_result_not_an_exception(logs: tuple[Any, Any, Path]) -> None:
    res = run(runner(logs).run("start", ["/nonexistent/start"], 5))
    assert res.exit_code is None and res.error and not res.ok
    assert "could not run" in res.summary


def test_timeout_kills_the_whole_group_including_grandchildren(
    logs: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # The grandchild ignores SIGTERM, so only the SIGKILL after the grace can end it.
    script = f"(trap '' TERM; exec sleep 60) & echo $! > {pidfile}; exec sleep 60"

    async def main() -> None:
        began = time.monotonic()
        res = await runner(logs).run("slow", sh(script), 0.5, grace_s=0.3)
        assert res.timed_out and not res.ok
        assert time.monotonic() - began < 10
        grandchild = int(pidfile.read_text())
        assert not pid_alive(grandchild)

    run(main())


def test_finished_script_leaves_nothing_behind(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"

    async def main() -> None:
        res = await runner(logs).run("stop", sh(f"sleep 60 & echo $! > {pidfile}"), 10)
        assert res.ok
        assert not pid_alive(int(pidfile.read_text()))

    run(main())


def test_start_group_is_kept_until_forced_stop(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"

    async def main() -> None:
        r = runner(logs)
        # The background "application" holds the output pipe: run() must still return at once.
        script = f"(trap '' TERM; exec sleep 60) & echo $! > {pidfile}; echo started"
        res = await r.run("start", sh(script), 10, keep_group=True)
        assert res.ok and res.duration_s < 5
        app = int(pidfile.read_text())
        assert pid_alive(app) and r.kept_groups
        pgid = r.kept_groups[0]
        assert group_members(pgid) == [app]
        assert await r.kill_kept_groups(grace_s=0.2) == 1
        assert not pid_alive(app) and not r.kept_groups
        r.close()

    run(main())
    assert "group_killed" in (logs[2] / "module.log").read_text()


def test_cancelling_a_script_kills_its_group(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "gc.pid"

    async def main() -> None:
        task = asyncio.create_task(
            runner(logs).run("start", sh(f"sleep 60 & echo $! > {pidfile}; sleep 60"), 60)
        )
        await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", what="pid")
        grandchild = int(pidfile.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not pid_alive(grandchild), 5, "grandchild gone")

    run(main())


# --------------------------------------------------------------------------------------------
# Checkers


def test_rise_fall() -> None:
    f = RiseFall(rise=2, fall=3)
    assert not f.healthy
    assert [f.update(x) for x in (True, False, True, True)] == [False, False, False, True]
    assert f.healthy
    assert [f.update(x) for x in (False, False, True, False, False, False)] == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert not f.healthy


def test_restart_window() -> None:
    w = RestartWindow(RestartSpec(max=2, within_s=10))
    assert w.allow(0) and w.allow(1) and not w.allow(2)
    assert w.allow(10.5)  # the restart at 0 left the window
    assert not w.allow(10.6)
    assert not RestartWindow(RestartSpec(max=0, within_s=10)).allow(0)


def test_tcp_checker(logs: tuple[Any, Any, Path]) -> None:
    r = runner(logs)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        ok = run(run_check(TcpCheck(port=port), r))
    assert ok.ok, ok.detail
    bad = run(run_check(TcpCheck(port=port), r))  # the socket is closed now
    assert not bad.ok and bad.detail


def test_http_checker(logs: tuple[Any, Any, Path]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        status = b"200 OK" if b" /ok " in request else b"503 Unavailable"
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain\r\n\r\npong\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r = runner(logs)
        base = f"http://127.0.0.1:{port}"
        async with server:
            assert (await run_check(HttpCheck(url=f"{base}/ok"), r)).ok
            assert (await run_check(HttpCheck(url=f"{base}/ok", expect_body="pong"), r)).ok
            res = await run_check(HttpCheck(url=f"{base}/ok", expect_body="nope"), r)
            assert not res.ok and "body" in res.detail
            res = await run_check(HttpCheck(url=f"{base}/down"), r)
            assert not res.ok and "503" in res.detail
            assert (await run_check(HttpCheck(url=f"{base}/down", expect_status=503), r)).ok

    run(main())


def test_command_checker_exit_status_and_timeout(
    logs: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    pidfile = tmp_path / "gc.pid"

    async def main() -> None:
        r = runner(logs)
        assert (await run_check(CommandCheck(argv=["true"]), r)).ok
        res = await run_check(CommandCheck(argv=sh("echo not ready; exit 1")), r)
        assert not res.ok and "not ready" in res.detail
        slow = CommandCheck(argv=sh(f"sleep 60 & echo $! > {pidfile}; sleep 60"), timeout_s=0.3)
        began = time.monotonic()
        res = await run_check(slow, r)
        assert not res.ok and "timed out" in res.detail
        assert time.monotonic() - began < 5
        assert not pid_alive(int(pidfile.read_text()))

    run(main())


def test_process_and_link_checkers(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    r = runner(logs)
    pidfile = tmp_path / "me.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    assert run(run_check(ProcessCheck(pidfile=pidfile), r)).ok
    pidfile.write_text("999999999\n")
    assert not run(run_check(ProcessCheck(pidfile=pidfile), r)).ok
    assert not run(run_check(ProcessCheck(pidfile=tmp_path / "none.pid"), r)).ok

    # A uniquely named program, so that no other process on the machine matches.
    sleeper = tmp_path / f"vfchk{os.getpid()}"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    proc = subprocess.Popen([str(sleeper), "60"])
    check = ProcessCheck(process=sleeper.name)

    async def seen_by_name() -> None:
        # Popen may return (vfork) before the kernel has renamed the child: poll.
        deadline = time.monotonic() + 10
        while not (await run_check(check, r)).ok:
            assert time.monotonic() < deadline, "process never seen by name"
            await asyncio.sleep(0.02)

    try:
        run(seen_by_name())
    finally:
        proc.kill()
        proc.wait()
    assert not run(run_check(check, r)).ok

    assert run(run_check(LinkCheck(interface="lo"), r)).ok
    assert not run(run_check(LinkCheck(interface="vf-nonexist"), r)).ok


# --------------------------------------------------------------------------------------------
# The supervisor, driven through the configuration and the shipped generic module

SERVER = textwrap.dedent(
    """
    import signal, socket, sys, time
    if len(sys.argv) > 2 and sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print("listening", flush=True)
    while True:
        time.sleep(3600)
    """
)


FARM = """
[farm]
name = "t"
key_file = "farm.key"
[[network]]
name = "lan"
[[node]]
name = "n1"
address = { lan = "127.0.0.1" }
[[rule]]
vip = "198.51.100.100"
ports = "80"
"""


def app_spec(tmp_path: Path, module_section: str) -> AppSpec:
    """The AppSpec of a one-node farm whose [module] section is module_section."""
    key = tmp_path / "farm.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    text = FARM + textwrap.dedent(module_section)
    return parse_config(text, base_dir=tmp_path).app_spec("n1")


def generic_app(tmp_path: Path, *, extra_args: str = "", restart_max: int = 1) -> AppSpec:
    port = free_port()
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    return app_spec(
        tmp_path,
        f"""
        [module]
        name = "generic"
        stop_timeout_s = 1
        kill_timeout_s = 0.5
        healthy_timeout_s = 20
        [module.macros]
        start_cmd = "{sys.executable} {server} {port} {extra_args}"
        pidfile = "{tmp_path}/app.pid"
        port = "{port}"
        [[module.checker]]
        type = "tcp"
        port = "${{port}}"
        interval_s = 0.1
        timeout_s = 1
        rise = 1
        fall = 1
        [module.restart]
        max = {restart_max}
        within_s = 60
        """,
    )


def app_pid(tmp_path: Path) -> int:
    return int((tmp_path / "app.pid").read_text())


def test_restart_then_exhaustion_stops_the_app(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    spec = generic_app(tmp_path, restart_max=1)
    events: list[SupervisorEvent] = []

    def kinds() -> list[type]:
        return [type(e) for e in events if not isinstance(e, ScriptFinished)]

    async def main() -> None:
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1], on_event=events.append)
        await sup.start()
        assert await sup.wait_healthy(20)
        first = app_pid(tmp_path)
        assert pid_alive(first)

        os.kill(first, signal.SIGKILL)  # the application dies
        await until(lambda: kinds().count(Healthy) == 2, 20, "healthy after a restart")
        second = app_pid(tmp_path)
        assert second != first and pid_alive(second)
        assert kinds() == [Healthy, Unhealthy, Restarting, Healthy]
        restarting = next(e for e in events if isinstance(e, Restarting))
        assert restarting.attempt == 1 and "tcp:127.0.0.1" in restarting.reason

        os.kill(second, signal.SIGKILL)  # dies again: the policy (1 restart) is used up
        await until(lambda: Exhausted in kinds(), 20, "exhausted")
        await until(lambda: sup.state == AppState.EXHAUSTED, 10, "stopped after exhaustion")
        assert kinds()[-2:] == [Unhealthy, Exhausted]
        assert not (tmp_path / "app.pid").exists()  # the stop script ran
        assert sup.events.qsize() == len(events)
        await sup.stop()
        sup.close()

    run(main())
    module = (logs[2] / "module.log").read_text()
    for needle in ("app_restarting attempt=1", "app_exhausted", "checker_result", "app_healthy"):
        assert needle in module
    assert "start: started pid" in (logs[2] / "app.log").read_text()


def test_stop_times_out_then_forces(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    # The application ignores SIGTERM: the generic stop script waits for it in vain.
    spec = generic_app(tmp_path, extra_args="ignore-term")
    events: list[SupervisorEvent] = []

    async def main() -> None:
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1], on_event=events.append)
        await sup.start()
        assert await sup.wait_healthy(20)
        app = app_pid(tmp_path)
        began = time.monotonic()
        await sup.stop()
        took = time.monotonic() - began
        assert not pid_alive(app)
        assert sup.state == AppState.STOPPED
        # stop_timeout_s 1 + grace 0.5, then the start group: 0.5 more, plus slack.
        assert 1 <= took < 8, took
        stops = [e.result for e in events if isinstance(e, ScriptFinished)]
        assert [s.name for s in stops] == ["start", "stop"]
        assert stops[1].timed_out
        sup.close()

    run(main())
    assert "group_killed" in (logs[2] / "module.log").read_text()


def test_failing_start_exhausts_the_policy(logs: tuple[Any, Any, Path]) -> None:
    spec = AppSpec(
        module="t",
        directory=Path("/"),
        start=sh("echo cannot start; exit 1"),
        stop=["true"],
        restart=RestartSpec(max=2, within_s=60),
    )
    events: list[SupervisorEvent] = []

    async def main() -> None:
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1], on_event=events.append)
        await sup.start()
        began = time.monotonic()
        assert not await sup.wait_healthy(30)  # returns as soon as the policy is used up
        assert sup.state == AppState.EXHAUSTED and time.monotonic() - began < 20
        starts = [e for e in events if isinstance(e, ScriptFinished) and e.result.name == "start"]
        assert len(starts) == 3  # the first start and two restarts
        ex = [e for e in events if isinstance(e, Exhausted)]
        assert len(ex) == 1 and "start script failed" in ex[0].reason and ex[0].restarts == 2
        await sup.stop()

    run(main())


def test_not_healthy_in_time_counts_as_a_failed_run(logs: tuple[Any, Any, Path]) -> None:
    spec = AppSpec(
        module="t",
        directory=Path("/"),
        start=["true"],
        stop=["true"],
        healthy_timeout_s=0.3,
        checkers=[CommandCheck(argv=["false"], interval_s=0.05)],
        restart=RestartSpec(max=0, within_s=60),
    )
    events: list[SupervisorEvent] = []

    async def main() -> None:
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1], on_event=events.append)
        await sup.start()
        await until(lambda: sup.state == AppState.EXHAUSTED, 20, "exhausted")
        (ex,) = [e for e in events if isinstance(e, Exhausted)]
        assert "not healthy within 0.3s" in ex.reason and "command:false" in ex.reason
        assert not any(isinstance(e, Healthy) for e in events)

    run(main())


def test_stop_during_start_leaves_no_orphan(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "gc.pid"
    spec = AppSpec(
        module="t",
        directory=tmp_path,
        start=sh(f"sleep 60 & echo $! > {pidfile}; sleep 60"),
        stop=sh(f"echo stopped > {tmp_path}/stopped"),
    )

    async def main() -> None:
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1])
        await sup.start()
        await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", what="start")
        grandchild = int(pidfile.read_text())
        await sup.stop()
        await until(lambda: not pid_alive(grandchild), 5, "no orphan")
        assert (tmp_path / "stopped").exists()  # stop is idempotent, so it runs anyway
        assert sup.state == AppState.STOPPED

    run(main())


# --------------------------------------------------------------------------------------------
# The nginx module for real (direct mode: no systemd here)

NGINX_CONF = """
daemon on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_app(tmp_path: Path) -> AppSpec:
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port))
    return app_spec(
        tmp_path,
        f"""
        [module]
        name = "nginx"
        stop_timeout_s = 10
        kill_timeout_s = 2
        [module.macros]
        port = "{port}"
        conf = "{conf}"
        pidfile = "{tmp_path}/nginx.pid"
        init = "direct"
        [[module.checker]]
        type = "http"
        url = "http://127.0.0.1:${{port}}/"
        expect_body = "ok"
        interval_s = 0.1
        rise = 1
        """,
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_module(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    spec = nginx_app(tmp_path)
    pidfile = tmp_path / "nginx.pid"

    async def main() -> None:
        r = ScriptRunner(env=spec.env, cwd=spec.directory, app_log=logs[1], module_log=logs[0])
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1])
        await sup.start()
        assert await sup.wait_healthy(20), (logs[2] / "app.log").read_text()
        master = int(pidfile.read_text())
        again = await r.run("start", spec.start, 10)  # already running: nothing to do
        assert again.ok and "already running" in again.tail[-1]
        assert int(pidfile.read_text()) == master
        await sup.stop()  # graceful
        assert not pid_alive(master)
        assert not group_members(master)  # the workers went with the master
        stopped = await r.run("stop", spec.stop, 10)  # not running: still success
        assert stopped.ok and "not running" in stopped.tail[-1]

        assert (await r.run("start", spec.start, 10)).ok
        master = int(pidfile.read_text())
        assert spec.force_stop is not None
        assert (await r.run("force_stop", spec.force_stop, 10)).ok
        assert not pid_alive(master) and not group_members(master)
        r.close()
        sup.close()

    run(main())


# A stand-in for apache2ctl: the "server" is a sleep in its own session, as a daemon would be.
FAKE_CTL = """#!/bin/sh
case "$1" in
configtest) echo "Syntax OK" ;;
start)
    rm -f "$VIPFARM_M_PIDFILE"  # as httpd does when it exits
    setsid sh -c 'echo $$ > "$VIPFARM_M_PIDFILE"; exec sleep 60' </dev/null >/dev/null 2>&1 &
    while [ ! -s "$VIPFARM_M_PIDFILE" ]; do sleep 0.02; done ;;
graceful-stop) [ -n "${IGNORE_GRACEFUL:-}" ] || kill "$(cat "$VIPFARM_M_PIDFILE")" ;;
stop) kill "$(cat "$VIPFARM_M_PIDFILE")" ;;
esac
"""


def test_apache_module_with_a_stand_in_ctl(logs: tuple[Any, Any, Path], tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.write_text(FAKE_CTL)
    ctl.chmod(0o755)
    pidfile = tmp_path / "httpd.pid"
    spec = app_spec(
        tmp_path,
        f"""
        [module]
        name = "apache"
        stop_timeout_s = 0.5
        kill_timeout_s = 5
        [module.macros]
        ctl = "{ctl}"
        pidfile = "{pidfile}"
        init = "direct"
        [[module.checker]]
        type = "process"
        pidfile = "${{pidfile}}"
        interval_s = 0.1
        rise = 1
        """,
    )

    async def main() -> None:
        r = ScriptRunner(env=spec.env, cwd=spec.directory, app_log=logs[1], module_log=logs[0])
        sup = AppSupervisor(spec, module_log=logs[0], app_log=logs[1])
        await sup.start()
        assert await sup.wait_healthy(20), (logs[2] / "app.log").read_text()
        server = int(pidfile.read_text())
        again = await r.run("start", spec.start, 10)
        assert again.ok and "already running" in again.tail[-1]
        await sup.stop()
        assert not pid_alive(server)
        assert (await r.run("stop", spec.stop, 10)).ok  # not running: still success

        # A server deaf to graceful-stop: the stop times out and force_stop ends it.
        r2 = ScriptRunner(
            env={**spec.env, "IGNORE_GRACEFUL": "1"},
            cwd=spec.directory,
            app_log=logs[1],
            module_log=logs[0],
        )
        assert (await r2.run("start", spec.start, 10)).ok
        server = int(pidfile.read_text())
        assert not (await r2.run("stop", spec.stop, 0.5, grace_s=0.1)).ok
        assert pid_alive(server)
        assert spec.force_stop is not None
        assert (await r2.run("force_stop", spec.force_stop, 10)).ok
        assert not pid_alive(server)
        r.close()
        r2.close()
        sup.close()

    run(main())


def test_module_scripts_parse() -> None:
    scripts = [
        p
        for p in (REPO / "src" / "vipfarm" / "modules").glob("*/*")
        if p.suffix not in (".md", ".toml")
    ]
    assert len(scripts) >= 9
    for script in scripts:
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"
