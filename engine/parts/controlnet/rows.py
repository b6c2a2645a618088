"""The per-row part of ControlNet: which (row, unit) pairs a ControlNet runs on this step, and how its scaled
outputs become the denoiser's control inputs for those rows only.

A unit acts on a row while the row's job is inside the unit's window (diffusers' rule, with the job's own step
and step count) and, in guess mode, on the conditional row only. One ControlNet runs once per forward on all its
pairs; each pair's outputs are multiplied by the pair's own factors (scale, guess-mode taper) and added into
zero tensors of the full batch at the pair's row, so rows without ControlNet get exact zeros and several units
on one row add up, as diffusers' multi-ControlNet does. Blocks of SD3/FLUX that take the same samples of every
ControlNet in the batch share one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Active:
    """A unit of one job, prepared at admission: its control image per row kind ("cond", "uncond")."""

    name: str
    scale: float
    start: float
    end: float
    guess_mode: bool
    images: dict[str, torch.Tensor]

    def acts(self, step: int, steps: int, kind: str) -> bool:
        """diffusers' `controlnet_keep` for step `step` of `steps`, and guess mode's conditional row only."""
        if step / steps < self.start or (step + 1) / steps > self.end:
            return False
        return kind == "cond" or not self.guess_mode


@dataclass
class Group:
    """One ControlNet's outputs for its pairs: the batch row of each pair, its scaled samples, and the sample each
    control input takes (None: none of this ControlNet's)."""

    rows: torch.Tensor
    samples: list[torch.Tensor]
    slots: list[int | None]


def scaled(samples: Sequence[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor]:
    """samples[k][p] * factors[p, k], rounded to the samples' dtype (as diffusers' scalar product is)."""
    out = []
    for level, sample in enumerate(samples):
        factor = factors[:, level].to(sample.device).view(-1, *([1] * (sample.dim() - 1)))
        out.append((sample * factor).to(sample.dtype))
    return out


def additions(groups: Sequence[Group], names: Sequence[str], rows: int) -> dict[str, torch.Tensor]:
    """The denoiser's control inputs for a batch of `rows`: each the sum, at each pair's row, of what every group
    gives it; inputs that would get the same sum share one tensor."""
    sums: dict[tuple, torch.Tensor] = {}
    inputs = {}
    for slot, name in enumerate(names):
        key = tuple((index, group.slots[slot]) for index, group in enumerate(groups) if group.slots[slot] is not None)
        if key not in sums:
            sums[key] = _sum(groups, key, rows)
        inputs[name] = sums[key]
    return inputs


def _sum(groups: Sequence[Group], key: tuple, rows: int) -> torch.Tensor:
    parts = [(groups[index], groups[index].samples[sample]) for index, sample in key]
    if not parts:  # no ControlNet feeds this input: zeros shaped like the ones that feed the others
        sample = next(group.samples[index] for group in groups for index in group.slots if index is not None)
        return sample.new_zeros((rows, *sample.shape[1:]))
    shape = torch.broadcast_shapes(*(sample.shape[1:] for _, sample in parts))  # pooled residuals broadcast
    total = parts[0][1].new_zeros((rows, *shape))
    for group, sample in parts:
        total.index_add_(0, group.rows, sample.expand(len(group.rows), *shape))
    return total
