"""What differs per family: how a control image is prepared at admission, how a ControlNet runs on a sub-batch of
rows, and which of its outputs goes to which of the denoiser's `control_inputs` (see families/denoisers.py).

Each follows diffusers' ControlNet pipelines: SD/SDXL control images are pixels in [0, 1] at the job's size; SD3's
and FLUX's are VAE latents. FLUX's pipeline samples them with the job's generator before the start noise, so Kiln
does too (the ControlNet part comes first in hook order); SD3's samples them from torch's global generator, for
the unconditional and conditional rows apart, so Kiln draws them from a second generator seeded with the job's
seed (one draw for the two rows), leaving the job's own generator, and so its noise, as it would be without.
ControlNets always run at scale 1: the scale is applied per row outside the module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

Samples = list[torch.Tensor]


class _Control:
    """What the families share: the per-output factors (the scale; guess mode's taper where it exists)."""

    guess_mode = False  # whether the family's ControlNets have diffusers' guess mode

    def __init__(self, family: Any):
        self.family = family

    def is_guess_mode(self, model: torch.nn.Module, guess_mode: bool) -> bool:
        return guess_mode

    def level_factors(self, count: int, scale: float, guess_mode: bool) -> torch.Tensor:
        """The multiplier of each output: diffusers' guess mode tapers the residuals from 0.1 (first down block)
        to 1 (mid block), times the scale."""
        if guess_mode:
            return torch.logspace(-1, 0, count) * scale
        return torch.full((count,), scale)

    def slots(self, model: torch.nn.Module, samples: Samples, names: tuple[str, ...]) -> list[int | None]:
        """For each of the denoiser's control inputs, the index of the sample it takes (None: nothing)."""
        return list(range(len(names)))


class UNetControl(_Control):
    """SD and SDXL: residuals for each down-block output and the mid block, sample k to input k."""

    guess_mode = True

    def __init__(self, family: Any):
        super().__init__(family)
        self.processor = VaeImageProcessor(vae_scale_factor=family.vae_scale_factor, do_convert_rgb=True,
                                           do_normalize=False)

    def prepare(self, model: torch.nn.Module, image: Any, state: Any) -> dict[str, torch.Tensor]:
        request = state.job.request
        pixels = self.processor.preprocess(image, height=request.height, width=request.width).to(torch.float32)
        pixels = pixels.to(self.family.device, model.dtype)
        return {"uncond": pixels, "cond": pixels}

    def run(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], control: torch.Tensor) -> Samples:
        down, mid = model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                          controlnet_cond=control, conditioning_scale=1.0, return_dict=False, **self.added(inputs))
        return [*down, mid]

    def added(self, inputs: dict[str, torch.Tensor]) -> dict:
        return {}

    def is_guess_mode(self, model, guess_mode):
        return guess_mode or bool(model.config.global_pool_conditions)  # as diffusers' pipelines force it

    def example_image(self, model: torch.nn.Module, width: int, height: int) -> torch.Tensor:
        """A blank prepared control image of one row (warm-up)."""
        return torch.zeros(1, 3, height, width, device=self.family.device, dtype=model.dtype)


class SDXLControl(UNetControl):
    def added(self, inputs):
        return {"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}


class _TransformerControl(_Control):
    """SD3 and FLUX: one sample per ControlNet block, spread over the transformer's blocks as diffusers does."""

    def example_image(self, model, width, height):
        return self.family.pack(torch.zeros(self.family.latent_shape(width, height), device=self.family.device,
                                            dtype=self.family.dtype))


class SD3Control(_TransformerControl):
    def prepare(self, model, image, state):
        family, request = self.family, state.job.request
        pixels = family.pipeline.image_processor.preprocess(image, height=request.height, width=request.width)
        rows = state.guidance.rows
        pixels = pixels.to(family.device, family.vae.dtype).repeat(len(rows), 1, 1, 1)
        generator = torch.Generator("cpu").manual_seed(state.job.seed)
        latents = family.vae.encode(pixels).latent_dist.sample(generator)
        # diffusers: the InstantX ControlNets (force_zeros_for_pooled_projection) were trained without the shift.
        shift = 0.0 if model.config.force_zeros_for_pooled_projection else family.vae.config.shift_factor
        latents = ((latents - shift) * family.vae.config.scaling_factor).to(family.dtype)
        return {kind: latents[index : index + 1] for index, kind in enumerate(rows)}

    def run(self, model, inputs, control):
        pooled = inputs["pooled_projections"]
        return list(model(
            hidden_states=inputs["hidden_states"], controlnet_cond=control, conditioning_scale=1.0,
            encoder_hidden_states=inputs["encoder_hidden_states"] if model.config.joint_attention_dim else None,
            pooled_projections=torch.zeros_like(pooled) if model.config.force_zeros_for_pooled_projection else pooled,
            timestep=inputs["timestep"], return_dict=False,
        )[0])

    def slots(self, model, samples, names):
        # diffusers' SD3 transformer: block i takes sample int(i / (blocks / samples)).
        interval = len(names) / len(samples)
        return [int(index / interval) for index in range(len(names))]


class FluxControl(_TransformerControl):
    def prepare(self, model, image, state):
        request = state.job.request
        latents = self.family.encode_image(image, request.width, request.height, state.generator)
        return {"cond": latents}

    def run(self, model, inputs, control):
        double, single = model(
            hidden_states=inputs["hidden_states"], controlnet_cond=control, conditioning_scale=1.0,
            encoder_hidden_states=inputs["encoder_hidden_states"], pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
            guidance=inputs["guidance"] if model.config.guidance_embeds else None, return_dict=False,
        )
        return [*double, *(single or [])]

    def slots(self, model, samples, names):
        # diffusers' FLUX transformer: block i takes sample i // ceil(blocks / samples), double and single apart.
        double_blocks = sum(1 for name in names if not name.startswith("control_single"))
        single_blocks = len(names) - double_blocks
        doubles = len(model.controlnet_blocks)
        singles = len(samples) - doubles
        slots: list[int | None] = [index // math.ceil(double_blocks / doubles) for index in range(double_blocks)]
        slots += [doubles + index // math.ceil(single_blocks / singles) if singles else None
                  for index in range(single_blocks)]
        return slots


ADAPTERS = {"sd": UNetControl, "sdxl": SDXLControl, "sd3": SD3Control, "flux": FluxControl}
