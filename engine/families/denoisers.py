"""Flat-signature wrappers of the four denoisers: named tensor inputs in, the prediction out.

Backends (eager, torch.compile, ONNX export, TensorRT) need one plain `forward(*tensors)` per architecture, with
no keyword dicts and no return objects; these modules are that signature. `shared_inputs` are the inputs without
a batch dimension (FLUX's positional ids): everything else has the batch first.
"""

from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    input_names: tuple[str, ...] = ()
    shared_inputs: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config


class UNetDenoiser(Denoiser):
    input_names = ("sample", "timestep", "encoder_hidden_states")

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class SDXLUNetDenoiser(Denoiser):
    input_names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class SD3Denoiser(Denoiser):
    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.model(
            hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, return_dict=False,
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

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        return self.model(**named, return_dict=False)[0]
