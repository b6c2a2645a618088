"""Image to image: the job starts from its input image instead of pure noise.

As diffusers' img2img and inpainting pipelines do: the image is VAE-encoded with the job's own generator, the
schedule is cut to the steps its strength keeps, and the latents are the image noised to the first kept
timestep, with noise drawn from the same generator next. The image latents and that noise stay in the job's
state for the inpainting blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..catalogue import IMAGE2IMAGE, INPAINTING
from ..errors import InvalidRequest
from ..schema import strength_of
from .base import Part


@dataclass
class Start:
    """What the job started from: the clean image latents, the noise it was noised with, the strength."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    strength: float


def renoise(sampler: Any, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Noise clean latents to `timestep`: flow-matching samplers interpolate, the others add scaled noise."""
    if hasattr(sampler, "scale_noise"):
        return sampler.scale_noise(clean, timestep, noise)
    return sampler.add_noise(clean, noise, timestep)


class InitImage(Part):
    name = "init_image"

    @classmethod
    def enabled(cls, spec: Any, options: Any) -> bool:
        return IMAGE2IMAGE in spec.abilities or INPAINTING in spec.abilities

    def used_by(self, request) -> bool:
        return request.image is not None

    @torch.no_grad()
    def prepare(self, state) -> None:
        request, family, sampler = state.job.request, self.family, state.sampler
        width, height = request.width, request.height
        image_latents = family.encode_image(request.image, width, height, state.generator)
        strength = strength_of(request)
        start = (request.steps - family.spec.steps_kept(request.steps, strength)) * sampler.order
        state.timesteps = state.timesteps[start:]
        if len(state.timesteps) == 0:
            raise InvalidRequest(f"strength {strength} with {request.steps} steps leaves no step to run", "strength")
        if hasattr(sampler, "set_begin_index"):  # PNDM has none, as in diffusers' img2img
            sampler.set_begin_index(start)
        noise = family.pack(family.noise(width, height, state.generator))
        state.parts[self.name] = Start(image_latents, noise, strength)
        state.latents = renoise(sampler, image_latents, noise, state.timesteps[:1])
