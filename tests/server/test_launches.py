"""Xinference's remaining model routes over HTTP and through Xinference's own client: instance records with their
status, launch progress, cancelling a launch (it stops at its next load stage and frees its uid), the engines of a
model name, and the server's address."""

from __future__ import annotations

import threading

import pytest
from xinference_client import RESTfulClient

from kiln.engine.catalogue import ModelSpec
from kiln.engine.runner import Runner
from kiln.server.registry import ModelRegistry

from .server_helpers import Background, assert_error, wait_until


class StagedRunner(Runner):
    """A real runner whose load pauses after its first stage until the test opens the gate."""

    gate = threading.Event()

    def report_load(self, fraction: float) -> None:
        super().report_load(fraction)
        if fraction < 1.0:
            assert self.gate.wait(120), "the test never opened the gate"


@pytest.fixture
def staged(server_factory):
    StagedRunner.gate.clear()
    server = server_factory(ModelRegistry({ModelSpec: StagedRunner}))
    yield server
    StagedRunner.gate.set()


def _instance(http, uid: str) -> dict:
    (record,) = [item for item in http.get("/v1/models/instances", params={"model_uid": uid}).json()]
    return record


def test_instances_progress_and_cancel_through_xinference_client(staged) -> None:
    http, client = staged.http, RESTfulClient(staged.url)
    assert client.launch_model("sd-turbo", model_type="image", model_uid="slow", tiny=True, wait_ready=False) == "slow"
    wait_until(lambda: client.get_launch_model_progress("slow")["progress"] == 0.1, "the first load stage")
    (record,) = client.get_instance_info(model_name="sd-turbo", model_uid="slow")
    assert record["status"] == "LOADING" and record["model_ability"] == ["text2image"]
    assert record["replica_statuses"] == [{"replica_id": "slow-0", "status": "LOADING"}]

    client.cancel_launch_model("slow")
    assert _instance(http, "slow")["status"] == "TERMINATING"  # its load stage is still running
    assert_error(http.get("/v1/models/slow"), 404, "slow")  # but the uid is out of service at once
    StagedRunner.gate.set()
    wait_until(lambda: _instance(http, "slow")["status"] == "TERMINATED", "the cancelled load to stop")
    # The load stopped at its next stage: the same uid launches again, and runs.
    assert client.launch_model("sd-turbo", model_type="image", model_uid="slow", tiny=True) == "slow"
    assert client.get_launch_model_progress("slow") == {"progress": 1.0}
    statuses = [item["status"] for item in http.get("/v1/models/instances").json() if item["model_uid"] == "slow"]
    assert statuses == ["TERMINATED", "READY"]
    assert_error(http.post("/v1/models/slow/cancel"), 400, "not launching", "DELETE")
    client.terminate_model("slow")
    assert [item["status"] for item in client.get_instance_info("sd-turbo", "slow")] == ["TERMINATED", "TERMINATED"]


def test_a_cancelled_launch_that_was_waited_on_answers_499(staged) -> None:
    http = staged.http
    waiting = Background(lambda: http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "w",
                                                               "tiny": True}))
    wait_until(lambda: http.get("/v1/models/w/progress").status_code == 200
               and http.get("/v1/models/w/progress").json()["progress"] == 0.1, "the first load stage")
    assert http.post("/v1/models/w/cancel").json() is None
    StagedRunner.gate.set()
    error = assert_error(waiting.join(), 499, "cancelled")
    assert error["code"] == "launch_cancelled"


def test_unknown_uids_and_names(http) -> None:
    for response in (http.get("/v1/models/ghost/progress"), http.post("/v1/models/ghost/cancel")):
        assert_error(response, 404, "ghost")
    assert_error(http.get("/v1/engines/image/ghost"), 404, "ghost", "sd-turbo")
    assert http.get("/v1/models/instances", params={"model_uid": "ghost"}).json() == []


def test_ready_models_are_ready_instances(http) -> None:
    record = _instance(http, "sd15")
    assert record["status"] == "READY" and record["model_name"] == "stable-diffusion-v1.5"
    assert http.get("/v1/models/sd15/progress").json() == {"progress": 1.0}
    assert_error(http.post("/v1/models/sd15/cancel"), 400, "not launching")
    assert http.get("/v1/models/sd15").json()["status"] == "ready"  # a refused cancel changes nothing


def test_engines_list_the_launch_options(kiln) -> None:
    client = RESTfulClient(kiln.url)
    engines = client.query_engine_by_model_name("sd-turbo", model_type="image")
    (entry,) = engines["diffusers"]
    assert entry["model_name"] == "sd-turbo"
    options = set(entry["launch_options"])
    assert {"vae_tiling", "attention_slicing", "transformer_quantization", "cpu_offload"} <= options
    assert entry["launch_options"]["vae_tiling"]["schema"] == {"type": "boolean"}
    (ocr,) = kiln.http.get("/v1/engines/image/PP-OCR").json()["onnxruntime"]
    assert "text_score" in ocr["launch_options"] and "vae_tiling" not in ocr["launch_options"]


def test_address_is_where_the_server_answers(kiln) -> None:
    assert RESTfulClient(kiln.url)._get_supervisor_internal_address() == kiln.url.removeprefix("http://")
