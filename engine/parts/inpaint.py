"""Inpainting: after every sampler step, the latents outside the mask are put back to the input image's,
noised to the next timestep, so only the masked region (white = repaint) is generated.

diffusers' 4-channel inpainting does the same blend. Its noise comes from the image-to-image start
(`init_image`); at strength 1 the job starts from pure noise instead, as the inpainting pipeline does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..catalogue import INPAINTING
from ..samplers import init_noise_sigma
from .base import Part
from .init_image import InitImage, renoise


class InpaintBlend(Part):
    name = "inpaint"

    @classmethod
    def enabled(cls, spec: Any, options: Any) -> bool:
        return INPAINTING in spec.abilities

    def used_by(self, request) -> bool:
        return request.mask is not None

    def prepare(self, state) -> None:
        start = state.parts[InitImage.name]
        if start.strength >= 1.0:
            state.latents = start.noise * init_noise_sigma(state.sampler)
        request = state.job.request
        state.parts[self.name] = self._mask_latent(request.mask, request.width, request.height)

    def after_step(self, state) -> None:
        """`state.step` is the index of the step just taken."""
        start, mask = state.parts[InitImage.name], state.parts[self.name]
        known = start.image_latents
        if state.step + 1 < len(state.timesteps):
            known = renoise(state.sampler, known, start.noise, state.timesteps[state.step + 1 :][:1])
        state.latents = (1 - mask) * known + mask * state.latents

    def _mask_latent(self, mask: Image.Image, width: int, height: int) -> torch.Tensor:
        """Binarised at 0.5 and resized to the latent grid, as diffusers' inpaint pipelines do."""
        pixels = torch.from_numpy(np.array(mask.convert("L").resize((width, height), Image.Resampling.LANCZOS)))
        binary = (pixels.float() / 255.0 >= 0.5).float()[None, None]
        factor = self.family.vae_scale_factor
        small = F.interpolate(binary, size=(height // factor, width // factor))
        return self.family.mask_to_latent(small.to(self.family.device, self.family.dtype))
