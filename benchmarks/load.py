"""The load generator and the per-request record, shared by every system.

A system is anything with `start(request, scheduled) -> Future[Outcome]`: Kiln over HTTP (a thread pool of
blocking httpx calls), or an in-process pipeline server (a queue). The three load patterns drive it the same way:

- closed: C client threads, each sending its next request as soon as its last one returns;
- open: requests start at their planned arrival times (Poisson), whatever is still running; latency counts from
  the planned arrival, so a system that falls behind is charged for it (no coordinated omission);
- burst: every request at once.

All times are `time.monotonic()` seconds (CLOCK_MONOTONIC, the same clock in every process on one machine, so a
server's timestamps compare with the client's).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from .scenarios import BenchRequest, Plan

REQUEST_TIMEOUT = 900.0  # seconds; a request not done by then counts as failed


@dataclass
class Outcome:
    """What happened to one request. `first_step` is when its first denoising step had run (None if unknown)."""

    id: str
    model: str
    images: int
    scheduled: float  # when it arrived: planned arrival (open loop, burst) or send time (closed loop)
    sent: float
    done: float
    first_step: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.done - self.scheduled

    @property
    def admission(self) -> float | None:
        return None if self.first_step is None else self.first_step - self.scheduled

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class System(Protocol):
    def start(self, request: BenchRequest, scheduled: float) -> Future[Outcome]: ...


def failed(request: BenchRequest, scheduled: float, error: str) -> Outcome:
    now = time.monotonic()
    return Outcome(request.id, request.model, request.n, scheduled, now, now, error=error)


def _wait(future: Future[Outcome], request: BenchRequest, scheduled: float) -> Outcome:
    try:
        return future.result(timeout=max(1.0, scheduled + REQUEST_TIMEOUT - time.monotonic()))
    except Exception as error:  # noqa: BLE001 - a failed request is a result, not a crash
        return failed(request, scheduled, f"{type(error).__name__}: {error}")


def run_plan(plan: Plan, system: System) -> tuple[list[Outcome], float]:
    """Drive `system` with the plan's requests in its load pattern; returns the outcomes (in request order) and
    the start time."""
    requests = plan.requests
    outcomes: list[Outcome | None] = [None] * len(requests)
    start = time.monotonic()
    if plan.kind == "closed":
        lock, cursor = threading.Lock(), [0]

        def client() -> None:
            while True:
                with lock:
                    index = cursor[0]
                    cursor[0] += 1
                if index >= len(requests):
                    return
                sent = time.monotonic()
                outcomes[index] = _wait(system.start(requests[index], sent), requests[index], sent)

        clients = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True)
                   for i in range(plan.concurrency or 1)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
    else:
        futures: list[tuple[Future[Outcome], float]] = []
        for request in requests:
            scheduled = start + (request.at if plan.kind == "open" else 0.0)
            delay = scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append((system.start(request, scheduled), scheduled))
        for index, (future, scheduled) in enumerate(futures):
            outcomes[index] = _wait(future, requests[index], scheduled)
    return [outcome for outcome in outcomes if outcome is not None], start


# --- summaries ----------------------------------------------------------------------------------------------------
def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99 (linear interpolation), mean, min and max; None for no values."""
    if not len(values):
        return None
    array = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(array.mean()),
            "min": float(array.min()), "max": float(array.max())}


def summarize(runs: Sequence[tuple[Sequence[Outcome], float]]) -> dict[str, Any]:
    """Throughput and latency figures of one system on one plan, pooled over its runs (rounds).

    Each run is (outcomes, start). images_per_s = images of successful requests / the summed durations, where a
    run lasts from its start to its last completion; percentiles are over every request of every run."""
    good: list[Outcome] = []
    images, duration, rounds, errors = 0, 0.0, [], {}
    requests = 0
    for outcomes, start in runs:
        ok = [outcome for outcome in outcomes if outcome.ok]
        good += ok
        requests += len(outcomes)
        run_images = sum(outcome.images for outcome in ok)
        run_duration = max(max((outcome.done for outcome in outcomes), default=start) - start, 1e-9)
        images += run_images
        duration += run_duration
        rounds.append(run_images / run_duration)
        for outcome in outcomes:
            if not outcome.ok:
                key = (outcome.error or "")[:200]
                errors[key] = errors.get(key, 0) + 1
    admissions = [outcome.admission for outcome in good if outcome.admission is not None]
    return {
        "requests": requests,
        "requests_ok": len(good),
        "requests_failed": requests - len(good),
        "images": images,
        "duration_s": duration,
        "images_per_s": images / duration if duration else 0.0,
        "images_per_s_by_round": rounds,
        "latency_s": percentiles([outcome.latency for outcome in good]),
        "admission_s": percentiles(admissions),
        "admission_measured": len(admissions),
        "errors": errors,
        # Sorted, rounded latencies: enough to redraw the CDFs from the JSON alone.
        "latencies_s": sorted(round(outcome.latency, 5) for outcome in good),
    }
