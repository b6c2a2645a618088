"""What server settings change, each on its own app instance sharing the session's models: url images and
their expiry, body and upload limits, API keys."""

from __future__ import annotations

import time

import httpx
import pytest

from kiln.server.app import Settings
from kiln.engine.schema import Limits

from .server_helpers import assert_error, decode, metric, png_bytes, wait_until

GOOD = {"model": "sd15", "prompt": "a barn", "size": "64x64", "num_inference_steps": 2}


def test_url_responses_are_fetchable_http_urls(http: httpx.Client, kiln) -> None:
    response = http.post("/v1/images/generations", json={**GOOD, "n": 2, "output_format": "webp"})
    items = response.json()["data"]
    assert len(items) == 2 and len({item["url"] for item in items}) == 2
    for item in items:
        assert item["b64_json"] is None and item["url"].startswith(f"{kiln.url}/v1/images/files/")
        fetched = httpx.get(item["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        assert decode(fetched.content, "WEBP").size == (64, 64)


def test_urls_use_an_allowed_request_host(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry, Settings(allowed_hosts=("images.example", "127.0.0.1")))
    response = server.http.post("/v1/images/generations", json=GOOD, headers={"Host": "images.example:8080"})
    assert response.json()["data"][0]["url"].startswith("http://images.example:8080/v1/images/files/")


def test_a_foreign_host_gets_400_and_no_url(http: httpx.Client) -> None:
    """The default allows localhost and 127.0.0.1 only (`kiln serve` adds its bound host)."""
    before = metric(http, "kiln_images_generated_total", "sd15")
    for host in ("evil.example:1234", "evil.example", "127.0.0.1.evil.example", ""):
        response = http.post("/v1/images/generations", json=GOOD, headers={"Host": host})
        error = assert_error(response, 400, "Host", "--allowed-hosts")
        assert error["code"] == "invalid_host" and "evil" not in response.headers.get("location", "")
    assert metric(http, "kiln_images_generated_total", "sd15") == before
    assert http.get("/status", headers={"Host": "localhost:1"}).status_code == 200


def test_any_host_with_a_star(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry, Settings(allowed_hosts=("*",)))
    response = server.http.post("/v1/images/generations", json=GOOD, headers={"Host": "anything.example"})
    assert response.json()["data"][0]["url"].startswith("http://anything.example/v1/images/files/")


def test_the_public_url_is_the_base_of_every_url(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry,
                            Settings(public_url="https://images.example.com/kiln/", allowed_hosts=("*",)))
    for headers in ({}, {"Host": "other.example"}, {"X-Forwarded-Host": "evil.example"}):
        url = server.http.post("/v1/images/generations", json=GOOD, headers=headers).json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/kiln/v1/images/files/"), url
        name = url.rsplit("/", 1)[1]
        assert server.http.get(f"/v1/images/files/{name}").status_code == 200


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "x.png",
                                  "AAAAAAAAAAAAAAAAAAAAAA.png", "conftest.py"])
def test_only_stored_images_can_be_read(http: httpx.Client, name: str) -> None:
    response = http.get(f"/v1/images/files/{name}")
    assert response.status_code == 404
    assert "error" in response.json()


def test_url_images_expire_and_are_deleted(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry, Settings(file_ttl_seconds=1.0))
    store = server.app.state.store
    url = server.http.post("/v1/images/generations", json=GOOD).json()["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    assert httpx.get(url).status_code == 200 and (store.directory / name).exists()
    time.sleep(1.1)
    assert_error(httpx.get(url), 404, "expired")
    wait_until(lambda: not (store.directory / name).exists(), "the sweeper to delete the file", timeout=10)
    assert len(store) == 0


def test_body_and_upload_limits(http: httpx.Client, kiln, server_factory) -> None:
    small = server_factory(kiln.app.state.registry, Settings(max_body_bytes=300_000, max_upload_bytes=100_000,
                                                             max_image_pixels=100 * 100))
    declared = small.http.post("/v1/images/generations", content=b" " * 400_000,
                               headers={"Content-Type": "application/json"})
    assert_error(declared, 413, "larger than 300000 bytes")

    def chunked():  # no Content-Length: refused while streaming in
        for _ in range(40):
            yield b" " * 10_000

    streamed = small.http.post("/v1/images/generations", content=chunked(),
                               headers={"Content-Type": "application/json"})
    assert_error(streamed, 413, "larger than 300000 bytes")

    big_file = {"image": ("x.png", b"\x89PNG" + bytes(200_000), "image/png")}
    assert_error(small.http.post("/v1/images/variations", data={"model": "sd15"}, files=big_file), 413,
                 "200004 bytes", "100000")
    too_many_pixels = {"image": ("x.png", png_bytes((101, 100)), "image/png")}
    assert_error(small.http.post("/v1/images/variations", data={"model": "sd15"}, files=too_many_pixels), 413,
                 "10100 pixels", "10000")
    assert small.http.post("/v1/images/generations", json={**GOOD, "response_format": "b64_json"}).status_code == 200


def test_n_limit_is_configurable(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry, Settings(limits=Limits(max_images=2, max_prompt_chars=10)))
    assert_error(server.http.post("/v1/images/generations", json={**GOOD, "n": 3}), 400, "between 1 and 2")
    assert_error(server.http.post("/v1/images/generations", json={**GOOD, "prompt": "x" * 11}), 400, "limit is 10")


def test_models_launched_at_startup_and_closed_at_shutdown(server_factory) -> None:
    server = server_factory(settings=Settings(launch=({"model_name": "sd-turbo", "tiny": True},)))
    wait_until(lambda: server.http.get("/v1/models/sd-turbo").json()["status"] == "ready", "the startup launch")
    response = server.http.post("/v1/images/generations", json={**GOOD, "model": "sd-turbo"})
    assert response.status_code == 200, response.text
    runner = server.app.state.registry.runner("sd-turbo")
    server.stop()
    assert runner.status == "stopped"


def test_api_keys(kiln, server_factory) -> None:
    server = server_factory(kiln.app.state.registry, Settings(api_keys=frozenset({"sesame"})))
    assert server.http.get("/v1/cluster/auth").json() == {"auth": True}
    assert server.http.get("/status").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        assert_error(server.http.get("/v1/models", headers=headers), 401, "API key")
    assert server.http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert kiln.http.get("/v1/cluster/auth").json() == {"auth": False}


def test_image_urls_are_readable_without_a_key(kiln, server_factory) -> None:
    """An <img> cannot send a header: the file URLs are unguessable, expiring capabilities instead."""
    server = server_factory(kiln.app.state.registry, Settings(api_keys=frozenset({"sesame"})))
    assert_error(server.http.post("/v1/images/generations", json=GOOD), 401, "API key")
    response = server.http.post("/v1/images/generations", json=GOOD, headers={"Authorization": "Bearer sesame"})
    url = response.json()["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert_error(httpx.get(url.rsplit("/", 1)[0] + "/AAAAAAAAAAAAAAAAAAAAAA.png"), 404, "expired")
