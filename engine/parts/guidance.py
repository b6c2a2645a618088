"""Guidance: how a job's rows of the batched forward become its prediction.

Classifier-free guidance brings two rows (unconditional, conditional) and combines them with the job's own
scale; a job without it, or of a guidance-distilled family (FLUX, whose guidance goes into the denoiser as an
input), brings one row used as it is. The executor picks one per job at admission (`Family.uses_cfg`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassifierFree:
    scale: float
    rows: tuple[str, ...] = ("uncond", "cond")

    def combine(self, output: torch.Tensor) -> torch.Tensor:
        uncond, cond = output[0:1], output[1:2]
        return uncond + self.scale * (cond - uncond)


@dataclass(frozen=True)
class SingleRow:
    rows: tuple[str, ...] = ("cond",)

    def combine(self, output: torch.Tensor) -> torch.Tensor:
        return output


Guidance = ClassifierFree | SingleRow
