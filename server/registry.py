"""The launched models of one server, by uid: launch, look up, describe, terminate.

A launch body is Xinference's `POST /v1/models`: the catalogue `model_name`, `model_type` "image", an optional
`model_uid`, Kiln's launch options (see `engine.options`), and the fields Xinference's client always sends,
which are accepted at their null/default values and refused (400, naming the field) otherwise. Loading runs in
a worker thread; every blocking runner call (load, close) stays off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE, ModelSpec, OcrSpec
from kiln.engine.endpoint import ModelEndpoint
from kiln.engine.errors import LaunchCancelled, ModelLoadError
from kiln.engine.ocr import OcrRunner, parse_ocr_options
from kiln.engine.options import parse_launch_options
from kiln.engine.schema import Limits

from . import heap
from .errors import ApiError, bad_request
from .registrations import NAME, Registrations

log = logging.getLogger("kiln.server")

# (uid, spec, launch options, request limits) -> the endpoint that serves the model.
EndpointFactory = Callable[[str, Any, Any, Limits], ModelEndpoint]


@dataclass(frozen=True)
class EndpointKind:
    """How one kind of catalogue entry launches: its launch options' parser and the endpoint that serves it."""

    parse_options: Callable[[Any, Mapping[str, Any]], Any]
    factory: EndpointFactory


def _image_runner(uid: str, spec: ModelSpec, options: Any, limits: Limits) -> ModelEndpoint:
    """The image runner, imported when a model is launched here: torch stays out of a front that only routes
    (kiln.cluster's ingress)."""
    from kiln.engine.runner import Runner

    return Runner(uid, spec, options, limits)


# Catalogue entry type -> how it launches. A distributed front replaces the factories, nothing else.
ENDPOINT_KINDS: Mapping[type, EndpointKind] = {
    ModelSpec: EndpointKind(parse_launch_options, _image_runner),
    OcrSpec: EndpointKind(parse_ocr_options, lambda uid, spec, options, limits: OcrRunner(uid, spec, options)),
}
# Kiln's endpoint status -> Xinference's instance status (GET /v1/models/instances).
INSTANCE_STATUS: Mapping[str, str] = {"created": "CREATING", "loading": "LOADING", "ready": "READY",
                                      "failed": "ERROR", "stopped": "TERMINATED"}
ENDED_KEPT = 64  # instances that ended (terminated, cancelled, failed to launch) still listed, newest last
# Fields the xinference client sends on every launch -> the values Kiln can honour (None always can; the
# model's own engine is always accepted as model_engine). Its peft_model_config is a launch option
# (engine/lora_options.py).
CLIENT_FIELDS: Mapping[str, tuple[Any, ...]] = {
    "model_engine": (),
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
    "download_hub": (),
    "enable_thinking": (False,),
    "enable_virtual_env": (False,),
    "virtual_env_packages": ([],),
    "virtual_env_find_links": ([],),
    "envs": ({},),
}
# The fields that scale a model out: honoured by `kiln serve --ray` (kiln.cluster), refused here saying so.
SCALE_OUT_FIELDS = frozenset({"replica", "n_gpu", "gpu_idx", "worker_ip", "request_limits"})
_RAY_HINT = "; start the server with `kiln serve --ray local` (or --ray ADDRESS) to run replicas and place them on GPUs"


class ModelRegistry:
    """Endpoints by uid. All methods run on the event loop; blocking endpoint work goes to threads.

    `factories` overrides how a kind of catalogue entry is served (tests and benchmarks instrument the image
    runner this way); `limits` bound every request, and every endpoint checks with the same ones; `registrations`
    are the user-registered models (default: those persisted under Kiln's home folder)."""

    def __init__(self, factories: Mapping[type, EndpointFactory] | None = None, retry_after: int = 5,
                 limits: Limits = Limits(), registrations: Registrations | None = None):
        self.kinds = {spec_type: EndpointKind(kind.parse_options, (factories or {}).get(spec_type, kind.factory))
                      for spec_type, kind in ENDPOINT_KINDS.items()}
        self.retry_after = retry_after  # seconds, sent with 503 (loading) and 429 (queue full)
        self.limits = limits
        self.registrations = registrations if registrations is not None else Registrations()
        self._runners: dict[str, ModelEndpoint] = {}
        self._loads: dict[str, asyncio.Task] = {}
        self._load_status: dict[str, int] = {}  # uid -> the HTTP status of its load failure (400 or 500)
        self._ending: dict[str, ModelEndpoint] = {}  # being terminated (TERMINATING)
        self._ended: deque[dict[str, Any]] = deque(maxlen=ENDED_KEPT)
        self._retiring: set[asyncio.Task] = set()  # cancelled launches closing in the background

    # --- launch ---------------------------------------------------------------------------------------------
    async def launch(self, body: Mapping[str, Any], *, wait_ready: bool = True) -> str:
        """Start a model; with `wait_ready` return once it is loaded (a load error is raised and the uid
        freed), else at once (the load error is then reported by `describe` and by requests to it)."""
        uid, spec, options = self.parse_launch(body)
        runner = self.kinds[type(spec)].factory(uid, spec, options, self.limits)
        self._runners[uid] = runner
        load = asyncio.create_task(asyncio.to_thread(runner.load), name=f"kiln-load-{uid}")
        self._loads[uid] = load
        load.add_done_callback(lambda task: self._loaded(uid, task))
        if wait_ready:
            try:
                await asyncio.shield(load)
            except LaunchCancelled as error:
                raise ApiError(499, f"model {uid} ({spec.name}): launch cancelled", code="launch_cancelled") from error
            except Exception as error:  # noqa: BLE001 - any load fault is reported to the caller
                if self._runners.get(uid) is runner:
                    del self._runners[uid]
                    self._load_status.pop(uid, None)
                    self._ended.append(self._instance(runner, "ERROR"))
                raise ApiError(_load_status(error), f"model {uid} ({spec.name}) failed to load: {error}",
                               code="model_load_failed") from error
        return uid

    def parse_launch(self, body: Mapping[str, Any]) -> tuple[str, ModelSpec | OcrSpec, Any]:
        """Validate a launch body without side effects; raises ApiError(400) (or a LaunchOptionError, a 400 at
        the app's error boundary) naming the bad field."""
        if not isinstance(body, Mapping):
            raise bad_request("the launch body must be a JSON object")
        fields = dict(body)
        name = fields.pop("model_name", None)
        if not isinstance(name, str) or not name:
            raise bad_request("model_name is required (a catalogue model name)", "model_name", "missing_parameter")
        spec = self.spec(name)
        model_type = fields.pop("model_type", None)
        if model_type is not None and (not isinstance(model_type, str) or model_type.lower() != "image"):
            raise bad_request(f"model_type must be 'image' (Kiln serves image models), got {model_type!r}",
                              "model_type")
        uid = fields.pop("model_uid", None) or name
        if not isinstance(uid, str) or not NAME.match(uid):
            raise bad_request(
                f"model_uid {uid!r} must be 1-128 characters of letters, digits, '.', '_' or '-'", "model_uid"
            )
        if uid in self._runners:
            raise bad_request(f"model uid {uid!r} is already launched; terminate it first or pick another model_uid",
                              "model_uid", "model_exists")
        for field, honoured in CLIENT_FIELDS.items():
            honoured = (spec.engine,) if field == "model_engine" else honoured
            value = fields.pop(field, None)
            if value is not None and not any(_same(value, ok) for ok in honoured):
                accepted = ", ".join(["null", *(repr(ok) for ok in honoured)])
                hint = _RAY_HINT if field in SCALE_OUT_FIELDS else ""
                raise bad_request(f"{field}={value!r} is not supported by Kiln; accepted: {accepted}{hint}", field,
                                  "unsupported_option")
        return uid, spec, self.kinds[type(spec)].parse_options(spec, fields)

    def spec(self, name: str) -> ModelSpec | OcrSpec:
        """What `name` launches: a catalogue entry, or a registered model's spec (its folder read now); 400
        naming model_name (or model_uri) otherwise."""
        spec = CATALOGUE.get(name) or OCR_CATALOGUE.get(name)
        if spec is not None:
            return spec
        registration = self.registrations.get(name)
        if registration is None:
            raise bad_request(f"unknown model_name {name!r}; catalogue models: "
                              f"{', '.join([*CATALOGUE, *OCR_CATALOGUE])}; registered models: "
                              f"{', '.join(self.registrations) or 'none'}", "model_name", "model_not_found")
        return registration.spec()

    def _loaded(self, uid: str, task: asyncio.Task) -> None:
        if self._loads.get(uid) is task:
            del self._loads[uid]
        if not task.cancelled() and task.exception() is not None:
            log.warning("model %s failed to load: %s", uid, task.exception())
            self._load_status[uid] = _load_status(task.exception())
        heap.settle()

    # --- lookup ---------------------------------------------------------------------------------------------
    @property
    def uids(self) -> list[str]:
        return list(self._runners)

    def runners(self) -> list[ModelEndpoint]:
        return list(self._runners.values())

    def runner(self, uid: str) -> ModelEndpoint:
        """The runner for `uid` in any state; 404 listing the running uids."""
        runner = self._runners.get(uid)
        if runner is None:
            raise ApiError(404, f"model {uid!r} is not running; running model uids: {self.uids}",
                           param="model", code="model_not_found")
        return runner

    def ready(self, runner: ModelEndpoint) -> ModelEndpoint:
        """`runner` if it can take requests: 503 + Retry-After while loading; once its load task has failed, the
        load error as the launch would have answered it (400 for the user's mistake, 500 for a fault)."""
        failed = self._load_status.get(runner.uid)
        if failed is not None:
            raise ApiError(failed, f"model {runner.uid} failed to load: {runner.error}; terminate it "
                           f"(DELETE /v1/models/{runner.uid}) and launch it again", code="model_load_failed")
        if runner.status != "ready":  # created, loading, or failed an instant before its load task ended
            raise ApiError(503, f"model {runner.uid} is still loading; retry in a few seconds", code="model_loading",
                           headers={"Retry-After": str(self.retry_after)})
        return runner

    def pick(self, uid: str | None, ability: str) -> ModelEndpoint:
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

    def request_progress(self, request_id: str) -> float | None:
        """The progress of a request id (newest model first), None when no model knows it."""
        for runner in reversed(self._runners.values()):
            progress = runner.progress(request_id)
            if progress is not None:
                return progress
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
            "replica": 1,
            "status": runner.status,
            "error": runner.error,
            **runner.describe(),
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(uid) for uid in self._runners]

    async def scale(self, uid: str, replicas: Any) -> None:
        """`POST /v1/models/{uid}/replicas`: one process serves each model here; kiln.cluster's registry scales."""
        self.runner(uid)
        raise bad_request(f"this server runs model {uid} in one process, so its replica count cannot change"
                          f"{_RAY_HINT}", "replica", "unsupported_option")

    # --- instances and launches (Xinference's model routes) -----------------------------------------------
    def _instance(self, runner: ModelEndpoint, status: str | None = None) -> dict[str, Any]:
        """Xinference's instance record of one model."""
        status = status or INSTANCE_STATUS.get(runner.status, "ERROR")
        return {"model_name": runner.spec.name, "model_uid": runner.uid, "model_version": None,
                "model_ability": list(runner.spec.abilities), "replica": 1, "status": status,
                "instance_created_ts": runner.created, "n_worker": 1,
                "replica_statuses": [{"replica_id": f"{runner.uid}-0", "status": status}], "error": runner.error}

    def instances(self, model_name: str | None = None, model_uid: str | None = None) -> list[dict[str, Any]]:
        """Ended instances (oldest first), then those being terminated, then the running ones, filtered."""
        records = [*self._ended, *(self._instance(r, "TERMINATING") for r in self._ending.values()),
                   *(self._instance(r) for r in self._runners.values())]
        return [record for record in records if (model_name is None or record["model_name"] == model_name)
                and (model_uid is None or record["model_uid"] == model_uid)]

    def launch_progress(self, uid: str) -> float:
        """0..1: the load stages done (1.0 once ready); 404 for a uid not launched."""
        return float(self.runner(uid).load_progress)

    def cancel(self, uid: str) -> None:
        """Stop a launch under way at its next load stage and free its uid now; 400 when it is not launching."""
        runner = self.runner(uid)
        if not runner.cancel_load():
            raise bad_request(f"model {uid} is not launching (status: {runner.status}); terminate it instead "
                              f"(DELETE /v1/models/{uid})", "model_uid", "not_launching")
        task = asyncio.create_task(self._retire(uid, runner, "TERMINATED"))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- termination ----------------------------------------------------------------------------------------
    async def terminate(self, uid: str) -> None:
        """Remove the model now (new requests get 404); its waiting and running requests fail with 409."""
        await self._retire(uid, self.runner(uid), "TERMINATED")

    async def _retire(self, uid: str, runner: ModelEndpoint, status: str) -> None:
        """Take `uid` out of service now, wait for a load under way to end (a cancelled one stops at its next
        stage), close the model, and keep its instance record."""
        del self._runners[uid]
        self._load_status.pop(uid, None)
        self._ending[uid] = runner
        try:
            load = self._loads.get(uid)
            if load is not None:
                await asyncio.wait({load})  # a load stage cannot be interrupted; close once it is done
            await asyncio.to_thread(runner.close)
        finally:
            del self._ending[uid]
            self._ended.append(self._instance(runner, status))
        del runner
        heap.settle()

    async def close(self) -> None:
        """Terminate every model (at shutdown), and wait for cancelled launches to close."""
        await asyncio.gather(*(self.terminate(uid) for uid in self.uids), *self._retiring, return_exceptions=True)


def _load_status(error: BaseException) -> int:
    """A load error's HTTP status: what the user can fix (weights not found, an option this machine cannot
    honour) is a 400; anything else is a fault of Kiln's (500)."""
    return 400 if isinstance(error, (ModelLoadError, ValueError)) else 500


def _same(value: Any, accepted: Any) -> bool:
    if isinstance(accepted, str) and isinstance(value, str):
        return value.lower() == accepted.lower()
    return type(value) is type(accepted) and value == accepted

