"""The family interface: everything architecture-specific that the one denoise loop needs.

A family wraps a loaded diffusers pipeline and reuses its own prompt encoding, latent packing and image
post-processing, so Kiln's images match the pipeline's for the same seed. What it adds is the batched shape of
the work: conditioning comes back as one row per prompt (dicts of `[1, ...]` tensors) that the loop stacks into
any batch, and the denoiser forward takes a per-row timestep and guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .denoisers import Denoiser
from .specs import FamilySpec

Conditioning = dict[str, torch.Tensor]


class Family:
    """Base adapter; subclasses fill in encoding, the denoiser call and the latent <-> pixel maps."""

    spec: FamilySpec  # what the family is (stride, flow, text encoders, ...), torch-free
    # Linear latent -> RGB factors (rows: latent channels) for cheap streaming previews; None: channel mean.
    preview_factors: list[list[float]] | None = None
    # What changed the denoiser's weights after loading (LoRAs fused at launch): part of every engine cache key.
    weights_tag: str = ""

    def __init__(self, pipeline: Any, device: torch.device, dtype: torch.dtype):
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        self.vae = pipeline.vae
        self.vae_scale_factor = pipeline.vae_scale_factor
        self.denoiser = self.make_denoiser()  # a backend may replace it with a compiled twin of the same signature
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # fp16 SDXL VAEs overflow; diffusers upcasts them the same way

    # --- text conditioning ------------------------------------------------------------------------------
    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether a job with this guidance contributes an unconditional row (never for guidance-distilled
        families, where guidance goes into the denoiser and each job is one row)."""
        return self.spec.cfg and guidance_scale > 1.0

    def encode(self, texts: list[str]) -> list[Conditioning]:
        """One conditioning row per text (dicts of [1, ...] tensors), through the pipeline's own encoder."""
        raise NotImplementedError

    @property
    def zero_negative(self) -> bool:
        """Whether a job without a negative prompt gets zero embeddings as its unconditional row (SDXL
        checkpoints ask for that with force_zeros_for_empty_prompt) rather than the empty prompt's."""
        return False

    def size_conditioning(self, width: int, height: int) -> Conditioning:
        """Extra per-row conditioning that depends only on the image size (SDXL's time ids)."""
        return {}

    # --- latents ----------------------------------------------------------------------------------------
    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        """The spatial latent shape of one image, before any packing."""
        return (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def unpack(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return latents

    def noise(self, width: int, height: int, generator: torch.Generator) -> torch.Tensor:
        return randn_tensor(self.latent_shape(width, height), generator=generator, device=self.device, dtype=self.dtype)

    def configure_sampler(self, sampler: Any, steps: int, width: int, height: int) -> None:
        sampler.set_timesteps(steps, device=self.device)

    def mask_to_latent(self, mask: torch.Tensor) -> torch.Tensor:
        """A [1, 1, h, w] latent-size mask in the layout the latents have."""
        return mask

    # --- the denoiser -----------------------------------------------------------------------------------
    def make_denoiser(self) -> Denoiser:
        """The denoiser as a flat-signature module (see denoisers.py), what every backend runs."""
        raise NotImplementedError

    def denoiser_inputs(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: torch.Tensor,
        width: int,
        height: int,
    ) -> dict[str, torch.Tensor]:
        """The named inputs of one batched forward: row i has its own timestep, conditioning and guidance."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One batched forward of named inputs through whichever backend runs the denoiser; the ControlNet
        additions (`control_inputs`) go after the others when a part has added them."""
        names = self.denoiser.input_names
        control = self.denoiser.control_inputs
        if control and control[0] in inputs:
            names = (*names, *control)
        return self.denoiser(*(inputs[name] for name in names))

    def denoise(self, latents, timesteps, cond, guidance, width, height) -> torch.Tensor:
        """`forward` of the inputs built from per-row latents, timesteps, conditioning and guidance."""
        return self.forward(self.denoiser_inputs(latents, timesteps, cond, guidance, width, height))

    # --- pixels <-> latents -----------------------------------------------------------------------------
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latent space -> the space the denoiser works in."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift

    def encode_image(self, image: Image.Image, width: int, height: int, generator: torch.Generator) -> torch.Tensor:
        """An init image -> packed, scaled latents, sampling the VAE posterior with the job's generator."""
        pixels = self.pipeline.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return self.pack(self.scale_latents(latents).to(self.dtype))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Batched VAE decode of finished jobs' latents into PIL images."""
        spatial = self.unscale_latents(self.unpack(latents, width, height))
        pixels = self.vae.decode(spatial.to(self.vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(pixels, output_type="pil")

    def preview(self, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        """A cheap RGB approximation of one job's latents (no VAE): a linear map of the channels."""
        spatial = self.unpack(latents, width, height)[0].float()
        if self.preview_factors is not None:
            factors = torch.tensor(self.preview_factors, device=spatial.device)
            rgb = torch.einsum("chw,cr->rhw", spatial, factors)
        else:
            rgb = spatial.mean(dim=0, keepdim=True).expand(3, -1, -1)
        rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
