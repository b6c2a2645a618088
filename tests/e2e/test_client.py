"""The Python client against a real server: every call of Xinference's client, with Kiln's tiny checkpoints."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from kiln.server.client import Client, ImageModelHandle, KilnError

from .e2e_helpers import KilnServer, png_bytes, png_image

FAST = {"num_inference_steps": 1}
FROM_IMAGE = {"num_inference_steps": 2}  # image-to-image runs steps x strength of them: at least one


@pytest.fixture(scope="module")
def client(server: KilnServer) -> Iterator[Client]:
    with Client(server.endpoint) as kiln:
        yield kiln


@pytest.fixture(scope="module")
def turbo(client: Client) -> ImageModelHandle:
    assert client.launch_model("sd-turbo", model_uid="c-turbo", tiny=True) == "c-turbo"
    return client.get_model("c-turbo")


@pytest.fixture(scope="module")
def sd15(client: Client) -> ImageModelHandle:
    assert client.launch_model("stable-diffusion-v1.5", model_uid="c-sd15", tiny=True, max_batch_size=4) == "c-sd15"
    return client.get_model("c-sd15")


def _pixels(data: bytes, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    image = png_image(data)
    assert image.size == size
    return np.asarray(image.convert("RGB"))


def test_launched_models_are_listed_and_described(client: Client, turbo: ImageModelHandle) -> None:
    listed = client.list_models()
    assert listed["c-turbo"]["model_name"] == "sd-turbo"
    assert listed["c-turbo"]["model_type"] == "image"
    description = client.describe_model("c-turbo")
    assert description["model_name"] == "sd-turbo"
    assert "text2image" in description["model_ability"]


def test_text_to_image_b64_and_url_give_the_same_image(client: Client, turbo: ImageModelHandle) -> None:
    request_id = uuid.uuid4().hex
    inline = turbo.text_to_image(
        "a lighthouse", n=2, size="64x64", response_format="b64_json", seed=[11, 12], request_id=request_id, **FAST
    )
    assert [item["seed"] for item in inline["data"]] == [11, 12]
    assert client.get_progress(request_id) == {"progress": 1.0}
    first = _pixels(base64.b64decode(inline["data"][0]["b64_json"]))
    assert not np.array_equal(first, _pixels(base64.b64decode(inline["data"][1]["b64_json"])))

    linked = turbo.text_to_image("a lighthouse", n=2, size="64*64", seed=11, **FAST)  # seeds 11, 12 again
    item = linked["data"][0]
    assert item["url"].startswith(client.base_url + "/")
    assert np.array_equal(first, _pixels(client.image_bytes(item)))


def test_image_to_image_accepts_bytes_and_paths(sd15: ImageModelHandle, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes((64, 64), (200, 30, 30)))
    for image in (source.read_bytes(), source, str(source)):
        result = sd15.image_to_image(
            image, prompt="a red square", size="64x64", response_format="b64_json", strength=0.5, seed=5, **FROM_IMAGE
        )
        (item,) = result["data"]
        assert item["seed"] == 5
        _pixels(base64.b64decode(item["b64_json"]))


def test_inpainting(sd15: ImageModelHandle) -> None:
    result = sd15.inpainting(
        png_bytes((64, 64), (30, 30, 200)), png_bytes((64, 64), 255), "a yellow circle",
        negative_prompt="blurry", n=2, size="64x64", response_format="b64_json", **FROM_IMAGE,
    )
    assert len(result["data"]) == 2
    for item in result["data"]:
        _pixels(base64.b64decode(item["b64_json"]))


def test_image_edit_with_and_without_mask(sd15: ImageModelHandle) -> None:
    image = png_bytes((64, 64), (30, 200, 30))
    without_mask = sd15.image_edit(image, "make it autumn", size="64x64", response_format="b64_json", **FROM_IMAGE)
    with_mask = sd15.image_edit(
        image, "make it autumn", mask=png_bytes((64, 64), 255), size="64x64", response_format="b64_json", **FROM_IMAGE
    )
    for result in (without_mask, with_mask):
        _pixels(base64.b64decode(result["data"][0]["b64_json"]))


def test_image_edit_sends_several_images_as_image_array(sd15: ImageModelHandle) -> None:
    """Several images travel as repeated `image[]` parts; Kiln edits one image per request and says so."""
    image = png_bytes((64, 64), (30, 200, 30))
    with pytest.raises(KilnError) as several:
        sd15.image_edit([image, image], "make it autumn", size="64x64", **FROM_IMAGE)
    assert several.value.status_code == 400
    assert "got 2" in several.value.detail


def test_progress_then_abort_fails_the_request_with_409(client: Client, sd15: ImageModelHandle) -> None:
    request_id = uuid.uuid4().hex
    outcome: dict[str, BaseException | dict] = {}

    def generate() -> None:
        try:
            outcome["result"] = sd15.text_to_image(
                "a long one", size="64x64", num_inference_steps=500, guidance_scale=7.5, request_id=request_id
            )
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=generate)
    worker.start()
    progress = _wait_for_progress(client, request_id, worker)
    assert 0 < progress < 1
    assert client.abort_request("c-sd15", request_id) == {"msg": "DONE"}
    worker.join(timeout=120)
    assert not worker.is_alive()
    error = outcome.get("error")
    assert isinstance(error, KilnError), outcome
    assert error.status_code == 409


def _wait_for_progress(client: Client, request_id: str, worker: threading.Thread) -> float:
    """Poll until the request reports progress (it must start before it can be aborted mid-way)."""
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            progress = client.get_progress(request_id)["progress"]
        except KilnError:  # not admitted yet
            progress = 0.0
        if progress > 0:
            return progress
        time.sleep(0.05)
    pytest.fail("the request never reported progress")


def test_errors_carry_status_and_the_server_message(client: Client, turbo: ImageModelHandle) -> None:
    with pytest.raises(KilnError) as bad_size:
        turbo.text_to_image("p", size="65x64")
    assert bad_size.value.status_code == 400
    assert str(bad_size.value).startswith("Failed to generate image: 400 ")
    assert "multiple of 8" in bad_size.value.detail

    with pytest.raises(KilnError) as unknown_parameter:
        turbo.text_to_image("p", size="64x64", bogus_parameter=1)
    assert unknown_parameter.value.status_code == 400
    assert "bogus_parameter" in unknown_parameter.value.detail

    with pytest.raises(KilnError) as unknown_model:
        client.get_model("nope")
    assert unknown_model.value.status_code == 404
    assert "nope" in unknown_model.value.detail

    with pytest.raises(KilnError) as unknown_name:
        client.launch_model("no-such-model", tiny=True)
    assert unknown_name.value.status_code == 400
    assert "no-such-model" in unknown_name.value.detail


def test_ocr_on_an_image_model_is_a_client_error(turbo: ImageModelHandle) -> None:
    with pytest.raises(KilnError) as error:
        turbo.ocr(png_bytes((64, 64), (0, 0, 0)))
    assert 400 <= error.value.status_code < 500


def test_terminate_model(client: Client) -> None:
    client.launch_model("sd-turbo", model_uid="c-short-lived", tiny=True)
    client.terminate_model("c-short-lived")
    assert "c-short-lived" not in client.list_models()
    with pytest.raises(KilnError) as gone:
        client.describe_model("c-short-lived")
    assert gone.value.status_code == 404
