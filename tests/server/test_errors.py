"""Bad input never crashes anything and never reaches the engine: each case is a 4xx in the one error shape,
naming what to fix, and the model answers normally afterwards with nothing queued."""

from __future__ import annotations

import httpx
import pytest

from .server_helpers import assert_error, assert_idle, metric, png_bytes

GOOD = {"model": "sd15", "prompt": "a barn", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}


@pytest.fixture(autouse=True)
def nothing_reaches_the_engine(http: httpx.Client):
    """Every test here must leave the engine untouched: no image finished or failed, nothing queued."""
    before = (metric(http, "kiln_images_generated_total", "sd15"), metric(http, "kiln_requests_failed_total", "sd15"))
    yield
    after = (metric(http, "kiln_images_generated_total", "sd15"), metric(http, "kiln_requests_failed_total", "sd15"))
    assert after == before
    assert_idle(http, "sd15")


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"n": "x"}, "n", ["n", "integer"]),
        ({"n": 1.5}, "n", ["n", "integer"]),
        ({"n": True}, "n", ["n", "integer"]),
        ({"n": 0}, "n", ["n", "between 1 and 10"]),
        ({"n": 11}, "n", ["n", "between 1 and 10"]),
        ({"prompt": ["a"] * 4, "n": 3}, "n", ["12 images", "limit is 10"]),
        ({"num_inference_steps": 1.5}, "num_inference_steps", ["num_inference_steps", "integer"]),
        ({"num_inference_steps": False}, "num_inference_steps", ["num_inference_steps", "integer"]),
        ({"num_inference_steps": 0}, "num_inference_steps", ["num_inference_steps", "range"]),
        ({"num_inference_steps": 10_000}, "num_inference_steps", ["num_inference_steps", "range"]),
        ({"guidance_scale": "abc"}, "guidance_scale", ["guidance_scale", "number"]),
        ({"guidance_scale": -1}, "guidance_scale", ["guidance_scale", "range"]),
        ({"guidance_scale": 1e9}, "guidance_scale", ["guidance_scale", "range"]),
        ({"guidance_scale": "nan"}, "guidance_scale", ["guidance_scale", "finite"]),
        ({"strength": 0}, "strength", ["strength", "range"]),
        ({"strength": 1.5}, "strength", ["strength", "range"]),
        ({"seed": "lucky"}, "seed", ["seed", "integer"]),
        ({"seed": 2**40}, "seed", ["seed", "out of range"]),
        ({"seed": [1, 2, 3]}, "seed", ["3 seeds", "1 images"]),
        ({"size": "big"}, "size", ["size", "WIDTHxHEIGHT"]),
        ({"size": "65x64"}, "size", ["multiple of 8"]),
        ({"size": "8x8"}, "size", ["between 64 and 1024"]),
        ({"size": "4096x4096"}, "size", ["between 64 and 1024"]),
        ({"width": 63}, "size", ["multiple of 8"]),
        ({"sampler_name": "Warp Drive"}, "sampler_name", ["Warp Drive", "Euler a"]),
        ({"response_format": "gif"}, "response_format", ["url or b64_json"]),
        ({"output_format": "gif"}, "output_format", ["png, jpeg, webp"]),
        ({"output_compression": 101}, "output_compression", ["output_compression"]),
        ({"partial_images": 4, "stream": True}, "partial_images", ["partial_images", "range"]),
        ({"stream": "maybe"}, "stream", ["true or false"]),
        ({"prompt": "x" * 4001}, "prompt", ["4001 characters", "4000"]),
        ({"negative_prompt": "x" * 4001}, "negative_prompt", ["negative_prompt", "4000"]),
        ({"prompt": 5}, "prompt", ["prompt", "string"]),
        ({"prompt": []}, "prompt", ["prompt", "list of strings"]),
        ({"prompt": None}, "prompt", ["prompt is required"]),
        ({"request_id": ""}, "request_id", ["request_id"]),
        ({"frobnicate": 1}, "frobnicate", ["unknown parameter", "frobnicate"]),
        ({"kwargs": {"cfg": 1}}, "cfg", ["unknown parameter", "cfg", "kwargs"]),
        ({"kwargs": "{not json"}, "kwargs", ["kwargs", "JSON"]),
        ({"kwargs": "[1, 2]"}, "kwargs", ["kwargs", "object"]),
        ({"kwargs": {"num_inference_steps": "many"}}, "num_inference_steps", ["integer"]),
        ({"model": 7}, "model", ["model", "string"]),
    ],
)
def test_invalid_generation_parameters(http: httpx.Client, change: dict, param: str, words: list[str]) -> None:
    body = {**GOOD, **change}
    if change.get("prompt", "") is None:
        del body["prompt"]
    error = assert_error(http.post("/v1/images/generations", json=body), 400, *words)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_flow_models_accept_only_default_and_euler(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={**GOOD, "model": "flux", "size": "64x64",
                                                         "sampler_name": "DPM++ 2M"})
    assert_error(response, 400, "DPM++ 2M", "default, Euler")


def test_flow_sizes_follow_stride_16(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={**GOOD, "model": "sd3", "size": "72x64"})
    assert_error(response, 400, "multiple of 16")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", ["not valid JSON"]),
        (b"", ["empty"]),
        (b"[1, 2]", ["JSON object", "list"]),
        (b"\xff\xfe\x00", ["not valid JSON"]),
    ],
)
def test_malformed_bodies(http: httpx.Client, content: bytes, words: list[str]) -> None:
    response = http.post("/v1/images/generations", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 400, *words)


def test_unknown_model_is_404_listing_running_uids(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/images/generations", json={**GOOD, "model": "nope"}), 404, "nope", "sd15",
                         "flux")
    assert error["code"] == "model_not_found"


def test_ability_the_model_lacks(http: httpx.Client) -> None:
    files = {"image": ("in.png", png_bytes(), "image/png")}
    response = http.post("/v1/images/variations", data={"model": "sd", "prompt": "x"}, files=files)
    assert_error(response, 400, "sd-turbo", "image2image", "sd15")


def test_starlette_errors_use_the_error_shape(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404, "/v1/nothing-here")
    response = http.get("/v1/images/generations")
    assert_error(response, 405, "GET", "POST")
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize(
    ("files", "data", "status", "words"),
    [
        ({}, {"model": "sd15"}, 400, ["image is required"]),
        ({"image": ("x.png", b"definitely not an image", "image/png")}, {"model": "sd15"}, 415, ["not a readable"]),
        ({"image": ("x.pdf", b"%PDF-1.4 nope", "application/pdf")}, {"model": "sd15"}, 415, ["image"]),
        ({"image": ("x.png", png_bytes((5000, 4000)), "image/png")}, {"model": "sd15"}, 413, ["pixels"]),
        ({"image": ("x.png", png_bytes()), "prompt": ("p.txt", b"x")}, {"model": "sd15"}, 400, ["text field"]),
        ({"image": ("a.png", png_bytes()), "image[]": ("b.png", png_bytes())}, {"model": "sd15"}, 400, ["one file"]),
        ({"image": ("x.png", png_bytes())}, {"model": "sd15", "n": "two"}, 400, ["n must be an integer"]),
        ({"image": ("x.png", png_bytes())}, {"model": "sd15", "kwargs": "{oops"}, 400, ["kwargs"]),
        ({"image": ("x.png", png_bytes())}, {"model": "sd15", "size": "60x60"}, 400, ["multiple of 8"]),
        ({"image": ("x.png", png_bytes())}, {"model": "sd15", "kwargs": '{"num_inference_steps": 1}'}, 400,
         ["steps x strength"]),
    ],
)
def test_variations_upload_errors(http: httpx.Client, files: dict, data: dict, status: int, words: list[str]) -> None:
    assert_error(http.post("/v1/images/variations", data=data, files=files), status, *words)


def test_image_text_instead_of_file(http: httpx.Client) -> None:
    response = http.post("/v1/images/variations", data={"model": "sd15", "image": "not a file"},
                         files={"mask": ("m.png", png_bytes())})
    assert_error(response, 400, "image must be a file upload")


def test_multipart_endpoints_want_multipart(http: httpx.Client) -> None:
    response = http.post("/v1/images/variations", json={"model": "sd15"})
    assert_error(response, 415, "multipart/form-data")


def test_inpainting_mask_errors(http: httpx.Client) -> None:
    image = ("in.png", png_bytes((64, 64)), "image/png")
    missing = http.post("/v1/images/inpainting", data={"model": "sd15"}, files={"image": image})
    assert_error(missing, 400, "mask_image is required")
    wrong = http.post("/v1/images/inpainting", data={"model": "sd15"},
                      files={"image": image, "mask_image": ("m.png", png_bytes((32, 64), 255), "image/png")})
    error = assert_error(wrong, 400, "32x64", "64x64")
    assert error["param"] == "mask_image"


def test_edits_errors(http: httpx.Client) -> None:
    image = ("in.png", png_bytes(), "image/png")
    no_prompt = http.post("/v1/images/edits", data={"model": "sd15"}, files={"image": image})
    assert_error(no_prompt, 400, "prompt is required")
    no_image = http.post("/v1/images/edits", data={"model": "sd15", "prompt": "x"}, files={"mask": image})
    assert_error(no_image, 400, "image is required")
