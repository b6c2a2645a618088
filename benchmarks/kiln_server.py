"""The Kiln server the benchmark measures, run as its own process: the real app (`create_app`, `ModelRegistry`,
`Runner`, uvicorn on uvloop) with two additions that do not change what it does:

- `InstrumentedRunner` records, per model, every lane step (jobs, seconds), every component call the engine
  makes through its family adapter (prompt encodings, denoiser forwards with their row counts and lane size, VAE
  decodes), and per request its submit time, the time its first denoising step finished and its completion.
  These give the admission latency, the batch occupancy, and the exact work for the limit;
- `GET /bench/stats[?reset=1]` returns those records and this process's memory (and resets them).

    python -m benchmarks.kiln_server --port 9997 --threads 1

It wraps the executor's and the family's public methods on the instance; the cost is a few list appends per step.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from typing import Any, Callable

from .machine import gpu_memory, process_memory, reset_peak, set_threads


class Recorder:
    """Per-model records, appended by the scheduler thread and taken whole by the stats route."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._depth = threading.local()
        self.step_rows = 0  # rows forwarded in the step under way (scheduler thread only)
        self.clear()

    def clear(self) -> dict[str, Any]:
        with self.lock:
            taken = getattr(self, "data", None)
            self.data: dict[str, Any] = {
                "steps": [],  # [start, seconds, width, height, jobs, rows]
                "admits": [],  # [jobs, seconds]  (prompt encoding + each job's initial state)
                "encodes": [],  # [kind ("encode" | "encode_negatives"), texts, seconds]
                "forwards": [],  # [width, height, rows, seconds]
                "decodes": [],  # [width, height, images, seconds]
                "requests": {},  # id -> [submitted, first_step, done, images]
            }
            return taken or {}

    def add(self, key: str, row: list) -> None:
        with self.lock:
            self.data[key].append(row)

    def request(self, request_id: str, index: int, value: float) -> None:
        with self.lock:
            entry = self.data["requests"].get(request_id)
            if entry is not None and (index != 1 or entry[1] is None):
                entry[index] = value

    def submitted(self, request_id: str, images: int) -> None:
        with self.lock:
            self.data["requests"][request_id] = [time.monotonic(), None, None, images]

    def nested(self, group: str) -> int:
        """How many timed calls of `group` are under way on this thread (encode_negatives may call encode)."""
        return getattr(self._depth, group, 0)

    def enter(self, group: str) -> None:
        setattr(self._depth, group, self.nested(group) + 1)

    def leave(self, group: str) -> None:
        setattr(self._depth, group, self.nested(group) - 1)


def _make_runner_class():
    from kiln.engine.runner import Runner

    class InstrumentedRunner(Runner):
        """A Runner that records what it does for the benchmark (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.recorder = Recorder()

        def load(self, start: bool = True) -> None:
            super().load(start)
            instrument(self, self.recorder)

        def submit(self, request, on_preview=None):
            self.recorder.submitted(request.request_id, request.image_count)
            handle = super().submit(request, on_preview)
            handle.future.add_done_callback(
                lambda _: self.recorder.request(request.request_id, 2, time.monotonic()))
            return handle

    return InstrumentedRunner


def instrument(runner: Any, recorder: Recorder) -> None:
    """Wrap the runner's executor and family methods to record steps, component calls and first steps."""
    executor = runner.executor
    family = executor.family

    def timed(function: Callable, record: Callable[[tuple, float], None], group: str) -> Callable:
        """`function`, recording (args, seconds) of each call that is not nested in another call of `group`."""
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any):
            outermost = recorder.nested(group) == 0
            recorder.enter(group)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                recorder.leave(group)
                if outermost:
                    record(args, time.perf_counter() - started)
        return wrapper

    step = executor.step

    @functools.wraps(step)
    def timed_step(jobs, fail):
        started_at, started = time.monotonic(), time.perf_counter()
        recorder.step_rows = 0
        result = step(jobs, fail)
        seconds = time.perf_counter() - started
        now = time.monotonic()
        if jobs:
            request = jobs[0].request
            recorder.add("steps", [started_at, seconds, request.width, request.height, len(jobs),
                                   recorder.step_rows])
        for job in jobs:
            recorder.request(job.request.request_id, 1, now)
        return result

    executor.step = timed_step
    executor.admit = timed(executor.admit, lambda a, s: a[0] and recorder.add("admits", [len(a[0]), s]), "admit")
    family.encode = timed(family.encode, lambda a, s: recorder.add("encodes", ["encode", len(a[0]), s]), "encode")
    family.encode_negatives = timed(
        family.encode_negatives, lambda a, s: recorder.add("encodes", ["encode_negatives", len(a[0]), s]), "encode")
    def forward(args: tuple, seconds: float) -> None:
        rows = int(args[0].shape[0])
        recorder.step_rows += rows
        recorder.add("forwards", [args[4], args[5], rows, seconds])

    family.denoise = timed(family.denoise, forward, "denoise")
    family.decode = timed(family.decode, lambda a, s: recorder.add("decodes", [a[1], a[2], int(a[0].shape[0]), s]),
                          "decode")


async def bench_stats(request):
    """`GET /bench/stats[?reset=1]`: per-model records and this process's memory."""
    from starlette.responses import JSONResponse

    reset = request.query_params.get("reset", "0") in ("1", "true")
    models = {}
    for runner in request.app.state.registry.runners():
        recorder = getattr(runner, "recorder", None)
        if recorder is None:
            continue
        data = recorder.clear() if reset else dict(recorder.data)
        models[runner.uid] = {**data, "max_batch_size": runner.max_batch_size,
                              "forward_rows": {str(k): v for k, v in runner.counters.forward_rows.items()}}
    memory = {**process_memory(), **(gpu_memory(reset) or {})}
    if reset:
        memory["peak_reset"] = reset_peak()
    return JSONResponse({"models": models, "memory": memory, "time": time.monotonic()})


def create_bench_app():
    from kiln.server.app import create_app
    from kiln.engine.catalogue import ModelSpec
    from kiln.server.registry import ModelRegistry

    registry = ModelRegistry({ModelSpec: _make_runner_class()})
    app = create_app(registry)
    app.add_route("/bench/stats", bench_stats, methods=["GET"])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kiln_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from kiln.server.app import serve

    serve(create_bench_app(), args.host, args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
