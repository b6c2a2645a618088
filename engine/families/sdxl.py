"""Stable Diffusion XL (sdxl-turbo, stable-diffusion-xl-base-1.0): two CLIP encoders, pooled and size conditioning."""

from __future__ import annotations

import torch

from .base import Conditioning
from .denoisers import Denoiser, SDXLUNetDenoiser
from .sd import SDFamily
from .specs import SDXL


class SDXLFamily(SDFamily):
    spec = SDXL
    preview_factors = [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[Conditioning]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return [
            {"encoder_hidden_states": embeds[i : i + 1], "text_embeds": pooled[i : i + 1]} for i in range(len(texts))
        ]

    @property
    def zero_negative(self) -> bool:
        return bool(self.pipeline.config.force_zeros_for_empty_prompt)

    def size_conditioning(self, width: int, height: int) -> Conditioning:
        time_ids = self.pipeline._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=self.dtype,
            text_encoder_projection_dim=self.pipeline.text_encoder_2.config.projection_dim,
        )
        return {"time_ids": time_ids.to(self.device)}

    def make_denoiser(self) -> Denoiser:
        return SDXLUNetDenoiser(self.pipeline.unet)
