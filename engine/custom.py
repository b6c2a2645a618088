"""Models users register by name (Xinference's custom image models): a local diffusers folder, its family, its
abilities and its defaults, turned into the same `ModelSpec` a catalogue name has, so a registered name launches
and serves like a built-in one.

The family is the one the registration names, or, when it says only Xinference's generic "stable_diffusion" (or
nothing), the one whose pipeline class the checkpoint's model_index.json names. That file is read at launch, not
at registration: a registration body is untrusted, and registering reads nothing but whether the folder exists.
Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .catalogue import CATALOGUE, ModelSpec, controlnets
from .errors import InvalidRequest
from .families.specs import FAMILY_SPECS, INPAINTING, FamilySpec

GENERIC_FAMILY = "stable_diffusion"  # what Xinference's image specs say for every diffusers model
FAMILY_NAMES = (GENERIC_FAMILY, *FAMILY_SPECS)
# Each family's defaults (size, steps, guidance, dtype, largest size) come from its catalogue base model: the one
# that does everything (stable-diffusion-v1.5, stable-diffusion-xl-base-1.0, sd3-medium, FLUX.1-dev).
FAMILY_BASES: Mapping[str, ModelSpec] = MappingProxyType({
    family: next(spec for spec in CATALOGUE.values() if spec.family.name == family and INPAINTING in spec.abilities)
    for family in FAMILY_SPECS
})


def detect_family(path: Path) -> FamilySpec:
    """The family whose pipeline class `path`'s model_index.json names; InvalidRequest (param model_uri) when the
    folder is not a diffusers checkpoint of a family Kiln runs."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InvalidRequest(f"model_uri {str(path)!r} is not a diffusers checkpoint: it has no readable "
                             "model_index.json", "model_uri") from None
    found = index.get("_class_name") if isinstance(index, dict) else None
    for family in FAMILY_SPECS.values():
        if family.pipeline == found:
            return family
    accepted = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILY_SPECS.values())
    raise InvalidRequest(f"model_uri {str(path)!r} holds a {found} checkpoint, which Kiln cannot run; accepted: "
                         f"{accepted}", "model_uri")


def custom_spec(name: str, family: str, abilities: tuple[str, ...], path: Path, launch: Mapping[str, Any],
                parameters: Mapping[str, Any], controlnet_folders: Mapping[str, str] = MappingProxyType({})
                ) -> ModelSpec:
    """The ModelSpec of a registered model at launch: its family (detected when `family` is generic), its base
    model's defaults overridden by `parameters` (default_generate_config), and `launch` (default_model_config).
    Its weights are its folder, and its ControlNets' their folders (`hub_id`s, which the loaders read as local
    folders for a model that is not built in)."""
    family_spec = detect_family(path) if family == GENERIC_FAMILY else FAMILY_SPECS[family]
    base = FAMILY_BASES[family_spec.name]
    return ModelSpec(
        name=name, family=family_spec, hub_id=str(path), abilities=abilities or base.abilities,
        default_size=base.default_size, default_steps=base.default_steps, default_guidance=base.default_guidance,
        default_dtype=base.default_dtype, max_size=base.max_size,
        default_launch=MappingProxyType(dict(launch)),
        default_parameters=MappingProxyType(dict(parameters)), builtin=False,
        controlnets=controlnets(controlnet_folders),
    )
