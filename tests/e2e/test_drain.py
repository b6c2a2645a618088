"""Graceful drain of a real `kiln serve` on SIGTERM/SIGINT: requests in flight finish, new work gets 503 while
reads still answer, `/status` says "draining", what outlives the drain ends with a clean error (a 503 in the error
shape, or a stream's final `error` event), and the process exits with 0 and no traceback.

Work is kept in flight with 500-step generations on tiny models; a "slow" model with one image per step holds
ten of them in a row, so the drain is certainly still on while the test looks at it. Nothing waits on time: each
step waits for a condition (progress started, status changed, the process exited)."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .e2e_helpers import KilnServer, start_server

LONG = {"prompt": "a kiln", "size": "64x64", "num_inference_steps": 500, "response_format": "b64_json"}
LAUNCH = {
    "sd": 'model_name = "sd-turbo"\ntiny = true',
    "slow": 'model_name = "sd-turbo"\ntiny = true\nmax_batch_size = 1',
}


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def serve(tmp_path: Path, models: tuple[str, ...], *args: str) -> KilnServer:
    """`kiln serve` with the tiny `models` launched at startup by its config file, once they are ready."""
    config = tmp_path / "kiln.toml"
    config.write_text("".join(f'[[launch]]\nmodel_uid = "{uid}"\n{LAUNCH[uid]}\n' for uid in models))
    server = start_server(tmp_path / "serve.log", "--config", str(config), *args)
    wait(lambda: httpx.get(f"{server.endpoint}/status").json()["models"] == dict.fromkeys(models, "ready"), server)
    return server


def wait(condition, server: KilnServer) -> None:
    """Poll until `condition()` holds; fail with the server's log if it exits first."""
    while not condition():
        assert server.process.poll() is None, f"kiln serve exited:\n{server.log_tail()}"
        time.sleep(0.05)


def generate(server: KilnServer, model: str, request_id: str, **fields) -> httpx.Response:
    body = {**LONG, "model": model, "request_id": request_id, **fields}
    return httpx.post(f"{server.endpoint}/v1/images/generations", json=body, timeout=600)


def stream_events(server: KilnServer, request_id: str, **fields) -> list[tuple[str, dict]]:
    """A streamed generation's (event, data) pairs, read to the end of the stream."""
    body = {**LONG, "model": "sd", "request_id": request_id, "stream": True, **fields}
    with httpx.stream("POST", f"{server.endpoint}/v1/images/generations", json=body, timeout=600) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    return list(zip(names, datas))


def started(server: KilnServer, *request_ids: str) -> bool:
    for request_id in request_ids:
        response = httpx.get(f"{server.endpoint}/v1/requests/{request_id}/progress")
        if response.status_code != 200 or response.json()["progress"] == 0:
            return False
    return True


def assert_error_shape(body: dict, status_type: str, code: str) -> None:
    assert set(body) == {"error", "detail"} and body["error"]["message"] == body["detail"], body
    assert body["error"]["type"] == status_type and body["error"]["code"] == code, body


def exited_cleanly(server: KilnServer) -> None:
    assert server.process.wait(timeout=120) == 0, server.log_tail()
    log = server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-4000:]


def test_sigterm_drains_admitted_work_and_a_second_signal_ends_it(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    server = serve(tmp_path, ("sd", "slow"))
    try:
        plain = pool.submit(generate, server, "sd", "plain", num_inference_steps=300)
        stream: Future = pool.submit(stream_events, server, "stream", num_inference_steps=300)
        held = pool.submit(generate, server, "slow", "held", n=10)  # ten 500-step images, one after another
        wait(lambda: started(server, "plain", "stream", "held"), server)

        server.process.send_signal(signal.SIGTERM)
        wait(lambda: httpx.get(f"{server.endpoint}/status").status_code == 503, server)
        assert httpx.get(f"{server.endpoint}/status").json()["status"] == "draining"
        refused = generate(server, "sd", "too-late", num_inference_steps=1)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        assert_error_shape(refused.json(), "service_unavailable", "server_draining")
        assert httpx.get(f"{server.endpoint}/v1/requests/held/progress").status_code == 200  # reads still answer

        assert plain.result().status_code == 200 and len(plain.result().json()["data"]) == 1
        assert [name for name, _ in stream.result()][-1] == "image_generation.completed"
        assert httpx.get(f"{server.endpoint}/status").status_code == 503  # still draining: "held" is running

        server.process.send_signal(signal.SIGINT)
        cut = held.result()
        assert cut.status_code == 503, cut.text
        assert_error_shape(cut.json(), "service_unavailable", "drain_timeout")
        exited_cleanly(server)
    finally:
        server.stop()


def test_requests_past_the_drain_timeout_end_with_a_clean_error(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    server = serve(tmp_path, ("sd",), "--drain-timeout", "0")
    try:
        plain = pool.submit(generate, server, "sd", "plain")
        stream = pool.submit(stream_events, server, "stream")
        wait(lambda: started(server, "plain", "stream"), server)

        server.process.send_signal(signal.SIGTERM)
        response = plain.result()
        assert response.status_code == 503 and response.headers["retry-after"] == "5", response.text
        assert_error_shape(response.json(), "service_unavailable", "drain_timeout")
        name, data = stream.result()[-1]
        assert name == "error"
        assert_error_shape(data, "service_unavailable", "drain_timeout")
        exited_cleanly(server)
    finally:
        server.stop()
