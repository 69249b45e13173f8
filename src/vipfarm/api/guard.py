"""What the API checks before a request costs anything: tokens, versions, body size, limits.

Theory of operation
-------------------
The API port is open to the LAN, so every caller is untrusted until its token is checked, and
the check must be cheaper than the attack. Two layers do it, each with the same `Limits` and
`Counters` (the manager keeps one of each and updates the limits on a deployment):

* connections (`vipfarm.api.server`): a cap on open connections, the TLS handshake, the request
  head, the request body and idle keep-alive each within a deadline;
* requests (`RequestGuard`, this module, the outermost ASGI middleware): when uvicorn has parsed
  a request head (at most 16 KiB, h11's limit) and before a single byte of the body is asked
  for, it checks, in this order:

  1. the bearer token (`Tokens`: the current token and, during a rotation, the next one,
     compared in constant time with every accepted token): none **401**, wrong **403**;
  2. the node API version the caller speaks (`Vipfarm-Api` header; none means version 1,
     which is what nodes before the header sent): one this node cannot speak is **400**,
     naming both versions and which node to upgrade;
  3. the body size: a `Content-Length` over `max_body_bytes` is **413** at once; a chunked body
     is counted as it is read and refused as soon as it passes the limit.

  Every refusal answers with `Connection: close`, so uvicorn closes the connection instead of
  reading and discarding the rest of a body it will never use (a 128 MiB upload costs the
  64 KiB uvicorn buffers before the application reads, not 128 MiB). So does any answer given
  before the request's body was read whole (a 404 to a public path with a body, say).

Every refusal is counted by reason in `Counters.refused` (`vipfarm_api_refused_total`).
Routes behind the guard can therefore assume an authenticated caller whose version is known.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect

API_VERSION = 1  # the node-to-node API this code speaks
MIN_API_VERSION = 1  # the oldest a peer may speak to it (one version behind still works)
VERSION_HEADER = "Vipfarm-Api"
_VERSION_KEY = VERSION_HEADER.lower().encode()
PREFIX = "/api/v1"

MiB = 1024 * 1024


@dataclass
class Limits:
    """The API's limits (`[api]` of the farm file); changed live by a deployment."""

    max_body_bytes: int = 8 * MiB  # a 50,000-rule farm file is about 4 MiB
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: int = 5
    max_connections: int = 256
    max_log_streams: int = 16


@dataclass
class Counters:
    """What the API refused, by reason, and what it holds now (for `/metrics`)."""

    refused: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    log_streams: int = 0

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class Tokens:
    """The bearer tokens the API accepts: the current one and, while a rotation is under way,
    the next one (`api.next_token_file`). Replaced whole when a deployment changes them."""

    def __init__(self, current: bytes, next_token: bytes | None = None) -> None:
        self.current = current
        self.next = next_token

    def set(self, current: bytes, next_token: bytes | None) -> None:
        self.current, self.next = current, next_token

    @property
    def accepted(self) -> list[bytes]:
        return [self.current] if self.next is None else [self.current, self.next]

    def check(self, presented: bytes) -> bool:
        # Every token is compared, whichever matches, so the time taken does not say which.
        ok = False
        for token in self.accepted:
            ok |= hmac.compare_digest(presented, token)
        return ok


def fingerprint(tokens: Iterable[bytes | None]) -> str:
    """A short digest of a set of tokens, to compare nodes' token files without sending them
    (only to callers that hold a token already)."""
    parts = sorted(hashlib.sha256(b"vipfarm api token\0" + t).hexdigest()[:16] for t in tokens if t)
    return ",".join(parts)


def parse_version(value: str | None) -> int | None:
    """The version a `Vipfarm-Api` header says (None: not a version)."""
    if value is None:
        return 1  # nodes before the header was introduced speak version 1
    value = value.strip()
    if not value.isdigit() or len(value) > 6:
        return None
    return int(value)


def version_problem(sent: str | None, *, node: str = "this node") -> str | None:
    """Why a caller that sent `sent` cannot be served, naming both versions and the fix."""
    version = parse_version(sent)
    if version is None:
        return (
            f"{VERSION_HEADER}: bad value {sent!r}: expected a node API version number, "
            f"such as {API_VERSION}"
        )
    if version > API_VERSION:
        return (
            f"the caller speaks node API version {version}, {node} speaks {MIN_API_VERSION} to "
            f"{API_VERSION}: upgrade vipfarm on {node} (it is older than the caller)"
        )
    if version < MIN_API_VERSION:
        return (
            f"the caller speaks node API version {version}, {node} speaks {MIN_API_VERSION} to "
            f"{API_VERSION}: upgrade vipfarm on the calling node"
        )
    return None


def error_response(status: int, detail: str, *, close: bool = True) -> tuple[int, list[Any], bytes]:
    """(status, headers, body) of an error answer in the API's one error shape (`ErrorBody`),
    written here by hand so that a refusal costs no model or framework work."""
    body = json.dumps({"detail": detail, "problems": [], "nodes": []}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if close:
        headers.append((b"connection", b"close"))
    return status, headers, body


class RequestGuard:
    """ASGI middleware: authenticate, check the version and the body size before the
    application reads anything (see the module docstring)."""

    def __init__(
        self,
        app: Any,
        *,
        tokens: Tokens,
        limits: Limits,
        counters: Counters,
        public: Callable[[str], bool],
        node: str = "this node",
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limits = limits
        self.counters = counters
        self.public = public
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
        auth = version = length = None
        chunked = False
        for name, value in headers:
            if name == b"authorization":
                auth = value
            elif name == _VERSION_KEY:
                version = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if not self.public(path):
            refusal = self._auth(auth)
            if refusal is not None:
                await self._refuse(send, *refusal)
                return
        if path.startswith(PREFIX):
            problem = version_problem(
                None if version is None else version.decode("latin-1"), node=self.node
            )
            if problem is not None:
                await self._refuse(send, "bad_version", 400, problem)
                return
        limit = self.limits.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(send, "body_too_large", 413, self._too_large(limit))
            return
        has_body = chunked or (length is not None and int(length) > 0)
        await self._serve(scope, receive, send, limit, has_body)

    def _auth(self, auth: bytes | None) -> tuple[str, int, str] | None:
        scheme, _, presented = (auth or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return (
                "no_token",
                401,
                "authentication required: send Authorization: Bearer <token of api.token_file>",
            )
        if not self.tokens.check(presented.strip()):
            return "wrong_token", 403, "wrong token: use the farm's api.token_file"
        return None

    @staticmethod
    def _too_large(limit: int) -> str:
        return (
            f"the request body is over {limit} bytes (api.max_body_bytes): send less, or raise "
            "api.max_body_bytes"
        )

    async def _serve(self, scope: Any, receive: Any, send: Any, limit: int, has_body: bool) -> None:
        seen = 0
        started = refused = False
        body_done = not has_body

        async def counted() -> Any:
            # Over the limit, the guard answers 413 itself and tells the application the
            # client left: an exception here would be turned into a 400 by the body parser.
            nonlocal seen, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await self._refuse(send, "body_too_large", 413, self._too_large(limit))
                    return {"type": "http.disconnect"}
            return message

        async def versioned(message: Any) -> None:
            nonlocal started
            if refused:
                return  # the 413 was the answer
            if message["type"] == "http.response.start":
                started = True
                extra = [(_VERSION_KEY, str(API_VERSION).encode())]
                if not body_done:
                    # Answered without the whole body (a 404, a handler that ignores it):
                    # close rather than let uvicorn read and discard the rest.
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        # The client went away, its body timed out, or it was refused above: nobody to answer.
        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, counted, versioned)

    async def _refuse(self, send: Any, reason: str, status: int, detail: str) -> None:
        self.counters.count(reason)
        code, headers, body = error_response(status, detail)
        headers.append((_VERSION_KEY, str(API_VERSION).encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
