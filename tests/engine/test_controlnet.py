"""ControlNet in the engine: every tiny ControlNet really changes the image; Kiln's ControlNet images equal
diffusers' ControlNet pipelines' (t2i, img2img, inpainting, multi-ControlNet, guess mode, windows) for the same seed;
a job's image does not depend on its neighbours' ControlNets, scales, windows or guess mode, nor on when they join;
the compile backend runs ControlNet steps on graphs warmed at launch."""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine.catalogue import CATALOGUE, IMAGE2IMAGE, INPAINTING, TEXT2IMAGE, get_spec
from kiln.engine.controlnet_units import ControlUnit, complete_units, part_inputs
from kiln.engine.parts.controlnet.rows import Group, additions
from kiln.engine.requests import ImageRequest

from .conftest import FAMILY_MODELS, PIXEL_TOLERANCE, drive, make_runner, max_diff, pixels, run_alone
from .test_backends import new_runner
from .test_generation import half_mask, init_image

WITH_CONTROLNETS = [name for name, spec in CATALOGUE.items() if spec.controlnets]


def control_image(kind: int = 0) -> Image.Image:
    y, x = np.indices((64, 64))
    pattern = (x + y) % 16 * 16 if kind == 0 else (y // 8 % 2) * 255
    return Image.fromarray(pattern.astype(np.uint8)).convert("RGB")


def controlled(runner, prompt="a fox", steps=5, guidance=4.0, seed=7, units=(), **fields) -> ImageRequest:
    names = [name for name, _ in runner.options.controlnet]
    inputs = part_inputs(complete_units(units, {}, names)) if units else {}
    return ImageRequest(prompt, 64, 64, steps, guidance, seed=seed, part_inputs=inputs, **fields)


def launched(runner_for, name):
    return runner_for(name, controlnet=tuple(get_spec(name).controlnets))


@pytest.mark.parametrize("name", WITH_CONTROLNETS)
def test_every_tiny_controlnet_changes_the_image(runner_for, name):
    """The randomised zero layers make each tiny ControlNet act, and the control image is what it acts with:
    otherwise every ControlNet test would pass with ControlNet doing nothing."""
    runner = launched(runner_for, name)
    guidance = get_spec(name).default_guidance
    plain = pixels(run_alone(runner, controlled(runner, guidance=guidance)))
    for controlnet in get_spec(name).controlnets:
        first = pixels(run_alone(runner, controlled(runner, guidance=guidance,
                                                    units=[ControlUnit(controlnet, control_image(0))])))
        other = pixels(run_alone(runner, controlled(runner, guidance=guidance,
                                                    units=[ControlUnit(controlnet, control_image(1))])))
        assert max_diff(plain, first) >= 24 and np.abs(plain - first).mean() >= 1.0, controlnet
        assert max_diff(first, other) >= 8, f"{controlnet}: the control image does not reach the image"


# --- equivalence with diffusers' ControlNet pipelines -----------------------------------------------------------
def reference(runner, ability, units, seed, **call):
    """diffusers' ControlNet pipeline of the family on the runner's own components and resident ControlNets."""
    family = runner.spec.family
    residents = runner.executor.parts[0].residents
    models = [residents[unit.name].model for unit in units]
    pipeline_class = getattr(diffusers, family.controlnet_pipelines[ability])
    accepted = inspect.signature(pipeline_class.__init__).parameters
    components = {key: value for key, value in runner.loaded.pipeline.components.items() if key in accepted}
    pipeline = pipeline_class(**components, controlnet=models[0] if len(models) == 1 else models)
    pipeline.set_progress_bar_config(disable=True)
    one = len(units) == 1
    images = [unit.image for unit in units]
    control = {"controlnet_conditioning_scale": units[0].scale if one else [u.scale for u in units],
               "control_guidance_start": units[0].start if one else [u.start for u in units],
               "control_guidance_end": units[0].end if one else [u.end for u in units]}
    if family.name in ("sd", "sdxl"):
        control["guess_mode"] = units[0].guess_mode
    key = "image" if ability == TEXT2IMAGE and family.name in ("sd", "sdxl") else "control_image"
    control[key] = images[0] if one else images
    torch.manual_seed(seed)  # SD3's pipeline samples the control latents from the global generator
    image = pipeline(generator=torch.Generator("cpu").manual_seed(seed), height=64, width=64, **control, **call)
    return np.asarray(image.images[0], dtype=np.int16)


CASES = [
    ("stable-diffusion-v1.5", TEXT2IMAGE, dict(scale=0.7, start=0.2, end=0.8)),
    ("stable-diffusion-v1.5", TEXT2IMAGE, dict(scale=1.3, guess_mode=True)),
    ("stable-diffusion-v1.5", IMAGE2IMAGE, dict(scale=0.9, end=0.6)),
    ("stable-diffusion-v1.5", INPAINTING, dict(scale=1.1)),
    ("sd-turbo", TEXT2IMAGE, dict(scale=0.8)),
    ("stable-diffusion-xl-base-1.0", TEXT2IMAGE, dict(scale=0.7, start=0.2, end=0.8)),
    ("stable-diffusion-xl-base-1.0", TEXT2IMAGE, dict(guess_mode=True)),
    ("stable-diffusion-xl-base-1.0", IMAGE2IMAGE, dict(scale=0.9)),
    ("stable-diffusion-xl-base-1.0", INPAINTING, dict(scale=1.1, end=0.7)),
    ("sd3-medium", TEXT2IMAGE, dict(scale=0.7, start=0.2, end=0.8)),
    ("FLUX.1-dev", TEXT2IMAGE, dict(scale=0.7, start=0.2, end=0.8)),
    ("FLUX.1-dev", IMAGE2IMAGE, dict(scale=0.9)),
    ("FLUX.1-dev", INPAINTING, dict(scale=1.1)),
]


@pytest.mark.parametrize(("name", "ability", "unit"), CASES)
def test_matches_diffusers_controlnet_pipeline(runner_for, name, ability, unit):
    runner = launched(runner_for, name)
    flux = runner.spec.family.name == "flux"
    guidance = 3.5 if flux else 4.0
    units = complete_units([ControlUnit(next(iter(runner.spec.controlnets)), control_image(), **unit)], {}, ["x"])
    fields = {} if flux else {"negative_prompt": "fog"}
    if ability != TEXT2IMAGE:  # 5 steps x 0.6: a whole number of steps, which every pipeline rounds alike
        fields.update(image=init_image(), strength=0.6, mask=half_mask() if ability == INPAINTING else None)
    kiln = run_alone(runner, controlled(runner, guidance=guidance, units=units, **fields))
    call = {key: value for key, value in fields.items() if key in ("negative_prompt", "strength")}
    if ability != TEXT2IMAGE:
        call["image"] = init_image()
    if ability == INPAINTING:
        call["mask_image"] = half_mask()
    expected = reference(runner, ability, units, 7, prompt="a fox", num_inference_steps=5, guidance_scale=guidance,
                         **call)
    assert max_diff(pixels(kiln), expected) <= PIXEL_TOLERANCE


def test_multi_controlnet_matches_diffusers(runner_for):
    runner = launched(runner_for, "stable-diffusion-v1.5")
    units = complete_units([ControlUnit("canny", control_image(0), scale=0.6, end=0.8),
                            ControlUnit("seg", control_image(1), scale=1.2, start=0.4)], {}, ["x"])
    kiln = run_alone(runner, controlled(runner, units=units, negative_prompt="fog"))
    expected = reference(runner, TEXT2IMAGE, units, 7, prompt="a fox", negative_prompt="fog", num_inference_steps=5,
                         guidance_scale=4.0)
    assert max_diff(pixels(kiln), expected) <= PIXEL_TOLERANCE


# --- batch invariance ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_same_image_beside_other_controlnets_scales_windows_and_plain_rows(runner_for, family):
    name = FAMILY_MODELS[family]
    runner = launched(runner_for, name)
    first, second = list(runner.spec.controlnets)[:2]
    guess = family in ("sd", "sdxl")
    target = lambda: controlled(runner, "a lighthouse", 6, 4.0, 1234, units=[  # noqa: E731
        ControlUnit(first, control_image(0), scale=0.8, start=0.1, end=0.9)])
    neighbours = [
        controlled(runner, "a stormy sea", 8, 7.0, 99),  # no ControlNet
        controlled(runner, "a red car", 5, 0.0, 5, units=[ControlUnit(second, control_image(1))]),  # another, no CFG
        controlled(runner, "a lighthouse", 6, 4.0, 1234, units=[  # the same one at another scale and window
            ControlUnit(first, control_image(0), scale=1.7, start=0.5)]),
        controlled(runner, "green hills", 7, 5.0, 41, n=2, units=[  # guess mode (SD/SDXL), two units
            ControlUnit(first, control_image(1), guess_mode=guess), ControlUnit(second, control_image(0), end=0.5)]),
    ]
    alone = run_alone(runner, target())
    handles = [runner.submit(neighbours[0])]
    runner.iterate()
    runner.iterate()  # the plain neighbour is two steps in when the target joins
    handle = runner.submit(target())
    runner.iterate()
    handles.append(runner.submit(neighbours[1]))  # joins the target's second step
    runner.iterate()
    handles += [runner.submit(neighbours[2]), runner.submit(neighbours[3])]  # its third
    drive(runner, lambda: handle.future.done() and all(h.future.done() for h in handles))
    assert max_diff(pixels(alone), pixels(handle)) <= PIXEL_TOLERANCE
    for request, batched in zip(neighbours, handles):
        solo = run_alone(runner, request)
        for index in range(len(solo.jobs)):
            assert max_diff(pixels(solo, index), pixels(batched, index)) <= PIXEL_TOLERANCE
    assert max(runner.counters.forward_rows) >= 6  # they really shared forwards
    # Rows without ControlNet on a model launched with it are the plain model's.
    plain = run_alone(runner_for(name), neighbours[0])
    assert max_diff(pixels(plain), pixels(handles[0])) <= PIXEL_TOLERANCE


def test_split_lanes_keep_controlnet_jobs_apart_with_the_same_images(runner_for):
    shared = launched(runner_for, "stable-diffusion-v1.5")
    split = runner_for("stable-diffusion-v1.5", controlnet=("canny",), controlnet_lanes="split")
    with_cn = controlled(split, units=[ControlUnit("canny", control_image())])
    assert split.lane_key(with_cn) != split.lane_key(controlled(split))
    assert shared.lane_key(controlled(shared, units=[ControlUnit("canny", control_image())])) == (
        shared.lane_key(controlled(shared)))
    assert max_diff(pixels(run_alone(split, with_cn)), pixels(run_alone(
        shared, controlled(shared, units=[ControlUnit("canny", control_image())])))) <= PIXEL_TOLERANCE


def test_additions_share_tensors_between_blocks_and_zero_other_rows():
    """Two ControlNets of 2 and 3 samples over 6 blocks, on rows 0 and 2 of 3: each block gets the sum of what
    each gives it (rows without ControlNet zeros), and blocks that get the same samples share one tensor."""
    a = Group(torch.tensor([0]), [torch.full((1, 2), 1.0), torch.full((1, 2), 2.0)], [0, 0, 0, 1, 1, 1])
    b = Group(torch.tensor([2, 0]), [torch.full((2, 2), 10.0 * (k + 1)) for k in range(3)], [0, 0, 1, 1, 2, 2])
    inputs = additions([a, b], [f"control_block_{i}" for i in range(6)], 3)
    assert inputs["control_block_0"] is inputs["control_block_1"]
    assert inputs["control_block_1"] is not inputs["control_block_2"]
    assert inputs["control_block_0"][:, 0].tolist() == [11.0, 0.0, 10.0]
    assert inputs["control_block_3"][:, 0].tolist() == [22.0, 0.0, 20.0]
    assert inputs["control_block_5"][:, 0].tolist() == [32.0, 0.0, 30.0]


# --- backends -----------------------------------------------------------------------------------------------------
def test_compile_runs_controlnet_steps_without_recompiling_after_warmup(tiny_root, monkeypatch):
    """The ControlNet graph variant is warmed at launch with the plain one (dynamo's capture and guards decide
    recompiles whatever compiler runs the graphs; the cheap 'eager' compiler keeps this in seconds)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("KILN_COMPILE_BACKEND", "eager")
    runner = new_runner("stable-diffusion-v1.5", backend="compile", max_batch_size=2, controlnet=("canny", "mlsd"))
    eager = make_runner("stable-diffusion-v1.5", max_batch_size=2, controlnet=("canny", "mlsd"))
    try:
        graphs = counters["stats"]["unique_graphs"]
        requests = lambda r: [controlled(r, units=[ControlUnit("canny", control_image())]),  # noqa: E731
                              controlled(r, "a cat", guidance=0.0, units=[ControlUnit("mlsd", control_image(1))]),
                              controlled(r, "a dog")]
        with torch._dynamo.config.patch(error_on_recompile=True):
            handles = [runner.submit(request) for request in requests(runner)]
            drive(runner, lambda: all(h.future.done() for h in handles))
        assert counters["stats"]["unique_graphs"] == graphs
        for compiled, request in zip(handles, requests(eager)):
            assert max_diff(pixels(compiled), pixels(run_alone(eager, request))) <= PIXEL_TOLERANCE
    finally:
        runner.close()
        eager.close()


def test_guess_mode_is_refused_where_controlnets_have_none(runner_for):
    from kiln.engine.errors import InvalidRequest

    runner = launched(runner_for, "sd3-medium")
    with pytest.raises(InvalidRequest, match="guess mode is a UNet ControlNet feature"):
        runner.submit(controlled(runner, units=[ControlUnit("canny", control_image(), guess_mode=True)]))
