"""Health, metrics, and the auth probe Xinference's client calls first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..metrics import render


async def status(request: Request) -> Response:
    """Health: 200 "ok", or 503 "draining" once shutdown has begun, so load balancers stop sending work."""
    state = request.app.state
    models = {runner.uid: runner.status for runner in state.registry.runners()}
    if state.drain.draining:
        return JSONResponse({"status": "draining", "models": models}, status_code=503)
    return JSONResponse({"status": "ok", "models": models})


async def metrics(request: Request) -> Response:
    state = request.app.state
    text = render(state.registry.runners(), state.latency, len(state.store))
    text += "".join([await source() for source in state.extra_metrics])
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def cluster_auth(request: Request) -> Response:
    return JSONResponse({"auth": bool(request.app.state.settings.api_keys)})


async def address(request: Request) -> Response:
    """Xinference's supervisor address, as "host:port": here, the address this server answered on."""
    host, port = request.scope.get("server") or (request.url.hostname, request.url.port)
    return JSONResponse(f"{host}:{port}")
