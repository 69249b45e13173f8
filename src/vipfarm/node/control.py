"""Local control of a node daemon over a Unix socket that only root can create.

Where the socket is
-------------------
`/run/vipfarm/control/<netns inode>/<farm>.sock` (`vipfarm.node.host.control_dir`). A daemon
belongs to a network namespace (its VIP, its data path, its heartbeats), and the lab runs several
nodes of one farm on one host, sharing the filesystem, each in its own namespace: `ip netns exec
vf-node1 vipfarm state` must reach node1's daemon and no other. The inode of
`/proc/thread-self/ns/net` names the caller's namespace whatever it is called (a named `ip
netns`, a container's, the host's own), costs one stat, and lets a client go straight to its
socket. The other way, sockets named by farm and node with the client keeping the one whose
server (SO_PEERCRED pid) lives in our namespace, needs `/proc/<pid>/ns/net` of every candidate
and fails across PID namespaces, where SO_PEERCRED reports pid 0.

Why not an abstract socket (`@vipfarm/<farm>`, which follows the network namespace by itself):
an abstract name has no owner and no permissions, so any local user could bind it first; the
daemon would then refuse to start, and a root CLI would talk to the impostor.

Who can create it
-----------------
`/run/vipfarm`, `control` and the namespace directory are directories owned by the daemon's user
(root), mode 0755, checked before every start (a directory, not a link, that nobody else may
write to; the daemon refuses to start otherwise, naming the path and the fix). Only root can
create a file in them, so nobody else can take the name. `/run` itself is the system's.

One daemon per farm and namespace
---------------------------------
The daemon (its manager) holds an exclusive flock on `<farm>.lock` beside the socket for its
whole life, taken before the socket is touched. A second daemon finds it held and refuses to
start, with the first one's pid (written into the lock file); `vipfarm daemon` asks the same
lock before it starts anything (`running_daemon`), so that a second daemon of the farm stops
before its pulse touches the first one's data path. A daemon that crashed lost its lock with
its process, so the next one removes the stale socket file and binds again: a stale file never
blocks a restart, and a live daemon is never robbed of its socket. A lock rather than "connect
and see": it also sees a live daemon that is too busy to accept, and two daemons starting at
once cannot both conclude the file is stale. A clean close removes the socket, the lock file
(while still holding the lock: a starter that opened the old file sees, once it holds the lock,
that the name is no longer that file, and starts over) and the namespace directory if empty. A
crash leaves files that the next start in the namespace reuses; directories of namespaces that
are gone stay until reboot (`/run` is a tmpfs) or `vipfarm lab down`, which removes its nodes'.

Who may do what
---------------
The socket is mode 0666: any local user may connect. Per connection the server reads the
caller's uid (SO_PEERCRED), and a command runs for anyone only if it is in `public`; every
other command, the mutating ones and the other reads alike, needs root or the daemon's own user.
A new command is therefore root-only until someone lists it on purpose. The manager lists
`state` and `farm`: read-only, and nothing that the configuration file or the logs protect (a
caller may thereby make the daemon ask its peers' APIs, each question bounded by the peer
timeout). `log_page` and `config` are root's, as are `start`, `stop`, `deploy`, `snapshot`.
What other users can hold is bounded (`MAX_OTHER_CLIENTS` connections at once, each request
line within `OTHER_REQUEST_TIMEOUT_S`), root's connections are never counted against it, and
every refusal is counted by reason (`ControlServer.refused`, in `vipfarm state`'s counters).

The client side checks the server: SO_PEERCRED of a connected client socket gives the
credentials the server had when it called listen(), and `call` refuses to talk to a server that
is not root (or the caller's own user, who cannot gain anything from talking to himself; that
keeps tests without root possible). The client uses plain blocking sockets, no asyncio: it is
what `vipfarm state` waits for (see `vipfarm.cli.local`).

Protocol
--------
One JSON object per line in each direction: a request `{"cmd": NAME, "args": {...}}` gets
`{"ok": true, "result": ...}` or `{"ok": false, "error": TEXT}`. Handlers are plain async
functions, so the HTTP API can reuse them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from vipfarm.errors import VipfarmError
from vipfarm.node import host
from vipfarm.node.host import CONTROL_SUFFIX, control_dir, farms_here, peer_credentials, peer_uid

if TYPE_CHECKING:
    import asyncio

# asyncio, fcntl and logging are imported by the server's methods: the client is `vipfarm state`,
# whose start-up is the whole of its latency.

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
# One request line at most: a deployment carries the whole configuration file.
MAX_LINE = 8 * 1024 * 1024
SOCKET_MODE = 0o666  # anyone may connect; the server decides per command (module docstring)
DIR_MODE = 0o755
# A farm name as the configuration allows it ([farm] name, DatapathSpec.farm): it becomes a
# file name here, so a `--farm` of anything else is refused before it reaches the filesystem.
FARM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,15}")
# Tries to take the lock when a closing daemon removes the lock file or directory under us.
LOCK_TRIES = 5
# Any local user may connect, so what one can hold is bounded: connections at once (beyond
# them a connection is closed unanswered) and the seconds a request line may take to arrive.
# Root's connections are not counted: a flood of other users' never locks root out.
MAX_OTHER_CLIENTS = 8
OTHER_REQUEST_TIMEOUT_S = 10.0


class ControlError(VipfarmError):
    """A request failed; the text goes back to the caller as is."""


class DaemonUnreachable(ControlError):
    """No daemon answers: none runs here, it went away, or it did not answer in time."""


class FarmChoiceError(ControlError):
    """The farm asked for is not a farm name, or several run here and none was named."""


def check_farm_name(farm: str) -> str:
    if not FARM_NAME.fullmatch(farm):
        raise FarmChoiceError(
            f"bad farm name {farm!r}: a farm name is 1 to 16 lowercase letters, digits, '_' "
            "and '-', starting with a letter or digit (the [farm] name of its configuration)"
        )
    return farm


def address(farm: str, netns: int | None = None) -> str:
    """The control socket of `farm`'s daemon in network namespace `netns` (default: ours)."""
    return f"{control_dir(netns)}/{check_farm_name(farm)}{CONTROL_SUFFIX}"


def namespace_dir_of(netns_file: str) -> str:
    """The control directory of the namespace that `netns_file` (e.g. /run/netns/NAME) is."""
    return control_dir(os.stat(netns_file).st_ino)


def lock_path(farm: str, netns: int | None = None) -> str:
    return f"{control_dir(netns)}/{check_farm_name(farm)}.lock"


def _own_dir(path: str) -> None:
    """Make `path` a directory that only we may write to, or check that it is one."""
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # whatever the umask: users who may ask `state` must get in
    except FileExistsError:
        pass
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISDIR(st.st_mode) and st.st_uid == me and not st.st_mode & 0o022:
        return
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
    owner = "root" if me == 0 else f"uid {me}"
    raise ControlError(
        f"{path} must be a directory owned by {owner} that nobody else may write to; it is "
        f"{kind}, owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}. Someone else may "
        f"have made it to take the control socket over: remove it (rm -r {path}) and start the "
        "daemon again"
    )


def _own_dirs(netns: int | None) -> str:
    """Check (making what is missing) every directory from /run/vipfarm to ours."""
    top = os.path.dirname(host.CONTROL_DIR)
    for path in (top, host.CONTROL_DIR, control_dir(netns)):
        _own_dir(path)
    return control_dir(netns)


def already_runs(farm: str, pid: int) -> ControlError:
    who = f"pid {pid}" if pid > 0 else "pid unknown"
    kill = f", or kill {pid}" if pid > 0 else ""
    return ControlError(
        f"another vipfarm daemon of farm {farm!r} already runs in this network namespace "
        f"({who}, socket {address(farm)}): stop it first (systemctl stop vipfarm@{farm}{kill})"
    )


def running_daemon(farm: str) -> int | None:
    """The pid of the live daemon of `farm` in this namespace (the holder of its lock), or None.

    A check for `vipfarm daemon` before it starts anything: a second daemon's pulse must not
    touch the first one's data path. It holds a shared lock for a moment, so a manager that
    starts at that very moment may find its lock taken and be restarted: only when two daemons
    of one farm start at once, which is what this refuses."""
    import fcntl

    try:
        fd = os.open(lock_path(farm), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # none, or nothing sound: the manager's own checks will say what is wrong
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


class ControlServer:
    """The daemon's end: listens on `address(farm)` while it runs (see the module docstring)."""

    def __init__(
        self,
        farm: str,
        handlers: dict[str, Handler],
        mutating: Iterable[str] = (),
        public: Iterable[str] = (),
    ) -> None:
        self.farm = check_farm_name(farm)
        self.handlers = handlers
        self.mutating = frozenset(mutating)
        self.public = frozenset(public)
        if self.public & self.mutating:
            raise ValueError(f"commands both public and mutating: {self.public & self.mutating}")
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._lock: str | None = None
        self._inode: int | None = None
        self._others = 0  # connections open now of users other than root and ours
        # Connections and requests refused, by reason (bad_request, line_too_long,
        # not_allowed, request_timeout, too_many_clients, unknown_command).
        self.refused: dict[str, int] = {}

    async def start(self) -> None:
        """Take the farm's lock, replace a crashed daemon's socket file, listen; raises
        ControlError when another daemon of the farm runs here or the directories are unsafe."""
        import asyncio

        self._take_lock()
        assert self._lock is not None
        path = self._lock.removesuffix(".lock") + CONTROL_SUFFIX
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # we hold the lock: whoever made this file is gone
            sock.bind(path)
            os.chmod(path, SOCKET_MODE)
            self._inode = os.stat(path).st_ino
            self.path = path
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        except OSError as e:
            sock.close()
            self._release()
            raise ControlError(f"cannot listen on {path}: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            self._release()
            raise

    def _take_lock(self) -> None:
        import fcntl

        for _ in range(LOCK_TRIES):
            where = _own_dirs(None)
            lock = f"{where}/{self.farm}.lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # a closing daemon removed the directory between our mkdir and open
            except OSError as e:
                raise ControlError(f"cannot open {lock}: {e.strerror}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise already_runs(self.farm, int(text) if text.isdigit() else -1) from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # a closing daemon unlinked the file we locked: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd, self._lock = fd, lock
            return
        raise ControlError(f"could not take the lock of farm {self.farm!r} in {host.CONTROL_DIR}")

    def _release(self) -> None:
        """Remove our socket, lock file and (if empty) directory; then let the lock go."""
        if self._lock_fd is None or self._lock is None:
            return
        if self.path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.unlink(self._lock)
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self._lock))  # only if no other farm's files are there
        self._lock_fd = self._lock = self.path = self._inode = None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self._release()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else -1
        other = uid not in (0, os.geteuid())
        if other and self._others >= MAX_OTHER_CLIENTS:
            self._count("too_many_clients")
            writer.close()
            return
        self._others += other
        try:
            while True:
                if other:
                    async with asyncio.timeout(OTHER_REQUEST_TIMEOUT_S):
                        line = await reader.readline()
                else:
                    line = await reader.readline()
                if not line:
                    break
                reply = await self._dispatch(line, uid)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except TimeoutError:
            self._count("request_timeout")
        except ValueError:
            self._count("line_too_long")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away: nothing to answer
        finally:
            self._others -= other
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def allowed(self, cmd: str, uid: int) -> str | None:
        """None when `uid` may run `cmd`, else why not."""
        if cmd in self.public or uid in (0, os.geteuid()):
            return None
        if cmd in self.mutating:
            return f"{cmd!r} changes the node: run it as root"
        anyone = ", ".join(sorted(self.public)) or "nothing"
        return f"{cmd!r} is for root only: run it as root (any user may ask: {anyone})"

    async def _dispatch(self, line: bytes, uid: int) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
            args = req.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._count("bad_request")
            return {"ok": False, "error": 'bad request: expected {"cmd": NAME, "args": {...}}'}
        handler = self.handlers.get(cmd)
        if handler is None:
            self._count("unknown_command")
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {cmd[:64]!r}: known are {known}"}
        refused = self.allowed(cmd, uid)
        if refused is not None:
            self._count("not_allowed")
            return {"ok": False, "error": refused}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not kill the daemon; the caller sees it
            import logging

            from vipfarm.log import event

            log = logging.getLogger("vipfarm.node.control")
            event(log, "control_handler_failed", logging.ERROR, cmd=cmd, error=repr(e))
            return {"ok": False, "error": f"internal error in {cmd}: {e!r}"}


def check_server(sock: socket.socket, path: str) -> None:
    """Refuse a server that is neither root nor us (module docstring: who may do what)."""
    pid, uid, _ = peer_credentials(sock)
    if uid in (0, os.geteuid()):
        return
    raise ControlError(
        f"the control socket {path} is served by uid {uid} (pid {pid}), not by root: refusing "
        "to talk to it. vipfarm daemons run as root; find out who made that socket and remove it"
    )


def call(farm: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Send one request to the local daemon and return its result; raises ControlError
    (DaemonUnreachable when no daemon answers)."""
    path = address(farm)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnreachable(
                f"no vipfarm daemon of farm {farm!r} runs in this network namespace: start it "
                "(vipfarm daemon --config FILE, or systemctl start vipfarm@FARM)"
            ) from e
        except PermissionError as e:
            raise ControlError(
                f"cannot connect to {path}: permission denied: run it as root"
            ) from e
        check_server(sock, path)
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise DaemonUnreachable("the daemon closed the connection without answering")
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    except TimeoutError as e:
        raise DaemonUnreachable(f"the daemon did not answer {cmd!r} within {timeout:g} s") from e
    except OSError as e:
        raise DaemonUnreachable(f"lost the daemon on {path}: {e.strerror or e}") from e
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon's answer to {cmd!r} is not a JSON object")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply.get("result")


def resolve_farm(farm: str | None) -> str:
    """The farm to talk to: the one given, else the only one running in this namespace."""
    if farm:
        return check_farm_name(farm)
    here = farms_here()
    if len(here) == 1:
        return here[0]
    if not here:
        raise DaemonUnreachable(
            "no vipfarm daemon runs in this network namespace: start one with "
            "`vipfarm daemon --config FILE`"
        )
    raise FarmChoiceError(f"several farms run here ({', '.join(here)}): choose one with --farm")
