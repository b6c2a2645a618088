"""The front's side of a launched model: a `ModelEndpoint` whose work runs on a Serve deployment's replicas.

`RayModelRegistry` is the single-process `ModelRegistry` with two changes: it accepts the scale-out launch fields
(`placement`), and it serves every catalogue entry through a `ReplicaSet`. Routes, error shapes and clients are
therefore unchanged. A `ReplicaSet` deploys application `kiln-m-<uid>` (one `replica.KilnModel` per replica),
submits each request as a stream of events, and keeps what the routes read locally: each request's progress (fed
by its stream), the abort that cancels the stream (Serve cascades it to the replica), and the replicas' reports.

A replica that dies under a request: a request that had delivered nothing to its client is sent once more (the
seeds were drawn before dispatch, so it gives the same images on another replica); a stream that had already
sent a partial image ends with an `error` event. Requests still queued in Serve's router go elsewhere by
themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

from kiln.engine.catalogue import ModelSpec, OcrSpec
from kiln.engine.endpoint import EndpointStats
from kiln.engine.errors import EngineError, InvalidRequest, ModelLoadError, QueueFull, RequestAborted
from kiln.engine.requests import GeneratedImage, RequestBook
from kiln.server.errors import bad_request
from kiln.server.registry import ModelRegistry

from .placement import ClusterView, Placement, deployment_options, parse_placement
from .wire import pack_image, raise_error, request_lora_set, request_payload, unpack_image

log = logging.getLogger("kiln.cluster")

APP_PREFIX = "kiln-m-"
REPORT_TTL_S = 5.0  # a replica silent this long is gone (it reports every second)


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How the front places replicas: CPUs reserved per replica (fractions are fine) and torch threads in each."""

    cpus_per_replica: float = 1.0
    threads: int | None = None


@dataclasses.dataclass(frozen=True)
class ScaledOptions:
    """A model's launch options and where its replicas run."""

    launch: Any
    placement: Placement


def should_retry(attempts: int, delivered: bool) -> bool:
    """A request whose replica died is sent again once, and only if its client has received nothing yet."""
    return attempts == 0 and not delivered


class RemoteHandle:
    """The front's view of one request on some replica: a concurrent Future of its result, progress, cancel()."""

    def __init__(self, request: Any, payload: dict, on_preview: Callable | None, to_result: Callable[[Any], Any]):
        self.request = request
        self.payload = payload
        self.on_preview = on_preview
        self.to_result = to_result
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.replica: str | None = None
        self.delivered = False  # a partial image went to the client: a retry could not undo it
        self.task: concurrent.futures.Future | None = None
        self._progress = 0.0

    @property
    def progress(self) -> float:
        return 1.0 if self.future.done() else self._progress

    def cancel(self) -> bool:
        """End the request now with RequestAborted and cancel its stream. False if it had already ended."""
        if not self.fail(RequestAborted(f"The request has been cancelled: {self.request.request_id}")):
            return False
        if self.task is not None:
            self.task.cancel()
        return True

    def fail(self, error: BaseException) -> bool:
        try:
            self.future.set_exception(error)
            return True
        except concurrent.futures.InvalidStateError:
            return False

    def apply(self, event: dict) -> bool:
        """Take one event from the replica; True once the request has ended."""
        kind = event["type"]
        if kind == "accepted":
            self.replica = event["replica"]
        elif kind == "progress":
            self._progress = event["value"]
        elif kind == "partial" and self.on_preview is not None:
            self.delivered = True
            self.on_preview(event["index"], event["number"], unpack_image(event["image"]))
        elif kind == "done":
            if not self.future.done():
                self.future.set_result(self.to_result(event["result"]))
            return True
        elif kind == "error":
            self.fail(raise_error(event))
            return True
        return False


class ReplicaSet:
    """One launched model on Serve (the ModelEndpoint protocol, front side). `load` and `close` block."""

    def __init__(self, uid: str, spec: ModelSpec | OcrSpec, options: ScaledOptions, limits: Any,
                 settings: ClusterSettings):
        self.uid = uid
        self.spec = spec
        self.options = options.launch
        self.placement = options.placement
        self.limits = limits
        self.settings = settings
        self.status = "created"
        self.error: str | None = None
        self.created = int(time.time())
        self.app_name = APP_PREFIX + uid
        self._loop = asyncio.get_running_loop()  # the registry creates endpoints on the event loop
        self._handle: Any = None
        self._requests = RequestBook()
        self._in_flight: set[RemoteHandle] = set()
        self._reports: dict[str, dict] = {}

    # --- lifecycle ------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Deploy the model's application and wait until its replicas run (Serve raises if they cannot load)."""
        from ray import serve

        self.status = "loading"
        try:
            serve.run(self._application(self.placement), name=self.app_name, route_prefix=None)
        except Exception as error:  # noqa: BLE001 - a replica that cannot load fails the launch
            self.status, self.error = "failed", _deploy_failure(self.app_name, error)
            _delete(self.app_name)
            raise ModelLoadError(self.error) from None
        self._handle = serve.get_deployment_handle("KilnModel", app_name=self.app_name)
        self.status = "ready"

    def scale(self, replicas: int) -> None:
        """Change the replica count in place: Serve starts or stops replicas and restarts none of the others."""
        from ray import serve

        placement = dataclasses.replace(self.placement, replicas=replicas)
        serve.run(self._application(placement), name=self.app_name, route_prefix=None)
        self.placement = placement

    def close(self) -> None:
        """Fail every request (409) and remove every replica."""
        for handle in list(self._in_flight):
            self._loop.call_soon_threadsafe(handle.cancel)
        self._requests.fail_all(RequestAborted(f"model {self.uid} was terminated"))
        _delete(self.app_name)
        self.status = "stopped"

    def _application(self, placement: Placement) -> Any:
        from ray.serve.config import RequestRouterConfig

        from .placement import ROUTING_STATS_PERIOD_S
        from .replica import KilnModel
        from .routing import KilnRouter

        from ray import serve

        # A fixed version makes a changed replica count an in-place update: without one, every serve.run draws a
        # random version and Serve restarts every replica. Ray 2.60 keeps `version` for internal callers only;
        # tests/cluster/test_ray_serve.py's scaling test is the contract test for it.
        deployment = serve.deployment(KilnModel).options(
            name="KilnModel", version=f"{self.uid}-{self.created}", _internal=True,
            request_router_config=RequestRouterConfig(request_router_class=KilnRouter,
                                                      request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
            **deployment_options(placement, self.settings.cpus_per_replica),
        )
        return deployment.bind(self.uid, self.spec.name, self.options, self.limits, placement.describe(),
                               self.settings.threads)

    # --- requests -------------------------------------------------------------------------------------------
    def submit(self, request: Any, on_preview: Callable | None = None) -> RemoteHandle:
        """Send a request to a replica; QueueFull past `request_limits` per replica."""
        if self.status != "ready":
            raise EngineError(f"model {self.uid} is not ready (status: {self.status})")
        bound = self.placement.request_limits
        if bound is not None and len(self._in_flight) >= bound * self.placement.replicas:
            raise QueueFull(f"model {self.uid} has {len(self._in_flight)} requests in flight, the bound set by "
                            f"request_limits={bound} per replica; retry shortly")
        if isinstance(self.spec, OcrSpec):
            handle = RemoteHandle(request, _ocr_payload(request), None, lambda body: body)
            method, lora_set = "ocr", ""
        else:
            lora_set = request_lora_set(request, self.options)
            handle = RemoteHandle(request, request_payload(request), on_preview, _images)
            method = "generate"
        self._requests.add(request.request_id, handle)
        self._in_flight.add(handle)
        handle.future.add_done_callback(lambda _: self._in_flight.discard(handle))
        handle.task = asyncio.run_coroutine_threadsafe(self._dispatch(handle, method, lora_set), self._loop)
        return handle

    async def _dispatch(self, handle: RemoteHandle, method: str, lora_set: str) -> None:
        """Stream the request's events from a replica; its LoRA set is the Serve multiplexed model id, which
        routing.KilnRouter ranks replicas by."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        attempts = 0
        while not handle.future.done():
            options = self._handle.options(stream=True, multiplexed_model_id=lora_set)
            stream = getattr(options, method).remote(handle.payload)
            try:
                async for event in stream:
                    if handle.apply(event):
                        return
                handle.fail(EngineError(f"replica {handle.replica} ended request {handle.request.request_id} "
                                        f"without a result"))
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except RayActorError as error:
                if not should_retry(attempts, handle.delivered):
                    handle.fail(EngineError(f"replica {handle.replica} of model {self.uid} died during request "
                                            f"{handle.request.request_id}: {type(error).__name__}"))
                    return
                log.warning("replica %s of %s died; sending request %s again", handle.replica, self.uid,
                            handle.request.request_id)
                attempts += 1
            except BackPressureError as error:
                handle.fail(QueueFull(f"model {self.uid}: {error}"))
            except Exception as error:  # noqa: BLE001 - any other transport fault fails this request only
                log.warning("request %s failed in transport: %r", handle.request.request_id, error)
                handle.fail(EngineError(f"{type(error).__name__}: {error}"))

    def abort(self, request_id: str) -> str:
        handle = self._requests.get(request_id)
        if handle is None:
            return "NOT_FOUND"
        return "DONE" if handle.cancel() else "NO_OP"

    def progress(self, request_id: str) -> float | None:
        handle = self._requests.get(request_id)
        return None if handle is None else handle.progress

    # --- what the replicas report ---------------------------------------------------------------------------
    def receive(self, report: dict) -> None:
        self._reports[report["replica"]] = report

    def replica_reports(self) -> list[dict]:
        """The replicas heard from in the last REPORT_TTL_S, oldest first."""
        horizon = time.time() - REPORT_TTL_S
        for replica, report in list(self._reports.items()):
            if report["at"] < horizon:
                del self._reports[replica]
        return sorted(self._reports.values(), key=lambda report: report["replica"])

    def describe(self) -> dict[str, Any]:
        """One replica's description of the engine (they are launched alike), the model's resident LoRAs being
        those of every replica, and each replica's own."""
        reports = self.replica_reports()
        engine = next((report["describe"] for report in reports if report["describe"]), {})
        if "resident" in (engine.get("lora") or {}):  # per-row LoRAs (None: no LoRA part in use)
            resident = sorted({name for report in reports for name in report["loras"]})
            engine = {**engine, "lora": {**engine["lora"], "resident": resident}}
        replicas = [{key: report[key] for key in ("pid", "node", "status", "loras")} | {"id": report["replica"]}
                    for report in reports]
        return {**engine, "replica": self.placement.replicas, "replicas": replicas,
                "placement": self.placement.describe(), "serve_application": self.app_name}

    def replica_stats(self) -> list[tuple[dict, EndpointStats]]:
        """Each live replica's report and its figures (for /metrics, labelled by replica)."""
        return [(report, _stats(report["stats"])) for report in self.replica_reports() if report["stats"]]

    def stats(self) -> EndpointStats:
        """The sum over live replicas (the parts' figures, such as resident LoRAs, summed by name)."""
        total: dict[str, Any] = {}
        extra: dict[str, tuple[str, float]] = {}
        for _, stats in self.replica_stats():
            for key, value in dataclasses.asdict(stats).items():
                if key == "forward_rows":
                    rows = total.setdefault(key, {})
                    for size, count in value.items():
                        rows[size] = rows.get(size, 0) + count
                elif key == "extra":
                    for name, help_text, figure in value:
                        extra[name] = (help_text, extra.get(name, (help_text, 0))[1] + figure)
                else:
                    total[key] = total.get(key, 0) + value
        return EndpointStats(**total, extra=tuple((name, *figures) for name, figures in extra.items()))


class RayModelRegistry(ModelRegistry):
    """A ModelRegistry whose models run as Serve deployments, with Xinference's scale-out fields honoured."""

    def __init__(self, settings: ClusterSettings = ClusterSettings(), **kwargs: Any):
        factory = lambda uid, spec, options, limits: ReplicaSet(uid, spec, options, limits, settings)  # noqa: E731
        super().__init__(factories={ModelSpec: factory, OcrSpec: factory}, **kwargs)

    def parse_launch(self, body: Mapping[str, Any]) -> tuple[str, Any, Any]:
        if not isinstance(body, Mapping):
            raise bad_request("the launch body must be a JSON object")
        fields = dict(body)
        placement = parse_placement(fields, cluster_view())
        uid, spec, options = super().parse_launch(fields)
        return uid, spec, ScaledOptions(options, placement)

    async def scale(self, uid: str, replicas: Any) -> None:
        endpoint = self.ready(self.runner(uid))
        count = parse_placement({"replica": replicas}, cluster_view()).replicas
        await asyncio.to_thread(endpoint.scale, count)

    def receive(self, report: dict) -> None:
        """A replica's report (see replica.KilnModel.report); reports of unknown uids are dropped."""
        endpoint = self._runners.get(report["uid"])
        if isinstance(endpoint, ReplicaSet):
            endpoint.receive(report)


def cluster_view() -> ClusterView:
    import ray

    nodes = tuple(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"])
    return ClusterView(nodes, float(ray.cluster_resources().get("GPU", 0)))


def _images(result: list[dict]) -> list[GeneratedImage]:
    return [GeneratedImage(unpack_image(item["image"]), item["seed"]) for item in result]


def _stats(raw: dict) -> EndpointStats:
    return EndpointStats(**{**raw, "forward_rows": {int(k): v for k, v in raw["forward_rows"].items()}})


def _ocr_payload(request: Any) -> dict:
    """An OCR request as plain data. An image document travels as its pixels; PDFs are refused for now (their
    pages are rendered lazily from a pdfium handle, which cannot cross processes)."""
    document = request.document
    try:
        if document.is_pdf:
            raise InvalidRequest("PDF uploads are not read by OCR models served on Ray yet; send page images",
                                 "image")
        return {"image": pack_image(document.render(0)), "params": request.params, "request_id": request.request_id}
    finally:
        document.close()


def _deploy_failure(app_name: str, error: Exception) -> str:
    """Why a deployment failed: serve.run's error only names the deployment; the reason (the replica
    constructor's traceback) is in the deployment's status message, whose last line is the exception."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
        messages = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # noqa: BLE001 - Serve unreachable: say what serve.run said
        messages = []
    lines = [line.strip() for line in (messages[0] if messages else str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else str(error)


def _delete(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as error:  # noqa: BLE001 - already gone, or Serve is shutting down
        log.warning("could not delete Serve application %s: %s", app_name, error)
