"""Shared helpers for the server tests: the session's models, image bytes, and error-shape checks."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from typing import Any, Callable

import httpx
import numpy as np
from PIL import Image

# uid -> launch body (besides model_uid and tiny). One model per family, plus a one-slot lane for abort/429.
MODELS: dict[str, dict[str, Any]] = {
    "sd": {"model_name": "sd-turbo"},
    "sd15": {"model_name": "stable-diffusion-v1.5"},
    "sdxl": {"model_name": "sdxl-turbo"},
    "sd3": {"model_name": "sd3-medium"},
    "flux": {"model_name": "FLUX.1-schnell"},
    "busy": {"model_name": "sd-turbo", "max_batch_size": 1, "max_queue_size": 1},
}
SIZE = 64  # the smallest size every family accepts (a multiple of 8 and of 16): 8x8 latents
LONG_STEPS = 500  # the most steps a request may ask for: seconds of work on a tiny model


def png_bytes(size: tuple[int, int] = (64, 64), color: int | tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A plain image (RGB, or a greyscale mask when color is an int) as PNG bytes."""
    image = Image.new("L" if isinstance(color, int) else "RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes, fmt: str = "PNG") -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt, f"expected {fmt}, got {image.format}"
    image.load()
    return image


def b64_image(item: dict, fmt: str = "PNG") -> Image.Image:
    return decode(base64.b64decode(item["b64_json"]), fmt)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same_image(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> bool:
    """Equal within the batch-invariance tolerance: max abs pixel difference <= 2 (of 255)."""
    a, b = (pixels(x) if isinstance(x, Image.Image) else x for x in (a, b))
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 2


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    """The response is the error shape with `status`, and its message mentions every word (case-insensitive)."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] == body["detail"] and error["message"], body
    for word in words:
        assert word.lower() in error["message"].lower(), f"{word!r} not in {error['message']!r}"
    return error


def metric(http: httpx.Client, name: str, model: str) -> float:
    """One per-model sample from /metrics."""
    text = http.get("/metrics").text
    match = re.search(rf'^{re.escape(name)}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll until `condition()` holds (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        time.sleep(0.02)


def assert_idle(http: httpx.Client, uid: str) -> None:
    """Nothing waiting or running on `uid` (nothing leaked into the engine)."""
    assert metric(http, "kiln_queue_depth", uid) == 0
    wait_until(lambda: metric(http, "kiln_active_jobs", uid) == 0, f"{uid} idle")


class Background:
    """Run one blocking call in a thread and keep its result (or exception)."""

    def __init__(self, call: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.error = error

    def join(self, timeout: float = 300.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result
