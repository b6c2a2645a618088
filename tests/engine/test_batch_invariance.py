"""A job's image does not depend on what ran beside it: the test that catches prompts mixed up inside a batch."""

import pytest

from kiln.engine.requests import ImageRequest

from .conftest import FAMILY_MODELS, PIXEL_TOLERANCE, drive, max_diff, pixels, run_alone

FLOW = {"sd3", "flux"}


def neighbours(family):
    """Requests that differ from the target in prompt, seed, steps, guidance (CFG on and off) and sampler."""
    samplers = ["default", "Euler"] if family in FLOW else ["Euler a", "DPM++ 2M", "default"]
    return [
        ImageRequest("a stormy sea at night", 64, 64, 9, 7.0, seed=99, sampler=samplers[0]),
        ImageRequest("a portrait of an old man", 64, 64, 3, 0.0, seed=5, sampler=samplers[1], n=2),
        ImageRequest(["a red car", "green hills"], 64, 64, 6, 2.5, seed=41, sampler=samplers[-1],
                     negative_prompt="blurry"),
    ]


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_same_image_alone_and_in_a_changing_batch(runner_for, family):
    runner = runner_for(FAMILY_MODELS[family])
    target = lambda: ImageRequest("a lighthouse on a cliff", 64, 64, 6, 4.0, seed=1234, sampler="Euler")  # noqa: E731
    alone = run_alone(runner, target())

    early, middle, late = neighbours(family)
    early_handle = runner.submit(early)
    runner.iterate()
    runner.iterate()  # the early neighbour is two steps in when the target joins
    handle = runner.submit(target())
    runner.iterate()
    assert handle.progress > 0 and not early_handle.future.done()
    middle_handle = runner.submit(middle)  # joins the target's second step
    runner.iterate()
    late_handle = runner.submit(late)  # joins its third
    drive(runner, lambda: all(h.future.done() for h in (early_handle, handle, middle_handle, late_handle)))

    assert max_diff(pixels(alone), pixels(handle)) <= PIXEL_TOLERANCE
    # The neighbours are right too: each matches its own solo run.
    for request, batched in ((early, early_handle), (middle, middle_handle), (late, late_handle)):
        solo = run_alone(runner, request)
        for index in range(len(solo.jobs)):
            assert max_diff(pixels(solo, index), pixels(batched, index)) <= PIXEL_TOLERANCE
    # The runs really shared forwards: more rows than any single job brings.
    assert max(runner.counters.forward_rows) >= 6


def test_same_image_when_submitted_from_many_threads(tiny_root):
    """The threaded runner under concurrent submits: every request gets its own image."""
    from concurrent.futures import ThreadPoolExecutor

    from .conftest import make_runner

    runner = make_runner("stable-diffusion-v1.5", start=True, max_batch_size=8)
    try:
        requests = [ImageRequest(f"prompt {i}", 64, 64, 2 + i % 3, 5.0 * (i % 2), seed=i) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            handles = list(pool.map(runner.submit, requests))
        together = [handle.result(timeout=300) for handle in handles]
        for request, images in zip(requests, together):
            solo = runner.submit(request).result(timeout=300)
            assert max_diff(pixels_of(solo[0]), pixels_of(images[0])) <= PIXEL_TOLERANCE
    finally:
        runner.close()


def pixels_of(generated):
    import numpy as np

    return np.asarray(generated.image, dtype=np.int16)
