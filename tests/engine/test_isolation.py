"""Cancellation, backpressure and fault isolation: a failing or cancelled job never fails its neighbours.

Faults are injected by wrapping one family method of a dedicated runner so that it raises for one prompt only;
everything else is the real engine.
"""

import pytest
import torch

from kiln.engine.requests import ImageRequest
from kiln.engine.errors import EngineError, QueueFull, RequestAborted

from .conftest import PIXEL_TOLERANCE, drive, make_runner, max_diff, pixels, run_alone

POISON = "poison"


@pytest.fixture
def runner(tiny_root):
    runner = make_runner("stable-diffusion-v1.5", max_batch_size=8, max_queue_size=6)
    yield runner
    runner.close()


def good(seed=1, steps=3):
    return ImageRequest("a quiet harbour", 64, 64, steps, 5.0, seed=seed)


def poisoned_rows(runner, inputs):
    """Which rows of a forward's inputs carry the poison prompt's text embedding."""
    poison = runner.executor.family.encode([POISON])[0]["encoder_hidden_states"]
    return [torch.equal(row, poison[0]) for row in inputs["encoder_hidden_states"]]


def finish(runner, *handles):
    drive(runner, lambda: all(handle.future.done() for handle in handles))


def assert_only_bad_failed(runner, bad, fine, expected, message):
    """Run both to the end: the faulty request fails with its own error, its neighbour gives its solo image."""
    finish(runner, bad, fine)
    with pytest.raises(EngineError, match=message):
        bad.result()
    assert max_diff(pixels(fine), expected) <= PIXEL_TOLERANCE


def test_cancelled_request_leaves_at_the_next_step_and_others_finish(runner):
    expected = pixels(run_alone(runner, good()))
    doomed = runner.submit(ImageRequest("a long one", 64, 64, 40, 5.0, seed=2, n=2))
    survivor = runner.submit(good())
    runner.iterate()
    assert runner.active_jobs == 3
    assert doomed.cancel()
    runner.iterate()
    assert runner.active_jobs == 1  # the cancelled jobs left the batch
    finish(runner, doomed, survivor)
    with pytest.raises(RequestAborted):
        doomed.result()
    assert max_diff(pixels(survivor), expected) <= PIXEL_TOLERANCE


def test_abort_by_request_id(runner):
    handle = runner.submit(ImageRequest("x", 64, 64, 30, 0.0, request_id="job-42"))
    runner.iterate()
    assert runner.abort("job-42") == "DONE"
    runner.iterate()
    with pytest.raises(RequestAborted):
        handle.result()
    assert runner.abort("job-42") == "NO_OP"
    assert runner.abort("nobody") == "NOT_FOUND"


def test_full_queue_refuses_and_keeps_what_was_queued(runner):
    first = runner.submit(ImageRequest("a", 64, 64, 2, 0.0, n=4))
    with pytest.raises(QueueFull):
        runner.submit(ImageRequest("b", 64, 64, 2, 0.0, n=3))
    assert runner.queue_depth == 4
    second = runner.submit(ImageRequest("c", 64, 64, 2, 0.0, n=2))
    finish(runner, first, second)
    assert len(first.result()) == 4 and len(second.result()) == 2


def test_failing_prompt_encoding_fails_only_its_request(runner, monkeypatch):
    family = runner.executor.family
    encode = family.encode

    def encode_or_fail(texts):
        if POISON in texts:
            raise ValueError("tokenizer exploded")
        return encode(texts)

    monkeypatch.setattr(family, "encode", encode_or_fail)
    expected = pixels(run_alone(runner, good()))
    bad, fine = runner.submit(ImageRequest(POISON, 64, 64, 3, 5.0)), runner.submit(good())
    assert_only_bad_failed(runner, bad, fine, expected, "tokenizer exploded")


def test_failing_forward_is_retried_job_by_job(runner, monkeypatch):
    family = runner.executor.family
    forward = family.forward

    def forward_or_fail(inputs):
        if any(poisoned_rows(runner, inputs)):
            raise RuntimeError("NaN in attention")
        return forward(inputs)

    expected = pixels(run_alone(runner, good()))
    monkeypatch.setattr(family, "forward", forward_or_fail)
    bad, fine = runner.submit(ImageRequest(POISON, 64, 64, 3, 5.0)), runner.submit(good())
    assert_only_bad_failed(runner, bad, fine, expected, "NaN in attention")


def test_failing_sampler_step_fails_only_its_request(runner):
    expected = pixels(run_alone(runner, good()))
    bad, fine = runner.submit(ImageRequest("x", 64, 64, 3, 5.0, n=2)), runner.submit(good())
    runner.iterate()

    def broken_step(*args, **kwargs):
        raise ArithmeticError("sampler diverged")

    runner.executor.states[bad.jobs[1].id].sampler.step = broken_step
    assert_only_bad_failed(runner, bad, fine, expected, "sampler diverged")


def test_failing_decode_fails_only_its_request(runner, monkeypatch):
    family = runner.executor.family
    decode = family.decode
    expected = pixels(run_alone(runner, good()))
    bad, fine = runner.submit(ImageRequest("x", 64, 64, 3, 5.0, seed=7)), runner.submit(good())

    first_seen = {}

    def decode_or_fail(latents, width, height):
        if "bad" not in first_seen:  # the bad job's state is freed once it has failed alone
            first_seen["bad"] = runner.executor.states[bad.jobs[0].id].latents
        bad_latents = first_seen["bad"]
        if any(torch.equal(row, bad_latents[0]) for row in latents):
            raise MemoryError("decoder fault")
        return decode(latents, width, height)

    monkeypatch.setattr(family, "decode", decode_or_fail)
    # Both finish at the same step and share one decode batch, which fails and is retried job by job.
    assert_only_bad_failed(runner, bad, fine, expected, "decoder fault")


def test_out_of_memory_splits_the_batch_and_every_job_finishes(runner, monkeypatch):
    family = runner.executor.family
    forward = family.forward
    requests = [ImageRequest(f"prompt {i}", 64, 64, 3, 5.0, seed=i) for i in range(6)]
    expected = [pixels(run_alone(runner, request)) for request in requests]
    rows_seen = []

    def forward_with_small_memory(inputs):
        rows_seen.append(inputs["sample"].shape[0])
        if inputs["sample"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(inputs)

    monkeypatch.setattr(family, "forward", forward_with_small_memory)
    handles = [runner.submit(request) for request in requests]  # 6 CFG jobs: 12 rows per step
    finish(runner, *handles)
    for handle, solo in zip(handles, expected):
        assert max_diff(pixels(handle), solo) <= PIXEL_TOLERANCE
    # The first step halves 6 jobs (12 rows) until the pieces fit: 3 + 3 jobs, each again 1 + 2.
    assert rows_seen[:7] == [12, 6, 2, 4, 6, 2, 4]
    # Learned: later steps go straight to forwards of 2 jobs, the largest size that did not run out.
    assert runner.executor.forward_limit == 2
    assert set(rows_seen[7:]) == {4}
