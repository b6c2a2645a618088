"""max_batch_size "auto": a budget from free memory bounds the jobs of a batch, and each forward and decode at
every lane size, so that a full batch fits."""

import pytest
import torch

from kiln.engine.catalogue import get_spec
from kiln.engine.memory import CPU_BATCH_SIZE, HEADROOM, MAX_AUTO_BATCH_SIZE, BatchBudget, measure_job_memory
from kiln.engine.options import parse_launch_options
from kiln.engine.requests import ImageRequest

from .conftest import PIXEL_TOLERANCE, drive, make_runner, max_diff, pixels, run_alone

MB = 2**20


def test_the_budget_is_free_memory_less_the_fixed_cost_over_a_job():
    budget = BatchBudget.derive(free_bytes=10_000 * MB, fixed_bytes=500 * MB, job_bytes=300 * MB, pixels=512 * 512)
    usable = int(10_000 * MB * HEADROOM) - 500 * MB
    assert budget.usable_bytes == usable and budget.max_batch_size == usable // (300 * MB) == 26
    assert budget.jobs_per_call(512, 512) == 26
    assert budget.jobs_per_call(1024, 1024) == 6  # four times the pixels: a quarter of the jobs
    assert budget.jobs_per_call(256, 256) == 26  # smaller lanes are bounded by the batch size itself
    assert budget.jobs_per_call(4096, 4096) == 1  # a job too big for the budget still runs, alone


def test_the_budget_is_one_job_at_least_and_capped_above():
    assert BatchBudget.derive(100 * MB, 500 * MB, 300 * MB, 512 * 512).max_batch_size == 1
    assert BatchBudget.derive(80_000 * MB, 0, 1 * MB, 512 * 512).max_batch_size == MAX_AUTO_BATCH_SIZE


def test_a_given_batch_size_is_kept_and_auto_is_the_cpu_default(runner_for):
    spec = get_spec("sd-turbo")
    assert parse_launch_options(spec, {}).max_batch_size is None
    assert parse_launch_options(spec, {"max_batch_size": "auto"}).max_batch_size is None
    assert runner_for("sd-turbo").max_batch_size == CPU_BATCH_SIZE
    assert runner_for("sd-turbo", max_batch_size=3).max_batch_size == 3
    assert BatchBudget(3).jobs_per_call(4096, 4096) == 3  # unmeasured: no bound by size


def test_forwards_and_decodes_at_a_large_size_hold_fewer_jobs(tiny_root):
    """Three jobs at 64x64 share forwards; at 128x128 (four times the pixels) each forward and decode holds one,
    and every image is still its solo image."""
    runner = make_runner("stable-diffusion-v1.5", max_batch_size=4)
    try:
        runner.executor.budget = BatchBudget(4, usable_bytes=4 * 64 * 64 * 1000, bytes_per_pixel=1000.0)
        family, decoded = runner.executor.family, []  # images per VAE decode call
        decode = family.decode
        family.decode = lambda latents, width, height: decoded.append(len(latents)) or decode(latents, width, height)

        for size, rows in ((64, 6), (128, 2)):
            requests = [ImageRequest(f"a bird {i}", size, size, 3, 5.0, seed=i, sampler="Euler") for i in range(3)]
            solo = [run_alone(runner, request) for request in requests]
            runner.counters.forward_rows.clear()
            decoded.clear()
            handles = [runner.submit(request) for request in requests]
            drive(runner, lambda: all(handle.future.done() for handle in handles))
            assert set(runner.counters.forward_rows) == {rows}
            assert decoded == ([3] if size == 64 else [1, 1, 1])
            for alone, batched in zip(solo, handles):
                assert max_diff(pixels(alone), pixels(batched)) <= PIXEL_TOLERANCE
    finally:
        runner.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measuring a job's memory needs a CUDA GPU")
def test_a_job_costs_memory_on_a_gpu(tiny_root):
    runner = make_runner("stable-diffusion-v1.5", device="cuda")
    try:
        fixed, per_job = measure_job_memory(runner.executor.family, 64, 64)
        assert per_job > 0 and fixed >= 0
        assert 1 <= runner.max_batch_size <= MAX_AUTO_BATCH_SIZE
    finally:
        runner.close()
