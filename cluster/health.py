"""Is a replica's model still working? Serve asks every few seconds and replaces a replica that says no.

A replica is unhealthy when its worker thread has died, or when it has work (queued or active images) and has
not finished a step for `stall_seconds`: a scheduler thread that is stuck, or dead in a way nothing else shows.
The rule reads only the endpoint's status and `stats()` snapshot (the ModelEndpoint protocol), plus the worker
thread's liveness where the endpoint has one.
"""

from __future__ import annotations

import time
from typing import Callable

from kiln.engine.endpoint import ModelEndpoint

STALL_SECONDS = 120.0  # longer than any one step of a real model at its largest batch


class Unhealthy(RuntimeError):
    """Raised from a replica's health check; Serve then replaces the replica."""


class StallWatch:
    """Remembers when the endpoint last made progress; `check()` raises Unhealthy when it has stopped."""

    def __init__(self, endpoint: ModelEndpoint, stall_seconds: float = STALL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._steps = -1
        self._since = clock()

    def check(self) -> None:
        endpoint = self.endpoint
        if endpoint.status != "ready":
            raise Unhealthy(f"model {endpoint.uid} is {endpoint.status}: {endpoint.error or 'not serving'}")
        if not getattr(endpoint, "worker_alive", True):
            raise Unhealthy(f"model {endpoint.uid}: its worker thread has died")
        stats, now = endpoint.stats(), self._clock()
        done = stats.steps + stats.images_generated + stats.requests_failed
        if done != self._steps or not (stats.queue_depth or stats.active_jobs):
            self._steps, self._since = done, now
            return
        if now - self._since > self.stall_seconds:
            raise Unhealthy(f"model {endpoint.uid} has {stats.queue_depth + stats.active_jobs} images to work on "
                            f"and has not finished a step for {now - self._since:.0f} s")
