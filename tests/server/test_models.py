"""Model management over HTTP: launch (options, Xinference client fields, wait_ready), list, describe,
terminate, registrations; loading and failed models answer requests with 503/500 and say why."""

from __future__ import annotations

import threading

import httpx
import pytest

from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE, ModelSpec
from kiln.engine.runner import Runner
from kiln.server.registry import ModelRegistry

from .server_helpers import assert_error, wait_until

# What xinference-client's launch_model sends besides the model's own fields, at its defaults.
XINFERENCE_CLIENT_FIELDS = {
    "model_engine": None, "model_size_in_billions": None, "model_format": None, "quantization": None,
    "replica": 1, "n_worker": 1, "n_gpu": "auto", "request_limits": None, "worker_ip": None, "gpu_idx": None,
    "replica_config": None, "peft_model_config": None, "enable_thinking": None, "enable_virtual_env": None,
    "virtual_env_packages": None, "virtual_env_find_links": None, "envs": None,
}
GENERATE = {"prompt": "x", "size": "64x64", "num_inference_steps": 1, "response_format": "b64_json"}


def test_list_and_describe(http: httpx.Client) -> None:
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list"
    by_id = {item["id"]: item for item in listing["data"]}
    assert {"sd", "sd15", "sdxl", "sd3", "flux"} <= set(by_id)
    description = http.get("/v1/models/sd15").json()
    assert description == by_id["sd15"]
    assert description["model_type"] == "image" and description["object"] == "model"
    assert description["owned_by"] == "kiln" and description["status"] == "ready"
    assert description["model_name"] == "stable-diffusion-v1.5" and isinstance(description["created"], int)
    assert description["model_ability"] == ["text2image", "image2image", "inpainting"]
    assert by_id["sd"]["model_ability"] == ["text2image"]
    backend = description["backend"]  # what runs the denoiser; auto says what it measured (test_auto_backend.py)
    assert backend["requested"] == "auto" and backend["backend"] == backend["auto"]["chosen"]
    assert backend["auto"]["why"] and backend["auto"]["forward_ms"]["eager"]


def test_unknown_uid_is_404_listing_running_uids(http: httpx.Client) -> None:
    for response in (http.get("/v1/models/ghost"), http.delete("/v1/models/ghost"),
                     http.post("/v1/models/ghost/requests/r1/abort")):
        assert_error(response, 404, "ghost", "sd15", "flux")


def test_launch_with_client_fields_then_terminate(http: httpx.Client) -> None:
    body = {"model_name": "sd-turbo", "model_type": "image", "model_uid": "temp-sd", "tiny": True,
            **XINFERENCE_CLIENT_FIELDS, "model_engine": "Diffusers", "max_batch_size": 4}
    response = http.post("/v1/models", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"model_uid": "temp-sd"}
    description = http.get("/v1/models/temp-sd").json()
    assert description["launch_options"]["max_batch_size"] == description["max_batch_size"] == 4
    default = http.get("/v1/models/sd15").json()  # launched without it: "auto", 16 on a CPU
    assert default["launch_options"]["max_batch_size"] is None and default["max_batch_size"] == 16
    assert http.post("/v1/images/generations", json={**GENERATE, "model": "temp-sd"}).status_code == 200
    duplicate = http.post("/v1/models", json=body)
    assert_error(duplicate, 400, "temp-sd", "already launched")
    assert http.delete("/v1/models/temp-sd").status_code == 200
    assert_error(http.get("/v1/models/temp-sd"), 404, "temp-sd")
    assert_error(http.post("/v1/images/generations", json={**GENERATE, "model": "temp-sd"}), 404, "temp-sd")


def test_uid_defaults_to_the_model_name(http: httpx.Client) -> None:
    response = http.post("/v1/models", json={"model_name": "sdxl-turbo", "tiny": True})
    assert response.json() == {"model_uid": "sdxl-turbo"}
    assert http.delete("/v1/models/sdxl-turbo").status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "model_name", ["model_name is required"]),
        ({"model_name": "sd-9000"}, "model_name", ["sd-9000", "sd-turbo", "FLUX.1-dev"]),
        ({"model_name": "sd-turbo", "model_type": "LLM"}, "model_type", ["model_type", "image"]),
        ({"model_name": "sd-turbo", "model_uid": "a/b"}, "model_uid", ["model_uid"]),
        ({"model_name": "sd-turbo", "replica": 2}, "replica", ["replica=2", "not supported", "kiln serve --ray"]),
        ({"model_name": "sd-turbo", "gpu_idx": [0]}, "gpu_idx", ["gpu_idx", "kiln serve --ray"]),
        ({"model_name": "sd-turbo", "n_gpu": 4}, "n_gpu", ["n_gpu"]),
        ({"model_name": "sd-turbo", "model_engine": "vLLM"}, "model_engine", ["model_engine", "diffusers"]),
        ({"model_name": "sd-turbo", "peft_model_config": {"lora_list": [1]}}, "peft_model_config.lora_list",
         ["peft_model_config.lora_list[0]", "lora_name and local_path"]),
        ({"model_name": "sd-turbo", "torch_dtype": "float8"}, "torch_dtype", ["torch_dtype", "float16"]),
        ({"model_name": "sd-turbo", "max_batch_size": 0}, "max_batch_size", ["max_batch_size"]),
        ({"model_name": "sd-turbo", "warp_factor": 9}, "warp_factor", ["warp_factor"]),
        ({"model_name": "sd-turbo", "text_encoder_3": None}, "text_encoder_3", ["text_encoder_3", "SD3"]),
    ],
)
def test_launch_errors(http: httpx.Client, body: dict, param: str | None, words: list[str]) -> None:
    before = {item["id"] for item in http.get("/v1/models").json()["data"]}
    error = assert_error(http.post("/v1/models", json=body), 400, *words)
    assert error["param"] == param
    after = {item["id"] for item in http.get("/v1/models").json()["data"]}
    assert after == before


def test_one_process_cannot_change_a_replica_count(http: httpx.Client) -> None:
    assert http.get("/v1/models/sd/replicas").json() == {"replica": 1, "replicas": []}
    assert_error(http.post("/v1/models/sd/replicas", json={"replica": 2}), 400, "one process", "kiln serve --ray")
    assert_error(http.post("/v1/models/nobody/replicas", json={"replica": 2}), 404, "nobody")


def test_launch_body_must_be_json(http: httpx.Client) -> None:
    assert_error(http.post("/v1/models", content=b"model_name=sd-turbo"), 400, "JSON")
    assert_error(http.post("/v1/models?wait_ready=perhaps", json={"model_name": "sd-turbo"}), 400, "wait_ready")


def test_failed_load_with_wait_ready_reports_and_frees_the_uid(http: httpx.Client, tmp_path) -> None:
    body = {"model_name": "sd-turbo", "model_uid": "broken", "model_path": str(tmp_path)}
    error = assert_error(http.post("/v1/models", json=body), 400, "broken", "failed to load", str(tmp_path))
    assert error["code"] == "model_load_failed"
    assert_error(http.get("/v1/models/broken"), 404, "broken")


def test_failed_load_without_wait_ready_is_reported_on_describe_and_requests(http: httpx.Client, tmp_path) -> None:
    body = {"model_name": "sd-turbo", "model_uid": "broken-later", "model_path": str(tmp_path)}
    assert http.post("/v1/models?wait_ready=false", json=body).json() == {"model_uid": "broken-later"}
    wait_until(lambda: http.get("/v1/models/broken-later").json()["status"] == "failed", "load failure")
    description = http.get("/v1/models/broken-later").json()
    assert str(tmp_path) in description["error"]
    wait_until(lambda: http.post("/v1/images/generations", json={**GENERATE, "model": "broken-later"}).status_code
               != 503, "the load task to end")
    error = assert_error(http.post("/v1/images/generations", json={**GENERATE, "model": "broken-later"}), 400,
                         "broken-later", "failed to load", str(tmp_path))
    assert error["code"] == "model_load_failed"
    assert http.delete("/v1/models/broken-later").status_code == 200


class GatedRunner(Runner):
    """A real runner whose load waits for the test to open the gate, so 'still loading' is deterministic."""

    gate = threading.Event()

    def load(self) -> None:
        self.status = "loading"
        assert self.gate.wait(120), "the test never opened the gate"
        super().load()


def test_wait_ready_false_returns_at_once_and_requests_get_503_until_loaded(server_factory) -> None:
    registry = ModelRegistry({ModelSpec: GatedRunner}, retry_after=7)
    server = server_factory(registry)
    http = server.http
    GatedRunner.gate.clear()
    try:
        response = http.post("/v1/models?wait_ready=false", json={"model_name": "sd-turbo", "tiny": True})
        assert response.json() == {"model_uid": "sd-turbo"}
        assert http.get("/v1/models/sd-turbo").json()["status"] == "loading"
        loading = http.post("/v1/images/generations", json={**GENERATE, "model": "sd-turbo"})
        assert_error(loading, 503, "sd-turbo", "loading")
        assert loading.headers["retry-after"] == "7"
    finally:
        GatedRunner.gate.set()
    wait_until(lambda: http.get("/v1/models/sd-turbo").json()["status"] == "ready", "the gated load")
    assert http.post("/v1/images/generations", json={**GENERATE, "model": "sd-turbo"}).status_code == 200
    assert http.delete("/v1/models/sd-turbo").status_code == 200


def test_terminate_while_loading_waits_for_the_load_then_closes(server_factory) -> None:
    registry = ModelRegistry({ModelSpec: GatedRunner})
    http = server_factory(registry).http
    GatedRunner.gate.clear()
    http.post("/v1/models?wait_ready=false", json={"model_name": "sd-turbo", "tiny": True, "model_uid": "gone"})
    terminate = threading.Thread(target=lambda: http.delete("/v1/models/gone"))
    terminate.start()
    wait_until(lambda: http.get("/v1/models/gone").status_code == 404, "the uid to be released")
    GatedRunner.gate.set()
    terminate.join(120)
    assert not terminate.is_alive()
    assert registry.uids == []


def test_model_registrations(http: httpx.Client) -> None:
    listing = http.get("/v1/model_registrations/image").json()
    names = sorted({*CATALOGUE, *OCR_CATALOGUE})
    assert listing == [{"model_name": name, "is_builtin": True} for name in names]
    detailed = {item["model_name"]: item for item in http.get("/v1/model_registrations/image?detailed=true").json()}
    assert set(detailed) == set(names)
    assert detailed["PP-OCR"]["model_ability"] == ["ocr"] and "generation_parameters" not in detailed["PP-OCR"]
    one = http.get("/v1/model_registrations/image/FLUX.1-schnell").json()
    assert one["model_ability"] == ["text2image", "image2image", "inpainting"] and one["default_steps"] == 4
    assert_error(http.get("/v1/model_registrations/image/nope"), 404, "nope", "sd-turbo")


def test_loaded_models_are_frozen_out_of_full_collections_and_freed_on_terminate(kiln) -> None:
    """Full garbage collections would walk every loaded model's objects (long stalls of every thread); a launch
    freezes them, and a terminate unfreezes and collects, so the model's reference cycles are freed."""
    import gc
    import weakref

    gc.unfreeze()
    response = kiln.http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "temp-frozen", "tiny": True})
    assert response.status_code == 200, response.text
    assert gc.get_freeze_count() > 10_000  # the loaded models' objects at least
    runner = weakref.ref(kiln.app.state.registry.runner("temp-frozen"))
    assert runner() is not None
    assert kiln.http.delete("/v1/models/temp-frozen").status_code == 200
    assert runner() is None


def _flux_with_unquantizable_t5(tiny_root, directory):
    """The tiny FLUX.1-schnell with a T5 whose attention output projections take 96 inputs (3 heads of 32):
    bitsandbytes' 4-bit CPU kernel refuses widths that are not multiples of 64 on CPUs with avx512_bf16, and
    runs them elsewhere."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    from kiln.engine.tiny import tiny_checkpoint

    shutil.copytree(tiny_checkpoint("FLUX.1-schnell", cache_root=tiny_root), directory)
    config = T5Config.from_pretrained(directory / "text_encoder_2")
    config.num_heads = 3
    assert config.num_heads * config.d_kv == 96
    T5EncoderModel(config).save_pretrained(directory / "text_encoder_2")
    return directory


def test_a_text_encoder_that_cannot_run_quantized_fails_its_launch_not_its_requests(http, tiny_root, tmp_path):
    from bitsandbytes.functional import has_avx512bf16

    checkpoint = _flux_with_unquantizable_t5(tiny_root, tmp_path / "flux")
    response = http.post("/v1/models", json={"model_name": "FLUX.1-schnell", "model_uid": "flux-4bit",
                                             "model_path": str(checkpoint), "text_encoder_quantization": "4-bit"})
    if has_avx512bf16():  # where the kernel refuses the shape, the launch says so and leaves nothing behind
        assert_error(response, 400, "text_encoder_2", "4-bit")
        assert http.get("/v1/models/flux-4bit").status_code == 404
        return
    assert response.status_code == 200, response.text  # elsewhere the model runs
    try:
        assert http.post("/v1/images/generations", json={**GENERATE, "model": "flux-4bit"}).status_code == 200
    finally:
        http.delete("/v1/models/flux-4bit")


class ForwardingEndpoint:
    """A ModelEndpoint that is not a Runner: it serves through a real runner it holds, as a replica set behind a
    distributed front would. Only the protocol's members exist on it."""

    def __init__(self, uid, spec, options, limits):
        self._runner = Runner(uid, spec, options, limits)
        self.uid, self.spec, self.options = uid, spec, options

    status = property(lambda self: self._runner.status)
    error = property(lambda self: self._runner.error)
    created = property(lambda self: self._runner.created)
    load_progress = property(lambda self: self._runner.load_progress)

    def load(self):
        self._runner.load()

    def cancel_load(self):
        return self._runner.cancel_load()

    def close(self):
        self._runner.close()

    def submit(self, request, on_preview=None):
        return self._runner.submit(request, on_preview)

    def abort(self, request_id):
        return self._runner.abort(request_id)

    def progress(self, request_id):
        return self._runner.progress(request_id)

    def describe(self):
        return {**self._runner.describe(), "forwarded": True}

    def stats(self):
        return self._runner.stats()


def test_the_registry_serves_any_model_endpoint(server_factory) -> None:
    from kiln.engine.endpoint import ModelEndpoint

    registry = ModelRegistry({ModelSpec: ForwardingEndpoint})
    server = server_factory(registry)
    assert server.http.post("/v1/models", json={"model_name": "sd-turbo", "tiny": True}).status_code == 200
    endpoint = registry.runner("sd-turbo")
    assert isinstance(endpoint, ModelEndpoint) and not isinstance(endpoint, Runner)
    body = {**GENERATE, "model": "sd-turbo", "request_id": "through-the-protocol"}
    assert server.http.post("/v1/images/generations", json=body).status_code == 200
    assert server.http.get("/v1/requests/through-the-protocol/progress").json() == {"progress": 1.0}
    assert server.http.get("/v1/models/sd-turbo").json()["forwarded"] is True
    assert server.http.get("/v1/models/sd-turbo/progress").json() == {"progress": 1.0}
    assert 'kiln_images_generated_total{model="sd-turbo"} 1' in server.http.get("/metrics").text
    assert server.http.delete("/v1/models/sd-turbo").status_code == 200
