"""The official `openai` SDK against Kiln, as an OpenAI user would call it (base_url=<kiln>/v1)."""

from __future__ import annotations

import base64
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from .server_helpers import LONG_STEPS, Background, assert_idle, decode, metric, png_bytes, wait_until


@pytest.fixture
def client(kiln) -> OpenAI:
    with OpenAI(base_url=f"{kiln.url}/v1", api_key="x", max_retries=0, timeout=300) as sdk:
        yield sdk


def test_generate_url_and_b64(client: OpenAI) -> None:
    as_url = client.images.generate(model="sd15", prompt="a fox", size="64x64", n=2,
                                    extra_body={"num_inference_steps": 2, "seed": 8})
    assert len(as_url.data) == 2
    for image in as_url.data:
        assert decode(httpx.get(image.url).content).size == (64, 64)
    assert [image.model_extra["seed"] for image in as_url.data] == [8, 9]
    as_b64 = client.images.generate(model="sd15", prompt="a fox", size="64x64", response_format="b64_json",
                                    quality="high", style="natural", user="me", output_format="jpeg",
                                    extra_body={"num_inference_steps": 2, "seed": 8})
    assert decode(base64.b64decode(as_b64.data[0].b64_json), "JPEG").size == (64, 64)


def test_generate_stream_with_partial_images(client: OpenAI) -> None:
    stream = client.images.generate(model="sd15", prompt="a fox", size="64x64", stream=True, partial_images=2,
                                    extra_body={"num_inference_steps": 4})
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert events[-1].size == "64x64" and events[-1].usage.total_tokens == 0
    assert decode(base64.b64decode(events[-1].b64_json)).size == (64, 64)


def test_create_variation(client: OpenAI) -> None:
    result = client.images.create_variation(image=("in.png", png_bytes((80, 72)), "image/png"), model="sd15", n=2,
                                            response_format="b64_json",
                                            extra_body={"num_inference_steps": 3})
    assert len(result.data) == 2
    assert decode(base64.b64decode(result.data[0].b64_json)).size == (80, 72)


@pytest.mark.parametrize("with_mask", [False, True])
def test_edit(client: OpenAI, with_mask: bool) -> None:
    mask = {"mask": ("mask.png", png_bytes((64, 64), 255), "image/png")} if with_mask else {}
    result = client.images.edit(model="sd15", image=("in.png", png_bytes((64, 64)), "image/png"), prompt="snow",
                                response_format="b64_json", size="64x64", **mask,
                                extra_body={"num_inference_steps": 3})
    assert decode(base64.b64decode(result.data[0].b64_json)).size == (64, 64)


def test_edit_with_image_list_and_stream(client: OpenAI) -> None:
    stream = client.images.edit(model="sd15", image=[("in.png", png_bytes((64, 64)), "image/png")], prompt="snow",
                                stream=True, partial_images=1, extra_body={"num_inference_steps": 4})
    assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_error_classes(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="sd15", prompt="x", size="64x64", extra_body={"cfg_scale": 7})
    assert "cfg_scale" in bad.value.message and bad.value.body["param"] == "cfg_scale"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt="x")
    assert "dall-e-3" in missing.value.message


def test_queue_full_is_rate_limit_error_with_retry_after(client: OpenAI, http: httpx.Client, kiln) -> None:
    """`busy` takes one job at a time and queues one more: a third request is refused with 429."""
    running_id, queued_id = uuid.uuid4().hex, uuid.uuid4().hex

    def long(request_id: str) -> Background:
        body = {"model": "busy", "prompt": "slow", "size": "64x64", "num_inference_steps": LONG_STEPS,
                "guidance_scale": 2.0, "request_id": request_id}
        return Background(lambda: httpx.post(f"{kiln.url}/v1/images/generations", json=body, timeout=300))

    running = long(running_id)
    wait_until(lambda: http.get(f"/v1/requests/{running_id}/progress").status_code == 200
               and metric(http, "kiln_active_jobs", "busy") == 1, "the first request to run")
    queued = long(queued_id)
    wait_until(lambda: metric(http, "kiln_queue_depth", "busy") == 1, "the second request to queue")
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="busy", prompt="x", size="64x64")
    assert int(limited.value.response.headers["retry-after"]) > 0
    assert "queue full" in limited.value.message
    for request_id, call in ((queued_id, queued), (running_id, running)):
        assert http.post(f"/v1/models/busy/requests/{request_id}/abort").json() == {"msg": "DONE"}
        assert call.join().status_code == 409
    assert_idle(http, "busy")
