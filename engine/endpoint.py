"""The surface a launched model shows the server: the `ModelEndpoint` protocol.

The image runner and the OCR runner implement it, and so will a replica set behind Ray Serve: the registry, the
routes and `/metrics` are typed against it and never ask which kind of model they hold. Everything it returns is
plain data (a description dict, an `EndpointStats` snapshot, progress as a float), so it can cross a process
boundary; `submit` returns a handle with a concurrent `Future` of the result, `progress` and `cancel()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable


@dataclass(frozen=True)
class EndpointStats:
    """One endpoint's figures at one moment, for /metrics. Counters only grow; the first two are gauges."""

    queue_depth: int = 0  # images (OCR: pages) waiting for admission
    active_jobs: int = 0  # images (OCR: pages) being worked on
    images_generated: int = 0
    requests_failed: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0
    forward_rows: Mapping[int, int] = field(default_factory=dict)  # rows per forward -> how many forwards
    extra: tuple[tuple[str, str, float], ...] = ()  # (metric name, help, value) from the model's parts (LoRA)


@runtime_checkable
class ModelEndpoint(Protocol):
    """One launched model (a model uid). Status goes created -> loading -> ready | failed, then stopped (also
    when its launch is cancelled)."""

    uid: str
    spec: Any  # the catalogue entry: ModelSpec or OcrSpec
    options: Any  # its validated launch options
    status: str
    error: str | None
    created: int

    def load(self) -> None:
        """Load the weights and start taking requests (blocks; the registry runs it in a thread)."""

    @property
    def load_progress(self) -> float:
        """0..1: how much of the load is done (1.0 once ready)."""

    def cancel_load(self) -> bool:
        """Stop a load under way at its next stage (`load` then raises LaunchCancelled); False when not loading."""

    def close(self) -> None:
        """Stop; requests still waiting or running fail with RequestAborted."""

    def submit(self, request: Any, on_preview: Callable[..., None] | None = None) -> Any:
        """Queue a request: a handle with `future`, `progress` and `cancel()`; raises InvalidRequest or
        QueueFull, and nothing is queued then."""

    def abort(self, request_id: str) -> str:
        """Xinference's abort answer: DONE, NO_OP (already finished) or NOT_FOUND."""

    def progress(self, request_id: str) -> float | None:
        """0..1 for a request it knows (1.0 once ended), None for one it does not."""

    def describe(self) -> dict[str, Any]:
        """What this endpoint adds to `GET /v1/models/{uid}` (engine, launch options, batch bound, backend...)."""

    def stats(self) -> EndpointStats:
        """A snapshot of its figures."""
