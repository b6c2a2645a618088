"""Streaming (`stream: true`): server-sent events with partial images during denoising, then the finals,
parsed here from the raw bytes (the openai SDK's view is in test_openai_sdk)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from .server_helpers import assert_idle, b64_image, pixels, png_bytes, same_image, wait_until


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) pairs from a text/event-stream body."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


OPENAI_FIELDS = {"type", "b64_json", "created_at", "size", "quality", "background", "output_format"}


@pytest.mark.parametrize("model,size", [("sd15", 64), ("flux", 64)])
def test_generation_stream_with_partial_images(http: httpx.Client, model: str, size: int) -> None:
    body = {"model": model, "prompt": "a lighthouse", "size": f"{size}x{size}", "stream": True,
            "partial_images": 2, "num_inference_steps": 4, "seed": 21}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        events = read_events(response)
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for name, data in events:
        assert data["type"] == name and OPENAI_FIELDS <= set(data)
        assert data["size"] == f"{size}x{size}" and data["output_format"] == "png"
    assert [data["partial_image_index"] for _, data in events[:2]] == [0, 1]
    for _, data in events[:2]:
        b64_image(data)  # a decodable PNG preview
    completed = events[-1][1]
    assert completed["seed"] == 21 and "usage" in completed
    final = b64_image(completed)
    assert final.size == (size, size)
    # The streamed final image is the image a plain request gives.
    plain = http.post("/v1/images/generations", json={**body, "stream": False, "response_format": "b64_json"})
    assert same_image(pixels(final), pixels(b64_image(plain.json()["data"][0])))


def test_stream_without_partial_images_and_with_n(http: httpx.Client) -> None:
    body = {"model": "sd", "prompt": "x", "size": "64x64", "stream": "true", "n": 2, "output_format": "jpeg"}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        events = read_events(response)
    assert [name for name, _ in events] == ["image_generation.completed"] * 2
    assert [data["image_index"] for _, data in events] == [0, 1]
    assert all(b64_image(data, "JPEG").size == (64, 64) for _, data in events)


def test_edit_stream_uses_image_edit_events(http: httpx.Client) -> None:
    fields = {"model": "sd15", "prompt": "snow", "stream": "true", "partial_images": "1",
              "num_inference_steps": "4", "strength": "1.0"}
    files = {"image": ("in.png", png_bytes(), "image/png"), "mask": ("m.png", png_bytes(color=255), "image/png")}
    with http.stream("POST", "/v1/images/edits", data=fields, files=files) as response:
        events = read_events(response)
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_stream_errors_before_the_stream_are_plain_errors(http: httpx.Client) -> None:
    body = {"model": "sd", "prompt": "x", "size": "63x64", "stream": True}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"


def test_an_aborted_stream_ends_with_an_error_event(http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": "busy", "prompt": "x", "size": "64x64", "stream": True, "num_inference_steps": 500,
            "partial_images": 3, "request_id": request_id, "guidance_scale": 2.0}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        wait_until(lambda: http.get(f"/v1/requests/{request_id}/progress").json()["progress"] > 0, "denoising")
        assert http.post(f"/v1/models/busy/requests/{request_id}/abort").json() == {"msg": "DONE"}
        events = read_events(response)
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "request_aborted"
    assert_idle(http, "busy")


def test_closing_a_stream_cancels_the_request(http: httpx.Client, kiln) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": "busy", "prompt": "x", "size": "64x64", "stream": True, "num_inference_steps": 500,
            "request_id": request_id, "guidance_scale": 2.0}
    with httpx.Client(base_url=kiln.url, timeout=60) as client:
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200
            wait_until(lambda: http.get(f"/v1/requests/{request_id}/progress").json()["progress"] > 0, "denoising")
    # The client hung up: the request leaves the batch.
    assert_idle(http, "busy")
    assert http.post(f"/v1/models/busy/requests/{request_id}/abort").json() == {"msg": "NO_OP"}

