"""The web console: the whole farm from a browser, served by every node's manager.

Theory of operation
-------------------
`mount(app, service, check_token, bearer)` adds the console to the node API's FastAPI app:
`/` redirects to `/console/`, and `/console/...` is a Starlette sub-application (the pages,
their static files, and the JSON and server-sent-event routes the pages call,
`vipfarm.console.routes`). It runs in the manager process, never in the pulse, and lives or dies
with the API: nothing of it is started until a console request comes.

Authentication is a session cookie (`vipfarm.console.sessions`): the farm's API token is
exchanged for it on the sign-in page. `SessionGate`, added as middleware around the whole API
app, acts on console paths only and decides from the request head, before any body is read;
everything else passes through it untouched to the API's own bearer check. The page calls
only the node it was loaded from; that node acts on the others through the node-to-node API
(`vipfarm.console.farm`).

Everything the browser loads is in this package (`static/`, `templates/`: package data), with
no build step and nothing fetched from elsewhere: plain ES2020 modules, one stylesheet, inline
SVG for the charts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vipfarm.console.sessions import SessionGate, Sessions

__all__ = ["SessionGate", "Sessions", "mount"]


def mount(
    app: Any,
    service: Any,
    check_token: Callable[[bytes], bool],
    bearer: Callable[[], bytes],
) -> Sessions | None:
    """Add the console to `app` when `service` can run it (a manager); its `Sessions`, whose
    `admit(scope)` is the hook for the API's request guard."""
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    from vipfarm.console.farm import ConsoleHost, Farm
    from vipfarm.console.routes import BadInput, Console, bad_input

    if not isinstance(service, ConsoleHost):
        return None  # a test's fake node service: the API alone
    sessions = Sessions(check_token)
    farm = Farm(service, bearer)
    console = Console(farm, sessions)
    sub = Starlette(routes=console.routes(), exception_handlers={BadInput: bad_input})
    app.mount("/console", sub)

    async def root(request: Any) -> RedirectResponse:
        return RedirectResponse("/console/", status_code=303)

    app.router.routes.append(Route("/", root, methods=["GET"], include_in_schema=False))
    app.add_middleware(SessionGate, sessions=sessions)
    app.state.console = console
    return sessions
