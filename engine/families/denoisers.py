"""Flat-signature wrappers of the four denoisers: named tensor inputs in, the prediction out.

Backends (eager, torch.compile, ONNX export, TensorRT) need one plain `forward(*tensors)` per architecture, with
no keyword dicts and no return objects; these modules are that signature. `shared_inputs` are the inputs without
a batch dimension (FLUX's positional ids): everything else has the batch first.

`control_inputs` name the ControlNet additions a forward may take after `input_names`, all of them or none, each
batch first (zeros for rows without ControlNet): the UNet's residuals per down-block output and for the mid block,
and for SD3/FLUX one tensor per transformer block (blocks that get the same addition get the same tensor object).
A forward without them is the plain graph.
"""

from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    input_names: tuple[str, ...] = ()
    shared_inputs: frozenset[str] = frozenset()
    control_inputs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config


def unet_residual_count(config) -> int:
    """The down-block outputs a UNet's skip connections carry: conv_in's, each resnet's, each downsampler's."""
    blocks = len(config.down_block_types)
    layers = config.layers_per_block
    layers = [layers] * blocks if isinstance(layers, int) else list(layers)
    return 1 + sum(layers) + blocks - 1


class _UNet(Denoiser):
    def __init__(self, model: nn.Module):
        super().__init__(model)
        count = unet_residual_count(model.config)
        self.control_inputs = (*(f"control_down_{i}" for i in range(count)), "control_mid")

    @staticmethod
    def residuals(control: tuple[torch.Tensor, ...]) -> dict:
        if not control:
            return {}
        return {"down_block_additional_residuals": list(control[:-1]), "mid_block_additional_residual": control[-1]}


class UNetDenoiser(_UNet):
    input_names = ("sample", "timestep", "encoder_hidden_states")

    def forward(self, sample, timestep, encoder_hidden_states, *control):
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                          **self.residuals(control))[0]


class SDXLUNetDenoiser(_UNet):
    input_names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *control):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False,
            **self.residuals(control),
        )[0]


class SD3Denoiser(Denoiser):
    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.control_inputs = tuple(f"control_block_{i}" for i in range(len(model.transformer_blocks)))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, *control):
        # One addition per block: diffusers' block -> addition index is then the block's own.
        return self.model(
            hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, block_controlnet_hidden_states=list(control) or None,
            return_dict=False,
        )[0]


class FluxDenoiser(Denoiser):
    """FLUX.1-dev embeds guidance (one value per row); schnell has no guidance input at all."""

    shared_inputs = frozenset({"txt_ids", "img_ids"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.guidance_embeds = bool(model.config.guidance_embeds)
        names = ["hidden_states", "timestep", "pooled_projections", "encoder_hidden_states", "txt_ids", "img_ids"]
        if self.guidance_embeds:
            names.insert(2, "guidance")
        self.input_names = tuple(names)
        self.double_blocks = len(model.transformer_blocks)
        self.control_inputs = (*(f"control_block_{i}" for i in range(self.double_blocks)),
                               *(f"control_single_block_{i}" for i in range(len(model.single_transformer_blocks))))

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        control = inputs[len(self.input_names):]
        if control:  # one addition per block, as for SD3
            named["controlnet_block_samples"] = list(control[: self.double_blocks])
            named["controlnet_single_block_samples"] = list(control[self.double_blocks:])
        return self.model(**named, return_dict=False)[0]
