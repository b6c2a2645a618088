"""Progress, abort and client disconnects: a request that ends early leaves the batch and frees its slot.

These use the one-slot `busy` model (max_batch_size 1, max_queue_size 1) and long requests, so what is running
is known exactly."""

from __future__ import annotations

import json
import socket
import uuid

import httpx

from .server_helpers import LONG_STEPS, Background, assert_error, assert_idle, metric, wait_until


def long_request(request_id: str, **fields) -> dict:
    return {"model": "busy", "prompt": "slow", "size": "64x64", "num_inference_steps": LONG_STEPS,
            "response_format": "b64_json", "request_id": request_id, "guidance_scale": 2.0, **fields}


def progress(http: httpx.Client, request_id: str) -> float:
    return http.get(f"/v1/requests/{request_id}/progress").json()["progress"]


def test_progress_of_a_finished_request(http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    response = http.post("/v1/images/generations", json=long_request(request_id, num_inference_steps=2))
    assert response.status_code == 200, response.text
    assert http.get(f"/v1/requests/{request_id}/progress").json() == {"progress": 1.0}
    assert_error(http.get("/v1/requests/never-sent/progress"), 404, "never-sent")


def test_abort_a_running_request(http: httpx.Client, kiln) -> None:
    request_id = uuid.uuid4().hex
    # The request_id inside Xinference-style kwargs.
    body = long_request(request_id)
    body["kwargs"] = json.dumps({"request_id": body.pop("request_id")})
    running = Background(lambda: httpx.post(f"{kiln.url}/v1/images/generations", json=body, timeout=300))
    wait_until(lambda: http.get(f"/v1/requests/{request_id}/progress").status_code == 200
               and progress(http, request_id) > 0, "the request to start denoising")
    duplicate = http.post("/v1/images/generations", json=long_request(request_id))
    assert_error(duplicate, 400, request_id, "already running")

    aborted = http.post(f"/v1/models/busy/requests/{request_id}/abort", json={"block_duration": 30})
    assert aborted.json() == {"msg": "DONE"}
    error = assert_error(running.join(), 409, request_id)
    assert error["code"] == "request_aborted"
    assert http.post(f"/v1/models/busy/requests/{request_id}/abort").json() == {"msg": "NO_OP"}
    assert http.post("/v1/models/busy/requests/unknown-id/abort").json() == {"msg": "NOT_FOUND"}
    assert_idle(http, "busy")


def test_abort_a_queued_request(http: httpx.Client, kiln) -> None:
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    running = Background(lambda: httpx.post(f"{kiln.url}/v1/images/generations", json=long_request(first),
                                            timeout=300))
    wait_until(lambda: http.get(f"/v1/requests/{first}/progress").status_code == 200
               and progress(http, first) > 0, "the first request to start")
    queued = Background(lambda: httpx.post(f"{kiln.url}/v1/images/generations", json=long_request(second),
                                           timeout=300))
    wait_until(lambda: metric(http, "kiln_queue_depth", "busy") == 1, "the second request to queue")
    assert progress(http, second) == 0.0
    assert http.post(f"/v1/models/busy/requests/{second}/abort").json() == {"msg": "DONE"}
    assert_error(queued.join(), 409, second)
    assert http.post(f"/v1/models/busy/requests/{first}/abort").json() == {"msg": "DONE"}
    assert_error(running.join(), 409, first)
    assert_idle(http, "busy")


def test_a_client_that_disconnects_cancels_its_request(http: httpx.Client, kiln) -> None:
    request_id = uuid.uuid4().hex
    failed_before = metric(http, "kiln_requests_failed_total", "busy")
    generated_before = metric(http, "kiln_images_generated_total", "busy")
    body = json.dumps(long_request(request_id)).encode()
    port = int(kiln.url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: http.get(f"/v1/requests/{request_id}/progress").status_code == 200
               and progress(http, request_id) > 0, "the request to start denoising")
    client.close()
    # Its job leaves the batch: the model goes idle long before 500 steps, and the request counts as failed.
    wait_until(lambda: metric(http, "kiln_requests_failed_total", "busy") == failed_before + 1, "the cancellation")
    assert_idle(http, "busy")
    steps_after_cancel = metric(http, "kiln_steps_total", "busy")
    # The slot is free: a new request runs at once and the cancelled one never finished.
    response = http.post("/v1/images/generations", json=long_request(uuid.uuid4().hex, num_inference_steps=2))
    assert response.status_code == 200
    assert metric(http, "kiln_steps_total", "busy") == steps_after_cancel + 2
    assert metric(http, "kiln_images_generated_total", "busy") == generated_before + 1
