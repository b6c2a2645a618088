"""What the image and OCR runners share: a launched model's status, the one thread that does its work, the
requests it answers for by id (progress, abort), its counters, and the parts of the `ModelEndpoint` protocol
(engine/endpoint.py) that do not depend on what the model does."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .endpoint import EndpointStats
from .errors import LaunchCancelled, RequestAborted
from .openmp import release_thread_pool
from .requests import RequestBook


@dataclass
class Counters:
    """What /metrics counts per model; written by the worker thread only."""

    images_generated: int = 0  # OCR: pages read
    requests_failed: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    forward_rows: Counter = field(default_factory=Counter)  # rows per forward (OCR: crops per recognition)
    forward_seconds: float = 0.0

    def record_forward(self, rows: int, seconds: float) -> None:
        self.forward_rows[rows] += 1
        self.forward_seconds += seconds

    def record_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_seconds += seconds


class ModelWorker:
    """The lifecycle of one launched model: created -> loading -> ready | failed; stopped after close().

    Subclasses provide `_loop` (the worker thread's body, until `_stopping` is set), `_wake` (make a waiting
    loop look again), `_drop_waiting` (forget queued work at close), `queue_depth`, `active_jobs` and
    `max_batch_size`, and may add to `describe()`."""

    thread_name = "kiln-worker"

    def __init__(self, uid: str, spec: Any, options: Any):
        self.uid = uid
        self.spec = spec
        self.options = options
        self.counters = Counters()
        self.status = "created"
        self.error: str | None = None
        self.created = int(time.time())
        self._requests = RequestBook()
        self._load_progress = 0.0
        self._cancelled = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- launch progress and cancellation -------------------------------------------------------------------
    @property
    def load_progress(self) -> float:
        """0..1: the load stages done (1.0 once ready)."""
        return self._load_progress

    def report_load(self, fraction: float) -> None:
        """Called by the load between its stages: records progress, and stops a cancelled launch there (a stage
        itself, reading weights, cannot be interrupted)."""
        if self._cancelled.is_set():
            raise LaunchCancelled(f"the launch of {self.uid} was cancelled")
        self._load_progress = max(self._load_progress, min(1.0, fraction))

    def cancel_load(self) -> bool:
        """Ask a launch still under way to stop at its next stage; False once it is ready, failed or stopped."""
        if self.status not in ("created", "loading"):
            return False
        self._cancelled.set()
        return True

    def _load_and_start(self, load: Callable[[], None], start: bool) -> None:
        """Run `load` (recording its error, which is raised), then start the worker thread unless start=False,
        in which case the caller drives the work with `iterate()` (tests choose what runs together)."""
        self.status = "loading"
        try:
            load()
            self.report_load(1.0)
        except LaunchCancelled:
            self.status = "stopped"
            raise
        except Exception as error:
            self.status, self.error = "failed", str(error)
            raise
        finally:
            release_thread_pool()  # the loading thread (a server pool thread) will not run this model
        if start:
            self._thread = threading.Thread(target=self._loop, name=f"{self.thread_name}-{self.uid}", daemon=True)
            self._thread.start()
        self.status = "ready"

    def close(self) -> None:
        """Stop the thread; requests still waiting or running fail with RequestAborted."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._drop_waiting()
        self._requests.fail_all(RequestAborted(f"model {self.uid} was terminated"))
        self.status = "stopped"

    @property
    def worker_alive(self) -> bool:
        """False once the worker thread has died without being stopped (a replica's health check reads it)."""
        return self._thread is None or self._thread.is_alive() or self._stopping.is_set()

    # --- the ModelEndpoint doors that every model has alike -------------------------------------------------
    def get(self, request_id: str) -> Any | None:
        """The handle of a request this model knows (running, or finished a short while ago)."""
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> str:
        """Xinference's abort answer: DONE (cancelled), NO_OP (already finished) or NOT_FOUND."""
        handle = self.get(request_id)
        if handle is None:
            return "NOT_FOUND"
        if not handle.cancel():
            return "NO_OP"
        self._wake()
        return "DONE"

    def progress(self, request_id: str) -> float | None:
        handle = self.get(request_id)
        return None if handle is None else handle.progress

    def stats(self) -> EndpointStats:
        counters = self.counters
        return EndpointStats(
            queue_depth=self.queue_depth, active_jobs=self.active_jobs,
            images_generated=counters.images_generated, requests_failed=counters.requests_failed,
            steps=counters.steps, step_seconds=counters.step_seconds, forward_seconds=counters.forward_seconds,
            forward_rows=dict(counters.forward_rows),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "model_engine": self.spec.engine,
            "launch_options": {key: list(value) if isinstance(value, tuple) else value
                               for key, value in asdict(self.options).items()},
            "max_batch_size": self.max_batch_size,  # resolved: "auto" becomes a number at load
        }

    def _count_failure(self, future: Future) -> None:
        """A done-callback of every request's future: failed and cancelled requests count."""
        if future.cancelled() or future.exception() is not None:
            self.counters.requests_failed += 1

    # --- what subclasses provide ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        raise NotImplementedError

    @property
    def active_jobs(self) -> int:
        raise NotImplementedError

    @property
    def max_batch_size(self) -> int | None:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _drop_waiting(self) -> None:
        """Nothing by default: queued jobs fail with their requests."""
