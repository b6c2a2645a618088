"""Many simultaneous requests over HTTP: all answered correctly, and a job's image does not depend on what ran
beside it (batch-invariance, checked on decoded PNG pixels)."""

from __future__ import annotations

import base64
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from .server_helpers import (
    LONG_STEPS, SIZE, Background, assert_idle, b64_image, pixels, png_bytes, same_image, wait_until,
)


def post(url: str, path: str, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=300) as client:
        return client.post(path, **kwargs)


def test_mixed_concurrent_requests_are_all_answered_correctly(http: httpx.Client, kiln) -> None:
    rng = random.Random(7)
    cases = []
    for index in range(24):
        model = rng.choice(["sd", "sd15", "sdxl", "sd3", "flux"])
        stride = 16 if model in ("sd3", "flux") else 8
        width = SIZE + stride * rng.randint(0, 2)
        height = SIZE + stride * rng.randint(0, 1)
        n = rng.randint(1, 3)
        body = {"model": model, "prompt": f"scene {index}", "size": f"{width}x{height}", "n": n,
                "num_inference_steps": rng.randint(1, 3), "guidance_scale": rng.choice([0.0, 1.0, 3.5]),
                "seed": 1000 * index, "response_format": rng.choice(["b64_json", "url"])}
        cases.append(("/v1/images/generations", {"json": body}, (width, height), n, 1000 * index))
    for index in range(4):  # image to image beside them, in the same lanes
        data = {"model": "sd15", "prompt": "variation", "n": "2", "seed": str(50 + index),
                "response_format": "b64_json", "num_inference_steps": "3", "sampler_name": "Euler"}
        files = {"image": ("in.png", png_bytes((64, 64), (index * 60, 90, 30)), "image/png")}
        cases.append(("/v1/images/variations", {"data": data, "files": files}, (64, 64), 2, 50 + index))

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: post(kiln.url, case[0], **case[1]), cases))

    for (_, _, size, n, seed), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        items = response.json()["data"]
        assert [item["seed"] for item in items] == [seed + i for i in range(n)]
        for item in items:
            if item["url"] is not None:
                image = b64_image({"b64_json": base64.b64encode(httpx.get(item["url"]).content)})
            else:
                image = b64_image(item)
            assert image.size == size
    for model in ("sd", "sd15", "sdxl", "sd3", "flux"):
        assert_idle(http, model)


def test_batch_invariance_over_http(http: httpx.Client, kiln) -> None:
    """The same request with a fixed seed gives the same pixels alone and among 16 concurrent requests. A long
    blocker request keeps the lane busy throughout, so the probe is certain to share its forwards."""
    probe = {"model": "sd15", "prompt": "a lighthouse at dusk", "size": "64x64", "num_inference_steps": 3,
             "guidance_scale": 5.0, "seed": 424242, "negative_prompt": "fog", "response_format": "b64_json"}
    alone = pixels(b64_image(http.post("/v1/images/generations", json=probe).json()["data"][0]))

    blocker_id = uuid.uuid4().hex
    blocker = Background(lambda: post(kiln.url, "/v1/images/generations", json={
        **probe, "prompt": "blocker", "num_inference_steps": LONG_STEPS, "request_id": blocker_id}))
    wait_until(lambda: http.get(f"/v1/requests/{blocker_id}/progress").status_code == 200
               and http.get(f"/v1/requests/{blocker_id}/progress").json()["progress"] > 0, "the blocker to run")
    others = [{**probe, "prompt": f"other {i}", "seed": i, "num_inference_steps": 2 + i % 3,
               "guidance_scale": [0.0, 2.0, 7.5][i % 3], "negative_prompt": None, "n": 1 + i % 2}
              for i in range(15)]
    bodies = others[:8] + [probe] + others[8:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(kiln.url, "/v1/images/generations", json=body), bodies))
    assert all(response.status_code == 200 for response in responses)
    assert http.post(f"/v1/models/sd15/requests/{blocker_id}/abort").json() == {"msg": "DONE"}
    assert blocker.join().status_code == 409

    batched = pixels(b64_image(responses[8].json()["data"][0]))
    assert same_image(alone, batched)
    assert_idle(http, "sd15")
