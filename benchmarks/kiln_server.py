"""The Kiln server the benchmark measures, run as its own process: the real app (`create_app`, `ModelRegistry`,
`Runner`, uvicorn on uvloop) with two additions that do not change what it does:

- `InstrumentedRunner` records, per model, from each iteration's StepPlan and StepResult (a runner observer):
  every lane step (jobs, seconds), every component call the executor made (prompt encodings, denoiser forwards
  with their row counts and lane size, VAE decodes), and per request its submit time, the time its first
  denoising step finished and its completion. These give the admission latency, the batch occupancy, and the
  exact work for the limit;
- `GET /bench/stats[?reset=1]` returns those records and this process's memory (and resets them).

    python -m kiln.benchmarks.kiln_server --port 9997 --threads 1

The cost is a few list appends per step.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from .machine import gpu_memory, process_memory, reset_peak, set_threads


class Recorder:
    """Per-model records, appended by the scheduler thread and taken whole by the stats route."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> dict[str, Any]:
        with self.lock:
            taken = getattr(self, "data", None)
            self.data: dict[str, Any] = {
                "steps": [],  # [start, seconds, width, height, jobs, rows]
                "admits": [],  # [jobs, seconds]  (prompt encoding + each job's initial state)
                "encodes": [],  # ["encode", texts, seconds]
                "forwards": [],  # [width, height, rows, seconds]
                "decodes": [],  # [width, height, images, seconds]
                "parts": [],  # [part, width, height, rows using it, seconds]
                "requests": {},  # id -> [submitted, first_step, done, images]
            }
            return taken or {}

    def submitted(self, request_id: str, images: int) -> None:
        with self.lock:
            self.data["requests"][request_id] = [time.monotonic(), None, None, images]

    def request(self, request_id: str, index: int, value: float) -> None:
        with self.lock:
            entry = self.data["requests"].get(request_id)
            if entry is not None and (index != 1 or entry[1] is None):
                entry[index] = value

    def observe(self, plan: Any, result: Any, request_of: dict[int, str]) -> None:
        """One iteration's plan and result (a runner observer): its lane step, admission and component calls."""
        now = time.monotonic()
        with self.lock:
            data = self.data
            if plan.admitted:
                data["admits"].append([len(plan.admitted), result.seconds.get("admit", 0.0)])
            if result.step_started is not None and plan.lane is not None:
                rows = sum(call.items for call in result.calls if call.component == "forward")
                data["steps"].append([result.step_started, result.seconds["step"], plan.lane.width, plan.lane.height,
                                      len(plan.step), rows])
            for call in result.calls:
                if call.component == "encode":
                    data["encodes"].append(["encode", call.items, call.seconds])
                elif call.component == "forward":
                    data["forwards"].append([call.width, call.height, call.items, call.seconds])
                elif call.component == "decode":
                    data["decodes"].append([call.width, call.height, call.items, call.seconds])
                else:  # a part's work before a forward (ControlNet): rows of the forward using it
                    data["parts"].append([call.component, call.width, call.height, call.items, call.seconds])
        for job_id in result.stepped:
            request_id = request_of.get(job_id)
            if request_id is not None:
                self.request(request_id, 1, now)


def _make_runner_class():
    from kiln.engine.runner import Runner

    class InstrumentedRunner(Runner):
        """A Runner whose every iteration is recorded for the benchmark (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.recorder = Recorder()
            self._request_of: dict[int, str] = {}  # job id -> request id
            self.observers.append(lambda plan, result: self.recorder.observe(plan, result, self._request_of))

        def submit(self, request, on_preview=None):
            self.recorder.submitted(request.request_id, request.image_count)
            handle = super().submit(request, on_preview)
            self._request_of.update({job.id: request.request_id for job in handle.jobs})
            handle.future.add_done_callback(lambda _: self._finished(request.request_id, handle))
            return handle

        def _finished(self, request_id: str, handle) -> None:
            self.recorder.request(request_id, 2, time.monotonic())
            for job in handle.jobs:
                self._request_of.pop(job.id, None)

    return InstrumentedRunner


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
                              "forward_rows": {str(k): v for k, v in runner.stats().forward_rows.items()}}
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
    parser = argparse.ArgumentParser(prog="python -m kiln.benchmarks.kiln_server")
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
