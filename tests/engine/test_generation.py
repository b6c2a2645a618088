"""Every catalogue model generates through the real loader and the step loop, in every mode it advertises."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine.catalogue import CATALOGUE, IMAGE2IMAGE, INPAINTING, get_spec
from kiln.engine.errors import InvalidRequest
from kiln.engine.parts import Part
from kiln.engine.requests import ImageRequest, job_specs
from kiln.engine.samplers import SAMPLER_NAMES
from kiln.engine.scheduler import StepPlan

from .conftest import PIXEL_TOLERANCE, drive, max_diff, pixels, run_alone

SIZE = {"sd": (64, 64), "sdxl": (64, 64), "sd3": (64, 64), "flux": (64, 64)}


def init_image(size=(64, 64)) -> Image.Image:
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Image.fromarray(gradient)


def half_mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    return Image.fromarray(mask)


def assert_real_image(handle, count, size):
    images = handle.result()
    assert len(images) == count
    for item in images:
        assert item.image.size == size and item.image.mode == "RGB"
        assert np.asarray(item.image).std() > 1.0  # not a blank image
        assert 0 <= item.seed < 2**31


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_text_to_image(runner_for, name):
    spec = get_spec(name)
    runner = runner_for(name)
    request = ImageRequest(["a red fox", "a blue bird"], 64, 64, min(spec.default_steps, 3), spec.default_guidance,
                           n=2, seed=11)
    handle = run_alone(runner, request)
    assert_real_image(handle, 4, (64, 64))
    assert handle.seeds == [11, 12, 13, 14]
    assert handle.progress == 1.0


@pytest.mark.parametrize("name", [n for n, s in CATALOGUE.items() if IMAGE2IMAGE in s.abilities])
def test_image_to_image(runner_for, name):
    runner = runner_for(name)
    handle = run_alone(runner, ImageRequest("a fox", 64, 64, 4, 3.0, image=init_image(), strength=0.5, seed=3))
    assert_real_image(handle, 1, (64, 64))
    # strength 0.5 starts half-way down the sampler's schedule
    full = run_alone(runner, ImageRequest("a fox", 64, 64, 4, 3.0, seed=3))
    assert 0 < handle.job_steps(0)[1] < full.job_steps(0)[1]


@pytest.mark.parametrize("name", [n for n, s in CATALOGUE.items() if INPAINTING in s.abilities])
def test_inpainting(runner_for, name):
    runner = runner_for(name)
    request = ImageRequest("a fox", 64, 64, 4, 3.0, image=init_image(), mask=half_mask(), strength=0.6, seed=5)
    assert_real_image(run_alone(runner, request), 1, (64, 64))


@pytest.mark.parametrize("name", [n for n, s in CATALOGUE.items() if INPAINTING in s.abilities])
def test_inpainting_keeps_the_unmasked_latents_and_repaints_the_rest(runner_for, name):
    """Driven through the executor with hand-made plans, so the final latents can be read before a decode."""
    runner = runner_for(name)
    request = ImageRequest("a fox", 64, 64, 4, 3.0, image=init_image(), mask=half_mask(), strength=0.6, seed=5)
    (job,) = job_specs(request, runner.lane_key(request))
    executor = runner.executor
    result = executor.execute(StepPlan(admitted=(job,), lane=job.lane, step=(job.id,)))
    state = executor.states[job.id]
    while not result.failed and state.step < len(state.timesteps):
        result = executor.execute(StepPlan(lane=job.lane, step=(job.id,)))
    assert not result.failed
    del executor.states[job.id]
    mask, image_latents = state.parts["inpaint"], state.parts["init_image"].image_latents
    keep = (mask == 0).expand_as(state.latents)
    assert keep.any() and (~keep).any()
    assert torch.equal(state.latents[keep], image_latents[keep])
    assert not torch.allclose(state.latents[~keep], image_latents[~keep])


def test_text_only_models_refuse_image_modes(runner_for):
    runner = runner_for("sd-turbo")
    with pytest.raises(InvalidRequest, match="cannot do image2image"):
        runner.submit(ImageRequest("x", 64, 64, 1, 0.0, image=init_image()))
    assert runner.queue_depth == 0


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(runner_for, sampler):
    runner = runner_for("stable-diffusion-v1.5")
    handle = run_alone(runner, ImageRequest("a fox", 64, 64, 3, 5.0, sampler=sampler, seed=2))
    assert_real_image(handle, 1, (64, 64))


def test_flow_models_accept_only_flow_samplers(runner_for):
    runner = runner_for("FLUX.1-schnell")
    with pytest.raises(InvalidRequest, match="accepts: default, Euler"):
        runner.submit(ImageRequest("x", 64, 64, 2, 0.0, sampler="DPM++ 2M"))
    handle = run_alone(runner, ImageRequest("x", 64, 64, 2, 0.0, sampler="Euler", seed=1))
    assert_real_image(handle, 1, (64, 64))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 72}, "multiple of 16"),
        ({"height": 4096}, "between 64 and 2048"),
        ({"steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"strength": 1.5}, "strength"),
    ],
)
def test_invalid_requests_never_reach_the_queue(runner_for, change, message):
    runner = runner_for("sd3-medium")
    fields = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "guidance_scale": 1.0, **change}
    with pytest.raises(InvalidRequest, match=message):
        runner.submit(ImageRequest(**fields))
    assert runner.queue_depth == 0 and runner.active_jobs == 0


def test_sd3_without_t5(runner_for):
    runner = runner_for("sd3-medium", text_encoder_3=None)
    assert runner.loaded.pipeline.text_encoder_3 is None
    assert_real_image(run_alone(runner, ImageRequest("a fox", 64, 64, 2, 4.0, seed=1)), 1, (64, 64))


def test_flux_default_launch_quantizes_t5_to_8_bit(runner_for):
    import bitsandbytes as bnb

    runner = runner_for("FLUX.1-schnell")
    encoder = runner.loaded.pipeline.text_encoder_2
    assert any(isinstance(module, bnb.nn.Linear8bitLt) for module in encoder.modules())
    assert_real_image(run_alone(runner, ImageRequest("a fox", 64, 64, 2, 0.0, seed=1)), 1, (64, 64))


def test_seed_reproduces_an_image_of_a_larger_request(runner_for):
    runner = runner_for("sd-turbo")
    many = run_alone(runner, ImageRequest("a fox", 64, 64, 1, 0.0, n=3, seed=100))
    third = run_alone(runner, ImageRequest("a fox", 64, 64, 1, 0.0, seed=many.seeds[2]))
    assert max_diff(pixels(many, 2), pixels(third)) <= PIXEL_TOLERANCE  # batched numerics, not bit-exact
    drawn = run_alone(runner, ImageRequest("a fox", 64, 64, 1, 0.0, n=2))
    again = run_alone(runner, ImageRequest("a fox", 64, 64, 1, 0.0, seed=drawn.seeds[1]))
    assert max_diff(pixels(drawn, 1), pixels(again)) <= PIXEL_TOLERANCE


def test_progress_is_the_fraction_of_steps_done(runner_for):
    runner = runner_for("stable-diffusion-v1.5")
    handle = runner.submit(ImageRequest("a fox", 64, 64, 4, 5.0, sampler="Euler", seed=1))
    runner.iterate()
    assert handle.progress == 0.25
    drive(runner, handle.future.done)
    assert handle.progress == 1.0


def test_prompt_encodings_are_cached_within_a_byte_budget(runner_for, monkeypatch):
    runner = runner_for("sd-turbo")
    family, cache = runner.executor.family, runner.executor.prompts
    calls = []
    encode = family.encode
    monkeypatch.setattr(family, "encode", lambda texts: calls.append(list(texts)) or encode(texts))

    def run(*prompts):
        handles = [runner.submit(ImageRequest(prompt, 64, 64, 1, 0.0, seed=1)) for prompt in prompts]
        drive(runner, lambda: all(handle.future.done() for handle in handles))

    run("cache a", "cache b", "cache a")
    run("cache b", "cache c")
    assert calls == [["cache a", "cache b"], ["cache c"]]
    assert cache.take([((), "cache a")])[0] is cache.take([((), "cache a")])[0]
    monkeypatch.setattr(cache, "max_bytes", 0)  # over budget: only the newest entry stays
    run("cache d")
    run("cache a")
    assert calls[-2:] == [["cache d"], ["cache a"]]


class Accent(Part):
    """A test part that changes how prompts encode (as a text-encoder LoRA does), by a request input."""

    name = "accent"

    def __init__(self):
        super().__init__(None, None)
        self.entered = []

    def used_by(self, request):
        return "accent" in request.part_inputs

    def encoder_context(self, request):
        return request.part_inputs["accent"]

    @contextlib.contextmanager
    def encoding(self, context):
        self.entered.append(context)
        yield


def test_the_prompt_cache_keys_on_what_parts_change_about_encoding(runner_for, monkeypatch):
    runner = runner_for("sd-turbo")
    accent = Accent()
    monkeypatch.setattr(runner, "parts", [accent])
    monkeypatch.setattr(runner.executor, "parts", [accent])
    calls = []
    encode = runner.executor.family.encode
    monkeypatch.setattr(runner.executor.family, "encode", lambda texts: calls.append(list(texts)) or encode(texts))
    requests = [ImageRequest("same words", 64, 64, 1, 0.0, seed=1, part_inputs=inputs)
                for inputs in ({}, {"accent": "x"}, {"accent": "y"}, {"accent": "x"})]
    handles = [runner.submit(request) for request in requests]
    drive(runner, lambda: all(handle.future.done() for handle in handles))
    assert calls == [["same words"]] * 3  # once per context; the repeated context comes from the cache
    assert accent.entered == ["x", "y"]