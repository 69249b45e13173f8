"""The node's HTTP API (FastAPI), a thin layer over the same handlers as the control socket.

Theory of operation
-------------------
`create_app(service, token)` builds the ASGI application. Every route calls one method of a
`NodeService` (the daemon implements it, tests use a fake), the very methods the local control
socket calls, so both transports always do the same thing. The app holds no state of its own.

Authentication: every route under `/api/v1` and `/metrics` needs `Authorization: Bearer
<token>`, compared with `hmac.compare_digest`. No (or a malformed) header: 401 with
`WWW-Authenticate: Bearer`; a wrong token: 403. Both are decided before the handler runs, so
neither can change anything. `/metrics` may be made public (`api.metrics_public`); the OpenAPI
schema (`/openapi.json`) is always public, as it holds no data. The interactive `/docs` page is
off: it would load its scripts from a CDN.

Errors all have one body (`ErrorBody`): 409 when the node cannot do what was asked in its
current state or a node refused a deployment (the body names the nodes), 422 for invalid input,
including an invalid configuration with one problem per key.

Handlers are `async` and never block: file reads and kernel reads happen in worker threads
inside the service; the live log stream polls its file from the loop with thread reads.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from vipfarm import __version__
from vipfarm.api import logs as logfiles
from vipfarm.api.models import (
    AbortRequest,
    Ack,
    ActionResult,
    CommitReply,
    CommitRequest,
    ConfigInfo,
    DeployRequest,
    DeployResult,
    ErrorBody,
    LogName,
    LogPage,
    LogQuery,
    NodeStatus,
    PrepareReply,
    PrepareRequest,
    Problem,
    StopRequest,
    StreamQuery,
)
from vipfarm.config.problems import ConfigError
from vipfarm.console import mount as mount_console
from vipfarm.node.control import ControlError
from vipfarm.node.deploy import DeployError

PREFIX = "/api/v1"
# The largest request body taken: a farm configuration of thousands of rules is well below it.
MAX_BODY = 4 * 1024 * 1024


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before it is read (by its
    Content-Length) or as soon as it passes the limit (chunked), so no request can make the
    manager hold or parse more than that."""

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(send)
                return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        resp = _error(413, f"the request body is over {self.limit} bytes: send less")
        await resp({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class NodeService(Protocol):
    """What the API (and the control socket) can ask of a node."""

    @property
    def closing(self) -> bool: ...

    async def status(self) -> NodeStatus: ...
    async def farm_status(self) -> NodeStatus: ...
    async def start(self) -> ActionResult: ...
    async def stop(self, req: StopRequest) -> ActionResult: ...
    def log_path(self, log: LogName) -> Path: ...
    async def log_page(self, query: LogQuery) -> LogPage: ...
    async def config_info(self) -> ConfigInfo: ...
    async def deploy(self, req: DeployRequest) -> DeployResult: ...
    async def prepare(self, req: PrepareRequest) -> PrepareReply: ...
    async def commit(self, req: CommitRequest) -> CommitReply: ...
    async def abort(self, req: AbortRequest) -> Ack: ...
    async def snapshot(self) -> bytes: ...
    async def metrics_text(self) -> bytes: ...


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(detail=detail, **extra).model_dump(mode="json")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the request body is not JSON",
        401: "no bearer token",
        403: "wrong token",
        409: "not possible now (the text says why)",
        413: "the request body is over the limit",
        422: "invalid input",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


# Module level: the routes' annotations are resolved in this module's namespace.
_BEARER = HTTPBearer(
    auto_error=False,
    description="the farm's API token (api.token_file in the farm configuration)",
)


def bearer_check(token: bytes) -> Callable[..., Any]:
    async def check(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if creds is None:
            raise HTTPException(
                401, "authentication required: send Authorization: Bearer <token of api.token_file>"
            )
        if not hmac.compare_digest(creds.credentials.encode(), token):
            raise HTTPException(403, "wrong token: use the farm's api.token_file")

    return check


def create_app(service: NodeService, token: bytes, *, metrics_public: bool = False) -> FastAPI:
    app = FastAPI(
        title="vipfarm node API",
        version=__version__,
        description="State, control, logs, configuration and metrics of one vipfarm node. "
        "See docs/API.md.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit)
    auth = Depends(bearer_check(token))
    api = APIRouter(prefix=PREFIX, dependencies=[auth], responses=_responses(400, 401, 403, 422))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        resp = _error(exc.status_code, str(exc.detail))
        if exc.status_code == 405:
            # Starlette names only the first route of the path; list every method it has.
            methods = {
                m
                for r in app.routes
                if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                for m in r.methods or ()
            }
            resp.headers["Allow"] = ", ".join(sorted(methods))
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            Problem(path=".".join(str(p) for p in e.get("loc", ())), message=str(e.get("msg")))
            for e in exc.errors()
        ]
        return _error(422, "invalid request", problems=problems)

    @app.exception_handler(DeployError)
    async def _deploy(request: Request, exc: DeployError) -> JSONResponse:
        return _error(409, str(exc), nodes=exc.nodes)

    @app.exception_handler(ControlError)
    async def _control(request: Request, exc: ControlError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError) -> JSONResponse:
        problems = [Problem(path=p.path, message=p.message) for p in exc.problems]
        return _error(422, f"{exc.source}: invalid", problems=problems)

    @api.get("/state", summary="this node's state and its view of the farm")
    async def state() -> NodeStatus:
        return await service.status()

    @api.get(
        "/farm",
        summary="the farm as this node sees it, with every node's configuration version",
    )
    async def farm() -> NodeStatus:
        return await service.farm_status()

    @api.post("/start", summary="bring this node into the farm", responses=_responses(409))
    async def start() -> ActionResult:
        return await service.start()

    @api.post(
        "/stop",
        summary="drain this node (force: do not wait for connections)",
        responses=_responses(409),
    )
    async def stop(req: StopRequest | None = None) -> ActionResult:
        return await service.stop(req or StopRequest())

    @api.get("/logs", summary="a page of the module log or the application log")
    async def logs(query: Annotated[LogQuery, Query()]) -> LogPage:
        return await service.log_page(query)

    @api.get(
        "/logs/stream",
        summary="follow a log: new lines as they are written (text/plain, never ends)",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def stream(query: Annotated[StreamQuery, Query()]) -> StreamingResponse:
        path = service.log_path(query.log)

        async def lines() -> AsyncIterator[bytes]:
            async for chunk in logfiles.follow(path, query.offset, lambda: service.closing):
                yield chunk

        return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")

    @api.get("/config", summary="the running configuration, its version and digest")
    async def get_config() -> ConfigInfo:
        return await service.config_info()

    @api.put(
        "/config",
        summary="validate, then deploy a configuration to every node (two phases)",
        responses=_responses(409),
    )
    async def put_config(req: DeployRequest) -> DeployResult:
        return await service.deploy(req)

    @api.post(
        "/config/prepare",
        summary="deployment phase 1 (between nodes): validate and hold",
        responses=_responses(409),
    )
    async def prepare(req: PrepareRequest) -> PrepareReply:
        return await service.prepare(req)

    @api.post(
        "/config/commit",
        summary="deployment phase 2 (between nodes): apply what was prepared",
        responses=_responses(409),
    )
    async def commit(req: CommitRequest) -> CommitReply:
        return await service.commit(req)

    @api.post("/config/abort", summary="forget a prepared deployment (between nodes)")
    async def abort(req: AbortRequest) -> Ack:
        return await service.abort(req)

    @api.get(
        "/snapshot",
        summary="support bundle (tar.gz): configuration without secrets, logs, ruleset, state",
        response_class=Response,
        responses={200: {"content": {"application/gzip": {"schema": {"type": "string"}}}}},
    )
    async def snapshot() -> Response:
        return Response(await service.snapshot(), media_type="application/gzip")

    app.include_router(api)
    # The web console (vipfarm.console): its own session check for /console, the token here.
    mount_console(app, service, lambda t: hmac.compare_digest(t, token), lambda: token)

    metrics_deps = [] if metrics_public else [auth]
    metrics_responses = {} if metrics_public else _responses(401, 403)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        dependencies=metrics_deps,
        response_class=Response,  # so that its 401/403 are documented as JSON
        responses={
            **metrics_responses,
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        },
    )
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            await service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
