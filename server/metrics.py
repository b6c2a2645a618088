"""`GET /metrics` in Prometheus text format, and the middleware that times image requests.

Per model (label `model`, the uid): queue depth, active jobs, images generated, failed requests, denoising
steps and their time, and a histogram of rows per denoiser forward (the batch size the scheduler achieved).
A model served by replicas (`kiln serve --ray`) gives one sample per replica instead (labels `model`, `replica`;
sum them for the model), and `kiln_replica_info{model_uid, replica, pid, node}` says where each runs.
Per image endpoint (labels `endpoint`, `status`): request latency, measured until the last body byte is sent,
so streamed responses count in full.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.engine.endpoint import EndpointStats, ModelEndpoint

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
IMAGE_ENDPOINTS = {
    "/v1/images/generations": "generations",
    "/v1/images/variations": "variations",
    "/v1/images/inpainting": "inpainting",
    "/v1/images/edits": "edits",
    "/v1/images/ocr": "ocr",
}


class Histogram:
    """Cumulative-bucket histogram as Prometheus wants it."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {running}")
        return out


class RequestLatency:
    """Latency histograms per (endpoint, status); written on the event loop only."""

    def __init__(self) -> None:
        self.histograms: dict[tuple[str, int], Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.histograms[(endpoint, status)].observe(seconds)


class LatencyMiddleware:
    """Times requests to the image endpoints from arrival to the last byte of the response."""

    def __init__(self, app: ASGIApp, latency: RequestLatency):
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = IMAGE_ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.latency.observe(endpoint, status, time.perf_counter() - started)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@runtime_checkable
class Replicated(Protocol):
    """An endpoint whose work runs on several replicas (kiln.cluster): its figures are labelled per replica."""

    def replica_stats(self) -> list[tuple[Mapping[str, Any], EndpointStats]]:
        """(report with `replica`, `pid`, `node`; its stats) for each live replica."""


def _samples(endpoint: ModelEndpoint) -> list[tuple[str, EndpointStats, Mapping[str, Any] | None]]:
    """(labels, stats, replica report or None) for one endpoint: one sample, or one per replica."""
    model = f'model="{_escape(endpoint.uid)}"'
    if isinstance(endpoint, Replicated):
        return [(f'{model},replica="{_escape(report["replica"])}"', stats, report)
                for report, stats in endpoint.replica_stats()]
    return [(model, endpoint.stats(), None)]


def render(endpoints: Iterable[ModelEndpoint], latency: RequestLatency, stored_files: int) -> str:
    """The whole exposition, one metric family at a time."""
    endpoints = list(endpoints)
    models = [sample for endpoint in endpoints for sample in _samples(endpoint)]
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    def per_model(value) -> list[str]:
        return [f"{{{labels}}} {value(stats)}" for labels, stats, _ in models]

    family("kiln_model_ready", "gauge", "1 when the model takes requests.",
           [f'kiln_model_ready{{model="{_escape(e.uid)}"}} {int(e.status == "ready")}' for e in endpoints])
    gauges = (
        ("kiln_queue_depth", "Images waiting for admission to a batch.", lambda s: s.queue_depth),
        ("kiln_active_jobs", "Images being denoised now.", lambda s: s.active_jobs),
    )
    for name, help_text, value in gauges:
        family(name, "gauge", help_text, [name + sample for sample in per_model(value)])
    replicas = [report for _, _, report in models if report is not None]
    if replicas:
        family("kiln_replica_info", "gauge", "A live replica of a model: its process and node.", [
            f'kiln_replica_info{{model_uid="{_escape(report["uid"])}",replica="{_escape(report["replica"])}",'
            f'pid="{report["pid"]}",node="{_escape(report["node"])}"}} 1' for report in replicas])
    counters = (
        ("kiln_images_generated_total", "Images finished.", lambda s: s.images_generated),
        ("kiln_requests_failed_total", "Requests that failed or were cancelled.", lambda s: s.requests_failed),
        ("kiln_steps_total", "Denoising steps (one batched forward per lane each).", lambda s: s.steps),
        ("kiln_step_seconds_total", "Time spent in denoising steps.", lambda s: s.step_seconds),
        ("kiln_forward_seconds_total", "Time spent in denoiser forwards.", lambda s: s.forward_seconds),
    )
    for name, help_text, value in counters:
        family(name, "counter", help_text, [name + sample for sample in per_model(value)])

    extra: dict[str, tuple[str, list[str]]] = {}  # what parts add (LoRA residency), one family per name
    for labels, stats, _ in models:
        for name, help_text, value in stats.extra:
            extra.setdefault(name, (help_text, []))[1].append(f"{name}{{{labels}}} {value}")
    for name, (help_text, samples) in extra.items():
        family(name, "counter" if name.endswith("_total") else "gauge", help_text, samples)

    rows_lines = []
    for labels, stats, _ in models:
        histogram = Histogram(ROWS_BUCKETS)
        for rows, count in sorted(stats.forward_rows.items()):
            histogram.observe(rows, count)
        rows_lines += histogram.lines("kiln_forward_rows", labels)
    family("kiln_forward_rows", "histogram", "Rows per denoiser forward (batch size; CFG jobs count two).",
           rows_lines)

    latency_lines = []
    for (endpoint, status), histogram in sorted(latency.histograms.items()):
        latency_lines += histogram.lines("kiln_request_duration_seconds", f'endpoint="{endpoint}",status="{status}"')
    family("kiln_request_duration_seconds", "histogram", "Image request latency, to the last response byte.",
           latency_lines)
    family("kiln_stored_images", "gauge", "Images held for url responses.", [f"kiln_stored_images {stored_files}"])
    return "\n".join(lines) + "\n"
