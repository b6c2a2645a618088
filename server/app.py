"""The Starlette application: settings, the routing table, and the guards every request passes (its Host
header, the drain at shutdown, API keys, body size).

    app = create_app()                       # a fresh ModelRegistry, default Settings
    app = create_app(registry, settings=Settings(file_ttl_seconds=60, api_keys=frozenset({"k"})))
    serve(app, "127.0.0.1", 9997)            # uvicorn on uvloop, drained on SIGTERM/SIGINT

`create_app` owns (and closes at shutdown) the registry it creates; a registry passed in belongs to the caller,
so several apps can share one set of models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.engine.images import ImageStore
from kiln.engine.schema import Limits

from .drain import Drain, DrainGate, DrainingServer
from .errors import EXCEPTION_HANDLERS, ApiError, InternalErrors, error_response
from .hosts import LOCAL_HOSTS, TrustedHosts
from .metrics import LatencyMiddleware, RequestLatency
from .registry import ModelRegistry
from .routes import docs, images, models, ocr, registrations, requests, sdapi, system, ui

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9997  # Xinference's


@dataclass(frozen=True)
class Settings:
    """Server-wide knobs. Every bound has a default that matches OpenAI's or Xinference's where they have one."""

    limits: Limits = field(default_factory=Limits)  # n <= 10 images, prompt <= 4000 chars, partial_images <= 3
    max_body_bytes: int = 64 * 1024 * 1024  # whole request body, enforced while reading
    max_upload_bytes: int = 32 * 1024 * 1024  # one uploaded image file
    max_image_pixels: int = 4096 * 4096  # one uploaded image, checked from its header before decoding
    file_ttl_seconds: float = 3600.0  # how long `url` images stay fetchable
    file_dir: str | None = None  # where they are kept; None: a fresh temporary directory
    retry_after_seconds: int = 5  # sent with 429 (queue full) and 503 (model loading, server draining)
    api_keys: frozenset[str] = frozenset()  # non-empty: every route but /status, /v1/cluster/auth, /ui needs one
    launch: tuple[Mapping[str, Any], ...] = ()  # launch bodies (as POST /v1/models) started at startup
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS  # Host headers answered, "*" for all; `kiln serve` adds its host
    public_url: str | None = None  # the base of every `url` ("https://x/" behind a proxy); None: the request's
    drain_timeout_seconds: float = 300.0  # after SIGTERM/SIGINT, how long admitted requests may still run


def routes() -> list[BaseRoute]:
    """The routing table (every route but the playground's and the documentation's own is described in
    /openapi.json)."""
    return [
        Route("/v1/images/generations", images.generations, methods=["POST"]),
        Route("/v1/images/variations", images.variations, methods=["POST"]),
        Route("/v1/images/inpainting", images.inpainting, methods=["POST"]),
        Route("/v1/images/edits", images.edits, methods=["POST"]),
        Route("/v1/images/ocr", ocr.ocr, methods=["POST"]),
        Route("/v1/images/files/{name}", images.stored_file, methods=["GET"]),
        Route("/v1/models", models.launch, methods=["POST"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/instances", models.instances, methods=["GET"]),  # before {uid}, which would take it
        Route("/v1/models/{uid}", models.describe, methods=["GET"]),
        Route("/v1/models/{uid}", models.terminate, methods=["DELETE"]),
        Route("/v1/models/{uid}/replicas", models.replicas, methods=["GET"]),
        Route("/v1/models/{uid}/replicas", models.scale, methods=["POST"]),
        Route("/v1/models/{uid}/progress", models.launch_progress, methods=["GET"]),
        Route("/v1/models/{uid}/cancel", models.cancel, methods=["POST"]),
        Route("/v1/models/{uid}/requests/{request_id}/abort", requests.abort, methods=["POST"]),
        Route("/v1/requests/{request_id}/progress", requests.progress, methods=["GET"]),
        Route("/v1/model_registrations/image", registrations.registrations, methods=["GET"]),
        Route("/v1/model_registrations/image", registrations.register, methods=["POST"]),
        Route("/v1/model_registrations/image/{name}", registrations.registration, methods=["GET"]),
        Route("/v1/model_registrations/image/{name}", registrations.unregister, methods=["DELETE"]),
        Route("/v1/engines/image/{model_name}", registrations.engines, methods=["GET"]),
        Route("/v1/cluster/auth", system.cluster_auth, methods=["GET"]),
        Route("/v1/address", system.address, methods=["GET"]),
        Route("/sdapi/v1/txt2img", sdapi.txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", sdapi.img2img, methods=["POST"]),
        Route("/sdapi/v1/options", sdapi.get_options, methods=["GET"]),
        Route("/sdapi/v1/options", sdapi.set_options, methods=["POST"]),
        Route("/sdapi/v1/sd-models", sdapi.sd_models, methods=["GET"]),
        Route("/sdapi/v1/samplers", sdapi.samplers, methods=["GET"]),
        Route("/sdapi/v1/scripts", sdapi.scripts, methods=["GET"]),
        Route("/sdapi/v1/progress", sdapi.progress, methods=["GET"]),
        Route("/sdapi/v1/interrupt", sdapi.interrupt, methods=["POST"]),
        Route("/status", system.status, methods=["GET"]),
        Route("/metrics", system.metrics, methods=["GET"]),
        Route("/", ui.home, methods=["GET"]),
        Route("/ui", ui.page, methods=["GET"], name="ui"),
        Route("/ui/config.json", ui.config, methods=["GET"]),
        Mount("/ui", ui.static_files()),
        Route("/openapi.json", docs.openapi_json, methods=["GET"]),
        Route("/docs", docs.docs, methods=["GET"]),
        Mount("/docs/assets", docs.assets(), name="docs-assets"),
    ]


def create_app(registry: ModelRegistry | None = None, *, settings: Settings = Settings()) -> Starlette:
    """The Kiln ASGI app. `app.state` holds `registry`, `settings`, `store` (the url image store), `latency`
    (request latency histograms) and `drain` (what `serve` runs on exit signals)."""
    owns_registry = registry is None
    registry = registry if registry is not None else ModelRegistry(retry_after=settings.retry_after_seconds,
                                                                   limits=settings.limits)
    store = ImageStore(settings.file_dir, ttl=settings.file_ttl_seconds)
    latency = RequestLatency()
    drain = Drain(settings.drain_timeout_seconds, settings.retry_after_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for body in settings.launch:
            await registry.launch(body, wait_ready=False)
        sweeper = asyncio.create_task(_sweep(store))
        try:
            yield
        finally:
            sweeper.cancel()
            if owns_registry:
                await registry.close()
            store.clear()

    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(InternalErrors),
            Middleware(TrustedHosts, allowed_hosts=settings.allowed_hosts),
            Middleware(DrainGate, drain=drain),
            Middleware(LatencyMiddleware, latency=latency),
            Middleware(ApiKeyAuth, keys=settings.api_keys),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.settings = settings
    app.state.store = store
    app.state.latency = latency
    app.state.drain = drain
    app.state.extra_metrics = []  # async () -> str, appended to /metrics (kiln.cluster adds Ray Serve's own)
    app.state.sdapi = sdapi.SdapiState()
    return app


def serve(app: Starlette, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
          forwarded_allow_ips: str | None = None) -> None:
    """Run `app` with uvicorn on uvloop until a SIGTERM or SIGINT has drained it (server.drain)."""
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", log_level=log_level,
                            forwarded_allow_ips=forwarded_allow_ips, timeout_graceful_shutdown=10)
    DrainingServer(config, app.state.drain).run()


async def _sweep(store: ImageStore) -> None:
    """Delete expired url images even when no new image arrives."""
    interval = max(0.5, min(60.0, store.ttl / 4))
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(store.sweep)


class BodyLimit:
    """413 for a body past `max_bytes`: at once from Content-Length, else while it streams in (a chunked body
    is refused as soon as it crosses the bound, never buffered whole)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than {self.max_bytes} bytes; send a smaller image or body"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(413, message, code="body_too_large")(scope, receive, send)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, message, code="body_too_large")
            return incoming

        await self.app(scope, bounded_receive, send)


class ApiKeyAuth:
    """With API keys configured, every route but the health and auth probes, the playground's page and files, and
    the API document and its page needs `Authorization: Bearer <key>` (what both OpenAI's SDK and Xinference's
    client send). Stored image files stay open too: an `<img>` cannot send a header, so their URLs are the
    capability (random 128-bit names that expire)."""

    OPEN_PATHS = frozenset({"/status", "/v1/cluster/auth", "/", "/ui", "/openapi.json", "/docs"})
    # The playground's and the API page's files hold no secrets (the playground asks for a key and sends it);
    # image files are capabilities.
    OPEN_PREFIXES = ("/ui/", "/docs/assets/", "/v1/images/files/")

    def __init__(self, app: ASGIApp, keys: frozenset[str]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.keys or path in self.OPEN_PATHS
                or path.startswith(self.OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.keys):
            await self.app(scope, receive, send)
            return
        await error_response(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")(scope, receive, send)
