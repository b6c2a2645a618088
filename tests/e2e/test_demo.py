"""`kiln serve --demo`: every catalogue model comes up under its catalogue name and generates; the default OCR
model comes up too and reads."""

from __future__ import annotations

import base64
import time
from typing import Iterator

import pytest

from kiln.engine.catalogue import CATALOGUE, DEFAULT_OCR_MODEL
from kiln.server.client import Client

from .e2e_helpers import KilnServer, png_bytes, png_image, start_server


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServer]:
    kiln = start_server(tmp_path_factory.mktemp("demo") / "serve.log", "--demo")
    yield kiln
    kiln.stop()


def ready(client: Client, uid: str) -> dict:
    """The model's description once it has loaded (a failed load fails the test with its error)."""
    while (description := client.describe_model(uid))["status"] != "ready":
        assert description["status"] != "failed", description["error"]
        time.sleep(0.2)
    return description


def test_demo_serves_every_catalogue_model(demo: KilnServer) -> None:
    with Client(demo.endpoint) as client:
        assert set(client.list_models()) == {*CATALOGUE, DEFAULT_OCR_MODEL}  # listed at once, while loading
        for name in CATALOGUE:
            assert ready(client, name)["model_name"] == name
            result = client.get_model(name).text_to_image(
                "a small test", size="64x64", response_format="b64_json", num_inference_steps=1, seed=1
            )
            (item,) = result["data"]
            assert png_image(base64.b64decode(item["b64_json"])).size == (64, 64), name
        assert ready(client, DEFAULT_OCR_MODEL)["model_ability"] == ["ocr"]
        assert client.get_model(DEFAULT_OCR_MODEL).ocr(png_bytes((64, 64), (255, 255, 255))) == ""
