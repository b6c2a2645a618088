"""Tiny checkpoints: every catalogue model builds, loads like a real checkpoint, mirrors the real model's structure
and makes a real image; builds are deterministic and cached safely; reference configs have the real sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.engine import tiny
from kiln.engine.catalogue import CATALOGUE, get_spec
from kiln.engine.loading import load_model
from kiln.engine.options import LaunchOptions

MODELS = list(CATALOGUE)


def _checkpoint(tiny_root: Path, name: str) -> Path:
    return tiny.tiny_checkpoint(name, cache_root=tiny_root)


def _config(checkpoint: Path, relative: str) -> dict:
    return json.loads((checkpoint / relative).read_text())


def _generate(pipeline, prompt: str) -> np.ndarray:
    return pipeline(
        prompt, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_loads_and_generates(tiny_root: Path, name: str) -> None:
    spec = get_spec(name)
    loaded = load_model(spec, LaunchOptions(tiny=True, device="cpu"))
    pipeline = loaded.pipeline
    assert loaded.source == str(_checkpoint(tiny_root, name))
    assert type(pipeline).__name__ == spec.family.pipeline
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32

    cat, dog = _generate(pipeline, "a photograph of a cat"), _generate(pipeline, "a painting of a dog")
    assert cat.shape == (1, 64, 64, 3)
    assert np.isfinite(cat).all()
    assert cat.std() > 0.05, "the image is (nearly) constant"
    assert np.abs(cat - dog).max() > 1e-3, "the prompt does not reach the image"

    with torch.no_grad():
        latents = pipeline.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 16 if spec.family.flow else 4, 8, 8)  # the real latent geometry


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_loads_from_model_path(tiny_root: Path, name: str) -> None:
    path = _checkpoint(tiny_root, name)
    loaded = load_model(get_spec(name), LaunchOptions(model_path=str(path), device="cpu"))
    assert loaded.source == str(path)
    assert type(loaded.pipeline).__name__ == get_spec(name).family.pipeline


# (model, config file inside the checkpoint, key, value the real checkpoint has)
REAL_FLAGS = [
    ("sd-turbo", "unet/config.json", "use_linear_projection", True),
    ("sd-turbo", "scheduler/scheduler_config.json", "_class_name", "EulerDiscreteScheduler"),
    ("sd-turbo", "scheduler/scheduler_config.json", "timestep_spacing", "trailing"),
    ("sd-turbo", "model_index.json", "requires_safety_checker", False),
    ("sd-turbo", "model_index.json", "safety_checker", [None, None]),
    ("stable-diffusion-v1.5", "unet/config.json", "use_linear_projection", False),
    ("stable-diffusion-v1.5", "scheduler/scheduler_config.json", "_class_name", "PNDMScheduler"),
    ("stable-diffusion-v1.5", "scheduler/scheduler_config.json", "skip_prk_steps", True),
    ("stable-diffusion-v1.5", "scheduler/scheduler_config.json", "steps_offset", 1),
    ("stable-diffusion-v1.5", "vae/config.json", "scaling_factor", 0.18215),
    ("sdxl-turbo", "scheduler/scheduler_config.json", "_class_name", "EulerAncestralDiscreteScheduler"),
    ("sdxl-turbo", "scheduler/scheduler_config.json", "timestep_spacing", "trailing"),
    ("sdxl-turbo", "unet/config.json", "addition_embed_type", "text_time"),
    ("sdxl-turbo", "model_index.json", "force_zeros_for_empty_prompt", True),
    ("sdxl-turbo", "text_encoder_2/config.json", "architectures", ["CLIPTextModelWithProjection"]),
    ("stable-diffusion-xl-base-1.0", "scheduler/scheduler_config.json", "_class_name", "EulerDiscreteScheduler"),
    ("stable-diffusion-xl-base-1.0", "vae/config.json", "scaling_factor", 0.13025),
    ("sd3-medium", "scheduler/scheduler_config.json", "_class_name", "FlowMatchEulerDiscreteScheduler"),
    ("sd3-medium", "scheduler/scheduler_config.json", "shift", 3.0),
    ("sd3-medium", "vae/config.json", "latent_channels", 16),
    ("sd3-medium", "vae/config.json", "scaling_factor", 1.5305),
    ("sd3-medium", "vae/config.json", "shift_factor", 0.0609),
    ("sd3-medium", "text_encoder_3/config.json", "architectures", ["T5EncoderModel"]),
    ("FLUX.1-dev", "transformer/config.json", "guidance_embeds", True),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "use_dynamic_shifting", True),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "base_shift", 0.5),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "max_shift", 1.15),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "base_image_seq_len", 256),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "max_image_seq_len", 4096),
    ("FLUX.1-dev", "scheduler/scheduler_config.json", "shift", 3.0),
    ("FLUX.1-dev", "vae/config.json", "scaling_factor", 0.3611),
    ("FLUX.1-dev", "vae/config.json", "shift_factor", 0.1159),
    ("FLUX.1-schnell", "transformer/config.json", "guidance_embeds", False),
    ("FLUX.1-schnell", "scheduler/scheduler_config.json", "use_dynamic_shifting", False),
    ("FLUX.1-schnell", "scheduler/scheduler_config.json", "shift", 1.0),
]


@pytest.mark.parametrize(("name", "relative", "key", "value"), REAL_FLAGS)
def test_tiny_model_has_the_real_flags(tiny_root: Path, name: str, relative: str, key: str, value: object) -> None:
    assert _config(_checkpoint(tiny_root, name), relative)[key] == value


def test_cross_component_dimensions_match(tiny_root: Path) -> None:
    sd3 = _checkpoint(tiny_root, "sd3-medium")
    clip_widths = [_config(sd3, f"{folder}/config.json")["hidden_size"] for folder in ("text_encoder", "text_encoder_2")]
    t5_width = _config(sd3, "text_encoder_3/config.json")["d_model"]
    assert clip_widths[0] != clip_widths[1]  # mixing the two CLIP encoders up must fail loudly
    assert t5_width >= sum(clip_widths)
    flux = _config(_checkpoint(tiny_root, "FLUX.1-dev"), "transformer/config.json")
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]


def test_tokenizers_are_real_clip_and_t5(tiny_root: Path) -> None:
    from diffusers import DiffusionPipeline

    sd3 = _checkpoint(tiny_root, "sd3-medium")
    assert {p.name for p in (sd3 / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    assert (sd3 / "tokenizer_3" / "spiece.model").is_file()
    pipeline = DiffusionPipeline.from_pretrained(sd3)

    for suffix, pad in (("", "<|endoftext|>"), ("_2", "!")):
        tokenizer = getattr(pipeline, f"tokenizer{suffix}")
        encoder = getattr(pipeline, f"text_encoder{suffix}").config
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
        assert tokenizer.eos_token_id == len(tokenizer) - 1  # highest id, as CLIP's argmax pooling assumes
        assert (encoder.bos_token_id, encoder.eos_token_id, encoder.pad_token_id) == (
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        assert encoder.vocab_size == len(tokenizer)
        # Whole words prove the merges were loaded (transformers 5 can silently build a merge-less tokenizer).
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("A photograph of a cat").input_ids)
        assert tokens == ["<|startoftext|>", "a</w>", "photograph</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]

    t5, t5_encoder = pipeline.tokenizer_3, pipeline.text_encoder_3.config
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert (t5_encoder.pad_token_id, t5_encoder.eos_token_id, t5_encoder.vocab_size) == (0, 1, len(t5))
    ids = t5("A photograph of a cat").input_ids
    assert ids[-1] == 1 and t5.unk_token_id not in ids


def test_tiny_components_are_tiny(tiny_root: Path) -> None:
    from diffusers import DiffusionPipeline

    for name in MODELS:
        pipeline = DiffusionPipeline.from_pretrained(_checkpoint(tiny_root, name))
        for component, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module):
                count = sum(p.numel() for p in module.parameters())
                assert 1_000 < count < 1_500_000, f"{name} {component} has {count} parameters"


@pytest.mark.parametrize("name", ["sd-turbo", "FLUX.1-dev"])
def test_builds_are_deterministic(tiny_root: Path, tmp_path: Path, name: str) -> None:
    """A fresh build equals the cached one byte for byte; the cached one may come from an earlier process."""
    fresh = tiny.build_tiny(name, tmp_path / name)
    cached = _checkpoint(tiny_root, name)
    files = sorted(path.relative_to(fresh) for path in fresh.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(cached) for path in cached.rglob("*") if path.is_file())
    for relative in files:
        assert (fresh / relative).read_bytes() == (cached / relative).read_bytes(), (
            f"{relative} differs from the cached build: if the builder changed on purpose, bump "
            "kiln.engine.tiny.FORMAT_VERSION"
        )
    weights = "unet" if get_spec(name).family.denoiser == "unet" else "transformer"
    assert (fresh / weights / "diffusion_pytorch_model.safetensors").stat().st_size > 10_000


def test_tiny_checkpoint_is_cached_under_a_versioned_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    assert tiny.default_cache_root() == tmp_path / "tiny"
    path = tiny.tiny_checkpoint("FLUX.1-schnell")
    assert path == tmp_path / "tiny" / f"v{tiny.FORMAT_VERSION}" / "FLUX.1-schnell"

    def no_rebuild(*args: object) -> None:
        raise AssertionError("a cached checkpoint was rebuilt")

    monkeypatch.setattr(tiny, "build_tiny", no_rebuild)
    assert tiny.tiny_checkpoint("FLUX.1-schnell") == path


def test_tiny_checkpoint_uses_the_winner_of_a_build_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / f"v{tiny.FORMAT_VERSION}" / "FLUX.1-schnell"
    real_build = tiny.build_tiny

    def another_process_finishes_first(name: str, directory: Path) -> Path:
        real_build(name, target)
        (target / "winner").touch()
        return real_build(name, directory)

    monkeypatch.setattr(tiny, "build_tiny", another_process_finishes_first)
    assert tiny.tiny_checkpoint("FLUX.1-schnell", cache_root=tmp_path) == target
    assert (target / "winner").exists()
    assert [path.name for path in target.parent.iterdir()] == ["FLUX.1-schnell"]  # the loser's copy is gone


def test_build_all_checks_every_name_before_writing(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no-such-model"):
        tiny.build_all(tmp_path, ["sd-turbo", "no-such-model"])
    assert not any(tmp_path.iterdir())
    assert tiny.build_all(tmp_path, ["FLUX.1-schnell"], loras=False) == [tmp_path / "FLUX.1-schnell"]


# (model, component, parameter range of the real model)
REFERENCE_SIZES = [
    ("stable-diffusion-v1.5", "unet", 855e6, 865e6),
    ("stable-diffusion-v1.5", "text_encoder", 120e6, 125e6),
    ("stable-diffusion-v1.5", "vae", 83e6, 84e6),
    ("sd-turbo", "unet", 860e6, 870e6),
    ("stable-diffusion-xl-base-1.0", "unet", 2.55e9, 2.6e9),
    ("stable-diffusion-xl-base-1.0", "text_encoder_2", 690e6, 700e6),
    ("sd3-medium", "transformer", 2.0e9, 2.1e9),
    ("sd3-medium", "text_encoder_3", 4.7e9, 4.8e9),
    ("FLUX.1-dev", "transformer", 11.8e9, 12.0e9),
    ("FLUX.1-schnell", "transformer", 11.8e9, 12.0e9),
]


@pytest.mark.parametrize(("name", "component", "low", "high"), REFERENCE_SIZES)
def test_reference_configs_have_real_sizes(name: str, component: str, low: float, high: float) -> None:
    module = tiny.instantiate_component(tiny.REFERENCE_CONFIGS[name], component, device="meta")
    params = list(module.parameters())
    assert all(p.is_meta for p in params)
    assert low <= sum(p.numel() for p in params) <= high
