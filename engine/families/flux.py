"""FLUX.1 (schnell, dev): CLIP pooled + T5 conditioning, packed 2x2 latents, guidance as an embedding (no CFG)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning, Family
from .denoisers import Denoiser, FluxDenoiser
from .specs import FLUX


class FluxFamily(Family):
    spec = FLUX

    def __init__(self, pipeline, device, dtype):
        super().__init__(pipeline, device, dtype)
        self.guidance_embeds = bool(pipeline.transformer.config.guidance_embeds)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[Conditioning]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.spec.max_sequence_length,
        )
        return [
            {"encoder_hidden_states": embeds[i : i + 1], "pooled_projections": pooled[i : i + 1]}
            for i in range(len(texts))
        ]

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels // 4

    def _latent_hw(self, width: int, height: int) -> tuple[int, int]:
        return 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

    def latent_shape(self, width, height):
        return (1, self.latent_channels, *self._latent_hw(width, height))

    def pack(self, latents):
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)

    def unpack(self, latents, width, height):
        return self.pipeline._unpack_latents(latents, height, width, self.vae_scale_factor)

    def mask_to_latent(self, mask):
        return self.pack(mask.expand(-1, self.latent_channels, -1, -1))

    def configure_sampler(self, sampler, steps, width, height):
        latent_h, latent_w = self._latent_hw(width, height)
        seq_len = (latent_h // 2) * (latent_w // 2)
        mu = calculate_shift(
            seq_len, sampler.config.get("base_image_seq_len", 256), sampler.config.get("max_image_seq_len", 4096),
            sampler.config.get("base_shift", 0.5), sampler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        sampler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)

    def make_denoiser(self) -> Denoiser:
        return FluxDenoiser(self.pipeline.transformer)

    def denoiser_inputs(self, latents, timesteps, cond, guidance, width, height):
        latent_h, latent_w = self._latent_hw(width, height)
        text = cond["encoder_hidden_states"]
        inputs = {
            "hidden_states": latents,
            "timestep": timesteps.to(latents.dtype) / 1000,  # as FluxPipeline scales it
            "pooled_projections": cond["pooled_projections"],
            "encoder_hidden_states": text,
            "txt_ids": torch.zeros(text.shape[1], 3, device=self.device, dtype=text.dtype),
            "img_ids": self.pipeline._prepare_latent_image_ids(
                None, latent_h // 2, latent_w // 2, self.device, latents.dtype
            ),
        }
        if self.guidance_embeds:
            inputs["guidance"] = guidance
        return inputs
