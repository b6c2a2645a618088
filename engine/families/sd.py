"""Stable Diffusion 1.x/2.x (sd-turbo, stable-diffusion-v1.5): one CLIP text encoder and a UNet."""

from __future__ import annotations

import torch

from .base import Conditioning, Family
from .denoisers import Denoiser, UNetDenoiser
from .specs import SD


class SDFamily(Family):
    spec = SD
    preview_factors = [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[Conditioning]:
        embeds, _ = self.pipeline.encode_prompt(texts, self.device, 1, False)
        return [{"encoder_hidden_states": embeds[i : i + 1]} for i in range(len(texts))]

    def make_denoiser(self) -> Denoiser:
        return UNetDenoiser(self.pipeline.unet)

    def denoiser_inputs(self, latents, timesteps, cond, guidance, width, height):
        return {"sample": latents, "timestep": timesteps, **cond}
