"""Health, metrics, and the auth probe Xinference's client calls first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..metrics import render


async def status(request: Request) -> Response:
    registry = request.app.state.registry
    return JSONResponse({"status": "ok", "models": {runner.uid: runner.status for runner in registry.runners()}})


async def metrics(request: Request) -> Response:
    state = request.app.state
    text = render(state.registry.runners(), state.latency, len(state.store))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def cluster_auth(request: Request) -> Response:
    return JSONResponse({"auth": bool(request.app.state.settings.api_keys)})


async def address(request: Request) -> Response:
    """Xinference's supervisor address, as "host:port": here, the address this server answered on."""
    host, port = request.scope.get("server") or (request.url.hostname, request.url.port)
    return JSONResponse(f"{host}:{port}")
