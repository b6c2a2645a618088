"""The OpenAPI document: it covers the routing table, it is generated from the validators' declarations (with
the server's own limits), /docs renders it from packaged files, and schemathesis, driven by the document against
the live server, finds no 5xx and no answer the document does not describe."""

from __future__ import annotations

import re
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)
from starlette.routing import Mount, Route

from kiln.engine.ocr.params import OCR_PARAMETERS
from kiln.engine.options import LAUNCH_OPTIONS
from kiln.engine.schema import PARAMETERS, Limits
from kiln.server import a1111
from kiln.server.app import ApiKeyAuth, Settings, create_app
from kiln.server.openapi import UNDOCUMENTED, document
from kiln.server.registrations import Registrations
from kiln.server.registry import ModelRegistry

from .conftest import start_server
from .server_helpers import assert_error

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# Small bounds keep every generated request a quick one: the document publishes the server's own limits.
LIMITS = Limits(max_images=2, max_steps=2, max_partial_images=1, max_prompt_chars=200)
MAX_SIDE = 128
EXAMPLES = 4  # per operation and mode: about a minute for the whole API on a 2-core CPU


def test_the_document_covers_the_routing_table(http) -> None:
    documented = http.get("/openapi.json").json()["paths"]
    routes = {(method.lower(), route.path) for route in create_app().routes if isinstance(route, Route)
              for method in route.methods if method != "HEAD" and route.path not in UNDOCUMENTED}
    in_document = {(method, path) for path, operations in documented.items() for method in operations}
    assert routes - in_document == set(), "routes missing from server/openapi.py's OPERATIONS"
    assert in_document - routes == set(), "documented operations with no route"
    mounts = [route.path for route in create_app().routes if isinstance(route, Mount)]
    assert mounts == ["/ui", "/docs/assets"]  # static files of the two web pages


def test_the_document_comes_from_the_declarations_and_the_server_limits(server_factory) -> None:
    server = server_factory(settings=Settings(limits=LIMITS))
    schemas = server.http.get("/openapi.json").json()["components"]["schemas"]
    generation = schemas["GenerationRequest"]["properties"]
    assert set(PARAMETERS) <= set(generation)
    assert generation["num_inference_steps"]["maximum"] == LIMITS.max_steps
    assert generation["n"]["maximum"] == LIMITS.max_images
    assert generation["strength"]["exclusiveMinimum"] == 0 and generation["strength"]["maximum"] == 1
    assert generation["sampler_name"]["enum"][:2] == ["default", "DPM++ 2M"]
    assert generation["seed"]["description"] == PARAMETERS["seed"].description
    assert set(LAUNCH_OPTIONS) <= set(schemas["LaunchRequest"]["properties"])
    launch = schemas["LaunchRequest"]["properties"]
    assert launch["vae_tiling"]["description"] == LAUNCH_OPTIONS["vae_tiling"].description
    assert set(OCR_PARAMETERS) <= set(schemas["OcrForm"]["properties"])
    assert set(schemas["A1111Txt2Img"]["properties"]) == set(a1111.TXT2IMG)
    assert schemas["A1111Img2Img"]["properties"]["steps"]["maximum"] == LIMITS.max_steps
    assert schemas["InpaintingForm"]["required"] == ["image", "mask_image"]


def test_docs_render_from_packaged_files_and_stay_open_with_api_keys(server_factory) -> None:
    server = server_factory(settings=Settings(api_keys=frozenset({"secret"})))
    page = server.http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text.replace('"openapi.json"', "")  # nothing from a CDN
    assets = re.findall(r'(?:href|src)="(docs/assets/[^"]+)"', page.text)
    assert sorted(assets) == ["docs/assets/favicon-32x32.png", "docs/assets/swagger-ui-bundle.js",
                              "docs/assets/swagger-ui.css"]
    folder = Path(__import__("kiln.server", fromlist=["x"]).__file__).parent / "static" / "swagger-ui"
    for asset in assets:
        served = server.http.get(f"/{asset}")
        assert served.status_code == 200 and served.content == (folder / Path(asset).name).read_bytes()
    assert server.http.get("/openapi.json").json()["openapi"] == "3.1.0"
    assert_error(server.http.get("/v1/models"), 401)


@pytest.fixture(scope="module")
def api_server(tmp_path_factory, tiny_root):
    """A server with small limits and one tiny model, offline: a generated launch never reaches a hub."""
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub")))
    running = start_server(ModelRegistry(limits=LIMITS, registrations=Registrations(home)),
                           Settings(limits=LIMITS, max_body_bytes=2 * 1024 * 1024))
    assert running.http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "base", "tiny": True,
                                                 "max_batch_size": 4}).status_code == 200
    yield running
    running.stop()
    patch.undo()


@pytest.fixture(scope="module")
def api_schema(api_server):
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


def _operations() -> list[tuple[str, str]]:
    """Every documented operation, from the document of an app with the test's limits (no server needed)."""
    paths = document(create_app().routes, LIMITS, ApiKeyAuth.OPEN_PATHS)["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations]


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda value: value)
def test_the_live_server_answers_as_its_document_says(api_schema, api_server, method, path) -> None:
    """A few schema-valid and schema-invalid requests per operation (derandomised, so every run sends the same)."""
    operation = api_schema[path][method]
    modes = [GenerationMode.POSITIVE]
    if operation.body or any(True for _ in operation.iter_parameters()):
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def call(case) -> None:
            _bound_sizes(case.body)
            try:
                case.call_and_validate(base_url=api_server.url, checks=CHECKS, timeout=120)
            finally:
                _restore(api_server)

        call()


def _bound_sizes(body) -> None:
    """Keep generated images small (the document allows up to 2048 px): quick on a CPU, same code paths."""
    if not isinstance(body, dict):
        return
    for name in ("width", "height"):
        if isinstance(body.get(name), int) and body[name] > MAX_SIDE:
            body[name] = MAX_SIDE
    size = body.get("size")
    if isinstance(size, str) and re.fullmatch(r"\s*\d+\s*\D\s*\d+\s*", size):
        body["size"] = "64x64"


def _restore(server) -> None:
    """Undo what a generated call launched or terminated, so every case meets the same server."""
    uids = {item["id"] for item in server.http.get("/v1/models").json()["data"]}
    for uid in uids - {"base"}:
        server.http.delete(f"/v1/models/{uid}")
    if "base" not in uids:
        server.http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "base", "tiny": True})
