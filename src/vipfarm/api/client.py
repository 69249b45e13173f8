"""HTTP clients of the node API: `ApiClient` (blocking, for the CLI) and `PeerClient` (asyncio,
for nodes talking to each other: deployment, rejoin sync, the farm view).

Both send the bearer token and the node API version they speak (`Vipfarm-Api`,
`vipfarm.api.guard`), and parse answers into the models of `vipfarm.api.models`. The CLI's
client raises `ApiError` for an error answer (status and `ErrorBody`) and `Unreachable` when no
answer came; the peer client raises `Refused` for an error answer and `Unreachable` otherwise,
which is what the deployment coordinator needs.

Token rotation (docs/API.md): the peer client holds the farm's accepted tokens, the next one of
a rotation first. A peer that refuses one (401/403) is asked again with the next, and the token
it took is remembered for it. This is safe because a node decides authentication before it
reads the body or runs anything, so a refused request did nothing; and it needs no knowledge of
which configuration each peer runs, so it works whatever order the nodes apply a deployment in,
and for a node that was down during it.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from vipfarm.api.guard import API_VERSION, VERSION_HEADER
from vipfarm.api.models import (
    AbortRequest,
    Ack,
    CommitReply,
    CommitRequest,
    ErrorBody,
    PrepareReply,
    PrepareRequest,
)
from vipfarm.config.schema import TOKEN_MAX_BYTES
from vipfarm.config.secrets import FileRefused, key_bytes, read_secret
from vipfarm.datapath.spec import IPAddress
from vipfarm.errors import VipfarmError
from vipfarm.node.deploy import Refused, Unreachable

DEFAULT_PORT = 9010
DEFAULT_TOKEN_FILE = Path("/etc/vipfarm/api.token")
TOKEN_ENV = "VIPFARM_TOKEN_FILE"
PEER_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
# Shorter than the server's keep-alive (`vipfarm.api.server.KEEPALIVE_S`): a pooled connection
# reused just as the server closes it fails the request with an empty ReadError (seen in CI as
# "node1 unreachable" during a deployment).
PEER_KEEPALIVE_S = 2.0

M = TypeVar("M", bound=BaseModel)


class ApiError(VipfarmError):
    """The node answered with an error."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        lines = [body.detail, *(f"  {p.path}: {p.message}" for p in body.problems)]
        super().__init__("\n".join(lines))
        self.status = status
        self.body = body


def base_url(node: str, *, port: int = DEFAULT_PORT, tls: bool = False) -> str:
    """`http(s)://host:port` from `HOST`, `HOST:PORT`, `[V6]:PORT`, a bare IPv6 address or a URL."""
    node = node.strip()
    if "://" in node:
        parts = urlsplit(node)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--node {node!r}: expected http://HOST[:PORT] or https://...")
        return node.rstrip("/")
    scheme = "https" if tls else "http"
    try:
        addr = ipaddress.ip_address(node)
    except ValueError:
        pass
    else:
        return f"{scheme}://{_host(addr)}:{port}"
    parts = urlsplit(f"//{node}")
    try:
        host, explicit = parts.hostname, parts.port
    except ValueError:
        host, explicit = None, None
    if not host or parts.path or parts.query:
        raise ValueError(f"--node {node!r}: expected HOST, HOST:PORT, [IPv6]:PORT or a URL")
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{explicit or port}"


def _host(addr: IPAddress) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


def read_token(path: Path) -> str:
    """The token in `path` as the header carries it; ValueError names the file and the fix."""
    # The caller's own copy: its kind and size are checked (a FIFO must not hang the CLI), not
    # its owner and mode, which only matter to root's copy (checked by the configuration).
    try:
        raw = key_bytes(
            read_secret(path, what="API token", max_bytes=TOKEN_MAX_BYTES, check_access=False)
        )
    except FileRefused as e:
        raise ValueError(
            f"cannot read the API token file: {e}; pass --token-file FILE or "
            f"set {TOKEN_ENV} to a copy of the farm's api.token_file"
        ) from None
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"the API token in {path} is not ASCII text: a bearer token must be, e.g. "
            "head -c 32 /dev/urandom | base64"
        ) from None
    if not token:
        raise ValueError(f"the API token file {path} is empty")
    return token


def tls_verify(ca_file: Path | None, insecure: bool) -> ssl.SSLContext | bool:
    if insecure:
        return False
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return True


def _error_body(resp: httpx.Response) -> ErrorBody:
    try:
        return ErrorBody.model_validate(resp.json())
    except (ValueError, ValidationError):
        return ErrorBody(detail=f"HTTP {resp.status_code}: {resp.text[:200]}")


class ApiClient:
    """Blocking client of one node (the CLI's `--node`)."""

    def __init__(
        self, url: str, token: str, *, verify: ssl.SSLContext | bool = True, timeout: float = 30
    ) -> None:
        self.url = url
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}", VERSION_HEADER: str(API_VERSION)},
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise Unreachable(f"{self.url}: {str(e) or type(e).__name__}") from None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _error_body(resp))
        return resp

    def call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
    ) -> M:
        resp = self._send(
            method,
            path,
            json=body.model_dump(mode="json") if body is not None else None,
            params={k: v for k, v in (params or {}).items() if v is not None},
        )
        return model.model_validate(resp.json())

    def get_bytes(self, path: str) -> bytes:
        return self._send("GET", path).content

    def stream_lines(self, path: str, params: dict[str, Any]) -> Iterator[str]:
        """Lines of a streaming answer as they come (until the server or the caller stops)."""
        try:
            with self._http.stream(
                "GET",
                path,
                params={k: v for k, v in params.items() if v is not None},
                timeout=httpx.Timeout(None, connect=5.0),
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiError(resp.status_code, _error_body(resp))
                yield from resp.iter_lines()
        except httpx.TransportError as e:
            raise Unreachable(f"{self.url}: {str(e) or type(e).__name__}") from None


class PeerClient:
    """Asynchronous client the daemon uses to reach the other nodes' APIs.

    `tokens` are tried in order (the next token of a rotation first); see the module docstring.
    """

    def __init__(
        self,
        tokens: str | list[str],
        *,
        port: int,
        tls: bool,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.port = port
        self.scheme = "https" if tls else "http"
        self.tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        self._worked: dict[IPAddress, str] = {}  # the token each peer took last
        self._http = httpx.AsyncClient(
            headers={VERSION_HEADER: str(API_VERSION)},
            timeout=PEER_TIMEOUT,
            # retries: a refused or timed-out connect only, never a request that was sent
            transport=httpx.AsyncHTTPTransport(
                verify=verify, retries=1, limits=httpx.Limits(keepalive_expiry=PEER_KEEPALIVE_S)
            ),
        )

    def set_tokens(self, tokens: list[str]) -> None:
        """A deployment changed the farm's tokens: forget which one each peer took."""
        if tokens != self.tokens:
            self.tokens = list(tokens)
            self._worked.clear()

    def url(self, addr: IPAddress, path: str) -> str:
        return f"{self.scheme}://{_host(addr)}:{self.port}/api/v1{path}"

    def _order(self, addr: IPAddress) -> list[str]:
        first = self._worked.get(addr)
        if first is None or first not in self.tokens:
            return self.tokens
        return [first, *(t for t in self.tokens if t != first)]

    async def call(
        self,
        method: str,
        addr: IPAddress,
        path: str,
        model: type[M],
        body: BaseModel | None = None,
        timeout: float | None = None,
    ) -> M:
        kw: dict[str, Any] = {}
        if body is not None:
            kw["json"] = body.model_dump(mode="json")
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(timeout, connect=min(timeout, 2.0))
        for token in self._order(addr):
            try:
                resp = await self._http.request(
                    method,
                    self.url(addr, path),
                    headers={"Authorization": f"Bearer {token}"},
                    **kw,
                )
            except httpx.TransportError as e:
                raise Unreachable(f"{addr}: {str(e) or type(e).__name__}") from None
            if resp.status_code not in (401, 403):
                self._worked[addr] = token
                break
        else:
            many = len(self.tokens) > 1
            raise Refused(
                f"its API refused our {'tokens' if many else 'token'} (HTTP {resp.status_code}): "
                "the nodes' api.token_file contents differ"
                + (" (and api.next_token_file's)" if many else "")
            )
        if resp.status_code >= 500:
            detail = _error_body(resp).detail if resp.status_code == 503 else ""
            raise Unreachable(
                f"{addr}: HTTP {resp.status_code}" + (f": {detail}" if detail else "")
            )
        if resp.status_code >= 400:
            raise Refused(str(ApiError(resp.status_code, _error_body(resp))))
        try:
            return model.model_validate(resp.json())
        except (ValueError, ValidationError) as e:
            raise Unreachable(f"{addr}: unexpected answer: {e}") from None

    async def aclose(self) -> None:
        await self._http.aclose()


class RemoteNode:
    """A peer as the deployment coordinator drives it (`vipfarm.node.deploy.Participant`)."""

    def __init__(self, name: str, addr: IPAddress, alive: bool, client: PeerClient) -> None:
        self.name, self.addr, self.alive, self._client = name, addr, alive, client

    async def prepare(self, req: PrepareRequest) -> PrepareReply:
        return await self._client.call("POST", self.addr, "/config/prepare", PrepareReply, req)

    async def commit(self, req: CommitRequest) -> CommitReply:
        return await self._client.call("POST", self.addr, "/config/commit", CommitReply, req)

    async def abort(self, req: AbortRequest) -> None:
        await self._client.call("POST", self.addr, "/config/abort", Ack, req)
