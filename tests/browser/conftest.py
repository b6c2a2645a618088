"""Browser test fixtures: a real Kiln server on loopback with tiny models, and Debian's headless Chromium driven by
Playwright (never a downloaded browser). Each test gets a fresh profile (`--user-data-dir`), so no key or state
leaks between tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.server.conftest import RunningServer, start_server

from .browser_helpers import WAIT_MS

CHROMIUM = Path("/usr/bin/chromium")
# What the issue asks for, plus --disable-quic: without the networking flags Chromium keeps dialling out, and
# this machine refuses every such connection.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic",
]
# uid -> launch body: the demo's default model first (the page picks the first text-to-image one), a model with
# every ability, and the OCR model whose real weights ship in the rapidocr wheel.
MODELS = {
    "sd-turbo": {"model_name": "sd-turbo", "tiny": True},
    "sd15": {"model_name": "stable-diffusion-v1.5", "tiny": True},
    "PP-OCR": {"model_name": "PP-OCR"},
}
# Chromium logs each non-2xx fetch as a console error; the page shows those in its error area instead.
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of (4\d\d)")


@pytest.fixture(scope="package")
def ui_server(tiny_root) -> Iterator[RunningServer]:
    running = start_server()
    try:
        for uid, body in MODELS.items():
            response = running.http.post("/v1/models", json={"model_uid": uid, **body})
            assert response.status_code == 200, response.text
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="package")
def playwright_session():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture
def page(playwright_session, tmp_path):
    """A page in a fresh Chromium profile. At the end, the page must have raised no uncaught error and logged
    nothing but the HTTP errors it showed the user."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = playwright_session.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 1000},
    )
    context.set_default_timeout(WAIT_MS)
    page = context.pages[0] if context.pages else context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: message.type == "error" and not EXPECTED_CONSOLE.search(message.text)
            and problems.append(f"console: {message.text}"))
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems
