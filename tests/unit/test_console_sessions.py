"""Console sessions: sign-in with the token, expiry, the request check from the head alone
(no session, CSRF, another origin), the cookie's attributes, and the store's bound."""

from __future__ import annotations

import hmac
from typing import Any

from vipfarm.console import sessions as ss

TOKEN = b"the-farm-token"


def store(now: list[float] | None = None) -> ss.Sessions:
    clock = now or [1000.0]
    return ss.Sessions(lambda t: hmac.compare_digest(t, TOKEN), ttl_s=60, clock=lambda: clock[0])


def scope(path: str, method: str = "GET", **headers: str) -> dict[str, Any]:
    raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "path": path, "method": method, "headers": raw}


def test_a_wrong_token_gets_no_session_and_is_counted() -> None:
    s = store()
    assert s.sign_in(b"nope", "10.0.0.1") is None
    assert s.sign_in(b"", "10.0.0.1") is None
    assert s.refused == {"wrong_token": 2} and len(s) == 0


def test_a_session_expires_and_goes_when_its_token_is_retired() -> None:
    now = [1000.0]
    accepted = [TOKEN]
    s = ss.Sessions(lambda t: t in accepted, ttl_s=60, clock=lambda: now[0])
    a = s.sign_in(TOKEN, "u")
    assert a is not None and s.get(a.id) is a
    now[0] += 61
    assert s.get(a.id) is None
    b = s.sign_in(TOKEN, "u")
    assert b is not None
    accepted.clear()  # a deployment rotated the token away
    assert s.get(b.id) is None


def test_console_routes_need_a_session_and_changes_the_csrf_token() -> None:
    s = store()
    sess = s.sign_in(TOKEN, "u")
    assert sess is not None
    cookie = f"other=1; {ss.COOKIE}={sess.id}"
    refusal = s.admit(scope("/console/api/farm"))
    assert refusal is not None and (refusal.status, refusal.reason) == (401, "no_session")
    assert s.admit(scope("/console/login")) is None  # the sign-in page itself
    sc = scope("/console/api/farm", cookie=cookie)
    assert s.admit(sc) is None and sc["state"]["console_session"] is sess
    post = scope("/console/api/nodes/node1/actions/stop", "POST", cookie=cookie)
    refusal = s.admit(post)
    assert refusal is not None and (refusal.status, refusal.reason) == (403, "no_csrf")
    wrong = scope("/console/api/config/deploy", "POST", cookie=cookie, x_csrf_token="x" * 43)
    assert s.admit(wrong) is not None
    good = scope("/console/api/config/deploy", "POST", cookie=cookie, x_csrf_token=sess.csrf)
    assert s.admit(good) is None
    evil = scope(
        "/console/api/config/deploy",
        "POST",
        cookie=cookie,
        x_csrf_token=sess.csrf,
        origin="http://evil.example",
        host="198.51.100.11:9010",
    )
    refusal = s.admit(evil)
    assert refusal is not None and refusal.reason == "cross_origin"
    same = scope(
        "/console/api/config/deploy",
        "POST",
        cookie=cookie,
        x_csrf_token=sess.csrf,
        origin="http://198.51.100.11:9010",
        host="198.51.100.11:9010",
    )
    assert s.admit(same) is None
    assert s.refused == {"no_session": 1, "no_csrf": 2, "cross_origin": 1}


def test_the_cookie_is_httponly_strict_with_an_expiry_and_secure_over_https() -> None:
    sess = store().sign_in(TOKEN, "u")
    assert sess is not None
    text = ss.set_cookie(sess, secure=False, ttl_s=60)
    assert f"{ss.COOKIE}={sess.id}" in text
    assert "HttpOnly" in text and "SameSite=Strict" in text and "Max-Age=60" in text
    assert "Secure" not in text
    assert "Secure" in ss.set_cookie(sess, secure=True, ttl_s=60)
    assert "Max-Age=0" in ss.clear_cookie(secure=False)


def test_the_store_is_bounded_oldest_first() -> None:
    s = store()
    first = s.sign_in(TOKEN, "u")
    assert first is not None
    for _ in range(ss.MAX_SESSIONS):
        s.sign_in(TOKEN, "u")
    assert len(s) == ss.MAX_SESSIONS and s.get(first.id) is None
    assert s.refused["evicted"] == 1


def test_only_console_paths_are_the_gates() -> None:
    assert ss.is_console_path("/") and ss.is_console_path("/console/api/farm")
    assert not ss.is_console_path("/api/v1/state") and not ss.is_console_path("/consoles")
    assert ss.cookie_value(b"a=1; vipfarm_console=abc", ss.COOKIE) == "abc"
    assert ss.cookie_value(b"a=1", ss.COOKIE) is None


def test_peer_routes_take_the_bearer_token_instead_of_a_session() -> None:
    s = store()
    path = "/console/peer/drain"
    refusal = s.admit(scope(path))
    assert refusal is not None and refusal.status == 401
    refusal = s.admit(scope(path, authorization="Bearer nope"))
    assert refusal is not None and refusal.status == 403
    assert s.admit(scope(path, authorization="Bearer " + TOKEN.decode())) is None
    # a peer's POST needs no CSRF token (no browser sends the bearer token), and no session
    post = scope("/console/peer/restart-app", "POST", authorization="Bearer " + TOKEN.decode())
    assert s.admit(post) is None
    refusal = s.admit(scope("/console/peer/restart-app", "POST"))
    assert refusal is not None and refusal.status == 401
