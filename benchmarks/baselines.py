"""The baselines: the same requests through plain diffusers pipeline calls, as users serve them today.

- sequential: what Xinference does per model copy: one worker thread takes requests FIFO from a queue and calls
  `pipeline(prompt=..., height=..., width=..., num_inference_steps=..., guidance_scale=..., generator=...)` for
  each, one at a time;
- static batching: the worker takes the oldest waiting request and every other waiting request that can share
  its pipeline call (same size, steps and guidance), up to `max_batch_size` images, waiting up to `wait_s` after
  the oldest one arrived for the batch to fill, then runs the whole batch to the end in one call with lists of
  prompts and generators. Requests arriving meanwhile wait for the next call.

One worker per model (each model is its own copy, as in Xinference). The first denoising step of a call is timed
with diffusers' `callback_on_step_end`, for the admission latency.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .load import Outcome
from .scenarios import BenchRequest


@dataclass
class _Waiting:
    request: BenchRequest
    scheduled: float
    arrived: float
    future: Future = field(default_factory=Future)


class PipelineServer:
    """Serves requests with plain pipeline calls: one request per call (`max_batch_size=1`, sequential) or
    static batches of up to `max_batch_size` images."""

    def __init__(self, pipelines: Mapping[str, Any], max_batch_size: int = 1, wait_s: float = 0.0):
        self.pipelines = dict(pipelines)
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.calls: list[list] = []  # [model, images, steps, seconds] per pipeline call
        self._queues: dict[str, deque[_Waiting]] = {model: deque() for model in self.pipelines}
        self._conditions = {model: threading.Condition() for model in self.pipelines}
        self._stopping = False
        self._threads = [threading.Thread(target=self._worker, args=(model,), name=f"baseline-{model}", daemon=True)
                         for model in self.pipelines]
        for thread in self._threads:
            thread.start()

    def start(self, request: BenchRequest, scheduled: float) -> Future[Outcome]:
        waiting = _Waiting(request, scheduled, time.monotonic())
        condition = self._conditions[request.model]
        with condition:
            self._queues[request.model].append(waiting)
            condition.notify()
        return waiting.future

    def close(self) -> None:
        self._stopping = True
        for condition in self._conditions.values():
            with condition:
                condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)

    # --- the worker ---------------------------------------------------------------------------------------------
    def _worker(self, model: str) -> None:
        queue, condition = self._queues[model], self._conditions[model]
        while True:
            with condition:
                condition.wait_for(lambda: queue or self._stopping)
                if self._stopping:
                    return
                batch = self._take(queue, condition)
            self._run(model, batch)

    def _take(self, queue: deque[_Waiting], condition: threading.Condition) -> list[_Waiting]:
        """The next call's requests (the lock is held): the oldest, then those that fit beside it."""
        first = queue[0]
        if self.max_batch_size == 1:
            return [queue.popleft()]
        key = first.request.batch_key

        def fitting() -> list[_Waiting]:
            chosen, images = [], 0
            for waiting in queue:
                if waiting.request.batch_key == key and (not chosen or images + waiting.request.n
                                                         <= self.max_batch_size):
                    chosen.append(waiting)
                    images += waiting.request.n
            return chosen

        deadline = first.arrived + self.wait_s
        while sum(w.request.n for w in fitting()) < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            condition.wait(remaining)
        chosen = fitting()
        for waiting in chosen:
            queue.remove(waiting)
        return chosen

    def _run(self, model: str, batch: list[_Waiting]) -> None:
        request = batch[0].request
        prompts = [w.request.prompt for w in batch for _ in range(w.request.n)]
        generators = [torch.Generator("cpu").manual_seed(w.request.seed + i) for w in batch for i in range(w.request.n)]
        first_step: list[float] = []

        def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            if not first_step:
                first_step.append(time.monotonic())
            return kwargs

        started = time.perf_counter()
        try:
            with torch.no_grad():
                output = self.pipelines[model](
                    prompt=prompts, height=request.height, width=request.width,
                    num_inference_steps=request.steps, guidance_scale=request.guidance,
                    generator=generators, callback_on_step_end=on_step_end,
                )
            images = output.images
            error = None if len(images) == len(prompts) else f"got {len(images)} images for {len(prompts)}"
        except Exception as exc:  # noqa: BLE001 - the batch fails, the worker goes on
            error = f"{type(exc).__name__}: {exc}"
        done = time.monotonic()
        self.calls.append([model, len(prompts), request.steps, time.perf_counter() - started])
        for waiting in batch:
            waiting.future.set_result(Outcome(
                waiting.request.id, model, waiting.request.n, waiting.scheduled, waiting.arrived, done,
                first_step[0] if first_step else None, error,
            ))


def batch_summary(calls: list[list], max_batch_size: int) -> dict[str, Any]:
    """Images per denoiser forward (each call's forwards carry all its images), weighted by forwards."""
    forwards = sum(steps for _, _, steps, _ in calls)
    if not forwards:
        return {"pipeline_calls": 0, "mean_images_per_forward": None, "occupancy": None, "histogram": {}}
    mean = sum(images * steps for _, images, steps, _ in calls) / forwards
    histogram: dict[str, int] = {}
    for _, images, _, _ in calls:
        histogram[str(images)] = histogram.get(str(images), 0) + 1
    return {"pipeline_calls": len(calls), "mean_images_per_forward": mean, "occupancy": mean / max_batch_size,
            "histogram": dict(sorted(histogram.items(), key=lambda item: int(item[0])))}
