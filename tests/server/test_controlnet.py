"""ControlNet over HTTP: the launch option and the description, Xinference's form (variations' image is the control
image, diffusers' kwargs honoured) and Kiln's units on every endpoint, server-side canny, the real `xinference-client`
and `openai` SDK calls, and every bad input as a 4xx that leaves a running neighbour's image unchanged."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from kiln.engine.controlnet_units import canny
from kiln.engine.tiny import CONTROLNETS_FOLDER, tiny_checkpoint

from .server_helpers import Background, assert_error, assert_idle, b64_image, pixels, png_bytes, same_image

UID = "sd15-cn"
STEPS = {"num_inference_steps": 3, "seed": 5, "guidance_scale": 4.0}


def edges() -> bytes:
    """A black image with white lines: what a canny ControlNet takes."""
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[::8] = 255
    array[:, 20:22] = 255
    return _png(Image.fromarray(array))


def photo() -> Image.Image:
    y, x = np.indices((64, 64))
    return Image.fromarray(((x > 20) * 180 + (y > 40) * 60).astype(np.uint8)).convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def cn(kiln) -> Iterator[httpx.Client]:
    """Tiny SD1.5 launched with two ControlNets on the shared server."""
    response = kiln.http.post("/v1/models", json={"model_name": "stable-diffusion-v1.5", "model_uid": UID, "tiny": True,
                                                  "controlnet": ["canny", "mlsd"]})
    assert response.status_code == 200, response.text
    yield kiln.http
    kiln.http.delete(f"/v1/models/{UID}")


def generate(http: httpx.Client, **body) -> np.ndarray:
    response = http.post("/v1/images/generations", json={"model": UID, "prompt": "a house", "size": "64x64",
                                                         "response_format": "b64_json", **STEPS, **body})
    assert response.status_code == 200, response.text
    return pixels(b64_image(response.json()["data"][0]))


def form(http: httpx.Client, path: str, data: dict, files: list) -> np.ndarray:
    response = http.post(path, data={"model": UID, "response_format": "b64_json", **data}, files=files)
    assert response.status_code == 200, response.text
    return pixels(b64_image(response.json()["data"][0]))


def test_the_description_lists_the_resident_controlnets(cn: httpx.Client) -> None:
    description = cn.get(f"/v1/models/{UID}").json()
    assert [item["model_name"] for item in description["controlnet"]] == ["canny", "mlsd"]
    assert description["controlnet"][0]["model_id"] == "lllyasviel/sd-controlnet-canny"
    assert description["controlnet"][0]["class"] == "ControlNetModel"
    assert cn.get("/v1/models/sd15").json()["controlnet"] is None


def test_xinference_form_is_kilns_unit_on_the_same_model(cn: httpx.Client) -> None:
    """variations' image is the control image of the launched ControlNets; diffusers' kwargs go to the units."""
    kwargs = {**STEPS, "controlnet_conditioning_scale": [0.8, 0.4], "control_guidance_end": 0.9}
    xinference = form(cn, "/v1/images/variations", {"prompt": "a house", "kwargs": json.dumps(kwargs)},
                      [("image", ("edges.png", edges(), "application/octet-stream"))])
    units = [{"name": "canny", "image": b64(edges()), "scale": 0.8, "end": 0.9},
             {"name": "mlsd", "image": b64(edges()), "scale": 0.4, "end": 0.9}]
    assert same_image(xinference, generate(cn, controlnet=units))
    assert not same_image(xinference, generate(cn))  # the ControlNets reach the image
    one = form(cn, "/v1/images/variations", {"prompt": "a house", "kwargs": json.dumps(kwargs)},
               [("image", ("a.png", edges(), "image/png")), ("image", ("b.png", png_bytes(), "image/png"))])
    assert not same_image(one, xinference)  # one control image per launched ControlNet


def test_units_on_every_endpoint_top_level_or_in_kwargs(cn: httpx.Client) -> None:
    unit = {"name": "canny", "scale": 0.9, "start": 0.1}
    base = {"prompt": "a house", "strength": "0.9", **{k: str(v) for k, v in STEPS.items()}}
    control = [("control_image", ("edges.png", edges(), "image/png"))]
    image = [("image", ("in.png", png_bytes((64, 64), (90, 120, 200)), "image/png"))]
    mask = [("mask_image", ("mask.png", png_bytes((64, 64), 255), "image/png"))]
    plain_i2i = form(cn, "/v1/images/edits", base, image)
    assert same_image(plain_i2i, form(cn, "/v1/images/variations", {**base, "controlnet": "[]"}, image))
    i2i = form(cn, "/v1/images/variations", {**base, "controlnet": json.dumps([unit])}, image + control)
    assert not same_image(plain_i2i, i2i)
    inside = json.dumps({"controlnet": [{**unit, "image": b64(edges())}]})
    assert same_image(i2i, form(cn, "/v1/images/edits", {**base, "kwargs": inside}, image))
    inpaint = form(cn, "/v1/images/inpainting", {**base, "controlnet": json.dumps(unit)}, image + mask + control)
    assert not same_image(inpaint, form(cn, "/v1/images/inpainting", base, image + mask))
    assert same_image(generate(cn, controlnet=[{**unit, "image": b64(edges())}]),
                      generate(cn, kwargs=json.dumps({"controlnet": [{**unit, "image": b64(edges())}]})))


def test_server_side_canny_equals_sending_the_edges(cn: httpx.Client) -> None:
    sent = generate(cn, controlnet=[{"name": "canny", "image": b64(_png(canny(photo(), 50, 150)))}])
    made = generate(cn, controlnet=[{"name": "canny", "image": b64(_png(photo())), "preprocess": "canny",
                                     "low": 50, "high": 150}])
    assert same_image(sent, made)


def test_the_real_xinference_client(kiln, cn: httpx.Client) -> None:
    from xinference_client import RESTfulClient

    client = RESTfulClient(kiln.url)
    uid = client.launch_model(model_name="stable-diffusion-v1.5", model_type="image", model_uid="xc-cn",
                              controlnet="canny", tiny=True)
    try:
        model = client.get_model(uid)
        result = model.image_to_image(image=edges(), prompt="a house", response_format="b64_json",
                                      controlnet_conditioning_scale=0.7, **STEPS)
        image = pixels(b64_image(result["data"][0]))
        assert same_image(image, generate(cn, controlnet=[{"name": "canny", "image": b64(edges()), "scale": 0.7}]))
        assert [item["model_name"] for item in client.describe_model(uid)["controlnet"]] == ["canny"]
    finally:
        client.terminate_model(uid)


def test_the_openai_sdk_with_extra_body(kiln, cn: httpx.Client) -> None:
    with OpenAI(base_url=f"{kiln.url}/v1", api_key="x", max_retries=0, timeout=300) as sdk:
        unit = {"name": "canny", "image": b64(edges()), "guess_mode": True}
        made = sdk.images.generate(model=UID, prompt="a house", size="64x64", response_format="b64_json",
                                   extra_body={**STEPS, "controlnet": [unit]})
        image = pixels(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))))
        assert same_image(image, generate(cn, controlnet=[unit]))
        varied = sdk.images.create_variation(model=UID, image=("edges.png", edges(), "image/png"),
                                             response_format="b64_json", size="64x64",
                                             extra_body={"prompt": "a house", "kwargs": json.dumps(STEPS)})
        image = pixels(Image.open(io.BytesIO(base64.b64decode(varied.data[0].b64_json))))
        units = [{"name": name, "image": b64(edges())} for name in ("canny", "mlsd")]
        assert same_image(image, generate(cn, controlnet=units))


# --- bad input --------------------------------------------------------------------------------------------------
NAN = json.loads('{"x": NaN}')["x"]


@pytest.mark.parametrize(("unit", "status", "words"), [
    ({"name": "canny"}, 400, ["controlnet[0].image is missing", "control_image"]),
    ({"name": "canny", "image": b64(b"not an image")}, 415, ["controlnet[0].image", "not a readable image"]),
    ({"name": "canny", "image": "%%%"}, 400, ["not valid base64"]),
    ({"name": "canny", "image": b64(png_bytes((5000, 4000)))}, 413, ["controlnet[0].image", "pixels"]),
    ({"name": "depth", "image": b64(edges())}, 400, ["'depth' is not a launched ControlNet", "canny, mlsd"]),
    ({"name": "canny", "image": b64(edges()), "scale": 5.5}, 400, ["scale", "between 0 and 5"]),
    ({"name": "canny", "image": b64(edges()), "scale": -1}, 400, ["scale", "between 0 and 5"]),
    ({"name": "canny", "image": b64(edges()), "start": 0.7, "end": 0.2}, 400, ["start 0.7 is after end 0.2"]),
    ({"name": "canny", "image": b64(edges()), "end": 1.5}, 400, ["end", "between 0 and 1"]),
    ({"name": "canny", "image": b64(edges()), "start": -0.1}, 400, ["start", "between 0 and 1"]),
    ({"name": "canny", "image": b64(edges()), "preprocess": "sobel"}, 400, ["preprocess must be canny"]),
    ({"image": b64(edges())}, 400, ["name is required", "canny, mlsd"]),
])
def test_bad_units(cn: httpx.Client, unit: dict, status: int, words: list[str]) -> None:
    body = {"model": UID, "prompt": "x", "size": "64x64", "controlnet": [unit]}
    assert_error(cn.post("/v1/images/generations", json=body), status, *words)


@pytest.mark.parametrize("scale", [NAN, math.inf, -math.inf])
def test_non_finite_scales(cn: httpx.Client, scale: float) -> None:
    body = json.dumps({"model": UID, "prompt": "x", "controlnet": [{"name": "canny", "image": b64(edges()),
                                                                    "scale": scale}]})
    assert_error(cn.post("/v1/images/generations", content=body), 400, "finite")
    kwargs = json.dumps({"controlnet_conditioning_scale": scale})  # not JSON: the kwargs reader refuses it first
    assert_error(cn.post("/v1/images/variations", data={"model": UID, "kwargs": kwargs},
                         files={"image": ("e.png", edges(), "image/png")}), 400, "kwargs", "finite")


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"control_guidance_start": 0.8, "control_guidance_end": 0.3}, ["start 0.8 is after end 0.3"]),
    ({"control_guidance_end": 2}, ["control_guidance_end", "between 0 and 1"]),
    ({"controlnet_conditioning_scale": [1, 2, 3]}, ["3 values for 2 ControlNet units"]),
    ({"strength": 0.5}, ["strength", "control image"]),
])
def test_bad_xinference_kwargs(cn: httpx.Client, kwargs: dict, words: list[str]) -> None:
    response = cn.post("/v1/images/variations", data={"model": UID, "kwargs": json.dumps(kwargs)},
                       files={"image": ("e.png", edges(), "image/png")})
    assert_error(response, 400, *words)


def test_controlnet_where_none_is_launched(http: httpx.Client) -> None:
    unit = {"name": "canny", "image": b64(edges())}
    body = {"model": "sd15", "prompt": "x", "size": "64x64", "controlnet": [unit]}
    assert_error(http.post("/v1/images/generations", json=body), 400, "launched without controlnet")
    body = {"model": "sd15", "prompt": "x", "size": "64x64", "guess_mode": True}
    assert_error(http.post("/v1/images/generations", json=body), 400, "guess_mode", "no ControlNet units")


def test_bad_input_leaves_a_running_neighbour_alone(cn: httpx.Client) -> None:
    neighbour = {**STEPS, "num_inference_steps": 30, "controlnet": [{"name": "canny", "image": b64(edges())}]}
    alone = generate(cn, **neighbour)
    running = Background(lambda: generate(cn, **neighbour))
    for unit in ({"name": "canny", "image": b64(b"junk")}, {"name": "nope", "image": b64(edges())},
                 {"name": "canny", "image": b64(edges()), "scale": 9}):
        response = cn.post("/v1/images/generations", json={"model": UID, "prompt": "x", "controlnet": [unit]})
        assert 400 <= response.status_code < 500
    assert same_image(running.join(), alone)
    assert_idle(cn, UID)


# --- bad launches ---------------------------------------------------------------------------------------------------
def _tiny_controlnet(model: str, name: str) -> str:
    return str(tiny_checkpoint(model) / CONTROLNETS_FOLDER / name)


@pytest.mark.parametrize(("body", "words"), [
    ({"model_name": "stable-diffusion-v1.5", "controlnet": "zoe-depth"},
     ["no ControlNet 'zoe-depth'", "sdxl", "canny, mlsd"]),
    ({"model_name": "sd-turbo", "controlnet": {"edges": "SD15-CANNY"}}, ["ControlNet 'edges'", "is a ControlNet for",
                                                                       "sd-turbo"]),
    ({"model_name": "stable-diffusion-v1.5", "controlnet": {"x": "SDXL-CANNY"}}, ["SDXL", "stable-diffusion-v1.5"]),
    ({"model_name": "FLUX.1-schnell", "controlnet": {"canny": "FLUX-DEV-CANNY"}},
     ["FLUX.1-dev", "guidance", "schnell"]),
    ({"model_name": "stable-diffusion-v1.5", "controlnet": "canny", "backend": "onnx"}, ["onnx", "eager", "compile"]),
    ({"model_name": "stable-diffusion-v1.5", "controlnet": {"x": "/no/such/folder"}}, ["x", "config.json"]),
])
def test_bad_launches_are_400_naming_why(http: httpx.Client, tiny_root: Path, body: dict, words: list[str]) -> None:
    paths = {"SD15-CANNY": _tiny_controlnet("stable-diffusion-v1.5", "canny"),
             "SDXL-CANNY": _tiny_controlnet("stable-diffusion-xl-base-1.0", "canny"),
             "FLUX-DEV-CANNY": _tiny_controlnet("FLUX.1-dev", "canny")}
    if isinstance(body["controlnet"], dict):
        body = {**body, "controlnet": {key: paths.get(value, value) for key, value in body["controlnet"].items()}}
    response = http.post("/v1/models", json={**body, "model_uid": "bad-cn", "tiny": True})
    assert_error(response, 400, *words)
    assert "bad-cn" not in [item["id"] for item in http.get("/v1/models").json()["data"]]
