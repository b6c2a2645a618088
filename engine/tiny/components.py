"""Components built from recipes with seeded weights (the same bytes every build), tiny ControlNets made from
the tiny denoiser, and a whole checkpoint written in diffusers' layout."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln.engine.catalogue import CATALOGUE
from kiln.engine.families.specs import FamilySpec

from .recipes import Part, Recipe, TokenizerPart
from .tokenizers import tokenizer_of, write_tokenizer

CONTROLNETS_FOLDER = "controlnets"  # <checkpoint>/controlnets/<name>: a tiny ControlNet per catalogue name


def _token_ids(config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A text encoder's config with the vocabulary size and special ids its tokenizer really produces."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vocab_size = max(config.get("vocab_size", 0), len(tokenizer))
    return dict(config, vocab_size=vocab_size, **{key: value for key, value in ids.items() if value is not None})


# Weights come from torch's global generator, seeded per component: builds in two threads at once would interleave
# draws and lose determinism, so construction is serialised.
SEEDED_INIT = threading.Lock()


def _instantiate(name: str, part: Part, config: Mapping[str, Any], dtype: torch.dtype, device: str):
    """Build one component with weights seeded by its name, so every build gives the same bytes."""
    if not issubclass(part.cls, torch.nn.Module):
        return part.cls.from_config(dict(config))
    with SEEDED_INIT, torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(zlib.crc32(name.encode()))
        if issubclass(part.cls, PreTrainedModel):
            model = part.cls(part.cls.config_class(**config))
        else:
            model = part.cls.from_config(dict(config))
    # Skipping the no-op cast to float32 spares a diffusers warning about casting with `to()`.
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def instantiate_component(recipe: Recipe, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """One component of a recipe, without writing anything: e.g. a reference denoiser on the meta device."""
    part = recipe.parts[name]
    config = part.config
    if name.startswith("text_encoder"):
        config = _token_ids(config, tokenizer_of(recipe.parts[name.replace("text_encoder", "tokenizer")]))
    return _instantiate(name, part, config, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Tiny ControlNets, made from the tiny denoiser as ControlNets are trained from theirs (the encoder copied).
# The layers a ControlNet zero-initialises (its output projections, and the control input's embedding for SD3 and
# FLUX) are drawn at random instead: a ControlNet made from config adds exactly zero, and every test of it would
# pass vacuously. Weights are drawn at unit gain for their fan-in (biases small), and the SD/SDXL control-image
# encoder is redrawn at a gain that keeps its signal through SiLU (slope 1/2 at 0): at PyTorch's default init its
# seven convolutions shrink the image's signal so much that the control image would barely matter.
def _randomise(module: torch.nn.Module, gain: float) -> None:
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, gain / fan_in**0.5)
            if layer.bias is not None:
                layer.bias.normal_(0.0, 0.02)


def _zero_initialised(controlnet: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(controlnet, ControlNetModel):
        return [controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out]
    if isinstance(controlnet, SD3ControlNetModel):
        return [controlnet.controlnet_blocks, controlnet.pos_embed_input]
    return [controlnet.controlnet_blocks, controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]


def make_controlnet(denoiser: torch.nn.Module, family: FamilySpec, name: str) -> torch.nn.Module:
    """A small ControlNet for `denoiser` (the family's own ControlNet class), seeded by `name`, its
    zero-initialised layers randomised."""
    with SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"controlnet-{name}".encode()))
        config = dict(denoiser.config)
        if family.controlnet == "ControlNetModel":
            # One stride-2 stage per VAE downsampling: the control image enters at latent size.
            controlnet = ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=(4, 8, 8, 16))
        elif family.controlnet == "SD3ControlNetModel":
            controlnet = SD3ControlNetModel.from_config({**config, "num_layers": 1, "extra_conditioning_channels": 0})
            for part in ("pos_embed", "time_text_embed", "context_embedder"):
                getattr(controlnet, part).load_state_dict(getattr(denoiser, part).state_dict())
            controlnet.transformer_blocks.load_state_dict(denoiser.transformer_blocks.state_dict(), strict=False)
        else:
            controlnet = FluxControlNetModel.from_transformer(
                denoiser, num_layers=1, num_single_layers=1, attention_head_dim=config["attention_head_dim"],
                num_attention_heads=config["num_attention_heads"],
            )
        with torch.no_grad():
            if isinstance(controlnet, ControlNetModel):
                _randomise(controlnet.controlnet_cond_embedding, 2.5)
            for module in _zero_initialised(controlnet):
                _randomise(module, 1.0)
    return controlnet.eval()


def write_checkpoint(recipe: Recipe, directory: Path, dtype: torch.dtype, device: str,
           controlnets: Iterable[str] = ()) -> Path:
    """Write a checkpoint: model_index.json from the assembled pipeline, then each component's own files, then
    the tiny ControlNets named (under controlnets/<name>)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components: dict[str, Any] = {}
    for name, part in recipe.parts.items():
        if isinstance(part, TokenizerPart):
            write_tokenizer(part, directory / name)
            components[name] = tokenizer_of(part)
        elif part is None:
            components[name] = None
        else:
            components[name] = instantiate_component(recipe, name, dtype, device)
            components[name].save_pretrained(directory / name)
    # Assembling the pipeline checks the components fit together and yields the real model_index.json.
    recipe.pipeline(**components, **recipe.pipeline_config).save_config(directory)
    family = next(spec.family for spec in CATALOGUE.values() if spec.family.pipeline == recipe.pipeline.__name__)
    for name in controlnets:
        make_controlnet(components[family.denoiser], family, name).save_pretrained(directory / CONTROLNETS_FOLDER / name)
    return directory
