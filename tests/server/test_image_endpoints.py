"""Multipart endpoints: variations (image to image), inpainting and edits, as both client families send them."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from .server_helpers import assert_idle, b64_image, pixels, png_bytes, same_image

STEPS = json.dumps({"num_inference_steps": 3, "strength": 0.7})


def post(http: httpx.Client, path: str, data: dict, files: dict | list) -> list[dict]:
    response = http.post(path, data={"response_format": "b64_json", **data}, files=files)
    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert all(isinstance(item["seed"], int) for item in items)
    return items


@pytest.mark.parametrize("model", ["sd15", "sd3", "flux"])
def test_variations_default_to_the_input_size_rounded_to_the_stride(http: httpx.Client, model: str) -> None:
    stride = 16 if model in ("sd3", "flux") else 8
    source = (64 + stride + 5, 64 + 2 * stride + 3)
    items = post(http, "/v1/images/variations", {"model": model, "prompt": "a barn", "n": "2", "kwargs": STEPS},
                 {"image": ("in.png", png_bytes(source), "image/png")})
    assert len(items) == 2
    assert b64_image(items[0]).size == (64 + stride, 64 + 2 * stride)


def test_variations_xinference_client_form(http: httpx.Client) -> None:
    """Xinference's client: every field as a form part, kwargs as a JSON string, the image named `image`."""
    fields = [("model", (None, "sd15")), ("prompt", (None, "a barn")), ("negative_prompt", (None, "fog")),
              ("n", (None, "1")), ("size", (None, "64*64")), ("response_format", (None, "b64_json")),
              ("kwargs", (None, json.dumps({"num_inference_steps": 2, "strength": 0.9, "seed": 4}))),
              ("image", ("image", png_bytes((100, 80)), "application/octet-stream"))]
    response = http.post("/v1/images/variations", files=fields)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["seed"] == 4 and b64_image(item).size == (64, 64)


def test_variations_without_prompt_and_with_explicit_size(http: httpx.Client) -> None:
    items = post(http, "/v1/images/variations", {"model": "sd15", "size": "72x64", "kwargs": STEPS},
                 {"image": ("in.png", png_bytes((64, 64)), "image/png")})
    assert b64_image(items[0]).size == (72, 64)


def test_strength_changes_how_much_of_the_input_survives(http: httpx.Client) -> None:
    source = png_bytes((64, 64), (250, 250, 250))

    def run(strength: float) -> np.ndarray:
        kwargs = json.dumps({"num_inference_steps": 10, "strength": strength, "seed": 1, "guidance_scale": 1.0})
        items = post(http, "/v1/images/variations", {"model": "sd15", "kwargs": kwargs},
                     {"image": ("in.png", source, "image/png")})
        return pixels(b64_image(items[0]))

    assert not same_image(run(0.2), run(1.0))


def test_inpainting(http: httpx.Client) -> None:
    mask = png_bytes((64, 64), 0)
    items = post(http, "/v1/images/inpainting", {"model": "sd15", "prompt": "a window", "kwargs": STEPS},
                 {"image": ("in.png", png_bytes((64, 64)), "image/png"),
                  "mask_image": ("mask.png", mask, "image/png")})
    assert b64_image(items[0]).size == (64, 64)


@pytest.mark.parametrize("field", ["image", "image[]", "images", "images[]"])
def test_edits_image_field_spellings_without_mask(http: httpx.Client, field: str) -> None:
    items = post(http, "/v1/images/edits", {"model": "sd15", "prompt": "snow", "num_inference_steps": "2",
                                            "strength": "0.9"},
                 {field: ("in.png", png_bytes((64, 64)), "image/png")})
    assert b64_image(items[0]).size == (64, 64)


def test_edits_with_mask_inpaints_and_picks_a_model_when_none_is_named(http: httpx.Client) -> None:
    items = post(http, "/v1/images/edits", {"prompt": "snow", "size": "auto", "num_inference_steps": "2", "n": "2"},
                 {"image": ("in.png", png_bytes((64, 64)), "image/png"),
                  "mask": ("mask.png", png_bytes((64, 64), 255), "image/png")})
    assert len(items) == 2


def test_edits_repaint_only_where_the_mask_is_white(http: httpx.Client) -> None:
    """With an all-black mask nothing is repainted, so the prompt cannot change the image; with a white one
    it does."""

    def edit(prompt: str, mask_color: int) -> np.ndarray:
        items = post(http, "/v1/images/edits", {"model": "sd15", "prompt": prompt, "num_inference_steps": "3",
                                                "seed": "5", "guidance_scale": "4"},
                     {"image": ("in.png", png_bytes((64, 64), (30, 160, 220)), "image/png"),
                      "mask": ("mask.png", png_bytes((64, 64), mask_color), "image/png")})
        return pixels(b64_image(items[0]))

    assert same_image(edit("fire", 0), edit("a quiet lake", 0))
    assert not same_image(edit("fire", 255), edit("a quiet lake", 255))
    assert_idle(http, "sd15")
