"""The built-in node application and the load client, against each other on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from vipfarm.lab.app import echo_socket, http_servers, serve_echo
from vipfarm.lab.apps import bound
from vipfarm.lab.load import Reply, parse_http, parse_target, run


@pytest.fixture
def http_ports() -> Iterator[tuple[int, int]]:
    servers = http_servers("node7", 0)
    for srv in servers:
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _listener(on_accept: str) -> tuple[socket.socket, int]:
    """A TCP listener that resets (`reset`) or ignores (`silent`) every connection."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    kept: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            if on_accept == "reset":
                conn.recv(1024)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                kept.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return lsock, lsock.getsockname()[1]


def test_http_v4_v6_and_keepalive(http_ports: tuple[int, int]) -> None:
    port4, port6 = http_ports
    replies = asyncio.run(run(f"http://127.0.0.1:{port4}/any/path", count=20, concurrency=5))
    assert {(r.node, r.error, r.status, r.body) for r in replies} == {
        ("node7", None, 200, "node7\n")
    }
    (v6,) = asyncio.run(run(f"http://[::1]:{port6}/", count=1))
    assert v6.node == "node7"
    # HTTP/1.1 keeps the connection: two answers on one socket.
    with socket.create_connection(("127.0.0.1", port4)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        data = b""
        while data.count(b"node7\n") < 2:
            chunk = s.recv(4096)
            assert chunk, "server closed a keep-alive connection"
            data += chunk


def test_errors_are_classified() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    (refused,) = asyncio.run(run(f"http://127.0.0.1:{port}/", count=1))
    assert refused.error == "refused" and refused.node is None

    resetter, rport = _listener("reset")
    silent, sport = _listener("silent")
    try:
        (reset,) = asyncio.run(run(f"http://127.0.0.1:{rport}/", count=1))
        assert reset.error == "reset"
        timed = asyncio.run(run(f"http://127.0.0.1:{sport}/", count=3, timeout=0.3))
        assert [r.error for r in timed] == ["timeout"] * 3
        assert all(250 < r.ms < 3000 for r in timed)
        # The total deadline bounds the whole run even when requests wait for a slot.
        bounded = asyncio.run(
            run(f"http://127.0.0.1:{sport}/", count=4, concurrency=1, timeout=5, total_timeout=0.3)
        )
        assert [r.error for r in bounded] == ["timeout"] * 4
    finally:
        resetter.close()
        silent.close()


def test_udp_echo_and_pinned_source_ports() -> None:
    sock = echo_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    threading.Thread(target=serve_echo, args=(sock, "node4"), daemon=True).start()
    replies = asyncio.run(run(f"udp://127.0.0.1:{port}", count=5, source_port=42100))
    assert [(r.node, r.body, r.sport) for r in replies] == [
        ("node4", f"node4 {i}", 42100 + i) for i in range(5)
    ]


def test_echo_binds_an_address_the_host_does_not_have() -> None:
    # IP_FREEBIND / IPV6_FREEBIND: the echo starts before the data path adds the VIP.
    for vip in ("198.51.100.100", "2001:db8:100::100"):
        sock = echo_socket(vip, 0)
        assert sock.getsockname()[0] == vip
        sock.close()


def test_bound_reads_this_process_sockets() -> None:
    with socket.socket() as lsock, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as usock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        usock.bind(("::1", 0))
        tcp = bound(os.getpid(), "tcp")
        udp = bound(os.getpid(), "udp")
        assert (ipaddress.ip_address("127.0.0.1"), lsock.getsockname()[1]) in tcp
        assert (ipaddress.ip_address("::1"), usock.getsockname()[1]) in udp


def test_parsers() -> None:
    assert parse_http(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nnode1\n") == (200, "node1\n")
    with pytest.raises(ValueError):
        parse_http(b"garbage")
    target = parse_target("http://[2001:db8::1]:8080/x")
    assert target.family == socket.AF_INET6 and target.addr == ("2001:db8::1", 8080)
    assert target.request == b"GET /x HTTP/1.0\r\nHost: [2001:db8::1]\r\n\r\n"
    assert parse_target("udp://10.0.0.1:7").udp
    for bad in ("ftp://x/", "udp://10.0.0.1", "http:///"):
        with pytest.raises(ValueError, match="use"):
            parse_target(bad)


def test_command_line(http_ports: tuple[int, int]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vipfarm.lab.load",
            f"http://127.0.0.1:{http_ports[0]}/",
            "--count",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    assert [Reply(**r).node for r in result["results"]] == ["node7"] * 3
    assert result["elapsed_s"] >= 0
    bad = subprocess.run(
        [sys.executable, "-m", "vipfarm.lab.load", "ftp://x/"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "use http://HOST" in bad.stderr
