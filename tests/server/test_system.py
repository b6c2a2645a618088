"""Health, the auth probe, and the Prometheus metrics."""

from __future__ import annotations

import re

import httpx

from .server_helpers import assert_error, metric


def test_status_and_cluster_auth(http: httpx.Client) -> None:
    status = http.get("/status").json()
    assert status["status"] == "ok" and status["models"]["sd15"] == "ready"
    assert http.get("/v1/cluster/auth").json() == {"auth": False}


def wide_forwards(text: str) -> float:
    """sd15's denoiser forwards with more than 4 rows so far, from the rows histogram."""
    buckets = dict(re.findall(r'^kiln_forward_rows_bucket\{model="sd15",le="([^"]+)"\} (\S+)$', text, re.M))
    return float(buckets["+Inf"]) - float(buckets["4"])


def test_metrics_follow_the_work(http: httpx.Client) -> None:
    before_wide = wide_forwards(http.get("/metrics").text)
    before_images = metric(http, "kiln_images_generated_total", "sd15")
    before_steps = metric(http, "kiln_steps_total", "sd15")
    body = {"model": "sd15", "prompt": "x", "size": "64x64", "n": 3, "num_inference_steps": 2,
            "guidance_scale": 3.0, "response_format": "b64_json"}
    assert http.post("/v1/images/generations", json=body).status_code == 200
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(http, "kiln_images_generated_total", "sd15") == before_images + 3
    assert metric(http, "kiln_steps_total", "sd15") >= before_steps + 2
    assert metric(http, "kiln_model_ready", "sd15") == 1
    for family in ("kiln_queue_depth gauge", "kiln_active_jobs gauge", "kiln_forward_rows histogram",
                   "kiln_step_seconds_total counter", "kiln_request_duration_seconds histogram"):
        assert f"# TYPE {family}" in text
    # The request's three CFG jobs are admitted together and step together: two forwards of 6 rows.
    assert wide_forwards(text) >= before_wide + 2
    latency = re.search(r'^kiln_request_duration_seconds_count\{endpoint="generations",status="200"\} (\S+)$',
                        text, re.M)
    assert latency and float(latency.group(1)) >= 1
    errors = http.post("/v1/images/generations", json={**body, "n": 99})
    assert errors.status_code == 400
    assert 'kiln_request_duration_seconds_count{endpoint="generations",status="400"}' in http.get("/metrics").text


def test_an_unexpected_fault_is_a_logged_json_500_and_the_server_answers_on(server_factory, caplog) -> None:
    """A fault no handler knows (here an extra /metrics source that breaks) is the error shape, not Starlette's
    plain text, and its traceback is logged."""
    running = server_factory()

    async def broken_source() -> str:
        raise RuntimeError("the metrics source broke")

    running.app.state.extra_metrics.append(broken_source)
    assert_error(running.http.get("/metrics"), 500, "RuntimeError", "the metrics source broke")
    assert any(record.exc_info and "GET /metrics" in record.getMessage() for record in caplog.records)
    assert running.http.get("/status").json()["status"] == "ok"
