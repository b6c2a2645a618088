"""Custom models: registered with Xinference's own client (and over plain HTTP), launched like a catalogue name,
persisted under KILN_HOME across restarts, unregistered; every bad registration is a 400 naming the field and
registers nothing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from xinference_client import RESTfulClient

from kiln.engine.tiny import tiny_checkpoint
from kiln.server.registrations import Registrations
from kiln.server.registry import ModelRegistry

from .server_helpers import assert_error, decode, pixels

GENERATE = {"prompt": "a red fox", "size": "64x64", "response_format": "b64_json", "seed": 3}


def _spec(folder: Path, name: str = "my-sd", **fields) -> dict:
    return {"version": 2, "model_name": name, "model_family": "stable_diffusion", "model_ability": ["text2image"],
            "model_uri": str(folder), "default_generate_config": {"num_inference_steps": 1, "guidance_scale": 0},
            "controlnet": None, **fields}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(server_factory, home):
    return server_factory(ModelRegistry(registrations=Registrations(home)))


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return pixels(decode(base64.b64decode(response.json()["data"][0]["b64_json"])))


def test_xinference_client_registers_launches_and_unregisters(server, tiny_root) -> None:
    folder = tiny_checkpoint("sd-turbo", cache_root=tiny_root)
    client = RESTfulClient(server.url)
    client.register_model("image", json.dumps(_spec(folder)), persist=False)
    assert {"model_name": "my-sd", "is_builtin": False} in client.list_model_registrations("image")
    registration = client.get_model_registration("image", "my-sd")
    assert registration["model_uri"] == str(folder) and registration["model_ability"] == ["text2image"]

    assert client.launch_model("my-sd", model_type="image") == "my-sd"
    handle = client.get_model("my-sd")
    result = handle.text_to_image("a red fox", size="64x64", response_format="b64_json", seed=3)
    registered = pixels(decode(base64.b64decode(result["data"][0]["b64_json"])))
    # The same folder as the catalogue's sd-turbo (family detected: SD), with the registered defaults (1 step,
    # no guidance) applied under the request: the same image.
    assert server.http.post("/v1/models", json={"model_name": "sd-turbo", "tiny": True}).status_code == 200
    catalogue = _image(server.http.post("/v1/images/generations", json={
        **GENERATE, "model": "sd-turbo", "num_inference_steps": 1, "guidance_scale": 0}))
    assert np.array_equal(registered, catalogue)
    assert server.http.get("/v1/models/my-sd").json()["model_ability"] == ["text2image"]

    with pytest.raises(RuntimeError, match="terminate it first"):
        client.unregister_model("image", "my-sd")
    client.terminate_model("my-sd")
    client.unregister_model("image", "my-sd")
    assert_error(server.http.get("/v1/model_registrations/image/my-sd"), 404, "my-sd")
    assert_error(server.http.post("/v1/models", json={"model_name": "my-sd"}), 400, "my-sd")


def test_persisted_registrations_survive_a_restart(server_factory, home, tiny_root) -> None:
    folder = tiny_checkpoint("sd-turbo", cache_root=tiny_root)
    first = server_factory(ModelRegistry(registrations=Registrations(home)))
    body = {"model": json.dumps(_spec(folder, "kept")), "persist": True}
    assert first.http.post("/v1/model_registrations/image", json=body).status_code == 200
    temporary = {"model": json.dumps(_spec(folder, "gone")), "persist": False}
    assert first.http.post("/v1/model_registrations/image", json=temporary).status_code == 200
    saved = home / "registrations" / "image" / "kept.json"
    assert json.loads(saved.read_text())["model_uri"] == str(folder)
    first.stop()

    second = server_factory(ModelRegistry(registrations=Registrations(home)))
    registrations = second.http.get("/v1/model_registrations/image").json()
    listed = {item["model_name"]: item["is_builtin"] for item in registrations}
    assert listed["kept"] is False and "gone" not in listed
    assert second.http.post("/v1/models", json={"model_name": "kept"}).json() == {"model_uid": "kept"}
    assert _image(second.http.post("/v1/images/generations", json={**GENERATE, "model": "kept"})).shape == (64, 64, 3)
    assert second.http.delete("/v1/models/kept").status_code == 200
    assert second.http.delete("/v1/model_registrations/image/kept").status_code == 200
    assert not saved.exists()


def test_family_comes_from_the_spec_when_it_names_one(server, tiny_root) -> None:
    folder = tiny_checkpoint("sd-turbo", cache_root=tiny_root)
    body = {"model": json.dumps(_spec(folder, "wrong-family", model_family="flux")), "persist": False}
    assert server.http.post("/v1/model_registrations/image", json=body).status_code == 200
    assert_error(server.http.post("/v1/models", json={"model_name": "wrong-family"}), 400,
                 "StableDiffusionPipeline", "FluxPipeline")
    assert_error(server.http.get("/v1/models/wrong-family"), 404)


def test_registration_reads_nothing_but_whether_the_folder_exists(server, tmp_path) -> None:
    """A folder that is no checkpoint registers (nothing in it was read); its launch says what is wrong."""
    empty = tmp_path / "empty"
    empty.mkdir()
    body = {"model": json.dumps(_spec(empty, "hollow")), "persist": False}
    assert server.http.post("/v1/model_registrations/image", json=body).status_code == 200
    error = assert_error(server.http.post("/v1/models", json={"model_name": "hollow"}), 400, "model_index.json")
    assert error["param"] == "model_uri"
    assert [i for i in server.http.get("/v1/models/instances").json() if i["model_uid"] == "hollow"] == []


def test_a_registered_model_launches_with_its_registered_controlnets(server, tiny_root) -> None:
    """Xinference's controlnet list in the spec names local ControlNet folders: a launch with `controlnet` by name
    loads them, and a unit gives the catalogue model's image with the same ControlNet (and differs from none)."""
    folder = tiny_checkpoint("stable-diffusion-v1.5", cache_root=tiny_root)
    controlnet = [{"model_family": "controlnet", "model_name": "edges", "model_uri": str(folder / "controlnets/canny"),
                   "model_id": "lllyasviel/sd-controlnet-canny"}]
    spec = _spec(folder, "my-cn", model_ability=["text2image", "image2image"], controlnet=controlnet,
                 default_generate_config={})
    body = {"model": json.dumps(spec), "persist": False}
    assert server.http.post("/v1/model_registrations/image", json=body).status_code == 200
    listed = server.http.get("/v1/model_registrations/image/my-cn").json()["controlnet"]
    assert listed == [{"model_family": "controlnet", "model_name": "edges", "model_uri": str(folder / "controlnets/canny")}]
    launches = [{"model_name": "my-cn", "controlnet": "edges"},
                {"model_name": "stable-diffusion-v1.5", "model_uid": "sd15", "tiny": True, "controlnet": "canny"}]
    for launch in launches:
        assert server.http.post("/v1/models", json=launch).status_code == 200, launch
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[:, 20:24] = 255
    buffer = io.BytesIO()
    Image.fromarray(edges).save(buffer, format="PNG")
    control = base64.b64encode(buffer.getvalue()).decode()
    fields = {**GENERATE, "num_inference_steps": 2, "guidance_scale": 4.0}

    def generate(model: str, name: str | None) -> np.ndarray:
        units = [{"name": name, "image": control}] if name else []
        return _image(server.http.post("/v1/images/generations", json={**fields, "model": model, "controlnet": units}))

    registered = generate("my-cn", "edges")
    assert np.array_equal(registered, generate("sd15", "canny"))
    assert not np.array_equal(registered, generate("my-cn", None))


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"model_uri": "/no/such/folder"}, "model_uri", ["not a folder"]),
    ({"model_uri": "relative/folder"}, "model_uri", ["absolute"]),
    ({"model_name": "sd-turbo"}, "model_name", ["built-in"]),
    ({"model_name": "PP-OCR"}, "model_name", ["built-in"]),
    ({"model_name": "../escape"}, "model_name", ["model_name"]),
    ({"model_name": None}, "model_name", ["model_name"]),
    ({"model_family": "kandinsky"}, "model_family", ["kandinsky", "sdxl"]),
    ({"model_ability": ["text2video"]}, "model_ability", ["text2image"]),
    ({"default_model_config": {"warp": 9}}, "default_model_config.warp", ["warp", "vae_tiling"]),
    ({"default_model_config": {"vae_tiling": "maybe"}}, "default_model_config.vae_tiling", ["vae_tiling"]),
    ({"default_model_config": {"model_path": "/etc"}}, "default_model_config.model_path", ["model_path"]),
    ({"default_generate_config": {"steps": 4}}, "default_generate_config.steps", ["steps"]),
    ({"default_generate_config": {"prompt": "x"}}, "default_generate_config.prompt", ["per request"]),
    ({"controlnet": "canny"}, "controlnet", ["list"]),
    ({"controlnet": [{"model_name": "canny"}]}, "controlnet[0].model_uri", ["model_uri"]),
    ({"controlnet": [{"model_name": "canny", "model_uri": "/no/such/folder"}]}, "controlnet[0].model_uri",
     ["not a folder"]),
    ({"controlnet": [{"model_name": "../up", "model_uri": "/"}]}, "controlnet[0].model_name", ["model_name"]),
    ({"controlnet": [{"model_name": "c", "model_uri": "/", "model_family": "lora"}]}, "controlnet[0].model_family",
     ["controlnet"]),
    ({"model_hub": "huggingface"}, "model_hub", ["model_hub"]),
    ({"gguf_quantizations": ["Q2_K"]}, "gguf_quantizations", ["gguf_quantizations"]),
])
def test_bad_registrations_name_the_field_and_register_nothing(server, tiny_root, change, param, words) -> None:
    before = server.http.get("/v1/model_registrations/image").json()
    spec = {**_spec(tiny_checkpoint("sd-turbo", cache_root=tiny_root)), **change}
    response = server.http.post("/v1/model_registrations/image", json={"model": json.dumps(spec), "persist": True})
    assert assert_error(response, 400, *words)["param"] == param
    assert server.http.get("/v1/model_registrations/image").json() == before
    assert not (server.app.state.registry.registrations.folder).exists()  # nothing persisted either


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "{not json", "persist": False}, "model"),
    ({"model": "[1, 2]", "persist": False}, "model"),
    ({"model": "{}", "persist": "perhaps"}, "persist"),
    ({"model": "{}", "worker_ip": "10.0.0.1"}, "worker_ip"),
    ({"model": "{}", "replicas": 2}, "replicas"),
])
def test_malformed_registration_bodies(server, body, param) -> None:
    assert assert_error(server.http.post("/v1/model_registrations/image", json=body), 400)["param"] == param


def test_duplicates_builtins_and_unknown_names(server, tiny_root) -> None:
    body = {"model": json.dumps(_spec(tiny_checkpoint("sd-turbo", cache_root=tiny_root), "twice")), "persist": False}
    assert server.http.post("/v1/model_registrations/image", json=body).status_code == 200
    assert_error(server.http.post("/v1/model_registrations/image", json=body), 400, "already registered")
    assert_error(server.http.delete("/v1/model_registrations/image/sd-turbo"), 400, "built-in")
    assert_error(server.http.delete("/v1/model_registrations/image/ghost"), 404, "ghost", "twice")
    assert server.http.delete("/v1/model_registrations/image/twice").status_code == 200
