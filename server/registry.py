"""The launched models of one server, by uid: launch, look up, describe, terminate.

A launch body is Xinference's `POST /v1/models`: the catalogue `model_name`, `model_type` "image", an optional
`model_uid`, Kiln's launch options (see `engine.options`), and the fields Xinference's client always sends,
which are accepted at their null/default values and refused (400, naming the field) otherwise. Loading runs in
a worker thread; every blocking runner call (load, close) stays off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import asdict
from typing import Any, Callable, Mapping

from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE, ModelSpec, OcrSpec
from kiln.engine.errors import ModelLoadError
from kiln.engine.ocr import OcrOptions, OcrRunner, parse_ocr_options
from kiln.engine.options import LaunchOptionError, LaunchOptions, parse_launch_options
from kiln.engine.requests import RequestHandle
from kiln.engine.runner import Runner

from . import heap
from .errors import ApiError, bad_request

log = logging.getLogger("kiln.server")

RunnerFactory = Callable[[str, ModelSpec, LaunchOptions], Runner]
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Fields the xinference client sends on every launch -> the values Kiln can honour (None always can).
_CLIENT_FIELDS: Mapping[str, tuple[Any, ...]] = {
    "model_engine": ("diffusers",),
    "model_size_in_billions": (),
    "model_format": ("pytorch",),
    "quantization": ("none",),
    "replica": (1,),
    "n_worker": (1,),
    "n_gpu": ("auto",),
    "request_limits": (),
    "worker_ip": (),
    "gpu_idx": (),
    "replica_config": ({},),
    "peft_model_config": ({},),
    "download_hub": (),
    "enable_thinking": (False,),
    "enable_virtual_env": (False,),
    "virtual_env_packages": ([],),
    "virtual_env_find_links": ([],),
    "envs": ({},),
}


class ModelRegistry:
    """Runners by uid. All methods run on the event loop; blocking runner work goes to threads."""

    def __init__(self, runner_factory: RunnerFactory = Runner, retry_after: int = 5):
        self.runner_factory = runner_factory
        self.retry_after = retry_after  # seconds, sent with 503 (loading) and 429 (queue full)
        self._runners: dict[str, Runner] = {}
        self._loads: dict[str, asyncio.Task] = {}

    # --- launch ---------------------------------------------------------------------------------------------
    async def launch(self, body: Mapping[str, Any], *, wait_ready: bool = True) -> str:
        """Start a model; with `wait_ready` return once it is loaded (a load error is raised and the uid
        freed), else at once (the load error is then reported by `describe` and by requests to it)."""
        uid, spec, options = self.parse_launch(body)
        if isinstance(spec, OcrSpec):
            runner = OcrRunner(uid, spec, options)
        else:
            runner = self.runner_factory(uid, spec, options)
        self._runners[uid] = runner
        load = asyncio.create_task(asyncio.to_thread(runner.load), name=f"kiln-load-{uid}")
        self._loads[uid] = load
        load.add_done_callback(lambda task: self._loaded(uid, task))
        if wait_ready:
            try:
                await asyncio.shield(load)
            except Exception as error:  # noqa: BLE001 - any load fault is reported to the caller
                if self._runners.get(uid) is runner:
                    del self._runners[uid]
                status = 400 if isinstance(error, (ModelLoadError, ValueError)) else 500
                raise ApiError(status, f"model {uid} ({spec.name}) failed to load: {error}",
                               code="model_load_failed") from error
        return uid

    def parse_launch(self, body: Mapping[str, Any]) -> tuple[str, ModelSpec | OcrSpec, LaunchOptions | OcrOptions]:
        """Validate a launch body without side effects; raises ApiError(400) naming the bad field."""
        if not isinstance(body, Mapping):
            raise bad_request("the launch body must be a JSON object")
        fields = dict(body)
        name = fields.pop("model_name", None)
        if not isinstance(name, str) or not name:
            raise bad_request("model_name is required (a catalogue model name)", "model_name", "missing_parameter")
        spec = CATALOGUE.get(name) or OCR_CATALOGUE.get(name)
        if spec is None:
            raise bad_request(f"unknown model_name {name!r}; catalogue models: "
                              f"{', '.join([*CATALOGUE, *OCR_CATALOGUE])}", "model_name", "model_not_found")
        model_type = fields.pop("model_type", None)
        if model_type is not None and (not isinstance(model_type, str) or model_type.lower() != "image"):
            raise bad_request(f"model_type must be 'image' (Kiln serves image models), got {model_type!r}",
                              "model_type")
        uid = fields.pop("model_uid", None) or name
        if not isinstance(uid, str) or not _UID.match(uid):
            raise bad_request(
                f"model_uid {uid!r} must be 1-128 characters of letters, digits, '.', '_' or '-'", "model_uid"
            )
        if uid in self._runners:
            raise bad_request(f"model uid {uid!r} is already launched; terminate it first or pick another model_uid",
                              "model_uid", "model_exists")
        for field, honoured in _CLIENT_FIELDS.items():
            if field == "model_engine" and isinstance(spec, OcrSpec):
                honoured = (spec.engine,)
            value = fields.pop(field, None)
            if value is not None and not any(_same(value, ok) for ok in honoured):
                accepted = ", ".join(["null", *(repr(ok) for ok in honoured)])
                raise bad_request(f"{field}={value!r} is not supported by Kiln; accepted: {accepted}", field,
                                  "unsupported_option")
        try:
            if isinstance(spec, OcrSpec):
                options = parse_ocr_options(spec, fields)
            else:
                options = parse_launch_options(spec, fields)
        except LaunchOptionError as error:
            raise bad_request(str(error), code="invalid_launch_option") from None
        return uid, spec, options

    def _loaded(self, uid: str, task: asyncio.Task) -> None:
        if self._loads.get(uid) is task:
            del self._loads[uid]
        if not task.cancelled() and task.exception() is not None:
            log.warning("model %s failed to load: %s", uid, task.exception())
        heap.settle()

    # --- lookup ---------------------------------------------------------------------------------------------
    @property
    def uids(self) -> list[str]:
        return list(self._runners)

    def runners(self) -> list[Runner]:
        return list(self._runners.values())

    def runner(self, uid: str) -> Runner:
        """The runner for `uid` in any state; 404 listing the running uids."""
        runner = self._runners.get(uid)
        if runner is None:
            raise ApiError(404, f"model {uid!r} is not running; running model uids: {self.uids}",
                           param="model", code="model_not_found")
        return runner

    def ready(self, runner: Runner) -> Runner:
        """`runner` if it can take requests: 503 + Retry-After while loading, 500 with the load error."""
        if runner.status in ("created", "loading"):
            raise ApiError(503, f"model {runner.uid} is still loading; retry in a few seconds", code="model_loading",
                           headers={"Retry-After": str(self.retry_after)})
        if runner.status == "failed":
            raise ApiError(500, f"model {runner.uid} failed to load: {runner.error}; terminate it "
                           f"(DELETE /v1/models/{runner.uid}) and launch it again", code="model_load_failed")
        return runner

    def pick(self, uid: str | None, ability: str) -> Runner:
        """The model a request runs on: the named one, or (no name) the first ready one able to do `ability`."""
        if uid is None:
            for runner in self._runners.values():
                if ability in runner.spec.abilities and runner.status == "ready":
                    return runner
            raise bad_request(f"no running model can do {ability}; name one in `model` or launch one "
                              f"(POST /v1/models)", "model", "model_not_found")
        runner = self.runner(uid)
        if ability not in runner.spec.abilities:
            able = [r.uid for r in self._runners.values() if ability in r.spec.abilities]
            raise bad_request(f"model {uid} ({runner.spec.name}) cannot do {ability}; it can do "
                              f"{', '.join(runner.spec.abilities)}. Running models that can: {able}", "model",
                              "ability_not_supported")
        return self.ready(runner)

    def find_request(self, request_id: str) -> tuple[Runner, RequestHandle] | None:
        """The runner and handle of a request id, newest model first."""
        for runner in reversed(self._runners.values()):
            handle = runner.get(request_id)
            if handle is not None:
                return runner, handle
        return None

    # --- description ----------------------------------------------------------------------------------------
    def describe(self, uid: str) -> dict[str, Any]:
        """What `GET /v1/models/{uid}` returns: Xinference's image description plus Kiln's status."""
        runner = self.runner(uid)
        return {
            "id": uid,
            "object": "model",
            "created": runner.created,
            "owned_by": "kiln",
            "model_type": "image",
            "model_uid": uid,
            **runner.spec.describe(),
            "model_engine": runner.spec.engine if isinstance(runner.spec, OcrSpec) else "diffusers",
            "replica": 1,
            "status": runner.status,
            "error": runner.error,
            "launch_options": _options(runner.options),
            "max_batch_size": runner.max_batch_size,  # resolved: "auto" becomes a number at load
            "backend": getattr(runner, "backend_info", None) or None,  # what runs the denoiser; auto's timings
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(uid) for uid in self._runners]

    # --- termination ----------------------------------------------------------------------------------------
    async def terminate(self, uid: str) -> None:
        """Remove the model now (new requests get 404); its waiting and running requests fail with 409."""
        runner = self.runner(uid)
        del self._runners[uid]
        load = self._loads.get(uid)
        if load is not None:
            await asyncio.wait({load})  # a load cannot be interrupted; close once it is done
        await asyncio.to_thread(runner.close)
        del runner
        heap.settle()

    async def close(self) -> None:
        """Terminate every model (at shutdown)."""
        await asyncio.gather(*(self.terminate(uid) for uid in self.uids), return_exceptions=True)


def _same(value: Any, accepted: Any) -> bool:
    if isinstance(accepted, str) and isinstance(value, str):
        return value.lower() == accepted.lower()
    return type(value) is type(accepted) and value == accepted


def _options(options: LaunchOptions | OcrOptions) -> dict[str, Any]:
    """The launch options as JSON-ready values."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(options).items()}
