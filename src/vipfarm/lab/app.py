"""The lab's built-in node application: HTTP that names the node, and UDP echo on the VIPs.

`python -m vipfarm.lab.app --node node1 [--http] --echo-vip 198.51.100.100 --echo-vip ...`

- HTTP (when `--http`, i.e. nginx is not used): threaded servers on 0.0.0.0 and [::] (v6-only,
  so the two do not collide) on port 80; any GET answers `node1\\n`. HTTP/1.1 keep-alive works,
  so a test can hold one connection open across a bucket move.
- UDP echo: one socket per VIP on port 7, bound with IP_FREEBIND / IPV6_FREEBIND so it can bind
  before the data path puts the VIP on the node. A datagram `x` is answered `node1 x` from the
  VIP itself, which is the address the client sent to.

Stdlib only and quick to start: the lab starts one per node.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from vipfarm.log import event, setup

log = logging.getLogger("vipfarm.lab.app")

# Not every Python build exposes these; the values are fixed by the Linux ABI.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vipfarm-lab"
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would only fill the log during load tests


class _Server4(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops SYNs as soon as one node takes a load burst,
    # which would look like a data path fault.
    request_queue_size = 1024


class _Server6(_Server4):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def http_servers(node: str, port: int) -> list[ThreadingHTTPServer]:
    handler = type("Handler", (_Handler,), {"body": f"{node}\n".encode()})
    return [_Server4(("0.0.0.0", port), handler), _Server6(("::", port), handler)]


def echo_socket(vip: str, port: int) -> socket.socket:
    addr = ipaddress.ip_address(vip)
    if addr.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    sock.bind((str(addr), port))
    return sock


def serve_echo(sock: socket.socket, node: str) -> None:
    prefix = f"{node} ".encode()
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(prefix + data, peer)
        except OSError as e:
            # A client that went away (ICMP error) must not stop the service.
            event(log, "echo_error", level=logging.DEBUG, error=e.strerror)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipfarm.lab.app", description=__doc__)
    parser.add_argument("--node", required=True, help="name the replies start with")
    parser.add_argument("--http", action="store_true", help="serve HTTP (when nginx does not)")
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--echo-vip", action="append", default=[], help="bind UDP echo here")
    parser.add_argument("--echo-port", type=int, default=7)
    args = parser.parse_args(argv)
    setup()

    threads = []
    servers = http_servers(args.node, args.http_port) if args.http else []
    for srv in servers:
        threads.append(threading.Thread(target=srv.serve_forever, daemon=True))
    for vip in args.echo_vip:
        sock = echo_socket(vip, args.echo_port)
        threads.append(threading.Thread(target=serve_echo, args=(sock, args.node), daemon=True))
    for t in threads:
        t.start()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    event(log, "app_ready", node=args.node, http=args.http, echo=",".join(args.echo_vip))
    stop.wait()
    event(log, "app_stop", node=args.node)


if __name__ == "__main__":
    main()
