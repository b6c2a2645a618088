"""AUTOMATIC1111's API (`/sdapi/v1`) driven by the real `webuiapi` client and over plain HTTP: txt2img and
img2img give the images Kiln's own endpoints give for the same seeds, batch_size x n_iter images, the model and
sampler lists, options, progress with previews, interrupt, the flow-matching sampler fallback, and 4xx for what
Kiln cannot do (nothing queued)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageOps

from .server_helpers import (LONG_STEPS, Background, assert_error, assert_idle, b64_image, pixels, png_bytes,
                             same_image, wait_until)

SMALL = {"width": 64, "height": 64, "steps": 2}


def _api(url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")


def _kiln_images(http, path: str = "/v1/images/generations", files=None, **fields) -> list[np.ndarray]:
    if files is None:
        response = http.post(path, json={"response_format": "b64_json", "size": "64x64", **fields})
    else:
        form = {key: str(value) for key, value in {"response_format": "b64_json", "size": "64x64", **fields}.items()}
        response = http.post(path, data=form, files=files)
    assert response.status_code == 200, response.text
    return [pixels(b64_image(item)) for item in response.json()["data"]]


def test_webuiapi_txt2img_batches_and_iterations_are_kilns_images(kiln) -> None:
    result = _api(kiln.url).txt2img(prompt="a red fox", seed=5, batch_size=2, n_iter=2, cfg_scale=6.0,
                                    override_settings={"sd_model_checkpoint": "sd15"}, **SMALL)
    assert result.info["all_seeds"] == [5, 6, 7, 8] and result.info["sd_model_name"] == "stable-diffusion-v1.5"
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 2 and result.info["cfg_scale"] == 6.0
    assert "Seed: 5" in result.info["infotexts"][0] and "Size: 64x64" in result.info["infotexts"][0]
    assert [image.size for image in result.images] == [(64, 64)] * 4
    # webuiapi sends sampler "Euler a": the same as Kiln's own endpoint asked for it, image for image.
    expected = _kiln_images(kiln.http, model="sd15", prompt="a red fox", n=4, seed=5, num_inference_steps=2,
                            guidance_scale=6.0, sampler_name="Euler a")
    assert all(same_image(pixels(got), want) for got, want in zip(result.images, expected))
    assert set(result.json) == {"images", "parameters", "info"} and isinstance(result.json["info"], str)
    assert result.parameters["enable_hr"] is False and result.parameters["batch_size"] == 2


def test_webuiapi_img2img_and_inpainting_are_kilns_images(kiln) -> None:
    api = _api(kiln.url)
    start = Image.open(io.BytesIO(png_bytes((64, 64), (200, 40, 40))))
    result = api.img2img(images=[start], prompt="a fox", denoising_strength=0.5, seed=3, cfg_scale=5.0,
                         override_settings={"sd_model_checkpoint": "sd15"}, width=64, height=64, steps=4)
    expected = _kiln_images(kiln.http, "/v1/images/variations", files={"image": png_bytes((64, 64), (200, 40, 40))},
                            model="sd15", prompt="a fox", strength=0.5, seed=3, num_inference_steps=4,
                            guidance_scale=5.0, sampler_name="Euler a")
    assert same_image(pixels(result.image), expected[0])
    assert result.parameters["init_images"] is None  # A1111 echoes inputs only with include_init_images

    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    inverted = api.img2img(images=[start], mask_image=ImageOps.invert(half), inpainting_mask_invert=1,
                           prompt="a fox", denoising_strength=0.8, seed=3, cfg_scale=5.0,
                           override_settings={"sd_model_checkpoint": "sd15"}, width=64, height=64, steps=4)
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")
    direct = _kiln_images(kiln.http, "/v1/images/inpainting",
                          files={"image": png_bytes((64, 64), (200, 40, 40)), "mask_image": buffer.getvalue()},
                          model="sd15", prompt="a fox", strength=0.8, seed=3, num_inference_steps=4,
                          guidance_scale=5.0, sampler_name="Euler a")
    assert same_image(pixels(inverted.image), direct[0])


def test_plain_base64_init_images_cycle_through_the_batch(kiln) -> None:
    red, blue = png_bytes((64, 64), (200, 40, 40)), png_bytes((64, 64), (40, 40, 200))
    body = {"init_images": [base64.b64encode(red).decode(), f"data:image/png;base64,{base64.b64encode(blue).decode()}"],
            "prompt": "x", "seed": 9, "batch_size": 2, "denoising_strength": 0.5, "model": "sd15", **SMALL}
    response = kiln.http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    first, second = (pixels(Image.open(io.BytesIO(base64.b64decode(item)))) for item in response.json()["images"])
    for image, data, seed in ((first, red, 9), (second, blue, 10)):
        (expected,) = _kiln_images(kiln.http, "/v1/images/variations", files={"image": data}, model="sd15",
                                   prompt="x", strength=0.5, seed=seed, num_inference_steps=2, guidance_scale=7.5)
        assert same_image(image, expected)


def test_flow_models_fall_back_to_their_sampler_and_say_so(kiln) -> None:
    body = {"prompt": "x", "seed": 2, "sampler_name": "Euler a", "scheduler": "automatic", "model": "flux", **SMALL}
    response = kiln.http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == "Euler" and "Euler a" in info["extra_generation_params"]["Sampler fallback"]
    image = pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    (expected,) = _kiln_images(kiln.http, model="flux", prompt="x", seed=2, num_inference_steps=2)
    assert same_image(image, expected)


def test_karras_scheduler_picks_the_karras_sampler(kiln) -> None:
    body = {"prompt": "x", "seed": 4, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "model": "sd15",
            "cfg_scale": 5, **SMALL}
    response = kiln.http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    (expected,) = _kiln_images(kiln.http, model="sd15", prompt="x", seed=4, num_inference_steps=2, guidance_scale=5,
                               sampler_name="DPM++ 2M Karras")
    assert same_image(image, expected)


def test_models_options_and_samplers_with_webuiapi(server_factory) -> None:
    server = server_factory()
    for uid, name in (("first", "sd-turbo"), ("second", "stable-diffusion-v1.5")):
        launch = {"model_uid": uid, "model_name": name, "tiny": True}
        assert server.http.post("/v1/models", json=launch).status_code == 200
    api = _api(server.url)
    assert api.util_get_current_model() == "first"  # before any options call: the first ready image model
    models = api.get_sd_models()
    assert [item["title"] for item in models] == ["first", "second"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["sha256"].startswith(models[0]["hash"]) and models[0]["hash"] != models[1]["hash"]
    assert {"Euler a", "DPM++ 2M Karras", "Heun"} <= set(api.util_get_sampler_names())
    answer = api.set_options({"sd_model_checkpoint": "second"})
    assert answer["sd_model_checkpoint"] == "second"
    assert api.util_get_current_model() == "second"
    assert api.txt2img(prompt="x", **SMALL).info["sd_model_name"] == "stable-diffusion-v1.5"
    for body, param in (({"sd_model_checkpoint": "ghost"}, "sd_model_checkpoint"),
                        ({"sd_model_checkpoint": ""}, "sd_model_checkpoint"),
                        ({"sd_vae": "Automatic"}, "sd_vae")):
        assert assert_error(server.http.post("/sdapi/v1/options", json=body), 400)["param"] == param
    assert api.util_get_current_model() == "second"  # refused changes change nothing
    assert server.http.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


@pytest.fixture(scope="module")
def serial(kiln):
    """A model that denoises one image at a time, so the first image of a call finishes while the next runs."""
    body = {"model_uid": "serial", "model_name": "sd-turbo", "tiny": True, "max_batch_size": 1}
    assert kiln.http.post("/v1/models", json=body).status_code == 200
    yield "serial"
    kiln.http.delete("/v1/models/serial")


def test_progress_previews_and_an_interrupt_that_keeps_finished_images(kiln, serial) -> None:
    http = kiln.http
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    body = {"prompt": "x", "seed": 1, "batch_size": 2, "model": serial, "width": 64, "height": 64, "steps": LONG_STEPS}
    call = Background(lambda: http.post("/sdapi/v1/txt2img", json=body))
    wait_until(lambda: http.get("/sdapi/v1/progress").json()["progress"] > 0.52, "the first image to finish")
    progress = http.get("/sdapi/v1/progress").json()
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == LONG_STEPS
    assert progress["eta_relative"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    assert http.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    assert http.post("/sdapi/v1/interrupt").json() == {}
    response = call.join()
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert len(response.json()["images"]) == 1 and info["all_seeds"] == [1]
    assert info["extra_generation_params"]["Interrupted"] is True
    assert_idle(http, serial)


def test_an_interrupt_before_any_image_finished_is_409(kiln, serial) -> None:
    http = kiln.http
    call = Background(lambda: http.post("/sdapi/v1/txt2img", json={"prompt": "x", "model": serial, "width": 64,
                                                                   "height": 64, "steps": LONG_STEPS}))
    wait_until(lambda: http.get("/sdapi/v1/progress").json()["progress"] > 0, "the call to start")
    http.post("/sdapi/v1/interrupt")
    error = assert_error(call.join(), 409, "interrupted")
    assert error["code"] == "request_aborted"
    assert_idle(http, serial)


def test_extra_network_tags(kiln) -> None:
    """A <lora:...> tag is the request's lora field (tests/server/test_lora_http.py runs one on a LoRA model):
    on a model launched without LoRAs it is LoRA's 400; what Kiln cannot apply is a 400 naming the tag."""
    body = {"prompt": "a fox <lora:film-grain:0.7> in snow", "model": "sd", **SMALL}
    error = assert_error(kiln.http.post("/sdapi/v1/txt2img", json=body), 400, "film-grain@0.7",
                         "launched without LoRAs")
    assert error["param"] == "lora"
    response = kiln.http.post("/sdapi/v1/txt2img", json={**body, "disable_extra_networks": True})
    assert json.loads(response.json()["info"])["prompt"] == "a fox in snow"
    for tag, words in (("<lora:grain:0.5:0.2>", "one weight per LoRA"), ("<hypernet:anime>", "no hypernetworks"),
                       ("<lora:grain:much>", "must be a number")):
        error = assert_error(kiln.http.post("/sdapi/v1/txt2img", json={**body, "prompt": f"a fox {tag}"}), 400, words)
        assert error["param"] == "prompt"


RED = base64.b64encode(png_bytes((64, 64), (200, 40, 40))).decode()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("txt2img", {"prompt": "x", "warp": 9}, "warp"),
    ("txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr"),
    ("txt2img", {"prompt": "x", "restore_faces": True}, "restore_faces"),
    ("txt2img", {"prompt": "x", "styles": ["cinematic"]}, "styles"),
    ("txt2img", {"prompt": "x", "subseed_strength": 0.3}, "subseed_strength"),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [{"model": "canny"}]}}},
     "alwayson_scripts.ControlNet"),
    ("txt2img", {"prompt": "x", "scheduler": "Exponential"}, "scheduler"),
    ("txt2img", {"prompt": "x", "sampler_name": "UniPC"}, "sampler_name"),
    ("txt2img", {"prompt": "x", "width": 63}, "size"),
    ("txt2img", {"prompt": "x", "steps": 0}, "num_inference_steps"),
    ("txt2img", {"prompt": "x", "batch_size": 0}, "batch_size"),
    ("txt2img", {"prompt": "x", "batch_size": 6, "n_iter": 2}, "n"),
    ("txt2img", {"prompt": ["x", "y"]}, "prompt"),
    ("txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 2}},
     "override_settings.CLIP_stop_at_last_layers"),
    ("txt2img", {"prompt": "x", "model": "ghost"}, "model"),
    ("img2img", {"prompt": "x"}, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["%%%"]}, "init_images[0]"),
    ("img2img", {"prompt": "x", "init_images": [RED], "mask": "%%%"}, "mask"),
    ("img2img", {"prompt": "x", "init_images": [RED], "denoising_strength": 0}, "strength"),
    ("img2img", {"prompt": "x", "init_images": [RED], "resize_mode": 2}, "resize_mode"),
    ("img2img", {"prompt": "x", "init_images": [RED], "inpainting_mask_invert": 3, "mask": RED},
     "inpainting_mask_invert"),
])
def test_bad_bodies_are_4xx_naming_the_field_and_queue_nothing(kiln, path, body, param) -> None:
    response = kiln.http.post(f"/sdapi/v1/{path}", json={"model": "sd15", **SMALL, **body})
    error = assert_error(response, 404 if param == "model" else 400)
    assert error["param"] == param
    assert_idle(kiln.http, "sd15")


def test_undecodable_images_and_bodies(kiln) -> None:
    junk = base64.b64encode(b"not an image").decode()
    assert_error(kiln.http.post("/sdapi/v1/img2img", json={"model": "sd15", "init_images": [junk], **SMALL}), 415)
    assert_error(kiln.http.post("/sdapi/v1/txt2img", content=b"{not json"), 400, "JSON")
    assert_error(kiln.http.post("/sdapi/v1/txt2img", json={"prompt": "x", "model": "sd", "init_images": [RED]}),
                 400, "init_images")
    assert_error(kiln.http.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"}), 400)
    assert_idle(kiln.http, "sd15")
