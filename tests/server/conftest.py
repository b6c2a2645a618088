"""Server test fixtures: the real app on uvicorn (uvloop) on loopback, tiny models launched over HTTP.

One session server carries the shared models; tests that need other settings (short url TTL, small body
limit, API keys, a controllable loader) start their own app instance on another port with `start_server`.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx
import pytest
import uvicorn

from kiln.server.app import Settings, create_app
from kiln.server.registry import ModelRegistry

from .server_helpers import MODELS


STARTUP_SECONDS = 60


@dataclass
class RunningServer:
    """A Kiln app served by uvicorn in a background thread."""

    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread
    http: httpx.Client

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(registry: ModelRegistry | None = None, settings: Settings = Settings()) -> RunningServer:
    """Serve a fresh app on 127.0.0.1:<free port> and wait until it answers."""
    app = create_app(registry, settings=settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="uvloop", log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"kiln-test-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    return RunningServer(url, app, server, thread, httpx.Client(base_url=url, timeout=300))


@pytest.fixture(scope="session")
def kiln(tiny_root) -> Iterator[RunningServer]:
    """The shared server with one tiny model of every family (plus a slow lane for abort/429 tests)."""
    running = start_server()
    try:
        for uid, body in MODELS.items():
            response = running.http.post("/v1/models", json={"model_uid": uid, "tiny": True, **body})
            assert response.status_code == 200, response.text
        yield running
    finally:
        running.stop()


@pytest.fixture
def http(kiln: RunningServer) -> httpx.Client:
    return kiln.http


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Start extra app instances for one test; all are stopped at its end."""
    started: list[RunningServer] = []

    def make(registry: ModelRegistry | None = None, settings: Settings = Settings()) -> RunningServer:
        running = start_server(registry, settings)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
