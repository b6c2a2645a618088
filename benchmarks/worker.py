"""A baseline or the limit measurement, in its own process so that its memory and threads are its own.

    python -m benchmarks.worker JOB.json RESULT.json

JOB.json: {"system": "sequential" | "static" | "limit", "threads", "max_batch_size", "static_wait_s",
"models": {name: launch options}, "warmup": [plan, ...], "plans": [plan, ...], "work": {model: [shape keys]}}.
A baseline runs the warm-up plans, then each plan in order with the shared load generator, and writes per plan
its outcomes, pipeline calls, memory and load averages. The limit times each component shape (see components).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .machine import cpu_seconds, gpu_memory, load_average, process_memory, reset_peak, set_threads


def run_baseline(job: dict[str, Any]) -> dict[str, Any]:
    from .baselines import PipelineServer
    from .components import load_components
    from .load import run_plan
    from .scenarios import Plan

    started = time.monotonic()
    pipelines = {name: load_components(name, options).family.pipeline for name, options in job["models"].items()}
    loaded = {"load_seconds": time.monotonic() - started, **process_memory()}
    batch = job["max_batch_size"] if job["system"] == "static" else 1
    server = PipelineServer(pipelines, batch, job["static_wait_s"] if job["system"] == "static" else 0.0)
    try:
        for data in job["warmup"]:
            run_plan(Plan.from_json(data), server)
        results = {}
        for data in job["plans"]:
            plan = Plan.from_json(data)
            server.calls.clear()
            reset_peak()
            gpu_memory(reset=True)
            before = load_average()
            cpu = cpu_seconds()
            outcomes, start = run_plan(plan, server)
            results[plan.name] = {
                "cpu_s": cpu_seconds() - cpu,
                "start": start, "outcomes": [outcome.to_json() for outcome in outcomes],
                "calls": list(server.calls), "load_before": before, "load_after": load_average(),
                "memory": {**process_memory(), **(gpu_memory() or {})},
            }
    finally:
        server.close()
    return {"system": job["system"], "loaded": loaded, "plans": results}


def run_limit(job: dict[str, Any]) -> dict[str, Any]:
    from .components import load_components, parse_shape_key

    times: dict[str, dict[str, float]] = {}
    for name, options in job["models"].items():
        keys = job["work"].get(name, [])
        if not keys:
            continue
        components = load_components(name, options, backend=job["backends"][name],
                                     max_batch_size=job["max_batch_size"])
        times[name] = {key: components.time(parse_shape_key(key)) for key in keys}
    return {"system": "limit", "times": times, "load_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    set_threads(job["threads"])
    result = run_limit(job) if job["system"] == "limit" else run_baseline(job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
