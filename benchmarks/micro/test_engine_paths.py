"""Where the engine's time goes besides the raw components, at batch 1, 4 and 16 (tiny SD1.5, 64x64, CFG).

- step: one loop iteration of a lane (`Runner.iterate`: plan, batched forward, every job's sampler step,
  bookkeeping) against the raw denoiser forward at the same rows; `extra_info` has the overhead per step;
- admit: `Executor.execute` of a plan that only admits (batched prompt encoding through the prompt cache + each
  job's latents and sampler) against the raw encodes;
- decode: `Executor.execute` of a plan that only decodes, against the raw VAE decode;
- schedule: the pure-Python scheduler (`schedule` + `update`) with 16 active jobs, no tensors.

    pytest benchmarks/micro --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kiln.benchmarks.components import Components
from kiln.engine.requests import ImageRequest, LaneKey, job_specs
from kiln.engine.scheduler import Scheduler, StepPlan, StepResult

BATCHES = (1, 4, 16)
STEPS = 500  # so that no job finishes while a step is being timed


def _requests(count: int, steps: int = STEPS) -> list[ImageRequest]:
    return [ImageRequest(prompt=f"a red fox {i}", width=64, height=64, steps=steps, guidance_scale=7.5, seed=i)
            for i in range(count)]


def _jobs(count: int, steps: int = STEPS):
    return [job_specs(request, LaneKey(64, 64))[0] for request in _requests(count, steps)]


class Interleaved:
    """Times a raw call before every round of the benchmarked one (pytest-benchmark's untimed `setup`), so both
    run under the same machine load; `overhead()` is the median of the paired differences."""

    def __init__(self, *calls):
        self.calls = calls
        self.times: list[float] = []

    def setup(self) -> None:
        started = time.perf_counter()
        for call in self.calls:
            call()
        self.times.append(time.perf_counter() - started)

    def record(self, benchmark, raw_name: str, name: str) -> None:
        measured = benchmark.stats.stats.data
        raw = self.times[-len(measured):]
        paired = [m - r for m, r in zip(measured, raw)]
        median = benchmark.stats.stats.median
        benchmark.extra_info.update({
            f"raw_{raw_name}_s": statistics.median(raw), f"{name}_s": median,
            "overhead_s": statistics.median(paired), "overhead_fraction": statistics.median(paired) / median,
        })


@pytest.mark.parametrize("batch", BATCHES)
def test_lane_step_overhead(benchmark, runner, batch: int) -> None:
    handles = [runner.submit(request) for request in _requests(batch)]
    try:
        runner.iterate()  # admits them and runs their first step
        assert runner.active_jobs == batch
        raw = Interleaved(Components(runner.executor.family).call(("forward", 64, 64, 2 * batch)))
        benchmark.pedantic(runner.iterate, setup=raw.setup, rounds=20, warmup_rounds=2)
        raw.record(benchmark, "forward", "step")
    finally:
        for handle in handles:
            runner.abort(handle.request.request_id)
        runner.iterate()  # the cancelled jobs leave
    assert runner.active_jobs == 0


@pytest.mark.parametrize("batch", BATCHES)
def test_admit_path(benchmark, runner, batch: int) -> None:
    executor = runner.executor
    jobs = _jobs(batch)
    results = []
    raw = Interleaved(Components(executor.family).call(("encode", batch)))
    benchmark.pedantic(lambda: results.append(executor.execute(StepPlan(admitted=tuple(jobs)))), setup=raw.setup,
                       rounds=15, warmup_rounds=1)
    assert not any(result.failed for result in results) and all(job.id in executor.states for job in jobs)
    for job in jobs:
        del executor.states[job.id]
    raw.record(benchmark, "encode", "admit")


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_path(benchmark, runner, batch: int) -> None:
    executor = runner.executor
    jobs = _jobs(batch)
    assert not executor.execute(StepPlan(admitted=tuple(jobs))).failed
    states = {job.id: executor.states[job.id] for job in jobs}
    latents = torch.cat([state.latents for state in states.values()])
    raw = Interleaved(lambda: executor.family.decode(latents, 64, 64))

    def decode() -> StepResult:
        executor.states.update(states)  # a decode frees the states it decodes
        return executor.execute(StepPlan(decode=tuple(states)))

    result = benchmark.pedantic(decode, setup=raw.setup, rounds=10, warmup_rounds=1)
    assert len(result.images) == batch and not result.failed
    raw.record(benchmark, "decode", "decode")


def test_scheduler_plan_and_update(benchmark) -> None:
    scheduler = Scheduler(max_batch_size=16, max_queue_size=256)
    scheduler.add(_jobs(16))
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult(admitted={job.id: 10**9 for job in plan.admitted}))  # none ever finishes

    def turn() -> None:
        plan = scheduler.schedule()
        scheduler.update(plan, StepResult(stepped=list(plan.step)))

    benchmark(turn)
    assert scheduler.active_count == 16
