"""Tiny LoRAs, made with peft on the tiny checkpoints and saved as people's files are (diffusers/peft keys, which
ai-toolkit also writes for FLUX.1; one kohya-format SD1.5 file; one XLabs-format file per FLUX model)."""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from kiln.engine.catalogue import get_spec

from .components import SEEDED_INIT


# Layers the tiny LoRAs adapt, by family: attention everywhere, and the feed-forward and resnet convolutions where
# the family has them, so every kind of slot layer (Linear, 1x1 and 3x3 Conv2d) is exercised.
LORA_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_JOINT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_DENOISER_TARGETS: Mapping[str, list[str]] = {
    "sd": [*LORA_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2"],
    "sdxl": [*LORA_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2"],
    "sd3": [*LORA_ATTENTION, *LORA_JOINT, "ff.net.2"],
    "flux": [*LORA_ATTENTION, *LORA_JOINT, "proj_mlp"],
}
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@dataclass(frozen=True)
class LoraRecipe:
    """One tiny LoRA: rank and alpha (alpha != rank, so the alpha/r factor is tested) per component kind;
    `kohya` saves it in kohya/A1111 keys (through diffusers' own converter) instead of diffusers/peft ones;
    `xlabs` writes XLabs' FLUX keys (no library writes them, and peft cannot make their shared q/k/v down weight):
    random weights for every double block's image and text attention, `alpha` unused (XLabs has none)."""

    rank: int
    alpha: float
    denoiser: tuple[str, ...] | None = None  # None: the family's default targets; (): no denoiser weights
    text: bool = False
    kohya: bool = False
    xlabs: bool = False


TINY_LORAS: Mapping[str, LoraRecipe] = {
    "style": LoraRecipe(rank=4, alpha=8),  # the denoiser's attention, feed-forward and convolutions
    "detail": LoraRecipe(rank=8, alpha=16, denoiser=("to_q", "to_v", "to_out.0")),  # another rank, fewer layers
    "text": LoraRecipe(rank=4, alpha=6, denoiser=(), text=True),  # every LoRA-loadable text encoder only
}
KOHYA_LORA = ("kohya", LoraRecipe(rank=4, alpha=4, text=True, kohya=True))  # SD1.5 only
XLABS_LORA = ("xlabs", LoraRecipe(rank=4, alpha=4, denoiser=(), xlabs=True))  # FLUX only
LORA_FORMAT_VERSION = 2  # bump whenever the tiny LoRAs change: part of their cache path


def tiny_lora_recipes(model_name: str) -> Mapping[str, LoraRecipe]:
    spec = get_spec(model_name)
    extra = [KOHYA_LORA] if spec.name == "stable-diffusion-v1.5" else [XLABS_LORA] if spec.family.name == "flux" else []
    return {**TINY_LORAS, **dict(extra)}


def build_tiny_loras(model_name: str, checkpoint: Path, directory: Path) -> list[Path]:
    """Write the tiny LoRAs of one model (made for its tiny checkpoint) into `directory`: <name>.safetensors."""
    return [write_lora(model_name, checkpoint, name, recipe, directory)
            for name, recipe in tiny_lora_recipes(model_name).items()]


def write_lora(model_name: str, checkpoint: Path, name: str, recipe: LoraRecipe, directory: Path) -> Path:
    """One LoRA made with peft on the checkpoint's components, saved as <directory>/<name>.safetensors.

    peft's default init makes B zero, a LoRA that changes nothing and lets every test pass; this uses
    `init_lora_weights=False` (A and B both random), seeded by model and LoRA name so every build is the same."""
    from diffusers import DiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    spec = get_spec(model_name)
    family = spec.family
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline = DiffusionPipeline.from_pretrained(checkpoint)
    loader = getattr(importlib.import_module("diffusers.loaders"), family.lora_loader)
    targets = {family.denoiser: list(LORA_DENOISER_TARGETS[family.name] if recipe.denoiser is None
                                     else recipe.denoiser)}
    if recipe.text:
        targets.update({c: LORA_TEXT_TARGETS for c in loader._lora_loadable_modules if c != family.denoiser})
    layers, metadata = {}, {}
    with SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{spec.name}/{name}".encode()))
        for component, modules in targets.items():
            if not modules:
                continue
            config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=modules,
                                init_lora_weights=False)
            model = getattr(pipeline, component)
            model.add_adapter(config)
            layers[component] = get_peft_model_state_dict(model)
            metadata[component] = config.to_dict()
        xlabs = _xlabs_weights(pipeline.transformer.config, recipe.rank) if recipe.xlabs else None
    path = directory / f"{name}.safetensors"
    if xlabs is not None:
        save_file(xlabs, path)
    elif recipe.kohya:
        peft_keys = {f"{c}.{key}": value for c, state in layers.items() for key, value in state.items()}
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_keys).items()}, path)
    else:
        type(pipeline).save_lora_weights(
            directory, weight_name=path.name, **{f"{c}_lora_layers": state for c, state in layers.items()},
            **{f"{c}_lora_adapter_metadata": meta for c, meta in metadata.items()},
        )
    return path


def _xlabs_weights(config, rank: int) -> dict[str, torch.Tensor]:
    """XLabs keys: per double block and stream (1: image, 2: text) a q/k/v LoRA with one down weight for the
    three and their up weights stacked, and an output projection LoRA; scaled so each delta is about as large
    as the weight it adapts."""
    dim = config.num_attention_heads * config.attention_head_dim
    weights = {}
    for block in range(config.num_layers):
        for stream in (1, 2):
            for kind, outputs in (("qkv", 3 * dim), ("proj", dim)):
                key = f"double_blocks.{block}.processor.{kind}_lora{stream}"
                weights[f"{key}.down.weight"] = torch.randn(rank, dim) / dim**0.5
                weights[f"{key}.up.weight"] = torch.randn(outputs, rank) / rank**0.5
    return weights
