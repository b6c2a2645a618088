"""One Serve replica: one Kiln runner (image or OCR), the ModelEndpoint it implements, served over handles.

The replica's event loop only awaits; the runner's own thread does all model work, as in single-process Kiln.
Each request is a stream of events (`wire`): accepted, progress (at most every PROGRESS_SECONDS), partial
previews, then done or error. When the front cancels the stream (an abort, a client that left, a terminate),
Serve cancels this generator and the request leaves its batch at the next step.

Every REPORT_SECONDS the replica tells the ingress who it is (id, pid, node), its status, its resident LoRAs and
its stats, which feed `GET /v1/models/{uid}` and `/metrics`; its routing stats (pending work, open lanes, LoRAs)
feed `routing.KilnRouter`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any, AsyncIterator

from .health import StallWatch, Unhealthy
from .placement import device_for, placement_from
from .wire import error_event, image_request, lane_of, lora_set_names, pack_image, request_work

log = logging.getLogger("kiln.cluster")

INGRESS_APP = "kiln"
INGRESS_DEPLOYMENT = "KilnIngress"
PROGRESS_SECONDS = 0.25
REPORT_SECONDS = 1.0


class KilnModel:
    """The deployment class of every launched model (`front.ReplicaSet` deploys it, one application per uid)."""

    async def __init__(self, uid: str, spec_name: str, options: Any, limits: Any, placement: dict, threads: int | None):
        import ray
        from ray import serve

        from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE
        from kiln.server.registry import ENDPOINT_KINDS

        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self.pid = os.getpid()
        self.node = ray.util.get_node_ip_address()
        spec = CATALOGUE.get(spec_name) or OCR_CATALOGUE[spec_name]
        device = device_for(placement_from(placement), context.rank.rank)
        if device is not None:
            options = dataclasses.replace(options, device=device)
        self.endpoint = ENDPOINT_KINDS[type(spec)].factory(uid, spec, options, limits)
        if threads and "torch" in sys.modules:  # the image runner imported it; OCR on onnxruntime does not
            sys.modules["torch"].set_num_threads(threads)
        self.health = StallWatch(self.endpoint)
        self._pending: dict[str, tuple[float, list[int], list[str], Any]] = {}  # id -> (work, lane, LoRAs, handle)
        self._ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=INGRESS_APP)
        self._reporter = asyncio.create_task(self._report_forever())
        await asyncio.to_thread(self.endpoint.load)

    # --- requests ---------------------------------------------------------------------------------------------
    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        """One image request's events."""
        request = image_request(payload)
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()

        def on_preview(index: int, number: int, image) -> None:  # the scheduler thread
            loop.call_soon_threadsafe(previews.put_nowait, (index, number, pack_image(image)))

        async for event in self._run(request, payload, previews, on_preview if request.preview_count else None):
            yield event

    async def ocr(self, payload: dict) -> AsyncIterator[dict]:
        """One OCR request's events (an image document; see front.ReplicaSet.submit)."""
        from kiln.engine.ocr import OcrRequest
        from kiln.engine.ocr.document import ImageDocument

        from .wire import unpack_image

        request = OcrRequest(ImageDocument(unpack_image(payload["image"])), payload["params"], payload["request_id"])
        async for event in self._run(request, None, asyncio.Queue(), None):
            yield event

    async def _run(self, request: Any, payload: dict | None, previews: asyncio.Queue, on_preview) -> AsyncIterator[dict]:
        from ray import serve

        loop = asyncio.get_running_loop()
        try:
            handle = self.endpoint.submit(request, on_preview) if on_preview else self.endpoint.submit(request)
        except Exception as error:  # noqa: BLE001 - refused: InvalidRequest, QueueFull, not ready
            yield error_event(error)
            return
        work = request_work(payload) if payload else 1.0
        loras = lora_set_names(serve.get_multiplexed_model_id())  # the front's request_lora_set
        self._pending[request.request_id] = (work, lane_of(payload) if payload else [], loras, handle)
        handle.future.add_done_callback(lambda _: loop.call_soon_threadsafe(previews.put_nowait, None))
        try:
            yield {"type": "accepted", "replica": self.replica_id, "pid": self.pid, "node": self.node}
            shown = -1.0
            while True:
                try:
                    item = await asyncio.wait_for(previews.get(), PROGRESS_SECONDS)
                except TimeoutError:
                    item = ()
                if handle.progress != shown and not handle.future.done():
                    shown = handle.progress
                    yield {"type": "progress", "value": shown}
                if item is None:
                    break
                if item:
                    index, number, image = item
                    yield {"type": "partial", "index": index, "number": number, "image": image}
            try:
                result = handle.future.result()
            except Exception as error:  # noqa: BLE001 - the request's own failure, sent to the front
                yield error_event(error)
                return
            yield {"type": "done", "result": await asyncio.to_thread(_pack_result, result)}
        finally:
            self._pending.pop(request.request_id, None)
            if not handle.future.done():  # the front went away: cancelled, aborted, or the client left
                self.endpoint.abort(request.request_id)

    # --- what Serve asks ----------------------------------------------------------------------------------------
    def check_health(self) -> None:
        self.health.check()

    def record_routing_stats(self) -> dict[str, Any]:
        """Pending work (images x steps x pixels, less what is done), the lanes with room to join, the LoRAs
        resident in slots or wanted by a request held here (it is admitted once they are in slots), and the ids
        of the requests held (what the router's bookings are checked against)."""
        pending, lanes, loras = 0.0, set(), set(self._resident_loras())
        for work, lane, wanted, handle in list(self._pending.values()):
            pending += work * (1.0 - handle.progress)
            loras.update(wanted)
            if lane:
                lanes.add(tuple(lane))
        batch = self.endpoint.max_batch_size if self.endpoint.status == "ready" else None
        stats = self.endpoint.stats() if self.endpoint.status == "ready" else None
        has_room = batch is None or stats is None or stats.active_jobs < batch
        return {"pending_work": pending, "open_lanes": sorted(lanes) if has_room else [], "loras": sorted(loras),
                "requests": list(self._pending), "at": time.time()}

    def _resident_loras(self) -> list[str]:
        return getattr(self.endpoint, "resident_loras", [])  # OCR runners hold none

    # --- reports to the ingress ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        endpoint = self.endpoint
        ready, status = endpoint.status == "ready", endpoint.status
        if ready:
            try:
                self.health.check()
            except Unhealthy as error:
                status = f"unhealthy: {error}"
        return {
            "uid": endpoint.uid, "replica": self.replica_id, "pid": self.pid, "node": self.node, "status": status,
            "loras": self._resident_loras(),
            "error": endpoint.error, "stats": dataclasses.asdict(endpoint.stats()) if ready else None,
            "describe": endpoint.describe() if ready else None, "at": time.time(),
        }

    async def _report_forever(self) -> None:
        warned = False
        while True:
            try:
                await self._ingress.report.remote(self.report())
            except Exception as error:  # noqa: BLE001 - no ingress yet, or it is restarting: try again
                if not warned:
                    log.warning("replica %s cannot report to the ingress: %s", self.replica_id, error)
                    warned = True
            await asyncio.sleep(REPORT_SECONDS)

    async def __del__(self) -> None:
        self._reporter.cancel()
        await asyncio.to_thread(self.endpoint.close)


def _pack_result(result: Any) -> Any:
    """Images (a list of GeneratedImage) as raw pixels with their seeds; OCR bodies are plain JSON already."""
    if isinstance(result, list) and result and hasattr(result[0], "seed"):
        return [{"image": pack_image(item.image), "seed": item.seed} for item in result]
    return result
