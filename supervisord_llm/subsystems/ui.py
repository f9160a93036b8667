"""The status page (room: operate): one self-contained HTML page on the gateway's port (or the
metrics port when the gateway is off) at ``/`` and ``/ui``, and the JSON it polls.

The page carries its own CSS, JavaScript and SVG charts (no CDN: these machines often have no
internet). It polls ``/ui/status.json`` every second, so a verdict shows within a second or two
without a reload. It is read-only: it shows state, evidence, throughput with its baseline over
the last hour, memory, restarts, the last events, alerts and the reboot state, and offers no
button that stops or switches an engine.

When the gateway has an API key the page and its JSON need it too: as ``Authorization: Bearer``
or ``x-api-key`` (what API clients send), or once as ``?key=`` in the page's address (a browser
cannot add headers to a navigation); the page then sends it as a header on every poll.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

RECENT_EVENTS = 30


def _given_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.query_params.get("key")


def page_html() -> str:
    return resources.files("supervisord_llm").joinpath("templates", "status.html").read_text()


def ui_routes(snapshot: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]], api_key: str | None) -> list[Route]:
    """``/``, ``/ui`` (the page) and ``/ui/status.json`` (status + an hour of history + recent events).

    ``snapshot`` may be a coroutine function: the gateway, in its own process, asks the daemon over its channel."""
    key = api_key.encode() if api_key else None

    def allowed(request: Request) -> bool:
        if key is None:
            return True
        given = _given_key(request)
        return given is not None and hmac.compare_digest(given.encode(), key)

    async def page(request: Request) -> Response:
        if not allowed(request):
            return HTMLResponse(
                "<!doctype html><title>supervisord-llm: key needed</title><h1>401: this status page needs the "
                "gateway's API key</h1><p>Open it as <code>/?key=YOUR_KEY</code>.</p>", status_code=401)
        return HTMLResponse(page_html(), headers={"cache-control": "no-store"})

    async def status_json(request: Request) -> Response:
        if not allowed(request):
            return JSONResponse({"error": {"message": "the status page needs the gateway's API key "
                                           "(Authorization: Bearer KEY, x-api-key, or ?key=)",
                                           "type": "authentication_error", "code": "invalid_api_key"}},
                                status_code=401)
        doc = snapshot()
        if inspect.isawaitable(doc):
            doc = await doc
        return JSONResponse(doc, headers={"cache-control": "no-store"})

    return [Route("/", page, methods=["GET"]), Route("/ui", page, methods=["GET"]),
            Route("/ui/status.json", status_json, methods=["GET"])]


def daemon_snapshot(daemon: Any) -> Callable[[], dict[str, Any]]:
    """What the page shows: the status document, the history and the last events."""
    from supervisord_llm.subsystems import observe

    def snapshot() -> dict[str, Any]:
        doc = daemon.status()
        watching = observe.find(daemon.extensions)
        doc["history"] = watching.history.export() if watching is not None else {"interval_s": None, "engines": {}}
        doc["events"] = list(daemon.events.recent)[-RECENT_EVENTS:] if daemon.events is not None else []
        return doc

    return snapshot
