"""Pure functions and middleware under the routes, checked directly: the image store, upload decoding, the
last-resort 500 (no server needed)."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image

from kiln.engine.images import ImageStore, ImageTooLarge, NotAnImage, decode_upload, encode
from kiln.server.errors import InternalErrors


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_upload() -> None:
    rgba = decode_upload(_png(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), max_pixels=100)
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    assert decode_upload(_png(Image.new("RGB", (8, 8))), max_pixels=100, mode="L").mode == "L"
    with pytest.raises(ImageTooLarge):
        decode_upload(_png(Image.new("RGB", (11, 10))), max_pixels=100)
    with pytest.raises(NotAnImage):
        decode_upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>", max_pixels=100)
    with pytest.raises(NotAnImage):
        decode_upload(_png(Image.new("RGB", (8, 8)))[:40], max_pixels=100)  # truncated


def test_encode_formats() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        assert encode(image, fmt).startswith(magic)
    assert len(encode(Image.effect_noise((64, 64), 50).convert("RGB"), "jpeg", 5)) < len(
        encode(Image.effect_noise((64, 64), 50).convert("RGB"), "jpeg", 95))


def test_store_expiry(tmp_path) -> None:
    store = ImageStore(tmp_path, ttl=0.2)
    name = store.put(b"data", "png")
    assert store.read(name) == b"data" and (tmp_path / name).exists()
    assert store.read("../" + name) is None and store.read(name.replace(".png", ".jpeg")) is None
    time.sleep(0.25)
    assert store.read(name) is None and not (tmp_path / name).exists() and len(store) == 0
    other = store.put(b"x", "webp")
    store.clear()
    assert not (tmp_path / other).exists()


def _call(app) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    asyncio.run(InternalErrors(app)(scope, receive, send))
    return sent


def test_internal_errors_reply_once_and_do_not_raise_again() -> None:
    """Ray Serve's proxy turns an app that raises into its own plain-text 500, so the fault stops here; a fault
    after the status line went out still goes up (only closing the connection is left)."""

    async def faulty(scope, receive, send) -> None:
        raise KeyError("lane")

    start, body = _call(faulty)
    assert start["status"] == 500 and json.loads(body["body"])["error"]["code"] == "internal_error"

    async def faulty_stream(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise KeyError("lane")

    with pytest.raises(KeyError):
        _call(faulty_stream)
