"""Reading LoRA files as people have them, with diffusers' own conversions, into plain per-layer deltas.

A file is read by the family's LoRA loader mixin (`lora_state_dict`: kohya/A1111, ai-toolkit, XLabs and the
other formats diffusers knows become peft-style keys), then each component's share goes through the same key
conversions diffusers applies before it injects peft layers, and each layer's alpha comes from the same rules
(the file's adapter metadata, or its network alphas, through `get_peft_kwargs` and peft's pattern match). What
comes out is, per adapted layer, A `[r, in(, kh, kw)]` and B·(alpha/r) `[out, r]` in float32 on the CPU: a
request's scale is then the only factor left, as with `set_adapters(names, weights)`.

What is not a plain low-rank delta (DoRA, LoKr, LoRA biases, the norm weights of FLUX Control LoRAs) is refused,
and so is what does not fit the model (a layer it lacks, a shape it does not have): the error names the file and
the layer, at launch or at the LoRA's first use, never inside a batch.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from diffusers import loaders
from diffusers.utils import get_peft_kwargs
from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                              convert_unet_state_dict_to_peft)
from peft.utils.other import get_pattern_key
from torch import nn

from ...errors import InvalidRequest

# Loader mixins whose pipeline passes the UNet config to lora_state_dict (to map kohya SDXL block numbers).
_PASSES_UNET_CONFIG = frozenset({"StableDiffusionXLLoraLoaderMixin"})
# The text-encoder layers diffusers reads ranks from (`_load_lora_into_text_encoder`).
_TEXT_RANK_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
_WEIGHT_KEYS = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class LoraFileError(InvalidRequest):
    """A LoRA file cannot be read, or does not fit this model; the message names the file and the layer."""

    def __init__(self, message: str):
        super().__init__(message, "lora", "invalid_lora")


@dataclass(frozen=True)
class Site:
    """A layer a LoRA may adapt (a plain Linear, or a Conv2d without groups or dilation) and its shape; or, kind
    "other", a Linear or Conv2d it cannot (quantized, grouped, dilated), kept to say so."""

    kind: str  # "linear", "conv" or "other"
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    layer_type: str = ""

    @property
    def plain(self) -> bool:
        return self.kind != "other"

    def fits(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        rank = a.shape[0]
        if self.kind == "linear":
            return tuple(a.shape) == (rank, self.in_features) and tuple(b.shape) == (self.out_features, rank)
        return (tuple(a.shape) == (rank, self.in_features, *self.kernel)
                and tuple(b.shape) == (self.out_features, rank, 1, 1))

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.in_features} -> {self.out_features}"
        return f"Conv2d {self.in_features} -> {self.out_features}, kernel {'x'.join(map(str, self.kernel))}"


Sites = Mapping[str, Mapping[str, Site]]  # component -> layer name -> site


def adaptable(module: nn.Module) -> Site | None:
    """The site of a Linear or Conv2d layer (kind "other" where LoRA cannot adapt it: quantized layers are
    subclasses); None for any other module."""
    if type(module) is nn.Linear:
        return Site("linear", module.in_features, module.out_features)
    if (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros"):
        return Site("conv", module.in_channels, module.out_channels, tuple(module.kernel_size))
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return Site("other", 0, 0, layer_type=type(module).__name__)
    return None


def loader_of(family_spec: Any) -> type:
    return getattr(loaders, family_spec.lora_loader)


def sites_of(pipeline: Any, loader: type) -> dict[str, dict[str, Site]]:
    """Every Linear and Conv2d layer of every component the family's LoRA files may adapt, by component."""
    sites: dict[str, dict[str, Site]] = {}
    for component in loader._lora_loadable_modules:
        model = getattr(pipeline, component, None)
        if isinstance(model, nn.Module):
            sites[component] = {name: site for name, module in model.named_modules()
                                if (site := adaptable(module)) is not None}
    return sites


@dataclass(frozen=True, eq=False)
class Adapter:
    """One parsed LoRA. `key` names it together with its file's size and time, for every cache key."""

    name: str
    source: str
    key: str
    weights: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def components(self) -> frozenset[str]:
        return frozenset(component for component, _ in self.weights)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def fingerprint(path: str, weight_name: str | None = None) -> str:
    """Size and modification time of the file a LoRA comes from (a folder's weight file when given)."""
    target = os.path.join(path, weight_name) if weight_name and os.path.isdir(path) else path
    try:
        stat = os.stat(target)
    except OSError:
        return "missing"
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def read_adapter(name: str, path: str, loader: type, denoiser: str, sites: Sites,
                 load_kwargs: Mapping[str, Any] = {}, denoiser_config: Any = None) -> Adapter:
    """Parse the LoRA file at `path` for a model whose adaptable layers are `sites`; LoraFileError when it
    cannot be read or does not fit."""
    shown = f"LoRA {name!r} ({path})"
    kwargs = {key: value for key, value in load_kwargs.items() if key != "low_cpu_mem_usage"}
    if loader.__name__ in _PASSES_UNET_CONFIG and denoiser_config is not None:
        kwargs["unet_config"] = denoiser_config
    try:
        state, alphas, metadata = _state_dict(loader, path, kwargs)
    except Exception as error:  # noqa: BLE001 - missing, corrupt, pickled or not a LoRA: all the user's file
        raise LoraFileError(f"{shown} cannot be read as a LoRA file: {type(error).__name__}: {error}") from None
    if not state:
        raise LoraFileError(f"{shown} holds no weights")
    foreign = sorted({key.split(".")[0] for key in state} - set(loader._lora_loadable_modules))
    if foreign:
        raise LoraFileError(f"{shown} holds weights for {', '.join(foreign)}, which {loader.__name__} files do "
                            f"not have (it reads {', '.join(loader._lora_loadable_modules)}): it was made for "
                            "another kind of model")
    weights: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for component in loader._lora_loadable_modules:
        part = _component_part(state, component)
        if not part:
            continue
        if component not in sites:
            raise LoraFileError(f"{shown} adapts {component}, which this model was launched without")
        part, config = _converted(part, component, component == denoiser, alphas, metadata, sites[component])
        for layer, (a, b) in _layers(part, shown, component).items():
            site = sites[component].get(layer)
            if site is None:
                raise LoraFileError(f"{shown} adapts {component}.{layer}, which this model does not have: it was "
                                    "made for another base model")
            if not site.plain:
                raise LoraFileError(f"{shown} adapts {component}.{layer}, a {site.layer_type} layer, which takes no "
                                    "LoRA (only plain Linear and Conv2d layers do): launch the model without "
                                    f"quantizing {component}")
            if not site.fits(a, b):
                raise LoraFileError(f"{shown} does not fit {component}.{layer} ({site.describe()}): its A is "
                                    f"{tuple(a.shape)} and B {tuple(b.shape)}; it was made for another base model")
            weights[(component, layer)] = (a.float().contiguous(),
                                           (b.float() * _scaling(config, layer, a.shape[0])).reshape(b.shape[0], -1))
    if not weights:
        raise LoraFileError(f"{shown} adapts nothing of this model")
    return Adapter(name, path, f"{name}@{fingerprint(path, load_kwargs.get('weight_name'))}", weights)


def _state_dict(loader: type, path: str, kwargs: Mapping[str, Any]) -> tuple[dict, dict | None, dict | None]:
    """The mixin's `lora_state_dict`, with network alphas and adapter metadata whatever its return shape."""
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:  # FLUX's mixin
        kwargs = {**kwargs, "return_alphas": True}
    out = loader.lora_state_dict(path, return_lora_metadata=True, **kwargs)
    return (out[0], out[1], out[2]) if len(out) == 3 else (out[0], None, out[1])


def _component_part(mapping: Mapping[str, Any] | None, component: str) -> dict[str, Any]:
    prefix = f"{component}."
    return {key[len(prefix):]: value for key, value in (mapping or {}).items() if key.startswith(prefix)}


def _converted(part: dict, component: str, is_denoiser: bool, alphas: Mapping | None, metadata: Mapping | None,
               sites: Mapping[str, Site]) -> tuple[dict, Mapping[str, Any]]:
    """One component's keys in peft form and its LoRA config, as diffusers' `load_lora_adapter` (denoiser) and
    `_load_lora_into_text_encoder` derive them."""
    own_meta = _component_part(metadata, component) or None
    if is_denoiser:
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        rank = {f"^{key}": value.shape[1] for key, value in part.items() if "lora_B" in key and value.ndim > 1}
        own_alphas = _component_part(alphas, component)
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not any(name.startswith("text_model.") for name in sites):
            part = {key.removeprefix("text_model."): value for key, value in part.items()}
        rank = {key: part[key].shape[1] for name in sites if name.endswith(_TEXT_RANK_LAYERS)
                if (key := f"{name}.lora_B.weight") in part}
        own_alphas = {key.removeprefix(f"{component}."): value for key, value in (alphas or {}).items()
                      if key.split(".")[0] == component}
    if own_meta:
        config = own_meta
    elif rank:
        config = get_peft_kwargs(rank, own_alphas or None, part, is_unet=is_denoiser)
    else:
        config = {"lora_alpha": None}  # no rank diffusers reads: each layer keeps alpha = its rank
    if config.get("use_dora"):
        raise LoraFileError(f"LoRA for {component} is a DoRA adapter, which Kiln cannot apply")
    return part, config


def _layers(part: Mapping[str, torch.Tensor], shown: str,
            component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per layer name; any other key (DoRA magnitudes, LoKr factors, LoRA biases, norms) is refused."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in part.items():
        marker = next((m for m in _WEIGHT_KEYS if key.endswith(m)), None)
        if marker is None or not isinstance(tensor, torch.Tensor):
            raise LoraFileError(f"{shown}: {component}.{key} is not a plain LoRA weight (lora_A/lora_B); DoRA, "
                                "LoKr, LoRA biases and norm weights cannot be applied")
        found.setdefault(key[: -len(marker)], {})[_WEIGHT_KEYS[marker]] = tensor
    incomplete = sorted(layer for layer, pair in found.items() if set(pair) != {"A", "B"})
    if incomplete:
        raise LoraFileError(f"{shown}: {component}.{incomplete[0]} has lora_A or lora_B but not both")
    return {layer: (pair["A"], pair["B"]) for layer, pair in found.items()}


def _scaling(config: Mapping[str, Any], layer: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) for rsLoRA), with alpha per layer as peft resolves it from the config."""
    if config.get("lora_alpha") is None:
        return 1.0
    pattern = config.get("alpha_pattern") or {}
    alpha = pattern.get(get_pattern_key(list(pattern), layer), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
