"""Sampler names (as Xinference and the A1111 API spell them) -> one diffusers noise scheduler per job.

A diffusers scheduler object holds per-run state (step index, multistep history), so it cannot step several
jobs at different timesteps. Every job therefore gets its own instance, built from the model's scheduler config.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

# name -> (diffusers class name, config overrides)
_EPSILON_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}
_FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {"Euler": ("FlowMatchEulerDiscreteScheduler", {})}

SAMPLER_NAMES: tuple[str, ...] = ("default", *_EPSILON_SAMPLERS)
FLOW_SAMPLER_NAMES: tuple[str, ...] = ("default", *_FLOW_SAMPLERS)


def sampler_names(flow: bool) -> tuple[str, ...]:
    """The sampler names a family accepts."""
    return FLOW_SAMPLER_NAMES if flow else SAMPLER_NAMES


def make_sampler(name: str, base: Any, flow: bool) -> Any:
    """A fresh sampler for one job; `base` is the model's own scheduler, whose config every sampler inherits."""
    import diffusers  # here, so that the sampler names above are known without loading torch

    if name == "default":
        return type(base).from_config(base.config)
    table = _FLOW_SAMPLERS if flow else _EPSILON_SAMPLERS
    if name not in table:
        raise ValueError(f"unknown sampler_name {name!r}; this model accepts: {', '.join(sampler_names(flow))}")
    class_name, overrides = table[name]
    config = dict(base.config)
    if class_name.startswith("DPMSolver") and "final_sigmas_type" not in base.config:
        overrides = {"final_sigmas_type": "sigma_min", **overrides}
    return getattr(diffusers, class_name).from_config(config, **overrides)


class SamplerFactory:
    """Per-job samplers for one model. Building from a config costs milliseconds (signature inspection); a deep
    copy of a cached, never-stepped template of the same name costs a fifth of that, per admitted job."""

    def __init__(self, base: Any, flow: bool):
        self.base, self.flow = base, flow
        self._templates: dict[str, Any] = {}

    def make(self, name: str) -> Any:
        if name not in self._templates:
            self._templates[name] = make_sampler(name, self.base, self.flow)
        return copy.deepcopy(self._templates[name])


def step_accepts_generator(sampler: Any) -> bool:
    """Whether `sampler.step` draws noise (ancestral and SDE samplers), so the job's generator must go in."""
    return "generator" in inspect.signature(sampler.step).parameters


def init_noise_sigma(sampler: Any) -> float:
    """The scale of a job's initial noise; flow-matching samplers start from unit noise and do not define it."""
    return getattr(sampler, "init_noise_sigma", 1.0)
