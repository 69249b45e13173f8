"""Console sign-in: the farm's API token exchanged for a session cookie, and CSRF.

Theory of operation
-------------------
A browser must never hold the bearer token in script-readable storage, so signing in (POST
`/console/login` with the token) checks the token with the API's own check and answers with a
session cookie: a random 256-bit id, `HttpOnly` (no script reads it), `SameSite=Strict` (no
other site's page can make the browser send it), `Secure` when the API speaks HTTPS, `Path=/`,
and a `Max-Age` equal to the session's lifetime (`SESSION_TTL_S`; it is not renewed by use, so a
stolen cookie is worth a bounded time). Sessions live in the manager's memory only: a restarted
manager signs everybody out, which is the safe direction.

Every session has its own CSRF token, given to the page in a `<meta>` tag of the console page;
every request that changes anything (any method but GET and HEAD) must send it back in the
`X-CSRF-Token` header, compared in constant time. SameSite=Strict already stops cross-site
requests in current browsers; the CSRF token is the second lock for the ones that do not honour
it, and an `Origin` that names another host is refused as a third.

`SessionGate` is the ASGI middleware in front of the console: it decides from the request head
alone (before the body is read, as the API's request guard does for bearer tokens), so a
request without a session costs a dictionary look-up. Its `admit(scope)` is the hook the API's
request guard calls for console paths: it returns None (admitted) or a refusal (reason, status,
detail), and records the session in `scope["state"]` for the routes.

Routes under `/console/peer/` are the exception: one node's console asks another's for what the
node API does not give (the open connections of a drain, an application restart), so they
take the farm's bearer token like any node-to-node call (a caller that has it may do anything
through the node API already; CSRF does not apply, no browser sends it).

Refusals are counted by reason (`Sessions.refused`). The store is bounded (`MAX_SESSIONS`, the
oldest is dropped first) so that sign-ins cannot grow the manager's memory without limit.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

COOKIE = "vipfarm_console"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 256
PREFIX = "/console"
# Reachable without a session: the sign-in page and what it needs to render.
PUBLIC = ("/console/login", "/console/static/console.css")
SAFE_METHODS = ("GET", "HEAD")
# Node-to-node routes of the console: the farm's bearer token instead of a session.
PEER_PREFIX = PREFIX + "/peer/"


@dataclass
class Session:
    id: str
    csrf: str
    user: str  # who signed in, as the module log records it (the client address)
    expires: float  # time.time()
    token: bytes  # the bearer token presented, used for calls the peer client cannot make


@dataclass
class Refusal:
    reason: str
    status: int
    detail: str


@dataclass
class Sessions:
    """The manager's console sessions; `check_token` is the API's own token check."""

    check_token: Callable[[bytes], bool]
    ttl_s: float = SESSION_TTL_S
    clock: Callable[[], float] = time.time
    _by_id: OrderedDict[str, Session] = field(default_factory=OrderedDict)
    refused: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def sign_in(self, token: bytes, user: str) -> Session | None:
        """A new session for a valid token; None (and counted) for a wrong one."""
        if not token or not self.check_token(token):
            self.count("wrong_token")
            return None
        self._expire()
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.popitem(last=False)
            self.count("evicted")
        s = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            user=user,
            expires=self.clock() + self.ttl_s,
            token=token,
        )
        self._by_id[s.id] = s
        return s

    def sign_out(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        s = self._by_id.get(session_id)
        if s is None:
            return None
        if s.expires <= self.clock():
            del self._by_id[session_id]
            return None
        # The token may have been retired by a deployment (a rotation): the session goes too.
        if not self.check_token(s.token):
            del self._by_id[session_id]
            return None
        return s

    def _expire(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)

    # ---- the request check, from the head alone

    def admit(self, scope: dict[str, Any]) -> Refusal | None:
        """Whether a console request may go on; on success the session is in scope["state"].

        The hook for `vipfarm.api.guard.RequestGuard`: call it for paths under `/console`
        instead of the bearer check, and answer a refusal with its status and detail.
        """
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = _headers(scope.get("headers", ()))
        session = self.get(cookie_value(headers.get(b"cookie", b""), COOKIE))
        if session is not None:
            scope.setdefault("state", {})["console_session"] = session
        if path in PUBLIC or path == "/":
            return None
        if path.startswith(PEER_PREFIX):
            return self._peer(method, headers)
        if session is None:
            self.count("no_session")
            return Refusal("no_session", 401, "sign in first: no valid console session")
        if method not in SAFE_METHODS:
            origin = headers.get(b"origin")
            if origin is not None and not same_origin(origin, headers.get(b"host", b"")):
                self.count("cross_origin")
                return Refusal("cross_origin", 403, "a change request from another site")
            sent = headers.get(CSRF_HEADER.encode(), b"")
            if not hmac.compare_digest(sent, session.csrf.encode()):
                self.count("no_csrf")
                return Refusal(
                    "no_csrf",
                    403,
                    f"a change request needs the page's CSRF token in {CSRF_HEADER}: reload",
                )
        return None

    def _peer(self, method: str, headers: dict[bytes, bytes]) -> Refusal | None:
        """`/console/peer/...`: what one node's console asks of another's, with the farm's
        bearer token (as any node-to-node call)."""
        scheme, _, presented = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            self.count("peer_no_token")
            return Refusal("peer_no_token", 401, "authentication required: send the bearer token")
        if not self.check_token(presented.strip()):
            self.count("peer_wrong_token")
            return Refusal("peer_wrong_token", 403, "wrong token: use the farm's api.token_file")
        return None


def is_console_path(path: str) -> bool:
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, value in raw:
        # Several Cookie headers (HTTP/2 splits them) are one list.
        out[name] = out[name] + b"; " + value if name in out and name == b"cookie" else value
    return out


def cookie_value(header: bytes, name: str) -> str | None:
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key.decode("latin-1") == name:
            return value.decode("latin-1")
    return None


def same_origin(origin: bytes, host: bytes) -> bool:
    """`Origin: scheme://host[:port]` names the host the request went to."""
    text = origin.decode("latin-1")
    _, sep, rest = text.partition("://")
    return bool(sep) and rest.rstrip("/") == host.decode("latin-1")


def set_cookie(session: Session, *, secure: bool, ttl_s: float) -> str:
    attrs = [
        f"{COOKIE}={session.id}",
        "Path=/",
        f"Max-Age={int(ttl_s)}",
        "HttpOnly",
        "SameSite=Strict",
    ]
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


def clear_cookie(*, secure: bool) -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + (
        "; Secure" if secure else ""
    )


class SessionGate:
    """ASGI middleware: `Sessions.admit` before the console app runs (see the docstring)."""

    def __init__(self, app: Any, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_console_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        refusal = self.sessions.admit(scope)
        if refusal is None:

            async def secured(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), *SECURITY]}
                await send(message)

            await self.app(scope, receive, secured)
            return
        await send_refusal(send, refusal, page=scope.get("path") in PAGES)


# Sent with every console answer: nothing but this origin's own files runs or loads, the pages
# cannot be framed, and no answer is cached or sniffed into another type.
SECURITY = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
PAGES = (PREFIX, PREFIX + "/")


async def send_refusal(send: Any, refusal: Refusal, *, page: bool = False) -> None:
    """The refusal as JSON, or for a page asked without a session a redirect to sign in."""
    import json

    if page and refusal.reason == "no_session":
        headers = [(b"location", b"/console/login"), (b"content-length", b"0"), *SECURITY]
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.dumps({"detail": refusal.detail, "problems": [], "nodes": []}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY,
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
