"""The node's HTTP API (FastAPI), a thin layer over the same handlers as the control socket.

Theory of operation
-------------------
`create_app(service, token)` builds the ASGI application. Every route calls one method of a
`NodeService` (the daemon implements it, tests use a fake), the very methods the local control
socket calls, so both transports always do the same thing. The app holds no state of its own.

Authentication: every route under `/api/v1` and `/metrics` needs `Authorization: Bearer
<token>`. `RequestGuard` (`vipfarm.api.guard`), the outermost middleware, checks it before the
application or any handler runs and before the body is read: no (or a malformed) header is
401 with `WWW-Authenticate: Bearer`, a wrong token 403, so neither can change anything or cost
the body. It also refuses a node API version this node cannot speak (400) and a body over
`api.max_body_bytes` (413). `/metrics` may be made public (`api.metrics_public`); the OpenAPI
schema (`/openapi.json`) is always public, as it holds no data. The interactive `/docs` page is
off: it would load its scripts from a CDN. The bearer dependency left on the routes only
declares the scheme in the schema.

Live log streams hold a slot each while they run: over `api.max_log_streams` a new one is 503.

Errors all have one body (`ErrorBody`): 409 when the node cannot do what was asked in its
current state or a node refused a deployment (the body names the nodes), 422 for invalid input,
including an invalid configuration with one problem per key.

Handlers are `async` and never block: file reads and kernel reads happen in worker threads
inside the service; the live log stream polls its file from the loop with thread reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from vipfarm.api.guard import PREFIX, Counters, Limits, RequestGuard, Tokens
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

# The largest request body taken by default (`api.max_body_bytes`).
MAX_BODY = Limits.max_body_bytes


class _Streams:
    """Live log streams: at most `limits.max_log_streams` at once, each holding a slot from
    its handler until its response ends (however it ends)."""

    def __init__(self, limits: Limits, counters: Counters) -> None:
        self.limits = limits
        self.counters = counters

    def take(self) -> None:
        if self.counters.log_streams >= self.limits.max_log_streams:
            self.counters.count("max_log_streams")
            raise HTTPException(
                503,
                f"{self.counters.log_streams} log streams are open already, the most this node "
                f"serves (api.max_log_streams = {self.limits.max_log_streams}): close one "
                "(another vipfarm log -f) or raise api.max_log_streams",
            )
        self.counters.log_streams += 1

    def give_back(self) -> None:
        self.counters.log_streams -= 1


class _HeldStream(StreamingResponse):
    """A streaming answer that gives its slot back when it ends, is cancelled or fails."""

    def __init__(self, content: AsyncIterator[bytes], streams: _Streams, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._streams: _Streams | None = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()

    def release(self) -> None:
        if self._streams is not None:
            self._streams.give_back()
            self._streams = None


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
        400: "the request body is not JSON, or the caller's node API version (Vipfarm-Api) "
        "is one this node cannot speak",
        401: "no bearer token",
        403: "wrong token",
        409: "not possible now (the text says why)",
        413: "the request body is over the limit",
        422: "invalid input",
        503: "over a limit of this node (the text names it)",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


# Module level: the routes' annotations are resolved in this module's namespace.
_BEARER = HTTPBearer(
    auto_error=False,
    description="the farm's API token (api.token_file in the farm configuration)",
)


async def _documented_only(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """Declares the bearer scheme in the OpenAPI schema; `RequestGuard` has already checked
    the token by the time a route runs (before the body was read)."""


def create_app(
    service: NodeService,
    token: bytes | Tokens,
    *,
    metrics_public: bool = False,
    limits: Limits | None = None,
    counters: Counters | None = None,
    node: str = "this node",
) -> FastAPI:
    """The app; `token` may be a `Tokens` the caller keeps to change them live, as `limits`."""
    tokens = token if isinstance(token, Tokens) else Tokens(token)
    limits = limits or Limits()
    counters = counters or Counters()
    streams = _Streams(limits, counters)
    app = FastAPI(
        title="vipfarm node API",
        version=__version__,
        description="State, control, logs, configuration and metrics of one vipfarm node. "
        "See docs/API.md.",
        docs_url=None,
        redoc_url=None,
    )

    def public(path: str) -> bool:
        if path.startswith(PREFIX):
            return False
        return path != "/metrics" or metrics_public

    app.add_middleware(
        RequestGuard,
        tokens=tokens,
        limits=limits,
        counters=counters,
        public=public,
        node=node,
    )
    auth = Depends(_documented_only)
    api = APIRouter(
        prefix=PREFIX, dependencies=[auth], responses=_responses(400, 401, 403, 413, 422)
    )

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
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **_responses(503),
        },
    )
    async def stream(query: Annotated[StreamQuery, Query()]) -> StreamingResponse:
        path = service.log_path(query.log)

        async def lines() -> AsyncIterator[bytes]:
            async for chunk in logfiles.follow(path, query.offset, lambda: service.closing):
                yield chunk

        streams.take()
        return _HeldStream(lines(), streams, media_type="text/plain; charset=utf-8")

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
    mount_console(app, service, tokens.check, lambda: tokens.current)

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
