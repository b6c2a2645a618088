"""Helpers for the browser tests: open the page, fill the Generate form, read what the page shows, and save
screenshots to test-artifacts/screenshots/ (kept by CI for a person to look at)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

WAIT_MS = 30_000  # liveness bound for every wait on the page (a slow 2-core machine), not a timing assertion
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
SEED = re.compile(r"seed (\d+)")
FINAL_IMAGE = re.compile(r"^Image \d+, seed \d+$")


def screenshot(page, name: str) -> None:
    """Save the whole page as test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def open_playground(page, url: str) -> None:
    """Open the server's root (it redirects to /ui) and wait until the models are listed; fail at once with the
    page's message if it shows an error instead."""
    from playwright.sync_api import expect

    page.goto(f"{url}/")
    expect(page).to_have_url(f"{url}/ui")
    page.locator("#models-table tbody tr[data-uid], #errors:not([hidden])").first.wait_for()
    assert page.locator("#errors").is_hidden(), page.locator("#errors").inner_text()


def fill_generate(page, *, model: str | None = None, mode: str | None = None, prompt: str = "a red fox",
                  size: str = "64x64", steps: int | None = None, previews: int | None = None) -> None:
    """Set the Generate form's fields by their labels, as a user would."""
    if model is not None:
        page.get_by_label("Model", exact=True).select_option(model)
    if mode is not None:
        page.get_by_label(mode, exact=True).check()
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Size", exact=True).fill(size)
    if steps is not None:
        page.get_by_label("Steps", exact=True).fill(str(steps))
    if previews is not None:
        page.get_by_label("Previews", exact=True).fill(str(previews))


def results(page):
    return page.get_by_role("region", name="Results")


def final_images(page):
    return results(page).get_by_role("img", name=FINAL_IMAGE)


def shown_image(page, locator) -> Image.Image:
    """The image an <img> shows (a data: URL), decoded."""
    src = locator.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def max_diff(a: Image.Image, b: Image.Image) -> int:
    """The largest per-channel pixel difference of two images, 0-255."""
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(name: str, image: Image.Image) -> dict:
    """A file for Playwright's set_input_files."""
    return {"name": name, "mimeType": "image/png", "buffer": png(image)}
