"""Kiln's image for a seed is the plain diffusers pipeline's image for the same seed and parameters."""

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image

from kiln.engine.catalogue import CATALOGUE, IMAGE2IMAGE, get_spec
from kiln.engine.requests import ImageRequest
from kiln.engine.samplers import make_sampler

from .conftest import PIXEL_TOLERANCE, max_diff, pixels, run_alone
from .test_generation import init_image


def diffusers_image(pipeline, sampler: str, flow: bool, seed: int, **call) -> np.ndarray:
    """One plain pipeline call with the sampler swapped in (as Xinference does) and a CPU generator."""
    original = pipeline.scheduler
    pipeline.scheduler = make_sampler(sampler, original, flow)
    try:
        image = pipeline(generator=torch.Generator("cpu").manual_seed(seed), **call).images[0]
    finally:
        pipeline.scheduler = original
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_text_to_image_matches_diffusers(runner_for, name):
    spec = get_spec(name)
    runner = runner_for(name)
    guidance = spec.default_guidance
    sampler = "default"
    kiln = run_alone(runner, ImageRequest("a lighthouse", 64, 64, 4, guidance, seed=21, sampler=sampler,
                                          negative_prompt="fog" if guidance > 1 else None))
    reference = diffusers_image(
        runner.loaded.pipeline, sampler, spec.family.flow, 21, prompt="a lighthouse", height=64, width=64,
        num_inference_steps=4, guidance_scale=guidance, **({"negative_prompt": "fog"} if guidance > 1 else {}),
    )
    assert max_diff(pixels(kiln), reference) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE Karras", "Heun", "DPM2 a"])
def test_stochastic_and_second_order_samplers_match_diffusers(runner_for, sampler):
    runner = runner_for("stable-diffusion-v1.5")
    kiln = run_alone(runner, ImageRequest("a fox", 64, 64, 4, 6.0, seed=8, sampler=sampler))
    reference = diffusers_image(runner.loaded.pipeline, sampler, False, 8, prompt="a fox", height=64, width=64,
                                num_inference_steps=4, guidance_scale=6.0)
    assert max_diff(pixels(kiln), reference) <= PIXEL_TOLERANCE


# 5 x 0.6 is whole; 4 x 0.3 is not, where UNet and flow-matching pipelines round the kept steps differently.
@pytest.mark.parametrize("steps, strength", [(5, 0.6), (4, 0.3)])
@pytest.mark.parametrize("name", [n for n, s in CATALOGUE.items() if IMAGE2IMAGE in s.abilities])
def test_image_to_image_matches_diffusers(runner_for, name, steps, strength):
    spec = get_spec(name)
    runner = runner_for(name)
    kiln = run_alone(runner, ImageRequest("a fox", 64, 64, steps, spec.default_guidance, image=init_image(),
                                          strength=strength, seed=4))
    img2img = AutoPipelineForImage2Image.from_pipe(runner.loaded.pipeline)
    reference = diffusers_image(img2img, "default", spec.family.flow, 4, prompt="a fox", image=init_image(), height=64,
                                width=64, strength=strength, num_inference_steps=steps,
                                guidance_scale=spec.default_guidance)
    assert max_diff(pixels(kiln), reference) <= PIXEL_TOLERANCE
