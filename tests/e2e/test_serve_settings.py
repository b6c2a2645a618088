"""`kiln serve` settings over real HTTP: API keys from the flag, $KILN_API_KEYS and a key file (replacing the
config file's), the Host check with its default (the bound host, localhost, 127.0.0.1, the public URL's host),
`--public-url` as the base of every url, and the config file's limits and startup launch (the model `cfg`)."""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import pytest

from .e2e_helpers import KilnServer, run_kiln, start_server

CONFIG = """
api_keys = ["config-key"]
max_body_bytes = 100000
[limits]
max_images = 2
[[launch]]
model_name = "sd-turbo"
model_uid = "cfg"
tiny = true
"""
KEYS = ("flag-key", "env-key", "file-key")
GOOD = {"model": "cfg", "prompt": "a barn", "size": "64x64", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServer]:
    folder = tmp_path_factory.mktemp("configured")
    (folder / "kiln.toml").write_text(CONFIG)
    (folder / "keys.txt").write_text("# one key per line\nfile-key\n")
    server = start_server(folder / "serve.log", "--config", str(folder / "kiln.toml"), "--api-key", "flag-key",
                          "--api-key-file", str(folder / "keys.txt"), "--public-url", "https://images.example.com/kiln",
                          env={"KILN_API_KEYS": "env-key"})
    while call(server, "GET", "/status", None).json()["models"].get("cfg") != "ready":  # the config's launch
        assert server.process.poll() is None, server.log_tail()
        time.sleep(0.05)
    yield server
    server.stop()


def call(server: KilnServer, method: str, path: str, key: str | None = "flag-key", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.request(method, f"{server.endpoint}{path}", headers=headers, timeout=120, **kwargs)


def test_keys_from_the_flag_the_environment_and_a_file(configured: KilnServer) -> None:
    for key in KEYS:
        assert call(configured, "GET", "/v1/models", key).status_code == 200, key
    for key in (None, "config-key", "wrong"):  # the command line's keys replace the config file's
        response = call(configured, "GET", "/v1/models", key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert call(configured, "GET", "/status", None).status_code == 200
    assert call(configured, "GET", "/v1/cluster/auth", None).json() == {"auth": True}
    listing = run_kiln("list", "--api-key", "env-key", endpoint=configured.endpoint)
    assert listing.returncode == 0 and "cfg" in listing.stdout, listing.stderr


def test_the_config_files_limits(configured: KilnServer) -> None:
    too_many = call(configured, "POST", "/v1/images/generations", json={**GOOD, "n": 3})
    assert too_many.status_code == 400 and "between 1 and 2" in too_many.json()["detail"]
    too_big = call(configured, "POST", "/v1/images/generations", content=b" " * 200_000,
                   headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and "100000 bytes" in too_big.json()["detail"]


def test_public_url_and_allowed_hosts(configured: KilnServer) -> None:
    for host in ("evil.example:1234", "images.example.com.evil.example"):
        refused = call(configured, "POST", "/v1/images/generations", json=GOOD, headers={"Host": host})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host", refused.text
    for host in (None, "localhost:9", "images.example.com"):
        headers = {"Host": host} if host else {}
        response = call(configured, "POST", "/v1/images/generations", json=GOOD, headers=headers)
        assert response.status_code == 200, response.text
        url = response.json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/kiln/v1/images/files/"), url
        fetched = call(configured, "GET", "/v1/images/files/" + url.rsplit("/", 1)[1], None)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
