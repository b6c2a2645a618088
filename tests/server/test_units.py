"""Pure functions under the routes, checked directly: size parsing, parameter merging, the image store and
upload decoding (no server needed)."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from kiln.engine.catalogue import get_spec
from kiln.engine.images import ImageStore, ImageTooLarge, NotAnImage, decode_upload, encode
from kiln.server.errors import ApiError
from kiln.server.params import Limits, fit_size, merge_fields, parse_generation, parse_size


def test_parse_size() -> None:
    assert parse_size("512x768") == (512, 768)
    assert parse_size(" 512*768 ") == (512, 768)
    assert parse_size("512 X 768") == (512, 768)
    for default in ("", "auto", "original"):
        assert parse_size(default) is None
    for bad in ("512", "512xx768", "x512", "-512x512", "512x512x512"):
        with pytest.raises(ApiError):
            parse_size(bad)


def test_fit_size_rounds_down_and_clamps() -> None:
    flux = get_spec("FLUX.1-schnell")
    assert fit_size(flux, 1000, 700) == (992, 688)
    assert fit_size(flux, 10, 5000) == (flux.min_size, flux.max_size)


def test_merge_order_and_ignored_fields() -> None:
    merged = merge_fields({"kwargs": '{"seed": 1, "guidance_scale": 2}', "seed": "3", "quality": "hd",
                           "negative_prompt": None, "model": "m"})
    assert merged == {"seed": 3, "guidance_scale": 2.0}


def test_catalogue_defaults_apply() -> None:
    spec = get_spec("FLUX.1-dev")
    generation = parse_generation(spec, {"prompt": "x"}, limits=Limits())
    assert (generation.width, generation.height) == spec.default_size
    assert generation.steps == 28 and generation.guidance_scale == 3.5 and generation.sampler == "default"
    assert generation.response_format == "url" and generation.output_format == "png" and not generation.stream


def test_request_carries_previews_only_when_streaming() -> None:
    spec = get_spec("sd-turbo")
    streamed = parse_generation(spec, {"prompt": "x", "stream": True, "partial_images": 2}, limits=Limits())
    assert streamed.to_request().preview_count == 2
    plain = parse_generation(spec, {"prompt": "x", "partial_images": 2}, limits=Limits())
    assert plain.to_request().preview_count == 0


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
