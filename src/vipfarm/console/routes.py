"""The console's HTTP routes (Starlette), mounted under `/console` of the node API.

Every route but the sign-in page and its two static files runs behind `SessionGate`
(`vipfarm.console.sessions`), so a route can take `request.scope["state"]["console_session"]`
as given, and every change request has passed the CSRF check. Answers are JSON
(`application/json`), server-sent events (`text/event-stream`: the farm view and followed
logs), HTML (the two pages) or downloads. Input is bounded and checked here: a bad value gets a
422 naming the parameter, the value and what is expected, and changes nothing.

Whatever an operator changes (start, stop, force stop, deploy, rollback) is written to this
node's module log as `console_action user=... action=... target=... outcome=...`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from vipfarm.api.models import DeployRequest, LogQuery
from vipfarm.config.problems import ConfigError
from vipfarm.console import sessions as ss
from vipfarm.console.farm import LOG_NAMES, Farm, NodeUnknown, gather_actions
from vipfarm.log import event
from vipfarm.node.control import ControlError
from vipfarm.node.deploy import DeployError, Refused, Unreachable

log = logging.getLogger("vipfarm.console")

MAX_LOGIN_BODY = 4096
MAX_JSON_BODY = 8 * 1024 * 1024
KEEPALIVE_S = 10.0
LOG_POLL_S = 0.3
ACTIONS = ("start", "stop", "force-stop", "restart-app")
STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return (resources.files("vipfarm.console") / "static" / name).read_bytes()


def _page(name: str) -> str:
    return (resources.files("vipfarm.console") / "templates" / name).read_text()


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "problems": [], "nodes": [], **extra}, status_code=status
    )


class BadInput(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _session(request: Request) -> ss.Session:
    s: ss.Session = request.scope["state"]["console_session"]
    return s


async def _json_body(request: Request) -> dict[str, Any]:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON_BODY:
            raise BadInput(f"the request body is over {MAX_JSON_BODY} bytes: send less")
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise BadInput("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    return body


def _str_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise BadInput(f"{key}: expected a string, got {type(value).__name__}")
    return value


class Console:
    """The routes, bound to one manager's `Farm` and `Sessions`."""

    def __init__(self, farm: Farm, sessions: ss.Sessions) -> None:
        self.farm = farm
        self.sessions = sessions

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/api/farm", self.farm_view, methods=["GET"]),
            Route("/api/events", self.events, methods=["GET"]),
            Route("/api/nodes/{name}/actions/{action}", self.act, methods=["POST"]),
            Route("/api/nodes/{name}/logs", self.logs, methods=["GET"]),
            Route("/api/nodes/{name}/logs/stream", self.follow, methods=["GET"]),
            Route("/api/nodes/{name}/snapshot", self.node_snapshot, methods=["GET"]),
            Route("/api/snapshot", self.all_snapshots, methods=["GET"]),
            Route("/api/config", self.config, methods=["GET"]),
            Route("/api/config/history/{index}", self.config_text, methods=["GET"]),
            Route("/api/config/check", self.config_check, methods=["POST"]),
            Route("/api/config/deploy", self.config_deploy, methods=["POST"]),
            Route("/api/buckets/who", self.who, methods=["GET"]),
            Route("/api/timeline", self.timeline, methods=["GET"]),
            Route("/api/charts", self.charts, methods=["GET"]),
            Route("/peer/drain", self.peer_drain, methods=["GET"]),
            Route("/peer/restart-app", self.peer_restart_app, methods=["POST"]),
        ]

    # ---- pages and sign-in

    async def index(self, request: Request) -> Response:
        self.farm.touch()
        s = _session(request)
        html = _page("console.html").replace("{{csrf}}", _escape(s.csrf))
        return HTMLResponse(html)

    async def login_page(self, request: Request, message: str = "", status: int = 200) -> Response:
        note = (
            f'<p class="error" role="alert" id="login-error">{_escape(message)}</p>'
            if message
            else ""
        )
        html = _page("login.html").replace("{{message}}", note)
        return HTMLResponse(html, status_code=status)

    async def login(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and not ss.same_origin(
            origin.encode("latin-1"), request.headers.get("host", "").encode("latin-1")
        ):
            self.sessions.count("cross_origin")
            return await self.login_page(request, "sign-in from another site refused", 403)
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_LOGIN_BODY:
                return await self.login_page(request, "the form is too large", 413)
        token = (parse_qs(data.decode("latin-1")).get("token") or [""])[0].strip()
        client = request.client.host if request.client else "?"
        s = self.sessions.sign_in(token.encode("latin-1", "replace"), user=f"{client}")
        if s is None:
            event(log, "console_sign_in_refused", logging.WARNING, client=client)
            return await self.login_page(
                request, "wrong token: use the farm's API token (api.token_file)", 403
            )
        event(self.farm.host.module_log, "console_signed_in", user=s.user)
        resp = RedirectResponse("/console/", status_code=303)
        resp.headers["set-cookie"] = ss.set_cookie(
            s, secure=request.url.scheme == "https", ttl_s=self.sessions.ttl_s
        )
        return resp

    async def logout(self, request: Request) -> Response:
        s = _session(request)
        self.sessions.sign_out(s.id)
        event(self.farm.host.module_log, "console_signed_out", user=s.user)
        resp = JSONResponse({"signed_out": True})
        resp.headers["set-cookie"] = ss.clear_cookie(secure=request.url.scheme == "https")
        return resp

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return error(404, f"no static file {name!r}")
        return Response(_asset(name), media_type=STATIC[name])

    # ---- farm view

    async def farm_view(self, request: Request) -> Response:
        self.farm.touch()
        if not self.farm.snapshot:
            await self.farm.wait_change(0, 3.0)
        return JSONResponse(self.farm.snapshot)

    async def events(self, request: Request) -> Response:
        farm = self.farm
        farm.touch()

        async def stream() -> AsyncIterator[bytes]:
            farm.subscribers += 1
            farm.nudge()
            try:
                seen = -1
                last = time.monotonic()
                while not farm.host.closing:
                    farm.touch()
                    # Until the first snapshot exists, wait for the version after the current.
                    version = await farm.wait_change(seen if farm.snapshot else farm.version, 1.0)
                    if version != seen and farm.snapshot:
                        seen = version
                        last = time.monotonic()
                        yield b"event: farm\ndata: " + json.dumps(farm.snapshot).encode() + b"\n\n"
                    elif time.monotonic() - last > KEEPALIVE_S:
                        last = time.monotonic()
                        yield b": keep-alive\n\n"
            finally:
                farm.subscribers -= 1

        return _sse(stream())

    # ---- actions

    async def act(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ACTIONS:
            return error(
                422, f"action {action!r} is not one of {', '.join(ACTIONS)}: choose one of them"
            )
        names = self.farm.node_names() if name == "all" else [name]
        if name != "all" and name not in self.farm.node_names():
            return error(404, f"no node {name!r} in the farm: use one of {self.farm.node_names()}")
        outcome = await gather_actions(names, lambda n: self.farm.action(n, action))
        self._record(
            request,
            action,
            name,
            ",".join(f"{n}:{o['state'] if o['ok'] else 'refused'}" for n, o in outcome.items()),
        )
        return JSONResponse({"action": action, "nodes": outcome})

    def _record(self, request: Request, action: str, target: str, outcome: str) -> None:
        event(
            self.farm.host.module_log,
            "console_action",
            user=_session(request).user,
            action=action,
            target=target,
            outcome=outcome,
        )

    # ---- logs

    def _node(self, request: Request) -> str:
        name: str = request.path_params["name"]
        if name not in self.farm.node_names():
            raise BadInput(f"no node {name!r} in the farm: use one of {self.farm.node_names()}")
        return name

    @staticmethod
    def _log_name(request: Request) -> Any:
        name = request.query_params.get("log", "module")
        if name not in LOG_NAMES:
            raise BadInput(f"log={name!r}: expected one of {', '.join(LOG_NAMES)}")
        return name

    @staticmethod
    def _int(request: Request, key: str, default: int | None, lo: int, hi: int) -> int | None:
        raw = request.query_params.get(key)
        if raw is None or raw == "":
            return default
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise BadInput(f"{key}={raw!r}: expected a whole number from {lo} to {hi}")
        return int(raw)

    async def logs(self, request: Request) -> Response:
        try:
            name = self._node(request)
            q = LogQuery(
                log=self._log_name(request),
                offset=self._int(request, "offset", None, 0, 2**62),
                limit=self._int(request, "limit", 200, 1, 10_000) or 200,
            )
        except BadInput as e:
            return error(422, e.detail)
        try:
            page = await self.farm.log_page(name, q)
        except (Refused, Unreachable, NodeUnknown) as e:
            return error(502, f"{name}: {e}")
        return JSONResponse(page.model_dump(mode="json"))

    async def follow(self, request: Request) -> Response:
        """The last lines of a log, then new lines as they are written (SSE, `lines` events).

        `log=both`: the module log and the application log (the scripts' output) together,
        each poll's lines merged by their time stamp, the application's marked `app |`."""
        try:
            name = self._node(request)
            raw = request.query_params.get("log", "module")
            which: list[Any] = ["module", "app"] if raw == "both" else [self._log_name(request)]
        except BadInput as e:
            return error(422, e.detail)
        farm = self.farm

        async def stream() -> AsyncIterator[bytes]:
            offsets: dict[str, int | None] = dict.fromkeys(which)
            limit = 200
            last = time.monotonic()
            while not farm.host.closing:
                got: list[tuple[str, int, str]] = []
                full = False
                try:
                    for log in which:
                        q = LogQuery(log=log, offset=offsets[log], limit=limit)
                        page = await farm.log_page(name, q)
                        start = offsets[log]
                        if start is not None and page.size < start:
                            offsets[log] = 0  # rotated: from the new file's start
                            continue
                        tag = "app | " if len(which) > 1 and log == "app" else ""
                        got += [(line[:23], i, tag + line) for i, line in enumerate(page.lines)]
                        offsets[log] = page.next_offset
                        full = full or len(page.lines) == limit
                except Exception as e:  # a node that went away: say so, keep trying
                    yield _event("problem", {"node": name, "detail": str(e) or type(e).__name__})
                    await asyncio.sleep(1.0)
                    continue
                if got:
                    last = time.monotonic()
                    lines = [line for _, _, line in sorted(got)]
                    yield _event("lines", {"node": name, "log": raw, "lines": lines})
                limit = 1000
                if not full:
                    if time.monotonic() - last > KEEPALIVE_S:
                        last = time.monotonic()
                        yield b": keep-alive\n\n"
                    await asyncio.sleep(LOG_POLL_S)

        return _sse(stream())

    # ---- support

    async def node_snapshot(self, request: Request) -> Response:
        try:
            name = self._node(request)
        except BadInput as e:
            return error(422, e.detail)
        try:
            data = await self.farm.snapshot_of(name)
        except Exception as e:
            return error(502, f"{name}: no snapshot: {e}")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Response(
            data,
            media_type="application/gzip",
            headers={
                "content-disposition": f'attachment; filename="vipfarm-{name}-{stamp}.tar.gz"'
            },
        )

    async def all_snapshots(self, request: Request) -> Response:
        data, failed = await self.farm.snapshot_all()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Response(
            data,
            media_type="application/x-tar",
            headers={
                "content-disposition": f'attachment; filename="vipfarm-snapshots-{stamp}.tar"',
                "x-vipfarm-missing": ",".join(failed),
            },
        )

    # ---- configuration

    async def config(self, request: Request) -> Response:
        farm = self.farm
        farm.touch()
        local = await farm.host.config_info()
        farm.remember_config(local)

        async def node_info(n: str) -> dict[str, Any]:
            try:
                info = await farm.config_of(n) if n != farm.me else local
            except Exception as e:
                return {"node": n, "ok": False, "detail": str(e) or type(e).__name__}
            return {"node": n, "ok": True, "version": info.version, "digest": info.digest}

        nodes = await asyncio.gather(*(node_info(n) for n in farm.node_names()))
        return JSONResponse(
            {
                "node": farm.me,
                "path": local.path,
                "version": local.version,
                "digest": local.digest,
                "text": local.text,
                "nodes": nodes,
                "history": [
                    {"index": i, "version": c["version"], "digest": c["digest"], "at": c["at"]}
                    for i, c in enumerate(farm.configs)
                ],
            }
        )

    async def config_text(self, request: Request) -> Response:
        raw = request.path_params["index"]
        if not raw.isdigit() or int(raw) >= len(self.farm.configs):
            return error(
                404, f"no kept configuration {raw!r}: {len(self.farm.configs)} are kept (0..)"
            )
        c = self.farm.configs[int(raw)]
        return JSONResponse({"version": c["version"], "digest": c["digest"], "text": c["text"]})

    async def config_check(self, request: Request) -> Response:
        """Validation as the operator types: the same parser and messages as `config check`."""
        try:
            text = _str_field(await _json_body(request), "text")
        except BadInput as e:
            return error(422, e.detail)
        path = self.farm.host.config_path
        from vipfarm.config.loading import parse_config
        from vipfarm.node.deploy import split_version

        _, body = split_version(text)
        base = path.parent if path is not None else None
        if base is None:
            return error(409, "this node was not started from a configuration file")
        try:
            await asyncio.to_thread(parse_config, body, base_dir=base, source="the edited file")
        except ConfigError as e:
            return JSONResponse(
                {
                    "ok": False,
                    "problems": [{"path": p.path, "message": p.message} for p in e.problems],
                }
            )
        return JSONResponse({"ok": True, "problems": []})

    async def config_deploy(self, request: Request) -> Response:
        """Deploy (or dry-run) a text, or roll back to a kept version (`rollback`: its index)."""
        try:
            body = await _json_body(request)
            dry_run = body.get("dry_run", False)
            if not isinstance(dry_run, bool):
                raise BadInput(f"dry_run: expected true or false, got {dry_run!r}")
            if "rollback" in body:
                index = body["rollback"]
                if not isinstance(index, int) or not 0 <= index < len(self.farm.configs):
                    raise BadInput(
                        f"rollback: {index!r} is not a kept configuration (0 to "
                        f"{len(self.farm.configs) - 1})"
                    )
                kept = self.farm.configs[index]
                text, action = kept["text"], f"rollback to version {kept['version']}"
            else:
                text, action = _str_field(body, "text"), "deploy"
        except BadInput as e:
            return error(422, e.detail)
        if dry_run:
            action = "dry run of " + action
        try:
            result = await self.farm.host.deploy(DeployRequest(text=text, dry_run=dry_run))
        except ConfigError as e:
            self._record(request, action, "all", "invalid")
            return error(
                422,
                f"{e.source}: invalid",
                problems=[{"path": p.path, "message": p.message} for p in e.problems],
            )
        except DeployError as e:
            self._record(request, action, "all", "refused")
            return error(409, str(e), nodes=[v.model_dump(mode="json") for v in e.nodes])
        except ControlError as e:
            self._record(request, action, "all", "refused")
            return error(409, str(e))
        self._record(
            request,
            action,
            "all",
            f"version {result.version} " + ",".join(f"{v.node}:{v.outcome}" for v in result.nodes),
        )
        if not dry_run:
            self.farm.remember_config(await self.farm.host.config_info())
        return JSONResponse(result.model_dump(mode="json"))

    # ---- buckets, timeline, charts

    async def who(self, request: Request) -> Response:
        """Which bucket a client falls into for a rule, and which node owns it now."""
        from vipfarm.datapath.jhash import bucket_of

        farm = self.farm
        snap = farm.snapshot
        if not snap:
            return error(503, "the farm view is not ready yet: try again in a second")
        spec = farm.host.config.datapath_spec(snap["me"])
        raw_client = request.query_params.get("client", "").strip()
        try:
            client = ipaddress.ip_address(raw_client)
            port = self._int(request, "port", 0, 0, 65535) or 0
            rule_index = self._int(request, "rule", 0, 0, len(spec.rules) - 1) or 0
        except ValueError:
            return error(
                422, f"client={raw_client!r}: expected an IPv4 or IPv6 address, e.g. 198.51.100.201"
            )
        except BadInput as e:
            return error(422, e.detail)
        rule = spec.rules[rule_index]
        if client.version != rule.vip.version:
            return error(
                422,
                f"client={raw_client!r} is IPv{client.version} but rule {rule_index} "
                f"({rule.vip}) is IPv{rule.vip.version}: choose a rule of the client's family",
            )
        bucket = bucket_of(rule, spec.buckets, spec.seed, client, port)
        owners = [n["name"] for n in snap["nodes"] if bucket in n["owned"]]
        return JSONResponse(
            {
                "client": str(client),
                "port": port,
                "rule": {"vip": str(rule.vip), "proto": rule.proto.value, "ports": rule.ports_text},
                "affinity": rule.affinity.value,
                "bucket": bucket,
                "owners": owners,
            }
        )

    async def timeline(self, request: Request) -> Response:
        self.farm.touch()
        return JSONResponse({"entries": await self.farm.timeline()})

    async def charts(self, request: Request) -> Response:
        self.farm.touch()
        return JSONResponse({"sample_s": 5, "nodes": self.farm.charts()})

    async def peer_restart_app(self, request: Request) -> Response:
        """Restart this node's application, for a peer's console (the action is recorded there,
        with its user; here as the manager's own `app_restart_requested`)."""
        try:
            result = await self.farm.restart_app_here()
        except (ControlError, NodeUnknown) as e:
            return error(409, str(e))
        return JSONResponse(result.model_dump(mode="json"))

    async def peer_drain(self, request: Request) -> Response:
        """This node's open connections to its VIPs (what a drain waits for), for a peer."""
        return JSONResponse({"node": self.farm.me, "connections": await self.farm.busy_here()})


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def bad_input(request: Request, exc: Exception) -> Response:
    detail = exc.detail if isinstance(exc, BadInput) else str(exc)
    return error(422, detail)
