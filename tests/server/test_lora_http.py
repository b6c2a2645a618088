"""LoRA over HTTP with the clients people have: xinference-client's launch_model(peft_model_config=...) and its
image handle, the openai SDK with extra_body={"lora": [...]}, Xinference's kwargs string and multipart forms;
the description and /metrics show the LoRAs; bad input is a 400 that says what to fix."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image
from xinference_client import RESTfulClient

from .server_helpers import assert_error, metric, png_bytes, same_image

STEPS = {"num_inference_steps": 3, "seed": 21}


def lora_list(folder, *names):
    return [{"lora_name": name, "local_path": str(folder / f"{name}.safetensors")} for name in names]


@pytest.fixture(scope="module")
def lora_model(kiln, tiny_lora_dir):
    """SD1.5 launched by xinference-client with two LoRAs, per-row mode, none by default."""
    client = RESTfulClient(kiln.url)
    uid = client.launch_model(
        model_name="stable-diffusion-v1.5", model_type="image", model_uid="lora15",
        peft_model_config={"lora_list": lora_list(tiny_lora_dir("stable-diffusion-v1.5"), "style", "text"),
                           "image_lora_load_kwargs": {"low_cpu_mem_usage": True}},
        tiny=True, max_loras=2, lora_default="none", max_batch_size=4,
    )
    assert uid == "lora15"
    yield client
    kiln.http.delete("/v1/models/lora15")


@pytest.fixture
def sdk(kiln):
    with OpenAI(base_url=f"{kiln.url}/v1", api_key="x", max_retries=0, timeout=300) as client:
        yield client


def generate(sdk: OpenAI, **extra) -> Image.Image:
    result = sdk.images.generate(model="lora15", prompt="a red fox", size="64x64", response_format="b64_json",
                                 extra_body={**STEPS, **extra})
    return Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")


def test_openai_sdk_picks_loras_per_request(lora_model, sdk, kiln):
    plain = generate(sdk)
    styled = generate(sdk, lora=[{"name": "style", "scale": 0.8}])
    stacked = generate(sdk, lora=[{"name": "style", "scale": 0.8}, {"name": "text", "scale": 1.0}])
    assert not same_image(plain, styled) and not same_image(styled, stacked)
    assert same_image(plain, generate(sdk, lora=[]))
    # The same LoRA in Xinference's kwargs string, and with Dify's aliases through xinference-client's handle.
    kwargs_form = kiln.http.post("/v1/images/generations", json={
        "model": "lora15", "prompt": "a red fox", "size": "64x64", "response_format": "b64_json",
        "kwargs": '{"lora": {"name": "style", "scale": 0.8}, "num_inference_steps": 3, "seed": 21}'})
    assert kwargs_form.status_code == 200, kwargs_form.text
    assert same_image(styled, Image.open(io.BytesIO(base64.b64decode(kwargs_form.json()["data"][0]["b64_json"]))))
    handle = lora_model.get_model("lora15")
    result = handle.text_to_image("a red fox", size="64*64", response_format="b64_json", lora_name="style",
                                  lora_scale=0.8, **STEPS)
    assert same_image(styled, Image.open(io.BytesIO(base64.b64decode(result["data"][0]["b64_json"]))))


def test_a1111_prompt_tags_pick_the_loras(lora_model, sdk, kiln):
    """webuiapi's txt2img with <lora:style:0.8> in the prompt: the image of lora [style@0.8] on the OpenAI route
    (same seed, prompt without the tag, A1111's sampler), and another than without the tag."""
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=f"{kiln.url}/sdapi/v1")
    common = dict(seed=21, steps=3, width=64, height=64, cfg_scale=7.5,
                  override_settings={"sd_model_checkpoint": "lora15"})
    tagged = api.txt2img(prompt="a red fox <lora:style:0.8>", **common).image.convert("RGB")
    plain = api.txt2img(prompt="a red fox", **common).image.convert("RGB")
    assert not same_image(tagged, plain)
    assert same_image(tagged, generate(sdk, lora=[{"name": "style", "scale": 0.8}], sampler_name="Euler a",
                                       guidance_scale=7.5))
    missing = kiln.http.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:nope>", "model": "lora15", **common})
    assert_error(missing, 400, "unknown LoRA 'nope'", "available: style, text")


@pytest.mark.parametrize(("path", "mask"), [("/v1/images/variations", None),
                                            ("/v1/images/inpainting", "mask_image"), ("/v1/images/edits", "mask")])
def test_multipart_endpoints_take_lora_as_json_text(lora_model, kiln, path, mask):
    """Image to image and both inpainting forms: `lora` as a form field's JSON text changes the image."""
    fields = {"model": "lora15", "prompt": "a fox", "size": "64x64", "response_format": "b64_json",
              "kwargs": '{"num_inference_steps": 4, "seed": 2, "strength": 0.7}'}
    files = {"image": ("image.png", png_bytes(), "image/png")}
    if mask:
        files[mask] = ("mask.png", png_bytes((64, 64), 255), "image/png")
    plain = kiln.http.post(path, data=fields, files=files)
    styled = kiln.http.post(path, data={**fields, "lora": '[{"name": "style", "scale": 1.5}]'}, files=files)
    assert plain.status_code == styled.status_code == 200, styled.text
    assert plain.json()["data"][0]["b64_json"] != styled.json()["data"][0]["b64_json"]


def test_description_and_metrics_show_the_loras(lora_model, sdk, kiln):
    generate(sdk, lora=[{"name": "text", "scale": 0.5}])
    description = kiln.http.get("/v1/models/lora15").json()["lora"]
    assert description["mode"] == "per-row" and description["registered"] == ["style", "text"]
    assert set(description["resident"]) == {"style", "text"} and description["max_loras"] == 2
    assert description["slot_bytes"] > 0
    assert metric(kiln.http, "kiln_lora_resident", "lora15") == 2
    assert metric(kiln.http, "kiln_lora_loads_total", "lora15") >= 2
    assert metric(kiln.http, "kiln_lora_load_seconds_total", "lora15") > 0
    assert metric(kiln.http, "kiln_lora_slot_waits_total", "lora15") >= 0
    assert "# TYPE kiln_lora_loads_total counter" in kiln.http.get("/metrics").text


@pytest.mark.parametrize(("body", "words"), [
    ({"lora": [{"name": "nope"}]}, ["unknown LoRA 'nope'", "available: style, text"]),
    ({"lora": [{"name": "../../etc/passwd"}]}, ["path separators"]),
    ({"lora": {"name": "style", "scale": 11}}, ["between -10 and 10"]),
    ({"lora": [{"name": "style"}, {"name": "text"}, {"name": "nope"}]}, ["at most 2 per request"]),
    ({"lora_scale": 0.5}, ["lora_scale goes with lora_name"]),
])
def test_bad_loras_are_400s(lora_model, kiln, body, words):
    response = kiln.http.post("/v1/images/generations",
                              json={"model": "lora15", "prompt": "x", "size": "64x64", **STEPS, **body})
    assert_error(response, 400, *words)


def test_a_nan_scale_is_a_400(lora_model, kiln):
    body = '{"model": "lora15", "prompt": "x", "size": "64x64", "lora": {"name": "style", "scale": NaN}}'
    response = kiln.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_openai_sdk_sees_the_400(lora_model, sdk):
    with pytest.raises(BadRequestError, match="unknown LoRA"):
        generate(sdk, lora=[{"name": "missing"}])


def test_fused_launch_as_xinference_and_what_it_refuses(kiln, tiny_lora_dir):
    """max_loras 0: Xinference's fused pipeline; every request gets the LoRA, a request for another gets a 400
    naming the mode and the backends that can."""
    client = RESTfulClient(kiln.url)
    client.launch_model(model_name="sd-turbo", model_type="image", model_uid="fused-turbo", tiny=True,
                        peft_model_config={"lora_list": lora_list(tiny_lora_dir("sd-turbo"), "style"),
                                           "image_lora_fuse_kwargs": {"lora_scale": 0.5}})
    try:
        description = kiln.http.get("/v1/models/fused-turbo").json()["lora"]
        assert description["mode"] == "fused" and description["fused"] == ["style"]
        body = {"model": "fused-turbo", "prompt": "x", "size": "64x64", "response_format": "b64_json", **STEPS}
        assert kiln.http.post("/v1/images/generations", json=body).status_code == 200
        default = kiln.http.post("/v1/images/generations", json={**body, "lora": {"name": "style", "scale": 0.5}})
        assert default.status_code == 200
        refused = kiln.http.post("/v1/images/generations", json={**body, "lora": []})
        assert_error(refused, 400, "fused", "max_loras", "eager or compile")
    finally:
        kiln.http.delete("/v1/models/fused-turbo")


def test_a_lora_for_another_model_fails_the_launch_naming_file_and_layer(kiln, tiny_lora_dir):
    body = {"model_name": "stable-diffusion-v1.5", "model_uid": "wrong-lora", "tiny": True,
            "peft_model_config": {"lora_list": lora_list(tiny_lora_dir("stable-diffusion-xl-base-1.0"), "style")}}
    response = kiln.http.post("/v1/models", json=body)
    assert_error(response, 400, "style.safetensors", "unet.", "another base model")
    assert kiln.http.get("/v1/models/wrong-lora").status_code == 404


def test_images_differ_from_the_plain_model(lora_model, sdk, kiln):
    """The session's plain SD1.5 (sd15) and a no-LoRA request on lora15 give the same image: per-row mode changes
    nothing for rows without LoRA."""
    plain = kiln.http.post("/v1/images/generations", json={
        "model": "sd15", "prompt": "a red fox", "size": "64x64", "response_format": "b64_json", **STEPS})
    image = Image.open(io.BytesIO(base64.b64decode(plain.json()["data"][0]["b64_json"]))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(generate(sdk)))


def test_a_model_launched_without_loras(kiln):
    """lora [] (or none) is a plain request there; naming a LoRA is a 400 that says how to launch with LoRAs."""
    body = {"model": "sd15", "prompt": "a red fox", "size": "64x64", "response_format": "b64_json", **STEPS}
    plain = kiln.http.post("/v1/images/generations", json=body)
    empty = kiln.http.post("/v1/images/generations", json={**body, "lora": []})
    assert plain.status_code == empty.status_code == 200, empty.text
    assert plain.json()["data"][0]["b64_json"] == empty.json()["data"][0]["b64_json"]
    for named in ({"lora": [{"name": "style"}]}, {"lora_name": "style", "lora_scale": 0.5}):
        refused = kiln.http.post("/v1/images/generations", json={**body, **named})
        assert_error(refused, 400, "launched without LoRAs", "peft_model_config", "lora_dir")
