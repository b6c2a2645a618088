"""Find and load a launch's ControlNets, refusing one made for another denoiser before its weights are read.

A ControlNet comes from, in order: the launch's `{name: local path}`, the tiny checkpoint's tiny ControlNet of
that name (launch option tiny), the Hugging Face cache, the hub (never while HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

from kiln.engine.errors import ModelLoadError
from kiln.engine.loading import LOAD_LOCK, hub_snapshot
from kiln.engine.tiny import CONTROLNETS_FOLDER, tiny_checkpoint

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class Resident:
    """One loaded ControlNet: its launch name, the module, where it came from."""

    name: str
    model: torch.nn.Module
    source: str
    hub_id: str | None

    def describe(self) -> dict[str, Any]:
        return {"model_family": "controlnet", "model_name": self.name, "model_id": self.hub_id,
                "model_path": self.source, "class": type(self.model).__name__,
                "bytes": sum(p.numel() * p.element_size() for p in self.model.parameters())}


def load_controlnets(spec: Any, options: Any, family: Any) -> dict[str, Resident]:
    """Every ControlNet the launch names, on the family's device in its dtype, by name."""
    loaded = {}
    for name, path in options.controlnet:
        folder = _folder(spec, options, name, path)
        config = _config(name, folder)
        check_fits(name, config, spec, family)
        model_class = getattr(diffusers, spec.family.controlnet)
        with LOAD_LOCK:
            try:
                model = model_class.from_pretrained(folder, torch_dtype=family.dtype)
            except Exception as error:  # corrupt or partial checkpoints fail in many library-specific ways
                raise ModelLoadError(f"ControlNet {name!r}: could not load {folder}: {error}") from error
        hub_id = spec.controlnets[name].hub_id if path is None and name in spec.controlnets else None
        loaded[name] = Resident(name, model.to(family.device).eval(), str(folder), hub_id)
    return loaded


def _folder(spec: Any, options: Any, name: str, path: str | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    if not spec.builtin:  # a registered model's ControlNets are the local folders its registration named
        return Path(spec.controlnets[name].hub_id)
    if options.tiny:
        return tiny_checkpoint(spec.name) / CONTROLNETS_FOLDER / name
    hub_id = spec.controlnets[name].hub_id
    folder = hub_snapshot(hub_id, f"the weights of ControlNet {name!r}", "config.json",
                          ["config.json", _WEIGHTS[0]], [],
                          f"launch with controlnet={{{name!r}: <a local ControlNet directory>}}")
    if not any((folder / weights).is_file() for weights in _WEIGHTS):  # an old repository with .bin weights only
        folder = hub_snapshot(hub_id, f"the weights of ControlNet {name!r}", _WEIGHTS[1], [_WEIGHTS[1]], [], "")
    return folder


def _config(name: str, folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"ControlNet {name!r}: {folder} is not a diffusers ControlNet directory (its "
                             f"config.json: {error}); pass the folder that holds config.json and the weights") from None


def _architecture(config: dict[str, Any]) -> str:
    """What a ControlNet config was made for, in words."""
    kind = config.get("_class_name", "an unknown class")
    if kind == "FluxControlNetModel":
        return f"FLUX.1-{'dev' if config.get('guidance_embeds') else 'schnell'} ({kind})"
    if kind == "SD3ControlNetModel":
        return f"SD3 ({kind})"
    if kind == "ControlNetModel":
        if config.get("addition_embed_type") == "text_time":
            return f"SDXL ({kind}, cross_attention_dim {config.get('cross_attention_dim')})"
        known = {768: "SD 1.x", 1024: "SD 2.x"}.get(config.get("cross_attention_dim"), "a UNet")
        return f"{known} ({kind}, cross_attention_dim {config.get('cross_attention_dim')})"
    return kind


# Config keys whose values a ControlNet must share with the denoiser, per ControlNet class.
_SHARED = {
    "ControlNetModel": ("cross_attention_dim", "block_out_channels", "addition_embed_type",
                        "projection_class_embeddings_input_dim", "in_channels", "attention_head_dim",
                        "use_linear_projection"),
    "SD3ControlNetModel": ("in_channels", "patch_size", "pooled_projection_dim", "caption_projection_dim"),
    "FluxControlNetModel": ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds"),
}


def _value(config: Any, key: str) -> Any:
    """A config value as compared: per-block values written once (an int) count as that value for every block."""
    value = config.get(key)
    if key == "attention_head_dim" and isinstance(value, int):
        return [value] * len(config.get("block_out_channels", ()))
    return list(value) if isinstance(value, (list, tuple)) else value


def check_fits(name: str, config: dict[str, Any], spec: Any, family: Any) -> None:
    """Refuse a ControlNet made for another denoiser (a 400 at launch naming what it is for), and the kinds this
    engine does not run (union, XLabs-style FLUX, inpainting ControlNets with extra input channels)."""
    denoiser = family.denoiser.config
    kind, expected = config.get("_class_name"), spec.family.controlnet
    mismatched = [key for key in _SHARED.get(kind, ()) if _value(config, key) != _value(denoiser, key)]
    if kind == "SD3ControlNetModel" and config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0) != (
            denoiser.num_attention_heads * denoiser.attention_head_dim):
        mismatched.append("num_attention_heads x attention_head_dim")
    if kind != expected or mismatched:
        what = f"differs in {', '.join(mismatched)}" if kind == expected else f"is not a {expected}"
        extra = ""
        if "guidance_embeds" in mismatched:
            extra = (" (FLUX.1-dev ControlNets embed guidance and FLUX.1-schnell has no guidance embedding, so the two "
                     "never mix)")
        raise ModelLoadError(f"ControlNet {name!r} is a ControlNet for {_architecture(config)}: it {what} from "
                             f"{spec.name}'s {spec.family.denoiser}{extra}; launch {spec.name} with a ControlNet made "
                             f"for it (catalogue names: {', '.join(spec.controlnets) or 'none'})")
    unsupported = {"num_mode": "union ControlNets (a control mode per image)",
                   "conditioning_embedding_channels": "XLabs-style FLUX ControlNets (pixel control input)",
                   "extra_conditioning_channels": "inpainting ControlNets (a mask as extra control channels)"}
    for key, words in unsupported.items():
        if config.get(key):
            raise ModelLoadError(f"ControlNet {name!r}: Kiln does not run {words} yet ({key}={config[key]})")
