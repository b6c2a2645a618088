"""The memory and speed launch options (vae_tiling, vae_slicing, attention_slicing, variant, low_cpu_mem_usage,
use_safetensors; the GPU-only ones refused on a CPU): each runs through diffusers' own mechanism, and with it
Kiln's images still match the plain pipeline's and do not depend on their batch neighbours."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import SlicedAttnProcessor

from kiln.engine.catalogue import get_spec
from kiln.engine.errors import ModelLoadError
from kiln.engine.loading import load_model
from kiln.engine.options import LaunchOptionError, parse_launch_options
from kiln.engine.requests import ImageRequest
from kiln.engine.tiny import tiny_checkpoint

from .conftest import PIXEL_TOLERANCE, drive, make_runner, max_diff, pixels, run_alone
from .test_equivalence import diffusers_image

REPO = Path(__file__).resolve().parents[2]


def _alone_batched_and_diffusers(runner, size: int, guidance: float, steps: int = 2, n: int = 1):
    """The target's images alone, beside a neighbour sharing its forwards and decode, and from the pipeline."""
    target = lambda: ImageRequest("a lighthouse", size, size, steps, guidance, seed=11, n=n)  # noqa: E731
    alone = run_alone(runner, target())
    neighbour = runner.submit(ImageRequest("a red car", size, size, steps, guidance, seed=5, n=2))
    batched = runner.submit(target())
    drive(runner, lambda: neighbour.future.done() and batched.future.done())
    reference = [diffusers_image(runner.loaded.pipeline, "default", runner.spec.family.flow, 11 + i,
                                 prompt="a lighthouse", height=size, width=size, num_inference_steps=steps,
                                 guidance_scale=guidance) for i in range(n)]
    return alone, batched, reference


def _assert_same(alone, batched, reference) -> None:
    for index, expected in enumerate(reference):
        assert max_diff(pixels(alone, index), pixels(batched, index)) <= PIXEL_TOLERANCE
        assert max_diff(pixels(alone, index), expected) <= PIXEL_TOLERANCE


def test_vae_tiling_decodes_a_batch_in_tiles_like_diffusers(runner_for):
    """576 px is past the tiny VAE's 512 px tile, so the lane's batched decode (target + neighbour) is tiled."""
    runner = runner_for("sd-turbo", vae_tiling=True)
    vae = runner.loaded.pipeline.vae
    assert vae.use_tiling and 576 > vae.tile_sample_min_size
    alone, batched, reference = _alone_batched_and_diffusers(runner, 576, 0.0)
    _assert_same(alone, batched, reference)
    vae.disable_tiling()
    try:
        untiled = diffusers_image(runner.loaded.pipeline, "default", False, 11, prompt="a lighthouse", height=576,
                                  width=576, num_inference_steps=2, guidance_scale=0.0)
    finally:
        vae.enable_tiling()
    assert max_diff(pixels(alone), untiled) > PIXEL_TOLERANCE  # the tiles' seams blend: tiling really ran


def test_vae_tiling_generates_1024_px(runner_for):
    runner = runner_for("sd-turbo", vae_tiling=True)
    handle = run_alone(runner, ImageRequest("a lighthouse", 1024, 1024, 1, 0.0, seed=3))
    image = pixels(handle)
    assert image.shape == (1024, 1024, 3) and image.std() > 1


def test_vae_tiling_halves_the_decode_peak_at_1024_px(tiny_root):
    """scripts/decode_peak.py in fresh processes: a batch of two 1024x1024 decodes, tiled and not."""

    def peak(tiling: bool) -> int:
        command = [sys.executable, str(REPO / "scripts" / "decode_peak.py"), "sd-turbo", "1024x1024", "--tiny",
                   "--batch", "2", "--option", f"vae_tiling={tiling}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tiny_root)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])["peak_bytes"]

    untiled, tiled = peak(False), peak(True)
    assert tiled < 0.7 * untiled, (tiled, untiled)


def test_vae_slicing_decodes_a_batch_one_image_at_a_time_like_diffusers(runner_for):
    runner = runner_for("stable-diffusion-v1.5", vae_slicing=True)
    assert runner.loaded.pipeline.vae.use_slicing
    alone, batched, reference = _alone_batched_and_diffusers(runner, 64, 5.0, n=3)
    _assert_same(alone, batched, reference)


@pytest.mark.parametrize("slicing", [True, "max"])
def test_attention_slicing_runs_diffusers_sliced_attention_on_eager(runner_for, slicing):
    """Kiln keeps diffusers' SlicedAttnProcessor on every layer (its own processors would undo the slicing), so
    only the eager backend can run it; images match the sliced pipeline and are batch-invariant."""
    runner = runner_for("stable-diffusion-v1.5", attention_slicing=slicing)
    processors = runner.loaded.pipeline.unet.attn_processors.values()
    assert processors and all(isinstance(p, SlicedAttnProcessor) for p in processors)
    assert runner.backend_info["backend"] == "eager"
    assert runner.backend_info["attention"] == "diffusers (SlicedAttnProcessor)"
    alone, batched, reference = _alone_batched_and_diffusers(runner, 64, 5.0)
    _assert_same(alone, batched, reference)


def test_loader_switches_give_the_same_images(runner_for):
    plain = run_alone(runner_for("sd-turbo"), ImageRequest("a fox", 64, 64, 2, 0.0, seed=2))
    switched = runner_for("sd-turbo", low_cpu_mem_usage=False, use_safetensors=True)
    assert max_diff(pixels(plain), pixels(run_alone(switched, ImageRequest("a fox", 64, 64, 2, 0.0, seed=2)))) == 0


def test_variant_loads_the_variant_files(tiny_root, tmp_path):
    """A checkpoint whose UNet exists only as the fp16 variant's files loads with variant=fp16, not without."""
    checkpoint = shutil.copytree(tiny_checkpoint("sd-turbo", cache_root=tiny_root), tmp_path / "sd-turbo")
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    for weights in (checkpoint / "unet").glob("*.safetensors"):
        weights.unlink()
    unet.save_pretrained(checkpoint / "unet", variant="fp16")
    spec = get_spec("sd-turbo")
    loaded = load_model(spec, parse_launch_options(spec, {"model_path": str(checkpoint), "variant": "fp16"}))
    assert torch.equal(next(loaded.pipeline.unet.parameters()), next(unet.parameters()))
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(spec, parse_launch_options(spec, {"model_path": str(checkpoint)}))


@pytest.mark.parametrize(("model", "raw", "option", "words"), [
    ("sd3-medium", {"attention_slicing": True}, "attention_slicing", "UNets only"),
    ("sd-turbo", {"attention_slicing": "half"}, "attention_slicing", "slice size"),
    ("sd-turbo", {"cpu_offload": True, "sequential_cpu_offload": True}, "sequential_cpu_offload", "conflict"),
    ("sd-turbo", {"attention_slicing": True, "backend": "onnx"}, "backend", "eager"),
    ("sd-turbo", {"transformer_quantization": "2-bit"}, "transformer_quantization", "nf4"),
    ("sd-turbo", {"variant": "../fp16"}, "variant", "variant name"),
    ("sd-turbo", {"vae_tiling": "sometimes"}, "vae_tiling", "true or false"),
])
def test_memory_option_errors_name_the_option(model, raw, option, words):
    with pytest.raises(LaunchOptionError, match=words) as caught:
        parse_launch_options(get_spec(model), raw)
    assert caught.value.param == option


def test_options_only_eager_can_run_make_auto_eager():
    spec = get_spec("sd-turbo")
    assert parse_launch_options(spec, {"attention_slicing": True}).backend == "eager"
    assert parse_launch_options(spec, {"sequential_cpu_offload": True}).backend == "eager"
    assert parse_launch_options(spec, {"vae_tiling": True}).backend == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("option", [{"sequential_cpu_offload": True}, {"transformer_quantization": "nf4"}])
def test_gpu_only_options_fail_the_load_on_a_cpu(tiny_root, option):
    name = next(iter(option))
    spec = get_spec("sd-turbo")
    with pytest.raises(ModelLoadError, match=f"{name}.*runs on the CPU.*without {name}"):
        load_model(spec, parse_launch_options(spec, {"tiny": True, **option}))


def test_memory_options_apply_through_a_launch_and_show_in_the_description():
    runner = make_runner("sd-turbo", vae_tiling=True, vae_slicing=True)
    try:
        described = runner.describe()["launch_options"]
        assert described["vae_tiling"] and described["vae_slicing"] and described["attention_slicing"] is None
        assert np.asarray(run_alone(runner, ImageRequest("x", 64, 64, 1, 0.0, seed=1)).result()[0].image).std() > 0
    finally:
        runner.close()
