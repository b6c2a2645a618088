"""Stable Diffusion 3 (sd3-medium): CLIP-L + CLIP-G + optional T5, an MMDiT transformer, flow matching."""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning, Family
from .denoisers import Denoiser, SD3Denoiser
from .specs import SD3


class SD3Family(Family):
    spec = SD3

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[Conditioning]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.spec.max_sequence_length,
        )
        return [
            {"encoder_hidden_states": embeds[i : i + 1], "pooled_projections": pooled[i : i + 1]}
            for i in range(len(texts))
        ]

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels

    def configure_sampler(self, sampler, steps, width, height):
        if not sampler.config.get("use_dynamic_shifting"):
            return super().configure_sampler(sampler, steps, width, height)
        patch = self.pipeline.transformer.config.patch_size
        seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        mu = calculate_shift(
            seq_len, sampler.config.get("base_image_seq_len", 256), sampler.config.get("max_image_seq_len", 4096),
            sampler.config.get("base_shift", 0.5), sampler.config.get("max_shift", 1.16),
        )
        sampler.set_timesteps(steps, device=self.device, mu=mu)

    def make_denoiser(self) -> Denoiser:
        return SD3Denoiser(self.pipeline.transformer)

    def denoiser_inputs(self, latents, timesteps, cond, guidance, width, height):
        return {"hidden_states": latents, "timestep": timesteps, **cond}
