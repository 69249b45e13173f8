"""Remote control of a farm: the node's HTTP API and what it is built from.

- `models`: the request and response models (one set for HTTP and the control socket).
- `app`: the FastAPI application over a `NodeService` (the daemon), with bearer-token auth.
- `server`: uvicorn inside the daemon's event loop.
- `client`: the HTTP client of the CLI (`vipfarm --node HOST ...`) and of the nodes themselves.
- `deploy`: two-phase configuration deployment with versions.
- `logfiles`, `snapshot`: log pages and live follow; the support bundle.

docs/API.md describes the endpoints, authentication, exit codes and what a deployment may change.
Import from the submodules; this package imports nothing, so the CLI starts fast.
"""
