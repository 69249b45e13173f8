"""The daemon's host reads: incarnation, open VIP connections, farms with a daemon here."""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from vipfarm.datapath.spec import IPAddress
from vipfarm.node import control, host
from vipfarm.node.host import busy_connections, farms_here, next_incarnation


def test_incarnation_grows_even_when_the_clock_steps_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "incarnation"
    first = next_incarnation(path)
    assert abs(first - time.time() * 1000) < 5000
    path.write_text(str(first + 10_000_000))  # as if the clock had been far ahead last time
    assert next_incarnation(path) == first + 10_000_001
    assert next_incarnation(path) == first + 10_000_002
    path.write_text("garbage")
    assert next_incarnation(path) >= first


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


class Addr(NamedTuple):
    ip: str
    port: int


class Conn(NamedTuple):
    """The fields of psutil's connection tuple that busy_connections reads."""

    laddr: Addr
    status: str


def tcp(local: str, status: str) -> Conn:
    return Conn(Addr(local, 80), status)


def test_only_open_connections_to_a_vip_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = ["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING", "LAST_ACK"]
    idle = ["LISTEN", "SYN_SENT", "SYN_RECV", "TIME_WAIT", "CLOSE", "NONE"]
    conns = [tcp("198.51.100.100", s) for s in busy + idle]
    conns += [
        tcp("198.51.100.7", "ESTABLISHED"),  # not a VIP
        tcp("2001:db8::100", "ESTABLISHED"),
        tcp("::ffff:198.51.100.100", "CLOSE_WAIT"),  # an IPv4 client of a :: listener
    ]
    monkeypatch.setattr(psutil, "net_connections", lambda kind: conns if kind == "tcp" else [])
    assert busy_connections([ip("198.51.100.100")]) == len(busy) + 1
    assert busy_connections([ip("198.51.100.100"), ip("2001:db8::100")]) == len(busy) + 2
    assert busy_connections([ip("203.0.113.1")]) == 0


def test_a_real_connection_counts_until_it_is_closed() -> None:
    vip = ip("127.0.0.77")  # all of 127/8 is local: an address nothing else here uses
    with socket.create_server(("127.0.0.77", 0)) as srv:
        client = socket.create_connection(srv.getsockname(), source_address=("127.0.0.78", 0))
        served, _ = srv.accept()
        assert busy_connections([vip]) == 1  # the served side; the listener does not count
        client.close()
        assert busy_connections([vip]) == 1  # CLOSE_WAIT: the server still has to answer
        served.close()
        deadline = time.monotonic() + 5
        while busy_connections([vip]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy_connections([vip]) == 0


def test_farms_here_lists_the_live_control_sockets_of_this_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "CONTROL_DIR", str(tmp_path / "control"))
    assert farms_here() == []  # no directory yet
    here = Path(host.control_dir())
    assert here.parent == tmp_path / "control" and here.name == str(host.netns_inode())
    here.mkdir(parents=True)
    farm = "t" + uuid.uuid4().hex[:8]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(control.address(farm))
        s.listen()
        (here / "notes.txt").write_text("not a socket")
        assert farms_here() == [farm]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(here / "dead.sock"))  # bound, never listening: a crashed daemon's
        assert farms_here() == [farm]
    assert farms_here() == []  # the file is still there, nobody listens on it
    assert (here / f"{farm}.sock").exists()
    other = tmp_path / "control" / str(host.netns_inode() + 1)  # another namespace's
    other.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(other / "elsewhere.sock"))
        s.listen()
        assert farms_here() == []


def test_link_state_reads_the_same_open_file_again(tmp_path: Path) -> None:
    from vipfarm.node.host import LinkState

    state = tmp_path / "operstate"
    state.write_text("up\n")
    link = LinkState("eth0")
    link.path = str(state)
    assert link.up()
    state.write_text("down\n")  # the same inode, rewritten: pread at 0 sees the new text
    assert not link.up()
    state.unlink()
    link.close()
    assert not link.up()  # gone: down, and no exception
