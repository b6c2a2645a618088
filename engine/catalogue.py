"""The built-in models Kiln knows by name, with the defaults Xinference's registry gives them.

A catalogue entry is pure data: which family adapter runs it, where its weights live on the hub, what it can do,
and the defaults a request or a launch falls back to. Nothing here touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

TEXT2IMAGE = "text2image"
IMAGE2IMAGE = "image2image"
INPAINTING = "inpainting"
OCR = "ocr"

# Latent stride: sizes must be multiples of this (VAE factor 8, times the 2x2 patching of SD3/FLUX).
FAMILY_STRIDE = {"sd": 8, "sdxl": 8, "sd3": 16, "flux": 16}
MIN_SIZE = 64  # smallest width or height: 8x8 latents
# Flow-matching families step with FlowMatchEuler only.
FLOW_FAMILIES = frozenset({"sd3", "flux"})


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue model: its family adapter, weights location, abilities and defaults."""

    name: str
    family: str
    hub_id: str
    abilities: tuple[str, ...]
    default_size: tuple[int, int]  # (width, height)
    default_steps: int
    default_guidance: float
    default_dtype: str
    max_size: int  # largest width or height accepted, in pixels
    default_launch: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def stride(self) -> int:
        return FAMILY_STRIDE[self.family]

    @property
    def min_size(self) -> int:
        return MIN_SIZE

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    def describe(self) -> dict:
        """The JSON-ready description the server publishes for this model."""
        return {
            "model_name": self.name,
            "model_family": "stable_diffusion",
            "model_ability": list(self.abilities),
            "model_hub_id": self.hub_id,
            "default_size": f"{self.default_size[0]}x{self.default_size[1]}",
            "default_steps": self.default_steps,
            "default_guidance_scale": self.default_guidance,
        }


_ALL = (TEXT2IMAGE, IMAGE2IMAGE, INPAINTING)

CATALOGUE: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec("sd-turbo", "sd", "stabilityai/sd-turbo", (TEXT2IMAGE,), (512, 512), 1, 0.0, "float16", 1024),
            ModelSpec(
                "sdxl-turbo", "sdxl", "stabilityai/sdxl-turbo", (TEXT2IMAGE,), (512, 512), 1, 0.0, "float16", 2048
            ),
            ModelSpec(
                "stable-diffusion-v1.5", "sd", "runwayml/stable-diffusion-v1-5", _ALL, (512, 512), 50, 7.5,
                "float16", 1024,
            ),
            ModelSpec(
                "stable-diffusion-xl-base-1.0", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", _ALL,
                (1024, 1024), 50, 5.0, "float16", 2048,
            ),
            ModelSpec(
                "sd3-medium", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", _ALL, (1024, 1024), 28, 7.0,
                "float16", 2048, MappingProxyType({"quantize_text_encoder": "text_encoder_3"}),
            ),
            ModelSpec(
                "FLUX.1-schnell", "flux", "black-forest-labs/FLUX.1-schnell", _ALL, (1024, 1024), 4, 0.0,
                "bfloat16", 2048, MappingProxyType({"quantize_text_encoder": "text_encoder_2"}),
            ),
            ModelSpec(
                "FLUX.1-dev", "flux", "black-forest-labs/FLUX.1-dev", _ALL, (1024, 1024), 28, 3.5, "bfloat16",
                2048, MappingProxyType({"quantize_text_encoder": "text_encoder_2"}),
            ),
        )
    }
)


def get_spec(name: str) -> ModelSpec:
    """Look a model up by catalogue name; the error lists what exists."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown model name {name!r}; catalogue models: {', '.join(CATALOGUE)}") from None
